"""Content fingerprints of image files: what every cache keys on.

An image's identity is the BLAKE2b-160 digest of its bytes, so the same file under
another path, name, mount or machine hits the cache and one changed byte misses it.
BLAKE2b is in the standard library (no dependency), faster than SHA-256 on CPUs
without SHA instructions, and cryptographic: a content-addressed cache must never
serve one image's features for another, even for a file crafted to collide (xxHash
would be faster still, and is not collision resistant).

Reading every byte on every run would cost more than it saves, so a stat memo maps
``(path, device, inode, size, mtime, ctime)`` to the digest: in memory for the
process, and in ``fingerprints.sqlite`` inside a cache folder across runs. A file
touched or rewritten gets a new ctime, is read again, and keeps its digest when its
bytes did not change. An object at a URL (:mod:`stacker.data.storage`) is memoised
by ``(url, 0, 0, size, 0, version)``, its version a hash of its ETag (or generation,
or modification time): one listing per folder tells a warm run that nothing changed,
and the same bytes at a URL and on a local disk share one digest.

:func:`probe` also gives the true reason a path cannot be an image (missing, a
dangling link, a link loop, a FIFO, a device, a directory, empty) without opening
anything that could block.
"""

from __future__ import annotations

import errno
import hashlib
import os
import sqlite3
import stat
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing

from stacker.data import storage

__all__ = ["HASH", "MEMO_FILE", "probe", "fingerprints"]

HASH = "blake2b-160"
MEMO_FILE = "fingerprints.sqlite"
_CHUNK = 1 << 20

_memo: dict = {}  # stat key -> digest, for this process
_stored: dict = {}  # memo file -> stat keys known to be in it (so a warm call reads no SQLite)
_memo_lock = threading.Lock()


def probe(path: str):
    """``(os.stat_result, None)`` for a non-empty regular file, else ``(None, reason)``.

    For a URL: ``(storage.ObjectStat, None)`` for a non-empty object, else ``(None, reason)``.
    """
    if storage.is_url(path):
        return _object(_checked_stat(path))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return None, f"dangling symbolic link (its target {os.readlink(path)!r} does not exist)"
        return None, "file not found"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return None, "symbolic link loop"
        return None, f"cannot read it ({e.strerror or e})"
    kinds = ((stat.S_ISDIR, "a directory, not an image file"), (stat.S_ISFIFO, "a named pipe (FIFO), not a file"),
             (stat.S_ISCHR, "a character device, not a file"), (stat.S_ISBLK, "a block device, not a file"),
             (stat.S_ISSOCK, "a socket, not a file"))
    for test, reason in kinds:
        if test(st.st_mode):
            return None, reason
    if not stat.S_ISREG(st.st_mode):
        return None, "not a regular file"
    if st.st_size == 0:
        return None, "empty file (0 bytes)"
    return st, None


def _checked_stat(url: str):
    try:
        return storage.stat(url)
    except OSError as exc:
        return exc


def _object(found):
    """``(ObjectStat, None)`` for a non-empty object, else ``(None, reason)``, from :func:`storage.stat`'s result."""
    if isinstance(found, FileNotFoundError):
        return None, "file not found"
    if isinstance(found, IsADirectoryError):
        return None, "a directory, not an image file"
    if isinstance(found, OSError):
        return None, f"cannot read it ({found.strerror or found})"
    if found.st_size == 0:
        return None, "empty file (0 bytes)"
    return found, None


