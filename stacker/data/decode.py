"""Pixels: image files and in-memory images decoded, turned upright, made RGB and resized.

Every image becomes uint8-valued RGB, upright by its EXIF orientation, any mode
converted (16-bit and float greys scaled to 8-bit, not clipped), then float32
``(size, size, 3)`` in [0, 255]. Pixels come from parallel threads that work ahead of
the CNN, so decoding overlaps with its forward pass: Pillow in a thread pool
(:func:`pil_batches`, the default) or a ``tf.data`` pipeline for TensorFlow's resize
methods (:func:`pixel_batches`), where TensorFlow decodes the formats the table of
:mod:`stacker.data.formats` says it does. The last decoded images are kept, so an
ensemble's other backbones only resize them. Objects at URLs are fetched through
:mod:`stacker.data.storage`. A file that fails to decode is left out of the stream; the
caller finds it by its missing row. Every line here decides feature values: the feature
cache's key hashes this module whole.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from stacker.data import storage
from stacker.data.formats import TENSORFLOW_MAGIC
from stacker.data.scan import open_file, size_problem

__all__ = ["DECODED_BYTES", "RESIZE_METHODS", "Primed", "array_batches", "pil_batches", "pil_pixels",
           "pixel_batches", "resize_pixels", "rgb_array"]

DECODED_BYTES = 32 << 20  # decoded images kept for an ensemble's other backbones (see _upright_rgb)
RESIZE_METHODS = ("pil", "bilinear", "bicubic")


def _decode(tf, contents):
    """Bytes -> uint8 RGB tensor; JPEGs with the accurate DCT, others via ``decode_image``."""
    return tf.cond(
        tf.io.is_jpeg(contents),
        lambda: tf.io.decode_jpeg(contents, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(contents, channels=3, dtype=tf.uint8, expand_animations=False),
    )


def _tf_decodes(tf, contents):
    """Whether TensorFlow decodes these bytes itself: they start with the magic of a ``tensorflow`` format."""
    def starts_with(magic):
        return tf.reduce_all(tf.stack([tf.equal(tf.strings.substr(contents, offset, len(m)), m)
                                       for offset, m in magic]))

    return tf.reduce_any(tf.stack([starts_with(magic) for magic in TENSORFLOW_MAGIC]))


def _pil_decoded(tf, path):
    """Any other format (TIFF, PPM, ICO, TGA, SGI, ...): decoded by Pillow, upright, uint8 RGB."""
    def read(p):
        with open_file(p.decode()) as img:
            return np.asarray(_pil_rgb(img), dtype=np.uint8)

    image = tf.numpy_function(read, [path], tf.uint8, stateful=False)
    image.set_shape((None, None, 3))
    return image


def _orient(tf, image, orientation):
    """Apply an EXIF orientation (1..8) so the image is upright."""
    branches = [
        lambda: image,
        lambda: image,
        lambda: tf.image.flip_left_right(image),
        lambda: tf.image.rot90(image, 2),
        lambda: tf.image.flip_up_down(image),
        lambda: tf.image.transpose(image),
        lambda: tf.image.rot90(image, 3),
        lambda: tf.image.rot90(tf.image.transpose(image), 2),
        lambda: tf.image.rot90(image, 1),
    ]
    return tf.switch_case(orientation, branches)


def _pil_rgb(img):
    """A PIL image -> uint8 RGB, upright; 16-bit, 32-bit and float greys scaled (Pillow's convert would clip them)."""
    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I") or img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.rint(_to_8bit(arr, img.mode)), 0, 255).astype(np.uint8), "L")
    return img if img.mode == "RGB" else img.convert("RGB")


def _to_8bit(arr: np.ndarray, mode: str) -> np.ndarray:
    """Scale a 16/32-bit integer or float grey image to 0..255."""
    finite = arr[np.isfinite(arr)]
    hi = float(finite.max()) if finite.size else 0.0
    lo = float(finite.min()) if finite.size else 0.0
    arr = np.nan_to_num(arr, nan=0.0, posinf=hi, neginf=lo)
    if mode == "F":
        if lo >= 0 and hi <= 1.0:
            return arr * 255.0  # the usual [0, 1] float image
        return arr if lo >= 0 and hi <= 255 else (arr - lo) * (255.0 / max(hi - lo, 1e-12))
    return arr / 257.0 if hi <= 65535 else arr * (255.0 / hi)


def pil_pixels(path: str, size: int) -> np.ndarray:
    """Decode and resize with Pillow, exactly as the tutorials' ``Image.open().resize(BILINEAR)``."""
    return _pil_uint8(path, size).astype(np.float32)


def _pil_uint8(path: str, size: int) -> np.ndarray:
    """:func:`pil_pixels` as uint8 (the same values, a quarter of the bytes to move)."""
    from PIL import Image

    return np.asarray(_upright_rgb(path).resize((size, size), Image.BILINEAR))


def _upright_rgb(path: str):
    """The file as an upright RGB Pillow image, decoded once for all of an ensemble's backbones.

    Every backbone of an ensemble reads the same files at its own size; the last decoded
    images (up to :data:`DECODED_BYTES`, keyed by path, size and modification time, or
    an object's version for a URL) are kept, so the others only resize. Predicting one
    image with four backbones decodes it once instead of four times.
    """
    if storage.is_url(path):
        key = (path, *dataclasses.astuple(storage.stat(path)))  # the object's size and version (ETag)
    else:
        st = os.stat(path)
        key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    rgb = _DECODED.get(key)
    if rgb is None:
        with open_file(path) as img:
            problem = size_problem(*img.size)  # the scan's limits: a decode may start before the scan ends
            if problem:
                raise ValueError(problem)
            rgb = _pil_rgb(img)  # a new image (converted, transposed or copied): independent of the file
        _DECODED.put(key, rgb, rgb.width * rgb.height * 3)
    return rgb


class _Recent:
    """A small thread-safe LRU of values with a total byte budget."""

    def __init__(self, max_bytes: int):
        from collections import OrderedDict
        from threading import Lock

        self.max_bytes, self.items, self.bytes, self.lock = max_bytes, OrderedDict(), 0, Lock()

    def get(self, key):
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key][0]
        return None

    def put(self, key, value, nbytes: int) -> None:
        if nbytes > self.max_bytes // 4:
            return
        with self.lock:
            if key not in self.items:
                self.items[key] = (value, nbytes)
                self.bytes += nbytes
            while self.bytes > self.max_bytes:
                self.bytes -= self.items.popitem(last=False)[1][1]


