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

__all__ = ["LOSS_CLIP", "prediction_rows", "write_predictions"]

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
            row["fold"] = int(folds[i])
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
