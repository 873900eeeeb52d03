"""What is wrong with a training set: label issues, ambiguous images, outliers, duplicates and leaks.

:func:`diagnose` reads what a fitted ensemble already has, and computes nothing new for the
training images: its out-of-fold probabilities (``meta_oof_proba_``) and labels, the pooled
features of its sources from the cache (zero CNN forward passes when they are cached, as
after ``fit``), and the content fingerprints of the files. It returns :class:`Findings`,
one row per image and problem:

- ``label_issue``: the given label is likely wrong. Confident learning (cleanlab's
  ``find_label_issues``, pruned by noise rate) on the out-of-fold probabilities picks them;
  the score is ``1 - p(given label)`` (cleanlab's self-confidence), the suggestion the most
  likely class.
- ``ambiguous``: not a label issue, but a second class holds at least ``ambiguity`` of the
  probability (two classes in one photo, or a hard case); the score is that probability.
- ``outlier``: far from every other image in feature space: cleanlab's ``OutOfDistribution``
  (average cosine distance to the ``k`` nearest neighbours), flagged with the rule of
  cleanlab's Datalab (a distance above Q3 + 1.7 IQR of all of them); the score is
  ``1 - cleanlab's OOD score``.
- ``exact_duplicate`` / ``duplicate``: the same bytes (fingerprints), or a near copy
  (resized, re-encoded, flipped, lightly cropped): cosine similarity of the pooled features
  (centred on the training set's mean, L2-normalised), averaged over the sources, at least
  ``threshold``. Each group keeps its
  first image (``group`` names it); every other member is a row, so dropping every listed
  path keeps one copy.
- ``leak``: a training image that is (a near copy of) a test image, one row per pair
  (``group`` names the test image): held-out scores on that test set are inflated.

cleanlab is an extra (``pip install 'stacker[doctor]'``): it is maintained, takes exactly
out-of-fold probabilities and features, and is the reference implementation of confident
learning. :func:`without` gives an image set minus the findings (what ``stacker fit
--exclude findings.csv`` fits on: every feature comes from the cache).
"""

from __future__ import annotations

import csv
import os
from dataclasses import asdict, dataclass, fields

import numpy as np

__all__ = ["AMBIGUITY", "DUPLICATE_THRESHOLD", "KINDS", "Finding", "Findings", "diagnose", "duplicate_pairs",
           "label_quality", "pooled_features", "unit_rows", "without"]

KINDS = ("label_issue", "ambiguous", "outlier", "exact_duplicate", "duplicate", "leak")
# Calibrated on real photos (benchmarks/doctor.py): resized, re-encoded, flipped and lightly cropped copies of
# Dogs vs. Cats and Caltech-101 photos against 1,000 distinct ones; see benchmarks/README.md.
DUPLICATE_THRESHOLD = 0.75
AMBIGUITY = 0.3
OUTLIER_IQR = 1 / 0.37037 - 1  # cleanlab Datalab's default for features: Q3 + 1.7 IQR
_BLOCK = 2048


def _cleanlab():
    try:
        import cleanlab  # noqa: F401
    except ImportError:
        raise ImportError("stacker doctor needs cleanlab: pip install 'stacker[doctor]' (or pip install "
                          "'cleanlab>=2.6')") from None
    return cleanlab


@dataclass
class Finding:
    """One problem of one image.

    Attributes
    ----------
    path, id : str
        The image (a training image; for ``leak``, the training copy of a test image).
    kind : str
        One of :data:`KINDS`.
    score : float
        In [0, 1], higher is surer (see :mod:`stacker.doctor` for each kind's).
    label : str
        The given label.
    suggested : str
        The label the evidence points to ('' when it has none).
    group : str
        For duplicates, the image kept of the group; for leaks, the test image; else ''.
    """

    path: str
    id: str
    kind: str
    score: float
    label: str = ""
    suggested: str = ""
    group: str = ""


COLUMNS = tuple(f.name for f in fields(Finding))


