"""A model directory from someone else cannot make this process allocate more than the bounds allow (issue 26, class 6).

Each test forges a small, legitimately saved ensemble (the attacker controls every file and
re-hashes the manifest) so that one file declares far more memory than it stores: a learner
spec's ``input_size``, an array in ``oof.npz``, an array member of a skops fold file, an HDF5
dataset in a ``.keras`` fold file's weights. Each forged file is at most a few MiB and
declares 0.4 to 1.6 GB (on the pre-fix build, the child's peak RSS grew by more than a GB). The test then

- runs ``Ensemble.load`` + predict in a child and compares its peak RSS (``ru_maxrss``) with
  the same child on the legitimate model: it may not grow by more than ``MARGIN``;
- runs the three entry points through :mod:`sandbox`: each must fail, touch nothing outside
  the directory and say which file, which member, the declared size and the variable that
  raises the bound.

``STACKER_UNDER_TEST=/path/to/checkout`` runs the children on another build (e.g. the
pre-fix commit, to show these tests fail there: its children allocate the declared memory);
run pytest with that checkout first on ``PYTHONPATH`` too.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import stacker

from sandbox import home_dirs, CHILD, child_env, rehash, REPO, touched_outside, UNDER_TEST, fit_tiny_model, image_copy

CHILD_ENV = child_env()
MARGIN = 300 << 20  # peak RSS a forged directory may add over the legitimate one; every bomb declares >= 0.4 GB
ZEROS = np.zeros(64 << 20, np.uint8).tobytes()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A fitted tiny ensemble with a skops learner (logistic) and a Keras one (dense), saved."""
    root = tmp_path_factory.mktemp("sizes")
    ens, data = fit_tiny_model(root, ("logistic", "dense"))
    return ens, data, root, image_copy(data, root)


@pytest.fixture(scope="module")
def legit_peak(saved, tmp_path_factory):
    """Peak RSS of ``Ensemble.load`` + predict on the legitimate model, in a child like the forged ones'."""
    _ens, _data, root, image = saved
    return _peak_rss(root / "model", image, tmp_path_factory.mktemp("legit-peak"))


