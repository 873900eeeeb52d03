"""Level 2's arrays: the stacked input matrix, rows a block at a time, aligned columns, and their score.

Everything in level 2 works row by row, so it runs on blocks of :data:`ROW_BLOCK` rows
(:func:`row_blocks`): the numbers of one call over all rows, with temporaries bounded at a
million rows. Learners, the ensemble and the report score probabilities with :func:`score`
and put an estimator's columns in class-index order with :func:`align_proba`.
"""

from __future__ import annotations

import numpy as np

__all__ = ["EPS", "META_INPUTS", "ROW_BLOCK", "align_proba", "meta_matrix", "predict_rows", "row_blocks", "score"]

META_INPUTS = ("proba", "features", "both")  # what level 2 sees: the learners' probabilities, features, or both
EPS = 1e-8  # probabilities are clipped to this before a log
ROW_BLOCK = 1 << 16  # rows per block where level 2 works row by row: bounded temporaries at a million rows


def row_blocks(n: int):
    """Slices of at most :data:`ROW_BLOCK` rows covering ``range(n)``."""
    return [slice(s, min(s + ROW_BLOCK, n)) for s in range(0, n, ROW_BLOCK)]


def align_proba(est, proba, k: int) -> np.ndarray:
    """An estimator's probability columns in class-index order (missing classes get 0).

    A model fitted on a fold that lacks a class has fewer columns than ``k``; its
    ``classes_`` say which they are.
    """
    proba = np.asarray(proba, dtype=np.float64)
    classes = np.asarray(getattr(est, "classes_", np.arange(proba.shape[1])))
    if proba.shape[1] == k and np.array_equal(classes, np.arange(k)):
        return proba
    out = np.zeros((len(proba), k))
    out[:, classes.astype(int)] = proba
    return out


def predict_rows(est, Z, k: int, rows=None) -> np.ndarray:
    """``est``'s probabilities ``(len(rows), k)`` in class-index order, a block of rows at a time.

    Every combiner works row by row, so the blocks give the numbers of one call, without
    a call's temporaries for all rows at once (a float64 copy of the stacked inputs is
    320 MB at a million rows of four learners and ten classes).
    """
    rows = np.arange(len(Z)) if rows is None else np.asarray(rows)
    out = np.empty((len(rows), k))
    for block in row_blocks(len(rows)):
        out[block] = align_proba(est, est.predict_proba(Z[rows[block]]), k)
    return out


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
