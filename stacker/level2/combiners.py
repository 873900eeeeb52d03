"""Level 2: combiners of the base learners' out-of-fold probabilities, and calibration.

Every combiner is a scikit-learn classifier on the stacked probability blocks
``[P_1 | P_2 | ... | P_L]`` (``L`` learners, ``k`` columns each):

- ``greedy``: ensemble selection with replacement on log loss (Caruana et al. 2004, the
  ``WeightedEnsemble`` of AutoGluon): weights are how often each learner was picked.
  On its own training rows it is never worse than the best learner, whom it starts from.
- ``logit``: a weighted geometric mean, ``softmax(sum_l w_l log P_l + b)``, fitted by
  L2-regularised maximum likelihood: ``L + k`` parameters whatever the number of
  classes (a multinomial logistic regression on 303 Caltech columns has 30,000 and is
  miscalibrated); on two classes it is logistic regression on the learners' logits.
- ``mean``: plain averaging, the baseline every stack must beat.
- ``best``: the single learner with the lowest log loss.
- ``stack2``: a second layer (logit and mean cross-fitted inside) with passthrough of the
  learners' probabilities, mixed by greedy selection.
- ``dense`` (a small Keras net) and ``logistic`` (multinomial on all columns) are kept
  for ``meta_inputs="features"``/``"both"`` and comparisons.

:func:`fit_level2` cross-validates each candidate over the ensemble's folds, adds a
temperature (:class:`TemperatureScaler`) fitted out of fold, picks the lowest
cross-validated log loss and falls back to the best single learner if no combiner beats
it, so the ensemble's out-of-fold log loss is never worse than its best member's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from scipy.special import log_softmax, softmax
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

from stacker.learners.zoo import DenseClassifier, fresh_estimator
from stacker.io.persist import trusted

__all__ = ["GreedyEnsemble", "LogitStacker", "MeanClassifier", "SingleBest", "TwoLayerStack", "TemperatureScaler",
           "COMBINERS",
           "AUTO_COMBINERS", "make_combiner", "fit_level2", "Level2", "meta_matrix", "score", "META_INPUTS",
           "combiner_names", "learner_weights", "predict_rows", "row_blocks"]

META_INPUTS = ("proba", "features", "both")
_EPS = 1e-8
ROW_BLOCK = 1 << 16  # rows per block where level 2 works row by row: bounded temporaries at a million rows


def row_blocks(n: int):
    """Slices of at most :data:`ROW_BLOCK` rows covering ``range(n)``."""
    return [slice(s, min(s + ROW_BLOCK, n)) for s in range(0, n, ROW_BLOCK)]


def predict_rows(est, Z, k: int, rows=None) -> np.ndarray:
    """``est``'s probabilities ``(len(rows), k)`` in class-index order, a block of rows at a time.

    Every combiner works row by row, so the blocks give the numbers of one call, without
    a call's temporaries for all rows at once (a float64 copy of the stacked inputs is
    320 MB at a million rows of four learners and ten classes).
    """
    rows = np.arange(len(Z)) if rows is None else np.asarray(rows)
    out = np.empty((len(rows), k))
    for block in row_blocks(len(rows)):
        out[block] = _align(est, est.predict_proba(Z[rows[block]]), k)
    return out


def _blocks(X, n_learners: int, k: int | None = None) -> np.ndarray:
    """``(n, L*k)`` stacked probabilities as ``(L, n, k)``, float64."""
    X = _checked(X, n_learners, k)
    k = X.shape[1] // n_learners
    return np.asarray(X, dtype=np.float64).reshape(len(X), n_learners, k).transpose(1, 0, 2)


def _checked(X, n_learners: int, k: int | None = None) -> np.ndarray:
    """``X`` as an array (its own dtype: no copy) once its columns are known to be probability blocks."""
    X = np.asarray(X)
    k = k or X.shape[1] // n_learners
    if X.shape[1] != n_learners * k:
        raise ValueError(f"{X.shape[1]} columns are not {n_learners} probability blocks of {k} classes; "
                         "probability combiners need meta_inputs='proba'")
    return X


def _true_class(X, n_learners: int, y_idx) -> np.ndarray:
    """``(L, n)``: each block's probability of the true class, float64, without a float64 copy of ``X``.

    Selecting before converting gives the same numbers as converting first; at a million
    rows of four learners and ten classes that copy alone is 320 MB.
    """
    X = np.asarray(X)
    k = X.shape[1] // n_learners
    rows = np.arange(len(X))
    return np.stack([X[rows, b * k + y_idx] for b in range(n_learners)]).astype(np.float64)


class _BlockCombiner(ClassifierMixin, BaseEstimator):
    """Shared checks of combiners that read ``n_learners`` probability blocks."""

    def _prepare(self, X, y):
        """Classes, and ``(X, y_idx)``: ``X`` checked to hold the blocks, in its own dtype (no copy)."""
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        return _checked(X, self.n_learners, len(self.classes_)), y_idx

    def predict(self, X):
        proba = self.predict_proba(X)  # first: it raises NotFittedError before fit
        return self.classes_[np.argmax(proba, axis=1)]


@trusted
class MeanClassifier(_BlockCombiner):
    """Average of the base learners' probabilities (no learning beyond the class list).

    Parameters
    ----------
    n_learners : int
        How many probability blocks of ``n_classes`` columns the input holds.
    """

    def __init__(self, n_learners=1):
        self.n_learners = n_learners

    def fit(self, X, y):
        self._prepare(X, y)
        self.weights_ = np.full(self.n_learners, 1.0 / self.n_learners)
        return self

    def predict_proba(self, X):
        check_is_fitted(self, "classes_")
        return _blocks(X, self.n_learners, len(self.classes_)).mean(axis=0)


@trusted
class SingleBest(_BlockCombiner):
    """The one learner with the lowest log loss on the training rows (or ``index`` when given)."""

    def __init__(self, n_learners=1, index=None):
        self.n_learners = n_learners
        self.index = index

    def fit(self, X, y):
        X, y_idx = self._prepare(X, y)
        if self.index is None:
            true_p = np.clip(_true_class(X, self.n_learners, y_idx), _EPS, None)
            self.index_ = int(np.argmin(-np.mean(np.log(true_p), axis=1)))
        else:
            self.index_ = int(self.index)
        self.weights_ = np.eye(self.n_learners)[self.index_]
        return self

    def predict_proba(self, X):
        check_is_fitted(self, "index_")
        return _blocks(X, self.n_learners, len(self.classes_))[self.index_]


@trusted
class GreedyEnsemble(_BlockCombiner):
    """Ensemble selection with replacement (Caruana et al. 2004) on log loss.

    Starts from the best single learner and adds, ``n_iter`` times, the learner whose
    addition to the running average lowers the log loss most; the weights of the best
    iteration are kept. On its training rows it is never worse than the best learner.

    Parameters
    ----------
    n_learners : int
    n_iter : int
        Selection rounds (the weights are multiples of ``1 / rounds``).

    Attributes
    ----------
    weights_ : ndarray (n_learners,)
        Non-negative, summing to 1.
    """

    def __init__(self, n_learners=1, n_iter=50):
        self.n_learners = n_learners
        self.n_iter = n_iter

    def fit(self, X, y):
        X, y_idx = self._prepare(X, y)
        return self._select(_true_class(X, self.n_learners, y_idx))

    def _select(self, true_p):
        """The selection itself, on ``(L, n)`` probabilities of the true class (all it needs)."""
        counts = np.zeros(self.n_learners)
        running = np.zeros(true_p.shape[1])
        best_loss, best_counts = np.inf, None
        for step in range(int(self.n_iter)):
            losses = -np.mean(np.log(np.clip((running + true_p) / (step + 1), _EPS, None)), axis=1)
            pick = int(np.argmin(losses))
            counts[pick] += 1
            running += true_p[pick]
            if losses[pick] < best_loss - 1e-12:
                best_loss, best_counts = losses[pick], counts.copy()
        self.weights_ = best_counts / best_counts.sum()
        return self

    def predict_proba(self, X):
        check_is_fitted(self, "weights_")
        return np.tensordot(self.weights_, _blocks(X, self.n_learners, len(self.classes_)), axes=1)


@trusted
class LogitStacker(_BlockCombiner):
    """``softmax(sum_l w_l log P_l + b)``: a weighted geometric mean with class biases.

    Parameters
    ----------
    n_learners : int
    alpha : float
        L2 penalty on the weights (per row of data).

    Attributes
    ----------
    weights_ : ndarray (n_learners,)
        One weight per learner (their sum acts as an inverse temperature).
    bias_ : ndarray (n_classes,)
    """

    def __init__(self, n_learners=1, alpha=1e-4):
        self.n_learners = n_learners
        self.alpha = alpha

    def fit(self, X, y):
        X, y_idx = self._prepare(X, y)
        L, n, k = self.n_learners, len(X), len(self.classes_)
        # log-probabilities in float32, the precision level 2's inputs have (half the memory of
        # float64: 128 MB saved at 800k rows of four learners and ten classes); sums in float64
        logP = np.empty((L, n, k), dtype=np.float32)
        for b in range(L):
            np.log(np.clip(X[:, b * k:(b + 1) * k], _EPS, None), out=logP[b], casting="same_kind")
        rows = np.arange(n)
        buffer = np.empty((n, k))

        def loss(theta):  # three (n, k) float64 arrays per call: level 2 at a million rows
            w, b = theta[:L], theta[L:]
            z = np.multiply(logP[0], w[0], out=buffer)
            for j in range(1, L):
                z += w[j] * logP[j]
            z += b
            z -= z.max(axis=1, keepdims=True)
            d = np.exp(z)
            total = d.sum(axis=1)
            value = -np.sum(z[rows, y_idx] - np.log(total)) / n + 0.5 * self.alpha * w @ w
            d /= total[:, None]  # softmax; minus the one-hot target, per row: the gradient
            d[rows, y_idx] -= 1.0
            d /= n
            grad_w = np.array([np.vdot(logP[j], d) for j in range(L)]) + self.alpha * w
            return value, np.concatenate([grad_w, d.sum(axis=0)])

        theta0 = np.concatenate([np.full(L, 1.0 / L), np.zeros(k)])
        res = minimize(loss, theta0, jac=True, method="L-BFGS-B", options={"maxiter": 500})
        self.weights_, self.bias_ = res.x[:L], res.x[L:]
        return self

    def predict_proba(self, X):
        check_is_fitted(self, "weights_")
        logP = np.log(np.clip(_blocks(X, self.n_learners, len(self.classes_)), _EPS, None))
        return softmax(np.tensordot(self.weights_, logP, axes=1) + self.bias_, axis=1)


@trusted
class TwoLayerStack(_BlockCombiner):
    """A second stacking layer with passthrough: combiners' out-of-fold outputs next to the learners'.

    The ``inner`` combiners are cross-fitted on an inner stratified split of the training
    rows, so the ``final`` combiner (greedy selection) sees only out-of-fold outputs of them,
    beside the level-1 probabilities themselves, and may pick any mix.

    Parameters
    ----------
    n_learners : int
    inner : tuple of str
        Combiners of the second layer.
    cv : int
        Inner folds for their out-of-fold outputs.
    random_state : int
    """

    def __init__(self, n_learners=1, inner=("logit", "mean"), cv=5, random_state=0):
        self.n_learners = n_learners
        self.inner = inner
        self.cv = cv
        self.random_state = random_state

    def fit(self, X, y):
        from sklearn.model_selection import StratifiedKFold

        X, y_idx = self._prepare(X, y)  # its own dtype: the combiners convert what they use
        k = len(self.classes_)
        cv = min(int(self.cv), int(np.bincount(y_idx, minlength=k).min()))
        inner = self.inner if cv >= 2 else ()  # a class with one row: no inner split, greedy on level 1 alone
        folds = list(StratifiedKFold(cv, shuffle=True, random_state=self.random_state).split(X, y_idx)) if inner else []
        oof = [_cross_fit(name, X, y_idx, folds, self.n_learners, k, self.random_state) for name in inner]
        self.inner_ = [make_combiner(name, self.n_learners, self.random_state).fit(X, y_idx) for name in inner]
        rows = np.arange(len(y_idx))  # the final selection needs only each block's true-class column
        true_p = np.concatenate([_true_class(X, self.n_learners, y_idx)] + [o[rows, y_idx][None] for o in oof])
        self.final_ = GreedyEnsemble(self.n_learners + len(inner))._select(true_p)
        self.final_.classes_ = np.arange(k)
        self.weights_ = self.final_.weights_[: self.n_learners]  # the level-1 share of the final mix
        return self

    def predict_proba(self, X):
        check_is_fitted(self, "final_")
        X = np.asarray(X, dtype=np.float64)
        k = len(self.classes_)
        second = [_align(m, m.predict_proba(X), k) for m in self.inner_]
        return self.final_.predict_proba(np.hstack([X] + second))


@trusted
class TemperatureScaler(BaseEstimator):
    """A temperature and a floor on probabilities, fitted by minimising log loss.

    ``p' = (1 - floor) * softmax(log p / T) + floor / k``. ``T > 1`` softens
    over-confident probabilities, ``T < 1`` sharpens under-confident ones. The floor
    accounts for label noise: in a data set of photos a few images are mislabelled or
    ambiguous, and one confidently wrong probability of 1e-6 costs as much log loss as
    hundreds of good predictions; the floor caps that cost at what the data supports.

    Parameters
    ----------
    floor : bool
        Also fit the floor (at most 5% of the probability mass); ``False`` fits ``T`` only.

    Attributes
    ----------
    temperature_ : float
    floor_ : float
    """

    def __init__(self, floor=True):
        self.floor = floor

    def fit(self, proba, y):
        logP = np.clip(np.asarray(proba, dtype=np.float64), _EPS, None)
        np.log(logP, out=logP)
        y = np.asarray(y)
        k = logP.shape[1]
        blocks = [(b, np.arange(b.stop - b.start), y[b]) for b in row_blocks(len(y))]
        p = np.empty(len(y))

        def nll(theta):  # the softmax a block of rows at a time (row by row: the same numbers)
            eps = theta[1] if self.floor else 0.0
            for b, rows, y_b in blocks:
                p[b] = softmax(logP[b] / np.exp(theta[0]), axis=1)[rows, y_b]
            return -np.mean(np.log(np.clip((1 - eps) * p + eps / k, _EPS, None)))

        best = min((minimize(nll, [t0, e0], method="L-BFGS-B", bounds=[(-4.0, 4.0), (0.0, 0.05)])
                    for t0 in (0.0,) for e0 in ((1e-3, 1e-2) if self.floor else (0.0,))), key=lambda r: r.fun)
        self.temperature_ = float(np.exp(best.x[0]))
        self.floor_ = float(best.x[1]) if self.floor else 0.0
        return self

    def transform(self, proba):
        check_is_fitted(self, "temperature_")
        return calibrate(proba, self.temperature_, self.floor_)


def calibrate(proba, temperature: float = 1.0, floor: float = 0.0) -> np.ndarray:
    """Probabilities at a temperature, mixed with ``floor`` of uniform mass (defaults: unchanged)."""
    proba = np.asarray(proba, dtype=np.float64)
    if temperature == 1.0 and not floor:
        return proba
    out = np.empty(proba.shape)
    for b in row_blocks(len(proba)):
        part = softmax(np.log(np.clip(proba[b], _EPS, None)) / temperature, axis=1) if temperature != 1.0 else proba[b]
        out[b] = (1 - floor) * part + floor / proba.shape[1] if floor else part
    return out


def _legacy_logistic(n_learners, random_state):
    return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))


# name -> factory(n_learners, random_state); "probability" combiners need meta_inputs="proba"
COMBINERS = {
    "greedy": lambda n_learners, random_state: GreedyEnsemble(n_learners),
    "logit": lambda n_learners, random_state: LogitStacker(n_learners),
    "mean": lambda n_learners, random_state: MeanClassifier(n_learners),
    "best": lambda n_learners, random_state: SingleBest(n_learners),
    "stack2": lambda n_learners, random_state: TwoLayerStack(n_learners, random_state=random_state),
    "dense": lambda n_learners, random_state: DenseClassifier(hidden=(32, 8), dropout=0.2, random_state=random_state),
    "logistic": _legacy_logistic,
}
PROBABILITY_COMBINERS = ("greedy", "logit", "mean", "best", "stack2")
AUTO_COMBINERS = ("greedy", "logit", "mean", "best", "stack2")  # meta="auto": the one with the best cross-validated log loss


def combiner_names(meta) -> tuple:
    """The candidates that ``meta`` stands for: ``"auto"``, a name, a list of names, or an estimator."""
    if isinstance(meta, str):
        items = AUTO_COMBINERS if meta == "auto" else tuple(s.strip() for s in meta.split(",") if s.strip())
    elif isinstance(meta, (list, tuple)):
        items = tuple(meta)
    else:
        fresh_estimator(meta, 0, "a meta-learner")  # checks fit/predict_proba
        return (meta,)
    if not items:
        raise ValueError("meta must name at least one combiner")
    unknown = [m for m in items if isinstance(m, str) and m not in COMBINERS]
    if unknown:
        raise ValueError(f"unknown meta-learner {unknown[0]!r}; use 'auto', one of {sorted(COMBINERS)}, "
                         "a list of them, or a scikit-learn classifier")
    return items


def make_combiner(item, n_learners: int, random_state: int = 0):
    """A fresh combiner from a name or a scikit-learn classifier."""
    if isinstance(item, str):
        return COMBINERS[item](n_learners, random_state)
    return fresh_estimator(item, random_state, "a meta-learner")


def combiner_label(item) -> str:
    return item if isinstance(item, str) else type(item).__name__


def learner_weights(combiner) -> np.ndarray | None:
    """Per-learner weights of a fitted combiner (``None`` for those without any, e.g. a dense net)."""
    w = getattr(combiner, "weights_", None)
    return None if w is None else np.asarray(w, dtype=np.float64)


def _align(est, proba, k: int) -> np.ndarray:
    """An estimator's probability columns in class-index order (missing classes get 0)."""
    proba = np.asarray(proba, dtype=np.float64)
    classes = np.asarray(getattr(est, "classes_", np.arange(proba.shape[1])))
    if proba.shape[1] == k and np.array_equal(classes, np.arange(k)):
        return proba
    out = np.zeros((len(proba), k))
    out[:, classes.astype(int)] = proba
    return out


