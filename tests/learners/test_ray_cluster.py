"""Ray on several nodes that share no folder: extraction and fitting give the single-process results.

A :class:`ray.cluster_utils.Cluster` on this machine: a head node without CPUs (the
driver's) and two worker nodes of one CPU and one GPU each (GPUs as Ray counts them: the
extraction actors take one; TensorFlow finds no device and runs on the CPU), every node
with its own cache folder (``$STACKER_CACHE_DIR`` of the node's processes). The images
are read from a local S3 server (moto) where stacker reads object storage and ``s3fs``
and ``moto[server]`` are installed, else from local paths; the weights file and the
cache stay on the driver: workers get the weights through the object store and send
features and fold models back the same way. Workers report their forward passes to a
:class:`ray_faults.ForwardLog` actor on the head node (the test's counter; not a path
either). Skipped without the ``ray`` extra.
"""

import contextlib
import importlib.util
import os
import threading
import time

import numpy as np
import pytest

from conftest import REPO, make_class_folders, save_tiny_weights

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ray = pytest.importorskip("ray", reason="the Ray tests need the ray extra: pip install -e '.[ray]'")

import s3server  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: E402

from ray_faults import ForwardLog  # noqa: E402
from stacker.data.sources import load_images  # noqa: E402
from stacker.ensemble import Ensemble  # noqa: E402
from stacker.features.extractor import FeatureExtractor, forward_pass_count  # noqa: E402
from stacker.learners import distributed  # noqa: E402

s3_server = s3server.s3_server  # the session fixture, used where object storage can be had
TESTS = os.path.join(REPO, "tests")
N_PER_CLASS = 20  # 40 images: 10 chunks of 4 (2 batches of 2 each)
LOG = "stacker_test_forward_log"


def _s3_ready() -> bool:
    """Whether stacker reads object storage here and the S3 server can run (s3fs, moto's server)."""
    return all(importlib.util.find_spec(m) is not None for m in ("stacker.data.storage", "s3fs", "moto", "boto3"))


@pytest.fixture(scope="module")
def images(tmp_path_factory, request):
    """``(training images, weights file)``: images on the S3 server when there is one, else local files."""
    root = tmp_path_factory.mktemp("cluster_data")
    make_class_folders(root / "train", N_PER_CLASS)
    weights = save_tiny_weights(root / "tiny.weights.h5")
    if not _s3_ready():
        return str(root / "train"), weights
    server = request.getfixturevalue("s3_server")
    server.bucket("cluster")
    return server.upload(root / "train", "s3://cluster/train"), weights


