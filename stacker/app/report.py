"""A finished run explains itself: one self-contained ``report.html``, its figures also as PNGs.

:func:`report` reads a saved ensemble directory (``manifest.json`` and ``oof.npz`` only:
no model is loaded, so runs saved in older formats are reported too) and writes a
leaderboard chart and table, level 2's weight for each learner, training curves, a
reliability diagram with the expected calibration error of the ensemble and of every
learner, a normalised confusion matrix (the most confused pairs as a table), per-class
precision/recall/F1, a sample of training images with their out-of-fold predictions, the
training images that cost the most out-of-fold log loss, how much level 2 relies on each
learner (permutation importance), and the run's configuration and environment.

:func:`evaluation_report` writes the same sections for a labelled hold-out set
(``stacker evaluate --report``): every section builder takes the labels, probabilities,
class names and image paths it shows, and a :class:`Scope` naming them (out of fold or
hold-out) and prefixing the figure files, so both reports share one implementation.

Figures are embedded in the HTML as data URIs (the file opens anywhere on its own) and
written beside it as PNGs; a figure whose section cannot be drawn this time (e.g. the
training images have moved) is deleted, so no stale figure is left next to the report.
Figures use matplotlib's non-interactive Agg backend and are widened until their titles fit.
"""

from __future__ import annotations

import base64
import html
import json
import os
from dataclasses import dataclass

import numpy as np

__all__ = ["FIGURES", "HOLDOUT", "OUT_OF_FOLD", "Scope", "calibration_bins", "confused_pairs", "confusion_counts",
           "doctor_report", "evaluation_report", "per_class", "report", "thumbnail_grid"]

FIGURES = ("leaderboard.png", "level2_weights.png", "curves.png", "reliability.png", "confusion.png", "images.png",
           "worst_images.png", "meta_importance.png")
ECE_BINS = 15
THUMB_IN, CELL_IN, CAPTION_IN, CAPTION_CHARS = 1.9, 2.2, 0.8, 30  # thumbnail box, cell width, caption band


@dataclass(frozen=True)
class Scope:
    """Whose predictions a report shows: words for its headings, and a prefix keeping its figure files apart."""

    where: str
    images: str
    prefix: str = ""


OUT_OF_FOLD = Scope("out-of-fold", "training images")
HOLDOUT = Scope("hold-out", "hold-out images", "evaluation_")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _table(header, rows) -> str:
    """An HTML table in a box that scrolls sideways when the table is wider than the page."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


# --------------------------------------------------------------------------- figure plumbing


def _title_overflow(fig, pad_px: float = 6.0) -> float:
    """Pixels by which the widest title (axes titles, suptitle) sticks out of the figure (<= 0: all fit)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    width = fig.bbox.width
    titles = [ax.title for ax in fig.axes] + [t for t in [getattr(fig, "_suptitle", None)] if t is not None]
    boxes = [t.get_window_extent(renderer) for t in titles if t.get_text()]
    return max([-np.inf] + [max(pad_px - b.x0, b.x1 - (width - pad_px)) for b in boxes])


def _fit_titles(fig) -> None:
    """Widen ``fig`` until every title fits (a narrow plot, e.g. a 2-class matrix, cuts a long title)."""
    for _ in range(4):
        over = _title_overflow(fig)
        if over <= 0:
            return
        w, h = fig.get_size_inches()
        fig.set_size_inches(w + 2 * over / fig.dpi + 0.2, h)
        fig.tight_layout()


def _save(fig, path: str, dpi: int = 100) -> None:
    _fit_titles(fig)
    fig.savefig(path, dpi=dpi)
    _plt().close(fig)


class _Page:
    """The sections of a report, and the figures written for them."""

    def __init__(self, out_dir: str, prefix: str = ""):
        self.out_dir = out_dir
        self.prefix = prefix
        self.sections: list[tuple[str, str]] = []
        self.figures: list[str] = []

    def add(self, heading: str, body: str) -> None:
        self.sections.append((heading, body))

    def figure(self, fig, name: str, alt: str, dpi: int = 100) -> str:
        """Save ``fig`` as ``name`` (with the page's prefix) and return its ``<figure>``: the PNG embedded,
        with a link to the file."""
        name = self.prefix + name
        path = os.path.join(self.out_dir, name)
        _save(fig, path, dpi)
        self.figures.append(name)
        with open(path, "rb") as f:
            data = base64.b64encode(f.read()).decode("ascii")
        return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'
                f'<figcaption><a href="{name}">{name}</a></figcaption></figure>')

    def remove_stale(self) -> None:
        """Delete figures of earlier reports whose sections were not drawn this time."""
        for name in (self.prefix + f for f in FIGURES):
            path = os.path.join(self.out_dir, name)
            if name not in self.figures and os.path.exists(path):
                os.remove(path)


