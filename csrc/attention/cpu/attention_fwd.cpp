#include <cmath>
#include <limits>
#include <vector>

#include "attention_cpu.h"
#include "parallel.h"
#include "tile_ops.h"

namespace dalle_fast::cpu {

namespace {

// One (batch, head, query tile): online softmax over the tile's key list, kChunk keys a step.
template <class T>
DF_CPU_CLONES void forward_tile(const AttnParams& p, const TilePlan& plan, const LogicalRows<T>& K,
                                const LogicalRows<T>& V, int64_t bh, int64_t t, T* ws) {
  constexpr int64_t M = kTile, C = kChunk;
  constexpr T ninf = -std::numeric_limits<T>::infinity();
  const int64_t D = p.dim, N = p.seq, b = bh / p.heads, h = bh % p.heads;
  const int64_t r0 = t * M, rows = std::min(M, N - r0);
  const int64_t* pos = plan.order.data() + r0;
  T* QsT = ws;           // (D, M) scaled queries, transposed
  T* O = QsT + D * M;    // (M, D) unnormalised output
  T* St = O + M * D;     // (C, M) scores -> probabilities
  T* buf = St + C * M;   // (C, D) gathered keys or values
  T* mx = buf + C * D;   // (M) running max
  T* l = mx + M;         // (M) running sum
  T* msafe = l + M;      // (M) max to subtract (0 while nothing is visible)
  T* alpha = msafe + M;  // (M) rescale of the old sum and output

  pack_tile_transposed<T>(p.q, b, h, pos, rows, D, static_cast<T>(p.scale), QsT);
  for (int64_t x = 0; x < M * D; ++x) O[x] = T(0);
  for (int64_t i = 0; i < M; ++i) {
    mx[i] = ninf;
    l[i] = T(0);
  }

  const TileLists& L = plan.keys;
  const int32_t* idx = L.index.data() + L.start[t];
  const int64_t entries = L.start[t + 1] - L.start[t];
  for (int64_t c0 = 0, cc = L.chunk_start[t]; c0 < entries; c0 += C, ++cc) {
    const int64_t ne = std::min(C, entries - c0);
    int64_t ld;
    const T* kr = chunk_rows(K, idx + c0, ne, D, buf, &ld);
    gemm<T>(C, M, D, kr, ld, 1, QsT, M, St, M, false);  // St[j][i] = k_j . q_i
    if (!L.full[cc]) mask_chunk(St, L.words.data() + cc * M);

    for (int64_t i = 0; i < M; ++i) alpha[i] = St[i];  // column max, as vertical vector ops
    for (int64_t j = 1; j < C; ++j)
      for (int64_t i = 0; i < M; ++i) alpha[i] = std::max(alpha[i], St[j * M + i]);
    for (int64_t i = 0; i < M; ++i) {
      const T mnew = std::max(mx[i], alpha[i]);
      msafe[i] = mnew == ninf ? T(0) : mnew;
      alpha[i] = exp_nonpos(mx[i] - msafe[i]);
      mx[i] = mnew;
      l[i] *= alpha[i];
    }
    for (int64_t j = 0; j < C; ++j)
      for (int64_t i = 0; i < M; ++i) St[j * M + i] = exp_nonpos(St[j * M + i] - msafe[i]);
    for (int64_t j = 0; j < C; ++j)
      for (int64_t i = 0; i < M; ++i) l[i] += St[j * M + i];
    for (int64_t i = 0; i < M; ++i)
      for (int64_t d = 0; d < D; ++d) O[i * D + d] *= alpha[i];

    const T* vr = chunk_rows(V, idx + c0, ne, D, buf, &ld);
    gemm<T>(M, D, C, St, 1, M, vr, ld, O, D, true);  // O[i] += sum_j P[j][i] v_j
  }

  T* lse = p.lse.at<T>(b, h);
  for (int64_t i = 0; i < rows; ++i) {
    // Every query sees at least itself, so l > 0.
    const T inv = T(1) / l[i];
    T* o = p.out.row<T>(b, h, pos[i]);
    for (int64_t d = 0; d < D; ++d) o[d] = O[i * D + d] * inv;
    lse[pos[i]] = mx[i] + std::log(l[i]);
  }
}

}  // namespace

template <class T>
void attention_forward(const AttnParams& p) {
  const auto plan = get_tile_plan(p.mask, kTile);
  const int64_t tiles = plan->num_tiles(), bh = p.batch * p.heads;
  LogicalTensor<T> K(p.k, *plan, p.batch, p.heads, p.dim), V(p.v, *plan, p.batch, p.heads, p.dim);
  at::parallel_for(0, bh, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      K.fill(i);
      V.fill(i);
    }
  });
  const int64_t ws_size = 2 * kTile * p.dim + kChunk * kTile + kChunk * p.dim + 4 * kTile;
  // Later tiles see more keys: start them first so the short ones fill the gaps.
  parallel_dynamic(
      bh * tiles, [&] { return std::vector<T>(static_cast<size_t>(ws_size)); },
      [&](std::vector<T>& ws, int64_t i) {
        const int64_t head = i % bh;
        forward_tile<T>(p, *plan, K.head(head), V.head(head), head, tiles - 1 - i / bh, ws.data());
      });
}

template void attention_forward<float>(const AttnParams&);
template void attention_forward<double>(const AttnParams&);

}  // namespace dalle_fast::cpu
