// Python module `sparse_detr._C`.
//
// Importing it loads the shared library, whose static initialisers register the CPU (and, when
// built with WITH_CUDA, CUDA) kernels of `sparse_detr::ms_deform_attn[_backward]` with the PyTorch
// dispatcher. The kernels are reached through `torch.ops.sparse_detr.*`, never through this module;
// it only exposes build facts that the Python dispatcher uses to choose a backend.
#include <torch/extension.h>

namespace {

bool cuda_compiled() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

// False means at::parallel_for was compiled without OpenMP and runs the CPU kernels on one thread.
bool openmp_compiled() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Compiled kernels of sparse_detr (multi-scale deformable attention).";
  m.def("cuda_compiled", &cuda_compiled, "Whether the CUDA kernels were compiled in.");
  m.def("openmp_compiled", &openmp_compiled, "Whether the CPU kernels were built with OpenMP.");
}
