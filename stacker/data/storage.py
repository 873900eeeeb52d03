"""Where image files live: local paths through ``os``, URLs through fsspec; the one module that knows URLs.

An image source may be a local path or a URL: ``s3://bucket/train``,
``gs://bucket/test/17.jpg``, ``az://container/labels.csv`` -- any scheme an installed
`fsspec <https://filesystem-spec.readthedocs.io>`_ backend reads (``s3fs``, ``gcsfs``,
``adlfs``: the ``s3``, ``gcs`` and ``azure`` extras). ``file://`` URLs are local paths
(:func:`local_path`). Local paths take the very ``os`` calls they took before URLs were
read; every function here tells the two apart with :func:`is_url`, so the readers,
fingerprints, header scan and decoder call one function for both.

Credentials and endpoints come from the backend's own configuration (for S3: the
``AWS_*`` environment variables, ``~/.aws``, an instance role; fsspec's
``FSSPEC_<PROTOCOL>_<OPTION>`` variables and config files), never from stacker's files.

Object stores have no folders: a "folder" is a key prefix, listed with its objects and
sub-prefixes, and a prefix without objects does not exist. Listings and object details
are read afresh on every call (fsspec's listing cache would otherwise miss objects
written since the last listing). :func:`stats` gives each object's size and a version
(its ETag, generation or modification time) for the fingerprint memo, from one listing
per folder when many objects share it.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

__all__ = ["BACKENDS", "ObjectStat", "common_folder", "dirname", "entries", "filesystem", "isdir", "isfile",
           "is_url", "join", "local_path", "open_file", "read_bytes", "relpath", "resolve", "stat", "stats"]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")  # two letters at least: "C://" is a Windows drive

# URL scheme -> (the fsspec backend's package, stacker's extra that installs it)
BACKENDS = {
    "s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"),
    "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs"),
    "az": ("adlfs", "azure"), "abfs": ("adlfs", "azure"), "abfss": ("adlfs", "azure"), "adl": ("adlfs", "azure"),
}

# Fields of an object's details that change when its bytes do (first found wins), and its modification time.
_VERSION_FIELDS = ("ETag", "etag", "generation", "md5Hash", "content_md5")
_TIME_FIELDS = ("LastModified", "last_modified", "mtime", "updated", "modified")
_LISTED = 32  # objects of one folder asked at once: list the folder instead of asking each


def _scheme(path: str) -> str | None:
    m = _SCHEME.match(path)
    return m.group(1).lower() if m else None


def is_url(path) -> bool:
    """Whether ``path`` is a URL read through fsspec (any scheme but ``file://``, which is a local path)."""
    return isinstance(path, str) and "://" in path and _scheme(path) not in (None, "file")


def local_path(path) -> str:
    """A ``file://`` URL as the local path it names; any other path or URL unchanged."""
    path = os.fspath(path)
    if not (path[:5].lower() == "file:" and _scheme(path) == "file"):
        return path
    from urllib.parse import unquote, urlsplit
    from urllib.request import url2pathname

    parts = urlsplit(path)
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"{path!r} names a file on another host ({parts.netloc}); use a local path or a mount")
    return url2pathname(unquote(parts.path))


def filesystem(url: str):
    """``(fsspec filesystem, path inside it)`` for ``url``; a missing backend names the pip extra to install."""
    import fsspec

    scheme = _scheme(url)
    try:
        fs = fsspec.filesystem(scheme)
    except ImportError as exc:
        package, extra = BACKENDS.get(scheme, (None, None))
        if extra:
            raise ImportError(f"reading {scheme}:// URLs ({url}) needs {package}: "
                              f"pip install 'stacker[{extra}]'") from None
        raise ImportError(f"reading {scheme}:// URLs ({url}) needs fsspec's backend for {scheme!r}: {exc}") from None
    except ValueError:
        known = ", ".join(f"{s}:// (pip install 'stacker[{extra}]')" for s, (_, extra) in BACKENDS.items()
                          if s in ("s3", "gs", "az"))
        raise ValueError(f"unknown URL scheme {scheme}:// in {url!r}: stacker reads local paths, file:// URLs, "
                         f"{known}, and the URLs of any other installed fsspec backend") from None
    return fs, fs._strip_protocol(url).rstrip("/")


def _split(url: str) -> tuple[str, str]:
    """``("s3://", "bucket/key")``: the scheme as written and the rest."""
    scheme = _SCHEME.match(url).group(0)
    return scheme, url[len(scheme):]


def join(root: str, name: str) -> str:
    """``name`` inside folder ``root`` (``os.path.join`` for local folders)."""
    if not is_url(root):
        return os.path.join(root, name)
    return f"{root.rstrip('/')}/{name}"


def resolve(root: str, path: str) -> str:
    """A path read from a file in ``root`` (a CSV row): URLs and absolute paths as they are, others inside ``root``."""
    if is_url(path):
        return path
    path = local_path(path)
    return join(root, path) if not os.path.isabs(path) else path


def relpath(path: str, root: str) -> str:
    """``path`` relative to folder ``root`` (``os.path.relpath`` for local paths)."""
    if not is_url(path):
        return os.path.relpath(path, root)
    prefix = root.rstrip("/") + "/"
    return path[len(prefix):] if path.startswith(prefix) else path


def dirname(path: str) -> str:
    """The folder that holds ``path`` (an absolute local path; a URL's prefix up to its last ``/``)."""
    if not is_url(path):
        return os.path.dirname(os.path.abspath(path))
    scheme, rest = _split(path.rstrip("/"))
    return scheme + rest.rpartition("/")[0] if "/" in rest else scheme + rest


