"""Level 2 and the model zoo on plain arrays: selection, calibration, no leakage, the combiner registry,
estimator contract."""

import ast
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from stacker.level2 import arrays, registry
from stacker.level2.arrays import score
from stacker.level2.calibration import TemperatureScaler
from stacker.level2.combiners import GreedyEnsemble, LogitStacker, MeanClassifier, SingleBest, TwoLayerStack
from stacker.level2.selection import fit_level2
from stacker.learners.zoo import MODELS, PRESETS, PrototypeClassifier, make_model, model_names


def _nll(P, y):
    return -np.mean(np.log(np.clip(P[np.arange(len(y)), y], 1e-15, None)))


def random_members(seed, n=300, k=3, n_learners=4):
    """Labels and probability blocks of learners of very different quality (some worse than random)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    blocks = []
    for j in range(n_learners):
        signal = rng.uniform(-1.0, 3.0)  # a negative signal makes a confidently wrong learner
        logits = rng.normal(0, 1, (n, k)) + signal * np.eye(k)[y] * rng.uniform(0.5, 2.0)
        P = np.exp(logits - logits.max(1, keepdims=True))
        blocks.append(P / P.sum(1, keepdims=True))
    return y, blocks


@pytest.mark.parametrize("seed", range(25))
def test_greedy_selection_is_never_worse_than_the_best_member_on_its_own_data(seed):
    y, blocks = random_members(seed)
    Z = np.hstack(blocks)
    ens = GreedyEnsemble(len(blocks)).fit(Z, y)
    assert np.all(ens.weights_ >= 0) and ens.weights_.sum() == pytest.approx(1.0)
    assert _nll(ens.predict_proba(Z), y) <= min(_nll(P, y) for P in blocks) + 1e-12


@pytest.mark.parametrize("seed", range(10))
def test_the_stack_out_of_fold_is_never_worse_than_its_best_member(seed):
    from sklearn.model_selection import StratifiedKFold

    y, blocks = random_members(100 + seed, n=240)
    folds = list(StratifiedKFold(4, shuffle=True, random_state=seed).split(y, y))
    lv = fit_level2(np.hstack(blocks), y, folds, "auto", len(blocks), 3, member_oof=blocks)
    best = min(score(y, P, 3)["log_loss"] for P in blocks)
    assert score(y, lv.oof_proba, 3)["log_loss"] <= best + 1e-12
    assert set(lv.table) >= {"greedy", "greedy+T", "logit", "logit+T", "mean", "best", "stack2", "stack2+T"}


def test_calibration_lowers_the_loss_of_over_confident_probabilities():
    rng = np.random.default_rng(0)
    n, k = 4000, 4
    true = rng.dirichlet(np.ones(k) * 0.7, n)
    y = np.array([rng.choice(k, p=p) for p in true])
    sharp = true ** 4 / (true ** 4).sum(1, keepdims=True)  # over-confident
    fit_rows, test_rows = np.arange(n) < n // 2, np.arange(n) >= n // 2
    cal = TemperatureScaler().fit(sharp[fit_rows], y[fit_rows])
    assert cal.temperature_ > 2.0
    assert _nll(cal.transform(sharp[test_rows]), y[test_rows]) < _nll(sharp[test_rows], y[test_rows]) - 0.05
    # the floor caps the cost of a few confidently wrong labels (label noise)
    noisy = y.copy()
    flipped = rng.choice(n, n // 50, replace=False)  # 2% of the labels are wrong, in both halves
    noisy[flipped] = (noisy[flipped] + 1) % k
    good = np.eye(k)[y] * 0.999 + 0.001 / k
    floor = TemperatureScaler().fit(good[:2000], noisy[:2000])
    assert floor.floor_ > 0
    assert _nll(floor.transform(good[2000:]), noisy[2000:]) < _nll(good[2000:], noisy[2000:]) - 0.02


def test_combiners_read_probability_blocks():
    y, blocks = random_members(7, k=2, n_learners=3)
    Z = np.hstack(blocks)
    np.testing.assert_allclose(MeanClassifier(3).fit(Z, y).predict_proba(Z), np.mean(blocks, axis=0))
    best = SingleBest(3).fit(Z, y)
    np.testing.assert_allclose(best.predict_proba(Z), blocks[int(np.argmin([_nll(P, y) for P in blocks]))])
    logit = LogitStacker(3, bias_alpha=0.0).fit(Z, y)
    assert logit.weights_.shape == (3,) and logit.bias_.shape == (2,)
    # with free biases, on two classes it is logistic regression on the learners' logits
    from sklearn.linear_model import LogisticRegression

    logits = np.column_stack([np.log(P[:, 1] / P[:, 0]) for P in blocks])
    ref = LogisticRegression(C=1e6, max_iter=5000).fit(logits, y).predict_proba(logits)
    np.testing.assert_allclose(logit.predict_proba(Z), ref, atol=2e-3)
    with pytest.raises(ValueError, match="probability blocks"):
        MeanClassifier(4).fit(Z, y)
    two = TwoLayerStack(3).fit(Z, y)
    P = two.predict_proba(Z)
    np.testing.assert_allclose(P.sum(1), 1.0)
    assert len(two.inner_) == 2 and two.final_.weights_.shape == (5,)
    assert _nll(P, y) <= min(_nll(B, y) for B in blocks) + 1e-12  # greedy on top, own rows
    lonely = y.copy()
    lonely[0] = 2  # a class with a single row: no inner split is possible, greedy on level 1 alone
    Z3 = np.hstack([np.c_[B, np.full(len(B), 1e-3)] / (1 + 1e-3) for B in blocks])
    assert TwoLayerStack(3).fit(Z3, lonely).inner_ == []


def test_level2_works_a_block_of_rows_at_a_time_with_the_numbers_of_one_block(monkeypatch):
    """Blocks of rows bound level 2's memory at a million rows; they must not move a number."""
    from sklearn.metrics import log_loss

    from stacker.level2.importance import permutation_importance as _permutation_importance

    y, blocks = random_members(3, n=700, k=7)
    Z = np.hstack(blocks).astype(np.float32)
    folds = [(np.where(np.arange(700) % 4 != i)[0], np.where(np.arange(700) % 4 == i)[0]) for i in range(4)]
    cols = {f"m{j}": list(range(7 * j, 7 * j + 7)) for j in range(4)}

    def run():
        level2 = fit_level2(Z, y, folds, "auto", 4, 7)
        proba = level2.predict_proba(Z)
        scaler = TemperatureScaler().fit(level2.oof_proba, y)
        return (level2.name, level2.table, level2.oof_proba, proba, scaler.temperature_, scaler.floor_,
                scaler.transform(proba), score(y, proba, 7), _permutation_importance(level2, Z, y, cols, 7, 0))

    whole = run()
    monkeypatch.setattr(arrays, "ROW_BLOCK", 64)  # eleven blocks
    blocked = run()
    for a, b in zip(whole, blocked):
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b)
        else:
            assert a == b
    proba = whole[3]  # scikit-learn's log loss, to the last bit, for float64 and float32 probabilities
    assert score(y, proba, 7)["log_loss"] == log_loss(y, np.clip(proba, 1e-15, 1) / np.clip(proba, 1e-15, 1).sum(1,
                                                      keepdims=True), labels=np.arange(7))
    p32 = proba.astype(np.float32)
    p32n = np.clip(p32, 1e-15, 1.0)
    assert score(y, p32, 7)["log_loss"] == log_loss(y, p32n / p32n.sum(1, keepdims=True), labels=np.arange(7))


