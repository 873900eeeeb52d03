"""Distillation: one backbone taught by the whole ensemble, at one backbone's prediction cost.

:func:`distill` fits a *student*, a normal :class:`stacker.Ensemble` on one backbone (by
default its logistic learner on cached pooled features, calibrated), first on the hard
labels, then again on the teacher's soft targets: each training image's out-of-fold
probabilities from the teacher (``meta_oof_proba_``, never an in-sample prediction), as
one weighted row per class it gives at least ``min_target`` (weighted log loss on such
rows is the cross-entropy with the soft targets); ``hard_weight`` of each image's weight
stays on its label. Unlabelled images add rows with the teacher's predicted probabilities.
Every feature comes from the cache: the student's backbone is extracted once, the refit
runs no forward pass. With ``finetune=...`` the student is the backbone fine-tuned
(:mod:`stacker.learners.finetuned`) on the same weighted rows, its cut-point activations cached.

The student's out-of-fold scores are on the hard labels of the training images, as the
teacher's are; they lean slightly optimistic, since an image's soft target in one fold
came from teacher models that saw the others, and unlabelled images are taught by the whole
teacher in every fold (a near copy of a training image carries what the teacher learnt of
it). A held-out set is the fair comparison (``benchmarks/distill.py``). The result is saved,
reported and exported like any model; ``scores_["ensemble"]["distilled"]`` compares it with
the teacher and with its hard-label self.
"""

from __future__ import annotations

import os

import numpy as np

from stacker.features.layout import stable_hash
from stacker.pseudo_labels import load_pool

__all__ = ["distill", "Distillation", "soft_rows", "soften", "summary_line"]


