"""Config → datasets, data loaders, model, optimiser: the engine code that maps config sections to plain arguments.

Everything built here takes plain arguments further down (`optim.py`, the model classes), so those stay usable
without a `Config`; the training loop (`train.Trainer`) reads its own `train` section as it is.

Reproducible, resumable data order (why the train loader is not a plain DataLoader over the dataset):

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
import os
import random
import warnings
from typing import Any, Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from sparse_detr.config import Config
from sparse_detr.data import build_dataset, collate_batch, ensure_synthetic, make_generator, seed_worker
from sparse_detr.data.coco import DataError
from sparse_detr.engine import dist
from sparse_detr.engine.optim import build_ema, build_lr_scheduler, build_optimizer, scaled_lr

__all__ = ["EpochSampler", "GroupedBatchSampler", "aspect_ratio_groups", "SeededSamples",
           "build_split", "build_datasets", "build_train_loader", "build_val_loader", "check_num_classes", "build_model_and_criterion", "wrap_distributed",
           "build_optimization", "resolve_num_threads", "setup_threads"]


# ---------------------------------------------------------------------------------------------------------
# Data

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


def build_split(cfg: Config, split: str) -> Dataset:
    """The "train" or "val" dataset. The synthetic set is generated by the main process first (no write race)."""
    d = cfg.data
    transform_kwargs = dict(scales=d.train_scales, max_size=d.max_size, val_size=d.val_size, crop=d.crop,
                            crop_resize_sizes=d.crop_resize_sizes, crop_min=d.crop_min, crop_max=d.crop_max,
                            hflip=d.hflip)
    if d.dataset == "synthetic":
        s = d.synthetic
        synthetic = dict(num_train=s.num_train, num_val=s.num_val, min_size=s.min_size, max_size=s.max_size,
                         seed=s.seed, preset=s.preset, max_objects=s.max_objects, min_object_side=s.min_object_side,
                         max_object_scale=s.max_object_scale)
        if dist.is_main_process():
            # generates the files when missing or made with other options, with a progress line every 10%
            ensure_synthetic(d.root, progress=True, **synthetic)
        dist.barrier()
        paths: dict[str, Any] = dict(dataset="synthetic", root=d.root, synthetic=synthetic)
    else:
        images, annotations = ((d.train_images, d.train_annotations) if split == "train"
                               else (d.val_images, d.val_annotations))
        # os.path.join keeps absolute paths as they are.
        paths = dict(dataset="coco", img_folder=os.path.join(d.root, images),
                     ann_file=os.path.join(d.root, annotations))
    dataset = build_dataset(split, **paths, label_mapping=d.label_mapping, **transform_kwargs)
    check_num_classes(dataset.label_map, cfg.model.num_classes, getattr(dataset, "ann_file", split))
    return dataset


def check_num_classes(label_map: Any, num_classes: int, source: str) -> None:
    """Fail before training when the model has fewer class logits than the labels need (a label >= num_classes
    would index past the logits). More logits than labels is allowed (e.g. COCO's 91 for 80 categories)."""
    if label_map.num_classes <= num_classes:
        return
    if label_map.mode == "category_id":
        raise DataError(
            f"{source}: data.label_mapping=category_id uses the category ids as labels, and the largest id is "
            f"{max(label_map.category_ids)}, so model.num_classes must be at least {label_map.num_classes} (it is "
            f"{num_classes}); set model.num_classes={label_map.num_classes}, or data.label_mapping=contiguous "
            f"for {len(label_map.category_ids)} classes")
    raise DataError(f"{source} has {label_map.num_classes} categories but model.num_classes is {num_classes}; "
                     f"set model.num_classes={label_map.num_classes}")


def build_datasets(cfg: Config) -> tuple[Dataset, Dataset]:
    """(train, val) datasets, checked to share their categories and to be usable by the model: an empty split
    is an error; a val split without boxes (no AP can be measured) and an image with more boxes than
    ``model.num_queries`` (the surplus can never be matched) are warnings."""
    train, val = build_split(cfg, "train"), build_split(cfg, "val")
    names = {split: getattr(ds, "ann_file", split) for split, ds in (("train", train), ("val", val))}
    if train.label_map != val.label_map:
        a, b = (dict(zip(ds.label_map.category_ids, ds.label_map.names)) for ds in (train, val))
        only = lambda x, y: {k: v for k, v in x.items() if y.get(k) != v} or "none"  # noqa: E731
        raise DataError(f"{names['train']} and {names['val']} have different categories (id: name): only in "
                        f"train {only(a, b)}, only in val {only(b, a)}")
    for split, ds in (("train", train), ("val", val)):
        if len(ds) == 0:
            raise DataError(f"{names[split]}: the {split} split has no images")
    annotations = getattr(val, "annotations", None)
    if annotations is not None and len(annotations.boxes) == 0:
        warnings.warn(f"{names['val']}: the val split has no boxes, so no AP can be measured (COCO reports -1) "
                      f"and no checkpoint_best.pth is written; use a val split with annotations", UserWarning)
    annotations = getattr(train, "annotations", None)
    if annotations is not None and len(annotations):
        per_image = np.diff(annotations.offsets)
        worst = int(per_image.argmax())
        if per_image[worst] > cfg.model.num_queries:
            crowded = int((per_image > cfg.model.num_queries).sum())
            warnings.warn(f"{names['train']}: {crowded} image(s) have more boxes than model.num_queries = "
                          f"{cfg.model.num_queries} (image id {int(annotations.image_ids[worst])}: "
                          f"{int(per_image[worst])}); the surplus boxes can never be matched: raise "
                          f"model.num_queries", UserWarning)
    return train, val


def _loader_kwargs(cfg: Config, device: torch.device, rank: int) -> dict:
    workers = cfg.data.num_workers
    return dict(num_workers=workers, collate_fn=collate_batch, pin_memory=device.type == "cuda",
                worker_init_fn=seed_worker, persistent_workers=workers > 0,
                generator=make_generator(cfg.train.seed, rank))


def build_train_loader(cfg: Config, dataset: Dataset, info: dist.DistInfo) -> tuple[DataLoader, Sampler]:
    """Shuffled, resumable train loader (drop_last: every step sees a full global batch)."""
    sampler = EpochSampler(dataset, info.world_size, info.rank, cfg.train.seed, shuffle=True)
    if sampler.samples_per_epoch < cfg.train.batch_size:
        raise ValueError(f"the training set has {len(dataset)} images: fewer than one global batch of "
                         f"{cfg.train.batch_size} x {info.world_size} processes")
    samples = SeededSamples(dataset, cfg.train.seed)
    if cfg.data.group_by_aspect_ratio:
        sizes = getattr(getattr(dataset, "annotations", None), "sizes", None)
        if sizes is None:
            raise ValueError("data.group_by_aspect_ratio needs a COCO-format dataset (image sizes from its json)")
        sampler = GroupedBatchSampler(sampler, aspect_ratio_groups(sizes), cfg.train.batch_size)
        loader = DataLoader(samples, batch_sampler=sampler, **_loader_kwargs(cfg, info.device, info.rank))
    else:
        loader = DataLoader(samples, batch_size=cfg.train.batch_size, sampler=sampler, drop_last=True,
                            **_loader_kwargs(cfg, info.device, info.rank))
    return loader, sampler


def build_val_loader(cfg: Config, dataset: Dataset, info: dist.DistInfo) -> DataLoader:
    """In-order val loader, sharded over processes (the evaluator merges by image id, so the padding that
    DistributedSampler adds to even out the shards is harmless)."""
    if info.distributed:
        sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=False)
    else:
        sampler = torch.utils.data.SequentialSampler(dataset)
    return DataLoader(dataset, batch_size=cfg.train.eval_batch_size, sampler=sampler, drop_last=False,
                      **_loader_kwargs(cfg, info.device, info.rank))


