"""Distillation: soft targets as weighted rows, a student that is a normal model, checked inputs."""

import numpy as np
import pytest

from conftest import TINY, TINY_FINETUNE, make_image, save_tiny_weights, spy_finetuning
from stacker.distill import distill, soft_rows, soften
from stacker.ensemble import Ensemble
from stacker.features.extractor import forward_pass_count


def test_soft_targets_become_weighted_rows_whose_log_loss_is_the_cross_entropy():
    T = np.array([[0.7, 0.2, 0.1], [0.0005, 0.9995, 0.0]])
    y = np.array([0, 1])
    base, image, label, w = soft_rows(T, y, hard_weight=0.0, min_target=1e-3)
    assert np.allclose(base, [0.7, 0.9995]) and image.tolist() == [0, 0] and label.tolist() == [1, 2]
    assert np.allclose(w, [0.2, 0.1])  # image 1's 0.0005 is below min_target: no row
    # weighted log loss of a model over these rows == sum over images of the cross-entropy with T
    P = np.array([[0.5, 0.3, 0.2], [0.1, 0.8, 0.1]])
    rows = -(base * np.log(P[[0, 1], y])).sum() - (w * np.log(P[image, label])).sum()
    assert rows == pytest.approx(-(np.where(T >= 1e-3, T, 0) * np.log(P)).sum())
    base, _, _, w = soft_rows(T, y, hard_weight=0.5, min_target=1e-3)
    assert np.allclose(base, [0.85, 0.99975]) and np.allclose(w, [0.1, 0.05])
    soft = soften(T[:1], 2.0)  # the distillation temperature: sqrt of the probabilities, renormalised
    assert np.allclose(soft, np.sqrt(T[:1]) / np.sqrt(T[:1]).sum()) and np.allclose(soften(T, 1.0), T)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    rng = np.random.default_rng(3)
    for c, colour in {"cat": (170, 90, 80), "dog": (90, 110, 170), "owl": (110, 150, 100)}.items():
        (root / "train" / c).mkdir(parents=True)
        for i in range(12):
            make_image(root / "train" / c / f"{i}.png", (np.array(colour) + rng.normal(0, 35, 3)).tolist(), seed=i)
    weights = save_tiny_weights(root / "tiny.weights.h5")
    backbones = [{**TINY, "weights": weights}, {**TINY, "weights": weights, "input_size": 40, "name": "tiny40"}]
    ens = Ensemble(backbones, cv=3, cache_dir=str(root / "cache"), verbose=0).fit(str(root / "train"))
    ens.save(str(root / "teacher"))
    return root, weights


@pytest.mark.slow
def test_the_student_learns_the_teachers_soft_targets_and_is_a_normal_model(teacher, tmp_path, capsys):
    from stacker.app.cli import main

    root, weights = teacher
    loaded = Ensemble.load(str(root / "teacher"))
    before = forward_pass_count()
    student = distill(loaded, str(root / "train"), {**TINY, "weights": weights}, cache_dir=str(root / "cache"),
                      verbose=0)
    assert forward_pass_count() == before  # the student's backbone is one of the teacher's: all cached
    assert list(student.learners_) == ["tiny_cnn@32:logistic"] and student.classes_ == loaded.classes_
    d = student.scores_["ensemble"]["distilled"]
    assert d["teacher"]["log_loss"] == pytest.approx(loaded.scores_["ensemble"]["log_loss"])
    assert d["soft_rows"] > 0 and d["distilled"]["log_loss"] != d["hard_labels"]["log_loss"]
    hard = Ensemble([{**TINY, "weights": weights}], models=("logistic",), meta="best", cv=3,
                    cache_dir=str(root / "cache"), verbose=0).fit(str(root / "train"))
    assert hard.scores_["ensemble"]["log_loss"] == pytest.approx(d["hard_labels"]["log_loss"])
    assert not np.allclose(student.oof_proba_["tiny_cnn@32:logistic"], hard.oof_proba_["tiny_cnn@32:logistic"])
    # the soft targets pull the student towards the teacher: a lower cross-entropy with its probabilities
    T = loaded.meta_oof_proba_
    gap = lambda e: -(T * np.log(e.oof_proba_["tiny_cnn@32:logistic"])).sum(1).mean()  # noqa: E731
    assert gap(student) < gap(hard)
    # saved, loaded, exported and reported like any model; the CLI does the same
    assert main(["distill", str(root / "teacher"), str(root / "train"), "--backbone", "tiny_cnn", "--out",
                 str(tmp_path / "s"), "--cache", str(root / "cache"), "--weights", weights, "--image-size", "32",
                 "--quiet"]) == 0
    assert "distilled from a 4-learner ensemble" in capsys.readouterr().out  # the leaderboard
    assert main(["cache", "ls", "--cache", str(root / "cache")]) == 0
    assert "tiny_cnn@32:logistic (distilled from a 4-learner ensemble)" in capsys.readouterr().out
    page = (tmp_path / "s" / "report.html").read_text()  # its report: the comparison, and that it exports
    assert "<h2>Distillation</h2>" in page and "this model, trained on hard labels" in page
    assert "This model exports to one ONNX file" in page
    again = Ensemble.load(str(tmp_path / "s"))
    assert "distilled from a 4-learner ensemble" in again.leaderboard()
    assert np.allclose(again.predict_proba(str(root / "train")), student.predict_proba(str(root / "train")))
    info = again.export_onnx(tmp_path / "s.onnx")
    assert [i["name"] for i in info["inputs"]] == ["pixels_32"]


