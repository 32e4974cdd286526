"""Batching variable-size detection samples, and deterministic DataLoader seeding.

``collate_batch`` pads images to the largest (H,W) of the batch, bottom/right, with zeros and returns the padding
mask the model needs (True = padding, the DETR convention: attention and position encodings skip those pixels).
Because images are padded bottom/right, the normalised boxes in ``targets`` stay relative to each image's own
``size`` and need no change. ``batch_image_sizes(targets)`` reads those sizes back as host ints for the model's
``image_sizes`` argument (a tight kept-token count k without a device sync).

Reproducible loading: ``make_generator(seed)`` is passed as the DataLoader's ``generator``; PyTorch derives every
worker's torch seed from it (so the v2 transforms, which use torch's RNG, replay exactly), and ``seed_worker``
also seeds Python's ``random`` and numpy in each worker for any code that uses them.
"""

from __future__ import annotations

import random
from typing import Sequence

import numpy as np
import torch


def collate_batch(
    batch: Sequence[tuple[torch.Tensor, dict]], size_divisibility: int = 0
) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """``[(image (3,H_i,W_i), target), ...]`` -> ``(images (B,3,H,W), mask (B,H,W) bool, [target, ...])``.

    H, W are the batch maxima, rounded up to a multiple of ``size_divisibility`` when it is > 0 (e.g. 32 so every
    backbone stride divides the padded size). ``mask[b, y, x]`` is True where (y, x) is padding of image b.
    """
    if len(batch) == 0:
        raise ValueError("collate_batch: empty batch")
    images = [sample[0] for sample in batch]
    targets = [sample[1] for sample in batch]
    channels = images[0].shape[0]
    height = max(int(img.shape[-2]) for img in images)
    width = max(int(img.shape[-1]) for img in images)
    if size_divisibility > 0:
        height = -(-height // size_divisibility) * size_divisibility  # ceil to a multiple
        width = -(-width // size_divisibility) * size_divisibility
    padded = images[0].new_zeros((len(images), channels, height, width))
    mask = torch.ones((len(images), height, width), dtype=torch.bool, device=images[0].device)
    for b, img in enumerate(images):
        if img.shape[0] != channels:
            raise ValueError(f"collate_batch: image {b} has {img.shape[0]} channels, image 0 has {channels}")
        h, w = img.shape[-2:]
        padded[b, :, :h, :w] = img
        mask[b, :h, :w] = False
    return padded, mask, targets


def batch_image_sizes(targets: Sequence[dict]) -> list[tuple[int, int]] | None:
    """The unpadded (h, w) of every image of a collated batch, as host ints, from the targets' ``size``.

    The model uses them to bound the number of kept tokens k (a tensor dimension) tightly without reading the
    padding mask back from the GPU. Call it BEFORE moving the targets to the device: on CPU tensors this is plain
    host arithmetic; a target already on the GPU (or without ``size``) gives None, never a device sync.
    """
    sizes = []
    for target in targets:
        size = target.get("size") if isinstance(target, dict) else None
        if not isinstance(size, torch.Tensor) or size.device.type != "cpu" or size.numel() != 2:
            return None
        h, w = size.tolist()
        sizes.append((int(h), int(w)))
    return sizes


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed ``random`` and numpy from the worker's torch seed.

    PyTorch already gives each worker the torch seed ``base_seed + worker_id`` (base_seed drawn from the loader's
    generator); numpy and ``random`` are not reseeded by PyTorch, so do it here from that same seed.
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_generator(seed: int, rank: int = 0) -> torch.Generator:
    """A CPU generator for the DataLoader (and its RandomSampler); ``rank`` keeps distributed ranks' augmentation
    streams different while each stays reproducible."""
    generator = torch.Generator()
    generator.manual_seed(int(seed) + 1_000_003 * int(rank))
    return generator
