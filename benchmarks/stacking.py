#!/usr/bin/env python
"""The stacking core against the peers a user would pick, on the same cached features and folds.

    python benchmarks/stacking.py                       # dogs-vs-cats/train and caltech101
    python benchmarks/stacking.py --datasets dvc --finetune-n 600 --finetune-folds 3

For each data set (features from the cache under --cache: the warm part asserts zero CNN
forward passes; a cold cache is filled first and that time is not counted):

- stacker's default (``Ensemble(backbones)``: logistic + prototype per backbone, level 2
  chosen by cross-validated log loss, calibrated out of fold);
- stacker's level 2 with each combiner on the same out-of-fold inputs (``+T``: with the
  temperature/floor calibration fitted out of fold);
- scikit-learn's ``StackingClassifier`` (StandardScaler + LogisticRegression per backbone,
  LogisticRegression final estimator, cv=5): out of fold, its algorithm on the same folds
  (see :func:`stacking_oof`); held out, the real object fitted on the 80%;
- a single scaled ``LogisticRegression`` on the concatenated features;
- stacker's best single learner.

Columns: out-of-fold log loss and accuracy on the same 5 folds, fit seconds. Then every row
is fitted again on a stratified, seeded 80% and scored on the untouched 20% (held out); the
table's gap is held-out against the row's out-of-fold log loss on all images, the last line's
``*_gap`` against the out-of-fold log loss of the 80% fit itself. ``--finetune-n`` adds fine-tuned learners on
a stratified subset (fewer folds), judged the same way. The last line is machine-readable.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "..", "shared")
DATASETS = {  # data, backbones, models: the recipes' (recipes/dogs_vs_cats.py, recipes/caltech101.py)
    "dvc": (os.path.join(SHARED, "data", "dogs-vs-cats", "train"),
            "efficientnet_lite0,efficientnet_lite1,efficientnet_lite2,mobilenet_025", "default"),
    "caltech": (os.path.join(SHARED, "data", "caltech101"),
                "efficientnet_lite0@260+flip,efficientnet_lite1@280+flip,efficientnet_lite2@300+flip,mobilenet_025+flip",
                "logistic,prototype,lda"),
}


def learner_cache(feature_cache: str) -> str:
    """A fresh cache folder that shares the feature files but none of the learner results (fit times are real)."""
    from stacker.features.layout import FEATURES, ONNX

    tmp = tempfile.mkdtemp(prefix="stacker-stacking-")
    for sub in (FEATURES, ONNX):
        src = os.path.abspath(os.path.join(feature_cache, sub))
        if os.path.isdir(src):
            os.symlink(src, os.path.join(tmp, sub))
    return tmp


def features(data, backbones, cache, weights_dir):
    from stacker.features.extractor import FeatureExtractor
    from stacker.learners.kinds import backbone_entry

    out = []
    for entry in map(backbone_entry, backbones):  # "name@size+flip" as the recipes write it
        views = entry.pop("views", ("original",))  # the peers get what stacker's learners read: the views' mean
        ext = FeatureExtractor(entry.pop("backbone"), **entry, cache_dir=cache, weights_dir=weights_dir, verbose=0)
        out.append(np.mean([ext.with_view(v).extract(data).values.astype(np.float32) for v in views], axis=0))
    return out


def sklearn_stacking(widths, seed):
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import StackingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    starts = np.cumsum([0] + widths)
    estimators = [(f"b{i}", make_pipeline(ColumnTransformer([("cols", "passthrough", list(range(a, b)))]),
                                          StandardScaler(), LogisticRegression(max_iter=1000)))
                  for i, (a, b) in enumerate(zip(starts[:-1], starts[1:]))]
    return StackingClassifier(estimators, final_estimator=LogisticRegression(max_iter=1000),
                              cv=StratifiedKFold(5, shuffle=True, random_state=seed))


def stacking_oof(X_parts, y, folds) -> dict:
    """``StackingClassifier``'s own algorithm scored as stacker's level 2 is, on the same folds.

    Its base estimators' out-of-fold probabilities (what ``cv=`` gives its final estimator),
    then the final LogisticRegression cross-validated on those over the same folds. Nesting
    a whole ``StackingClassifier`` in an outer loop would refit each base estimator 30 times
    (hours for 101 classes); the held-out rows fit the real object once.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict

    from stacker.level2.arrays import score

    k = int(y.max()) + 1
    t0 = time.perf_counter()
    base = [cross_val_predict(concat_logistic(), X, y, cv=folds, method="predict_proba") for X in X_parts]
    Z = np.hstack([b[:, 1:] if k == 2 else b for b in base])  # binary: one column, as StackingClassifier drops one
    oof = cross_val_predict(LogisticRegression(max_iter=1000), Z, y, cv=folds, method="predict_proba")
    return {**score(y, oof, k), "fit_s": time.perf_counter() - t0}  # about one StackingClassifier.fit


