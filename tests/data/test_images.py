"""Data sources, the format table, user inputs, odd image modes, EXIF orientation and bad-image handling."""

import os

import numpy as np
import pytest
from PIL import Image

from conftest import COLORS, TINY, make_image
from stacker.data import decode, formats, inputs, scan, sources


def test_class_folders(class_folders):
    data = sources.load_images(class_folders)
    assert data.classes == ["cat", "dog"]
    assert len(data) == 24
    assert np.bincount(data.y).tolist() == [12, 12]
    assert data.ids[0] == os.path.join("cat", "0.png")


def test_kaggle_names(kaggle_dir):
    data = sources.load_images(kaggle_dir / "train")
    assert data.classes == ["cat", "dog"]
    assert data.labels[:2] == ["cat", "cat"] and data.labels[-1] == "dog"
    assert data.ids[:3] == ["cat.0.jpg", "cat.1.jpg", "cat.2.jpg"]


def test_csv_source(tmp_path, class_folders):
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\ncat/0.png,cat\ndog/3.png,dog\ncat/1.png,cat\n")
    data = sources.from_csv(csv, root=class_folders)
    assert data.labels == ["cat", "dog", "cat"] and data.classes == ["cat", "dog"]
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\ncat/0.png,cat\nnope.png,dog\n")
    missing = sources.from_csv(bad, root=class_folders)  # the row stays; extraction reports it under the policy
    assert len(missing) == 2 and scan.scan_images(missing.paths)[1] == {1: "file not found"}
    with pytest.raises(sources.BadImageError, match="nope.png: file not found"):
        sources.file_fingerprints(missing.paths)
    with pytest.raises(ValueError, match="no column"):
        (tmp_path / "cols.csv").write_text("file,y\na,b\n")
        sources.from_csv(tmp_path / "cols.csv")


def test_test_folder_ids_sorted_numerically(kaggle_dir):
    data = sources.load_images(kaggle_dir / "test", labelled=False)
    assert data.ids == list(range(1, 13))
    assert data.labels is None
    assert os.path.basename(data.paths[9]) == "10.jpg"