_DECODED = _Recent(DECODED_BYTES)


def resize_pixels(tf, image, size: int, method: str = "bilinear"):
    """The one TensorFlow resize (``bilinear`` / ``bicubic``): antialiased when shrinking, float32 in [0, 255].

    ``bicubic`` suits strong upscaling (CIFAR's 32 px to a backbone's 224 px). The
    default ``pil`` method resizes with Pillow instead (:func:`pil_pixels`).
    """
    if method not in RESIZE_METHODS:
        raise ValueError(f"resize must be one of {RESIZE_METHODS}, got {method!r}")
    image = tf.image.resize(image, (size, size), method=method, antialias=True)
    return tf.clip_by_value(image, 0.0, 255.0)


def pixel_batches(paths, size: int, batch_size: int = 32, orientations=None, rows=None, method: str = "pil"):
    """A ``tf.data.Dataset`` of ``(row, pixels)`` batches for ``paths``.

    ``pixels`` is float32 ``(batch, size, size, 3)`` in [0, 255]. Files that fail to
    decode are dropped from the stream (``ignore_errors``); compare the ``row``
    values with what was asked to find them. With ``method="pil"`` Pillow decodes and
    resizes (in parallel threads: Pillow releases the GIL), giving the very pixels of a
    Pillow script; otherwise TensorFlow does (EXIF orientation from ``orientations``).
    """
    import tensorflow as tf

    n = len(paths)
    rows = np.arange(n, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    orientations = np.ones(n, dtype=np.int32) if orientations is None else np.asarray(orientations, np.int32)
    ds = tf.data.Dataset.from_tensor_slices((rows, list(map(str, paths)), orientations))
    remote = any(storage.is_url(p) for p in map(str, paths))  # TensorFlow reads no object store: fsspec does

    def load(row, path, orientation):
        if method == "pil":
            image = tf.numpy_function(lambda p: pil_pixels(p.decode(), size), [path], tf.float32, stateful=False)
            image.set_shape((size, size, 3))
            return row, image
        contents = (tf.numpy_function(lambda p: storage.read_bytes(p.decode()), [path], tf.string, stateful=False)
                    if remote else tf.io.read_file(path))
        image = tf.cond(_tf_decodes(tf, contents),
                        lambda: _orient(tf, _decode(tf, contents), orientation),
                        lambda: _pil_decoded(tf, path))
        return row, resize_pixels(tf, image, size, method)

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.ignore_errors()
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def array_batches(images, size: int, batch_size: int = 32, method: str = "pil", converted: bool = False):
    """Yield float32 batches from in-memory images (NumPy arrays or PIL images), resized like files.

    ``converted``: the images already went through :func:`rgb_array` (not scaled twice).
    """
    import tensorflow as tf
    from PIL import Image

    batch = []
    for img in images:
        arr = img if converted else rgb_array(img)
        if method == "pil":
            pil = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")
            batch.append(np.asarray(pil.resize((size, size), Image.BILINEAR), dtype=np.float32))
        else:
            batch.append(resize_pixels(tf, tf.convert_to_tensor(arr), size, method).numpy())
        if len(batch) == batch_size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)


