// The attention masks of SPEC.md section 2, written once for the C++ side (CPU and CUDA).
// dalle_fast/ops/masks.py is the same definition in PyTorch; tests compare the two.
//
// Positions: text 0..T-1, image T+g with g = r*S + c. For an image query and an image key
// the mask depends only on the raster offset d = g - g' (>= 0), which is what lets kernels
// replace the predicate by a table of S*S bytes.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DF_HD __host__ __device__ __forceinline__
#else
#define DF_HD inline
#endif

namespace dalle_fast {

enum class MaskKind : int32_t { Row = 0, Column = 1, Conv = 2, Causal = 3 };

struct MaskSpec {
  MaskKind kind;
  int64_t text_len;  // T >= 1
  int64_t grid;      // S >= 1
  int64_t half;      // kernel / 2 (conv only)

  DF_HD int64_t image_len() const { return grid * grid; }
  DF_HD int64_t seq_len() const { return text_len + grid * grid; }
};

// Image query g may see image key g - d (d >= 0)?
DF_HD bool image_offset_allowed(const MaskSpec& m, int64_t d) {
  if (d < 0) return false;
  switch (m.kind) {
    case MaskKind::Row:
      return d <= m.grid;
    case MaskKind::Column:
      return d % m.grid == 0;
    case MaskKind::Conv: {
      // d = S*a - dc with a in [0, h], dc in [-h, h]: take the largest a with S*a - h <= d;
      // smaller a only move the interval [S*a - h, S*a + h] further below d.
      int64_t a = (d + m.half) / m.grid;
      if (a > m.half) a = m.half;
      return d <= m.grid * a + m.half;
    }
    case MaskKind::Causal:
      return true;
  }
  return false;
}

// May query position q attend to key position k?
DF_HD bool allowed(const MaskSpec& m, int64_t q, int64_t k) {
  if (k > q || k < 0) return false;
  if (k < m.text_len) return true;  // text keys: causal for text queries, all for image queries
  return image_offset_allowed(m, q - k);
}

// Calls f(lo, hi, step) for disjoint runs {lo, lo+step, ... < hi} that together are exactly
// the keys query q may see. Work is proportional to the number of runs, not to N.
template <class F>
DF_HD void for_each_key_run(const MaskSpec& m, int64_t q, F&& f) {
  const int64_t T = m.text_len, S = m.grid;
  if (q < T) {
    f(int64_t(0), q + 1, int64_t(1));
    return;
  }
  f(int64_t(0), T, int64_t(1));
  const int64_t g = q - T;
  switch (m.kind) {
    case MaskKind::Row: {
      const int64_t lo = g - S > 0 ? g - S : 0;
      f(T + lo, T + g + 1, int64_t(1));
      break;
    }
    case MaskKind::Column:
      f(T + g % S, T + g + 1, S);
      break;
    case MaskKind::Causal:
      f(T, T + g + 1, int64_t(1));
      break;
    case MaskKind::Conv: {
      // Interval a covers g' in [g - S*a - h, g - S*a + h]; intervals move down as a grows and
      // overlap when S <= 2h, so each is clipped below the previous one.
      int64_t upper = g;  // inclusive bound for the next interval
      for (int64_t a = 0; a <= m.half && upper >= 0; ++a) {
        int64_t lo = g - S * a - m.half;
        int64_t hi = g - S * a + m.half;
        if (lo < 0) lo = 0;
        if (hi > upper) hi = upper;
        if (hi >= lo) {
          f(T + lo, T + hi + 1, int64_t(1));
          upper = lo - 1;
        }
      }
      break;
    }
  }
}

// Calls f(lo, hi, step) for disjoint runs that together are exactly the queries that may
// see key position k (the transpose of for_each_key_run), for gather-style backward passes.
template <class F>
DF_HD void for_each_query_run(const MaskSpec& m, int64_t k, F&& f) {
  const int64_t T = m.text_len, S = m.grid, G = S * S;
  if (k < T) {
    f(k, T + G, int64_t(1));
    return;
  }
  const int64_t g = k - T;
  switch (m.kind) {
    case MaskKind::Row: {
      const int64_t hi = g + S < G - 1 ? g + S : G - 1;
      f(T + g, T + hi + 1, int64_t(1));
      break;
    }
    case MaskKind::Column:
      f(T + g, T + G, S);
      break;
    case MaskKind::Causal:
      f(T + g, T + G, int64_t(1));
      break;
    case MaskKind::Conv: {
      int64_t lower = g;  // inclusive bound for the next interval
      for (int64_t a = 0; a <= m.half && lower < G; ++a) {
        int64_t lo = g + S * a - m.half;
        int64_t hi = g + S * a + m.half;
        if (lo < lower) lo = lower;
        if (hi > G - 1) hi = G - 1;
        if (hi >= lo) {
          f(T + lo, T + hi + 1, int64_t(1));
          lower = hi + 1;
        }
      }
      break;
    }
  }
}

}  // namespace dalle_fast
