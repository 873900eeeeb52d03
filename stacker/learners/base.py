"""Base learners: one feature source times one model, bagged over the ensemble's folds.

A :class:`Learner` is what AutoGluon calls a bagged model. It owns its fold models,
its out-of-fold probabilities, its cache key, its fold checkpoints (a killed run
restarts at the fold it was in) and its save/load. The ensemble only hands it the
cached inputs of its views, the labels and the shared folds, and never asks which kind
it is. Kinds declare themselves in :mod:`stacker.learners.kinds`: the frozen kind
(:mod:`stacker.learners.frozen`) and the fine-tuned one (:mod:`stacker.learners.finetuned`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings

import numpy as np

from stacker import __version__
from stacker.backbones import registry as _backbones
from stacker.data.sources import file_fingerprints
from stacker.features.cache import result_store
from stacker.features.layout import stable_hash
from stacker.features.engines import SavedNetwork
from stacker.features.extractor import FeatureExtractor
from stacker.features.rows import CachedRows
from stacker.io.bounds import checked_array_file
from stacker.io.persist import (PERSIST_FORMAT, UntrustedTypeError, check_keras_archive, load_estimator, member,
                                save_estimator)
from stacker.learners.fastpath import proba_function
from stacker.learners.zoo import model_label, model_names
from stacker.level2.arrays import align_proba, oof_dtype, score

__all__ = ["Learner", "Settings", "views_mean", "describe", "extractor_kwargs", "run_folds_here", "saved_networks"]

def describe(spec) -> str:
    """A stable text for a model entry or any parameter (names as they are, estimators with their params)."""
    if isinstance(spec, str):
        return spec
    try:
        params = {k: v for k, v in spec.get_params(deep=False).items() if not hasattr(v, "get_params")}
    except AttributeError:
        params = {}
    return f"{type(spec).__name__}({json.dumps(params, sort_keys=True, default=str)})"


class Settings(dict):
    """What every learner of one ensemble shares, read-only: seed, extraction options, out of core.

    ``extraction`` is the ensemble's :class:`~stacker.features.config.ExtractionConfig`;
    its values are also readable by name (``settings.cache_dir``). :meth:`replace` gives
    a copy with some values changed (the ensemble decides ``out_of_core`` once sizes are known).
    """

    def __init__(self, values: dict, **more):
        extraction = more.get("extraction", values.get("extraction"))
        flat = dict(extraction._values) if extraction is not None else {}
        super().__init__({**flat, **values, **more})

    def replace(self, **changes) -> "Settings":
        """A copy with ``changes``; extraction options among them change ``extraction`` too."""
        extraction = self.get("extraction")
        if extraction is not None and set(changes) & set(extraction._values):
            extraction = type(extraction)(**{**extraction._values, **{k: v for k, v in changes.items()
                                                                        if k in extraction._values}})
        return Settings({**self, **changes, "extraction": extraction})

    def _read_only(self, *args, **kwargs):
        raise TypeError("Settings are shared by every learner of an ensemble and read-only; use replace()")

    __setitem__ = __delitem__ = update = setdefault = pop = popitem = clear = __ior__ = _read_only

    def __reduce__(self):  # pickled for Ray tasks: rebuilt from its items, not item by item
        return (Settings, (dict(self),))

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def views_mean(probas: list) -> np.ndarray:
    """The mean of one image's probabilities over its views (the one array itself for a single view)."""
    return probas[0] if len(probas) == 1 else np.mean(probas, axis=0)


