"""Selection instruments (models/instruments.py) against plain Python loops: coverage, the DAM oracle, the random
expectation (by enumerating every subset), concentration and object coverage, with padding, several levels and
per-level budgets; and the invariants (oracle ≥ every selection, random = k / valid on a uniform map)."""
import itertools
import math

import pytest
import torch

from sparse_detr.models.instruments import (box_hits, concentration, instrument_map, kept_mask, random_box_hits,
                                            random_coverage, selection_instruments, token_in_box)
from sparse_detr.models.selection import KeepBudget, select_under_budget

SHAPES = [(4, 5), (2, 3), (1, 2)]  # three levels, S = 28
VALID_HW = [(1.0, 1.0), (0.5, 0.7), (0.75, 0.4)]  # each image's unpadded fraction (h, w) of the canvas


def _geometry():
    shapes = torch.tensor(SHAPES)
    sizes = shapes.prod(1)
    starts = torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))
    pads = []
    for fh, fw in VALID_HW:  # padding bottom/right, at least one valid row and column per level
        rows = [math.ceil(fh * h) for h, _ in SHAPES]
        cols = [math.ceil(fw * w) for _, w in SHAPES]
        pads.append(torch.cat([~((torch.arange(h)[:, None] < r) & (torch.arange(w)[None, :] < c)).flatten()
                               for (h, w), r, c in zip(SHAPES, rows, cols)]))
    return shapes, starts, torch.stack(pads)


def _outputs(seed=0, budget=KeepBudget(0.2)):
    gen = torch.Generator().manual_seed(seed)
    shapes, starts, pad = _geometry()
    batch, levels = pad.shape[0], len(SHAPES)
    loc = torch.rand(batch, 2, 6, 2, levels, 3, 2, generator=gen) * 0.8
    weights = torch.rand(batch, 2, 6, 2, levels, 3, generator=gen)
    scores = torch.randn(batch, pad.shape[1], generator=gen)
    canvas = (40, 50)
    image_hw = [(math.ceil(fh * 40), math.ceil(fw * 50)) for fh, fw in VALID_HW]
    sel = select_under_budget(scores, pad, budget, SHAPES, canvas, image_hw)
    out = {"padding_mask": pad, "spatial_shapes": shapes, "level_start_index": starts,
           "dec_sampling_locations": loc, "dec_attention_weights": weights, "selection": sel}
    boxes = torch.rand(batch, 4, 4, generator=gen) * torch.tensor([0.8, 0.8, 0.5, 0.5]) + 0.1
    targets = [{"boxes": boxes[b, : b + 2], "orig_size": torch.tensor([200, 300])} for b in range(batch)]
    return out, targets


def _token_table(pad_row):
    """[(level, centre x, centre y)] of every token of one image, in its level's unpadded part, by loops."""
    table, start = [], 0
    for lvl, (h, w) in enumerate(SHAPES):
        valid_w = sum(1 for x in range(w) if not pad_row[start + x])
        valid_h = sum(1 for y in range(h) if not pad_row[start + y * w])
        table += [(lvl, (x + 0.5) / max(valid_w, 1), (y + 0.5) / max(valid_h, 1)) for y in range(h) for x in range(w)]
        start += h * w
    return table


