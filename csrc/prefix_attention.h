// Launchers of the CPU prefix-attention kernels: input checks shared by forward and backward, the
// dtype dispatch, and the entry points bound in bindings.cpp.
//
// Layouts (the contract of prefixrt.ops.reference): q [B, H, Tq, D], k/v [B, H, Tk, D] with any
// strides (a view is read in place when its last dim is contiguous, else copied once),
// bank_k/bank_v [H, S, D] packed (entry e owns rows offsets[e]:offsets[e+1]), prefix_ids int64 [B]
// (-1 = none), key_padding_mask bool [B, Tk] (true = attend). Outputs are contiguous.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <tuple>

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
    const std::optional<at::Tensor>& key_padding_mask, bool causal, double scale);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prefix_attention_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& bank_k, const at::Tensor& bank_v, const at::Tensor& prefix_ids,
    const at::Tensor& bank_offsets, const std::optional<at::Tensor>& key_padding_mask, bool causal,
    double scale, const at::Tensor& out, const at::Tensor& lse);

// A string naming the SIMD path this build was compiled for ("avx2" or "default").
inline std::string simd_isa() {
#if defined(CPU_CAPABILITY_AVX2)
  return "avx2";
#else
  return "default";
#endif
}

}  // namespace prefixrt
