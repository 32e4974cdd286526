"""Converters to COCO (data/formats.py): boxes written by hand in Pascal VOC XML and YOLO txt come back exactly
(VOC: integer pixel indices; YOLO: to float precision), classes in the given order, bad files named."""
import json

import pytest
from PIL import Image

from sparse_detr.data.coco import DataError
from sparse_detr.data.formats import read_class_names, voc_to_coco, write_coco_json, yolo_to_coco

CLASSES = ["cat", "dog", "bird"]
# image file -> (width, height, [(class index, COCO xywh box in pixels)])
TRUTH = {"a.jpg": (64, 48, [(0, [0, 0, 10, 12]), (2, [30, 5, 34, 43])]),
         "b.jpg": (50, 70, [(1, [4, 6, 20, 30])]),
         "c.jpg": (40, 40, [])}


def _voc_xml(name, width, height, objects, difficult=()):
    """A VOC annotation as the VOC tools write it: 1-based, inclusive pixel indices."""
    parts = [f"<annotation><filename>{name}</filename><size><width>{width}</width><height>{height}</height>"
             "<depth>3</depth></size>"]
    for i, (cls, (x, y, w, h)) in enumerate(objects):
        parts.append(f"<object><name>{CLASSES[cls]}</name><difficult>{int(i in difficult)}</difficult><bndbox>"
                     f"<xmin>{x + 1}</xmin><ymin>{y + 1}</ymin><xmax>{x + w}</xmax><ymax>{y + h}</ymax>"
                     "</bndbox></object>")
    return "".join(parts) + "</annotation>"


def _boxes(data):
    """file name -> sorted [(class name, bbox)] of a COCO dict."""
    names = {c["id"]: c["name"] for c in data["categories"]}
    files = {im["id"]: im["file_name"] for im in data["images"]}
    out = {f: [] for f in files.values()}
    for a in data["annotations"]:
        out[files[a["image_id"]]].append((names[a["category_id"]], a["bbox"]))
    return {f: sorted(v) for f, v in out.items()}


def _expected():
    return {f: sorted((CLASSES[c], box) for c, box in objs) for f, (_, _, objs) in TRUTH.items()}


def test_voc_boxes_come_back_exactly(tmp_path):
    for name, (w, h, objs) in TRUTH.items():
        (tmp_path / (name[:-4] + ".xml")).write_text(_voc_xml(name, w, h, objs, difficult=(1,) if objs else ()))
    data = voc_to_coco(str(tmp_path), CLASSES, keep_difficult=True)
    assert _boxes(data) == _expected()
    assert [c["name"] for c in data["categories"]] == CLASSES and [c["id"] for c in data["categories"]] == [1, 2, 3]
    assert {(im["file_name"], im["width"], im["height"]) for im in data["images"]} == {
        (f, w, h) for f, (w, h, _) in TRUTH.items()}
    without = _boxes(voc_to_coco(str(tmp_path), CLASSES))  # the difficult second box of a.jpg is left out
    assert without["a.jpg"] == [("cat", [0, 0, 10, 12])]
    (tmp_path / "d.xml").write_text(_voc_xml("d.jpg", 9, 9, [(0, [1, 1, 2, 2])]).replace("cat", "cow"))
    with pytest.raises(DataError, match="d.jpg: class 'cow' is not in the class list"):
        voc_to_coco(str(tmp_path), CLASSES)


def test_yolo_boxes_come_back_exactly(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for name, (w, h, objs) in TRUTH.items():
        Image.new("RGB", (w, h)).save(tmp_path / "images" / name)
        if objs:
            lines = [f"{c} {repr((x + bw / 2) / w)} {repr((y + bh / 2) / h)} {repr(bw / w)} {repr(bh / h)}"
                     for c, (x, y, bw, bh) in objs]
            (tmp_path / "labels" / (name[:-4] + ".txt")).write_text("\n".join(lines) + "\n")
    (tmp_path / "data.yaml").write_text("names: {0: cat, 1: dog, 2: bird}\n")
    data = yolo_to_coco(str(tmp_path / "images"), str(tmp_path / "labels"), read_class_names(
        str(tmp_path / "data.yaml")))
    got, want = _boxes(data), _expected()
    assert got.keys() == want.keys()
    for name in want:
        assert [c for c, _ in got[name]] == [c for c, _ in want[name]]
        for (_, a), (_, b) in zip(got[name], want[name]):
            assert a == pytest.approx(b, abs=1e-9)
    (tmp_path / "labels" / "c.txt").write_text("7 0.5 0.5 0.1 0.1\n")
    with pytest.raises(DataError, match=r"c.txt:1: class 7 is outside the 3 class names"):
        yolo_to_coco(str(tmp_path / "images"), str(tmp_path / "labels"), CLASSES)


def test_the_json_is_never_written_over(tmp_path):
    path = tmp_path / "out.json"
    write_coco_json({"images": []}, str(path))
    assert json.loads(path.read_text()) == {"images": []}
    with pytest.raises(FileExistsError, match="exists"):
        write_coco_json({"images": [1]}, str(path))
