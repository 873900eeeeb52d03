"""Level 2's arrays: the stacked input matrix, rows a block at a time, aligned columns, and their score.

Everything in level 2 works row by row, so it runs on blocks of rows (:func:`row_blocks`):
the numbers of one call over all rows, with temporaries bounded by :data:`BLOCK_VALUES`
values (at most :data:`ROW_BLOCK` rows). The stacked input is a :class:`StackedBlocks`
(no concatenated copy of the learners' out-of-fold probabilities) or a plain matrix.
Out-of-fold probabilities past :data:`OOF_FLOAT64_VALUES` values are float32
(:func:`oof_dtype`). Learners, the ensemble and the report score probabilities with
:func:`score` and put an estimator's columns in class-index order with :func:`align_proba`.
"""

from __future__ import annotations

import numpy as np

__all__ = ["BLOCK_VALUES", "EPS", "META_INPUTS", "OOF_FLOAT64_VALUES", "ROW_BLOCK", "StackedBlocks", "align_proba",
           "meta_matrix", "oof_dtype", "pick", "predict_rows", "row_blocks", "score", "score_blocks", "spread_rows",
           "take_rows"]

META_INPUTS = ("proba", "features", "both")  # what level 2 sees: the learners' probabilities, features, or both
EPS = 1e-8  # probabilities are clipped to this before a log
ROW_BLOCK = 1 << 16  # rows per block where level 2 works row by row: bounded temporaries at a million rows
BLOCK_VALUES = 1 << 22  # values per block: wide rows (four learners of 1,000 classes) make blocks of 1,048 rows
# out-of-fold probabilities of more values are float32 (the precision level 2 reads anyway): a float64
# array of 100,000 rows of 1,000 classes is 800 MB, and level 2 holds one per learner and candidate
OOF_FLOAT64_VALUES = 1 << 25
SORT_CLASSES = 256  # top-5 accuracy sorts rows up to this many classes (a partition past it)


def row_blocks(n: int, width: int = 1):
    """Slices covering ``range(n)``: at most :data:`ROW_BLOCK` rows, and :data:`BLOCK_VALUES` values of ``width``."""
    step = min(ROW_BLOCK, max(1, BLOCK_VALUES // max(int(width), 1)))
    return [slice(s, min(s + step, n)) for s in range(0, n, step)]


def spread_rows(n: int, most: int) -> np.ndarray:
    """All ``n`` row numbers, or ``most`` of them spread evenly (classes in proportion where rows are sorted by class).

    What a fit of a few parameters reads past a budget of values (a thousand classes).
    """
    if n <= most:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max(int(most), 1)).astype(np.int64))


def oof_dtype(n: int, k: int):
    """The dtype of ``(n, k)`` out-of-fold probabilities: float64, or float32 past :data:`OOF_FLOAT64_VALUES`."""
    return np.float64 if n * k <= OOF_FLOAT64_VALUES else np.float32


class StackedBlocks:
    """``[B_1 | B_2 | ...]`` as one ``(n, columns)`` matrix that is never concatenated.

    Level 2's input at a thousand classes: four learners' out-of-fold probabilities of
    100,000 rows are 1.6 GB in float32, and a concatenated copy would double that.
    ``Z[rows]`` is another view (no copy); ``np.asarray`` gathers the rows into one
    ``dtype`` matrix, which level 2 does a block of rows at a time (:func:`take_rows`).

    Parameters
    ----------
    blocks : list of ndarray
        ``(n, w_i)`` each, same ``n``.
    rows : ndarray of int, optional
        The rows of the blocks this view holds (default: all, in order).
    dtype : dtype
        What gathered rows are (level 2's inputs are float32).
    """

    ndim = 2

    def __init__(self, blocks, rows=None, dtype=np.float32):
        self.blocks = list(blocks)
        self.rows = rows
        self.dtype = np.dtype(dtype)
        self._starts = np.cumsum([0] + [b.shape[1] for b in self.blocks])

    @property
    def shape(self) -> tuple:
        n = len(self.blocks[0]) if self.rows is None else len(self.rows)
        return (n, int(self._starts[-1]))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index):
        if isinstance(index, tuple):
            raise TypeError("StackedBlocks selects rows only (Z[rows]); gather them with np.asarray for columns")
        rows = np.arange(len(self)) if self.rows is None else self.rows
        picked = rows[index]
        if np.ndim(picked) == 0:  # one row, as a row of the concatenated matrix
            return np.asarray(StackedBlocks(self.blocks, np.array([picked]), self.dtype))[0]
        return StackedBlocks(self.blocks, picked, self.dtype)

    def __array__(self, dtype=None, copy=None):
        out = np.empty(self.shape, dtype or self.dtype)
        for block, a, b in zip(self.blocks, self._starts[:-1], self._starts[1:]):
            out[:, a:b] = block if self.rows is None else block[self.rows]
        return out

    def pick(self, cols) -> np.ndarray:
        """Row ``i``'s value in column ``cols[i]``, for every row (in the blocks' own dtype)."""
        cols = np.asarray(cols)
        rows = np.arange(len(self)) if self.rows is None else self.rows
        out = np.empty(len(cols), np.result_type(*self.blocks))
        for block, a, b in zip(self.blocks, self._starts[:-1], self._starts[1:]):
            mine = (cols >= a) & (cols < b)
            out[mine] = block[rows[mine], cols[mine] - a]
        return out


