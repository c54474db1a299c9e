// One key block of attention scores: S = Q K^T for up to kMaxBlockKeys keys, and the masks.
//
// Shared by the forward (online softmax) and the backward (recomputed probabilities). A block
// covers keys j0 .. j0 + nb of a segment; S has ncols = round_up(nb, kPanel) columns, the ones past
// nb are padding.
#pragma once

#include <algorithm>
#include <limits>
#include <vector>

#include "microkernels.h"
#include "philox.h"

namespace prefixrt {

constexpr int64_t kMaxBlockKeys = 128;  // keys per block (rounded to kPanel); S, Kt are [rows, 128]
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// A key segment of n keys: rows of K and V (element type T, row strides ldk/ldv) and an optional
// key mask (true = visible, stride 1).
template <typename T>
struct Segment {
  const T* k;
  int64_t ldk;
  const T* v;
  int64_t ldv;
  int64_t n;
  const bool* key_mask;
};

// Key blocks of a segment of n keys: as few blocks of at most kMaxBlockKeys as possible, of equal
// size rounded up to kPanel (a 200-key prefix is 2 blocks of 112 / 88, not 128 + 72).
inline int64_t block_keys(int64_t n) {
  const int64_t blocks = (n + kMaxBlockKeys - 1) / kMaxBlockKeys;
  return std::min(kMaxBlockKeys, round_up((n + blocks - 1) / blocks, kPanel));
}

// Scratch of one thread for block products: transposed and widened operands, the additive key mask.
struct BlockScratch {
  std::vector<float> kt;     // [Dp, kMaxBlockKeys]
  std::vector<float> kbuf;   // [kMaxBlockKeys, Dp]
  std::vector<float> vbuf;   // [kMaxBlockKeys, Dp]
  std::vector<float> mask;   // [kMaxBlockKeys]
  std::vector<float> drop;   // [kMaxBlockKeys] dropout multipliers of one row
  std::vector<int64_t> vis;  // [max_rows] visible keys of each row in the block
  BlockScratch(int64_t Dp, int64_t max_rows)
      : kt(Dp * kMaxBlockKeys),
        kbuf(kMaxBlockKeys * Dp),
        vbuf(kMaxBlockKeys * Dp),
        mask(kMaxBlockKeys),
        drop(kMaxBlockKeys),
        vis(max_rows) {}
};

// Where a segment's keys and a tile's rows sit in the dropout counters: key n of the segment is key
// key_base + n of its rows' [prefix ; own] lists, row r's key 0 has counter row_ctr[r]. Off (null
// drop) without dropout.
struct DropoutRows {
  const Dropout* drop = nullptr;
  const uint64_t* row_ctr = nullptr;
  int64_t key_base = 0;
  bool on() const { return drop != nullptr && drop->on; }
};

// S[0:M, 0:nb] = Q[0:M, 0:Dp] . K[0:nb]^T (K given as fp32 rows). Columns nb:ncols are left
// undefined, and so may be columns >= vis[i] of row i when vis ([M], optional) is given.
inline void block_products(const float* Q, int64_t ldq, int64_t M, RowsF32 K, int64_t nb,
                           int64_t ncols, int64_t Dp, float* S, int64_t lds, float* kt,
                           const int64_t* vis = nullptr) {
  if (M <= kDotRows) {
    qk_dot(Q, ldq, M, K.ptr, K.ld, nb, Dp, S, lds);
  } else {
    transpose_f32(K.ptr, K.ld, nb, Dp, kt, kMaxBlockKeys);  // columns nb:ncols of kt are junk
    qk_packed(Q, ldq, M, kt, kMaxBlockKeys, ncols, Dp, S, lds, vis);
  }
}

// vis[i] = how many leading keys of the block [j0, j0 + nb) row i may see before the key mask: nb,
// or fewer for a causal row (limit[i]: row i sees keys < limit[i]; null = no causal limit).
inline void visible_counts(int64_t M, int64_t nb, int64_t j0, const int64_t* limit, int64_t* vis) {
  for (int64_t i = 0; i < M; ++i) vis[i] = limit ? std::clamp<int64_t>(limit[i] - j0, 0, nb) : nb;
}

// Sets S[i, j] = -inf where key j0 + j is not visible to row i: j >= vis[i] (padding columns and
// causal tails) or key_mask[j0 + j] false (key_mask may be null).
inline void apply_masks(float* S, int64_t lds, int64_t M, int64_t nb, int64_t ncols, int64_t j0,
                        const int64_t* vis, const bool* key_mask, float* mask_buf) {
  for (int64_t i = 0; i < M; ++i) std::fill(S + i * lds + vis[i], S + i * lds + ncols, kNegInf);
  if (!key_mask) return;
  bool all_visible = true;
  for (int64_t j = 0; j < nb; ++j) {
    mask_buf[j] = key_mask[j0 + j] ? 0.f : kNegInf;
    all_visible &= key_mask[j0 + j];
  }
  if (all_visible) return;
  for (int64_t i = 0; i < M; ++i) {
    float* s = S + i * lds;
    int64_t j = 0;
    for (; j + kVec <= nb; j += kVec) (Vec::loadu(s + j) + Vec::loadu(mask_buf + j)).store(s + j);
    for (; j < nb; ++j) s[j] += mask_buf[j];
  }
}

// Largest number of keys any of the M rows sees in a segment of n keys (limit may be null).
inline int64_t keys_used(int64_t n, int64_t M, const int64_t* limit) {
  if (!limit) return n;
  int64_t used = 0;
  for (int64_t i = 0; i < M; ++i) used = std::max(used, std::min(limit[i], n));
  return used;
}

}  // namespace prefixrt
