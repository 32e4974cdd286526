"""Token selection: which backbone tokens the sparse encoder updates (Sparse DETR Sec. 3.2-3.3).

A ``TokenSelector`` (an ``nn.Module`` owned by the encoder stage) scores the S backbone tokens and keeps the best of
every image under a ``KeepBudget``, returning one typed ``Selection``; when it learns, it builds its own training
target and returns its losses (``SelectorLosses``) to the criterion. One class per criterion, registered under its
``model.scorer_target`` name in ``SELECTORS`` (``@register_selector("name")`` for a new one, e.g. a subclass of
``ScorerSelector`` that defines ``target``):

    dam         scorer trained on the decoder cross-attention map (Sparse DETR, the official default)
    os          objectness of a detection head on the backbone tokens (the paper's OS ablation)
    foreground  scorer trained on a scale-aware ground-truth foreground mask (Focus-DETR, ICCV 2023)
    salience    scorer trained on a centre-salience map inside the boxes (Salience-DETR, CVPR 2024)
    random      uniformly random valid tokens, no parameters and no loss (the control)

Budgets (``KeepBudget``): image b keeps floor(ρ · valid_b) + 1 tokens (per level with ``rho_levels``; per encoder
layer, a prefix of the previous layer's set, with ``rho_layers``, Focus-DETR's cascade). The slot count k is a host
bound (``max_kept_tokens``); exact counts stay on the device, ``valid`` marks the slots that count: no host sync.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparse_detr.models.dam import decoder_attention_map, token_levels
from sparse_detr.models.heads import box_head, class_head

__all__ = [
    "KeepBudget", "Selection", "SelectorOptions", "SelectorLosses", "TokenScorer", "TokenSelector", "ScorerSelector", "DAMSelector",
    "ObjectnessSelector", "register_selector",
    "ForegroundSelector", "SalienceSelector", "RandomSelector", "SELECTORS", "build_selector", "max_kept_tokens",
    "kept_token_counts", "select_tokens", "select_under_budget", "top_count_mask", "token_geometry", "scale_aware_assignment",
    "foreground_target", "salience_target", "mask_prediction_loss", "selector_name",
]


def _valid_bounds(shapes: Sequence[tuple[int, int]], canvas_hw: tuple[int, int],
                  image_hw: Optional[Sequence[tuple[int, int]]]) -> list[list[int]]:
    """Host upper bound of every image's valid tokens per level; +1 since nearest mask resizing keeps
    ceil(ih · h / H) rows ±1 from float rounding."""
    if image_hw is None:
        return [[h * w for h, w in shapes]]
    H, W = canvas_hw
    return [[min(h, -(-ih * h // H) + 1) * min(w, -(-iw * w // W) + 1) for h, w in shapes] for ih, iw in image_hw]


def max_kept_tokens(rho: float, shapes: Sequence[tuple[int, int]], canvas_hw: tuple[int, int],
                    image_hw: Optional[Sequence[tuple[int, int]]] = None) -> int:
    """Host-side k ≥ max_b (floor(ρ · valid_b) + 1), in [1, S], from the level shapes, the padded canvas size and
    (if known) the unpadded image sizes: no device sync."""
    total = sum(h * w for h, w in shapes)
    bounds = _valid_bounds(shapes, canvas_hw, image_hw)
    return _min(total, max(_keep_bound(sum(b), rho) for b in bounds))


def _keep_bound(valid: int, rho: float) -> int:
    """floor(valid · ρ) + 1 of a host size; integer-only when the size is symbolic (torch.export of a dynamic
    ONNX graph), where float arithmetic would put guards on the image size."""
    if isinstance(valid, torch.SymInt):
        return _floor_mul_bound(valid, rho) + 1
    return math.floor(valid * rho) + 1


def _floor_mul_bound(u: torch.SymInt, rho: float) -> torch.SymInt:
    """An integer-only bound ≥ floor(u · ρ) (float64) for a symbolic u: (u · N) // 2^32 with N / 2^32 ≥ ρ + 2^-32
    exceeds the float64 product's rounding error for u < 2^31, so k is the float k or, at a rounding edge, one
    larger (an extra slot, marked invalid)."""
    scale = 2 ** 32
    return (u * (math.floor(rho * scale) + 2)) // scale


def _min(a: int, b: int) -> int:
    return torch.sym_min(a, b) if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt) else min(a, b)


def kept_token_counts(padding_mask: Tensor, rho: float, k: int) -> Tensor:
    """(B,) k_b = floor(ρ · valid_b) + 1 (Sec. 3.2), capped at valid_b and k; float64 to match the host bound."""
    return _counts((~padding_mask).sum(1), rho, k)


def _counts(valid: Tensor, rho: float, cap: int) -> Tensor:
    counts = torch.floor(valid.to(torch.float64) * rho).long() + 1
    return torch.minimum(torch.minimum(counts, valid), torch.full_like(counts, cap))


@dataclass(frozen=True)
class KeepBudget:
    """Keep ratios in (0, 1]: ``rho``; ``rho_levels`` per level (replaces rho); ``rho_layers`` non-increasing."""

    rho: float
    rho_levels: Optional[tuple[float, ...]] = None
    rho_layers: Optional[tuple[float, ...]] = None

    def __post_init__(self) -> None:
        ratios = [self.rho] + list(self.rho_levels or ()) + list(self.rho_layers or ())
        if not all(0.0 < r <= 1.0 for r in ratios):
            raise ValueError(f"keep ratios must lie in (0, 1], got rho={self.rho}, rho_levels={self.rho_levels}, "
                             f"rho_layers={self.rho_layers}")
        layers = self.rho_layers
        if layers is not None and (layers[0] != self.rho or any(b > a for a, b in zip(layers, layers[1:]))):
            raise ValueError(f"rho_layers must be non-increasing and start at rho={self.rho}, got {layers}")


@dataclass
class Selection:
    """What a selector keeps, by decreasing score, valid slots first (one typed value, ``outputs["selection"]``).

    scores (B, S) raw selector scores; indices, valid (B, k) kept token indices and the slots that count; counts (B,)
    k_b; level_counts (B, L) or None (without ``rho_levels``); layers: per encoder layer (k_i host int, counts_i
    (B,)), k_i non-increasing, each a prefix of ``indices``; heads: outputs of the selector's own heads (e.g. the
    objectness head's {pred_logits, pred_boxes, valid}), by name.
    """

    indices: Tensor
    valid: Tensor
    counts: Tensor
    level_counts: Optional[Tensor]
    layers: list[tuple[int, Tensor]]
    scores: Optional[Tensor] = None
    heads: dict = field(default_factory=dict)

    @property
    def layer_indices(self) -> list[Tensor]:
        """(B, k_i) kept indices of every encoder layer."""
        return [self.indices[:, :k_i] for k_i, _ in self.layers]

    @property
    def layer_valid(self) -> list[Tensor]:
        """(B, k_i) valid slots of every encoder layer (layer 0: ``valid``)."""
        return [self.valid] + [torch.arange(k_i, device=self.valid.device)[None, :] < counts[:, None]
                               for k_i, counts in self.layers[1:]]

    def for_layers(self, num_layers: int) -> "Selection":
        """The same selection with one ``layers`` entry per encoder layer (the last budget repeated)."""
        layers = self.layers + self.layers[-1:] * (num_layers - len(self.layers))
        return replace(self, layers=layers[:max(num_layers, 1)])


def _sort_kept(indices: Tensor, valid: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
    """Reorder slots: valid ones first, each group by decreasing score (two stable sorts, batched)."""
    order = scores.argsort(dim=1, descending=True, stable=True)
    order = order.gather(1, valid.gather(1, order).to(torch.uint8).argsort(dim=1, descending=True, stable=True))
    return indices.gather(1, order), valid.gather(1, order)


def select_tokens(scores: Tensor, padding_mask: Tensor, counts: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of scores (B, S), padding last → indices (B, k) by decreasing score, valid (B, k) for the first k_b."""
    masked = scores.detach().masked_fill(padding_mask, float("-inf"))
    indices = masked.topk(k, dim=1, sorted=True).indices
    valid = torch.arange(k, device=scores.device)[None, :] < counts[:, None]
    return indices, valid


