"""The model zoo: classifiers that turn one feature source's rows into probabilities.

Each entry of :data:`MODELS` is a name and a factory; a base learner is a feature
source times one of these models, bagged over the ensemble's folds. A new model family
is a new row here, nothing else. :data:`PRESETS` names sets of models, so
``Ensemble(models="default")`` and ``Ensemble(models=("logistic", "dense"))`` both work.

- ``logistic``: standardised L2 logistic regression whose ``C`` is picked by inner
  stratified cross-validation on log loss (scikit-learn's ``LogisticRegressionCV``).
- ``prototype``: cosine similarity to class prototypes (mean L2-normalised features) with
  a fitted temperature; milliseconds to fit, and different errors from the logistic.
- ``dense``: the Keras guides' head (dropout + softmax) trained with early stopping.
- ``resnet``: the ResNet50 tutorial's head (BN, dropout, dense 512).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from stacker.io.persist import checked_params, load_keras, register_format, trusted

__all__ = ["DenseClassifier", "PrototypeClassifier", "MODELS", "PRESETS", "ModelSpec", "make_model",
           "model_names", "register_model", "fresh_estimator", "code_fingerprint", "proba_function", "keras_fit",
           "fit_scope"]


def keras_fit(model, *args, **kwargs):
    """``model.fit(*args, **kwargs)`` in a :func:`fit_scope`: none of its training state outlives it."""
    with fit_scope(model):
        return model.fit(*args, **kwargs)


@contextlib.contextmanager
def fit_scope(model):
    """Leave nothing of a Keras fit behind that TensorFlow would keep for the life of the process.

    Two global tables grow with every fit and pin what it used (about 60 MB and the fold's
    training rows, 120 MB, for every fine-tuning fold of EfficientNet-Lite0):

    - Keras' TensorFlow optimizer sums gradients over replicas even without a strategy, and
      each trace of a train step registers that sum's gradient under a new name
      (``tf.custom_gradient`` in graph mode), holding the traced step and the model;
    - ``tf.data.Dataset.from_generator`` (how Keras reads a ``PyDataset``) ties its Python
      function to the outermost graph, which in eager mode is never freed: the dataset, its
      ``PyDataset`` and the arrays behind it stay reachable.

    Both are read only while the fit runs, so the entries added inside the scope are removed
    when it ends, with the model's train and test functions (a later fit traces them again).
    Datasets made inside the scope must not be used after it, and scopes must not overlap in
    threads of one process (stacker fits one model at a time per process; Ray uses processes).
    """
    registry, py_funcs = _gradient_registry(), _graph_py_funcs()
    names, n_funcs = set(registry), len(py_funcs)
    try:
        yield
    finally:
        for name in set(registry) - names:
            if name.startswith("CustomGradient-"):
                del registry[name]
        del py_funcs[n_funcs:]
        model.train_function = model.test_function = None


def _graph_py_funcs() -> list:
    """The list by which TensorFlow's outermost graph keeps every eager ``py_func`` alive."""
    try:
        from tensorflow.python.framework import ops

        graph = ops.get_default_graph()
        if not hasattr(graph, "_py_funcs_used_in_graph"):
            graph._py_funcs_used_in_graph = []
        return graph._py_funcs_used_in_graph
    except (ImportError, AttributeError):  # another TensorFlow layout: nothing to release
        return []


def _gradient_registry() -> dict:
    """TensorFlow's table of registered gradient functions (empty if this TensorFlow has none)."""
    try:
        from tensorflow.python.framework import ops

        return ops._gradient_registry._registry
    except (ImportError, AttributeError):  # another TensorFlow layout: nothing to release
        return {}


