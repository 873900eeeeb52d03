"""Bounds on what a model directory or cache entry may make this process allocate, checked before allocating.

A forged file can declare far more than it stores: an ``.npy`` header (in ``oof.npz``, a
cache's ``arrays.npz`` or ``proba.npy``, or inside a skops file) declaring a huge shape, a
zip member compressed a thousandfold, an HDF5 dataset in a ``.keras`` archive's weights
with a huge shape and no stored data, a learner spec's ``input_size`` that makes the
extractor allocate ``batch x size x size x 3`` floats. Each loader below reads only
headers and sizes (never the data) and refuses such a file with its name, the member, the
declared size and the bound, before NumPy, skops, h5py or Keras allocates anything.

The bounds (each overridable by the environment variable named beside it):

- ``MAX_INPUT_SIZE`` = 2048 pixels per side (``$STACKER_MAX_INPUT_SIZE``): the largest
  registered backbone takes 600 (EfficientNet-B7); one 2048 px image is 48 MiB of float32.
- ``MAX_ARRAY_BYTES`` = 4 GiB per declared array (``$STACKER_MAX_ARRAY_BYTES``): a million
  out-of-fold rows of 100 classes are 0.8 GiB; EfficientNet-B7's largest kernel is 10 MiB.
- ``MAX_MEMBER_BYTES`` = 4 GiB per archive member uncompressed (``$STACKER_MAX_MEMBER_BYTES``).
- ``MAX_EXPANSION`` = 100 (``$STACKER_MAX_EXPANSION``): above ``EXPANSION_FLOOR`` = 16 MiB
  (``$STACKER_EXPANSION_FLOOR``), what a member or dataset declares may be at most this
  multiple of the bytes it stores. stacker writes zips and HDF5 uncompressed (ratio 1);
  a bomb stores next to nothing, so the memory it can ask for stays near what it occupies.
"""

from __future__ import annotations

import math
import os
import zipfile

import numpy as np

__all__ = ["ResourceBoundError", "limit", "check_input_size", "check_manifest_sizes", "check_npy_file",
           "check_npz_file", "checked_array_file", "check_skops_file", "check_keras_weights", "BOUNDS"]

# name -> (default, environment variable, unit)
BOUNDS = {
    "MAX_INPUT_SIZE": (2048, "STACKER_MAX_INPUT_SIZE", "pixels per side"),
    "MAX_ARRAY_BYTES": (4 << 30, "STACKER_MAX_ARRAY_BYTES", "bytes"),
    "MAX_MEMBER_BYTES": (4 << 30, "STACKER_MAX_MEMBER_BYTES", "bytes"),
    "MAX_EXPANSION": (100, "STACKER_MAX_EXPANSION", "times the stored bytes"),
    "EXPANSION_FLOOR": (16 << 20, "STACKER_EXPANSION_FLOOR", "bytes"),
    # ONNX graphs (stacker.io.onnx_graph): elements of any one tensor; bytes of a graph file (protobuf's own limit)
    "MAX_ONNX_ELEMENTS": (2 ** 26, "STACKER_MAX_ONNX_ELEMENTS", "elements"),
    "MAX_ONNX_BYTES": (2 ** 31, "STACKER_MAX_ONNX_BYTES", "bytes"),
}


class ResourceBoundError(ValueError):
    """A file declares more memory than the bounds allow; nothing of it was allocated."""


def limit(name: str) -> int:
    """The bound ``name`` (a key of :data:`BOUNDS`): its environment variable if set, else its default."""
    default, env, _unit = BOUNDS[name]
    text = os.environ.get(env, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"${env} must be a whole number ({BOUNDS[name][2]}), got {text!r}") from None
    if value < 1:
        raise ValueError(f"${env} must be positive, got {value}")
    return value


