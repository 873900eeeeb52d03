"""Where images come from: readers that turn folders and CSV files into an :class:`ImageSet`.

Sources: class sub-folders, Kaggle-style names (``cat.12.jpg``), a CSV of
``path,label``, and unlabelled Kaggle test folders (``17.jpg`` -> id 17). Nothing is
dropped silently: a folder reader gives every image file a row (by extension, see
:data:`stacker.data.formats.IMAGE_EXTENSIONS`; whether it decodes is the header scan's
question) and lists what it did not read (hidden files, documents, sub-folders of a
test folder) in :attr:`ImageSet.skipped`. Every reader takes a local path or a URL
(``s3://bucket/train``, a CSV at a URL, CSV rows that are URLs): :mod:`stacker.data.storage`
lists and opens both.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field

import numpy as np

from stacker.data import storage
from stacker.data.formats import IMAGE_EXTENSIONS

__all__ = [
    "BadImageError",
    "ImageSet",
    "SkippedImagesWarning",
    "check_labels",
    "file_fingerprints",
    "from_class_folders_unlabelled",
    "from_csv",
    "from_folder",
    "from_kaggle_names",
    "from_test_folder",
    "load_images",
]

_KAGGLE_NAME = re.compile(r"^(?P<label>[^.]+)\.(?P<id>[^.]+)\.[A-Za-z]+$")


class BadImageError(ValueError):
    """An image file cannot be used; the message names the file and the reason."""


class SkippedImagesWarning(UserWarning):
    """Files left out of training (``on_bad_image="skip"``); ``skipped`` maps each path to why."""

    def __init__(self, skipped: dict, shown: int = 10):
        self.skipped = dict(skipped)
        n = len(self.skipped)
        lines = [f"{n} {'file was' if n == 1 else 'files were'} not used for training:"]
        lines += [f"  {path}: {reason}" for path, reason in list(self.skipped.items())[:shown]]
        lines += [f"  and {n - shown} more"] if n > shown else []
        lines.append("the saved model's manifest.json (\"skipped\") and report.html list every one "
                     "(in Python: Ensemble.skipped_)")
        super().__init__("\n".join(lines))

    def __reduce__(self):  # copied or pickled (another process) from what it carries, not from its message
        return type(self), (self.skipped,)


def _label_key(label: str) -> str:
    """What two spellings of one label share: case and runs of spaces do not count."""
    return " ".join(label.split()).casefold()


def _some(rows, shown, lines, limit: int = 3) -> str:
    """``line 14 img/12.jpg, line 15 img/13.jpg, ...``: the first rows of a problem, by line when there are lines."""
    named = [f"line {lines[i]} {shown[i]}" if lines else str(shown[i]) for i in rows[:limit]]
    return ", ".join(named) + (", ..." if len(rows) > limit else "")


def _merged(labels: list) -> list:
    """Each label replaced by the most frequent spelling of its key (ties: the first in sorted order)."""
    counts: dict = {}
    for v in labels:
        counts[v] = counts.get(v, 0) + 1
    best: dict = {}
    for v in sorted(counts):
        k = _label_key(v)
        if k not in best or counts[v] > counts[best[k]]:
            best[k] = v
    return [best[_label_key(v)] for v in labels]


def check_labels(labels, shown, where: str = "", lines=None, merge: bool = False) -> list:
    """``labels``, refused when some are empty or differ only in case or spaces (or merged: ``merge``).

    Such labels are typing slips that would otherwise train as extra classes. ``shown``
    names each row in the message (a CSV's path column, a file), ``lines`` its CSV line.
    """
    noun = "rows" if lines else "images"
    empty = [i for i, v in enumerate(labels) if not v.strip()]
    if empty:
        n = len(empty)
        raise ValueError(f"{where}{n} {noun[:-1] if n == 1 else noun} {'has' if n == 1 else 'have'} an empty "
                         f"label ({_some(empty, shown, lines)}): label or remove {'it' if n == 1 else 'them'}")
    spellings: dict = {}
    for i, v in enumerate(labels):
        spellings.setdefault(_label_key(v), {}).setdefault(v, []).append(i)
    clashes = [group for group in spellings.values() if len(group) > 1]
    if not clashes:
        return list(labels)
    if merge:
        return _merged(list(labels))
    text = "; ".join(" and ".join(f"{v!r} ({len(rows)} {noun[:-1] if len(rows) == 1 else noun}: "
                                  f"{_some(rows, shown, lines)})" for v, rows in sorted(group.items()))
                     for group in clashes)
    raise ValueError(f"{where}labels that differ only in case or spaces: {text}; fix them or pass "
                     "merge_labels=True to merge them into the most frequent spelling")


@dataclass
class ImageSet:
    """Image files with optional labels: what every stacker step takes.

    Attributes
    ----------
    paths : list of str
        Image files: local paths or URLs (``file://`` URLs become local paths).
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
        self.paths = [storage.local_path(p) for p in self.paths]
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
        root = storage.common_folder(self.paths)
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
        """The images at ``rows``, in that order, with the same classes (so ``y`` keeps its meaning)."""
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


def _list_images(folder: str, subfolders: str = "skip", listed=None) -> tuple[list[str], dict]:
    """Image file names in ``folder`` (sorted) and ``{path: reason}`` for every other entry.

    ``subfolders="ignore"`` leaves sub-folders out of the listing (class folders are read
    separately by :func:`from_folder`). ``listed``: the folder's
    :func:`~stacker.data.storage.entries`, when the caller has them already.
    """
    names, other = [], {}
    for name, is_dir in storage.entries(folder) if listed is None else listed:
        path = storage.join(folder, name)
        if is_dir:
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
    root = storage.local_path(root)
    if not storage.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist"
                                + (" (no objects under that prefix)" if storage.is_url(root) else ""))
    return root


def from_folder(root, classes: list | None = None, ignore: tuple = ("BACKGROUND_Google",),
                merge_labels: bool = False) -> ImageSet:
    """Images in class sub-folders: ``root/<class>/<image>`` (Keras's ``image_dataset_from_directory`` layout).

    Files beside the class folders and non-image files inside them get no row and are
    listed in ``skipped``. Folder names that differ only in case or spaces are refused, or
    merged with ``merge_labels`` (see :func:`check_labels`).
    """
    root = _require_dir(root)
    listed = storage.entries(root)
    folders = [d for d, is_dir in listed if is_dir]
    found = sorted(d for d in folders if d not in ignore)
    if classes is not None:
        missing = sorted(set(classes) - set(found))
        if missing:
            raise ValueError(f"class folders {missing} are not in {root}")
        found = list(classes)
    loose, other = _list_images(root, subfolders="ignore", listed=listed)
    other.update({storage.join(root, f): "an image beside the class folders, not in one" for f in loose})
    other.update({storage.join(root, d): f"a folder left out ({'ignore' if d in ignore else 'classes'}=...)"
                  for d in folders if d not in found})
    paths, labels = [], []
    for c in found:
        folder = storage.join(root, c)
        files, skipped = _list_images(folder)
        other.update(skipped)
        paths += [storage.join(folder, f) for f in files]
        labels += [c] * len(files)
    if not paths:
        raise ValueError(f"no image files in the class folders of {root}")
    empty = [c for c in found if c not in set(labels)]
    if empty:
        raise ValueError(f"class folders without image files: {empty[:10]}")
    ids = [storage.relpath(p, root) for p in paths]
    labels = check_labels(labels, ids, f"{root}: ", merge=merge_labels)
    return ImageSet(paths, ids, labels, sorted(set(labels)), skipped=other)


def from_kaggle_names(root, merge_labels: bool = False) -> ImageSet:
    """Labelled images whose file name starts with the label: ``cat.12.jpg``, ``dog.7.jpg``.

    ``Cat.1.jpg`` beside ``cat.2.jpg`` is refused, or merged with ``merge_labels`` (see :func:`check_labels`).
    """
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
    labels = check_labels(labels, files, f"{root}: ", merge=merge_labels)
    order = sorted(range(len(files)), key=lambda i: (labels[i], _natural_key(files[i])))
    files = [files[i] for i in order]
    return ImageSet([storage.join(root, f) for f in files], files, [labels[i] for i in order], skipped=other)


def from_csv(csv_path, root=None, path_column: str = "path", label_column: str = "label",
             merge_labels: bool = False) -> ImageSet:
    """Images listed in a CSV with ``path`` and ``label`` columns (paths relative to ``root`` or the CSV).

    The CSV, ``root`` and each row's path may be local or URLs; a row that is a URL or
    an absolute path is read where it points. Empty labels, and labels that differ only
    in case or spaces, are refused with their line numbers; ``merge_labels`` merges the
    latter (see :func:`check_labels`).
    """
    csv_path = storage.local_path(csv_path)
    root = storage.local_path(root) if root else storage.dirname(csv_path)
    with storage.open_file(csv_path, "r", newline="") as f:
        reader = csv.DictReader(f)
        rows, lines = [], []
        for row in reader:
            rows.append(row)
            lines.append(reader.line_num)
    if not rows:
        raise ValueError(f"{csv_path} has no rows")
    for col in (path_column, label_column):
        if col not in rows[0]:
            raise ValueError(f"{csv_path} has no column {col!r} (columns: {list(rows[0])})")
    paths = [storage.resolve(root, r[path_column]) for r in rows]
    ids = [r[path_column] for r in rows]
    labels = check_labels([r[label_column] or "" for r in rows], ids, f"{csv_path}: ", lines, merge_labels)
    # missing files keep their row: extraction reports them under the on_bad_image policy
    return ImageSet(paths, ids, labels)


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
    return ImageSet([storage.join(root, files[i]) for i in order], [ids[i] for i in order], skipped=other)


def from_class_folders_unlabelled(root) -> ImageSet:
    """Every image in the class sub-folders of ``root``, labels ignored (ids: relative paths)."""
    data = from_folder(root)
    return ImageSet(data.paths, data.ids, skipped=data.skipped)


def load_images(source, labelled: bool = True, merge_labels: bool = False) -> ImageSet:
    """An :class:`ImageSet` from a folder, a CSV file or an existing set, by what it holds.

    A CSV -> :func:`from_csv`; a folder with class sub-folders -> :func:`from_folder`;
    a folder of ``label.id.ext`` files -> :func:`from_kaggle_names`; otherwise (or with
    ``labelled=False``) an unlabelled :func:`from_test_folder`. Labels that differ only
    in case or spaces are refused, or merged into the most frequent spelling with
    ``merge_labels``; empty labels are always refused.
    """
    if isinstance(source, ImageSet):
        if not (merge_labels and source.labels is not None):
            return source
        labels = check_labels(source.labels, source.paths, merge=True)
        return ImageSet(source.paths, source.ids, labels, skipped=source.skipped)
    source = storage.local_path(source)
    if source.lower().endswith(".csv") and storage.isfile(source):
        return from_csv(source, merge_labels=merge_labels)
    root = _require_dir(source)
    if not labelled:
        return from_test_folder(root)
    images, other = _list_images(root)
    if not images and any(r.startswith("a sub-folder") for r in other.values()):
        return from_folder(root, merge_labels=merge_labels)
    if images and all(_KAGGLE_NAME.match(f) for f in images):
        return from_kaggle_names(root, merge_labels=merge_labels)
    if not images:
        raise ValueError(f"{root} holds neither image files nor class folders")
    return from_test_folder(root)


def file_fingerprints(paths, cache_dir=None) -> list[str]:
    """Content digest of each file (see :mod:`stacker.data.fingerprint`); raises if one cannot be read."""
    from stacker.data.fingerprint import fingerprints

    fps, bad = fingerprints(paths, cache_dir)
    if bad:
        row, reason = next(iter(sorted(bad.items())))
        raise BadImageError(f"{os.fspath(list(paths)[row])}: {reason}")
    return fps
