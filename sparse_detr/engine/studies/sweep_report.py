"""The markdown tables of a sweep's records (`results_markdown`: `OUT/results.md` of the ablation runner): the
summary over seeds and every run (AP in percent, as in the records: engine/metrics.py), paired differences, rank
correlations of AP with the selection instruments, the schedule's convergence and the val-set instruments. The
numbers come from sweep_stats.py.
"""

from __future__ import annotations

from typing import Optional

from sparse_detr.config import ModelConfig
from sparse_detr.engine.studies.sweep_stats import (SELECTION_KEYS, convergence, mean_std, paired_differences,
                                                    rank_correlations, selection_rows, summarize)

__all__ = ["results_markdown", "paired_markdown", "correlation_markdown", "convergence_markdown",
           "selection_markdown"]


def _reference_targets() -> tuple[str, ...]:
    """The paired differences' references: the dense run and the default criterion (``ModelConfig``'s)."""
    return ("dense", ModelConfig.scorer_target)


def _ap(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.1f}"


def _pm(pair: tuple, scale: float = 1.0, digits: int = 1) -> str:
    mean, std = pair
    if mean is None:
        return "–"
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}" if std else f"{scale * mean:.{digits}f}"


def _num(value: Optional[float], digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}g}"


def _seconds(value: Optional[float]) -> str:
    """Whole seconds from 100 on, one decimal below (not 1.099e+04 for a 3-hour run)."""
    return "–" if value is None else f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def _head(*columns: str) -> list[str]:
    """A markdown table's header and delimiter lines (the same number of columns: a renderer drops a table whose
    delimiter row does not match its header)."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def results_markdown(records: list[dict], command: str = "") -> str:
    if not records:
        return "# Ablation\n\nNo finished run yet.\n"
    hw = next((r["benchmark_hw"] for r in records if r.get("benchmark_hw")), None)
    lines = [f"# Ablation of `{records[0]['config']}`", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [f"AP values in %, mean ± sample standard deviation over seeds. GFLOPs at a {hw[0]}×{hw[1]} input "
              "(fvcore convention, 1 multiply-add = 1 FLOP); FPS on the CPU at batch 1." if hw else "", "",
              *_head("target", "ρ", "seeds", "AP", "AP50", "AP_s", "AP_m", "AP_l", "GFLOPs", "encoder GFLOPs",
                     "CPU FPS", "train min")]
    for row in summarize(records):
        lines.append(f"| {row['target']} | {row['rho']:g} | {' '.join(map(str, row['seeds']))} | "
                     + " | ".join(_pm(row[k]) for k in ("AP", "AP50", "AP_s", "AP_m", "AP_l"))
                     + f" | {_pm(row['gflops'], digits=3)} | {_pm(row['encoder_gflops'], digits=3)}"
                     f" | {_pm(row['cpu_fps'])} | {_pm(row['train_seconds'], 1 / 60)} |")
    lines += ["", "Every run:", "",
              *_head("run", "AP", "AP50", "AP75", "AP_s", "AP_m", "AP_l", "GFLOPs", "encoder GFLOPs", "kept / tokens",
                     "CPU FPS", "train s", "status")]
    for r in records:
        kept = "–" if r.get("tokens") is None else (
            f"all {r['tokens']}" if r.get("kept_tokens") is None else f"{r['kept_tokens']:.0f} / {r['tokens']}")
        status = r["status"] + (f": {r['error']}" if r.get("error") else "")
        lines.append(f"| {r['name']} | " + " | ".join(_ap(r.get(k)) for k in ("AP", "AP50", "AP75", "AP_s", "AP_m",
                                                                                  "AP_l"))
                     + f" | {_num(r.get('gflops'))} | {_num(r.get('encoder_gflops'))} | {kept}"
                     f" | {_num(r.get('cpu_fps'))} | {_seconds(r.get('train_seconds'))} | {status} |")
    return ("\n".join(lines) + "\n" + selection_markdown(records) + paired_markdown(records)
            + correlation_markdown(records) + convergence_markdown(records))


def paired_markdown(records: list[dict]) -> str:
    """Paired (same seed) AP differences of every target against dense and against dam: mean ± std, n, and the
    per-seed values."""
    targets = list(dict.fromkeys(r["target"] for r in records if r.get("status") == "done"))
    lines = []
    refs = [r for r in _reference_targets() if r in targets]
    for i, ref in enumerate(refs):
        for t in targets:
            if t == ref or t in refs[:i]:  # each pair once: dam − dense is among the rows against dense
                continue
            diffs = paired_differences(records, t, ref)
            if diffs:
                mean, std = mean_std(diffs)
                lines.append(f"| {t} − {ref} | {len(diffs)} | {mean:+.1f} ± {std:.1f} | "
                             + " ".join(f"{d:+.1f}" for d in diffs) + " |")
    if not lines:
        return ""
    return ("\nPaired AP differences (the same seed, in AP points; ± is the std of the differences):\n\n"
            "| pair | n | mean ± std | per seed |\n|---|---|---|---|\n" + "\n".join(lines) + "\n")


def correlation_markdown(records: list[dict]) -> str:
    """The rank-correlation table of ``rank_correlations`` (empty without instruments)."""
    rows = [r for r in rank_correlations(records) if r["n"]]
    if not rows:
        return ""
    lines = ["", "Rank correlation (Spearman) of final AP with each val instrument over the sparse runs (criteria and "
             "seeds pooled; it ranks the criteria more than it measures a mechanism):", "",
             "| instrument | n | Spearman ρ |", "|---|---|---|"]
    for r in rows:
        rho = "–" if r["rho"] is None else f"{r['rho']:+.2f}"
        lines.append(f"| {r['key']} | {r['n']} | {rho} |")
    return "\n".join(lines) + "\n"


def convergence_markdown(records: list[dict]) -> str:
    """The table of ``convergence`` (empty without evaluations during training)."""
    rows = convergence(records)
    if not rows:
        return ""
    lines = ["", "Schedule convergence over the last third of training (AP points): the trend of each run's "
             "evaluations (least-squares rise over that span) and their range (max − min, evaluation noise "
             "included), against the seed spread (std) of the final AP; converged when |mean trend| < spread. "
             "Extrapolated: AP = plateau − gap·exp(−t/τ) fitted to the evaluations of the second half (seeds "
             "pooled; plateau ± its standard error, 'not located' when τ exceeds twice the span of those points, "
             "which are then nearly straight), and the schedule from which that curve would rise less than the "
             "spread over the last third (a model-dependent estimate, not a measurement), shown only when "
             "these points support it over AP = a + b·ln t (Akaike); under the logarithmic curve AP rises by the "
             "same b·ln 1.5 over the last third of any schedule, and never converges:", "",
             *_head("target", "ρ", "n", "evaluations from", "trend per seed", "mean trend", "mean range",
                    "seed spread", "converged", "fitted plateau", "τ", "rise per last third if logarithmic",
                    "better fit", "converged from (fit)")]
    for r in rows:
        spread = "–" if r["spread"] is None else f"{r['spread']:.1f}"
        verdict = "–" if r["converged"] is None else ("yes" if r["converged"] else "no")
        fit = r["fit"]
        if fit is None:
            plateau, tau = "–", "–"
        elif not fit["located"]:  # nearly straight points: the plateau would be the fit's guess, not theirs
            plateau, tau = "not located", f"{fit['tau']:.0f}"
        else:
            plateau, tau = f"{fit['plateau']:.1f} ± {fit['plateau_se']:.1f}", f"{fit['tau']:.0f}"
        projected = "–" if r["projected"] is None else f"{r['projected']:.0f}"
        log_rise = "–" if r["log_rise"] is None else f"{r['log_rise']:+.1f}"
        lines.append(f"| {r['target']} | {r['rho']:g} | {r['n']} | {r['from_iteration']} | "
                     + " ".join(f"{t:+.1f}" for t in r["trends"])
                     + f" | {r['trend']:+.1f} | {r['range']:.1f} | {spread} | {verdict} | {plateau} | {tau} "
                     f"| {log_rise} | {r['better_fit'] or '–'} | {projected} |")
    return "\n".join(lines) + "\n"


def selection_markdown(records: list[dict]) -> str:
    """The val-set selection instruments (models/instruments.py) per (target, ρ), in %, mean ± std over seeds."""
    rows = selection_rows(records)
    if not rows:
        return ""
    lines = ["", "Selection instruments on the val split (%, mean ± std over seeds; DAM: the decoder attention map, "
             "aligned; a dense run's oracle and random at ρ = 0.1):", "",
             *_head("target", "ρ", "n", "DAM coverage", "oracle", "random", "efficiency", "50% mass on",
                    "90% mass on", "object coverage", "oracle obj.", "random obj.", "fg precision")]
    for row in rows:
        lines.append(f"| {row['target']} | {row['rho']:g} | {row['n']} | "
                     + " | ".join(_pm(row[k], 100) for k in SELECTION_KEYS) + " |")
    return "\n".join(lines) + "\n"
