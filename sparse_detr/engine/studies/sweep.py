"""The ablation runner: train, evaluate and benchmark one run per (token-selection target, ρ, seed).

`plan_runs` turns the sweep's axes into `RunSpec`s (one output folder each, `OUT/<name>`); `run_sweep` executes
them, serially or in `jobs` worker processes, and keeps `OUT/results.json` / `results.md` / `results.png` up to
date after every run. The sweep is safe to interrupt and rerun with the same command:

* a finished run (its folder holds `result.json`, written atomically last) is skipped and its record reused; the
  resolved config it was made with must equal the one planned now, else the sweep stops and says which keys
  differ (it never reuses or overwrites a run made with another config);
* a half-finished run (checkpoints but no `result.json`) continues through the engine's `resume="auto"`;
* a failed run is reported (its error goes into the results) and retried on the next invocation;
* SIGTERM (or SIGINT) to the sweep reaches its worker processes too: each training run saves a checkpoint at its
  current iteration and stops (`STOP_GRACE_SECONDS`, then killed), so no orphan keeps training after the sweep.

One record per run (`RECORD_KEYS`): target, rho, seed, the COCO metrics in percent (None where COCO has no object
of that size; `ap_unit`, engine/metrics.py; older records hold fractions and `load_record` converts them), GFLOPs
(fvcore convention, 1 multiply-add = 1 FLOP) of the whole model and of its encoder at the benchmark input, CPU images/s at batch 1, training seconds (sum of the iteration times of the
final trajectory), the config path and the overrides that reproduce the run.

Target `dense` is the dense baseline: model.rho=0 with the encoder aux loss off (it scores kept tokens only);
the other targets go to `model.scorer_target` at every ρ.

`SweepOptions.pretrain` (a config) adds a shared first stage, the stand-in for the ImageNet backbone of COCO runs:
it is trained once into `OUT/pretrain` (skipped when finished, resumed when half-done, by the same rules), its
backbone network is extracted to `OUT/pretrain/backbone.pt`, and every run starts from it
(`model.pretrained_backbone`, in each record's overrides).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from sparse_detr.config import load_config, to_dict
from sparse_detr.engine.atomic import write_atomic
from sparse_detr.engine.logging import read_jsonl
from sparse_detr.engine.signals import signal_handlers
from sparse_detr.engine.metrics import AP_UNIT, AP_UNIT_KEY, is_percent, metrics_in_percent, percent
from sparse_detr.progress import format_duration

__all__ = ["RunSpec", "SweepOptions", "RECORD_KEYS", "METRICS", "plan_runs", "run_one", "run_sweep",
           "run_status", "run_pretrain", "backbone_path", "train_seconds", "load_record", "lengthen_from",
           "ConfigChangedError", "SweepInterrupted"]

METRICS = {"AP": "AP", "AP50": "AP50", "AP75": "AP75", "AP_s": "APs", "AP_m": "APm", "AP_l": "APl"}  # ours: COCO's
RECORD_KEYS = ("name", "target", "rho", "seed", "status", *METRICS, AP_UNIT_KEY, "gflops", "encoder_gflops",
               "benchmark_hw", "tokens", "kept_tokens", "params", "cpu_fps", "fps_threads", "train_seconds",
               "iterations", "config", "overrides", "output_dir", "criterion", "selection", "curves", "evals", "device", "commit")
CURVE_KEYS = ("dam_coverage", "dam_oracle", "dam_random", "object_coverage", "fg_precision")  # per log step
RESULT = "result.json"  # a run's record; its presence marks the run finished
DENSE = "dense"
PRETRAIN = "pretrain"  # OUT/pretrain: the shared backbone pretraining stage
BACKBONE = "backbone.pt"  # its extracted backbone network, in OUT/pretrain
STOP_GRACE_SECONDS = 120.0  # after SIGTERM, a worker's time to finish its step (or evaluation) and save


class SweepInterrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT stopped a parallel sweep after its workers saved; the same command resumes it."""

    exit_code = 143


