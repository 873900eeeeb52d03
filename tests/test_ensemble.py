"""The ensemble: honest out-of-fold stacking, level 2, save/load, the estimator contract and stacker.predict."""

import json

import numpy as np
import pytest
from PIL import Image
from sklearn.ensemble import RandomForestClassifier

from sklearn.exceptions import NotFittedError

import stacker
from conftest import TINY, make_class_folders, save_tiny_weights
from stacker.data import sources as im
from stacker.ensemble import Ensemble, ModelIntegrityError
from stacker.io.model_dir import FORMAT_VERSION
from stacker.features.extractor import forward_pass_count


def tiny_ensemble(cache_dir, weights, **kw):
    args = dict(backbones=[{**TINY, "weights": weights},
                           {**TINY, "input_size": 40, "models": "logistic", "weights": weights}],
                cv=3, random_state=0, cache_dir=cache_dir, verbose=0)
    args.update(kw)
    return Ensemble(**args)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("ens")
    make_class_folders(root / "train", 12)
    weights = save_tiny_weights(root / "tiny.weights.h5")
    data = im.load_images(root / "train")
    ens = tiny_ensemble(str(root / "cache"), weights).fit(data)
    ens.weights_file = weights
    return ens, data, root


def test_out_of_fold_predictions_never_come_from_a_model_that_saw_the_image(fitted):
    ens, data, _ = fitted
    n = len(data)
    val_rows = np.concatenate([va for _, va in ens.folds_])
    assert sorted(val_rows) == list(range(n)), "every image is validated exactly once"
    for tr, va in ens.folds_:
        assert not set(tr) & set(va)
    name = ens.specs_[0]["name"]
    assert set(ens.learners_) == {"tiny_cnn@32:logistic", "tiny_cnn@32:prototype", "tiny_cnn@40:logistic"}
    X = ens.learners_[name].source.transform(data)
    for i, (tr, va) in enumerate(ens.folds_):
        fold_model = ens.learners_[name].fold_models_[i]
        np.testing.assert_allclose(ens.oof_proba_[name][va], fold_model.predict_proba(X[va]), atol=1e-6)
        # the fold model that predicted these rows was trained on exactly the other rows
        other = ens.learners_[name].fold_models_[(i + 1) % len(ens.folds_)]
        assert not np.allclose(other.predict_proba(X[va]), ens.oof_proba_[name][va], atol=1e-9)
    assert ens.meta_oof_proba_.shape == (n, 2)


def test_scores_and_leaderboard(fitted):
    ens, data, _ = fitted
    scores = ens.evaluate()
    assert set(scores) == {s["name"] for s in ens.specs_} | {"ensemble"}
    for s in scores.values():
        assert 0 <= s["accuracy"] <= 1 and s["log_loss"] > 0
    assert scores["ensemble"]["accuracy"] >= 0.75  # two colours: easy even for random conv features
    board = ens.leaderboard()
    assert "ensemble" in board and "log_loss" in board
    on_train = ens.evaluate(data)
    assert on_train["ensemble"]["accuracy"] >= scores["ensemble"]["accuracy"] - 0.25


