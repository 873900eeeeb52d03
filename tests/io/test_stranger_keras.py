"""A stranger's ``.keras`` archive is checked by what Keras would rebuild, not by the names it shows.

Keras resolves a config object from its module *plus* a dotted class name (``keras`` +
``layers.Lambda`` is the ``Lambda`` layer), lets a class name resolve to a function
(``applications.imagenet_utils.decode_predictions`` downloads a file), looks ``package>Name``
registered names up before anything else, and in ``safe_mode`` still lets a ``Lambda`` call a
named Keras function. Each test forges the backbone archive of a small, legitimately saved
ensemble (the attacker controls every file and re-hashes the manifest), first proves the
payload is live by loading the archive with Keras directly, then checks that stacker refuses it
(through ``Ensemble.load`` + predict, ``stacker.predict`` and ``stacker predict`` in child
processes, :mod:`sandbox`) with an error naming the archive, the object's place in the config
and what it resolves to, touching nothing outside. The last tests save every kind of network
stacker writes and check that each still passes and loads to the same predictions.

``STACKER_UNDER_TEST=/path/to/checkout`` runs the children on another build (e.g. the pre-fix
commit, to show these tests fail there); run pytest with that checkout first on ``PYTHONPATH``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import stacker
from conftest import TINY, make_class_folders, save_tiny_weights
from sandbox import child_env, forged_copy, image_copy, REPO, saved_backbone_file, touched_outside, UNDER_TEST

CHILD_ENV = child_env(STACKER_ENGINE="keras")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A fitted tiny ensemble (logistic heads on the tiny backbone), its backbone archive and an image."""
    return saved_backbone_file(tmp_path_factory.mktemp("stranger-keras"), ".keras")


def _forge(saved, tmp_path, change):
    """A copy of the saved model whose backbone config is ``change(config)``, the manifest's sha256s rewritten."""
    def rewrite(path):
        with zipfile.ZipFile(path) as src:
            items = [(info, src.read(info)) for info in src.infolist()]
        with zipfile.ZipFile(path, "w") as zf:
            for info, data in items:
                if info.filename == "config.json":
                    config = json.loads(data)
                    change(config)
                    data = json.dumps(config).encode()
                zf.writestr(info, data)

    return forged_copy(saved[1], saved[2], tmp_path, rewrite)


def _image(saved, tmp_path):
    return image_copy(saved[0], tmp_path)


def _custom_objects() -> dict:
    """stacker's registered layers, on this checkout or the pre-refactor one (``stacker.backbones`` was a module)."""
    from stacker import backbones

    if hasattr(backbones, "custom_objects"):
        return backbones.custom_objects()
    from stacker.backbones.registry import custom_objects

    return custom_objects()


def _tensor(shape, history):
    return {"class_name": "__keras_tensor__", "config": {"shape": shape, "dtype": "float32", "keras_history": history}}


def _downloading_lambda(config):
    """Features -> (n, 1000) with weightless allowlisted-looking layers -> a ``Lambda`` spelt ``keras`` +
    ``layers.Lambda`` whose function is spelt as a *class* ``applications.imagenet_utils.decode_predictions``:
    at predict it fetches ImageNet's class index into ``$KERAS_HOME/models``."""
    layers = config["config"]["layers"]
    out_name, out_node, _ = config["config"]["output_layers"]

    def layer(name, module, cls, cfg, shape, history):
        return {"module": module, "class_name": cls, "config": {"name": name, **cfg}, "name": name,
                "inbound_nodes": [{"args": [_tensor(shape, history)], "kwargs": {}}]}

    width = 16  # tiny_cnn's features
    layers.append(layer("widen", "keras.layers", "RepeatVector", {"n": 1000}, [None, width],
                        [out_name, out_node - 1, 0]))
    layers.append(layer("squeeze", "keras.layers", "GlobalAveragePooling1D", {"data_format": "channels_first"},
                        [None, 1000, width], ["widen", 0, 0]))
    layers.append(layer("forged", "keras", "layers.Lambda", {"output_shape": [1000], "function": {
        "module": "keras", "class_name": "applications.imagenet_utils.decode_predictions", "config": {}}},
        [None, 1000], ["squeeze", 0, 0]))
    config["config"]["output_layers"] = ["forged", 0, 0]


