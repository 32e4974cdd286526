"""COCO-format dataset, label map, transforms and collation: format, validation errors, box/pixel consistency."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.transforms import v2

from sparse_detr.data import (CocoDataset, LabelMap, batch_image_sizes, build_dataset, collate_batch,
                              make_generator, make_transforms, seed_worker)
from sparse_detr.data.transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize

CATEGORIES = [{"id": 7, "name": "dog"}, {"id": 2, "name": "cat"}]


def write_coco(root, annotations, images=None, categories=CATEGORIES, write_images=True):
    """A tiny COCO json + PNGs under root; default: one 40x20 image (id 1) and one 30x30 image (id 2)."""
    images = images or [{"id": 1, "file_name": "a.png", "width": 40, "height": 20},
                        {"id": 2, "file_name": "b.png", "width": 30, "height": 30}]
    os.makedirs(root / "img", exist_ok=True)
    if write_images:
        for img in images:
            Image.new("RGB", (img["width"], img["height"]), (10, 200, 30)).save(root / "img" / img["file_name"])
    ann_file = root / "ann.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return str(root / "img"), str(ann_file)


def ann(ann_id, bbox, image_id=1, category_id=7, **extra):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, **extra}


def test_label_map_round_trip_non_contiguous():
    lm = LabelMap([11, 3, 1], ["c", "b", "a"])
    assert lm.num_classes == 3 and lm.category_ids == [1, 3, 11] and lm.names == ["a", "b", "c"]
    assert [lm.to_contiguous(c) for c in (1, 3, 11)] == [0, 1, 2]
    assert [lm.to_category_id(lm.to_contiguous(c)) for c in (1, 3, 11)] == [1, 3, 11]
    restored = LabelMap.from_dict(json.loads(json.dumps(lm.to_dict())))
    assert restored == lm
    with pytest.raises(KeyError, match="5"):
        lm.to_contiguous(5)
    with pytest.raises(KeyError):
        lm.to_category_id(3)


def test_label_map_category_id_mode_round_trips():
    """Identity mode (COCO + official checkpoints): label = category id, K = max id + 1, gaps are no category."""
    lm = LabelMap([11, 3, 1], ["c", "b", "a"], mode="category_id")
    assert lm.num_classes == len(lm) == 12 and lm.category_ids == [1, 3, 11]
    assert [lm.to_contiguous(c) for c in (1, 3, 11)] == [1, 3, 11]
    assert [lm.to_category_id(c) for c in (1, 3, 11)] == [1, 3, 11]
    assert lm.names[1] == "a" and lm.names[11] == "c" and len(lm.names) == 12  # names[label] in both modes
    assert lm.label_to_category_array().tolist() == [-1, 1, -1, 3] + [-1] * 7 + [11]
    for label in (0, 2, 12):
        with pytest.raises(KeyError):
            lm.to_category_id(label)
    with pytest.raises(KeyError):
        lm.to_contiguous(2)
    state = json.loads(json.dumps(lm.to_dict()))  # what a checkpoint stores
    assert state["mode"] == "category_id" and LabelMap.from_dict(state) == lm
    assert LabelMap.from_dict(state) != LabelMap([11, 3, 1], ["c", "b", "a"])  # the mode is part of the map
    old = {"category_ids": [1, 3], "names": ["a", "b"]}  # written before the mode existed: contiguous
    assert LabelMap.from_dict(old).mode == "contiguous" and LabelMap.from_dict(old).num_classes == 2
    with pytest.raises(ValueError, match="mode"):
        LabelMap([1], mode="identity")


def test_dataset_labels_follow_the_label_mapping(tmp_path):
    img_folder, ann_file = write_coco(tmp_path, [ann(1, [2, 2, 10, 10]), ann(2, [5, 5, 8, 8], category_id=2)])
    by_id = CocoDataset(img_folder=img_folder, ann_file=ann_file, label_mapping="category_id")
    contiguous = CocoDataset(img_folder=img_folder, ann_file=ann_file)
    assert by_id[0][1]["labels"].tolist() == [7, 2] and by_id.label_map.num_classes == 8
    assert contiguous[0][1]["labels"].tolist() == [1, 0] and contiguous.label_map.num_classes == 2
    built = build_dataset("val", dataset="coco", img_folder=img_folder, ann_file=ann_file,
                          label_mapping="category_id")
    assert built.label_map == by_id.label_map


def test_build_fails_clearly_when_num_classes_is_below_the_largest_category_id(tmp_path):
    from sparse_detr.config import config_from_dict
    from sparse_detr.engine.training.builders import build_split

    data = {"dataset": "synthetic", "root": str(tmp_path), "num_workers": 0,
            "synthetic": {"num_train": 1, "num_val": 1, "min_size": 32, "max_size": 32}}
    cfg = config_from_dict({"model": {"num_classes": 6}, "data": {**data, "label_mapping": "category_id"}})
    with pytest.raises(ValueError, match=r"largest id is 11.*num_classes must be at least 12 \(it is 6\)"):
        build_split(cfg, "val")
    assert build_split(config_from_dict({"model": {"num_classes": 12}, "data": {
        **data, "label_mapping": "category_id"}}), "val").label_map.num_classes == 12
    assert build_split(config_from_dict({"model": {"num_classes": 6}, "data": data}), "val").label_map.mode == \
        "contiguous"


def test_synthetic_samples_have_documented_format(tmp_path):
    built = build_dataset("val", dataset="synthetic", root=str(tmp_path),
                          synthetic=dict(num_train=1, num_val=8, min_size=48, max_size=80))
    raw = json.loads(open(built.ann_file).read())
    # Same files without transforms (no resize), so targets compare 1:1 with the json.
    ds = CocoDataset(img_folder=built.img_folder, ann_file=built.ann_file)
    size = built[0][1]["size"]  # default val resize: shorter side 800 unless the longer side would pass 1333
    assert size.max() <= 1333 and size.min() > 700 and built[0][0].shape[-2:] == tuple(size)
    assert ds.label_map.category_ids == [1, 3, 5, 7, 9, 11] and len(ds) == 8
    saw_empty = False
    for i in range(len(ds)):
        image, target = ds[i]
        image_id = int(target["image_id"])
        info = next(img for img in raw["images"] if img["id"] == image_id)
        h, w = info["height"], info["width"]
        assert image.dtype == torch.float32 and image.shape == (3, h, w)
        pixels = torch.from_numpy(np.array(Image.open(tmp_path / "val" / info["file_name"]))).permute(2, 0, 1)
        mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
        expected = (pixels / 255 - mean) / std
        torch.testing.assert_close(image, expected)
        assert target["orig_size"].tolist() == [h, w] == target["size"].tolist()
        assert target["image_id"].dtype == target["labels"].dtype == torch.int64
        anns = [a for a in raw["annotations"] if a["image_id"] == image_id]
        assert target["boxes"].shape == (len(anns), 4) and target["labels"].shape == (len(anns),)
        saw_empty |= len(anns) == 0
        for box, label, a in zip(target["boxes"], target["labels"], anns):
            cx, cy, bw, bh = (box * torch.tensor([w, h, w, h])).tolist()
            assert np.allclose([cx - bw / 2, cy - bh / 2, bw, bh], a["bbox"], atol=1e-3)
            assert ds.label_map.to_category_id(int(label)) == a["category_id"]
    assert saw_empty  # images without objects are kept as T=0 samples


def test_missing_files_name_the_path(tmp_path):
    img_dir, ann_file = write_coco(tmp_path, [])
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoDataset(img_folder=img_dir, ann_file=str(tmp_path / "nope.json"))
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        CocoDataset(img_folder=str(tmp_path / "no_such_dir"), ann_file=ann_file)


def test_malformed_json_and_missing_keys(tmp_path):
    img_dir, ann_file = write_coco(tmp_path, [])
    open(ann_file, "w").write('{"images": [')
    with pytest.raises(ValueError, match="ann.json.*malformed JSON"):
        CocoDataset(img_folder=img_dir, ann_file=ann_file)
    open(ann_file, "w").write(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match="'categories'"):
        CocoDataset(img_folder=img_dir, ann_file=ann_file)
    _, ann_file = write_coco(tmp_path, [{"id": 4, "image_id": 1, "category_id": 7}])
    with pytest.raises(ValueError, match=r"annotation id 4 \(image id 1\).*'bbox'"):
        CocoDataset(img_folder=img_dir, ann_file=ann_file)
    _, ann_file = write_coco(tmp_path, [ann(1, [1, 1, 5, 5]), ann(2, [1, "2", 5, 5])])
    with pytest.raises(ValueError, match=r"annotation id 2 \(image id 1\).*'bbox'.*'2'"):
        CocoDataset(img_folder=img_dir, ann_file=ann_file)
    for bbox in ([True, 1, 5, 5], [1.0, 1.0, 5.0, False]):  # numpy would read the bool as 1 / 0 silently
        _, ann_file = write_coco(tmp_path, [ann(1, [1, 1, 5, 5]), ann(2, bbox)])
        with pytest.raises(ValueError, match=r"annotation id 2 \(image id 1\).*'bbox'.*(True|False)"):
            CocoDataset(img_folder=img_dir, ann_file=ann_file)
    _, ann_file = write_coco(tmp_path, [ann(1, [1, 1, 5, 5]), ann(1, [2, 2, 5, 5])])
    with pytest.raises(ValueError, match="annotation id 1: duplicate"):
        CocoDataset(img_folder=img_dir, ann_file=ann_file)
    _, ann_file = write_coco(tmp_path, [], images=[{"id": 3, "file_name": "c.png", "width": 8}],
                              write_images=False)
    with pytest.raises(ValueError, match="image id 3.*'height'"):
        CocoDataset(img_folder=img_dir, ann_file=ann_file)


def test_unknown_category_names_annotation_and_category(tmp_path):
    img_dir, ann_file = write_coco(tmp_path, [ann(1, [1, 1, 5, 5]), ann(9, [1, 1, 5, 5], category_id=4)])
    with pytest.raises(ValueError, match="annotation id 9.*category_id.* 4 "):
        CocoDataset(img_folder=img_dir, ann_file=ann_file)


def test_boxes_clipped_dropped_and_reported_once(tmp_path):
    anns = [ann(1, [-10, 5, 30, 10]),                    # sticks out left: clipped to x in [0, 20]
            ann(2, [5, 5, 0, 10]), ann(3, [5, 5, 4, -2]),  # zero / negative size: dropped
            ann(4, [50, 0, 5, 5]),                         # wholly outside the 40x20 image: dropped
            ann(7, [1, 1, float("nan"), 3]),               # not finite: dropped
            ann(5, [2, 2, 6, 6], category_id=2),           # fine
            ann(6, [0, 0, 10, 10], iscrowd=1)]             # crowd: not a training target
    img_dir, ann_file = write_coco(tmp_path, anns)
    with pytest.warns(UserWarning) as record:
        ds = CocoDataset(img_folder=img_dir, ann_file=ann_file)
    assert len(record) == 1
    message = str(record[0].message)
    assert "dropped 4" in message and "[2, 3, 4, 7]" in message and "clipped 1" in message
    assert ds.stats["num_boxes_dropped"] == 4 and ds.stats["num_boxes_clipped"] == 1
    assert ds.stats["num_crowd_skipped"] == 1 and ds.stats["num_boxes_kept"] == 2
    _, target = ds[0]
    xyxy = v2.functional.convert_bounding_box_format(
        target["boxes"] * torch.tensor([40, 20, 40, 20]), old_format="CXCYWH", new_format="XYXY")
    torch.testing.assert_close(xyxy, torch.tensor([[0.0, 5, 20, 15], [2, 2, 8, 8]]))
    assert target["labels"].tolist() == [ds.label_map.to_contiguous(7), ds.label_map.to_contiguous(2)] == [1, 0]
    # Image 2 has no annotation: kept, with empty targets.
    assert len(ds) == 2 and ds.stats["num_images_without_boxes"] == 1
    _, empty = ds[1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)


def test_unreadable_image_raises_naming_path_and_id(tmp_path):
    img_dir, ann_file = write_coco(tmp_path, [ann(1, [1, 1, 5, 5])])
    (tmp_path / "img" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    ds = CocoDataset(img_folder=img_dir, ann_file=ann_file)
    ds[0]
    with pytest.raises(RuntimeError, match=r"b\.png \(image id 2\)"):
        ds[1]
    os.remove(tmp_path / "img" / "b.png")
    with pytest.raises(RuntimeError, match=r"b\.png \(image id 2\)"):
        ds[1]
    Image.new("RGB", (31, 30)).save(tmp_path / "img" / "b.png")  # size disagrees with the json
    with pytest.raises(RuntimeError, match="image id 2.*31x30"):
        ds[1]


def _two_object_sample():
    """A 64x96 image with a red (label 0) and a blue (label 1) rectangle, and their exact boxes."""
    pixels = torch.zeros(3, 64, 96, dtype=torch.uint8)
    pixels[0, 10:40, 5:35] = 255
    pixels[2, 30:60, 50:90] = 255
    boxes = tv_tensors.BoundingBoxes([[5.0, 10, 35, 40], [50, 30, 90, 60]], format="XYXY", canvas_size=(64, 96))
    return tv_tensors.Image(pixels), {"boxes": boxes, "labels": torch.tensor([0, 1])}


def test_train_transforms_keep_boxes_on_their_pixels():
    """Flip/resize/crop: each surviving box must still frame the pixels of its own object's colour."""
    image, target = _two_object_sample()
    pipeline = make_transforms(True, scales=(48, 64, 80), max_size=160, crop_resize_sizes=(64, 72),
                               crop_min=32, crop_max=64)
    torch.manual_seed(0)
    for _ in range(25):
        out, t = pipeline(image, target)
        rgb = denormalize(out)
        boxes = t["boxes"].as_subclass(torch.Tensor)
        for box, label in zip(boxes, t["labels"]):
            if (box[2:] - box[:2]).min() < 4:
                continue  # slivers left by a crop are below the interpolation tolerance
            channel = 0 if label == 0 else 2
            ys, xs = torch.nonzero(rgb[channel] > 0.5, as_tuple=True)
            found = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
            assert torch.allclose(found, box, atol=2.0), (found, box)


