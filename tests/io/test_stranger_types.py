"""A skops file from someone else is rebuilt only from an explicit list of types, with inert values (issue 26, class 1).

skops trusts every scikit-learn estimator by default, and some of them read files named by
their own parameters or fitted attributes when they predict. The forged fold file below is made
only of types skops trusts by default (``skops.io.get_untrusted_types`` lists none): a
``StackingClassifier`` whose first-level ``DummyClassifier`` "predicts" the path of a file
outside the model directory, and whose final estimator is a ``Pipeline`` of a
``ColumnTransformer`` with ``CountVectorizer(input="filename")`` and a ``LogisticRegression``.
At predict time the vectorizer opens that file, and its words reach the probabilities. The
tests

- prove the payload is live (loaded as skops's defaults allow, its predictions follow the
  outside file's content);
- forge it into a saved ensemble (the manifest re-hashed) and run ``Ensemble.load`` + predict,
  ``stacker.predict`` and ``stacker predict`` through :mod:`sandbox`: each must fail, touch
  nothing outside the directory and name the file and the refused types;
- refuse the same reader when the user trusts every one of its types (the vectorizer's
  ``input`` is checked) and a ``Pipeline(memory=...)`` made of listed types only;
- check that every model of the zoo, every combiner, the calibration and estimator-valued
  parameters still load and predict identically.

``STACKER_UNDER_TEST=/path/to/checkout`` runs the children on another build (e.g. the pre-fix
commit, to show these tests fail there); run pytest with that checkout first on ``PYTHONPATH``
and from another directory (``python -m pytest`` puts the working directory first on the path).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import skops.io as sio
from sklearn.compose import ColumnTransformer
from sklearn.dummy import DummyClassifier
from sklearn.ensemble import StackingClassifier
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import LabelEncoder, StandardScaler

import stacker
from conftest import TINY, save_tiny_weights
from sandbox import child_env, rehash, touched_outside, fit_tiny_model, image_copy

CHILD_ENV = child_env()
READER_TYPES = ["builtins.slice", "sklearn.compose._column_transformer.ColumnTransformer",
                "sklearn.dummy.DummyClassifier", "sklearn.ensemble._stacking.StackingClassifier",
                "sklearn.feature_extraction.text.CountVectorizer", "sklearn.preprocessing._label.LabelEncoder"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A fitted tiny ensemble (logistic and prototype learners, level 2 chosen by "auto"), saved, and an image."""
    root = tmp_path_factory.mktemp("types")
    ens, data = fit_tiny_model(root, ("logistic", "prototype"))
    return ens, data, root, image_copy(data, root)


def _fold_file(model_dir) -> str:
    files = json.loads((model_dir / "manifest.json").read_text())["files"]
    return next(f for f in sorted(files) if f.startswith("learners/") and "logistic" in f and f.endswith(".skops"))


def file_reader(secret: str, n_features: int, classes) -> StackingClassifier:
    """A fitted classifier, of types skops trusts by default, whose ``predict_proba`` reads ``secret``."""
    rng = np.random.default_rng(0)
    first = DummyClassifier(strategy="most_frequent").fit(rng.random((4, n_features)), [secret] * 4)
    final = Pipeline([("columns", ColumnTransformer([("words", CountVectorizer(), 0)])),
                      ("lr", LogisticRegression())])
    final.fit(np.array([["alpha beta"], ["gamma delta"]], dtype=object), np.asarray(classes)[:2])
    final.named_steps["columns"].transformers_[0][1].input = "filename"  # the fitted vectorizer now opens paths
    stack = StackingClassifier(estimators=[("first", DummyClassifier())], final_estimator=LogisticRegression(),
                               stack_method="predict")
    stack.estimators_, stack.final_estimator_, stack.stack_method_ = [first], final, ["predict"]
    stack._label_encoder = LabelEncoder().fit(classes)
    return stack


def _forge(saved, tmp_path, obj=None, rel=None):
    """A copy of the saved model with one skops file replaced by ``obj`` (default: the file reader), re-hashed."""
    _ens, _data, root, _image = saved
    model_dir = tmp_path / "model"
    shutil.copytree(root / "model", model_dir)
    rel = rel or _fold_file(model_dir)
    legit = sio.load(str(model_dir / rel), trusted=sio.get_untrusted_types(file=str(model_dir / rel)))
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("alpha alpha beta\n")
    if obj is None:
        obj = file_reader(str(secret), legit.n_features_in_, legit.classes_)
    sio.dump(obj, str(model_dir / rel))
    rehash(model_dir)
    return model_dir, rel, secret, legit


def test_the_forged_fold_file_reads_an_outside_file_under_skops_defaults(saved, tmp_path):
    """The control: only default-trusted types, and loaded that way its predictions follow the outside file."""
    model_dir, rel, secret, legit = _forge(saved, tmp_path)
    assert sio.get_untrusted_types(file=str(model_dir / rel)) == [], "skops trusts every type of the forged file"
    forged = sio.load(str(model_dir / rel), trusted=[])
    X = np.zeros((1, legit.n_features_in_))
    first = forged.predict_proba(X)
    secret.write_text("gamma delta gamma\n")
    assert not np.allclose(forged.predict_proba(X), first), "the outside file's content reaches the predictions"


