#!/usr/bin/env python
"""int8 EfficientNet-Lite with ONNX Runtime static quantization: speed and fidelity against float.

    python benchmarks/int8.py [--variants efficientnet_lite0] [--calib 256] [--oof]

For each variant, the float graph stacker runs (the cached export under --cache) is
prepared with ``quant_pre_process`` and quantized statically in QDQ format with several
recipes, calibrated on Dogs vs. Cats training images that are not among the N evaluation
images:

- ``naive``: MinMax, per-tensor weights, 64 calibration images (the issue's first try);
- ``minmax``, ``percentile`` (99.999th), ``entropy``: per-channel weights with
  ``reduce_range`` (7-bit weights: this CPU has no VNNI, so 8-bit products may saturate);
- ``<best>+float-stem``, ``+float-head``, ``+float-ends``: the best of those with the input
  scaling and stem convolution, or everything from the last convolution on (head conv,
  pooling), or both, kept in float.

Columns: images/s at batch --batch-size on N pre-decoded images (best of 3, the same
session options as stacker's engine) and the ratio to float; the cosine between int8 and
float pooled features (mean and worst image). ``--oof`` then extracts every training image
with each variant's candidate (the best cosine among recipes at >= 1.5x float, else the
best cosine; MobileNet stays float) and fits the
Dogs vs. Cats ensemble on those features with stacker's defaults, against the same
ensemble on float features: the out-of-fold log loss the shipping rule reads
(int8 ships only at >= 1.5x float throughput and log loss within 3% of float).
The last line is machine-readable.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(REPO, "..", "shared")
BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "mobilenet_025")


class Calibration:
    """ONNX Runtime's calibration reader over decoded images, in groups of ``group`` (ranged for strided collection)."""

    def __init__(self, name: str, pixels: np.ndarray, group: int = 4):
        self.items = [{name: pixels[i:i + group]} for i in range(0, len(pixels), group)]
        self.set_range(0, len(self.items))

    def __len__(self) -> int:
        return len(self.items)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.pending = iter(self.items[start_index:end_index])

    def get_next(self):
        return next(self.pending, None)

    def rewind(self) -> None:
        self.set_range(0, len(self.items))


def float_nodes(graph_path: str, ends: str) -> list[str]:
    """Nodes kept in float: ``stem`` up to the first Conv (input scaling, stem conv), ``head`` from the last Conv
    on (head conv, pooling), ``ends`` both."""
    import onnx

    nodes = onnx.load(graph_path).graph.node
    convs = [i for i, n in enumerate(nodes) if n.op_type == "Conv"]
    keep = [(ends in ("stem", "ends") and i <= convs[0]) or (ends in ("head", "ends") and i >= convs[-1])
            for i in range(len(nodes))]
    return [n.name for n, k in zip(nodes, keep) if k]


def quantize(pre: str, out: str, pixels, recipe: str, exclude=()) -> float:
    """Write the int8 graph of ``pre`` for one recipe; return the seconds it took."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    method = {"naive": CalibrationMethod.MinMax, "minmax": CalibrationMethod.MinMax,
              "percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy}[recipe]
    name = ort.InferenceSession(pre, providers=["CPUExecutionProvider"]).get_inputs()[0].name
    calib = Calibration(name, pixels[:64] if recipe == "naive" else pixels)
    t = time.perf_counter()
    quantize_static(pre, out, calib, quant_format=QuantFormat.QDQ, per_channel=recipe != "naive",
                    reduce_range=recipe != "naive", activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=method, nodes_to_exclude=list(exclude),
                    calibration_cache_path=f"{pre}.{recipe}-{len(calib)}.calib.json",
                    extra_options={"CalibStridedMinMax": 4, "CalibPercentile": 99.999})
    return time.perf_counter() - t


def measure(graph: bytes, pixels: np.ndarray, batch: int, reference=None, reps: int = 3) -> dict:
    """Best-of-``reps`` images/s of a graph on decoded pixels, and its features' cosine to ``reference``."""
    from stacker.features import engines

    forward = engines.session_forward(engines.open_session(graph))
    forward(pixels[:batch])
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        feats = np.concatenate([forward(pixels[i:i + batch]) for i in range(0, len(pixels), batch)])
        best = max(best, len(pixels) / (time.perf_counter() - t))
    out = {"img_s": best, "feats": feats}
    if reference is not None:
        cos = np.sum(feats * reference, 1) / (np.linalg.norm(feats, axis=1) * np.linalg.norm(reference, axis=1))
        out.update(cos_mean=float(cos.mean()), cos_min=float(cos.min()))
    return out


