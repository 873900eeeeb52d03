"""The whole ensemble as one ONNX file: each part's ONNX form equals its predict_proba, the file runs alone."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from conftest import TINY, make_image, save_tiny_weights
from stacker.app.report import report
from stacker.ensemble import Ensemble
from stacker.io.export import ExportError, aligned, onnx_proba
from stacker.io.onnx_builder import GraphBuilder
from stacker.learners.dense import DenseClassifier
from stacker.learners.streaming import StreamingLogistic, StreamingPrototype
from stacker.learners.zoo import PathLogistic, PrototypeClassifier, ShrinkageLDA
from stacker.level2.combiners import GreedyEnsemble, LogitStacker, MeanClassifier, SingleBest, TwoLayerStack


def _run(est, X, k):
    """``est``'s ONNX form run by ONNX Runtime on ``X``."""
    import onnx
    import onnxruntime as ort

    g = GraphBuilder()
    x = g.input("x", ["batch", X.shape[1]])
    out = aligned(est, g, onnx_proba(est, g, x, "test part"), k)
    g.nodes.append(onnx.helper.make_node("Identity", [out], ["p"]))
    model = g.model([onnx.helper.make_tensor_value_info("p", onnx.TensorProto.FLOAT, ["batch", k])], {})
    return ort.InferenceSession(model.SerializeToString()).run(None, {"x": X.astype(np.float32)})[0]


def _features(k, n=90, d=12, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    X = rng.gamma(1.0, 1.0, (n, d)) + 0.8 * np.eye(k, d)[y]  # non-negative, like pooled activations
    return X.astype(np.float32), y


def _blocks(k, L=3, n=90, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    logits = rng.normal(size=(L, n, k)) + 1.5 * np.eye(k)[y]
    P = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return np.hstack(list(P)).astype(np.float32), y


LEVEL1 = {"logistic": PathLogistic, "logistic-power1": lambda: PathLogistic(power=1.0),
          "lda": ShrinkageLDA, "prototype": PrototypeClassifier, "prototype-uncentred": lambda: PrototypeClassifier(center=False),
          "dense": lambda: DenseClassifier(hidden=(8,), batch_norm=True, dropout=0.3, epochs=3, random_state=0),
          "pipeline": lambda: make_pipeline(StandardScaler(), LogisticRegression(C=0.5)),
          "streaming-logistic": lambda: StreamingLogistic(epochs=3), "streaming-prototype": StreamingPrototype}


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "dense" else n for n in LEVEL1])
def test_each_level1_model_exports_its_predict_proba(name, k):
    X, y = _features(k)
    est = LEVEL1[name]().fit(X, y)
    assert np.abs(_run(est, X, k) - est.predict_proba(X)).max() < 1e-5


LEVEL2 = {"greedy": lambda L: GreedyEnsemble(L), "logit": lambda L: LogitStacker(L), "mean": lambda L: MeanClassifier(L),
          "best": lambda L: SingleBest(L), "stack2": lambda L: TwoLayerStack(L, cv=3)}


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("name", list(LEVEL2))
def test_each_combiner_exports_its_predict_proba(name, k):
    Z, y = _blocks(k)
    est = LEVEL2[name](3).fit(Z, y)
    assert np.abs(_run(est, Z, k) - est.predict_proba(Z)).max() < 1e-5


def test_a_fold_model_missing_a_class_has_its_columns_placed():
    X, y = _features(3)
    est = PrototypeClassifier().fit(X[y != 1], y[y != 1])  # classes 0 and 2
    out = _run(est, X, 3)
    assert np.allclose(out[:, 1], 0) and np.abs(out[:, [0, 2]] - est.predict_proba(X)).max() < 1e-5


def test_a_part_without_an_onnx_form_is_refused_by_name():
    from sklearn.neighbors import KNeighborsClassifier

    X, y = _features(2)
    with pytest.raises(ExportError, match="cannot export test part to ONNX: .*KNeighborsClassifier has no ONNX form"):
        _run(KNeighborsClassifier().fit(X, y), X, 2)


# -- whole ensembles -------------------------------------------------------------------------------
RUNNER = r"""
import json, sys
class Refuse:  # the exported file needs none of these
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("stacker", "tensorflow", "keras", "sklearn", "skops", "torch", "tf2onnx"):
            raise ImportError(f"{name} must not be imported")
sys.meta_path.insert(0, Refuse())
import numpy as np, onnxruntime as ort
sess = ort.InferenceSession(sys.argv[1])
meta = sess.get_modelmeta().custom_metadata_map
feeds = {i["name"]: np.load(sys.argv[2])[i["name"]] for i in json.loads(meta["stacker.inputs"])}
np.save(sys.argv[3], sess.run(["probabilities"], feeds)[0])
print(json.dumps({"classes": json.loads(meta["stacker.classes"]),
                  "loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("stacker", "sklearn", "tensorflow"))}))
"""


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory):
    """Three colours that overlap (so that every learner and combiner has work), tiny weights."""
    root = tmp_path_factory.mktemp("export")
    rng = np.random.default_rng(3)
    base = {"cat": (170, 90, 80), "dog": (90, 110, 170), "owl": (110, 150, 100)}
    for c, colour in base.items():
        (root / "train" / c).mkdir(parents=True)
        for i in range(12):
            make_image(root / "train" / c / f"{i}.png", (np.array(colour) + rng.normal(0, 35, 3)).tolist(), seed=i)
    return root, save_tiny_weights(root / "tiny.weights.h5")


