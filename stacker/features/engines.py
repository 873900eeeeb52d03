"""Inference engines for the CNN forward pass: Keras, XLA-compiled Keras, ONNX Runtime.

Almost all of stacker's time is forward passes, and on a CPU the engine matters more
than anything else: ONNX Runtime runs EfficientNet-Lite0 about 3x faster than
TensorFlow on this project's 2-core machine, with features equal to 2e-6 relative
(``benchmarks/extract.py --engines`` measures all three). ``"auto"`` (unless ``$STACKER_ENGINE`` names one) takes ONNX Runtime
when ``onnxruntime`` and ``tf2onnx`` are installed and the export succeeds, otherwise
plain Keras; on a GPU (:mod:`stacker.features.device`) ONNX Runtime when it has the CUDA
provider, else Keras (TensorFlow on the GPU). Sessions get the device's providers. The exported graph is cached next to the features, so it is converted once.

A saved ensemble carries the graphs its sources ran (:class:`SavedNetwork`): a new
process opens them with ONNX Runtime directly -- no export, no Keras model, and no
TensorFlow import on a machine without a GPU.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import os
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from stacker.features.layout import CacheLayout

__all__ = ["ENGINES", "OnnxForward", "SavedNetwork", "available", "export_onnx", "forward_function", "open_session",
           "resolve", "strategy_scope"]

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
        from stacker.features import device as _device

        gpu = _device.current()
        if gpu.kind == "gpu" and not gpu.onnx_gpu:
            return "keras"  # ONNX Runtime here is the CPU build; TensorFlow uses the GPU
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
        return OnnxForward(export_onnx(model, cache_dir, identity))
    except Exception as exc:  # noqa: BLE001 - an exporter gap must not stop extraction
        warnings.warn(f"ONNX export of {model.name} failed ({type(exc).__name__}: {exc}); using Keras")
        return lambda pixels: keras_fn(tf.cast(pixels, tf.float32)).numpy()


def export_onnx(model, cache_dir=None, identity: str = "") -> bytes:
    """``model`` as a serialized ONNX graph (opset 17, float32 pixels, any batch size).

    Exported with tf2onnx once per (model name, input shape, ``identity``) and kept in
    ``cache_dir/onnx`` (:meth:`stacker.features.layout.CacheLayout.onnx_file`); without a
    cache folder every call exports (10-15 s a backbone).
    """
    path = None
    if cache_dir is not None:
        path = CacheLayout(cache_dir).onnx_file(model.name, model.input_shape, identity)
        if os.path.exists(path):
            from stacker.io.onnx_graph import UnsafeGraphError, check_graph

            with open(path, "rb") as f:
                data = f.read()
            try:  # a cache folder may come from elsewhere too: a refused graph is exported again
                check_graph(data, path, model.input_shape[1:])
                return data
            except UnsafeGraphError as exc:
                warnings.warn(f"{exc} Exporting it again.")
    import tensorflow as tf
    import tf2onnx

    spec = tf.TensorSpec([None, *model.input_shape[1:]], tf.float32, name="pixels")
    traced = tf.function(lambda x: model(x, training=False), input_signature=[spec])
    proto, _ = tf2onnx.convert.from_function(traced, input_signature=[spec], opset=17)
    data = proto.SerializeToString()
    del traced, proto
    # the conversion leaves its graphs in reference cycles: 0.9 GB for Lite0, 1.3 GB for Lite2,
    # resident until the collector happens to run (often during the extraction that follows)
    gc.collect()
    if path is not None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # atomic: a killed export leaves no half file
    return data


def open_session(graph: bytes, threads: int = 0, name: str = "(graph bytes)", input_shape=None):
    """An ONNX Runtime session on this process's device (CUDA on a GPU, else the CPU) for a serialized graph (errors logged only).

    The graph is passed as bytes, never as a path, and no custom-op library is registered.
    Bytes alone do not keep ONNX Runtime from reading a tensor's external data relative to
    the working directory, nor from allocating whatever shape a graph declares, so every
    graph is first checked by :func:`stacker.io.onnx_graph.check_graph` (self-contained,
    default ONNX operators only, bounded shapes; ``name`` and ``input_shape`` as there;
    a graph already checked costs a hash). Idle intra-op threads sleep instead of spinning: an ensemble runs several
    sessions one after another, next to Pillow threads, and a spinning pool steals the
    cores they need (one image through four backbones took 90 ms instead of 31 ms on
    this project's 2-core machine; batches of 32 run as fast either way). ``threads``:
    intra-op threads, 0 for ONNX Runtime's default (one per core).

    Every session draws activations from one arena for the process (:func:`_shared_arena`).
    """
    import onnxruntime as ort

    from stacker.io.onnx_graph import check_graph

    check_graph(graph, name, input_shape)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = int(threads)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if _shared_arena():
        options.add_session_config_entry("session.use_env_allocators", "1")
    from stacker.features.device import current

    return ort.InferenceSession(graph, sess_options=options, providers=list(current().onnx_providers))


_ARENA: list = []  # [True] once the process's arena is registered, [False] where it cannot be
_ARENA_LOCK = threading.Lock()


def _shared_arena() -> bool:
    """Register one CPU arena for all of this process's sessions (once); False where ONNX Runtime refuses.

    A session's own arena keeps the peak of its largest batch for the session's life:
    about 330 MB for Lite0 at batch 32, and an ensemble holds a session per backbone and
    view, plus two for bulk extraction. Shared, they hold what runs at once: measured here,
    three Lite2 sessions next to Lite0's added 80 MB instead of 1.35 GB, at the same speed.
    """
    with _ARENA_LOCK:
        if not _ARENA:
            import onnxruntime as ort

            try:
                info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
                ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
                _ARENA.append(True)
            except Exception:  # noqa: BLE001 - an older ONNX Runtime: each session keeps its own arena
                _ARENA.append(False)
        return _ARENA[0]


def session_forward(session):
    """``pixels -> outputs`` of an open session (its first input, first output)."""
    name = session.get_inputs()[0].name
    return lambda pixels: session.run(None, {name: np.asarray(pixels, dtype=np.float32)})[0]


def _cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class OnnxForward:
    """``pixels -> outputs`` of an ONNX graph, plus :meth:`map` for many batches.

    A call runs one batch on a session with a thread per core: the fastest way through a
    single image. :meth:`map` is extraction's bulk path: two sessions with half the cores
    each take batches in turn, so one computes while the other waits for its next batch.
    One session's threads meet at a barrier after every operator, and a Pillow decode
    thread that preempts one of them stalls them all; two sessions share no barrier. On
    this project's 2-core machine Lite0 extraction (decode included) went from 145-151 to
    150-157 img/s, with features bit-identical (``benchmarks/extract.py``). The two
    sessions open on the first :meth:`map` and stay open (two more copies of the weights;
    activations come from the process's one arena).

    Parameters
    ----------
    graph : bytes or callable
        The serialized graph, or a function returning it (read again when the bulk
        sessions open, as :class:`SavedNetwork` does to check its bytes).
    session : onnxruntime.InferenceSession or Future, optional
        The single-batch session when it is already open or opening; opened here otherwise.
    """

    lanes = 2
    shrink_after = 32  # batches

    def __init__(self, graph, session=None):
        self._graph = graph
        self._session = session if session is not None else open_session(self.graph())
        self._bulk = None
        self._lock = threading.Lock()

    def graph(self) -> bytes:
        return self._graph() if callable(self._graph) else self._graph

    def __call__(self, pixels) -> np.ndarray:
        session = self._session.result() if isinstance(self._session, Future) else self._session
        return _run_session(session, pixels)

    def _bulk_sessions(self) -> list:
        with self._lock:
            if self._bulk is None:
                graph = self.graph()
                threads = max(1, _cores() // self.lanes)
                self._bulk = list(_opener().map(lambda _: open_session(graph, threads), range(self.lanes)))
            return self._bulk

    def map(self, batches, count: int | None = None):
        """``(tag, pixels)`` -> ``(tag, outputs)`` for each batch, in order, two batches in flight.

        ``count``, the number of batches: when there are at least :attr:`shrink_after`,
        each session's last batch hands the arena's memory back to the system (the
        activations of two batches, about 700 MB for Lite0 at batch 32) rather than keep
        it for the next call; growing it again costs about 8% of a 256-image call and
        under 2% of one this long.
        """
        from collections import deque

        sessions = self._bulk_sessions()
        last = set(range(count - len(sessions), count)) if count and count >= self.shrink_after else set()
        with ThreadPoolExecutor(max_workers=len(sessions), thread_name_prefix="stacker-onnx-run") as pool:
            pending = deque()
            for i, (tag, pixels) in enumerate(batches):
                run = _shrink_arena() if i in last else None
                pending.append((tag, pool.submit(_run_session, sessions[i % len(sessions)], pixels, run)))
                if len(pending) == len(sessions):  # the oldest batch's session is the next one's
                    tag_, future = pending.popleft()
                    yield tag_, future.result()
            while pending:
                tag_, future = pending.popleft()
                yield tag_, future.result()


def _shrink_arena():
    """Run options that free the arena's unused memory when the run ends."""
    import onnxruntime as ort

    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


def _run_session(session, pixels, options=None) -> np.ndarray:
    """The first output of ``session`` for ``pixels`` (its first input); ONNX Runtime releases the GIL."""
    return session.run(None, {session.get_inputs()[0].name: np.asarray(pixels, dtype=np.float32)}, options)[0]


# -- graphs saved with an ensemble ------------------------------------------------------------
_OPENER: ThreadPoolExecutor | None = None
_OPENER_LOCK = threading.Lock()


def _opener() -> ThreadPoolExecutor:
    """Threads that open saved graphs in the background (ONNX Runtime releases the GIL meanwhile)."""
    global _OPENER
    with _OPENER_LOCK:
        if _OPENER is None:
            _OPENER = ThreadPoolExecutor(max_workers=4, thread_name_prefix="stacker-onnx-open")
        return _OPENER


class SavedNetwork:
    """A source network as a model directory stores it: a ``.keras`` archive and, optionally, its ONNX graph.

    Nothing is read when it is made. :meth:`keras` loads the checked archive on first use
    (for the Keras engines, fine-tuning or saving again). :meth:`forward` starts opening the
    ONNX Runtime session in a background thread and returns a forward function that waits
    for it, so the sessions of an ensemble open in parallel while the rest of it loads.
    The graph's bytes are compared with ``onnx_sha256`` (the manifest's) and checked by
    :func:`stacker.io.onnx_graph.check_graph` before ONNX Runtime sees them, and the very
    bytes checked are the ones opened.

    Parameters
    ----------
    keras_path : str
    onnx_path : str, optional
    onnx_sha256 : str, optional
        Required with ``onnx_path``.
    custom_objects : callable, optional
        Returns the registered layers the archive may use (such as
        :func:`stacker.backbones.registry.custom_objects`); called only when the archive is loaded,
        because building them imports Keras.
    input_shape : tuple, optional
        ``(height, width, 3)`` the graph's input must declare (the learner spec's input size).
    """

    def __init__(self, keras_path: str, onnx_path: str | None = None, onnx_sha256: str | None = None,
                 custom_objects=None, input_shape=None):
        if onnx_path is not None and not onnx_sha256:
            raise ValueError(f"{onnx_path}: a saved graph is opened only against its manifest sha256")
        self.keras_path, self.onnx_path, self.onnx_sha256 = keras_path, onnx_path, onnx_sha256
        self.custom_objects = custom_objects
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self._model = None
        self._session = None
        self._lock = threading.Lock()

    def keras(self):
        """The Keras network (loaded once, from the checked archive)."""
        with self._lock:
            if self._model is None:
                from stacker.io.persist import load_keras

                self._model = load_keras(self.keras_path, self.custom_objects() if self.custom_objects else None)
            return self._model

    def graph(self) -> bytes:
        """The ONNX graph's bytes, refused unless they match the manifest's sha256 and pass
        :func:`~stacker.io.onnx_graph.check_graph` (at most ``$STACKER_MAX_ONNX_BYTES`` are read)."""
        from stacker.io.onnx_graph import MAX_GRAPH_BYTES_ENV, UnsafeGraphError, check_graph, max_graph_bytes
        from stacker.io.persist import ModelIntegrityError

        with open(self.onnx_path, "rb") as f:
            data = f.read(max_graph_bytes() + 1)
        if len(data) > max_graph_bytes():
            raise UnsafeGraphError(self.onnx_path, f"over {max_graph_bytes()} bytes (${MAX_GRAPH_BYTES_ENV})")
        if hashlib.sha256(data).hexdigest() != self.onnx_sha256:
            raise ModelIntegrityError(f"{self.onnx_path} does not match its sha256 in the manifest "
                                      "(modified or corrupted); refusing to open it")
        check_graph(data, self.onnx_path, self.input_shape)
        return data

    def forward(self, engine: str):
        """A forward function on the saved graph for ``engine="onnx"``; None when the engine needs Keras."""
        if engine != "onnx" or self.onnx_path is None:
            return None
        with self._lock:
            if self._session is None:
                self._session = _opener().submit(
                    lambda: open_session(self.graph(), name=self.onnx_path, input_shape=self.input_shape))
        return OnnxForward(self.graph, self._session)