@pytest.mark.slow  # child processes under the audit hook
def test_a_fold_file_of_default_trusted_readers_touches_nothing_outside(saved, tmp_path):
    model_dir, rel, _secret, _legit = _forge(saved, tmp_path)
    results = touched_outside(model_dir, saved[3], tmp_path, env=CHILD_ENV)
    for entry, (code, err, events) in results.items():
        events = events
        assert events == [], f"{entry} touched outside the model directory: {events}"
        assert code != 0, f"{entry}: the forged directory must be refused"
        assert rel.split("/")[-1] in err and "untrusted type" in err, f"{entry}: {err[-2000:]}"
        assert "StackingClassifier" in err and "CountVectorizer" in err, err[-2000:]


def test_a_file_reader_is_refused_even_when_its_types_are_trusted(saved, tmp_path):
    """Trusting the types (``trusted=``) does not let a vectorizer open paths: its ``input`` is checked."""
    model_dir, rel, _secret, _legit = _forge(saved, tmp_path)
    with pytest.raises(ValueError, match=r"CountVectorizer .*input='filename'.*must be 'content'") as err:
        stacker.Ensemble.load(model_dir, trusted=READER_TYPES)
    assert rel.split("/")[-1] in str(err.value)


def test_a_pipeline_with_a_cache_folder_is_refused(saved, tmp_path):
    """``Pipeline(memory=...)`` is made of listed types only; its folder is refused by name before any use."""
    ens, data, root, _image = saved
    outside = tmp_path / "joblib-cache"
    n = len(ens.learners_) * len(ens.classes_)
    Z = np.random.default_rng(0).dirichlet(np.ones(n), size=20)
    combiner = Pipeline([("scale", StandardScaler()), ("lr", LogisticRegression())])
    combiner.fit(Z, np.arange(20) % len(ens.classes_)).memory = str(outside)  # a folder joblib would write to
    model_dir, rel, _secret, _legit = _forge(saved, tmp_path, obj=combiner, rel="meta.skops")
    with pytest.raises(ValueError, match=r"meta\.skops: the Pipeline has memory=.*joblib-cache.*must be None"):
        stacker.Ensemble.load(model_dir).predict_proba(data.paths[:2])
    assert not outside.exists()


def test_every_model_combiner_and_calibration_round_trips(tmp_path):
    """Legitimate skops files load and predict identically: zoo models, combiners, calibration, unfitted params."""
    from sklearn.base import clone

    from stacker.io import persist
    from stacker.learners import zoo
    from stacker.learners.streaming import StreamingLogistic, StreamingPrototype
    from stacker.level2 import registry
    from stacker.level2.calibration import TemperatureScaler

    rng = np.random.default_rng(0)
    X, y = rng.random((60, 6)), np.arange(60) % 3
    P = rng.dirichlet(np.ones(3), size=(60, 2)).reshape(60, 6)
    fitted = [(f"zoo {n}", s.factory(random_state=0), X) for n, s in zoo.MODELS.items()]
    fitted += [(f"combiner {n}", c(2, 0), P) for n, c in registry.COMBINERS.items()]
    fitted += [("calibration", TemperatureScaler(), P[:, :3]), ("streaming", StreamingPrototype(), X)]
    for label, est, Z in fitted:
        stem = str(tmp_path / label.replace(" ", "_"))
        unfitted = persist.load_unfitted(persist.save_unfitted(est, stem + "_unfitted"))
        assert repr(unfitted) == repr(clone(est)), label
        est.fit(Z, y)
        persist.save_estimator(est, stem)
        loaded = persist.load_estimator(stem)
        apply = "transform" if label == "calibration" else "predict_proba"
        np.testing.assert_array_equal(getattr(loaded, apply)(Z), getattr(est, apply)(Z), err_msg=label)
    persist.load_unfitted(persist.save_unfitted(StreamingLogistic(), str(tmp_path / "streaming_logistic")))


def test_saved_ensembles_with_estimator_parameters_predict_identically(saved, tmp_path):
    """The saved ensemble, and one whose model and meta-learner are scikit-learn estimators (saved as parameters)."""
    ens, data, root, _image = saved
    np.testing.assert_allclose(stacker.Ensemble.load(root / "model").predict_proba(data.paths),
                               ens.predict_proba(data.paths), atol=1e-9)
    weights = save_tiny_weights(tmp_path / "tiny.weights.h5")
    custom = stacker.Ensemble(backbones=[{**TINY, "weights": weights}], cv=2, random_state=0, verbose=0,
                              models=("prototype", LogisticRegression(C=0.5, max_iter=500)),
                              meta=LogisticRegression(max_iter=500), meta_inputs="features").fit(data)
    custom.save(tmp_path / "custom")
    loaded = stacker.Ensemble.load(tmp_path / "custom")
    assert isinstance(loaded.get_params()["meta"], LogisticRegression)
    np.testing.assert_allclose(loaded.predict_proba(data.paths), custom.predict_proba(data.paths), atol=1e-9)
