"""Markdown tables of benchmark records (`sparse_detr.engine.studies.benchmark`): what tools/benchmark.py prints."""

from __future__ import annotations

from sparse_detr.engine.studies.benchmark import PARTS

__all__ = ["format_markdown"]

nan = float("nan")  # a measurement not done yet (partial tables of a running benchmark)


def _g(x: float) -> str:
    return f"{x:.1f}" if abs(x) >= 10 else f"{x:.3g}"  # tiny test models still show their digits


def format_markdown(records: list[dict]) -> str:
    """Two markdown tables: cost with ratios to the first row, and the per-part GFLOPs split."""
    bs = sorted(int(k[6:]) for k in records[0] if k.startswith("fps_bs"))
    train = "train_step_s" in records[0]
    head = ["config", "ρ", "params (M)", "GFLOPs torch", "GFLOPs official", "× base", "official w/o op"]
    head += [f"FPS bs{b}" for b in bs] + [f"× base bs{b}" for b in bs]
    head += ["train s/iter", "train peak MB"] if train else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        ra = r["ratios"]
        row = [r["name"], f"{r['rho']:g}", f"{r['params'] / 1e6:.1f}", _g(r["gflops"]), _g(r["gflops_official"]),
               f"{ra['gflops_official']:.3f}", _g(r["gflops_official_without_op"])]
        row += [f"{r.get(f'fps_bs{b}', nan):.3g}" for b in bs] + [f"{ra.get(f'fps_bs{b}', float('nan')):.2f}" for b in bs]
        row += [f"{r.get('train_step_s', nan):.2f}", f"{r.get('train_peak_mem_mb', nan):.0f}"] if train else []
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "GFLOPs per part (official convention, 1 multiply-add = 1 FLOP; torch convention = 2×), "
              "with the ratio to the baseline:", "",
              "| config | tokens | kept | " + " | ".join(PARTS) + " | total |", "|" + "---|" * (len(PARTS) + 4)]
    for r in records:
        po, ra = r["gflops_parts_official"], r["ratios"]
        cells = [f"{_g(po[p])} ({ra[f'{p}_gflops']:.2f}×)" if f"{p}_gflops" in ra else _g(po[p])
                 for p in PARTS]
        kept = "all" if r["kept_tokens"] is None else f"{r['kept_tokens']:.0f}"
        lines.append(f"| {r['name']} | {r['tokens']} | {kept} | " + " | ".join(cells)
                     + f" | {_g(r['gflops_official'])} |")
    return "\n".join(lines) + "\n"
