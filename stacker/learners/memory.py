"""Long fits that do not grow: freed blocks of a megabyte or more go back to the system.

glibc's ``malloc`` serves a request below its *mmap threshold* from a heap that seldom
shrinks, and raises that threshold (up to 32 MiB) each time a larger block is freed.
Training loops allocate and free blocks of a few MiB over and over (Keras batches,
TensorFlow tensors, windows of cached rows), so after the first large free they come
from the heap and leave it fragmented: a Keras fit on 113 MB of activations left
40-60 MB more resident memory behind per fold, whether or not the fold's model was
kept, and a fine-tuned Dogs vs. Cats ensemble (20 fold fits) grew to 12 GB that way.
Fixing the threshold at :data:`MMAP_THRESHOLD` (``mallopt(M_MMAP_THRESHOLD)``) makes
such blocks mapped and unmapped on their own: the same loop stayed within 10 MB over
three folds. Each such block then costs a fresh mapping (the kernel zeroes its pages,
about 1 ms for 10 MB, small beside the work done with it).

Applied once per process when :meth:`stacker.Ensemble.fit` starts training, on Linux
with glibc; ``$STACKER_MMAP_THRESHOLD`` sets the size in bytes, ``0`` leaves malloc
alone. Other platforms are unchanged.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["MMAP_THRESHOLD", "return_freed_blocks"]

MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
_applied: int | None = None


def return_freed_blocks() -> int:
    """Fix glibc's mmap threshold (once per process); the threshold set, or 0 where nothing was done."""
    global _applied
    if _applied is not None:
        return _applied
    size = int(os.environ.get("STACKER_MMAP_THRESHOLD", MMAP_THRESHOLD))
    _applied = 0
    if size > 0 and sys.platform.startswith("linux"):
        try:
            if ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, size) == 1:
                _applied = size
        except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
            pass
    return _applied