def _pixels(n, sizes, seed=0):
    """Random RGB images of other sizes than the inputs', and each input's pixels as stacker resizes them."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (int(rng.integers(20, 50)), int(rng.integers(20, 50)), 3)).astype(np.uint8)
              for _ in range(n)]
    feeds = {f"pixels_{s}": np.stack([np.asarray(Image.fromarray(a).resize((s, s), Image.BILINEAR), np.float32)
                                      for a in images]) for s in sizes}
    return images, feeds


@pytest.mark.slow
@pytest.mark.parametrize("params", [
    {"models": ["logistic", "prototype", "dense"], "meta": "stack2", "min_proba": 0.01},
    {"models": "default", "meta": "logit", "backbones_at": (32, 40)},
    {"models": "fast", "meta": "logistic", "meta_inputs": "both", "feature_dtype": "float16"},
    {"finetune": {"blocks": 1, "epochs": 1, "head_epochs": 2, "learning_rate": 1e-3}, "meta": "logit"},
])
def test_the_exported_file_gives_stackers_probabilities_without_importing_stacker(three_classes, tmp_path, params):
    root, weights = three_classes
    params = dict(params)
    sizes = params.pop("backbones_at", (32,))
    backbones = [{**TINY, "weights": weights, "input_size": s, "name": f"tiny{s}"} for s in sizes]
    ens = Ensemble(backbones, cv=3, cache_dir=str(root / "cache"), verbose=0, **params).fit(str(root / "train"))
    ens.save(str(tmp_path / "model"))
    with open(tmp_path / "model" / "manifest.json") as f:
        assert json.load(f)["export"] == {"onnx": True}  # what the save recorded, checked by the export below
    loaded = Ensemble.load(str(tmp_path / "model"))
    info = loaded.export_onnx(tmp_path / "model.onnx")
    assert [i["name"] for i in info["inputs"]] == [f"pixels_{s}" for s in sizes]
    images, feeds = _pixels(7, sizes)
    np.savez(tmp_path / "feeds.npz", **feeds)
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(tmp_path / "model.onnx"), str(tmp_path / "feeds.npz"),
                           str(tmp_path / "out.npy")], capture_output=True, text=True, cwd=str(tmp_path),
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"classes": ["cat", "dog", "owl"], "loaded": []}
    exported, expected = np.load(tmp_path / "out.npy"), ens.predict_proba(images)
    assert np.abs(exported - expected).max() < 1e-4
    if "finetune" in params:  # fold networks that computed in float16 (a GPU's mixed precision) are refused
        for learner in loaded.learners_.values():
            for est in learner.fold_models_:
                est.mixed_precision = True
        with pytest.raises(ExportError, match="mixed precision"):
            loaded.export_onnx(tmp_path / "mixed.onnx")
    assert not np.allclose(expected, expected[:1])  # the images get different answers: the test can see errors
    if len(sizes) > 1:  # the README's script, as written there, on one of the images saved as a file
        from PIL import Image

        Image.fromarray(images[0]).save(tmp_path / "photo.png")
        proc = subprocess.run([sys.executable, "-c", _readme_script(), str(tmp_path / "photo.png")], cwd=str(tmp_path),
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        shown = eval(proc.stdout.strip().replace("np.float32", ""))  # {'cat': (0.1234), ...}
        assert list(shown) == ["cat", "dog", "owl"] and np.allclose(list(shown.values()), expected[0], atol=1e-4)


def _readme_script() -> str:
    from conftest import REPO

    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    return text.split("### One ONNX file", 1)[1].split("```python", 1)[1].split("```", 1)[0]


def test_export_refuses_a_model_with_a_part_onnx_cannot_express(three_classes, tmp_path, capsys):
    from sklearn.ensemble import ExtraTreesClassifier

    from stacker.app.cli import main

    root, weights = three_classes
    ens = Ensemble([{**TINY, "weights": weights}], models=["logistic", ExtraTreesClassifier(n_estimators=5)], cv=3,
                   cache_dir=str(root / "cache"), verbose=0).fit(str(root / "train"))
    with pytest.raises(ExportError, match=r"learner tiny_cnn@32:extratreesclassifier fold 0 .*ExtraTreesClassifier"):
        ens.export_onnx(tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
    ens.save(str(tmp_path / "m"))
    trust = ["--trust", "sklearn.ensemble._forest.ExtraTreesClassifier", "--trust",
             "sklearn.tree._classes.ExtraTreeClassifier", "--trust", "sklearn.tree._tree.Tree"]
    assert main(["export", str(tmp_path / "m"), str(tmp_path / "x.onnx"), *trust]) == 1
    assert "stacker export: error: cannot export learner tiny_cnn@32:extratreesclassifier" in capsys.readouterr().err
    # the saved model says so, and so does its report, without building the file
    with open(tmp_path / "m" / "manifest.json") as f:
        state = json.load(f)["export"]
    assert state["onnx"] is False and state["part"] == "learner tiny_cnn@32:extratreesclassifier fold 0"
    page = open(report(str(tmp_path / "m"), str(tmp_path / "r"))).read()
    assert "<h2>Export</h2>" in page and "cannot be exported to ONNX: cannot export learner tiny_cnn@32:extra" in page

