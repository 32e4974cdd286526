"""Write the backbone network of a checkpoint of ours as weights for `model.pretrained_backbone`.

    python tools/extract_backbone.py outputs/pretrain/checkpoint_last.pth weights/backbone.pt
    python tools/train.py --config CONFIG model.pretrained_backbone=weights/backbone.pt

OUT must not exist. The file holds the network's own state dict (e.g. the tiny CNN's), read with weights_only.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, installed or not

from sparse_detr.engine.cli import run_tool  # noqa: E402
from sparse_detr.engine.studies.convert import extract_backbone  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint of ours (.pth)")
    parser.add_argument("output", help="the backbone weights to write (must not exist)")
    args = parser.parse_args(argv)
    print(f"wrote {args.output}: {extract_backbone(args.checkpoint, args.output)} tensors")


if __name__ == "__main__":
    sys.exit(run_tool(main))
