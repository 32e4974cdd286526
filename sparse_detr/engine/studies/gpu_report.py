"""Collect the outputs of tools/gpu_check.sh into one report: OUT/report.md and OUT/report.json.

Reads from OUT (every file optional; a missing one is reported as not run): gpu.txt / torch.txt (machine),
stages.tsv (stage, exit status, seconds), tests_cuda.xml (pytest JUnit XML), op_<dtype>.json
(tools/benchmark_op.py --json), model_bf16_<pair>.json (tools/benchmark.py --json).

Run through ``tools/gpu_report.py``::

    python tools/gpu_report.py outputs/gpu_check_20260101_120000
"""


from __future__ import annotations

import argparse
import glob
import json
import os
import xml.etree.ElementTree as ET

from sparse_detr.errors import UserError

PAIRS = ("default", "fast")


def _read(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return None


def _json(path):
    text = _read(path)
    return None if text is None else json.loads(text)


def read_stages(out):
    rows = []
    for line in (_read(os.path.join(out, "stages.tsv")) or "").splitlines():
        name, status, seconds = line.split("\t")
        rows.append({"stage": name, "status": status, "seconds": int(seconds)})
    return rows


def read_tests(out):
    """Counts of the CUDA tests, overall and per kernel pair (the test ids end in [default] / [fast] / [...-fast])."""
    text = _read(os.path.join(out, "tests_cuda.xml"))
    if text is None:
        return None
    root = ET.fromstring(text)
    cases = []
    for case in root.iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
            elif child.tag == "skipped":
                outcome = "skipped"
        cases.append({"name": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome})

    def count(selected):
        return {k: sum(c["outcome"] == k for c in selected) for k in ("passed", "failed", "skipped")}

    per_pair = {p: count([c for c in cases if f"{p}]" in c["name"] or f"{p}-" in c["name"].split("[")[-1]])
                for p in PAIRS}
    return {"total": count(cases), "per_pair": per_pair,
            "failed": [c["name"] for c in cases if c["outcome"] == "failed"]}


def op_table(records):
    """Markdown rows: per case, reference / default / fast times and fast's speed-up over default."""
    by_case = {}
    for r in records:
        by_case.setdefault((r["case"], r["queries"]), {})[r["implementation"]] = r
    lines = ["| case | queries | reference fwd / fwd+bwd (ms) | default fwd / fwd+bwd (ms) | "
             "fast fwd / fwd+bwd (ms) | fast vs default fwd | fast vs default fwd+bwd |",
             "|---|---:|---:|---:|---:|---:|---:|"]

    def cell(r):
        return "-" if r is None else f"{r['forward_ms']:.3f} / {r['forward_backward_ms']:.3f}"

    for (case, queries), impls in by_case.items():
        ref, dflt, fast = impls.get("reference"), impls.get("cuda default"), impls.get("cuda fast")
        speed_f = f"{dflt['forward_ms'] / fast['forward_ms']:.2f}x" if dflt and fast else "-"
        speed_b = f"{dflt['forward_backward_ms'] / fast['forward_backward_ms']:.2f}x" if dflt and fast else "-"
        lines.append(f"| {case} | {queries} | {cell(ref)} | {cell(dflt)} | {cell(fast)} | {speed_f} | {speed_b} |")
    return lines


def model_table(models):
    lines = ["| config | ρ | kernel pair | FPS bs1 | FPS bs4 | train s/iter | train peak MB |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for pair, records in models.items():
        for r in records:
            lines.append(f"| {r['name']} | {r['rho']:g} | {pair} | {r.get('fps_bs1', float('nan')):.1f} | "
                         f"{r.get('fps_bs4', float('nan')):.1f} | {r.get('train_step_s', float('nan')):.3f} | "
                         f"{r.get('train_peak_mem_mb', float('nan')):.0f} |")
    return lines


def build_report(out):
    report = {
        "gpu": _read(os.path.join(out, "gpu.txt")), "torch": _read(os.path.join(out, "torch.txt")),
        "stages": read_stages(out), "tests": read_tests(out),
        "op": {os.path.basename(p)[3:-5]: _json(p) for p in sorted(glob.glob(os.path.join(out, "op_*.json")))},
        "model": {os.path.basename(p)[len("model_bf16_"):-5]: _json(p)
                  for p in sorted(glob.glob(os.path.join(out, "model_bf16_*.json")))},
    }
    md = [f"# GPU check: {report['gpu'] or 'unknown GPU'}", "", f"{report['torch'] or ''}", "",
          "## Stages", "", "| stage | exit status | seconds |", "|---|---|---:|"]
    md += [f"| {s['stage']} | {s['status']} | {s['seconds']} |" for s in report["stages"]]
    md += ["", "## CUDA tests", ""]
    tests = report["tests"]
    if tests is None:
        md.append("not run (no tests_cuda.xml)")
    else:
        t = tests["total"]
        md.append(f"{t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped.")
        for pair, c in tests["per_pair"].items():
            md.append(f"- {pair} pair: {c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped")
        md += [f"- FAILED {name}" for name in tests["failed"]]
        fast = tests["per_pair"]["fast"]
        report["fast_passed_every_test"] = fast["failed"] == 0 and fast["passed"] > 0 and fast["skipped"] == 0
        md += ["", f"Fast pair passed every CUDA test: {'yes' if report['fast_passed_every_test'] else 'NO'}."]
    for dtype, records in report["op"].items():
        md += ["", f"## Op benchmark, value {dtype}"
               + (" (locations/weights float32)" if records and records[0]["coord_dtype"] != dtype else ""), ""]
        md += op_table(records or [])
    md += ["", "## Model benchmark (bf16 autocast)", ""]
    md += model_table({pair: recs or [] for pair, recs in report["model"].items()}) if report["model"] else ["not run"]
    with open(os.path.join(out, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(md) + "\n")
    return report, "\n".join(md)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the folder tools/gpu_check.sh wrote")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.out):
        raise UserError(f"gpu_report: {args.out} is not a folder")
    _, md = build_report(args.out)
    print(md)
    return 0

