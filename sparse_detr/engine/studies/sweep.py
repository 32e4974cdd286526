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

The plan (`RunSpec`, folder states, `--lengthen`) is in sweep_plan.py; the records and the results files written
from them (`RECORD_KEYS`, `results.json` / `.md` / plots) in sweep_records.py.

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
from typing import Callable, Sequence

from sparse_detr.config import load_config, to_dict
from sparse_detr.engine.metrics import AP_UNIT, AP_UNIT_KEY
from sparse_detr.engine.signals import signal_handlers
from sparse_detr.engine.studies.sweep_plan import (PRETRAIN, ConfigChangedError, RunSpec, SweepOptions,
                                                   backbone_path, folder_status, lengthen_from, plan_runs,
                                                   pretrain_overrides, run_overrides, run_status)
from sparse_detr.engine.studies.sweep_records import (METRICS, RECORD_KEYS, RESULT, coco_metric, load_record,
                                                      provenance, read_curves, read_json, train_seconds,
                                                      write_json)
from sparse_detr.progress import format_duration

__all__ = ["RunSpec", "SweepOptions", "RECORD_KEYS", "METRICS", "plan_runs", "run_one", "run_sweep",
           "run_status", "run_pretrain", "backbone_path", "train_seconds", "load_record", "lengthen_from",
           "write_results", "ConfigChangedError", "SweepInterrupted"]

STOP_GRACE_SECONDS = 120.0  # after SIGTERM, a worker's time to finish its step (or evaluation) and save


class SweepInterrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT stopped a parallel sweep after its workers saved; the same command resumes it."""

    exit_code = 143


def _raise_interrupted(signum, frame):
    error = SweepInterrupted(f"stopped by {signal.Signals(signum).name}; rerun the same command to resume")
    error.exit_code = 128 + signum  # the shell's convention: 143 for SIGTERM, 130 for SIGINT
    raise error


def run_pretrain(opts: SweepOptions, log: Callable[[str], None] = print) -> dict:
    """The shared pretraining stage: train `opts.pretrain` into OUT/pretrain unless finished, extract its backbone
    to OUT/pretrain/backbone.pt; returns its record (metrics on its own val split, training time, config)."""
    from sparse_detr.engine.studies.convert import extract_backbone
    from sparse_detr.engine.training.train import run

    cfg = load_config(opts.pretrain, pretrain_overrides(opts))
    folder, backbone = cfg.train.output_dir, backbone_path(opts)
    status, record = folder_status(folder, cfg)
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
              **{ours: coco_metric(metrics.get(coco)) for ours, coco in METRICS.items()}, AP_UNIT_KEY: AP_UNIT,
              "train_seconds": seconds, "iterations": iterations, "output_dir": folder, "backbone": backbone,
              "resolved_config": to_dict(cfg)}
    write_json(os.path.join(folder, RESULT), record)
    log(f"pretraining: done in {format_duration(time.perf_counter() - start)}, AP50 {record['AP50'] or 0:.1f} on "
        f"its own val split; backbone in {backbone}")
    return record


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
                      selection=None, curves=None, evals=None, **provenance())
        return record
    from sparse_detr.engine.training.train import run

    folder = cfg.train.output_dir
    metrics = run(cfg, resume="auto")
    metrics = metrics.get("ema", metrics) if cfg.train.ema else metrics  # what one would deploy
    record.update({ours: coco_metric(metrics.get(coco)) for ours, coco in METRICS.items()})
    record.update(selection=metrics.get("selection"), **read_curves(os.path.join(folder, "log.jsonl")),
                  **provenance())
    seconds, iterations = train_seconds(os.path.join(folder, "log.jsonl"))
    record.update(_benchmark(spec, opts, cfg), train_seconds=seconds, iterations=iterations, output_dir=folder,
                  status="done", resolved_config=to_dict(cfg))
    write_json(os.path.join(folder, RESULT), record)
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
    from sparse_detr.engine.studies.sweep_plots import plot_pareto, plot_selection
    from sparse_detr.engine.studies.sweep_report import results_markdown

    os.makedirs(opts.out, exist_ok=True)
    slim = [{k: v for k, v in r.items() if k not in ("resolved_config", "_wall")} for r in records]
    json_path = os.path.join(opts.out, "results.json")
    plots = {name: draw for name, draw, wanted in (
        ("results.png", plot_pareto, any(r.get("gflops") is not None for r in slim)),
        ("results_selection.png", plot_selection, any(r.get("curves") for r in slim))) if wanted}
    unchanged = os.path.isfile(json_path) and read_json(json_path) == json.loads(json.dumps(slim))
    write_json(json_path, slim)
    with open(os.path.join(opts.out, "results.md"), "w", encoding="utf-8") as f:
        f.write(results_markdown(slim, opts.command))
    for name, draw in plots.items():
        path = os.path.join(opts.out, name)
        if not (unchanged and os.path.isfile(path)):
            draw(slim, path, title=data_title(opts))


def data_title(opts: SweepOptions) -> str:
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
        log(f"[{len(records)}/{len(runs)}] {record['name']} {record['status']} in {format_duration(walls[-1])}: "
            f"{result} | {left} left, elapsed {format_duration(time.perf_counter() - start)}, "
            f"ETA {format_duration(eta)}")
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
