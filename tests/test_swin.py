"""The official Swin-T backbone (models/swin.py) against independent expectations, and the official Swin-T
checkpoints: conversion, strict loading, format-1 checkpoints, ImageNet weights in both layouts.

The official layouts are committed under ``tests/data/official_keys`` (``make_official_keys.py`` writes them from
the reference description; each key is listed with its shape).
"""
from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models.swin_transformer import ShiftedWindowAttention

from sparse_detr.config import config_from_dict, load_config, to_dict
from sparse_detr.engine.checkpoint import (ConfigMismatchError, check_config_compatible, load_checkpoint,
                                           save_checkpoint)
from sparse_detr.engine.studies.convert import StateDictMismatch, convert_official
from sparse_detr.models import build_detector, build_model, weighted_total
from sparse_detr.models.backbone import Backbone
from sparse_detr.models.swin import OfficialWindowAttention, SwinT

KEYS = Path(__file__).parent / "data" / "official_keys"
BODY = "backbone.0.body."


# --------------------------------------------------------------------------------------------------------------
# Independent references

def loop_window_attention(x, qkv_w, qkv_b, proj_w, proj_b, table, heads, window, shift):
    """Shifted-window self-attention of one (H, W, C) map, token pair by token pair, in float64 (Swin, Sec. 3.2).

    The map is zero-padded at the right/bottom to a multiple of the window and rolled by -shift; in every window,
    query i attends to key j with logit q_i·k_j/sqrt(d) + table[(dr+6)·13 + (dc+6), head], minus 100 when one of
    the two was wrapped around by the roll (last `shift` rows/columns of the rolled map) and the other was not.
    """
    x, qkv_w, qkv_b, proj_w, proj_b, table = (t.detach().double().numpy() for t in (x, qkv_w, qkv_b, proj_w, proj_b,
                                                                                     table))
    h, w, c = x.shape
    hp, wp = math.ceil(h / window) * window, math.ceil(w / window) * window
    padded = np.zeros((hp, wp, c))
    padded[:h, :w] = x
    d = c // heads
    out = np.zeros_like(padded)
    for r0 in range(0, hp, window):
        for c0 in range(0, wp, window):
            cells = [(r, col) for r in range(r0, r0 + window) for col in range(c0, c0 + window)]  # rolled map
            sources = [((r + shift) % hp, (col + shift) % wp) for r, col in cells]  # where each token came from
            wrapped = [(shift > 0 and r >= hp - shift, shift > 0 and col >= wp - shift) for r, col in cells]
            qkv = np.stack([padded[s] for s in sources]) @ qkv_w.T + qkv_b
            q, k, v = qkv[:, :c], qkv[:, c:2 * c], qkv[:, 2 * c:]
            result = np.zeros((len(cells), c))
            for head in range(heads):
                sl = slice(head * d, (head + 1) * d)
                for i, (ri, ci) in enumerate(cells):
                    logits = np.zeros(len(cells))
                    for j, (rj, cj) in enumerate(cells):
                        logits[j] = q[i, sl] @ k[j, sl] / math.sqrt(d)
                        logits[j] += table[(ri - rj + window - 1) * (2 * window - 1) + (ci - cj + window - 1), head]
                        if wrapped[i] != wrapped[j]:
                            logits[j] -= 100.0
                    p = np.exp(logits - logits.max())
                    result[i, sl] = (p / p.sum()) @ v[:, sl]
            for (sr, sc), row in zip(sources, result @ proj_w.T + proj_b):
                out[sr, sc] = row
    return torch.from_numpy(out[:h, :w])


