"""How much each learner matters to level 2: the log loss lost when its inputs are shuffled.

Permutation importance on the out-of-fold level-2 matrix, a block of rows at a time (no
copy of the matrix); the report and the manifest show it per learner.
"""

from __future__ import annotations

import numpy as np

from stacker.level2.arrays import row_blocks, score

__all__ = ["meta_blocks", "permutation_importance"]


def meta_blocks(names, proba_dims, feature_dims, meta_inputs) -> dict:
    """Column indices of each learner's inputs in the level-2 matrix (see ``meta_matrix``)."""
    blocks = {n: [] for n in names}
    col = 0
    if meta_inputs in ("proba", "both"):
        for n, d in zip(names, proba_dims):
            blocks[n] += list(range(col, col + d))
            col += d
    if meta_inputs in ("features", "both"):
        for n, d in zip(names, feature_dims):
            blocks[n] += list(range(col, col + d))
            col += d
    return blocks


def permutation_importance(level2, Z, y, blocks: dict, k: int, seed: int, repeats: int = 3) -> dict:
    """How much level 2's log loss grows when one learner's inputs are shuffled across rows."""
    rng = np.random.default_rng(seed)
    base = score(y, level2.predict_proba(Z), k)["log_loss"]
    proba = np.empty((len(Z), k))
    out = {}
    for name, cols in blocks.items():
        losses = []
        for _ in range(repeats):
            order = rng.permutation(len(Z))
            for rows in row_blocks(len(Z)):  # shuffled a block at a time: no copy of Z
                part = Z[rows].copy()
                part[:, cols] = Z[order[rows]][:, cols]
                proba[rows] = level2.predict_proba(part)
            losses.append(score(y, proba, k)["log_loss"])
        out[name] = float(np.mean(losses) - base)
    return out
