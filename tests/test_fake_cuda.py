"""A CPU-only guard of the CUDA code path: the model (train and eval), the selection, the DAM, the instruments, the
postprocessor and the criterion's loss terms traced with fake CUDA tensors (no GPU needed). FakeTensorMode
refuses an op that mixes a CUDA tensor with one made on the CPU, so a tensor created on the wrong device (a
`torch.arange(k)` without `device=`) fails here instead of on the first GPU run. The Hungarian matcher (scipy on
the host) is stubbed with fixed indices; autograd's backward needs a real device and is left out."""
import contextlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from sparse_detr.config import load_config
from sparse_detr.models import build_model
from sparse_detr.models.dam import decoder_attention_map
from sparse_detr.models.instruments import selection_instruments
from sparse_detr.models.selection import SELECTORS

SMALL = ["model.hidden_dim=32", "model.nheads=4", "model.enc_layers=2", "model.dec_layers=2",
         "model.dim_feedforward=64", "model.num_queries=12", "model.num_classes=5", "model.dropout=0.0"]
CASES = sorted(SELECTORS) + ["dense"]
SIZES = [(64, 96), (48, 80)]


def _build(selection):
    extra = ["model.rho=0", "model.use_enc_aux_loss=false"] if selection == "dense" else [
        f"model.scorer_target={selection}"]
    torch.manual_seed(0)
    return build_model(load_config("configs/demo_synthetic.yaml", SMALL + extra))


def _fixed_matches(heads, targets, class_agnostic=None):
    """The matcher's output format, (batch_idx, pred_idx, tgt_idx) per head, on the heads' device: query i of
    image b takes its target i."""
    device = heads[0]["pred_logits"].device
    sizes = [int(t["boxes"].shape[0]) for t in targets]
    batch = torch.cat([torch.full((n,), b, dtype=torch.int64) for b, n in enumerate(sizes)])
    pred = torch.cat([torch.arange(n) for n in sizes])
    tgt = torch.arange(sum(sizes))
    return [(batch.to(device), pred.to(device), tgt.to(device)) for _ in heads]


def _on_cuda(tree, where=""):
    """Every tensor of a nested output is a fake CUDA tensor."""
    if isinstance(tree, torch.Tensor):
        assert isinstance(tree, FakeTensor) and tree.device.type == "cuda", f"{where}: {tree.device}"
    elif isinstance(tree, dict):
        for k, v in tree.items():
            _on_cuda(v, f"{where}.{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            _on_cuda(v, f"{where}[{i}]")


@contextlib.contextmanager
def _cuda_autocast(enabled):
    """bf16 autocast for CUDA tensors; set directly, as torch.autocast("cuda") turns itself off without a GPU."""
    previous = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", enabled)
    torch.set_autocast_dtype("cuda", torch.bfloat16)
    try:
        yield
    finally:
        torch.set_autocast_enabled("cuda", previous[0])
        torch.set_autocast_dtype("cuda", previous[1])
        torch.clear_autocast_cache()


def _trace(model, criterion, postprocessor, bf16):
    mode = FakeTensorMode()
    with mode:
        state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        params = {k: mode.from_tensor(v).to("cuda") for k, v in state.items()}
        h, w = max(s[0] for s in SIZES), max(s[1] for s in SIZES)
        images = torch.randn(len(SIZES), 3, h, w, device="cuda")
        mask = torch.ones(len(SIZES), h, w, dtype=torch.bool, device="cuda")
        for b, (ih, iw) in enumerate(SIZES):
            mask[b, :ih, :iw] = False
        targets = [{"labels": torch.tensor([1, 3], device="cuda"),
                    "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]], device="cuda"),
                    "orig_size": torch.tensor([ih, iw], device="cuda")} for ih, iw in SIZES]
        model.train()
        with _cuda_autocast(bf16):
            out = torch.func.functional_call(model, params, (images, mask), {"image_sizes": SIZES})
            losses = criterion(out, targets)
        _on_cuda(out, "train outputs")
        assert (out["pred_logits"].dtype == torch.bfloat16) == bf16  # the decoder's heads ran under autocast
        _on_cuda(losses, "losses")
        model.eval()
        with torch.no_grad(), _cuda_autocast(bf16):
            out = torch.func.functional_call(model, params, (images, mask), {"image_sizes": SIZES,
                                                                             "return_maps": True})
            results = postprocessor(out, torch.tensor(SIZES, device="cuda"))
        _on_cuda(out, "eval outputs")
        _on_cuda(results, "detections")
        dam = decoder_attention_map(out["dec_sampling_locations"], out["dec_attention_weights"],
                                    out["spatial_shapes"], out["level_start_index"], out["padding_mask"].shape[1])
        _on_cuda(dam, "DAM")
        meter = selection_instruments(out, targets)  # sums and counts on the device; compute() reads them back
        _on_cuda(meter.sums, "instrument sums")
        _on_cuda(meter.counts, "instrument counts")
        return losses


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("selection", CASES)
def test_the_cuda_path_keeps_every_tensor_on_the_device(selection, bf16, monkeypatch):
    model, criterion, postprocessor = _build(selection)
    monkeypatch.setattr(criterion.matcher, "match_heads", _fixed_matches)
    losses = _trace(model, criterion, postprocessor, bf16)
    assert "loss_ce" in losses and ("loss_mask" in losses) == (selection in ("dam", "foreground", "salience"))


def test_a_tensor_made_on_the_host_fails_the_trace(monkeypatch):
    """The guard has teeth: a kept-slot index built without device= (as a careless edit would) is caught."""
    import sparse_detr.models.selection as selection

    real = selection.select_tokens

    def careless(scores, padding_mask, counts, k):
        indices, valid = real(scores, padding_mask, counts, k)
        return indices, torch.arange(k)[None, :] < counts.cpu()[:, None]  # a host tensor

    monkeypatch.setattr(selection, "select_tokens", careless)
    model, criterion, postprocessor = _build("dam")
    monkeypatch.setattr(criterion.matcher, "match_heads", _fixed_matches)
    with pytest.raises(Exception, match="(?i)device"):
        _trace(model, criterion, postprocessor, bf16=False)
