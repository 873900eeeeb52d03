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

The last line is machine-readable:
``predict cold_s=... warm1_ms=... warm1_vs_engine=... warm32_vs_engine=...``.
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
    args = p.parse_args()
    from stacker.data.sources import from_test_folder

    paths = from_test_folder(args.data).paths
    print(describe(args.model))
    c = cold(args.model, paths[0], args.cold_runs)
    before = None if args.no_before else cold_without_graphs(args.model, paths[0])
    w1 = warm(args.model, paths, args.reps, 1)
    w32 = warm(args.model, paths[100:], max(3, args.reps // 6), 32)
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
    print(f"predict cold_s={np.median(c['api']):.2f} cli_cold_s={np.median(c['cli']):.2f} "
          f"warm1_ms={w1['ours_ms']:.1f} warm1_vs_engine={w1['ours_ms'] / w1['raw_ms']:.3f} "
          f"warm32_ms={w32['ours_ms']:.1f} warm32_vs_engine={w32['ours_ms'] / w32['raw_ms']:.3f}"
          + (f" cold_without_graphs_s={before:.2f}" if before is not None else ""))


if __name__ == "__main__":
    main()
