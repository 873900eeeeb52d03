"""What a new user reads from `stacker fit`: label slips, too few images, skipped files, in command-line terms."""

import os
import re
import subprocess
import sys

import pytest

from conftest import COLORS, REPO, make_class_folders, make_image

TINY_FIT = ["--backbones", "tiny_cnn", "--image-size", "32", "--weights", "none", "--folds", "3",
            "--models", "logistic", "--no-report"]


def _stacker(tmp_path, *args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests")]),
           "STACKER_PLUGINS": "tinynet", "STACKER_CACHE_DIR": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "-m", "stacker", *map(str, args)], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300)


def _labelled_csv(tmp_path, labels):
    (tmp_path / "img").mkdir()
    lines = []
    for i, label in enumerate(labels):
        make_image(tmp_path / "img" / f"{i}.png", COLORS[label.strip().lower()], seed=i)
        lines.append(f"img/{i}.png,{label}\n")
    (tmp_path / "train.csv").write_text("path,label\n" + "".join(lines))
    return tmp_path / "train.csv"


@pytest.mark.slow
def test_label_variants_stop_fit_with_lines_and_merge_labels_merges_them(tmp_path):
    csv = _labelled_csv(tmp_path, ["cat"] * 5 + ["Cat"] + ["dog"] * 6)
    proc = _stacker(tmp_path, "fit", csv, "--out", tmp_path / "m", *TINY_FIT)
    assert proc.returncode == 1
    assert (f"stacker fit: error: {csv}: labels that differ only in case or spaces: 'Cat' (1 row: line 7 img/5.png) "
            "and 'cat' (5 rows: line 2 img/0.png, line 3 img/1.png, line 4 img/2.png, ...); fix them or pass "
            "--merge-labels to merge them into the most frequent spelling") in proc.stderr, proc.stderr
    proc = _stacker(tmp_path, "fit", csv, "--out", tmp_path / "m", "--merge-labels", *TINY_FIT)
    assert proc.returncode == 0, proc.stderr
    assert "2 classes: cat 6, dog 6" in proc.stderr


def test_too_few_images_and_no_labels_read_in_command_line_terms(tmp_path):
    root = make_class_folders(tmp_path / "train", 4)
    (root / "owl").mkdir()
    make_image(root / "owl" / "0.png", COLORS["owl"])
    make_image(root / "owl" / "1.png", COLORS["owl"], seed=1)
    proc = _stacker(tmp_path, "fit", root, "--out", tmp_path / "m", *TINY_FIT[:-3], "--folds", "5")
    assert proc.returncode == 1
    line = proc.stderr.strip().splitlines()[-1]
    assert line == ("stacker fit: error: classes 'cat' (4 images), 'dog' (4 images), 'owl' (2 images) have fewer "
                    "images than --folds 5: every fold needs images of each class; add images, fix the files, "
                    "merge classes or use --folds 2"), line
    assert not re.search(r"\bcv\b", line)
    (tmp_path / "test").mkdir()
    for i in range(3):
        make_image(tmp_path / "test" / f"{i}.png", COLORS["cat"], seed=i)
    proc = _stacker(tmp_path, "fit", tmp_path / "test", "--out", tmp_path / "m", *TINY_FIT)
    assert proc.returncode == 1
    assert ("stacker fit: error: fit needs labelled images: class sub-folders (train/cat/1.jpg), Kaggle-style names "
            "(cat.1.jpg) or a CSV with path,label columns; found 3 images without labels in "
            f"{tmp_path / 'test'} (e.g. 0.png, 1.png, 2.png)") in proc.stderr, proc.stderr


@pytest.mark.slow
def test_skipped_files_warn_in_command_line_style_with_each_file(tmp_path):
    root = make_class_folders(tmp_path / "train", 6)
    bad = root / "cat" / "broken.png"
    bad.write_bytes(b"this is not a picture")
    proc = _stacker(tmp_path, "fit", root, "--out", tmp_path / "m", "--on-bad-image", "skip", *TINY_FIT)
    assert proc.returncode == 0, proc.stderr
    assert "stacker fit: warning: 1 file was not used for training:" in proc.stderr, proc.stderr
    assert f"  {bad}: not an image file" in proc.stderr
    assert "manifest.json" in proc.stderr
    assert "UserWarning" not in proc.stderr and ".py:" not in proc.stderr and "warnings.warn" not in proc.stderr


def test_the_skipped_warning_lists_ten_files_and_carries_all():
    import pickle

    from stacker.data.sources import SkippedImagesWarning

    w = SkippedImagesWarning({f"/d/{i}.jpg": "empty file (0 bytes)" for i in range(12)})
    lines = str(w).splitlines()
    assert lines[0] == "12 files were not used for training:" and lines[1] == "  /d/0.jpg: empty file (0 bytes)"
    assert lines[11] == "  and 2 more" and "manifest.json" in lines[12]
    assert len(pickle.loads(pickle.dumps(w)).skipped) == 12 and isinstance(w, UserWarning)
