// TORCH_LIBRARY_IMPL(dalle_fast, CPU) for the Gumbel-softmax ops: the generator's state in,
// validated params (gumbel_args.h) to the CPU kernels.
#include <mutex>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "../gumbel_args.h"
#include "gumbel_cpu.h"

namespace dalle_fast::cpu {

namespace {

GumbelStorage storage_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kBFloat16: return GumbelStorage::BF16;
    case at::kHalf: return GumbelStorage::F16;
    default: return GumbelStorage::F32;
  }
}

void check_cpu(const at::Tensor& t, const char* op) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": the CPU kernel needs CPU tensors, got ", t.device());
}

// One 64-bit draw from the generator keys a call's Philox stream, so torch.manual_seed (or the
// given generator's seed) repeats it exactly. Records (seed, 0) in the call's rng_state.
uint64_t take_seed(const std::optional<at::Generator>& generator, GumbelParams& p) {
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
  uint64_t seed;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    seed = gen->random64();
  }
  p.rng_state[0] = static_cast<int64_t>(seed);
  p.rng_state[1] = 0;
  return seed;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& logits, double tau, int64_t dim, bool hard,
                                                       bool with_kl, std::optional<at::Generator> generator) {
  check_cpu(logits, "gumbel_softmax");
  auto c = prepare_gumbel_forward(logits, tau, dim, hard, with_kl);
  gumbel_forward(c.params, storage_of(c.logits), take_seed(generator, c.params), 0);
  return {c.y, c.kl, c.rng_state};
}

at::Tensor argmax(const at::Tensor& logits, double scale, int64_t dim, std::optional<at::Generator> generator) {
  check_cpu(logits, "gumbel_argmax");
  auto c = prepare_gumbel_argmax(logits, scale, dim);
  gumbel_forward(c.params, storage_of(c.logits), take_seed(generator, c.params), 0);
  return c.index;
}

at::Tensor backward(const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_kl, const at::Tensor& logits,
                    const at::Tensor& y, const at::Tensor& rng_state, double tau, int64_t dim, bool hard) {
  check_cpu(logits, "gumbel_softmax backward");
  auto c = prepare_gumbel_backward(grad_y, grad_kl, logits, y, rng_state, tau, dim, hard);
  gumbel_backward(c.params, storage_of(c.logits), static_cast<uint64_t>(c.params.rng_in[0]),
                  static_cast<uint64_t>(c.params.rng_in[1]));
  return c.grad_logits;
}

at::Tensor noise(const at::Tensor& logits, const at::Tensor& rng_state, int64_t dim) {
  check_cpu(logits, "gumbel_noise");
  TORCH_CHECK_VALUE(rng_state.numel() == 2 && rng_state.scalar_type() == at::kLong && rng_state.device().is_cpu(),
                    "gumbel_noise: rng_state must hold two int64 (seed, offset) on the CPU");
  TORCH_CHECK_VALUE(logits.dim() >= 1 && dim >= -logits.dim() && dim < logits.dim(), "gumbel_noise: bad dim ", dim);
  GumbelParams p;
  gumbel_view(logits, dim < 0 ? dim + logits.dim() : dim, p);
  auto out = at::empty(logits.sizes(), logits.options().dtype(at::kFloat));
  const auto state = rng_state.contiguous();
  const int64_t* s = state.data_ptr<int64_t>();
  if (out.numel() > 0) gumbel_noise(p, static_cast<uint64_t>(s[0]), static_cast<uint64_t>(s[1]), out.data_ptr<float>());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dalle_fast, CPU, m) {
  m.impl("gumbel_softmax_fwd", &forward);
  m.impl("gumbel_softmax_bwd", &backward);
  m.impl("gumbel_noise", &noise);
  m.impl("gumbel_argmax", &argmax);
}

}  // namespace dalle_fast::cpu
