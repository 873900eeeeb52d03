"""A fitted ensemble on disk: its directory's files, its manifest, and reading both back.

:func:`save_ensemble` writes every learner (source networks, ONNX graphs, fold models),
level 2, the out-of-fold arrays, training curves and ``manifest.json`` (parameters,
scores, each file's sha256) into a temporary directory, then publishes it with the
manifest last. :func:`load_ensemble` checks the format version and every file's sha256
before rebuilding anything, through :mod:`stacker.io.persist` (no pickle, trusted types only).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
from sklearn.utils.validation import check_is_fitted

from stacker import __version__
from stacker.backbones.torch_checkpoint import sha256_file
from stacker.data.sources import file_fingerprints
from stacker.io.persist import (ModelIntegrityError, load_estimator, load_unfitted, member, save_estimator,
                                save_unfitted, trusted_types)
from stacker.learners.base import describe, saved_networks
from stacker.learners.kinds import LEARNER_KINDS
from stacker.level2.selection import Level2

__all__ = ["FORMAT_VERSION", "MANIFEST", "save_ensemble", "load_ensemble", "read_manifest", "environment",
           "dataset_fingerprint"]

FORMAT_VERSION = 4  # 3: skops files instead of pickles; 4: classes at the sub-package paths (stacker.learners...)
MANIFEST = "manifest.json"


def save_ensemble(ens, directory, onnx: bool | None = None) -> str:
    """Write a fitted ensemble to ``directory`` (see :meth:`stacker.Ensemble.save`)."""
    check_is_fitted(ens, "meta_")
    directory = os.fspath(directory)
    if os.path.isdir(directory) and os.listdir(directory) and not os.path.exists(os.path.join(directory, MANIFEST)):
        raise FileExistsError(f"{directory} exists and is not a stacker model directory; "
                              "save into a new or empty directory")
    tmp = os.path.abspath(directory).rstrip("/") + f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    learners = [lr.save(tmp, onnx) for lr in ens.learners_.values()]
    save_estimator(ens.meta_.combiner, os.path.join(tmp, "meta"))
    params = _encode_params(ens.get_params(deep=False), tmp)
    names = list(ens.learners_)
    np.savez_compressed(os.path.join(tmp, "oof.npz"), y=ens.y_, ensemble=ens.meta_oof_proba_,
                        **{f"learner_{i}": ens.oof_proba_[n] for i, n in enumerate(names)})
    _write_curves(os.path.join(tmp, "curves.csv"), {n: lr.fold_models_ for n, lr in ens.learners_.items()})
    files = {}
    for root, _dirs, file_names in os.walk(tmp):
        for f in file_names:
            full = os.path.join(root, f)
            files[os.path.relpath(full, tmp)] = sha256_file(full)
    manifest = {
        "format": "stacker-ensemble", "format_version": FORMAT_VERSION, "stacker_version": __version__,
        "classes": ens.classes_, "params": params, "learners": learners,
        "level2": {"name": ens.meta_.name, "temperature": ens.meta_.temperature, "floor": ens.meta_.floor,
                   "table": ens.meta_.table, "weights": ens.learner_weights()},
        "meta": describe(ens.meta), "meta_inputs": ens.meta_inputs, "cv": ens.cv,
        "random_state": ens.random_state, "scores": ens.scores_, "skipped": ens.skipped_, "files": files,
        "meta_importance": ens.meta_importance_, "config": ens.config_, "environment": ens.environment_,
        "train_ids": [str(i) for i in ens.train_ids_], "train_paths": ens.train_paths_,
        "histories": {n: [getattr(est, "history_", None) for est in lr.fold_models_]
                      for n, lr in ens.learners_.items()},
    }
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1, default=_json_default)
    _publish(tmp, directory)
    return directory


def load_ensemble(cls, directory, trusted=None, **params):
    """A saved ensemble of class ``cls``, every file's sha256 checked (see :meth:`stacker.Ensemble.load`)."""
    directory = os.fspath(directory)
    manifest = read_manifest(directory)
    for rel, digest in manifest["files"].items():
        path = member(directory, rel)
        if not os.path.isfile(path):
            raise ModelIntegrityError(f"{directory}: file {rel} listed in the manifest is missing")
        if sha256_file(path) != digest:
            raise ModelIntegrityError(f"{directory}: {rel} does not match its sha256 in the manifest "
                                      "(modified or corrupted); refusing to load it")
    trusted = trusted_types(trusted or ())
    saved = _decode_params(manifest["params"], directory, trusted)
    if saved.get("cache_dir") and not os.path.isdir(saved["cache_dir"]):
        saved["cache_dir"] = None  # fitted on another machine: its cache folder is not here
    ens = cls(**{**saved, **params})
    ens.classes_ = manifest["classes"]
    ens.trusted_types_ = tuple(trusted)
    settings = ens.learner_settings()
    networks = saved_networks(manifest["learners"], directory, manifest["files"])
    ens.learners_ = {e["name"]: LEARNER_KINDS[e["kind"]].load(e, directory, settings, networks)
                     for e in manifest["learners"]}
    ens.specs_ = [lr.spec for lr in ens.learners_.values()]
    lv = manifest["level2"]
    with np.load(os.path.join(directory, "oof.npz"), allow_pickle=False) as oof:
        ens.y_ = oof["y"]
        ens.meta_oof_proba_ = oof["ensemble"]
        ens.oof_proba_ = {e["name"]: oof[f"learner_{i}"] for i, e in enumerate(manifest["learners"])}
    ens.meta_ = Level2(lv["name"], load_estimator(os.path.join(directory, "meta"), trusted), len(ens.classes_),
                       ens.meta_oof_proba_, lv["temperature"], lv["floor"], lv["table"])
    ens.level2_scores_ = lv["table"]
    ens.scores_ = manifest.get("scores", {})
    ens.skipped_ = manifest.get("skipped", {})
    ens.meta_importance_ = manifest.get("meta_importance", {})
    ens.config_ = manifest.get("config", {})
    ens.environment_ = manifest.get("environment", {})
    ens.train_ids_ = manifest.get("train_ids", [])
    ens.train_paths_ = manifest.get("train_paths", [])
    return ens


