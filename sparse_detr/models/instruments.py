"""Selection instruments: how good a token selection is, against the decoder's attention and the ground truth.

Sparse DETR's premise (Sec. 3.2) is that the decoder references a minority of the encoder tokens and that a scorer
trained on the decoder cross-attention map (DAM) keeps them. These numbers say whether a selection does, for any
criterion and for a dense model (at a reference budget). Every value is a batch sum with its count, so that the
same code gives a training step's value and a val-set aggregate (``InstrumentMeter``).

DAM side (the map of ``decoder_attention_map`` with ``alignment="aligned"``: where the sampler really reads, for
every criterion alike; padding left out):
    dam_coverage       share of the DAM mass on the kept tokens (mean over images)
    dam_oracle         the same for the DAM's own top-k_b (per level under ``rho_levels``): the best any selection
                       of this budget can do
    dam_random         the expectation for k_b uniformly random valid tokens (per level: k_l / valid_l of each
                       level's mass)
    dam_efficiency     (coverage − random) / (oracle − random) of the means: 0 = random, 1 = oracle
    dam_tokens50/90    fraction of the valid tokens that hold 50% / 90% of the mass (its concentration)
    dam_share_l{i}     share of the mass on level i; dam_coverage_l{i}, dam_oracle_l{i}: coverage within level i
Ground-truth side (a token "hits" a box when its centre lies inside it, border included):
    object_coverage    fraction of the boxes with at least one kept token (pooled over images);
                       _small / _medium / _large by COCO's area ranges (32², 96² px of the original image)
    fg_precision       share of the kept tokens inside some box (pooled)
    oracle_*, random_* the same for the DAM oracle set and in expectation for random selection
Budget: kept_fraction (kept / valid tokens), kept_share_l{i} (share of the kept tokens on level i).

The kept set is the first encoder layer's (later layers keep prefixes of it under ``rho_layers``).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from sparse_detr.models.dam import decoder_attention_map, token_levels
from sparse_detr.models.selection import _counts, _padded_boxes, top_count_mask, token_geometry

__all__ = ["INSTRUMENT_ALIGNMENT", "REFERENCE_RHO", "InstrumentMeter", "selection_instruments", "kept_mask",
           "mass_coverage", "concentration", "random_coverage", "box_hits", "random_box_hits", "token_in_box",
           "box_areas", "instrument_map", "format_instruments"]

INSTRUMENT_ALIGNMENT = "aligned"
REFERENCE_RHO = 0.1  # the budget of the oracle and random references of a dense model
AREA_BOUNDS = (32.0 ** 2, 96.0 ** 2)  # COCO's small / medium / large
SIZES = ("small", "medium", "large")


def kept_mask(indices: Tensor, valid: Tensor, num_tokens: int) -> Tensor:
    """(B, S) bool of the kept tokens from slots indices, valid (B, k)."""
    mask = torch.zeros(indices.shape[0], num_tokens, dtype=torch.bool, device=indices.device)
    return mask.scatter_(1, indices, valid)  # top-k slots hold distinct tokens


def instrument_map(outputs: dict) -> Tensor:
    """(B, S) the DAM of a forward run with ``return_maps=True`` (``dec_sampling_locations`` in ``outputs``)."""
    return decoder_attention_map(outputs["dec_sampling_locations"], outputs["dec_attention_weights"],
                                 outputs["spatial_shapes"], outputs["level_start_index"],
                                 outputs["padding_mask"].shape[1], INSTRUMENT_ALIGNMENT)


def _level_sums(values: Tensor, levels: Tensor, num_levels: int) -> Tensor:
    """(B, S) → (B, L) sums per level."""
    return values.new_zeros(values.shape[0], num_levels).index_add_(1, levels, values)


def mass_coverage(dam: Tensor, padding_mask: Tensor, kept: Tensor, levels: Tensor, num_levels: int,
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """Share of the mass on ``kept`` (B, S): overall (B,), per level (B, L), and the level masses (B, L)."""
    dam = dam.float().masked_fill(padding_mask, 0.0)
    total = _level_sums(dam, levels, num_levels)
    covered = _level_sums(dam * kept, levels, num_levels)
    overall = covered.sum(1) / total.sum(1).clamp(min=1e-30)
    return overall, covered / total.clamp(min=1e-30), total


def concentration(dam: Tensor, padding_mask: Tensor, fractions: Sequence[float] = (0.5, 0.9)) -> Tensor:
    """(B, F): the fewest valid tokens holding each fraction of the mass, as a fraction of the valid tokens."""
    values = dam.float().masked_fill(padding_mask, 0.0).clamp(min=0)
    cum = values.sort(dim=1, descending=True).values.cumsum(1)
    total = cum[:, -1:]
    q = torch.tensor(list(fractions), device=dam.device, dtype=cum.dtype)
    need = (cum[:, None, :] < q[None, :, None] * total[:, :, None]).sum(-1) + 1  # (B, F)
    valid = (~padding_mask).sum(1, keepdim=True).clamp(min=1)
    return need.float() / valid


def _budget_per_level(padding_mask: Tensor, levels: Tensor, num_levels: int, counts: Tensor,
                      level_counts: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Valid tokens and kept counts per level (B, L'): one pseudo-level (L' = 1) for a global budget."""
    if level_counts is None:
        return (~padding_mask).sum(1, keepdim=True), counts[:, None]
    return _level_sums((~padding_mask).long(), levels, num_levels), level_counts


