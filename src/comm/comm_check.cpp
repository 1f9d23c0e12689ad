// Argument checks shared by the Communicator backends (see comm_check.h).
#include "comm/comm_check.h"

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "common/check.h"

namespace fp8flow::detail {

void check_all_to_all_v_args(int nranks, const void* send, std::span<const int64_t> send_bytes,
                             std::span<const int64_t> send_offsets, const void* recv,
                             std::span<const int64_t> recv_bytes,
                             std::span<const int64_t> recv_offsets) {
  Check check("Communicator::all_to_all_v");
  const auto n = static_cast<size_t>(nranks);
  const std::string sz = cat(nranks, " entries (one per rank)");
  check.that(send_bytes.size() == n, "send_bytes", sz, cat(send_bytes.size()));
  check.that(send_offsets.size() == n, "send_offsets", sz, cat(send_offsets.size()));
  check.that(recv_bytes.size() == n, "recv_bytes", sz, cat(recv_bytes.size()));
  check.that(recv_offsets.size() == n, "recv_offsets", sz, cat(recv_offsets.size()));
  int64_t total_send = 0, total_recv = 0;
  for (size_t j = 0; j < n; ++j) {
    if (!(send_bytes[j] >= 0))
      check.that(false, cat("send_bytes[", j, "]"), ">= 0", cat(send_bytes[j]));
    if (!(recv_bytes[j] >= 0))
      check.that(false, cat("recv_bytes[", j, "]"), ">= 0", cat(recv_bytes[j]));
    if (!(send_offsets[j] >= 0))
      check.that(false, cat("send_offsets[", j, "]"), ">= 0", cat(send_offsets[j]));
    if (!(recv_offsets[j] >= 0))
      check.that(false, cat("recv_offsets[", j, "]"), ">= 0", cat(recv_offsets[j]));
    total_send += send_bytes[j];
    total_recv += recv_bytes[j];
  }
  check.that(send != nullptr || total_send == 0, "send", "a non-null pointer", "nullptr");
  check.that(recv != nullptr || total_recv == 0, "recv", "a non-null pointer", "nullptr");
}

void validate_segments(int ranks, std::span<const CommSegment> sends,
                       std::span<const CommSegment> recvs) {
  const Check check("Communicator::all_to_all_segments");
  auto each = [&](std::span<const CommSegment> segs, const char* arg) {
    for (size_t i = 0; i < segs.size(); ++i) {
      const CommSegment& g = segs[i];
      if (!(g.peer >= 0 && g.peer < ranks))
        check.that(false, cat(arg, "[", i, "].peer"), cat("a rank in [0, ", ranks, ")"),
                   cat(g.peer));
      if (!(g.bytes >= 0)) check.that(false, cat(arg, "[", i, "].bytes"), ">= 0", cat(g.bytes));
      if (!(g.data != nullptr || g.bytes == 0))
        check.that(false, cat(arg, "[", i, "].data"), "a non-null pointer", "nullptr");
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
    if (!(end_a <= ranges[k].first))
      check.that(false, cat("recvs[", b, "].data"),
                 cat("receive ranges that do not overlap; recvs[", a, "] (", recvs[a].bytes,
                     " bytes) ends ", end_a - ranges[k].first, " bytes past its start"),
                 "an overlap");
  }
}

}  // namespace fp8flow::detail
