"""COCO-format detection dataset (COCO itself or any json in the COCO layout) with up-front validation.

``CocoDataset(img_folder=..., ann_file=..., transforms=...)[i]`` returns ``(image, target)``:

* ``image``: float (3,H,W), normalised with the ImageNet mean/std, H,W after the transforms;
* ``target["labels"]``  (T,) int64 in ``[0, K)`` through ``dataset.label_map`` (contiguous, or the category ids);
* ``target["boxes"]``   (T,4) float32 cxcywh, normalised by the *transformed* image size (H,W);
* ``target["image_id"]`` () int64, the json's image id;
* ``target["orig_size"]`` (2,) int64 (h,w) of the file on disk (what the postprocessor maps boxes back to);
* ``target["size"]`` (2,) int64 (h,w) after the transforms.

Why not ``CocoDetection`` + ``wrap_dataset_for_transforms_v2``: the wrapper returns ``{"image_id"}`` only (no
``boxes``/``labels`` keys) for images without annotations, which breaks the v2 box transforms on perfectly valid
empty images; it passes raw category ids and unvalidated, unclipped boxes through, and reads every annotation lazily,
so a bad json fails (or silently trains on garbage) hours into a run. We therefore parse and validate the json once
at construction and feed the same v2 types (``tv_tensors.Image`` + ``tv_tensors.BoundingBoxes``) to the transforms.

Documented choices: crowd annotations (``iscrowd=1``) are not training targets; boxes are clipped to the image and
those with no area left are dropped (counted in ``dataset.stats`` and reported in one warning); images without
annotations are kept (T=0 is a valid sample: it teaches "no object"); an unreadable image raises ``RuntimeError``
(we stop rather than skip, so a broken download is never hidden).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torchvision import tv_tensors

from sparse_detr.errors import UserError

from .image_io import ImageReadError, read_image
from .transforms import boxes_xyxy_to_normalized_cxcywh, make_base_transforms


LABEL_MAPPINGS = ("contiguous", "category_id")


class DataError(UserError, ValueError):
    """An annotation file is malformed; the message names the file, the entry and the field."""


class ImageError(UserError, RuntimeError):
    """An image file is missing, unreadable, or not the size its annotation file says."""


class LabelMap:
    """Class labels (what the model's logits index) <-> dataset category ids, plus the category names.

    mode="contiguous" (custom datasets): labels ``0..K-1`` are the categories sorted by id, K = number of
        categories, so no logit is wasted on the gaps between ids.
    mode="category_id" (COCO with the official checkpoints): the label IS the category id, K = max id + 1, labels
        that are not a category of the json are never targets (COCO: 91 logits, 80 of them used). Keeps the
        official weights' class order, at the price of unused logits.

    Derived from the json's ``categories`` and saved in checkpoints (``to_dict``/``from_dict``, mode included) so
    predictions can always be mapped back.
    """

    def __init__(self, category_ids: Sequence[int], names: Sequence[str] | None = None,
                 mode: str = "contiguous") -> None:
        if mode not in LABEL_MAPPINGS:
            raise ValueError(f"LabelMap: mode must be one of {LABEL_MAPPINGS}, got {mode!r}")
        ids = [int(c) for c in category_ids]
        if len(set(ids)) != len(ids):
            raise ValueError(f"LabelMap: duplicate category ids in {ids}")
        if mode == "category_id" and any(c < 0 for c in ids):
            raise ValueError(f"LabelMap: category ids used as labels must be >= 0, got {ids}")
        names = [str(c) for c in ids] if names is None else [str(n) for n in names]
        if len(names) != len(ids):
            raise ValueError(f"LabelMap: {len(ids)} category ids but {len(names)} names")
        order = sorted(range(len(ids)), key=lambda i: ids[i])
        self.mode = mode
        self._ids = [ids[i] for i in order]
        self._names = [names[i] for i in order]
        labels = self._ids if mode == "category_id" else range(len(self._ids))
        self._index = dict(zip(self._ids, labels))  # category id -> label
        num = (max(self._ids) + 1 if self._ids else 0) if mode == "category_id" else len(self._ids)
        self._category_of = [-1] * num  # label -> category id, -1 for labels that are no category
        for cid, label in self._index.items():
            self._category_of[label] = cid

    @classmethod
    def from_categories(cls, categories: Sequence[dict], mode: str = "contiguous") -> "LabelMap":
        """From a COCO ``categories`` list (``[{"id": .., "name": ..}, ...]``)."""
        return cls([c["id"] for c in categories], [c.get("name", str(c["id"])) for c in categories], mode)

    @classmethod
    def from_dict(cls, state: dict) -> "LabelMap":
        # Checkpoints written before the mode existed were contiguous.
        return cls(state["category_ids"], state["names"], state.get("mode", "contiguous"))

    def to_dict(self) -> dict:
        """Plain lists only: safe for ``torch.save`` with ``weights_only=True`` loading, and for json/yaml.
        ``names`` is aligned with ``category_ids`` (not with the labels)."""
        return {"mode": self.mode, "category_ids": list(self._ids), "names": list(self._names)}

    @property
    def num_classes(self) -> int:
        """K: the number of labels, i.e. the fewest class logits a model needs."""
        return len(self._category_of)

    @property
    def category_ids(self) -> list[int]:
        """The dataset's category ids, sorted."""
        return list(self._ids)

    @property
    def names(self) -> list[str]:
        """The name of every label ``0..K-1`` (in category_id mode, labels that are no category are named
        ``"<unused N>"``), so ``names[label]`` works in both modes."""
        by_id = dict(zip(self._ids, self._names))
        return [by_id[c] if c >= 0 else f"<unused {label}>" for label, c in enumerate(self._category_of)]

    def to_contiguous(self, category_id: int) -> int:
        """The label of a category id (its position among the sorted ids, or the id itself in category_id
        mode)."""
        try:
            return self._index[int(category_id)]
        except KeyError:
            raise KeyError(f"category id {category_id} is not in the label map {self._ids}") from None

    to_label = to_contiguous

    def to_category_id(self, label: int) -> int:
        label = int(label)
        if not 0 <= label < len(self._category_of) or self._category_of[label] < 0:
            raise KeyError(f"label {label} is not a category of the label map ({self!r})")
        return self._category_of[label]

    def label_to_category_array(self) -> np.ndarray:
        """(K,) int64: the category id of every label, -1 where the label is no category (category_id mode)."""
        return np.asarray(self._category_of, dtype=np.int64)

    def __len__(self) -> int:
        return self.num_classes

    def __contains__(self, category_id: object) -> bool:
        return category_id in self._index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelMap) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"LabelMap(mode={self.mode!r}, num_classes={self.num_classes}, category_ids={self._ids})"


