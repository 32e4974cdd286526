"""YOLO txt labels → a COCO detection json (sparse_detr/data/formats.py says how boxes map):

    python tools/convert_yolo.py --images data/mine/images/train --labels data/mine/labels/train \
        --classes data/mine/data.yaml --out data/mine/annotations/train.json

--classes: a classes.txt (one name a line) or the YOLO data.yaml (its `names`); class k gets category id k + 1.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, installed or not

from sparse_detr.data.formats import read_class_names, write_coco_json, yolo_to_coco  # noqa: E402
from sparse_detr.engine.cli import run_tool  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--images", required=True, help="folder of the images")
    p.add_argument("--labels", required=True, help="folder of the <image stem>.txt labels")
    p.add_argument("--classes", required=True, help="classes.txt or data.yaml")
    p.add_argument("--out", required=True, help="the COCO json to write (must not exist)")
    args = p.parse_args(argv)
    data = yolo_to_coco(args.images, args.labels, read_class_names(args.classes))
    write_coco_json(data, args.out)
    print(f"wrote {args.out}: {len(data['images'])} images, {len(data['annotations'])} boxes, "
          f"{len(data['categories'])} classes")
    return data


if __name__ == "__main__":
    sys.exit(run_tool(main))
