"""Checkpoints: versioned plain dicts, written atomically, read only with `weights_only=True`.

A checkpoint holds everything a run needs to continue at the exact iteration:

    format_version  int, FORMAT_VERSION
    model           state_dict of the unwrapped model
    optimizer       optimizer.state_dict()
    optimizer_param_names  per group, the checkpoint names of its parameters in the optimizer's order
    lr_scheduler    {"last_epoch", "step_count"} (milestones come from the config, see optim.scheduler_state)
    scaler          GradScaler state or None (bf16 needs no scaler)
    ema             state_dict of the EMA model, or None
    epoch           the epoch to continue (0-based); with step_in_epoch == 0 it has not started
    step_in_epoch   batches of `epoch` already trained
    iteration       optimizer steps done in total (the global step)
    rng             per-rank list of RNG states (python, numpy, torch CPU, CUDA), stored as tensors/lists
    config          the resolved config (plain dict)
    label_map       the dataset's LabelMap.to_dict()
    best_ap, metrics

Only tensors, plain containers, numbers, strings and None are stored, so `torch.load(weights_only=True)` can read
it back and a checkpoint can never execute code on load. Writing goes to a temporary file in the same folder, is
fsync'ed, then renamed over the old file (`os.replace` is atomic on POSIX), and the folder is fsync'ed: a crash or
SIGKILL at any moment leaves either the previous checkpoint or the new one, never a torn file.

Format history, upgraded on load (`_upgrade`): 2 — `model.backbone: swin_t` is the official detection Swin-T
(models/swin.py); a format-1 `swin_t` checkpoint holds torchvision's swin_t, now called `swin_t_torchvision`.
3 — `best_ap` and `metrics` in percent (engine/metrics.py); older ones hold COCO fractions. The optimizer's
parameters are named (`optimizer_param_names`), so a resume maps the moments by name (training/optim.py); older
checkpoints are mapped by the order they were written in (training/optim.py `checkpoint_optimizer_state`).
Files without a version (official releases) have their official Swin-T backbone keys renamed to ours.
"""
from __future__ import annotations

import argparse
import copy
import os
import random
import warnings
from typing import Any, Optional

import numpy as np
import torch

from sparse_detr.engine.atomic import write_atomic
from sparse_detr.engine.metrics import metrics_in_percent, percent
from sparse_detr.models.selection import SELECTORS
from sparse_detr.models.swin import has_official_swin_keys, official_to_ours
from sparse_detr.errors import UserError

__all__ = [
    "FORMAT_VERSION", "LAYOUT_FIELDS", "LAST", "BEST", "ConfigMismatchError", "CheckpointError",
    "CheckpointNotFoundError", "save_checkpoint", "load_checkpoint", "check_resumable", "check_config_compatible",
    "find_last_checkpoint", "get_rng_state", "set_rng_state",
]

FORMAT_VERSION = 3
SWIN_RENAMED = "official Swin-T checkpoint: backbone keys renamed to ours"
LAST = "checkpoint_last.pth"
BEST = "checkpoint_best.pth"

# `model.*` fields that change the parameter layout (names or shapes of the state_dict). Everything else
# (dropout, aux_loss, eff_specific_head, padding and alignment options, pretrained path, ...) may differ between
# the checkpoint and the run: the weights still fit. Three fields matter only in some configurations, see
# `_layout_view`. tests/test_checkpoint.py checks all of this against the real `build_detector`.
LAYOUT_FIELDS = (
    "backbone", "hidden_dim", "num_classes", "nheads", "num_feature_levels", "enc_layers", "dec_layers",
    "dim_feedforward", "enc_n_points", "dec_n_points", "num_queries", "with_box_refine", "two_stage",
    "eff_query_init", "use_enc_aux_loss", "rho", "scorer_target",
)


class ConfigMismatchError(UserError, ValueError):
    """The checkpoint was trained with a different architecture than the config asks for."""


class CheckpointError(UserError, RuntimeError):
    """The file is not a (resumable) checkpoint of ours: truncated, corrupt, foreign, newer or weights only."""


