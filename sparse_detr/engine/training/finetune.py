"""Fine-tuning: start a detector from another detector's checkpoint, e.g. a COCO model onto your own classes.

``model.init_weights: PATH`` (a checkpoint of ours, or an official one: its Swin-T backbone keys are renamed on the
fly) initialises a new run: every tensor whose name and shape match the model is loaded; the class heads (every
decoder layer's, the two-stage head's, the encoder aux heads' and the objectness head's ``class_embed``) keep the
initialisation of a fresh model, the focal prior bias included, since their classes are other ones; the rest of
the checkpoint (an optimizer, a schedule, a step) is not read. Distinct from ``--resume`` (which continues a run)
and from ``tools/train.py --checkpoint`` (the same architecture and classes). ``init_from_checkpoint`` returns a
short report of what was loaded, re-initialised and ignored.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sparse_detr.engine.checkpoint import CheckpointError, load_checkpoint

__all__ = ["CLASS_HEAD", "is_class_head", "init_from_checkpoint", "format_init_report"]

CLASS_HEAD = "class_embed"  # class_embed.*, transformer.{decoder,encoder}.class_embed.*, backbone_class_embed


def is_class_head(name: str) -> bool:
    """Whether a state-dict key belongs to a class head (its rows are the classes)."""
    return any(part.endswith(CLASS_HEAD) for part in name.split("."))


def init_from_checkpoint(model: nn.Module, path: str) -> dict[str, Any]:
    """Load the tensors of ``path`` that fit ``model`` except the class heads (module docstring). Returns
    {"loaded": [...], "reinitialised": [...], "kept": [...] model tensors absent or of another shape in the
    file, "ignored": [...] file tensors the model has no use for, "elements": loaded elements}."""
    ckpt = load_checkpoint(path)
    weights = ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(weights, dict) or not weights:
        raise CheckpointError(f"{path}: no model weights (a detector checkpoint has them under 'model')")
    own = model.state_dict()
    loaded, heads, kept = [], [], []
    for name, tensor in own.items():
        if is_class_head(name):
            heads.append(name)
        elif name in weights and tuple(weights[name].shape) == tuple(tensor.shape):
            loaded.append(name)
        else:
            kept.append(f"{name}" + (f" (file {tuple(weights[name].shape)}, model {tuple(tensor.shape)})"
                                     if name in weights else " (not in the file)"))
    if not loaded:
        raise CheckpointError(f"{path}: none of its tensors fits this model (another backbone or width?); "
                              f"model.init_weights needs a detector of the same architecture")
    with torch.no_grad():
        for name in loaded:
            own[name].copy_(weights[name].to(own[name].dtype))
    ignored = [k for k in weights if k not in own]
    return {"loaded": loaded, "reinitialised": heads, "kept": kept, "ignored": ignored,
            "elements": sum(own[k].numel() for k in loaded)}


def format_init_report(path: str, report: dict[str, Any], limit: int = 4) -> str:
    def few(items: list) -> str:
        return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")

    lines = [f"model.init_weights {path}: loaded {len(report['loaded'])} tensors ({report['elements']:,} elements)",
             f"  re-initialised as at the start of training (class heads): {len(report['reinitialised'])}"
             + (f": {few(report['reinitialised'])}" if report["reinitialised"] else "")]
    if report["kept"]:
        lines.append(f"  left at their initial values (absent or of another shape): {len(report['kept'])}: "
                     f"{few(report['kept'])}")
    if report["ignored"]:
        lines.append(f"  ignored (not in this model): {len(report['ignored'])}: {few(report['ignored'])}")
    return "\n".join(lines)
