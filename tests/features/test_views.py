"""Views of frozen features: "backbone+flip" trains on each image and its mirror and averages their probabilities."""

import numpy as np
import pytest
from PIL import Image

import stacker
from conftest import COLORS, make_image, save_tiny_weights
from stacker.features.extractor import FeatureExtractor, forward_pass_count
from stacker.learners.kinds import backbone_entry, learner_specs


def _folders(root, n=8):
    """cat/dog folders of 32x32 images (the tiny network's size: no resize, so a mirrored file is an exact mirror)."""
    for j, c in enumerate(("cat", "dog")):
        (root / c).mkdir(parents=True)
        for i in range(n):
            make_image(root / c / f"{i}.png", COLORS[c], size=(32, 32), seed=i + 40 * j)
    return root


@pytest.fixture
def weights(tmp_path):
    return save_tiny_weights(tmp_path / "tiny.weights.h5")


def test_the_flip_view_is_the_features_of_the_mirrored_file_and_is_cached_apart(tmp_path, weights):
    root = _folders(tmp_path / "imgs", 3)
    paths = sorted(str(p) for p in root.rglob("*.png"))
    mirrored = []
    for p in paths:
        out = p.replace(".png", "_m.png").replace("/imgs/", "/mirrored/")
        (tmp_path / "mirrored" / p.split("/")[-2]).mkdir(parents=True, exist_ok=True)
        Image.open(p).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(out)
        mirrored.append(out)
    ext = FeatureExtractor("tiny_cnn", weights=weights, input_size=32, cache_dir=tmp_path / "cache", verbose=0)
    flip = ext.with_view("flip")
    assert ext.with_view("original") is ext
    assert flip.key_meta()["view"] == "flip" and flip.key_meta() != ext.key_meta()
    original, flipped = ext.extract(paths).values, flip.extract(paths).values
    np.testing.assert_allclose(flipped, ext.extract(mirrored).values, rtol=1e-5, atol=1e-6)
    assert not np.allclose(original, flipped)
    before = forward_pass_count()
    np.testing.assert_array_equal(ext.with_view("flip").extract(paths).values, flipped)  # from the cache
    assert forward_pass_count() == before
    from stacker.app.inventory import scan  # what `stacker cache ls` lists

    details = sorted((a.detail, a.state) for a in scan(tmp_path / "cache") if a.kind == "features")
    assert details == [("12 rows, 32px, " + ext.engine, "current"), ("6 rows, 32px, " + ext.engine + ", view flip",
                                                                     "current")]


def test_backbone_entries_name_their_views_and_bad_ones_are_refused():
    assert backbone_entry("efficientnet_lite0@260+flip") == {"backbone": "efficientnet_lite0", "input_size": 260,
                                                             "views": ("original", "flip")}
    specs = learner_specs(["mobilenet_025+flip", {"backbone": "mobilenet_025"}], ["logistic"])
    assert [s["name"] for s in specs] == ["mobilenet_025+flip:logistic", "mobilenet_025:logistic"]
    assert specs[0]["views"] == ("original", "flip") and "views" not in specs[1]
    with pytest.raises(ValueError, match="views after '\\+' must be among"):
        backbone_entry("mobilenet_025+mirror")
    with pytest.raises(ValueError, match="does not average views"):
        learner_specs([{"backbone": "efficientnet_lite0", "views": ["flip"]}], ["logistic"],
                      kind_values={"finetune": {"blocks": 1}})


def test_an_ensemble_on_flip_views_trains_on_both_averages_both_and_predicts_the_same_after_loading(tmp_path, weights):
    root = _folders(tmp_path / "imgs")
    spec = {"backbone": "tiny_cnn", "input_size": 32, "weights": weights, "views": ["original", "flip"]}
    cache = tmp_path / "cache"
    before = forward_pass_count()
    ens = stacker.Ensemble([spec], models=["logistic"], meta="mean", cv=2, cache_dir=cache, verbose=0).fit(str(root))
    assert forward_pass_count() - before == 2 * 16  # each image and its mirror, once
    learner = ens.learners_["tiny_cnn@32+flip:logistic"]
    data = stacker.data.sources.from_folder(str(root))
    ext = FeatureExtractor("tiny_cnn", weights=weights, input_size=32, cache_dir=cache, verbose=0)
    original, flipped = ext.extract(data).values, ext.with_view("flip").extract(data).values
    y = np.searchsorted(ens.classes_, data.labels)
    for i, (est, (tr, va)) in enumerate(zip(learner.fold_models_, ens.folds_)):
        np.testing.assert_allclose(learner.oof_proba_[va], (est.predict_proba(original[va])
                                                            + est.predict_proba(flipped[va])) / 2, rtol=1e-6)
        alone = stacker.learners.zoo.make_model("logistic", i).fit(np.r_[original[tr], flipped[tr]], np.r_[y[tr], y[tr]])
        np.testing.assert_allclose(est.predict_proba(original), alone.predict_proba(original), rtol=1e-6)  # both views
    plain = stacker.Ensemble([{**spec, "views": None}], models=["logistic"], meta="mean", cv=2, cache_dir=cache,
                             verbose=0).fit(str(root))
    assert not np.allclose(plain.oof_proba_["tiny_cnn@32:logistic"], learner.oof_proba_)  # other inputs, other key
    expected = ens.predict_proba(data.paths)
    ens.save(tmp_path / "model")
    before = forward_pass_count()
    np.testing.assert_allclose(stacker.predict(data.paths, model=str(tmp_path / "model"), cache_dir=None).proba,
                               expected, rtol=1e-6)
    assert forward_pass_count() - before == 2 * 16  # no cache: both views computed
    import onnxruntime as ort  # the exported file mirrors the image too

    ens.export_onnx(str(tmp_path / "m.onnx"))
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB"), np.float32) for p in data.paths])
    exported = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"pixels_32": pixels})[0]
    assert np.abs(exported - expected).max() < 1e-5 and not np.allclose(expected, expected[:1])


def test_views_out_of_core_are_refused_before_any_work(tmp_path, weights):
    root = _folders(tmp_path / "imgs", 3)
    before = forward_pass_count()
    ens = stacker.Ensemble(["tiny_cnn@32+flip"], weights=weights, models=["logistic"], cv=2, out_of_core=True,
                           cache_dir=tmp_path / "cache", verbose=0)
    with pytest.raises(ValueError, match="training on views .* needs their features in memory"):
        ens.fit(str(root))
    assert forward_pass_count() == before