def _raise_interrupted(signum, frame):
    error = SweepInterrupted(f"stopped by {signal.Signals(signum).name}; rerun the same command to resume")
    error.exit_code = 128 + signum  # the shell's convention: 143 for SIGTERM, 130 for SIGINT
    raise error


class ConfigChangedError(RuntimeError):
    """A finished run folder was made with another resolved config than the one planned now."""


@dataclass(frozen=True)
class RunSpec:
    target: str  # "dense", a model.scorer_target value, or a variant's label
    rho: float
    seed: int
    criterion: str = ""  # a variant's model.scorer_target ("" = target)
    extra: tuple[str, ...] = ()  # a variant's own overrides

    @property
    def name(self) -> str:
        point = DENSE if self.target == DENSE else f"{self.target}_rho{self.rho:g}"
        return f"{point}_seed{self.seed}"

    def overrides(self) -> list[str]:
        """The config overrides of this run (after the sweep-wide ones)."""
        out = [f"model.rho={self.rho:g}", f"train.seed={self.seed}"]
        if self.target == DENSE:  # aux heads score the kept tokens; a dense encoder has no selection to train
            return out + ["model.scorer_target=dam", "model.use_enc_aux_loss=false"]
        return out + [f"model.scorer_target={self.criterion or self.target}", *self.extra]


@dataclass
class SweepOptions:
    base: str  # the config every run starts from
    out: str
    overrides: Sequence[str] = ()  # key=value for every run
    train: bool = True  # False: the cost only (no folders, no skipping)
    jobs: int = 1  # runs in parallel worker processes (each single-threaded)
    bench_hw: Optional[tuple[int, int]] = None  # benchmark input (H, W); None: (data.val_size, data.max_size)
    bench_runs: int = 5  # timed batch-1 forwards (median)
    pretrain: Optional[str] = None  # config of a shared backbone pretraining stage (train only); None: none
    command: str = ""  # shown in results.md
    lengthen: Optional[str] = None  # a finished sweep's folder: its runs continue here on the longer schedule
    extra: dict = field(default_factory=dict)  # test hooks: e.g. {"bench_images": 1}


def plan_runs(targets: Sequence[str], rhos: Sequence[float], seeds: Sequence[int], dense: bool) -> list[RunSpec]:
    """Dense (one per seed) first, then every target at its ρ values, seeds innermost.

    A target is a `model.scorer_target` value, run at every ρ of `rhos`, or `name@ρ1,ρ2,...` for its own list
    (e.g. `dam@0.1,0.2,0.3,0.5 os random` with rhos [0.1]: one sweep for the whole ablation), or a variant
    `label:criterion:key=value,key=value` (e.g. `dam_aligned:dam:model.dam_alignment=aligned`), a criterion
    with its own overrides under its own name."""
    runs = [RunSpec(DENSE, 0.0, s) for s in seeds] if dense else []
    for item in targets:
        criterion, extra = "", ()
        if ":" in item:
            item, criterion, settings = (item.split(":", 2) + [""])[:3]
            extra = tuple(v for v in settings.split(",") if v)
            if not criterion or any("=" not in v for v in extra):
                raise ValueError(f"variant {item!r}: expected label:criterion:key=value,... "
                                 f"(e.g. dam_aligned:dam:model.dam_alignment=aligned)")
        name, _, own = item.partition("@")
        try:
            points = [float(v) for v in own.split(",")] if own else list(rhos)
        except ValueError:
            raise ValueError(f"target {item!r}: expected name or name@rho1,rho2,... (e.g. dam@0.1,0.2)") from None
        if name == DENSE:
            raise ValueError("'dense' is not a scorer target; use --dense for the dense baseline")
        if not points:
            raise ValueError(f"target {name!r} has no ρ: give --rho or {name}@rho1,rho2,...")
        if any(not 0 < r <= 1 for r in points):
            raise ValueError(f"target {name!r}: ρ must be in (0, 1] (the dense baseline is --dense), got {points}")
        runs += [RunSpec(name, r, s, criterion, extra) for r in points for s in seeds]
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"the sweep repeats a run: {sorted({n for n in names if names.count(n) > 1})}")
    return runs


