"""The device option: a GPU when one works, a clear refusal before any work when one is asked for and absent.

A GPU-only code path (CUDA providers, TensorFlow GPUs, mixed precision) runs here with the
probes replaced by what a GPU machine reports; the real GPU is measured by
``benchmarks/gpu.py`` where one is lent.
"""

import sys

import numpy as np
import pytest

from conftest import TINY, make_class_folders, save_tiny_weights
from stacker.features import device, engines
from stacker.features.extractor import forward_pass_count


@pytest.fixture(autouse=True)
def fresh_choice(monkeypatch):
    """Each test chooses anew, and leaves the process's choice as it found it."""
    monkeypatch.setattr(device, "_current", [])
    monkeypatch.delenv("STACKER_ENGINE", raising=False)


@pytest.fixture
def no_gpu_files(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(device, "GPU_DEVICE_FILES", (str(tmp_path / "nvidiactl"),))
    return tmp_path / "nvidiactl"


@pytest.fixture
def a_gpu(monkeypatch, no_gpu_files):
    """A machine whose probes answer as on one NVIDIA GPU with tensor cores (ONNX Runtime CUDA, TensorFlow GPU)."""
    no_gpu_files.touch()
    monkeypatch.setattr(device, "_onnx_gpu_providers", lambda: ("CUDAExecutionProvider", "CPUExecutionProvider"))
    monkeypatch.setattr(device, "_tensorflow_gpus", lambda: ["/physical_device:GPU:0"])
    monkeypatch.setattr(device, "_describe_gpu", lambda gpus: ("GPU 0: NVIDIA H100", True))


def test_auto_is_the_cpu_without_a_gpu_device_and_imports_no_tensorflow(monkeypatch, no_gpu_files):
    class NoTensorFlow:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "tensorflow":
                raise ImportError("TensorFlow was imported")

    monkeypatch.delitem(sys.modules, "tensorflow", raising=False)
    monkeypatch.setattr(sys, "meta_path", [NoTensorFlow(), *sys.meta_path])
    chosen = device.select("auto")
    assert chosen.kind == "cpu" and chosen.onnx_providers == ("CPUExecutionProvider",)
    assert engines.resolve("auto") == ("onnx" if engines.available("onnx") else "keras")
    assert device.select("cpu").describe() == "device: CPU"


def test_gpu_without_one_says_why_and_how_to_install(no_gpu_files):
    with pytest.raises(device.DeviceError, match="no GPU device here") as err:
        device.select("gpu")
    assert "STACKER_GPU=1 pip install" in str(err.value) and "tensorflow-cpu onnxruntime" in str(err.value)
    no_gpu_files.touch()  # a card, but the CPU builds installed (this machine's packages)
    if device._is_installed("tensorflow-cpu") and not device._onnx_gpu_providers():
        with pytest.raises(device.DeviceError, match="CPU-only build .tensorflow-cpu.*no CUDA provider"):
            device.select("gpu")
        assert device.select("auto").kind == "cpu"


def test_a_gpu_gets_cuda_sessions_keras_on_gpu_and_mixed_precision(a_gpu):
    chosen = device.select("auto")
    assert chosen.kind == "gpu" and chosen.onnx_providers[0] == "CUDAExecutionProvider"
    assert chosen.tensorflow_gpu and chosen.mixed_precision
    assert "ONNX Runtime CUDA" in chosen.describe() and "mixed precision" in chosen.describe()
    assert device.select("gpu") == chosen
    assert engines.resolve("auto") == ("onnx" if engines.available("onnx") else "keras")
    assert device.select("cpu").kind == "cpu"
    assert device.use("auto").kind == "cpu", "auto keeps a device the process chose"


def test_tensorflow_alone_on_the_gpu_runs_the_keras_engine(a_gpu, monkeypatch):
    monkeypatch.setattr(device, "_onnx_gpu_providers", lambda: ())
    chosen = device.select("gpu")
    assert chosen.onnx_providers == ("CPUExecutionProvider",) and chosen.tensorflow_gpu
    assert engines.resolve("auto") == "keras"


def test_onnx_sessions_open_with_the_device_providers(monkeypatch):
    import onnxruntime as ort

    seen = {}

    class Session:
        def __init__(self, graph, sess_options=None, providers=None):
            seen["providers"] = providers

    monkeypatch.setattr(device, "_current", ["gpu", device.Device("gpu", "GPU 0", ("CUDAExecutionProvider",
                                                                             "CPUExecutionProvider"))])
    monkeypatch.setattr(ort, "InferenceSession", Session)
    monkeypatch.setattr("stacker.io.onnx_graph.check_graph", lambda *a, **k: None)
    engines.open_session(b"graph")
    assert seen["providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_ensemble_with_device_gpu_fails_before_any_work(tmp_path, no_gpu_files):
    from stacker.ensemble import Ensemble

    make_class_folders(tmp_path / "train", 3)
    before = forward_pass_count()
    with pytest.raises(device.DeviceError, match="STACKER_GPU=1"):
        Ensemble([TINY], cv=2, device="gpu", verbose=0).fit(str(tmp_path / "train"))
    assert forward_pass_count() == before
    with pytest.raises(ValueError, match="device must be one of"):
        Ensemble([TINY], device="tpu").fit(str(tmp_path / "train"))


def test_cli_device_gpu_on_a_cpu_machine_fails_before_any_work(tmp_path, no_gpu_files, capsys):
    """As a user runs it: one error line with the install command, exit 1, no forward pass, nothing written."""
    from stacker.app.cli import main

    make_class_folders(tmp_path / "train", 3)
    weights = save_tiny_weights(tmp_path / "tiny.weights.h5")
    before = forward_pass_count()
    code = main(["fit", str(tmp_path / "train"), "--backbones", "tiny_cnn", "--weights", weights, "--folds", "2",
                 "--device", "gpu", "--out", str(tmp_path / "model"), "--cache", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("stacker fit: error: --device gpu but no GPU is usable"), err
    assert "STACKER_GPU=1 pip install" in err and len(err.strip().splitlines()) == 1
    assert forward_pass_count() == before
    assert not (tmp_path / "model").exists() and not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_mixed_precision_fine_tuning_runs_on_a_cpu_too():
    """The GPU's float16 path, on this CPU: the top computes in float16, the optimizer scales the loss."""
    import keras

    from stacker.backbones import build, get_cfg
    from stacker.features.cutpoint import split_backbone
    from stacker.learners.finetune import FineTunedClassifier

    keras.utils.set_random_seed(0)
    bottom, top, _ = split_backbone(build("tiny_cnn", weights=None, input_size=32), 1,
                                    get_cfg("tiny_cnn").block_pattern)
    rng = np.random.default_rng(0)
    y = np.arange(24) % 2
    X = rng.normal(size=(24, int(np.prod(top.input_shape[1:])))).astype(np.float32) + 0.5 * y[:, None]
    proba = {}
    for mixed in (False, True):
        est = FineTunedClassifier("tiny_cnn", weights=None, blocks=1, head_epochs=2, epochs=2, random_state=0,
                                  mixed_precision=mixed).fit(X, y, top=top, bottom=bottom)
        proba[mixed] = est.predict_proba(X)
        policies = {layer.dtype_policy.name for m in est.model_.layers for layer in getattr(m, "layers", [m])}
        assert ("mixed_float16" in policies) == mixed, policies
        assert isinstance(est.model_.optimizer, keras.optimizers.LossScaleOptimizer) == mixed
    assert proba[True].dtype == proba[False].dtype and np.allclose(proba[True].sum(1), 1)
    np.testing.assert_allclose(proba[True], proba[False], atol=0.02)
