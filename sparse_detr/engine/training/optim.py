"""Optimiser, learning-rate schedule and EMA of the weights (the official Deformable DETR recipe).

* AdamW over three parameter groups, as the official recipe: the backbone (`backbone.0.*`) at `lr_backbone`,
  the deformable-attention sampling offsets and the reference-point projections (names containing
  `sampling_offsets` / `reference_points`) at `lr * lr_linear_proj_mult`, everything else at `lr`. One weight
  decay for all of them (the official code excludes nothing from decay).
* Optional square-root lr scaling with the global batch: `lr * sqrt(global_batch / base_batch)`.
* A step schedule in epochs (MultiStepLR, stepped once per epoch): lr ×`factor` at each epoch in `drop_epochs`.
* EMA of the weights through `torch.optim.swa_utils.AveragedModel`.
* Checkpoints name the optimizer's parameters (`optimizer_param_names`), and a resume hands each parameter the
  moments saved under its name (`align_optimizer_state`): the order of `named_parameters` follows the module tree,
  which may change between versions, the official names do not.

Only plain arguments come in; `builders.py` maps the config onto them.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn
from torch.optim.lr_scheduler import MultiStepLR

from sparse_detr.engine.checkpoint import CheckpointError

__all__ = [
    "BACKBONE_KEYS", "LINEAR_PROJ_KEYS", "scaled_lr", "param_groups", "build_optimizer", "build_lr_scheduler",
    "scheduler_state", "restore_scheduler", "build_ema", "parameter_names", "optimizer_param_names",
    "state_dict_order_names", "align_optimizer_state", "checkpoint_optimizer_state", "shapes_fit", "LEGACY_ORDER",
    "ordered_parameters",
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


# The order of the detector's parameters before it was composed of parts, by official key prefix (then by layer or
# head index, then module order). Gradient clipping sums the squared norms in this order and AdamW keeps its state
# in it, so keeping it makes a run continue the trajectories of earlier versions bit for bit
# (tests/data/param_order.json records that order for 12 detector variants).
LEGACY_ORDER = ("backbone.", "input_proj.", "transformer.level_embed", "transformer.encoder.layers.",
                "transformer.encoder.class_embed.", "transformer.encoder.bbox_embed.", "transformer.decoder.layers.",
                "transformer.decoder.class_embed.", "transformer.decoder.bbox_embed.", "transformer.enc_output.",
                "transformer.enc_output_norm.", "transformer.pos_trans.", "transformer.pos_trans_norm.",
                "transformer.reference_points.", "transformer.", "query_embed.", "class_embed.", "bbox_embed.")


def _key_rank(key: str) -> tuple[int, int]:
    for i, prefix in enumerate(LEGACY_ORDER):
        if key.startswith(prefix) or key + "." == prefix:
            head = key[len(prefix):].split(".")[0]
            return i, int(head) if head.isdigit() else -1
    return len(LEGACY_ORDER), -1


_UNRANKED = (len(LEGACY_ORDER) + 1, 0)  # a parameter outside the state dict: after every ranked one


def legacy_rank(model: nn.Module) -> dict[int, tuple[int, int]]:
    """id(parameter) -> its place in `LEGACY_ORDER` (the first of its state-dict keys there)."""
    ranks: dict[int, tuple[int, int]] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if isinstance(value, nn.Parameter):
            ranks[id(value)] = min(ranks.get(id(value), _UNRANKED), _key_rank(key))
    return ranks


def in_legacy_order(params: Iterable[nn.Parameter], ranks: dict[int, tuple[int, int]]) -> list[nn.Parameter]:
    """`params` sorted by `legacy_rank` (stable: equal ranks keep their order)."""
    return sorted(params, key=lambda p: ranks.get(id(p), _UNRANKED))


def ordered_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters in `LEGACY_ORDER` (what gradient clipping iterates over)."""
    return in_legacy_order((p for p in model.parameters() if p.requires_grad), legacy_rank(model))


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
    ranks = legacy_rank(model)
    groups = {k: in_legacy_order(v, ranks) for k, v in groups.items()}
    lrs = {"default": lr, "backbone": lr_backbone, "linear_proj": lr * lr_linear_proj_mult}
    return [{"name": k, "params": v, "lr": lrs[k], "weight_decay": weight_decay} for k, v in groups.items()]