def rgb_array(img) -> np.ndarray:
    """One in-memory image -> float32 ``(h, w, 3)`` RGB array in 0..255.

    uint8 arrays are pixels; uint16 are scaled by 1/257; float arrays in [0, 1] are
    scaled by 255 with a warning (the Keras convention), floats in [0, 255] are taken
    as pixels, anything else (negative, NaN, above 255) is refused.
    """
    from PIL import Image

    if isinstance(img, Image.Image):
        img = _pil_rgb(img)
    arr = np.asarray(img)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4) or min(arr.shape[:2]) == 0:
        raise ValueError(f"an image array must be (h, w), (h, w, 1), (h, w, 3) or (h, w, 4) with h, w > 0; "
                         f"got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"image arrays must hold integers or floats, got dtype {arr.dtype}")
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 257.0
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ValueError("an image array holds NaN or infinite values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"a float image array must hold pixels in [0, 1] or [0, 255], got values in "
                             f"[{lo:.3g}, {hi:.3g}] (normalised input? pass the original pixels)")
        if 0 < hi <= 1.0:
            import warnings

            warnings.warn("float image array with values in [0, 1]: scaled by 255 to pixels (pass uint8 or "
                          "0-255 floats to avoid this guess)", stacklevel=4)
            return arr.astype(np.float32) * 255.0
        return arr.astype(np.float32)
    if arr.min() < 0 or arr.max() > 255:
        raise ValueError(f"an integer image array must hold pixels in 0..255 (or be uint16), got values in "
                         f"[{arr.min()}, {arr.max()}]")
    return arr.astype(np.float32)


class Primed:
    """An iterator whose first item is being computed in a thread from the moment it is made.

    Extraction scans the files' headers (Python holding the GIL, 24 ms per 256 JPEGs) while
    Pillow decodes the first batches (releasing it), instead of one after the other. The
    iterator is then consumed (or closed, :meth:`close`) in the caller's thread.
    """

    _END = object()

    def __init__(self, iterable):
        self._it = iter(iterable)
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._first = self._pool.submit(next, self._it, self._END)

    def _take(self):
        try:
            return self._first.result()
        finally:
            self._pool.shutdown()

    def __iter__(self):
        first = self._take()
        if first is not self._END:
            yield first
            yield from self._it

    def close(self) -> None:
        """Stop: wait for the first item (a thread cannot be interrupted), then close the iterator."""
        try:
            self._take()
        except Exception:  # noqa: BLE001 - closing: the caller is already leaving with its own result
            pass
        if hasattr(self._it, "close"):
            self._it.close()


def pil_batches(paths, size: int, batch_size: int = 32, rows=None, workers: int | None = None, ahead: int = 2):
    """Yield ``(rows, pixels)`` batches decoded and resized by Pillow in threads, without TensorFlow.

    ``pixels`` is float32 ``(batch, size, size, 3)``, the very values of
    ``pixel_batches(method="pil")`` (:func:`pil_pixels`); a file that fails to decode is
    left out of its batch, as there. Up to ``ahead`` batches are decoded while the caller
    runs the network on the current one (Pillow releases the GIL), each thread writing its
    image into the batch array, so the caller's thread does no copy or conversion. Neither
    TensorFlow's import (3 s) nor a ``tf.data`` pipeline is paid, and on this project's
    2-core machine the pipeline keeps ONNX Runtime busier than ``tf.data`` does.
    """
    from collections import deque

    rows = np.arange(len(paths), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)

    def load(out, j: int, i: int) -> bool:
        try:
            out[j] = _pil_uint8(paths[i], size)
            return True
        except Exception:  # noqa: BLE001 - the caller reports the rows that are missing
            return False

    def empty(first: int):
        return np.empty((min(batch_size, len(paths) - first), size, size, 3), np.float32)

    def batch(first: int, out, ok: list):
        ok = np.array(ok, dtype=bool)
        return rows[first:first + len(out)][ok], out if ok.all() else out[ok]

    if len(paths) <= 1:  # one image: a thread pool would only add latency
        if len(paths):
            out = empty(0)
            yield batch(0, out, [load(out, 0, 0)])
        return
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        pending = deque()
        for first in range(0, len(paths), batch_size):
            out = empty(first)
            pending.append((first, out, [pool.submit(load, out, j, first + j) for j in range(len(out))]))
            while len(pending) > ahead or (pending and first + batch_size >= len(paths)):
                first_, out_, futures = pending.popleft()
                yield batch(first_, out_, [f.result() for f in futures])
