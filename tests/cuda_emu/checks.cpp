// Checks of the CUDA kernels run on the CPU emulation (include/emu_device.h), each against a
// scalar reference written here from the ops' definitions (double precision, noise from the host
// path of philox.h):
//   gumbel_fwd      the one-read cluster forward (soft, with and without KL) and the two-sweep one,
//                   also at logits up to about 1e38 ((x + g) / tau past FLT_MAX)
//   gumbel_bwd      the one-read cluster backward and the two-sweep one; the hard forward and its
//                   backward, which recomputes the soft sample
//   gumbel_fallback the two-sweep kernels where too few clusters fit (EMU_MAX_CLUSTERS)
//   gumbel_argmax   the Gumbel-max draw (index of the first max of x * scale + g)
//   gumbel_nan      every Gumbel kernel on logits with NaNs (NaN positions, the rest unchanged)
//   decode          sparse_decode: the fast kernel (16-bit, head dims 32 / 64 / 128) and the
//                   general one, with and without appending this step's key and value
//   skinny_linear   out = act(ln(x) w^T + bias) + residual on the tensor-core path
//   attention       sparse attention forward and backward, one-warp and flash kernels (these have
//                   run on an H100: a control of the emulation itself)
//   conversions     the emulation's float <-> half / bfloat16 conversions
//   traffic         the Gumbel kernels at the dVAE's layout (see traffic())
//   fuzz            random cases of all of them
// In the traffic build (build.py --sanitize traffic) the Gumbel, decode and skinny_linear cases
// also check their kernels' memory traffic: how often each byte is loaded and stored, which cache
// rows decode reads, how much of each 32-byte sector a warp request uses (emu_traffic.h).
// Usage: emu_checks NAME, or emu_checks fuzz [COUNT [SEED]]. Prints one line per case and exits 1
// if any case fails.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "cuda_runtime.h"
#include "emu_traffic.h"

// The reference's noise: philox.h compiled for the host (its own namespace, so that it cannot be
// merged with the emulated device copy).
namespace ref {
#include "philox.h"
}

#include "attention/cuda/attention_cuda.h"
#include "attention/cuda/device_plan.h"
#include "gumbel/cuda/gumbel_cuda.h"
#include "linear/cuda/linear_cuda.h"

namespace {

using namespace dalle_fast;
using dalle_fast::cuda::DType;
using dalle_fast::cuda::GumbelDType;

int g_failures = 0;

float to_f(float x) { return x; }
float to_f(__half x) { return __half2float(x); }
float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T>
T from_f(float x);
template <>
float from_f<float>(float x) {
  return x;
}
template <>
__half from_f<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <class T>
const char* type_name() {
  return std::is_same_v<T, float> ? "f32" : std::is_same_v<T, __half> ? "f16" : "bf16";
}
template <class T>
double tolerance() {  // relative, about 4 units in the last place of T
  return std::is_same_v<T, float> ? 2e-5 : std::is_same_v<T, __half> ? 4e-3 : 2e-2;
}
template <class T>
double smallest_normal() {  // below it, T's spacing stops shrinking: the comparisons' absolute floor
  return std::is_same_v<T, __half> ? 6.1e-5 : 1.2e-38;
}
template <class T>
GumbelDType gumbel_dtype() {
  return std::is_same_v<T, float> ? GumbelDType::Float32 : std::is_same_v<T, __half> ? GumbelDType::Float16
                                                                                      : GumbelDType::BFloat16;
}
template <class T>
DType attn_dtype() {
  return std::is_same_v<T, float> ? DType::Float32 : std::is_same_v<T, __half> ? DType::Float16 : DType::BFloat16;
}

// A 64-byte aligned buffer of exactly `count` elements (the kernels' vector loads need 16; under
// AddressSanitizer an access past the end shows), filled with NaN so that an element a kernel
// should have written and did not shows; watched by the traffic counter (emu_traffic.h).
template <class T>
struct Buf {
  T* p = nullptr;
  size_t n = 0;
  explicit Buf(size_t count) : n(count) {
    void* mem = nullptr;
    if (posix_memalign(&mem, 64, count * sizeof(T) + (count == 0)) != 0) std::abort();
    p = static_cast<T*>(mem);
    for (size_t i = 0; i < n; ++i) p[i] = from_f<T>(std::numeric_limits<float>::quiet_NaN());
    emu::watch(p, count * sizeof(T));
  }
  Buf(const Buf&) = delete;
  ~Buf() {
    emu::unwatch(p);
    std::free(p);
  }
  T& operator[](size_t i) { return p[i]; }
};

// |got - want| <= tol * (|want| + floor) for every element, floor = scale + rms * (the values'
// root mean square, known at the end); prints the case's verdict.
struct Compare {
  std::string name;
  double tol, scale = 0, rms = 0;
  struct Value {
    double got, want, scale;
    size_t at;
  };
  std::vector<Value> values;
  void operator()(double got, double want, size_t at) { values.push_back({got, want, scale, at}); }
  void report() {
    double sq = 0;
    for (const Value& v : values) sq += std::isfinite(v.want) ? v.want * v.want : 0.0;
    const double floor_rms = values.empty() ? 0.0 : rms * std::sqrt(sq / double(values.size()));
    double worst = 0;
    size_t bad = 0;
    const Value* first = nullptr;
    for (const Value& v : values) {
      const double err = std::isnan(v.want) ? (std::isnan(v.got) ? 0 : INFINITY) : std::fabs(v.got - v.want);
      const double rel = err / (std::fabs(v.want) + v.scale + floor_rms);
      if (!(rel <= tol) && bad++ == 0) first = &v;
      worst = std::isnan(rel) ? INFINITY : std::max(worst, rel);
    }
    const bool ok = bad == 0 && !values.empty();
    std::printf("%s %s: %zu values, worst relative error %.3g (tolerance %.3g)", ok ? "PASS" : "FAIL", name.c_str(),
                values.size(), worst, tol);
    if (first != nullptr)
      std::printf("; %zu bad, first at %zu: got %.9g, want %.9g", bad, first->at, first->got, first->want);
    std::printf("\n");
    if (!ok) ++g_failures;
  }
};

void expect(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "PASS" : "FAIL", what.c_str());
  if (!ok) ++g_failures;
}

std::string detail(const char* err) { return err != nullptr ? std::string(" (") + err + ")" : std::string(); }
void launched(const std::string& name, const char* err) { expect(err == nullptr, name + ": launched" + detail(err)); }

// ---- Memory traffic (the traffic build: emu_traffic.h; elsewhere nothing is counted) ------------
// What a case's kernels must do with one buffer: load and store each of its bytes exactly `loads`
// and `stores` times (-1: any number), and use at least `sector_use` of the bytes of the 32-byte
// sectors their warp requests touch.
struct Use {
  const char* what;
  const void* p;
  int loads = -1, stores = -1;
  double sector_use = 0;
};

std::string times(size_t count, size_t max, size_t bytes) {
  char s[96];
  std::snprintf(s, sizeof s, "%.3gx (at most %zux)", bytes == 0 ? 0.0 : double(count) / double(bytes), max);
  return s;
}

void expect_traffic(const std::string& name, std::initializer_list<Use> uses) {
  if (!emu::traffic_counted()) return;
  for (const Use& u : uses) {
    const emu::Traffic t = emu::traffic(u.p);
    const auto exactly = [&](int want, size_t total, size_t max) {
      return want < 0 || (max == size_t(want) && total == size_t(want) * t.bytes);
    };
    char use[64];
    std::snprintf(use, sizeof use, "%.1f%% of sector bytes used", 100.0 * t.sector_use());
    std::string what = "traffic " + name + ": " + u.what + " loaded " + times(t.loaded, t.max_loads, t.bytes) +
                       ", stored " + times(t.stored, t.max_stores, t.bytes) + ", " + use;
    if (u.loads >= 0) what += "; want loads " + std::to_string(u.loads) + "x";
    if (u.stores >= 0) what += "; want stores " + std::to_string(u.stores) + "x";
    if (u.sector_use > 0) what += "; want use >= " + std::to_string(int(100 * u.sector_use)) + "%";
    expect(exactly(u.loads, t.loaded, t.max_loads) && exactly(u.stores, t.stored, t.max_stores) &&
               t.sector_use() >= u.sector_use,
           what);
  }
}

void set_env(const char* name, const char* value) {
  if (value == nullptr) {
    unsetenv(name);
  } else {
    setenv(name, value, 1);
  }
}

// ---- Gumbel-softmax -------------------------------------------------------------------------
constexpr uint64_t kSeed = 0x1234abcd5678ull, kOffset = 24;

float noise(int64_t pos, int64_t v) {
  const ref::dalle_fast::philox::U32x4 r =
      ref::dalle_fast::philox::gumbel_bits(kSeed, kOffset, uint64_t(pos), uint64_t(v / 4));
  const uint32_t bits[4] = {r.x, r.y, r.z, r.w};
  return ref::dalle_fast::philox::gumbel_from_bits(bits[v % 4]);
}

struct Shape {
  int64_t outer, vocab, inner;
  int64_t positions() const { return outer * inner; }
  size_t size() const { return size_t(outer * vocab * inner); }
  size_t at(int64_t pos, int64_t v) const { return size_t((pos / inner) * vocab * inner + v * inner + pos % inner); }
  std::string str() const {
    return "(" + std::to_string(outer) + ", " + std::to_string(vocab) + ", " + std::to_string(inner) + ")";
  }
};

