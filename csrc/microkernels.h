// Register-blocked fp32 micro-kernels for one block of attention: scores S = Q K^T and O += P V.
//
// Two ways to form S, picked by how many query rows M share the key block:
// * qk_packed (M > kDotRows): K is first transposed into Kt [Dp, ncols]; an MR x kPanel tile of S
// is an
//   outer-product loop over d (broadcast Q[i, d], FMA with a Kt row): no horizontal sums,
//   FMA-bound.
// * qk_dot (M <= kDotRows, decode): K rows are read where they lie; one dot product per (row, key),
// one
//   horizontal sum per (row, key). Decode is bandwidth-bound, so skipping the transpose is what
//   counts.
// O += P V is always an outer-product loop over keys (V rows are the vectorized operand).
#pragma once

#include <algorithm>

#include "vec_utils.h"

// Fully unrolled loops over the MR rows of a tile, so that the accumulators live in registers
// (without it GCC keeps the Vec arrays on the stack and stores them on every iteration: half the
// speed).
#if defined(__clang__)
#define PREFIXRT_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define PREFIXRT_UNROLL _Pragma("GCC unroll 16")
#else
#define PREFIXRT_UNROLL
#endif

namespace prefixrt {

constexpr int kDotRows = 4;  // qk_dot up to this many rows, qk_packed above
constexpr int kTileRows =
    6;  // MR of the packed kernels: 2*MR accumulators + 2 operands + 1 broadcast

inline float hsum(const Vec& v) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
#else
  float tmp[kVec];
  v.store(tmp);
  float s = 0.f;
  for (int64_t i = 0; i < kVec; ++i) s += tmp[i];
  return s;
#endif
}

inline float hmax(const Vec& v) {
  float tmp[kVec];
  v.store(tmp);
  float s = tmp[0];
  for (int64_t i = 1; i < kVec; ++i) s = tmp[i] > s ? tmp[i] : s;
  return s;
}

// S[0:MR, 0:kPanel] = Q[0:MR, 0:Dp] . Kt[0:Dp, 0:kPanel]
template <int MR>
inline void qk_tile(const float* Q, int64_t ldq, const float* Kt, int64_t ldkt, int64_t Dp,
                    float* S, int64_t lds) {
  Vec acc[MR][2];
  PREFIXRT_UNROLL
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = Vec(0.f);
  for (int64_t d = 0; d < Dp; ++d) {
    const Vec b0 = Vec::loadu(Kt + d * ldkt);
    const Vec b1 = Vec::loadu(Kt + d * ldkt + kVec);
    PREFIXRT_UNROLL
    for (int r = 0; r < MR; ++r) {
      const Vec a(Q[r * ldq + d]);
      acc[r][0] = at::vec::fmadd(a, b0, acc[r][0]);
      acc[r][1] = at::vec::fmadd(a, b1, acc[r][1]);
    }
  }
  PREFIXRT_UNROLL
  for (int r = 0; r < MR; ++r) {
    acc[r][0].store(S + r * lds);
    acc[r][1].store(S + r * lds + kVec);
  }
}

// O[0:MR, 0:NV*kVec] += P[0:MR, 0:n] . V[0:n, 0:NV*kVec]
template <int MR, int NV>
inline void pv_tile(const float* P, int64_t ldp, const float* V, int64_t ldv, int64_t n, float* O,
                    int64_t ldo) {
  Vec acc[MR][NV];
  PREFIXRT_UNROLL
  for (int r = 0; r < MR; ++r) {
    PREFIXRT_UNROLL
    for (int c = 0; c < NV; ++c) acc[r][c] = Vec::loadu(O + r * ldo + c * kVec);
  }
  for (int64_t j = 0; j < n; ++j) {
    Vec b[NV];
    PREFIXRT_UNROLL
    for (int c = 0; c < NV; ++c) b[c] = Vec::loadu(V + j * ldv + c * kVec);
    PREFIXRT_UNROLL
    for (int r = 0; r < MR; ++r) {
      const Vec a(P[r * ldp + j]);
      PREFIXRT_UNROLL
      for (int c = 0; c < NV; ++c) acc[r][c] = at::vec::fmadd(a, b[c], acc[r][c]);
    }
  }
  PREFIXRT_UNROLL
  for (int r = 0; r < MR; ++r) {
    PREFIXRT_UNROLL
    for (int c = 0; c < NV; ++c) acc[r][c].store(O + r * ldo + c * kVec);
  }
}

// Calls tile<MR>(row0, rows) over M rows in tiles of kTileRows, then one tail tile.
template <template <int> class Fn, typename... Args>
inline void over_row_tiles(int64_t M, Args... args) {
  int64_t i = 0;
  for (; i + kTileRows <= M; i += kTileRows) Fn<kTileRows>::run(i, args...);
  switch (M - i) {
    case 1:
      Fn<1>::run(i, args...);
      break;
    case 2:
      Fn<2>::run(i, args...);
      break;
    case 3:
      Fn<3>::run(i, args...);
      break;
    case 4:
      Fn<4>::run(i, args...);
      break;
    case 5:
      Fn<5>::run(i, args...);
      break;
    default:
      break;
  }
}

