"""Hungarian matcher against a brute-force search over all assignments of an independently computed cost."""
import itertools
import math

import pytest
import torch
import torchvision

from sparse_detr.models.matcher import HungarianMatcher, flatten_indices

ALPHA, GAMMA = 0.25, 2.0
W_CLASS, W_BBOX, W_GIOU = 2.0, 5.0, 2.0


def _targets(sizes, num_classes, g):
    out = []
    for t in sizes:
        cxcy = torch.rand(t, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(t, 2, generator=g) * 0.3 + 0.05
        out.append({"labels": torch.randint(0, num_classes, (t,), generator=g), "boxes": torch.cat([cxcy, wh], 1)})
    return out


def _outputs(bsz, queries, num_classes, g):
    boxes = torch.cat([torch.rand(bsz, queries, 2, generator=g) * 0.6 + 0.2,
                       torch.rand(bsz, queries, 2, generator=g) * 0.3 + 0.05], -1)
    return {"pred_logits": torch.randn(bsz, queries, num_classes, generator=g) * 2, "pred_boxes": boxes}


def _reference_cost(logit_row, box, label, tgt_box):
    """One (prediction, target) pair, written out with scalars and torchvision's GIoU."""
    p = 1 / (1 + math.exp(-logit_row[label].item()))
    pos = ALPHA * (1 - p) ** GAMMA * -math.log(p)
    neg = (1 - ALPHA) * p ** GAMMA * -math.log(1 - p)
    l1 = (box - tgt_box).abs().sum().item()
    xyxy = torchvision.ops.box_convert(torch.stack([box, tgt_box]), "cxcywh", "xyxy")
    giou = torchvision.ops.generalized_box_iou(xyxy[:1], xyxy[1:]).item()
    return W_CLASS * (pos - neg) + W_BBOX * l1 - W_GIOU * giou


def _brute_force_min(cost, valid_rows, num_targets):
    """Minimum total cost over every one-to-one assignment of min(#valid, T) pairs."""
    best = math.inf
    if len(valid_rows) >= num_targets:
        for rows in itertools.permutations(valid_rows, num_targets):
            best = min(best, sum(cost[r][j] for j, r in enumerate(rows)))
    else:
        for cols in itertools.permutations(range(num_targets), len(valid_rows)):
            best = min(best, sum(cost[r][c] for r, c in zip(valid_rows, cols)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    num_classes, queries = 5, 6
    sizes = [int(torch.randint(0, 5, (1,), generator=g)) for _ in range(3)] + [0]  # always one empty image
    outputs, targets = _outputs(4, queries, num_classes, g), _targets(sizes, num_classes, g)
    valid = torch.rand(4, queries, generator=g) > 0.4
    valid[0] = True  # at least one image with every prediction valid
    # Invalid slots may hold garbage (inf boxes on padding): they must neither be matched nor poison the cost.
    outputs["pred_boxes"][~valid] = float("inf")
    outputs["valid"] = valid

    indices = HungarianMatcher(W_CLASS, W_BBOX, W_GIOU, ALPHA, GAMMA)(outputs, targets)
    assert len(indices) == 4
    for b, (pred_idx, tgt_idx) in enumerate(indices):
        t = targets[b]
        rows = valid[b].nonzero().flatten().tolist()
        cost = [[_reference_cost(outputs["pred_logits"][b, q], outputs["pred_boxes"][b, q], t["labels"][j],
                                 t["boxes"][j]) if q in rows else math.nan for j in range(sizes[b])]
                for q in range(queries)]
        assert pred_idx.dtype == torch.int64 and tgt_idx.dtype == torch.int64
        assert len(pred_idx) == min(len(rows), sizes[b])
        assert set(pred_idx.tolist()) <= set(rows)  # never an invalid prediction
        assert len(set(pred_idx.tolist())) == len(pred_idx) and len(set(tgt_idx.tolist())) == len(tgt_idx)
        got = sum(cost[q][j] for q, j in zip(pred_idx.tolist(), tgt_idx.tolist()))
        assert got == pytest.approx(_brute_force_min(cost, rows, sizes[b]) if sizes[b] else 0, abs=1e-4)


def test_cost_matrix_matches_reference():
    g = torch.Generator().manual_seed(7)
    outputs, targets = _outputs(2, 4, 3, g), _targets([2, 3], 3, g)
    matcher = HungarianMatcher(W_CLASS, W_BBOX, W_GIOU, ALPHA, GAMMA)
    labels = torch.cat([t["labels"] for t in targets])
    boxes = torch.cat([t["boxes"] for t in targets])
    cost = matcher.cost_matrix(outputs["pred_logits"], outputs["pred_boxes"], labels, boxes)
    assert cost.shape == (2, 4, 5)
    for b, q, j in itertools.product(range(2), range(4), range(5)):
        ref = _reference_cost(outputs["pred_logits"][b, q], outputs["pred_boxes"][b, q], labels[j], boxes[j])
        assert cost[b, q, j].item() == pytest.approx(ref, rel=1e-4, abs=1e-4)


def test_batched_equals_per_image():
    g = torch.Generator().manual_seed(3)
    outputs, targets = _outputs(3, 6, 4, g), _targets([3, 0, 4], 4, g)
    outputs["valid"] = torch.rand(3, 6, generator=g) > 0.2
    matcher = HungarianMatcher()
    batched = matcher(outputs, targets)
    for b in range(3):
        single = matcher({k: v[b:b + 1] for k, v in outputs.items()}, targets[b:b + 1])[0]
        assert torch.equal(batched[b][0], single[0]) and torch.equal(batched[b][1], single[1])


def test_no_targets_anywhere_and_more_targets_than_valid():
    g = torch.Generator().manual_seed(4)
    matcher = HungarianMatcher()
    outputs = _outputs(2, 3, 2, g)
    for pred_idx, tgt_idx in matcher(outputs, _targets([0, 0], 2, g)):
        assert pred_idx.shape == (0,) and tgt_idx.shape == (0,) and pred_idx.dtype == torch.int64
    outputs["valid"] = torch.tensor([[True, False, True], [False, False, False]])
    indices = matcher(outputs, _targets([4, 2], 2, g))
    assert sorted(indices[0][0].tolist()) == [0, 2] and len(indices[0][1]) == 2
    assert len(indices[1][0]) == 0


def test_nan_in_valid_prediction_is_named():
    g = torch.Generator().manual_seed(5)
    outputs = _outputs(1, 3, 2, g)
    outputs["pred_logits"][0, 1, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="image 0"):
        HungarianMatcher()(outputs, _targets([2], 2, g))


def test_flatten_indices_offsets_targets_by_image():
    indices = [(torch.tensor([1, 4]), torch.tensor([1, 0])), (torch.empty(0, dtype=torch.int64),) * 2,
               (torch.tensor([0]), torch.tensor([2]))]
    batch_idx, pred_idx, tgt_idx = flatten_indices(indices, [2, 1, 3])
    assert batch_idx.tolist() == [0, 0, 2] and pred_idx.tolist() == [1, 4, 0] and tgt_idx.tolist() == [1, 0, 5]


def _heads(g, bsz, num_classes):
    """Heads of one step as the criterion sees them: varied query counts, some with valid masks."""
    heads = []
    for queries, masked in ((6, False), (6, False), (11, True), (4, True), (9, True)):
        head = _outputs(bsz, queries, num_classes, g)
        if masked:
            head["valid"] = torch.rand(bsz, queries, generator=g) > 0.4
        heads.append(head)
    return heads


@pytest.mark.parametrize("seed", range(5))
def test_match_heads_equals_per_head_match(seed):
    g = torch.Generator().manual_seed(10 + seed)
    sizes = [int(torch.randint(0, 6, (1,), generator=g)) for _ in range(3)] + [0]  # an image without boxes
    targets = _targets(sizes, 5, g)
    heads = _heads(g, 4, 5)
    agnostic = [False, False, True, False, False]  # the two-stage head may match against label 0
    matcher = HungarianMatcher()
    got = matcher.match_heads(heads, targets, agnostic)
    assert len(got) == len(heads)
    for head, flag, (batch_idx, pred_idx, tgt_idx) in zip(heads, agnostic, got):
        head_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets] if flag else targets
        want = flatten_indices(matcher(head, head_targets), sizes)
        for a, b in zip((batch_idx, pred_idx, tgt_idx), want):
            assert a.dtype == torch.int64 and torch.equal(a, b)


def test_match_heads_without_any_target():
    g = torch.Generator().manual_seed(7)
    got = HungarianMatcher().match_heads(_heads(g, 2, 3), _targets([0, 0], 3, g))
    assert len(got) == 5 and all(t.shape == (0,) and t.dtype == torch.int64 for match in got for t in match)


class OnDevice(torch.Tensor):
    """A CPU tensor that plays an accelerator tensor: results of ops on it stay OnDevice, ``.cpu()`` (the way the
    matcher copies to the host) is counted as a transfer, and every other host read of its data is counted too."""

    transfers = 0
    host_reads = 0
    _READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__bool__,
              torch.Tensor.__int__, torch.Tensor.__float__}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.cpu:
            OnDevice.transfers += 1
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {})).as_subclass(torch.Tensor)
        if func in cls._READS:
            OnDevice.host_reads += 1
        return super().__torch_function__(func, types, args, kwargs)