# --------------------------------------------------------------------------- figures


def _leaderboard_figure(scores: dict, scope: Scope = OUT_OF_FOLD):
    plt = _plt()
    names = list(scores)
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.5 * len(names) + 1.8))
    colors = ["#d62728" if n == "ensemble" else "#1f77b4" for n in names]
    for ax, metric in zip(axes, ("log_loss", "accuracy")):
        vals = [scores[n][metric] for n in names]
        ax.barh(names, vals, color=colors)
        ax.invert_yaxis()
        ax.set_title(f"{scope.where} {metric.replace('_', ' ')}")
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.4f}", va="center", fontsize=8)
        if metric == "accuracy":
            ax.set_xlim(min(vals) - 0.05 * (1 - min(vals) + 0.01) - 0.01, 1.0)
    fig.tight_layout()
    return fig


def _curves_figure(histories: dict):
    series = {n: [h for h in hs if h] for n, hs in histories.items()}
    series = {n: hs for n, hs in series.items() if hs}
    if not series:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(series), 2, figsize=(10, 2.6 * len(series)), squeeze=False)
    for row, (name, hs) in enumerate(series.items()):
        for col, metric in enumerate(("loss", "accuracy")):
            ax = axes[row][col]
            for i, h in enumerate(hs):
                if metric in h:
                    ax.plot(h[metric], color="#1f77b4", alpha=0.6, label="train" if i == 0 else None)
                if f"val_{metric}" in h:
                    ax.plot(h[f"val_{metric}"], color="#ff7f0e", alpha=0.6, label="validation" if i == 0 else None)
            ax.set_title(f"{name}: {metric} per epoch ({len(hs)} folds)", fontsize=9)
            ax.set_xlabel("epoch")
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def confusion_counts(y, pred, k):
    """Counts ``(k, k)``: rows the true class, columns the predicted one."""
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (y, pred), 1)
    return cm


