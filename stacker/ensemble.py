"""The stacked ensemble: backbones -> cached features -> out-of-fold heads -> meta-learner.

:class:`Ensemble` is the only module that knows about folds. One stratified splitter,
seeded by ``random_state``, gives the folds every base learner uses; each training
image's base probabilities come from the fold model that did not see it, and the
meta-learner learns only from those out-of-fold probabilities. The ensemble's own
score is cross-validated over the same folds (the meta-learner is refitted per fold on
out-of-fold inputs), so the leaderboard shows honest numbers for every row.

For new images each base learner averages its fold models' probabilities.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings

import numpy as np
from sklearn.metrics import accuracy_score, log_loss
from sklearn.model_selection import StratifiedKFold

from . import __version__
from . import backbones as _backbones
from . import images as _images
from .cache import ResultStore, stable_hash
from .features import FeatureExtractor, forward_pass_count
from .learners import load_estimator, make_head, save_estimator
from .meta import META_INPUTS, make_meta, meta_matrix
from .torch_checkpoint import sha256_file

__all__ = ["Ensemble", "FORMAT_VERSION", "format_leaderboard", "ModelIntegrityError"]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class ModelIntegrityError(ValueError):
    """A saved ensemble's files do not match its manifest (tampered, truncated or foreign)."""


def _learner_specs(backbones, input_size, weights, head) -> list[dict]:
    specs = []
    for b in ([backbones] if isinstance(backbones, (str, dict)) else list(backbones)):
        spec = {"backbone": b} if isinstance(b, str) else dict(b)
        spec.setdefault("input_size", input_size)
        spec.setdefault("weights", weights)
        spec.setdefault("head", head)
        cfg = _backbones.get_cfg(spec["backbone"])
        spec["backbone"] = cfg.name
        size = spec["input_size"] or cfg.input_size
        spec["name"] = spec.get("name") or (cfg.name if not spec["input_size"] else f"{cfg.name}@{size}")
        specs.append(spec)
    names = [s["name"] for s in specs]
    if not specs:
        raise ValueError("an ensemble needs at least one backbone")
    if len(set(names)) != len(names):
        raise ValueError(f"base learner names must be unique, got {names}")
    return specs


def _clip(proba) -> np.ndarray:
    proba = np.clip(proba, 1e-15, 1.0)
    return proba / proba.sum(axis=1, keepdims=True)


def _score(y, proba, n_classes) -> dict:
    proba = _clip(proba)
    out = {"accuracy": float(accuracy_score(y, proba.argmax(1))),
           "log_loss": float(log_loss(y, proba, labels=np.arange(n_classes)))}
    if n_classes > 5:
        top5 = np.argsort(-proba, axis=1)[:, :5]
        out["top5_accuracy"] = float((top5 == np.asarray(y)[:, None]).any(axis=1).mean())
    return out


