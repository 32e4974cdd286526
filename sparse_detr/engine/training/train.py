"""Training and evaluation runs: `run(cfg, resume=..., eval_only=..., checkpoint=...)` is what `tools/train.py`
calls, `evaluate_checkpoint` what `tools/eval.py` calls. `run` builds everything through `builders.py`, wraps the
model in DDP when there are several processes (one process or torchrun), then `Trainer.fit()` (trainer.py) trains.

Nothing is lost: a run is checked against its checkpoint (resumable? same architecture?) before it writes
anything into the output folder; it then locks the folder (see output_dir.py), removes the temporary files a
killed checkpoint write left, and only then rewrites its own files (log.jsonl cut back to the checkpoint's step,
config.yaml). A fresh start into a folder that holds a run is refused (`RunExistsError`) unless asked for.
"""
from __future__ import annotations

import os
import signal
import warnings
from typing import Optional

from sparse_detr.config import Config, save_config, to_dict
from sparse_detr.data import LabelMap
from sparse_detr.engine.training import builders
from sparse_detr.engine import dist
from sparse_detr.engine.signals import signal_handlers
from sparse_detr.engine.checkpoint import (check_config_compatible, check_resumable, check_resume_config,
                                           find_last_checkpoint, load_checkpoint)
from sparse_detr.engine.training.output_dir import lock_output_dir, remove_stale_temp_files, truncate_jsonl
from sparse_detr.engine.training.evaluate import evaluate, load_coco_gt
from sparse_detr.engine.training.finetune import format_init_report, init_from_checkpoint
from sparse_detr.engine.inference.loading import checkpoint_weights, load_weights
from sparse_detr.errors import UserError
from sparse_detr.engine.training.trainer import (EvaluationError, NonFiniteLossError, TrainingInterrupted,
                                                 Trainer, TrainState)

__all__ = ["NonFiniteLossError", "EvaluationError", "TrainingInterrupted", "RunExistsError", "TrainState", "Trainer",
           "run", "evaluate_checkpoint", "check_fresh_start"]


class RunExistsError(UserError, FileExistsError):
    """A fresh start into a folder that already holds a run's checkpoints: it would overwrite them."""


def check_fresh_start(out_dir: str) -> None:
    """Refuse to train from scratch into a folder holding a run's checkpoints (never overwrite a run)."""
    found = [n for n in ("checkpoint_last.pth", "checkpoint_best.pth") if os.path.isfile(os.path.join(out_dir, n))]
    if found:
        raise RunExistsError(
            f"{out_dir} already holds a run ({', '.join(found)}): starting from scratch would overwrite it. "
            f"Continue it with --resume auto, choose another train.output_dir, or pass --start-over to train "
            f"from scratch over it")


