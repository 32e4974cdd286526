"""The ablation runner: token-selection target × keep ratio ρ × seed, trained, evaluated and benchmarked.

Every run gets its own folder OUT/<target>_rho<ρ>_seed<s> (the dense baseline: OUT/dense_seed<s>). Rerunning the
same command skips finished runs and continues half-finished ones (`--resume auto`), so an interrupted sweep is
resumed by starting it again; a finished run made with another config is an error, never silently reused.
OUT/results.json holds one record per run (see sparse_detr/engine/studies/sweep_records.py), OUT/results.md the
tables (mean ± std over seeds, and every run) and OUT/results.png AP and AP50 against GFLOPs.

    # the synthetic ablation of docs/ablation.md (18 runs from one pretrained backbone): dense, DAM at 4 ρ, the
    # other criteria at ρ = 0.1
    python tools/sweep.py --base configs/ablation_synthetic.yaml --pretrain configs/ablation_pretrain.yaml \
        --dense --rho 0.1 --targets dam@0.1,0.2,0.3,0.5 os foreground salience random --seeds 0 1 --train \
        --jobs 2 --out docs/ablation

    # the selection study lengthened from 18 to 24 epochs: each finished run of docs/ablation_long continues from
    # its last checkpoint in docs/ablation_3600 (the same as training 24 epochs from scratch)
    python tools/sweep.py --base configs/ablation_long.yaml --pretrain configs/ablation_pretrain.yaml --dense \
        --rho 0.1 --targets dam random os salience --seeds 0 1 2 --train --jobs 2 --out docs/ablation_3600 \
        --lengthen docs/ablation_long train.epochs=24

    # the cost of ρ on COCO-sized inputs only (no training): GFLOPs / FPS at 800x1333
    python tools/sweep.py --base configs/sparse_detr_r50_rho0.1.yaml --rho 0.1 0.2 0.3 0.4 0.5 --dense \
        --out outputs/sweep_cost

The benchmark input defaults to the config's largest val image (data.val_size x data.max_size: 800x1333 for the
COCO configs); FPS is measured on the CPU at batch 1. `--jobs N` runs N runs at once in worker processes with one
CPU thread each (their console output goes to the run folder's console.txt). Trailing `key=value` arguments
override the base config for every run. `--pretrain CONFIG` trains CONFIG once (OUT/pretrain, all CPU threads,
skipped or resumed like a run) and starts every run from its backbone: the ImageNet stand-in of a synthetic study.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, installed or not

from sparse_detr.engine.cli import run_tool  # noqa: E402
from sparse_detr.config import ConfigError, ModelConfig  # noqa: E402
from sparse_detr.engine.studies.sweep import ConfigChangedError, SweepOptions, plan_runs, run_sweep  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--base", required=True, help="base config (e.g. configs/ablation_synthetic.yaml)")
    p.add_argument("--rho", type=float, nargs="*", default=[], help="keep ratios of the sparse runs, in (0, 1]")
    p.add_argument("--targets", nargs="*", default=[ModelConfig.scorer_target],
                   help="model.scorer_target values (the registered criteria), each run at every --rho; "
                        "NAME@R1,R2 gives one target its own keep ratios; LABEL:NAME:key=value,... a variant")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="train.seed of each repetition")
    p.add_argument("--dense", action="store_true", help="add the dense baseline (ρ = 0) for every seed")
    p.add_argument("--train", action="store_true", help="train + evaluate every run (else: cost only)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel, one CPU thread each")
    p.add_argument("--out", default="outputs/sweep")
    p.add_argument("--bench-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="benchmark input (default: data.val_size x data.max_size of the config)")
    p.add_argument("--pretrain", default=None, metavar="CONFIG",
                   help="train CONFIG once into OUT/pretrain and start every run from its backbone (with --train)")
    p.add_argument("--lengthen", default=None, metavar="FOLDER",
                   help="a finished sweep's --out: each of its runs continues in --out to this sweep's train.epochs "
                        "(from its last checkpoint; only train.epochs may differ, and lr drops after its end), "
                        "instead of training from scratch")
    p.add_argument("--bench-runs", type=int, default=5, help="timed batch-1 forwards per run (median)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the base config")
    args = p.parse_intermixed_args(argv)
    # `--targets dam os model.x=1`: the list option swallows trailing overrides; give them back.
    args.overrides += [t for t in args.targets if "=" in t and ":" not in t]  # a variant label:criterion:k=v stays
    args.targets = [t for t in args.targets if "=" not in t or ":" in t]
    if not args.dense and not (args.rho or any("@" in t for t in args.targets)):
        p.error("nothing to run: give --rho values (or NAME@R1,R2 targets) and/or --dense")
    return args


def main(argv=None) -> list:
    args = parse_args(argv)
    targets = args.targets if args.rho or any("@" in t for t in args.targets) else []
    try:
        runs = plan_runs(targets, args.rho, args.seeds, args.dense)
    except ValueError as e:
        sys.exit(f"tools/sweep.py: {e}")
    command = "python tools/sweep.py " + " ".join(sys.argv[1:] if argv is None else argv)
    opts = SweepOptions(base=args.base, out=args.out, overrides=tuple(args.overrides), train=args.train,
                        jobs=args.jobs, bench_hw=tuple(args.bench_size) if args.bench_size else None,
                        bench_runs=args.bench_runs, pretrain=args.pretrain, command=command,
                        lengthen=args.lengthen)
    try:
        records = run_sweep(runs, opts, log=lambda m: print(m, flush=True))
    except (ConfigError, ConfigChangedError) as e:  # before anything trains (or reuses a run)
        sys.exit(f"tools/sweep.py: {e}")
    print(f"wrote {args.out}/results.json, results.md, results.png")
    if any(r["status"] == "failed" for r in records):
        sys.exit(1)
    return records


if __name__ == "__main__":
    sys.exit(run_tool(main))  # a user mistake: its message alone (--debug: traceback)
