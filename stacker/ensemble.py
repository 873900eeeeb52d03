"""The stacked ensemble: wires feature sources, base learners and level 2 together.

:class:`Ensemble` holds its parameters (declared where each concept lives, gathered by
:mod:`stacker.validation`) and wires the pieces: it builds one learner per (backbone,
model) (:mod:`stacker.learners`), extracts every source's cached inputs once, makes one
set of stratified folds, lets every learner fit out of fold on them, then fits level 2
(:mod:`stacker.level2`) on the out-of-fold outputs only and scores everything on the
same folds. It knows nothing of how a learner trains (frozen head or fine-tuned network);
saving and loading are :mod:`stacker.io.model_dir`'s, input coercion :mod:`stacker.data.inputs`'.
"""

from __future__ import annotations

import copy
import time
import warnings

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import StratifiedKFold
from sklearn.utils.validation import check_is_fitted

from stacker import validation
from stacker.data.inputs import Arrays, as_images
from stacker.data.sources import file_fingerprints, load_images
from stacker.features.layout import stable_hash
from stacker.features import device as _device
from stacker.features.config import ExtractionConfig
from stacker.features.extractor import forward_pass_count
from stacker.features.rows import use_out_of_core
from stacker.io.model_dir import FORMAT_VERSION, dataset_fingerprint, environment, load_ensemble, save_ensemble
from stacker.io.persist import ModelIntegrityError, estimator_types, trusted_types
from stacker.learners.base import Settings, describe
from stacker.learners.kinds import make_learners
from stacker.learners.memory import return_freed_blocks
from stacker.level2.arrays import StackedBlocks, meta_matrix, score
from stacker.level2.calibration import check_min_proba, with_min_proba
from stacker.level2.importance import meta_blocks, permutation_importance
from stacker.level2.leaderboard import format_leaderboard
from stacker.level2.selection import fit_level2

__all__ = ["Ensemble", "FORMAT_VERSION", "format_leaderboard", "ModelIntegrityError"]

_DOC = """A stacked ensemble of pretrained CNNs for image classification.

    Parameters
    ----------
{params}

    Attributes
    ----------
    classes_ : list of str
        Class names: the columns of every probability array, ``y_`` indexes them.
    train_paths_ : list of str
        The training images used, in the row order of ``y_``, ``oof_proba_`` and
        ``meta_oof_proba_`` (the training set's order, skipped files left out).
    y_ : ndarray of int, shape (n_train,)
        Class index of each training image (``classes_[y_[i]]`` is its label).
    learners_ : dict
        Learner name (``"<backbone>:<model>"``) -> fitted :class:`stacker.learners.base.Learner`.
    folds_ : list of (train_rows, val_rows)
        The ``cv`` stratified folds shared by every learner and level 2: arrays of row
        indices into ``train_paths_``; each image is in exactly one ``val_rows``. Not saved
        (a loaded ensemble has none).
    oof_proba_ : dict
        Learner name -> ndarray of shape (n_train, n_classes): each training image's
        probabilities from that learner fitted on the other folds (rows as ``train_paths_``,
        columns as ``classes_``). The inputs level 2 learnt from.
    meta_ : stacker.level2.selection.Level2
        The chosen combiner (fitted on all out-of-fold inputs) and its calibration.
    meta_oof_proba_ : ndarray of shape (n_train, n_classes)
        The ensemble's out-of-fold probabilities of the training images (level 2 and its
        calibration cross-validated on ``folds_``, then the ``min_proba`` floor, as
        ``predict_proba``'s): what ``scores_["ensemble"]`` and :meth:`oof_predictions` report.
    level2_scores_ : dict
        Every level-2 candidate's cross-validated log loss and accuracy.
    scores_ : dict
        Name -> accuracy, log loss, weight and timings; ``"ensemble"`` for the stack.
    skipped_ : dict
        Path -> reason for training images left out (``on_bad_image="skip"``).
    pseudo_labels_ : dict or None
        What ``fit(..., unlabeled=)`` did (:mod:`stacker.pseudo_labels`): images used, each
        round's out-of-fold log loss and whether it was kept; also in ``scores_["ensemble"]``.
    sample_weight_ : ndarray of shape (n_train,) or None
        Each training image's weight (``class_weight`` times ``fit``'s ``sample_weight``,
        mean 1), as every learner, level 2 and ``scores_`` used it; None without weights.

    Examples
    --------
    >>> ens = Ensemble(["efficientnet_lite0"], cache_dir="artifacts/cache")  # doctest: +SKIP
    >>> ens.fit(stacker.load_images("data/train")).save("artifacts/model")  # doctest: +SKIP
    

    """


