#!/usr/bin/env python
"""The GPU against the CPU of the same machine: extraction, one fine-tuning fold, and agreeing features.

    python benchmarks/gpu.py [--n 512] [--backbone efficientnet_lite0] [--data FOLDER]

Each device runs in a fresh process (a process's device is chosen once:
``stacker.features.device``), on the same N images (the first N of
``../shared/data/dogs-vs-cats/train``, stratified; where that folder is absent, N seeded
synthetic photos-like images of two classes written to a temporary folder):

(a) extraction, cold cache: pooled features of every image (decode, resize, forward pass
    on the device's engine: ONNX Runtime with CUDA, or TensorFlow, on a GPU);
(b) extraction again on a second pass over the same images without the cache (the
    engine warm; what a large data set sees after its first batches);
(c) one fine-tuning fold: cut-point activations (computed, then timed separately), then
    :class:`stacker.learners.finetune.FineTunedClassifier` on 80% of the images with the
    last ``--blocks`` blocks unfrozen for ``--epochs`` epochs (mixed precision where the
    device has tensor cores, as ``Ensemble(finetune=...)`` does).

It prints a table (seconds and images/second per device, GPU/CPU ratios), the largest
relative difference between the two devices' features (per image: max |gpu - cpu| /
max |cpu|) and a machine-readable last line: ``gpu=<name or none>
extract_speedup=<cpu_s / gpu_s> finetune_speedup=<...> max_rel_diff=<...>``. Without a
usable GPU the GPU row says why, the CPU row is still measured, and the last line
has ``gpu=none``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "..", "shared", "data", "dogs-vs-cats", "train")


def synthetic_images(folder: str, n: int, seed: int = 0) -> str:
    """``n`` seeded 320x240 JPEGs in ``folder/cat`` and ``folder/dog``: smooth colour fields, no two alike."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, label in enumerate(("cat", "dog")):
        os.makedirs(os.path.join(folder, label), exist_ok=True)
        for i in range(n // 2 + (c < n % 2)):
            small = rng.integers(0, 256, (6, 8, 3)).astype(np.uint8)
            small[..., c] = np.clip(small[..., c].astype(int) + 80, 0, 255)
            Image.fromarray(small).resize((320, 240), Image.BICUBIC).save(os.path.join(folder, label, f"{i}.jpg"))
    return folder


def run_device(args) -> dict:
    """In this process: the device's extraction and fine-tuning figures (features saved to ``args.features``)."""
    from stacker.data.sources import load_images
    from stacker.features.cutpoint import CutPointExtractor
    from stacker.features.device import DeviceError, select
    from stacker.features.extractor import FeatureExtractor
    from stacker.learners.finetune import FineTunedClassifier

    try:
        device = select(args.child)
    except DeviceError as exc:
        return {"device": args.child, "error": str(exc).split(". To use")[0]}
    data = load_images(args.data).head(args.n, seed=0)
    out = {"device": args.child, "name": device.name, "describe": device.describe(), "n": len(data)}
    with tempfile.TemporaryDirectory(prefix="stacker-gpu-bench-") as cache:
        ext = FeatureExtractor(args.backbone, cache_dir=cache, batch_size=args.batch_size, verbose=0)
        ext.model  # built (weights read) before the clock starts
        out["engine"] = ext.engine
        t0 = time.perf_counter()
        feats = ext.extract(data).values
        out["extract_cold_s"] = time.perf_counter() - t0
        again = FeatureExtractor(args.backbone, batch_size=args.batch_size, verbose=0, model=ext.model,
                                 weights_id=ext.weights_id)
        again._forward = ext._forward  # the same warm engine, no cache
        t0 = time.perf_counter()
        again.transform(data)
        out["extract_warm_s"] = time.perf_counter() - t0
        np.save(args.features, np.asarray(feats, dtype=np.float32))

        cut = CutPointExtractor(args.backbone, blocks=args.blocks, cache_dir=cache, verbose=0)
        t0 = time.perf_counter()
        X = cut.transform(data)
        out["cut_s"] = time.perf_counter() - t0
        rng = np.random.default_rng(0)
        train = np.sort(rng.permutation(len(data))[: int(0.8 * len(data))])
        est = FineTunedClassifier(args.backbone, blocks=args.blocks, augment=(), epochs=args.epochs,
                                  patience=args.epochs, head_epochs=20, random_state=0,
                                  mixed_precision=device.mixed_precision)
        t0 = time.perf_counter()
        est.fit(X[train], data.y[train], top=cut.frozen_top(), bottom=cut.model)
        out["finetune_s"] = time.perf_counter() - t0
        out["mixed_precision"] = device.mixed_precision
        out["epoch_s"] = [s for s in est.history_["epoch_seconds"] if s is not None]
    return out


def child(device: str, args, features: str) -> dict:
    """Run one device in a fresh process; its JSON line back."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", device, "--features", features,
           "--data", args.data, "--n", str(args.n), "--backbone", args.backbone, "--blocks", str(args.blocks),
           "--epochs", str(args.epochs), "--batch-size", str(args.batch_size)]
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if run.returncode != 0:
        raise SystemExit(f"the {device} run failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DATA)
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--child", choices=("cpu", "gpu"), help=argparse.SUPPRESS)
    p.add_argument("--features", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_device(args)))
        return 0
    with tempfile.TemporaryDirectory(prefix="stacker-gpu-bench-") as tmp:
        if not os.path.isdir(args.data):
            print(f"{args.data} not found: {args.n} synthetic images instead", file=sys.stderr)
            args.data = synthetic_images(os.path.join(tmp, "images"), args.n)
        rows = {d: child(d, args, os.path.join(tmp, f"{d}.npy")) for d in ("gpu", "cpu")}
        diff = None
        if "error" not in rows["gpu"]:
            gpu, cpu = np.load(os.path.join(tmp, "gpu.npy")), np.load(os.path.join(tmp, "cpu.npy"))
            diff = float((np.abs(gpu - cpu).max(axis=1) / np.maximum(np.abs(cpu).max(axis=1), 1e-12)).max())
    report(args, rows, diff)
    return 0


def report(args, rows: dict, diff) -> None:
    cpu, gpu = rows["cpu"], rows["gpu"]
    print(f"\n{args.backbone}, {cpu['n']} images, batch {args.batch_size}; fine-tuning: last {args.blocks} blocks, "
          f"{args.epochs} epochs on 80%")
    print(f"{'device':44s} {'engine':7s} {'extract s':>9s} {'img/s':>7s} {'warm img/s':>10s} {'cut s':>6s} "
          f"{'fine-tune s':>11s} {'s/epoch':>8s}")
    for row in (gpu, cpu):
        if "error" in row:
            print(f"{row['device'].upper():44s} not run: {row['error']}")
            continue
        print(f"{row['name'][:44]:44s} {row['engine']:7s} {row['extract_cold_s']:9.1f} "
              f"{row['n'] / row['extract_cold_s']:7.1f} {row['n'] / row['extract_warm_s']:10.1f} {row['cut_s']:6.1f} "
              f"{row['finetune_s']:11.1f} {float(np.median(row['epoch_s'])):8.2f}"
              + ("  (mixed precision)" if row["mixed_precision"] else ""))
    if "error" in gpu:
        print("gpu=none")
        return
    extract, finetune = cpu["extract_cold_s"] / gpu["extract_cold_s"], cpu["finetune_s"] / gpu["finetune_s"]
    print(f"GPU/CPU speed: extraction {extract:.1f}x, fine-tuning fold {finetune:.1f}x; "
          f"features differ by at most {diff:.2e} (relative, per image)")
    print(f"gpu={gpu['name'].replace(' ', '_')} extract_speedup={extract:.2f} finetune_speedup={finetune:.2f} "
          f"max_rel_diff={diff:.2e}")


if __name__ == "__main__":
    sys.exit(main())
