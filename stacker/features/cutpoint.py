"""Cut-point activations: a backbone cut before its top blocks, and its cached outputs per view.

Fine-tuning on a CPU spends its time in the frozen bottom of the network, which gives
the same activations every epoch. So the backbone is cut at the input of the first
unfrozen block (:func:`split_backbone`), the bottom's activations are cached in HDF5
once per image and *view* (:class:`CutPointExtractor`; a view is an exact augmented
copy of the input, :func:`view_pixels`), and a top is run over cached rows by
:func:`pooled_rows` / :func:`on_rows`. The fine-tuned learner trains only the top
(:mod:`stacker.learners.finetune`).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import re
import weakref

import numpy as np

from stacker.backbones import registry as _backbones
from stacker.features.extractor import FeatureExtractor, tf_float32
from stacker.features.rows import CachedRows
from stacker.features.views import VIEWS, view_pixels

__all__ = ["VIEWS", "CutPointExtractor", "split_backbone", "set_finetune_trainable", "view_pixels", "pooled_rows",
           "on_rows", "batched_rows", "cut_code_fingerprint", "READ_ROWS"]


def _inner_network(model):
    """The bare network inside a :func:`stacker.backbones.build` wrapper (or the model itself)."""
    import keras

    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    return nested[-1] if nested else model


def split_backbone(model, blocks: int, block_pattern: str):
    """Cut a built backbone before its last ``blocks`` blocks.

    Parameters
    ----------
    model : keras.Model
        From :func:`stacker.backbones.build` (pixels in [0, 255] -> pooled features).
    blocks : int
        How many whole blocks, counted from the top, go above the cut. Layers after the
        last block (e.g. EfficientNet's ``top_conv``) are always above it.
    block_pattern : str
        Regular expression whose first group is a layer's block id.

    Returns
    -------
    bottom : keras.Model
        Pixels -> activations at the cut (frozen, run once per image and view).
    top : keras.Model
        Activations at the cut -> pooled features. Shares its layers with ``model``.
    cut_layer : str
        Name of the first layer above the cut.
    """
    import keras

    if not block_pattern:
        raise ValueError(f"backbone {model.name!r} has no block structure registered (block_pattern), "
                         "so it cannot be fine-tuned by blocks")
    net = _inner_network(model)
    regex = re.compile(block_pattern)
    ids: list[str] = []
    first: dict = {}
    for layer in net.layers:
        m = regex.match(layer.name)
        if m and m.group(1) not in first:
            ids.append(m.group(1))
            first[m.group(1)] = layer
    if not isinstance(blocks, (int, np.integer)) or not 1 <= blocks <= len(ids):
        raise ValueError(f"blocks must be an integer between 1 and {len(ids)} for {model.name}, got {blocks!r}")
    cut_layer = first[ids[-int(blocks)]]
    cut = cut_layer.input
    if isinstance(cut, (list, tuple)):
        raise ValueError(f"cannot cut {model.name} before {cut_layer.name}: that layer has several inputs")
    try:
        top = keras.Model(cut, net.output, name=f"{model.name}_top{blocks}")
    except ValueError as exc:
        raise ValueError(f"cannot cut {model.name} before block {ids[-int(blocks)]}: layers above the cut "
                         f"use tensors from below it ({exc})") from exc
    bottom_net = keras.Model(net.input, cut, name=f"{model.name}_bottom{blocks}")
    inputs = keras.Input(model.input_shape[1:], name="pixels")
    x = inputs
    for layer in model.layers[1:]:
        if layer is net:
            break
        x = layer(x)  # the preprocessing layer(s) in front of the network
    bottom = keras.Model(inputs, bottom_net(x, training=False), name=f"{model.name}_bottom{blocks}_pixels")
    bottom.trainable = False
    return bottom, top, cut_layer.name


def set_finetune_trainable(top) -> None:
    """Unfreeze every layer above the cut except BatchNorm (kept in inference mode with its statistics)."""
    import keras

    top.trainable = True
    for layer in top.layers:  # each layer explicitly: clones keep their source's trainable=False
        layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)


@functools.lru_cache(maxsize=None)
def cut_code_fingerprint() -> str:
    """Hash of the code that decides cut-point values (split, views), on top of the feature code's."""
    parts = [split_backbone, _inner_network, view_pixels, CutPointExtractor._network_input,
             CutPointExtractor._network_output]
    return hashlib.sha256("".join(inspect.getsource(p) for p in parts).encode()).hexdigest()[:16]


class CutPointExtractor(FeatureExtractor):
    """Activations at a backbone's cut point (flattened rows), cached like pooled features.

    Parameters
    ----------
    backbone, weights, input_size, ... :
        As for :class:`stacker.features.extractor.FeatureExtractor`.
    blocks : int
        Blocks above the cut (see :func:`split_backbone`).
    view : str
        One of :data:`VIEWS`; applied to the pixels before the network.
    """

    def __init__(self, backbone, blocks=1, view="original", **kwargs):
        if view not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
        self.blocks = int(blocks)
        self.view = view
        bottom = kwargs.pop("model", None)
        super().__init__(backbone, **kwargs)
        self._bottom = bottom

    def _split(self):
        from stacker.features.engines import strategy_scope

        with strategy_scope(self.strategy):
            full = _backbones.build(self.cfg.name, weights=self.weights, input_size=self.size,
                                    weights_dir=self.weights_dir, cache_dir=self.cache_dir)
        bottom, self._top, _ = split_backbone(full, self.blocks, self.cfg.block_pattern)
        return bottom

    def frozen_top(self):
        """The pretrained (not fine-tuned) layers above the cut: cut activations -> pooled features."""
        if getattr(self, "_top", None) is None:
            self._bottom = self._split()
        return self._top

    def frozen_pooled(self, X) -> np.ndarray:
        """Pooled features of the pretrained top over cached cut-point rows (phase 1's inputs)."""
        return pooled_rows(self.frozen_top(), X, self.cut_shape)

    @property
    def model(self):
        if self._bottom is None:
            self._bottom = self._saved.keras() if self._saved is not None else self._split()
        return self._bottom

    def with_view(self, view: str) -> "CutPointExtractor":
        """The same extractor (shared network) for another view."""
        self.model  # build once here: a copy that built its own could differ (random init) and costs time
        self.weights_id
        other = copy.copy(self)
        other.view = view
        other._forward = self._saved.forward(self.engine) if self._saved is not None else None
        if view not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
        return other

    @property
    def cut_shape(self) -> tuple:
        return tuple(int(d) for d in self.model.output_shape[1:])

    def row_dim(self) -> int:
        return int(np.prod(self.cut_shape))

    def key_meta(self) -> dict:
        return {**super().key_meta(), "output": "cut-activations", "blocks": self.blocks, "view": self.view,
                "cut_code": cut_code_fingerprint()}

    def _network_input(self, pixels):
        return view_pixels(tf_float32(super()._network_input(pixels)), self.view)

    def _network_output(self, out) -> np.ndarray:
        return out.reshape(len(out), -1)


def pooled_rows(top, X, shape) -> np.ndarray:
    """Run a top network (cut activations -> pooled features) over flattened rows."""
    return batched_rows(on_rows(top, shape), X)


_ROW_GRAPHS = weakref.WeakKeyDictionary()  # model -> its traced call on flattened rows


def on_rows(model, shape):
    """``model`` on flattened cut-point rows as a traced graph, built once per model.

    Not an eager call: called eagerly, a Keras model keeps every intermediate activation
    of the batch until the call returns and the allocator keeps the pages (about 4 MB per
    row for EfficientNet-Lite0's top two blocks, so ~1 GB at 256 rows, and growing with
    the number of rows). A graph frees each intermediate once it is consumed. The
    signature leaves the batch size open (one trace per model, not per shape); the graph
    holds the model weakly, so a fold model that is dropped is freed with its graph.
    """
    import tensorflow as tf

    fn = _ROW_GRAPHS.get(model)
    if fn is None:
        ref, shape = weakref.ref(model), tuple(int(d) for d in shape)

        @tf.function(input_signature=[tf.TensorSpec((None, int(np.prod(shape))), tf.float32)])
        def fn(rows):
            return ref()(tf.reshape(rows, (-1,) + shape), training=False)

        _ROW_GRAPHS[model] = fn
    return fn


READ_ROWS = 256  # cut-point rows read from the cache at a time: 256 x 9,408 float32 is 10 MB


def batched_rows(fn, X, batch: int = 64) -> np.ndarray:
    """Apply a model call (:func:`on_rows`) to row chunks of ``X``: no per-model ``predict`` set-up.

    A :class:`~stacker.features.rows.CachedRows` ``X`` is read :data:`READ_ROWS` rows at a
    time, in order (not a ``windows()`` window: 8,192 rows of 9,408 activations are 460 MB
    as float32); the rows of a chunk are batched as those of an array would be.
    """
    if isinstance(X, CachedRows):
        out = None
        for s in range(0, len(X), READ_ROWS):
            part = batched_rows(fn, np.asarray(X[s : s + READ_ROWS], dtype=np.float32), batch)
            out = np.empty((len(X),) + part.shape[1:], part.dtype) if out is None else out
            out[s : s + len(part)] = part
        return out
    X = np.asarray(X)  # float32 a batch at a time: a float16 cache's whole matrix is never doubled
    return np.concatenate([np.asarray(fn(np.asarray(X[i : i + batch], dtype=np.float32)))
                           for i in range(0, len(X), batch)])