// Normal logits of standard deviation 2 * spread, with -inf entries (never at v = 0) if with_inf.
template <class T>
void fill_logits(Buf<T>& x, const Shape& s, std::mt19937& rng, bool with_inf, float spread = 1.0f) {
  std::normal_distribution<float> normal(0.0f, 2.0f * spread);
  std::uniform_int_distribution<int> pick(0, 49);
  for (int64_t pos = 0; pos < s.positions(); ++pos)
    for (int64_t v = 0; v < s.vocab; ++v)
      x[s.at(pos, v)] = from_f<T>(with_inf && v > 0 && pick(rng) == 0 ? -INFINITY : normal(rng));
}

// y = softmax((x + g) / tau) and KL(softmax(x) || uniform) of one position, in double from the
// scores u = x + g as the kernels round them (float32), at the kernels' 1 / tau (a float32).
void gumbel_reference(const std::vector<float>& x, int64_t pos, float tau, std::vector<double>& y, double& kl) {
  const int64_t V = int64_t(x.size());
  const double inv_tau = double(1.0f / tau);
  std::vector<double> u(V);
  double m = -INFINITY, mx = -INFINITY;
  for (int64_t v = 0; v < V; ++v) {
    u[v] = double(x[v] + noise(pos, v));
    m = std::max(m, u[v]);
    mx = std::max(mx, double(x[v]));
  }
  double s = 0, sx = 0;
  for (int64_t v = 0; v < V; ++v) {
    s += std::exp((u[v] - m) * inv_tau);
    sx += std::exp(double(x[v]) - mx);
  }
  y.resize(V);
  kl = std::log(double(V));
  for (int64_t v = 0; v < V; ++v) {
    y[v] = std::exp((u[v] - m) * inv_tau) / s;
    const double logp = double(x[v]) - mx - std::log(sx);
    if (std::isfinite(logp)) kl += std::exp(logp) * logp;
  }
}

GumbelParams gumbel_params(const Shape& s, float tau) {
  GumbelParams p;
  p.outer = s.outer;
  p.vocab = s.vocab;
  p.inner = s.inner;
  p.tau = tau;
  p.rng.seed = kSeed;
  p.rng.offset = kOffset;
  return p;
}

// Runs a Gumbel op's forward or backward (p's buffers set) on the one-read kernels, required (the
// case fails where they did not run), or on the two-sweep ones (DALLE_FAST_GUMBEL_RESIDENT=0,
// through the op's entry point); returns the case's name.
enum class Pass { Forward, Backward };
template <class T>
std::string run_gumbel(const char* op, const Shape& s, const GumbelParams& p, Pass pass, bool resident) {
  const bool with_kl = pass == Pass::Forward ? p.with_kl : p.grad_kl != nullptr;
  const std::string name = std::string(op) + (resident ? " one-read " : " two-sweep ") + type_name<T>() + " " +
                           s.str() + (with_kl ? " kl" : "");
  set_env("DALLE_FAST_GUMBEL_RESIDENT", resident ? "require" : "0");
  if (resident) {
    const char* err = nullptr;
    const GumbelDType dtype = gumbel_dtype<T>();
    const bool took = pass == Pass::Forward ? dalle_fast::cuda::gumbel_forward_resident(p, dtype, nullptr, &err)
                                            : dalle_fast::cuda::gumbel_backward_resident(p, dtype, nullptr, &err);
    expect(took && err == nullptr, name + ": the one-read kernel ran" + detail(err));
  } else {
    launched(name, pass == Pass::Forward ? dalle_fast::cuda::gumbel_forward(p, gumbel_dtype<T>(), nullptr)
                                         : dalle_fast::cuda::gumbel_backward(p, gumbel_dtype<T>(), nullptr));
  }
  set_env("DALLE_FAST_GUMBEL_RESIDENT", nullptr);
  return name;
}

// The forward's parameters: the sample of logits x into y, the KL into kl (nullptr: none), hard or
// soft, the rng state recorded in state.
template <class T>
GumbelParams forward_params(const Shape& s, float tau, Buf<T>& x, Buf<T>& y, T* kl, bool hard, int64_t* state) {
  GumbelParams p = gumbel_params(s, tau);
  p.with_kl = kl != nullptr;
  p.hard = hard;
  p.logits = x.p;
  p.y = y.p;
  p.kl = kl;
  p.rng_state = state;
  return p;
}

// The backward's parameters: logits x, the saved soft sample y (nullptr: a hard sample's backward,
// which recomputes it), the upstream gradients dy and gkl (nullptr: no KL term), the forward's rng
// state, the gradient dx.
template <class T>
GumbelParams backward_params(const Shape& s, float tau, Buf<T>& x, T* y, Buf<T>& dy, T* gkl, int64_t* state,
                             Buf<T>& dx) {
  GumbelParams p = gumbel_params(s, tau);
  p.hard = y == nullptr;
  p.logits = x.p;
  p.y_soft = y;
  p.grad_y = dy.p;
  p.grad_kl = gkl;
  p.rng_in = state;
  p.grad_logits = dx.p;
  return p;
}

// sector_use: the least share of the sectors' bytes the traffic build must see used.
// spread: the logits' scale (1e37: up to about 1e38, where (x + g) / tau passes FLT_MAX at tau 0.1).
template <class T>
void gumbel_forward_case(const Shape& s, bool with_kl, bool resident, std::mt19937& rng, double sector_use = 0,
                         float tau = 0.7f, float spread = 1.0f) {
  Buf<T> x(s.size()), y(s.size()), kl(size_t(s.positions()));
  int64_t state[2] = {-1, -1};
  fill_logits(x, s, rng, true, spread);
  const GumbelParams p = forward_params(s, tau, x, y, with_kl ? kl.p : nullptr, false, state);
  const std::string name =
      run_gumbel<T>(spread == 1.0f ? "gumbel_fwd" : "gumbel_fwd near FLT_MAX", s, p, Pass::Forward, resident);
  expect(state[0] == int64_t(kSeed) && state[1] == int64_t(kOffset), name + ": rng state written");
  // The one-read kernels read each logit once, the two-sweep ones twice.
  expect_traffic(name, {{"logits", x.p, resident ? 1 : 2, 0, sector_use}, {"y", y.p, 0, 1, sector_use},
                        {"kl", kl.p, 0, with_kl ? 1 : 0}});
  Compare cy{name + " y", tolerance<T>(), std::max(1e-6, smallest_normal<T>())}, ck{name + " kl", tolerance<T>(), 1e-3};
  std::vector<float> xs(s.vocab);
  std::vector<double> yr;
  for (int64_t pos = 0; pos < s.positions(); ++pos) {
    for (int64_t v = 0; v < s.vocab; ++v) xs[v] = to_f(x[s.at(pos, v)]);
    double klr = 0;
    gumbel_reference(xs, pos, tau, yr, klr);
    for (int64_t v = 0; v < s.vocab; ++v) cy(to_f(y[s.at(pos, v)]), to_f(from_f<T>(float(yr[v]))), s.at(pos, v));
    if (with_kl) ck(to_f(kl[size_t(pos)]), klr, size_t(pos));
  }
  cy.report();
  if (with_kl) ck.report();
}

