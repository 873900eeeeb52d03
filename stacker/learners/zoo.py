"""The model zoo: classifiers that turn one feature source's rows into probabilities.

Each entry of :data:`MODELS` is a name and a factory; a base learner is a feature
source times one of these models, bagged over the ensemble's folds. A new model family
is a new row here, nothing else. :data:`PRESETS` names sets of models, so
``Ensemble(models="default")`` and ``Ensemble(models=("logistic", "dense"))`` both work.

- ``logistic``: standardised L2 logistic regression whose ``C`` is picked on an inner
  stratified split along a warm-started path, with a temperature (:class:`PathLogistic`).
- ``prototype``: cosine similarity to class prototypes (mean L2-normalised features) with
  a fitted temperature; milliseconds to fit, and different errors from the logistic.
- ``lda``: shrinkage linear discriminant analysis with a temperature (:class:`ShrinkageLDA`):
  closed form, and different errors again.
- ``dense``: the Keras guides' head (dropout + softmax) trained with early stopping.
- ``resnet``: the ResNet50 tutorial's head (BN, dropout, dense 512).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin, clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from stacker.io.persist import trusted
from stacker.learners import dense as _dense
from stacker.learners.dense import DenseClassifier

__all__ = ["PathLogistic", "ShrinkageLDA", "PipelineModel", "PrototypeClassifier", "SignedPower", "signed_power", "MODELS", "PRESETS", "ModelSpec", "make_model", "model_names", "register_model",
           "fresh_estimator", "code_fingerprint", "unit_rows", "fit_weighted", "check_takes_weights", "WEIGHTS"]


@trusted
class PrototypeClassifier(ClassifierMixin, BaseEstimator):
    """Cosine similarity to class prototypes, as a softmax with a fitted temperature.

    Rows are L2-normalised; each class's prototype is the normalised mean of its rows;
    ``proba = softmax(scale * cos(x, prototype))``. ``scale`` minimises the log loss of
    leave-one-out similarities (each row's own contribution removed from its class
    prototype), so it is not fitted to rows that shaped the prototypes.

    Parameters
    ----------
    center : bool
        Subtract the training mean before normalising (cosine around the data's centre).

    Attributes
    ----------
    classes_ : ndarray
    prototypes_ : ndarray (n_classes, n_features)
    mean_ : ndarray (n_features,)
    scale_ : float
    """

    def __init__(self, center=True):
        self.center = center

    def _normalise(self, X):
        X = X - self.mean_ if self.center else X
        return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)

    def fit(self, X, y, sample_weight=None):
        """``sample_weight``: each row's weight in its class's prototype, the mean and the scale's log loss."""
        X, y = validate_data(self, X, y, dtype=np.float64)
        check_classification_targets(y)
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        k = len(self.classes_)
        w = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        self.mean_ = X.mean(axis=0) if w is None else np.average(X, axis=0, weights=w)
        U = self._normalise(X)
        WU = U if w is None else U * w[:, None]
        sums = np.zeros((k, U.shape[1]))
        np.add.at(sums, y_idx, WU)
        counts = np.bincount(y_idx, minlength=k)[:, None].astype(float)
        if w is not None:  # a class's rows of weight 0 do not count
            counts = np.bincount(y_idx[w > 0], minlength=k)[:, None].astype(float)
        self.prototypes_ = unit_rows(sums / np.maximum(counts, 1))
        # leave-one-out prototypes of each row's own class
        own = unit_rows(sums[y_idx] - WU)
        S = U @ self.prototypes_.T
        S[np.arange(len(U)), y_idx] = np.where(counts[y_idx, 0] > 1, np.sum(U * own, axis=1), 0.0)
        rows = np.arange(len(U))
        nll = lambda log_s: -np.average(log_softmax(np.exp(log_s) * S, axis=1)[rows, y_idx], weights=w)  # noqa: E731
        self.scale_ = float(np.exp(minimize_scalar(nll, bounds=(-3.0, 8.0), method="bounded").x))
        return self

    def predict_proba(self, X):
        check_is_fitted(self, "prototypes_")
        return self._proba(validate_data(self, X, dtype=np.float64, reset=False))

    def _proba(self, X):
        z = self.scale_ * (self._normalise(np.asarray(X, np.float64)) @ self.prototypes_.T)
        e = np.exp(z - z.max(axis=1, keepdims=True))  # numpy's softmax: scipy's costs 60 us a call on one row
        return e / e.sum(axis=1, keepdims=True)

    def predict(self, X):
        proba = self.predict_proba(X)  # first: it raises NotFittedError before fit
        return self.classes_[np.argmax(proba, axis=1)]

    def onnx_proba(self, g, x):
        """This model in an exported graph (:mod:`stacker.io.export`): softmax(scale * unit(x - mean) @ P.T)."""
        if self.center:
            x = g.op("Sub", x, g.const(self.mean_[None]))
        norm = g.op("Max", g.op("ReduceL2", x, axes=[1], keepdims=1), g.const(np.float32(1e-12)))
        return g.softmax(g.op("MatMul", g.op("Div", x, norm), g.const(self.scale_ * self.prototypes_.T)))


def unit_rows(M):
    """Rows scaled to unit L2 norm (prototypes and the rows compared with them)."""
    return M / np.maximum(np.linalg.norm(M, axis=-1, keepdims=True), 1e-12)


trusted(StratifiedKFold)  # the logistic learner's inner folds, saved in its fitted pipeline


def signed_power(X, power: float):
    """``sign(x) * |x| ** power`` in ``X``'s float type (``X`` itself when ``power`` is 1)."""
    if power == 1:
        return X
    return np.sign(X) * np.abs(X) ** X.dtype.type(power)


@trusted
class SignedPower(TransformerMixin, BaseEstimator):
    """``sign(x) * |x| ** power`` on every feature: a square root evens out pooled CNN activations.

    Pooled activations are non-negative and heavy-tailed (a few channels fire far more
    than the rest); their square root ("power normalisation", as in Fisher-vector and
    bilinear-pooling features) lets a linear model weigh many moderate activations. On
    Caltech-101's EfficientNet-Lite features it lowers each logistic learner's out-of-fold
    log loss by about 5% (``benchmarks/stacking.py``).

    Parameters
    ----------
    power : float
        The exponent; 1 leaves features unchanged.
    """

    def __init__(self, power=0.5):
        self.power = power

    def fit(self, X, y=None):
        validate_data(self, X, dtype=(np.float64, np.float32))
        return self

    def transform(self, X):
        check_is_fitted(self, "n_features_in_")
        return signed_power(validate_data(self, X, dtype=(np.float64, np.float32), reset=False), float(self.power))

    def onnx_transform(self, g, x):
        """This transform in an exported graph (:mod:`stacker.io.export`)."""
        if float(self.power) == 1:
            return x
        return g.op("Mul", g.op("Sign", x), g.op("Pow", g.op("Abs", x), g.const(np.float32(self.power))))


class PipelineModel(ClassifierMixin, BaseEstimator):
    """A model whose fit ends in ``pipeline_``: ``SignedPower`` + ``StandardScaler`` + a ``LogisticRegression``
    holding its linear scores. It predicts, exports (:mod:`stacker.io.export`) and takes the one-image fast path
    (:mod:`stacker.learners.fastpath`) as that pipeline."""

    def _standardised(self, X, y, w=None):
        """Checked inputs -> ``(class indices, the power step (none for power 1), the fitted scaler, scaled rows)``."""
        X, y = validate_data(self, X, y, dtype=(np.float64, np.float32))
        check_classification_targets(y)
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        power = [("power", SignedPower(float(self.power)).fit(X))] if float(self.power) != 1 else []
        X = signed_power(X, float(self.power))  # X is validated: the transform without checking it again
        scaler = StandardScaler().fit(X, sample_weight=w)
        return y_idx, power, scaler, scaler.transform(X)

    def _inner_split(self, Z, y_idx):
        """``(inner rows, held-out third)`` of one seeded stratified split (where temperatures and Cs are chosen)."""
        return next(StratifiedKFold(3, shuffle=True, random_state=self.random_state).split(Z, y_idx))

    def predict_proba(self, X):
        check_is_fitted(self, "pipeline_")
        return self.pipeline_.predict_proba(X)

    def onnx_proba(self, g, x):
        """This model in an exported graph (:mod:`stacker.io.export`): its pipeline's."""
        from stacker.io.export import onnx_proba

        return onnx_proba(self.pipeline_, g, x, f"{type(self).__name__} pipeline")

    def predict(self, X):
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


@trusted
class PathLogistic(PipelineModel):
    """Standardised L2 logistic regression of power-normalised features: ``C`` from a warm-started path on one inner
    split, a temperature, a refit.

    ``LogisticRegressionCV`` fits every ``C`` on every inner fold from scratch (4 x 3 fits
    per outer fold); on 101 classes that made the logistic learners cost more than the
    CNNs. Here the ``Cs`` are fitted in increasing order on one stratified inner split,
    each starting from the previous solution, and each gets the temperature that
    minimises its inner held-out log loss; the ``C`` with the lowest such loss is
    refitted on all rows from its inner solution, its temperature folded into the
    coefficients (it sharpens a strongly regularised model's probabilities). Features are
    first raised to ``power`` (:class:`SignedPower`); rows are float32 after scaling.

    Parameters
    ----------
    power : float
        Exponent of the signed power applied to every feature before scaling (1: none).
    Cs : tuple of float
        Inverse regularisation strengths, tried in increasing order.
    temperature : bool
        Fit the temperature on the inner held-out rows.
    max_iter, tol : int, float
        L-BFGS's limits, as in ``LogisticRegression``.
    random_state : int
        Seeds the inner split.

    Attributes
    ----------
    pipeline_ : Pipeline
        ``SignedPower`` (unless ``power`` is 1) + ``StandardScaler`` + ``LogisticRegression`` (temperature folded
        in): what predicts.
    C_ : float
    temperature_ : float
    path_ : ndarray
        Inner held-out log loss of each ``C`` in increasing order, at its best temperature (NaN when no split was
        possible: a class with fewer than 3 rows; then the middle ``C``, no temperature).
    classes_ : ndarray
    """

    def __init__(self, power=0.5, Cs=(0.01, 0.03, 0.1, 0.3), temperature=True, max_iter=1000, tol=1e-3,
                 random_state=0):
        self.power = power
        self.Cs = Cs
        self.temperature = temperature
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state

    def fit(self, X, y, sample_weight=None):
        """``sample_weight``: each row's weight in the scaling, the path, the temperature and the refit."""
        w = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        y_idx, power, scaler, Z = self._standardised(X, y, w)
        Z = Z.astype(np.float32)
        Cs = sorted(float(c) for c in self.Cs)
        self.C_, self.temperature_, self.path_, start = Cs[len(Cs) // 2], 1.0, np.full(len(Cs), np.nan), None
        if len(Cs) > 1 and np.bincount(y_idx).min() >= 3:  # every class in both parts of the inner split
            self.C_, self.temperature_, start = self._select(Z, y_idx, Cs, w)
        model = self._logistic(self.C_, warm=start is not None)
        if start is not None:
            model.coef_, model.intercept_ = start
        model.fit(Z, y_idx, sample_weight=w)
        model.coef_ /= self.temperature_
        model.intercept_ /= self.temperature_
        model.classes_ = self.classes_
        self.pipeline_ = Pipeline([*power, ("scale", scaler), ("logistic", model)])
        return self

    def _logistic(self, C, warm=False):
        return LogisticRegression(C=C, max_iter=int(self.max_iter), tol=float(self.tol), warm_start=warm)

    def _select(self, Z, y_idx, Cs, w=None):
        """``(C, temperature, (coef, intercept) at C)`` from the path on one stratified inner split."""
        inner, held = self._inner_split(Z, y_idx)
        w_in, w_held = (None, None) if w is None else (w[inner], w[held])
        if w_held is not None and not w_held.any():  # nothing to score on: every held-out row weighs 0
            w_held = None
        model, best = self._logistic(Cs[0], warm=True), None
        for i, C in enumerate(Cs):
            model.set_params(C=C).fit(Z[inner], y_idx[inner], sample_weight=w_in)
            log_p = log_softmax(_two_columns(model.decision_function(Z[held])), axis=1)
            t = _temperature(log_p, y_idx[held], w_held) if self.temperature else 1.0
            self.path_[i] = -np.average(log_softmax(log_p / t, axis=1)[np.arange(len(held)), y_idx[held]],
                                        weights=w_held)
            if best is None or self.path_[i] < self.path_[best[0]]:
                best = (i, t, (model.coef_.copy(), model.intercept_.copy()))
        i, t, start = best
        return Cs[i], t, start


def _temperature(log_p, y_idx, w=None, most: float = 1.0) -> float:
    """The temperature in [1/e, e ** most] minimising the (``w``-weighted) log loss of ``log_softmax(log_p / T)``."""
    rows = np.arange(len(y_idx))
    nll = lambda log_t: -np.average(log_softmax(log_p / np.exp(log_t), axis=1)[rows, y_idx], weights=w)  # noqa: E731
    return float(np.exp(minimize_scalar(nll, bounds=(-1.0, most), method="bounded").x))


def _two_columns(scores) -> np.ndarray:
    """Linear scores as ``(n, k)``: a binary model's one column (the second class's log-odds) padded with zeros."""
    scores = scores.reshape(len(scores), -1)
    return np.hstack([np.zeros_like(scores), scores]) if scores.shape[1] == 1 else scores


@trusted
class ShrinkageLDA(PipelineModel):
    """Linear discriminant analysis of power-normalised features, with Ledoit-Wolf shrinkage and a temperature.

    A Gaussian model of each class with one shared covariance: fitted in closed form (no
    iterations; about 4 s per fold on Caltech-101's 1,280-wide features, the inner fit
    included) and wrong on other images than logistic regression, which is what level 2
    needs. On Caltech-101 (``benchmarks/stacking.py``'s folds) adding it to each backbone's
    logistic and prototype learners took the ensemble's out-of-fold log loss from 0.1114 to
    0.1056 and its accuracy from 0.9679 to 0.9696. Its raw probabilities are far too sure in
    1,280 dimensions (out-of-fold log loss about 1.0 at 96% accuracy), so a temperature
    fitted on one inner stratified split divides its scores (as in :class:`PathLogistic`).
    It takes no sample weights (``class_weight``, pseudo-labels refuse it before any work).

    Parameters
    ----------
    power : float
        Exponent of the signed power applied to every feature before scaling (1: none).
    temperature : bool
        Fit the temperature on an inner held-out third.
    random_state : int
        Seeds the inner split.

    Attributes
    ----------
    pipeline_ : Pipeline
        ``SignedPower`` + ``StandardScaler`` + a ``LogisticRegression`` holding the discriminant's scores divided by the
        temperature (it predicts exactly as the discriminant's ``predict_proba`` then softened).
    temperature_ : float
    classes_ : ndarray
    """

    def __init__(self, power=0.5, temperature=True, random_state=0):
        self.power = power
        self.temperature = temperature
        self.random_state = random_state

    def fit(self, X, y):
        from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

        y_idx, power, scaler, Z = self._standardised(X, y)
        if len(self.classes_) < 2:
            raise ValueError(f"need at least two classes to train a classifier; got {len(self.classes_)}")
        lda = lambda: LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto")  # noqa: E731
        self.temperature_ = 1.0
        if self.temperature and np.bincount(y_idx).min() >= 3:  # every class on both sides of the inner split
            inner, held = self._inner_split(Z, y_idx)
            scores = _two_columns(lda().fit(Z[inner], y_idx[inner]).decision_function(Z[held]))
            self.temperature_ = _temperature(log_softmax(scores, axis=1), y_idx[held], most=6.0)
        fitted = lda().fit(Z, y_idx)
        linear = LogisticRegression()  # a container: predict_proba is softmax (expit for two classes) of its scores
        linear.coef_, linear.intercept_ = fitted.coef_ / self.temperature_, fitted.intercept_ / self.temperature_
        linear.classes_, linear.n_features_in_ = self.classes_, Z.shape[1]
        self.pipeline_ = Pipeline([*power, ("scale", scaler), ("lda", linear)])
        return self


def _logistic(random_state: int, **_):
    """Standardised L2 logistic regression, C from a warm-started path (:class:`PathLogistic`)."""
    return PathLogistic(random_state=random_state)


@dataclass(frozen=True)
class ModelSpec:
    """A named model family: ``factory(random_state=..., strategy=...)`` returns a fresh estimator."""

    name: str
    factory: Callable
    summary: str


MODELS: dict[str, ModelSpec] = {}


def register_model(name: str, factory: Callable, summary: str = "") -> None:
    """Make ``name`` usable in ``Ensemble(models=...)`` (and as ``head=``)."""
    MODELS[name] = ModelSpec(name, factory, summary)


register_model("logistic", _logistic, "standardised L2 logistic regression, C from a warm-started path")
register_model("prototype", lambda random_state, **_: PrototypeClassifier(), "cosine class prototypes")
register_model("lda", lambda random_state, **_: ShrinkageLDA(random_state=random_state),
               "shrinkage linear discriminant analysis with a temperature")
register_model("dense", lambda random_state, strategy=None: DenseClassifier(random_state=random_state,
                                                                            strategy=strategy),
               "dropout + softmax head (Keras guide), early stopping")
register_model("resnet", lambda random_state, strategy=None: DenseClassifier(
    hidden=(512,), batch_norm=True, dropout=0.5, random_state=random_state, strategy=strategy),
    "BN, dropout, dense 512 head (ResNet50 tutorial)")

# Named sets of models per feature source; "default" is the measured best trade (benchmarks/stacking.py).
PRESETS = {"default": ("logistic", "prototype"), "fast": ("logistic",),
           "best": ("logistic", "prototype", "dense"), "dense": ("dense",)}


def model_names(spec) -> tuple:
    """The model entries that ``spec`` (a preset, a name, an estimator or a list of them) stands for."""
    if isinstance(spec, str):
        if spec.strip() in PRESETS:
            return PRESETS[spec.strip()]
        spec = tuple(s.strip() for s in spec.split(",") if s.strip())
    items = tuple(spec) if isinstance(spec, (list, tuple)) else (spec,)
    if not items:
        raise ValueError("models must name at least one model")
    for item in items:
        if isinstance(item, str) and item not in MODELS:
            raise ValueError(f"unknown model {item!r}; use one of {sorted(MODELS)}, a preset {sorted(PRESETS)} "
                             "or a scikit-learn classifier")
        if not isinstance(item, str):
            _check_estimator_like(item, "a model")
    return items


@functools.lru_cache(maxsize=None)
def code_fingerprint() -> str:
    """Hash of the model code (this module, the dense head) and scikit-learn's version.

    Learner results made by other model code are not reused.
    """
    import sklearn

    source = inspect.getsource(sys.modules[__name__]) + inspect.getsource(_dense)
    return hashlib.sha256((source + sklearn.__version__).encode()).hexdigest()[:16]


def model_label(item) -> str:
    """Short name of a model entry, used in learner names (``efficientnet_lite0:logistic``)."""
    return item if isinstance(item, str) else type(item).__name__.lower()


def make_model(item, random_state: int = 0, strategy=None):
    """A fresh, seeded estimator for a model entry (a registered name or a scikit-learn classifier)."""
    if isinstance(item, str):
        if item not in MODELS:
            raise ValueError(f"unknown model {item!r}; use one of {sorted(MODELS)}")
        return MODELS[item].factory(random_state=random_state, strategy=strategy)
    return fresh_estimator(item, random_state, "a model")


def fit_weighted(est, X, y, sample_weight=None):
    """``est.fit(X, y)``, with ``sample_weight`` when given: a pipeline's goes to its last step (the steps
    before it, e.g. a scaler, are fitted unweighted)."""
    if sample_weight is None:
        return est.fit(X, y)
    if isinstance(est, Pipeline):
        return est.fit(X, y, **{f"{est.steps[-1][0]}__sample_weight": sample_weight})
    return est.fit(X, y, sample_weight=sample_weight)


WEIGHTS = "class_weight and sample_weight"  # what needs row weights when no stage (pseudo-labels, distillation) does


def check_takes_weights(item, role: str, what: str = WEIGHTS) -> None:
    """A TypeError unless a model entry's (or combiner's) fit takes ``sample_weight`` (``lda``'s does not).

    ``what``: the feature that needs the weights, for the message.
    """
    from sklearn.utils.validation import has_fit_parameter

    if isinstance(item, str):
        item = make_model(item)
    est = item.steps[-1][1] if isinstance(item, Pipeline) else item
    if not has_fit_parameter(est, "sample_weight"):
        raise TypeError(f"{role}: {type(est).__name__}.fit takes no sample_weight, so {what} cannot reach it; "
                        "use a model whose fit does")


def _check_estimator_like(spec, role: str) -> None:
    if not hasattr(spec, "fit") or not hasattr(spec, "predict_proba"):
        raise TypeError(f"{role} must have fit and predict_proba; got {type(spec).__name__}")


def fresh_estimator(spec, random_state: int, role: str):
    """An unfitted, re-seeded copy of a user's scikit-learn-style classifier."""
    _check_estimator_like(spec, role)
    est = clone(spec)
    if "random_state" in est.get_params():
        est.set_params(random_state=random_state)
    return est


