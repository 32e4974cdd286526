"""How good is a checkpoint's token selection? Without retraining: for the same model and images, the selection
instruments (DAM coverage, object coverage, foreground precision) of its own kept tokens next to the DAM oracle,
random selection and the ground-truth centres at the same budget, and one picture per image (the decoder
attention map with the boxes, then each selection's kept tokens):

    python tools/inspect_selection.py --checkpoint outputs/demo_synthetic/checkpoint_best.pth \
        --images data/synthetic/val --ann-file data/synthetic/annotations/instances_val.json --out outputs/inspect

A dense checkpoint (ρ = 0) has no selection of its own: it is measured at --rho (default 0.1); a sparse one keeps
--rho instead of its trained ρ when given. `--config` and `key=value` overrides as in tools/visualize.py.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, installed or not

from sparse_detr.engine.cli import run_tool  # noqa: E402
from sparse_detr.engine.inference.inspect_selection import format_inspection, run_inspection  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--images", required=True, help="an image file or a folder of images")
    p.add_argument("--ann-file", help="COCO json of the images (by file name): adds object coverage and GT centres")
    p.add_argument("--rho", type=float, help="the keep ratio to measure at (default: the model's; dense: 0.1)")
    p.add_argument("--out", default="outputs/inspect_selection", help="folder of the pictures and report.json")
    p.add_argument("--max-images", type=int, default=0, help="0 = every image of the folder")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--config", help="YAML config (default: the one stored in the checkpoint)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = p.parse_intermixed_args(argv)
    if args.rho is not None and not 0 < args.rho <= 1:
        p.error(f"--rho must lie in (0, 1], got {args.rho}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    report = run_inspection(args.checkpoint, args.images, args.out, args.ann_file, args.rho, args.config,
                            args.overrides, args.device, args.max_images)
    print(format_inspection(report))
    path = Path(args.out) / "report.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{len(report['written'])} picture(s) and report.json in {args.out}")
    return report


if __name__ == "__main__":
    sys.exit(run_tool(main))  # a user mistake: its message alone (--debug: traceback)