def _confusion_figure(cm, classes, scope: Scope = OUT_OF_FOLD):
    plt = _plt()
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    k = len(classes)
    size = min(14, max(5.5, 3 + 0.25 * k))
    fig, ax = plt.subplots(figsize=(size + 0.8, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(f"confusion matrix, {scope.where}\n(rows: true class, normalised)", fontsize=10)
    if k <= 30:
        ax.set_xticks(range(k), classes, rotation=90 if k > 6 else 0, fontsize=7 if k > 6 else 9)
        ax.set_yticks(range(k), classes, fontsize=7 if k > 6 else 9)
        if k <= 10:
            for i in range(k):
                for j in range(k):
                    ax.text(j, i, f"{norm[i, j]:.2f}\n({cm[i, j]})", ha="center", va="center", fontsize=8,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    return fig


def _letterbox(path: str, px: int = 160) -> np.ndarray:
    """The image scaled to fit a ``px`` square on a light background: tall and wide images take the same box."""
    from PIL import ImageOps

    from stacker.data.scan import open_file

    canvas = np.full((px, px, 3), 240, dtype=np.uint8)
    try:
        with open_file(path) as img:  # a local file or an object at a URL
            a = np.asarray(ImageOps.contain(img.convert("RGB"), (px, px)))  # small images scaled up too
    except Exception:  # noqa: BLE001 - a broken file still gets its box and caption
        return canvas
    top, left = (px - a.shape[0]) // 2, (px - a.shape[1]) // 2
    canvas[top:top + a.shape[0], left:left + a.shape[1]] = a
    return canvas


def _short(text: str, n: int = CAPTION_CHARS) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def thumbnail_grid(paths, captions, colors, title: str, cols: int = 6):
    """Thumbnails in fixed square boxes, each caption in a band below its own box.

    Cells are placed in inches (the figure's height comes from the number of rows), so
    no image, however tall or wide, reaches a neighbour's caption; caption lines are cut
    to fit a cell's width.
    """
    plt = _plt()
    rows, head = max(1, -(-len(paths) // cols)), 0.7
    width, height = CELL_IN * cols, (THUMB_IN + CAPTION_IN) * rows + head
    fig = plt.figure(figsize=(width, height))
    for i, (path, caption, color) in enumerate(zip(paths, captions, colors)):
        r, c = divmod(i, cols)
        top = height - head - r * (THUMB_IN + CAPTION_IN)
        ax = fig.add_axes(((c * CELL_IN + (CELL_IN - THUMB_IN) / 2) / width, (top - THUMB_IN) / height,
                           THUMB_IN / width, THUMB_IN / height))
        ax.imshow(_letterbox(path))
        ax.axis("off")
        ax.text(0.5, -0.03, "\n".join(_short(line) for line in caption.split("\n")), transform=ax.transAxes,
                ha="center", va="top", fontsize=8, color=color)
    fig.suptitle(title, fontsize=10, y=1 - 0.2 / height, va="top")
    return fig


def _image_grid_figure(paths, y, pred, proba, classes, scope: Scope = OUT_OF_FOLD, n: int = 24, seed: int = 0):
    ok = [i for i, p in enumerate(paths) if _present(p)]
    if not ok:
        return None
    rng = np.random.default_rng(seed)
    wrong = [i for i in ok if y[i] != pred[i]]
    right = [i for i in ok if y[i] == pred[i]]
    pick = list(rng.permutation(wrong)[: n // 2]) if wrong else []
    pick += list(rng.permutation(right)[: n - len(pick)])
    captions = [f"{'✗' if y[i] != pred[i] else '✓'} true {classes[y[i]]}\n"
                f"pred {classes[pred[i]]} ({proba[i, pred[i]]:.2f})" for i in pick]
    colors = ["#d62728" if y[i] != pred[i] else "#2ca02c" for i in pick]
    return thumbnail_grid([paths[i] for i in pick], captions, colors,
                          f"a sample of {scope.images} with {scope.where} predictions (wrong ones in red)")


def _present(path: str) -> bool:
    """Whether an image file is here to show; an object at a URL is taken as present (a request each would
    cost more than the report: one that fails still gets its box and caption)."""
    from stacker.data import storage

    return storage.is_url(path) or os.path.isfile(path)


def _worst_rows(paths, y, proba, n: int) -> list[int]:
    """The ``n`` rows with the highest log loss whose image files are present."""
    p_true = proba[np.arange(len(y)), y]
    out = []
    for i in np.argsort(p_true, kind="stable"):
        if len(out) == n:
            break
        if i < len(paths) and _present(paths[i]):
            out.append(int(i))
    return out


def _worst_figure(rows, paths, y, proba, classes, scope: Scope = OUT_OF_FOLD):
    captions = []
    for rank, i in enumerate(rows, start=1):
        pred = int(proba[i].argmax())
        captions.append(f"#{rank} {os.path.basename(paths[i])}\ntrue {classes[y[i]]}: p = {proba[i, y[i]]:.3f}\n"
                        f"pred {classes[pred]} {proba[i, pred]:.3f}")
    return thumbnail_grid([paths[i] for i in rows], captions, ["#d62728"] * len(rows),
                          f"{scope.images} with the highest {scope.where} log loss "
                          "(p = the ensemble's probability of the true class)")


def _importance_figure(importance: dict):
    if not importance:
        return None
    plt = _plt()
    names = list(importance)
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(names) + 1.5))
    ax.barh(names, [importance[n] for n in names], color="#9467bd")
    ax.invert_yaxis()
    ax.set_title("level 2: log-loss increase when a learner's inputs are shuffled", fontsize=10)
    ax.set_xlabel("permutation importance (higher = relied on more)")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- calibration


def calibration_bins(y, proba, n_bins: int = ECE_BINS) -> dict:
    """Top-label reliability of probabilities, and their expected calibration error.

    The predicted class's probability (the confidence) is binned into ``n_bins``
    equal-width bins of [0, 1] (Guo et al. 2017). Per bin: mean confidence, accuracy and
    count; ``ece`` is the count-weighted mean of ``|accuracy - confidence|``.
    """
    proba = np.asarray(proba, dtype=np.float64)
    conf, correct = proba.max(axis=1), (proba.argmax(axis=1) == np.asarray(y)).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(idx, weights=conf, minlength=n_bins) / count
        accuracy = np.bincount(idx, weights=correct, minlength=n_bins) / count
    used = count > 0
    ece = float(np.sum(count[used] * np.abs(accuracy[used] - confidence[used])) / max(len(conf), 1))
    return {"confidence": confidence, "accuracy": accuracy, "count": count, "edges": edges, "ece": ece,
            "mean_confidence": float(conf.mean()) if len(conf) else float("nan")}


def _reliability_figure(curves: dict, k: int, scope: Scope = OUT_OF_FOLD, cols: int = 4):
    """One panel per curve (the ensemble first): accuracy against confidence per bin, points sized by count."""
    plt = _plt()
    rows = (len(curves) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.1 * cols, 3.0 * rows + 0.5), squeeze=False)
    low = max(0.0, 1.0 / k - 0.05)
    for ax in axes.ravel()[len(curves):]:
        ax.axis("off")
    for ax, (name, c) in zip(axes.ravel(), curves.items()):
        used = c["count"] > 0
        color = "#d62728" if name == "ensemble" else "#1f77b4"
        ax.plot([low, 1], [low, 1], color="#999999", linestyle="--", linewidth=1)
        ax.plot(c["confidence"][used], c["accuracy"][used], color=color, linewidth=1, alpha=0.6)
        ax.scatter(c["confidence"][used], c["accuracy"][used], s=8 + 120 * np.sqrt(c["count"][used] / c["count"].max()),
                   color=color, zorder=3)
        for x, a, n in zip(c["confidence"][used], c["accuracy"][used], c["count"][used]):
            ax.annotate(str(n), (x, a), textcoords="offset points", xytext=(-5, -10), ha="right", fontsize=6,
                        color="#555555")
        ax.set_xlim(low, 1.01)
        ax.set_ylim(min(low, np.nanmin(c["accuracy"][used]) - 0.05), 1.01)
        ax.set_title(f"{name}\nECE {c['ece']:.4f}", fontsize=9, color=color)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("confidence", fontsize=7)
        ax.set_ylabel("accuracy", fontsize=7)
    fig.suptitle(f"reliability, {scope.where}: accuracy per bin of the predicted class's probability ({ECE_BINS} "
                 "equal-width bins; numbers: images per bin; dashed: perfect calibration)", fontsize=10)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- level 2's weights


def _weights_figure(weights: dict, combiner: str):
    plt = _plt()
    names, values = list(weights), [weights[n] for n in weights]
    colors = ["#1f77b4"] * len(names)
    if combiner.split("+")[0] == "stack2":
        names.append("second layer (logit, mean)")
        values.append(max(0.0, 1.0 - sum(values)))
        colors.append("#999999")
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.6))
    ax.barh(names, values, color=colors)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.8)
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.3f}", va="center", fontsize=8)
    ax.set_title(f"level 2 ({combiner}): weight of each learner", fontsize=10)
    ax.set_xlabel("weight (logit: coefficient)" if combiner.startswith("logit") else "weight")
    fig.tight_layout()
    return fig


