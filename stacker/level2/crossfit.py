"""Out-of-fold outputs on given folds: a combiner's, and its calibration's.

Each fold's output comes from a model fitted on the other folds only, so level 2 is
scored (and stack2's second layer fitted) on predictions no model made for its own rows.
"""

from __future__ import annotations

import numpy as np

from stacker.learners.zoo import fit_weighted
from stacker.level2.arrays import StackedBlocks, oof_dtype, predict_rows, row_blocks, take_rows
from stacker.level2.calibration import TemperatureScaler, calibrate
from stacker.level2.registry import make_combiner

__all__ = ["calibrated_parts", "cross_calibrate", "cross_fit", "cross_fit_true_class", "fit_on"]


def fit_on(est, Z, y, rows=None, sample_weight=None):
    """``est`` fitted on rows ``rows`` of ``Z`` (all by default), with those rows' ``sample_weight`` when given.

    Estimators that read row views (``reads_row_views``, the built-in probability
    combiners) get ``Z[rows]`` without a copy when ``Z`` is a
    :class:`~stacker.level2.arrays.StackedBlocks`; any other gets an array.
    """
    y = np.asarray(y)
    if rows is None:
        X = Z if getattr(est, "reads_row_views", False) else np.asarray(Z)
        return fit_weighted(est, X, y, sample_weight)
    X = Z[rows] if getattr(est, "reads_row_views", False) else take_rows(Z, rows)
    return fit_weighted(est, X, y[rows], None if sample_weight is None else sample_weight[rows])


def cross_fit(item, Z, y, folds, n_learners, k, seed, on_fold=None, sample_weight=None) -> np.ndarray:
    """Out-of-fold probabilities of a combiner (a name or an estimator) over ``folds`` (fit on the others).

    ``on_fold(i, train_rows, val_rows)``, when given, is called before each fold's fit.
    The array is float64, or float32 past :data:`~stacker.level2.arrays.OOF_FLOAT64_VALUES`.
    """
    oof = np.zeros((len(y), k), oof_dtype(len(y), k))
    for va, m in _fold_models(item, Z, y, folds, n_learners, seed, on_fold, sample_weight):
        oof[va] = predict_rows(m, Z, k, va, oof.dtype)
    return oof


def cross_fit_true_class(item, Z, y, folds, n_learners, k, seed, sample_weight=None) -> np.ndarray:
    """Each row's out-of-fold probability of its own class, ``(n,)`` float64 (what greedy selection reads).

    ``cross_fit(...)[rows, y]`` without the ``(n, k)`` array.
    """
    out = np.zeros(len(y))
    for va, m in _fold_models(item, Z, y, folds, n_learners, seed, sample_weight=sample_weight):
        for b in row_blocks(len(va), Z.shape[1]):
            rows = va[b]
            out[rows] = predict_rows(m, Z, k, rows)[np.arange(len(rows)), y[rows]]
    return out


def _fold_models(item, Z, y, folds, n_learners, seed, on_fold=None, sample_weight=None):
    """``(val_rows, model fitted on the other rows, weighted by ``sample_weight`` when given)`` per fold."""
    y = np.asarray(y)
    for i, (tr, va) in enumerate(folds):
        if on_fold is not None:
            on_fold(i, tr, va)
        yield va, fit_on(make_combiner(item, n_learners, seed + i), Z, y, tr, sample_weight)


def calibrated_parts(oof, y, folds, sample_weight=None):
    """``(rows, calibrated probabilities)`` a block at a time, each fold's calibration fitted on the other folds.

    The calibration reads its training rows through a row view (no copy of them).
    """
    y = np.asarray(y)
    for tr, va in folds:
        scaler = TemperatureScaler().fit(StackedBlocks([oof], tr, oof.dtype), y[tr],
                                         None if sample_weight is None else sample_weight[tr])
        for b in row_blocks(len(va), oof.shape[1]):
            yield va[b], calibrate(oof[va[b]], scaler.temperature_, scaler.floor_)


def cross_calibrate(oof, y, folds, sample_weight=None) -> np.ndarray:
    """Calibrated out-of-fold probabilities (in ``oof``'s dtype): each fold's calibration fitted on the other folds."""
    out = np.zeros_like(oof)
    for rows, part in calibrated_parts(oof, y, folds, sample_weight):
        out[rows] = part
    return out
