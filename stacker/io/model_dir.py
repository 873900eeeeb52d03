"""A fitted ensemble on disk: its directory's files, its manifest, and reading both back.

:func:`save_ensemble` writes every learner (source networks, ONNX graphs, fold models),
level 2, the out-of-fold arrays, training curves and ``manifest.json`` (parameters,
scores, each file's sha256) into a temporary directory, then publishes it with the
manifest last. :func:`load_ensemble` checks the format version and every file's sha256
before rebuilding anything, through :mod:`stacker.io.persist` (no pickle, trusted types only).

A directory from someone else touches nothing outside itself: before anything is read,
every entry is checked with ``lstat`` and a symbolic link (or a FIFO, socket, device)
anywhere in it is refused by name; members are hashed through ``O_NOFOLLOW``; the
manifest is checked against :mod:`stacker.io.manifest`'s schema; and no machine path in it
(``cache_dir``, ``weights_dir``, a weights file) is used: the caller's settings apply.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat

import numpy as np
from sklearn.utils.validation import check_is_fitted

from stacker import __version__
from stacker.backbones.torch_checkpoint import sha256_file
from stacker.data.sources import file_fingerprints
from stacker.io.bounds import check_manifest_sizes, checked_array_file
from stacker.io.export import readiness
from stacker.io.manifest import ManifestError, check_manifest
from stacker.io.persist import (ModelIntegrityError, load_estimator, load_unfitted, member, save_estimator,
                                save_unfitted, trusted_types)
from stacker.learners.base import describe, saved_networks
from stacker.learners.kinds import LEARNER_KINDS
from stacker.level2.selection import Level2

__all__ = ["FORMAT_VERSION", "MANIFEST", "check_output_dir", "save_ensemble", "load_ensemble", "read_manifest",
           "environment", "dataset_fingerprint"]

FORMAT_VERSION = 4  # 3: skops files instead of pickles; 4: classes at the sub-package paths (stacker.learners...)
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES_ENV = "STACKER_MAX_MANIFEST_BYTES"
MAX_MANIFEST_BYTES = 256 * 2**20  # a manifest is parameters, scores and file lists: megabytes even for 10^6 images
# Parameters that name places on the machine that fitted the model: never taken from a manifest.
MACHINE_PATH_PARAMS = ("cache_dir", "weights_dir")
RUN_TIME_PARAMS = ("strategy", "device")  # where this machine runs the work, not part of the model


def check_output_dir(directory, option: str | None = None) -> None:
    """Refuse a folder a model cannot be saved into, before the work of fitting one.

    New, empty, or a stacker model directory (one with a manifest, which saving replaces):
    fine. Anything else would mix a model with someone's files. ``option`` (``"--out"``)
    names the folder in a command line's terms.
    """
    directory = os.fspath(directory)
    where = f"{option} {directory}" if option else directory
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise FileExistsError(f"{where} exists and is a file, not a folder; give a new or empty folder")
    names = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    if names and MANIFEST not in names:
        held = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise FileExistsError(f"{where} exists and is not a stacker model directory (it holds {held}); "
                              "give a new or empty folder")


def save_ensemble(ens, directory, onnx: bool | None = None) -> str:
    """Write a fitted ensemble to ``directory`` (see :meth:`stacker.Ensemble.save`)."""
    check_is_fitted(ens, "meta_")
    directory = os.fspath(directory)
    check_output_dir(directory)
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
        "train_ids": [str(i) for i in ens.train_ids_],
        "train_paths": [os.path.abspath(p) for p in ens.train_paths_],  # found by a report run from any folder
        "histories": {n: [getattr(est, "history_", None) for est in lr.fold_models_]
                      for n, lr in ens.learners_.items()},
        "export": readiness(ens),  # whether `stacker export` can write it (the report says so)
    }
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1, default=_json_default)
    _publish(tmp, directory)
    return directory


def load_ensemble(cls, directory, trusted=None, **params):
    """A saved ensemble of class ``cls``, every file's sha256 checked (see :meth:`stacker.Ensemble.load`).

    Nothing outside ``directory`` is read or written: links in it are refused before anything is
    read, and the manifest's machine paths are dropped (``cache_dir``, ``weights_dir`` and weights
    files come from the caller's ``params``, default None; the networks come from the directory).
    """
    directory = os.fspath(directory)
    check_tree(directory)
    manifest = read_manifest(directory)
    where = os.path.join(directory, MANIFEST)
    check_manifest_sizes(manifest, where)  # input sizes within stacker.io.bounds before any model is built
    _check_references(manifest, directory)
    for rel, digest in manifest["files"].items():
        if _member_sha256(directory, rel) != digest:
            raise ModelIntegrityError(f"{directory}: {rel} does not match its sha256 in the manifest "
                                      "(modified or corrupted); refusing to load it")
    trusted = trusted_types(trusted or ())
    saved = _local_params(_decode_params(manifest["params"], directory, trusted), where, cls)
    ens = cls(**{**saved, **params})
    ens.classes_ = manifest["classes"]
    ens.trusted_types_ = tuple(trusted)
    settings = ens.learner_settings()
    entries = [{**e, "spec": _without_weights_path(e["spec"])} for e in manifest["learners"]]
    networks = saved_networks(entries, directory, manifest["files"])
    ens.learners_ = {e["name"]: LEARNER_KINDS[e["kind"]].load(e, directory, settings, networks) for e in entries}
    ens.specs_ = [lr.spec for lr in ens.learners_.values()]
    lv = manifest["level2"]
    with np.load(checked_array_file(os.path.join(directory, "oof.npz")), allow_pickle=False) as oof:
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


def check_tree(directory: str) -> None:
    """Refuse a model directory holding a symbolic link (to a file or a folder, inside or out) or anything
    but regular files and folders (a FIFO would block a read, a device read the machine), by name.

    Only ``lstat`` is used: nothing is followed or opened. The directory itself is the path the
    caller named and may be a link; what it contains may not.
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory} is not a saved stacker ensemble (not a directory)")
    pending = [directory]
    while pending:
        folder = pending.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                rel = os.path.relpath(entry.path, directory)
                if entry.is_symlink():
                    raise ModelIntegrityError(
                        f"{directory}: {rel} is a symbolic link (to {os.readlink(entry.path)[:200]!r}); a model "
                        "directory's files are never read through links (one could point at any file on this "
                        "machine), refusing to load it. Copy the real files in instead of linking them.")
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                elif not entry.is_file(follow_symlinks=False):
                    raise ModelIntegrityError(f"{directory}: {rel} is not a regular file or folder (a FIFO, socket "
                                              "or device); refusing to load the model directory")