def distill(teacher, images, backbone="efficientnet_lite0", *, unlabeled=None, models=("logistic",),
            hard_weight=0.0, temperature=1.0, min_target=1e-3, **params):
    """Fit one backbone on ``teacher``'s out-of-fold soft targets; a fitted :class:`stacker.Ensemble`.

    Parameters
    ----------
    teacher : Ensemble
        Fitted (or loaded); its training images must include every image of ``images``.
    images : ImageSet, folder or CSV path
        The teacher's training images (or some of them), labelled.
    backbone : str or dict
        The student's one backbone entry (as in ``Ensemble(backbones=...)``).
    unlabeled : ImageSet, folder or CSV path, optional
        More images, taught with the teacher's predictions.
    models : str or list
        The student's models on that backbone (default: the logistic learner alone).
    hard_weight : float in [0, 1]
        Share of each training image's weight on its own label; the rest follows the soft targets.
    temperature : float
        The teacher's probabilities are softened to ``softmax(log p / temperature)`` (Hinton et al.'s
        distillation temperature; 1: as they are).
    min_target : float
        Soft-target probabilities below this get no row.
    **params
        Other :class:`stacker.Ensemble` parameters of the student (``cache_dir``, ``weights_dir``,
        ``verbose``...); ``cv`` and ``random_state`` default to the teacher's.
    """
    from sklearn.utils.validation import check_is_fitted

    from stacker.data.sources import load_images
    from stacker.ensemble import Ensemble

    check_is_fitted(teacher, "meta_oof_proba_")
    if not 0 <= hard_weight <= 1:
        raise ValueError(f"hard_weight must be in [0, 1], got {hard_weight!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    data = load_images(images)
    _teacher_rows(teacher, data.paths, data.labels)  # every image one the teacher was fitted on: before any work
    params = {"cv": teacher.cv, "random_state": teacher.random_state, "meta": "best", "out_of_core": False, **params}
    stage = Distillation(teacher, hard_weight, temperature, min_target, unlabeled)
    return Ensemble([backbone], models=models, **params)._fit(data, stage=stage)


class Distillation:
    """Distillation as the student's second stage (:meth:`stacker.Ensemble._fit`): once it is fitted on the hard
    labels (its baseline), every learner is refitted with the soft-target rows (and the pool's), then level 2."""

    name, what = "distilled", "soft targets (distillation)"

    def __init__(self, teacher, hard_weight, temperature, min_target, unlabeled=None):
        self.teacher, self.hard_weight = teacher, hard_weight
        self.temperature, self.min_target = temperature, min_target
        self.unlabeled, self.pool, self.pooled = unlabeled, None, None

    def check(self, student) -> None:
        """The pool listed (the images were checked against the teacher's, the weights are ``_fit``'s to check)."""
        if self.unlabeled is not None:
            self.pool = load_pool(self.unlabeled)

    def prepare(self, student, data) -> None:
        from stacker.pseudo_labels import pool_rows

        if self.pool is not None:
            self.pooled = pool_rows(student, data, self.pool)

    def run(self, student, inputs, data, images_fp, timings) -> dict:
        from stacker.data.sources import file_fingerprints
        from stacker.level2.arrays import score

        k = len(student.classes_)
        hard = score(student.y_, student.meta_oof_proba_, k)
        targets = soften(_teacher_targets(self.teacher, student), self.temperature)
        base, extra_of, labels, weights = soft_rows(targets, student.y_, self.hard_weight, self.min_target)
        fold_of = np.empty(len(student.y_), dtype=np.int64)
        for f, (_, va) in enumerate(student.folds_):
            fold_of[va] = f
        fold_rows = [np.flatnonzero(fold_of[extra_of] != f) for f in range(len(student.folds_))]
        extra = {sid: v[extra_of] for sid, v in inputs.items()}
        pool_note = None
        if self.pooled is not None:
            extra, labels, weights, fold_rows, pool_note = _with_pool(self.teacher, self.pooled, len(self.pool), extra,
                                                                      labels, weights, fold_rows, self.min_target,
                                                                      self.temperature)
        fp = stable_hash([file_fingerprints(data.paths, student.cache_dir), data.labels, "distill", hash_array(targets),
                          self.hard_weight, self.temperature, self.min_target, pool_note])
        student._refit_with_rows(inputs, extra, labels, weights, fold_rows, data, fp, timings, "distill_train_s",
                                 base_weights=base,
                                 variant=f"distilled from a {len(self.teacher.learners_)}-learner ensemble")
        for name in student.learners_:  # the leaderboard's training time: both fits
            timings[name]["train_s"] += timings[name]["distill_train_s"]
        distilled = score(student.y_, student.meta_oof_proba_, k)
        pick = lambda s: {m: s[m] for m in ("accuracy", "log_loss")}  # noqa: E731
        return {"teacher": pick(self.teacher.scores_["ensemble"]), "teacher_learners": len(self.teacher.learners_),
                "hard_labels": pick(hard), "distilled": pick(distilled), "hard_weight": self.hard_weight,
                "temperature": self.temperature, "soft_rows": int(len(labels)), "unlabeled": pool_note}


def soften(proba, temperature: float) -> np.ndarray:
    """``softmax(log p / temperature)`` row by row (``proba`` itself at 1)."""
    if temperature == 1:
        return np.asarray(proba, dtype=np.float64)
    z = np.log(np.clip(np.asarray(proba, dtype=np.float64), 1e-12, None)) / temperature
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def hash_array(a) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest()


def soft_rows(targets, y, hard_weight: float, min_target: float):
    """The training rows' weights and the extra rows that carry the soft targets.

    Image ``i``'s own row (its label ``y[i]``) weighs ``hard_weight + (1 - hard_weight) * T[i, y[i]]``;
    each other class ``c`` with ``T[i, c] >= min_target`` gets a row weighing ``(1 - hard_weight) * T[i, c]``.
    Returns ``(base weights, image of each extra row, its label, its weight)``.
    """
    T = np.asarray(targets, dtype=np.float64)
    rows = np.arange(len(y))
    base = hard_weight + (1 - hard_weight) * T[rows, y]
    mask = T >= min_target
    mask[rows, y] = False
    image, label = np.nonzero(mask)
    return base, image, label, (1 - hard_weight) * T[image, label]


def _teacher_rows(teacher, paths, labels) -> np.ndarray:
    """Each image's row in the teacher's training set, its label checked; a clear error for any other image."""
    where = {os.path.abspath(str(p)): i for i, p in enumerate(teacher.train_paths_)}
    rows = [where.get(os.path.abspath(str(p))) for p in paths]
    missing = [p for p, r in zip(paths, rows) if r is None]
    if missing:
        raise ValueError(f"{len(missing)} images were not among the teacher's training images (e.g. {missing[0]}): "
                         "distillation learns from the teacher's out-of-fold probabilities of its own training images")
    rows = np.array(rows, dtype=np.int64)
    names = np.asarray(teacher.classes_, dtype=object)[np.asarray(teacher.y_)[rows]]
    wrong = [(p, a, b) for p, a, b in zip(paths, labels, names) if a != b]
    if wrong:
        raise ValueError(f"{len(wrong)} images have other labels than the teacher was fitted with (e.g. {wrong[0][0]}: "
                         f"{wrong[0][1]!r}, the teacher's {wrong[0][2]!r})")
    return rows


def _teacher_targets(teacher, student) -> np.ndarray:
    """The teacher's out-of-fold probabilities of the student's training images, in their order."""
    rows = _teacher_rows(teacher, student.train_paths_, np.asarray(student.classes_, dtype=object)[student.y_])
    if list(teacher.classes_) != list(student.classes_):  # a class every usable image of which was skipped
        raise ValueError(f"the images' classes {list(student.classes_)[:10]} are not the teacher's "
                         f"{list(teacher.classes_)[:10]}")
    return np.asarray(teacher.meta_oof_proba_)[rows]


def _with_pool(teacher, pooled, n_pool, extra, labels, weights, fold_rows, min_target, temperature):
    """Extra rows for unlabelled images: one per class the teacher gives at least ``min_target``, in every fold."""
    pool_inputs, used, used_fps, notes = pooled
    if not used:
        return extra, labels, weights, fold_rows, {"pool": n_pool, "used": 0, **notes, "rows": 0}
    T = soften(teacher.predict_proba(used), temperature)
    image, label = np.nonzero(T >= min_target)
    start = len(labels)
    extra = {sid: np.concatenate([extra[sid], pool_inputs[sid][image]]) for sid in extra}
    new = np.arange(start, start + len(image))
    fold_rows = [np.concatenate([f, new]) for f in fold_rows]
    return (extra, np.concatenate([labels, label]), np.concatenate([weights, T[image, label]]), fold_rows,
            {"pool": n_pool, "used": len(used), **notes, "rows": int(len(image)), "content": stable_hash(used_fps)})


def summary_line(s: dict) -> str:
    """One line for the leaderboard: the student against its teacher and its hard-label self (out of fold)."""
    pool = s.get("unlabeled")
    return (f"distilled from a {s['teacher_learners']}-learner ensemble (out-of-fold log loss "
            f"{s['teacher']['log_loss']:.4f}): this model {s['distilled']['log_loss']:.4f}, trained on hard labels "
            f"{s['hard_labels']['log_loss']:.4f}" + (f"; {pool['used']} unlabelled images taught" if pool else "")
            + " (out of fold on the same folds; a held-out set is the fair comparison)")
