"""The sparse encoder (Sparse DETR Sec. 3.2-3.3): token budget, selection, write-back, sparse == dense, scorer gradients."""
import math

import pytest
import torch
import torch.nn.functional as F

from sparse_detr.config import config_from_dict
from sparse_detr.models import build_model, weighted_total
from sparse_detr.models.encoder import SparseEncoder, dense_reference_points, grid_proposals
from sparse_detr.models.selection import TokenScorer, kept_token_counts, max_kept_tokens, select_tokens

SHAPES = [(6, 8), (3, 4), (2, 2)]
S = sum(h * w for h, w in SHAPES)


def _level_masks(canvas, sizes, shapes):
    """Flattened token padding mask exactly as the detector builds it (nearest resize of the image mask)."""
    H, W = canvas
    mask = torch.ones(len(sizes), H, W, dtype=torch.bool)
    for b, (h, w) in enumerate(sizes):
        mask[b, :h, :w] = False
    levels = [F.interpolate(mask[None].float(), size=s).to(torch.bool)[0] for s in shapes]
    return torch.cat([m.flatten(1) for m in levels], 1), levels


def _valid_ratios(levels):
    return torch.stack([torch.stack(((~m[:, 0, :]).sum(1) / m.shape[2], (~m[:, :, 0]).sum(1) / m.shape[1]), -1)
                        for m in levels], 1).float()


def test_max_kept_tokens_bounds_the_exact_counts():
    """The host-side k (no device sync) is never below max_b k_b, and is exact without padding."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        H, W = (int(x) for x in torch.randint(40, 700, (2,), generator=gen))
        shapes = [(-(-H // s), -(-W // s)) for s in (8, 16, 32, 64)]
        sizes = [(H, W)] + [(int(torch.randint(1, H + 1, (), generator=gen)),
                             int(torch.randint(1, W + 1, (), generator=gen))) for _ in range(2)]
        pad, _ = _level_masks((H, W), sizes, shapes)
        rho = float(torch.rand((), generator=gen)) * 0.6 + 0.01
        k = max_kept_tokens(rho, shapes, (H, W), sizes)
        counts = kept_token_counts(pad, rho, k)
        valid = (~pad).sum(1)
        expected = torch.tensor([min(math.floor(float(v) * rho) + 1, int(v)) for v in valid])
        assert torch.equal(counts, expected)  # k_b = floor(ρ · valid_b) + 1: the cap at k never bites
        assert k == min(math.floor(rho * pad.shape[1]) + 1, pad.shape[1])  # image 0 is unpadded: tight
        assert max_kept_tokens(rho, shapes, (H, W), sizes[1:]) >= int(counts[1:].max())
        assert max_kept_tokens(rho, shapes, (H, W)) >= k  # no sizes: the padded-shape bound


def test_selection_keeps_floor_rho_valid_plus_one_and_never_padding():
    pad, _ = _level_masks((48, 64), [(48, 64), (30, 20)], SHAPES)
    scores = torch.randn(2, S)
    scores[pad] = 100.0  # padding scored highest by the scorer must still never be kept
    k = max_kept_tokens(0.3, SHAPES, (48, 64), [(48, 64), (30, 20)])
    counts = kept_token_counts(pad, 0.3, k)
    indices, valid = select_tokens(scores, pad, counts, k)
    valid_b = (~pad).sum(1)
    assert counts.tolist() == [math.floor(0.3 * int(v)) + 1 for v in valid_b]
    assert valid.sum(1).tolist() == counts.tolist()
    assert not pad.gather(1, indices)[valid].any()
    for b in range(2):  # the kept tokens are the top-k_b real tokens
        real = torch.where(pad[b], torch.full_like(scores[b], -1e9), scores[b])
        assert set(indices[b, :counts[b]].tolist()) == set(real.topk(int(counts[b])).indices.tolist())


def _encoder_inputs(seed=0, sizes=((48, 64), (30, 20))):
    torch.manual_seed(seed)
    pad, levels = _level_masks((48, 64), list(sizes), SHAPES)
    ratios = _valid_ratios(levels)
    src, pos = torch.randn(2, S, 32), torch.randn(2, S, 32)
    spatial = torch.tensor(SHAPES)
    start = torch.cat((torch.zeros(1, dtype=torch.long), spatial.prod(1).cumsum(0)[:-1]))
    return src, pos, dense_reference_points(SHAPES, ratios), spatial, start, pad


def _encoder():
    torch.manual_seed(1)
    return SparseEncoder(2, d_model=32, d_ffn=64, dropout=0.0, n_levels=3, n_heads=4, n_points=2).eval()


def test_tokens_not_kept_are_unchanged_by_every_layer():
    src, pos, ref, spatial, start, pad = _encoder_inputs()
    k = max_kept_tokens(0.2, SHAPES, (48, 64))
    counts = kept_token_counts(pad, 0.2, k)
    indices, valid = select_tokens(torch.randn(2, S), pad, counts, k)
    with torch.no_grad():
        memory, _ = _encoder()(src, pos, ref, spatial, start, pad, indices, [valid, valid])
    kept = torch.zeros(2, S, dtype=torch.bool).scatter_(1, indices, valid)
    assert torch.equal(memory[~kept], src[~kept])  # bit-exact: never written
    assert (memory[kept] - src[kept]).abs().amax(-1).min() > 1e-3  # every kept token was updated


def test_sparse_encoder_equals_dense_when_every_token_is_kept():
    src, pos, ref, spatial, start, pad = _encoder_inputs(sizes=((48, 64), (48, 64)))
    assert not pad.any()
    k = max_kept_tokens(1.0, SHAPES, (48, 64))
    counts = kept_token_counts(pad, 1.0, k)
    assert k == S and counts.tolist() == [S, S]
    indices, valid = select_tokens(torch.randn(2, S), pad, counts, k)  # a random order of all tokens
    encoder = _encoder()
    with torch.no_grad():
        sparse, _ = encoder(src, pos, ref, spatial, start, pad, indices, [valid, valid])
        dense, _ = encoder(src, pos, ref, spatial, start, pad)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)


def test_grid_proposals_match_the_method_definition():
    pad, _ = _level_masks((48, 64), [(48, 64), (30, 20)], SHAPES)
    logits, valid = grid_proposals(pad, SHAPES)
    assert not valid[pad].any() and torch.isinf(logits[~valid]).all()
    boxes = logits.sigmoid()
    # image 1, level 0 (6x8 grid, 4x3 valid cells given a 30x20 image on a 48x64 canvas): token (y=1, x=2)
    valid_h, valid_w = int((~pad[1, :48].view(6, 8)[:, 0]).sum()), int((~pad[1, :48].view(6, 8)[0]).sum())
    torch.testing.assert_close(boxes[1, 1 * 8 + 2], torch.tensor([2.5 / valid_w, 1.5 / valid_h, 0.05, 0.05]))
    assert torch.allclose(boxes[0, 48 + 12:, 2:][valid[0, 48 + 12:]], torch.tensor(0.2))  # level 2: 0.05 * 4


def test_scorer_exclude_mode_ignores_padding():
    """With padding excluded from the global mean, adding padding does not change the real tokens' logits."""
    torch.manual_seed(0)
    scorer = TokenScorer(32)
    x = torch.randn(1, 10, 32)
    padded = torch.cat((x, torch.randn(1, 6, 32)), 1)
    pad = torch.zeros(1, 16, dtype=torch.bool)
    pad[:, 10:] = True
    torch.testing.assert_close(scorer(padded, pad)[:, :10], scorer(x, torch.zeros(1, 10, dtype=torch.bool)))
    assert not torch.allclose(scorer(padded)[:, :10], scorer(x))  # the official mean does depend on padding