class Ensemble:
    """A stacked ensemble of pretrained CNNs for image classification.

    Parameters
    ----------
    backbones : list of str or dict
        Registered backbone names; a dict may set ``backbone``, ``input_size``,
        ``weights``, ``head`` and ``name`` for one learner.
    weights : {"imagenet", None} or path
        Default weights of every backbone.
    head : {"dense", "logistic"} or estimator
        Base-learner classifier on each backbone's features.
    meta : {"dense", "logistic", "mean"} or estimator
        Meta-learner on the stacked out-of-fold outputs.
    meta_inputs : {"proba", "features", "both"}
        What the meta-learner sees.
    cv : int
        Number of stratified folds.
    random_state : int
        Seeds folds and every learner: one seed, one result.
    input_size : int, optional
        Square input size for every backbone (default: each backbone's own).
    batch_size : int
        Images per CNN forward pass.
    feature_dtype : {"float32", "float16"}
        Storage type of cached features.
    cache_dir : path, optional
        Feature and learner cache; without it nothing is reused between runs.
    weights_dir : path, optional
        Offline weight files (default ``$STACKER_WEIGHTS_DIR``).
    on_bad_image : {"raise", "skip"}
        Policy for unusable image files.
    resize : {"bilinear", "bicubic"}
        How images are resized to each backbone's input size.
    verbose : int

    Attributes
    ----------
    classes_ : list of str
    folds_ : list of (train_rows, val_rows)
    learners_ : dict
        Learner name -> list of fitted fold heads.
    oof_proba_ : dict
        Learner name -> out-of-fold probabilities of the training images.
    meta_ : estimator
        Meta-learner fitted on all out-of-fold inputs.
    meta_oof_proba_ : ndarray
        The ensemble's cross-validated probabilities of the training images.
    scores_ : dict
        Name -> accuracy, log loss and timings; ``"ensemble"`` for the stack.
    skipped_ : dict
        Path -> reason for training images left out (``on_bad_image="skip"``).

    Examples
    --------
    >>> ens = Ensemble(["efficientnet_lite0"], cache_dir="artifacts/cache")  # doctest: +SKIP
    >>> ens.fit(stacker.images.load_images("data/train")).save("artifacts/model")  # doctest: +SKIP
    """

    def __init__(self, backbones=("efficientnet_lite0",), weights="imagenet", head="dense", meta="dense",
                 meta_inputs="proba", cv=5, random_state=0, input_size=None, batch_size=32,
                 feature_dtype="float32", cache_dir=None, weights_dir=None, on_bad_image="raise", resize="bilinear",
                 verbose=1):
        self.backbones = backbones
        self.weights = weights
        self.head = head
        self.meta = meta
        self.meta_inputs = meta_inputs
        self.cv = cv
        self.random_state = random_state
        self.input_size = input_size
        self.batch_size = batch_size
        self.feature_dtype = feature_dtype
        self.cache_dir = cache_dir
        self.weights_dir = weights_dir
        self.on_bad_image = on_bad_image
        self.resize = resize
        self.verbose = verbose

    # ------------------------------------------------------------------ helpers
    def _log(self, msg: str) -> None:
        if self.verbose:
            print(msg, flush=True)

    def _check_fitted(self):
        if not hasattr(self, "meta_"):
            raise RuntimeError("this Ensemble is not fitted yet: call fit(images) or Ensemble.load(dir)")

    def _extractor(self, spec) -> FeatureExtractor:
        return FeatureExtractor(spec["backbone"], weights=spec["weights"], input_size=spec["input_size"],
                                batch_size=self.batch_size, feature_dtype=self.feature_dtype,
                                cache_dir=self.cache_dir, weights_dir=self.weights_dir,
                                on_bad_image=self.on_bad_image, resize=self.resize, verbose=self.verbose)

    def _validate(self, data: _images.ImageSet):
        if self.meta_inputs not in META_INPUTS:
            raise ValueError(f"meta_inputs must be one of {META_INPUTS}, got {self.meta_inputs!r}")
        if not isinstance(self.cv, int) or self.cv < 2:
            raise ValueError(f"cv must be an integer >= 2, got {self.cv!r}")
        if data.labels is None:
            raise ValueError("fit needs labelled images")
        counts = np.bincount(data.y, minlength=len(data.classes))
        if len(data.classes) < 2:
            raise ValueError(f"only one class ({data.classes[0]!r}) in the training images; need two or more")
        small = [c for c, n in zip(data.classes, counts) if n < self.cv]
        if small:
            raise ValueError(f"classes {small[:10]} have fewer images than cv={self.cv} folds; "
                             "add images, merge classes or lower cv")

    # ------------------------------------------------------------------ fit
    def fit(self, images):
        """Extract (or reuse) features, fit out-of-fold base learners, then the meta-learner.

        Parameters
        ----------
        images : ImageSet, folder or CSV path
            Labelled training images.

        Returns
        -------
        self
        """
        data = _images.load_images(images)
        self._validate(data)
        specs = _learner_specs(self.backbones, self.input_size, self.weights, self.head)
        self.classes_ = list(data.classes)
        self.specs_ = specs
        self.extractors_ = {s["name"]: self._extractor(s) for s in specs}

        feats, timings = {}, {}
        skipped: dict = {}
        kept = np.arange(len(data))
        for s in specs:
            t0 = time.perf_counter()
            before = forward_pass_count()
            f = self.extractors_[s["name"]].extract(data)
            n_fwd = forward_pass_count() - before
            dt = time.perf_counter() - t0
            timings[s["name"]] = {"extract_s": dt, "forward_images": n_fwd,
                                  "s_per_image": dt / n_fwd if n_fwd else None,
                                  "inference_s_per_image": self.extractors_[s["name"]].seconds_per_image()}
            feats[s["name"]] = f
            skipped.update({data.paths[r]: reason for r, reason in f.skipped.items()})
            kept = np.intersect1d(kept, f.kept)
        if skipped:
            warnings.warn(f"{len(skipped)} training images were skipped as unusable; see Ensemble.skipped_")
        self.skipped_ = skipped
        data = data.subset(kept)
        self._validate(data)
        X = {n: f.values[np.searchsorted(f.kept, kept)] for n, f in feats.items()}
        y = data.y
        k = len(self.classes_)
        splitter = StratifiedKFold(n_splits=self.cv, shuffle=True, random_state=self.random_state)
        self.folds_ = [(tr, va) for tr, va in splitter.split(np.zeros(len(y)), y)]
        self.train_ids_ = list(data.ids)
        self.y_ = y

        self.learners_, self.oof_proba_ = {}, {}
        fp_hash = stable_hash([_images.file_fingerprints(data.paths), data.labels])
        store = ResultStore(os.path.join(self.cache_dir, "learners")) if self.cache_dir else None
        self.learner_keys_ = {}
        for s in specs:
            name = s["name"]
            key = stable_hash({"features": self.extractors_[name].key_meta(), "images": fp_hash,
                               "head": _describe(s["head"]), "cv": self.cv, "seed": self.random_state,
                               "stacker": __version__, "dtype": self.feature_dtype})[:24]
            self.learner_keys_[name] = key
            t0 = time.perf_counter()
            cached = store.get(key) if store else None
            if cached:
                folds = [load_estimator(os.path.join(cached, f"fold{i}")) for i in range(self.cv)]
                oof = np.load(os.path.join(cached, "oof.npy"))
                timing_file = os.path.join(cached, "timing.json")
                first_fit_s = None
                if os.path.exists(timing_file):
                    with open(timing_file) as f:
                        first_fit_s = json.load(f).get("train_s")
                self._log(f"{name}: out-of-fold predictions from the cache")
            else:
                folds, oof = self._fit_folds(name, s["head"], X[name], y, k)
                first_fit_s = time.perf_counter() - t0
                if store:
                    with store.put(key) as tmp:
                        for i, est in enumerate(folds):
                            save_estimator(est, os.path.join(tmp, f"fold{i}"))
                        np.save(os.path.join(tmp, "oof.npy"), oof)
                        with open(os.path.join(tmp, "timing.json"), "w") as f:
                            json.dump({"train_s": first_fit_s}, f)
            timings[name]["train_s"] = time.perf_counter() - t0
            epochs = sum(len((getattr(est, "history_", None) or {}).get("loss", [])) for est in folds)
            timings[name]["head_fit_s"] = first_fit_s
            timings[name]["epochs"] = epochs
            timings[name]["s_per_epoch"] = first_fit_s / epochs if epochs and first_fit_s else None
            self.learners_[name], self.oof_proba_[name] = folds, oof

        t0 = time.perf_counter()
        names = [s["name"] for s in specs]
        Z = meta_matrix([self.oof_proba_[n] for n in names], [X[n] for n in names], self.meta_inputs)
        self.meta_oof_proba_ = np.zeros((len(y), k))
        for i, (tr, va) in enumerate(self.folds_):
            m = make_meta(self.meta, len(names), self.random_state + i).fit(Z[tr], y[tr])
            self.meta_oof_proba_[va] = _align(m, m.predict_proba(Z[va]), k)
        self.meta_ = make_meta(self.meta, len(names), self.random_state).fit(Z, y)
        timings["ensemble"] = {"train_s": time.perf_counter() - t0}
        blocks = _meta_blocks(names, [self.oof_proba_[n].shape[1] for n in names],
                              [X[n].shape[1] for n in names], self.meta_inputs)
        self.meta_importance_ = _permutation_importance(self.meta_, Z, y, blocks, k, self.random_state)
        self.train_paths_ = list(data.paths)
        self.config_ = {"backbones": [{k2: (v if isinstance(v, (str, int, float, type(None))) else _describe(v))
                                       for k2, v in s.items()} for s in specs],
                        "head": _describe(self.head), "meta": _describe(self.meta), "meta_inputs": self.meta_inputs,
                        "cv": self.cv, "random_state": self.random_state, "feature_dtype": self.feature_dtype,
                        "n_train": len(y), "data_fingerprint": dataset_fingerprint(data.paths)}
        self.environment_ = environment()

        self.scores_ = {}
        for n in names:
            self.scores_[n] = {**_score(y, self.oof_proba_[n], k), **timings[n],
                               "feature_dim": int(X[n].shape[1])}
        self.scores_["ensemble"] = {**_score(y, self.meta_oof_proba_, k), **timings["ensemble"],
                                    "meta": _describe(self.meta), "meta_inputs": self.meta_inputs}
        return self

    def _fit_folds(self, name, head, X, y, k):
        oof = np.zeros((len(y), k))
        folds = []
        for i, (tr, va) in enumerate(self.folds_):
            est = make_head(head, self.random_state + i).fit(X[tr], y[tr])
            oof[va] = _align(est, est.predict_proba(X[va]), k)
            folds.append(est)
            self._log(f"{name}: fold {i + 1}/{self.cv} log loss "
                      f"{log_loss(y[va], _clip(oof[va]), labels=np.arange(k)):.4f}")
        return folds, oof

    # ------------------------------------------------------------------ predict
    def _base_probas(self, images):
        """Per-learner fold-averaged probabilities and features for ``images``."""
        self._check_fitted()
        names = [s["name"] for s in self.specs_]
        if _is_in_memory(images):
            arrays = list(images)
            probas, feats = [], []
            for n in names:
                F = self.extractors_[n].transform_arrays(arrays)
                feats.append(F)
                probas.append(self._fold_average(n, F))
            return probas, feats, np.arange(len(arrays)), {}
        data = _as_image_set(images)
        probas, feats, kept, skipped = [], [], np.arange(len(data)), {}
        per = {}
        for n in names:
            f = self.extractors_[n].extract(data)
            per[n] = f
            skipped.update(f.skipped)
            kept = np.intersect1d(kept, f.kept)
        for n in names:
            f = per[n]
            F = f.values[np.searchsorted(f.kept, kept)]
            feats.append(F)
            probas.append(self._cached_test_proba(n, F, [data.paths[i] for i in kept]))
        return probas, feats, kept, skipped

    def _fold_average(self, name, F):
        k = len(self.classes_)
        return np.mean([_align(est, est.predict_proba(F), k) for est in self.learners_[name]], axis=0)

    def _cached_test_proba(self, name, F, paths):
        key = getattr(self, "learner_keys_", {}).get(name)
        if not self.cache_dir or key is None or not paths:
            return self._fold_average(name, F)
        store = ResultStore(os.path.join(self.cache_dir, "test_proba"))
        pkey = stable_hash([key, _images.file_fingerprints(paths)])[:24]
        hit = store.get(pkey)
        if hit:
            return np.load(os.path.join(hit, "proba.npy"))
        proba = self._fold_average(name, F)
        with store.put(pkey) as tmp:
            np.save(os.path.join(tmp, "proba.npy"), proba)
        return proba

    def predict_proba(self, images) -> np.ndarray:
        """Class probabilities ``(n, n_classes)`` in input order.

        ``images``: an ImageSet, a folder, a list of paths, or in-memory images. Rows
        of images skipped under ``on_bad_image="skip"`` are NaN.
        """
        probas, feats, kept, skipped = self._base_probas(images)
        n = len(kept) + len(skipped)
        out = np.full((n, len(self.classes_)), np.nan)
        if len(kept):
            Z = meta_matrix(probas, feats, self.meta_inputs)
            out[kept] = _align(self.meta_, self.meta_.predict_proba(Z), len(self.classes_))
        self.last_skipped_ = skipped
        return out

    def predict(self, images) -> np.ndarray:
        """Predicted class names (``None`` for skipped images)."""
        proba = self.predict_proba(images)
        names = np.array(self.classes_, dtype=object)
        out = np.full(len(proba), None, dtype=object)
        ok = ~np.isnan(proba).any(axis=1)
        out[ok] = names[proba[ok].argmax(axis=1)]
        return out

    def evaluate(self, images=None) -> dict:
        """Accuracy and log loss of every base learner and the ensemble.

        Without ``images``: the cross-validated (out-of-fold) scores from ``fit``.
        With a labelled set: scores on it.
        """
        self._check_fitted()
        if images is None:
            return self.scores_
        data = _as_image_set(images, labelled=True)
        if data.labels is None:
            raise ValueError("evaluate needs labelled images")
        unknown = sorted(set(data.labels) - set(self.classes_))
        if unknown:
            raise ValueError(f"labels {unknown[:5]} were not among the classes this ensemble was trained on")
        index = {c: i for i, c in enumerate(self.classes_)}
        probas, feats, kept, _ = self._base_probas(data)
        y = np.array([index[data.labels[i]] for i in kept])
        k = len(self.classes_)
        out = {s["name"]: _score(y, p, k) for s, p in zip(self.specs_, probas)}
        Z = meta_matrix(probas, feats, self.meta_inputs)
        out["ensemble"] = _score(y, _align(self.meta_, self.meta_.predict_proba(Z), k), k)
        return out

    def leaderboard(self) -> str:
        """The out-of-fold leaderboard as a text table."""
        self._check_fitted()
        return format_leaderboard(self.scores_)

    # ------------------------------------------------------------------ save / load
    def save(self, directory) -> str:
        """Write the fitted ensemble to ``directory`` (manifest, .keras models, joblib, checksums)."""
        self._check_fitted()
        directory = os.fspath(directory)
        if os.path.isdir(directory) and os.listdir(directory) and not os.path.exists(os.path.join(directory, MANIFEST)):
            raise FileExistsError(f"{directory} exists and is not a stacker model directory; "
                                  "save into a new or empty directory")
        tmp = os.path.abspath(directory).rstrip("/") + f".tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "backbones"))
        os.makedirs(os.path.join(tmp, "learners"))
        learners = []
        for s in self.specs_:
            n = s["name"]
            ext = self.extractors_[n]
            bb_file = f"backbones/{n.replace('@', '_')}.keras"
            ext.model.save(os.path.join(tmp, bb_file))
            folds = []
            for i, est in enumerate(self.learners_[n]):
                stem = f"learners/{n.replace('@', '_')}_fold{i}"
                folds.append(stem)
                save_estimator(est, os.path.join(tmp, stem))
            learners.append({"name": n, "backbone": s["backbone"], "input_size": ext.size,
                             "weights_id": ext.weights_id, "backbone_file": bb_file, "folds": folds,
                             "head": _describe(s["head"]), "learner_key": self.learner_keys_.get(n)})
        save_estimator(self.meta_, os.path.join(tmp, "meta"))
        names = [s["name"] for s in self.specs_]
        np.savez_compressed(os.path.join(tmp, "oof.npz"), y=self.y_, ensemble=self.meta_oof_proba_,
                            **{f"learner_{i}": self.oof_proba_[n] for i, n in enumerate(names)})
        files = {}
        for root, _dirs, file_names in os.walk(tmp):
            for f in file_names:
                full = os.path.join(root, f)
                files[os.path.relpath(full, tmp)] = sha256_file(full)
        manifest = {
            "format": "stacker-ensemble", "format_version": FORMAT_VERSION, "stacker_version": __version__,
            "classes": self.classes_, "learners": learners, "meta": _describe(self.meta),
            "meta_inputs": self.meta_inputs, "cv": self.cv, "random_state": self.random_state,
            "feature_dtype": self.feature_dtype, "batch_size": self.batch_size, "resize": self.resize,
            "scores": self.scores_, "skipped": self.skipped_, "files": files,
            "meta_importance": self.meta_importance_, "config": self.config_, "environment": self.environment_,
            "train_ids": [str(i) for i in self.train_ids_], "train_paths": self.train_paths_,
            "histories": {n: [getattr(est, "history_", None) for est in self.learners_[n]] for n in names},
        }
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1, default=_json_default)
        _publish(tmp, directory)
        return directory

    @classmethod
    def load(cls, directory, cache_dir=None, verbose=0) -> "Ensemble":
        """Load a saved ensemble after verifying every file's sha256.

        Never load a model directory from an untrusted source: although Keras models
        load with ``safe_mode=True`` and checksums are verified first, joblib files
        are pickles.
        """
        import keras

        directory = os.fspath(directory)
        manifest = read_manifest(directory)
        for rel, digest in manifest["files"].items():
            path = os.path.join(directory, rel)
            if not os.path.isfile(path):
                raise ModelIntegrityError(f"{directory}: file {rel} listed in the manifest is missing")
            if sha256_file(path) != digest:
                raise ModelIntegrityError(f"{directory}: {rel} does not match its sha256 in the manifest "
                                          "(modified or corrupted); refusing to load it")
        ens = cls(backbones=[{"backbone": lr["backbone"], "input_size": lr["input_size"], "name": lr["name"]}
                             for lr in manifest["learners"]],
                  meta=manifest["meta"], meta_inputs=manifest["meta_inputs"], cv=manifest["cv"],
                  random_state=manifest["random_state"], feature_dtype=manifest["feature_dtype"],
                  batch_size=manifest.get("batch_size", 32), cache_dir=cache_dir, verbose=verbose,
                  resize=manifest.get("resize", "bilinear"))
        ens.classes_ = manifest["classes"]
        ens.specs_ = []
        ens.extractors_, ens.learners_, ens.learner_keys_ = {}, {}, {}
        custom = _backbones.custom_objects()
        for lr in manifest["learners"]:
            model = keras.saving.load_model(os.path.join(directory, lr["backbone_file"]), safe_mode=True,
                                            compile=False, custom_objects=custom)
            spec = {"backbone": lr["backbone"], "input_size": lr["input_size"], "name": lr["name"],
                    "weights": None, "head": lr["head"]}
            ens.specs_.append(spec)
            ens.extractors_[lr["name"]] = FeatureExtractor(
                lr["backbone"], weights=None, input_size=lr["input_size"], batch_size=ens.batch_size,
                feature_dtype=ens.feature_dtype, cache_dir=cache_dir, verbose=verbose, model=model,
                weights_id=lr["weights_id"], on_bad_image=ens.on_bad_image, resize=ens.resize)
            ens.learners_[lr["name"]] = [load_estimator(os.path.join(directory, stem)) for stem in lr["folds"]]
            if lr.get("learner_key"):
                ens.learner_keys_[lr["name"]] = lr["learner_key"]
        ens.meta_ = load_estimator(os.path.join(directory, "meta"))
        ens.scores_ = manifest.get("scores", {})
        ens.skipped_ = manifest.get("skipped", {})
        ens.meta_importance_ = manifest.get("meta_importance", {})
        ens.config_ = manifest.get("config", {})
        ens.environment_ = manifest.get("environment", {})
        ens.train_ids_ = manifest.get("train_ids", [])
        ens.train_paths_ = manifest.get("train_paths", [])
        oof_path = os.path.join(directory, "oof.npz")
        if os.path.exists(oof_path):
            with np.load(oof_path, allow_pickle=False) as oof:
                ens.y_ = oof["y"]
                ens.meta_oof_proba_ = oof["ensemble"]
                ens.oof_proba_ = {lr["name"]: oof[f"learner_{i}"] for i, lr in enumerate(manifest["learners"])}
        return ens


