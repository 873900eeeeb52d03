"""HDF5 cache of pooled features, and a keyed store for learner outputs.

Features: one HDF5 file per *model key* (backbone config, weights checksum, input
size, preprocessing, pipeline code). Inside, one row per distinct image content: its
fingerprint (the BLAKE2b digest of the file's bytes, :mod:`stacker.data.fingerprint`), and
beside it, as data, the id, label and path it had when computed, and the pooled
feature vector. The same bytes under another path, name or machine find their row. Rows are appended
chunk by chunk as they are computed; the attribute ``n_complete`` moves forward only
after a chunk is flushed, so an interrupted run resumes from the last complete chunk
and a half-written chunk is never read. Any change to a key part gives another file;
any change to an image's bytes gives another fingerprint: stale features are never
served. Files are opened only under an inter-process lock, so two runs sharing a
cache wait for each other instead of corrupting it.

:class:`ResultStore` keeps small keyed results (out-of-fold probabilities, fold
models, test probabilities) in directories that appear atomically.

Where these files go in a cache folder and what they are called is
:mod:`stacker.features.layout`'s; this module reads and writes them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings

import h5py
import numpy as np
from filelock import FileLock

from stacker.features.layout import COMPLETE, CORRUPT_MARK, LOCK_SUFFIX, META, TMP_PREFIX, CacheLayout

__all__ = ["FeatureCache", "FeatureEntry", "ResultStore", "read_rows", "result_store"]

_FP_DTYPE = "S40"  # 160-bit hex content digests


class FeatureEntry:
    """The features of one model key: an HDF5 file of appended rows."""

    def __init__(self, path: str, meta: dict, dim: int, dtype: str = "float32"):
        self.path = path
        self.meta = meta
        self.dim = int(dim)
        self.dtype = np.dtype(dtype)
        self.lock = FileLock(path + LOCK_SUFFIX)
        self._index: dict | None = None
        self._index_n = -1

    # -- file handling -------------------------------------------------------------
    def _open(self, mode: str):
        try:
            return h5py.File(self.path, mode)
        except OSError as exc:
            if mode == "r" and not os.path.exists(self.path):
                raise
            bad = f"{self.path}{CORRUPT_MARK}{int(time.time())}"
            os.replace(self.path, bad)
            warnings.warn(f"feature cache {self.path} could not be opened ({exc}); moved to {bad}, starting afresh")
            return h5py.File(self.path, "a" if mode != "r" else "w")

    def _create(self, f) -> None:
        str_dt = h5py.string_dtype()
        f.create_dataset("fingerprints", (0,), maxshape=(None,), dtype=_FP_DTYPE, chunks=(4096,))
        f.create_dataset("features", (0, self.dim), maxshape=(None, self.dim), dtype=self.dtype,
                         chunks=(max(1, min(1024, (1 << 20) // max(1, self.dim * self.dtype.itemsize))), self.dim))
        for name in ("ids", "labels", "paths"):
            f.create_dataset(name, (0,), maxshape=(None,), dtype=str_dt, chunks=(4096,))
        f.attrs["meta"] = json.dumps(self.meta, sort_keys=True, default=str)
        f.attrs["n_complete"] = 0

    def n_complete(self) -> int:
        if not os.path.exists(self.path):
            return 0
        with self.lock, self._open("r") as f:
            return int(f.attrs.get("n_complete", 0))

    # -- reading ------------------------------------------------------------------
    def lookup(self, fingerprints) -> np.ndarray:
        """Row of each fingerprint in the file, or -1 where it is not cached."""
        if not os.path.exists(self.path):
            return np.full(len(fingerprints), -1, dtype=np.int64)
        with self.lock, self._open("r") as f:
            n = int(f.attrs.get("n_complete", 0))
            if self._index is None or self._index_n != n:
                fps = f["fingerprints"][:n]
                self._index = {fp.decode(): i for i, fp in enumerate(fps)}
                self._index_n = n
        return np.array([self._index.get(fp, -1) for fp in fingerprints], dtype=np.int64)

    def read(self, rows) -> np.ndarray:
        """Feature rows, in the order given (rows must be cached)."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return np.zeros((0, self.dim), dtype=self.dtype)
        if (rows < 0).any():
            raise KeyError("asked for features that are not cached")
        order = np.argsort(rows, kind="stable")
        uniq, inverse = np.unique(rows[order], return_inverse=True)
        with self.lock, self._open("r") as f:
            if uniq[-1] >= int(f.attrs["n_complete"]):
                raise KeyError("asked for rows beyond the complete part of the cache")
            data = read_rows(f["features"], uniq)
        out = np.empty((rows.size, self.dim), dtype=self.dtype)
        out[order] = data[inverse]
        return out

    # -- writing ------------------------------------------------------------------
    def timing(self) -> float | None:
        """Seconds per image the forward passes took when these features were computed."""
        if not os.path.exists(self.path):
            return None
        with self.lock, self._open("r") as f:
            n, sec = int(f.attrs.get("timed_rows", 0)), float(f.attrs.get("compute_seconds", 0.0))
        return sec / n if n else None

    def append(self, fingerprints, features, ids, labels, paths, seconds: float | None = None) -> None:
        """Append one complete chunk of rows; visible only once fully written.

        ``seconds``: wall time the chunk's decoding and forward passes took (kept for reports).
        """
        features = np.asarray(features)
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features of shape {features.shape} do not fit dim {self.dim}")
        if not np.isfinite(features).all():
            raise FloatingPointError("the backbone produced NaN/inf features; not caching them")
        k = len(fingerprints)
        with self.lock:
            with self._open("a") as f:
                if "features" not in f:
                    self._create(f)
                n = int(f.attrs["n_complete"])
                for name, values in (
                    ("fingerprints", np.array(fingerprints, dtype=_FP_DTYPE)),
                    ("features", features.astype(self.dtype)),
                    ("ids", [str(v) for v in ids]),
                    ("labels", ["" if v is None else str(v) for v in labels]),
                    ("paths", [str(v) for v in paths]),
                ):
                    ds = f[name]
                    ds.resize(n + k, axis=0)  # rows past n_complete from a killed run are overwritten
                    ds[n : n + k] = values
                f.flush()
                f.attrs["n_complete"] = n + k
                if seconds is not None:
                    f.attrs["compute_seconds"] = float(f.attrs.get("compute_seconds", 0.0)) + float(seconds)
                    f.attrs["timed_rows"] = int(f.attrs.get("timed_rows", 0)) + k
                f.flush()


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_rows(ds, rows: np.ndarray) -> np.ndarray:
    """Sorted unique rows of an HDF5 dataset, read as contiguous slices where they run together."""
    if rows.size == rows[-1] - rows[0] + 1:
        return ds[int(rows[0]) : int(rows[-1]) + 1]
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    parts = [ds[int(r[0]) : int(r[-1]) + 1] for r in np.split(rows, breaks)]
    return np.concatenate(parts, axis=0)


