"""ImageNet top-k predictions of a pretrained backbone (no training involved).

"Classify a photo with a pretrained model and show its top-5 classes", offline: the
1000 class names ship with the package (``stacker/backbones/imagenet_classes.txt``).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np

from stacker.backbones import registry as _backbones
from stacker.data import decode as _decode
from stacker.data import scan as _scan
from stacker.data.inputs import in_memory_list
from stacker.data.sources import BadImageError

__all__ = ["TopK", "imagenet_classes", "imagenet_proba", "top_k"]


@functools.lru_cache(maxsize=1)
def imagenet_classes() -> tuple:
    """The 1000 ImageNet class names, index = class id."""
    path = os.path.join(os.path.dirname(__file__), "imagenet_classes.txt")
    with open(path) as f:
        names = tuple(line.rstrip("\n") for line in f if line.strip())
    if len(names) != 1000:
        raise RuntimeError(f"{path} holds {len(names)} class names, expected 1000")
    return names


@dataclass
class TopK:
    """Top-k ImageNet classes per image: ``ids`` and ``proba`` are ``(n, k)``, ``names`` n lists of k."""

    ids: np.ndarray
    names: list
    proba: np.ndarray

    def rows(self, i: int) -> list[tuple]:
        return list(zip(self.ids[i].tolist(), self.names[i], self.proba[i].tolist()))


@functools.lru_cache(maxsize=4)
def _classifier(backbone: str, weights, weights_dir):
    return _backbones.build(backbone, weights=weights, include_top=True, weights_dir=weights_dir)


def imagenet_proba(images, backbone: str = "efficientnet_lite0", weights="imagenet", weights_dir=None,
                   batch_size: int = 32) -> np.ndarray:
    """ImageNet softmax ``(n, 1000)`` for file paths or in-memory images."""
    model = _classifier(backbone, weights, weights_dir)
    size = int(model.input_shape[1])
    if isinstance(images, (str, os.PathLike)):
        images = [images]
    images = list(images) if isinstance(images, (list, tuple)) else in_memory_list(images)
    if images and isinstance(images[0], (str, os.PathLike)):
        paths = [os.fspath(p) for p in images]
        orientations, bad = _scan.scan_images(paths)
        if bad:
            row, reason = next(iter(bad.items()))
            raise BadImageError(f"{paths[row]}: {reason}")
        out = np.zeros((len(paths), 1000), dtype=np.float32)
        seen = np.zeros(len(paths), dtype=bool)
        for rows, pixels in _decode.pixel_batches(paths, size, batch_size, orientations):
            out[rows.numpy()] = model.predict_on_batch(pixels)
            seen[rows.numpy()] = True
        if not seen.all():
            first = paths[int(np.flatnonzero(~seen)[0])]
            raise BadImageError(f"{first}: {_scan.decode_failure_reason(first)}")
        return out
    batches = [model.predict_on_batch(b) for b in _decode.array_batches(images, size, batch_size)]
    return np.concatenate(batches) if batches else np.zeros((0, 1000), np.float32)


def top_k(images, backbone: str = "efficientnet_lite0", k: int = 5, weights="imagenet", weights_dir=None) -> TopK:
    """The ``k`` most probable ImageNet classes of each image.

    Parameters
    ----------
    images : path, list of paths or in-memory images
    backbone : str
        A registered backbone with an ImageNet top (e.g. ``efficientnet_lite0``).
    k : int

    Returns
    -------
    TopK
    """
    proba = imagenet_proba(images, backbone, weights, weights_dir)
    ids = np.argsort(-proba, axis=1, kind="stable")[:, :k]
    names = imagenet_classes()
    return TopK(ids, [[names[j] for j in row] for row in ids], np.take_along_axis(proba, ids, axis=1))
