"""The built-in level-2 combiners, each registered where it is defined (:func:`register_combiner`).

All but ``dense`` and ``logistic`` are scikit-learn classifiers on the stacked probability
blocks ``[P_1 | P_2 | ... | P_L]`` (``L`` learners, ``k`` columns each):

- ``greedy``: ensemble selection with replacement on log loss (Caruana et al. 2004, the
  ``WeightedEnsemble`` of AutoGluon): weights are how often each learner was picked.
  On its own training rows it is never worse than the best learner, whom it starts from.
- ``logit``: a weighted geometric mean, ``softmax(sum_l w_l log P_l + b)``, fitted by
  L2-regularised maximum likelihood (biases penalised too): ``L + k`` parameters whatever
  the number of classes (a multinomial logistic regression on 303 Caltech columns has
  30,000 and is miscalibrated); on two classes it is logistic regression on the learners' logits.
- ``mean``: plain averaging, the baseline every stack must beat.
- ``best``: the single learner with the lowest log loss.
- ``stack2``: a second layer (logit and mean cross-fitted inside) with passthrough of the
  learners' probabilities, mixed by greedy selection.
- ``dense`` (a small Keras net) and ``logistic`` (multinomial on all columns) read any
  columns: they serve ``meta_inputs="features"``/``"both"`` and comparisons.

The order of the registrations below is the order in which ``meta="auto"`` tries them.
Every ``fit`` takes ``sample_weight`` (the ensemble's class and sample weights): the losses
it minimises are weighted means (``mean`` has nothing to fit).
Every one of them costs time in proportion to rows x classes x learners: the block combiners
read the stacked input as a row view (:class:`~stacker.level2.arrays.StackedBlocks`, no
copy) a block of rows at a time, and the logit stacker fits on at most
:data:`LOGIT_VALUES` log-probabilities.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize
from scipy.special import softmax
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

from stacker.learners.dense import DenseClassifier
from stacker.level2.arrays import EPS, StackedBlocks, align_proba, pick, row_blocks, spread_rows, take_rows
from stacker.level2.crossfit import cross_fit_true_class, fit_on
from stacker.level2.registry import make_combiner, register_combiner

__all__ = ["LOGIT_VALUES", "GreedyEnsemble", "LogitStacker", "MeanClassifier", "SingleBest", "TwoLayerStack"]

# the logit stacker fits on evenly spread rows past this many log-probabilities (learners x rows x
# classes): 268 MB in float32, all rows of a million images of ten classes, 16,777 of 1,000 classes
LOGIT_VALUES = 1 << 26
LOSS_VALUES = 1 << 22  # its loss and gradient sum over blocks of this many (rows x classes) values


def _blocks(X, n_learners: int, k: int | None = None) -> np.ndarray:
    """``(n, L*k)`` stacked probabilities as ``(L, n, k)``, float64."""
    X = _checked(X, n_learners, k)
    k = X.shape[1] // n_learners
    return np.asarray(X, dtype=np.float64).reshape(len(X), n_learners, k).transpose(1, 0, 2)


def _checked(X, n_learners: int, k: int | None = None):
    """``X`` as an array or row view (its own dtype: no copy) once its columns are known to be probability blocks."""
    X = X if isinstance(X, StackedBlocks) else np.asarray(X)
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
    k = X.shape[1] // n_learners
    return np.stack([pick(X, b * k + y_idx) for b in range(n_learners)]).astype(np.float64)


class _BlockCombiner(ClassifierMixin, BaseEstimator):
    """Shared checks of combiners that read ``n_learners`` probability blocks (arrays or row views)."""

    reads_row_views = True  # fit takes a StackedBlocks view of level 2's rows (stacker.level2.crossfit.fit_on)

    def _prepare(self, X, y):
        """Classes, and ``(X, y_idx)``: ``X`` checked to hold the blocks, in its own dtype (no copy)."""
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        return _checked(X, self.n_learners, len(self.classes_)), y_idx

    def predict(self, X):
        proba = self.predict_proba(X)  # first: it raises NotFittedError before fit
        return self.classes_[np.argmax(proba, axis=1)]


@register_combiner("greedy", auto=True,
                   meaning="each learner's share of the greedy ensemble selection (the shares sum to 1)")
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

    def fit(self, X, y, sample_weight=None):
        X, y_idx = self._prepare(X, y)
        return self._select(_true_class(X, self.n_learners, y_idx), sample_weight)

    def _select(self, true_p, sample_weight=None):
        """The selection itself, on ``(L, n)`` probabilities of the true class (all it needs)."""
        counts = np.zeros(self.n_learners)
        running = np.zeros(true_p.shape[1])
        best_loss, best_counts = np.inf, None
        for step in range(int(self.n_iter)):
            losses = -np.average(np.log(np.clip((running + true_p) / (step + 1), EPS, None)), axis=1,
                                 weights=sample_weight)
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

    def onnx_proba(self, g, z):
        """This combiner in an exported graph (:mod:`stacker.io.export`)."""
        from stacker.io.export import weighted_blocks

        return weighted_blocks(g, z, self.weights_, len(self.classes_))


@register_combiner("logit", auto=True,
                   meaning="the coefficient of each learner's log-probability in softmax(sum w log p + b)")
class LogitStacker(_BlockCombiner):
    """``softmax(sum_l w_l log P_l + b)``: a weighted geometric mean with class biases.

    The biases are penalised too (``bias_alpha``): free biases are ``k`` parameters that
    overfit where classes are many and small (Caltech-101: out-of-fold log loss 0.135
    with free biases, 0.1215 with ``bias_alpha=0.1``) and make L-BFGS take hundreds of
    iterations instead of tens. Each step costs ``O(n k L)``, over at most :data:`LOGIT_VALUES`
    log-probabilities: past them (a thousand classes) it fits on rows spread evenly over the
    input, plenty for ``L + k`` parameters whose ``k`` biases are penalised.

    Parameters
    ----------
    n_learners : int
    alpha : float
        L2 penalty on the weights (per row of data).
    bias_alpha : float
        L2 penalty on the class biases (per row of data).

    Attributes
    ----------
    weights_ : ndarray (n_learners,)
        One weight per learner (their sum acts as an inverse temperature).
    bias_ : ndarray (n_classes,)
    """

    def __init__(self, n_learners=1, alpha=1e-4, bias_alpha=0.1):
        self.n_learners = n_learners
        self.alpha = alpha
        self.bias_alpha = bias_alpha

    def fit(self, X, y, sample_weight=None):
        X, y_idx = self._prepare(X, y)
        L, k = self.n_learners, len(self.classes_)
        rows = spread_rows(len(X), LOGIT_VALUES // (L * k))
        n, y_idx = len(rows), y_idx[rows]
        # weighted: each row's terms times its weight, over the total weight instead of n
        w = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)[rows]
        total_w = n if w is None else float(w.sum())
        # log-probabilities in float32, the precision level 2's inputs have (half the memory of
        # float64: 128 MB saved at 800k rows of four learners and ten classes); sums in float64
        logP = np.empty((L, n, k), dtype=np.float32)
        for b in row_blocks(n, L * k):
            part = take_rows(X, rows[b])
            for j in range(L):
                np.log(np.clip(part[:, j * k:(j + 1) * k], EPS, None), out=logP[j, b], casting="same_kind")
        step = max(1, LOSS_VALUES // k)  # below LOSS_VALUES the sums are one block's, whatever arrays.ROW_BLOCK is
        spans = [(b, np.arange(b.stop - b.start), y_idx[b], None if w is None else w[b])
                 for b in (slice(a, min(a + step, n)) for a in range(0, n, step))]
        buffer, term = np.empty((spans[0][0].stop, k)), np.empty((spans[0][0].stop, k))

        def loss(theta):  # a block of rows at a time, in two (rows, k) float64 arrays
            w, b = theta[:L], theta[L:]
            value, grad_w, grad_b = 0.0, np.zeros(L), np.zeros(k)
            for s, r, t, ws in spans:
                z = np.multiply(logP[0, s], w[0], out=buffer[:len(r)])
                for j in range(1, L):
                    z += np.multiply(logP[j, s], w[j], out=term[:len(r)])
                z += b
                z -= z.max(axis=1, keepdims=True)
                z_true = z[r, t]
                d = np.exp(z, out=z)
                total = d.sum(axis=1)
                value += -np.sum(z_true - np.log(total)) if ws is None else -ws @ (z_true - np.log(total))
                d /= total[:, None]  # softmax; minus the one-hot target, per row: the gradient
                d[r, t] -= 1.0
                if ws is not None:
                    d *= ws[:, None]
                d /= total_w
                grad_w += logP[:, s].reshape(L, -1) @ d.astype(np.float32).ravel()  # one float32 pass
                grad_b += d.sum(axis=0)
            value = value / total_w + 0.5 * self.alpha * w @ w + 0.5 * self.bias_alpha * b @ b
            return value, np.concatenate([grad_w + self.alpha * w, grad_b + self.bias_alpha * b])

        theta0 = np.concatenate([np.full(L, 1.0 / L), np.zeros(k)])
        res = minimize(loss, theta0, jac=True, method="L-BFGS-B", options={"maxiter": 500})
        self.weights_, self.bias_ = res.x[:L], res.x[L:]
        return self

    def predict_proba(self, X):
        check_is_fitted(self, "weights_")
        logP = np.log(np.clip(_blocks(X, self.n_learners, len(self.classes_)), EPS, None))
        return softmax(np.tensordot(self.weights_, logP, axes=1) + self.bias_, axis=1)

    def onnx_proba(self, g, z):
        """This combiner in an exported graph (:mod:`stacker.io.export`)."""
        from stacker.io.export import weighted_blocks

        logp = g.op("Log", g.op("Max", z, g.const(np.float32(EPS))))
        mixed = weighted_blocks(g, logp, self.weights_, len(self.classes_))
        return g.softmax(g.op("Add", mixed, g.const(self.bias_[None])))


@register_combiner("mean", auto=True, meaning="equal weights: the plain average")
class MeanClassifier(_BlockCombiner):
    """Average of the base learners' probabilities (no learning beyond the class list).

    Parameters
    ----------
    n_learners : int
        How many probability blocks of ``n_classes`` columns the input holds.
    """

    def __init__(self, n_learners=1):
        self.n_learners = n_learners

    def fit(self, X, y, sample_weight=None):
        self._prepare(X, y)
        self.weights_ = np.full(self.n_learners, 1.0 / self.n_learners)
        return self

    def predict_proba(self, X):
        check_is_fitted(self, "classes_")
        return _blocks(X, self.n_learners, len(self.classes_)).mean(axis=0)

    def onnx_proba(self, g, z):
        """This combiner in an exported graph (:mod:`stacker.io.export`)."""
        from stacker.io.export import weighted_blocks

        return weighted_blocks(g, z, np.full(self.n_learners, 1.0 / self.n_learners), len(self.classes_))


@register_combiner("best", auto=True, meaning="1 for the single learner kept, 0 for the others")
class SingleBest(_BlockCombiner):
    """The one learner with the lowest log loss on the training rows (or ``index`` when given)."""

    def __init__(self, n_learners=1, index=None):
        self.n_learners = n_learners
        self.index = index

    def fit(self, X, y, sample_weight=None):
        X, y_idx = self._prepare(X, y)
        if self.index is None:
            true_p = np.clip(_true_class(X, self.n_learners, y_idx), EPS, None)
            self.index_ = int(np.argmin(-np.average(np.log(true_p), axis=1, weights=sample_weight)))
        else:
            self.index_ = int(self.index)
        self.weights_ = np.eye(self.n_learners)[self.index_]
        return self

    def predict_proba(self, X):
        check_is_fitted(self, "index_")
        return _blocks(X, self.n_learners, len(self.classes_))[self.index_]

    def onnx_proba(self, g, z):
        """This combiner in an exported graph (:mod:`stacker.io.export`)."""
        k = len(self.classes_)
        return g.columns(z, self.index_ * k, (self.index_ + 1) * k)


@register_combiner("stack2", auto=True,
                   meaning="each learner's direct share of the final greedy mix; the rest goes to the second "
                           "layer's combiners (logit, mean), drawn as one grey bar")
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

    def fit(self, X, y, sample_weight=None):
        from sklearn.model_selection import StratifiedKFold

        X, y_idx = self._prepare(X, y)  # its own dtype (or a row view): the combiners convert what they use
        k = len(self.classes_)
        cv = min(int(self.cv), int(np.bincount(y_idx, minlength=k).min()))
        inner = self.inner if cv >= 2 else ()  # a class with one row: no inner split, greedy on level 1 alone
        splitter = StratifiedKFold(cv, shuffle=True, random_state=self.random_state) if inner else None
        folds = list(splitter.split(np.zeros(len(y_idx)), y_idx)) if inner else []
        # the final selection needs only each block's true-class column, out of fold for the inner combiners
        w = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        oof = [cross_fit_true_class(name, X, y_idx, folds, self.n_learners, k, self.random_state, w) for name in inner]
        self.inner_ = [fit_on(make_combiner(name, self.n_learners, self.random_state), X, y_idx, sample_weight=w)
                       for name in inner]
        true_p = np.concatenate([_true_class(X, self.n_learners, y_idx)] + [o[None] for o in oof])
        self.final_ = GreedyEnsemble(self.n_learners + len(inner))._select(true_p, w)
        self.final_.classes_ = np.arange(k)
        self.weights_ = self.final_.weights_[: self.n_learners]  # the level-1 share of the final mix
        return self

    def predict_proba(self, X):
        check_is_fitted(self, "final_")
        X = np.asarray(X, dtype=np.float64)
        k = len(self.classes_)
        second = [align_proba(m, m.predict_proba(X), k) for m in self.inner_]
        return self.final_.predict_proba(np.hstack([X] + second))

    def onnx_proba(self, g, z):
        """This combiner in an exported graph (:mod:`stacker.io.export`)."""
        from stacker.io.export import aligned, onnx_proba

        k = len(self.classes_)
        second = [aligned(m, g, onnx_proba(m, g, z, f"stack2 inner {type(m).__name__}"), k) for m in self.inner_]
        return self.final_.onnx_proba(g, g.concat([z] + second))


@register_combiner("dense", inputs="any")
def _dense(n_learners, random_state):
    """A small Keras net (hidden layers of 32 and 8, dropout 0.2) on whatever level 2 sees."""
    return DenseClassifier(hidden=(32, 8), dropout=0.2, random_state=random_state)


@register_combiner("logistic", inputs="any")
def _legacy_logistic(n_learners, random_state):
    """Multinomial logistic regression on all standardised columns (the classic stacker, kept for comparisons)."""
    return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