def backbone_path(opts: SweepOptions) -> str:
    return os.path.join(opts.out, PRETRAIN, BACKBONE)


def run_overrides(spec: RunSpec, opts: SweepOptions) -> list[str]:
    out = list(opts.overrides) + spec.overrides()
    if opts.train:
        out.append(f"train.output_dir={os.path.join(opts.out, spec.name)}")
        if opts.pretrain:
            out.append(f"model.pretrained_backbone={backbone_path(opts)}")
    return out


def pretrain_overrides(opts: SweepOptions) -> list[str]:
    return [f"train.output_dir={os.path.join(opts.out, PRETRAIN)}"]


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in tree.items():
        flat.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return flat


UNCOMPARED = ("train.output_dir", "train.num_threads")  # where and how fast a run ran, not what it computed


def _config_diff(saved: dict, planned: dict) -> list[str]:
    """Keys whose values differ, `UNCOMPARED` left out (the same folder may be spelled differently)."""
    a, b = _flatten(saved), _flatten(planned)
    return sorted(k for k in set(a) | set(b)
                  if k not in UNCOMPARED and a.get(k, "<missing>") != b.get(k, "<missing>")
                  and not (k not in a and b[k] is None))  # an optional field added since, left off


def _folder_status(folder: str, planned_config) -> tuple[str, Optional[dict]]:
    """("done", record) | ("resume", None) | ("new", None) for a run folder whose run must have `planned_config`."""
    path = os.path.join(folder, RESULT)
    if os.path.isfile(path):
        record = load_record(path)
        changed = _config_diff(record.get("resolved_config", {}), to_dict(planned_config))
        if changed:
            raise ConfigChangedError(f"{folder} was trained with another config (differs at {', '.join(changed)}); "
                                     f"use another --out, or move that folder away to retrain it")
        return "done", record
    if os.path.isfile(os.path.join(folder, "checkpoint_last.pth")):
        return "resume", None
    return "new", None


# What may differ between a run and the shorter run it continues (`SweepOptions.lengthen`): the total epochs, and
# the backbone file that only initialised the shorter run (a copy of the same pretraining, under the new folder).
# The lr drops may differ after the shorter run's last epoch (`_later_drops_only`): a drop added there ends the
# longer schedule at a lower lr, and the continued run equals that schedule run from scratch.
LENGTHENED = ("train.epochs", "model.pretrained_backbone")


def _later_drops_only(saved: dict, planned: dict) -> bool:
    """True when the planned lr drops equal the saved run's among the epochs it trained (drops after epoch e lower
    the lr of epochs e, e + 1, ...; the trained ones are 0 .. epochs − 1)."""
    done = saved["train"]["epochs"]
    return ([e for e in saved["train"]["lr_drop_epochs"] if e < done]
            == [e for e in planned["train"]["lr_drop_epochs"] if e < done])


