"""Saving and loading fitted estimators so that loading a stranger's file runs no code.

A model directory or cache folder may come from anyone, and its checksums were written
by the same hand as its files, so they prove nothing. The unit of trust is therefore a
short list of *types*, never a module:

- scikit-learn-style estimators are written with ``skops.io``. Loading rebuilds only
  types on :mod:`stacker.io.allowlist`'s explicit list (plain containers, NumPy arrays,
  the few scikit-learn classes stacker's models are made of), those stacker registered
  with :func:`trusted` (its own estimators) and those the user trusts (``trusted=`` /
  ``$STACKER_TRUSTED_TYPES``), never skops's defaults (every scikit-learn estimator, some
  of which read files). An unlisted type stops the load before anything is built; a
  rebuilt object holding a function or a parameter that names a file, folder or URL
  (``Pipeline(memory=...)``) is refused before any of its methods runs.
- Keras-backed estimators and networks are ``.keras`` archives. Before Keras reads one,
  :func:`check_keras_archive` (in :mod:`stacker.io.keras_archive`, re-exported here) refuses
  unexpected members, oversized content and any config object that does not resolve, as
  Keras resolves it, to an allowlisted layer, initialiser or stacker layer; Keras then loads
  it with ``safe_mode=True``.

No ``pickle`` or ``joblib.load`` is reachable from a load.
"""

from __future__ import annotations

import json
import os

from stacker.io.bounds import check_skops_file
from stacker.io.keras_archive import check_keras_archive, load_keras  # re-exported: callers import them from here

__all__ = ["register_format", "save_estimator", "load_estimator", "save_unfitted", "load_unfitted",
           "load_keras", "check_keras_archive", "member", "checked_params", "trusted_types", "UntrustedTypeError", "LegacyFormatError",
           "ModelIntegrityError", "trusted", "estimator_types", "TRUSTED_TYPES_ENV", "PERSIST_FORMAT"]

PERSIST_FORMAT = "skops-2"  # 2: classes at their sub-package paths  # part of cache keys: results written in another format are not reused
TRUSTED_TYPES_ENV = "STACKER_TRUSTED_TYPES"  # extra fully qualified type names, comma-separated

# Types stacker itself writes that skops does not trust by default, registered where each
# is defined (:func:`trusted`). Each is a plain estimator class whose state is arrays and
# numbers; none runs code when rebuilt.
_TRUSTED: dict[str, None] = {}

_FORMATS: dict = {}


class UntrustedTypeError(TypeError):
    """A saved file needs types that are not trusted; nothing in it was rebuilt."""

    def __init__(self, path: str, types: list[str]):
        self.path, self.types = path, list(types)
        names = ", ".join(self.types)
        super().__init__(
            f"refusing to load {path}: it needs the untrusted type(s) {names}. Nothing was loaded. If this is "
            f"your own model and you trust these exact types, pass trusted=[{', '.join(map(repr, self.types))}] "
            f"(CLI: --trust {' --trust '.join(self.types)}) or set ${TRUSTED_TYPES_ENV}={','.join(self.types)}.")


class ModelIntegrityError(ValueError):
    """A saved ensemble's files do not match its manifest (tampered, truncated or foreign)."""


class LegacyFormatError(ValueError):
    """A file in the pickle-based format of model format 2 and older, which is never loaded."""


def trusted(cls_or_name):
    """Trust a type stacker saves (a class decorator, or a fully qualified name): one line where it is defined."""
    name = cls_or_name if isinstance(cls_or_name, str) else f"{cls_or_name.__module__}.{cls_or_name.__qualname__}"
    _TRUSTED[name] = None
    return cls_or_name


def trusted_types(extra=()) -> list[str]:
    """stacker's trusted types plus ``extra`` and ``$STACKER_TRUSTED_TYPES`` (type names, not modules)."""
    if isinstance(extra, str):
        extra = [extra]
    env = [t.strip() for t in os.environ.get(TRUSTED_TYPES_ENV, "").split(",") if t.strip()]
    names = list(_TRUSTED) + list(extra or ()) + env
    for name in names:
        if not isinstance(name, str) or "." not in name:
            raise ValueError(f"a trusted type is a fully qualified class name such as "
                             f"'mypackage.models.MyClassifier', got {name!r}")
    return list(dict.fromkeys(names))


def estimator_types(value) -> tuple:
    """Fully qualified types of the estimators in ``value`` (nested lists, dicts, estimator parameters)."""
    found = []

    def walk(item):
        if isinstance(item, (list, tuple)):
            for v in item:
                walk(v)
        elif isinstance(item, dict):
            for v in item.values():
                walk(v)
        elif hasattr(item, "get_params"):
            found.append(f"{type(item).__module__}.{type(item).__qualname__}")
            for v in item.get_params(deep=False).values():
                walk(v)

    walk(value)
    return tuple(found)


