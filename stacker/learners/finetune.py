"""Fine-tuned base learners: two-phase transfer learning on a cut-point cache.

The Keras guides fine-tune in two phases: train a new head on the frozen backbone,
then unfreeze the top blocks and train on with a small learning rate, BatchNorm
kept in inference mode. On a CPU the expensive part is the frozen bottom of the
network, and it gives the same activations every epoch. So stacker cuts the backbone
at the input of the first unfrozen block (:func:`split_backbone`), caches those
activations in HDF5 once (:class:`CutPointExtractor`, one forward pass of the bottom
per image and *view*), and trains only the top on them (:class:`FineTunedClassifier`).

What that costs: pixel-level random augmentation cannot pass through a frozen part
that is not run. Instead, each cached *view* (``"flip"``, ``"center_crop"``) is an
exact augmented copy of the input, and training picks one at random per image and
epoch; the same views serve test-time augmentation. ``mode="full"`` is the
alternative: every epoch runs the whole network on pixels through Keras random
augmentation layers (flip, zoom, rotation, contrast), several times slower.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import json
import re
import weakref

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import train_test_split
from sklearn.utils.validation import check_is_fitted

from stacker.backbones import registry as _backbones
from stacker.features.extractor import FeatureExtractor, tf_float32
from stacker.learners.base import Learner, extractor_kwargs, register_learner
from stacker.level2.combiners import _align, score
from stacker.learners.zoo import DenseClassifier, fit_scope, keras_fit
from stacker.io.persist import checked_params, load_keras, register_format, trusted
from stacker.learners.streaming import CachedRows

__all__ = ["CutPointExtractor", "FineTunedClassifier", "FineTunedLearner", "VIEWS", "split_backbone", "view_pixels",
           "DEFAULT_FINETUNE", "finetune_params"]

VIEWS = ("original", "flip", "center_crop")
AUGMENTATIONS = ("flip", "zoom", "rotation", "contrast", "translation")

# What `--finetune` means on a CPU: the last two blocks unfrozen, a few epochs, flip as the cached view.
# ``tta``: views averaged at prediction; ``train_views``: cached views drawn from in training;
# ``tta_meta``: "mean" (one probability block per learner) or "views" (one per view) for the
# meta-learner; ``cut_dtype``: storage of cut-point activations (float16 halves disk and memory).
DEFAULT_FINETUNE = {"blocks": 2, "epochs": 4, "learning_rate": 1e-5, "tta": ("original", "flip"),
                    "train_views": ("original", "flip"), "tta_meta": "mean", "cut_dtype": "float16"}


def finetune_params(spec) -> dict | None:
    """Normalise an ``Ensemble(finetune=...)`` value: None/False, True (CPU defaults) or a dict of overrides."""
    if spec is None or spec is False:
        return None
    params = dict(DEFAULT_FINETUNE)
    if spec is not True:
        if not isinstance(spec, dict):
            raise TypeError(f"finetune must be None, True or a dict of options, got {type(spec).__name__}")
        unknown = set(spec) - set(DEFAULT_FINETUNE) - set(FineTunedClassifier().get_params())
        if unknown:
            raise ValueError(f"unknown finetune options {sorted(unknown)}")
        params.update(spec)
    for key in ("tta", "train_views"):
        params[key] = tuple(params[key])
        bad = [v for v in params[key] if v not in VIEWS]
        if bad:
            raise ValueError(f"finetune {key} views must be among {VIEWS}, got {bad}")
    if params["tta_meta"] not in ("mean", "views"):
        raise ValueError(f"tta_meta must be 'mean' or 'views', got {params['tta_meta']!r}")
    if not params["tta"] or params["tta"][0] != "original":
        params["tta"] = ("original",) + tuple(v for v in params["tta"] if v != "original")
    return params


# --------------------------------------------------------------------------- cutting


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


# --------------------------------------------------------------------------- views


def view_pixels(pixels, view: str):
    """An exact, deterministic variant of a pixel batch (for cached augmentation and TTA)."""
    import tensorflow as tf

    if view == "original":
        return pixels
    if view == "flip":
        return tf.reverse(pixels, axis=[2])
    if view == "center_crop":
        size = int(pixels.shape[1])
        crop = int(round(size * 0.875))
        off = (size - crop) // 2
        crop_px = pixels[:, off : off + crop, off : off + crop, :]
        return tf.clip_by_value(tf.image.resize(crop_px, (size, size), method="bilinear", antialias=True), 0.0, 255.0)
    raise ValueError(f"unknown view {view!r}; use one of {VIEWS}")


@functools.lru_cache(maxsize=None)
def _cut_code_fingerprint() -> str:
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
                                    weights_dir=self.weights_dir)
        bottom, self._top, _ = split_backbone(full, self.blocks, self.cfg.block_pattern)
        return bottom

    def frozen_top(self):
        """The pretrained (not fine-tuned) layers above the cut: cut activations -> pooled features."""
        if getattr(self, "_top", None) is None:
            self._bottom = self._split()
        return self._top

    def frozen_pooled(self, X) -> np.ndarray:
        """Pooled features of the pretrained top over cached cut-point rows (phase 1's inputs)."""
        return _pooled(self.frozen_top(), X, self.cut_shape)

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
                "cut_code": _cut_code_fingerprint()}

    def _network_input(self, pixels):
        return view_pixels(tf_float32(pixels), self.view)

    def _network_output(self, out) -> np.ndarray:
        return out.reshape(len(out), -1)