// Columns rows [i, i + MR) need: all `full` when vis is null, else the largest vis[r] (causal rows
// see a prefix of the keys; a tile of rows above the diagonal skips the panels none of them sees).
template <int MR>
inline int64_t row_tile_extent(const int64_t* vis, int64_t i, int64_t full) {
  if (!vis) return full;
  int64_t extent = 0;
  for (int r = 0; r < MR; ++r) extent = std::max(extent, vis[i + r]);
  return std::min(extent, full);
}

template <int MR>
struct QkRows {
  static void run(int64_t i, const float* Q, int64_t ldq, const float* Kt, int64_t ldkt,
                  int64_t ncols, int64_t Dp, float* S, int64_t lds, const int64_t* vis) {
    const int64_t used = row_tile_extent<MR>(vis, i, ncols);
    for (int64_t j = 0; j < used; j += kPanel)
      qk_tile<MR>(Q + i * ldq, ldq, Kt + j, ldkt, Dp, S + i * lds + j, lds);
  }
};

// Few rows (decode) take wide panels: one pass over V reads each row of V whole, instead of one
// cache line of every row per pass; MR * NV <= 12 accumulators either way.
template <int MR>
struct PvRows {
  static constexpr int NV = MR == 1 ? 8 : (MR == 2 ? 4 : 2);
  static void run(int64_t i, const float* P, int64_t ldp, const float* V, int64_t ldv, int64_t n,
                  int64_t Dp, float* O, int64_t ldo, const int64_t* vis) {
    n = row_tile_extent<MR>(vis, i, n);
    int64_t d = 0;
    for (; d + NV * kVec <= Dp; d += NV * kVec)
      pv_tile<MR, NV>(P + i * ldp, ldp, V + d, ldv, n, O + i * ldo + d, ldo);
    for (; d < Dp; d += kPanel)
      pv_tile<MR, 2>(P + i * ldp, ldp, V + d, ldv, n, O + i * ldo + d, ldo);
  }
};

// S[0:M, 0:ncols] = Q[0:M, 0:Dp] . Kt[0:Dp, 0:ncols]; ncols and Dp are multiples of kPanel.
// vis (optional, [M]): row i only needs columns < vis[i]; columns past a tile's extent are not
// written.
inline void qk_packed(const float* Q, int64_t ldq, int64_t M, const float* Kt, int64_t ldkt,
                      int64_t ncols, int64_t Dp, float* S, int64_t lds,
                      const int64_t* vis = nullptr) {
  over_row_tiles<QkRows>(M, Q, ldq, Kt, ldkt, ncols, Dp, S, lds, vis);
}

// O[0:M, 0:Dp] += P[0:M, 0:n] . V[0:n, 0:Dp]; Dp is a multiple of kPanel.
// vis (optional, [M]): P[i, j] is zero for j >= vis[i] (those products are skipped tile by tile).
inline void pv_accumulate(const float* P, int64_t ldp, int64_t M, const float* V, int64_t ldv,
                          int64_t n, int64_t Dp, float* O, int64_t ldo,
                          const int64_t* vis = nullptr) {
  over_row_tiles<PvRows>(M, P, ldp, V, ldv, n, Dp, O, ldo, vis);
}

// S[0:M, 0:n] = Q[0:M, 0:Dp] . K[0:n, 0:Dp]^T with K row-major (row stride ldk), M <= kDotRows.
template <int M>
inline void qk_dot_rows(const float* Q, int64_t ldq, const float* K, int64_t ldk, int64_t n,
                        int64_t Dp, float* S, int64_t lds) {
  for (int64_t j = 0; j < n; ++j) {
    const float* k = K + j * ldk;
    Vec acc[M][2];
    PREFIXRT_UNROLL
    for (int r = 0; r < M; ++r) acc[r][0] = acc[r][1] = Vec(0.f);
    int64_t d = 0;
    for (; d + 2 * kVec <= Dp; d += 2 * kVec) {
      const Vec k0 = Vec::loadu(k + d);
      const Vec k1 = Vec::loadu(k + d + kVec);
      PREFIXRT_UNROLL
      for (int r = 0; r < M; ++r) {
        acc[r][0] = at::vec::fmadd(Vec::loadu(Q + r * ldq + d), k0, acc[r][0]);
        acc[r][1] = at::vec::fmadd(Vec::loadu(Q + r * ldq + d + kVec), k1, acc[r][1]);
      }
    }
    PREFIXRT_UNROLL
    for (int r = 0; r < M; ++r) S[r * lds + j] = hsum(acc[r][0] + acc[r][1]);
  }
}

inline void qk_dot(const float* Q, int64_t ldq, int64_t M, const float* K, int64_t ldk, int64_t n,
                   int64_t Dp, float* S, int64_t lds) {
  switch (M) {
    case 1:
      qk_dot_rows<1>(Q, ldq, K, ldk, n, Dp, S, lds);
      break;
    case 2:
      qk_dot_rows<2>(Q, ldq, K, ldk, n, Dp, S, lds);
      break;
    case 3:
      qk_dot_rows<3>(Q, ldq, K, ldk, n, Dp, S, lds);
      break;
    case 4:
      qk_dot_rows<4>(Q, ldq, K, ldk, n, Dp, S, lds);
      break;
    default:
      break;
  }
}

}  // namespace prefixrt
