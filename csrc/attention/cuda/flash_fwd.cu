// Flash-style sparse-attention forward on tensor cores (fp16 / bf16 storage, fp32 math), head
// dims 32, 64 and 128.
//
// One CTA of 4 warps per (batch, head, query tile of 64 logical rows); warp w owns rows
// 16w..16w+15. The CTA walks its tile's key list from the tile plan (../tile_plan.h, tile 64):
// chunks of 64 key rows gathered by index with cp.async into double-buffered shared memory
// (the next chunk loads while this one computes, and the physical positions of the chunk after
// it and the next chunk's mask words are read into registers meanwhile: flash_common.h's
// ChunkRows and ChunkMask, so no dependent global load stands before a chunk's math). Per chunk: S = Q K^T with mma.m16n8k16, the
// plan's per-row bit masks set -inf (skipped for chunks the plan marks full), an online softmax
// in exp2 with the scale folded in (scores scaled before masking, so any finite scale works),
// then O += P V with P kept in registers. At the end O / l
// and lse = log sum exp(scale * s) go out, at the rows' physical positions (column layers run
// in column-major logical order, see the plan).
//
// Shared rows are padded by 16 bytes, so the 8 row addresses of every ldmatrix fall in
// distinct banks. No host synchronisation; the plan is device memory cached by device_plan.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "flash_common.h"

namespace dalle_fast::cuda {

namespace {

using namespace flash;

template <int HD>
constexpr size_t smem_bytes() {
  return size_t(kBM + 4 * kBN) * (HD + kPad) * 2;  // Q, 2 x K, 2 x V
}

// At least 4 CTAs per SM below D = 128 (shared memory allows 4 at D = 64; the compiler would
// otherwise take registers enough for 3), 2 at D = 128.
template <class T, int HD>
__global__ void __launch_bounds__(kThreads, HD == 128 ? 2 : 4) flash_forward_kernel(const AttnParams p, const PlanView plan) {
  using M = mma::Mma<T>;
  constexpr int LD = HD + kPad;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* const Qs = reinterpret_cast<T*>(smem_raw);
  T* const Ks = Qs + kBM * LD;       // [2][kBN][LD]
  T* const Vs = Ks + 2 * kBN * LD;   // [2][kBN][LD]

  const PlanLists& L = plan.keys;
  const CtaWork cta(p, plan, L, /*last_first=*/true);
  const int64_t b = cta.b, h = cta.h;
  const int r0 = cta.r0, rows = cta.rows, c_begin = cta.c_begin, c_end = cta.c_end;
  const int warp = cta.warp, lane = cta.lane, g = cta.g, t4 = cta.t4;

  // Chunk c + 1's key positions and chunk c's mask are fetched while chunk c - 1 computes, and
  // chunk c + 1's rows are copied while chunk c computes: no dependent load stalls the math.
  ChunkRows<HD> next_rows;
  ChunkMask mask, next_mask;
  auto fetch = [&](int c) { next_rows.fetch(L.pos + cta.first(c), cta.count(c)); };
  auto copy = [&](int buf) {
    next_rows.template copy<T>(Ks + buf * kBN * LD, p.k, b, h);
    next_rows.template copy<T>(Vs + buf * kBN * LD, p.v, b, h);
  };

  load_rows<T, HD>(Qs, p.q, b, h, kBM, rows, [&](int r) { return static_cast<int64_t>(plan.order[r0 + r]); });
  if (c_begin < c_end) {
    fetch(c_begin);
    copy(0);
    next_mask.fetch(L, c_begin, warp, g);
  }
  mma::cp_async_commit();
  if (c_begin + 1 < c_end) fetch(c_begin + 1);

  const float scale_log2 = static_cast<float>(p.scale) * kLog2e;
  float o[HD / 8][4];
#pragma unroll
  for (int n = 0; n < HD / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m[2] = {ninf(), ninf()};  // running max of rows g and g + 8, in scale * log2(e) units
  float l[2] = {0.f, 0.f};        // this thread's part of the running sums

  for (int c = c_begin; c < c_end; ++c) {
    const int buf = (c - c_begin) & 1;
    if (c + 1 < c_end) copy(buf ^ 1);
    mma::cp_async_commit();
    if (c + 2 < c_end) fetch(c + 2);
    mask = next_mask;
    if (c + 1 < c_end) next_mask.fetch(L, c + 1, warp, g);
    mma::cp_async_wait<1>();  // chunk c (and Q) is in
    __syncthreads();
    const T* const Kb = Ks + buf * kBN * LD;
    const T* const Vb = Vs + buf * kBN * LD;

    // S = Q K^T: 16 rows x 64 keys per warp, as 8 n-tiles of 8 keys; then scaled into the log2
    // domain before masking (so any finite scale works, negative ones too).
    float s[kBN / 8][4];
    rows_times_rows<T, HD>(s, Qs + warp * 16 * LD, Kb, lane);
#pragma unroll
    for (int j = 0; j < kBN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] *= scale_log2;

    if (!mask.full) {
      const uint64_t w0 = mask.w[0], w1 = mask.w[1];
#pragma unroll
      for (int j = 0; j < kBN / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = 8 * j + 2 * t4 + e;
          if (!((w0 >> col) & 1u)) s[j][e] = ninf();
          if (!((w1 >> col) & 1u)) s[j][2 + e] = ninf();
        }
      }
    }

    // Online softmax; a row's 64 scores live in the 4 threads of a quad.
    float mx[2] = {m[0], m[1]};
#pragma unroll
    for (int j = 0; j < kBN / 8; ++j) {
      mx[0] = fmaxf(mx[0], fmaxf(s[j][0], s[j][1]));
      mx[1] = fmaxf(mx[1], fmaxf(s[j][2], s[j][3]));
    }
    float ref[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
      // A row with nothing allowed yet keeps max -inf: use 0 as the reference so that the
      // exponentials give 0 instead of exp2(-inf + inf) = nan.
      ref[i] = mx[i] == ninf() ? 0.f : mx[i];
      const float alpha = exp2f(m[i] - ref[i]);  // 0 while m is -inf
      m[i] = mx[i];
      l[i] *= alpha;
#pragma unroll
      for (int n = 0; n < HD / 8; ++n) {
        o[n][2 * i] *= alpha;
        o[n][2 * i + 1] *= alpha;
      }
    }
#pragma unroll
    for (int j = 0; j < kBN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] = exp2f(s[j][e] - ref[e / 2]);
      l[0] += s[j][0] + s[j][1];
      l[1] += s[j][2] + s[j][3];
    }

    // O += P V, P from the score registers.
    probs_times_rows<T, HD>(o, s, Vb, lane);
    __syncthreads();  // everyone is done with buffer `buf` before it is refilled
  }
  mma::cp_async_wait<0>();  // no copy outlives the CTA (a tile without key chunks: none today)