# --------------------------------------------------------------------------- the learner


class _ViewBatches:
    """Training batches that draw one cached view per image per epoch (seeded; ``seed=None``: in order).

    Views may be :class:`~stacker.learners.streaming.CachedRows`: a batch is then read from the cache.
    """

    def __init__(self, views, Y, batch_size, shape, seed):
        import keras

        class _Seq(keras.utils.PyDataset):
            def __init__(inner):
                super().__init__()
                inner.rng = np.random.default_rng(seed)
                inner._shuffle()

            def _shuffle(inner):
                if seed is None:
                    inner.order, inner.pick = np.arange(len(Y)), np.zeros(len(Y), dtype=np.int64)
                    return
                inner.order = inner.rng.permutation(len(Y))
                inner.pick = inner.rng.integers(0, len(views), len(Y))

            def __len__(inner):
                return int(np.ceil(len(Y) / batch_size))

            def __getitem__(inner, i):
                rows = inner.order[i * batch_size : (i + 1) * batch_size]
                x = np.empty((len(rows),) + shape, dtype=np.float32)
                for v, V in enumerate(views):
                    sel = inner.pick[rows] == v
                    if sel.any():
                        x[sel] = np.asarray(V[rows[sel]]).reshape((-1,) + shape)
                return x, Y[rows]

            def on_epoch_end(inner):
                inner._shuffle()

        self.dataset = _Seq()


def _subset(V, rows):
    return V[rows] if isinstance(V, CachedRows) else np.asarray(V)[rows]


def _validation(X, Y, shape, batch_size):
    """Validation data: arrays in memory, or batches read from the cache when ``X`` streams."""
    if isinstance(X, CachedRows):
        return _ViewBatches([X], Y, batch_size, shape, None).dataset
    return X.reshape((-1,) + shape).astype(np.float32), Y


def _evaluate(model, val, batch_size: int) -> float:
    if isinstance(val, tuple):
        return model.evaluate(*val, verbose=0, batch_size=batch_size, return_dict=True)["loss"]
    return model.evaluate(val, verbose=0, return_dict=True)["loss"]


def _EpochTimer():  # noqa: N802 - a Keras callback factory (keras is imported lazily)
    import time

    import keras

    class EpochTimer(keras.callbacks.Callback):
        """Wall seconds of each training epoch, validation included (for reports and benchmarks)."""

        def __init__(self):
            super().__init__()
            self.seconds = []

        def on_epoch_begin(self, epoch, logs=None):
            self._t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self._t0)

    return EpochTimer()


