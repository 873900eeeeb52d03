"""stacker doctor: label issues, ambiguous images, outliers, duplicates and leaks, the CSV, fit --exclude.

One tiny ensemble (tiny_cnn at 32 px) is fitted once for the module, on two colour classes
with planted problems: two images whose colour says the other class (label issues), one
with both colours (ambiguous), one of a third colour (an outlier), a byte copy and a
resized copy of one image (duplicates), and a test folder holding a resized copy of a
training image (a leak). tiny_cnn's 16 random features tell little apart beyond colour,
so duplicate tests use a strict threshold (real photos use the calibrated default).
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import stacker
from conftest import COLORS, REPO, TINY, make_image, save_tiny_weights
from stacker.data.sources import load_images
from stacker.doctor import COLUMNS, Findings, diagnose, label_quality, without
from stacker.features.extractor import forward_pass_count

pytest.importorskip("cleanlab")

STRICT = 0.9999  # tiny_cnn sees little beyond colour: this separates a resized copy from distinct images
N = 12


def _photo(path, color, seed, size=(40, 32)):
    """A smooth random 4x4 pattern tinted by ``color``, plus a little noise."""
    rng = np.random.default_rng(seed)
    grid = 0.5 * rng.integers(0, 256, (4, 4, 3)) + 0.5 * np.array(color)
    img = Image.fromarray(grid.astype("uint8")).resize(size, Image.BICUBIC)
    a = np.clip(np.asarray(img, float) + rng.normal(0, 8, (size[1], size[0], 3)), 0, 255)
    Image.fromarray(a.astype("uint8")).save(path)
    return path


@pytest.fixture(scope="module")
def sick(tmp_path_factory):
    """A fitted tiny ensemble on a training set with every kind of problem planted, and where they are."""
    root = tmp_path_factory.mktemp("doctor")
    train = root / "train"
    for j, c in enumerate(("cat", "dog")):
        (train / c).mkdir(parents=True)
        for i in range(N):
            _photo(train / c / f"{i}.png", COLORS[c], 100 * j + i)
    planted = {
        "label_issue": [_photo(train / "cat" / "x0.png", COLORS["dog"], 900),
                        _photo(train / "dog" / "x1.png", COLORS["cat"], 901)],
        "ambiguous": [_photo(train / "cat" / "both.png", (125, 70, 125), 902)],
        "outlier": [make_image(train / "dog" / "odd.png", (255, 255, 255), size=(40, 32), seed=903)],
        "exact_duplicate": [str(shutil.copy(train / "cat" / "3.png", train / "cat" / "3copy.png"))],
        "duplicate": [str(train / "dog" / "5big.png")],
    }
    Image.open(train / "dog" / "5.png").resize((60, 48), Image.BICUBIC).save(planted["duplicate"][0])
    (root / "test").mkdir()
    Image.open(train / "cat" / "7.png").resize((60, 48), Image.BICUBIC).save(root / "test" / "1.png")
    _photo(root / "test" / "2.png", COLORS["dog"], 999)
    weights = save_tiny_weights(root / "tiny.weights.h5")
    ens = stacker.Ensemble([{**TINY, "weights": weights}], models="logistic", cv=3, random_state=0,
                           cache_dir=str(root / "cache"), verbose=0).fit(load_images(train))
    return ens, root, {k: [os.path.abspath(p) for p in v] for k, v in planted.items()}


@pytest.fixture(scope="module")
def found(sick):
    ens, root, _ = sick
    before = forward_pass_count()
    out = diagnose(ens, test=root / "test", threshold=STRICT)
    assert forward_pass_count() - before == 2, "only the two new test images are computed"
    return out


def _paths(findings, kind):
    return {os.path.abspath(r.path) for r in findings if r.kind == kind}


def test_flipped_labels_are_label_issues_ranked_first_with_the_right_suggestion(sick, found):
    ens, _, planted = sick
    assert set(planted["label_issue"]) <= _paths(found, "label_issue")
    assert not _paths(found, "label_issue") & set(sum((planted[k] for k in ("ambiguous", "duplicate")), []))
    rows = {os.path.abspath(r.path): r for r in found.of_kind("label_issue")}
    assert rows[planted["label_issue"][0]].label == "cat" and rows[planted["label_issue"][0]].suggested == "dog"
    worst = np.argsort(label_quality(ens.y_, ens.meta_oof_proba_))[:2]
    assert {os.path.abspath(ens.train_paths_[i]) for i in worst} == set(planted["label_issue"])


def test_an_image_of_both_classes_is_ambiguous(sick, found):
    _, _, planted = sick
    assert set(planted["ambiguous"]) <= _paths(found, "ambiguous")
    assert not _paths(found, "ambiguous") & set(planted["label_issue"])
    assert all(r.score >= 0.3 for r in found.of_kind("ambiguous"))


def test_an_image_unlike_any_other_is_an_outlier(sick, found):
    _, _, planted = sick
    outliers = found.of_kind("outlier").rows
    assert os.path.abspath(outliers[0].path) == planted["outlier"][0], "the most severe outlier"


def test_byte_copies_and_resized_copies_are_duplicates_of_the_image_kept(sick, found):
    _, root, planted = sick
    assert _paths(found, "exact_duplicate") == set(planted["exact_duplicate"])
    assert _paths(found, "duplicate") == set(planted["duplicate"])
    groups = {os.path.abspath(r.path): os.path.abspath(r.group) for r in found.of_kind("exact_duplicate", "duplicate")}
    assert groups == {planted["exact_duplicate"][0]: str(root / "train" / "cat" / "3.png"),
                      planted["duplicate"][0]: str(root / "train" / "dog" / "5.png")}
    assert all(r.score >= STRICT for r in found.of_kind("duplicate"))


def test_a_training_copy_of_a_test_image_is_a_leak(sick, found):
    _, root, _ = sick
    leaks = found.of_kind("leak").rows
    assert [(os.path.abspath(r.path), os.path.abspath(r.group)) for r in leaks] == [
        (str(root / "train" / "cat" / "7.png"), str(root / "test" / "1.png"))]


def test_csv_round_trip_and_without(sick, found, tmp_path):
    ens, root, planted = sick
    path = found.to_csv(tmp_path / "f.csv")
    header = open(path).readline().strip().split(",")
    assert tuple(header) == COLUMNS == ("path", "id", "kind", "score", "label", "suggested", "group")
    back = Findings.read_csv(path)
    assert sorted((r.path, r.kind, r.group, r.label, r.suggested) for r in back) == sorted(
        (r.path, r.kind, r.group, r.label, r.suggested) for r in found)
    data = load_images(root / "train")
    kept = without(data, path, kinds=("label_issue",))
    assert len(kept) == len(data) - len(found.of_kind("label_issue")) and not set(planted["label_issue"]) & {os.path.abspath(p) for p in kept.paths}
    assert "label_issue" in found.table() and str(found).startswith("Findings(")


@pytest.mark.slow  # two command-line processes: the full suite runs it
def test_cli_doctor_writes_csv_and_report_then_fit_excludes_without_a_forward_pass(sick, tmp_path):
    ens, root, planted = sick
    model = tmp_path / "model"
    ens.save(model)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests")]),
           "STACKER_PLUGINS": "tinynet", "STACKER_ENGINE": "keras"}
    csv_path = tmp_path / "findings.csv"
    script = (
        "import sys; from stacker.app.cli import main; from stacker.features.extractor import forward_pass_count\n"
        f"assert main(['doctor', {str(model)!r}, '--csv', {str(csv_path)!r}, '--cache', {ens.cache_dir!r}, "
        f"'--threshold', '{STRICT}', '--report', {str(tmp_path / 'rep')!r}, '--quiet']) == 0\n"
        "n = forward_pass_count()\n"
        "import csv; rows = [r for r in csv.DictReader(open(sys.argv[1])) if r['kind'] == 'label_issue']\n"
        "with open(sys.argv[2], 'w', newline='') as f:\n"
        "    w = csv.DictWriter(f, fieldnames=rows[0].keys()); w.writeheader(); w.writerows(rows)\n"
        f"assert main(['fit', {str(root / 'train')!r}, '--out', {str(tmp_path / 'm2')!r}, '--exclude', sys.argv[2], "
        f"'--backbones', 'tiny_cnn', '--image-size', '32', '--weights', {ens.backbones[0]['weights']!r}, "
        f"'--models', 'logistic', '--folds', '3', '--cache', {ens.cache_dir!r}, '--no-report', '--quiet']) == 0\n"
        "print('forward passes', n, forward_pass_count())\n")
    proc = subprocess.run([sys.executable, "-c", script, str(csv_path), str(tmp_path / "chosen.csv")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "forward passes 0 0" in proc.stdout, proc.stdout
    assert "label_issue" in proc.stdout and "wrote" in proc.stdout
    chosen = Findings.read_csv(tmp_path / "chosen.csv").paths()
    assert set(planted["label_issue"]) <= {os.path.abspath(p) for p in chosen}
    assert f"{len(chosen)} images left out" in proc.stdout
    assert (tmp_path / "rep" / "doctor.html").exists() and (tmp_path / "rep" / "doctor_label_issue.png").exists()
    refit = stacker.Ensemble.load(tmp_path / "m2")
    assert not {os.path.abspath(p) for p in refit.train_paths_} & set(planted["label_issue"])
    assert len(refit.train_paths_) == len(ens.train_paths_) - len(chosen)
