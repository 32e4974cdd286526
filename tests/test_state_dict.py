"""Our R50 models have exactly the official checkpoint layout (keys and shapes) and load such a state dict strictly.

The expected layouts are committed under ``tests/data/official_keys`` (regenerate with
``tests/data/make_official_keys.py`` from the reference description; it checks the stated tensor counts).
"""
import re
from math import prod
from pathlib import Path

import pytest
import torch

from sparse_detr.config import load_config
from sparse_detr.models import build_detector

KEYS = Path(__file__).parent / "data" / "official_keys"
CASES = {  # config → (layout file, tensors, elements) as the reference states them
    "sparse_detr_r50_rho0.1": ("sparse_detr_r50", 760, 44_695_428),
    "deformable_detr_r50_two_stage": ("deformable_detr_r50_two_stage", 630, 42_379_762),
    "deformable_detr_r50": ("deformable_detr_r50", 561, 40_955_900),
    "efficient_detr_r50": ("efficient_detr_r50", 630, 42_247_922),
}


def _layout(name):
    out = {}
    for line in (KEYS / f"{name}.txt").read_text().splitlines():
        key, shape = line.split("\t")
        out[key] = tuple(int(x) for x in shape.split(",") if x)
    return out


def _canonical(key, shared_heads, dec_layers=6):
    """The official code registers one head module under several names; map a key to its first name.

    ``transformer.decoder.{class,bbox}_embed.i`` is ``{class,bbox}_embed.i``; ``transformer.encoder.*_embed.j`` is
    head ``dec_layers + 1 + j``; without box refinement every ``*_embed.i`` is the one shared head.
    """
    key = re.sub(r"^transformer\.decoder\.(class_embed|bbox_embed)\.", r"\1.", key)
    key = re.sub(r"^transformer\.encoder\.(class_embed|bbox_embed)\.(\d+)\.",
                 lambda m: f"{m.group(1)}.{dec_layers + 1 + int(m.group(2))}.", key)
    if shared_heads:
        key = re.sub(r"^(class_embed|bbox_embed)\.\d+\.", r"\1.0.", key)
    return key


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    torch.manual_seed(0)
    model = build_detector(load_config(f"configs/{request.param}.yaml").model)
    return request.param, model


def test_keys_and_shapes_are_exactly_official(case):
    config, model = case
    name, tensors, elements = CASES[config]
    expected = _layout(name)
    assert len(expected) == tensors and sum(prod(s) for s in expected.values()) == elements
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(expected) - set(ours)) == [], "missing official keys"
    assert sorted(set(ours) - set(expected)) == [], "keys the official checkpoint does not have"
    assert {k: s for k, s in ours.items() if s != expected[k]} == {}, "shape mismatches"


def test_official_state_dict_loads_strictly(case):
    config, model = case
    shared = config == "deformable_detr_r50"  # the only layout without box refinement
    canonical_values = {}
    state = {}
    for key, shape in _layout(CASES[config][0]).items():
        canon = _canonical(key, shared)
        if canon not in canonical_values:  # aliases of one module hold one value, as in a real checkpoint
            canonical_values[canon] = torch.full(shape, float(len(canonical_values) + 1))  # distinct per tensor
        state[key] = canonical_values[canon]
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    loaded = model.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    # The aliases are the same tensors, not copies (one optimizer step updates every name).
    assert loaded["class_embed.3.weight"].data_ptr() == loaded[
        "class_embed.0.weight" if shared else "class_embed.3.weight"].data_ptr()
    if config != "deformable_detr_r50":
        assert loaded["transformer.decoder.bbox_embed.2.layers.0.weight"].data_ptr() == \
            loaded["bbox_embed.2.layers.0.weight"].data_ptr()
    if config == "sparse_detr_r50_rho0.1":
        assert loaded["transformer.encoder.class_embed.0.weight"].data_ptr() == \
            loaded["class_embed.7.weight"].data_ptr()


def test_refine_only_layout_is_plain_plus_decoder_box_head_aliases():
    """Deformable DETR + iterative box refinement (``--with_box_refine`` alone) has no listing in the reference;
    what follows from the rules it states: plain Deformable DETR's keys and shapes, the per-layer heads now
    separate tensors, and the box heads registered a second time as ``transformer.decoder.bbox_embed.0..5`` (the
    refinement hack; the class heads get their ``transformer.decoder.class_embed`` name only with two-stage)."""
    torch.manual_seed(0)
    model = build_detector(load_config("configs/deformable_detr_r50_refine.yaml").model)
    plain = _layout("deformable_detr_r50")
    aliases = {f"transformer.decoder.{k}": s for k, s in plain.items() if k.startswith("bbox_embed.")}
    assert len(aliases) == 6 * 6
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == {**plain, **aliases}

    state = {k: torch.full(s, float(i + 1)) for i, (k, s) in enumerate(sorted(plain.items()))}  # distinct heads
    state.update({k: state[k[len("transformer.decoder."):]] for k in aliases})
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    loaded = model.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    assert loaded["class_embed.0.weight"].data_ptr() != loaded["class_embed.5.weight"].data_ptr()
    assert loaded["transformer.decoder.bbox_embed.4.layers.2.bias"].data_ptr() == \
        loaded["bbox_embed.4.layers.2.bias"].data_ptr()
    own = model.load_state_dict(model.state_dict(), strict=True)  # its own state dict, strictly
    assert not own.missing_keys and not own.unexpected_keys