def common_folder(paths) -> str | None:
    """The deepest folder holding every path (None when they share none: other drives, stores or schemes)."""
    paths = list(paths)
    if not paths:
        return None
    urls = [p for p in paths if is_url(p)]
    if not urls:
        try:
            return os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
        except ValueError:  # paths on different drives
            return None
    schemes = {_split(p)[0] for p in urls}
    if len(urls) != len(paths) or len(schemes) != 1:
        return None
    folders = [_split(dirname(p))[1] for p in urls]
    common = posixpath.commonpath(folders) if all(folders) else ""
    return schemes.pop() + common if common else None


def isdir(path: str) -> bool:
    """Whether ``path`` is a folder (for a URL: a bucket, or a prefix that some object starts with)."""
    if not is_url(path):
        return os.path.isdir(path)
    fs, inner = filesystem(path)
    fs.invalidate_cache(inner)
    return bool(inner) and fs.isdir(inner)


def isfile(path: str) -> bool:
    """Whether ``path`` is a file (an object, for a URL)."""
    if not is_url(path):
        return os.path.isfile(path)
    fs, inner = filesystem(path)
    fs.invalidate_cache(inner)
    return fs.isfile(inner)


def entries(folder: str) -> list[tuple[str, bool]]:
    """``(name, is a folder)`` for everything in ``folder``, sorted by name (local: ``os.listdir``, ``os.path.isdir``).

    Raises FileNotFoundError when the folder (for a URL: any object under its prefix) does not exist.
    """
    if not is_url(folder):
        return [(name, os.path.isdir(os.path.join(folder, name))) for name in sorted(os.listdir(folder))]
    fs, inner = filesystem(folder)
    fs.invalidate_cache(inner)
    try:
        listed = fs.ls(inner, detail=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"image folder {folder!r} does not exist (no objects under that prefix)") from None
    found: dict = {}  # an object and a prefix may share a name: then it is a folder
    for e in listed:
        name = e["name"].rstrip("/")
        if name != inner:  # a zero-byte "folder marker" object lists as the folder itself
            base = name.rpartition("/")[2]
            found[base] = found.get(base, False) or e["type"] == "directory"
    return sorted(found.items())


def open_file(path: str, mode: str = "rb", **kwargs):
    """``open(path, mode, **kwargs)`` for a local path, fsspec's file object for a URL (text modes take ``newline``)."""
    if not is_url(path):
        return open(path, mode, **kwargs)
    fs, inner = filesystem(path)
    return fs.open(inner, mode, **kwargs)


def read_bytes(path: str) -> bytes:
    """Every byte of a file (one request for an object)."""
    if not is_url(path):
        with open(path, "rb") as f:
            return f.read()
    fs, inner = filesystem(path)
    return fs.cat_file(inner)


@dataclass(frozen=True)
class ObjectStat:
    """What the fingerprint memo and the decoder's memo need of an object.

    Attributes
    ----------
    st_size : int
        Bytes (named as ``os.stat_result``'s, which the header scan also reads).
    version : int
        A signed 64-bit hash of what changes with the object's bytes: its ETag (or
        generation, MD5) and otherwise its modification time. A store that gives
        neither gets a new random version on every call, so such objects are always
        read again, never served from a stale memo.
    """

    st_size: int
    version: int


def _normal(value):
    """A detail's value in a form that a listing and a single object's details share (datetimes differ in zone)."""
    if hasattr(value, "timestamp"):
        return round(value.timestamp() * 1e6)
    return str(value)


def _object_stat(info: dict) -> ObjectStat:
    if info.get("type") == "directory":
        raise IsADirectoryError(f"{info.get('name')} is a folder")
    tag = next(((k, _normal(info[k])) for k in _VERSION_FIELDS if info.get(k) not in (None, "")), None)
    if tag is None:
        tag = next(((k, _normal(info[k])) for k in _TIME_FIELDS if info.get(k) not in (None, "")), None)
    data = repr(tag).encode() if tag is not None else os.urandom(16)
    version = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big", signed=True)
    return ObjectStat(int(info.get("size") or 0), version)


def stat(url: str) -> ObjectStat:
    """Size and version of the object at ``url`` (read afresh).

    Raises FileNotFoundError (no such object), IsADirectoryError (a prefix, not an
    object) or another OSError (no permission, ...).
    """
    fs, inner = filesystem(url)
    fs.invalidate_cache(inner)
    return _object_stat(fs.info(inner))


def _checked(call, *args):
    try:
        return call(*args)
    except OSError as exc:
        return exc


def stats(urls, workers: int = 16) -> list:
    """:func:`stat` of each URL, an OSError in its place where it fails (never raised).

    Objects of a folder asked for many at once (:data:`_LISTED` or more) come from one
    listing of that folder, not one request each; the others are asked in ``workers``
    threads.
    """
    urls = list(urls)
    out: list = [None] * len(urls)
    folders: dict = {}
    for i, url in enumerate(urls):
        folders.setdefault(dirname(url), []).append(i)
    single = []
    for folder, rows in folders.items():
        if len(rows) < _LISTED:
            single += rows
            continue
        fs, inner = filesystem(folder)
        fs.invalidate_cache(inner)
        try:
            listed = {e["name"].rstrip("/"): e for e in fs.ls(inner, detail=True)}
        except FileNotFoundError:
            listed = {}
        for i in rows:
            info = listed.get(filesystem(urls[i])[1])
            if info is None:
                single.append(i)  # not listed: asked alone, for its own error
            else:
                out[i] = _checked(_object_stat, info)
    if single:
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(single)))) as pool:
            for i, result in zip(single, pool.map(lambda i: _checked(stat, urls[i]), single)):
                out[i] = result
    return out
