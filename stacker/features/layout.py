"""The layout of a cache folder: every path and key rule of what stacker keeps there, once.

:class:`CacheLayout` says where each thing lives in one cache folder and how it is named:

- ``features/``: one HDF5 file per feature key, ``<backbone>-<key>.h5``
  (:class:`stacker.features.cache.FeatureCache` writes them);
- ``onnx/``: backbones exported for ONNX Runtime, ``<network>-<key>.onnx``
  (:func:`stacker.features.engines.export_onnx`; :func:`onnx_name` is the name);
- ``learners/``, ``folds/``, ``test_proba/``: the result stores of :data:`STORES`;
- ``converted_weights/``: EfficientNet-Lite checkpoints converted to Keras weights
  (:func:`stacker.backbones.registry.converted_weights_dir`, which the backbones read
  without importing the features);
- ``fingerprints.sqlite``: the stat memo of image content digests (:mod:`stacker.data.fingerprint`).

Where the folder itself is by default is :func:`default_cache_dir`
(:mod:`stacker.data.cachedir`, at the start of the flow so the backbones can read it too).

Each of these is a *cache kind* (:class:`CacheKind`): its name, its folder or file, the
function that lists its artefacts and what it holds, declared once with
:func:`register_cache_kind`. ``stacker cache ls / rm / prune``
(:mod:`stacker.app.inventory`) iterate the registered kinds, so a new kind is one
registration; its writer finds its folder with ``CacheLayout(root).path(name)``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from stacker.backbones.registry import CONVERTED_WEIGHTS, converted_weights_dir
from stacker.data.cachedir import CACHE_ENV, default_cache_dir
from stacker.data.fingerprint import MEMO_FILE

__all__ = ["CACHE_ENV", "COMPLETE", "CORRUPT_MARK", "FEATURES", "LOCK_SUFFIX", "META", "ONNX", "STORES", "TMP_PREFIX",
           "Artefact", "CacheKind", "CacheLayout", "ScanContext", "backbone_of", "cache_kind", "cache_kinds",
           "default_cache_dir", "disk_bytes", "onnx_identity", "onnx_name", "register_cache_kind", "stable_hash",
           "unregister_cache_kind"]

FEATURES = "features"
ONNX = "onnx"
# The keyed result stores (stacker.features.cache.ResultStore), kind -> folder.
STORES = {
    "learners": "learners",      # a learner's fold models, out-of-fold arrays and timing, once complete
    "folds": "folds",            # one finished fold of a learner still in training (resume point)
    "test_proba": "test_proba",  # a learner's fold-averaged probabilities for a set of images
}
_STORE_DESCRIPTIONS = {"learners": "fold models and out-of-fold arrays of finished learners",
                       "folds": "checkpoints of the finished folds of unfinished learners",
                       "test_proba": "fold-averaged predictions of image sets"}
LOCK_SUFFIX = ".lock"      # beside each feature file: the inter-process lock
CORRUPT_MARK = ".corrupt-"  # a feature file that could not be opened, moved aside as <file>.corrupt-<time>
TMP_PREFIX = ".tmp-"       # a result directory still being written
COMPLETE = "COMPLETE"      # in a result directory: it was published whole
META = "meta.json"         # in a result directory: whose result it is


def stable_hash(obj) -> str:
    """sha256 of a JSON-serialisable object, independent of dict order: the key of every cache entry."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def onnx_identity(weights_id: str, code: str) -> str:
    """What, besides the network's name and input shape, tells exported graphs apart: weights and feature code."""
    return f"{weights_id}|{code}"


def onnx_name(network: str, input_shape, identity: str) -> str:
    """The file an export of ``network`` at ``input_shape`` (Keras's, batch included) is kept in."""
    key = hashlib.sha256(f"{network}|{tuple(input_shape)}|{identity}".encode()).hexdigest()[:20]
    return f"{network}-{key}.onnx"


class CacheLayout:
    """The paths of one cache folder ``root`` (nothing is created)."""

    def __init__(self, root):
        self.root = os.fspath(root)

    @classmethod
    def default(cls) -> CacheLayout:
        """The layout of :func:`default_cache_dir`."""
        return cls(default_cache_dir())

    def path(self, kind: str) -> str:
        """The folder (or file) of a registered cache kind."""
        return os.path.join(self.root, cache_kind(kind).entry)

    @property
    def features(self) -> str:
        return os.path.join(self.root, FEATURES)

    def feature_file(self, meta: dict, dtype="float32") -> str:
        """The HDF5 file of the features with these key parts, stored as ``dtype``."""
        key = stable_hash({**meta, "dtype": np.dtype(dtype).name})
        return os.path.join(self.features, f"{meta.get('backbone', 'features')}-{key[:16]}.h5")

    @property
    def onnx(self) -> str:
        return os.path.join(self.root, ONNX)

    def onnx_file(self, network: str, input_shape, identity: str) -> str:
        """Where an exported graph is kept (:func:`onnx_name`)."""
        return os.path.join(self.onnx, onnx_name(network, input_shape, identity))

    def store(self, kind: str) -> str:
        """The folder of one result store of :data:`STORES`."""
        return os.path.join(self.root, STORES[kind])

    @property
    def converted_weights(self) -> str:
        return converted_weights_dir(self.root)

    @property
    def memo(self) -> str:
        return os.path.join(self.root, MEMO_FILE)


