"""Pooled CNN features of images, computed once and cached.

:class:`FeatureExtractor` is the only place where a CNN forward pass over images
happens. It asks the HDF5 cache first, decodes and runs only the images it lacks,
and appends their features chunk by chunk, so a second run does no forward pass and
a killed run resumes from its last complete chunk. The cache key is derived from the
backbone config, the sha256 of the weights, the input size, the preprocessing and the
source code of the pixel pipeline and model builders; inside, an image is found by the
digest of its bytes (:mod:`stacker.data.fingerprint`), wherever the file now lives.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from stacker.backbones import registry as _backbones
from stacker.features import config as _config
from stacker.features import engines as _engines
from stacker.data import fingerprint as _fingerprint
from stacker.data import decode as _decode
from stacker.data import scan as _scan
from stacker.data import sources as _sources
from stacker.features.cache import FeatureCache
from stacker.features.layout import onnx_identity
from stacker.backbones.torch_checkpoint import sha256_file

__all__ = ["FeatureExtractor", "Features", "forward_pass_count"]

_FORWARD_IMAGES = 0  # images passed through any backbone in this process (tests assert on it)


def forward_pass_count() -> int:
    """Images that went through a CNN forward pass in this process so far."""
    return _FORWARD_IMAGES


@functools.lru_cache(maxsize=None)
def code_fingerprint() -> str:
    """Hash of the code that decides feature values; changing it invalidates cached features.

    It covers the pixel pipeline, the preprocessing layer, the model builders and the
    forward call -- not docstrings elsewhere -- so unrelated edits keep caches valid.
    The decoding modules count whole (the format table and every decode helper, listed
    or not: a new one cannot leave stale features behind); the rest are single functions.
    """
    import inspect

    from stacker.backbones import efficientnet_lite
    from stacker.data import formats as _formats

    parts = [_decode, _formats,
             _backbones._preprocessing_layer_class, _backbones.build, FeatureExtractor._run,
             FeatureExtractor._run_batches, efficientnet_lite,
             _engines.forward_function, _engines.export_onnx, _engines.open_session,
             _engines._run_session, FeatureExtractor._network_input, FeatureExtractor._network_output]
    h = hashlib.sha256()
    for obj in parts:
        h.update(inspect.getsource(obj).encode())
    return h.hexdigest()


def _bar_mode() -> int:
    """1: a live Keras bar (a terminal, a notebook); 2: periodic plain lines for a log file (:mod:`.progress`)."""
    import sys

    live = getattr(sys.stdout, "isatty", lambda: False)() or "ipykernel" in sys.modules
    return 1 if live else 2


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def tf_float32(pixels):
    import tensorflow as tf

    return tf.cast(pixels, tf.float32)


class BadImageError(_sources.BadImageError):
    """Unusable image files under ``on_bad_image="raise"``; ``skipped`` maps row -> reason for all of them."""

    def __init__(self, message: str, paths: dict):
        super().__init__(message)
        self.paths = paths


def _raise_bad(images, skipped: dict):
    row, reason = next(iter(sorted(skipped.items())))
    more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
    raise BadImageError(f"{images.paths[row]}: {reason}{more}; pass on_bad_image='skip' to leave such files out",
                        {images.paths[r]: why for r, why in sorted(skipped.items())})


@dataclass
class Features:
    """Features of an image set: ``values[i]`` belongs to ``kept[i]``; ``skipped`` maps row -> reason."""

    values: np.ndarray
    kept: np.ndarray
    skipped: dict = field(default_factory=dict)


class FeatureExtractor:
    """Pooled features of one backbone, through the cache.

    Parameters
    ----------
    backbone : str
        A registered backbone name.
    weights : {"imagenet", None} or path
        As for :func:`stacker.backbones.build`.
    input_size : int, optional
        Square input resolution (default: the backbone's).
    batch_size : int
        Images per forward pass.
    feature_dtype : {"float32", "float16"}
        Storage type in the cache; float16 halves disk and memory.
    cache_dir : path, optional
        Cache folder; without one, features live only in memory.
    weights_dir : path, optional
        Folder of offline weight files.
    chunk_size : int
        Rows written to the cache at a time (the unit of resume).
    on_bad_image : {"raise", "skip"}
        What to do with a file that is not a usable image.
    verbose : int
        0 silent, 1 progress bar.
    resize : {"pil", "bilinear", "bicubic"}
        How images are decoded and resized: Pillow (the pixels of a Pillow script), or
        TensorFlow's antialiased bilinear/bicubic.
    model : keras.Model, optional
        A ready model (e.g. loaded from a saved ensemble) with ``weights_id``.
    weights_id : str, optional
        Identity of ``model``'s weights for the cache key.
    engine : {"auto", "keras", "xla", "onnx"}
        What runs the forward pass (:mod:`stacker.features.engines`); ``"auto"`` is ONNX Runtime
        when installed (about 3x faster on a CPU), else Keras. Part of the cache key.
    strategy : tf.distribute.Strategy, optional
        Build the backbone in its scope and split every batch over its replicas
        (MirroredStrategy for several GPUs); implies the Keras engine.
    saved : stacker.features.engines.SavedNetwork, optional
        The network as a saved ensemble stores it (with ``weights_id``): its ONNX graph
        runs as is on the ONNX engine, its ``.keras`` archive is loaded only if needed.
    options : dict, optional
        Values of registered extraction options (:mod:`stacker.features.config`): their
        pixel transforms apply before the network and they are part of the cache key.
    """

    def __init__(self, backbone, weights="imagenet", input_size=None, batch_size=32, feature_dtype="float32",
                 cache_dir=None, weights_dir=None, chunk_size=256, on_bad_image="raise", verbose=1,
                 model=None, weights_id=None, resize="pil", engine="auto", strategy=None, saved=None, options=None):
        _config.check_option("on_bad_image", on_bad_image)
        _config.check_option("resize", resize)
        if np.dtype(feature_dtype) not in (np.float16, np.float32):  # a dtype object too (cut-point rows)
            raise ValueError(f"feature_dtype must be float16 or float32, got {feature_dtype!r}")
        self.resize = resize
        self.strategy = strategy
        self.engine = "keras" if strategy is not None else _engines.resolve(engine)
        self.backbone = backbone
        self.weights = weights
        self.input_size = input_size
        self.batch_size = int(batch_size)
        self.feature_dtype = np.dtype(feature_dtype).name
        self.cache_dir = cache_dir
        self.weights_dir = weights_dir
        self.chunk_size = int(chunk_size)
        self.on_bad_image = on_bad_image
        self.verbose = verbose
        self.options = dict(options or {})  # registered extraction options (stacker.features.config)
        self.cfg = _backbones.get_cfg(backbone)
        self.size = int(input_size or self.cfg.input_size)
        self._model = model
        self._weights_id = weights_id
        self._lock = threading.RLock()  # concurrent predictions build the network and its session once
        self._saved = saved
        self._forward = saved.forward(self.engine) if saved is not None else None

    def __getstate__(self):
        """Picklable for other processes (Ray tasks): without the lock and the compiled forward function."""
        state = dict(self.__dict__)
        state.pop("_lock", None)
        state["_forward"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.RLock()

    # -- identity ---------------------------------------------------------------------
    @property
    def weights_id(self) -> str:
        """sha256 of the weight file, or of the weight values when there is no file."""
        if self._weights_id is None:
            source = _backbones.resolve_weights(self.cfg, self.weights, self.weights_dir)
            if source is not None and os.path.isfile(source):
                st = os.stat(source)
                self._weights_id = "file:" + _file_sha256(os.path.abspath(source), st.st_size, st.st_mtime_ns)
            else:
                self._weights_id = "values:" + _backbones.weights_fingerprint(self.model)
        return self._weights_id

    def key_meta(self) -> dict:
        return {
            "backbone": self.cfg.name,
            # block_pattern only matters for fine-tuning, not for feature values
            "cfg": {k: v for k, v in self.cfg.to_dict().items() if k != "block_pattern"},
            "input_size": self.size,
            "preprocessing": self.cfg.preprocessing,
            "weights": self.weights_id,
            "pipeline": f"decode-rgb|exif|{self.resize}-antialias|float32",
            "engine": self.engine,
            "code": code_fingerprint(),
            "image_key": _fingerprint.HASH,  # rows keyed on file content (path-keyed caches are not read)
            **({"options": _config.key_parts(self.options)} if self.options else {}),
        }

    @property
    def model(self):
        if self._model is None and self._saved is not None:
            self._model = self._saved.keras()
        if self._model is None:
            with self._lock, _engines.strategy_scope(self.strategy):
                if self._model is None:
                    self._model = _backbones.build(self.cfg.name, weights=self.weights, input_size=self.size,
                                                   weights_dir=self.weights_dir, cache_dir=self.cache_dir)
        return self._model

    def onnx_graph(self) -> bytes:
        """The ONNX graph this extractor runs on the ONNX engine: the saved one, else its model's cached export."""
        if self._saved is not None and self._saved.onnx_path is not None:
            return self._saved.graph()
        return _engines.export_onnx(self.model, self.cache_dir,
                                    identity=onnx_identity(self.weights_id, code_fingerprint()))

    @property
    def label(self) -> str:
        """The name progress lines give this extractor."""
        return self.cfg.name

    def row_dim(self) -> int:
        """Width of one cached row."""
        return self.cfg.feature_dim

    def with_view(self, view: str) -> "FeatureExtractor":
        """This backbone's features of a view of each image (its mirror...: :mod:`stacker.features.views`).

        ``"original"`` is this extractor; any other view shares its network and is cached apart.
        """
        if view == "original":
            return self
        from stacker.features.views import ViewExtractor

        return ViewExtractor(self, view)

    @property
    def feature_dim(self) -> int:
        return int(self.model.output_shape[-1]) if self._model is not None else self.cfg.feature_dim

    def _network(self):
        """The forward function (built on first use, once)."""
        if self._forward is None:
            with self._lock:
                if self._forward is None:
                    self._forward = _engines.forward_function(
                        self.model, self.engine, self.cache_dir,
                        identity=onnx_identity(self.weights_id, code_fingerprint()), strategy=self.strategy)
        return self._forward

    def _network_input(self, pixels):
        """What the network is fed for decoded ``pixels``: registered options' transforms (subclasses add theirs)."""
        return _config.apply_pixels(np.asarray(pixels, np.float32), self.options) if self.options else pixels

    def _network_output(self, out) -> np.ndarray:
        """A cached row per image from the network's output (subclasses reshape it)."""
        return out

    def _run(self, pixels) -> np.ndarray:
        global _FORWARD_IMAGES
        out = self._network_output(self._network()(self._network_input(pixels)))
        _FORWARD_IMAGES += int(out.shape[0])
        return out

    def _run_batches(self, batches, count: int | None = None):
        """``(tag, pixels)`` -> ``(tag, rows)`` for each batch (``count`` of them), in order: extraction's bulk path.

        On ONNX Runtime two batches run at once (:meth:`stacker.features.engines.OnnxForward.map`);
        other engines take one batch at a time through :meth:`_run`.
        """
        global _FORWARD_IMAGES
        bulk = getattr(self._network(), "map", None)
        if bulk is None:
            yield from ((tag, self._run(pixels)) for tag, pixels in batches)
            return
        for tag, out in bulk(((tag, self._network_input(pixels)) for tag, pixels in batches), count):
            out = self._network_output(out)
            _FORWARD_IMAGES += int(out.shape[0])
            yield tag, out

    # -- features ---------------------------------------------------------------------
    def extract(self, images, on_bad_image=None, batch_size=None, lazy: bool = False) -> Features:
        """Features for every usable image of ``images`` (an ImageSet or a list of paths).

        Images are found in the cache by the digest of their bytes, so moved, renamed or
        copied files are not computed again. ``on_bad_image`` and ``batch_size`` override
        the extractor's own for this call only (nothing shared is changed). ``lazy``: the
        values are a :class:`stacker.features.rows.CachedRows` view of the cache file, not an
        array (out-of-core learning; needs a ``cache_dir``).
        """
        if lazy and self.cache_dir is None:
            raise ValueError("out-of-core features are read from the cache: give a cache_dir")
        policy = self.on_bad_image if on_bad_image is None else on_bad_image
        _config.check_option("on_bad_image", policy)
        images = images if isinstance(images, _sources.ImageSet) else _sources.ImageSet(list(images), list(images))
        n = len(images)
        fps, skipped = _fingerprint.fingerprints(images.paths, self.cache_dir) if n else ([], {})
        usable = np.array([i for i in range(n) if i not in skipped], dtype=np.int64)
        entry = None
        if self.cache_dir is not None:
            entry = FeatureCache(self.cache_dir).entry(self.key_meta(), self.row_dim(), self.feature_dtype)
            found = entry.lookup([fps[i] for i in usable])
        else:
            found = np.full(usable.size, -1, dtype=np.int64)
        missing = usable[found < 0]
        first = {}  # one forward pass per distinct content, even when two paths hold the same bytes
        for i in missing:
            first.setdefault(fps[i], int(i))
        computed: dict = {}
        if first:
            todo = np.array(sorted(first.values()), dtype=np.int64)
            if policy == "raise" and skipped:  # failing anyway: only the cheap header scan, to list every file
                bad = {int(todo[i]): r for i, r in _scan.scan_images([images.paths[i] for i in todo])[1].items()}
            else:
                computed, bad = self._compute(images, todo, fps, entry, int(batch_size or self.batch_size), policy)
            bad_fps = {fps[r]: reason for r, reason in bad.items()}
            skipped.update({int(i): bad_fps[fps[i]] for i in missing if fps[i] in bad_fps})
            computed = {int(i): computed[first[fps[i]]] for i in missing if first[fps[i]] in computed}
        if skipped and policy == "raise":
            _raise_bad(images, skipped)
        kept = np.array([i for i in range(n) if i not in skipped], dtype=np.int64)
        if entry is not None and lazy:
            from stacker.features.rows import CachedRows

            values = CachedRows(entry.path, entry.lookup([fps[i] for i in kept]), entry.dim, entry.dtype)
        elif entry is not None:
            values = entry.read(entry.lookup([fps[i] for i in kept]))
        else:
            values = np.stack([computed[i] for i in kept]).astype(self.feature_dtype) if kept.size else \
                np.zeros((0, self.row_dim()), self.feature_dtype)
        return Features(values, kept, dict(sorted(skipped.items())))

    def seconds_per_image(self) -> float | None:
        """Measured decode + forward time per image, from when the cached features were computed."""
        if self.cache_dir is None:
            return None
        return FeatureCache(self.cache_dir).entry(self.key_meta(), self.row_dim(), self.feature_dtype).timing()

    def transform(self, images) -> np.ndarray:
        """Feature matrix ``(n, feature_dim)``; raises if any image is unusable."""
        feats = self.extract(images)
        if feats.skipped:
            raise _sources.BadImageError(f"{len(feats.skipped)} images could not be used")
        return feats.values

    def transform_arrays(self, arrays, batch_size=None, converted: bool = False) -> np.ndarray:
        """Features of in-memory images (NumPy arrays or PIL images); not cached."""
        out = [self._run(batch) for batch in _decode.array_batches(arrays, self.size, int(batch_size or self.batch_size),
                                                                   self.resize, converted)]
        return np.concatenate(out).astype(self.feature_dtype) if out else np.zeros((0, self.row_dim()))

    def _batches(self, paths, todo, batch_size: int, policy: str):
        """``(batches or None, their count, rows to compute, {row: reason})`` after the header scan.

        None: nothing to compute (every file refused, or one refused under ``"raise"``).
        Pillow needs no orientation from the scan, so its first batches decode while the
        headers are read; its batches are then todo's rows less those the scan refused.
        """
        early = (_decode.Primed(_decode.pil_batches(paths, self.size, batch_size, rows=todo))
                 if self.resize == "pil" else None)
        try:
            orientations, bad = _scan.scan_images(paths)
        except BaseException:
            if early is not None:
                early.close()
            raise
        skipped = {int(todo[i]): reason for i, reason in bad.items()}
        good = np.array([r for r in todo if int(r) not in skipped], dtype=np.int64)
        if (skipped and policy == "raise") or good.size == 0:
            if early is not None:
                early.close()
            return None, 0, good, skipped
        if early is not None:
            count = sum(any(int(r) not in skipped for r in todo[i:i + batch_size])
                        for i in range(0, todo.size, batch_size))
            return (_without_rows(early, skipped) if skipped else early), count, good, skipped
        orient = np.array([orientations[i] for i, r in enumerate(todo) if int(r) not in skipped], dtype=np.int32)
        ds = _decode.pixel_batches([paths[i] for i, r in enumerate(todo) if int(r) not in skipped], self.size,
                                   batch_size, orient, rows=good, method=self.resize)
        return ds, -(-good.size // batch_size), good, skipped

    def _compute(self, images, todo, fps, entry, batch_size: int, policy: str = "skip"):
        """Forward passes for rows ``todo``; ``(features by row, {row: reason})``.

        Headers are scanned first: under ``"raise"`` every file found unusable by then
        is reported at once, before any forward pass.
        """
        ds, count, good, skipped = self._batches([images.paths[i] for i in todo], todo, batch_size, policy)
        computed: dict = {}
        if ds is None:
            return computed, skipped
        bar = None
        if self.verbose:
            import keras

            from stacker.features.progress import LogProgress

            print(f"{self.label}: extracting features of {good.size} images at {self.size}px", flush=True)
            bar = (keras.utils.Progbar(good.size, unit_name="image") if _bar_mode() == 1
                   else LogProgress(good.size, self.label))
        pending_rows, pending_feats = [], []
        seen = set()
        clock = [time.perf_counter()]

        def flush():
            if not pending_rows:
                return
            rows = np.concatenate(pending_rows)
            feats = np.concatenate(pending_feats)
            if entry is not None:
                labels = images.labels
                now = time.perf_counter()
                entry.append([fps[i] for i in rows], feats, [images.ids[i] for i in rows],
                             [None if labels is None else labels[i] for i in rows], [images.paths[i] for i in rows],
                             seconds=now - clock[0])
                clock[0] = now
            else:
                computed.update({int(r): f for r, f in zip(rows, feats)})
            pending_rows.clear()
            pending_feats.clear()

        done = 0
        if good.size > batch_size:
            runs = self._run_batches(ds, count=count)
        else:  # one batch: the single-batch session, no bulk sessions to open
            runs = ((r, self._run(p)) for r, p in ds)
        for rows, feats in runs:
            rows = np.asarray(rows)
            pending_rows.append(rows)
            pending_feats.append(feats)
            seen.update(int(r) for r in rows)
            done += rows.size
            if bar is not None:
                bar.update(done)
            if sum(r.size for r in pending_rows) >= self.chunk_size:
                flush()
        flush()
        for r in good:
            if int(r) not in seen:
                skipped[int(r)] = _scan.decode_failure_reason(images.paths[r])
        return computed, skipped


def _without_rows(batches, rows: dict):
    """``(rows, pixels)`` batches less the given rows (files the header scan refused), empty batches dropped."""
    for r, px in batches:
        keep = np.array([int(i) not in rows for i in r], dtype=bool)
        if keep.all():
            yield r, px
        elif keep.any():
            yield r[keep], px[keep]
