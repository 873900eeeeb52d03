"""Ray as stacker's distributed engine (the optional ``ray`` extra).

Two kinds of work leave the driver, and neither needs a path the driver and the workers
share: the images are read where they are (local paths on one machine, object storage
such as ``s3://`` on a cluster), the cache lives on the driver, and everything else
travels through Ray's object store.

- **Feature extraction** (:func:`fill_cache`): the driver fingerprints the images, asks
  the content-addressed cache which are missing, scans their headers and cuts the rest
  into chunks aligned on the batch size (so every image is computed in the very batch of
  a single-process run: bit-identical features). A pool of actors, one network each,
  computes the chunks; the network's weights file travels once through the object store
  into each node's own cache folder (``$STACKER_CACHE_DIR`` of the node). The driver
  appends each chunk to its cache as soon as it and the ones before it are back (the
  file's rows in a single-process run's order: out-of-core fits read them in that order).
  A worker or node that dies loses only the chunk it was computing: that chunk goes to
  another worker (a replacement actor starts where there is room) and the chunks it
  finished are kept; a driver that dies loses at most the chunks in flight or waiting
  for an earlier one, and the next run starts from the cache.
- **Fold fitting** (:func:`run_folds`): the driver reads the fold checkpoints in its
  cache, sends only the missing folds to Ray as tasks running the same seeded code as the
  sequential fit, and checkpoints each fold as it comes back, so the out-of-fold
  probabilities are those of a sequential run and a fold finished before a crash is kept.

Actors and fold tasks take one CPU, and one GPU where the cluster has GPUs (the actors,
and fine-tuning folds: frozen-feature models do not use one). Workers import stacker and the
``$STACKER_PLUGINS`` modules (custom backbones) from the ``PYTHONPATH`` this process
passes them, with the environment of :func:`worker_env` (object-storage credentials
included, from this process's environment).
"""

from __future__ import annotations

import collections
import functools
import hashlib
import os
import threading
import time
import warnings

import numpy as np

from stacker.backbones import registry as _backbones
from stacker.data import fingerprint as _fingerprint
from stacker.data.cachedir import default_cache_dir
from stacker.data.scan import scan_images
from stacker.data.sources import ImageSet
from stacker.features.cache import FeatureCache

__all__ = ["connect", "worker_env", "fill_cache", "run_folds", "ExtractReport"]

_ENV_VARS = ("STACKER_PLUGINS", "STACKER_ENGINE", "STACKER_WEIGHTS_DIR", "STACKER_TRUSTED_TYPES",
             "TF_CPP_MIN_LOG_LEVEL",
             # object storage (s3://, gs://, az://): where the store is and which profile, never a secret
             # (a runtime_env is kept in Ray's control store): nodes take keys from their own configuration
             "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE",
             "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "GOOGLE_APPLICATION_CREDENTIALS",
             "AZURE_STORAGE_ACCOUNT_NAME")
_ENV_PREFIXES = ("FSSPEC_",)  # fsspec's configuration variables
_RETRIES = 3  # times one chunk or fold may be lost with its worker before the run fails
SHIPPED_WEIGHTS = "shipped_weights"  # in a worker node's cache folder: weight files sent by drivers
_STALL_S = 120.0  # warn when no worker has been up for this long while chunks wait


def _ray():
    try:
        import ray
    except ImportError:
        raise ImportError("the Ray executor needs Ray: pip install 'stacker[ray]' (or pip install 'ray[data]')") from None
    return ray


def worker_env(extra_paths=()) -> dict:
    """A Ray ``runtime_env`` giving workers this process's stacker, import path, plugins and storage settings.

    Where the object store is (``AWS_ENDPOINT_URL``, region, profile, credential file
    locations, ``FSSPEC_*``) is forwarded from this process's environment when set; keys
    and tokens are not (a ``runtime_env`` is stored in Ray's control store): each node
    reads them from its own configuration (an instance role, ``~/.aws``, its environment;
    the nodes of a local cluster inherit this process's). stacker never writes them anywhere.
    """
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # what holds stacker/
    paths = list(extra_paths) + [here] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {name: value for name, value in os.environ.items()
           if name in _ENV_VARS or name.startswith(_ENV_PREFIXES)}
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return {"env_vars": env}