template <class T>
void gumbel_backward_case(const Shape& s, bool with_kl, bool resident, std::mt19937& rng, double sector_use = 0) {
  const float tau = 0.7f;
  Buf<T> x(s.size()), y(s.size()), dy(s.size()), dx(s.size()), gkl(size_t(s.positions()));
  int64_t state[2] = {int64_t(kSeed), int64_t(kOffset)};
  fill_logits(x, s, rng, true);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> xs(s.vocab);
  std::vector<double> yr;
  for (int64_t pos = 0; pos < s.positions(); ++pos) {  // the saved soft sample: the reference's, rounded
    for (int64_t v = 0; v < s.vocab; ++v) xs[v] = to_f(x[s.at(pos, v)]);
    double klr;
    gumbel_reference(xs, pos, tau, yr, klr);
    for (int64_t v = 0; v < s.vocab; ++v) {
      y[s.at(pos, v)] = from_f<T>(float(yr[v]));
      dy[s.at(pos, v)] = from_f<T>(normal(rng));
    }
    gkl[size_t(pos)] = from_f<T>(normal(rng));
  }
  const GumbelParams p = backward_params(s, tau, x, y.p, dy, with_kl ? gkl.p : nullptr, state, dx);
  const std::string name = run_gumbel<T>("gumbel_bwd", s, p, Pass::Backward, resident);
  // y and dy once each (twice on the two-sweep kernels), the logits only for the KL term.
  const int sweeps = resident ? 1 : 2;
  expect_traffic(name, {{"logits", x.p, with_kl ? sweeps : 0, 0, sector_use},
                        {"y", y.p, sweeps, 0, sector_use},
                        {"dy", dy.p, sweeps, 0, sector_use},
                        {"dlogits", dx.p, 0, 1, sector_use}});
  // grad_v = y_v (dy_v - sum y dy) / tau + gkl p_v (log p_v - sum p log p). The scale of a
  // position's errors: the largest magnitude of the terms before they cancel, y_v (|dy_v| +
  // sum |y dy|) / tau and |gkl| p_v (|log p_v| + |sum p log p|).
  Compare c{name + " grad", tolerance<T>(), 0};
  for (int64_t pos = 0; pos < s.positions(); ++pos) {
    const auto X = [&](int64_t v) { return double(to_f(x[s.at(pos, v)])); };
    const auto Y = [&](int64_t v) { return double(to_f(y[s.at(pos, v)])); };
    const auto DY = [&](int64_t v) { return double(to_f(dy[s.at(pos, v)])); };
    const double g_kl = with_kl ? to_f(gkl[size_t(pos)]) : 0.0;
    double sum = 0, sum_abs = 0, mx = -INFINITY, sx = 0, plogp = 0, big = 1e-30;
    for (int64_t v = 0; v < s.vocab; ++v) {
      sum += Y(v) * DY(v);
      sum_abs += std::fabs(Y(v) * DY(v));
      mx = std::max(mx, X(v));
    }
    for (int64_t v = 0; v < s.vocab; ++v) sx += std::exp(X(v) - mx);
    const auto logp = [&](int64_t v) { return X(v) - mx - std::log(sx); };
    for (int64_t v = 0; v < s.vocab; ++v)
      if (std::isfinite(logp(v))) plogp += std::exp(logp(v)) * logp(v);
    std::vector<double> want(s.vocab);
    for (int64_t v = 0; v < s.vocab; ++v) {
      want[v] = Y(v) * (DY(v) - sum) / tau;
      big = std::max(big, Y(v) * (std::fabs(DY(v)) + sum_abs) / tau);
      if (with_kl && std::isfinite(logp(v))) {
        const double pv = std::exp(logp(v));
        want[v] += g_kl * pv * (logp(v) - plogp);
        big = std::max(big, std::fabs(g_kl) * pv * (std::fabs(logp(v)) + std::fabs(plogp)));
      }
    }
    c.scale = big;
    for (int64_t v = 0; v < s.vocab; ++v) c(to_f(dx[s.at(pos, v)]), want[v], s.at(pos, v));
  }
  c.report();
}

// The hard sample (the two-sweep forward) and its backward, which recomputes the soft sample from
// the logits and the forward's noise: y must be the one-hot of the first argmax of u = x + g, the
// gradient the soft sample's, y_v (dy_v - sum y dy) / tau on the reference's y.
template <class T>
void gumbel_hard_case(const Shape& s, std::mt19937& rng, float tau, float spread) {
  Buf<T> x(s.size()), y(s.size()), dy(s.size()), dx(s.size());
  int64_t state[2] = {-1, -1};
  fill_logits(x, s, rng, true, spread);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (size_t i = 0; i < s.size(); ++i) dy[i] = from_f<T>(normal(rng));
  char what[64];
  std::snprintf(what, sizeof what, " tau %g, logits sd %g", double(tau), double(2 * spread));
  const std::string name = std::string("gumbel_hard ") + type_name<T>() + " " + s.str() + what;
  const GumbelParams p = forward_params<T>(s, tau, x, y, nullptr, true, state);
  launched(name + " forward", dalle_fast::cuda::gumbel_forward(p, gumbel_dtype<T>(), nullptr));
  expect_traffic(name + " forward", {{"logits", x.p, 1, 0}, {"y", y.p, 0, 1}});
  emu::unwatch(x.p);  // the backward's reads of the logits counted alone
  emu::watch(x.p, s.size() * sizeof(T));
  const GumbelParams b = backward_params<T>(s, tau, x, nullptr, dy, nullptr, state, dx);
  launched(name + " backward", dalle_fast::cuda::gumbel_backward(b, gumbel_dtype<T>(), nullptr));
  expect_traffic(name + " backward", {{"logits", x.p, 2, 0}, {"dy", dy.p, 2, 0}, {"dlogits", dx.p, 0, 1}});
  size_t wrong = 0;
  Compare c{name + " grad", tolerance<T>(), 0};
  std::vector<float> xs(s.vocab);
  std::vector<double> yr;
  for (int64_t pos = 0; pos < s.positions(); ++pos) {
    int64_t best = 0;
    float top = -INFINITY;
    for (int64_t v = 0; v < s.vocab; ++v) {
      xs[v] = to_f(x[s.at(pos, v)]);
      const float u = xs[v] + noise(pos, v);
      if (u > top) top = u, best = v;
    }
    for (int64_t v = 0; v < s.vocab; ++v) wrong += to_f(y[s.at(pos, v)]) != (v == best ? 1.0f : 0.0f);
    double kl;
    gumbel_reference(xs, pos, tau, yr, kl);
    double sum = 0, sum_abs = 0, big = 1e-30;
    for (int64_t v = 0; v < s.vocab; ++v) {
      const double d = to_f(dy[s.at(pos, v)]);
      sum += yr[v] * d;
      sum_abs += std::fabs(yr[v] * d);
    }
    for (int64_t v = 0; v < s.vocab; ++v)
      big = std::max(big, yr[v] * (std::fabs(to_f(dy[s.at(pos, v)])) + sum_abs) / tau);
    c.scale = big;
    for (int64_t v = 0; v < s.vocab; ++v)
      c(to_f(dx[s.at(pos, v)]), yr[v] * (to_f(dy[s.at(pos, v)]) - sum) / tau, s.at(pos, v));
  }
  expect(wrong == 0, name + ": y is the one-hot of the first argmax of x + g (" + std::to_string(wrong) +
                         " entries differ)");
  c.report();
}

template <class T>
void gumbel_argmax_case(const Shape& s, std::mt19937& rng) {
  const float scale = 1.3f;
  Buf<T> x(s.size());
  std::vector<int64_t> index(size_t(s.positions()), -7);
  int64_t state[2] = {-1, -1};
  fill_logits(x, s, rng, true);
  GumbelParams p = gumbel_params(s, 1.0f);
  p.hard = true;
  p.scale = scale;
  p.index = index.data();
  p.logits = x.p;
  p.rng_state = state;
  const std::string name = std::string("gumbel_argmax ") + type_name<T>() + " " + s.str();
  const char* err = dalle_fast::cuda::gumbel_forward(p, gumbel_dtype<T>(), nullptr);
  launched(name, err);
  expect_traffic(name, {{"logits", x.p, 1, 0}});
  size_t wrong = 0;
  for (int64_t pos = 0; pos < s.positions(); ++pos) {
    int64_t best = -1;
    float top = -INFINITY;
    for (int64_t v = 0; v < s.vocab; ++v) {
      const float z = std::fma(to_f(x[s.at(pos, v)]), scale, noise(pos, v));
      if (z > top) top = z, best = v;
    }
    wrong += index[size_t(pos)] != best;
  }
  expect(wrong == 0, name + ": " + std::to_string(wrong) + " of " + std::to_string(s.positions()) +
                         " indices differ from the first max of x * scale + g");
}

// Under ThreadSanitizer every CUDA thread of a cluster is one of its threads, and it allows 8128:
// a one-read cluster of 16 blocks of 512 threads (V > 8192, or 4096 with the backward's KL term)
// does not fit, and is skipped there (the other builds run it).
bool fits_race_check(const Shape& s, int quads_per_thread, const char* what) {
#if defined(__SANITIZE_THREAD__)
  const int64_t blocks = (s.vocab + 64 * quads_per_thread - 1) / (64 * quads_per_thread);
  if (blocks * 512 > 8000) {
    std::printf("SKIP %s %s: a cluster of %lld blocks is too many threads for ThreadSanitizer\n", what,
                s.str().c_str(), static_cast<long long>(blocks));
    return false;
  }
#else
  (void)s, (void)quads_per_thread, (void)what;
#endif
  return true;
}

// Near-uniform logits (x ~ 1e-4, KL ~5e-9): the KL as log V + sum p log p cancelled to a few
// -1e-7 in float32. The one-pass statistics still round sum e^x (~1e-7 relative), but the KL
// must stay >= 0 and within 3e-7 of the float64 one.
void gumbel_kl_near_uniform(std::mt19937& rng) {
  std::normal_distribution<float> small(0.0f, 1e-4f);
  for (const Shape& s : {Shape{2, 8192, 3}, Shape{3, 4096, 1}}) {
    for (bool resident : {true, false}) {
      if (resident && (s.inner == 1 || !fits_race_check(s, 16, "gumbel_fwd near-uniform"))) continue;
      Buf<float> x(s.size()), y(s.size()), kl(size_t(s.positions()));
      int64_t state[2] = {-1, -1};
      for (size_t i = 0; i < x.n; ++i) x[i] = small(rng);
      GumbelParams p = gumbel_params(s, 1.0f);
      p.with_kl = true;
      p.logits = x.p;
      p.y = y.p;
      p.kl = kl.p;
      p.rng_state = state;
      const std::string name = run_gumbel<float>("gumbel_fwd near-uniform", s, p, Pass::Forward, resident);
      std::vector<float> xs(s.vocab);
      std::vector<double> yr;
      double worst = 0, lowest = INFINITY;
      for (int64_t pos = 0; pos < s.positions(); ++pos) {
        for (int64_t v = 0; v < s.vocab; ++v) xs[v] = x[s.at(pos, v)];
        double klr = 0;
        gumbel_reference(xs, pos, 1.0f, yr, klr);
        worst = std::max(worst, std::fabs(double(kl[size_t(pos)]) - klr));
        lowest = std::min(lowest, double(kl[size_t(pos)]));
      }
      char line[160];
      std::snprintf(line, sizeof line, ": kl >= 0 (least %.3g) and within 3e-7 of float64 (worst %.3g)", lowest, worst);
      expect(lowest >= 0 && worst <= 3e-7, name + line);
    }
  }
}

