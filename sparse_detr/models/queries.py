"""Decoder queries: two-stage top-Q tokens (Sparse DETR Sec. 3.4; Deformable DETR Sec. 4.2) or learned ones.

Two-stage: the head ``[Ld]`` scores every token; the top-Q by objectness (max class logit with
``eff_specific_head``, else the class-0 logit) become queries around their refined proposals. ``query_padding``
"official" also ranks padded / invalid tokens, as the official code does (README, official behaviour).
"""

from __future__ import annotations

from torch import Tensor, nn

from sparse_detr.models.encoder import gather_tokens, proposal_features
from sparse_detr.models.position_encoding import sine_embed_boxes

__all__ = ["two_stage_queries", "learned_queries"]


def two_stage_queries(memory: Tensor, proposals: Tensor, proposal_valid: Tensor, enc_output: nn.Linear,
                      enc_output_norm: nn.LayerNorm, class_head: nn.Module, box_head: nn.Module,
                      pos_trans: nn.Linear, pos_trans_norm: nn.LayerNorm, num_queries: int,
                      specific_head: bool, eff_query_init: bool, query_padding: str = "official",
                      ) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """Select Q tokens as decoder queries.

    Args:
        memory: (B, S, d); proposals: (B, S, 4) grid-proposal logits (+inf where invalid); proposal_valid: (B, S).
        pos_trans: 2d → d with ``eff_query_init`` (content = memory at the chosen tokens), else 2d → 2d (position
            and content halves, Deformable DETR two-stage).
    Returns:
        tgt (B, Q, d), query_pos (B, Q, d), reference (B, Q, 4) in [0, 1] (detached), enc_outputs {pred_logits
        (B, S, K), pred_boxes (B, S, 4)} (the detector adds the loss mask ``valid``).
    """
    dim = memory.shape[-1]
    if num_queries > memory.shape[1]:
        raise ValueError(f"two-stage needs at least num_queries = {num_queries} tokens, the images give only "
                         f"{memory.shape[1]}: use larger images or fewer queries")
    feats = proposal_features(memory, proposal_valid, enc_output, enc_output_norm)
    logits = class_head(feats)  # (B, S, K)
    coords = box_head(feats) + proposals  # (B, S, 4) logits; +inf stays +inf on invalid tokens
    objectness = logits.max(-1).values if specific_head else logits[..., 0]
    if query_padding not in ("official", "exclude"):
        raise ValueError(f"query_padding must be 'official' or 'exclude', got {query_padding!r}")
    objectness = objectness.detach()
    if query_padding == "exclude":
        objectness = objectness.masked_fill(~proposal_valid, float("-inf"))
    chosen = objectness.topk(num_queries, dim=1).indices  # (B, Q)

    reference = gather_tokens(coords, chosen).detach().sigmoid()
    pos = pos_trans_norm(pos_trans(sine_embed_boxes(reference, num_pos_feats=dim // 2)))
    if eff_query_init:
        tgt, query_pos = gather_tokens(memory, chosen), pos
    else:
        query_pos, tgt = pos.split(dim, dim=-1)
    enc_outputs = {"pred_logits": logits, "pred_boxes": coords.sigmoid()}
    return tgt, query_pos, reference, enc_outputs


def learned_queries(query_embed: Tensor, reference_points: nn.Linear, batch: int) -> tuple[Tensor, Tensor, Tensor]:
    """Plain Deformable DETR queries: query_embed (Q, 2d) = [position, content]; reference_points Linear d → 2.
    Returns tgt (B, Q, d), query_pos (B, Q, d), reference (B, Q, 2) points in [0, 1]."""
    query_pos, tgt = query_embed.chunk(2, dim=-1)
    query_pos = query_pos[None].expand(batch, -1, -1)
    tgt = tgt[None].expand(batch, -1, -1)
    return tgt, query_pos, reference_points(query_pos).sigmoid()