  constexpr float kLn2 = 0.6931471805599453f;  // lse = ln(2) * m + ln(l): m is in log2 units
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
    const int row = warp * 16 + g + 8 * i;
    if (row >= rows) continue;
    const int64_t phys = plan.order[r0 + row];
    T* const orow = p.out.row<T>(b, h, phys);
    const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
#pragma unroll
    for (int n = 0; n < HD / 8; ++n)
      *reinterpret_cast<typename M::Pair*>(orow + 8 * n + 2 * t4) = M::pair(o[n][2 * i] * inv, o[n][2 * i + 1] * inv);
    if (t4 == 0) p.lse.at<float>(b, h)[phys] = l[i] > 0.f ? m[i] * kLn2 + logf(l[i]) : ninf();
  }
}

template <class T, int HD>
const char* launch(const AttnParams& p, const PlanView& plan, cudaStream_t stream) {
  const int64_t blocks = int64_t(plan.tiles) * p.batch * p.heads;
  if (blocks == 0) return nullptr;
  if (blocks > int64_t(0x7fffffff)) return "sparse_attention: too many (batch, head, tile) blocks for one launch";
  constexpr size_t smem = smem_bytes<HD>();
  if (const char* err = allow_dynamic_smem<flash_forward_kernel<T, HD>>(smem)) return err;
  flash_forward_kernel<T, HD><<<static_cast<unsigned int>(blocks), kThreads, smem, stream>>>(p, plan);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <class T>
const char* launch_dim(const AttnParams& p, const PlanView& plan, cudaStream_t stream) {
  switch (p.dim) {
    case 32:
      return launch<T, 32>(p, plan, stream);
    case 64:
      return launch<T, 64>(p, plan, stream);
    case 128:
      return launch<T, 128>(p, plan, stream);
  }
  return "sparse_attention: the tensor-core forward supports head dims 32, 64 and 128";
}


}  // namespace

bool flash_forward_supported(const AttnParams& p, DType dtype) {
  if (!(flash::supported(p, dtype) && flash::aligned16(p.out))) return false;
  return flash::device_fits(p.dim == 32 ? smem_bytes<32>() : p.dim == 64 ? smem_bytes<64>() : smem_bytes<128>());
}

const char* flash_forward(const AttnParams& p, const PlanView& plan, DType dtype, cudaStream_t stream) {
  if (plan.tile != kFlashTile || plan.seq != p.seq) return "sparse_attention: tile plan does not match the call";
  if (dtype == DType::Float16) return launch_dim<__half>(p, plan, stream);
  if (dtype == DType::BFloat16) return launch_dim<__nv_bfloat16>(p, plan, stream);
  return "sparse_attention: the tensor-core forward supports float16 and bfloat16";
}

}  // namespace dalle_fast::cuda
