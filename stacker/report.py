"""A finished run explains itself: ``report.html`` with PNG figures beside it.

:func:`report` reads a saved ensemble directory (manifest, out-of-fold arrays, training
histories) and writes, next to it, a leaderboard chart and table, training curves, a
normalised confusion matrix (the most confused pairs as a table when there are many
classes), a per-class precision/recall/F1 table, a grid of training images with their
true and out-of-fold predicted labels (wrong ones marked), how much the meta-learner
relies on each base learner (permutation importance), and the run's configuration and
environment. Figures use matplotlib's non-interactive Agg backend.
"""

from __future__ import annotations

import html
import json
import os

import numpy as np

__all__ = ["report"]

FIGURES = ("leaderboard.png", "curves.png", "confusion.png", "images.png", "meta_importance.png")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _table(header, rows) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _leaderboard_figure(scores: dict, path: str) -> None:
    plt = _plt()
    names = list(scores)
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.5 * len(names) + 1.8))
    colors = ["#d62728" if n == "ensemble" else "#1f77b4" for n in names]
    for ax, metric in zip(axes, ("log_loss", "accuracy")):
        vals = [scores[n][metric] for n in names]
        ax.barh(names, vals, color=colors)
        ax.invert_yaxis()
        ax.set_title(f"out-of-fold {metric.replace('_', ' ')}")
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.4f}", va="center", fontsize=8)
        if metric == "accuracy":
            ax.set_xlim(min(vals) - 0.05 * (1 - min(vals) + 0.01) - 0.01, 1.0)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _curves_figure(histories: dict, path: str) -> bool:
    series = {n: [h for h in hs if h] for n, hs in histories.items()}
    series = {n: hs for n, hs in series.items() if hs}
    if not series:
        return False
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
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _confusion(y, pred, k):
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (y, pred), 1)
    return cm


