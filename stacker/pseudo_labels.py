"""Pseudo-labelling: unlabelled images join the training folds with the ensemble's labels, in rounds.

``Ensemble.fit(images, unlabeled=pool)`` first fits on the labelled images alone. Each
round then asks, for every fold ``i``, the ensemble as it stands *without fold i*
(fold ``i``'s level-1 models, combined by level 2 and calibrated) to label the pool;
images it labels with confidence at least ``min_confidence`` join fold ``i``'s training
rows with that label and a weight of ``weight`` times the confidence. No pseudo-label
fold ``i``'s models learn from was made by a model that saw fold ``i``'s labels, so the
ensemble's out-of-fold score stays honest (level 2 and its calibration are the exception:
a handful of weights fitted on every labelled row's out-of-fold predictions).
Pseudo-labelled rows never reach level 2 or any score: every figure is on labelled
out-of-fold rows. A round is kept only when it lowers the ensemble's out-of-fold log
loss by more than the standard error of that change (paired over the labelled images: a
gain within noise is no gain); otherwise the fit says so and keeps what it had. Every cached feature is reused:
the pool's images are extracted once, the refits run no forward pass.
"""

from __future__ import annotations

import time

import numpy as np

from stacker.features.layout import stable_hash
from stacker.level2.arrays import meta_matrix, score
from stacker.params import Param

__all__ = ["PARAM", "DEFAULTS", "PseudoLabels", "options", "load_pool", "check_combiners", "pool_rows", "fit_rounds",
           "fold_teacher", "select", "paired_gain", "summary_line"]

DEFAULTS = {"rounds": 2, "min_confidence": 0.95, "max_share": 1.0, "weight": 1.0}
_FITTED = ("learners_", "oof_proba_", "meta_", "meta_oof_proba_", "level2_scores_", "meta_importance_", "_meta_dims")


def _valid(value) -> bool:
    if value is None:
        return True
    if not isinstance(value, dict) or set(value) - set(DEFAULTS):
        return False
    v = {**DEFAULTS, **value}
    number = (int, float, np.integer, np.floating)
    return (isinstance(v["rounds"], (int, np.integer)) and not isinstance(v["rounds"], bool) and v["rounds"] >= 1
            and all(isinstance(v[n], number) and not isinstance(v[n], bool)
                    for n in ("min_confidence", "max_share", "weight"))
            and 0 < v["min_confidence"] <= 1 and 0 < v["max_share"] < np.inf and 0 < v["weight"] < np.inf)


PARAM = Param("pseudo_labels", None, "dict, optional\n    How ``fit(..., unlabeled=)`` pseudo-labels "
              "(:mod:`stacker.pseudo_labels`); keys\n    (defaults): ``rounds`` (2), ``min_confidence`` (0.95: "
              "an unlabelled image joins a\n    fold when the ensemble without that fold gives its top class at least "
              "this),\n    ``max_share`` (1.0: at most this many pseudo-labelled images per labelled image\n    of "
              "each class in a fold, the most confident first), ``weight`` (1.0: a\n    pseudo-labelled image weighs "
              "this times its confidence; a labelled one 1).", _valid,
              "None or a dict with keys among rounds (int >= 1), min_confidence (0 < c <= 1), max_share (finite, > 0), "
              "weight (finite, > 0)")


def options(value) -> dict:
    """The pseudo-labelling options: the defaults updated with ``value`` (a dict or None)."""
    return {**DEFAULTS, **(value or {})}


def load_pool(unlabeled):
    """The unlabelled pool as an ImageSet (its labels, if any, unused): a folder, a CSV, a list of image paths or an
    ImageSet; an empty one is an error."""
    from stacker.data.sources import ImageSet, load_images

    if isinstance(unlabeled, (list, tuple)):
        paths = [str(p) for p in unlabeled]
        pool = ImageSet(paths, paths)
    else:
        pool = unlabeled if hasattr(unlabeled, "paths") else load_images(unlabeled)
    if not len(pool):
        raise ValueError(f"unlabeled={unlabeled!r} holds no images")
    return pool


class PseudoLabels:
    """``fit(..., unlabeled=pool)``'s second stage (:meth:`stacker.Ensemble._fit`): the pool listed and the
    combiners checked before any work, the pool extracted before training, pseudo-labels in rounds after level 2."""

    name, what = "pseudo_labels", "pseudo-labels (unlabeled=)"

    def __init__(self, unlabeled):
        self.unlabeled = unlabeled

    def check(self, ens) -> None:
        self.pool = load_pool(self.unlabeled)
        check_combiners(ens)

    def prepare(self, ens, data) -> None:
        self.pooled = pool_rows(ens, data, self.pool)

    def run(self, ens, inputs, data, images_fp, timings) -> dict:
        return fit_rounds(ens, inputs, data, self.pool, self.pooled, images_fp, timings)


