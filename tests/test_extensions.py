"""One place per concept: a toy learner kind, combiner, extraction option and cache kind, each declared once.

The four are written below as one plugin module (the text of ``TOY_PLUGIN``), imported
here and named in ``$STACKER_PLUGINS`` for the command line in a subprocess: each must
then work end to end (fit, save, load, predict, ``stacker cache ls`` / ``rm``, its CLI
option) with no edit anywhere else.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, TINY, make_class_folders
from sklearn.base import clone

TOY_PLUGIN = '''
import json
import os

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from stacker.features.config import register_extraction_option
from stacker.features.layout import Artefact, register_cache_kind
from stacker.learners.base import Learner
from stacker.learners.kinds import register_learner
from stacker.level2.arrays import align_proba
from stacker.level2.registry import register_combiner
from stacker.params import Option, Param

# 1. an extraction option: every pixel inverted before the network
register_extraction_option(
    Param("invert", False, "bool\\n    Invert every pixel before the network (a toy option).",
          check=lambda v: isinstance(v, bool), what="True or False",
          cli=Option(("--invert",), "invert every pixel before the network", action="store_true")),
    pixels=lambda px, on: 255.0 - px if on else px)


# 2. a learner kind: the nearest class centre, written down in its own cache folder (4. below)
class CentroidModel(ClassifierMixin, BaseEstimator):
    def __init__(self, scale=1.0):
        self.scale = scale

    def fit(self, X, y):
        self.classes_ = np.unique(y)
        self.centres_ = np.stack([X[y == c].mean(axis=0) for c in self.classes_])
        return self

    def predict_proba(self, X):
        d = -self.scale * ((np.asarray(X)[:, None, :] - self.centres_[None]) ** 2).sum(-1)
        e = np.exp(d - d.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)


@register_learner
class CentroidLearner(Learner):
    kind = "centroid"
    param = Param("centroid", None, "bool, optional\\n    Nearest-centroid learners instead of models (a toy kind).",
                  check=lambda v: v in (None, True, False), what="None, True or False")
    saved_types = (CentroidModel,)
    cli_title = "centroid learners (a toy kind)"
    cli_options = (Option(("--centroid",), "fit nearest-centroid learners", action="store_true"),)

    @classmethod
    def from_cli(cls, args):
        return True if args.centroid else None

    @classmethod
    def code_parts(cls, out_of_core=False):
        return {"centroid_code": "v1"}

    @classmethod
    def specs(cls, spec, models):
        spec.pop("models", None)
        return [{**spec, "model": "centroid", "name": spec["base"] + ":centroid"}]

    def _fit_fold(self, i, tr, va, inputs, y, k, data, state):
        X = np.asarray(inputs["original"], dtype=np.float64)
        est = CentroidModel().fit(X[tr], y[tr])
        if self.settings.cache_dir:
            folder = os.path.join(self.settings.cache_dir, "centroids")
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, f"{self.key_}-fold{i}.json"), "w") as f:
                json.dump(est.centres_.tolist(), f)
        return est, {"oof_proba": align_proba(est, est.predict_proba(X[va]), k)}


# 3. a combiner: the normalised geometric mean of the learners' probabilities
@register_combiner("geomean", meaning="no weights: every learner counts the same")
class GeoMean(ClassifierMixin, BaseEstimator):
    """The normalised geometric mean of every learner's probabilities (a toy combiner)."""

    def __init__(self, n_learners=1):
        self.n_learners = n_learners

    def fit(self, X, y):
        self.classes_ = np.unique(y)
        return self

    def predict_proba(self, X):
        blocks = np.asarray(X).reshape(len(X), self.n_learners, -1)
        logp = np.log(np.clip(blocks, 1e-12, 1)).mean(axis=1)
        e = np.exp(logp - logp.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)


# 4. a cache kind: the centroids the learner kind writes
def scan_centroids(folder, context):
    return [Artefact.at("centroids", os.path.join(folder, name), "class centres of one fold")
            for name in sorted(os.listdir(folder))]