def _confusion_figure(cm, classes, path: str) -> None:
    plt = _plt()
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    k = len(classes)
    size = min(14, 3 + 0.25 * k)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title("confusion matrix (rows: true, normalised; out-of-fold)")
    if k <= 30:
        ax.set_xticks(range(k), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(k), classes, fontsize=7)
        if k <= 10:
            for i in range(k):
                for j in range(k):
                    ax.text(j, i, f"{norm[i, j]:.2f}\n({cm[i, j]})", ha="center", va="center", fontsize=8,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _image_grid_figure(paths, y, pred, proba, classes, path: str, n: int = 24, seed: int = 0) -> bool:
    from PIL import Image

    ok = [i for i, p in enumerate(paths) if os.path.isfile(p)]
    if not ok:
        return False
    rng = np.random.default_rng(seed)
    wrong = [i for i in ok if y[i] != pred[i]]
    right = [i for i in ok if y[i] == pred[i]]
    pick = list(rng.permutation(wrong)[: n // 2]) if wrong else []
    pick += list(rng.permutation(right)[: n - len(pick)])
    plt = _plt()
    cols = 6
    rows = (len(pick) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.5 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), pick):
        try:
            with Image.open(paths[i]) as img:
                img = img.convert("RGB")
                img.thumbnail((160, 160))
                ax.imshow(np.asarray(img))
        except Exception:  # noqa: BLE001 - a broken file still gets its caption
            pass
        bad = y[i] != pred[i]
        ax.set_title(f"{'✗' if bad else '✓'} true {classes[y[i]]}\npred {classes[pred[i]]} ({proba[i, pred[i]]:.2f})",
                     fontsize=8, color="#d62728" if bad else "#2ca02c")
    fig.suptitle("training images with out-of-fold predictions (wrong ones in red)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _importance_figure(importance: dict, path: str) -> bool:
    if not importance:
        return False
    plt = _plt()
    names = list(importance)
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(names) + 1.5))
    ax.barh(names, [importance[n] for n in names], color="#9467bd")
    ax.invert_yaxis()
    ax.set_title("meta-learner: log-loss increase when a learner's inputs are shuffled")
    ax.set_xlabel("permutation importance (higher = relied on more)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def report(run_dir, out_dir=None, max_pairs: int = 20) -> str:
    """Write ``report.html`` and its PNG figures for a saved ensemble.

    Parameters
    ----------
    run_dir : path
        A directory written by :meth:`stacker.Ensemble.save` (e.g. a recipe's ``--out``).
    out_dir : path, optional
        Where to write (default: ``run_dir``).
    max_pairs : int
        Rows of the most-confused-pairs table.

    Returns
    -------
    str
        Path of ``report.html``.
    """
    from sklearn.metrics import precision_recall_fscore_support

    from .ensemble import format_leaderboard, read_manifest

    run_dir = os.fspath(run_dir)
    out_dir = os.fspath(out_dir or run_dir)
    os.makedirs(out_dir, exist_ok=True)
    manifest = read_manifest(run_dir)
    classes = manifest["classes"]
    k = len(classes)
    scores = manifest.get("scores", {})
    sections = []
    figures = []

    _leaderboard_figure(scores, os.path.join(out_dir, "leaderboard.png"))
    figures.append("leaderboard.png")
    rows = []
    for name, s in scores.items():
        spi = s.get("s_per_image")
        w = s.get("weight")
        rows.append([name, f"{s['accuracy']:.4f}", f"{s['log_loss']:.4f}", "" if w is None else f"{w:.3f}",
                     f"{s.get('extract_s', 0):.1f}", f"{spi * 1000:.1f}" if spi else ("cached" if "extract_s" in s else ""),
                     f"{s.get('train_s', 0):.1f}", s.get("feature_dim", "")])
    sections.append(("Leaderboard (out-of-fold)", '<img src="leaderboard.png" alt="leaderboard">' + _table(
        ["learner", "accuracy", "log loss", "level-2 weight", "feature extraction s", "inference ms/image",
         "training s", "feature size"], rows)))
    level2 = manifest.get("level2")
    if level2:
        sections.append(("Level 2", f"<p>Chosen by cross-validated log loss: <b>{html.escape(level2['name'])}</b> "
                         f"(temperature {level2['temperature']:.3f}, floor {level2['floor']:.4f}).</p>" + _table(
                             ["candidate", "log loss", "accuracy"],
                             [[n, f"{c['log_loss']:.4f}", f"{c['accuracy']:.4f}"] for n, c in level2["table"].items()])))

    if _curves_figure(manifest.get("histories", {}), os.path.join(out_dir, "curves.png")):
        figures.append("curves.png")
        sections.append(("Training curves", '<img src="curves.png" alt="training curves">'))

    oof_path = os.path.join(run_dir, "oof.npz")
    if os.path.exists(oof_path):
        with np.load(oof_path, allow_pickle=False) as oof:
            y, proba = oof["y"], oof["ensemble"]
        pred = proba.argmax(axis=1)
        cm = _confusion(y, pred, k)
        _confusion_figure(cm, classes, os.path.join(out_dir, "confusion.png"))
        figures.append("confusion.png")
        body = '<img src="confusion.png" alt="confusion matrix">'
        off = [(cm[i, j], classes[i], classes[j]) for i in range(k) for j in range(k) if i != j and cm[i, j]]
        off.sort(reverse=True)
        body += "<h3>Most confused pairs</h3>" + _table(["count", "true", "predicted as"], off[:max_pairs])
        sections.append(("Confusion matrix", body))
        p, r, f, support = precision_recall_fscore_support(y, pred, labels=np.arange(k), zero_division=0)
        sections.append(("Per-class precision, recall, F1", _table(
            ["class", "precision", "recall", "F1", "images"],
            [[c, f"{p[i]:.3f}", f"{r[i]:.3f}", f"{f[i]:.3f}", int(support[i])] for i, c in enumerate(classes)])))
        if _image_grid_figure(manifest.get("train_paths", []), y, pred, proba, classes,
                              os.path.join(out_dir, "images.png")):
            figures.append("images.png")
            sections.append(("Images", '<img src="images.png" alt="image grid">'))

    importance = manifest.get("meta_importance", {})
    if _importance_figure(importance, os.path.join(out_dir, "meta_importance.png")):
        figures.append("meta_importance.png")
        sections.append(("How the meta-learner uses its inputs", '<img src="meta_importance.png" alt="importance">'
                         + _table(["learner", "log-loss increase when shuffled"],
                                  [[n, f"{v:.4f}"] for n, v in importance.items()])))

    skipped = manifest.get("skipped", {})
    if skipped:
        sections.append(("Skipped images", _table(["file", "reason"], sorted(skipped.items()))))
    config = {"meta": manifest.get("meta"), "meta_inputs": manifest.get("meta_inputs"), "cv": manifest.get("cv"),
              "random_state": manifest.get("random_state"), **manifest.get("config", {})}
    sections.append(("Configuration and environment",
                     "<pre>" + html.escape(json.dumps({"configuration": config,
                                                       "environment": manifest.get("environment", {})},
                                                      indent=1, default=str)) + "</pre>"))
    title = f"stacker report: {os.path.basename(os.path.abspath(run_dir))}"
    page = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
            "text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%}"
            "pre{background:#f6f6f6;padding:1em;overflow:auto}</style></head><body>",
            f"<h1>{html.escape(title)}</h1>",
            f"<p>{len(classes)} classes; {manifest.get('config', {}).get('n_train', '?')} training images; "
            f"stacker {html.escape(str(manifest.get('stacker_version')))}</p>",
            "<pre>" + html.escape(format_leaderboard(scores)) + "</pre>"]
    for heading, body in sections:
        page.append(f"<h2>{html.escape(heading)}</h2>{body}")
    page.append("</body></html>")
    path = os.path.join(out_dir, "report.html")
    with open(path, "w") as f:
        f.write("\n".join(page))
    return path
