"""The dense head: dropout + softmax (optionally hidden layers) on pooled features, in Keras.

:class:`DenseClassifier` is the ``dense`` and ``resnet`` models of the zoo and the
fine-tuned network's phase-1 head; it is saved as a checked ``.keras`` archive plus its
parameters in JSON (never a pickle).
"""

from __future__ import annotations

import json

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import _check_sample_weight, check_is_fitted, validate_data

from stacker.io.persist import checked_params, load_keras, register_format, trusted
from stacker.learners.keras_fit import keras_fit

__all__ = ["DenseClassifier"]


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

    def fit(self, X, y, sample_weight=None):
        """``sample_weight``: each row's weight in the training and the early-stopping loss (Keras's)."""
        import keras

        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        y_idx = self._classes(y)
        keras.utils.set_random_seed(int(self.random_state))
        Y = keras.utils.to_categorical(y_idx, len(self.classes_))
        tr, va = self._holdout(y_idx)
        fit_X, fit_Y, val = (X, Y, None) if va is None else (X[tr], Y[tr], (X[va], Y[va]))
        weights = {}
        if sample_weight is not None:  # non-negative, one per row, not all zero (scikit-learn's check)
            w = _check_sample_weight(sample_weight, X, dtype=np.float32, ensure_non_negative=True)
            weights["sample_weight"] = w if va is None else w[tr]
            val = val if va is None or not w[va].any() else (*val, w[va])
        self._compile(X.shape[1], fit_X.mean(axis=0), fit_X.var(axis=0), len(fit_X))
        hist = keras_fit(self.model_, fit_X, fit_Y, validation_data=val, epochs=self.epochs,
                         batch_size=self._batch_size(len(fit_X)), callbacks=self._callbacks(val is not None),
                         verbose=self.verbose, shuffle=True, **weights)
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

    def onnx_proba(self, g, x):
        """This head in an exported graph (:mod:`stacker.io.export`), layer by layer (inference: no dropout,
        batch norm from its moving statistics), rows normalised as :meth:`predict_proba` does."""
        return g.normalise_rows(onnx_layers(self.model_, g, x))

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


def onnx_layers(model, g, x):
    """A head built by :meth:`DenseClassifier._build` (also inside a fine-tuned network) as ONNX ops on ``x``."""
    for layer in model.layers:
        x = _onnx_layer(layer, g, x)
    return x


def _onnx_layer(layer, g, x):
    """One layer of a head built by :meth:`DenseClassifier._build` as ONNX ops (a refusal for anything else)."""
    import keras

    from stacker.io.onnx_builder import ExportError

    kind = type(layer).__name__
    w = {v.path.split("/")[-1]: np.asarray(v.numpy(), np.float64) for v in layer.weights}
    if kind in ("InputLayer", "Dropout"):
        return x
    if kind == "Normalization":  # (x - mean) / max(sqrt(variance), epsilon)
        mean, var = np.asarray(layer.mean, np.float64).reshape(1, -1), np.asarray(layer.variance, np.float64).reshape(1, -1)
        return g.op("Div", g.op("Sub", x, g.const(mean)), g.const(np.maximum(np.sqrt(var), keras.config.epsilon())))
    if kind == "BatchNormalization":
        scale = w.get("gamma", 1.0) / np.sqrt(w["moving_variance"] + layer.epsilon)
        shift = w.get("beta", 0.0) - w["moving_mean"] * scale
        return g.op("Add", g.op("Mul", x, g.const(np.reshape(scale, (1, -1)))), g.const(np.reshape(shift, (1, -1))))
    if kind == "Dense":
        x = g.matmul_add(x, w["kernel"], w.get("bias"), "dense")
        activation = keras.activations.serialize(layer.activation)
        activation = activation if isinstance(activation, str) else activation.get("config", {}).get("name", activation)
        if activation in ("relu", "softmax", "linear"):
            return {"relu": lambda v: g.op("Relu", v), "softmax": g.softmax, "linear": lambda v: v}[activation](x)
        raise ExportError(f"dense head layer {layer.name}", f"activation {activation!r} is not exported")
    raise ExportError(f"dense head layer {layer.name}", f"a {kind} layer is not exported")


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


register_format("DenseClassifier", DenseClassifier)
