"""The training loop: `Trainer` runs the epochs of one process (or one torchrun/DDP rank), saves and restores
its exact state, evaluates and logs. `train.run` builds it and calls `Trainer.fit()`.

One iteration: forward (bf16 autocast on GPU if asked) → unweighted losses → `weighted_total` → the loss terms
averaged over processes (one all-reduce of a stacked vector) → backward → gradient clipping → ONE host sync that
reads the averaged terms and the gradient norm → optimizer step only if all of them are finite → EMA update.
A non-finite value (a loss term, the gradient norm, or a matching cost the matcher refuses) stops the run with
`NonFiniteLossError` (global step, every term, the batch's image ids on every rank, an "error" record in
log.jsonl) before the weights change and before anything is saved: the last checkpoint stays the last good one.

At the end of an epoch the checkpoint is saved BEFORE evaluating (a failing evaluation, e.g. an unreadable val
image, keeps the epoch; the resumed run evaluates it again). Epochs and batches are numbered from 1 in every log
and message; the checkpoint's `epoch` counts finished epochs.

Resume is exact: the checkpoint stores the epoch, the batches done in it and every rank's RNG states; the data
order and augmentation are functions of (seed, epoch, index) (see builders.py), so the resumed run skips the
done batches and then computes the same losses as an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from sparse_detr.config import TrainConfig
from sparse_detr.data import LabelMap, batch_image_sizes
from sparse_detr.engine.training import builders
from sparse_detr.engine import dist
from sparse_detr.engine.checkpoint import (BEST, LAST, check_config_compatible, get_rng_state, save_checkpoint,
                                           set_rng_state)
from sparse_detr.engine.training.evaluate import evaluate
from sparse_detr.engine.inference.loading import load_weights
from sparse_detr.engine.metrics import AP_UNIT, AP_UNIT_KEY, metrics_in_percent
from sparse_detr.engine.logging import (JsonlLog, MeterGroup, TensorboardLog, format_eta, peak_memory_mb,
                                        release_free_memory, resident_memory_mb, setup_text_logger)
from sparse_detr.engine.inference.visualize import visualize_image
from sparse_detr.engine.training.optim import (checkpoint_optimizer_state, optimizer_param_names, ordered_parameters,
                                               restore_scheduler, scheduler_state)
from sparse_detr.box_ops import box_cxcywh_to_xyxy
from sparse_detr.errors import UserError
from sparse_detr.models.criterion import check_finite, weighted_total
from sparse_detr.models.instruments import format_instruments, selection_instruments

__all__ = ["NonFiniteLossError", "EvaluationError", "TrainingInterrupted", "StopRequest", "TrainState", "Trainer"]

MAIN_TERMS = ("loss_ce", "loss_bbox", "loss_giou", "loss_mask")  # shown in the progress line (all go to the logs)
INSTRUMENT_PREFIX = "stat_sel_"  # the selection instruments of a log step (models/instruments.py)


class NonFiniteLossError(UserError, FloatingPointError):
    """A loss term, the gradient norm or a matching cost became NaN/inf; the message says where and on which
    images."""


class EvaluationError(UserError, RuntimeError):
    """The evaluation after an epoch failed on bad input (e.g. an unreadable image); the epoch's checkpoint is kept."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: the message says where the run stopped; the tools add the command that resumes it."""

    resumable = True
    exit_code = 130  # the shell's convention for SIGINT; SIGTERM: 143



class StopRequest:
    """Set by SIGTERM (what torchrun, schedulers and `kill` send): the loop finishes its step, saves a checkpoint at
    that exact iteration on every rank's agreement (the flag travels in the step's all-reduce), then stops."""

    def __init__(self) -> None:
        self.signal: Optional[str] = None

    def __call__(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name


@dataclass
class TrainState:
    epoch: int = 0  # the epoch to run next / in progress (0-based)
    step_in_epoch: int = 0  # batches of `epoch` already trained
    iteration: int = 0  # optimizer steps done in total (the global step)
    best_ap: float = -1.0
    metrics: dict = field(default_factory=dict)
    last_checkpoint: Optional[str] = None
    eval_pending: bool = False  # the last checkpoint was saved before its epoch's evaluation ran


def _float_tensors(tree: Any) -> list[torch.Tensor]:
    """Every floating-point tensor in a nested dict/list of outputs."""
    if isinstance(tree, torch.Tensor):
        return [tree] if tree.is_floating_point() else []
    if isinstance(tree, dict):
        tree = list(tree.values())
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in _float_tensors(v)]
    return []