@dataclass
class Level2:
    """A fitted level 2: the chosen combiner, its calibration, and how every candidate scored.

    ``predict_proba(Z)`` applies the combiner to stacked base probabilities, then the
    temperature and floor. ``table`` maps each candidate (``"greedy"``, ``"greedy+T"``
    with calibration...) to its cross-validated log loss and accuracy on the ensemble's folds.
    """

    name: str
    combiner: object
    n_classes: int
    oof_proba: np.ndarray
    temperature: float = 1.0
    floor: float = 0.0
    table: dict = field(default_factory=dict)

    def predict_proba(self, Z) -> np.ndarray:
        out = np.empty((len(Z), self.n_classes))
        for block in row_blocks(len(Z)):
            proba = _align(self.combiner, self.combiner.predict_proba(Z[block]), self.n_classes)
            out[block] = calibrate(proba, self.temperature, self.floor)
        return out

    @property
    def weights(self) -> np.ndarray | None:
        return learner_weights(self.combiner)


def _cross_fit(item, Z, y, folds, n_learners, k, seed, on_fold=None) -> np.ndarray:
    """Out-of-fold probabilities of a combiner over the ensemble's folds (fit on the others)."""
    oof = np.zeros((len(y), k))
    for i, (tr, va) in enumerate(folds):
        if on_fold is not None:
            on_fold(i, tr, va)
        m = make_combiner(item, n_learners, seed + i).fit(Z[tr], y[tr])
        oof[va] = predict_rows(m, Z, k, va)
    return oof


