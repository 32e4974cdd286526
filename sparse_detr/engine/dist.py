"""The handful of distributed helpers the engine uses; everything else stays rank-agnostic.

`torchrun` (or any launcher that sets the same variables) exports RANK, LOCAL_RANK and WORLD_SIZE plus
MASTER_ADDR/MASTER_PORT; `init_from_env()` reads them and starts the default process group: NCCL when the
process owns a GPU, gloo otherwise (CPU tests, CPU-only machines). Without those variables the helpers below
degrade to the single-process answers (rank 0, world size 1, reductions are identities), so the training code
calls them unconditionally and never branches on "am I distributed".

A collective that waits longer than the group's timeout (`train.collective_timeout_s`, 30 min by default) for a
process that stopped (SIGSTOP, a deadlock, a lost node) raises `CollectiveTimeoutError`, whose message names this
rank, the collective and what it was for, instead of the backend's bare timeout.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist

from sparse_detr.errors import UserError

__all__ = [
    "DistInfo", "init_from_env", "is_dist", "get_rank", "world_size", "is_main_process", "all_reduce_mean",
    "all_reduce_sum", "all_gather_object", "barrier", "cleanup", "CollectiveTimeoutError",
]

_TIMEOUT_S = [1800.0]  # the group's timeout, for the message


class CollectiveTimeoutError(UserError, RuntimeError):
    """A collective waited longer than the process group's timeout for the other processes."""


def _guarded(name: str, purpose: str, fn, *args, **kwargs):
    """Run collective ``fn``; a backend timeout becomes a CollectiveTimeoutError naming rank and collective."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as e:  # gloo: "Timed out waiting ...", NCCL: "Watchdog caught collective operation timeout"
        if "timed out" not in str(e).lower() and "timeout" not in str(e).lower():
            raise
        raise CollectiveTimeoutError(
            f"rank {get_rank()} of {world_size()} waited {_TIMEOUT_S[0]:g} s in {name} ({purpose}) for the other "
            f"processes: one of them has stopped or hangs (SIGSTOP, a deadlock, a lost node). The last checkpoint "
            f"is intact; restart with --resume auto. train.collective_timeout_s sets the wait. ({e})") from None


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_from_env(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Start the process group from torchrun's environment (if any) and pick this process's device.

    `device` is "auto" (CUDA when available), "cuda" or "cpu". Each process uses GPU LOCAL_RANK: the mapping that
    torchrun assumes when it starts one process per GPU.
    """
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but torch.cuda.is_available() is False")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        kwargs: dict[str, Any] = {}
        if use_cuda:
            # Binding the group to the device lets NCCL set up communicators eagerly and silences the
            # "device unknown" barrier warning.
            kwargs["device_id"] = dev
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s), **kwargs)
        _TIMEOUT_S[0] = timeout_s
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=dev)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def all_reduce_sum(tensor: torch.Tensor, purpose: str = "a sum over processes") -> torch.Tensor:
    """Sum over processes (a new tensor; the input is left alone)."""
    out = tensor.detach().clone()
    if is_dist():
        _guarded("all_reduce", purpose, dist.all_reduce, out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_mean(tensor: torch.Tensor, purpose: str = "a mean over processes") -> torch.Tensor:
    """Mean over processes (a new tensor; the input is left alone)."""
    out = all_reduce_sum(tensor, purpose)
    n = world_size()
    return out / n if n > 1 else out


def all_gather_object(obj: Any) -> list[Any]:
    """Every process's `obj`, in rank order. Pickles through the process group: for rare, small payloads only."""
    if not is_dist():
        return [obj]
    out: list[Optional[Any]] = [None] * world_size()
    _guarded("all_gather_object", "gathering results of every process", dist.all_gather_object, out, obj)
    return out


def barrier() -> None:
    if is_dist():
        if dist.get_backend() == "nccl":
            _guarded("barrier", "waiting for every process", dist.barrier, device_ids=[torch.cuda.current_device()])
        else:
            _guarded("barrier", "waiting for every process", dist.barrier)


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()
