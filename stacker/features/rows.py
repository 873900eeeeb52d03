"""Cached feature rows as lazy matrices, for work that must not hold every row in memory.

A million images times 1,280 float32 features is 5 GB per backbone. Above a size
threshold (or with ``Ensemble(out_of_core=True)``) the extractor hands out
:class:`CachedRows` instead of arrays: the row numbers of the training images in the
cache file, read one window of file rows at a time when a model asks
(:mod:`stacker.learners.streaming` has the models that read them).
"""

from __future__ import annotations

import numpy as np
from filelock import FileLock

from stacker.features.cache import read_rows
from stacker.features.layout import LOCK_SUFFIX

__all__ = ["CachedRows", "WINDOW", "OUT_OF_CORE_BYTES", "use_out_of_core", "blocks", "read_file_rows"]


WINDOW = 8192  # rows read at a time: 8192 x 1,280 float16 is 21 MB (contiguous when dense)


OUT_OF_CORE_BYTES = 4 << 30  # "auto": stream once the float32 training features of all sources pass 4 GiB


def use_out_of_core(setting, n_rows: int, row_dims) -> bool:
    """Whether an ensemble streams its features: ``True``/``False``, or ``"auto"`` by size."""
    if setting == "auto":
        return n_rows * sum(int(d) for d in row_dims) * 4 > OUT_OF_CORE_BYTES
    return bool(setting)


class CachedRows:
    """A lazy ``(n, dim)`` matrix: rows ``rows`` of a cached HDF5 feature file, read on demand.

    Indexing with a slice, mask or index array gives another lazy view; ``np.asarray``
    reads every row (what an in-memory model does); :meth:`windows` reads one window of
    file rows at a time. Rows below the file's ``n_complete`` are never rewritten, so a
    view stays valid while other processes append.
    """

    ndim = 2

    def __init__(self, path: str, rows, dim: int, dtype):
        self.path = path
        self.rows = np.asarray(rows, dtype=np.int64)
        self.dim = int(dim)
        self.dtype = np.dtype(dtype)

    @property
    def shape(self) -> tuple:
        return (len(self.rows), self.dim)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        if isinstance(index, tuple):
            raise TypeError("CachedRows selects rows only (X[rows]); read it with np.asarray first for columns")
        picked = self.rows[index]
        if picked.ndim == 0:
            return read_file_rows(self.path, np.array([picked]))[0]
        return CachedRows(self.path, picked, self.dim, self.dtype)

    def __array__(self, dtype=None, copy=None):
        out = np.empty(self.shape, self.dtype)
        for pos, X in self.windows(dtype=self.dtype):
            out[pos] = X
        return out if dtype is None else out.astype(dtype, copy=False)

    def windows(self, dtype=np.float32, seed=None):
        """``(positions, rows)`` per window of ``WINDOW`` rows in file order; ``seed`` shuffles both."""
        if not len(self.rows):
            return
        order = np.argsort(self.rows, kind="stable")
        sorted_rows = self.rows[order]
        spans = [(a, min(a + WINDOW, len(order))) for a in range(0, len(order), WINDOW)]
        rng = None if seed is None else np.random.default_rng(seed)
        if rng is not None:
            spans = [spans[i] for i in rng.permutation(len(spans))]
        for a, b in spans:
            pos, rows = order[a:b], sorted_rows[a:b]
            X = read_file_rows(self.path, rows).astype(dtype, copy=False)
            if rng is not None:
                shuffle = rng.permutation(len(pos))
                pos, X = pos[shuffle], X[shuffle]
            yield pos, X


def read_file_rows(path: str, sorted_rows: np.ndarray) -> np.ndarray:
    """Sorted rows of a feature file: one contiguous read when they are dense, else one read per run."""
    import h5py

    lo, hi = int(sorted_rows[0]), int(sorted_rows[-1]) + 1
    with FileLock(path + LOCK_SUFFIX), h5py.File(path, "r") as f:
        if hi > int(f.attrs["n_complete"]):
            raise KeyError(f"{path}: rows beyond the complete part of the cache")
        if hi - lo <= 2 * len(sorted_rows):
            return f["features"][lo:hi][sorted_rows - lo]
        uniq, inverse = np.unique(sorted_rows, return_inverse=True)
        return read_rows(f["features"], uniq)[inverse]


def blocks(X, dtype=np.float32, seed=None):
    """``(positions, rows)`` of an array or :class:`CachedRows`, a window at a time (seeded shuffle)."""
    if isinstance(X, CachedRows):
        yield from X.windows(dtype, seed)
        return
    X = np.asarray(X)
    rng = None if seed is None else np.random.default_rng(seed)
    starts = np.arange(0, len(X), WINDOW)
    if rng is not None:
        starts = starts[rng.permutation(len(starts))]
    for s in starts:
        pos = np.arange(s, min(s + WINDOW, len(X)))
        if rng is not None:
            pos = pos[rng.permutation(len(pos))]
        yield pos, np.asarray(X[pos], dtype=dtype)
