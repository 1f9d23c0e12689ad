// Benchmark inputs (see inputs.h).
#include "inputs.h"

#include <algorithm>
#include <random>
#include <thread>

#include "fp8flow/formats.h"

namespace fp8flow::bench {
namespace {

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

constexpr size_t kChunk = size_t{1} << 20;  // values per independently seeded chunk

void fill_chunk(uint16_t* out, size_t begin, size_t end, uint64_t seed) {
  std::mt19937_64 rng(splitmix64(seed ^ (begin / kChunk)));
  std::normal_distribution<float> nd(0.f, 1.f);
  for (size_t i = begin; i < end; ++i) {
    const int k = static_cast<int>(splitmix64(seed + i / 128) % 9) - 4;
    uint16_t h = fmt::bf16_from_f32(fmt::mul_pow2(nd(rng), k));
    if ((h & 0x7FFFu) == 0) h = fmt::bf16_from_f32(fmt::exp2i(k));  // never zero
    out[i] = h;
  }
}

}  // namespace

std::vector<uint16_t> random_bf16(size_t count, uint64_t seed) {
  std::vector<uint16_t> v(count);
  const size_t chunks = (count + kChunk - 1) / kChunk;
  const size_t threads =
      std::max<size_t>(1, std::min<size_t>(chunks, std::thread::hardware_concurrency()));
  std::vector<std::thread> pool;
  for (size_t t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      for (size_t c = t; c < chunks; c += threads)
        fill_chunk(v.data(), c * kChunk, std::min(count, (c + 1) * kChunk), seed);
    });
  for (auto& th : pool) th.join();
  return v;
}

std::vector<int64_t> scale_groups(std::span<const int64_t> groups, int64_t rows, int64_t new_rows) {
  std::vector<int64_t> out;
  if (groups.empty()) return out;
  int64_t prefix = 0, prev = 0;
  for (const int64_t g : groups) {
    prefix += g;
    // floor(prefix * new_rows / rows) without overflow for the sizes used here (< 2^31 each).
    const int64_t b =
        rows ? static_cast<int64_t>((static_cast<__int128>(prefix) * new_rows) / rows) : 0;
    out.push_back(b - prev);
    prev = b;
  }
  return out;
}

std::vector<int64_t> uneven_groups(int64_t rows, int64_t n, int64_t align, uint64_t seed) {
  // Sizes rows/n +- 12.5%, rounded to `align`; the last takes the remainder.
  std::vector<int64_t> g(static_cast<size_t>(n));
  const int64_t base = rows / n, span = std::max<int64_t>(1, base / 4);
  int64_t used = 0;
  for (int64_t i = 0; i + 1 < n; ++i) {
    const int64_t v = base - span / 2 + static_cast<int64_t>(splitmix64(seed + i) % span);
    g[static_cast<size_t>(i)] = std::max<int64_t>(0, v / align * align);
    used += g[static_cast<size_t>(i)];
  }
  g.back() = std::max<int64_t>(0, rows - used);
  return g;
}

std::vector<int64_t> equal_groups(int64_t rows, int64_t n) {
  std::vector<int64_t> g(static_cast<size_t>(n), rows / n);
  g.back() += rows - (rows / n) * n;
  return g;
}

}  // namespace fp8flow::bench