def _encode_params(params: dict, directory: str) -> dict:
    """``get_params()`` as JSON: tuples tagged, estimators saved beside the manifest, the strategy dropped."""
    def enc(value, name):
        if isinstance(value, tuple):
            return {"__tuple__": [enc(v, f"{name}_{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [enc(v, f"{name}_{i}") for i, v in enumerate(value)]
        if isinstance(value, dict):
            return {str(k): enc(v, f"{name}_{k}") for k, v in value.items()}
        if hasattr(value, "get_params"):
            os.makedirs(os.path.join(directory, "params"), exist_ok=True)
            save_unfitted(value, os.path.join(directory, "params", name))
            return {"__estimator__": f"params/{name}.skops"}
        if isinstance(value, (str, int, float, bool, type(None))):
            return value
        return _json_default(value)

    return {k: enc(v, k) for k, v in params.items() if k != "strategy"}


def _decode_params(params: dict, directory: str, trusted) -> dict:
    def dec(value):
        if isinstance(value, dict) and "__tuple__" in value:
            return tuple(dec(v) for v in value["__tuple__"])
        if isinstance(value, dict) and "__estimator__" in value:
            return load_unfitted(member(directory, value["__estimator__"]), trusted)
        if isinstance(value, dict):
            return {k: dec(v) for k, v in value.items()}
        if isinstance(value, list):
            return [dec(v) for v in value]
        return value

    return {k: dec(v) for k, v in params.items()}


def _write_curves(path: str, learners: dict) -> None:
    """Every fold's per-epoch training curves as one CSV (learner, fold, phase, epoch, metrics)."""
    import csv

    rows = []
    for name, folds in learners.items():
        for i, est in enumerate(folds):
            h = getattr(est, "history_", None) or {}
            n = len(h.get("loss", []))
            split = int(h.get("phase1_epochs", n))
            for e in range(n):
                rows.append({"learner": name, "fold": i, "phase": "head" if e < split else "finetune",
                             "epoch": e + 1, **{m: h[m][e] for m in ("loss", "accuracy", "val_loss", "val_accuracy")
                                                 if m in h and e < len(h[m]) and h[m][e] is not None}})
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, ["learner", "fold", "phase", "epoch", "loss", "accuracy", "val_loss", "val_accuracy"])
        w.writeheader()
        w.writerows(rows)


def _publish(tmp: str, directory: str) -> None:
    """Move a freshly written model from ``tmp`` into ``directory``, replacing only its own files.

    The manifest goes last, so a directory with a manifest always has the files it lists.
    """
    os.makedirs(directory, exist_ok=True)
    old_manifest = os.path.join(directory, MANIFEST)
    if os.path.exists(old_manifest):
        os.remove(old_manifest)
    for name in ("backbones", "learners", "params"):
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    for name in os.listdir(directory):
        if name.startswith("meta."):
            os.remove(os.path.join(directory, name))
    for name in sorted(os.listdir(tmp), key=lambda n: n == MANIFEST):
        os.replace(os.path.join(tmp, name), os.path.join(directory, name))
    os.rmdir(tmp)


def read_manifest(directory, check_version: bool = True) -> dict:
    """The manifest of a saved ensemble, with its format (and, to load it, its version) checked."""
    path = os.path.join(os.fspath(directory), MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} is not a saved stacker ensemble (no {MANIFEST})")
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != "stacker-ensemble":
        raise ModelIntegrityError(f"{path} is not a stacker ensemble manifest")
    if not check_version:
        return manifest
    version = manifest.get("format_version")
    if isinstance(version, int) and version < 3:
        raise ModelIntegrityError(
            f"{directory} was saved in model format version {version}, whose scikit-learn parts are pickles "
            f"(a pickle can run code when loaded), so this stacker ({__version__}) does not read it. Refit the "
            f"ensemble and save it again (format {FORMAT_VERSION}: skops files, loaded by type); with the same "
            "cache_dir no forward pass is repeated.")
    if version == 3:
        raise ModelIntegrityError(
            f"{directory} was saved in model format version 3, by a stacker whose classes lived in other modules "
            f"(stacker.models, stacker.meta, ...); this stacker ({__version__}) keeps them in sub-packages and reads "
            f"format {FORMAT_VERSION}. Refit the ensemble and save it again.")
    if version != FORMAT_VERSION:
        raise ModelIntegrityError(
            f"{directory} was saved in format version {version}; this stacker ({__version__}) reads version "
            f"{FORMAT_VERSION}. Refit the ensemble or use the stacker release that wrote it.")
    return manifest


def environment() -> dict:
    """Versions of what decides the numbers (for reports and manifests)."""
    import platform

    import h5py
    import keras
    import sklearn

    try:
        import tensorflow as tf

        tf_version = tf.__version__
    except ImportError:  # pragma: no cover - tensorflow is a dependency
        tf_version = None
    return {"stacker": __version__, "python": platform.python_version(), "platform": platform.platform(),
            "tensorflow": tf_version, "keras": keras.__version__, "numpy": np.__version__,
            "scikit-learn": sklearn.__version__, "h5py": h5py.__version__}


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def dataset_fingerprint(paths, cache_dir=None) -> str:
    """Short hash of a set of files (for reports)."""
    return hashlib.sha256("\n".join(sorted(file_fingerprints(paths, cache_dir))).encode()).hexdigest()[:16]
