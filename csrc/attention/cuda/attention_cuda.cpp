// TORCH_LIBRARY_IMPL(dalle_fast, CUDA): tensors in, validated params to the CUDA launchers
// (attention_cuda.h). Mirrors attention_cpu.cpp; kernels run on the current stream of q's
// device, with no host synchronisation.
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <string>

#include "../../env_switch.h"
#include "../attention_args.h"
#include "../decode_args.h"
#include "attention_cuda.h"
#include "device_plan.h"

namespace dalle_fast::cuda {

namespace {

DType cuda_dtype(const at::Tensor& q, const char* op) {
  switch (q.scalar_type()) {
    case at::kFloat:
      return DType::Float32;
    case at::kDouble:
      return DType::Float64;
    case at::kHalf:
      return DType::Float16;
    case at::kBFloat16:
      return DType::BFloat16;
    default:
      TORCH_CHECK_TYPE(false, op, ": the CUDA kernel supports float32, float64, float16 and bfloat16, got ",
                       q.scalar_type());
  }
}

// DALLE_FAST_FLASH=0 in the environment keeps every call on the one-warp-per-row kernels (to
// compare the two paths or to bisect a problem); read once per process.
bool flash_enabled() {
  static const bool enabled = !env_is("DALLE_FAST_FLASH", "0");
  return enabled;
}

void check_cuda(const at::Tensor& q, const char* op = "sparse_attention") {
  TORCH_CHECK_VALUE(q.is_cuda(), op, ": the CUDA kernel needs CUDA tensors, got q on ", q.device());
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           c10::string_view kind, int64_t text_len, int64_t grid, int64_t kernel,
                                           double scale) {
  check_cuda(q);
  const c10::cuda::CUDAGuard guard(q.device());
  auto c = prepare_forward(q, k, v, std::string(kind), text_len, grid, kernel, scale);
  const DType dtype = cuda_dtype(c.q, "sparse_attention");
  if (c.q.numel() > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
    const char* err = nullptr;
    if (flash_enabled() && flash_forward_supported(c.params, dtype)) {
      const PlanView plan = device_plan(c.params.mask, kFlashTile, q.device().index());
      err = flash_forward(c.params, plan, dtype, stream);
    } else {
      err = attention_forward(c.params, dtype, stream);
    }
    TORCH_CHECK(err == nullptr, "sparse_attention: CUDA forward kernel launch failed: ", err);
  }
  return {c.out, c.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& q,
                                                        const at::Tensor& k, const at::Tensor& v,
                                                        const at::Tensor& out, const at::Tensor& lse,
                                                        c10::string_view kind, int64_t text_len, int64_t grid,
                                                        int64_t kernel, double scale) {
  check_cuda(q);
  const c10::cuda::CUDAGuard guard(q.device());
  auto c = prepare_backward(grad_out, q, k, v, out, lse, std::string(kind), text_len, grid, kernel, scale);
  const DType dtype = cuda_dtype(c.q, "sparse_attention backward");
  if (c.q.numel() > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
    const char* err = nullptr;
    if (flash_enabled() && flash_backward_supported(c.params, dtype)) {
      const PlanView plan = device_plan(c.params.mask, kFlashTile, q.device().index());
      err = attention_delta(c.params, dtype, stream);
      if (err == nullptr) {
        at::Tensor dq_acc = at::zeros(c.q.sizes(), c.q.options().dtype(at::kFloat));
        err = flash_backward(c.params, plan, dq_acc.data_ptr<float>(), dtype, stream);
        if (err == nullptr) c.dq.copy_(dq_acc);
      }
    } else {
      err = attention_backward(c.params, dtype, stream);
    }
    TORCH_CHECK(err == nullptr, "sparse_attention backward: CUDA kernel launch failed: ", err);
  }
  return {c.dq, c.dk, c.dv};
}

// Both decode ops after their argument checks: the one launcher (sparse_decode_append's params
// carry k_new / v_new, which the kernels write first).
at::Tensor launch_decode(const DecodeCall& c, const char* op) {
  const DType dtype = cuda_dtype(c.q, op);
  if (c.q.numel() > 0) {
    const char* err = sparse_decode(c.params, dtype, c10::cuda::getCurrentCUDAStream(c.q.device().index()).stream());
    TORCH_CHECK(err == nullptr, op, ": CUDA kernel launch failed: ", err);
  }
  return c.out;
}

at::Tensor decode(const at::Tensor& q, const at::Tensor& cache_k, const at::Tensor& cache_v, const at::Tensor& offsets,
                  const at::Tensor& g, int64_t text_len, double scale) {
  check_cuda(q, "sparse_decode");
  const c10::cuda::CUDAGuard guard(q.device());
  return launch_decode(prepare_decode(q, cache_k, cache_v, offsets, g, text_len, scale), "sparse_decode");
}

at::Tensor decode_append(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                         const at::Tensor& cache_k, const at::Tensor& cache_v, const at::Tensor& offsets,
                         const at::Tensor& g, int64_t text_len, double scale) {
  check_cuda(q, "sparse_decode_append");
  const c10::cuda::CUDAGuard guard(q.device());
  return launch_decode(prepare_decode_append(q, k_new, v_new, cache_k, cache_v, offsets, g, text_len, scale),
                       "sparse_decode_append");
}

}  // namespace

TORCH_LIBRARY_IMPL(dalle_fast, CUDA, m) {
  m.impl("sparse_attention_fwd", &forward);
  m.impl("sparse_attention_bwd", &backward);
  m.impl("sparse_decode", &decode);
  m.impl("sparse_decode_append", &decode_append);
}

}  // namespace dalle_fast::cuda
