"""Inference engines give the same features; Pillow resizing gives a Pillow script's pixels;
a saved model runs its saved ONNX graphs (checked, never exported again)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, TINY, make_class_folders, make_image, save_tiny_weights
from stacker.features import engines
from stacker.data import decode as im
from stacker.data.sources import load_images
from stacker.ensemble import Ensemble, ModelIntegrityError
from stacker.features.extractor import FeatureExtractor
from stacker.backbones.torch_checkpoint import sha256_file

needs_onnx = pytest.mark.skipif(not engines.available("onnx"), reason="onnxruntime/tf2onnx not installed")


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


@needs_onnx
def test_bulk_extraction_runs_two_sessions_in_turn_with_the_features_of_one(tmp_path, photos, weights, monkeypatch):
    opened, real = [], engines.open_session
    monkeypatch.setattr(engines, "open_session", lambda graph, threads=0: opened.append(threads) or real(graph, threads))
    shrunk, run = [], engines._run_session
    monkeypatch.setattr(engines.OnnxForward, "shrink_after", 3)
    monkeypatch.setattr(engines, "_run_session", lambda s, p, o=None: shrunk.append(o is not None) or run(s, p, o))
    common = dict(backbone="tiny_cnn", input_size=32, weights=weights, verbose=0, engine="onnx")
    bulk = FeatureExtractor(**common, batch_size=2, cache_dir=tmp_path / "bulk")
    feats = bulk.transform(photos)  # three batches: the bulk path
    half = max(1, engines._cores() // 2)
    assert opened == [0, half, half], "one session for single batches, two with half the cores for bulk work"
    assert shrunk == [False, True, True], "each session's last batch of a long call returns the arena's memory"
    single = FeatureExtractor(**common, batch_size=32, cache_dir=tmp_path / "single").transform(photos)
    np.testing.assert_array_equal(feats, single)
    assert opened == [0, half, half, 0], "a single batch opens no bulk sessions"
    forward = bulk._network()
    batches = list(im.pil_batches(photos, 32, 2))
    monkeypatch.setattr(engines.OnnxForward, "shrink_after", 4)
    shrunk.clear()
    mapped = list(forward.map(iter(batches), count=len(batches)))
    assert shrunk == [False] * 3, "a call shorter than shrink_after keeps the arena"
    assert [tag.tolist() for tag, _ in mapped] == [rows.tolist() for rows, _ in batches], "in order"
    for (_, out), (_, pixels) in zip(mapped, batches):
        np.testing.assert_array_equal(out, forward(pixels))
    assert len(opened) == 4, "the bulk sessions stay open"


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
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(open(photos[0], "rb").read()[:200])
    for files in ([*photos[:3], str(broken), *photos[3:]], photos[:1]):  # threads, and the one-image path
        out = list(im.pil_batches(files, 24, batch_size=4))
        rows = np.concatenate([r for r, _ in out])
        assert rows.tolist() == [i for i, f in enumerate(files) if f != str(broken)], "a broken file is left out"
        want = got[[photos.index(files[r]) for r in rows]]
        np.testing.assert_array_equal(np.concatenate([p for _, p in out]), want)


@pytest.mark.slow  # over 7 s: the full suite runs it (the fast lane keeps this module's other tests)
def test_a_tf_distribute_strategy_runs_extraction_heads_and_fine_tuning(tmp_path, photos, weights):
    """MirroredStrategy (one CPU replica here, GPUs in real use): same features, models built in its scope."""
    import tensorflow as tf

    from stacker.ensemble import Ensemble
    from stacker.learners.dense import DenseClassifier

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
    assert np.isfinite(ens.predict_proba(load_images(root))).all()


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    """A tiny ensemble fitted on ONNX Runtime and saved (with its graph), and its training images."""
    root = tmp_path_factory.mktemp("saved-onnx")
    make_class_folders(root / "train", 6, seed_step=30)
    weights = save_tiny_weights(root / "tiny.weights.h5")
    data = load_images(root / "train")
    ens = Ensemble([{**TINY, "weights": weights}], models=("logistic",), cv=2, engine="onnx",
                   cache_dir=str(root / "cache"), verbose=0).fit(data)
    ens.save(root / "model")
    return ens, data, root / "model"


_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
import tinynet
import stacker
from stacker.features.extractor import forward_pass_count
res = stacker.predict(sys.argv[3:], model=sys.argv[2])
print(json.dumps({"proba": res.proba.tolist(), "forward": forward_pass_count(),
                  "imported": sorted({"tensorflow", "tf2onnx", "keras"} & set(sys.modules))}))
"""