def explore(variant: str, train, args, workdir: str) -> list[dict]:
    """Every recipe for one variant: (name, graph path, img/s, ratio, cosine)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from stacker.features.extractor import FeatureExtractor
    from stacker.data.decode import pil_pixels

    ext = FeatureExtractor(variant, cache_dir=args.cache, weights_dir=args.weights_dir, verbose=0)
    f32 = os.path.join(workdir, f"{variant}.onnx")
    with open(f32, "wb") as f:
        f.write(ext.onnx_graph())
    pre = os.path.join(workdir, f"{variant}.pre.onnx")
    quant_pre_process(f32, pre, skip_symbolic_shape=True)  # sympy is not a dependency; ONNX shape inference runs
    evaluation = train.head(args.n, seed=0)
    rest = train.subset([i for i, p in enumerate(train.paths) if p not in set(evaluation.paths)])
    pix_eval = np.stack([pil_pixels(p, ext.size) for p in evaluation.paths])
    pix_cal = np.stack([pil_pixels(p, ext.size) for p in rest.head(args.calib, seed=1).paths])
    with open(f32, "rb") as f:
        base = measure(f.read(), pix_eval, args.batch_size)
    rows = [{"variant": variant, "recipe": "float", "img_s": base["img_s"], "ratio": 1.0, "cos_mean": 1.0,
             "cos_min": 1.0, "path": f32, "quant_s": 0.0}]
    for recipe in args.recipes.split(","):
        rows.append(_row(variant, recipe, pre, pix_cal, pix_eval, base, args, workdir))
    best = max((r for r in rows if r["recipe"] not in ("float", "naive")), key=lambda r: r["cos_mean"])
    for ends in ("stem", "head", "ends"):
        rows.append(_row(variant, best["recipe"], pre, pix_cal, pix_eval, base, args, workdir, ends))
    chosen = choose(rows)
    rows[0]["pipeline_img_s"] = pipeline(variant, f32, evaluation, args)
    chosen["pipeline_img_s"] = pipeline(variant, chosen["path"], evaluation, args)
    return rows


def choose(rows: list[dict]) -> dict:
    """The recipe of best fidelity among those at >= 1.5x float (else of best fidelity): what the rule would ship."""
    quantized = [r for r in rows if r["recipe"] != "float"]
    return max([r for r in quantized if r["ratio"] >= 1.5] or quantized, key=lambda r: r["cos_mean"])


def _row(variant, recipe, pre, pix_cal, pix_eval, base, args, workdir, ends=None) -> dict:
    exclude = float_nodes(pre, ends) if ends else ()
    label = recipe + (f"+float-{ends}" if ends else "")
    out = os.path.join(workdir, f"{variant}.{label}.onnx")
    seconds = quantize(pre, out, pix_cal, recipe, exclude)
    with open(out, "rb") as f:
        m = measure(f.read(), pix_eval, args.batch_size, base["feats"])
    print(f"  {variant} {label}: {m['img_s']:.1f} img/s, cosine {m['cos_mean']:.4f} (min {m['cos_min']:.4f}), "
          f"quantized in {seconds:.0f}s", flush=True)
    return {"variant": variant, "recipe": label, "img_s": m["img_s"], "ratio": m["img_s"] / base["img_s"],
            "cos_mean": m["cos_mean"], "cos_min": m["cos_min"], "path": out, "quant_s": seconds}


def pipeline(variant: str, graph_path: str, images, args, reps: int = 3) -> float:
    """Best-of-``reps`` img/s of stacker's extraction (decode, engine, cold cache) running ``graph_path``."""
    from stacker.features.engines import SavedNetwork
    from stacker.features.extractor import FeatureExtractor

    with open(graph_path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    ext = FeatureExtractor(variant, weights_dir=args.weights_dir, verbose=0,
                           saved=SavedNetwork(graph_path + ".unused.keras", graph_path, digest))
    ext.transform_arrays([np.zeros((8, 8, 3), np.uint8)])  # the session is open before the clock starts
    best = 0.0
    for _ in range(reps):
        ext.cache_dir = tempfile.mkdtemp(prefix="cold-", dir=os.path.dirname(graph_path))
        t = time.perf_counter()
        ext.transform(images)
        best = max(best, len(images) / (time.perf_counter() - t))
    return best


def oof(train, graphs: dict, args) -> dict:
    """Out-of-fold log loss of the default Dogs vs. Cats ensemble on float and on int8 features (same folds)."""
    from stacker import Ensemble
    from stacker.features.engines import SavedNetwork
    from stacker.features.extractor import FeatureExtractor

    result = {}
    tmp = tempfile.mkdtemp(prefix="stacker-int8-")
    try:
        for variant, path in graphs.items():  # int8 features, under the float key of a throwaway cache
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            t = time.perf_counter()
            FeatureExtractor(variant, cache_dir=tmp, weights_dir=args.weights_dir, verbose=0,
                             saved=SavedNetwork(path + ".unused.keras", path, digest)).extract(train)
            print(f"  int8 features of {variant}: {len(train) / (time.perf_counter() - t):.1f} img/s", flush=True)
        for label, cache in (("float", args.cache), ("int8", tmp)):
            ens = Ensemble(list(BACKBONES), cache_dir=cache, weights_dir=args.weights_dir, verbose=0).fit(train)
            result[label] = ens.scores_["ensemble"]["log_loss"]
            result[f"{label}_acc"] = ens.scores_["ensemble"]["accuracy"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.path.join(SHARED, "data", "dogs-vs-cats", "train"))
    p.add_argument("--variants", default="efficientnet_lite0")
    p.add_argument("--recipes", default="naive,minmax,percentile,entropy")
    p.add_argument("--calib", type=int, default=256, help="calibration images (naive: 64)")
    p.add_argument("--n", type=int, default=256, help="evaluation images (speed and cosine)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cache", default=os.path.join(REPO, "artifacts", "cache"))
    p.add_argument("--weights-dir", default=os.environ.get("STACKER_WEIGHTS_DIR", os.path.join(SHARED, "weights")))
    p.add_argument("--oof", action="store_true", help="ensemble out-of-fold log loss on int8 features (all images)")
    args = p.parse_args()
    from stacker.data.sources import load_images

    train = load_images(args.data)
    workdir = tempfile.mkdtemp(prefix="stacker-quant-")
    try:
        rows = [r for v in args.variants.split(",") for r in explore(v, train, args, workdir)]
        print(f"\n{'variant':20s} {'recipe':26s} {'img/s':>7s} {'vs float':>9s} {'cos mean':>9s} {'cos min':>8s} "
              f"{'pipeline img/s':>15s}")
        for r in rows:
            pipe = f"{r['pipeline_img_s']:15.1f}" if "pipeline_img_s" in r else ""
            print(f"{r['variant']:20s} {r['recipe']:26s} {r['img_s']:7.1f} {r['ratio']:9.2f} {r['cos_mean']:9.4f} "
                  f"{r['cos_min']:8.4f} {pipe}")
        chosen = {v: choose([r for r in rows if r["variant"] == v]) for v in args.variants.split(",")}
        floats = {r["variant"]: r for r in rows if r["recipe"] == "float"}
        speed = min(r["ratio"] for r in chosen.values())
        pipe = min(r["pipeline_img_s"] / floats[v]["pipeline_img_s"] for v, r in chosen.items())
        line = (f"int8 recipes={'/'.join(sorted({r['recipe'] for r in chosen.values()}))} min_speedup={speed:.2f} "
                f"min_pipeline_speedup={pipe:.2f} min_cos_mean={min(r['cos_mean'] for r in chosen.values()):.4f}")
        if args.oof:
            ll = oof(train, {v: r["path"] for v, r in chosen.items()}, args)
            change = ll["int8"] / ll["float"] - 1
            print(f"\nensemble out of fold: float log loss {ll['float']:.4f} (acc {ll['float_acc']:.4f}), "
                  f"int8 {ll['int8']:.4f} (acc {ll['int8_acc']:.4f}), {change:+.1%}")
            line += f" oof_ll_float={ll['float']:.4f} oof_ll_int8={ll['int8']:.4f} oof_change={change:.4f}"
            line += f" ship={min(speed, pipe) >= 1.5 and change <= 0.03}"
        print(line)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
