// Backward in two gather passes, so no two threads ever write the same row:
//   dq: per query tile, over its keys (as in the forward);
//   dk, dv: per key tile, over the queries that see it (the transposed lists of the plan).
// Both recompute the probabilities from q, k and the saved log-sum-exp.
#include <cmath>
#include <limits>
#include <vector>

#include "attention_cpu.h"
#include "microkernels.h"
#include "parallel.h"
#include "tile_plan.h"

namespace dalle_fast::cpu {

namespace {

// P = exp(s - lse) where the pair is visible (0 elsewhere), then dS = P * (dp - delta), in
// place: s becomes P, dp becomes dS. `visible(j)` says whether column j is an allowed pair.
template <class T, class Visible>
DF_ALWAYS_INLINE void probs_and_dscores(T* s, T* dp, const T* lse, const T* delta, bool lse_per_col,
                                        Visible&& visible) {
  constexpr T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < kChunk; ++j)
    if (!visible(j)) s[j] = ninf;
  for (int64_t j = 0; j < kChunk; ++j) {
    const T l = lse_per_col ? lse[j] : lse[0];
    const T dl = lse_per_col ? delta[j] : delta[0];
    s[j] = exp_nonpos(s[j] - l);
    dp[j] = s[j] * (dp[j] - dl);
  }
}

// Packs rows `idx[0..n)` of a [B, H, N, D] tensor as (C, D) and as its transpose (D, C),
// zero-filling rows n..C (either output may be null).
template <class T>
DF_ALWAYS_INLINE void pack_rows(const BHND& src, int64_t b, int64_t h, const int32_t* idx, int64_t n,
                                int64_t D, T* rows, T* cols) {
  for (int64_t j = 0; j < kChunk; ++j) {
    const T* r = j < n ? src.row<const T>(b, h, idx[j]) : nullptr;
    for (int64_t d = 0; d < D; ++d) {
      const T x = r ? r[d] : T(0);
      if (rows) rows[j * D + d] = x;
      if (cols) cols[d * kChunk + j] = x;
    }
  }
}

template <class T>
DF_CPU_CLONES void dq_tile(const AttnParams& p, const TilePlan& plan, int64_t bh, int64_t t, T* ws) {
  const int64_t D = p.dim, N = p.seq, M = plan.tile, C = kChunk;
  const int64_t b = bh / p.heads, h = bh % p.heads;
  const int64_t r0 = t * M, rows = std::min(M, N - r0);
  const int64_t* qpos = plan.order.data() + r0;
  T* Qs = ws;            // (M, D) scaled queries
  T* dO = Qs + M * D;    // (M, D)
  T* dQ = dO + M * D;    // (M, D) accumulator
  T* Kt = dQ + M * D;    // (D, C)
  T* Vt = Kt + D * C;    // (D, C)
  T* Kc = Vt + D * C;    // (C, D)
  T* S = Kc + C * D;     // (M, C) scores -> probabilities
  T* dP = S + M * C;     // (M, C) dP -> dS
  const T scale = static_cast<T>(p.scale);
  const T* lse = p.lse.at<const T>(b, h);
  const T* delta = p.delta.at<const T>(b, h);

  for (int64_t i = 0; i < rows; ++i) {
    const T* q = p.q.row<const T>(b, h, qpos[i]);
    const T* g = p.dout.row<const T>(b, h, qpos[i]);
    for (int64_t d = 0; d < D; ++d) Qs[i * D + d] = q[d] * scale;
    for (int64_t d = 0; d < D; ++d) dO[i * D + d] = g[d];
    for (int64_t d = 0; d < D; ++d) dQ[i * D + d] = T(0);
  }
  const int32_t* keys = plan.keys.data() + plan.key_start[t];
  const int64_t nkeys = plan.key_start[t + 1] - plan.key_start[t];
  for (int64_t c0 = 0; c0 < nkeys; c0 += C) {
    const int64_t nk = std::min(C, nkeys - c0);
    const int32_t* kc = keys + c0;
    pack_rows<T>(p.k, b, h, kc, nk, D, Kc, Kt);
    pack_rows<T>(p.v, b, h, kc, nk, D, nullptr, Vt);
    gemm<T>(rows, C, D, Qs, D, Kt, C, S, C, false);  // scores
    gemm<T>(rows, C, D, dO, D, Vt, C, dP, C, false);  // dO V^T
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t qp = qpos[i];
      probs_and_dscores<T>(S + i * C, dP + i * C, lse + qp, delta + qp, false,
                           [&](int64_t j) { return j < nk && plan.allowed(qp, kc[j]); });
    }
    gemm<T>(rows, D, C, dP, C, Kc, D, dQ, D, true);  // dQ += dS K
  }
  for (int64_t i = 0; i < rows; ++i) {
    T* out = p.dq.row<T>(b, h, qpos[i]);
    for (int64_t d = 0; d < D; ++d) out[d] = dQ[i * D + d] * scale;
  }
}

