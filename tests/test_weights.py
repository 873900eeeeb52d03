"""Class and sample weights: checked at the boundary, passed to every learner and level 2, in the scores and keys."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer

from conftest import TINY, make_image, save_tiny_weights
from stacker.app.cli import build_parser
from stacker.app.options import ensemble_params
from stacker.data import sources as im
from stacker.ensemble import Ensemble
from stacker.learners.dense import DenseClassifier
from stacker.learners.zoo import PathLogistic, PrototypeClassifier, fit_weighted
from stacker.level2.arrays import score
from stacker.level2.calibration import TemperatureScaler
from stacker.level2.combiners import GreedyEnsemble, LogitStacker, SingleBest, TwoLayerStack
from stacker.validation import training_weights


class _Data:
    """What training_weights reads of an ImageSet: paths, classes, class index per image."""

    def __init__(self, y, classes=("cat", "dog")):
        self.y, self.classes = np.asarray(y), list(classes)
        self.paths = [f"img/{i}.png" for i in range(len(y))]

    def __len__(self):
        return len(self.y)


def test_training_weights_are_class_times_sample_weights_checked_at_the_boundary():
    data = _Data([0] * 8 + [1] * 2)
    w = training_weights(data, "balanced")
    assert np.allclose(w[:8].sum(), w[8:].sum()) and np.isclose(w.mean(), 1.0)
    assert training_weights(data) is None
    w = training_weights(data, {"dog": 3.0}, {p: 2.0 for p in data.paths} | {"img/0.png": 0.0})
    assert w[0] == 0 and np.allclose(w[8:] / w[1], 3.0)
    assert np.array_equal(training_weights(data, None, np.arange(10.0)), training_weights(
        data, None, {p: float(i) for i, p in enumerate(data.paths)}))
    for kwargs, match in [({"sample_weight": np.ones(9)}, "one weight per training image"),
                          ({"sample_weight": -np.ones(10)}, "non-negative"),
                          ({"sample_weight": np.r_[np.ones(9), np.nan]}, "finite"),
                          ({"sample_weight": np.zeros(10)}, "0 everywhere"),
                          ({"sample_weight": {"img/0.png": 1.0}}, "9 training images have none"),
                          ({"sample_weight": {**{p: 1 for p in data.paths}, "x.png": 1}}, "not training images"),
                          ({"class_weight": {"owl": 2.0}}, "'owl'.*not classes"),
                          ({"class_weight": "balanced", "sample_weight": np.r_[np.ones(8), 0, 0]}, "'dog' has none"),
                          ({"class_weight": {"cat": 0, "dog": 0}}, "0 everywhere")]:
        with pytest.raises(ValueError, match=match):
            training_weights(data, **kwargs)


def _blobs(n=60, seed=0):
    rng = np.random.default_rng(seed)
    y = np.r_[np.zeros(n - n // 6, int), np.ones(n // 6, int)]
    X = rng.normal(size=(n, 5)) + 0.7 * y[:, None]
    return X.astype(np.float32), y


def _two_learners(n=60):
    """Probability blocks of two learners: A sure and right on the first half, wrong on the rest; B lukewarm."""
    y = np.arange(n) % 2
    right = np.arange(n) < n // 2
    p_a, p_b = np.where(right, 0.95, 0.2), np.full(n, 0.6)
    blocks = [np.where(y[:, None] == np.arange(2), p[:, None], 1 - p[:, None]) for p in (p_a, p_b)]
    return np.hstack(blocks).astype(np.float32), y


@pytest.mark.parametrize("make", [PrototypeClassifier,
                                  lambda: make_pipeline(FunctionTransformer(np.tanh), LogisticRegression()),
                                  lambda: SingleBest(2), lambda: LogitStacker(2), lambda: GreedyEnsemble(2)],
                         ids=["prototype", "pipeline", "best", "logit", "greedy"])
def test_a_weight_of_zero_is_the_row_left_out(make):
    combiner = not isinstance(make(), PrototypeClassifier) and "Pipeline" not in type(make()).__name__
    X, y = _two_learners() if combiner else _blobs()
    w = np.ones(len(y))
    if combiner:
        w[30:55] = 0  # most rows where learner A is wrong: A becomes the better one
    else:
        w[::4] = 0
    weighted = fit_weighted(make(), X, y, w).predict_proba(X)
    left_out = make().fit(X[w > 0], y[w > 0]).predict_proba(X)
    assert np.allclose(weighted, left_out, atol=1e-4)
    assert not np.allclose(make().fit(X, y).predict_proba(X), left_out, atol=1e-3)


def test_level2_chooses_fits_and_scores_with_the_weights():
    from sklearn.model_selection import StratifiedKFold

    from stacker.level2.selection import fit_level2

    Z, y = _two_learners()
    w = np.ones(len(y))
    w[30:55] = 0  # learner A is the better one on the rows that count
    folds = list(StratifiedKFold(3, shuffle=True, random_state=0).split(Z, y))
    plain = fit_level2(Z, y, folds, "best", 2, 2)
    weighted = fit_level2(Z, y, folds, "best", 2, 2, sample_weight=w)
    assert plain.combiner.index_ == 1 and weighted.combiner.index_ == 0
    assert weighted.table["best"]["log_loss"] == pytest.approx(score(y, Z[:, :2], 2, w)["log_loss"])
    assert weighted.table["best+T"] != plain.table["best+T"]


def test_weights_move_models_with_class_priors_and_the_calibration_towards_the_up_weighted_class():
    X, y = _blobs(90)
    w = np.where(y == 1, 5.0, 1.0)  # (prototypes have no class prior: class weights only change their scale)
    for make in (PathLogistic, lambda: TwoLayerStack(1)):
        Z = X if not isinstance(make(), TwoLayerStack) else PathLogistic().fit(X, y).predict_proba(X)
        plain, weighted = make().fit(Z, y).predict_proba(Z), fit_weighted(make(), Z, y, w).predict_proba(Z)
        assert weighted[:, 1].mean() > plain[:, 1].mean() + 0.01, make
    P = PathLogistic().fit(X, y).predict_proba(X)
    assert TemperatureScaler().fit(P, y, w).temperature_ != TemperatureScaler().fit(P, y).temperature_
    assert score(y, P, 2, w)["accuracy"] == pytest.approx(balanced_accuracy_score(y, P.argmax(1)))


@pytest.mark.slow
def test_dense_head_takes_sample_weights():
    X, y = _blobs(120)
    w = np.where(y == 1, 5.0, 1.0)
    plain = DenseClassifier(epochs=20).fit(X, y).predict_proba(X)
    weighted = DenseClassifier(epochs=20).fit(X, y, sample_weight=w).predict_proba(X)
    assert weighted[:, 1].mean() > plain[:, 1].mean() + 0.05


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory):
    """24 cats, 6 dogs of nearly the same colour (the classes overlap), the tiny backbone's weights."""
    root = tmp_path_factory.mktemp("weights")
    for c, n, color in (("cat", 24, (170, 90, 80)), ("dog", 6, (150, 100, 95))):
        (root / "train" / c).mkdir(parents=True)
        for i in range(n):
            make_image(root / "train" / c / f"{i}.png", color, seed=i + 100 * (c == "dog"))
    return im.load_images(root / "train"), save_tiny_weights(root / "tiny.weights.h5"), root


