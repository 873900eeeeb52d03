#!/usr/bin/env python
"""stacker doctor on real photos: injected label noise, planted duplicates and leaks, cleaning.

    python benchmarks/doctor.py                      # features cached under /tmp/doctor_cache
    python benchmarks/doctor.py --datasets dvc --cache DIR

- Label noise: the labels of 2% of the images (seeded) are flipped (Dogs vs. Cats) or moved
  to a random other class (Caltech-101); an ensemble is fitted on the noisy labels and the
  images are ranked by cleanlab's self-confidence of their given label (out of fold).
  precision@2%: the share of flipped images among the top 2%; recall@4%: the share of flipped
  images in the top 4%. Also the same for the rows cleanlab's ``find_label_issues`` flags.
- Duplicates: --planted real photos (half Dogs vs. Cats, half Caltech) each get four copies:
  resized to half, re-encoded as JPEG quality 50, flipped left-right, cropped 6% per side.
  For the first half the copies join the originals (duplicates), for the other half they form
  a test folder (leaks). Found: planted pairs the doctor reports at the default threshold.
  False pairs: pairs reported among 1,000 distinct Dogs vs. Cats photos (and, for
  information, among 1,000 Caltech photos). The similarity of every planted and distinct
  pair is summarised, which is how the default threshold was chosen.
- Cleaning: the seeded, stratified 80/20 split of benchmarks/stacking.py; fit on the 80%,
  score the 20%; refit without the label issues the doctor finds on the 80% and score again.
- Pseudo-labels: the same split; fit on the 80% with Kaggle's unlabelled test folder as the
  pool (``fit(..., unlabeled=)``) and score the 20%, against the plain fit; fit seconds of
  both (features cached; the pool's extraction apart).

Backbones default to small sets (the cache is filled on the first run, minutes of CPU; a
rerun computes only the planted copies). The last line is machine-readable.
"""

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings

import numpy as np
from PIL import Image, ImageOps

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "..", "shared")
DVC = os.path.join(SHARED, "data", "dogs-vs-cats", "train")
DVC_TEST = os.path.join(SHARED, "data", "dogs-vs-cats", "test")
CALTECH = os.path.join(SHARED, "data", "caltech101")
TRANSFORMS = ("resized", "jpeg50", "flipped", "cropped")


def fit(data, backbones, args):
    import stacker

    return stacker.Ensemble(backbones, cache_dir=args.cache, weights_dir=args.weights_dir, cv=5,
                            random_state=args.seed, verbose=0).fit(data)


def with_noise(data, fraction, seed):
    """A copy of ``data`` with ``fraction`` of its labels moved to a random other class; the rows moved."""
    from stacker.data.sources import ImageSet

    rng = np.random.default_rng(seed)
    rows = rng.choice(len(data), int(round(fraction * len(data))), replace=False)
    labels = list(data.labels)
    for r in rows:
        others = [c for c in data.classes if c != labels[r]]
        labels[r] = others[rng.integers(len(others))]
    return ImageSet(data.paths, data.ids, labels, data.classes), set(int(r) for r in rows)


def label_noise(key, root, backbones, args, summary):
    from stacker.data.sources import load_images
    from stacker.doctor import diagnose, label_quality

    data = load_images(root)
    noisy, flipped = with_noise(data, 0.02, args.seed)
    t0 = time.perf_counter()
    ens = fit(noisy, backbones, args)
    fit_s = time.perf_counter() - t0
    assert ens.train_paths_ == noisy.paths, "images were skipped"
    order = np.argsort(label_quality(ens.y_, ens.meta_oof_proba_), kind="stable")
    n = len(flipped)
    precision = len(set(order[:n].tolist()) & flipped) / n
    recall = len(set(order[:2 * n].tolist()) & flipped) / n
    t0 = time.perf_counter()
    issues = diagnose(ens, kinds=("label_issue",)).paths()
    doctor_s = time.perf_counter() - t0
    row = {p: r for r, p in enumerate(noisy.paths)}
    hit = len({row[p] for p in issues} & flipped)
    print(f"{key}: {len(data)} images, {len(data.classes)} classes, {n} labels changed; {', '.join(backbones)}; "
          f"ensemble out-of-fold accuracy {ens.scores_['ensemble']['accuracy']:.4f} on the noisy labels "
          f"(fit {fit_s:.0f} s, label diagnosis {doctor_s:.1f} s)")
    print(f"  ranked: precision@2% {precision:.3f}, recall@4% {recall:.3f}")
    print(f"  cleanlab find_label_issues: {len(issues)} flagged, {hit} of them changed "
          f"(precision {hit / max(len(issues), 1):.3f}, recall {hit / n:.3f})")
    summary.update({f"{key}_precision_at_2pct": precision, f"{key}_recall_at_4pct": recall,
                    f"{key}_flagged": len(issues), f"{key}_flagged_precision": hit / max(len(issues), 1),
                    f"{key}_flagged_recall": hit / n})


