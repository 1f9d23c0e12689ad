// Backend-independent communicator helpers: check_same_on_all_ranks, the local checks of
// all_to_all_segments.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "comm/comm_internal.h"
#include "common/check.h"
#include "fp8flow/comm.h"

namespace fp8flow {

void check_same_on_all_ranks(Communicator& comm, std::span<const int64_t> values, const char* what,
                             Stream stream) {
  using detail::cat;
  const int n = comm.size();
  // First the counts (all_gather needs the same count everywhere), then the values. Every rank
  // sees the same gathered data and so throws the same message.
  const int64_t count = static_cast<int64_t>(values.size());
  const std::vector<int64_t> counts = comm.all_gather(std::span<const int64_t>(&count, 1), stream);
  for (int r = 1; r < n; ++r)
    if (counts[r] != counts[0])
      throw Error(ErrorKind::Comm,
                  cat("fp8flow::check_same_on_all_ranks: ", what,
                      ": expected the same values on "
                      "every rank, got ",
                      counts[0], " values on rank 0 and ", counts[r], " on rank ", r));
  const std::vector<int64_t> all = comm.all_gather(values, stream);
  const size_t k = values.size();
  for (int r = 1; r < n; ++r)
    for (size_t i = 0; i < k; ++i)
      if (all[r * k + i] != all[i])
        throw Error(ErrorKind::Comm, cat("fp8flow::check_same_on_all_ranks: ", what, "[", i,
                                         "]: expected the same value on every rank, got ", all[i],
                                         " on rank 0 and ", all[r * k + i], " on rank ", r));
}

namespace detail {

void validate_segments(int ranks, std::span<const CommSegment> sends,
                       std::span<const CommSegment> recvs) {
  const Check check("Communicator::all_to_all_segments");
  auto each = [&](std::span<const CommSegment> segs, const char* arg) {
    for (size_t i = 0; i < segs.size(); ++i) {
      const CommSegment& g = segs[i];
      check.that(g.peer >= 0 && g.peer < ranks, cat(arg, "[", i, "].peer"),
                 cat("a rank in [0, ", ranks, ")"), cat(g.peer));
      check.that(g.bytes >= 0, cat(arg, "[", i, "].bytes"), ">= 0", cat(g.bytes));
      check.that(g.data != nullptr || g.bytes == 0, cat(arg, "[", i, "].data"),
                 "a non-null pointer", "nullptr");
    }
  };
  each(sends, "sends");
  each(recvs, "recvs");
  // Receive ranges must not overlap (each byte written by one transfer at most).
  std::vector<std::pair<uintptr_t, size_t>> ranges;
  for (size_t i = 0; i < recvs.size(); ++i)
    if (recvs[i].bytes > 0) ranges.push_back({reinterpret_cast<uintptr_t>(recvs[i].data), i});
  std::sort(ranges.begin(), ranges.end());
  for (size_t k = 1; k < ranges.size(); ++k) {
    const size_t a = ranges[k - 1].second, b = ranges[k].second;
    const uintptr_t end_a = ranges[k - 1].first + static_cast<uintptr_t>(recvs[a].bytes);
    check.that(end_a <= ranges[k].first, cat("recvs[", b, "].data"),
               cat("receive ranges that do not overlap; recvs[", a, "] (", recvs[a].bytes,
                   " bytes) ends ", end_a - ranges[k].first, " bytes past its start"),
               "an overlap");
  }
}

}  // namespace detail

}  // namespace fp8flow