def member(directory: str, rel) -> str:
    """``directory/rel``, refusing a ``rel`` that leaves the directory (a forged manifest's ``../..``) or that
    passes through a symbolic link (a link inside the directory can point anywhere; its text looks harmless).

    Every existing component below ``directory`` is checked with ``lstat`` (no link is followed); a
    component that does not exist ends the check (the caller reports a missing file).
    """
    if (not isinstance(rel, str) or not rel or "\0" in rel or os.path.isabs(rel)
            or ".." in rel.replace("\\", "/").split("/")):
        raise ValueError(f"{directory}: the manifest names {rel!r}, which is not a file inside the model directory")
    path = os.fspath(directory)
    for part in rel.split("/"):
        path = os.path.join(path, part)
        if os.path.islink(path):
            raise ModelIntegrityError(
                f"{directory}: {rel} is reached through the symbolic link {os.path.relpath(path, directory)}; "
                "files of a model directory are never read through links, refusing to load it")
        if not os.path.lexists(path):
            break
    return os.path.join(directory, rel)


def checked_params(cls, info, path_stem: str) -> dict:
    """Constructor parameters from a Keras-backed estimator's JSON: known names, plain JSON values only."""
    params = info.get("params") if isinstance(info, dict) else None
    known = set(cls._get_param_names())
    if not isinstance(params, dict) or set(params) - known:
        raise ValueError(f"{path_stem}.json does not hold {cls.__name__} parameters "
                         f"(unknown: {sorted(set(params or {}) - known) if isinstance(params, dict) else params!r})")
    return dict(params)


def register_format(kind: str, cls) -> None:
    """Let :func:`load_estimator` rebuild ``cls`` (a class with ``save(stem)`` and ``load(stem, info)``)."""
    _FORMATS[kind] = cls


def save_estimator(est, path_stem: str) -> list[str]:
    """Save a fitted estimator: registered Keras-backed kinds via their ``save``, others with skops."""
    import skops.io as sio

    if type(est).__name__ in _FORMATS and hasattr(est, "save"):
        return est.save(path_stem)
    sio.dump(est, path_stem + ".skops")
    return [path_stem + ".skops"]


def load_estimator(path_stem: str, trusted=()):
    """Load what :func:`save_estimator` wrote, rebuilding only trusted types."""
    check_skops_file(path_stem + ".skops")  # declared arrays within stacker.io.bounds, before skops reads any
    if os.path.exists(path_stem + ".keras"):
        with open(path_stem + ".json") as f:
            info = json.load(f)
        kind = info.get("estimator") if isinstance(info, dict) else None
        if kind not in _FORMATS:
            raise ValueError(f"{path_stem}.json names an unknown estimator kind {kind!r}")
        return _FORMATS[kind].load(path_stem, info)
    if os.path.exists(path_stem + ".skops"):
        return _load_skops(path_stem + ".skops", trusted)
    if os.path.exists(path_stem + ".joblib"):
        raise LegacyFormatError(
            f"{path_stem}.joblib is a pickle written by an older stacker; pickles can run code, so it is never "
            "loaded. Refit it (with the same cache_dir no forward pass is repeated).")
    raise FileNotFoundError(f"no saved estimator at {path_stem} (.skops or .keras + .json)")


def save_unfitted(est, path_stem: str) -> str:
    """An unfitted estimator (a parameter, e.g. a user's model), with skops."""
    import skops.io as sio
    from sklearn.base import clone

    sio.dump(clone(est), path_stem + ".skops")
    return path_stem + ".skops"


def load_unfitted(path: str, trusted=()):
    check_skops_file(path)  # declared arrays within stacker.io.bounds, before skops reads any
    return _load_skops(path, trusted)


def _load_skops(path: str, trusted=()):
    """A skops file's object, rebuilt only from allowlisted types and checked to hold inert values.

    Every type the file names (skops's audit and its schema) must be on :mod:`stacker.io.allowlist`'s
    list, one of stacker's ``@trusted`` classes or one the caller trusts; skops's own defaults (every
    scikit-learn estimator) are not used. The rebuilt object is then checked (:func:`allowlist.check_inert`)
    before it is returned, so none of its methods has run on a refused file.
    """
    import skops.io as sio

    from stacker.io import allowlist

    user = [t for t in trusted_types(trusted) if t not in _TRUSTED]
    found = allowlist.file_types(path)
    refused = allowlist.refused_types(found, _TRUSTED, user)
    if refused:
        raise UntrustedTypeError(path, refused)
    obj = sio.load(path, trusted=sorted(found))
    allowlist.check_inert(obj, path, _TRUSTED, user)
    return obj

