"""Saving and loading fitted estimators so that loading a stranger's file runs no code.

A model directory or cache folder may come from anyone, and its checksums were written
by the same hand as its files, so they prove nothing. The unit of trust is therefore a
short list of *types*, never a module:

- scikit-learn-style estimators are written with ``skops.io``. Loading rebuilds only
  types that skops trusts by default (scikit-learn's estimators, NumPy arrays, plain
  containers) or that stacker registered with :func:`trusted` (its own estimators) or
  by the user (``trusted=`` / ``$STACKER_TRUSTED_TYPES``). skops never calls a function
  named in the file; an unknown type stops the load before anything is built.
- Keras-backed estimators and networks are ``.keras`` archives. Before Keras reads one,
  :func:`check_keras_archive` refuses unexpected members, oversized content and any
  config object outside Keras's own layers/initialisers or stacker's registered layers;
  Keras then loads it with ``safe_mode=True``.

No ``pickle`` or ``joblib.load`` is reachable from a load.
"""

from __future__ import annotations

import json
import os
import zipfile

__all__ = ["register_format", "save_estimator", "load_estimator", "save_unfitted", "load_unfitted",
           "load_keras", "check_keras_archive", "member", "checked_params", "trusted_types", "UntrustedTypeError", "LegacyFormatError",
           "ModelIntegrityError", "trusted", "estimator_types", "TRUSTED_TYPES_ENV", "PERSIST_FORMAT"]

PERSIST_FORMAT = "skops-2"  # 2: classes at their sub-package paths  # part of cache keys: results written in another format are not reused
TRUSTED_TYPES_ENV = "STACKER_TRUSTED_TYPES"  # extra fully qualified type names, comma-separated
MAX_KERAS_BYTES_ENV = "STACKER_MAX_KERAS_BYTES"

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
    """``directory/rel``, refusing a ``rel`` that leaves the directory (a forged manifest's ``../..``)."""
    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or ".." in rel.replace("\\", "/").split("/"):
        raise ValueError(f"{directory}: the manifest names {rel!r}, which is not a file inside the model directory")
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
    return _load_skops(path, trusted)


def _load_skops(path: str, trusted=()):
    import skops.io as sio

    allowed = trusted_types(trusted)
    try:
        needed = sio.get_untrusted_types(file=path)
    except Exception as e:  # noqa: BLE001 - any parse failure of a foreign file is "not a stacker file"
        raise ValueError(f"{path} is not a readable skops file ({type(e).__name__}: {e})") from None
    untrusted = [t for t in needed if t not in allowed]
    if untrusted:
        raise UntrustedTypeError(path, untrusted)
    return sio.load(path, trusted=needed)


# -- Keras archives --------------------------------------------------------------------
_KERAS_MEMBERS = {"config.json", "metadata.json", "model.weights.h5"}
_KERAS_MODULES = ("keras", "keras.layers", "keras.initializers", "keras.regularizers", "keras.constraints",
                  "keras.activations", "keras.losses", "keras.metrics", "keras.optimizers",
                  "keras.src.models.functional", "keras.src.models.sequential")
# Layers that run user code or read other files: never in a stacker model.
_KERAS_REFUSED = {"Lambda", "TFSMLayer", "StringLookup", "IntegerLookup", "TextVectorization", "__lambda__"}


def check_keras_archive(path: str, custom_objects=None, max_bytes: int | None = None) -> None:
    """Refuse a ``.keras`` file that holds more than a stacker network can.

    Allowed: the three standard members, at most ``max_bytes`` uncompressed (default
    2 GiB, ``$STACKER_MAX_KERAS_BYTES``), and config objects from Keras's own layer,
    initialiser, regulariser, activation, loss and optimiser modules or stacker's
    registered custom layers — never layers that run code or open other files.
    """
    limit = max_bytes or int(os.environ.get(MAX_KERAS_BYTES_ENV, 2 << 30))
    registered = set(custom_objects or {})
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            extra = sorted({i.filename for i in infos} - _KERAS_MEMBERS)
            if extra:
                raise ValueError(f"unexpected archive members {extra}")
            total = sum(i.file_size for i in infos)
            if total > limit:
                raise ValueError(f"{total} bytes uncompressed, more than the {limit} allowed "
                                 f"(${MAX_KERAS_BYTES_ENV})")
            config = json.loads(zf.read("config.json"))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, ValueError) as e:
        raise ValueError(f"refusing to load {path}: {e}") from None
    for obj in _config_objects(config):
        cls, module, reg = obj.get("class_name"), obj.get("module"), obj.get("registered_name")
        if cls in _KERAS_REFUSED or (cls == "function" and module != "keras.activations"):
            raise ValueError(f"refusing to load {path}: it holds a {cls} layer, which stacker never writes")
        if module is None and cls in ("__keras_tensor__", "__tuple__", "__bytes__", "__numpy__", "__tensor__"):
            continue
        if module in _KERAS_MODULES or reg in registered or cls in registered:
            continue
        raise ValueError(f"refusing to load {path}: its config names {module}.{cls}, which is not a Keras "
                         "layer or a stacker layer")


def _config_objects(node):
    """Every dict with a ``class_name`` in a Keras config tree."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if "class_name" in item:
                yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def load_keras(path: str, custom_objects=None):
    """A Keras model from a checked archive, with ``safe_mode=True`` and no compilation."""
    import keras

    check_keras_archive(path, custom_objects)
    return keras.saving.load_model(path, safe_mode=True, compile=False, custom_objects=custom_objects)
