// TORCH_LIBRARY_IMPL(dalle_fast, CUDA) for the Gumbel-softmax ops: tensors in, validated params
// (gumbel_args.h) and the CUDA generator's Philox state to the launchers (gumbel_cuda.h).
// Kernels run on the current stream of the logits' device, with no host synchronisation; the
// (seed, offset) is unpacked inside the kernels, so the ops can be captured in CUDA graphs.
#include <mutex>
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "../gumbel_args.h"
#include "gumbel_cuda.h"

namespace dalle_fast::cuda {

namespace {

GumbelDType gumbel_dtype(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return GumbelDType::Float32;
    case at::kHalf:
      return GumbelDType::Float16;
    case at::kBFloat16:
      return GumbelDType::BFloat16;
    default:
      TORCH_CHECK_TYPE(false, op, ": the CUDA kernel supports float32, float16 and bfloat16, got ", t.scalar_type());
  }
}

void check_cuda(const at::Tensor& t, const char* op) {
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": the CUDA kernel needs CUDA tensors, got logits on ", t.device());
}

cudaStream_t current_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

// The Philox inputs of one call from `generator` (or the device's default CUDA generator),
// advancing its offset. Under graph capture the seed and offset are device pointers into the
// generator's captured state, read by the kernel at replay.
PhiloxSource take_philox(const std::optional<at::Generator>& generator, const at::Device& device) {
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      generator, at::cuda::detail::getDefaultCUDAGenerator(device.index()));
  at::PhiloxCudaState state;
  {
    // See Note [Acquire lock when using random generators]
    std::lock_guard<std::mutex> lock(gen->mutex_);
    // Our counter layout gives every element its own counter within a call; a call only needs an
    // offset that differs from other calls', so the smallest increment (a multiple of 4) will do.
    state = gen->philox_cuda_state(4);
  }
  PhiloxSource src;
  if (state.captured_) {
    src.seed_ptr = state.seed_.ptr;
    src.offset_ptr = state.offset_.ptr;
    src.offset_extra = state.offset_intragraph_;
  } else {
    src.seed = state.seed_.val;
    src.offset = state.offset_.val;
  }
  return src;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& logits, double tau, int64_t dim, bool hard,
                                                       bool with_kl, std::optional<at::Generator> generator) {
  const char* op = "gumbel_softmax";
  check_cuda(logits, op);
  const c10::cuda::CUDAGuard guard(logits.device());
  auto c = prepare_gumbel_forward(logits, tau, dim, hard, with_kl);
  const GumbelDType dtype = gumbel_dtype(c.logits, op);
  c.params.rng = take_philox(generator, c.logits.device());
  const char* err = gumbel_forward(c.params, dtype, current_stream(c.logits));
  TORCH_CHECK(err == nullptr, op, ": CUDA forward kernel launch failed: ", err);
  return {c.y, c.kl, c.rng_state};
}

at::Tensor argmax(const at::Tensor& logits, double scale, int64_t dim, std::optional<at::Generator> generator) {
  const char* op = "gumbel_argmax";
  check_cuda(logits, op);
  const c10::cuda::CUDAGuard guard(logits.device());
  auto c = prepare_gumbel_argmax(logits, scale, dim);
  const GumbelDType dtype = gumbel_dtype(c.logits, op);
  c.params.rng = take_philox(generator, c.logits.device());
  const char* err = gumbel_forward(c.params, dtype, current_stream(c.logits));
  TORCH_CHECK(err == nullptr, op, ": CUDA kernel launch failed: ", err);
  return c.index;
}

at::Tensor backward(const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_kl, const at::Tensor& logits,
                    const at::Tensor& y, const at::Tensor& rng_state, double tau, int64_t dim, bool hard) {
  const char* op = "gumbel_softmax backward";
  check_cuda(logits, op);
  const c10::cuda::CUDAGuard guard(logits.device());
  auto c = prepare_gumbel_backward(grad_y, grad_kl, logits, y, rng_state, tau, dim, hard);
  const GumbelDType dtype = gumbel_dtype(c.logits, op);
  const char* err = gumbel_backward(c.params, dtype, current_stream(c.logits));
  TORCH_CHECK(err == nullptr, op, ": CUDA backward kernel launch failed: ", err);
  return c.grad_logits;
}

at::Tensor noise(const at::Tensor& logits, const at::Tensor& rng_state, int64_t dim) {
  const char* op = "gumbel_noise";
  check_cuda(logits, op);
  TORCH_CHECK_VALUE(logits.dim() >= 1, op, ": logits must have at least one dimension");
  TORCH_CHECK_VALUE(dim >= -logits.dim() && dim < logits.dim(), op, ": dim ", dim, " is out of range for ",
                    logits.dim(), "-d logits");
  TORCH_CHECK_VALUE(rng_state.numel() == 2 && rng_state.scalar_type() == at::kLong, op,
                    ": rng_state must hold two int64 (seed, offset)");
  TORCH_CHECK_VALUE(rng_state.device() == logits.device(), op, ": rng_state must be on ", logits.device(),
                    ", got ", rng_state.device());
  const c10::cuda::CUDAGuard guard(logits.device());
  GumbelParams p;
  gumbel_view(logits, dim < 0 ? dim + logits.dim() : dim, p);
  const at::Tensor state = rng_state.contiguous();
  p.rng_in = state.data_ptr<int64_t>();
  auto out = at::empty(logits.sizes(), logits.options().dtype(at::kFloat));
  if (out.numel() > 0) {
    const char* err = gumbel_noise(p, out.data_ptr<float>(), current_stream(logits));
    TORCH_CHECK(err == nullptr, op, ": CUDA kernel launch failed: ", err);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dalle_fast, CUDA, m) {
  m.impl("gumbel_softmax_fwd", &forward);
  m.impl("gumbel_softmax_bwd", &backward);
  m.impl("gumbel_noise", &noise);
  m.impl("gumbel_argmax", &argmax);
}

}  // namespace dalle_fast::cuda
