// Benchmark inputs shared by the subcommands: one host buffer of random BF16 values generated once
// (reproducible, independent of the thread count) whose prefixes serve as any [M][K] input, and
// the scaling of expert splits (m_splits) from a full shape to a smaller verification shape.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace fp8flow::bench {

// `count` BF16 values (as uint16): N(0, 1) times 2^k, with k in [-4, 4] drawn per run of 128
// consecutive values, so each 1x128 tile of a [M][K] view (K % 128 == 0) has its own magnitude
// and a 128x128 tile mixes rows up to 8 binades apart (what the transpose's rescaling sees).
// Never zero, never non-finite. Generated on all hardware threads; the same for a given seed.
std::vector<uint16_t> random_bf16(size_t count, uint64_t seed = 0x5eed'f8f1'0000'0001ull);

// Expert splits of `rows` rescaled to `new_rows` by scaling the prefix boundaries (floor), so the
// pattern is kept and the sum is exactly new_rows. Empty in, empty out.
std::vector<int64_t> scale_groups(std::span<const int64_t> groups, int64_t rows, int64_t new_rows);

// `n` equal splits of `rows` (the last takes the remainder).
std::vector<int64_t> equal_groups(int64_t rows, int64_t n);
// n group sizes summing to `rows`: each rows/n +- 12.5%, a multiple of `align` (but the last),
// deterministic in `seed` (the shape of a layer's padded expert segments).
std::vector<int64_t> uneven_groups(int64_t rows, int64_t n, int64_t align, uint64_t seed);

}  // namespace fp8flow::bench
