"""A tiny GroupNorm CNN backbone (``model.backbone: tiny_cnn``) that trains from scratch, for CPU demos and tests.

C3, C4, C5 with 4w, 8w, 16w channels at strides 8, 16, 32 (``backbone.0.body.*``), the ``backbone.Backbone``
interface; about 4.7 M parameters, 0.7 GMAC at 224×224. Why it exists: ``docs/design.md``.
"""

from __future__ import annotations

import os

from torch import Tensor, nn

from sparse_detr.models.backbone import Joiner, load_weights_file, resize_mask
from sparse_detr.models.position_encoding import PositionEmbeddingSine

__all__ = ["TinyCNN", "TinyBackbone", "build_tiny_backbone"]


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    """3×3 conv (no bias: GroupNorm follows) + GroupNorm(8) + ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(8, cout), nn.ReLU(inplace=True))


class TinyCNN(nn.Module):
    """Four stages of two 3×3 convolutions each, the first of every stage with stride 2 (the stem twice)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(_conv(3, w, 2), _conv(w, w, 1), _conv(w, 2 * w, 2), _conv(2 * w, 2 * w, 1))
        self.layer2 = nn.Sequential(_conv(2 * w, 4 * w, 2), _conv(4 * w, 4 * w, 1))
        self.layer3 = nn.Sequential(_conv(4 * w, 8 * w, 2), _conv(8 * w, 8 * w, 1))
        self.layer4 = nn.Sequential(_conv(8 * w, 16 * w, 2), _conv(16 * w, 16 * w, 1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> list[Tensor]:
        """(B, 3, H, W) → [C3 (B, 4w, H/8, W/8), C4 (B, 8w, H/16, W/16), C5 (B, 16w, H/32, W/32)]."""
        c3 = self.layer2(self.stem(x))
        c4 = self.layer3(c3)
        return [c3, c4, self.layer4(c4)]


class TinyBackbone(nn.Module):
    """``TinyCNN`` with per-level padding masks; ``pretrained``: optional local ``TinyCNN`` state dict (strict)."""

    def __init__(self, train_backbone: bool = True, return_interm_layers: bool = True,
                 pretrained: str | os.PathLike | None = None, width: int = 32) -> None:
        super().__init__()
        self.body = TinyCNN(width)
        self.num_channels = [4 * width, 8 * width, 16 * width]
        self.strides = [8, 16, 32]
        self.return_interm_layers = return_interm_layers
        if not return_interm_layers:
            self.num_channels, self.strides = self.num_channels[-1:], self.strides[-1:]
        if pretrained is not None:
            self.body.load_state_dict(load_weights_file(os.fspath(pretrained)))
        self.body.requires_grad_(train_backbone)

    def forward(self, images: Tensor, mask: Tensor) -> list[tuple[Tensor, Tensor]]:
        """images (B, 3, H, W), mask (B, H, W) True = padding → [(feature (B, C_l, H_l, W_l), mask)], finest first."""
        features = self.body(images)
        if not self.return_interm_layers:
            features = features[-1:]
        return [(f, resize_mask(mask, f.shape[-2:])) for f in features]


def build_tiny_backbone(hidden_dim: int, train_backbone: bool, num_feature_levels: int,
                        pretrained: str | os.PathLike | None = None) -> Joiner:
    """``TinyBackbone`` + the sine position encoding, as ``backbone.build_backbone`` builds the others."""
    backbone = TinyBackbone(train_backbone, return_interm_layers=num_feature_levels > 1, pretrained=pretrained)
    return Joiner(backbone, PositionEmbeddingSine(hidden_dim // 2, normalize=True))
