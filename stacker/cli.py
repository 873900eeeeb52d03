"""The ``stacker`` command line (also ``python -m stacker``).

    stacker fit DATA --out DIR [--backbones a,b] [--models default] [--meta auto] [--folds 5] [--image-size N]
    stacker predict MODEL IMAGE_OR_FOLDER... [--json | --csv FILE]
    stacker submit MODEL TEST_FOLDER --out submission.csv [--sample sample_submission.csv]
    stacker report RUN_DIR
    stacker top5 IMAGE... [--backbone efficientnet_lite0]
    stacker extract DATA --backbones a,b [--shard i/n] [--cache DIR]
    stacker cache ls|rm|prune [--cache DIR]
    stacker cache merge SHARD_CACHE... [--cache DIR]

Exit codes: 0 success, 2 usage error, 1 failure (one line saying why; ``--debug`` for the
traceback).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

DEFAULT_CACHE = os.environ.get("STACKER_CACHE", os.path.join("artifacts", "cache"))


def _add_common(p):
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _add_trust(p):
    p.add_argument("--trust", action="append", default=[], metavar="TYPE",
                   help="a fully qualified class name the model's files may use besides stacker's own "
                        "(your estimator class); repeatable. Other types are refused, so a model from "
                        "someone else runs none of its code")


def _add_ray(p):
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on Ray (pip install 'stacker[ray]'): the cluster at ADDRESS, else $RAY_ADDRESS or a "
                        "local one; the cache must be on storage every node mounts")


def _connect_ray(args) -> bool:
    if args.ray is None:
        return False
    from .distributed import connect

    connect(args.ray or None)
    return True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stacker", description="Stacked ensembles of pretrained CNNs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fit", help="fit an ensemble on labelled images and save it")
    p.add_argument("data", help="class folders, a folder of label.id.jpg files, or a CSV of path,label")
    p.add_argument("--out", required=True, help="directory for the saved ensemble")
    p.add_argument("--backbones", default="efficientnet_lite0", help="comma-separated registered backbones")
    p.add_argument("--models", "--head", dest="models", default="default",
                   help="models per backbone: a preset (default, fast, best, dense) or names from "
                        "logistic,prototype,dense,resnet (default: %(default)s)")
    p.add_argument("--meta", default="auto",
                   help="level 2: auto (best cross-validated log loss), or greedy, logit, mean, best, stack2, "
                        "dense, logistic, or a comma-separated list to choose from (default: %(default)s)")
    p.add_argument("--no-calibration", action="store_true", help="do not try a temperature/floor calibration")
    p.add_argument("--meta-inputs", default="proba", choices=["proba", "features", "both"])
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--weights", default="imagenet", help="'imagenet', 'none' or a weights file")
    p.add_argument("--weights-dir", default=None)
    p.add_argument("--cache", default=DEFAULT_CACHE)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--on-bad-image", default="raise", choices=["raise", "skip"])
    p.add_argument("--no-report", action="store_true", help="do not write report.html")
    _add_ray(p)
    _add_common(p)

    p = sub.add_parser("predict", help="predict classes of images with a saved ensemble")
    p.add_argument("model")
    p.add_argument("images", nargs="+", help="image files and/or folders")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print JSON")
    out.add_argument("--csv", metavar="FILE", help="write a CSV (path, label, one column per class)")
    p.add_argument("--cache", default=None)
    p.add_argument("--on-bad-image", default="raise", choices=["raise", "skip"])
    _add_trust(p)
    _add_common(p)

    p = sub.add_parser("submit", help="write a validated Kaggle submission for a test folder")
    p.add_argument("model")
    p.add_argument("test_folder")
    p.add_argument("--out", default="submission.csv")
    p.add_argument("--sample", default=None, help="sample_submission.csv (ids and header to match)")
    p.add_argument("--kind", default="auto", choices=["auto", "binary", "label", "proba"])
    p.add_argument("--positive", default=None, help="class whose probability a binary file holds")
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--cache", default=None)
    p.add_argument("--on-bad-image", default="raise", choices=["raise", "skip"],
                   help="an unusable test image stops the run (raise) or gets no prediction (skip)")
    p.add_argument("--fill", default=None, metavar="uniform|P",
                   help="what to write for ids without a prediction (skipped images): 'uniform' or the positive "
                        "class's probability; without it such ids make the submission fail")
    _add_trust(p)
    _add_common(p)

    p = sub.add_parser("report", help="write report.html with figures for a saved run")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None)
    _add_common(p)

    p = sub.add_parser("top5", help="ImageNet top-5 classes of images")
    p.add_argument("images", nargs="+")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--json", action="store_true")
    _add_common(p)

    p = sub.add_parser("extract", help="fill the feature cache (one shard of it with --shard i/n)")
    p.add_argument("data", help="class folders, Kaggle-named files, a test folder or a CSV")
    p.add_argument("--backbones", default="efficientnet_lite0", help="comma-separated registered backbones")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--weights", default="imagenet", help="'imagenet', 'none' or a weights file")
    p.add_argument("--weights-dir", default=None)
    p.add_argument("--cache", default=DEFAULT_CACHE)
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="only part I of N contiguous parts of the image list (0-based), e.g. 0/4 on machine 1")
    p.add_argument("--feature-dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--on-bad-image", default="skip", choices=["raise", "skip"])
    _add_ray(p)
    _add_common(p)

    p = sub.add_parser("cache", help="inspect, clean or merge feature caches")
    p.add_argument("action", choices=["ls", "rm", "prune", "merge"],
                   help="ls: entries; rm: delete entries matching --backbone (or all); "
                        "prune: delete entries whose code fingerprint is not the current one; "
                        "merge: copy the rows of SOURCES (shard caches) into --cache")
    p.add_argument("sources", nargs="*", help="for merge: cache directories made by `stacker extract --shard`")
    p.add_argument("--cache", default=DEFAULT_CACHE)
    p.add_argument("--backbone", default=None)
    _add_common(p)
    return parser


def _expand(paths) -> tuple[list[str], dict]:
    """Image paths from files and folders, and ``{path: reason}`` for folder entries given no row.

    Paths that do not exist stay in the list: prediction reports them under --on-bad-image.
    """
    from .predict import _as_input

    out, unread = [], {}
    for p in paths:
        if os.path.isdir(p):
            data, _, skipped = _as_input(p)
            out += data.paths
            unread.update(skipped)
        else:
            out.append(p)
    return out, unread


def cmd_fit(args) -> int:
    import stacker
    from stacker.recipe import weights_arg

    ens = stacker.Ensemble(args.backbones.split(","), weights=weights_arg(args.weights), models=args.models,
                           meta=args.meta, meta_inputs=args.meta_inputs, cv=args.folds, random_state=args.seed,
                           calibration=not args.no_calibration, input_size=args.image_size, cache_dir=args.cache,
                           weights_dir=args.weights_dir,
                           on_bad_image=args.on_bad_image, verbose=0 if args.quiet else 1,
                           executor="ray" if _connect_ray(args) else "local")
    ens.fit(args.data)
    ens.save(args.out)
    print(ens.leaderboard())
    if not args.no_report:
        from .report import report

        print(f"report: {report(args.out)}")
    print(f"saved ensemble to {args.out}")
    return 0


def cmd_predict(args) -> int:
    import stacker

    paths, unread = _expand(args.images)
    res = stacker.predict(paths, model=args.model, cache_dir=args.cache, on_bad_image=args.on_bad_image,
                          trusted=args.trust)
    res.unread.update(unread)
    rows = []
    for i, path in enumerate(paths):
        rows.append({"path": path, "label": res.labels[i],
                     **{c: (None if res.labels[i] is None else float(res.proba[i, j]))
                        for j, c in enumerate(res.classes)}})
    if args.json:
        print(json.dumps(rows, indent=1))
    elif args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["path", "label", *res.classes])
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {len(rows)} predictions to {args.csv}")
    else:
        width = max(len(r["path"]) for r in rows)
        for r in rows:
            p = "" if r["label"] is None else f"{r[r['label']]:.4f}"
            print(f"{r['path']:<{width}}  {r['label'] or 'SKIPPED'}  {p}")
    for path, reason in res.unread.items():
        print(f"not read {path}: {reason}", file=sys.stderr)
    for row, reason in res.skipped.items():
        print(f"skipped {paths[row]}: {reason}", file=sys.stderr)
    return 0


def cmd_submit(args) -> int:
    import stacker
    from stacker.images import from_test_folder

    test = from_test_folder(args.test_folder)
    ens = stacker.load(args.model, cache_dir=args.cache, trusted=args.trust)
    ens.verbose = 0 if args.quiet else 1
    proba, skipped = ens.predict_with_skipped(test, on_bad_image=args.on_bad_image)
    for path, reason in test.skipped.items():
        print(f"not read {path}: {reason}", file=sys.stderr)
    for row, reason in skipped.items():
        print(f"skipped id {test.ids[row]} ({test.paths[row]}): {reason}", file=sys.stderr)
    path = stacker.submission.write_csv(args.out, test.ids, proba, ens.classes_, kind=args.kind,
                                        positive=args.positive, eps=args.eps, sample_submission=args.sample,
                                        fill=_fill_value(args.fill), skipped=skipped)
    print(f"wrote {len(test)} rows to {path}" + (f" ({len(skipped)} filled with --fill {args.fill})" if skipped else ""))
    return 0


def _fill_value(text):
    if text is None or text == "uniform":
        return text
    try:
        return float(text)
    except ValueError:
        raise SystemExit(f"stacker submit: error: --fill must be 'uniform' or a probability, got {text!r}") from None


def cmd_report(args) -> int:
    from .report import report

    print(report(args.run_dir, args.out))
    return 0


def cmd_top5(args) -> int:
    from .pretrained import top_k

    paths, _ = _expand(args.images)
    res = top_k(paths, backbone=args.backbone, k=args.k)
    if args.json:
        print(json.dumps([{"path": p, "top": [{"id": int(i), "name": n, "probability": float(q)}
                                              for i, n, q in res.rows(r)]} for r, p in enumerate(paths)], indent=1))
        return 0
    for r, p in enumerate(paths):
        print(p)
        for i, n, q in res.rows(r):
            print(f"  {q:7.4f}  {n} ({i})")
    return 0


def _parse_shard(text):
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like I/N (e.g. 0/4), got {text!r}") from None
    return i, n


def cmd_extract(args) -> int:
    from .features import FeatureExtractor
    from .images import load_images
    from .recipe import weights_arg

    try:
        data = load_images(args.data)
    except ValueError:
        data = load_images(args.data, labelled=False)
    part = ""
    if args.shard:
        i, n = _parse_shard(args.shard)
        data = data.shard(i, n, align=args.batch_size)  # same batches as an unsharded run
        part = f" (shard {i}/{n})"
    for name in args.backbones.split(","):
        ext = FeatureExtractor(name.strip(), weights=weights_arg(args.weights), input_size=args.image_size,
                               batch_size=args.batch_size, feature_dtype=args.feature_dtype, cache_dir=args.cache,
                               weights_dir=args.weights_dir, on_bad_image=args.on_bad_image,
                               verbose=0 if args.quiet else 1)
        if _connect_ray(args):
            from .distributed import fill_cache

            done = fill_cache(ext, data)
            part = f" ({done.computed} computed on {done.workers} Ray workers)"
        feats = ext.extract(data)
        print(f"{name}: {len(feats.kept)} images cached in {args.cache}{part}"
              + (f", {len(feats.skipped)} unusable" if feats.skipped else ""))
    return 0


def cmd_cache(args) -> int:
    from .cache import FeatureCache
    from .features import _code_fingerprint

    if args.action == "merge":
        if not args.sources:
            raise ValueError("cache merge needs one or more source cache directories")
        added = FeatureCache(args.cache).merge(args.sources)
        for name, n in added.items():
            print(f"{name}: {n} rows added")
        print(f"merged {len(args.sources)} caches into {args.cache}: {sum(added.values())} rows")
        return 0
    entries = FeatureCache(args.cache).entries()
    if args.backbone:
        entries = [e for e in entries if e.get("meta", {}).get("backbone") == args.backbone]
    if args.action == "ls":
        if not entries:
            print(f"no feature cache entries in {args.cache}")
        for e in entries:
            m = e.get("meta", {})
            state = "current" if m.get("code") == _code_fingerprint() else "stale-code"
            print(f"{os.path.basename(e['file'])}  rows={e['rows']}  {e['bytes'] / 2**20:.1f} MiB  "
                  f"backbone={m.get('backbone')}  size={m.get('input_size')}  weights={str(m.get('weights'))[:20]}  "
                  f"{state}" + (f"  ERROR {e['error']}" if "error" in e else ""))
        return 0
    if args.action == "prune":
        entries = [e for e in entries if e.get("meta", {}).get("code") != _code_fingerprint() or "error" in e]
    for e in entries:
        for suffix in ("", ".lock"):
            if os.path.exists(e["file"] + suffix):
                os.remove(e["file"] + suffix)
        print(f"removed {e['file']}")
    print(f"{len(entries)} entries removed")
    return 0


COMMANDS = {"fit": cmd_fit, "predict": cmd_predict, "submit": cmd_submit, "report": cmd_report,
            "top5": cmd_top5, "extract": cmd_extract, "cache": cmd_cache}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)  # usage errors exit with 2
    if args.quiet:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("stacker: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for users, the traceback with --debug
        if args.debug:
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"stacker {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
