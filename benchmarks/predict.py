#!/usr/bin/env python
"""Prediction with a saved model: cold start in a new process, warm latency against the engine itself.

    python recipes/dogs_vs_cats.py --out artifacts/dogs_vs_cats     # the 4-backbone model, once
    python benchmarks/predict.py [--model artifacts/dogs_vs_cats] [--reps 30]

Measured on images of dogs-vs-cats/test, with no feature cache (every call runs the CNNs):

- cold start: wall time of a new process that imports stacker, loads the model and
  predicts one image (``stacker.predict``), and of ``stacker predict MODEL IMAGE`` (the
  CLI); median of ``--cold-runs`` after one untimed run (so the files are in the page
  cache, as on any machine that predicted before). The child also reports how its time
  splits (import, load, first prediction) and whether TensorFlow was imported. A copy of the
  model saved without its ONNX graphs shows what a new process paid before (one run).
- warm latency: in this process, ``stacker.predict`` of 1 and of 32 image files on the
  loaded model, against the raw engine time of the same forward passes: ONNX Runtime
  sessions of the same graphs already open, the same images already decoded and resized,
  each backbone's ``session.run`` on the batch. Both are timed alternately on the same
  batches; the ratio is of medians.

- the exported file (``stacker export``, one ONNX graph of the whole ensemble): cold start of
  a new process that imports only ``onnxruntime``, ``numpy`` and ``PIL`` (the README's script)
  and predicts one image; warm latency of 1 and 32 files (decode, resize, ``session.run``)
  timed alternately with ``stacker.predict`` on the same files; and the largest difference
  between their probabilities.

The last line is machine-readable:
``predict cold_s=... warm1_ms=... warm1_vs_engine=... warm32_vs_engine=... onnx_cold_s=... onnx_warm1_ms=...``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(REPO, "..", "shared")

CHILD = """
import json, sys, time
t0 = time.perf_counter()
import stacker
t1 = time.perf_counter()
stacker.load(sys.argv[1])
t2 = time.perf_counter()
res = stacker.predict(sys.argv[2:], model=sys.argv[1])
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "predict_s": t3 - t2, "label": res.labels[0],
                  "tensorflow": "tensorflow" in sys.modules}))
"""


# the README's example, for a list of images: imports only onnxruntime, numpy and PIL
ONNX_CHILD = """
import json, sys, time
t0 = time.perf_counter()
import numpy as np, onnxruntime as ort
from PIL import Image, ImageOps
session = ort.InferenceSession(sys.argv[1])
classes = json.loads(session.get_modelmeta().custom_metadata_map["stacker.classes"])
images = [ImageOps.exif_transpose(Image.open(p)).convert("RGB") for p in sys.argv[2:]]
feeds = {i.name: np.stack([np.asarray(im.resize((i.shape[2], i.shape[1]), Image.BILINEAR), np.float32)
                           for im in images]) for i in session.get_inputs()}
proba = session.run(["probabilities"], feeds)[0]
print(json.dumps({"s": time.perf_counter() - t0, "label": classes[int(proba[0].argmax())],
                  "stacker": any(m.split(".")[0] in ("stacker", "tensorflow", "sklearn") for m in sys.modules)}))
"""


def child_env() -> dict:
    """This checkout's stacker first, whatever is installed."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def timed_process(cmd) -> tuple[float, str]:
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
    wall = time.perf_counter() - t
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return wall, out.stdout


def cold(model: str, image: str, runs: int) -> dict:
    """Median wall time of new processes predicting one image (Python API and CLI), and the API's split."""
    api = [sys.executable, "-c", CHILD, model, image]
    cli = [sys.executable, "-m", "stacker", "predict", model, image]
    timed_process(api)  # untimed: page cache
    api_runs, splits = [], []
    for _ in range(runs):
        wall, out = timed_process(api)
        api_runs.append(wall)
        splits.append(json.loads(out.strip().splitlines()[-1]))
    cli_runs = [timed_process(cli)[0] for _ in range(runs)]
    split = {k: float(np.median([s[k] for s in splits])) for k in ("import_s", "load_s", "predict_s")}
    return {"api": api_runs, "cli": cli_runs, "split": split, "tensorflow": any(s["tensorflow"] for s in splits)}


