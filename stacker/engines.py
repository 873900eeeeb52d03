"""Inference engines for the CNN forward pass: Keras, XLA-compiled Keras, ONNX Runtime.

Almost all of stacker's time is forward passes, and on a CPU the engine matters more
than anything else: ONNX Runtime runs EfficientNet-Lite0 about 3x faster than
TensorFlow on this project's 2-core machine, with features equal to 2e-6 relative
(``benchmarks/extract.py --engines`` measures all three). ``"auto"`` (unless ``$STACKER_ENGINE`` names one) takes ONNX Runtime
when ``onnxruntime`` and ``tf2onnx`` are installed and the export succeeds, otherwise
(and whenever TensorFlow sees a GPU) plain Keras. The exported graph is cached next to the features, so it is converted once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings

import numpy as np

__all__ = ["ENGINES", "available", "forward_function", "resolve", "strategy_scope"]

ENGINES = ("auto", "keras", "xla", "onnx")
ENGINE_ENV = "STACKER_ENGINE"  # what "auto" means when set (e.g. keras on a machine without ONNX Runtime)


def available(engine: str) -> bool:
    """Whether ``engine`` can run here (``onnx`` needs onnxruntime and tf2onnx)."""
    if engine == "onnx":
        return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "tf2onnx"))
    return engine in ENGINES


def resolve(engine: str) -> str:
    """The concrete engine ``"auto"`` stands for on this machine."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "auto" and os.environ.get(ENGINE_ENV):
        return resolve(os.environ[ENGINE_ENV])
    if engine == "auto":
        import tensorflow as tf

        if tf.config.list_physical_devices("GPU"):
            return "keras"  # the onnxruntime wheel here is CPU-only; TensorFlow uses the GPU
        return "onnx" if available("onnx") else "keras"
    if not available(engine):
        raise ImportError(f"engine {engine!r} needs onnxruntime and tf2onnx: pip install onnxruntime tf2onnx")
    return engine


def strategy_scope(strategy):
    """``strategy.scope()``, or a no-op without a strategy."""
    import contextlib

    return strategy.scope() if strategy is not None else contextlib.nullcontext()


def forward_function(model, engine: str, cache_dir=None, identity: str = "", strategy=None):
    """A function ``pixels (n, h, w, 3) float32 -> outputs ndarray`` running ``model`` on ``engine``.

    Parameters
    ----------
    model : keras.Model
        Takes float32 pixels in [0, 255] (preprocessing inside).
    engine : {"keras", "xla", "onnx"}
    cache_dir : path, optional
        Where an ONNX export is kept for next time.
    identity : str
        What identifies the model's weights and code (part of the export's file name).
    strategy : tf.distribute.Strategy, optional
        Split every batch over the strategy's replicas (e.g. MirroredStrategy over GPUs);
        the model must have been built in its scope. Runs on Keras.
    """
    import tensorflow as tf

    if strategy is not None:
        return lambda pixels: np.asarray(model.predict_on_batch(np.asarray(pixels, dtype=np.float32)))

    spec = tf.TensorSpec([None, *model.input_shape[1:]], tf.float32, name="pixels")
    keras_fn = tf.function(lambda x: model(x, training=False), input_signature=[spec],
                           jit_compile=engine == "xla")
    if engine in ("keras", "xla"):
        return lambda pixels: keras_fn(tf.cast(pixels, tf.float32)).numpy()
    try:
        session = _onnx_session(model, keras_fn, spec, cache_dir, identity)
    except Exception as exc:  # noqa: BLE001 - an exporter gap must not stop extraction
        warnings.warn(f"ONNX export of {model.name} failed ({type(exc).__name__}: {exc}); using Keras")
        return lambda pixels: keras_fn(tf.cast(pixels, tf.float32)).numpy()
    name = session.get_inputs()[0].name
    return lambda pixels: session.run(None, {name: np.asarray(pixels, dtype=np.float32)})[0]


def _onnx_session(model, keras_fn, spec, cache_dir, identity: str):
    import onnxruntime as ort

    path = None
    if cache_dir is not None:
        key = hashlib.sha256(f"{model.name}|{model.input_shape}|{identity}".encode()).hexdigest()[:20]
        path = os.path.join(os.fspath(cache_dir), "onnx", f"{model.name}-{key}.onnx")
    if path is None or not os.path.exists(path):
        import tf2onnx

        proto, _ = tf2onnx.convert.from_function(keras_fn, input_signature=[spec], opset=17)
        data = proto.SerializeToString()
        if path is not None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)  # atomic: a killed export leaves no half file
    else:
        with open(path, "rb") as f:
            data = f.read()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])
