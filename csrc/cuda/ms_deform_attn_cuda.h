// Entry points shared by the two CUDA kernel pairs of multi-scale deformable attention.
//
// ms_deform_attn_cuda.cu registers the CUDA implementation of the op and runs the default kernels;
// when the fast pair is selected (CudaKernel::kFast) and supports the inputs, it calls the
// functions below (ms_deform_attn_cuda_fast.cu) instead. Inputs arrive validated and contiguous.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "../ms_deform_attn.h"

namespace sparse_detr {

// Whether the fast kernels handle these inputs (C / vector width <= 32 lanes, shared memory).
bool fast_kernel_supports(const AttnDims& d, const at::Tensor& value);

at::Tensor fast_forward_cuda(const at::Tensor& value, const at::Tensor& shapes,
                             const at::Tensor& starts, const at::Tensor& loc,
                             const at::Tensor& attn, const AttnDims& d);

// grad_out has value's dtype; returns gradients in the dtypes of value, loc and attn.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fast_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& value, const at::Tensor& shapes,
    const at::Tensor& starts, const at::Tensor& loc, const at::Tensor& attn, const AttnDims& d);

}  // namespace sparse_detr
