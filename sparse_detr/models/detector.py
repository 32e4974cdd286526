"""Sparse DETR, with Deformable DETR (plain, two-stage) as special cases; the data flow is in ``docs/design.md``.

Output dict of ``SparseDETR.forward`` (B images, Q queries, K classes, S tokens, k kept slots, L levels):

    pred_logits        (B, Q, K)     final decoder layer, raw logits (sigmoid / focal)
    pred_boxes         (B, Q, 4)     cxcywh in [0, 1]
    aux_outputs        list of Ld-1 {pred_logits, pred_boxes} for decoder layers 0..Ld-2   (aux_loss)
    enc_outputs        {pred_logits (B, S, K), pred_boxes (B, S, 4), valid (B, S) bool}   (two_stage)
    enc_aux_outputs    list of enc_layers-1 {pred_logits (B, k_i, K), pred_boxes (B, k_i, 4), valid (B, k_i)}
                                                                             (use_enc_aux_loss, training only)
    selection          a ``Selection`` (selection.py): scores (B, S), indices / valid (B, k), counts (B,),
                       level_counts (B, L) (rho_levels), per-layer prefixes, the selector's own heads   (rho > 0)
    dec_sampling_locations (B, Ld, Q, H, L, P, 2), dec_attention_weights (B, Ld, Q, H, L, P)
                               the decoder's cross-attention, when the selector's target needs it (dam) in
                               training, and for any model with ``return_maps`` (the selection instruments)
    spatial_shapes     (L, 2) int64; level_start_index (L,) int64; padding_mask (B, S) bool

``valid`` (enc_outputs, enc_aux_outputs) masks matching and focal negatives: ``enc_loss_padding="official"``
counts every token and every slot up to the batch's largest k_b; ``"exclude"`` drops padding and slots past k_b.

State dict: the official layout (``tests/data/official_keys``), translated from the parts' module keys by
``layout.py``'s table.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

from torch import Tensor, nn

from sparse_detr.models import layout
from sparse_detr.models.decoder import DecoderStage
from sparse_detr.models.encoder import EncoderStage
from sparse_detr.models.heads import MLP
from sparse_detr.models.selection import TokenSelector
from sparse_detr.models.tokens import TokenStage, batch_images

__all__ = ["MLP", "SparseDETR", "batch_images"]


class SparseDETR(nn.Module):
    """Sparse DETR / Deformable DETR, composed of its parts (``build.build_detector`` makes them from a config):

    tokens: backbone → projected multi-scale tokens (``TokenStage``); encoder: grid proposals, the token selector
    (or none: dense) and the encoder layers (``EncoderStage``); queries: ``TwoStageQueries`` or ``LearnedQueries``;
    decoder: decoder layers with their class / box heads (``DecoderStage``).
    """

    def __init__(self, tokens: TokenStage, encoder: EncoderStage, queries: nn.Module, decoder: DecoderStage) -> None:
        super().__init__()
        self.tokens, self.encoder, self.queries, self.decoder = tokens, encoder, queries, decoder
        self.register_state_dict_post_hook(layout.to_official)
        self.register_load_state_dict_pre_hook(layout.from_official)

    @property
    def selector(self) -> Optional[TokenSelector]:
        """The encoder's token selector, None for a dense encoder."""
        return self.encoder.selector

    @property
    def num_classes(self) -> int:
        """K, the class logits of every head."""
        return self.decoder.class_embed[0].out_features

    def has_unused_parameters(self) -> bool:
        """Whether DDP needs ``find_unused_parameters`` (refinement without aux loss leaves heads unused)."""
        return self.decoder.has_unused_parameters

    def forward(self, images: Union[Tensor, Sequence[Tensor]], mask: Optional[Tensor] = None,
                image_sizes: Optional[Sequence[tuple[int, int]]] = None, return_maps: bool = False) -> dict:
        """images: a list of (3, H_i, W_i) or a padded (B, 3, H, W) with ``mask`` (B, H, W) True = padding.
        image_sizes: host (h, w) of a padded batch's images, only tightens the kept-slot bound k.
        return_maps: return the decoder's sampling (the DAM's inputs) for any selector, dense too.
        Returns: the module docstring's dict.
        """
        images, mask, image_sizes = batch_images(images, mask, image_sizes)
        tok = self.tokens(images, mask, image_sizes)          # Deformable DETR Sec. 4.1
        enc = self.encoder(tok)                               # Sparse DETR Sec. 3.2-3.3
        queries = self.queries(enc, images.shape[0])          # Sparse DETR Sec. 3.4 / Deformable DETR Sec. 4.2
        # The DAM's inputs: the selector's target in training, and any model's instruments with return_maps.
        sampling = return_maps or (self.training and self.encoder.needs_decoder_sampling)
        dec = self.decoder(queries, enc.memory, tok, return_sampling=sampling)
        return {**dec.outputs(), **queries.outputs, **enc.outputs(), "spatial_shapes": tok.spatial_shapes,
                "level_start_index": tok.level_start_index, "padding_mask": tok.padding_mask}
