"""Images in object storage: ``s3://`` URLs read like local paths, on a real S3-compatible server.

The server is moto's, started on localhost by ``s3server.s3_server`` (s3fs speaks HTTP to
it, as to S3). Skipped, with the install line, without s3fs and moto[server].
"""

import csv
import json
import sys

import numpy as np
import pytest

from conftest import TINY, make_class_folders, make_image, save_tiny_weights
import s3server

s3_server = s3server.s3_server  # the session fixture, under its name

pytestmark = pytest.mark.s3

N_PER_CLASS = 6


@pytest.fixture(scope="module")
def store(s3_server, tmp_path_factory):
    """The same images on disk and at ``s3://images-<n>/``: a labelled train folder and a Kaggle test folder."""
    root = tmp_path_factory.mktemp("s3data")
    make_class_folders(root / "train", N_PER_CLASS)
    (root / "test").mkdir()
    for i in range(1, 5):
        make_image(root / "test" / f"{i}.png", (200, 60, 50) if i % 2 else (50, 80, 200), seed=300 + i)
    with open(root / "sample_submission.csv", "w") as f:
        f.write("id,label\n" + "".join(f"{i},0.5\n" for i in range(1, 5)))
    bucket = s3_server.bucket(f"images-{root.name.replace('_', '-').lower()}"[:60])
    s3_server.upload(root, bucket)
    return root, bucket, s3_server


def _put(server, bucket, key, path) -> str:
    """Upload one local file to ``bucket/key`` (replacing what is there); its URL."""
    server.client().upload_file(str(path), bucket[len("s3://"):], key)
    return f"{bucket}/{key}"


def _ensemble(cache_dir, weights):
    from stacker.ensemble import Ensemble

    return Ensemble(backbones=[{**TINY, "weights": weights, "models": "logistic"}], cv=2, random_state=0,
                    cache_dir=str(cache_dir), verbose=0)


@pytest.fixture(scope="module")
def fitted(store, tmp_path_factory):
    """One ensemble fitted from the local folder, one from its ``s3://`` copy, each with a cache of its own."""
    root, bucket, _ = store
    work = tmp_path_factory.mktemp("s3fit")
    weights = save_tiny_weights(work / "tiny.weights.h5")
    local = _ensemble(work / "local-cache", weights).fit(str(root / "train"))
    remote = _ensemble(work / "s3-cache", weights).fit(f"{bucket}/train")
    return local, remote, work, weights


def test_fit_and_predict_from_s3_give_the_local_probabilities(store, fitted):
    root, bucket, _ = store
    local, remote, _, _ = fitted
    assert remote.train_paths_[0].startswith(f"{bucket}/train/cat/")
    assert remote.train_ids_ == local.train_ids_, "ids are paths relative to the folder, as for local files"
    np.testing.assert_array_equal(remote.meta_oof_proba_, local.meta_oof_proba_)
    np.testing.assert_array_equal(remote.predict_proba(f"{bucket}/test"), local.predict_proba(str(root / "test")))
    one = remote.predict_proba([f"{bucket}/test/3.png"])
    np.testing.assert_array_equal(one, local.predict_proba([str(root / "test" / "3.png")]))


def test_the_same_bytes_at_another_url_or_on_disk_hit_the_feature_cache(store, fitted):
    from stacker.features.extractor import FeatureExtractor, forward_pass_count

    root, bucket, server = store
    _, remote, work, weights = fitted
    server.upload(root / "train" / "dog", f"{bucket}/copied/elsewhere")  # new keys, the same bytes
    ext = FeatureExtractor(TINY["backbone"], weights=weights, input_size=32, cache_dir=remote.cache_dir, verbose=0)
    before = forward_pass_count()
    moved = ext.extract([f"{bucket}/copied/elsewhere/{i}.png" for i in range(N_PER_CLASS)])
    on_disk = ext.extract([str(root / "train" / "dog" / f"{i}.png") for i in range(N_PER_CLASS)])
    assert forward_pass_count() == before, "features of known bytes must come from the cache"
    assert len(moved.kept) == len(on_disk.kept) == N_PER_CLASS
    np.testing.assert_array_equal(moved.values, on_disk.values)


def test_a_changed_object_is_read_again_and_an_unchanged_one_is_not(store, tmp_path, monkeypatch):
    from stacker.data import fingerprint, storage

    root, bucket, server = store
    url = _put(server, bucket, "changing/1.png", root / "test" / "1.png")
    cache = str(tmp_path / "cache")
    first, _ = fingerprint.fingerprints([url], cache)
    reads = []
    monkeypatch.setattr(storage, "read_bytes", lambda p, _read=storage.read_bytes: reads.append(p) or _read(p))
    assert fingerprint.fingerprints([url], cache)[0] == first and reads == [], "the memo knows this version"
    _put(server, bucket, "changing/1.png", root / "test" / "2.png")
    second, _ = fingerprint.fingerprints([url], cache)
    assert reads == [url], "a new ETag: the object is read again"
    assert second != first and second == fingerprint.fingerprints([str(root / "test" / "2.png")])[0]


def test_a_folder_listing_gives_each_object_the_version_asking_for_it_alone(store, monkeypatch):
    from stacker.data import storage

    _, bucket, _ = store
    urls = [f"{bucket}/train/cat/{i}.png" for i in range(N_PER_CLASS)] + [f"{bucket}/train/cat/none.png"]
    alone = storage.stats(urls)
    monkeypatch.setattr(storage, "_LISTED", 2)  # from one listing of the folder
    listed = storage.stats(urls)
    assert listed[:-1] == alone[:-1] and all(s.st_size > 0 for s in listed[:-1])
    assert isinstance(listed[-1], FileNotFoundError) and isinstance(alone[-1], FileNotFoundError)