def lengthen_from(runs: Sequence[RunSpec], opts: SweepOptions) -> list[str]:
    """Seed OUT/<run> with the finished run of the same name in `opts.lengthen` (and OUT/pretrain with its
    pretraining) so that the sweep resumes each up to this sweep's `train.epochs`; returns the runs seeded.

    Only run folders that do not exist yet are seeded, and only from finished runs that still have their last
    checkpoint (a committed record alone is trained anew) and whose resolved config differs from the planned one in
    `LENGTHENED` alone (and lr drops after its end), with no more epochs than planned: any other difference raises
    ConfigChangedError before anything is written. Checkpoints are hard links (the trainer replaces them by atomic
    rename, never in place, so the shorter run's files stay as they are), logs and TensorBoard events copies (they
    are appended to); `result.json` stays behind. The continued run equals the longer schedule run from scratch,
    an added drop included (tests/test_train.py: the lr drops are read from the config at resume)."""
    if not opts.lengthen or not opts.train:
        return []
    seeds = []
    for spec in runs:
        source, folder = os.path.join(opts.lengthen, spec.name), os.path.join(opts.out, spec.name)
        if os.path.exists(folder) or not os.path.isfile(os.path.join(source, RESULT)) \
                or not os.path.isfile(os.path.join(source, "checkpoint_last.pth")):
            continue  # nothing to continue from (e.g. a committed record without its checkpoints): trained anew
        saved = load_record(os.path.join(source, RESULT)).get("resolved_config", {})
        planned = to_dict(load_config(opts.base, run_overrides(spec, opts)))
        changed = [k for k in _config_diff(saved, planned) if k not in LENGTHENED
                   and not (k == "train.lr_drop_epochs" and _later_drops_only(saved, planned))]
        if changed:
            raise ConfigChangedError(f"{source} cannot be lengthened into {folder}: it differs at {', '.join(changed)}"
                                     f" (only {', '.join(LENGTHENED)} may, and lr drops after its last epoch)")
        if saved.get("train", {}).get("epochs", 0) > planned["train"]["epochs"]:
            raise ConfigChangedError(f"{source} cannot be lengthened into {folder}: it has {saved['train']['epochs']} "
                                     f"epochs, more than the {planned['train']['epochs']} planned")
        seeds.append((spec.name, source, folder))
    pretrain = os.path.join(opts.lengthen, PRETRAIN)
    if seeds and opts.pretrain and not os.path.exists(os.path.join(opts.out, PRETRAIN)) \
            and os.path.isfile(os.path.join(pretrain, RESULT)):
        _seed_folder(pretrain, os.path.join(opts.out, PRETRAIN), keep_result=True)
    for _, source, folder in seeds:
        _seed_folder(source, folder)
    return [name for name, _, _ in seeds]


def _seed_folder(source: str, folder: str, keep_result: bool = False) -> None:
    import shutil

    os.makedirs(folder)
    for name in sorted(os.listdir(source)):
        src, dst = os.path.join(source, name), os.path.join(folder, name)
        if name == ".lock" or (name == RESULT and not keep_result):
            continue
        if os.path.isdir(src):
            shutil.copytree(src, dst)
        elif name.endswith((".pth", ".pt")):
            try:
                os.link(src, dst)
            except OSError:  # another file system
                shutil.copy2(src, dst)
        else:
            shutil.copy2(src, dst)


def run_status(spec: RunSpec, opts: SweepOptions) -> tuple[str, Optional[dict]]:
    """("done", record) | ("resume", None) | ("new", None) for one run folder."""
    return _folder_status(os.path.join(opts.out, spec.name), load_config(opts.base, run_overrides(spec, opts)))


def run_pretrain(opts: SweepOptions, log: Callable[[str], None] = print) -> dict:
    """The shared pretraining stage: train `opts.pretrain` into OUT/pretrain unless finished, extract its backbone
    to OUT/pretrain/backbone.pt; returns its record (metrics on its own val split, training time, config)."""
    from sparse_detr.engine.studies.convert import extract_backbone
    from sparse_detr.engine.training.train import run

    cfg = load_config(opts.pretrain, pretrain_overrides(opts))
    folder, backbone = cfg.train.output_dir, backbone_path(opts)
    status, record = _folder_status(folder, cfg)
    if status == "done" and os.path.isfile(backbone):
        log(f"pretraining: finished in {folder} (skipped)")
        return record
    log(f"pretraining: {'resuming' if status == 'resume' else 'starting'} {opts.pretrain} in {folder}")
    start = time.perf_counter()
    metrics = run(cfg, resume="auto")
    if not os.path.isfile(backbone):  # one left by a sweep killed before result.json: the same finished weights
        extract_backbone(os.path.join(folder, "checkpoint_last.pth"), backbone)
    seconds, iterations = train_seconds(os.path.join(folder, "log.jsonl"))
    record = {"name": PRETRAIN, "status": "done", "config": opts.pretrain, "overrides": pretrain_overrides(opts),
              **{ours: _metric(metrics.get(coco)) for ours, coco in METRICS.items()}, AP_UNIT_KEY: AP_UNIT,
              "train_seconds": seconds, "iterations": iterations, "output_dir": folder, "backbone": backbone,
              "resolved_config": to_dict(cfg)}
    _write_json(os.path.join(folder, RESULT), record)
    log(f"pretraining: done in {format_duration(time.perf_counter() - start)}, AP50 {record['AP50'] or 0:.1f} on "
        f"its own val split; backbone in {backbone}")
    return record


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


