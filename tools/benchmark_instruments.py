"""The cost of the selection instruments (models/instruments.py) against a training step, for one config.

The training loop computes them on log steps only (every `train.log_every` iterations): the forward keeps the
decoder's sampling (`return_maps=True`), then the DAM, its oracle and the box tests are computed without gradient.
This times a plain training step and the same step with the instruments, on one batch of random images with random
boxes (medians over --runs, in one process), and prints the overhead per step and per log interval:

    python tools/benchmark_instruments.py --config configs/ablation_long.yaml --runs 10
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, installed or not

import torch  # noqa: E402

from sparse_detr.config import load_config  # noqa: E402
from sparse_detr.engine.cli import run_tool  # noqa: E402
from sparse_detr.engine.timing import median_seconds  # noqa: E402
from sparse_detr.models import build_model, weighted_total  # noqa: E402
from sparse_detr.models.instruments import selection_instruments  # noqa: E402


def _batch(n: int, height: int, width: int, boxes: int, gen: torch.Generator):
    images = [torch.randn(3, height, width, generator=gen) for _ in range(n)]
    targets = []
    for _ in range(n):
        centre = torch.rand(boxes, 2, generator=gen) * 0.6 + 0.2
        size = torch.rand(boxes, 2, generator=gen) * 0.3 + 0.05
        targets.append({"labels": torch.randint(0, 6, (boxes,), generator=gen),
                        "boxes": torch.cat((centre, size), 1), "orig_size": torch.tensor([height, width])})
    return images, targets


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", default="configs/ablation_long.yaml")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--size", type=int, nargs=2, default=(224, 288), metavar=("H", "W"))
    p.add_argument("--boxes", type=int, default=6)
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = p.parse_args(argv)
    cfg = load_config(args.config, list(args.overrides) + ["model.pretrained_backbone=null"])
    torch.manual_seed(0)
    model, criterion, _ = build_model(cfg)
    model.train()
    images, targets = _batch(cfg.train.batch_size, *args.size, args.boxes, torch.Generator().manual_seed(0))

    def step(instrument: bool) -> None:
        out = model(images, return_maps=instrument)
        weighted_total(criterion(out, targets), criterion.weight_dict).backward()
        model.zero_grad(set_to_none=True)
        if instrument:
            selection_instruments(out, targets).compute()

    # interleaved rounds (engine.timing): a load change hits both alike
    seconds = median_seconds({"plain": lambda: step(False), "instrumented": lambda: step(True)}, args.runs)
    t_plain, t_instr = seconds["plain"], seconds["instrumented"]
    overhead = t_instr - t_plain
    per_interval = overhead / (cfg.train.log_every * t_plain)
    print(f"{args.config}: training step {1000 * t_plain:.1f} ms, with the instruments {1000 * t_instr:.1f} ms "
          f"(+{100 * overhead / t_plain:.1f}% on a log step); every {cfg.train.log_every} steps: "
          f"+{100 * per_interval:.2f}% of training time; {torch.get_num_threads()} thread(s), median of {args.runs}")
    return {"step_s": t_plain, "instrumented_step_s": t_instr, "overhead_per_interval": per_interval}


if __name__ == "__main__":
    sys.exit(run_tool(main))