def _publish(tmp: str, directory: str) -> None:
    """Move a freshly written model from ``tmp`` into ``directory``, replacing only its own files.

    The manifest goes last, so a directory with a manifest always has the files it lists.
    """
    os.makedirs(directory, exist_ok=True)
    old_manifest = os.path.join(directory, MANIFEST)
    if os.path.exists(old_manifest):
        os.remove(old_manifest)
    for name in ("backbones", "learners"):
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    for name in os.listdir(directory):
        if name.startswith("meta."):
            os.remove(os.path.join(directory, name))
    for name in sorted(os.listdir(tmp), key=lambda n: n == MANIFEST):
        os.replace(os.path.join(tmp, name), os.path.join(directory, name))
    os.rmdir(tmp)


def read_manifest(directory) -> dict:
    """The manifest of a saved ensemble, with its format checked."""
    path = os.path.join(os.fspath(directory), MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} is not a saved stacker ensemble (no {MANIFEST})")
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != "stacker-ensemble":
        raise ModelIntegrityError(f"{path} is not a stacker ensemble manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelIntegrityError(
            f"{directory} was saved in format version {version}; this stacker ({__version__}) reads version "
            f"{FORMAT_VERSION}. Refit the ensemble or use the stacker release that wrote it.")
    return manifest