def _provenance() -> dict:
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


def _metric(value) -> Optional[float]:
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


def _benchmark(spec: RunSpec, opts: SweepOptions, cfg) -> dict:
    """GFLOPs (whole model, encoder), tokens and CPU FPS of the run's config at the benchmark input."""
    import torch

    from sparse_detr.engine.studies.benchmark import BenchmarkOptions, benchmark_config, load_images

    h, w = opts.bench_hw or (cfg.data.val_size, cfg.data.max_size)
    n = int(opts.extra.get("bench_images", 2))
    options = BenchmarkOptions(device="cpu", batch_sizes=(1,), num_images=n, height=h, width=w,
                               timed_runs=opts.bench_runs, overrides=tuple(run_overrides(spec, opts)))
    with torch.random.fork_rng():  # the benchmark's random weights must not move the training RNG
        r = benchmark_config(opts.base, load_images(n, h, w), options)
    return {"gflops": r["gflops_official"], "encoder_gflops": r["gflops_parts_official"]["encoder"],
            "benchmark_hw": [h, w], "tokens": r["tokens"], "kept_tokens": r["kept_tokens"], "params": r["params"],
            "cpu_fps": r["fps_bs1"], "fps_threads": torch.get_num_threads()}


def _write_json(path: str, data) -> None:
    write_atomic(path, lambda f: f.write(json.dumps(data, indent=2) + "\n"))  # a killed sweep leaves no half record


def run_one(spec: RunSpec, opts: SweepOptions) -> dict:
    """Train (or continue) one run, evaluate it, benchmark it; write and return its record.

    Without `opts.train` only the cost is measured and nothing is written. Errors propagate."""
    overrides = run_overrides(spec, opts)
    cfg = load_config(opts.base, overrides)
    record = {"name": spec.name, "target": spec.target, "rho": spec.rho, "seed": spec.seed, "status": "cost",
              "config": opts.base, "overrides": overrides, "criterion": spec.criterion or spec.target}
    record.update(dict.fromkeys(METRICS), **{AP_UNIT_KEY: AP_UNIT})
    if not opts.train:
        record.update(_benchmark(spec, opts, cfg), train_seconds=None, iterations=None, output_dir=None,
                      selection=None, curves=None, evals=None, **_provenance())
        return record
    from sparse_detr.engine.training.train import run

    folder = cfg.train.output_dir
    metrics = run(cfg, resume="auto")
    metrics = metrics.get("ema", metrics) if cfg.train.ema else metrics  # what one would deploy
    record.update({ours: _metric(metrics.get(coco)) for ours, coco in METRICS.items()})
    record.update(selection=metrics.get("selection"), **read_curves(os.path.join(folder, "log.jsonl")),
                  **_provenance())
    seconds, iterations = train_seconds(os.path.join(folder, "log.jsonl"))
    record.update(_benchmark(spec, opts, cfg), train_seconds=seconds, iterations=iterations, output_dir=folder,
                  status="done", resolved_config=to_dict(cfg))
    _write_json(os.path.join(folder, RESULT), record)
    return record


