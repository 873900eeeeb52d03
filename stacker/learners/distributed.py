"""Ray as stacker's distributed engine (the optional ``ray`` extra).

Two kinds of work leave the driver:

- **Feature extraction** (:func:`fill_cache`): the driver fingerprints the images, asks
  the content-addressed cache which are missing, scans their headers and cuts the rest
  into chunks aligned on the batch size (so every image is computed in the very batch of
  a single-process run: bit-identical features). A pool of actors, one network each,
  computes the chunks; the driver appends each chunk to the cache as soon as it and the
  ones before it are back. A worker that dies is restarted and its chunk retried (only
  that chunk is computed again); a driver that dies loses at most the chunks in flight,
  and the next run starts from the cache.
- **Fold fitting** (:func:`run_folds`): every fold of a learner is a Ray task running the
  same seeded code as the sequential fit, through the same fold checkpoints in the cache,
  so the out-of-fold probabilities are those of a sequential run.

Workers import stacker and the ``$STACKER_PLUGINS`` modules (custom backbones) from the
``PYTHONPATH`` this process passes them; on a cluster, images and cache live on storage
every node mounts at the same path (see the README).
"""

from __future__ import annotations

import functools
import os
import threading
import time

import numpy as np

from stacker.backbones import registry as _backbones
from stacker.data import fingerprint as _fingerprint
from stacker.data.scan import scan_images
from stacker.data.sources import ImageSet
from stacker.features.cache import FeatureCache

__all__ = ["connect", "worker_env", "fill_cache", "run_folds", "ExtractReport"]

_ENV_VARS = ("STACKER_PLUGINS", "STACKER_ENGINE", "STACKER_WEIGHTS_DIR", "STACKER_TRUSTED_TYPES",
             "TF_CPP_MIN_LOG_LEVEL")
_RETRIES = 3


def _ray():
    try:
        import ray
    except ImportError:
        raise ImportError("the Ray executor needs Ray: pip install 'stacker[ray]' (or pip install 'ray[data]')") from None
    return ray