def test_no_level2_model_ever_sees_an_in_fold_prediction(monkeypatch):
    """Spy on every combiner fit: its rows are all rows (the final fit) or exactly one fold's training rows."""
    from sklearn.model_selection import StratifiedKFold

    y, blocks = random_members(3, n=200)
    Z = np.hstack(blocks)
    folds = list(StratifiedKFold(5, shuffle=True, random_state=0).split(y, y))
    row_of = {Z[i].tobytes(): i for i in range(len(Z))}
    seen = []

    def spy(cls):  # on the class: every fit is seen, whichever module made the combiner
        fit = cls.fit

        def fit_spy(self, X, yy):
            seen.append(frozenset(row_of[np.asarray(r, dtype=Z.dtype).tobytes()] for r in X))
            return fit(self, X, yy)
        monkeypatch.setattr(cls, "fit", fit_spy)

    for cls in (GreedyEnsemble, LogitStacker, MeanClassifier, SingleBest):  # the candidates and the fallback
        spy(cls)
    fit_level2(Z, y, folds, ("greedy", "logit", "mean"), len(blocks), 3, member_oof=blocks)
    allowed = {frozenset(tr) for tr, _ in folds} | {frozenset(range(len(y)))}
    assert seen and all(rows in allowed for rows in seen)
    assert sum(rows == frozenset(range(len(y))) for rows in seen) == 1, "one final fit, on out-of-fold rows only"


