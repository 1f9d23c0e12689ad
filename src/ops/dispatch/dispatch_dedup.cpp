// Token-dedup dispatch, host side: per-destination token counts, the plan (records and the
// destination row of every pair), the dedup record format. The collective is in dispatch.cpp.
#include <algorithm>
#include <climits>
#include <vector>

#include "common/check.h"
#include "fp8flow/dispatch.h"

namespace fp8flow {

namespace {

using detail::cat;
using detail::Check;

// topk_idx [T][k]: k >= 1, whole rows, entries in [0, experts). Returns T.
int64_t check_routing(const Check& c, int64_t experts, std::span<const int32_t> idx, int k) {
  c.that(k >= 1, "k", "at least 1", cat(k));
  c.that(idx.size() % static_cast<size_t>(k) == 0, "topk_idx",
         cat("a whole number of rows of k = ", k, " entries"), cat(idx.size(), " entries"));
  c.that(static_cast<int64_t>(idx.size()) < INT32_MAX, "topk_idx", "fewer than 2^31 entries",
         cat(idx.size()));
  for (size_t i = 0; i < idx.size(); ++i)
    if (!(idx[i] >= 0 && idx[i] < experts))
      c.that(false, "topk_idx", cat("experts in [0, ", experts, ")"),
             cat(idx[i], " at [", i / k, "][", i % k, "]"));
  return static_cast<int64_t>(idx.size()) / k;
}

// The rank of every global expert (a lookup instead of a division per pair).
std::vector<int32_t> rank_table(int64_t experts, int ranks) {
  std::vector<int32_t> rank_of(static_cast<size_t>(experts));
  for (int64_t e = 0; e < experts; ++e) rank_of[e] = static_cast<int32_t>(e / (experts / ranks));
  return rank_of;
}

// One pass over a validated routing: tokens with a pair on each rank (per_rank [ranks]) and,
// when per_expert is given, pairs per expert ([experts]).
void count_routing(std::span<const int32_t> idx, int k, int ranks, int64_t experts,
                   std::vector<int64_t>& per_rank, std::vector<int64_t>* per_expert) {
  const int64_t T = static_cast<int64_t>(idx.size()) / k;
  const std::vector<int32_t> rank_of = rank_table(experts, ranks);
  per_rank.assign(static_cast<size_t>(ranks), 0);
  if (per_expert) per_expert->assign(static_cast<size_t>(experts), 0);
  int64_t* pr = per_rank.data();  // raw pointers: no reloads through the vectors in the loop
  int64_t* pe = per_expert ? per_expert->data() : nullptr;
  const int32_t* ro = rank_of.data();
  std::vector<int64_t> last(static_cast<size_t>(ranks), -1);  // last token counted per rank
  int64_t* lt = last.data();
  for (int64_t t = 0; t < T; ++t)
    for (int j = 0; j < k; ++j) {
      const int32_t e = idx[t * k + j];
      if (pe) ++pe[e];
      const int32_t r = ro[e];
      if (lt[r] != t) {
        lt[r] = t;
        ++pr[r];
      }
    }
}

}  // namespace

std::vector<int64_t> dedup_token_counts(const DispatchLayout& l, std::span<const int32_t> idx,
                                        int k) {
  return dedup_token_counts(idx, k, l.ranks, l.experts);
}

std::vector<int64_t> dedup_token_counts(std::span<const int32_t> idx, int k, int ranks,
                                        int64_t experts) {
  const Check c("dedup_token_counts");
  c.that(ranks >= 1 && experts >= 1 && experts % ranks == 0, "experts",
         cat("a positive multiple of ranks (", ranks, ")"), cat(experts));
  check_routing(c, experts, idx, k);
  std::vector<int64_t> n;
  count_routing(idx, k, ranks, experts, n, nullptr);
  return n;
}

DedupPlan make_dedup_plan(const DispatchLayout& l, std::span<const int32_t> idx, int k,
                          std::span<const int64_t> all_tokens) {
  const Check c("make_dedup_plan");
  const int64_t T = check_routing(c, l.experts, idx, k);
  const int64_t N = l.ranks, El = l.local_experts, E = l.experts;
  c.that(static_cast<int64_t>(all_tokens.size()) == N * N, "all_tokens",
         cat(N * N, " entries (ranks x ranks)"), cat(all_tokens.size()));
  // One pass: pairs per expert and tokens per destination rank (check_routing validated the
  // entries). The routing must be the one the layout's counts of this rank come from.
  std::vector<int64_t> mine, own;
  count_routing(idx, k, static_cast<int>(N), E, own, &mine);
  for (int64_t e = 0; e < E; ++e)
    if (mine[e] != l.counts[static_cast<size_t>(l.rank * E + e)])
      c.that(false, "topk_idx",
             cat("the routing of the layout's counts (", l.counts[l.rank * E + e],
                 " pairs on expert ", e, ")"),
             cat(mine[e], " pairs on expert ", e));
  for (int64_t j = 0; j < N; ++j) {
    if (all_tokens[l.rank * N + j] != own[j])
      c.that(false, "all_tokens",
             cat("this rank's dedup_token_counts at [", l.rank, "][", j, "] (", own[j], ")"),
             cat(all_tokens[l.rank * N + j]));
    for (int64_t s = 0; s < N; ++s)
      if (all_tokens[s * N + j] < 0)
        c.that(false, "all_tokens", "entries >= 0",
               cat(all_tokens[s * N + j], " at [", s, "][", j, "]"));
  }

  DedupPlan p;
  p.ranks = l.ranks;
  p.rank = l.rank;
  p.k = k;
  p.tokens = T;
  p.send_rows = own;
  p.send_offsets.assign(N, 0);
  p.recv_rows.assign(N, 0);
  p.recv_offsets.assign(N, 0);
  for (int64_t s = 0; s < N; ++s) p.recv_rows[s] = all_tokens[s * N + l.rank];
  for (int64_t j = 1; j < N; ++j) {
    p.send_offsets[j] = p.send_offsets[j - 1] + p.send_rows[j - 1];
    p.recv_offsets[j] = p.recv_offsets[j - 1] + p.recv_rows[j - 1];
  }
  p.send_total = p.send_offsets[N - 1] + p.send_rows[N - 1];
  p.recv_total = p.recv_offsets[N - 1] + p.recv_rows[N - 1];
  c.that(p.recv_total < INT32_MAX, "all_tokens", "records per rank < 2^31", cat(p.recv_total));

  // First permuted row of this rank's pairs for every global expert e, on e's rank: the padded
  // segment start of e's local expert there plus the pairs of lower source ranks (dispatch.h:
  // segments are source-rank major). Pairs of one (source, expert) follow in flat t k + j order.
  auto cnt = [&](int64_t s, int64_t e) { return l.counts[static_cast<size_t>(s * E + e)]; };
  auto pad = [&](int64_t n) { return (n + l.align - 1) / l.align * l.align; };
  std::vector<int64_t> next(static_cast<size_t>(E), 0);
  for (int64_t r = 0; r < N; ++r) {
    int64_t seg = 0;
    for (int64_t e = r * El; e < (r + 1) * El; ++e) {
      int64_t first = seg, total = 0;
      for (int64_t s = 0; s < N; ++s) {
        if (s < l.rank) first += cnt(s, e);
        total += cnt(s, e);
      }
      next[e] = first;
      seg += pad(total);
    }
  }
  p.token.assign(static_cast<size_t>(p.send_total), -1);
  p.slots.assign(static_cast<size_t>(p.send_total * k), -1);
  std::vector<int64_t> fill(p.send_offsets);                // next record per destination rank
  std::vector<int64_t> rec_of(static_cast<size_t>(N), -1);  // token t's record to rank r ...
  std::vector<int64_t> last(static_cast<size_t>(N), -1);    // ... valid when last[r] == t
  const std::vector<int32_t> rank_of = rank_table(E, static_cast<int>(N));
  for (int64_t t = 0; t < T; ++t) {
    for (int j = 0; j < k; ++j) {
      const int64_t e = idx[t * k + j], r = rank_of[e];
      if (last[r] != t) {
        last[r] = t;
        rec_of[r] = fill[r]++;
        p.token[rec_of[r]] = static_cast<int32_t>(t);
      }
      p.slots[static_cast<size_t>(rec_of[r] * k + j)] = static_cast<int32_t>(next[e]++);
    }
  }
  return p;
}

DedupPlan exchange_dedup_plan(Communicator& comm, const DispatchLayout& l,
                              std::span<const int32_t> idx, int k, Stream stream) {
  const Check c("exchange_dedup_plan");
  c.that(l.ranks == comm.size() && l.rank == comm.rank(), "layout",
         cat("a layout of rank ", comm.rank(), " of ", comm.size()),
         cat("rank ", l.rank, " of ", l.ranks));
  const std::vector<int64_t> mine = dedup_token_counts(l, idx, k);
  const std::vector<int64_t> all = comm.all_gather(mine, stream);
  return make_dedup_plan(l, idx, k, all);
}

int64_t dedup_plan_max_words(int64_t tokens, int k, int ranks) {
  return tokens * std::min<int64_t>(k, ranks) * (1 + int64_t{k});
}

DispatchWire dispatch_dedup_wire(DType data_dtype, int64_t hidden, int k) {
  const Check c("dispatch_dedup_wire");
  c.that(hidden > 0, "hidden", "> 0 (dedup moves data rows)", cat(hidden));
  c.that(k >= 1 && k <= 1024, "k", "in [1, 1024]", cat(k));
  DispatchWire w = dispatch_wire(data_dtype, hidden, false);
  const int64_t used = w.data_bytes + w.scale_bytes + int64_t{8} * k;
  w.row_bytes = (used + 15) / 16 * 16;
  return w;
}

}  // namespace fp8flow