def concat_logistic():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))


def level2_variants(Z, y, folds, name, n_blocks, k, seed):
    """One combiner fitted on out-of-fold inputs as stacker's level 2 fits it: raw and calibrated.

    Returns ``[(label, Level2, out-of-fold probabilities, seconds)]``.
    """
    from stacker.level2.calibration import TemperatureScaler
    from stacker.level2.crossfit import cross_calibrate, cross_fit
    from stacker.level2.registry import make_combiner
    from stacker.level2.selection import Level2

    t0 = time.perf_counter()
    oof = cross_fit(name, Z, y, folds, n_blocks, k, seed)
    combiner = make_combiner(name, n_blocks, seed).fit(Z, y)
    raw_s = time.perf_counter() - t0
    cal = TemperatureScaler().fit(oof, y)
    return [(name, Level2(name, combiner, k, oof), oof, raw_s),
            (name + "+T", Level2(name + "+T", combiner, k, oof, cal.temperature_, cal.floor_),
             cross_calibrate(oof, y, folds), time.perf_counter() - t0)]


def run_stacker(train, test, backbones, cache, args, **params):
    """Fit stacker's default on ``train``; out-of-fold and (when ``test``) held-out rows per variant."""
    import stacker
    from stacker.level2.arrays import meta_matrix, score
    from stacker.level2.registry import COMBINERS

    k = len(train.classes)
    t0 = time.perf_counter()
    ens = stacker.Ensemble(backbones, cache_dir=cache, weights_dir=args.weights_dir, cv=args.folds,
                           random_state=args.seed, verbose=0, **params).fit(train)
    fit_s = time.perf_counter() - t0
    rows = {"stacker default": {**score(ens.y_, ens.meta_oof_proba_, k), "fit_s": fit_s,
                                "chosen": ens.meta_.name}}
    outs = None
    if test is not None:
        outs, kept, _ = ens._level1(test)
        assert len(kept) == len(test)
        rows["stacker default"]["heldout"] = score(test.y, ens._level2(outs), k)
    names = list(ens.learners_)
    best = min(names, key=lambda n: ens.scores_[n]["log_loss"])
    rows[f"best single ({best})"] = {**{m: ens.scores_[best][m] for m in ("log_loss", "accuracy")},
                                     "fit_s": ens.scores_[best]["train_s"]}
    if outs is not None:
        rows[f"best single ({best})"]["heldout"] = score(test.y, outs[best][0], k)
    meta_p = [lr.meta_oof({"original": None})[0] if lr.kind != "frozen" else lr.oof_proba_  # frozen: no features needed
              for lr in ens.learners_.values()]
    Z = meta_matrix(meta_p, [], "proba")
    n_blocks = sum(p.shape[1] // k for p in meta_p)
    Zt = meta_matrix([o[1] for o in outs.values()], [], "proba") if outs is not None else None
    for name in COMBINERS:
        for label, lv, oof, seconds in level2_variants(Z, ens.y_, ens.folds_, name, n_blocks, k, args.seed):
            row = {**score(ens.y_, oof, k), "fit_s": seconds}
            if Zt is not None:
                row["heldout"] = score(test.y, lv.predict_proba(Zt), k)
            rows[f"  level 2 = {label}"] = row
    return ens, rows


def run_peers(X_parts, y, folds, seed, test_rows=None, train_rows=None):
    """scikit-learn's StackingClassifier and a single LogisticRegression on concatenated features."""
    from sklearn.model_selection import cross_val_predict

    from stacker.level2.arrays import score

    X = np.concatenate(X_parts, axis=1)
    k = int(y.max()) + 1
    rows = {}
    for label, make in (("sklearn StackingClassifier", lambda: sklearn_stacking([p.shape[1] for p in X_parts], seed)),
                        ("LogisticRegression on concatenated", concat_logistic)):
        if train_rows is None and label.startswith("sklearn"):
            rows[label] = stacking_oof(X_parts, y, folds)
        elif train_rows is None:
            t0 = time.perf_counter()
            oof = cross_val_predict(make(), X, y, cv=folds, method="predict_proba")
            rows[label] = {**score(y, oof, k), "fit_s": (time.perf_counter() - t0) / len(folds)}
        else:
            t0 = time.perf_counter()
            model = make().fit(X[train_rows], y[train_rows])
            rows[label] = {"fit_s": time.perf_counter() - t0,
                           "heldout": score(y[test_rows], model.predict_proba(X[test_rows]), k)}
    return rows


def table(title, rows) -> str:
    head = f"{'':52s} {'oof_ll':>8s} {'oof_acc':>8s} {'fit_s':>8s} {'held_ll':>8s} {'held_acc':>8s} {'gap':>7s}"
    lines = [title, head, "-" * len(head)]
    for name, r in rows.items():
        h, ll = r.get("heldout"), r.get("log_loss")
        oof = f"{ll:8.4f} {r['accuracy']:8.4f}" if ll is not None else f"{'':8s} {'':8s}"
        held = f"{h['log_loss']:8.4f} {h['accuracy']:8.4f}" if h else f"{'':8s} {'':8s}"
        gap = f"{(h['log_loss'] - ll) / ll * 100:6.1f}%" if h and ll else ""
        lines.append(f"{name:52s} {oof} {r.get('fit_s', 0):8.1f} {held} {gap:>7s}")
    return "\n".join(lines)


def bench(key, args, summary):
    from sklearn.model_selection import StratifiedKFold, train_test_split

    from stacker.features.extractor import forward_pass_count
    from stacker.data.sources import load_images

    root, default_backbones, models = DATASETS[key]
    backbones = (args.backbones or default_backbones).split(",")
    data = load_images(root)
    X_parts = features(data, backbones, args.cache, args.weights_dir)  # fills a cold cache (not timed)
    fwd = forward_pass_count()
    y = data.y
    folds = list(StratifiedKFold(args.folds, shuffle=True, random_state=args.seed).split(np.zeros(len(y)), y))
    cache = learner_cache(args.cache)
    try:
        ens, rows = run_stacker(data, None, backbones, cache, args, models=models)
        assert all(np.array_equal(a[1], b[1]) for a, b in zip(ens.folds_, folds)), "stacker used other folds"
        rows.update(run_peers(X_parts, y, folds, args.seed))
        # held out: a stratified, seeded 80% to fit, the untouched 20% to score
        tr, te = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=args.seed)
        tr, te = np.sort(tr), np.sort(te)
        ens80, rows80 = run_stacker(data.subset(tr), data.subset(te), backbones, cache, args, models=models)
        peers80 = run_peers(X_parts, y, None, args.seed, test_rows=te, train_rows=tr)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    assert forward_pass_count() == fwd, "the benchmark ran a CNN forward pass on cached features"
    print(table(f"\n{key}: {len(y)} images, {len(data.classes)} classes, {', '.join(backbones)}; models {models}; "
                f"{args.folds} folds (out of fold: all images; held out: fit on 80%, scored on 20%)",
                _merge(rows, rows80, peers80)))
    d = rows["stacker default"]
    best = next(r for n, r in rows.items() if n.startswith("best single"))
    summary.update({f"{key}_ll": d["log_loss"], f"{key}_sklearn_ll": rows["sklearn StackingClassifier"]["log_loss"],
                    f"{key}_acc": d["accuracy"], f"{key}_sklearn_acc": rows["sklearn StackingClassifier"]["accuracy"],
                    f"{key}_concat_ll": rows["LogisticRegression on concatenated"]["log_loss"],
                    f"{key}_best_member_ll": best["log_loss"], f"{key}_fit_s": d["fit_s"],
                    f"{key}_heldout_ll": rows80["stacker default"]["heldout"]["log_loss"],
                    f"{key}_oof80_ll": rows80["stacker default"]["log_loss"],
                    f"{key}_sklearn_heldout_ll": peers80["sklearn StackingClassifier"]["heldout"]["log_loss"],
                    f"{key}_gap": rows80["stacker default"]["heldout"]["log_loss"] / rows80["stacker default"][
                        "log_loss"] - 1})
    print(f"chosen level 2: {d['chosen']} (all images), {rows80['stacker default']['chosen']} (80%)")


