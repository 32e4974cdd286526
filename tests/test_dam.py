"""The decoder cross-attention map and its binarised target (Sparse DETR Sec. 3.2) against brute-force Python loops."""
import math

import pytest
import torch

from sparse_detr.models.dam import decoder_attention_map, token_levels
from sparse_detr.models.instruments import kept_mask, mass_coverage
from sparse_detr.models.selection import top_count_mask

SHAPES = [(5, 7), (3, 4), (1, 2)]
S = sum(h * w for h, w in SHAPES)
SPATIAL = torch.tensor(SHAPES)
START = torch.tensor([0, 35, 47])


def _brute_force_dam(loc, weights, alignment):
    """One Python iteration per (image, layer, query, head, level, point, corner)."""
    B, Ld, Q, H, L, P, _ = loc.shape
    dam = torch.zeros(B, S, dtype=torch.float64)
    shift = 0.5 if alignment == "aligned" else 0.0
    for b in range(B):
        for i in range(Ld):
            for q in range(Q):
                for h in range(H):
                    for lvl, (height, width) in enumerate(SHAPES):
                        for p in range(P):
                            x = float(loc[b, i, q, h, lvl, p, 0]) * width - shift
                            y = float(loc[b, i, q, h, lvl, p, 1]) * height - shift
                            x0, y0 = math.floor(x), math.floor(y)
                            a = float(weights[b, i, q, h, lvl, p])
                            for cx, cy in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
                                if 0 <= cx < width and 0 <= cy < height:
                                    w = (1 - abs(x - cx)) * (1 - abs(y - cy))
                                    dam[b, int(START[lvl]) + cy * width + cx] += a * w
    return dam


@pytest.mark.parametrize("alignment", ["official", "aligned"])
def test_dam_matches_brute_force(alignment):
    torch.manual_seed(0)
    loc = torch.rand(2, 2, 3, 2, 3, 2, 2) * 1.4 - 0.2  # some samples fall outside the maps
    weights = torch.rand(2, 2, 3, 2, 3, 2)
    dam = decoder_attention_map(loc, weights, SPATIAL, START, S, alignment)
    torch.testing.assert_close(dam.double(), _brute_force_dam(loc, weights, alignment), rtol=1e-5, atol=1e-5)


def test_alignment_at_a_pixel_centre():
    """A sample at the centre of cell (x=2, y=1) of level 0: the sampler reads that cell only. Aligned splats all
    the weight there; the official target spreads it over the cell and its right/lower neighbours (0.25 each)."""
    loc = torch.zeros(1, 1, 1, 1, 3, 1, 2)
    loc[..., 0, :, :] = torch.tensor([2.5 / 7, 1.5 / 5])
    loc[..., 1:, :, :] = -5.0  # the other levels' samples are far outside: dropped
    weights = torch.ones(1, 1, 1, 1, 3, 1)
    aligned = decoder_attention_map(loc, weights, SPATIAL, START, S, "aligned")
    official = decoder_attention_map(loc, weights, SPATIAL, START, S, "official")
    assert aligned[0, 1 * 7 + 2] == pytest.approx(1.0) and aligned.sum() == pytest.approx(1.0)
    for cell in (1 * 7 + 2, 1 * 7 + 3, 2 * 7 + 2, 2 * 7 + 3):
        assert official[0, cell] == pytest.approx(0.25)


def test_dam_targets_are_the_top_k_b_real_tokens():
    torch.manual_seed(0)
    dam = torch.rand(3, S)
    pad = torch.zeros(3, S, dtype=torch.bool)
    pad[1, 30:] = True
    dam[1, 40:] = 10.0  # heavy attention on padding must not make padding a target
    counts = torch.tensor([5, 3, 1])
    targets = top_count_mask(dam, pad, counts)
    for b in range(3):
        real = [i for i in range(S) if not pad[b, i]]
        best = sorted(real, key=lambda i: -float(dam[b, i]))[: int(counts[b])]
        assert targets[b].nonzero().flatten().tolist() == sorted(best)


def test_dam_targets_per_level_are_the_top_counts_of_every_level():
    """With per-level budgets (model.rho_levels) the target takes the top counts[b, l] real tokens of each level."""
    torch.manual_seed(1)
    dam = torch.rand(2, S)
    pad = torch.zeros(2, S, dtype=torch.bool)
    pad[1, 20:40] = True
    levels = token_levels(SPATIAL, S)
    start = torch.cat((torch.zeros(1, dtype=torch.long), SPATIAL.prod(1).cumsum(0)[:-1]))
    counts = torch.randint(0, 4, (2, SPATIAL.shape[0]))
    targets = top_count_mask(dam, pad, counts, levels, start)
    for b in range(2):
        expected = []
        for lvl in range(SPATIAL.shape[0]):
            real = [i for i in range(S) if not pad[b, i] and int(levels[i]) == lvl]
            expected += sorted(real, key=lambda i: -float(dam[b, i]))[: int(counts[b, lvl])]
        assert targets[b].nonzero().flatten().tolist() == sorted(expected)


def test_dam_coverage_matches_brute_force():
    torch.manual_seed(0)
    dam = torch.rand(2, S)
    pad = torch.zeros(2, S, dtype=torch.bool)
    pad[0, 20:35] = True
    indices = torch.stack([torch.randperm(S)[:6] for _ in range(2)])
    valid = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    overall, per_level, _ = mass_coverage(dam, pad, kept_mask(indices, valid, S), token_levels(SPATIAL, S), 3)
    for b in range(2):
        kept = set(indices[b][valid[b]].tolist())
        level_of = [lvl for lvl, (h, w) in enumerate(SHAPES) for _ in range(h * w)]
        mass = [float(dam[b, i]) * (not pad[b, i]) for i in range(S)]
        assert float(overall[b]) == pytest.approx(sum(mass[i] for i in kept) / sum(mass), rel=1e-5)
        for lvl in range(3):
            tokens = [i for i in range(S) if level_of[i] == lvl]
            expected = sum(mass[i] for i in tokens if i in kept) / sum(mass[i] for i in tokens)
            assert float(per_level[b, lvl]) == pytest.approx(expected, rel=1e-5)
