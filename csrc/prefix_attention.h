// Launchers of the CPU prefix-attention kernels: input checks shared by forward and backward, the
// dtype dispatch, and the entry points bound in bindings.cpp.
//
// Layouts (the contract of prefixrt.ops.reference): q [B, H, Tq, D], k/v [B, H, Tk, D] with any
// strides (a view is read in place when its last dim is contiguous, else copied once),
// bank_k/bank_v [H, S, D] packed (entry e owns rows offsets[e]:offsets[e+1]), prefix_ids int64 [B]
// (-1 = none), key_padding_mask bool [B, Tk] (true = attend). Outputs are contiguous.
//
// Attention dropout (philox.h): `dropout` on, the Philox seed and offset as int64 bit patterns, the
// keep threshold floor(p * 2^32) and the scale 1 / (1 - p), all as prefixrt.ops.dropout computes
// them (one definition: the Python side passes the numbers).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "philox.h"
#include "plan.h"

namespace prefixrt {

struct Inputs {
  at::Tensor q, k, v, bank_k, bank_v, ids, offsets, kpm;
};

inline at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

inline Inputs check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& bank_k, const at::Tensor& bank_v,
                           const at::Tensor& prefix_ids, const at::Tensor& bank_offsets,
                           const std::optional<at::Tensor>& key_padding_mask) {
  TORCH_CHECK(q.dim() == 4, "q must be [B, H, Tq, D], got ", q.sizes());
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"k", k}, {"v", v}}) {
    TORCH_CHECK(t.dim() == 4 && t.size(0) == B && t.size(1) == H && t.size(3) == D, name,
                " must be [B=", B, ", H=", H, ", Tk, D=", D, "], got ", t.sizes());
  }
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v must have the same shape, got ", k.sizes(), " and ",
              v.sizes());
  for (const auto& [name, t] :
       {std::pair<const char*, const at::Tensor&>{"bank_k", bank_k}, {"bank_v", bank_v}}) {
    TORCH_CHECK(t.dim() == 3 && t.size(0) == H && t.size(2) == D, name, " must be [H=", H,
                ", S, D=", D, "], got ", t.sizes());
  }
  TORCH_CHECK(bank_k.sizes() == bank_v.sizes(), "bank_k and bank_v must have the same shape");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"q", q},
                                {"k", k},
                                {"v", v},
                                {"bank_k", bank_k},
                                {"bank_v", bank_v}}) {
    TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), name, " must have q's dtype ", q.scalar_type(),
                ", got ", t.scalar_type());
  }
  TORCH_CHECK(prefix_ids.device().is_cpu() && bank_offsets.device().is_cpu(),
              "prefix_ids and bank_offsets must be CPU tensors");
  TORCH_CHECK(
      prefix_ids.dim() == 1 && prefix_ids.size(0) == B && prefix_ids.scalar_type() == at::kLong,
      "prefix_ids must be int64 [B=", B, "], got ", prefix_ids.scalar_type(), " ",
      prefix_ids.sizes());
  TORCH_CHECK(bank_offsets.dim() == 1 && bank_offsets.size(0) >= 1 &&
                  bank_offsets.scalar_type() == at::kLong,
              "bank_offsets must be int64 [N + 1], got ", bank_offsets.scalar_type(), " ",
              bank_offsets.sizes());
  Inputs in{last_dim_contiguous(q),      last_dim_contiguous(k),
            last_dim_contiguous(v),      last_dim_contiguous(bank_k),
            last_dim_contiguous(bank_v), prefix_ids.contiguous(),
            bank_offsets.contiguous(),   at::Tensor()};
  if (key_padding_mask.has_value() && key_padding_mask->defined()) {
    const at::Tensor& m = *key_padding_mask;
    TORCH_CHECK(m.dim() == 2 && m.size(0) == B && m.size(1) == k.size(2),
                "key_padding_mask must be [B=", B, ", Tk=", k.size(2), "], got ", m.sizes());
    TORCH_CHECK(m.scalar_type() == at::kBool && m.device().is_cpu(),
                "key_padding_mask must be a bool CPU tensor, got ", m.scalar_type(), " on ",
                m.device());
    in.kpm = m.contiguous();
  }
  check_bank(in.ids.data_ptr<int64_t>(), B, in.offsets.data_ptr<int64_t>(), in.offsets.size(0),
             bank_k.size(1));
  return in;
}

