"""Recipes run end to end in --quick mode on tiny data."""

import csv
import json
import os
import subprocess
import sys

from conftest import REPO

RECIPES = os.path.join(REPO, "recipes")


def run(script, *args, timeout=600):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": os.path.join(REPO, "tests"),
           "STACKER_PLUGINS": "tinynet"}
    proc = subprocess.run([sys.executable, os.path.join(RECIPES, script), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_dogs_vs_cats_quick_end_to_end(kaggle_dir, tmp_path):
    out = tmp_path / "out"
    args = ["--data", str(kaggle_dir), "--out", str(out), "--cache", str(tmp_path / "cache"), "--quick",
            "--backbones", "tiny_cnn", "--image-size", "32", "--weights", "none", "--head", "logistic",
            "--meta", "logistic", "--folds", "3"]
    stdout = run("dogs_vs_cats.py", *args)
    assert "Out-of-fold leaderboard" in stdout and "ensemble" in stdout
    assert (out / "manifest.json").exists() and (out / "report.html").exists()
    with open(out / "submission.csv", newline="") as f:
        sub = list(csv.reader(f))
    assert sub[0] == ["id", "label"] and [r[0] for r in sub[1:]] == [str(i) for i in range(1, 13)]
    assert all(0 < float(r[1]) < 1 for r in sub[1:])
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["n_train"] == 20


def test_recipe_help():
    assert "--quick" in run("dogs_vs_cats.py", "--help")
