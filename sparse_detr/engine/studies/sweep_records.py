"""A sweep's records: what one run's `result.json` holds, and how it is read back whatever unit it was written in.

One record per run (`RECORD_KEYS`): target, rho, seed, the COCO metrics in percent (None where COCO has no object
of that size; `ap_unit`, engine/metrics.py; older records hold fractions and `load_record` converts them), GFLOPs
(fvcore convention, 1 multiply-add = 1 FLOP) of the whole model and of its encoder at the benchmark input, CPU
images/s at batch 1, training seconds (sum of the iteration times of the final trajectory), the selection
instruments (`selection`: the val-set aggregate; `curves`: every log step; `evals`: every periodic evaluation), the
config path and the overrides that reproduce the run, the device and the commit.
The sweep-wide results (`results.json`, `results.md`, the plots) are written by `sweep.write_results`.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from sparse_detr.engine.atomic import write_atomic
from sparse_detr.engine.logging import read_jsonl
from sparse_detr.engine.metrics import AP_UNIT_KEY, is_percent, metrics_in_percent, percent

__all__ = ["METRICS", "RECORD_KEYS", "CURVE_KEYS", "RESULT", "train_seconds", "read_curves", "provenance",
           "coco_metric", "load_record", "record_in_percent", "write_json", "read_json"]

METRICS = {"AP": "AP", "AP50": "AP50", "AP75": "AP75", "AP_s": "APs", "AP_m": "APm", "AP_l": "APl"}  # ours: COCO's
RECORD_KEYS = ("name", "target", "rho", "seed", "status", *METRICS, AP_UNIT_KEY, "gflops", "encoder_gflops",
               "benchmark_hw", "tokens", "kept_tokens", "params", "cpu_fps", "fps_threads", "train_seconds",
               "iterations", "config", "overrides", "output_dir", "criterion", "selection", "curves", "evals",
               "device", "commit")
CURVE_KEYS = ("dam_coverage", "dam_oracle", "dam_random", "object_coverage", "fg_precision")  # per log step
RESULT = "result.json"  # a run's record; its presence marks the run finished


def train_seconds(log_path: str) -> tuple[float, int]:
    """(seconds, iterations) of training in an engine `log.jsonl`: the iteration times of the final trajectory
    (an iteration redone after a resume counts once, its last time), evaluation and checkpointing excluded."""
    times = {int(e["iteration"]): float(e["time"]) for e in read_jsonl(log_path) if e.get("type") == "iter"}
    return sum(times.values()), len(times)


def read_curves(log_path: str) -> dict:
    """The selection instruments of every log step (`curves`: iteration and `CURVE_KEYS` lists) and every
    evaluation (`evals`: iteration, AP, AP50 and the val-set instruments) of the final trajectory in a log.jsonl."""
    steps: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    for entry in read_jsonl(log_path):  # a later record of an iteration (after a resume) replaces the earlier
        if entry.get("type") == "iter" and "stat_sel_dam_random" in entry:
            steps[int(entry["iteration"])] = {k: entry.get("stat_sel_" + k) for k in CURVE_KEYS}
        elif entry.get("type") == "eval":
            entry = metrics_in_percent(entry)  # a log continued across the change of unit
            sel = entry.get("selection") or {}
            evals[int(entry["iteration"])] = {"iteration": int(entry["iteration"]), "AP": entry.get("AP"),
                                              "AP50": entry.get("AP50"), **{k: sel.get(k) for k in CURVE_KEYS}}
    its = sorted(steps)
    return {"curves": {"iteration": its, **{k: [steps[i][k] for i in its] for k in CURVE_KEYS}},
            "evals": [evals[i] for i in sorted(evals)]}


def provenance() -> dict:
    """Where a run ran: the device and the package's git commit (``+dirty`` with uncommitted changes)."""
    import subprocess

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    root = os.path.dirname(os.path.abspath(__file__))  # inside the checkout: git finds its root
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        commit = commit and commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        commit = None
    # A copy of the tree without .git (another machine) names its commit through the environment.
    return {"device": device, "commit": commit or os.environ.get("SPARSE_DETR_COMMIT")}


def coco_metric(value) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and value >= 0 else None  # COCO: -1 = no such object


def load_record(path: str) -> dict:
    """A run's `result.json` (or one record of `results.json`), its metrics in percent whatever it was written with."""
    with open(path, encoding="utf-8") as f:
        try:
            record = json.load(f)
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); move the folder away to rerun this run") from e
    return record_in_percent(record)


def record_in_percent(record: dict) -> dict:
    """A record written with COCO fractions (no `ap_unit`) converted to percent: its metrics and its evals' AP."""
    if is_percent(record):
        return record
    out = metrics_in_percent(record, tuple(METRICS))
    if out.get("evals"):
        out["evals"] = [{k: percent(v) if k in ("AP", "AP50") else v for k, v in e.items()} for e in out["evals"]]
    return out


def write_json(path: str, data) -> None:
    write_atomic(path, lambda f: f.write(json.dumps(data, indent=2) + "\n"))  # a killed sweep leaves no half record


def read_json(path: str):
    """The JSON in `path`, or None when it cannot be read (a file from an older version, cut short, ...)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
