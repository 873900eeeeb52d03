"""Every header-level bad file (a cut-short one too) is reported in one error, before any forward pass."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, TINY, make_class_folders
from stacker.data import scan
from stacker.ensemble import Ensemble
from stacker.features.extractor import BadImageError, forward_pass_count


def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def _bad_files(folder):
    """An empty file, text named .jpg, a JPEG cut short: ``{path: what its reason says}``."""
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("not a picture\n")
    (folder / "cut.jpg").write_bytes(_encoded("JPEG")[:-400])
    return {str(folder / "empty.jpg"): "empty file", str(folder / "notes.jpg"): "not an image file",
            str(folder / "cut.jpg"): "truncated"}


def test_the_scan_finds_cut_short_files_and_accepts_bytes_after_the_end(tmp_path):
    jpeg, png, gif = _encoded("JPEG"), _encoded("PNG"), _encoded("GIF")
    files = {"cut.jpg": jpeg[: len(jpeg) // 2], "cut.png": png[: len(png) // 2], "cut.gif": gif[: len(gif) // 2],
             "tail.jpg": jpeg + b"\0\0camera data", "tail.png": png + b"xx", "ok.jpg": jpeg, "ok.gif": gif}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    _, bad = scan.scan_images([str(tmp_path / n) for n in files])
    assert sorted(bad) == [0, 1, 2] and all("truncated" in r for r in bad.values()), bad


def test_fit_lists_every_bad_file_at_once_without_a_forward_pass(tmp_path):
    root = make_class_folders(tmp_path / "train", 4)
    expected = _bad_files(root / "cat")
    before = forward_pass_count()
    with pytest.raises(BadImageError) as err:
        Ensemble([TINY], cv=2, models="logistic", verbose=0).fit(root)
    assert forward_pass_count() == before
    assert set(err.value.paths) == set(expected)
    for path, reason in expected.items():
        assert reason in err.value.paths[path]


@pytest.mark.slow
def test_the_command_line_shows_every_bad_file_before_extracting(tmp_path):
    root = make_class_folders(tmp_path / "train", 4)
    expected = _bad_files(root / "cat")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests")]),
           "STACKER_PLUGINS": "tinynet"}
    proc = subprocess.run([sys.executable, "-m", "stacker", "fit", str(root), "--out", str(tmp_path / "m"),
                           "--cache", str(tmp_path / "cache"), "--backbones", "tiny_cnn", "--image-size", "32",
                           "--weights", "none", "--folds", "2", "--models", "logistic", "--no-report"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 1 and "stacker fit: error: " in proc.stderr, proc.stderr
    assert "pass --on-bad-image skip" in proc.stderr
    for path, reason in expected.items():
        assert any(line.startswith(f"  {path}: ") and reason in line for line in proc.stderr.splitlines()), path
    assert "extracting features" not in proc.stderr  # the scan stopped it before any batch