def select_under_budget(scores: Tensor, padding_mask: Tensor, budget: KeepBudget, shapes: Sequence[tuple[int, int]],
                        canvas_hw: tuple[int, int], image_hw: Optional[Sequence[tuple[int, int]]]) -> Selection:
    """Keep the best-scored tokens of every image under ``budget``."""
    bounds = _valid_bounds(shapes, canvas_hw, image_hw)
    valid_total = (~padding_mask).sum(1)
    if budget.rho_levels is None:
        k = max_kept_tokens(budget.rho, shapes, canvas_hw, image_hw)
        counts = _counts(valid_total, budget.rho, k)
        indices, valid = select_tokens(scores, padding_mask, counts, k)
        level_counts = None
    else:  # a top-k per level (a loop over levels only), then one batched sort of the union
        masked = scores.detach().masked_fill(padding_mask, float("-inf"))
        parts, level_counts, start = [], [], 0
        for lvl, ((h, w), rho_l) in enumerate(zip(shapes, budget.rho_levels)):
            size = h * w
            k_l = _min(size, max(_keep_bound(b[lvl], rho_l) for b in bounds))
            counts_l = _counts((~padding_mask[:, start:start + size]).sum(1), rho_l, k_l)
            top = masked[:, start:start + size].topk(k_l, dim=1, sorted=True)
            slot_valid = torch.arange(k_l, device=scores.device)[None, :] < counts_l[:, None]
            parts.append((top.indices + start, slot_valid, top.values))
            level_counts.append(counts_l)
            start += size
        indices, valid = _sort_kept(*(torch.cat(p, 1) for p in zip(*parts)))
        level_counts = torch.stack(level_counts, 1)
        counts = level_counts.sum(1)
        k = indices.shape[1]
    layers = [(k, counts)]
    for rho_i in (budget.rho_layers or ())[1:]:
        prev_k, prev_counts = layers[-1]
        k_i = _min(prev_k, max(_keep_bound(sum(b), rho_i) for b in bounds))
        layers.append((k_i, torch.minimum(_counts(valid_total, rho_i, k_i), prev_counts)))
    return Selection(indices, valid, counts, level_counts, layers)