class FeatureCache:
    """A folder of :class:`FeatureEntry` files, one per model key.

    Parameters
    ----------
    directory : path-like
        Where the HDF5 files live (created when needed).
    """

    def __init__(self, directory):
        self.directory = os.fspath(directory)

    def entry(self, meta: dict, dim: int, dtype: str = "float32") -> FeatureEntry:
        """The file of the features with these key parts (its folder is created)."""
        path = CacheLayout(self.directory).feature_file(meta, dtype)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return FeatureEntry(path, meta, dim, dtype)

    def merge(self, sources) -> dict:
        """Copy into this cache the rows of other caches (e.g. shards made on other machines).

        Entries are matched by file name, which is the hash of their key (backbone, weights,
        size, code...), so only features of the same model meet; rows already here (same
        image fingerprint) are skipped. Returns ``{file name: rows added}``.
        """
        added: dict = {}
        for source in sources:
            folder = CacheLayout(source).features
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"{source} is not a stacker cache (no {os.path.basename(folder)}/ folder)")
            for name in sorted(os.listdir(folder)):
                if not name.endswith(".h5"):
                    continue
                path = os.path.join(folder, name)
                with FileLock(path + LOCK_SUFFIX), h5py.File(path, "r") as f:
                    n = int(f.attrs.get("n_complete", 0))
                    meta = json.loads(f.attrs["meta"])
                    dim, dtype = f["features"].shape[1], f["features"].dtype
                    seconds, timed = float(f.attrs.get("compute_seconds", 0.0)), int(f.attrs.get("timed_rows", 0))
                    rows = {k: f[k][:n] for k in ("fingerprints", "features", "ids", "labels", "paths")}
                target = self.entry(meta, dim, dtype.name)
                if os.path.basename(target.path) != name:
                    raise ValueError(f"{path}: its key does not match its file name; not merging it")
                fps = [fp.decode() for fp in rows["fingerprints"]]
                new = np.flatnonzero(target.lookup(fps) < 0)
                new = new[np.unique(np.array(fps, dtype=object)[new], return_index=True)[1]] if new.size else new
                new.sort()
                for start in range(0, new.size, 4096):
                    part = new[start : start + 4096]
                    target.append([fps[i] for i in part], rows["features"][part],
                                  *[[_text(v) for v in rows[k][part]] for k in ("ids", "labels", "paths")],
                                  seconds=seconds * part.size / timed if timed else None)
                added[name] = added.get(name, 0) + int(new.size)
        return added

    def entries(self) -> list[dict]:
        """Every feature file with its size, row count and key parts (for ``stacker cache ls``)."""
        folder = CacheLayout(self.directory).features
        out = []
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            if not name.endswith(".h5"):
                continue
            path = os.path.join(folder, name)
            try:
                with FileLock(path + LOCK_SUFFIX), h5py.File(path, "r") as f:
                    out.append({"file": path, "rows": int(f.attrs.get("n_complete", 0)),
                                "bytes": os.path.getsize(path), "meta": json.loads(f.attrs.get("meta", "{}"))})
            except OSError as exc:
                out.append({"file": path, "rows": None, "bytes": os.path.getsize(path), "error": str(exc)})
        return out


