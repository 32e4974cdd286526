"""The training loop end to end on the CPU, with the real model, criterion and data pipeline (tiny sizes).

* 2-process DDP (gloo, torchrun) computes the same losses as one process with the same global batch;
* a run SIGKILLed in the middle of an epoch and resumed with `--resume auto` continues the exact loss curve, and
  ends with the same weights, as an uninterrupted run;
* a non-finite loss stops with the global step, every term and the batch's image ids, keeping the last checkpoint;
* a checkpoint of another architecture, a missing checkpoint and an unreadable image fail with clear errors;
* `--eval-only` and `tools/eval.py` evaluate a checkpoint;
* nothing is lost: a rejected resume writes nothing, a weights-only file is named as such, stale checkpoint temp
  files go, a second run on a folder is refused, a failing evaluation keeps the epoch, a matcher failure gets the
  non-finite report, an interrupted run resumes with one log record per iteration (epochs numbered from 1).
"""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from sparse_detr.config import config_from_dict, load_config
from sparse_detr.data import build_dataset, ensure_synthetic
from sparse_detr.engine.cli import run_tool
from sparse_detr.engine.training import train as train_mod
from sparse_detr.engine.training import trainer as trainer_mod
from sparse_detr.engine.checkpoint import ConfigMismatchError, find_last_checkpoint, load_checkpoint
from sparse_detr.models.criterion import SetCriterion

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "tools" / "train.py")
EVAL = str(REPO / "tools" / "eval.py")
SYNTH = dict(num_train=12, num_val=4, min_size=96, max_size=96, seed=0)  # one image size: no batch padding
# Sparse DETR with every head (two-stage, refine, scorer, encoder aux losses), at toy width, on the tiny CNN backbone
# (ResNet-50 is tested in test_backbone.py and test_state_dict.py; here it made every checkpoint 100 MB).
TINY_MODEL = dict(num_classes=6, hidden_dim=32, nheads=2, num_feature_levels=2, enc_layers=2, dec_layers=2,
                  dim_feedforward=64, num_queries=10, with_box_refine=True, two_stage=True, eff_query_init=True,
                  eff_specific_head=True, rho=0.3, use_enc_aux_loss=True, train_backbone=False, backbone="tiny_cnn")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("synthetic"))
    ensure_synthetic(root, **SYNTH)
    return root


def _config(data_root: str, output_dir, model=None, **train) -> dict:
    return {
        "model": {**TINY_MODEL, **(model or {})},
        "data": {"dataset": "synthetic", "root": data_root, "synthetic": SYNTH, "train_scales": [96],
                 "max_size": 96, "val_size": 96, "crop": False, "num_workers": 0},
        "train": {"output_dir": str(output_dir), "epochs": 1, "batch_size": 2, "log_every": 1, "seed": 7,
                  "eval_batch_size": 2, **train},
    }