@dataclass
class ImageRecord:
    """One validated image: json metadata and its kept, clipped, non-crowd boxes (XYXY pixels)."""

    image_id: int
    file_name: str
    width: int
    height: int
    boxes: np.ndarray  # (T,4) float32 xyxy
    labels: np.ndarray  # (T,) int64 labels (LabelMap)


@dataclass
class CocoAnnotations:
    """All validated images and boxes, packed into a few numpy arrays (images sorted by id).

    Not a list of per-image objects: DataLoader workers are forked, and touching per-object refcounts would copy
    the pages of a COCO-sized list into every worker. Boxes of image ``i`` are rows ``offsets[i]:offsets[i+1]``.
    """

    image_ids: np.ndarray  # (N,) int64
    sizes: np.ndarray  # (N,2) int64 (h, w) from the json
    file_names: np.ndarray  # (N,) fixed-width str
    offsets: np.ndarray  # (N+1,) int64
    boxes: np.ndarray  # (M,4) float32 xyxy pixels, clipped to the image
    labels: np.ndarray  # (M,) int64 labels (LabelMap)

    def __len__(self) -> int:
        return len(self.image_ids)

    def record(self, index: int) -> ImageRecord:
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        height, width = (int(v) for v in self.sizes[index])
        return ImageRecord(image_id=int(self.image_ids[index]), file_name=str(self.file_names[index]),
                           width=width, height=height, boxes=self.boxes[start:end].copy(),
                           labels=self.labels[start:end].copy())


