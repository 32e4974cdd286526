"""Build and install sparse-detr, including the compiled extension ``sparse_detr._C``.

The extension holds the multi-scale deformable attention kernels (``csrc/``):

* the C++ CPU kernel is always built (OpenMP through ``at::parallel_for``), so the package builds
  and runs on a machine without CUDA;
* the CUDA kernel (``csrc/cuda/*.cu``, compiled with ``-DWITH_CUDA``) is added when PyTorch finds a
  CUDA toolkit (``torch.utils.cpp_extension.CUDA_HOME``) and either a GPU is visible or
  ``FORCE_CUDA=1`` is set.

Commands (torch must already be installed, hence ``--no-build-isolation``)::

    pip install -e . --no-build-isolation -c constraints.txt
    # with the ONNX export extra (onnx, onnxruntime, onnxscript):
    pip install -e ".[export]" --no-build-isolation -c constraints.txt
    # compile the CUDA kernel for H100 on a machine without a GPU (what CI does):
    FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=2 pip install -e . --no-build-isolation

Environment variables: ``FORCE_CUDA=1`` (build CUDA without a visible GPU), ``TORCH_CUDA_ARCH_LIST``
(GPU architectures; PyTorch's default is the visible GPUs), ``CUDA_HOME`` (toolkit location),
``MAX_JOBS`` (parallel compile jobs), ``SPARSE_DETR_DEBUG=1`` (``-O0 -g`` for debugging kernels).
"""

import glob
import os
import site
import sys
import sysconfig

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"  # relative: setuptools wants source paths relative to setup.py


def read_requirements():
    """Runtime requirements = requirements.txt minus test-only tools (pytest)."""
    reqs = []
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line and not line.lower().startswith("pytest"):
                reqs.append(line)
    return reqs


def want_cuda():
    if CUDA_HOME is None:
        return False
    return torch.cuda.is_available() or os.environ.get("FORCE_CUDA", "0") == "1"


def pip_cuda_include_dirs():
    """Headers shipped in the nvidia-* pip wheels (e.g. cusparse.h, which ATen's CUDA headers
    include but a minimal toolkit may lack)."""
    roots = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    roots.update(getattr(site, "getsitepackages", lambda: [])())  # absent in old virtualenvs
    if site.ENABLE_USER_SITE:
        roots.add(site.getusersitepackages())
    dirs = []
    for root in sorted(roots):
        # nvidia/cu13/include (CUDA 13 wheels) or nvidia/cusparse/include (CUDA 12 wheels)
        for pattern in ("cu[0-9]*", "cusparse"):
            dirs += sorted(glob.glob(os.path.join(root, "nvidia", pattern, "include")))
    return [d for d in dirs if os.path.isdir(d)]


def build_extensions():
    # No -std flag: torch.utils.cpp_extension picks the C++ standard its headers need
    # (C++17 for torch 2.5, C++20 for recent releases).
    debug = os.environ.get("SPARSE_DETR_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    if sys.platform == "win32":
        cxx_flags, link_flags = ["/O2", "/openmp"], []
    else:
        # -fopenmp: at::parallel_for is an inline `#pragma omp parallel`; without the flag the CPU
        # kernel would silently run on a single thread. The libgomp we link is the one torch
        # already loaded (same soname), so there is a single OpenMP runtime.
        cxx_flags, link_flags = opt + ["-fopenmp"], ["-fopenmp"]

    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")))
    sources += sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    include_dirs = [os.path.join(ROOT, CSRC)]

    if not want_cuda():
        print("sparse-detr: building the CPU kernel only (no CUDA toolkit or GPU; FORCE_CUDA=1 to force)")
        return [
            CppExtension(
                "sparse_detr._C",
                sources,
                include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx_flags},
                extra_link_args=link_flags,
            )
        ]

    print(f"sparse-detr: building CPU and CUDA kernels (CUDA_HOME={CUDA_HOME}, "
          f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '<torch default>')})")
    sources += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    nvcc_flags = opt + ["--expt-relaxed-constexpr"]
    ext = CUDAExtension(
        "sparse_detr._C",
        sources,
        include_dirs=include_dirs,
        define_macros=[("WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )
    # Appended after the toolkit's own include dir so that the toolkit wins where both have a file.
    ext.include_dirs += pip_cuda_include_dirs()
    return [ext]


setup(
    name="sparse-detr",
    version="0.1.0",
    description="Sparse DETR (Roh et al., ICLR 2022) with a compiled multi-scale deformable attention op",
    packages=find_packages(include=["sparse_detr*"]),
    python_requires=">=3.10",
    install_requires=read_requirements(),
    # `pip install -e .[export] --no-build-isolation -c constraints.txt`: ONNX export (tools/export_onnx.py),
    # imported by the exporter only.
    extras_require={"export": ["onnx>=1.17", "onnxruntime>=1.20", "onnxscript>=0.5"]},
    ext_modules=build_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