def cold_without_graphs(model: str, image: str) -> float:
    """One new process on a copy of the model saved without ONNX graphs (what every start paid before)."""
    import stacker

    tmp = tempfile.mkdtemp(prefix="stacker-nographs-")
    try:
        stacker.Ensemble.load(model, verbose=0).save(os.path.join(tmp, "model"), onnx=False)
        return timed_process([sys.executable, "-c", CHILD, os.path.join(tmp, "model"), image])[0]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def raw_engine(ens):
    """Per source: input size and a forward function on a fresh session of the same saved graph."""
    from stacker.features import engines

    sources = {}
    for learner in ens.learners_.values():
        for view, ext in learner.views().items():
            sources.setdefault((learner.source_id(learner.spec), view), ext)
    return [(ext.size, engines.session_forward(engines.open_session(ext.onnx_graph()))) for ext in sources.values()]


def warm(model: str, paths, reps: int, n: int) -> dict:
    """Median ms of stacker.predict on n files and of the raw engine on the same n images, alternately."""
    import stacker
    from stacker.data.decode import pil_pixels

    ens = stacker.load(model)
    forwards = raw_engine(ens)
    batches = [paths[(i * n) % len(paths):][:n] for i in range(reps)]
    for b in batches[:2]:  # warm-up: sessions, thread pools, first-call allocations
        stacker.predict(b, model=model)
    ours, raw = [], []
    for b in batches:
        pixels = [np.stack([pil_pixels(p, size) for p in b]) for size, _ in forwards]
        for (_, fwd), x in zip(forwards, pixels):
            fwd(x)
        t = time.perf_counter()
        stacker.predict(b, model=model)
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        for (_, fwd), x in zip(forwards, pixels):
            fwd(x)
        raw.append(time.perf_counter() - t)
    return {"n": n, "ours_ms": 1e3 * float(np.median(ours)), "raw_ms": 1e3 * float(np.median(raw)),
            "sources": len(forwards)}


