"""No predicted probability is exactly 0 or 1 unless asked (``min_proba``): one wrong 0 costs infinite log loss."""

import json

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

import stacker
from conftest import TINY, make_class_folders, save_tiny_weights
from stacker.data import sources as im
from stacker.ensemble import Ensemble
from stacker.level2 import calibration

TRUST = ["sklearn.neighbors._classification.KNeighborsClassifier"]  # the saved model's 1-NN


@pytest.fixture(scope="module")
def hard(tmp_path_factory):
    """A saved ensemble whose level 2 passes on one learner's 0/1 probabilities (1-NN, no calibration)."""
    root = tmp_path_factory.mktemp("minp")
    make_class_folders(root / "train", 9)
    weights = save_tiny_weights(root / "tiny.weights.h5")
    data = im.load_images(root / "train")
    ens = Ensemble([{**TINY, "weights": weights}], models=[KNeighborsClassifier(1)], meta="best",
                   calibration=False, cv=3, random_state=0, verbose=0).fit(data)
    ens.save(root / "model")
    return ens, data, root


def _predict(root, paths, **kw):
    return stacker.predict(paths, model=root / "model", trusted=TRUST, **kw).proba


def _strictly_inside(p):
    assert np.all(p > 0) and np.all(p < 1), (p.min(), p.max())
    np.testing.assert_allclose(p.sum(1), 1, atol=1e-12)


def test_with_min_proba_mixes_with_uniform_and_checks_its_range():
    p = np.array([[1.0, 0.0, 0.0], [0.2, 0.5, 0.3], [np.nan] * 3])
    out = calibration.with_min_proba(p, 1e-3)
    np.testing.assert_allclose(out[:2], (1 - 3e-3) * p[:2] + 1e-3)
    assert out[:2].min() == pytest.approx(1e-3) and np.isnan(out[2]).all()
    assert np.array_equal(calibration.with_min_proba(p[:2], 0), p[:2])
    for bad in (-0.1, 1 / 3, 0.5, "1e-3", None, True):
        with pytest.raises(ValueError, match="min_proba must be a number >= 0 and below 1/3"):
            calibration.with_min_proba(p, bad)


def test_predictions_are_never_exactly_0_or_1_by_default(hard):
    ens, data, root = hard
    raw = ens.meta_.predict_proba(np.hstack(list(ens.oof_proba_.values())))
    assert set(np.unique(raw)) <= {0.0, 1.0}, "the setting this test needs: level 2 gives exact 0/1"
    _strictly_inside(ens.predict_proba(data.paths))
    assert ens.predict_proba(data.paths).min() == pytest.approx(1e-6)
    _strictly_inside(ens.meta_oof_proba_)  # out of fold: the same floor as predict
    assert np.isfinite(ens.scores_["ensemble"]["log_loss"])
    _strictly_inside(_predict(root, data.paths))
    _strictly_inside(Ensemble.load(root / "model", trusted=TRUST).predict_proba(data.paths[:4]))
    assert ens.min_proba == calibration.MIN_PROBA == 1e-6


def test_min_proba_0_gives_the_raw_probabilities(hard):
    ens, data, root = hard
    raw = _predict(root, data.paths, min_proba=0)
    assert set(np.unique(raw)) == {0.0, 1.0}
    loaded = Ensemble.load(root / "model", trusted=TRUST, min_proba=0)
    assert set(np.unique(loaded.predict_proba(data.paths))) == {0.0, 1.0}
    np.testing.assert_allclose(calibration.with_min_proba(raw), _predict(root, data.paths))
    assert _predict(root, data.paths[:2], min_proba=0.01).min() == pytest.approx(0.01)


def test_out_of_range_min_proba_fails_before_any_work(hard):
    ens, data, root = hard
    with pytest.raises(ValueError, match=r"min_proba must be a number >= 0 and below 1/2 \(2 classes\), got 0.5"):
        _predict(root, data.paths[:1], min_proba=0.5)
    with pytest.raises(ValueError, match="min_proba must be a number >= 0 and below 1/n_classes, got -1"):
        Ensemble([TINY], min_proba=-1).fit(data)


def test_a_model_saved_before_min_proba_loads_with_the_default(hard, tmp_path):
    import shutil

    _, data, root = hard
    old = tmp_path / "old"
    shutil.copytree(root / "model", old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["params"]["min_proba"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    loaded = Ensemble.load(old, trusted=TRUST)
    assert loaded.min_proba == calibration.MIN_PROBA
    _strictly_inside(loaded.predict_proba(data.paths[:4]))
