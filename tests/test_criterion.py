"""SetCriterion: hand-computed values, key names, masking of invalid slots, weights, gradients."""
import math

import pytest
import torch

from sparse_detr.models.criterion import SetCriterion, build_weight_dict, check_finite, weighted_total
from sparse_detr.models.matcher import HungarianMatcher
from sparse_detr.models.selection import (KeepBudget, ObjectnessSelector, Selection, SelectorLosses, SelectorOptions,
                                          TokenSelector, mask_prediction_loss)

K = 4


class _MaskSelector(TokenSelector):
    """A selection criterion written as one class, the way a user adds one: its loss reaches the criterion."""

    def score(self, features, proposals, padding_mask):
        return torch.zeros(padding_mask.shape), {}

    def losses(self, outputs, targets):
        return SelectorLosses({"loss_mask": mask_prediction_loss(outputs["mask_logits"], outputs["mask_targets"])})

    def loss_weights(self, cls, bbox, giou, mask):
        return {"loss_mask": mask}


def _selector(cls=_MaskSelector):
    return cls(KeepBudget(0.1), SelectorOptions(dim=8, num_classes=K))


def _targets(sizes, g):
    return [{"labels": torch.randint(0, K, (t,), generator=g),
             "boxes": torch.cat([torch.rand(t, 2, generator=g) * 0.5 + 0.25,
                                 torch.rand(t, 2, generator=g) * 0.3 + 0.1], 1),
             "image_id": torch.tensor(i), "orig_size": torch.tensor([480, 640]), "size": torch.tensor([480, 640])}
            for i, t in enumerate(sizes)]


def _head(bsz, n, g, num_classes=K, valid=False):
    head = {"pred_logits": torch.randn(bsz, n, num_classes, generator=g).requires_grad_(),
            "pred_boxes": torch.rand(bsz, n, 4, generator=g).mul(0.5).add(0.1).requires_grad_()}
    if valid:
        head["valid"] = torch.rand(bsz, n, generator=g) > 0.3
        head["valid"][:, 0] = True
    return head


def _plain(num_classes=K, **kw):
    """Criterion for a head without aux layers (its weight dict covers the final and enc heads)."""
    return SetCriterion(num_classes, HungarianMatcher(), build_weight_dict(num_dec_layers=1, two_stage=True), **kw)


def _criterion(**kw):
    weights = build_weight_dict(num_dec_layers=3, num_enc_aux=2, two_stage=True) | {"loss_mask": 1.0}
    return SetCriterion(K, HungarianMatcher(), weights, selector=_selector(), **kw)


def _full_outputs(g, bsz=2, queries=5, tokens=12):
    out = _head(bsz, queries, g)
    out["aux_outputs"] = [_head(bsz, queries, g) for _ in range(2)]
    out["enc_outputs"] = _head(bsz, tokens, g, valid=True)
    out["enc_aux_outputs"] = [_head(bsz, 6, g, valid=True) for _ in range(2)]
    out["mask_logits"] = torch.randn(bsz, tokens, generator=g).requires_grad_()
    out["mask_targets"] = (torch.rand(bsz, tokens, generator=g) > 0.7).float()
    return out


