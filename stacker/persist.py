"""Saving and loading fitted estimators: one registry from a saved kind to its loader.

Keras-backed estimators (``DenseClassifier``, ``FineTunedClassifier``) are written as a
``.keras`` file (loaded with ``safe_mode=True``) plus JSON naming the estimator kind;
:func:`register_format` maps that kind to the class's ``load``. Everything else is a
joblib file, read through an unpickler that refuses any global outside scikit-learn,
NumPy, SciPy and stacker. Callers verify checksums before loading.
"""

from __future__ import annotations

import json
import os

import joblib

__all__ = ["register_format", "save_estimator", "load_estimator", "save_unfitted", "load_unfitted",
           "TRUSTED_MODULES_ENV"]

_FORMATS: dict = {}


def register_format(kind: str, cls) -> None:
    """Let :func:`load_estimator` rebuild ``cls`` (a class with ``save(stem)`` and ``load(stem, info)``)."""
    _FORMATS[kind] = cls


def save_estimator(est, path_stem: str) -> list[str]:
    """Save a fitted estimator: registered Keras-backed kinds via their ``save``, others with joblib."""
    if type(est).__name__ in _FORMATS and hasattr(est, "save"):
        return est.save(path_stem)
    joblib.dump(est, path_stem + ".joblib")
    return [path_stem + ".joblib"]


def load_estimator(path_stem: str):
    """Load what :func:`save_estimator` wrote. Only call on files whose checksums were verified."""
    if os.path.exists(path_stem + ".keras"):
        with open(path_stem + ".json") as f:
            info = json.load(f)
        kind = info.get("estimator", "DenseClassifier")
        if kind not in _FORMATS:
            raise ValueError(f"{path_stem}.json names an unknown estimator kind {kind!r}")
        return _FORMATS[kind].load(path_stem, info)
    return _load_joblib(path_stem + ".joblib")


def save_unfitted(est, path: str) -> None:
    """An unfitted estimator (a parameter, e.g. a user's model), with joblib."""
    from sklearn.base import clone

    joblib.dump(clone(est), path)


def load_unfitted(path: str):
    return _load_joblib(path)


# What a pickled scikit-learn model may name. A joblib file is a pickle, and a pickle can
# call any function it names (os.system...), so stacker refuses every other global: the
# defence behind the manifest checksums, for when a whole model directory was forged.
_SAFE_ROOTS = ("sklearn", "numpy", "scipy", "joblib", "stacker", "collections", "copyreg")
_SAFE_BUILTINS = {"slice", "set", "frozenset", "complex", "bytearray", "range", "object", "tuple", "list", "dict",
                  "int", "float", "bool", "str", "bytes"}
TRUSTED_MODULES_ENV = "STACKER_TRUSTED_MODULES"  # extra module roots (your own estimators), comma-separated


def _allowed(module: str, name: str) -> bool:
    root = module.split(".")[0]
    extra = tuple(m.strip() for m in os.environ.get(TRUSTED_MODULES_ENV, "").split(",") if m.strip())
    if root in _SAFE_ROOTS + extra:
        return not (root == "numpy" and any(part in module for part in ("testing", "distutils", "f2py")))
    if module == "builtins":
        return name in _SAFE_BUILTINS
    return (module, name) in {("functools", "partial"), ("_codecs", "encode")}


def _load_joblib(path: str):
    """``joblib.load`` through an unpickler that refuses globals outside scikit-learn/NumPy/SciPy/stacker."""
    import pickle

    from joblib import numpy_pickle

    class AllowlistUnpickler(numpy_pickle.NumpyUnpickler):
        def find_class(self, module, name):
            if not _allowed(module, name):
                raise pickle.UnpicklingError(
                    f"refusing to load {path}: it names {module}.{name}, which is not a scikit-learn, NumPy or "
                    f"SciPy object (a crafted file?). If it is your own estimator class, add its module to "
                    f"${TRUSTED_MODULES_ENV}.")
            return super().find_class(module, name)

    with open(path, "rb") as f:
        unpickler = AllowlistUnpickler(path, f, ensure_native_byte_order="auto")
        try:
            return unpickler.load()
        except UnicodeDecodeError:  # pragma: no cover - Python 2 pickles are not written by stacker
            raise pickle.UnpicklingError(f"{path} is not a stacker joblib file") from None