def _write(path: Path, cfg: dict) -> str:
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _env() -> dict:
    # One thread per process: no oversubscription with two ranks on a small machine, and a fixed reduction order.
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def _iters(output_dir) -> dict[int, dict]:
    """iteration -> the LAST record of it (a resumed run recomputes the ones after its checkpoint)."""
    out = {}
    for line in (Path(output_dir) / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["type"] == "iter":
            out[rec["iteration"]] = {k: v for k, v in rec.items() if k.startswith("loss") or k == "grad_norm"}
    return out


def _batch_image_ids(data_root: str, seed: int, epoch: int, step: int, batch: int) -> list[int]:
    """Independent reference for the sampler: a seeded permutation of the training set, cut into batches."""
    ids = build_dataset("train", dataset="synthetic", root=data_root, synthetic=SYNTH).image_ids
    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return [ids[i] for i in perm[step * batch:(step + 1) * batch]]


def test_ddp_two_processes_match_one_process(data_root, tmp_path):
    # dropout 0: the two processes draw different dropout masks than one process would.
    cfg = _write(tmp_path / "c.yaml", _config(data_root, tmp_path / "unused", model={"dropout": 0.0},
                                              max_iters_per_epoch=3, eval_every_epochs=0))
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    # The one-process run in this process (one thread, as the subprocesses): no third interpreter to start.
    train_mod.run(load_config(cfg, [f"train.output_dir={single}", "train.batch_size=2"]))
    _check(subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           TRAIN, "--config", cfg, f"train.output_dir={ddp}", "train.batch_size=1"],
                          env=_env(), capture_output=True, text=True, timeout=300))
    a, b = _iters(single), _iters(ddp)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    assert "loss_mask" in a[1] and "loss_ce_enc_aux_0" in a[1]  # every head took part
    for it in a:
        assert a[it].keys() == b[it].keys()
        for k, v in a[it].items():
            assert b[it][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (it, k)


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(data_root, tmp_path):
    # Evaluation only at the end (eval_every_epochs=2) keeps the test short; the end-of-epoch checkpoint of
    # epoch 0 still happens, so the resumed run crosses an epoch boundary and an lr drop.
    cfg = _write(tmp_path / "c.yaml", _config(data_root, tmp_path / "unused", epochs=2, max_iters_per_epoch=3,
                                              checkpoint_every_iters=1, eval_every_epochs=2, lr_drop_epochs=[1],
                                              ema=True, ema_decay=0.9))
    full, killed = tmp_path / "full", tmp_path / "killed"
    train_mod.run(load_config(cfg, [f"train.output_dir={full}"]))  # in this process: one interpreter less

    proc = subprocess.Popen([sys.executable, TRAIN, "--config", cfg, f"train.output_dir={killed}"], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log, deadline = killed / "log.jsonl", time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if log.exists() and '"type": "checkpoint"' in log.read_text():
                proc.send_signal(signal.SIGKILL)  # no chance to clean up: as a node failure
                break
            time.sleep(0.01)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    state = load_checkpoint(str(killed / "checkpoint_last.pth"))  # the last checkpoint is always loadable
    assert 0 < state["step_in_epoch"] < 3, "not killed in the middle of an epoch"  # of epoch 0, or 1 when slow

    train_mod.run(load_config(cfg, [f"train.output_dir={killed}"]), resume="auto")
    a, b = _iters(full), _iters(killed)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    iterations = [json.loads(line)["iteration"] for line in (killed / "log.jsonl").read_text().splitlines()
                  if json.loads(line)["type"] == "iter"]
    assert iterations == list(range(1, 7))  # the resumed run continued the log: no iteration twice
    for it in a:
        assert b[it] == a[it], f"iteration {it} differs after resume"
    end_a, end_b = (load_checkpoint(str(d / "checkpoint_last.pth")) for d in (full, killed))
    assert end_a["iteration"] == end_b["iteration"] == 6
    for key in ("model", "ema"):
        for name, tensor in end_a[key].items():
            assert torch.equal(tensor, end_b[key][name]), (key, name)
    assert end_a["metrics"]["AP"] == end_b["metrics"]["AP"]


@pytest.fixture(scope="module")
def short_run(data_root, tmp_path_factory):
    """A finished 2-iteration run (in-process): its config dict and checkpoint."""
    out = tmp_path_factory.mktemp("short")
    cfg = _config(data_root, out, max_iters_per_epoch=2, ema=True, ema_decay=0.5)
    train_mod.run(config_from_dict(cfg))
    return cfg, str(out / "checkpoint_last.pth")


def test_non_finite_loss_stops_with_step_terms_and_image_ids(data_root, tmp_path, monkeypatch):
    original, calls = SetCriterion.forward, []

    def poisoned(self, outputs, targets):
        losses = original(self, outputs, targets)
        calls.append(1)
        if len(calls) == 3:
            losses["loss_giou"] = losses["loss_giou"] * float("nan")
        return losses

    monkeypatch.setattr(SetCriterion, "forward", poisoned)
    cfg = config_from_dict(_config(data_root, tmp_path, max_iters_per_epoch=5, checkpoint_every_iters=2))
    last = tmp_path / "checkpoint_last.pth"
    with pytest.raises(train_mod.NonFiniteLossError) as info:
        train_mod.run(cfg)
    msg = str(info.value)
    assert "global step 3 (epoch 1, batch 3)" in msg
    assert "loss_giou=nan" in msg and "loss=nan" in msg and "loss_ce=" in msg
    assert f"image ids {_batch_image_ids(data_root, 7, 0, 2, 2)}" in msg
    assert str(last) in msg
    state = load_checkpoint(str(last))  # the good checkpoint of step 2, not overwritten
    assert state["iteration"] == 2
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert records[-1]["type"] == "error" and records[-1]["iteration"] == 3


def test_resume_with_other_architecture_names_the_fields(short_run, tmp_path):
    cfg, path = short_run
    before = Path(path).read_bytes()
    other = config_from_dict({**cfg, "model": {**cfg["model"], "hidden_dim": 64, "dec_layers": 3, "dropout": 0.0},
                              "train": {**cfg["train"], "output_dir": str(tmp_path)}})
    with pytest.raises(ConfigMismatchError) as info:
        train_mod.run(other, resume=path)
    msg = str(info.value)
    assert path in msg and "model.hidden_dim" in msg and "model.dec_layers" in msg and "dropout" not in msg
    assert Path(path).read_bytes() == before


def test_missing_checkpoint_is_named(short_run, tmp_path):
    cfg, _ = short_run
    cfg = config_from_dict({**cfg, "train": {**cfg["train"], "output_dir": str(tmp_path)}})
    missing = str(tmp_path / "nowhere" / "checkpoint_last.pth")
    for kwargs in ({"resume": missing}, {"checkpoint": missing, "eval_only": True}):
        with pytest.raises(FileNotFoundError, match=missing):
            train_mod.run(cfg, **kwargs)
    # --resume auto without any checkpoint starts from scratch instead (the first launch of a relaunch loop).
    assert find_last_checkpoint(str(tmp_path)) is None
    cfg.train.max_iters_per_epoch = 1
    train_mod.run(cfg, resume="auto")
    assert load_checkpoint(find_last_checkpoint(str(tmp_path)))["iteration"] == 1


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_image_error_names_the_file(data_root, tmp_path, workers):
    root = tmp_path / "broken"
    shutil.copytree(data_root, root)
    cfg = _config(str(root), tmp_path / "out")
    cfg["data"]["num_workers"] = workers
    first = _batch_image_ids(str(root), 7, 0, 0, 2)[0]  # in the very first batch
    bad = root / "train" / f"{first - 1:06d}.png"  # the generator names image id i+1 "{i:06d}.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(RuntimeError, match=re.escape(str(bad))):
        train_mod.run(config_from_dict(cfg))


def test_eval_only_and_eval_tool(short_run, tmp_path, capsys):
    import tools.eval as eval_tool

    cfg, path = short_run
    metrics = train_mod.run(config_from_dict({**cfg, "train": {**cfg["train"], "output_dir": str(tmp_path)}}),
                            eval_only=True, checkpoint=path)
    assert {"AP", "AP50", "ARl", "per_class"} <= set(metrics)
    # Offline evaluation reproduces the numbers of the evaluation at the end of training, raw and EMA weights.
    trained = load_checkpoint(path)["metrics"]
    assert metrics["AP"] == trained["AP"] and metrics["AR100"] == trained["AR100"]
    ema_metrics = train_mod.evaluate_checkpoint(config_from_dict(cfg), path, use_ema=True)
    assert ema_metrics["AP"] == trained["ema"]["AP"] and ema_metrics["AR100"] == trained["ema"]["AR100"]
    cfg_file = _write(tmp_path / "c.yaml", cfg)
    out = tmp_path / "det.json"
    capsys.readouterr()
    # tools/eval.py as its __main__ runs it (test_cli.py checks the wiring), in this process: one interpreter less
    assert run_tool(eval_tool.main, ["--config", cfg_file, "--checkpoint", path, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "AP50" in printed and "rectangle" in printed  # the 12 numbers and the per-class table
    detections = json.loads(out.read_text())
    assert detections and {"image_id", "category_id", "bbox", "score"} <= set(detections[0])
    # The same weights and images through both entry points give the same detections.
    assert detections == json.loads((tmp_path / "detections_val.json").read_text())


def test_run_writes_config_logs_and_tensorboard(short_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sparse_detr.config import to_dict

    cfg, path = short_run
    out = Path(path).parent
    assert to_dict(load_config(str(out / "config.yaml"))) == to_dict(config_from_dict(cfg))  # resolved config
    assert load_checkpoint(path)["config"] == to_dict(config_from_dict(cfg))
    text = (out / "log.txt").read_text()
    assert "eta epoch" in text and "it/s" in text and "mem" in text and "loss_mask" in text
    kinds = [json.loads(line)["type"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert kinds.count("iter") == 2 and {"eval", "epoch", "checkpoint"} <= set(kinds)
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/loss_ce", "train/lr", "train/grad_norm", "val/AP", "val/AP50"} <= scalars
    assert len(acc.Tags()["images"]) == 2  # train.vis_num_images


def test_training_and_evaluation_give_the_model_the_unpadded_image_sizes(data_root, tmp_path, monkeypatch):
    """The loops pass `image_sizes` (host ints read from the CPU targets), so the kept-token count k is bounded by
    the real images, not the padded canvas: with mixed sizes in a batch, k is smaller than without them."""
    import math

    from sparse_detr.models.detector import SparseDETR

    original, calls = SparseDETR.forward, []

    def spy(self, images, mask=None, image_sizes=None, return_maps=False):
        out = original(self, images, mask, image_sizes=image_sizes, return_maps=return_maps)
        shapes = [tuple(s) for s in out["spatial_shapes"].tolist()]
        valid = (~out["padding_mask"]).sum(1).tolist()  # the tokens of each image, counted off the mask
        calls.append({"training": self.training, "sizes": image_sizes,
                      "extents": [(int((~m).any(1).sum()), int((~m).any(0).sum())) for m in mask],
                      "k": out["selection"].indices.shape[1],
                      # Sec. 3: floor(rho * valid) + 1 tokens per image; k must hold the largest image's ...
                      "k_needed": max(math.floor(self.selector.budget.rho * v) + 1 for v in valid),
                      # ... and, bounded by the canvas only, it would be that of a full canvas.
                      "k_canvas": math.floor(self.selector.budget.rho * sum(h * w for h, w in shapes)) + 1,
                      # A host bound from the image sizes may overcount by a row and a column per level.
                      "slack": math.ceil(self.selector.budget.rho * sum(h + w + 1 for h, w in shapes)) + 1})
        return out

    monkeypatch.setattr(SparseDETR, "forward", spy)
    # Images of random aspect ratios (not the square ones of `data_root`): a batch of a landscape and a portrait
    # image is padded to a canvas that neither fills, which is where the sizes make k smaller.
    synth = dict(num_train=8, num_val=2, min_size=48, max_size=112, seed=3)
    cfg = _config(str(tmp_path / "data"), tmp_path / "out", max_iters_per_epoch=4, vis_num_images=0)
    cfg["data"].update(synthetic=synth, train_scales=[128], max_size=320, val_size=64)
    train_mod.run(config_from_dict(cfg))
    assert [c["training"] for c in calls].count(True) == 4 and not calls[-1]["training"]  # trained, then evaluated
    for call in calls:
        assert call["sizes"] == call["extents"]
        assert call["k_needed"] <= call["k"] <= min(call["k_canvas"], call["k_needed"] + call["slack"])
    assert any(c["k"] < c["k_canvas"] for c in calls if c["training"])  # seeded: one such batch in these four


# ---------------------------------------------------------------------------------------------------------
# Nothing lost, nothing vague (issue 15): each test fails on the code before it.

def _tree(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


def _records(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "log.jsonl").read_text().splitlines()]


def test_rejected_resume_writes_nothing_into_the_output_folder(short_run, tmp_path):
    cfg, path = short_run
    run = tmp_path / "run"
    shutil.copytree(Path(path).parent, run)
    before = _tree(run)
    other = config_from_dict({**cfg, "model": {**cfg["model"], "hidden_dim": 64},
                              "train": {**cfg["train"], "output_dir": str(run)}})
    with pytest.raises(ConfigMismatchError, match="model.hidden_dim"):
        train_mod.run(other, resume="auto")
    assert _tree(run) == before  # config.yaml and the logs untouched


def test_resume_from_a_weights_only_file_says_to_use_checkpoint(short_run, tmp_path):
    from sparse_detr.engine.checkpoint import CheckpointError

    cfg, path = short_run
    weights = tmp_path / "weights.pth"
    torch.save({"model": load_checkpoint(path)["model"]}, weights)
    cfg = config_from_dict({**cfg, "train": {**cfg["train"], "output_dir": str(tmp_path / "out")}})
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(weights))} holds model weights only.*"
                                              rf"--checkpoint {re.escape(str(weights))}"):
        train_mod.run(cfg, resume=str(weights))
    assert not (tmp_path / "out").exists()


def test_stale_checkpoint_temp_files_are_removed_at_start_up(short_run, tmp_path):
    cfg, path = short_run
    run = tmp_path / "run"
    shutil.copytree(Path(path).parent, run)
    ours = [run / ".checkpoint_last.pth.k2j_x9aq.tmp", run / ".checkpoint_best.pth.00000000.tmp"]
    theirs = [run / "notes.tmp", run / ".checkpoint_last.pth.tmp", run / ".checkpoint_last.pth.abc.tmp",
              run / "checkpoint_last.pth.k2j_x9aq.tmp"]
    for p in ours + theirs:
        p.write_bytes(b"x" * 100)
    train_mod.run(config_from_dict({**cfg, "train": {**cfg["train"], "output_dir": str(run)}}), resume="auto")
    assert not any(p.exists() for p in ours) and all(p.exists() for p in theirs)
    assert "removed 2 temporary file(s)" in (run / "log.txt").read_text()


def test_a_second_run_on_the_same_folder_is_refused_naming_the_first(short_run, tmp_path):
    from sparse_detr.engine.training.output_dir import OutputFolderBusyError, lock_output_dir

    cfg, _ = short_run
    out = tmp_path / "busy"
    held = lock_output_dir(str(out))  # as another run would (flock: a second open file conflicts)
    try:
        with pytest.raises(OutputFolderBusyError, match=rf"{re.escape(str(out))} is in use.*process {os.getpid()}"):
            train_mod.run(config_from_dict({**cfg, "train": {**cfg["train"], "output_dir": str(out)}}))
        assert sorted(os.listdir(out)) == [".lock"]
    finally:
        held.release()
    train_mod.run(config_from_dict({**cfg, "train": {**cfg["train"], "output_dir": str(out),
                                                     "max_iters_per_epoch": 1, "eval_every_epochs": 0}}))
    assert not (out / ".lock").exists()  # a run that ended leaves no lock file behind


def test_a_lock_file_replaced_between_open_and_flock_is_taken_anew(tmp_path, monkeypatch):
    """The owner removes its lock file at exit: a process that opened the old file (and then got its flock) must
    not hold a lock nobody else can see; it takes the new file's lock instead."""
    import sparse_detr.engine.training.output_dir as od

    real_open, replaced = open, []

    def opening(path, *args, **kwargs):
        f = real_open(path, *args, **kwargs)
        if str(path).endswith(od.LOCK_FILE) and not replaced:  # the owner releases right after our open
            replaced.append(1)
            os.unlink(path)
        return f

    monkeypatch.setattr(od, "open", opening, raising=False)
    lock = od.lock_output_dir(str(tmp_path / "run"))
    try:
        path = tmp_path / "run" / od.LOCK_FILE
        assert replaced and path.exists() and os.stat(path).st_ino == os.fstat(lock.file.fileno()).st_ino
        with pytest.raises(od.OutputFolderBusyError):
            od.lock_output_dir(str(tmp_path / "run"))
    finally:
        lock.release()
    assert not path.exists()


def test_failed_evaluation_keeps_the_epoch_and_names_the_image(data_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    ann_file = root / "annotations" / "instances_train.json"
    data = json.loads(ann_file.read_text())
    data["annotations"][0]["bbox"][2] += 500  # sticks out of its image: clipped, with a warning
    ann_file.write_text(json.dumps(data))
    bad = root / "val" / "000001.png"
    good = bad.read_bytes()
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "out"
    cfg = config_from_dict(_config(str(root), out, max_iters_per_epoch=2, vis_num_images=0))
    with pytest.raises(train_mod.EvaluationError, match=rf"after epoch 1.*{re.escape(str(bad))}") as info:
        train_mod.run(cfg)
    assert str(out / "checkpoint_last.pth") in str(info.value)
    state = load_checkpoint(str(out / "checkpoint_last.pth"))
    assert state["iteration"] == 2 and state["eval_pending"]
    # The dataset's warnings reach the run's logs, not only stderr.
    assert "clipped 1 box(es)" in (out / "log.txt").read_text()
    assert any(r["type"] == "warning" and "clipped 1 box(es)" in r["message"] for r in _records(out))

    bad.write_bytes(good)
    metrics = train_mod.run(cfg, resume="auto")  # evaluates the saved epoch, trains nothing more
    state = load_checkpoint(str(out / "checkpoint_last.pth"))
    assert state["iteration"] == 2 and not state["eval_pending"] and state["metrics"]["AP"] == metrics["AP"]
    assert os.path.isfile(out / "checkpoint_best.pth")
    assert [r["type"] for r in _records(out)].count("eval") == 1


def test_non_finite_matching_cost_goes_through_the_same_report(data_root, tmp_path, monkeypatch):
    from sparse_detr.models.detector import SparseDETR

    original, calls, poison = SparseDETR.forward, [], {1}

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls.append(1)
        if self.training and len(calls) in poison:  # as the weights that lr=1e8 gives after a step
            out["pred_boxes"] = out["pred_boxes"] * float("nan")
        return out

    monkeypatch.setattr(SparseDETR, "forward", poisoned)
    with pytest.raises(train_mod.NonFiniteLossError, match=r"global step 1 \(epoch 1, batch 1\).*HungarianMatcher"):
        train_mod.run(config_from_dict(_config(data_root, tmp_path / "first", max_iters_per_epoch=4)))
    calls.clear()
    poison.clear()
    poison.add(2)  # after a good step: the report then has every term's name
    out = tmp_path / "later"
    with pytest.raises(train_mod.NonFiniteLossError) as info:
        train_mod.run(config_from_dict(_config(data_root, out, max_iters_per_epoch=4)))
    msg = str(info.value)
    assert "global step 2 (epoch 1, batch 2)" in msg and "HungarianMatcher: non-finite matching cost" in msg
    assert "loss=nan" in msg and "loss_ce=nan" in msg  # every term of the step, named
    assert f"image ids {_batch_image_ids(data_root, 7, 0, 1, 2)}" in msg
    assert _records(out)[-1]["type"] == "error" and _records(out)[-1]["iteration"] == 2
    for path in (tmp_path / "first" / "log.jsonl", out / "log.jsonl"):
        assert json.loads(path.read_text().splitlines()[-1])["type"] == "error"


def test_interrupted_run_resumes_with_one_record_per_iteration(data_root, tmp_path, monkeypatch):
    """Ctrl-C says where the run stopped; the resumed run continues log.jsonl and TensorBoard without repeating
    the iterations it recomputes; epochs are numbered from 1 in log.txt, log.jsonl and the resume message."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    original, calls = SetCriterion.forward, []

    def interrupted(self, outputs, targets):
        calls.append(1)
        if len(calls) == 4:  # Ctrl-C in the 4th step, after the checkpoint of step 2 and the record of step 3
            raise KeyboardInterrupt
        return original(self, outputs, targets)

    monkeypatch.setattr(SetCriterion, "forward", interrupted)
    out = tmp_path / "out"
    cfg = config_from_dict(_config(data_root, out, epochs=2, max_iters_per_epoch=4, checkpoint_every_iters=2,
                                   eval_every_epochs=0))
    with pytest.raises(train_mod.TrainingInterrupted, match=rf"epoch 1 after batch 3 \(global step 3\); the last "
                                                           rf"checkpoint is {re.escape(str(out))}"):
        train_mod.run(cfg)
    assert [r["iteration"] for r in _records(out) if r["type"] == "iter"] == [1, 2, 3]
    assert load_checkpoint(str(out / "checkpoint_last.pth"))["iteration"] == 2
    monkeypatch.setattr(SetCriterion, "forward", original)
    train_mod.run(cfg, resume="auto")
    records = _records(out)
    iters = [r for r in records if r["type"] == "iter"]
    assert [r["iteration"] for r in iters] == list(range(1, 9))  # 3 recomputed once, nothing twice
    assert [(r["epoch"], r["batch"]) for r in iters] == [(e, b) for e in (1, 2) for b in (1, 2, 3, 4)]
    assert [r["epoch"] for r in records if r["type"] == "epoch"] == [1, 2]
    text = (out / "log.txt").read_text()
    assert "epoch [1/2]" in text and "epoch [2/2]" in text and "epoch [0/" not in text
    assert "resumed from" in text and "epoch 1 after batch 2 (global step 2)" in text
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 9))


def test_auto_thread_count_follows_the_free_cores():
    from sparse_detr.engine.training.builders import resolve_num_threads

    assert resolve_num_threads("auto", environ={}, cores=2, load=8.0) == 1  # busy: one thread, no stalls
    assert resolve_num_threads("auto", environ={}, cores=8, load=0.3) == 8
    assert resolve_num_threads("auto", environ={}, cores=8, load=3.0) == 5
    assert resolve_num_threads("auto", environ={"LOCAL_WORLD_SIZE": "2"}, cores=8, load=0.0) == 4
    assert resolve_num_threads("auto", environ={"OMP_NUM_THREADS": "3"}, cores=8, load=0.0) == 3
    assert resolve_num_threads(6, environ={"OMP_NUM_THREADS": "3"}, cores=2, load=9.0) == 6  # explicit wins


def test_busy_cores_is_the_busy_share_of_cpu_time_between_two_readings(tmp_path):
    from sparse_detr.engine.training.builders import _cpu_jiffies, busy_cores

    stat = tmp_path / "stat"
    readings = iter([(1000, 4000), (1150, 4200)])  # 150 busy of 200 jiffies on 2 CPUs: 1.5 cores busy
    assert busy_cores(0.0, read=lambda: next(readings), cpus=2) == pytest.approx(1.5)
    assert busy_cores(0.0, read=lambda: None, cpus=2) is None  # no /proc/stat: the caller falls back
    # user nice system idle iowait irq softirq steal guest guest_nice: busy excludes idle and iowait, and guest
    # (already inside user) is not counted twice.
    stat.write_text("cpu  100 5 20 300 7 1 2 3 50 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n")
    assert _cpu_jiffies(str(stat)) == (100 + 5 + 20 + 1 + 2 + 3, 100 + 5 + 20 + 300 + 7 + 1 + 2 + 3)
    assert _cpu_jiffies(str(tmp_path / "missing")) is None
    if _cpu_jiffies() is not None:  # Linux: a real measurement lies between 0 and the machine's cores
        assert 0.0 <= busy_cores(0.05) <= (os.cpu_count() or 1) + 1e-9


@pytest.mark.parametrize("selection", ["dense", "random"])
def test_every_run_logs_the_selection_instruments(data_root, tmp_path, selection):
    """Dense and random runs too: the instruments at every log step (not in between) and in the evaluation."""
    model = {"rho": 0.0, "use_enc_aux_loss": False} if selection == "dense" else {"scorer_target": "random"}
    out = tmp_path / "run"
    cfg = load_config(_write(tmp_path / "c.yaml", _config(data_root, out, model=model, max_iters_per_epoch=3,
                                                          log_every=2, eval_every_epochs=1)))
    metrics = train_mod.run(cfg)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = {r["iteration"]: r for r in records if r["type"] == "iter"}
    assert not any(k.startswith("stat_sel_") for k in steps[1])  # only log steps (2, and the epoch's last: 3)
    for it in (2, 3):
        assert 0 < steps[it]["stat_sel_dam_random"] < steps[it]["stat_sel_dam_oracle"] <= 1
        assert ("stat_sel_dam_coverage" in steps[it]) == (selection != "dense")
    val = metrics["selection"]
    assert val["dam_oracle"] > val["dam_random"] > 0 and 0 < val["dam_tokens50"] < val["dam_tokens90"] <= 1
    assert 0 <= val["oracle_object_coverage"] <= 1 and 0 <= val["random_object_coverage"] <= 1
    if selection == "dense":
        assert "dam_coverage" not in val and "object_coverage" not in val
    else:
        assert 0 < val["dam_coverage"] <= val["dam_oracle"] and math.isfinite(val["dam_efficiency"])
    evals = [r for r in records if r["type"] == "eval"]
    assert evals[-1]["selection"] == pytest.approx(val, nan_ok=True)
    assert "selection instruments" in (out / "log.txt").read_text()


def _train_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_tool", TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_fresh_start_never_overwrites_a_run(data_root, tmp_path, capsys):
    from sparse_detr.engine.cli import EXIT_USER_ERROR

    out = tmp_path / "run"
    cfg = _write(tmp_path / "c.yaml", _config(data_root, out, max_iters_per_epoch=1, eval_every_epochs=0))
    tool = _train_tool()
    assert run_tool(tool.main, ["--config", cfg]) == 0
    saved = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"}
    capsys.readouterr()
    # The same command again: refused with one line that names the way on, and nothing in the folder changes.
    assert run_tool(tool.main, ["--config", cfg]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume auto" in err and "--start-over" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"} == saved
    # --resume auto continues it (nothing to do); --start-over trains again from scratch.
    assert run_tool(tool.main, ["--config", cfg, "--resume", "auto"]) == 0
    assert run_tool(tool.main, ["--config", cfg, "--start-over"]) == 0
    assert load_checkpoint(str(out / "checkpoint_last.pth"))["iteration"] == 1


def test_sigterm_saves_the_exact_step_and_resume_continues(data_root, tmp_path):
    """SIGTERM (torchrun, schedulers, kill): the step finishes, a checkpoint of it is written, the resume command
    is printed, exit 143; --resume auto then continues at the next iteration."""
    import signal
    import time

    out = tmp_path / "run"
    cfg = _write(tmp_path / "c.yaml", _config(data_root, out, epochs=2, eval_every_epochs=0,
                                              checkpoint_every_iters=0))
    proc = subprocess.Popen([sys.executable, TRAIN, "--config", cfg], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    log = out / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.is_file() and len(_iters(out)) >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in err and "--resume auto" in err
    done = max(_iters(out))
    assert 2 <= done < 12  # mid-run (2 epochs x 6 iterations)
    assert load_checkpoint(str(out / "checkpoint_last.pth"))["iteration"] == done
    train_mod.run(load_config(cfg), resume="auto")  # in this process: one interpreter less
    assert sorted(_iters(out)) == list(range(1, 13))
    assert "resumed from" in (out / "log.txt").read_text()


def test_resume_refuses_a_changed_experiment_and_writes_nothing(data_root, tmp_path):
    out = tmp_path / "run"
    cfg = _write(tmp_path / "c.yaml", _config(data_root, out, max_iters_per_epoch=1, eval_every_epochs=0))
    train_mod.run(load_config(cfg))
    saved = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"}
    with pytest.raises(ConfigMismatchError) as info:
        train_mod.run(load_config(cfg, ["model.rho=0.5", "loss.mask_prediction_coef=2.0"]), resume="auto")
    assert "model.rho" in str(info.value) and "loss.mask_prediction_coef" in str(info.value)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"} == saved
    # Schedule fields may change: two more epochs.
    train_mod.run(load_config(cfg, ["train.epochs=2", "train.log_every=5"]), resume="auto")
    assert load_checkpoint(str(out / "checkpoint_last.pth"))["epoch"] == 2
    # A resume that fails on bad data leaves config.yaml and log.jsonl as they were.
    saved = {n: (out / n).read_bytes() for n in ("config.yaml", "log.jsonl")}
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("not a synthetic data set")  # refused by the generator
    with pytest.raises(Exception, match="not empty"):
        train_mod.run(load_config(cfg, ["train.epochs=3", f"data.root={tmp_path / 'foreign'}"]), resume="auto")
    assert {n: (out / n).read_bytes() for n in ("config.yaml", "log.jsonl")} == saved


def _coco_split(root: Path, name: str, boxes_per_image: list[int], categories=None) -> None:
    """A COCO split of 96x96 PNGs under root/name with the given number of boxes per image."""
    from PIL import Image

    (root / name).mkdir(parents=True)
    images, annotations = [], []
    for i, n in enumerate(boxes_per_image, 1):
        Image.new("RGB", (96, 96), (40 * i % 255, 90, 200)).save(root / name / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": 96, "height": 96})
        annotations += [{"id": 100 * i + j, "image_id": i, "category_id": 1, "bbox": [j % 28, j % 20, 4, 4],
                         "area": 16, "iscrowd": 0} for j in range(n)]
    cats = categories or [{"id": 1, "name": "thing"}]
    (root / f"{name}.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                   "categories": cats}))


def _coco_config(root: Path, out: Path) -> dict:
    cfg = _config(str(root), out, model={"num_classes": 1, "num_queries": 10}, max_iters_per_epoch=1,
                  eval_every_epochs=1)
    cfg["data"] = {"dataset": "coco", "root": str(root), "train_images": "train", "train_annotations": "train.json",
                   "val_images": "val", "val_annotations": "val.json", "train_scales": [96], "max_size": 96,
                   "val_size": 96, "crop": False, "num_workers": 0}
    return cfg


def test_data_the_model_cannot_use_is_named_before_training(tmp_path):
    root = tmp_path / "data"
    _coco_split(root, "train", [2, 12])  # image 2: 12 boxes for 10 queries
    _coco_split(root, "val", [0, 0])  # no boxes: no AP
    cfg = load_config(_write(tmp_path / "c.yaml", _coco_config(root, tmp_path / "run")))
    train_mod.run(cfg)
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "more boxes than model.num_queries = 10 (image id 2: 12)" in log
    assert "val split has no boxes, so no AP can be measured" in log
    # Categories that differ: the message names them instead of printing two label maps.
    root2 = tmp_path / "data2"
    _coco_split(root2, "train", [1])
    _coco_split(root2, "val", [1], categories=[{"id": 1, "name": "thing"}, {"id": 5, "name": "other"}])
    cfg = load_config(_write(tmp_path / "c2.yaml", _coco_config(root2, tmp_path / "run2")), ["model.num_classes=2"])
    with pytest.raises(Exception, match=r"only in train none, only in val \{5: 'other'\}"):
        train_mod.run(cfg)
    # An empty split: one line naming the file.
    root3 = tmp_path / "data3"
    _coco_split(root3, "train", [])
    _coco_split(root3, "val", [1])
    cfg = load_config(_write(tmp_path / "c3.yaml", _coco_config(root3, tmp_path / "run3")))
    with pytest.raises(Exception, match="train.json: the train split has no images"):
        train_mod.run(cfg)


def test_a_finished_run_closes_with_a_summary_and_the_next_commands(data_root, tmp_path):
    out = tmp_path / "run"
    cfg = _write(tmp_path / "c.yaml", _config(data_root, out, epochs=2, max_iters_per_epoch=1, eval_every_epochs=1))
    train_mod.run(load_config(cfg))
    log = (out / "log.txt").read_text()
    evals = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()
             if json.loads(line)["type"] == "eval"]
    best = max(evals, key=lambda e: e["AP"])
    assert f"best AP {best['AP']:.1f}" in log and f"after epoch {best['epoch']}" in log
    assert f"final AP {evals[-1]['AP']:.1f} after epoch 2" in log
    for tool in ("eval", "predict", "visualize", "inspect_selection"):
        assert f"python tools/{tool}.py --checkpoint {out}" in log


def test_a_finished_run_extended_to_more_epochs_equals_the_longer_run_from_scratch(data_root, tmp_path):
    """`--resume auto train.epochs=N+k` on a finished N-epoch run trains exactly what an (N+k)-epoch run trains
    (nothing in the loop depends on the total epoch count): how a study's schedule is lengthened without retraining.
    The lr drop after epoch 1 falls into the continued part, and is added only there (the 1-epoch run was trained
    with a drop it never reached): a drop after a run's end is read from the config at resume."""
    cfg = _write(tmp_path / "c.yaml", _config(data_root, tmp_path / "unused", epochs=1, max_iters_per_epoch=2,
                                              eval_every_epochs=1, lr_drop_epochs=[5]))
    longer, extended = tmp_path / "longer", tmp_path / "extended"
    schedule = ["train.epochs=2", "train.lr_drop_epochs=[1]"]
    train_mod.run(load_config(cfg, [f"train.output_dir={longer}", *schedule]))
    train_mod.run(load_config(cfg, [f"train.output_dir={extended}"]))
    assert load_checkpoint(str(extended / "checkpoint_last.pth"))["epoch"] == 1
    train_mod.run(load_config(cfg, [f"train.output_dir={extended}", *schedule]), resume="auto")
    a, b = _iters(longer), _iters(extended)
    assert sorted(a) == sorted(b) == list(range(1, 5)) and a == b
    lr = {r["iteration"]: r["lr"] for r in map(json.loads, (extended / "log.jsonl").read_text().splitlines())
          if r["type"] == "iter"}
    assert lr[3] == lr[4] == pytest.approx(lr[1] * 0.1) and lr[2] == lr[1]  # the added drop took effect
    end_a, end_b = (load_checkpoint(str(d / "checkpoint_last.pth")) for d in (longer, extended))
    assert end_b["iteration"] == 4
    for name, tensor in end_a["model"].items():
        assert torch.equal(tensor, end_b["model"][name]), name
    assert end_a["metrics"]["AP"] == end_b["metrics"]["AP"]


def _fractions(metrics: dict) -> dict:
    """What the code before the unit change wrote: COCO fractions, no "ap_unit"."""
    return {k: (v / 100 if k in ("AP", "AP50") else v) for k, v in metrics.items() if k != "ap_unit"}


def test_a_run_resumed_across_the_change_of_ap_unit_keeps_its_best(data_root, tmp_path, monkeypatch):
    """A checkpoint (format 2) and log.jsonl written with COCO fractions: the resumed run reads them in percent, so
    a worse AP after the resume neither replaces checkpoint_best nor becomes the summary's best."""
    aps = iter([40.0, 30.0])  # percent: epoch 1, epoch 2

    def fake_evaluate(*args, **kwargs):
        return {"AP": next(aps), "AP50": 50.0, "per_class": {}, "ap_unit": "percent"}

    monkeypatch.setattr(trainer_mod, "evaluate", fake_evaluate)
    out = tmp_path / "run"
    cfg = _write(tmp_path / "c.yaml", _config(data_root, out, max_iters_per_epoch=1, eval_every_epochs=1))
    train_mod.run(load_config(cfg))
    for name in ("checkpoint_last.pth", "checkpoint_best.pth"):  # rewritten as the old code wrote them
        state = torch.load(out / name, map_location="cpu", weights_only=True)
        state.update(format_version=2, best_ap=0.4, metrics=_fractions(state["metrics"]))
        torch.save(state, out / name)
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    (out / "log.jsonl").write_text("".join(json.dumps(_fractions(r) if r["type"] == "eval" else r) + "\n"
                                           for r in lines))
    best_before = (out / "checkpoint_best.pth").read_bytes()
    assert load_checkpoint(str(out / "checkpoint_last.pth"))["best_ap"] == pytest.approx(40.0)  # upgraded on load
    train_mod.run(load_config(cfg, ["train.epochs=2"]), resume="auto")
    end = load_checkpoint(str(out / "checkpoint_last.pth"))
    assert end["best_ap"] == pytest.approx(40.0) and end["metrics"]["AP"] == 30.0
    assert (out / "checkpoint_best.pth").read_bytes() == best_before
    assert "best AP 40.0 (AP50 50.0) after epoch 1, final AP 30.0 after epoch 2" in (out / "log.txt").read_text()


def test_a_checkpoint_whose_optimizer_lists_parameters_in_another_order_resumes_exactly(data_root, tmp_path):
    """Checkpoints before format 3 do not name the optimizer's parameters: their optimizer took them in the order of
    the model's state dict of the day (the detector before it was composed of parts). Such a checkpoint, here with
    the state dict and the optimizer in reversed order, resumes onto the right parameters: the continued run equals
    the uninterrupted one bit for bit (a positional load crashes or mixes up the Adam moments)."""
    cfg = _write(tmp_path / "c.yaml", _config(data_root, tmp_path / "unused", epochs=1, max_iters_per_epoch=2,
                                              eval_every_epochs=0))
    longer, legacy = tmp_path / "longer", tmp_path / "legacy"
    train_mod.run(load_config(cfg, [f"train.output_dir={longer}", "train.epochs=2"]))
    train_mod.run(load_config(cfg, [f"train.output_dir={legacy}"]))

    path = legacy / "checkpoint_last.pth"
    state = torch.load(path, map_location="cpu", weights_only=True)
    names = state.pop("optimizer_param_names")
    model = {k: state["model"][k] for k in reversed(list(state["model"]))}
    canonical = {}  # storage -> the smallest key of the tensor (its name in `names`)
    for k, t in model.items():
        canonical[t.untyped_storage().data_ptr()] = min(canonical.get(t.untyped_storage().data_ptr(), k), k)
    first = list(dict.fromkeys(canonical[t.untyped_storage().data_ptr()] for t in model.values()))
    order = [[n for n in first if n in set(group)] for group in names]
    assert order != names  # the test means something only if the order differs
    opt, moments, groups, i = state["optimizer"], {}, [], 0
    for group, now, old in zip(opt["param_groups"], names, order):
        by_name = dict(zip(now, group["params"]))
        ids = []
        for n in old:
            if by_name[n] in opt["state"]:
                moments[i] = opt["state"][by_name[n]]
            ids.append(i)
            i += 1
        groups.append({**group, "params": ids})
    state.update(format_version=2, model=model, optimizer={"state": moments, "param_groups": groups})
    torch.save(state, path)

    train_mod.run(load_config(cfg, [f"train.output_dir={legacy}", "train.epochs=2"]), resume="auto")
    assert _iters(longer) == _iters(legacy)
    end_a, end_b = (load_checkpoint(str(d / "checkpoint_last.pth")) for d in (longer, legacy))
    for name, tensor in end_a["model"].items():
        assert torch.equal(tensor, end_b["model"][name]), name