// The call's dropout; the key stride of the counters is L = S + Tk.
inline Dropout make_dropout(bool on, int64_t seed, int64_t offset, int64_t threshold, double scale,
                            int64_t bank_rows, int64_t Tk) {
  Dropout d;
  if (!on) return d;
  TORCH_CHECK(threshold >= 0 && threshold < (int64_t{1} << 32),
              "dropout threshold must lie in [0, 2^32), got ", threshold);
  d.on = true;
  d.seed = static_cast<uint64_t>(seed);
  d.offset = static_cast<uint64_t>(offset);
  d.threshold = static_cast<uint32_t>(threshold);
  d.scale = static_cast<float>(scale);
  d.key_stride = bank_rows + Tk;
  return d;
}

// What both kernels read of one call: its sizes, mask options, ids and offsets, the strides of
// q, k, v [B, H, T, D] and of bank_k, bank_v [H, S, D], and the dropout. The strides are views of
// the tensors of `in`, which must outlive them.
struct CallArgs {
  int64_t B, H, Tq, Tk, D;
  float scale;
  bool causal;
  const int64_t* ids;
  const int64_t* offsets;
  const bool* key_padding_mask;  // [B, Tk] contiguous, or null
  at::IntArrayRef qs, ks, vs, bks, bvs;
  Dropout drop;
};

inline CallArgs make_call_args(const Inputs& in, double scale, bool causal, bool dropout,
                               int64_t seed, int64_t offset, int64_t threshold,
                               double dropout_scale) {
  return CallArgs{in.q.size(0),
                  in.q.size(1),
                  in.q.size(2),
                  in.k.size(2),
                  in.q.size(3),
                  static_cast<float>(scale),
                  causal,
                  in.ids.data_ptr<int64_t>(),
                  in.offsets.data_ptr<int64_t>(),
                  in.kpm.defined() ? in.kpm.data_ptr<bool>() : nullptr,
                  in.q.strides(),
                  in.k.strides(),
                  in.v.strides(),
                  in.bank_k.strides(),
                  in.bank_v.strides(),
                  make_dropout(dropout, seed, offset, threshold, dropout_scale,
                               in.bank_k.size(1), in.k.size(2))};
}

// Calls fn(T{}) with T = float, c10::BFloat16 or c10::Half.
template <typename Fn>
void dispatch_dtype(at::ScalarType dtype, const char* name, Fn&& fn) {
  switch (dtype) {
    case at::kFloat:
      fn(float{});
      break;
    case at::kBFloat16:
      fn(c10::BFloat16{});
      break;
    case at::kHalf:
      fn(c10::Half{});
      break;
    default:
      TORCH_CHECK(false, name, ": unsupported dtype ", dtype, " (float32, bfloat16, float16)");
  }
}

std::tuple<at::Tensor, at::Tensor> prefix_attention_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bank_k,
    const at::Tensor& bank_v, const at::Tensor& prefix_ids, const at::Tensor& bank_offsets,
    const std::optional<at::Tensor>& key_padding_mask, bool causal, double scale, bool dropout,
    int64_t seed, int64_t offset, int64_t threshold, double dropout_scale);

// Gradients that `needs` (dq, dk, dv, dbank_k, dbank_v) leaves out are skipped and returned as
// empty tensors (dk and dv are computed together, as are dbank_k and dbank_v).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prefix_attention_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& bank_k, const at::Tensor& bank_v, const at::Tensor& prefix_ids,
    const at::Tensor& bank_offsets, const std::optional<at::Tensor>& key_padding_mask, bool causal,
    double scale, bool dropout, int64_t seed, int64_t offset, int64_t threshold,
    double dropout_scale, const at::Tensor& out, const at::Tensor& lse,
    const std::vector<bool>& needs);

// Dropout multipliers (0 or scale, fp32 [N]) of the elements coords (int64 [N, 4] of (b, h, i, j))
// of a call with H heads, Tq queries and key stride L: the kernels' mask, for tests.
at::Tensor dropout_mask(const at::Tensor& coords, int64_t H, int64_t Tq, int64_t key_stride,
                        int64_t seed, int64_t offset, int64_t threshold, double dropout_scale);

// x with each element n kept (scaled by dropout_scale) iff word 0 of Philox at counter offset + n
// is >= threshold, else zeroed (elementwise_dropout.cpp); its own backward on the gradient.
at::Tensor philox_dropout(const at::Tensor& x, int64_t seed, int64_t offset, int64_t threshold,
                          double dropout_scale);

// A string naming the SIMD path this build was compiled for ("avx2" or "default").
inline std::string simd_isa() {
#if defined(CPU_CAPABILITY_AVX2)
  return "avx2";
#else
  return "default";
#endif
}

}  // namespace prefixrt
