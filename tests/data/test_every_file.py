"""Work is never lost: the content-addressed cache, every file accounted for, concurrent prediction.

- The cache keys on the bytes of an image: copies under new paths and mtimes, touched
  files and shards made under other roots cost no forward pass; one changed pixel costs
  exactly one.
- Every Pillow format gives pixels; every unusable path (missing, dangling link, link
  loop, FIFO, device, directory) is raised with its true reason or skipped and listed,
  in extraction, fit, stacker.predict (paths and folders) and ``stacker submit``.
- One loaded model serves threads with different per-call options exactly like
  sequential calls.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import warnings

import numpy as np
import pytest
from PIL import Image

import stacker
from conftest import COLORS, TINY, make_class_folders, make_image, save_tiny_weights
from stacker.app import cli
from stacker.data import decode, scan, sources
from stacker.features.cache import FeatureCache
from stacker.ensemble import Ensemble
from stacker.features.extractor import FeatureExtractor, forward_pass_count
from stacker.data.sources import BadImageError


def _copy_tree(src, dst):
    """A copy with new paths and new modification times (no copystat)."""
    shutil.copytree(src, dst, copy_function=shutil.copyfile)
    return dst


_WEIGHTS = {}


def _tiny(**kw):
    """The tiny backbone with fixed weights (random ones would be another cache key each time)."""
    if "path" not in _WEIGHTS:
        import tempfile

        _WEIGHTS["path"] = save_tiny_weights(os.path.join(tempfile.mkdtemp(), "tiny.weights.h5"))
    return FeatureExtractor(**{**TINY, "weights": _WEIGHTS["path"]}, verbose=0, **kw)


def _extract(root, cache):
    before = forward_pass_count()
    feats = _tiny(cache_dir=str(cache)).extract(sources.load_images(root, False))
    return feats, forward_pass_count() - before


@pytest.fixture
def flat(tmp_path):
    root = tmp_path / "a"
    root.mkdir()
    for i in range(6):
        make_image(root / f"{i}.png", COLORS["cat" if i % 2 else "dog"], seed=i)
    return root


# ----------------------------------------------------------------------------- content keys


def test_moved_copied_and_touched_files_cost_no_forward_pass(flat, tmp_path):
    cache = tmp_path / "cache"
    first, n = _extract(flat, cache)
    assert n == 6
    moved = _copy_tree(flat, tmp_path / "elsewhere" / "renamed")
    again, n = _extract(moved, cache)
    assert n == 0, "the same bytes under new paths and mtimes hit the cache"
    np.testing.assert_array_equal(again.values, first.values)
    os.utime(moved / "3.png", (1, 1))  # touched: new mtime and ctime, same bytes
    _, n = _extract(moved, cache)
    assert n == 0


def test_one_changed_pixel_recomputes_exactly_one_image(flat, tmp_path):
    cache = tmp_path / "cache"
    _extract(flat, cache)
    img = np.asarray(Image.open(flat / "2.png")).copy()
    img[0, 0, 0] ^= 1
    Image.fromarray(img).save(flat / "2.png")
    _, n = _extract(flat, cache)
    assert n == 1


def test_identical_files_under_two_names_cost_one_forward_pass(flat, tmp_path):
    shutil.copyfile(flat / "0.png", flat / "copy_of_0.png")
    feats, n = _extract(flat, tmp_path / "cache")
    assert n == 6 and len(feats.kept) == 7
    np.testing.assert_array_equal(feats.values[0], feats.values[-1])


def test_shards_from_two_roots_merge_into_a_cache_a_third_root_hits(flat, tmp_path):
    root_a, root_b = _copy_tree(flat, tmp_path / "machine_a"), _copy_tree(flat, tmp_path / "machine_b")
    data_a, data_b = sources.load_images(root_a, False), sources.load_images(root_b, False)
    for data, cache, part in ((data_a, tmp_path / "ca", 0), (data_b, tmp_path / "cb", 1)):
        _tiny(cache_dir=str(cache)).extract(data.shard(part, 2))
    merged = FeatureCache(tmp_path / "merged")
    added = merged.merge([tmp_path / "ca", tmp_path / "cb"])
    assert sum(added.values()) == 6
    _, n = _extract(_copy_tree(flat, tmp_path / "machine_c"), tmp_path / "merged")
    assert n == 0


def test_fingerprints_are_memoised_and_track_content(flat, tmp_path):
    from stacker.data import fingerprint

    paths = sorted(str(p) for p in flat.iterdir())
    fps, bad = fingerprint.fingerprints(paths, tmp_path / "cache")
    assert not bad and len(set(fps)) == 6 and all(len(f) == 40 for f in fps)
    fingerprint._memo.clear()  # a new process: the SQLite memo answers, no file is read
    fingerprint._stored.clear()
    reads = []
    real = fingerprint._digest
    fingerprint._digest = lambda p: reads.append(p) or real(p)
    try:
        assert fingerprint.fingerprints(paths, tmp_path / "cache")[0] == fps and reads == []
        os.utime(paths[0], (5, 5))
        assert fingerprint.fingerprints(paths, tmp_path / "cache")[0] == fps and reads == [paths[0]]
    finally:
        fingerprint._digest = real


def test_a_moved_training_folder_reuses_features_and_learner_results(tmp_path):
    root = make_class_folders(tmp_path / "train", 6)
    weights = save_tiny_weights(tmp_path / "tiny.weights.h5")
    kw = dict(backbones=[{**TINY, "weights": weights}], models="logistic", cv=2, random_state=0,
              cache_dir=str(tmp_path / "cache"), verbose=0)
    first = Ensemble(**kw).fit(root)
    moved = _copy_tree(root, tmp_path / "moved" / "train")
    before = forward_pass_count()
    again = Ensemble(**kw).fit(moved)
    assert forward_pass_count() == before
    np.testing.assert_allclose(again.meta_oof_proba_, first.meta_oof_proba_)
    assert again.learners_["tiny_cnn@32:logistic"].key_ == first.learners_["tiny_cnn@32:logistic"].key_


# ----------------------------------------------------------------------------- formats


def _formats(folder):
    """Every format named in the issue, as (file, expected mean RGB)."""
    rgb = np.zeros((20, 24, 3), np.uint8) + np.array([200, 60, 50], np.uint8)
    grey = np.full((20, 24), 120, np.uint8)
    out = {}
    for ext, fmt in (("tif", "TIFF"), ("ppm", "PPM"), ("tga", "TGA"), ("sgi", "SGI"), ("ico", "ICO"),
                     ("bmp", "BMP"), ("webp", "WEBP"), ("pcx", "PCX")):
        path = folder / f"rgb_{ext}.{ext}"
        Image.fromarray(rgb).save(path, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        out[path] = (200, 60, 50)
    Image.fromarray(grey).save(folder / "grey.pgm", format="PPM")
    out[folder / "grey.pgm"] = (120, 120, 120)
    Image.fromarray((grey.astype(np.uint16) * 257)).save(folder / "grey16.tiff", format="TIFF")
    out[folder / "grey16.tiff"] = (120, 120, 120)
    Image.fromarray(grey.astype(np.float32) / 255.0, mode="F").save(folder / "float01.tif", format="TIFF")
    out[folder / "float01.tif"] = (120, 120, 120)
    return out


@pytest.mark.parametrize("method", ["pil", "bilinear"])
def test_every_pillow_format_is_read_as_rgb(tmp_path, method):
    files = {str(p): rgb for p, rgb in _formats(tmp_path).items()}
    data = sources.load_images(tmp_path, labelled=False)
    assert sorted(data.paths) == sorted(files), "a folder reader gives every format a row"
    orient, bad = scan.scan_images(data.paths)
    assert not bad
    batches = list(decode.pixel_batches(data.paths, 16, batch_size=64, orientations=orient, method=method))
    (rows, px), = [(r.numpy(), p.numpy()) for r, p in batches]
    assert sorted(rows) == list(range(len(data)))
    for r, pixels in zip(rows, px):
        np.testing.assert_allclose(pixels.mean(axis=(0, 1)), files[data.paths[r]], atol=3, err_msg=data.paths[r])
    feats = FeatureExtractor(**TINY, verbose=0, resize=method).extract(data)
    assert len(feats.kept) == len(data) and not feats.skipped


# ----------------------------------------------------------------------------- unusable paths


def _bad_entries(folder):
    """Every kind of unusable path, as {path: words of its reason}."""
    bad = {}
    missing_target = folder / "dangling.jpg"
    os.symlink(folder / "no_such_file.jpg", missing_target)
    bad[missing_target] = "dangling symbolic link"
    loop = folder / "loop.jpg"
    os.symlink(loop, loop)
    bad[loop] = "symbolic link loop"
    fifo = folder / "fifo.png"
    os.mkfifo(fifo)
    bad[fifo] = "named pipe"
    if os.path.exists("/dev/zero"):
        os.symlink("/dev/zero", folder / "zero.jpg")
        bad[folder / "zero.jpg"] = "character device"
    (folder / "empty.jpg").write_bytes(b"")
    bad[folder / "empty.jpg"] = "empty file"
    (folder / "notes.jpg").write_text("not an image")
    bad[folder / "notes.jpg"] = "not an image"
    return bad


def test_unusable_paths_get_their_true_reason_under_both_policies(tmp_path):
    folder = tmp_path / "test"
    folder.mkdir()
    good = [make_image(folder / f"{i}.png", COLORS["cat"], seed=i) for i in range(2)]
    bad = _bad_entries(folder)
    paths = [str(p) for p in good] + [str(p) for p in bad] + [str(folder / "missing.jpg"), str(tmp_path)]
    reasons = {**{str(p): r for p, r in bad.items()}, str(folder / "missing.jpg"): "file not found",
               str(tmp_path): "a directory"}
    ext = FeatureExtractor(**TINY, verbose=0)
    with pytest.raises(BadImageError, match="dangling.jpg: dangling symbolic link") as err:
        ext.extract(paths)
    assert set(err.value.paths) == set(reasons), "the error lists every unusable file"
    feats = ext.extract(paths, on_bad_image="skip")
    assert list(feats.kept) == [0, 1]
    for row, reason in feats.skipped.items():
        assert reasons[paths[row]] in reason, (paths[row], reason)
    # the folder reader gives each of them a row, and lists what it does not read
    (folder / ".hidden.png").write_bytes(b"x")
    (folder / "README.md").write_text("hello")
    (folder / "sub").mkdir()
    data = sources.from_test_folder(folder)
    assert set(data.paths) == {str(p) for p in good} | {str(p) for p in bad}
    assert {os.path.basename(p): r.split(" ")[0] for p, r in data.skipped.items()} == {
        ".hidden.png": "hidden", "README.md": "not", "sub": "a"}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("every")
    make_class_folders(root / "train", 6)
    weights = save_tiny_weights(root / "tiny.weights.h5")
    ens = Ensemble(backbones=[{**TINY, "weights": weights}], models="logistic", cv=2, random_state=0,
                   verbose=0).fit(root / "train")
    ens.save(root / "model")
    return root


def test_predict_on_paths_and_folders_loses_no_id(model, tmp_path, capsys):
    folder = tmp_path / "test"
    folder.mkdir()
    good = [make_image(folder / f"{i}.png", COLORS["dog"], seed=i) for i in range(3)]
    bad = _bad_entries(folder)
    with pytest.raises(BadImageError, match="dangling"):
        stacker.predict(folder, model=model / "model")
    res = stacker.predict(folder, model=model / "model", on_bad_image="skip")
    assert len(res) == len(good) + len(bad), "every file has a row"
    words = {p.stem: r for p, r in bad.items()}
    assert {res.ids[r]: words[res.ids[r]] in why for r, why in res.skipped.items()} == dict.fromkeys(words, True)
    assert all(res.labels[i] == "dog" for i in range(len(res)) if i not in res.skipped)
    paths = [str(p) for p in good] + [str(p) for p in bad]
    with pytest.raises(BadImageError, match="dangling.jpg: dangling symbolic link"):
        stacker.predict(paths, model=model / "model")
    # only unusable files (W3): every row NaN, no exception
    only_bad = stacker.predict([str(p) for p in bad], model=model / "model", on_bad_image="skip")
    assert np.isnan(only_bad.proba).all() and len(only_bad.skipped) == len(bad)
    # the CLI: raise names the file; skip lists every file and reason on stderr and prints every row
    assert cli.main(["predict", str(model / "model"), str(folder)]) == 1
    assert "dangling.jpg: dangling symbolic link" in capsys.readouterr().err
    assert cli.main(["predict", str(model / "model"), str(folder), "--on-bad-image", "skip", "--json"]) == 0
    out, err = capsys.readouterr()
    assert len(json.loads(out)) == len(paths)
    for p, reason in bad.items():
        assert f"skipped {p}: " in err and reason in err.split(f"skipped {p}: ")[1].splitlines()[0]


def test_submit_fails_loudly_on_a_skipped_id_unless_filled(model, tmp_path, capsys):
    folder = tmp_path / "test"
    folder.mkdir()
    for i in range(3):
        make_image(folder / f"{i + 1}.png", COLORS["cat"], seed=i)
    os.symlink(folder / "gone.png", folder / "4.png")
    out = tmp_path / "sub.csv"
    assert cli.main(["submit", str(model / "model"), str(folder), "--out", str(out)]) == 1
    assert "4.png: dangling symbolic link" in capsys.readouterr().err
    assert cli.main(["submit", str(model / "model"), str(folder), "--out", str(out), "--on-bad-image", "skip"]) == 1
    err = capsys.readouterr().err
    assert "no prediction for 1 ids: 4 (dangling symbolic link" in err and not out.exists()
    assert cli.main(["submit", str(model / "model"), str(folder), "--out", str(out), "--on-bad-image", "skip",
                     "--fill", "0.5"]) == 0
    rows = out.read_text().splitlines()
    assert rows[0] == "id,label" and [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]
    assert rows[4] == "4,0.500000"


def test_fit_raises_or_lists_every_unusable_training_file(tmp_path):
    root = make_class_folders(tmp_path / "train", 6)
    bad = _bad_entries(root / "cat")
    (root / "dog" / ".DS_Store").write_bytes(b"\0")
    with pytest.raises(BadImageError, match="dangling.jpg: dangling symbolic link") as err:
        Ensemble([TINY], models="logistic", cv=2, verbose=0).fit(root)
    assert set(err.value.paths) == {str(p) for p in bad}
    ens = Ensemble([TINY], models="logistic", cv=2, on_bad_image="skip", verbose=0)
    with pytest.warns(UserWarning, match=f"{len(bad) + 1} files were not used for training"):
        ens.fit(root)
    for p, reason in bad.items():
        assert reason in ens.skipped_[str(p)]
    assert ens.skipped_[str(root / "dog" / ".DS_Store")] == "hidden file"
    assert len(ens.train_paths_) == 12


def test_fit_names_the_skipped_images_of_an_emptied_class(tmp_path):
    root = make_class_folders(tmp_path / "train", 4)
    (root / "owl").mkdir()
    for i in range(4):
        os.symlink(root / "owl" / f"gone{i}.png", root / "owl" / f"{i}.png")
    with pytest.raises(BadImageError, match="owl/0.png: dangling symbolic link"):
        Ensemble([TINY], models="logistic", cv=2, verbose=0).fit(root)
    make_image(root / "owl" / "ok.png", COLORS["owl"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"'owl': 1 usable, 4 skipped as unusable \(e.g. .*dangling"):
            Ensemble([TINY], models="logistic", cv=2, on_bad_image="skip", verbose=0).fit(root)


def test_in_memory_inputs(model):
    ens = stacker.load(model / "model")
    rgb = np.zeros((20, 24, 3), np.uint8) + np.array(COLORS["dog"], np.uint8)
    expected = stacker.predict(rgb, model=model / "model").proba
    with pytest.warns(UserWarning, match=r"\[0, 1\]: scaled by 255"):
        scaled = stacker.predict(rgb.astype(np.float32) / 255.0, model=model / "model").proba
    np.testing.assert_allclose(scaled, expected, atol=1e-5)
    grey = np.full((20, 24), 120, np.uint8)
    assert stacker.predict(grey, model=model / "model").proba.shape == (1, 2)
    assert stacker.predict(grey[..., None], model=model / "model").proba.shape == (1, 2)
    assert stacker.predict(np.stack([grey, grey]), model=model / "model").proba.shape == (2, 2)
    with pytest.raises(ValueError, match="normalised input"):
        stacker.predict(rgb.astype(np.float32) / 127.5 - 1, model=model / "model")
    with pytest.raises(ValueError, match="no images to predict"):
        stacker.predict([], model=model / "model")
    with pytest.raises(ValueError, match="no images to predict"):
        ens.predict_proba(np.zeros((0, 8, 8, 3), np.uint8))
    # a folder of class sub-folders: every image, labels ignored
    res = stacker.predict(model / "train", model=model / "model")
    assert len(res) == 12 and res.ids[0] == os.path.join("cat", "0.png")
    with pytest.raises(ValueError, match="holds sub-folders .* and no image files; pass one sub-folder"):
        sources.from_test_folder(model / "train")


def test_a_loaded_ensemble_follows_its_on_bad_image_attribute(model, tmp_path):
    ens = Ensemble.load(model / "model")
    ens.on_bad_image = "skip"  # W4
    proba = ens.predict_proba([str(model / "train" / "cat" / "0.png"), str(tmp_path / "missing.png")])
    assert np.isfinite(proba[0]).all() and np.isnan(proba[1]).all()
    assert "file not found" in ens.last_skipped_[1]


# ----------------------------------------------------------------------------- threads


def test_concurrent_predictions_with_mixed_options_equal_sequential_ones(model, tmp_path):
    """8 threads x 25 calls on one loaded model, mixed on_bad_image and batch sizes."""
    paths = [str(p) for p in sorted((model / "train").rglob("*.png"))][:8]
    bad = str(tmp_path / "missing.png")
    calls = []
    for i in range(200):
        policy = "skip" if i % 2 else "raise"
        chosen = paths[i % 5 : i % 5 + 3] + ([bad] if policy == "skip" else [])
        calls.append((chosen, policy, (1, 2, 3, 32)[i % 4]))

    def run(call):
        chosen, policy, batch = call
        res = stacker.predict(chosen, model=model / "model", on_bad_image=policy, batch_size=batch)
        return res.proba, res.skipped

    expected = [run(c) for c in calls]
    results = [None] * len(calls)
    errors = []

    def worker(t):
        try:
            for i in range(t, len(calls), 8):
                results[i] = run(calls[i])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    for (p, s), (ep, es) in zip(results, expected):
        np.testing.assert_allclose(p, ep, atol=1e-6)
        assert s == es
    loaded = stacker.load(model / "model")
    assert loaded.on_bad_image == "raise", "per-call options never touch the shared model"
    assert all(ext.batch_size == 32 and ext.on_bad_image == "raise"
               for lr in loaded.learners_.values() for ext in lr.views().values())