def exported(model: str, paths, reps: int, runs: int, onnx_path: str) -> dict:
    """The exported file: export seconds, cold start (new process), warm 1 and 32 files against stacker.predict."""
    import onnxruntime as ort
    from PIL import Image, ImageOps

    import stacker

    t = time.perf_counter()
    stacker.load(model).export_onnx(onnx_path)
    export_s = time.perf_counter() - t
    timed_process([sys.executable, "-c", ONNX_CHILD, onnx_path, paths[0]])  # untimed: page cache
    colds = [timed_process([sys.executable, "-c", ONNX_CHILD, onnx_path, paths[0]]) for _ in range(runs)]
    child = json.loads(colds[0][1].strip().splitlines()[-1])
    session = ort.InferenceSession(onnx_path)
    inputs = session.get_inputs()

    def run(files):
        images = [ImageOps.exif_transpose(Image.open(p)).convert("RGB") for p in files]
        feeds = {i.name: np.stack([np.asarray(im.resize((i.shape[2], i.shape[1]), Image.BILINEAR), np.float32)
                                   for im in images]) for i in inputs}
        return session.run(["probabilities"], feeds)[0]

    out = {"export_s": export_s, "cold_s": float(np.median([c[0] for c in colds])), "imports_stacker": child["stacker"]}
    for n, r in ((1, reps), (32, max(3, reps // 6))):
        batches = [paths[(i * n) % len(paths):][:n] for i in range(r)]
        for b in batches[:2]:
            run(b), stacker.predict(b, model=model)
        ours, onnx_t, diff = [], [], 0.0
        for b in batches:
            t = time.perf_counter()
            p_ours = stacker.predict(b, model=model).proba
            ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            p_onnx = run(b)
            onnx_t.append(time.perf_counter() - t)
            if np.isnan(p_ours).any():
                raise RuntimeError(f"stacker.predict skipped an image of {b}")
            diff = max(diff, float(np.abs(p_ours - p_onnx).max()))
        out[n] = {"ours_ms": 1e3 * float(np.median(ours)), "onnx_ms": 1e3 * float(np.median(onnx_t)), "diff": diff}
    out["size_mib"] = os.path.getsize(onnx_path) / 2 ** 20
    return out


def describe(model: str) -> str:
    with open(os.path.join(model, "manifest.json")) as f:
        m = json.load(f)
    graphs = sorted({e["backbone_file"] for e in m["learners"] if e.get("onnx_file")})
    bases = sorted({e["spec"]["base"] for e in m["learners"]})
    return (f"{model}: {len(m['learners'])} learners on {len(bases)} backbones ({', '.join(bases)}), "
            f"level 2 {m['level2']['name']}; ONNX graphs saved for {len(graphs)} of them")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=os.path.join(REPO, "artifacts", "dogs_vs_cats"))
    p.add_argument("--data", default=os.path.join(SHARED, "data", "dogs-vs-cats", "test"))
    p.add_argument("--reps", type=int, default=30, help="warm 1-image predictions (32 images: a sixth as many)")
    p.add_argument("--cold-runs", type=int, default=3)
    p.add_argument("--no-before", action="store_true", help="skip the cold start without saved graphs")
    p.add_argument("--no-export", action="store_true", help="skip the exported file's rows")
    args = p.parse_args()
    from stacker.data.sources import from_test_folder

    paths = from_test_folder(args.data).paths
    print(describe(args.model))
    c = cold(args.model, paths[0], args.cold_runs)
    before = None if args.no_before else cold_without_graphs(args.model, paths[0])
    w1 = warm(args.model, paths, args.reps, 1)
    w32 = warm(args.model, paths[100:], max(3, args.reps // 6), 32)
    tmp = tempfile.mkdtemp(prefix="stacker-export-")
    try:
        x = None if args.no_export else exported(args.model, paths, args.reps, args.cold_runs,
                                                 os.path.join(tmp, "model.onnx"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    s = c["split"]
    print(f"\ncold start (new process, 1 image; median of {args.cold_runs})    seconds   runs")
    print(f"  stacker.predict (python -c)                      {np.median(c['api']):7.2f}   "
          + " ".join(f"{v:.2f}" for v in c["api"]))
    print(f"  stacker predict (CLI)                            {np.median(c['cli']):7.2f}   "
          + " ".join(f"{v:.2f}" for v in c["cli"]))
    print(f"  of which in the API child: import {s['import_s']:.2f}, load {s['load_s']:.2f}, "
          f"first prediction {s['predict_s']:.2f}; TensorFlow imported: {c['tensorflow']}")
    if before is not None:
        print(f"  same model saved without ONNX graphs (before)    {before:7.2f}")
    print(f"\nwarm latency ({w1['sources']} backbones)   stacker.predict ms   raw engine ms   ratio")
    for w in (w1, w32):
        print(f"  {w['n']:2d} image(s)                   {w['ours_ms']:10.1f}   {w['raw_ms']:13.1f}   "
              f"{w['ours_ms'] / w['raw_ms']:5.2f}")
    if x is not None:
        print(f"\nexported file (stacker export: {x['size_mib']:.0f} MiB, written in {x['export_s']:.1f} s)")
        print(f"  cold start, new process with onnxruntime, numpy, PIL only: {x['cold_s']:.2f} s "
              f"(stacker, TensorFlow or scikit-learn imported: {x['imports_stacker']})")
        print("  warm, files in   stacker.predict ms   exported file ms   ratio   max |p diff|")
        for n in (1, 32):
            print(f"  {n:2d} image(s)      {x[n]['ours_ms']:15.1f}   {x[n]['onnx_ms']:16.1f}   "
                  f"{x[n]['ours_ms'] / x[n]['onnx_ms']:5.2f}   {x[n]['diff']:.1e}")
    print(f"predict cold_s={np.median(c['api']):.2f} cli_cold_s={np.median(c['cli']):.2f} "
          f"warm1_ms={w1['ours_ms']:.1f} warm1_vs_engine={w1['ours_ms'] / w1['raw_ms']:.3f} "
          f"warm32_ms={w32['ours_ms']:.1f} warm32_vs_engine={w32['ours_ms'] / w32['raw_ms']:.3f}"
          + (f" cold_without_graphs_s={before:.2f}" if before is not None else "")
          + ("" if x is None else f" onnx_cold_s={x['cold_s']:.2f} onnx_warm1_ms={x[1]['onnx_ms']:.1f} "
             f"onnx_warm32_ms={x[32]['onnx_ms']:.1f} onnx_max_diff={max(x[1]['diff'], x[32]['diff']):.1e}"))


if __name__ == "__main__":
    main()
