"""The ``stacker`` command line (also ``python -m stacker``).

    stacker fit DATA --out DIR [--backbones a,b] [--models default] [--meta auto] [--folds 5] ...
    stacker predict MODEL IMAGE_OR_FOLDER... [--json | --csv FILE]
    stacker evaluate MODEL FOLDER_OR_CSV [--predictions out.csv] [--report DIR]
    stacker submit MODEL TEST_FOLDER --out submission.csv [--sample sample_submission.csv]
    stacker report RUN_DIR
    stacker doctor MODEL [DATA] [--test TEST] [--csv findings.csv] [--report DIR] [--cache DIR]
    stacker top5 IMAGE... [--backbone efficientnet_lite0]
    stacker extract DATA --backbones a,b [--shard i/n] [--cache DIR]
    stacker cache ls|rm|prune [--backbone X] [--kind K] [--cache DIR] [--dry-run] [--yes]
    stacker cache merge SHARD_CACHE... [--cache DIR]

Images (DATA, IMAGE_OR_FOLDER, TEST_FOLDER, --sample) may be URLs such as
``s3://bucket/train`` (:mod:`stacker.data.storage`; credentials from the storage library's
usual configuration), and so may ``submit --out``; the cache, models and reports are local
folders.

Options come from one table (:mod:`stacker.app.options`) shared with the recipes. Results go
to stdout, progress to stderr (``--quiet``: none). Exit codes: 0 success, 2 usage error,
1 failure (one line saying why, in command-line terms; ``--debug`` for the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import sys

from stacker.app.options import GROUPS, OPTIONS, add_options, cli_terms, progress_output
from stacker.backbones.registry import load_plugins
from stacker.doctor import DUPLICATE_THRESHOLD
from stacker.features.layout import CACHE_ENV, cache_kinds, default_cache_dir

_FORMATTER = argparse.RawDescriptionHelpFormatter


def _add_common(p):
    OPTIONS["quiet"].add_to(p)
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _command(sub, name, help, description=""):
    return sub.add_parser(name, help=help, description=help + (f"\n\n{description}" if description else ""),
                          formatter_class=_FORMATTER)


def _add_ray(p):
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on Ray (pip install 'stacker[ray]'): the cluster at ADDRESS, else $RAY_ADDRESS or a "
                        "local one; the cache must be on storage every node mounts")


def _connect_ray(args) -> bool:
    if args.ray is None:
        return False
    from stacker.learners.distributed import connect

    connect(args.ray or None)
    return True


def build_parser() -> argparse.ArgumentParser:
    from stacker import __version__

    parser = argparse.ArgumentParser(
        prog="stacker", description="Stacked ensembles of pretrained CNNs.", formatter_class=_FORMATTER,
        epilog=f"The cache (features, ONNX graphs, learner results) is --cache: ${CACHE_ENV}, else "
               f"$XDG_CACHE_HOME/stacker or ~/.cache/stacker; here {default_cache_dir()}. `stacker cache ls` lists it.")
    parser.add_argument("--version", action="version", version=f"stacker {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(sub, "fit", "fit an ensemble on labelled images and save it (with report.html)",
                 "The same options as the recipes (recipes/*.py), with the same defaults.")
    p.add_argument("data", help="class folders, a folder of label.id.jpg files, or a CSV of path,label")
    p.add_argument("--out", required=True, help="directory for the saved ensemble")
    for title, names in GROUPS.items():
        add_options(p, names, title)
    p.add_argument("--no-report", action="store_true", help="do not write report.html")
    p.add_argument("--merge-labels", action="store_true", help="merge labels that differ only in case or spaces")
    p.add_argument("--exclude", metavar="CSV", default=None,
                   help="leave out every image this CSV's path column names (a findings CSV from `stacker doctor`, "
                        "edited to the rows you chose); features still come from the cache")
    p.add_argument("--unlabeled", metavar="FOLDER", default=None,
                   help="unlabelled images (e.g. Kaggle's test folder) to pseudo-label in rounds; kept only if "
                        "they lower the out-of-fold log loss of the labelled images")
    OPTIONS["pseudo_labels"].add_to(p)
    OPTIONS["predictions"].add_to(p)
    _add_ray(p)
    _add_common(p)

    p = _command(sub, "predict", "predict classes of images with a saved ensemble")
    p.add_argument("model")
    p.add_argument("images", nargs="+", help="image files and/or folders")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print JSON")
    out.add_argument("--csv", metavar="FILE", help="write a CSV (path, label, one column per class)")
    p.add_argument("--min-proba", type=float, default=None, metavar="M",
                   help="every probability at least M, rows still summing to 1 (default: the model's, 1e-06; "
                        "0: the raw probabilities)")
    add_options(p, ("predict_cache", "on_bad_image", "trust", "device"))
    _add_common(p)

    p = _command(sub, "evaluate", "score a saved ensemble on labelled hold-out images",
                 "Prints accuracy and log loss of the ensemble and of every base learner, a per-class\n"
                 "table (precision, recall, images, log loss) and the confusion (a matrix up to 10\n"
                 "classes, else the most confused pairs). Images that cannot be used follow\n"
                 "--on-bad-image and are listed.")
    p.add_argument("model")
    p.add_argument("data", help="class folders, a folder of label.id.jpg files, or a CSV of path,label")
    p.add_argument("--predictions", metavar="CSV", default=None,
                   help="write one row per image: path, label, predicted, probability, loss, p_<class>, skipped")
    p.add_argument("--report", metavar="DIR", default=None,
                   help="write DIR/evaluation.html (report.html's sections for the hold-out) and its "
                        "evaluation_*.png figures (default: no report)")
    add_options(p, ("predict_cache", "on_bad_image", "trust", "device"))
    _add_common(p)

    p = _command(sub, "submit", "write a validated Kaggle submission for a test folder")
    p.add_argument("model")
    p.add_argument("test_folder")
    p.add_argument("--out", default="submission.csv", help="the CSV to write (default: %(default)s)")
    p.add_argument("--sample", default=None, help="sample_submission.csv (ids and header to match)")
    p.add_argument("--kind", default="auto", choices=["auto", "binary", "label", "proba"],
                   help="binary: one probability column; label: class names; proba: one column per class; "
                        "auto: from --sample (default: %(default)s)")
    p.add_argument("--positive", default=None, help="class whose probability a binary file holds")
    add_options(p, ("eps", "predict_cache", "on_bad_image", "fill", "trust", "device"))
    _add_common(p)

    p = _command(sub, "report", "write report.html (one self-contained file) with figures for a saved run")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="folder to write into (default: RUN_DIR)")
    _add_common(p)

    p = _command(sub, "doctor", "find label issues, outliers, duplicates and test leaks in a model's training images",
                 "From what the fit left: out-of-fold probabilities (label issues, ambiguous images; cleanlab)\n"
                 "and cached pooled features (outliers, near duplicates, training copies of --test images;\n"
                 "no forward pass for cached images). Prints the findings, writes them all to --csv; pass an\n"
                 "edited copy to `stacker fit --exclude` to fit without them. Needs pip install 'stacker[doctor]'.")
    p.add_argument("model")
    p.add_argument("data", nargs="?", default=None,
                   help="the training images to check (default: every image the model was fitted on)")
    p.add_argument("--test", default=None, metavar="FOLDER", help="test images: training copies of them are leaks")
    p.add_argument("--csv", default="findings.csv", metavar="FILE",
                   help="write every finding here: path, id, kind, score, label, suggested, group "
                        "(default: %(default)s)")
    p.add_argument("--report", default=None, metavar="DIR",
                   help="write DIR/doctor.html with thumbnails of the top findings (default: no report)")
    p.add_argument("--threshold", type=float, default=DUPLICATE_THRESHOLD, metavar="S",
                   help="cosine similarity of pooled features from which two images are near copies "
                        "(default: %(default)s, calibrated on real photos)")
    p.add_argument("--top", type=int, default=30, metavar="N", help="rows to print (default: %(default)s)")
    add_options(p, ("cache", "trust"))
    _add_common(p)

    p = _command(sub, "export", "write a saved ensemble as one ONNX file (pixels in, probabilities out)",
                 "Every backbone, fold model, level 2, calibration and the min-proba floor in one graph that\n"
                 "plain ONNX Runtime runs (no stacker, TensorFlow or scikit-learn). Its metadata gives the\n"
                 "class names and the inputs: one per backbone input size, float32 NHWC RGB 0..255, resized\n"
                 "with Pillow's bilinear resize. A part ONNX cannot express exactly is refused by name.")
    p.add_argument("model")
    p.add_argument("out", help="the .onnx file to write")
    add_options(p, ("cache", "trust"))
    _add_common(p)

    p = _command(sub, "distill", "train one backbone on a saved ensemble's out-of-fold probabilities",
                 "The student is a normal saved model (predict, report, export) on one backbone: fitted on the\n"
                 "hard labels, then on the teacher's out-of-fold soft targets (and its predictions for\n"
                 "--unlabeled images). Its leaderboard compares it with the teacher and its hard-label self.")
    p.add_argument("model", help="the teacher: a saved ensemble")
    p.add_argument("data", help="the teacher's training images (class folders, label.id.jpg files or a CSV)")
    p.add_argument("--backbone", required=True, help="the student's backbone (a registered name, name@size)")
    p.add_argument("--out", required=True, help="directory for the saved student")
    p.add_argument("--unlabeled", metavar="FOLDER", default=None, help="unlabelled images taught with the teacher's "
                                                                       "predictions")
    p.add_argument("--hard-weight", type=float, default=0.0, metavar="A",
                   help="share of each image's weight on its own label, the rest on the soft targets "
                        "(default: %(default)s)")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T",
                   help="soften the teacher's probabilities to softmax(log p / T) (default: %(default)s)")
    p.add_argument("--merge-labels", action="store_true", help="merge labels that differ only in case or spaces")
    add_options(p, ("models", "weights", "image_size", "batch_size", "feature_dtype", "cache", "weights_dir",
                    "on_bad_image", "resize", "engine", "trust", "device"), defaults={"models": "logistic"})
    for title, names in GROUPS.items():  # the learner kinds' groups: --finetune makes a fine-tuned student
        if title not in ("stacking", "features", "device"):
            add_options(p, names, title)
    _add_common(p)

    p = _command(sub, "top5", "ImageNet top-5 classes of images",
                 "Needs the backbone's ImageNet classifier: the with-top weights, not the headless file "
                 "feature extraction uses.")
    p.add_argument("images", nargs="+")
    p.add_argument("--backbone", default="efficientnet_lite0", help="a registered backbone (default: %(default)s)")
    add_options(p, ("k", "weights", "weights_dir", "device"))
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_common(p)

    p = _command(sub, "extract", "fill the feature cache (one shard of it with --shard i/n)")
    p.add_argument("data", help="class folders, Kaggle-named files, a test folder or a CSV")
    add_options(p, ("backbones", *GROUPS["features"], "device"), defaults={"on_bad_image": "skip"},
                notes={"on_bad_image": "; extract leaves them out by default, so one bad file does not stop a shard"})
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="only part I of N contiguous parts of the image list (0-based), e.g. 0/4 on machine 1")
    _add_ray(p)
    _add_common(p)

    p = _command(sub, "cache", "list, remove or merge what a cache folder holds",
                 "Kinds: " + "; ".join(f"{k.name} ({k.description})" for k in cache_kinds())
                 + "; anything else is 'other' and never removed.")
    p.add_argument("action", choices=["ls", "rm", "prune", "merge"],
                   help="ls: every entry with its owner, size, age and state; rm: delete the entries of --backbone "
                        "and/or --kind (all entries without them, after you confirm or with --yes); prune: delete "
                        "what no current code can use (stale, partial, corrupt); merge: copy the feature rows of "
                        "SOURCES (shard caches) into --cache")
    p.add_argument("sources", nargs="*", help="for merge: cache directories made by `stacker extract --shard`")
    OPTIONS["cache"].add_to(p)
    p.add_argument("--backbone", default=None, help="only the entries of this backbone")
    p.add_argument("--kind", default=None, choices=_cache_kinds(), help="only entries of this kind")
    p.add_argument("--dry-run", action="store_true", help="rm, prune: list what would be removed, remove nothing")
    p.add_argument("-y", "--yes", action="store_true",
                   help="rm without --backbone or --kind: remove every entry without asking (needed when stdin is "
                        "not a terminal)")
    _add_common(p)
    return parser


# Arguments that name local folders or files (written, or loaded as a saved model): refused as URLs.
_LOCAL_ONLY = {"cache": "--cache", "model": "MODEL", "run_dir": "RUN_DIR", "csv": "--csv",
               "predictions": "--predictions", "report": "--report", "out": "--out"}


def _check_local(args) -> None:
    """A clear error for a URL where stacker needs a local folder or file (before anything runs)."""
    from stacker.data.storage import is_url

    for dest, shown in _LOCAL_ONLY.items():
        value = getattr(args, dest, None)
        if dest == "out" and args.command == "submit":
            continue  # a submission CSV may be written to a URL
        if isinstance(value, str) and is_url(value):
            raise ValueError(f"{shown} {value} is a URL; stacker reads images from URLs, but {shown} must be a "
                             "local (or mounted) path")


def _cache_kinds() -> tuple:
    from stacker.app.inventory import kinds

    return tuple(k for k in kinds() if k != "other")


def cmd_fit(args, out) -> int:
    import stacker
    from stacker.data.sources import load_images
    from stacker.io.model_dir import check_output_dir

    from stacker.app.options import ensemble_params

    check_output_dir(args.out, option="--out")  # before the fit, not after it
    print(f"cache: {os.path.abspath(args.cache)}")
    data = load_images(args.data, merge_labels=args.merge_labels)
    if args.exclude:
        from stacker.doctor import without

        n = len(data)
        data = without(data, args.exclude)
        print(f"--exclude {args.exclude}: {n - len(data)} images left out", file=out)
    if args.train_limit:
        data = data.head(args.train_limit, seed=args.seed)
    print(f"training images: {data!r}")
    ens = stacker.Ensemble(**ensemble_params(args, executor="ray" if _connect_ray(args) else "local"))
    ens.fit(data, unlabeled=args.unlabeled)
    ens.save(args.out)
    print(ens.leaderboard(), file=out)
    if not args.no_report:
        from stacker.app.report import report

        print(f"report: {report(args.out)}", file=out)
    print(f"saved ensemble to {args.out}", file=out)
    if args.predictions:
        from stacker.app.predictions import write_predictions

        print(f"out-of-fold predictions: {write_predictions(args.predictions, ens.oof_predictions(data))}", file=out)
    return 0


def cmd_predict(args, out) -> int:
    import stacker
    from stacker.data.inputs import expand_paths

    paths, unread = expand_paths(args.images)
    res = stacker.predict(paths, model=args.model, cache_dir=args.cache, on_bad_image=args.on_bad_image,
                          trusted=args.trust, min_proba=args.min_proba)
    res.unread.update(unread)
    rows = []
    for i, path in enumerate(paths):
        rows.append({"path": path, "label": res.labels[i],
                     **{c: (None if res.labels[i] is None else float(res.proba[i, j]))
                        for j, c in enumerate(res.classes)}})
    if args.json:
        print(json.dumps(rows, indent=1), file=out)
    elif args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["path", "label", *res.classes])
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {len(rows)} predictions to {args.csv}", file=out)
    else:
        print(_prediction_table(paths, res), file=out)
    for path, reason in res.unread.items():
        print(f"not read {path}: {reason}", file=sys.stderr)
    for row, reason in res.skipped.items():
        print(f"skipped {paths[row]}: {reason}", file=sys.stderr)
    return 0


def _prediction_table(paths, res) -> str:
    """Aligned columns under a header: path, predicted class, its probability; the runner-up from 3 classes.

    Numbers are right-aligned; a skipped image says SKIPPED, then why.
    """
    second = len(res.classes) > 2
    head = ["path", "predicted", "probability"] + (["second", "probability"] if second else [])
    rows, notes = [], []
    for i, path in enumerate(paths):
        if res.labels[i] is None:
            rows.append([path, "SKIPPED", "-"])
            notes.append(res.skipped.get(i, ""))
            continue
        top = sorted(range(len(res.classes)), key=lambda j: -res.proba[i, j])[:2 if second else 1]
        rows.append([path] + [v for j in top for v in (res.classes[j], _shown(res.proba[i, j]))])
        notes.append("")
    from stacker.level2.leaderboard import text_columns

    lines = text_columns([head, *rows], right=(2, 4))
    return "\n".join(f"{text}  {note}".rstrip() for text, note in zip(lines, ["", *notes]))


def cmd_evaluate(args, out) -> int:
    from stacker.app.evaluation import evaluate_model

    evaluate_model(args.model, args.data, out, cache_dir=args.cache, on_bad_image=args.on_bad_image,
                   trusted=args.trust, predictions=args.predictions, report_dir=args.report,
                   verbose=0 if args.quiet else 1)
    return 0


def _shown(p: float) -> str:
    """Four decimals, but ``>0.9999`` / ``<0.0001`` where rounding would print a certainty the model never gives."""
    return ">0.9999" if p >= 0.99995 else "<0.0001" if p < 0.00005 else f"{p:.4f}"


def cmd_submit(args, out) -> int:
    import stacker
    from stacker.data.sources import from_test_folder

    test = from_test_folder(args.test_folder)
    ens = stacker.Ensemble.load(args.model, trusted=args.trust, cache_dir=args.cache, verbose=0 if args.quiet else 1)
    proba, skipped = ens.predict_with_skipped(test, on_bad_image=args.on_bad_image)
    for path, reason in test.skipped.items():
        print(f"not read {path}: {reason}", file=sys.stderr)
    for row, reason in skipped.items():
        print(f"skipped id {test.ids[row]} ({test.paths[row]}): {reason}", file=sys.stderr)
    path = stacker.submission.write_csv(args.out, test.ids, proba, ens.classes_, kind=args.kind,
                                        positive=args.positive, eps=args.eps, sample_submission=args.sample,
                                        fill=_fill_value(args.fill), skipped=skipped)
    print(f"wrote {len(test)} rows to {path}" + (f" ({len(skipped)} filled with --fill {args.fill})" if skipped else ""),
          file=out)
    return 0


def _fill_value(text):
    if text is None or text == "uniform":
        return text
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--fill must be 'uniform' or a probability, got {text!r}") from None


def cmd_report(args, out) -> int:
    from stacker.app.report import report

    print(report(args.run_dir, args.out), file=out)
    return 0


def cmd_doctor(args, out) -> int:
    from stacker.doctor import diagnose
    from stacker.ensemble import Ensemble

    ens = Ensemble.load(args.model, trusted=args.trust, cache_dir=args.cache, verbose=0)
    found = diagnose(ens, args.data, args.test, threshold=args.threshold)
    print(found.table(args.top) if len(found) else "no findings", file=out)
    counts = ", ".join(f"{n} {k}" for k, n in found.counts().items() if n) or "nothing found"
    print(f"{found.n_images} images checked: {counts}; wrote {found.to_csv(args.csv)}", file=out)
    if args.report:
        from stacker.app.report import doctor_report

        print(f"report: {doctor_report(args.report, found)}", file=out)
    return 0


def cmd_export(args, out) -> int:
    from stacker.ensemble import Ensemble

    ens = Ensemble.load(args.model, trusted=args.trust, cache_dir=args.cache, verbose=0)
    info = ens.export_onnx(args.out)
    inputs = ", ".join(f"{i['name']} {tuple(i['shape'])}" for i in info["inputs"])
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB): {len(info['classes'])} classes; "
          f"inputs {inputs} (float32 RGB 0..255, Pillow bilinear resize); output probabilities", file=out)
    return 0


def cmd_distill(args, out) -> int:
    from stacker.app.options import extraction_params, kind_params
    from stacker.data.sources import load_images
    from stacker.distill import distill
    from stacker.ensemble import Ensemble
    from stacker.io.model_dir import check_output_dir

    check_output_dir(args.out, option="--out")
    teacher = Ensemble.load(args.model, trusted=args.trust, cache_dir=args.cache, verbose=0)
    student = distill(teacher, load_images(args.data, merge_labels=args.merge_labels), args.backbone,
                      unlabeled=args.unlabeled, models=args.models, hard_weight=args.hard_weight,
                      temperature=args.temperature, device=args.device, verbose=0 if args.quiet else 1,
                      **extraction_params(args), **kind_params(args))
    student.save(args.out)
    print(student.leaderboard(), file=out)
    from stacker.app.report import report

    print(f"report: {report(args.out)}", file=out)
    print(f"saved the student to {args.out}", file=out)
    return 0


def cmd_top5(args, out) -> int:
    from stacker.app.options import weights_arg
    from stacker.backbones.pretrained import top_k
    from stacker.data.inputs import expand_paths

    paths, _ = expand_paths(args.images)
    res = top_k(paths, backbone=args.backbone, k=args.k, weights=weights_arg(args.weights),
                weights_dir=args.weights_dir)
    if args.json:
        print(json.dumps([{"path": p, "top": [{"id": int(i), "name": n, "probability": float(q)}
                                              for i, n, q in res.rows(r)]} for r, p in enumerate(paths)], indent=1),
              file=out)
        return 0
    for r, p in enumerate(paths):
        print(p, file=out)
        for i, n, q in res.rows(r):
            print(f"  {q:7.4f}  {n} ({i})", file=out)
    return 0


def _parse_shard(text):
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like I/N (e.g. 0/4), got {text!r}") from None
    return i, n


def cmd_extract(args, out) -> int:
    from stacker.features.extractor import FeatureExtractor
    from stacker.data.sources import load_images
    from stacker.app.options import extraction_params
    from stacker.features.config import ExtractionConfig
    from stacker.learners.kinds import backbone_entry

    config = ExtractionConfig(**extraction_params(args))
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
        entry = backbone_entry(name)  # "name@size" (and "+flip") too, as in fit
        views = entry.pop("views", ("original",))
        base = FeatureExtractor(entry.pop("backbone"), **{**config.extractor_kwargs(), **entry},
                                verbose=0 if args.quiet else 1)
        for view in views:
            ext = base.with_view(view)
            if _connect_ray(args):
                from stacker.learners.distributed import fill_cache

                done = fill_cache(ext, data)
                part = f" ({done.computed} computed on {done.workers} Ray workers)"
            feats = ext.extract(data)
            print(f"{name}{'' if view == 'original' else f' (view {view})'}: {len(feats.kept)} images cached in "
                  f"{args.cache}{part}" + (f", {len(feats.skipped)} unusable" if feats.skipped else ""), file=out)
    return 0


def cmd_cache(args, out) -> int:
    from stacker.app import inventory
    from stacker.features.cache import FeatureCache

    if args.action == "merge":
        if not args.sources:
            raise ValueError("cache merge needs one or more source cache directories")
        added = FeatureCache(args.cache).merge(args.sources)
        for name, n in added.items():
            print(f"{name}: {n} rows added", file=out)
        print(f"merged {len(args.sources)} caches into {args.cache}: {sum(added.values())} rows", file=out)
        return 0
    if args.sources:
        raise ValueError(f"cache {args.action} takes no SOURCES (did you mean --cache {args.sources[0]}?)")
    found = inventory.select(inventory.scan(args.cache), backbone=args.backbone, kind=args.kind)
    if args.action == "ls":
        what = " ".join(f"--{k} {v}" for k, v in (("backbone", args.backbone), ("kind", args.kind)) if v)
        print(inventory.format_table(found, args.cache) if found else f"no entries{' for ' + what if what else ''} "
              f"in {args.cache}", file=out)
        return 0
    keep = [a for a in found if a.kind == "other" or (args.action == "prune" and not a.prunable)]
    doomed = [a for a in found if a not in keep]
    if args.dry_run:
        for a in doomed:
            print(f"would remove {a.kind:10s} {a.backbone or '-':20s} {os.path.relpath(a.path, args.cache)}", file=out)
        print(f"{len(doomed)} entries, {inventory.human_size(sum(a.bytes for a in doomed))}, would be removed "
              "(--dry-run: nothing removed)", file=out)
        return 0
    everything = args.action == "rm" and not (args.backbone or args.kind) and doomed
    if everything and not _confirm_remove_all(args, doomed):
        print("nothing removed", file=out)
        return 1
    freed = inventory.remove(doomed)
    for a in doomed:
        print(f"removed {a.kind:10s} {a.backbone or '-':20s} {os.path.relpath(a.path, args.cache)}", file=out)
    print(f"{len(doomed)} entries removed, {inventory.human_size(freed)} freed", file=out)
    unknown = [a for a in keep if a.state == "unknown" and a.kind != "other"]
    if args.action == "prune" and unknown:
        print(f"kept {len(unknown)} entries of unknown owner (written before results recorded it); "
              "`stacker cache rm --kind KIND` removes them", file=out)
    return 0


def _confirm_remove_all(args, doomed) -> bool:
    """Whether ``cache rm`` with no filter may empty the cache: --yes, else the answer on a terminal."""
    from stacker.app.inventory import human_size

    what = f"all {len(doomed)} entries ({human_size(sum(a.bytes for a in doomed))}) from {args.cache}"
    if args.yes:
        return True
    if not sys.stdin.isatty():
        raise ValueError(f"cache rm without --backbone or --kind would remove {what}, and stdin is not a terminal "
                         "to ask: pass --yes to remove them all, --backbone/--kind to remove fewer, or --dry-run "
                         "to list them")
    print(f"remove {what}? [y/N] ", end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip().lower() in ("y", "yes")


COMMANDS = {"fit": cmd_fit, "predict": cmd_predict, "evaluate": cmd_evaluate, "submit": cmd_submit,
            "report": cmd_report, "doctor": cmd_doctor, "export": cmd_export, "distill": cmd_distill,
            "top5": cmd_top5, "extract": cmd_extract,
            "cache": cmd_cache}


@contextlib.contextmanager
def _native_stderr_silenced(quiet: bool):
    """Under ``--quiet``, what native libraries write to file descriptor 2 (TensorFlow's start-up notices,
    which some CPUs get and others do not) goes nowhere; Python's ``sys.stderr`` keeps the real stderr,
    so errors are still shown."""
    if not quiet:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as sink:
            os.dup2(sink.fileno(), 2)
        real = os.fdopen(os.dup(saved), "w", buffering=1)
        old, sys.stderr = sys.stderr, real
        try:
            yield
        finally:
            sys.stderr = old
            real.close()
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def main(argv=None) -> int:
    try:  # $STACKER_PLUGINS may add backbones, learner kinds, combiners, options: before the parser
        load_plugins()
    except Exception as exc:  # noqa: BLE001 - a broken plugin is the user's to fix: one line, not a traceback
        print(f"stacker: error: a module in $STACKER_PLUGINS failed to import: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return 1
    args = build_parser().parse_args(argv)  # usage errors exit with 2
    if args.quiet:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    out = sys.stdout  # results; what the library prints while working is progress (stderr, or nothing)
    import warnings

    def terms(text: str) -> str:
        return cli_terms(text).replace("merge_labels=True", "--merge-labels")

    def show_warning(message, *_, **__):  # `stacker fit: warning: ...`, no source line (a user's, not a developer's)
        first, *rest = terms(str(message)).strip().splitlines() or [""]
        print("\n".join([f"stacker {args.command}: warning: {first}", *rest]), file=sys.stderr, flush=True)

    try:
        with warnings.catch_warnings(), _native_stderr_silenced(args.quiet), progress_output(args.quiet):
            warnings.showwarning = show_warning
            if getattr(args, "device", None):  # --device gpu without one fails here, before any work
                from stacker.features.device import select

                select(args.device)
            _check_local(args)
            return COMMANDS[args.command](args, out)
    except KeyboardInterrupt:
        print("stacker: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for users, the traceback with --debug
        if args.debug:
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"stacker {args.command}: error: {terms(message)}", file=sys.stderr)
        bad = getattr(exc, "paths", None)  # every unusable file (BadImageError), so one run finds them all
        if isinstance(bad, dict) and len(bad) > 1:
            print("\n".join(f"  {path}: {reason}" for path, reason in bad.items()), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
