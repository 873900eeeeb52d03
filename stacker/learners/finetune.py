"""The fine-tuned network: a backbone's top blocks and a head, trained in two phases on cut-point rows.

The Keras guides fine-tune in two phases: train a new head on the frozen backbone,
then unfreeze the top blocks and train on with a small learning rate, BatchNorm
kept in inference mode. On a CPU the expensive part is the frozen bottom of the
network, and it gives the same activations every epoch. So stacker cuts the backbone
at the input of the first unfrozen block, caches those activations in HDF5 once
(:mod:`stacker.features.cutpoint`: one forward pass of the bottom per image and *view*),
and trains only the top on them (:class:`FineTunedClassifier`, this module). The learner
kind that bags it over folds is :mod:`stacker.learners.finetuned`.

What that costs: pixel-level random augmentation cannot pass through a frozen part
that is not run. Instead, each cached *view* (``"flip"``, ``"center_crop"``) is an
exact augmented copy of the input, and training picks one at random per image and
epoch; the same views serve test-time augmentation. ``mode="full"`` is the
alternative: every epoch runs the whole network on pixels through Keras random
augmentation layers (flip, zoom, rotation, contrast), several times slower.
"""

from __future__ import annotations

import copy
import json

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import train_test_split
from sklearn.utils.validation import _check_sample_weight, check_is_fitted

from stacker.backbones import registry as _backbones
from stacker.features.cutpoint import batched_rows, on_rows, pooled_rows, set_finetune_trainable, split_backbone
from stacker.features.rows import CachedRows
from stacker.io.persist import checked_params, load_keras, register_format, trusted
from stacker.learners.dense import DenseClassifier
from stacker.learners.keras_fit import fit_scope, keras_fit

__all__ = ["FineTunedClassifier", "AUGMENTATIONS"]

AUGMENTATIONS = ("flip", "zoom", "rotation", "contrast", "translation")


# --------------------------------------------------------------------------- cutting


# --------------------------------------------------------------------------- views


# --------------------------------------------------------------------------- the learner


class _ViewBatches:
    """Training batches that draw one cached view per image per epoch (seeded; ``seed=None``: in order).

    Views may be :class:`~stacker.features.rows.CachedRows`: a batch is then read from the cache.
    """

    def __init__(self, views, Y, batch_size, shape, seed, weights=None):
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
                return (x, Y[rows]) if weights is None else (x, Y[rows], weights[rows])

            def on_epoch_end(inner):
                inner._shuffle()

        self.dataset = _Seq()


def _subset(V, rows):
    return V[rows] if isinstance(V, CachedRows) else np.asarray(V)[rows]


def _clone(model, policy=None):
    """A copy of ``model``'s layers (weights not copied), every layer in dtype ``policy`` when one is given."""
    import keras

    if policy is None:
        return keras.models.clone_model(model)

    def clone(layer):
        config = layer.get_config()
        if not isinstance(layer, keras.layers.InputLayer):
            config["dtype"] = policy
        return layer.__class__.from_config(config)

    return keras.models.clone_model(model, clone_function=clone)


def _validation(X, Y, shape, batch_size, weights=None):
    """Validation data (with each row's weight when given): arrays in memory, or batches read from the cache."""
    if isinstance(X, CachedRows):
        return _ViewBatches([X], Y, batch_size, shape, None, weights).dataset
    x = X.reshape((-1,) + shape).astype(np.float32)
    return (x, Y) if weights is None else (x, Y, weights)


