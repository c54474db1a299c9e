// The work plan of one prefix-attention call: batch rows grouped by prefix id, cut into tiles.
//
// Rows that share a bank entry are put next to each other and their queries are stacked into one
// tile (Hydragen-style), so the entry's K/V is read once per tile and head instead of once per row:
// in decode a tile holds one query per row of the group; in prefill the Tq queries of a row fill
// tiles of their own. A tile is a list of runs: `n` consecutive queries i0.. of batch row b, at
// tile rows t0...
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

namespace prefixrt {

struct Run {
  int64_t b, i0, n, t0;
};

struct TileJob {
  int64_t entry;  // bank entry, -1 for none
  int64_t run_begin, run_end;
  int64_t rows;
};

struct Plan {
  std::vector<Run> runs;
  std::vector<TileJob> tiles;
  int64_t max_rows = 0;
};

// Checks ids against the bank (ids in [-1, N), offsets non-decreasing within [0, S]).
inline void check_bank(const int64_t* ids, int64_t B, const int64_t* offsets, int64_t n_offsets,
                       int64_t S) {
  TORCH_CHECK(n_offsets >= 1, "bank_offsets must have at least one element");
  TORCH_CHECK(offsets[0] >= 0 && offsets[n_offsets - 1] <= S, "bank_offsets must lie in [0, ", S,
              "], got [", offsets[0], ", ", offsets[n_offsets - 1], "]");
  for (int64_t e = 0; e + 1 < n_offsets; ++e)
    TORCH_CHECK(offsets[e] <= offsets[e + 1], "bank_offsets must be non-decreasing, entry ", e,
                " has ", offsets[e], " > ", offsets[e + 1]);
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(ids[b] >= -1 && ids[b] < n_offsets - 1, "prefix_ids[", b, "] = ", ids[b],
                " is out of range for a bank of ", n_offsets - 1, " entries");
}

// Groups rows by id (stable), then cuts each group's queries into tiles of at most tile_rows rows.
inline Plan make_plan(const int64_t* ids, int64_t B, int64_t Tq, int64_t tile_rows) {
  Plan plan;
  std::vector<int64_t> order(B);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return ids[a] < ids[b]; });
  TileJob cur{-2, 0, 0, 0};
  auto close = [&]() {
    if (cur.rows > 0) {
      cur.run_end = static_cast<int64_t>(plan.runs.size());
      plan.max_rows = std::max(plan.max_rows, cur.rows);
      plan.tiles.push_back(cur);
    }
    cur = TileJob{-2, static_cast<int64_t>(plan.runs.size()), 0, 0};
  };
  for (const int64_t b : order) {
    if (ids[b] != cur.entry) {
      close();
      cur.entry = ids[b];
    }
    for (int64_t i = 0; i < Tq;) {
      const int64_t take = std::min(Tq - i, tile_rows - cur.rows);
      plan.runs.push_back(Run{b, i, take, cur.rows});
      cur.rows += take;
      i += take;
      if (cur.rows == tile_rows) {
        const int64_t entry = cur.entry;
        close();
        cur.entry = entry;
      }
    }
  }
  close();
  return plan;
}

// Tile height: 64 rows, halved (down to 8) while that leaves fewer than 4 jobs per thread.
inline int64_t choose_tile_rows(const int64_t* ids, int64_t B, int64_t Tq, int64_t heads,
                                int64_t threads) {
  std::vector<int64_t> sorted(ids, ids + B);
  std::sort(sorted.begin(), sorted.end());
  int64_t rows = 64;
  while (rows > 8) {
    int64_t jobs = 0;
    for (int64_t i = 0; i < B;) {
      int64_t j = i;
      while (j < B && sorted[j] == sorted[i]) ++j;
      jobs += ((j - i) * Tq + rows - 1) / rows;
      i = j;
    }
    if (jobs * heads >= 4 * threads) break;
    rows /= 2;
  }
  return rows;
}

// Jobs per thread chunk for at::parallel_for: small calls run on the calling thread, since waking a
// second thread costs more than a few microseconds of work (and a whole time slice when the other
// core is busy). total_fma: multiply-adds of the whole call; below ~2^18 (about 10-20 us on one
// core) nothing is split.
inline int64_t parallel_grain(int64_t n_jobs, double total_fma) {
  constexpr double kMinParallelFma = 1 << 18;
  if (n_jobs <= 1 || total_fma <= 0) return 1;
  const double per_job = total_fma / static_cast<double>(n_jobs);
  return std::clamp<int64_t>(static_cast<int64_t>(kMinParallelFma / per_job) + 1, 1, n_jobs);
}

// Multiply-adds of a call: every (query, key) pair of every head costs 2 D (scores and output).
inline double attention_fma(const int64_t* ids, const int64_t* offsets, int64_t B, int64_t H,
                            int64_t Tq, int64_t Tk, int64_t D) {
  double keys = 0;
  for (int64_t b = 0; b < B; ++b)
    keys += static_cast<double>(Tk + (ids[b] >= 0 ? offsets[ids[b] + 1] - offsets[ids[b]] : 0));
  return 2.0 * static_cast<double>(H * Tq * D) * keys;
}

}  // namespace prefixrt
