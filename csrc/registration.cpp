// The one list of our ops (TORCH_LIBRARY schemas) and the Python module dalle_fast._C, which
// carries build information. Device implementations register themselves in their own files
// with TORCH_LIBRARY_IMPL.
#include <string>

#include <pybind11/pybind11.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include "attention/attention_args.h"
#include "cpu_math.h"
#include "masks.h"
#include "philox.h"

#ifndef DF_CUDA_ARCHS
#define DF_CUDA_ARCHS ""
#endif
#ifndef DF_TORCH_VERSION
#define DF_TORCH_VERSION "unknown"
#endif

TORCH_LIBRARY(dalle_fast, m) {
  // Returns (out [B, H, N, D], lse [B, H, N] in float32, float64 for float64 inputs).
  m.def(
      "sparse_attention_fwd(Tensor q, Tensor k, Tensor v, str kind, int text_len, int grid, "
      "int kernel, float scale) -> (Tensor, Tensor)");
  // Returns (dq, dk, dv).
  m.def(
      "sparse_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "str kind, int text_len, int grid, int kernel, float scale) -> (Tensor, Tensor, Tensor)");

  // One sampling step's attention over a KV cache (dalle_fast/ops/decode.py): q [B, H, D] at image
  // position g (0-dim int64 tensor, read on the device) over the text keys and the image keys
  // g - offsets[i] >= 0 of cache_k / cache_v [B, H, N, D]. Returns [B, H, D]. No autograd.
  m.def(
      "sparse_decode(Tensor q, Tensor cache_k, Tensor cache_v, Tensor offsets, Tensor g, int text_len, "
      "float scale) -> Tensor");
  // The same after writing this step's key and value k_new / v_new [B, H, D] to row text_len + g of
  // the caches (in place, in the same kernel; nothing when that row is outside the caches).
  m.def(
      "sparse_decode_append(Tensor q, Tensor k_new, Tensor v_new, Tensor(a!) cache_k, Tensor(b!) cache_v, "
      "Tensor offsets, Tensor g, int text_len, float scale) -> Tensor");

  // act(ln(x) weight^T + bias) + residual for a few rows (dalle_fast/ops/linear.py): x [M, K],
  // weight [N, K], bias [N], residual [M, N]; activation 0 none, 1 GELU (erf); ln the layer norm
  // over K with ln_weight, ln_bias [K] and ln_eps when ln_weight is given. CUDA: float16 /
  // bfloat16, M <= 64; CPU: float32. Returns [M, N]. No autograd (the sampler's step).
  m.def(
      "skinny_linear(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, int activation, Tensor? ln_weight, "
      "Tensor? ln_bias, float ln_eps) -> Tensor");

  // Fused Gumbel-softmax over `dim`. Returns (y, kl, rng_state): y the soft sample (the one-hot of
  // its argmax when hard), kl = KL(softmax(logits) || uniform) per position when with_kl (else
  // empty), rng_state the (seed, offset) of the Philox noise, which the backward regenerates.
  // The draws are tagged nondeterministic_seeded, as aten's random ops: otherwise the compiler
  // takes them for pure functions and merges two draws from the same logits into one (CSE) or
  // drops an unused one, which would change how far the generator advances.
  m.def(
      "gumbel_softmax_fwd(Tensor logits, float tau, int dim, bool hard, bool with_kl, Generator? generator) "
      "-> (Tensor, Tensor, Tensor)",
      {at::Tag::nondeterministic_seeded});
  // grad_logits from grad_y (straight-through the soft sample when hard) and optional grad_kl.
  m.def(
      "gumbel_softmax_bwd(Tensor grad_y, Tensor? grad_kl, Tensor logits, Tensor y, Tensor rng_state, "
      "float tau, int dim, bool hard) -> Tensor");
  // The float32 Gumbel noise the kernels add for this rng_state (for tests and references).
  m.def("gumbel_noise(Tensor logits, Tensor rng_state, int dim) -> Tensor");
  // Gumbel-max draw: int64 indices, the first argmax over `dim` of fma(logits, scale, g), with the
  // noise gumbel_softmax_fwd draws from the same generator state (the sampler's token draw).
  m.def("gumbel_argmax(Tensor logits, float scale, int dim, Generator? generator) -> Tensor",
        {at::Tag::nondeterministic_seeded});
}

