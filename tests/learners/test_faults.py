"""Fault injection: a run SIGKILLed at any step resumes and ends exactly where an uninterrupted one does.

``pytest -m faults`` runs this module alone. Every case starts a child process
(``tests/fault_child.py``) that fits, saves, reloads and predicts with a tiny
ensemble; the faulty child kills itself with SIGKILL at one point, and a second child
with the same cache must finish with the predictions of a run that was never killed,
having redone only the step that was cut short.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import COLORS, REPO, make_class_folders, make_image, save_tiny_weights

pytestmark = [pytest.mark.faults, pytest.mark.slow]
CHILD = os.path.join(REPO, "tests", "fault_child.py")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    make_class_folders(root / "train", 9)
    (root / "test").mkdir()
    for i in range(4):
        make_image(root / "test" / f"{i}.png", COLORS["cat" if i % 2 else "dog"], seed=90 + i)
    save_tiny_weights(root / "tiny.weights.h5")
    return root


def child(config, data_dir, cache, out, result, point=None):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": os.path.join(REPO, "tests")}
    args = [sys.executable, CHILD, config, str(data_dir), str(cache), str(out), str(result)] + ([point] if point else [])
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)


def finished(proc, result):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    with open(str(result) + ".json") as f:
        return np.load(str(result) + ".npy"), json.load(f)


POINTS = [("frozen", "extract"), ("frozen", "head"), ("frozen", "meta"), ("frozen", "save"), ("finetune", "finetune")]


def killed_then_resumed(config, point, data_dir, d):
    """A child killed at ``point``, then a second child on its cache: ``(killed, what the kill left, resumed,
    result path)``."""
    cache, out, result = d / "cache", d / "model", d / "result"
    killed = child(config, data_dir, cache, out, result, point)
    left = {"manifest": (out / "manifest.json").exists(), "result": os.path.exists(str(result) + ".npy")}
    resumed = child(config, data_dir, cache, out, result) if killed.returncode == -9 else None
    return killed, left, resumed, result


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """Every uninterrupted reference run and every killed-and-resumed pair, three child processes at a time:
    most of a child's time is start-up, so side by side they take about half as long on two cores."""
    from concurrent.futures import ThreadPoolExecutor

    base = tmp_path_factory.mktemp("runs")
    dirs = {key: base / "-".join(key) / "run" for key in [(c, "ref") for c in ("frozen", "finetune")] + POINTS}
    for d in dirs.values():
        d.mkdir(parents=True)
    with ThreadPoolExecutor(3) as pool:
        refs = {c: pool.submit(child, c, data_dir, dirs[c, "ref"] / "cache", dirs[c, "ref"] / "model",
                               dirs[c, "ref"] / "result") for c in ("frozen", "finetune")}
        pairs = {key: pool.submit(killed_then_resumed, *key, data_dir, dirs[key]) for key in POINTS}
        return ({c: (f.result(), dirs[c, "ref"] / "result") for c, f in refs.items()},
                {key: f.result() for key, f in pairs.items()})


@pytest.mark.parametrize("config,point", POINTS)
def test_killed_run_resumes_to_the_same_result(config, point, runs):
    (ref_run, ref_result), (killed, left, resumed, result) = runs[0][config], runs[1][config, point]
    ref_proba, ref = finished(ref_run, ref_result)
    assert killed.returncode == -9, f"the child should have been SIGKILLed at {point}: {killed.stderr[-2000:]}"
    assert not left["result"]
    if point == "save":
        assert not left["manifest"], "a killed save must not leave a manifest behind"
    proba, info = finished(resumed, result)
    np.testing.assert_allclose(proba, ref_proba, atol=1e-6)
    for name, oof in ref["oof"].items():
        np.testing.assert_allclose(info["oof"][name], oof, atol=1e-6)
    np.testing.assert_allclose(info["meta_oof"], ref["meta_oof"], atol=1e-6)
    # only the interrupted step was redone
    if point == "extract":
        assert 0 < info["forward"] < ref["forward"]
    else:
        assert info["forward"] == 0, "features were cached before the kill"
    if point == "head":
        assert info["dense_fits"] == ref["dense_fits"] - 1  # fold 1 came from its checkpoint
    if point in ("meta", "save"):
        # base learners from the cache; only the meta-learner refits: 2 CV fits, and a final one
        # unless the best single learner beat it out of fold (then it is the ensemble)
        assert info["level2"] == ref["level2"]
        assert info["dense_fits"] == 2 + (not info["level2"].startswith("best member"))
    if point == "finetune":
        assert info["finetune_fits"] == ref["finetune_fits"] - 1


def test_two_processes_filling_one_cache_at_once_corrupt_nothing(data_dir, tmp_path):
    """Two concurrent `stacker extract` runs on one cache: both finish, every row is whole and right."""
    from stacker.features.extractor import FeatureExtractor, forward_pass_count
    from stacker.data.sources import load_images

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": os.path.join(REPO, "tests"),
           "STACKER_PLUGINS": "tinynet"}
    weights = str(data_dir / "tiny.weights.h5")
    cmd = [sys.executable, "-m", "stacker", "extract", str(data_dir / "train"), "--backbones", "tiny_cnn",
           "--image-size", "32", "--weights", weights, "--cache", str(tmp_path / "shared"), "--batch-size", "2",
           "--quiet"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    data = load_images(data_dir / "train")
    ext = dict(backbone="tiny_cnn", input_size=32, weights=weights, verbose=0, batch_size=2)
    before = forward_pass_count()
    shared = FeatureExtractor(**ext, cache_dir=tmp_path / "shared").transform(data)
    assert forward_pass_count() == before
    alone = FeatureExtractor(**ext).transform(data)
    np.testing.assert_allclose(shared, alone, rtol=1e-5, atol=1e-7)
