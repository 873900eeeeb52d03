"""report.html's layout: wide text scrolls in its own box, thumbnails never cover captions (issue 27)."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from stacker.app import report as rep

CLASSES = ["a very long class name indeed", "tall", "wide"]


@pytest.fixture(scope="module")
def tall_and_wide(tmp_path_factory):
    """12 images: very tall (12 x 400), very wide (400 x 12) and square, and their out-of-fold arrays."""
    root = tmp_path_factory.mktemp("layout")
    sizes = [(12, 400), (400, 12), (40, 40)]
    paths = []
    for i in range(12):
        w, h = sizes[i % 3]
        path = root / "images" / f"image_with_a_rather_long_file_name_{i:02d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(np.full((h, w, 3), 30 * (i % 8), dtype=np.uint8)).save(path)
        paths.append(str(path))
    y = np.arange(12) % 3
    proba = np.full((12, 3), 0.25)
    proba[np.arange(12), (y + np.arange(12) // 3) % 3] = 0.5  # a quarter right, the rest wrong
    return root, paths, y, proba


def _captions_and_images(fig):
    """Every text drawn in the image cells (titles and texts, not the suptitle) and every image's box."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    cells = []
    for ax in fig.axes:
        texts = [t for t in [ax.title, *ax.texts] if t.get_text()]
        images = [im.get_window_extent(renderer) for im in ax.images]
        cells.append(([t.get_window_extent(renderer) for t in texts], images))
    return cells


@pytest.mark.parametrize("which", ["sample", "worst"])
def test_no_caption_overlaps_another_image_or_caption(tall_and_wide, which):
    _, paths, y, proba = tall_and_wide
    if which == "sample":
        fig = rep._image_grid_figure(paths, y, proba.argmax(axis=1), proba, CLASSES)
    else:
        fig = rep._worst_figure(list(range(12)), paths, y, proba, CLASSES)
    cells = _captions_and_images(fig)
    assert sum(len(images) for _, images in cells) == 12
    for i, (captions, _) in enumerate(cells):
        for caption in captions:
            for j, (other_captions, images) in enumerate(cells):
                if j == i:
                    continue
                for box in images + other_captions:
                    assert not caption.overlaps(box), f"caption of cell {i} overlaps cell {j}"
    rep._plt().close(fig)


def test_thumbnail_boxes_are_squares_of_one_size_and_the_figure_grows_with_rows(tall_and_wide):
    _, paths, _, _ = tall_and_wide
    heights = []
    for n in (6, 12):
        fig = rep.thumbnail_grid(paths[:n], ["x\ny\nz"] * n, ["black"] * n, "title")
        boxes = {(round(ax.bbox.width), round(ax.bbox.height)) for ax in fig.axes}
        assert len(boxes) == 1 and len({*next(iter(boxes))}) == 1, "one square box per thumbnail"
        heights.append(fig.get_size_inches()[1])
        rep._plt().close(fig)
    assert heights[1] - heights[0] == pytest.approx(rep.THUMB_IN + rep.CAPTION_IN), "one row more, one cell taller"


def _css_rules(html):
    css = re.search(r"<style>(.*?)</style>", html, re.S).group(1)
    return {sel.strip(): dict(d.split(":", 1) for d in decls.split(";") if d.strip())
            for sel, decls in re.findall(r"([^{}]+)\{([^}]*)\}", css)}


def test_wide_leaderboard_and_tables_scroll_inside_the_page(tall_and_wide, tmp_path):
    root, paths, y, proba = tall_and_wide
    run = tmp_path / "run"
    run.mkdir()
    scores = {f"a_backbone_with_a_long_name_{i}:logistic": {"accuracy": 0.5, "log_loss": 0.9} for i in range(3)}
    scores["ensemble"] = {"accuracy": 0.6, "log_loss": 0.8, "combiner": "logit+T",
                          "candidates": {f"candidate_{i}": {"log_loss": 0.8, "accuracy": 0.6} for i in range(40)}}
    manifest = {"format": "stacker-ensemble", "classes": CLASSES, "scores": scores, "train_paths": paths,
                "config": {"n_train": 12}}
    (run / "manifest.json").write_text(json.dumps(manifest))
    np.savez(run / "oof.npz", y=y, ensemble=proba)
    html = open(rep.report(run)).read()
    rules = _css_rules(html)
    pre = rules["pre"]
    assert pre.get("overflow-x", pre.get("overflow")) in ("auto", "scroll") and pre["max-width"] == "100%"
    scroll = [sel for sel, d in rules.items() if d.get("overflow-x") == "auto"
              and sel.startswith(".") and d.get("max-width") == "100%"]
    assert scroll, "a class whose box scrolls sideways"
    tables = html.count("<table>")
    assert tables > 3 and html.count(f'<div class="{scroll[0][1:]}"><table>') == tables, "every table scrolls"
    assert "<h2>Images</h2>" in html and "<h2>Highest out-of-fold loss</h2>" in html
    with Image.open(run / "worst_images.png") as img:
        assert img.size[1] > img.size[0] / 3, "two rows of thumbnails with captions"