# --------------------------------------------------------------------------- kinds


_PRUNABLE = ("stale", "partial", "corrupt")


@dataclass
class Artefact:
    """One cached file or result directory, as a kind's scanner finds it.

    ``state`` is ``current``, ``stale`` (made by other code: no current run can use it),
    ``partial`` or ``corrupt`` (left by a killed run or a broken file) or ``unknown``;
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

    @classmethod
    def at(cls, kind: str, path: str, detail: str, state: str = "current", backbone: str | None = None,
           data: str | None = None, meta: dict | None = None) -> Artefact:
        """The artefact at ``path``, with its size and time read from disk."""
        return cls(kind, path, backbone, detail, data, disk_bytes(path), os.path.getmtime(path), state,
                   meta=meta or {})

    @property
    def prunable(self) -> bool:
        """Whether no current code can use it (stale, or left over by a killed run)."""
        return self.state in _PRUNABLE


@dataclass
class ScanContext:
    """What a scanner may need besides its folder: the cache root, current code, what was found before it.

    ``current`` maps each code part of a key (``code``, ``model_code``...) to what current
    code gives it; ``found`` holds the artefacts of the kinds registered before this one.
    """

    root: str
    current: dict
    found: list = field(default_factory=list)

    def stale(self, recorded: dict) -> bool:
        """Whether code parts recorded with an artefact differ from current code's."""
        return any(name in self.current and value != self.current[name] for name, value in recorded.items())


@dataclass(frozen=True)
class CacheKind:
    """One kind of thing a cache folder holds.

    ``entry`` is its folder (or file, with ``is_file``) at the top of the folder; ``scan``
    is called as ``scan(path of the entry, ScanContext)`` when the entry exists and
    returns its :class:`Artefact` list.
    """

    name: str
    entry: str
    scan: Callable
    description: str
    is_file: bool = False


_KINDS: dict[str, CacheKind] = {}


def register_cache_kind(name: str, entry: str, scan: Callable, description: str, *, is_file: bool = False,
                        overwrite: bool = False) -> CacheKind:
    """Declare a cache kind; ``stacker cache`` lists and removes it from then on."""
    if name == "other":
        raise ValueError("'other' is what stacker cache calls files no kind claims")
    if not overwrite:
        if name in _KINDS:
            raise ValueError(f"cache kind {name!r} is already registered")
        if any(k.entry == entry for k in _KINDS.values()):
            raise ValueError(f"{entry!r} already belongs to another cache kind")
    _KINDS[name] = kind = CacheKind(name, entry, scan, description, is_file)
    return kind


def unregister_cache_kind(name: str) -> None:
    """Forget a registered kind (its files are then listed as ``other``)."""
    del _KINDS[name]


def cache_kinds() -> tuple[CacheKind, ...]:
    """Every registered kind, in the order they are listed."""
    return tuple(_KINDS.values())


def cache_kind(name: str) -> CacheKind:
    """The registered kind of this name (KeyError naming the registered ones otherwise)."""
    try:
        return _KINDS[name]
    except KeyError:
        raise KeyError(f"no cache kind {name!r}; registered: {', '.join(_KINDS)}") from None


# --------------------------------------------------------------------------- the built-in kinds


def _scan_features(folder: str, ctx: ScanContext) -> list[Artefact]:
    from stacker.features.cache import FeatureCache  # which names its files with this module: imported on use

    out, listed = [], set()
    for e in FeatureCache(ctx.root).entries():
        meta = e.get("meta", {})
        path = e["file"]
        listed |= {path, path + LOCK_SUFFIX}
        if "error" in e:
            state, detail = "corrupt", f"unreadable: {e['error'][:60]}"
        else:
            state = "stale" if ctx.stale({k: v for k, v in meta.items() if k.endswith("code")}) else "current"
            detail = f"{e['rows']} rows, {meta.get('input_size')}px, {meta.get('engine', '?')}"
            if meta.get("output") == "cut-activations":
                detail += f", cut {meta.get('blocks')} blocks down, view {meta.get('view')}"
            elif meta.get("view"):
                detail += f", view {meta['view']}"
        out.append(Artefact(FEATURES, path, meta.get("backbone"), detail, None, e["bytes"], os.path.getmtime(path),
                            state, _existing(path + LOCK_SUFFIX), meta))
    for name in _listing(folder):
        path = os.path.join(folder, name)
        if path in listed:
            continue
        state = "corrupt" if CORRUPT_MARK in name else "partial" if name.endswith(LOCK_SUFFIX) else "unknown"
        out.append(Artefact.at(FEATURES, path, "left by a failed or killed run" if state != "unknown"
                               else "not a feature file", state, backbone_of(name)))
    return out


