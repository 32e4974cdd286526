"""Tests of the MSDeformAttn module: official names and initialisation, shapes, location formulas,
padding mask, agreement with the reference op, and errors."""

import math

import pytest
import torch

from sparse_detr.models.ms_deform_attn import MSDeformAttn
from sparse_detr.ops import ms_deform_attn_reference

SHAPES = ((6, 9), (3, 5), (1, 2))


def make_batch(n=2, q=5, d_model=32, seed=0, box_refs=False):
    """(query, reference_points, input_flatten, spatial_shapes, level_start_index)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(SHAPES)
    areas = shapes.prod(1)
    starts = torch.cumsum(areas, 0) - areas
    s = int(areas.sum())
    query = torch.randn(n, q, d_model, generator=gen)
    refs = torch.rand(n, q, len(SHAPES), 4 if box_refs else 2, generator=gen)
    flat = torch.randn(n, s, d_model, generator=gen)
    return query, refs, flat, shapes, starts


def test_parameter_names_and_shapes_match_official_checkpoints():
    shapes = {k: tuple(v.shape) for k, v in MSDeformAttn().state_dict().items()}
    assert shapes == {
        "sampling_offsets.weight": (256, 256), "sampling_offsets.bias": (256,),
        "attention_weights.weight": (128, 256), "attention_weights.bias": (128,),
        "value_proj.weight": (256, 256), "value_proj.bias": (256,),
        "output_proj.weight": (256, 256), "output_proj.bias": (256,),
    }


def test_initialisation_follows_official_recipe():
    torch.manual_seed(0)
    m = MSDeformAttn(d_model=256, n_levels=4, n_heads=8, n_points=4)
    assert torch.count_nonzero(m.sampling_offsets.weight) == 0
    bias = m.sampling_offsets.bias.view(8, 4, 4, 2)  # (H, L, P, xy)
    # Head h points at angle 2*pi*h/8, scaled so the larger of |x|, |y| is 1: the 8 compass
    # directions on the unit square.
    compass = torch.tensor([[1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1], [0, -1], [1, -1]],
                           dtype=torch.float32)
    for p in range(4):  # point p sits p + 1 steps out, identically at every level
        for lvl in range(4):
            torch.testing.assert_close(bias[:, lvl, p], compass * (p + 1), atol=1e-6, rtol=0)
    assert torch.count_nonzero(m.attention_weights.weight) == 0
    assert torch.count_nonzero(m.attention_weights.bias) == 0
    for lin in (m.value_proj, m.output_proj):
        assert torch.count_nonzero(lin.bias) == 0
        bound = math.sqrt(6.0 / (lin.in_features + lin.out_features))  # xavier_uniform
        assert lin.weight.abs().max() <= bound
        assert abs(lin.weight.std().item() - bound / math.sqrt(3)) < 0.05 * bound


@pytest.mark.parametrize("box_refs", [False, True])
def test_output_and_sampling_shapes(box_refs):
    m = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=2)
    query, refs, flat, shapes, starts = make_batch(box_refs=box_refs)
    out = m(query, refs, flat, shapes, starts)
    assert out.shape == (2, 5, 32)
    out2, loc, attn = m(query, refs, flat, shapes, starts, return_sampling=True)
    torch.testing.assert_close(out2, out)
    assert loc.shape == (2, 5, 4, 3, 2, 2) and attn.shape == (2, 5, 4, 3, 2)
    torch.testing.assert_close(attn.sum(dim=(-2, -1)), torch.ones(2, 5, 4))


def test_point_references_offsets_are_in_pixels_of_each_level():
    m = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=2)
    query, refs, flat, shapes, starts = make_batch()
    _, loc, _ = m(query, refs, flat, shapes, starts, return_sampling=True)
    offsets = m.sampling_offsets.bias.view(4, 3, 2, 2)  # weight is zero at init
    wh = shapes.flip(-1).float()  # (L, 2) as (w, h)
    expected = refs[:, :, None, :, None, :] + offsets[None, None] / wh[None, None, None, :, None, :]
    torch.testing.assert_close(loc, expected)


def test_box_references_offsets_scale_with_the_box():
    m = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=2)
    query, refs, flat, shapes, starts = make_batch(box_refs=True)
    _, loc, _ = m(query, refs, flat, shapes, starts, return_sampling=True)
    offsets = m.sampling_offsets.bias.view(4, 3, 2, 2)
    box = refs[:, :, None, :, None, :]
    expected = box[..., :2] + offsets[None, None] / 2 * box[..., 2:] * 0.5
    torch.testing.assert_close(loc, expected)


def test_forward_equals_reference_op_on_projected_values():
    torch.manual_seed(0)
    m = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=2)
    torch.nn.init.normal_(m.sampling_offsets.weight, std=0.1)  # make offsets depend on the query
    torch.nn.init.normal_(m.attention_weights.weight, std=0.1)
    query, refs, flat, shapes, starts = make_batch()
    out, loc, attn = m(query, refs, flat, shapes, starts, return_sampling=True)
    value = m.value_proj(flat).view(2, -1, 4, 8)
    expected = m.output_proj(ms_deform_attn_reference(value, shapes, starts, loc, attn))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_padding_mask_zeroes_padded_values():
    m = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=2)
    query, refs, flat, shapes, starts = make_batch()
    mask = torch.zeros(flat.shape[:2], dtype=torch.bool)
    mask[0, 10:30] = True
    mask[1, -5:] = True
    changed = flat.clone()
    changed[mask] = 100.0 * torch.randn(int(mask.sum()), 32)
    out = m(query, refs, flat, shapes, starts, mask)
    torch.testing.assert_close(m(query, refs, changed, shapes, starts, mask), out)
    # Without the mask, the padded tokens' content does leak into the output.
    assert not torch.allclose(m(query, refs, changed, shapes, starts), m(query, refs, flat, shapes, starts))


def test_gradients_reach_every_parameter():
    m = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=2)
    query, refs, flat, shapes, starts = make_batch()
    m(query, refs, flat, shapes, starts).pow(2).sum().backward()
    for name, param in m.named_parameters():
        assert param.grad is not None and torch.count_nonzero(param.grad) > 0, name


def _spy_op_dtypes(monkeypatch):
    """Record (value, sampling_locations, attention_weights) dtypes of every op call of the module."""
    import sparse_detr.models.ms_deform_attn as module

    seen = []
    real = module.ms_deform_attn

    def spy(value, shapes, starts, loc, attn, **kwargs):
        seen.append((value.dtype, loc.dtype, attn.dtype))
        return real(value, shapes, starts, loc, attn, **kwargs)

    monkeypatch.setattr(module, "ms_deform_attn", spy)
    return seen


def test_autocast_passes_16bit_value_and_float32_locations(monkeypatch):
    seen = _spy_op_dtypes(monkeypatch)
    m = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=2)
    torch.nn.init.normal_(m.sampling_offsets.weight, std=0.1)
    query, refs, flat, shapes, starts = make_batch()
    expected = m(query, refs, flat, shapes, starts)
    assert seen == [(torch.float32,) * 3]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(query, refs, flat, shapes, starts)
    assert seen[1] == (torch.bfloat16, torch.float32, torch.float32)
    # bf16 projections: a few 2**-8 relative roundings on values of order 1.
    torch.testing.assert_close(out.float(), expected, atol=5e-2, rtol=5e-2)
    m.double()(query.double(), refs.double(), flat.double(), shapes, starts)
    assert seen[2] == (torch.float64,) * 3  # gradcheck precision is kept


def test_bad_configuration_and_inputs_raise():
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(d_model=30, n_heads=4)
    m = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=2)
    query, refs, flat, shapes, starts = make_batch()
    with pytest.raises(ValueError, match="reference_points"):
        m(query, refs[..., :1], flat, shapes, starts)
    with pytest.raises(ValueError, match="query"):
        m(query[..., :16], refs, flat, shapes, starts)
    with pytest.raises(ValueError, match="input_spatial_shapes"):
        m(query, refs, flat, shapes[:2], starts)
    with pytest.raises(ValueError, match="input_padding_mask"):
        m(query, refs, flat, shapes, starts, torch.zeros(2, 3, dtype=torch.bool))