def pick(Z, cols) -> np.ndarray:
    """``Z[i, cols[i]]`` for every row ``i`` of a matrix or :class:`StackedBlocks` (no copy of ``Z``)."""
    if isinstance(Z, StackedBlocks):
        return Z.pick(cols)
    return np.asarray(Z)[np.arange(len(Z)), cols]


def take_rows(Z, rows, copy: bool = False) -> np.ndarray:
    """Rows of a matrix or :class:`StackedBlocks` as an array (a block's worth: level 2 reads no more at once).

    ``copy``: never a view of ``Z`` (a slice of a matrix is one otherwise).
    """
    part = np.asarray(Z[rows])
    return part.copy() if copy and isinstance(Z, np.ndarray) and np.may_share_memory(part, Z) else part


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


def predict_rows(est, Z, k: int, rows=None, dtype=np.float64) -> np.ndarray:
    """``est``'s probabilities ``(len(rows), k)`` in class-index order, a block of rows at a time.

    Every combiner works row by row, so the blocks give the numbers of one call, without
    a call's temporaries for all rows at once (a float64 copy of the stacked inputs is
    320 MB at a million rows of four learners and ten classes). ``Z`` is a matrix or a
    :class:`StackedBlocks`.
    """
    rows = np.arange(len(Z)) if rows is None else np.asarray(rows)
    out = np.empty((len(rows), k), dtype)
    for block in row_blocks(len(rows), Z.shape[1]):
        out[block] = align_proba(est, est.predict_proba(take_rows(Z, rows[block])), k)
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


def score(y, proba, k, sample_weight=None) -> dict:
    """Accuracy and log loss (and top-5 accuracy past 5 classes) of probabilities ``(n, k)``.

    Rows are clipped to [1e-15, 1] and renormalised; the log loss is scikit-learn's
    (``log_loss`` clips to the dtype's eps), computed a block of rows at a time.
    ``sample_weight``: weighted means (with class-balanced weights the accuracy is the balanced accuracy).
    """
    y = np.asarray(y)
    proba = np.asarray(proba)
    if proba.ndim != 2 or proba.shape[1] != k or len(proba) != len(y):
        raise ValueError(f"probabilities of shape {proba.shape} for {len(y)} labels of {k} classes")
    return score_blocks(y, ((b, proba[b]) for b in row_blocks(len(y), k)), k, proba.dtype, sample_weight)


def _top5(p) -> np.ndarray:
    """Each row's five most probable classes: sorted rows up to :data:`SORT_CLASSES` classes, else a
    partition (the same five, save ties at the fifth place; a sort of 1,000 columns costs 10x more)."""
    if p.shape[1] <= SORT_CLASSES:
        return np.argsort(-p, axis=1)[:, :5]
    return np.argpartition(-p, 4, axis=1)[:, :5]


def score_blocks(y, parts, k, dtype=np.float64, sample_weight=None) -> dict:
    """:func:`score` of probabilities given a block at a time: ``parts`` yields ``(rows, proba[rows])``.

    What level 2 scores without holding all rows' probabilities (permutation importance,
    a calibration's out-of-fold outputs); ``dtype`` is what they would be stored as (float32
    scores in float32, as scikit-learn does).
    """
    y = np.asarray(y)
    hit, log_p = np.empty(len(y), dtype=bool), np.empty(len(y), dtype=np.result_type(dtype, np.float32))
    top5 = np.empty(len(y), dtype=bool) if k > 5 else None
    for b, part in parts:
        p = np.clip(np.asarray(part).astype(dtype, copy=False), 1e-15, 1.0)
        p = p / p.sum(axis=1, keepdims=True)
        eps = np.finfo(p.dtype).eps
        hit[b] = p.argmax(1) == y[b]
        log_p[b] = np.log(np.clip(p[np.arange(len(p)), y[b]], eps, 1 - eps))
        if top5 is not None:
            top5[b] = (_top5(p) == y[b][:, None]).any(axis=1)
    w = sample_weight
    out = {"accuracy": float(np.average(hit, weights=w)), "log_loss": float(np.average(-log_p, weights=w))}
    if top5 is not None:
        out["top5_accuracy"] = float(np.average(top5, weights=w))
    return out