def _level2_section(page: _Page, manifest: dict) -> None:
    level2 = manifest.get("level2")
    if not level2:
        return
    name = level2["name"]
    body = (f"<p>Chosen by cross-validated log loss: <b>{html.escape(name)}</b> (temperature "
            f"{level2['temperature']:.3f}, floor {level2['floor']:.4f}).</p>")
    weights = level2.get("weights") or {n: s["weight"] for n, s in manifest.get("scores", {}).items()
                                        if s.get("weight") is not None}
    if weights:
        from stacker.level2.registry import weight_meaning  # a saved run's name, registered or not

        body += f"<p>Weights: {html.escape(weight_meaning(name))}.</p>"
        body += page.figure(_weights_figure(weights, name), "level2_weights.png", "level-2 weights")
        body += _table(["learner", "weight"], [[n, f"{w:.4f}"] for n, w in weights.items()])
    else:
        body += (f"<p>{html.escape(name)} has no per-learner weights; the permutation importance below shows "
                 "how much it relies on each learner.</p>")
    body += "<h3>Every candidate</h3>" + _table(
        ["candidate", "log loss", "accuracy"],
        [[n, f"{c['log_loss']:.4f}", f"{c['accuracy']:.4f}"] for n, c in level2["table"].items()])
    page.add("Level 2", body)


# --------------------------------------------------------------------------- sections


def _distillation_section(page: _Page, scores: dict) -> None:
    """A distilled student (:mod:`stacker.distill`) against its teacher and its hard-label self."""
    d = scores.get("ensemble", {}).get("distilled")
    if not d:
        return
    rows = [[f"teacher ({d['teacher_learners']} learners)", f"{d['teacher']['accuracy']:.4f}",
             f"{d['teacher']['log_loss']:.4f}"],
            ["this model, trained on hard labels", f"{d['hard_labels']['accuracy']:.4f}",
             f"{d['hard_labels']['log_loss']:.4f}"],
            ["this model, distilled", f"{d['distilled']['accuracy']:.4f}", f"{d['distilled']['log_loss']:.4f}"]]
    pool = d.get("unlabeled")
    body = (f"<p>Trained on the teacher's out-of-fold probabilities of its training images (hard_weight "
            f"{d['hard_weight']}, temperature {d['temperature']}, {d['soft_rows']} soft-target rows"
            + (f"; {pool['used']} unlabelled images taught with the teacher's predictions" if pool else "")
            + "). Out of fold on the same folds: a held-out set is the fair comparison (an image's soft target "
            "in one fold came from teacher models that saw the others).</p>")
    page.add("Distillation", body + _table(["model", "accuracy", "log loss"], rows))