def test_flip_twice_is_identity_and_resize_scales_boxes():
    image, target = _two_object_sample()
    flip = v2.RandomHorizontalFlip(p=1.0)
    flipped, t1 = flip(image, target)
    assert t1["boxes"].tolist() == [[61, 10, 91, 40], [6, 30, 46, 60]]  # x -> 96 - x
    back, t2 = flip(flipped, t1)
    assert torch.equal(back, image) and torch.equal(t2["boxes"], target["boxes"])
    out, t = make_transforms(False, val_size=128, max_size=1000)(image, target)
    assert out.shape == (3, 128, 192)
    torch.testing.assert_close(t["boxes"].as_subclass(torch.Tensor), target["boxes"].as_subclass(torch.Tensor) * 2)


def test_transforms_replay_with_the_same_seed():
    image, target = _two_object_sample()
    pipeline = make_transforms(True, scales=(48, 64, 80), max_size=160, crop_resize_sizes=(64,), crop_min=32,
                               crop_max=64)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append([pipeline(image, target) for _ in range(5)])
    for (a, ta), (b, tb) in zip(*runs):
        assert torch.equal(a, b) and torch.equal(ta["boxes"], tb["boxes"])


def test_collate_pads_and_masks():
    a, b = torch.rand(3, 5, 7), torch.rand(3, 8, 4)
    images, mask, targets = collate_batch([(a, {"i": 0}), (b, {"i": 1})])
    assert images.shape == (2, 3, 8, 7) and mask.shape == (2, 8, 7) and mask.dtype == torch.bool
    assert torch.equal(images[0, :, :5, :7], a) and images[0, :, 5:].abs().sum() == 0
    assert torch.equal(images[1, :, :8, :4], b) and images[1, :, :, 4:].abs().sum() == 0
    assert mask[0].sum() == 8 * 7 - 5 * 7 and not mask[0, :5, :7].any() and mask[0, 5:].all()
    assert not mask[1, :, :4].any() and mask[1, :, 4:].all()
    assert [t["i"] for t in targets] == [0, 1]
    images, mask, _ = collate_batch([(a, {}), (b, {})], size_divisibility=32)
    assert images.shape[-2:] == (32, 32) and mask[0, :5, :7].logical_not().all() and mask.sum() == 2 * 1024 - 35 - 32


