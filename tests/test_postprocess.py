"""PostProcess: top-k over (query, class) pairs, boxes in original-image pixels, against a brute-force ranking."""
import torch

from sparse_detr.models.postprocess import PostProcess


def test_constructed_case_pixels_and_order():
    logits = torch.full((1, 3, 2), -10.0)
    logits[0, 2, 1] = 3.0   # best: query 2, class 1
    logits[0, 0, 0] = 1.0   # second: query 0, class 0
    logits[0, 0, 1] = 0.0   # third: the same query again, other class (no NMS)
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1], [0.25, 0.75, 0.5, 0.5]]])
    sizes = torch.tensor([[400, 600]])  # (h, w)
    (res,) = PostProcess(num_select=3)({"pred_logits": logits, "pred_boxes": boxes}, sizes)
    assert res["labels"].tolist() == [1, 0, 1] and res["labels"].dtype == torch.int64
    torch.testing.assert_close(res["scores"], torch.tensor([3.0, 1.0, 0.0]).sigmoid())
    # Query 2: x in [0, 0.5] * 600, y in [0.5, 1.0] * 400; query 0: x in [0.4, 0.6], y in [0.3, 0.7].
    expected = torch.tensor([[0.0, 200.0, 300.0, 400.0], [240.0, 120.0, 360.0, 280.0], [240.0, 120.0, 360.0, 280.0]])
    torch.testing.assert_close(res["boxes"], expected)


def test_batched_topk_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    bsz, queries, classes = 3, 30, 7
    logits = torch.randn(bsz, queries, classes, generator=g)
    boxes = torch.rand(bsz, queries, 4, generator=g) * 0.5 + 0.1
    sizes = torch.tensor([[480, 640], [800, 1333], [100, 50]])
    results = PostProcess(num_select=100)({"pred_logits": logits, "pred_boxes": boxes}, sizes)
    assert len(results) == bsz
    for b, res in enumerate(results):
        pairs = sorted(((logits[b, q, c].sigmoid().item(), q, c) for q in range(queries) for c in range(classes)),
                       reverse=True)[:100]
        assert res["scores"].shape == (100,) and res["boxes"].shape == (100, 4)
        assert torch.all(res["scores"][:-1] >= res["scores"][1:])
        torch.testing.assert_close(res["scores"], torch.tensor([p[0] for p in pairs]))
        assert res["labels"].tolist() == [p[2] for p in pairs]
        h, w = sizes[b].tolist()
        for i, (_, q, _) in enumerate(pairs[:5]):
            cx, cy, bw, bh = boxes[b, q].tolist()
            ref = torch.tensor([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h])
            torch.testing.assert_close(res["boxes"][i], ref)


def test_fewer_pairs_than_num_select():
    out = {"pred_logits": torch.zeros(2, 4, 3), "pred_boxes": torch.rand(2, 4, 4)}
    results = PostProcess(num_select=100)(out, torch.tensor([[10, 10], [20, 20]]))
    assert all(r["scores"].shape == (12,) for r in results)


def test_select_is_the_tensor_form_of_forward():
    g = torch.Generator().manual_seed(1)
    logits, boxes = torch.randn(2, 10, 5, generator=g), torch.rand(2, 10, 4, generator=g)
    sizes = torch.tensor([[300, 200], [50, 70]])
    post = PostProcess(num_select=20)
    scores, labels, pixel_boxes = post.select(logits, boxes, sizes)
    assert scores.shape == (2, 20) and labels.shape == (2, 20) and pixel_boxes.shape == (2, 20, 4)
    for b, res in enumerate(post({"pred_logits": logits, "pred_boxes": boxes}, sizes)):
        assert torch.equal(res["scores"], scores[b]) and torch.equal(res["boxes"], pixel_boxes[b])
