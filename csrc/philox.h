// Attention dropout on the CPU: the mask of prefixrt.ops.dropout, drawn per element, never stored.
//
// Element (b, h, i, j) (j over the row's [prefix ; own] keys: prefix key p is j = p, own key t is
// j = P_b + t) draws word 0 of Philox 4x32-10 with key (seed_lo, seed_hi) and counter
// (c_lo, c_hi, 0, 0), c = offset + ((b * H + h) * Tq + i) * L + j (mod 2^64), L = S + Tk: exactly
// Triton's tl.randint(seed, c). It is kept iff that word >= threshold = floor(p * 2^32); kept
// probabilities are scaled by 1 / (1 - p) (fp32).
#pragma once

#include <cstdint>

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

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
    const uint64_t first = row_ctr + static_cast<uint64_t>(j0);
    int64_t j = 0;
#if defined(CPU_CAPABILITY_AVX2)
    for (; j + 8 <= n; j += 8) store_multipliers8(first + static_cast<uint64_t>(j), out + j);
#endif
    for (; j < n; ++j)
      out[j] = philox_word0(seed, first + static_cast<uint64_t>(j)) >= threshold ? scale : 0.f;
  }

#if defined(CPU_CAPABILITY_AVX2)
  // The multipliers of the 8 consecutive counters c, c + 1, ..., c + 7: philox_word0 in 8 lanes.
  void store_multipliers8(uint64_t c, float* out) const {
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    // counters c + l: low words wrap into the high word per lane
    const __m256i lo_base = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(c)));
    __m256i c0 = _mm256_add_epi32(lo_base, lanes);
    const __m256i carry = _mm256_and_si256(  // 1 where c0 < lo(c): the low word wrapped
        _mm256_cmpgt_epi32(_mm256_xor_si256(lo_base, kSign()), _mm256_xor_si256(c0, kSign())),
        _mm256_set1_epi32(1));
    __m256i c1 = _mm256_add_epi32(
        _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(c >> 32))), carry);
    __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    const __m256i round_a = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
    const __m256i round_b = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
    for (int round = 0; round < 10; ++round) {
      __m256i hi_a, lo_a, hi_b, lo_b;
      mulhilo8(round_a, c0, hi_a, lo_a);
      mulhilo8(round_b, c2, hi_b, lo_b);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi_b, c1), _mm256_set1_epi32(static_cast<int>(k0)));
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi_a, c3), _mm256_set1_epi32(static_cast<int>(k1)));
      c1 = lo_b;
      c3 = lo_a;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    // keep iff c0 >= threshold (unsigned: compare with the sign bits flipped)
    const __m256i below = _mm256_cmpgt_epi32(
        _mm256_xor_si256(_mm256_set1_epi32(static_cast<int>(threshold)), kSign()),
        _mm256_xor_si256(c0, kSign()));
    const __m256 kept = _mm256_andnot_ps(_mm256_castsi256_ps(below), _mm256_set1_ps(scale));
    _mm256_storeu_ps(out, kept);
  }

  static __m256i kSign() { return _mm256_set1_epi32(static_cast<int>(0x80000000u)); }

  // hi, lo: the 32-bit halves of a * x in each of 8 lanes (vpmuludq on the even, then the odd
  // lanes).
  static void mulhilo8(__m256i a, __m256i x, __m256i& hi, __m256i& lo) {
    const __m256i even = _mm256_mul_epu32(a, x);
    const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), _mm256_srli_epi64(x, 32));
    lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
    hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  }
#endif
};

}  // namespace prefixrt
