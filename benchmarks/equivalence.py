#!/usr/bin/env python
"""Same seeds, same numbers: out-of-fold probabilities of two builds of stacker, compared.

    python benchmarks/equivalence.py --out base.npz            # on one build (e.g. a git worktree)
    python benchmarks/equivalence.py --out new.npz --compare base.npz

Fits the default ensemble (``Ensemble(backbones)``: logistic + prototype per backbone,
``meta="auto"``, calibrated) on seeded, class-stratified subsets of the real data sets in
``../shared/data`` (Dogs vs. Cats, and Caltech-101 over its first classes) and saves every
learner's and the ensemble's out-of-fold probabilities, level 2's choice and its
candidates' log losses. With ``--compare`` it prints, per array, the largest absolute
difference from the other build's file. It uses only the public API (``stacker.Ensemble``,
``stacker.load_images``), so it runs on any build since 0.2. Last line machine-readable.
"""

import argparse
import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "..", "shared")
CASES = {
    "dvc": (os.path.join(SHARED, "data", "dogs-vs-cats", "train"), ["efficientnet_lite0", "mobilenet_025"], None, 600),
    "caltech": (os.path.join(SHARED, "data", "caltech101"), ["efficientnet_lite0"], 12, 30),
}


def subset(data, n_classes, per_class, seed, folder):
    """A seeded subset as a CSV (so its class list is its own): the first ``n_classes`` classes (all if None),
    ``per_class`` images of each at most."""
    import csv

    import stacker

    rng = np.random.default_rng(seed)
    keep_classes = data.classes[:n_classes] if n_classes else data.classes
    rows = []
    for c in keep_classes:
        idx = [i for i, lab in enumerate(data.labels) if lab == c]
        rows += sorted(rng.permutation(idx)[:per_class].tolist())
    path = os.path.join(folder, "subset.csv")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows([os.path.abspath(data.paths[i]), data.labels[i]] for i in sorted(rows))
    return stacker.load_images(path)


def run(case, cache, weights_dir, seed) -> dict:
    import stacker

    folder, backbones, n_classes, per_class = CASES[case]
    data = subset(stacker.load_images(folder), n_classes, per_class, seed, tempfile.mkdtemp(prefix="stacker-eq-"))
    ens = stacker.Ensemble(backbones, cv=3, random_state=seed, cache_dir=cache, weights_dir=weights_dir, verbose=0)
    ens.fit(data)
    out = {f"{case}/ensemble": ens.meta_oof_proba_}
    out.update({f"{case}/{name}": p for name, p in ens.oof_proba_.items()})
    out[f"{case}/candidates"] = np.array([c["log_loss"] for c in ens.level2_scores_.values()])
    print(f"{case}: {len(data)} images, level 2 {ens.meta_.name}, out-of-fold log loss "
          f"{ens.scores_['ensemble']['log_loss']:.6f}", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="where to write this build's arrays (.npz)")
    p.add_argument("--compare", help="another build's .npz to compare with")
    p.add_argument("--cases", default="dvc,caltech")
    p.add_argument("--cache", default=None, help="feature cache (default: a fresh temporary folder)")
    p.add_argument("--weights-dir", default=os.environ.get("STACKER_WEIGHTS_DIR", os.path.join(SHARED, "weights")))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    cache = args.cache or tempfile.mkdtemp(prefix="stacker-equivalence-")
    arrays = {}
    for case in args.cases.split(","):
        arrays.update(run(case, cache, args.weights_dir, args.seed))
    np.savez(args.out, **{k.replace("/", "__").replace(":", "--"): v for k, v in arrays.items()})
    if not args.compare:
        return 0
    worst = 0.0
    with np.load(args.compare) as other:
        print(f"{'array':48s} {'max |diff|':>12s}")
        for name in sorted(set(other.files) | {k.replace('/', '__').replace(':', '--') for k in arrays}):
            mine = arrays.get(name.replace("__", "/").replace("--", ":"))
            if mine is None or name not in other.files or np.shape(mine) != other[name].shape:
                print(f"{name:48s} {'missing or other shape':>12s}")
                worst = float("inf")
                continue
            d = float(np.max(np.abs(mine - other[name]))) if mine.size else 0.0
            worst = max(worst, d)
            print(f"{name:48s} {d:12.3e}")
    print(f"max_abs_diff={worst:.3e} equal_1e9={worst <= 1e-9}")
    return 0 if worst <= 1e-9 else 1


if __name__ == "__main__":
    sys.exit(main())