def build_optimizer(model: nn.Module, lr: float, lr_backbone: float, lr_linear_proj_mult: float,
                    weight_decay: float) -> torch.optim.AdamW:
    groups = param_groups(model, lr, lr_backbone, lr_linear_proj_mult, weight_decay)
    if not any(g["params"] for g in groups):
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def parameter_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> its checkpoint name: the smallest of its state-dict keys (the official keys; a head shared
    by the decoder and the top level has several). Independent of the module tree's order."""
    names: dict[int, str] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if isinstance(value, nn.Parameter):
            names[id(value)] = min(names.get(id(value), key), key)
    return names


def optimizer_param_names(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[list[str]]:
    """The checkpoint names of every group's parameters, in the optimizer's order (saved with its state)."""
    names = parameter_names(model)
    return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]


def state_dict_order_names(model_state: dict, groups: list[list[str]]) -> list[list[str]]:
    """The optimizer order of a checkpoint that does not name its parameters (before format 3), when it took them
    as the model's state dict lists them (the detector before it was composed of parts): each tensor at its first
    key (shared tensors are found by their storage), named as `parameter_names` names it, kept where `groups`
    (the current optimizer's names) has it."""
    first: dict[tuple, str] = {}
    for key, t in model_state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        first[ident] = min(first.get(ident, key), key)
    members = [set(g) for g in groups]
    return [[n for n in first.values() if n in m] for m in members]


def align_optimizer_state(state: dict, saved: list[list[str]], current: list[list[str]]) -> dict:
    """`state` (optimizer.state_dict() of a checkpoint whose group g held the parameters named `saved[g]`, in that
    order) reordered so that `optimizer.load_state_dict` gives every current parameter (`current[g]`) the moments
    saved under its name: the parameter order may change with the module tree, the names do not."""
    if len(saved) != len(current) or len(state["param_groups"]) != len(current):
        raise ValueError(f"the checkpoint's optimizer has {len(state['param_groups'])} parameter groups, this one "
                         f"{len(current)}")
    groups = []
    for group, names, now in zip(state["param_groups"], saved, current):
        if len(names) != len(group["params"]) or sorted(names) != sorted(now):
            missing, extra = sorted(set(now) - set(names)), sorted(set(names) - set(now))
            raise ValueError(f"optimizer group {group.get('name', len(groups))!r}: the checkpoint holds other "
                             f"parameters (not in it: {missing[:3]}; only in it: {extra[:3]}, "
                             f"{len(names)} named for {len(group['params'])} saved)")
        by_name = dict(zip(names, group["params"]))
        groups.append({**group, "params": [by_name[n] for n in now]})
    return {"state": state["state"], "param_groups": groups}


def shapes_fit(state: dict, optimizer: torch.optim.Optimizer) -> bool:
    """Whether every saved moment, mapped by position as `load_state_dict` maps it, has its parameter's shape."""
    ids = [i for g in state["param_groups"] for i in g["params"]]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if len(ids) != len(params):
        return False
    return all(v.shape == p.shape for i, p in zip(ids, params)
               for v in state["state"].get(i, {}).values() if isinstance(v, torch.Tensor) and v.dim() > 0)


def checkpoint_optimizer_state(ckpt: dict, optimizer: torch.optim.Optimizer, model: nn.Module, source: str) -> dict:
    """The checkpoint's optimizer state in `optimizer`'s parameter order (`align_optimizer_state`). A checkpoint
    without parameter names (before format 3) holds them in `LEGACY_ORDER`, in its state dict's order, or (written
    by the composed detector before format 3) in module-tree order: the first whose moments all have their
    parameters' shapes is taken. CheckpointError naming `source` when none fits."""
    state, current = ckpt["optimizer"], optimizer_param_names(optimizer, model)
    if ckpt.get("optimizer_param_names") is not None:
        try:
            return align_optimizer_state(state, ckpt["optimizer_param_names"], current)
        except ValueError as e:
            raise CheckpointError(f"{source}: its optimizer state does not fit this model: {e}") from e
    names = parameter_names(model)
    tree_order = [names[id(p)] for p in model.parameters()]
    orders = [state_dict_order_names(ckpt["model"], current), [[n for n in tree_order if n in set(g)]
                                                                for g in current]]
    candidates = [state]
    for saved in orders:
        try:
            candidates.append(align_optimizer_state(state, saved, current))
        except ValueError:
            pass
    for candidate in candidates:
        if shapes_fit(candidate, optimizer):
            return candidate
    raise CheckpointError(f"{source}: its optimizer state does not fit this model's parameters (shapes differ in "
                          f"every known order); start from its weights with --checkpoint instead of --resume")


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