def _evaluate(model, val, batch_size: int) -> float:
    if isinstance(val, tuple):
        x, Y, *w = val
        return model.evaluate(x, Y, sample_weight=w[0] if w else None, verbose=0, batch_size=batch_size,
                              return_dict=True)["loss"]
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

    Phase 1 trains the head (:class:`~stacker.learners.dense.DenseClassifier`) on the frozen
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
    mixed_precision : bool
        Run the unfrozen top in float16 with float32 weights and a loss-scaled optimizer
        (Keras's ``mixed_float16``): about twice the speed on GPUs with tensor cores, no
        gain on a CPU. The head and its softmax stay float32. ``Ensemble(finetune=...)``
        turns it on where the device has tensor cores (:mod:`stacker.features.device`).

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
                 patience=2, validation_fraction=0.1, dropout=0.2, random_state=0, verbose=0, strategy=None,
                 mixed_precision=False):
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
        self.mixed_precision = mixed_precision

    # -- building ---------------------------------------------------------------------
    def _split(self, top=None, bottom=None):
        """Bottom (frozen) and a trainable copy of the top: from the given networks, else built afresh."""
        import keras

        if top is None or (self.mode == "full" and bottom is None):
            cfg = _backbones.get_cfg(self.backbone)
            full = _backbones.build(cfg.name, weights=self.weights, input_size=self.input_size,
                                    weights_dir=self.weights_dir)
            bottom, top, _ = split_backbone(full, int(self.blocks), cfg.block_pattern)
        copy_of_top = _clone(top, "mixed_float16" if self.mixed_precision else None)
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
    def fit(self, X, y, sample_weight=None, views=(), pooled=None, paths=None, orientations=None, top=None,
            bottom=None):
        """Two-phase fit.

        Parameters
        ----------
        X : ndarray (n, d)
            Flattened cut-point activations of the training images (original view).
        y : array (n,)
        sample_weight : array (n,), optional
            Each row's weight in both phases' training and validation losses (class weights,
            pseudo-labels, distillation's soft-target rows).
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
            :class:`~stacker.features.cutpoint.CutPointExtractor`); ``top`` is copied, never
            changed. Without them the backbone is built from ``weights``.
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
        w = None if sample_weight is None else _check_sample_weight(sample_weight, np.empty((len(y), 0)),
                                                                    dtype=np.float32, ensure_non_negative=True)
        keras.utils.set_random_seed(int(self.random_state))
        from stacker.features.engines import strategy_scope

        with strategy_scope(self.strategy):  # the top's copy, the head and the phase-2 model live in it
            return self._fit(X, y, y_idx, w, views, pooled, paths, orientations, top, bottom)

    def _fit(self, X, y, y_idx, w, views, pooled, paths, orientations, top, bottom):
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
            pooled = pooled_rows(top, X, shape)
        # phase 1: the head alone on frozen features, with the split phase 2 uses
        head = DenseClassifier(dropout=self.dropout, epochs=self.head_epochs,
                               learning_rate=self.head_learning_rate, validation_fraction=self.validation_fraction,
                               random_state=self.random_state, strategy=self.strategy).fit(pooled, y, w)
        self.head_ = copy.copy(head)
        self.head_.model_ = keras.models.clone_model(head.model_)
        self.head_.model_.set_weights(head.model_.get_weights())

        inputs = keras.Input(shape, name="cut")
        outputs = head.model_(top(inputs, training=False))
        model = keras.Model(inputs, outputs, name=f"{self.backbone}_finetuned")
        optimizer = keras.optimizers.Adam(self.learning_rate)
        if self.mixed_precision:  # float16 gradients underflow without a scaled loss
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        model.compile(optimizer=optimizer,
                      loss=keras.losses.CategoricalCrossentropy(label_smoothing=self.label_smoothing),
                      metrics=["accuracy"])
        Y = keras.utils.to_categorical(y_idx, k).astype(np.float32)
        w_va = None if w is None or not w[va].sum() else w[va]  # all-zero weights: an unweighted loss (as phase 1)
        val = _validation(X[va], Y[va], shape, self.batch_size, w_va)
        before = _evaluate(model, val, self.batch_size)
        start = model.get_weights()
        callbacks = [keras.callbacks.EarlyStopping(monitor="val_loss", patience=self.patience,
                                                   restore_best_weights=True),
                     keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.2, patience=1, min_lr=1e-6)]
        timer = _EpochTimer()
        callbacks.append(timer)
        if self.mode == "cached":
            train = _ViewBatches([X[tr]] + [_subset(V, tr) for V in views], Y[tr], self.batch_size, shape,
                                 self.random_state, None if w is None else w[tr]).dataset
            hist = keras_fit(model, train, validation_data=val, epochs=self.epochs, callbacks=callbacks,
                             verbose=self.verbose)
        else:
            hist = self._fit_full(model, bottom, top, head, shape, paths, orientations, Y, w, tr, va, callbacks)
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

    def _fit_full(self, model, bottom, top, head, shape, paths, orientations, Y, w, tr, va, callbacks):
        """Phase 2 on pixels: augmentation -> frozen bottom -> top -> head, every epoch."""
        import keras
        import tensorflow as tf

        from stacker.data.decode import pixel_batches

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
        Wt = tf.constant(np.ones(len(Y), np.float32) if w is None else w)

        def dataset(rows, shuffle):
            rows = np.random.default_rng(self.random_state).permutation(rows) if shuffle else rows
            ds = pixel_batches(list(paths[rows]), size, self.batch_size, orientations[rows], rows=rows)
            ds = ds.map(lambda r, px: (px, tf.gather(Yt, r), tf.gather(Wt, r)))
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
        proba = batched_rows(on_rows(self.model_, self.cut_shape_), X)
        proba = proba.astype(np.float64)
        return proba / proba.sum(axis=1, keepdims=True)

    def onnx_proba(self, g, x: str) -> str:
        """This network in an exported graph (:mod:`stacker.io.export`) on cut-point rows ``x`` (flat or not): the
        fine-tuned top blocks as tf2onnx converts them, then the head layer by layer (as a dense head exports),
        rows normalised as :meth:`predict_proba` does."""
        import keras

        from stacker.features.engines import export_onnx
        from stacker.learners.dense import onnx_layers

        check_is_fitted(self, "model_")
        top, head = [layer for layer in self.model_.layers if isinstance(layer, keras.Model)]
        cut = g.op("Reshape", x, g.const([-1, *self.cut_shape_], "shape", np.int64))
        pooled = g.add_network(lambda: export_onnx(top), g.name("finetuned_top") + "/", cut, ["batch", "features"])
        return g.normalise_rows(onnx_layers(head, g, pooled))

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
        return batched_rows(on_rows(self._features_model, self.cut_shape_), X)

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


register_format("FineTunedClassifier", FineTunedClassifier)