@trusted
class FineTunedClassifier(ClassifierMixin, BaseEstimator):
    """A backbone's top blocks plus a softmax head, trained in two phases on cut-point activations.

    Phase 1 trains the head (:class:`~stacker.learners.base.DenseClassifier`) on the frozen
    top's pooled features; phase 2 unfreezes the top blocks (BatchNorm layers stay frozen
    and in inference mode) and trains head and blocks together with a small learning
    rate, EarlyStopping and ReduceLROnPlateau on the same stratified validation split.
    If phase 2 never beats phase 1 on validation loss, phase 1's weights are kept.

    Parameters
    ----------
    backbone : str
        Registered backbone.
    weights, input_size, weights_dir :
        As for :func:`stacker.backbones.build`.
    blocks : int
        Whole blocks to unfreeze, counted from the top.
    mode : {"cached", "full"}
        ``"cached"`` trains on cached cut-point activations (views as augmentation);
        ``"full"`` runs the whole network on pixels every epoch through random
        augmentation layers (needs ``paths`` in :meth:`fit`).
    augment : tuple of str
        Random augmentations of ``mode="full"``: any of ``flip``, ``zoom``, ``rotation``,
        ``contrast``, ``translation``.
    head_epochs, epochs : int
        Upper bounds on phase-1 and phase-2 epochs (early stopping ends sooner).
    head_learning_rate, learning_rate : float
        Adam learning rates of phase 1 and phase 2.
    batch_size : int
    label_smoothing : float
        Phase-2 label smoothing.
    patience : int
        Phase-2 epochs without validation improvement before stopping (best weights kept).
    validation_fraction : float
    dropout : float
        Dropout before the softmax.
    random_state : int
    verbose : int
    strategy : tf.distribute.Strategy, optional
        Build and train in its scope (MirroredStrategy: data-parallel over GPUs).

    Attributes
    ----------
    model_ : keras.Model
        Cut-point activations -> class probabilities.
    classes_ : ndarray
    cut_layer_ : str
    history_ : dict
        Per-epoch loss/accuracy (train and validation) of phase 1 then phase 2, and
        phase 2's ``epoch_seconds``; ``phase1_epochs`` tells where phase 2 starts.
    head_ : DenseClassifier
        The phase-1 head on frozen features (not saved; for comparisons).
    phase2_kept_ : bool
        Whether phase 2 improved on phase 1 and was kept.
    """

    def __init__(self, backbone="efficientnet_lite0", weights="imagenet", input_size=None, weights_dir=None,
                 blocks=2, mode="cached", augment=("flip", "zoom", "rotation", "contrast"), head_epochs=200,
                 epochs=4, head_learning_rate=1e-3, learning_rate=1e-5, batch_size=32, label_smoothing=0.0,
                 patience=2, validation_fraction=0.1, dropout=0.2, random_state=0, verbose=0, strategy=None):
        self.backbone = backbone
        self.weights = weights
        self.input_size = input_size
        self.weights_dir = weights_dir
        self.blocks = blocks
        self.mode = mode
        self.augment = augment
        self.head_epochs = head_epochs
        self.epochs = epochs
        self.head_learning_rate = head_learning_rate
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.label_smoothing = label_smoothing
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.dropout = dropout
        self.random_state = random_state
        self.verbose = verbose
        self.strategy = strategy

    # -- building ---------------------------------------------------------------------
    def _split(self, top=None, bottom=None):
        """Bottom (frozen) and a trainable copy of the top: from the given networks, else built afresh."""
        import keras

        if top is None or (self.mode == "full" and bottom is None):
            cfg = _backbones.get_cfg(self.backbone)
            full = _backbones.build(cfg.name, weights=self.weights, input_size=self.input_size,
                                    weights_dir=self.weights_dir)
            bottom, top, _ = split_backbone(full, int(self.blocks), cfg.block_pattern)
        copy_of_top = keras.models.clone_model(top)
        copy_of_top.set_weights(top.get_weights())
        set_finetune_trainable(copy_of_top)
        cut_layer = next(layer.name for layer in copy_of_top.layers if not isinstance(layer, keras.layers.InputLayer))
        return bottom, copy_of_top, cut_layer

    def _augmenter(self, seed):
        import keras
        from keras import layers

        unknown = set(self.augment) - set(AUGMENTATIONS)
        if unknown:
            raise ValueError(f"unknown augmentations {sorted(unknown)}; use {AUGMENTATIONS}")
        make = {"flip": lambda: layers.RandomFlip("horizontal", seed=seed),
                "zoom": lambda: layers.RandomZoom(0.1, seed=seed + 1),
                "rotation": lambda: layers.RandomRotation(0.05, seed=seed + 2),
                "contrast": lambda: layers.RandomContrast(0.1, value_range=(0, 255), seed=seed + 3),
                "translation": lambda: layers.RandomTranslation(0.1, 0.1, seed=seed + 4)}
        return keras.Sequential([make[a]() for a in self.augment], name="augmentation")

    # -- fitting ----------------------------------------------------------------------
    def fit(self, X, y, views=(), pooled=None, paths=None, orientations=None, top=None, bottom=None):
        """Two-phase fit.

        Parameters
        ----------
        X : ndarray (n, d)
            Flattened cut-point activations of the training images (original view).
        y : array (n,)
        views : sequence of ndarray (n, d)
            Extra cached views of the same rows, drawn at random as augmentation
            (``mode="cached"``).
        pooled : ndarray (n, feature_dim), optional
            The frozen top's pooled features of ``X`` if already computed (phase 1 then
            runs no CNN layer at all).
        paths, orientations : optional
            Image files of the rows (``mode="full"`` reads pixels from them).
        top, bottom : keras.Model, optional
            The pretrained networks above and below the cut (from
            :class:`CutPointExtractor`); ``top`` is copied, never changed. Without them
            the backbone is built from ``weights``.
        """
        import keras

        if self.mode not in ("cached", "full"):
            raise ValueError(f"mode must be 'cached' or 'full', got {self.mode!r}")
        X = X if isinstance(X, CachedRows) else np.asarray(X)
        y = np.asarray(y)
        if X.ndim != 2 or len(X) != len(y):
            raise ValueError(f"X must be (n, d) with one label per row; got {X.shape} and {y.shape}")
        if self.mode == "full" and paths is None:
            raise ValueError("mode='full' needs the image paths of the rows (fit(..., paths=...))")
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        k = len(self.classes_)
        if k < 2:
            raise ValueError("need at least two classes to train a classifier")
        keras.utils.set_random_seed(int(self.random_state))
        from stacker.features.engines import strategy_scope

        with strategy_scope(self.strategy):  # the top's copy, the head and the phase-2 model live in it
            return self._fit(X, y, y_idx, views, pooled, paths, orientations, top, bottom)

    def _fit(self, X, y, y_idx, views, pooled, paths, orientations, top, bottom):
        import keras

        k = len(self.classes_)
        bottom, top, self.cut_layer_ = self._split(top, bottom)
        shape = tuple(int(d) for d in top.input_shape[1:])
        if int(np.prod(shape)) != X.shape[1]:
            raise ValueError(f"X has {X.shape[1]} columns but the cut before {self.cut_layer_} gives {shape}")
        self.cut_shape_ = shape

        if np.bincount(y_idx).min() < 2:
            raise ValueError("fine-tuning needs at least 2 training images of every class (one for its "
                             "validation split); add images or lower cv")
        n_val = max(int(np.ceil(self.validation_fraction * len(X))), k)  # at least one per class
        tr, va = train_test_split(np.arange(len(X)), test_size=n_val, stratify=y_idx, random_state=self.random_state)
        if pooled is None:
            pooled = _pooled(top, X, shape)
        # phase 1: the head alone on frozen features, with the split phase 2 uses
        head = DenseClassifier(dropout=self.dropout, epochs=self.head_epochs,
                               learning_rate=self.head_learning_rate, validation_fraction=self.validation_fraction,
                               random_state=self.random_state, strategy=self.strategy).fit(pooled, y)
        self.head_ = copy.copy(head)
        self.head_.model_ = keras.models.clone_model(head.model_)
        self.head_.model_.set_weights(head.model_.get_weights())

        inputs = keras.Input(shape, name="cut")
        outputs = head.model_(top(inputs, training=False))
        model = keras.Model(inputs, outputs, name=f"{self.backbone}_finetuned")
        model.compile(optimizer=keras.optimizers.Adam(self.learning_rate),
                      loss=keras.losses.CategoricalCrossentropy(label_smoothing=self.label_smoothing),
                      metrics=["accuracy"])
        Y = keras.utils.to_categorical(y_idx, k).astype(np.float32)
        val = _validation(X[va], Y[va], shape, self.batch_size)
        before = _evaluate(model, val, self.batch_size)
        start = model.get_weights()
        callbacks = [keras.callbacks.EarlyStopping(monitor="val_loss", patience=self.patience,
                                                   restore_best_weights=True),
                     keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.2, patience=1, min_lr=1e-6)]
        timer = _EpochTimer()
        callbacks.append(timer)
        if self.mode == "cached":
            train = _ViewBatches([X[tr]] + [_subset(V, tr) for V in views], Y[tr], self.batch_size, shape,
                                 self.random_state).dataset
            hist = keras_fit(model, train, validation_data=val, epochs=self.epochs, callbacks=callbacks,
                             verbose=self.verbose)
        else:
            hist = self._fit_full(model, bottom, top, head, shape, paths, orientations, Y, tr, va, callbacks)
        phase2 = {key: [float(v) for v in vals] for key, vals in hist.history.items() if key != "learning_rate"}
        phase2["epoch_seconds"] = timer.seconds[: len(phase2.get("loss", []))]
        self.phase2_kept_ = bool(phase2.get("val_loss")) and min(phase2["val_loss"]) < before
        if not self.phase2_kept_:
            model.set_weights(start)
        self.model_ = model
        p1 = head.history_
        n1, n2 = len(p1.get("loss", [])), len(phase2.get("loss", []))
        # one list per metric over both phases, None where a phase did not measure it
        self.history_ = {key: p1.get(key, [None] * n1) + phase2.get(key, [None] * n2)
                         for key in sorted(set(p1) | set(phase2))}
        self.history_["phase1_epochs"] = n1
        return self

    def _fit_full(self, model, bottom, top, head, shape, paths, orientations, Y, tr, va, callbacks):
        """Phase 2 on pixels: augmentation -> frozen bottom -> top -> head, every epoch."""
        import keras
        import tensorflow as tf

        from stacker.data import images as _images

        size = int(bottom.input_shape[1])
        pixels_in = keras.Input((size, size, 3), name="pixels")
        x = self._augmenter(int(self.random_state))(pixels_in) if self.augment else pixels_in
        x = bottom(x, training=False)
        full = keras.Model(pixels_in, head.model_(top(x, training=False)), name=f"{self.backbone}_finetune_full")
        full.compile(optimizer=keras.optimizers.Adam(self.learning_rate),
                     loss=keras.losses.CategoricalCrossentropy(label_smoothing=self.label_smoothing),
                     metrics=["accuracy"])
        paths = np.asarray(paths, dtype=object)
        orientations = np.ones(len(paths), np.int32) if orientations is None else np.asarray(orientations)
        Yt = tf.constant(Y)

        def dataset(rows, shuffle):
            rows = np.random.default_rng(self.random_state).permutation(rows) if shuffle else rows
            ds = _images.pixel_batches(list(paths[rows]), size, self.batch_size, orientations[rows], rows=rows)
            ds = ds.map(lambda r, px: (px, tf.gather(Yt, r)))
            # the rows' images decoded before (their activations are cached), so the batch count is known
            ds = ds.apply(tf.data.experimental.assert_cardinality(-(-len(rows) // self.batch_size)))
            return ds.shuffle(64, seed=self.random_state, reshuffle_each_iteration=True) if shuffle else ds

        with fit_scope(full):  # the datasets too: made and used inside it
            return full.fit(dataset(tr, True), validation_data=dataset(va, False), epochs=self.epochs,
                            callbacks=callbacks, verbose=self.verbose, shuffle=False)

    # -- using ------------------------------------------------------------------------
    def _inputs(self, X):
        X = X if isinstance(X, CachedRows) else np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != int(np.prod(self.cut_shape_)):
            raise ValueError(f"expected flattened cut-point activations with {int(np.prod(self.cut_shape_))} "
                             f"columns, got shape {X.shape}")
        return X

    def predict_proba(self, X):
        check_is_fitted(self, "model_")
        X = self._inputs(X)
        proba = _batched(_on_rows(self.model_, self.cut_shape_), X)
        proba = proba.astype(np.float64)
        return proba / proba.sum(axis=1, keepdims=True)

    def predict(self, X):
        proba = self.predict_proba(X)  # first: it raises NotFittedError before fit
        return self.classes_[np.argmax(proba, axis=1)]

    def transform(self, X):
        """Pooled features of the fine-tuned network (its frozen outputs, for caches and meta-learners)."""
        import keras

        check_is_fitted(self, "model_")
        X = self._inputs(X)
        if getattr(self, "_features_model", None) is None:
            top = next(layer for layer in self.model_.layers if isinstance(layer, keras.Model))
            inputs = keras.Input(self.cut_shape_)
            self._features_model = keras.Model(inputs, top(inputs, training=False))
        return _batched(_on_rows(self._features_model, self.cut_shape_), X)

    # -- persistence ------------------------------------------------------------------
    def save(self, path_stem: str) -> list[str]:
        check_is_fitted(self, "model_")
        self.model_.save(path_stem + ".keras")
        params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.get_params().items()
                  if k != "strategy"}  # a run-time choice, not part of the model
        with open(path_stem + ".json", "w") as f:
            json.dump({"estimator": "FineTunedClassifier", "params": params, "classes": self.classes_.tolist(),
                       "history": self.history_, "cut_layer": self.cut_layer_, "cut_shape": list(self.cut_shape_),
                       "phase2_kept": self.phase2_kept_}, f, default=str)
        return [path_stem + ".keras", path_stem + ".json"]

    @classmethod
    def load(cls, path_stem: str, info: dict | None = None) -> "FineTunedClassifier":
        if info is None:
            with open(path_stem + ".json") as f:
                info = json.load(f)
        params = checked_params(cls, info, path_stem)
        params["augment"] = tuple(params.get("augment", ()))
        est = cls(**params)
        est.model_ = load_keras(path_stem + ".keras", _backbones.custom_objects())
        est.classes_ = np.array(info["classes"])
        est.history_ = info.get("history", {})
        est.cut_layer_ = info["cut_layer"]
        est.cut_shape_ = tuple(info["cut_shape"])
        est.phase2_kept_ = info.get("phase2_kept")
        return est


def _pooled(top, X, shape) -> np.ndarray:
    """Run a top network (cut activations -> pooled features) over flattened rows."""
    return _batched(_on_rows(top, shape), X)


_ROW_GRAPHS = weakref.WeakKeyDictionary()  # model -> its traced call on flattened rows


def _on_rows(model, shape):
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


def _batched(fn, X, batch: int = 64) -> np.ndarray:
    """Apply a model call (:func:`_on_rows`) to row chunks of ``X``: no per-model ``predict`` set-up.

    A :class:`~stacker.learners.streaming.CachedRows` ``X`` is read :data:`READ_ROWS` rows at a
    time, in order (not a ``windows()`` window: 8,192 rows of 9,408 activations are 460 MB
    as float32); the rows of a chunk are batched as those of an array would be.
    """
    if isinstance(X, CachedRows):
        out = None
        for s in range(0, len(X), READ_ROWS):
            part = _batched(fn, np.asarray(X[s : s + READ_ROWS], dtype=np.float32), batch)
            out = np.empty((len(X),) + part.shape[1:], part.dtype) if out is None else out
            out[s : s + len(part)] = part
        return out
    X = np.asarray(X)  # float32 a batch at a time: a float16 cache's whole matrix is never doubled
    return np.concatenate([np.asarray(fn(np.asarray(X[i : i + batch], dtype=np.float32)))
                           for i in range(0, len(X), batch)])


register_format("FineTunedClassifier", FineTunedClassifier)


@functools.lru_cache(maxsize=None)
def _finetune_code() -> str:
    """Hash of the fine-tuning code: a learner cache made by other training code is not reused.

    Computed once per process, from the code that is running (not from a file edited since).
    """
    parts = [FineTunedClassifier, _ViewBatches, _pooled, _on_rows, _batched, FineTunedLearner._fit_fold]
    return hashlib.sha256("".join(inspect.getsource(p) for p in parts).encode()).hexdigest()[:16]


class FineTunedLearner(Learner):
    """A fine-tuned network per fold on a backbone's cut-point cache (every cached view).

    Its cached inputs are the activations at the cut, one HDF5 entry per view; each fold's
    :class:`FineTunedClassifier` is fine-tuned on the other folds only, and its
    out-of-fold outputs are the TTA views' probabilities, the phase-1 head's
    probabilities and the fine-tuned network's pooled features.
    """

    kind = "finetuned"

    @classmethod
    def specs(cls, spec, models):
        ft = finetune_params(spec["finetune"])
        cfg = _backbones.get_cfg(spec["backbone"])
        if not cfg.block_pattern:
            raise ValueError(f"backbone {cfg.name} cannot be fine-tuned by blocks (no block_pattern registered); "
                             "fine-tune another backbone or give this one finetune=None in its spec")
        spec.pop("models", None)
        spec.pop("head", None)
        return [{**spec, "finetune": ft, "model": "finetune", "name": f"{spec['base']}:finetune"}]

    @classmethod
    def source_id(cls, spec):
        return (spec["base"], cls.kind, spec["finetune"]["blocks"], spec["finetune"]["cut_dtype"])

    @classmethod
    def make_source(cls, spec, settings, model=None, weights_id=None, saved=None):
        ft = spec["finetune"]
        return CutPointExtractor(spec["backbone"], blocks=ft["blocks"], feature_dtype=ft["cut_dtype"],
                                 **extractor_kwargs(spec, settings, model, weights_id, saved))

    def views(self) -> dict:
        ft = self.spec["finetune"]
        cache = self.__dict__.setdefault("_views", {})
        for v in dict.fromkeys(ft["tta"] + ft["train_views"]):
            if v not in cache:
                cache[v] = self.source if v == "original" else self.source.with_view(v)
        return dict(cache)

    def _key_extra(self) -> dict:
        return {**super()._key_extra(), "finetune": self.spec["finetune"], "finetune_code": _finetune_code()}

    def _prepare(self, inputs, y):
        return {"top": self.source.frozen_top(), "pooled": self.source.frozen_pooled(inputs["original"])}

    def _fit_fold(self, i, tr, va, inputs, y, k, data, state):
        from stacker.data import images as _images

        ft, st = self.spec["finetune"], self.settings
        params = {p: v for p, v in ft.items() if p in FineTunedClassifier().get_params()}
        est = FineTunedClassifier(**{**params, "backbone": self.source.cfg.name, "weights": self.spec["weights"],
                                     "input_size": self.source.size, "weights_dir": st.weights_dir,
                                     "random_state": st.random_state + i, "strategy": st.strategy,
                                     "verbose": 2 if st.verbose else 0})
        X = inputs["original"]
        extra = [inputs[v][tr] for v in ft["train_views"] if v != "original"]
        self._log(f"{self.name}: fine-tuning fold {i + 1} ({len(tr)} images, views {ft['train_views']})")
        paths = [data.paths[r] for r in tr]
        orient = _images.scan_images(paths)[0] if ft.get("mode") == "full" else None
        est.fit(X[tr], y[tr], views=extra, pooled=state["pooled"][tr], paths=paths, orientations=orient,
                top=state["top"], bottom=self.source.model)
        arrays = {f"oof_proba_{v}": _align(est, est.predict_proba(inputs[v][va]), k) for v in ft["tta"]}
        arrays["oof_proba"] = np.mean([arrays[f"oof_proba_{v}"] for v in ft["tta"]], axis=0)
        arrays["phase1_oof_proba"] = _align(est.head_, est.head_.predict_proba(state["pooled"][va]), k)
        arrays["oof_features"] = est.transform(X[va])
        return est, arrays

    def _meta_proba(self, per_view: dict, proba):
        ft = self.spec["finetune"]
        return np.concatenate([per_view[v] for v in ft["tta"]], axis=1) if ft["tta_meta"] == "views" else proba

    def meta_oof(self, inputs):
        per_view = {v: self.arrays_[f"oof_proba_{v}"] for v in self.spec["finetune"]["tta"]}
        return self._meta_proba(per_view, self.oof_proba_), self.arrays_["oof_features"]

    def extra_scores(self, y, k) -> dict:
        phase1 = score(y, self.arrays_["phase1_oof_proba"], k)
        return {**super().extra_scores(y, k), **{f"phase1_{m}": v for m, v in phase1.items()},
                "phase2_kept": sum(bool(getattr(est, "phase2_kept_", False)) for est in self.fold_models_),
                "views": list(self.spec["finetune"]["tta"])}

    def predict(self, inputs, paths=None, features=False):
        ft = self.spec["finetune"]
        per_view = {v: self._test_proba(inputs[v], paths, v) for v in ft["tta"]}
        proba = np.mean(list(per_view.values()), axis=0)
        X = inputs["original"]
        feats = (np.mean([est.transform(X) for est in self.fold_models_], axis=0) if features
                 else np.zeros((len(X), 0), np.float32))
        return proba, self._meta_proba(per_view, proba), feats

    def source_file(self) -> str:
        ft = self.spec["finetune"]
        return f"backbones/{self.spec['base'].replace('@', '_')}_bottom{ft['blocks']}.keras"


register_learner("finetuned", FineTunedLearner)
