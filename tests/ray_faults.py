"""A plugin for the Ray fault tests, imported by Ray workers through ``$STACKER_PLUGINS``.

With ``$RAY_FAULTS_DIR`` set, every forward pass in a worker is logged to
``$RAY_FAULTS_DIR/forward.log`` (pid, images); when the file ``arm`` exists there, the
first worker to run its second batch claims it and kills itself with SIGKILL right after
that batch (mid-chunk, before returning anything). The library has no test hooks: this
module wraps ``FeatureExtractor._run`` in the worker processes only.
"""

import functools
import os
import signal

from stacker.features.extractor import FeatureExtractor

_DIR = os.environ.get("RAY_FAULTS_DIR")
_calls = [0]


def _wrap(run):
    @functools.wraps(run)
    def wrapper(self, pixels):
        out = run(self, pixels)
        _calls[0] += 1
        with open(os.path.join(_DIR, "forward.log"), "a") as f:
            f.write(f"{os.getpid()} {int(out.shape[0])}\n")
        if _calls[0] == 2:
            try:
                os.rename(os.path.join(_DIR, "arm"), os.path.join(_DIR, "fired"))
            except FileNotFoundError:
                return out
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    return wrapper


if _DIR and not getattr(FeatureExtractor._run, "_ray_faults", False):
    FeatureExtractor._run = _wrap(FeatureExtractor._run)
    FeatureExtractor._run._ray_faults = True
