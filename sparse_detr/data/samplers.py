"""Samplers of the training loader: a reproducible, resumable data order.

Why the train loader is not a plain DataLoader over the dataset:

* `EpochSampler` wraps `DistributedSampler` (also with one process), whose order is a pure function of
  (seed, epoch, rank, world size), and yields `(epoch, index)` pairs. `set_epoch(epoch, skip=n)` drops the first
  `n` samples of this rank, so a resumed run starts at the exact batch where the checkpoint was written.
* `SeededSamples` seeds the RNGs from (seed, epoch, index) around each sample's loading and augmentation (and puts
  the caller's RNG state back afterwards). A sample's augmentation therefore depends on nothing else: not on the
  worker that loads it, the number of workers, the batches skipped at resume, or the number of processes, so a
  resumed run and a 2-process run see exactly the images an uninterrupted single-process run sees.
* The loaders get their own `generator`, so creating an iterator never draws from the global RNG that dropout
  uses (the checkpointed RNG state then continues exactly).
* `data.group_by_aspect_ratio`: `GroupedBatchSampler` cuts the same per-epoch order into batches of images from
  one aspect-ratio bin (torchvision's detection references do the same), a pure function of that order, so
  resume skips whole batches and stays exact.
"""

from __future__ import annotations

import bisect
import itertools
import random
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

__all__ = ["EpochSampler", "GroupedBatchSampler", "aspect_ratio_groups", "SeededSamples"]


class EpochSampler(Sampler):
    """This rank's share of a seeded shuffle of `range(size)`, as `(epoch, index)` pairs; see the module docstring."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, shuffle: bool = True) -> None:
        # num_replicas/rank given explicitly: DistributedSampler then needs no process group (single process too).
        self.inner = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip
        self.inner.set_epoch(epoch)

    def __iter__(self):
        for i, index in enumerate(self.inner):
            if i >= self.skip:
                yield self.epoch, index

    def __len__(self) -> int:
        return max(0, len(self.inner) - self.skip)

    @property
    def samples_per_epoch(self) -> int:
        """Samples this rank sees in a full epoch (the skip aside)."""
        return len(self.inner)


def aspect_ratio_groups(sizes: np.ndarray, factor: int = 3) -> list[int]:
    """Bin index of every image's width/height, from `sizes` (N,2) (h, w): 2*factor bins with edges
    2**linspace(-1, 1, 2*factor + 1) inside (ratios beyond 1/2 or 2 share the outer bins)."""
    edges = (2.0 ** np.linspace(-1.0, 1.0, 2 * factor + 1))[1:-1].tolist()
    return [bisect.bisect_right(edges, float(w) / float(h)) for h, w in np.asarray(sizes).reshape(-1, 2)]


class GroupedBatchSampler(Sampler):
    """Batches of `batch_size` from `sampler`'s `(epoch, index)` order, each from one group where possible.

    A sample joins its group's open batch; a batch is yielded when full. At the end of the epoch the samples
    left in unfinished groups are batched together in their original order (so an epoch has exactly
    samples // batch_size batches, like drop_last), and the final partial batch is dropped."""

    def __init__(self, sampler: EpochSampler, group_ids: list[int], batch_size: int) -> None:
        self.sampler, self.group_ids, self.batch_size = sampler, group_ids, batch_size
        self.skip_batches = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """`skip` in samples, as `EpochSampler.set_epoch`: always whole batches here."""
        self.sampler.set_epoch(epoch, skip=0)
        self.skip_batches = skip // self.batch_size

    @property
    def samples_per_epoch(self) -> int:
        return self.sampler.samples_per_epoch

    def _batches(self):
        open_batches: dict[int, list] = {}
        position: dict[tuple, int] = {}
        for i, key in enumerate(self.sampler):
            position[key] = i
            batch = open_batches.setdefault(self.group_ids[key[1]], [])
            batch.append(key)
            if len(batch) == self.batch_size:
                yield batch
                open_batches[self.group_ids[key[1]]] = []
        rest = sorted((k for b in open_batches.values() for k in b), key=position.__getitem__)
        for i in range(0, len(rest) - self.batch_size + 1, self.batch_size):
            yield rest[i:i + self.batch_size]

    def __iter__(self):
        return itertools.islice(self._batches(), self.skip_batches, None)

    def __len__(self) -> int:
        return max(0, self.samples_per_epoch // self.batch_size - self.skip_batches)


class SeededSamples(Dataset):
    """`dataset[(epoch, index)]` = `dataset[index]` with `random`, numpy and torch (CPU) seeded from
    (seed, epoch, index); the previous RNG states are restored afterwards, so loading in the main process
    (num_workers=0) leaves the training RNG untouched."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        # SeedSequence mixes the three numbers well (a plain sum would give neighbouring epochs shifted streams).
        seed = int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1, np.uint64)[0])
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed % 2**32)
                return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)

    def __getattr__(self, name: str) -> Any:
        # label_map, ann_file, image_ids, ... of the wrapped dataset.
        if name in ("dataset", "seed"):
            raise AttributeError(name)
        return getattr(self.dataset, name)
