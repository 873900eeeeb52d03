"""One-line prediction from a saved ensemble: ``stacker.predict(images, model=DIR)``."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import numpy as np

from stacker.ensemble import Ensemble
from stacker.features.device import use as use_device
from stacker.features.config import check_option
from stacker.io.model_dir import MANIFEST
from stacker.data.inputs import as_images
from stacker.data.sources import ImageSet

__all__ = ["Prediction", "load", "predict"]

# (directory, manifest mtime, cache_dir, trusted) -> Ensemble: the second call skips loading.
# One lock per key: concurrent first calls load once; a loaded ensemble is never mutated
# by predict (per-call options are passed down), so callers share it safely.
_LOADED: dict = {}
_LOCKS: dict = {}
_LOCKS_GUARD = threading.Lock()


@dataclass
class Prediction:
    """What :func:`predict` returns.

    Attributes
    ----------
    classes : list of str
        Class names, the columns of ``proba``.
    proba : ndarray, shape (n, n_classes)
        Probabilities, rows in input order (NaN rows for skipped images).
    labels : list
        Predicted class name per image (None where skipped).
    skipped : dict
        Row -> reason for images that could not be used (``on_bad_image="skip"``).
    ids : list
        Kaggle ids for a folder (``17.jpg`` -> 17), paths for a list of paths, row
        numbers for in-memory images.
    unread : dict
        Path -> reason for entries of a folder that got no row (hidden files,
        documents, sub-folders): listed so that nothing disappears silently.
    """

    classes: list
    proba: np.ndarray
    labels: list
    skipped: dict
    ids: list
    unread: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.proba)

    def table(self) -> list[dict]:
        """One dict per image: predicted label and its probability."""
        out = []
        for i, label in enumerate(self.labels):
            p = None if label is None else float(self.proba[i, self.classes.index(label)])
            out.append({"row": i, "label": label, "probability": p})
        return out


def load(model, cache_dir=None, trusted=None) -> Ensemble:
    """Load (once per process) the ensemble saved in directory ``model``.

    ``trusted`` lists extra type names the model's files may need (see :meth:`Ensemble.load`).
    """
    directory = os.path.abspath(os.fspath(model))
    key = (directory, os.path.getmtime(os.path.join(directory, MANIFEST))
           if os.path.exists(os.path.join(directory, MANIFEST)) else None, cache_dir, tuple(trusted or ()))
    with _LOCKS_GUARD:
        lock = _LOCKS.setdefault(key, threading.Lock())
    with lock:
        ens = _LOADED.get(key)
        if ens is None:
            ens = Ensemble.load(directory, trusted=trusted, cache_dir=cache_dir, verbose=0)
            _LOADED[key] = ens
    return ens


def predict(images, model, cache_dir=None, on_bad_image="raise", batch_size=None, trusted=None,
            min_proba=None, device="auto") -> Prediction:
    """Predict classes of images with a saved ensemble.

    Parameters
    ----------
    images : path, list of paths, folder, ndarray, PIL image or list of them
        A single path, PIL image or array (``(h, w)``, ``(h, w, 1|3|4)``) is one
        image; ``(n, h, w[, c])`` arrays and lists are several. A folder means every
        image in it (ids sorted as :func:`stacker.data.sources.from_test_folder` sorts
        them); a folder of class sub-folders means every image in those (labels
        ignored, ids are relative paths); a CSV file the images of its ``path``
        column (:func:`stacker.data.inputs.as_images` reads them all). Arrays are
        pixels: uint8, uint16, or floats in [0, 255]; floats in [0, 1] are scaled by
        255 with a warning.
    model : path
        Directory written by :meth:`Ensemble.save`.
    cache_dir : path, optional
        Feature cache to reuse between calls on the same files.
    on_bad_image : {"raise", "skip"}
    batch_size : int, optional
    trusted : list of str, optional
        Fully qualified type names to rebuild besides stacker's own (your estimator
        classes); files needing any other type are refused, so loading a model from
        someone else runs none of its code.
    min_proba : float, optional
        Every probability at least this, rows still summing to 1 (default: the model's,
        ``1e-6`` unless it was saved with another; ``0``: the raw probabilities).
    device : {"auto", "cpu", "gpu"}
        Where the forward passes run (:mod:`stacker.features.device`); ``"gpu"`` without
        a usable GPU raises before any work.

    Returns
    -------
    Prediction
    """
    check_option("on_bad_image", on_bad_image)
    use_device(device)
    data = as_images(images)
    ens = load(model, cache_dir=cache_dir, trusted=trusted)
    proba, skipped = ens.predict_with_skipped(data, on_bad_image=on_bad_image,
                                              batch_size=int(batch_size) if batch_size else None,
                                              min_proba=min_proba)
    ok = ~np.isnan(proba).any(axis=1)
    labels = [ens.classes_[int(i)] if good else None for i, good in zip(np.nan_to_num(proba).argmax(1), ok)]
    unread = dict(data.skipped) if isinstance(data, ImageSet) else {}
    return Prediction(list(ens.classes_), proba, labels, skipped, _ids(images, data), unread)


def _ids(images, data) -> list:
    """The ids a :class:`Prediction` reports: the set's own, the paths of a list of paths, rows of arrays."""
    if not isinstance(data, ImageSet):
        return list(range(len(data)))
    return list(data.ids) if isinstance(images, (ImageSet, str, os.PathLike)) else list(data.paths)
