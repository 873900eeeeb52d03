"""Views: exact, deterministic variants of each image (its mirror, a centre crop), each cached apart.

A view is applied to the decoded pixel batch before the network (:func:`view_pixels`),
so its features are computed once per image like any others and found again by the
image's bytes. Two learners read views:

- the fine-tuned kind caches cut-point activations per view, for training and TTA
  (:class:`stacker.features.cutpoint.CutPointExtractor`);
- the frozen kind can train on a backbone's pooled features of every view and average its
  probabilities over them (``"efficientnet_lite0@260+flip"``): :meth:`FeatureExtractor.with_view
  <stacker.features.extractor.FeatureExtractor.with_view>` gives a :class:`ViewExtractor`
  that shares the backbone's network and settings and keys its cache rows on the view.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import threading

import numpy as np

from stacker.features.extractor import FeatureExtractor

__all__ = ["VIEWS", "view_pixels", "ViewExtractor", "view_code", "check_views"]

VIEWS = ("original", "flip", "center_crop")


def check_views(views, what: str = "views") -> tuple:
    """``views`` as a tuple of known view names, ``"original"`` first and each once; a clear error otherwise."""
    if isinstance(views, str):
        views = (views,)
    views = tuple(views)
    bad = [v for v in views if v not in VIEWS]
    if bad or not views:
        raise ValueError(f"{what} must be among {VIEWS}, got {list(views) if views else 'none'}")
    return ("original",) + tuple(v for v in dict.fromkeys(views) if v != "original")


def view_pixels(pixels, view: str):
    """An exact, deterministic variant of a pixel batch (for cached augmentation and TTA)."""
    if view == "original":
        return pixels
    if view == "flip":
        if isinstance(pixels, np.ndarray):  # no TensorFlow import on the ONNX Runtime path
            return np.ascontiguousarray(pixels[:, :, ::-1, :])
        import tensorflow as tf

        return tf.reverse(pixels, axis=[2])
    if view == "center_crop":
        import tensorflow as tf

        size = int(pixels.shape[1])
        crop = int(round(size * 0.875))
        off = (size - crop) // 2
        crop_px = pixels[:, off : off + crop, off : off + crop, :]
        return tf.clip_by_value(tf.image.resize(crop_px, (size, size), method="bilinear", antialias=True), 0.0, 255.0)
    raise ValueError(f"unknown view {view!r}; use one of {VIEWS}")


@functools.lru_cache(maxsize=None)
def view_code() -> str:
    """Hash of the code that turns pixels into a view (part of a view's cache key)."""
    parts = [view_pixels, ViewExtractor._network_input]
    return hashlib.sha256("".join(inspect.getsource(p) for p in parts).encode()).hexdigest()[:16]


class ViewExtractor(FeatureExtractor):
    """Pooled features of one view of each image, through the cache: a backbone's extractor with a view.

    It shares ``base``'s network (built once, one ONNX session), weights identity and
    settings; its rows are cached under ``base``'s key plus the view.
    """

    def __init__(self, base: FeatureExtractor, view: str):
        if view not in VIEWS or view == "original":
            raise ValueError(f"view must be one of {VIEWS[1:]}, got {view!r}")
        self.__dict__.update(base.__dict__)
        self._lock = threading.RLock()
        self.base, self.view = base, view  # base: None in another process (a Ray worker builds its own network)

    @property
    def model(self):
        return self.base.model if self.base is not None else super().model

    @property
    def weights_id(self) -> str:
        if self.base is not None:
            self._weights_id = self.base.weights_id
        return super().weights_id

    @property
    def feature_dim(self) -> int:
        return self.base.feature_dim if self.base is not None else super().feature_dim

    def _network(self):
        return self.base._network() if self.base is not None else super()._network()

    def onnx_graph(self) -> bytes:
        return self.base.onnx_graph() if self.base is not None else super().onnx_graph()

    @property
    def label(self) -> str:
        return f"{self.cfg.name} ({self.view})"

    def key_meta(self) -> dict:
        return {**super().key_meta(), "view": self.view, "view_code": view_code()}

    def _network_input(self, pixels):
        return view_pixels(super()._network_input(pixels), self.view)
