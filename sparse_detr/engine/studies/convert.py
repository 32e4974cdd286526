"""Convert an official Sparse DETR / Deformable DETR checkpoint into one of ours, checked against a config.

The official files hold the weights under ``model`` (plus ``optimizer``, ``lr_scheduler``, ``epoch``, ``args``,
which are ignored). Their R50 and non-backbone keys already are ours; the Swin-T backbone keys are renamed by
``load_checkpoint`` (models/swin.py ``official_to_ours``). The result is checked against the model built from the
config — every missing, unexpected or mis-shaped key is listed — and written with the config, so that
``tools/eval.py`` and ``tools/train.py --checkpoint`` read it like any checkpoint of ours.
"""
from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from sparse_detr.config import Config, to_dict
from sparse_detr.engine.checkpoint import SWIN_RENAMED, CheckpointError, load_checkpoint, save_checkpoint
from sparse_detr.models import build_detector

__all__ = ["StateDictMismatch", "state_dict_problems", "convert_official", "extract_backbone"]


class StateDictMismatch(RuntimeError):
    """A state dict does not fit the model: missing, unexpected or mis-shaped keys (all listed)."""


def state_dict_problems(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """One line per problem of loading ``state`` into ``model`` strictly; empty when it fits exactly."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)}, model {tuple(v.shape)}"
              for k, v in own.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    lines = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
        if items:
            lines.append(f"{title} ({len(items)}):")
            lines += [f"  {item}" for item in items]
    return lines


def convert_official(src: str, dst: str, cfg: Config, config_name: str = "the config") -> dict:
    """Read ``src`` (official or ours), check its ``model`` against ``build_detector(cfg.model)`` and write ``dst``.

    Raises FileExistsError if ``dst`` exists (nothing is overwritten), StateDictMismatch listing every key that
    does not fit. Returns a summary: ``tensors`` and ``elements`` written, ``swin_renamed`` (official Swin-T
    backbone keys were renamed to ours).
    """
    if os.path.exists(dst):
        raise FileExistsError(f"{dst} exists; choose another output path (nothing was written)")
    with warnings.catch_warnings(record=True) as caught:  # the renaming notice: reported in the summary instead
        warnings.simplefilter("always")
        ckpt = load_checkpoint(src)
    for w in caught:
        if SWIN_RENAMED not in str(w.message):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    state = ckpt["model"]
    model = build_detector(cfg.model)
    problems = state_dict_problems(model, state)
    if problems:
        raise StateDictMismatch(f"{src} does not fit {config_name} (model.backbone={cfg.model.backbone}):\n"
                                + "\n".join(problems))
    model.load_state_dict(state, strict=True)
    save_checkpoint(dst, {"model": state, "config": to_dict(cfg), "converted_from": os.path.abspath(src)})
    return {"tensors": len(state), "elements": sum(v.numel() for v in state.values()),
            "swin_renamed": any(SWIN_RENAMED in str(w.message) for w in caught)}


BACKBONE_PREFIX = "backbone.0.body."  # the backbone network inside our detector (Joiner[0].body)


def extract_backbone(src: str, dst: str) -> int:
    """Write the backbone network of a checkpoint of ours as a state dict that ``model.pretrained_backbone``
    loads (the layout of the network itself, e.g. ``TinyCNN``); ``dst`` must not exist. Returns the tensor count.

    Used to start several runs from one pretrained backbone (docs/ablation.md), as the paper's runs start from an
    ImageNet backbone.
    """
    if os.path.exists(dst):
        raise CheckpointError(f"{dst} exists: choose another output path")
    state = load_checkpoint(src)["model"]
    body = {k[len(BACKBONE_PREFIX):]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}
    if not body:
        raise CheckpointError(f"{src} has no backbone tensors (no keys under {BACKBONE_PREFIX})")
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    torch.save(body, dst + ".tmp")
    os.replace(dst + ".tmp", dst)
    return len(body)
