"""A tiny Sparse DETR overfits two synthetic images: the whole pipeline (scorer + DAM target, sparse encoder with aux
heads, two-stage queries, refinement, criterion, postprocessing) can learn. CPU, seeded, well under a minute."""
import torch

from sparse_detr.box_ops import box_cxcywh_to_xyxy, box_iou
from sparse_detr.config import config_from_dict
from sparse_detr.models import build_model, weighted_total

MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def _image(height, width, background, rects):
    """A flat background with filled rectangles (x0, y0, x1, y1, rgb, label); targets in the data contract."""
    image = torch.tensor(background)[:, None, None].repeat(1, height, width)
    boxes, labels = [], []
    for x0, y0, x1, y1, colour, label in rects:
        image[:, y0:y1, x0:x1] = torch.tensor(colour)[:, None, None]
        boxes.append([(x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height])
        labels.append(label)
    target = {"labels": torch.tensor(labels), "boxes": torch.tensor(boxes), "orig_size": torch.tensor([height, width]),
              "size": torch.tensor([height, width])}
    return (image - MEAN) / STD, target


def test_tiny_sparse_detr_overfits_two_images():
    torch.manual_seed(0)
    image1, target1 = _image(96, 96, (0.4, 0.4, 0.4), [(10, 20, 50, 60, (1.0, 0.0, 0.0), 0)])
    image2, target2 = _image(80, 112, (0.2, 0.3, 0.2), [(60, 10, 100, 40, (0.0, 1.0, 0.0), 1),
                                                        (8, 30, 40, 72, (0.0, 0.0, 1.0), 2)])
    images, targets = [image1, image2], [target1, target2]
    cfg = config_from_dict({"model": dict(
        num_classes=3, hidden_dim=64, nheads=4, enc_layers=2, dec_layers=2, dim_feedforward=128, num_queries=10,
        dropout=0.0, two_stage=True, with_box_refine=True, eff_query_init=True, eff_specific_head=True, rho=0.3,
        use_enc_aux_loss=True, backbone="tiny_cnn")})  # a small trainable CNN: the step costs ~1/10 of a ResNet-50
    model, criterion, postprocess = build_model(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-3, weight_decay=1e-4)

    history = []
    for _ in range(50):
        losses = criterion(model(images), targets)
        loss = weighted_total(losses, criterion.weight_dict)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.1)
        optimizer.step()
        history.append(loss.item())
    assert history[-1] <= 0.1 * history[0], f"loss only fell from {history[0]:.3f} to {history[-1]:.3f}"

    model.eval()
    with torch.no_grad():
        detections = postprocess(model(images), torch.stack([t["orig_size"] for t in targets]))
    for det, target in zip(detections, targets):
        height, width = target["orig_size"].tolist()
        gt = box_cxcywh_to_xyxy(target["boxes"]) * torch.tensor([width, height, width, height])
        n = len(target["labels"])
        iou = box_iou(det["boxes"][:n], gt)  # the n most confident detections vs the n objects
        best = iou.argmax(1)
        assert sorted(best.tolist()) == list(range(n)), "each object found once among the top detections"
        assert (iou.max(1).values >= 0.7).all(), iou
        assert torch.equal(det["labels"][:n], target["labels"][best])
