// Backward of prefix attention on the CPU, recomputing P from the saved lse (no [Tq, P + Tk] matrix
// is ever stored), reading the bank in place.
//
// Per block of keys: S = Q K^T (Q pre-scaled), P = exp(S - lse), dP = dO V^T, dS = P * (dP - Di)
// with Di = rowsum(dO * O); then dV += P^T dO, dK += dS^T Q, dQ += dS K (times scale at the end).
//
// Dropout (philox.h), with Z the scaled mask regenerated from the Philox state and O the dropped
// output: dV += (P * Z)^T dO and dS = P * (Z * dP - Di) (FlashAttention's backward; P from the
// undropped lse).
//
// Work: (group, head) jobs, a group being the rows that share one bank entry (rows without a prefix
// are groups of one). A job owns the entry's dbank rows for its head and its rows' dk/dv,
// accumulates them in fp32 and writes each once: deterministic, no atomics, entries no row uses
// stay zero. Gradients nobody needs are not computed: without dq no dS K products, without dk/dv
// (or the bank gradient) no products for the own keys (or the prefix), and a segment that feeds
// none of the needed gradients is skipped.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <map>
#include <tuple>

#include "block_scores.h"
#include "prefix_attention.h"

namespace prefixrt {
namespace {

constexpr int64_t kBwdRows = 64;  // query rows per block

struct BwdArgs : CallArgs {
  int64_t S;                         // bank rows
  at::IntArrayRef dos, os;           // strides of dout and out [B, H, Tq, D]
  bool need_dq, need_kv, need_bank;  // dq; dk and dv; dbank_k and dbank_v
};

struct Group {
  int64_t entry;  // -1: rows without a prefix
  std::vector<int64_t> rows;
};

std::vector<Group> make_groups(const int64_t* ids, const int64_t* offsets, int64_t B) {
  std::vector<Group> groups;
  std::map<int64_t, size_t> by_entry;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t e = ids[b];
    if (e < 0 || offsets[e + 1] == offsets[e]) {
      groups.push_back(Group{-1, {b}});
      continue;
    }
    auto [it, fresh] = by_entry.emplace(e, groups.size());
    if (fresh) groups.push_back(Group{e, {}});
    groups[it->second].rows.push_back(b);
  }
  return groups;
}

// Thread scratch: one block of query rows (Q scaled, dO, dQ in fp32), its lse and Di, and the block
// products (S then P, dP then dS, and their transposes).
struct BwdScratch {
  int64_t D, Dp, ldt;
  std::vector<float> q, dout, dq, lse, di;  // [kBwdRows, Dp] / [kBwdRows]
  std::vector<float> p, ds;                 // [kBwdRows, kMaxBlockKeys]
  std::vector<float> pt, dst;               // [kMaxBlockKeys, ldt]
  std::vector<int64_t> limit;
  std::vector<uint64_t> row_ctr;        // [kBwdRows] dropout counters of the block's queries
  std::vector<float> dk, dv, dbk, dbv;  // fp32 accumulators [n, Dp]
  BlockScratch blk;
  BwdScratch(int64_t D_, int64_t Dp_)
      : D(D_),
        Dp(Dp_),
        ldt(round_up(kBwdRows, kVec)),
        q(kBwdRows * Dp_),
        dout(kBwdRows * Dp_),
        dq(kBwdRows * Dp_),
        lse(kBwdRows),
        di(kBwdRows),
        p(kBwdRows * kMaxBlockKeys),
        ds(kBwdRows * kMaxBlockKeys),
        pt(kMaxBlockKeys * ldt),
        dst(kMaxBlockKeys * ldt),
        limit(kBwdRows),
        row_ctr(kBwdRows),
        blk(Dp_, kBwdRows) {}
};

// Accumulates the gradients of one segment for rows [0, M) of the scratch: dQ into s.dq (need_dq),
// dK/dV of the segment's keys into dk_acc/dv_acc [n, Dp] (need_kv). With dropout, drop.row_ctr[i]
// is the counter of block row i and the segment's key n is key drop.key_base + n.
template <typename T>
void backward_segment(BwdScratch& s, int64_t M, const Segment<T>& seg, const int64_t* limit,
                      float* dk_acc, float* dv_acc, const DropoutRows& drop, bool need_dq,
                      bool need_kv) {
  const int64_t Dp = s.Dp, lds = kMaxBlockKeys;
  const int64_t n_used = keys_used(seg.n, M, limit);
  if (n_used <= 0 || !(need_dq || need_kv)) return;
  const int64_t step = block_keys(n_used);
  for (int64_t j0 = 0; j0 < n_used; j0 += step) {
    const int64_t nb = std::min(step, n_used - j0);
    const int64_t ncols = round_up(nb, kPanel);
    const RowsF32 K = rows_f32(seg.k + j0 * seg.ldk, seg.ldk, nb, s.D, Dp, s.blk.kbuf.data());
    const RowsF32 V = rows_f32(seg.v + j0 * seg.ldv, seg.ldv, nb, s.D, Dp, s.blk.vbuf.data());
    // -- P = exp(S - lse) with S = Q K^T masked; dP = dO V^T
    float* P = s.p.data();
    float* dS = s.ds.data();
    int64_t* vis = s.blk.vis.data();
    visible_counts(M, nb, j0, limit, vis);
    block_products(s.q.data(), Dp, M, K, nb, ncols, Dp, P, lds, s.blk.kt.data(), vis);
    apply_masks(P, lds, M, nb, ncols, j0, vis, seg.key_mask, s.blk.mask.data());
    block_products(s.dout.data(), Dp, M, V, nb, ncols, Dp, dS, lds, s.blk.kt.data(), vis);
    for (int64_t i = 0; i < M; ++i) {
      float* p = P + i * lds;
      float* ds = dS + i * lds;
      if (s.lse[i] == kNegInf) {  // the row sees no key at all: zero gradient
        std::fill(p, p + ncols, 0.f);
        std::fill(ds, ds + ncols, 0.f);
        continue;
      }
      const Vec vlse(s.lse[i]), vdi(s.di[i]);
      if (!drop.on()) {
        for (int64_t j = 0; j < ncols; j += kVec) {
          const Vec pj = (Vec::loadu(p + j) - vlse).exp_u20();
          pj.store(p + j);
          // -- dS = P * (dP - Di); padding columns hold junk dP but P = 0 there and they are never
          // read
          (pj * (Vec::loadu(ds + j) - vdi)).store(ds + j);
        }
        continue;
      }
      for (int64_t j = 0; j < ncols; j += kVec) (Vec::loadu(p + j) - vlse).exp_u20().store(p + j);
      // -- dropout on the visible columns: dS = P * (Z dP - Di), then P <- P Z for dV
      float* z = s.blk.drop.data();
      const int64_t nv = vis[i];
      drop.drop->multipliers(drop.row_ctr[i], drop.key_base + j0, nv, z);
      const float di = s.di[i];
      for (int64_t j = 0; j < nv; ++j) {
        ds[j] = p[j] * (ds[j] * z[j] - di);
        p[j] *= z[j];
      }
      for (int64_t j = nv; j < ncols; ++j) ds[j] = p[j] * (ds[j] - di);  // P = 0: never read
    }
    // -- dV += P^T dO, dK += dS^T Q, dQ += dS K
    if (need_kv) {
      transpose_f32(P, lds, M, ncols, s.pt.data(), s.ldt);
      transpose_f32(dS, lds, M, ncols, s.dst.data(), s.ldt);
      pv_accumulate(s.pt.data(), s.ldt, nb, s.dout.data(), Dp, M, Dp, dv_acc + j0 * Dp, Dp);
      pv_accumulate(s.dst.data(), s.ldt, nb, s.q.data(), Dp, M, Dp, dk_acc + j0 * Dp, Dp);
    }
    if (need_dq) pv_accumulate(dS, lds, M, K.ptr, K.ld, nb, Dp, s.dq.data(), Dp, vis);
  }
}

template <typename T>
void write_rows(const float* acc, int64_t n, int64_t Dp, int64_t D, T* dst, int64_t ld) {
  for (int64_t j = 0; j < n; ++j) row_from_f32(acc + j * Dp, D, dst + j * ld);
}

template <typename T>
void backward_kernel(const BwdArgs& a, const T* dout, const T* q, const T* k, const T* v,
                     const T* bank_k, const T* bank_v, const T* out, const float* lse, T* dq, T* dk,
                     T* dv, T* dbank_k, T* dbank_v) {
  const std::vector<Group> groups = make_groups(a.ids, a.offsets, a.B);
  const int64_t n_jobs = static_cast<int64_t>(groups.size()) * a.H;
  const int64_t D = a.D, Dp = round_up(std::max<int64_t>(D, 1), kPanel);

  // the backward does 2.5x the forward's multiply-adds
  const int64_t grain =
      parallel_grain(n_jobs, 2.5 * attention_fma(a.ids, a.offsets, a.B, a.H, a.Tq, a.Tk, a.D));
  at::parallel_for(0, n_jobs, grain, [&](int64_t begin, int64_t end) {
    BwdScratch s(D, Dp);
    for (int64_t job = begin; job < end; ++job) {
      const Group& g = groups[job / a.H];
      const int64_t h = job % a.H;
      const int64_t start = g.entry >= 0 ? a.offsets[g.entry] : 0;
      const int64_t plen = g.entry >= 0 ? a.offsets[g.entry + 1] - start : 0;
      if (!a.need_dq && !a.need_kv && (plen == 0 || !a.need_bank)) continue;  // nothing needed here
      const Segment<T> prefix{bank_k + h * a.bks[0] + start * a.bks[1],
                              a.bks[1],
                              bank_v + h * a.bvs[0] + start * a.bvs[1],
                              a.bvs[1],
                              plen,
                              nullptr};
      if (a.need_bank) {
        s.dbk.assign(plen * Dp, 0.f);
        s.dbv.assign(plen * Dp, 0.f);
      }
      for (const int64_t b : g.rows) {
        const Segment<T> own{k + b * a.ks[0] + h * a.ks[1],
                             a.ks[2],
                             v + b * a.vs[0] + h * a.vs[1],
                             a.vs[2],
                             a.Tk,
                             a.key_padding_mask ? a.key_padding_mask + b * a.Tk : nullptr};
        if (a.need_kv) {
          s.dk.assign(a.Tk * Dp, 0.f);
          s.dv.assign(a.Tk * Dp, 0.f);
        }
        for (int64_t i0 = 0; i0 < a.Tq; i0 += kBwdRows) {
          const int64_t M = std::min(kBwdRows, a.Tq - i0);
          // -- load the block: Q scaled, dO, Di = rowsum(dO * O), lse, causal limits
          for (int64_t i = 0; i < M; ++i) {
            const int64_t t = i0 + i;
            row_to_f32(q + b * a.qs[0] + h * a.qs[1] + t * a.qs[2], D, a.scale, s.q.data() + i * Dp,
                       Dp);
            row_to_f32(dout + b * a.dos[0] + h * a.dos[1] + t * a.dos[2], D, 1.f,
                       s.dout.data() + i * Dp, Dp);
            const T* o = out + b * a.os[0] + h * a.os[1] + t * a.os[2];
            float di = 0.f;
            for (int64_t d = 0; d < D; ++d) di += s.dout[i * Dp + d] * static_cast<float>(o[d]);
            s.di[i] = di;
            s.lse[i] = lse[(b * a.H + h) * a.Tq + t];
            s.limit[i] = a.causal ? std::clamp<int64_t>(t + 1 + a.Tk - a.Tq, 0, a.Tk) : a.Tk;
            s.row_ctr[i] = a.drop.row_counter(b * a.H + h, a.Tq, t);
          }
          std::fill(s.dq.begin(), s.dq.begin() + M * Dp, 0.f);
          // prefix key p is key j = p, own key t is key j = plen + t
          backward_segment(s, M, prefix, nullptr, s.dbk.data(), s.dbv.data(),
                           {&a.drop, s.row_ctr.data(), 0}, a.need_dq, a.need_bank);
          backward_segment(s, M, own, s.limit.data(), s.dk.data(), s.dv.data(),
                           {&a.drop, s.row_ctr.data(), plen}, a.need_dq, a.need_kv);
          if (!a.need_dq) continue;
          // -- dq = scale * dS K
          const Vec vscale(a.scale);
          for (int64_t i = 0; i < M; ++i) {
            float* row = s.dq.data() + i * Dp;
            for (int64_t d = 0; d < Dp; d += kVec) (Vec::loadu(row + d) * vscale).store(row + d);
            row_from_f32(row, D, dq + ((b * a.H + h) * a.Tq + i0 + i) * D);
          }
        }
        if (a.need_kv) {
          write_rows(s.dk.data(), a.Tk, Dp, D, dk + (b * a.H + h) * a.Tk * D, D);
          write_rows(s.dv.data(), a.Tk, Dp, D, dv + (b * a.H + h) * a.Tk * D, D);
        }
      }
      // dbank_k / dbank_v are contiguous [H, S, D]
      if (a.need_bank) {
        write_rows(s.dbk.data(), plen, Dp, D, dbank_k + (h * a.S + start) * D, D);
        write_rows(s.dbv.data(), plen, Dp, D, dbank_v + (h * a.S + start) * D, D);
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prefix_attention_backward(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& bank_k_in, const at::Tensor& bank_v_in,
    const at::Tensor& prefix_ids, const at::Tensor& bank_offsets,
    const std::optional<at::Tensor>& key_padding_mask, bool causal, double scale, bool dropout,
    int64_t seed, int64_t offset, int64_t threshold, double dropout_scale, const at::Tensor& out_in,
    const at::Tensor& lse_in, const std::vector<bool>& needs) {
  TORCH_CHECK(needs.size() == 5, "needs must hold 5 flags (dq, dk, dv, dbank_k, dbank_v), got ",
              needs.size());
  const bool need_dq = needs[0], need_kv = needs[1] || needs[2], need_bank = needs[3] || needs[4];
  const Inputs in = check_inputs(q_in, k_in, v_in, bank_k_in, bank_v_in, prefix_ids, bank_offsets,
                                 key_padding_mask);
  for (const auto& [name, t] :
       {std::pair<const char*, const at::Tensor&>{"dout", dout_in}, {"out", out_in}}) {
    TORCH_CHECK(
        t.sizes() == q_in.sizes() && t.scalar_type() == q_in.scalar_type() && t.device().is_cpu(),
        name, " must be a CPU tensor of q's shape and dtype, got ", t.scalar_type(), " ",
        t.sizes());
  }
  const int64_t B = in.q.size(0), H = in.q.size(1), Tq = in.q.size(2), D = in.q.size(3);
  TORCH_CHECK(lse_in.sizes() == at::IntArrayRef({B, H, Tq}) && lse_in.scalar_type() == at::kFloat,
              "lse must be float32 [B, H, Tq], got ", lse_in.scalar_type(), " ", lse_in.sizes());
  const at::Tensor dout = last_dim_contiguous(dout_in), out = last_dim_contiguous(out_in);
  const at::Tensor lse = lse_in.contiguous();
  const auto none = [](const at::Tensor& like) { return at::empty({0}, like.options()); };
  auto dq = need_dq ? at::empty(in.q.sizes(), in.q.options()) : none(in.q);
  auto dk = need_kv ? at::empty(in.k.sizes(), in.k.options()) : none(in.k);
  auto dv = need_kv ? at::empty(in.v.sizes(), in.v.options()) : none(in.v);
  auto dbank_k = need_bank ? at::zeros(in.bank_k.sizes(), in.bank_k.options()) : none(in.bank_k);
  auto dbank_v = need_bank ? at::zeros(in.bank_v.sizes(), in.bank_v.options()) : none(in.bank_v);
  if (B == 0 || H == 0 || D == 0) return {dq.zero_(), dk.zero_(), dv.zero_(), dbank_k, dbank_v};

  const BwdArgs args{
      make_call_args(in, scale, causal, dropout, seed, offset, threshold, dropout_scale),
      in.bank_k.size(1),
      dout.strides(),
      out.strides(),
      need_dq,
      need_kv,
      need_bank};
  dispatch_dtype(in.q.scalar_type(), "prefix_attention_backward", [&](auto tag) {
    using T = decltype(tag);
    backward_kernel<T>(args, dout.data_ptr<T>(), in.q.data_ptr<T>(), in.k.data_ptr<T>(),
                       in.v.data_ptr<T>(), in.bank_k.data_ptr<T>(), in.bank_v.data_ptr<T>(),
                       out.data_ptr<T>(), lse.data_ptr<float>(), dq.data_ptr<T>(), dk.data_ptr<T>(),
                       dv.data_ptr<T>(), dbank_k.data_ptr<T>(), dbank_v.data_ptr<T>());
  });
  return {dq, dk, dv, dbank_k, dbank_v};
}

at::Tensor dropout_mask(const at::Tensor& coords, int64_t H, int64_t Tq, int64_t key_stride,
                        int64_t seed, int64_t offset, int64_t threshold, double dropout_scale) {
  TORCH_CHECK(coords.dim() == 2 && coords.size(1) == 4 && coords.scalar_type() == at::kLong &&
                  coords.device().is_cpu(),
              "coords must be a CPU int64 tensor [N, 4] of (b, h, i, j), got ",
              coords.scalar_type(), " ", coords.sizes());
  Dropout d = make_dropout(true, seed, offset, threshold, dropout_scale, 0, 0);
  d.key_stride = key_stride;
  const at::Tensor c = coords.contiguous();
  const int64_t n = c.size(0);
  auto out = at::empty({n}, c.options().dtype(at::kFloat));
  const int64_t* p = c.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  // runs of consecutive keys of one query go through the kernels' vector path, as in attention
  for (int64_t e = 0; e < n;) {
    const int64_t* x = p + 4 * e;
    int64_t run = 1;
    while (e + run < n && p[4 * (e + run)] == x[0] && p[4 * (e + run) + 1] == x[1] &&
           p[4 * (e + run) + 2] == x[2] && p[4 * (e + run) + 3] == x[3] + run)
      ++run;
    d.multipliers(d.row_counter(x[0] * H + x[1], Tq, x[2]), x[3], run, o + e);
    e += run;
  }
  return out;
}

}  // namespace prefixrt