void gumbel_fwd() {
  std::mt19937 rng(1);
  // Clusters of 8 whole blocks over 2.5 tiles; 5 partial blocks; one block; 16 blocks (non-portable).
  const Shape shapes[] = {{2, 8192, 40}, {1, 5000, 33}, {3, 100, 7}, {1, 16384, 5}};
  for (const Shape& s : shapes) {
    for (bool kl : {false, true}) {
      if (kl && s.vocab > 8192) continue;
      if (!fits_race_check(s, 16, "gumbel_fwd")) continue;
      gumbel_forward_case<float>(s, kl, true, rng);
    }
  }
  gumbel_forward_case<__half>(shapes[0], true, true, rng);
  gumbel_forward_case<__nv_bfloat16>(shapes[1], false, true, rng);
  gumbel_forward_case<float>(shapes[1], true, false, rng);
  gumbel_forward_case<__nv_bfloat16>({5, 300, 1}, true, false, rng);
  // Logits up to about 1e38: (x + g) / tau passes FLT_MAX; the max comes off before the scaling.
  gumbel_forward_case<float>(shapes[1], true, true, rng, 0, 0.1f, 1e37f);
  gumbel_forward_case<__nv_bfloat16>(shapes[2], false, true, rng, 0, 1e-30f, 1e37f);
  gumbel_forward_case<float>({5, 300, 1}, true, false, rng, 0, 0.1f, 1e37f);
  gumbel_forward_case<float>(shapes[2], false, false, rng, 0, 1e-30f, 1e37f);
  gumbel_kl_near_uniform(rng);
}

// A device that keeps too few clusters resident (EMU_MAX_CLUSTERS=1 on 132 SMs): the one-read
// kernels refuse the call, "require" says so, and by default the ops fall back to the two-sweep
// kernels with the same results. Its own process: the plan caches the device's answer.
void gumbel_fallback() {
  set_env("EMU_SMS", "132");
  set_env("EMU_MAX_CLUSTERS", "1");
  std::mt19937 rng(8);
  const Shape s{2, 8192, 40};
  Buf<float> x(s.size()), y(s.size());
  int64_t state[2] = {-1, -1};
  fill_logits(x, s, rng, false);
  GumbelParams p = gumbel_params(s, 0.7f);
  p.logits = x.p;
  p.y = y.p;
  p.rng_state = state;
  set_env("DALLE_FAST_GUMBEL_RESIDENT", "require");
  const char* err = dalle_fast::cuda::gumbel_forward(p, GumbelDType::Float32, nullptr);
  expect(err != nullptr && std::string(err).find("too few clusters resident") != std::string::npos,
         "gumbel_fallback: require refuses a device with too few clusters resident" + detail(err));
  set_env("DALLE_FAST_GUMBEL_RESIDENT", nullptr);
  launched("gumbel_fallback forward", dalle_fast::cuda::gumbel_forward(p, GumbelDType::Float32, nullptr));
  Compare c{"gumbel_fallback y", tolerance<float>(), 1e-6};
  std::vector<float> xs(s.vocab);
  std::vector<double> yr;
  for (int64_t pos = 0; pos < s.positions(); ++pos) {
    for (int64_t v = 0; v < s.vocab; ++v) xs[v] = x[s.at(pos, v)];
    double kl = 0;
    gumbel_reference(xs, pos, 0.7f, yr, kl);
    for (int64_t v = 0; v < s.vocab; ++v) c(y[s.at(pos, v)], yr[v], s.at(pos, v));
  }
  c.report();
}

void gumbel_bwd() {
  std::mt19937 rng(2);
  const Shape shapes[] = {{2, 8192, 40}, {1, 5000, 33}, {3, 100, 7}};
  for (const Shape& s : shapes)
    for (bool kl : {false, true})
      if (fits_race_check(s, kl ? 8 : 16, "gumbel_bwd")) gumbel_backward_case<float>(s, kl, true, rng);
  gumbel_backward_case<float>({2, 4000, 37}, true, true, rng);  // clusters of 8 with the KL term
  gumbel_backward_case<__half>(shapes[1], true, true, rng);
  gumbel_backward_case<__nv_bfloat16>(shapes[0], false, true, rng);
  gumbel_backward_case<float>(shapes[1], true, false, rng);
  gumbel_hard_case<float>(shapes[2], rng, 0.7f, 1.0f);
  gumbel_hard_case<__half>({5, 300, 1}, rng, 0.7f, 1.0f);
  gumbel_hard_case<float>({2, 1000, 3}, rng, 0.1f, 1e37f);
  gumbel_hard_case<__nv_bfloat16>({4, 64, 1}, rng, 1e-30f, 1e37f);
}

void gumbel_argmax() {
  std::mt19937 rng(3);
  gumbel_argmax_case<float>({16, 8192, 1}, rng);
  gumbel_argmax_case<__half>({3, 1000, 1}, rng);
  gumbel_argmax_case<__nv_bfloat16>({2, 513, 3}, rng);
}

// NaN logits: a NaN at a random entry of some positions (every entry NaN at one; -inf entries
// besides). Such a position's soft sample, hard sample and KL are NaN throughout, its gradients
// NaN, and the Gumbel-max draw is its first NaN (as torch.argmax); every other position keeps
// the bits it has without the NaNs. On every path: the one-read and two-sweep forwards (soft,
// with and without the KL term) and backwards, the hard forward and its backward, gumbel_argmax.
template <class T>
void gumbel_nan_case(const Shape& s, std::mt19937& rng) {
  const float tau = 0.7f;
  const size_t n = s.size(), P = size_t(s.positions());
  Buf<T> x(n), xn(n), dy(n), gkl(P);
  fill_logits(x, s, rng, true);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (size_t i = 0; i < n; ++i) dy[i] = from_f<T>(normal(rng));
  for (size_t i = 0; i < P; ++i) gkl[i] = from_f<T>(normal(rng));
  std::vector<char> poisoned(P, 0);
  std::vector<int64_t> first_nan(P, -1);
  std::uniform_int_distribution<int64_t> pick_v(0, s.vocab - 1);
  for (size_t i = 0; i < n; ++i) xn[i] = x[i];
  for (int64_t pos = 0; pos < s.positions(); ++pos) {
    if (pos % 3 == 2) continue;
    poisoned[size_t(pos)] = 1;
    const int64_t v = pos == 0 ? 0 : pick_v(rng);
    for (int64_t u = (pos == 1 ? 0 : v); u < (pos == 1 ? s.vocab : v + 1); ++u)
      xn[s.at(pos, u)] = from_f<T>(std::numeric_limits<float>::quiet_NaN());
    first_nan[size_t(pos)] = pos == 1 ? 0 : v;
  }
  // Whether out (on the NaN logits) is NaN at every entry of the poisoned positions and equals
  // clean (on the clean logits) elsewhere; per = entries per position (1: one value each).
  const auto check = [&](const std::string& what, Buf<T>& clean, Buf<T>& out, int64_t per) {
    size_t wrong = 0;
    for (int64_t pos = 0; pos < s.positions(); ++pos)
      for (int64_t v = 0; v < per; ++v) {
        const size_t at = per == 1 ? size_t(pos) : s.at(pos, v);
        const float got = to_f(out[at]), want = to_f(clean[at]);
        wrong += poisoned[size_t(pos)] ? !std::isnan(got) : !(got == want || (got == 0 && want == 0));
      }
    expect(wrong == 0, "gumbel_nan " + std::string(type_name<T>()) + " " + s.str() + " " + what + ": " +
                           std::to_string(wrong) + " entries not NaN where a logit is, or changed elsewhere");
  };
  const int64_t inner_paths = s.inner > 1 ? 2 : 1;  // the one-read kernels take inner > 1 only
  for (int64_t r = 0; r < inner_paths; ++r) {
    const bool resident = r == 1;
    for (bool with_kl : {false, true}) {
      if (resident && !fits_race_check(s, with_kl ? 8 : 16, "gumbel_nan backward")) continue;
      Buf<T> y0(n), y1(n), k0(P), k1(P), d0(n), d1(n);
      const auto forward = [&](Buf<T>& logits, Buf<T>& y, Buf<T>& kl) {
        int64_t state[2] = {-1, -1};
        const GumbelParams p = forward_params(s, tau, logits, y, with_kl ? kl.p : nullptr, false, state);
        run_gumbel<T>("gumbel_nan forward", s, p, Pass::Forward, resident);
      };
      const auto backward = [&](Buf<T>& logits, Buf<T>& y, Buf<T>& dx) {
        int64_t state[2] = {int64_t(kSeed), int64_t(kOffset)};
        const GumbelParams p = backward_params(s, tau, logits, y.p, dy, with_kl ? gkl.p : nullptr, state, dx);
        run_gumbel<T>("gumbel_nan backward", s, p, Pass::Backward, resident);
      };
      forward(x, y0, k0);
      forward(xn, y1, k1);
      backward(x, y0, d0);
      backward(xn, y1, d1);
      const std::string path = std::string(resident ? "one-read" : "two-sweep") + (with_kl ? " kl" : "");
      check(path + " y", y0, y1, s.vocab);
      if (with_kl) check(path + " kl", k0, k1, 1);
      check(path + " grad", d0, d1, s.vocab);
    }
  }
  {  // the hard sample and its backward, which recomputes the soft sample
    Buf<T> y0(n), y1(n), d0(n), d1(n);
    const auto hard = [&](Buf<T>& logits, Buf<T>& y, Buf<T>& dx) {
      int64_t state[2] = {-1, -1};
      const GumbelParams p = forward_params<T>(s, tau, logits, y, nullptr, true, state);
      launched("gumbel_nan hard forward", dalle_fast::cuda::gumbel_forward(p, gumbel_dtype<T>(), nullptr));
      const GumbelParams b = backward_params<T>(s, tau, logits, nullptr, dy, nullptr, state, dx);
      launched("gumbel_nan hard backward", dalle_fast::cuda::gumbel_backward(b, gumbel_dtype<T>(), nullptr));
    };
    hard(x, y0, d0);
    hard(xn, y1, d1);
    check("hard y", y0, y1, s.vocab);
    check("hard grad", d0, d1, s.vocab);
  }
  {  // the Gumbel-max draw
    std::vector<int64_t> i0(P, -7), i1(P, -7);
    const auto draw = [&](Buf<T>& logits, std::vector<int64_t>& index) {
      int64_t state[2] = {-1, -1};
      GumbelParams p = gumbel_params(s, 1.0f);
      p.hard = true;
      p.scale = 1.3f;
      p.index = index.data();
      p.logits = logits.p;
      p.rng_state = state;
      launched("gumbel_nan argmax", dalle_fast::cuda::gumbel_forward(p, gumbel_dtype<T>(), nullptr));
    };
    draw(x, i0);
    draw(xn, i1);
    size_t wrong = 0;
    for (size_t pos = 0; pos < P; ++pos) wrong += i1[pos] != (poisoned[pos] ? first_nan[pos] : i0[pos]);
    const std::string name = "gumbel_nan " + std::string(type_name<T>()) + " " + s.str() + " argmax: ";
    expect(wrong == 0,
           name + std::to_string(wrong) + " indices not the first NaN where there is one, or changed elsewhere");
  }
}

