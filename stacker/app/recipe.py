"""What every recipe shares: the command-line options of ``stacker fit`` and fit -> save -> report.

A recipe in ``recipes/`` is a configuration (data layout, defaults) plus a call to
:func:`fit_and_save`; this module keeps the plumbing in one place. Its options are
``stacker fit``'s (:mod:`stacker.app.options`), plus a group of the recipe's own (``--data``,
``--out``, ``--quick`` and whatever the recipe adds). Where a recipe's data set calls for
another default (its backbones, CIFAR's bicubic upscaling, the shared weights folder
beside this checkout), :func:`common_parser` says so in that option's ``--help``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from stacker.app.options import GROUPS, OPTIONS, add_options, ensemble_params, progress_output

__all__ = ["REPO", "SHARED", "RECIPE_OPTIONS", "common_parser", "fit_and_save"]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # stacker/app/ -> the checkout
SHARED = os.path.normpath(os.path.join(REPO, "..", "shared"))
RECIPE_OPTIONS = "options of this recipe"
# Offline weights for the recipes' default backbones live in the shared folder beside the checkout.
WEIGHTS_DIR = os.environ.get("STACKER_WEIGHTS_DIR") or os.path.join(SHARED, "weights")
QUICK_FOLDS = 3  # --quick's folds when --folds is left at its default


def recipe_parser(doc: str, data: str | None, out: str, data_help: str = "input data",
                  quick_help: str = "a few hundred images, small backbones, 3 folds: a first look in minutes"):
    """A recipe's parser with its own group (``parser.recipe_options``): --data, --out, --quick.

    ``--help`` shows the recipe's docstring once, as written, above the options.
    """
    p = argparse.ArgumentParser(description=doc.strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.recipe_options = p.add_argument_group(RECIPE_OPTIONS)
    p.recipe_options.add_argument("--data", default=data,
                                  help=data_help + (" (default: %(default)s)" if data is not None else ""))
    p.recipe_options.add_argument("--out", default=os.path.join(REPO, "artifacts", out),
                                  help="output directory (default: %(default)s)")
    p.recipe_options.add_argument("--quick", action="store_true", help=quick_help)
    p.recipe_defaults = {}
    return p


def recipe_note(name: str, command: str = "stacker fit") -> str:
    """What a recipe's ``--help`` adds to an option whose default it replaces."""
    default = OPTIONS[name].default
    return f"; this recipe's choice ({command}: {'none' if default is None else default})"


def common_parser(doc: str, data: str, out: str, backbones: str, quick_backbones: str,
                  defaults: dict | None = None, quick_limit: int = 200) -> argparse.ArgumentParser:
    """Every ``stacker fit`` option, with its defaults, and the recipe's own group.

    ``backbones`` / ``quick_backbones``: this recipe's default backbones (``"auto"``: the
    recipe picks from what is on the machine); ``quick_limit``: how many training images
    ``--quick`` keeps; ``defaults`` replaces other defaults for this data set. Each
    replaced default is stated in its option's help, with ``stacker fit``'s, and listed in
    ``parser.recipe_defaults``; what ``--quick`` changes is said in ``--quick``'s help and
    in each option it changes, so ``--help`` tells what a quick run does.
    """
    p = recipe_parser(doc, data, out, quick_help=f"a first look in minutes: {quick_limit} training images, "
                                                 f"--backbones {quick_backbones}, {QUICK_FOLDS} folds "
                                                 "(unless those options are given)")
    p.recipe_defaults = {"backbones": None, "weights_dir": WEIGHTS_DIR, **(defaults or {})}
    notes = {name: recipe_note(name) for name in p.recipe_defaults}
    notes["backbones"] = f" (default: {backbones}; with --quick: {quick_backbones}){recipe_note('backbones')}"
    for title, names in GROUPS.items():
        add_options(p, names, title, defaults=p.recipe_defaults, notes=notes)
    for flag, value in (("--folds", QUICK_FOLDS), ("--train-limit", quick_limit)):
        _say_quick_default(p._option_string_actions[flag], value)
    OPTIONS["predictions"].add_to(p.recipe_options)
    OPTIONS["quiet"].add_to(p)
    p.set_defaults(default_backbones=backbones, quick_backbones=quick_backbones, quick_limit=quick_limit)
    return p