def test_hand_computed_focal_single_query():
    logits = torch.tensor([[[0.3, -1.2, 2.0]]], requires_grad=True)
    box = torch.tensor([[[0.5, 0.5, 0.2, 0.2]]])
    targets = [{"labels": torch.tensor([0]), "boxes": box[0].clone()}]
    losses = _plain(3)({"pred_logits": logits, "pred_boxes": box}, targets)
    p = [1 / (1 + math.exp(-x)) for x in (0.3, -1.2, 2.0)]
    alpha = 0.25
    expected = (alpha * (1 - p[0]) ** 2 * -math.log(p[0])
                + sum((1 - alpha) * q ** 2 * -math.log(1 - q) for q in p[1:]))  # num_boxes = 1
    assert losses["loss_ce"].item() == pytest.approx(expected, rel=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(0, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(0, abs=1e-6)
    assert losses["stat_class_error"].item() == 100.0  # the top class (2) is not the target (0)


def test_perfect_boxes_give_zero_box_losses_and_sum_over_num_boxes():
    g = torch.Generator().manual_seed(0)
    targets = _targets([3, 2], g)
    out = _head(2, 6, g)
    boxes = out["pred_boxes"].detach().clone()
    boxes[0, 1:4], boxes[1, 2:4] = targets[0]["boxes"], targets[1]["boxes"]
    out["pred_boxes"] = boxes
    losses = _plain()(out, targets)
    assert losses["loss_bbox"].item() == pytest.approx(0, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(0, abs=1e-6)
    # The normalisation is sum / num_boxes: a batch holding the same image twice gives the same losses as once.
    single = _plain()({k: v[:1] for k, v in out.items()}, targets[:1])
    doubled = _plain()({k: v[[0, 0]] for k, v in out.items()}, [targets[0]] * 2)
    for key in ("loss_ce", "loss_bbox", "loss_giou"):
        assert doubled[key].item() == pytest.approx(single[key].item(), rel=1e-5)


def test_all_keys_present_and_weighted():
    g = torch.Generator().manual_seed(1)
    criterion = _criterion()
    losses = criterion(_full_outputs(g), _targets([2, 3], g))
    trained = {k for k in losses if not k.startswith("stat_")}
    assert trained == set(criterion.weight_dict)
    for name in ("loss_ce_1", "loss_giou_enc", "loss_bbox_enc_aux_1", "loss_mask", "stat_class_error"):
        assert name in losses
    assert all(v.dim() == 0 for v in losses.values())
    total = weighted_total(losses, criterion.weight_dict)
    manual = sum(criterion.weight_dict[k] * v for k, v in losses.items() if not k.startswith("stat_"))
    assert total.item() == pytest.approx(manual.item(), rel=1e-6)


def test_invalid_slots_change_nothing():
    g = torch.Generator().manual_seed(2)
    out, targets = _full_outputs(g), _targets([4, 3], g)
    criterion = _criterion()
    base = criterion(out, targets)
    for head in [out["enc_outputs"], *out["enc_aux_outputs"]]:
        bad = ~head["valid"]
        logits, boxes = head["pred_logits"].detach().clone(), head["pred_boxes"].detach().clone()
        logits[bad] = torch.where(torch.rand(logits[bad].shape, generator=g) > 0.5, 50.0, float("nan"))
        boxes[bad] = torch.tensor([0.51, 0.52, 0.3, float("inf")])  # would match well if it were valid
        head["pred_logits"], head["pred_boxes"] = logits.requires_grad_(), boxes.requires_grad_()
    perturbed = criterion(out, targets)
    for key in base:
        assert perturbed[key].item() == pytest.approx(base[key].item(), rel=1e-6, abs=1e-7), key
    weighted_total(perturbed, criterion.weight_dict).backward()
    for head in [out["enc_outputs"], *out["enc_aux_outputs"]]:
        assert torch.isfinite(head["pred_logits"].grad).all() and torch.isfinite(head["pred_boxes"].grad).all()
        assert (head["pred_logits"].grad[~head["valid"]] == 0).all()


def test_class_agnostic_enc_uses_label_zero():
    g = torch.Generator().manual_seed(3)
    targets = _targets([3, 2], g)
    out = _head(2, 5, g)
    out["enc_outputs"] = _head(2, 9, g, num_classes=1, valid=True)
    agnostic = _plain(class_agnostic_enc=True)(out, targets)
    relabelled = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
    reference = _plain(1)(dict(out["enc_outputs"]), relabelled)  # the enc head scored as a plain 1-class head
    for key in ("loss_ce", "loss_bbox", "loss_giou"):
        assert agnostic[key + "_enc"].item() == pytest.approx(reference[key].item(), rel=1e-6)
    # The decoder head keeps the real labels.
    specific = _plain()(out | {"enc_outputs": None}, targets)
    assert agnostic["loss_ce"].item() == pytest.approx(specific["loss_ce"].item(), rel=1e-6)


def test_mask_loss_matches_hand_bce():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    weights = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])

    def bce(x, y):
        p = 1 / (1 + math.exp(-x))
        return -(y * math.log(p) + (1 - y) * math.log(1 - p))

    rows = [[bce(x, y) for x, y in zip(lr, tr)] for lr, tr in zip(logits.tolist(), targets.tolist())]
    assert mask_prediction_loss(logits, targets).item() == pytest.approx(
        (sum(rows[0]) / 3 + sum(rows[1]) / 3) / 2, rel=1e-5)
    assert mask_prediction_loss(logits, targets, weights).item() == pytest.approx(
        ((rows[0][0] + rows[0][1]) / 2 + sum(rows[1]) / 3) / 2, rel=1e-5)
    logits[0, 2] = float("nan")  # an uncounted token may hold anything
    assert math.isfinite(mask_prediction_loss(logits, targets, weights).item())


def test_no_targets_finite_and_gradients_flow():
    g = torch.Generator().manual_seed(4)
    out, criterion = _full_outputs(g), _criterion()
    losses = criterion(out, _targets([0, 0], g))
    check_finite(losses)
    assert losses["loss_bbox"].item() == 0 and losses["loss_ce"].item() > 0
    weighted_total(losses, criterion.weight_dict).backward()
    assert out["pred_logits"].grad.abs().sum() > 0 and out["mask_logits"].grad.abs().sum() > 0

    out = _full_outputs(g)
    weighted_total(criterion(out, _targets([2, 1], g)), criterion.weight_dict).backward()
    for head in [out, *out["aux_outputs"], out["enc_outputs"], *out["enc_aux_outputs"]]:
        assert head["pred_logits"].grad.abs().sum() > 0 and head["pred_boxes"].grad.abs().sum() > 0


def test_build_weight_dict_and_weighted_total():
    w = build_weight_dict(cls=2, bbox=5, giou=2, num_dec_layers=2, num_enc_aux=1, two_stage=True)
    assert w == {"loss_ce": 2, "loss_bbox": 5, "loss_giou": 2, "loss_ce_0": 2, "loss_bbox_0": 5, "loss_giou_0": 2,
                 "loss_ce_enc": 2, "loss_bbox_enc": 5, "loss_giou_enc": 2, "loss_ce_enc_aux_0": 2,
                 "loss_bbox_enc_aux_0": 5, "loss_giou_enc_aux_0": 2}
    losses = {"loss_ce": torch.tensor(1.5), "loss_giou_enc": torch.tensor(0.25), "stat_class_error": torch.tensor(80.)}
    assert weighted_total(losses, w).item() == pytest.approx(2 * 1.5 + 2 * 0.25)
    with pytest.raises(ValueError):
        weighted_total({"stat_class_error": torch.tensor(1.0)}, w)


def test_check_finite_names_bad_terms():
    check_finite({"loss_ce": torch.tensor(1.0)})
    with pytest.raises(FloatingPointError, match="loss_giou_enc=nan.*loss_bbox_1=inf"):
        check_finite({"loss_ce": torch.tensor(1.0), "loss_giou_enc": torch.tensor(float("nan")),
                      "loss_bbox_1": torch.tensor(float("inf"))})


def test_warns_once_about_unweighted_losses():
    g = torch.Generator().manual_seed(5)
    criterion = SetCriterion(K, HungarianMatcher(), build_weight_dict(num_dec_layers=1))
    out = _head(2, 4, g)
    out["enc_aux_outputs"] = [_head(2, 3, g, valid=True)]
    with pytest.warns(UserWarning, match="loss_ce_enc_aux_0"):
        criterion(out, _targets([1, 2], g))


def test_padding_slots_equal_no_slots():
    # A head padded with invalid slots (an image with k_b < k) must give exactly the losses of the unpadded head.
    g = torch.Generator().manual_seed(6)
    targets = _targets([3, 1], g)
    out = _head(2, 4, g)
    enc_aux = _head(2, 5, g)
    padded = {"pred_logits": torch.cat([enc_aux["pred_logits"].detach(), torch.randn(2, 3, K, generator=g)], 1),
              "pred_boxes": torch.cat([enc_aux["pred_boxes"].detach(), torch.rand(2, 3, 4, generator=g)], 1),
              "valid": torch.arange(8).expand(2, 8) < 5}
    criterion = SetCriterion(K, HungarianMatcher(), build_weight_dict(num_dec_layers=1, num_enc_aux=1))
    plain = criterion(out | {"enc_aux_outputs": [enc_aux]}, targets)
    masked = criterion(out | {"enc_aux_outputs": [padded]}, targets)
    for key in ("loss_ce_enc_aux_0", "loss_bbox_enc_aux_0", "loss_giou_enc_aux_0"):
        assert masked[key].item() == pytest.approx(plain[key].item(), rel=1e-6)


def test_wrong_num_classes_is_an_error():
    g = torch.Generator().manual_seed(7)
    with pytest.raises(ValueError, match="num_classes=5"):
        _plain(5)(_head(1, 3, g), _targets([1], g))


def _selection_with_head(head):
    """A selection of nothing that carries the objectness head's outputs (all the OS criterion reads)."""
    empty = torch.zeros(2, 0, dtype=torch.long)
    return Selection(empty, empty.bool(), torch.zeros(2, dtype=torch.long), None, [], heads={"backbone": head})


def test_backbone_outputs_are_a_class_specific_masked_head():
    """The OS selection head (``Selection.heads["backbone"]``, the paper's OS ablation) is matched and trained like the Sparse
    DETR two-stage head: real class labels even where the two-stage head is class-agnostic, invalid tokens ignored,
    ``_backbone`` keys that the weight dict covers."""
    g = torch.Generator().manual_seed(8)
    targets = _targets([3, 2], g)
    out, head = _head(2, 4, g), _head(2, 10, g, valid=True)
    selector = _selector(ObjectnessSelector)
    weights = build_weight_dict(num_dec_layers=1, two_stage=True) | selector.loss_weights(2, 5, 2, 1)
    assert {"loss_ce_backbone", "loss_bbox_backbone", "loss_giou_backbone"} <= set(weights)
    criterion = SetCriterion(K, HungarianMatcher(), weights, class_agnostic_enc=True, selector=selector)
    losses = criterion(out | {"selection": _selection_with_head(head)}, targets)
    specific = SetCriterion(K, HungarianMatcher(), weights)(out | {"enc_outputs": head}, targets)
    for name in ("loss_ce", "loss_bbox", "loss_giou"):
        assert losses[name + "_backbone"].item() == pytest.approx(specific[name + "_enc"].item(), rel=1e-6)

    garbage = dict(head)  # invalid tokens (padding, invalid proposals) with NaN logits and boxes change nothing
    bad = ~head["valid"]
    garbage["pred_logits"] = head["pred_logits"].detach().masked_fill(bad[..., None], float("nan"))
    garbage["pred_boxes"] = head["pred_boxes"].detach().masked_fill(bad[..., None], float("inf"))
    again = criterion(out | {"selection": _selection_with_head(garbage)}, targets)
    for name in ("loss_ce_backbone", "loss_bbox_backbone", "loss_giou_backbone"):
        assert again[name].item() == pytest.approx(losses[name].item(), rel=1e-6)
