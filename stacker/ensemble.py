"""The stacked ensemble: wires feature sources, base learners and level 2 together.

:class:`Ensemble` validates its parameters, builds one learner per (backbone, model)
(:mod:`stacker.learners.base`), extracts every source's cached inputs once, makes one set of
stratified folds, lets every learner fit out of fold on them, then fits level 2
(:mod:`stacker.level2.combiners`) on the out-of-fold outputs only and scores everything on the same
folds. It knows nothing of how a learner trains (frozen head or fine-tuned network).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import StratifiedKFold
from sklearn.utils.validation import check_is_fitted

from stacker import __version__
from stacker.features import engines as _engines
from stacker.data import images as _images
from stacker.features.cache import stable_hash
from stacker.features.extractor import forward_pass_count
from stacker.learners.base import LEARNER_KINDS, Settings, describe, learner_specs, make_learners, saved_networks
from stacker.level2.combiners import (META_INPUTS, PROBABILITY_COMBINERS, Level2, combiner_names, fit_level2, meta_matrix,
                   row_blocks, score)
from stacker.io.persist import (ModelIntegrityError, load_estimator, load_unfitted, member, save_estimator, save_unfitted,
                      trusted_types)
from stacker.learners.memory import return_freed_blocks
from stacker.features.rows import use_out_of_core
from stacker.learners.streaming import streaming_model
from stacker.backbones.torch_checkpoint import sha256_file

__all__ = ["Ensemble", "FORMAT_VERSION", "format_leaderboard", "ModelIntegrityError"]

FORMAT_VERSION = 3  # 3: skops files instead of pickles
MANIFEST = "manifest.json"


class Ensemble(ClassifierMixin, BaseEstimator):
    """A stacked ensemble of pretrained CNNs for image classification.

    Parameters
    ----------
    backbones : list of str or dict
        Registered backbone names; a dict may set ``backbone``, ``input_size``,
        ``weights``, ``name``, ``models`` and ``finetune`` for one backbone.
    models : str or list
        Models fitted on every backbone's features, each one base learner: a preset
        (``"default"``: logistic + prototype; ``"fast"``, ``"best"``, ``"dense"``), names
        from :data:`stacker.learners.zoo.MODELS` (``"logistic"``, ``"prototype"``, ``"dense"``,
        ``"resnet"``) or scikit-learn classifiers.
    meta : str, list or estimator
        Level 2: ``"auto"`` picks, by cross-validated log loss, among greedy ensemble
        selection, the logit stacker, the mean, the best single learner and a second
        stacking layer (each with and without calibration); a name or list of names
        (``"greedy"``, ``"logit"``, ``"mean"``, ``"best"``, ``"stack2"``, ``"dense"``,
        ``"logistic"``) restricts the choice; any
        scikit-learn classifier is used as given.
    meta_inputs : {"proba", "features", "both"}
        What level 2 sees; features need ``meta="dense"``, ``"logistic"`` or an estimator.
    calibration : bool
        Also try every combiner followed by a temperature and floor fitted out of fold.
    cv : int
        Number of stratified folds, shared by every learner and level 2.
    random_state : int
        Seeds folds and every learner: one seed, one result.
    weights : {"imagenet", None} or path
        Default weights of every backbone.
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
        How images are decoded and resized to each backbone's input size.
    finetune : None, True or dict
        Fine-tune every backbone instead of fitting ``models`` on frozen features (two
        phases on a cut-point cache, see :mod:`stacker.learners.finetune`); ``True`` uses CPU
        defaults, a dict overrides them. A backbone dict may set its own.
    chunk_size : int
        Images whose features are written to the cache at a time (the unit of resume).
    engine : {"auto", "keras", "xla", "onnx"}
        What runs CNN forward passes (:mod:`stacker.features.engines`).
    strategy : tf.distribute.Strategy, optional
        Extraction and Keras models are built and run in its scope. Not saved.
    verbose : int
    out_of_core : {"auto", True, False}
        Read features from the cache in windows instead of loading every source's
        matrix (:mod:`stacker.learners.streaming`): models are then the streaming ``logistic`` and
        ``prototype``, and level 2 sees probabilities only. ``"auto"`` streams once the
        training features of all sources would take more than 4 GiB as float32
        (:data:`stacker.features.rows.OUT_OF_CORE_BYTES`); below, results are exactly the
        in-memory ones. Needs ``cache_dir``.
    executor : {"local", "ray"}
        ``"ray"``: extract missing features on a Ray actor pool and fit folds as Ray tasks
        (:mod:`stacker.learners.distributed`; ``pip install 'stacker[ray]'``), on the cluster of
        ``$RAY_ADDRESS`` or a local one. Same results as ``"local"``; needs ``cache_dir``.

    Attributes
    ----------
    classes_ : list of str
    learners_ : dict
        Learner name (``"<backbone>:<model>"``) -> fitted :class:`stacker.learners.base.Learner`.
    folds_ : list of (train_rows, val_rows)
    oof_proba_ : dict
        Learner name -> out-of-fold probabilities of the training images.
    meta_ : stacker.level2.combiners.Level2
        The chosen combiner (fitted on all out-of-fold inputs) and its calibration.
    meta_oof_proba_ : ndarray
        The ensemble's cross-validated probabilities of the training images.
    level2_scores_ : dict
        Every level-2 candidate's cross-validated log loss and accuracy.
    scores_ : dict
        Name -> accuracy, log loss, weight and timings; ``"ensemble"`` for the stack.
    skipped_ : dict
        Path -> reason for training images left out (``on_bad_image="skip"``).

    Examples
    --------
    >>> ens = Ensemble(["efficientnet_lite0"], cache_dir="artifacts/cache")  # doctest: +SKIP
    >>> ens.fit(stacker.data.images.load_images("data/train")).save("artifacts/model")  # doctest: +SKIP
    """

    def __init__(self, backbones=("efficientnet_lite0",), models="default", meta="auto", meta_inputs="proba",
                 calibration=True, cv=5, random_state=0, weights="imagenet", input_size=None, batch_size=32,
                 feature_dtype="float32", cache_dir=None, weights_dir=None, on_bad_image="raise", resize="pil",
                 finetune=None, chunk_size=256, engine="auto", strategy=None, verbose=1, out_of_core="auto",
                 executor="local"):
        self.backbones = backbones
        self.models = models
        self.meta = meta
        self.meta_inputs = meta_inputs
        self.calibration = calibration
        self.cv = cv
        self.random_state = random_state
        self.weights = weights
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
        self.out_of_core = out_of_core
        self.executor = executor

    def __repr__(self, N_CHAR_MAX=300) -> str:
        """scikit-learn's parameter repr (changed parameters only, bounded); once fitted, what was fitted.

        ``Ensemble(backbones=['tiny_cnn'], cv=3) fitted: 2 classes (cat, dog); 2 learners
        (tiny_cnn:logistic, tiny_cnn:prototype); level 2 logit+T, out-of-fold log loss 0.0123``
        """
        params = super().__repr__(N_CHAR_MAX=N_CHAR_MAX)
        if not hasattr(self, "meta_"):
            return params

        def brief(names, n=4):
            names = [str(v) for v in names]
            return ", ".join(names[:n]) + (f", ... (+{len(names) - n})" if len(names) > n else "")

        loss = getattr(self, "scores_", {}).get("ensemble", {}).get("log_loss")
        return (f"{params} fitted: {len(self.classes_)} classes ({brief(self.classes_, 6)}); "
                f"{len(self.learners_)} learners ({brief(self.learners_)}); level 2 {self.meta_.name}"
                + ("" if loss is None else f", out-of-fold log loss {loss:.4f}"))

    # ------------------------------------------------------------------ validation
    def _validate_params(self) -> list[dict]:
        """Check every parameter (no network is built): a typo fails in milliseconds."""
        if self.meta_inputs not in META_INPUTS:
            raise ValueError(f"meta_inputs must be one of {META_INPUTS}, got {self.meta_inputs!r}")
        candidates = combiner_names(self.meta)
        if self.meta_inputs != "proba":
            bad = [c for c in candidates if isinstance(c, str) and c in PROBABILITY_COMBINERS]
            if bad:
                raise ValueError(f"meta={bad[0]!r} combines probabilities; with meta_inputs={self.meta_inputs!r} "
                                 "use meta='dense', 'logistic' or a scikit-learn classifier")
        for name, ok, what in (
            ("cv", isinstance(self.cv, (int, np.integer)) and self.cv >= 2, "an integer >= 2"),
            ("random_state", isinstance(self.random_state, (int, np.integer)), "an integer"),
            ("batch_size", isinstance(self.batch_size, (int, np.integer)) and self.batch_size > 0, "a positive integer"),
            ("chunk_size", isinstance(self.chunk_size, (int, np.integer)) and self.chunk_size > 0, "a positive integer"),
            ("feature_dtype", self.feature_dtype in ("float32", "float16"), "'float32' or 'float16'"),
            ("on_bad_image", self.on_bad_image in ("raise", "skip"), "'raise' or 'skip'"),
            ("resize", self.resize in _images.RESIZE_METHODS, f"one of {_images.RESIZE_METHODS}"),
            ("engine", self.engine in _engines.ENGINES, f"one of {_engines.ENGINES}"),
            ("calibration", isinstance(self.calibration, (bool, np.bool_)), "True or False"),
            ("out_of_core", isinstance(self.out_of_core, (bool, np.bool_)) or self.out_of_core == "auto",
             "'auto', True or False"),
            ("executor", self.executor in ("local", "ray"), "'local' or 'ray'"),
        ):
            if not ok:
                raise ValueError(f"{name} must be {what}, got {getattr(self, name)!r}")
        if self.executor == "ray" and self.cache_dir is None:
            raise ValueError("executor='ray' shares features and fold results through the cache: give a cache_dir "
                             "(on storage every Ray node mounts)")
        specs = learner_specs(self.backbones, self.models, self.input_size, self.weights, self.finetune)
        if self.out_of_core is True:
            self._check_out_of_core(specs)
        return specs

    def _check_out_of_core(self, specs) -> None:
        """Out of core needs a cache, probability-only level 2 and streaming models (checked before extraction)."""
        if self.cache_dir is None:
            raise ValueError("out_of_core streams features from the cache: give a cache_dir")
        if self.meta_inputs != "proba":
            raise ValueError(f"out-of-core level 2 combines probabilities only; meta_inputs={self.meta_inputs!r} "
                             "would load every feature matrix (use meta_inputs='proba' or out_of_core=False)")
        for spec in specs:
            if spec["kind"] == "frozen":
                streaming_model(spec["model"])

    def _check_data(self, data: _images.ImageSet, skipped: dict | None = None, labels: dict | None = None) -> None:
        """Two classes or more, each with at least ``cv`` usable images; says which were skipped."""
        if data.labels is None:
            raise ValueError("fit needs labelled images")
        lost = {}
        for path, reason in (skipped or {}).items():
            lost.setdefault((labels or {}).get(path), []).append(f"{path}: {reason}")
        usable = [c for c in data.classes if c in set(data.labels)]
        if len(usable) < 2:
            emptied = [c for c in data.classes if c not in usable]
            note = "".join(f"; every image of class {c!r} was skipped as unusable, e.g. {lost[c][0]}"
                           for c in emptied if c in lost)
            which = f"only one class ({usable[0]!r})" if usable else "no class"
            raise ValueError(f"{which} in the training images has usable images; need two or more{note}")
        counts = np.bincount(data.y, minlength=len(data.classes))
        small = [c for c, n in zip(data.classes, counts) if n < self.cv]
        if small:
            notes = [f"{c!r}: {n} usable, {len(lost[c])} skipped as unusable (e.g. {lost[c][0]})"
                     for c, n in zip(data.classes, counts) if c in small and c in lost]
            raise ValueError(f"classes {small[:10]} have fewer images than cv={self.cv} folds"
                             + (f" ({'; '.join(notes[:3])})" if notes else "")
                             + "; add images, merge classes, lower cv or fix the files")

    def _settings(self) -> Settings:
        return Settings({name: getattr(self, name) for name in (
            "random_state", "cache_dir", "weights_dir", "batch_size", "feature_dtype", "on_bad_image", "resize",
            "chunk_size", "engine", "strategy", "verbose")}, n_classes=len(getattr(self, "classes_", [])),
            trusted=trusted_types(getattr(self, "trusted_types_", ()) + self._own_types()))

    def _own_types(self) -> tuple:
        """Types of the estimators passed in code (``models``, ``meta``): the user named them, so they are trusted."""
        found = []

        def walk(value):
            if isinstance(value, (list, tuple)):
                for v in value:
                    walk(v)
            elif isinstance(value, dict):
                for v in value.values():
                    walk(v)
            elif hasattr(value, "get_params"):
                found.append(f"{type(value).__module__}.{type(value).__qualname__}")
                for v in value.get_params(deep=False).values():
                    walk(v)

        walk([self.models, self.meta, self.backbones])
        return tuple(found)

    def _log(self, msg: str) -> None:
        if self.verbose:
            print(msg, flush=True)

    # ------------------------------------------------------------------ fit
    def fit(self, images, y=None):
        """Extract (or reuse) features, fit every learner out of fold, then level 2.

        Parameters
        ----------
        images : ImageSet, folder or CSV path
            Labelled training images.
        y : None
            Labels come with the images.

        Returns
        -------
        self
        """
        specs = self._validate_params()
        data = _images.load_images(images)
        self._check_data(data)
        self.classes_ = list(data.classes)
        self.specs_ = specs
        settings = self._settings()
        self.learners_ = make_learners(specs, settings)
        inputs, data, timings = self._extract_training(data, settings)
        return_freed_blocks()  # training allocates and frees blocks of MiBs for a long time (stacker.learners.memory)
        y, k = data.y, len(self.classes_)
        splitter = StratifiedKFold(n_splits=self.cv, shuffle=True, random_state=self.random_state)
        self.folds_ = list(splitter.split(np.zeros(len(y)), y))
        self.train_ids_, self.train_paths_, self.y_ = list(data.ids), list(data.paths), y
        images_fp = stable_hash([_images.file_fingerprints(data.paths, self.cache_dir), data.labels])
        run_folds = _distributed().run_folds if self.executor == "ray" else None
        for name, learner in self.learners_.items():
            t0 = time.perf_counter()
            learner.fit_oof(self._inputs_of(learner, inputs), y, self.folds_, k, data, images_fp, run_folds)
            timings[name]["train_s"] = time.perf_counter() - t0
        self.oof_proba_ = {name: lr.oof_proba_ for name, lr in self.learners_.items()}
        self._fit_level2(inputs, y, k, timings)
        self._record(data, timings)
        return self

    def _sources(self) -> dict:
        """(source id, view) -> extractor, each once, in learner order."""
        sources = {}
        for learner in self.learners_.values():
            for view, ext in learner.views().items():
                sources.setdefault((learner.source_id(learner.spec), view), ext)
        return sources

    def _streams(self, n_images: int) -> bool:
        """Whether features of ``n_images`` images are streamed from the cache (``out_of_core``)."""
        dims = [ext.row_dim() for ext in self._sources().values()]
        return self.cache_dir is not None and use_out_of_core(self.out_of_core, n_images, dims)

    def _extract_training(self, data, settings):
        """Every source's cached inputs for the training images (each source and view once)."""
        feats, timings, skipped = {}, {}, dict(data.skipped)  # the reader's unread files, then unusable ones
        kept = np.arange(len(data))
        self.out_of_core_ = settings["out_of_core"] = use_out_of_core(
            self.out_of_core, len(data), [ext.row_dim() for ext in self._sources().values()])
        if self.out_of_core_:
            self._check_out_of_core(self.specs_)
        for name, learner in self.learners_.items():
            t0, before = time.perf_counter(), forward_pass_count()
            for view, ext in learner.views().items():
                sid = (learner.source_id(learner.spec), view)
                if sid not in feats:
                    if self.executor == "ray":
                        _distributed().fill_cache(ext, data)
                    feats[sid] = ext.extract(data, lazy=self.out_of_core_)
                    skipped.update({data.paths[r]: reason for r, reason in feats[sid].skipped.items()})
                    kept = np.intersect1d(kept, feats[sid].kept)
            n_fwd, dt = forward_pass_count() - before, time.perf_counter() - t0
            timings[name] = {"extract_s": dt, "forward_images": n_fwd, "s_per_image": dt / n_fwd if n_fwd else None,
                             "inference_s_per_image": learner.source.seconds_per_image()}
        if skipped:
            first = next(iter(skipped.items()))
            warnings.warn(f"{len(skipped)} files were not used for training (e.g. {first[0]}: {first[1]}); "
                          "see Ensemble.skipped_")
        self.skipped_ = skipped
        labels = dict(zip(data.paths, data.labels))
        data = data.subset(kept)
        self._check_data(data, skipped, labels)
        inputs = {sid: f.values[np.searchsorted(f.kept, kept)] for sid, f in feats.items()}
        return inputs, data, timings

    @staticmethod
    def _inputs_of(learner, inputs: dict) -> dict:
        sid = learner.source_id(learner.spec)
        return {view: inputs[(sid, view)] for view in learner.views()}

    def _fit_level2(self, inputs, y, k, timings) -> None:
        t0 = time.perf_counter()
        names = list(self.learners_)
        meta_p, meta_f = zip(*(lr.meta_oof(self._inputs_of(lr, inputs)) for lr in self.learners_.values()))
        Z = meta_matrix(meta_p, meta_f, self.meta_inputs)
        n_blocks = sum(p.shape[1] // k for p in meta_p)
        members = [self.oof_proba_[n] for n in names] if self.meta_inputs == "proba" else None
        self.meta_ = fit_level2(Z, y, self.folds_, self.meta, n_blocks, k, self.random_state, self.calibration,
                                member_oof=members)
        self.meta_oof_proba_ = self.meta_.oof_proba
        self.level2_scores_ = self.meta_.table
        timings["ensemble"] = {"train_s": time.perf_counter() - t0}
        blocks = _meta_blocks(names, [p.shape[1] for p in meta_p], [f.shape[1] for f in meta_f], self.meta_inputs)
        self.meta_importance_ = _permutation_importance(self.meta_, Z, y, blocks, k, self.random_state)
        self._meta_dims = {n: int(f.shape[1]) for n, f in zip(names, meta_f)}

    def _record(self, data, timings) -> None:
        """Scores per learner and for the ensemble, configuration and environment."""
        y, k = self.y_, len(self.classes_)
        weights = self._learner_weights()
        self.scores_ = {}
        for name, learner in self.learners_.items():
            self.scores_[name] = {**score(y, learner.oof_proba_, k), **timings[name],
                                  "head_fit_s": learner.train_s_, **learner.extra_scores(y, k),
                                  "model": describe(learner.spec["model"]), "backbone": learner.spec["backbone"],
                                  "feature_dim": self._meta_dims[name] or int(learner.source.feature_dim),
                                  "weight": weights.get(name)}
        self.scores_["ensemble"] = {**score(y, self.meta_oof_proba_, k), **timings["ensemble"],
                                    "combiner": self.meta_.name, "temperature": self.meta_.temperature,
                                    "floor": self.meta_.floor, "meta": describe(self.meta),
                                    "meta_inputs": self.meta_inputs, "candidates": self.level2_scores_}
        self.config_ = {"backbones": [{k2: (v if isinstance(v, (str, int, float, type(None))) else describe(v))
                                       for k2, v in s.items()} for s in self.specs_],
                        "models": describe(self.models), "meta": describe(self.meta),
                        "meta_inputs": self.meta_inputs, "cv": self.cv, "random_state": self.random_state,
                        "feature_dtype": self.feature_dtype, "n_train": len(y),
                        "data_fingerprint": dataset_fingerprint(data.paths, self.cache_dir)}
        self.environment_ = environment()

    def _learner_weights(self) -> dict:
        """Learner name -> its level-2 weight (greedy share, logit coefficient), when the combiner has them."""
        w = self.meta_.weights
        names = list(self.learners_)
        if w is None or len(w) != len(names):
            return {}
        return {n: float(v) for n, v in zip(names, w)}

    # ------------------------------------------------------------------ predict
    def _level1(self, images, on_bad_image=None, batch_size=None):
        """Per learner ``(probabilities, level-2 probabilities, level-2 features)``, kept rows, skipped rows.

        ``on_bad_image`` / ``batch_size`` default to the ensemble's; they apply to this
        call only, so one ensemble can serve concurrent callers with different options.
        """
        check_is_fitted(self, "meta_")
        policy = self.on_bad_image if on_bad_image is None else on_bad_image
        features = self.meta_inputs != "proba"
        sources = self._sources()
        if _is_in_memory(images):
            arrays = [_images._as_rgb_array(a) for a in _images.in_memory_list(images)]  # checked once
            if not arrays:
                raise ValueError("no images to predict (an empty list)")
            kept, skipped, paths = np.arange(len(arrays)), {}, None
            inputs = {sid: ext.transform_arrays(arrays, batch_size, converted=True) for sid, ext in sources.items()}
        else:
            data = _as_image_set(images)
            kept, skipped, per = np.arange(len(data)), {}, {}
            lazy = not features and self._streams(len(data))
            for sid, ext in sources.items():
                per[sid] = f = ext.extract(data, on_bad_image=policy, batch_size=batch_size, lazy=lazy)
                skipped.update(f.skipped)
                kept = np.intersect1d(kept, f.kept)
            inputs = {sid: f.values[np.searchsorted(f.kept, kept)] for sid, f in per.items()}
            paths = [data.paths[i] for i in kept]
        outs = {name: lr.predict(self._inputs_of(lr, inputs), paths, features) if len(kept) else None
                for name, lr in self.learners_.items()}
        return outs, kept, dict(sorted(skipped.items()))

    def _level2(self, outs) -> np.ndarray:
        meta_p = [o[1] for o in outs.values()]
        meta_f = [o[2] for o in outs.values()]
        return self.meta_.predict_proba(meta_matrix(meta_p, meta_f, self.meta_inputs))

    def predict_proba(self, images) -> np.ndarray:
        """Class probabilities ``(n, n_classes)`` in input order.

        ``images``: an ImageSet, a folder, a list of paths, or in-memory images. Rows
        of images skipped under ``on_bad_image="skip"`` are NaN.
        """
        out, skipped = self.predict_with_skipped(images)
        self.last_skipped_ = skipped
        return out

    def predict_with_skipped(self, images, on_bad_image=None, batch_size=None):
        """``(probabilities, {row: reason})`` with per-call options; changes nothing on the ensemble.

        This is what concurrent callers use (``stacker.predict``): ``predict_proba``'s
        ``last_skipped_`` attribute would be shared between them.
        """
        outs, kept, skipped = self._level1(images, on_bad_image, batch_size)
        out = np.full((len(kept) + len(skipped), len(self.classes_)), np.nan)
        if len(kept):
            out[kept] = self._level2(outs)
        return out, skipped

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
        check_is_fitted(self, "meta_")
        if images is None:
            return self.scores_
        data = _as_image_set(images, labelled=True)
        if data.labels is None:
            raise ValueError("evaluate needs labelled images")
        unknown = sorted(set(data.labels) - set(self.classes_))
        if unknown:
            raise ValueError(f"labels {unknown[:5]} were not among the classes this ensemble was trained on")
        index = {c: i for i, c in enumerate(self.classes_)}
        outs, kept, _ = self._level1(data)
        y = np.array([index[data.labels[i]] for i in kept])
        k = len(self.classes_)
        result = {name: score(y, o[0], k) for name, o in outs.items()}
        result["ensemble"] = score(y, self._level2(outs), k)
        return result

    def leaderboard(self) -> str:
        """The out-of-fold leaderboard as a text table, with level 2's choice and candidates."""
        check_is_fitted(self, "meta_")
        return format_leaderboard(self.scores_)

    # ------------------------------------------------------------------ save / load
    def save(self, directory, onnx: bool | None = None) -> str:
        """Write the fitted ensemble to ``directory`` (manifest, networks, skops files, checksums).

        Every source network is written as a ``.keras`` archive and, when it runs on ONNX
        Runtime (``onnx=None``) or ``onnx=True``, as the ONNX graph it ran: a loaded model
        then predicts without exporting anything (seconds per backbone) or importing TensorFlow.
        """
        check_is_fitted(self, "meta_")
        directory = os.fspath(directory)
        if os.path.isdir(directory) and os.listdir(directory) and not os.path.exists(os.path.join(directory, MANIFEST)):
            raise FileExistsError(f"{directory} exists and is not a stacker model directory; "
                                  "save into a new or empty directory")
        tmp = os.path.abspath(directory).rstrip("/") + f".tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        learners = [lr.save(tmp, onnx) for lr in self.learners_.values()]
        save_estimator(self.meta_.combiner, os.path.join(tmp, "meta"))
        params = _encode_params(self.get_params(deep=False), tmp)
        names = list(self.learners_)
        np.savez_compressed(os.path.join(tmp, "oof.npz"), y=self.y_, ensemble=self.meta_oof_proba_,
                            **{f"learner_{i}": self.oof_proba_[n] for i, n in enumerate(names)})
        _write_curves(os.path.join(tmp, "curves.csv"), {n: lr.fold_models_ for n, lr in self.learners_.items()})
        files = {}
        for root, _dirs, file_names in os.walk(tmp):
            for f in file_names:
                full = os.path.join(root, f)
                files[os.path.relpath(full, tmp)] = sha256_file(full)
        manifest = {
            "format": "stacker-ensemble", "format_version": FORMAT_VERSION, "stacker_version": __version__,
            "classes": self.classes_, "params": params, "learners": learners,
            "level2": {"name": self.meta_.name, "temperature": self.meta_.temperature, "floor": self.meta_.floor,
                       "table": self.meta_.table, "weights": self._learner_weights()},
            "meta": describe(self.meta), "meta_inputs": self.meta_inputs, "cv": self.cv,
            "random_state": self.random_state, "scores": self.scores_, "skipped": self.skipped_, "files": files,
            "meta_importance": self.meta_importance_, "config": self.config_, "environment": self.environment_,
            "train_ids": [str(i) for i in self.train_ids_], "train_paths": self.train_paths_,
            "histories": {n: [getattr(est, "history_", None) for est in lr.fold_models_]
                          for n, lr in self.learners_.items()},
        }
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1, default=_json_default)
        _publish(tmp, directory)
        return directory

    @classmethod
    def load(cls, directory, *, trusted=None, **params) -> "Ensemble":
        """Load a saved ensemble after verifying every file's sha256.

        The ensemble gets exactly the parameters it was fitted with (a ``cache_dir`` that
        does not exist here becomes None); keyword arguments (e.g. ``cache_dir=``,
        ``verbose=``, ``on_bad_image=``) override run-time ones.
        Loading runs no code from the directory: scikit-learn parts are skops files
        rebuilt only from trusted types, Keras parts are checked archives loaded with
        ``safe_mode=True`` (see :mod:`stacker.io.persist`). ``trusted`` lists extra fully
        qualified type names to rebuild (your own estimator classes); a file that needs
        any other type raises :class:`~stacker.io.persist.UntrustedTypeError` naming it.
        """
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
        settings = ens._settings()
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


