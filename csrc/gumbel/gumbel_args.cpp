#include "gumbel_args.h"

#include <cmath>
#include <vector>

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

namespace dalle_fast {

namespace {

int64_t check_logits(const at::Tensor& logits, double tau, int64_t dim, const char* op, const char* tau_name = "tau") {
  TORCH_CHECK_TYPE(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kHalf ||
                       logits.scalar_type() == at::kBFloat16,
                   op, ": logits must be float32, float16 or bfloat16, got ", logits.scalar_type());
  TORCH_CHECK_VALUE(logits.dim() >= 1, op, ": logits must have at least one dimension");
  TORCH_CHECK_VALUE(logits.numel() > 0, op, ": logits is empty, shape ", logits.sizes());
  // tau and 1 / tau stay normal float32 numbers (dalle_fast/ops/gumbel.py: TAU_RANGE).
  constexpr double kTauMin = 1e-30, kTauMax = 1e30;
  TORCH_CHECK_VALUE(tau >= kTauMin && tau <= kTauMax, op, ": ", tau_name, " must be a positive number in [",
                    kTauMin, ", ", kTauMax, "], got ", tau);
  TORCH_CHECK_VALUE(dim >= -logits.dim() && dim < logits.dim(), op, ": dim ", dim, " is out of range for ",
                    logits.dim(), "-d logits");
  return dim < 0 ? dim + logits.dim() : dim;
}

// The shape of one value per position: the logits' sizes without `dim` (the KL term, the draw).
std::vector<int64_t> position_sizes(const at::Tensor& logits, int64_t dim) {
  auto sizes = logits.sizes().vec();
  sizes.erase(sizes.begin() + dim);
  return sizes;
}

}  // namespace

void gumbel_view(const at::Tensor& logits, int64_t dim, GumbelParams& p) {
  p.outer = 1;
  p.inner = 1;
  for (int64_t d = 0; d < dim; ++d) p.outer *= logits.size(d);
  for (int64_t d = dim + 1; d < logits.dim(); ++d) p.inner *= logits.size(d);
  p.vocab = logits.size(dim);
}

GumbelForwardCall prepare_gumbel_forward(const at::Tensor& logits_in, double tau, int64_t dim_in, bool hard,
                                         bool with_kl) {
  const int64_t dim = check_logits(logits_in, tau, dim_in, "gumbel_softmax");
  GumbelForwardCall c;
  c.logits = logits_in.contiguous();  // NCHW with dim=1 is already [outer, vocab, inner]: no copy
  c.y = at::empty_like(c.logits, at::MemoryFormat::Contiguous);
  c.kl = with_kl ? at::empty(position_sizes(c.logits, dim), c.logits.options()) : at::empty({0}, c.logits.options());
  c.rng_state = at::empty({2}, c.logits.options().dtype(at::kLong));
  auto& p = c.params;
  gumbel_view(c.logits, dim, p);
  p.tau = static_cast<float>(tau);
  p.hard = hard;
  p.with_kl = with_kl;
  p.logits = c.logits.data_ptr();
  p.y = c.y.data_ptr();
  p.kl = with_kl ? c.kl.data_ptr() : nullptr;
  p.rng_state = c.rng_state.data_ptr<int64_t>();
  return c;
}

GumbelForwardCall prepare_gumbel_argmax(const at::Tensor& logits_in, double scale, int64_t dim_in) {
  const int64_t dim = check_logits(logits_in, scale, dim_in, "gumbel_argmax", "scale");
  GumbelForwardCall c;
  c.logits = logits_in.contiguous();
  c.index = at::empty(position_sizes(c.logits, dim), c.logits.options().dtype(at::kLong));
  c.rng_state = at::empty({2}, c.logits.options().dtype(at::kLong));
  auto& p = c.params;
  gumbel_view(c.logits, dim, p);
  p.hard = true;
  p.scale = static_cast<float>(scale);
  p.logits = c.logits.data_ptr();
  p.index = c.index.data_ptr<int64_t>();
  p.rng_state = c.rng_state.data_ptr<int64_t>();
  return c;
}

GumbelBackwardCall prepare_gumbel_backward(const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_kl,
                                           const at::Tensor& logits, const at::Tensor& y,
                                           const at::Tensor& rng_state, double tau, int64_t dim_in, bool hard) {
  const char* op = "gumbel_softmax backward";
  const int64_t dim = check_logits(logits, tau, dim_in, op);
  TORCH_CHECK_VALUE(grad_y.sizes() == logits.sizes() && y.sizes() == logits.sizes(), op,
                    ": grad_y and y must have the logits' shape ", logits.sizes());
  TORCH_CHECK_VALUE(rng_state.numel() == 2 && rng_state.scalar_type() == at::kLong, op,
                    ": rng_state must hold two int64 (seed, offset)");
  for (const auto* t : {&grad_y, &y, &rng_state})
    TORCH_CHECK_VALUE(t->device() == logits.device(), op, ": all inputs must be on ", logits.device());
  GumbelBackwardCall c;
  c.logits = logits.contiguous();
  c.grad_y = grad_y.to(logits.scalar_type()).contiguous();
  if (!hard) c.y = y.to(logits.scalar_type()).contiguous();  // a hard forward's y is never read
  c.rng_state = rng_state.contiguous();
  c.grad_logits = at::empty_like(c.logits, at::MemoryFormat::Contiguous);
  auto& p = c.params;
  gumbel_view(c.logits, dim, p);
  p.tau = static_cast<float>(tau);
  p.hard = hard;
  p.logits = c.logits.data_ptr();
  p.grad_y = c.grad_y.data_ptr();
  p.y_soft = hard ? nullptr : c.y.data_ptr();
  p.rng_in = c.rng_state.data_ptr<int64_t>();
  p.grad_logits = c.grad_logits.data_ptr();
  if (grad_kl.has_value() && grad_kl->defined()) {
    const auto kl_shape = position_sizes(c.logits, dim);
    TORCH_CHECK_VALUE(grad_kl->sizes() == at::IntArrayRef(kl_shape), op, ": grad_kl must have shape ",
                      at::IntArrayRef(kl_shape), ", got ", grad_kl->sizes());
    TORCH_CHECK_VALUE(grad_kl->device() == logits.device(), op, ": grad_kl must be on ", logits.device());
    c.grad_kl = grad_kl->to(logits.scalar_type()).contiguous();
    p.with_kl = true;
    p.grad_kl = c.grad_kl.data_ptr();
  }
  return c;
}

}  // namespace dalle_fast