class ResultStore:
    """Keyed result directories that appear atomically (written aside, then renamed).

    ``store.get(key)`` is the directory of a complete result or None;
    ``with store.put(key, meta) as tmp:`` writes into ``tmp`` and publishes it on success,
    with ``meta`` (whose result it is: backbone, learner, code) as ``meta.json`` beside it
    for ``stacker cache`` to list and remove by owner.
    """

    def __init__(self, directory):
        self.directory = os.fspath(directory)

    def path(self, key: str) -> str:
        return os.path.join(self.directory, key)

    def get(self, key: str) -> str | None:
        p = self.path(key)
        return p if os.path.isfile(os.path.join(p, COMPLETE)) else None

    def put(self, key: str, meta: dict | None = None):
        return _AtomicDir(self.path(key), meta)


def result_store(cache_dir, kind: str) -> ResultStore | None:
    """The :class:`ResultStore` of one kind of result (:data:`stacker.features.layout.STORES`), None without a cache."""
    return ResultStore(CacheLayout(cache_dir).store(kind)) if cache_dir else None


class _AtomicDir:
    def __init__(self, final: str, meta: dict | None = None):
        self.final = final
        self.meta = meta

    def __enter__(self) -> str:
        parent = os.path.dirname(self.final)
        os.makedirs(parent, exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix=TMP_PREFIX, dir=parent)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        meta_path = os.path.join(self.tmp, META)
        if self.meta is not None and not os.path.exists(meta_path):
            with open(meta_path, "w") as f:
                json.dump(self.meta, f, indent=1, sort_keys=True, default=str)
        with open(os.path.join(self.tmp, COMPLETE), "w") as f:
            f.write("ok\n")
        if os.path.isfile(os.path.join(self.final, COMPLETE)):
            shutil.rmtree(self.tmp, ignore_errors=True)  # a concurrent writer published the same key first
            return False
        if os.path.isdir(self.final):
            shutil.rmtree(self.final, ignore_errors=True)  # a leftover of a killed run
        try:
            os.replace(self.tmp, self.final)
        except OSError:  # another writer won the race between the check and the rename
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False
