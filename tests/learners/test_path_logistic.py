"""The zoo's ``logistic`` model: C from a warm-started path on one inner split, a temperature, one refit."""

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from stacker.learners.fastpath import proba_function
from stacker.learners.zoo import PathLogistic, SignedPower, make_model, signed_power


def _blobs(k, n_per, d=20, seed=0, spread=2.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * spread
    y = np.repeat(np.arange(k), n_per)
    return (centres[y] + rng.normal(size=(len(y), d))).astype(np.float32), y


@pytest.mark.parametrize("k, power", [(2, 0.5), (7, 0.5), (7, 1)])
def test_path_logistic_picks_a_c_of_the_grid_and_predicts_like_its_refitted_model(k, power):
    X, y = _blobs(k, 40)
    est = PathLogistic(power=power, random_state=0).fit(X, y)
    assert [name for name, _ in est.pipeline_.steps] == ["power", "scale", "logistic"][power == 1:]
    assert est.C_ in est.Cs and np.isfinite(est.path_).all() and np.exp(-1) <= est.temperature_ <= np.e
    assert est.path_[list(sorted(est.Cs)).index(est.C_)] == est.path_.min()
    assert est.path_.max() < np.log(k) and len(set(est.path_.round(6))) == len(est.Cs)  # real held-out losses
    P = est.predict_proba(X)
    np.testing.assert_allclose(P.sum(axis=1), 1.0, rtol=1e-6)
    assert (est.predict(X) == y).mean() > 0.9
    # the temperature is folded into the coefficients: the same as the refit at C_ with logits divided by T
    Z = signed_power(X, power)
    Z = StandardScaler().fit(Z).transform(Z).astype(np.float32)
    ref = LogisticRegression(C=est.C_, max_iter=1000, tol=1e-6).fit(Z, y).decision_function(Z)
    ref = ref.reshape(len(y), -1)
    if ref.shape[1] == 1:
        ref = np.hstack([np.zeros_like(ref), ref])
    ref = np.exp(ref / est.temperature_ - (ref / est.temperature_).max(axis=1, keepdims=True))
    np.testing.assert_allclose(P, ref / ref.sum(axis=1, keepdims=True), atol=2e-3)
    np.testing.assert_allclose(proba_function(est)(X), P, rtol=1e-5, atol=1e-7)  # the one-image fast path
    assert clone(est).get_params() == est.get_params()


def test_a_class_too_small_to_split_falls_back_to_the_middle_c_without_a_temperature():
    X, y = _blobs(3, 10)
    keep = np.r_[np.flatnonzero(y == 0)[:2], np.flatnonzero(y != 0)]
    est = PathLogistic().fit(X[keep], y[keep])
    assert est.C_ == sorted(est.Cs)[len(est.Cs) // 2] and est.temperature_ == 1.0 and np.isnan(est.path_).all()
    assert est.predict_proba(X).shape == (len(X), 3)


def test_the_zoo_logistic_is_the_path_model_with_the_learner_seed():
    est = make_model("logistic", random_state=3)
    assert isinstance(est, PathLogistic) and est.random_state == 3


def test_signed_power_keeps_signs_and_dtype_and_refuses_a_changed_width():
    X = np.array([[-4.0, 0.0, 9.0]], np.float32)
    out = SignedPower().fit(X).transform(X)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[-2.0, 0.0, 3.0]])
    np.testing.assert_array_equal(SignedPower(power=1).fit(X).transform(X), X)
    with pytest.raises(ValueError, match="features"):
        SignedPower().fit(X).transform(X[:, :2])
