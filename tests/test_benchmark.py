"""The benchmark on two tiny configs: structure of the records and tables, ratios, and the sparse-vs-dense cost.

The tiny models keep the ResNet-50 (the only CNN backbone) but make the encoder dominate the cost: a wide FFN
(dim_feedforward 8192) in 6 encoder layers against one small decoder layer, on 64x96 images (128 tokens). The dense
encoder then costs more than the backbone, so keeping 10% of the tokens must cut the total well below the dense one.
"""

import json

import pytest
import torch
from torch import nn

from sparse_detr.engine.studies import benchmark as bm
from sparse_detr.engine.studies.benchmark_report import format_markdown
from sparse_detr.ops import backend_for

TINY = ("model.hidden_dim=64", "model.nheads=2", "model.dim_feedforward=8192", "model.enc_layers=6",
        "model.dec_layers=1", "model.num_queries=5", "model.dropout=0.0")
DENSE, SPARSE = "configs/efficient_detr_r50.yaml", "configs/sparse_detr_r50_rho0.1.yaml"

pytestmark = pytest.mark.skipif(backend_for("cpu", torch.float32) == "reference",
                                reason="the op's FLOPs are only counted through the compiled kernel")


@pytest.fixture(scope="module")
def records():
    torch.manual_seed(0)
    options = bm.BenchmarkOptions(device="cpu", batch_sizes=(1,), num_images=2, height=64, width=96, warmup=0,
                                  timed_runs=1, train_step=True, train_runs=1, overrides=TINY)
    return bm.benchmark_configs([DENSE, SPARSE], options, log=lambda m: None)


def test_records_have_the_documented_keys(records):
    assert [r["config"] for r in records] == [DENSE, SPARSE]
    for r in records:
        for key in ("config", "gflops", "gflops_official", "gflops_without_op", "gflops_official_without_op",
                    "gflops_parts", "fps_bs1", "params", "params_total", "params_trainable", "train_step_s",
                    "train_peak_mem_mb", "ratios", "tokens"):
            assert key in r, key
        assert r["fps_bs1"] > 0 and r["train_step_s"] > 0
        json.loads(json.dumps(records))  # JSON-serialisable as written by --json


def test_ratios_are_relative_to_the_first_record():
    parts = {p: 0.0 for p in bm.PARTS}
    base = {"gflops": 8.0, "params": 40, "fps_bs1": 2.0, "gflops_parts": {**parts, "encoder": 4.0}}
    other = {"gflops": 2.0, "params": 50, "fps_bs1": 5.0, "gflops_parts": {**parts, "encoder": 1.0}}
    _, ratios = (r["ratios"] for r in bm.add_ratios([base, other]))
    # Hand-worked: 2/8 of the FLOPs, 50/40 of the parameters, 5/2 the speed, 1/4 of the encoder's FLOPs; parts the
    # baseline does not have (0 FLOPs) get no ratio rather than a division by zero.
    assert ratios == pytest.approx({"gflops": 0.25, "params": 1.25, "fps_bs1": 2.5, "encoder_gflops": 0.25})


def test_conventions_and_parts_add_up(records):
    for r in records:
        assert r["gflops_official"] == pytest.approx(r["gflops"] / 2)
        # The op is counted (not free as in fvcore) and every FLOP lands in exactly one part.
        assert r["gflops_without_op"] < r["gflops"]
        assert sum(r["gflops_parts"].values()) == pytest.approx(r["gflops"], rel=1e-9)
        assert r["gflops_parts"]["backbone"] > 0 and r["gflops_parts"]["decoder"] > 0
    # 64x96 -> levels 8x12, 4x6, 2x3, 1x2 = 128 tokens; rho 0.1 keeps floor(12.8) + 1 = 13.
    assert records[0]["tokens"] == 128 and records[0]["kept_tokens"] is None
    assert records[1]["kept_tokens"] == 13


def test_sparse_is_cheaper_when_the_encoder_dominates(records):
    dense, sparse = records
    assert dense["gflops_parts"]["encoder"] > dense["gflops_parts"]["backbone"]  # the premise of the test
    assert sparse["gflops_parts"]["backbone"] == pytest.approx(dense["gflops_parts"]["backbone"])
    assert sparse["ratios"]["encoder_gflops"] < 0.25
    assert sparse["gflops"] < 0.6 * dense["gflops"]


def test_inference_params_leave_out_the_encoder_aux_heads(records):
    dense, sparse = records
    assert dense["params"] == dense["params_total"]  # no aux heads in the dense model
    assert dense["gflops_parts"]["enc_aux_heads"] == 0
    assert sparse["gflops_parts"]["heads"] == pytest.approx(dense["gflops_parts"]["heads"])
    # 5 separate aux head pairs (enc_layers - 1) of d=64: class 64*91+91, box MLP 2*(64*64+64) + 64*4+4.
    per_pair = (64 * 91 + 91) + 2 * (64 * 64 + 64) + (64 * 4 + 4)
    assert sparse["params_total"] - sparse["params"] == 5 * per_pair


def test_markdown_tables(records):
    text = format_markdown(records)
    assert "efficient_detr_r50" in text and "sparse_detr_r50_rho0.1" in text
    rows = [line for line in text.splitlines() if line.startswith("| efficient_detr_r50")]
    assert len(rows) == 2 and "| 1.000 |" in rows[0]  # the baseline's ratio column


def test_part_attribution_charges_the_innermost_part():
    # backbone: 2*4*8*3 = 192 FLOPs; heads (called from inside the "decoder"): 2*4*3*2 = 48; decoder's own: 2*4*8*8.
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.tokens, self.decoder = nn.Module(), nn.Module()
            self.tokens.backbone = nn.Linear(8, 3, bias=False)
            self.decoder.class_embed = nn.ModuleList([nn.Linear(3, 2, bias=False)])
            self.decoder.stack = nn.Linear(8, 8, bias=False)

        def forward(self, x):
            y = self.decoder.stack(x)
            return self.decoder.class_embed[0](self.tokens.backbone(y))

    toy = Toy()
    with torch.no_grad(), bm.FlopCounterMode(display=False) as counter:
        parts = bm._PartAttribution(toy, counter)
        toy(torch.randn(4, 8))
        split = parts.close()
    assert split == {"backbone": 192, "selector": 0, "encoder": 0, "decoder": 512, "heads": 48, "enc_aux_heads": 0,
                     "other": 0}
