"""Synthetic shapes generator: determinism, exact boxes, COCO layout, regenerate-only-when-needed."""

import importlib.util
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from sparse_detr.data import CocoDataset
from sparse_detr.data.synthetic import (CATEGORY_IDS, MARKER, SHAPES, SyntheticFolderError, draw_shape_mask,
                                        ensure_synthetic, make_synthetic_coco, mask_to_xywh, render_image)

SMALL = dict(num_train=5, num_val=3, min_size=40, max_size=64)


def read_tree(root):
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = open(path, "rb").read()
    return out


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    make_synthetic_coco(str(tmp_path / "a"), seed=3, **SMALL)
    make_synthetic_coco(str(tmp_path / "b"), seed=3, **SMALL)
    make_synthetic_coco(str(tmp_path / "c"), seed=4, **SMALL)
    a, b, c = (read_tree(tmp_path / x) for x in "abc")
    assert sorted(a) == sorted([MARKER, "annotations/instances_train.json", "annotations/instances_val.json"]
                               + [f"train/{i:06d}.png" for i in range(5)] + [f"val/{i:06d}.png" for i in range(3)])
    assert a == b
    assert a["annotations/instances_train.json"] != c["annotations/instances_train.json"]
    assert a["train/000000.png"] != c["train/000000.png"]


def test_rectangle_box_is_exact():
    # PIL draws rectangle [x0, y0, x1, y1] with both corners inclusive: 20 x 15 pixels here.
    mask = draw_shape_mask("rectangle", (50, 60), (10, 20, 29, 34), np.random.default_rng(0))
    assert mask.sum() == 20 * 15
    assert mask_to_xywh(mask) == [10, 20, 20, 15]


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_stays_in_its_box(shape):
    box = (7, 9, 40, 30)
    mask = draw_shape_mask(shape, (48, 64), box, np.random.default_rng(1))
    ys, xs = np.nonzero(mask)
    assert mask.any() and xs.min() >= 7 and xs.max() <= 40 and ys.min() >= 9 and ys.max() <= 30


def test_rendered_boxes_are_tight_boxes_of_visible_pixels():
    rng = np.random.default_rng(5)
    image, instance, objects = render_image(rng, 120, 90, num_objects=6)
    assert image.shape == (90, 120, 3) and instance.shape == (90, 120) and len(objects) >= 2
    for k, obj in enumerate(objects):
        ys, xs = np.nonzero(instance == k)
        assert obj["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert obj["area"] == len(xs)
        # The instance map really describes the saved pixels: the object's pixels carry its colour.
        assert (image[ys, xs] == np.array(obj["colour"], dtype=np.uint8)).all()
        assert obj["category_id"] in CATEGORY_IDS


def test_json_is_valid_coco_with_varied_content(tmp_path):
    paths = make_synthetic_coco(str(tmp_path), num_train=24, num_val=2, seed=0, min_size=40, max_size=64)
    data = json.loads(open(paths["train"]["ann_file"]).read())
    assert [c["id"] for c in data["categories"]] == list(CATEGORY_IDS)
    per_image = {img["id"]: 0 for img in data["images"]}
    for a in data["annotations"]:
        per_image[a["image_id"]] += 1
        assert a["iscrowd"] == 0 and a["area"] <= a["bbox"][2] * a["bbox"][3]
    assert min(per_image.values()) == 0 and max(per_image.values()) > 2
    assert len({(img["width"], img["height"]) for img in data["images"]}) > 5
    for img in data["images"][:3]:
        assert Image.open(os.path.join(paths["train"]["img_folder"], img["file_name"])).size == (img["width"],
                                                                                                img["height"])
    assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])
    ds = CocoDataset(img_folder=paths["train"]["img_folder"], ann_file=paths["train"]["ann_file"])
    assert ds.stats["num_boxes_dropped"] == ds.stats["num_boxes_clipped"] == 0


def test_ensure_synthetic_generates_only_when_needed(tmp_path):
    root = str(tmp_path / "syn")
    paths = ensure_synthetic(root, **SMALL)
    assert os.path.isfile(os.path.join(root, MARKER))
    stamp = os.path.getmtime(paths["train"]["ann_file"])
    os.utime(paths["train"]["ann_file"], (stamp - 100, stamp - 100))
    ensure_synthetic(root, **SMALL)  # same parameters: untouched
    assert os.path.getmtime(paths["train"]["ann_file"]) == stamp - 100
    with pytest.raises(TypeError, match="bogus"):
        ensure_synthetic(root, bogus=1)


