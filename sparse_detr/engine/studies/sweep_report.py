"""Tables and the Pareto plot of the ablation runner's records (`sparse_detr.engine.studies.sweep`).

`summarize` groups the runs of one (target, ρ) over seeds (mean and sample standard deviation); `convergence`
compares the AP trend over the last third of training with the seed spread and extrapolates, by a saturating fit
(`saturation_fit`) checked against logarithmic growth (`log_fit`, `better_fit`), the schedule at which it would be
converged; `results_markdown` renders the summary and the per-run table (AP in percent, as in the records:
engine/metrics.py); `plot_pareto` draws AP and AP50 against GFLOPs, one marker per target with error bars over seeds
and the dense baseline as a horizontal reference line.
"""

from __future__ import annotations

import math
import statistics
from typing import Optional

from sparse_detr.config import ModelConfig
from sparse_detr.models.selection import SELECTORS

__all__ = ["summarize", "results_markdown", "plot_pareto", "selection_markdown", "plot_selection",
           "paired_differences", "paired_markdown", "rank_correlations", "correlation_markdown", "convergence",
           "convergence_markdown", "saturation_fit", "log_fit", "better_fit", "converged_schedule"]

MARKER_CYCLE = "os^DXv<>ph"  # by registration order of the criteria (selection.SELECTORS); "P" for other labels


def marker(target: str, other: str = "P") -> str:
    """The plot marker of a criterion: fixed by its place in the registry, so every report draws it alike."""
    names = list(SELECTORS)
    return MARKER_CYCLE[names.index(target) % len(MARKER_CYCLE)] if target in names else other


def _reference_targets() -> tuple[str, ...]:
    """The paired differences' references: the dense run and the default criterion (``ModelConfig``'s)."""
    return ("dense", ModelConfig.scorer_target)
SUMMARY_KEYS = ("AP", "AP50", "AP_s", "AP_m", "AP_l", "gflops", "encoder_gflops", "cpu_fps", "train_seconds")


def _mean_std(values: list) -> tuple[Optional[float], Optional[float]]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(records: list[dict]) -> list[dict]:
    """One row per (target, ρ) in first-seen order: `seeds`, and `{key: (mean, std)}` over its finished runs."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("status") in ("done", "cost"):
            groups.setdefault((r["target"], r["rho"]), []).append(r)
    return [{"target": t, "rho": rho, "seeds": sorted(r["seed"] for r in rs),
             **{k: _mean_std([r.get(k) for r in rs]) for k in SUMMARY_KEYS}} for (t, rho), rs in groups.items()]


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


def paired_differences(records: list[dict], a: str, b: str, key: str = "AP") -> list[float]:
    """``key`` of target ``a`` minus that of target ``b`` (at ρ = 0.1, or dense), paired by seed: the runs of one
    seed share the initialisation of every shared module and the data order, so the pair removes that noise."""
    def by_seed(target):
        return {r["seed"]: r.get(key) if key in METRIC_KEYS else (r.get("selection") or {}).get(key)
                for r in records if r.get("status") == "done" and r["target"] == target}

    first, second = by_seed(a), by_seed(b)
    return [first[s] - second[s] for s in sorted(set(first) & set(second))
            if first[s] is not None and second[s] is not None]


METRIC_KEYS = ("AP", "AP50", "AP75", "AP_s", "AP_m", "AP_l")


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
                mean, std = _mean_std(diffs)
                lines.append(f"| {t} − {ref} | {len(diffs)} | {mean:+.1f} ± {std:.1f} | "
                             + " ".join(f"{d:+.1f}" for d in diffs) + " |")
    if not lines:
        return ""
    return ("\nPaired AP differences (the same seed, in AP points; ± is the std of the differences):\n\n"
            "| pair | n | mean ± std | per seed |\n|---|---|---|---|\n" + "\n".join(lines) + "\n")


SELECTION_KEYS = ("dam_coverage", "dam_oracle", "dam_random", "dam_efficiency", "dam_tokens50", "dam_tokens90",
                  "object_coverage", "oracle_object_coverage", "random_object_coverage", "fg_precision")


def _selection_rows(records: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("status") == "done" and r.get("selection"):
            groups.setdefault((r["target"], r["rho"]), []).append(r)
    return [{"target": t, "rho": rho, "n": len(rs),
             **{k: _mean_std([r["selection"].get(k) for r in rs]) for k in SELECTION_KEYS}}
            for (t, rho), rs in groups.items()]


#: The instruments AP is ranked against (H2 of docs/ablation.md): what a selection covers, and where it lies.
CORRELATED = ("dam_coverage", "dam_efficiency", "object_coverage", "object_coverage_small", "fg_precision",
              "kept_share_l0", "kept_share_l1", "kept_share_l2", "kept_share_l3")


def _ranks(values: list[float]) -> list[float]:
    """Ranks 1..n, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def rank_correlations(records: list[dict], keys: tuple[str, ...] = CORRELATED) -> list[dict]:
    """Spearman's rank correlation of final AP with each instrument over the finished sparse runs (every criterion
    and seed pooled): {key, n, rho}; rho is None with fewer than 3 runs or a constant column."""
    runs = [r for r in records if r.get("status") == "done" and r.get("rho", 0) > 0 and r.get("AP") is not None]
    out = []
    for key in keys:
        pairs = [(r["AP"], r["selection"][key]) for r in runs
                 if isinstance(r.get("selection"), dict) and r["selection"].get(key) is not None]
        rho = None
        if len(pairs) >= 3:
            a, b = (_ranks([p[i] for p in pairs]) for i in (0, 1))
            rho = _pearson(a, b)
        out.append({"key": key, "n": len(pairs), "rho": rho})
    return out