def _worker(spec: RunSpec, opts: SweepOptions) -> dict:
    """One run in a worker process: single-threaded, its console output into the run folder."""
    import torch

    torch.set_num_threads(1)
    if opts.train:
        folder = os.path.join(opts.out, spec.name)
        os.makedirs(folder, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        with open(os.path.join(folder, "console.txt"), "a", encoding="utf-8") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
    try:
        return _guarded(spec, opts)
    except KeyboardInterrupt:  # SIGTERM / SIGINT: the run saved its checkpoint; this worker takes no further run
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(143)


def _guarded(spec: RunSpec, opts: SweepOptions) -> dict:
    start = time.perf_counter()
    try:
        record = run_one(spec, opts)
    except Exception as e:  # keep the other runs; the failure goes into the results and the run is retried later
        traceback.print_exc()
        record = {"name": spec.name, "target": spec.target, "rho": spec.rho, "seed": spec.seed, "status": "failed",
                  "error": f"{type(e).__name__}: {e}", "config": opts.base, "overrides": run_overrides(spec, opts)}
    record["_wall"] = time.perf_counter() - start
    return record


def write_results(records: list[dict], opts: SweepOptions) -> None:
    """results.json (records in plan order, without the resolved configs), results.md and the plots (results.png,
    results_selection.png). The plots are drawn only when the records changed or a plot is missing: a rerun of a
    finished sweep, or the start of a resumed one, does not redraw them."""
    from sparse_detr.engine.studies.sweep_report import plot_pareto, plot_selection, results_markdown

    os.makedirs(opts.out, exist_ok=True)
    slim = [{k: v for k, v in r.items() if k not in ("resolved_config", "_wall")} for r in records]
    json_path = os.path.join(opts.out, "results.json")
    plots = {name: draw for name, draw, wanted in (
        ("results.png", plot_pareto, any(r.get("gflops") is not None for r in slim)),
        ("results_selection.png", plot_selection, any(r.get("curves") for r in slim))) if wanted}
    unchanged = os.path.isfile(json_path) and _read_json(json_path) == json.loads(json.dumps(slim))
    _write_json(json_path, slim)
    with open(os.path.join(opts.out, "results.md"), "w", encoding="utf-8") as f:
        f.write(results_markdown(slim, opts.command))
    for name, draw in plots.items():
        path = os.path.join(opts.out, name)
        if not (unchanged and os.path.isfile(path)):
            draw(slim, path, title=_data_title(opts))


def _read_json(path: str):
    """The JSON in `path`, or None when it cannot be read (a file from an older version, cut short, ...)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _data_title(opts: SweepOptions) -> str:
    """What the sweep trained and evaluated on, for the plot: data set, val split, backbone start."""
    d = load_config(opts.base, list(opts.overrides)).data
    data = (f"synthetic '{d.synthetic.preset}' preset, {d.synthetic.num_val} val images" if d.dataset == "synthetic"
            else f"{d.dataset} {d.val_annotations}")
    start = f", backbone pretrained by {opts.pretrain}" if opts.train and opts.pretrain else ""
    return f"{opts.base}: {data}{start}"


def run_sweep(runs: Sequence[RunSpec], opts: SweepOptions, log: Callable[[str], None] = print) -> list[dict]:
    """Run every `RunSpec` not finished yet; returns the records in plan order (see the module docstring)."""
    if opts.jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {opts.jobs}")
    from sparse_detr.models.build import build_token_selector

    for spec in runs:  # the configs and criteria are validated before anything trains (a typo fails in seconds)
        build_token_selector(load_config(opts.base, run_overrides(spec, opts)).model)
    if opts.train and opts.pretrain:
        load_config(opts.pretrain, pretrain_overrides(opts))
    records: dict[str, dict] = {}
    todo = []
    lengthened = lengthen_from(runs, opts)
    if lengthened:
        log(f"sweep: {len(lengthened)} finished run(s) of {opts.lengthen} continue here to the longer schedule")
    for spec in runs:
        status, record = run_status(spec, opts) if opts.train else ("new", None)
        if status == "done":
            records[spec.name] = record
        else:
            todo.append((spec, status))
    resuming = sum(s == "resume" for _, s in todo)
    log(f"sweep: {len(runs)} runs, {len(records)} finished (skipped), {resuming} to resume, "
        f"{len(todo) - resuming} new; {opts.jobs} job(s)")
    ordered = lambda: [records[s.name] for s in runs if s.name in records]  # noqa: E731
    if todo and opts.train and opts.pretrain:
        run_pretrain(opts, log)
    if todo and opts.train:  # a generated data set is made once here, not raced for by parallel workers
        from sparse_detr.engine.training.builders import build_split

        for root, cfg in {c.data.root: c for c in (load_config(opts.base, run_overrides(spec, opts))
                                                   for spec, _ in todo)}.items():
            if cfg.data.dataset == "synthetic":
                build_split(cfg, "val")
    if records:
        write_results(ordered(), opts)
    start, walls = time.perf_counter(), []

    def finished(record: dict) -> None:
        records[record["name"]] = record
        walls.append(record.pop("_wall"))
        left = len(todo) - len(walls)
        timed = [w for w in walls if math.isfinite(w)]
        eta = sum(timed) / len(timed) * math.ceil(left / opts.jobs) if timed else math.nan  # runs: about equal
        result = (f"AP {record['AP']:.1f} AP50 {record['AP50']:.1f}" if record.get("AP") is not None
                  else record.get("error", f"{record.get('gflops', 0):.3g} GFLOPs"))
        log(f"[{len(records)}/{len(runs)}] {record['name']} {record['status']} in {format_duration(walls[-1])}: {result}"
            f" | {left} left, elapsed {format_duration(time.perf_counter() - start)}, ETA {format_duration(eta)}")
        write_results(ordered(), opts)

    if opts.jobs == 1:
        for spec, status in todo:
            log(f"{'resuming' if status == 'resume' else 'starting'} {spec.name}")
            finished(_guarded(spec, opts))
    else:
        _run_parallel(todo, opts, finished, log)
    failed = [r["name"] for r in ordered() if r["status"] == "failed"]
    if failed:
        log(f"{len(failed)} run(s) failed: {', '.join(failed)} (rerun the same command to retry them)")
    return ordered()


def _run_parallel(todo, opts: SweepOptions, finished: Callable[[dict], None], log) -> None:
    import multiprocessing

    # Workers inherit the environment: one OpenMP/MKL thread each, set before they import torch. "spawn": a
    # fresh interpreter per worker (no forked torch thread pools).
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    pool = ProcessPoolExecutor(opts.jobs, mp_context=multiprocessing.get_context("spawn"))
    try:
        with signal_handlers(_raise_interrupted, (signal.SIGTERM, signal.SIGINT)):
            pending = {}
            for spec, status in todo:
                pending[pool.submit(_worker, spec, opts)] = spec
                log(f"queued {spec.name} ({status}); console output in {os.path.join(opts.out, spec.name)}")
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    spec = pending.pop(future)
                    try:
                        record = future.result()
                    except Exception as e:  # the worker died (killed, out of memory): a failed run, retried later
                        record = {"name": spec.name, "target": spec.target, "rho": spec.rho, "seed": spec.seed,
                                  "status": "failed", "error": f"worker process: {type(e).__name__}: {e}",
                                  "config": opts.base, "overrides": run_overrides(spec, opts), "_wall": math.nan}
                    finished(record)
    except BaseException as e:
        pool.shutdown(wait=False, cancel_futures=True)
        stopped = _stop_workers(STOP_GRACE_SECONDS)
        if isinstance(e, KeyboardInterrupt):
            log(f"sweep: stopped ({stopped} worker process(es) stopped, each run saved where it was); rerun the "
                "same command to resume")
        raise
    else:
        pool.shutdown()
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    sys.stdout.flush()


def _stop_workers(grace: float) -> int:
    """SIGTERM every live worker process (a training run saves its checkpoint and stops), wait up to `grace`
    seconds in all, then SIGKILL what is left (checkpoints are atomic: at most the unsaved steps are lost)."""
    import multiprocessing

    workers = multiprocessing.active_children()
    for p in workers:
        p.terminate()
    deadline = time.monotonic() + grace
    for p in workers:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in workers:
        if p.is_alive():
            p.kill()
            p.join()
    return len(workers)