def test_save_load_identical_predictions_and_predict_api(fitted, tmp_path):
    ens, data, root = fitted
    model_dir = tmp_path / "model"
    ens.save(model_dir)
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION == 4 and manifest["classes"] == ["cat", "dog"]
    assert any(f.endswith(".keras") for f in manifest["files"])
    assert manifest["level2"]["name"] == ens.meta_.name
    expected = ens.predict_proba(data.paths)
    loaded = Ensemble.load(model_dir)
    np.testing.assert_allclose(loaded.predict_proba(data.paths), expected, atol=1e-6)
    machine = {"cache_dir", "weights_dir", "weights", "backbones"}  # paths of the machine that fitted it
    assert {k: v for k, v in _params(loaded).items() if k not in machine} == \
        {k: v for k, v in _params(ens).items() if k not in machine}, "a loaded ensemble keeps its fitted parameters"
    assert loaded.cache_dir is None and loaded.weights_dir is None, "never a folder named by the model directory"
    assert [{**b, "weights": None} for b in ens.backbones] == list(loaded.backbones)  # weights come from the dir
    assert Ensemble.load(model_dir, cache_dir=ens.cache_dir).cache_dir == ens.cache_dir  # the caller's setting

    # stacker.predict on paths, a folder, arrays and PIL images
    res = stacker.predict(data.paths[:5], model=model_dir)
    assert res.classes == ["cat", "dog"] and res.proba.shape == (5, 2)
    np.testing.assert_allclose(res.proba, expected[:5], atol=1e-6)
    assert res.labels == [["cat", "dog"][i] for i in expected[:5].argmax(1)]
    folder = root / "train" / "dog"
    res_dir = stacker.predict(folder, model=model_dir)
    assert len(res_dir) == 12 and res_dir.ids == list(range(12))
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in data.paths[:4]]
    res_arr = stacker.predict(np.stack(arrays), model=model_dir)
    np.testing.assert_allclose(res_arr.proba, expected[:4], atol=1e-4)
    res_pil = stacker.predict([Image.open(p) for p in data.paths[:4]], model=model_dir)
    np.testing.assert_allclose(res_pil.proba, res_arr.proba, atol=1e-6)
    one = stacker.predict(data.paths[0], model=model_dir)
    assert one.proba.shape == (1, 2)
    # the second call reuses the loaded ensemble
    assert stacker.load(model_dir) is stacker.load(model_dir)


def test_tampered_model_is_refused(fitted, tmp_path):
    ens, data, _ = fitted
    model_dir = tmp_path / "model"
    ens.save(model_dir)
    target = next(p for p in sorted((model_dir / "learners").iterdir()))
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    target.write_bytes(bytes(raw))
    with pytest.raises(ModelIntegrityError, match="does not match its sha256"):
        Ensemble.load(model_dir)
    manifest = json.loads((model_dir / "manifest.json").read_text())
    manifest["format_version"] = 99
    (model_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelIntegrityError, match="format version 99"):
        Ensemble.load(model_dir)
    manifest["format_version"] = 3  # the layout before sub-packages: its class paths are gone
    (model_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelIntegrityError, match="version 3, by a stacker whose classes lived in other modules"):
        Ensemble.load(model_dir)


def test_save_refuses_to_overwrite_a_foreign_directory(fitted, tmp_path):
    ens, _, _ = fitted
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a stacker model directory"):
        ens.save(tmp_path)
    model_dir = tmp_path / "m"
    ens.save(model_dir)
    (model_dir / "submission.csv").write_text("id,label\n")
    ens.save(model_dir)  # re-saving keeps the user's other files
    assert (model_dir / "submission.csv").exists()


def _params(ens) -> dict:
    from stacker.learners.base import describe

    return {k: describe(v) if hasattr(v, "get_params") else v for k, v in ens.get_params().items()}


@pytest.mark.parametrize("meta,meta_inputs", [
    ("mean", "proba"), ("greedy", "proba"), ("logit", "proba"), pytest.param("dense", "proba", marks=pytest.mark.slow),
    ("logistic", "both"),
    (RandomForestClassifier(n_estimators=20), "features"),
])
def test_meta_learners_and_inputs(fitted, meta, meta_inputs):
    first, data, root = fitted
    ens = tiny_ensemble(str(root / "cache"), first.weights_file, meta=meta, meta_inputs=meta_inputs).fit(data)
    proba = ens.predict_proba(data.paths[:6])
    assert proba.shape == (6, 2)
    np.testing.assert_allclose(proba.sum(1), 1, atol=1e-6)
    names = list(ens.learners_)
    assert ens.meta_.name.split("+")[0] in (meta if isinstance(meta, str) else type(meta).__name__, "best member (0)",
                                             "best member (1)", "best member (2)")
    if meta == "mean" and ens.meta_.name == "mean":
        oof_mean = np.mean([ens.oof_proba_[n] for n in names], axis=0)
        np.testing.assert_allclose(ens.meta_.predict_proba(np.hstack([ens.oof_proba_[n] for n in names])),
                                   oof_mean)


