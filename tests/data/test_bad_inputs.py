"""Every kind of odd or broken image under both policies, and data problems with clear errors.

Odd but valid images (1x1, animated GIF, EXIF-rotated, 16-bit PNG, CMYK JPEG, PNG named
.jpg) are used under both policies. Broken ones (empty, truncated, text, decompression
bomb) raise naming the file and the reason under ``on_bad_image="raise"``, and under
``"skip"`` are left out and listed with their reason in the model directory and report.
"""

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import TINY, make_class_folders, make_image
from stacker.data import decode, scan
from stacker.ensemble import Ensemble
from stacker.features.extractor import FeatureExtractor
from stacker.data.sources import BadImageError



def _png_header_only(path, width, height):
    """A PNG whose header claims width x height pixels (a decompression bomb, without the memory)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def _jpeg_bytes(color=(200, 60, 50), size=(24, 20), mode="RGB", exif=None):
    buf = io.BytesIO()
    img = Image.new("RGB", size, color)
    img = img.convert(mode) if mode != "RGB" else img
    img.save(buf, "JPEG", **({"exif": exif} if exif else {}))
    return buf.getvalue()


def write_odd(kind, path):
    """Odd but valid images: (path, expected to be usable)."""
    if kind == "one_pixel":
        Image.new("RGB", (1, 1), (200, 60, 50)).save(path.with_suffix(".png"))
        return path.with_suffix(".png")
    if kind == "animated_gif":
        frames = [Image.new("RGB", (20, 20), c) for c in ((200, 60, 50), (0, 255, 0), (0, 0, 255))]
        frames[0].save(path.with_suffix(".gif"), save_all=True, append_images=frames[1:], duration=50, loop=0)
        return path.with_suffix(".gif")
    if kind == "exif_rotated":
        exif = Image.Exif()
        exif[0x0112] = 6
        path.with_suffix(".jpg").write_bytes(_jpeg_bytes(exif=exif.tobytes()))
        return path.with_suffix(".jpg")
    if kind == "png16":
        return make_image(path.with_suffix(".png"), (200, 60, 50), mode="I;16")
    if kind == "cmyk_jpeg":
        path.with_suffix(".jpg").write_bytes(_jpeg_bytes(mode="CMYK"))
        return path.with_suffix(".jpg")
    if kind == "png_named_jpg":
        Image.new("RGB", (20, 20), (200, 60, 50)).save(path.with_suffix(".jpg"), format="PNG")
        return path.with_suffix(".jpg")
    raise KeyError(kind)


def write_broken(kind, path):
    """Broken files: (path, words the reason must contain)."""
    p = path.with_suffix(".png" if kind == "bomb" else ".jpg")
    if kind == "empty":
        p.write_bytes(b"")
        return p, "empty file"
    if kind in ("truncated_jpeg", "truncated_header"):
        data = np.random.default_rng(0).integers(0, 255, (64, 64, 3)).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(data).save(buf, "JPEG")
        cut = 200 if kind == "truncated_header" else int(len(buf.getvalue()) * 0.7)
        p.write_bytes(buf.getvalue()[:cut])
        return p, "truncated"
    if kind == "text":
        p.write_text("this is not an image\n")
        return p, "not an image"
    if kind == "bomb":
        return _png_header_only(p, 40_000, 40_000), "decompression bomb"
    raise KeyError(kind)


ODD = ["one_pixel", "animated_gif", "exif_rotated", "png16", "cmyk_jpeg", "png_named_jpg"]
BROKEN = ["empty", "truncated_header", "truncated_jpeg", "text", "bomb"]


@pytest.mark.parametrize("policy", ["raise", "skip"])
@pytest.mark.parametrize("kind", ODD)
def test_odd_images_are_used_under_both_policies(tmp_path, kind, policy):
    path = write_odd(kind, tmp_path / kind)
    ext = FeatureExtractor(**TINY, on_bad_image=policy, verbose=0)
    feats = ext.extract([str(path)])
    assert feats.skipped == {} and feats.values.shape == (1, 16) and np.isfinite(feats.values).all()


def test_odd_images_decode_to_the_right_pixels(tmp_path):
    gif = write_odd("animated_gif", tmp_path / "anim")
    rotated = write_odd("exif_rotated", tmp_path / "rot")
    one = write_odd("one_pixel", tmp_path / "one")
    (_, first), = [(r, p.numpy()) for r, p in decode.pixel_batches([str(gif)], 20)]
    np.testing.assert_allclose(first[0].mean(axis=(0, 1)), (200, 60, 50), atol=2)  # the first frame only
    orient, bad = scan.scan_images([str(rotated), str(one)])
    assert orient[0] == 6 and not bad
    (_, px), = [(r, p.numpy()) for r, p in decode.pixel_batches([str(rotated)], 16, orientations=orient[:1])]
    assert px.shape == (1, 16, 16, 3)
    (_, px1), = [(r, p.numpy()) for r, p in decode.pixel_batches([str(one)], 8)]
    np.testing.assert_allclose(px1[0], np.broadcast_to([200, 60, 50], (8, 8, 3)), atol=1)


@pytest.mark.parametrize("kind", BROKEN)
def test_broken_images_raise_with_name_and_reason_or_are_skipped(tmp_path, kind):
    path, reason = write_broken(kind, tmp_path / kind)
    good = make_image(tmp_path / "good.png", (50, 80, 200))
    with pytest.raises(BadImageError, match=f"{path.name}.*{reason}"):
        FeatureExtractor(**TINY, on_bad_image="raise", verbose=0).extract([str(good), str(path)])
    feats = FeatureExtractor(**TINY, on_bad_image="skip", verbose=0).extract([str(good), str(path)])
    assert list(feats.kept) == [0] and reason in feats.skipped[1]


def test_ensemble_skips_every_broken_file_and_reports_it(tmp_path):
    root = make_class_folders(tmp_path / "train", 6, seed_step=30)
    broken = {}
    for kind in BROKEN:
        path, reason = write_broken(kind, root / "cat" / f"bad_{kind}")
        broken[str(path)] = reason
    odd = [str(write_odd(kind, root / "dog" / f"odd_{kind}")) for kind in ODD]
    with pytest.raises(BadImageError, match="bad_"):
        Ensemble([TINY], cv=3, models="logistic", verbose=0).fit(root)
    ens = Ensemble([TINY], cv=3, models="logistic", on_bad_image="skip", verbose=0)
    with pytest.warns(UserWarning, match=f"{len(broken)} files were not used for training"):
        ens.fit(root)
    assert set(ens.skipped_) == set(broken)
    for path, reason in broken.items():
        assert reason in ens.skipped_[path]
    assert set(odd) <= set(ens.train_paths_)
    out = ens.save(tmp_path / "model")
    manifest = json.loads((tmp_path / "model" / "manifest.json").read_text())
    assert set(manifest["skipped"]) == set(broken)
    from stacker.app.report import report

    html = open(report(out)).read()
    for path in broken:
        assert path.rsplit("/", 1)[-1] in html
    # prediction: a broken test file gets a NaN row and is listed, the rest are predicted
    proba = ens.predict_proba([odd[0], next(iter(broken))])
    assert np.isfinite(proba[0]).all() and np.isnan(proba[1]).all() and len(ens.last_skipped_) == 1


def test_nan_features_are_refused_and_not_cached(tmp_path, monkeypatch):
    good = [make_image(tmp_path / f"{i}.png", (50, 80, 200), seed=i) for i in range(3)]
    ext = FeatureExtractor(**TINY, cache_dir=tmp_path / "cache", verbose=0)
    monkeypatch.setattr(FeatureExtractor, "_run", lambda self, px: np.full((len(px), 16), np.nan, np.float32))
    with pytest.raises(FloatingPointError, match="NaN/inf"):
        ext.extract([str(p) for p in good])
    monkeypatch.undo()
    fresh = FeatureExtractor(**TINY, cache_dir=tmp_path / "cache", verbose=0, weights_id=ext.weights_id)
    assert np.isfinite(fresh.extract([str(p) for p in good]).values).all()
