"""Extraction progress for logs: a plain line now and then, where a live bar would be one line at the end.

On a terminal or in a notebook the extractor shows Keras's live bar. Written to a file
(``nohup``, CI) that bar prints only when a backbone is done, so :class:`LogProgress`
prints a flushed line at every tenth of the images or every ``STACKER_PROGRESS_SECONDS``
seconds (default 30; 0: every batch), whichever comes first::

    efficientnet_lite0: 1024/6982 images (15%), 41 images/s, about 2 min 24 s left
"""

from __future__ import annotations

import os
import time

__all__ = ["LogProgress", "progress_seconds"]

PROGRESS_ENV = "STACKER_PROGRESS_SECONDS"


def progress_seconds() -> float:
    """Seconds between log lines: ``$STACKER_PROGRESS_SECONDS``, else 30."""
    try:
        return max(0.0, float(os.environ.get(PROGRESS_ENV, 30)))
    except ValueError:
        return 30.0


def _duration(seconds: float) -> str:
    """``2 min 24 s``, ``1 h 5 min``, ``12 s``: a human reads it, so no more precision than useful."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 60} min {s % 60} s" if s >= 60 else f"{s} s"


class LogProgress:
    """``update(done)`` as Keras's Progbar has it, printing periodic lines instead of redrawing one.

    Parameters
    ----------
    total : int
        Images to compute.
    name : str
        What each line starts with (the backbone).
    seconds : float, optional
        Longest wait between lines (default: :func:`progress_seconds`).
    """

    def __init__(self, total: int, name: str, seconds: float | None = None):
        self.total = int(total)
        self.name = name
        self.seconds = progress_seconds() if seconds is None else seconds
        self._start = self._last = time.perf_counter()
        self._tenth = 0

    def update(self, done: int) -> None:
        now = time.perf_counter()
        tenth = 10 * done // max(self.total, 1)
        if done < self.total and tenth <= self._tenth and now - self._last < self.seconds:
            return
        self._tenth, self._last = tenth, now
        rate = done / max(now - self._start, 1e-9)
        if done >= self.total:
            tail = f"done in {_duration(now - self._start)}"
        else:
            left = (self.total - done) / rate if done else None
            tail = "starting" if left is None else "almost done" if left < 1 else f"about {_duration(left)} left"
        speed = f"{rate:.0f}" if rate >= 10 else f"{rate:.1f}"
        print(f"{self.name}: {done}/{self.total} images ({100 * done // max(self.total, 1)}%), "
              f"{speed} images/s, {tail}", flush=True)
