"""Benchmark the multi-scale deformable attention implementations on the same inputs (the cases, shapes and
options: ``sparse_detr/engine/studies/op_benchmark.py``).

    python tools/benchmark_op.py --device cpu --repeats 3 --markdown /tmp/op_cpu.md
    python tools/benchmark_op.py --device cuda --dtype bfloat16 --coord-dtype float32 --json /tmp/op.json
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, installed or not

from sparse_detr.engine.cli import run_tool  # noqa: E402
from sparse_detr.engine.studies.op_benchmark import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_tool(main))  # a user mistake: its message alone (--debug: traceback)
