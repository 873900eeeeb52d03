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
from stacker.level2.arrays import EPS, StackedBlocks, row_blocks, spread_rows, take_rows

__all__ = ["CALIBRATION_VALUES", "MIN_PROBA", "TemperatureScaler", "calibrate", "check_min_proba", "with_min_proba"]

# a calibration fits on evenly spread rows past this many probabilities (rows x classes): all rows of
# a million images of ten classes, 16,777 of 1,000 classes (134 MB of float64 log-probabilities)
CALIBRATION_VALUES = 1 << 24

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

    def fit(self, proba, y, sample_weight=None):
        """Fit ``T`` and the floor on ``proba`` (an array, or a row view of one: ``StackedBlocks``), by the
        ``sample_weight``-weighted log loss when given.

        Past :data:`CALIBRATION_VALUES` probabilities (a thousand classes) on rows spread
        evenly over the input: two parameters need no more. The loss needs each row's
        true-class probability at ``T`` only, so a step that moves the floor alone reuses it.
        """
        proba = proba if isinstance(proba, StackedBlocks) else np.asarray(proba)
        n, k = proba.shape
        rows = spread_rows(n, CALIBRATION_VALUES // k)
        logP = np.empty((len(rows), k))
        for b in row_blocks(len(rows), k):
            np.log(np.clip(take_rows(proba, rows[b]).astype(np.float64, copy=False), EPS, None), out=logP[b])
        y = np.asarray(y)[rows]
        w = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)[rows]
        top = logP.max(axis=1, keepdims=True)  # max(logP / T) is max(logP) / T, to the last bit (T > 0)
        blocks = [(b, np.arange(b.stop - b.start), y[b]) for b in row_blocks(len(y), k)]
        z = np.empty((blocks[0][1].size, k))
        recent = {}  # log T -> true-class probabilities (the last few: finite differences step one parameter)

        def true_class(log_t):  # softmax(logP / T)[y] as scipy computes it, a block of rows at a time, in place
            if log_t not in recent:
                if len(recent) > 2:
                    recent.clear()
                recent[log_t] = p = np.empty(len(y))
                t = np.exp(log_t)
                for b, r, y_b in blocks:
                    e = np.divide(logP[b], t, out=z[:len(r)])
                    e -= top[b] / t
                    np.exp(e, out=e)
                    p[b] = e[r, y_b] / e.sum(axis=1)
            return recent[log_t]

        def nll(theta):
            eps = theta[1] if self.floor else 0.0
            return -np.average(np.log(np.clip((1 - eps) * true_class(theta[0]) + eps / k, EPS, None)), weights=w)

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
    proba = np.asarray(proba)
    if temperature == 1.0 and not floor:
        return np.asarray(proba, dtype=np.float64)
    out = np.empty(proba.shape)
    for b in row_blocks(len(proba), proba.shape[1]):  # float64 a block at a time
        part = np.asarray(proba[b], dtype=np.float64)
        part = softmax(np.log(np.clip(part, EPS, None)) / temperature, axis=1) if temperature != 1.0 else part
        out[b] = (1 - floor) * part + floor / proba.shape[1] if floor else part
    return out


def with_min_proba(proba, min_proba: float = MIN_PROBA) -> np.ndarray:
    """Every probability at least ``min_proba``, rows still summing to 1: ``(1 - k m) p + m``.

    Mixing with the uniform distribution keeps the order of the classes and moves no
    probability by more than ``k m``; ``min_proba=0`` returns ``proba`` unchanged. NaN
    rows (skipped images) stay NaN. Float32 stays float32 (out-of-fold probabilities of
    a thousand classes), anything else becomes float64.

    Raises
    ------
    ValueError
        Unless ``0 <= min_proba < 1 / k`` (at ``1 / k`` every row would be uniform).
    """
    proba = np.asarray(proba)
    proba = proba if proba.dtype in (np.float32, np.float64) else proba.astype(np.float64)
    k = proba.shape[-1]
    m = check_min_proba(min_proba, k)
    if m == 0.0:
        return proba
    out = np.multiply(proba, 1.0 - k * m)  # (1 - k m) p + m, in the probabilities' precision
    out += m
    return out


def check_min_proba(min_proba, k: int) -> float:
    """``min_proba`` as a float, or a ValueError unless ``0 <= min_proba < 1 / k``."""
    m = float(min_proba) if isinstance(min_proba, (int, float, np.number)) and not isinstance(min_proba, bool) else None
    if m is None or not 0.0 <= m < 1.0 / k:
        raise ValueError(f"min_proba must be a number >= 0 and below 1/{k} ({k} classes), got {min_proba!r}")
    return m
