"""The header scan: which files can be decoded, and why the others cannot.

Before pixels are decoded, :func:`scan_images` reads every file's header: the EXIF
orientation of the formats that carry one, and the true reason a file is unusable
(missing, a dangling link, a FIFO or device -- never opened, see
:func:`stacker.data.fingerprint.probe` -- empty, not an image, absurdly large, cut
short). A cut-short file is found by its last bytes (:data:`stacker.data.formats.END_MARKERS`):
only a file whose tail is wrong is decoded here, so every such file is listed before any
forward pass. A file that passes but fails to decode (corrupt data in the middle) is
explained afterwards by :func:`decode_failure_reason`. An object at a URL
(:mod:`stacker.data.storage`) is fetched whole, once, and its header read from memory
(:func:`open_file`).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from stacker.data import storage
from stacker.data.formats import END_MARKERS, EXIF_FORMATS, open_image

__all__ = ["MAX_PIXELS", "decode_failure_reason", "open_file", "scan_images", "size_problem"]

MAX_PIXELS = 89_478_485  # Pillow's decompression-bomb limit (about 0.25 GB of RGBA)


def size_problem(w: int, h: int) -> str | None:
    """Why an image of ``w`` x ``h`` pixels is not decoded (too many pixels, or none), or None.

    The decoder asks too: a decode may start before the scan of its file ends.
    """
    if w * h > MAX_PIXELS:
        return f"{w}x{h} pixels exceeds the {MAX_PIXELS}-pixel limit (decompression bomb?)"
    if w == 0 or h == 0:
        return f"{w}x{h} pixels: no image data"
    return None


def open_file(path: str):
    """A Pillow image of a local file or of an object at a URL, fetched whole into memory (one request);
    either is opened by :func:`~stacker.data.formats.open_image`."""
    return open_image(storage.read_bytes(path) if storage.is_url(path) else path)


def _fetched(url: str):
    """``(bytes, None)`` of an object, else ``(None, reason)`` (the reasons of ``probe``): one request for it."""
    from stacker.data.fingerprint import _object

    try:
        data = storage.read_bytes(url)
    except OSError as exc:
        return None, _object(exc)[1]
    return (data, None) if data else (None, "empty file (0 bytes)")


def _scan_one(path: str) -> tuple[int, str | None]:
    """(EXIF orientation, reason it is unusable or None) from the file header."""
    from PIL import Image, UnidentifiedImageError

    from stacker.data.fingerprint import probe

    if storage.is_url(path):
        data, reason = _fetched(path)
        size, opened = (len(data), lambda: open_image(data)) if data else (0, None)
    else:
        st, reason = probe(path)  # never open a FIFO or a device
        size, opened = (st.st_size, lambda: open_image(path)) if st else (0, None)
    if reason:
        return 1, reason
    try:
        with opened() as im:
            problem = size_problem(*im.size) or _cut_short(path, size, im)
            if problem:
                return 1, problem
            orientation = int(im.getexif().get(0x0112, 1)) if im.format in EXIF_FORMATS else 1
            return (orientation if 1 <= orientation <= 8 else 1), None
    except FileNotFoundError:
        return 1, "file not found"
    except UnidentifiedImageError:
        return 1, "not an image file (no Pillow plugin recognises its contents)"
    except Image.DecompressionBombError as exc:
        return 1, f"decompression bomb: {exc}"
    except OSError as exc:
        if "truncat" in str(exc).lower():
            return 1, f"truncated file ({exc})"
        return 1, f"unreadable header ({type(exc).__name__}: {exc})"
    except Exception as exc:  # noqa: BLE001 - any header error means the file is unusable
        return 1, f"unreadable header ({type(exc).__name__}: {exc})"


def _cut_short(path: str, size: int, im) -> str | None:
    """Why a file is incomplete, or None: decoded only when it does not end with its format's end marker.

    Valid files may carry bytes after the marker (some cameras' JPEGs): those decode and pass.
    """
    end = END_MARKERS.get(im.format)
    if not end:
        return None
    if _tail(im, path, size, len(end)) == end:
        return None
    try:
        im.load()
    except Exception as exc:  # noqa: BLE001 - any decode error means the file is unusable
        return f"corrupt or truncated image data ({type(exc).__name__}: {exc})"
    return None


def _tail(im, path: str, size: int, n: int) -> bytes:
    """The file's last ``n`` bytes, read through the file Pillow already has open (one open per file)."""
    fh = getattr(im, "fp", None)
    if fh is None:
        with open(path, "rb") as own:
            own.seek(max(0, size - n))
            return own.read(n)
    where = fh.tell()
    fh.seek(max(0, size - n))
    tail = fh.read(n)
    fh.seek(where)
    return tail


def scan_images(paths, workers: int = 8, probe_files: int = 64) -> tuple[np.ndarray, dict]:
    """Read every file's header: in this thread, or in ``workers`` threads when storage is slow.

    Returns ``(orientations, bad)``: the EXIF orientation (1..8) per file, and
    ``{row: reason}`` for files that cannot be used. Parsing a header is Python work
    that holds the GIL, so on a local disk threads only add contention (256 JPEGs:
    24 ms in one thread, 39-62 ms in a pool of 1-8); they help when opening a file waits
    on storage (a network file system). The first ``probe_files`` files tell which: the
    rest go to the pool when their wall time was more than twice their CPU time.
    """
    wall, cpu = time.perf_counter(), time.thread_time()
    results = [_scan_one(p) for p in paths[:probe_files]]
    rest = paths[probe_files:]
    slow_storage = time.perf_counter() - wall > 2 * (time.thread_time() - cpu)
    if rest and slow_storage and workers > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results += pool.map(_scan_one, rest, chunksize=64)
    else:
        results += [_scan_one(p) for p in rest]
    orientations = np.array([r[0] for r in results], dtype=np.int32)
    bad = {i: r[1] for i, r in enumerate(results) if r[1] is not None}
    return orientations, bad


def decode_failure_reason(path: str) -> str:
    """Why a file that passed the header scan failed to decode (for the error message)."""
    try:
        with open_file(path) as im:
            im.load()
        return "the image data could not be decoded"
    except Exception as exc:  # noqa: BLE001
        return f"corrupt or truncated image data ({type(exc).__name__}: {exc})"
