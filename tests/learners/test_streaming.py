"""Out-of-core learning: cached feature views, streaming models, and ensembles that never load a matrix."""

import sys

import numpy as np
import pytest

from conftest import TINY, make_class_folders, save_tiny_weights
from stacker.features import cutpoint, rows
from stacker.learners import streaming
from stacker.features.cache import FeatureCache, FeatureEntry
from stacker.ensemble import Ensemble
from stacker.learners.dense import DenseClassifier
from stacker.learners.zoo import PrototypeClassifier
from stacker.io.persist import load_estimator, save_estimator, trusted_types
from stacker.features.rows import CachedRows
from stacker.learners.streaming import StreamingDense, StreamingLogistic, StreamingPrototype


@pytest.fixture
def cached(tmp_path, monkeypatch):
    """3 classes x 1,000 rows of float16 in a cache file, viewed in a shuffled row order."""
    monkeypatch.setattr(rows, "WINDOW", 512)  # several windows on little data
    rng = np.random.default_rng(0)
    n, d = 3000, 24
    y = rng.integers(0, 3, n)
    X = (rng.normal(size=(n, d)) + 0.8 * np.eye(3, d)[y] * 3).astype(np.float16)
    entry = FeatureCache(tmp_path).entry({"backbone": "synthetic"}, d, "float16")
    for s in range(0, n, 700):
        part = range(s, min(s + 700, n))
        entry.append([f"{i:040d}" for i in part], X[s : s + 700], list(part), [None] * len(part), ["p"] * len(part))
    order = rng.permutation(n)
    return CachedRows(entry.path, order, d, "float16"), X[order], y[order]


def test_cached_rows_read_lazily_and_in_windows(cached):
    view, X, _ = cached
    assert view.shape == X.shape and np.array_equal(np.asarray(view), X)
    sub = view[np.arange(5, 3000, 7)][10:40]
    assert isinstance(sub, CachedRows) and np.array_equal(np.asarray(sub), X[np.arange(5, 3000, 7)][10:40])
    assert np.array_equal(view[17], X[17])
    seen = np.concatenate([pos for pos, rows in view.windows(seed=3)])
    assert np.array_equal(np.sort(seen), np.arange(len(X)))
    assert max(len(pos) for pos, _ in view.windows()) <= rows.WINDOW
    with pytest.raises(TypeError, match="rows only"):
        view[:, 3]


def test_streaming_prototype_is_the_prototype_classifier(cached):
    view, X, y = cached
    exact = PrototypeClassifier().fit(X.astype(np.float64), y)
    streamed = StreamingPrototype().fit(view, y)
    assert streamed.scale_ == pytest.approx(exact.scale_, rel=1e-9)
    np.testing.assert_allclose(streamed.predict_proba(view), exact.predict_proba(X.astype(np.float64)), atol=1e-10)


def test_streaming_logistic_is_seeded_accurate_and_saved_safely(cached, tmp_path):
    view, X, y = cached
    a = StreamingLogistic(random_state=1).fit(view, y)
    b = StreamingLogistic(random_state=1).fit(view, y)
    assert np.array_equal(a.predict_proba(view), b.predict_proba(view))
    assert not np.array_equal(StreamingLogistic(random_state=2).fit(view, y).coef_, a.coef_)
    assert (a.predict(view) == y).mean() > 0.9
    assert np.array_equal(a.predict_proba(X), a.predict_proba(view))
    save_estimator(a, str(tmp_path / "m"))
    assert np.array_equal(load_estimator(str(tmp_path / "m"), trusted_types()).predict_proba(view),
                          a.predict_proba(view))


def test_adam_in_place_takes_the_textbook_steps():
    """Scratch arrays instead of temporaries (1,280 x 1,000 weights at a thousand classes): the same numbers."""
    rng = np.random.default_rng(0)
    params = [rng.normal(size=(6, 5)), rng.normal(size=5)]
    ref, m, v = [p.copy() for p in params], [np.zeros_like(p) for p in params], [np.zeros_like(p) for p in params]
    adam = streaming._Adam(params, 1e-2)
    for t in range(1, 6):
        grads = [rng.normal(size=p.shape) for p in params]
        adam.step(grads)
        for p, g, m_, v_ in zip(ref, grads, m, v):
            m_ *= 0.9
            m_ += (1 - 0.9) * g
            v_ *= 0.999
            v_ += (1 - 0.999) * np.square(g)
            p -= 1e-2 * (m_ / (1 - 0.9 ** t)) / (np.sqrt(v_ / (1 - 0.999 ** t)) + 1e-8)
        assert all(np.array_equal(a, b) for a, b in zip(params, ref))