@needs_onnx
def test_a_loaded_model_predicts_in_a_fresh_process_without_exporting_or_tensorflow(onnx_model):
    ens, data, model_dir = onnx_model
    manifest = json.loads((model_dir / "manifest.json").read_text())
    graph = manifest["learners"][0]["onnx_file"]
    assert graph.endswith(".onnx") and manifest["files"][graph] == sha256_file(model_dir / graph)
    paths = data.paths[:3]
    out = subprocess.run([sys.executable, "-c", _CHILD, os.path.join(REPO, "tests"), str(model_dir), *paths],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    # no exporter and no Keras model: neither tf2onnx nor TensorFlow was even imported
    assert got["imported"] == [] and got["forward"] == len(paths)
    np.testing.assert_allclose(got["proba"], ens.predict_proba(paths), rtol=1e-5, atol=1e-7)


@needs_onnx
def test_a_tampered_onnx_graph_is_refused_by_its_checksum(onnx_model, tmp_path):
    _, data, model_dir = onnx_model
    forged = tmp_path / "model"
    shutil.copytree(model_dir, forged)
    graph = json.loads((forged / "manifest.json").read_text())["learners"][0]["onnx_file"]
    blob = bytearray((forged / graph).read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (forged / graph).write_bytes(bytes(blob))
    with pytest.raises(ModelIntegrityError, match=f"{graph} does not match its sha256"):
        Ensemble.load(forged)
    # swapped after the load's check: the bytes handed to ONNX Runtime are checked again
    saved = engines.SavedNetwork(str(forged / "unused.keras"), str(forged / graph), sha256_file(model_dir / graph))
    with pytest.raises(ModelIntegrityError, match="refusing to open it"):
        saved.forward("onnx")(np.zeros((1, 32, 32, 3), np.float32))


@needs_onnx
def test_a_loaded_model_saves_again_with_the_same_graph_and_keras_only_when_needed(onnx_model, tmp_path,
                                                                                monkeypatch):
    ens, data, model_dir = onnx_model
    from stacker.io import persist

    real = persist.load_keras
    monkeypatch.setattr(persist, "load_keras", lambda *a, **k: pytest.fail("a .keras archive was read"))
    loaded = Ensemble.load(model_dir)
    np.testing.assert_allclose(loaded.predict_proba(data.paths[:4]), ens.predict_proba(data.paths[:4]), rtol=1e-5)
    monkeypatch.setattr(persist, "load_keras", real)  # saving writes the .keras archive too: read on demand
    loaded.save(tmp_path / "again")
    first = json.loads((model_dir / "manifest.json").read_text())["files"]
    again = json.loads((tmp_path / "again" / "manifest.json").read_text())["files"]
    graphs = [f for f in first if f.endswith(".onnx")]
    assert graphs and all(again[f] == first[f] for f in graphs)


@needs_onnx
def test_a_graph_cannot_read_other_files(tmp_path):
    """Saved graphs are opened from their checked bytes, so one naming an external data file is refused."""
    from onnx import TensorProto, helper, numpy_helper

    (tmp_path / "secret.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    w = numpy_helper.from_array(np.ones(4, np.float32), "w")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "secret.bin"), ("offset", "0"), ("length", "16")):
        w.external_data.add(key=key, value=value)
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [w])
    blob = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    (tmp_path / "g.onnx").write_bytes(blob)
    saved = engines.SavedNetwork(str(tmp_path / "g.keras"), str(tmp_path / "g.onnx"), sha256_file(tmp_path / "g.onnx"))
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        with pytest.raises(Exception, match="(?i)external data|model_path"):
            saved.forward("onnx")(np.zeros(4, np.float32))
    finally:
        os.chdir(cwd)

