#!/usr/bin/env python
"""Phase-2 fine-tuning time per epoch: cut-point cache versus recomputing the frozen bottom.

    python benchmarks/finetune.py [--n 256] [--backbone efficientnet_lite0] [--blocks 2] [--epochs 3]

Same images (the first N of ../shared/data/dogs-vs-cats/train, stratified), same
backbone, same split, same seed, one process:

(a) ``mode="full"``: every epoch runs pixels through the frozen bottom, then the
    unfrozen top blocks and the head (no random augmentation, so only the frozen
    recomputation differs);
(b) ``mode="cached"``: the bottom ran once (cut-point activations in HDF5, time shown
    separately); every epoch runs only the top blocks and the head.

Epoch times are medians over epochs 2..E (epoch 1 includes graph tracing). The last
line is machine-readable: ``full_s_per_epoch=<a> cached_s_per_epoch=<b> speedup=<a/b>``.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "..", "shared", "data", "dogs-vs-cats", "train")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DATA)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--weights", default="imagenet")
    args = p.parse_args(argv)
    if not os.path.isdir(args.data):
        raise SystemExit(f"{args.data} not found: pass --data (a folder of cat.N.jpg / dog.N.jpg)")

    from stacker.features.cutpoint import CutPointExtractor
    from stacker.learners.finetune import FineTunedClassifier
    from stacker.data.sources import load_images

    data = load_images(args.data).head(args.n, seed=0)
    cache = tempfile.mkdtemp(prefix="stacker-ft-bench-")
    ext = CutPointExtractor(args.backbone, blocks=args.blocks, weights=None if args.weights == "none" else args.weights,
                            cache_dir=cache, verbose=0)
    t0 = time.perf_counter()
    X = ext.transform(data)
    cut_s = time.perf_counter() - t0
    top, bottom = ext.frozen_top(), ext.model
    results = {}
    for mode in ("full", "cached"):
        est = FineTunedClassifier(args.backbone, blocks=args.blocks, mode=mode, augment=(), epochs=args.epochs,
                                  patience=args.epochs, head_epochs=20, random_state=0)
        t0 = time.perf_counter()
        est.fit(X, data.y, paths=data.paths, top=top, bottom=bottom)
        total = time.perf_counter() - t0
        secs = [s for s in est.history_["epoch_seconds"] if s is not None]
        results[mode] = (float(np.median(secs[1:] if len(secs) > 1 else secs)), secs, total,
                         min(v for v in est.history_["val_loss"] if v is not None))
    print(f"\n{args.backbone}, last {args.blocks} blocks unfrozen, {len(data)} images "
          f"({len(data) - int(np.ceil(0.1 * len(data)))} train / {int(np.ceil(0.1 * len(data)))} validation), "
          f"{args.epochs} epochs")
    print(f"cut-point activations {ext.cut_shape}, computed once in {cut_s:.1f}s "
          f"({cut_s / len(data) * 1000:.1f} ms/image)")
    print(f"{'phase 2':28s} {'s/epoch':>8s} {'epochs (s)':>24s} {'fit_s':>7s} {'best val_loss':>13s}")
    names = {"full": "(a) full forward every epoch", "cached": "(b) cut-point cache"}
    for mode, (med, secs, total, best) in results.items():
        print(f"{names[mode]:28s} {med:8.2f} {' '.join(f'{s:.2f}' for s in secs):>24s} {total:7.1f} {best:13.4f}")
    speedup = results["full"][0] / results["cached"][0]
    print(f"speedup per epoch: {speedup:.1f}x")
    print(f"full_s_per_epoch={results['full'][0]:.3f} cached_s_per_epoch={results['cached'][0]:.3f} "
          f"speedup={speedup:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
