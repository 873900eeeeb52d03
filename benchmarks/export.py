#!/usr/bin/env python
"""The exported ONNX file against stacker.predict on real models, in a process that cannot import stacker.

    python recipes/dogs_vs_cats.py --out artifacts/dogs_vs_cats           # the 4-backbone model, once
    python recipes/caltech101.py --quick --out artifacts/caltech101_quick  # a Caltech-101 model, once
    python benchmarks/export.py [--models artifacts/dogs_vs_cats,artifacts/caltech101_quick] [-n 64]

For each saved model: ``Ensemble.export_onnx`` to a temporary file (seconds, size), then
``-n`` real photos of the model's data (decoded upright RGB by Pillow, their original
sizes) predicted twice: by ``stacker.predict`` on those pixel arrays in this process, and
by a child process that refuses any import of stacker, TensorFlow, Keras, scikit-learn or
skops and runs the exported file on plain ONNX Runtime, resizing each image as the file's
metadata says. The table shows the largest absolute difference of probabilities and
whether the predicted classes agree; the goal is at most 1e-4.

The last line is machine-readable: ``export <name>_max_diff=... <name>_agree=...``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(REPO, "..", "shared")
DATA = {"dogs_vs_cats": os.path.join(SHARED, "data", "dogs-vs-cats", "test"),
        "caltech101": os.path.join(SHARED, "data", "caltech101")}

CHILD = r"""
import json, sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("stacker", "tensorflow", "keras", "sklearn", "skops", "tf2onnx", "torch"):
            raise ImportError(f"{name} must not be imported here")
sys.meta_path.insert(0, Refuse())
import numpy as np, onnxruntime as ort
from PIL import Image
session = ort.InferenceSession(sys.argv[1])
arrays = np.load(sys.argv[2])
images = [Image.fromarray(arrays[f"a{i}"]) for i in range(len(arrays.files))]
feeds = {i.name: np.stack([np.asarray(im.resize((i.shape[2], i.shape[1]), Image.BILINEAR), np.float32)
                           for im in images]) for i in session.get_inputs()}
np.save(sys.argv[3], session.run(["probabilities"], feeds)[0])
"""


def photos(model: str, n: int, seed: int) -> list[np.ndarray]:
    """``n`` photos of the model's data set (its test folder, else any of its images), upright RGB uint8."""
    from PIL import Image, ImageOps

    from stacker.data.sources import load_images

    name = next((k for k in DATA if k in os.path.basename(os.path.normpath(model))), "dogs_vs_cats")
    images = load_images(DATA[name])
    rows = np.random.default_rng(seed).choice(len(images), min(n, len(images)), replace=False)
    return [np.asarray(ImageOps.exif_transpose(Image.open(images.paths[r])).convert("RGB")) for r in rows]


def check(model: str, n: int, seed: int) -> dict:
    import stacker

    ens = stacker.load(model)
    with tempfile.TemporaryDirectory(prefix="stacker-export-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        t = time.perf_counter()
        ens.export_onnx(path)
        export_s = time.perf_counter() - t
        arrays = photos(model, n, seed)
        np.savez(os.path.join(tmp, "arrays.npz"), **{f"a{i}": a for i, a in enumerate(arrays)})
        expected = stacker.predict(arrays, model=model).proba
        proc = subprocess.run([sys.executable, "-c", CHILD, path, os.path.join(tmp, "arrays.npz"),
                               os.path.join(tmp, "out.npy")], capture_output=True, text=True, cwd=tmp)
        if proc.returncode:
            raise RuntimeError(f"the ONNX Runtime child failed:\n{proc.stderr[-3000:]}")
        got = np.load(os.path.join(tmp, "out.npy"))
        size = os.path.getsize(path) / 2 ** 20
    return {"learners": len(ens.learners_), "level2": ens.meta_.name, "classes": len(ens.classes_),
            "backbones": len({lr.spec["base"] for lr in ens.learners_.values()}), "export_s": export_s,
            "size_mib": size, "n": len(arrays), "max_diff": float(np.abs(got - expected).max()),
            "agree": float((got.argmax(1) == expected.argmax(1)).mean())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(os.path.join(REPO, "artifacts", m)
                                                for m in ("dogs_vs_cats", "caltech101_quick")))
    p.add_argument("-n", type=int, default=64, help="photos per model (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rows = {}
    for model in args.models.split(","):
        rows[os.path.basename(os.path.normpath(model))] = check(model, args.n, args.seed)
    w = max(21, *map(len, rows))
    print(f"\n{'model':<{w}} backbones  learners  level 2          classes   MiB  export s  images  "
          "max |p diff|  same class")
    for name, r in rows.items():
        print(f"{name:<{w}} {r['backbones']:9d} {r['learners']:9d}  {r['level2']:<15} {r['classes']:8d} "
              f"{r['size_mib']:5.0f} {r['export_s']:9.1f} {r['n']:7d}  {r['max_diff']:12.1e}  {r['agree']:10.3f}")
    print("export " + " ".join(f"{k}_max_diff={r['max_diff']:.1e} {k}_agree={r['agree']:.3f}" for k, r in rows.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
