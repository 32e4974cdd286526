"""Collect the outputs of tools/gpu_check.sh into one report: OUT/report.md and OUT/report.json.

Reads from OUT (every file optional; a missing one is reported as not run): gpu.txt / torch.txt (machine),
stages.tsv (stage, exit status, seconds), tests_cuda.xml (pytest JUnit XML), op_<dtype>.json
(tools/benchmark_op.py --json), model_bf16_<pair>.json (tools/benchmark.py --json).

    python tools/gpu_report.py outputs/gpu_check_20260101_120000
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, installed or not

from sparse_detr.engine.cli import run_tool  # noqa: E402
from sparse_detr.engine.studies.gpu_report import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_tool(main))