def _pearson(a: list[float], b: list[float]) -> Optional[float]:
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    sa = sum((x - ma) ** 2 for x in a) ** 0.5
    sb = sum((y - mb) ** 2 for y in b) ** 0.5
    if sa == 0 or sb == 0:
        return None
    return sum((x - ma) * (y - mb) for x, y in zip(a, b)) / (sa * sb)


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


def _trend(points: list[tuple[float, float]]) -> float:
    """The least-squares line through (iteration, AP) points, as its rise from the first to the last iteration."""
    xs, ys = [x for x, _ in points], [y for _, y in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return 0.0 if sxx == 0 else sum((x - mx) * (y - my) for x, y in points) / sxx * (max(xs) - min(xs))


def convergence(records: list[dict], last: float = 1 / 3, fit_from: float = 0.5) -> list[dict]:
    """Has the schedule converged? Per (target, ρ) over its finished runs, each run's evaluations over the last third
    of training (iterations ≥ (1 − last) × its final iteration): their trend (the least-squares line's rise over
    that span: how far AP still moves) and range (max − min, which includes the evaluation noise), against the seed
    spread of the final AP (sample std). Converged: the mean trend moves AP less than the spread. `fit`: the
    saturating fit of the evaluations from `fit_from` × the final iteration on (after the usual lr drop);
    `log_fit` the logarithmic one of the same points and `log_rise` its rise over every last third; `better_fit`
    which of the two the points support (Akaike); `projected`: the schedule at which the saturating fit would be
    converged, only when the points prefer it (an extrapolation: model-dependent).
    {target, rho, n, from_iteration, trends, trend, ranges, range, spread, converged, fit, log_fit, log_rise,
    better_fit, projected}."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("status") == "done" and r.get("evals") and r.get("AP") is not None:
            groups.setdefault((r["target"], r["rho"]), []).append(r)
    rows = []
    for (target, rho), runs in groups.items():
        trends, ranges, start = [], [], None
        for r in sorted(runs, key=lambda r: r["seed"]):
            end = max(e["iteration"] for e in r["evals"])
            tail = [(e["iteration"], e["AP"]) for e in r["evals"]
                    if e["iteration"] >= (1 - last) * end - 1e-6 and e["AP"] is not None]
            if tail:
                start = min(x for x, _ in tail)
                trends.append(_trend(tail))
                ranges.append(max(y for _, y in tail) - min(y for _, y in tail))
        if not trends:
            continue
        spread = _mean_std([r["AP"] for r in runs])[1] if len(runs) > 1 else None
        trend = statistics.fmean(trends)
        late = [(e["iteration"], e["AP"]) for r in runs for e in r["evals"]
                if e["AP"] is not None and e["iteration"] >= fit_from * max(x["iteration"] for x in r["evals"])]
        fit, growth = saturation_fit(late), log_fit(late)
        preferred = better_fit(fit, growth)
        rows.append({"target": target, "rho": rho, "n": len(runs), "from_iteration": start, "trends": trends,
                     "trend": trend, "ranges": ranges, "range": statistics.fmean(ranges), "spread": spread,
                     "converged": None if spread is None else abs(trend) < spread, "fit": fit,
                     "log_fit": growth, "log_rise": None if growth is None else growth["b"] * math.log(1 / (1 - last)),
                     "better_fit": preferred,
                     "projected": None if fit is None or spread is None or preferred != "saturating"
                     else converged_schedule(fit, spread, last)})
    return rows


def saturation_fit(points: list[tuple[float, float]]) -> Optional[dict]:
    """Least-squares fit of AP(t) = plateau − gap·exp(−t / tau) to (iteration, AP) points (all seeds pooled): the
    usual shape of a curve at a constant learning rate. None with fewer than 4 distinct iterations or when the fit
    does not converge. {plateau, gap, tau, plateau_se}."""
    import numpy as np
    from scipy.optimize import curve_fit

    if len({x for x, _ in points}) < 4:
        return None
    t, y = np.array([x for x, _ in points], float), np.array([v for _, v in points], float)
    t0, scale = t.min(), max(t.max() - t.min(), 1.0)

    def model(x, plateau, gap, tau):
        return plateau - gap * np.exp(-(x - t0) / (tau * scale))

    try:
        (plateau, gap, tau), cov = curve_fit(model, t, y, p0=(y.max(), max(y.max() - y.min(), 1e-3), 0.5),
                                             bounds=([-np.inf, -np.inf, 1e-3], [np.inf, np.inf, 1e3]))
    except (RuntimeError, ValueError):
        return None
    se = float(np.sqrt(cov[0, 0])) if np.isfinite(cov[0, 0]) else math.inf
    rss = float(((model(t, plateau, gap, tau) - y) ** 2).sum())
    return {"plateau": float(plateau), "gap": float(gap), "tau": float(tau * scale), "t0": float(t0),
            "plateau_se": se, "rss": rss, "n": len(t)}


def log_fit(points: list[tuple[float, float]]) -> Optional[dict]:
    """Least-squares fit of AP(t) = a + b·ln t to (iteration, AP) points: growth that never saturates, under which
    the rise over the last fraction `last` of any schedule is the same, b·ln(1 / (1 − last)). The alternative the
    saturating fit is checked against. None with fewer than 3 distinct iterations. {a, b, rss, n}."""
    import numpy as np

    if len({x for x, _ in points}) < 3 or min(x for x, _ in points) <= 0:
        return None
    t, y = np.array([x for x, _ in points], float), np.array([v for _, v in points], float)
    design = np.stack([np.ones_like(t), np.log(t)], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, y, rcond=None)
    return {"a": float(a), "b": float(b), "rss": float(((design @ np.array([a, b]) - y) ** 2).sum()), "n": len(t)}


def better_fit(saturating: Optional[dict], logarithmic: Optional[dict]) -> Optional[str]:
    """Which curve the points support, by Akaike's criterion (n·ln(RSS/n) + 2k; k = 3 and 2 parameters): "saturating"
    or "log" when its AIC is lower by more than 2, "either" otherwise (the data cannot tell: a projected plateau
    is then not supported). None without both fits."""
    if saturating is None or logarithmic is None:
        return None
    aic = {name: f["n"] * math.log(max(f["rss"], 1e-12) / f["n"]) + 2 * k
           for name, f, k in (("saturating", saturating, 3), ("log", logarithmic, 2))}
    if abs(aic["saturating"] - aic["log"]) <= 2:
        return "either"
    return min(aic, key=aic.get)


def converged_schedule(fit: dict, spread: float, last: float = 1 / 3) -> Optional[float]:
    """The schedule T from which on the fitted curve rises less than `spread` across its last `last` fraction,
    rise(T) = gap·(exp(−((1 − last)T − t0)/tau) − exp(−(T − t0)/tau)). rise grows up to its peak at
    max(t0 / (1 − last), tau·ln(1 / (1 − last)) / last), then decays: bisection on that side. None for a
    non-rising fit (gap ≤ 0) or beyond 1000 tau."""
    gap, tau, t0 = fit["gap"], fit["tau"], fit["t0"]
    if gap <= 0:
        return None

    def rise(T: float) -> float:
        return gap * (math.exp(-max((1 - last) * T - t0, 0.0) / tau) - math.exp(-(T - t0) / tau))

    lo = max(t0 / (1 - last), tau * math.log(1 / (1 - last)) / last)
    hi = t0 + 1000 * tau
    if rise(lo) < spread:
        return lo
    if rise(hi) >= spread:
        return None
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rise(mid) >= spread else (lo, mid)
    return hi


def convergence_markdown(records: list[dict]) -> str:
    """The table of ``convergence`` (empty without evaluations during training)."""
    rows = convergence(records)
    if not rows:
        return ""
    lines = ["", "Schedule convergence over the last third of training (AP points): the trend of each run's "
             "evaluations (least-squares rise over that span) and their range (max − min, evaluation noise "
             "included), against the seed spread (std) of the final AP; converged when |mean trend| < spread. "
             "Extrapolated: AP = plateau − gap·exp(−t/τ) fitted to the evaluations of the second half (seeds "
             "pooled; plateau ± its standard error), and the schedule from which that curve would rise less than "
             "the spread over the last third (a model-dependent estimate, not a measurement), shown only when "
             "these points support it over AP = a + b·ln t (Akaike); under the logarithmic curve AP rises by the "
             "same b·ln 1.5 over the last third of any schedule, and never converges:", "",
             *_head("target", "ρ", "n", "evaluations from", "trend per seed", "mean trend", "mean range",
                    "seed spread", "converged", "fitted plateau", "τ", "rise per last third if logarithmic",
                    "better fit", "converged from (fit)")]
    for r in rows:
        spread = "–" if r["spread"] is None else f"{r['spread']:.1f}"
        verdict = "–" if r["converged"] is None else ("yes" if r["converged"] else "no")
        fit = r["fit"]
        plateau, tau = ("–", "–") if fit is None else (f"{fit['plateau']:.1f} ± {fit['plateau_se']:.1f}",
                                                       f"{fit['tau']:.0f}")
        projected = "–" if r["projected"] is None else f"{r['projected']:.0f}"
        log_rise = "–" if r["log_rise"] is None else f"{r['log_rise']:+.1f}"
        lines.append(f"| {r['target']} | {r['rho']:g} | {r['n']} | {r['from_iteration']} | "
                     + " ".join(f"{t:+.1f}" for t in r["trends"])
                     + f" | {r['trend']:+.1f} | {r['range']:.1f} | {spread} | {verdict} | {plateau} | {tau} "
                     f"| {log_rise} | {r['better_fit'] or '–'} | {projected} |")
    return "\n".join(lines) + "\n"


def selection_markdown(records: list[dict]) -> str:
    """The val-set selection instruments (models/instruments.py) per (target, ρ), in %, mean ± std over seeds."""
    rows = _selection_rows(records)
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


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def _band(ax, runs: list[tuple[list, list]], label: str, color=None, smooth: int = 1) -> None:
    """Mean over seeds of curves sampled at the same iterations, with a min–max band; ``smooth``: a moving mean
    over that many points of each curve first (a training log step measures one batch)."""
    import numpy as np

    common = sorted(set.intersection(*(set(x) for x, _ in runs))) if runs else []
    if not common:
        return
    ys = np.array([[dict(zip(x, y))[i] for i in common] for x, y in runs], dtype=float)
    if smooth > 1 and ys.shape[1] >= smooth:
        kernel = np.ones(smooth) / smooth
        ys = np.array([np.convolve(row, kernel, mode="valid") for row in ys])
        common = common[smooth - 1:]
    line, = ax.plot(common, np.nanmean(ys, 0), label=f"{label} (n={len(runs)})", color=color, lw=1.3)
    if len(runs) > 1:
        ax.fill_between(common, np.nanmin(ys, 0), np.nanmax(ys, 0), color=line.get_color(), alpha=0.15)


SMOOTH = 5  # log steps averaged in the training curves


def plot_selection(records: list[dict], path: str, title: str = "") -> None:
    """The instruments as a PNG: DAM coverage and object coverage against iterations (training log steps), AP
    against iterations (evaluations; the dense curve says whether the schedule converged), one line per target
    (mean, min–max band over seeds); and final AP against the val-set DAM and object coverage, a point per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    done = [r for r in records if r.get("status") == "done" and r.get("curves")]
    targets = list(dict.fromkeys(r["target"] for r in done))
    colors = {t: f"C{i}" for i, t in enumerate(targets)}
    fig, axes = plt.subplots(2, 3, figsize=(17, 9))
    panels = [(axes[0][0], "dam_coverage", "DAM coverage of the kept tokens (train batches)"),
              (axes[0][1], "object_coverage", "object coverage of the kept tokens (train batches)")]
    for ax, key, name in panels:
        for t in targets:
            runs = [(r["curves"]["iteration"], [v if v is not None else float("nan") for v in r["curves"][key]])
                    for r in done if r["target"] == t]
            if key == "dam_coverage" and t == "dense":  # no kept set: its DAM oracle at ρ = 0.1 instead
                runs = [(r["curves"]["iteration"], [v if v is not None else float("nan")
                                                    for v in r["curves"]["dam_oracle"]]) for r in done
                        if r["target"] == t]
                t_label = "dense: DAM oracle at ρ=0.1"
            else:
                t_label = t
            if any(any(v == v for v in y) for _, y in runs):
                _band(ax, runs, t_label, colors[t], smooth=SMOOTH)
        ax.set(xlabel="iteration", ylabel=f"fraction (moving mean of {SMOOTH} log steps)", title=name)
        ax.grid(alpha=0.3)
        _legend(ax)
    ax = axes[0][2]
    for t in targets:
        runs = [([e["iteration"] for e in r["evals"]], [(e["AP"] if e["AP"] is not None else float("nan"))
                                                        for e in r["evals"]]) for r in done if r["target"] == t]
        _band(ax, runs, t, colors[t])
    for row in convergence(done):  # the saturating fit of the second half, dashed over the span it was fitted to
        fit = row["fit"]
        if fit is not None and row["target"] in colors:
            end = max(e["iteration"] for r in done if r["target"] == row["target"] for e in r["evals"])
            xs = np.linspace(fit["t0"], end, 50)
            ax.plot(xs, fit["plateau"] - fit["gap"] * np.exp(-(xs - fit["t0"]) / fit["tau"]), ls="--", lw=0.9,
                    color=colors[row["target"]])
    ax.set(xlabel="iteration", ylabel="AP (%)",
           title="val AP (mean, min–max over seeds; dashed: fit)")
    ax.grid(alpha=0.3)
    _legend(ax)
    for ax, key, name in ((axes[1][0], "dam_coverage", "val DAM coverage"),
                          (axes[1][1], "object_coverage", "val object coverage")):
        for t in targets:
            pts = [(r["selection"].get(key), r["AP"]) for r in done if r["target"] == t
                   and r.get("selection") and r["selection"].get(key) is not None and r.get("AP") is not None]
            if pts:
                ax.scatter(*zip(*pts), label=t, color=colors[t], marker=marker(t), s=36)
        ax.set(xlabel=name, ylabel="AP (%)", title=f"AP against {name} (one point per run)")
        ax.grid(alpha=0.3)
        _legend(ax)
    ax = axes[1][2]
    rows = _selection_rows(done)
    names = [f"{r['target']}" for r in rows]
    x = range(len(rows))
    for offset, key, label in ((-0.27, "dam_random", "random"), (0.0, "dam_coverage", "kept"),
                               (0.27, "dam_oracle", "oracle")):
        vals = [100 * (r[key][0] if r[key][0] is not None else float("nan")) for r in rows]
        errs = [100 * (r[key][1] or 0.0) for r in rows]
        ax.bar([i + offset for i in x], vals, width=0.26, yerr=errs, capsize=2, label=label)
    ax.set_xticks(list(x), names, rotation=30, fontsize=8)
    ax.set(ylabel="DAM coverage (%)", title="val DAM coverage: random / kept / oracle at the same budget")
    _legend(ax)
    ax.grid(alpha=0.3, axis="y")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_pareto(records: list[dict], path: str, title: str = "") -> None:
    """AP and AP50 (%) against GFLOPs as a PNG: a marker per target (error bars: std over seeds, points of one
    target joined in ρ order and labelled with ρ; targets at one cost dodged sideways so that none hides
    another), the dense baseline as a line with its ±std band. `title`: the figure's (e.g. the data set)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    rows = summarize(records)
    trained = any(row["AP"][0] is not None for row in rows)
    metrics = ("AP", "AP50") if trained else ()
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(6.2 * max(1, len(metrics)), 4.4), squeeze=False)
    if not trained:  # a cost-only sweep: GFLOPs against ρ
        ax = axes[0][0]
        for target in dict.fromkeys(r["target"] for r in rows):
            pts = sorted((r["rho"], r["gflops"][0]) for r in rows if r["target"] == target)
            ax.plot(*zip(*pts), marker=marker(target, "o"), label=target)
        ax.set(xlabel="keep ratio ρ", ylabel="GFLOPs", title="cost per image")
        ax.legend()
    targets = list(dict.fromkeys(r["target"] for r in rows if r["target"] != "dense"))
    costs = [r["gflops"][0] for r in rows if r["gflops"][0] is not None]
    span = (max(costs) - min(costs)) or max(costs) or 1.0
    # Targets at the same ρ have the same cost: their markers are dodged sideways by a fraction of the x span.
    dodge = {t: (i - (len(targets) - 1) / 2) * 0.012 * span for i, t in enumerate(targets)}
    for ax, metric in zip(axes[0], metrics):
        for target in dict.fromkeys(r["target"] for r in rows):
            pts = sorted((r for r in rows if r["target"] == target and r[metric][0] is not None),
                         key=lambda r: r["rho"])
            if not pts:
                continue
            x = [r["gflops"][0] + dodge.get(target, 0.0) for r in pts]
            y = [r[metric][0] for r in pts]
            err = [r[metric][1] for r in pts]
            if target == "dense":
                ax.axhline(y[0], color="black", lw=1, ls="--", label=f"dense ({x[0]:.3g} GFLOPs)")
                ax.axhspan(y[0] - err[0], y[0] + err[0], color="black", alpha=0.08)
                ax.errorbar(x, y, yerr=err, fmt="*", color="black", ms=11, capsize=3)
                continue
            label = target if len(pts) > 1 else f"{target} (ρ={pts[0]['rho']:g})"
            line = ax.errorbar(x, y, yerr=err, marker=marker(target), ms=7, capsize=3, lw=1,
                               label=label)
            for r, xi, yi in zip(pts if len(pts) > 1 else [], x, y):  # a single point: ρ is in the legend
                ax.annotate(f"ρ={r['rho']:g}", (xi, yi), textcoords="offset points", xytext=(5, 4), fontsize=7,
                            color=line[0].get_color())
        ax.set(xlabel="GFLOPs per image (fvcore convention; markers of one ρ dodged sideways)", ylabel=f"{metric} (%)",
               title=f"{metric} against cost, mean ± std over seeds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