BUILT_IN = ("greedy", "logit", "mean", "best", "stack2", "dense", "logistic")


def _registry_state():
    return (tuple(registry.COMBINERS), registry.auto_combiners(), registry.probability_combiners(),
            registry.meta_help(), registry.meta_inputs_help(), registry.meta_doc())


def test_the_built_in_combiners_are_registered_in_the_order_auto_tries_them():
    assert tuple(registry.COMBINERS) == BUILT_IN
    assert registry.auto_combiners() == registry.probability_combiners() == BUILT_IN[:5]
    assert registry.combiner_names("auto") == BUILT_IN[:5]
    # importing any level-2 module alone registers them all (the package imports the combiners)
    code = "from stacker.level2.registry import COMBINERS; print(','.join(COMBINERS))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.split() == [",".join(BUILT_IN)]


def test_a_combiner_registered_in_one_place_is_known_everywhere(monkeypatch):
    """One decorator: a name for meta=, a candidate of auto, trusted for loading, in the help, the report, the docs."""
    import argparse

    from sklearn.linear_model import LogisticRegression

    from stacker.app.options import OPTIONS
    from stacker.io import persist

    monkeypatch.setattr(persist, "_TRUSTED", dict(persist._TRUSTED))  # the toy's trust leaves with the test
    before = _registry_state()

    @registry.register_combiner("toy", auto=True, meaning="the toy's weights")
    class Toy(MeanClassifier):
        """The mean under another name."""

    @registry.register_combiner("toy_lr", inputs="any")
    def toy_lr(n_learners, random_state):
        """Logistic regression on any columns."""
        return LogisticRegression(max_iter=500)

    try:
        assert tuple(registry.COMBINERS) == BUILT_IN + ("toy", "toy_lr")
        assert registry.auto_combiners() == BUILT_IN[:5] + ("toy",) == registry.combiner_names("auto")
        assert registry.probability_combiners() == BUILT_IN[:5] + ("toy",)
        assert f"{Toy.__module__}.{Toy.__qualname__}" in persist.trusted_types()
        assert registry.weight_meaning("toy+T") == "the toy's weights"
        assert registry.weight_meaning("toy_lr") == registry.DEFAULT_MEANING
        parser = argparse.ArgumentParser()
        meta, meta_inputs = (OPTIONS[n].add_to(parser) for n in ("meta", "meta_inputs"))
        assert "among greedy, logit, mean, best, stack2, toy), one of those or dense, logistic, toy_lr," in meta.help
        assert "(needs --meta dense, logistic or toy_lr)" in meta_inputs.help
        assert '- ``"toy"`` (auto): The mean under another name.' in registry.meta_doc()
        assert registry.check_meta("toy_lr", "features") == ("toy_lr",)
        with pytest.raises(ValueError, match="meta='toy' combines probabilities; .* use meta='dense', 'logistic', "
                                             "'toy_lr' or a scikit-learn classifier"):
            registry.check_meta("toy", "both")
        with pytest.raises(ValueError, match="already registered"):
            registry.register_combiner("toy")(Toy)

        y, blocks = random_members(5, n=200)
        Z = np.hstack(blocks)
        folds = [(np.where(np.arange(200) % 4 != i)[0], np.where(np.arange(200) % 4 == i)[0]) for i in range(4)]
        toy = fit_level2(Z, y, folds, "toy", len(blocks), 3)
        mean = fit_level2(Z, y, folds, "mean", len(blocks), 3)
        assert isinstance(toy.combiner, Toy) and toy.name == mean.name.replace("mean", "toy")
        np.testing.assert_array_equal(toy.oof_proba, mean.oof_proba)  # the same combiner under a new name
        assert toy.weights.tolist() == [0.25] * 4
        assert {"toy", "toy+T"} <= set(fit_level2(Z, y, folds, "auto", len(blocks), 3).table)
        assert isinstance(fit_level2(Z, y, folds, "toy_lr", len(blocks), 3).combiner, LogisticRegression)
    finally:
        registry.unregister_combiner("toy")
        registry.unregister_combiner("toy_lr")
    assert _registry_state() == before


