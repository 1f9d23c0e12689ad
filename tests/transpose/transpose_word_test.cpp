// The transpose kernel's host/device building blocks (src/ops/transpose/kernels/transpose_word.h)
// against the fmt:: definitions, and its shared-memory swizzle for bank conflicts. Runs without a
// GPU; the kernel itself is checked bit for bit against the reference in transpose_gpu_test.cpp.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "ops/transpose/kernels/transpose_word.h"
#include "ops/transpose/transpose_backends.h"
#include "transpose/transpose_test_util.h"

namespace fp8flow::test {
namespace {

namespace tw = sm90::tw;

TEST(TransposeWord, CodeScaleExponentEqualsFmt) {
  for (uint32_t mag = 1; mag < 0x7F; ++mag) {
    const float v = fmt::e4m3_to_f32(static_cast<uint8_t>(mag));
    EXPECT_EQ(tw::e4m3_mag_scale_exponent(mag), fmt::scale_exponent(v)) << "mag " << mag;
  }
}

TEST(TransposeWord, RowExponentClampsAndReadsPowersOfTwo) {
  for (int e = -127; e <= 127; ++e) EXPECT_EQ(tw::row_exponent(fmt::exp2i(e)), e);
  EXPECT_EQ(tw::row_exponent(fmt::exp2i(-140)), -127);  // subnormal FP32 scale: clamped
  EXPECT_EQ(tw::row_exponent(0.0f), -127);
  EXPECT_EQ(tw::row_exponent(INFINITY), 127);
}

TEST(TransposeWord, BytePermEmulationAndTranspose) {
  EXPECT_EQ(tw::byte_perm(0x33221100u, 0x77665544u, 0x6240u), 0x66224400u);
  // Like __byte_perm, only the low 3 bits of a selector nibble count (no sign replication).
  EXPECT_EQ(tw::byte_perm(0x00800100u, 0u, 0xBA98u), 0x00800100u);
  uint32_t b[4];
  tw::transpose4x4(0x03020100u, 0x13121110u, 0x23222120u, 0x33323130u, b[0], b[1], b[2], b[3]);
  EXPECT_EQ(b[0], 0x30201000u);
  EXPECT_EQ(b[1], 0x31211101u);
  EXPECT_EQ(b[2], 0x32221202u);
  EXPECT_EQ(b[3], 0x33231303u);
}

TEST(TransposeWord, SharedMemoryAccessIsConflictFree) {
  for (int warp = 0; warp < 8; ++warp) {
    for (int i = 0; i < 4; ++i) {  // chunk writes: lanes 8h..8h+7 of a warp form one phase
      for (int h = 0; h < 4; ++h) {
        uint32_t banks = 0;
        for (int l = 8 * h; l < 8 * h + 8; ++l) {
          const int q = 32 * warp + l + 256 * i, r = q >> 3, c = q & 7;
          const int word = tw::tile_chunk_word(r, c);
          ASSERT_EQ(word % 4, 0);
          banks |= 0xFu << (word % 32);
        }
        EXPECT_EQ(banks, 0xFFFFFFFFu) << "chunk writes, warp " << warp << " i " << i;
      }
    }
    for (int i = 0; i < 16; ++i) {  // column reads
      uint32_t banks = 0;
      for (int lane = 0; lane < 32; ++lane) {
        const int j = lane & 7, wd = (lane >> 3) + 4 * warp;
        banks |= 1u << (tw::tile_thread_word(j, wd, i) % 32);
      }
      EXPECT_EQ(banks, 0xFFFFFFFFu) << "column reads, warp " << warp << " row " << i;
    }
  }
  // Every (row, chunk) has its own slot.
  std::vector<int> seen(128 * 32, 0);
  for (int r = 0; r < 128; ++r)
    for (int c = 0; c < 8; ++c)
      for (int e = 0; e < 4; ++e) ++seen[tw::tile_chunk_word(r, c) + e];
  for (int v : seen) ASSERT_EQ(v, 1);
  // The column read of (j, wd, i) is word wd of row 16j + i as the chunk writes laid it out.
  for (int j = 0; j < 8; ++j)
    for (int wd = 0; wd < 32; ++wd)
      for (int i = 0; i < 16; ++i)
        ASSERT_EQ(tw::tile_thread_word(j, wd, i), tw::tile_chunk_word(16 * j + i, wd / 4) + wd % 4);
}

// ColumnTight's pair order: a bijection onto (tile, channel block) for every shape and group size
// (short last groups, groups wider than K/128, one tile, one block), in the stated order: channel
// blocks in groups, token tiles within a group, channel block fastest within a tile; a group size
// >= K/128 gives the order before groups (tile = pair / nkb).
TEST(TransposeWord, TightPairOrderIsABijectionInGroupOrder) {
  for (int ntiles : {1, 2, 7, 65, 256})
    for (int nkb : {1, 2, 10, 16, 56, 72})
      for (int kg : {1, 3, 4, 16, 56, 65536}) {
        std::vector<int> seen(static_cast<size_t>(ntiles) * nkb, 0);
        int prev_tile = -1, prev_kb = -1;
        for (int pair = 0; pair < ntiles * nkb; ++pair) {
          int tile = -1, kb = -1;
          tw::tight_pair(pair, ntiles, nkb, kg, tile, kb);
          ASSERT_TRUE(tile >= 0 && tile < ntiles && kb >= 0 && kb < nkb)
              << ntiles << "x" << nkb << " group " << kg << " pair " << pair;
          ++seen[static_cast<size_t>(tile) * nkb + kb];
          const int g = std::min(kg, nkb);
          EXPECT_EQ(kb / g, pair / (g * ntiles)) << "group of pair " << pair;
          if (pair > 0 && kb / g == prev_kb / g) {  // same group: next block, else next tile
            const bool next_kb = tile == prev_tile && kb == prev_kb + 1;
            const bool next_tile = tile == prev_tile + 1 && kb % g == 0 &&
                                   prev_kb == std::min(nkb, (prev_kb / g + 1) * g) - 1;
            EXPECT_TRUE(next_kb || next_tile)
                << ntiles << "x" << nkb << " group " << kg << " pair " << pair;
          }
          if (kg >= nkb) {
            EXPECT_EQ(tile, pair / nkb);
            EXPECT_EQ(kb, pair % nkb);
          }
          prev_tile = tile;
          prev_kb = kb;
        }
        for (int v : seen) ASSERT_EQ(v, 1) << ntiles << "x" << nkb << " group " << kg;
      }
}

}  // namespace
}  // namespace fp8flow::test
