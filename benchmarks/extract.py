#!/usr/bin/env python
"""Pooled-feature extraction: the tutorial way versus stacker, cold and warm, in one process.

    python benchmarks/extract.py [--n 512] [--backbones efficientnet_lite0,mobilenet_025]

For each backbone, over the same N images of dogs-vs-cats/train:
(a) the tutorial way: a Python generator opens each file with Pillow, resizes it,
    stacks a batch and calls ``model.predict`` batch by batch;
(b) stacker's FeatureExtractor as shipped, cold cache (decode/resize in tf.data, in
    parallel with inference, results streamed to HDF5);
(c) stacker again, warm cache (no forward pass).
It prints images/second, the ratios b/a and c/a, the process's peak resident memory
after each step, and the largest relative difference between (a) and (b) features
(per image: max |a - b| / max |a|). The last line is machine-readable.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tutorial_features(model, paths, size: int, batch_size: int) -> np.ndarray:
    """What the transfer-learning tutorials do: PIL in a Python loop, then model.predict per batch."""
    from PIL import Image

    def batches():
        batch = []
        for p in paths:
            with Image.open(p) as img:
                batch.append(np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32))
            if len(batch) == batch_size:
                yield np.stack(batch)
                batch = []
        if batch:
            yield np.stack(batch)

    return np.concatenate([model.predict(b, verbose=0) for b in batches()])


def run(backbone: str, paths, batch_size: int, weights_dir) -> dict:
    from stacker.features import FeatureExtractor, forward_pass_count
    from stacker.images import ImageSet

    data = ImageSet(paths, list(range(len(paths))))
    cache = tempfile.mkdtemp(prefix="stacker-bench-")
    try:
        ext = FeatureExtractor(backbone, batch_size=batch_size, cache_dir=cache, weights_dir=weights_dir, verbose=0)
        model = ext.model
        model.predict(np.zeros((2, ext.size, ext.size, 3), np.float32), verbose=0)  # warm-up: tracing
        ext.transform_arrays([np.zeros((8, 8, 3), np.uint8)])
        t = time.perf_counter()
        a = tutorial_features(model, paths, ext.size, batch_size)
        ta = time.perf_counter() - t
        mem_a = peak_mib()
        t = time.perf_counter()
        b = ext.transform(data)
        tb = time.perf_counter() - t
        mem_b = peak_mib()
        before = forward_pass_count()
        t = time.perf_counter()
        c = FeatureExtractor(backbone, batch_size=batch_size, cache_dir=cache, weights_dir=weights_dir,
                             verbose=0).transform(data)
        tc = time.perf_counter() - t
        assert forward_pass_count() == before, "the warm run must not run the CNN"
        np.testing.assert_array_equal(b, c)
        rel = float((np.abs(a - b).max(axis=1) / np.maximum(np.abs(a).max(axis=1), 1e-12)).max())
        return {"backbone": backbone, "n": len(paths), "a": len(paths) / ta, "b": len(paths) / tb,
                "c": len(paths) / tc, "mem_a": mem_a, "mem_b": mem_b, "mem_c": peak_mib(), "rel": rel}
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.path.join(REPO, "..", "shared", "data", "dogs-vs-cats", "train"))
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--backbones", default="efficientnet_lite0,mobilenet_025")
    p.add_argument("--weights-dir", default=os.path.join(REPO, "..", "shared", "weights"))
    args = p.parse_args()
    from stacker.images import load_images

    paths = load_images(args.data).head(args.n, seed=0).paths
    rows = [run(b, paths, args.batch_size, args.weights_dir) for b in args.backbones.split(",")]
    print(f"{'backbone':20s} {'n':>5s} {'(a) img/s':>10s} {'(b) img/s':>10s} {'(c) img/s':>10s} {'b/a':>6s} "
          f"{'c/a':>8s} {'peak MiB a/b/c':>18s} {'max rel diff':>13s}")
    for r in rows:
        print(f"{r['backbone']:20s} {r['n']:5d} {r['a']:10.1f} {r['b']:10.1f} {r['c']:10.1f} {r['b'] / r['a']:6.2f} "
              f"{r['c'] / r['a']:8.1f} {r['mem_a']:6.0f}/{r['mem_b']:5.0f}/{r['mem_c']:5.0f} {r['rel']:13.2e}")
    first = rows[0]
    print(f"first_vs_tutorial={first['b'] / first['a']:.3f} warm_vs_tutorial={first['c'] / first['a']:.1f} "
          f"max_rel_diff={first['rel']:.3e}")


if __name__ == "__main__":
    main()
