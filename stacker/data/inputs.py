"""What a user passes as images, made into what stacker reads: checked pixel arrays or an ImageSet.

``Ensemble.fit`` / ``predict`` / ``evaluate``, :func:`stacker.predict` and the command
line take the same things: in-memory images (a NumPy array, a PIL image, or a list of
them), a path (a folder, a CSV file of ``path,label`` rows, one image file), a list of
paths, or an :class:`~stacker.data.sources.ImageSet`. :func:`as_images` is the one place
that tells them apart and checks them, so every entry point reads them alike. Paths
may be URLs (``s3://bucket/test``, see :mod:`stacker.data.storage`).
"""

from __future__ import annotations

import os

import numpy as np

from stacker.data import storage
from stacker.data.decode import rgb_array
from stacker.data.sources import ImageSet, from_class_folders_unlabelled, from_csv, from_test_folder, load_images

__all__ = ["Arrays", "as_images", "expand_paths", "in_memory_list", "is_in_memory"]

_EMPTY = "no images to predict (an empty list)"


class Arrays(list):
    """In-memory images checked by :func:`~stacker.data.decode.rgb_array`: float32 ``(h, w, 3)`` in 0..255.

    A type of its own so that :func:`as_images` passes it on unchanged: converting
    again would scale a dark image (pixels in [0, 1]) by 255 a second time.
    """


def is_in_memory(images) -> bool:
    """Whether ``images`` are pixels (an array, a PIL image, a non-empty list of them), not paths or a set."""
    if isinstance(images, np.ndarray) or (hasattr(images, "convert") and not isinstance(images, (list, tuple))):
        return True
    if isinstance(images, (list, tuple)) and images:
        return not isinstance(images[0], (str, os.PathLike))
    return False


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


def as_images(images, labelled: bool = False) -> Arrays | ImageSet:
    """In-memory images as checked :class:`Arrays`; files as an :class:`ImageSet`.

    Parameters
    ----------
    images : ImageSet, path, list of paths, ndarray, PIL image or list of them
        A PIL image or a ``(h, w)`` / ``(h, w, 1|3|4)`` array is one image;
        ``(n, h, w[, c])`` arrays and lists are several (:func:`in_memory_list`). A
        folder means every image in it (Kaggle ids), or in its class sub-folders
        (labels ignored, ids are relative paths); a CSV file its ``path,label`` rows;
        any other path one image file (a missing one is reported by extraction under
        ``on_bad_image``). A list of paths gets its row numbers as ids (it may name a
        file twice).
    labelled : bool
        Read a path for its labels (:func:`~stacker.data.sources.load_images`: class
        folders, ``label.id.ext`` names or a CSV); in-memory images, having none, are
        refused.

    Raises
    ------
    ValueError
        For no images at all, or an array that is not pixels (see ``rgb_array``).
    """
    if isinstance(images, (ImageSet, Arrays)):
        return images
    if is_in_memory(images):
        if labelled:
            raise ValueError("in-memory images carry no labels: pass an ImageSet, a folder of class folders "
                             "or a CSV file of path,label rows")
        arrays = Arrays(rgb_array(a) for a in in_memory_list(images))  # checked once, here
        if not arrays:
            raise ValueError(_EMPTY)
        return arrays
    if isinstance(images, (str, os.PathLike)):
        return load_images(images, labelled=True) if labelled else _from_path(os.fspath(images))
    paths = [os.fspath(p) for p in images]
    if not paths:
        raise ValueError(_EMPTY)
    return ImageSet(paths, list(range(len(paths))))


def _from_path(path: str) -> ImageSet:
    """The images one path or URL names, labels ignored: a folder, a CSV file, or one image file."""
    path = storage.local_path(path)
    if storage.isdir(path):
        entries = [is_dir for name, is_dir in storage.entries(path) if not name.startswith(".")]
        subdirs_only = entries and all(entries)
        return from_class_folders_unlabelled(path) if subdirs_only else from_test_folder(path)
    if path.lower().endswith(".csv") and storage.isfile(path):
        return from_csv(path)
    return ImageSet([path], [path])  # a file, or a missing path that extraction reports


def expand_paths(items) -> tuple[list[str], dict]:
    """Image paths from several paths (files, folders, CSV files) and ``{path: reason}`` for entries given no row.

    What the command line takes: each argument is read as :func:`as_images` reads one
    path; paths that do not exist stay in the list, for prediction to report them
    under ``on_bad_image``.
    """
    paths, unread = [], {}
    for item in items:
        data = _from_path(os.fspath(item))
        paths += data.paths
        unread.update(data.skipped)
    return paths, unread