# ---------------------------------------------------------------------------------------------------------
# Model and optimisation

def build_model_and_criterion(cfg: Config, device: torch.device):
    """(model, criterion, postprocessor) on `device`."""
    from sparse_detr.models import build_model  # deferred: the data-only tools need not import the model

    model, criterion, postprocessor = build_model(cfg)
    return model.to(device), criterion.to(device), postprocessor


def wrap_distributed(model: torch.nn.Module, device: torch.device, distributed: bool) -> torch.nn.Module:
    """The module the training step calls: `model` itself, or DDP around it when `distributed`.

    `find_unused_parameters` costs an extra walk of the autograd graph every step, so it is turned on only when
    the model says a step leaves some trainable parameters without a gradient (`has_unused_parameters()`, e.g.
    box refinement with `aux_loss: false`); without it DDP would fail at the second step. Every shipped config
    takes the fast path (our encoder scatters the kept tokens batched, unlike the official per-image loop).
    """
    if not distributed:
        return model
    check = getattr(model, "has_unused_parameters", None)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=bool(check()) if callable(check) else False)


def build_optimization(cfg: Config, model: torch.nn.Module, world: int):
    """(optimizer, lr scheduler, EMA or None). The lr scaling uses the global batch (per-process × processes)."""
    t = cfg.train
    global_batch = t.batch_size * world
    lr = scaled_lr(t.lr, global_batch, t.base_batch_size, t.lr_scaling)
    lr_backbone = scaled_lr(t.lr_backbone, global_batch, t.base_batch_size, t.lr_scaling)
    optimizer = build_optimizer(model, lr=lr, lr_backbone=lr_backbone, lr_linear_proj_mult=t.lr_linear_proj_mult,
                                weight_decay=t.weight_decay)
    scheduler = build_lr_scheduler(optimizer, t.lr_drop_epochs, t.lr_drop_factor)
    ema = build_ema(model, t.ema_decay) if t.ema else None
    return optimizer, scheduler, ema


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_num_threads(setting: "int | str", environ=os.environ, cores: Optional[int] = None,
                        load: Optional[float] = None) -> int:
    """`train.num_threads` as a number. auto: OMP_NUM_THREADS when set; else the cores this process may use,
    minus the 1-minute load average (other processes' runnable threads), shared by the processes of this node
    (torchrun's LOCAL_WORLD_SIZE), at least 1.

    Why: an OpenMP team larger than the free cores makes every parallel region wait for descheduled threads; on
    2 busy cores the demo ran 3-8x slower with 2 threads than with 1 (docs/benchmarks.md#cpu-threads)."""
    if setting != "auto":
        return int(setting)
    if environ.get("OMP_NUM_THREADS", "").strip().isdigit() and int(environ["OMP_NUM_THREADS"]) >= 1:
        return int(environ["OMP_NUM_THREADS"])
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if load is None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    local = max(1, int(environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, int(cores - load + 0.5) // local)


def setup_threads(cfg: Config) -> str:
    """Apply `train.num_threads` to this process; returns a line for the log."""
    n = resolve_num_threads(cfg.train.num_threads)
    torch.set_num_threads(n)
    return f"{n} CPU thread(s) per process (train.num_threads={cfg.train.num_threads})"


def setup_determinism(cfg: Config) -> Optional[str]:
    """Apply `train.deterministic`; returns a note for the log. cuBLAS needs its workspace variable set before
    the first CUDA call, which is why this runs before anything touches the GPU."""
    if not cfg.train.deterministic:
        torch.backends.cudnn.benchmark = False  # input sizes vary per batch: benchmarking would re-tune constantly
        return None
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    # warn_only: ops without a deterministic kernel (e.g. some CUDA scatter backward passes) warn instead of
    # stopping the run; the warning names them.
    torch.use_deterministic_algorithms(True, warn_only=True)
    return "deterministic algorithms on (warn_only)"
