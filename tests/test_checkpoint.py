"""Checkpoints: weights_only round trip, atomic writes, clear errors, config compatibility, torch.load audit."""
import ast
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sparse_detr.config import Config, to_dict
from sparse_detr.engine import checkpoint as ckpt_mod
from sparse_detr.engine.atomic import write_atomic
from sparse_detr.engine.checkpoint import (LAYOUT_FIELDS, ConfigMismatchError, check_config_compatible,
                                           find_last_checkpoint, get_rng_state, load_checkpoint, save_checkpoint,
                                           set_rng_state)
from sparse_detr.engine.training.optim import build_ema, build_lr_scheduler, scheduler_state

REPO = Path(__file__).resolve().parents[1]


def _full_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.AdamW([{"name": "default", "params": list(model.parameters())}], lr=1e-3)
    sched = build_lr_scheduler(opt, [3], 0.1)
    ema = build_ema(model, 0.99)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    ema.update_parameters(model)
    sched.step()
    return model, {
        "model": model.state_dict(), "optimizer": opt.state_dict(), "lr_scheduler": scheduler_state(sched),
        "scaler": None, "ema": ema.state_dict(), "epoch": 1, "step_in_epoch": 3, "iteration": 17,
        "rng": [get_rng_state()], "config": to_dict(Config()),
        "label_map": {"category_ids": [1, 3], "names": ["a", "b"]},
        "best_ap": 25.0, "metrics": {"AP": 25.0, "per_class": {"a": 50.0, "b": -1.0}, "ap_unit": "percent"},
    }


def test_round_trip_is_weights_only_and_complete(tmp_path):
    model, state = _full_state()
    path = tmp_path / "ck.pth"
    save_checkpoint(str(path), state)
    # Functional weights_only check, independent of load_checkpoint.
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["format_version"] == ckpt_mod.FORMAT_VERSION
    loaded = load_checkpoint(str(path))
    assert set(state) <= set(loaded)
    for k, v in state["model"].items():
        torch.testing.assert_close(loaded["model"][k], v)
    fresh = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    fresh.load_state_dict(loaded["model"])
    opt = torch.optim.AdamW([{"name": "default", "params": list(fresh.parameters())}], lr=1e-3)
    opt.load_state_dict(loaded["optimizer"])
    assert loaded["config"] == to_dict(Config())
    assert loaded["metrics"] == state["metrics"] and loaded["best_ap"] == 25.0
    assert (loaded["epoch"], loaded["step_in_epoch"], loaded["iteration"]) == (1, 3, 17)


def test_rng_states_restore_the_same_draws(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    state = get_rng_state()
    save_checkpoint(str(tmp_path / "r.pth"), {"model": {}, "rng": [state]})
    expected = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.normal(),
                torch.rand(3).tolist())
    set_rng_state(load_checkpoint(str(tmp_path / "r.pth"))["rng"][0])
    got = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.normal(), torch.rand(3).tolist())
    assert got == expected


def test_unsafe_values_are_refused_at_save_time(tmp_path):
    path = tmp_path / "bad.pth"
    with pytest.raises(TypeError, match=r"state\.metrics\.arr.*numpy"):
        save_checkpoint(str(path), {"model": {}, "metrics": {"arr": np.zeros(3)}})
    assert not path.exists() and os.listdir(tmp_path) == []


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_last.pth"
    save_checkpoint(str(path), {"model": {"w": torch.ones(3)}, "iteration": 1})
    before = path.read_bytes()

    def torn_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")  # some bytes reach the disk, then the process "dies"
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(str(path), {"model": {"w": torch.zeros(3)}, "iteration": 2})
    assert path.read_bytes() == before
    assert load_checkpoint(str(path))["iteration"] == 1
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_last.pth"]  # no temporary file left behind


def test_atomic_text_write_replaces_whole_or_not_at_all(tmp_path):
    """The json/log writer: the old text survives a failing write, no temporary file is left, and the new file has
    the permissions a plain open() gives (not mkstemp's 0600)."""
    path, plain = tmp_path / "records.json", tmp_path / "plain.json"
    write_atomic(str(path), lambda f: f.write("old\n"))

    def failing(f):
        f.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(str(path), failing)
    assert path.read_text() == "old\n" and sorted(os.listdir(tmp_path)) == ["records.json"]
    write_atomic(str(path), lambda f: f.write("new\n"))
    plain.write_text("x")
    assert path.read_text() == "new\n" and path.stat().st_mode == plain.stat().st_mode


def test_missing_truncated_and_foreign_files_name_the_path(tmp_path):
    missing = tmp_path / "nope" / "checkpoint_last.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_checkpoint(str(missing))
    good = tmp_path / "good.pth"
    save_checkpoint(str(good), {"model": {"w": torch.randn(1000)}})
    data = good.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeError, match=str(truncated)):
        load_checkpoint(str(truncated))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(RuntimeError, match=str(garbage)):
        load_checkpoint(str(garbage))
    not_ours = tmp_path / "not_ours.pth"
    torch.save({"weights": torch.ones(1)}, not_ours)
    with pytest.raises(RuntimeError, match="not a sparse-detr checkpoint"):
        load_checkpoint(str(not_ours))


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "evil": _Payload()}, path)  # an arbitrary-object pickle
    with pytest.raises(RuntimeError, match=str(path)):
        load_checkpoint(str(path))
    assert "this must never run" not in capsys.readouterr().out
    # The plain pickle protocol is refused as well.
    with open(tmp_path / "plain.pth", "wb") as f:
        pickle.dump({"model": {}}, f)
    with pytest.raises(RuntimeError):
        load_checkpoint(str(tmp_path / "plain.pth"))


