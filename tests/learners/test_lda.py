"""The ``lda`` model: shrinkage LDA of power-normalised features, softened by a temperature fitted out of sample."""

import numpy as np
import pytest
from scipy.special import softmax
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.preprocessing import StandardScaler

from stacker.learners.fastpath import proba_function
from stacker.learners.zoo import ShrinkageLDA, check_takes_weights, signed_power


def _data(k, n=120, d=30, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    return (rng.gamma(1.0, 1.0, (n, d)) + 0.9 * np.eye(k, d)[y]).astype(np.float32), y


@pytest.mark.parametrize("k", [2, 5])
def test_it_is_the_discriminant_of_the_scaled_square_roots_divided_by_its_temperature(k):
    X, y = _data(k)
    est = ShrinkageLDA().fit(X, y)
    Z = StandardScaler().fit_transform(signed_power(X, 0.5))
    lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(Z, y)
    scores = lda.decision_function(Z).reshape(len(Z), -1)
    scores = np.hstack([np.zeros_like(scores), scores]) if k == 2 else scores
    np.testing.assert_allclose(est.predict_proba(X), softmax(scores / est.temperature_, axis=1), rtol=1e-5, atol=1e-7)
    assert est.temperature_ > 1  # LDA in 30 dimensions on 80 rows is over-confident: the fitted temperature softens it
    raw = ShrinkageLDA(temperature=False).fit(X, y)
    np.testing.assert_allclose(raw.predict_proba(X), lda.predict_proba(Z), rtol=1e-5, atol=1e-7)
    fast = proba_function(est)
    assert fast != est.predict_proba  # the one-image path reads its pipeline
    np.testing.assert_allclose(fast(X[:1]), est.predict_proba(X[:1]), rtol=1e-6)


def test_the_temperature_is_fitted_on_rows_the_discriminant_did_not_see():
    X, y = _data(3)
    a = ShrinkageLDA(random_state=0).fit(X, y).temperature_
    b = ShrinkageLDA(random_state=1).fit(X, y).temperature_
    assert a != b  # another inner split, another held-out third


def test_it_refuses_sample_weights_by_name():
    with pytest.raises(TypeError, match="ShrinkageLDA.fit takes no sample_weight"):
        check_takes_weights("lda", "caltech:lda")
    check_takes_weights("logistic", "caltech:logistic")


def test_an_ensemble_with_lda_is_never_worse_than_its_best_member_and_loads_to_the_same_predictions(tmp_path):
    import stacker
    from conftest import make_image, save_tiny_weights

    root, rng = tmp_path / "imgs", np.random.default_rng(3)
    base = {"cat": (170, 90, 80), "dog": (90, 110, 170), "owl": (110, 150, 100)}  # overlapping: work for level 2
    for c, colour in base.items():
        (root / c).mkdir(parents=True)
        for i in range(9):
            make_image(root / c / f"{i}.png", (np.array(colour) + rng.normal(0, 35, 3)).tolist(), size=(32, 32), seed=i)
    weights = save_tiny_weights(tmp_path / "tiny.weights.h5")
    ens = stacker.Ensemble([{"backbone": "tiny_cnn", "input_size": 32, "weights": weights, "views": ["flip"]}],
                           models=["prototype", "lda"], cv=3, cache_dir=tmp_path / "cache", verbose=0).fit(str(root))
    lda = ens.learners_["tiny_cnn@32+flip:lda"]
    for est, (tr, va) in zip(lda.fold_models_, ens.folds_):
        assert isinstance(est, ShrinkageLDA) and len(est.classes_) == 3  # fitted on the other folds' rows
    members = [s["log_loss"] for n, s in ens.scores_.items() if n != "ensemble"]
    assert ens.scores_["ensemble"]["log_loss"] <= min(members) + 1e-12
    paths = sorted(str(p) for p in root.rglob("*.png"))
    ens.save(tmp_path / "model")
    np.testing.assert_allclose(stacker.Ensemble.load(tmp_path / "model").predict_proba(paths),
                               ens.predict_proba(paths), rtol=1e-7)
