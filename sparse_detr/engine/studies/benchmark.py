"""Model cost benchmark: parameters, GFLOPs (split by part), inference FPS and a training step, per config.

`benchmark_configs(paths, options)` builds every config in one process and measures them on the same inputs,
their timed runs taking turns; the first config is the baseline of the ratios. `tools/benchmark.py` is the CLI.
One record per config (see `benchmark_config`):

* `params_total` (unique parameters), `params_trainable`, and `params`: what inference needs, i.e. without the
  encoder aux heads (they only feed training losses; the eval forward skips them) and without heads that never
  run in eval.
* GFLOPs by `torch.utils.flop_counter.FlopCounterMode` with the op formula of `sparse_detr.ops.flops`, one image at
  a time, MEAN over the images (the official tool prints the mean but reports the last image). `gflops`: torch's
  convention (1 multiply-add = 2 FLOPs); `gflops_official`: halved, the fvcore convention of the paper;
  `*_without_op`: the deformable attention op left out, close to what fvcore counts (it sees only grid_sample).
  `gflops_parts`: backbone / selector (the token selector's own modules: the scorer, or the OS head; 0 for
  random) / encoder (input projections, encoder layers) / decoder (decoder layers, query initialisation) / heads
  (every class and box head, wherever called) / enc_aux_heads (training-only; non-zero only if an eval forward
  runs them) / other (the proposal projection `enc_output`, shared by the scorer input and the two-stage
  proposals).
* `fps_bs{n}`: images/s in eval mode under `torch.inference_mode` after warm-up; median run, configs timed in
  turns (CUDA synchronised).
* `train_step_s`, `train_peak_mem_mb`, `train_gflops_per_image` (`options.train_step`): forward + criterion +
  backward on random targets; memory = CUDA max allocated, or on the CPU the growth of the resident set size.
* `autocast` (`options.autocast`, e.g. "bfloat16"): the FPS and training-step runs ran under `torch.autocast` in
  that dtype (FLOPs are counted in fp32: they depend on shapes only).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from sparse_detr.config import load_config
from sparse_detr.data.transforms import normalize
from sparse_detr.engine.timing import median_seconds, synchronize
from sparse_detr.ops import backend_for, flops as op_flops  # importing flops registers the op's FLOP formulas

__all__ = ["BenchmarkOptions", "PARTS", "load_images", "count_parameters", "count_flops", "measure_fps",
           "measure_train_step", "benchmark_config", "benchmark_configs", "add_ratios"]

PARTS = ("backbone", "selector", "encoder", "decoder", "heads", "enc_aux_heads", "other")
# Module-name prefixes (as `named_modules` spells them) -> part. A module reachable under several names (a shared
# head fills every head slot) takes the part that comes first in PARTS_PRIORITY, so a head is a head wherever it
# is called from. The proposal projection (enc_output) is in no part: "other", as the official code's own lines.
PART_PREFIXES = {
    "tokens.backbone": "backbone",
    "tokens.input_proj": "encoder", "encoder.stack": "encoder", "encoder.selector": "selector",
    "decoder.stack": "decoder", "queries.pos_trans": "decoder", "queries.pos_trans_norm": "decoder",
    "queries.reference_points": "decoder", "queries.query_embed": "decoder",
    "decoder.class_embed": "heads", "decoder.bbox_embed": "heads", "queries.class_embed": "heads",
    "queries.bbox_embed": "heads", "encoder.aux_class_embed": "heads", "encoder.aux_bbox_embed": "heads",
}
PARTS_PRIORITY = ("selector", "heads", "backbone", "encoder", "decoder")
HEADS = ("decoder.class_embed", "decoder.bbox_embed", "queries.class_embed", "queries.bbox_embed",
         "encoder.aux_class_embed", "encoder.aux_bbox_embed")


@dataclass
class BenchmarkOptions:
    device: str = "cpu"
    batch_sizes: Sequence[int] = (1, 4)
    num_images: int = 2  # images for the FLOP mean (and the pool the FPS batches are drawn from)
    height: int = 800
    width: int = 1333
    coco_dir: Optional[str] = None  # a folder of images (or a COCO root with val2017/) instead of random ones
    warmup: int = 1
    timed_runs: int = 3
    train_step: bool = False
    train_runs: int = 2
    autocast: Optional[str] = None  # "bfloat16" / "float16": time FPS and the training step under torch.autocast
    seed: int = 0
    overrides: Sequence[str] = field(default_factory=tuple)  # key=value for every config


def load_images(num_images: int, height: int, width: int, coco_dir: Optional[str] = None,
                seed: int = 0) -> list[Tensor]:
    """`num_images` normalised (3, H, W) float images: uniform noise of height x width, or the first images of
    `coco_dir` (sorted by name) resized as the val transform does (shorter side `height`, longer <= `width`)."""
    if coco_dir is None:
        g = torch.Generator().manual_seed(seed)
        return [normalize(torch.rand(3, height, width, generator=g)) for _ in range(num_images)]
    from sparse_detr.data.image_io import read_picture
    from sparse_detr.engine.inference.visualize import list_images, prepare_image

    subs = [os.path.join(coco_dir, s) for s in ("val2017", "val") if os.path.isdir(os.path.join(coco_dir, s))]
    folder = subs[0] if subs else coco_dir  # a COCO root (val2017/), our synthetic root (val/), or a folder
    images = []
    for path in list_images(folder)[:num_images]:
        images.append(prepare_image(read_picture(path), height, max(width, height))[0])
    return images


@contextlib.contextmanager
def _modules_that_run(model: nn.Module) -> Iterator[set[int]]:
    """Collects the ids of the modules whose forward runs inside the block."""
    ran: set[int] = set()
    handles = [m.register_forward_pre_hook(lambda mod, args: ran.add(id(mod))) for m in model.modules()]
    try:
        yield ran
    finally:
        for h in handles:
            h.remove()


def _head_modules(model: nn.Module, names: Sequence[str] = HEADS) -> dict[int, nn.Module]:
    """id -> head module for the head slots ``names`` (a ModuleList slot gives each of its heads)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    found = [modules[n] for n in names if n in modules]
    return {id(h): h for m in found for h in (m if isinstance(m, nn.ModuleList) else [m])}


