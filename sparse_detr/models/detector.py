"""Sparse DETR, with Deformable DETR (plain, two-stage) as special cases; the data flow is in ``docs/design.md``.

Output dict of ``SparseDETR.forward`` (B images, Q queries, K classes, S tokens, k kept slots, L levels):

    pred_logits        (B, Q, K)     final decoder layer, raw logits (sigmoid / focal)
    pred_boxes         (B, Q, 4)     cxcywh in [0, 1]
    aux_outputs        list of Ld-1 {pred_logits, pred_boxes} for decoder layers 0..Ld-2   (aux_loss)
    enc_outputs        {pred_logits (B, S, K), pred_boxes (B, S, 4), valid (B, S) bool}   (two_stage)
    enc_aux_outputs    list of enc_layers-1 {pred_logits (B, k_i, K), pred_boxes (B, k_i, 4), valid (B, k_i)}
                                                                             (use_enc_aux_loss, training only)
    scores             (B, S)  the selector's raw scores                                      (rho > 0)
    kept_token_counts  (B,) int64 k_b; kept_indices (B, k) int64 sorted by score; kept_valid (B, k) bool
    kept_indices_per_layer, kept_valid_per_layer   one (B, k_i) per encoder layer (prefixes) (rho > 0)
    kept_level_counts  (B, L) int64                                                          (rho_levels)
    backbone_outputs   {pred_logits (B, S, K), pred_boxes (B, S, 4), valid (B, S)}         (scorer_target os)
    dec_sampling_locations (B, Ld, Q, H, L, P, 2), dec_attention_weights (B, Ld, Q, H, L, P)
                               the decoder's cross-attention, when the selector's target needs it (dam) in
                               training, and for any model with ``return_maps`` (the selection instruments)
    spatial_shapes     (L, 2) int64; level_start_index (L,) int64; padding_mask (B, S) bool

``valid`` (enc_outputs, enc_aux_outputs) masks matching and focal negatives: ``enc_loss_padding="official"``
counts every token and every slot up to the batch's largest k_b; ``"exclude"`` drops padding and slots past k_b.

State dict: the official layout (``tests/data/official_keys``). The heads are registered again under
``transformer.decoder.*`` / ``transformer.encoder.*`` for that layout only; ``forward`` uses ``self.class_embed``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from sparse_detr.models.backbone import resize_mask
from sparse_detr.models.decoder import Decoder
from sparse_detr.models.encoder import SparseEncoder, dense_reference_points, grid_proposals, proposal_features
from sparse_detr.models.heads import MLP, box_head, class_head
from sparse_detr.models.ms_deform_attn import MSDeformAttn
from sparse_detr.models.queries import learned_queries, two_stage_queries
from sparse_detr.models.selection import TokenSelector

__all__ = ["MLP", "SparseDETR", "batch_images"]

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


def _valid_ratio(mask: Tensor) -> Tensor:
    """(B, h, w) level padding mask → (B, 2) unpadded fraction (w, h), read along the first row / column."""
    valid_w = (~mask[:, 0, :]).sum(1).float() / mask.shape[2]
    valid_h = (~mask[:, :, 0]).sum(1).float() / mask.shape[1]
    return torch.stack((valid_w, valid_h), dim=-1)


class TransformerParts(nn.Module):
    """Container of the modules official checkpoints store under ``transformer.*``; ``SparseDETR`` runs them."""


class SparseDETR(nn.Module):
    """Sparse DETR / Deformable DETR detector; arguments are ``ModelConfig`` fields (documented in config.py).

    backbone: a ``Joiner`` ([0] the network, [1] the position encoding); selector: the sparse encoder's token
    selection (``selection.build_selector``), None = dense encoder.
    """

    def __init__(self, backbone: nn.Module, num_classes: int = 91, hidden_dim: int = 256, nheads: int = 8,
                 num_feature_levels: int = 4, enc_layers: int = 6, dec_layers: int = 6, dim_feedforward: int = 1024,
                 dropout: float = 0.1, enc_n_points: int = 4, dec_n_points: int = 4, num_queries: int = 300,
                 aux_loss: bool = True, with_box_refine: bool = False, two_stage: bool = False,
                 eff_query_init: bool = False, eff_specific_head: bool = False,
                 selector: Optional[TokenSelector] = None, use_enc_aux_loss: bool = False,
                 query_padding: str = "official", enc_loss_padding: str = "official") -> None:
        super().__init__()
        if selector is not None and not two_stage:
            raise ValueError("a sparse encoder needs two_stage (the selector shares enc_output with the two-stage head)")
        if use_enc_aux_loss and selector is None:
            raise ValueError("use_enc_aux_loss needs a sparse encoder (the aux heads score the kept tokens)")
        if eff_query_init and not two_stage:
            raise ValueError("eff_query_init needs two_stage")
        for name, value in (("query_padding", query_padding), ("enc_loss_padding", enc_loss_padding)):
            if value not in ("official", "exclude"):
                raise ValueError(f"{name} must be 'official' or 'exclude', got {value!r}")
        self.num_classes, self.num_queries, self.hidden_dim = num_classes, num_queries, hidden_dim
        self.num_feature_levels, self.dec_layers = num_feature_levels, dec_layers
        self.aux_loss, self.with_box_refine, self.two_stage = aux_loss, with_box_refine, two_stage
        self.eff_query_init, self.eff_specific_head = eff_query_init, eff_specific_head
        self.selector, self.use_enc_aux_loss = selector, use_enc_aux_loss
        self.query_padding, self.enc_loss_padding = query_padding, enc_loss_padding

        self.backbone = backbone
        self.input_proj = self._make_input_proj(backbone.num_channels, hidden_dim, num_feature_levels)
        self.transformer = self._make_transformer(nheads, enc_layers, dec_layers, dim_feedforward, dropout,
                                                  enc_n_points, dec_n_points)
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries, 2 * hidden_dim)

        # Heads: decoder layers 0..Ld-1, then the two-stage head Ld, then the encoder aux heads (official order).
        num_heads = dec_layers + int(two_stage) + (enc_layers - 1 if use_enc_aux_loss else 0)
        if with_box_refine:
            self.class_embed = nn.ModuleList(self._class_head() for _ in range(num_heads))
            self.bbox_embed = nn.ModuleList(self._box_head() for _ in range(num_heads))
        else:  # one head shared by every layer, registered num_heads times (official layout)
            class_head, box_head = self._class_head(), self._box_head()
            self.class_embed = nn.ModuleList([class_head] * num_heads)
            self.bbox_embed = nn.ModuleList([box_head] * num_heads)
        if not two_stage:
            # Plain queries start from 2-d points: a box size prior of sigmoid(-2) ≈ 0.12 for the first layer.
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
        self._register_checkpoint_aliases(dec_layers)

    # ------------------------------------------------------------------------------------------------ building
    def _class_head(self) -> nn.Linear:
        return class_head(self.hidden_dim, self.num_classes)

    def _box_head(self) -> MLP:
        return box_head(self.hidden_dim)

    @staticmethod
    def _make_input_proj(channels: Sequence[int], dim: int, num_levels: int) -> nn.ModuleList:
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

    def _make_transformer(self, nheads: int, enc_layers: int, dec_layers: int, dim_feedforward: int,
                          dropout: float, enc_n_points: int, dec_n_points: int) -> TransformerParts:
        d, levels = self.hidden_dim, self.num_feature_levels
        common = dict(d_model=d, d_ffn=dim_feedforward, dropout=dropout, n_levels=levels, n_heads=nheads)
        t = TransformerParts()
        t.level_embed = nn.Parameter(torch.empty(levels, d))
        t.encoder = SparseEncoder(enc_layers, n_points=enc_n_points, **common)
        t.decoder = Decoder(dec_layers, refine=self.with_box_refine, n_points=dec_n_points, **common)
        if self.two_stage:
            t.enc_output, t.enc_output_norm = nn.Linear(d, d), nn.LayerNorm(d)
            pos_dim = d if self.eff_query_init else 2 * d
            t.pos_trans, t.pos_trans_norm = nn.Linear(2 * d, pos_dim), nn.LayerNorm(pos_dim)
        else:
            t.reference_points = nn.Linear(d, 2)
        # Deformable DETR initialisation: xavier for every matrix, then the attention modules' own scheme.
        for p in t.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in t.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        nn.init.normal_(t.level_embed)
        if not self.two_stage:
            nn.init.zeros_(t.reference_points.bias)
        for name, module in (self.selector.modules.items() if self.selector is not None else ()):
            setattr(t, name, module)  # the official names (enc_mask_predictor, ...)
        return t

    def has_unused_parameters(self) -> bool:
        """Whether DDP needs ``find_unused_parameters``: only refinement without aux loss leaves heads unused."""
        return self.with_box_refine and not self.aux_loss and self.dec_layers > 1

    def _register_checkpoint_aliases(self, dec_layers: int) -> None:
        """Second names of the heads, as the official code registers them (see the module docstring)."""
        if self.two_stage:
            self.transformer.decoder.class_embed = self.class_embed
        if self.with_box_refine:
            self.transformer.decoder.bbox_embed = self.bbox_embed
        if self.use_enc_aux_loss:
            self.transformer.encoder.class_embed = nn.ModuleList(list(self.class_embed)[dec_layers + 1:])
            self.transformer.encoder.bbox_embed = nn.ModuleList(list(self.bbox_embed)[dec_layers + 1:])

    # ------------------------------------------------------------------------------------------------ forward
    def _tokens(self, images: Tensor, mask: Tensor) -> dict:
        """Backbone → projections → flat tokens: src, pos (B, S, d) (with level embedding), padding_mask (B, S),
        shapes [(h_l, w_l)] host ints, spatial_shapes (L, 2), level_start_index (L,), valid_ratios (B, L, 2)."""
        features, masks, pos = self.backbone(images, mask)
        num_backbone = min(self.num_feature_levels, len(features))  # the rest are extra stride-2 levels
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
        return {
            "src": torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1),
            "pos": torch.cat([p.flatten(2).transpose(1, 2) + self.transformer.level_embed[lvl]
                              for lvl, p in enumerate(pos)], 1),
            "padding_mask": torch.cat([m.flatten(1) for m in masks], 1),
            "shapes": shapes,
            "spatial_shapes": spatial_shapes,
            "level_start_index": torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1])),
            "valid_ratios": torch.stack([_valid_ratio(m) for m in masks], dim=1),
        }

    def forward(self, images: Union[Tensor, Sequence[Tensor]], mask: Optional[Tensor] = None,
                image_sizes: Optional[Sequence[tuple[int, int]]] = None, return_maps: bool = False) -> dict:
        """images: a list of (3, H_i, W_i) or a padded (B, 3, H, W) with ``mask`` (B, H, W) True = padding.
        image_sizes: host (h, w) of a padded batch's images, only tightens the kept-slot bound k.
        return_maps: return the decoder's sampling (the DAM's inputs) for any selector, dense too.
        Returns: the module docstring's dict.
        """
        images, mask, image_sizes = batch_images(images, mask, image_sizes)
        tok = self._tokens(images, mask)
        t, pad, Ld = self.transformer, tok["padding_mask"], self.dec_layers
        out: dict = {"spatial_shapes": tok["spatial_shapes"], "level_start_index": tok["level_start_index"],
                     "padding_mask": pad}

        # Sparse DETR Sec. 3.2: score the backbone tokens and keep the best of every image.
        proposals = valid = selection = layer_valid = None
        if self.two_stage:
            proposals, valid = grid_proposals(pad, tok["shapes"])
        if self.selector is not None:
            def features() -> Tensor:  # lazy: only selectors that need it compute it
                return proposal_features(tok["src"] + tok["pos"], valid, t.enc_output, t.enc_output_norm)

            scores, extra = self.selector.score(features, proposals, pad)
            selection = self.selector.select(scores, pad, tok["shapes"], tuple(images.shape[-2:]), image_sizes)
            # One (k_i, counts_i) per encoder layer; without rho_layers every layer keeps the first layer's set.
            layers = selection.layers + selection.layers[-1:] * (len(t.encoder.layers) - len(selection.layers))
            layer_valid = [selection.valid] + [
                torch.arange(k_i, device=pad.device)[None, :] < counts[:, None] for k_i, counts in layers[1:]]
            out.update(extra, scores=scores, kept_token_counts=selection.counts, kept_indices=selection.indices,
                       kept_valid=selection.valid, kept_valid_per_layer=layer_valid,
                       kept_indices_per_layer=[selection.indices[:, :k_i] for k_i, _ in layers])
            if selection.level_counts is not None:
                out["kept_level_counts"] = selection.level_counts

        # Sparse DETR Sec. 3.3: the (sparse) encoder, with aux heads on the kept tokens.
        aux_heads = None
        if self.use_enc_aux_loss and self.training:  # they only feed losses
            aux_heads = (list(self.class_embed)[Ld + 1:], list(self.bbox_embed)[Ld + 1:])
        reference_points = dense_reference_points(tok["shapes"], tok["valid_ratios"])
        memory, enc_aux = t.encoder(tok["src"], tok["pos"], reference_points, tok["spatial_shapes"],
                                    tok["level_start_index"], pad, kept_indices=out.get("kept_indices"),
                                    layer_valid=layer_valid, proposals=proposals, aux_heads=aux_heads)
        if enc_aux:
            if self.enc_loss_padding == "official":  # every slot up to the batch's largest k_b (the official k)
                for aux, (k_i, counts) in zip(enc_aux, layers):
                    slots = torch.arange(k_i, device=pad.device)[None, :] < counts.max()
                    aux["valid"] = slots.expand(pad.shape[0], -1)
            out["enc_aux_outputs"] = enc_aux

        if self.two_stage:
            tgt, query_pos, reference, out["enc_outputs"] = two_stage_queries(
                memory, proposals, valid, t.enc_output, t.enc_output_norm, self.class_embed[Ld],
                self.bbox_embed[Ld], t.pos_trans, t.pos_trans_norm, self.num_queries, self.eff_specific_head,
                self.eff_query_init, self.query_padding)
            out["enc_outputs"]["valid"] = valid if self.enc_loss_padding == "exclude" else torch.ones_like(valid)
        else:
            tgt, query_pos, reference = learned_queries(self.query_embed.weight, t.reference_points, images.shape[0])
        # Kept for the DAM: the selector's target in training, and every model's instruments with return_maps.
        need_sampling = return_maps or (self.selector is not None and self.selector.needs_decoder_sampling
                                        and self.training)
        dec = t.decoder(tgt, query_pos, reference, memory, tok["spatial_shapes"], tok["level_start_index"],
                        tok["valid_ratios"], pad, list(self.bbox_embed)[:Ld], return_sampling=need_sampling)

        logits = [self.class_embed[lvl](dec.hidden[lvl]) for lvl in range(Ld)]
        out["pred_logits"], out["pred_boxes"] = logits[-1], dec.boxes[-1]
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": logits[lvl], "pred_boxes": dec.boxes[lvl]} for lvl in range(Ld - 1)]
        if need_sampling:  # the criterion builds the DAM from them
            out["dec_sampling_locations"], out["dec_attention_weights"] = dec.sampling_locations, dec.attention_weights
        return out