class Findings:
    """The findings of :func:`diagnose`, most severe first within each kind (in :data:`KINDS` order).

    Parameters
    ----------
    rows : list of Finding
    n_images : int
        How many training images were diagnosed.
    """

    def __init__(self, rows, n_images: int = 0):
        order = {k: i for i, k in enumerate(KINDS)}
        self.rows = sorted(rows, key=lambda r: (order[r.kind], -r.score, r.path))
        self.n_images = n_images

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def __repr__(self) -> str:
        counts = self.counts()
        shown = ", ".join(f"{k} {n}" for k, n in counts.items() if n) or "nothing found"
        return f"Findings({self.n_images} images: {shown})"

    def counts(self) -> dict:
        """Kind -> number of rows."""
        return {k: sum(r.kind == k for r in self.rows) for k in KINDS}

    def of_kind(self, *kinds) -> "Findings":
        """Only the rows of ``kinds``."""
        return Findings([r for r in self.rows if r.kind in kinds], self.n_images)

    def top(self, n: int) -> "Findings":
        """The first ``n`` rows (the most severe, when of one kind)."""
        return Findings(self.rows[:n], self.n_images)

    def paths(self) -> list:
        """Every path named, once, in row order."""
        return list(dict.fromkeys(r.path for r in self.rows))

    def to_csv(self, path) -> str:
        """Write one row per finding (columns: :data:`COLUMNS`); returns ``path``."""
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows({**asdict(r), "score": f"{r.score:.6g}"} for r in self.rows)
        return os.fspath(path)

    @classmethod
    def read_csv(cls, path) -> "Findings":
        """Findings from a CSV :meth:`to_csv` wrote (perhaps edited: only ``path`` is required)."""
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if "path" not in (reader.fieldnames or ()):
                raise ValueError(f"{path} has no 'path' column (a findings CSV from `stacker doctor --csv`)")
            rows = [Finding(r["path"], r.get("id") or "", r.get("kind") or "label_issue",
                            float(r.get("score") or 0), r.get("label") or "", r.get("suggested") or "",
                            r.get("group") or "")
                    for r in reader if r["path"]]
        unknown = sorted({r.kind for r in rows} - set(KINDS))
        if unknown:
            raise ValueError(f"{path}: unknown kinds {unknown}; kinds are {', '.join(KINDS)}")
        return cls(rows)

    def table(self, n: int | None = None) -> str:
        """Aligned text: kind, score, label, suggested, path, group; ``n`` rows at most."""
        from stacker.level2.leaderboard import text_columns

        rows = self.rows if n is None else self.rows[:n]
        body = [[r.kind, f"{r.score:.3f}", r.label, r.suggested or "-", r.path, r.group] for r in rows]
        lines = text_columns([["kind", "score", "label", "suggested", "path", "group"], *body], right=(1,))
        more = len(self.rows) - len(rows)
        return "\n".join(line.rstrip() for line in lines) + (f"\n... {more} more" if more > 0 else "")


# --------------------------------------------------------------------------- labels


def label_quality(y, proba) -> np.ndarray:
    """cleanlab's self-confidence of each given label (low: likely mislabelled); rank images by it."""
    from cleanlab.rank import get_label_quality_scores

    _cleanlab()
    return get_label_quality_scores(np.asarray(y), np.asarray(proba, dtype=float), method="self_confidence")


def label_findings(y, proba, classes, paths, ids, ambiguity: float = AMBIGUITY) -> list:
    """``label_issue`` rows (confident learning) and ``ambiguous`` rows (a strong second class)."""
    from cleanlab.filter import find_label_issues

    _cleanlab()
    y, proba = np.asarray(y), np.asarray(proba, dtype=float)
    issues = find_label_issues(y, proba, filter_by="prune_by_noise_rate")
    quality = label_quality(y, proba)
    order = np.argsort(-proba, axis=1)
    rows = []
    for i in range(len(y)):
        given, best, second = classes[y[i]], order[i, 0], order[i, 1]
        if issues[i]:
            rows.append(Finding(paths[i], str(ids[i]), "label_issue", float(1 - quality[i]), given, classes[best]))
        elif proba[i, second] >= ambiguity:
            other = second if best == y[i] else best
            rows.append(Finding(paths[i], str(ids[i]), "ambiguous", float(proba[i, second]), given, classes[other]))
    return rows


# --------------------------------------------------------------------------- features


def pooled_sources(ensemble) -> dict:
    """(source id, view) -> extractor for the ensemble's pooled-feature sources (the original view)."""
    from stacker.features.cutpoint import CutPointExtractor

    found = {sid: ext for sid, ext in ensemble._sources().items()
             if sid[1] == "original" and not isinstance(ext, CutPointExtractor)}
    if not found:
        raise ValueError("the ensemble has no pooled-feature source (only fine-tuned learners): duplicates and "
                         "outliers need one frozen backbone")
    return found


def pooled_features(ensemble, images) -> list:
    """Each pooled source's features of ``images`` (rows as ``images``); cached images cost no forward pass."""
    parts = []
    for ext in pooled_sources(ensemble).values():
        X = np.asarray(ext.extract(images, on_bad_image="raise").values, dtype=np.float32)
        parts.append(X.reshape(len(X), -1))
    return parts


def unit_rows(parts, means) -> np.ndarray:
    """Each source's features minus ``means`` (the training set's), L2-normalised, side by side, over ``sqrt(n)``.

    Rows are unit vectors whose dot product is the cosine similarity of the centred
    features averaged over the sources. Centring takes away what all photos share: on
    real photos it lowers the similarity of distinct photos far more than that of copies
    (benchmarks/doctor.py).
    """
    out = []
    for X, mean in zip(parts, means):
        X = X - mean
        out.append(X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12))
    return np.hstack(out) / np.sqrt(len(out))