def _peak_rss(model, image, tmp_path) -> int:
    """Bytes of peak RSS of :mod:`sandbox_child`'s ``load`` entry (``Ensemble.load`` + predict) in a fresh process."""
    wrapper = ("import resource, runpy, sys\nsys.argv = sys.argv[1:]\ntry:\n    runpy.run_path(sys.argv[0], "
               "run_name='__main__')\nexcept SystemExit:\n    pass\n"
               "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    env = {**os.environ, "STACKER_ENGINE": "keras", **home_dirs(tmp_path),
           "PYTHONPATH": os.pathsep.join([UNDER_TEST or REPO, os.path.join(REPO, "tests")])}
    proc = subprocess.run([sys.executable, "-c", wrapper, CHILD, "load", str(model), str(image),
                           str(tmp_path / "peak-record.json")], capture_output=True, text=True, env=env,
                          cwd=str(tmp_path), timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PEAK ")]
    assert lines, proc.stderr[-2000:]
    return int(lines[-1].split()[1])


def _forge(saved, tmp_path, edit):
    """A copy of the saved model, ``edit(model_dir, manifest)`` applied, the manifest's sha256s rewritten."""
    root = saved[2]
    model = tmp_path / "model"
    shutil.copytree(root / "model", model)
    manifest = json.loads((model / "manifest.json").read_text())
    manifest = edit(model, manifest) or manifest
    (model / "manifest.json").write_text(json.dumps(manifest))
    rehash(model)
    return model


def _npy_bomb(zf: zipfile.ZipFile, name: str, shape: tuple, dtype) -> None:
    """A member ``name`` holding a real ``.npy`` of zeros of ``shape``, deflated (about 1000:1), written in chunks."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": np.dtype(dtype).str, "fortran_order": False,
                                                  "shape": shape})
    left = int(np.prod(shape)) * np.dtype(dtype).itemsize
    info = zipfile.ZipInfo(name)
    info.compress_type = zipfile.ZIP_DEFLATED
    with zf.open(info, "w", force_zip64=True) as f:
        f.write(header.getvalue())
        while left:
            chunk = ZEROS[:min(left, len(ZEROS))]
            f.write(chunk)
            left -= len(chunk)


def _rewrite_zip(path, replace: dict) -> None:
    """Rewrite the zip at ``path``: members named in ``replace`` written by ``replace[name](zf, name)``."""
    with zipfile.ZipFile(path) as zf:
        members = [(info, zf.read(info)) for info in zf.infolist()]
    with zipfile.ZipFile(path, "w") as zf:
        for info, data in members:
            if info.filename in replace:
                replace[info.filename](zf, info.filename)
            else:
                zf.writestr(info, data)


def _assert_bounded(saved, tmp_path, model, legit_peak, *words):
    """The forged directory raised no memory peak and every entry point refused it, saying why."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:  # the peak child beside the three entry points' (each its own process)
        peak = pool.submit(_peak_rss, model, saved[3], tmp_path / "peak")
        results = touched_outside(model, saved[3], tmp_path, env=CHILD_ENV)
        peak = peak.result()
    assert peak < legit_peak + MARGIN, (f"loading the forged directory peaked at {peak >> 20} MiB of RSS, "
                                        f"{(peak - legit_peak) >> 20} MiB over the legitimate model's "
                                        f"{legit_peak >> 20}")
    for entry, (status, err, events) in results.items():
        assert events == [], f"{entry} touched outside the model directory: {events}"
        assert status != 0, f"{entry} loaded the forged directory"
        for word in words:
            assert word in err, f"{entry}: the error does not say {word!r}:\n{err[-2000:]}"


@pytest.fixture(autouse=True)
def _peak_dir(tmp_path):
    (tmp_path / "peak").mkdir()


@pytest.mark.slow  # child processes under the audit hook
def test_a_huge_input_size_in_a_learner_spec_is_refused(saved, tmp_path, legit_peak):
    """The extractor would allocate 1 x 6000 x 6000 x 3 float32 (0.4 GB, and as much again around it) for one image."""
    def edit(model, manifest):
        for entry in manifest["learners"]:
            entry["spec"]["input_size"] = 6000

    model = _forge(saved, tmp_path, edit)
    _assert_bounded(saved, tmp_path, model, legit_peak, "manifest.json", "learners[0].spec.input_size", "6000",
                    "2048", "STACKER_MAX_INPUT_SIZE")


@pytest.mark.slow  # child processes under the audit hook
def test_an_oof_array_declaring_a_huge_shape_is_refused(saved, tmp_path, legit_peak):
    """``oof.npz``'s ``y`` replaced by 1.6 GB of deflated zeros (1.6 MB on disk)."""
    def edit(model, manifest):
        _rewrite_zip(model / "oof.npz", {"y.npy": lambda zf, name: _npy_bomb(zf, name, (200_000_000,), np.int64)})

    model = _forge(saved, tmp_path, edit)
    assert os.path.getsize(model / "oof.npz") < 4 << 20
    _assert_bounded(saved, tmp_path, model, legit_peak, "oof.npz", "y.npy", "1600000", "STACKER_MAX_")


@pytest.mark.slow  # child processes under the audit hook
def test_a_skops_array_member_declaring_a_huge_shape_is_refused(saved, tmp_path, legit_peak):
    """A logistic fold file's largest array member replaced by 0.8 GB of deflated zeros."""
    rel = []

    def edit(model, manifest):
        rel.append(next(r for r in manifest["files"] if r.endswith("fold0.skops") and "logistic" in r))
        with zipfile.ZipFile(model / rel[0]) as zf:
            name = max((i for i in zf.infolist() if i.filename.endswith(".npy")), key=lambda i: i.file_size).filename
        rel.append(name)
        _rewrite_zip(model / rel[0], {name: lambda zf, n: _npy_bomb(zf, n, (100_000_000,), np.float64)})

    model = _forge(saved, tmp_path, edit)
    assert os.path.getsize(model / rel[0]) < 2 << 20
    _assert_bounded(saved, tmp_path, model, legit_peak, rel[0], rel[1], "800000", "STACKER_MAX_")


@pytest.mark.slow  # child processes under the audit hook
def test_a_keras_weights_dataset_declaring_a_huge_shape_is_refused(saved, tmp_path, legit_peak):
    """A dense fold file's first kernel in ``model.weights.h5`` replaced by a (12000, 12000) float32 dataset
    that stores nothing (chunked, gzip, only a fill value): Keras would read 0.58 GB (and copy it) before
    checking its shape."""
    import h5py

    rel, names = [], []

    def forge_weights(data: bytes) -> bytes:
        buf = io.BytesIO(data)
        with h5py.File(buf, "r+") as h5:
            h5.visititems(lambda n, obj: names.append(n) if isinstance(obj, h5py.Dataset) and obj.ndim == 2 else None)
            del h5[names[0]]
            h5.create_dataset(names[0], shape=(12000, 12000), dtype="float32", chunks=(1000, 1000),
                              compression="gzip", fillvalue=0.0)
        return buf.getvalue()

    def edit(model, manifest):
        rel.append(next(r for r in manifest["files"] if r.endswith("fold0.keras")))
        with zipfile.ZipFile(model / rel[0]) as zf:
            weights = forge_weights(zf.read("model.weights.h5"))
        _rewrite_zip(model / rel[0], {"model.weights.h5": lambda zf, name: zf.writestr(name, weights)})

    model = _forge(saved, tmp_path, edit)
    assert os.path.getsize(model / rel[0]) < 2 << 20
    _assert_bounded(saved, tmp_path, model, legit_peak, rel[0], "model.weights.h5", names[0], "576000000",
                    "STACKER_MAX_")


def test_a_legitimate_model_passes_the_bounds_and_each_bound_is_overridable(saved, monkeypatch):
    """The saved model loads and predicts as before; a bound lowered by its variable refuses it, naming it."""
    ens, data, root, _image = saved
    model = root / "model"
    images = [str(p) for p in data.paths[:3]]
    np.testing.assert_array_equal(stacker.Ensemble.load(model).predict_proba(images), ens.predict_proba(images))
    monkeypatch.setenv("STACKER_MAX_INPUT_SIZE", "16")
    with pytest.raises(ValueError, match=r"manifest.json: the field .*input_size declares 32 pixels per side, over "
                                         r"the bound of 16; \$STACKER_MAX_INPUT_SIZE raises the bound"):
        stacker.Ensemble.load(model)
    monkeypatch.delenv("STACKER_MAX_INPUT_SIZE")
    monkeypatch.setenv("STACKER_MAX_ARRAY_BYTES", "8")
    with pytest.raises(ValueError, match=r"model.*: .* declares \d+ bytes, over the bound of 8; "
                                         r"\$STACKER_MAX_ARRAY_BYTES raises the bound"):
        stacker.Ensemble.load(model)
