"""``stacker evaluate`` on a labelled hold-out, and ``stacker report`` run from another folder (issue 27)."""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import COLORS, REPO, make_image

COLORS3 = {**COLORS, "owl": (60, 190, 60)}


def _stacker(args, cwd, env_dir):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests")]),
           "STACKER_PLUGINS": "tinynet", "STACKER_CACHE_DIR": str(env_dir / "default-cache")}
    return subprocess.run([sys.executable, "-m", "stacker", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def _class_folders(root, n, seed):
    for j, (c, color) in enumerate(COLORS3.items()):
        (root / c).mkdir(parents=True)
        for i in range(n):
            make_image(root / c / f"{i}.png", color, seed=seed + 10 * j + i)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny 3-class model fitted through a real ``stacker fit`` run in ``proj`` on the relative path data/train."""
    root = tmp_path_factory.mktemp("evaluate")
    proj = root / "proj"
    _class_folders(proj / "data" / "train", 6, seed=0)
    _class_folders(root / "holdout", 3, seed=500)
    proc = _stacker(["fit", "data/train", "--out", "model", "--backbones", "tiny_cnn", "--image-size", "32",
                     "--weights", "none", "--folds", "3", "--models", "logistic", "--quiet"], proj, root)
    assert proc.returncode == 0, proc.stderr
    return root, proj / "model"


@pytest.mark.slow
def test_evaluate_prints_scores_per_class_confusion_and_writes_every_image(project):
    root, model = project
    (root / "holdout" / "cat" / "broken.png").write_bytes(b"")
    proc = _stacker(["evaluate", str(model), "holdout", "--predictions", "preds.csv", "--report", "holdout-report",
                     "--on-bad-image", "skip", "--quiet"], root, root)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "hold-out: 10 images (cat 4, dog 3, owl 3); 9 scored, 1 skipped (listed on stderr)" in out
    ensemble = next(line.split() for line in out.splitlines() if line.startswith("ensemble "))
    accuracy, log_loss = float(ensemble[1]), float(ensemble[2])
    assert 0 <= accuracy <= 1 and log_loss >= 0
    assert "tiny_cnn@32:logistic" in out
    assert "per class (ensemble):" in out and "confusion (rows: true class, columns: predicted):" in out
    for c in ("cat", "dog", "owl"):
        assert any(line.split()[:2] == [c, "3"] for line in out.splitlines()), f"per-class row of {c}"
    assert f"skipped {os.path.join('holdout', 'cat', 'broken.png')}: " in proc.stderr
    with open(root / "preds.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 and {r["label"] for r in rows} == {"cat", "dog", "owl"}
    (broken,) = [r for r in rows if r["path"].endswith("broken.png")]
    assert broken["skipped"] and broken["predicted"] == ""
    losses = [float(r["loss"]) for r in rows if r is not broken]
    assert np.mean(losses) == pytest.approx(log_loss, abs=2e-4), "the CSV holds the images the score is made of"
    html = (root / "holdout-report" / "evaluation.html").read_text()
    for heading in ("Scores (hold-out)", "Calibration", "Confusion matrix", "Per-class precision, recall, F1",
                    "Images", "Highest hold-out loss", "Skipped images"):
        assert f"<h2>{heading}</h2>" in html, heading
    assert "broken.png" in html and (root / "holdout-report" / "evaluation_worst_images.png").is_file()


@pytest.mark.slow
def test_evaluate_names_labels_the_model_does_not_know(project, tmp_path):
    root, model = project
    rows = ["path,label"] + [f"{root / 'holdout' / 'cat' / '0.png'},cat", f"{root / 'holdout' / 'dog' / '0.png'},zebra"]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    proc = _stacker(["evaluate", str(model), str(tmp_path / "labels.csv"), "--quiet"], tmp_path, tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.startswith("stacker evaluate: error:") and "'zebra'" in proc.stderr
    assert "cat, dog, owl" in proc.stderr and proc.stderr.count("\n") == 1


@pytest.mark.slow
def test_report_from_another_folder_shows_the_training_images(project, tmp_path):
    _, model = project
    proc = _stacker(["report", str(model), "--out", str(tmp_path / "r"), "--quiet"], tmp_path, tmp_path)
    assert proc.returncode == 0, proc.stderr
    html = (tmp_path / "r" / "report.html").read_text()
    assert "<h2>Images</h2>" in html and "<h2>Highest out-of-fold loss</h2>" in html
    assert (tmp_path / "r" / "images.png").is_file() and (tmp_path / "r" / "worst_images.png").is_file()
    manifest = json.loads((model / "manifest.json").read_text())
    assert all(os.path.isabs(p) for p in manifest["train_paths"]), "found from any folder"


@pytest.mark.slow
def test_report_of_a_model_with_relative_paths_says_where_it_looked(project, tmp_path, monkeypatch):
    from stacker.app.report import report

    _, model = project
    run = tmp_path / "old-model"
    shutil.copytree(model, run)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["train_paths"] = [os.path.relpath(p, model.parent) for p in manifest["train_paths"]]
    (run / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.chdir(tmp_path)
    html = open(report(run)).read()
    assert "<h2>Images not found</h2>" in html and "<h2>Images</h2>" not in html
    note = html.split("<h2>Images not found</h2>", 1)[1].split("<h2>", 1)[0]
    assert f"None of the {len(manifest['train_paths'])} training images were found" in note
    assert str(tmp_path / manifest["train_paths"][0]) in note and "relative to the current folder" in note
    monkeypatch.chdir(model.parent)  # where the fit ran: found again
    assert "<h2>Images</h2>" in open(report(run)).read()


def test_many_classes_print_the_costliest_classes_and_the_most_confused_pairs():
    from stacker.app.evaluation import format_confusion, format_per_class
    from stacker.app.report import confusion_counts, per_class

    k = 30
    classes = [f"class{i:02d}" for i in range(k)]
    y = np.repeat(np.arange(k), 2)
    proba = np.full((len(y), k), 0.1 / (k - 1))
    proba[np.arange(len(y)), y] = 0.9
    proba[0] = np.roll(proba[0], 5)  # class00 -> class05 with p(true) ~ 0.003: the costliest class
    text = format_per_class(per_class(y, proba, k), classes)
    lines = text.splitlines()
    assert "the 20 of 30 classes with the highest log loss" in lines[0] and len(lines) == 2 + 20
    assert lines[2].split()[:2] == ["class00", "2"]
    confusion = format_confusion(confusion_counts(y, proba.argmax(axis=1), k), classes)
    assert confusion.splitlines()[0] == "most confused pairs (1 of 1):"
    assert confusion.splitlines()[2].split() == ["1", "class00", "class05"]
