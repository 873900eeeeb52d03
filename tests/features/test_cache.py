"""Feature cache: hits do no forward pass, interrupted runs resume, changes invalidate."""

import os
import time

import numpy as np
import pytest

from conftest import TINY, make_image
from stacker.data import sources as im
from stacker.features.cache import FeatureCache
from stacker.features.extractor import FeatureExtractor, forward_pass_count


def extractor(cache_dir, **kw):
    args = dict(weights=TINY["weights"], input_size=TINY["input_size"], batch_size=4, chunk_size=4,
                cache_dir=cache_dir, verbose=0)
    args.update(kw)
    return FeatureExtractor(TINY["backbone"], **args)


def test_second_run_does_no_forward_pass(class_folders, cache_dir):
    import keras

    keras.utils.set_random_seed(0)
    data = im.load_images(class_folders)
    first = extractor(cache_dir)
    before = forward_pass_count()
    f1 = first.transform(data)
    assert forward_pass_count() - before == len(data)
    assert f1.shape == (len(data), 16) and np.isfinite(f1).all()

    # a new extractor with the same weights file hits the cache: zero images through the CNN
    weights = os.path.join(str(cache_dir), "w.weights.h5")
    first.model.save_weights(weights)
    second = extractor(cache_dir, weights=weights)
    f_new = second.transform(data)  # weights given as a file: a new key, computed once
    before = forward_pass_count()
    third = extractor(cache_dir, weights=weights)
    f3 = third.transform(data)
    assert forward_pass_count() == before, "a warm cache must not run the CNN"
    np.testing.assert_array_equal(f3, f_new)
    np.testing.assert_allclose(f_new, f1, rtol=1e-5, atol=1e-5)
    # rows come back in the order asked for, whatever order they were cached in
    rev = data.subset(range(len(data) - 1, -1, -1))
    np.testing.assert_array_equal(third.transform(rev), f3[::-1])
    assert forward_pass_count() == before


def test_interrupted_extraction_resumes_from_last_complete_chunk(class_folders, cache_dir):
    data = im.load_images(class_folders)
    ext = extractor(cache_dir)
    ext.model  # build once so the interrupted and resumed runs share the weights
    calls = {"n": 0}
    real_run = ext._run

    def dying_run(pixels):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("simulated kill during batch 4")
        return real_run(pixels)

    ext._run = dying_run
    with pytest.raises(KeyboardInterrupt):
        ext.transform(data)
    key = ext.key_meta()
    from stacker.features.cache import FeatureCache

    entry = FeatureCache(cache_dir).entry(key, 16)
    assert entry.n_complete() == 12  # three complete chunks of 4 survived
    ext._run = real_run
    before = forward_pass_count()
    resumed = ext.transform(data)
    assert forward_pass_count() - before == len(data) - 12, "only the missing images are computed"
    fresh = FeatureExtractor(TINY["backbone"], weights=None, input_size=32, verbose=0, model=ext.model,
                             weights_id="x").transform(data)
    np.testing.assert_allclose(resumed, fresh, rtol=1e-5, atol=1e-5)


def test_changed_image_file_is_recomputed(class_folders, cache_dir):
    data = im.load_images(class_folders)
    ext = extractor(cache_dir)
    f1 = ext.transform(data)
    time.sleep(0.01)
    make_image(data.paths[3], (255, 255, 0), seed=99)  # rewritten in place: same path, new content
    before = forward_pass_count()
    f2 = ext.transform(data)
    assert forward_pass_count() - before == 1
    assert not np.allclose(f1[3], f2[3], rtol=1e-3, atol=0)
    np.testing.assert_array_equal(np.delete(f1, 3, 0), np.delete(f2, 3, 0))


def test_changed_weights_give_a_new_entry(class_folders, cache_dir, tmp_path):
    import keras

    data = im.load_images(class_folders).subset(range(6))
    keras.utils.set_random_seed(1)
    a = extractor(cache_dir)
    wa = str(tmp_path / "a.weights.h5")
    a.model.save_weights(wa)
    keras.utils.set_random_seed(2)
    b = extractor(cache_dir)
    wb = str(tmp_path / "b.weights.h5")
    b.model.save_weights(wb)
    fa = extractor(cache_dir, weights=wa).transform(data)
    before = forward_pass_count()
    fb = extractor(cache_dir, weights=wb).transform(data)
    assert forward_pass_count() - before == len(data), "other weights must not reuse cached features"
    assert not np.allclose(fa, fb, rtol=1e-3, atol=0)
    # and a change of input size is another key too
    before = forward_pass_count()
    extractor(cache_dir, weights=wa, input_size=40).transform(data)
    assert forward_pass_count() - before == len(data)