@pytest.mark.parametrize("name, inputs, problem", [
    ("auto", "proba", "other than 'auto'"), ("a,b", "proba", "without commas"), ("x+T", "proba", "without commas"),
    ("", "proba", "a word"), ("fine", "features", "inputs must be one of")])
def test_a_combiner_name_must_survive_lists_and_labels(name, inputs, problem):
    with pytest.raises(ValueError, match=problem):
        registry.register_combiner(name, inputs=inputs)


def test_level2_modules_import_each_other_without_a_cycle_and_the_registry_knows_no_combiner():
    folder = os.path.join(REPO, "stacker", "level2")
    graph = {}
    for name in os.listdir(folder):
        if name.endswith(".py") and name != "__init__.py":
            tree = ast.parse(open(os.path.join(folder, name)).read())
            graph[name[:-3]] = {n.module.split(".")[2] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                                and (n.module or "").startswith("stacker.level2.")}

    def below(module, path=()):
        assert module not in path, f"import cycle: {' -> '.join(path + (module,))}"
        return set().union({module}, *(below(d, path + (module,)) for d in graph.get(module, ())))

    assert "combiners" not in below("registry") | below("arrays") | below("calibration")
    assert {m: below(m) for m in graph}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registered_model_fits_and_predicts(name):
    rng = np.random.default_rng(0)
    X = np.r_[rng.normal(0, 1, (40, 6)), rng.normal(2, 1, (40, 6))].astype(np.float32)
    y = np.r_[[0] * 40, [1] * 40]
    est = make_model(name, random_state=0)
    if hasattr(est, "epochs"):
        est.set_params(epochs=20)
    proba = est.fit(X, y).predict_proba(X)
    assert proba.shape == (80, 2) and (proba.argmax(1) == y).mean() > 0.9


def test_model_presets_and_bad_names():
    assert model_names("default") == PRESETS["default"] == ("logistic", "prototype")
    assert model_names("logistic, dense") == ("logistic", "dense")
    with pytest.raises(ValueError, match="unknown model 'svm'"):
        model_names(["logistic", "svm"])


def test_prototype_scale_is_fitted_without_its_own_rows():
    rng = np.random.default_rng(1)
    X = np.r_[rng.normal(0, 1, (30, 8)) + 1, rng.normal(0, 1, (30, 8)) - 1]
    y = np.r_[[0] * 30, [1] * 30]
    est = PrototypeClassifier().fit(X, y)
    assert est.scale_ > 0 and est.prototypes_.shape == (2, 8)
    np.testing.assert_allclose(np.linalg.norm(est.prototypes_, axis=1), 1.0)


