// Flash-style sparse-attention backward on tensor cores (fp16 / bf16 storage, fp32 math), head
// dims 32, 64 and 128. Needs delta = rowsum(dout * out) (attention_delta) and the forward's lse.
//
// One CTA of 4 warps per (batch, head, key tile of 64 logical keys); warp w owns keys
// 16w..16w+15 and keeps their dK, dV in registers. The CTA walks the tile's query list from the
// tile plan (plan.queries: the queries that see its keys), 64 queries a chunk, Q, dO and their
// lse, delta gathered with cp.async into double-buffered shared memory, positions and mask words
// a chunk ahead as in the forward. Per chunk, per warp, all
// transposed so that the warp's keys are the rows:
//   S^T = K Q^T,  P^T = exp(scale S^T - lse) (masked entries 0),  dV += P^T dO,
//   dP^T = V dO^T,  dS^T = P^T (dP^T - delta),  dK += dS^T Q,
// then dS^T goes to shared memory and each warp adds 16 queries' dQ = dS K (scale folded in) to
// an fp32 accumulator with atomics (not bitwise deterministic; attention_cuda.cpp converts it).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "flash_common.h"

namespace dalle_fast::cuda {

namespace {

using namespace flash;

constexpr int kLdS = kBN + kPad;  // row length of dS^T in shared memory

template <int HD>
constexpr size_t smem_bytes() {
  // K, V; 2 x Q, 2 x dO; dS^T; 2 x (lse, delta)
  return size_t(2 * kBM + 4 * kBN) * (HD + kPad) * 2 + size_t(kBM) * kLdS * 2 + 4 * kBN * sizeof(float);
}

__device__ __forceinline__ void add_pair(float* dst, float x, float y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(dst), make_float2(x, y));
#else
  atomicAdd(dst, x);
  atomicAdd(dst + 1, y);
#endif
}

// At least 3 CTAs per SM below D = 128 (what shared memory allows; the compiler would otherwise
// take registers enough for 2), 1 at D = 128.
template <class T, int HD>
__global__ void __launch_bounds__(kThreads, HD == 128 ? 1 : 3)
    flash_backward_kernel(const AttnParams p, const PlanView plan, float* __restrict__ dq_acc) {
  using M = mma::Mma<T>;
  using Pair = typename M::Pair;
  constexpr int LD = HD + kPad;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* const Ks = reinterpret_cast<T*>(smem_raw);  // [kBM][LD]
  T* const Vs = Ks + kBM * LD;                     // [kBM][LD]
  T* const Qs = Vs + kBM * LD;                     // [2][kBN][LD]
  T* const Gs = Qs + 2 * kBN * LD;                 // [2][kBN][LD] (dout)
  T* const dSs = Gs + 2 * kBN * LD;                // [kBM][kLdS]: dS^T, keys x queries
  float* const stats = reinterpret_cast<float*>(dSs + kBM * kLdS);  // [2][lse, delta][kBN]

  const PlanLists& L = plan.queries;
  const CtaWork cta(p, plan, L, /*last_first=*/false);
  const int64_t b = cta.b, h = cta.h;
  const int r0 = cta.r0, rows = cta.rows, c_begin = cta.c_begin, c_end = cta.c_end;
  const int warp = cta.warp, lane = cta.lane, g = cta.g, t4 = cta.t4;
  const float* const lse = p.lse.at<float>(b, h);
  const float* const delta = p.delta.at<float>(b, h);

  // As in the forward: chunk c + 1's query positions (and their lse, delta positions) and chunk
  // c's mask are fetched while chunk c - 1 computes; chunk c + 1 is copied while chunk c computes.
  static_assert(kBN <= kThreads, "one thread per query of a chunk copies its lse and delta");
  ChunkRows<HD> next_rows;
  int next_stat = -1;  // the physical position of query threadIdx.x of the chunk, -1: padding
  ChunkMask mask, next_mask;
  auto fetch = [&](int c) {
    next_rows.fetch(L.pos + cta.first(c), cta.count(c));
    next_stat = static_cast<int>(threadIdx.x) < cta.count(c) ? L.pos[cta.first(c) + threadIdx.x] : -1;
  };
  auto copy = [&](int buf) {
    next_rows.template copy<T>(Qs + buf * kBN * LD, p.q, b, h);
    next_rows.template copy<T>(Gs + buf * kBN * LD, p.dout, b, h);
    if (threadIdx.x < kBN) {  // padding queries get lse = delta = 0, and P = 0 from the mask
      const int n = next_stat >= 0 ? next_stat : 0, bytes = next_stat >= 0 ? 4 : 0;
      mma::cp_async4(stats + (2 * buf) * kBN + threadIdx.x, lse + n, bytes);
      mma::cp_async4(stats + (2 * buf + 1) * kBN + threadIdx.x, delta + n, bytes);
    }
  };

  auto key_pos = [&](int r) { return static_cast<int64_t>(plan.order[r0 + r]); };
  load_rows<T, HD>(Ks, p.k, b, h, kBM, rows, key_pos);
  load_rows<T, HD>(Vs, p.v, b, h, kBM, rows, key_pos);
  mma::cp_async_commit();
  if (c_begin < c_end) {
    fetch(c_begin);
    copy(0);
    next_mask.fetch(L, c_begin, warp, g);
  }
  mma::cp_async_commit();
  if (c_begin + 1 < c_end) fetch(c_begin + 1);

  const float scale = static_cast<float>(p.scale);
  const float scale_log2 = scale * kLog2e;
  float dk[HD / 8][4], dv[HD / 8][4];
#pragma unroll
  for (int n = 0; n < HD / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[n][e] = dv[n][e] = 0.f;

  for (int c = c_begin; c < c_end; ++c) {
    const int buf = (c - c_begin) & 1;
    if (c + 1 < c_end) copy(buf ^ 1);
    mma::cp_async_commit();
    if (c + 2 < c_end) fetch(c + 2);
    mask = next_mask;
    if (c + 1 < c_end) next_mask.fetch(L, c + 1, warp, g);
    mma::cp_async_wait<1>();  // K, V and chunk c are in
    __syncthreads();
    const T* const Qb = Qs + buf * kBN * LD;
    const T* const Gb = Gs + buf * kBN * LD;
    const float* const lse_s = stats + (2 * buf) * kBN;
    const float* const delta_s = stats + (2 * buf + 1) * kBN;

    // S^T = K Q^T: this warp's 16 keys x 64 queries.
    float s[kBN / 8][4];
    rows_times_rows<T, HD>(s, Ks + warp * 16 * LD, Qb, lane);

    // P^T = exp(scale S^T - lse[query]); entries the mask forbids are 0, and so are those of a
    // query whose lse is -inf (no finite score in the forward: out = 0), not NaN.
    const uint64_t w[2] = {mask.full ? ~uint64_t(0) : mask.w[0], mask.full ? ~uint64_t(0) : mask.w[1]};
#pragma unroll
    for (int j = 0; j < kBN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = 8 * j + 2 * t4 + (e & 1);
        const float l = lse_s[col];
        const bool on = ((w[e / 2] >> col) & 1u) && l != ninf();
        s[j][e] = on ? exp2f(fmaf(s[j][e], scale_log2, -l * kLog2e)) : 0.f;
      }
    }

    // dV += P^T dO (P^T from the score registers, as the forward's P).
    probs_times_rows<T, HD>(dv, s, Gb, lane);

    // dP^T = V dO^T, then dS^T = P^T (dP^T - delta[query]).
    float ds[kBN / 8][4];
    rows_times_rows<T, HD>(ds, Vs + warp * 16 * LD, Gb, lane);
#pragma unroll
    for (int j = 0; j < kBN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) ds[j][e] = s[j][e] * (ds[j][e] - delta_s[8 * j + 2 * t4 + (e & 1)]);

    // dK += dS^T Q (scaled at the end).
    probs_times_rows<T, HD>(dk, ds, Qb, lane);

    // dS^T to shared memory (rows = keys), for dQ = dS K over all 64 keys of the tile.
#pragma unroll
    for (int j = 0; j < kBN / 8; ++j) {
      *reinterpret_cast<Pair*>(dSs + (warp * 16 + g) * kLdS + 8 * j + 2 * t4) = M::pair(ds[j][0], ds[j][1]);
      *reinterpret_cast<Pair*>(dSs + (warp * 16 + g + 8) * kLdS + 8 * j + 2 * t4) = M::pair(ds[j][2], ds[j][3]);
    }
    __syncthreads();

    // dQ of queries 16w..16w+15 of the chunk: A = dS (queries x keys) read transposed from dS^T;
    // at most 64 dims at a time, which keeps D = 128 within the register budget.
    const int e0 = cta.first(c), count = cta.count(c);
    constexpr int kCols = HD < 64 ? HD : 64;
#pragma unroll
    for (int d0 = 0; d0 < HD; d0 += kCols) {
      float dq[kCols / 8][4];
#pragma unroll
      for (int n = 0; n < kCols / 8; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < kBM / 16; ++kk) {
        uint32_t a[4];
        mma::ldmatrix_x4_trans(a, dSs + (kk * 16 + (lane / 16) * 8 + lane % 8) * kLdS + warp * 16 + ((lane / 8) % 2) * 8);
#pragma unroll
        for (int dp = 0; dp < kCols / 16; ++dp) {
          uint32_t kb[4];
          mma::ldmatrix_x4_trans(kb, Ks + (kk * 16 + ((lane / 8) % 2) * 8 + lane % 8) * LD + d0 + dp * 16 + (lane / 16) * 8);
          M::run(dq[2 * dp], a, kb[0], kb[1]);
          M::run(dq[2 * dp + 1], a, kb[2], kb[3]);
        }
      }
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int row = warp * 16 + g + 8 * i;
        if (row >= count) continue;
        const int64_t n = L.pos[e0 + row];
        float* const dst = dq_acc + ((b * p.heads + h) * p.seq + n) * HD + d0;
#pragma unroll
        for (int j = 0; j < kCols / 8; ++j) add_pair(dst + 8 * j + 2 * t4, dq[j][2 * i] * scale, dq[j][2 * i + 1] * scale);
      }
    }
    __syncthreads();  // dS^T and buffer `buf` are rewritten next
  }
  mma::cp_async_wait<0>();  // no copy outlives the CTA (a tile without query chunks: none today)

#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int row = warp * 16 + g + 8 * i;
    if (row >= rows) continue;
    const int64_t n = plan.order[r0 + row];
    T* const dkr = p.dk.row<T>(b, h, n);
    T* const dvr = p.dv.row<T>(b, h, n);
#pragma unroll
    for (int j = 0; j < HD / 8; ++j) {
      *reinterpret_cast<Pair*>(dkr + 8 * j + 2 * t4) = M::pair(dk[j][2 * i] * scale, dk[j][2 * i + 1] * scale);
      *reinterpret_cast<Pair*>(dvr + 8 * j + 2 * t4) = M::pair(dv[j][2 * i], dv[j][2 * i + 1]);
    }
  }
}