def _copies(src, out_dir, stem):
    """The four planted copies of one photo."""
    img = Image.open(src).convert("RGB")
    w, h = img.size
    made = {}
    for name in TRANSFORMS:
        path = os.path.join(out_dir, f"{stem}_{name}.jpg" if name == "jpeg50" else f"{stem}_{name}.png")
        if name == "resized":
            img.resize((max(1, w // 2), max(1, h // 2)), Image.BICUBIC).save(path)
        elif name == "jpeg50":
            img.save(path, quality=50)
        elif name == "flipped":
            ImageOps.mirror(img).save(path)
        else:
            dx, dy = int(0.06 * w), int(0.06 * h)
            img.crop((dx, dy, w - dx, h - dy)).save(path)
        made[name] = path
    return made


def duplicates(ens, args, summary):
    """Planted copies found, false pairs among distinct photos, and the similarities behind the threshold."""
    from stacker.data.sources import load_images

    rng = np.random.default_rng(args.seed)
    dvc, caltech = load_images(DVC), load_images(CALTECH)
    half = args.planted // 2
    originals = ([dvc.paths[i] for i in rng.choice(len(dvc), half, replace=False)]
                 + [caltech.paths[i] for i in rng.choice(len(caltech), args.planted - half, replace=False)])
    tmp = tempfile.mkdtemp(prefix="doctor-planted-")
    try:
        _planted(ens, originals, [_copies(p, tmp, f"p{i}") for i, p in enumerate(originals)], half, args, summary)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _distinct(ens, (("dvc", dvc), ("caltech", caltech)), rng, args, summary)


def _planted(ens, originals, copies, half, args, summary):
    from stacker.data.sources import ImageSet, file_fingerprints
    from stacker.doctor import DUPLICATE_THRESHOLD, duplicate_findings, leak_findings, pooled_features, unit_rows

    cut = len(originals) // 2
    train = originals + [c[t] for c in copies[:cut] for t in TRANSFORMS]
    test = [c[t] for c in copies[cut:] for t in TRANSFORMS]
    parts = pooled_features(ens, ImageSet(train, train))
    means = [P.mean(axis=0) for P in parts]  # as diagnose: the training set's mean, for the test images too
    X, T = unit_rows(parts, means), unit_rows(pooled_features(ens, ImageSet(test, test)), means)
    fps, tfps = file_fingerprints(train, args.cache), file_fingerprints(test, args.cache)
    labels = [""] * len(train)
    found = duplicate_findings(X, fps, train, train, labels, DUPLICATE_THRESHOLD)
    found += leak_findings(X, T, fps, tfps, train, train, labels, test, DUPLICATE_THRESHOLD)
    reported = {(f.group, f.path) if f.kind != "leak" else (f.path, f.group) for f in found}
    planted = [(o, c[t], t) for o, c in zip(originals, copies) for t in TRANSFORMS]
    hits = [(o, c) in reported for o, c, _ in planted]
    where = {p: r for r, p in enumerate(train)}
    twhere = {p: r for r, p in enumerate(test)}
    sims = {t: [] for t in TRANSFORMS}
    for o, c, t in planted:
        sims[t].append(float(X[where[o]] @ (X[where[c]] if c in where else T[twhere[c]])))
    print(f"\nduplicates: {len(originals)} photos ({half} Dogs vs. Cats, {len(originals) - half} Caltech), "
          f"{len(planted)} planted copies ({len(test)} in a test folder); threshold {DUPLICATE_THRESHOLD}")
    print(f"  found {sum(hits)} / {len(planted)} planted pairs; "
          + ", ".join(f"{t} min {min(v):.3f}" for t, v in sims.items()))
    missed = [f"{os.path.basename(o)}~{t}" for (o, _, t), h in zip(planted, hits) if not h]
    if missed:
        print("  missed: " + ", ".join(missed[:20]))
    summary.update({"planted_found": sum(hits), "planted": len(planted),
                    **{f"min_sim_{t}": min(v) for t, v in sims.items()}})


def _distinct(ens, sets, rng, args, summary):
    """Pairs reported among 1,000 photos of each set (Dogs vs. Cats: distinct; Caltech holds real near copies)."""
    from stacker.data.sources import ImageSet, file_fingerprints
    from stacker.doctor import DUPLICATE_THRESHOLD, duplicate_findings, pooled_features, unit_rows

    for key, data in sets:
        pick = sorted(rng.choice(len(data), 1000, replace=False))
        paths = [data.paths[i] for i in pick]
        parts = pooled_features(ens, ImageSet(paths, paths))
        D = unit_rows(parts, [P.mean(axis=0) for P in parts])
        S = D @ D.T
        top = np.sort(S[np.triu_indices(len(S), 1)])[::-1]
        pairs = duplicate_findings(D, file_fingerprints(paths, args.cache), paths, paths, [""] * len(paths),
                                   DUPLICATE_THRESHOLD)
        print(f"  {key}: 1,000 photos: {len(pairs)} pairs reported; highest similarities "
              + ", ".join(f"{v:.3f}" for v in top[:5]))
        for f in pairs[:10]:
            print(f"    {f.group} ~ {f.path} ({f.score:.3f})")
        summary[f"{key}_false_pairs"] = len(pairs)
        summary[f"{key}_max_distinct_sim"] = float(top[0])


def cleaning(backbones, args, summary):
    """Held-out log loss of the 80% fit, and of a refit without the label issues found on the 80%."""
    from sklearn.model_selection import train_test_split

    from stacker.data.sources import load_images
    from stacker.doctor import diagnose, without
    from stacker.features.extractor import forward_pass_count
    from stacker.level2.arrays import score

    data = load_images(DVC)
    tr, te = train_test_split(np.arange(len(data)), test_size=0.2, stratify=data.y, random_state=args.seed)
    train, test = data.subset(np.sort(tr)), data.subset(np.sort(te))
    ens = fit(train, backbones, args)
    before = score(test.y, ens.predict_proba(test), 2)
    issues = diagnose(ens, kinds=("label_issue",))
    fwd = forward_pass_count()
    clean = fit(without(train, issues), backbones, args)
    assert forward_pass_count() == fwd, "the refit ran a forward pass"
    after = score(test.y, clean.predict_proba(test), 2)
    print(f"\ncleaning (dvc, seeded 80/20 split, {', '.join(backbones)}): {len(issues)} label issues of "
          f"{len(train)} training images left out (no forward pass)")
    print(f"  held-out log loss {before['log_loss']:.4f} -> {after['log_loss']:.4f} "
          f"({after['log_loss'] - before['log_loss']:+.4f}); accuracy {before['accuracy']:.4f} -> "
          f"{after['accuracy']:.4f}")
    summary.update({"clean_removed": len(issues), "heldout_ll": before["log_loss"],
                    "heldout_ll_cleaned": after["log_loss"], "heldout_acc": before["accuracy"],
                    "heldout_acc_cleaned": after["accuracy"]})
    return ens


def pseudo_labelling(backbones, args, summary):
    """Held-out log loss and fit seconds of the 80% fit with and without dogs-vs-cats/test as an unlabelled pool.

    Also with 10% of the 80% labelled (the rest of it joins the pool, unlabelled), where pseudo-labels have more
    to teach, and for each, what keeping the first round regardless of the out-of-fold verdict would have given.
    """
    from unittest import mock

    from sklearn.model_selection import train_test_split

    import stacker
    from stacker import pseudo_labels
    from stacker.data.sources import ImageSet, load_images
    from stacker.level2.arrays import score

    data, test_pool = load_images(DVC), load_images(DVC_TEST)
    tr, te = train_test_split(np.arange(len(data)), test_size=0.2, stratify=data.y, random_state=args.seed)
    train, test = data.subset(np.sort(tr)), data.subset(np.sort(te))
    few, rest = train_test_split(np.arange(len(train)), train_size=0.1, stratify=train.y, random_state=args.seed)
    scarce = train.subset(np.sort(few))
    pool_paths = list(test_pool.paths) + [train.paths[i] for i in np.sort(rest)]
    scarce_pool = ImageSet(pool_paths, pool_paths)
    make = lambda **kw: stacker.Ensemble(backbones, cache_dir=args.cache, weights_dir=args.weights_dir, cv=5,
                                         random_state=args.seed, verbose=0, **kw)
    print(f"\npseudo-labels (dvc, seeded 80/20 split, {', '.join(backbones)}; pool: dogs-vs-cats/test, "
          f"{len(test_pool)} images; options {pseudo_labels.options(args.pseudo)}; fit seconds with every feature "
          f"cached, every learner fitted again)")
    print(f"  {'labelled':<9} {'fit':<22} {'held-out ll':>11} {'accuracy':>9} {'oof ll':>8} {'fit s':>7}  rounds")
    runs = (("plain", {}, None, False), ("unlabeled=pool", {"pseudo_labels": args.pseudo}, True, False),
            ("round 1 kept regardless", {"pseudo_labels": {**(args.pseudo or {}), "rounds": 1}}, True, True))
    for label, labelled, pool in (("all", train, test_pool), ("10%", scarce, scarce_pool)):
        for name, kw, unlabeled, forced in runs:
            fit_kw = {"unlabeled": pool} if unlabeled else {}
            make(**kw).fit(labelled, **fit_kw)  # fills the feature cache (the pool's too): the timed fit extracts nothing
            for part in ("learners", "folds", "test_proba"):  # but fits every learner again
                shutil.rmtree(os.path.join(args.cache, part), ignore_errors=True)
            with mock.patch.object(pseudo_labels, "_restore", lambda *a: None) if forced else contextlib.nullcontext():
                t0 = time.perf_counter()
                ens = make(**kw).fit(labelled, **fit_kw)
                secs = time.perf_counter() - t0
            sc = score(test.y, ens.predict_proba(test), 2)
            s = ens.pseudo_labels_
            rounds = "" if s is None else "; ".join(
                f"{r['images']} images, oof {r['log_loss']:.4f}{'' if r['kept'] else ' (not kept)'}"
                for r in s["rounds"] if not r.get("same"))
            oof = ens.scores_["ensemble"]["log_loss"] if not forced else s["rounds"][0]["log_loss"]
            print(f"  {label if name == 'plain' else '':<9} {name:<22} {sc['log_loss']:>11.4f} {sc['accuracy']:>9.4f} "
                  f"{oof:>8.4f} {secs:>7.1f}  {rounds}")
            tag = {"plain": "", "unlabeled=pool": "_pseudo", "round 1 kept regardless": "_forced"}[name]
            pre = "pl" if label == "all" else "pl10"
            summary.update({f"{pre}_heldout_ll{tag}": sc["log_loss"], f"{pre}_fit_s{tag}": secs})
            if name == "unlabeled=pool":
                summary[f"{pre}_kept_rounds"] = s["kept_rounds"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="dvc,caltech", help="label noise on: comma-separated from dvc, caltech")
    p.add_argument("--dvc-backbones", default="efficientnet_lite0,mobilenet_025")
    p.add_argument("--caltech-backbones", default="efficientnet_lite0")
    p.add_argument("--cache", default="/tmp/doctor_cache", help="feature cache (default: %(default)s)")
    p.add_argument("--weights-dir", default=os.environ.get("STACKER_WEIGHTS_DIR", os.path.join(SHARED, "weights")))
    p.add_argument("--planted", type=int, default=40, help="photos that get planted copies (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", default="", help="comma-separated parts to skip: noise, duplicates, cleaning, pseudo")
    p.add_argument("--pseudo", type=json.loads, default=None, metavar="JSON",
                   help="pseudo_labels options, e.g. '{\"rounds\": 3, \"min_confidence\": 0.9}' (default: stacker's)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    skip = set(args.skip.split(","))
    summary = {}
    dvc_backbones = args.dvc_backbones.split(",")
    if "noise" not in skip:
        for key in args.datasets.split(","):
            root, backbones = {"dvc": (DVC, dvc_backbones), "caltech": (CALTECH, args.caltech_backbones.split(","))}[key]
            label_noise(key, root, backbones, args, summary)
    ens = None
    if "cleaning" not in skip:
        ens = cleaning(dvc_backbones, args, summary)
    if "pseudo" not in skip:
        pseudo_labelling(dvc_backbones, args, summary)
    if "duplicates" not in skip:
        from stacker.data.sources import load_images

        duplicates(ens or fit(load_images(DVC).head(200, seed=args.seed), dvc_backbones, args), args, summary)
    print("doctor " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
