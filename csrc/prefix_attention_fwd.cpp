// Forward of prefix attention on the CPU: every row attends over [bank entry prefix_ids[b] ; own
// keys], reading the bank in place (no gather, no concat), with one online softmax over both parts.
//
// Work: (tile, head) jobs over at::parallel_for; a tile stacks the queries of rows that share a
// bank entry (see plan.h). Per job: the entry's K/V once for the whole tile, then each row's own
// K/V.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <tuple>

#include "online_softmax.h"
#include "plan.h"
#include "prefix_attention.h"

namespace prefixrt {
namespace {

template <typename T>
void forward_kernel(const CallArgs& a, const T* q, const T* k, const T* v, const T* bank_k,
                    const T* bank_v, T* out, float* lse) {
  const int64_t tile_rows =
      choose_tile_rows(a.ids, a.B, a.Tq, a.H, static_cast<int64_t>(at::get_num_threads()));
  const Plan plan = make_plan(a.ids, a.B, a.Tq, tile_rows);
  const int64_t n_jobs = static_cast<int64_t>(plan.tiles.size()) * a.H;

  const int64_t grain =
      parallel_grain(n_jobs, attention_fma(a.ids, a.offsets, a.B, a.H, a.Tq, a.Tk, a.D));
  at::parallel_for(0, n_jobs, grain, [&](int64_t begin, int64_t end) {
    Tile t(plan.max_rows, a.D);
    std::vector<int64_t> limit(plan.max_rows);
    std::vector<uint64_t> row_ctr(plan.max_rows);  // dropout counters of the tile's rows
    for (int64_t job = begin; job < end; ++job) {
      const TileJob& tile = plan.tiles[job / a.H];
      const int64_t h = job % a.H;
      // -- gather the tile's queries
      t.reset(tile.rows);
      for (int64_t r = tile.run_begin; r < tile.run_end; ++r) {
        const Run& run = plan.runs[r];
        for (int64_t i = 0; i < run.n; ++i) {
          t.load_query(run.t0 + i, q + run.b * a.qs[0] + h * a.qs[1] + (run.i0 + i) * a.qs[2],
                       a.scale);
          row_ctr[run.t0 + i] = a.drop.row_counter(run.b * a.H + h, a.Tq, run.i0 + i);
        }
      }
      // -- the shared prefix, read once for the whole tile
      if (tile.entry >= 0) {
        const int64_t start = a.offsets[tile.entry];
        const Segment<T> prefix{bank_k + h * a.bks[0] + start * a.bks[1], a.bks[1],
                                bank_v + h * a.bvs[0] + start * a.bvs[1], a.bvs[1],
                                a.offsets[tile.entry + 1] - start,        nullptr};
        attend_segment(t, 0, tile.rows, prefix, nullptr, {&a.drop, row_ctr.data(), 0});
      }
      // -- each run's own keys (causal: query i sees key j <= i + Tk - Tq)
      for (int64_t r = tile.run_begin; r < tile.run_end; ++r) {
        const Run& run = plan.runs[r];
        const Segment<T> own{k + run.b * a.ks[0] + h * a.ks[1],
                             a.ks[2],
                             v + run.b * a.vs[0] + h * a.vs[1],
                             a.vs[2],
                             a.Tk,
                             a.key_padding_mask ? a.key_padding_mask + run.b * a.Tk : nullptr};
        for (int64_t i = 0; i < run.n; ++i)
          limit[i] = a.causal ? std::clamp<int64_t>(run.i0 + i + 1 + a.Tk - a.Tq, 0, a.Tk) : a.Tk;
        // own key t is key j = P_b + t of the row's [prefix ; own] list
        const int64_t id = a.ids[run.b];
        const int64_t plen = id >= 0 ? a.offsets[id + 1] - a.offsets[id] : 0;
        attend_segment(t, run.t0, run.n, own, limit.data(),
                       {&a.drop, row_ctr.data() + run.t0, plen});
      }
      // -- normalize and write out [B, H, Tq, D] / lse [B, H, Tq] (both contiguous)
      for (int64_t r = tile.run_begin; r < tile.run_end; ++r) {
        const Run& run = plan.runs[r];
        for (int64_t i = 0; i < run.n; ++i) {
          const int64_t row = (run.b * a.H + h) * a.Tq + run.i0 + i;
          lse[row] = t.finalize(run.t0 + i, out + row * a.D);
        }
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> prefix_attention_forward(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& bank_k_in, const at::Tensor& bank_v_in, const at::Tensor& prefix_ids,
    const at::Tensor& bank_offsets, const std::optional<at::Tensor>& key_padding_mask, bool causal,
    double scale, bool dropout, int64_t seed, int64_t offset, int64_t threshold,
    double dropout_scale) {
  const Inputs in = check_inputs(q_in, k_in, v_in, bank_k_in, bank_v_in, prefix_ids, bank_offsets,
                                 key_padding_mask);
  const int64_t B = in.q.size(0), H = in.q.size(1), Tq = in.q.size(2), D = in.q.size(3);
  auto out = at::empty({B, H, Tq, D}, in.q.options());
  auto lse = at::empty({B, H, Tq}, in.q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse.fill_(-std::numeric_limits<float>::infinity())};

  const CallArgs args =
      make_call_args(in, scale, causal, dropout, seed, offset, threshold, dropout_scale);
  dispatch_dtype(in.q.scalar_type(), "prefix_attention_forward", [&](auto tag) {
    using T = decltype(tag);
    forward_kernel<T>(args, in.q.data_ptr<T>(), in.k.data_ptr<T>(), in.v.data_ptr<T>(),
                      in.bank_k.data_ptr<T>(), in.bank_v.data_ptr<T>(), out.data_ptr<T>(),
                      lse.data_ptr<float>());
  });
  return {out, lse};
}

}  // namespace prefixrt
