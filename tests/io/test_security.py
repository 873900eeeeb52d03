"""A forged model directory or cache folder must not run code.

The attacker controls every file of a directory they hand over, manifest and checksums
included. Each payload below names a function that runs code, writes a file or loads a
further file with an unrestricted unpickler. Every test first proves the payload is
live (run directly, or through a loader told to trust it, it leaves the marker file),
then forges it into a saved ensemble or cache and checks that loading refuses it and
the marker never appears.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import pytest
import skops.io as sio
from sklearn.ensemble import RandomForestClassifier

import stacker
from conftest import REPO, TINY, make_class_folders, save_tiny_weights
from stacker.app import cli
from stacker.data import sources as im
from stacker.io import persist
from stacker.features.cache import result_store
from stacker.ensemble import Ensemble, ModelIntegrityError
from stacker.backbones.torch_checkpoint import sha256_file


class _Reduce:
    """A pickle whose loading calls ``func(*args)``."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def _node(value, i=[0]):  # noqa: B006 - a running id
    i[0] += 1
    node_id = i[0]
    if isinstance(value, (list, tuple)):
        kind = "ListNode" if isinstance(value, list) else "TupleNode"
        return {"__class__": type(value).__name__, "__module__": "builtins", "__loader__": kind,
                "content": [_node(v) for v in value], "__id__": node_id}
    return {"__class__": type(value).__name__, "__module__": "builtins", "__loader__": "JsonNode",
            "content": json.dumps(value), "is_json": True, "__id__": node_id}


def forged_skops(path, module: str, name: str, args: tuple, wrap: bool = True) -> None:
    """A skops file that calls ``module.name(*args)`` when rebuilt, hidden in an estimator's attributes."""
    call = {"__class__": name, "__module__": module, "__loader__": "ConstructorFromReduceNode",
            "content": _node(tuple(args)), "__id__": 999}
    root = call
    if wrap:  # a real estimator's file with one attribute replaced by the call
        from sklearn.linear_model import LogisticRegression

        with zipfile.ZipFile(__import__("io").BytesIO(sio.dumps(LogisticRegression()))) as zf:
            root = json.loads(zf.read("schema.json"))
        state = root["content"]
        first = next(iter(state["content"]))
        del state["content"][first]
        state["content"]["coef_"] = call  # same key count: key_types still line up
    root.update(protocol=2, _skops_version="0.16.0")
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("schema.json", json.dumps(root))


def _payloads(tmp_path, marker):
    """(label, module, function, args): one call each that leaves ``marker`` when it runs."""
    evil_pickle = tmp_path / "evil.pkl"
    evil_pickle.write_bytes(pickle.dumps(_Reduce(os.system, f"touch {marker}")))
    evil_npy = tmp_path / "evil.npy"
    np.save(evil_npy, np.array([_Reduce(os.system, f"touch {marker}")], dtype=object), allow_pickle=True)
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    (fake_bin / "meson").write_text(f"#!/bin/sh\ntouch {marker}\n")
    (fake_bin / "meson").chmod(0o755)
    return [
        ("sklearn: run a Python script", "sklearn.utils._testing", "assert_run_python_script_without_output",
         (f"open({str(marker)!r}, 'w').close()",)),
        ("numpy: load a pickled .npy", "numpy", "load", (str(evil_npy), None, True)),
        ("joblib: load a pickle", "joblib", "load", (str(evil_pickle),)),
        ("scipy: start a build subprocess", "scipy._lib._testutils", "_test_cython_extension",
         (str(tmp_path / "build"), str(tmp_path))),
        ("stacker: write any file", "stacker.submission", "write_csv",
         (str(marker), ["1"], [[0.5, 0.5]], ["a", "b"])),
        ("builtins: os.system", "posix", "system", (f"touch {marker}",)),
    ]


