"""Load a trained model for inference: the config, the weights and the label map of a checkpoint.

Every tool that reads a checkpoint (eval, predict, visualize, export) goes through `load_for_inference` (or
`resolve_config` + `load_weights`), so a checkpoint that does not fit the config gets the same short report
everywhere, before any data is read:

    loaded = load_for_inference("outputs/demo_synthetic/checkpoint_best.pth")             # config from the file
    loaded = load_for_inference(ckpt, "configs/demo_synthetic.yaml", ["model.rho=0.2"])     # checked against it
    loaded.model, loaded.postprocessor, loaded.cfg, loaded.label_map

A checkpoint stores its resolved config (`checkpoint.py`), so the config is optional. When one is given, its
architecture must match the checkpoint's (`check_config_compatible`: the fields that differ, one line each); weights
that still do not fit (e.g. converted official weights without a stored config) are summarised in a few lines
instead of `load_state_dict`'s full key listing.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from sparse_detr.config import Config, ConfigError, apply_overrides, config_from_dict, load_config, to_dict
from sparse_detr.data.coco import LabelMap
from sparse_detr.engine.checkpoint import ConfigMismatchError, check_config_compatible, load_checkpoint

__all__ = ["LoadedModel", "resolve_config", "checkpoint_weights", "load_weights", "load_for_inference"]

# The weights come from the checkpoint: a pretrained-backbone file of the training machine is not needed (and
# usually not there).
_INFERENCE_OVERRIDES = ("model.pretrained_backbone=null", "model.init_weights=null")


@dataclass
class LoadedModel:
    """A model ready for inference (eval mode, on its device) and what describes it."""

    cfg: Config
    model: nn.Module
    postprocessor: nn.Module
    label_map: Optional[LabelMap]
    checkpoint: str


def _leaf_origins(data: dict, where: str, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        out[f"{prefix}{key}"] = where
        if isinstance(value, dict):
            out.update(_leaf_origins(value, where, f"{prefix}{key}."))
    return out


def resolve_config(state: dict, checkpoint: str, config: Union[None, str, Config] = None,
                   overrides: Sequence[str] = ()) -> Config:
    """The config to run a checkpoint with: `config` (a path or a `Config`) if given, else the one stored in the
    checkpoint; `key=value` overrides apply to either. Raises ConfigMismatchError (the differing architecture
    fields) when the config does not match the checkpoint, ConfigError when there is no config at all."""
    stored = state.get("config")
    if config is None:
        if not stored:
            raise ConfigError(f"{checkpoint} stores no config (e.g. converted official weights): pass --config")
        data = copy.deepcopy(stored)
        origin = _leaf_origins(data, f"the config stored in {checkpoint}")
        cfg = config_from_dict(apply_overrides(data, list(overrides), origin), origin)
    elif isinstance(config, Config):
        cfg = config if not overrides else config_from_dict(apply_overrides(to_dict(config), list(overrides)))
    else:
        cfg = load_config(config, list(overrides))
    check_config_compatible(stored, to_dict(cfg), checkpoint)
    return cfg


def checkpoint_weights(state: dict, checkpoint: str, use_ema: bool = False) -> dict:
    """The model state dict of a checkpoint: its raw weights, or its EMA weights."""
    if not use_ema:
        return state["model"]
    if state.get("ema") is None:
        raise ValueError(f"{checkpoint} has no EMA weights (trained with train.ema=false)")
    # AveragedModel's state_dict: the averaged module under "module." plus its update counter.
    return {k[len("module."):]: v for k, v in state["ema"].items() if k.startswith("module.")}


def _examples(names: list, limit: int = 3) -> str:
    shown = ", ".join(str(n) for n in names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def load_weights(model: nn.Module, weights: dict, checkpoint: str) -> None:
    """`model.load_state_dict(weights)`, with a short ConfigMismatchError when they do not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    reshaped = [f"{k} {tuple(weights[k].shape)} vs {tuple(own[k].shape)}" for k in own
                if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or reshaped:
        lines = [f"{checkpoint}: its weights do not fit the model the config builds:"]
        if missing:
            lines.append(f"  {len(missing)} missing: {_examples(missing)}")
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected: {_examples(unexpected)}")
        if reshaped:
            lines.append(f"  {len(reshaped)} of another shape (checkpoint vs model): {_examples(reshaped)}")
        lines.append("(use the config the checkpoint was trained with, or leave --config out to use its own)")
        raise ConfigMismatchError("\n".join(lines))
    model.load_state_dict(weights)


def load_for_inference(checkpoint: str, config: Union[None, str, Config] = None, overrides: Sequence[str] = (),
                       device: Union[str, torch.device] = "cpu", use_ema: bool = False,
                       state: Optional[dict[str, Any]] = None) -> LoadedModel:
    """Read `checkpoint` (weights_only), resolve and check the config, build the model, load the weights.
    `state`: the checkpoint already read (avoids a second read)."""
    from sparse_detr.models import build_model  # deferred: data-only tools need not import the model

    state = load_checkpoint(checkpoint) if state is None else state
    cfg = resolve_config(state, checkpoint, config, list(overrides) + list(_INFERENCE_OVERRIDES))
    model, _, postprocessor = build_model(cfg)
    load_weights(model, checkpoint_weights(state, checkpoint, use_ema), checkpoint)
    label_map = LabelMap.from_dict(state["label_map"]) if state.get("label_map") else None
    return LoadedModel(cfg=cfg, model=model.to(device).eval(), postprocessor=postprocessor, label_map=label_map,
                       checkpoint=checkpoint)
