"""The fine-tuned learner kind: a fine-tuned network per fold on a backbone's cut-point cache.

``Ensemble(finetune=...)`` (or a backbone entry's ``finetune``) selects it; its options,
their CPU defaults (:data:`DEFAULT_FINETUNE`) and its command-line rows are declared here.
"""

from __future__ import annotations

import functools
import hashlib
import inspect

import numpy as np

from stacker.backbones import registry as _backbones
from stacker.features.cutpoint import CutPointExtractor, VIEWS, batched_rows, on_rows, pooled_rows
from stacker.features.cutpoint import cut_code_fingerprint
from stacker.learners.base import Learner, extractor_kwargs
from stacker.learners.finetune import FineTunedClassifier, _ViewBatches
from stacker.learners.kinds import register_learner
from stacker.learners.streaming import streaming_code
from stacker.learners.zoo import WEIGHTS, code_fingerprint
from stacker.level2.arrays import align_proba, score
from stacker.params import Option, Param, comma_list

__all__ = ["DEFAULT_FINETUNE", "FineTunedLearner", "finetune_code", "finetune_params"]


# What `--finetune` means on a CPU: the last two blocks unfrozen, a few epochs, flip as the cached view.
# ``tta``: views averaged at prediction; ``train_views``: cached views drawn from in training;
# ``tta_meta``: "mean" (one probability block per learner) or "views" (one per view) for the
# meta-learner; ``cut_dtype``: storage of cut-point activations (float16 halves disk and memory);
# ``mixed_precision``: "auto" (float16 compute on a GPU with tensor cores, stacker.features.device), True or False.
DEFAULT_FINETUNE = {"blocks": 2, "epochs": 4, "learning_rate": 1e-5, "tta": ("original", "flip"),
                    "train_views": ("original", "flip"), "tta_meta": "mean", "cut_dtype": "float16",
                    "mixed_precision": "auto"}


def finetune_params(spec) -> dict | None:
    """Normalise an ``Ensemble(finetune=...)`` value: None/False, True (CPU defaults) or a dict of overrides."""
    if spec is None or spec is False:
        return None
    params = dict(DEFAULT_FINETUNE)
    if spec is not True:
        if not isinstance(spec, dict):
            raise TypeError(f"finetune must be None, True or a dict of options, got {type(spec).__name__}")
        unknown = set(spec) - set(DEFAULT_FINETUNE) - set(FineTunedClassifier().get_params())
        if unknown:
            raise ValueError(f"unknown finetune options {sorted(unknown)}")
        params.update(spec)
    for key in ("tta", "train_views"):
        params[key] = tuple(params[key])
        bad = [v for v in params[key] if v not in VIEWS]
        if bad:
            raise ValueError(f"finetune {key} views must be among {VIEWS}, got {bad}")
    if params["mixed_precision"] not in ("auto", True, False):
        raise ValueError(f"finetune mixed_precision must be 'auto', True or False, got {params['mixed_precision']!r}")
    if params["tta_meta"] not in ("mean", "views"):
        raise ValueError(f"tta_meta must be 'mean' or 'views', got {params['tta_meta']!r}")
    if not params["tta"] or params["tta"][0] != "original":
        params["tta"] = ("original",) + tuple(v for v in params["tta"] if v != "original")
    return params


@functools.lru_cache(maxsize=None)
def finetune_code() -> str:
    """Hash of the fine-tuning code: a learner cache made by other training code is not reused.

    Computed once per process, from the code that is running (not from a file edited since).
    """
    parts = [FineTunedClassifier, _ViewBatches, pooled_rows, on_rows, batched_rows, FineTunedLearner._fit_fold]
    return hashlib.sha256("".join(inspect.getsource(p) for p in parts).encode()).hexdigest()[:16]


def _finetune_value(value) -> bool:
    return value is None or isinstance(value, (bool, dict))


def _cli(*flags, help, **kw) -> Option:
    return Option(tuple(flags), help, **kw)