def _ensemble(imbalanced, **kw):
    data, weights, root = imbalanced
    return Ensemble(backbones=[{**TINY, "weights": weights}], cv=3, cache_dir=str(root / "cache"), verbose=0, **kw)


def test_balanced_weights_reach_the_learners_level2_scores_and_keys(imbalanced):
    data = imbalanced[0]
    plain = _ensemble(imbalanced).fit(data)
    ens = _ensemble(imbalanced, class_weight="balanced").fit(data)
    dog = ens.classes_.index("dog")
    w = ens.sample_weight_
    assert np.isclose(w[ens.y_ == dog].sum(), w[ens.y_ != dog].sum())
    for name in ens.learners_:  # every learner: other fold models, other results, another cache entry
        assert ens.learners_[name].key_ != plain.learners_[name].key_
        assert not np.allclose(ens.oof_proba_[name], plain.oof_proba_[name])
    logistic = "tiny_cnn@32:logistic"
    assert ens.oof_proba_[logistic][:, dog].mean() > plain.oof_proba_[logistic][:, dog].mean()
    # level 2 and every score weighted the same way: accuracy is the balanced accuracy
    assert ens.level2_scores_ != plain.level2_scores_
    assert ens.scores_["ensemble"]["accuracy"] == pytest.approx(
        balanced_accuracy_score(ens.y_, ens.meta_oof_proba_.argmax(1)))
    assert ens.scores_[logistic]["log_loss"] == pytest.approx(score(ens.y_, ens.oof_proba_[logistic], 2, w)["log_loss"])
    assert "scores weighted (class_weight=balanced)" in ens.leaderboard()
    assert "weighted" not in plain.leaderboard() and plain.sample_weight_ is None
    # a sample weight of 0 on every dog but three: other weights, other keys
    sw = {p: 0.0 if ("dog" in p and not p.endswith(("/0.png", "/1.png", "/2.png"))) else 1.0 for p in data.paths}
    zeroed = _ensemble(imbalanced).fit(data, sample_weight=sw)
    assert zeroed.learners_[logistic].key_ not in (ens.learners_[logistic].key_, plain.learners_[logistic].key_)
    assert zeroed.scores_["ensemble"]["weighted"] == "sample_weight"


@pytest.mark.parametrize("params, sample_weight, match", [
    ({"class_weight": "balanced", "out_of_core": True}, None, "not supported out of core"),
    ({"models": [KNeighborsClassifier()]}, "ones", "takes no sample_weight"),
    ({"class_weight": "balanced", "meta": KNeighborsClassifier()}, None, "meta: KNeighborsClassifier.fit takes no"),
    ({"class_weight": {"owl": 1.0}}, None, "'owl'.*not classes"),
    ({}, "short", "one weight per training image"),
    ({"class_weight": "yes"}, None, "class_weight"),
])
def test_weights_are_refused_before_any_forward_pass(imbalanced, params, sample_weight, match):
    from stacker.features.extractor import forward_pass_count

    data = imbalanced[0]
    sw = {"ones": np.ones(len(data)), "short": np.ones(3), None: None}[sample_weight]
    before = forward_pass_count()
    with pytest.raises((ValueError, TypeError), match=match):
        _ensemble(imbalanced, **params).fit(data, sample_weight=sw)
    assert forward_pass_count() == before


def test_cli_class_weight_balanced(imbalanced, tmp_path, capsys):
    from stacker.app.cli import main

    assert ensemble_params(build_parser().parse_args(["fit", "data/train", "--out", "m"]))["class_weight"] is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["fit", "data/train", "--class-weight", "heavy"])
    _, weights, root = imbalanced
    out = tmp_path / "model"
    assert main(["fit", str(root / "train"), "--out", str(out), "--backbones", "tiny_cnn", "--image-size", "32",
                 "--weights", weights, "--folds", "3", "--cache", str(root / "cache"), "--quiet",
                 "--models", "logistic", "--class-weight", "balanced"]) == 0
    assert "scores weighted (class_weight=balanced)" in capsys.readouterr().out  # the leaderboard
    assert Ensemble.load(str(out)).class_weight == "balanced"
