"""The one unit of COCO metrics in everything this package prints or writes: percent (pycocotools' fractions × 100).

AP, AP50, ... AR, per-class AP are percentages in the console, log.txt, log.jsonl, TensorBoard, checkpoints
(`best_ap`, `metrics`), sweep records (`result.json`, `results.json`), the README and docs. -1 (COCO: no ground
truth of that kind) stays -1 and None stays None. The selection instruments (`selection`, `stat_sel_*`) are not
metrics of this kind: they stay fractions of tokens / boxes / attention mass.

A metrics dict or record written in percent says so (`"ap_unit": "percent"`). Files written before the unit was
fixed hold fractions and lack the key (checkpoints: format < 3, see checkpoint.py); their readers convert them with
`metrics_in_percent` on load, and never rewrite the file.
"""
from __future__ import annotations

from typing import Any, Optional

__all__ = ["AP_UNIT_KEY", "AP_UNIT", "METRIC_NAMES", "percent", "metrics_in_percent", "is_percent"]

AP_UNIT_KEY = "ap_unit"
AP_UNIT = "percent"
# pycocotools' `stats` order.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def percent(fraction: Any) -> Any:
    """A COCO fraction in percent; -1 (no ground truth), None and non-numbers pass unchanged."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or fraction < 0:
        return fraction
    return 100.0 * float(fraction)


def is_percent(entry: dict) -> bool:
    return entry.get(AP_UNIT_KEY) == AP_UNIT


def metrics_in_percent(metrics: Optional[dict], keys: tuple[str, ...] = METRIC_NAMES) -> Optional[dict]:
    """A copy of `metrics` with `keys`, `per_class` and the same under `ema` in percent, marked with AP_UNIT_KEY;
    a dict already marked (or None / empty) is returned as it is. Other entries (instruments, epoch, ...) are kept."""
    if not metrics or is_percent(metrics):
        return metrics
    out = {k: percent(v) if k in keys else v for k, v in metrics.items()}
    if isinstance(out.get("per_class"), dict):
        out["per_class"] = {name: percent(v) for name, v in out["per_class"].items()}
    if isinstance(out.get("ema"), dict):
        out["ema"] = metrics_in_percent(out["ema"], keys)
    out[AP_UNIT_KEY] = AP_UNIT
    return out