def _member_sha256(directory: str, rel: str) -> str:
    """sha256 of a listed member, opened with ``O_NOFOLLOW`` (a link swapped in after :func:`check_tree`
    is refused, not followed) and ``O_NONBLOCK`` (a FIFO does not hang the open)."""
    path = member(directory, rel)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ModelIntegrityError(f"{directory}: file {rel} listed in the manifest is missing") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ModelIntegrityError(f"{directory}: {rel} is a symbolic link; a model directory's files are "
                                      "never read through links, refusing to load it") from None
        raise
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ModelIntegrityError(f"{directory}: {rel} listed in the manifest is not a regular file")
        digest = hashlib.sha256()
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_references(manifest: dict, directory: str) -> None:
    """Every file the loader will open is inside the directory and listed (so hashed), and every learner
    kind is registered."""
    where = os.path.join(directory, MANIFEST)
    files = manifest["files"]
    listed_stems = {os.path.splitext(rel)[0] for rel in files}
    needed = [("the out-of-fold arrays", "oof.npz", "oof.npz" in files),
              ("the level-2 model", "meta", "meta" in listed_stems)]
    for i, e in enumerate(manifest["learners"]):
        if e["kind"] not in LEARNER_KINDS:
            raise ManifestError(f"{where}: the manifest's field learners[{i}].kind is {e['kind']!r}, not a "
                                f"registered learner kind ({', '.join(sorted(LEARNER_KINDS))}); refusing to load it")
        needed.append((f"the field learners[{i}].backbone_file", e["backbone_file"], e["backbone_file"] in files))
        if e.get("onnx_file") is not None:
            needed.append((f"the field learners[{i}].onnx_file", e["onnx_file"], e["onnx_file"] in files))
        needed += [(f"the field learners[{i}].folds[{j}]", stem, stem in listed_stems)
                   for j, stem in enumerate(e["folds"])]
    for what, rel, listed in needed:
        member(directory, rel)  # inside the directory, through no link
        if not listed:
            raise ManifestError(f"{where}: {what} ({rel!r}) is not among the manifest's files, so it has no "
                                "sha256; refusing to load it")