def _cross_calibrate(oof, y, folds) -> np.ndarray:
    """Calibrated out-of-fold probabilities: each fold's calibration fitted on the other folds."""
    out = np.zeros_like(oof)
    for tr, va in folds:
        out[va] = TemperatureScaler().fit(oof[tr], y[tr]).transform(oof[va])
    return out


def score(y, proba, k) -> dict:
    """Accuracy and log loss (and top-5 accuracy past 5 classes) of probabilities ``(n, k)``.

    Rows are clipped to [1e-15, 1] and renormalised; the log loss is scikit-learn's
    (``log_loss`` clips to the dtype's eps), computed a block of rows at a time.
    """
    y = np.asarray(y)
    proba = np.asarray(proba)
    if proba.ndim != 2 or proba.shape[1] != k or len(proba) != len(y):
        raise ValueError(f"probabilities of shape {proba.shape} for {len(y)} labels of {k} classes")
    hit, log_p = np.empty(len(y), dtype=bool), np.empty(len(y), dtype=np.result_type(proba.dtype, np.float32))
    top5 = np.empty(len(y), dtype=bool) if k > 5 else None
    for b in row_blocks(len(y)):
        p = np.clip(proba[b], 1e-15, 1.0)
        p = p / p.sum(axis=1, keepdims=True)
        eps = np.finfo(p.dtype).eps
        hit[b] = p.argmax(1) == y[b]
        log_p[b] = np.log(np.clip(p[np.arange(len(p)), y[b]], eps, 1 - eps))
        if top5 is not None:
            top5[b] = (np.argsort(-p, axis=1)[:, :5] == y[b][:, None]).any(axis=1)
    out = {"accuracy": float(hit.mean()), "log_loss": float(np.mean(-log_p))}
    if top5 is not None:
        out["top5_accuracy"] = float(top5.mean())
    return out