register_cache_kind("centroids", "centroids", scan_centroids, "class centres of the toy centroid learners")
'''


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The toy plugin imported (and its registrations undone afterwards)."""
    from stacker.features.config import unregister_extraction_option
    from stacker.features.layout import unregister_cache_kind
    from stacker.learners.kinds import unregister_learner
    from stacker.level2.registry import unregister_combiner

    folder = tmp_path_factory.mktemp("plugin")
    (folder / "toyplugin.py").write_text(TOY_PLUGIN)
    sys.path.insert(0, str(folder))
    try:
        yield importlib.import_module("toyplugin"), str(folder)
    finally:
        unregister_extraction_option("invert")
        unregister_learner("centroid")
        unregister_combiner("geomean")
        unregister_cache_kind("centroids")
        sys.modules.pop("toyplugin", None)
        sys.path.remove(str(folder))


def test_each_toy_is_one_declaration_that_the_ensemble_reads(toy):
    import stacker

    params = inspect.signature(stacker.Ensemble).parameters
    assert params["invert"].default is False and params["centroid"].default is None
    assert "invert : bool" in stacker.Ensemble.__doc__ and "centroid : bool" in stacker.Ensemble.__doc__
    assert '``"geomean"``' in stacker.Ensemble.__doc__
    ens = stacker.Ensemble([TINY], invert=True, centroid=True, meta="geomean")
    assert clone(ens).get_params()["invert"] is True and "invert=True" in repr(ens)
    with pytest.raises(ValueError, match="invert must be True or False, got 'yes'"):
        stacker.Ensemble([TINY], invert="yes").fit([])
    with pytest.raises(TypeError, match="unexpected parameters"):
        stacker.Ensemble([TINY], inverted=True)


def test_toys_fit_save_load_predict_and_show_in_the_cache(toy, tmp_path):
    import stacker
    from stacker.app import inventory
    from stacker.features.extractor import FeatureExtractor

    data = make_class_folders(tmp_path / "train", 8)
    cache = tmp_path / "cache"
    backbones = [TINY, {"backbone": "tiny_cnn_b", "input_size": 24, "weights": None, "centroid": False}]
    ens = stacker.Ensemble(backbones, models="logistic", meta="geomean", calibration=False, cv=3, invert=True,
                           centroid=True, cache_dir=str(cache), verbose=0).fit(data)
    kinds = {name: lr.kind for name, lr in ens.learners_.items()}
    assert kinds == {"tiny_cnn@32:centroid": "centroid", "tiny_cnn_b@24:logistic": "frozen"}
    assert "geomean" in ens.level2_scores_ and ens.scores_["ensemble"]["accuracy"] > 0.8  # cross-fitted, scored

    plain = FeatureExtractor("tiny_cnn", weights=None, input_size=32, cache_dir=str(cache), verbose=0)
    inverted = FeatureExtractor("tiny_cnn", weights=None, input_size=32, cache_dir=str(cache), verbose=0,
                                options={"invert": True})
    assert inverted.key_meta()["options"] == {"invert": True} and "options" not in plain.key_meta()
    images = stacker.load_images(str(data))
    assert not np.allclose(inverted.extract(images).values, plain.extract(images).values)

    loaded = stacker.Ensemble.load(ens.save(tmp_path / "model"))
    assert loaded.invert is True and loaded.centroid is True
    np.testing.assert_allclose(loaded.predict_proba(data / "cat"), ens.predict_proba(data / "cat"), atol=1e-6)
    manifest = json.loads((tmp_path / "model" / "manifest.json").read_text())
    assert {e["kind"] for e in manifest["learners"]} == {"centroid", "frozen"}

    found = inventory.select(inventory.scan(cache), kind="centroids")
    assert len(found) == 3 and all(a.state == "current" for a in found)  # one file per fold
    inventory.remove(found)
    assert not os.listdir(cache / "centroids")


@pytest.mark.slow
def test_toys_on_the_command_line(toy, tmp_path):
    _, plugin_dir = toy
    data = make_class_folders(tmp_path / "train", 6)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests"), plugin_dir]),
           "STACKER_PLUGINS": "tinynet,toyplugin", "STACKER_CACHE_DIR": str(tmp_path / "cache")}

    def stacker_cli(*args):
        return subprocess.run([sys.executable, "-m", "stacker", *args], capture_output=True, text=True,
                              cwd=tmp_path, env=env, timeout=300)

    helped = stacker_cli("fit", "--help")
    assert "--invert" in helped.stdout and "--centroid" in helped.stdout and "geomean" in helped.stdout
    fitted = stacker_cli("fit", str(data), "--out", str(tmp_path / "m"), "--backbones", "tiny_cnn",
                         "--image-size", "32", "--weights", "none", "--folds", "3", "--centroid", "--invert",
                         "--meta", "geomean", "--no-calibration", "--no-report", "--quiet")
    assert fitted.returncode == 0, fitted.stderr
    assert "tiny_cnn@32:centroid" in fitted.stdout and "geomean" in fitted.stdout
    params = json.loads((tmp_path / "m" / "manifest.json").read_text())["params"]
    assert params["invert"] is True and params["centroid"] is True
    listed = stacker_cli("cache", "ls", "--cache", str(tmp_path / "cache"))
    assert listed.returncode == 0 and "centroids" in listed.stdout, listed.stderr
    removed = stacker_cli("cache", "rm", "--kind", "centroids", "--cache", str(tmp_path / "cache"))
    assert removed.returncode == 0 and not os.listdir(tmp_path / "cache" / "centroids"), removed.stderr