void gumbel_nan() {
  std::mt19937 rng(11);
  gumbel_nan_case<float>({1, 8192, 40}, rng);  // one-read: whole blocks, a full tile and a partial one
  gumbel_nan_case<float>({2, 5000, 7}, rng);   // one-read: partial blocks
  gumbel_nan_case<__nv_bfloat16>({3, 300, 5}, rng);
  gumbel_nan_case<float>({7, 1000, 1}, rng);  // softmax over the contiguous dim: two-sweep only
}

// The one-read Gumbel kernels at the layout of issue 4's target, scaled down (the traffic build;
// elsewhere it checks values only): the dVAE's NCHW logits (a vocabulary of 8192, as clusters of
// 8 blocks; inner = 32 x 32 positions) must be read once and written once in whole sectors,
// forward and backward, in every dtype. (skinny_linear's sampling-step case is in skinny_linear.)
void traffic() {
  std::mt19937 rng(9);
  for (const Shape& s : {Shape{1, 8192, 64}, Shape{1, 1024, 1024}}) {
    gumbel_forward_case<float>(s, true, true, rng, 1.0);
    gumbel_forward_case<__nv_bfloat16>(s, false, true, rng, 1.0);
    gumbel_backward_case<float>(s, true, true, rng, 1.0);
    gumbel_backward_case<__half>(s, false, true, rng, 1.0);
  }
}

// ---- Decode ---------------------------------------------------------------------------------
struct DecodeShape {
  int64_t batch, heads, text, image, dim;
  std::vector<int64_t> offsets;
  int64_t g;              // may lie outside the image: then no row is written and fewer keys exist
  int64_t q_rows = 1;     // q is row 0 of q_rows rows per batch (a view of a qkv projection: 3)
  int64_t row_pad = 0;    // the caches' rows are dim + row_pad apart (not a multiple of 8: no fast kernel)
};

// Which decode kernel a case asks for: the general one (DALLE_FAST_DECODE_FAST=0), the fast one
// (its shape qualifies: checked by the kernel that ran), or whichever the launcher picks.
enum class Pick { General, Fast, Any };

template <class T>
void decode_case(const DecodeShape& s, bool append, Pick pick, std::mt19937& rng) {
  const int64_t B = s.batch, H = s.heads, N = s.text + s.image, D = s.dim, K = int64_t(s.offsets.size());
  const int64_t R = D + s.row_pad;  // cache row stride
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t q_sb = s.q_rows * H * D;
  Buf<T> q(size_t(B * q_sb)), k(size_t(B * H * N * R)), v(size_t(B * H * N * R)), kn(size_t(B * H * D)),
      vn(size_t(B * H * D)), out(size_t(B * H * D));
  for (size_t i = 0; i < q.n; ++i) q[i] = from_f<T>(normal(rng));
  for (size_t i = 0; i < k.n; ++i) k[i] = from_f<T>(normal(rng)), v[i] = from_f<T>(normal(rng));
  for (size_t i = 0; i < kn.n; ++i) kn[i] = from_f<T>(normal(rng)), vn[i] = from_f<T>(normal(rng));
  const int64_t row = s.text + s.g;  // this step's row
  const bool in_cache = s.g >= 0 && row < N;
  const auto at = [&](int64_t bh, int64_t n, int64_t d) { return size_t((bh * N + n) * R + d); };
  if (in_cache) {
    // Without appending the caches hold this step's row already; with it they hold garbage there,
    // which the kernel must overwrite.
    for (int64_t bh = 0; bh < B * H; ++bh) {
      for (int64_t d = 0; d < D; ++d) {
        k[at(bh, row, d)] = append ? from_f<T>(1e4f) : kn[size_t(bh * D + d)];
        v[at(bh, row, d)] = append ? from_f<T>(-1e4f) : vn[size_t(bh * D + d)];
      }
    }
  }
  std::vector<T> k_before(k.p, k.p + k.n), v_before(v.p, v.p + v.n);
  int64_t g = s.g;
  DecodeParams p;
  p.batch = B;
  p.heads = H;
  p.seq = N;
  p.dim = D;
  p.text_len = s.text;
  p.num_offsets = K;
  p.scale = 1.0 / std::sqrt(double(D));
  p.q = q.p;
  p.q_sb = q_sb;
  p.q_sh = D;
  p.k = {k.p, H * N * R, N * R, R};
  p.v = {v.p, H * N * R, N * R, R};
  p.offsets = s.offsets.data();
  p.g = &g;
  p.out = out.p;
  if (append) {
    p.k_new = {kn.p, H * D, D, 0};
    p.v_new = {vn.p, H * D, D, 0};
  }
  const char* picked = pick == Pick::General ? "general " : pick == Pick::Fast ? "fast " : "";
  const std::string name = std::string("decode ") + picked + type_name<T>() + " B=" + std::to_string(B) +
                           " H=" + std::to_string(H) + " D=" + std::to_string(D) + " T=" + std::to_string(s.text) +
                           " N=" + std::to_string(N) + " offsets=" + std::to_string(K) + " g=" + std::to_string(g) +
                           (s.row_pad ? " padded rows" : "") + (append ? " append" : "");
  set_env("DALLE_FAST_DECODE_FAST", pick == Pick::General ? "0" : nullptr);
  const char* err = dalle_fast::cuda::sparse_decode(p, attn_dtype<T>(), nullptr);
  const void* kernel = emu::last_kernel();
  set_env("DALLE_FAST_DECODE_FAST", nullptr);
  launched(name, err);
  Compare c{name + " out", tolerance<T>(), 0, 0.1};
  std::vector<char> read(size_t(B * H * N), 0);  // the cache rows the step must read
  for (int64_t bh = 0; bh < B * H; ++bh) {
    const T* qr = q.p + (bh / H) * q_sb + (bh % H) * D;
    std::vector<double> w;
    std::vector<const T*> vr;
    double top = -INFINITY;
    for (int64_t j = 0; j < s.text + K; ++j) {
      int64_t key = j;
      if (j >= s.text) {
        const int64_t src = g - s.offsets[size_t(j - s.text)];
        if (src < 0 || s.text + src >= N) continue;
        key = s.text + src;
      }
      const bool fresh = key == row;
      read[size_t(bh * N + key)] = !(fresh && append);  // appending, this step's key comes from k_new
      const T* kr = fresh ? kn.p + bh * D : &k_before[at(bh, key, 0)];
      double dot = 0;
      for (int64_t d = 0; d < D; ++d) dot += double(to_f(qr[d])) * to_f(kr[d]);
      w.push_back(dot * p.scale);
      vr.push_back(fresh ? vn.p + bh * D : &v_before[at(bh, key, 0)]);
      top = std::max(top, w.back());
    }
    double sum = 0;
    for (double& x : w) sum += (x = std::exp(x - top));
    for (int64_t d = 0; d < D; ++d) {
      double acc = 0;
      for (size_t i = 0; i < w.size(); ++i) acc += w[i] * to_f(vr[i][d]);
      c(to_f(out[size_t(bh * D + d)]), w.empty() ? 0.0 : acc / sum, size_t(bh * D + d));
    }
  }
  c.report();
  // The caches afterwards: this step's row (appending, g inside) is k_new / v_new, every other
  // byte as before.
  size_t wrong = 0;
  for (int64_t bh = 0; bh < B * H; ++bh) {
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t d = 0; d < R; ++d) {
        const bool fresh = append && in_cache && n == row && d < D;
        const T* kw = fresh ? &kn[size_t(bh * D + d)] : &k_before[at(bh, n, d)];
        const T* vw = fresh ? &vn[size_t(bh * D + d)] : &v_before[at(bh, n, d)];
        wrong += std::memcmp(&k[at(bh, n, d)], kw, sizeof(T)) != 0 || std::memcmp(&v[at(bh, n, d)], vw, sizeof(T)) != 0;
      }
    }
  }
  expect(wrong == 0, name + ": the caches hold this step's key and value (appending) and are otherwise unchanged");
  if (emu::traffic_counted()) {
    // The step reads the rows of the keys its mask allows, whole, and no other byte of the caches
    // (padding included). The fast kernel reads each of those bytes once, in whole sectors (its
    // idle slots and masked keys load nothing).
    size_t wrong_rows = 0, rereads = 0;
    for (const Buf<T>* cache : {&k, &v}) {
      for (int64_t bh = 0; bh < B * H; ++bh) {
        for (int64_t n = 0; n < N; ++n) {
          const emu::Traffic t = emu::traffic_in(cache->p, at(bh, n, 0) * sizeof(T), size_t(R) * sizeof(T));
          wrong_rows += t.loaded_once != (read[size_t(bh * N + n)] ? size_t(D) * sizeof(T) : 0);
          rereads += t.max_loads > 1;
        }
      }
    }
    expect(wrong_rows == 0, "traffic " + name + ": " + std::to_string(wrong_rows) +
                                " cache rows read otherwise than the mask allows");
    if (pick == Pick::Fast) {
      const double use = std::min(emu::traffic(k.p).sector_use(), emu::traffic(v.p).sector_use());
      expect(rereads == 0 && use >= 1.0, "traffic " + name + ": " + std::to_string(rereads) +
                                             " rows read more than once; " +
                                             std::to_string(int(100 * use)) + "% of sector bytes used");
    }
  }
  static const void* general_kernel[3] = {};
  const int t = std::is_same_v<T, float> ? 0 : std::is_same_v<T, __half> ? 1 : 2;
  if (pick == Pick::General) general_kernel[t] = kernel;
  if (pick == Pick::Fast && general_kernel[t] != nullptr)
    expect(kernel != general_kernel[t], name + ": a kernel other than the general one ran");
}

