"""The command-line options of ``stacker`` and the recipes, each defined once.

Every option is a row of :data:`OPTIONS`: its flags, type, choices, default and help.
The "features" rows are the extraction options' (:mod:`stacker.features.config`) and each
learner kind brings its own group (:mod:`stacker.learners.kinds`), so a new option or kind
appears here without an edit.
``stacker fit``, ``extract``, ``predict``, ``submit``, ``top5`` and every script in
``recipes/`` build their parsers from these rows, so a name, a default or a help text
cannot drift between them; a recipe may only change a default for its data set, and
says so in its ``--help`` (:func:`stacker.app.recipe.common_parser`). Defaults show in
``--help``. Lists (``--backbones``, ``--models``, ``--meta``, ``--tta``) take commas,
with or without spaces.

Also here, because every entry point shares them: where progress goes (:func:`progress_output`: stderr, or
nowhere with ``--quiet``; results alone go to stdout), how parsed options become
:class:`stacker.Ensemble` parameters (:func:`ensemble_params`) and how a library
message is put in command-line terms (:func:`cli_terms`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import replace

from stacker.features.config import EXTRACTION_OPTIONS, weights_arg
from stacker.features.device import DEVICES
from stacker.learners.kinds import LEARNER_KINDS
from stacker.level2.registry import meta_help, meta_inputs_help
from stacker.params import TABLE_DEFAULT, Option, comma_list

__all__ = ["GROUPS", "OPTIONS", "Option", "add_options", "cli_terms", "comma_list", "ensemble_params",
           "extraction_params", "progress_output", "weights_arg"]


def _opt(*flags, help, **kw) -> Option:
    return Option(tuple(flags), help, **kw)


def _json_object(text: str) -> dict:
    """A JSON object given on a command line (options of a parameter that takes a dict)."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object ({{...}}), got {text!r}")
    return value


_STATIC = {
    # -- what is stacked
    "backbones": _opt("--backbones", default="efficientnet_lite0", type=comma_list, metavar="NAMES",
                      help="registered backbones, comma-separated (spaces allowed); NAME@PX runs one at a PX-square "
                           "input, NAME+flip also trains on and averages in each image's mirror; "
                           "stacker.backbones.list_backbones() lists them"),
    "models": _opt("--models", "--head", dest="models", default="default", type=comma_list, metavar="MODELS",
                   help="models per backbone, each one base learner: a preset (default = logistic,prototype; "
                        "fast; best; dense) or names from logistic, prototype, lda, dense, resnet (or a registered model)"),
    "meta": _opt("--meta", default="auto", type=comma_list, metavar="COMBINERS", help=meta_help),
    "meta_inputs": _opt("--meta-inputs", default="proba", choices=("proba", "features", "both"),
                        help=meta_inputs_help),
    "no_calibration": _opt("--no-calibration", action="store_true",
                           help="do not try a temperature/floor calibration after level 2"),
    "folds": _opt("--folds", type=int, default=5, param="cv",
                  help="stratified folds shared by every learner and level 2"),
    "seed": _opt("--seed", type=int, default=0, param="random_state", help="seeds the folds and every learner"),
    "class_weight": _opt("--class-weight", choices=("balanced",),
                         help="balanced: every class weighs the same in each learner's fit, level 2 and the "
                              "scores (the accuracy reported is then the balanced accuracy); default: every image "
                              "weighs the same"),
    "pseudo_labels": _opt("--pseudo-labels", type=_json_object, metavar="JSON",
                          help="with --unlabeled: pseudo-labelling options as JSON, e.g. '{\"rounds\": 3, "
                               "\"min_confidence\": 0.9}' (keys: rounds, min_confidence, max_share, weight; "
                               "default: stacker.pseudo_labels.DEFAULTS)"),
    "train_limit": _opt("--train-limit", type=int, metavar="N",
                        help="fit on a class-stratified sample of N images (default: all of them)"),
    # -- predicting, submitting, top-5
    "predict_cache": _opt("--cache", metavar="DIR", param="cache_dir",
                          help="feature cache to reuse between calls on the same files (default: none)"),
    "trust": _opt("--trust", action="append", metavar="TYPE", param="trusted",
                  help="a fully qualified class name the model's files may use besides stacker's own (your "
                       "estimator class); repeatable. Other types are refused, so a model from someone else "
                       "runs none of its code"),
    "fill": _opt("--fill", metavar="uniform|P",
                 help="what a submission holds for ids whose image was skipped: 'uniform' or the positive "
                      "class's probability (without it such ids make the submission fail)"),
    "eps": _opt("--eps", type=float, default=1e-3, help="clip submitted probabilities to [eps, 1 - eps]"),
    "k": _opt("--k", type=int, default=5, help="classes shown per image"),
    # -- what a fit writes besides the model (stacker fit and the recipes)
    "predictions": _opt("--predictions", metavar="CSV",
                        help="also write a CSV with one row per training image: out-of-fold probabilities, "
                             "predicted class, loss (sort by it to find mislabelled images), fold; skipped files "
                             "with the reason"),
    # -- where the work runs (every command that computes)
    "device": _opt("--device", default="auto", choices=DEVICES,
                   help="where forward passes and Keras training run: auto (a GPU when one works here), gpu (one, "
                        "or an error before any work, saying how to install the GPU builds) or cpu"),
    # -- every command
    "quiet": _opt("--quiet", action="store_true", help="no progress on stderr (results still go to stdout)"),
}

