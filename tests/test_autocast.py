"""The full Sparse DETR model under CPU bf16 autocast, against the same model in fp32.

Inference and one training step on a fixed batch: the losses, predictions and gradients must stay
within the tolerances below of fp32, and every deformable attention call must receive a bf16 value
with fp32 sampling locations and weights (the mixed-precision layout of the op).

The model is the demo configuration (tiny CNN backbone, rho = 0.1, two-stage, encoder aux heads),
so that the comparison measures the transformer and the op rather than 50 bf16 ResNet layers, and
it is first trained for a few fp32 steps on the batch: an untrained model's top-k choices (kept
tokens, two-stage queries) are near ties that bf16 rounding may swap, a discrete change of which
tokens are kept and matched rather than a precision error.

Precision and discrete changes are checked apart, so that the test holds on every x86-64 CPU (native bf16
units or not: the rounding of oneDNN's bf16 kernels differs between an AMD Zen 4, a Xeon with AMX and AVX2):
the scorer's loss is compared against the fp32 DAM target (its top-k may swap a near tie), and at inference
a bounded share of kept tokens and of queries may change (a swapped two-stage proposal), the rest must agree
within the tolerances.
"""

import dataclasses

import pytest
import torch

import sparse_detr.models.ms_deform_attn as msda_module
from sparse_detr.models import weighted_total

from test_detector import IMAGES, TARGETS, _build

# Measured on this batch: worst loss term 0.4%, gradient cosine 0.9996, token scores 0.03; at
# inference boxes 1.3e-3 and logits 0.03 (queries paired by box, as near-equal proposals may swap
# places in the two-stage top-k). bf16 keeps 8 mantissa bits (relative 2**-8 = 0.4% per rounding)
# and a forward pass rounds at every matmul: the tolerances leave 2-8x headroom.
LOSS_RTOL = 1e-2
GRAD_MIN_COSINE = 0.99
SCORE_ATOL = 0.1
BOX_ATOL = 1e-2
LOGIT_ATOL = 0.1
PRETRAIN_STEPS = 30
MIN_TARGET_AGREEMENT = 0.9  # share of the fp32 DAM target tokens that bf16's target keeps
MIN_KEPT_AGREEMENT = 0.9  # share of the kept tokens the same under bf16 (one swap of k = 17 is 6%)
MIN_QUERY_AGREEMENT = 0.8  # share of queries paired one-to-one within BOX_ATOL (a swapped proposal is a new query)


@pytest.fixture(scope="module")
def model_and_batch():
    model, criterion, _ = _build("demo_synthetic", "model.train_backbone=true")
    torch.manual_seed(1)
    images = [torch.randn(*s) for s in IMAGES]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(PRETRAIN_STEPS):
        loss = weighted_total(criterion(model(images), TARGETS), criterion.weight_dict)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, criterion, images


def _train_step(model, criterion, images, bf16):
    model.train()
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(images)
        losses = criterion(out, TARGETS)
        total = weighted_total(losses, criterion.weight_dict)
    total.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return {k: v.detach().float() for k, v in losses.items()}, grads, out


@pytest.fixture
def op_dtypes(monkeypatch):
    seen = []
    real = msda_module.ms_deform_attn

    def spy(value, shapes, starts, loc, attn, **kwargs):
        seen.append((value.dtype, loc.dtype, attn.dtype))
        return real(value, shapes, starts, loc, attn, **kwargs)

    monkeypatch.setattr(msda_module, "ms_deform_attn", spy)
    return seen


def test_bf16_training_step_matches_fp32(model_and_batch, op_dtypes):
    model, criterion, images = model_and_batch
    losses32, grads32, out32 = _train_step(model, criterion, images, bf16=False)
    assert op_dtypes and set(op_dtypes) == {(torch.float32,) * 3}
    op_dtypes.clear()
    losses16, grads16, out16 = _train_step(model, criterion, images, bf16=True)
    # Every op call of the encoder and the decoder: value bf16, locations and weights fp32.
    assert op_dtypes and set(op_dtypes) == {(torch.bfloat16, torch.float32, torch.float32)}

    assert losses16.keys() == losses32.keys()
    selector = model.selector
    target32, target16 = (selector.target(o, TARGETS) for o in (out32, out16))
    assert (target32 * target16).sum() >= MIN_TARGET_AGREEMENT * target32.sum()  # near ties may swap
    for name, want in losses32.items():
        if name.startswith("stat_"):
            continue
        got = losses16[name]
        if name == "loss_mask":  # bf16's scores against the fp32 target: the precision, not the target's swaps
            fixed = lambda outputs, targets: target32  # noqa: E731
            original, selector.target = selector.target, fixed
            try:
                float_scores = dataclasses.replace(out16["selection"], scores=out16["selection"].scores.detach().float())
                got = selector.losses(out16 | {"selection": float_scores}, TARGETS).terms["loss_mask"]
            finally:
                selector.target = original
        torch.testing.assert_close(got, want, rtol=LOSS_RTOL, atol=1e-4, msg=name)
    assert torch.isfinite(grads16).all()
    cosine = torch.nn.functional.cosine_similarity(grads16, grads32, dim=0)
    assert cosine > GRAD_MIN_COSINE


def test_bf16_inference_matches_fp32(model_and_batch, op_dtypes):
    model, _, images = model_and_batch
    model.eval()
    with torch.no_grad():
        out32 = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out16 = model(images)
    assert set(op_dtypes[len(op_dtypes) // 2:]) == {(torch.bfloat16, torch.float32, torch.float32)}
    # Continuous outputs: the token scores within bf16 precision of fp32; the same kept tokens.
    torch.testing.assert_close(out16["selection"].scores.float(), out32["selection"].scores, atol=SCORE_ATOL, rtol=0)
    for b in range(len(images)):  # the kept sets, up to swapped near ties
        kept32 = set(out32["selection"].indices[b][out32["selection"].valid[b]].tolist())
        kept16 = set(out16["selection"].indices[b][out16["selection"].valid[b]].tolist())
        assert len(kept32 & kept16) >= MIN_KEPT_AGREEMENT * len(kept32)
    # Predictions as sets (query order carries no meaning): pair every fp32 query with the bf16 query of the
    # nearest box; the pairs within BOX_ATOL (all but a few swapped proposals) must be one-to-one and their
    # logits within LOGIT_ATOL.
    for b in range(len(images)):
        boxes32, boxes16 = out32["pred_boxes"][b], out16["pred_boxes"][b].float()
        dist = torch.cdist(boxes32, boxes16, p=float("inf"))
        nearest = dist.argmin(1)
        close = dist.min(1).values <= BOX_ATOL
        assert close.sum() >= MIN_QUERY_AGREEMENT * len(close)
        assert nearest[close].unique().numel() == int(close.sum())
        torch.testing.assert_close(out16["pred_logits"][b][nearest[close]].float(), out32["pred_logits"][b][close],
                                   atol=LOGIT_ATOL, rtol=0)


def test_benchmark_autocast_option_runs_the_op_in_bf16(model_and_batch, op_dtypes):
    from sparse_detr.engine.studies import benchmark as bm

    model, criterion, images = model_and_batch
    cpu = torch.device("cpu")
    assert bm.measure_fps([model], images, 1, 0, 1, cpu, autocast="bfloat16")[0] > 0
    record = bm.measure_train_step(model, criterion, images[:1], cpu, runs=1, autocast="bfloat16")
    assert record["train_step_s"] > 0
    assert op_dtypes and set(op_dtypes) == {(torch.bfloat16, torch.float32, torch.float32)}
