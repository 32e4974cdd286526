"""Swin-T as the official Sparse DETR backbone, built from torchvision's Swin blocks (Liu et al., ICCV 2021).

torchvision's ``swin_t`` computes the same blocks, patch merging and patch embedding as the official detection
Swin-T, with two behaviours that differ; this module keeps torchvision's modules (and their parameter names) and
writes only those two, plus the detection outputs:

* the stem input is zero-padded at the right/bottom to a multiple of the patch size 4 (torchvision's conv drops
  the last rows/columns instead: a 130×170 image gives levels 17×22, 9×11, 5×6 here, 16×21, 8×10, 4×5 there);
* every odd block applies the cyclic shift (3) with its -100 mask, even when the window-padded map is a single
  window (torchvision turns the shift off then: visible on maps of at most 7 in a side, e.g. small images);
* stages 1, 2, 3 (0-based; strides 8/16/32, 192/384/768 channels) are returned before their patch merging,
  each through its own LayerNorm ``norm1`` / ``norm2`` / ``norm3``.

Parameter names are torchvision's (``features.0.0`` patch conv, ``features.(2i+1).j`` block j of stage i,
``features.(2i+2)`` the merging that ends stage i) plus ``norm1..3``. ``official_to_ours`` renames an official
state dict (``patch_embed``, ``layers.i.blocks.j``, ``layers.i.downsample``) to these names.
"""

from __future__ import annotations

import re
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import SwinTransformer
from torchvision.models.swin_transformer import ShiftedWindowAttention, SwinTransformerBlock

__all__ = ["SwinT", "OfficialWindowAttention", "shifted_window_mask", "official_to_ours", "has_official_swin_keys",
           "PATCH", "WINDOW", "STAGE_CHANNELS"]

PATCH = 4
WINDOW = 7
DEPTHS = (2, 2, 6, 2)
HEADS = (3, 6, 12, 24)
STAGE_CHANNELS = (96, 192, 384, 768)


