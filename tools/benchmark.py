"""Compare the cost of several configs: parameters, GFLOPs (per part, two conventions), FPS, a training step.

Every config is built in this one process and measured on the same inputs; the first config is the baseline of
the ratio columns. Weights are random (the cost does not depend on them; Sparse DETR keeps floor(ρ·valid)+1
tokens whatever their scores).

The paper's comparison (Sparse DETR ρ = 0.1..0.5 against the dense "Efficient DETR" baseline), on the CPU:

    python tools/benchmark.py --configs configs/efficient_detr_r50.yaml configs/sparse_detr_r50_rho0.1.yaml \
        configs/sparse_detr_r50_rho0.5.yaml --device cpu --images 2 \
        --markdown outputs/benchmark.md --json outputs/benchmark.json

On a GPU add `--device cuda --train-step` (and `--autocast bfloat16` for mixed precision); `--coco data/coco` uses
the first val2017 images instead of random 800×1333 ones (resized as the val transform: shorter side --height, longer
side <= --width).
`key=value` arguments after the options override every config (e.g. `model.num_queries=100`).
See sparse_detr/engine/studies/benchmark.py for what each number means.
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, installed or not

from sparse_detr.engine.cli import run_tool  # noqa: E402
from sparse_detr.engine.studies.benchmark import BenchmarkOptions, benchmark_configs  # noqa: E402
from sparse_detr.engine.studies.benchmark_report import format_markdown  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--configs", nargs="+", required=True, help="config files; the first is the baseline")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 4], dest="batch_sizes",
                   help="batch sizes of the FPS measurement (default: 1 4)")
    p.add_argument("--images", type=int, default=2, help="images the GFLOPs are averaged over")
    p.add_argument("--height", type=int, default=800)
    p.add_argument("--width", type=int, default=1333)
    p.add_argument("--coco", default=None, help="folder of images (or COCO root with val2017/) instead of noise")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    p.add_argument("--runs", type=int, default=3, help="timed runs per batch size")
    p.add_argument("--train-step", action="store_true", help="also time forward+backward and its peak memory")
    p.add_argument("--train-runs", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--autocast", default=None, choices=("bfloat16", "float16"),
                   help="time FPS and the training step under torch.autocast in this dtype")
    p.add_argument("--json", default=None, help="write the per-config records here")
    p.add_argument("--markdown", default=None, help="write the tables here")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to every config")
    return p.parse_args(argv)


def main(argv=None) -> list:
    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    options = BenchmarkOptions(device=args.device, batch_sizes=tuple(args.batch_sizes), num_images=args.images,
                               height=args.height, width=args.width, coco_dir=args.coco, warmup=args.warmup,
                               timed_runs=args.runs, train_step=args.train_step, train_runs=args.train_runs,
                               autocast=args.autocast, overrides=tuple(args.overrides))
    # Outputs are rewritten after every config, so a long CPU run that fails late keeps what it measured.
    records = benchmark_configs(args.configs, options, log=lambda m: print(m, flush=True),
                                on_record=lambda recs: write_outputs(recs, args.json, args.markdown))
    print()
    print(format_markdown(records))
    for path in (args.markdown, args.json):
        if path:
            print(f"wrote {path}")
    return records


def write_outputs(records: list, json_path, markdown_path) -> None:
    for path, text in ((markdown_path, format_markdown(records)), (json_path, json.dumps(records, indent=2) + "\n")):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)


if __name__ == "__main__":
    sys.exit(run_tool(main))  # a user mistake: its message alone (--debug: traceback)