def _refuse(where: str, what: str, declared: int, name: str, stored: int | None = None) -> ResourceBoundError:
    bound, env = limit(name), BOUNDS[name][1]
    if name == "MAX_EXPANSION":
        text = (f"{where}: {what} declares {declared} bytes but stores only {stored}, more than "
                f"{bound} times that (a decompression or shape bomb)")
    else:
        text = f"{where}: {what} declares {declared} {BOUNDS[name][2]}, over the bound of {bound}"
    return ResourceBoundError(f"{text}; ${env} raises the bound. Refusing to load it (nothing was allocated)")


def _check_declared(where: str, what: str, declared: int, stored: int | None, array: bool = True) -> None:
    """``declared`` bytes within the absolute bound and, above the floor, within MAX_EXPANSION x ``stored``."""
    name = "MAX_ARRAY_BYTES" if array else "MAX_MEMBER_BYTES"
    if declared > limit(name):
        raise _refuse(where, what, declared, name)
    if stored is not None and declared > limit("EXPANSION_FLOOR") and declared > limit("MAX_EXPANSION") * stored:
        raise _refuse(where, what, declared, "MAX_EXPANSION", stored)


# -- input sizes ---------------------------------------------------------------------------

def check_input_size(value, where: str, field: str = "input_size") -> None:
    """Refuse an ``input_size`` over ``MAX_INPUT_SIZE`` (the extractor allocates batch x size x size x 3 floats)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > limit("MAX_INPUT_SIZE"):
        raise _refuse(where, f"the field {field}", int(value), "MAX_INPUT_SIZE")


def check_manifest_sizes(manifest: dict, where: str) -> None:
    """Every ``input_size`` a manifest gives (parameters, backbones, learner specs) within the bound."""
    params = manifest.get("params") if isinstance(manifest.get("params"), dict) else {}
    check_input_size(params.get("input_size"), where, "params.input_size")
    for i, b in enumerate(params.get("backbones") if isinstance(params.get("backbones"), list) else []):
        if isinstance(b, dict):
            check_input_size(b.get("input_size"), where, f"params.backbones[{i}].input_size")
    for i, e in enumerate(manifest.get("learners") if isinstance(manifest.get("learners"), list) else []):
        spec = e.get("spec") if isinstance(e, dict) else None
        if isinstance(spec, dict):
            check_input_size(spec.get("input_size"), where, f"learners[{i}].spec.input_size")


# -- .npy headers ------------------------------------------------------------------------------

def _npy_header(f, where: str, what: str) -> tuple[int, int]:
    """``(declared data bytes, header length)`` from an ``.npy`` stream's header, without reading data."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, _fortran, dtype = fmt.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _fortran, dtype = fmt.read_array_header_2_0(f)
        else:
            shape, _fortran, dtype = fmt._read_array_header(f, version)  # 3.0: no public reader
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        raise ResourceBoundError(f"{where}: {what} is not a readable .npy array ({exc}); refusing to load it") from None
    if dtype.hasobject:
        raise ResourceBoundError(f"{where}: {what} holds Python objects (dtype {dtype}), which are never loaded; "
                                 "refusing to load it")
    return math.prod(int(n) for n in shape) * dtype.itemsize, f.tell()


def check_npy_file(path: str) -> None:
    """An ``.npy`` file whose header declares no more than the bound and no more than the file holds."""
    with open(path, "rb") as f:
        declared, offset = _npy_header(f, path, "the array")
    _check_declared(path, "the array", declared, None)
    held = os.path.getsize(path) - offset
    if declared > held:
        raise ResourceBoundError(f"{path}: the array declares {declared} bytes but the file holds only {held}; "
                                 "refusing to load it (nothing was allocated)")


def _check_zip_members(zf: zipfile.ZipFile, where: str) -> None:
    for info in zf.infolist():
        _check_declared(where, f"member {info.filename}", info.file_size, info.compress_size, array=False)


