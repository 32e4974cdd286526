"""ONNX export (the `export` extra): the op's GridSample translation against the reference op, the demo model
exported by the tool and run by onnxruntime against PyTorch, and one `--dynamic` file at two sizes.

Reference for the whole model: PyTorch eager with the compiled C++ kernel; onnxruntime runs an independent
GridSample implementation. Acceptance tolerances: sorted scores within 1e-4, top-10 boxes within 1e-2 px.
"""
import os

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from sparse_detr.config import load_config, to_dict  # noqa: E402
from sparse_detr.engine.inference import export  # noqa: E402
from sparse_detr.models import build_model  # noqa: E402
from sparse_detr.ops import dispatch, ms_deform_attn_reference  # noqa: E402
from sparse_detr.ops import onnx_translation  # noqa: E402

DEMO = "configs/demo_synthetic.yaml"
# The demo architecture at test size: 1 + 1 layers, d = 32 (the full demo model is tested through the tool below).
TINY = ["model.hidden_dim=32", "model.nheads=2", "model.dim_feedforward=64", "model.enc_layers=1",
        "model.dec_layers=1", "model.num_queries=20"]


def _spread_class_head(model) -> None:
    """Random init gives every class logit ≈ the focal prior, so scores tie and the top-10 order is arbitrary;
    wider random class heads give distinct scores (what a trained model has)."""
    with torch.no_grad():
        heads = [model.queries.class_embed, *model.decoder.class_embed]  # the two-stage and the decoder heads
        for head in {id(h): h for h in heads}.values():
            head.weight.normal_(0, 0.5)
            head.bias.normal_(-2.0, 1.0)


def _model(overrides=(), seed=0):
    torch.manual_seed(seed)
    cfg = load_config(DEMO, list(overrides))
    model, _, _ = build_model(cfg)
    _spread_class_head(model)
    return cfg, model.eval()


def _within_tolerance(report):
    for r in report:
        assert r["score_diff"] < 1e-4, r
        assert r["box_diff_px"] < 1e-2, r
        assert r["labels_equal"], r


class _OpOnly(torch.nn.Module):
    def __init__(self, spatial_shapes):
        super().__init__()
        self.register_buffer("shapes", spatial_shapes)
        sizes = spatial_shapes.prod(1)
        self.register_buffer("starts", torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1])))

    def forward(self, value, locations, weights):
        return dispatch.ms_deform_attn(value, self.shapes, self.starts, locations, weights)


def test_op_translation_matches_reference(tmp_path):
    """The op alone: ONNX (GridSample) vs the pure-PyTorch reference, with sample points outside the maps (zeros
    padding), three levels of different shapes, 2 heads, 3 points."""
    shapes = torch.tensor([[6, 5], [3, 4], [1, 2]])
    n, q, h, c, p = 2, 7, 2, 4, 3
    gen = torch.Generator().manual_seed(0)
    value = torch.randn(n, int(shapes.prod(1).sum()), h, c, generator=gen)
    locations = torch.rand(n, q, h, len(shapes), p, 2, generator=gen) * 1.4 - 0.2  # some outside [0, 1]
    weights = torch.rand(n, q, h, len(shapes), p, generator=gen).softmax(-1)
    module = _OpOnly(shapes).eval()
    program = torch.onnx.export(module, (value, locations, weights), dynamo=True, opset_version=onnx_translation.OPSET,
                                custom_translation_table=onnx_translation.onnx_translations(), verbose=False)
    path = str(tmp_path / "op.onnx")
    program.save(path)
    ops = export.describe_graph(path)
    assert ops.get("GridSample") == len(shapes) and not any("::" in k for k in ops)

    session = export.onnx_session(path)
    got = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), (value, locations, weights))})[0]
    expected = ms_deform_attn_reference(value, shapes, module.starts, locations, weights)
    assert got.shape == tuple(expected.shape)
    torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-5, rtol=1e-5)


