"""The out-of-fold leaderboard as text: every learner's scores and timings, then level 2's choice."""

from __future__ import annotations

__all__ = ["format_leaderboard", "text_columns"]


def format_leaderboard(scores: dict) -> str:
    """Text table per learner (accuracy, log loss, level-2 weight, timings), then level 2's choice."""
    top5 = any("top5_accuracy" in s for s in scores.values())
    rows = [("learner", "accuracy") + (("top5",) if top5 else ()) + ("log_loss", "weight", "extract_s",
                                                                      "ms/image", "train_s", "dim")]
    for name, s in scores.items():
        spi, w = s.get("s_per_image"), s.get("weight")
        rows.append((name, f"{s['accuracy']:.4f}") + ((f"{s.get('top5_accuracy', 0):.4f}",) if top5 else ()) + (
            f"{s['log_loss']:.4f}", "" if w is None else f"{w:.3f}",
            f"{s['extract_s']:.1f}" if "extract_s" in s else "",
            f"{spi * 1000:.1f}" if spi else "cached" if "extract_s" in s else "",
            f"{s.get('train_s', 0):.1f}", str(s.get("feature_dim", ""))))
    lines = text_columns(rows)
    lines.insert(1, "-" * len(lines[0]))
    ens = scores.get("ensemble", {})
    if ens.get("weighted"):
        lines.append(f"scores weighted ({ens['weighted']}): accuracy and log loss are weighted means"
                     + (", so accuracy is the balanced accuracy" if "class_weight=balanced" in ens["weighted"]
                        and "sample_weight" not in ens["weighted"] else ""))
    if ens.get("pseudo_labels"):
        from stacker.pseudo_labels import summary_line

        lines.append(summary_line(ens["pseudo_labels"]))
    if ens.get("distilled"):
        from stacker.distill import summary_line as distilled_line

        lines.append(distilled_line(ens["distilled"]))
    if ens.get("combiner"):
        lines.append(f"level 2: {ens['combiner']} (temperature {ens.get('temperature', 1.0):.3f}, "
                     f"floor {ens.get('floor', 0.0):.4f}); cross-validated log loss of each candidate:")
        lines.append("  " + ", ".join(f"{n} {c['log_loss']:.4f}" for n, c in ens.get("candidates", {}).items()))
    return "\n".join(lines)


def text_columns(rows, right=None) -> list[str]:
    """Rows of strings as columns two spaces apart, each as wide as its widest cell (rows may be shorter).

    ``right``: the column indices aligned right (default: all but the first, the name column).
    Every text table stacker prints (leaderboard, evaluate, predict) is laid out here.
    """
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(max(len(r) for r in rows))]
    right = set(range(1, len(widths))) if right is None else set(right)
    return ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
            for r in rows]
