"""Token selection (models/selection.py): every criterion end to end, the budgets, the ground-truth targets against
brute-force loops, the random control, and the DAM criterion against loops on a real forward pass."""
import itertools
import math
import pathlib
import re

import pytest
import torch

from sparse_detr.config import ConfigError, load_config
from sparse_detr.models import build_model, weighted_total
from sparse_detr.models.selection import (SELECTORS, foreground_target, salience_target, scale_aware_assignment,
                                          token_geometry)

SMALL = ["model.hidden_dim=32", "model.nheads=4", "model.enc_layers=3", "model.dec_layers=2",
         "model.dim_feedforward=64", "model.num_queries=12", "model.num_classes=5", "model.dropout=0.0",
         "model.train_backbone=false"]
IMAGES = [(3, 64, 96), (3, 96, 72)]
TARGETS = [{"labels": torch.tensor([1, 4]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
           {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
CRITERIA = sorted(SELECTORS)


def _build(config, *extra):
    torch.manual_seed(0)
    cfg = load_config(f"configs/{config}.yaml", SMALL + list(extra))
    return cfg, *build_model(cfg)


def _images(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=gen) for s in IMAGES]


class _EncoderSpy:
    """Records every encoder layer's input map and output queries (the map before / after each layer)."""

    def __init__(self, model):
        self.before, self.hooks = [], []
        for layer in model.encoder.stack.layers:
            self.hooks.append(layer.register_forward_hook(self._record))
        self.hooks.append(model.encoder.stack.register_forward_hook(self._final))

    def _record(self, module, args, output):
        self.before.append(args[3].detach().clone())  # `value`: the full map this layer reads

    def _final(self, module, args, output):
        self.after_last = output[0].detach().clone()

    def remove(self):
        for h in self.hooks:
            h.remove()


@pytest.mark.parametrize("config", ["demo_synthetic", "sparse_detr_r50_rho0.1"])
@pytest.mark.parametrize("criterion_name", CRITERIA)
def test_every_criterion_forward_criterion_backward(config, criterion_name):
    cfg, model, criterion, _ = _build(config, f"model.scorer_target={criterion_name}")
    spy = _EncoderSpy(model)
    out = model(_images())
    spy.remove()
    pad = out["padding_mask"]
    valid = (~pad).sum(1)
    expected = [math.floor(0.1 * int(v)) + 1 for v in valid]
    assert out["selection"].counts.tolist() == expected == out["selection"].valid.sum(1).tolist()
    assert not pad.gather(1, out["selection"].indices)[out["selection"].valid].any()  # padding never kept

    # Tokens a layer does not keep are bit-identical before and after it.
    maps = spy.before + [spy.after_last]
    for i, (indices, slot_valid) in enumerate(zip(out["selection"].layer_indices, out["selection"].layer_valid)):
        kept = torch.zeros_like(pad).scatter_(1, indices, slot_valid)
        assert torch.equal(maps[i + 1][~kept], maps[i][~kept])
        assert (maps[i + 1][kept] - maps[i][kept]).abs().amax(-1).min() > 0  # and every kept token changed

    losses = criterion(out, TARGETS)
    own = set(model.selector.loss_weights(1, 1, 1, 1))
    assert own <= set(losses) and own <= set(criterion.weight_dict)
    scorer = list(model.selector.enc_mask_predictor.parameters()) if hasattr(
        model.selector, "enc_mask_predictor") else []
    assert bool(scorer) == (criterion_name in ("dam", "foreground", "salience"))
    # Every loss but the selector's own: no gradient reaches the scorer (selection passes indices only).
    others = {k: w for k, w in criterion.weight_dict.items() if k not in own}
    weighted_total(losses, others).backward(retain_graph=True)
    assert all(p.grad is None or not p.grad.any() for p in scorer)
    assert model.encoder.stack.layers[0].linear1.weight.grad.abs().sum() > 0
    if "loss_mask" in own:  # and its own loss does reach it
        model.zero_grad(set_to_none=True)
        losses["loss_mask"].backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in scorer)
    if criterion_name == "random":
        assert not list(model.selector.parameters()) and not own


def _padded_mask(sizes, canvas, shapes):
    """The flattened token padding mask of images of `sizes` on `canvas`, as the detector builds it."""
    import torch.nn.functional as F

    mask = torch.ones(len(sizes), *canvas, dtype=torch.bool)
    for b, (h, w) in enumerate(sizes):
        mask[b, :h, :w] = False
    return torch.cat([F.interpolate(mask[None].float(), size=s).to(torch.bool)[0].flatten(1) for s in shapes], 1)


SHAPES = [(16, 24), (8, 12), (4, 6)]
SPATIAL = torch.tensor(SHAPES)
START = torch.cat((torch.zeros(1, dtype=torch.long), SPATIAL.prod(1).cumsum(0)[:-1]))


def _brute_force_target(pad, targets, salience):
    """Loops over images, tokens and boxes: the definition of the foreground / salience targets."""
    batch, num = pad.shape
    out = torch.zeros(batch, num)
    for b in range(batch):
        for lvl, (h, w) in enumerate(SHAPES):
            grid = pad[b, int(START[lvl]):int(START[lvl]) + h * w].view(h, w)
            valid_w, valid_h = int((~grid[0]).sum()), int((~grid[:, 0]).sum())
            for y in range(h):
                for x in range(w):
                    s = int(START[lvl]) + y * w + x
                    if pad[b, s]:
                        continue
                    cx, cy = (x + 0.5) / valid_w, (y + 0.5) / valid_h
                    for bx, by, bw, bh in targets[b]["boxes"].tolist():
                        side = max(bw * valid_w, bh * valid_h)  # longer side in tokens of this level
                        fits = (side > 4 or lvl == 0) and (side <= 8 or lvl == len(SHAPES) - 1)
                        ox, oy = (cx - bx) / (bw / 2), (cy - by) / (bh / 2)
                        if fits and abs(ox) <= 1 and abs(oy) <= 1:
                            value = max(0.0, 1 - math.hypot(ox, oy) / math.sqrt(2)) if salience else 1.0
                            out[b, s] = max(out[b, s], value)
    return out


def test_foreground_and_salience_targets_equal_a_brute_force_loop():
    pad = _padded_mask([(64, 96), (40, 56)], (64, 96), SHAPES)
    gen = torch.Generator().manual_seed(0)
    targets = []
    for count in (8, 5):  # boxes of 1 to 80 tokens of level 0: every level gets some
        centre = torch.rand(count, 2, generator=gen) * 0.8 + 0.1
        size = torch.exp(torch.rand(count, 2, generator=gen) * math.log(80)) / 24
        targets.append({"boxes": torch.cat((centre, size.clamp(max=0.9)), 1)})
    targets.append({"boxes": torch.zeros(0, 4)})  # an image without boxes
    pad = torch.cat((pad, pad[:1]))
    fg = foreground_target(pad, SPATIAL, START, targets)
    sal = salience_target(pad, SPATIAL, START, targets)
    torch.testing.assert_close(fg, _brute_force_target(pad, targets, salience=False))
    torch.testing.assert_close(sal, _brute_force_target(pad, targets, salience=True))
    assert fg[0].sum() > 0 and fg[1].sum() > 0 and fg[2].sum() == 0
    levels = torch.repeat_interleave(torch.arange(3), SPATIAL.prod(1))
    assert len({int(levels[i]) for i in fg[:2].nonzero()[:, 1]}) == 3  # positives on every level
    assert ((sal > 0) == (fg > 0)).all() and sal.max() <= 1


def test_token_geometry_matches_the_grid_proposal_centres():
    from sparse_detr.models.encoder import grid_proposals

    pad = _padded_mask([(64, 96), (40, 56)], (64, 96), SHAPES)
    centres, _, _ = token_geometry(pad, SPATIAL, START)
    logits, valid = grid_proposals(pad, SHAPES)
    inside = valid  # the proposals are finite where valid
    torch.testing.assert_close(centres[inside], logits.sigmoid()[..., :2][inside])


def test_no_boxes_gives_empty_targets():
    pad = torch.zeros(2, int(SPATIAL.prod(1).sum()), dtype=torch.bool)
    empty = [{"boxes": torch.zeros(0, 4)}] * 2
    assigned, _ = scale_aware_assignment(pad, SPATIAL, START, empty)
    assert assigned.shape[-1] == 0
    assert not salience_target(pad, SPATIAL, START, empty).any()


def test_random_selection_is_uniform_over_valid_tokens_and_seeded():
    from scipy.stats import chisquare

    _, model, _, _ = _build("demo_synthetic", "model.scorer_target=random")
    model.eval()
    image = [torch.randn(3, 64, 96), torch.randn(3, 40, 56)]  # the second image is padded
    counts = None
    with torch.no_grad():
        torch.manual_seed(3)
        first = model(image)
        hits = torch.zeros_like(first["padding_mask"], dtype=torch.float64)
        draws = 120
        for _ in range(draws):
            out = model(image)
            hits += torch.zeros_like(hits).scatter_(1, out["selection"].indices, out["selection"].valid.double())
        torch.manual_seed(3)
        again = model(image)
    assert torch.equal(first["selection"].indices, again["selection"].indices)  # same seed, same tokens
    pad = first["padding_mask"]
    counts = first["selection"].counts
    for b in range(2):
        assert hits[b][pad[b]].sum() == 0
        observed = hits[b][~pad[b]]
        expected = torch.full_like(observed, float(counts[b]) * draws / observed.numel())
        assert chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-3


def test_rho_levels_keep_the_requested_count_per_level():
    cfg, model, criterion, _ = _build("demo_synthetic", "model.rho_levels=[0.05,0.1,0.3,0.5]")
    out = model(_images())
    pad, shapes = out["padding_mask"], out["spatial_shapes"].tolist()
    levels = torch.repeat_interleave(torch.arange(len(shapes)), out["spatial_shapes"].prod(1))
    kept = torch.zeros_like(pad).scatter_(1, out["selection"].indices, out["selection"].valid)
    for b in range(2):
        for lvl, rho in enumerate(cfg.model.rho_levels):
            valid = int((~pad[b] & (levels == lvl)).sum())
            assert int((kept[b] & (levels == lvl)).sum()) == min(valid, math.floor(rho * valid) + 1)
            assert int(out["selection"].level_counts[b, lvl]) == min(valid, math.floor(rho * valid) + 1)
    assert not (kept & pad).any()
    assert out["selection"].valid.sum(1).tolist() == out["selection"].counts.tolist()
    assert torch.equal(out["selection"].valid, torch.arange(out["selection"].valid.shape[1]) < out["selection"].counts[:, None])
    target = model.selector.target(out, TARGETS)  # the DAM target follows the same per-level budget
    for lvl in range(len(shapes)):
        assert ((target.bool() & (levels == lvl)).sum(1) == out["selection"].level_counts[:, lvl]).all()
    weighted_total(criterion(out, TARGETS), criterion.weight_dict).backward()


def test_rho_layers_cascade_nests_and_costs_less():
    from sparse_detr.engine.studies.benchmark import count_flops

    cfg, model, criterion, _ = _build("demo_synthetic", "model.rho=0.4", "model.rho_layers=[0.4,0.2,0.05]")
    out = model(_images())
    valid = (~out["padding_mask"]).sum(1)
    sets = []
    for rho, indices, slot_valid in zip(cfg.model.rho_layers, out["selection"].layer_indices,
                                        out["selection"].layer_valid):
        assert slot_valid.sum(1).tolist() == [math.floor(rho * int(v)) + 1 for v in valid]
        sets.append([set(indices[b][slot_valid[b]].tolist()) for b in range(2)])
    for inner, outer in zip(sets[1:], sets):
        assert all(i < o for i, o in zip(inner, outer))  # strictly inside the previous layer's set
    assert [a["pred_logits"].shape[1] for a in out["enc_aux_outputs"]] == [
        i.shape[1] for i in out["selection"].layer_indices[:-1]]
    weighted_total(criterion(out, TARGETS), criterion.weight_dict).backward()

    _, flat, _, _ = _build("demo_synthetic", "model.rho=0.4")
    image = [torch.randn(3, 96, 128)]
    cascade, same = count_flops(model, image), count_flops(flat, image)
    assert cascade["parts"]["encoder"] < 0.75 * same["parts"]["encoder"]
    assert cascade["parts"]["backbone"] == same["parts"]["backbone"]


@pytest.mark.parametrize("override, key", [
    ("model.rho_levels=[0.1,0.2]", "model.rho_levels"),  # 4 levels
    ("model.rho_levels=[0.1,0.2,0.0,0.3]", "model.rho_levels"),
    ("model.rho_layers=[0.1,0.2]", "model.rho_layers"),  # 2 encoder layers in the demo, but increasing
    ("model.rho_layers=[0.2,0.1]", "model.rho_layers"),  # must start at rho = 0.1
    ("model.rho_layers=[0.1]", "model.rho_layers"),
])
def test_budget_validation_names_the_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config("configs/demo_synthetic.yaml", [override])
    with pytest.raises(ConfigError, match="model.rho_layers needs model.rho > 0"):
        load_config("configs/efficient_detr_r50.yaml", ["model.rho_layers=[0.1,0.1,0.1,0.1,0.1,0.1]"])


@pytest.mark.parametrize("scorer_padding", ["official", "exclude"])
def test_dam_criterion_end_to_end_against_loops(scorer_padding):
    """The DAM criterion on a real forward pass (padded images, 4 levels) against independent loops: the decoder
    map splatted sample by sample, each image's top-k_b valid tokens, and the BCE of the scorer's logits token by
    token (Sec. 3.2; "official": padded logits set to the batch minimum and counted, "exclude": left out)."""
    _, model, criterion, _ = _build("demo_synthetic", f"model.scorer_padding={scorer_padding}")
    model.train()
    out = model(_images())
    loss = criterion(out, TARGETS)["loss_mask"]
    pad, shapes, starts = out["padding_mask"], out["spatial_shapes"].tolist(), out["level_start_index"].tolist()
    loc, attn = out["dec_sampling_locations"].double(), out["dec_attention_weights"].double()
    B, Ld, Q, H, L, P, _ = loc.shape
    dam = torch.zeros(B, pad.shape[1], dtype=torch.float64)
    for b, i, q, h, lvl, p in itertools.product(range(B), range(Ld), range(Q), range(H), range(L), range(P)):
        height, width = shapes[lvl]
        x, y = float(loc[b, i, q, h, lvl, p, 0]) * width, float(loc[b, i, q, h, lvl, p, 1]) * height  # official
        x0, y0 = math.floor(x), math.floor(y)
        for cx, cy in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
            if 0 <= cx < width and 0 <= cy < height:
                dam[b, starts[lvl] + cy * width + cx] += float(attn[b, i, q, h, lvl, p]) * (1 - abs(x - cx)) * (
                    1 - abs(y - cy))
    logits = out["selection"].scores.detach().double()
    fill = logits.min().item()
    per_image = []
    for b in range(B):
        valid = [s for s in range(pad.shape[1]) if not pad[b, s]]
        k = math.floor(0.1 * len(valid)) + 1  # Sec. 3.2: k_b = floor(rho * valid_b) + 1
        assert int(out["selection"].counts[b]) == k
        top = set(sorted(valid, key=lambda s: -dam[b, s].item())[:k])
        tokens = range(pad.shape[1]) if scorer_padding == "official" else valid
        terms = []
        for s in tokens:
            z = fill if pad[b, s] else logits[b, s].item()
            y = 1.0 if s in top else 0.0
            terms.append(max(z, 0) - z * y + math.log1p(math.exp(-abs(z))))  # stable BCE with logits
        per_image.append(sum(terms) / len(terms))
    assert loss.item() == pytest.approx(sum(per_image) / B, rel=1e-4)


def test_selection_lives_in_one_module():
    """No criterion-name branch outside models/selection.py, and models import neither data nor engine."""
    root = pathlib.Path(__file__).parents[1] / "sparse_detr"
    for path in root.rglob("*.py"):
        text = path.read_text()
        if path.name != "selection.py":
            assert not re.search(r"scorer_target\s*(==|!=|in\b)", text), path
            assert not re.search(r"""==\s*["'](dam|os|foreground|salience|random)["']""", text), path
        if path.parent.name == "models":
            assert not re.search(r"^\s*(from|import) sparse_detr\.(data|engine)", text, re.M), path


def test_flop_counter_charges_each_selector_its_own_cost():
    from sparse_detr.engine.studies.benchmark import count_flops

    image = [torch.randn(3, 64, 96)]
    parts = {}
    for name in CRITERIA:
        _, model, _, _ = _build("demo_synthetic", f"model.scorer_target={name}")
        parts[name] = count_flops(model, image)["parts"]
    assert parts["random"]["selector"] == 0
    assert parts["dam"]["selector"] == parts["foreground"]["selector"] == parts["salience"]["selector"] > 0
    assert parts["os"]["selector"] > parts["dam"]["selector"]  # a K-way class head and a 3-layer box MLP
    for name in CRITERIA:  # the rest of the model costs the same whatever selects the tokens
        assert parts[name]["backbone"] == parts["dam"]["backbone"] and parts[name]["encoder"] == parts["dam"]["encoder"]


def test_an_unregistered_criterion_is_an_error_naming_the_key():
    cfg = load_config("configs/demo_synthetic.yaml", SMALL + ["model.scorer_target=salient"])
    with pytest.raises(ConfigError, match=r"model.scorer_target: unknown token selection 'salient'; registered: "
                                          r"\['dam', 'foreground', 'os', 'random', 'salience'\]"):
        build_model(cfg)


@pytest.fixture
def registry():
    """The selector registry, restored after the test (a test's own criterion does not leak into others)."""
    saved = dict(SELECTORS)
    yield SELECTORS
    SELECTORS.clear()
    SELECTORS.update(saved)


def test_the_readme_example_adds_a_working_criterion(registry):
    """The README's "add a criterion" example, run as written: a new selector trains through the criterion."""
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("A new criterion is one class", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    exec(block, {})
    assert registry["centre"].__name__ == "CentreSelector"
    _, model, criterion, _ = _build("demo_synthetic", "model.scorer_target=centre")
    assert type(model.selector).__name__ == "CentreSelector"
    model.train()
    out = model(_images())
    losses = criterion(out, TARGETS)
    weighted_total(losses, criterion.weight_dict).backward()
    assert model.selector.enc_mask_predictor.layer1[1].weight.grad.abs().sum() > 0  # its scorer learns from loss_mask
    target = model.selector.target(out, TARGETS)
    foreground = foreground_target(out["padding_mask"], out["spatial_shapes"], out["level_start_index"], TARGETS)
    assert target.sum() > 0 and (target <= foreground).all()  # the inner half of the foreground
