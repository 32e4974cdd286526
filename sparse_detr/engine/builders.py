"""Config → datasets, data loaders, model, optimiser, loop options. The only engine code that reads the config.

Everything built here takes plain arguments further down (`optim.py`, `train.Trainer`, the model classes), so
those stay usable without a `Config`.

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
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from sparse_detr.config import Config
from sparse_detr.data import build_dataset, collate_batch, ensure_synthetic, make_generator, seed_worker
from sparse_detr.engine import dist
from sparse_detr.engine.optim import build_ema, build_lr_scheduler, build_optimizer, scaled_lr

__all__ = ["LoopOptions", "EpochSampler", "SeededSamples", "build_split", "build_datasets", "build_train_loader",
           "build_val_loader", "check_num_classes", "build_model_and_criterion", "wrap_distributed",
           "build_optimization", "loop_options"]


@dataclass(frozen=True)
class LoopOptions:
    """The training loop's settings, as plain values (from `cfg.train`)."""

    output_dir: str
    epochs: int
    log_every: int = 20
    checkpoint_every_iters: int = 0
    eval_every_epochs: int = 1
    max_iters_per_epoch: int = 0
    clip_max_norm: float = 0.1
    amp: str = "none"
    vis_num_images: int = 0


def loop_options(cfg: Config) -> LoopOptions:
    t = cfg.train
    return LoopOptions(output_dir=t.output_dir, epochs=t.epochs, log_every=max(1, t.log_every),
                       checkpoint_every_iters=t.checkpoint_every_iters, eval_every_epochs=t.eval_every_epochs,
                       max_iters_per_epoch=t.max_iters_per_epoch, clip_max_norm=t.clip_max_norm, amp=t.amp,
                       vis_num_images=t.vis_num_images)


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
                         seed=s.seed, preset=s.preset, max_objects=s.max_objects)
        if dist.is_main_process():
            ensure_synthetic(d.root, **synthetic)  # generates the files when missing or made with other options
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
        raise ValueError(
            f"{source}: data.label_mapping=category_id uses the category ids as labels, and the largest id is "
            f"{max(label_map.category_ids)}, so model.num_classes must be at least {label_map.num_classes} (it is "
            f"{num_classes}); set model.num_classes={label_map.num_classes}, or data.label_mapping=contiguous "
            f"for {len(label_map.category_ids)} classes")
    raise ValueError(f"{source} has {label_map.num_classes} categories but model.num_classes is {num_classes}; "
                     f"set model.num_classes={label_map.num_classes}")


def build_datasets(cfg: Config) -> tuple[Dataset, Dataset]:
    """(train, val) datasets, checked to share their categories."""
    train, val = build_split(cfg, "train"), build_split(cfg, "val")
    if train.label_map != val.label_map:
        raise ValueError(f"train and val annotation files have different categories: {train.label_map} vs "
                         f"{val.label_map}")
    return train, val


def _loader_kwargs(cfg: Config, device: torch.device, rank: int) -> dict:
    workers = cfg.data.num_workers
    return dict(num_workers=workers, collate_fn=collate_batch, pin_memory=device.type == "cuda",
                worker_init_fn=seed_worker, persistent_workers=workers > 0,
                generator=make_generator(cfg.train.seed, rank))


def build_train_loader(cfg: Config, dataset: Dataset, info: dist.DistInfo) -> tuple[DataLoader, EpochSampler]:
    """Shuffled, resumable train loader (drop_last: every step sees a full global batch)."""
    sampler = EpochSampler(dataset, info.world_size, info.rank, cfg.train.seed, shuffle=True)
    if sampler.samples_per_epoch < cfg.train.batch_size:
        raise ValueError(f"the training set has {len(dataset)} images: fewer than one global batch of "
                         f"{cfg.train.batch_size} x {info.world_size} processes")
    loader = DataLoader(SeededSamples(dataset, cfg.train.seed), batch_size=cfg.train.batch_size, sampler=sampler,
                        drop_last=True, **_loader_kwargs(cfg, info.device, info.rank))
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
