#!/usr/bin/env python
"""Sanity of the EfficientNet-Lite ImageNet weights on real photos, no training.

On N photos of dogs-vs-cats/train resized to the input size (224 by default, as the issue
asks), for each Lite variant:
- zero-shot: ImageNet probability mass on dog classes (ids 151-268) versus cat classes
  (281-285) classifies dog vs cat;
- linear probe: 5-fold logistic regression on the pooled features.

    python benchmarks/lite_sanity.py [--n 400] [--variants efficientnet_lite0,efficientnet_lite1,efficientnet_lite2]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOGS, CATS = slice(151, 269), slice(281, 286)


def evaluate(variant: str, data, size: int | None) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from stacker.features.extractor import FeatureExtractor
    from stacker.backbones.pretrained import imagenet_proba

    y = np.array([label == "dog" for label in data.labels])
    t0 = time.perf_counter()
    if size:
        from stacker import backbones

        model = backbones.build(variant, weights="imagenet", include_top=True, input_size=size)
        from stacker.data.decode import pixel_batches

        proba = np.concatenate([model.predict_on_batch(px) for _, px in pixel_batches(data.paths, size, 32)])
    else:
        proba = imagenet_proba(data.paths, backbone=variant)
    zero_shot = float(((proba[:, DOGS].sum(1) > proba[:, CATS].sum(1)) == y).mean())
    feats = FeatureExtractor(variant, input_size=size, verbose=0).transform(data)
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    linear = float(cross_val_score(probe, feats, y, cv=cv, scoring="accuracy").mean())
    return {"variant": variant, "zero_shot": zero_shot, "linear_probe": linear, "seconds": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.path.join(REPO, "..", "shared", "data", "dogs-vs-cats", "train"))
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--size", type=int, default=224, help="input size (0: each variant's own)")
    p.add_argument("--variants", default="efficientnet_lite0,efficientnet_lite1,efficientnet_lite2")
    args = p.parse_args()
    from stacker.data.sources import load_images

    data = load_images(args.data).head(args.n, seed=0)
    print(f"{len(data)} photos from {args.data}, input {args.size or 'native'}px")
    print(f"{'variant':20s} {'zero-shot acc':>14s} {'linear probe':>13s} {'seconds':>8s}")
    for v in args.variants.split(","):
        r = evaluate(v, data, args.size or None)
        print(f"{r['variant']:20s} {r['zero_shot']:14.4f} {r['linear_probe']:13.4f} {r['seconds']:8.1f}")


if __name__ == "__main__":
    main()
