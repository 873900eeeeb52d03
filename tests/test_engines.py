"""Inference engines give the same features; Pillow resizing gives a Pillow script's pixels."""

import os

import numpy as np
import pytest
from PIL import Image

from conftest import TINY, make_class_folders, make_image, save_tiny_weights
from stacker import engines
from stacker import images as im
from stacker.features import FeatureExtractor


@pytest.fixture
def photos(tmp_path):
    return [str(make_image(tmp_path / f"{i}.jpg", (40 * i, 120, 200 - 30 * i), size=(50, 37), seed=i))
            for i in range(6)]


@pytest.fixture
def weights(tmp_path):
    return save_tiny_weights(tmp_path / "tiny.weights.h5")


@pytest.mark.skipif(not engines.available("onnx"), reason="onnxruntime/tf2onnx not installed")
def test_onnx_and_xla_give_the_keras_features_and_the_export_is_cached(tmp_path, photos, weights):
    common = dict(backbone="tiny_cnn", input_size=32, weights=weights, verbose=0)
    feats = {e: FeatureExtractor(**common, engine=e, cache_dir=tmp_path / e).transform(photos)
             for e in ("keras", "xla", "onnx")}
    for e in ("xla", "onnx"):
        rel = np.abs(feats[e] - feats["keras"]).max() / np.abs(feats["keras"]).max()
        assert rel < 1e-4, (e, rel)
    exported = os.listdir(tmp_path / "onnx" / "onnx")
    assert len(exported) == 1 and exported[0].endswith(".onnx")
    stamp = os.path.getmtime(tmp_path / "onnx" / "onnx" / exported[0])
    again = FeatureExtractor(**common, engine="onnx", cache_dir=tmp_path / "onnx")
    np.testing.assert_allclose(again.transform_arrays([np.zeros((9, 9, 3), np.uint8)]),
                               FeatureExtractor(**common, engine="keras").transform_arrays(
                                   [np.zeros((9, 9, 3), np.uint8)]), rtol=1e-4, atol=1e-6)
    assert os.path.getmtime(tmp_path / "onnx" / "onnx" / exported[0]) == stamp, "the export is reused"
    # the engine is part of the cache key: switching engines never serves the other one's numbers
    assert again.key_meta()["engine"] == "onnx"


@pytest.mark.skipif(not engines.available("onnx"), reason="onnxruntime/tf2onnx not installed")
def test_a_failed_export_falls_back_to_keras_with_a_warning(monkeypatch, photos):
    import tf2onnx

    def broken(*a, **k):
        raise RuntimeError("unsupported op")

    monkeypatch.setattr(tf2onnx.convert, "from_function", broken)
    ext = FeatureExtractor(**TINY, engine="onnx", verbose=0)
    with pytest.warns(UserWarning, match="ONNX export .* failed .*unsupported op.*using Keras"):
        assert ext.transform(photos).shape == (6, 16)


def test_engine_choice(monkeypatch):
    monkeypatch.setenv("STACKER_ENGINE", "xla")
    assert engines.resolve("auto") == "xla" and engines.resolve("keras") == "keras"
    monkeypatch.delenv("STACKER_ENGINE")
    assert engines.resolve("auto") == ("onnx" if engines.available("onnx") else "keras")
    with pytest.raises(ValueError, match="engine must be one of"):
        engines.resolve("tensorrt")


def test_pil_resize_gives_exactly_the_pixels_of_a_pillow_script(tmp_path, photos):
    png16 = str(make_image(tmp_path / "deep.png", (200, 60, 50), mode="I;16"))
    (_, got), = [(r, p.numpy()) for r, p in im.pixel_batches(photos, 24, batch_size=8, method="pil")]
    for i, path in enumerate(photos):
        with Image.open(path) as img:
            want = np.asarray(img.convert("RGB").resize((24, 24), Image.BILINEAR), dtype=np.float32)
        np.testing.assert_array_equal(got[i], want)
    (_, deep), = [(r, p.numpy()) for r, p in im.pixel_batches([png16], 8, method="pil")]
    assert 60 < deep.mean() < 200, "16-bit greys are scaled to 8 bits, not clipped to white"
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in photos]
    np.testing.assert_array_equal(np.concatenate(list(im.array_batches(arrays, 24, method="pil"))), got)


def test_a_tf_distribute_strategy_runs_extraction_heads_and_fine_tuning(tmp_path, photos, weights):
    """MirroredStrategy (one CPU replica here, GPUs in real use): same features, models built in its scope."""
    import tensorflow as tf

    from stacker.ensemble import Ensemble
    from stacker.models import DenseClassifier

    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    common = dict(backbone="tiny_cnn", input_size=32, weights=weights, verbose=0)
    plain = FeatureExtractor(**common, engine="keras").transform(photos)
    ext = FeatureExtractor(**common, strategy=strategy)
    np.testing.assert_allclose(ext.transform(photos), plain, rtol=1e-5, atol=1e-7)
    assert ext.engine == "keras" and strategy.extended.variable_created_in_scope(ext.model.weights[0].value)

    head = DenseClassifier(epochs=3, strategy=strategy).fit(plain, [0, 1] * 3)
    assert strategy.extended.variable_created_in_scope(head.model_.weights[0].value)
    head.save(str(tmp_path / "head"))  # the strategy is a run-time choice: not saved with the model

    root = make_class_folders(tmp_path / "train", 6, seed_step=30)
    ens = Ensemble([{**TINY, "weights": weights}], cv=2, meta="logistic", strategy=strategy, verbose=0,
                   finetune={"blocks": 1, "epochs": 1, "head_epochs": 2, "tta": ("original",),
                             "train_views": ("original",)})
    ens.fit(root)
    fold = ens.learners_[ens.specs_[0]["name"]].fold_models_[0]
    assert strategy.extended.variable_created_in_scope(fold.model_.weights[0].value)
    assert np.isfinite(ens.predict_proba(im.load_images(root))).all()
