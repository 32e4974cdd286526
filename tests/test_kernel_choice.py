"""Selection of the CUDA kernel pair (SPARSE_DETR_CUDA_KERNEL / set_cuda_kernel); no GPU needed."""

import os
import subprocess
import sys

import pytest

from sparse_detr import ops
from sparse_detr.ops import kernels

CODE = "from sparse_detr.ops import cuda_kernel; print(cuda_kernel())"


def _run(value):
    env = dict(os.environ, SPARSE_DETR_CUDA_KERNEL=value)
    return subprocess.run([sys.executable, "-W", "always", "-c", CODE], env=env, capture_output=True,
                          text=True, check=True)


def test_environment_selects_the_fast_kernel():
    assert _run("fast").stdout.strip() == "fast"
    assert _run("").stdout.strip() == "default"


def test_unknown_kernel_name_warns_and_keeps_the_default():
    out = _run("fastest")
    assert out.stdout.strip() == "default"
    assert "SPARSE_DETR_CUDA_KERNEL='fastest'" in out.stderr


def test_set_cuda_kernel_round_trip_and_bad_name():
    before = ops.cuda_kernel()
    try:
        ops.set_cuda_kernel("fast")
        assert ops.cuda_kernel() == "fast"
        if kernels.CPU_KERNEL:  # the compiled switch itself, not only the Python record
            assert kernels._C.cuda_kernel() == "fast"
        ops.set_cuda_kernel("default")
        assert ops.cuda_kernel() == "default"
    finally:
        ops.set_cuda_kernel(before)
    with pytest.raises(ValueError, match="fast"):
        ops.set_cuda_kernel("quick")