class CheckpointNotFoundError(UserError, FileNotFoundError):
    """No file at the checkpoint path."""


# What `--resume` needs beyond the weights (a file saved as {"model": ...} has the weights only).
RESUME_KEYS = ("optimizer", "lr_scheduler", "epoch", "step_in_epoch", "iteration")


# ---------------------------------------------------------------------------------------------------------
# RNG states as weights_only-safe data

def get_rng_state() -> dict:
    """This process's RNG states. Python's and numpy's Mersenne-Twister keys become int64 tensors."""
    py_version, py_key, py_gauss = random.getstate()
    np_kind, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": int(py_version), "key": torch.tensor(py_key, dtype=torch.int64),
                   "gauss": None if py_gauss is None else float(py_gauss)},
        "numpy": {"kind": str(np_kind), "key": torch.from_numpy(np.asarray(np_key, dtype=np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
        # Only the current device: get_rng_state_all() would create a CUDA context on every visible GPU from
        # every process.
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
    }
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["key"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["key"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["gauss"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------------------------------------
# Saving and loading

def _check_plain(obj: Any, where: str) -> None:
    """Refuse, at save time, anything `weights_only=True` could not load back (better than a checkpoint that
    only fails when someone needs it)."""
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor, torch.dtype, torch.device)):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"checkpoint: key {k!r} at {where} is a {type(k).__name__}, not str/int")
            _check_plain(v, f"{where}.{k}")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"checkpoint: {where} is a {type(obj).__module__}.{type(obj).__name__}; only tensors, "
                    f"plain containers, numbers, strings and None can be loaded with weights_only=True")


def save_checkpoint(path: str, state: dict) -> None:
    """Write `state` to `path` atomically (see the module docstring). The previous file stays intact until the
    new one is complete on disk; on any error the temporary file is removed and the error propagates."""
    state = {"format_version": FORMAT_VERSION, **state}
    _check_plain(state, "state")
    write_atomic(path, lambda f: torch.save(state, f), binary=True)


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint on the CPU with `weights_only=True`.

    Raises FileNotFoundError (missing), RuntimeError (truncated, corrupt, not a checkpoint of ours, or from a newer
    format), each naming the file."""
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"checkpoint not found: {path}")
    try:
        # The official checkpoints store their argparse flags as a Namespace (plain attributes, safe to build).
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip/pickle/unpickler errors come in many types; all mean "unreadable"
        raise CheckpointError(f"cannot read checkpoint {path} (truncated, corrupt, or not loadable with "
                           f"weights_only=True): {type(e).__name__}: {e}") from e
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a sparse-detr checkpoint (no 'model' entry)")
    version = state.get("format_version", 0)
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {version}; this code reads up to {FORMAT_VERSION}")
    return _upgrade(state, path)


def _upgrade(state: dict, path: str) -> dict:
    """Bring an older checkpoint to FORMAT_VERSION (see the module docstring); the file itself is not changed."""
    version = state.get("format_version", 0)
    prefix = "backbone.0.body."
    if version == 0 and isinstance(state["model"], dict) and has_official_swin_keys(state["model"], prefix):
        state = {**state, "model": official_to_ours(state["model"], prefix)}
        warnings.warn(f"{path}: {SWIN_RENAMED} on load (tools/convert_official.py converts the file once)",
                      stacklevel=3)
    model_cfg = (state.get("config") or {}).get("model") or {}
    if version == 1 and model_cfg.get("backbone") == "swin_t":
        state = {**state, "config": copy.deepcopy(state["config"])}
        state["config"]["model"]["backbone"] = "swin_t_torchvision"
        warnings.warn(f"{path}: format-1 Swin-T checkpoint, trained with torchvision's swin_t: evaluate or resume it "
                      f"with model.backbone=swin_t_torchvision (model.backbone=swin_t is now the official Swin-T)",
                      stacklevel=3)
    if 0 < version < 3:  # official files (version 0) hold no metrics
        state = {**state, "best_ap": percent(state.get("best_ap", -1.0)),
                 "metrics": metrics_in_percent(state.get("metrics"))}
    return state


def check_resumable(state: dict, path: str) -> None:
    """Raise CheckpointError when `state` lacks what `--resume` restores (optimizer, schedule, position)."""
    missing = [k for k in RESUME_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path} holds model weights only (no {', '.join(missing)}), so it cannot be resumed; "
                              f"start a new training from these weights with --checkpoint {path}")


def _layout_view(model_cfg: dict) -> dict:
    """The layout-relevant part of a model config, with the conditional fields resolved."""
    view = {k: model_cfg.get(k) for k in LAYOUT_FIELDS}
    scorer = float(model_cfg.get("rho", 0.0)) > 0.0
    view["rho"] = "> 0 (token scorer)" if scorer else "0 (no token scorer)"  # its value is free: 0.1 -> 0.3 loads
    # What the selector's parameters are (dam / foreground / salience share one scorer), only when there is one.
    target = view["scorer_target"]
    view["scorer_target"] = (SELECTORS[target].layout if target in SELECTORS else target) if scorer else None
    if view["two_stage"]:
        view["num_queries"] = None  # two-stage queries are top-k proposals: no query embedding, k is free
    return view


def check_config_compatible(ckpt_cfg: Optional[dict], cfg: dict, source: str = "checkpoint") -> None:
    """Raise ConfigMismatchError listing every `model.*` field that changes the parameter layout and differs
    between the checkpoint's config and the current one. Both are plain config dicts (`config.to_dict`)."""
    if not ckpt_cfg or "model" not in ckpt_cfg:
        return  # e.g. converted official weights: nothing to compare, load_state_dict(strict=True) still checks
    old, new = _layout_view(ckpt_cfg["model"]), _layout_view(cfg["model"])
    diffs = [f"model.{k}: {source} has {old[k]!r}, config has {new[k]!r}" for k in old if old[k] != new[k]]
    if diffs:
        raise ConfigMismatchError(f"{source} does not match the config's architecture:\n  " + "\n  ".join(diffs)
                                  + "\n(use the config the checkpoint was trained with, or override these fields)")


# What a resumed run may change: where and how fast it runs, how long and how often it evaluates and logs.
RESUMABLE_CHANGES = ("train.epochs", "train.lr_drop_epochs", "train.eval_every_epochs", "train.num_threads",
                     "train.output_dir", "train.log_every", "train.checkpoint_every_iters", "train.vis_num_images",
                     "train.eval_batch_size", "data.root", "data.num_workers", "model.pretrained_backbone",
                     "model.init_weights", "train.collective_timeout_s")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_resume_config(ckpt_cfg: Optional[dict], cfg: dict, source: str = "checkpoint") -> None:
    """Raise ConfigMismatchError listing every field but ``RESUMABLE_CHANGES`` that differs between the config a
    run was trained with and the one it is resumed with (a resumed run would otherwise silently continue as
    another experiment, e.g. with another model.rho)."""
    if not ckpt_cfg:
        return
    old, new = _flat(ckpt_cfg), _flat(cfg)
    diffs = [f"{k}: {source} has {old.get(k, '<missing>')!r}, the config now has {new.get(k, '<missing>')!r}"
             for k in sorted(set(old) | set(new)) if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k)
             and not (k not in old and new[k] is None)]  # a field added since, at its default (off)
    if diffs:
        raise ConfigMismatchError(
            f"cannot resume {source} with a changed config (only {', '.join(RESUMABLE_CHANGES)} may change):\n  "
            + "\n  ".join(diffs) + "\n(resume with the run's own config.yaml, or start a new run in another "
            "train.output_dir)")


def find_last_checkpoint(output_dir: str) -> Optional[str]:
    """The path of `checkpoint_last.pth` in `output_dir`, or None when there is none (for `--resume auto`)."""
    path = os.path.join(output_dir, LAST)
    return path if os.path.isfile(path) else None