def connect(address=None, num_cpus=None, runtime_env=None):
    """Join the Ray cluster at ``address`` (None: ``$RAY_ADDRESS`` or a new local one) once per process."""
    ray = _ray()
    if not ray.is_initialized():
        ray.init(address=address, num_cpus=num_cpus if address is None else None,
                 runtime_env=runtime_env or worker_env(), include_dashboard=False, log_to_driver=False)
    return ray


def _gpus(ray) -> float:
    return float(ray.cluster_resources().get("GPU", 0))


# --------------------------------------------------------------------------- extraction


class ExtractReport(dict):
    """What one :func:`fill_cache` call did.

    ``cached``, ``computed`` (images), ``chunks`` (sent), ``skipped`` ({row: reason}),
    ``workers`` (actors started first), ``retried`` (chunks sent again after their worker
    was lost), ``nodes`` ({Ray node id: images computed there}), ``startup_s`` (seconds from
    starting the actors until all of them had their network built; the first ones compute
    meanwhile) and ``seconds`` (the whole call).
    """

    __getattr__ = dict.__getitem__


def _portable(ext) -> tuple:
    """An extractor as ``(class, state, weights)`` without its network, lock or session (a worker builds its own).

    ``weights`` is ``(file name, bytes)`` of the weights file the network loads when
    there is one on this machine (a path, or ImageNet weights found offline), else None
    (a worker resolves ``"imagenet"`` itself). The workers never read this machine's paths.
    """
    if ext.weights is None:
        raise ValueError(f"{ext.cfg.name}: Ray workers cannot rebuild randomly initialised weights (weights=None); "
                         "give a weights file or 'imagenet'")
    ext.weights_id  # computed here, from the file here: the cache key workers need not recompute
    state = {k: v for k, v in ext.__dict__.items() if k not in ("_lock", "_forward", "_model", "_bottom", "_top", "base")}
    state.update(verbose=0, _model=None, _forward=None)
    if "base" in ext.__dict__:  # a view's extractor: the worker builds the network itself
        state["base"] = None
    if "_bottom" in ext.__dict__:
        state["_bottom"] = None
    source = _backbones.resolve_weights(ext.cfg, ext.weights, ext.weights_dir)
    blob = None
    if source is not None and source != "imagenet" and os.path.isfile(source):
        with open(source, "rb") as f:
            blob = (os.path.basename(source), f.read())
    return type(ext), state, blob


def _receive_weights(name: str, data: bytes, folder: str) -> str:
    """``data`` as ``folder/shipped_weights/<sha256>/<name>`` (written once per node, atomically)."""
    digest = hashlib.sha256(data).hexdigest()
    target = os.path.join(folder, SHIPPED_WEIGHTS, digest[:32], name)
    if not (os.path.isfile(target) and os.path.getsize(target) == len(data)):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{target}.{os.getpid()}.part"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    return target


class _ExtractWorker:
    """A Ray actor holding one network: computes chunks of images the driver asks for.

    Its cache folder (converted weights, ONNX exports, the weights file it was sent) is
    its node's own, ``$STACKER_CACHE_DIR`` there (:func:`stacker.data.cachedir.default_cache_dir`).
    """

    def __init__(self, portable):
        _backbones.load_plugins()
        cls, state, blob = portable
        self.ext = cls.__new__(cls)
        self.ext.__dict__.update(state)
        self.ext._lock = threading.RLock()
        self.ext.cache_dir = default_cache_dir()
        if blob is not None:
            self.ext.weights = _receive_weights(*blob, self.ext.cache_dir)
            self.ext.weights_dir = None
        self.node = _ray().get_runtime_context().get_node_id()

    def ready(self) -> str:
        """Build the network (so that a chunk's time is computing time); this worker's node id."""
        self.ext._network()
        return self.node

    def compute(self, chunk: ImageSet, batch_size: int):
        """``(rows, features, {row: reason}, seconds, pid, node)`` for every image of ``chunk``."""
        t0 = time.perf_counter()
        computed, bad = self.ext._compute(chunk, np.arange(len(chunk)), None, None, batch_size, "skip")
        rows = np.array(sorted(computed), dtype=np.int64)
        feats = np.stack([computed[r] for r in rows]) if rows.size else np.zeros((0, self.ext.row_dim()))
        return rows, feats, bad, time.perf_counter() - t0, os.getpid(), self.node


@functools.lru_cache(maxsize=None)
def _remote_worker():
    return _ray().remote(max_restarts=0, max_task_retries=0)(_ExtractWorker)