def _training_only_heads(model: nn.Module) -> set[int]:
    """ids of the encoder aux heads (they only feed the encoder aux losses), unless the same object also fills a
    decoder or two-stage slot (one shared head)."""
    aux = _head_modules(model, ("encoder.aux_class_embed", "encoder.aux_bbox_embed"))
    other = _head_modules(model, [n for n in HEADS if not n.startswith("encoder.")])
    return set(aux) - set(other)


def count_parameters(model: nn.Module, ran: set[int]) -> dict[str, int]:
    """Total, trainable and inference parameter counts (shared parameters counted once). Inference excludes the
    encoder aux heads and any head that does not run in an eval forward (`ran`: ids of the modules that ran in
    one, as `count_flops` returns them)."""
    unique = {id(p): p for p in model.parameters()}
    aux = _training_only_heads(model)
    heads = _head_modules(model)
    used = {id(p) for k, h in heads.items() if k in ran and k not in aux for p in h.parameters()}
    unused = {id(p): p for k, h in heads.items() for p in h.parameters() if id(p) not in used}
    total = sum(p.numel() for p in unique.values())
    return {"params_total": total, "params_trainable": sum(p.numel() for p in unique.values() if p.requires_grad),
            "params": total - sum(p.numel() for p in unused.values())}


def _module_parts(model: nn.Module) -> dict[int, tuple[nn.Module, str]]:
    """id -> (module, part) for every module under a PART_PREFIXES entry (all names of aliased modules)."""
    found: dict[int, tuple[nn.Module, list[str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for prefix, part in PART_PREFIXES.items():
            if name == prefix or name.startswith(prefix + "."):
                found.setdefault(id(module), (module, []))[1].append(part)
    rank = {p: i for i, p in enumerate(PARTS_PRIORITY)}
    # Encoder aux heads (and their layers) are charged apart: what inference would save by skipping them.
    heads = _training_only_heads(model)
    aux = {id(sub) for m in model.modules() if id(m) in heads for sub in m.modules()}
    return {k: (m, "enc_aux_heads" if k in aux else min(parts, key=rank.__getitem__))
            for k, (m, parts) in found.items()}


class _PartAttribution:
    """Forward hooks that charge every FLOP to the innermost part being executed ("other" outside all parts).

    Uses only `FlopCounterMode.get_total_flops()`: the growth of the total between two hook events belongs to
    the part on top of the stack at that moment. Ops in a part's forward that run after one of its children
    returned are still charged correctly, because every pre- and post-hook settles the account first."""

    def __init__(self, model: nn.Module, counter: FlopCounterMode) -> None:
        self.counter, self.stack, self.last = counter, ["other"], 0
        self.totals = dict.fromkeys(PARTS, 0)
        self.handles = []
        for module, part in _module_parts(model).values():
            self.handles.append(module.register_forward_pre_hook(lambda m, a, part=part: self._move(part)))
            self.handles.append(module.register_forward_hook(lambda m, a, o: self._move(None)))

    def _settle(self) -> None:
        now = self.counter.get_total_flops()
        self.totals[self.stack[-1]] += now - self.last
        self.last = now

    def _move(self, part: Optional[str]) -> None:
        self._settle()  # what ran since the last hook belongs to the part that was on top until now
        self.stack.append(part) if part else self.stack.pop()

    def close(self) -> dict[str, int]:
        self._settle()
        for h in self.handles:
            h.remove()
        return self.totals


def _count_one(model: nn.Module, image: Tensor) -> dict:
    with torch.no_grad(), _modules_that_run(model) as ran, FlopCounterMode(display=False) as counter:
        parts = _PartAttribution(model, counter)
        try:
            out = model([image])
        finally:
            split = parts.close()
    counts = counter.get_flop_counts()["Global"]
    kept = out["selection"].counts if out.get("selection") is not None else None
    return {"total": counter.get_total_flops(), "op": sum(counts.get(p, 0) for p in op_flops.OP_PACKETS),
            "parts": split, "tokens": int(out["padding_mask"].shape[1]), "ran": ran,
            "kept": float(kept.float().mean()) if kept is not None else None}


def count_flops(model: nn.Module, images: list[Tensor]) -> dict:
    """Mean per-image FLOPs of an eval forward, one image at a time (torch convention), with the part split,
    the op's own share, the mean number of tokens and kept tokens, and the ids of the modules that ran."""
    model.eval()
    # FlopCounterMode's module tracker asserts on tensors that require grad but have no autograd history (views
    # of parameters made under no_grad, e.g. learned query embeddings): freeze the parameters while counting.
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        runs = [_count_one(model, image) for image in images]
    finally:
        for p in frozen:
            p.requires_grad_(True)
    n = len(runs)
    mean = lambda key: sum(r[key] for r in runs) / n  # noqa: E731
    return {
        "flops": mean("total"), "op_flops": mean("op"),
        "parts": {p: sum(r["parts"][p] for r in runs) / n for p in PARTS},
        "tokens": runs[0]["tokens"], "kept_tokens": None if runs[0]["kept"] is None else mean("kept"),
        "ran": runs[0]["ran"],
    }


def _autocast(device: torch.device, dtype: Optional[str]):
    """torch.autocast in `dtype` ("bfloat16", "float16") on the device, or a no-op for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def measure_fps(models: Sequence[nn.Module], images: list[Tensor], batch_size: int, warmup: int, runs: int,
                device: torch.device, autocast: Optional[str] = None) -> list[float]:
    """Images per second of each model's eval forward on one batch of `batch_size` images (the pool cycled).

    The models take turns run by run (A B C A B C ...), and each gets the MEDIAN of its run times: on a shared
    machine the load drifts, and a config timed alone would inherit whatever load its minutes happened to see."""
    batch = [images[i % len(images)].to(device) for i in range(batch_size)]
    for model in models:
        model.eval()
    fns = {i: (lambda model=model: model(batch)) for i, model in enumerate(models)}
    with torch.inference_mode(), _autocast(device, autocast):
        seconds = median_seconds(fns, repeats=runs, warmup=warmup, device=device)
    return [batch_size / seconds[i] for i in range(len(models))]


@contextlib.contextmanager
def _rss_growth() -> Iterator[dict]:
    """Peak growth of the resident set size (bytes) while the block runs, sampled every 2 ms by a thread (torch
    ops release the GIL, so the sampler runs during them). Linux only (/proc); elsewhere it reports 0.
    glibc keeps freed memory resident, which would hide the peak of a step that fits in what an earlier config
    freed: `malloc_trim` hands it back to the OS first."""
    page, statm = os.sysconf("SC_PAGE_SIZE"), "/proc/self/statm"
    rss = (lambda: int(open(statm).read().split()[1]) * page) if os.path.exists(statm) else (lambda: 0)
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: the growth may then be underestimated
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    stats, stop = {"start": rss(), "peak": 0}, threading.Event()

    def sample() -> None:
        while not stop.wait(0.002):
            stats["peak"] = max(stats["peak"], rss())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield stats
    finally:
        stop.set()
        thread.join()
        stats["growth"] = max(stats["peak"], rss()) - stats["start"]


def _random_targets(num: int, num_classes: int, device: torch.device, seed: int) -> list[dict[str, Tensor]]:
    """Five random boxes (cxcywh in [0, 1]) with random labels per image: enough for the matcher and losses."""
    g = torch.Generator().manual_seed(seed)
    centres, sizes = 0.2 + 0.6 * torch.rand(num, 5, 2, generator=g), 0.05 + 0.3 * torch.rand(num, 5, 2, generator=g)
    boxes = torch.cat([centres, sizes], -1)
    labels = torch.randint(0, num_classes, (num, 5), generator=g)
    return [{"labels": lab.to(device), "boxes": box.to(device)} for lab, box in zip(labels, boxes)]


def measure_train_step(model: nn.Module, criterion: nn.Module, images: list[Tensor], device: torch.device,
                       runs: int = 2, seed: int = 0, autocast: Optional[str] = None) -> dict:
    """Seconds per forward + weighted loss + backward on `images` as one batch, its peak memory and FLOPs."""
    from sparse_detr.models.criterion import weighted_total

    batch = [im.to(device) for im in images]
    targets = _random_targets(len(batch), model.num_classes, device, seed)
    model.train()

    def step() -> None:
        with _autocast(device, autocast):
            loss = weighted_total(criterion(model(batch), targets), criterion.weight_dict)
        loss.backward()
        model.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:  # the warm-up step, counted
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with _rss_growth() as rss:
        start = time.perf_counter()
        for _ in range(runs):
            step()
        synchronize(device)
        elapsed = (time.perf_counter() - start) / runs
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss["growth"]
    model.eval()
    return {"train_step_s": elapsed, "train_peak_mem_mb": peak / 2**20,
            "train_gflops_per_image": counter.get_total_flops() / len(batch) / 1e9}


def _build(path: str, options: BenchmarkOptions) -> tuple:
    from sparse_detr.models import build_model

    # Random weights are fine for cost: a pretrained-backbone file would only slow the build (or be missing).
    cfg = load_config(path, list(options.overrides) + ["model.pretrained_backbone=null"])
    torch.manual_seed(options.seed)
    model, criterion, _ = build_model(cfg)
    return cfg, model.to(options.device).eval(), criterion.to(options.device)


def _cost_record(path: str, cfg, model: nn.Module, pool: list[Tensor]) -> dict:
    """Parameters and FLOPs of one built config (the keys of the module docstring but FPS and training)."""
    device = pool[0].device
    backend = backend_for(device, pool[0].dtype)
    if backend == "reference":
        warnings.warn(f"{path}: ms_deform_attn runs on the grid_sample reference on {device}; its FLOPs are not "
                      "counted and timings are not representative. Build the kernels first.", stacklevel=2)
    record = {"config": path, "name": os.path.splitext(os.path.basename(path))[0], "rho": cfg.model.rho,
              "device": str(device), "op_backend": backend, "image_hw": list(pool[0].shape[-2:]),
              "num_images": len(pool)}
    fl = count_flops(model, pool)
    record.update(count_parameters(model, fl["ran"]))
    parts = {p: v / 1e9 for p, v in fl["parts"].items()}
    record.update({
        "gflops": fl["flops"] / 1e9, "gflops_official": op_flops.to_official(fl["flops"]) / 1e9,
        "gflops_without_op": (fl["flops"] - fl["op_flops"]) / 1e9,
        "gflops_official_without_op": op_flops.to_official(fl["flops"] - fl["op_flops"]) / 1e9,
        "gflops_parts": parts, "gflops_parts_official": {p: op_flops.to_official(v) for p, v in parts.items()},
        "tokens": fl["tokens"], "kept_tokens": fl["kept_tokens"],
    })
    return record


def benchmark_config(path: str, images: list[Tensor], options: BenchmarkOptions) -> dict:
    """Every measurement of one config, alone (see the module docstring for the keys)."""
    return benchmark_configs([path], options, log=lambda message: None, images=images)[0]


RATIO_KEYS = ("params", "gflops", "gflops_official", "gflops_official_without_op", "train_step_s", "train_peak_mem_mb")


def add_ratios(records: list[dict]) -> list[dict]:
    """Add `ratios` {key: value / baseline value} to every record; the baseline is the first record."""
    base = records[0]
    for r in records:
        keys = list(RATIO_KEYS) + [k for k in base if k.startswith("fps_bs")]
        r["ratios"] = {k: r[k] / base[k] for k in keys if k in r and k in base and base[k]}
        r["ratios"].update({f"{p}_gflops": r["gflops_parts"][p] / base["gflops_parts"][p]
                            for p in PARTS if base["gflops_parts"][p]})
    return records


def benchmark_configs(paths: Sequence[str], options: BenchmarkOptions, log=print,
                      on_record=lambda records: None, images: Optional[list[Tensor]] = None) -> list[dict]:
    """Benchmark every config on the same inputs (`images`, default `load_images` of the options); the first is
    the baseline of the ratios. All models are built up front so that their timed runs can take turns
    (`measure_fps`). `on_record(records)` runs after every phase (e.g. to save partial results of a long run)."""
    if images is None:
        images = load_images(options.num_images, options.height, options.width, options.coco_dir, options.seed)
    pool = [im.to(options.device) for im in images]
    built = [_build(path, options) for path in paths]
    records = []
    for path, (cfg, model, _) in zip(paths, built):
        records.append({**_cost_record(path, cfg, model, pool), "autocast": options.autocast})
        log(f"{path}: {records[-1]['gflops_official']:.1f} GFLOPs (official convention)")
        on_record(add_ratios(records))
    for bs in options.batch_sizes:
        start = time.perf_counter()
        fps = measure_fps([m for _, m, _ in built], pool, bs, options.warmup, options.timed_runs, pool[0].device,
                          options.autocast)
        for record, value in zip(records, fps):
            record[f"fps_bs{bs}"] = value
        log(f"FPS at batch {bs}: " + ", ".join(f"{r['name']} {v:.3g}" for r, v in zip(records, fps))
            + f" [{time.perf_counter() - start:.0f} s]")
        on_record(add_ratios(records))
    if options.train_step:
        for record, (_, model, criterion) in zip(records, built):
            record.update(measure_train_step(model, criterion, pool[:1], pool[0].device, options.train_runs,
                                             options.seed, options.autocast))
            log(f"{record['config']}: train step {record['train_step_s']:.2f} s")
            on_record(add_ratios(records))
    return add_ratios(records)