def _on_device(x):
    if isinstance(x, torch.Tensor):
        leaf = x.detach().as_subclass(OnDevice)
        return leaf.requires_grad_(x.requires_grad) if x.is_floating_point() else leaf
    if isinstance(x, dict):
        return {k: _on_device(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_on_device(v) for v in x]
    return x


def test_criterion_step_makes_one_device_to_host_transfer():
    from sparse_detr.models.criterion import SetCriterion, build_weight_dict

    g = torch.Generator().manual_seed(8)
    outputs = _outputs(2, 5, 4, g)
    outputs["aux_outputs"] = [_outputs(2, 5, 4, g) for _ in range(2)]
    outputs["enc_outputs"] = {**_outputs(2, 12, 4, g), "valid": torch.rand(2, 12, generator=g) > 0.3}
    outputs["enc_aux_outputs"] = [{**_outputs(2, 6, 4, g), "valid": torch.rand(2, 6, generator=g) > 0.3}
                                  for _ in range(2)]
    targets = _targets([3, 0], 4, g)  # one image without boxes
    criterion = SetCriterion(4, HungarianMatcher(), build_weight_dict(num_dec_layers=3, num_enc_aux=2,
                                                                      two_stage=True))
    expected = criterion(outputs, targets)  # plain CPU tensors: the values to reproduce

    # Host -> device: a plain (host) tensor moved with .to(device) is counted; the matcher's indices are one.
    uploads, real_to = [], torch.Tensor.to

    def counting_to(self, *args, **kwargs):
        if type(self) is torch.Tensor and (kwargs.get("device") is not None or (args and isinstance(
                args[0], (torch.device, str)))):
            uploads.append(tuple(self.shape))
        return real_to(self, *args, **kwargs)

    OnDevice.transfers = OnDevice.host_reads = 0
    torch.Tensor.to = counting_to
    try:
        losses = criterion(_on_device(outputs), _on_device(targets))
    finally:
        torch.Tensor.to = real_to
    assert OnDevice.transfers == 1, "one packed copy of every head's costs per step"
    assert OnDevice.host_reads == 0
    # N: image 0's 3 boxes matched by each of the 3 decoder heads and by each encoder head (at most its valid
    # queries of image 0); image 1 has no box.
    valid = [outputs["enc_outputs"]["valid"]] + [a["valid"] for a in outputs["enc_aux_outputs"]]
    matched = 3 * 3 + sum(min(3, int(v[0].sum())) for v in valid)
    assert uploads == [(3, matched)], "one (3, N) upload of every head's (batch, query, target) indices"
    assert losses.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(losses[k].as_subclass(torch.Tensor), expected[k])