// The inference-only ops have no derivative: without this, autograd's default fallback for an op
// with no Autograd kernel only warns in backward and leaves every input's .grad at None. This one
// raises "derivative for ... is not implemented" when backward reaches them. (Under the "auto"
// backend the Python wrappers never get there: a call that autograd would record runs the
// differentiable reference; a forced backend runs the kernel.)
TORCH_LIBRARY_IMPL(dalle_fast, Autograd, m) {
  for (const char* op : {"sparse_decode", "sparse_decode_append", "skinny_linear"})
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
}

namespace {

// The [N, N] mask as N*N bytes, built from masks.h in one of three ways, so that tests can hold
// the C++ predicate and both run enumerations against dalle_fast/ops/masks.py.
pybind11::bytes mask_bytes(const std::string& kind, int64_t text_len, int64_t grid, int64_t kernel,
                           const std::string& source) {
  const auto spec = dalle_fast::make_mask_spec(kind, text_len, grid, kernel);
  const int64_t n = spec.seq_len();
  std::string out(static_cast<size_t>(n * n), '\0');
  auto mark = [&](int64_t q, int64_t k) {
    char& c = out[static_cast<size_t>(q * n + k)];
    TORCH_CHECK(c == 0, "run enumeration visits (", q, ", ", k, ") twice");
    c = 1;
  };
  if (source == "predicate") {
    for (int64_t q = 0; q < n; ++q)
      for (int64_t k = 0; k < n; ++k)
        if (dalle_fast::allowed(spec, q, k)) mark(q, k);
  } else if (source == "key_runs") {
    for (int64_t q = 0; q < n; ++q)
      dalle_fast::for_each_key_run(spec, q, [&](int64_t lo, int64_t hi, int64_t step) {
        for (int64_t k = lo; k < hi; k += step) mark(q, k);
      });
  } else if (source == "query_runs") {
    for (int64_t k = 0; k < n; ++k)
      dalle_fast::for_each_query_run(spec, k, [&](int64_t lo, int64_t hi, int64_t step) {
        for (int64_t q = lo; q < hi; q += step) mark(q, k);
      });
  } else {
    TORCH_CHECK_VALUE(false, "source must be predicate, key_runs or query_runs, got ", source);
  }
  return pybind11::bytes(out);
}

// The Gumbel noise the kernels derive from 32 random bits (for tests of the extremes).
float gumbel_from_bits(uint32_t bits) { return dalle_fast::philox::gumbel_from_bits(bits); }

// Which of the DF_CPU_CLONES versions this CPU runs: the same targets, so the same dispatch.
#ifdef DF_CPU_CLONING
__attribute__((target(DF_ISA_TOP))) std::string cpu_clone() { return DF_ISA_TOP; }
__attribute__((target(DF_ISA_MID))) std::string cpu_clone() { return DF_ISA_MID; }
__attribute__((target("default"))) std::string cpu_clone() { return "default"; }
#else
std::string cpu_clone() { return "none (one build for every CPU)"; }
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "dalle_fast compiled kernels; importing this module registers the torch.ops.dalle_fast ops";
  pybind11::dict info;
#ifdef DF_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["cuda_archs"] = DF_CUDA_ARCHS;
  info["torch_version"] = DF_TORCH_VERSION;
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = "unknown";
#endif
  m.attr("build_info") = info;
  m.def("mask_bytes", &mask_bytes, "The [N, N] mask from csrc/masks.h as N*N bytes (for tests)",
        pybind11::arg("kind"), pybind11::arg("text_len"), pybind11::arg("grid"), pybind11::arg("kernel"),
        pybind11::arg("source"));
  m.def("cpu_clone", [] { return cpu_clone(); }, "The instruction-set version of the CPU kernels this CPU runs");
  m.def("gumbel_from_bits", &gumbel_from_bits, "Gumbel noise from 32 random bits, as the CPU kernels compute it",
        pybind11::arg("bits"));
}
