"""Extraction progress in a log file: periodic plain lines, not one line at the end."""

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, TINY, make_class_folders, make_image
from stacker.features.extractor import FeatureExtractor
from stacker.features.progress import LogProgress


@pytest.mark.slow
def test_a_piped_extract_prints_a_line_per_batch_with_increasing_counts(tmp_path):
    root = make_class_folders(tmp_path / "train", 8)  # 16 images, 4 batches of 4
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests")]),
           "STACKER_PLUGINS": "tinynet", "STACKER_PROGRESS_SECONDS": "0"}
    proc = subprocess.run([sys.executable, "-m", "stacker", "extract", str(root), "--cache", str(tmp_path / "cache"),
                           "--backbones", "tiny_cnn", "--image-size", "32", "--weights", "none", "--batch-size", "4"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [m for m in re.finditer(r"^tiny_cnn: (\d+)/16 images \((\d+)%\), [\d.]+ images/s, (.*)$",
                                    proc.stderr, re.M)]
    counts = [int(m.group(1)) for m in lines]
    assert counts == [4, 8, 12, 16], proc.stderr
    assert all(re.fullmatch(r"about \d.* left|almost done", m.group(3)) for m in lines[:-1])
    assert lines[-1].group(3).startswith("done in ")
    assert "tiny_cnn: 16 images cached" in proc.stdout


def test_lines_come_every_tenth_when_the_interval_is_long_and_never_at_verbose_zero(tmp_path, capsys, monkeypatch):
    bar = LogProgress(200, "b", seconds=1e9)
    for done in range(1, 201):
        bar.update(done)
    counts = [int(line.split()[1].split("/")[0]) for line in capsys.readouterr().out.splitlines()]
    assert counts == list(range(20, 201, 20))
    monkeypatch.setenv("STACKER_PROGRESS_SECONDS", "0")
    paths = [str(make_image(tmp_path / f"{i}.png", (200, 60, 50), seed=i)) for i in range(6)]
    FeatureExtractor(**TINY, batch_size=2, verbose=0).extract(paths)
    assert capsys.readouterr().out == ""
