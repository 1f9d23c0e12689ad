// Argument checks shared by the Communicator backends (see comm_check.h).
#include "comm/comm_check.h"

#include <string>

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
    check.that(send_bytes[j] >= 0, cat("send_bytes[", j, "]"), ">= 0", cat(send_bytes[j]));
    check.that(recv_bytes[j] >= 0, cat("recv_bytes[", j, "]"), ">= 0", cat(recv_bytes[j]));
    check.that(send_offsets[j] >= 0, cat("send_offsets[", j, "]"), ">= 0", cat(send_offsets[j]));
    check.that(recv_offsets[j] >= 0, cat("recv_offsets[", j, "]"), ">= 0", cat(recv_offsets[j]));
    total_send += send_bytes[j];
    total_recv += recv_bytes[j];
  }
  check.that(send != nullptr || total_send == 0, "send", "a non-null pointer", "nullptr");
  check.that(recv != nullptr || total_recv == 0, "recv", "a non-null pointer", "nullptr");
}

}  // namespace fp8flow::detail