def test_demo_model_exports_and_matches_through_the_tool(tmp_path, monkeypatch, capsys):
    """Acceptance: the demo model (ρ = 0.1) at 256×320, exported by tools/export_onnx.py from a checkpoint without
    --config; the attention goes through our translation (never the Python reference)."""
    import tools.export_onnx as tool

    cfg, model = _model()
    ckpt = tmp_path / "checkpoint.pth"
    torch.save({"format_version": 1, "model": model.state_dict(), "config": to_dict(cfg)}, ckpt)

    calls = []
    translate = onnx_translation.ms_deform_attn_onnx
    monkeypatch.setattr(onnx_translation, "ms_deform_attn_onnx", lambda *a: calls.append(1) or translate(*a))

    def no_reference(*args, **kwargs):
        raise AssertionError("the export traced the Python reference")

    monkeypatch.setattr(dispatch, "ms_deform_attn_reference", no_reference)
    out = str(tmp_path / "demo.onnx")
    report = tool.main(["--checkpoint", str(ckpt), "--out", out, "--height", "256", "--width", "320"])

    attention_layers = cfg.model.enc_layers + cfg.model.dec_layers
    assert len(calls) == attention_layers
    ops = export.describe_graph(out)
    assert ops["GridSample"] == attention_layers * cfg.model.num_feature_levels
    assert not any("::" in k for k in ops)  # only standard ONNX ops
    assert [r["shape"] for r in report] == [(1, 3, 256, 320)]
    _within_tolerance(report)
    assert report[0]["num_detections"] == 100
    printed = capsys.readouterr().out
    assert "sorted scores max |diff|" in printed and "top-10 boxes" in printed

    # The static file takes only its export shape; its outputs have the documented shapes and dtypes.
    boxes, scores, labels = export.run_onnx(export.onnx_session(out), torch.rand(1, 3, 256, 320))
    assert boxes.shape == (1, 100, 4) and scores.shape == (1, 100) and str(labels.dtype) == "int64"
    assert (scores[:, :-1] >= scores[:, 1:]).all()


def test_dynamic_export_matches_at_two_sizes_and_batches(tmp_path):
    # Two feature levels: the symbolic-shape export time grows with the per-level graph.
    _, model = _model(TINY + ["model.num_feature_levels=2"], seed=1)
    # optimize=False: the graph optimizer is covered by the static export through the tool; here it only costs time
    path = export.export_onnx(model, str(tmp_path / "dyn.onnx"), height=160, width=192, dynamic=True, optimize=False)
    gen = torch.Generator().manual_seed(3)
    inputs = [torch.rand(1, 3, 224, 160, generator=gen), torch.rand(3, 3, 192, 256, generator=gen)]
    report = export.compare_onnx(path, export.DeployModel(model), inputs)
    assert [r["shape"] for r in report] == [(1, 3, 224, 160), (3, 3, 192, 256)]
    _within_tolerance(report)


def test_export_refuses_to_trace_the_reference(tmp_path, monkeypatch):
    _, model = _model(TINY)
    monkeypatch.setattr(dispatch, "DEFAULT_BACKEND", "reference")
    with pytest.raises(RuntimeError, match="SPARSE_DETR_OPS"):
        export.export_onnx(model, str(tmp_path / "x.onnx"), 160, 192)
    assert not os.path.exists(tmp_path / "x.onnx")


@pytest.mark.parametrize("rho", [0.1, 0.2, 0.3, 0.5, 0.07, 1.0])
def test_symbolic_keep_bound_is_the_float_count_or_one_more(rho):
    """Dynamic export computes the kept-token bound k in integers (encoder._floor_mul_bound): it must never be
    below the float64 count the device computes, and at most one above (an extra slot, marked invalid)."""
    import numpy as np

    from sparse_detr.models.selection import _floor_mul_bound

    u = np.arange(1, 1_000_001, dtype=np.int64)
    bound = _floor_mul_bound(u, rho)  # plain integer arithmetic, as on symbolic sizes
    exact = np.floor(u.astype(np.float64) * rho).astype(np.int64)
    assert (bound >= exact).all() and (bound <= exact + 1).all()


@pytest.mark.parametrize("flags", [["--height", "0"], ["--width", "-5"], ["--batch", "0"],
                                   ["--dynamic", "--min-size", "512", "--max-size", "256"]])
def test_export_tool_refuses_a_size_that_is_no_size(flags, capsys):
    """A zero or negative size (or an empty dynamic range) is an error naming the flag, never a silent default."""
    import tools.export_onnx as tool

    with pytest.raises(SystemExit) as info:
        tool.parse_args(["--checkpoint", "c.pth", "--out", "m.onnx", *flags])
    assert info.value.code == 2
    assert flags[-2] in capsys.readouterr().err
