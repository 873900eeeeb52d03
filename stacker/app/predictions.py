"""Per-image predictions as a table a spreadsheet sorts: ``fit --predictions`` and ``evaluate --predictions``.

One row per image: its path, its label, the predicted class, the probability of that
class, the image's log loss (``-log p(label)``, the cost it adds to the score) and one
``p_<class>`` column per class. Out of fold (fit) a ``fold`` column says in which fold
the image was held out; images that could not be used keep their row, with the reason
in ``skipped`` and empty probabilities, so nothing disappears from the table.
"""

from __future__ import annotations

import csv
import math
import os

import numpy as np

__all__ = ["LOSS_CLIP", "out_of_fold_rows", "prediction_rows", "write_predictions"]

LOSS_CLIP = 1e-15  # the same clip as the scores (stacker.level2.arrays.score)


def prediction_rows(paths, proba, classes, labels=None, folds=None, skipped=None) -> list[dict]:
    """One dict per image (see the module docstring), rows in the order of ``paths``.

    ``proba`` has one row per path (NaN rows for unusable images); ``labels`` are class
    names (None for unlabelled images); ``folds`` the fold each row was held out in;
    ``skipped`` maps path -> reason for images without probabilities.
    """
    proba = np.asarray(proba, dtype=np.float64)
    classes = [str(c) for c in classes]
    if proba.shape != (len(paths), len(classes)):
        raise ValueError(f"probabilities of shape {proba.shape} for {len(paths)} images of {len(classes)} classes")
    index = {c: j for j, c in enumerate(classes)}
    skipped = skipped or {}
    rows = []
    for i, path in enumerate(paths):
        label = None if labels is None else labels[i]
        row = {"path": path, "label": label}
        if folds is not None:
            row["fold"] = None if folds[i] is None else int(folds[i])
        p = proba[i]
        if np.isnan(p).any():
            row.update(predicted=None, probability=None, loss=None,
                       skipped=skipped.get(path, "not predicted"), **{f"p_{c}": None for c in classes})
        else:
            top = int(p.argmax())
            loss = None if label is None or label not in index else -math.log(max(float(p[index[label]]), LOSS_CLIP))
            row.update(predicted=classes[top], probability=float(p[top]), loss=loss, skipped=None,
                       **{f"p_{c}": float(v) for c, v in zip(classes, p)})
        rows.append(row)
    return rows


def out_of_fold_rows(paths, y, proba, classes, folds=None, skipped=None, labels=None) -> list[dict]:
    """:func:`prediction_rows` of a fitted ensemble's training images, then one row per skipped file.

    ``y`` are class indices and ``proba`` the out-of-fold probabilities of ``paths`` (the
    images used); ``folds`` the ensemble's ``(train_rows, val_rows)`` pairs (None: no fold
    column); ``skipped`` maps path -> reason; ``labels`` path -> class name of skipped
    files, where known. Paths are made absolute, so the table says which file each row is.
    """
    classes = [str(c) for c in classes]
    skipped = {os.path.abspath(p): reason for p, reason in (skipped or {}).items()}
    fold_of = None
    if folds is not None:
        fold_of = np.full(len(paths), -1)
        for f, (_, val) in enumerate(folds):
            fold_of[np.asarray(val)] = f
        fold_of = [int(f) for f in fold_of] + [None] * len(skipped)
    labels = {os.path.abspath(p): None if c is None else str(c) for p, c in (labels or {}).items()}
    proba = np.vstack([np.asarray(proba, dtype=np.float64).reshape(len(paths), len(classes)),
                       np.full((len(skipped), len(classes)), np.nan)])
    return prediction_rows([os.path.abspath(p) for p in paths] + list(skipped), proba, classes,
                           [classes[int(i)] for i in y] + [labels.get(p) for p in skipped], fold_of, skipped)


def write_predictions(path, rows: list[dict]) -> str:
    """Write :func:`prediction_rows` as a CSV (empty cells for None, floats exact); returns the path written."""
    path = os.fspath(path)
    if not rows:
        raise ValueError("no predictions to write")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else (repr(v) if isinstance(v, float) else v)
                             for k, v in row.items()})
    return path