def test_moments_are_numpys(cached):
    view, X, _ = cached
    mean, var = streaming._moments(view)
    np.testing.assert_allclose(mean, X.astype(np.float64).mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(var, X.astype(np.float64).var(axis=0), rtol=1e-12)


def test_streaming_dense_reads_a_window_at_a_time_is_seeded_and_saved_as_dense(cached, tmp_path, monkeypatch):
    view, X, y = cached
    reads, original = [], rows.read_file_rows

    def spy(path, rows):
        reads.append(len(rows))
        return original(path, rows)

    monkeypatch.setattr(rows, "read_file_rows", spy)
    a = StreamingDense(epochs=8, random_state=3).fit(view, y)
    assert reads and max(reads) <= rows.WINDOW  # one window of rows at a time, never the matrix
    assert sum(reads) >= 8 * 0.9 * len(y)  # every training row read once an epoch
    b = StreamingDense(epochs=8, random_state=3).fit(view, y)
    proba = a.predict_proba(view)
    assert np.array_equal(proba, b.predict_proba(view))
    in_memory = DenseClassifier(epochs=8, random_state=3).fit(X.astype(np.float32), y)
    assert (a.predict(view) == y).mean() >= (in_memory.predict(X.astype(np.float32)) == y).mean() - 0.02 > 0.88
    np.testing.assert_allclose(proba, a.predict_proba(X.astype(np.float32)), atol=1e-6)
    save_estimator(a, str(tmp_path / "m"))
    loaded = load_estimator(str(tmp_path / "m"))
    assert type(loaded).__name__ == "DenseClassifier"
    np.testing.assert_allclose(loaded.predict_proba(X.astype(np.float32)), proba, atol=1e-6)


@pytest.mark.slow
def test_out_of_core_dense_heads_stream(folders, tmp_path, monkeypatch):
    ens = Ensemble([TINY], models="best", cv=3, batch_size=4, cache_dir=str(tmp_path / "cache"), out_of_core=True,
                   verbose=0)
    with monkeypatch.context() as m:
        m.setattr(FeatureEntry, "read", lambda *_a, **_k: pytest.fail("a whole feature matrix was read"))
        m.setattr(CachedRows, "__array__", lambda *_a, **_k: pytest.fail("a whole feature matrix was read"))
        ens.fit(folders)
        proba = ens.predict_proba(folders / "cat")
    assert type(ens.learners_["tiny_cnn@32:dense"].fold_models_[0]).__name__ == "StreamingDense"
    assert ens.scores_["tiny_cnn@32:dense"]["accuracy"] > 0.8 and (proba.argmax(1) == 0).all()
    saved = Ensemble.load(ens.save(tmp_path / "model"))
    np.testing.assert_allclose(saved.predict_proba(folders / "cat"), proba, atol=1e-6)


def test_auto_switches_on_size():
    assert not rows.use_out_of_core("auto", 10_000, [1280, 1280])
    assert rows.use_out_of_core("auto", 1_000_000, [1280, 1280])
    assert rows.use_out_of_core(True, 10, [4]) and not rows.use_out_of_core(False, 10**9, [4])


@pytest.fixture
def folders(tmp_path):
    return make_class_folders(tmp_path / "train", 10)


def test_out_of_core_ensemble_never_loads_a_feature_matrix(folders, tmp_path, monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("a whole feature matrix was loaded")

    ens = Ensemble([TINY], cv=3, batch_size=4, cache_dir=str(tmp_path / "cache"), out_of_core=True, verbose=0)
    with monkeypatch.context() as m:
        m.setattr(FeatureEntry, "read", refuse)
        m.setattr(CachedRows, "__array__", refuse)
        ens.fit(folders)
        proba = ens.predict_proba(folders / "cat")
    assert ens.out_of_core_ and set(ens.oof_proba_) == {"tiny_cnn@32:logistic", "tiny_cnn@32:prototype"}
    assert ens.scores_["ensemble"]["accuracy"] > 0.9 and (proba.argmax(1) == 0).all()
    saved = Ensemble.load(ens.save(tmp_path / "model"))
    assert np.array_equal(saved.predict_proba(folders / "cat"), proba)


def test_out_of_fold_probabilities_past_their_size_are_float32(folders, tmp_path, monkeypatch):
    """What a thousand classes of 100k images get (stacker.level2.arrays.oof_dtype), on a tiny ensemble."""
    from stacker.level2 import arrays

    tiny = {**TINY, "weights": save_tiny_weights(tmp_path / "tiny.weights.h5")}
    kw = dict(cv=3, batch_size=4, out_of_core=True, verbose=0)
    exact = Ensemble([tiny], cache_dir=str(tmp_path / "cache"), **kw).fit(folders)
    monkeypatch.setattr(arrays, "OOF_FLOAT64_VALUES", 0)
    ens = Ensemble([tiny], cache_dir=str(tmp_path / "fresh"), **kw).fit(folders)
    cached = Ensemble([tiny], cache_dir=str(tmp_path / "cache"), **kw).fit(folders)  # float64 learner results
    assert {p.dtype for p in exact.oof_proba_.values()} == {np.dtype(np.float64)}
    assert ens.meta_oof_proba_.dtype == np.float32
    for name, proba in exact.oof_proba_.items():
        for other in (ens, cached):
            assert other.oof_proba_[name].dtype == np.float32
            np.testing.assert_array_equal(other.oof_proba_[name], proba.astype(np.float32))
    assert ens.scores_["ensemble"]["accuracy"] == pytest.approx(exact.scores_["ensemble"]["accuracy"])
    np.testing.assert_allclose(ens.predict_proba(folders / "cat"), exact.predict_proba(folders / "cat"), atol=1e-5)


def test_auto_keeps_small_data_in_memory(folders, tmp_path):
    tiny = {**TINY, "weights": save_tiny_weights(tmp_path / "tiny.weights.h5")}
    kw = dict(cv=3, batch_size=4, cache_dir=str(tmp_path / "cache"), verbose=0)
    auto = Ensemble([tiny], **kw).fit(folders)
    assert auto.out_of_core_ is False
    exact = Ensemble([tiny], out_of_core=False, **kw).fit(folders)
    for name, proba in exact.oof_proba_.items():
        assert np.array_equal(auto.oof_proba_[name], proba)


@pytest.mark.parametrize("kw, match", [
    (dict(out_of_core="yes"), "out_of_core must be"),
    (dict(out_of_core=True), "give a cache_dir"),
    (dict(out_of_core=True, cache_dir="c", meta_inputs="features", meta="dense"), "probabilities only"),
    (dict(executor="spark"), "executor must be"),
    (dict(executor="ray"), "give a cache_dir"),
])
def test_bad_settings_fail_before_any_work(folders, kw, match):
    with pytest.raises(ValueError, match=match):
        Ensemble([TINY], **kw).fit(folders)


def test_models_that_need_every_row_are_refused_out_of_core_before_extraction(folders, tmp_path):
    from stacker.features.extractor import forward_pass_count

    from sklearn.neighbors import KNeighborsClassifier

    ens = Ensemble([TINY], models=(KNeighborsClassifier(),), cv=3, cache_dir=str(tmp_path / "c"), out_of_core=True,
                   verbose=0)
    before = forward_pass_count()
    with pytest.raises(ValueError, match="needs every row in memory"):
        ens.fit(folders)
    assert forward_pass_count() == before


@pytest.mark.slow
def test_out_of_core_fine_tuning_streams_cut_activations_and_matches_in_memory(tmp_path, monkeypatch):
    weights = save_tiny_weights(tmp_path / "tiny.weights.h5")
    folders = make_class_folders(tmp_path / "train", 9)
    ft = {"blocks": 1, "epochs": 2, "head_epochs": 3, "learning_rate": 1e-3, "tta": ("original", "flip"),
          "batch_size": 4}
    kw = dict(cv=3, cache_dir=str(tmp_path / "cache"), verbose=0, finetune=ft)
    exact = Ensemble([{**TINY, "weights": weights}], out_of_core=False, **kw).fit(folders)
    original = CachedRows.__array__

    def small_only(self, *a, **k):
        assert len(self) <= 8, f"{len(self)} cut-point rows read at once"
        return original(self, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(FeatureEntry, "read", lambda *_a, **_k: pytest.fail("a whole matrix was read"))
        m.setattr(CachedRows, "__array__", small_only)
        m.setattr(cutpoint, "READ_ROWS", 8)  # the frozen top and predictions read a few batches at a time
        streamed = Ensemble([{**TINY, "weights": weights}], out_of_core=True, **kw).fit(folders)
    name = "tiny_cnn@32:finetune"
    np.testing.assert_allclose(streamed.oof_proba_[name], exact.oof_proba_[name], atol=1e-5)


def test_the_ray_executor_without_ray_says_how_to_install_it(monkeypatch):
    from stacker.learners import distributed

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"pip install 'stacker\[ray\]'"):
        distributed.connect()


def test_freed_blocks_go_back_to_the_system(monkeypatch):
    from stacker.learners import memory

    monkeypatch.setattr(memory, "_applied", None)
    monkeypatch.setenv("STACKER_MMAP_THRESHOLD", "0")
    assert memory.return_freed_blocks() == 0  # left alone when asked
    monkeypatch.setattr(memory, "_applied", None)
    monkeypatch.delenv("STACKER_MMAP_THRESHOLD")
    expected = memory.MMAP_THRESHOLD if sys.platform.startswith("linux") else 0
    assert memory.return_freed_blocks() == expected and memory.return_freed_blocks() == expected