@contextlib.contextmanager
def _environ(**values):
    """``os.environ`` with ``values`` while a node starts (its processes inherit them), then as before."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def cluster(images, tmp_path_factory):
    """``(cluster, {node id: that node's cache folder}, forward log)``; the driver is connected to it."""
    scratch = tmp_path_factory.mktemp("nodes")
    folders = {}
    fast_failure = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                    "health_check_failure_threshold": 2}
    with _environ(STACKER_CACHE_DIR=str(scratch / "head")):
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": fast_failure})
    folders[c.head_node.node_id] = str(scratch / "head")
    try:
        for name in ("node1", "node2"):
            with _environ(STACKER_CACHE_DIR=str(scratch / name)):
                folders[c.add_node(num_cpus=1, num_gpus=1).node_id] = str(scratch / name)  # GPUs as Ray counts them
        c.wait_for_nodes()
        env = distributed.worker_env([TESTS])
        assert not any(k == "STACKER_CACHE_DIR" for k in env["env_vars"])  # each node keeps its own
        env["env_vars"].update(STACKER_PLUGINS="tinynet,ray_faults", RAY_FAULTS_ACTOR=LOG, STACKER_ENGINE="keras",
                               TF_CPP_MIN_LOG_LEVEL="3")
        ray.init(address=c.address, runtime_env=env, include_dashboard=False, log_to_driver=False)
        head = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        log = ray.remote(ForwardLog).options(name=LOG, num_cpus=0, scheduling_strategy=head).remote()
        ray.get(log.take.remote())
        yield c, folders, log
    finally:
        ray.shutdown()
        c.shutdown()


def extractor(weights, cache):
    return FeatureExtractor("tiny_cnn", weights=weights, input_size=32, batch_size=2, chunk_size=4,
                            cache_dir=str(cache), verbose=0)


@pytest.fixture(scope="module")
def sequential(images, tmp_path_factory):
    """Features of a single-process run."""
    train, weights = images
    return extractor(weights, tmp_path_factory.mktemp("seq_cache")).extract(load_images(train)).values


def check_workers_used_their_own_node(records, folders):
    """Every forward pass ran on a GPU of Ray's, with its node's cache folder and the weights shipped into it."""
    assert records
    for r in records:
        assert r["gpus"] == 1, r  # the nodes declare a GPU each: every extraction actor takes one
        own = folders[r["node"]]
        assert r["cache_dir"] == own, r
        assert r["weights"].startswith(os.path.join(own, distributed.SHIPPED_WEIGHTS) + os.sep), r


def fit(train, weights, cache, executor):
    return Ensemble([{"backbone": "tiny_cnn", "input_size": 32, "weights": weights}], models=("logistic", "prototype"),
                    cv=3, batch_size=2, chunk_size=4, cache_dir=str(cache), executor=executor, verbose=0).fit(train)


def test_two_nodes_fit_the_single_process_ensemble_and_a_rerun_computes_nothing(cluster, images, tmp_path):
    c, folders, log = cluster
    train, weights = images
    assert train.startswith("s3://") or not _s3_ready()  # no shared folder where object storage can be had
    local = fit(train, weights, tmp_path / "local", "local")
    ray.get(log.take.remote())
    on_ray = fit(train, weights, tmp_path / "ray", "ray")
    records = ray.get(log.take.remote())
    assert {r["node"] for r in records} == set(folders) - {c.head_node.node_id}  # both worker nodes extracted
    assert sum(r["images"] for r in records) == 2 * N_PER_CLASS
    check_workers_used_their_own_node(records, folders)
    for name, proba in local.oof_proba_.items():
        assert np.array_equal(on_ray.oof_proba_[name], proba), name
    assert np.array_equal(on_ray.meta_oof_proba_, local.meta_oof_proba_)
    paths = load_images(train).paths
    assert np.array_equal(on_ray.predict_proba(paths), local.predict_proba(paths))
    before = forward_pass_count()
    again = fit(train, weights, tmp_path / "ray", "ray")
    assert forward_pass_count() == before and ray.get(log.take.remote()) == []  # no forward pass anywhere
    assert np.array_equal(again.meta_oof_proba_, local.meta_oof_proba_)


def _remove_when_blocked(c, log, removed: list, stop: threading.Event) -> None:
    """Remove the node of the worker the log blocked (a watcher thread: the driver is busy in fill_cache)."""
    while not stop.is_set():
        node_id = ray.get(log.blocked_node.remote())
        if node_id is not None:
            (node,) = [n for n in c.worker_nodes if n.node_id == node_id]
            c.remove_node(node, allow_graceful=False)
            removed.append(node_id)
            return
        time.sleep(0.1)


@pytest.mark.faults
def test_a_lost_node_loses_only_its_unfinished_chunk(cluster, images, sequential, tmp_path):
    c, folders, log = cluster
    train, weights = images
    ext = extractor(weights, tmp_path / "cache")
    ray.get(log.take.remote())
    ray.get(log.arm.remote(3))  # the first worker at its 3rd batch (1st of its 2nd chunk) stops there
    removed, stop = [], threading.Event()
    watcher = threading.Thread(target=_remove_when_blocked, args=(c, log, removed, stop), daemon=True)
    watcher.start()
    try:
        report = distributed.fill_cache(ext, load_images(train), workers=2)
    finally:
        stop.set()
        watcher.join(timeout=60)
    assert len(removed) == 1, "no node was removed"
    (lost,) = removed
    records = ray.get(log.take.remote())
    check_workers_used_their_own_node(records, folders)
    per_node = {}
    for r in records:
        per_node[r["node"]] = per_node.get(r["node"], 0) + r["images"]
    assert per_node[lost] == 6  # its finished chunk (4 images) and one batch of the chunk it died in
    assert report.nodes[lost] == 4  # that finished chunk is in the cache: not computed again
    assert sum(per_node.values()) == 2 * N_PER_CLASS + 2  # the one lost batch is all that was recomputed
    assert (report.computed, report.retried, report.chunks) == (2 * N_PER_CLASS, 1, 10)
    assert np.array_equal(ext.extract(load_images(train)).values, sequential)
    again = distributed.fill_cache(ext, load_images(train))
    assert (again.computed, again.cached, again.chunks) == (0, 2 * N_PER_CLASS, 0)
    assert ray.get(log.take.remote()) == []