def _export_section(page: _Page, manifest: dict, run_dir: str) -> None:
    """Whether ``stacker export`` writes this model as one ONNX file, and what refuses it if not."""
    state = manifest.get("export")
    if state is None:  # saved by a stacker that did not check
        return
    if state["onnx"]:
        body = (f"<p>This model exports to one ONNX file (every backbone, fold model, level 2 and its "
                f"calibration; pixels in, probabilities out, runnable on plain ONNX Runtime):</p><pre>stacker export "
                f"{html.escape(run_dir)} model.onnx</pre>")
    else:
        body = (f"<p>This model cannot be exported to ONNX: {html.escape(state.get('reason', ''))}</p>"
                "<p>The first part refused is named; refit without it to export.</p>")
    page.add("Export", body)


def _leaderboard_section(page: _Page, scores: dict) -> None:
    rows = []
    for name, s in scores.items():
        spi, w = s.get("s_per_image"), s.get("weight")
        ms = f"{spi * 1000:.1f}" if spi else ("cached" if "extract_s" in s else "")
        rows.append([name, f"{s['accuracy']:.4f}", f"{s['log_loss']:.4f}", "" if w is None else f"{w:.3f}",
                     f"{s.get('extract_s', 0):.1f}", ms, f"{s.get('train_s', 0):.1f}", s.get("feature_dim", "")])
    page.add("Leaderboard (out-of-fold)", page.figure(_leaderboard_figure(scores), "leaderboard.png", "leaderboard")
             + _table(["learner", "accuracy", "log loss", "level-2 weight", "feature extraction s",
                       "inference ms/image", "training s", "feature size"], rows))


def _scores_section(page: _Page, scores: dict, scope: Scope) -> None:
    """Accuracy and log loss of the ensemble and every learner (a hold-out has no timings to show)."""
    rows = [[name, f"{s['accuracy']:.4f}", f"{s['log_loss']:.4f}"] for name, s in scores.items()]
    page.add(f"Scores ({scope.where})", page.figure(_leaderboard_figure(scores, scope), "leaderboard.png", "scores")
             + _table(["learner", "accuracy", "log loss"], rows))


def _calibration_section(page: _Page, y, probas: dict, k: int, scope: Scope = OUT_OF_FOLD) -> None:
    from stacker.level2.arrays import score

    curves = {name: calibration_bins(y, p) for name, p in probas.items()}
    rows = [[name, f"{c['ece']:.4f}", f"{score(y, probas[name], k)['log_loss']:.4f}",
             f"{c['mean_confidence']:.4f}", f"{score(y, probas[name], k)['accuracy']:.4f}"]
            for name, c in curves.items()]
    body = (f"<p>How far the probabilities are from the frequencies they claim, {scope.where}: expected calibration "
            f"error (ECE) of the top label, {ECE_BINS} equal-width bins of the predicted class's probability "
            "(the count-weighted mean of |accuracy - confidence| per bin). Log loss punishes confident "
            "mistakes; points below the diagonal are over-confident.</p>")
    body += page.figure(_reliability_figure(curves, k, scope), "reliability.png", "reliability diagram")
    page.add("Calibration", body + _table(["", "ECE", "log loss", "mean confidence", "accuracy"], rows))


def per_class(y, proba, k: int) -> dict:
    """Precision, recall, F1, support and mean log loss of each class (arrays of length ``k``).

    The log loss of a class is the mean ``-log p(class)`` over its images: which classes
    cost the score most, where precision and recall see only the top label.
    """
    from sklearn.metrics import precision_recall_fscore_support

    from stacker.app.predictions import LOSS_CLIP

    y, proba = np.asarray(y), np.asarray(proba, dtype=np.float64)
    p, r, f, support = precision_recall_fscore_support(y, proba.argmax(axis=1), labels=np.arange(k),
                                                       zero_division=0)
    loss = -np.log(np.clip(proba[np.arange(len(y)), y], LOSS_CLIP, 1.0))
    with np.errstate(invalid="ignore"):
        class_loss = np.bincount(y, weights=loss, minlength=k) / support
    return {"precision": p, "recall": r, "f1": f, "support": support, "log_loss": class_loss}