def duplicate_pairs(A, B=None, threshold: float = DUPLICATE_THRESHOLD):
    """``(i, j, similarity)`` arrays of the pairs with cosine similarity >= ``threshold``.

    ``A`` against itself (``i < j``), or against ``B`` (rows of ``A``, rows of ``B``);
    rows must be unit vectors (:func:`unit_rows`). Computed in blocks.
    """
    same = B is None
    B = A if same else B
    out_i, out_j, out_s = [], [], []
    for start in range(0, len(A), _BLOCK):
        S = A[start:start + _BLOCK] @ B.T
        i, j = np.nonzero(S >= threshold)
        keep = j > i + start if same else np.ones(len(i), bool)
        out_i.append(i[keep] + start)
        out_j.append(j[keep])
        out_s.append(S[i[keep], j[keep]])
    cat = (lambda v, t: np.concatenate(v).astype(t) if v else np.zeros(0, t))
    return cat(out_i, np.int64), cat(out_j, np.int64), cat(out_s, np.float64)


def _groups(n: int, pairs) -> np.ndarray:
    """Connected components of the pairs: each row's group is its smallest member's row."""
    parent = np.arange(n)

    def root(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in pairs:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([root(a) for a in range(n)])


def duplicate_findings(X, fps, paths, ids, labels, threshold: float = DUPLICATE_THRESHOLD) -> list:
    """``exact_duplicate`` and ``duplicate`` rows: every member of a group but its first image."""
    i, j, s = duplicate_pairs(X, threshold=threshold)
    first = {}
    exact = [(first.setdefault(fp, r), r) for r, fp in enumerate(fps) if fp is not None and first.get(fp, r) != r]
    group = _groups(len(paths), list(zip(i, j)) + exact)
    best = np.zeros(len(paths))
    np.maximum.at(best, i, s)
    np.maximum.at(best, j, s)
    rows = []
    for r in np.nonzero(group != np.arange(len(paths)))[0]:
        g = group[r]
        same = fps[r] is not None and fps[r] == fps[g]
        rows.append(Finding(paths[r], str(ids[r]), "exact_duplicate" if same else "duplicate",
                            1.0 if same else float(min(best[r], 1.0)), labels[r],
                            labels[g] if labels[g] != labels[r] else "", paths[g]))
    return rows


def leak_findings(X, T, fps, test_fps, paths, ids, labels, test_paths, threshold: float = DUPLICATE_THRESHOLD):
    """``leak`` rows: one per (training image, test image) pair of near or exact copies."""
    i, j, s = duplicate_pairs(X, T, threshold)
    pairs = {(int(a), int(b)): float(v) for a, b, v in zip(i, j, s)}
    by_fp = {}
    for b, fp in enumerate(test_fps):
        if fp is not None:
            by_fp.setdefault(fp, []).append(b)
    for a, fp in enumerate(fps):
        for b in by_fp.get(fp, ()):
            pairs[(a, b)] = 1.0
    return [Finding(paths[a], str(ids[a]), "leak", min(v, 1.0), labels[a], "", test_paths[b])
            for (a, b), v in pairs.items()]


def outlier_findings(X, paths, ids, labels, k: int = 10) -> list:
    """``outlier`` rows: cleanlab's feature-space OOD score, flagged by Datalab's rule (Q3 + 1.7 IQR)."""
    from cleanlab.outlier import OutOfDistribution

    _cleanlab()
    if len(X) <= 2:
        return []
    scores = OutOfDistribution(params={"k": min(k, len(X) - 1)}).fit_score(features=X, verbose=False)
    dist = -np.log(np.maximum(scores, 1e-300))  # cleanlab's score is exp(-average kNN distance)
    q1, q3 = np.percentile(dist, [25, 75])
    flagged = np.nonzero(dist > q3 + OUTLIER_IQR * (q3 - q1))[0]
    return [Finding(paths[r], str(ids[r]), "outlier", float(1 - scores[r]), labels[r]) for r in flagged]


# --------------------------------------------------------------------------- the doctor


def training_set(ensemble, data=None):
    """The ensemble's training images (an ImageSet) and their rows in its out-of-fold arrays.

    ``data``: a labelled set to diagnose instead of all of them; each of its images must be
    one the ensemble was fitted on (only those have out-of-fold probabilities).
    """
    from stacker.data.sources import ImageSet, load_images

    paths = [_key(p) for p in ensemble.train_paths_]
    ids = list(getattr(ensemble, "train_ids_", None) or paths)
    labels = [ensemble.classes_[c] for c in ensemble.y_]
    full = ImageSet(list(ensemble.train_paths_), ids, labels, list(ensemble.classes_))
    if data is None:
        return full, np.arange(len(paths))
    data = load_images(data)
    where = {p: r for r, p in enumerate(paths)}
    missing = [p for p in data.paths if _key(p) not in where]
    if missing:
        raise ValueError(f"{len(missing)} images were not in the model's training set (e.g. {missing[0]}): the "
                         "doctor reads out-of-fold probabilities, so fit on them first")
    rows = np.array([where[_key(p)] for p in data.paths], dtype=np.int64)
    return full.subset(rows), rows


def _key(path: str) -> str:
    from stacker.data import storage

    return path if storage.is_url(path) else os.path.abspath(path)


def _ensemble(model, cache_dir):
    from stacker.ensemble import Ensemble

    if isinstance(model, Ensemble):
        return model
    return Ensemble.load(model, cache_dir=cache_dir, verbose=0)


def diagnose(model, data=None, test=None, *, cache_dir=None, threshold: float = DUPLICATE_THRESHOLD,
             ambiguity: float = AMBIGUITY, kinds=KINDS) -> Findings:
    """Find label issues, ambiguous images, outliers, duplicates and (with ``test``) leaks.

    Parameters
    ----------
    model : Ensemble or path
        A fitted ensemble, or the folder it was saved to.
    data : ImageSet, folder or CSV, optional
        The training images to diagnose (default: all the ensemble was fitted on).
    test : ImageSet, folder or list of paths, optional
        Test images: training images that near-copy one are ``leak`` findings. Their
        features are extracted if not cached (one forward pass per new image).
    cache_dir : path, optional
        The feature cache, for a saved ``model`` (a fitted ensemble uses its own).
    threshold : float
        Cosine similarity of pooled features from which two images are near copies.
    ambiguity : float
        Probability of a second class from which an image is ``ambiguous``.
    kinds : tuple of str
        The kinds to look for (label kinds need only probabilities; the others, features).

    Returns
    -------
    Findings

    Examples
    --------
    >>> found = diagnose("artifacts/model", test="data/test")  # doctest: +SKIP
    >>> found.of_kind("label_issue").top(20).to_csv("issues.csv")  # doctest: +SKIP
    """
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown kinds {unknown}; kinds are {', '.join(KINDS)}")
    _cleanlab()
    ens = _ensemble(model, cache_dir)
    train, rows = training_set(ens, data)
    paths, ids, labels = train.paths, train.ids, train.labels
    found = []
    if {"label_issue", "ambiguous"} & set(kinds):
        found += label_findings(ens.y_[rows], ens.meta_oof_proba_[rows], ens.classes_, paths, ids, ambiguity)
    if {"outlier", "exact_duplicate", "duplicate", "leak"} & set(kinds):
        from stacker.data.sources import file_fingerprints

        parts = pooled_features(ens, train)
        means = [P.mean(axis=0) for P in parts]
        X = unit_rows(parts, means)
        fps = file_fingerprints(paths, ens.cache_dir)
        if "outlier" in kinds:
            found += outlier_findings(X, paths, ids, labels)
        if {"exact_duplicate", "duplicate"} & set(kinds):
            found += duplicate_findings(X, fps, paths, ids, labels, threshold)
        if "leak" in kinds and test is not None:
            test_set = _test_images(test)
            T = unit_rows(pooled_features(ens, test_set), means)
            found += leak_findings(X, T, fps, file_fingerprints(test_set.paths, ens.cache_dir), paths, ids, labels,
                                   test_set.paths, threshold)
    return Findings([f for f in found if f.kind in kinds], len(paths))


def _test_images(test):
    from stacker.data.inputs import expand_paths
    from stacker.data.sources import ImageSet

    if isinstance(test, ImageSet):
        return test
    paths, _ = expand_paths([os.fspath(test)] if isinstance(test, (str, os.PathLike)) else list(test))
    return ImageSet(paths, paths)


def without(images, findings, kinds=None):
    """``images`` (an ImageSet, folder or CSV) minus every path ``findings`` names.

    ``findings``: :class:`Findings`, a findings CSV, or paths; ``kinds`` keeps only
    those kinds' rows. The result is what ``stacker fit --exclude`` fits on: features of
    the remaining images come from the cache.
    """
    from stacker.data.sources import load_images

    data = load_images(images)
    if isinstance(findings, (str, os.PathLike)):
        findings = Findings.read_csv(findings)
    if isinstance(findings, Findings):
        findings = findings.of_kind(*(kinds or KINDS)).paths()
    drop = {_key(os.fspath(p)) for p in findings}
    return data.subset([r for r, p in enumerate(data.paths) if _key(p) not in drop])
