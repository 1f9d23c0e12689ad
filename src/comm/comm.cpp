// Backend-independent communicator helpers: check_same_on_all_ranks.
#include <algorithm>
#include <cstdint>
#include <vector>

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

}  // namespace fp8flow
