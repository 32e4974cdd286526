"""Benchmark the multi-scale deformable attention implementations on the same inputs.

Times forward and forward+backward of every implementation available on the device - the
pure-PyTorch reference and the compiled kernel (C++ on ``--device cpu``, CUDA on ``--device cuda``)
- and prints a markdown table with each one's speed-up over the reference.

Shapes (Sparse DETR, an 800x1333 image): batch 2, 8 heads, 32 channels per head, 4 levels of
100x167, 50x84, 25x42, 13x21 (22,223 tokens), 4 points per level. Three query sets:

* ``dense``   - every token is a query (Deformable DETR encoder);
* ``sparse``  - 10% of the tokens (Sparse DETR encoder, rho = 0.1);
* ``decoder`` - 300 object queries.

Sampling locations are each query's own token centre (a random token for the decoder) plus a
Gaussian offset of about two pixels of the finest level, which mimics the locality of trained
models; ``--locations uniform`` spreads them uniformly over the map instead.

On CUDA both kernel pairs are timed (``cuda default``, ``cuda fast``; ``--kernels`` picks).
``--coord-dtype float32`` with a 16-bit ``--dtype`` times the mixed-precision layout MSDeformAttn uses
under autocast (16-bit value, fp32 locations and weights).

Examples::

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
