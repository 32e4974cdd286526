"""``build_model(cfg) -> (model, criterion, postprocess)``: the only code of ``sparse_detr.models`` that reads the
config; backbones are chosen from the explicit ``BACKBONES`` dict. Usage::

    model, criterion, postprocess = build_model(load_config("configs/sparse_detr_r50_rho0.1.yaml"))
    loss = weighted_total(criterion(model(images, mask), targets), criterion.weight_dict)
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable

from torch import nn

from sparse_detr.config import Config, ConfigError, ModelConfig
from sparse_detr.models.backbone import Joiner, build_backbone
from sparse_detr.models.criterion import SetCriterion, build_weight_dict
from sparse_detr.models.detector import SparseDETR
from sparse_detr.models.matcher import HungarianMatcher
from sparse_detr.models.postprocess import PostProcess
from sparse_detr.models.selection import SELECTORS, KeepBudget, SelectorOptions, TokenSelector, build_selector
from sparse_detr.models.tiny_backbone import build_tiny_backbone

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


def build_detector(m: ModelConfig) -> SparseDETR:
    """The detector alone. Every ``ModelConfig`` field named like a ``SparseDETR`` argument is passed by name, so a
    new option is a config field plus a detector argument, with no edit here."""
    if m.backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {m.backbone!r}; choose one of {sorted(BACKBONES)}")
    backbone = BACKBONES[m.backbone](m)  # first: the random initialisation order is backbone, then the rest
    accepted = set(inspect.signature(SparseDETR).parameters) - {"backbone", "selector"}  # built here, not copied
    kwargs = {f.name: getattr(m, f.name) for f in dataclasses.fields(m) if f.name in accepted}
    return SparseDETR(backbone, selector=build_token_selector(m), **kwargs)


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