def _require(obj: Any, key: str, where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise DataError(f"{where}: missing required key '{key}'")
    return obj[key]


def _require_int(obj: dict, key: str, where: str) -> int:
    value = _require(obj, key, where)
    # bool is an int subclass; a `true` id is a json mistake, not an id.
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"{where}: field '{key}' must be an integer, got {value!r}")
    return value


def _raise_annotation_error(ann_file: str, index: int, ann: Any, images: dict, label_map: LabelMap,
                            seen_ids: set) -> None:
    """The slow, precise path: called only once the fast loop found something wrong with ``ann``."""
    ann_id = _require_int(ann, "id", f"{ann_file}: annotations[{index}]")
    where = f"{ann_file}: annotation id {ann_id}"
    if ann_id in seen_ids:
        raise DataError(f"{where}: duplicate annotation id")
    image_id = _require_int(ann, "image_id", where)
    if image_id not in images:
        raise DataError(f"{where}: field 'image_id' refers to unknown image id {image_id}")
    where = f"{where} (image id {image_id})"
    category_id = _require_int(ann, "category_id", where)
    if category_id not in label_map:
        raise DataError(f"{where}: field 'category_id' {category_id} is not in 'categories' "
                         f"(known ids: {label_map.category_ids})")
    bbox = _require(ann, "bbox", where)
    if (not isinstance(bbox, list) or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
        raise DataError(f"{where}: field 'bbox' must be a list of 4 numbers [x, y, w, h], got {bbox!r}")
    raise AssertionError(f"{where}: rejected by the fast check but no error found")  # keeps the two paths honest


def load_coco_json(ann_file: str, label_mapping: str = "contiguous") -> tuple[CocoAnnotations, LabelMap, dict]:
    """Parse and validate a COCO-format json. Returns (packed annotations, label map, stats).

    ``label_mapping``: the ``LabelMap`` mode ("contiguous" or "category_id") that turns category ids into labels.

    Raises FileNotFoundError (missing file) or ValueError (malformed json, missing key, wrong type, unknown
    image/category id, duplicate id); every message starts with the file path and names the offending id and field.
    Boxes are clipped to the image; boxes without area after clipping are dropped; both are counted in ``stats`` and
    reported in one warning. Crowd annotations are validated, then left out.
    """
    if not os.path.isfile(ann_file):
        raise FileNotFoundError(f"annotation file not found: {ann_file}")
    try:
        with open(ann_file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{ann_file}: malformed JSON: {e}") from e
    if not isinstance(data, dict):
        raise DataError(f"{ann_file}: top level must be a JSON object with 'images', 'annotations', 'categories'")
    for key in ("images", "annotations", "categories"):
        if not isinstance(_require(data, key, ann_file), list):
            raise DataError(f"{ann_file}: key '{key}' must be a list")

    categories = data["categories"]
    if not categories:
        raise DataError(f"{ann_file}: 'categories' is empty; a detector needs at least one class")
    for i, cat in enumerate(categories):
        where = f"{ann_file}: categories[{i}]"
        _require_int(cat, "id", where)
        _require(cat, "name", f"{where} (category id {cat['id']})")
    try:
        label_map = LabelMap.from_categories(categories, label_mapping)
    except ValueError as e:
        raise DataError(f"{ann_file}: {e}") from None

    images: dict[int, dict] = {}
    for i, img in enumerate(data["images"]):
        image_id = _require_int(img, "id", f"{ann_file}: images[{i}]")
        where = f"{ann_file}: image id {image_id}"
        if image_id in images:
            raise DataError(f"{where}: duplicate image id")
        _require(img, "file_name", where)
        for key in ("width", "height"):
            if _require_int(img, key, where) <= 0:
                raise DataError(f"{where}: field '{key}' must be positive, got {img[key]}")
        images[image_id] = img
    sorted_ids = sorted(images)
    position = {image_id: i for i, image_id in enumerate(sorted_ids)}
    sizes = np.array([(images[i]["height"], images[i]["width"]) for i in sorted_ids], dtype=np.int64).reshape(-1, 2)

    # Fast loop: COCO train has ~860k annotations, so the common case does cheap checks only and collects plain
    # lists; anything odd goes to _raise_annotation_error for the precise message. `type(x) is int` rejects bools.
    ann_ids, ann_pos, ann_labels, ann_boxes, is_crowd, seen_ids = [], [], [], [], [], set()
    for i, ann in enumerate(data["annotations"]):
        try:
            ann_id, image_id, category_id, bbox = ann["id"], ann["image_id"], ann["category_id"], ann["bbox"]
            ok = (type(ann_id) is int and type(image_id) is int and type(category_id) is int
                  and ann_id not in seen_ids and image_id in position and category_id in label_map
                  and type(bbox) is list and len(bbox) == 4)
        except (KeyError, TypeError):
            ok = False
        if not ok:
            _raise_annotation_error(ann_file, i, ann, images, label_map, seen_ids)
        seen_ids.add(ann_id)
        ann_boxes.append(bbox)  # crowd boxes too: their numbers are validated like any other
        is_crowd.append(bool(ann.get("iscrowd", 0)))
        if is_crowd[-1]:
            continue
        ann_ids.append(ann_id)
        ann_pos.append(position[image_id])
        ann_labels.append(label_map.to_label(category_id))

    xywh = np.array(ann_boxes) if ann_boxes else np.zeros((0, 4))
    # numpy turns [True, 5, 8, 9] into ints silently: a bool among numbers needs its own (cheap) look.
    if (xywh.dtype.kind not in "iuf" or xywh.shape != (len(ann_boxes), 4)
            or any(type(v) is bool for bbox in ann_boxes for v in bbox)):
        for i, bbox in enumerate(ann_boxes):  # find the offender for the message
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
                _raise_annotation_error(ann_file, i, data["annotations"][i], images, label_map, set())
    ann_ids_arr = np.array(ann_ids, dtype=np.int64)
    xywh = xywh.astype(np.float64)[~np.array(is_crowd, dtype=bool)]
    pos = np.array(ann_pos, dtype=np.int64)

    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    height, width = sizes[pos, 0:1].astype(np.float64), sizes[pos, 1:2].astype(np.float64)
    limit = np.concatenate([width, height, width, height], axis=1)
    with np.errstate(invalid="ignore"):
        clipped = np.clip(xyxy, 0.0, limit)
        # NaN/inf coordinates fail `isfinite`, so they are dropped together with the degenerate boxes.
        keep = np.isfinite(xyxy).all(1) & (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    was_clipped = keep & (clipped != xyxy).any(1)
    dropped_ids, clipped_ids = ann_ids_arr[~keep].tolist(), ann_ids_arr[was_clipped].tolist()

    order = np.argsort(pos[keep], kind="stable")  # group by image, keep json order within an image
    counts = np.bincount(pos[keep], minlength=len(sorted_ids))
    packed = CocoAnnotations(
        image_ids=np.array(sorted_ids, dtype=np.int64),
        sizes=sizes,
        file_names=np.array([str(images[i]["file_name"]) for i in sorted_ids], dtype=str),
        offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        boxes=clipped[keep][order].astype(np.float32).reshape(-1, 4),
        labels=np.array(ann_labels, dtype=np.int64)[keep][order],
    )
    stats = {"num_images": len(sorted_ids), "num_annotations": len(data["annotations"]),
             "num_crowd_skipped": sum(is_crowd), "num_boxes_clipped": len(clipped_ids),
             "num_boxes_dropped": len(dropped_ids), "num_boxes_kept": int(keep.sum()),
             "num_images_without_boxes": int((counts == 0).sum())}
    if dropped_ids or clipped_ids:
        # One summary warning instead of one per box: COCO-scale files would otherwise flood the log.
        warnings.warn(
            f"{ann_file}: dropped {len(dropped_ids)} box(es) with no area inside the image "
            f"(e.g. annotation ids {dropped_ids[:5]}); clipped {len(clipped_ids)} box(es) to the image "
            f"(e.g. annotation ids {clipped_ids[:5]})", stacklevel=3)
    return packed, label_map, stats


class CocoDataset(torch.utils.data.Dataset):
    """Validated COCO-format dataset; see the module docstring for the sample format.

    Args:
        img_folder: folder the json's ``file_name`` entries are relative to.
        ann_file: COCO-format annotation json.
        transforms: callable ``(tv_tensors.Image uint8, {"boxes": BoundingBoxes XYXY, "labels"}) -> same`` that
            also converts to float and normalises (``make_transforms``); ``None`` = only float + normalise.
        label_mapping: "contiguous" (labels 0..K-1) or "category_id" (label = category id); see ``LabelMap``.
    """

    def __init__(self, img_folder: str, ann_file: str, transforms: Callable | None = None,
                 label_mapping: str = "contiguous") -> None:
        if not os.path.isdir(img_folder):
            raise FileNotFoundError(f"image folder not found: {img_folder}")
        self.img_folder = img_folder
        self.ann_file = ann_file
        self.annotations, self.label_map, self.stats = load_coco_json(ann_file, label_mapping)
        self.transforms = make_base_transforms() if transforms is None else transforms

    def __len__(self) -> int:
        return len(self.annotations)

    @property
    def image_ids(self) -> list[int]:
        return self.annotations.image_ids.tolist()

    def record(self, index: int) -> ImageRecord:
        """The validated json entry of sample ``index`` (kept boxes XYXY pixels, labels of the label map)."""
        return self.annotations.record(index)

    def load_image(self, record: ImageRecord) -> tv_tensors.Image:
        """The image on disk as uint8 (3,H,W); RuntimeError naming path and image id if unreadable or mis-sized."""
        path = os.path.join(self.img_folder, record.file_name)
        try:
            image = read_image(path)  # upright (EXIF), 8-bit RGB: what the annotator saw
        except ImageReadError as e:
            raise ImageError(f"cannot read image {path} (image id {record.image_id}): {e.reason}") from e
        height, width = image.shape[-2:]
        if (height, width) != (record.height, record.width):
            # Boxes were validated against the json size; a different file size means they would be wrong.
            rotated = (width, height) == (record.height, record.width)
            raise ImageError(f"image {path} (image id {record.image_id}) is {width}x{height} but {self.ann_file} "
                             f"says {record.width}x{record.height}"
                             + ("; the file's EXIF orientation turns it by 90 degrees: the json's size (and "
                                "boxes) must be those of the upright picture a viewer shows" if rotated else ""))
        return tv_tensors.Image(image)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        record = self.record(index)
        image = self.load_image(record)
        orig_size = (record.height, record.width)
        boxes = tv_tensors.BoundingBoxes(torch.from_numpy(record.boxes), format="XYXY", canvas_size=orig_size)
        image, target = self.transforms(image, {"boxes": boxes, "labels": torch.from_numpy(record.labels)})
        size = tuple(image.shape[-2:])
        return image.as_subclass(torch.Tensor), {
            "boxes": boxes_xyxy_to_normalized_cxcywh(target["boxes"]),
            "labels": target["labels"].to(torch.int64),
            "image_id": torch.tensor(record.image_id, dtype=torch.int64),
            "orig_size": torch.tensor(orig_size, dtype=torch.int64),
            "size": torch.tensor(size, dtype=torch.int64),
        }