def _run_keras(archive, keras_home) -> subprocess.CompletedProcess:
    """Keras's own ``load_model(safe_mode=True)`` + predict on ``archive``, in a child with its own ``$KERAS_HOME``."""
    code = ("import sys, numpy as np, keras\n"
            "from stacker import backbones as b\n"
            "co = getattr(b, 'custom_objects', None)\n"
            "co = co or __import__('stacker.backbones.registry', fromlist=['_']).custom_objects\n"
            "m = keras.saving.load_model(sys.argv[1], safe_mode=True, compile=False, custom_objects=co())\n"
            "m.predict(np.zeros((1,) + tuple(m.input_shape[1:]), 'float32'), verbose=0)\n")
    env = {**os.environ, "KERAS_HOME": str(keras_home),
           "PYTHONPATH": os.pathsep.join([UNDER_TEST or REPO, os.path.join(REPO, "tests")])}
    return subprocess.run([sys.executable, "-c", code, str(archive)], capture_output=True, text=True, env=env,
                          timeout=300)


def _assert_refused(results, *words):
    """Every entry point failed, touched nothing outside, and said which file and why."""
    for entry, (code, err, events) in results.items():
        assert events == [], f"{entry} touched outside the model directory: {events}"
        assert code != 0, f"{entry} loaded the forged archive"
        for word in words:
            assert word in err, f"{entry}: the error does not say {word!r}:\n{err[-2000:]}"


@pytest.mark.slow  # child processes under the audit hook
def test_a_renamed_lambda_that_downloads_is_refused_before_keras_reads_it(saved, tmp_path):
    model, archive = _forge(saved, tmp_path, _downloading_lambda)
    home = tmp_path / "keras-home"
    home.mkdir()
    live = _run_keras(archive, home)
    assert live.returncode != 0 and "imagenet_class_index.json" in live.stderr, live.stderr[-2000:]
    assert (home / "models").is_dir(), "the payload is live: Keras made its download folder"

    results = touched_outside(model, _image(saved, tmp_path), tmp_path, env=CHILD_ENV)
    _assert_refused(results, os.path.basename(archive), "config.layers[5] resolves to keras.layers.Lambda",
                    "keras.applications.imagenet_utils.decode_predictions")


# -- registered names: Keras looks them up before module and class name ------------------------

@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    """A function and a layer some installed package registered: Keras resolves ``package>Name`` to them
    whatever module and class name the config shows. Each leaves a marker file when Keras uses it."""
    import keras

    marker = tmp_path_factory.mktemp("plugin") / "RAN"

    @keras.saving.register_keras_serializable(package="strangerplugin", name="record")
    def record(x):
        marker.write_text("function")
        return x

    @keras.saving.register_keras_serializable(package="strangerplugin", name="Layer")
    class Recorder(keras.layers.Layer):
        @classmethod
        def from_config(cls, config):
            marker.write_text("layer")
            return keras.layers.Conv2D.from_config(config)

    return marker


def _first(config, class_name):
    stack = [config]
    while stack:
        item = stack.pop(0)
        if isinstance(item, dict):
            if item.get("class_name") == class_name:
                return item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    raise AssertionError(f"no {class_name} in the config")


def _registered_activation(config):
    """A Conv2D whose activation is a function in ``keras.activations``, by a registered name."""
    _first(config, "Conv2D")["config"]["activation"] = {
        "module": "keras.activations", "class_name": "function", "config": "strangerplugin>record",
        "registered_name": "strangerplugin>record"}


def _registered_layer(config):
    """A ``keras.layers`` ``Conv2D`` whose registered name is a plugin's layer."""
    _first(config, "Conv2D")["registered_name"] = "strangerplugin>Layer"


@pytest.mark.parametrize("change, name", [(_registered_activation, "the registered name strangerplugin>record"),
                                          (_registered_layer, "the registered name strangerplugin>Layer")])
