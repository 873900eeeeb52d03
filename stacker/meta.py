"""Meta-learners: the final classifier on the base learners' stacked outputs.

Inputs are chosen by ``meta_inputs``: ``"proba"`` (the base learners' out-of-fold
probabilities side by side, columns ``<learner>_p<k>``), ``"features"`` (the pooled
features) or ``"both"``. The meta-learner is ``"dense"`` (a small Keras net,
32 -> 8 -> classes with dropout and early stopping), ``"logistic"``, ``"mean"``
(plain averaging of the probabilities: the baseline every stack must beat), or any
scikit-learn classifier.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

from .learners import DenseClassifier, fresh_estimator

__all__ = ["MeanClassifier", "make_meta", "meta_matrix", "META_INPUTS"]

META_INPUTS = ("proba", "features", "both")


class MeanClassifier(ClassifierMixin, BaseEstimator):
    """Average of the base learners' probabilities (no learning beyond the class list).

    Parameters
    ----------
    n_learners : int
        How many probability blocks of ``n_classes`` columns the input holds.
    """

    def __init__(self, n_learners=1):
        self.n_learners = n_learners

    def fit(self, X, y):
        X = np.asarray(X, dtype=np.float64)
        self.classes_ = np.unique(y)
        k = len(self.classes_)
        if X.shape[1] != k * self.n_learners:
            raise ValueError(
                f"'mean' needs meta_inputs='proba': {X.shape[1]} columns are not {self.n_learners} blocks of {k}"
            )
        return self

    def predict_proba(self, X):
        check_is_fitted(self, "classes_")
        X = np.asarray(X, dtype=np.float64)
        k = len(self.classes_)
        return X.reshape(len(X), self.n_learners, k).mean(axis=1)

    def predict(self, X):
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


def make_meta(spec="dense", n_learners: int = 1, random_state: int = 0):
    """A fresh meta-learner from a name or a scikit-learn classifier."""
    if isinstance(spec, str):
        if spec == "dense":
            return DenseClassifier(hidden=(32, 8), dropout=0.2, patience=20, random_state=random_state)
        if spec == "logistic":
            return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
        if spec == "mean":
            return MeanClassifier(n_learners=n_learners)
        raise ValueError(f"unknown meta-learner {spec!r}; use 'dense', 'logistic', 'mean' or an estimator")
    return fresh_estimator(spec, random_state, "a meta-learner")


def meta_matrix(probas: list, features: list, meta_inputs: str) -> np.ndarray:
    """Concatenate base-learner probabilities and/or features into the meta-learner's input."""
    if meta_inputs not in META_INPUTS:
        raise ValueError(f"meta_inputs must be one of {META_INPUTS}, got {meta_inputs!r}")
    blocks = []
    if meta_inputs in ("proba", "both"):
        blocks += [np.asarray(p, dtype=np.float32) for p in probas]
    if meta_inputs in ("features", "both"):
        blocks += [np.asarray(f, dtype=np.float32) for f in features]
    return np.concatenate(blocks, axis=1)
