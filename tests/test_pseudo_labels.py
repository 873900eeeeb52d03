"""Pseudo-labelling: per-fold teachers, honest out-of-fold scores, kept only when it helps."""

import numpy as np
import pytest

pytestmark = pytest.mark.filterwarnings("ignore:.*not using a cached result:UserWarning")  # ExtraTrees' Tree type
from sklearn.ensemble import ExtraTreesClassifier

from conftest import TINY, TINY_FINETUNE, make_image, save_tiny_weights, spy_finetuning
from stacker import pseudo_labels
from stacker.ensemble import Ensemble
from stacker.features.extractor import forward_pass_count


def test_select_gives_each_fold_its_teachers_confident_images_with_their_labels_and_weights():
    # 3 folds, 4 pool images, 2 classes; 4 labelled images of each class
    teacher = np.array([[[0.99, 0.01], [0.02, 0.98], [0.6, 0.4], [0.97, 0.03]],
                        [[0.98, 0.02], [0.96, 0.04], [0.5, 0.5], [0.96, 0.04]],
                        [[0.97, 0.03], [0.01, 0.99], [0.9, 0.1], [0.99, 0.01]]])
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    folds = [(np.setdiff1d(np.arange(8), va), va) for va in (np.array([0, 4]), np.array([1, 5]), np.array([2, 3, 6, 7]))]
    rows, labels, weights, fold_rows = pseudo_labels.select(teacher, y, folds, pseudo_labels.options(None))
    pairs = list(zip(rows.tolist(), labels.tolist()))
    assert pairs == [(0, 0), (1, 0), (1, 1), (3, 0)]  # image 1: labelled 1 by folds 0 and 2, 0 by fold 1; image 2 never
    joined = [sorted(pairs[r] for r in f) for f in fold_rows]
    assert joined == [[(0, 0), (1, 1), (3, 0)], [(0, 0), (1, 0), (3, 0)], [(0, 0), (1, 1), (3, 0)]]
    assert np.allclose(weights, [0.98, 0.96, 0.985, (0.97 + 0.96 + 0.99) / 3])  # mean confidence of its folds
    # max_share: at most that many pseudo-labelled images per labelled image of a class in the fold, surest first
    rows, labels, _, capped = pseudo_labels.select(teacher, y, folds, pseudo_labels.options({"max_share": 0.34}))
    pairs = list(zip(rows.tolist(), labels.tolist()))
    assert [sorted(pairs[r] for r in f) for f in capped] == [[(0, 0), (1, 1)], [(0, 0)], []]  # caps 1, 1, 0 per class


@pytest.mark.parametrize("value", [{"rounds": 0}, {"min_confidence": 1.5}, {"speed": 2}, "yes", {"weight": True}])
def test_options_are_checked_before_any_work(value, tmp_path):
    before = forward_pass_count()
    with pytest.raises(ValueError, match="pseudo_labels must be"):
        Ensemble([TINY], pseudo_labels=value).fit(str(tmp_path), unlabeled=str(tmp_path))
    assert forward_pass_count() == before


