// Internal: argument checks shared by the communicator backends.
#pragma once

#include <span>

#include "fp8flow/comm.h"

namespace fp8flow::detail {

// Local checks of all_to_all_segments (InvalidArgument naming
// "fp8flow::Communicator::all_to_all_segments"): peer in [0, ranks), bytes >= 0, non-null data
// when bytes move, receive ranges that do not overlap.
void validate_segments(int ranks, std::span<const CommSegment> sends,
                       std::span<const CommSegment> recvs);

}  // namespace fp8flow::detail