def confused_pairs(cm, classes) -> list[tuple]:
    """``(count, true, predicted)`` for every off-diagonal cell of ``cm``, most frequent first."""
    k = len(classes)
    return sorted(((int(cm[i, j]), classes[i], classes[j]) for i in range(k) for j in range(k)
                   if i != j and cm[i, j]), key=lambda t: -t[0])


def _confusion_sections(page: _Page, y, proba, classes, max_pairs: int, scope: Scope = OUT_OF_FOLD) -> None:
    k = len(classes)
    cm = confusion_counts(y, proba.argmax(axis=1), k)
    body = page.figure(_confusion_figure(cm, classes, scope), "confusion.png", "confusion matrix", dpi=90)
    page.add("Confusion matrix", body + "<h3>Most confused pairs</h3>"
             + _table(["count", "true", "predicted as"], confused_pairs(cm, classes)[:max_pairs]))
    s = per_class(y, proba, k)
    page.add("Per-class precision, recall, F1", _table(
        ["class", "precision", "recall", "F1", "images", "log loss"],
        [[c, f"{s['precision'][i]:.3f}", f"{s['recall'][i]:.3f}", f"{s['f1'][i]:.3f}", int(s["support"][i]),
          "" if np.isnan(s["log_loss"][i]) else f"{s['log_loss'][i]:.4f}"] for i, c in enumerate(classes)]))


def _not_found_note(paths, scope: Scope) -> str:
    """Why the image sections are missing: where the first image was looked for (and why relative paths fail)."""
    first = paths[0]
    note = (f"<p>None of the {len(paths)} {scope.images} were found, so the sample and the highest-loss "
            f"gallery are left out. The first one was looked for at <code>{html.escape(os.path.abspath(first))}"
            "</code>.")
    if not os.path.isabs(first):
        note += (f" The model holds paths relative to the folder its fit ran in (a model saved by an older stacker), "
                 f"so they were looked up relative to the current folder, <code>{html.escape(os.getcwd())}</code>: "
                 "run <code>stacker report</code> from the folder the fit ran in.")
    return note + "</p>"


def _image_sections(page: _Page, paths, y, proba, classes, n_worst: int, scope: Scope = OUT_OF_FOLD) -> None:
    """The image grid and the highest-loss gallery; a note saying where they were looked for when no image is here."""
    if len(paths) and not any(_present(p) for p in paths):
        page.add("Images not found", _not_found_note(paths, scope))
        return
    pred = proba.argmax(axis=1)
    fig = _image_grid_figure(paths, y, pred, proba, classes, scope)
    if fig is not None:
        page.add("Images", page.figure(fig, "images.png", "image grid", dpi=90))
    rows = _worst_rows(paths, y, proba, n_worst)
    if not rows:
        return
    loss = -np.log(np.clip(proba[np.arange(len(y)), y], 1e-15, 1.0))
    body = (f"<p>The {len(rows)} {scope.images} that cost the most {scope.where} log loss ({loss[rows].sum():.1f} "
            f"of the total {loss.sum():.1f}): often mislabelled, ambiguous or unusual photos.</p>")
    body += page.figure(_worst_figure(rows, paths, y, proba, classes, scope), "worst_images.png",
                        "highest-loss images", dpi=90)
    body += _table(["#", "file", "true", "p(true)", "predicted", "p(predicted)", "log loss"],
                   [[r + 1, paths[i], classes[y[i]], f"{proba[i, y[i]]:.4f}", classes[pred[i]],
                     f"{proba[i, pred[i]]:.4f}", f"{loss[i]:.3f}"] for r, i in enumerate(rows)])
    page.add(f"Highest {scope.where} loss", body)


def _prediction_sections(page: _Page, y, probas: dict, classes, paths, scope: Scope, max_pairs: int,
                         n_worst: int) -> None:
    """Calibration, confusion, per-class table and images of ``probas["ensemble"]``: both reports' core."""
    _calibration_section(page, y, probas, len(classes), scope)
    _confusion_sections(page, y, probas["ensemble"], classes, max_pairs, scope)
    _image_sections(page, paths, y, probas["ensemble"], classes, n_worst, scope)


