"""Label slips (``Cat`` beside ``cat``, ``'cat '``, empty labels) are refused where images are read, or merged."""

import os

import pytest

from conftest import TINY, make_image
from stacker.data.sources import ImageSet, from_csv, from_folder, load_images
from stacker.ensemble import Ensemble
from stacker.features.extractor import forward_pass_count


def _csv(path, rows):
    path.write_text("path,label\n" + "".join(f"{p},{label}\n" for p, label in rows))
    return path


def test_csv_labels_differing_in_case_or_spaces_are_refused_with_their_lines(tmp_path):
    rows = [(f"img/{i}.jpg", "leopards") for i in range(5)] + [("img/12.jpg", "Leopards"), ("img/13.jpg", " leopards")]
    rows += [(f"img/c{i}.jpg", "cat") for i in range(3)]
    path = _csv(tmp_path / "train.csv", rows)
    with pytest.raises(ValueError) as err:
        from_csv(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: labels that differ only in case or spaces: ")
    assert "'Leopards' (1 row: line 7 img/12.jpg)" in msg
    assert "' leopards' (1 row: line 8 img/13.jpg)" in msg
    assert "'leopards' (5 rows: line 2 img/0.jpg, line 3 img/1.jpg, line 4 img/2.jpg, ...)" in msg
    assert "merge_labels=True" in msg and "'cat'" not in msg


def test_empty_labels_are_refused_with_their_lines_even_when_merging(tmp_path):
    path = _csv(tmp_path / "train.csv", [("a.jpg", "cat"), ("b.jpg", ""), ("c.jpg", "dog"), ("d.jpg", "  ")])
    for merge in (False, True):
        with pytest.raises(ValueError, match=r"train.csv: 2 rows have an empty label "
                                             r"\(line 3 b.jpg, line 5 d.jpg\): label or remove them"):
            load_images(path, merge_labels=merge)


def test_merge_takes_the_most_frequent_spelling_and_ties_the_first_sorted(tmp_path):
    rows = [("a.jpg", "cat"), ("b.jpg", "Cat"), ("c.jpg", "Cat"), ("d.jpg", "dog "), ("e.jpg", "dog"),
            ("f.jpg", "big  owl"), ("g.jpg", "Big Owl"), ("h.jpg", "Big Owl")]
    data = load_images(_csv(tmp_path / "train.csv", rows), merge_labels=True)
    assert data.labels == ["Cat", "Cat", "Cat", "dog", "dog", "Big Owl", "Big Owl", "Big Owl"]
    assert data.classes == ["Big Owl", "Cat", "dog"]  # 'dog' < 'dog ' on a tie


def _case_sensitive(folder) -> bool:
    (folder / "probe").mkdir()
    sensitive = not (folder / "PROBE").exists()
    (folder / "probe").rmdir()
    return sensitive


def test_class_folders_and_kaggle_names_differing_in_case_are_refused_or_merged(tmp_path):
    if not _case_sensitive(tmp_path):
        pytest.skip("a case-insensitive file system cannot hold cat/ and Cat/")
    folders = tmp_path / "folders"
    for c, n in (("cat", 3), ("Cat", 1), ("dog", 3)):
        (folders / c).mkdir(parents=True)
        for i in range(n):
            make_image(folders / c / f"{i}.png", (200, 60, 50), seed=i)
    with pytest.raises(ValueError, match=r"'Cat' \(1 image: Cat/0.png\) and 'cat' \(3 images: cat/0.png, "):
        load_images(folders)
    merged = from_folder(folders, merge_labels=True)
    assert merged.classes == ["cat", "dog"] and merged.labels.count("cat") == 4
    kaggle = tmp_path / "kaggle"
    kaggle.mkdir()
    for name in ("cat.1.jpg", "Cat.2.jpg", "cat.3.jpg", "dog.1.jpg", "dog.2.jpg"):
        make_image(kaggle / name, (50, 80, 200))
    with pytest.raises(ValueError, match=r"'Cat' \(1 image: Cat.2.jpg\) and 'cat' \(2 images"):
        load_images(kaggle)
    assert load_images(kaggle, merge_labels=True).classes == ["cat", "dog"]


def test_an_image_set_given_to_fit_is_checked_before_any_forward_pass(tmp_path):
    paths = [str(make_image(tmp_path / f"{i}.png", (200, 60, 50), seed=i)) for i in range(8)]
    labels = ["cat", "cat", "cat", "CAT", "dog", "dog", "dog", "dog"]
    before = forward_pass_count()
    with pytest.raises(ValueError, match=rf"'CAT' \(1 image: {paths[3]}\) and 'cat' \(3 images"):
        Ensemble([TINY], cv=2, models="logistic", verbose=0).fit(ImageSet(paths, paths, labels))
    assert forward_pass_count() == before
    merged = load_images(ImageSet(paths, paths, labels), merge_labels=True)
    assert merged.classes == ["cat", "dog"]


def test_fit_without_labels_says_how_to_label_and_what_it_found(tmp_path):
    for i in range(1, 5):
        make_image(tmp_path / f"{i}.png", (200, 60, 50), seed=i)
    with pytest.raises(ValueError) as err:
        Ensemble([TINY], cv=2, models="logistic", verbose=0).fit(str(tmp_path))
    msg = str(err.value)
    for part in ("fit needs labelled images", "class sub-folders (train/cat/1.jpg)", "(cat.1.jpg)",
                 "a CSV with path,label columns", f"found 4 images without labels in {os.path.abspath(tmp_path)}",
                 "(e.g. 1.png, 2.png, 3.png, ...)"):
        assert part in msg, (part, msg)