def fit_level2(Z, y, folds, meta="auto", n_learners=1, k=2, random_state=0, calibration=True,
               member_oof=None, on_fold=None) -> Level2:
    """Cross-validate every candidate combiner on the folds, pick the best, refit it on all rows.

    Parameters
    ----------
    Z : ndarray (n, columns)
        The level-2 inputs: out-of-fold outputs of the base learners only.
    y : ndarray (n,)
        Class indices.
    folds : list of (train_rows, val_rows)
        The ensemble's folds: every candidate's score is out of fold on them.
    meta : "auto", name, list of names or estimator
    n_learners, k : int
        Probability blocks in ``Z`` and classes per block.
    calibration : bool
        Also try each candidate followed by a calibration (temperature and floor,
        :class:`TemperatureScaler`) fitted out of fold.
    member_oof : list of ndarray, optional
        Each learner's own out-of-fold probabilities: if no candidate beats the best of
        them, the best learner alone is the ensemble.
    on_fold : callable, optional
        Called as ``on_fold(i, train_rows, val_rows)`` before each fold's fit (for tests).
    """
    y = np.asarray(y)
    candidates = combiner_names(meta)
    # only the best candidate's uncalibrated out-of-fold array is kept (80 MB at a million rows
    # of ten classes); its calibrated one is computed again at the end, to the same numbers
    table, best = {}, None
    for item in candidates:
        label = combiner_label(item)
        raw = _cross_fit(item, Z, y, folds, n_learners, k, random_state, on_fold)
        table[label] = score(y, raw, k)
        if best is None or table[label]["log_loss"] < table[best[0]]["log_loss"]:
            best = (label, item, False, raw)
        if calibration:
            name = label + "+T"
            table[name] = score(y, _cross_calibrate(raw, y, folds), k)
            if table[name]["log_loss"] < table[best[0]]["log_loss"]:
                best = (name, item, True, raw)
        del raw
    label, item, calibrated, best_raw = best
    oof = best_raw
    if member_oof is not None:
        member_ll = [score(y, p, k)["log_loss"] for p in member_oof]
        best = int(np.argmin(member_ll))
        if member_ll[best] < table[label]["log_loss"] and n_learners == len(member_oof):
            label, oof, calibrated = f"best member ({best})", np.asarray(member_oof[best], dtype=np.float64), False
            item = SingleBest(n_learners, index=best)
            table[label] = score(y, oof, k)
    combiner = make_combiner(item, n_learners, random_state).fit(Z, y)
    level2 = Level2(label, combiner, k, oof, table=table)
    if calibrated:  # fitted on the combiner's out-of-fold outputs, as its scores were
        cal = TemperatureScaler().fit(best_raw, y)
        level2.temperature, level2.floor = cal.temperature_, cal.floor_
        level2.oof_proba = _cross_calibrate(best_raw, y, folds)
    return level2


def meta_matrix(probas: list, features: list, meta_inputs: str) -> np.ndarray:
    """Concatenate base-learner probabilities and/or features into the level-2 input."""
    if meta_inputs not in META_INPUTS:
        raise ValueError(f"meta_inputs must be one of {META_INPUTS}, got {meta_inputs!r}")
    blocks = []
    if meta_inputs in ("proba", "both"):
        blocks += [np.asarray(p, dtype=np.float32) for p in probas]
    if meta_inputs in ("features", "both"):
        blocks += [np.asarray(f, dtype=np.float32) for f in features]
    return np.concatenate(blocks, axis=1)
