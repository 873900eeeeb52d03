"""What a new user reads first: ``stacker predict``'s table and ``stacker fit --predictions``, through the real CLI."""

import csv
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO, make_image

CLASSES = {"cat": (200, 60, 50), "hippopotamus": (50, 80, 200), "owl": (60, 190, 60)}  # labels of unequal length


pytestmark = pytest.mark.slow  # a fitted model and two stacker processes


def _stacker(*args, cwd):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests")]),
           "STACKER_PLUGINS": "tinynet", "STACKER_CACHE_DIR": os.path.join(str(cwd), "cache")}
    proc = subprocess.run([sys.executable, "-m", "stacker", *args, "--quiet"], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """``stacker fit`` of three classes plus one corrupt file, with ``--predictions``; run from the folder."""
    root = tmp_path_factory.mktemp("preds")
    for c, color in CLASSES.items():
        (root / "train" / c).mkdir(parents=True)
        for i in range(6):
            make_image(root / "train" / c / f"{i}.png", color, seed=i + 10 * len(c))
    (root / "train" / "cat" / "broken.png").write_bytes(b"not a picture")
    proc = _stacker("fit", "train", "--out", "model", "--backbones", "tiny_cnn", "--image-size", "32",
                    "--weights", "none", "--folds", "3", "--models", "logistic", "--on-bad-image", "skip",
                    "--no-report", "--predictions", "p.csv", cwd=root)
    return root, proc


def test_fit_predictions_csv_has_one_row_per_image_with_its_loss_and_fold(fitted):
    root, proc = fitted
    assert "out-of-fold predictions: p.csv" in proc.stdout
    with open(root / "p.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 6 + 1
    assert {r["path"] for r in rows} == {str(p) for p in (root / "train").rglob("*.png")}, "absolute paths"
    used = [r for r in rows if not r["skipped"]]
    assert len(used) == 18
    for r in used:
        p = {c: float(r[f"p_{c}"]) for c in CLASSES}
        assert math.isclose(sum(p.values()), 1, abs_tol=1e-9) and 0 < min(p.values())
        assert math.isclose(float(r["loss"]), -math.log(p[r["label"]]), rel_tol=1e-9)
        assert r["predicted"] == max(p, key=p.get) and float(r["probability"]) == max(p.values())
        assert r["label"] == os.path.basename(os.path.dirname(r["path"])) and r["fold"] in {"0", "1", "2"}
    worst = sorted(used, key=lambda r: -float(r["loss"]))
    assert float(worst[0]["loss"]) >= float(worst[-1]["loss"])
    (bad,) = [r for r in rows if r["skipped"]]
    assert bad["path"] == str(root / "train" / "cat" / "broken.png") and bad["label"] == "cat"
    assert bad["p_cat"] == bad["loss"] == bad["predicted"] == bad["fold"] == ""
    assert bad["skipped"] not in ("", "not predicted"), "the reason the file was left out"


def test_predict_prints_a_header_and_aligned_columns(fitted):
    root, _ = fitted
    images = ["train/cat/0.png", "train/hippopotamus/1.png", "train/owl/2.png", "train/cat/broken.png"]
    proc = _stacker("predict", "model", *images, "--on-bad-image", "skip", cwd=root)
    header, *lines = proc.stdout.rstrip("\n").split("\n")
    assert header.split() == ["path", "predicted", "probability", "second", "probability"]
    assert len(lines) == len(images)
    start = header.index("predicted")
    end = header.index("probability") + len("probability")
    for path, line in zip(images, lines):
        assert line.startswith(path + " ")
        label = line[start:].split()[0]
        assert label in (*CLASSES, "SKIPPED"), line
        if label == "SKIPPED":
            assert line[start:].split(None, 2)[1] == "-" and len(line.split()) > 3, "the reason follows"
            continue
        number = line[:end].split()[-1]
        assert line[end - len(number) - 1] == " ", f"right-aligned under its header: {line}"
        second = line[header.index("second"):].split()
        assert second[0] in CLASSES and second[0] != label
        assert number.lstrip("<>") != "1.0000" and second[1].lstrip("<>") != "0.0000", "never shown as certain"
        assert line.endswith(second[1]) and len(line) == len(header), "the last number ends under its header"
    assert "skipped train/cat/broken.png" in proc.stderr

