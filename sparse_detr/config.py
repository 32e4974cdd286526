"""The configuration schema, YAML loading with `_base_` inheritance, and `key=value` overrides.

A config is a tree of dataclasses (`Config` → `model`, `loss`, `data`, `train`). YAML files name only the
fields they change; `_base_: other.yaml` (or a list) is merged first, relative to the file. Every key is
validated: an unknown or misspelled key, or a value of the wrong type, is a `ConfigError` that names the
key and the file it came from. The resolved config is saved with every checkpoint (`to_dict`).

    cfg = load_config("configs/sparse_detr_r50_rho0.1.yaml", ["model.rho=0.2", "train.epochs=12"])

This module imports nothing else of the project but `errors.py` (see the layer rules in the README).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Sequence, Union

import yaml

from sparse_detr.errors import UserError

__all__ = [
    "Config", "ModelConfig", "LossConfig", "DataConfig", "SyntheticConfig", "TrainConfig", "ConfigError",
    "load_config", "config_from_dict", "apply_overrides", "to_dict", "save_config",
]


class ConfigError(UserError, ValueError):
    """A config key or value is wrong; the message names the key and the file."""


@dataclass
class ModelConfig:
    """Architecture. Field names follow the official flags where there is one (e.g. `with_box_refine`)."""

    # swin_t: the official detection Swin-T; swin_t_torchvision: torchvision's swin_t as it is (format-1 checkpoints)
    backbone: Literal["resnet50", "swin_t", "swin_t_torchvision", "tiny_cnn"] = "resnet50"  # tiny_cnn: CPU demos
    pretrained_backbone: Optional[str] = None  # local ImageNet weights (torchvision or official Swin layout)
    init_weights: Optional[str] = None  # fine-tuning: a detector checkpoint, class heads fresh (engine/training/finetune.py)
    train_backbone: bool = True
    swin_drop_path_rate: float = 0.2
    hidden_dim: int = 256
    num_classes: int = 91  # number of class logits (COCO: 91 as the official checkpoints)
    nheads: int = 8
    num_feature_levels: int = 4
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 1024
    dropout: float = 0.1
    enc_n_points: int = 4
    dec_n_points: int = 4
    num_queries: int = 300
    num_select: int = 100  # detections kept per image by the postprocessor (top (query, class) pairs, no NMS)
    aux_loss: bool = True
    with_box_refine: bool = False
    two_stage: bool = False
    eff_query_init: bool = False  # queries = top-Q encoder tokens and their embeddings (Sparse DETR Sec. 3.4)
    eff_specific_head: bool = False  # class-specific two-stage head, objectness = max class logit
    rho: float = 0.0  # keep ratio of encoder tokens; 0 = dense Deformable DETR encoder
    # Optional budgets (models/selection.py): one ratio per feature level; one non-increasing ratio per encoder
    # layer starting at rho (a cascade: each layer keeps the best-scored part of the previous layer's set).
    rho_levels: Optional[list[float]] = None
    rho_layers: Optional[list[float]] = None
    use_enc_aux_loss: bool = False
    # How tokens are selected: a name registered in models/selection.py (SELECTORS, checked when the model is
    # built): dam (decoder attention map, official), os (objectness score), foreground (Focus-DETR), salience
    # (Salience-DETR), random (the control), or a criterion of your own (@register_selector).
    scorer_target: str = "dam"
    dam_alignment: Literal["official", "aligned"] = "official"  # official: half-pixel shift quirk
    scorer_padding: Literal["official", "exclude"] = "official"  # official: padding in mean and loss
    # official: the two-stage top-Q ranks padded / invalid tokens too; exclude: never picks them
    query_padding: Literal["official", "exclude"] = "official"
    # official: the two-stage and encoder-aux losses count every token and slot; exclude: only valid ones
    enc_loss_padding: Literal["official", "exclude"] = "official"


@dataclass
class LossConfig:
    """Loss weights and Hungarian matcher costs (defaults: the Deformable / Sparse DETR recipe)."""

    cls_loss_coef: float = 2.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    mask_prediction_coef: float = 1.0
    set_cost_class: float = 2.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0


@dataclass
class SyntheticConfig:
    """The built-in synthetic COCO-format dataset, generated when `root` is missing."""

    preset: Literal["demo", "cluttered"] = "demo"  # cluttered: many objects, distractors, textured background
    max_objects: int = 6  # objects per image: 1..max_objects
    num_train: int = 200
    num_val: int = 50
    min_size: int = 160
    max_size: int = 320
    seed: int = 0
    min_object_side: int = 14  # cluttered preset: smallest object side in pixels (higher = fewer small objects)
    max_object_scale: float = 0.95  # cluttered preset: largest object side, as a fraction of the short side


@dataclass
class DataConfig:
    """Where the data is and how it is augmented (defaults: the Deformable DETR COCO recipe)."""

    dataset: Literal["coco", "synthetic"] = "coco"
    root: str = "data/coco"
    train_images: str = "train2017"  # relative to root unless absolute
    train_annotations: str = "annotations/instances_train2017.json"
    val_images: str = "val2017"
    val_annotations: str = "annotations/instances_val2017.json"
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    train_scales: list[int] = field(default_factory=lambda: list(range(480, 801, 32)))
    max_size: int = 1333
    val_size: int = 800
    crop: bool = True
    crop_resize_sizes: list[int] = field(default_factory=lambda: [400, 500, 600])
    crop_min: int = 384
    crop_max: int = 600
    hflip: bool = True
    num_workers: int = 2
    # How category ids become class labels: "contiguous" = 0..K-1 in id order (custom datasets, no wasted logits);
    # "category_id" = the id itself, needs model.num_classes > max id (COCO + official checkpoints: 91 logits).
    label_mapping: Literal["contiguous", "category_id"] = "contiguous"
    # Batch images of similar aspect ratio together (as torchvision's detection references): less zero padding,
    # hence less compute spent on it and batches whose padding changes the features less (see the README).
    group_by_aspect_ratio: bool = False


@dataclass
class TrainConfig:
    """Optimisation, schedule, logging and checkpoints (defaults: the Deformable DETR COCO recipe)."""

    output_dir: str = "outputs/run"
    epochs: int = 50
    lr_drop_epochs: list[int] = field(default_factory=lambda: [40])
    lr_drop_factor: float = 0.1
    lr: float = 2e-4
    lr_backbone: float = 2e-5
    lr_linear_proj_mult: float = 0.1  # sampling_offsets / reference_points
    weight_decay: float = 1e-4
    batch_size: int = 2  # per process
    lr_scaling: Literal["none", "sqrt"] = "none"  # scale lr by sqrt(global batch / base_batch_size)
    base_batch_size: int = 16
    clip_max_norm: float = 0.1
    seed: int = 42
    deterministic: bool = False
    collective_timeout_s: float = 1800.0  # how long a process waits in a collective for the others (torchrun)
    amp: Literal["none", "bf16"] = "none"
    ema: bool = False
    ema_decay: float = 0.9997
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = 20
    checkpoint_every_iters: int = 0  # 0 = only at the end of each epoch
    eval_every_epochs: int = 1  # evaluate every N epochs and after the last one; 0 = never evaluate
    max_iters_per_epoch: int = 0  # 0 = the whole dataset; >0 shortens epochs (smoke tests)
    eval_batch_size: int = 2
    vis_num_images: int = 2  # images logged to tensorboard at each evaluation (0 = none)
    # CPU threads of torch in each process. auto: OMP_NUM_THREADS when set, else the cores this process may use
    # minus the load other processes put on them (at least 1), so a busy machine slows down instead of stalling.
    num_threads: Union[Literal["auto"], int] = "auto"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ---------------------------------------------------------------------------------------------------------
# Loading

def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        folder = os.path.dirname(path) or "."
        names = sorted(n for n in os.listdir(folder) if n.endswith((".yaml", ".yml"))) if os.path.isdir(folder) else []
        close = difflib.get_close_matches(os.path.basename(path), names, n=3, cutoff=0.6)
        hint = (f" (did you mean {', '.join(os.path.join(folder, n) for n in close)}?)" if close else
                f"; {folder} holds {', '.join(names)}" if names else "")
        raise ConfigError(f"config file not found: {path}{hint}")
    with open(path, "r", encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def _merge(base: dict, new: dict, origin: dict, path: str, prefix: str = "") -> None:
    """Merge `new` into `base` in place; record in `origin` which file set each leaf key."""
    for key, value in new.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, origin, path, dotted + ".")
        else:
            base[key] = value
            origin[dotted] = path
            if isinstance(value, dict):
                for sub in _leaves(value, dotted + "."):
                    origin[sub] = path


def _leaves(d: dict, prefix: str) -> list[str]:
    out = []
    for k, v in d.items():
        out.append(prefix + k)
        if isinstance(v, dict):
            out.extend(_leaves(v, prefix + k + "."))
    return out


def _load_tree(path: str, origin: dict, seen: tuple = ()) -> dict:
    path = os.path.abspath(path)
    if path in seen:
        raise ConfigError(f"{path}: `_base_` cycle through {' -> '.join(seen)}")
    raw = _read_yaml(path)
    bases = raw.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list):
        raise ConfigError(f"{path}: `_base_` must be a file name or a list of them")
    merged: dict = {}
    for b in bases:
        b_path = b if os.path.isabs(b) else os.path.join(os.path.dirname(path), b)
        _merge(merged, _load_tree(b_path, origin, seen + (path,)), origin, b_path)
    _merge(merged, raw, origin, path)
    return merged


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. model.rho=0.2")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from e
    return key.split("."), value


def _check_value(value: Any, tp: Any, key: str, where: str) -> Any:
    """Validate (and lightly coerce: int -> float, list -> tuple-free list) one value against a type."""
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_value(value, a, key, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: `{key}` has an invalid value {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: `{key}` must be one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: `{key}` must be a list, got {value!r}")
        return [_check_value(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: `{key}` must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: `{key}` must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads `1e-4` (no dot) as a string; accept what Python reads as a float
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: `{key}` must be a number, got {value!r}")
        if not math.isfinite(value):  # `.inf`, `nan`, `1e999`: no float field has a use for them
            raise ConfigError(f"{where}: `{key}` must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: `{key}` must be a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: `{key}`: unsupported type {tp}")  # pragma: no cover - schema bug


def _build(cls: type, data: dict, origin: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        where = origin.get(dotted, "<defaults>")
        if key not in names:
            close = [n for n in names if n.lower() == str(key).lower() or _similar(n, str(key))]
            hint = f" (did you mean `{prefix}{close[0]}`?)" if close else ""
            raise ConfigError(f"{where}: unknown key `{dotted}`{hint}; allowed under "
                              f"`{prefix.rstrip('.') or 'top level'}`: {sorted(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: `{dotted}` must be a mapping")
            kwargs[key] = _build(tp, value, origin, dotted + ".")
        else:
            kwargs[key] = _check_value(value, tp, dotted, where)
    return cls(**kwargs)


def _similar(a: str, b: str) -> bool:
    """Cheap typo detector: same length ±1 and at most two differing characters."""
    if abs(len(a) - len(b)) > 1:
        return False
    import difflib
    return difflib.SequenceMatcher(None, a, b).ratio() >= 0.8


def config_from_dict(data: dict, origin: Optional[dict] = None) -> Config:
    """Build and validate a `Config` from a nested dict (e.g. the one saved in a checkpoint)."""
    cfg = _build(Config, data, origin or {})
    validate(cfg)
    return cfg


def load_config(path: str, overrides: Sequence[str] = ()) -> Config:
    """Load `path` (with its `_base_` chain), apply `key=value` overrides, validate, return a `Config`."""
    origin: dict = {}
    data = _load_tree(path, origin)
    apply_overrides(data, overrides, origin)
    return config_from_dict(data, origin)


def apply_overrides(data: dict, overrides: Sequence[str], origin: Optional[dict] = None) -> dict:
    """Apply `key=value` overrides to a nested config dict in place (values parsed as YAML); returns `data`."""
    for item in overrides:
        keys, value = _parse_override(item)
        node = data
        for depth, k in enumerate(keys[:-1], 1):
            if k not in node and origin is not None:  # a section only this override names (maybe a typo)
                origin.setdefault(".".join(keys[:depth]), f"command-line override {item!r}")
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: `{k}` is not a section")
        node[keys[-1]] = value
        if origin is not None:
            origin[".".join(keys)] = f"command-line override {item!r}"
    return data


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Cross-field and range checks that a type alone cannot express (the message names the key)."""
    m, d, t = cfg.model, cfg.data, cfg.train
    _require(t.collective_timeout_s > 0, f"train.collective_timeout_s must be > 0, got {t.collective_timeout_s}")
    # Sizes first: the divisibility checks below would divide by zero.
    for name in ("hidden_dim", "nheads", "dim_feedforward", "enc_layers", "dec_layers", "enc_n_points",
                 "dec_n_points", "num_queries", "num_classes", "num_select"):
        _require(getattr(m, name) >= 1, f"model.{name} must be >= 1, got {getattr(m, name)}")
    _require(0.0 <= m.rho <= 1.0, f"model.rho must be in [0, 1], got {m.rho}")
    _require(0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1), got {m.dropout}")
    _require(0.0 <= m.swin_drop_path_rate < 1.0, f"model.swin_drop_path_rate must be in [0, 1), got "
                                                  f"{m.swin_drop_path_rate}")
    _require(m.hidden_dim % m.nheads == 0,
             f"model.hidden_dim ({m.hidden_dim}) must be divisible by model.nheads ({m.nheads})")
    _require(m.hidden_dim % 32 == 0, f"model.hidden_dim ({m.hidden_dim}) must be a multiple of 32 (GroupNorm(32))")
    _require(1 <= m.num_feature_levels <= 4, f"model.num_feature_levels must be 1..4, got {m.num_feature_levels}")
    _require(m.rho == 0 or m.two_stage, "model.rho > 0 (Sparse DETR) needs model.two_stage: true")
    _require(not m.eff_query_init or m.two_stage, "model.eff_query_init needs model.two_stage: true")
    _require(not m.use_enc_aux_loss or m.rho > 0,
             "model.use_enc_aux_loss needs model.rho > 0 (aux heads score the kept tokens)")
    # model.scorer_target is ignored by a dense encoder (rho 0): it keeps every token and has no selector.
    if m.rho_levels is not None:
        _require(m.rho > 0, "model.rho_levels needs model.rho > 0 (a sparse encoder)")
        _require(len(m.rho_levels) == m.num_feature_levels,
                 f"model.rho_levels needs one ratio per feature level ({m.num_feature_levels}), got {m.rho_levels}")
        _require(all(0 < r <= 1 for r in m.rho_levels), f"model.rho_levels must lie in (0, 1], got {m.rho_levels}")
    if m.rho_layers is not None:
        _require(m.rho > 0, "model.rho_layers needs model.rho > 0 (a sparse encoder)")
        _require(len(m.rho_layers) == m.enc_layers,
                 f"model.rho_layers needs one ratio per encoder layer ({m.enc_layers}), got {m.rho_layers}")
        _require(all(0 < r <= 1 for r in m.rho_layers), f"model.rho_layers must lie in (0, 1], got {m.rho_layers}")
        _require(m.rho_layers[0] == m.rho, f"model.rho_layers[0] must equal model.rho ({m.rho}), got {m.rho_layers}")
        _require(all(b <= a for a, b in zip(m.rho_layers, m.rho_layers[1:])),
                 f"model.rho_layers must be non-increasing, got {m.rho_layers}")

    _require(d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}")
    _require(bool(d.train_scales) and min(d.train_scales) >= 1, "data.train_scales must be positive sizes")
    for name in ("max_size", "val_size", "crop_min", "crop_max"):
        _require(getattr(d, name) >= 1, f"data.{name} must be >= 1, got {getattr(d, name)}")
    _require(d.crop_min <= d.crop_max, f"data.crop_min ({d.crop_min}) must be <= data.crop_max ({d.crop_max})")

    for name in ("batch_size", "epochs", "eval_batch_size", "base_batch_size", "log_every"):
        _require(getattr(t, name) >= 1, f"train.{name} must be >= 1, got {getattr(t, name)}")
    # 0 is meaningful for these: never checkpoint mid-epoch / never evaluate / whole epochs / no images.
    for name in ("checkpoint_every_iters", "eval_every_epochs", "max_iters_per_epoch", "vis_num_images"):
        _require(getattr(t, name) >= 0, f"train.{name} must be >= 0, got {getattr(t, name)}")
    _require(t.num_threads == "auto" or t.num_threads >= 1, f"train.num_threads must be auto or >= 1, got "
                                                             f"{t.num_threads}")
    _require(0.0 < t.ema_decay < 1.0, f"train.ema_decay must be in (0, 1), got {t.ema_decay}")
    _require(t.lr > 0, f"train.lr must be > 0, got {t.lr}")
    _require(t.lr_backbone >= 0, f"train.lr_backbone must be >= 0, got {t.lr_backbone}")
    for name in ("weight_decay", "clip_max_norm", "lr_linear_proj_mult", "lr_drop_factor"):
        _require(getattr(t, name) >= 0, f"train.{name} must be >= 0, got {getattr(t, name)}")
    _require(t.lr_drop_epochs == sorted(t.lr_drop_epochs),
             f"train.lr_drop_epochs must be increasing, got {t.lr_drop_epochs}")


def to_dict(cfg: Config) -> dict:
    """The resolved config as plain data (what checkpoints and the output folder store)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