def shifted_window_mask(height: int, width: int, window: int, shift: int, device=None,
                        dtype: torch.dtype = torch.float32) -> Tensor:
    """Additive mask (num_windows, window², window²) of shifted-window attention on a (height, width) map that is
    a multiple of ``window``, already rolled by -shift: 0 between tokens of one region, -100 across regions.

    Regions are the official ones: along each axis [0, L-window), [L-window, L-shift), [L-shift, L); the last one
    holds the tokens that the roll wrapped around from the other side, which were not neighbours of the rest.
    """
    def regions(length: int) -> Tensor:
        i = torch.arange(length, device=device)
        return (i >= length - window).long() + (i >= length - shift).long()

    region = 3 * regions(height)[:, None] + regions(width)[None, :]  # (H, W)
    windows = region.view(height // window, window, width // window, window).transpose(1, 2)
    windows = windows.reshape(-1, window * window)  # (nW, N), tokens row-major inside a window
    different = windows[:, :, None] != windows[:, None, :]
    return torch.zeros(different.shape, device=device, dtype=dtype).masked_fill(different, -100.0)


class OfficialWindowAttention(ShiftedWindowAttention):
    """torchvision's window attention (same ``qkv``, ``proj``, relative position bias and index) with the
    official shift rule: a block with ``shift_size`` > 0 always shifts, however small the map.

    forward: (B, H, W, C) → (B, H, W, C). The map is zero-padded at the right/bottom to a multiple of the window;
    padded tokens take part as keys (as in both implementations).
    """

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        win, shift, heads = self.window_size[0], self.shift_size[0], self.num_heads
        x = F.pad(x, (0, 0, 0, (-w) % win, 0, (-h) % win))
        hp, wp = x.shape[1], x.shape[2]
        if shift:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        nh, nw = hp // win, wp // win
        tokens = x.view(b, nh, win, nw, win, c).transpose(2, 3).reshape(b * nh * nw, win * win, c)
        qkv = self.qkv(tokens).view(b * nh * nw, win * win, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B·nW, heads, N, head_dim) each
        attn = (q * (c // heads) ** -0.5) @ k.transpose(-2, -1) + self.get_relative_position_bias()
        if shift:
            mask = shifted_window_mask(hp, wp, win, shift, device=x.device, dtype=attn.dtype)
            attn = (attn.view(b, nh * nw, heads, win * win, win * win) + mask[None, :, None]).flatten(0, 1)
        attn = F.dropout(attn.softmax(dim=-1), p=self.attention_dropout, training=self.training)
        out = (attn @ v).transpose(1, 2).reshape(b * nh * nw, win * win, c)
        out = F.dropout(self.proj(out), p=self.dropout, training=self.training)
        out = out.view(b, nh, nw, win, win, c).transpose(2, 3).reshape(b, hp, wp, c)
        if shift:
            out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
        return out[:, :h, :w]


class SwinT(nn.Module):
    """The official detection Swin-T: embed 96, depths 2/2/6/2, heads 3/6/12/24, window 7, qkv bias, LN eps 1e-5,
    stochastic depth rising linearly from 0 to ``drop_path_rate`` over the 12 blocks.

    Args:
        drop_path_rate: the stochastic-depth rate of the last block.
        out_stages: which stages (0-based, of 0..3) to return, each through its LayerNorm ``norm{stage}``.

    forward: images (B, 3, H, W) → one (B, C_s, ceil(H / 2^(s+2)), ceil(W / 2^(s+2))) map per returned stage.
    """

    def __init__(self, drop_path_rate: float = 0.2, out_stages: tuple[int, ...] = (1, 2, 3)) -> None:
        super().__init__()
        net = SwinTransformer(patch_size=[PATCH, PATCH], embed_dim=STAGE_CHANNELS[0], depths=list(DEPTHS),
                              num_heads=list(HEADS), window_size=[WINDOW, WINDOW], stochastic_depth_prob=drop_path_rate,
                              block=partial(SwinTransformerBlock, attn_layer=OfficialWindowAttention))
        self.features = net.features  # torchvision's classifier norm/head are not kept
        self.out_stages = tuple(sorted(out_stages))
        for stage in self.out_stages:
            self.add_module(f"norm{stage}", nn.LayerNorm(STAGE_CHANNELS[stage]))

    def forward(self, images: Tensor) -> list[Tensor]:
        height, width = images.shape[-2:]
        x = F.pad(images, (0, (-width) % PATCH, 0, (-height) % PATCH))
        out = []
        for stage in range(self.out_stages[-1] + 1):
            x = self.features[2 * stage](x)  # stage 0: patch embedding; then the merging that ended stage - 1
            x = self.features[2 * stage + 1](x)  # the stage's blocks, (B, H_s, W_s, C_s)
            if stage in self.out_stages:
                out.append(getattr(self, f"norm{stage}")(x).permute(0, 3, 1, 2))
        return out


def _rename_official(key: str) -> str | None:
    """One official Swin key (without prefix) → ours; None for the classification ``attn_mask`` buffers."""
    if key.endswith(".attn_mask"):
        return None  # recomputed from the map size in every forward
    key = re.sub(r"^patch_embed\.proj\.", "features.0.0.", key)
    key = re.sub(r"^patch_embed\.norm\.", "features.0.2.", key)
    key = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"features.{2 * int(m.group(1)) + 2}.", key)
    key = re.sub(r"^layers\.(\d+)\.blocks\.", lambda m: f"features.{2 * int(m.group(1)) + 1}.", key)
    return key.replace(".mlp.fc1.", ".mlp.0.").replace(".mlp.fc2.", ".mlp.3.")  # torchvision's MLP Sequential


def has_official_swin_keys(state: dict, prefix: str = "") -> bool:
    """Does ``state`` hold official Swin keys (``patch_embed.*`` / ``layers.*``) under ``prefix``?"""
    return any(k.startswith((prefix + "patch_embed.", prefix + "layers.")) for k in state)


def official_to_ours(state: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Rename the official Swin-T keys under ``prefix`` to ours; every other key is kept as it is.

    Tensors are not copied; ``relative_position_index`` (49, 49) becomes torchvision's flat (2401,) view of the same
    values, and the classification checkpoints' ``attn_mask`` buffers are dropped. ``norm1..3`` (detection) and
    ``norm``/``head`` (classification) keep their names.
    """
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            out[key] = value
            continue
        new = _rename_official(key[len(prefix):])
        if new is None:
            continue
        if new.endswith("attn.relative_position_index"):
            value = value.reshape(-1)
        out[prefix + new] = value
    return out
