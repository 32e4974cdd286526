"""The sweep's plots: AP and AP50 against GFLOPs (`plot_pareto`, one marker per criterion with error bars over
seeds and dense as a reference line), and the selection instruments (`plot_selection`: coverage, object coverage
and AP against iterations with a band over seeds, and final AP against the val-set coverage, a point per run).
"""

from __future__ import annotations

from sparse_detr.engine.studies.sweep_stats import convergence, selection_rows, summarize
from sparse_detr.models.selection import SELECTORS

__all__ = ["plot_pareto", "plot_selection", "marker"]


MARKER_CYCLE = "os^DXv<>ph"  # by registration order of the criteria (selection.SELECTORS); "P" for other labels


def marker(target: str, other: str = "P") -> str:
    """The plot marker of a criterion: fixed by its place in the registry, so every report draws it alike."""
    names = list(SELECTORS)
    return MARKER_CYCLE[names.index(target) % len(MARKER_CYCLE)] if target in names else other


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
    ys = np.array([[dict(zip(x, y))[i] for i in common] for x, y in runs], dtype=float)  # None (not measured): NaN
    if smooth > 1 and ys.shape[1] >= smooth:  # the mean of the measured points in each window
        kernel, finite = np.ones(smooth), ~np.isnan(ys)
        total = np.array([np.convolve(row, kernel, mode="valid") for row in np.where(finite, ys, 0.0)])
        count = np.array([np.convolve(row, kernel, mode="valid") for row in finite.astype(float)])
        ys = np.where(count > 0, total / np.maximum(count, 1.0), np.nan)
        common = common[smooth - 1:]
    measured = ~np.isnan(ys).all(0)  # iterations where no seed has a value are left out
    if not measured.any():
        return
    ys, common = ys[:, measured], [i for i, m in zip(common, measured) if m]
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
    rows = selection_rows(done)
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
