"""Image + box augmentation for detection, built on ``torchvision.transforms.v2``.

``make_transforms(train=...)`` returns the Deformable/Sparse DETR COCO recipe (as the official code):

* train: horizontal flip; then, with equal probability, either
  (a) resize the shorter side to one of ``scales`` (longer side capped at ``max_size``), or
  (b) resize the shorter side to one of ``crop_resize_sizes``, crop a random ``[crop_min, crop_max]`` region,
      then resize as in (a);
  then drop boxes the crop made degenerate, convert to float and normalise with the ImageNet statistics.
* val: shorter side ``val_size`` (longer side capped at ``max_size``), float, normalise.

Inputs are a ``tv_tensors.Image`` (uint8, (3,H,W)) and a target dict whose ``boxes`` is a
``tv_tensors.BoundingBoxes`` (XYXY pixels) and whose ``labels`` is an int64 tensor; v2 transforms every
``BoundingBoxes`` together with the image, so boxes never drift from the pixels.

Randomness: every random choice here comes from torch's global RNG (v2 uses ``torch.rand``/``torch.randint``/
``torch.multinomial``), so ``torch.manual_seed`` (and, in DataLoader workers, the loader's ``generator``, see
``collate.py``) makes augmentation reproducible. Nothing uses Python's ``random`` or numpy.

Sizes are plain ints, so the tiny synthetic demo can use e.g. ``scales=(160, 192, 224), max_size=400``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The official recipe: shorter side 480, 512, ..., 800.
DEFAULT_SCALES = tuple(range(480, 801, 32))


class RandomSizeCrop(v2.Transform):
    """Crop a random region whose width and height are drawn uniformly from ``[min_size, max_size]``.

    torchvision has no exact equivalent: ``RandomResizedCrop`` resizes to a fixed output, and ``RandomCrop`` has a
    fixed crop size. The side is also capped by the image side (a crop cannot be larger than the image); when the
    image is smaller than ``min_size`` (tiny synthetic images) the lower bound shrinks to the image side instead of
    failing. Boxes are shifted and clamped by v2's crop kernel; boxes left with no area are removed later by
    ``SanitizeBoundingBoxes``.
    """

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        if not 0 < min_size <= max_size:
            raise ValueError(f"RandomSizeCrop needs 0 < min_size <= max_size, got {min_size}, {max_size}")
        self.min_size = int(min_size)
        self.max_size = int(max_size)

    def _side(self, image_side: int) -> int:
        hi = min(image_side, self.max_size)
        lo = min(self.min_size, hi)
        return int(torch.randint(lo, hi + 1, ()))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        crop_h, crop_w = self._side(height), self._side(width)
        top = int(torch.randint(0, height - crop_h + 1, ()))
        left = int(torch.randint(0, width - crop_w + 1, ()))
        return dict(top=top, left=left, height=crop_h, width=crop_w)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


def _labels_getter(sample: Any) -> Any:
    # SanitizeBoundingBoxes must drop the labels of the boxes it removes. Our sample is (image, target dict);
    # naming the key explicitly avoids the default heuristic (which searches for a key containing "label").
    _, target = sample
    return target["labels"]


def _resize_shorter(sizes: Sequence[int], max_size: int | None) -> v2.Transform:
    # RandomShortestSize: shorter side -> a random entry of `sizes`, ratio capped so the longer side stays
    # <= max_size, which is exactly the official RandomResize(sizes, max_size).
    return v2.RandomShortestSize(min_size=[int(s) for s in sizes], max_size=max_size)


def make_transforms(
    train: bool,
    scales: Sequence[int] = DEFAULT_SCALES,
    max_size: int = 1333,
    val_size: int = 800,
    crop: bool = True,
    crop_resize_sizes: Sequence[int] = (400, 500, 600),
    crop_min: int = 384,
    crop_max: int = 600,
    hflip: bool = True,
) -> v2.Compose:
    """Build the train or val pipeline (see the module docstring). Called as ``pipeline(image, target)``."""
    if len(scales) == 0:
        raise ValueError("make_transforms: `scales` must not be empty")
    steps: list[v2.Transform] = []
    if train:
        if hflip:
            steps.append(v2.RandomHorizontalFlip(p=0.5))
        plain_resize = _resize_shorter(scales, max_size)
        if crop:
            crop_branch = v2.Compose(
                [
                    _resize_shorter(crop_resize_sizes, None),
                    RandomSizeCrop(crop_min, crop_max),
                    _resize_shorter(scales, max_size),
                ]
            )
            steps.append(v2.RandomChoice([plain_resize, crop_branch]))
        else:
            steps.append(plain_resize)
        # Only training crops can make boxes degenerate; resizing by a positive factor cannot, so val keeps every
        # box (its targets feed the validation loss and should match the annotation file).
        steps.append(v2.SanitizeBoundingBoxes(labels_getter=_labels_getter))
    else:
        steps.append(_resize_shorter([val_size], max_size))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)]
    return v2.Compose(steps)


def make_base_transforms() -> v2.Compose:
    """Only uint8 -> float and normalisation (no geometry): what a dataset uses when given no transforms."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)])


def imagenet_stats(dtype: torch.dtype = torch.float32, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ImageNet (mean, std) of ``Normalize`` as (3, 1, 1) tensors, broadcastable over (..., 3, H, W)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=dtype, device=device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=dtype, device=device).view(3, 1, 1)
    return mean, std


def normalize(image: torch.Tensor) -> torch.Tensor:
    """What ``Normalize`` does: (..., 3, H, W) float RGB in [0, 1] -> (x - mean) / std."""
    mean, std = imagenet_stats(image.dtype, image.device)
    return (image - mean) / std


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """Invert ``Normalize`` for visualisation: (3,H,W) normalised float -> (3,H,W) float in [0,1]."""
    mean, std = imagenet_stats(image.dtype, image.device)
    return (image * std + mean).clamp(0, 1)


def boxes_xyxy_to_normalized_cxcywh(boxes: tv_tensors.BoundingBoxes) -> torch.Tensor:
    """(T,4) XYXY pixel boxes on their canvas -> plain (T,4) float32 cxcywh in [0,1] of that canvas."""
    height, width = boxes.canvas_size
    cxcywh = F.convert_bounding_box_format(boxes, new_format=tv_tensors.BoundingBoxFormat.CXCYWH)
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    return cxcywh.as_subclass(torch.Tensor).to(torch.float32) / scale