def random_coverage(level_mass: Tensor, valid: Tensor, keep: Tensor) -> Tensor:
    """(B,) expected mass share of uniformly random tokens: keep (B, L') of valid (B, L') per (pseudo-)level, whose
    mass is level_mass (B, L'). Each valid token is kept with probability keep / valid."""
    p = keep.float() / valid.float().clamp(min=1)
    return (level_mass * p).sum(1) / level_mass.sum(1).clamp(min=1e-30)


def token_in_box(padding_mask: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                 targets: Sequence[dict]) -> tuple[Tensor, Tensor]:
    """inside (B, S, T): the token's centre lies in box t (border included, never padding); real (B, T)."""
    centres, _, _ = token_geometry(padding_mask, spatial_shapes, level_start_index)
    boxes, real = _padded_boxes(targets, padding_mask.device)
    half = boxes[:, None, :, 2:] / 2
    inside = ((centres[:, :, None, :] - boxes[:, None, :, :2]).abs() <= half).all(-1)
    return inside & real[:, None, :] & ~padding_mask[:, :, None], real


def box_areas(targets: Sequence[dict], device: torch.device) -> Tensor:
    """(B, T) box areas in pixels of the original image (``orig_size``, else ``size``), zero-padded."""
    areas = []
    for t in targets:
        h, w = t["orig_size"] if "orig_size" in t else t["size"]
        boxes = t["boxes"].to(device, torch.float32).reshape(-1, 4)
        areas.append(boxes[:, 2] * boxes[:, 3] * (h * w))  # one image's (T_b,), no host read
    if not areas:
        return torch.zeros(0, 0, device=device)
    return torch.nn.utils.rnn.pad_sequence(areas, batch_first=True)


def box_hits(kept: Tensor, inside: Tensor) -> Tensor:
    """(B, T) bool: some kept token (B, S) lies in box t."""
    return (inside & kept[:, :, None]).any(1)


def random_box_hits(inside: Tensor, padding_mask: Tensor, levels: Tensor, num_levels: int, counts: Tensor,
                    level_counts: Optional[Tensor]) -> Tensor:
    """(B, T) probability that uniformly random selection under the budget hits box t: 1 − Π_l C(V_l − n_l, k_l)
    / C(V_l, k_l), with n_l the box's tokens on (pseudo-)level l."""
    if level_counts is None:
        n = inside.sum(1, dtype=torch.float64)[:, None]  # (B, 1, T)
        valid, keep = (~padding_mask).sum(1, keepdim=True), counts[:, None]
    else:
        n = inside.double().new_zeros(inside.shape[0], num_levels, inside.shape[2]).index_add_(
            1, levels, inside.double())
        valid, keep = _budget_per_level(padding_mask, levels, num_levels, counts, level_counts)
    v, k = valid.double()[:, :, None], keep.double()[:, :, None]
    rest = v - n
    # log C(rest, k) − log C(v, k); C(rest, k) = 0 when rest < k (a hit is certain).
    log_miss = (torch.lgamma(rest + 1) - torch.lgamma(rest - k + 1).where(rest >= k, torch.zeros_like(rest))
                - torch.lgamma(v + 1) + torch.lgamma(v - k + 1))
    miss = torch.where(rest >= k, log_miss.exp(), torch.zeros_like(log_miss)).prod(1)
    return (1 - miss).float()