def _is_weights_path(value) -> bool:
    return value not in (None, "imagenet")


def _without_weights_path(spec: dict) -> dict:
    """A learner spec whose weights file (a path on the machine that fitted it) is replaced by None:
    the saved network comes from the directory's own archive, never from that path."""
    return {**spec, "weights": None} if _is_weights_path(spec.get("weights")) else spec


def _local_params(saved: dict, where: str, cls) -> dict:
    """Saved parameters, checked, with every machine path dropped (the caller's settings apply).

    ``cache_dir`` and ``weights_dir`` become None (a cache folder named by a stranger would receive
    features and probabilities); weights files (top-level ``weights`` and each backbone's) become
    None: they are paths on the machine that fitted the model (pass ``weights=`` to refit).
    """
    from stacker.validation import ensemble_params

    rows = {p.name: p for p in ensemble_params()}
    unknown = sorted(set(saved) - set(rows))
    if unknown:
        raise ManifestError(f"{where}: the manifest's field params names unknown parameters {unknown[:5]} of "
                            f"{cls.__name__}; refusing to load it")
    out = {k: v for k, v in saved.items() if k not in MACHINE_PATH_PARAMS}
    if _is_weights_path(out.get("weights")):
        out["weights"] = None
    if isinstance(out.get("backbones"), list):
        out["backbones"] = [_without_weights_path(b) if isinstance(b, dict) else b for b in out["backbones"]]
    for name, value in out.items():
        try:
            rows[name].validate(value)
        except ValueError as exc:
            raise ManifestError(f"{where}: the manifest's field params.{name} is not valid ({exc}); "
                                "refusing to load it") from None
    return out


def _encode_params(params: dict, directory: str) -> dict:
    """``get_params()`` as JSON: tuples tagged, estimators saved beside the manifest, run-time choices dropped."""
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

    return {k: enc(v, k) for k, v in params.items() if k not in RUN_TIME_PARAMS}


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
    """The manifest of a saved ensemble, with its format (and, to load it, its version and schema) checked.

    The manifest must be a regular file (not a link), at most ``$STACKER_MAX_MANIFEST_BYTES``
    (default 256 MiB) long, and JSON; a bad one raises an error naming it and the reason.
    """
    path = os.path.join(os.fspath(directory), MANIFEST)
    if os.path.islink(path):
        raise ModelIntegrityError(f"{path} is a symbolic link; a model directory's files are never read through "
                                  "links, refusing to load it")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} is not a saved stacker ensemble (no {MANIFEST})")
    limit = int(os.environ.get(MAX_MANIFEST_BYTES_ENV) or MAX_MANIFEST_BYTES)
    size = os.path.getsize(path)
    if size > limit:
        raise ManifestError(f"{path} is {size} bytes, over the {limit}-byte limit for a manifest "
                            f"(${MAX_MANIFEST_BYTES_ENV} raises it); refusing to read it")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, encoding="utf-8") as f:
            manifest = json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise ManifestError(f"{path} is not valid JSON ({exc}); refusing to load it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "stacker-ensemble":
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
            f"{directory} was saved in format version {version!r}; this stacker ({__version__}) reads version "
            f"{FORMAT_VERSION}. Refit the ensemble or use the stacker release that wrote it.")
    return check_manifest(manifest, path)


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
