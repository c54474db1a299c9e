// One tile of query rows attending over key segments with an online softmax (fp32 state).
//
// A tile holds up to `max_rows` query rows of one head: the scaled queries Q, the running max m,
// the running sum l and the unnormalized output O. attend_segment() folds one key segment into all
// or part of the tile (the bank prefix for every row of the tile, then each batch row's own keys
// for its rows), block by block:
//   S = Q K^T (masked),  m' = max(m, rowmax S),  P = exp(S - m'),
//   l = l * exp(m - m') + rowsum P,  O = O * exp(m - m') + P V,  m = m'.
// finalize() writes O / l and lse = m + log l (natural log), or 0 and -inf for a row that saw no
// key. With dropout, P is multiplied by the mask (philox.h) after l is updated and before P V: l
// and the lse stay those of the undropped scores.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "block_scores.h"

namespace prefixrt {

struct Tile {
  int64_t max_rows, D, Dp;
  std::vector<float> q, o, m, l;  // q, o: [max_rows, Dp]; m, l: [max_rows]
  std::vector<float> s;           // [max_rows, kMaxBlockKeys] scores, then probabilities
  BlockScratch blk;

  Tile(int64_t max_rows_, int64_t D_)
      : max_rows(max_rows_),
        D(D_),
        Dp(round_up(std::max<int64_t>(D_, 1), kPanel)),
        q(max_rows_ * Dp),
        o(max_rows_ * Dp),
        m(max_rows_),
        l(max_rows_),
        s(max_rows_ * kMaxBlockKeys),
        blk(Dp, max_rows_) {}

  // Empty state for the first `rows` rows.
  void reset(int64_t rows) {
    std::fill(o.begin(), o.begin() + rows * Dp, 0.f);
    std::fill(m.begin(), m.begin() + rows, kNegInf);
    std::fill(l.begin(), l.begin() + rows, 0.f);
  }

  // Row i's query: q_row[0:D] * scale, widened to fp32.
  template <typename T>
  void load_query(int64_t i, const T* q_row, float scale) {
    row_to_f32(q_row, D, scale, q.data() + i * Dp, Dp);
  }

  // Writes row i's normalized output (D values of type T) and returns its lse.
  template <typename T>
  float finalize(int64_t i, T* out_row) {
    float* o_row = o.data() + i * Dp;
    if (l[i] > 0.f) {
      const Vec inv(1.f / l[i]);
      for (int64_t d = 0; d < Dp; d += kVec) (Vec::loadu(o_row + d) * inv).store(o_row + d);
      row_from_f32(o_row, D, out_row);
      return m[i] + std::log(l[i]);
    }
    std::fill(o_row, o_row + Dp, 0.f);
    row_from_f32(o_row, D, out_row);
    return kNegInf;
  }
};

// Online-softmax update of rows [0, M) of S [M, ncols] (masked): turns S into P, rescales l and O.
inline void softmax_update(float* S, int64_t lds, int64_t M, int64_t ncols, float* m, float* l,
                           float* O, int64_t ldo, int64_t Dp) {
  for (int64_t i = 0; i < M; ++i) {
    float* s = S + i * lds;
    Vec vmax(kNegInf);
    for (int64_t j = 0; j < ncols; j += kVec) vmax = at::vec::maximum(vmax, Vec::loadu(s + j));
    const float m_new = std::max(m[i], hmax(vmax));
    if (m_new == kNegInf) {  // nothing visible to this row yet
      std::fill(s, s + ncols, 0.f);
      continue;
    }
    const Vec vm(m_new);
    Vec vsum(0.f);
    for (int64_t j = 0; j < ncols; j += kVec) {
      const Vec p = (Vec::loadu(s + j) - vm).exp_u20();
      p.store(s + j);
      vsum = vsum + p;
    }
    const float alpha = std::exp(m[i] - m_new);  // 0 when m[i] is -inf
    l[i] = l[i] * alpha + hsum(vsum);
    m[i] = m_new;
    if (alpha != 1.f) {
      float* o = O + i * ldo;
      const Vec va(alpha);
      for (int64_t d = 0; d < Dp; d += kVec) (Vec::loadu(o + d) * va).store(o + d);
    }
  }
}

// Folds `seg` into tile rows [r0, r0 + M). Row i sees keys j < limit[i] (all n when null). With
// dropout (drop.on()), drop.row_ctr[i] is the counter of tile row r0 + i.
template <typename T>
void attend_segment(Tile& t, int64_t r0, int64_t M, const Segment<T>& seg, const int64_t* limit,
                    const DropoutRows& drop = {}) {
  const int64_t Dp = t.Dp;
  const float* Q = t.q.data() + r0 * Dp;
  float* O = t.o.data() + r0 * Dp;
  float* S = t.s.data();
  const int64_t n_used = keys_used(seg.n, M, limit);
  if (n_used <= 0 || M <= 0) return;
  const int64_t step = block_keys(n_used);
  for (int64_t j0 = 0; j0 < n_used; j0 += step) {
    const int64_t nb = std::min(step, n_used - j0);
    const int64_t ncols = round_up(nb, kPanel);
    // -- S = Q K^T, masked
    const RowsF32 K = rows_f32(seg.k + j0 * seg.ldk, seg.ldk, nb, t.D, Dp, t.blk.kbuf.data());
    int64_t* vis = t.blk.vis.data();
    visible_counts(M, nb, j0, limit, vis);
    block_products(Q, Dp, M, K, nb, ncols, Dp, S, kMaxBlockKeys, t.blk.kt.data(), vis);
    apply_masks(S, kMaxBlockKeys, M, nb, ncols, j0, vis, seg.key_mask, t.blk.mask.data());
    // -- online softmax, then O += P V
    softmax_update(S, kMaxBlockKeys, M, ncols, t.m.data() + r0, t.l.data() + r0, O, Dp, Dp);
    if (drop.on()) {  // P *= mask / (1 - p) on the visible columns (the others are 0 already)
      float* z = t.blk.drop.data();
      for (int64_t i = 0; i < M; ++i) {
        drop.drop->multipliers(drop.row_ctr[i], drop.key_base + j0, vis[i], z);
        float* s = S + i * kMaxBlockKeys;
        for (int64_t j = 0; j < vis[i]; ++j) s[j] *= z[j];
      }
    }
    const RowsF32 V = rows_f32(seg.v + j0 * seg.ldv, seg.ldv, nb, t.D, Dp, t.blk.vbuf.data());
    pv_accumulate(S, kMaxBlockKeys, M, V.ptr, V.ld, nb, Dp, O, Dp, vis);
  }
}

}  // namespace prefixrt
