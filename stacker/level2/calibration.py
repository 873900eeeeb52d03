"""Calibration after the combiner: a temperature and a floor on probabilities, fitted by log loss.

:class:`TemperatureScaler` fits them; :func:`calibrate` applies them (a fitted level 2
keeps only the two numbers). Fitted out of fold, in :mod:`stacker.level2.crossfit`.
:func:`with_min_proba` is the last step of every ensemble prediction: no probability is
exactly 0 or 1 unless the user asks (``min_proba=0``).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize
from scipy.special import softmax
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from stacker.io.persist import trusted
from stacker.level2.arrays import EPS, row_blocks

__all__ = ["MIN_PROBA", "TemperatureScaler", "calibrate", "check_min_proba", "with_min_proba"]

# Every probability an ensemble predicts is at least this (Ensemble's ``min_proba``): one
# confidently wrong 0 would cost infinite log loss; 1e-6 caps it at about 13.8.
MIN_PROBA = 1e-6


@trusted
class TemperatureScaler(BaseEstimator):
    """A temperature and a floor on probabilities, fitted by minimising log loss.

    ``p' = (1 - floor) * softmax(log p / T) + floor / k``. ``T > 1`` softens
    over-confident probabilities, ``T < 1`` sharpens under-confident ones. The floor
    accounts for label noise: in a data set of photos a few images are mislabelled or
    ambiguous, and one confidently wrong probability of 1e-6 costs as much log loss as
    hundreds of good predictions; the floor caps that cost at what the data supports.

    Parameters
    ----------
    floor : bool
        Also fit the floor (at most 5% of the probability mass); ``False`` fits ``T`` only.

    Attributes
    ----------
    temperature_ : float
    floor_ : float
    """

    def __init__(self, floor=True):
        self.floor = floor

    def fit(self, proba, y):
        logP = np.clip(np.asarray(proba, dtype=np.float64), EPS, None)
        np.log(logP, out=logP)
        y = np.asarray(y)
        k = logP.shape[1]
        blocks = [(b, np.arange(b.stop - b.start), y[b]) for b in row_blocks(len(y))]
        p = np.empty(len(y))

        def nll(theta):  # the softmax a block of rows at a time (row by row: the same numbers)
            eps = theta[1] if self.floor else 0.0
            for b, rows, y_b in blocks:
                p[b] = softmax(logP[b] / np.exp(theta[0]), axis=1)[rows, y_b]
            return -np.mean(np.log(np.clip((1 - eps) * p + eps / k, EPS, None)))

        best = min((minimize(nll, [t0, e0], method="L-BFGS-B", bounds=[(-4.0, 4.0), (0.0, 0.05)])
                    for t0 in (0.0,) for e0 in ((1e-3, 1e-2) if self.floor else (0.0,))), key=lambda r: r.fun)
        self.temperature_ = float(np.exp(best.x[0]))
        self.floor_ = float(best.x[1]) if self.floor else 0.0
        return self

    def transform(self, proba):
        check_is_fitted(self, "temperature_")
        return calibrate(proba, self.temperature_, self.floor_)


def calibrate(proba, temperature: float = 1.0, floor: float = 0.0) -> np.ndarray:
    """Probabilities at a temperature, mixed with ``floor`` of uniform mass (defaults: unchanged)."""
    proba = np.asarray(proba, dtype=np.float64)
    if temperature == 1.0 and not floor:
        return proba
    out = np.empty(proba.shape)
    for b in row_blocks(len(proba)):
        part = softmax(np.log(np.clip(proba[b], EPS, None)) / temperature, axis=1) if temperature != 1.0 else proba[b]
        out[b] = (1 - floor) * part + floor / proba.shape[1] if floor else part
    return out


def with_min_proba(proba, min_proba: float = MIN_PROBA) -> np.ndarray:
    """Every probability at least ``min_proba``, rows still summing to 1: ``(1 - k m) p + m``.

    Mixing with the uniform distribution keeps the order of the classes and moves no
    probability by more than ``k m``; ``min_proba=0`` returns ``proba`` unchanged. NaN
    rows (skipped images) stay NaN.

    Raises
    ------
    ValueError
        Unless ``0 <= min_proba < 1 / k`` (at ``1 / k`` every row would be uniform).
    """
    proba = np.asarray(proba, dtype=np.float64)
    k = proba.shape[-1]
    m = check_min_proba(min_proba, k)
    return proba if m == 0.0 else (1.0 - k * m) * proba + m


def check_min_proba(min_proba, k: int) -> float:
    """``min_proba`` as a float, or a ValueError unless ``0 <= min_proba < 1 / k``."""
    m = float(min_proba) if isinstance(min_proba, (int, float, np.number)) and not isinstance(min_proba, bool) else None
    if m is None or not 0.0 <= m < 1.0 / k:
        raise ValueError(f"min_proba must be a number >= 0 and below 1/{k} ({k} classes), got {min_proba!r}")
    return m
