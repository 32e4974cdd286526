"""Fine-tuning (`model.init_weights`, engine/training/finetune.py): a detector checkpoint with other classes initialises a
new model: every non-head tensor loaded bitwise, the class heads exactly as a fresh model's (focal prior bias
included), for our 6-class demo checkpoint into 3 classes and for an official-layout 91-class R50 checkpoint."""
import math

import pytest
import torch
import yaml

from sparse_detr.config import load_config
from sparse_detr.data import ensure_synthetic
from sparse_detr.engine.training import train as train_mod
from sparse_detr.engine.checkpoint import load_checkpoint
from sparse_detr.engine.training.finetune import init_from_checkpoint, is_class_head
from sparse_detr.models import build_detector

from test_state_dict import _canonical, _layout

TINY = ["model.hidden_dim=32", "model.nheads=2", "model.dim_feedforward=64", "model.enc_layers=2",
        "model.dec_layers=2", "model.num_queries=10", "model.train_backbone=false"]
PRIOR = -math.log((1 - 0.01) / 0.01)  # focal loss's prior-probability bias (Deformable DETR)


def _fresh(config, classes, seed=0, extra=()):
    torch.manual_seed(seed)
    return build_detector(load_config(config, [f"model.num_classes={classes}", *extra]).model)


def _check(model, fresh, weights, report):
    state = model.state_dict()
    heads = [k for k in state if is_class_head(k)]
    assert heads and sorted(report["reinitialised"]) == sorted(heads)
    for key, value in state.items():
        if is_class_head(key):  # as a fresh model of the new classes builds them
            assert torch.equal(value, fresh.state_dict()[key]), key
            if key.endswith("bias"):
                torch.testing.assert_close(value, torch.full_like(value, PRIOR))
        else:
            assert torch.equal(value, weights[key].to(value.dtype)), key
    assert len(report["loaded"]) == len(state) - len(heads) and not report["kept"]


def test_our_6_class_checkpoint_into_a_3_class_model(tmp_path):
    demo = "configs/demo_synthetic.yaml"
    source = _fresh(demo, 6, seed=1, extra=TINY)
    with torch.no_grad():  # trained-looking weights: none equals a fresh initialisation
        for p in source.parameters():
            p.add_(torch.randn_like(p))
    path = tmp_path / "six.pth"
    torch.save({"model": source.state_dict(), "config": {}}, path)
    model, fresh = _fresh(demo, 3, extra=TINY), _fresh(demo, 3, extra=TINY)
    report = init_from_checkpoint(model, str(path))
    _check(model, fresh, source.state_dict(), report)
    assert model.state_dict()["class_embed.0.weight"].shape == (3, 32)


def test_an_official_91_class_r50_checkpoint_into_a_3_class_model(tmp_path):
    """The official layout (tests/data/official_keys), aliases sharing one value as in a real file."""
    values, state = {}, {}
    gen = torch.Generator().manual_seed(0)
    for key, shape in _layout("sparse_detr_r50").items():
        canon = _canonical(key, shared_heads=False)
        if canon not in values:
            values[canon] = torch.randn(shape, generator=gen) if shape else torch.tensor(7)
        state[key] = values[canon]
    path = tmp_path / "official.pth"
    torch.save({"model": state, "optimizer": {}, "epoch": 49}, path)  # what the official code writes
    config = "configs/sparse_detr_r50_rho0.1.yaml"
    model, fresh = _fresh(config, 3), _fresh(config, 3)
    report = init_from_checkpoint(model, str(path))
    _check(model, fresh, state, report)
    # weight and bias of 12 heads (6 decoder, two-stage, 5 encoder aux) under class_embed.* and again under
    # transformer.decoder.class_embed.* (all 12), transformer.encoder.class_embed.* (the 5 aux): the official aliases
    assert len(report["reinitialised"]) == 2 * (12 + 12 + 5)


def test_training_starts_from_init_weights_and_reports_it(tmp_path):
    """Through tools' path: a 3-class run from a 6-class checkpoint, the report in log.txt, no step taken over."""
    root = str(tmp_path / "data")
    synth = dict(num_train=4, num_val=2, min_size=96, max_size=96, seed=0)
    ensure_synthetic(root, **synth)
    model = {"num_classes": 6, "hidden_dim": 32, "nheads": 2, "enc_layers": 1, "dec_layers": 2,
             "dim_feedforward": 64, "num_queries": 10, "train_backbone": False}
    cfg = {"model": model, "data": {"dataset": "synthetic", "root": root, "synthetic": synth, "train_scales": [96],
                                    "max_size": 96, "val_size": 96, "crop": False, "num_workers": 0},
           "train": {"output_dir": str(tmp_path / "six"), "epochs": 1, "batch_size": 2, "max_iters_per_epoch": 1,
                     "eval_every_epochs": 0}}
    (tmp_path / "six.yaml").write_text(yaml.safe_dump(cfg))
    train_mod.run(load_config(str(tmp_path / "six.yaml")))
    six = str(tmp_path / "six" / "checkpoint_last.pth")
    cfg["model"]["num_classes"] = 7  # the synthetic set's 6 classes need >= 6 logits; 7: another head shape
    cfg["model"]["init_weights"] = six
    cfg["train"]["output_dir"] = str(tmp_path / "seven")
    (tmp_path / "seven.yaml").write_text(yaml.safe_dump(cfg))
    train_mod.run(load_config(str(tmp_path / "seven.yaml")))
    log = (tmp_path / "seven" / "log.txt").read_text()
    assert f"model.init_weights {six}: loaded" in log and "re-initialised as at the start of training" in log
    assert load_checkpoint(str(tmp_path / "seven" / "checkpoint_last.pth"))["iteration"] == 1  # a new run
    with pytest.raises(Exception, match="no model weights|cannot read|not a"):
        (tmp_path / "bad.pth").write_bytes(b"nonsense")
        init_from_checkpoint(_fresh("configs/demo_synthetic.yaml", 3, extra=TINY), str(tmp_path / "bad.pth"))