def _random_colours(root, n, seed, fmt="png", labels=True):
    """n images of random colours (labels cat/dog at random, no relation to the pixels) under root."""
    rng = np.random.default_rng(seed)
    colours, names = rng.integers(0, 256, (n, 3)), rng.permutation(["cat", "dog"] * (n // 2))
    for i, (c, name) in enumerate(zip(colours, names)):
        folder = root / name if labels else root
        folder.mkdir(parents=True, exist_ok=True)
        make_image(folder / f"{i}.{fmt}", c.tolist(), seed=i)
    return root


@pytest.fixture(scope="module")
def noise_labels(tmp_path_factory):
    """Labels with no relation to the images, and a pool of near copies of the labelled images (JPEG re-encodes)."""
    root = tmp_path_factory.mktemp("pseudo")
    train = _random_colours(root / "train", 24, 0)
    pool = root / "pool"
    pool.mkdir()
    from PIL import Image

    for i, path in enumerate(sorted(train.rglob("*.png"))):
        Image.open(path).save(pool / f"{i}.jpg", quality=98)
    return train, pool, save_tiny_weights(root / "tiny.weights.h5"), root / "cache"


def _ensemble(noise_labels, **params):
    _, _, weights, cache = noise_labels
    memoriser = ExtraTreesClassifier(n_estimators=40, random_state=0)  # gives its training images back, sure of them
    params = {"models": [memoriser], "meta": "best", **params}
    return Ensemble([{**TINY, "weights": weights}], cv=3, cache_dir=str(cache), verbose=0, **params)


@pytest.mark.slow
def test_pseudo_labels_never_carry_a_folds_labels_into_its_own_training(noise_labels, monkeypatch):
    """Near copies of the labelled images as the pool: a teacher that saw all labels would hand every fold its
    own validation labels back (out-of-fold accuracy near 1 on labels that are noise). Each fold's teacher
    never saw that fold, so the score stays near chance and the fit keeps nothing."""
    train, pool, _, _ = noise_labels
    opts = {"min_confidence": 0.6, "max_share": 10, "rounds": 1}
    plain = _ensemble(noise_labels).fit(str(train))
    before = forward_pass_count()
    ens = _ensemble(noise_labels, pseudo_labels=opts).fit(str(train), unlabeled=str(pool))
    assert forward_pass_count() - before == 24  # the pool's features once; the refits run no forward pass
    s = ens.scores_["ensemble"]["pseudo_labels"]
    assert s["used"] == 24 and s["rounds"][0]["images"] == 24 and s["kept_rounds"] == 0
    assert np.array_equal(ens.predict_proba(str(pool)), plain.predict_proba(str(pool)))  # not kept: nothing changed
    assert "not kept: the ensemble ignores the unlabelled images" in ens.leaderboard()

    def accuracy_of_round_1(teacher=None):  # the round's ensemble, kept whatever its score
        with monkeypatch.context() as m:
            m.setattr(pseudo_labels, "_restore", lambda *a: None)
            if teacher:
                m.setattr(pseudo_labels, "fold_teacher", teacher)
            return _ensemble(noise_labels, pseudo_labels=opts).fit(str(train), unlabeled=str(pool)).scores_[
                "ensemble"]["accuracy"]

    def one_teacher(e, inputs):  # the whole ensemble labels the pool for every fold: it saw every fold's labels
        proba = e._level2({n: lr.predict(e._inputs_of(lr, inputs)) for n, lr in e.learners_.items()})
        return np.stack([proba] * len(e.folds_))

    assert accuracy_of_round_1() < 0.85 < 0.9 < accuracy_of_round_1(one_teacher)


@pytest.fixture(scope="module")
def colour_labels(tmp_path_factory):
    """Labels that follow the colour (overlapping classes), few labelled images, a pool of other images."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(7)
    truth = []
    for part, n in (("train", 8), ("pool", 40)):
        for i in range(2 * n):
            label = ("cat", "dog")[i % 2]
            centre = np.array([150, 100, 110]) if label == "cat" else np.array([110, 100, 150])
            folder = root / part / label if part == "train" else root / part
            folder.mkdir(parents=True, exist_ok=True)
            make_image(folder / f"{i}.png", (centre + rng.normal(0, 30, 3)).tolist(), seed=1000 * (part == "pool") + i)
            if part == "pool":
                truth.append(i % 2)
    return root, np.array(truth), save_tiny_weights(root / "tiny.weights.h5")


@pytest.mark.slow
def test_a_round_that_helps_is_kept_saved_and_loaded(colour_labels, monkeypatch, tmp_path):
    """Right labels for 80 more images of the same kind (planted, as a perfect teacher would give them) lower the
    out-of-fold loss of the 16 labelled ones; the round is kept, said, saved and predicted with after loading."""
    root, truth, weights = colour_labels
    pool = sorted((root / "pool").glob("*.png"), key=lambda p: int(p.stem))

    def oracle(e, inputs):  # the pool's true labels, sure of them, in every fold (pool rows are in file order)
        return np.stack([np.eye(2)[truth]] * len(e.folds_))

    monkeypatch.setattr(pseudo_labels, "fold_teacher", oracle)
    ens = Ensemble([{**TINY, "weights": weights}], cv=3, cache_dir=str(root / "cache"), verbose=0,
                   pseudo_labels={"rounds": 2, "max_share": 10}).fit(str(root / "train"), unlabeled=[str(p) for p in pool])
    s = ens.pseudo_labels_
    assert s["kept_rounds"] >= 1 and s["log_loss_after"] < s["log_loss_before"]
    assert ens.scores_["ensemble"]["log_loss"] == pytest.approx(s["log_loss_after"])
    assert len(ens.meta_oof_proba_) == 16  # scores are on labelled rows only
    assert "pseudo-labels: 80 usable of 80 unlabelled images" in ens.leaderboard()
    ens.save(str(tmp_path / "m"))
    loaded = Ensemble.load(str(tmp_path / "m"))
    assert np.allclose(loaded.predict_proba([str(p) for p in pool]), ens.predict_proba([str(p) for p in pool]))
    assert loaded.scores_["ensemble"]["pseudo_labels"]["kept_rounds"] == s["kept_rounds"]


@pytest.mark.slow
def test_fine_tuned_learners_take_pseudo_labelled_rows(colour_labels, monkeypatch):
    """Each fold's teacher (its fine-tuned fold networks, level 2) labels the pool; the labelled rows
    reach every fold's fine-tuning with their confidences as weights."""
    root, _, weights = colour_labels
    seen, ft = spy_finetuning(monkeypatch), TINY_FINETUNE
    pool = sorted((root / "pool").glob("*.png"), key=lambda p: int(p.stem))[:24]
    ens = Ensemble([{**TINY, "weights": weights}], cv=2, cache_dir=str(root / "cache"), verbose=0, meta="logit",
                   finetune=ft, pseudo_labels={"rounds": 1, "min_confidence": 0.5, "max_share": 10}).fit(
        str(root / "train"), unlabeled=[str(p) for p in pool])
    s = ens.pseudo_labels_
    assert s["used"] == 24 and s["rounds"][0]["images"] > 0
    first, second = seen[:2], seen[2:4]  # the labelled fit, then round 1
    assert [n for n, _ in first] == [len(tr) for tr, _ in ens.folds_] and all(w is None for _, w in first)
    for (n, w), (tr, _) in zip(second, ens.folds_):
        assert n > len(tr) and np.all(w[:len(tr)] == 1) and np.all((w[len(tr):] >= 0.5) & (w[len(tr):] <= 1))


def test_pseudo_labels_are_refused_where_weights_cannot_go(noise_labels, tmp_path):
    train, pool, _, _ = noise_labels
    before = forward_pass_count()
    with pytest.raises(ValueError, match="pseudo-labels .* not supported with executor='ray'"):
        _ensemble(noise_labels, executor="ray").fit(str(train), unlabeled=str(pool))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty holds neither image files"):
        _ensemble(noise_labels).fit(str(train), unlabeled=str(tmp_path / "empty"))
    assert forward_pass_count() == before


@pytest.mark.slow
def test_cli_fit_unlabeled(noise_labels, tmp_path, capsys):
    from stacker.app.cli import main

    train, pool, weights, cache = noise_labels
    assert main(["fit", str(train), "--out", str(tmp_path / "m"), "--backbones", "tiny_cnn", "--image-size", "32",
                 "--weights", weights, "--folds", "3", "--cache", str(cache), "--quiet", "--models", "logistic",
                 "--unlabeled", str(pool), "--pseudo-labels", '{"rounds": 1, "min_confidence": 0.6}',
                 "--no-report"]) == 0
    assert Ensemble.load(str(tmp_path / "m")).pseudo_labels == {"rounds": 1, "min_confidence": 0.6}
    assert "pseudo-labels: 24 usable of 24 unlabelled images" in capsys.readouterr().out  # the leaderboard says
    # the training images themselves as the pool: every one a copy, none used, nothing refitted
    assert main(["fit", str(train), "--out", str(tmp_path / "m2"), "--backbones", "tiny_cnn", "--image-size", "32",
                 "--weights", weights, "--folds", "3", "--cache", str(cache), "--quiet", "--models", "logistic",
                 "--unlabeled", str(train), "--no-report"]) == 0
    assert ("pseudo-labels: 0 usable of 24 unlabelled images (24 copies of training images left out)"
            in capsys.readouterr().out)
