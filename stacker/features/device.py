"""Where forward passes and Keras training run: the CPU or a GPU, chosen once per process.

``device="auto"`` (the default) takes a GPU when one works here -- TensorFlow built with
CUDA sees one, or ONNX Runtime has its CUDA provider and a GPU device is present -- and
the log says which. ``"cpu"`` keeps TensorFlow and ONNX Runtime off every GPU.
``"gpu"`` requires one: where none works it fails before any work, saying why (no GPU
device, a CPU-only build) and how to install the GPU builds (:data:`GPU_INSTALL`).

On a GPU, ONNX Runtime sessions get the CUDA provider (CPU as the fallback for operators
it lacks), TensorFlow allocates GPU memory as it goes (so both engines fit on one card),
and fine-tuning computes in float16 with float32 weights where the card has tensor cores
(compute capability 7.0 or more): :attr:`Device.mixed_precision`.

The choice is per process, as TensorFlow's device placement and ONNX Runtime's providers
are: :func:`select` sets it (the command line's ``--device``), :func:`use` too, except
that ``"auto"`` keeps a choice already made (an :class:`~stacker.Ensemble` at ``fit`` and
``predict``), and :func:`current` reads it (selecting ``"auto"`` the first time). On Linux
without an NVIDIA, ROCm or WSL device file the answer needs no TensorFlow import.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
import threading
from dataclasses import dataclass

__all__ = ["DEVICES", "GPU_INSTALL", "Device", "DeviceError", "current", "select", "use"]

DEVICES = ("auto", "cpu", "gpu")
# The GPU builds in place of the CPU wheels (STACKER_GPU=1: setup.py requires tensorflow[and-cuda] and
# onnxruntime-gpu instead of tensorflow-cpu and onnxruntime); the README's "GPUs" section.
GPU_INSTALL = ('pip uninstall -y tensorflow-cpu onnxruntime && STACKER_GPU=1 pip install -e ".[lite]" '
               "(Linux x86-64 with an NVIDIA driver; see the README's GPU section)")
# Device files without which no GPU is visible on Linux (NVIDIA, ROCm, WSL2).
GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")
_CUDA = "CUDAExecutionProvider"


class DeviceError(RuntimeError):
    """``device="gpu"`` where no GPU works; the message says why and how to install the GPU builds."""


@dataclass(frozen=True)
class Device:
    """The device of this process's work.

    Attributes
    ----------
    kind : {"cpu", "gpu"}
    name : str
        What it is, for the log (``"CPU"``, ``"GPU 0: NVIDIA H100 80GB HBM3"``).
    onnx_providers : tuple of str
        ONNX Runtime's execution providers, in order of preference.
    tensorflow_gpu : bool
        Whether TensorFlow places its work (Keras engine, heads, fine-tuning) on the GPU.
    mixed_precision : bool
        Whether fine-tuning computes in float16 (a GPU with tensor cores).
    """

    kind: str
    name: str
    onnx_providers: tuple = ("CPUExecutionProvider",)
    tensorflow_gpu: bool = False
    mixed_precision: bool = False

    @property
    def onnx_gpu(self) -> bool:
        return _CUDA in self.onnx_providers

    def describe(self) -> str:
        """``device: GPU 0: NVIDIA ... (forward passes: ONNX Runtime CUDA; Keras: GPU, mixed precision)``."""
        if self.kind == "cpu":
            return "device: CPU"
        engines = [f"forward passes: {'ONNX Runtime CUDA' if self.onnx_gpu else 'TensorFlow'}",
                   f"Keras: {'GPU' if self.tensorflow_gpu else 'CPU'}"]
        if self.mixed_precision:
            engines.append("fine-tuning in mixed precision")
        return f"device: {self.name} ({'; '.join(engines)})"


CPU = Device("cpu", "CPU")
_current: list = []  # [choice, Device] once selected
_lock = threading.Lock()


def check_choice(device) -> None:
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")


def select(device: str = "auto") -> Device:
    """Choose and set up this process's device (see the module); raises :class:`DeviceError` for an unusable GPU."""
    check_choice(device)
    with _lock:
        if _current and _current[0] == device:
            return _current[1]  # each prediction selects: the answer is kept, not probed again
        chosen = _cpu() if device == "cpu" else _gpu(required=device == "gpu")
        _current[:] = [device, chosen]
        return chosen


