"""Annotations in other formats as COCO detection jsons: Pascal VOC XML and YOLO txt (tools/convert_voc.py,
tools/convert_yolo.py; the custom-dataset guide, docs/custom_dataset.md).

Pascal VOC: one XML per image (``<filename>``, ``<size>``, ``<object>`` with ``<name>``, ``<bndbox>`` and
``<difficult>``); its pixel indices are 1-based and inclusive, so a box ``xmin..xmax`` becomes COCO's
``x = xmin − 1, w = xmax − xmin + 1`` (as detectron2 reads VOC). YOLO: one txt per image, a line per object
``class cx cy w h`` normalised by the image size (a polygon ``class x1 y1 x2 y2 ...`` gives its bounding box);
an image without a txt has no objects. Categories get ids 1..K in the order of the class list; images get ids
1..N in file-name order.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from typing import Optional, Sequence

from PIL import Image

from sparse_detr.data.coco import DataError
from sparse_detr.errors import UserError

__all__ = ["voc_to_coco", "yolo_to_coco", "read_class_names", "write_coco_json", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class OutputExistsError(UserError, FileExistsError):
    """The output json exists already."""
EXIF_ORIENTATION = 0x0112


def _text(node: ET.Element, path: str, where: str) -> str:
    found = node.find(path)
    if found is None or found.text is None:
        raise DataError(f"{where}: missing <{path}>")
    return found.text.strip()


def _categories(names: Sequence[str]) -> list[dict]:
    return [{"id": i, "name": n} for i, n in enumerate(names, 1)]


def voc_to_coco(xml_dir: str, classes: Optional[Sequence[str]] = None, keep_difficult: bool = False) -> dict:
    """The COCO dict of a folder of VOC XML files; ``classes``: the class order (default: sorted names found);
    objects marked difficult are left out unless ``keep_difficult``."""
    files = sorted(f for f in os.listdir(xml_dir) if f.lower().endswith(".xml")) if os.path.isdir(xml_dir) else []
    if not files:
        raise DataError(f"{xml_dir}: no VOC .xml annotation files")
    parsed = []
    for name in files:
        where = os.path.join(xml_dir, name)
        try:
            root = ET.parse(where).getroot()
        except ET.ParseError as e:
            raise DataError(f"{where}: not valid XML ({e})") from None
        size = (int(float(_text(root, "size/width", where))), int(float(_text(root, "size/height", where))))
        objects = []
        for obj in root.findall("object"):
            difficult = obj.find("difficult")
            if difficult is not None and (difficult.text or "0").strip() == "1" and not keep_difficult:
                continue
            box = [float(_text(obj, f"bndbox/{k}", where)) for k in ("xmin", "ymin", "xmax", "ymax")]
            objects.append((_text(obj, "name", where), box))
        parsed.append((_text(root, "filename", where), size, objects))
    names = list(classes) if classes else sorted({n for _, _, objs in parsed for n, _ in objs})
    ids = {n: i for i, n in enumerate(names, 1)}
    images, annotations = [], []
    for image_id, (file_name, (width, height), objects) in enumerate(sorted(parsed), 1):
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for name, (x0, y0, x1, y1) in objects:
            if name not in ids:
                raise DataError(f"{file_name}: class {name!r} is not in the class list {names}")
            w, h = x1 - x0 + 1, y1 - y0 + 1
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": ids[name],
                                "bbox": [x0 - 1, y0 - 1, w, h], "area": w * h, "iscrowd": 0})
    return {"images": images, "annotations": annotations, "categories": _categories(names)}


def _shown_size(path: str) -> tuple[int, int]:
    """(width, height) of the picture as shown: EXIF orientations 5-8 turn it by 90 degrees."""
    with Image.open(path) as im:
        width, height = im.size
        turned = im.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
    return (height, width) if turned else (width, height)


def yolo_to_coco(image_dir: str, label_dir: str, classes: Sequence[str]) -> dict:
    """The COCO dict of a YOLO data set: images in ``image_dir``, ``<stem>.txt`` labels in ``label_dir``."""
    files = sorted(f for f in os.listdir(image_dir) if f.lower().endswith(IMAGE_SUFFIXES)) \
        if os.path.isdir(image_dir) else []
    if not files:
        raise DataError(f"{image_dir}: no images ({', '.join(IMAGE_SUFFIXES)})")
    images, annotations = [], []
    for image_id, file_name in enumerate(files, 1):
        width, height = _shown_size(os.path.join(image_dir, file_name))
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        label = os.path.join(label_dir, os.path.splitext(file_name)[0] + ".txt")
        if not os.path.isfile(label):
            continue
        with open(label, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                values = line.split()
                if not values:
                    continue
                where = f"{label}:{line_no}"
                try:
                    cls, coords = int(values[0]), [float(v) for v in values[1:]]
                except ValueError:
                    raise DataError(f"{where}: expected 'class cx cy w h' numbers, got {line.strip()!r}") from None
                if not 0 <= cls < len(classes):
                    raise DataError(f"{where}: class {cls} is outside the {len(classes)} class names")
                if len(coords) == 4:
                    cx, cy, w, h = coords
                    x0, y0, x1, y1 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
                elif len(coords) >= 6 and len(coords) % 2 == 0:  # a polygon: its bounding box
                    xs, ys = coords[0::2], coords[1::2]
                    x0, y0, x1, y1 = min(xs), min(ys), max(xs), max(ys)
                else:
                    raise DataError(f"{where}: expected 4 box values or a polygon, got {len(coords)} values")
                box = [x0 * width, y0 * height, (x1 - x0) * width, (y1 - y0) * height]
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cls + 1,
                                    "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
    return {"images": images, "annotations": annotations, "categories": _categories(classes)}


def read_class_names(path: str) -> list[str]:
    """Class names of a ``classes.txt`` (one a line) or of a YOLO ``data.yaml`` (``names``: a list or a dict)."""
    if not os.path.isfile(path):
        raise DataError(f"class list not found: {path}")
    if path.endswith((".yaml", ".yml")):
        import yaml

        with open(path, encoding="utf-8") as f:
            names = (yaml.safe_load(f) or {}).get("names")
        if isinstance(names, dict):
            names = [names[k] for k in sorted(names)]
        if not isinstance(names, list) or not names:
            raise DataError(f"{path}: no 'names' list")
        return [str(n) for n in names]
    with open(path, encoding="utf-8") as f:
        names = [line.strip() for line in f if line.strip()]
    if not names:
        raise DataError(f"{path}: no class names")
    return names


def write_coco_json(data: dict, path: str) -> None:
    """Write ``data`` to ``path`` (a new file only: nothing is overwritten)."""
    if os.path.exists(path):
        raise OutputExistsError(f"{path} exists; choose another --out (nothing was written)")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, path)
