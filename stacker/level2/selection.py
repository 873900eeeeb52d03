"""Choosing level 2: every candidate scored out of fold on the ensemble's folds, the best refitted.

:func:`fit_level2` cross-validates each candidate combiner over the ensemble's folds, also
with a temperature and floor (:class:`~stacker.level2.calibration.TemperatureScaler`)
fitted out of fold, picks the lowest cross-validated log loss and falls back to the best
single learner if no combiner beats it, so the ensemble's out-of-fold log loss is never
worse than its best member's. The result is a :class:`Level2`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from stacker.level2.arrays import align_proba, oof_dtype, row_blocks, score, score_blocks, take_rows
from stacker.level2.calibration import TemperatureScaler, calibrate
from stacker.level2.combiners import SingleBest
from stacker.level2.crossfit import calibrated_parts, cross_calibrate, cross_fit, fit_on
from stacker.level2.registry import combiner_label, combiner_names, learner_weights, make_combiner

__all__ = ["Level2", "fit_level2"]


@dataclass
class Level2:
    """A fitted level 2: the chosen combiner, its calibration, and how every candidate scored.

    ``predict_proba(Z)`` applies the combiner to stacked base probabilities, then the
    temperature and floor. ``table`` maps each candidate (``"greedy"``, ``"greedy+T"``
    with calibration...) to its cross-validated log loss and accuracy on the ensemble's folds.
    """

    name: str
    combiner: object
    n_classes: int
    oof_proba: np.ndarray
    temperature: float = 1.0
    floor: float = 0.0
    table: dict = field(default_factory=dict)

    def predict_proba(self, Z) -> np.ndarray:
        out = np.empty((len(Z), self.n_classes))
        for block in row_blocks(len(Z), Z.shape[1]):
            proba = align_proba(self.combiner, self.combiner.predict_proba(take_rows(Z, block)), self.n_classes)
            out[block] = calibrate(proba, self.temperature, self.floor)
        return out

    @property
    def weights(self) -> np.ndarray | None:
        return learner_weights(self.combiner)


def fit_level2(Z, y, folds, meta="auto", n_learners=1, k=2, random_state=0, calibration=True,
               member_oof=None, on_fold=None, sample_weight=None) -> Level2:
    """Cross-validate every candidate combiner on the folds, pick the best, refit it on all rows.

    Parameters
    ----------
    Z : ndarray (n, columns) or StackedBlocks
        The level-2 inputs: out-of-fold outputs of the base learners only.
    y : ndarray (n,)
        Class indices.
    folds : list of (train_rows, val_rows)
        The ensemble's folds: every candidate's score is out of fold on them.
    meta : "auto", name, list of names or estimator
    n_learners, k : int
        Probability blocks in ``Z`` and classes per block.
    calibration : bool
        Also try each candidate followed by a calibration (temperature and floor,
        :class:`TemperatureScaler`) fitted out of fold.
    member_oof : list of ndarray, optional
        Each learner's own out-of-fold probabilities: if no candidate beats the best of
        them, the best learner alone is the ensemble.
    on_fold : callable, optional
        Called as ``on_fold(i, train_rows, val_rows)`` before each fold's fit (for tests).
    sample_weight : ndarray (n,), optional
        Each row's weight in every combiner's and calibration's fit and in every score.
    """
    w = sample_weight
    y = np.asarray(y)
    candidates = combiner_names(meta)
    # only the best candidate's uncalibrated out-of-fold array is kept (80 MB at a million rows
    # of ten classes); its calibrated one is scored a block at a time and computed again at the end
    table, best = {}, None
    for item in candidates:
        label = combiner_label(item)
        raw = cross_fit(item, Z, y, folds, n_learners, k, random_state, on_fold, w)
        table[label] = score(y, raw, k, w)
        if best is None or table[label]["log_loss"] < table[best[0]]["log_loss"]:
            best = (label, item, False, raw)
        if calibration:
            name = label + "+T"
            table[name] = score_blocks(y, calibrated_parts(raw, y, folds, w), k, raw.dtype, w)
            if table[name]["log_loss"] < table[best[0]]["log_loss"]:
                best = (name, item, True, raw)
        del raw
    label, item, calibrated, best_raw = best
    oof = best_raw
    if member_oof is not None:
        member_ll = [score(y, p, k, w)["log_loss"] for p in member_oof]
        best = int(np.argmin(member_ll))
        if member_ll[best] < table[label]["log_loss"] and n_learners == len(member_oof):
            label, calibrated = f"best member ({best})", False
            oof = np.asarray(member_oof[best], dtype=oof_dtype(len(y), k))
            item = SingleBest(n_learners, index=best)
            table[label] = score(y, oof, k, w)
    combiner = fit_on(make_combiner(item, n_learners, random_state), Z, y, sample_weight=w)
    level2 = Level2(label, combiner, k, oof, table=table)
    if calibrated:  # fitted on the combiner's out-of-fold outputs, as its scores were
        cal = TemperatureScaler().fit(best_raw, y, w)
        level2.temperature, level2.floor = cal.temperature_, cal.floor_
        level2.oof_proba = cross_calibrate(best_raw, y, folds, w)
    return level2
