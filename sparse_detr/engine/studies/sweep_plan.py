"""A sweep's plan: one `RunSpec` per (token-selection target, ρ, seed), the overrides that make its config, and
the state of its folder (`folder_status`: finished, to resume, new), with the check that a finished run was made
with the config planned now. `lengthen_from` seeds a longer sweep with the finished runs of a shorter one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

from sparse_detr.config import load_config, to_dict
from sparse_detr.engine.studies.sweep_records import RESULT, load_record

__all__ = ["RunSpec", "SweepOptions", "DENSE", "PRETRAIN", "plan_runs", "backbone_path", "run_overrides",
           "pretrain_overrides", "folder_status", "run_status", "lengthen_from", "ConfigChangedError"]

DENSE = "dense"
PRETRAIN = "pretrain"  # OUT/pretrain: the shared backbone pretraining stage
BACKBONE = "backbone.pt"  # its extracted backbone network, in OUT/pretrain


class ConfigChangedError(RuntimeError):
    """A finished run folder was made with another resolved config than the one planned now."""


@dataclass(frozen=True)
class RunSpec:
    target: str  # "dense", a model.scorer_target value, or a variant's label
    rho: float
    seed: int
    criterion: str = ""  # a variant's model.scorer_target ("" = target)
    extra: tuple[str, ...] = ()  # a variant's own overrides

    @property
    def name(self) -> str:
        point = DENSE if self.target == DENSE else f"{self.target}_rho{self.rho:g}"
        return f"{point}_seed{self.seed}"

    def overrides(self) -> list[str]:
        """The config overrides of this run (after the sweep-wide ones)."""
        out = [f"model.rho={self.rho:g}", f"train.seed={self.seed}"]
        if self.target == DENSE:  # aux heads score the kept tokens; a dense encoder has no selection to train
            return out + ["model.scorer_target=dam", "model.use_enc_aux_loss=false"]
        return out + [f"model.scorer_target={self.criterion or self.target}", *self.extra]


@dataclass
class SweepOptions:
    base: str  # the config every run starts from
    out: str
    overrides: Sequence[str] = ()  # key=value for every run
    train: bool = True  # False: the cost only (no folders, no skipping)
    jobs: int = 1  # runs in parallel worker processes (each single-threaded)
    bench_hw: Optional[tuple[int, int]] = None  # benchmark input (H, W); None: (data.val_size, data.max_size)
    bench_runs: int = 5  # timed batch-1 forwards (median)
    pretrain: Optional[str] = None  # config of a shared backbone pretraining stage (train only); None: none
    command: str = ""  # shown in results.md
    lengthen: Optional[str] = None  # a finished sweep's folder: its runs continue here on the longer schedule
    extra: dict = field(default_factory=dict)  # test hooks: e.g. {"bench_images": 1}


def plan_runs(targets: Sequence[str], rhos: Sequence[float], seeds: Sequence[int], dense: bool) -> list[RunSpec]:
    """Dense (one per seed) first, then every target at its ρ values, seeds innermost.

    A target is a `model.scorer_target` value, run at every ρ of `rhos`, or `name@ρ1,ρ2,...` for its own list
    (e.g. `dam@0.1,0.2,0.3,0.5 os random` with rhos [0.1]: one sweep for the whole ablation), or a variant
    `label:criterion:key=value,key=value` (e.g. `dam_aligned:dam:model.dam_alignment=aligned`), a criterion
    with its own overrides under its own name."""
    runs = [RunSpec(DENSE, 0.0, s) for s in seeds] if dense else []
    for item in targets:
        criterion, extra = "", ()
        if ":" in item:
            item, criterion, settings = (item.split(":", 2) + [""])[:3]
            extra = tuple(v for v in settings.split(",") if v)
            if not criterion or any("=" not in v for v in extra):
                raise ValueError(f"variant {item!r}: expected label:criterion:key=value,... "
                                 f"(e.g. dam_aligned:dam:model.dam_alignment=aligned)")
        name, _, own = item.partition("@")
        try:
            points = [float(v) for v in own.split(",")] if own else list(rhos)
        except ValueError:
            raise ValueError(f"target {item!r}: expected name or name@rho1,rho2,... (e.g. dam@0.1,0.2)") from None
        if name == DENSE:
            raise ValueError("'dense' is not a scorer target; use --dense for the dense baseline")
        if not points:
            raise ValueError(f"target {name!r} has no ρ: give --rho or {name}@rho1,rho2,...")
        if any(not 0 < r <= 1 for r in points):
            raise ValueError(f"target {name!r}: ρ must be in (0, 1] (the dense baseline is --dense), got {points}")
        runs += [RunSpec(name, r, s, criterion, extra) for r in points for s in seeds]
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"the sweep repeats a run: {sorted({n for n in names if names.count(n) > 1})}")
    return runs


def backbone_path(opts: SweepOptions) -> str:
    return os.path.join(opts.out, PRETRAIN, BACKBONE)


def run_overrides(spec: RunSpec, opts: SweepOptions) -> list[str]:
    out = list(opts.overrides) + spec.overrides()
    if opts.train:
        out.append(f"train.output_dir={os.path.join(opts.out, spec.name)}")
        if opts.pretrain:
            out.append(f"model.pretrained_backbone={backbone_path(opts)}")
    return out


def pretrain_overrides(opts: SweepOptions) -> list[str]:
    return [f"train.output_dir={os.path.join(opts.out, PRETRAIN)}"]


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in tree.items():
        flat.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return flat


UNCOMPARED = ("train.output_dir", "train.num_threads")  # where and how fast a run ran, not what it computed


def _config_diff(saved: dict, planned: dict) -> list[str]:
    """Keys whose values differ, `UNCOMPARED` left out (the same folder may be spelled differently)."""
    a, b = _flatten(saved), _flatten(planned)
    return sorted(k for k in set(a) | set(b)
                  if k not in UNCOMPARED and a.get(k, "<missing>") != b.get(k, "<missing>")
                  and not (k not in a and b[k] is None))  # an optional field added since, left off


def folder_status(folder: str, planned_config) -> tuple[str, Optional[dict]]:
    """("done", record) | ("resume", None) | ("new", None) for a run folder whose run must have `planned_config`."""
    path = os.path.join(folder, RESULT)
    if os.path.isfile(path):
        record = load_record(path)
        changed = _config_diff(record.get("resolved_config", {}), to_dict(planned_config))
        if changed:
            raise ConfigChangedError(f"{folder} was trained with another config (differs at {', '.join(changed)}); "
                                     f"use another --out, or move that folder away to retrain it")
        return "done", record
    if os.path.isfile(os.path.join(folder, "checkpoint_last.pth")):
        return "resume", None
    return "new", None


# What may differ between a run and the shorter run it continues (`SweepOptions.lengthen`): the total epochs, and
# the backbone file that only initialised the shorter run (a copy of the same pretraining, under the new folder).
# The lr drops may differ after the shorter run's last epoch (`_later_drops_only`): a drop added there ends the
# longer schedule at a lower lr, and the continued run equals that schedule run from scratch.
LENGTHENED = ("train.epochs", "model.pretrained_backbone")


def _later_drops_only(saved: dict, planned: dict) -> bool:
    """True when the planned lr drops equal the saved run's among the epochs it trained (drops after epoch e lower
    the lr of epochs e, e + 1, ...; the trained ones are 0 .. epochs − 1)."""
    done = saved["train"]["epochs"]
    return ([e for e in saved["train"]["lr_drop_epochs"] if e < done]
            == [e for e in planned["train"]["lr_drop_epochs"] if e < done])


def lengthen_from(runs: Sequence[RunSpec], opts: SweepOptions) -> list[str]:
    """Seed OUT/<run> with the finished run of the same name in `opts.lengthen` (and OUT/pretrain with its
    pretraining) so that the sweep resumes each up to this sweep's `train.epochs`; returns the runs seeded.

    Only run folders that do not exist yet are seeded, and only from finished runs that still have their last
    checkpoint (a committed record alone is trained anew) and whose resolved config differs from the planned one in
    `LENGTHENED` alone (and lr drops after its end), with no more epochs than planned: any other difference raises
    ConfigChangedError before anything is written. Checkpoints are hard links (the trainer replaces them by atomic
    rename, never in place, so the shorter run's files stay as they are), logs and TensorBoard events copies (they
    are appended to); `result.json` stays behind. The continued run equals the longer schedule run from scratch,
    an added drop included (tests/test_train.py: the lr drops are read from the config at resume)."""
    if not opts.lengthen or not opts.train:
        return []
    seeds = []
    for spec in runs:
        source, folder = os.path.join(opts.lengthen, spec.name), os.path.join(opts.out, spec.name)
        if os.path.exists(folder) or not os.path.isfile(os.path.join(source, RESULT)) \
                or not os.path.isfile(os.path.join(source, "checkpoint_last.pth")):
            continue  # nothing to continue from (e.g. a committed record without its checkpoints): trained anew
        saved = load_record(os.path.join(source, RESULT)).get("resolved_config", {})
        planned = to_dict(load_config(opts.base, run_overrides(spec, opts)))
        changed = [k for k in _config_diff(saved, planned) if k not in LENGTHENED
                   and not (k == "train.lr_drop_epochs" and _later_drops_only(saved, planned))]
        if changed:
            raise ConfigChangedError(f"{source} cannot be lengthened into {folder}: it differs at {', '.join(changed)}"
                                     f" (only {', '.join(LENGTHENED)} may, and lr drops after its last epoch)")
        if saved.get("train", {}).get("epochs", 0) > planned["train"]["epochs"]:
            raise ConfigChangedError(f"{source} cannot be lengthened into {folder}: it has {saved['train']['epochs']} "
                                     f"epochs, more than the {planned['train']['epochs']} planned")
        seeds.append((spec.name, source, folder))
    pretrain = os.path.join(opts.lengthen, PRETRAIN)
    if seeds and opts.pretrain and not os.path.exists(os.path.join(opts.out, PRETRAIN)) \
            and os.path.isfile(os.path.join(pretrain, RESULT)):
        _seed_folder(pretrain, os.path.join(opts.out, PRETRAIN), keep_result=True)
    for _, source, folder in seeds:
        _seed_folder(source, folder)
    return [name for name, _, _ in seeds]


def _seed_folder(source: str, folder: str, keep_result: bool = False) -> None:
    import shutil

    os.makedirs(folder)
    for name in sorted(os.listdir(source)):
        src, dst = os.path.join(source, name), os.path.join(folder, name)
        if name == ".lock" or (name == RESULT and not keep_result):
            continue
        if os.path.isdir(src):
            shutil.copytree(src, dst)
        elif name.endswith((".pth", ".pt")):
            try:
                os.link(src, dst)
            except OSError:  # another file system
                shutil.copy2(src, dst)
        else:
            shutil.copy2(src, dst)


def run_status(spec: RunSpec, opts: SweepOptions) -> tuple[str, Optional[dict]]:
    """("done", record) | ("resume", None) | ("new", None) for one run folder."""
    return folder_status(os.path.join(opts.out, spec.name), load_config(opts.base, run_overrides(spec, opts)))