@trusted
class DenseClassifier(ClassifierMixin, BaseEstimator):
    """Dropout + dense softmax (optionally with hidden layers), trained with early stopping.

    Parameters
    ----------
    hidden : tuple of int
        Hidden layer widths; ``()`` is the plain Keras-guide head, ``(32, 8)`` a meta-net.
    dropout : float
        Dropout before every dense layer.
    epochs : int
        Upper bound on epochs; early stopping usually ends much sooner.
    batch_size : int
        Largest batch; smaller on small data so that every epoch takes about 20 steps.
    learning_rate : float
        Adam's learning rate.
    patience : int
        Epochs without a validation-loss improvement of ``min_delta`` before stopping
        (best weights restored).
    min_delta : float
        Relative improvement of the validation loss that counts as one: on easy data the
        loss creeps down by tiny amounts for hundreds of epochs, and waiting for them
        buys nothing.
    validation_fraction : float
        Share of the training rows held out (stratified) for early stopping.
    label_smoothing : float
    l2 : float
        L2 penalty on the dense kernels.
    batch_norm : bool
        Batch normalisation before each dropout (the ResNet50 tutorial's head:
        BN -> dropout -> dense 512 -> BN -> dropout -> softmax).
    random_state : int
        Seeds weight initialisation, dropout, shuffling and the validation split.
    verbose : int
    strategy : tf.distribute.Strategy, optional
        Build and train in its scope (MirroredStrategy: data-parallel over GPUs).

    Attributes
    ----------
    model_ : keras.Model
    classes_ : ndarray
    n_features_in_ : int
    history_ : dict
        Loss/accuracy per epoch, training and validation.

    Examples
    --------
    >>> import numpy as np
    >>> X = np.r_[np.zeros((20, 3)), np.ones((20, 3))]; y = np.r_[[0] * 20, [1] * 20]
    >>> DenseClassifier(epochs=5).fit(X, y).predict_proba(X).shape
    (40, 2)
    """

    def __init__(self, hidden=(), dropout=0.2, epochs=100, batch_size=128, learning_rate=1e-3, patience=5,
                 min_delta=1e-3, validation_fraction=0.1, label_smoothing=0.0, l2=1e-4, batch_norm=False,
                 random_state=0, verbose=0, strategy=None):
        self.hidden = hidden
        self.dropout = dropout
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.patience = patience
        self.min_delta = min_delta
        self.validation_fraction = validation_fraction
        self.label_smoothing = label_smoothing
        self.l2 = l2
        self.batch_norm = batch_norm
        self.random_state = random_state
        self.verbose = verbose
        self.strategy = strategy

    def _build(self, n_features: int, n_classes: int, mean, variance, steps_per_execution: int = 32):
        import keras
        from keras import layers

        inputs = keras.Input((n_features,), name="features")
        x = layers.Normalization(mean=mean, variance=variance, name="standardize")(inputs)
        reg = keras.regularizers.L2(self.l2) if self.l2 else None
        for i, width in enumerate(self.hidden):
            if self.batch_norm:
                x = layers.BatchNormalization(name=f"bn{i}")(x)
            if self.dropout:
                x = layers.Dropout(self.dropout, seed=self.random_state + i, name=f"dropout{i}")(x)
            x = layers.Dense(width, activation="relu", kernel_regularizer=reg, name=f"dense{i}")(x)
        if self.batch_norm:
            x = layers.BatchNormalization(name="bn_top")(x)
        if self.dropout:
            x = layers.Dropout(self.dropout, seed=self.random_state + 99, name="dropout_top")(x)
        # zero-initialised output: training starts from uniform probabilities, as logistic regression does
        outputs = layers.Dense(n_classes, activation="softmax", kernel_regularizer=reg, kernel_initializer="zeros",
                               name="softmax")(x)
        model = keras.Model(inputs, outputs, name="dense_classifier")
        model.compile(
            optimizer=keras.optimizers.Adam(self.learning_rate),
            loss=keras.losses.CategoricalCrossentropy(label_smoothing=self.label_smoothing),
            metrics=["accuracy"],
            steps_per_execution=steps_per_execution,
        )
        return model

    def fit(self, X, y):
        import keras

        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        y_idx = self._classes(y)
        keras.utils.set_random_seed(int(self.random_state))
        Y = keras.utils.to_categorical(y_idx, len(self.classes_))
        tr, va = self._holdout(y_idx)
        fit_X, fit_Y, val = (X, Y, None) if va is None else (X[tr], Y[tr], (X[va], Y[va]))
        self._compile(X.shape[1], fit_X.mean(axis=0), fit_X.var(axis=0), len(fit_X))
        hist = keras_fit(self.model_, fit_X, fit_Y, validation_data=val, epochs=self.epochs,
                         batch_size=self._batch_size(len(fit_X)), callbacks=self._callbacks(val is not None),
                         verbose=self.verbose, shuffle=True)
        self.history_ = {k: [float(v) for v in vs] for k, vs in hist.history.items()}
        return self

    # -- the parts of fit that a streaming fit (stacker.learners.streaming.StreamingDense) shares
    def _classes(self, y) -> np.ndarray:
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"need at least two classes to train a classifier; got 1 class ({self.classes_[0]!r})")
        return y_idx

    def _holdout(self, y_idx):
        """``(train rows, validation rows or None)``: a stratified split when every class can spare rows."""
        from sklearn.model_selection import train_test_split

        n = len(y_idx)
        if (self.validation_fraction and np.bincount(y_idx).min() >= 2
                and n * self.validation_fraction >= len(self.classes_)):
            return train_test_split(np.arange(n), test_size=self.validation_fraction, stratify=y_idx,
                                    random_state=self.random_state)
        return np.arange(n), None

    def _compile(self, n_features: int, mean, variance, n_rows: int) -> None:
        from stacker.features.engines import strategy_scope

        with strategy_scope(self.strategy):
            self.model_ = self._build(n_features, len(self.classes_), mean, variance,
                                      self._steps_per_execution(n_rows))

    def _steps_per_execution(self, n_rows: int) -> int:
        """Steps per traced call: 32 where per-step Python overhead adds up, 1 for a short fit.

        Small heads spend most of a step in Python, so a long fit runs 32 steps per call; but
        tracing that loop costs ~0.4 s more than one step, which a fit of fewer than 256
        steps in all (e.g. a few epochs on a few hundred rows) never wins back. Either way
        the steps and their numbers are the same.
        """
        steps = -(-n_rows // self._batch_size(n_rows)) * int(self.epochs)
        return 32 if steps >= 256 else 1

    def _batch_size(self, n_rows: int) -> int:
        # at least ~20 steps an epoch: on a few hundred rows one big batch per epoch barely learns
        return int(max(1, min(self.batch_size, max(16, n_rows // 20), n_rows)))

    def _callbacks(self, validated: bool) -> list:
        # too few rows to hold any out: stop when the training loss stops improving instead
        return [_RelativeEarlyStopping("val_loss" if validated else "loss", self.patience, self.min_delta)]

    def predict_proba(self, X):
        check_is_fitted(self, "model_")
        X = validate_data(self, X, dtype=np.float32, reset=False)
        # direct calls in chunks: Model.predict re-traces per model and warns when many heads predict
        proba = np.concatenate([np.asarray(self.model_(X[i : i + 8192], training=False), dtype=np.float64)
                                for i in range(0, len(X), 8192)])
        return proba / proba.sum(axis=1, keepdims=True)  # float32 softmax rows drift from 1

    def predict(self, X):
        proba = self.predict_proba(X)  # first: it raises NotFittedError before fit
        return self.classes_[np.argmax(proba, axis=1)]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = self.strategy is not None
        return tags

    # persistence: the Keras model as .keras (safe_mode), the rest as JSON
    def save(self, path_stem: str) -> list[str]:
        check_is_fitted(self, "model_")
        self.model_.save(path_stem + ".keras")
        params = {k: v for k, v in self.get_params().items() if k != "strategy"}  # run-time, not model
        with open(path_stem + ".json", "w") as f:
            json.dump({"estimator": "DenseClassifier", "params": _jsonable(params),
                       "classes": self.classes_.tolist(), "n_features_in": int(self.n_features_in_),
                       "history": self.history_}, f)
        return [path_stem + ".keras", path_stem + ".json"]

    @classmethod
    def load(cls, path_stem: str, info: dict) -> "DenseClassifier":
        params = checked_params(cls, info, path_stem)
        params["hidden"] = tuple(params.get("hidden", ()))
        est = cls(**params)
        est.model_ = load_keras(path_stem + ".keras")
        est.classes_ = np.array(info["classes"])
        est.n_features_in_ = int(info.get("n_features_in", est.model_.input_shape[-1]))
        est.history_ = info.get("history", {})
        return est


def _RelativeEarlyStopping(monitor: str, patience: int, min_delta: float):  # noqa: N802 - callback factory
    """EarlyStopping that needs a *relative* improvement and restores the best weights."""
    import keras

    class RelativeEarlyStopping(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.best, self.best_weights, self.wait = np.inf, None, 0

        def on_epoch_end(self, epoch, logs=None):
            value = (logs or {}).get(monitor)
            if value is None:
                return
            if value < self.best:
                self.best_weights = self.model.get_weights()
                improved = value < self.best * (1 - min_delta)
                self.best = value
                if improved:
                    self.wait = 0
                    return
            self.wait += 1
            if self.wait >= patience:
                self.model.stop_training = True

        def on_train_end(self, logs=None):
            if self.best_weights is not None:
                self.model.set_weights(self.best_weights)

    return RelativeEarlyStopping()


def _jsonable(params: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items()}


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

    def fit(self, X, y):
        X, y = validate_data(self, X, y, dtype=np.float64)
        check_classification_targets(y)
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        k = len(self.classes_)
        self.mean_ = X.mean(axis=0)
        U = self._normalise(X)
        sums = np.zeros((k, U.shape[1]))
        np.add.at(sums, y_idx, U)
        counts = np.bincount(y_idx, minlength=k)[:, None].astype(float)
        self.prototypes_ = _unit(sums / counts)
        # leave-one-out prototypes of each row's own class
        own = _unit(sums[y_idx] - U)
        S = U @ self.prototypes_.T
        S[np.arange(len(U)), y_idx] = np.where(counts[y_idx, 0] > 1, np.sum(U * own, axis=1), 0.0)
        nll = lambda log_s: -np.mean(log_softmax(np.exp(log_s) * S, axis=1)[np.arange(len(U)), y_idx])  # noqa: E731
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


def proba_function(model):
    """``X -> model.predict_proba(X)`` without scikit-learn's per-call input checks, where the model kind is known.

    For one image those checks cost ten times a linear head's arithmetic (40 fold models
    of a 4-backbone ensemble: 13 ms against 1 ms). The ``prototype`` model and a
    standardised logistic regression (the ``logistic`` model) are evaluated directly, with
    scikit-learn's own operations in its order; any other model keeps ``predict_proba``.
    The caller checks the inputs (2-D, finite, as many features as the model was fitted on).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    if isinstance(model, PrototypeClassifier) and hasattr(model, "prototypes_"):
        return model._proba
    if (isinstance(model, Pipeline) and len(model.steps) == 2 and type(model.steps[0][1]) is StandardScaler
            and isinstance(model.steps[1][1], LogisticRegression) and hasattr(model.steps[1][1], "coef_")):
        return functools.partial(_scaled_logistic_proba, model.steps[0][1], model.steps[1][1])
    return model.predict_proba


def _scaled_logistic_proba(scaler, logistic, X):
    """``StandardScaler`` then ``LogisticRegression.predict_proba``, as scikit-learn computes them."""
    from scipy.special import expit, softmax

    X = np.array(X, dtype=X.dtype if X.dtype in (np.float32, np.float64) else np.float64)
    if scaler.with_mean:
        X -= scaler.mean_.astype(X.dtype)
    if scaler.with_std:
        X /= scaler.scale_.astype(X.dtype)
    scores = X @ logistic.coef_.T + logistic.intercept_
    if len(logistic.classes_) <= 2:
        p = expit(scores[:, 0])
        return np.stack([1 - p, p], axis=1)
    return softmax(scores, axis=1)


def _unit(M):
    return M / np.maximum(np.linalg.norm(M, axis=-1, keepdims=True), 1e-12)


trusted(StratifiedKFold)  # the logistic learner's inner folds, saved in its fitted pipeline


def _logistic(random_state: int, **_):
    """Standardised L2 logistic regression; C by 3-fold inner CV on log loss, refitted on all rows."""
    inner = StratifiedKFold(3, shuffle=True, random_state=random_state)
    return make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=[0.003, 0.01, 0.03, 0.1], cv=inner,
                                                                scoring="neg_log_loss", max_iter=1000, tol=1e-3,
                                                                l1_ratios=(0.0,), use_legacy_attributes=False))


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


register_model("logistic", _logistic, "standardised L2 logistic regression, C by inner CV")
register_model("prototype", lambda random_state, **_: PrototypeClassifier(), "cosine class prototypes")
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
    """Hash of this module and scikit-learn's version: learner results made by other model code are not reused."""
    import sklearn

    source = inspect.getsource(sys.modules[__name__])
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



register_format("DenseClassifier", DenseClassifier)
