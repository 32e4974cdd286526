"""Optimiser, learning-rate schedule and EMA of the weights (the official Deformable DETR recipe).

* AdamW over three parameter groups, as the official recipe: the backbone (`backbone.0.*`) at `lr_backbone`,
  the deformable-attention sampling offsets and the reference-point projections (names containing
  `sampling_offsets` / `reference_points`) at `lr * lr_linear_proj_mult`, everything else at `lr`. One weight
  decay for all of them (the official code excludes nothing from decay).
* Optional square-root lr scaling with the global batch: `lr * sqrt(global_batch / base_batch)`.
* A step schedule in epochs (MultiStepLR, stepped once per epoch): lr ×`factor` at each epoch in `drop_epochs`.
* EMA of the weights through `torch.optim.swa_utils.AveragedModel`.

Only plain arguments come in; `builders.py` maps the config onto them.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn
from torch.optim.lr_scheduler import MultiStepLR

__all__ = [
    "BACKBONE_KEYS", "LINEAR_PROJ_KEYS", "scaled_lr", "param_groups", "build_optimizer", "build_lr_scheduler",
    "scheduler_state", "restore_scheduler", "build_ema",
]

# Substrings that select a group, as in the official flags `--lr_backbone_names` / `--lr_linear_proj_names`.
BACKBONE_KEYS = ("backbone.0",)
LINEAR_PROJ_KEYS = ("sampling_offsets", "reference_points")


def scaled_lr(lr: float, global_batch: int, base_batch: int, mode: str) -> float:
    """`lr` adjusted for the global batch: "none" keeps it, "sqrt" multiplies by sqrt(global/base)."""
    if mode == "none":
        return lr
    if mode == "sqrt":
        return lr * math.sqrt(global_batch / base_batch)
    raise ValueError(f"unknown lr scaling {mode!r} (expected 'none' or 'sqrt')")


def _matches(name: str, keys: Iterable[str]) -> bool:
    return any(k in name for k in keys)


def param_groups(model: nn.Module, lr: float, lr_backbone: float, lr_linear_proj_mult: float,
                 weight_decay: float) -> list[dict]:
    """The three named AdamW groups. Frozen parameters (requires_grad False) are left out.

    The groups always exist, even when empty (a frozen backbone), so that the optimizer state layout, and with it
    the checkpoints, do not depend on which parts are trained. `named_parameters` yields a tensor shared between
    modules (the refine heads) once, so no parameter lands in two groups.
    """
    groups = {"default": [], "backbone": [], "linear_proj": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if _matches(name, BACKBONE_KEYS):
            groups["backbone"].append(p)
        elif _matches(name, LINEAR_PROJ_KEYS):
            groups["linear_proj"].append(p)
        else:
            groups["default"].append(p)
    lrs = {"default": lr, "backbone": lr_backbone, "linear_proj": lr * lr_linear_proj_mult}
    return [{"name": k, "params": v, "lr": lrs[k], "weight_decay": weight_decay} for k, v in groups.items()]


def build_optimizer(model: nn.Module, lr: float, lr_backbone: float, lr_linear_proj_mult: float,
                    weight_decay: float) -> torch.optim.AdamW:
    groups = param_groups(model, lr, lr_backbone, lr_linear_proj_mult, weight_decay)
    if not any(g["params"] for g in groups):
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, drop_epochs: list[int], factor: float) -> MultiStepLR:
    """lr × `factor` after each epoch listed in `drop_epochs` (0-based epoch counter, stepped once per epoch):
    with drop_epochs=[40], epochs 0..39 train at the base lr and epochs 40.. at base × factor."""
    return MultiStepLR(optimizer, milestones=list(drop_epochs), gamma=factor)


def scheduler_state(scheduler: MultiStepLR) -> dict:
    """What a checkpoint keeps of the schedule: only its position. The milestones and factor come from the
    config at resume, so that a run resumed with a changed `lr_drop_epochs` follows the new schedule (the
    official code patches `step_size` after loading for the same reason). Plain ints: weights_only-safe."""
    return {"last_epoch": int(scheduler.last_epoch), "step_count": int(getattr(scheduler, "_step_count", 0))}


def restore_scheduler(scheduler: MultiStepLR, state: dict) -> None:
    """Put the schedule at the saved epoch and set every group's lr from the closed form
    `initial_lr * factor ** (number of milestones <= epoch)` under the current milestones."""
    epoch = int(state["last_epoch"])
    scheduler.last_epoch = epoch
    scheduler._step_count = int(state.get("step_count", epoch + 1))  # only silences the step-order warning
    drops = sum(1 for m in scheduler.milestones.elements() if m <= epoch)
    for group in scheduler.optimizer.param_groups:
        group["lr"] = group["initial_lr"] * scheduler.gamma ** drops
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]


def build_ema(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """An EMA copy of `model` (pass the unwrapped model, not the DDP wrapper), updated with
    `ema.update_parameters(model)` after each optimizer step. `use_buffers=True` averages the buffers too, so the
    copy is self-contained for evaluation (the frozen batch-norm statistics do not change: averaging is harmless)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    if not 0.0 < decay < 1.0:
        raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
    # AveragedModel deep-copies the module; detach it from autograd so the copy never asks for gradients.
    # ema = decay * ema + (1 - decay) * param, one fused foreach update.
    ema = AveragedModel(model, use_buffers=True, multi_avg_fn=get_ema_multi_avg_fn(decay))
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema

