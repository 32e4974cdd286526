"""One timing helper for every benchmark: functions timed in turns (a, b, a, b, …) so that all see the same machine
load, the device synchronised around each call, the median kept."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping, Optional

import torch

__all__ = ["synchronize", "median_seconds"]


def synchronize(device: Optional[torch.device]) -> None:
    """Wait for the device's queued work (CUDA); a no-op on the CPU."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fns: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1,
                   device: Optional[torch.device] = None) -> dict[str, float]:
    """Median wall time in seconds of each ``fns[name]()``, over ``repeats`` interleaved rounds after ``warmup``."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
