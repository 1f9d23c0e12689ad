// Argument checks shared by the Communicator backends (InProcess, NCCL).
#pragma once

#include <cstdint>
#include <span>

#include "fp8flow/comm.h"

namespace fp8flow::detail {

// Local checks of all_to_all_v's arguments (before anything is sent or published), throwing
// ErrorKind::InvalidArgument as "fp8flow::Communicator::all_to_all_v: <arg>: ...": one entry per
// rank in each count/offset span, counts and offsets >= 0, send/recv non-null unless their total
// is zero.
void check_all_to_all_v_args(int nranks, const void* send, std::span<const int64_t> send_bytes,
                             std::span<const int64_t> send_offsets, const void* recv,
                             std::span<const int64_t> recv_bytes,
                             std::span<const int64_t> recv_offsets);

// Local checks of all_to_all_segments (InvalidArgument naming
// "fp8flow::Communicator::all_to_all_segments"): peer in [0, ranks), bytes >= 0, non-null data
// when bytes move, receive ranges that do not overlap.
void validate_segments(int ranks, std::span<const CommSegment> sends,
                       std::span<const CommSegment> recvs);

}  // namespace fp8flow::detail
