"""Export a checkpoint's whole inference graph to ONNX and check the file with onnxruntime against PyTorch.

    pip install -e .[export] --no-build-isolation -c constraints.txt      # onnx, onnxruntime, onnxscript
    python tools/export_onnx.py --checkpoint outputs/demo_synthetic/checkpoint_best.pth --out demo.onnx \\
        --height 256 --width 320
    python tools/export_onnx.py --checkpoint outputs/rho0.1/checkpoint_best.pth --out r50.onnx --dynamic

The graph: normalisation → backbone → token selection → sparse encoder → decoder → top-100 postprocess. Input
`images` (B, 3, H, W) float RGB in [0, 1]; outputs `boxes` (B, 100, 4) xyxy in input pixels, `scores` (B, 100),
`labels` (B, 100) int64 (the model's labels; the checkpoint's label map names them). Resize and pad like the
evaluation yourself (shorter side data.val_size, longer at most data.max_size). Without --dynamic the file takes only
(--batch, 3, --height, --width); with it any batch and any size from --min-size to --max-size (default H x W: the
config's data.val_size square).

--config is optional (the checkpoint stores its config); given, it must match the checkpoint's architecture.
After the export the file is run with onnxruntime on random images (at the export size, and with --dynamic at a
second size and batch) and compared with PyTorch: the largest difference of the sorted scores and of the top-10
boxes (pixels) is printed; --time N also prints the median latency of both over N runs.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, installed or not

import torch  # noqa: E402

from sparse_detr.engine.inference.export import (DeployModel, compare_onnx, describe_graph, export_onnx,  # noqa: E402
                                       onnx_session, run_onnx, time_inference, within_tolerance)
from sparse_detr.engine.cli import run_tool  # noqa: E402
from sparse_detr.engine.inference.loading import load_for_inference  # noqa: E402
from sparse_detr.errors import UserError  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (default: the one stored in the checkpoint)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--height", type=int, help="input height (default: data.val_size)")
    p.add_argument("--width", type=int, help="input width (default: data.val_size)")
    p.add_argument("--batch", type=int, default=1, help="batch size of a static export (default 1)")
    p.add_argument("--dynamic", action="store_true", help="symbolic batch, height and width")
    p.add_argument("--min-size", type=int, default=128, help="--dynamic: smallest height/width (default 128)")
    p.add_argument("--max-size", type=int, default=4096, help="--dynamic: largest height/width (default 4096)")
    p.add_argument("--ema", action="store_true", help="export the checkpoint's EMA weights")
    p.add_argument("--no-optimize", dest="optimize", action="store_false",
                   help="skip the onnxscript graph optimizer: about half the export time, a graph with more nodes "
                        "(onnxruntime optimises it again when it loads the file)")
    p.add_argument("--time", type=int, default=0, metavar="N", help="also time onnxruntime and PyTorch (N runs)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime/PyTorch threads for --time (0 = default)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = p.parse_args(argv)
    for name in ("height", "width", "batch", "min_size", "max_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive number, got {value}")
    if args.min_size > args.max_size:
        p.error(f"--min-size {args.min_size} is larger than --max-size {args.max_size}")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if os.path.exists(args.out) and not args.force:
        raise UserError(f"{args.out} exists: pass --force to overwrite it")
    loaded = load_for_inference(args.checkpoint, args.config, args.overrides, use_ema=args.ema)
    height = args.height or loaded.cfg.data.val_size
    width = args.width or loaded.cfg.data.val_size
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    export_onnx(loaded.model, args.out, height, width, batch=args.batch, dynamic=args.dynamic,
                min_size=args.min_size, max_size=args.max_size, optimize=args.optimize)
    ops = describe_graph(args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB, {sum(ops.values())} nodes, "
          f"{ops.get('GridSample', 0)} GridSample)")

    gen = torch.Generator().manual_seed(1)
    inputs = [torch.rand(args.batch, 3, height, width, generator=gen)]
    if args.dynamic:  # a second batch size and image size through the same file
        inputs.append(torch.rand(args.batch + 1, 3, height + 32, max(args.min_size, width - 32), generator=gen))
    wrapper = DeployModel(loaded.model).eval()
    session = onnx_session(args.out, args.threads)
    report = compare_onnx(session, wrapper, inputs)
    for r in report:
        print(f"onnxruntime vs PyTorch at {r['shape']}: sorted scores max |diff| {r['score_diff']:.2e}, "
              f"top-10 boxes max |diff| {r['box_diff_px']:.2e} px, top-10 labels "
              f"{'equal' if r['labels_equal'] else 'DIFFER'}")
    print("match: within 1e-4 (scores) and 1e-2 px (boxes)" if within_tolerance(report) else
          "WARNING: onnxruntime and PyTorch differ by more than 1e-4 (scores) or 1e-2 px (boxes)")
    if args.time:
        if args.threads:
            torch.set_num_threads(args.threads)
        x = inputs[0][:1]
        with torch.no_grad():
            ms = time_inference({"PyTorch": wrapper, "onnxruntime": lambda images: run_onnx(session, images)}, x,
                                args.time)
        print(f"latency at batch 1, {height}x{width}, median of {args.time} (run in turns): PyTorch "
              f"{ms['PyTorch']:.1f} ms, onnxruntime {ms['onnxruntime']:.1f} ms (threads: {args.threads or 'default'})")
    return report


def _checked(argv=None) -> None:
    if not within_tolerance(main(argv)):
        raise SystemExit(1)  # the export ran, but onnxruntime disagrees with PyTorch (the table says where)


if __name__ == "__main__":
    sys.exit(run_tool(_checked))  # a user mistake: its message alone, exit 3 (--debug: traceback)
