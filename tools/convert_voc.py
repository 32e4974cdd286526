"""Pascal VOC XML annotations → a COCO detection json (sparse_detr/data/formats.py says how boxes map):

    python tools/convert_voc.py --xml-dir VOC2012/Annotations --out data/voc/annotations/train.json \
        [--classes person,car,dog | --classes classes.txt] [--keep-difficult]

Without --classes the class names found are sorted; their order gives the category ids 1..K.
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, installed or not

from sparse_detr.data.formats import read_class_names, voc_to_coco, write_coco_json  # noqa: E402
from sparse_detr.engine.cli import run_tool  # noqa: E402


def class_list(value):
    """--classes: a file (classes.txt, data.yaml) or comma-separated names; None: from the annotations."""
    if value is None:
        return None
    return read_class_names(value) if os.path.isfile(value) else [n.strip() for n in value.split(",") if n.strip()]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--xml-dir", required=True, help="folder of the VOC .xml files")
    p.add_argument("--out", required=True, help="the COCO json to write (must not exist)")
    p.add_argument("--classes", help="class order: a classes.txt / data.yaml or comma-separated names")
    p.add_argument("--keep-difficult", action="store_true", help="keep objects marked <difficult>1")
    args = p.parse_args(argv)
    data = voc_to_coco(args.xml_dir, class_list(args.classes), args.keep_difficult)
    write_coco_json(data, args.out)
    print(f"wrote {args.out}: {len(data['images'])} images, {len(data['annotations'])} boxes, "
          f"{len(data['categories'])} classes ({', '.join(c['name'] for c in data['categories'])})")
    return data


if __name__ == "__main__":
    sys.exit(run_tool(main))