def _brute(out, targets):
    """Every instrument by loops over images, tokens and boxes."""
    dam = instrument_map(out).tolist()
    pad = out["padding_mask"].tolist()
    res = {k: [] for k in ("cov", "oracle", "t50", "t90")}
    hits = {"kept": [0, 0], "oracle": [0, 0]}
    fg = {"kept": [0, 0], "oracle": [0, 0]}
    level_counts = out["selection"].level_counts
    for b in range(len(pad)):
        table = _token_table(pad[b])
        valid = [s for s in range(len(pad[b])) if not pad[b][s]]
        kept = {int(i) for i, v in zip(out["selection"].indices[b], out["selection"].valid[b]) if v}
        if level_counts is None:
            k = int(out["selection"].counts[b])
            oracle = set(sorted(valid, key=lambda s: -dam[b][s])[:k])
        else:
            oracle = set()
            for lvl in range(len(SHAPES)):
                in_level = [s for s in valid if table[s][0] == lvl]
                oracle |= set(sorted(in_level, key=lambda s: -dam[b][s])[:int(level_counts[b, lvl])])
        total = sum(dam[b][s] for s in valid)
        res["cov"].append(sum(dam[b][s] for s in kept) / total)
        res["oracle"].append(sum(dam[b][s] for s in oracle) / total)
        for q, key in ((0.5, "t50"), (0.9, "t90")):
            acc, n = 0.0, 0
            for v in sorted((dam[b][s] for s in valid), reverse=True):
                acc, n = acc + v, n + 1
                if acc >= q * total:
                    break
            res[key].append(n / len(valid))
        for box in targets[b]["boxes"].tolist():
            cx, cy, bw, bh = box
            inside = {s for s in valid if abs(table[s][1] - cx) <= bw / 2 and abs(table[s][2] - cy) <= bh / 2}
            for name, chosen in (("kept", kept), ("oracle", oracle)):
                hits[name][0] += bool(inside & chosen)
                hits[name][1] += 1
        for name, chosen in (("kept", kept), ("oracle", oracle)):
            for s in chosen:
                cx, cy = table[s][1], table[s][2]
                fg[name][0] += any(abs(cx - x) <= w / 2 and abs(cy - y) <= h / 2
                                   for x, y, w, h in targets[b]["boxes"].tolist())
                fg[name][1] += 1
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"dam_coverage": mean(res["cov"]), "dam_oracle": mean(res["oracle"]), "dam_tokens50": mean(res["t50"]),
            "dam_tokens90": mean(res["t90"]), "object_coverage": hits["kept"][0] / hits["kept"][1],
            "oracle_object_coverage": hits["oracle"][0] / hits["oracle"][1],
            "fg_precision": fg["kept"][0] / fg["kept"][1], "oracle_fg_precision": fg["oracle"][0] / fg["oracle"][1]}


@pytest.mark.parametrize("budget", [KeepBudget(0.2), KeepBudget(0.3, rho_levels=(0.1, 0.5, 0.5))],
                         ids=["global", "rho_levels"])
@pytest.mark.parametrize("seed", [0, 1])
def test_batched_instruments_equal_brute_force_loops(budget, seed):
    out, targets = _outputs(seed, budget)
    got = selection_instruments(out, targets).compute()
    want = _brute(out, targets)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, abs=1e-6), name
    assert got["kept_fraction"] == pytest.approx(
        (out["selection"].counts.double() / (~out["padding_mask"]).sum(1)).mean().item())


def test_oracle_bounds_every_selection_of_the_same_budget():
    out, _ = _outputs(3)
    dam = instrument_map(out)
    pad, counts = out["padding_mask"], out["selection"].counts
    oracle = selection_instruments(out).compute()["dam_oracle"]
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        scores = torch.rand(pad.shape, generator=gen)
        sel = select_under_budget(scores, pad, KeepBudget(0.2), SHAPES, (40, 50), None)
        assert torch.equal(sel.counts, counts)
        kept = kept_mask(sel.indices, sel.valid, pad.shape[1])
        cov = ((dam.masked_fill(pad, 0) * kept).sum(1) / dam.masked_fill(pad, 0).sum(1)).mean().item()
        assert cov <= oracle + 1e-7


