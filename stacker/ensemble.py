"""The stacked ensemble: backbones -> cached features -> out-of-fold heads -> meta-learner.

:class:`Ensemble` is the only module that knows about folds. One stratified splitter,
seeded by ``random_state``, gives the folds every base learner uses; each training
image's base probabilities come from the fold model that did not see it, and the
meta-learner learns only from those out-of-fold probabilities. The ensemble's own
score is cross-validated over the same folds (the meta-learner is refitted per fold on
out-of-fold inputs), so the leaderboard shows honest numbers for every row.

For new images each base learner averages its fold models' probabilities.

A base learner is either a head on frozen pooled features (the default) or, with
``finetune``, a fine-tuned network (:mod:`stacker.finetune`): then the cached inputs
are the activations at the cut point, one HDF5 entry per view, and each fold's model
is the backbone's top blocks plus a head, fine-tuned on the other folds only.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
import warnings

import h5py
import numpy as np
from sklearn.metrics import accuracy_score, log_loss
from sklearn.model_selection import StratifiedKFold

from . import __version__
from . import backbones as _backbones
from . import images as _images
from .cache import ResultStore, stable_hash
from .features import FeatureExtractor, forward_pass_count
from .finetune import CutPointExtractor, FineTunedClassifier, finetune_params
from .learners import load_estimator, make_head, save_estimator
from .meta import META_INPUTS, make_meta, meta_matrix
from .torch_checkpoint import sha256_file

__all__ = ["Ensemble", "FORMAT_VERSION", "format_leaderboard", "ModelIntegrityError"]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class ModelIntegrityError(ValueError):
    """A saved ensemble's files do not match its manifest (tampered, truncated or foreign)."""


