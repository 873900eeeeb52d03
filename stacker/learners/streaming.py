"""Out-of-core models: the zoo's models fitted on cached rows read a window at a time.

Above a size threshold (or with ``Ensemble(out_of_core=True)``) the extractor hands out
:class:`~stacker.features.rows.CachedRows` instead of arrays, read one window of file rows
at a time when a model asks. Only what truly grows with the number of images stays in
memory: labels, folds and probabilities.

Models that need every row at once get streaming equivalents that make a fixed number
of passes over the windows (:data:`STREAMING_MODELS`):

- ``logistic``: :class:`StreamingLogistic`, standardised multinomial logistic regression
  fitted by seeded mini-batch Adam (one statistics pass, then a few epochs);
- ``prototype``: :class:`StreamingPrototype`, the same estimator as
  :class:`stacker.learners.zoo.PrototypeClassifier`, computed in three passes;
- ``dense``, ``resnet`` and any :class:`~stacker.learners.dense.DenseClassifier`:
  :class:`StreamingDense`, the same Keras head trained on batches that Keras reads from
  one window of cached rows at a time.

They accept NumPy arrays as well (read in windows of positions instead of file rows).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import sys

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from stacker.features import rows as _rows
from stacker.features.rows import CachedRows, blocks
from stacker.learners.dense import DenseClassifier
from stacker.learners.keras_fit import keras_fit
from stacker.learners.zoo import MODELS, PrototypeClassifier, make_model, unit_rows
from stacker.io.persist import register_format, trusted

__all__ = ["StreamingLogistic", "StreamingPrototype", "StreamingDense", "STREAMING_MODELS", "streaming_model",
           "streaming_code"]


def _predict_rows(X, fn, k: int) -> np.ndarray:
    out = np.empty((len(X), k))
    for pos, rows in blocks(X):
        out[pos] = fn(rows)
    return out


def _labels(y):
    classes, y_idx = np.unique(np.asarray(y), return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"need at least two classes to train a classifier; got {len(classes)}")
    return classes, y_idx


@trusted
class StreamingLogistic(ClassifierMixin, BaseEstimator):
    """Standardised multinomial logistic regression by seeded mini-batch Adam, a window at a time.

    The streaming stand-in for ``logistic`` (``LogisticRegressionCV`` needs every row in
    memory). One pass computes the standardisation, then ``epochs`` passes train.

    Parameters
    ----------
    alpha : float
        L2 penalty per row.
    epochs : int or None
        Passes over the rows; None: enough for about 300,000 row visits (3 to 30).
    batch_size : int
    learning_rate : float
    random_state : int

    Attributes
    ----------
    classes_, mean_, scale_, coef_ (d, k), intercept_ (k,), n_features_in_
    """

    def __init__(self, alpha=1e-4, epochs=None, batch_size=256, learning_rate=1e-3, random_state=0):
        self.alpha = alpha
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.random_state = random_state

    def fit(self, X, y):
        self.classes_, y_idx = _labels(y)
        n, d, k = len(y_idx), X.shape[1], len(self.classes_)
        self.n_features_in_ = d
        s1, s2 = np.zeros(d), np.zeros(d)
        for _, rows in blocks(X, np.float64):
            s1 += rows.sum(axis=0)
            s2 += np.square(rows).sum(axis=0)
        self.mean_ = s1 / n
        self.scale_ = np.sqrt(np.maximum(s2 / n - self.mean_ ** 2, 0.0))
        self.scale_[self.scale_ < 1e-12] = 1.0
        W, b = np.zeros((d, k)), np.zeros(k)
        adam = _Adam([W, b], self.learning_rate)
        grad_W, decay = np.empty_like(W), np.empty_like(W)  # written in place every step
        epochs = self.epochs or int(np.clip(np.ceil(300_000 / n), 3, 30))
        for epoch in range(epochs):
            for pos, rows in blocks(X, seed=self.random_state * 1009 + epoch):
                Z = (rows - self.mean_) / self.scale_
                for s in range(0, len(pos), self.batch_size):
                    z, t = Z[s : s + self.batch_size], y_idx[pos[s : s + self.batch_size]]
                    G = softmax(z @ W + b, axis=1)
                    G[np.arange(len(t)), t] -= 1.0
                    G /= len(t)
                    np.matmul(z.T, G, out=grad_W)  # z.T @ G + alpha * W
                    grad_W += np.multiply(W, self.alpha, out=decay)
                    adam.step([grad_W, G.sum(axis=0)])
        self.coef_, self.intercept_ = W, b
        return self

    def _proba(self, rows):
        return softmax(((rows - self.mean_) / self.scale_) @ self.coef_ + self.intercept_, axis=1)

    def onnx_proba(self, g, x):
        """This model in an exported graph (:mod:`stacker.io.export`)."""
        x = g.op("Div", g.op("Sub", x, g.const(self.mean_[None])), g.const(self.scale_[None]))
        return g.softmax(g.matmul_add(x, self.coef_, self.intercept_, "streaming_logistic"))

    def predict_proba(self, X):
        check_is_fitted(self, "coef_")
        return _predict_rows(X, self._proba, len(self.classes_))

    def predict(self, X):
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


class _Adam:
    """Adam on a list of arrays, updated in place (deterministic, no framework).

    Each step writes into two scratch arrays per parameter: at a thousand classes the
    weights are 1,280 x 1,000, and fresh temporaries for every step cost more than the
    batch's matrix products (the operations, and so the numbers, are the textbook ones).
    """

    def __init__(self, params, lr, b1=0.9, b2=0.999, eps=1e-8):
        self.params, self.lr, self.b1, self.b2, self.eps = params, lr, b1, b2, eps
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.scratch = [(np.empty_like(p), np.empty_like(p)) for p in params]
        self.t = 0

    def step(self, grads):
        self.t += 1
        c1, c2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
        for p, g, m, v, (a, b) in zip(self.params, grads, self.m, self.v, self.scratch):
            m *= self.b1
            m += np.multiply(g, 1 - self.b1, out=a)
            v *= self.b2
            v += np.multiply(np.square(g, out=a), 1 - self.b2, out=a)
            np.sqrt(np.divide(v, c2, out=a), out=a)  # p -= lr * (m / c1) / (sqrt(v / c2) + eps)
            a += self.eps
            np.multiply(np.divide(m, c1, out=b), self.lr, out=b)
            p -= np.divide(b, a, out=b)


def _chunked_nll(S, y_idx, chunk: int = _rows.WINDOW):
    """``log_s -> mean -log softmax(exp(log_s) * S)[y]``, computed ``chunk`` rows at a time.

    The whole-matrix expression makes four ``(n, k)`` temporaries per call: 256 MB at
    800,000 rows of ten classes, the largest allocation of an out-of-core fit. Each chunk
    is worked in one buffer, and only the true class's log-probability is formed (scipy's
    ``log_softmax`` numbers; ``max(s S)`` is ``s max(S)`` exactly, for ``s > 0``).
    """
    top = S.max(axis=1)
    buffer = np.empty((min(chunk, len(S)), S.shape[1]))

    def nll(log_s):
        total, scale = 0.0, np.exp(log_s)
        for a in range(0, len(S), chunk):
            t = y_idx[a:a + chunk]
            z = np.multiply(S[a:a + chunk], scale, out=buffer[:len(t)])
            z -= (top[a:a + chunk] * scale)[:, None]
            true = z[np.arange(len(t)), t]
            total += float((true - np.log(np.exp(z, out=z).sum(axis=1))).sum())
        return -total / len(S)

    return nll


@trusted
class StreamingPrototype(PrototypeClassifier):
    """:class:`~stacker.learners.zoo.PrototypeClassifier` fitted in three passes (mean, prototypes, scale).

    Only the ``(n, n_classes)`` leave-one-out similarities are kept in memory.
    """

    def fit(self, X, y):
        self.classes_, y_idx = _labels(y)
        n, d, k = len(y_idx), X.shape[1], len(self.classes_)
        self.n_features_in_ = d
        total = np.zeros(d)
        for _, rows in blocks(X, np.float64):
            total += rows.sum(axis=0)
        self.mean_ = total / n if self.center else np.zeros(d)
        sums = np.zeros((k, d))
        for pos, rows in blocks(X, np.float64):
            sums += np.eye(k)[y_idx[pos]].T @ self._normalise(rows)
        counts = np.bincount(y_idx, minlength=k)[:, None].astype(float)
        self.prototypes_ = unit_rows(sums / counts)
        S = np.empty((n, k))
        for pos, rows in blocks(X, np.float64):
            U = self._normalise(rows)
            S[pos] = U @ self.prototypes_.T
            own = unit_rows(sums[y_idx[pos]] - U)
            S[pos, y_idx[pos]] = np.where(counts[y_idx[pos], 0] > 1, np.sum(U * own, axis=1), 0.0)
        self.scale_ = float(np.exp(minimize_scalar(_chunked_nll(S, y_idx), bounds=(-3.0, 8.0), method="bounded").x))
        return self

    def _normalise(self, X):
        X = X - self.mean_
        return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)

    def predict_proba(self, X):
        check_is_fitted(self, "prototypes_")
        return _predict_rows(X, lambda rows: np.exp(log_softmax(self.scale_ * (self._normalise(rows) @ self.prototypes_.T),
                                                                axis=1)), len(self.classes_))


def _moments(X) -> tuple[np.ndarray, np.ndarray]:
    """Column mean and (population) variance of an array or :class:`CachedRows`, a window at a time.

    Windows are merged with Chan et al.'s pairwise update, as accurate as one pass over
    all rows in memory.
    """
    n, mean, m2 = 0, np.zeros(X.shape[1]), np.zeros(X.shape[1])
    for _, rows in blocks(X, np.float64):
        b, b_mean = len(rows), rows.mean(axis=0)
        delta = b_mean - mean
        m2 += np.square(rows - b_mean).sum(axis=0) + np.square(delta) * n * b / (n + b)
        mean += delta * b / (n + b)
        n += b
    return mean, m2 / max(n, 1)


def _row_batches(X, y_idx, k: int, batch_size: int, seed=None):
    """A ``keras.utils.PyDataset`` of ``(rows, one-hot labels)`` batches holding one window of rows.

    With ``seed`` every epoch visits the windows in a new seeded order, rows shuffled
    within each (the order :meth:`CachedRows.windows` reads); without, in file order.
    Keras asks for batches in order, so each window is read from the cache once an epoch.
    """
    import keras

    sorted_pos = np.argsort(X.rows, kind="stable") if isinstance(X, CachedRows) else np.arange(len(X))
    spans = [sorted_pos[a:a + _rows.WINDOW] for a in range(0, len(sorted_pos), _rows.WINDOW)]

    class RowBatches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=1, use_multiprocessing=False)
            self.epoch, self.held = 0, (None, None)
            self._plan()

        def _plan(self):
            order = list(range(len(spans)))
            rng = None if seed is None else np.random.default_rng([seed, self.epoch])
            if rng is not None:
                order = list(rng.permutation(len(spans)))
            self.order = np.concatenate([spans[i] if rng is None else rng.permutation(spans[i]) for i in order])
            self.window_of = np.concatenate([np.full(len(spans[i]), i) for i in order])

        def __len__(self):
            return int(np.ceil(len(sorted_pos) / batch_size))

        def _rows(self, window: int, pos: np.ndarray) -> np.ndarray:
            if self.held[0] != window:  # one read per window: its rows in file order
                held = spans[window]
                values = _rows.read_file_rows(X.path, X.rows[held]) if isinstance(X, CachedRows) else X[held]
                self.held = (window, np.asarray(values, dtype=np.float32), np.argsort(held), held)
            _, values, by_pos, held = self.held
            return values[by_pos[np.searchsorted(held, pos, sorter=by_pos)]]

        def __getitem__(self, i):
            pos = self.order[i * batch_size:(i + 1) * batch_size]
            windows = self.window_of[i * batch_size:(i + 1) * batch_size]
            rows = np.empty((len(pos), X.shape[1]), np.float32)
            for w in np.unique(windows):  # a batch at the seam of two windows reads both
                rows[windows == w] = self._rows(int(w), pos[windows == w])
            return rows, np.eye(k, dtype=np.float32)[y_idx[pos]]

        def on_epoch_end(self):
            self.epoch += 1
            self._plan()

    return RowBatches()


class StreamingDense(DenseClassifier):
    """:class:`~stacker.learners.dense.DenseClassifier` trained on rows read from the cache a window at a time.

    The same network, standardisation (its mean and variance computed in one streaming
    pass), stratified validation split, early stopping and batch size; Keras reads its
    batches from a ``PyDataset`` that holds one window of rows (:func:`_row_batches`),
    visiting windows in a seeded order each epoch. Arrays are fitted as by the parent.
    Saved and loaded as a ``DenseClassifier``.
    """

    def fit(self, X, y):
        if not isinstance(X, CachedRows):
            return super().fit(X, y)
        import keras

        y_idx = self._classes(np.asarray(y))
        self.n_features_in_ = X.shape[1]
        keras.utils.set_random_seed(int(self.random_state))
        tr, va = self._holdout(y_idx)
        self._compile(X.shape[1], *_moments(X[tr]), len(tr))
        k, batch_size = len(self.classes_), self._batch_size(len(tr))
        train = _row_batches(X[tr], y_idx[tr], k, batch_size, seed=int(self.random_state))
        val = None if va is None else _row_batches(X[va], y_idx[va], k, batch_size)
        hist = keras_fit(self.model_, train, validation_data=val, epochs=self.epochs,
                         callbacks=self._callbacks(val is not None), verbose=self.verbose)
        self.history_ = {key: [float(v) for v in vs] for key, vs in hist.history.items()}
        return self

    def predict_proba(self, X):
        if not isinstance(X, CachedRows):
            return super().predict_proba(X)
        return _predict_rows(X, super().predict_proba, len(self.classes_))


STREAMING_MODELS = {
    "logistic": lambda random_state: StreamingLogistic(random_state=random_state),
    "prototype": lambda random_state: StreamingPrototype(),
}


def streaming_model(item, random_state: int = 0):
    """The out-of-core estimator standing in for a model entry.

    A name of :data:`STREAMING_MODELS`, or any entry that makes a plain
    :class:`~stacker.learners.dense.DenseClassifier` (``dense``, ``resnet``, an instance):
    its streaming twin with the same parameters. Anything else is refused.
    """
    if isinstance(item, str) and item in STREAMING_MODELS:
        return STREAMING_MODELS[item](random_state)
    if (isinstance(item, str) and item in MODELS) or isinstance(item, DenseClassifier):
        est = make_model(item, random_state)
        if type(est) in (DenseClassifier, StreamingDense):
            return StreamingDense(**est.get_params())
    raise ValueError(f"model {item if isinstance(item, str) else type(item).__name__!r} needs every row in memory; "
                     f"out-of-core ensembles fit {sorted(STREAMING_MODELS) + ['dense', 'resnet']} "
                     "(or pass out_of_core=False)")


@functools.lru_cache(maxsize=None)
def streaming_code() -> str:
    """Hash of this module and of the row reader (its windows fix the seeded batch order).

    Learner results of other streaming code are not reused.
    """
    source = inspect.getsource(sys.modules[__name__]) + inspect.getsource(_rows)
    return hashlib.sha256(source.encode()).hexdigest()[:16]


register_format("StreamingDense", StreamingDense)