def test_errors_are_clear(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="neither image files nor class folders"):
        sources.load_images(empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sources.load_images(tmp_path / "missing")
    (empty / "cat").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        sources.from_folder(empty)
    with pytest.raises(ValueError, match="duplicate image ids"):
        sources.ImageSet(["a.jpg", "b.jpg"], [1, 1])
    with pytest.raises(ValueError, match="not among the classes"):
        sources.ImageSet(["a.jpg"], [0], ["zebra"], ["cat", "dog"])
    with pytest.raises(ValueError, match="2 ids for 1 images"):
        sources.ImageSet(["a.jpg"], [0, 1])



def test_the_format_table_gives_magic_exif_formats_and_extensions():
    assert formats.sniff(b"\xff\xd8\xff\xe0") == "JPEG" and formats.sniff(b"\x89PNG\r\n\x1a\n") == "PNG"
    assert formats.sniff(b"RIFF\0\0\0\0WEBPVP8 ") == "WEBP" and formats.sniff(b"RIFF\0\0\0\0AVI ") is None
    assert formats.sniff(b"") is None and formats.HEAD_BYTES == 12
    assert formats.EXIF_FORMATS == {"JPEG", "MPO", "PNG", "WEBP"}
    assert {".heic", ".heif", ".jpg", ".png", ".tif", ".webp"} <= set(formats.IMAGE_EXTENSIONS)
    assert [f.name for f in formats.FORMATS if f.tensorflow] == ["JPEG", "PNG", "GIF", "BMP", "WEBP"]


def test_as_images_reads_every_kind_of_input(tmp_path, class_folders, kaggle_dir):
    rgb = np.zeros((4, 5, 3), np.uint8)
    arrays = inputs.as_images([rgb, Image.fromarray(rgb)])
    assert isinstance(arrays, inputs.Arrays) and [a.shape for a in arrays] == [(4, 5, 3)] * 2
    dark = inputs.as_images(np.ones((4, 5), np.uint8))  # pixels of value 1, not [0, 1] floats
    assert inputs.as_images(dark) is dark and dark[0].max() == 1.0, "checked arrays are not scaled again"
    assert inputs.as_images(kaggle_dir / "test").ids == list(range(1, 13))
    every = inputs.as_images(class_folders)  # class folders: every image, labels ignored
    assert len(every) == 24 and every.labels is None and every.ids[0] == os.path.join("cat", "0.png")
    assert inputs.as_images(class_folders, labelled=True).classes == ["cat", "dog"]
    (tmp_path / "list.csv").write_text(f"path,label\n{class_folders}/cat/0.png,cat\n")
    assert inputs.as_images(tmp_path / "list.csv").labels == ["cat"]
    missing = str(tmp_path / "missing.jpg")  # one file: extraction reports it under on_bad_image
    assert inputs.as_images(missing).paths == inputs.as_images(missing).ids == [missing]
    assert inputs.as_images([missing, missing]).ids == [0, 1], "a list may name a file twice"
    given = sources.ImageSet([missing], ["m"])
    assert inputs.as_images(given) is given
    for empty in ([], np.zeros((0, 8, 8, 3), np.uint8)):
        with pytest.raises(ValueError, match="no images to predict"):
            inputs.as_images(empty)
    with pytest.raises(ValueError, match="carry no labels"):
        inputs.as_images(rgb, labelled=True)
    paths, unread = inputs.expand_paths([str(kaggle_dir / "test"), missing])
    assert len(paths) == 13 and paths[-1] == missing and not unread


@pytest.mark.parametrize("mode,fmt,ext", [
    ("RGB", "JPEG", "jpg"), ("L", "JPEG", "jpg"), ("CMYK", "JPEG", "jpg"), ("RGBA", "PNG", "png"),
    ("P", "PNG", "png"), ("LA", "PNG", "png"), ("I;16", "PNG", "png"), ("RGB", "BMP", "bmp"),
    ("P", "GIF", "gif"), ("RGB", "PNG", "jpg"),  # a PNG named .jpg
])
def test_any_mode_decodes_to_rgb(tmp_path, mode, fmt, ext):
    path = make_image(tmp_path / f"x.{ext}", COLORS["dog"], size=(24, 20), mode=mode, fmt=fmt)
    (rows, pixels), = list(decode.pixel_batches([str(path)], 24, 4))
    assert rows.numpy().tolist() == [0]
    px = pixels.numpy()[0]
    assert px.shape == (24, 24, 3) and px.dtype == np.float32
    assert 0 <= px.min() and px.max() <= 255
    ref = Image.open(path)
    if mode == "I;16":  # TensorFlow scales 16-bit to 8-bit (PIL's convert would clip)
        ref = Image.fromarray((np.asarray(ref).astype(np.float64) / 257).round().astype(np.uint8))
    ref = np.asarray(ref.convert("RGB").resize((24, 24), Image.BILINEAR), dtype=np.float32)
    assert np.abs(px.mean(axis=(0, 1)) - ref.mean(axis=(0, 1))).max() < 6  # same colours, any mode


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((10, 30, 3), dtype=np.uint8)
    arr[:, :10] = 255  # white stripe on the left of a wide image
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the upright image is tall, stripe on top
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif, quality=95)
    orient, bad = scan.scan_images([str(path)])
    assert orient.tolist() == [6] and not bad
    (_, pixels), = list(decode.pixel_batches([str(path)], 30, 1, orient))
    px = pixels.numpy()[0].mean(axis=2)
    assert px[:8].mean() > 200 and px[-8:].mean() < 50


def test_scan_finds_bad_files(tmp_path):
    good = make_image(tmp_path / "good.jpg", COLORS["cat"])
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    orient, bad = scan.scan_images([str(good), str(tmp_path / "zero.jpg"), str(tmp_path / "text.jpg")])
    assert set(bad) == {1, 2}
    assert "empty" in bad[1] and "not an image" in bad[2]