class _Table(Mapping):
    """A read-only mapping computed from the registries each time it is read (a test may register a row)."""

    def __init__(self, build):
        self._build = build

    def __getitem__(self, key):
        return self._build()[key]

    def __iter__(self):
        return iter(self._build())

    def __len__(self):
        return len(self._build())


def _extraction_rows() -> dict:
    """The "features" options: one per extraction option that has a command-line form."""
    rows = {}
    for opt in EXTRACTION_OPTIONS.values():
        cli = opt.param.cli
        if cli is not None:
            rows[cli.dest_name] = cli if cli.param else replace(cli, param=opt.name)
    return rows


def _kind_rows() -> dict:
    """Every learner kind's command-line group, by title."""
    return {cls.cli_title: {o.dest_name: o for o in cls.cli_options}
            for cls in LEARNER_KINDS.values() if cls.cli_options}


def _all_options() -> dict:
    rows = {**_STATIC, **_extraction_rows()}
    for group in _kind_rows().values():
        rows.update(group)
    return rows


def _all_groups() -> dict:
    return {"stacking": ("backbones", "models", "meta", "meta_inputs", "no_calibration", "folds", "seed",
                         "class_weight", "train_limit"),
            "features": tuple(_extraction_rows()),
            "device": ("device",),
            **{title: tuple(rows) for title, rows in _kind_rows().items()}}


OPTIONS = _Table(_all_options)  # name -> Option: the static rows, the extraction options', the learner kinds'
GROUPS = _Table(_all_groups)  # title -> option names, for `stacker fit` and the recipes


def add_options(parser, names, title: str | None = None, defaults: dict | None = None, notes: dict | None = None):
    """Add the named rows of :data:`OPTIONS` (in an argument group when ``title`` is given).

    ``defaults`` replaces some defaults (a recipe's data-set choices), ``notes`` appends to
    some help texts (to say so).
    """
    target = parser.add_argument_group(title) if title else parser
    for name in names:
        OPTIONS[name].add_to(target, default=(defaults or {}).get(name, TABLE_DEFAULT), note=(notes or {}).get(name, ""))
    return target


@contextlib.contextmanager
def progress_output(quiet: bool = False):
    """Send what the library prints while it works to stderr, or nowhere with ``quiet``.

    Keras's progress bars, fold scores and download notices are written to ``sys.stdout``
    by the code that does the work; a command line keeps stdout for its results (a
    leaderboard, predictions, JSON) so that they can be piped.
    """
    if quiet:
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            yield
    else:
        with contextlib.redirect_stdout(sys.stderr):
            yield


def extraction_params(args) -> dict:
    """The extraction options' values among parsed options (those a parser has)."""
    return {opt.name: opt.param.value_from(args) for opt in EXTRACTION_OPTIONS.values()
            if opt.param.cli is not None and hasattr(args, opt.param.cli.dest_name)}


def kind_params(args) -> dict:
    """The :class:`stacker.Ensemble` parameters that select learner kinds (``finetune``), from their options."""
    return {cls.param.name: cls.from_cli(args) for cls in LEARNER_KINDS.values() if cls.param is not None}


def ensemble_params(args, **overrides) -> dict:
    """The :class:`stacker.Ensemble` parameters that parsed :data:`GROUPS` options describe."""
    params = {"backbones": args.backbones.split(",") if args.backbones else None, "models": args.models,
              "meta": args.meta, "meta_inputs": args.meta_inputs, "calibration": not args.no_calibration,
              "cv": args.folds, "random_state": args.seed, "class_weight": getattr(args, "class_weight", None),
              "pseudo_labels": getattr(args, "pseudo_labels", None),
              **extraction_params(args), **kind_params(args),
              "device": getattr(args, "device", "auto"), "verbose": 0 if args.quiet else 1}
    return {**params, **overrides}


def cli_terms(message: str) -> str:
    """A library message in command-line terms: ``pass on_bad_image='skip'`` -> ``pass --on-bad-image skip``."""
    for opt in OPTIONS.values():
        if opt.action is None:
            param = re.escape(opt.param or opt.dest_name)
            message = re.sub(rf"\b{param}=(['\"]?)([^'\"\s,;)]+)\1", rf"{opt.flags[0]} \2", message)
    return message
