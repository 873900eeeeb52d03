"""What a cache folder holds, for ``stacker cache``: every kind of artefact, listed and removed.

A cache folder (``--cache``; :func:`stacker.app.options.default_cache_dir` by default) has

- ``features/``: one HDF5 file per feature key (:class:`stacker.features.cache.FeatureCache`);
- ``onnx/``: backbones exported for ONNX Runtime, ``<network>-<key>.onnx`` (:mod:`stacker.features.engines`);
- ``learners/``, ``folds/``, ``test_proba/``: the result stores of :data:`stacker.features.cache.STORES` (a
  learner's fold models and out-of-fold arrays; a finished fold of a learner still in training;
  a learner's fold-averaged probabilities of a set of images);
- ``converted_weights/``: EfficientNet-Lite checkpoints converted to Keras weights;
- ``fingerprints.sqlite``: the stat memo of image content digests (:mod:`stacker.data.fingerprint`).

Each artefact is listed with whose it is (backbone; learner and training-data
fingerprint for results, from the ``meta.json`` written beside them), its size, its age
and its state: ``current``; ``stale`` (made by other code: no current run can use it);
``partial`` or ``corrupt`` (left by a killed run or a broken file); ``unknown`` (a result
written before results recorded their owner, or a file stacker did not write). Anything
else at the top of the folder is listed as ``other`` and never removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field

from stacker.features.cache import STORES, FeatureCache
from stacker.data.fingerprint import MEMO_FILE

__all__ = ["Artefact", "KINDS", "NotACacheError", "current_code", "format_table", "human_size", "remove", "scan",
           "select"]

KINDS = ("features", "onnx", *STORES, "weights", "fingerprints", "other")
_FOLDERS = {"features": "features", "onnx": "onnx", **STORES, "weights": "converted_weights"}
_PRUNABLE = ("stale", "partial", "corrupt")


class NotACacheError(FileNotFoundError):
    """A folder given as a cache is missing or holds none of what stacker caches."""


@dataclass
class Artefact:
    """One cached file or result directory.

    ``meta`` holds its key parts (features) or its ``meta.json`` (results); ``extra`` are
    files removed with it (an HDF5 file's lock).
    """

    kind: str
    path: str
    backbone: str | None
    detail: str
    data: str | None
    bytes: int
    mtime: float
    state: str
    extra: tuple = ()
    meta: dict = field(default_factory=dict)

    @property
    def prunable(self) -> bool:
        """Whether no current code can use it (stale, or left over by a killed run)."""
        return self.state in _PRUNABLE


def current_code() -> dict:
    """The fingerprints current code gives each code part of a cache key (see ``Learner.entry_meta``)."""
    from stacker import __version__
    from stacker.features.extractor import _code_fingerprint
    from stacker.features.cutpoint import cut_code_fingerprint
    from stacker.learners.finetuned import finetune_code
    from stacker.learners.zoo import code_fingerprint
    from stacker.io.persist import PERSIST_FORMAT

    return {"code": _code_fingerprint(), "cut_code": cut_code_fingerprint(), "model_code": code_fingerprint(),
            "finetune_code": finetune_code(), "persist": PERSIST_FORMAT, "stacker": __version__}


def _stale(recorded: dict, current: dict) -> bool:
    return any(name in current and value != current[name] for name, value in recorded.items())


def scan(directory) -> list[Artefact]:
    """Every artefact in a cache folder; :class:`NotACacheError` if it is not one."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise NotACacheError(f"{directory} does not exist (no stacker cache there)")
    names = set(os.listdir(directory))
    if not names & set(_FOLDERS.values()):
        raise NotACacheError(f"{directory} is not a stacker cache: it has none of "
                             + ", ".join(f"{v}/" for v in _FOLDERS.values()))
    current = current_code()
    found = _features(directory, current)
    live = {_onnx_name(a.meta) for a in found if a.state == "current" and a.meta.get("engine") == "onnx"}
    found += _onnx(os.path.join(directory, "onnx"), live)
    for kind, folder in STORES.items():
        found += _results(os.path.join(directory, folder), kind, current)
    found += _weights(os.path.join(directory, _FOLDERS["weights"]))
    if MEMO_FILE in names:
        path = os.path.join(directory, MEMO_FILE)
        found.append(Artefact("fingerprints", path, None, "stat memo: path, inode, size, times -> content digest",
                              None, _bytes(path), os.path.getmtime(path), "current"))
    for name in sorted(names - set(_FOLDERS.values()) - {MEMO_FILE}):
        path = os.path.join(directory, name)
        found.append(Artefact("other", path, None, "not made by this stacker's caches", None, _bytes(path),
                              os.path.getmtime(path), "unknown"))
    return found


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


# --------------------------------------------------------------------------- kinds


def _features(directory: str, current: dict) -> list[Artefact]:
    folder = os.path.join(directory, "features")
    out, listed = [], set()
    for e in FeatureCache(directory).entries():
        meta = e.get("meta", {})
        path = e["file"]
        listed |= {path, path + ".lock"}
        if "error" in e:
            state, detail = "corrupt", f"unreadable: {e['error'][:60]}"
        else:
            state = "stale" if _stale({k: v for k, v in meta.items() if k.endswith("code")}, current) else "current"
            detail = f"{e['rows']} rows, {meta.get('input_size')}px, {meta.get('engine', '?')}"
            if meta.get("output") == "cut-activations":
                detail += f", cut {meta.get('blocks')} blocks down, view {meta.get('view')}"
        out.append(Artefact("features", path, meta.get("backbone"), detail, None, e["bytes"], os.path.getmtime(path),
                            state, _existing(path + ".lock"), meta))
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        path = os.path.join(folder, name)
        if path in listed:
            continue
        state = "corrupt" if ".corrupt-" in name else "partial" if name.endswith(".lock") else "unknown"
        out.append(Artefact("features", path, _backbone_of(name), "left by a failed or killed run"
                            if state != "unknown" else "not a feature file", None, _bytes(path),
                            os.path.getmtime(path), state))
    return out


def _onnx_name(meta: dict) -> str:
    """The ONNX file an extractor with these feature-key parts exports (``stacker.features.engines._onnx_session``)."""
    size = meta.get("input_size")
    network = meta.get("backbone", "")
    if meta.get("output") == "cut-activations":
        network = f"{network}_bottom{meta.get('blocks')}_pixels"  # stacker.learners.finetune.split_backbone's name
    identity = f"{meta.get('weights')}|{meta.get('code')}"
    key = hashlib.sha256(f"{network}|{(None, size, size, 3)}|{identity}".encode()).hexdigest()[:20]
    return f"{network}-{key}.onnx"


def _onnx(folder: str, live: set) -> list[Artefact]:
    out = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        path = os.path.join(folder, name)
        if name.endswith(".onnx"):
            state = "current" if name in live else "stale"
            detail = "exported network" + (" (cut-point bottom)" if "_bottom" in name else "")
            detail += "" if state == "current" else ", no current feature entry uses it"
        else:
            state, detail = "partial", "an interrupted export"
        out.append(Artefact("onnx", path, _backbone_of(name), detail, None, _bytes(path), os.path.getmtime(path),
                            state))
    return out


def _results(folder: str, kind: str, current: dict) -> list[Artefact]:
    out = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        path = os.path.join(folder, name)
        meta = _read_json(os.path.join(path, "meta.json"))
        complete = os.path.isfile(os.path.join(path, "COMPLETE"))
        if name.startswith(".tmp-") or not complete:
            state, detail = "partial", "an unfinished write"
        elif meta is None:
            state, detail = "unknown", "written before results recorded their owner"
        else:
            state = "stale" if _stale(meta.get("code", {}), current) else "current"
            fold = re.search(r"-fold(\d+)$", name)
            detail = str(meta.get("learner")) + (f", fold {int(fold.group(1)) + 1}" if fold and kind == "folds" else "")
        data = (meta or {}).get("data")
        out.append(Artefact(kind, path, (meta or {}).get("backbone"), detail, data[:12] if data else None,
                            _bytes(path), os.path.getmtime(path), state, meta=meta or {}))
    return out


def _weights(folder: str) -> list[Artefact]:
    out = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        path = os.path.join(folder, name)
        parts = name.split("-")
        detail = f"converted checkpoint, {parts[1]} {parts[2]}" if len(parts) > 3 else "converted checkpoint"
        out.append(Artefact("weights", path, parts[0], detail, None, _bytes(path), os.path.getmtime(path),
                            "current"))
    return out


# --------------------------------------------------------------------------- helpers


def _backbone_of(file_name: str) -> str:
    """``efficientnet_lite0_bottom2_pixels-<key>.onnx`` -> ``efficientnet_lite0`` (the network's name)."""
    network = file_name.split("-")[0]
    return re.sub(r"_bottom\d+_pixels$", "", network)


def _existing(*paths) -> tuple:
    return tuple(p for p in paths if os.path.lexists(p))


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            value = json.load(f)
        return value if isinstance(value, dict) else None
    except (OSError, ValueError):
        return None


def _bytes(path: str) -> int:
    if not os.path.isdir(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


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
