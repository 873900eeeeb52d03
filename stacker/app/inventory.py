"""What a cache folder holds, for ``stacker cache``: every registered kind of artefact, listed and removed.

A cache folder (``--cache``; :func:`stacker.features.layout.default_cache_dir` by default)
holds the cache kinds registered in :mod:`stacker.features.layout` (features, ONNX graphs,
learner results, converted weights, the fingerprint memo, and any kind registered later):
:func:`scan` runs each kind's scanner on its folder or file, so a new kind is listed,
selected and removed here without an edit.

Each artefact is listed with whose it is (backbone; learner and training-data
fingerprint for results, from the ``meta.json`` written beside them), its size, its age
and its state: ``current``; ``stale`` (made by other code: no current run can use it);
``partial`` or ``corrupt`` (left by a killed run or a broken file); ``unknown`` (a result
written before results recorded their owner, or a file stacker did not write). Anything
at the top of the folder that no kind claims is listed as ``other`` and never removed.
"""

from __future__ import annotations

import os
import shutil
import time

from stacker.features.layout import Artefact, ScanContext, cache_kinds

__all__ = ["Artefact", "NotACacheError", "current_code", "format_table", "human_size", "kinds", "remove", "scan",
           "select"]


class NotACacheError(FileNotFoundError):
    """A folder given as a cache is missing or holds none of what stacker caches."""


def kinds() -> tuple:
    """The kind names ``stacker cache`` shows: the registered kinds', then ``other``."""
    return (*(k.name for k in cache_kinds()), "other")


def current_code() -> dict:
    """The fingerprints current code gives each code part of a cache key (see ``Learner.entry_meta``):
    the feature code's, every learner kind's (:func:`stacker.learners.kinds.code_parts`), the storage format's."""
    from stacker import __version__
    from stacker.features.extractor import code_fingerprint
    from stacker.features.views import view_code
    from stacker.io.persist import PERSIST_FORMAT
    from stacker.learners.kinds import code_parts

    return {"code": code_fingerprint(), "view_code": view_code(), **code_parts(), "persist": PERSIST_FORMAT,
            "stacker": __version__}


def scan(directory) -> list[Artefact]:
    """Every artefact in a cache folder, kind by kind; :class:`NotACacheError` if it is not one."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise NotACacheError(f"{directory} does not exist (no stacker cache there)")
    names = set(os.listdir(directory))
    registered = cache_kinds()
    folders = [k.entry for k in registered if not k.is_file]
    if not names & set(folders):
        raise NotACacheError(f"{directory} is not a stacker cache: it has none of "
                             + ", ".join(f"{v}/" for v in folders))
    ctx = ScanContext(directory, current_code())
    for kind in registered:
        path = os.path.join(directory, kind.entry)
        if os.path.lexists(path):
            ctx.found += kind.scan(path, ctx)
    for name in sorted(names - {k.entry for k in registered}):
        ctx.found.append(Artefact.at("other", os.path.join(directory, name), "not made by this stacker's caches",
                                     "unknown"))
    return ctx.found


def select(artefacts, backbone: str | None = None, kind: str | None = None) -> list[Artefact]:
    """The artefacts of one backbone and/or one kind (all without either)."""
    return [a for a in artefacts if (backbone is None or a.backbone == backbone) and (kind is None or a.kind == kind)]


def remove(artefacts) -> int:
    """Delete artefacts (never ``other`` ones); returns the bytes freed."""
    freed = 0
    for a in artefacts:
        if a.kind == "other":
            raise ValueError(f"{a.path} was not made by stacker's caches; not removing it")
        for path in (a.path, *a.extra):
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.remove(path)
        freed += a.bytes
    return freed


# --------------------------------------------------------------------------- the table


def human_size(n: float) -> str:
    """Bytes as B, KiB, MiB or GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _age(seconds: float) -> str:
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{seconds / span:.0f}{unit}"
    return f"{seconds:.0f}s"


def format_table(artefacts, root: str) -> str:
    """One row per artefact (kind, backbone, what it belongs to, data, size, age, state, file) and totals."""
    now = time.time()
    rows = [("kind", "backbone", "belongs to", "data", "size", "age", "state", "file")]
    for a in artefacts:
        rows.append((a.kind, a.backbone or "-", a.detail, a.data or "-", human_size(a.bytes), _age(now - a.mtime),
                     a.state, os.path.relpath(a.path, root)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i in (4, 5) else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    per_kind = {}
    for a in artefacts:
        per_kind[a.kind] = per_kind.get(a.kind, 0) + a.bytes
    lines.append(f"{len(artefacts)} entries, {human_size(sum(per_kind.values()))}: "
                 + ", ".join(f"{k} {human_size(v)}" for k, v in per_kind.items()))
    return "\n".join(lines)
