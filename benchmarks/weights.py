#!/usr/bin/env python
"""Class weights on an imbalanced Caltech-101 subset: balanced accuracy with and without class_weight="balanced".

    python benchmarks/weights.py                     # features cached under /tmp/weights_cache
    python benchmarks/weights.py --classes 12 --seeds 3 --cache DIR

Each subset (seeds 0 .. ``--seeds`` - 1): ``--classes`` classes drawn from those with at least ``--largest`` +
``--holdout`` images; their training counts fall geometrically from ``--largest`` to
``--largest / 10`` images (10:1 largest to smallest), in the drawn order. The next
``--holdout`` images of each class (same number per class) are the held-out split.
One backbone (efficientnet_lite0 at its native 224 px), the default models (logistic and
prototype), 5 folds; fitted twice, without weights and with ``class_weight="balanced"``.

Reported for the ensemble and its logistic learner, averaged over the seeds, out of fold (the
training subset) and on the held-out split: accuracy, balanced accuracy (mean per-class recall), log loss and the
mean recall of the smallest quarter of the classes, all unweighted (so both fits are scored
the same way). The last line is machine-readable.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "..", "shared")
CALTECH = os.path.join(SHARED, "data", "caltech101")


def subsets(args):
    """``(train, holdout)`` ImageSets: the seeded imbalanced subset and a balanced held-out split."""
    from stacker.data.sources import ImageSet, from_folder

    data = from_folder(args.data, ignore=("BACKGROUND_Google",))
    by_class = {c: [p for p, label in zip(data.paths, data.labels) if label == c] for c in data.classes}
    rng = np.random.default_rng(args.seed)
    big = sorted(c for c, ps in by_class.items() if len(ps) >= args.largest + args.holdout)
    chosen = list(rng.choice(big, args.classes, replace=False))
    counts = np.round(args.largest * 10.0 ** (-np.arange(args.classes) / (args.classes - 1))).astype(int)
    train, test = [], []
    for c, n in zip(chosen, counts):
        paths = list(rng.permutation(by_class[c]))
        train += [(p, c) for p in paths[:n]]
        test += [(p, c) for p in paths[n:n + args.holdout]]

    def image_set(rows):
        paths, labels = [p for p, _ in rows], [c for _, c in rows]
        return ImageSet(paths, paths, labels, sorted(chosen))

    return image_set(train), image_set(test), dict(zip(chosen, counts.tolist()))


def measures(y, proba, k, small) -> dict:
    from sklearn.metrics import balanced_accuracy_score, recall_score

    from stacker.level2.arrays import score

    pred = proba.argmax(1)
    recall = recall_score(y, pred, labels=np.arange(k), average=None, zero_division=0)
    return {**{m: v for m, v in score(y, proba, k).items() if m in ("accuracy", "log_loss")},
            "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
            "small_recall": float(recall[small].mean())}


def run(args, seed):
    """Both fits on one seeded subset: ``{"<class_weight>/<model>/<split>": measures}`` and notes."""
    import stacker

    args = argparse.Namespace(**{**vars(args), "seed": seed})
    train, test, counts = subsets(args)
    k = len(train.classes)
    small = np.array(sorted(range(k), key=lambda i: counts[train.classes[i]])[: max(1, k // 4)])
    print(f"seed {seed}: {k} classes, {len(train)} training images ({max(counts.values())} to "
          f"{min(counts.values())} per class), {len(test)} held out ({args.holdout} per class)", flush=True)
    out = {}
    for setting in (None, "balanced"):
        t0 = time.perf_counter()
        ens = stacker.Ensemble([args.backbone], cache_dir=args.cache, weights_dir=args.weights_dir, cv=5,
                               random_state=seed, class_weight=setting, verbose=0).fit(train)
        _, held = ens.evaluate(test, per_image=True)
        logistic = next(n for n in ens.learners_ if n.endswith(":logistic"))
        name = setting or "none"
        for who, oof, hold in (("ensemble", ens.meta_oof_proba_, held["proba"]),
                               ("logistic", ens.oof_proba_[logistic], held["learners"][logistic])):
            out[f"{name}/{who}/oof"] = measures(ens.y_, oof, k, small)
            out[f"{name}/{who}/holdout"] = measures(held["y"], hold, k, small)
        out[f"{name}/combiner"] = ens.meta_.name
        out[f"{name}/fit_s"] = round(time.perf_counter() - t0, 1)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=CALTECH)
    p.add_argument("--cache", default="/tmp/weights_cache")
    p.add_argument("--weights-dir", default=os.environ.get("STACKER_WEIGHTS_DIR", os.path.join(SHARED, "weights")))
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--largest", type=int, default=50)
    p.add_argument("--holdout", type=int, default=10)
    p.add_argument("--seeds", type=int, default=5, help="subsets (and folds) seeded 0 .. SEEDS-1")
    args = p.parse_args(argv)
    per_seed = {seed: run(args, seed) for seed in range(args.seeds)}
    metrics = ("accuracy", "balanced_accuracy", "log_loss", "small_recall")
    mean = {key: {m: float(np.mean([r[key][m] for r in per_seed.values()])) for m in metrics}
            for key, v in per_seed[0].items() if isinstance(v, dict)}
    print(f"\nmean over {args.seeds} seeded subsets ({args.classes} classes, {args.largest} to "
          f"{args.largest // 10} training images per class, {args.holdout} held out per class)")
    print(f"{'class_weight':<13}{'model':<10}{'split':<9}{'accuracy':>9}{'bal_acc':>9}{'log_loss':>9}{'small_rec':>10}")
    for key, m in mean.items():
        name, who, split = key.split("/")
        print(f"{name:<13}{who:<10}{split:<9}{m['accuracy']:>9.4f}{m['balanced_accuracy']:>9.4f}"
              f"{m['log_loss']:>9.4f}{m['small_recall']:>10.4f}")
    print("balanced accuracy of the ensemble on the held-out split, per seed (none -> balanced): "
          + ", ".join(f"{r['none/ensemble/holdout']['balanced_accuracy']:.3f} -> "
                      f"{r['balanced/ensemble/holdout']['balanced_accuracy']:.3f}" for r in per_seed.values()))
    print("(small_rec: mean recall of the smallest quarter of the classes; scores unweighted for both fits)")
    print("RESULT " + json.dumps({"classes": args.classes, "seeds": args.seeds, "mean": mean,
                                  "per_seed": per_seed}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