def _say_quick_default(action, value) -> None:
    """Add ``--quick``'s value to an option's help: ``(default: 5)`` -> ``(default: 5; with --quick: 3)``."""
    text = action.help.rstrip()
    action.help = text[:-1] + f"; with --quick: {value})" if text.endswith(")") else text + f" (with --quick: {value})"


def finetune_table(scores: dict) -> str:
    """Frozen-head versus fine-tuned out-of-fold scores of every fine-tuned learner ('' if none)."""
    rows = [(n, s) for n, s in scores.items() if "phase1_log_loss" in s]
    if not rows:
        return ""
    head = f"{'learner':20s} {'frozen_ll':>9s} {'tuned_ll':>9s} {'frozen_acc':>10s} {'tuned_acc':>9s} " \
           f"{'kept':>5s} {'extract_s':>9s} {'train_s':>8s}"
    lines = [head, "-" * len(head)]
    for n, s in rows:
        lines.append(f"{n:20s} {s['phase1_log_loss']:9.4f} {s['log_loss']:9.4f} {s['phase1_accuracy']:10.4f} "
                     f"{s['accuracy']:9.4f} {s.get('phase2_kept', 0):5d} {s.get('extract_s', 0):9.1f} "
                     f"{s.get('train_s', 0):8.1f}")
    return "\n".join(lines)


def fit_and_save(args, train, extra: dict | None = None):
    """Fit the ensemble the options describe on ``train``, save it, write the report and run.json.

    ``--out`` is checked first, so that a folder that cannot take the model stops the run
    before the fit rather than after it. Progress (and the description of the training
    set) goes to stderr, or nowhere with ``--quiet``; the leaderboard and where things
    were written go to stdout. ``--quick`` changes what its help says (the parser's
    ``quick_limit``, ``quick_backbones`` and :data:`QUICK_FOLDS`).
    Returns ``(ensemble, run_info, train)`` -- ``train`` as fitted (after ``--quick`` sampling).
    """
    import stacker
    from stacker.app.report import report
    from stacker.io.model_dir import check_output_dir

    check_output_dir(args.out, option="--out")
    backbones = args.backbones or (args.quick_backbones if args.quick else args.default_backbones)
    limit = args.train_limit or (args.quick_limit if args.quick else None)
    folds = QUICK_FOLDS if args.quick and args.folds == OPTIONS["folds"].default else args.folds
    if limit:
        train = train.head(limit, seed=args.seed)
    t0 = time.perf_counter()
    ens = stacker.Ensemble(**ensemble_params(args, backbones=backbones.split(","), cv=folds))
    with progress_output(args.quiet):
        print(f"training images: {train!r}; cache: {os.path.abspath(args.cache)}")
        ens.fit(train)
    fit_s = time.perf_counter() - t0
    board = ens.leaderboard()
    print("\nOut-of-fold leaderboard:\n" + board)
    tuned = finetune_table(ens.scores_)
    if tuned:
        print("\nFine-tuning (out-of-fold; frozen head = phase 1 alone):\n" + tuned)
    os.makedirs(args.out, exist_ok=True)
    ens.save(args.out)
    with open(os.path.join(args.out, "leaderboard.txt"), "w") as f:
        f.write(board + "\n" + (f"\n{tuned}\n" if tuned else ""))
    print(f"report: {report(args.out)}")
    if args.predictions:
        from stacker.app.predictions import write_predictions

        print(f"out-of-fold predictions: {write_predictions(args.predictions, ens.oof_predictions(train))}")
    extract_s = sum(s.get("extract_s") or 0.0 for n, s in ens.scores_.items() if n != "ensemble")
    info = {"fit_s": fit_s, "extract_s": extract_s, "stacking_s": fit_s - extract_s,  # CNNs vs the rest of the fit
            "backbones": backbones.split(","), "folds": folds, "n_train": len(train),
            "scores": ens.scores_, **(extra or {})}
    with open(os.path.join(args.out, "run.json"), "w") as f:
        json.dump(info, f, indent=1, default=str)
    print(f"saved ensemble to {args.out}; fit {fit_s:.1f}s")
    return ens, info, train
