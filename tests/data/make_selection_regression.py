"""Writes ``selection_regression.pt``: outputs, losses and gradients of the DAM and OS selection on a fixed seed.

Run once from the repository root at commit 25765a1 (before token selection became the pluggable ``TokenSelector``);
``tests/test_selection.py`` checks that today's code still produces these tensors. Not rerun by the tests.
"""
import torch

from sparse_detr.config import load_config
from sparse_detr.models import build_model

SMALL = ["model.hidden_dim=32", "model.nheads=4", "model.enc_layers=3", "model.dec_layers=2",
         "model.dim_feedforward=64", "model.num_queries=12", "model.num_classes=5", "model.dropout=0.0",
         "model.train_backbone=false"]
CASES = {"demo_dam": ("demo_synthetic", []),
         "r50_dam": ("sparse_detr_r50_rho0.1", []),
         "r50_os": ("sparse_detr_r50_rho0.1_os", [])}
IMAGE_SHAPES = [(3, 64, 96), (3, 96, 72)]
TARGETS = [{"labels": torch.tensor([1, 4]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
           {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
BUILT_FIRST = ("backbone.", "input_proj.")  # not stored: the seed gives the backbone, ``_reset`` the projections
OUTPUT_KEYS = ("pred_logits", "pred_boxes", "scores", "kept_indices", "kept_valid", "kept_token_counts",
               "mask_logits", "mask_targets")


def _reset(module, seed):
    """Weights independent of the order in which the model's modules draw from the global generator."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / max(1, p[0].numel()) ** 0.5 if p.dim() > 1 else
                    1 + 0.1 * torch.randn(p.shape, generator=gen))


def run_case(config, extra, state=None):
    """Build, optionally load the saved non-backbone weights, forward + criterion + backward."""
    torch.manual_seed(0)
    model, criterion, _ = build_model(load_config(f"configs/{config}.yaml", SMALL + extra))
    _reset(model.input_proj, 2)
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and all(k.startswith(BUILT_FIRST) for k in missing), (missing, unexpected)
    model.train()
    torch.manual_seed(1)
    images = [torch.randn(*s) for s in IMAGE_SHAPES]
    out = model(images)
    losses = criterion(out, TARGETS)
    total = sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses)
    total.backward()
    grads = {n: p.grad.detach().norm() for n, p in model.named_parameters() if p.grad is not None}
    return model, out, losses, grads


def main():
    data = {}
    for name, (config, extra) in CASES.items():
        model, out, losses, grads = run_case(config, extra)
        data[name] = {
            "state": {k: v for k, v in model.state_dict().items() if not k.startswith(BUILT_FIRST)},
            "outputs": {k: out[k].detach() for k in OUTPUT_KEYS if k in out},
            "enc_logits": out["enc_outputs"]["pred_logits"].detach(),
            "losses": {k: v.detach() for k, v in losses.items()},
            "grad_norms": grads,
        }
    torch.save(data, "tests/data/selection_regression.pt")


if __name__ == "__main__":
    main()
