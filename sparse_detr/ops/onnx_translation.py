"""ONNX translation of ``sparse_detr::ms_deform_attn``: standard ONNX ops around ``GridSample`` (opset 16+).

``torch.onnx.export(..., dynamo=True, custom_translation_table=ONNX_TRANSLATIONS)`` replaces every call of our
``torch.library`` op in the exported graph by this function; the Python reference is never traced. The graph is
the reference's algorithm (reference.py) written in ONNX ops. Per level l (a loop over the L levels, unrolled at
export; L is static):

    value[:, start_l : start_l + h_l·w_l]   (N, h_l·w_l, H, C) → (N·H, C, h_l, w_l)
    GridSample(value_l, 2·loc[:, :, :, l] − 1, bilinear, zeros, align_corners=0)   → (N·H, C, Q, P)
    Σ_p attention_weights[:, :, :, l, p] · sample                                 → (N·H, C, Q)

then sum over levels and reshape to (N, Q, H·C). ``h_l, w_l, start_l`` are read from the ``spatial_shapes`` and
``level_start_index`` tensors inside the graph, so the same file runs at every input size (``--dynamic``); only
L, the head count H and the channels C are fixed. Needs ``onnxscript`` (the ``export`` extra); imported by the
exporter only.
"""
from __future__ import annotations

from onnxscript import opset18 as op

__all__ = ["OPSET", "ms_deform_attn_onnx", "onnx_translations"]

#: The opset the translation is written in (GridSample exists since 16; 18 is the exporter's native opset).
OPSET = 18


def _ints(*values: int):
    return op.Constant(value_ints=list(values))


def ms_deform_attn_onnx(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """value (N, S, H, C), spatial_shapes (L, 2) int64, level_start_index (L,) int64, sampling_locations
    (N, Q, H, L, P, 2), attention_weights (N, Q, H, L, P) → (N, Q, H·C). Arguments are ONNX graph values."""
    n_levels = sampling_locations.shape[3]
    heads, channels = value.shape[2], value.shape[3]
    if not all(isinstance(d, int) for d in (n_levels, heads, channels)):
        raise ValueError("ms_deform_attn ONNX translation: the level count L, heads H and channels C must be "
                         f"static, got L={n_levels}, H={heads}, C={channels}")
    grids = op.Sub(op.Mul(sampling_locations, op.Constant(value_float=2.0)), op.Constant(value_float=1.0))
    out = None
    for lvl in range(n_levels):
        index = _ints(lvl)
        shape = op.Gather(spatial_shapes, index, axis=0)  # (1, 2)
        height = op.Reshape(op.Gather(shape, _ints(0), axis=1), _ints(1))
        width = op.Reshape(op.Gather(shape, _ints(1), axis=1), _ints(1))
        start = op.Gather(level_start_index, index, axis=0)
        level = op.Slice(value, start, op.Add(start, op.Mul(height, width)), _ints(1))  # (N, h*w, H, C)
        level = op.Transpose(level, perm=[0, 2, 3, 1])  # (N, H, C, h*w)
        level = op.Reshape(level, op.Concat(_ints(-1, channels), height, width, axis=0))  # (N*H, C, h, w)

        grid = op.Squeeze(op.Gather(grids, index, axis=3), _ints(3))  # (N, Q, H, P, 2)
        grid = op.Transpose(grid, perm=[0, 2, 1, 3, 4])  # (N, H, Q, P, 2)
        grid = op.Reshape(grid, op.Concat(_ints(-1), op.Shape(grid, start=2), axis=0))  # (N*H, Q, P, 2)
        sampled = op.GridSample(level, grid, mode="bilinear", padding_mode="zeros", align_corners=0)  # (N*H,C,Q,P)

        weights = op.Squeeze(op.Gather(attention_weights, index, axis=3), _ints(3))  # (N, Q, H, P)
        weights = op.Transpose(weights, perm=[0, 2, 1, 3])  # (N, H, Q, P)
        weights = op.Reshape(weights, op.Concat(_ints(-1, 1), op.Shape(weights, start=2), axis=0))  # (N*H,1,Q,P)
        part = op.ReduceSum(op.Mul(sampled, weights), _ints(-1), keepdims=0)  # (N*H, C, Q)
        out = part if out is None else op.Add(out, part)
    out = op.Reshape(out, _ints(-1, heads * channels, 0))  # (N, H*C, Q): head-major channels, as the kernels
    return op.Transpose(out, perm=[0, 2, 1])


def onnx_translations() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export``: our op → its ONNX translation."""
    import torch

    from . import kernels  # noqa: F401  (defines the op)

    return {torch.ops.sparse_detr.ms_deform_attn.default: ms_deform_attn_onnx}
