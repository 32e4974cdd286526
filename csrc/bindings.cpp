// Python module `sparse_detr._C`.
//
// Importing it loads the shared library, whose static initialisers register the CPU (and, when
// built with WITH_CUDA, CUDA) kernels of `sparse_detr::ms_deform_attn[_backward]` with the PyTorch
// dispatcher. The kernels are reached through `torch.ops.sparse_detr.*`, never through this module;
// it only exposes build facts that the Python dispatcher uses to choose a backend, and the switch
// between the two CUDA kernel pairs.
#include <torch/extension.h>

#include <atomic>
#include <string>

#include "ms_deform_attn.h"

namespace sparse_detr {
namespace {
std::atomic<int> g_cuda_kernel{static_cast<int>(CudaKernel::kDefault)};
}  // namespace

CudaKernel cuda_kernel_choice() { return static_cast<CudaKernel>(g_cuda_kernel.load()); }
void set_cuda_kernel_choice(CudaKernel choice) { g_cuda_kernel.store(static_cast<int>(choice)); }
}  // namespace sparse_detr

namespace {

void set_cuda_kernel(const std::string& name) {
  if (name == "default") {
    sparse_detr::set_cuda_kernel_choice(sparse_detr::CudaKernel::kDefault);
  } else if (name == "fast") {
    sparse_detr::set_cuda_kernel_choice(sparse_detr::CudaKernel::kFast);
  } else {
    TORCH_CHECK(false, "sparse_detr: CUDA kernel must be 'default' or 'fast', got '", name, "'");
  }
}

std::string cuda_kernel() {
  return sparse_detr::cuda_kernel_choice() == sparse_detr::CudaKernel::kFast ? "fast" : "default";
}

bool cuda_compiled() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Compiled kernels of sparse_detr (multi-scale deformable attention).";
  m.def("cuda_compiled", &cuda_compiled, "Whether the CUDA kernels were compiled in.");
  m.def("set_cuda_kernel", &set_cuda_kernel, "Select the CUDA kernel pair: 'default' or 'fast'.");
  m.def("cuda_kernel", &cuda_kernel, "The selected CUDA kernel pair.");
}