@register_learner
class FineTunedLearner(Learner):
    """A fine-tuned network per fold on a backbone's cut-point cache (every cached view).

    Its cached inputs are the activations at the cut, one HDF5 entry per view; each fold's
    :class:`FineTunedClassifier` is fine-tuned on the other folds only, and its
    out-of-fold outputs are the TTA views' probabilities, the phase-1 head's
    probabilities and the fine-tuned network's pooled features.
    """

    kind = "finetuned"
    weighted = True  # each row's weight reaches both phases' losses (class weights, pseudo-labels, distillation)
    exported = True  # the bottom's graph, then each fold's fine-tuned network converted by tf2onnx
    param = Param("finetune", None, "None, True or dict\n    Fine-tune every backbone instead of fitting ``models`` on "
                  "frozen features (two\n    phases on a cut-point cache, see :mod:`stacker.learners.finetune`); "
                  "``True`` uses CPU\n    defaults, a dict overrides them. A backbone dict may set its own.",
                  check=_finetune_value, what="None, True, False or a dict of options")
    saved_types = (FineTunedClassifier,)
    cli_title = "fine-tuning (--finetune: two phases on a cut-point cache; see stacker.learners.finetune)"
    cli_options = (
        _cli("--finetune", action="store_true",
             help="fine-tune every base learner (CPU defaults: last 2 blocks, 4 epochs at 1e-5, flip view + TTA)"),
        _cli("--finetune-blocks", type=int, metavar="N", help="whole blocks to unfreeze from the top (default: 2)"),
        _cli("--finetune-epochs", type=int, metavar="N",
             help="phase-2 epochs; early stopping may end sooner (default: 4)"),
        _cli("--finetune-lr", type=float, metavar="LR", help="phase-2 learning rate (default: 1e-5)"),
        _cli("--finetune-batch-size", type=int, metavar="N",
             help="fine-tuning batch size (default: stacker.learners.finetune's)"),
        _cli("--label-smoothing", type=float, metavar="EPS", help="label smoothing while fine-tuning (default: none)"),
        _cli("--finetune-mode", choices=("cached", "full"),
             help="cached: train on cached cut-point activations (default); full: run the whole network every "
                  "epoch with random augmentation (slower)"),
        _cli("--tta", type=comma_list, metavar="VIEWS",
             help="views averaged at test time and cached for training, from original, flip, center_crop "
                  "(default: original,flip)"),
    )

    @classmethod
    def from_cli(cls, args):
        """``Ensemble(finetune=...)`` from the fine-tuning options (None without --finetune)."""
        if not getattr(args, "finetune", False):
            return None
        options = {"blocks": args.finetune_blocks, "epochs": args.finetune_epochs, "learning_rate": args.finetune_lr,
                   "batch_size": args.finetune_batch_size, "label_smoothing": args.label_smoothing,
                   "mode": args.finetune_mode}
        options = {k: v for k, v in options.items() if v is not None}
        if args.tta:
            options["tta"] = options["train_views"] = tuple(args.tta.split(","))
        if getattr(args, "quick", False):
            options.setdefault("epochs", 2)
            options.setdefault("head_epochs", 30)
        return options or True

    @classmethod
    def code_parts(cls, out_of_core: bool = False) -> dict:
        # the phase-1 head is the zoo's dense head, and out of core its rows stream: both decide results
        parts = {"model_code": code_fingerprint(), "finetune_code": finetune_code(), "cut_code": cut_code_fingerprint()}
        if out_of_core:
            parts["out_of_core"] = streaming_code()
        return parts

    @classmethod
    def check_weights(cls, spec, what):
        if what != WEIGHTS and spec["finetune"].get("mode") == "full":
            raise ValueError(f"{spec['name']}: finetune mode 'full' reads the pixels of training images, so {what} "
                             "cannot add rows to it; use mode='cached'")

    @classmethod
    def specs(cls, spec, models):
        ft = finetune_params(spec["finetune"])
        cfg = _backbones.get_cfg(spec["backbone"])
        if not cfg.block_pattern:
            raise ValueError(f"backbone {cfg.name} cannot be fine-tuned by blocks (no block_pattern registered); "
                             "fine-tune another backbone or give this one finetune=None in its spec")
        spec.pop("models", None)
        spec.pop("head", None)
        return [{**spec, "finetune": ft, "model": "finetune", "name": f"{spec['base']}:finetune"}]

    @classmethod
    def source_id(cls, spec):
        return (spec["base"], cls.kind, spec["finetune"]["blocks"], spec["finetune"]["cut_dtype"])

    @classmethod
    def make_source(cls, spec, settings, model=None, weights_id=None, saved=None):
        ft = spec["finetune"]
        return CutPointExtractor(spec["backbone"], blocks=ft["blocks"], feature_dtype=ft["cut_dtype"],
                                 **extractor_kwargs(spec, settings, model, weights_id, saved))

    def views(self) -> dict:
        ft = self.spec["finetune"]
        cache = self.__dict__.setdefault("_views", {})
        for v in dict.fromkeys(ft["tta"] + ft["train_views"]):
            if v not in cache:
                cache[v] = self.source if v == "original" else self.source.with_view(v)
        return dict(cache)

    def predict_views(self) -> tuple:
        return tuple(self.spec["finetune"]["tta"])

    def export_refusal(self, meta_inputs: str) -> str | None:
        if meta_inputs != "proba":
            return (f"level 2 reads its fine-tuned features (meta_inputs={meta_inputs!r}), which the export does not "
                    "compute; fit with meta_inputs='proba'")
        if self.spec["finetune"]["tta_meta"] != "mean":
            return "level 2 reads one probability block per view (tta_meta='views'); fit with tta_meta='mean'"
        if any(getattr(est, "mixed_precision", False) for est in getattr(self, "fold_models_", ())):
            return ("its fold networks compute in float16 (mixed precision), which the float32 graph would not "
                    "reproduce; fit with finetune={'mixed_precision': False} to export")
        return None

    def _key_extra(self) -> dict:  # float16 training gives other fold models: its results are cached apart
        return {**super()._key_extra(), "finetune": {**self.spec["finetune"], "mixed_precision": self._mixed()}}

    def _mixed(self) -> bool:
        """Whether fine-tuning runs in mixed precision: as asked, or (``"auto"``) where the device has tensor cores."""
        from stacker.features.device import current

        asked = self.spec["finetune"].get("mixed_precision", "auto")
        return current().mixed_precision if asked == "auto" else bool(asked)

    def _prepare(self, inputs, y):
        return {"top": self.source.frozen_top(), "pooled": self.source.frozen_pooled(inputs["original"])}

    def _fit_fold(self, i, tr, va, inputs, y, k, data, state):
        from stacker.data.scan import scan_images

        ft, st = self.spec["finetune"], self.settings
        params = {p: v for p, v in ft.items() if p in FineTunedClassifier().get_params()}
        est = FineTunedClassifier(**{**params, "backbone": self.source.cfg.name, "weights": self.spec["weights"],
                                     "input_size": self.source.size, "weights_dir": st.weights_dir,
                                     "random_state": st.random_state + i, "strategy": st.strategy,
                                     "mixed_precision": self._mixed(), "verbose": 2 if st.verbose else 0})
        X, w = inputs["original"], getattr(self, "sample_weight_", None)
        extra = [inputs[v][tr] for v in ft["train_views"] if v != "original"]
        self._log(f"{self.name}: fine-tuning fold {i + 1} ({len(tr)} rows, views {ft['train_views']})")
        # extra rows (pseudo-labels, distillation) have no file: mode 'full' is refused for them (check_weights)
        paths = [data.paths[r] for r in tr] if len(y) == len(data.paths) else None
        orient = scan_images(paths)[0] if ft.get("mode") == "full" else None
        est.fit(X[tr], y[tr], None if w is None else w[tr], views=extra, pooled=state["pooled"][tr], paths=paths,
                orientations=orient, top=state["top"], bottom=self.source.model)
        arrays = {f"oof_proba_{v}": align_proba(est, est.predict_proba(inputs[v][va]), k) for v in ft["tta"]}
        arrays["oof_proba"] = np.mean([arrays[f"oof_proba_{v}"] for v in ft["tta"]], axis=0)
        arrays["phase1_oof_proba"] = align_proba(est.head_, est.head_.predict_proba(state["pooled"][va]), k)
        arrays["oof_features"] = est.transform(X[va])
        return est, arrays

    def _meta_proba(self, per_view: dict, proba):
        ft = self.spec["finetune"]
        return np.concatenate([per_view[v] for v in ft["tta"]], axis=1) if ft["tta_meta"] == "views" else proba

    def meta_oof(self, inputs):
        per_view = {v: self.arrays_[f"oof_proba_{v}"] for v in self.spec["finetune"]["tta"]}
        return self._meta_proba(per_view, self.oof_proba_), self.arrays_["oof_features"]

    def fold_meta(self, inputs, i):
        est, k = self.fold_models_[i], self.settings.n_classes
        per_view = {v: align_proba(est, est.predict_proba(inputs[v]), k) for v in self.predict_views()}
        return self._meta_proba(per_view, np.mean(list(per_view.values()), axis=0)), est.transform(inputs["original"])

    def extra_scores(self, y, k) -> dict:
        phase1 = score(y, self.arrays_["phase1_oof_proba"], k)
        return {**super().extra_scores(y, k), **{f"phase1_{m}": v for m, v in phase1.items()},
                "phase2_kept": sum(bool(getattr(est, "phase2_kept_", False)) for est in self.fold_models_),
                "views": list(self.spec["finetune"]["tta"])}

    def predict(self, inputs, paths=None, features=False):
        ft = self.spec["finetune"]
        per_view = {v: self._test_proba(inputs[v], paths, v) for v in ft["tta"]}
        proba = np.mean(list(per_view.values()), axis=0)
        X = inputs["original"]
        feats = (np.mean([est.transform(X) for est in self.fold_models_], axis=0) if features
                 else np.zeros((len(X), 0), np.float32))
        return proba, self._meta_proba(per_view, proba), feats

    def source_file(self) -> str:
        ft = self.spec["finetune"]
        return f"backbones/{self.spec['base'].replace('@', '_')}_bottom{ft['blocks']}.keras"