@pytest.mark.slow
def test_distill_refuses_images_the_teacher_was_not_fitted_on(teacher, tmp_path):
    root, weights = teacher
    other = tmp_path / "other"
    for c in ("cat", "dog", "owl"):
        (other / c).mkdir(parents=True)
        for i in range(4):
            make_image(other / c / f"{i}.png", (120, 120, 120), seed=100 + i)
    with pytest.raises(ValueError, match="12 images were not among the teacher's training images"):
        distill(Ensemble.load(str(root / "teacher")), str(other), {**TINY, "weights": weights}, cv=3,
                cache_dir=str(root / "cache"), verbose=0)
    with pytest.raises(ValueError, match="hard_weight must be in"):
        distill(Ensemble.load(str(root / "teacher")), str(root / "train"), "tiny_cnn", hard_weight=2)


@pytest.mark.slow
def test_a_fine_tuned_student_trains_each_fold_on_weighted_soft_target_rows(teacher, monkeypatch):
    root, weights = teacher
    loaded = Ensemble.load(str(root / "teacher"))
    seen, ft = spy_finetuning(monkeypatch), TINY_FINETUNE
    student = distill(loaded, str(root / "train"), {**TINY, "weights": weights}, finetune=ft, cv=2,
                      cache_dir=str(root / "cache"), verbose=0)
    assert list(student.learners_) == ["tiny_cnn@32:finetune"]
    d = student.scores_["ensemble"]["distilled"]
    assert d["soft_rows"] > 0 and d["distilled"]["log_loss"] != d["hard_labels"]["log_loss"]
    hard, soft = seen[:2], seen[2:]  # the hard-label fit, then the distilled one
    assert len(soft) == 2 and all(w is None for _, w in hard)
    for (n_hard, _), (n_soft, w), (tr, _) in zip(hard, soft, student.folds_):
        assert n_hard == len(tr) and n_soft > len(tr) and len(w) == n_soft
        # an image's rows weigh its soft target's classes (those of at least min_target): about 1 per image
        assert len(tr) * (1 - 3e-3) <= w.sum() <= len(tr) + 1e-6
    assert student.predict_proba(str(root / "train")).shape == (36, 3)
    from stacker.app.cli import build_parser
    from stacker.app.options import kind_params

    args = build_parser().parse_args(["distill", "m", "d", "--backbone", "tiny_cnn", "--out", "s", "--finetune",
                                      "--finetune-epochs", "2"])
    assert kind_params(args) == {"finetune": {"epochs": 2}}  # `stacker distill --finetune`: the same student


@pytest.mark.slow
def test_a_full_mode_fine_tuned_student_is_refused_before_any_work(teacher):
    root, weights = teacher
    before = forward_pass_count()
    with pytest.raises(ValueError, match="mode 'full' reads the pixels of training images, so soft targets"):
        distill(Ensemble.load(str(root / "teacher")), str(root / "train"), {**TINY, "weights": weights},
                finetune={"mode": "full"}, cache_dir=str(root / "cache"), verbose=0)
    assert forward_pass_count() == before
