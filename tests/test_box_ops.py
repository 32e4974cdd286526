"""Box helpers: conversions, IoU/GIoU against hand-computed values and torchvision, clamp-safety, inverse sigmoid."""
import pytest
import torch
import torchvision

from sparse_detr.box_ops import (box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh, generalized_box_iou,
                                 inverse_sigmoid, paired_generalized_box_iou, scale_boxes)


def _random_xyxy(n, generator):
    xy = torch.rand(n, 2, generator=generator) * 0.6
    wh = torch.rand(n, 2, generator=generator) * 0.4 + 0.01
    return torch.cat([xy, xy + wh], dim=1)


def test_conversion_round_trip_and_known_values():
    g = torch.Generator().manual_seed(0)
    cxcywh = torch.rand(3, 5, 4, generator=g)
    torch.testing.assert_close(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(cxcywh)), cxcywh)
    # A box centred at (0.5, 0.4) of size 0.2 x 0.6 spans x in [0.4, 0.6], y in [0.1, 0.7].
    out = box_cxcywh_to_xyxy(torch.tensor([0.5, 0.4, 0.2, 0.6]))
    torch.testing.assert_close(out, torch.tensor([0.4, 0.1, 0.6, 0.7]))


def test_giou_hand_computed():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0],   # overlap 1, union 7, enclosing 3x3 = 9
                      [3.0, 0.0, 4.0, 2.0],   # disjoint: union 4 + 2 = 6, enclosing 4x2 = 8
                      [0.0, 0.0, 2.0, 2.0]])  # identical
    expected = torch.tensor([[1 / 7 - 2 / 9, 0 - 2 / 8, 1.0]])
    torch.testing.assert_close(generalized_box_iou(a, b), expected)
    torch.testing.assert_close(box_iou(a, b), torch.tensor([[1 / 7, 0.0, 1.0]]))
    torch.testing.assert_close(paired_generalized_box_iou(a.expand(3, 4), b), expected[0])


def test_matrices_match_torchvision_on_regular_boxes():
    g = torch.Generator().manual_seed(1)
    b1, b2 = _random_xyxy(7, g), _random_xyxy(5, g)
    torch.testing.assert_close(generalized_box_iou(b1, b2), torchvision.ops.generalized_box_iou(b1, b2))
    torch.testing.assert_close(box_iou(b1, b2), torchvision.ops.box_iou(b1, b2))
    # The paired form is the diagonal of the matrix form.
    b3 = _random_xyxy(7, g)
    torch.testing.assert_close(paired_generalized_box_iou(b1, b3), torch.diagonal(generalized_box_iou(b1, b3)))


def test_degenerate_boxes_are_finite_with_finite_gradients():
    # Zero-size and inverted boxes: torchvision's GIoU gives NaN here (0 / 0); ours must stay finite.
    pred = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.2, 0.2, 0.0, 0.3]], requires_grad=True)
    tgt = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.7, 0.7, 0.1, 0.1]])
    giou = paired_generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(tgt))
    assert torch.isfinite(giou).all()
    giou.sum().backward()
    assert torch.isfinite(pred.grad).all()
    inverted = torch.tensor([[0.6, 0.6, 0.4, 0.4]])
    assert torch.isfinite(generalized_box_iou(inverted, inverted)).all()
    assert torch.isfinite(box_iou(inverted, inverted)).all()


def test_inverse_sigmoid():
    x = torch.linspace(0.01, 0.99, 50)
    torch.testing.assert_close(inverse_sigmoid(x).sigmoid(), x)
    ends = inverse_sigmoid(torch.tensor([0.0, 1.0, -0.5, 1.5]))
    assert torch.isfinite(ends).all()
    assert ends[0] == pytest.approx(-ends[1].item()) and ends[0] < -10


def test_scale_boxes_uses_h_w_order():
    boxes = torch.tensor([[[0.1, 0.2, 0.5, 1.0]]])
    sizes = torch.tensor([[480, 640]])  # (h, w)
    torch.testing.assert_close(scale_boxes(boxes, sizes), torch.tensor([[[64.0, 96.0, 320.0, 480.0]]]))
