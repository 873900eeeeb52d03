"""A model directory from someone else touches nothing outside itself: links, manifest paths, manifest types.

Each test forges a directory from a small, legitimately saved ensemble (the attacker controls
every file and re-hashes the manifest), runs it through ``Ensemble.load`` + predict,
``stacker.predict`` and ``stacker predict`` in a child process with an audit hook
(:mod:`sandbox`), and checks that nothing outside the directory was opened, made or
connected to, and that the load is refused with an error naming the file and the reason
(or, for paths the loader now simply ignores, that it predicts without going there).

``STACKER_UNDER_TEST=/path/to/checkout`` runs the children on another build (e.g. the
pre-fix commit, to show these tests fail there); run pytest with that checkout first on
``PYTHONPATH`` too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import stacker
from sandbox import child_env, image_copy, rehash, REPO, touched_outside, UNDER_TEST, fit_tiny_model

CHILD_ENV = child_env()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A fitted tiny ensemble (weights from a file outside its directory, as users' often are), saved."""
    root = tmp_path_factory.mktemp("stranger")
    ens, data = fit_tiny_model(root, ("logistic", "prototype", "dense"))
    return ens, data, root


def _forge(saved, tmp_path, edit=None, resign=True):
    """A copy of the saved model, ``edit(model_dir, manifest)`` applied, the manifest's sha256s rewritten."""
    _ens, _data, root = saved
    model = tmp_path / "model"
    shutil.copytree(root / "model", model)
    manifest = json.loads((model / "manifest.json").read_text())
    if edit is not None:
        manifest = edit(model, manifest) or manifest
    (model / "manifest.json").write_text(json.dumps(manifest))
    if resign and isinstance(manifest.get("files"), dict):
        rehash(model)  # through links, as an attacker re-hashing the directory would
    return model


def _image(saved, tmp_path):
    return image_copy(saved[1], tmp_path)


def _assert_refused(results, *words):
    """Every entry point failed, touched nothing outside, and said which file and why."""
    for entry, (code, err, events) in results.items():
        events = events
        assert events == [], f"{entry} touched outside the model directory: {events}"
        assert code != 0, f"{entry} loaded the forged directory"
        for word in words:
            assert word in err, f"{entry}: the error does not say {word!r}:\n{err[-2000:]}"


def _assert_predicted_inside(results):
    for entry, (code, err, events) in results.items():
        events = events
        assert events == [], f"{entry} touched outside the model directory: {events}"
        assert code == 0, f"{entry} failed:\n{err[-2000:]}"


# -- class 4: symbolic links ---------------------------------------------------------------

def _link_a_fold_file(model, manifest, outside):
    rel = next(r for r in manifest["files"] if r.endswith("_fold0.skops"))
    shutil.move(model / rel, outside / "fold.skops")  # the content now lives elsewhere; the link reaches it
    os.symlink(outside / "fold.skops", model / rel)
    return rel


def _link_the_backbones_folder(model, manifest, outside):
    shutil.move(model / "backbones", outside / "backbones")
    os.symlink(outside / "backbones", model / "backbones")
    return "backbones"


@pytest.mark.slow  # child processes under the audit hook
@pytest.mark.parametrize("make_link", [_link_a_fold_file, _link_the_backbones_folder], ids=["file", "folder"])
def test_a_symbolic_link_in_the_directory_is_refused_by_name(saved, tmp_path, make_link):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    linked = []
    model = _forge(saved, tmp_path, lambda m, man: linked.append(make_link(m, man, outside)))
    results = touched_outside(model, _image(saved, tmp_path), tmp_path, env=CHILD_ENV)
    _assert_refused(results, linked[0], "symbolic link")


# -- class 5: paths in the manifest ----------------------------------------------------------

@pytest.mark.slow  # child processes under the audit hook
def test_machine_paths_in_the_manifest_are_never_used(saved, tmp_path):
    """A manifest's cache_dir, weights_dir and weights files name places on this machine: ignored, not used."""
    _ens, _data, root = saved
    victim_cache, victim_weights = tmp_path / "victim-cache", tmp_path / "victim-weights"
    victim_cache.mkdir()
    victim_weights.mkdir()
    secret = victim_weights / "secret.weights.h5"
    shutil.copy(root / "tiny.weights.h5", secret)

    def edit(model, manifest):
        manifest["params"].update(cache_dir=str(victim_cache), weights_dir=str(victim_weights), weights=str(secret))
        manifest["params"]["backbones"] = [{**b, "weights": str(secret)} for b in manifest["params"]["backbones"]]
        for entry in manifest["learners"]:
            entry["spec"]["weights"] = str(secret)
            entry["weights_id"] = None  # so that a loader hashing the spec's file would read it

    model = _forge(saved, tmp_path, edit)
    results = touched_outside(model, _image(saved, tmp_path), tmp_path, env=CHILD_ENV)
    _assert_predicted_inside(results)
    assert os.listdir(victim_cache) == [], "features or probabilities were written to the manifest's cache_dir"
    loaded = stacker.Ensemble.load(model)
    assert (loaded.cache_dir, loaded.weights_dir, loaded.weights) == (None, None, None)
    assert all(lr.spec["weights"] is None for lr in loaded.learners_.values())