def test_config_mismatch_lists_the_layout_fields():
    base = to_dict(Config())
    other = to_dict(Config())
    other["model"].update(hidden_dim=128, dec_layers=3, dropout=0.0, pretrained_backbone="x.pth")
    with pytest.raises(ConfigMismatchError) as info:
        check_config_compatible(base, other, "run/checkpoint_last.pth")
    msg = str(info.value)
    assert "run/checkpoint_last.pth" in msg
    assert "model.hidden_dim: run/checkpoint_last.pth has 256, config has 128" in msg
    assert "model.dec_layers" in msg
    assert "dropout" not in msg and "pretrained_backbone" not in msg
    # rho only matters through "is there a scorer": 0.1 -> 0.3 loads, 0 -> 0.1 does not.
    a, b = to_dict(Config()), to_dict(Config())
    a["model"]["rho"], b["model"]["rho"] = 0.1, 0.3
    check_config_compatible(a, b)
    b["model"]["rho"] = 0.0
    with pytest.raises(ConfigMismatchError, match="rho"):
        check_config_compatible(a, b)
    check_config_compatible(None, base)  # converted weights without a config: load_state_dict checks


def test_layout_fields_exist_in_the_schema():
    assert set(LAYOUT_FIELDS) <= set(to_dict(Config())["model"])


def test_find_last_checkpoint(tmp_path):
    assert find_last_checkpoint(str(tmp_path)) is None
    assert find_last_checkpoint(str(tmp_path / "missing")) is None
    save_checkpoint(str(tmp_path / "checkpoint_last.pth"), {"model": {}})
    assert find_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint_last.pth")


def _torch_load_calls(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr == "load" and isinstance(f.value, ast.Name) \
                    and f.value.id == "torch":
                yield node


def test_every_torch_load_in_the_repo_is_weights_only():
    files = [p for p in REPO.rglob("*.py") if not any(part.startswith(".") for part in p.relative_to(REPO).parts)]
    assert any(p.name == "checkpoint.py" for p in files)
    offenders, calls = [], 0
    for path in files:
        for call in _torch_load_calls(path):
            calls += 1
            ok = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                     for k in call.keywords)
            if not ok:
                offenders.append(f"{path.relative_to(REPO)}:{call.lineno}")
    assert calls >= 1  # at least checkpoint.py's own call was found: the scan works
    assert offenders == [], f"torch.load without weights_only=True: {offenders}"


# Toy-width Sparse DETR (every optional part on) and plain Deformable DETR, the two bases of the layout test.
_SPARSE = dict(num_classes=6, hidden_dim=32, nheads=2, num_feature_levels=2, enc_layers=2, dec_layers=2,
               dim_feedforward=64, num_queries=10, with_box_refine=True, two_stage=True, eff_query_init=True,
               eff_specific_head=True, rho=0.3, use_enc_aux_loss=True, train_backbone=False)
_PLAIN = {**_SPARSE, "with_box_refine": False, "two_stage": False, "eff_query_init": False,
          "eff_specific_head": False, "rho": 0.0, "use_enc_aux_loss": False}
_VARIATIONS = [
    (_SPARSE, dict(hidden_dim=64)), (_SPARSE, dict(nheads=4)), (_SPARSE, dict(num_classes=7)),
    (_SPARSE, dict(num_feature_levels=3)), (_SPARSE, dict(enc_layers=3)), (_SPARSE, dict(dec_layers=3)),
    (_SPARSE, dict(dim_feedforward=128)), (_SPARSE, dict(enc_n_points=2)), (_SPARSE, dict(dec_n_points=2)),
    (_SPARSE, dict(num_queries=20)), (_SPARSE, dict(aux_loss=False)), (_SPARSE, dict(with_box_refine=False)),
    (_SPARSE, dict(eff_query_init=False)), (_SPARSE, dict(eff_specific_head=False)),
    (_SPARSE, dict(use_enc_aux_loss=False)), (_SPARSE, dict(rho=0.5)), (_SPARSE, dict(scorer_target="os")),
    (_SPARSE, dict(scorer_target="foreground")), (_SPARSE, dict(scorer_target="salience")),
    (_SPARSE, dict(scorer_target="random")), (_SPARSE, dict(rho_levels=[0.2, 0.4], rho_layers=[0.3, 0.1])),
    (_SPARSE, dict(query_padding="exclude", enc_loss_padding="exclude")),
    (_SPARSE, dict(dam_alignment="aligned", scorer_padding="exclude")), (_SPARSE, dict(dropout=0.0)),
    (_SPARSE, dict(train_backbone=True)), (_SPARSE, dict(rho=0.0, use_enc_aux_loss=False)),
    (_PLAIN, dict(num_queries=20)), (_PLAIN, dict(aux_loss=False)), (_PLAIN, dict(with_box_refine=True)),
    (_PLAIN, dict(two_stage=True)), (_PLAIN, dict(dam_alignment="aligned")), (_PLAIN, dict(backbone="swin_t")),
]