def _meta_blocks(names, proba_dims, feature_dims, meta_inputs) -> dict:
    """Column indices of each learner's inputs in the meta matrix (see ``meta_matrix``)."""
    blocks = {n: [] for n in names}
    col = 0
    if meta_inputs in ("proba", "both"):
        for n, d in zip(names, proba_dims):
            blocks[n] += list(range(col, col + d))
            col += d
    if meta_inputs in ("features", "both"):
        for n, d in zip(names, feature_dims):
            blocks[n] += list(range(col, col + d))
            col += d
    return blocks


def _permutation_importance(meta, Z, y, blocks: dict, k: int, seed: int, repeats: int = 3) -> dict:
    """How much the meta-learner's log loss grows when one learner's inputs are shuffled across rows."""
    rng = np.random.default_rng(seed)
    base = log_loss(y, _clip(_align(meta, meta.predict_proba(Z), k)), labels=np.arange(k))
    out = {}
    for name, cols in blocks.items():
        losses = []
        for _ in range(repeats):
            Zp = Z.copy()
            Zp[:, cols] = Z[rng.permutation(len(Z))][:, cols]
            losses.append(log_loss(y, _clip(_align(meta, meta.predict_proba(Zp), k)), labels=np.arange(k)))
        out[name] = float(np.mean(losses) - base)
    return out


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


