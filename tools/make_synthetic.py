"""Write the synthetic shapes dataset (COCO format) used by the demo config and the smoke tests.

    python tools/make_synthetic.py --out data/synthetic --num-train 64 --num-val 16 --seed 0
    python tools/make_synthetic.py --out data/synthetic_big --num-train 2000 --num-val 200 --image-size 256 512
    python tools/make_synthetic.py --out data/cluttered --preset cluttered --max-objects 20 --image-size 256 320
    python tools/make_synthetic.py --out data/cluttered_medium --preset cluttered --max-objects 10 \
        --image-size 192 256 --min-object-side 24 --max-object-scale 0.7     # the ablation's (docs/ablation.md)

Same arguments, byte-identical files. Layout: OUT/{train,val}/*.png, OUT/annotations/instances_{train,val}.json and
the marker OUT/synthetic_params.json. OUT must be missing, empty, or a folder this tool made with the same
arguments: nothing else is ever overwritten.
Train on it with dataset="synthetic" (or dataset="coco" pointing img_folder/ann_file at those paths).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, installed or not

from sparse_detr.engine.cli import run_tool  # noqa: E402
from sparse_detr.data.synthetic import make_synthetic_coco  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-train", type=int, default=64)
    parser.add_argument("--num-val", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, nargs=2, default=(160, 320), metavar=("MIN", "MAX"),
                        help="image sides are drawn uniformly from [MIN, MAX] pixels")
    parser.add_argument("--max-objects", type=int, default=6, help="objects per image: 1..MAX (some images: 0)")
    parser.add_argument("--preset", default="demo", choices=("demo", "cluttered"),
                        help="demo: a few shapes; cluttered: many objects, distractors, textured background")
    parser.add_argument("--min-object-side", type=int, default=14,
                        help="cluttered: smallest object side in pixels (higher: fewer small objects)")
    parser.add_argument("--max-object-scale", type=float, default=0.95,
                        help="cluttered: largest object side as a fraction of the image's short side")
    parser.add_argument("--empty-every", type=int, default=8, help="every N-th image has no object (0: none)")
    args = parser.parse_args(argv)
    paths = make_synthetic_coco(args.out, num_train=args.num_train, num_val=args.num_val, seed=args.seed,
                                min_size=args.image_size[0], max_size=args.image_size[1],
                                max_objects=args.max_objects, empty_every=args.empty_every,
                                preset=args.preset, min_object_side=args.min_object_side,
                                max_object_scale=args.max_object_scale, progress=True)
    for split in ("train", "val"):
        with open(paths[split]["ann_file"], encoding="utf-8") as f:
            data = json.load(f)
        print(f"{split}: {len(data['images'])} images, {len(data['annotations'])} boxes -> {paths[split]['ann_file']}")


if __name__ == "__main__":
    sys.exit(run_tool(main))  # a user mistake: its message alone (--debug: traceback)