@pytest.fixture
def fake_meson_path(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("sec")
    make_class_folders(root / "train", 8)
    weights = save_tiny_weights(root / "tiny.weights.h5")
    data = im.load_images(root / "train")
    ens = Ensemble(backbones=[{**TINY, "weights": weights}], models=("logistic", "prototype", "dense"), cv=2,
                   random_state=0, cache_dir=str(root / "cache"), verbose=0).fit(data)
    ens.save(root / "model")
    return ens, data, root


def _forge(model_dir, rel, writer):
    """Replace ``rel`` with attacker content and rewrite the manifest's checksum to match."""
    path = model_dir / rel
    writer(path)
    manifest = json.loads((model_dir / "manifest.json").read_text())
    manifest["files"][rel] = sha256_file(str(path))
    (model_dir / "manifest.json").write_text(json.dumps(manifest))


def _entry_points(model_dir, image):
    """Every way a user loads a model directory; each must refuse it."""
    yield "Ensemble.load", lambda: Ensemble.load(model_dir)
    yield "stacker.predict", lambda: stacker.predict([image], model=model_dir)
    yield "stacker predict", lambda: cli.main(["predict", str(model_dir), image])


def test_every_payload_is_live_when_trusted(tmp_path, fake_meson_path):
    """The control: each forged file really runs its payload if a loader trusted the function."""
    marker = tmp_path / "RAN"
    for label, module, name, args in _payloads(tmp_path, marker):
        path = tmp_path / "p.skops"
        forged_skops(path, module, name, args, wrap=False)
        assert f"{module}.{name}" in sio.get_untrusted_types(file=str(path))
        try:
            sio.load(str(path), trusted=[f"{module}.{name}"])
        except Exception:  # noqa: BLE001 - some payloads fail after their side effect
            pass
        assert marker.exists(), f"{label}: the control payload did not run, so the test below proves nothing"
        marker.unlink()


@pytest.mark.parametrize("target", ["meta.skops", "learner", "param"])
def test_forged_model_directory_runs_nothing(saved, tmp_path, fake_meson_path, target):
    ens, data, root = saved
    marker = tmp_path / "RAN"
    for label, module, name, args in _payloads(tmp_path, marker):
        model_dir = tmp_path / "model"
        shutil.rmtree(model_dir, ignore_errors=True)
        shutil.copytree(root / "model", model_dir)
        manifest = json.loads((model_dir / "manifest.json").read_text())
        if target == "learner":
            rel = next(f for f in sorted(manifest["files"]) if f.startswith("learners/") and f.endswith(".skops"))
        elif target == "param":  # an estimator-valued parameter the manifest points at
            rel = "params/meta.skops"
            manifest["params"]["meta"] = {"__estimator__": rel}
            (model_dir / "params").mkdir(exist_ok=True)
            (model_dir / "manifest.json").write_text(json.dumps(manifest))
        else:
            rel = target
        _forge(model_dir, rel, lambda p: forged_skops(p, module, name, args))
        for how, call in _entry_points(model_dir, data.paths[0]):
            if how == "stacker predict":
                assert call() != 0, f"{label} via {how}: the CLI must fail"
            else:
                with pytest.raises(persist.UntrustedTypeError, match=f"{module}.{name}") as err:
                    call()
                assert rel.split("/")[-1] in str(err.value), "the error names the file"
                assert "STACKER_TRUSTED_TYPES" in str(err.value), "and how to trust a type"
            assert not marker.exists(), f"{label} ran via {how}"


def test_a_pickle_in_any_model_file_is_never_unpickled(saved, tmp_path):
    _, data, root = saved
    marker = tmp_path / "RAN"
    model_dir = tmp_path / "model"
    shutil.copytree(root / "model", model_dir)
    rel = next(f for f in json.loads((model_dir / "manifest.json").read_text())["files"] if f.startswith("learners/"))
    payload = pickle.dumps(_Reduce(os.system, f"touch {marker}"))
    _forge(model_dir, rel, lambda p: p.write_bytes(payload))
    # the same bytes under the old .joblib name, the manifest listing it instead
    stem = rel.rsplit(".", 1)[0]
    _forge(model_dir, stem + ".joblib", lambda p: p.write_bytes(payload))
    (model_dir / rel).unlink()
    manifest = json.loads((model_dir / "manifest.json").read_text())
    del manifest["files"][rel]
    (model_dir / "manifest.json").write_text(json.dumps(manifest))
    for how, call in _entry_points(model_dir, data.paths[0]):
        try:
            call()
        except (ValueError, TypeError, OSError):
            pass
        else:
            assert how == "stacker predict", f"{how} loaded a pickle"
        assert not marker.exists(), f"the pickle ran via {how}"
    with pytest.raises(persist.LegacyFormatError, match="never loaded"):
        Ensemble.load(model_dir)


def test_a_forged_keras_archive_is_refused_before_keras_reads_it(saved, tmp_path):
    """CVE-2025-9906 style: a Lambda whose function is keras.models.load_model, and an unknown module."""
    _, data, root = saved
    model_dir = tmp_path / "model"
    shutil.copytree(root / "model", model_dir)
    rel = next(f for f in json.loads((model_dir / "manifest.json").read_text())["files"] if f.endswith(".keras"))
    original = (model_dir / rel).read_bytes()

    def rewrite(mutate):
        def writer(path):
            src = zipfile.ZipFile(__import__("io").BytesIO(original))
            config = json.loads(src.read("config.json"))
            mutate(config)
            with zipfile.ZipFile(path, "w") as zf:
                for info in src.infolist():
                    zf.writestr(info, json.dumps(config) if info.filename == "config.json" else src.read(info))
        return writer

    def add_lambda(config):
        config["config"]["layers"].append({"module": "keras.layers", "class_name": "Lambda", "config": {
            "name": "x", "function": {"module": "keras.models", "class_name": "function", "config": "load_model"}}})

    def foreign_module(config):
        config["config"]["layers"][-1]["module"] = "os"

    for mutate, reason in ((add_lambda, "Lambda"), (foreign_module, "os.")):
        _forge(model_dir, rel, rewrite(mutate))
        with pytest.raises(ValueError, match=f"refusing to load .*{reason}"):
            Ensemble.load(model_dir)
    # an extra archive member (a path Keras might extract) is refused too
    def extra_member(path):
        with zipfile.ZipFile(path, "w") as zf:
            with zipfile.ZipFile(__import__("io").BytesIO(original)) as src:
                for info in src.infolist():
                    zf.writestr(info, src.read(info))
            zf.writestr("assets/../../evil.txt", "x")

    _forge(model_dir, rel, extra_member)
    with pytest.raises(ValueError, match="unexpected archive members"):
        Ensemble.load(model_dir)


def _escape_path(manifest):
    manifest["learners"][0]["folds"][0] = "../../outside/fold0"


def _old_format(manifest):
    manifest["format_version"] = 2


@pytest.mark.parametrize("edit,error,match", [
    (_escape_path, ValueError, "not a file inside the model directory"),  # paths cannot leave the directory
    (_old_format, ModelIntegrityError, "format version 2.*pickles.*Refit"),  # pickle-era: a clear error
])
def test_forged_manifests_are_refused(saved, tmp_path, edit, error, match):
    _, _, root = saved
    model_dir = tmp_path / "model"
    shutil.copytree(root / "model", model_dir)
    manifest = json.loads((model_dir / "manifest.json").read_text())
    edit(manifest)
    (model_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(error, match=match):
        Ensemble.load(model_dir)


def test_poisoned_cache_checkpoints_run_nothing_and_are_recomputed(saved, tmp_path, fake_meson_path):
    """Learner results and fold checkpoints in a cache folder are refused like model files."""
    ens, data, root = saved
    marker = tmp_path / "RAN"
    cache = tmp_path / "cache"
    shutil.copytree(root / "cache", cache)
    learners = result_store(str(cache), "learners")
    folds = result_store(str(cache), "folds")
    keys = {name: lr.key_ for name, lr in ens.learners_.items()}
    payloads = _payloads(tmp_path, marker)
    for i, (name, key) in enumerate(keys.items()):
        label, module, fn, args = payloads[i % len(payloads)]
        entry = learners.path(key)
        if "dense" in name:  # a Keras-backed learner: a forged archive instead
            for f in os.listdir(entry):
                if f.endswith(".keras"):
                    with zipfile.ZipFile(os.path.join(entry, f), "w") as zf:
                        zf.writestr("config.json", json.dumps({"module": "os", "class_name": "system"}))
                        zf.writestr("metadata.json", "{}")
                        zf.writestr("model.weights.h5", b"")
            continue
        # the learner entry is removed, so the fit resumes from a (poisoned) fold checkpoint
        shutil.rmtree(entry)
        with folds.put(f"{key}-fold0") as tmp:
            forged_skops(os.path.join(tmp, "model.skops"), module, fn, args)
            np.savez(os.path.join(tmp, "arrays.npz"), oof_proba=np.full((len(data) // 2, 2), 0.5, np.float32))
    refit = Ensemble(**{**ens.get_params(), "cache_dir": str(cache)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        refit.fit(data)
    assert not marker.exists()
    notes = " ".join(str(w.message) for w in caught)
    assert "not using a cached result" in notes and "untrusted" in notes and "refusing to load" in notes
    np.testing.assert_allclose(refit.meta_oof_proba_, ens.meta_oof_proba_, atol=1e-5)


class MyClassifier(RandomForestClassifier):
    """A user's own estimator class (a subclass of a scikit-learn one)."""


def test_a_custom_estimator_round_trips_only_when_its_type_is_trusted(tmp_path, monkeypatch):
    root = tmp_path
    make_class_folders(root / "train", 8)
    weights = save_tiny_weights(root / "tiny.weights.h5")
    data = im.load_images(root / "train")
    ens = Ensemble(backbones=[{**TINY, "weights": weights}], models=[MyClassifier(n_estimators=5, random_state=0)],
                   meta="mean", cv=2, random_state=0, verbose=0).fit(data)
    ens.save(root / "model")
    needed = [f"{__name__}.MyClassifier", "sklearn.tree._tree.Tree"]
    with pytest.raises(persist.UntrustedTypeError, match="MyClassifier") as err:
        Ensemble.load(root / "model")
    assert set(err.value.types) <= set(needed) and err.value.path.endswith(".skops")
    expected = ens.predict_proba(data.paths)
    loaded = Ensemble.load(root / "model", trusted=needed)
    np.testing.assert_allclose(loaded.predict_proba(data.paths), expected, atol=1e-6)
    monkeypatch.setenv("STACKER_TRUSTED_TYPES", ",".join(needed))
    np.testing.assert_allclose(Ensemble.load(root / "model").predict_proba(data.paths), expected, atol=1e-6)
    monkeypatch.setenv("STACKER_TRUSTED_TYPES", "sklearn")  # a module root is not a type
    with pytest.raises(ValueError, match="fully qualified class name"):
        Ensemble.load(root / "model")


def test_the_console_script_refuses_a_forged_directory(saved, tmp_path, fake_meson_path):
    _, data, root = saved
    marker = tmp_path / "RAN"
    model_dir = tmp_path / "model"
    shutil.copytree(root / "model", model_dir)
    _, module, name, args = _payloads(tmp_path, marker)[0]
    _forge(model_dir, "meta.skops", lambda p: forged_skops(p, module, name, args))
    script = ("import sys, tinynet; from stacker.app.cli import main; "  # tinynet registers the test backbone
              "sys.exit(main(['predict', sys.argv[1], sys.argv[2]]))")
    out = subprocess.run([sys.executable, "-c", script, str(model_dir), data.paths[0]], capture_output=True,
                         text=True, env={**os.environ, "STACKER_ENGINE": "keras",
                                         "PYTHONPATH": os.path.join(REPO, "tests")})
    assert out.returncode != 0 and "untrusted type" in out.stderr and "--trust" in out.stderr
    assert not marker.exists()