def _align(est, proba, k: int) -> np.ndarray:
    """Put an estimator's probability columns in class-index order (missing classes get 0)."""
    proba = np.asarray(proba, dtype=np.float64)
    classes = np.asarray(getattr(est, "classes_", np.arange(proba.shape[1])))
    if proba.shape[1] == k and np.array_equal(classes, np.arange(k)):
        return proba
    out = np.zeros((len(proba), k))
    out[:, classes.astype(int)] = proba
    return out


def _describe(spec) -> str:
    if isinstance(spec, str):
        return spec
    return f"{type(spec).__name__}({json.dumps(_jsonable_params(spec), sort_keys=True, default=str)})"


def _jsonable_params(est) -> dict:
    try:
        return {k: v for k, v in est.get_params(deep=False).items() if not hasattr(v, "get_params")}
    except AttributeError:
        return {}


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def _is_in_memory(images) -> bool:
    if isinstance(images, np.ndarray):
        return True
    if isinstance(images, (list, tuple)) and images:
        first = images[0]
        return not isinstance(first, (str, os.PathLike))
    return False


def _as_image_set(images, labelled: bool = False) -> _images.ImageSet:
    if isinstance(images, _images.ImageSet):
        return images
    if isinstance(images, (str, os.PathLike)):
        return _images.load_images(images, labelled=labelled)
    paths = [os.fspath(p) for p in images]
    return _images.ImageSet(paths, list(range(len(paths))))


def format_leaderboard(scores: dict) -> str:
    """Text table of accuracy, log loss and timings per learner and for the ensemble."""
    top5 = any("top5_accuracy" in s for s in scores.values())
    rows = [("learner", "accuracy") + (("top5",) if top5 else ()) + ("log_loss", "extract_s", "ms/image",
                                                                      "train_s", "dim")]
    for name, s in scores.items():
        spi = s.get("s_per_image")
        rows.append((name, f"{s['accuracy']:.4f}") + ((f"{s.get('top5_accuracy', 0):.4f}",) if top5 else ()) + (
            f"{s['log_loss']:.4f}", f"{s['extract_s']:.1f}" if "extract_s" in s else "",
            f"{spi * 1000:.1f}" if spi else "cached" if "extract_s" in s else "",
            f"{s.get('train_s', 0):.1f}", str(s.get("feature_dim", ""))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def dataset_fingerprint(paths) -> str:
    """Short hash of a set of files (for reports)."""
    return hashlib.sha256("\n".join(sorted(_images.file_fingerprints(paths))).encode()).hexdigest()[:16]
