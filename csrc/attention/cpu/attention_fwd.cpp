#include <cmath>
#include <limits>
#include <vector>

#include "attention_cpu.h"
#include "microkernels.h"
#include "parallel.h"
#include "tile_plan.h"

namespace dalle_fast::cpu {

namespace {

// Masks a chunk of scores in place: s[j] = -inf where query qp may not see keys[j] or j >= nk.
template <class T>
DF_ALWAYS_INLINE void mask_scores(const TilePlan& plan, int64_t qp, const int32_t* keys, int64_t nk, T* s) {
  constexpr T ninf = -std::numeric_limits<T>::infinity();
  const bool all_text_visible = keys[nk - 1] < plan.text_len && keys[nk - 1] <= qp;  // keys ascend
  if (!all_text_visible)
    for (int64_t j = 0; j < nk; ++j)
      if (!plan.allowed(qp, keys[j])) s[j] = ninf;
  for (int64_t j = nk; j < kChunk; ++j) s[j] = ninf;
}

// One (batch, head, query tile): online softmax over the tile's key list, kChunk keys a step.
template <class T>
DF_CPU_CLONES void forward_tile(const AttnParams& p, const TilePlan& plan, int64_t bh, int64_t t, T* ws) {
  const int64_t D = p.dim, N = p.seq, M = plan.tile, C = kChunk;
  const int64_t b = bh / p.heads, h = bh % p.heads;
  const int64_t r0 = t * M, rows = std::min(M, N - r0);
  const int64_t* qpos = plan.order.data() + r0;
  T* Qs = ws;             // (M, D) scaled queries
  T* O = Qs + M * D;      // (M, D) unnormalised output
  T* Kt = O + M * D;      // (D, C) keys, transposed
  T* Vc = Kt + D * C;     // (C, D) values
  T* S = Vc + C * D;      // (M, C) scores, then probabilities
  T* mx = S + M * C;      // (M) running max
  T* l = mx + M;          // (M) running sum
  const T scale = static_cast<T>(p.scale);

  for (int64_t i = 0; i < rows; ++i) {
    const T* q = p.q.row<const T>(b, h, qpos[i]);
    for (int64_t d = 0; d < D; ++d) Qs[i * D + d] = q[d] * scale;
    for (int64_t d = 0; d < D; ++d) O[i * D + d] = T(0);
    mx[i] = -std::numeric_limits<T>::infinity();
    l[i] = T(0);
  }

  const int32_t* keys = plan.keys.data() + plan.key_start[t];
  const int64_t nkeys = plan.key_start[t + 1] - plan.key_start[t];
  for (int64_t c0 = 0; c0 < nkeys; c0 += C) {
    const int64_t nk = std::min(C, nkeys - c0);
    for (int64_t j = 0; j < C; ++j) {
      if (j < nk) {
        const T* kr = p.k.row<const T>(b, h, keys[c0 + j]);
        const T* vr = p.v.row<const T>(b, h, keys[c0 + j]);
        for (int64_t d = 0; d < D; ++d) Kt[d * C + j] = kr[d];
        for (int64_t d = 0; d < D; ++d) Vc[j * D + d] = vr[d];
      } else {
        for (int64_t d = 0; d < D; ++d) Kt[d * C + j] = T(0);
        for (int64_t d = 0; d < D; ++d) Vc[j * D + d] = T(0);
      }
    }
    gemm<T>(rows, C, D, Qs, D, Kt, C, S, C, false);  // S = Qs K^T  (rows, C)

    for (int64_t i = 0; i < rows; ++i) {
      T* s = S + i * C;
      mask_scores(plan, qpos[i], keys + c0, nk, s);
      T cmax = -std::numeric_limits<T>::infinity();
      for (int64_t j = 0; j < C; ++j) cmax = std::max(cmax, s[j]);
      if (cmax == -std::numeric_limits<T>::infinity()) {  // nothing visible in this chunk
        for (int64_t j = 0; j < C; ++j) s[j] = T(0);
        continue;
      }
      const T mnew = std::max(mx[i], cmax);
      const T alpha = exp_nonpos(mx[i] - mnew);
      for (int64_t j = 0; j < C; ++j) s[j] = exp_nonpos(s[j] - mnew);
      T sum = T(0);
      for (int64_t j = 0; j < C; ++j) sum += s[j];
      l[i] = l[i] * alpha + sum;
      mx[i] = mnew;
      if (alpha != T(1))
        for (int64_t d = 0; d < D; ++d) O[i * D + d] *= alpha;
    }
    gemm<T>(rows, D, C, S, C, Vc, D, O, D, true);  // O += P V  (rows, D)
  }

  T* lse = p.lse.at<T>(b, h);
  for (int64_t i = 0; i < rows; ++i) {
    // Every query sees at least itself, so l > 0.
    const T inv = T(1) / l[i];
    T* o = p.out.row<T>(b, h, qpos[i]);
    for (int64_t d = 0; d < D; ++d) o[d] = O[i * D + d] * inv;
    lse[qpos[i]] = mx[i] + std::log(l[i]);
  }
}

}  // namespace

template <class T>
void attention_forward(const AttnParams& p) {
  const auto plan = get_tile_plan(p.mask, kTile);
  const int64_t tiles = plan->num_tiles(), bh = p.batch * p.heads;
  const int64_t ws_size = 2 * kTile * p.dim + 2 * p.dim * kChunk + kTile * kChunk + 2 * kTile;
  // Later tiles see more keys: start them first so the short ones fill the gaps.
  parallel_dynamic(
      bh * tiles, [&] { return std::vector<T>(static_cast<size_t>(ws_size)); },
      [&](std::vector<T>& ws, int64_t i) {
        forward_tile<T>(p, *plan, i % bh, tiles - 1 - i / bh, ws.data());
      });
}

template void attention_forward<float>(const AttnParams&);
template void attention_forward<double>(const AttnParams&);

}  // namespace dalle_fast::cpu
