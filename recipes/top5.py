#!/usr/bin/env python
"""ImageNet top-5 of photos with two pretrained models side by side, as text and a bar chart.

    python recipes/top5.py photo1.jpg photo2.jpg
    python recipes/top5.py --backbones efficientnet_lite0,efficientnet_lite2 --out artifacts/top5 photos/

No training: each model's 1000-class ImageNet softmax, its five most probable classes
with human-readable names. Writes OUT/top5.png (one row per photo: the photo, then one
bar chart per model) and OUT/top5.json.
"""

import json
import os
import sys

import numpy as np

from stacker.app.options import OPTIONS, add_options, comma_list, progress_output, weights_arg
from stacker.app.recipe import SHARED, WEIGHTS_DIR, recipe_note, recipe_parser

DEFAULT_PHOTOS = [os.path.join(SHARED, "data", "dogs-vs-cats", "train", f) for f in ("dog.1.jpg", "cat.1.jpg")]


def parser():
    p = recipe_parser(__doc__, None, "top5", data_help="a folder of photos (same as giving it as an argument)",
                      quick_help="at most four photos")
    p.add_argument("images", nargs="*", default=DEFAULT_PHOTOS, help="photos or folders")
    p.recipe_options.add_argument("--backbones", default="efficientnet_lite0,efficientnet_lite2", type=comma_list,
                                  metavar="NAMES", help="backbones compared side by side (default: %(default)s)")
    p.recipe_defaults = {"weights_dir": WEIGHTS_DIR}
    add_options(p, ("k", "weights", "weights_dir"), defaults=p.recipe_defaults,
                notes={"weights_dir": recipe_note("weights_dir", "stacker top5")})
    OPTIONS["quiet"].add_to(p)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from stacker.backbones.pretrained import top_k
    from stacker.data.inputs import expand_paths

    paths, unread = expand_paths(([args.data] if args.data else []) + list(args.images))
    for path, reason in unread.items():
        print(f"not read {path}: {reason}", file=sys.stderr)
    if args.quick:
        paths = paths[:4]
    models = args.backbones.split(",")
    with progress_output(args.quiet):
        results = {m: top_k(paths, backbone=m, k=args.k, weights=weights_arg(args.weights),
                            weights_dir=args.weights_dir) for m in models}
    os.makedirs(args.out, exist_ok=True)
    report = []
    for i, path in enumerate(paths):
        print(path)
        entry = {"path": path}
        for m in models:
            rows = results[m].rows(i)
            entry[m] = [{"id": int(c), "name": n, "probability": float(q)} for c, n, q in rows]
            print(f"  {m}: " + ", ".join(f"{n} {q:.3f}" for _, n, q in rows))
        report.append(entry)
    with open(os.path.join(args.out, "top5.json"), "w") as f:
        json.dump(report, f, indent=1)
    fig, axes = plt.subplots(len(paths), 1 + len(models), figsize=(4 + 4.5 * len(models), 2.6 * len(paths)),
                             squeeze=False)
    for i, path in enumerate(paths):
        with Image.open(path) as img:
            axes[i][0].imshow(np.asarray(img.convert("RGB")))
        axes[i][0].set_title(os.path.basename(path), fontsize=9)
        axes[i][0].axis("off")
        for j, m in enumerate(models, start=1):
            rows = results[m].rows(i)
            ax = axes[i][j]
            ax.barh([n for _, n, _ in rows], [q for _, _, q in rows], color="#1f77b4")
            ax.invert_yaxis()
            ax.set_xlim(0, 1)
            ax.set_title(m, fontsize=9)
            ax.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "top5.png"), dpi=90)
    print(f"wrote {os.path.join(args.out, 'top5.png')} and top5.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
