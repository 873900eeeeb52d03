#!/usr/bin/env python
"""Distillation on Dogs vs. Cats: a one-backbone student against the ensemble that taught it.

    python benchmarks/distill.py [--students efficientnet_lite0,mobilenet_025] [--cache DIR]

The seeded, stratified 80/20 split of benchmarks/stacking.py. The teacher is the Dogs vs.
Cats recipe's ensemble (four backbones, logistic + prototype on each, ``meta="auto"``)
fitted on the 80%. For each student backbone: the student fitted on the hard labels alone
(its logistic learner, calibrated; ``--finetune``: the backbone fine-tuned with stacker's
CPU defaults, soft targets reaching both phases' losses), then distilled (``stacker.distill``)
on the teacher's out-of-fold soft targets, and with dogs-vs-cats/test as unlabelled images
besides (``--no-pool``: not). Every
row is scored on the held-out 20% (log loss, accuracy). ``gap closed`` is the share of
the hard-label student's held-out log loss gap to the teacher that distillation closes.
Latency: warm ``stacker.predict`` of one image file, no feature cache (every backbone
runs), median of ``--reps``, for the teacher and each student, in this process.

The last line is machine-readable: ``distill teacher_ll=... <student>_hard_ll=...
<student>_distilled_ll=... <student>_gap_closed=... <student>_ms=... teacher_ms=...``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "..", "shared")
DVC = os.path.join(SHARED, "data", "dogs-vs-cats")
TEACHER = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "mobilenet_025")


def latency(model_dir: str, paths, reps: int) -> float:
    """Median ms of a warm stacker.predict of one image file (no feature cache: the backbones run)."""
    import stacker

    stacker.predict(paths[:1], model=model_dir)
    times = []
    for p in paths[1:reps + 1]:
        t = time.perf_counter()
        stacker.predict([p], model=model_dir)
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--students", default="efficientnet_lite0,mobilenet_025")
    p.add_argument("--cache", default=None, help="feature cache (default: stacker's)")
    p.add_argument("--weights-dir", default=os.environ.get("STACKER_WEIGHTS_DIR", os.path.join(SHARED, "weights")))
    p.add_argument("--hard-weight", type=float, default=0.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--models", default="logistic", help="the students' models (default: %(default)s)")
    p.add_argument("--finetune", action="store_true",
                   help="fine-tune each student's backbone (stacker's CPU fine-tuning defaults) instead of a head "
                        "on its frozen features")
    p.add_argument("--no-pool", action="store_true", help="skip the rows distilled with the test folder as a pool")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    from sklearn.model_selection import train_test_split

    import stacker
    from stacker.data.cachedir import default_cache_dir
    from stacker.data.sources import load_images
    from stacker.distill import distill
    from stacker.level2.arrays import score

    cache = args.cache or default_cache_dir()
    data = load_images(os.path.join(DVC, "train"))
    pool = os.path.join(DVC, "test")
    tr, te = train_test_split(np.arange(len(data)), test_size=0.2, stratify=data.y, random_state=args.seed)
    train, test = data.subset(np.sort(tr)), data.subset(np.sort(te))
    common = {"cache_dir": cache, "weights_dir": args.weights_dir, "random_state": args.seed, "verbose": 0}
    # a student of several learners gets a level 2 that mixes them ("best" would keep one)
    student_params = {"finetune": True} if args.finetune else {"meta": "best" if "," not in args.models else "auto"}
    rows, summary, models = [], {}, tuple(args.models.split(","))
    tmp = tempfile.mkdtemp(prefix="stacker-distill-")
    t0 = time.perf_counter()
    teacher = stacker.Ensemble(list(TEACHER), cv=5, **common).fit(train)
    teacher.save(os.path.join(tmp, "teacher"))
    held = score(test.y, teacher.predict_proba(test), 2)
    t_ms = latency(os.path.join(tmp, "teacher"), list(test.paths), args.reps)
    rows.append(("teacher", f"{len(TEACHER)} backbones, {len(teacher.learners_)} learners, {teacher.meta_.name}",
                 held, teacher.scores_["ensemble"]["log_loss"], t_ms, time.perf_counter() - t0))
    summary.update(teacher_ll=held["log_loss"], teacher_ms=t_ms)
    for backbone in args.students.split(","):
        out = {}
        runs = (("distilled", {}),) + (() if args.no_pool else (("distilled + test pool", {"unlabeled": pool}),))
        for name, kw in runs:
            t0 = time.perf_counter()
            student = distill(teacher, train, backbone, hard_weight=args.hard_weight, temperature=args.temperature,
                              models=models, **kw, **student_params, **common)
            secs = time.perf_counter() - t0
            d = student.scores_["ensemble"]["distilled"]
            if not out:  # the hard-label student is the distilled one's first fit: refit it to score it held out
                hard = stacker.Ensemble([backbone], models=models, cv=5, **{"meta": "best", **student_params},
                                        **common).fit(train)
                hard.save(os.path.join(tmp, f"{backbone}-hard"))
                h = score(test.y, hard.predict_proba(test), 2)
                ms = latency(os.path.join(tmp, f"{backbone}-hard"), list(test.paths), args.reps)
                what = "fine-tuned, TTA flip" if args.finetune else f"{'+'.join(models)}, calibrated"
                rows.append((f"{backbone} hard labels", what, h, d["hard_labels"]["log_loss"], ms, None))
                out["hard"] = h
            s = score(test.y, student.predict_proba(test), 2)
            rows.append((f"{backbone} {name}", f"hard_weight={args.hard_weight}, T={args.temperature}", s, d["distilled"]["log_loss"], ms,
                         secs))
            out[name] = s
        gap = out["hard"]["log_loss"] - held["log_loss"]
        closed = (out["hard"]["log_loss"] - out["distilled"]["log_loss"]) / gap if gap > 0 else float("nan")
        summary.update({f"{backbone}_hard_ll": out["hard"]["log_loss"],
                        f"{backbone}_distilled_ll": out["distilled"]["log_loss"],
                        **({} if args.no_pool else {f"{backbone}_pool_ll": out["distilled + test pool"]["log_loss"]}),
                        f"{backbone}_gap_closed": closed, f"{backbone}_ms": ms})
    print(f"\nDogs vs. Cats, seeded 80/20 split ({len(train)} training, {len(test)} held-out images); the teacher "
          f"and hard-label students are saved in {tmp} (e.g. for benchmarks/export.py --models)")
    print(f"{'model':<40} {'what':<38} {'held-out ll':>11} {'accuracy':>9} {'oof ll':>7} {'ms/image':>9} {'fit s':>6}")
    for name, what, s, oof, ms, secs in rows:
        print(f"{name:<40} {what:<38} {s['log_loss']:>11.4f} {s['accuracy']:>9.4f} {oof:>7.4f} {ms:>9.1f} "
              + (f"{secs:>6.0f}" if secs is not None else f"{'':>6}"))
    for backbone in args.students.split(","):
        print(f"{backbone}: distillation closes {summary[f'{backbone}_gap_closed']:.0%} of the held-out log loss gap "
              "to the teacher (goal: at least half)")
    print("distill " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
