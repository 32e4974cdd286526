"""Detect objects on your own images: a COCO-format detections json and one drawn PNG per image.

    python tools/predict.py --checkpoint outputs/demo_synthetic/checkpoint_best.pth \\
        --images data/synthetic/val --out outputs/predict --score-thresh 0.3
    python tools/predict.py --config configs/sparse_detr_r50_rho0.1.yaml --checkpoint r50.pth \\
        --images a.jpg b.jpg photos/ --out outputs/predict --device cuda --bf16

`--images` takes files and folders (the images of a folder, sorted by name). Every image is resized by the config's
evaluation transform (shorter side data.val_size, longer at most data.max_size) and boxes are written in the
original image's pixels. `--out` receives detections.json (COCO results: image_id, category_id, bbox xywh, score),
images.json (the images as a COCO json, so `COCO("images.json").loadRes("detections.json")` works) and
<name>_det.png; existing outputs are not overwritten unless --force. `--ann-file` takes the image ids from a
COCO json that lists the images (the detections can then be evaluated against it); otherwise ids are 1..N.
`--config` is optional: the checkpoint stores its config (given, it must match the checkpoint's architecture).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, installed or not

from sparse_detr.engine.cli import run_tool  # noqa: E402
from sparse_detr.engine.inference.predict import predict_files  # noqa: E402
from sparse_detr.engine.inference.predictor import Predictor  # noqa: E402
from sparse_detr.engine.inference.visualize import list_images  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (default: the one stored in the checkpoint)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--images", required=True, nargs="+", metavar="DIR|FILE", help="image files and/or folders")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--score-thresh", type=float, default=0.3, help="keep detections at or above (default 0.3)")
    p.add_argument("--ann-file", help="COCO json listing the images: take their ids from it")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    p.add_argument("--no-draw", action="store_true", help="write the json files only")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs in --out")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    files = [f for path in args.images for f in list_images(path)]
    predictor = Predictor.from_checkpoint(args.config, args.checkpoint, args.device, bf16=args.bf16,
                                          batch_size=args.batch_size, overrides=args.overrides, use_ema=args.ema)
    written = predict_files(predictor, files, args.out, args.score_thresh, ann_file=args.ann_file,
                            draw=not args.no_draw, overwrite=args.force)
    print(f"{written['count']} detections on {written['predicted']} of {len(files)} images: "
          f"{written['detections']}")
    if written["drawn"]:
        print(f"drawn: {os.path.dirname(written['drawn'][0])}/*_det.png")
    for item in written["skipped"][:10]:
        print(f"skipped {item['file']}: {item['reason']}", file=sys.stderr)
    if written["skipped"]:
        print(f"{len(written['skipped'])} image(s) skipped, listed in {os.path.join(args.out, 'skipped.json')}",
              file=sys.stderr)
    return written


if __name__ == "__main__":
    sys.exit(run_tool(main))  # a user mistake: its message alone (--debug: traceback)