def _chunks(rows: np.ndarray, chunk_size: int, batch_size: int) -> list:
    """Consecutive pieces of ``rows``, each a whole number of batches (batches as in one process)."""
    step = max(1, -(-chunk_size // batch_size)) * batch_size
    return [rows[s : s + step] for s in range(0, rows.size, step)]


def _lost(ray, error) -> bool:
    """Whether ``error`` means the work was lost with its worker or node (so worth sending again)."""
    if isinstance(error, ray.exceptions.RayActorError):
        return not getattr(error, "actor_init_failed", False)  # an exception in __init__ would come back
    return isinstance(error, (ray.exceptions.ObjectLostError, ray.exceptions.WorkerCrashedError,
                              ray.exceptions.NodeDiedError))


def fill_cache(ext, images, workers=None, chunk_size=None, batch_size=None, on_chunk=None,
               num_gpus=None) -> ExtractReport:
    """Compute on Ray the features of ``images`` that ``ext``'s cache lacks, appending them chunk by chunk.

    Parameters
    ----------
    ext : FeatureExtractor
        With a ``cache_dir`` here, on the driver (workers need no access to it).
    images : ImageSet or list of paths
        Paths every worker can read: local files on one machine, object-storage URLs
        (``s3://...``) on a cluster without shared storage.
    workers : int, optional
        Actors (one network each); default: the cluster's GPUs where it has some, else its CPUs.
    chunk_size, batch_size : int, optional
        Default: the extractor's. A chunk is the unit of work, retry and resume.
    on_chunk : callable, optional
        ``on_chunk(index, n_rows, pid)`` after each chunk is in the cache (progress).
    num_gpus : float, optional
        GPUs per actor; default 1 where the cluster has GPUs, else 0.
    """
    if ext.cache_dir is None:
        raise ValueError("Ray extraction appends to the feature cache: give the extractor a cache_dir")
    t_start = time.perf_counter()
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
                           workers=0, retried=0, nodes={}, startup_s=None, seconds=None)
    if not pieces:
        report["seconds"] = time.perf_counter() - t_start
        return report
    cluster_gpus = _gpus(ray)
    per_gpu = (1.0 if cluster_gpus else 0.0) if num_gpus is None else float(num_gpus)
    per_actor = {"num_cpus": 1, "num_gpus": per_gpu}
    default = cluster_gpus / per_gpu if per_gpu else ray.cluster_resources().get("CPU", 1)
    n_workers = min(int(workers or max(1, default)), len(pieces))
    report["workers"] = n_workers
    portable = ray.put(_portable(ext))  # the weights travel once per node, not once per actor
    pool = _Pool(ray, portable, per_actor, budget=_RETRIES * n_workers)
    try:
        t_spawn, up = time.perf_counter(), 0
        for _ in range(n_workers):
            pool.spawn()
        queue, tries = collections.deque(range(len(pieces))), [0] * len(pieces)
        back, appended = {}, 0  # chunks back but not yet appended (a chunk before them is not), the next to append

        def dispatch():  # every idle worker gets the next chunk (before the driver appends one it got)
            while queue and pool.idle:
                j = queue.popleft()
                pool.submit(j, lambda a, j=j: a.compute.remote(images.subset(pieces[j]), batch_size))

        while queue or pool.busy:
            dispatch()
            j, result, error = pool.next(len(queue))
            if error is not None and j is None:  # lost before it was up: its replacement is on the way
                continue
            if error is not None:  # the worker (or its node) is gone: its chunk goes to another one
                tries[j] += 1
                if tries[j] > _RETRIES:
                    raise RuntimeError(f"chunk {j} of {len(pieces)} was lost with its worker {tries[j]} times; "
                                       "giving up") from error
                queue.appendleft(j)
                report["retried"] += 1
                continue
            if j is None:  # a worker is up
                up += 1
                if up == n_workers:
                    report["startup_s"] = time.perf_counter() - t_spawn
                continue
            dispatch()
            back[j] = result
            while appended in back:  # in order: the cache file's rows are a single-process run's
                local, feats, lost, seconds, pid, node = back.pop(appended)
                rows = pieces[appended][local]
                if rows.size:
                    entry.append([fps[r] for r in rows], feats, [images.ids[r] for r in rows],
                                 [None if images.labels is None else images.labels[r] for r in rows],
                                 [images.paths[r] for r in rows], seconds=seconds)
                report["skipped"].update({int(pieces[appended][r]): why for r, why in lost.items()})
                report["computed"] += int(rows.size)
                report["nodes"][node] = report["nodes"].get(node, 0) + int(rows.size)
                if on_chunk is not None:
                    on_chunk(appended, int(rows.size), pid)
                appended += 1
    finally:
        pool.close()
    report["seconds"] = time.perf_counter() - t_start
    return report


class _Pool:
    """Extraction actors the driver hands chunks to, one at a time each; lost ones are replaced.

    An actor is idle once its network is built (:meth:`_ExtractWorker.ready`). One that
    dies, or whose node does, is dropped, and a replacement is asked for; it starts
    wherever the cluster has room (perhaps on a node that joins later) and until then the
    other actors take the chunks.
    """

    def __init__(self, ray, portable, per_actor: dict, budget: int):
        self.ray, self.portable, self.per_actor, self.budget = ray, portable, per_actor, budget
        self.actors, self.idle, self.pending = [], [], {}  # pending: ObjectRef -> (actor, chunk or None)
        self.busy = 0

    def spawn(self) -> None:
        actor = _remote_worker().options(**self.per_actor).remote(self.portable)
        self.actors.append(actor)
        self.pending[actor.ready.remote()] = (actor, None)

    def submit(self, j: int, call) -> None:
        actor = self.idle.pop()
        self.pending[call(actor)] = (actor, j)
        self.busy += 1

    def next(self, waiting: int):
        """``(chunk or None, result, error)`` of the next call to finish (None: an actor came up)."""
        waited = 0.0
        while True:
            done, _ = self.ray.wait(list(self.pending), num_returns=1, timeout=10.0)
            if done:
                break
            waited += 10.0
            if waited >= _STALL_S and not self.idle and not self.busy:
                warnings.warn(f"no Ray worker with {self.per_actor} has started for {waited:.0f} s; "
                              f"{waiting} chunks wait for the cluster to have room", RuntimeWarning, stacklevel=3)
                waited = -1e9  # once
        actor, j = self.pending.pop(done[0])
        self.busy -= j is not None
        try:
            result = self.ray.get(done[0])
        except Exception as e:  # noqa: BLE001 - sorted just below: lost work is retried, errors raise
            if not _lost(self.ray, e):
                raise
            self._drop(actor, e)
            return j, None, e
        self.idle.append(actor)
        return j, result, None

    def _drop(self, actor, error) -> None:
        self.ray.kill(actor)
        self.actors.remove(actor)
        self.budget -= 1
        if self.budget < 0:
            raise RuntimeError("Ray extraction workers kept dying; giving up") from error
        self.spawn()

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)