void decode() {
  std::mt19937 rng(4);
  // A conv-like list of offsets (0 is the query itself) and a row-like one reaching far back.
  std::vector<int64_t> conv, far;
  for (int64_t dy = 0; dy < 3; ++dy)
    for (int64_t dx = -2; dx <= 2; ++dx)
      if (dy > 0 || dx <= 0) conv.push_back(dy * 32 - dx);
  for (int64_t o = 0; o < 1100; o += 3) far.push_back(o);
  const DecodeShape shapes[] = {
      {2, 3, 64, 1024, 64, conv, 200},   // few keys
      {1, 2, 1100, 1024, 32, far, 1000}, // more than one key group of HD 32 (1024 keys): 1467 keys
      {2, 2, 300, 256, 128, conv, 40},   // groups of 256 keys at HD 128
      {1, 1, 8, 64, 64, conv, 0},        // g = 0: offsets before the image start
      {3, 2, 32, 256, 64, conv, 255, 3}, // q a view of a qkv projection; the last position
  };
  for (const DecodeShape& s : shapes) {
    for (bool append : {false, true}) {
      decode_case<__half>(s, append, Pick::General, rng);
      decode_case<__half>(s, append, Pick::Fast, rng);
    }
    decode_case<__nv_bfloat16>(s, true, Pick::General, rng);
    decode_case<__nv_bfloat16>(s, true, Pick::Fast, rng);
  }
  decode_case<float>({2, 2, 20, 100, 48, conv, 50}, true, Pick::General, rng);
  decode_case<float>({1, 2, 600, 1024, 64, far, 900}, false, Pick::General, rng);
  // More keys than a block's shared memory holds (8 bytes each, 227 KiB): refused with the reason,
  // before any launch, and no error left behind for the next launch check to blame on its kernel.
  for (bool fast : {false, true}) {
    DecodeParams p;
    p.batch = p.heads = 1;
    p.dim = 64;
    p.text_len = 30000;
    p.seq = p.text_len + 1;
    set_env("DALLE_FAST_DECODE_FAST", fast ? nullptr : "0");
    const char* err = dalle_fast::cuda::sparse_decode(p, attn_dtype<__half>(), nullptr);
    set_env("DALLE_FAST_DECODE_FAST", nullptr);
    const std::string what = std::string("decode ") + (fast ? "fast" : "general") + " with 30000 keys";
    expect(err != nullptr && std::strstr(err, "30000 keys need 240000 bytes") != nullptr,
           what + ": refused with its reason" + detail(err));
    expect(cudaGetLastError() == cudaSuccess, what + ": leaves no CUDA error behind");
  }
}

// ---- skinny_linear --------------------------------------------------------------------------
template <class T>
void linear_case(int64_t m, int64_t n, int64_t k, bool ln, bool bias, bool gelu, bool residual, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t xs = k + 8;  // a row stride other than k
  Buf<T> x{size_t(m * xs)}, w{size_t(n * k)}, b{size_t(n)}, r{size_t(m * n)}, out{size_t(m * n)}, gam{size_t(k)},
      bet{size_t(k)};
  for (size_t i = 0; i < x.n; ++i) x[i] = from_f<T>(normal(rng) + 0.5f);
  for (size_t i = 0; i < w.n; ++i) w[i] = from_f<T>(normal(rng) / std::sqrt(float(k)));
  for (size_t i = 0; i < b.n; ++i) b[i] = from_f<T>(normal(rng));
  for (size_t i = 0; i < r.n; ++i) r[i] = from_f<T>(normal(rng));
  for (size_t i = 0; i < gam.n; ++i) {
    gam[i] = from_f<T>(1.0f + 0.2f * normal(rng));
    bet[i] = from_f<T>(0.1f * normal(rng));
  }
  LinearParams p;
  p.m = m;
  p.n = n;
  p.k = k;
  p.x = x.p;
  p.x_stride = xs;
  p.w = w.p;
  p.bias = bias ? b.p : nullptr;
  p.residual = residual ? r.p : nullptr;
  p.res_stride = n;
  p.out = out.p;
  p.activation = gelu ? Activation::Gelu : Activation::None;
  if (ln) p.ln_weight = gam.p, p.ln_bias = bet.p;
  const std::string name = std::string("skinny_linear ") + type_name<T>() + " m=" + std::to_string(m) +
                           " n=" + std::to_string(n) + " k=" + std::to_string(k) + (ln ? " ln" : "") +
                           (bias ? " bias" : "") + (gelu ? " gelu" : "") + (residual ? " residual" : "");
  const char* err = dalle_fast::cuda::skinny_linear(p, attn_dtype<T>(), nullptr);
  launched(name, err);
  // The weights once, each warp request using whole sectors (16 contiguous bytes per lane).
  expect_traffic(name, {{"w", w.p, 1, 0, 1.0}, {"out", out.p, 0, 1}});
  Compare c{name, tolerance<T>(), 0, 0.1};
  std::vector<double> xr(k);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < k; ++j) xr[j] = to_f(x[size_t(i * xs + j)]);
    if (ln) {  // nn.LayerNorm, its output rounded to T as the layer would store it
      double mean = 0, var = 0;
      for (double v : xr) mean += v;
      mean /= double(k);
      for (double v : xr) var += (v - mean) * (v - mean);
      var /= double(k);
      for (int64_t j = 0; j < k; ++j)
        xr[j] = to_f(from_f<T>(float((xr[j] - mean) / std::sqrt(var + 1e-5) * to_f(gam[size_t(j)]) +
                                     to_f(bet[size_t(j)]))));
    }
    for (int64_t o = 0; o < n; ++o) {
      double acc = 0;
      for (int64_t j = 0; j < k; ++j) acc += xr[j] * to_f(w[size_t(o * k + j)]);
      if (bias) acc += to_f(b[size_t(o)]);
      if (gelu) acc = 0.5 * acc * (1.0 + std::erf(acc / std::sqrt(2.0)));
      if (residual) acc += to_f(r[size_t(i * n + o)]);
      c(to_f(out[size_t(i * n + o)]), acc, size_t(i * n + o));
    }
  }
  c.report();
}

