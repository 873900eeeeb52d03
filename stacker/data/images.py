"""Where images come from, and how they become pixel batches.

Sources: class sub-folders, Kaggle-style names (``cat.12.jpg``), a CSV of
``path,label``, and unlabelled Kaggle test folders (``17.jpg`` -> id 17). Each gives an
:class:`ImageSet`. Every format Pillow opens is read (JPEG, PNG, BMP, GIF, WebP, TIFF
including 16-bit and float, PPM/PGM, ICO, TGA, SGI, ...), any mode converted to RGB
(16-bit and float scaled to 8-bit) and turned upright by its EXIF orientation. Pixels
come from parallel threads that work ahead of the CNN, so decoding overlaps with its
forward pass: Pillow in a thread pool (:func:`pil_batches`, the default) or a
``tf.data`` pipeline for TensorFlow's resize methods (:func:`pixel_batches`).

Nothing is dropped silently. A folder reader gives every image file a row and lists
what it did not read (hidden files, documents, sub-folders of a test folder) in
:attr:`ImageSet.skipped`. Before pixels are decoded, :mod:`stacker.data.fingerprint` and
:func:`scan_images` find files that are missing, dangling links, loops, FIFOs,
devices, empty, not images or absurdly large; a file that passes but fails to decode
(a truncated JPEG) is caught in the pipeline. Each is reported by name with its true
reason under the ``on_bad_image`` policy: ``"raise"`` or ``"skip"``.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "IMAGE_EXTENSIONS",
    "BadImageError",
    "ImageSet",
    "file_fingerprints",
    "from_csv",
    "from_folder",
    "from_kaggle_names",
    "from_test_folder",
    "load_images",
    "pil_batches",
    "pixel_batches",
    "scan_images",
]

def _pillow_extensions() -> tuple:
    from PIL import Image

    Image.init()
    return tuple(sorted(e for e, fmt in Image.registered_extensions().items() if fmt in Image.OPEN))


# Every extension a Pillow plugin opens, plus HEIF (a plugin may be installed) and no extension.
IMAGE_EXTENSIONS = tuple(sorted(set(_pillow_extensions()) | {".heic", ".heif"}))
MAX_PIXELS = 89_478_485  # Pillow's decompression-bomb limit (about 0.25 GB of RGBA)
DECODED_BYTES = 32 << 20  # decoded images kept for an ensemble's other backbones (see _upright_rgb)
_KAGGLE_NAME = re.compile(r"^(?P<label>[^.]+)\.(?P<id>[^.]+)\.[A-Za-z]+$")


class BadImageError(ValueError):
    """An image file cannot be used; the message names the file and the reason."""


@dataclass
class ImageSet:
    """Image files with optional labels: what every stacker step takes.

    Attributes
    ----------
    paths : list of str
        Image files.
    ids : list
        One id per image (Kaggle ids for test folders; relative paths otherwise).
    labels : list of str or None
        Class name per image, or None for unlabelled sets.
    classes : list of str or None
        Sorted class names; ``y`` indexes into it.
    skipped : dict
        Path -> reason for what a folder reader saw and gave no row (hidden files,
        documents, sub-folders of a test folder): listed, never silently dropped.
    """

    paths: list
    ids: list
    labels: list | None = None
    classes: list | None = None
    skipped: dict = field(default_factory=dict)

    def __post_init__(self):
        self.paths = [os.fspath(p) for p in self.paths]
        if len(self.ids) != len(self.paths):
            raise ValueError(f"{len(self.ids)} ids for {len(self.paths)} images")
        if len(set(self.ids)) != len(self.ids):
            dup = sorted({str(i) for i in self.ids if self.ids.count(i) > 1})[:5]
            raise ValueError(f"duplicate image ids: {', '.join(dup)}")
        if self.labels is not None:
            if len(self.labels) != len(self.paths):
                raise ValueError(f"{len(self.labels)} labels for {len(self.paths)} images")
            self.labels = [str(v) for v in self.labels]
            if self.classes is None:
                self.classes = sorted(set(self.labels))
            unknown = sorted(set(self.labels) - set(self.classes))
            if unknown:
                raise ValueError(f"labels {unknown[:5]} are not among the classes {self.classes[:10]}")

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        """``ImageSet(300 images, 2 classes: cat 150, dog 150, root='.../train')``: counts, not every path."""
        parts = [f"{len(self)} images"]
        if self.labels is None:
            parts.append("unlabelled")
        else:
            counts = {c: 0 for c in self.classes}
            for label in self.labels:
                counts[label] += 1
            shown = ", ".join(f"{c} {n}" for c, n in list(counts.items())[:6])
            parts.append(f"{len(counts)} classes: {shown}" + (", ..." if len(counts) > 6 else ""))
        if self.skipped:
            parts.append(f"{len(self.skipped)} skipped")
        try:
            root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in self.paths]) if self.paths else None
        except ValueError:  # paths on different drives
            root = None
        if root:
            parts.append(f"root={root if len(root) <= 60 else '...' + root[-57:]!r}")
        return f"ImageSet({', '.join(parts)})"

    @property
    def y(self) -> np.ndarray:
        """Integer class index per image (labelled sets only)."""
        if self.labels is None:
            raise ValueError("this image set has no labels")
        index = {c: i for i, c in enumerate(self.classes)}
        return np.array([index[v] for v in self.labels], dtype=np.int64)

    def subset(self, rows) -> "ImageSet":
        rows = list(rows)
        return ImageSet(
            [self.paths[i] for i in rows], [self.ids[i] for i in rows],
            None if self.labels is None else [self.labels[i] for i in rows], self.classes,
        )

    def shard(self, index: int, count: int, align: int = 1) -> "ImageSet":
        """Part ``index`` of ``count`` contiguous, near-equal parts (for extraction on several machines).

        Boundaries fall on multiples of ``align``: with ``align=batch_size`` every image is
        computed in the same batch as in one unsharded run, so merged shards hold exactly
        its features (a CPU's float results may differ in the last bit between batch shapes).
        """
        if not (isinstance(count, int) and count >= 1 and isinstance(index, int) and 0 <= index < count):
            raise ValueError(f"shard must be i/n with 0 <= i < n, got {index}/{count}")
        blocks = -(-len(self) // align)
        bounds = [min(len(self), int(b) * align) for b in np.linspace(0, blocks, count + 1).round()]
        return self.subset(range(bounds[index], bounds[index + 1]))

    def head(self, n: int, seed: int = 0) -> "ImageSet":
        """A class-stratified sample of ``n`` images (all when ``n >= len``), in stable order."""
        if n >= len(self):
            return self
        rng = np.random.default_rng(seed)
        if self.labels is None:
            return self.subset(sorted(rng.choice(len(self), n, replace=False)))
        from sklearn.model_selection import train_test_split

        rows, _ = train_test_split(np.arange(len(self)), train_size=n, stratify=self.y, random_state=seed)
        return self.subset(sorted(rows))


def _is_image(name: str) -> bool:
    ext = os.path.splitext(name)[1].lower()
    return not name.startswith(".") and (ext in IMAGE_EXTENSIONS or ext == "")


def _list_images(folder: str, subfolders: str = "skip") -> tuple[list[str], dict]:
    """Image file names in ``folder`` (sorted) and ``{path: reason}`` for every other entry.

    ``subfolders="ignore"`` leaves sub-folders out of the listing (class folders are read
    separately by :func:`from_folder`).
    """
    names, other = [], {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            if subfolders == "skip":
                other[path] = "a sub-folder; its files are not read"
        elif name.startswith("."):
            other[path] = "hidden file"
        elif _is_image(name):
            names.append(name)
        else:
            other[path] = f"not an image file type ({os.path.splitext(name)[1].lower()})"
    return names, other


def _require_dir(root) -> str:
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist")
    return root


def from_folder(root, classes: list | None = None, ignore: tuple = ("BACKGROUND_Google",)) -> ImageSet:
    """Images in class sub-folders: ``root/<class>/<image>`` (Keras's ``image_dataset_from_directory`` layout).

    Files beside the class folders and non-image files inside them get no row and are
    listed in ``skipped``.
    """
    root = _require_dir(root)
    found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and d not in ignore)
    if classes is not None:
        missing = sorted(set(classes) - set(found))
        if missing:
            raise ValueError(f"class folders {missing} are not in {root}")
        found = list(classes)
    loose, other = _list_images(root, subfolders="ignore")
    other.update({os.path.join(root, f): "an image beside the class folders, not in one" for f in loose})
    other.update({os.path.join(root, d): f"a folder left out ({'ignore' if d in ignore else 'classes'}=...)"
                  for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and d not in found})
    paths, labels = [], []
    for c in found:
        files, skipped = _list_images(os.path.join(root, c))
        other.update(skipped)
        paths += [os.path.join(root, c, f) for f in files]
        labels += [c] * len(files)
    if not paths:
        raise ValueError(f"no image files in the class folders of {root}")
    empty = [c for c in found if c not in set(labels)]
    if empty:
        raise ValueError(f"class folders without image files: {empty[:10]}")
    ids = [os.path.relpath(p, root) for p in paths]
    return ImageSet(paths, ids, labels, sorted(found), skipped=other)


def from_kaggle_names(root) -> ImageSet:
    """Labelled images whose file name starts with the label: ``cat.12.jpg``, ``dog.7.jpg``."""
    root = _require_dir(root)
    files, other = _list_images(root)
    if not files:
        raise ValueError(f"no image files in {root}")
    labels, bad = [], []
    for f in files:
        m = _KAGGLE_NAME.match(f)
        (labels.append(m.group("label")) if m else bad.append(f))
    if bad:
        raise ValueError(f"file names without a '<label>.<id>.<ext>' form in {root}: {bad[:5]}")
    order = sorted(range(len(files)), key=lambda i: (labels[i], _natural_key(files[i])))
    files = [files[i] for i in order]
    return ImageSet([os.path.join(root, f) for f in files], files, [labels[i] for i in order], skipped=other)


def from_csv(csv_path, root=None, path_column: str = "path", label_column: str = "label") -> ImageSet:
    """Images listed in a CSV with ``path`` and ``label`` columns (paths relative to ``root`` or the CSV)."""
    csv_path = os.fspath(csv_path)
    root = os.fspath(root) if root else os.path.dirname(os.path.abspath(csv_path))
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{csv_path} has no rows")
    for col in (path_column, label_column):
        if col not in rows[0]:
            raise ValueError(f"{csv_path} has no column {col!r} (columns: {list(rows[0])})")
    paths = [os.path.join(root, r[path_column]) for r in rows]
    # missing files keep their row: extraction reports them under the on_bad_image policy
    return ImageSet(paths, [r[path_column] for r in rows], [r[label_column] for r in rows])


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def from_test_folder(root) -> ImageSet:
    """Unlabelled images; ids are the file stems (``17.jpg`` -> 17), numeric ids sorted numerically.

    A folder that holds only class sub-folders is refused (read it with
    :func:`from_folder`, or :func:`from_class_folders_unlabelled` to ignore labels).
    """
    root = _require_dir(root)
    files, other = _list_images(root)
    if not files:
        subdirs = [os.path.basename(p) for p, r in other.items() if r.startswith("a sub-folder")]
        if subdirs:
            raise ValueError(f"{root} holds sub-folders ({', '.join(subdirs[:5])}{', ...' if len(subdirs) > 5 else ''}) "
                             "and no image files; pass one sub-folder, or the folder as labelled training data "
                             "(stacker.load_images), or stacker.predict(folder) to predict every image in them")
        raise ValueError(f"no image files in {root}" + (f" ({len(other)} other entries, e.g. "
                                                         f"{next(iter(other))}: {next(iter(other.values()))})"
                                                         if other else ""))
    files.sort(key=_natural_key)
    stems = [os.path.splitext(f)[0] for f in files]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise ValueError(f"{root}: several files share the id {dup[0]!r} "
                         f"({', '.join(f for f in files if os.path.splitext(f)[0] == dup[0])})")
    ids = [int(s) for s in stems] if all(s.isdigit() for s in stems) else stems
    order = sorted(range(len(files)), key=lambda i: ids[i])
    return ImageSet([os.path.join(root, files[i]) for i in order], [ids[i] for i in order], skipped=other)


def from_class_folders_unlabelled(root) -> ImageSet:
    """Every image in the class sub-folders of ``root``, labels ignored (ids: relative paths)."""
    data = from_folder(root)
    return ImageSet(data.paths, data.ids, skipped=data.skipped)


def load_images(source, labelled: bool = True) -> ImageSet:
    """An :class:`ImageSet` from a folder, a CSV file or an existing set, by what it holds.

    A CSV -> :func:`from_csv`; a folder with class sub-folders -> :func:`from_folder`;
    a folder of ``label.id.ext`` files -> :func:`from_kaggle_names`; otherwise (or with
    ``labelled=False``) an unlabelled :func:`from_test_folder`.
    """
    if isinstance(source, ImageSet):
        return source
    source = os.fspath(source)
    if os.path.isfile(source) and source.lower().endswith(".csv"):
        return from_csv(source)
    root = _require_dir(source)
    if not labelled:
        return from_test_folder(root)
    images, other = _list_images(root)
    if not images and any(r.startswith("a sub-folder") for r in other.values()):
        return from_folder(root)
    if images and all(_KAGGLE_NAME.match(f) for f in images):
        return from_kaggle_names(root)
    if not images:
        raise ValueError(f"{root} holds neither image files nor class folders")
    return from_test_folder(root)


# --------------------------------------------------------------------------- file checks


def file_fingerprints(paths, cache_dir=None) -> list[str]:
    """Content digest of each file (see :mod:`stacker.data.fingerprint`); raises if one cannot be read."""
    from stacker.data.fingerprint import fingerprints

    fps, bad = fingerprints(paths, cache_dir)
    if bad:
        row, reason = next(iter(sorted(bad.items())))
        raise BadImageError(f"{os.fspath(list(paths)[row])}: {reason}")
    return fps


_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF8", "GIF"), (b"BM", "BMP"))


def open_image(path: str):
    """``PIL.Image.open(path)``, asking the format its first bytes name first.

    Pillow otherwise tries its plugins in registration order, building a file object
    for each that might accept the file: that halved the cost of opening a JPEG
    (0.11 -> 0.06 ms), paid twice per image (header scan, decode). A file the named
    plugin refuses gets Pillow's full search, so what opens is unchanged.
    """
    from PIL import Image, UnidentifiedImageError

    with open(path, "rb") as fh:
        head = fh.read(12)
    fmt = next((f for magic, f in _MAGIC if head.startswith(magic)), None)
    if fmt is None and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        fmt = "WEBP"
    if fmt is not None:
        try:
            return Image.open(path, formats=[fmt])
        except UnidentifiedImageError:
            pass
    return Image.open(path)


def _size_problem(w: int, h: int) -> str | None:
    """Why an image of ``w`` x ``h`` pixels is not decoded (too many pixels, or none), or None."""
    if w * h > MAX_PIXELS:
        return f"{w}x{h} pixels exceeds the {MAX_PIXELS}-pixel limit (decompression bomb?)"
    if w == 0 or h == 0:
        return f"{w}x{h} pixels: no image data"
    return None


def _scan_one(path: str) -> tuple[int, str | None]:
    """(EXIF orientation, reason it is unusable or None) from the file header."""
    from PIL import Image, UnidentifiedImageError

    from stacker.data.fingerprint import probe

    _, reason = probe(path)  # never open a FIFO or a device
    if reason:
        return 1, reason
    try:
        with open_image(path) as im:
            problem = _size_problem(*im.size)
            if problem:
                return 1, problem
            orientation = int(im.getexif().get(0x0112, 1)) if im.format in ("JPEG", "MPO", "WEBP", "PNG") else 1
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
        with open_image(path) as im:
            im.load()
        return "the image data could not be decoded"
    except Exception as exc:  # noqa: BLE001
        return f"corrupt or truncated image data ({type(exc).__name__}: {exc})"


# --------------------------------------------------------------------------- the pipeline


def _decode(tf, contents):
    """Bytes -> uint8 RGB tensor; JPEGs with the accurate DCT, others via ``decode_image``."""
    return tf.cond(
        tf.io.is_jpeg(contents),
        lambda: tf.io.decode_jpeg(contents, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(contents, channels=3, dtype=tf.uint8, expand_animations=False),
    )


def _tf_decodes(tf, contents):
    """Whether TensorFlow decodes these bytes itself (JPEG, PNG, GIF, BMP, WebP magic numbers)."""
    head = tf.strings.substr(contents, 0, 4)
    return tf.reduce_any(tf.stack([
        tf.io.is_jpeg(contents), tf.equal(head, b"\x89PNG"), tf.equal(tf.strings.substr(contents, 0, 3), b"GIF"),
        tf.equal(tf.strings.substr(contents, 0, 2), b"BM"),
        tf.logical_and(tf.equal(head, b"RIFF"), tf.equal(tf.strings.substr(contents, 8, 4), b"WEBP"))]))


def _pil_decoded(tf, path):
    """Any other format (TIFF, PPM, ICO, TGA, SGI, ...): decoded by Pillow, upright, uint8 RGB."""
    def read(p):
        with open_image(p.decode()) as img:
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


RESIZE_METHODS = ("pil", "bilinear", "bicubic")


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


def _pil_pixels(path: str, size: int) -> np.ndarray:
    """Decode and resize with Pillow, exactly as the tutorials' ``Image.open().resize(BILINEAR)``."""
    return _pil_uint8(path, size).astype(np.float32)


def _pil_uint8(path: str, size: int) -> np.ndarray:
    """:func:`_pil_pixels` as uint8 (the same values, a quarter of the bytes to move)."""
    from PIL import Image

    return np.asarray(_upright_rgb(path).resize((size, size), Image.BILINEAR))


def _upright_rgb(path: str):
    """The file as an upright RGB Pillow image, decoded once for all of an ensemble's backbones.

    Every backbone of an ensemble reads the same files at its own size; the last decoded
    images (up to :data:`DECODED_BYTES`, keyed by path, size and modification time) are
    kept, so the others only resize. Predicting one image with four backbones decodes it
    once instead of four times.
    """
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    rgb = _DECODED.get(key)
    if rgb is None:
        with open_image(path) as img:
            problem = _size_problem(*img.size)  # the scan's limits: a decode may start before the scan ends
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
    default ``pil`` method resizes with Pillow instead (:func:`_pil_pixels`).
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

    def load(row, path, orientation):
        if method == "pil":
            image = tf.numpy_function(lambda p: _pil_pixels(p.decode(), size), [path], tf.float32, stateful=False)
            image.set_shape((size, size, 3))
            return row, image
        contents = tf.io.read_file(path)
        image = tf.cond(_tf_decodes(tf, contents),
                        lambda: _orient(tf, _decode(tf, contents), orientation),
                        lambda: _pil_decoded(tf, path))
        return row, resize_pixels(tf, image, size, method)

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.ignore_errors()
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def array_batches(images, size: int, batch_size: int = 32, method: str = "pil", converted: bool = False):
    """Yield float32 batches from in-memory images (NumPy arrays or PIL images), resized like files.

    ``converted``: the images already went through :func:`_as_rgb_array` (not scaled twice).
    """
    import tensorflow as tf
    from PIL import Image

    batch = []
    for img in images:
        arr = img if converted else _as_rgb_array(img)
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


def in_memory_list(images) -> list:
    """In-memory input as a list of single images.

    A PIL image, a 2-D array ``(h, w)`` and a 3-D array whose last axis has 1, 3 or 4
    channels are one image; other 3-D arrays are a stack of grey images ``(n, h, w)``;
    4-D arrays and lists are several images.
    """
    if hasattr(images, "convert") and not isinstance(images, (list, tuple, np.ndarray)):
        return [images]
    if isinstance(images, np.ndarray):
        if images.ndim == 2 or (images.ndim == 3 and images.shape[-1] in (1, 3, 4)):
            return [images]
        if images.ndim in (3, 4):
            return list(images)
        raise ValueError(f"an array of images must have 2 to 4 dimensions, got shape {images.shape}")
    return list(images)


def _as_rgb_array(img) -> np.ndarray:
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
    iterator is then consumed (or :meth:`close`\ d) in the caller's thread.
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
    ``pixel_batches(method="pil")`` (:func:`_pil_pixels`); a file that fails to decode is
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