def check_combiners(ens) -> None:
    """Pseudo-labels need a level 2 of probability-block combiners (a handful of weights), refused otherwise.

    Fold ``i``'s teacher is fold ``i``'s level-1 models under the one level 2 fitted on every
    out-of-fold row: harmless for weights over the learners' probabilities, a leak of fold
    ``i``'s labels for a combiner that reads features or fits a model on all columns.
    """
    from stacker.level2.registry import combiner_names, probability_combiners

    blocks = set(probability_combiners())
    other = [m if isinstance(m, str) else type(m).__name__ for m in combiner_names(ens.meta)
             if not (isinstance(m, str) and m in blocks)]
    if ens.meta_inputs != "proba" or other:
        raise ValueError("pseudo-labels (unlabeled=) need level-2 combiners of the learners' probabilities "
                         f"(meta_inputs='proba', meta among {sorted(blocks)}); got meta_inputs="
                         f"{ens.meta_inputs!r}" + (f", meta {other}" if other else "")
                         + ": a combiner fitted on every row would hand each fold its own labels back")


def fit_rounds(ens, inputs: dict, data, pool, pooled, images_fp: str, timings: dict) -> dict:
    """Refit ``ens`` (fitted on ``data``) with pseudo-labelled ``pool`` images while that lowers its out-of-fold loss.

    ``inputs``: the labelled images' cached inputs, (source id, view) -> rows; ``pooled``:
    :func:`pool_rows`' result for ``pool``. Returns the summary kept in
    ``scores_["ensemble"]["pseudo_labels"]``.
    """
    t0 = time.perf_counter()
    opts = options(ens.pseudo_labels)
    pool_inputs, used, used_fps, notes = pooled
    y, k, w = ens.y_, len(ens.classes_), ens.sample_weight_
    best_ll, best_proba = score(y, ens.meta_oof_proba_, k, w)["log_loss"], ens.meta_oof_proba_
    summary = {"pool": len(pool), "used": len(used), **notes, "options": opts, "log_loss_before": best_ll,
               "rounds": [], "kept_rounds": 0}
    best, last = _snapshot(ens, timings), None
    for r in range(opts["rounds"] if used else 0):
        teacher = fold_teacher(ens, pool_inputs)
        rows, labels, weights, fold_rows = select(teacher, y, ens.folds_, opts)
        chosen = [sorted(zip(rows[f].tolist(), labels[f].tolist())) for f in fold_rows]
        n_images = int(len(np.unique(rows)))
        if not n_images or chosen == last:  # nothing to add, or the same rows would refit the same models
            summary["rounds"].append({"round": r + 1, "images": n_images, "same": bool(n_images)})
            ens._log(f"pseudo-labels round {r + 1}: " + ("the same images and labels as the round before"
                     if n_images else f"no unlabelled image reached min_confidence={opts['min_confidence']}"))
            break
        last = chosen
        round_fp = stable_hash([images_fp, [used_fps[i] for i in rows], labels.tolist(), chosen, opts])
        if w is not None:  # class weights reach pseudo-labelled rows too: times their class's mean labelled weight
            class_mean = np.bincount(y, weights=w, minlength=k) / np.maximum(np.bincount(y, minlength=k), 1)
            weights = weights * class_mean[labels]
        extra = {sid: pool_inputs[sid][rows] for sid in pool_inputs}
        ens._refit_with_rows(inputs, extra, labels, weights, fold_rows, data, round_fp, timings, "pseudo_train_s",
                             variant=f"pseudo-labels, round {r + 1}")
        ll = score(y, ens.meta_oof_proba_, k, w)["log_loss"]
        gain, se = paired_gain(y, best_proba, ens.meta_oof_proba_, w)
        kept = gain > se
        summary["rounds"].append({"round": r + 1, "images": n_images,
                                  "per_fold": [int(len(f)) for f in fold_rows], "log_loss": ll, "gain": gain,
                                  "standard_error": se, "kept": bool(kept)})
        ens._log(f"pseudo-labels round {r + 1}: {n_images} of {len(used)} usable unlabelled images, "
                 f"out-of-fold log loss {best_ll:.4f} -> {ll:.4f}"
                 + ("" if kept else f" (not lower by more than its standard error {se:.4f}: not kept)"))
        if not kept:
            _restore(ens, best, timings)
            break
        best, best_ll, best_proba, summary["kept_rounds"] = _snapshot(ens, timings), ll, ens.meta_oof_proba_, r + 1
    summary.update(log_loss_after=best_ll, seconds=time.perf_counter() - t0)
    if not used:
        ens._log(f"pseudo-labels: none of the {len(pool)} unlabelled images is usable ({notes['skipped']} unusable, "
                 f"{notes['training_copies']} copies of training images)")
    elif not summary["kept_rounds"]:
        ens._log("pseudo-labels did not lower the out-of-fold log loss: the ensemble ignores the unlabelled images")
    return summary


def paired_gain(y, before, after, sample_weight=None) -> tuple[float, float]:
    """How much lower the log loss of ``after`` is than that of ``before`` (same rows), and the standard error of that.

    Both from the per-image differences of log loss (weighted means where there are weights).
    """
    rows = np.arange(len(y))
    eps = 1e-15
    d = np.log(np.clip(after[rows, y], eps, 1)) - np.log(np.clip(before[rows, y], eps, 1))
    w = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    w = w / w.sum()
    gain = float(np.sum(w * d))
    se = float(np.sqrt(np.sum(w ** 2 * (d - gain) ** 2)))
    return gain, se


