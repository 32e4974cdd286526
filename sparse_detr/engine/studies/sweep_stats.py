"""Statistics over a sweep's records: mean ± std over seeds (`summarize`, `selection_rows`), paired differences by
seed, rank correlations of AP with the selection instruments, and whether the schedule converged (`convergence`:
the AP trend over the last third of training against the seed spread, with a saturating fit `saturation_fit`
checked against logarithmic growth `log_fit` by `better_fit`, and `converged_schedule`, the extrapolated schedule).
Plain numbers in, plain numbers out: the tables are in sweep_report.py, the plots in sweep_plots.py.
"""

from __future__ import annotations

import math
import statistics
from typing import Optional

__all__ = ["summarize", "mean_std", "selection_rows", "paired_differences", "rank_correlations", "convergence",
           "saturation_fit", "log_fit", "better_fit", "converged_schedule", "METRIC_KEYS", "SELECTION_KEYS",
           "CORRELATED"]


SUMMARY_KEYS = ("AP", "AP50", "AP_s", "AP_m", "AP_l", "gflops", "encoder_gflops", "cpu_fps", "train_seconds")


def mean_std(values: list) -> tuple[Optional[float], Optional[float]]:
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
             **{k: mean_std([r.get(k) for r in rs]) for k in SUMMARY_KEYS}} for (t, rho), rs in groups.items()]


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


SELECTION_KEYS = ("dam_coverage", "dam_oracle", "dam_random", "dam_efficiency", "dam_tokens50", "dam_tokens90",
                  "object_coverage", "oracle_object_coverage", "random_object_coverage", "fg_precision")


def selection_rows(records: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("status") == "done" and r.get("selection"):
            groups.setdefault((r["target"], r["rho"]), []).append(r)
    return [{"target": t, "rho": rho, "n": len(rs),
             **{k: mean_std([r["selection"].get(k) for r in rs]) for k in SELECTION_KEYS}}
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
    converged, only when the points prefer it and locate its plateau (an extrapolation: model-dependent).
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
        spread = mean_std([r["AP"] for r in runs])[1] if len(runs) > 1 else None
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
                     "projected": None if fit is None or not fit["located"] or spread is None
                     or preferred != "saturating"
                     else converged_schedule(fit, spread, last)})
    return rows


LOCATED_SPANS = 2.0  # the largest τ, in spans of the fitted points, at which a fitted plateau is reported


def saturation_fit(points: list[tuple[float, float]]) -> Optional[dict]:
    """Least-squares fit of AP(t) = plateau − gap·exp(−t / tau) to (iteration, AP) points (all seeds pooled): the
    usual shape of a curve at a constant learning rate. None with fewer than 4 distinct iterations or when the fit
    does not converge. `located` is False when τ exceeds `LOCATED_SPANS` spans of the points: they then cover
    less than 1 − e^(−1/2) ≈ 40% of the fitted approach, are nearly straight, and the plateau is an extrapolation
    the points do not pin down (on a straight line the optimiser stops anywhere along a ridge of equal fits).
    {plateau, gap, tau, t0, plateau_se, rss, n, located}."""
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
            "plateau_se": se, "rss": rss, "n": len(t), "located": bool(tau <= LOCATED_SPANS)}


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
