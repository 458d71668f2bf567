#include <cmath>
#include <limits>
#include <vector>

#include <ATen/Parallel.h>

#include "../../cpu_math.h"
#include "../../philox.h"
#include "gumbel_cpu.h"

namespace dalle_fast::cpu {

namespace {

constexpr int64_t P = 16;  // positions per block: one 512-bit vector of floats
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Sums over the vocabulary run in float over blocks of this many entries (vectorised as before),
// each block's sum added into a double: a float running sum over all V entries erred by up to
// ~V * 2^-24 of the sum (the KL by 2e-4 at V = 32768), a block's by at most 64 * 2^-24.
constexpr int64_t kSumBlock = 64;

// Block b's positions and where their elements live: element (v, lane) at
// base + v * vstride + lane * pstride, position index pos0 + lane, n valid lanes.
struct Block {
  int64_t base, vstride, pstride, pos0, n;
};

Block block_at(const GumbelParams& p, int64_t b) {
  if (p.inner == 1) {  // softmax over the last, contiguous dim: lanes are consecutive rows
    const int64_t o0 = b * P;
    return {o0 * p.vocab, 1, p.vocab, o0, std::min(P, p.outer - o0)};
  }
  const int64_t per_outer = (p.inner + P - 1) / P;
  const int64_t o = b / per_outer, i0 = (b % per_outer) * P;
  return {o * p.vocab * p.inner + i0, p.inner, 1, o * p.inner + i0, std::min(P, p.inner - i0)};
}

int64_t num_blocks(const GumbelParams& p) {
  return p.inner == 1 ? (p.outer + P - 1) / P : p.outer * ((p.inner + P - 1) / P);
}

// Where a block's rows lie apart (the softmax over the channels of NCHW: a whole H x W plane
// apart, each row in a page of its own, where the hardware prefetchers, which stay within a page,
// see no stream), the row this many ahead is prefetched: it halved the backward at the dVAE's
// layout, which was waiting on memory.
constexpr int64_t kAhead = 8;

template <class Store>
DF_ALWAYS_INLINE void load_block(const typename Store::type* __restrict src, const Block& k, int64_t V,
                                 float* __restrict buf) {
  for (int64_t v = 0; v < V; ++v) {
    const typename Store::type* row = src + k.base + v * k.vstride;
    if (k.n == P && k.pstride == 1) {
      if (v + kAhead < V) __builtin_prefetch(row + kAhead * k.vstride);
      for (int64_t l = 0; l < P; ++l) buf[v * P + l] = Store::load(row[l]);
    } else {
      for (int64_t l = 0; l < P; ++l) buf[v * P + l] = l < k.n ? Store::load(row[l * k.pstride]) : 0.0f;
    }
  }
}

template <class Store>
DF_ALWAYS_INLINE void store_block(typename Store::type* __restrict dst, const Block& k, int64_t V,
                                  const float* __restrict buf) {
  for (int64_t v = 0; v < V; ++v) {
    typename Store::type* row = dst + k.base + v * k.vstride;
    if (k.n == P && k.pstride == 1) {
      if (v + kAhead < V) __builtin_prefetch(row + kAhead * k.vstride, 1);
      for (int64_t l = 0; l < P; ++l) row[l] = Store::store(buf[v * P + l]);
    } else {
      for (int64_t l = 0; l < k.n; ++l) row[l * k.pstride] = Store::store(buf[v * P + l]);
    }
  }
}

// The noise of vocabulary entries 4*v4 .. 4*v4+3 for the block's 16 positions: g[r * P + lane].
DF_ALWAYS_INLINE void noise4(uint64_t seed, uint64_t offset, int64_t pos0, int64_t v4, float* g) {
  for (int64_t l = 0; l < P; ++l) {
    const philox::U32x4 r = philox::gumbel_bits(seed, offset, static_cast<uint64_t>(pos0 + l), static_cast<uint64_t>(v4));
    g[0 * P + l] = philox::gumbel_from_bits(r.x);
    g[1 * P + l] = philox::gumbel_from_bits(r.y);
    g[2 * P + l] = philox::gumbel_from_bits(r.z);
    g[3 * P + l] = philox::gumbel_from_bits(r.w);
  }
}

// buf holds logits; becomes the scores logits * scale + g, rounded once (a fused multiply-add, as
// the CUDA kernels): u = logits + g at scale 1 (the softmax's scores, added: the same bits, and
// no libm call in the clone without FMA), the Gumbel-max draw's scores at its scale.
DF_ALWAYS_INLINE void add_noise(float* buf, int64_t V, float scale, uint64_t seed, uint64_t offset, int64_t pos0) {
  float g[4 * P];
  const bool plain = scale == 1.0f;
  for (int64_t v4 = 0; v4 * 4 < V; ++v4) {
    noise4(seed, offset, pos0, v4, g);
    for (int64_t r = 0; r < 4 && v4 * 4 + r < V; ++r) {
      float* row = buf + (v4 * 4 + r) * P;
      if (plain) {
        for (int64_t l = 0; l < P; ++l) row[l] += g[r * P + l];
      } else {
        for (int64_t l = 0; l < P; ++l) row[l] = std::fma(row[l], scale, g[r * P + l]);
      }
    }
  }
}

// Per lane l, the sums over v in [0, V) of N terms: body(v0, v1, part) adds the terms of v in
// [v0, v1) (at most kSumBlock entries) into part[n][l] (zeroed), which is then added into
// the double sums[n][l].
template <int N, class Body>
DF_ALWAYS_INLINE void blocked_sums(int64_t V, double (&sums)[N][P], Body&& body) {
  for (int n = 0; n < N; ++n)
    for (int64_t l = 0; l < P; ++l) sums[n][l] = 0.0;
  for (int64_t v0 = 0; v0 < V; v0 += kSumBlock) {
    float part[N][P] = {};
    body(v0, std::min(V, v0 + kSumBlock), part);
    for (int n = 0; n < N; ++n)
      for (int64_t l = 0; l < P; ++l) sums[n][l] += part[n][l];
  }
}

// The first argmax over v of each lane of buf [V x P], NaN counting as the largest value (as
// torch.argmax: the first NaN wins); best gets each lane's maximum, NaN where the lane has one.
DF_ALWAYS_INLINE void argmax_block(const float* buf, int64_t V, int32_t* arg, float* best) {
  for (int64_t l = 0; l < P; ++l) {
    best[l] = kNegInf;
    arg[l] = 0;
  }
  for (int64_t v = 0; v < V; ++v)
    for (int64_t l = 0; l < P; ++l) {
      const float z = buf[v * P + l];
      // strict: the first maximum wins; a NaN replaces anything but a NaN
      const bool better = z > best[l] || (z != z && best[l] == best[l]);
      best[l] = better ? z : best[l];
      arg[l] = better ? static_cast<int32_t>(v) : arg[l];
    }
}

// buf holds scores u; becomes softmax(u * f) over v for each lane, as exp((u - max) * f) / sum:
// the max is taken before scaling, so that no finite logit overflows ((x + g) / tau itself
// passes FLT_MAX for |x| > FLT_MAX tau). A lane whose scores are all -inf gets 0, as on CUDA;
// a lane with a NaN score gets NaN throughout (the max passes over it, its exp makes sum NaN).
DF_ALWAYS_INLINE void softmax_block(float* buf, int64_t V, float f) {
  float mx[P], inv[P];
  for (int64_t l = 0; l < P; ++l) mx[l] = kNegInf;
  for (int64_t v = 0; v < V; ++v)
    for (int64_t l = 0; l < P; ++l) mx[l] = std::max(mx[l], buf[v * P + l]);
  for (int64_t l = 0; l < P; ++l) mx[l] = mx[l] == kNegInf ? 0.0f : mx[l];
  double sum[1][P];
  blocked_sums<1>(V, sum, [&](int64_t v0, int64_t v1, float (&part)[1][P]) {
    for (int64_t v = v0; v < v1; ++v)
      for (int64_t l = 0; l < P; ++l) {
        const float e = exp_nonpos((buf[v * P + l] - mx[l]) * f);
        buf[v * P + l] = e;
        part[0][l] += e;
      }
  });
  // sum is 0 where every score is -inf (y = 0 there) and NaN where one is NaN: inv = sum itself
  // there, so that a NaN logit makes its whole position NaN, -inf entries included, as softmax.
  for (int64_t l = 0; l < P; ++l) inv[l] = static_cast<float>(sum[0][l] > 0.0 ? 1.0 / sum[0][l] : sum[0][l]);
  for (int64_t v = 0; v < V; ++v)
    for (int64_t l = 0; l < P; ++l) buf[v * P + l] *= inv[l];
}

// For logits x in buf: per lane max mx, log of sum exp(x - mx), and mean_d = sum p (x - mx), so
// that log p - sum p log p = (x - mx) - mean_d (the KL term's gradient), free of the log sum.
DF_ALWAYS_INLINE void softmax_stats(const float* buf, int64_t V, float* mx, float* log_sum, float* mean_d) {
  for (int64_t l = 0; l < P; ++l) mx[l] = kNegInf;
  for (int64_t v = 0; v < V; ++v)
    for (int64_t l = 0; l < P; ++l) mx[l] = std::max(mx[l], buf[v * P + l]);
  double sums[2][P];  // sum e, sum e d
  blocked_sums<2>(V, sums, [&](int64_t v0, int64_t v1, float (&part)[2][P]) {
    for (int64_t v = v0; v < v1; ++v)
      for (int64_t l = 0; l < P; ++l) {
        const float d = buf[v * P + l] - mx[l];
        const float e = exp_nonpos(d);
        part[0][l] += e;
        part[1][l] += e > 0.0f ? e * d : 0.0f;  // -inf logits: p log p -> 0, not 0 * -inf
      }
  });
  for (int64_t l = 0; l < P; ++l) {
    log_sum[l] = static_cast<float>(std::log(sums[0][l]));
    mean_d[l] = static_cast<float>(sums[1][l] / sums[0][l]);
  }
}

// KL(softmax(x) || uniform) per lane from softmax_stats' mx and log_sum, as the sum over v of
// p log(p V) - p + 1/V (the added terms sum to 0) = phi(w) / V, phi(w) = (w - 1) e^w + 1 >= 0,
// with w = log(p V). log V + sum p log p cancelled to a few 1e-7 for near-uniform logits, where
// the KL itself is ~1e-9, and came out negative; here every term is >= 0, and an error in the
// normaliser log_sum changes the sum only to second order (phi's terms with w + c sum to
// e^c (KL + c) - e^c + 1). Near w = 0, phi is its series, (w - 1) e^w + 1 cancelling there.
DF_ALWAYS_INLINE void kl_to_uniform(const float* buf, int64_t V, const float* mx, const float* log_sum, float* kl) {
  float c[P], r[P];
  const float log_v = std::log(static_cast<float>(V));
  for (int64_t l = 0; l < P; ++l) {
    c[l] = log_sum[l] - log_v;  // w = (x - mx) - c
    r[l] = std::exp(-c[l]);     // e^w = exp(x - mx) r
  }
  double acc[1][P];
  blocked_sums<1>(V, acc, [&](int64_t v0, int64_t v1, float (&part)[1][P]) {
    for (int64_t v = v0; v < v1; ++v)
      for (int64_t l = 0; l < P; ++l) {
        const float d = buf[v * P + l] - mx[l];
        const float w = d - c[l];
        const float e = exp_nonpos(d) * r[l];
        float series = 1.0f / 5760.0f;
        series = series * w + 1.0f / 840.0f;
        series = series * w + 1.0f / 144.0f;
        series = series * w + 1.0f / 30.0f;
        series = series * w + 1.0f / 8.0f;
        series = series * w + 1.0f / 3.0f;
        series = series * w + 0.5f;
        // e == 0 (p = 0, w possibly -inf): phi = 1, not (-inf) * 0. A NaN logit makes every w
        // and e of its lane NaN (through log_sum), and so phi and the KL.
        const float phi = std::fabs(w) < 0.25f ? w * w * series : e != 0.0f ? (w - 1.0f) * e + 1.0f : 1.0f;
        part[0][l] += phi;
      }
  });
  for (int64_t l = 0; l < P; ++l) kl[l] = static_cast<float>(acc[0][l] / static_cast<double>(V));
}

template <class Store>
DF_CPU_CLONES void forward_block(const GumbelParams& p, uint64_t seed, uint64_t offset, int64_t b, float* buf) {
  using S = typename Store::type;
  const Block k = block_at(p, b);
  const int64_t V = p.vocab;
  load_block<Store>(static_cast<const S*>(p.logits), k, V, buf);
  if (p.with_kl) {
    float mx[P], log_sum[P], mean_d[P], kl_l[P];
    softmax_stats(buf, V, mx, log_sum, mean_d);
    kl_to_uniform(buf, V, mx, log_sum, kl_l);
    S* kl = static_cast<S*>(p.kl) + k.pos0;
    for (int64_t l = 0; l < k.n; ++l) kl[l] = Store::store(kl_l[l]);
  }
  if (p.index) {  // Gumbel-max draw: the index only
    add_noise(buf, V, p.scale, seed, offset, k.pos0);
    int32_t arg[P];
    float best[P];
    argmax_block(buf, V, arg, best);
    for (int64_t l = 0; l < k.n; ++l) p.index[k.pos0 + l] = arg[l];
    return;
  }
  add_noise(buf, V, 1.0f, seed, offset, k.pos0);
  if (p.hard) {  // the one-hot of the first argmax of u (the soft sample's, but where exp rounding ties it)
    int32_t arg[P];
    float best[P];
    argmax_block(buf, V, arg, best);
    // A lane with a NaN score is NaN throughout, as the straight-through y_hard - y + y there.
    for (int64_t v = 0; v < V; ++v)
      for (int64_t l = 0; l < P; ++l) buf[v * P + l] = best[l] != best[l] ? best[l] : arg[l] == v ? 1.0f : 0.0f;
  } else {
    softmax_block(buf, V, 1.0f / p.tau);
  }
  store_block<Store>(static_cast<S*>(p.y), k, V, buf);
}

template <class Store>
DF_CPU_CLONES void backward_block(const GumbelParams& p, uint64_t seed, uint64_t offset, int64_t b, float* ys,
                                  float* g, float* x) {
  using S = typename Store::type;
  const Block k = block_at(p, b);
  const int64_t V = p.vocab;
  const float inv_tau = 1.0f / p.tau;
  if (p.y_soft) {
    load_block<Store>(static_cast<const S*>(p.y_soft), k, V, ys);
  } else {  // hard forward: regenerate the soft sample from the same noise
    load_block<Store>(static_cast<const S*>(p.logits), k, V, ys);
    add_noise(ys, V, 1.0f, seed, offset, k.pos0);
    softmax_block(ys, V, inv_tau);
  }
  load_block<Store>(static_cast<const S*>(p.grad_y), k, V, g);
  double dot64[1][P];
  blocked_sums<1>(V, dot64, [&](int64_t v0, int64_t v1, float (&part)[1][P]) {
    for (int64_t v = v0; v < v1; ++v)
      for (int64_t l = 0; l < P; ++l) part[0][l] += ys[v * P + l] * g[v * P + l];
  });
  float dot[P];
  for (int64_t l = 0; l < P; ++l) dot[l] = static_cast<float>(dot64[0][l]);
  for (int64_t v = 0; v < V; ++v)
    for (int64_t l = 0; l < P; ++l) g[v * P + l] = ys[v * P + l] * (g[v * P + l] - dot[l]) * inv_tau;
  if (p.grad_kl) {
    // d KL / d x_v = p_v (log p_v - sum_u p_u log p_u) = p_v ((x_v - mx) - mean_d)
    load_block<Store>(static_cast<const S*>(p.logits), k, V, x);
    float mx[P], log_sum[P], mean_d[P], gkl[P];
    softmax_stats(x, V, mx, log_sum, mean_d);
    const S* grad_kl = static_cast<const S*>(p.grad_kl) + k.pos0;
    for (int64_t l = 0; l < P; ++l) gkl[l] = l < k.n ? Store::load(grad_kl[l]) : 0.0f;
    for (int64_t v = 0; v < V; ++v)
      for (int64_t l = 0; l < P; ++l) {
        const float d = x[v * P + l] - mx[l];
        const float pv = exp_nonpos(d - log_sum[l]);
        g[v * P + l] += pv > 0.0f ? gkl[l] * pv * (d - mean_d[l]) : 0.0f;
      }
  }
  store_block<Store>(static_cast<S*>(p.grad_logits), k, V, g);
}

DF_CPU_CLONES void noise_block(const GumbelParams& p, uint64_t seed, uint64_t offset, int64_t b, float* out) {
  const Block k = block_at(p, b);
  float g[4 * P];
  for (int64_t v4 = 0; v4 * 4 < p.vocab; ++v4) {
    noise4(seed, offset, k.pos0, v4, g);
    for (int64_t r = 0; r < 4 && v4 * 4 + r < p.vocab; ++r)
      for (int64_t l = 0; l < k.n; ++l) out[k.base + (v4 * 4 + r) * k.vstride + l * k.pstride] = g[r * P + l];
  }
}

template <class Store>
void forward_impl(const GumbelParams& p, uint64_t seed, uint64_t offset) {
  at::parallel_for(0, num_blocks(p), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(static_cast<size_t>(p.vocab * P));
    for (int64_t b = begin; b < end; ++b) forward_block<Store>(p, seed, offset, b, buf.data());
  });
}

template <class Store>
void backward_impl(const GumbelParams& p, uint64_t seed, uint64_t offset) {
  at::parallel_for(0, num_blocks(p), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(static_cast<size_t>(3 * p.vocab * P));
    float* ys = buf.data();
    for (int64_t b = begin; b < end; ++b)
      backward_block<Store>(p, seed, offset, b, ys, ys + p.vocab * P, ys + 2 * p.vocab * P);
  });
}

}  // namespace

void gumbel_forward(const GumbelParams& p, GumbelStorage s, uint64_t seed, uint64_t offset) {
  switch (s) {
    case GumbelStorage::F32: return forward_impl<StoreF32>(p, seed, offset);
    case GumbelStorage::BF16: return forward_impl<StoreBF16>(p, seed, offset);
    case GumbelStorage::F16: return forward_impl<StoreF16>(p, seed, offset);
  }
}

void gumbel_backward(const GumbelParams& p, GumbelStorage s, uint64_t seed, uint64_t offset) {
  switch (s) {
    case GumbelStorage::F32: return backward_impl<StoreF32>(p, seed, offset);
    case GumbelStorage::BF16: return backward_impl<StoreBF16>(p, seed, offset);
    case GumbelStorage::F16: return backward_impl<StoreF16>(p, seed, offset);
  }
}

void gumbel_noise(const GumbelParams& p, uint64_t seed, uint64_t offset, float* out) {
  at::parallel_for(0, num_blocks(p), 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) noise_block(p, seed, offset, b, out);
  });
}

}  // namespace dalle_fast::cpu