def use(device: str = "auto") -> Device:
    """:func:`select`, except that ``"auto"`` keeps a device this process has already chosen (e.g. ``--device cpu``)."""
    check_choice(device)
    if device == "auto" and _current:
        return _current[1]
    return select(device)


def current() -> Device:
    """The selected device (``"auto"`` selected now if nothing was)."""
    if not _current:
        return select("auto")
    return _current[1]


def _device_files() -> bool:
    return not sys.platform.startswith("linux") or any(os.path.exists(p) for p in GPU_DEVICE_FILES)


def _cpu() -> Device:
    """TensorFlow kept off GPUs (before it starts, or by hiding them from an initialised one)."""
    if "tensorflow" not in sys.modules:
        if _device_files():
            os.environ["CUDA_VISIBLE_DEVICES"] = "-1"  # read by TensorFlow and ONNX Runtime when they start
    else:
        import tensorflow as tf

        try:
            tf.config.set_visible_devices([], "GPU")
        except RuntimeError:  # GPUs already initialised in this process: keep placement explicit instead
            pass
    return CPU


def _gpu(required: bool) -> Device:
    """The GPU device where one works; else CPU (``auto``) or :class:`DeviceError` (``gpu``)."""
    if not _device_files():
        return _refuse("no GPU device here (none of " + ", ".join(GPU_DEVICE_FILES) + " exists)") if required else CPU
    providers = _onnx_gpu_providers()
    tf_gpus = _tensorflow_gpus()
    if not tf_gpus and not providers:
        return _refuse(_why_no_gpu()) if required else CPU
    name, mixed = _describe_gpu(tf_gpus)
    return Device("gpu", name, providers or CPU.onnx_providers, tensorflow_gpu=bool(tf_gpus), mixed_precision=mixed)


def _onnx_gpu_providers() -> tuple:
    """``("CUDAExecutionProvider", "CPUExecutionProvider")`` where ONNX Runtime can use CUDA, else ``()``."""
    if importlib.util.find_spec("onnxruntime") is None:
        return ()
    import onnxruntime as ort

    if _CUDA not in ort.get_available_providers():
        return ()
    preload = getattr(ort, "preload_dlls", None)  # CUDA and cuDNN from the nvidia-* wheels (ONNX Runtime >= 1.21)
    if preload is not None:
        try:
            preload()
        except Exception:  # noqa: BLE001 - system CUDA libraries may still be found
            pass
    return (_CUDA, "CPUExecutionProvider")


def _tensorflow_gpus() -> list:
    """TensorFlow's GPUs, each set to allocate memory as needed (so ONNX Runtime's sessions fit beside it)."""
    if _is_installed("tensorflow-cpu") and not _is_installed("tensorflow"):
        return []  # the CPU-only build: no GPU kernels (and no TensorFlow import to find out)
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except (RuntimeError, ValueError):  # already initialised: its allocation mode stays as it is
            pass
    return gpus


def _describe_gpu(tf_gpus) -> tuple[str, bool]:
    """``(name, tensor cores?)`` of the first GPU TensorFlow sees (ONNX Runtime alone: a generic name)."""
    if not tf_gpus:
        return "GPU (ONNX Runtime CUDA)", False
    import tensorflow as tf

    details = tf.config.experimental.get_device_details(tf_gpus[0])
    capability = details.get("compute_capability") or (0, 0)
    return f"GPU 0: {details.get('device_name', tf_gpus[0].name)}", tuple(capability) >= (7, 0)


def _is_installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _why_no_gpu() -> str:
    """What keeps both engines off the GPU here: the builds installed."""
    reasons = []
    if _is_installed("tensorflow-cpu"):
        reasons.append(f"TensorFlow is the CPU-only build (tensorflow-cpu {importlib.metadata.version('tensorflow-cpu')})")
    else:
        reasons.append("TensorFlow sees no GPU (is the NVIDIA driver loaded? `nvidia-smi` should list the card)")
    if importlib.util.find_spec("onnxruntime") is None:
        reasons.append("ONNX Runtime is not installed")
    else:
        import onnxruntime as ort

        reasons.append(f"ONNX Runtime {ort.__version__} has no CUDA provider (providers: "
                       f"{', '.join(ort.get_available_providers())})")
    return "; ".join(reasons)


def _refuse(why: str):
    raise DeviceError(f"device='gpu' but no GPU is usable: {why}. To use an NVIDIA GPU, install the GPU builds of "
                      f"TensorFlow and ONNX Runtime: {GPU_INSTALL}; or pass device='auto' to use a GPU only where "
                      "one works")