def _learner_specs(backbones, input_size, weights, head, finetune=None) -> list[dict]:
    specs = []
    for b in ([backbones] if isinstance(backbones, (str, dict)) else list(backbones)):
        spec = {"backbone": b} if isinstance(b, str) else dict(b)
        spec.setdefault("input_size", input_size)
        spec.setdefault("weights", weights)
        spec.setdefault("head", head)
        spec["finetune"] = finetune_params(spec.get("finetune", finetune))
        cfg = _backbones.get_cfg(spec["backbone"])
        if spec["finetune"] and not cfg.block_pattern:
            raise ValueError(f"backbone {cfg.name} cannot be fine-tuned by blocks (no block_pattern registered); "
                             "fine-tune another backbone or give this one finetune=None in its spec")
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
    resize : {"pil", "bilinear", "bicubic"}
        How images are decoded and resized to each backbone's input size: ``"pil"``
        (Pillow, as a Pillow script would) or TensorFlow's antialiased bilinear/bicubic.
    finetune : None, True or dict
        Fine-tune every base learner (two phases on a cut-point cache, see
        :mod:`stacker.finetune`): ``True`` uses CPU defaults
        (:data:`stacker.finetune.DEFAULT_FINETUNE`); a dict overrides them (``blocks``,
        ``epochs``, ``learning_rate``, ``batch_size``, ``label_smoothing``, ``mode``,
        ``tta``, ``train_views``, ``tta_meta``...). A backbone dict may set its own.
    chunk_size : int
        Images whose features are written to the cache at a time: the unit of resume
        after a crash.
    engine : {"auto", "keras", "xla", "onnx"}
        What runs CNN forward passes (:mod:`stacker.engines`).
    strategy : tf.distribute.Strategy, optional
        Extraction, Keras heads, fine-tuning and the dense meta-learner are built and run
        in its scope (``tf.distribute.MirroredStrategy()`` for several GPUs). Not saved.
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
                 feature_dtype="float32", cache_dir=None, weights_dir=None, on_bad_image="raise", resize="pil",
                 finetune=None, chunk_size=256, engine="auto", strategy=None, verbose=1):
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
        self.finetune = finetune
        self.chunk_size = chunk_size
        self.engine = engine
        self.strategy = strategy
        self.verbose = verbose

    # ------------------------------------------------------------------ helpers
    def _log(self, msg: str) -> None:
        if self.verbose:
            print(msg, flush=True)

    def _check_fitted(self):
        if not hasattr(self, "meta_"):
            raise RuntimeError("this Ensemble is not fitted yet: call fit(images) or Ensemble.load(dir)")

    def _extractor(self, spec, model=None, weights_id=None) -> FeatureExtractor:
        kwargs = dict(weights=spec["weights"], input_size=spec["input_size"], batch_size=self.batch_size,
                      cache_dir=self.cache_dir, weights_dir=self.weights_dir, on_bad_image=self.on_bad_image,
                      resize=self.resize, verbose=self.verbose, model=model, weights_id=weights_id,
                      chunk_size=self.chunk_size, engine=getattr(self, "engine", "auto"),
                      strategy=getattr(self, "strategy", None))
        ft = spec.get("finetune")
        if ft:
            return CutPointExtractor(spec["backbone"], blocks=ft["blocks"], feature_dtype=ft["cut_dtype"], **kwargs)
        return FeatureExtractor(spec["backbone"], feature_dtype=self.feature_dtype, **kwargs)

    def _views(self, name) -> dict:
        """View name -> extractor of a learner's cached inputs (only ``original`` unless fine-tuned)."""
        ext = self.extractors_[name]
        ft = self._spec(name).get("finetune")
        views = ["original"] if not ft else list(dict.fromkeys(ft["tta"] + ft["train_views"]))
        cache = self.__dict__.setdefault("_view_extractors", {})
        return {v: ext if v == "original" else cache.setdefault((name, v), ext.with_view(v)) for v in views}

    def _with_strategy(self, est):
        """Hand the ensemble's tf.distribute strategy to estimators that take one (Keras-backed)."""
        if self.strategy is not None and "strategy" in getattr(est, "get_params", dict)():
            est.set_params(strategy=self.strategy)
        return est

    def _spec(self, name) -> dict:
        return next(s for s in self.specs_ if s["name"] == name)

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
        specs = _learner_specs(self.backbones, self.input_size, self.weights, self.head, self.finetune)
        self._validate(data)
        self.classes_ = list(data.classes)
        self.specs_ = specs
        self.extractors_ = {s["name"]: self._extractor(s) for s in specs}

        feats, timings = {}, {}
        skipped: dict = {}
        kept = np.arange(len(data))
        for s in specs:
            t0 = time.perf_counter()
            before = forward_pass_count()
            for view, ext in self._views(s["name"]).items():
                f = ext.extract(data)
                feats[(s["name"], view)] = f
                skipped.update({data.paths[r]: reason for r, reason in f.skipped.items()})
                kept = np.intersect1d(kept, f.kept)
            n_fwd = forward_pass_count() - before
            dt = time.perf_counter() - t0
            timings[s["name"]] = {"extract_s": dt, "forward_images": n_fwd,
                                  "s_per_image": dt / n_fwd if n_fwd else None,
                                  "inference_s_per_image": self.extractors_[s["name"]].seconds_per_image()}
        if skipped:
            warnings.warn(f"{len(skipped)} training images were skipped as unusable; see Ensemble.skipped_")
        self.skipped_ = skipped
        data = data.subset(kept)
        self._validate(data)
        inputs = {key: f.values[np.searchsorted(f.kept, kept)] for key, f in feats.items()}
        del feats
        X = {s["name"]: inputs[(s["name"], "original")] for s in specs}
        y = data.y
        k = len(self.classes_)
        splitter = StratifiedKFold(n_splits=self.cv, shuffle=True, random_state=self.random_state)
        self.folds_ = [(tr, va) for tr, va in splitter.split(np.zeros(len(y)), y)]
        self.train_ids_ = list(data.ids)
        self.y_ = y

        self.learners_, self.oof_proba_, self.meta_oof_inputs_ = {}, {}, {}
        fp_hash = stable_hash([_images.file_fingerprints(data.paths), data.labels])
        store = ResultStore(os.path.join(self.cache_dir, "learners")) if self.cache_dir else None
        self.learner_keys_ = {}
        for s in specs:
            name = s["name"]
            ft = s["finetune"]
            key = stable_hash({"features": self.extractors_[name].key_meta(), "images": fp_hash,
                               "head": _describe(s["head"]), "cv": self.cv, "seed": self.random_state,
                               "stacker": __version__, "dtype": self.feature_dtype,
                               **({"finetune": ft, "finetune_code": _finetune_code()} if ft else {})})[:24]
            self.learner_keys_[name] = key
            t0 = time.perf_counter()
            cached = store.get(key) if store else None
            outputs = None
            if cached:
                folds = [load_estimator(os.path.join(cached, f"fold{i}")) for i in range(self.cv)]
                oof = np.load(os.path.join(cached, "oof.npy"))
                if ft:
                    outputs = _read_outputs(os.path.join(cached, "outputs.h5"))
                timing_file = os.path.join(cached, "timing.json")
                first_fit_s = None
                if os.path.exists(timing_file):
                    with open(timing_file) as f:
                        first_fit_s = json.load(f).get("train_s")
                self._log(f"{name}: out-of-fold predictions from the cache")
            else:
                if ft:
                    folds, outputs = self._finetune_folds(name, ft, {v: inputs[(name, v)] for v in self._views(name)},
                                                          y, k, data, key)
                    oof = outputs["oof_proba"]
                else:
                    folds, oof = self._fit_folds(name, s["head"], X[name], y, k, key)
                first_fit_s = time.perf_counter() - t0
                if store:
                    with store.put(key) as tmp:
                        for i, est in enumerate(folds):
                            save_estimator(est, os.path.join(tmp, f"fold{i}"))
                        np.save(os.path.join(tmp, "oof.npy"), oof)
                        if ft:
                            _write_outputs(os.path.join(tmp, "outputs.h5"), outputs)
                        with open(os.path.join(tmp, "timing.json"), "w") as f:
                            json.dump({"train_s": first_fit_s}, f)
                    self._drop_fold_checkpoints(key)
            timings[name]["train_s"] = time.perf_counter() - t0
            epochs = sum(len((getattr(est, "history_", None) or {}).get("loss", [])) for est in folds)
            timings[name]["head_fit_s"] = first_fit_s
            timings[name]["epochs"] = epochs
            timings[name]["s_per_epoch"] = first_fit_s / epochs if epochs and first_fit_s else None
            self.learners_[name], self.oof_proba_[name] = folds, oof
            if ft:
                meta_p = np.concatenate([outputs[f"oof_proba_{v}"] for v in ft["tta"]], axis=1) \
                    if ft["tta_meta"] == "views" else oof
                self.meta_oof_inputs_[name] = (meta_p, outputs["oof_features"])
                timings[name].update({f"phase1_{m}": v for m, v in _score(y, outputs["phase1_oof_proba"], k).items()})
                timings[name]["phase2_kept"] = sum(bool(getattr(est, "phase2_kept_", False)) for est in folds)
                timings[name]["views"] = list(ft["tta"])
            else:
                self.meta_oof_inputs_[name] = (oof, X[name])
        del inputs

        t0 = time.perf_counter()
        names = [s["name"] for s in specs]
        meta_p = [self.meta_oof_inputs_[n][0] for n in names]
        meta_f = [self.meta_oof_inputs_[n][1] for n in names]
        n_blocks = sum(p.shape[1] // k for p in meta_p)
        Z = meta_matrix(meta_p, meta_f, self.meta_inputs)
        self.meta_oof_proba_ = np.zeros((len(y), k))
        for i, (tr, va) in enumerate(self.folds_):
            m = self._with_strategy(make_meta(self.meta, n_blocks, self.random_state + i)).fit(Z[tr], y[tr])
            self.meta_oof_proba_[va] = _align(m, m.predict_proba(Z[va]), k)
        self.meta_ = self._with_strategy(make_meta(self.meta, n_blocks, self.random_state)).fit(Z, y)
        timings["ensemble"] = {"train_s": time.perf_counter() - t0}
        blocks = _meta_blocks(names, [p.shape[1] for p in meta_p], [f.shape[1] for f in meta_f], self.meta_inputs)
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
                               "feature_dim": int(self.meta_oof_inputs_[n][1].shape[1])}
        self.scores_["ensemble"] = {**_score(y, self.meta_oof_proba_, k), **timings["ensemble"],
                                    "meta": _describe(self.meta), "meta_inputs": self.meta_inputs}
        return self

    def _fold(self, key, i, fit):
        """Fold ``i`` of learner ``key``: ``fit() -> (estimator, arrays)``, checkpointed in the cache.

        A run killed during fold 3 restarts at fold 3: every finished fold's model and
        out-of-fold arrays are published atomically under ``cache_dir/folds``.
        """
        store = ResultStore(os.path.join(self.cache_dir, "folds")) if self.cache_dir else None
        hit = store.get(f"{key}-fold{i}") if store else None
        if hit:
            with np.load(os.path.join(hit, "arrays.npz"), allow_pickle=False) as z:
                arrays = {name: z[name] for name in z.files}
            return load_estimator(os.path.join(hit, "model")), arrays, True
        est, arrays = fit()
        if store:
            with store.put(f"{key}-fold{i}") as tmp:
                save_estimator(est, os.path.join(tmp, "model"))
                np.savez(os.path.join(tmp, "arrays.npz"), **arrays)
        return est, arrays, False

    def _drop_fold_checkpoints(self, key):
        folder = os.path.join(self.cache_dir, "folds")
        for i in range(self.cv):
            shutil.rmtree(os.path.join(folder, f"{key}-fold{i}"), ignore_errors=True)

    def _fit_folds(self, name, head, X, y, k, key=None):
        oof = np.zeros((len(y), k))
        folds = []
        for i, (tr, va) in enumerate(self.folds_):
            def fit(i=i, tr=tr, va=va):
                est = self._with_strategy(make_head(head, self.random_state + i)).fit(X[tr], y[tr])
                return est, {"proba": _align(est, est.predict_proba(X[va]), k)}

            est, arrays, _ = self._fold(key, i, fit)
            oof[va] = arrays["proba"]
            folds.append(est)
            self._log(f"{name}: fold {i + 1}/{self.cv} log loss "
                      f"{log_loss(y[va], _clip(oof[va]), labels=np.arange(k)):.4f}")
        return folds, oof

    def _finetune_folds(self, name, ft, views, y, k, data, key=None):
        """Fine-tune one model per fold on the other folds; collect out-of-fold outputs per view."""
        ext = self.extractors_[name]
        X = views["original"]
        top = ext.frozen_top()
        pooled = ext.frozen_pooled(X)
        params = {p: v for p, v in ft.items() if p in FineTunedClassifier().get_params()}
        out = {f"oof_proba_{v}": np.zeros((len(y), k)) for v in ft["tta"]}
        out["phase1_oof_proba"] = np.zeros((len(y), k))
        out["oof_features"] = np.zeros((len(y), pooled.shape[1]), dtype=np.float32)
        folds = []
        for i, (tr, va) in enumerate(self.folds_):
            def fit(i=i, tr=tr, va=va):
                est = FineTunedClassifier(**{**params, "backbone": ext.cfg.name, "weights": self._spec(name)["weights"],
                                             "input_size": ext.size, "weights_dir": self.weights_dir,
                                             "random_state": self.random_state + i, "strategy": self.strategy,
                                             "verbose": 2 if self.verbose else 0})
                extra = [views[v][tr] for v in ft["train_views"] if v != "original"]
                self._log(f"{name}: fine-tuning fold {i + 1}/{self.cv} ({len(tr)} images, "
                          f"views {ft['train_views']})")
                paths = [data.paths[r] for r in tr]
                orient = _images.scan_images(paths)[0] if ft.get("mode") == "full" else None
                est.fit(X[tr], y[tr], views=extra, pooled=pooled[tr], paths=paths, orientations=orient, top=top,
                        bottom=ext.model)
                arrays = {f"oof_proba_{v}": _align(est, est.predict_proba(views[v][va]), k) for v in ft["tta"]}
                arrays["phase1_oof_proba"] = _align(est.head_, est.head_.predict_proba(pooled[va]), k)
                arrays["oof_features"] = est.transform(X[va])
                return est, arrays

            est, arrays, resumed = self._fold(key, i, fit)
            if resumed:
                self._log(f"{name}: fold {i + 1}/{self.cv} fine-tuned model from the cache")
            for name_, values in arrays.items():
                out[name_][va] = values
            folds.append(est)
            mean = np.mean([out[f"oof_proba_{v}"][va] for v in ft["tta"]], axis=0)
            labels = np.arange(k)
            self._log(f"{name}: fold {i + 1}/{self.cv} log loss frozen head "
                      f"{log_loss(y[va], _clip(out['phase1_oof_proba'][va]), labels=labels):.4f} -> fine-tuned "
                      f"{log_loss(y[va], _clip(mean), labels=labels):.4f}"
                      f"{'' if est.phase2_kept_ else ' (phase 2 did not improve; phase 1 kept)'}")
        out["oof_proba"] = np.mean([out[f"oof_proba_{v}"] for v in ft["tta"]], axis=0)
        return folds, out

    # ------------------------------------------------------------------ predict
    def _base_probas(self, images):
        """Per learner: fold-averaged probabilities, and the meta-learner's inputs, for ``images``.

        Returns ``(probas, meta_probas, meta_features, kept, skipped)``.
        """
        self._check_fitted()
        names = [s["name"] for s in self.specs_]
        in_memory = _is_in_memory(images)
        if in_memory:
            arrays = list(images)
            kept, skipped = np.arange(len(arrays)), {}
            inputs = {(n, v): ext.transform_arrays(arrays) for n in names for v, ext in self._views(n).items()}
            paths = None
        else:
            data = _as_image_set(images)
            kept, skipped, per = np.arange(len(data)), {}, {}
            for n in names:
                for v, ext in self._views(n).items():
                    f = ext.extract(data)
                    per[(n, v)] = f
                    skipped.update(f.skipped)
                    kept = np.intersect1d(kept, f.kept)
            inputs = {key: f.values[np.searchsorted(f.kept, kept)] for key, f in per.items()}
            paths = [data.paths[i] for i in kept]
        probas, meta_p, meta_f = [], [], []
        for n in names:
            ft = self._spec(n).get("finetune")
            per_view = {v: self._cached_test_proba(n, inputs[(n, v)], paths, v) for v in self._tta(n)}
            proba = np.mean(list(per_view.values()), axis=0)
            probas.append(proba)
            meta_p.append(np.concatenate([per_view[v] for v in ft["tta"]], axis=1)
                          if ft and ft["tta_meta"] == "views" else proba)
            if self.meta_inputs == "proba":
                meta_f.append(np.zeros((len(kept), 0), np.float32))
            elif ft:
                meta_f.append(np.mean([est.transform(inputs[(n, "original")]) for est in self.learners_[n]], axis=0))
            else:
                meta_f.append(inputs[(n, "original")])
        return probas, meta_p, meta_f, kept, skipped

    def _tta(self, name) -> tuple:
        ft = self._spec(name).get("finetune")
        return ft["tta"] if ft else ("original",)

    def _fold_average(self, name, F):
        k = len(self.classes_)
        return np.mean([_align(est, est.predict_proba(F), k) for est in self.learners_[name]], axis=0)

    def _cached_test_proba(self, name, F, paths, view="original"):
        key = getattr(self, "learner_keys_", {}).get(name)
        if not self.cache_dir or key is None or not paths:
            return self._fold_average(name, F)
        store = ResultStore(os.path.join(self.cache_dir, "test_proba"))
        pkey = stable_hash([key, _images.file_fingerprints(paths)] + ([view] if view != "original" else []))[:24]
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
        _probas, meta_p, meta_f, kept, skipped = self._base_probas(images)
        n = len(kept) + len(skipped)
        out = np.full((n, len(self.classes_)), np.nan)
        if len(kept):
            Z = meta_matrix(meta_p, meta_f, self.meta_inputs)
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
        probas, meta_p, meta_f, kept, _ = self._base_probas(data)
        y = np.array([index[data.labels[i]] for i in kept])
        k = len(self.classes_)
        out = {s["name"]: _score(y, p, k) for s, p in zip(self.specs_, probas)}
        Z = meta_matrix(meta_p, meta_f, self.meta_inputs)
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
                             "head": _describe(s["head"]), "learner_key": self.learner_keys_.get(n),
                             "finetune": s.get("finetune")})
        save_estimator(self.meta_, os.path.join(tmp, "meta"))
        names = [s["name"] for s in self.specs_]
        np.savez_compressed(os.path.join(tmp, "oof.npz"), y=self.y_, ensemble=self.meta_oof_proba_,
                            **{f"learner_{i}": self.oof_proba_[n] for i, n in enumerate(names)})
        _write_curves(os.path.join(tmp, "curves.csv"), {n: self.learners_[n] for n in names})
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
                    "weights": None, "head": lr["head"], "finetune": finetune_params(lr.get("finetune"))}
            ens.specs_.append(spec)
            ens.extractors_[lr["name"]] = ens._extractor(spec, model=model, weights_id=lr["weights_id"])
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


@functools.lru_cache(maxsize=None)
def _finetune_code() -> str:
    """Hash of the fine-tuning code: a learner cache made by other training code is not reused.

    Computed once per process, from the code that is running (not from a file edited since).
    """
    import inspect

    from . import finetune

    return hashlib.sha256(inspect.getsource(finetune).encode()).hexdigest()[:16]


def _write_outputs(path: str, outputs: dict) -> None:
    """A fine-tuned learner's out-of-fold outputs (per-view probabilities, pooled features) as HDF5."""
    with h5py.File(path, "w") as f:
        for name, values in outputs.items():
            f.create_dataset(name, data=values, compression="gzip" if values.size > 65536 else None)


def _read_outputs(path: str) -> dict:
    with h5py.File(path, "r") as f:
        return {name: f[name][()] for name in f}


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