def _ours_from_official(key: str) -> str:
    """The correspondence the reference states: patch_embed.proj/norm ↔ features.0.0/0.2, layers.i.blocks.j ↔
    features.(2i+1).j with mlp.fc1/fc2 ↔ mlp.0/mlp.3, layers.i.downsample ↔ features.(2i+2), norm1..3 unchanged."""
    if not key.startswith(BODY):
        return key
    rest = key[len(BODY):]
    if m := re.match(r"patch_embed\.(proj|norm)\.(.*)$", rest):
        rest = f"features.0.{0 if m.group(1) == 'proj' else 2}.{m.group(2)}"
    elif m := re.match(r"layers\.(\d+)\.blocks\.(\d+)\.(.*)$", rest):
        tail = m.group(3).replace("mlp.fc1.", "mlp.0.").replace("mlp.fc2.", "mlp.3.")
        rest = f"features.{2 * int(m.group(1)) + 1}.{m.group(2)}.{tail}"
    elif m := re.match(r"layers\.(\d+)\.downsample\.(.*)$", rest):
        rest = f"features.{2 * int(m.group(1)) + 2}.{m.group(2)}"
    return BODY + rest


def _layout(name: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for line in (KEYS / f"{name}.txt").read_text().splitlines():
        key, shape = line.split("\t")
        out[key] = tuple(int(x) for x in shape.split(",") if x)
    return out


def _canonical(key: str) -> str:
    """The official code stores one head module under several names (box refinement, encoder aux heads)."""
    key = re.sub(r"^transformer\.decoder\.(class_embed|bbox_embed)\.", r"\1.", key)
    return re.sub(r"^transformer\.encoder\.(class_embed|bbox_embed)\.(\d+)\.",
                  lambda m: f"{m.group(1)}.{7 + int(m.group(2))}.", key)


def _official_checkpoint(layout: str, path: Path) -> dict[str, torch.Tensor]:
    """An official-format file (model + the other entries the official training writes), random values."""
    gen = torch.Generator().manual_seed(0)
    values, state = {}, {}
    for key, shape in _layout(layout).items():
        canon = _canonical(key)
        if canon not in values:  # aliases of one module hold one tensor, as in a real checkpoint
            if key.endswith("relative_position_index"):
                values[canon] = torch.randint(0, 169, shape, generator=gen)
            else:
                values[canon] = torch.randn(shape, generator=gen)
        state[key] = values[canon]
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "lr_scheduler": {"last_epoch": 49},
                "epoch": 49, "args": argparse.Namespace(backbone="swin-t", rho=0.1, lr=2e-4)}, path)
    return state


# --------------------------------------------------------------------------------------------------------------
# Behaviour

@pytest.mark.parametrize("size", [(5, 6), (7, 7), (9, 16)])
@pytest.mark.parametrize("shift", [3, 0])
def test_window_attention_matches_loop_reference(size, shift):
    torch.manual_seed(0)
    attn = OfficialWindowAttention(8, [7, 7], [shift, shift], num_heads=2).double()
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()  # large enough that a wrong index shows
    x = torch.randn(2, *size, 8, dtype=torch.float64)
    out = attn(x)
    for b in range(2):
        expected = loop_window_attention(x[b], attn.qkv.weight, attn.qkv.bias, attn.proj.weight, attn.proj.bias,
                                         attn.relative_position_bias_table, 2, 7, shift)
        torch.testing.assert_close(out[b], expected, rtol=1e-9, atol=1e-9)

    # torchvision's attention: the same where the padded map has more than one window per side; on a map that
    # fits in one window it drops the shift, the official model (and ours) does not.
    theirs = ShiftedWindowAttention(8, [7, 7], [shift, shift], num_heads=2).double()
    theirs.load_state_dict(attn.state_dict())
    if shift == 0 or size == (9, 16):
        torch.testing.assert_close(theirs(x), out, rtol=1e-9, atol=1e-9)
    else:
        assert not torch.allclose(theirs(x), out, atol=1e-3)


def test_every_odd_block_shifts():
    body = SwinT()
    for stage, depth in zip((1, 3, 5, 7), (2, 2, 6, 2)):
        blocks = body.features[stage]
        assert len(blocks) == depth
        assert [b.attn.shift_size for b in blocks] == [[0, 0] if j % 2 == 0 else [3, 3] for j in range(depth)]
        assert all(isinstance(b.attn, OfficialWindowAttention) for b in blocks)


