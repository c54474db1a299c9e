// Attention dropout on the CPU: the mask of prefixrt.ops.dropout, drawn per element, never stored.
//
// Element (b, h, i, j) (j over the row's [prefix ; own] keys: prefix key p is j = p, own key t is
// j = P_b + t) draws word 0 of Philox 4x32-10 with key (seed_lo, seed_hi) and counter
// (c_lo, c_hi, 0, 0), c = offset + ((b * H + h) * Tq + i) * L + j (mod 2^64), L = S + Tk: exactly
// Triton's tl.randint(seed, c). It is kept iff that word >= threshold = floor(p * 2^32); kept
// probabilities are scaled by 1 / (1 - p) (fp32).
#pragma once

#include <cstdint>

namespace prefixrt {

// Word 0 of Philox 4x32-10 (Salmon et al. 2011; Random123's philox4x32) of the counter
// (lo32(counter), hi32(counter), 0, 0) under the key (lo32(seed), hi32(seed)).
inline uint32_t philox_word0(uint64_t seed, uint64_t counter) {
  constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
  constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t a = static_cast<uint64_t>(kRoundA) * c0;
    const uint64_t b = static_cast<uint64_t>(kRoundB) * c2;
    const uint32_t n0 = static_cast<uint32_t>(b >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(a >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(b);
    c3 = static_cast<uint32_t>(a);
    c0 = n0;
    c2 = n2;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return c0;
}

// The dropout of one call: off when p == 0.
struct Dropout {
  bool on = false;
  uint64_t seed = 0, offset = 0;
  uint32_t threshold = 0;  // floor(p * 2^32)
  float scale = 1.f;       // 1 / (1 - p)
  int64_t key_stride = 0;  // L = S + Tk

  // Counter of key j = 0 of query i of (row, head) bh = b * H + h, with Tq queries per (row, head).
  uint64_t row_counter(int64_t bh, int64_t Tq, int64_t i) const {
    return offset + static_cast<uint64_t>(bh * Tq + i) * static_cast<uint64_t>(key_stride);
  }

  // out[j] = scale or 0 for keys j0 + j, j < n, of the query whose key-0 counter is row_ctr.
  void multipliers(uint64_t row_ctr, int64_t j0, int64_t n, float* out) const {
    const uint64_t base = row_ctr + static_cast<uint64_t>(j0);
    for (int64_t j = 0; j < n; ++j)
      out[j] = philox_word0(seed, base + static_cast<uint64_t>(j)) >= threshold ? scale : 0.f;
  }
};

}  // namespace prefixrt