class InstrumentMeter:
    """Sums and counts of the instruments over batches; ``compute`` turns them into means (one host read)."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, Tensor] = {}

    def add(self, name: str, total: Tensor, count: Tensor) -> None:
        total, count = total.detach().double().reshape(()), count.detach().double().reshape(())
        if name in self.sums:
            self.sums[name] = self.sums[name] + total
            self.counts[name] = self.counts[name] + count
        else:
            self.sums[name], self.counts[name] = total, count

    def update(self, other: "InstrumentMeter") -> None:
        for name in other.sums:
            self.add(name, other.sums[name], other.counts[name])

    def state(self) -> dict[str, tuple[float, float]]:
        """{name: (sum, count)} as host floats (one read), to gather across processes."""
        names = list(self.sums)
        if not names:
            return {}
        pairs = torch.stack([torch.stack((self.sums[n], self.counts[n])) for n in names]).cpu().tolist()
        return {n: (s, c) for n, (s, c) in zip(names, pairs)}

    @classmethod
    def merged(cls, states: Sequence[dict[str, tuple[float, float]]]) -> "InstrumentMeter":
        """One meter of the ``state()`` of several (e.g. every process's)."""
        meter = cls()
        for state in states:
            for name, (total, count) in state.items():
                meter.add(name, torch.tensor(total, dtype=torch.float64), torch.tensor(count, dtype=torch.float64))
        return meter

    def compute(self) -> dict[str, float]:
        """Means (a name with nothing counted, e.g. no large box, is left out), and dam_efficiency from the
        means."""
        if not self.sums:
            return {}
        names = list(self.sums)
        sums = torch.stack([self.sums[n] for n in names]).cpu().tolist()
        counts = torch.stack([self.counts[n] for n in names]).cpu().tolist()
        out = {n: s / c for n, s, c in zip(names, sums, counts) if c > 0}
        if {"dam_coverage", "dam_oracle", "dam_random"} <= out.keys():
            span = out["dam_oracle"] - out["dam_random"]
            if span > 1e-9:
                out["dam_efficiency"] = (out["dam_coverage"] - out["dam_random"]) / span
        return out


@torch.no_grad()
def selection_instruments(outputs: dict, targets: Optional[Sequence[dict]] = None,
                          reference_rho: float = REFERENCE_RHO, kept: Optional[Tensor] = None) -> InstrumentMeter:
    """The instruments of one forward pass run with ``return_maps=True`` (see the module docstring).

    outputs: the detector's dict; a dense one (no ``selection``) gets the DAM references at ``reference_rho``.
    targets: per image ``boxes`` (T_b, 4) cxcywh in [0, 1] of the unpadded image and ``orig_size``; None: the
    DAM side only. kept: (B, S) bool, another selection of the same budget to measure instead of the model's."""
    meter = InstrumentMeter()
    pad, shapes, starts = outputs["padding_mask"], outputs["spatial_shapes"], outputs["level_start_index"]
    batch, num_tokens = pad.shape
    num_levels = shapes.shape[0]
    levels = token_levels(shapes, num_tokens)
    images = pad.new_ones(()).float() * batch
    selection = outputs.get("selection")
    if selection is not None:
        counts, level_counts = selection.counts, selection.level_counts
        kept = kept_mask(selection.indices, selection.valid, num_tokens) if kept is None else kept
    else:
        level_counts = None
        counts = _counts((~pad).sum(1), reference_rho, num_tokens)
    valid_tokens = (~pad).sum(1)

    if "dec_sampling_locations" in outputs:
        dam = instrument_map(outputs)
        if level_counts is None:
            oracle = top_count_mask(dam, pad, counts)
        else:
            oracle = top_count_mask(dam, pad, level_counts, levels, starts)
        oracle_cov, oracle_lvl, mass = mass_coverage(dam, pad, oracle, levels, num_levels)
        has_mass = mass.sum(1) > 0
        n_mass = has_mass.sum()
        meter.add("dam_oracle", _masked_sum(oracle_cov, has_mass), n_mass)
        valid, keep = _budget_per_level(pad, levels, num_levels, counts, level_counts)
        pseudo_mass = mass if level_counts is not None else mass.sum(1, keepdim=True)
        meter.add("dam_random", _masked_sum(random_coverage(pseudo_mass, valid, keep), has_mass), n_mass)
        conc = concentration(dam, pad)
        meter.add("dam_tokens50", _masked_sum(conc[:, 0], has_mass), n_mass)
        meter.add("dam_tokens90", _masked_sum(conc[:, 1], has_mass), n_mass)
        share = mass / mass.sum(1, keepdim=True).clamp(min=1e-30)
        for lvl in range(num_levels):
            level_has = has_mass & (mass[:, lvl] > 0)
            meter.add(f"dam_share_l{lvl}", _masked_sum(share[:, lvl], has_mass), n_mass)
            meter.add(f"dam_oracle_l{lvl}", _masked_sum(oracle_lvl[:, lvl], level_has), level_has.sum())
        if kept is not None:
            cov, cov_lvl, _ = mass_coverage(dam, pad, kept, levels, num_levels)
            meter.add("dam_coverage", _masked_sum(cov, has_mass), n_mass)
            for lvl in range(num_levels):
                level_has = has_mass & (mass[:, lvl] > 0)
                meter.add(f"dam_coverage_l{lvl}", _masked_sum(cov_lvl[:, lvl], level_has), level_has.sum())
    else:
        oracle = None

    if kept is not None:
        n_kept = kept.sum(1)
        meter.add("kept_fraction", (n_kept.float() / valid_tokens.clamp(min=1)).sum(), images)
        kept_levels = _level_sums(kept.float(), levels, num_levels)
        for lvl in range(num_levels):
            meter.add(f"kept_share_l{lvl}", kept_levels[:, lvl].sum(), n_kept.sum())

    if targets is not None:
        inside, real = token_in_box(pad, shapes, starts, targets)
        areas = box_areas(targets, pad.device)
        in_any = inside.any(-1)  # (B, S)
        n_boxes = real.sum()
        sets = [("", kept), ("oracle_", oracle)]
        for prefix, chosen in sets:
            if chosen is None:
                continue
            hits = box_hits(chosen, inside) & real
            meter.add(prefix + "object_coverage", hits.sum(), n_boxes)
            meter.add(prefix + "fg_precision", (chosen & in_any).sum(), chosen.sum())
            if prefix == "":
                _add_sizes(meter, "object_coverage", hits.float(), real, areas)
        random_hits = random_box_hits(inside, pad, levels, num_levels, counts, level_counts) * real
        meter.add("random_object_coverage", random_hits.sum(), n_boxes)
        meter.add("random_fg_precision", in_any.sum(), valid_tokens.sum())
    return meter


def _masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    """Sum of values where mask, without a boolean index (no host sync)."""
    return torch.where(mask, values, torch.zeros_like(values)).sum()


def _add_sizes(meter: InstrumentMeter, name: str, hits: Tensor, real: Tensor, areas: Tensor) -> None:
    lo, hi = AREA_BOUNDS
    for size, in_range in zip(SIZES, (areas < lo, (areas >= lo) & (areas < hi), areas >= hi)):
        chosen = in_range & real
        meter.add(f"{name}_{size}", (hits * chosen).sum(), chosen.sum())


_MAIN = ("dam_coverage", "dam_oracle", "dam_random", "dam_efficiency", "dam_tokens50", "dam_tokens90",
         "object_coverage", "oracle_object_coverage", "random_object_coverage", "fg_precision",
         "oracle_fg_precision", "random_fg_precision")


def format_instruments(values: dict[str, float]) -> str:
    """A short text block of the instruments (fractions in %), for the evaluation's printout."""
    def pct(name: str) -> str:
        v = values.get(name)
        return "–" if v is None or not math.isfinite(v) else f"{100 * v:.1f}"

    lines = ["selection instruments (% ; DAM = decoder attention map, aligned):",
             f"  DAM coverage   kept {pct('dam_coverage')}  oracle {pct('dam_oracle')}  random {pct('dam_random')}"
             f"  efficiency {pct('dam_efficiency')}",
             f"  DAM concentration: 50% of the mass on {pct('dam_tokens50')}% of the tokens, 90% on "
             f"{pct('dam_tokens90')}%",
             f"  object coverage kept {pct('object_coverage')} (small {pct('object_coverage_small')}, medium "
             f"{pct('object_coverage_medium')}, large {pct('object_coverage_large')})  oracle "
             f"{pct('oracle_object_coverage')}  random {pct('random_object_coverage')}",
             f"  foreground precision kept {pct('fg_precision')}  oracle {pct('oracle_fg_precision')}  random "
             f"{pct('random_fg_precision')}"]
    levels = sorted({int(k.rsplit("_l", 1)[1]) for k in values if k.startswith("dam_share_l")})
    if levels:
        lines.append("  per level (kept share / DAM share / coverage / oracle): " + "  ".join(
            f"L{i} {pct(f'kept_share_l{i}')}/{pct(f'dam_share_l{i}')}/{pct(f'dam_coverage_l{i}')}/"
            f"{pct(f'dam_oracle_l{i}')}" for i in levels))
    return "\n".join(lines)
