"""Decoder queries: two-stage top-Q selection with its two initialisations, and learned queries (Sparse DETR Sec. 3.4; Deformable DETR Sec. 4.2).

* ``two_stage_queries``: the two-stage head (class + box, head number Ld) scores every encoder token on
  ``enc_output_norm(enc_output(memory))``; the top-Q tokens by objectness become queries. Objectness is the max class
  logit (Sparse DETR / Efficient DETR ``eff_specific_head``) or the class-0 logit (Deformable DETR's binary
  foreground head). ``query_padding="official"`` ranks every token as the official code does: a padded or
  invalid-proposal token has one constant objectness (its features are ``enc_output_norm(enc_output(0))``) and
  becomes a query with reference box 1 when it beats the Q-th valid token; ``"exclude"`` never picks one unless
  fewer than Q valid tokens exist.
  Reference boxes are the detached proposals refined by the head. Position query = norm(Linear(sine(boxes)));
  content query = the encoder output at those tokens (Sparse DETR ``eff_query_init``, not detached), or the second
  half of a 2d→2d projection whose first half is the position (Deformable DETR two-stage).
* ``learned_queries``: plain Deformable DETR — an embedding (Q, 2d) split into position and content, and reference
  points = sigmoid(Linear(position)).
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
        memory: (B, S, d) encoder output.
        proposals: (B, S, 4) grid-proposal logits (+inf where invalid); proposal_valid: (B, S) bool.
        enc_output, enc_output_norm: the shared token projection (also the scorer's input projection).
        class_head, box_head: the two-stage head (``class_embed[Ld]``, ``bbox_embed[Ld]``).
        pos_trans, pos_trans_norm: 2d → d (eff_query_init) or 2d → 2d.
        num_queries: Q (≤ S).
        specific_head: objectness = max class logit; else the class-0 logit.
        eff_query_init: Sparse DETR initialisation (content = memory at the selected tokens).
        query_padding: "official" (rank every token) or "exclude" (never pick padding / invalid proposals).
    Returns:
        tgt (B, Q, d) content queries, query_pos (B, Q, d), reference (B, Q, 4) boxes in [0, 1] (no gradient),
        enc_outputs {pred_logits (B, S, K), pred_boxes (B, S, 4)} for the two-stage loss (the detector adds the
        loss mask ``valid``).
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
    """Plain Deformable DETR queries.

    Args:
        query_embed: (Q, 2d) embedding weight; the first d channels are the position, the rest the content.
        reference_points: Linear d → 2.
        batch: B.
    Returns:
        tgt (B, Q, d), query_pos (B, Q, d), reference (B, Q, 2) points in [0, 1].
    """
    query_pos, tgt = query_embed.chunk(2, dim=-1)
    query_pos = query_pos[None].expand(batch, -1, -1)
    tgt = tgt[None].expand(batch, -1, -1)
    return tgt, query_pos, reference_points(query_pos).sigmoid()