def run(cfg: Config, *, resume: Optional[str] = None, eval_only: bool = False,
        checkpoint: Optional[str] = None, start_over: bool = False) -> dict:
    """Train (or only evaluate) as the config says; returns the last evaluation's metrics.

    resume: "auto" (the last checkpoint in the output folder, if any) or a checkpoint path: continue that run.
    checkpoint: model weights to evaluate (`eval_only`) or to start training from (no optimizer state).
    start_over: train from scratch even into a folder that holds a run (else that is refused: nothing is
    overwritten by mistake). SIGTERM stops the run after its current step with a checkpoint of that step.
    """
    note = builders.setup_determinism(cfg)  # before anything touches CUDA
    threads = builders.setup_threads(cfg)
    info = dist.init_from_env(cfg.train.device, cfg.train.collective_timeout_s)
    trainer = lock = None
    try:
        out_dir = cfg.train.output_dir
        config = to_dict(cfg)
        # Everything that can reject the checkpoint is checked before anything is written into the output folder.
        path = find_last_checkpoint(out_dir) if resume == "auto" else resume
        ckpt = None
        if path is not None:
            ckpt = load_checkpoint(path)
            check_resumable(ckpt, path)
            check_config_compatible(ckpt.get("config"), config, path)
            check_resume_config(ckpt.get("config"), config, path)
        elif checkpoint is not None:
            ckpt = load_checkpoint(checkpoint)
            check_config_compatible(ckpt.get("config"), config, checkpoint)
        elif eval_only:
            raise ValueError("--eval-only needs --checkpoint PATH or --resume")
        if path is None and not eval_only and not start_over:
            check_fresh_start(out_dir)
        stale: list[str] = []
        if info.rank == 0:
            lock = lock_output_dir(out_dir)  # before any write: one run per folder
            stale = remove_stale_temp_files(out_dir)
        builders.seed_everything(cfg.train.seed)  # the same initial weights on every rank
        with warnings.catch_warnings(record=True) as caught:
            train_set, val_set = builders.build_datasets(cfg)
        model, criterion, postprocessor = builders.build_model_and_criterion(cfg, info.device)
        init_report = None
        if cfg.model.init_weights and path is None and checkpoint is None and not eval_only:
            init_report = format_init_report(cfg.model.init_weights,
                                             init_from_checkpoint(model, cfg.model.init_weights))
        optimizer, scheduler, ema = builders.build_optimization(cfg, model, info.world_size)  # EMA: after init
        train_loader, sampler = builders.build_train_loader(cfg, train_set, info)
        coco_gt = getattr(val_set, "coco", None) or load_coco_gt(val_set.ann_file)
        if info.rank == 0:  # everything is checked and built: only now are the run's own files rewritten
            if path is not None:
                truncate_jsonl(os.path.join(out_dir, "log.jsonl"), ckpt["iteration"],
                               drop_eval_at=ckpt["iteration"] if ckpt.get("eval_pending") else None)
            save_config(cfg, os.path.join(out_dir, "config.yaml"))
        trainer = Trainer(model=model, criterion=criterion, postprocessor=postprocessor, optimizer=optimizer,
                          scheduler=scheduler, ema=ema, train_loader=train_loader, train_sampler=sampler,
                          val_loader=builders.build_val_loader(cfg, val_set, info), coco_gt=coco_gt,
                          label_map=train_set.label_map, info=info, train=cfg.train, config=config,
                          start_iteration=ckpt["iteration"] if path is not None else None)
        trainer.log.info(threads)
        if init_report:
            trainer.log.info("%s", init_report)
        if note:
            trainer.log.info(note)
        trainer.report_warnings(caught)
        if stale:
            trainer.log.info("removed %d temporary file(s) of a checkpoint write that was killed: %s", len(stale),
                             ", ".join(stale))
        builders.seed_everything(cfg.train.seed + info.rank)  # dropout etc.: per rank, reproducible
        if resume == "auto" and path is None:
            trainer.log.info("--resume auto: no checkpoint in %s, starting from scratch", out_dir)
        if path is not None:
            trainer.restore(ckpt, source=path)
        elif checkpoint is not None:
            trainer.load_weights(ckpt, source=checkpoint)
        if eval_only:
            return trainer.evaluate(trainer.progress.epoch - 1)
        with signal_handlers(trainer.stop, (signal.SIGTERM,)):
            return trainer.fit()
    except TrainingInterrupted:  # a stop request: its checkpoint and message are made already
        raise
    except KeyboardInterrupt:
        message = trainer.interrupted_message() if trainer is not None else "interrupted before training started"
        raise TrainingInterrupted(message) from None
    finally:
        if trainer is not None:
            trainer.close()
        if lock is not None:
            lock.release()
        dist.cleanup()


def evaluate_checkpoint(cfg: Config, checkpoint: str, *, use_ema: bool = False,
                        detections_path: Optional[str] = None) -> dict:
    """COCO metrics of a checkpoint on the config's val set (what `tools/eval.py` runs); also under torchrun.

    use_ema: evaluate the checkpoint's EMA weights instead of the raw ones. Returns the metrics on every rank.
    """
    builders.setup_threads(cfg)
    info = dist.init_from_env(cfg.train.device, cfg.train.collective_timeout_s)
    try:
        # The checkpoint against the config first (inference.py: the same short report in every tool), then data.
        ckpt = load_checkpoint(checkpoint)
        check_config_compatible(ckpt.get("config"), to_dict(cfg), checkpoint)
        val_set = builders.build_split(cfg, "val")
        model, _, postprocessor = builders.build_model_and_criterion(cfg, info.device)
        trained = LabelMap.from_dict(ckpt["label_map"]) if ckpt.get("label_map") else None
        if trained is not None and trained != val_set.label_map:
            raise ValueError(f"{checkpoint} was trained with another label map ({trained!r}) than {val_set.ann_file} "
                             f"gives ({val_set.label_map!r}): the predicted labels would be mapped to the wrong "
                             f"category ids (check data.label_mapping)")
        load_weights(model, checkpoint_weights(ckpt, checkpoint, use_ema), checkpoint)
        coco_gt = getattr(val_set, "coco", None) or load_coco_gt(val_set.ann_file)
        metrics = evaluate(model, postprocessor, builders.build_val_loader(cfg, val_set, info), info.device,
                           val_set.label_map, coco_gt, detections_path=detections_path)
        return dist.all_gather_object(metrics)[0]
    finally:
        dist.cleanup()
