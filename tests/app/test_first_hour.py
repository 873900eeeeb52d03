"""A new user's first hour: --version, recipe --help, --out checked before the fit, a safe
``cache rm``, and ``import stacker`` beside a clone named ``stacker``."""

import importlib.metadata
import json
import os
import re
import site
import subprocess
import sys

import pytest

from conftest import REPO, make_class_folders
from stacker.app.cli import main

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "STACKER_PLUGINS": "tinynet",
       "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests")])}  # the checkout under test
TINY_FIT = ["--backbones", "tiny_cnn", "--image-size", "32", "--weights", "none", "--folds", "3",
            "--models", "logistic"]


def cli(*args, cwd, stdin=subprocess.DEVNULL):
    """``python -m stacker ARGS`` in a fresh process (stdin not a terminal unless given one)."""
    return subprocess.run([sys.executable, "-m", "stacker", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=ENV, stdin=stdin, timeout=300)


def one_line(text):
    return " ".join(text.split())


def test_version_prints_the_package_version(tmp_path):
    import stacker

    proc = cli("--version", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"stacker {stacker.__version__}" == "stacker 0.3.0"


def test_recipe_help_says_the_doc_once_and_what_quick_changes(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "recipes", "dogs_vs_cats.py"), "--help"],
                          capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    text = one_line(proc.stdout)
    for line in ("Kaggle Dogs vs. Cats (Redux, log loss)", "Reads DATA/train", "Offline defaults use backbones"):
        assert text.count(line) == 1, line  # each paragraph of the docstring shown once
    assert "(default: 5; with --quick: 3)" in text
    assert "all of them; with --quick: 200)" in text  # --train-limit
    assert "--quick a first look in minutes: 200 training images, --backbones efficientnet_lite0,mobilenet_025, " \
           "3 folds" in text


def test_quick_does_what_its_help_says(class_folders, tmp_path, monkeypatch):
    """fit_and_save uses the very figures --help states (here a recipe whose quick sample is 10)."""
    import stacker
    from stacker.app.recipe import common_parser, fit_and_save
    from stacker.data.sources import load_images

    p = common_parser("A recipe.\n\nMore.", str(class_folders), "x", "tiny_cnn", "tiny_cnn", quick_limit=10)
    help_text = one_line(p.format_help())
    assert "10 training images" in help_text and "with --quick: 10)" in help_text
    assert "with --quick: 3)" in help_text

    class Stop(Exception):
        pass

    seen = {}

    class Recording:
        def __init__(self, **params):
            seen["cv"] = params["cv"]

        def fit(self, train):
            seen["n"] = len(train)
            raise Stop

    monkeypatch.setattr(stacker, "Ensemble", Recording)
    args = p.parse_args(["--quick", "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"), "--quiet"])
    with pytest.raises(Stop):
        fit_and_save(args, load_images(class_folders))
    assert seen == {"cv": 3, "n": 10}


def test_check_output_dir_accepts_new_empty_and_model_dirs_only(tmp_path):
    from stacker.io.model_dir import MANIFEST, check_output_dir

    check_output_dir(tmp_path / "new")
    check_output_dir(tmp_path)  # empty
    model = tmp_path / "model"
    model.mkdir()
    for name in (MANIFEST, "report.html", "run.json", "submission.csv"):  # a recipe's earlier run
        (model / name).write_text("{}")
    check_output_dir(model)
    other = tmp_path / "other"
    other.mkdir()
    for name in ("a.txt", "b.txt", "c.txt", "d.txt", "e.txt"):
        (other / name).write_text("mine")
    with pytest.raises(FileExistsError, match=r"--out .*other exists and is not a stacker model directory "
                                              r"\(it holds a\.txt, b\.txt, c\.txt and 2 more\); "
                                              r"give a new or empty folder"):
        check_output_dir(other, option="--out")
    with pytest.raises(FileExistsError, match="is a file, not a folder"):
        check_output_dir(other / "a.txt")