# --------------------------------------------------------------------------- folds


def _fit_fold(fits, i: int):
    return fits[i]()  # no checkpoint here: the driver keeps them (workers share no path with it)


@functools.lru_cache(maxsize=None)
def _remote_fold():
    return _ray().remote(max_retries=_RETRIES)(_fit_fold)


def _fold_gpus(learner) -> int:
    """GPUs one fold fit takes where the cluster has them: fine-tuning trains a network, the others do not."""
    return int(getattr(learner, "fold_gpus", 1 if learner.kind == "finetuned" else 0))


def run_folds(learner, fits: list) -> list:
    """Fit a learner's folds as parallel Ray tasks (same seeds, same checkpoints as a sequential run).

    Folds already checkpointed in the driver's cache are read here; the others run on
    Ray, and each is checkpointed here as soon as it is back (a fold finished before a
    crash is not fitted again). A task lost with its node is run again elsewhere.
    """
    ray = connect()
    results = [learner._checkpoint(i) for i in range(len(fits))]
    missing = [i for i, r in enumerate(results) if r is None]
    if not missing:
        return results
    shared = ray.put(fits)  # the learner's inputs travel once, not once per fold
    gpus = _fold_gpus(learner) if _gpus(ray) else 0
    task = _remote_fold().options(num_cpus=1, num_gpus=gpus)
    pending = {task.remote(shared, i): i for i in missing}
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(done[0])
            est, arrays = ray.get(done[0])
            learner._save_checkpoint(i, est, arrays)
            results[i] = (est, arrays)
    finally:
        for ref in pending:
            ray.cancel(ref)
    return results