def test_random_expectation_equals_the_mean_over_every_subset():
    """Mass and box hits of random selection: the closed forms against enumerating all C(V, k) subsets."""
    gen = torch.Generator().manual_seed(5)
    shapes = torch.tensor([[2, 3], [2, 2]])
    starts = torch.tensor([0, 6])
    pad = torch.tensor([[False] * 10, [False, False, True, False, False, True, False, True, True, True]])
    levels = torch.tensor([0] * 6 + [1] * 4)
    mass = torch.rand(2, 10, generator=gen).masked_fill(pad, 0)
    boxes = [{"boxes": torch.tensor([[0.3, 0.3, 0.5, 0.6], [0.8, 0.7, 0.3, 0.3]])},
             {"boxes": torch.tensor([[0.5, 0.5, 0.3, 0.9]])}]
    inside, real = token_in_box(pad, shapes, starts, boxes)
    for level_counts in (None, torch.tensor([[2, 1], [1, 1]])):
        counts = torch.tensor([3, 2]) if level_counts is None else level_counts.sum(1)
        level_mass = torch.zeros(2, 2).index_add_(1, levels, mass)
        if level_counts is None:
            expect = random_coverage(level_mass.sum(1, keepdim=True), (~pad).sum(1, keepdim=True), counts[:, None])
        else:
            valid_l = torch.zeros(2, 2, dtype=torch.long).index_add_(1, levels, (~pad).long())
            expect = random_coverage(level_mass, valid_l, level_counts)
        hit_p = random_box_hits(inside, pad, levels, 2, counts, level_counts)
        for b in range(2):
            valid = [s for s in range(10) if not pad[b, s]]
            if level_counts is None:
                subsets = [set(c) for c in itertools.combinations(valid, int(counts[b]))]
            else:
                per_level = [itertools.combinations([s for s in valid if levels[s] == lvl], int(level_counts[b, lvl]))
                             for lvl in range(2)]
                subsets = [set(a) | set(c) for a, c in itertools.product(*(list(p) for p in per_level))]
            covs = [sum(mass[b, s].item() for s in sub) / mass[b].sum().item() for sub in subsets]
            assert expect[b].item() == pytest.approx(sum(covs) / len(covs), abs=1e-6)
            for t in range(int(real[b].sum())):
                box_tokens = {s for s in valid if inside[b, s, t]}
                p = sum(bool(sub & box_tokens) for sub in subsets) / len(subsets)
                assert hit_p[b, t].item() == pytest.approx(p, abs=1e-6)


def test_random_expectation_on_a_uniform_map_is_k_over_valid():
    out, _ = _outputs(2)
    pad = out["padding_mask"]
    uniform = (~pad).float()
    valid = (~pad).sum(1)
    counts = out["selection"].counts
    level_mass = uniform.sum(1, keepdim=True)
    expect = random_coverage(level_mass, valid[:, None], counts[:, None])
    assert torch.allclose(expect, counts.double().div(valid).float())
    # and the random selector's mean coverage over draws approaches it
    gen = torch.Generator().manual_seed(1)
    covs = []
    for _ in range(200):
        sel = select_under_budget(torch.rand(pad.shape, generator=gen), pad, KeepBudget(0.2), SHAPES, (40, 50), None)
        covs.append((uniform * kept_mask(sel.indices, sel.valid, pad.shape[1])).sum(1) / valid)
    assert torch.allclose(torch.stack(covs).mean(0), expect, atol=1e-6)  # exact: k_b of valid_b, uniform mass


def test_concentration_of_a_peaked_and_a_flat_map():
    pad = torch.zeros(2, 10, dtype=torch.bool)
    pad[1, 8:] = True
    peaked = torch.tensor([[10.0] + [0.0] * 9, [1.0] * 8 + [5.0, 5.0]])  # row 1: the padded 5s do not count
    frac = concentration(peaked, pad)
    assert frac[0].tolist() == pytest.approx([0.1, 0.1])
    assert frac[1].tolist() == pytest.approx([4 / 8, 8 / 8])


def test_box_hits_and_in_box_tokens_by_hand():
    shapes, starts = torch.tensor([[2, 2]]), torch.tensor([0])
    pad = torch.zeros(1, 4, dtype=torch.bool)
    # centres (0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75); the box covers the right column only
    inside, real = token_in_box(pad, shapes, starts, [{"boxes": torch.tensor([[0.75, 0.5, 0.4, 1.0]])}])
    assert inside[0, :, 0].tolist() == [False, True, False, True]
    assert box_hits(torch.tensor([[True, False, True, False]]), inside).tolist() == [[False]]
    assert box_hits(torch.tensor([[False, False, False, True]]), inside).tolist() == [[True]]
