"""Evaluate a checkpoint on the config's validation set: the 12 COCO numbers, per-class AP, detections json.

    python tools/eval.py --config configs/sparse_detr_r50_rho0.1.yaml --checkpoint outputs/rho0.1/checkpoint_best.pth
    python tools/eval.py --config configs/demo_synthetic.yaml --checkpoint outputs/demo/checkpoint_last.pth --ema
    torchrun --nproc_per_node=8 tools/eval.py --config configs/sparse_detr_r50_rho0.1.yaml \\
        --checkpoint outputs/rho0.1/checkpoint_best.pth data.root=/data/coco

An official checkpoint can be passed as it is, with the matching config: its `model` entry is loaded strictly (the
R50 keys already are ours; the Swin-T backbone keys are converted on the fly, with a warning that says so;
tools/convert_official.py converts the file once):

    python tools/eval.py --config configs/sparse_detr_swin_t_rho0.1.yaml --checkpoint sparse_detr_swin_t_rho0.1.pth

`--config` is optional for our own checkpoints: they store their config. Given, its architecture must match the
checkpoint's (a short error lists the fields that differ, before any data is read); `key=value` arguments override
config fields as in tools/train.py. Detections are written in the COCO results format
(dataset category ids, xywh pixels) to --out (default: train.output_dir/detections_<checkpoint name>.json).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, installed or not

from sparse_detr.engine.cli import run_tool  # noqa: E402
from sparse_detr.engine.training.evaluate import format_metrics  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file (default: the one stored in the checkpoint)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint to evaluate")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument("--ema", action="store_true", help="evaluate the checkpoint's EMA weights")
    parser.add_argument("--out", help="detections json (default: next to the run's other outputs)")
    args = parser.parse_intermixed_args(argv)
    from sparse_detr.engine.checkpoint import load_checkpoint
    from sparse_detr.engine.inference.loading import resolve_config

    # The weights come from the checkpoint: no pretrained-backbone file is needed.
    overrides = list(args.overrides) + ["model.pretrained_backbone=null"]
    cfg = resolve_config(load_checkpoint(args.checkpoint), args.checkpoint, args.config, overrides)
    out = args.out or os.path.join(cfg.train.output_dir,
                                   f"detections_{Path(args.checkpoint).stem}{'_ema' if args.ema else ''}.json")
    from sparse_detr.engine.training.train import evaluate_checkpoint

    metrics = evaluate_checkpoint(cfg, args.checkpoint, use_ema=args.ema, detections_path=out)
    if int(os.environ.get("RANK", "0")) == 0:  # torchrun: print once (the process group is gone by now)
        print(format_metrics(metrics))
        print(f"\ndetections: {out}")


if __name__ == "__main__":
    sys.exit(run_tool(main))  # a user mistake: its message alone (--debug: traceback)
