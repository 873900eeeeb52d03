"""Read PyTorch ``.pth`` state dicts into NumPy without importing torch, and safely.

PyTorch checkpoints are pickles, and unpickling runs whatever callables a file names.
This reader allows exactly what a state dict needs -- ``collections.OrderedDict``,
``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter`` and the typed storage
classes -- and refuses every other global, so a crafted file raises
:class:`UnsafeCheckpointError` before anything it names can run. Written by hand
because no maintained library reads torch pickles without torch itself.

Both layouts are read: the legacy stream (magic number, protocol, system info, the
pickled object, storage keys, then raw storages) and the zip archive of torch >= 1.6.
"""

from __future__ import annotations

import collections
import hashlib
import io
import os
import pickle
import re
import struct
import zipfile

import numpy as np

__all__ = ["UnsafeCheckpointError", "load_state_dict", "verify_sha256_prefix"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": None,  # no NumPy dtype; refused with a clear message
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The checkpoint names something other than tensors and an ordered dict of them."""


class _StorageRef:
    """Placeholder for a storage whose bytes are read after the pickle."""

    __slots__ = ("key", "dtype", "numel", "data")

    def __init__(self, key, dtype, numel):
        self.key, self.dtype, self.numel, self.data = key, dtype, numel, None


class _TensorRef:
    __slots__ = ("storage", "offset", "shape", "strides")

    def __init__(self, storage, offset, shape, strides):
        self.storage, self.offset, self.shape, self.strides = storage, offset, shape, strides

    def to_numpy(self) -> np.ndarray:
        flat = self.storage.data
        if flat is None:
            raise pickle.UnpicklingError(f"storage {self.storage.key!r} has no data in the file")
        shape, strides = tuple(self.shape), tuple(self.strides)
        if len(shape) != len(strides):
            raise pickle.UnpicklingError(f"tensor shape {shape} and strides {strides} disagree")
        if shape and min(shape) == 0:
            return np.zeros(shape, dtype=flat.dtype)
        last = self.offset + sum((n - 1) * s for n, s in zip(shape, strides))
        if self.offset < 0 or last >= flat.size or min(strides, default=0) < 0:
            raise pickle.UnpicklingError("tensor view reaches outside its storage")
        item = flat.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset :], shape=shape, strides=[s * item for s in strides], writeable=False
        )
        return np.array(view, order="C")  # contiguous copy, detached from the storage buffer


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    if not isinstance(storage, _StorageRef):
        raise UnsafeCheckpointError("a tensor was rebuilt from something that is not a storage")
    return _TensorRef(storage, int(storage_offset), size, stride)


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *_ignored):
    return data


class _StorageType:
    """Stands for ``torch.FloatStorage`` & co. inside the pickle; never called."""

    def __init__(self, name):
        self.name = name


class _SafeUnpickler(pickle.Unpickler):
    _ALLOWED = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }

    def __init__(self, file, storages: dict):
        super().__init__(file)
        self._storages = storages

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise UnsafeCheckpointError(
            f"refusing to load {module}.{name}: a state-dict checkpoint may only contain "
            "tensors and an OrderedDict of them (this file may be crafted to run code)"
        )

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise UnsafeCheckpointError(f"unexpected persistent id {pid!r:.80}")
        storage_type, key = pid[1], str(pid[2])
        if not isinstance(storage_type, _StorageType):
            raise UnsafeCheckpointError("storage type is not a torch storage class")
        dtype = _STORAGE_DTYPES[storage_type.name]
        if dtype is None:
            raise pickle.UnpicklingError(f"{storage_type.name} tensors are not supported")
        numel = int(pid[4]) if len(pid) > 4 else -1
        ref = self._storages.get(key)
        if ref is None:
            ref = self._storages[key] = _StorageRef(key, np.dtype(dtype), numel)
        return ref


def _plain_load(f):
    """Unpickle a header record that may hold only plain data."""

    class _Plain(pickle.Unpickler):
        def find_class(self, module, name):
            raise UnsafeCheckpointError(f"refusing to load {module}.{name} in a checkpoint header")

    return _Plain(f).load()


def _load_legacy(f) -> object:
    if _plain_load(f) != _LEGACY_MAGIC:
        raise pickle.UnpicklingError("not a PyTorch checkpoint (bad magic number)")
    if _plain_load(f) != _LEGACY_PROTOCOL:
        raise pickle.UnpicklingError("unsupported PyTorch legacy protocol version")
    sys_info = _plain_load(f)
    if not sys_info.get("little_endian", True):
        raise pickle.UnpicklingError("big-endian checkpoints are not supported")
    storages: dict = {}
    result = _SafeUnpickler(f, storages).load()
    keys = _plain_load(f)
    for key in keys:
        ref = storages.get(str(key))
        if ref is None:
            raise pickle.UnpicklingError(f"storage {key!r} is listed but never used")
        (numel,) = struct.unpack("<q", f.read(8))
        raw = f.read(numel * ref.dtype.itemsize)
        if len(raw) != numel * ref.dtype.itemsize:
            raise pickle.UnpicklingError("checkpoint is truncated")
        ref.data = np.frombuffer(raw, dtype=ref.dtype.newbyteorder("<"))
    return result


def _load_zip(path) -> object:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise pickle.UnpicklingError("zip checkpoint has no single data.pkl")
        prefix = pkl[0][: -len("data.pkl")]
        storages: dict = {}
        result = _SafeUnpickler(io.BytesIO(zf.read(pkl[0])), storages).load()
        for key, ref in storages.items():
            raw = zf.read(f"{prefix}data/{key}")
            ref.data = np.frombuffer(raw, dtype=ref.dtype.newbyteorder("<"))
    return result


def load_state_dict(path: str | os.PathLike) -> "collections.OrderedDict[str, np.ndarray]":
    """Load a PyTorch state dict as an ordered dict of NumPy arrays.

    Parameters
    ----------
    path : path-like
        A ``.pth`` / ``.pt`` file written by ``torch.save(model.state_dict())``.

    Returns
    -------
    collections.OrderedDict
        Parameter name -> array, in the file's order.

    Raises
    ------
    UnsafeCheckpointError
        If the file names any callable other than tensor rebuilding.
    pickle.UnpicklingError
        If the file is not a well-formed checkpoint.
    """
    path = os.fspath(path)
    if zipfile.is_zipfile(path):
        obj = _load_zip(path)
    else:
        with open(path, "rb") as f:
            obj = _load_legacy(f)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise pickle.UnpicklingError(f"checkpoint holds a {type(obj).__name__}, not a state dict")
    out = collections.OrderedDict()
    for name, value in obj.items():
        if not isinstance(value, _TensorRef):
            raise pickle.UnpicklingError(f"entry {name!r} is not a tensor")
        out[str(name)] = value.to_numpy()
    return out


def verify_sha256_prefix(path: str | os.PathLike) -> str:
    """Check a file against the sha256 prefix in its name (``name-<hex8>.pth``).

    Returns the full hex digest. Raises ``ValueError`` when the name carries no
    prefix or the content does not match it (a corrupted or substituted file).
    """
    path = os.fspath(path)
    match = re.search(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$", os.path.basename(path))
    if not match:
        raise ValueError(f"{path}: the file name carries no sha256 prefix (expected name-<hex>.pth)")
    digest = sha256_file(path)
    if not digest.startswith(match.group(1)):
        raise ValueError(
            f"{path}: sha256 {digest[:12]}... does not match the prefix {match.group(1)} in its name; "
            "the file is corrupted or not the published checkpoint -- reinstall it"
        )
    return digest


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
