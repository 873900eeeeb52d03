"""Scale: an out-of-core fit at 10k, 100k and 1M images (10 and 1,000 classes), and Ray against one process.

    python benchmarks/scale.py [--sizes 10000,100000,1000000] [--sizes-1000c 10000,100000]
                               [--dir /tmp/stacker-scale] [--lock FILE] [--extract-n 1000] [--skip-extract]
                               [--ray-n 2000] [--skip-ray] [--ray-only] [--node-cores 8] [--gpu-img-per-s R]

Part 1 synthesises, per N, the feature caches of two 1,280-wide backbones in float16 (no
forward pass; rows are class patterns plus noise), written chunk by chunk exactly where a
``FeatureExtractor`` would find them. Then a *fresh process* per N fits what
``Ensemble(models="default", out_of_core=True).fit`` fits after extraction: four learners
(two backbones x streaming logistic and prototype) over 5 shared folds, and level 2
(``meta="auto"`` with calibration). It prints fit seconds, the process's peak RSS
(``ru_maxrss``), the ensemble's out-of-fold accuracy and level 2's choice. One table has
10 classes (``--sizes``), one 1,000 (``--sizes-1000c``: each class its own pattern
strength, so some need many rows; four learners' float32 out-of-fold probabilities alone
are 1.6 GB at 100k).

Part 2 extracts MobileNet (alpha 0.25, the offline ImageNet weights) features of
``--extract-n`` Dogs vs. Cats photos into an empty cache, once in one process and once
with ``stacker.learners.distributed.fill_cache`` on a local Ray cluster of 2 workers, and checks
the features are equal.

Part 3 (``--ray-only`` runs just this part) measures Ray's scaling on ``--ray-n`` Dogs vs.
Cats photos (MobileNet 0.25, empty caches, every run's features checked equal):

- one process as it runs normally, and one process pinned to one core;
- ``fill_cache`` on a local Ray cluster with 1 and then 2 workers, each worker pinned to a
  core of its own (intra-op threads follow: one per session), the driver unpinned.

Throughputs exclude start-up: the Ray cluster's start, the actors' start (process,
imports, network build: ``ExtractReport.startup_s``) and, for one process, the network
build; file fingerprints are memoised before timing in every run. ``ray_2w_over_1w`` is
the scaling efficiency this machine can show (2 cores, the driver sharing them with the
2 workers), ``ray_over_process`` is 1 pinned Ray worker against 1 pinned process (Ray's
overhead at one core of computing each; the driver has the other core), and
``ray_2w_over_process`` is 2 workers against the normal process (the whole machine
each). From the measured per-image costs (decoding on one core, computing on one
worker, the driver's CPU per image) it prints a *projection*, not a measurement, of 1M
images on N GPU nodes.

The last line is machine-readable: rss_1m/rss_10k, time_1m/time_100k, rss_100k_1000c_gib,
time_100k_over_10k_1000c, ray speed-up, ray_2w_over_1w, ray_over_process.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

DIM, K, WIDE, CV, CHUNK = 1280, 10, 1000, 5, 16384
BACKBONES = ("synthetic_a", "synthetic_b")
DOGS = os.path.join(REPO, "..", "shared", "data", "dogs-vs-cats", "train")
WEIGHTS = os.path.join(REPO, "..", "shared", "weights")


LOCK = os.environ.get("SCALE_LOCK")  # a shared CPU lock file, taken per phase (waiting is not timed)


@contextlib.contextmanager
def cpu_phase():
    """Hold the machine's shared CPU lock (``--lock``) for one phase of work."""
    if not LOCK:
        yield
        return
    with open(LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def register(folder: str) -> list[dict]:
    """Two registered 1,280-wide backbones whose weights are a small file (the key needs no network)."""
    from stacker.backbones import BackboneCfg, register_backbone

    weights = os.path.join(folder, "synthetic.weights")
    if not os.path.exists(weights):
        os.makedirs(folder, exist_ok=True)
        with open(weights, "wb") as f:
            f.write(b"synthetic backbone for benchmarks/scale.py")
    specs = []
    for name in BACKBONES:
        register_backbone(BackboneCfg(name, "keras.applications:MobileNet", 224, "tf", DIM), overwrite=True)
        specs.append({"backbone": name, "weights": weights})
    return specs


def labels(n: int, k: int = K) -> np.ndarray:
    """Labels of N rows; past 10 classes every class has N / k rows (5 folds need 5 of each)."""
    if k == K:
        return np.random.default_rng(n).integers(0, K, n)
    return np.random.default_rng((n, k)).permutation(np.arange(n) % k)


def cache_dir(folder: str, n: int, k: int) -> str:
    return os.path.join(folder, f"n{n}" if k == K else f"n{n}_k{k}")


def patterns(b: int, k: int) -> np.ndarray:
    """Class patterns of backbone ``b`` (noise is N(0, 1) per feature).

    Ten classes: one strength, 0.06. A thousand: each class its own, uniform in [0.1, 0.25], so
    some are easy and some need many rows (a nearest prototype is right 35% of the time at 10k
    rows, 82% at 100k).
    """
    rng = np.random.default_rng(100 + b)
    if k == K:
        return rng.normal(size=(K, DIM)) * 0.06
    return rng.normal(size=(k, DIM)) * rng.uniform(0.1, 0.25, (k, 1))


def synthesise(n: int, folder: str, k: int = K) -> None:
    """Float16 caches of N rows per backbone, appended in chunks (never a whole matrix in memory)."""
    from stacker.features.cache import FeatureCache
    from stacker.features.extractor import FeatureExtractor

    y = labels(n, k)
    for b, spec in enumerate(register(folder)):
        ext = FeatureExtractor(spec["backbone"], weights=spec["weights"], feature_dtype="float16",
                               cache_dir=cache_dir(folder, n, k), engine="keras")
        entry = FeatureCache(ext.cache_dir).entry(ext.key_meta(), DIM, "float16")
        if entry.n_complete() >= n:
            continue
        means = patterns(b, k)
        with cpu_phase():
            for s in range(entry.n_complete(), n, CHUNK):
                rows = np.arange(s, min(s + CHUNK, n))
                X = means[y[rows]] + np.random.default_rng((b, s)).normal(size=(len(rows), DIM))
                entry.append([f"{b}{i:039d}" for i in rows], X.astype(np.float16), [str(i) for i in rows],
                             [str(v) for v in y[rows]], [f"img{i}.jpg" for i in rows])


def fit(n: int, folder: str, k: int = K) -> dict:
    """What Ensemble.fit does after extraction, out of core, on the synthetic caches; seconds and peak RSS."""
    from sklearn.model_selection import StratifiedKFold

    from stacker.features.cache import FeatureCache
    from stacker.ensemble import Ensemble
    from stacker import validation
    from stacker.features.rows import CachedRows
    from stacker.learners.kinds import make_learners

    from stacker.learners.memory import return_freed_blocks

    specs = register(folder)
    y = labels(n, k)
    return_freed_blocks()  # as Ensemble.fit does once extraction is over
    t0 = time.perf_counter()
    ens = Ensemble(specs, models="default", feature_dtype="float16", cv=CV, out_of_core=True, engine="keras",
                   cache_dir=cache_dir(folder, n, k), verbose=0)
    ens.classes_ = [str(c) for c in range(k)]
    settings = ens.learner_settings().replace(out_of_core=True, cache_dir=None)  # no learner results stored
    ens.learners_ = make_learners(validation.validate(ens), settings)
    inputs = {}
    for sid, ext in ens._sources().items():
        entry = FeatureCache(ens.cache_dir).entry(ext.key_meta(), DIM, "float16")
        inputs[sid] = CachedRows(entry.path, np.arange(n), DIM, "float16")
    ens.folds_ = list(StratifiedKFold(CV, shuffle=True, random_state=0).split(np.zeros(n), y))
    ens.sample_weight_ = None  # unweighted, as Ensemble.fit sets it
    timings, phases = {}, {"setup": time.perf_counter() - t0}
    for name, learner in ens.learners_.items():
        with cpu_phase():
            t1 = time.perf_counter()
            learner.fit_oof(ens._inputs_of(learner, inputs), y, ens.folds_, k, None, f"synthetic-{n}-{k}")
            phases[name] = time.perf_counter() - t1
    ens.oof_proba_ = {name: lr.oof_proba_ for name, lr in ens.learners_.items()}
    with cpu_phase():
        t1 = time.perf_counter()
        ens._fit_level2(inputs, y, k, timings)
        phases["level2"] = time.perf_counter() - t1
    seconds = sum(phases.values())  # time spent working (not waiting for the CPU lock)
    acc = float((ens.meta_oof_proba_.argmax(1) == y).mean())
    best_member = max(float((p.argmax(1) == y).mean()) for p in ens.oof_proba_.values())
    return {"n": n, "k": k, "fit_s": seconds, "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "accuracy": acc, "best_member_accuracy": best_member, "combiner": ens.meta_.name, "phases": phases}


def child(args, *extra) -> dict:
    out = subprocess.run([sys.executable, __file__, *extra, "--dir", args.dir], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def extraction(n: int, folder: str) -> dict:
    """One process vs. a 2-worker local Ray cluster, MobileNet 0.25 on Dogs vs. Cats photos (empty caches)."""
    from stacker.learners import distributed
    from stacker.features.extractor import FeatureExtractor
    from stacker.data.sources import load_images

    data = load_images(DOGS).subset(range(n))
    out = {"n": n}
    values = {}
    for mode in ("one process", "ray x2"):
        cache = os.path.join(folder, "extract", mode.replace(" ", "_"))
        shutil.rmtree(cache, ignore_errors=True)
        ext = FeatureExtractor("mobilenet_025", weights_dir=WEIGHTS, cache_dir=cache, verbose=0)
        t0 = time.perf_counter()
        if mode == "ray x2":
            distributed.connect(num_cpus=2)
            t_ray = time.perf_counter()
            distributed.fill_cache(ext, data, workers=2)
            out["ray_start_s"] = t_ray - t0
        values[mode] = ext.extract(data).values
        out[mode] = time.perf_counter() - t0
    out["identical"] = bool(np.array_equal(values["one process"], values["ray x2"]))
    return out


# -- part 3: Ray's scaling --------------------------------------------------------------------------------------
PIN_ENV = "SCALE_PIN_CORES"  # set for the Ray workers: a folder of per-core lock files
_HELD: list = []  # this worker's core lock, held while the process lives


def pin_to_a_free_core(folder: str) -> int:
    """Pin this process to the first core no other benchmark worker holds (its lock is held until exit)."""
    import fcntl as _fcntl

    for core in sorted(os.sched_getaffinity(0)):
        f = open(os.path.join(folder, f"core{core}.lock"), "a")
        try:
            _fcntl.flock(f, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
        except OSError:
            f.close()
            continue
        _HELD.append(f)
        os.sched_setaffinity(0, {core})
        return core
    raise RuntimeError("more benchmark workers than cores")


if __name__ != "__main__" and os.environ.get(PIN_ENV):  # imported by a Ray worker as a stacker plugin
    pin_to_a_free_core(os.environ[PIN_ENV])


def _scaling_inputs(n: int, folder: str, name: str):
    """``(images, extractor)`` on an empty cache ``folder/ray_scaling/name`` whose fingerprint memo is filled."""
    from stacker.data import fingerprint
    from stacker.data.sources import load_images
    from stacker.features.extractor import FeatureExtractor

    data = load_images(DOGS).subset(range(n))
    cache = os.path.join(folder, "ray_scaling", name)
    shutil.rmtree(cache, ignore_errors=True)
    t0 = time.perf_counter()
    fingerprint.fingerprints(data.paths, cache)  # hashing the files is not what is compared (but is projected)
    seconds = time.perf_counter() - t0
    return data, FeatureExtractor("mobilenet_025", weights_dir=WEIGHTS, cache_dir=cache, verbose=0), seconds


def scaling_process(n: int, folder: str, pinned: bool) -> dict:
    """One process (pinned to one core, or as it runs normally): images per second once its network is built."""
    if pinned:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    name = "process_1core" if pinned else "process"
    data, ext, _ = _scaling_inputs(n, folder, name)
    ext._network()
    t0 = time.perf_counter()
    values = ext.extract(data).values
    seconds = time.perf_counter() - t0
    np.save(os.path.join(folder, "ray_scaling", f"{name}.npy"), values)
    out = {"n": n, "seconds": seconds, "img_per_s": n / seconds, "engine": ext.engine}
    if pinned:  # decoding alone on this core: the part of an image's cost a GPU does not take
        from stacker.data import decode

        t0 = time.perf_counter()
        for _ in decode.pil_batches(data.paths, ext.size, ext.batch_size):
            pass
        out["decode_s_per_image"] = (time.perf_counter() - t0) / n
    return out


def scaling_ray(n: int, folder: str) -> dict:
    """fill_cache with 1, then 2 workers pinned to a core each, on a local Ray cluster (its start timed apart)."""
    from stacker.learners import distributed

    locks = os.path.join(folder, "ray_scaling", "cores")
    os.makedirs(locks, exist_ok=True)
    os.environ["STACKER_CACHE_DIR"] = os.path.join(folder, "ray_scaling", "worker_cache")  # the workers' own
    env = distributed.worker_env([os.path.dirname(os.path.abspath(__file__))])
    env["env_vars"].update(STACKER_PLUGINS="scale", **{PIN_ENV: locks})
    t0 = time.perf_counter()
    distributed.connect(num_cpus=2, runtime_env=env)
    out = {"n": n, "ray_start_s": time.perf_counter() - t0}
    for w in (1, 2):
        data, ext, hashing = _scaling_inputs(n, folder, f"ray_{w}w")
        marks = []  # (driver CPU seconds, images) at each chunk: the driver's cost per image once chunks flow
        report = distributed.fill_cache(ext, data, workers=w,
                                        on_chunk=lambda j, rows, pid: marks.append((time.process_time(), rows)))
        driver_cpu = (marks[-1][0] - marks[0][0]) / max(1, sum(rows for _, rows in marks[1:]))
        values = ext.extract(data).values
        np.save(os.path.join(folder, "ray_scaling", f"ray_{w}w.npy"), values)
        busy = report.seconds - report.startup_s
        out[f"{w}w"] = {"seconds": report.seconds, "startup_s": report.startup_s, "img_per_s": report.computed / busy,
                        "driver_cpu_s_per_image": driver_cpu, "fingerprint_s_per_image": hashing / n,
                        "workers": report.workers,
                        "computed": report.computed}
    return out


def projection(r: dict, node_cores: int, gpu_rate) -> list[str]:
    """1M images on N GPU nodes from the measured per-image costs: lines of text, labelled as a projection."""
    c_worker = 1 / r["ray"]["1w"]["img_per_s"]  # one image on one Ray worker's core: decode, forward, transfer
    c_process = 1 / r["process_1core"]["img_per_s"]  # one image in one pinned process
    c_decode = r["process_1core"]["decode_s_per_image"]
    c_forward = max(c_process - c_decode, 0.0)  # the network's share (what a GPU takes over)
    c_cpu = max(c_worker - c_forward, c_decode)  # what stays on a node's CPU per image: decode and Ray's work
    # the driver's own work per image, one driver for all nodes: hashing the file, then receiving and appending
    c_hash = r["ray"]["1w"]["fingerprint_s_per_image"]  # the 2w run's files are in this process's memo
    c_driver = c_hash + r["ray"]["2w"]["driver_cpu_s_per_image"]
    startup = r["ray"]["ray_start_s"] + r["ray"]["2w"]["startup_s"]
    node = node_cores / c_cpu if gpu_rate is None else min(node_cores / c_cpu, gpu_rate)
    lines = [
        "\nPROJECTION (not a measurement): 1M images on N GPU nodes, from per-image costs measured here",
        f"  measured: decode {c_decode * 1e3:.2f} ms/img/core, forward on a CPU core {c_forward * 1e3:.2f} ms, "
        f"Ray worker total {c_worker * 1e3:.2f} ms/img/core, driver {c_driver * 1e3:.2f} ms/img "
        f"(of which hashing local files {c_hash * 1e3:.2f} ms; object storage gives ETags instead), "
        f"start-up {startup:.0f} s",
        f"  assumed: one GPU actor per node, its decoding spread over {node_cores} cores "
        f"({node_cores / c_cpu:.0f} img/s); "
        + ("the GPU outpaces that decoding (MobileNet-class networks)" if gpu_rate is None
           else f"the GPU computes {gpu_rate:.0f} img/s"),
        f"  {'N nodes':>8}  {'img/s':>8}  {'minutes':>7}  bound by",
    ]
    for nodes in (1, 2, 4, 8, 16, 32):
        rate = min(nodes * node, 1 / c_driver)
        bound = "the driver (cache appends, fingerprints)" if rate < nodes * node else (
            "node CPUs (decode)" if gpu_rate is None or node_cores / c_cpu < gpu_rate else "GPUs")
        lines.append(f"  {nodes:>8}  {rate:>8.0f}  {(1e6 / rate + startup) / 60:>7.1f}  {bound}")
    return lines


def ray_scaling(args) -> dict:
    """Part 3: print the runs and the projection; the summary's Ray figures."""
    r = {"process": child(args, "--ray-child", f"process:{args.ray_n}"),
         "process_1core": child(args, "--ray-child", f"process1:{args.ray_n}"),
         "ray": child(args, "--ray-child", f"ray:{args.ray_n}")}
    folder = os.path.join(args.dir, "ray_scaling")
    ref = np.load(os.path.join(folder, "process.npy"))
    identical = all(np.array_equal(ref, np.load(os.path.join(folder, f"{name}.npy")))
                    for name in ("process_1core", "ray_1w", "ray_2w"))
    one, two = r["ray"]["1w"], r["ray"]["2w"]
    print(f"\nRay scaling: {args.ray_n} photos, mobilenet_025 ({r['process']['engine']}), empty caches; "
          "images/s after start-up (start-up seconds)")
    print(f"  one process                 {r['process']['img_per_s']:7.1f}")
    print(f"  one process, 1 core         {r['process_1core']['img_per_s']:7.1f}")
    print(f"  ray, 1 worker (1 core)      {one['img_per_s']:7.1f}   (cluster {r['ray']['ray_start_s']:.1f} s, "
          f"actors {one['startup_s']:.1f} s; {args.ray_n / one['seconds']:.1f} img/s with them)")
    print(f"  ray, 2 workers (1 core each){two['img_per_s']:7.1f}   (actors {two['startup_s']:.1f} s; "
          f"{args.ray_n / two['seconds']:.1f} img/s with them)")
    print(f"  identical features: {identical}")
    for line in projection(r, args.node_cores, args.gpu_img_per_s):
        print(line)
    return {"ray_2w_over_1w": round(two["img_per_s"] / one["img_per_s"], 2),
            "ray_over_process": round(one["img_per_s"] / r["process_1core"]["img_per_s"], 2),
            "ray_2w_over_process": round(two["img_per_s"] / r["process"]["img_per_s"], 2),
            "ray_scaling_identical": identical}


FINETUNE = {"blocks": 2, "epochs": 1, "head_epochs": 3, "cut_dtype": "float16"}


def finetune(n: int, folder: str, out_of_core) -> dict:
    """Peak RSS of fine-tuning EfficientNet-Lite0 on n Dogs vs. Cats photos (cut-point cache already filled)."""
    from stacker.ensemble import Ensemble
    from stacker.data.sources import load_images

    data = load_images(DOGS)
    data = data.subset(np.r_[np.arange(n // 2), np.arange(len(data) - n // 2, len(data))])  # cats, then dogs
    ens = Ensemble([{"backbone": "efficientnet_lite0", "finetune": dict(FINETUNE)}], cv=2, meta="mean",
                   calibration=False, cache_dir=os.path.join(folder, "finetune_cache"),
                   out_of_core=out_of_core is True,
                   verbose=0)
    t0 = time.perf_counter()
    if out_of_core == "warm":  # only the forward passes: every view's cut-point activations into the cache
        from stacker import validation
        from stacker.learners.kinds import make_learners

        ens.learners_ = make_learners(validation.validate(ens), ens.learner_settings())
        for ext in ens._sources().values():
            ext.extract(data)
        return {"n": n, "extract_s": time.perf_counter() - t0}
    ens.fit(data)
    return {"n": n, "out_of_core": ens.out_of_core_, "fit_s": time.perf_counter() - t0,
            "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "log_loss": ens.scores_["ensemble"]["log_loss"]}


def finetune_rows(args) -> dict:
    """Per N: a warm-up process fills the cut-point cache, then in-memory and out-of-core fits, each fresh."""
    out = {}
    print("\nfine-tuning efficientnet_lite0 (2 blocks, 1 epoch, 2 folds, views original+flip) on Dogs vs. Cats")
    print(f"{'N':>6}  {'in-memory MiB':>13}  {'out-of-core MiB':>15}  {'fit s (mem/ooc)':>15}")
    for n in (int(v) for v in args.finetune.split(",")):
        child(args, "--finetune-child", f"{n}:warm")
        mem = child(args, "--finetune-child", f"{n}:False")
        ooc = child(args, "--finetune-child", f"{n}:True")
        out[n] = (mem, ooc)
        print(f"{n:>6}  {mem['rss_mib']:>13.0f}  {ooc['rss_mib']:>15.0f}  {mem['fit_s']:>7.0f}/{ooc['fit_s']:<7.0f}",
              flush=True)
    return out


def size_and_classes(text: str) -> tuple[int, int]:
    """``"N"`` or ``"N:k"`` (a child's argument) as ``(N, k)``."""
    n, _, k = text.partition(":")
    return int(n), int(k or K)


def fit_table(args, sizes: str, k: int) -> dict:
    """Synthesise and fit each size in fresh processes; print one row per N; N -> the child's figures."""
    rows = {}
    sizes = [int(s) for s in sizes.split(",") if s]
    if not sizes:
        return rows
    print(f"\n{k} classes")
    print(f"{'N':>9}  {'fit s':>8}  {'peak RSS MiB':>12}  {'oof acc':>7}  {'best 1':>6}  level 2  (phase seconds)")
    for n in sizes:
        child(args, "--synth", f"{n}:{k}")
        r = rows[n] = child(args, "--fit", f"{n}:{k}")
        phases = ", ".join(f"{name.split(':')[-1]}{'' if ':' not in name else '@' + name.split(':')[0][-1]} {v:.0f}"
                           for name, v in r["phases"].items())
        print(f"{n:>9}  {r['fit_s']:>8.1f}  {r['rss_mib']:>12.0f}  {r['accuracy']:>7.3f}  "
              f"{r['best_member_accuracy']:>6.3f}  {r['combiner']}  ({phases})",
              flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--sizes-1000c", default="10000,100000", metavar="N1,N2",
                   help="sizes of the 1,000-class table (empty: none)")
    p.add_argument("--dir", default="/tmp/stacker-scale")
    p.add_argument("--extract-n", type=int, default=1000)
    p.add_argument("--skip-extract", action="store_true")
    p.add_argument("--finetune", default="", metavar="N1,N2",
                   help="also measure fine-tuning peak RSS on N Dogs vs. Cats photos, in memory and out of core")
    p.add_argument("--finetune-child", help=argparse.SUPPRESS)
    p.add_argument("--ray-n", type=int, default=2000, help="photos of the Ray scaling part (default: 2000)")
    p.add_argument("--skip-ray", action="store_true", help="leave out the Ray scaling part")
    p.add_argument("--ray-only", action="store_true", help="run only the Ray scaling part")
    p.add_argument("--node-cores", type=int, default=8, help="CPU cores per GPU node in the projection (default: 8)")
    p.add_argument("--gpu-img-per-s", type=float, default=None,
                   help="a GPU's forward rate in the projection (default: faster than the node's decoding)")
    p.add_argument("--ray-child", help=argparse.SUPPRESS)  # process:N, process1:N or ray:N
    p.add_argument("--lock", default=None, help="a shared CPU lock file (flock), held per phase; waits not timed")
    p.add_argument("--synth", help=argparse.SUPPRESS)  # N or N:k
    p.add_argument("--fit", help=argparse.SUPPRESS)
    p.add_argument("--extract", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.lock:
        os.environ["SCALE_LOCK"] = args.lock
        global LOCK
        LOCK = args.lock
    if args.synth:
        n, k = size_and_classes(args.synth)
        synthesise(n, args.dir, k)
        print(json.dumps({"n": n, "k": k}))
        return
    if args.fit:
        n, k = size_and_classes(args.fit)
        print(json.dumps(fit(n, args.dir, k)))
        return
    if args.finetune_child:
        n, mode = args.finetune_child.split(":")
        with cpu_phase():
            print(json.dumps(finetune(int(n), args.dir, {"True": True, "False": False}.get(mode, mode))))
        return
    if args.extract:
        with cpu_phase():
            print(json.dumps(extraction(args.extract, args.dir)))
        return
    if args.ray_child:
        mode, n = args.ray_child.split(":")
        with cpu_phase():
            n = int(n)
            out = scaling_ray(n, args.dir) if mode == "ray" else scaling_process(n, args.dir, mode == "process1")
        print(json.dumps(out))
        return
    if args.ray_only:
        print(" ".join(f"{k}={v}" for k, v in ray_scaling(args).items()))
        return
    rows = fit_table(args, args.sizes, K)
    summary = {}
    if 10_000 in rows and 1_000_000 in rows:
        summary["rss_1m/rss_10k"] = round(rows[1_000_000]["rss_mib"] / rows[10_000]["rss_mib"], 2)
        summary["rss_1m_gib"] = round(rows[1_000_000]["rss_mib"] / 1024, 2)
    if 100_000 in rows and 1_000_000 in rows:
        summary["time_1m/time_100k"] = round(rows[1_000_000]["fit_s"] / rows[100_000]["fit_s"], 2)
    if 10_000 in rows and 100_000 in rows:
        summary["rss_100k/rss_10k"] = round(rows[100_000]["rss_mib"] / rows[10_000]["rss_mib"], 2)
        summary["time_100k/time_10k"] = round(rows[100_000]["fit_s"] / rows[10_000]["fit_s"], 2)
    wide = fit_table(args, args.sizes_1000c, WIDE)
    if 100_000 in wide:
        summary["rss_100k_1000c_gib"] = round(wide[100_000]["rss_mib"] / 1024, 2)
        summary["acc_100k_1000c"] = round(wide[100_000]["accuracy"], 3)
    if 10_000 in wide and 100_000 in wide:
        summary["time_100k_over_10k_1000c"] = round(wide[100_000]["fit_s"] / wide[10_000]["fit_s"], 2)
    if not args.skip_extract:
        e = child(args, "--extract", str(args.extract_n))
        print(f"\nextraction of {e['n']} photos, mobilenet_025, empty cache (seconds, incl. start-up)")
        print(f"  one process {e['one process']:.1f}   ray x2 {e['ray x2']:.1f} (cluster start {e['ray_start_s']:.1f})"
              f"   speed-up {e['one process'] / e['ray x2']:.2f}   identical features: {e['identical']}")
        summary["ray_speedup"] = round(e["one process"] / e["ray x2"], 2)
        summary["ray_speedup_after_start"] = round(e["one process"] / (e["ray x2"] - e["ray_start_s"]), 2)
        summary["ray_identical"] = e["identical"]
    if not args.skip_ray:
        summary.update(ray_scaling(args))
    if args.finetune:
        ft = finetune_rows(args)
        small, large = min(ft), max(ft)
        for i, mode in enumerate(("mem", "ooc")):
            summary[f"finetune_rss_{mode}_{large}/{small}"] = round(ft[large][i]["rss_mib"] / ft[small][i]["rss_mib"], 2)
    print(" ".join(f"{k}={v}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
