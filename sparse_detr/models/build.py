"""``build_model(cfg) -> (model, criterion, postprocess)``: the only code of ``sparse_detr.models`` that reads the
config; backbones are chosen from the explicit ``BACKBONES`` dict. Usage::

    model, criterion, postprocess = build_model(load_config("configs/sparse_detr_r50_rho0.1.yaml"))
    loss = weighted_total(criterion(model(images, mask), targets), criterion.weight_dict)
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from sparse_detr.config import Config, ConfigError, ModelConfig
from sparse_detr.models.backbone import Joiner, build_backbone
from sparse_detr.models.criterion import SetCriterion, build_weight_dict
from sparse_detr.models.decoder import Decoder, DecoderStage
from sparse_detr.models.detector import SparseDETR
from sparse_detr.models.encoder import EncoderStage, ProposalProjection, SparseEncoder
from sparse_detr.models.heads import box_head, class_head
from sparse_detr.models.matcher import HungarianMatcher
from sparse_detr.models.ms_deform_attn import MSDeformAttn
from sparse_detr.models.postprocess import PostProcess
from sparse_detr.models.selection import SELECTORS, KeepBudget, SelectorOptions, TokenSelector, build_selector
from sparse_detr.models.queries import LearnedQueries, TwoStageQueries
from sparse_detr.models.tiny_backbone import build_tiny_backbone
from sparse_detr.models.tokens import TokenStage, input_projections

__all__ = ["build_model", "build_detector", "build_token_selector", "BACKBONES"]


def _resnet50(m: ModelConfig) -> Joiner:
    return build_backbone("resnet50", m.hidden_dim, m.train_backbone, m.num_feature_levels, m.pretrained_backbone)


def _swin_t(m: ModelConfig) -> Joiner:
    return build_backbone("swin_t", m.hidden_dim, m.train_backbone, m.num_feature_levels, m.pretrained_backbone,
                          drop_path_rate=m.swin_drop_path_rate)


def _swin_t_torchvision(m: ModelConfig) -> Joiner:
    return build_backbone("swin_t_torchvision", m.hidden_dim, m.train_backbone, m.num_feature_levels,
                          m.pretrained_backbone, drop_path_rate=m.swin_drop_path_rate)


def _tiny_cnn(m: ModelConfig) -> Joiner:
    return build_tiny_backbone(m.hidden_dim, m.train_backbone, m.num_feature_levels, m.pretrained_backbone)


#: ``model.backbone`` → builder of the backbone ``Joiner``.
BACKBONES: dict[str, Callable[[ModelConfig], Joiner]] = {
    "resnet50": _resnet50,
    "swin_t": _swin_t,
    "swin_t_torchvision": _swin_t_torchvision,  # checkpoint format 1's swin_t
    "tiny_cnn": _tiny_cnn,
}


def build_token_selector(m: ModelConfig) -> TokenSelector | None:
    """The sparse encoder's token selection (``model.scorer_target`` and the budget), None when ρ = 0."""
    if m.rho <= 0:
        return None
    budget = KeepBudget(m.rho, tuple(m.rho_levels) if m.rho_levels else None,
                        tuple(m.rho_layers) if m.rho_layers else None)
    options = SelectorOptions(m.hidden_dim, m.num_classes, m.scorer_padding, m.dam_alignment)
    if m.scorer_target not in SELECTORS:
        raise ConfigError(f"model.scorer_target: unknown token selection {m.scorer_target!r}; registered: "
                          f"{sorted(SELECTORS)} (a criterion of your own registers with @register_selector)")
    return build_selector(m.scorer_target, budget, options)


def _init_transformer(modules: Sequence[nn.Module], level_embed: nn.Parameter) -> None:
    """Deformable DETR's initialisation of the transformer: xavier for every matrix (in this order), then the
    attention modules' own scheme, then a normal level embedding."""
    params = [level_embed] + [p for module in modules for p in module.parameters()]
    for p in params:
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, MSDeformAttn):
                sub._reset_parameters()
    nn.init.normal_(level_embed)


def _heads(m: ModelConfig) -> tuple[list[nn.Module], list[nn.Module]]:
    """Class and box heads in the official order: decoder layers 0..Ld-1, the two-stage head, the encoder aux heads;
    with refinement one pair per place, else one pair shared by every place."""
    count = m.dec_layers + int(m.two_stage) + (m.enc_layers - 1 if m.use_enc_aux_loss else 0)
    if m.with_box_refine:
        classes = [class_head(m.hidden_dim, m.num_classes) for _ in range(count)]
        return classes, [box_head(m.hidden_dim) for _ in range(count)]
    shared_class, shared_box = class_head(m.hidden_dim, m.num_classes), box_head(m.hidden_dim)
    return [shared_class] * count, [shared_box] * count