def test_scan_in_threads_agrees_with_one_thread(tmp_path, monkeypatch):
    paths = [str(make_image(tmp_path / f"{i}.jpg", COLORS["cat"])) for i in range(5)]
    (tmp_path / "text.jpg").write_text("not an image")
    paths.insert(2, str(tmp_path / "text.jpg"))
    serial = scan.scan_images(paths, probe_files=2)
    monkeypatch.setattr(scan.time, "thread_time", lambda: 0.0)  # every file looks like it waited on storage
    pooled = scan.scan_images(paths, probe_files=2)
    np.testing.assert_array_equal(serial[0], pooled[0])
    assert serial[1] == pooled[1] and set(serial[1]) == {2}


@pytest.mark.parametrize("fmt,ext", [("JPEG", "jpg"), ("PNG", "png"), ("GIF", "gif"), ("BMP", "bmp"),
                                     ("WEBP", "webp"), ("TIFF", "tif")])
def test_open_image_opens_what_pillow_opens(tmp_path, fmt, ext):
    path = tmp_path / f"a.{ext}"
    Image.new("RGB", (9, 7), (10, 200, 30)).save(path, fmt)
    with formats.open_image(str(path)) as a, Image.open(path) as b:
        assert (a.format, a.size, a.mode) == (b.format, b.size, b.mode)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    fake = tmp_path / "fake.jpg"  # a JPEG's first bytes, then nothing: refused as by Image.open, after the full search
    fake.write_bytes(b"\xff\xd8\xff" + b"\x00" * 5)
    with pytest.raises(Image.UnidentifiedImageError):
        formats.open_image(str(fake))


def test_truncated_jpeg_is_dropped_from_the_stream(tmp_path):
    good = make_image(tmp_path / "good.jpg", COLORS["cat"], size=(64, 64))
    data = open(good, "rb").read()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    rows = [r for batch, _ in decode.pixel_batches([str(good), str(tmp_path / "trunc.jpg")], 16, 4)
            for r in batch.numpy()]
    assert rows == [0]
    assert "truncated" in scan.decode_failure_reason(str(tmp_path / "trunc.jpg"))


def test_arrays_and_pil_images_resize_like_files(tmp_path):
    path = make_image(tmp_path / "a.png", COLORS["owl"], size=(40, 30))
    (_, from_file), = list(decode.pixel_batches([str(path)], 16, 1))
    pil = Image.open(path)
    from_pil = next(decode.array_batches([pil], 16))
    from_arr = next(decode.array_batches([np.asarray(pil)], 16))
    np.testing.assert_allclose(from_file.numpy(), from_pil, atol=1e-4)
    np.testing.assert_allclose(from_pil, from_arr, atol=1e-4)


def test_primed_starts_the_first_item_at_once_and_yields_everything_in_order():
    import threading

    started = threading.Event()

    def items():
        started.set()  # runs in Primed's thread, before anyone iterates
        yield from range(5)

    primed = decode.Primed(items())
    assert started.wait(5), "the first item is being made before iteration"
    assert list(primed) == [0, 1, 2, 3, 4]
    assert list(decode.Primed(iter(()))) == []
    closed = []

    def closing():
        try:
            yield from range(3)
        finally:
            closed.append(True)

    decode.Primed(closing()).close()
    assert closed == [True]


def test_extraction_with_refused_files_among_the_first_batches_matches_the_good_files_alone(tmp_path):
    # the decoders start before the header scan: what it refuses must not reach the network
    from stacker.features.extractor import FeatureExtractor

    good = [str(make_image(tmp_path / f"{i}.png", COLORS["cat"], seed=i)) for i in range(7)]
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    bomb = tmp_path / "bomb.png"
    Image.new("1", (10000, 10000)).save(bomb)  # 1e8 pixels: over the limit, a small file
    paths = [good[0], str(bomb)] + good[1:4] + [str(text)] + good[4:]
    ext = FeatureExtractor(**TINY, batch_size=2, verbose=0, on_bad_image="skip")
    feats = ext.extract(paths)
    assert set(feats.skipped) == {1, 5}
    # the same images (in batches of another make-up: ONNX Runtime's sums may round differently)
    np.testing.assert_allclose(feats.values, ext.extract(good).values, rtol=1e-5, atol=1e-7)