void skinny_linear() {
  std::mt19937 rng(5);
  linear_case<__half>(1, 16, 64, false, false, false, false, rng);
  linear_case<__half>(5, 24, 96, true, true, true, false, rng);
  linear_case<__nv_bfloat16>(16, 8, 512, true, true, false, true, rng);
  linear_case<__nv_bfloat16>(33, 16, 256, false, true, true, true, rng);
  linear_case<__half>(64, 16, 1024, true, false, false, true, rng);
  linear_case<__nv_bfloat16>(17, 32, 32, true, true, true, true, rng);
  linear_case<__half>(16, 1536, 512, true, true, false, false, rng);  // a sampling step's qkv projection
}

// ---- Sparse attention (GPU-proven kernels: the emulation's control) ------------------------------
// The one-warp-per-row kernels (attention_fwd.cu, attention_bwd.cu) and the flash tensor-core
// ones (flash_fwd.cu, flash_bwd.cu: cp.async, ldmatrix, mma, fp32 atomics for dq) against dense
// masked attention in double: out, lse, then dq, dk, dv from dout.
template <class T>
void attention_case(const MaskSpec& mask, int64_t B, int64_t H, int64_t D, bool flash, std::mt19937& rng) {
  const int64_t N = mask.seq_len();
  const size_t n = size_t(B * H * N * D), rows = size_t(B * H * N);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Buf<T> q(n), k(n), v(n), out(n), dout(n), dq(n), dk(n), dv(n);
  Buf<float> lse(rows), delta(rows), dq_acc(n);
  for (size_t i = 0; i < n; ++i) {
    q[i] = from_f<T>(normal(rng)), k[i] = from_f<T>(normal(rng)), v[i] = from_f<T>(normal(rng));
    dout[i] = from_f<T>(normal(rng)), dq_acc[i] = 0.0f;
  }
  AttnParams p;
  p.batch = B;
  p.heads = H;
  p.seq = N;
  p.dim = D;
  p.scale = 1.0 / std::sqrt(double(D));
  p.mask = mask;
  const auto bhnd = [&](void* ptr) { return BHND{ptr, H * N * D, N * D, D}; };
  p.q = bhnd(q.p), p.k = bhnd(k.p), p.v = bhnd(v.p), p.out = bhnd(out.p);
  p.dout = bhnd(dout.p), p.dq = bhnd(dq.p), p.dk = bhnd(dk.p), p.dv = bhnd(dv.p);
  p.lse = {lse.p, H, N};
  p.delta = {delta.p, H, N};
  const char* kinds[] = {"row", "column", "conv", "causal"};
  const std::string name = std::string("attention ") + (flash ? "flash " : "one-warp ") + type_name<T>() + " " +
                           kinds[int(mask.kind)] + " T=" + std::to_string(mask.text_len) + " S=" +
                           std::to_string(mask.grid) + " B=" + std::to_string(B) + " H=" + std::to_string(H) +
                           " D=" + std::to_string(D);
  if (flash) {
    const bool ok = dalle_fast::cuda::flash_forward_supported(p, attn_dtype<T>()) &&
                    dalle_fast::cuda::flash_backward_supported(p, attn_dtype<T>());
    expect(ok, name + ": the flash kernels take this call");
    if (!ok) return;
    const dalle_fast::cuda::PlanView plan = dalle_fast::cuda::device_plan(mask, dalle_fast::cuda::kFlashTile, 0);
    launched(name + " forward", dalle_fast::cuda::flash_forward(p, plan, attn_dtype<T>(), nullptr));
    launched(name + " delta", dalle_fast::cuda::attention_delta(p, attn_dtype<T>(), nullptr));
    launched(name + " backward", dalle_fast::cuda::flash_backward(p, plan, dq_acc.p, attn_dtype<T>(), nullptr));
  } else {
    launched(name + " forward", dalle_fast::cuda::attention_forward(p, attn_dtype<T>(), nullptr));
    launched(name + " backward", dalle_fast::cuda::attention_backward(p, attn_dtype<T>(), nullptr));
  }
  // flash rounds P to T before P V and dS to T before dS K / dS^T Q, errors of the output's scale
  // (its root mean square) rather than of each element's
  const double tol = tolerance<T>() * (flash ? 4 : 1), floor = flash ? 1.0 : 0.1;
  Compare co{name + " out", tol, 0, floor}, cl{name + " lse", tol, 0, floor}, cq{name + " dq", tol, 0, floor},
      ck{name + " dk", tol, 0, floor}, cv{name + " dv", tol, 0, floor};
  for (int64_t bh = 0; bh < B * H; ++bh) {
    const auto at = [&](int64_t i, int64_t d) { return size_t((bh * N + i) * D + d); };
    std::vector<double> P(size_t(N * N), 0.0), dP(size_t(N * N), 0.0);
    std::vector<double> gq(size_t(N * D), 0.0), gk(size_t(N * D), 0.0), gv(size_t(N * D), 0.0);
    for (int64_t i = 0; i < N; ++i) {
      double top = -INFINITY;
      for (int64_t j = 0; j < N; ++j) {
        if (!allowed(mask, i, j)) continue;
        double dot = 0;
        for (int64_t d = 0; d < D; ++d) dot += double(to_f(q[at(i, d)])) * to_f(k[at(j, d)]);
        P[size_t(i * N + j)] = dot * p.scale;
        top = std::max(top, dot * p.scale);
      }
      double sum = 0;
      for (int64_t j = 0; j < N; ++j)
        if (allowed(mask, i, j)) sum += (P[size_t(i * N + j)] = std::exp(P[size_t(i * N + j)] - top));
      cl(lse[size_t(bh * N + i)], top + std::log(sum), size_t(bh * N + i));
      double dsum = 0;  // delta = rowsum(dout * out)
      for (int64_t d = 0; d < D; ++d) {
        double o = 0;
        for (int64_t j = 0; j < N; ++j) o += (P[size_t(i * N + j)] /= (d == 0 ? sum : 1.0)) * to_f(v[at(j, d)]);
        co(to_f(out[at(i, d)]), o, at(i, d));
        dsum += double(to_f(dout[at(i, d)])) * to_f(out[at(i, d)]);
      }
      for (int64_t j = 0; j < N; ++j) {
        const double pij = P[size_t(i * N + j)];
        if (pij == 0) continue;
        double dpij = 0;
        for (int64_t d = 0; d < D; ++d) {
          dpij += double(to_f(dout[at(i, d)])) * to_f(v[at(j, d)]);
          gv[size_t(j * D + d)] += pij * to_f(dout[at(i, d)]);
        }
        const double ds = pij * (dpij - dsum) * p.scale;
        for (int64_t d = 0; d < D; ++d) {
          gq[size_t(i * D + d)] += ds * to_f(k[at(j, d)]);
          gk[size_t(j * D + d)] += ds * to_f(q[at(i, d)]);
        }
      }
    }
    for (int64_t i = 0; i < N; ++i) {
      for (int64_t d = 0; d < D; ++d) {
        cq(flash ? double(dq_acc[at(i, d)]) : double(to_f(dq[at(i, d)])), gq[size_t(i * D + d)], at(i, d));
        ck(to_f(dk[at(i, d)]), gk[size_t(i * D + d)], at(i, d));
        cv(to_f(dv[at(i, d)]), gv[size_t(i * D + d)], at(i, d));
      }
    }
  }
  for (Compare* c : {&co, &cl, &cq, &ck, &cv}) c->report();
}

void attention() {
  std::mt19937 rng(7);
  const MaskSpec masks[] = {{MaskKind::Row, 16, 8, 0},
                            {MaskKind::Column, 5, 9, 0},
                            {MaskKind::Conv, 8, 10, 1},
                            {MaskKind::Causal, 3, 7, 0}};
  for (const MaskSpec& m : masks) {
    attention_case<__half>(m, 2, 1, 64, true, rng);
    attention_case<float>(m, 1, 2, 40, false, rng);
  }
  attention_case<__nv_bfloat16>({MaskKind::Conv, 20, 12, 2}, 1, 2, 32, true, rng);
  attention_case<__half>({MaskKind::Row, 7, 11, 0}, 1, 1, 128, true, rng);
  attention_case<__nv_bfloat16>({MaskKind::Column, 9, 6, 0}, 2, 1, 24, false, rng);
}

// ---- The emulation's own 16-bit conversions --------------------------------------------------
// The stand-in cuda_fp16.h / cuda_bf16.h against independent ones: the compiler's _Float16 (IEEE
// round to nearest even), and for bfloat16 the nearer of the two neighbouring values (ties to the
// even one), on every 16-bit value and on random and special floats.
uint16_t bf16_reference(float f) {
  const uint32_t x = emu::bit_cast<uint32_t>(f);
  if (std::isnan(f)) return uint16_t((x >> 16) | 0x40u);
  const uint16_t lo = uint16_t(x >> 16), hi = uint16_t(lo + 1);  // truncated, and one unit further from 0
  // hi's value; past the largest finite bfloat16 that is 2^128, where IEEE rounding puts infinity
  const auto value = [](uint16_t b) {
    const float v = emu::bit_cast<float>(uint32_t(b) << 16);
    return std::isinf(v) ? std::copysign(std::ldexp(1.0, 128), double(v)) : double(v);
  };
  if (std::isinf(f) || (x & 0xffffu) == 0) return lo;
  const double dl = std::fabs(value(lo) - double(f)), dh = std::fabs(value(hi) - double(f));
  if (dl != dh) return dl < dh ? lo : hi;
  return (lo & 1u) == 0 ? lo : hi;  // a tie: the even one
}