def build_detector(m: ModelConfig) -> SparseDETR:
    """The detector, composed of its parts. Built in the official code's order (backbone, selector, projections,
    transformer, queries, heads), so a seed gives the official initialisation."""
    if m.backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {m.backbone!r}; choose one of {sorted(BACKBONES)}")
    if m.eff_query_init and not m.two_stage:
        raise ValueError("eff_query_init needs two_stage")
    backbone = BACKBONES[m.backbone](m)
    selector = build_token_selector(m)
    input_proj = input_projections(backbone.num_channels, m.hidden_dim, m.num_feature_levels)

    d = m.hidden_dim
    level_embed = nn.Parameter(torch.empty(m.num_feature_levels, d))
    common = dict(d_model=d, d_ffn=m.dim_feedforward, dropout=m.dropout, n_levels=m.num_feature_levels,
                  n_heads=m.nheads)
    encoder_stack = SparseEncoder(m.enc_layers, n_points=m.enc_n_points, **common)
    decoder_stack = Decoder(m.dec_layers, refine=m.with_box_refine, n_points=m.dec_n_points, **common)
    if m.two_stage:
        proposal_proj = ProposalProjection(d)
        pos_dim = d if m.eff_query_init else 2 * d
        pos_trans, pos_trans_norm = nn.Linear(2 * d, pos_dim), nn.LayerNorm(pos_dim)
        _init_transformer([encoder_stack, decoder_stack, proposal_proj, pos_trans, pos_trans_norm], level_embed)
    else:
        proposal_proj, reference_points = None, nn.Linear(d, 2)
        _init_transformer([encoder_stack, decoder_stack, reference_points], level_embed)
        nn.init.zeros_(reference_points.bias)
        query_embed = nn.Embedding(m.num_queries, 2 * d)
    classes, boxes = _heads(m)
    Ld = m.dec_layers

    if m.two_stage:
        queries = TwoStageQueries(proposal_proj, classes[Ld], boxes[Ld], pos_trans, pos_trans_norm, m.num_queries,
                                  m.eff_specific_head, m.eff_query_init, m.query_padding, m.enc_loss_padding)
    else:
        # Plain queries start from 2-d points: a box size prior of sigmoid(-2) ≈ 0.12 for the first layer.
        nn.init.constant_(boxes[0].layers[-1].bias[2:], -2.0)
        queries = LearnedQueries(query_embed, reference_points)
    aux = (nn.ModuleList(classes[Ld + 1:]), nn.ModuleList(boxes[Ld + 1:])) if m.use_enc_aux_loss else (None, None)
    return SparseDETR(
        tokens=TokenStage(backbone, input_proj, level_embed),
        encoder=EncoderStage(encoder_stack, selector, proposal_proj, *aux, enc_loss_padding=m.enc_loss_padding),
        queries=queries,
        decoder=DecoderStage(decoder_stack, nn.ModuleList(classes[:Ld]), nn.ModuleList(boxes[:Ld]), m.aux_loss),
    )


def build_model(cfg: Config) -> tuple[SparseDETR, SetCriterion, nn.Module]:
    """Model, criterion (matcher + weight dict inside) and postprocessor from a validated config."""
    m, loss = cfg.model, cfg.loss
    model = build_detector(m)
    matcher = HungarianMatcher(cost_class=loss.set_cost_class, cost_bbox=loss.set_cost_bbox,
                               cost_giou=loss.set_cost_giou, focal_alpha=loss.focal_alpha,
                               focal_gamma=loss.focal_gamma)
    weight_dict = build_weight_dict(
        cls=loss.cls_loss_coef, bbox=loss.bbox_loss_coef, giou=loss.giou_loss_coef,
        num_dec_layers=m.dec_layers if m.aux_loss else 1,
        num_enc_aux=m.enc_layers - 1 if m.use_enc_aux_loss else 0, two_stage=m.two_stage,
    )
    if model.selector is not None:
        weight_dict.update(model.selector.loss_weights(loss.cls_loss_coef, loss.bbox_loss_coef, loss.giou_loss_coef,
                                                       loss.mask_prediction_coef))
    criterion = SetCriterion(m.num_classes, matcher, weight_dict, focal_alpha=loss.focal_alpha,
                             focal_gamma=loss.focal_gamma, class_agnostic_enc=m.two_stage and not m.eff_specific_head,
                             selector=model.selector)
    return model, criterion, PostProcess(num_select=m.num_select)
