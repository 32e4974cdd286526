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

Run through ``tools/benchmark_op.py``::

    python tools/benchmark_op.py --device cpu --repeats 3 --markdown /tmp/op_cpu.md
    python tools/benchmark_op.py --device cuda --dtype bfloat16 --coord-dtype float32 --json /tmp/op.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys

import torch

from sparse_detr.engine.timing import median_seconds
from sparse_detr.ops import available_backends, ms_deform_attn_reference, set_cuda_kernel
from sparse_detr.ops.kernels import CUDA_KERNELS, ms_deform_attn_kernel

__all__ = ["make_inputs", "bench", "machine_name", "main"]

LEVELS = [(100, 167), (50, 84), (25, 42), (13, 21)]
BATCH, HEADS, CHANNELS, POINTS = 2, 8, 32, 4
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}


def make_inputs(case, device, dtype, locations, seed=0, coord_dtype=None):
    """Return (value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
    locations and weights in ``coord_dtype`` (default: ``dtype``)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(LEVELS, dtype=torch.int64)
    areas = shapes.prod(1)
    starts = torch.cumsum(areas, 0) - areas
    tokens = int(areas.sum())
    n_queries = {"dense": tokens, "sparse": tokens // 10, "decoder": 300}[case]
    L = len(LEVELS)

    # Normalised centre of every token, level after level (the encoder's reference points).
    centres = []
    for h, w in LEVELS:
        ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w,
                                indexing="ij")
        centres.append(torch.stack([xs.reshape(-1), ys.reshape(-1)], -1))
    centres = torch.cat(centres)  # (S, 2)
    if case == "dense":
        idx = torch.arange(tokens)
    else:  # a sorted random subset, as after Sparse DETR's top-k token selection
        idx = torch.randperm(tokens, generator=gen)[:n_queries].sort().values
    shape = (BATCH, n_queries, HEADS, L, POINTS, 2)
    if locations == "uniform":
        loc = torch.rand(shape, generator=gen)
    else:
        ref = centres[idx].view(1, n_queries, 1, 1, 1, 2)
        loc = ref + torch.randn(shape, generator=gen) * (2.0 / LEVELS[0][1])
    value = torch.randn(BATCH, tokens, HEADS, CHANNELS, generator=gen)
    attn = torch.rand(BATCH, n_queries, HEADS, L, POINTS, generator=gen)
    attn = attn / attn.sum(dim=(-2, -1), keepdim=True)
    coord_dtype = coord_dtype or dtype
    out = [value.to(dtype), shapes, starts, loc.to(coord_dtype), attn.to(coord_dtype)]
    return [t.to(device) for t in out]


def bench(impl, inputs, device, repeats):
    """(forward ms, forward+backward ms) of impl on inputs."""
    value, shapes, starts, loc, attn = inputs

    def forward():
        with torch.no_grad():
            impl(value, shapes, starts, loc, attn)

    leaves = [t.detach().requires_grad_() for t in (value, loc, attn)]
    grad = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3],
                       device=device, dtype=value.dtype)

    def forward_backward():
        v, l, a = leaves
        out = impl(v, shapes, starts, l, a)
        torch.autograd.grad(out, leaves, grad)

    ms = median_seconds({"forward": forward, "forward_backward": forward_backward}, repeats, 1, device)
    return 1e3 * ms["forward"], 1e3 * ms["forward_backward"]


def machine_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines()
                     if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {torch.get_num_threads()} threads"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="value's dtype")
    parser.add_argument("--coord-dtype", default=None, choices=sorted(DTYPES),
                        help="dtype of locations and weights (default: --dtype)")
    parser.add_argument("--kernels", default=",".join(CUDA_KERNELS),
                        help="CUDA kernel pairs to time (comma-separated subset of default,fast)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    parser.add_argument("--cases", default="dense,sparse,decoder",
                        help="comma-separated subset of dense,sparse,decoder")
    parser.add_argument("--locations", default="local", choices=["local", "uniform"])
    parser.add_argument("--skip-reference", action="store_true",
                        help="time only the kernel (the reference needs ~3 GB for the dense case)")
    parser.add_argument("--markdown", metavar="PATH", help="also write the table to PATH")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    coord_dtype = DTYPES[args.coord_dtype] if args.coord_dtype else dtype
    # name -> (function, CUDA kernel pair to select first or None)
    impls = {} if args.skip_reference else {"reference": (ms_deform_attn_reference, None)}
    if device.type == "cuda" and "cuda" in available_backends():
        for pair in args.kernels.split(","):
            if pair not in CUDA_KERNELS:
                parser.error(f"--kernels: {pair!r} is not one of {CUDA_KERNELS}")
            impls[f"cuda {pair}"] = (ms_deform_attn_kernel, pair)
    elif device.type in available_backends():
        impls[f"{device.type} kernel"] = (ms_deform_attn_kernel, None)
    else:
        print(f"no compiled {device.type} kernel (built: {available_backends()})", file=sys.stderr)

    header = [
        f"Device: {machine_name(device)}; torch {torch.__version__}; value {args.dtype}, "
        f"locations/weights {args.coord_dtype or args.dtype}; locations {args.locations}; "
        f"median of {args.repeats} runs.",
        f"Command: `python tools/benchmark_op.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        "",
        "| case | queries | implementation | forward (ms) | speed-up | fwd+bwd (ms) | speed-up |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    print("\n".join(header), flush=True)
    rows, records = [], []
    for case in args.cases.split(","):
        inputs = make_inputs(case, device, dtype, args.locations, coord_dtype=coord_dtype)
        results = {}
        for name, (fn, pair) in impls.items():
            if pair is not None:
                set_cuda_kernel(pair)
            results[name] = bench(fn, inputs, device, args.repeats)
        base = results.get("reference")
        for name, (fwd, fwd_bwd) in results.items():
            ratio_f = f"{base[0] / fwd:.1f}x" if base else "-"
            ratio_b = f"{base[1] / fwd_bwd:.1f}x" if base else "-"
            row = (f"| {case} | {inputs[3].shape[1]} | {name} | {fwd:.2f} | {ratio_f} | "
                   f"{fwd_bwd:.2f} | {ratio_b} |")
            rows.append(row)
            records.append({"case": case, "queries": int(inputs[3].shape[1]), "implementation": name,
                            "dtype": args.dtype, "coord_dtype": args.coord_dtype or args.dtype,
                            "forward_ms": fwd, "forward_backward_ms": fwd_bwd,
                            "device": machine_name(device)})
            print(row, flush=True)
        del inputs
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(header + rows) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=2)

