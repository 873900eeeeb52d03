"""Ray as the distributed engine: extraction and fold fitting give the single-process results.

One local Ray cluster (2 CPUs) serves the whole module. Workers import ``tinynet`` and
the fault plugin ``ray_faults`` through ``$STACKER_PLUGINS``; skipped without the ``ray``
extra (``pip install -e '.[ray]'``).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, make_class_folders, save_tiny_weights

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ray = pytest.importorskip("ray", reason="the Ray tests need the ray extra: pip install -e '.[ray]'")

from stacker.learners import distributed  # noqa: E402
from stacker.features.cache import FeatureCache  # noqa: E402
from stacker.ensemble import Ensemble  # noqa: E402
from stacker.features.extractor import FeatureExtractor, forward_pass_count  # noqa: E402
from stacker.data.sources import load_images  # noqa: E402

TESTS = os.path.join(REPO, "tests")
N_PER_CLASS = 20  # 40 images: 5 chunks of 8 (2 batches of 4 each)


@pytest.fixture(scope="module")
def faults_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ray_faults")


@pytest.fixture(scope="module")
def cluster(faults_dir):
    env = distributed.worker_env([TESTS])
    env["env_vars"].update(STACKER_PLUGINS="tinynet,ray_faults", RAY_FAULTS_DIR=str(faults_dir),
                           STACKER_ENGINE="keras", TF_CPP_MIN_LOG_LEVEL="3",
                           STACKER_CACHE_DIR=str(faults_dir / "worker_cache"))  # the workers' own folder
    ray.init(num_cpus=2, runtime_env=env, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray_data")
    make_class_folders(root / "train", N_PER_CLASS)
    return root, save_tiny_weights(root / "tiny.weights.h5")


def extractor(weights, cache):
    return FeatureExtractor("tiny_cnn", weights=weights, input_size=32, batch_size=4, chunk_size=8,
                            cache_dir=str(cache), verbose=0)


@pytest.fixture(scope="module")
def sequential(data, tmp_path_factory):
    """Features of a single-process run (and the cache file it wrote)."""
    root, weights = data
    ext = extractor(weights, tmp_path_factory.mktemp("seq_cache"))
    return ext.extract(load_images(root / "train")).values


def cached_rows(cache):
    (entry,) = FeatureCache(cache).entries()
    return entry["rows"]


def test_ray_extraction_is_bit_identical(cluster, data, sequential, tmp_path):
    root, weights = data
    ext = extractor(weights, tmp_path / "cache")
    report = distributed.fill_cache(ext, load_images(root / "train"), workers=2)
    assert (report.computed, report.chunks, report.workers, report.retried) == (2 * N_PER_CLASS, 5, 2, 0)
    before = forward_pass_count()
    values = ext.extract(load_images(root / "train")).values
    assert forward_pass_count() == before  # everything came from the cache the workers filled
    assert values.dtype == sequential.dtype and np.array_equal(values, sequential)
    again = distributed.fill_cache(ext, load_images(root / "train"))
    assert (again.computed, again.cached) == (0, 2 * N_PER_CLASS)


@pytest.mark.faults
def test_killed_worker_is_retried_and_only_its_chunk_is_recomputed(cluster, data, sequential, faults_dir, tmp_path):
    root, weights = data
    log = faults_dir / "forward.log"
    log.unlink(missing_ok=True)
    (faults_dir / "arm").touch()
    ext = extractor(weights, tmp_path / "cache")
    pids = set()
    report = distributed.fill_cache(ext, load_images(root / "train"), workers=2,
                                    on_chunk=lambda j, n, pid: pids.add(pid))
    assert (faults_dir / "fired").exists(), "no worker was killed"
    (faults_dir / "fired").unlink()
    logged = [line.split() for line in log.read_text().splitlines()]
    dead = {int(pid) for pid, _ in logged} - pids
    assert len(dead) == 1, (logged, pids)  # the killed worker returned nothing; a restarted one took over
    assert sum(int(n) for _, n in logged) == 2 * N_PER_CLASS + 8  # one lost chunk (2 batches of 4), no more
    assert (report.computed, report.retried) == (2 * N_PER_CLASS, 1)
    assert np.array_equal(ext.extract(load_images(root / "train")).values, sequential)


@pytest.mark.faults
def test_killed_driver_resumes_from_the_cache(cluster, data, sequential, tmp_path):
    root, weights = data
    cache, result = tmp_path / "cache", tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, TESTS]), "STACKER_PLUGINS": "tinynet",
           "STACKER_ENGINE": "keras", "TF_CPP_MIN_LOG_LEVEL": "3"}
    args = [sys.executable, os.path.join(TESTS, "ray_child.py"), cluster, str(root / "train"), weights, str(cache),
            str(result)]
    killed = subprocess.run(args + ["kill"], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert cached_rows(cache) == 16 and not result.exists()  # two chunks were in when it died
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(result.read_text())
    assert (report["cached"], report["computed"]) == (16, 2 * N_PER_CLASS - 16)
    assert np.array_equal(extractor(weights, cache).extract(load_images(root / "train")).values, sequential)


def fit(root, weights, cache, executor, **kw):
    return Ensemble([{"backbone": "tiny_cnn", "input_size": 32, "weights": weights}], models=("logistic", "prototype"),
                    cv=3, batch_size=4, chunk_size=8, cache_dir=str(cache), executor=executor, verbose=0,
                    **kw).fit(root / "train")


@pytest.mark.parametrize("out_of_core", [False, True])
def test_ray_folds_give_the_sequential_out_of_fold_probabilities(cluster, data, tmp_path, out_of_core):
    root, weights = data
    local = fit(root, weights, tmp_path / "local", "local", out_of_core=out_of_core)
    on_ray = fit(root, weights, tmp_path / "ray", "ray", out_of_core=out_of_core)
    assert on_ray.out_of_core_ is out_of_core
    for name, proba in local.oof_proba_.items():
        assert np.array_equal(on_ray.oof_proba_[name], proba), name
    assert np.array_equal(on_ray.meta_oof_proba_, local.meta_oof_proba_)
    paths = load_images(root / "train").paths
    assert np.array_equal(on_ray.predict_proba(paths), local.predict_proba(paths))


def test_cli_extract_with_ray(cluster, data, sequential, tmp_path, capsys):
    from stacker.app.cli import main

    root, weights = data
    cache = tmp_path / "cache"
    assert main(["extract", str(root / "train"), "--backbones", "tiny_cnn", "--weights", weights, "--image-size", "32",
                 "--batch-size", "4", "--cache", str(cache), "--ray", cluster, "--quiet"]) == 0
    assert f"{2 * N_PER_CLASS} computed on" in capsys.readouterr().out
    values = FeatureExtractor("tiny_cnn", weights=weights, input_size=32, batch_size=4, cache_dir=str(cache),
                              verbose=0).extract(load_images(root / "train")).values
    assert np.array_equal(values, sequential)
