"""Train (or evaluate) Sparse DETR / Deformable DETR from a config file.

Single process (one GPU, or the CPU):

    python tools/train.py --config configs/demo_synthetic.yaml
    python tools/train.py --config configs/sparse_detr_r50_rho0.1.yaml train.output_dir=outputs/rho0.1 \\
        data.root=/data/coco

One node, 8 GPUs (torchrun starts one process per GPU; train.batch_size is per process, 2 x 8 = the official 16):

    torchrun --nproc_per_node=8 tools/train.py --config configs/sparse_detr_r50_rho0.1.yaml \\
        train.output_dir=outputs/rho0.1 data.root=/data/coco

Several nodes (here 2 x 8 GPUs; run on every node, NODE_RANK 0 on the node whose address is MASTER_ADDR):

    torchrun --nnodes=2 --node_rank=$NODE_RANK --nproc_per_node=8 \\
        --master_addr=$MASTER_ADDR --master_port=29500 \\
        tools/train.py --config configs/sparse_detr_r50_rho0.1.yaml train.output_dir=outputs/rho0.1 \\
        train.lr_scaling=sqrt

Resume after an interruption (continues at the exact iteration of the last checkpoint in train.output_dir; starts
from scratch when there is none, so the same command works for the first launch and for every relaunch):

    torchrun --nproc_per_node=8 tools/train.py --config configs/sparse_detr_r50_rho0.1.yaml \\
        train.output_dir=outputs/rho0.1 --resume auto

Evaluate a checkpoint (see also tools/eval.py, which prints the per-class table and saves the detections):

    python tools/train.py --config configs/sparse_detr_r50_rho0.1.yaml --eval-only \\
        --checkpoint outputs/rho0.1/checkpoint_best.pth

`key=value` arguments override config fields (validated, e.g. `model.rho=0.2 train.epochs=12`). The output folder
receives config.yaml (the resolved config), log.txt, log.jsonl (per-iteration, per-epoch, evaluation and
checkpoint records), tensorboard/ (`tensorboard --logdir OUTPUT_DIR`), checkpoint_last.pth (every epoch and every
train.checkpoint_every_iters iterations), checkpoint_best.pth (best AP) and detections_val.json; `.lock` names the
run that owns the folder. A mistake in the command (a misspelled key, a missing file, a checkpoint of another
architecture) is printed as one message with exit code 3; Ctrl-C prints where the run stopped and the command that
resumes it (exit 130); SIGTERM (torchrun, a scheduler, `kill`) finishes the current step, saves a checkpoint of
it and prints the same (exit 143); `--debug` (or SPARSE_DETR_DEBUG=1) shows the traceback instead. A folder that
already holds a run is never trained over from scratch: continue it with `--resume auto`, or pass `--start-over`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, installed or not

from sparse_detr.engine.cli import run_tool  # noqa: E402
from sparse_detr.config import load_config  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.rho=0.2")
    parser.add_argument("--resume", metavar="auto|PATH",
                        help="continue a run: 'auto' = checkpoint_last.pth in train.output_dir if it exists")
    parser.add_argument("--eval-only", action="store_true", help="evaluate the loaded weights and exit")
    parser.add_argument("--checkpoint", metavar="PATH",
                        help="model weights to evaluate, or to start training from (optimizer state not loaded)")
    parser.add_argument("--start-over", action="store_true",
                        help="train from scratch into a train.output_dir that holds a run (its checkpoints are "
                             "overwritten; without this flag that is refused)")
    args = parser.parse_intermixed_args(argv)  # key=value may come before or after --flags
    if args.eval_only and not (args.checkpoint or args.resume):
        parser.error("--eval-only needs --checkpoint PATH (or --resume auto|PATH)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    from sparse_detr.engine.training.train import run  # after parsing: `--help` should not wait for torch to import

    run(cfg, resume=args.resume, eval_only=args.eval_only, checkpoint=args.checkpoint, start_over=args.start_over)


if __name__ == "__main__":
    sys.exit(run_tool(main))  # a user mistake: its message alone (--debug: traceback)
