// Token-dedup dispatch, host side: per-destination token counts, the plan (records and the
// destination row of every pair), the dedup record format. The collective is in dispatch.cpp.
#include <algorithm>
#include <climits>
#include <vector>

#include "common/check.h"
#include "fp8flow/dispatch.h"
#include "ops/dispatch/dispatch_backends.h"

namespace fp8flow {

namespace {

using detail::cat;
using detail::Check;

// topk_idx [T][k]: k >= 1, whole rows (the entries are checked by the passes that read them).
// Returns T.
int64_t check_routing_shape(const Check& c, std::span<const int32_t> idx, int k) {
  c.that(k >= 1, "k", "at least 1", cat(k));
  c.that(idx.size() % static_cast<size_t>(k) == 0, "topk_idx",
         cat("a whole number of rows of k = ", k, " entries"), cat(idx.size(), " entries"));
  c.that(static_cast<int64_t>(idx.size()) < INT32_MAX, "topk_idx", "fewer than 2^31 entries",
         cat(idx.size()));
  return static_cast<int64_t>(idx.size()) / k;
}

[[noreturn]] void bad_expert(const Check& c, int64_t experts, std::span<const int32_t> idx, int k,
                             size_t i) {
  c.fail(ErrorKind::InvalidArgument, "topk_idx",
         cat("expected experts in [0, ", experts, "), got ", idx[i], " at [", i / k, "][", i % k,
             "]"));
}

// The rank of every global expert (a lookup instead of a division per pair).
std::vector<int32_t> rank_table(int64_t experts, int ranks) {
  std::vector<int32_t> rank_of(static_cast<size_t>(experts));
  for (int64_t e = 0; e < experts; ++e) rank_of[e] = static_cast<int32_t>(e / (experts / ranks));
  return rank_of;
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
  const int64_t T = check_routing_shape(c, idx, k);
  // One pass (NOTES: this and make_dedup_plan run on the layer's critical path, between the
  // step's host sync and the dispatch): range check, rank lookup, first pair of a token per rank.
  const std::vector<int32_t> rank_of = rank_table(experts, ranks);
  std::vector<int64_t> n(static_cast<size_t>(ranks), 0), last(static_cast<size_t>(ranks), -1);
  const int32_t* ro = rank_of.data();
  int64_t* pn = n.data();
  int64_t* lt = last.data();
  for (int64_t t = 0; t < T; ++t)
    for (int j = 0; j < k; ++j) {
      const size_t i = static_cast<size_t>(t * k + j);
      const int32_t e = idx[i];
      if (static_cast<uint32_t>(e) >= static_cast<uint64_t>(experts))
        bad_expert(c, experts, idx, k, i);
      const int32_t r = ro[e];
      if (lt[r] != t) {
        lt[r] = t;
        ++pn[r];
      }
    }
  return n;
}

DedupPlan make_dedup_plan(const DispatchLayout& l, std::span<const int32_t> idx, int k,
                          std::span<const int64_t> all_tokens) {
  DedupPlan p;
  make_dedup_plan(l, idx, k, all_tokens, p);
  return p;
}

namespace {

// The plan's sizes and offsets from all_tokens (checked), and `next`: the first permuted row of
// this rank's pairs for every global expert e, on e's rank (the padded segment start of e's local
// expert there plus the pairs of lower source ranks; dispatch.h: segments are source-rank major;
// pairs of one (source, expert) follow in flat t k + j order).
void plan_sizes(const Check& c, const DispatchLayout& l, int64_t T, int k,
                std::span<const int64_t> all_tokens, DedupPlan& p, std::vector<int64_t>& next) {
  const int64_t N = l.ranks;
  c.that(k >= 1, "k", "at least 1", cat(k));
  c.that(T >= 0 && T * k < INT32_MAX, "tokens", "T >= 0 with T k < 2^31", cat(T));
  c.that(static_cast<int64_t>(all_tokens.size()) == N * N, "all_tokens",
         cat(N * N, " entries (ranks x ranks)"), cat(all_tokens.size()));
  for (int64_t i = 0; i < N * N; ++i)
    if (all_tokens[i] < 0)
      c.that(false, "all_tokens", "entries >= 0",
             cat(all_tokens[i], " at [", i / N, "][", i % N, "]"));
  p.ranks = l.ranks;
  p.rank = l.rank;
  p.k = k;
  p.tokens = T;
  p.send_rows.assign(all_tokens.begin() + l.rank * N, all_tokens.begin() + (l.rank + 1) * N);
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
  c.that(p.send_total <= T * std::min<int64_t>(k, N), "all_tokens",
         cat("at most ", T * std::min<int64_t>(k, N), " records of this rank (T min(k, ranks))"),
         cat(p.send_total));
  next = detail::dedup_first_rows(l);
}

}  // namespace

std::vector<int64_t> detail::dedup_first_rows(const DispatchLayout& l) {
  const int64_t N = l.ranks, El = l.local_experts, E = l.experts;
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
  return next;
}

DedupPlan make_dedup_plan_sizes(const DispatchLayout& l, int64_t tokens, int k,
                                std::span<const int64_t> all_tokens) {
  const Check c("make_dedup_plan_sizes");
  DedupPlan p;
  std::vector<int64_t> next;
  plan_sizes(c, l, tokens, k, all_tokens, p, next);
  return p;
}

void make_dedup_plan(const DispatchLayout& l, std::span<const int32_t> idx, int k,
                     std::span<const int64_t> all_tokens, DedupPlan& p) {
  const Check c("make_dedup_plan");
  const int64_t T = check_routing_shape(c, idx, k);
  const int64_t N = l.ranks, E = l.experts;
  // Sized from this rank's row of all_tokens; the pass below checks the routing against it and
  // against the layout's counts, and fails (after the pass, routing error first) on a mismatch.
  std::vector<int64_t> next;
  plan_sizes(c, l, T, k, all_tokens, p, next);

  // One pass over the routing (NOTES: on the layer's critical path; a separate validation pass,
  // counting pass and -1 fill of the slots took 2/3 of the time): records in token order per
  // destination rank, each record's k slots written -1 when it opens, then its pairs' rows.
  p.token.resize(static_cast<size_t>(p.send_total));
  p.slots.resize(static_cast<size_t>(p.send_total * k));
  std::vector<int64_t> fill(p.send_offsets), end(static_cast<size_t>(N));
  for (int64_t r = 0; r < N; ++r) end[r] = p.send_offsets[r] + p.send_rows[r];
  std::vector<int64_t> rec_of(static_cast<size_t>(N), -1), last(static_cast<size_t>(N), -1);
  std::vector<int64_t> own(static_cast<size_t>(N), 0);
  const std::vector<int64_t> next0(next);  // pairs per expert = next - next0 after the pass
  const std::vector<int32_t> rank_of = rank_table(E, static_cast<int>(N));
  const int32_t* ro = rank_of.data();
  int64_t *pf = fill.data(), *pe = end.data(), *prec = rec_of.data(), *pl = last.data();
  int64_t *po = own.data(), *pn = next.data();
  int32_t* ptok = p.token.data();
  int32_t* psl = p.slots.data();
  for (int64_t t = 0; t < T; ++t) {
    for (int j = 0; j < k; ++j) {
      const size_t i = static_cast<size_t>(t * k + j);
      const int32_t e = idx[i];
      if (static_cast<uint32_t>(e) >= static_cast<uint64_t>(E)) bad_expert(c, E, idx, k, i);
      const int32_t r = ro[e];
      if (pl[r] != t) {
        pl[r] = t;
        ++po[r];
        prec[r] =
            pf[r] < pe[r] ? pf[r]++ : -1;  // -1: more tokens than all_tokens says (fails below)
        if (prec[r] >= 0) {
          ptok[prec[r]] = static_cast<int32_t>(t);
          std::fill_n(psl + prec[r] * k, k, -1);
        }
      }
      const int64_t row = pn[e]++;
      if (prec[r] >= 0) psl[prec[r] * k + j] = static_cast<int32_t>(row);
    }
  }
  // The routing must be the one the layout's counts of this rank come from, and give this rank's
  // row of all_tokens.
  for (int64_t e = 0; e < E; ++e)
    if (next[e] - next0[e] != l.counts[static_cast<size_t>(l.rank * E + e)])
      c.that(false, "topk_idx",
             cat("the routing of the layout's counts (", l.counts[l.rank * E + e],
                 " pairs on expert ", e, ")"),
             cat(next[e] - next0[e], " pairs on expert ", e));
  for (int64_t j = 0; j < N; ++j)
    if (all_tokens[l.rank * N + j] != own[j])
      c.that(false, "all_tokens",
             cat("this rank's dedup_token_counts at [", l.rank, "][", j, "] (", own[j], ")"),
             cat(all_tokens[l.rank * N + j]));
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
