"""tools/inspect_selection.py on checkpoints of every criterion and of a dense model: the table of its own selection
next to the DAM oracle, random and ground-truth centres, the invariants between them, and one picture per image."""
import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from sparse_detr.config import load_config
from sparse_detr.data import ensure_synthetic
from sparse_detr.engine.training import train as train_mod
from sparse_detr.models.selection import SELECTORS

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import inspect_selection as tool  # noqa: E402

SYNTH = dict(num_train=4, num_val=3, min_size=96, max_size=128, seed=3)
MODEL = dict(num_classes=6, hidden_dim=32, nheads=2, num_feature_levels=2, enc_layers=2, dec_layers=2,
             dim_feedforward=64, num_queries=10, with_box_refine=True, two_stage=True, eff_query_init=True,
             eff_specific_head=True, rho=0.2, use_enc_aux_loss=True, train_backbone=False, backbone="tiny_cnn")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("synthetic"))
    ensure_synthetic(root, **SYNTH)
    return root


def _checkpoint(data_root, tmp_path, model) -> str:
    out = tmp_path / "run"
    cfg = {"model": {**MODEL, **model},
           "data": {"dataset": "synthetic", "root": data_root, "synthetic": SYNTH, "train_scales": [96],
                    "max_size": 128, "val_size": 96, "crop": False, "num_workers": 0},
           "train": {"output_dir": str(out), "epochs": 1, "batch_size": 2, "max_iters_per_epoch": 1,
                     "eval_every_epochs": 0, "log_every": 1}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    train_mod.run(load_config(str(tmp_path / "c.yaml")))
    return str(out / "checkpoint_last.pth")


@pytest.mark.parametrize("selection", sorted(SELECTORS) + ["dense"])
def test_inspect_a_checkpoint_of_every_criterion(data_root, tmp_path, selection, capsys):
    model = {"rho": 0.0, "use_enc_aux_loss": False} if selection == "dense" else {"scorer_target": selection}
    ckpt = _checkpoint(data_root, tmp_path, model)
    out = tmp_path / "inspect"
    report = tool.main(["--checkpoint", ckpt, "--images", os.path.join(data_root, "val"), "--ann-file",
                        os.path.join(data_root, "annotations", "instances_val.json"), "--out", str(out)])
    sel = report["selections"]
    assert set(sel) == ({"DAM oracle", "random", "GT centres"} | (set() if selection == "dense" else {"own"}))
    for name, values in sel.items():  # the oracle is the best any selection of the budget can do
        assert 0 <= values["dam_coverage"] <= sel["DAM oracle"]["dam_coverage"] + 1e-9, name
        assert 0 <= values["object_coverage"] <= 1 and 0 <= values["fg_precision"] <= 1
    # the ground-truth centre selection keeps tokens inside boxes first: the best foreground precision
    assert sel["GT centres"]["fg_precision"] >= max(v["fg_precision"] for v in sel.values()) - 1e-9
    assert report["images"] == 3 and len(report["written"]) == 3 and all(os.path.isfile(p) for p in report["written"])
    assert json.loads((out / "report.json").read_text())["selections"] == sel
    printed = capsys.readouterr().out
    assert "DAM oracle" in printed and "GT centres" in printed and ("own" in printed) == (selection != "dense")


def test_inspect_without_annotations_and_a_bad_rho(data_root, tmp_path):
    ckpt = _checkpoint(data_root, tmp_path, {"scorer_target": "dam"})
    report = tool.main(["--checkpoint", ckpt, "--images", os.path.join(data_root, "val"), "--out",
                        str(tmp_path / "i"), "--rho", "0.5", "--max-images", "1"])
    assert set(report["selections"]) == {"own", "DAM oracle", "random"}
    assert "object_coverage" not in report["selections"]["own"]
    with pytest.raises(SystemExit):
        tool.main(["--checkpoint", ckpt, "--images", data_root, "--rho", "1.5"])
