"""Optimiser parameter groups, lr scaling, the epoch step schedule and its restore, the EMA update."""
from pathlib import Path

import pytest
import torch
from torch import nn

from sparse_detr.engine.training.optim import (build_ema, build_lr_scheduler, build_optimizer, restore_scheduler,
                                      scaled_lr, scheduler_state)


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.sampling_offsets = nn.Linear(4, 4)
        self.value_proj = nn.Linear(4, 4)


class _Body(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.frozen = nn.Conv2d(4, 4, 1)
        self.frozen.requires_grad_(False)


class _Transformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.reference_points = nn.Linear(4, 2)
        self.attn = _Attn()


class _Toy(nn.Module):
    """The parameter names of the real model that the groups key off."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.ModuleList([nn.Module()])
        self.backbone[0].body = _Body()
        self.transformer = _Transformer()
        self.class_embed = nn.Linear(4, 3)
        self.bbox_embed = nn.ModuleList([self.class_embed, self.class_embed])  # a shared module: one parameter


def _group_of(optimizer):
    return {id(p): g["name"] for g in optimizer.param_groups for p in g["params"]}


def test_param_groups_get_the_official_lrs():
    model = _Toy()
    opt = build_optimizer(model, lr=2e-4, lr_backbone=2e-5, lr_linear_proj_mult=0.1, weight_decay=1e-4)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == pytest.approx({"default": 2e-4, "backbone": 2e-5, "linear_proj": 2e-5})
    assert all(g["weight_decay"] == 1e-4 for g in opt.param_groups)
    where = _group_of(opt)
    expected = {
        "backbone.0.body.conv.weight": "backbone", "backbone.0.body.conv.bias": "backbone",
        "transformer.reference_points.weight": "linear_proj", "transformer.reference_points.bias": "linear_proj",
        "transformer.attn.sampling_offsets.weight": "linear_proj",
        "transformer.attn.sampling_offsets.bias": "linear_proj",
        "transformer.attn.value_proj.weight": "default", "class_embed.weight": "default",
    }
    named = dict(model.named_parameters())
    for name, group in expected.items():
        assert where[id(named[name])] == group, name
    # Frozen parameters are left out; shared ones appear once.
    assert id(model.backbone[0].body.frozen.weight) not in where
    assert sum(len(g["params"]) for g in opt.param_groups) == len(set(where))
    assert len(where) == sum(1 for p in model.parameters() if p.requires_grad)


def test_frozen_backbone_keeps_an_empty_group():
    model = _Toy()
    model.backbone.requires_grad_(False)
    opt = build_optimizer(model, lr=1e-3, lr_backbone=1e-4, lr_linear_proj_mult=0.1, weight_decay=0.0)
    assert [g["name"] for g in opt.param_groups] == ["default", "backbone", "linear_proj"]
    assert opt.param_groups[1]["params"] == []


def test_sqrt_lr_scaling():
    assert scaled_lr(2e-4, 16, 16, "sqrt") == pytest.approx(2e-4)
    assert scaled_lr(2e-4, 64, 16, "sqrt") == pytest.approx(4e-4)
    assert scaled_lr(2e-4, 4, 16, "sqrt") == pytest.approx(1e-4)
    assert scaled_lr(2e-4, 64, 16, "none") == 2e-4
    with pytest.raises(ValueError, match="linear"):
        scaled_lr(2e-4, 64, 16, "linear")


def _lrs_per_epoch(drop_epochs, epochs, factor=0.1):
    opt = build_optimizer(_Toy(), lr=1.0, lr_backbone=0.5, lr_linear_proj_mult=0.1, weight_decay=0.0)
    sched = build_lr_scheduler(opt, drop_epochs, factor)
    out = []
    for _ in range(epochs):
        out.append([g["lr"] for g in opt.param_groups])  # the lr the epoch trains with
        opt.step()
        sched.step()
    return out, opt, sched


def test_lr_drops_at_the_listed_epochs():
    lrs, _, _ = _lrs_per_epoch([3, 5], 7)
    default = [round(row[0], 8) for row in lrs]
    assert default == [1.0, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
    # Every group drops together, keeping its ratio to the default lr.
    for row in lrs:
        assert row[1] == pytest.approx(row[0] * 0.5) and row[2] == pytest.approx(row[0] * 0.1)


def test_restore_scheduler_continues_and_follows_new_milestones():
    _, opt, sched = _lrs_per_epoch([3], 4)  # four epochs done: lr already dropped
    state = scheduler_state(sched)
    # Same milestones: the fresh optimizer/scheduler land on the same lrs.
    opt2 = build_optimizer(_Toy(), lr=1.0, lr_backbone=0.5, lr_linear_proj_mult=0.1, weight_decay=0.0)
    sched2 = build_lr_scheduler(opt2, [3], 0.1)
    restore_scheduler(sched2, state)
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx([g["lr"] for g in opt.param_groups])
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.1)
    # A resumed run with later milestones follows the config, not the checkpoint.
    opt3 = build_optimizer(_Toy(), lr=1.0, lr_backbone=0.5, lr_linear_proj_mult=0.1, weight_decay=0.0)
    sched3 = build_lr_scheduler(opt3, [6], 0.1)
    restore_scheduler(sched3, state)
    assert opt3.param_groups[0]["lr"] == pytest.approx(1.0)
    for expected in (1.0, 0.1):  # epoch 5 trains at 1.0, epoch 6 at 0.1
        sched3.step()
        assert opt3.param_groups[0]["lr"] == pytest.approx(expected)


def test_ema_matches_the_formula():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    decay = 0.9
    ema = build_ema(model, decay)
    assert not any(p.requires_grad for p in ema.parameters())
    expected = None
    for _ in range(4):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        ema.update_parameters(model)
        w = model.weight.detach().clone()
        # The first update copies the weights; later ones average.
        expected = w if expected is None else decay * expected + (1 - decay) * w
        torch.testing.assert_close(ema.module.weight, expected)
    with pytest.raises(ValueError):
        build_ema(model, 1.0)


def test_no_trainable_parameters_is_an_error():
    model = _Toy().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer(model, lr=1.0, lr_backbone=1.0, lr_linear_proj_mult=1.0, weight_decay=0.0)


def test_real_model_groups_and_scaled_lrs():
    """The group rules hit the real parameter names; sqrt scaling uses the global batch."""
    from sparse_detr.config import config_from_dict
    from sparse_detr.engine.training.builders import build_optimization
    from sparse_detr.models import build_detector

    cfg = config_from_dict({
        "model": dict(num_classes=6, hidden_dim=32, nheads=2, num_feature_levels=2, enc_layers=1, dec_layers=1,
                      dim_feedforward=64, num_queries=10),  # plain Deformable DETR: it has `reference_points`
        "train": dict(lr=2e-4, lr_backbone=2e-5, lr_linear_proj_mult=0.1, batch_size=2, base_batch_size=16,
                      lr_scaling="sqrt", weight_decay=1e-4)})
    model = build_detector(cfg.model)
    opt, sched, ema = build_optimization(cfg, model, world=2)  # global batch 4: lr x sqrt(4/16) = x0.5
    assert ema is None
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == pytest.approx({"default": 1e-4, "backbone": 1e-5, "linear_proj": 1e-5})
    where = _group_of(opt)
    # The expected groups from the module objects (not from parameter names, as the code under test does):
    # the CNN inside the backbone joiner, and the linear layers that predict sampling positions (Deformable
    # DETR's lr_linear_proj_names: every attention's offsets and the query reference points).
    from sparse_detr.models.ms_deform_attn import MSDeformAttn

    backbone = {id(p) for p in model.tokens.backbone[0].parameters()}
    proj_modules = [m.sampling_offsets for m in model.modules() if isinstance(m, MSDeformAttn)]
    proj_modules.append(model.queries.reference_points)
    linear_proj = {id(p) for m in proj_modules for p in m.parameters()}
    seen = {"default": 0, "backbone": 0, "linear_proj": 0}
    for name, p in model.named_parameters():
        if not p.requires_grad:  # the stem and layer1 of the ResNet stay frozen, as in DETR
            assert id(p) not in where, name
            continue
        expected = "backbone" if id(p) in backbone else "linear_proj" if id(p) in linear_proj else "default"
        assert where[id(p)] == expected, name
        seen[expected] += 1
    assert seen["linear_proj"] == 2 * len(proj_modules) and all(seen.values()), seen  # weight + bias each
    assert any("reference_points" in n for n, _ in model.named_parameters())


def test_optimizer_state_is_aligned_by_name_and_refused_when_the_parameters_differ():
    from sparse_detr.engine.training.optim import align_optimizer_state

    state = {"state": {0: {"m": 0}, 1: {"m": 1}, 2: {"m": 2}},
             "param_groups": [{"name": "default", "params": [0, 1]}, {"name": "backbone", "params": [2]}]}
    # Saved as [a, b], now [b, a]: the saved ids are listed in the current order, the moments stay with their ids.
    out = align_optimizer_state(state, [["a", "b"], ["c"]], [["b", "a"], ["c"]])
    assert [g["params"] for g in out["param_groups"]] == [[1, 0], [2]] and out["state"] is state["state"]
    assert out["param_groups"][0]["name"] == "default"
    with pytest.raises(ValueError, match="'default'.*not in it: \\['x'\\]"):
        align_optimizer_state(state, [["a", "b"], ["c"]], [["a", "x"], ["c"]])
    with pytest.raises(ValueError, match="parameter groups"):
        align_optimizer_state(state, [["a", "b"]], [["a", "b"]])


PARAM_ORDER = Path(__file__).parent / "data" / "param_order.json"
ORDER_VARIANTS = {  # name in param_order.json: (config, overrides)
    "r50_plain": ("configs/deformable_detr_r50.yaml", []),
    "r50_refine": ("configs/deformable_detr_r50_refine.yaml", []),
    "r50_two_stage": ("configs/deformable_detr_r50_two_stage.yaml", []),
    "r50_efficient": ("configs/efficient_detr_r50.yaml", []),
    "r50_sparse_dam": ("configs/sparse_detr_r50_rho0.1.yaml", []),
    "r50_sparse_os": ("configs/sparse_detr_r50_rho0.1_os.yaml", []),
    "swin_sparse_dam": ("configs/sparse_detr_swin_t_rho0.1.yaml", []),
    "demo": ("configs/demo_synthetic.yaml", []),
    "tiny_salience": ("configs/ablation_long.yaml", ["model.rho=0.1", "model.scorer_target=salience"]),
    "tiny_foreground": ("configs/ablation_long.yaml", ["model.rho=0.1", "model.scorer_target=foreground"]),
    "tiny_random": ("configs/ablation_long.yaml", ["model.rho=0.1", "model.scorer_target=random"]),
    "tiny_dense": ("configs/ablation_long.yaml", ["model.rho=0.0", "model.use_enc_aux_loss=false"]),
}


def test_parameter_order_is_the_one_before_the_detector_was_composed():
    """The optimizer's groups, and gradient clipping, take the parameters in the order recorded from the detector
    before it was composed of parts: AdamW's state and the clipping's summation follow it, so runs and checkpoints
    of earlier versions continue bit for bit (a resumed 125f765 run matched for 100 iterations)."""
    import hashlib
    import json

    from sparse_detr.config import load_config
    from sparse_detr.engine.training import builders
    from sparse_detr.engine.training.optim import optimizer_param_names, ordered_parameters, parameter_names

    expected = json.loads(PARAM_ORDER.read_text())
    for name, (config, overrides) in ORDER_VARIANTS.items():
        cfg = load_config(config, overrides + ["model.pretrained_backbone=null"])
        with torch.device("meta"):  # names and order only: no memory, no weight init
            model, _, _ = builders.build_model_and_criterion(cfg, torch.device("meta"))
        optimizer, _, _ = builders.build_optimization(cfg, model, 1)
        groups = optimizer_param_names(optimizer, model)
        if name in expected["lists"]:
            assert groups == expected["lists"][name], name
        else:
            got = [[len(g), hashlib.sha256("\n".join(g).encode()).hexdigest()] for g in groups]
            assert got == expected["sha256"][name], name
        # Clipping iterates over all of them in the same relative order as the groups do.
        names = parameter_names(model)
        order = [names[id(p)] for p in ordered_parameters(model)]
        for group in groups:
            members = set(group)
            assert [n for n in order if n in members] == group, name
