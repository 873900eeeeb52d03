"""The per-image predictions table (``--predictions``), in process: rows, losses, folds, skipped files."""

import csv
import math

import numpy as np

from stacker.app.predictions import out_of_fold_rows, write_predictions


def test_out_of_fold_rows_give_each_image_its_loss_and_fold_and_keep_skipped_files(tmp_path):
    proba = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    folds = [(np.array([1, 2]), np.array([0])), (np.array([0]), np.array([1, 2]))]
    rows = out_of_fold_rows(["a.png", "b.png", "c.png"], [0, 1, 1], proba, ["cat", "dog"], folds,
                            skipped={"d.png": "empty file (0 bytes)"}, labels={"d.png": "dog"})
    assert [r["fold"] for r in rows] == [0, 1, 1, None]
    assert [r["predicted"] for r in rows] == ["cat", "dog", "cat", None]
    assert math.isclose(rows[2]["loss"], -math.log(0.4)) and rows[3]["loss"] is None
    assert rows[3]["label"] == "dog" and rows[3]["skipped"] == "empty file (0 bytes)"
    assert all(r["path"].startswith(str(tmp_path.anchor)) for r in rows)  # absolute paths

    path = write_predictions(tmp_path / "out" / "p.csv", rows)
    with open(path, newline="") as f:
        read = list(csv.DictReader(f))
    assert list(read[0]) == ["path", "label", "fold", "predicted", "probability", "loss", "skipped", "p_cat", "p_dog"]
    worst = max(read[:3], key=lambda r: float(r["loss"]))
    assert worst["path"].endswith("c.png") and float(worst["p_dog"]) == 0.4  # floats written exactly
    assert read[3]["p_cat"] == "" and read[3]["skipped"] == "empty file (0 bytes)"
