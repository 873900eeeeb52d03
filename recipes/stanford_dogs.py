#!/usr/bin/env python
"""Stanford Dogs: 120 dog breeds from folders (``Images/n02085620-Chihuahua/...``).

    python recipes/stanford_dogs.py --data PATH/Images
    python recipes/stanford_dogs.py --tfds            # tensorflow_datasets' stanford_dogs, if downloaded
    python recipes/stanford_dogs.py --quick --data PATH/Images

WARNING: Stanford Dogs is built from ImageNet images. Backbones pretrained on ImageNet
have seen many of these very photos (with their breed labels), so scores here are
optimistic compared with truly new dog photos.

Class names are the folder names without their WordNet id (``n02085620-Chihuahua`` ->
``Chihuahua``). The default backbone is EfficientNetB0 when its ImageNet weights are on
this machine (as in the Keras fine-tuning example), else EfficientNet-Lite0/1/2.

Like the Keras example, each base learner is fine-tuned in two phases (a new head on the
frozen network, then the top blocks unfrozen with a small learning rate, BatchNorm
frozen), out of fold and on a cut-point cache; the --finetune-* options tune it and
--frozen switches it off.
"""

import os
import sys

from stacker.app.recipe import SHARED, common_parser, fit_and_save


def from_breed_folders(root):
    from stacker.data.sources import ImageSet, from_folder

    data = from_folder(root)
    labels = [lab.split("-", 1)[1] if "-" in lab else lab for lab in data.labels]
    return ImageSet(data.paths, data.ids, labels)


def export_tfds(out_dir: str) -> str:
    """Write tensorflow_datasets' stanford_dogs train split as breed folders (once)."""
    import tensorflow_datasets as tfds
    from PIL import Image

    done = os.path.join(out_dir, "COMPLETE")
    if os.path.exists(done):
        return out_dir
    ds, info = tfds.load("stanford_dogs", split="train", with_info=True, download=False)
    names = info.features["label"].names
    for i, ex in enumerate(tfds.as_numpy(ds)):
        folder = os.path.join(out_dir, names[int(ex["label"])])
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(ex["image"]).save(os.path.join(folder, f"{i:05d}.jpg"), quality=95)
    open(done, "w").write("ok\n")
    return out_dir


def parser():
    p = common_parser(__doc__, os.path.join(SHARED, "data", "stanford-dogs", "Images"), "stanford_dogs",
                      "auto (efficientnet_b0 when its weights are here, else efficientnet_lite0,1,2)",
                      "efficientnet_lite0", quick_limit=300)
    p.recipe_options.add_argument("--tfds", action="store_true",
                                  help="read tensorflow_datasets' stanford_dogs (already downloaded)")
    p.recipe_options.add_argument("--frozen", action="store_true",
                                  help="heads on frozen features only (default: two-phase fine-tuning, as the "
                                       "Keras example)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    args.finetune = not args.frozen
    root = export_tfds(os.path.join(args.cache, "stanford_dogs_images")) if args.tfds else args.data
    if not os.path.isdir(root):
        raise SystemExit(f"{root} does not exist: pass --data PATH/Images (breed folders) or --tfds")
    if args.backbones is None and not args.quick:
        from stacker.backbones import list_backbones

        offline = list_backbones(pretrained_offline=True, weights_dir=args.weights_dir)
        args.backbones = "efficientnet_b0" if "efficientnet_b0" in offline else \
            "efficientnet_lite0,efficientnet_lite1,efficientnet_lite2"
    print("note: Stanford Dogs is a subset of ImageNet; ImageNet-pretrained scores on it are optimistic")
    fit_and_save(args, from_breed_folders(root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
