"""Draw what a trained model sees: detections, the scorer's saliency per level, kept tokens, the selector's target.

One PNG per image, the panels side by side (see sparse_detr/engine/inference/visualize.py for what each panel shows):

    python tools/visualize.py --config configs/sparse_detr_r50_rho0.1.yaml \
        --checkpoint outputs/sparse_rho0.1/checkpoint_best.pth --images data/coco/val2017 --max-images 8 \
        --out outputs/vis

`--images` takes a file or a folder. Images are resized by the config's evaluation transform (shorter side
data.val_size, longer at most data.max_size) unless --size / --max-size say otherwise. `--config` is optional: the
checkpoint stores its config (given, it must match the checkpoint's architecture). The checkpoint is read with
`torch.load(weights_only=True)`; the label map it stores names the classes. `key=value` arguments override the
config (e.g. `model.rho=0.2` to see what a model trained at ρ = 0.1 keeps at ρ = 0.2).
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, installed or not

from sparse_detr.engine.cli import run_tool  # noqa: E402
from sparse_detr.engine.inference.visualize import run_visualization  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", help="YAML config (default: the one stored in the checkpoint; given, it must match "
                                     "the checkpoint's architecture)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--images", required=True, help="an image file or a folder of images")
    p.add_argument("--out", default="outputs/vis", help="output folder (default: outputs/vis)")
    p.add_argument("--score-thresh", type=float, default=0.3, help="draw detections at or above this score")
    p.add_argument("--max-images", type=int, default=0, help="0 = every image of the folder")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--columns", type=int, default=4, help="panels per row")
    p.add_argument("--panel-width", type=int, default=400, help="width of each panel in pixels")
    p.add_argument("--size", type=int, help="resize: shorter image side (default: the config's data.val_size)")
    p.add_argument("--max-size", type=int, help="resize: longest image side at most (default: data.max_size)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p.parse_args(argv)


def main(argv=None) -> list:
    args = parse_args(argv)
    written = run_visualization(args.config, args.checkpoint, args.images, args.out, args.score_thresh,
                                args.device, tuple(args.overrides), args.max_images, args.columns,
                                args.panel_width, args.size, args.max_size)
    shown = ", ".join(os.path.basename(p) for p in written[:3]) + (", ..." if len(written) > 3 else "")
    print(f"wrote {len(written)} picture(s) to {args.out}: {shown}")
    return written


if __name__ == "__main__":
    sys.exit(run_tool(main))  # a user mistake: its message alone (--debug: traceback)