def _distributed():
    from stacker.learners import distributed

    return distributed


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
    if version != FORMAT_VERSION:
        raise ModelIntegrityError(
            f"{directory} was saved in format version {version}; this stacker ({__version__}) reads version "
            f"{FORMAT_VERSION}. Refit the ensemble or use the stacker release that wrote it.")
    return manifest


def _meta_blocks(names, proba_dims, feature_dims, meta_inputs) -> dict:
    """Column indices of each learner's inputs in the level-2 matrix (see ``meta_matrix``)."""
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


def _permutation_importance(level2, Z, y, blocks: dict, k: int, seed: int, repeats: int = 3) -> dict:
    """How much level 2's log loss grows when one learner's inputs are shuffled across rows."""
    rng = np.random.default_rng(seed)
    base = score(y, level2.predict_proba(Z), k)["log_loss"]
    proba = np.empty((len(Z), k))
    out = {}
    for name, cols in blocks.items():
        losses = []
        for _ in range(repeats):
            order = rng.permutation(len(Z))
            for rows in row_blocks(len(Z)):  # shuffled a block at a time: no copy of Z
                part = Z[rows].copy()
                part[:, cols] = Z[order[rows]][:, cols]
                proba[rows] = level2.predict_proba(part)
            losses.append(score(y, proba, k)["log_loss"])
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


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def _is_in_memory(images) -> bool:
    if isinstance(images, np.ndarray) or (hasattr(images, "convert") and not isinstance(images, (list, tuple))):
        return True
    if isinstance(images, (list, tuple)) and images:
        return not isinstance(images[0], (str, os.PathLike))
    return False


