"""Shared fixtures: tiny synthetic image folders and a small, fast backbone.

Tests never download anything. Real photos and weights come from ../shared when it
is present; tests that need them skip with the reason otherwise.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Tiny test models run as plain Keras: an ONNX export per throwaway model would only cost time.
# tests/test_engines.py covers the ONNX Runtime and XLA engines explicitly.
os.environ.setdefault("STACKER_ENGINE", "keras")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(REPO, "..", "shared")
DOGS_VS_CATS = os.path.join(SHARED, "data", "dogs-vs-cats")
WEIGHTS_DIR = os.path.join(SHARED, "weights")

import tinynet  # noqa: E402,F401 - registers the "tiny_cnn" test backbone

# A small registered backbone with random weights at a tiny input size: fast, deterministic, offline.
TINY = {"backbone": "tiny_cnn", "input_size": 32, "weights": None}


def make_image(path, color, size=(24, 20), mode="RGB", fmt=None, seed=0):
    """Write a small image of a dominant colour with noise, in any PIL mode/format."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(color)[None, None, :] + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255)
    img = Image.fromarray(arr.astype("uint8"), "RGB")
    if mode == "I;16":
        img = Image.fromarray((np.asarray(img.convert("L")).astype(np.uint16) * 257))
    elif mode != "RGB":
        img = img.convert(mode)
    img.save(path, format=fmt)
    return path


COLORS = {"cat": (200, 60, 50), "dog": (50, 80, 200), "owl": (60, 190, 60)}


def make_class_folders(root, n: int, seed_step: int = 40):
    """root/cat/<i>.png and root/dog/<i>.png: two well separated colours, n images each."""
    for j, c in enumerate(("cat", "dog")):
        (root / c).mkdir(parents=True)
        for i in range(n):
            make_image(root / c / f"{i}.png", COLORS[c], seed=i + j * seed_step)
    return root


def save_tiny_weights(path) -> str:
    """Fixed 'pretrained' weights for tiny_cnn at 32 px, so every build is the same network."""
    import keras

    from stacker.backbones import build

    keras.utils.set_random_seed(0)
    build("tiny_cnn", weights=None, input_size=32).save_weights(str(path))
    return str(path)


@pytest.fixture
def class_folders(tmp_path):
    """root/<class>/<n>.png with two well separated classes, 12 images each."""
    root = tmp_path / "folders"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(12):
            make_image(root / c / f"{i}.png", COLORS[c], seed=hash((c, i)) % 1000)
    return root


@pytest.fixture
def kaggle_dir(tmp_path):
    """A Kaggle-style competition folder: train/cat.N.jpg, test/N.jpg, sample_submission.csv."""
    root = tmp_path / "kaggle"
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    for c in ("cat", "dog"):
        for i in range(10):
            make_image(root / "train" / f"{c}.{i}.jpg", COLORS[c], seed=i + (50 if c == "dog" else 0))
    for i in range(1, 13):
        make_image(root / "test" / f"{i}.jpg", COLORS["cat" if i % 2 else "dog"], seed=100 + i)
    with open(root / "sample_submission.csv", "w") as f:
        f.write("id,label\n" + "".join(f"{i},0.5\n" for i in range(1, 13)))
    return root


@pytest.fixture
def cache_dir(tmp_path):
    return tmp_path / "cache"


def shared_or_skip(path):
    if not os.path.exists(path):
        pytest.skip(f"{path} is not present (the shared data/weights folder lives beside the repository)")
    return path


# Fine-tuning options small enough for a test (one block, one epoch, the original view only)
TINY_FINETUNE = {"blocks": 1, "epochs": 1, "head_epochs": 2, "learning_rate": 1e-3, "tta": ("original",),
                 "train_views": ("original",)}


def spy_finetuning(monkeypatch) -> list:
    """Record ``(rows, sample weights or None)`` of every FineTunedClassifier fit from now on (in call order)."""
    from stacker.learners.finetune import FineTunedClassifier

    seen, original_fit = [], FineTunedClassifier.fit

    def spy(self, X, y, sample_weight=None, **kw):
        seen.append((len(X), None if sample_weight is None else np.asarray(sample_weight).copy()))
        return original_fit(self, X, y, sample_weight, **kw)

    monkeypatch.setattr(FineTunedClassifier, "fit", spy)
    return seen