def _exported_by(meta: dict) -> str:
    """The ONNX file an extractor with these feature-key parts exports."""
    size = meta.get("input_size")
    network = meta.get("backbone", "")
    if meta.get("output") == "cut-activations":
        network = f"{network}_bottom{meta.get('blocks')}_pixels"  # stacker.features.cutpoint.split_backbone's name
    return onnx_name(network, (None, size, size, 3), onnx_identity(meta.get("weights"), meta.get("code")))


def _scan_onnx(folder: str, ctx: ScanContext) -> list[Artefact]:
    live = {_exported_by(a.meta) for a in ctx.found
            if a.kind == FEATURES and a.state == "current" and a.meta.get("engine") == "onnx"}
    out = []
    for name in _listing(folder):
        if name.endswith(".onnx"):
            state = "current" if name in live else "stale"
            detail = "exported network" + (" (cut-point bottom)" if "_bottom" in name else "")
            detail += "" if state == "current" else ", no current feature entry uses it"
        else:
            state, detail = "partial", "an interrupted export"
        out.append(Artefact.at(ONNX, os.path.join(folder, name), detail, state, backbone_of(name)))
    return out


def _scan_results(folder: str, ctx: ScanContext, kind: str) -> list[Artefact]:
    out = []
    for name in _listing(folder):
        path = os.path.join(folder, name)
        meta = _read_json(os.path.join(path, META))
        complete = os.path.isfile(os.path.join(path, COMPLETE))
        if name.startswith(TMP_PREFIX) or not complete:
            state, detail = "partial", "an unfinished write"
        elif meta is None:
            state, detail = "unknown", "written before results recorded their owner"
        else:
            state = "stale" if ctx.stale(meta.get("code", {})) else "current"
            fold = re.search(r"-fold(\d+)$", name)
            detail = (str(meta.get("learner")) + (f" ({meta['variant']})" if meta.get("variant") else "")
                      + (f", fold {int(fold.group(1)) + 1}" if fold and kind == "folds" else ""))
        data = (meta or {}).get("data")
        out.append(Artefact.at(kind, path, detail, state, (meta or {}).get("backbone"),
                               data=data[:12] if data else None, meta=meta or {}))
    return out


def _scan_weights(folder: str, ctx: ScanContext) -> list[Artefact]:
    out = []
    for name in _listing(folder):
        parts = name.split("-")  # <network>-<top|notop>-<size>-<sha12>.weights.h5 (load_checkpoint_weights)
        detail = f"converted checkpoint, {parts[1]} {parts[2]}" if len(parts) > 3 else "converted checkpoint"
        out.append(Artefact.at("weights", os.path.join(folder, name), detail, backbone=parts[0]))
    return out


def _scan_memo(path: str, ctx: ScanContext) -> list[Artefact]:
    return [Artefact.at("fingerprints", path, "stat memo: path, inode, size, times -> content digest")]


register_cache_kind("features", FEATURES, _scan_features, "pooled features: one HDF5 file per feature key")
register_cache_kind("onnx", ONNX, _scan_onnx, "backbones exported for ONNX Runtime")
for _kind, _folder in STORES.items():
    register_cache_kind(_kind, _folder, functools.partial(_scan_results, kind=_kind), _STORE_DESCRIPTIONS[_kind])
register_cache_kind("weights", CONVERTED_WEIGHTS, _scan_weights, "EfficientNet-Lite checkpoints as Keras weights")
register_cache_kind("fingerprints", MEMO_FILE, _scan_memo, "the stat memo of image content digests", is_file=True)


# --------------------------------------------------------------------------- helpers


def backbone_of(file_name: str) -> str:
    """``efficientnet_lite0_bottom2_pixels-<key>.onnx`` -> ``efficientnet_lite0`` (the network's name)."""
    network = file_name.split("-")[0]
    return re.sub(r"_bottom\d+_pixels$", "", network)


def disk_bytes(path: str) -> int:
    """Size of a file, or of everything under a folder."""
    if not os.path.isdir(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def _listing(folder: str) -> list[str]:
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def _existing(*paths) -> tuple:
    return tuple(p for p in paths if os.path.lexists(p))


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            value = json.load(f)
        return value if isinstance(value, dict) else None
    except (OSError, ValueError):
        return None
