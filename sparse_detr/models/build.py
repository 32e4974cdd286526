"""``build_model``: the one place that turns a ``Config`` into the model, its criterion and its postprocessor.

Every class of ``sparse_detr.models`` takes plain keyword arguments; only this module reads the config (style
guide, rule 2). Backbones are chosen through a small explicit dict, not a registry::

    from sparse_detr.config import load_config
    from sparse_detr.models import build_model

    cfg = load_config("configs/sparse_detr_r50_rho0.1.yaml")
    model, criterion, postprocess = build_model(cfg)
    outputs = model(images, mask)                          # images (B, 3, H, W), mask (B, H, W) True = padding
    losses = criterion(outputs, targets)                   # named, unweighted
    loss = weighted_total(losses, criterion.weight_dict)   # the one place weights are applied
    detections = postprocess(outputs, orig_sizes)          # (B, 2) (h, w)
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from sparse_detr.config import Config, ModelConfig
from sparse_detr.models.backbone import Joiner, build_backbone
from sparse_detr.models.criterion import SetCriterion, build_weight_dict
from sparse_detr.models.detector import SparseDETR
from sparse_detr.models.matcher import HungarianMatcher
from sparse_detr.models.postprocess import PostProcess
from sparse_detr.models.tiny_backbone import build_tiny_backbone

__all__ = ["build_model", "build_detector", "BACKBONES"]


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
    "swin_t_torchvision": _swin_t_torchvision,  # checkpoint format 1's swin_t (backbone.py)
    "tiny_cnn": _tiny_cnn,  # random-init GroupNorm CNN for CPU demos / fast tests (tiny_backbone.py)
}


def build_detector(m: ModelConfig) -> SparseDETR:
    """The detector alone (no criterion), e.g. for export, FLOP counting or checkpoint conversion."""
    if m.backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {m.backbone!r}; choose one of {sorted(BACKBONES)}")
    return SparseDETR(
        BACKBONES[m.backbone](m), num_classes=m.num_classes, hidden_dim=m.hidden_dim, nheads=m.nheads,
        num_feature_levels=m.num_feature_levels, enc_layers=m.enc_layers, dec_layers=m.dec_layers,
        dim_feedforward=m.dim_feedforward, dropout=m.dropout, enc_n_points=m.enc_n_points,
        dec_n_points=m.dec_n_points, num_queries=m.num_queries, aux_loss=m.aux_loss,
        with_box_refine=m.with_box_refine, two_stage=m.two_stage, eff_query_init=m.eff_query_init,
        eff_specific_head=m.eff_specific_head, rho=m.rho, use_enc_aux_loss=m.use_enc_aux_loss,
        scorer_target=m.scorer_target, dam_alignment=m.dam_alignment, scorer_padding=m.scorer_padding,
    )


def build_model(cfg: Config) -> tuple[SparseDETR, SetCriterion, nn.Module]:
    """Model, criterion (matcher + weight dict inside) and postprocessor from a validated config."""
    m, loss = cfg.model, cfg.loss
    model = build_detector(m)
    matcher = HungarianMatcher(cost_class=loss.set_cost_class, cost_bbox=loss.set_cost_bbox,
                               cost_giou=loss.set_cost_giou, focal_alpha=loss.focal_alpha,
                               focal_gamma=loss.focal_gamma)
    weight_dict = build_weight_dict(
        cls=loss.cls_loss_coef, bbox=loss.bbox_loss_coef, giou=loss.giou_loss_coef, mask=loss.mask_prediction_coef,
        num_dec_layers=m.dec_layers if m.aux_loss else 1,
        num_enc_aux=m.enc_layers - 1 if m.use_enc_aux_loss else 0, two_stage=m.two_stage,
        backbone_head=m.rho > 0 and m.scorer_target == "os",  # the OS head is a detection head (method §6)
    )
    if not (m.rho > 0 and m.scorer_target == "dam"):
        weight_dict.pop("loss_mask", None)  # no scorer to train
    criterion = SetCriterion(m.num_classes, matcher, weight_dict, focal_alpha=loss.focal_alpha,
                             focal_gamma=loss.focal_gamma, class_agnostic_enc=m.two_stage and not m.eff_specific_head)
    return model, criterion, PostProcess(num_select=100)
