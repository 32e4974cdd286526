"""The keep-ratio ablation (paper Table 2 / Fig. 5): cost, and optionally accuracy, of Sparse DETR versus ρ.

For every ρ the base config is run with `model.rho=ρ`: the benchmark always (parameters, GFLOPs, FPS); with
`--train`, also training and evaluation through the engine's Python API (`sparse_detr.engine.train.run`), each ρ
in its own output folder `OUT/rho{ρ}`. Writes OUT/results.json (one record per ρ: the benchmark keys plus the
COCO metrics when trained), OUT/results.md and OUT/results.png (AP, GFLOPs and FPS against ρ).

    # cost only, on the CPU, 800x1333 inputs
    python tools/sweep.py --base configs/sparse_detr_r50_rho0.1.yaml --rho 0.1 0.2 0.3 0.4 0.5 --out outputs/sweep

    # the full ablation on the synthetic data, short schedule (AP on a toy set, cost at 800x1333)
    python tools/sweep.py --base configs/demo_synthetic.yaml --rho 0.1 0.3 0.5 --train --out outputs/sweep_demo \
        train.epochs=2

ρ = 0 is allowed (the dense encoder; the encoder aux heads are then switched off, as they need ρ > 0).
Trailing `key=value` arguments override the base config for every ρ (and reach training too).
"""

import argparse
import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sparse_detr.engine.cli import run_tool  # noqa: E402
from sparse_detr.config import load_config  # noqa: E402
from sparse_detr.engine.benchmark import BenchmarkOptions, add_ratios, benchmark_config, load_images  # noqa: E402
from tools.benchmark import format_markdown  # noqa: E402

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def rho_overrides(rho: float, base: str, overrides: list) -> list:
    """The overrides of one sweep point: model.rho, plus use_enc_aux_loss off at ρ = 0 (it needs ρ > 0)."""
    out = list(overrides) + [f"model.rho={rho}"]
    if rho == 0 and load_config(base, overrides).model.use_enc_aux_loss:
        out.append("model.use_enc_aux_loss=false")
    return out


def train_and_evaluate(base: str, overrides: list, output_dir: str) -> dict:
    """Train one sweep point with the engine (it evaluates at the end); returns the last COCO metrics."""
    from sparse_detr.engine.train import run

    cfg = load_config(base, overrides + [f"train.output_dir={output_dir}"])
    metrics = run(cfg, resume="auto")  # a re-run of the sweep continues where it stopped
    return {k: v for k, v in metrics.items() if k in METRICS}


def plot_sweep(records: list, path: str) -> None:
    """AP (if trained) and GFLOPs / FPS at batch 1 against ρ, as a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    rhos = [r["rho"] for r in records]
    trained = [r for r in records if r.get("AP") is not None]
    fig, axes = plt.subplots(1, 3 if trained else 2, figsize=(13 if trained else 9, 3.6))
    axes[0].plot(rhos, [r["gflops_official"] for r in records], "o-", label="with the op (ours)")
    axes[0].plot(rhos, [r["gflops_official_without_op"] for r in records], "s--", label="without the op")
    axes[0].set(xlabel="keep ratio ρ", ylabel="GFLOPs (1 MAC = 1 FLOP)", title="GFLOPs per image")
    axes[0].legend()
    for key, style in (("fps_bs1", "o-"), ("fps_bs4", "s--")):
        if key in records[0]:
            axes[1].plot(rhos, [r[key] for r in records], style, label=key.replace("fps_bs", "batch "))
    axes[1].set(xlabel="keep ratio ρ", ylabel="images / s", title=f"FPS ({records[0]['device']})")
    axes[1].legend()
    if trained:
        axes[2].plot([r["rho"] for r in trained], [100 * r["AP"] for r in trained], "o-")
        axes[2].set(xlabel="keep ratio ρ", ylabel="AP (%)", title="COCO box AP (%)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def results_markdown(records: list, command: str) -> str:
    lines = [f"# ρ sweep of `{records[0]['config']}`", "", f"Command: `{command}`", "", format_markdown(records)]
    trained = [r for r in records if r.get("AP") is not None or r.get("train_error")]
    if trained:
        lines += ["", "| ρ | " + " | ".join(METRICS) + " | output |", "|" + "---|" * (len(METRICS) + 2)]
        for r in trained:
            cells = [f"{100 * r[m]:.1f}" if isinstance(r.get(m), float) else "–" for m in METRICS]
            note = r.get("output_dir", "") + (f" (failed: {r['train_error']})" if r.get("train_error") else "")
            lines.append(f"| {r['rho']:g} | " + " | ".join(cells) + f" | {note} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--base", required=True, help="base config (e.g. configs/sparse_detr_r50_rho0.1.yaml)")
    p.add_argument("--rho", type=float, nargs="+", required=True, help="keep ratios; the first is the baseline")
    p.add_argument("--train", action="store_true", help="also train + evaluate every ρ")
    p.add_argument("--out", default="outputs/sweep")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--height", type=int, default=800)
    p.add_argument("--width", type=int, default=1333)
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 4], dest="batch_sizes")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("overrides", nargs="*", help="key=value overrides of the base config")
    return p.parse_args(argv)


def main(argv=None) -> list:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    images = load_images(args.images, args.height, args.width)
    records = []
    for rho in args.rho:
        overrides = rho_overrides(rho, args.base, args.overrides)
        options = BenchmarkOptions(device=args.device, batch_sizes=tuple(args.batch_sizes), num_images=args.images,
                                   height=args.height, width=args.width, timed_runs=args.runs, overrides=overrides)
        record = benchmark_config(args.base, images, options)
        record["name"] = f"rho{rho:g}"
        print(f"ρ={rho:g}: {record['gflops_official']:.1f} GFLOPs, {record['fps_bs1']:.2f} FPS", flush=True)
        if args.train:
            record["output_dir"] = os.path.join(args.out, f"rho{rho:g}")
            try:
                record.update(train_and_evaluate(args.base, overrides, record["output_dir"]))
                print(f"ρ={rho:g}: AP {100 * record.get('AP', float('nan')):.1f}", flush=True)
            except Exception as e:  # keep the other points; the failure is in the results
                traceback.print_exc()
                record["train_error"] = f"{type(e).__name__}: {e}"
        records.append(record)
        # Written after every point, so an interrupted sweep keeps what it measured.
        with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
            json.dump(add_ratios(records), f, indent=2)
    command = "python tools/sweep.py " + " ".join(sys.argv[1:] if argv is None else argv)
    with open(os.path.join(args.out, "results.md"), "w", encoding="utf-8") as f:
        f.write(results_markdown(records, command))
    plot_sweep(records, os.path.join(args.out, "results.png"))
    print(format_markdown(records))
    print(f"wrote {args.out}/results.json, results.md, results.png")
    return records


if __name__ == "__main__":
    sys.exit(run_tool(main))  # a user mistake: its message alone (--debug: traceback)