def _dense_checks():
    from sklearn.utils.estimator_checks import check_estimator

    from stacker.learners.dense import DenseClassifier

    # every check applies (pandas and array-API checks skip themselves when those are not installed), but one:
    # mini-batch training on shuffled rows cannot make a weight of 2 the same model as a row given twice (as for
    # scikit-learn's own SGD estimators); zero weights and weights of 1 are tested in tests/test_weights.py.
    # No validation split (a quarter of the time): the API contract is the same with one (tested elsewhere)
    return check_estimator(DenseClassifier(epochs=1, batch_size=64, patience=1, validation_fraction=0.0), on_fail=None,
                           expected_failed_checks={"check_sample_weight_equivalence_on_dense_data":
                                                   "stochastic mini-batch training"})


@pytest.mark.slow
def test_dense_classifier_passes_scikit_learn_estimator_checks():
    results = _dense_checks()
    failed = [r for r in results if r["status"] == "failed"]
    assert not failed, [(r["check_name"], str(r["exception"])[:200]) for r in failed]


def test_a_keras_fit_leaves_no_traced_train_step_or_dataset_behind():
    # TensorFlow keeps a global gradient entry per traced train step (holding the step and the
    # model), and the outermost graph keeps a PyDataset's generator (and its arrays) unless
    # stacker removes them: fine-tuning grew ~60 MB + its training rows per fold that way
    import weakref

    import keras
    from tensorflow.python.framework import ops

    from stacker.learners.dense import DenseClassifier
    from stacker.learners.keras_fit import keras_fit

    y, blocks = random_members(0, n=120)
    X = np.hstack(blocks).astype(np.float32)
    def custom_gradients():
        return {name for name in ops._gradient_registry._registry if name.startswith("CustomGradient-")}

    before = custom_gradients()
    est = DenseClassifier(epochs=2).fit(X, y)
    assert custom_gradients() == before
    assert est.model_.train_function is None and est.model_.test_function is None
    assert est.predict_proba(X).shape == (120, 3)  # still predicts

    class Rows(keras.utils.PyDataset):
        def __init__(self, X, Y):
            super().__init__()
            self.X, self.Y = X, Y

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return self.X[i * 30:(i + 1) * 30], self.Y[i * 30:(i + 1) * 30]

    rows = X.copy()
    alive = weakref.ref(rows)
    model = keras.Sequential([keras.Input((X.shape[1],)), keras.layers.Dense(3, activation="softmax")])
    model.compile("adam", "categorical_crossentropy")
    keras_fit(model, Rows(rows, np.eye(3, dtype=np.float32)[y]), epochs=1, verbose=0)
    del rows
    import gc

    gc.collect()
    assert alive() is None, "the PyDataset's rows outlive the fit"


def test_the_package_has_no_import_cycle_and_the_ensemble_no_fine_tuning_branch():
    pkg = os.path.join(REPO, "stacker")
    graph = {}
    for name in os.listdir(pkg):
        if not name.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(pkg, name)).read())
        deps = set()
        for node in ast.walk(tree):  # module-level and function-level imports alike
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps |= {node.module} if node.module else {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("stacker."):
                deps.add(node.module.split(".")[1])
        graph[name[:-3]] = {d.split(".")[0] for d in deps} - {name[:-3]}
    graph.pop("__init__", None)
    graph.pop("__main__", None)

    def visit(node, path):
        for dep in graph.get(node, ()):
            assert dep not in path, f"import cycle: {' -> '.join(path + [dep])}"
            visit(dep, path + [dep])

    for module in graph:
        visit(module, [module])
    tree = ast.parse(open(os.path.join(pkg, "ensemble.py")).read())
    tests = [ast.unparse(n.test) for n in ast.walk(tree) if isinstance(n, (ast.If, ast.IfExp, ast.While))]
    tests += [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.comprehension)]
    assert not [t for t in tests if "finetun" in t or "ft" in t.split()], "ensemble.py branches on fine-tuning"
    assert "finetune" not in graph["ensemble"]
