"""Convert an official Sparse DETR checkpoint (R50 or Swin-T) into one of ours, checked strictly against a config.

    python tools/convert_official.py sparse_detr_swin_t_rho0.1.pth weights/sparse_detr_swin_t_rho0.1_ours.pth \\
        --config configs/sparse_detr_swin_t_rho0.1.yaml
    python tools/eval.py --config configs/sparse_detr_swin_t_rho0.1.yaml \\
        --checkpoint weights/sparse_detr_swin_t_rho0.1_ours.pth

Only the official file's `model` entry is used. Swin-T backbone keys are renamed to ours (the R50 and
non-backbone keys already are ours); the result must fit the model built from CONFIG exactly, otherwise every
missing, unexpected and mis-shaped key is listed and nothing is written. OUT must not exist. `tools/eval.py` also
accepts the official file directly (it converts on the fly and says so); converting once saves that each time.
`key=value` arguments override config fields as in tools/train.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, installed or not

from sparse_detr.config import load_config  # noqa: E402
from sparse_detr.engine.cli import run_tool  # noqa: E402
from sparse_detr.errors import UserError  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="official checkpoint (.pth)")
    parser.add_argument("output", help="converted checkpoint to write (must not exist)")
    parser.add_argument("--config", required=True, help="YAML config of the model the checkpoint is for")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    from sparse_detr.engine.studies.convert import convert_official

    try:
        summary = convert_official(args.input, args.output, cfg, config_name=args.config)
    except (RuntimeError, OSError) as err:  # a mismatch (StateDictMismatch), OUT exists, IN unreadable
        raise UserError(str(err)) from err
    renamed = ", official Swin-T backbone keys renamed to ours" if summary["swin_renamed"] else ""
    print(f"wrote {args.output}: {summary['tensors']} tensors ({summary['elements']:,} elements){renamed}; loads "
          f"strictly into {args.config}")


if __name__ == "__main__":
    sys.exit(run_tool(main))  # a user mistake: its message alone, exit 3 (--debug: traceback)
