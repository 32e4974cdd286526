"""Decoder queries: two-stage top-Q tokens (Sparse DETR Sec. 3.4; Deformable DETR Sec. 4.2) or learned ones.

Two-stage: the head ``[Ld]`` scores every token; the top-Q by objectness (max class logit with
``eff_specific_head``, else the class-0 logit) become queries around their refined proposals. ``query_padding``
"official" also ranks padded / invalid tokens, as the official code does (README, official behaviour).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from sparse_detr.models.encoder import Encoded, ProposalProjection, gather_tokens, proposal_features
from sparse_detr.models.position_encoding import sine_embed_boxes

__all__ = ["two_stage_queries", "learned_queries", "Queries", "TwoStageQueries", "LearnedQueries"]


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


@dataclass
class Queries:
    """The decoder's input: tgt, query_pos (B, Q, d); reference (B, Q, 4) boxes or (B, Q, 2) points in [0, 1];
    outputs: this stage's entries of the detector's output dict (``enc_outputs`` for two-stage)."""

    tgt: Tensor
    query_pos: Tensor
    reference: Tensor
    outputs: dict = field(default_factory=dict)


class TwoStageQueries(nn.Module):
    """Two-stage query initialiser: the head ``class_embed`` / ``bbox_embed`` scores every encoded token, the top Q
    become queries (``two_stage_queries``). proposal_proj is the encoder stage's (shared weights).
    enc_loss_padding "exclude": the two-stage loss ignores invalid tokens ("official": counts them all)."""

    def __init__(self, proposal_proj: ProposalProjection, class_embed: nn.Module, bbox_embed: nn.Module,
                 pos_trans: nn.Linear, pos_trans_norm: nn.LayerNorm, num_queries: int, specific_head: bool = False,
                 eff_query_init: bool = False, query_padding: str = "official",
                 enc_loss_padding: str = "official") -> None:
        super().__init__()
        for name, value in (("query_padding", query_padding), ("enc_loss_padding", enc_loss_padding)):
            if value not in ("official", "exclude"):
                raise ValueError(f"{name} must be 'official' or 'exclude', got {value!r}")
        self.proposal_proj, self.class_embed, self.bbox_embed = proposal_proj, class_embed, bbox_embed
        self.pos_trans, self.pos_trans_norm = pos_trans, pos_trans_norm
        self.num_queries, self.specific_head, self.eff_query_init = num_queries, specific_head, eff_query_init
        self.query_padding, self.enc_loss_padding = query_padding, enc_loss_padding

    def forward(self, enc: Encoded, batch: int) -> Queries:
        proj = self.proposal_proj
        tgt, query_pos, reference, enc_outputs = two_stage_queries(
            enc.memory, enc.proposals, enc.proposal_valid, proj.enc_output, proj.enc_output_norm, self.class_embed,
            self.bbox_embed, self.pos_trans, self.pos_trans_norm, self.num_queries, self.specific_head,
            self.eff_query_init, self.query_padding)
        valid = enc.proposal_valid
        enc_outputs["valid"] = valid if self.enc_loss_padding == "exclude" else torch.ones_like(valid)
        return Queries(tgt, query_pos, reference, {"enc_outputs": enc_outputs})


class LearnedQueries(nn.Module):
    """Plain Deformable DETR queries: ``query_embed`` (Q, 2d) learned [position, content], reference points from
    the position half (``reference_points``: Linear d → 2)."""

    def __init__(self, query_embed: nn.Embedding, reference_points: nn.Linear) -> None:
        super().__init__()
        self.query_embed, self.reference_points = query_embed, reference_points

    def forward(self, enc: Optional[Encoded], batch: int) -> Queries:
        return Queries(*learned_queries(self.query_embed.weight, self.reference_points, batch))
