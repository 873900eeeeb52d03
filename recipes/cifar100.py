#!/usr/bin/env python
"""CIFAR-100: 100 fine classes of 32x32 images, upscaled (bicubic) to the backbone's size.

    python recipes/cifar100.py --data PATH/cifar-100-python
    python recipes/cifar100.py --download            # online: Keras fetches the official archive
    python recipes/cifar100.py --quick --data PATH/cifar-100-python

Reads the official python format (``cifar-100-python/{train,test,meta}``) with a
restricted unpickler (only NumPy arrays and plain containers can come out of it), uses
the fine labels with their names, writes each image once as a PNG under the cache
folder so features are cached like any other image set, splits train 80/20 (stratified)
into fit and validation, and fits the ensemble on the 80% (with its own out-of-fold
stacking). Reported: the out-of-fold leaderboard, validation and official-test accuracy.
The 32 px images are upscaled with bicubic interpolation inside the tf.data pipeline.

Backbone: EfficientNetB0 when its ImageNet weights are on this machine or downloadable,
otherwise EfficientNet-Lite0 (offline).
"""

import json
import os
import pickle
import sys

import numpy as np

from stacker.app.recipe import SHARED, common_parser, fit_and_save


class _ArrayUnpickler(pickle.Unpickler):
    """Lets through NumPy array reconstruction and nothing else (the files are pickles)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # how Python 3 writes bytes at protocol 2: a pure data transform
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR file")


def read_split(path: str) -> dict:
    with open(path, "rb") as f:
        raw = _ArrayUnpickler(f, encoding="bytes").load()
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}


def materialize(root: str, out_dir: str, split: str, names: list) -> tuple:
    """Write a split's images as PNG once (resumable); return (paths, labels)."""
    from PIL import Image

    data = read_split(os.path.join(root, split))
    pixels = np.asarray(data["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = [names[i] for i in data["fine_labels"]]
    folder = os.path.join(out_dir, split)
    done = os.path.join(folder, "COMPLETE")
    paths = [os.path.join(folder, labels[i], f"{i:05d}.png") for i in range(len(labels))]
    if not os.path.exists(done):
        for c in set(labels):
            os.makedirs(os.path.join(folder, c), exist_ok=True)
        for p, px in zip(paths, pixels):
            if not os.path.exists(p):
                tmp = p + ".tmp.png"
                Image.fromarray(px).save(tmp)
                os.replace(tmp, p)
        with open(done, "w") as f:
            f.write(f"{len(paths)}\n")
    return paths, labels


def default_backbone(weights_dir) -> str:
    from stacker.backbones import list_backbones

    return "efficientnet_b0" if "efficientnet_b0" in list_backbones(pretrained_offline=True,
                                                                       weights_dir=weights_dir) else \
        "efficientnet_lite0"


def parser():
    p = common_parser(__doc__, os.path.join(SHARED, "data", "cifar-100-python"), "cifar100",
                      "auto (efficientnet_b0 when its weights are here, else efficientnet_lite0)", "efficientnet_lite0",
                      defaults={"resize": "bicubic"}, quick_limit=300)  # 32 px images upscaled about 7x
    p.recipe_options.add_argument("--download", action="store_true",
                                  help="fetch CIFAR-100 with keras.datasets (online)")
    p.recipe_options.add_argument("--val-fraction", type=float, default=0.2,
                                  help="share of train held out for validation (default: %(default)s)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from sklearn.model_selection import train_test_split

    from stacker.data.sources import ImageSet

    root = args.data
    if args.download:
        import keras

        keras.datasets.cifar100.load_data(label_mode="fine")
        root = os.path.join(os.path.expanduser("~"), ".keras", "datasets", "cifar-100-python")
    for f in ("train", "test", "meta"):
        if not os.path.isfile(os.path.join(root, f)):
            raise SystemExit(f"{root} has no '{f}': pass --data PATH/cifar-100-python (the official python "
                             "version) or --download when online")
    names = [n.decode() for n in read_split(os.path.join(root, "meta"))["fine_label_names"]]
    image_dir = os.path.join(args.cache, "cifar100_images")
    paths, labels = materialize(root, image_dir, "train", names)
    test_paths, test_labels = materialize(root, image_dir, "test", names)
    if args.backbones is None and not args.quick:
        args.backbones = default_backbone(args.weights_dir)
    full = ImageSet(paths, [os.path.relpath(x, image_dir) for x in paths], labels)
    if args.quick:  # ten classes, a few hundred images: enough for every fold to see each class
        keep = set(full.classes[:10])
        full = full.subset([i for i, c in enumerate(full.labels) if c in keep])
        full.classes = sorted(keep)
        full = full.head(min(len(full), args.quick_limit), seed=args.seed)
    rows = np.arange(len(full))
    fit_rows, val_rows = train_test_split(rows, test_size=args.val_fraction, stratify=full.y, random_state=args.seed)
    train, val = full.subset(sorted(fit_rows)), full.subset(sorted(val_rows))
    args.train_limit = len(train)
    ens, info, train = fit_and_save(args, train)
    scores = {"validation": ens.evaluate(val)["ensemble"]}
    test = ImageSet(test_paths, [os.path.relpath(x, image_dir) for x in test_paths], test_labels)
    known = set(ens.classes_)
    test = test.subset([i for i, c in enumerate(test.labels) if c in known])
    test.classes = list(ens.classes_)
    if args.quick:
        test = test.head(min(len(test), 100), seed=args.seed)
    scores["test"] = ens.evaluate(test)["ensemble"]
    for split, s in scores.items():
        print(f"{split}: accuracy {s['accuracy']:.4f}  top-5 {s.get('top5_accuracy', float('nan')):.4f}  "
              f"log loss {s['log_loss']:.4f}")
    with open(os.path.join(args.out, "holdout.json"), "w") as f:
        json.dump(scores, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