# -- class 7: odd manifest types ----------------------------------------------------------

@pytest.mark.slow  # child processes under the audit hook
def test_a_manifest_field_of_the_wrong_type_is_refused_with_its_name(saved, tmp_path):
    def edit(model, manifest):
        manifest["files"] = sorted(manifest["files"])  # a list of names instead of name -> sha256

    model = _forge(saved, tmp_path, edit, resign=False)
    results = touched_outside(model, _image(saved, tmp_path), tmp_path, env=CHILD_ENV)
    _assert_refused(results, "manifest.json", "files", "must be object")
    assert not any("AttributeError" in err for _code, err, _events in results.values())


def _set(path, value):
    def edit(model, manifest):
        target = manifest
        for key in path[:-1]:
            target = target[key]
        if value is KeyError:
            del target[path[-1]]
        else:
            target[path[-1]] = value
    return edit


@pytest.mark.parametrize("path, value, field, reason", [
    (("learners",), {"a": 1}, "learners", "must be array"),
    (("learners", 0, "folds"), 7, "learners[0].folds", "must be array"),
    (("learners", 0, "folds", 0), 7, "learners[0].folds[0]", "must be string"),
    (("learners", 0, "folds", 0), "", "learners[0].folds[0]", "must be a path relative"),
    (("learners", 0, "folds"), KeyError, "learners[0]", "'folds'"),
    (("learners", 0, "spec"), "frozen", "learners[0].spec", "must be object"),
    (("learners", 0, "kind"), "nonesuch", "learners[0].kind", "not a registered learner kind"),
    (("learners", 0, "backbone_file"), "backbones/other.keras", "learners[0].backbone_file", "not among"),
    (("classes",), "cat,dog", "classes", "must be array"),
    (("classes",), ["cat", 3], "classes[1]", "must be string"),
    (("level2",), [], "level2", "must be object"),
    (("level2", "temperature"), "1", "level2.temperature", "must be number"),
    (("params",), [], "params", "must be object"),
    (("params", "cv"), "five", "params.cv", "an integer >= 2"),
    (("params", "nonesuch"), 1, "params", "nonesuch"),
    (("files", "oof.npz"), "not a sha", "files.oof.npz", "sha256"),
    (("format_version",), "4", "format", "4"),
])
def test_odd_manifest_types_are_clear_errors(saved, tmp_path, path, value, field, reason):
    model = _forge(saved, tmp_path, _set(path, value), resign=False)
    with pytest.raises(ValueError) as info:
        stacker.Ensemble.load(model)
    message = str(info.value)
    assert "manifest.json" in message or str(model) in message, message
    assert field in message and reason in message, message


# -- legitimate models are unchanged ----------------------------------------------------------

@pytest.mark.slow  # child processes under the audit hook
def test_a_legitimate_model_predicts_identically_through_every_entry_point_touching_nothing_outside(
        saved, tmp_path, monkeypatch):
    ens, data, root = saved
    model = root / "model"
    images = [str(p) for p in data.paths[:2]] + [str(p) for p in data.paths[-2:]]
    expected = ens.predict_proba(images)
    np.testing.assert_array_equal(stacker.Ensemble.load(model).predict_proba(images), expected)
    np.testing.assert_array_equal(stacker.predict(images, model=model).proba, expected)
    code = ("import sys, tinynet\ntry:\n    from stacker.app import cli\nexcept ImportError:\n    from stacker import cli\n"
            "sys.exit(cli.main(sys.argv[1:]))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([UNDER_TEST or REPO, os.path.join(REPO, "tests")])}
    proc = subprocess.run([sys.executable, "-c", code, "predict", str(model), *images, "--json"], capture_output=True,
                          text=True, env=env, cwd=str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout)
    np.testing.assert_array_equal(np.array([[r[c] for c in ens.classes_] for r in rows]), expected)
    results = touched_outside(model, images[0], tmp_path, env=CHILD_ENV)
    _assert_predicted_inside(results)
