"""Where the cache folder is when no one names one: the one rule every layer reads.

``$STACKER_CACHE_DIR``, else ``$XDG_CACHE_HOME/stacker``, else ``~/.cache/stacker``. It
lives here, at the start of the flow, because layers on both sides of the features keep
things in that folder: the backbones their converted checkpoints, the features and
learners their caches, the command line its ``--cache`` default. What goes where inside
the folder is :mod:`stacker.features.layout`'s job.
"""

from __future__ import annotations

import os

__all__ = ["CACHE_ENV", "default_cache_dir"]

CACHE_ENV = "STACKER_CACHE_DIR"


def default_cache_dir() -> str:
    """``$STACKER_CACHE_DIR``, else ``$XDG_CACHE_HOME/stacker``, else ``~/.cache/stacker``.

    One rule for every entry point, so that ``stacker fit``, ``stacker extract`` and the
    recipes share features wherever they are run from (never a folder made in the
    current directory).
    """
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "stacker")