def _read_run(run_dir: str) -> tuple[dict, dict | None]:
    """``manifest.json`` (any format version: only JSON is read) and ``oof.npz`` (None when absent)."""
    from stacker.io.model_dir import read_manifest

    manifest = read_manifest(run_dir, check_version=False)  # only JSON is read: any version can be reported
    oof_path = os.path.join(run_dir, "oof.npz")
    if not os.path.exists(oof_path):
        return manifest, None
    from stacker.io.bounds import checked_array_file

    with np.load(checked_array_file(oof_path), allow_pickle=False) as oof:
        return manifest, {name: oof[name] for name in oof.files}


def _oof_probas(manifest: dict, oof: dict) -> dict:
    """``"ensemble"`` then each learner's out-of-fold probabilities, by name."""
    learners = [e["name"] for e in manifest.get("learners", [])]
    return {"ensemble": oof["ensemble"], **{n: oof[f"learner_{i}"] for i, n in enumerate(learners)
                                            if f"learner_{i}" in oof}}


def report(run_dir, out_dir=None, max_pairs: int = 20, n_worst: int = 18) -> str:
    """Write ``report.html`` (self-contained) and its PNG figures for a saved ensemble.

    Parameters
    ----------
    run_dir : path
        A directory written by :meth:`stacker.Ensemble.save` (e.g. a recipe's ``--out``).
    out_dir : path, optional
        Where to write (default: ``run_dir``).
    max_pairs : int
        Rows of the most-confused-pairs table.
    n_worst : int
        Images in the highest-loss gallery.

    Returns
    -------
    str
        Path of ``report.html``.
    """
    from stacker.level2.leaderboard import format_leaderboard

    run_dir = os.fspath(run_dir)
    out_dir = os.fspath(out_dir or run_dir)
    os.makedirs(out_dir, exist_ok=True)
    manifest, oof = _read_run(run_dir)
    classes, scores = manifest["classes"], manifest.get("scores", {})
    page = _Page(out_dir)
    _leaderboard_section(page, scores)
    _level2_section(page, manifest)
    fig = _curves_figure(manifest.get("histories", {}))
    if fig is not None:
        page.add("Training curves", page.figure(fig, "curves.png", "training curves", dpi=90))
    if oof is not None:
        _prediction_sections(page, oof["y"], _oof_probas(manifest, oof), classes, manifest.get("train_paths", []),
                             OUT_OF_FOLD, max_pairs, n_worst)
    importance = manifest.get("meta_importance", {})
    fig = _importance_figure(importance)
    if fig is not None:
        page.add("How level 2 uses its inputs", page.figure(fig, "meta_importance.png", "importance") + _table(
            ["learner", "log-loss increase when shuffled"], [[n, f"{v:.4f}"] for n, v in importance.items()]))
    _distillation_section(page, scores)
    skipped = manifest.get("skipped", {})
    if skipped:
        page.add("Skipped images", _table(["file", "reason"], sorted(skipped.items())))
    _export_section(page, manifest, run_dir)
    config = {"meta": manifest.get("meta"), "meta_inputs": manifest.get("meta_inputs"), "cv": manifest.get("cv"),
              "random_state": manifest.get("random_state"), **manifest.get("config", {})}
    page.add("Configuration and environment", "<pre>" + html.escape(json.dumps(
        {"configuration": config, "environment": manifest.get("environment", {})}, indent=1, default=str)) + "</pre>")
    page.remove_stale()
    title = f"stacker report: {os.path.basename(os.path.abspath(run_dir))}"
    intro = (f"<p>{len(classes)} classes; {manifest.get('config', {}).get('n_train', '?')} training images; "
             f"stacker {html.escape(str(manifest.get('stacker_version')))}</p>"
             "<pre>" + html.escape(format_leaderboard(scores)) + "</pre>")
    return _write_html(os.path.join(out_dir, "report.html"), title, intro, page.sections)