@pytest.fixture(scope="module")
def tiny_sparse():
    torch.manual_seed(0)
    model = dict(hidden_dim=32, nheads=4, enc_layers=2, dec_layers=2, dim_feedforward=64, num_queries=8,
                 num_classes=3, dropout=0.0, two_stage=True, with_box_refine=True, eff_query_init=True,
                 eff_specific_head=True, rho=0.2, use_enc_aux_loss=True, backbone="tiny_cnn")
    return build_model(config_from_dict({"model": model}))


TARGETS = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.4, 0.5, 0.3, 0.4]])},
           {"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.3]])}]


@pytest.mark.parametrize("only_mask", [False, True])
def test_scorer_learns_only_through_the_mask_loss(only_mask, tiny_sparse):
    torch.manual_seed(0)
    model, criterion, _ = tiny_sparse
    model.zero_grad(set_to_none=True)
    images = [torch.randn(3, 64, 80), torch.randn(3, 80, 56)]
    losses = criterion(model(images), TARGETS)
    weights = dict(criterion.weight_dict)
    weights = {"loss_mask": 1.0} if only_mask else {**weights, "loss_mask": 0.0}
    weighted_total(losses, weights).backward()
    scorer = model.selector.enc_mask_predictor
    scorer_grads = [p.grad for p in scorer.parameters()]
    if only_mask:
        assert all(g is not None and g.abs().sum() > 0 for g in scorer_grads)
    else:  # every other loss reaches the rest of the model but not the scorer (selection is indices only)
        assert all(g is None or g.abs().sum() == 0 for g in scorer_grads)
        assert model.encoder.stack.layers[0].linear1.weight.grad.abs().sum() > 0
        assert model.decoder.class_embed[0].weight.grad.abs().sum() > 0
        assert model.tokens.backbone[0].body.stem[0][0].weight.grad.abs().sum() > 0
