"""A plugin for the Ray fault tests, imported by Ray workers through ``$STACKER_PLUGINS``.

The library has no test hooks: this module wraps ``FeatureExtractor._run`` in the worker
processes only, in one of two ways.

- ``$RAY_FAULTS_DIR`` (one machine): every forward pass is logged to
  ``$RAY_FAULTS_DIR/forward.log`` (pid, images); when the file ``arm`` exists there, the
  first worker to run its second batch claims it and kills itself with SIGKILL right
  after that batch (mid-chunk, before returning anything).
- ``$RAY_FAULTS_ACTOR`` (a cluster whose nodes share no folder): every forward pass is
  reported to the :class:`ForwardLog` actor of that name (node, pid, images, the weights
  file and cache folder the worker uses, the GPUs Ray gave it). Once armed with ``block_at=b``, the first
  worker to run its ``b``-th batch is told to stop there: it waits (mid-chunk, its result
  unsent) until the test removes its node.
"""

import functools
import os
import signal
import time

from stacker.features.extractor import FeatureExtractor

_DIR = os.environ.get("RAY_FAULTS_DIR")
_ACTOR = os.environ.get("RAY_FAULTS_ACTOR")
_BLOCK_S = 120  # a blocked worker whose node is never removed goes on (and the test fails on its counts)
_calls = [0]


class ForwardLog:
    """A Ray actor (on the head node) counting the workers' forward passes; it picks the worker to block."""

    def __init__(self):
        self.records, self.block_at, self.blocked = [], 0, None

    def arm(self, block_at: int) -> None:
        self.block_at, self.blocked = int(block_at), None

    def record(self, node: str, pid: int, images: int, weights: str, cache_dir: str, gpus: float, calls: int) -> bool:
        """Log a forward pass; True: this worker is the one to block (once per arming)."""
        self.records.append({"node": node, "pid": pid, "images": images, "weights": weights, "cache_dir": cache_dir,
                             "gpus": gpus})
        if self.block_at and calls == self.block_at and self.blocked is None:
            self.blocked = node
            return True
        return False

    def blocked_node(self):
        return self.blocked

    def take(self) -> list:
        records, self.records = self.records, []
        return records


def _to_file(ext, images: int) -> None:
    with open(os.path.join(_DIR, "forward.log"), "a") as f:
        f.write(f"{os.getpid()} {images}\n")
    if _calls[0] == 2:
        try:
            os.rename(os.path.join(_DIR, "arm"), os.path.join(_DIR, "fired"))
        except FileNotFoundError:
            return
        os.kill(os.getpid(), signal.SIGKILL)


def _to_actor(ext, images: int) -> None:
    import ray

    ctx = ray.get_runtime_context()
    log = ray.get_actor(_ACTOR)
    gpus = ctx.get_assigned_resources().get("GPU", 0)
    if ray.get(log.record.remote(ctx.get_node_id(), os.getpid(), images, str(ext.weights), str(ext.cache_dir), gpus,
                                 _calls[0])):
        time.sleep(_BLOCK_S)


def _wrap(run, report):
    @functools.wraps(run)
    def wrapper(self, pixels):
        out = run(self, pixels)
        _calls[0] += 1
        report(self, int(out.shape[0]))
        return out
    return wrapper


if (_DIR or _ACTOR) and not getattr(FeatureExtractor._run, "_ray_faults", False):
    FeatureExtractor._run = _wrap(FeatureExtractor._run, _to_actor if _ACTOR else _to_file)
    FeatureExtractor._run._ray_faults = True