def test_relative_position_index_has_the_official_values():
    """(dh + 6) * 13 + (dw + 6) for tokens i = (hi, wi), j = (hj, wj), row-major in the 7×7 window."""
    expected = torch.empty(49, 49, dtype=torch.int64)
    for i in range(49):
        for j in range(49):
            expected[i, j] = (i // 7 - j // 7 + 6) * 13 + (i % 7 - j % 7 + 6)
    attns = [m for m in SwinT().modules() if isinstance(m, OfficialWindowAttention)]
    assert len(attns) == 12
    for attn in attns:
        assert torch.equal(attn.relative_position_index.view(49, 49), expected)


@pytest.mark.parametrize("size", [(130, 170), (33, 65), (97, 31), (64, 96)])
def test_level_sizes_and_zero_padded_stem(size):
    """Levels: ceil(H/4) after the padded stem, then ceil(·/2) per patch merging (odd maps padded)."""
    torch.manual_seed(0)
    backbone = Backbone("swin_t").eval()
    h, w = size
    images = torch.randn(1, 3, h, w)
    with torch.no_grad():
        levels = backbone(images, torch.zeros(1, h, w, dtype=torch.bool))
        # The stem zero-pads at the right/bottom to a multiple of 4: the same as padding the image first.
        padded = F.pad(images, (0, (-w) % 4, 0, (-h) % 4))
        levels_padded = backbone.body(padded)
    eh, ew = math.ceil(h / 4), math.ceil(w / 4)
    sizes = []
    for _ in range(3):
        eh, ew = math.ceil(eh / 2), math.ceil(ew / 2)
        sizes.append((eh, ew))
    assert [tuple(f.shape[-2:]) for f, _ in levels] == sizes
    assert [tuple(m.shape[-2:]) for _, m in levels] == sizes
    if size == (130, 170):
        assert sizes == [(17, 22), (9, 11), (5, 6)]
    for (feature, _), other in zip(levels, levels_padded):
        torch.testing.assert_close(feature, other, rtol=1e-5, atol=1e-5)


def test_outputs_are_stage_maps_through_their_norms_before_merging():
    torch.manual_seed(0)
    body = SwinT().eval()
    with torch.no_grad():
        for stage in (1, 2, 3):
            norm = getattr(body, f"norm{stage}")
            norm.weight.normal_()
            norm.bias.normal_()
        x = torch.randn(1, 3, 64, 96)
        out = body(x)
        maps = []
        y = x
        for i, module in enumerate(body.features):  # torchvision's own order: embed, stage, merge, stage, ...
            y = module(y)
            if i in (3, 5, 7):
                maps.append(y)
    for stage, (o, m) in enumerate(zip(out, maps), start=1):
        norm = getattr(body, f"norm{stage}")
        expected = F.layer_norm(m, m.shape[-1:], norm.weight, norm.bias, eps=1e-5).permute(0, 3, 1, 2)
        torch.testing.assert_close(o, expected)


def test_swin_t_sparse_detr_forward_backward_on_two_sizes():
    """Images of different sizes, neither a multiple of 4: the padded batch goes through the padded stem."""
    small = ["model.hidden_dim=32", "model.nheads=4", "model.enc_layers=2", "model.dec_layers=2",
             "model.dim_feedforward=64", "model.num_queries=10", "model.num_classes=5", "model.dropout=0.0"]
    torch.manual_seed(0)
    model, criterion, _ = build_model(load_config("configs/sparse_detr_swin_t_rho0.1.yaml", small))
    images = [torch.randn(3, 61, 90), torch.randn(3, 90, 70)]
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.4, 0.5, 0.3, 0.2]])},
               {"labels": torch.tensor([3, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.2, 0.3, 0.1, 0.2]])}]
    out = model(images)
    loss = weighted_total(criterion(out, targets), criterion.weight_dict)
    assert torch.isfinite(loss)
    loss.backward()
    batch = math.ceil(90 / 4)  # 90×90 padded batch → stem 23×23 → levels 12, 6, 3 (+ 2 from input_proj.3)
    expected = [[math.ceil(batch / 2 ** k)] * 2 for k in (1, 2, 3)] + [[2, 2]]
    assert out["spatial_shapes"].tolist() == expected
    grads = model.state_dict(keep_vars=True)  # official names
    for name in ("backbone.0.body.norm1.weight", "backbone.0.body.features.3.0.attn.qkv.weight",
                 "backbone.0.body.features.7.1.mlp.3.weight", "input_proj.0.0.weight"):
        grad = grads[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    assert all(p.grad is None for n, p in grads.items() if n.startswith(("backbone.0.body.features.0.",
                                                                         "backbone.0.body.features.2.")))


# --------------------------------------------------------------------------------------------------------------
# Checkpoints

@pytest.mark.parametrize("config, layout, count", [
    ("sparse_detr_swin_t_rho0.1", "sparse_detr_swin_t", 682),
    ("efficient_detr_swin_t", "efficient_detr_swin_t", 552),
])
def test_official_swin_t_checkpoint_converts_and_loads_strictly(tmp_path, config, layout, count):
    src, dst = tmp_path / "official.pth", tmp_path / "ours.pth"
    official = _official_checkpoint(layout, src)
    assert len(official) == count and sum(k.startswith(BODY) for k in official) == 187
    cfg = load_config(f"configs/{config}.yaml")
    summary = convert_official(str(src), str(dst), cfg)
    assert summary["tensors"] == count and summary["swin_renamed"]

    converted = load_checkpoint(str(dst))
    check_config_compatible(converted["config"], to_dict(cfg), str(dst))
    torch.manual_seed(1)
    model = build_detector(cfg.model)
    result = model.load_state_dict(converted["model"], strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    ours = model.state_dict()
    assert len(ours) == count
    for key, value in official.items():  # every official tensor in its place, unchanged
        landed = ours[_ours_from_official(key)]
        assert landed.dtype == value.dtype and torch.equal(landed.reshape(value.shape), value), key

    # tools/eval.py reads the official file itself through load_checkpoint: converted on the fly, and it says so.
    with pytest.warns(UserWarning, match="official Swin-T checkpoint: backbone keys renamed to ours on load"):
        on_the_fly = load_checkpoint(str(src))
    assert on_the_fly["model"].keys() == converted["model"].keys()
    assert all(torch.equal(on_the_fly["model"][k], v) for k, v in converted["model"].items())


def test_conversion_reports_every_mismatch_and_writes_nothing(tmp_path):
    src, dst = tmp_path / "official.pth", tmp_path / "ours.pth"
    state = _official_checkpoint("efficient_detr_swin_t", src)
    state = dict(state)
    del state[BODY + "layers.2.blocks.4.mlp.fc2.bias"]
    state[BODY + "layers.0.blocks.0.attn.extra"] = torch.zeros(3)
    state["input_proj.0.0.weight"] = torch.zeros(256, 512, 1, 1)  # an R50 projection
    torch.save({"model": state}, src)
    cfg = load_config("configs/efficient_detr_swin_t.yaml")
    with pytest.raises(StateDictMismatch) as info:
        convert_official(str(src), str(dst), cfg, config_name="efficient_detr_swin_t.yaml")
    message = str(info.value)
    assert "missing (1):\n  backbone.0.body.features.5.4.mlp.3.bias" in message
    assert "unexpected (1):\n  backbone.0.body.features.1.0.attn.extra" in message
    assert "input_proj.0.0.weight: file (256, 512, 1, 1), model (256, 192, 1, 1)" in message
    assert not dst.exists()

    dst.write_bytes(b"not ours")  # an existing output is never overwritten
    with pytest.raises(FileExistsError):
        convert_official(str(src), str(dst), cfg)
    assert dst.read_bytes() == b"not ours"


_TINY = dict(num_classes=6, hidden_dim=32, nheads=2, num_feature_levels=2, enc_layers=2, dec_layers=2,
             dim_feedforward=64, num_queries=10, with_box_refine=True, two_stage=True, eff_query_init=True,
             eff_specific_head=True, rho=0.3, use_enc_aux_loss=True)


def test_format_1_swin_t_checkpoint_is_torchvision_swin_and_loads(tmp_path):
    """Format 1's `swin_t` was torchvision's swin_t as it is; such a checkpoint now reads as swin_t_torchvision."""
    old_cfg = to_dict(config_from_dict({"model": {**_TINY, "backbone": "swin_t"}}))
    legacy = config_from_dict({"model": {**_TINY, "backbone": "swin_t_torchvision"}})
    torch.manual_seed(0)
    model = build_detector(legacy.model).eval()
    # Its backbone keys are exactly torchvision's swin_t features (the format-1 layout).
    tv = torchvision.models.swin_t(weights=None)
    assert sorted(k for k in model.state_dict() if k.startswith(BODY)) == \
        sorted(BODY + k for k in tv.state_dict() if k.startswith("features."))
    path = tmp_path / "old.pth"
    save_checkpoint(str(path), {"model": model.state_dict(), "config": old_cfg})
    raw = torch.load(path, weights_only=True)
    raw["format_version"] = 1
    torch.save(raw, path)

    with pytest.warns(UserWarning, match="model.backbone=swin_t_torchvision"):
        ckpt = load_checkpoint(str(path))
    assert ckpt["config"]["model"]["backbone"] == "swin_t_torchvision"
    with pytest.raises(ConfigMismatchError, match="model.backbone"):
        check_config_compatible(ckpt["config"], old_cfg, str(path))  # a swin_t config is the official Swin-T now
    check_config_compatible(ckpt["config"], to_dict(legacy), str(path))
    fresh = build_detector(legacy.model).eval()
    fresh.load_state_dict(ckpt["model"], strict=True)

    # And the legacy backbone computes torchvision's swin_t features (strides 8/16/32 = features 3, 5, 7).
    tv.load_state_dict({k[len(BODY):]: v for k, v in ckpt["model"].items() if k.startswith(BODY)}, strict=False)
    tv.eval()
    x = torch.randn(1, 3, 100, 120)
    with torch.no_grad():
        ours = fresh.tokens.backbone[0].body(x)
        y = tv.features(x)
    torch.testing.assert_close(ours[-1], y.permute(0, 3, 1, 2))


def _official_classification_state(tv_state: dict) -> dict:
    """torchvision's ImageNet swin_t state in the official Swin repository's layout (its classification model)."""
    out = {}
    for key, value in tv_state.items():
        m = re.match(r"features\.(\d+)\.(.*)$", key)
        if m is None:  # norm.*, head.*
            out[key] = value
            continue
        i, rest = int(m.group(1)), m.group(2)
        if i == 0:
            out[{"0": "patch_embed.proj", "2": "patch_embed.norm"}[rest.split(".")[0]] + rest[1:]] = value
        elif i % 2 == 1:
            rest = re.sub(r"\.mlp\.0\.", ".mlp.fc1.", "." + rest)[1:]
            rest = re.sub(r"\.mlp\.3\.", ".mlp.fc2.", "." + rest)[1:]
            if rest.endswith("relative_position_index"):
                value = value.view(49, 49)
            out[f"layers.{(i - 1) // 2}.blocks.{rest}"] = value
        else:
            out[f"layers.{(i - 2) // 2}.downsample.{rest}"] = value
    for stage, windows in ((0, 64), (1, 16), (2, 4)):  # classification at 224: masks of the shifted blocks
        out[f"layers.{stage}.blocks.1.attn_mask"] = torch.zeros(windows, 49, 49)
    return out


@pytest.mark.parametrize("layout", ["torchvision", "official"])
def test_imagenet_swin_t_weights_in_both_layouts(tmp_path, layout):
    torch.manual_seed(0)
    tv = torchvision.models.swin_t(weights=None)
    with torch.no_grad():
        for p in tv.parameters():
            p.normal_()
    state = tv.state_dict()
    path = tmp_path / "swin_tiny.pth"
    torch.save({"model": _official_classification_state(state)} if layout == "official" else state, path)
    backbone = Backbone("swin_t", pretrained=path)
    loaded = backbone.body.state_dict()
    for key, value in state.items():
        if key.startswith("features."):
            assert torch.equal(loaded[key], value), key
    assert not any(k.startswith(("head.", "norm.")) for k in loaded)  # the classifier is dropped
    for stage in (1, 2, 3):  # the detection output norms are new: their initial values
        assert torch.equal(loaded[f"norm{stage}.weight"], torch.ones(96 * 2 ** stage))
        assert torch.equal(loaded[f"norm{stage}.bias"], torch.zeros(96 * 2 ** stage))