def _as_image_set(images, labelled: bool = False) -> _images.ImageSet:
    if isinstance(images, _images.ImageSet):
        return images
    if isinstance(images, (str, os.PathLike)):
        return _images.load_images(images, labelled=labelled)
    paths = [os.fspath(p) for p in images]
    if not paths:
        raise ValueError("no images to predict (an empty list)")
    return _images.ImageSet(paths, list(range(len(paths))))


def format_leaderboard(scores: dict) -> str:
    """Text table per learner (accuracy, log loss, level-2 weight, timings), then level 2's choice."""
    top5 = any("top5_accuracy" in s for s in scores.values())
    rows = [("learner", "accuracy") + (("top5",) if top5 else ()) + ("log_loss", "weight", "extract_s",
                                                                      "ms/image", "train_s", "dim")]
    for name, s in scores.items():
        spi, w = s.get("s_per_image"), s.get("weight")
        rows.append((name, f"{s['accuracy']:.4f}") + ((f"{s.get('top5_accuracy', 0):.4f}",) if top5 else ()) + (
            f"{s['log_loss']:.4f}", "" if w is None else f"{w:.3f}",
            f"{s['extract_s']:.1f}" if "extract_s" in s else "",
            f"{spi * 1000:.1f}" if spi else "cached" if "extract_s" in s else "",
            f"{s.get('train_s', 0):.1f}", str(s.get("feature_dim", ""))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    ens = scores.get("ensemble", {})
    if ens.get("combiner"):
        lines.append(f"level 2: {ens['combiner']} (temperature {ens.get('temperature', 1.0):.3f}, "
                     f"floor {ens.get('floor', 0.0):.4f}); cross-validated log loss of each candidate:")
        lines.append("  " + ", ".join(f"{n} {c['log_loss']:.4f}" for n, c in ens.get("candidates", {}).items()))
    return "\n".join(lines)


def dataset_fingerprint(paths, cache_dir=None) -> str:
    """Short hash of a set of files (for reports)."""
    return hashlib.sha256("\n".join(sorted(_images.file_fingerprints(paths, cache_dir))).encode()).hexdigest()[:16]