def test_config_check_agrees_with_the_real_state_dict_layout():
    """check_config_compatible must refuse exactly the config changes that change the model's state_dict."""
    from sparse_detr.config import config_from_dict
    from sparse_detr.models import build_detector

    def layout(model_cfg):
        cfg = config_from_dict({"model": model_cfg})
        with torch.device("meta"):  # shapes only: no memory, no weight init (34 R50 detectors in ~1/4 the time)
            state = build_detector(cfg.model).state_dict()
        return {k: tuple(v.shape) for k, v in state.items()}, to_dict(cfg)

    bases = {id(_SPARSE): layout(_SPARSE), id(_PLAIN): layout(_PLAIN)}
    wrong = []
    for base, change in _VARIATIONS:
        base_layout, base_cfg = bases[id(base)]
        new_layout, new_cfg = layout({**base, **change})
        try:
            check_config_compatible(base_cfg, new_cfg)
            refused = False
        except ConfigMismatchError:
            refused = True
        if refused != (new_layout != base_layout):
            wrong.append(f"{change}: layout {'changes' if new_layout != base_layout else 'same'}, "
                         f"check {'refuses' if refused else 'accepts'}")
    assert wrong == []


def test_extracted_backbone_loads_as_pretrained_weights(tmp_path):
    """tools/extract_backbone.py: the backbone of a trained checkpoint starts a new model with the same backbone."""
    from sparse_detr.config import load_config
    from sparse_detr.engine.checkpoint import CheckpointError, save_checkpoint
    from sparse_detr.engine.cli import run_tool
    from sparse_detr.models import build_detector

    sys_path = str(Path(__file__).resolve().parents[1] / "tools")
    import sys
    sys.path.insert(0, sys_path)
    try:
        import extract_backbone as tool
    finally:
        sys.path.remove(sys_path)
    small = ["model.hidden_dim=32", "model.nheads=4", "model.enc_layers=1", "model.dec_layers=1",
             "model.dim_feedforward=32", "model.num_queries=8"]
    torch.manual_seed(0)
    trained = build_detector(load_config("configs/demo_synthetic.yaml", small).model)
    save_checkpoint(str(tmp_path / "run.pth"), {"model": trained.state_dict()})
    out = tmp_path / "backbone.pt"
    assert run_tool(tool.main, [str(tmp_path / "run.pth"), str(out)]) == 0
    torch.manual_seed(1)  # another initialisation: only the backbone comes from the file
    fresh = build_detector(load_config("configs/demo_synthetic.yaml", small + [f"model.pretrained_backbone={out}"]).model)
    new = fresh.state_dict()
    body = [k for k in new if k.startswith("backbone.0.body.")]
    assert body and all(torch.equal(new[k], trained.state_dict()[k]) for k in body)
    assert not torch.equal(new["input_proj.0.0.weight"], trained.state_dict()["input_proj.0.0.weight"])  # the rest: new
    assert run_tool(tool.main, [str(tmp_path / "run.pth"), str(out)]) == 3  # a user error: never overwrites
    with pytest.raises(CheckpointError, match="exists"):
        tool.extract_backbone(str(tmp_path / "run.pth"), str(out))


def test_a_format_2_checkpoint_is_read_in_percent(tmp_path):
    """Before format 3, best_ap and the metrics were COCO fractions: on load they are percent, -1 (no ground truth)
    stays -1, the selection instruments stay fractions, and the file is not changed."""
    _, state = _full_state()
    old = {**state, "format_version": 2, "best_ap": 0.25,
           "metrics": {"AP": 0.25, "AP50": 0.5, "APs": -1.0, "per_class": {"a": 0.5, "b": -1.0},
                       "selection": {"dam_coverage": 0.3}, "ema": {"AP": 0.125}}}
    path = tmp_path / "old.pth"
    torch.save(old, path)
    raw = path.read_bytes()
    loaded = load_checkpoint(str(path))
    assert loaded["best_ap"] == 25.0
    m = loaded["metrics"]
    assert (m["AP"], m["AP50"], m["APs"], m["ema"]["AP"]) == (25.0, 50.0, -1.0, 12.5)
    assert m["per_class"] == {"a": 50.0, "b": -1.0} and m["selection"] == {"dam_coverage": 0.3}
    assert m["ap_unit"] == "percent" and path.read_bytes() == raw
    # A current checkpoint is not converted twice; one without metrics (an official release) is left alone.
    save_checkpoint(str(tmp_path / "new.pth"), {**state, "best_ap": 25.0})
    assert load_checkpoint(str(tmp_path / "new.pth"))["best_ap"] == 25.0
    torch.save({"model": state["model"]}, tmp_path / "official.pth")
    assert "best_ap" not in load_checkpoint(str(tmp_path / "official.pth"))