def test_float16_storage_halves_the_file(class_folders, tmp_path):
    data = im.load_images(class_folders)
    ext32 = extractor(tmp_path / "c32")
    f32 = ext32.transform(data)
    f16 = FeatureExtractor(TINY["backbone"], weights=None, input_size=32, batch_size=4, cache_dir=tmp_path / "c16",
                           feature_dtype="float16", verbose=0, model=ext32.model,
                           weights_id=ext32.weights_id).transform(data)
    assert f16.dtype == np.float16
    np.testing.assert_allclose(f16.astype(np.float32), f32, rtol=2e-3, atol=2e-3)


def test_bad_images_raise_or_skip_and_nothing_is_lost(class_folders, cache_dir):
    data = im.load_images(class_folders)
    bad = class_folders / "cat" / "broken.png"
    bad.write_text("this is text")
    data = im.load_images(class_folders)
    first = extractor(cache_dir)
    before = forward_pass_count()
    with pytest.raises(im.BadImageError, match="broken.png: not an image"):
        first.transform(data)
    assert forward_pass_count() == before, "a header problem fails fast, before any forward pass"
    feats = extractor(cache_dir, on_bad_image="skip", model=first.model, weights_id=first.weights_id).extract(data)
    assert forward_pass_count() == before + len(data) - 1
    again = extractor(cache_dir, on_bad_image="skip", model=first.model, weights_id=first.weights_id).extract(data)
    assert forward_pass_count() == before + len(data) - 1, "and nothing computed is computed again"
    np.testing.assert_array_equal(again.values, feats.values)
    row = data.paths.index(str(bad))
    assert list(feats.skipped) == [row] and row not in feats.kept
    assert len(feats.values) == len(data) - 1


def test_shards_merged_give_exactly_the_features_of_one_unsharded_run(tmp_path, class_folders):
    """`stacker extract --shard i/n` on three "machines", `stacker cache merge`, then zero forward passes."""
    import keras

    from stacker.app import cli
    from stacker.backbones import build
    from stacker.data.sources import load_images

    keras.utils.set_random_seed(0)
    weights = str(tmp_path / "tiny.weights.h5")
    build("tiny_cnn", weights=None, input_size=32).save_weights(weights)
    common = ["--backbones", "tiny_cnn", "--image-size", "32", "--weights", weights, "--batch-size", "5", "--quiet"]
    assert cli.main(["extract", str(class_folders), "--cache", str(tmp_path / "whole"), *common]) == 0
    for i in range(3):
        assert cli.main(["extract", str(class_folders), "--cache", str(tmp_path / f"shard{i}"),
                         "--shard", f"{i}/3", *common]) == 0
    shard_rows = [FeatureCache(tmp_path / f"shard{i}").entries()[0]["rows"] for i in range(3)]
    assert shard_rows == [10, 5, 9]  # cut at multiples of the batch size
    assert cli.main(["cache", "merge", *(str(tmp_path / f"shard{i}") for i in range(3)),
                     "--cache", str(tmp_path / "merged")]) == 0
    assert cli.main(["cache", "merge", str(tmp_path / "shard0"), "--cache", str(tmp_path / "merged")]) == 0

    data = load_images(class_folders)
    ext = dict(backbone="tiny_cnn", input_size=32, weights=weights, verbose=0)
    whole = FeatureExtractor(**ext, cache_dir=tmp_path / "whole").transform(data)
    before = forward_pass_count()
    merged = FeatureExtractor(**ext, cache_dir=tmp_path / "merged").transform(data)
    assert forward_pass_count() == before, "the merged cache must hold every image"
    np.testing.assert_array_equal(merged, whole)
    assert FeatureCache(tmp_path / "merged").entries()[0]["rows"] == len(data)  # merging twice adds nothing
    assert cli.main(["extract", str(class_folders), "--shard", "3/3", *common]) == 1


