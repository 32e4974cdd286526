"""The token stage: images → backbone levels → 1×1 / stride-2 projections → one flat sequence of S tokens with
position + level embeddings (Deformable DETR Sec. 4.1). Everything downstream works on ``Tokens``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from sparse_detr.models.backbone import resize_mask

__all__ = ["Tokens", "TokenStage", "input_projections", "batch_images"]


def batch_images(images: Union[Tensor, Sequence[Tensor]], mask: Optional[Tensor] = None,
                 image_sizes: Optional[Sequence[tuple[int, int]]] = None,
                 ) -> tuple[Tensor, Tensor, Optional[list[tuple[int, int]]]]:
    """A list of (3, H_i, W_i) images (padded bottom/right) or a (B, 3, H, W) batch (no mask = unpadded) →
    images (B, 3, H, W), mask (B, H, W) True = padding, image sizes [(h, w)] or None if unknown."""
    if isinstance(images, Tensor):
        if mask is None:
            batch, _, height, width = images.shape
            mask = torch.zeros(batch, height, width, dtype=torch.bool, device=images.device)
            image_sizes = [(height, width)] * batch
        return images, mask, (list(image_sizes) if image_sizes is not None else None)
    if mask is not None:
        raise ValueError("pass either a list of images or a padded batch with its mask, not a list and a mask")
    sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    batch = images[0].new_zeros(len(images), images[0].shape[0], height, width)
    mask = torch.ones(len(images), height, width, dtype=torch.bool, device=images[0].device)
    for b, (im, (h, w)) in enumerate(zip(images, sizes)):
        batch[b, :, :h, :w] = im
        mask[b, :h, :w] = False
    return batch, mask, sizes


def input_projections(channels: Sequence[int], dim: int, num_levels: int) -> nn.ModuleList:
    """1×1 conv + GN per backbone level, then 3×3 stride-2 conv + GN levels up to L (Deformable DETR Sec. 4.1)."""
    used = list(channels)[-min(num_levels, len(channels)):]
    layers = [nn.Sequential(nn.Conv2d(c, dim, kernel_size=1), nn.GroupNorm(32, dim)) for c in used]
    in_ch = channels[-1]
    for _ in range(num_levels - len(used)):
        layers.append(nn.Sequential(nn.Conv2d(in_ch, dim, kernel_size=3, stride=2, padding=1),
                                    nn.GroupNorm(32, dim)))
        in_ch = dim
    for proj in layers:
        nn.init.xavier_uniform_(proj[0].weight, gain=1)
        nn.init.zeros_(proj[0].bias)
    return nn.ModuleList(layers)


def _valid_ratio(mask: Tensor) -> Tensor:
    """(B, h, w) level padding mask → (B, 2) unpadded fraction (w, h), read along the first row / column."""
    valid_w = (~mask[:, 0, :]).sum(1).float() / mask.shape[2]
    valid_h = (~mask[:, :, 0]).sum(1).float() / mask.shape[1]
    return torch.stack((valid_w, valid_h), dim=-1)


@dataclass
class Tokens:
    """The flat multi-scale tokens of a batch (S = Σ h_l · w_l over L levels).

    src, pos (B, S, d) (pos includes the level embedding); padding_mask (B, S) True = padding; shapes: L host
    (h_l, w_l); spatial_shapes (L, 2) int64; level_start_index (L,) int64; valid_ratios (B, L, 2) unpadded (w, h);
    canvas_hw: the padded image size; image_hw: host (h, w) of every image, or None when unknown.
    """

    src: Tensor
    pos: Tensor
    padding_mask: Tensor
    shapes: list[tuple[int, int]]
    spatial_shapes: Tensor
    level_start_index: Tensor
    valid_ratios: Tensor
    canvas_hw: tuple[int, int]
    image_hw: Optional[list[tuple[int, int]]]


class TokenStage(nn.Module):
    """backbone (a ``Joiner``: [0] the network, [1] the position encoding) → ``input_proj`` per level → ``Tokens``;
    ``level_embed`` (L, d) is added to every level's position encoding."""

    def __init__(self, backbone: nn.Module, input_proj: nn.ModuleList, level_embed: nn.Parameter) -> None:
        super().__init__()
        self.backbone, self.input_proj, self.level_embed = backbone, input_proj, level_embed

    def forward(self, images: Tensor, mask: Tensor, image_hw: Optional[list[tuple[int, int]]] = None) -> Tokens:
        """images (B, 3, H, W), mask (B, H, W) True = padding."""
        features, masks, pos = self.backbone(images, mask)
        num_backbone = min(len(self.input_proj), len(features))  # the rest are extra stride-2 levels
        features, masks, pos = features[-num_backbone:], list(masks[-num_backbone:]), list(pos[-num_backbone:])
        srcs = [proj(f) for proj, f in zip(self.input_proj, features)]
        for proj in list(self.input_proj)[num_backbone:]:  # the first extra level convolves the raw C5
            src = proj(features[-1] if len(srcs) == num_backbone else srcs[-1])
            level_mask = resize_mask(mask, src.shape[-2:])
            srcs.append(src)
            masks.append(level_mask)
            pos.append(self.backbone[1](level_mask).to(src.dtype))

        shapes = [(s.shape[-2], s.shape[-1]) for s in srcs]  # host ints from tensor shapes: no sync
        if any(isinstance(v, torch.SymInt) for hw in shapes for v in hw):
            # torch.export traces symbolic sizes (dynamic ONNX export): as_tensor would fix them to the example's.
            spatial_shapes = torch.stack([torch.stack([torch.full((), v, dtype=torch.long, device=images.device)
                                                       for v in hw]) for hw in shapes])
        else:
            # non_blocking: a pageable host-to-device copy is staged without waiting for the queued backbone work.
            spatial_shapes = torch.as_tensor(shapes, dtype=torch.long).to(images.device, non_blocking=True)
        sizes = spatial_shapes.prod(1)
        return Tokens(
            src=torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1),
            pos=torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[lvl] for lvl, p in enumerate(pos)], 1),
            padding_mask=torch.cat([m.flatten(1) for m in masks], 1),
            shapes=shapes,
            spatial_shapes=spatial_shapes,
            level_start_index=torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1])),
            valid_ratios=torch.stack([_valid_ratio(m) for m in masks], dim=1),
            canvas_hw=tuple(images.shape[-2:]),
            image_hw=image_hw,
        )