def top_count_mask(values: Tensor, padding_mask: Tensor, counts: Tensor, levels: Optional[Tensor] = None,
                   level_start_index: Optional[Tensor] = None) -> Tensor:
    """(B, S) bool: the ``counts`` (B,) largest values of each image, or (B, L) of each level with ``levels``; never
    padding. Rank-based, so no host k is needed."""
    masked = values.masked_fill(padding_mask, float("-inf"))
    order = masked.argsort(dim=1, descending=True, stable=True)
    if levels is None:
        position = torch.arange(values.shape[1], device=values.device).expand_as(order)
        ranks = torch.empty_like(order).scatter_(1, order, position)
        return ranks < counts[:, None]
    order = order.gather(1, levels[order].argsort(dim=1, stable=True))  # grouped by level, decreasing within
    position = torch.arange(values.shape[1], device=values.device).expand_as(order)
    ranks = torch.empty_like(order).scatter_(1, order, position - level_start_index[levels[order]])
    return ranks < counts.gather(1, levels.expand_as(order))


def token_geometry(padding_mask: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """centres (B, S, 2) (x, y) in the level's unpadded part (as the grid proposals), the level's valid size
    (B, S, 2) (w, h) in tokens, levels (S,), from device tensors only."""
    batch, num_tokens = padding_mask.shape
    levels = token_levels(spatial_shapes, num_tokens)
    width = spatial_shapes[levels, 1]
    local = torch.arange(num_tokens, device=padding_mask.device) - level_start_index[levels]
    x, y = local % width, torch.div(local, width, rounding_mode="floor")
    valid = (~padding_mask).float()
    num_levels = spatial_shapes.shape[0]
    valid_w = valid.new_zeros(batch, num_levels).index_add_(1, levels, valid * (y == 0)).clamp(min=1)
    valid_h = valid.new_zeros(batch, num_levels).index_add_(1, levels, valid * (x == 0)).clamp(min=1)
    sizes = torch.stack((valid_w[:, levels], valid_h[:, levels]), -1)
    centres = torch.stack((x, y), -1).float()[None] + 0.5
    return centres / sizes, sizes, levels


def _padded_boxes(targets: Sequence[dict], device: torch.device) -> tuple[Tensor, Tensor]:
    """Per-image cxcywh boxes (T_b, 4) → (B, T, 4) zero-padded, and (B, T) bool of the real ones."""
    boxes = [t["boxes"].to(device, torch.float32).reshape(-1, 4) for t in targets]
    padded = nn.utils.rnn.pad_sequence(boxes, batch_first=True) if boxes else torch.zeros(0, 0, 4, device=device)
    sizes = torch.tensor([b.shape[0] for b in boxes], device="cpu").to(device, non_blocking=True)
    real = torch.arange(padded.shape[1], device=device)[None, :] < sizes[:, None]
    return padded, real


# Salience-DETR's scale ranges (bounds 64, 128, 256 px at strides 8..64) in tokens: a box belongs to the level where
# its longer side spans (4, 8] tokens; the finest level takes smaller boxes, the coarsest larger ones.
SCALE_RANGE_TOKENS = (4.0, 8.0)


def scale_aware_assignment(padding_mask: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                           targets: Sequence[dict], scale_range: tuple[float, float] = SCALE_RANGE_TOKENS,
                           ) -> tuple[Tensor, Tensor]:
    """Focus-DETR's scale-aware assignment: token → box when its centre is inside (border included) and the box
    fits the level. Returns assigned (B, S, T) and offsets (B, S, T, 2) from the box centre in half box sizes."""
    centres, sizes, levels = token_geometry(padding_mask, spatial_shapes, level_start_index)
    boxes, real = _padded_boxes(targets, padding_mask.device)
    half = (boxes[:, None, :, 2:] / 2).clamp(min=1e-6)  # (B, 1, T, 2)
    offsets = (centres[:, :, None, :] - boxes[:, None, :, :2]) / half  # (B, S, T, 2)
    inside = (offsets.abs() <= 1).all(-1)
    side = (boxes[:, None, :, 2:] * sizes[:, :, None, :]).amax(-1)  # longer side in tokens of the level (B, S, T)
    lo, hi = scale_range
    last = spatial_shapes.shape[0] - 1
    fits = ((side > lo) | (levels == 0)[None, :, None]) & ((side <= hi) | (levels == last)[None, :, None])
    assigned = inside & fits & real[:, None, :] & ~padding_mask[:, :, None]
    return assigned, offsets


def foreground_target(padding_mask: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                      targets: Sequence[dict]) -> Tensor:
    """(B, S) float 1 where a token is assigned to some box (``scale_aware_assignment``), else 0."""
    assigned, _ = scale_aware_assignment(padding_mask, spatial_shapes, level_start_index, targets)
    return assigned.any(-1).float()


def salience_target(padding_mask: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                    targets: Sequence[dict]) -> Tensor:
    """(B, S) Salience-DETR centre salience: max over assigned boxes of 1 − ‖offset‖₂ / √2 (1 at the centre, 0 at
    corners and outside), on ``foreground_target``'s assignment so the two differ only in shape."""
    assigned, offsets = scale_aware_assignment(padding_mask, spatial_shapes, level_start_index, targets)
    if assigned.shape[-1] == 0:
        return torch.zeros(assigned.shape[:2], device=assigned.device)
    salience = (1 - offsets.norm(dim=-1) / math.sqrt(2)).clamp(min=0)
    return torch.where(assigned, salience, torch.zeros_like(salience)).amax(-1)


class TokenScorer(nn.Module):
    """Saliency logit of every token (Sparse DETR Sec. 3.2, ``enc_mask_predictor``): the second half of layer1's
    channels is replaced by its mean over the image (global context) before layer2."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.layer2 = nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(),
                                    nn.Linear(dim // 4, 1))

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """x (B, S, d); padding_mask (B, S) True = not in the mean (None: all, as official) → (B, S) logits."""
        z = self.layer1(x)
        local, ctx = z.chunk(2, dim=-1)
        if padding_mask is None:
            ctx = ctx.mean(dim=1, keepdim=True)
        else:
            keep = (~padding_mask)[..., None].to(ctx.dtype)
            ctx = (ctx * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp(min=1)
        z = torch.cat((local, ctx.expand_as(local)), dim=-1)
        return self.layer2(z).squeeze(-1)


def mask_prediction_loss(logits: Tensor, targets: Tensor, weights: Optional[Tensor] = None) -> Tensor:
    """BCE of logits (B, S) against targets in [0, 1], mean over the tokens ``weights`` (B, S) counts (None: all)
    of each image, then over images (Sparse DETR Sec. 3.2)."""
    logits, targets = logits.float(), targets.to(logits.device, torch.float32)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    if weights is None:
        return bce.mean(dim=1).mean()
    weights = weights.float()
    # where(), so a garbage logit on an uncounted token cannot turn the sum into NaN.
    bce = torch.where(weights > 0, bce * weights, torch.zeros_like(bce))
    return (bce.sum(dim=1) / weights.sum(dim=1).clamp(min=torch.finfo(torch.float32).eps)).mean()


@dataclass(frozen=True)
class SelectorOptions:
    """What a selector needs besides its budget: d (``hidden_dim``), K and the ``ModelConfig`` switches so named."""

    dim: int
    num_classes: int
    scorer_padding: str = "official"
    dam_alignment: str = "official"


@dataclass
class SelectorLosses:
    """A selector's share of the training loss: named unweighted ``terms`` (and ``stat_*`` values), and ``matched``
    heads, (loss-key suffix, {pred_logits, pred_boxes, valid}), for the criterion's Hungarian loss."""

    terms: dict[str, Tensor] = field(default_factory=dict)
    matched: list[tuple[str, dict]] = field(default_factory=list)


class TokenSelector(nn.Module, abc.ABC):
    """A selection criterion, owned by the encoder stage. Its submodules keep their official names (a checkpoint
    stores them as ``transformer.<name>``); ``layout`` names them for the checkpoint check.

    needs_features: ``score`` gets the (B, S, d) scorer input (``enc_output_norm(enc_output(src + pos))``);
    needs_decoder_sampling: the training target uses the decoder's sampling locations (the DAM).
    """

    layout = "none"
    needs_features = True
    needs_decoder_sampling = False

    def __init__(self, budget: KeepBudget, options: SelectorOptions) -> None:
        super().__init__()
        self.budget = budget

    @abc.abstractmethod
    def score(self, features: Optional[Tensor], proposals: Tensor, padding_mask: Tensor) -> tuple[Tensor, dict]:
        """Scores (B, S) of the backbone tokens, and the outputs of the selector's own heads by name (every criterion
        defines it: a subclass without it cannot be instantiated)."""

    def forward(self, features: Optional[Tensor], proposals: Tensor, padding_mask: Tensor,
                shapes: Sequence[tuple[int, int]], canvas_hw: tuple[int, int],
                image_hw: Optional[Sequence[tuple[int, int]]]) -> Selection:
        """Score the tokens and keep the best under the budget (Sparse DETR Sec. 3.2)."""
        scores, heads = self.score(features, proposals, padding_mask)
        selection = select_under_budget(scores, padding_mask, self.budget, shapes, canvas_hw, image_hw)
        return replace(selection, scores=scores, heads=heads)

    def target(self, outputs: dict, targets: Optional[Sequence[dict]]) -> Optional[Tensor]:
        """The scorer's (B, S) target, or None (no target, or ground truth needed)."""
        return None

    def losses(self, outputs: dict, targets: Sequence[dict]) -> SelectorLosses:
        """The selector's loss terms and Hungarian-matched heads for a forward's ``outputs``."""
        return SelectorLosses()

    def loss_weights(self, cls: float, bbox: float, giou: float, mask: float) -> dict[str, float]:
        """Weight of every loss key the selector returns (its terms and its matched heads' keys)."""
        return {}


class ScorerSelector(TokenSelector):
    """The public base of a scorer-trained criterion: a ``TokenScorer`` (``transformer.enc_mask_predictor``) trained
    by ``mask_prediction_loss`` (``loss_mask``) on ``target``; a subclass defines ``target`` and registers itself
    with ``@register_selector("name")``. scorer_padding "official": padding in the mean and the loss, padded logits
    set to the batch minimum (as the official code)."""

    layout = "scorer (transformer.enc_mask_predictor)"

    def __init__(self, budget: KeepBudget, options: SelectorOptions) -> None:
        super().__init__(budget, options)
        if options.scorer_padding not in ("official", "exclude"):
            raise ValueError(f"scorer_padding must be 'official' or 'exclude', got {options.scorer_padding!r}")
        self.scorer_padding = options.scorer_padding
        self.enc_mask_predictor = TokenScorer(options.dim)
        for p in self.enc_mask_predictor.parameters():  # Deformable DETR's init of the transformer's matrices
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def score(self, features: Optional[Tensor], proposals: Tensor, padding_mask: Tensor) -> tuple[Tensor, dict]:
        excluded = padding_mask if self.scorer_padding == "exclude" else None
        return self.enc_mask_predictor(features, excluded), {}

    def losses(self, outputs: dict, targets: Sequence[dict]) -> SelectorLosses:
        scores, pad = outputs["selection"].scores, outputs["padding_mask"]
        target = self.target(outputs, targets)
        if self.scorer_padding == "official":
            return SelectorLosses({"loss_mask": mask_prediction_loss(scores.masked_fill(pad, scores.min()), target)})
        return SelectorLosses({"loss_mask": mask_prediction_loss(scores, target, (~pad).float())})

    def loss_weights(self, cls: float, bbox: float, giou: float, mask: float) -> dict[str, float]:
        return {"loss_mask": mask}


class DAMSelector(ScorerSelector):
    """Scorer trained on the top-k_b tokens (per level with ``rho_levels``) of the DAM (Sparse DETR Sec. 3.2)."""

    needs_decoder_sampling = True

    def __init__(self, budget: KeepBudget, options: SelectorOptions) -> None:
        super().__init__(budget, options)
        self.alignment = options.dam_alignment

    def attention_map(self, outputs: dict) -> Tensor:
        """The (B, S) decoder attention map."""
        return decoder_attention_map(outputs["dec_sampling_locations"], outputs["dec_attention_weights"],
                                     outputs["spatial_shapes"], outputs["level_start_index"],
                                     outputs["padding_mask"].shape[1], self.alignment)

    def target(self, outputs: dict, targets: Optional[Sequence[dict]]) -> Optional[Tensor]:
        if "dec_sampling_locations" not in outputs:
            return None
        pad, selection = outputs["padding_mask"], outputs["selection"]
        level_counts = selection.level_counts
        if level_counts is None:
            return top_count_mask(self.attention_map(outputs), pad, selection.counts).float()
        levels = token_levels(outputs["spatial_shapes"], pad.shape[1])
        return top_count_mask(self.attention_map(outputs), pad, level_counts, levels,
                              outputs["level_start_index"]).float()


class _GroundTruthSelector(ScorerSelector):
    """A scorer trained on a per-token map of the ground-truth boxes: ``target_map(padding_mask, spatial_shapes,
    level_start_index, targets) -> (B, S)``; no map without ground truth."""

    target_map = staticmethod(foreground_target)

    def target(self, outputs: dict, targets: Optional[Sequence[dict]]) -> Optional[Tensor]:
        if targets is None:
            return None
        return self.target_map(outputs["padding_mask"], outputs["spatial_shapes"], outputs["level_start_index"],
                               targets)


class ForegroundSelector(_GroundTruthSelector):
    """Scorer trained on the scale-aware ground-truth foreground mask (Focus-DETR)."""

    target_map = staticmethod(foreground_target)


class SalienceSelector(_GroundTruthSelector):
    """Scorer trained on the centre-salience map (Salience-DETR), with soft-target BCE (minimum at p = target)."""

    target_map = staticmethod(salience_target)


class ObjectnessSelector(TokenSelector):
    """Objectness-score selection (Sparse DETR Sec. 4.3): class + box heads on the backbone tokens, ranked by max
    class logit, trained by the Hungarian loss (suffix ``_backbone``)."""

    layout = "objectness head (transformer.backbone_class_embed, backbone_bbox_embed)"
    SUFFIX = "_backbone"

    def __init__(self, budget: KeepBudget, options: SelectorOptions) -> None:
        super().__init__(budget, options)
        self.backbone_class_embed = class_head(options.dim, options.num_classes)
        self.backbone_bbox_embed = box_head(options.dim)

    def score(self, features: Optional[Tensor], proposals: Tensor, padding_mask: Tensor) -> tuple[Tensor, dict]:
        logits = self.backbone_class_embed(features)
        boxes = (self.backbone_bbox_embed(features) + proposals).sigmoid()
        valid = torch.isfinite(proposals).all(-1)  # invalid grid proposals are +inf (padding included)
        return logits.max(-1).values, {"backbone": {"pred_logits": logits, "pred_boxes": boxes, "valid": valid}}

    def losses(self, outputs: dict, targets: Sequence[dict]) -> SelectorLosses:
        return SelectorLosses(matched=[(self.SUFFIX, outputs["selection"].heads["backbone"])])

    def loss_weights(self, cls: float, bbox: float, giou: float, mask: float) -> dict[str, float]:
        return {"loss_ce" + self.SUFFIX: cls, "loss_bbox" + self.SUFFIX: bbox, "loss_giou" + self.SUFFIX: giou}


class RandomSelector(TokenSelector):
    """Uniformly random valid tokens (i.i.d. scores from torch's global generator, so seeded); no loss."""

    needs_features = False

    def score(self, features: Optional[Tensor], proposals: Tensor, padding_mask: Tensor) -> tuple[Tensor, dict]:
        return torch.rand(padding_mask.shape, device=padding_mask.device), {}


#: ``model.scorer_target`` → selector class; ``register_selector`` adds to it.
SELECTORS: dict[str, type[TokenSelector]] = {
    "dam": DAMSelector,
    "os": ObjectnessSelector,
    "foreground": ForegroundSelector,
    "salience": SalienceSelector,
    "random": RandomSelector,
}


def register_selector(name: str) -> Callable[[type[TokenSelector]], type[TokenSelector]]:
    """Class decorator: make a ``TokenSelector`` subclass the criterion ``model.scorer_target: name``. The one
    registration a new criterion needs (the config, the engine and the tools take any registered name)."""
    def register(cls: type[TokenSelector]) -> type[TokenSelector]:
        if not (isinstance(cls, type) and issubclass(cls, TokenSelector)):
            raise TypeError(f"register_selector({name!r}): {cls!r} is not a TokenSelector subclass")
        if SELECTORS.get(name, cls) is not cls:
            raise ValueError(f"register_selector: {name!r} is taken by {SELECTORS[name].__name__}")
        SELECTORS[name] = cls
        return cls
    return register


def selector_name(selector: TokenSelector) -> str:
    """The ``SELECTORS`` key of a selector (its ``model.scorer_target``)."""
    return next((name for name, cls in SELECTORS.items() if type(selector) is cls), type(selector).__name__)


def build_selector(target: str, budget: KeepBudget, options: SelectorOptions) -> TokenSelector:
    """The selector named ``target`` (a key of ``SELECTORS``)."""
    if target not in SELECTORS:
        raise ValueError(f"unknown token selection {target!r}; choose one of {sorted(SELECTORS)}")
    return SELECTORS[target](budget, options)
