"""A new token-selection criterion is one class and one registration: defined here, in a test file, it trains
through the model and the criterion, is evaluated (with the selection instruments), goes through the sweep's
report and is drawn by the visualizer, with no edit of the config schema, the engine, the tools or other tests."""
import json

import pytest
import torch
import yaml

from sparse_detr.config import load_config
from sparse_detr.data import ensure_synthetic
from sparse_detr.engine.training import train as train_mod
from sparse_detr.engine.checkpoint import load_checkpoint
from sparse_detr.engine.inference.loading import load_for_inference
from sparse_detr.engine.studies.sweep_report import results_markdown
from sparse_detr.engine.inference.visualize import make_panels
from sparse_detr.models import build_model
from sparse_detr.models.selection import (SELECTORS, ScorerSelector, SelectorLosses, TokenSelector, register_selector,
                                          token_geometry)

NAME = "top_half_of_boxes_test"


class TopHalfSelector(ScorerSelector):
    """Scorer trained on the tokens whose centre lies in the upper half of some ground-truth box."""

    def target(self, outputs, targets):
        if targets is None:
            return None
        centres, _, _ = token_geometry(outputs["padding_mask"], outputs["spatial_shapes"],
                                       outputs["level_start_index"])
        boxes = torch.nn.utils.rnn.pad_sequence([t["boxes"].reshape(-1, 4) for t in targets], batch_first=True)
        if boxes.shape[1] == 0:
            return torch.zeros(centres.shape[:2], device=centres.device)
        cx, cy, w, h = boxes[:, None].unbind(-1)  # (B, 1, T)
        x, y = centres[..., 0:1], centres[..., 1:2]  # (B, S, 1)
        inside = ((x - cx).abs() <= w / 2) & (y >= cy - h / 2) & (y <= cy) & (w > 0)
        return inside.any(-1).float()


@pytest.fixture
def registered():
    saved = dict(SELECTORS)
    register_selector(NAME)(TopHalfSelector)
    yield
    SELECTORS.clear()
    SELECTORS.update(saved)


def test_a_criterion_defined_in_a_test_file_trains_evaluates_reports_and_draws(registered, tmp_path):
    root = str(tmp_path / "data")
    synth = dict(num_train=4, num_val=2, min_size=96, max_size=96, seed=0)
    ensure_synthetic(root, **synth)
    cfg = {"model": {"num_classes": 6, "hidden_dim": 32, "nheads": 2, "enc_layers": 2, "dec_layers": 2,
                     "dim_feedforward": 64, "num_queries": 10, "train_backbone": False, "backbone": "tiny_cnn",
                     "rho": 0.2, "use_enc_aux_loss": True, "two_stage": True, "with_box_refine": True,
                     "scorer_target": NAME},
           "data": {"dataset": "synthetic", "root": root, "synthetic": synth, "train_scales": [96], "max_size": 96,
                    "val_size": 96, "crop": False, "num_workers": 0},
           "train": {"output_dir": str(tmp_path / "run"), "epochs": 1, "batch_size": 2, "max_iters_per_epoch": 2,
                     "eval_every_epochs": 1, "log_every": 1}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    metrics = train_mod.run(load_config(str(tmp_path / "c.yaml")))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if r["type"] == "iter"]
    assert len(steps) == 2 and all(r["loss_mask"] > 0 for r in steps)  # its scorer trained on its target
    assert 0 < metrics["selection"]["dam_coverage"] <= metrics["selection"]["dam_oracle"]  # evaluated
    record = {"name": f"{NAME}_rho0.2_seed0", "target": NAME, "rho": 0.2, "seed": 0, "status": "done",
              "config": "c.yaml", "AP": metrics["AP"], "AP50": metrics["AP50"], "selection": metrics["selection"]}
    assert f"| {NAME} | 0.2 | 0 |" in results_markdown([record])  # the sweep's report takes it as it is
    loaded = load_for_inference(str(tmp_path / "run" / "checkpoint_last.pth"))
    assert type(loaded.model.selector) is TopHalfSelector
    image = torch.rand(3, 96, 96)
    panels = make_panels(loaded.model, loaded.postprocessor, image, loaded.label_map,
                         target={"boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0]])})
    assert any(k.startswith("kept tokens") for k in panels) and f"{NAME} target" in panels
    assert load_checkpoint(str(tmp_path / "run" / "checkpoint_last.pth"))["config"]["model"]["scorer_target"] == NAME


class LinearScoreSelector(TokenSelector):
    """A criterion with a module of its own (not the scorer): a linear token logit, trained by a margin loss."""

    def __init__(self, budget, options):
        super().__init__(budget, options)
        self.token_logit = torch.nn.Linear(options.dim, 1)

    def score(self, features, proposals, padding_mask):
        return self.token_logit(features).squeeze(-1), {}

    def losses(self, outputs, targets):
        scores = outputs["selection"].scores
        return SelectorLosses({"loss_spread": (scores.std(dim=1) - 1.0).abs().mean()})

    def loss_weights(self, cls, bbox, giou, mask):
        return {"loss_spread": 0.1}


def test_a_criterion_with_its_own_module_saves_it_under_the_official_prefix_and_reloads_strictly():
    saved = dict(SELECTORS)
    register_selector("linear_score_test")(LinearScoreSelector)
    try:
        overrides = ["model.hidden_dim=32", "model.nheads=2", "model.enc_layers=2", "model.dec_layers=2",
                     "model.dim_feedforward=64", "model.num_queries=10", "model.scorer_target=linear_score_test"]
        cfg = load_config("configs/demo_synthetic.yaml", overrides)
        torch.manual_seed(0)
        model, criterion, _ = build_model(cfg)
        image = torch.rand(1, 3, 96, 96)
        targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]])}]
        losses = criterion(model(image), targets)
        assert "loss_spread" in losses and criterion.weight_dict["loss_spread"] == 0.1
        losses["loss_spread"].backward()
        assert model.selector.token_logit.weight.grad.abs().sum() > 0  # its loss trains its module
        state = model.state_dict()
        assert {"transformer.token_logit.weight", "transformer.token_logit.bias"} <= set(state)
        torch.manual_seed(1)
        fresh, _, _ = build_model(cfg)
        fresh.load_state_dict(state, strict=True)
        model.eval()
        fresh.eval()
        with torch.no_grad():
            a, b = model(image), fresh(image)
        assert torch.equal(a["selection"].indices, b["selection"].indices)
        assert torch.equal(a["pred_logits"], b["pred_logits"])
    finally:
        SELECTORS.clear()
        SELECTORS.update(saved)


def test_a_criterion_without_a_score_is_refused_when_built():
    class Unfinished(TokenSelector):
        pass

    from sparse_detr.models.selection import KeepBudget, SelectorOptions

    with pytest.raises(TypeError, match="Unfinished.*score"):
        Unfinished(KeepBudget(0.1), SelectorOptions(dim=8, num_classes=3))
