"""Fine-tuning: the cut, what trains and what stays frozen, leak-free folds, cached TTA views."""

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import TINY, make_image, save_tiny_weights
from stacker.data import sources as im
from stacker.backbones import build
from stacker.features.cache import FeatureCache
from stacker.ensemble import Ensemble
from stacker.features.extractor import forward_pass_count
from stacker.features.cutpoint import CutPointExtractor, pooled_rows, split_backbone
from stacker.io.onnx_builder import ExportError
from stacker.learners.finetune import FineTunedClassifier
from stacker.learners.finetuned import finetune_params

FT = {"blocks": 1, "epochs": 3, "head_epochs": 5, "learning_rate": 1e-3, "tta": ("original", "flip")}


def _striped(root, n=10):
    """Two classes that a horizontal flip does not change: a bright top half or a bright bottom half."""
    rng = np.random.default_rng(0)
    for c in ("top", "bottom"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            arr = rng.integers(0, 120, (36, 36, 3)).astype(np.uint8)
            if c == "top":
                arr[:18] += 120
            else:
                arr[18:] += 120
            Image.fromarray(arr).save(root / c / f"{i}.png")
    return im.load_images(root)


@pytest.fixture(scope="module")
def tiny_model():
    import keras

    keras.utils.set_random_seed(0)
    return build("tiny_cnn", weights=None, input_size=32)


def test_split_gives_the_same_output_as_the_whole_network(tiny_model):
    bottom, top, cut = split_backbone(tiny_model, 1, r"^(block\d+)_")
    assert cut == "block2_conv"
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    whole = np.asarray(tiny_model(x, training=False))
    np.testing.assert_allclose(np.asarray(top(bottom(x, training=False), training=False)), whole, atol=1e-5)
    _, top2, cut2 = split_backbone(tiny_model, 2, r"^(block\d+)_")
    assert cut2 == "block1_conv" and len(top2.layers) > len(top.layers)
    with pytest.raises(ValueError, match="blocks must be an integer between 1 and 2"):
        split_backbone(tiny_model, 3, r"^(block\d+)_")
    with pytest.raises(ValueError, match="no block structure"):
        split_backbone(tiny_model, 1, None)


def test_finetune_options_are_validated():
    assert finetune_params(None) is None and finetune_params(False) is None
    assert finetune_params(True)["tta"][0] == "original"
    assert finetune_params({"tta": ["flip"]})["tta"] == ("original", "flip")
    with pytest.raises(ValueError, match="unknown finetune options"):
        finetune_params({"blockz": 2})
    with pytest.raises(ValueError, match="views must be among"):
        finetune_params({"tta": ["mirror"]})
    with pytest.raises(ValueError, match="cannot be fine-tuned"):
        Ensemble(["inception_v3"], weights=None, finetune=True).fit(im.ImageSet(["a", "b"], ["a", "b"], ["x", "y"]))


def _weights_by_name(model) -> dict:
    return {w.path: np.array(w) for w in model.weights}


def _cut_data(tmp_path, tiny_model):
    data = _striped(tmp_path / "imgs", n=12)
    bottom, top, _ = split_backbone(tiny_model, 1, r"^(block\d+)_")
    ext = CutPointExtractor("tiny_cnn", blocks=1, weights=None, input_size=32, verbose=0, model=bottom,
                            weights_id="test")
    return data, ext, bottom, top


@pytest.mark.parametrize("mode", ["cached", "full"])
def test_unfrozen_layers_change_and_frozen_ones_do_not(tmp_path, tiny_model, mode):
    data, ext, bottom, top = _cut_data(tmp_path, tiny_model)
    X = ext.transform(data)
    top_before, bottom_before = _weights_by_name(top), _weights_by_name(bottom)
    est = FineTunedClassifier("tiny_cnn", weights=None, blocks=1, mode=mode, augment=("flip", "zoom"),
                              head_epochs=1, epochs=6, learning_rate=3e-4, patience=6, random_state=0)
    est.fit(X, data.y, paths=data.paths, top=top, bottom=bottom)
    assert est.phase2_kept_, "phase 2 should beat a one-epoch head on this data"
    tuned_top = next(layer for layer in est.model_.layers if layer.name.startswith("tiny_cnn_top"))
    after = _weights_by_name(tuned_top)
    assert set(after) == set(top_before)
    changed = {name for name, value in top_before.items() if not np.allclose(value, after[name])}
    # the unfrozen block's convolution trained; its BatchNorm (statistics and affine) did not move
    assert any(name.startswith("block2_conv") for name in changed), changed
    assert not [name for name in changed if "bn" in name], changed
    # the pretrained networks handed in were copied, not changed: the frozen part is untouched
    for name, value in _weights_by_name(bottom).items():
        np.testing.assert_array_equal(value, bottom_before[name])
    for name, value in _weights_by_name(top).items():
        np.testing.assert_array_equal(value, top_before[name])
    assert est.history_["phase1_epochs"] == 1 and len(est.history_["val_loss"]) > 1
    assert est.predict_proba(X).shape == (len(data), 2) and est.transform(X).shape == (len(data), 16)


def test_row_weights_reach_both_phases(tmp_path, tiny_model):
    data, ext, bottom, top = _cut_data(tmp_path, tiny_model)
    X = ext.transform(data)
    params = dict(head_epochs=3, epochs=2, learning_rate=1e-3, patience=2, random_state=0)
    plain = FineTunedClassifier("tiny_cnn", weights=None, blocks=1, **params).fit(X, data.y, top=top, bottom=bottom)
    first = data.y == data.y[0]
    w = np.where(first, 20.0, 1.0)  # the first class's rows weigh 20 times the others'
    heavy = FineTunedClassifier("tiny_cnn", weights=None, blocks=1, **params).fit(X, data.y, w, top=top, bottom=bottom)
    col = list(heavy.classes_).index(data.y[0])
    assert heavy.predict_proba(X)[:, col].mean() > plain.predict_proba(X)[:, col].mean() + 0.02
    frozen = pooled_rows(top, X, heavy.cut_shape_)  # phase 1's inputs: the head took the weights too
    assert heavy.head_.predict_proba(frozen)[:, col].mean() > plain.head_.predict_proba(frozen)[:, col].mean()
    with pytest.raises(ValueError, match="Negative values"):
        FineTunedClassifier("tiny_cnn", weights=None, blocks=1, **params).fit(X, data.y, -w, top=top, bottom=bottom)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    return save_tiny_weights(tmp_path_factory.mktemp("weights") / "tiny.weights.h5")


def _ensemble(cache_dir, weights, **kw):
    return Ensemble([{**TINY, "weights": weights}], cv=3, random_state=0, cache_dir=str(cache_dir), verbose=0,
                    meta="logistic", finetune=dict(FT), **kw)


@pytest.mark.slow  # over 7 s: the full suite runs it (the fast lane keeps this module's other tests)
def test_no_fold_model_sees_its_validation_images(tmp_path, monkeypatch, tiny_weights):
    data = _striped(tmp_path / "imgs", n=9)
    seen = []
    original_fit = FineTunedClassifier.fit

    def spy(self, X, y, sample_weight=None, views=(), pooled=None, paths=None, **kw):
        seen.append((list(paths), [np.asarray(v).copy() for v in (X, *views)]))
        return original_fit(self, X, y, sample_weight, views=views, pooled=pooled, paths=paths, **kw)

    monkeypatch.setattr(FineTunedClassifier, "fit", spy)
    ens = _ensemble(tmp_path / "cache", tiny_weights).fit(data)
    assert len(seen) == 3
    name = ens.specs_[0]["name"]
    views = {v: ext.transform(data) for v, ext in ens.learners_[name].views().items()}
    for (paths, arrays), (tr, va) in zip(seen, ens.folds_):
        val_paths = {data.paths[i] for i in va}
        assert not set(paths) & val_paths
        assert set(paths) | val_paths == set(data.paths)
        # no row of any view handed to training is a validation row's activations
        for arr in arrays:
            for v in views.values():
                for row in v[va]:
                    assert not (np.abs(arr - row).max(axis=1) == 0).any()
    for i, (tr, va) in enumerate(ens.folds_):
        fold = ens.learners_[name].fold_models_[i]
        expected = np.mean([fold.predict_proba(views[v][va]) for v in FT["tta"]], axis=0)
        np.testing.assert_allclose(ens.oof_proba_[name][va], expected, atol=1e-6)


@pytest.mark.slow
def test_tta_views_are_cached_and_reused(tmp_path, tiny_weights):
    data = _striped(tmp_path / "imgs", n=9)
    test = im.ImageSet([make_image(tmp_path / f"t{i}.png", (200, 60, 50), seed=i) for i in range(4)],
                       list(range(4)))
    ens = _ensemble(tmp_path / "cache", tiny_weights).fit(data)
    name = ens.specs_[0]["name"]
    entries = {(e["meta"].get("view"), e["rows"]) for e in
               FeatureCache(tmp_path / "cache").entries()}
    assert ("original", len(data)) in entries and ("flip", len(data)) in entries
    assert name == "tiny_cnn@32:finetune"
    views = ens.learners_[name].views()
    flip = views["flip"].transform(data)
    assert not np.allclose(flip, views["original"].transform(data))

    p1 = ens.predict_proba(test)
    before = forward_pass_count()
    p2 = ens.predict_proba(test)
    again = _ensemble(tmp_path / "cache", tiny_weights).fit(data)
    assert forward_pass_count() == before, "cached views and fold models must be reused"
    np.testing.assert_array_equal(p1, p2)
    np.testing.assert_array_equal(again.oof_proba_[name], ens.oof_proba_[name])
    entries = {e["meta"].get("view"): e["rows"] for e in
               FeatureCache(tmp_path / "cache").entries()}
    assert entries["flip"] == len(data) + len(test)

    # the meta-learner can take every view's probabilities as inputs
    views_meta = _ensemble(tmp_path / "cache", tiny_weights)
    views_meta.finetune = {**FT, "tta_meta": "views"}
    views_meta.fit(data)
    assert forward_pass_count() == before
    assert views_meta.learners_[name].meta_oof(None)[0].shape == (len(data), 4)


@pytest.mark.slow
def test_finetuned_ensemble_saves_curves_and_predicts_the_same_after_load(tmp_path, tiny_weights):
    data = _striped(tmp_path / "imgs", n=9)
    ens = _ensemble(tmp_path / "cache", tiny_weights, meta_inputs="both").fit(data)
    s = ens.scores_[ens.specs_[0]["name"]]
    assert {"phase1_log_loss", "phase1_accuracy", "phase2_kept"} <= set(s)
    out = ens.save(tmp_path / "model")
    with open(os.path.join(out, "curves.csv")) as f:
        rows = list(csv.DictReader(f))
    assert {r["phase"] for r in rows} == {"head", "finetune"} and {r["fold"] for r in rows} == {"0", "1", "2"}
    assert all(r["val_loss"] for r in rows if r["phase"] == "finetune")
    loaded = Ensemble.load(out)
    np.testing.assert_allclose(loaded.predict_proba(data), ens.predict_proba(data), atol=1e-6)
    with pytest.raises(ExportError, match=r"learner tiny_cnn@32:finetune to ONNX: level 2 reads its fine-tuned features"):
        loaded.export_onnx(tmp_path / "x.onnx")  # (with meta_inputs="proba" it exports: tests/io/test_export.py)
    with open(os.path.join(out, "manifest.json")) as f:
        assert json.load(f)["export"]["part"] == "learner tiny_cnn@32:finetune"
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in data.paths[:3]]
    np.testing.assert_allclose(loaded.predict_proba(arrays), ens.predict_proba(data.subset([0, 1, 2])), atol=1e-4)