def _check_npy_members(zf: zipfile.ZipFile, where: str, prefix: str = "") -> None:
    """Every ``.npy`` member's declared array (and every nested ``.npz``'s, as scipy's sparse parts are)."""
    for info in zf.infolist():
        what = f"member {prefix}{info.filename}"
        if info.filename.endswith(".npy"):
            with zf.open(info) as f:
                declared, offset = _npy_header(f, where, what)
            _check_declared(where, what, declared, info.compress_size)
            if declared > info.file_size - offset:
                raise ResourceBoundError(f"{where}: {what} declares {declared} bytes but holds only "
                                         f"{info.file_size - offset}; refusing to load it (nothing was allocated)")
        elif info.filename.endswith(".npz"):
            with zf.open(info) as f, _zip(f, where) as inner:
                _check_zip_members(inner, f"{where} ({what})")
                _check_npy_members(inner, where, f"{prefix}{info.filename}/")


def _zip(f, where: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(f)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ResourceBoundError(f"{where} is not a readable zip archive ({exc}); refusing to load it") from None


def check_npz_file(path: str) -> None:
    """An ``.npz`` whose members and declared arrays are all within the bounds (headers only are read)."""
    with _zip(path, path) as zf:
        _check_zip_members(zf, path)
        _check_npy_members(zf, path)


def checked_array_file(path: str) -> str:
    """``path`` after :func:`check_npz_file` or :func:`check_npy_file` (by its extension): for ``np.load(...)``."""
    (check_npy_file if path.endswith(".npy") else check_npz_file)(path)
    return path


def check_skops_file(path: str) -> None:
    """A skops file whose members (``schema.json``, ``.npy`` arrays, sparse ``.npz``) are within the bounds.

    skops reads every array of the file while it lists the types it needs, before any trust
    check, so this runs first. A missing file is left to the loader to report.
    """
    if not os.path.isfile(path):
        return
    check_npz_file(path)


# -- Keras weights ---------------------------------------------------------------------------

class _Window:
    """A read-only file view of ``[start, start + size)`` of ``f``: an uncompressed zip member, for h5py."""

    def __init__(self, f, start: int, size: int):
        self.f, self.start, self.size, self.pos = f, start, size, 0

    def seek(self, pos, whence=0):
        self.pos = {0: pos, 1: self.pos + pos, 2: self.size + pos}[whence]
        return self.pos

    def tell(self):
        return self.pos

    def read(self, n=-1):
        n = self.size - self.pos if n is None or n < 0 else min(n, max(self.size - self.pos, 0))
        self.f.seek(self.start + self.pos)
        data = self.f.read(n)
        self.pos += len(data)
        return data

    def readinto(self, buffer):
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


def _member_start(f, info: zipfile.ZipInfo) -> int:
    """Offset of a member's data in the archive (after its local header)."""
    f.seek(info.header_offset)
    header = f.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header for {info.filename}")
    return info.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")


def check_keras_weights(path: str) -> None:
    """A ``.keras`` archive whose members and every HDF5 dataset in ``model.weights.h5`` are within the bounds.

    Only HDF5 metadata is read (shapes, types, stored sizes): an uncompressed member is read in
    place, a compressed one through the zip. Keras would read a dataset whole before it checks
    the shape against its variable.
    """
    import h5py

    where = f"{path} (model.weights.h5)"
    with open(path, "rb") as raw, _zip(raw, path) as zf:
        _check_zip_members(zf, path)
        try:
            info = zf.getinfo("model.weights.h5")
        except KeyError:
            return
        stored_member = info.compress_size
        view = (_Window(raw, _member_start(raw, info), info.file_size) if info.compress_type == zipfile.ZIP_STORED
                else zf.open(info))
        datasets = []
        try:
            with h5py.File(view, "r") as h5:
                h5.visititems(lambda name, obj: datasets.append((name, obj.shape, obj.dtype.itemsize,
                                                                 obj.id.get_storage_size()))
                              if isinstance(obj, h5py.Dataset) else None)
        except (OSError, ValueError, KeyError) as exc:
            raise ResourceBoundError(f"{where} is not a readable HDF5 file ({exc}); refusing to load it") from None
    total = 0
    for name, shape, itemsize, stored in datasets:
        declared = math.prod(int(n) for n in (shape or ())) * itemsize
        _check_declared(where, f"dataset {name} (shape {tuple(shape or ())})", declared, stored)
        total += declared
    _check_declared(where, "all its datasets together", total, stored_member)
