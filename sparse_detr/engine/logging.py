"""Progress and metric logging: smoothed values, ETA, a JSON-lines log, TensorBoard scalars.

Three sinks, all written by the main process only (the values they get are already averaged over processes):

* a text logger (`sparse_detr`, stdout + `output_dir/log.txt`): one line every `log_every` iterations with the
  smoothed losses, lr, iterations/s, the ETA of the epoch and of the whole run, and the peak memory;
* `output_dir/log.jsonl`: one JSON object per line, `{"type": "iter" | "epoch" | "eval" | "checkpoint" | ...}`,
  flushed line by line so that another process (a test, a dashboard) can follow it while the run goes on; a
  resumed run first drops the records after its checkpoint, then appends (one record per iteration overall);
  epochs and batches are numbered from 1, as in the text log;
* TensorBoard scalars through `torch.utils.tensorboard.SummaryWriter` in `output_dir/tensorboard`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
from collections import deque
from typing import Any, Iterator, Optional

import torch

from sparse_detr.progress import format_duration as format_eta  # the training log's ETA

__all__ = ["SmoothedValue", "MeterGroup", "setup_text_logger", "JsonlLog", "TensorboardLog", "format_eta",
           "peak_memory_mb", "resident_memory_mb", "release_free_memory"]


class SmoothedValue:
    """A scalar series: median/mean over the last `window` values plus the global mean."""

    def __init__(self, window: int = 20) -> None:
        self.values: deque[float] = deque(maxlen=window)
        self.total = 0.0
        self.count = 0

    def update(self, value: float) -> None:
        self.values.append(value)
        self.total += value
        self.count += 1

    @property
    def median(self) -> float:
        return float(torch.tensor(list(self.values)).median()) if self.values else math.nan

    @property
    def avg(self) -> float:
        return sum(self.values) / len(self.values) if self.values else math.nan

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else math.nan

    @property
    def last(self) -> float:
        return self.values[-1] if self.values else math.nan


class MeterGroup:
    """Named SmoothedValues created on first use."""

    def __init__(self, window: int = 20) -> None:
        self.window = window
        self.meters: dict[str, SmoothedValue] = {}

    def update(self, **values: float) -> None:
        for k, v in values.items():
            self.meters.setdefault(k, SmoothedValue(self.window)).update(float(v))

    def __getitem__(self, name: str) -> SmoothedValue:
        return self.meters[name]

    def __contains__(self, name: str) -> bool:
        return name in self.meters

    def global_avgs(self) -> dict[str, float]:
        return {k: m.global_avg for k, m in self.meters.items()}


def setup_text_logger(output_dir: Optional[str], main_process: bool) -> logging.Logger:
    """The `sparse_detr` logger: INFO to stdout and `output_dir/log.txt` on the main process, WARNING elsewhere
    (so that a failing rank still says why)."""
    logger = logging.getLogger("sparse_detr")
    logger.setLevel(logging.INFO if main_process else logging.WARNING)
    logger.propagate = False
    for h in list(logger.handlers):  # a second run in the same process (tests) must not double every line
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    logger.addHandler(stream)
    if main_process and output_dir:
        os.makedirs(output_dir, exist_ok=True)
        file = logging.FileHandler(os.path.join(output_dir, "log.txt"))
        file.setFormatter(fmt)
        logger.addHandler(file)
    return logger


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # strict JSON has no NaN/inf; keep them readable ("nan", "inf")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _jsonable(value.item())
    return value


class JsonlLog:
    """Append-only JSON-lines log; a no-op when `path` is None (non-main processes)."""

    def __init__(self, path: Optional[str]) -> None:
        self.file = None
        if path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.file = open(path, "a", encoding="utf-8", buffering=1)  # line-buffered: followable live

    def write(self, kind: str, **fields: Any) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"type": kind, **_jsonable(fields)}) + "\n")

    def read(self, kind: str) -> list[dict]:
        """The records of one kind written so far (this run's file, resumed runs included); [] elsewhere."""
        return [] if self.file is None else [r for r in read_jsonl(self.file.name) if r.get("type") == kind]

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def read_jsonl(path: str) -> Iterator[dict]:
    """The records of a log.jsonl in file order (none if it is missing; a line cut by a kill is skipped)."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                yield json.loads(line)
            except ValueError:
                continue


class TensorboardLog:
    """`SummaryWriter` on the main process, a no-op elsewhere or when tensorboard is not installed."""

    def __init__(self, log_dir: Optional[str], purge_step: Optional[int] = None) -> None:
        """purge_step: a resumed run's first global step; the events of the stopped run at that step and later
        are hidden, so the curves continue without overlap."""
        self.writer = None
        if log_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a requirement, but a missing one must not stop training
                logging.getLogger("sparse_detr").warning("tensorboard is not installed: no TensorBoard logs")
                return
            self.writer = SummaryWriter(log_dir=log_dir, purge_step=purge_step)

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, image, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def release_free_memory() -> None:
    """Give the C heap's free pages back to the OS (glibc `malloc_trim`; elsewhere a no-op).

    Why: batches of ever-changing image sizes leave the heap fragmented; glibc keeps those freed pages, so the
    resident memory of a CPU run grew ~15-35 MB per epoch although nothing accumulates (the Python heap stays
    flat, see docs/benchmarks.md). Trimming once per epoch keeps the resident size at what is in use."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes
            _LIBC = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else False
            _LIBC.malloc_trim  # noqa: B018 - musl and others have no malloc_trim
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def resident_memory_mb() -> float:
    """The current resident set size of this process in MB (Linux; NaN elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return math.nan


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated memory of this process's device; CPU: peak resident set size of the process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10

