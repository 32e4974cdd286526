"""Optimiser parameter groups, lr scaling, the epoch step schedule and its restore, the EMA update."""
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
