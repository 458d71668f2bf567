// Backward. Both schedules recompute the probabilities from q, k and the saved log-sum-exp, and
// no two threads ever write the same row (so results are deterministic):
//   many heads: one thread per head walks its key tiles, each over the queries that see it,
//     accumulating dk, dv in the tile and dq in a per-head buffer (5 block products);
//   few heads: two gather passes in parallel over tiles, dq per query tile over its keys and
//     dk, dv per key tile over its queries (7 block products, but every core busy).
#include <cmath>
#include <limits>
#include <vector>

#include "attention_cpu.h"
#include "parallel.h"
#include "tile_ops.h"

namespace dalle_fast::cpu {

namespace {

template <class T>
DF_CPU_CLONES void dq_tile(const AttnParams& p, const TilePlan& plan, const LogicalRows<T>& K,
                           const LogicalRows<T>& V, int64_t bh, int64_t t, T* ws) {
  constexpr int64_t M = kTile, C = kChunk;
  const int64_t D = p.dim, N = p.seq, b = bh / p.heads, h = bh % p.heads;
  const int64_t r0 = t * M, rows = std::min(M, N - r0);
  const int64_t* pos = plan.order.data() + r0;
  T* QsT = ws;              // (D, M) scaled queries, transposed
  T* dOT = QsT + D * M;     // (D, M) output gradient, transposed
  T* dQ = dOT + D * M;      // (M, D) accumulator
  T* St = dQ + M * D;       // (C, M) scores -> dS
  T* dPt = St + C * M;      // (C, M) dO . v
  T* kbuf = dPt + C * M;    // (C, D)
  T* vbuf = kbuf + C * D;   // (C, D)
  T* lse_r = vbuf + C * D;  // (M)
  T* delta_r = lse_r + M;   // (M)

  pack_tile_transposed<T>(p.q, b, h, pos, rows, D, static_cast<T>(p.scale), QsT);
  pack_tile_transposed<T>(p.dout, b, h, pos, rows, D, T(1), dOT);
  for (int64_t x = 0; x < M * D; ++x) dQ[x] = T(0);
  const T* lse = p.lse.at<const T>(b, h);
  const T* delta = p.delta.at<const T>(b, h);
  for (int64_t i = 0; i < M; ++i) {
    lse_r[i] = i < rows ? lse[pos[i]] : T(0);
    delta_r[i] = i < rows ? delta[pos[i]] : T(0);
  }

  const TileLists& L = plan.keys;
  const int32_t* idx = L.index.data() + L.start[t];
  const int64_t entries = L.start[t + 1] - L.start[t];
  for (int64_t c0 = 0, cc = L.chunk_start[t]; c0 < entries; c0 += C, ++cc) {
    const int64_t ne = std::min(C, entries - c0);
    int64_t ldk, ldv;
    const T* kr = chunk_rows(K, idx + c0, ne, D, kbuf, &ldk);
    const T* vr = chunk_rows(V, idx + c0, ne, D, vbuf, &ldv);
    gemm<T>(C, M, D, kr, ldk, 1, QsT, M, St, M, false);   // scores
    gemm<T>(C, M, D, vr, ldv, 1, dOT, M, dPt, M, false);  // dP[j][i] = v_j . dO_i
    if (!L.full[cc]) mask_chunk(St, L.words.data() + cc * M);
    for (int64_t j = 0; j < C; ++j)
      for (int64_t i = 0; i < M; ++i)
        St[j * M + i] = exp_nonpos(St[j * M + i] - lse_r[i]) * (dPt[j * M + i] - delta_r[i]);
    gemm<T>(M, D, C, St, 1, M, kr, ldk, dQ, D, true);  // dQ[i] += sum_j dS[j][i] k_j
  }
  const T scale = static_cast<T>(p.scale);
  for (int64_t i = 0; i < rows; ++i) {
    T* out = p.dq.row<T>(b, h, pos[i]);
    for (int64_t d = 0; d < D; ++d) out[d] = dQ[i * D + d] * scale;
  }
}

// dk, dv of one key tile; with dq_acc (this head's dq in logical order) also adds
// the tile's share of dq there, which is only safe when one thread owns the whole head.
template <class T>
DF_CPU_CLONES void dkv_tile(const AttnParams& p, const TilePlan& plan, const LogicalRows<T>& Q,
                            const LogicalRows<T>& dO, int64_t bh, int64_t u, T* ws, T* dq_acc) {
  constexpr int64_t M = kTile, C = kChunk;
  const int64_t D = p.dim, N = p.seq, b = bh / p.heads, h = bh % p.heads;
  const int64_t r0 = u * M, rows = std::min(M, N - r0);
  const int64_t* pos = plan.order.data() + r0;
  T* KsT = ws;               // (D, M) scaled keys, transposed
  T* VT = KsT + D * M;       // (D, M) values, transposed
  T* dK = VT + D * M;        // (M, D) accumulator
  T* dV = dK + M * D;        // (M, D) accumulator
  T* St = dV + M * D;        // (C, M) scores -> P, query rows
  T* dPt = St + C * M;       // (C, M) dO . v -> dS
  T* qbuf = dPt + C * M;     // (C, D)
  T* gbuf = qbuf + C * D;    // (C, D)
  T* lse_c = gbuf + C * D;   // (C)
  T* delta_c = lse_c + C;    // (C)
  T* Ks = delta_c + C;       // (M, D) scaled keys (fused dq only)

  pack_tile_transposed<T>(p.k, b, h, pos, rows, D, static_cast<T>(p.scale), KsT);
  if (dq_acc)
    for (int64_t i = 0; i < M; ++i)
      for (int64_t d = 0; d < D; ++d) Ks[i * D + d] = KsT[d * M + i];
  pack_tile_transposed<T>(p.v, b, h, pos, rows, D, T(1), VT);
  for (int64_t x = 0; x < M * D; ++x) dK[x] = T(0);
  for (int64_t x = 0; x < M * D; ++x) dV[x] = T(0);
  const T* lse = p.lse.at<const T>(b, h);
  const T* delta = p.delta.at<const T>(b, h);

  const TileLists& L = plan.queries;
  const int32_t* idx = L.index.data() + L.start[u];
  const int64_t entries = L.start[u + 1] - L.start[u];
  for (int64_t c0 = 0, cc = L.chunk_start[u]; c0 < entries; c0 += C, ++cc) {
    const int64_t ne = std::min(C, entries - c0);
    int64_t ldq, ldg;
    const T* qr = chunk_rows(Q, idx + c0, ne, D, qbuf, &ldq);
    const T* gr = chunk_rows(dO, idx + c0, ne, D, gbuf, &ldg);
    for (int64_t j = 0; j < C; ++j) {
      lse_c[j] = j < ne ? lse[plan.order[idx[c0 + j]]] : T(0);
      delta_c[j] = j < ne ? delta[plan.order[idx[c0 + j]]] : T(0);
    }
    gemm<T>(C, M, D, qr, ldq, 1, KsT, M, St, M, false);  // St[j][i] = q_j . k_i
    gemm<T>(C, M, D, gr, ldg, 1, VT, M, dPt, M, false);  // dPt[j][i] = dO_j . v_i
    if (!L.full[cc]) mask_chunk(St, L.words.data() + cc * M);
    for (int64_t j = 0; j < C; ++j) {
      for (int64_t i = 0; i < M; ++i) {
        const T pr = exp_nonpos(St[j * M + i] - lse_c[j]);
        dPt[j * M + i] = pr * (dPt[j * M + i] - delta_c[j]);
        St[j * M + i] = pr;
      }
    }
    gemm<T>(M, D, C, St, 1, M, gr, ldg, dV, D, true);   // dV[i] += sum_j P[j][i] dO_j
    gemm<T>(M, D, C, dPt, 1, M, qr, ldq, dK, D, true);  // dK[i] += sum_j dS[j][i] q_j
    if (dq_acc) {  // dQ[j] += sum_i dS[j][i] ks_i, in place when the chunk is consecutive rows
      const int32_t* e = idx + c0;
      if (ne == C && e[C - 1] - e[0] == C - 1) {
        gemm<T>(C, D, M, dPt, M, 1, Ks, D, dq_acc + e[0] * D, D, true);
      } else {
        gemm<T>(C, D, M, dPt, M, 1, Ks, D, qbuf, D, false);
        for (int64_t j = 0; j < ne; ++j)
          for (int64_t d = 0; d < D; ++d) dq_acc[e[j] * D + d] += qbuf[j * D + d];
      }
    }
  }
  const T scale = static_cast<T>(p.scale);
  for (int64_t i = 0; i < rows; ++i) {
    T* dk = p.dk.row<T>(b, h, pos[i]);
    T* dv = p.dv.row<T>(b, h, pos[i]);
    for (int64_t d = 0; d < D; ++d) dk[d] = dK[i * D + d] * scale;
    for (int64_t d = 0; d < D; ++d) dv[d] = dV[i * D + d];
  }
}

// delta = rowsum(dout * out), one value per query row.
template <class T>
void compute_delta(const AttnParams& p, int64_t bh) {
  const int64_t b = bh / p.heads, h = bh % p.heads;
  T* delta = p.delta.at<T>(b, h);
  for (int64_t n = 0; n < p.seq; ++n) {
    const T* g = p.dout.row<const T>(b, h, n);
    const T* o = p.out.row<const T>(b, h, n);
    T acc = T(0);
    for (int64_t d = 0; d < p.dim; ++d) acc += g[d] * o[d];
    delta[n] = acc;
  }
}

}  // namespace

template <class T>
void attention_backward(const AttnParams& p) {
  const auto plan = get_tile_plan(p.mask, kTile);
  const int64_t tiles = plan->num_tiles(), bh = p.batch * p.heads;
  LogicalTensor<T> K(p.k, *plan, p.batch, p.heads, p.dim), V(p.v, *plan, p.batch, p.heads, p.dim);
  LogicalTensor<T> Q(p.q, *plan, p.batch, p.heads, p.dim), dO(p.dout, *plan, p.batch, p.heads, p.dim);
  at::parallel_for(0, bh, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      compute_delta<T>(p, i);
      K.fill(i);
      V.fill(i);
      Q.fill(i);
      dO.fill(i);
    }
  });
  const int64_t D = p.dim, M = kTile, C = kChunk;
  const int64_t ws_size = 5 * M * D + 2 * C * M + 2 * C * D + 2 * std::max(M, C);
  auto workspace = [&] { return std::vector<T>(static_cast<size_t>(ws_size)); };
  // By thread count: the schedules sum dq in other orders, so dq's bits depend on the thread
  // count where this choice does (README); a choice by shape alone was 10-40% slower on 2 cores.
  if (bh >= 2 * at::get_num_threads()) {
    // Enough heads to keep every thread busy: one thread per head walks its key tiles and also
    // accumulates dq (5 block products per visible block instead of 7 for the two passes).
    parallel_dynamic(bh, [&] { return std::make_pair(workspace(), std::vector<T>(plan->seq * D)); },
                     [&](auto& state, int64_t head) {
                       auto& [ws, dq_acc] = state;
                       std::fill(dq_acc.begin(), dq_acc.end(), T(0));
                       for (int64_t u = 0; u < tiles; ++u)
                         dkv_tile<T>(p, *plan, Q.head(head), dO.head(head), head, u, ws.data(), dq_acc.data());
                       const int64_t b = head / p.heads, h = head % p.heads;
                       for (int64_t l = 0; l < plan->seq; ++l) {  // Ks carried the scale already
                         T* out = p.dq.row<T>(b, h, plan->order[l]);
                         for (int64_t d = 0; d < D; ++d) out[d] = dq_acc[l * D + d];
                       }
                     });
    return;
  }
  // Few heads: parallel over tiles too. dq items first (heaviest tiles first), then dk/dv
  // items (text key tiles, seen by every later query, first).
  parallel_dynamic(2 * bh * tiles, workspace, [&](std::vector<T>& ws, int64_t i) {
    if (i < bh * tiles) {
      const int64_t head = i % bh;
      dq_tile<T>(p, *plan, K.head(head), V.head(head), head, tiles - 1 - i / bh, ws.data());
    } else {
      const int64_t head = (i - bh * tiles) % bh;
      dkv_tile<T>(p, *plan, Q.head(head), dO.head(head), head, (i - bh * tiles) / bh, ws.data(), nullptr);
    }
  });
}

template void attention_backward<float>(const AttnParams&);
template void attention_backward<double>(const AttnParams&);

}  // namespace dalle_fast::cpu