def pool_rows(ens, data, pool):
    """The pool's cached inputs per (source id, view), the usable images' paths and content digests, and what was
    left out and why (counts).

    Pool images whose bytes are those of a training image add nothing and are left out.
    """
    from stacker.data.fingerprint import fingerprints

    kept, skipped, feats = np.arange(len(pool)), {}, {}
    for sid, ext in ens._sources().items():
        feats[sid] = f = ext.extract(pool)
        skipped.update(f.skipped)
        kept = np.intersect1d(kept, f.kept)
    train_fps = set(fingerprints(data.paths, ens.cache_dir)[0])
    pool_fps = fingerprints([pool.paths[i] for i in kept], ens.cache_dir)[0]
    fresh = np.array([fp not in train_fps for fp in pool_fps], dtype=bool)
    inputs = {sid: f.values[np.searchsorted(f.kept, kept[fresh])] for sid, f in feats.items()}
    notes = {"skipped": len(skipped), "training_copies": int((~fresh).sum())}
    if skipped:
        ens._log(f"pseudo-labels: {len(skipped)} unlabelled images not usable (e.g. "
                 f"{pool.paths[next(iter(skipped))]}: {next(iter(skipped.values()))})")
    return inputs, [str(pool.paths[i]) for i in kept[fresh]], [fp for fp, f in zip(pool_fps, fresh) if f], notes


def fold_teacher(ens, pool_inputs: dict) -> np.ndarray:
    """``(folds, pool images, classes)``: for each fold, the ensemble without that fold's labels on the pool."""
    out = []
    for i in range(len(ens.folds_)):
        parts = [lr.fold_meta(ens._inputs_of(lr, pool_inputs), i) for lr in ens.learners_.values()]
        Z = meta_matrix([p for p, _ in parts], [f for _, f in parts], ens.meta_inputs)
        out.append(ens.meta_.predict_proba(Z))
    return np.stack(out)


def select(teacher: np.ndarray, y, folds, opts: dict):
    """Which pool images join which fold, with which label and weight.

    Returns ``rows`` (pool index of each pseudo-labelled row), ``labels``, ``weights`` and,
    per fold, the indices into ``rows`` its training rows gain. An image labelled
    differently by two folds' teachers is two rows, each joining only its folds.
    """
    n_folds, m, k = teacher.shape
    conf, label = teacher.max(axis=2), teacher.argmax(axis=2)
    chosen = np.zeros((n_folds, m), dtype=bool)
    for i, (tr, _) in enumerate(folds):
        counts = np.bincount(np.asarray(y)[tr], minlength=k)
        for c in range(k):
            idx = np.flatnonzero((conf[i] >= opts["min_confidence"]) & (label[i] == c))
            cap = int(opts["max_share"] * counts[c])
            chosen[i, idx[np.argsort(-conf[i, idx], kind="stable")[:cap]]] = True
    fold_of, image = np.nonzero(chosen)
    pair = image * k + label[fold_of, image]
    pairs, row_of = np.unique(pair, return_inverse=True)
    rows, labels = pairs // k, pairs % k
    conf_sum = np.bincount(row_of, weights=conf[fold_of, image], minlength=len(pairs))
    weights = opts["weight"] * conf_sum / np.bincount(row_of, minlength=len(pairs))
    fold_rows = [np.sort(row_of[fold_of == i]) for i in range(n_folds)]
    return rows, labels, weights, fold_rows


def _snapshot(ens, timings) -> dict:
    return {**{a: getattr(ens, a) for a in _FITTED}, "timing": dict(timings.get("ensemble", {}))}


def _restore(ens, state: dict, timings) -> None:
    for a in _FITTED:
        setattr(ens, a, state[a])
    timings["ensemble"] = state["timing"]


def summary_line(s: dict) -> str:
    """One line for the leaderboard: what pseudo-labelling did and whether it was kept."""
    rounds = "; ".join(f"round {r['round']}: " + ("the same images again" if r.get("same") else
                       "no image confident enough" if not r["images"] else
                       f"{r['images']} images, {r['log_loss']:.4f}" + ("" if r["kept"] else
                       f" (not kept: {r['gain']:+.4f} lower, standard error {r['standard_error']:.4f})"))
                       for r in s["rounds"])
    verdict = (f"kept {s['kept_rounds']} round{'s' if s['kept_rounds'] != 1 else ''}" if s["kept_rounds"]
               else "not kept: the ensemble ignores the unlabelled images")
    left = [f"{s[n]} {t}" for n, t in (("skipped", "unusable"), ("training_copies", "copies of training images"))
            if s.get(n)]
    return (f"pseudo-labels: {s['used']} usable of {s['pool']} unlabelled images"
            + (f" ({', '.join(left)} left out)" if left else "")
            + f": out-of-fold log loss {s['log_loss_before']:.4f} -> {s['log_loss_after']:.4f}, {verdict}"
            + (f" ({rounds})" if rounds else "") + f"; {s['seconds']:.0f} s")
