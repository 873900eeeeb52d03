"""One-line prediction from a saved ensemble: ``stacker.predict(images, model=DIR)``."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .ensemble import MANIFEST, Ensemble
from .images import ImageSet, from_test_folder

__all__ = ["Prediction", "load", "predict"]

_LOADED: dict = {}  # (directory, manifest mtime, cache_dir) -> Ensemble: the second call skips loading


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
    """

    classes: list
    proba: np.ndarray
    labels: list
    skipped: dict
    ids: list

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
    ens = _LOADED.get(key)
    if ens is None:
        ens = Ensemble.load(directory, trusted=trusted, cache_dir=cache_dir, verbose=0)
        _LOADED[key] = ens
    return ens


def predict(images, model, cache_dir=None, on_bad_image="raise", batch_size=None, trusted=None) -> Prediction:
    """Predict classes of images with a saved ensemble.

    Parameters
    ----------
    images : path, list of paths, folder, ndarray or list of PIL images
        A single path or array is one image; a folder means every image in it
        (ids sorted as :func:`stacker.images.from_test_folder` sorts them).
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

    Returns
    -------
    Prediction
    """
    ens = load(model, cache_dir=cache_dir, trusted=trusted)
    ens.on_bad_image = on_bad_image
    for learner in ens.learners_.values():
        for ext in learner.views().values():
            ext.on_bad_image = on_bad_image
            if batch_size:
                ext.batch_size = int(batch_size)
    if isinstance(images, (str, os.PathLike)) and os.path.isdir(images):
        images = from_test_folder(images)
    elif isinstance(images, (str, os.PathLike)) and os.path.isfile(images):
        images = [os.fspath(images)]
    elif isinstance(images, np.ndarray) and images.ndim == 3:
        images = [images]
    elif not isinstance(images, (str, os.PathLike, np.ndarray, list, tuple)) and hasattr(images, "convert"):
        images = [images]  # one PIL image
    if isinstance(images, ImageSet):
        ids = list(images.ids)
    elif isinstance(images, (list, tuple)) and images and isinstance(images[0], (str, os.PathLike)):
        ids = [os.fspath(p) for p in images]
    else:
        ids = list(range(len(images)))
    proba = ens.predict_proba(images)
    ok = ~np.isnan(proba).any(axis=1)
    labels = [ens.classes_[int(i)] if good else None for i, good in zip(np.nan_to_num(proba).argmax(1), ok)]
    return Prediction(list(ens.classes_), proba, labels, dict(getattr(ens, "last_skipped_", {})), ids)