def _merge(rows, rows80, peers80) -> dict:
    """Out-of-fold rows (all images) with the held-out score of the same row fitted on 80%."""
    out = {}
    by_prefix = {n.split(" (")[0]: r for n, r in {**rows80, **peers80}.items()}
    for name, r in rows.items():
        h = by_prefix.get(name.split(" (")[0], {})
        out[name] = {**r, "heldout": h.get("heldout")}
    return out


def bench_finetune(args, summary):
    """Fine-tuned learners (a subset, fewer folds) feeding the same level 2, out of fold and held out."""
    from sklearn.model_selection import train_test_split

    from stacker.data.sources import load_images

    root, default_backbones, _ = DATASETS["dvc"]
    backbones = (args.finetune_backbones or default_backbones).split(",")
    data = load_images(root).head(args.finetune_n, seed=args.seed)
    tr, te = train_test_split(np.arange(len(data)), test_size=0.2, stratify=data.y, random_state=args.seed)
    sub = argparse.Namespace(**{**vars(args), "folds": args.finetune_folds})
    rows = {}
    for label, params in (("frozen", {}), ("fine-tuned", {"finetune": True})):
        _, r_all = run_stacker(data, None, backbones, args.cache, sub, **params)
        _, r80 = run_stacker(data.subset(np.sort(tr)), data.subset(np.sort(te)), backbones, args.cache, sub, **params)
        for name in ("stacker default",):
            rows[f"{label}: {name}"] = {**r_all[name], "heldout": r80[name]["heldout"]}
        best = next(n for n in r_all if n.startswith("best single"))
        best80 = next(n for n in r80 if n.startswith("best single"))
        rows[f"{label}: {best}"] = {**r_all[best], "heldout": r80[best80]["heldout"]}
        summary[f"dvc_{label.replace('-', '')}_subset_ll"] = r_all["stacker default"]["log_loss"]
        summary[f"dvc_{label.replace('-', '')}_subset_heldout_ll"] = r80["stacker default"]["heldout"]["log_loss"]
    print(table(f"\ndvc fine-tuned vs frozen: {len(data)} images (stratified subset), {args.finetune_folds} folds, "
                f"{', '.join(backbones)}", rows))


def main(argv=None) -> int:
    from stacker.features.layout import default_cache_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="dvc,caltech", help="comma-separated from dvc, caltech")
    p.add_argument("--backbones", default=None, help="override each data set's backbones")
    p.add_argument("--cache", default=default_cache_dir(), help="the recipes' cache (default: %(default)s)")
    p.add_argument("--weights-dir", default=os.environ.get("STACKER_WEIGHTS_DIR", os.path.join(SHARED, "weights")))
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--finetune-n", type=int, default=0, help="also compare fine-tuned learners on N images")
    p.add_argument("--finetune-folds", type=int, default=3)
    p.add_argument("--finetune-backbones", default="efficientnet_lite0,mobilenet_025")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    summary = {}
    for key in args.datasets.split(","):
        if not os.path.isdir(DATASETS[key][0]):
            print(f"{key}: {DATASETS[key][0]} not found, skipped")
            continue
        bench(key, args, summary)
    if args.finetune_n:
        bench_finetune(args, summary)
    print("stacking " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