void conversions() {
  size_t bad = 0;
  for (uint32_t b = 0; b < 65536; ++b) {
    const _Float16 h = emu::bit_cast<_Float16>(uint16_t(b));
    const float want = float(h), got = __half2float(__half{uint16_t(b)});
    bad += !(emu::bit_cast<uint32_t>(want) == emu::bit_cast<uint32_t>(got) || (std::isnan(want) && std::isnan(got)));
    const float bf = __bfloat162float(__nv_bfloat16{uint16_t(b)});
    bad += emu::bit_cast<uint32_t>(bf) != b << 16;
  }
  expect(bad == 0, "every half and bfloat16 value to float: " + std::to_string(bad) + " wrong");
  std::mt19937 rng(6);
  std::vector<float> floats = {0.0f, -0.0f, INFINITY, -INFINITY, NAN, 65504.0f, 65519.99f, 65520.0f, 6.1035156e-05f,
                               5.9604645e-08f, 2.9802322e-08f, 2.9802326e-08f, 3.3895314e38f, 3.4028235e38f, 1e-40f};
  for (int i = 0; i < 2000000; ++i) floats.push_back(emu::bit_cast<float>(uint32_t(rng())));
  std::uniform_real_distribution<float> small(-70000.0f, 70000.0f);
  for (int i = 0; i < 1000000; ++i) floats.push_back(small(rng));
  size_t bad_h = 0, bad_b = 0;
  for (float f : floats) {
    const uint16_t want = emu::bit_cast<uint16_t>(static_cast<_Float16>(f)), got = __float2half_rn(f).__x;
    bad_h += !(want == got || (std::isnan(f) && (got & 0x7c00u) == 0x7c00u && (got & 0x3ffu) != 0));
    if (__float2bfloat16_rn(f).__x != bf16_reference(f) && bad_b++ < 5)
      std::printf("  bf16 of %a (0x%08x): got 0x%04x, want 0x%04x\n", f, emu::bit_cast<uint32_t>(f),
                  __float2bfloat16_rn(f).__x, bf16_reference(f));
  }
  const std::string count = std::to_string(floats.size()) + " values: ";
  expect(bad_h == 0, "float to half, " + count + std::to_string(bad_h) + " wrong");
  expect(bad_b == 0, "float to bfloat16, " + count + std::to_string(bad_b) + " wrong");
}

// ---- Random shapes --------------------------------------------------------------------------
// `count` random cases of every kernel above (shapes, dtypes, options) from `seed`; each case
// line names its shape, so a failure can be rerun as a fixed case.
void fuzz(int count, unsigned seed) {
  std::mt19937 rng(seed);
  const auto uni = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  const auto vocab = [&]() { return uni(0, 3) == 0 ? uni(1, 12) : uni(0, 2) == 0 ? uni(1500, 8192) : uni(13, 1500); };
  for (int i = 0; i < count; ++i) {
    // Gumbel-softmax: the one-read kernels (strided dimension), then the two-sweep ones on any.
    const Shape strided{uni(1, 3), vocab(), uni(2, 48)};
    const bool kl = uni(0, 1) == 1;
    const int64_t dt = uni(0, 2);
    if (fits_race_check(strided, 16, "gumbel_fwd")) {
      if (dt == 0) gumbel_forward_case<float>(strided, kl, true, rng);
      if (dt == 1) gumbel_forward_case<__half>(strided, kl, true, rng);
      if (dt == 2) gumbel_forward_case<__nv_bfloat16>(strided, kl, true, rng);
    }
    if (fits_race_check(strided, kl ? 8 : 16, "gumbel_bwd")) {
      if (dt == 0) gumbel_backward_case<float>(strided, kl, true, rng);
      if (dt == 1) gumbel_backward_case<__half>(strided, kl, true, rng);
      if (dt == 2) gumbel_backward_case<__nv_bfloat16>(strided, kl, true, rng);
    }
    const Shape any{uni(1, 3), vocab(), uni(0, 1) == 0 ? 1 : uni(2, 9)};
    if (dt == 0) gumbel_forward_case<float>(any, kl, false, rng);
    if (dt == 1) gumbel_backward_case<__half>(any, kl, false, rng);
    if (dt == 2) gumbel_argmax_case<__nv_bfloat16>(any, rng);
    gumbel_argmax_case<float>({uni(1, 3), vocab(), uni(1, 9)}, rng);

    // Decode: head dims of the fast kernel and others, conv-like and scattered offsets, a
    // position inside or just past the image, padded cache rows, q inside a qkv projection.
    DecodeShape d;
    d.batch = uni(1, 3);
    d.heads = uni(1, 3);
    d.dim = uni(0, 2) > 0 ? 32 << uni(0, 2) : uni(1, 160);
    d.text = uni(0, 4) == 0 ? uni(600, 1200) : uni(1, 300);  // sometimes past a key group of HD 32
    const int64_t side = uni(1, 32);
    d.image = side * side;
    const int64_t n_off = uni(1, std::min<int64_t>(d.image, 60));
    for (int64_t o : [&] {
           std::vector<int64_t> all(size_t(d.image));
           for (int64_t j = 0; j < d.image; ++j) all[size_t(j)] = j;
           std::shuffle(all.begin(), all.end(), rng);
           all.resize(size_t(n_off));
           std::sort(all.begin(), all.end());
           return all;
         }())
      d.offsets.push_back(o);
    d.g = uni(0, 9) == 0 ? d.image + uni(0, 2) : uni(0, d.image - 1);
    d.q_rows = uni(0, 1) == 0 ? 1 : 3;
    d.row_pad = std::vector<int64_t>{0, 0, 0, 8, 3}[size_t(uni(0, 4))];
    const bool append = uni(0, 1) == 1;
    const int64_t ddt = uni(0, 2);
    if (ddt == 0) decode_case<float>(d, append, Pick::Any, rng);
    if (ddt == 1) decode_case<__half>(d, append, Pick::Any, rng);
    if (ddt == 2) decode_case<__nv_bfloat16>(d, append, Pick::Any, rng);

    // Sparse attention: every mask kind, flash (16-bit, head dims 32 / 64 / 128) or one-warp.
    const MaskKind kind = MaskKind(uni(0, 3));
    const MaskSpec mask{kind, uni(1, 40), uni(1, 12), kind == MaskKind::Conv ? uni(1, 3) : 0};
    const int64_t ab = uni(1, 2), ah = uni(1, 2);
    if (uni(0, 1) == 0) {
      const int64_t hd = 32 << uni(0, 2);
      if (uni(0, 1) == 0) {
        attention_case<__half>(mask, ab, ah, hd, true, rng);
      } else {
        attention_case<__nv_bfloat16>(mask, ab, ah, hd, true, rng);
      }
    } else {
      const int64_t hd = uni(1, 96);
      if (uni(0, 1) == 0) {
        attention_case<float>(mask, ab, ah, hd, false, rng);
      } else {
        attention_case<__half>(mask, ab, ah, hd, false, rng);
      }
    }

    // skinny_linear: any m <= 64, n % 8 == 0, k % 32 == 0, every epilogue.
    const int64_t m = uni(1, 64), n = 8 * uni(1, 40), k = 32 * uni(1, 24);
    const bool ln = uni(0, 1), bias = uni(0, 1), gelu = uni(0, 1), residual = uni(0, 1);
    if (uni(0, 1) == 0) {
      linear_case<__half>(m, n, k, ln, bias, gelu, residual, rng);
    } else {
      linear_case<__nv_bfloat16>(m, n, k, ln, bias, gelu, residual, rng);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc >= 2 && std::string(argv[1]) == "fuzz") {
    const int count = argc > 2 ? std::atoi(argv[2]) : 10;
    const unsigned seed = argc > 3 ? unsigned(std::strtoul(argv[3], nullptr, 10)) : 0u;
    fuzz(count, seed);
    std::printf("fuzz %d %u: %d failure(s)\n", count, seed, g_failures);
    return g_failures == 0 ? 0 : 1;
  }
  // build.py reads the checks' names from this table.
  const std::vector<std::pair<std::string, std::function<void()>>> checks = {
      {"gumbel_fwd", gumbel_fwd}, {"gumbel_bwd", gumbel_bwd}, {"gumbel_argmax", gumbel_argmax},
      {"gumbel_nan", gumbel_nan},
      {"decode", decode},         {"skinny_linear", skinny_linear}, {"conversions", conversions},
      {"attention", attention}, {"gumbel_fallback", gumbel_fallback}, {"traffic", traffic},
  };
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s NAME (one of:", argv[0]);
    for (const auto& c : checks) std::fprintf(stderr, " %s", c.first.c_str());
    std::fprintf(stderr, "), or %s fuzz [COUNT [SEED]]\n", argv[0]);
    return 2;
  }
  for (const auto& [name, run] : checks) {
    if (name != argv[1]) continue;
    run();
    std::printf("%s: %d failure(s)\n", name.c_str(), g_failures);
    return g_failures == 0 ? 0 : 1;
  }
  std::fprintf(stderr, "unknown check %s\n", argv[1]);
  return 2;
}
