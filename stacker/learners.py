"""Base learners: classifiers trained on cached features.

A base learner is a classifier head on one backbone's pooled features. The Keras
guides' head -- dropout then a dense softmax -- is :class:`DenseClassifier`; any
scikit-learn classifier works too (``"logistic"`` is a scaled logistic regression).
:class:`DenseClassifier` follows the scikit-learn estimator contract (constructor
stores parameters, ``fit`` sets ``model_`` and ``classes_``), so ``clone`` and grid
search work, and with ``hidden=(32, 8)`` it is also the default meta-learner.
"""

from __future__ import annotations

import json
import os

import joblib
import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

__all__ = ["DenseClassifier", "make_head", "save_estimator", "load_estimator"]


class DenseClassifier(ClassifierMixin, BaseEstimator):
    """Dropout + dense softmax (optionally with hidden layers), trained with early stopping.

    Parameters
    ----------
    hidden : tuple of int
        Hidden layer widths; ``()`` is the plain Keras-guide head, ``(32, 8)`` the meta-net.
    dropout : float
        Dropout before every dense layer.
    epochs : int
        Upper bound on epochs; early stopping usually ends sooner.
    batch_size : int
    learning_rate : float
        Adam's learning rate.
    patience : int
        Epochs without validation improvement before stopping (best weights restored).
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
    history_ : dict
        Loss/accuracy per epoch, training and validation.
    """

    def __init__(self, hidden=(), dropout=0.2, epochs=200, batch_size=64, learning_rate=1e-3, patience=10,
                 validation_fraction=0.1, label_smoothing=0.0, l2=1e-4, batch_norm=False, random_state=0,
                 verbose=0, strategy=None):
        self.hidden = hidden
        self.batch_norm = batch_norm
        self.dropout = dropout
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.label_smoothing = label_smoothing
        self.l2 = l2
        self.random_state = random_state
        self.verbose = verbose
        self.strategy = strategy

    def _build(self, n_features: int, n_classes: int, X):
        import keras
        from keras import layers

        inputs = keras.Input((n_features,), name="features")
        x = layers.Normalization(mean=X.mean(axis=0), variance=X.var(axis=0), name="standardize")(inputs)
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
        outputs = layers.Dense(n_classes, activation="softmax", kernel_regularizer=reg, name="softmax")(x)
        model = keras.Model(inputs, outputs, name="dense_classifier")
        model.compile(
            optimizer=keras.optimizers.Adam(self.learning_rate),
            loss=keras.losses.CategoricalCrossentropy(label_smoothing=self.label_smoothing),
            metrics=["accuracy"],
            steps_per_execution=32,  # small heads: per-step Python overhead dominates, so run steps in bulk
        )
        return model

    def fit(self, X, y):
        import keras
        from sklearn.model_selection import train_test_split

        X = np.asarray(X, dtype=np.float32)
        y = np.asarray(y)
        if X.ndim != 2 or len(X) != len(y):
            raise ValueError(f"X must be (n, d) with one label per row; got {X.shape} and {y.shape}")
        if not np.isfinite(X).all():
            raise ValueError("X holds NaN or inf values")
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError("need at least two classes to train a classifier")
        keras.utils.set_random_seed(int(self.random_state))
        Y = keras.utils.to_categorical(y_idx, len(self.classes_))
        counts = np.bincount(y_idx)
        val = None
        fit_X, fit_Y = X, Y
        if self.validation_fraction and counts.min() >= 2 and len(X) * self.validation_fraction >= len(self.classes_):
            tr, va = train_test_split(np.arange(len(X)), test_size=self.validation_fraction, stratify=y_idx,
                                      random_state=self.random_state)
            fit_X, fit_Y, val = X[tr], Y[tr], (X[va], Y[va])
        from .engines import strategy_scope

        with strategy_scope(self.strategy):
            self.model_ = self._build(X.shape[1], len(self.classes_), fit_X)
        # too few rows to hold any out: stop when the training loss stops improving instead
        monitor = "val_loss" if val is not None else "loss"
        callbacks = [keras.callbacks.EarlyStopping(monitor=monitor, patience=self.patience,
                                                   restore_best_weights=True)]
        hist = self.model_.fit(fit_X, fit_Y, validation_data=val, epochs=self.epochs, batch_size=self.batch_size,
                               callbacks=callbacks, verbose=self.verbose, shuffle=True)
        self.history_ = {k: [float(v) for v in vs] for k, vs in hist.history.items()}
        return self

    def predict_proba(self, X):
        check_is_fitted(self, "model_")
        X = np.asarray(X, dtype=np.float32)
        if len(X) == 0:
            return np.zeros((0, len(self.classes_)), dtype=np.float32)
        # direct calls in chunks: Model.predict re-traces per model and warns when many heads predict
        proba = np.concatenate([np.asarray(self.model_(X[i : i + 8192], training=False), dtype=np.float64)
                                for i in range(0, len(X), 8192)])
        return proba / proba.sum(axis=1, keepdims=True)  # float32 softmax rows drift from 1

    def predict(self, X):
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    # persistence: the Keras model as .keras (safe_mode), the rest as JSON
    def save(self, path_stem: str) -> list[str]:
        check_is_fitted(self, "model_")
        self.model_.save(path_stem + ".keras")
        with open(path_stem + ".json", "w") as f:
            params = {k: v for k, v in self.get_params().items() if k != "strategy"}  # run-time, not model
            json.dump({"params": _jsonable(params), "classes": self.classes_.tolist(),
                       "history": self.history_}, f)
        return [path_stem + ".keras", path_stem + ".json"]

    @classmethod
    def load(cls, path_stem: str) -> "DenseClassifier":
        import keras

        with open(path_stem + ".json") as f:
            info = json.load(f)
        params = info["params"]
        params["hidden"] = tuple(params.get("hidden", ()))
        est = cls(**params)
        est.model_ = keras.saving.load_model(path_stem + ".keras", safe_mode=True, compile=False)
        est.classes_ = np.array(info["classes"])
        est.history_ = info.get("history", {})
        return est


