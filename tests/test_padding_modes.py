"""The official padding behaviour of the two-stage and encoder-aux losses (model.enc_loss_padding) against a direct
computation: brute-force assignment and the focal / L1 / GIoU sums written out, over every token and slot
(``official``) or over the valid ones only (``exclude``)."""
import itertools
import math

import pytest
import torch
from torchvision.ops import generalized_box_iou

from sparse_detr.box_ops import box_cxcywh_to_xyxy
from sparse_detr.config import load_config
from sparse_detr.models import build_model
from sparse_detr.models.encoder import grid_proposals

SMALL = ["model.hidden_dim=32", "model.nheads=4", "model.enc_layers=3", "model.dec_layers=2",
         "model.dim_feedforward=64", "model.num_queries=12", "model.num_classes=5", "model.dropout=0.0"]
TARGETS = [{"labels": torch.tensor([1, 4]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
           {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]


def _direct_losses(logits, boxes, allowed, matcher, alpha=0.25, gamma=2.0):
    """Losses of one head: per image the cheapest injective assignment of its targets to the allowed predictions
    (by enumeration), then the focal loss over every allowed prediction and class, L1 and 1 - GIoU of the pairs."""
    num_boxes = float(sum(len(t["labels"]) for t in TARGETS))
    focal = l1 = giou = 0.0
    for b, target in enumerate(TARGETS):
        rows = allowed[b].nonzero().flatten().tolist()
        cost = matcher.cost_matrix(logits[b:b + 1], boxes[b:b + 1], target["labels"], target["boxes"])[0]
        best = min(itertools.permutations(rows, len(target["labels"])),
                   key=lambda pick: sum(float(cost[r, t]) for t, r in enumerate(pick)))
        onehot = torch.zeros(logits.shape[1:])
        for t, r in enumerate(best):
            onehot[r, target["labels"][t]] = 1.0
            l1 += float((boxes[b, r] - target["boxes"][t]).abs().sum())
            pair = box_cxcywh_to_xyxy(torch.stack((boxes[b, r], target["boxes"][t])))
            giou += 1 - float(generalized_box_iou(pair[:1], pair[1:]))
        for r in rows:
            p = logits[b, r].sigmoid()
            t = onehot[r]
            ce = -(t * p.log() + (1 - t) * (1 - p).log())
            weight = alpha * t + (1 - alpha) * (1 - t)
            focal += float((weight * ce * ((1 - p) * t + p * (1 - t)) ** gamma).sum())
    return focal / num_boxes, l1 / num_boxes, giou / num_boxes


@pytest.mark.parametrize("mode", ["official", "exclude"])
def test_encoder_losses_count_every_token_and_slot_only_when_official(mode):
    torch.manual_seed(0)
    cfg = load_config("configs/demo_synthetic.yaml", SMALL + [f"model.enc_loss_padding={mode}"])
    model, criterion, _ = build_model(cfg)
    torch.manual_seed(1)
    images = [torch.randn(3, 64, 96), torch.randn(3, 48, 40)]  # the second image is mostly padding
    with torch.no_grad():
        out = model(images)
        losses = criterion(out, TARGETS)
    pad = out["padding_mask"]
    enc = out["enc_outputs"]
    if mode == "official":
        allowed = torch.ones_like(pad)
    else:  # neither padding nor tokens whose grid proposal leaves (0.01, 0.99)
        shapes = [tuple(s) for s in out["spatial_shapes"].tolist()]
        allowed = grid_proposals(pad, shapes)[1]
    assert (~allowed).any() == (mode == "exclude") and pad.any()
    expected = _direct_losses(enc["pred_logits"], enc["pred_boxes"], allowed, criterion.matcher)
    for name, value in zip(("loss_ce_enc", "loss_bbox_enc", "loss_giou_enc"), expected):
        assert losses[name].item() == pytest.approx(value, rel=1e-5, abs=1e-6), name

    counts = out["selection"].counts
    assert counts[0] != counts[1]
    for i, aux in enumerate(out["enc_aux_outputs"]):
        k = aux["pred_logits"].shape[1]
        limit = counts.max() if mode == "official" else counts[:, None]  # the batch's k, or each image's k_b
        slots = torch.arange(k)[None, :] < limit
        expected = _direct_losses(aux["pred_logits"], aux["pred_boxes"], slots.expand(2, k), criterion.matcher)
        for name, value in zip(("loss_ce", "loss_bbox", "loss_giou"), expected):
            assert losses[f"{name}_enc_aux_{i}"].item() == pytest.approx(value, rel=1e-5, abs=1e-6), name


def test_the_two_modes_differ_on_padded_batches_only():
    outs = {}
    for mode in ("official", "exclude"):
        torch.manual_seed(0)
        cfg = load_config("configs/demo_synthetic.yaml", SMALL + [f"model.enc_loss_padding={mode}"])
        model, criterion, _ = build_model(cfg)
        torch.manual_seed(1)
        padded = [torch.randn(3, 64, 96), torch.randn(3, 48, 40)]
        torch.manual_seed(1)
        same = [torch.randn(3, 64, 96)] * 2
        with torch.no_grad():
            outs[mode] = (criterion(model(padded), TARGETS), criterion(model(same), TARGETS))
    assert not math.isclose(outs["official"][0]["loss_ce_enc"], outs["exclude"][0]["loss_ce_enc"], rel_tol=1e-4)
    # no padding and no slot past k_b: the modes differ only where tokens are invalid proposals
    assert math.isclose(outs["official"][1]["loss_ce_enc_aux_0"], outs["exclude"][1]["loss_ce_enc_aux_0"],
                        rel_tol=1e-6)