template <class T, int HD>
const char* launch(const AttnParams& p, const PlanView& plan, float* dq_acc, cudaStream_t stream) {
  const int64_t blocks = int64_t(plan.tiles) * p.batch * p.heads;
  if (blocks == 0) return nullptr;
  if (blocks > int64_t(0x7fffffff)) return "sparse_attention: too many (batch, head, tile) blocks for one launch";
  constexpr size_t smem = smem_bytes<HD>();
  if (const char* err = allow_dynamic_smem<flash_backward_kernel<T, HD>>(smem)) return err;
  flash_backward_kernel<T, HD><<<static_cast<unsigned int>(blocks), kThreads, smem, stream>>>(p, plan, dq_acc);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <class T>
const char* launch_dim(const AttnParams& p, const PlanView& plan, float* dq_acc, cudaStream_t stream) {
  switch (p.dim) {
    case 32:
      return launch<T, 32>(p, plan, dq_acc, stream);
    case 64:
      return launch<T, 64>(p, plan, dq_acc, stream);
    case 128:
      return launch<T, 128>(p, plan, dq_acc, stream);
  }
  return "sparse_attention: the tensor-core backward supports head dims 32, 64 and 128";
}

}  // namespace

bool flash_backward_supported(const AttnParams& p, DType dtype) {
  if (!(flash::supported(p, dtype) && flash::aligned16(p.dout) && flash::aligned16(p.dk) &&
        flash::aligned16(p.dv)))
    return false;
  return flash::device_fits(p.dim == 32 ? smem_bytes<32>() : p.dim == 64 ? smem_bytes<64>() : smem_bytes<128>());
}

const char* flash_backward(const AttnParams& p, const PlanView& plan, float* dq_acc, DType dtype,
                           cudaStream_t stream) {
  if (plan.tile != kFlashTile || plan.seq != p.seq) return "sparse_attention: tile plan does not match the call";
  if (dtype == DType::Float16) return launch_dim<__half>(p, plan, dq_acc, stream);
  if (dtype == DType::BFloat16) return launch_dim<__nv_bfloat16>(p, plan, dq_acc, stream);
  return "sparse_attention: the tensor-core backward supports float16 and bfloat16";
}

}  // namespace dalle_fast::cuda