def _digest(path: str) -> str:
    h = hashlib.blake2b(digest_size=20)
    if storage.is_url(path):
        h.update(storage.read_bytes(path))  # one request: images are small
        return h.hexdigest()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _stat_key(path: str, st) -> tuple:
    if isinstance(st, storage.ObjectStat):
        return (path, 0, 0, st.st_size, 0, st.version)
    return (os.path.abspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class _DiskMemo:
    """The stat memo of one cache folder (SQLite: safe for several processes)."""

    def __init__(self, cache_dir: str):
        self.path = os.path.join(cache_dir, MEMO_FILE)

    def _connect(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        con = sqlite3.connect(self.path, timeout=60)
        con.execute("CREATE TABLE IF NOT EXISTS memo (path TEXT PRIMARY KEY, dev INTEGER, ino INTEGER, "
                    "size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER, digest TEXT)")
        return con

    def get(self, keys: list) -> dict:
        found = {}
        with closing(self._connect()) as con, con:
            for i in range(0, len(keys), 500):
                part = {k[0]: k for k in keys[i : i + 500]}
                marks = ",".join("?" * len(part))
                for row in con.execute(f"SELECT path, dev, ino, size, mtime_ns, ctime_ns, digest FROM memo "
                                       f"WHERE path IN ({marks})", list(part)):
                    key = tuple(row[:6])
                    if part.get(row[0]) == key:
                        found[key] = row[6]
        return found

    def put(self, items: dict) -> None:
        if not items:
            return
        with closing(self._connect()) as con, con:
            con.executemany("INSERT OR REPLACE INTO memo VALUES (?, ?, ?, ?, ?, ?, ?)",
                            [(*k, d) for k, d in items.items()])


def fingerprints(paths, cache_dir=None, workers: int = 8) -> tuple[list, dict]:
    """Content digest per path (None where unusable) and ``{row: reason}`` for unusable paths.

    Unchanged files are not read again (the stat memo); new or changed ones are hashed
    in threads (hashlib releases the GIL; objects at URLs are fetched in them).
    """
    paths = [storage.local_path(p) for p in paths]
    out: list = [None] * len(paths)
    bad, keys = {}, {}
    urls = [i for i, p in enumerate(paths) if storage.is_url(p)]
    objects = dict(zip(urls, storage.stats([paths[i] for i in urls]))) if urls else {}
    for i, p in enumerate(paths):
        st, reason = _object(objects[i]) if i in objects else probe(p)
        if reason:
            bad[i] = reason
        else:
            keys[i] = _stat_key(p, st)
    unique = list(dict.fromkeys(keys.values()))
    with _memo_lock:
        digests = {k: _memo[k] for k in unique if k in _memo}
    disk = _DiskMemo(cache_dir) if cache_dir else None
    unstored = []  # keys this process has not yet seen in this cache's memo
    if disk:
        with _memo_lock:
            stored = _stored.setdefault(disk.path, set())
            unstored = [k for k in unique if k not in stored]
        try:
            on_disk = disk.get(unstored) if unstored else {}
        except (sqlite3.Error, OSError) as e:  # a read-only or damaged memo: hash instead, never fail
            warnings.warn(f"fingerprint memo {disk.path} not usable ({e}); hashing the files", stacklevel=2)
            disk, on_disk = None, {}
        digests.update(on_disk)
        unstored = [k for k in unstored if k not in on_disk]
        with _memo_lock:
            stored.update(on_disk)
    missing = [k for k in unique if k not in digests]
    failed = {}
    if missing:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_safe_digest, [k[0] for k in missing]))
        digests.update({k: d for k, (d, _) in zip(missing, results) if d})
        failed = {k: reason for k, (d, reason) in zip(missing, results) if not d}
    if disk and unstored:  # new digests, and ones this process knew but this cache's memo did not
        new = {k: digests[k] for k in unstored if k in digests}
        try:
            disk.put(new)
            with _memo_lock:
                stored.update(new)
        except (sqlite3.Error, OSError) as e:
            warnings.warn(f"fingerprint memo {disk.path} not writable ({e})", stacklevel=2)
    with _memo_lock:
        if len(_memo) > 2_000_000:  # bound the process memo; the disk memo keeps the rest
            _memo.clear()
            _stored.clear()
        _memo.update(digests)
    for i, k in keys.items():
        if k in failed:
            bad[i] = failed[k]
        else:
            out[i] = digests[k]
    return out, bad


def _safe_digest(path: str):
    try:
        return _digest(path), None
    except OSError as e:  # removed or unreadable between stat and read
        return None, f"cannot read it ({e.strerror or e})"
