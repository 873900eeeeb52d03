"""How much each learner matters to level 2: the log loss lost when its inputs are shuffled.

Permutation importance on the out-of-fold level-2 matrix, a block of rows at a time (no
copy of the matrix, no probabilities of all rows); the report and the manifest show it per learner.
"""

from __future__ import annotations

import numpy as np

from stacker.level2.arrays import row_blocks, score_blocks, take_rows

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


def permutation_importance(level2, Z, y, blocks: dict, k: int, seed: int, repeats: int = 3, sample_weight=None) -> dict:
    """How much level 2's log loss grows when one learner's inputs are shuffled across rows.

    ``Z`` is a matrix or a :class:`~stacker.level2.arrays.StackedBlocks`; rows are read,
    shuffled, predicted and scored a block at a time (no ``(n, k)`` array either).
    """
    rng = np.random.default_rng(seed)
    spans = row_blocks(len(Z), Z.shape[1])
    base = score_blocks(y, ((rows, level2.predict_proba(take_rows(Z, rows))) for rows in spans), k,
                        sample_weight=sample_weight)["log_loss"]

    def shuffled(cols, order):
        for rows in spans:
            part = take_rows(Z, rows, copy=True)
            part[:, cols] = take_rows(Z, order[rows])[:, cols]
            yield rows, level2.predict_proba(part)

    out = {}
    for name, cols in blocks.items():
        losses = [score_blocks(y, shuffled(cols, rng.permutation(len(Z))), k, sample_weight=sample_weight)["log_loss"]
                  for _ in range(repeats)]
        out[name] = float(np.mean(losses) - base)
    return out