def test_second_fit_is_served_from_the_cache(fitted):
    ens, data, root = fitted
    before = forward_pass_count()
    refit = tiny_ensemble(str(root / "cache"), ens.weights_file).fit(data)
    assert forward_pass_count() == before, "a second fit must not run any CNN forward pass"
    for name in ens.oof_proba_:
        np.testing.assert_array_equal(refit.oof_proba_[name], ens.oof_proba_[name])
    np.testing.assert_allclose(refit.meta_oof_proba_, ens.meta_oof_proba_, atol=1e-6)


@pytest.mark.slow
def test_seed_makes_fits_repeatable(fitted):
    _, data, root = fitted
    ens, _, _ = fitted
    # the dense head is what a seed must fix (logistic and prototype fits are deterministic anyway); 10 epochs
    # show it as well as the default's early-stopped hundreds
    from stacker.learners.dense import DenseClassifier

    a = tiny_ensemble(None, ens.weights_file, models=(DenseClassifier(epochs=10),))
    b = tiny_ensemble(None, ens.weights_file, models=(DenseClassifier(epochs=10),))
    a.fit(data)
    b.fit(data)
    np.testing.assert_allclose(a.meta_oof_proba_, b.meta_oof_proba_, atol=1e-6)


def test_data_problems_give_clear_errors(fitted, tmp_path):
    ens, data, _ = fitted
    w = ens.weights_file
    few = data.subset(list(range(12)) + [12, 13])  # 12 cats, 2 dogs, cv=3
    with pytest.raises(ValueError, match="fewer images than cv=3"):
        tiny_ensemble(None, w).fit(few)
    one = data.subset(range(12))
    one.classes = ["cat"]
    with pytest.raises(ValueError, match="only one class"):
        tiny_ensemble(None, w).fit(one)
    with pytest.raises(NotFittedError):
        tiny_ensemble(None, w).predict(data.paths)


@pytest.mark.parametrize("params,match", [
    ({"meta_inputs": "logits"}, "meta_inputs"), ({"meta": "dense_net"}, "unknown meta-learner 'dense_net'"),
    ({"models": "logistc"}, "unknown model 'logistc'"), ({"models": ["logistic", 3]}, "fit and predict_proba"),
    ({"meta": "greedy", "meta_inputs": "features"}, "combines probabilities"), ({"cv": 1}, "cv must be"),
    ({"backbones": ["efficientnet_lite9"]}, "efficientnet_lite"), ({"finetune": {"epoch": 3}}, "unknown finetune"),
    ({"engine": "tpu"}, "engine must be"), ({"calibration": "yes"}, "calibration must be"),
])
def test_bad_parameters_fail_before_any_forward_pass(fitted, params, match):
    _, data, _ = fitted
    import time

    before, t0 = forward_pass_count(), time.perf_counter()
    ens = Ensemble(**{"backbones": [TINY], "verbose": 0, **params})
    with pytest.raises((ValueError, TypeError, KeyError), match=match):
        ens.fit(data)
    assert forward_pass_count() == before and time.perf_counter() - t0 < 5


def test_ensemble_is_a_scikit_learn_estimator(fitted):
    from sklearn.base import clone

    ens, _, _ = fitted
    params = ens.get_params()
    assert params["meta"] == "auto" and params["models"] == "default" and params["cv"] == 3
    copy = clone(ens)
    assert not hasattr(copy, "meta_") and _params(copy) == _params(ens)
    copy.set_params(cv=4, meta="greedy", models=("logistic",))
    assert copy.get_params()["cv"] == 4 and copy.get_params()["models"] == ("logistic",)
    assert ens.get_params()["cv"] == 3, "set_params on a clone leaves the original alone"
    assert "Ensemble(" in repr(ens)


def test_leaderboard_lists_every_learner_with_its_weight_and_level2(fitted):
    ens, _, _ = fitted
    board = ens.leaderboard()
    for name in ens.learners_:
        assert name in board
    assert "level 2: " + ens.meta_.name in board
    for candidate in ("greedy", "logit", "mean", "best", "greedy+T"):
        assert candidate in ens.level2_scores_
    if ens.meta_.weights is not None and len(ens.meta_.weights) == len(ens.learners_):
        assert all(ens.scores_[n]["weight"] is not None for n in ens.learners_)
