"""Level 2 at a thousand classes: row views instead of a stacked copy, blocks of rows, float32 out-of-fold
arrays and budgets for the fits of a few parameters, each giving the numbers of the whole-array path."""

import tracemalloc

import numpy as np
import pytest

from stacker.level2 import arrays, calibration, combiners
from stacker.level2.arrays import StackedBlocks, score, score_blocks, spread_rows
from stacker.level2.calibration import TemperatureScaler, with_min_proba
from stacker.level2.combiners import LogitStacker, TwoLayerStack
from stacker.level2.crossfit import calibrated_parts, cross_calibrate, cross_fit
from stacker.level2.importance import permutation_importance
from stacker.level2.selection import fit_level2


def members(seed, n=400, k=12, n_learners=4):
    """Labels and float32 probability blocks of learners of different quality."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % k)
    blocks = []
    for _ in range(n_learners):
        logits = rng.normal(0, 1, (n, k)) + rng.uniform(0.5, 3.0) * np.eye(k)[y]
        P = np.exp(logits - logits.max(1, keepdims=True))
        blocks.append((P / P.sum(1, keepdims=True)).astype(np.float32))
    return y, blocks


def folds_of(n, cv=4):
    return [(np.where(np.arange(n) % cv != i)[0], np.where(np.arange(n) % cv == i)[0]) for i in range(cv)]


def test_stacked_blocks_read_like_the_concatenated_matrix():
    _, blocks = members(0, n=50, k=3)
    Z = np.hstack(blocks)
    view = StackedBlocks(blocks)
    assert view.shape == Z.shape and len(view) == 50 and np.array_equal(np.asarray(view), Z)
    rows = np.arange(3, 50, 4)
    sub = view[rows][2:7]  # a view of a view: still no copy
    assert isinstance(sub, StackedBlocks) and np.array_equal(np.asarray(sub), Z[rows][2:7])
    assert np.array_equal(view[7], Z[7]) and np.array_equal(np.array(list(view[rows])), Z[rows])
    cols = np.arange(50) % Z.shape[1]
    assert np.array_equal(arrays.pick(view, cols), Z[np.arange(50), cols])
    assert np.array_equal(arrays.pick(view[rows], cols[rows]), Z[rows, cols[rows]])
    with pytest.raises(TypeError, match="rows only"):
        view[:, 3]
    part = arrays.take_rows(Z, slice(0, 5), copy=True)
    part[:] = 0
    assert Z[:5].any(), "a copied block is not a view of Z"


def test_level2_on_row_views_and_small_blocks_gives_the_numbers_of_the_stacked_matrix(monkeypatch):
    """StackedBlocks (no copy) and blocks of a few rows must not move a number of level 2."""
    y, blocks = members(1)
    k = 12
    folds = folds_of(len(y))
    cols = {f"m{j}": list(range(k * j, k * j + k)) for j in range(4)}

    def run(Z):
        level2 = fit_level2(Z, y, folds, "auto", 4, k, member_oof=blocks)
        return (level2.name, level2.table, level2.oof_proba, level2.predict_proba(Z), level2.temperature,
                level2.floor, permutation_importance(level2, Z, y, cols, k, 0))

    whole = run(np.hstack(blocks))
    monkeypatch.setattr(arrays, "BLOCK_VALUES", 100)  # blocks of two rows of 48 columns
    for blocked in (run(StackedBlocks(blocks)), run(np.hstack(blocks))):
        for a, b in zip(whole, blocked):
            if isinstance(a, np.ndarray):
                np.testing.assert_array_equal(a, b)
            else:
                assert a == b


def test_out_of_fold_arrays_are_float32_past_their_size(monkeypatch):
    y, blocks = members(2)
    k, Z, folds = 12, StackedBlocks(blocks), folds_of(len(y))
    assert arrays.oof_dtype(len(y), k) == np.float64 and cross_fit("mean", Z, y, folds, 4, k, 0).dtype == np.float64
    monkeypatch.setattr(arrays, "OOF_FLOAT64_VALUES", 1000)
    assert arrays.oof_dtype(len(y), k) == np.float32
    raw = cross_fit("mean", Z, y, folds, 4, k, 0)
    assert raw.dtype == np.float32
    np.testing.assert_array_equal(raw, np.mean(blocks, axis=0, dtype=np.float64).astype(np.float32))
    calibrated = cross_calibrate(raw, y, folds)
    assert calibrated.dtype == np.float32
    # the calibrated out-of-fold score, block by block, is that of the stored array
    assert score_blocks(y, calibrated_parts(raw, y, folds), k, raw.dtype) == score(y, calibrated, k)
    level2 = fit_level2(Z, y, folds, "auto", 4, k, member_oof=blocks)
    assert level2.oof_proba.dtype == np.float32
    assert with_min_proba(level2.oof_proba).dtype == np.float32
    assert with_min_proba(level2.oof_proba.astype(np.float16)).dtype == np.float64


def test_the_logit_stacker_and_calibration_fit_evenly_spread_rows_past_their_budget(monkeypatch):
    y, blocks = members(3, n=600)
    Z, k = np.hstack(blocks), 12
    rows = spread_rows(len(y), 150)
    assert len(rows) == 150 and rows[0] == 0 and rows[-1] == len(y) - 1 and np.all(np.diff(rows) > 0)
    exact = LogitStacker(4).fit(Z[rows], y[rows])
    monkeypatch.setattr(combiners, "LOGIT_VALUES", 150 * 4 * k)
    capped = LogitStacker(4).fit(StackedBlocks(blocks), y)
    np.testing.assert_array_equal(capped.weights_, exact.weights_)
    np.testing.assert_array_equal(capped.bias_, exact.bias_)
    P = np.mean(blocks, axis=0)
    exact = TemperatureScaler().fit(P[rows], y[rows])
    monkeypatch.setattr(calibration, "CALIBRATION_VALUES", 150 * k)
    capped = TemperatureScaler().fit(StackedBlocks([P], np.arange(len(y)), P.dtype), y)
    assert (capped.temperature_, capped.floor_) == (exact.temperature_, exact.floor_)


def test_top5_by_partition_is_top5_by_sort(monkeypatch):
    rng = np.random.default_rng(4)
    y, P = rng.integers(0, 40, 500), rng.dirichlet(np.ones(40), 500)
    sorted_ = score(y, P, 40)
    monkeypatch.setattr(arrays, "SORT_CLASSES", 10)
    assert score(y, P, 40) == sorted_


@pytest.mark.slow  # level 2 under tracemalloc on 3,000 rows of 200 classes
def test_level2_holds_no_stacked_copy_and_no_float64_arrays_of_all_rows(monkeypatch):
    """The traced peak of level 2 on four learners' float32 blocks stays below the blocks themselves.

    A concatenated float32 copy of them, float64 log-probabilities of all rows, or an (n, k)
    float64 array per candidate would each pass it.
    """
    n, k = 3000, 200
    y, blocks = members(5, n=n, k=k)
    for name, value in (("OOF_FLOAT64_VALUES", 0), ("BLOCK_VALUES", 1 << 14)):
        monkeypatch.setattr(arrays, name, value)
    monkeypatch.setattr(combiners, "LOGIT_VALUES", 1 << 18)
    monkeypatch.setattr(calibration, "CALIBRATION_VALUES", 1 << 16)
    Z, folds = StackedBlocks(blocks), folds_of(n, 5)
    one = blocks[0].nbytes  # one learner's out-of-fold probabilities
    tracemalloc.start()
    try:
        level2 = fit_level2(Z, y, folds, "auto", 4, k, member_oof=blocks)
        permutation_importance(level2, Z, y, {f"m{j}": list(range(k * j, k * j + k)) for j in range(4)}, k, 0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3.5 * one, f"level 2 traced {peak / one:.1f}x one learner's out-of-fold array"
    assert isinstance(TwoLayerStack(4).fit(Z, y).inner_[0], LogitStacker)