class _Declared(type):
    """Ensemble's signature and docstring are read from the parameter rows whenever they are asked for,
    so a learner kind or extraction option registered later brings its parameter."""

    @property
    def __signature__(cls):
        _refresh_signature()
        sig = validation.signature()
        return sig.replace(parameters=list(sig.parameters.values())[1:])

    @property
    def __doc__(cls):
        return _DOC.format(params=validation.params_doc())


class Ensemble(ClassifierMixin, BaseEstimator, metaclass=_Declared):
    def __init__(self, backbones=("efficientnet_lite0",), **params):
        """Store every parameter under its own name (scikit-learn's contract); nothing else."""
        _refresh_signature()
        self.backbones = backbones
        for p in validation.ensemble_params()[1:]:
            setattr(self, p.name, params.pop(p.name, p.default))
        if params:
            raise TypeError(f"Ensemble got unexpected parameters {sorted(params)}; its parameters are "
                            f"{[p.name for p in validation.ensemble_params()]}")

    @classmethod
    def _get_param_names(cls):
        _refresh_signature()  # a learner kind or extraction option registered since brings its parameter
        return super()._get_param_names()

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

    # ------------------------------------------------------------------ wiring
    def learner_settings(self) -> Settings:
        """What every learner shares: the extraction options, the seed, the run options, the trusted types."""
        return Settings({"random_state": self.random_state, "strategy": self.strategy, "verbose": self.verbose},
                        extraction=ExtractionConfig.from_params(self.get_params(deep=False)),
                        n_classes=len(getattr(self, "classes_", [])),
                        trusted=trusted_types(getattr(self, "trusted_types_", ()) + self._own_types()))

    def _own_types(self) -> tuple:
        """Types of the estimators passed in code (``models``, ``meta``): the user named them, so they are trusted."""
        return estimator_types([self.models, self.meta, self.backbones])

    def _log(self, msg: str) -> None:
        if self.verbose:
            print(msg, flush=True)

    # ------------------------------------------------------------------ fit
    def fit(self, images, y=None, sample_weight=None, unlabeled=None):
        """Extract (or reuse) features, fit every learner out of fold, then level 2.

        Parameters
        ----------
        images : ImageSet, folder or CSV path
            Labelled training images.
        y : None
            Labels come with the images.
        sample_weight : array or dict, optional
            One non-negative weight per image: an array in the order of
            ``stacker.load_images(images).paths``, or a dict path -> weight naming every
            image. Multiplied by ``class_weight``'s and scaled to mean 1, it weighs every
            learner's fold fits, level 2, its calibration and the reported scores; 0 takes
            an image's influence away (it still has a fold and an out-of-fold prediction).
        unlabeled : ImageSet, folder or CSV path, optional
            A pool of unlabelled images (e.g. Kaggle's test folder): after the labelled fit,
            rounds of pseudo-labels (:mod:`stacker.pseudo_labels`, options ``pseudo_labels``)
            add them to the training folds, each fold's labels from the ensemble without that
            fold. A round is kept only if it lowers the out-of-fold log loss of the labelled
            images; ``scores_["ensemble"]["pseudo_labels"]`` says what happened.

        Returns
        -------
        self
        """
        stage = None if unlabeled is None else _pseudo().PseudoLabels(unlabeled)
        self._fit(images, sample_weight, stage)
        self.pseudo_labels_ = None if stage is None else self.scores_["ensemble"][stage.name]
        return self

    def _fit(self, images, sample_weight=None, stage=None) -> "Ensemble":
        """``fit``'s steps, with an optional second stage that refits with extra rows once level 2 is fitted.

        A stage (:class:`stacker.pseudo_labels.PseudoLabels`, distillation's) says what needs the
        weights it adds (``what``), checks the ensemble before any work (``check``), readies its
        inputs once the training images are extracted (``prepare``: its own files fail before
        training) and refits after level 2 (``run``), whose summary goes to ``scores_["ensemble"][name]``.
        """
        specs = validation.validate(self)
        self._log(_device.use(self.device).describe())  # device="gpu" without one fails here, before any work
        data = load_images(images)
        validation.check_training_data(data, self.cv)
        self.classes_ = list(data.classes)
        check_min_proba(self.min_proba, len(self.classes_))  # before hours of training, not after
        weighted = self.class_weight is not None or sample_weight is not None
        if stage is not None:
            stage.check(self)
        # every weight checked, and every learner able to take them (and a stage's extra rows), before any work
        if weighted:
            validation.check_weighted(self, specs)
        if stage is not None:
            validation.check_weighted(self, specs, stage.what)
        if weighted:
            validation.training_weights(data, self.class_weight, sample_weight)
            if sample_weight is not None and not isinstance(sample_weight, dict):
                sample_weight = dict(zip(map(str, data.paths), np.asarray(sample_weight, dtype=np.float64)))
        self.specs_ = specs
        self.learners_ = self._make_learners(specs, len(data))
        if (weighted or stage is not None) and self.out_of_core_:
            raise ValueError(f"{'class_weight and sample_weight' if weighted else stage.what} are not supported out "
                             "of core (the streaming models take no weights); use out_of_core=False")
        inputs, data, timings = self._extract_training(data)
        if stage is not None:
            stage.prepare(self, data)
        self.sample_weight_ = None if not weighted else validation.training_weights(
            data, self.class_weight, None if sample_weight is None else {str(p): sample_weight[str(p)] for p in data.paths})
        self._weights_note = validation.weights_note(self.class_weight, sample_weight)
        return_freed_blocks()  # training allocates and frees blocks of MiBs for a long time (stacker.learners.memory)
        y = data.y
        splitter = StratifiedKFold(n_splits=self.cv, shuffle=True, random_state=self.random_state)
        self.folds_ = list(splitter.split(np.zeros(len(y)), y))
        self.train_ids_, self.train_paths_, self.y_ = list(data.ids), list(data.paths), y
        images_fp = stable_hash([file_fingerprints(data.paths, self.cache_dir), data.labels])
        run_folds = _distributed().run_folds if self.executor == "ray" else None
        self._fit_learners(self.learners_, inputs, y, self.folds_, data, images_fp, timings, "train_s", run_folds,
                           self.sample_weight_)
        summary = None if stage is None else stage.run(self, inputs, data, images_fp, timings)
        self._record(data, timings, {} if stage is None else {stage.name: summary})
        return self

    def _fit_learners(self, learners, inputs, y, folds, data, images_fp, timings, timing_key, run_folds=None,
                      weights=None) -> None:
        """Fit ``learners`` out of fold (timed under ``timing_key``), make them the ensemble's, then fit level 2."""
        n, k = len(self.y_), len(self.classes_)
        for name, learner in learners.items():
            t0 = time.perf_counter()
            learner.fit_oof(self._inputs_of(learner, inputs), y, folds, k, data, images_fp, run_folds, weights)
            if len(y) > n:  # rows past the training images (extra rows) have no out-of-fold output
                learner.arrays_ = {a: v[:n] for a, v in learner.arrays_.items()}
                learner.oof_proba_ = learner.arrays_["oof_proba"]
            timings[name][timing_key] = timings[name].get(timing_key, 0.0) + time.perf_counter() - t0
        self.learners_ = learners
        self.oof_proba_ = {name: lr.oof_proba_ for name, lr in learners.items()}
        self._fit_level2(inputs, self.y_, k, timings)

    def _refit_with_rows(self, inputs, extra, labels, weights, fold_rows, data, images_fp, timings, timing_key,
                         base_weights=None, variant=None) -> None:
        """Refit every learner with extra training rows, then level 2 (pseudo-labels, distillation).

        ``extra``: (source id, view) -> the extra rows' inputs; ``labels`` and ``weights`` theirs;
        ``fold_rows[i]``: which extra rows fold ``i``'s model trains on (none is ever a validation
        row). ``base_weights``: the training images' weights in these fits (default: ``sample_weight_``,
        else 1). Out-of-fold outputs, level 2 and every score stay on the training images. ``variant``
        names the refit in the learners' cache entries (``stacker cache ls``: "pseudo-labels", "distilled").
        """
        n = len(self.y_)
        base = base_weights if base_weights is not None else (
            np.ones(n) if self.sample_weight_ is None else self.sample_weight_)
        y_ext, w_ext = np.concatenate([self.y_, labels]), np.concatenate([base, weights])
        folds = [(np.concatenate([tr, n + fold_rows[i]]), va) for i, (tr, va) in enumerate(self.folds_)]
        ext = {sid: np.concatenate([inputs[sid], extra[sid]]) for sid in inputs}
        learners = {name: copy.copy(old) for name, old in self.learners_.items()}  # the same spec, source, settings
        for lr in learners.values():
            lr.variant = variant
        self._fit_learners(learners, ext, y_ext, folds, data, images_fp, timings, timing_key, None, w_ext)

    def _make_learners(self, specs, n_images: int) -> dict:
        """One learner per spec, sharing sources; out of core (decided here, once) when the sizes call for it."""
        sources, settings = {}, self.learner_settings()
        learners = make_learners(specs, settings, sources)
        dims = [ext.row_dim() for ext in _sources_of(learners).values()]
        self.out_of_core_ = use_out_of_core(self.out_of_core, n_images, dims)
        if not self.out_of_core_:
            return learners
        validation.check_out_of_core(self, specs)
        return make_learners(specs, settings.replace(out_of_core=True), sources)

    def _sources(self) -> dict:
        """(source id, view) -> extractor, each once, in learner order."""
        return _sources_of(self.learners_)

    def _streams(self, n_images: int) -> bool:
        """Whether features of ``n_images`` images are streamed from the cache (``out_of_core``)."""
        dims = [ext.row_dim() for ext in self._sources().values()]
        return self.cache_dir is not None and use_out_of_core(self.out_of_core, n_images, dims)

    def _extract_training(self, data):
        """Every source's cached inputs for the training images (each source and view once)."""
        feats, timings, skipped = {}, {}, dict(data.skipped)  # the reader's unread files, then unusable ones
        kept = np.arange(len(data))
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
            from stacker.data.sources import SkippedImagesWarning

            warnings.warn(SkippedImagesWarning(skipped), stacklevel=3)  # points at the caller's fit
        self.skipped_ = skipped
        labels = dict(zip(data.paths, data.labels))
        data = data.subset(kept)
        validation.check_training_data(data, self.cv, skipped, labels)
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
        # the learners' probabilities as one matrix without a copy (1.6 GB at 100k rows of 1,000 classes)
        Z = StackedBlocks(meta_p) if self.meta_inputs == "proba" else meta_matrix(meta_p, meta_f, self.meta_inputs)
        n_blocks = sum(p.shape[1] // k for p in meta_p)
        members = [self.oof_proba_[n] for n in names] if self.meta_inputs == "proba" else None
        self.meta_ = fit_level2(Z, y, self.folds_, self.meta, n_blocks, k, self.random_state, self.calibration,
                                member_oof=members, sample_weight=self.sample_weight_)
        self.meta_oof_proba_ = with_min_proba(self.meta_.oof_proba, self.min_proba)  # as predict_proba's
        self.level2_scores_ = self.meta_.table
        timings["ensemble"] = {"train_s": time.perf_counter() - t0}
        blocks = meta_blocks(names, [p.shape[1] for p in meta_p], [f.shape[1] for f in meta_f], self.meta_inputs)
        self.meta_importance_ = permutation_importance(self.meta_, Z, y, blocks, k, self.random_state,
                                                       sample_weight=self.sample_weight_)
        self._meta_dims = {n: int(f.shape[1]) for n, f in zip(names, meta_f)}

    def _record(self, data, timings, stages=None) -> None:
        """Scores per learner and for the ensemble, configuration and environment; ``stages``: summaries of
        what a second stage did (pseudo-labels, distillation), kept in ``scores_["ensemble"]``."""
        y, k, w = self.y_, len(self.classes_), self.sample_weight_
        weights = self.learner_weights()
        self.scores_ = {}
        for name, learner in self.learners_.items():
            self.scores_[name] = {**score(y, learner.oof_proba_, k, w), **timings[name],
                                  "head_fit_s": learner.train_s_, **learner.extra_scores(y, k),
                                  "model": describe(learner.spec["model"]), "backbone": learner.spec["backbone"],
                                  "feature_dim": self._meta_dims[name] or int(learner.source.feature_dim),
                                  "weight": weights.get(name)}
        self.scores_["ensemble"] = {**score(y, self.meta_oof_proba_, k, w), **timings["ensemble"],
                                    "combiner": self.meta_.name, "temperature": self.meta_.temperature,
                                    "floor": self.meta_.floor, "meta": describe(self.meta),
                                    "meta_inputs": self.meta_inputs, "candidates": self.level2_scores_}
        if w is not None:  # how every score above (and level 2's candidates) is weighted
            self.scores_["ensemble"]["weighted"] = self._weights_note
        self.scores_["ensemble"].update(stages or {})
        self.config_ = {"backbones": [{k2: (v if isinstance(v, (str, int, float, type(None))) else
                                            list(v) if isinstance(v, tuple) else describe(v))
                                       for k2, v in s.items()} for s in self.specs_],
                        "models": describe(self.models), "meta": describe(self.meta),
                        "meta_inputs": self.meta_inputs, "cv": self.cv, "random_state": self.random_state,
                        "feature_dtype": self.feature_dtype, "n_train": len(y),
                        "data_fingerprint": dataset_fingerprint(data.paths, self.cache_dir)}
        self.environment_ = environment()

    def learner_weights(self) -> dict:
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
        data = as_images(images)
        if isinstance(data, Arrays):  # checked and converted once, for every source
            kept, skipped, paths = np.arange(len(data)), {}, None
            inputs = {sid: ext.transform_arrays(data, batch_size, converted=True) for sid, ext in sources.items()}
        else:
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

    def _level2(self, outs, min_proba=None) -> np.ndarray:
        """Level 2's probabilities, each at least ``min_proba`` (default: the ensemble's); all predictions pass here."""
        meta_p = [o[1] for o in outs.values()]
        meta_f = [o[2] for o in outs.values()]
        proba = self.meta_.predict_proba(meta_matrix(meta_p, meta_f, self.meta_inputs))
        return with_min_proba(proba, self.min_proba if min_proba is None else min_proba)

    def predict_proba(self, images) -> np.ndarray:
        """Class probabilities ``(n, n_classes)`` in input order.

        ``images``: an ImageSet, a folder, a list of paths, or in-memory images. Rows
        of images skipped under ``on_bad_image="skip"`` are NaN.
        """
        out, skipped = self.predict_with_skipped(images)
        self.last_skipped_ = skipped
        return out

    def predict_with_skipped(self, images, on_bad_image=None, batch_size=None, min_proba=None):
        """``(probabilities, {row: reason})`` with per-call options; changes nothing on the ensemble.

        This is what concurrent callers use (``stacker.predict``): ``predict_proba``'s
        ``last_skipped_`` attribute would be shared between them.
        """
        check_is_fitted(self, "meta_")
        check_min_proba(self.min_proba if min_proba is None else min_proba, len(self.classes_))  # before extraction
        _device.use(self.device)
        outs, kept, skipped = self._level1(images, on_bad_image, batch_size)
        out = np.full((len(kept) + len(skipped), len(self.classes_)), np.nan)
        if len(kept):
            out[kept] = self._level2(outs, min_proba)
        return out, skipped

    def predict(self, images) -> np.ndarray:
        """Predicted class names (``None`` for skipped images)."""
        proba = self.predict_proba(images)
        names = np.array(self.classes_, dtype=object)
        out = np.full(len(proba), None, dtype=object)
        ok = ~np.isnan(proba).any(axis=1)
        out[ok] = names[proba[ok].argmax(axis=1)]
        return out

    def evaluate(self, images=None, on_bad_image=None, per_image=False):
        """Accuracy and log loss of every base learner and the ensemble.

        Without ``images``: the cross-validated (out-of-fold) scores from ``fit``.
        With a labelled set: scores on it, over the images that could be used.

        Parameters
        ----------
        images : ImageSet, folder or CSV path, optional
            Labelled hold-out images (class folders, ``label.id.ext`` names, ``path,label`` CSV).
        on_bad_image : {'raise', 'skip'}, optional
            For this call (default: the ensemble's); skipped images are scored by nobody.
        per_image : bool
            Also return what was predicted, so a caller reports it without predicting twice.

        Returns
        -------
        dict or (dict, dict)
            Name -> scores; with ``per_image``, also ``images`` (the ImageSet), ``y``
            (class index per image), ``proba`` (the ensemble's, NaN rows for skipped
            images), ``learners`` (name -> probabilities, likewise) and ``skipped``
            (row -> reason).
        """
        check_is_fitted(self, "meta_")
        if images is None:
            return self.scores_
        data = as_images(images, labelled=True)
        if data.labels is None:
            raise ValueError("evaluate needs labelled images")
        unknown = sorted(set(data.labels) - set(self.classes_))
        if unknown:
            raise ValueError(f"labels {', '.join(map(repr, unknown[:10]))}{' ...' if len(unknown) > 10 else ''} "
                             f"are not classes of this model (its classes: {', '.join(self.classes_[:20])}"
                             f"{' ...' if len(self.classes_) > 20 else ''})")
        index = {c: i for i, c in enumerate(self.classes_)}
        outs, kept, skipped = self._level1(data, on_bad_image)
        if not len(kept):
            raise ValueError(f"none of the {len(data)} images could be used: {next(iter(skipped.values()), '')}")
        y_all = np.array([index[c] for c in data.labels])
        y, k = y_all[kept], len(self.classes_)
        ensemble = self._level2(outs)
        result = {name: score(y, o[0], k) for name, o in outs.items()}
        result["ensemble"] = score(y, ensemble, k)
        if not per_image:
            return result

        def full(p):
            out = np.full((len(data), k), np.nan)
            out[kept] = p
            return out

        return result, {"images": data, "y": y_all, "proba": full(ensemble), "skipped": skipped,
                        "learners": {name: full(o[0]) for name, o in outs.items()}}

    def oof_predictions(self, images=None) -> list[dict]:
        """One dict per training image: its out-of-fold prediction and loss, then one per skipped file.

        The rows ``stacker fit --predictions`` writes (:func:`stacker.app.predictions.out_of_fold_rows`):
        sorting them by ``loss`` shows the images the ensemble gets most wrong (often
        mislabelled ones). ``images``: the training set, to name the labels of skipped files.
        """
        from stacker.app.predictions import out_of_fold_rows

        check_is_fitted(self, "meta_")
        labels = dict(zip(images.paths, images.labels)) if getattr(images, "labels", None) is not None else None
        return out_of_fold_rows(self.train_paths_, self.y_, self.meta_oof_proba_, self.classes_,
                                getattr(self, "folds_", None), self.skipped_, labels)

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
        return save_ensemble(self, directory, onnx)

    def export_onnx(self, path) -> dict:
        """Write the whole fitted ensemble as one ONNX file (:mod:`stacker.io.export`): every backbone, fold
        model, level 2, calibration and the ``min_proba`` floor, from pixels to probabilities, runnable on plain
        ONNX Runtime. Returns the input contract (also in the file's metadata); raises
        :class:`~stacker.io.onnx_builder.ExportError` naming a part ONNX cannot express exactly.
        """
        from stacker.io.export import export_onnx

        return export_onnx(self, str(path))

    @classmethod
    def load(cls, directory, *, trusted=None, **params) -> "Ensemble":
        """Load a saved ensemble after verifying every file's sha256.

        The ensemble gets the parameters it was fitted with, except machine paths: the
        saved ``cache_dir`` and ``weights_dir`` are dropped and weights files become None
        (they name places on the machine that fitted it; nothing outside ``directory`` is
        used). Keyword arguments (e.g. ``cache_dir=``, ``verbose=``, ``on_bad_image=``)
        set run-time ones.
        Loading runs no code from the directory: scikit-learn parts are skops files
        rebuilt only from trusted types, Keras parts are checked archives loaded with
        ``safe_mode=True`` (see :mod:`stacker.io.persist`). ``trusted`` lists extra fully
        qualified type names to rebuild (your own estimator classes); a file that needs
        any other type raises :class:`~stacker.io.persist.UntrustedTypeError` naming it.
        """
        return load_ensemble(cls, directory, trusted, **params)


def _sources_of(learners: dict) -> dict:
    """(source id, view) -> extractor, each once, in learner order."""
    sources = {}
    for learner in learners.values():
        for view, ext in learner.views().items():
            sources.setdefault((learner.source_id(learner.spec), view), ext)
    return sources


def _pseudo():
    from stacker import pseudo_labels

    return pseudo_labels


def _distributed():
    from stacker.learners import distributed

    return distributed


def _refresh_signature() -> None:
    """``Ensemble.__init__``'s signature (what scikit-learn reads) from the parameter rows of now."""
    Ensemble.__init__.__signature__ = validation.signature()


_refresh_signature()
