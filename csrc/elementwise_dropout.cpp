// Elementwise dropout on the CPU: the model's residual, embedding and MLP dropouts in training.
//
// Element n of the flattened (contiguous) tensor draws word 0 of Philox 4x32-10 with key
// (seed_lo, seed_hi) and counter offset + n (philox.h, the attention kernels' generator); it is kept
// iff that word >= threshold = floor(p * 2^32), and kept elements are scaled by 1 / (1 - p). The
// backward is this same call on the gradient: the same counters give the same mask, so no mask is
// stored. torch's CPU dropout draws every element from one mt19937 stream (~15 ns an element);
// the Philox words are independent, so they are drawn 8 lanes at a time on every core.
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>

#include "prefix_attention.h"

namespace prefixrt {

at::Tensor philox_dropout(const at::Tensor& x, int64_t seed, int64_t offset, int64_t threshold,
                          double dropout_scale) {
  TORCH_CHECK(x.device().is_cpu(), "philox_dropout: x must be on the CPU, got ", x.device());
  const at::Tensor in = x.contiguous();
  at::Tensor out = at::empty_like(in);
  const Dropout d = make_dropout(true, seed, offset, threshold, dropout_scale, 0, 0);
  const int64_t n = in.numel();
  constexpr int64_t kBlock = 512;  // multipliers of one block live on the stack
  dispatch_dtype(in.scalar_type(), "philox_dropout", [&](auto tag) {
    using T = decltype(tag);
    const T* src = in.data_ptr<T>();
    T* dst = out.data_ptr<T>();
    at::parallel_for(0, (n + kBlock - 1) / kBlock, 64, [&](int64_t first, int64_t last) {
      alignas(32) float mult[kBlock];
      for (int64_t block = first; block < last; ++block) {
        const int64_t start = block * kBlock;
        const int64_t len = std::min(kBlock, n - start);
        d.multipliers(d.offset, start, len, mult);
        for (int64_t e = 0; e < len; ++e)
          dst[start + e] = static_cast<T>(static_cast<float>(src[start + e]) * mult[e]);
      }
    });
  });
  return out;
}

}  // namespace prefixrt