def test_a_cache_kind_registered_once_is_listed_and_removed(tmp_path, capsys):
    """One registration is all a new kind needs: `stacker cache ls` lists it, `rm --kind` removes it."""
    from stacker.app import cli, inventory
    from stacker.features.layout import Artefact, CacheLayout, register_cache_kind, unregister_cache_kind

    def scan_toy(folder, ctx):
        return [Artefact.at("toy", os.path.join(folder, name), "a toy file", backbone="tiny_cnn")
                for name in sorted(os.listdir(folder))]

    register_cache_kind("toy", "toy", scan_toy, "toy files of a test")
    try:
        root = tmp_path / "cache"
        toy = CacheLayout(root).path("toy")
        os.makedirs(toy)
        for name in ("a.bin", "b.bin", "c.bin"):
            with open(os.path.join(toy, name), "wb") as f:
                f.write(b"x" * 10)
        result = root / "learners" / "0123456789abcdef01234567"
        result.mkdir(parents=True)
        (result / "COMPLETE").write_text("ok\n")
        (root / "notes.txt").write_text("mine")

        found = inventory.scan(root)
        assert "toy" in inventory.kinds()
        assert [os.path.basename(a.path) for a in inventory.select(found, kind="toy")] == ["a.bin", "b.bin", "c.bin"]
        assert {a.kind for a in found} == {"toy", "learners", "other"}
        assert inventory.remove(inventory.select(found, kind="toy")[:1]) == 10
        assert sorted(os.listdir(toy)) == ["b.bin", "c.bin"]

        capsys.readouterr()
        assert cli.main(["cache", "ls", "--cache", str(root)]) == 0
        listing = capsys.readouterr().out
        assert len([line for line in listing.splitlines() if line.startswith("toy ") and "a toy file" in line]) == 2
        assert cli.main(["cache", "rm", "--cache", str(root), "--kind", "toy"]) == 0
        assert "2 entries removed" in capsys.readouterr().out
        assert os.listdir(toy) == [] and result.exists() and (root / "notes.txt").exists()
    finally:
        unregister_cache_kind("toy")
    assert "toy" not in inventory.kinds()
    assert [a.kind for a in inventory.scan(root) if a.path == toy] == ["other"]  # no longer claimed: never removed


def test_converted_weights_follow_the_cache_folder(tmp_path, monkeypatch):
    """$STACKER_CACHE_DIR, else $XDG_CACHE_HOME/stacker; and an extractor's own cache folder when it has one."""
    from stacker.backbones import converted_weights_dir, efficientnet_lite
    from stacker.features.layout import CacheLayout

    monkeypatch.delenv("STACKER_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert converted_weights_dir() == str(tmp_path / "xdg" / "stacker" / "converted_weights")
    monkeypatch.setenv("STACKER_CACHE_DIR", str(tmp_path / "env"))
    assert converted_weights_dir() == str(tmp_path / "env" / "converted_weights")
    assert converted_weights_dir(tmp_path / "mine") == CacheLayout(tmp_path / "mine").converted_weights \
        == str(tmp_path / "mine" / "converted_weights")

    used = []
    monkeypatch.setattr(efficientnet_lite, "load_checkpoint_weights",
                        lambda net, source, cache_dir=None: used.append(os.fspath(cache_dir)))
    checkpoint = tmp_path / "efficientnet-lite0-0123456789.pth"
    checkpoint.write_bytes(b"not read: the loader is replaced")
    FeatureExtractor("efficientnet_lite0", weights=str(checkpoint), input_size=32, cache_dir=tmp_path / "mine",
                     verbose=0).model
    FeatureExtractor("efficientnet_lite0", weights=str(checkpoint), input_size=32, verbose=0).model
    assert used == [str(tmp_path / "mine" / "converted_weights"), str(tmp_path / "env" / "converted_weights")]


def test_cache_file_names_are_the_ones_existing_caches_have(tmp_path):
    """The layout names files as before it was one module, so caches made earlier are still found."""
    import hashlib
    import json

    from stacker.features.layout import CacheLayout, onnx_identity, onnx_name

    meta = {"backbone": "tiny_cnn", "input_size": 32, "weights": "values:ab", "code": "cd"}
    key = hashlib.sha256(json.dumps({**meta, "dtype": "float16"}, sort_keys=True).encode()).hexdigest()
    assert CacheLayout(tmp_path).feature_file(meta, "float16") == str(tmp_path / "features" / f"tiny_cnn-{key[:16]}.h5")
    assert FeatureCache(tmp_path).entry(meta, 16, "float16").path == CacheLayout(tmp_path).feature_file(meta, "float16")
    graph = hashlib.sha256(b"tiny_cnn|(None, 32, 32, 3)|values:ab|cd").hexdigest()[:20]
    assert onnx_name("tiny_cnn", (None, 32, 32, 3), onnx_identity("values:ab", "cd")) == f"tiny_cnn-{graph}.onnx"
    assert CacheLayout(tmp_path).store("folds") == str(tmp_path / "folds")
