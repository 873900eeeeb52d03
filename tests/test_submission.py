"""Kaggle submission CSVs: formats, clipping, ordering and validation errors."""

import csv

import numpy as np
import pytest

from stacker.submission import SubmissionError, read_sample_ids, write_csv


def rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_binary_redux_format_sorted_and_clipped(tmp_path):
    proba = np.array([[0.1, 0.9], [1.0, 0.0], [0.4, 0.6]])
    path = write_csv(tmp_path / "s.csv", [10, 2, 3], proba, ["cat", "dog"], eps=0.01)
    out = rows(path)
    assert out[0] == ["id", "label"]
    assert [r[0] for r in out[1:]] == ["2", "3", "10"]  # numeric ids sorted numerically
    assert [float(r[1]) for r in out[1:]] == [0.01, 0.6, 0.9]  # P(dog), clipped to [eps, 1-eps]


def test_multiclass_label_and_proba_formats(tmp_path):
    proba = np.array([[0.2, 0.5, 0.3], [0.7, 0.2, 0.1]])
    lab = rows(write_csv(tmp_path / "l.csv", ["b", "a"], proba, ["x", "y", "z"], kind="label"))
    assert lab == [["id", "label"], ["a", "x"], ["b", "y"]]
    pro = rows(write_csv(tmp_path / "p.csv", ["b", "a"], proba, ["x", "y", "z"], eps=0))
    assert pro[0] == ["id", "x", "y", "z"] and pro[1][0] == "a" and float(pro[1][1]) == 0.7


def test_sample_submission_defines_ids_and_header(tmp_path):
    sample = tmp_path / "sample.csv"
    sample.write_text("id,label\n1,0.5\n2,0.5\n3,0.5\n")
    assert read_sample_ids(sample) == [1, 2, 3]
    ok = write_csv(tmp_path / "s.csv", [3, 1, 2], np.full((3, 2), 0.5), ["cat", "dog"], sample_submission=sample)
    assert [r[0] for r in rows(ok)] == ["id", "1", "2", "3"]
    with pytest.raises(SubmissionError, match=r"missing \['3'\]"):
        write_csv(tmp_path / "s.csv", [1, 2], np.full((2, 2), 0.5), ["cat", "dog"], sample_submission=sample)
    with pytest.raises(SubmissionError, match=r"unexpected \['4'\]"):
        write_csv(tmp_path / "s.csv", [1, 2, 3, 4], np.full((4, 2), 0.5), ["cat", "dog"], sample_submission=sample)


@pytest.mark.parametrize("ids,proba,classes,kw,match", [
    ([1, 1], np.full((2, 2), 0.5), ["a", "b"], {}, "duplicate ids"),
    ([1, 2], np.full((3, 2), 0.5), ["a", "b"], {}, "2 ids for 3 rows"),
    ([1, 2], np.full((2, 3), 0.3), ["a", "b"], {}, "expected"),
    ([1, 2], np.array([[0.5, 0.5], [np.nan, np.nan]]), ["a", "b"], {}, "no prediction for 1 ids: 2"),
    ([1, 2], np.full((2, 3), 0.3), ["a", "b", "c"], {"kind": "binary"}, "needs two classes"),
    ([1, 2], np.full((2, 2), 0.5), ["a", "b"], {"positive": "dog"}, "not one of"),
    ([1, 2], np.full((2, 2), 0.5), ["a", "b"], {"eps": 0.7}, "eps must be"),
    ([1, 2], np.full((2, 2), 0.5), ["a", "b"], {"kind": "xml"}, "kind must be"),
])
def test_validation_errors(tmp_path, ids, proba, classes, kw, match):
    with pytest.raises(SubmissionError, match=match):
        write_csv(tmp_path / "s.csv", ids, proba, classes, **kw)
    assert not (tmp_path / "s.csv").exists(), "nothing is written when validation fails"