template <class T>
DF_CPU_CLONES void dkv_tile(const AttnParams& p, const TilePlan& plan, int64_t bh, int64_t u, T* ws) {
  const int64_t D = p.dim, N = p.seq, M = plan.tile, C = kChunk;
  const int64_t b = bh / p.heads, h = bh % p.heads;
  const int64_t r0 = u * M, rows = std::min(M, N - r0);
  const int64_t* kpos = plan.order.data() + r0;
  T* Ks = ws;             // (M, D) scaled keys
  T* Vr = Ks + M * D;     // (M, D)
  T* dK = Vr + M * D;     // (M, D) accumulator
  T* dV = dK + M * D;     // (M, D) accumulator
  T* Qt = dV + M * D;     // (D, C)
  T* Qc = Qt + D * C;     // (C, D)
  T* dOt = Qc + C * D;    // (D, C)
  T* dOc = dOt + D * C;   // (C, D)
  T* St = dOc + C * D;    // (M, C) scores -> probabilities (transposed: key rows)
  T* dPt = St + M * C;    // (M, C) dP -> dS
  T* lse_c = dPt + M * C; // (C)
  T* delta_c = lse_c + C; // (C)
  const T scale = static_cast<T>(p.scale);
  const T* lse = p.lse.at<const T>(b, h);
  const T* delta = p.delta.at<const T>(b, h);

  for (int64_t i = 0; i < rows; ++i) {
    const T* k = p.k.row<const T>(b, h, kpos[i]);
    const T* v = p.v.row<const T>(b, h, kpos[i]);
    for (int64_t d = 0; d < D; ++d) Ks[i * D + d] = k[d] * scale;
    for (int64_t d = 0; d < D; ++d) Vr[i * D + d] = v[d];
    for (int64_t d = 0; d < D; ++d) dK[i * D + d] = T(0);
    for (int64_t d = 0; d < D; ++d) dV[i * D + d] = T(0);
  }
  const int32_t* queries = plan.queries.data() + plan.query_start[u];
  const int64_t nq_all = plan.query_start[u + 1] - plan.query_start[u];
  for (int64_t c0 = 0; c0 < nq_all; c0 += C) {
    const int64_t nq = std::min(C, nq_all - c0);
    const int32_t* qc = queries + c0;
    pack_rows<T>(p.q, b, h, qc, nq, D, Qc, Qt);
    pack_rows<T>(p.dout, b, h, qc, nq, D, dOc, dOt);
    for (int64_t j = 0; j < C; ++j) {
      lse_c[j] = j < nq ? lse[qc[j]] : T(0);
      delta_c[j] = j < nq ? delta[qc[j]] : T(0);
    }
    gemm<T>(rows, C, D, Ks, D, Qt, C, St, C, false);  // scores, key rows
    gemm<T>(rows, C, D, Vr, D, dOt, C, dPt, C, false);  // V dO^T
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t kp = kpos[i];
      probs_and_dscores<T>(St + i * C, dPt + i * C, lse_c, delta_c, true,
                           [&](int64_t j) { return j < nq && plan.allowed(qc[j], kp); });
    }
    gemm<T>(rows, D, C, St, C, dOc, D, dV, D, true);  // dV += P^T dO
    gemm<T>(rows, D, C, dPt, C, Qc, D, dK, D, true);  // dK += dS^T Q
  }
  for (int64_t i = 0; i < rows; ++i) {
    T* dk = p.dk.row<T>(b, h, kpos[i]);
    T* dv = p.dv.row<T>(b, h, kpos[i]);
    for (int64_t d = 0; d < D; ++d) dk[d] = dK[i * D + d] * scale;
    for (int64_t d = 0; d < D; ++d) dv[d] = dV[i * D + d];
  }
}

// delta = rowsum(dout * out), one value per query row.
template <class T>
void compute_delta(const AttnParams& p) {
  const int64_t bh = p.batch * p.heads;
  at::parallel_for(0, bh, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / p.heads, h = i % p.heads;
      T* delta = p.delta.at<T>(b, h);
      for (int64_t n = 0; n < p.seq; ++n) {
        const T* g = p.dout.row<const T>(b, h, n);
        const T* o = p.out.row<const T>(b, h, n);
        T acc = T(0);
        for (int64_t d = 0; d < p.dim; ++d) acc += g[d] * o[d];
        delta[n] = acc;
      }
    }
  });
}

}  // namespace

template <class T>
void attention_backward(const AttnParams& p) {
  compute_delta<T>(p);
  const auto plan = get_tile_plan(p.mask, kTile);
  const int64_t tiles = plan->num_tiles(), bh = p.batch * p.heads;
  const int64_t D = p.dim, M = kTile, C = kChunk;
  const int64_t ws_dq = 3 * M * D + 3 * D * C + 2 * M * C;
  const int64_t ws_dkv = 4 * M * D + 4 * D * C + 2 * M * C + 2 * C;
  // One pool of work: dq items first (heaviest tiles first), then dk/dv items.
  parallel_dynamic(
      2 * bh * tiles, [&] { return std::vector<T>(static_cast<size_t>(std::max(ws_dq, ws_dkv))); },
      [&](std::vector<T>& ws, int64_t i) {
        if (i < bh * tiles)
          dq_tile<T>(p, *plan, i % bh, tiles - 1 - i / bh, ws.data());
        else
          dkv_tile<T>(p, *plan, (i - bh * tiles) % bh, (i - bh * tiles) / bh, ws.data());
      });
}

template void attention_backward<float>(const AttnParams&);
template void attention_backward<double>(const AttnParams&);

}  // namespace dalle_fast::cpu