def _jsonable(params: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items()}


def make_head(spec="dense", random_state: int = 0, strategy=None):
    """A fresh base-learner estimator from ``"dense"``, ``"resnet"``, ``"logistic"`` or a scikit-learn classifier."""
    if isinstance(spec, str):
        if spec == "dense":
            return DenseClassifier(random_state=random_state, strategy=strategy)
        if spec == "resnet":
            return DenseClassifier(hidden=(512,), batch_norm=True, dropout=0.5, random_state=random_state,
                                   strategy=strategy)
        if spec == "logistic":
            return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
        raise ValueError(f"unknown head {spec!r}; use 'dense', 'resnet', 'logistic' or a scikit-learn classifier")
    return fresh_estimator(spec, random_state, "a head")


def fresh_estimator(spec, random_state: int, role: str):
    """An unfitted, re-seeded copy of a user's scikit-learn-style classifier."""
    if not hasattr(spec, "fit") or not hasattr(spec, "predict_proba"):
        raise TypeError(f"{role} must have fit and predict_proba; got {type(spec).__name__}")
    est = clone(spec)
    if "random_state" in est.get_params():
        est.set_params(random_state=random_state)
    return est


# What a pickled scikit-learn model may name. A joblib file is a pickle, and a pickle can
# call any function it names (os.system...), so stacker refuses every other global: the
# defence behind the manifest checksums, for when a whole model directory was forged.
_SAFE_ROOTS = ("sklearn", "numpy", "scipy", "joblib", "stacker", "collections", "copyreg")
_SAFE_BUILTINS = {"slice", "set", "frozenset", "complex", "bytearray", "range", "object", "tuple", "list", "dict",
                  "int", "float", "bool", "str", "bytes", "getattr"}
TRUSTED_MODULES_ENV = "STACKER_TRUSTED_MODULES"  # extra module roots (your own estimators), comma-separated


def _allowed(module: str, name: str) -> bool:
    root = module.split(".")[0]
    extra = tuple(m.strip() for m in os.environ.get(TRUSTED_MODULES_ENV, "").split(",") if m.strip())
    if root in _SAFE_ROOTS + extra:
        return not (root == "numpy" and any(part in module for part in ("testing", "distutils", "f2py")))
    if module == "builtins":
        return name in _SAFE_BUILTINS and name != "getattr"
    return (module, name) in {("functools", "partial"), ("_codecs", "encode")}


def _load_joblib(path: str):
    """``joblib.load`` through an unpickler that refuses globals outside scikit-learn/NumPy/SciPy/stacker."""
    import pickle

    from joblib import numpy_pickle

    class AllowlistUnpickler(numpy_pickle.NumpyUnpickler):
        def find_class(self, module, name):
            if not _allowed(module, name):
                raise pickle.UnpicklingError(
                    f"refusing to load {path}: it names {module}.{name}, which is not a scikit-learn, NumPy or "
                    f"SciPy object (a crafted file?). If it is your own estimator class, add its module to "
                    f"${TRUSTED_MODULES_ENV}.")
            return super().find_class(module, name)

    with open(path, "rb") as f:
        unpickler = AllowlistUnpickler(path, f, ensure_native_byte_order="auto")
        try:
            return unpickler.load()
        except UnicodeDecodeError:  # pragma: no cover - Python 2 pickles are not written by stacker
            raise pickle.UnpicklingError(f"{path} is not a stacker joblib file") from None


def save_estimator(est, path_stem: str) -> list[str]:
    """Save a fitted estimator: Keras-backed ones (with ``save``/``load``) as ``.keras`` + JSON, others with joblib."""
    if hasattr(est, "save") and hasattr(type(est), "load"):
        return est.save(path_stem)
    joblib.dump(est, path_stem + ".joblib")
    return [path_stem + ".joblib"]


def load_estimator(path_stem: str):
    """Load what :func:`save_estimator` wrote. Only call on files whose checksums were verified."""
    if os.path.exists(path_stem + ".keras"):
        with open(path_stem + ".json") as f:
            info = json.load(f)
        if info.get("estimator") == "FineTunedClassifier":
            from .finetune import FineTunedClassifier  # finetune builds on this module

            return FineTunedClassifier.load(path_stem, info)
        return DenseClassifier.load(path_stem)
    return _load_joblib(path_stem + ".joblib")