def test_generation_never_touches_a_folder_that_is_not_ours(tmp_path):
    """A user's folder (no marker) and one of ours made with other parameters are refused, byte for byte intact."""
    ours = str(tmp_path / "ours")
    ensure_synthetic(ours, **SMALL)
    theirs = tmp_path / "theirs"
    make_synthetic_coco(str(theirs), **SMALL)
    os.remove(theirs / MARKER)  # the layout of a generated set, but nothing says it is ours
    (theirs / "train" / "000050.png").write_bytes(b"the user's own image")
    for root, params, expected in ((str(theirs), SMALL, "no synthetic_params.json"),
                                   (ours, {**SMALL, "num_train": 2}, "num_train=5 (asked 2)")):
        before = read_tree(root)
        for generate in (ensure_synthetic, make_synthetic_coco):
            with pytest.raises(SyntheticFolderError, match=re.escape(expected)) as info:
                generate(root, **params)
            assert root in str(info.value)
            assert read_tree(root) == before
    (tmp_path / "empty").mkdir()
    ensure_synthetic(str(tmp_path / "empty"), **SMALL)  # an empty folder is fine


def test_interrupted_generation_is_resumed_not_refused(tmp_path, monkeypatch):
    import sparse_detr.data.synthetic as synthetic

    root = str(tmp_path / "syn")
    original, calls = synthetic._write_split, []

    def dies_in_val(*args, **kwargs):
        calls.append(args[1])
        if args[1] == "val":
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(synthetic, "_write_split", dies_in_val)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic(root, **SMALL)
    monkeypatch.setattr(synthetic, "_write_split", original)
    paths = ensure_synthetic(root, **SMALL)  # our marker (incomplete): regenerated
    make_synthetic_coco(str(tmp_path / "ref"), **SMALL)
    assert read_tree(root) == read_tree(tmp_path / "ref") and os.path.isfile(paths["val"]["ann_file"])


def test_cli_matches_function(tmp_path):
    # Loaded by path: tools/ is a folder of scripts, not a package.
    spec = importlib.util.spec_from_file_location(
        "make_synthetic", os.path.join(os.path.dirname(__file__), "..", "tools", "make_synthetic.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--out", str(tmp_path / "cli"), "--num-train", "2", "--num-val", "1", "--seed", "9",
          "--image-size", "40", "64"])
    make_synthetic_coco(str(tmp_path / "fn"), num_train=2, num_val=1, seed=9, min_size=40, max_size=64)
    assert read_tree(tmp_path / "cli") == read_tree(tmp_path / "fn")
    module.main(["--out", str(tmp_path / "cli2"), "--num-train", "2", "--num-val", "1", "--preset", "cluttered",
                 "--image-size", "64", "80", "--min-object-side", "20", "--max-object-scale", "0.6"])
    make_synthetic_coco(str(tmp_path / "fn2"), num_train=2, num_val=1, min_size=64, max_size=80, preset="cluttered",
                        min_object_side=20, max_object_scale=0.6)
    assert read_tree(tmp_path / "cli2") == read_tree(tmp_path / "fn2")
    assert json.load(open(tmp_path / "cli2" / "synthetic_params.json"))["min_object_side"] == 20


def test_generation_shows_progress_and_the_marker_ignores_it(tmp_path, capsys):
    from sparse_detr.data.synthetic import MARKER

    ensure_synthetic(str(tmp_path / "d"), progress=True, num_train=20, num_val=4, min_size=32, max_size=48)
    err = capsys.readouterr().err
    assert "generating the synthetic train split" in err and "20/20 images" in err and "4/4 images" in err
    assert len([line for line in err.splitlines() if "train split" in line]) == 11  # at the start, then every 10%
    assert "progress" not in json.loads((tmp_path / "d" / MARKER).read_text())
    ensure_synthetic(str(tmp_path / "d"), num_train=20, num_val=4, min_size=32, max_size=48)  # found: no work
    assert capsys.readouterr().err == ""
