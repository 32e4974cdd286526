"""Detection heads shared by the decoder, the two-stage head, the encoder aux heads and the objectness selector."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MLP", "class_head", "box_head", "PRIOR_BIAS"]

PRIOR_BIAS = -math.log((1 - 0.01) / 0.01)  # focal-loss prior: every class starts at p = 0.01 (-4.595)


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (the DETR box head: d → d → d → 4)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


def class_head(dim: int, num_classes: int) -> nn.Linear:
    """Linear d → K with the focal-loss prior bias."""
    head = nn.Linear(dim, num_classes)
    nn.init.constant_(head.bias, PRIOR_BIAS)
    return head


def box_head(dim: int) -> MLP:
    """MLP d → d → d → 4 whose last layer starts at zero (predictions start at the reference box)."""
    head = MLP(dim, dim, 4, 3)
    nn.init.zeros_(head.layers[-1].weight)
    nn.init.zeros_(head.layers[-1].bias)
    return head
