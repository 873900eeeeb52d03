"""Kaggle submission CSVs: ids, probabilities and class names in, a validated CSV out.

Formats: ``"binary"`` -- ``id,label`` with P(positive class), the Dogs vs. Cats Redux
format; ``"label"`` -- one predicted class name per id; ``"proba"`` -- one probability
column per class. Ids are checked (unique, complete against an expected list or a
sample submission, sorted) and probabilities clipped to ``[eps, 1 - eps]``, since one
confident mistake can ruin a log-loss score. The sample submission and the CSV written
may be URLs (``s3://bucket/submission.csv``, see :mod:`stacker.data.storage`). Imports no model.
"""

from __future__ import annotations

import csv
import os

import numpy as np

from stacker.data import storage

__all__ = ["SubmissionError", "read_sample_ids", "write_csv"]


class SubmissionError(ValueError):
    """The submission would be rejected or scored wrongly; the message says why."""


def read_sample_ids(sample_csv) -> list:
    """Ids (first column) of a sample submission (a path or a URL), as ints when they all are."""
    with storage.open_file(storage.local_path(sample_csv), "r", newline="") as f:
        rows = list(csv.reader(f))
    if len(rows) < 2:
        raise SubmissionError(f"{sample_csv} has no data rows")
    ids = [r[0] for r in rows[1:]]
    return [int(i) for i in ids] if all(i.lstrip("-").isdigit() for i in ids) else ids


def _filled(proba, ids, classes, fill, skipped: dict, positive) -> np.ndarray:
    """Rows without a prediction refused (naming ids and reasons) or filled as asked."""
    missing = np.flatnonzero(~np.isfinite(proba).all(axis=1))
    if not missing.size:
        return proba
    if fill is None:
        detail = ", ".join(f"{ids[i]} ({skipped[i]})" if i in skipped else str(ids[i]) for i in missing[:5])
        raise SubmissionError(f"no prediction for {missing.size} ids: {detail}{', ...' if missing.size > 5 else ''}. "
                              "Every id needs a row: fix those files, or pass fill='uniform' (or a probability such as "
                              "fill=0.5) to write one for them")
    proba = proba.copy()
    if isinstance(fill, str):
        if fill != "uniform":
            raise SubmissionError(f"fill must be None, 'uniform' or a probability, got {fill!r}")
        proba[missing] = 1.0 / len(classes)
        return proba
    p = float(fill)
    if len(classes) != 2 or not 0 <= p <= 1:
        raise SubmissionError(f"a numeric fill is the positive class's probability in [0, 1] with two classes; "
                              f"got {fill!r} for {len(classes)} classes (use fill='uniform')")
    pos = 1 if positive is None else classes.index(str(positive)) if str(positive) in classes else 1
    proba[missing, pos], proba[missing, 1 - pos] = p, 1 - p
    return proba


def _sample_header(sample_csv) -> list:
    with storage.open_file(storage.local_path(sample_csv), "r", newline="") as f:
        return next(csv.reader(f))


def write_csv(path, ids, proba, classes, kind: str = "auto", positive=None, eps: float = 1e-3,
              expected_ids=None, sample_submission=None, id_column: str = "id", label_column: str = "label",
              fill=None, skipped=None) -> str:
    """Write a submission CSV after validating it.

    Parameters
    ----------
    path : path-like or URL
        Output file (written atomically: a local file is renamed into place, an object
        appears whole when it is closed).
    ids : sequence
        One id per row of ``proba``.
    proba : array, shape (n, n_classes)
    classes : list of str
        Column order of ``proba``.
    kind : {"auto", "binary", "label", "proba"}
        ``"auto"`` is ``"binary"`` for two classes, else ``"proba"``.
    positive : str, optional
        The class whose probability a binary file holds (default: the second class,
        e.g. ``"dog"`` of ``["cat", "dog"]``).
    eps : float
        Probabilities are clipped to ``[eps, 1 - eps]`` (0 disables clipping).
    expected_ids : sequence, optional
        Every id the competition expects; missing or extra ids are an error.
    fill : None, "uniform" or float
        What to write for rows without a prediction (NaN: images skipped as
        unusable). None (default) refuses them, naming the ids, so no id is lost
        silently; ``"uniform"`` writes 1/k for every class; a float is the positive
        class's probability (two classes only).
    skipped : dict, optional
        Row -> reason, to name why rows have no prediction in the error.
    sample_submission : path, optional
        A sample submission: its ids are ``expected_ids`` and, for ``binary``, its
        header names the columns.

    Returns
    -------
    str
        The path written.
    """
    proba = np.asarray(proba, dtype=np.float64)
    ids = list(ids)
    classes = [str(c) for c in classes]
    if proba.ndim != 2 or proba.shape[1] != len(classes):
        raise SubmissionError(f"proba has shape {proba.shape}, expected (n, {len(classes)}) for classes {classes}")
    if len(ids) != len(proba):
        raise SubmissionError(f"{len(ids)} ids for {len(proba)} rows of probabilities")
    proba = _filled(proba, ids, classes, fill, skipped or {}, positive)
    if len(set(ids)) != len(ids):
        dup = sorted({str(i) for i in ids if ids.count(i) > 1})[:5]
        raise SubmissionError(f"duplicate ids: {dup}")
    if not 0 <= eps < 0.5:
        raise SubmissionError(f"eps must be in [0, 0.5), got {eps}")
    if sample_submission is not None:
        expected_ids = read_sample_ids(sample_submission)
        header = _sample_header(sample_submission)
        if len(header) == 2:
            id_column, label_column = header
    if expected_ids is not None:
        exp = [type(ids[0])(e) if ids and isinstance(ids[0], int) else e for e in expected_ids]
        missing = sorted(set(map(str, exp)) - set(map(str, ids)))
        extra = sorted(set(map(str, ids)) - set(map(str, exp)))
        if missing or extra:
            raise SubmissionError(f"ids do not match the expected ones: missing {missing[:5]} "
                                  f"({len(missing)}), unexpected {extra[:5]} ({len(extra)})")
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    ids = [ids[i] for i in order]
    proba = proba[order]
    if kind == "auto":
        kind = "binary" if len(classes) == 2 else "proba"
    if eps:
        proba = np.clip(proba, eps, 1 - eps)
    if kind == "binary":
        if len(classes) != 2:
            raise SubmissionError(f"a binary submission needs two classes, got {len(classes)}")
        positive = classes[1] if positive is None else str(positive)
        if positive not in classes:
            raise SubmissionError(f"positive class {positive!r} is not one of {classes}")
        header = [id_column, label_column]
        rows = [[i, f"{p:.6f}"] for i, p in zip(ids, proba[:, classes.index(positive)])]
    elif kind == "label":
        header = [id_column, label_column]
        rows = [[i, classes[j]] for i, j in zip(ids, proba.argmax(axis=1))]
    elif kind == "proba":
        header = [id_column] + classes
        rows = [[i] + [f"{p:.6f}" for p in row] for i, row in zip(ids, proba)]
    else:
        raise SubmissionError(f"kind must be 'auto', 'binary', 'label' or 'proba', got {kind!r}")
    path = storage.local_path(path)
    if storage.is_url(path):
        with storage.open_file(path, "w", newline="") as f:
            _write_rows(f, header, rows)
        return path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        _write_rows(f, header, rows)
    os.replace(tmp, path)
    return path


def _write_rows(f, header: list, rows: list) -> None:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)
