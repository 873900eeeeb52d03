"""Recipes run end to end in --quick mode on tiny data."""

import csv
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

RECIPES = os.path.join(REPO, "recipes")


def run(script, *args, timeout=600):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",  # the checkout under test, not an installed stacker
           "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests")]),
           "STACKER_PLUGINS": "tinynet"}
    proc = subprocess.run([sys.executable, os.path.join(RECIPES, script), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_dogs_vs_cats_quick_end_to_end(kaggle_dir, tmp_path):
    out = tmp_path / "out"
    args = ["--data", str(kaggle_dir), "--out", str(out), "--cache", str(tmp_path / "cache"), "--quick",
            "--backbones", "tiny_cnn", "--image-size", "32", "--weights", "none", "--head", "logistic",
            "--meta", "logistic", "--folds", "3", "--finetune", "--finetune-blocks", "1"]
    stdout = run("dogs_vs_cats.py", *args)
    assert "Out-of-fold leaderboard" in stdout and "ensemble" in stdout
    assert "Fine-tuning (out-of-fold" in stdout and "frozen_ll" in (out / "leaderboard.txt").read_text()
    assert (out / "curves.csv").exists() and (out / "curves.png").exists()
    assert (out / "manifest.json").exists() and (out / "report.html").exists()
    with open(out / "submission.csv", newline="") as f:
        sub = list(csv.reader(f))
    assert sub[0] == ["id", "label"] and [r[0] for r in sub[1:]] == [str(i) for i in range(1, 13)]
    assert all(0 < float(r[1]) < 1 for r in sub[1:])
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["n_train"] == 20
    assert 0 < run_info["extract_s"] < run_info["fit_s"]  # a cold cache: the CNNs ran, and the rest is stacking_s
    assert abs(run_info["extract_s"] + run_info["stacking_s"] - run_info["fit_s"]) < 1e-6


def test_recipe_help():
    assert "--quick" in run("dogs_vs_cats.py", "--help")


TINY_ARGS = ["--backbones", "tiny_cnn", "--image-size", "32", "--weights", "none", "--models", "default",
             "--quick"]


@pytest.mark.slow
def test_caltech101_quick(tmp_path):
    from conftest import make_image

    root = tmp_path / "101_ObjectCategories"
    for j, c in enumerate(["accordion", "BACKGROUND_Google", "camera", "dolphin", "Faces"]):
        (root / c).mkdir(parents=True)
        for i in range(8 + j):
            make_image(root / c / f"image_{i:04d}.jpg", (40 * j, 200 - 30 * j, 90), seed=i + 10 * j)
    out = tmp_path / "out"
    stdout = run("caltech101.py", "--data", str(root), "--out", str(out), "--cache", str(tmp_path / "c"),
                 *TINY_ARGS)
    assert "top5" not in stdout.split("Out-of-fold leaderboard")[0]
    info = json.loads((out / "run.json").read_text())
    assert info["n_train"] == 8 + 10 + 11 + 12  # BACKGROUND_Google ignored
    import stacker

    res = stacker.predict([str(root / "camera" / "image_0000.jpg")], model=out)
    assert res.classes == ["Faces", "accordion", "camera", "dolphin"]
    assert (out / "report.html").exists()


def _write_cifar100(root, n_train=60, n_test=20, classes=4):
    """A tiny CIFAR-100 in the exact official python format (pickled dicts with bytes keys)."""
    import pickle

    import numpy as np

    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    names = [f"class{i:02d}".encode() for i in range(100)]
    for split, n in (("train", n_train), ("test", n_test)):
        labels = [i % classes for i in range(n)]
        base = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]], dtype=np.float64)
        pix = np.clip(base[labels][:, :, None] + rng.normal(0, 20, (n, 3, 1024)), 0, 255).astype(np.uint8)
        with open(root / split, "wb") as f:
            pickle.dump({b"filenames": [f"img{i}.png".encode() for i in range(n)], b"batch_label": split.encode(),
                         b"fine_labels": labels, b"coarse_labels": [0] * n, b"data": pix.reshape(n, 3072)}, f,
                        protocol=2)
    with open(root / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": names, b"coarse_label_names": [b"x"] * 20}, f, protocol=2)


@pytest.mark.slow
def test_cifar100_quick_on_the_official_format(tmp_path):
    root = tmp_path / "cifar-100-python"
    _write_cifar100(root)
    out = tmp_path / "out"
    stdout = run("cifar100.py", "--data", str(root), "--out", str(out), "--cache", str(tmp_path / "c"), *TINY_ARGS)
    assert "validation: accuracy" in stdout and "test: accuracy" in stdout
    holdout = json.loads((out / "holdout.json").read_text())
    assert 0 <= holdout["test"]["accuracy"] <= 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["params"]["resize"] == "bicubic" and manifest["classes"] == ["class00", "class01", "class02", "class03"]


def test_cifar100_refuses_a_crafted_pickle(tmp_path):
    import pickle

    sys.path.insert(0, RECIPES)
    try:
        import cifar100
    finally:
        sys.path.remove(RECIPES)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (tmp_path / "meta").write_bytes(pickle.dumps({b"fine_label_names": Evil()}))
    import pytest

    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        cifar100.read_split(str(tmp_path / "meta"))


@pytest.mark.slow
def test_stanford_dogs_quick(tmp_path):
    from conftest import make_image

    root = tmp_path / "Images"
    for j, c in enumerate(["n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02086240-Shih-Tzu"]):
        (root / c).mkdir(parents=True)
        for i in range(9):
            make_image(root / c / f"{c.split('-')[0]}_{i}.jpg", (60 * j, 100, 200 - 60 * j), seed=i + 20 * j)
    out = tmp_path / "out"
    stdout = run("stanford_dogs.py", "--data", str(root), "--out", str(out), "--cache", str(tmp_path / "c"),
                 *TINY_ARGS)
    assert "subset of ImageNet" in stdout and "Fine-tuning (out-of-fold" in stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["learners"][0]["spec"]["finetune"]["blocks"] == 2
    assert manifest["classes"] == ["Chihuahua", "Japanese_spaniel", "Shih-Tzu"]
    assert "optimistic" in run("stanford_dogs.py", "--help")


@pytest.mark.slow
def test_top5_quick(tmp_path):
    from conftest import make_image

    photos = [make_image(tmp_path / f"p{i}.jpg", (50 * i, 100, 150), size=(40, 30), seed=i) for i in range(2)]
    out = tmp_path / "out"
    stdout = run("top5.py", *map(str, photos), "--backbones", "tiny_cnn, tiny_cnn", "--weights", "none",
                 "--out", str(out), "--quick")
    assert "tiny_cnn:" in stdout
    report = json.loads((out / "top5.json").read_text())
    assert len(report) == 2 and len(report[0]["tiny_cnn"]) == 5
    from PIL import Image

    with Image.open(out / "top5.png") as img:
        assert img.format == "PNG" and img.size[0] > 400


@pytest.mark.slow
def test_every_recipe_has_help_data_out_quick():
    from concurrent.futures import ThreadPoolExecutor

    scripts = ("dogs_vs_cats.py", "caltech101.py", "cifar100.py", "stanford_dogs.py", "top5.py")
    with ThreadPoolExecutor(len(scripts)) as pool:  # one process each, side by side: each is mostly its imports
        texts = dict(zip(scripts, pool.map(lambda script: run(script, "--help"), scripts)))
    for script, text in texts.items():
        for flag in ("--data", "--out", "--quick"):
            assert flag in text, (script, flag)


def _recipe_parser(script):
    import importlib

    sys.path.insert(0, RECIPES)
    try:
        return importlib.import_module(script).parser()
    finally:
        sys.path.remove(RECIPES)


def _options(parser):
    """Flag -> argparse action of every option of a parser, but its own recipe group and --help."""
    own = {id(a) for a in getattr(getattr(parser, "recipe_options", None), "_group_actions", [])}
    return {a.option_strings[0]: a for a in parser._actions
            if a.option_strings and a.dest != "help" and id(a) not in own}


def test_every_recipe_option_is_a_stacker_option_with_the_same_default():
    from stacker.app.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    for script, command in (("dogs_vs_cats", "fit"), ("caltech101", "fit"), ("cifar100", "fit"),
                            ("stanford_dogs", "fit"), ("top5", "top5")):
        recipe, cli = _options(_recipe_parser(script)), _options(commands[command])
        changed = _recipe_parser(script).recipe_defaults
        assert len(recipe) >= (25 if command == "fit" else 4), script
        for flag, action in recipe.items():
            assert flag in cli, f"{script}: {flag} is not an option of stacker {command}"
            other = cli[flag]
            assert (action.option_strings, action.dest, action.choices, action.type) == \
                   (other.option_strings, other.dest, other.choices, other.type), (script, flag)
            if action.dest in changed:  # this data set's choice, said in the recipe's --help
                assert f"stacker {command}:" in action.help, (script, flag)
            else:
                assert action.default == other.default, (script, flag, action.default, other.default)
    assert set(_recipe_parser("cifar100").recipe_defaults) == {"backbones", "weights_dir", "resize"}


def test_recipe_defaults_become_ensemble_parameters():
    """A recipe run with its own default backbones (no --backbones) builds its Ensemble."""
    import stacker
    from stacker.app.options import ensemble_params

    for script in ("dogs_vs_cats", "caltech101", "cifar100", "stanford_dogs"):
        args = _recipe_parser(script).parse_args([])
        assert args.backbones is None and args.default_backbones, script
        params = ensemble_params(args, backbones=args.default_backbones.split(","))
        assert stacker.Ensemble(**params).backbones == args.default_backbones.split(","), script
