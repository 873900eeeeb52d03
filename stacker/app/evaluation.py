"""``stacker evaluate``: how a saved ensemble does on labelled images it never saw.

The out-of-fold scores of ``fit`` are an estimate; a labelled hold-out set is the check.
:func:`evaluate_model` predicts it once (:meth:`stacker.Ensemble.evaluate` with
``per_image=True``) and prints accuracy and log loss of the ensemble and of every base
learner, a per-class table and the confusion (a matrix for few classes, the most
confused pairs for many). Images that could not be used are listed, never dropped
silently; ``predictions`` writes one row per image (:mod:`stacker.app.predictions`) and
``report_dir`` an ``evaluation.html`` with report.html's sections for the hold-out
(:func:`stacker.app.report.evaluation_report`).
"""

from __future__ import annotations

import os
import sys

import numpy as np

from stacker.level2.leaderboard import text_columns

__all__ = ["MAX_CLASS_ROWS", "MAX_MATRIX_CLASSES", "evaluate_model", "format_confusion", "format_per_class",
           "format_scores"]

MAX_CLASS_ROWS = 20  # more classes: the per-class table shows the costliest ones
MAX_MATRIX_CLASSES = 10  # more classes: the most confused pairs instead of a matrix


def _columns(rows, left: int = 1) -> list[str]:
    """Rows of strings as aligned text columns (the first ``left`` columns left-aligned)."""
    return [line.rstrip() for line in text_columns(rows, right=range(left, len(rows[0])))]


def format_scores(scores: dict) -> str:
    """Accuracy (top-5 past 5 classes) and log loss per learner, the ensemble last."""
    top5 = any("top5_accuracy" in s for s in scores.values())
    rows = [["learner", "accuracy", *(["top5"] if top5 else []), "log_loss"]]
    for name, s in scores.items():
        rows.append([name, f"{s['accuracy']:.4f}", *([f"{s.get('top5_accuracy', 0):.4f}"] if top5 else []),
                     f"{s['log_loss']:.4f}"])
    return "\n".join(_columns(rows))


def format_per_class(stats: dict, classes, limit: int = MAX_CLASS_ROWS) -> str:
    """The per-class table (:func:`stacker.app.report.per_class`); past ``limit`` classes, the costliest ones."""
    order = list(range(len(classes)))
    head = "per class (ensemble):"
    if len(classes) > limit:
        loss = np.nan_to_num(stats["log_loss"], nan=-1.0)
        order = sorted(order, key=lambda i: -loss[i])[:limit]
        head = (f"per class (ensemble): the {limit} of {len(classes)} classes with the highest log loss "
                "(--predictions and --report have every class):")
    rows = [["class", "images", "precision", "recall", "log_loss"]]
    for i in order:
        loss = stats["log_loss"][i]
        rows.append([str(classes[i]), str(int(stats["support"][i])), f"{stats['precision'][i]:.3f}",
                     f"{stats['recall'][i]:.3f}", "-" if np.isnan(loss) else f"{loss:.4f}"])
    return "\n".join([head, *_columns(rows)])


def format_confusion(cm, classes, max_classes: int = MAX_MATRIX_CLASSES, n_pairs: int = 10) -> str:
    """Counts as a matrix (rows true, columns predicted) for few classes, else the most confused pairs."""
    from stacker.app.report import confused_pairs

    if len(classes) <= max_classes:
        rows = [["true \\ predicted", *map(str, classes)]]
        rows += [[str(c), *(str(int(v)) for v in cm[i])] for i, c in enumerate(classes)]
        return "\n".join(["confusion (rows: true class, columns: predicted):", *_columns(rows)])
    pairs = confused_pairs(cm, classes)[:n_pairs]
    if not pairs:
        return "confusion: no image was misclassified"
    rows = [["count", "true", "predicted as"], *([str(n), str(t), str(p)] for n, t, p in pairs)]
    return "\n".join([f"most confused pairs ({len(pairs)} of {len(confused_pairs(cm, classes))}):",
                      *_columns(rows, left=0)])


def _summary(data, n_scored: int, skipped: dict) -> str:
    counts = np.bincount(data.y, minlength=len(data.classes))
    per = ", ".join(f"{c} {n}" for c, n in zip(data.classes[:6], counts[:6])) + (", ..." if len(counts) > 6 else "")
    line = f"hold-out: {len(data)} images ({per}); {n_scored} scored"
    return line + (f", {len(skipped)} skipped (listed on stderr)" if skipped else "")


def evaluate_model(model, images, out=None, cache_dir=None, on_bad_image=None, trusted=None, predictions=None,
                   report_dir=None, verbose: int = 0) -> dict:
    """Score the ensemble saved in ``model`` on labelled ``images``; print the results to ``out``.

    Parameters
    ----------
    model : path
        A saved ensemble directory.
    images : path or ImageSet
        Class folders, ``label.id.ext`` names or a CSV of ``path,label``.
    out : file, optional
        Where results go (default: stdout); skipped images are listed on stderr.
    cache_dir, on_bad_image, trusted
        As for ``stacker predict``.
    predictions : path, optional
        CSV with one row per image (:func:`stacker.app.predictions.prediction_rows`).
    report_dir : path, optional
        Folder for ``evaluation.html`` and its ``evaluation_*.png`` figures.

    Returns
    -------
    dict
        Name -> scores, as :meth:`stacker.Ensemble.evaluate`.
    """
    import stacker
    from stacker.data.sources import load_images
    from stacker.app.report import confusion_counts, per_class

    out = out or sys.stdout
    data = load_images(images)
    ens = stacker.Ensemble.load(model, trusted=trusted, cache_dir=cache_dir, verbose=verbose)
    scores, res = ens.evaluate(data, on_bad_image=on_bad_image, per_image=True)
    skipped = {data.paths[r]: reason for r, reason in res["skipped"].items()}
    kept = np.flatnonzero(~np.isnan(res["proba"]).any(axis=1))
    y, proba, classes = res["y"][kept], res["proba"][kept], list(ens.classes_)
    for text in (_summary(data, len(kept), skipped), "", format_scores(scores), "",
                 format_per_class(per_class(y, proba, len(classes)), classes), "",
                 format_confusion(confusion_counts(y, proba.argmax(axis=1), len(classes)), classes)):
        print(text, file=out)
    for path, reason in {**data.skipped, **skipped}.items():
        print(f"skipped {path}: {reason}", file=sys.stderr)
    if predictions:
        _write_predictions(predictions, data, res, classes, skipped, out)
    if report_dir:
        _write_report(report_dir, model, images, res, kept, classes, scores, {**data.skipped, **skipped}, out)
    return scores


def _write_predictions(path, data, res, classes, skipped, out) -> None:
    from stacker.app.predictions import prediction_rows, write_predictions

    rows = prediction_rows(data.paths, res["proba"], classes, labels=data.labels, skipped=skipped)
    print(f"wrote {len(rows)} predictions to {write_predictions(path, rows)}", file=out)


def _write_report(report_dir, model, images, res, kept, classes, scores, skipped, out) -> None:
    from stacker.app.report import evaluation_report

    probas = {"ensemble": res["proba"][kept], **{n: p[kept] for n, p in res["learners"].items()}}
    named = isinstance(images, (str, os.PathLike))
    title = (f"stacker evaluation: {os.path.basename(os.path.abspath(model))} on "
             f"{os.path.basename(os.path.abspath(images)) if named else 'a hold-out set'}")
    path = evaluation_report(report_dir, res["y"][kept], probas, classes, [res["images"].paths[i] for i in kept],
                             scores, skipped, title)
    print(f"report: {path}", file=out)