def test_fit_refuses_out_before_fitting(tmp_path):
    data = make_class_folders(tmp_path / "train", 6)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    proc = cli("fit", data, "--out", out, "--cache", tmp_path / "cache", *TINY_FIT, cwd=tmp_path)
    assert proc.returncode == 1
    assert f"stacker fit: error: --out {out} exists and is not a stacker model directory (it holds notes.txt); " \
           "give a new or empty folder" in proc.stderr
    assert "training images" not in proc.stdout + proc.stderr  # refused before the images were even read
    assert not (tmp_path / "cache").exists()  # no features extracted
    assert os.listdir(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "my notes"


def test_recipe_refuses_out_before_fitting(class_folders, tmp_path, monkeypatch):
    import stacker
    from stacker.app.recipe import common_parser, fit_and_save

    def no_fit(**params):
        raise AssertionError("the ensemble was built: --out was not checked first")

    monkeypatch.setattr(stacker, "Ensemble", no_fit)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    args = common_parser("A recipe.", str(class_folders), "x", "tiny_cnn", "tiny_cnn").parse_args(
        ["--out", str(tmp_path / "out")])
    with pytest.raises(FileExistsError, match="--out .* is not a stacker model directory"):
        fit_and_save(args, None)


def _cache(root):
    """A small cache: two learner results of tiny_cnn, and a file of the user's."""
    entries = [root / "learners" / f"{i:024x}" for i in (1, 2)]
    for i, entry in enumerate(entries):
        entry.mkdir(parents=True)
        (entry / "COMPLETE").write_text("ok\n")
        (entry / "meta.json").write_text(json.dumps({"backbone": "tiny_cnn", "learner": f"l{i}",
                                                     "code": {"model_code": "0"}}))
    (root / "notes.txt").write_text("mine")
    return entries


def test_cache_rm_without_a_filter_needs_yes_off_a_terminal(tmp_path):
    cache = tmp_path / "cache"
    entries = _cache(cache)
    refused = cli("cache", "rm", "--cache", cache, cwd=tmp_path)
    assert refused.returncode == 1
    assert re.search(r"stacker cache: error: cache rm without --backbone or --kind would remove all 2 entries "
                     r"\(.+\) from .*cache, and stdin is not a terminal to ask: pass --yes", refused.stderr)
    assert all(e.exists() for e in entries)

    done = cli("cache", "rm", "--cache", cache, "--yes", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "2 entries removed" in done.stdout and not any(e.exists() for e in entries)
    assert (cache / "notes.txt").read_text() == "mine"


class _Terminal:
    """stdin of a terminal where the user types ``answer``."""

    def __init__(self, answer):
        self.answer = answer

    def isatty(self):
        return True

    def readline(self):
        return self.answer


@pytest.mark.parametrize("answer, removed", [("\n", False), ("n\n", False), ("y\n", True), ("yes\n", True)])
def test_cache_rm_without_a_filter_asks_on_a_terminal(tmp_path, capsys, monkeypatch, answer, removed):
    cache = tmp_path / "cache"
    entries = _cache(cache)
    monkeypatch.setattr(sys, "stdin", _Terminal(answer))
    assert main(["cache", "rm", "--cache", str(cache)]) == (0 if removed else 1)
    res = capsys.readouterr()
    assert re.search(r"remove all 2 entries \(\d+(\.\d)? (B|KiB)\) from .*cache\? \[y/N\] $", res.err)
    assert all(not e.exists() if removed else e.exists() for e in entries)
    assert ("2 entries removed" if removed else "nothing removed") in res.out


def test_cache_dry_run_and_rm_with_a_filter(tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    entries = _cache(cache)
    monkeypatch.setattr(sys, "stdin", _Terminal("n\n"))  # never read: neither asks
    assert main(["cache", "rm", "--cache", str(cache), "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert len(re.findall(r"^would remove learners +tiny_cnn ", dry, re.M)) == 2
    assert re.search(r"^2 entries, .+, would be removed \(--dry-run: nothing removed\)$", dry, re.M)
    assert all(e.exists() for e in entries)
    assert main(["cache", "prune", "--cache", str(cache), "--dry-run"]) == 0
    assert "(--dry-run: nothing removed)" in capsys.readouterr().out and all(e.exists() for e in entries)
    assert main(["cache", "rm", "--cache", str(cache), "--backbone", "tiny_cnn"]) == 0
    assert "2 entries removed" in capsys.readouterr().out and not any(e.exists() for e in entries)


def _installed():
    """The stacker distribution installed in this interpreter's site-packages (not a checkout's egg-info)."""
    where = [*site.getsitepackages(), site.getusersitepackages()]
    return next(iter(importlib.metadata.distributions(name="stacker", path=where)), None)


def test_a_clone_named_stacker_does_not_shadow_the_package(tmp_path):
    if _installed() is None:
        pytest.skip("stacker is not installed in this interpreter (pip install -e .): the shadowing is about "
                    "how an install finds the package")
    (tmp_path / "stacker").symlink_to(REPO, target_is_directory=True)  # the folder holding a clone
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", "import stacker; print(stacker.__file__); stacker.predict"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith(os.path.join("stacker", "__init__.py")), proc.stdout