def worker_env(extra_paths=()) -> dict:
    """A Ray ``runtime_env`` giving workers this process's stacker, import path and plugins."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # what holds stacker/
    paths = list(extra_paths) + [here] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {name: os.environ[name] for name in _ENV_VARS if name in os.environ}
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return {"env_vars": env}


def connect(address=None, num_cpus=None, runtime_env=None):
    """Join the Ray cluster at ``address`` (None: ``$RAY_ADDRESS`` or a new local one) once per process."""
    ray = _ray()
    if not ray.is_initialized():
        ray.init(address=address, num_cpus=num_cpus if address is None else None,
                 runtime_env=runtime_env or worker_env(), include_dashboard=False, log_to_driver=False)
    return ray


# --------------------------------------------------------------------------- extraction


class ExtractReport(dict):
    """What one :func:`fill_cache` call did: ``cached``, ``computed``, ``chunks``, ``skipped``, ``workers``."""

    __getattr__ = dict.__getitem__


def _portable(ext) -> tuple:
    """An extractor as ``(class, state)`` without its network, lock or session (a worker builds its own)."""
    if ext.weights is None:
        raise ValueError(f"{ext.cfg.name}: Ray workers cannot rebuild randomly initialised weights (weights=None); "
                         "give a weights file or 'imagenet'")
    state = {k: v for k, v in ext.__dict__.items() if k not in ("_lock", "_forward", "_model", "_bottom", "_top")}
    state.update(verbose=0, _model=None, _forward=None)
    if "_bottom" in ext.__dict__:
        state["_bottom"] = None
    return type(ext), state


class _ExtractWorker:
    """A Ray actor holding one network: computes chunks of images the driver asks for."""

    def __init__(self, portable):
        _backbones.load_plugins()
        cls, state = portable
        self.ext = cls.__new__(cls)
        self.ext.__dict__.update(state)
        self.ext._lock = threading.RLock()

    def compute(self, chunk: ImageSet, batch_size: int):
        """``(rows, features, {row: reason}, seconds, pid)`` for every image of ``chunk``."""
        t0 = time.perf_counter()
        computed, bad = self.ext._compute(chunk, np.arange(len(chunk)), None, None, batch_size, "skip")
        rows = np.array(sorted(computed), dtype=np.int64)
        feats = np.stack([computed[r] for r in rows]) if rows.size else np.zeros((0, self.ext.row_dim()))
        return rows, feats, bad, time.perf_counter() - t0, os.getpid()


@functools.lru_cache(maxsize=None)
def _remote_worker():
    return _ray().remote(num_cpus=1, max_restarts=_RETRIES, max_task_retries=_RETRIES)(_ExtractWorker)


def _chunks(rows: np.ndarray, chunk_size: int, batch_size: int) -> list:
    """Consecutive pieces of ``rows``, each a whole number of batches (batches as in one process)."""
    step = max(1, -(-chunk_size // batch_size)) * batch_size
    return [rows[s : s + step] for s in range(0, rows.size, step)]


def fill_cache(ext, images, workers=None, chunk_size=None, batch_size=None, on_chunk=None) -> ExtractReport:
    """Compute on Ray the features of ``images`` that ``ext``'s cache lacks, appending them chunk by chunk.

    Parameters
    ----------
    ext : FeatureExtractor
        With a ``cache_dir`` on storage every worker reaches (the same path).
    images : ImageSet or list of paths
    workers : int, optional
        Actors (one network each); default: the cluster's CPUs.
    chunk_size, batch_size : int, optional
        Default: the extractor's. A chunk is the unit of work, retry and resume.
    on_chunk : callable, optional
        ``on_chunk(index, n_rows, pid)`` after each chunk is in the cache (progress).
    """
    if ext.cache_dir is None:
        raise ValueError("Ray extraction appends to the feature cache: give a cache_dir on shared storage")
    ray = connect()
    images = images if isinstance(images, ImageSet) else ImageSet(list(images), list(images))
    batch_size, chunk_size = int(batch_size or ext.batch_size), int(chunk_size or ext.chunk_size)
    fps, skipped = _fingerprint.fingerprints(images.paths, ext.cache_dir) if len(images) else ([], {})
    entry = FeatureCache(ext.cache_dir).entry(ext.key_meta(), ext.row_dim(), ext.feature_dtype)
    usable = [i for i in range(len(images)) if i not in skipped]
    found = entry.lookup([fps[i] for i in usable])
    first: dict = {}
    for i, hit in zip(usable, found):
        if hit < 0:
            first.setdefault(fps[i], i)
    todo = np.array(sorted(first.values()), dtype=np.int64)
    bad = {int(todo[i]): r for i, r in scan_images([images.paths[i] for i in todo])[1].items()}
    good = np.array([r for r in todo if int(r) not in bad], dtype=np.int64)
    pieces = _chunks(good, chunk_size, batch_size)
    report = ExtractReport(cached=int((found >= 0).sum()), computed=0, chunks=len(pieces), skipped=dict(bad),
                           workers=0)
    if not pieces:
        return report
    n_workers = int(workers or max(1, ray.cluster_resources().get("CPU", 1)))
    n_workers = min(n_workers, len(pieces))
    portable = _portable(ext)
    actors = [_remote_worker().remote(portable) for _ in range(n_workers)]
    report["workers"] = n_workers
    pool = ray.util.ActorPool(actors)
    try:
        results = pool.map(lambda a, rows: a.compute.remote(images.subset(rows), batch_size), pieces)
        for j, (rows_in_chunk, (local, feats, lost, seconds, pid)) in enumerate(zip(pieces, results)):
            rows = rows_in_chunk[local]
            if rows.size:
                entry.append([fps[r] for r in rows], feats, [images.ids[r] for r in rows],
                             [None if images.labels is None else images.labels[r] for r in rows],
                             [images.paths[r] for r in rows], seconds=seconds)
            report["skipped"].update({int(rows_in_chunk[r]): why for r, why in lost.items()})
            report["computed"] += int(rows.size)
            if on_chunk is not None:
                on_chunk(j, int(rows.size), pid)
    finally:
        for a in actors:
            ray.kill(a)
    return report


# --------------------------------------------------------------------------- folds


def _fit_fold(fits, i: int):
    fit = fits[i]
    return fit.learner._checkpointed(i, fit)


@functools.lru_cache(maxsize=None)
def _remote_fold():
    return _ray().remote(num_cpus=1, max_retries=_RETRIES)(_fit_fold)


def run_folds(learner, fits: list) -> list:
    """Fit a learner's folds as parallel Ray tasks (same seeds, same checkpoints as a sequential run)."""
    ray = connect()
    shared = ray.put(fits)  # the learner's inputs travel once, not once per fold
    return ray.get([_remote_fold().remote(shared, i) for i in range(len(fits))])