def test_what_keras_would_resolve_is_what_is_checked(saved, tmp_path, plugin, change, name, monkeypatch):
    import keras

    model, archive = _forge(saved, tmp_path, change)
    plugin.unlink(missing_ok=True)  # live: Keras itself rebuilds the plugin's object
    net = keras.saving.load_model(archive, safe_mode=True, compile=False, custom_objects=_custom_objects())
    net(np.zeros((1, 32, 32, 3), "float32"))
    assert plugin.exists()
    plugin.unlink(missing_ok=True)
    monkeypatch.setenv("STACKER_ENGINE", "keras")  # the engine that reads the archive
    with pytest.raises(ValueError, match=r"refusing to load .*tiny_cnn_32\.keras") as err:
        stacker.Ensemble.load(model).predict_proba([str(_image(saved, tmp_path))])
    assert name in str(err.value) and "config.layers[" in str(err.value)
    assert not plugin.exists()


# -- legitimate networks of every kind still pass and load identically ----------------------------

@pytest.mark.parametrize("backbone, size", [("tiny_cnn", 32), ("efficientnet_lite0", 64), ("mobilenet", 64)])
@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_stacker_backbones_pass_the_check_and_load_identically(tmp_path, backbone, size, pooling):
    import keras

    from stacker.backbones import build
    from stacker.backbones.registry import custom_objects
    from stacker.io.persist import check_keras_archive, load_keras

    keras.utils.set_random_seed(0)
    net = build(backbone, weights=None, input_size=size, pooling=pooling)
    path = str(tmp_path / f"{backbone}.keras")
    net.save(path)
    check_keras_archive(path, custom_objects())
    x = np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(load_keras(path, custom_objects())(x)), np.asarray(net(x)), rtol=1e-6,
                               atol=1e-6)


@pytest.mark.slow  # over 7 s: the full suite runs it (the fast lane keeps this module's other tests)
def test_dense_heads_and_fine_tuned_networks_load_and_predict_identically(tmp_path):
    """The dense head and a fine-tuned network (its cut backbone and head, pixel augmentation trained in
    ``mode="full"``), saved by an ensemble and loaded back through every check."""
    make_class_folders(tmp_path / "train", 6)
    weights = save_tiny_weights(tmp_path / "tiny.weights.h5")
    data = stacker.load_images(tmp_path / "train")
    finetune = {"blocks": 1, "epochs": 1, "head_epochs": 1, "mode": "full",
                "augment": ("flip", "zoom", "rotation", "contrast", "translation")}
    for name, kw in (("dense", {"models": ("dense",)}), ("finetune", {"finetune": finetune})):
        ens = stacker.Ensemble(backbones=[{**TINY, "weights": weights}], cv=2, random_state=0, verbose=0,
                               **kw).fit(data)
        ens.save(tmp_path / name)
        assert any(f.endswith(".keras") for f in json.loads((tmp_path / name / "manifest.json").read_text())["files"]
                   if f.startswith("learners/")), name
        images = [str(p) for p in data.paths[:3]]
        np.testing.assert_allclose(stacker.Ensemble.load(tmp_path / name).predict_proba(images),
                                   ens.predict_proba(images), rtol=1e-5, atol=1e-6)


def test_resolution_follows_keras():
    from stacker.io.keras_archive import resolve_config_object as resolve

    assert resolve({"module": "keras", "class_name": "layers.Lambda", "config": {}}) == ("class", "keras.layers.Lambda")
    assert resolve({"module": "keras.layers", "class_name": "Dense", "config": {}, "registered_name": None}) == (
        "class", "keras.layers.Dense")
    assert resolve({"module": "keras.layers", "class_name": "Dense", "config": {},
                    "registered_name": "x>Y"}) == ("registered", "x>Y")
    assert resolve({"module": "keras.src.layers.core.lambda_layer", "class_name": "Lambda", "config": {}}) == (
        "class", "keras.src.layers.core.lambda_layer.Lambda")
    assert resolve({"module": "keras", "class_name": "function", "config": "utils.get_file"}) == (
        "function", "keras.utils.get_file")
    assert resolve({"module": "builtins", "class_name": "function", "config": "relu"}) == ("function", "builtins.relu")
    assert resolve({"class_name": "__lambda__", "config": {"code": ""}}) == ("special", "__lambda__")
    assert resolve({"class_name": "__keras_tensor__", "config": {}}) == ("value", "__keras_tensor__")