def test_batch_image_sizes_are_host_ints_from_the_targets():
    a, b = torch.rand(3, 5, 7), torch.rand(3, 8, 4)
    targets = [{"size": torch.tensor([5, 7])}, {"size": torch.tensor([8, 4])}]
    images, mask, targets = collate_batch([(a, targets[0]), (b, targets[1])])
    sizes = batch_image_sizes(targets)
    assert sizes == [(5, 7), (8, 4)] and all(type(v) is int for s in sizes for v in s)
    assert sizes == [(int((~m).any(1).sum()), int((~m).any(0).sum())) for m in mask]  # the unpadded extents
    assert batch_image_sizes([{"size": torch.tensor([5, 7])}, {}]) is None  # unknown: the model bounds k itself


def test_seeded_loader_is_reproducible(tmp_path):
    ds = build_dataset("train", dataset="synthetic", root=str(tmp_path),
                       synthetic=dict(num_train=6, num_val=1, min_size=32, max_size=48),
                       scales=(32, 40), max_size=64, crop_resize_sizes=(40,), crop_min=24, crop_max=40)

    def batches(seed):
        loader = DataLoader(ds, batch_size=3, shuffle=True, num_workers=2, collate_fn=collate_batch,
                            worker_init_fn=seed_worker, generator=make_generator(seed))
        return [(x, [t["image_id"].item() for t in ts]) for x, _, ts in loader]

    first, again, other = batches(0), batches(0), batches(1)
    assert all(torch.equal(x, y) and i == j for (x, i), (y, j) in zip(first, again))
    assert any(not torch.equal(x, y) if x.shape == y.shape else True for (x, _), (y, _) in zip(first, other))
