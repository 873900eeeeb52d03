"""Out-of-fold outputs on given folds: a combiner's, and its calibration's.

Each fold's output comes from a model fitted on the other folds only, so level 2 is
scored (and stack2's second layer fitted) on predictions no model made for its own rows.
"""

from __future__ import annotations

import numpy as np

from stacker.level2.arrays import predict_rows
from stacker.level2.calibration import TemperatureScaler
from stacker.level2.registry import make_combiner

__all__ = ["cross_calibrate", "cross_fit"]


def cross_fit(item, Z, y, folds, n_learners, k, seed, on_fold=None) -> np.ndarray:
    """Out-of-fold probabilities of a combiner (a name or an estimator) over ``folds`` (fit on the others).

    ``on_fold(i, train_rows, val_rows)``, when given, is called before each fold's fit.
    """
    oof = np.zeros((len(y), k))
    for i, (tr, va) in enumerate(folds):
        if on_fold is not None:
            on_fold(i, tr, va)
        m = make_combiner(item, n_learners, seed + i).fit(Z[tr], y[tr])
        oof[va] = predict_rows(m, Z, k, va)
    return oof


def cross_calibrate(oof, y, folds) -> np.ndarray:
    """Calibrated out-of-fold probabilities: each fold's calibration fitted on the other folds."""
    out = np.zeros_like(oof)
    for tr, va in folds:
        out[va] = TemperatureScaler().fit(oof[tr], y[tr]).transform(oof[va])
    return out