def test_missing_empty_and_folder_objects_are_listed_with_their_reasons(store, fitted):
    from stacker.data.sources import BadImageError, load_images

    root, bucket, server = store
    _, remote, _, _ = fitted
    server.client().put_object(Bucket=bucket[len("s3://"):], Key="odd/empty.png", Body=b"")
    asked = [f"{bucket}/test/1.png", f"{bucket}/test/nothing-here.png", f"{bucket}/odd/empty.png", f"{bucket}/train"]
    proba, skipped = remote.predict_with_skipped(asked, on_bad_image="skip")
    assert skipped == {1: "file not found", 2: "empty file (0 bytes)", 3: "a directory, not an image file"}
    assert np.isfinite(proba[0]).all() and np.isnan(proba[1:]).all()
    with pytest.raises(BadImageError, match="nothing-here.png: file not found"):
        remote.predict_proba([f"{bucket}/test/nothing-here.png"])
    with pytest.raises(FileNotFoundError, match=r"'s3://.*/no/such/prefix' does not exist \(no objects"):
        load_images(f"{bucket}/no/such/prefix")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_images("s3://no-such-bucket-anywhere/train")


def test_a_csv_at_a_url_and_csv_rows_that_are_urls(store, tmp_path):
    from stacker.data.sources import load_images

    root, bucket, server = store
    rows = "path,label\ncat/0.png,cat\ndog/1.png,dog\n"
    (tmp_path / "labels.csv").write_text(rows)
    server.upload(tmp_path, f"{bucket}/train")  # beside the class folders: relative rows point there
    relative = load_images(f"{bucket}/train/labels.csv")
    assert relative.paths == [f"{bucket}/train/cat/0.png", f"{bucket}/train/dog/1.png"]
    (tmp_path / "urls.csv").write_text(f"path,label\n{bucket}/train/cat/0.png,cat\n{root}/train/dog/1.png,dog\n")
    mixed = load_images(tmp_path / "urls.csv")
    assert mixed.paths == [f"{bucket}/train/cat/0.png", f"{root}/train/dog/1.png"] and mixed.labels == ["cat", "dog"]


def test_a_trailing_slash_or_a_bucket_root_names_the_same_folder(store):
    from stacker.data.sources import load_images

    _, bucket, _ = store
    plain = load_images(f"{bucket}/train")
    assert load_images(f"{bucket}/train/").paths == plain.paths and load_images(f"{bucket}/train/").ids == plain.ids
    assert repr(plain).endswith(f"root='{bucket}/train')")
    test = load_images(f"{bucket}/test/", labelled=False)
    assert test.ids == [1, 2, 3, 4] and test.paths[0] == f"{bucket}/test/1.png"


def test_file_urls_are_local_paths(store):
    from stacker.data.inputs import as_images

    root, _, _ = store
    data = as_images((root / "test").as_uri())
    assert data.paths[0] == str(root / "test" / "1.png") and data.ids == [1, 2, 3, 4]


def test_a_scheme_without_its_backend_names_the_extra_to_install(store, monkeypatch):
    import fsspec

    from stacker.data.inputs import as_images

    with pytest.raises(ValueError, match=r"unknown URL scheme nosuchstore:// .*pip install 'stacker\[s3\]'"):
        as_images("nosuchstore://bucket/test")
    for scheme, package, extra in (("gs", "gcsfs", "gcs"), ("az", "adlfs", "azure")):
        if scheme in fsspec.registry:  # implementations imported so far
            pytest.skip(f"{package} is already imported in this process")
        monkeypatch.setitem(sys.modules, package, None)  # as when it is not installed
        with pytest.raises(ImportError, match=rf"{scheme}:// URLs .* needs {package}: pip install 'stacker\[{extra}\]'"):
            as_images(f"{scheme}://bucket/test")


def test_cli_predict_extract_and_submit_read_s3(store, fitted, tmp_path, capsys):
    from stacker.app.cli import main

    root, bucket, server = store
    local, remote, work, weights = fitted
    model = str(tmp_path / "model")
    remote.save(model)
    capsys.readouterr()
    assert main(["predict", model, f"{bucket}/test", "--json", "--cache", remote.cache_dir, "--quiet"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in rows] == [f"{bucket}/test/{i}.png" for i in range(1, 5)]
    expected = local.predict_proba(str(root / "test"))
    np.testing.assert_allclose([[r[c] for c in local.classes_] for r in rows], expected, rtol=0, atol=1e-12)

    cache = str(tmp_path / "cache")
    assert main(["extract", f"{bucket}/train", "--backbones", "tiny_cnn", "--weights", weights, "--image-size", "32",
                 "--cache", cache, "--quiet"]) == 0
    assert f"tiny_cnn: {2 * N_PER_CLASS} images cached" in capsys.readouterr().out

    out = f"{bucket}/submissions/first.csv"
    assert main(["submit", model, f"{bucket}/test", "--out", out, "--sample", f"{bucket}/sample_submission.csv",
                 "--cache", remote.cache_dir, "--quiet"]) == 0
    got = tmp_path / "first.csv"
    server.client().download_file(bucket[len("s3://"):], "submissions/first.csv", str(got))
    with open(got, newline="") as f:
        written = list(csv.reader(f))
    assert written[0] == ["id", "label"] and [r[0] for r in written[1:]] == ["1", "2", "3", "4"]
    np.testing.assert_allclose([float(r[1]) for r in written[1:]], np.clip(expected[:, 1], 1e-3, 1 - 1e-3), atol=1e-6)

    capsys.readouterr()
    assert main(["predict", model, f"{bucket}/test", "--cache", f"{bucket}/cache", "--quiet"]) == 1
    assert "--cache s3://" in capsys.readouterr().err
