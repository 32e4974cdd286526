"""Datasets, transforms, synthetic data and batching. Imports nothing from ``models`` or ``engine``.

``build_dataset(split, dataset=...)`` is the one entry point the training script needs; ``engine.builders``
maps the config's fields onto these plain keyword arguments.
"""

from __future__ import annotations

import os
from typing import Any

from .coco import LABEL_MAPPINGS, CocoAnnotations, CocoDataset, ImageRecord, LabelMap, load_coco_json
from .collate import batch_image_sizes, collate_batch, make_generator, seed_worker
from .synthetic import ensure_synthetic, make_synthetic_coco, synthetic_paths
from .transforms import make_transforms

__all__ = [
    "LABEL_MAPPINGS", "CocoAnnotations", "CocoDataset", "ImageRecord", "LabelMap", "load_coco_json",
    "batch_image_sizes", "collate_batch", "make_generator", "seed_worker", "ensure_synthetic", "make_synthetic_coco",
    "synthetic_paths", "make_transforms", "build_dataset",
]

DATASETS = ("coco", "synthetic")


def build_dataset(
    split: str,
    *,
    dataset: str,
    root: str | None = None,
    img_folder: str | None = None,
    ann_file: str | None = None,
    synthetic: dict[str, Any] | None = None,
    train_transforms: bool | None = None,
    label_mapping: str = "contiguous",
    **transform_kwargs: Any,
) -> CocoDataset:
    """The ``split`` ("train" or "val") dataset.

    dataset="coco": either ``root`` in the COCO 2017 layout (``root/{split}2017/``,
        ``root/annotations/instances_{split}2017.json``) or explicit ``img_folder`` + ``ann_file`` (any COCO-format
        json, e.g. a custom dataset).
    dataset="synthetic": ``root`` is the output folder; the shapes dataset is generated there if missing or made
        with other parameters (``synthetic`` = kwargs of ``ensure_synthetic``: num_train, num_val, seed, min_size,
        max_size, ...). Call it on the main process first under torchrun (then barrier) to avoid a write race.
    train_transforms: use training augmentation; defaults to ``split == "train"``.
    label_mapping: "contiguous" (labels 0..K-1, custom datasets) or "category_id" (label = category id, as the
        official COCO checkpoints); see ``LabelMap``.
    transform_kwargs: passed to ``make_transforms`` (scales, max_size, val_size, crop, crop_resize_sizes, crop_min,
        crop_max, hflip); unknown names raise TypeError there.
    """
    if split not in ("train", "val"):
        raise ValueError(f"build_dataset: split must be 'train' or 'val', got {split!r}")
    if dataset not in DATASETS:
        raise ValueError(f"build_dataset: unknown dataset {dataset!r}; expected one of {DATASETS}")
    if dataset == "synthetic":
        if root is None:
            raise ValueError("build_dataset: dataset='synthetic' needs root (the folder to generate into)")
        paths = ensure_synthetic(root, **(synthetic or {}))[split]
        img_folder = img_folder or paths["img_folder"]
        ann_file = ann_file or paths["ann_file"]
    else:
        if synthetic:
            raise ValueError("build_dataset: `synthetic` options only apply to dataset='synthetic'")
        if root is not None:
            img_folder = img_folder or os.path.join(root, f"{split}2017")
            ann_file = ann_file or os.path.join(root, "annotations", f"instances_{split}2017.json")
        if img_folder is None or ann_file is None:
            raise ValueError("build_dataset: dataset='coco' needs root, or both img_folder and ann_file")
    train = split == "train" if train_transforms is None else train_transforms
    return CocoDataset(img_folder=img_folder, ann_file=ann_file, transforms=make_transforms(train, **transform_kwargs),
                       label_mapping=label_mapping)