def evaluation_report(out_dir, y, probas: dict, classes, paths, scores: dict, skipped: dict | None = None,
                      title: str = "stacker evaluation", max_pairs: int = 20, n_worst: int = 18) -> str:
    """Write ``evaluation.html``: report.html's sections for a labelled hold-out set.

    Parameters
    ----------
    out_dir : path
        Folder to write into; figures are ``evaluation_*.png``, so a model's own report is untouched.
    y : array of int
        Class index of each scored image.
    probas : dict
        ``"ensemble"`` and each learner -> probabilities ``(len(y), len(classes))``.
    classes, paths : list of str
        Class names; one image path per row of ``y``.
    scores : dict
        Name -> ``accuracy`` and ``log_loss`` (:meth:`stacker.Ensemble.evaluate`).
    skipped : dict, optional
        Path -> reason for hold-out images that could not be scored (listed in a section).

    Returns
    -------
    str
        Path of ``evaluation.html``.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    page = _Page(out_dir, HOLDOUT.prefix)
    _scores_section(page, scores, HOLDOUT)
    _prediction_sections(page, np.asarray(y), probas, list(classes), list(paths), HOLDOUT, max_pairs, n_worst)
    if skipped:
        page.add("Skipped images", _table(["file", "reason"], sorted(skipped.items())))
    page.remove_stale()
    intro = f"<p>{len(y)} hold-out images scored, {len(skipped or {})} skipped; {len(classes)} classes</p>"
    return _write_html(os.path.join(out_dir, "evaluation.html"), title, intro, page.sections)


# --------------------------------------------------------------------------- doctor

DOCTOR_TITLES = {"label_issue": "Label issues (the given label is likely wrong)",
                 "ambiguous": "Ambiguous images (a second class is likely)",
                 "outlier": "Outliers (far from every other image in feature space)",
                 "exact_duplicate": "Exact duplicates (the same bytes; beside the image kept)",
                 "duplicate": "Near duplicates (beside the image kept)",
                 "leak": "Leaks (training images beside the test image they copy)"}


def _doctor_figure(rows, kind: str, n: int):
    """The top ``n`` findings of one kind as thumbnails; duplicates and leaks as pairs (the image, then its group)."""
    paired = kind in ("exact_duplicate", "duplicate", "leak")
    rows = [r for r in rows if _present(r.path)][: n // 2 if paired else n]
    if not rows:
        return None
    paths, captions, colors = [], [], []
    for rank, r in enumerate(rows, start=1):
        change = f" -> {r.suggested}" if r.suggested else ""
        paths.append(r.path)
        captions.append(f"#{rank} {os.path.basename(r.path)}\n{r.label}{change}\nscore {r.score:.3f}")
        colors.append("#d62728")
        if paired:
            paths.append(r.group)
            captions.append(f"#{rank} {'test' if kind == 'leak' else 'kept'}: {os.path.basename(r.group)}")
            colors.append("#555555")
    return thumbnail_grid(paths, captions, colors, DOCTOR_TITLES[kind], cols=6)


def doctor_report(out_dir, findings, n: int = 24) -> str:
    """Write ``doctor.html``: per kind, thumbnails of the top ``n`` findings and a table of all of them.

    ``findings``: :class:`stacker.doctor.Findings` (or anything with ``rows`` of
    :class:`stacker.doctor.Finding` and ``n_images``). Figures are ``doctor_<kind>.png``.
    Returns the path of ``doctor.html``.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    page = _Page(out_dir, "doctor_")
    kinds = list(dict.fromkeys(r.kind for r in findings.rows))
    for kind in kinds:
        rows = [r for r in findings.rows if r.kind == kind]
        fig = _doctor_figure(rows, kind, n)
        table = _table(["path", "score", "label", "suggested", "group"],
                       [(r.path, f"{r.score:.3f}", r.label, r.suggested, r.group) for r in rows[:500]])
        more = f"<p>{len(rows) - 500} more in the CSV</p>" if len(rows) > 500 else ""
        page.add(f"{DOCTOR_TITLES[kind]}: {len(rows)}",
                 (page.figure(fig, f"{kind}.png", DOCTOR_TITLES[kind]) if fig else
                  "<p>None of these image files was found to show.</p>") + table + more)
    intro = (f"<p>{findings.n_images} training images checked; {len(findings.rows)} findings"
             + ("" if kinds else ": nothing found") + ". <code>stacker fit --exclude findings.csv</code> fits "
             "without the rows you keep in the CSV.</p>")
    return _write_html(os.path.join(out_dir, "doctor.html"), "stacker doctor", intro, page.sections)


CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
       ".scroll{max-width:100%;overflow-x:auto}"
       "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
       "text-align:right;white-space:nowrap}td:first-child,th:first-child{text-align:left}img{max-width:100%}"
       "figure{margin:1em 0}figcaption{font-size:80%;color:#666}"
       "pre{background:#f6f6f6;padding:1em;max-width:100%;box-sizing:border-box;overflow-x:auto}")


def _write_html(path: str, title: str, intro: str, sections) -> str:
    """One HTML file; wide text and tables scroll inside their own box, never the page sideways."""
    page = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
            f"<style>{CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>", intro]
    page += [f"<h2>{html.escape(heading)}</h2>{body}" for heading, body in sections]
    page.append("</body></html>")
    with open(path, "w") as f:
        f.write("\n".join(page))
    return path
