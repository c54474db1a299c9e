// Loads, conversions and packing of K/V/Q blocks into fp32 scratch, on at::vec::Vectorized<float>.
//
// Compiled with -mavx2 -mfma -DCPU_CAPABILITY_AVX2 when the CPU has them (Vectorized<float> is then
// one ymm register), else with the generic at::vec fallback (plain arrays the compiler vectorizes).
// Every 16-bit input is widened to fp32 here, once per block; all arithmetic downstream is fp32.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

namespace prefixrt {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();
// Blocks of the micro-kernels are two vectors wide; padded head dims and key blocks are multiples
// of it.
constexpr int64_t kPanel = 2 * kVec;

inline int64_t round_up(int64_t x, int64_t m) {
  return (x + m - 1) / m * m;
}

// kVec consecutive elements of `p` as fp32.
template <typename T>
inline Vec load_f32(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p);
  } else {
    Vec out;
    at::vec::load_to_float<T>(p, out);
    return out;
  }
}

// dst[0:D] = src[0:D] * scale as fp32, dst[D:Dp] = 0.
template <typename T>
inline void row_to_f32(const T* src, int64_t D, float scale, float* dst, int64_t Dp) {
  const Vec vscale(scale);
  int64_t d = 0;
  for (; d + kVec <= D; d += kVec) (load_f32(src + d) * vscale).store(dst + d);
  for (; d < D; ++d) dst[d] = static_cast<float>(src[d]) * scale;
  for (; d < Dp; ++d) dst[d] = 0.f;
}

// dst[0:D] = src[0:D] converted from fp32 to T.
template <typename T>
inline void row_from_f32(const float* src, int64_t D, T* dst) {
  if constexpr (std::is_same_v<T, float>) {
    int64_t d = 0;
    for (; d + kVec <= D; d += kVec) Vec::loadu(src + d).store(dst + d);
    for (; d < D; ++d) dst[d] = src[d];
  } else {
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(src[d]);
  }
}

// A row-major fp32 view of `n` rows of `src` (row stride `ld`, D columns). fp32 rows whose width is
// a multiple of kPanel are read in place; anything else is widened / zero-padded into `buf` [n,
// Dp].
struct RowsF32 {
  const float* ptr;
  int64_t ld;
};

template <typename T>
inline RowsF32 rows_f32(const T* src, int64_t ld, int64_t n, int64_t D, int64_t Dp, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    if (D == Dp) return {src, ld};
  }
  for (int64_t j = 0; j < n; ++j) row_to_f32(src + j * ld, D, 1.f, buf + j * Dp, Dp);
  return {buf, Dp};
}

// Kt[d, j] = K[j, d] for j < n, d < Dp (rows of K given as fp32, row stride ld; d >= D already
// zero). Kt has row stride ldt. Full 8x8 tiles use at::vec's register transpose.
inline void transpose_f32(const float* K, int64_t ld, int64_t n, int64_t Dp, float* Kt,
                          int64_t ldt) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    int64_t d = 0;
    for (; d + 8 <= Dp; d += 8) {
      at::vec::transpose_mxn<float, 8, 8>(K + j * ld + d, ld, Kt + d * ldt + j, ldt);
    }
    for (; d < Dp; ++d)
      for (int64_t jj = j; jj < j + 8; ++jj) Kt[d * ldt + jj] = K[jj * ld + d];
  }
  for (; j < n; ++j)
    for (int64_t d = 0; d < Dp; ++d) Kt[d * ldt + j] = K[j * ld + d];
}

}  // namespace prefixrt