def _to_float32(tree: Any) -> Any:
    """bf16 outputs → float32, so that the losses (and the matcher's costs) are computed in full precision."""
    if isinstance(tree, torch.Tensor):
        return tree.float() if tree.is_floating_point() else tree
    if isinstance(tree, dict):
        return {k: _to_float32(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to_float32(v) for v in tree)
    return tree


class Trainer:
    def __init__(self, *, model, criterion, postprocessor, optimizer, scheduler, ema, train_loader, train_sampler,
                 val_loader, coco_gt, label_map, info: dist.DistInfo, train: TrainConfig,
                 config: dict, start_iteration: Optional[int] = None) -> None:
        """train: the config's `train` section (epochs, logging, checkpoints, clipping, amp), read as it is.
        start_iteration: the global step of the checkpoint a resumed run starts from (its TensorBoard
        events after that step are hidden, see logging.py)."""
        self.model, self.criterion, self.postprocessor = model, criterion, postprocessor
        self.optimizer, self.scheduler, self.ema = optimizer, scheduler, ema
        self.train_loader, self.train_sampler, self.val_loader = train_loader, train_sampler, val_loader
        self.coco_gt, self.label_map, self.info, self.train_cfg, self.config = coco_gt, label_map, info, train, config
        self.device = info.device
        # find_unused_parameters only where the model says a step leaves parameters unused (builders.py);
        # tests/test_gradients.py checks that every shipped config family trains every parameter.
        self.net = builders.wrap_distributed(model, self.device, info.distributed)
        self.params = ordered_parameters(model)  # the clipping's summation order: optim.LEGACY_ORDER
        # The batch size of the loader, or of its batch sampler (data.group_by_aspect_ratio).
        self.batch_size = train_loader.batch_size or train_loader.batch_sampler.batch_size
        full = train_sampler.samples_per_epoch // self.batch_size
        self.iters_per_epoch = min(full, train.max_iters_per_epoch) if train.max_iters_per_epoch > 0 else full
        self.use_bf16 = train.amp == "bf16" and self.device.type == "cuda"
        self.progress = TrainState()
        self.stop = StopRequest()
        self._loss_names: Optional[list[str]] = None  # of the last good step (for a matcher failure's report)
        main = info.rank == 0
        self.log = setup_text_logger(train.output_dir if main else None, main)
        self.jsonl = JsonlLog(os.path.join(train.output_dir, "log.jsonl") if main else None)
        self.tb = TensorboardLog(os.path.join(train.output_dir, "tensorboard") if main else None,
                                 purge_step=None if start_iteration is None else start_iteration + 1)
        if train.amp == "bf16" and not self.use_bf16:
            self.log.warning("train.amp=bf16 is only used on CUDA; training in float32 on %s", self.device)

    # ---------------------------------------------------------------------------------------------- state
    def checkpoint_state(self) -> dict:
        """The checkpoint dict. Collective: every rank contributes its RNG state."""
        p = self.progress
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "optimizer_param_names": optimizer_param_names(self.optimizer, self.model),
            "lr_scheduler": scheduler_state(self.scheduler), "scaler": None,  # bf16 autocast needs no GradScaler
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "epoch": p.epoch, "step_in_epoch": p.step_in_epoch, "iteration": p.iteration,
            "rng": dist.all_gather_object(get_rng_state()), "config": self.config,
            "label_map": self.label_map.to_dict(), "best_ap": p.best_ap, "metrics": p.metrics,
            "eval_pending": p.eval_pending,
        }

    def save(self, names: tuple[str, ...] = (LAST,)) -> None:
        state = self.checkpoint_state()
        if self.info.rank == 0:
            for name in names:
                path = os.path.join(self.train_cfg.output_dir, name)
                save_checkpoint(path, state)
                p = self.progress
                # 1-based, as the text log: saved after batch `batch` of epoch `epoch`.
                epoch, batch = (p.epoch + 1, p.step_in_epoch) if p.step_in_epoch else (p.epoch, self.iters_per_epoch)
                self.jsonl.write("checkpoint", path=path, epoch=epoch, batch=batch, iteration=p.iteration)
            self.progress.last_checkpoint = os.path.join(self.train_cfg.output_dir, names[0])

    def load_weights(self, ckpt: dict, source: str) -> None:
        """Model (and EMA) weights only: `--checkpoint` for evaluation or to start training from them."""
        check_config_compatible(ckpt.get("config"), self.config, source)
        load_weights(self.model, ckpt["model"], source)  # inference.py: a short report when they do not fit
        if self.ema is not None and ckpt.get("ema") is not None:
            self.ema.load_state_dict(ckpt["ema"])
        if ckpt.get("label_map") and LabelMap.from_dict(ckpt["label_map"]) != self.label_map:
            self.log.warning("%s was trained with another label map (%r) than this dataset's (%r); labels may not "
                             "match", source, LabelMap.from_dict(ckpt["label_map"]), self.label_map)

    def restore(self, ckpt: dict, source: str) -> None:
        """Everything, to continue at the saved iteration (`--resume`)."""
        self.load_weights(ckpt, source)
        fresh = [dict(g) for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(checkpoint_optimizer_state(ckpt, self.optimizer, self.model, source))
        for group, new in zip(self.optimizer.param_groups, fresh):
            # The config decides the hyper-parameters (lr scaled for this world size, weight decay); the
            # checkpoint only decides the state (moments) and, through restore_scheduler, the schedule position.
            group["initial_lr"], group["weight_decay"] = new["initial_lr"], new["weight_decay"]
        restore_scheduler(self.scheduler, ckpt["lr_scheduler"])
        p = self.progress
        p.epoch, p.step_in_epoch, p.iteration = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["iteration"]
        p.best_ap, p.metrics, p.last_checkpoint = ckpt.get("best_ap", -1.0), ckpt.get("metrics") or {}, source
        p.eval_pending = bool(ckpt.get("eval_pending", False))
        states = ckpt.get("rng") or []
        if len(states) == self.info.world_size:
            set_rng_state(states[self.info.rank])
        else:
            self.log.warning("%s was written by %d process(es), this run has %d: RNG states not restored, the "
                             "run continues but not bit-identically", source, len(states), self.info.world_size)
        where = (f"epoch {p.epoch + 1} after batch {p.step_in_epoch}" if p.step_in_epoch
                 else f"the end of epoch {p.epoch}")
        self.log.info("resumed from %s: %s (global step %d)%s", source, where, p.iteration,
                      "; its evaluation runs first" if p.eval_pending else "")
        self.jsonl.write("resume", path=source, iteration=p.iteration)

    # ---------------------------------------------------------------------------------------------- training
    def fit(self) -> dict:
        p, o = self.progress, self.train_cfg
        if p.eval_pending:  # resumed from a checkpoint saved just before an evaluation that did not finish
            self._evaluate_and_save(p.epoch - 1)
        if p.epoch >= o.epochs:
            self.log.info("already trained for %d epochs (train.epochs=%d): nothing to do", p.epoch, o.epochs)
            return p.metrics
        fit_start = time.perf_counter()
        self.log.info("training: %d epochs x %d iterations, %d process(es) x batch %d, %d trainable parameters",
                      o.epochs, self.iters_per_epoch, self.info.world_size, self.batch_size,
                      sum(t.numel() for t in self.params))
        for epoch in range(p.epoch, o.epochs):
            start = time.perf_counter()
            averages = self.train_one_epoch(epoch)
            self.scheduler.step()
            p.epoch, p.step_in_epoch = epoch + 1, 0
            p.eval_pending = o.eval_every_epochs > 0 and ((epoch + 1) % o.eval_every_epochs == 0
                                                          or epoch + 1 == o.epochs)
            self.save((LAST,))  # before the evaluation, which can fail: the epoch is never lost
            if p.eval_pending:
                self._evaluate_and_save(epoch)
            release_free_memory()  # the heap fragmentation of varying image sizes, not a leak (logging.py)
            self.jsonl.write("epoch", **{**averages, "epoch": epoch + 1, "iteration": p.iteration,
                                         "best_ap": p.best_ap, AP_UNIT_KEY: AP_UNIT,
                                         "time": time.perf_counter() - start,
                                         "resident_mb": resident_memory_mb()})
        self.log.info("%s", self.closing_summary(time.perf_counter() - fit_start))
        return p.metrics

    def closing_summary(self, seconds: float) -> str:
        """What the run reached and where it is (AP in %, as in every log line), and what to run next."""
        p, out = self.progress, self.train_cfg.output_dir
        # A log continued across the change of unit holds fractions in its older records.
        evals = [metrics_in_percent(e) for e in self.jsonl.read("eval") if isinstance(e.get("AP"), (int, float))]
        lines = [f"training done in {format_eta(seconds)}"]
        if evals:
            best = max(evals, key=lambda e: e["AP"])
            lines[0] += (f": best AP {best['AP']:.1f} (AP50 {best.get('AP50', 0.0):.1f}) after epoch "
                         f"{best['epoch']}, final AP {evals[-1]['AP']:.1f} after epoch {evals[-1]['epoch']}")
        best_ckpt = os.path.join(out, BEST if p.best_ap >= 0 else LAST)
        images = getattr(self.val_loader.dataset, "img_folder", None) or "VAL_IMAGES"  # the val split's folder
        lines += [f"  outputs in {out}: {os.path.basename(best_ckpt)}, {LAST}, log.txt, log.jsonl, tensorboard/",
                  "  next:",
                  f"    python tools/eval.py --checkpoint {best_ckpt}",
                  f"    python tools/predict.py --checkpoint {best_ckpt} --images {images} --out {out}/predict",
                  f"    python tools/visualize.py --checkpoint {best_ckpt} --images {images} --out {out}/vis",
                  f"    python tools/inspect_selection.py --checkpoint {best_ckpt} --images {images} --out "
                  f"{out}/inspect"]
        return "\n".join(lines)

    def _evaluate_and_save(self, epoch: int) -> None:
        """Evaluate after `epoch` (0-based), then save the metrics into checkpoint_last (and _best if improved)."""
        p = self.progress
        kept = (f"The epoch's checkpoint {p.last_checkpoint} was kept; relaunch with --resume auto to evaluate it "
                f"again (or train.eval_every_epochs=0 to train without evaluating).")
        try:
            metrics = self.evaluate(epoch)
        except UserError as e:
            raise EvaluationError(f"evaluation after epoch {epoch + 1} failed: {e}\n{kept}") from e
        except Exception as e:
            e.add_note(f"(in the evaluation after epoch {epoch + 1}) {kept}")
            raise
        ap = metrics.get("ema", metrics).get("AP", -1.0)  # the EMA weights are what one deploys
        improved = ap > p.best_ap
        p.metrics, p.best_ap, p.eval_pending = metrics, max(p.best_ap, ap), False
        self.save((LAST, BEST) if improved else (LAST,))

    def interrupted_message(self) -> str:
        p = self.progress
        kept = (f"the last checkpoint is {p.last_checkpoint}" if p.last_checkpoint
                else "no checkpoint had been written yet")
        return (f"interrupted in epoch {p.epoch + 1} after batch {p.step_in_epoch} (global step {p.iteration}); "
                f"{kept}")

    def report_warnings(self, caught: list) -> None:
        """Warnings raised while building the datasets (e.g. dropped or clipped boxes), into log.txt and log.jsonl
        too, not only to stderr."""
        for w in caught:
            self.log.warning("%s: %s", w.category.__name__, w.message)
            self.jsonl.write("warning", category=w.category.__name__, message=str(w.message))

    def close(self) -> None:
        self.tb.close()
        self.jsonl.close()

    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        p, o, n = self.progress, self.train_cfg, self.iters_per_epoch
        first = p.step_in_epoch
        self.train_sampler.set_epoch(epoch, skip=first * self.batch_size)
        self.net.train()
        self.criterion.train()
        meters = MeterGroup(window=o.log_every)
        tick = time.perf_counter()
        for step, (images, mask, targets) in enumerate(itertools.islice(self.train_loader, max(0, n - first)),
                                                       first):
            data_time = time.perf_counter() - tick
            log_step = (step + 1) % o.log_every == 0 or step + 1 == n
            values = self.train_step(epoch, step, images, mask, targets, instrument=log_step)
            instruments = {k: values.pop(k) for k in [k for k in values if k.startswith(INSTRUMENT_PREFIX)]}
            stop = values.pop("stop", 0.0)
            p.iteration += 1
            p.step_in_epoch = step + 1
            iter_time = time.perf_counter() - tick
            meters.update(iter_time=iter_time, data_time=data_time, **values)
            self.jsonl.write("iter", epoch=epoch + 1, batch=step + 1, iteration=p.iteration, data_time=data_time,
                             time=iter_time, **values, **instruments)
            if log_step:
                self._log_progress(epoch, step, meters, instruments)
            if stop > 0:  # some rank got SIGTERM: every rank saves this step and stops
                self._stop_at_this_step(epoch)
            if o.checkpoint_every_iters > 0 and p.iteration % o.checkpoint_every_iters == 0 and step + 1 < n:
                self.save((LAST,))  # the end-of-epoch save follows anyway at the last step
            tick = time.perf_counter()
        return {k: v for k, v in meters.global_avgs().items() if k not in ("iter_time", "data_time")}

    def _stop_at_this_step(self, epoch: int) -> None:
        p = self.progress
        if p.step_in_epoch == self.iters_per_epoch:  # the epoch is complete: the end-of-epoch state
            self.scheduler.step()
            p.epoch, p.step_in_epoch = epoch + 1, 0
            p.eval_pending = self.train_cfg.eval_every_epochs > 0 and (
                (epoch + 1) % self.train_cfg.eval_every_epochs == 0 or epoch + 1 == self.train_cfg.epochs)
        self.save((LAST,))
        self.log.info("%s: saved %s at global step %d", self.stop.signal or "stop requested", p.last_checkpoint,
                      p.iteration)
        error = TrainingInterrupted(f"stopped by {self.stop.signal or 'a stop request'} after global step "
                                    f"{p.iteration}, saved in {p.last_checkpoint}")
        error.exit_code = 143 if self.stop.signal == "SIGTERM" else 130
        raise error

    def train_step(self, epoch: int, step: int, images, mask, targets, instrument: bool = False,
                   ) -> dict[str, float]:
        """One optimizer step; returns the averaged terms, the gradient norm, the learning rates and, with
        ``instrument``, the selection instruments of this process's batch (``stat_sel_*``, finite ones only)."""
        # Host ints read from the CPU targets before the copy: the model bounds its kept-token count k with them
        # (k is a tensor dimension) instead of the padded size, without reading anything back from the GPU.
        sizes = batch_image_sizes(targets)
        images = images.to(self.device, non_blocking=True)
        mask = mask.to(self.device, non_blocking=True)
        targets = [{k: v.to(self.device, non_blocking=True) for k, v in t.items()} for t in targets]
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.use_bf16 else contextlib.nullcontext()
        with autocast:
            outputs = self.net(images, mask, image_sizes=sizes, return_maps=instrument)
        outputs = _to_float32(outputs)
        failure = None
        try:
            losses = self.criterion(outputs, targets)
        except FloatingPointError as e:  # the matcher refuses NaN/inf costs (non-finite predictions)
            if self._loss_names is None:  # the very first step: no names for a report shared with other ranks
                self._raise_non_finite(epoch, step, {}, {}, targets, failure=str(e), collective=False)
            failure = str(e)
            # NaN terms of the usual names, and a backward pass through every output, so that the collectives
            # below (loss all-reduce, DDP's gradient all-reduce) still match the other ranks'; then one report.
            losses = {k: torch.full((), math.nan, device=self.device) for k in self._loss_names}
            total = 0.0 * sum(t.sum() for t in _float_tensors(outputs) if t.requires_grad)
        else:
            total = weighted_total(losses, self.criterion.weight_dict)
        names = ["loss"] + sorted(losses)
        local = torch.stack([total.detach().reshape(())] + [losses[k].detach().float().reshape(())
                                                            for k in names[1:]]
                            + [total.new_full((), float(self.stop.signal is not None))])  # SIGTERM on this rank
        if failure is not None:
            local[0] = math.nan
        # before backward: every rank logs (and checks) the same numbers
        reduced = dist.all_reduce_mean(local, "the training step's loss terms")
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        max_norm = self.train_cfg.clip_max_norm if self.train_cfg.clip_max_norm > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        host = torch.cat([reduced, grad_norm.detach().reshape(1).float().to(reduced.device)]).tolist()  # the sync
        values = dict(zip(names + ["stop", "grad_norm"], host))
        stop = values.pop("stop")
        if not all(math.isfinite(v) for k, v in values.items() if not k.startswith("stat_")):
            self._raise_non_finite(epoch, step, values, dict(zip(names, local[:-1].tolist())), targets,
                                   failure=failure)
        self._loss_names = names[1:]
        if instrument:  # this process's batch only: no collective, so a rank can never wait on another's keys
            measured = selection_instruments(outputs, targets).compute()
            values.update({INSTRUMENT_PREFIX + k: v for k, v in measured.items() if math.isfinite(v)})
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        for group in self.optimizer.param_groups:
            name = group.get("name", "default")
            values["lr" if name == "default" else f"lr_{name}"] = group["lr"]
        if stop > 0:
            values["stop"] = stop
        return values

    def _raise_non_finite(self, epoch: int, step: int, values: dict, local: dict, targets,
                          failure: Optional[str] = None, collective: bool = True) -> None:
        ids = [int(t["image_id"]) for t in targets]
        mine = {"ids": ids, "bad": {k: v for k, v in local.items() if not math.isfinite(v)}, "failure": failure}
        everyone = dist.all_gather_object(mine) if collective else [mine]
        failed = [(r, e["failure"]) for r, e in enumerate(everyone) if e["failure"]]
        if failed:
            named = "; ".join(f"on rank {r}: {msg}" if len(everyone) > 1 else msg for r, msg in failed)
        else:
            try:
                check_finite({k: torch.tensor(v) for k, v in values.items() if not k.startswith("stat_")})
                named = "the gradient norm is non-finite"
            except FloatingPointError as e:
                named = str(e)
        p = self.progress
        terms = ", ".join(f"{k}={v:.6g}" for k, v in values.items()) or "not computed (the matcher failed first)"
        ranks = "\n".join(f"  rank {r}: image ids {e['ids']}; non-finite local terms: {e['bad'] or 'none'}"
                          for r, e in enumerate(everyone))
        kept = (f"the last good checkpoint {p.last_checkpoint} was kept" if p.last_checkpoint
                else "no checkpoint had been written yet")
        msg = (f"non-finite loss at global step {p.iteration + 1} (epoch {epoch + 1}, batch {step + 1}); {named}.\n"
               f"All terms (mean over processes): {terms}\n{ranks}\n"
               f"The optimizer step was not taken and nothing was saved; {kept}.")
        self.jsonl.write("error", epoch=epoch + 1, batch=step + 1, iteration=p.iteration + 1, message=msg)
        raise NonFiniteLossError(msg)

    def _log_progress(self, epoch: int, step: int, meters: MeterGroup, instruments: dict[str, float]) -> None:
        p, o, n = self.progress, self.train_cfg, self.iters_per_epoch
        sec = meters["iter_time"].avg
        left_epoch = (n - step - 1) * sec
        left_total = left_epoch + (o.epochs - epoch - 1) * n * sec
        terms = "  ".join(f"{k} {meters[k].median:.4f} ({meters[k].global_avg:.4f})"
                          for k in ("loss",) + MAIN_TERMS if k in meters)
        peak = peak_memory_mb(self.device)  # CUDA: peak allocated; CPU: peak resident, shown with the current one
        mem = f"{peak:.0f}MB" if self.device.type == "cuda" else f"{resident_memory_mb():.0f}MB (peak {peak:.0f}MB)"
        self.log.info("epoch [%d/%d] [%*d/%d]  %s  lr %.2e  grad_norm %.2f  %.2f it/s  data %.3fs  "
                      "eta epoch %s total %s  mem %s", epoch + 1, o.epochs, len(str(n)), step + 1, n, terms,
                      meters["lr"].last, meters["grad_norm"].median, 1.0 / max(sec, 1e-9),
                      meters["data_time"].avg, format_eta(left_epoch), format_eta(left_total), mem)
        cov = instruments.get(INSTRUMENT_PREFIX + "dam_coverage")
        if cov is not None:
            self.log.info("  selection: DAM coverage %.1f%% (oracle %.1f%%, random %.1f%%)  object coverage %.1f%%",
                          100 * cov, 100 * instruments.get(INSTRUMENT_PREFIX + "dam_oracle", math.nan),
                          100 * instruments.get(INSTRUMENT_PREFIX + "dam_random", math.nan),
                          100 * instruments.get(INSTRUMENT_PREFIX + "object_coverage", math.nan))
        self.tb.scalars("train", {k: m.avg for k, m in meters.meters.items()}, p.iteration)
        self.tb.scalars("train_selection", {k[len(INSTRUMENT_PREFIX):]: v for k, v in instruments.items()},
                        p.iteration)

    # ---------------------------------------------------------------------------------------------- evaluation
    def evaluate(self, epoch: int) -> dict:
        """COCO metrics of the model (and of the EMA weights under "ema"); the same dict on every rank."""
        det_path = os.path.join(self.train_cfg.output_dir, "detections_val.json")
        # Forked RNG: val loading in the main process (num_workers=0) must not move the training RNG, or the
        # runs with and without workers would train differently after the first evaluation.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            metrics = evaluate(self.model, self.postprocessor, self.val_loader, self.device, self.label_map,
                               self.coco_gt, detections_path=det_path)
            if self.ema is not None:
                metrics["ema"] = evaluate(self.ema.module, self.postprocessor, self.val_loader, self.device,
                                          self.label_map, self.coco_gt)
        metrics = dist.all_gather_object(metrics)[0]  # only rank 0 computed them
        self.log.info("epoch %d evaluation: %s", epoch + 1, "  ".join(
            f"{k} {v:.1f}" for k, v in metrics.items() if isinstance(v, float)))
        if metrics.get("selection"):
            self.log.info("%s", format_instruments(metrics["selection"]))
        self.jsonl.write("eval", epoch=epoch + 1, iteration=self.progress.iteration, **metrics)
        for prefix, m in (("val", metrics), ("val_ema", metrics.get("ema", {}))):
            self.tb.scalars(prefix, {k: v for k, v in m.items() if isinstance(v, float)}, self.progress.iteration)
            self.tb.scalars(prefix + "_per_class", m.get("per_class", {}), self.progress.iteration)
            self.tb.scalars(prefix + "_selection", m.get("selection", {}), self.progress.iteration)
        if self.train_cfg.vis_num_images > 0 and self.tb.writer is not None:
            self._log_images(self.ema.module if self.ema is not None else self.model)
        self.tb.flush()
        return metrics

    @torch.no_grad()
    def _log_images(self, model: torch.nn.Module) -> None:
        """The first `vis_num_images` val images as `visualize.py` panels (detections with the ground truth,
        scorer saliency, kept tokens, selector target), to TensorBoard. Main process only."""
        dataset = self.val_loader.dataset
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            for i in range(min(self.train_cfg.vis_num_images, len(dataset))):
                image, target = dataset[i]
                h, w = (int(v) for v in target["size"])
                gt = {"boxes": box_cxcywh_to_xyxy(target["boxes"]) * torch.tensor([w, h, w, h])}
                # A tensor is drawn as it is: the panels show the image exactly as the model saw it.
                picture = visualize_image(model, self.postprocessor, image, self.label_map, target=gt)
                pixels = torch.from_numpy(np.array(picture.convert("RGB"))).permute(2, 0, 1)  # a writable copy
                self.tb.image(f"val_panels/{int(target['image_id'])}", pixels, self.progress.iteration)
