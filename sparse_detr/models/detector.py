"""The top-level detector: Sparse DETR, and Deformable DETR (plain, two-stage, "Efficient DETR") as special cases.

backbone → input projections + level embedding → flattened tokens (method §1) → [token scoring + top-ρ selection,
§2-3] → (sparse) encoder (§4) → queries (two-stage top-Q with Sparse DETR or Deformable DETR initialisation, or
learned queries, §5) → decoder with box refinement → heads; plus, when training, the DAM target for the scorer (§6).

Output dict of ``SparseDETR.forward`` (B images, Q queries, K classes, S tokens, k kept tokens, L levels):

    pred_logits        (B, Q, K)     final decoder layer, raw logits (sigmoid / focal)
    pred_boxes         (B, Q, 4)     cxcywh in [0, 1]
    aux_outputs        list of Ld-1 {pred_logits, pred_boxes} for decoder layers 0..Ld-2   (aux_loss)
    enc_outputs        {pred_logits (B, S, K), pred_boxes (B, S, 4), valid (B, S) bool}   (two_stage)
    enc_aux_outputs    list of enc_layers-1 {pred_logits (B, k, K), pred_boxes (B, k, 4), valid (B, k)}
                                                                             (use_enc_aux_loss, training only)
    backbone_outputs   {pred_logits (B, S, K), pred_boxes (B, S, 4), valid (B, S)}         (rho > 0, scorer os)
    mask_logits        (B, S)  scorer logits (official padding mode: padding filled with their batch minimum)
    mask_targets       (B, S)  float 0/1, top-k_b tokens of the DAM (no gradient)
    mask_weights       (B, S)  float, 1 for tokens the mask loss counts (official: all; exclude: not padding)
    dam                (B, S)  the decoder attention map; dam_coverage (B,), dam_coverage_levels (B, L)
                               — these five when the DAM is computed: rho > 0, scorer dam, and training or
                               ``return_maps=True``
    scores             (B, S)  selection scores (scorer logits or OS objectness), raw        (rho > 0)
    kept_token_counts  (B,) int64 k_b; kept_indices (B, k) int64; kept_valid (B, k) bool     (rho > 0)
    spatial_shapes     (L, 2) int64; level_start_index (L,) int64; padding_mask (B, S) bool

State-dict layout: exactly the official one (``tests/data/official_keys``). With box refinement the per-layer heads
are separate modules and, as in the official code, the same modules are registered a second time under
``transformer.decoder.*`` (two-stage: ``class_embed``; refinement: ``bbox_embed``) and the encoder aux heads a
third time under ``transformer.encoder.*``. Those aliases exist for the checkpoint layout only; ``forward`` uses
``self.class_embed`` / ``self.bbox_embed``.

Objectness-score (OS) token selection (``scorer_target="os"``, the paper's ablation; method §6): instead of the
DAM-trained ``enc_mask_predictor``, a detection head on the backbone tokens — ``transformer.backbone_class_embed``
(Linear d→K) and ``transformer.backbone_bbox_embed`` (MLP, offsets to the grid proposals) on the same
``enc_output_norm(enc_output(·))`` features the scorer would see — scores every token; its max class logit
selects the kept tokens. Its predictions are returned as ``backbone_outputs`` and trained by the Hungarian loss
like ``enc_outputs`` (class-specific labels; loss suffix ``_backbone``); there is no mask loss and no DAM.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparse_detr.models.dam import dam_coverage, dam_targets, decoder_attention_map
from sparse_detr.models.decoder import Decoder
from sparse_detr.models.encoder import (
    SparseEncoder, TokenScorer, dense_reference_points, grid_proposals, kept_token_counts, max_kept_tokens,
    proposal_features, select_tokens,
)
from sparse_detr.models.ms_deform_attn import MSDeformAttn
from sparse_detr.models.queries import learned_queries, two_stage_queries

__all__ = ["MLP", "SparseDETR", "batch_images"]

_PRIOR_BIAS = -math.log((1 - 0.01) / 0.01)  # focal-loss prior: every class starts at p = 0.01 (-4.595)


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


def batch_images(images: Union[Tensor, Sequence[Tensor]], mask: Optional[Tensor] = None,
                 image_sizes: Optional[Sequence[tuple[int, int]]] = None,
                 ) -> tuple[Tensor, Tensor, Optional[list[tuple[int, int]]]]:
    """Normalise the model input to a padded batch.

    A list of (3, H_i, W_i) images is padded bottom/right to the largest size (a host-side packing step, as the
    data collate does) and its sizes are returned; a (B, 3, H, W) tensor without a mask is unpadded.
    Returns: images (B, 3, H, W), mask (B, H, W) bool True = padding, image sizes [(h, w)] or None if unknown.
    """
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
    """The parameters official checkpoints store under ``transformer.*``; ``SparseDETR.forward`` drives them.

    Always: ``level_embed`` (L, d), ``encoder``, ``decoder``. Two-stage: ``enc_output`` (d→d) + ``enc_output_norm``,
    ``pos_trans`` (2d→d with Sparse DETR query init, else 2d→2d) + ``pos_trans_norm``. Plain: ``reference_points``
    (d→2). Sparse DETR: ``enc_mask_predictor`` (DAM target) or ``backbone_class_embed`` / ``backbone_bbox_embed``
    (OS target; not in any official checkpoint).
    """


class SparseDETR(nn.Module):
    """Sparse DETR / Deformable DETR detector. Arguments mirror ``ModelConfig`` (see ``build_model``).

    Args:
        backbone: a ``Joiner`` (``[0]`` the network with ``num_channels``, ``[1]`` the sine position encoding).
        num_classes: K class logits. num_queries: Q. hidden_dim: d. num_feature_levels: L (1..4).
        with_box_refine, two_stage, eff_query_init, eff_specific_head: the official flags (method §5).
        rho: encoder keep ratio (0 = dense encoder). use_enc_aux_loss: encoder aux heads (needs rho > 0).
        scorer_target: "dam" (scorer trained on the decoder attention map) or "os" (objectness of a detection
            head on the backbone tokens, trained by the Hungarian loss; see ``backbone_outputs``).
        dam_alignment: "official" | "aligned" (``dam.py``). scorer_padding: "official" | "exclude" — whether
            padded tokens enter the scorer's global mean and the mask loss.
    """

    def __init__(self, backbone: nn.Module, num_classes: int = 91, hidden_dim: int = 256, nheads: int = 8,
                 num_feature_levels: int = 4, enc_layers: int = 6, dec_layers: int = 6, dim_feedforward: int = 1024,
                 dropout: float = 0.1, enc_n_points: int = 4, dec_n_points: int = 4, num_queries: int = 300,
                 aux_loss: bool = True, with_box_refine: bool = False, two_stage: bool = False,
                 eff_query_init: bool = False, eff_specific_head: bool = False, rho: float = 0.0,
                 use_enc_aux_loss: bool = False, scorer_target: str = "dam", dam_alignment: str = "official",
                 scorer_padding: str = "official") -> None:
        super().__init__()
        if rho > 0 and not two_stage:
            raise ValueError("rho > 0 needs two_stage (the scorer shares enc_output with the two-stage head)")
        if use_enc_aux_loss and rho <= 0:
            raise ValueError("use_enc_aux_loss needs rho > 0 (the aux heads score the kept tokens)")
        if eff_query_init and not two_stage:
            raise ValueError("eff_query_init needs two_stage")
        if scorer_target not in ("dam", "os") or scorer_padding not in ("official", "exclude"):
            raise ValueError(f"bad scorer_target {scorer_target!r} or scorer_padding {scorer_padding!r}")
        self.num_classes, self.num_queries, self.hidden_dim = num_classes, num_queries, hidden_dim
        self.num_feature_levels, self.dec_layers = num_feature_levels, dec_layers
        self.aux_loss, self.with_box_refine, self.two_stage = aux_loss, with_box_refine, two_stage
        self.eff_query_init, self.eff_specific_head = eff_query_init, eff_specific_head
        self.rho, self.use_enc_aux_loss, self.scorer_target = rho, use_enc_aux_loss, scorer_target
        self.dam_alignment, self.scorer_padding = dam_alignment, scorer_padding

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
        head = nn.Linear(self.hidden_dim, self.num_classes)
        nn.init.constant_(head.bias, _PRIOR_BIAS)
        return head

    def _box_head(self) -> MLP:
        head = MLP(self.hidden_dim, self.hidden_dim, 4, 3)
        nn.init.zeros_(head.layers[-1].weight)  # start at the reference box
        nn.init.zeros_(head.layers[-1].bias)
        return head

    @staticmethod
    def _make_input_proj(channels: Sequence[int], dim: int, num_levels: int) -> nn.ModuleList:
        """1×1 conv + GN on the last min(L, 3) backbone levels, then 3×3 stride-2 conv + GN levels (the first on
        the raw C5) up to L levels (method §1)."""
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
        if self.rho > 0 and self.scorer_target == "dam":
            t.enc_mask_predictor = TokenScorer(d)
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
        if self.rho > 0 and self.scorer_target == "os":
            t.backbone_class_embed, t.backbone_bbox_embed = self._class_head(), self._box_head()
        return t

    def has_unused_parameters(self) -> bool:
        """Whether a training step leaves some trainable parameters without a gradient (DDP then needs
        ``find_unused_parameters=True``, an extra graph walk per step, so it is asked for only when needed).

        The one such case: box refinement without ``aux_loss``. Each decoder layer then has its own heads, but only
        the last layer's predictions reach a loss (the refined boxes are detached between layers), so the class
        heads of layers 0..Ld-2 are outside the loss's graph. Everything else is used by every step (checked for
        every shipped config family, and this answer against the real gradients, in tests/test_gradients.py).
        """
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
        """Backbone → projections → flattened token map (method §1).

        Returns a dict: src, pos (B, S, d) (pos includes the level embedding), padding_mask (B, S),
        shapes [(h_l, w_l)] host ints, spatial_shapes (L, 2), level_start_index (L,), valid_ratios (B, L, 2).
        """
        features, masks, pos = self.backbone(images, mask)
        num_backbone = min(self.num_feature_levels, len(features))  # the rest are extra stride-2 levels
        features, masks, pos = features[-num_backbone:], list(masks[-num_backbone:]), list(pos[-num_backbone:])
        srcs = [proj(f) for proj, f in zip(self.input_proj, features)]
        for proj in list(self.input_proj)[num_backbone:]:  # the first extra level convolves the raw C5
            src = proj(features[-1] if len(srcs) == num_backbone else srcs[-1])
            level_mask = F.interpolate(mask[None].float(), size=src.shape[-2:]).to(torch.bool)[0]
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
        """Detect objects.

        Args:
            images: a list of (3, H_i, W_i) images, or a padded batch (B, 3, H, W).
            mask: (B, H, W) bool, True = padding, with a padded batch (None = no padding).
            image_sizes: unpadded (h, w) of every image of a padded batch, if known on the host; only tightens the
                kept-token bound k (``encoder.max_kept_tokens``). Lists of images provide it themselves.
            return_maps: compute the DAM and its targets outside training too (visualisation).
        Returns:
            The output dict documented in the module docstring.
        """
        images, mask, image_sizes = batch_images(images, mask, image_sizes)
        tok = self._tokens(images, mask)
        t, pad, Ld = self.transformer, tok["padding_mask"], self.dec_layers
        out: dict = {"spatial_shapes": tok["spatial_shapes"], "level_start_index": tok["level_start_index"],
                     "padding_mask": pad}

        # §2-3: score the backbone tokens and keep the top-ρ of every image.
        proposals = valid = kept_indices = kept_valid = counts = None
        k = 0  # kept tokens per image slot (host int), when rho > 0
        if self.two_stage:
            proposals, valid = grid_proposals(pad, tok["shapes"])
        if self.rho > 0:
            feats = proposal_features(tok["src"] + tok["pos"], valid, t.enc_output, t.enc_output_norm)
            if self.scorer_target == "dam":
                scores = t.enc_mask_predictor(feats, pad if self.scorer_padding == "exclude" else None)
            else:  # OS: objectness of a detection head, trained by the Hungarian loss on `backbone_outputs`
                logits = t.backbone_class_embed(feats)
                boxes = (t.backbone_bbox_embed(feats) + proposals).sigmoid()
                out["backbone_outputs"] = {"pred_logits": logits, "pred_boxes": boxes, "valid": valid}
                scores = logits.max(-1).values
            k = max_kept_tokens(self.rho, tok["shapes"], tuple(images.shape[-2:]), image_sizes)
            counts = kept_token_counts(pad, self.rho, k)
            kept_indices, kept_valid = select_tokens(scores, pad, counts, k)
            out.update(scores=scores, kept_token_counts=counts, kept_indices=kept_indices, kept_valid=kept_valid)

        # §4: the (sparse) encoder, with aux heads on the kept tokens.
        aux_heads = None
        if self.use_enc_aux_loss and self.training:  # the aux heads only feed losses: skip them at inference
            aux_heads = (list(self.class_embed)[Ld + 1:], list(self.bbox_embed)[Ld + 1:])
        reference_points = dense_reference_points(tok["shapes"], tok["valid_ratios"])
        memory, enc_aux = t.encoder(tok["src"], tok["pos"], reference_points, tok["spatial_shapes"],
                                    tok["level_start_index"], pad, kept_indices=kept_indices, kept_valid=kept_valid,
                                    proposals=proposals, aux_heads=aux_heads)
        if enc_aux:
            out["enc_aux_outputs"] = enc_aux

        # §5: queries and decoder.
        if self.two_stage:
            tgt, query_pos, reference, out["enc_outputs"] = two_stage_queries(
                memory, proposals, valid, t.enc_output, t.enc_output_norm, self.class_embed[Ld],
                self.bbox_embed[Ld], t.pos_trans, t.pos_trans_norm, self.num_queries, self.eff_specific_head,
                self.eff_query_init)
        else:
            tgt, query_pos, reference = learned_queries(self.query_embed.weight, t.reference_points, images.shape[0])
        need_dam = self.rho > 0 and self.scorer_target == "dam" and (self.training or return_maps)
        dec = t.decoder(tgt, query_pos, reference, memory, tok["spatial_shapes"], tok["level_start_index"],
                        tok["valid_ratios"], pad, list(self.bbox_embed)[:Ld], return_sampling=need_dam)

        logits = [self.class_embed[lvl](dec.hidden[lvl]) for lvl in range(Ld)]
        out["pred_logits"], out["pred_boxes"] = logits[-1], dec.boxes[-1]
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": logits[lvl], "pred_boxes": dec.boxes[lvl]} for lvl in range(Ld - 1)]

        # §6: the DAM target of the scorer (no gradient).
        if need_dam:
            dam = decoder_attention_map(dec.sampling_locations, dec.attention_weights, tok["spatial_shapes"],
                                        tok["level_start_index"], pad.shape[1], self.dam_alignment)
            mask_logits = scores
            if self.scorer_padding == "official":  # the official selection fills padding with the batch minimum
                mask_logits = scores.masked_fill(pad, scores.min())
            coverage, coverage_levels = dam_coverage(dam, pad, kept_indices, kept_valid, tok["spatial_shapes"])
            out.update(mask_logits=mask_logits, mask_targets=dam_targets(dam, pad, counts, k),
                       mask_weights=(torch.ones_like(dam) if self.scorer_padding == "official" else (~pad).float()),
                       dam=dam, dam_coverage=coverage, dam_coverage_levels=coverage_levels)
        return out