class Learner:
    """One feature source times one model, bagged over the shared folds.

    Subclasses set :attr:`kind`, build their source (:meth:`make_source`), say which
    cached views they read (:meth:`views`) and fit one fold (:meth:`_fit_fold`).

    Attributes (after :meth:`fit_oof`)
    ----------------------------------
    fold_models_ : list
        One fitted model per fold, trained on the other folds only.
    oof_proba_ : ndarray (n, k)
        Out-of-fold probabilities of the training images: float64, float32 past
        :data:`~stacker.level2.arrays.OOF_FLOAT64_VALUES` values.
    arrays_ : dict
        Every out-of-fold array the learner keeps (name -> (n, ...)).
    key_ : str
        Cache key of this learner's results.
    train_s_ : float
        Seconds its first fit took (also when its results came from the cache).
    """

    kind = None  # the name saved in manifests (set by each kind)
    param = None  # the stacker.params.Param of the Ensemble parameter that selects this kind, if any
    saved_types: tuple = ()  # classes its fold models are saved as (trusted when loading)
    weighted = False  # its fold fits take sample weights (class_weight, sample_weight)
    exported = False  # its fold models have an ONNX form on its source's rows, so stacker.io.export can write it
    takes_views = False  # a backbone entry's views ("name+flip") reach it: it trains on and averages over them
    cli_title = None  # the title of its command-line group, and the group's Option rows:
    cli_options: tuple = ()

    @classmethod
    def from_cli(cls, args):
        """The value of :attr:`param` that parsed :attr:`cli_options` describe."""
        return None

    @classmethod
    def code_parts(cls, out_of_core: bool = False) -> dict:
        """Fingerprints of the code that decides this kind's results (names end in ``code``)."""
        return {}

    @classmethod
    def check_weights(cls, spec: dict, what: str) -> None:
        """Raise unless this spec's fold fits take row weights (``what``: the feature that needs them)."""
        if not cls.weighted:
            raise ValueError(f"{spec['name']}: the {cls.kind!r} learner kind does not take {what}; fit it without "
                             "them or use frozen-feature models")

    @classmethod
    def check_streaming(cls, spec: dict) -> None:
        """Raise if this spec cannot be fitted out of core (on cached rows read a window at a time)."""

    def __init__(self, spec: dict, source, settings: Settings):
        self.spec = spec
        self.name = spec["name"]
        self.source = source
        self.settings = settings

    # -- construction -----------------------------------------------------------------
    @classmethod
    def specs(cls, spec: dict, models) -> list[dict]:
        """The learner specs of one backbone entry (one per model)."""
        out = []
        for item in model_names(spec.pop("models", None) or spec.pop("head", None) or models):
            out.append({**spec, "model": item, "name": f"{spec['base']}:{model_label(item)}"})
        return out

    @classmethod
    def source_id(cls, spec: dict) -> tuple:
        """Learners with equal source ids share one extractor (and so one set of cached features)."""
        return (spec["base"], cls.kind)

    @classmethod
    def make_source(cls, spec: dict, settings: Settings, model=None, weights_id=None, saved=None):
        return FeatureExtractor(spec["backbone"], feature_dtype=settings.feature_dtype,
                                **extractor_kwargs(spec, settings, model, weights_id, saved))

    def views(self) -> dict:
        """View name -> extractor of the cached inputs this learner reads."""
        return {"original": self.source}

    def predict_views(self) -> tuple:
        """The views whose probabilities its predictions average (those it reads, unless a kind says otherwise)."""
        return tuple(self.views())

    def export_refusal(self, meta_inputs: str) -> str | None:
        """Why :mod:`stacker.io.export` cannot write this learner for a level 2 reading ``meta_inputs``, or None."""
        if not self.exported:
            return f"the {self.kind!r} kind is not exported"
        return None

    def features(self, inputs: dict):
        """The rows level 2 reads as this learner's features (``meta_inputs``): the original view's here."""
        return inputs["original"]

    # -- identity ---------------------------------------------------------------------
    def key(self, images_fp: str, cv: int, seed: int) -> str:
        """Everything that decides this learner's results: source, model, images, folds, code."""
        w = getattr(self, "sample_weight_", None)  # weighted fits are other results; unweighted keys stay as they were
        return stable_hash({"features": self.source.key_meta(), "images": images_fp, "model": describe(self.spec["model"]),
                            "cv": cv, "seed": seed, "stacker": __version__, "kind": self.kind, **self._key_extra(),
                            **({} if w is None else {"sample_weight": hashlib.sha256(w.tobytes()).hexdigest()})})[:24]

    def _key_extra(self) -> dict:
        return {"dtype": self.settings.feature_dtype, "persist": PERSIST_FORMAT,
                **self.code_parts(bool(self.settings.get("out_of_core")))}

    def entry_meta(self) -> dict:
        """Whose a cache entry is and which code made it (its meta.json, read by ``stacker cache``).

        ``code`` holds the key parts that are code fingerprints (names ending in ``code``),
        the storage format and the stacker version: an entry made by other code is stale.
        """
        parts = {**self.source.key_meta(), **self._key_extra()}
        code = {k: v for k, v in parts.items() if k.endswith("code") or k == "persist"}
        return {"backbone": self.spec["backbone"], "learner": self.name, "learner_key": getattr(self, "key_", None),
                "data": getattr(self, "images_fp_", None), "code": {**code, "stacker": __version__},
                **({"variant": self.variant} if getattr(self, "variant", None) else {})}

    # -- fitting ----------------------------------------------------------------------
    def fit_oof(self, inputs: dict, y, folds, k: int, data, images_fp: str, run_folds=None,
                sample_weight=None) -> "Learner":
        """Fit one model per fold on the other folds; keep out-of-fold outputs (or read them from the cache).

        ``run_folds(learner, fits)`` runs the fold fits (``fits[i]()`` gives fold ``i``'s
        ``(model, arrays)``) and returns their results in order; the default runs them here,
        one after another, through their checkpoints (:mod:`stacker.learners.distributed` runs them on Ray).
        ``sample_weight`` (one per row, kinds with ``weighted``) is kept as ``sample_weight_``:
        each fold's fit reads its rows' weights, and it is part of the key.
        """
        if sample_weight is not None and not self.weighted:
            raise ValueError(f"{self.name}: the {self.kind!r} learner kind does not take sample weights")
        self.sample_weight_ = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        self.key_ = self.key(images_fp, len(folds), self.settings.random_state)
        self.images_fp_ = images_fp
        store = result_store(self.settings.cache_dir, "learners")
        hit = store.get(self.key_) if store else None
        t0 = time.perf_counter()
        fold_models = self._load_cached(hit, [f"fold{i}" for i in range(len(folds))]) if hit else None
        if fold_models is not None:
            self.fold_models_ = fold_models
            with np.load(checked_array_file(os.path.join(hit, "arrays.npz")), allow_pickle=False) as z:
                self.arrays_ = {name: z[name].astype(_dtype(name, z[name], len(y)), copy=False) for name in z.files}
            with open(os.path.join(hit, "timing.json")) as f:
                self.train_s_ = json.load(f).get("train_s")
            self._log(f"{self.name}: out-of-fold predictions from the cache")
        else:
            state = self._prepare(inputs, y)
            self.fold_models_, self.arrays_ = [], {}
            fits = [_FoldFit(self, i, tr, va, inputs, y, k, data, state) for i, (tr, va) in enumerate(folds)]
            for i, ((tr, va), (est, arrays)) in enumerate(zip(folds, (run_folds or run_folds_here)(self, fits))):
                for name, values in arrays.items():
                    dtype = _dtype(name, values, len(y))
                    self.arrays_.setdefault(name, np.zeros((len(y),) + values.shape[1:], dtype))[va] = values
                self.fold_models_.append(est)
                w_va = None if self.sample_weight_ is None else self.sample_weight_[va]
                self._log(f"{self.name}: fold {i + 1}/{len(folds)} log loss "
                          f"{score(y[va], arrays['oof_proba'], k, w_va)['log_loss']:.4f}")
            self.train_s_ = time.perf_counter() - t0
            if store:
                with store.put(self.key_, meta=self.entry_meta()) as tmp:
                    for i, est in enumerate(self.fold_models_):
                        save_estimator(est, os.path.join(tmp, f"fold{i}"))
                    np.savez(os.path.join(tmp, "arrays.npz"), **self.arrays_)
                    with open(os.path.join(tmp, "timing.json"), "w") as f:
                        json.dump({"train_s": self.train_s_}, f)
                self._drop_checkpoints(len(folds))
        self.oof_proba_ = self.arrays_["oof_proba"]
        return self

    def _prepare(self, inputs, y):
        """Work shared by every fold, done once before them (e.g. frozen pooled features)."""
        return None

    def _fit_fold(self, i, tr, va, inputs, y, k, data, state):
        """Fit fold ``i`` on rows ``tr``; return ``(model, {name: out-of-fold array for rows va})``."""
        raise NotImplementedError(f"learner kind {self.kind!r} does not define _fit_fold")

    def _checkpointed(self, i, fit):
        """Fold ``i`` from its checkpoint under ``cache_dir/folds``, or fitted and checkpointed."""
        hit = self._checkpoint(i)
        if hit is not None:
            return hit
        est, arrays = fit()
        self._save_checkpoint(i, est, arrays)
        return est, arrays

    def _checkpoint(self, i):
        """Fold ``i``'s ``(model, arrays)`` from its checkpoint, or None."""
        store = result_store(self.settings.cache_dir, "folds")
        hit = store.get(f"{self.key_}-fold{i}") if store else None
        models = self._load_cached(hit, ["model"]) if hit else None
        if models is None:
            return None
        with np.load(checked_array_file(os.path.join(hit, "arrays.npz")), allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
        self._log(f"{self.name}: fold {i + 1} from its checkpoint")
        return models[0], arrays

    def _save_checkpoint(self, i, est, arrays) -> None:
        """Checkpoint fold ``i`` (where there is a cache)."""
        store = result_store(self.settings.cache_dir, "folds")
        if store:
            with store.put(f"{self.key_}-fold{i}", meta=self.entry_meta()) as tmp:
                save_estimator(est, os.path.join(tmp, "model"))
                np.savez(os.path.join(tmp, "arrays.npz"), **arrays)

    def _load_cached(self, entry: str, stems: list[str]):
        """Cached models, or None (recompute) when they are refused (untrusted types, a forged archive) or corrupt."""
        try:
            return [load_estimator(os.path.join(entry, stem), self.settings.trusted) for stem in stems]
        except (UntrustedTypeError, ValueError, OSError) as e:
            warnings.warn(f"{self.name}: not using a cached result: {e}", stacklevel=3)
            return None

    def _drop_checkpoints(self, n_folds: int) -> None:
        store = result_store(self.settings.cache_dir, "folds")
        for i in range(n_folds):
            shutil.rmtree(store.path(f"{self.key_}-fold{i}"), ignore_errors=True)

    def _log(self, msg: str) -> None:
        if self.settings.verbose:
            print(msg, flush=True)

    # -- level-2 inputs and scores ----------------------------------------------------
    def meta_oof(self, inputs: dict):
        """Out-of-fold ``(probabilities, features)`` this learner gives level 2."""
        return self.oof_proba_, self.features(inputs)

    def fold_meta(self, inputs: dict, i: int):
        """Fold ``i``'s model's ``(probabilities, features)`` for level 2 on new rows: a model that never saw fold ``i``.

        What pseudo-labelling (:mod:`stacker.pseudo_labels`) asks for fold ``i``'s labels of unlabelled images.
        """
        est, k = self.fold_models_[i], self.settings.n_classes
        probas = [align_proba(est, est.predict_proba(inputs[v]), k) for v in self.predict_views()]
        return views_mean(probas), self.features(inputs)

    def extra_scores(self, y, k) -> dict:
        """Learner-specific leaderboard entries (e.g. fine-tuning's phase-1 scores)."""
        epochs = sum(len((getattr(est, "history_", None) or {}).get("loss", [])) for est in self.fold_models_)
        return {"epochs": epochs, "s_per_epoch": self.train_s_ / epochs if epochs and self.train_s_ else None}

    # -- prediction -------------------------------------------------------------------
    def fold_average(self, X) -> np.ndarray:
        """Mean of the fold models' probabilities.

        The inputs are checked once here, and known model kinds then skip scikit-learn's
        per-call checks (:func:`stacker.learners.fastpath.proba_function`): for one image those cost
        more than the models. Each such function is compared with ``predict_proba`` on the
        first inputs it gets and replaced by ``predict_proba`` if they differ.
        """
        k = self.settings.n_classes
        if isinstance(X, CachedRows):  # out of core: a window of cached rows at a time
            out = np.empty((len(X), k))
            for pos, rows in X.windows():
                out[pos] = self.fold_average(rows)
            return out
        X = np.asarray(X)
        width = getattr(self.fold_models_[0], "n_features_in_", X.shape[-1])
        if X.ndim != 2 or X.shape[1] != width or not np.isfinite(X).all():
            raise ValueError(f"{self.name}: expected finite inputs of shape (n, {width}), got {X.shape}"
                             + (" holding NaN or infinity" if X.ndim == 2 and X.shape[1] == width else ""))
        return np.mean([align_proba(est, f(X), k) for est, f in zip(self.fold_models_, self._proba_functions(X))], axis=0)

    def _proba_functions(self, X) -> list:
        """Per fold model: its check-free probability function, verified against ``predict_proba`` on ``X`` once."""
        cached = self.__dict__.get("_proba_fns")
        if cached is not None and cached[0] is self.fold_models_:
            return cached[1]
        fns = []
        for est in self.fold_models_:
            fast = proba_function(est)
            if fast != est.predict_proba and not np.allclose(fast(X), est.predict_proba(X), rtol=1e-6, atol=1e-9):
                fast = est.predict_proba
            fns.append(fast)
        self._proba_fns = (self.fold_models_, fns)
        return fns

    def _test_proba(self, X, paths, view="original") -> np.ndarray:
        """Fold-averaged probabilities, cached per learner key and image files when there is a cache."""
        store = result_store(self.settings.cache_dir, "test_proba")
        key = getattr(self, "key_", None)
        if store is None or key is None or not paths:
            return self.fold_average(X)
        pkey = stable_hash([key, file_fingerprints(paths, self.settings.cache_dir)] + ([view] if view != "original" else []))[:24]
        hit = store.get(pkey)
        if hit:
            return np.load(checked_array_file(os.path.join(hit, "proba.npy")), allow_pickle=False)
        proba = self.fold_average(X)
        with store.put(pkey, meta=self.entry_meta()) as tmp:
            np.save(os.path.join(tmp, "proba.npy"), proba)
        return proba

    def predict(self, inputs: dict, paths=None, features: bool = False):
        """``(probabilities, level-2 probabilities, level-2 features)`` for new images' cached inputs."""
        proba = views_mean([self._test_proba(inputs[v], paths, v) for v in self.predict_views()])
        return proba, proba, self.features(inputs) if features else np.zeros((len(proba), 0), np.float32)

    # -- persistence ------------------------------------------------------------------
    def source_file(self) -> str:
        return f"backbones/{self.spec['base'].replace('@', '_')}.keras"

    def save(self, directory: str, onnx: bool | None = None) -> dict:
        """Write the source network (once per source) and the fold models; return the manifest entry.

        ``onnx``: also write the source's ONNX graph, so a loaded model never exports;
        None writes it when the source runs on ONNX Runtime.
        """
        bb_file = self.source_file()
        if not os.path.exists(os.path.join(directory, bb_file)):
            os.makedirs(os.path.dirname(os.path.join(directory, bb_file)), exist_ok=True)
            self.source.model.save(os.path.join(directory, bb_file))
        onnx_file = self._save_graph(directory, bb_file[:-len(".keras")] + ".onnx", onnx)
        stems = []
        for i, est in enumerate(self.fold_models_):
            stem = f"learners/{self.name.replace('@', '_').replace(':', '-')}_fold{i}"
            os.makedirs(os.path.join(directory, "learners"), exist_ok=True)
            save_estimator(est, os.path.join(directory, stem))
            stems.append(stem)
        spec = {k: (describe(v) if k == "model" and not isinstance(v, str) else v) for k, v in self.spec.items()}
        return {"name": self.name, "kind": self.kind, "spec": spec, "backbone_file": bb_file, "onnx_file": onnx_file,
                "weights_id": self.source.weights_id, "folds": stems, "learner_key": getattr(self, "key_", None)}

    def _save_graph(self, directory: str, rel: str, onnx: bool | None) -> str | None:
        """Write the source's ONNX graph to ``rel`` (once per source); its path, or None without one."""
        if os.path.exists(os.path.join(directory, rel)):
            return rel
        if not (onnx or (onnx is None and self.source.engine == "onnx")):
            return None
        try:
            graph = self.source.onnx_graph()
        except Exception as exc:  # noqa: BLE001 - the model still loads and runs on Keras without it
            if onnx:
                raise
            warnings.warn(f"{self.name}: no ONNX graph saved ({type(exc).__name__}: {exc}); a loaded model "
                          "will export it or run on Keras")
            return None
        with open(os.path.join(directory, rel), "wb") as f:
            f.write(graph)
        return rel

    @classmethod
    def load(cls, entry: dict, directory: str, settings: Settings, networks: dict) -> "Learner":
        """Rebuild a saved learner; ``networks`` maps a saved network's file to its :class:`SavedNetwork`.

        The source network is not loaded here: the ONNX graph opens in the background and
        the ``.keras`` archive is read only if an engine or a fine-tuned model needs it.
        """
        spec = dict(entry["spec"])
        source = cls.make_source(spec, settings, weights_id=entry["weights_id"],
                                 saved=networks[entry["backbone_file"]])
        learner = cls(spec, source, settings)
        learner.fold_models_ = [load_estimator(member(directory, stem), settings.trusted)
                                for stem in entry["folds"]]
        if entry.get("learner_key"):
            learner.key_ = entry["learner_key"]
        return learner


def _dtype(name: str, values: np.ndarray, n: int):
    """How an out-of-fold array is kept: probabilities (``*proba*``) by :func:`~stacker.level2.arrays.oof_dtype`.

    Float32 past its size (at 100k rows of 1,000 classes, four learners' float64 arrays are
    3.2 GB); level 2 reads them in float32 anyway. Other arrays (features) keep their dtype.
    """
    if "proba" in name and values.ndim == 2 and values.dtype.kind == "f":
        return oof_dtype(n, values.shape[1])
    return values.dtype


class _FoldFit:
    """One fold's fit as a picklable call (so that another process or a Ray task can run it)."""

    def __init__(self, learner, i, tr, va, inputs, y, k, data, state):
        self.learner, self.i, self.tr, self.va = learner, i, tr, va
        self.inputs, self.y, self.k, self.data, self.state = inputs, y, k, data, state

    def __call__(self):
        return self.learner._fit_fold(self.i, self.tr, self.va, self.inputs, self.y, self.k, self.data, self.state)


def run_folds_here(learner: Learner, fits: list):
    """Fit the folds in this process, one after another (lazily), each through its checkpoint."""
    return (learner._checkpointed(i, fit) for i, fit in enumerate(fits))


def saved_networks(entries, directory: str, files: dict) -> dict:
    """Backbone file -> :class:`~stacker.features.engines.SavedNetwork` for the learners' manifest entries.

    ``files`` (the manifest's sha256 per file) is what each ONNX graph is checked against
    when it is opened. Each ``.keras`` archive is checked here (a forged one is refused by
    the load itself) and loaded by Keras only if it is ever needed.
    """
    out = {}
    for e in entries:
        graph = e.get("onnx_file")
        if e["backbone_file"] not in out:
            check_keras_archive(member(directory, e["backbone_file"]), _backbones.CUSTOM_OBJECT_NAMES)
            out[e["backbone_file"]] = SavedNetwork(
                member(directory, e["backbone_file"]), member(directory, graph) if graph else None,
                files.get(graph) if graph else None, custom_objects=_backbones.custom_objects,
                input_shape=_graph_input(e))
    return out


def _graph_input(entry) -> tuple | None:
    """``(size, size, 3)`` a saved graph must take: the spec's input size (None when the spec gives none)."""
    size = entry["spec"].get("input_size") if isinstance(entry.get("spec"), dict) else None
    return (size, size, 3) if isinstance(size, int) and not isinstance(size, bool) else None


def extractor_kwargs(spec, settings, model=None, weights_id=None, saved=None) -> dict:
    """A learner's extractor arguments: the ensemble's extraction options, the spec's weights and size."""
    kwargs = settings.extraction.extractor_kwargs()
    kwargs.pop("feature_dtype")  # each kind stores its rows in its own type
    return {**kwargs, "weights": spec["weights"], "input_size": spec["input_size"], "verbose": settings.verbose,
            "model": model, "weights_id": weights_id, "strategy": settings.strategy, "saved": saved}


