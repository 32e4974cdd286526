"""The Sparse DETR encoder: grid proposals, the token scoring network, top-ρ selection and the sparse encoder.

Method notes (``sparse_detr_method.md``), sections 2-4:

* ``grid_proposals`` / ``proposal_features``: one fixed box per token (§2), and the ``enc_output`` +
  ``enc_output_norm`` projection of tokens whose box is valid. The same two modules feed the scorer before the
  encoder and the two-stage head after it (§5), as in the official code.
* ``TokenScorer`` (official name ``enc_mask_predictor``): LayerNorm → Linear → GELU, half the channels averaged
  over the image, then an MLP to one logit per token (§2).
* ``max_kept_tokens`` / ``select_tokens``: k_b = floor(ρ · valid_b) + 1 tokens per image, batched ``topk`` (§3).
* ``SparseEncoder``: post-norm deformable encoder layers whose queries are only the kept tokens while keys/values
  are the full token map; updated tokens are scattered back in one batched op (§4). ρ = 0 is the dense
  Deformable DETR encoder. Optional auxiliary heads score the kept tokens after every layer but the last.

Host syncs. ``topk`` needs k as a Python int. k is computed on the host *before* the forward from what the host
already knows (``max_kept_tokens``): the level shapes and, when given, the unpadded image sizes. The per-level valid
size of a padded image is what ``F.interpolate(mode="nearest")`` makes of the image mask: ceil(h_img · h_l / H)
rows up to float rounding, so ``ceil(...) + 1`` (clipped to the level) bounds it from above. Without image sizes the
bound is the padded token count S. k is therefore ≥ max_b k_b (never a token too few) and usually equals it;
the exact k_b are computed on the device and only the first k_b of each image's k selected tokens count
(``valid``). Nothing in this file calls ``.item()``/``.tolist()``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from sparse_detr.models.ms_deform_attn import MSDeformAttn

__all__ = [
    "grid_proposals", "proposal_features", "dense_reference_points", "TokenScorer", "max_kept_tokens",
    "kept_token_counts", "select_tokens", "gather_tokens", "EncoderLayer", "SparseEncoder",
]


# ---------------------------------------------------------------------------------------------------------------
# §2 grid proposals and the features the scorer and the two-stage head see

def grid_proposals(padding_mask: Tensor, shapes: Sequence[tuple[int, int]]) -> tuple[Tensor, Tensor]:
    """One fixed box per token, as inverse-sigmoid logits (method §2; Deformable DETR App. A.4).

    Token (x, y) of level l gets centre ((x + 0.5) / valid_W_l, (y + 0.5) / valid_H_l), relative to the image's
    unpadded part of that level, and width = height = 0.05 · 2^l.

    Args:
        padding_mask: (B, S) bool, True = padding.
        shapes: the L level shapes (h_l, w_l) as Python ints, S = Σ h_l · w_l.
    Returns:
        proposals (B, S, 4) cxcywh logits, +inf where invalid (sigmoid(inf) = 1, so boxes stay finite);
        valid (B, S) bool: not padding and every coordinate inside (0.01, 0.99).
    """
    batch = padding_mask.shape[0]
    device = padding_mask.device
    boxes, start = [], 0
    for lvl, (h, w) in enumerate(shapes):  # a loop over levels only: their grids differ in shape
        level_mask = padding_mask[:, start:start + h * w].view(batch, h, w)
        valid_h = (~level_mask[:, :, 0]).sum(1).float().clamp(min=1)  # (B,) unpadded rows of this level
        valid_w = (~level_mask[:, 0, :]).sum(1).float().clamp(min=1)  # (B,) unpadded columns
        ys = torch.arange(h, device=device, dtype=torch.float32) + 0.5
        xs = torch.arange(w, device=device, dtype=torch.float32) + 0.5
        cx = (xs[None, None, :] / valid_w[:, None, None]).expand(batch, h, w)
        cy = (ys[None, :, None] / valid_h[:, None, None]).expand(batch, h, w)
        wh = torch.full_like(cx, 0.05 * 2.0 ** lvl)
        boxes.append(torch.stack((cx, cy, wh, wh), dim=-1).reshape(batch, h * w, 4))
        start += h * w
    boxes = torch.cat(boxes, dim=1)
    valid = ((boxes > 0.01) & (boxes < 0.99)).all(-1) & ~padding_mask
    logits = torch.log(boxes / (1 - boxes))
    return logits.masked_fill(~valid[..., None], float("inf")), valid


def proposal_features(tokens: Tensor, valid: Tensor, proj: nn.Linear, norm: nn.LayerNorm) -> Tensor:
    """``norm(proj(tokens))`` with padded / invalid-proposal tokens zeroed first (method §2 and §5).

    Args:
        tokens: (B, S, d) token features (backbone tokens + position before the encoder; memory after it).
        valid: (B, S) bool from ``grid_proposals``.
    Returns:
        (B, S, d).
    """
    return norm(proj(tokens.masked_fill(~valid[..., None], 0.0)))


def dense_reference_points(shapes: Sequence[tuple[int, int]], valid_ratios: Tensor) -> Tensor:
    """Every token's reference point on every level (Deformable DETR encoder).

    The token centre is normalised by its level's *valid* size, then scaled by each level's valid ratio, so the
    point is expressed in each level's padded [0, 1] frame.

    Args:
        shapes: the L level shapes (h_l, w_l).
        valid_ratios: (B, L, 2) unpadded fraction (w, h) of every level.
    Returns:
        (B, S, L, 2) normalised (x, y).
    """
    device = valid_ratios.device
    points = []
    for lvl, (h, w) in enumerate(shapes):
        ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32) + 0.5,
                                torch.arange(w, device=device, dtype=torch.float32) + 0.5, indexing="ij")
        x = xs.reshape(1, -1) / (valid_ratios[:, None, lvl, 0] * w)  # (B, h*w)
        y = ys.reshape(1, -1) / (valid_ratios[:, None, lvl, 1] * h)
        points.append(torch.stack((x, y), dim=-1))
    points = torch.cat(points, dim=1)  # (B, S, 2) relative to the valid region
    return points[:, :, None] * valid_ratios[:, None]


# ---------------------------------------------------------------------------------------------------------------
# §2 the token scoring network

class TokenScorer(nn.Module):
    """Saliency logit of every token (Sparse DETR Sec. 3.2; official ``enc_mask_predictor``).

    ``layer1`` = LayerNorm, Linear d→d, GELU. The second half of its channels is averaged over the image's tokens
    and broadcast back (a global context vector), concatenated with the first half, and ``layer2`` = Linear d→d/2,
    GELU, Linear d/2→d/4, GELU, Linear d/4→1.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.layer2 = nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(),
                                    nn.Linear(dim // 4, 1))

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """Args: x (B, S, d); padding_mask (B, S) bool, True = left out of the global mean (None = official:
        every token, padding included, counts). Returns: (B, S) logits."""
        z = self.layer1(x)
        local, ctx = z.chunk(2, dim=-1)
        if padding_mask is None:
            ctx = ctx.mean(dim=1, keepdim=True)
        else:
            keep = (~padding_mask)[..., None].to(ctx.dtype)
            ctx = (ctx * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp(min=1)
        z = torch.cat((local, ctx.expand_as(local)), dim=-1)
        return self.layer2(z).squeeze(-1)


# ---------------------------------------------------------------------------------------------------------------
# §3 top-ρ selection

def max_kept_tokens(rho: float, shapes: Sequence[tuple[int, int]], canvas_hw: tuple[int, int],
                    image_hw: Optional[Sequence[tuple[int, int]]] = None) -> int:
    """Host-side k ≥ max_b (floor(ρ · valid_b) + 1), from host information only (no device sync).

    Args:
        rho: keep ratio in (0, 1].
        shapes: level shapes (h_l, w_l).
        canvas_hw: padded image size (H, W).
        image_hw: unpadded size of every image, if known; otherwise every image may fill the canvas.
    Returns:
        k in [1, S].
    """
    total = sum(h * w for h, w in shapes)
    if image_hw is None:
        bounds = [total]
    else:
        H, W = canvas_hw
        bounds = []
        for ih, iw in image_hw:  # host arithmetic on ints, before the forward
            # Nearest-neighbour mask resizing keeps ceil(ih·h/H) rows, ±1 from float rounding of the scale.
            bounds.append(sum(min(h, -(-ih * h // H) + 1) * min(w, -(-iw * w // W) + 1) for h, w in shapes))
    if isinstance(total, torch.SymInt):  # symbolic sizes (torch.export, dynamic ONNX export): integers only
        return torch.sym_min(total, max(_floor_mul_bound(u, rho) + 1 for u in bounds))
    return min(total, max(math.floor(u * rho) + 1 for u in bounds))


def _floor_mul_bound(u: torch.SymInt, rho: float) -> torch.SymInt:
    """An integer-only bound ≥ floor(u · ρ) (float64) for a symbolic u: float arithmetic on symbolic sizes would
    put guards on the image size. (u · N) // 2^32 with N/2^32 ≥ ρ + 2^-32 exceeds the float64 product's rounding
    error for u < 2^31, so k is the float k or, at a rounding edge, one larger (an extra slot marked invalid)."""
    scale = 2 ** 32
    return (u * (math.floor(rho * scale) + 2)) // scale


def kept_token_counts(padding_mask: Tensor, rho: float, k: int) -> Tensor:
    """k_b = floor(ρ · valid_b) + 1 per image (method §3), capped at valid_b (so padding is never kept; the
    official code keeps one padded token when ρ = 1) and at k. Computed in float64 so it matches the host bound
    of ``max_kept_tokens`` exactly. Returns (B,) int64."""
    valid = (~padding_mask).sum(1)
    counts = torch.floor(valid.to(torch.float64) * rho).long() + 1
    return torch.minimum(torch.minimum(counts, valid), torch.full_like(counts, k))


def select_tokens(scores: Tensor, padding_mask: Tensor, counts: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The top-k tokens of every image by score (method §3); not differentiable (indices only).

    Args:
        scores: (B, S) selection scores (scorer logits, or objectness for the OS variant).
        padding_mask: (B, S) bool; padding is scored below every real token.
        counts: (B,) k_b from ``kept_token_counts``.
        k: host int ≥ max k_b (``max_kept_tokens``).
    Returns:
        indices (B, k) int64 sorted by decreasing score; valid (B, k) bool, True for the first k_b of image b.
    """
    masked = scores.detach().masked_fill(padding_mask, float("-inf"))
    indices = masked.topk(k, dim=1, sorted=True).indices
    valid = torch.arange(k, device=scores.device)[None, :] < counts[:, None]
    return indices, valid


def gather_tokens(x: Tensor, indices: Tensor) -> Tensor:
    """x (B, S, *rest) at indices (B, k) → (B, k, *rest)."""
    rest = x.shape[2:]
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    out = flat.gather(1, indices[..., None].expand(-1, -1, flat.shape[-1]))
    return out.reshape(indices.shape + rest)


def scatter_tokens(full: Tensor, indices: Tensor, kept: Tensor, valid: Tensor) -> Tensor:
    """Write the valid kept tokens back into the full map (method §4), batched, out of place.

    Slots beyond k_b write back the value already there, so they change nothing. ``topk`` indices are unique per
    image, hence the scatter has no write conflicts and is deterministic.

    Args: full (B, S, d); indices (B, k); kept (B, k, d); valid (B, k). Returns: (B, S, d).
    """
    index = indices[..., None].expand_as(kept)
    src = torch.where(valid[..., None], kept, full.gather(1, index))
    return full.scatter(1, index, src)


# ---------------------------------------------------------------------------------------------------------------
# §4 the encoder

class EncoderLayer(nn.Module):
    """Post-norm deformable encoder layer: self-attention → add & norm1 → FFN → add & norm2."""

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, n_levels: int = 4,
                 n_heads: int = 8, n_points: int = 4) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, query: Tensor, query_pos: Tensor, reference_points: Tensor, value: Tensor,
                spatial_shapes: Tensor, level_start_index: Tensor, padding_mask: Tensor) -> Tensor:
        """Args: query, query_pos (B, k, d); reference_points (B, k, L, 2); value (B, S, d) the full token map;
        spatial_shapes (L, 2); level_start_index (L,); padding_mask (B, S). Returns: updated query (B, k, d)."""
        attn = self.self_attn(query + query_pos, reference_points, value, spatial_shapes, level_start_index,
                              padding_mask)
        query = self.norm1(query + self.dropout1(attn))
        ffn = self.linear2(self.dropout2(torch.relu(self.linear1(query))))
        return self.norm2(query + self.dropout3(ffn))


class SparseEncoder(nn.Module):
    """A stack of ``EncoderLayer`` that updates either every token (dense) or only the kept ones (sparse, §4).

    Sparse: the kept tokens, their position and reference points are gathered once; every layer attends from the
    current kept tokens to the whole current map, the first k_b results are written back, and the updated kept
    tokens (not a re-gather) are the next layer's queries. Tokens that are not kept keep their backbone values.
    """

    def __init__(self, num_layers: int, **layer_kwargs) -> None:
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(**layer_kwargs) for _ in range(num_layers)])

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, padding_mask: Tensor, kept_indices: Optional[Tensor] = None,
                kept_valid: Optional[Tensor] = None, proposals: Optional[Tensor] = None,
                aux_heads: Optional[tuple[Sequence[nn.Module], Sequence[nn.Module]]] = None,
                ) -> tuple[Tensor, list[dict[str, Tensor]]]:
        """Run the encoder.

        Args:
            src, pos: (B, S, d) backbone tokens and position + level embedding.
            reference_points: (B, S, L, 2) from ``dense_reference_points``.
            spatial_shapes (L, 2), level_start_index (L,), padding_mask (B, S) bool.
            kept_indices, kept_valid: (B, k) from ``select_tokens``; None = dense encoder.
            proposals: (B, S, 4) grid-proposal logits, needed by ``aux_heads``.
            aux_heads: (class heads, box heads), one pair per layer but the last (Sparse DETR Sec. 3.3).
        Returns:
            memory (B, S, d); aux outputs, one dict per layer but the last: ``pred_logits`` (B, k, K),
            ``pred_boxes`` (B, k, 4) = sigmoid(proposal + offset), ``valid`` (B, k) (empty list without heads).
        """
        sparse = kept_indices is not None
        if sparse:
            query, query_pos = gather_tokens(src, kept_indices), gather_tokens(pos, kept_indices)
            reference_points = gather_tokens(reference_points, kept_indices)
        else:
            query, query_pos = src, pos
        kept_proposals = None
        if aux_heads is not None:
            if not sparse or proposals is None:
                raise ValueError("encoder aux heads need the sparse encoder (kept tokens) and grid proposals")
            kept_proposals = gather_tokens(proposals, kept_indices)

        memory, aux_outputs = src, []
        for i, layer in enumerate(self.layers):
            query = layer(query, query_pos, reference_points, memory, spatial_shapes, level_start_index,
                          padding_mask)
            memory = scatter_tokens(memory, kept_indices, query, kept_valid) if sparse else query
            if aux_heads is not None and i < len(self.layers) - 1:
                class_head, box_head = aux_heads[0][i], aux_heads[1][i]
                aux_outputs.append({
                    "pred_logits": class_head(query),
                    "pred_boxes": (box_head(query) + kept_proposals).sigmoid(),
                    "valid": kept_valid,
                })
        return memory, aux_outputs
