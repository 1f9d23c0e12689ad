// The kernel's integer building blocks (src/ops/transpose/kernels/transpose_word.h) against the
// fmt:: definitions, exhaustively where the domain is small, plus a CPU emulation of the whole
// kernel (same tile geometry, same per-thread steps, shuffles replaced by loops) compared with the
// reference backend bit for bit. Runs without a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>

#include "ops/transpose/kernels/transpose_word.h"
#include "ops/transpose/transpose_backends.h"
#include "transpose/transpose_test_util.h"

namespace fp8flow::test {
namespace {

namespace tw = sm90::tw;

// code * 2^d as a double (exact for |d| <= 60), NaN for NaN codes.
double exact_value(uint8_t code, int d) {
  return std::ldexp(static_cast<double>(fmt::e4m3_to_f32(code)), d);
}

bool is_value(uint8_t code) {
  return tw::e4m3_mag_is_value(code & 0x7Fu);
}

TEST(TransposeWord, ElementRescaleEqualsFmtExhaustive) {
  int changed_cases = 0;
  for (int code = 0; code < 256; ++code) {
    for (int d = -60; d <= 60; ++d) {
      bool changed = true;
      const uint32_t r = tw::e4m3_rescale(static_cast<uint32_t>(code), d, &changed);
      const uint8_t want = fmt::e4m3_mul_pow2(static_cast<uint8_t>(code), d);
      ASSERT_EQ(r, want) << "code 0x" << std::hex << code << std::dec << " d " << d;
      if (!is_value(static_cast<uint8_t>(code))) {
        EXPECT_FALSE(changed) << "code " << code;
        continue;
      }
      const bool value_changed = static_cast<double>(fmt::e4m3_to_f32(static_cast<uint8_t>(r))) !=
                                 exact_value(static_cast<uint8_t>(code), d);
      ASSERT_EQ(changed, value_changed) << "code 0x" << std::hex << code << std::dec << " d " << d;
      changed_cases += changed;
    }
  }
  EXPECT_GT(changed_cases, 0);  // the sweep does reach rounding and saturation
}

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
  EXPECT_EQ(tw::byte_perm(0x00800100u, 0u, 0xBA98u), 0x00FF0000u);
  uint32_t b[4];
  tw::transpose4x4(0x03020100u, 0x13121110u, 0x23222120u, 0x33323130u, b[0], b[1], b[2], b[3]);
  EXPECT_EQ(b[0], 0x30201000u);
  EXPECT_EQ(b[1], 0x31211101u);
  EXPECT_EQ(b[2], 0x32221202u);
  EXPECT_EQ(b[3], 0x33231303u);
}

TEST(TransposeWord, NormalBitsFlagsZeroSubnormalNaN) {
  for (int code = 0; code < 256; ++code) {
    const uint32_t mag = code & 0x7F;
    const bool normal = mag >= 8 && mag <= 126;
    for (int pos = 0; pos < 4; ++pos) {
      const uint32_t x = (0x38383838u & ~(0xFFu << (8 * pos))) | (uint32_t(code) << (8 * pos));
      EXPECT_EQ(tw::normal_bits(x) == 0x80808080u, normal) << "code " << code << " pos " << pos;
    }
  }
}

// The fast word rescale: whenever it reports success (normal codes, rescale_ok), each byte equals
// fmt::e4m3_mul_pow2 with the byte's own shift; and it does succeed whenever every result is a
// normal number (so the slow path is only taken where it must be). Exhaustive over codes and
// shifts d = a + b for several splits into a row part a <= 0 and a column part b >= 0.
TEST(TransposeWord, FastRescaleEqualsFmtExhaustive) {
  const int tbase_list[] = {-127, -3, 0, 127};
  int fast = 0;
  for (int code = 0; code < 256; ++code) {
    const uint32_t mag = code & 0x7F;
    for (int d = -60; d <= 40; ++d) {
      // Precondition of the fast path: no overflow (d <= -scale_exponent(code)).
      if (is_value(uint8_t(code)) && d > -tw::e4m3_mag_scale_exponent(mag)) continue;
      for (int split = 0; split < 3; ++split) {
        const int a = split == 0 ? std::min(d, 0) : (split == 1 ? std::min(d, 0) - 7 : -60);
        const int b = d - a;
        for (int tbase : tbase_list) {
          const int t_m = tbase + a, t_col = tbase - b;
          if (t_m < -127 || t_col < -127) continue;
          const uint32_t x = uint32_t(code) * 0x01010101u;
          const uint32_t cw = tw::col_word(tbase, t_col, t_col);
          uint32_t mn = tw::kRescaleMinInit;
          const uint32_t y = tw::rescale_word(x, tw::row_word(a), cw, cw, mn);
          const bool ok = tw::normal_bits(x) == 0x80808080u && tw::rescale_ok(mn);
          const uint8_t want = fmt::e4m3_mul_pow2(uint8_t(code), d);
          const bool result_normal = mag >= 8 && mag <= 126 && int(mag >> 3) + d >= 1;
          ASSERT_EQ(ok, result_normal) << "code " << code << " d " << d << " a " << a;
          if (ok) {
            ASSERT_EQ(y, uint32_t(want) * 0x01010101u) << "code " << code << " d " << d;
            ++fast;
          }
        }
      }
    }
  }
  EXPECT_GT(fast, 10000);
}

// The wide SIMD path (zeros, NaN, results below the normal range): exhaustive over codes and
// shifts; equal to fmt::e4m3_mul_pow2 wherever it does not flag the word (subnormal or NaN
// codes), and its count equals the exact path's.
TEST(TransposeWord, WideRescaleEqualsFmtExhaustive) {
  int wide = 0;
  for (int code = 0; code < 256; ++code) {
    const uint32_t mag = code & 0x7F;
    for (int d = -60; d <= 40; ++d) {
      if (is_value(uint8_t(code)) && d > -tw::e4m3_mag_scale_exponent(mag)) continue;
      for (int tbase : {-127, 0, 127}) {
        const int a = std::min(d, 0), b = d - a;
        if (tbase + a < -127 || tbase - b < -127) continue;
        const uint32_t x = uint32_t(code) * 0x01010101u;
        const uint32_t p = tw::row_word(a), cw = tw::col_word(tbase, tbase - b, tbase - b);
        uint32_t bad = 0, cnt = 0;
        const uint32_t y = tw::rescale_word_wide<true>(x, tw::mag_lo(x) + p + cw,
                                                       tw::mag_hi(x) + p + cw, bad, cnt);
        const bool flagged = (bad & 0x80808080u) != 0;
        ASSERT_EQ(flagged, mag == 0x7F || (mag >= 1 && mag <= 7)) << "code " << code;
        if (flagged) continue;
        const uint8_t want = fmt::e4m3_mul_pow2(uint8_t(code), d);
        ASSERT_EQ(y, uint32_t(want) * 0x01010101u) << "code " << code << " d " << d;
        const tw::RescaledWord ex =
            tw::rescale_word_exact(x, tbase + a, tbase - b, tbase - b, tbase - b, tbase - b);
        ASSERT_EQ((cnt & 0xFFFF) + (cnt >> 16), ex.changed) << "code " << code << " d " << d;
        ++wide;
      }
    }
  }
  EXPECT_GT(wide, 10000);
}

// Mixed words: four different codes, each byte with its own column exponent, random rows.
TEST(TransposeWord, FastRescaleMixedWordsRandom) {
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> code_d(0, 255), exp_d(-127, 127), small_d(0, 20);
  int fast = 0;
  for (int it = 0; it < 300000; ++it) {
    const int tbase = exp_d(rng);
    const int t_m = std::max(-127, tbase - small_d(rng) * (it % 3 == 0 ? 6 : 1));
    int tc[4];
    uint32_t x = 0;
    for (int c = 0; c < 4; ++c) {
      uint32_t code = uint32_t(code_d(rng));
      tc[c] = std::max(-127, tbase - small_d(rng));
      // Keep the precondition: t_m - tc <= -scale_exponent(code).
      while (is_value(uint8_t(code)) && t_m - tc[c] > -tw::e4m3_mag_scale_exponent(code & 0x7F))
        code = (code & 0x80) | ((code & 0x7F) >> 1);
      x |= code << (8 * c);
    }
    uint32_t mn = tw::kRescaleMinInit;
    const uint32_t y =
        tw::rescale_word(x, tw::row_word(t_m - tbase), tw::col_word(tbase, tc[0], tc[2]),
                         tw::col_word(tbase, tc[1], tc[3]), mn);
    const tw::RescaledWord ex = tw::rescale_word_exact(x, t_m, tc[0], tc[1], tc[2], tc[3]);
    uint32_t want = 0;
    for (int c = 0; c < 4; ++c)
      want |= uint32_t(fmt::e4m3_mul_pow2(uint8_t(x >> (8 * c)), t_m - tc[c])) << (8 * c);
    ASSERT_EQ(ex.y, want);
    if (tw::normal_bits(x) == 0x80808080u && tw::rescale_ok(mn)) {
      ASSERT_EQ(y, want) << std::hex << "x 0x" << x;
      ASSERT_EQ(ex.changed, 0u);
      ++fast;
    }
  }
  EXPECT_GT(fast, 10000);
}

// Keys: for every normal code and row exponent, the fast key and the exact key give the same
// column exponent, t_m + scale_exponent(code) (floored at -127); subnormal codes by the exact key.
TEST(TransposeWord, KeysGiveColumnExponentExhaustive) {
  for (int tbase : {-127, -50, 0, 1, 90, 127}) {
    for (int t_m = -127; t_m <= tbase; ++t_m) {
      const uint32_t p = tw::row_word(t_m - tbase);
      for (uint32_t mag = 1; mag < 0x7F; ++mag) {
        const int want = std::max(-127, t_m + fmt::scale_exponent(fmt::e4m3_to_f32(uint8_t(mag))));
        const uint32_t ke = tw::key_exact(mag, p);
        ASSERT_EQ(tw::column_exponent(ke, tbase), want) << "mag " << mag << " t " << t_m;
        if (mag >= 8) {
          uint32_t klo = 0, khi = 0;
          tw::key_word(mag * 0x01010101u, p, klo, khi);
          ASSERT_EQ(tw::column_exponent(klo & 0xFFFF, tbase), want);
          ASSERT_EQ(tw::column_exponent(khi >> 16, tbase), want);
        }
      }
    }
    EXPECT_EQ(tw::column_exponent(0, tbase), -127);  // a column without values
  }
}

TEST(TransposeWord, ExactKeysSkipZeroAndNaNAndPlaceLanes) {
  const uint32_t p = tw::row_word(0);
  // byte 0 = 0x00, byte 1 = NaN, byte 2 = 0x38 (1.0), byte 3 = 0x01 (subnormal)
  const tw::KeyPair k = tw::key_word_exact(0x01387F00u, p, tw::KeyPair{0, 0});
  EXPECT_EQ(k.lo & 0xFFFF, 0u);
  EXPECT_EQ(k.hi & 0xFFFF, 0u);
  EXPECT_EQ(k.lo >> 16, tw::key_exact(0x38, p));
  EXPECT_EQ(k.hi >> 16, tw::key_exact(0x01, p));
}

// Shared-memory access patterns of the kernel are bank-conflict free: the 16-byte chunk writes
// (8 threads per row, one row per quarter warp), the 32-bit column reads (one per token row per
// thread: 32 lanes, 32 banks) and the 16-byte row-word reads (8 token blocks per warp).
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
  for (int g = 0; g < 4; ++g) {  // row words: 8 distinct addresses (j), 4 banks each
    uint32_t banks = 0;
    for (int j = 0; j < 8; ++j) {
      const int word = tw::row_slot(16 * j) + 4 * g;
      ASSERT_EQ(word % 4, 0);
      ASSERT_LT(word, tw::kRowSlots);
      banks |= 0xFu << (word % 32);
    }
    EXPECT_EQ(banks, 0xFFFFFFFFu) << "row words, group " << g;
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

// ---------------------------------------------------------------------------------------------
// CPU emulation of sm90_transpose_scaled_e4m3_1x128_kernel.

struct EmulationStats {
  int64_t groups = 0, wide_groups = 0, exact_groups = 0, exact_key_warps = 0, warps = 0;
};

// One (token tile, channel block) CTA of the kernel, thread by thread; `count` also picks the
// kernel instance (with or without the underflow count).
void emulate_kernel(const ScaledTensor& in, const ScaledTensor& out_t, TransposeScalePolicy policy,
                    int64_t* count, EmulationStats* stats) {
  const bool tight = policy == TransposeScalePolicy::ColumnTight;
  const auto M = static_cast<int32_t>(in.data.rows), K = static_cast<int32_t>(in.data.cols);
  const auto* x_in = static_cast<const uint8_t*>(in.data.data);
  const auto* s_in = static_cast<const float*>(in.scale.data);
  auto* y_out = static_cast<uint8_t*>(out_t.data.data);
  auto* s_out = static_cast<float*>(out_t.scale.data);
  const detail::GroupTiles groups = detail::make_group_tiles(out_t.col_groups, M);
  int64_t changed_total = 0;
  std::vector<uint32_t> s_tile(128 * 32);
  std::vector<tw::Words4> s_row_storage(tw::kRowSlots / 4);
  auto* s_row = reinterpret_cast<uint32_t*>(s_row_storage.data());
  for (int tile = 0; tile < groups.total_tiles; ++tile) {
    for (int kb = 0; kb < K / 128; ++kb) {
      const int k0 = kb * 128;
      int32_t m0, w;
      groups.tile_cols(tile, m0, w);
      for (int q = 0; q < 1024; ++q) {
        const int r = q >> 3, c = q & 7;
        uint8_t chunk[16] = {};
        if (r < w) std::memcpy(chunk, x_in + int64_t(m0 + r) * K + k0 + 16 * c, 16);
        std::memcpy(&s_tile[tw::tile_chunk_word(r, c)], chunk, 16);
      }
      int t[128], tmax = tw::kExpMin - 1;
      for (int m = 0; m < 128; ++m) {
        t[m] = m < w ? tw::row_exponent(s_in[int64_t(kb) * M + m0 + m]) : tw::kExpMin - 1;
        tmax = std::max(tmax, t[m]);
      }
      const int tbase = std::max(tw::kExpMin, tmax);
      for (int m = 0; m < 128; ++m)
        s_row[tw::row_slot(m)] = tw::row_word(m < w ? t[m] - tbase : -254);

      uint32_t x[256][16], klo[256] = {}, khi[256] = {};
      int tcol[256][4];
      uint32_t blo[256] = {}, bhi[256] = {};
      auto prow_of = [&](int tid) {
        return reinterpret_cast<const tw::Words4*>(s_row + tw::row_slot(16 * (tid & 7)));
      };
      // The 8 lanes j sharing channels are tid & ~7 .. tid | 7 (the xor-shuffle max).
      auto reduce_and_decode = [&]() {
        for (int tid = 0; tid < 256; ++tid) {
          uint32_t rlo = 0, rhi = 0;
          for (int jj = 0; jj < 8; ++jj) {
            rlo = tw::max_u16x2(rlo, klo[(tid & ~7) | jj]);
            rhi = tw::max_u16x2(rhi, khi[(tid & ~7) | jj]);
          }
          tw::thread_column_exponents(rlo, rhi, tbase, tcol[tid], blo[tid], bhi[tid]);
        }
      };
      for (int tid = 0; tid < 256; ++tid) {
        const int lane = tid & 31, warp = tid >> 5, j = lane & 7, wd = (lane >> 3) + 4 * warp;
        for (int i = 0; i < 16; ++i) x[tid][i] = s_tile[tw::tile_thread_word(j, wd, i)];
        for (int c = 0; c < 4; ++c) tcol[tid][c] = tbase;
        if (tight) tw::thread_keys(x[tid], prow_of(tid), klo[tid], khi[tid]);
      }
      if (tight) {
        reduce_and_decode();
        for (int warp = 0; warp < 8; ++warp) {  // __any_sync over the warp
          bool any = false;
          for (int tid = 32 * warp; tid < 32 * warp + 32; ++tid)
            any |= !tw::column_keys_trusted(tcol[tid], tbase);
          ++stats->warps;
          if (!any) continue;
          ++stats->exact_key_warps;
          for (int tid = 32 * warp; tid < 32 * warp + 32; ++tid) {
            klo[tid] = khi[tid] = 0;
            tw::thread_keys_exact(x[tid], prow_of(tid), klo[tid], khi[tid]);
          }
        }
        reduce_and_decode();  // exact keys give the same exponents where they were trusted
      }
      for (int tid = 0; tid < 256; ++tid) {
        const int lane = tid & 31, warp = tid >> 5, j = lane & 7, wd = (lane >> 3) + 4 * warp;
        tw::RescalePaths paths;
        const uint32_t changed =
            count ? tw::thread_rescale<true>(x[tid], prow_of(tid), tbase, tcol[tid], blo[tid],
                                             bhi[tid], &paths)
                  : tw::thread_rescale<false>(x[tid], prow_of(tid), tbase, tcol[tid], blo[tid],
                                              bhi[tid], &paths);
        stats->groups += 4;
        stats->wide_groups += paths.wide;
        stats->exact_groups += paths.exact;
        changed_total += changed;
        if (j < 4) s_out[int64_t(tile) * K + k0 + 4 * wd + j] = fmt::exp2i(tcol[tid][j]);
        uint32_t z[4][4];
        tw::thread_transpose(x[tid], z);
        for (int c = 0; c < 4; ++c)
          for (int i = 0; i < 16; ++i)
            if (16 * j + i < w)
              y_out[int64_t(k0 + 4 * wd + c) * M + m0 + 16 * j + i] =
                  uint8_t(z[c][i / 4] >> (8 * (i % 4)));
      }
    }
  }
  if (count) *count = changed_total;
}

TEST(TransposeWord, KernelEmulationEqualsReference) {
  const TransposeCase cases[] = {
      {128, 128, {}},
      {300, 256, {}},
      {1000, 1280, {}},
      {1, 128, {}},
      {600, 384, {0, 128, 5, 300, 0, 77, 90}},
      {257, 128, {1, 256}},
      {130, 256, {17, 0, 113}},
  };
  for (const auto& cs : cases) {
    for (Fill fill : {Fill::Normal, Fill::WideRange, Fill::Adversarial, Fill::Zeros}) {
      const RowwiseFp8 in = make_rowwise(cs.M, cs.K, fill, 11 + cs.M);
      for (auto policy : {TransposeScalePolicy::TileMax, TransposeScalePolicy::ColumnTight}) {
        SCOPED_TRACE(cs.name() + " " + fill_name(fill) + " " + policy_name(policy));
        ColwiseFp8 want(cs.M, cs.K, cs.groups), got(cs.M, cs.K, cs.groups);
        int64_t n_want = -1, n_got = -2;
        ref::transpose_scaled(in.view(), want.view(), policy, &n_want);
        EmulationStats st;
        emulate_kernel(in.view(), got.view(), policy, &n_got, &st);
        ColwiseFp8 got_nc(cs.M, cs.K, cs.groups);  // the instance without the count
        EmulationStats st_nc;
        emulate_kernel(in.view(), got_nc.view(), policy, nullptr, &st_nc);
        EXPECT_TRUE(bytes_equal(got_nc.data, want.data));
        EXPECT_TRUE(bytes_equal(got_nc.scale, want.scale));
        if (cs.M >= 1000)
          std::printf(
              "[kernel paths] %s %s %s: %lld groups of 4x4 codes: wide SIMD %.2f%%, exact %.2f%%; "
              "warps redoing keys exactly %lld of %lld\n",
              cs.name().c_str(), fill_name(fill), policy_name(policy), (long long)st.groups,
              100.0 * st.wide_groups / st.groups, 100.0 * st.exact_groups / st.groups,
              (long long)st.exact_key_warps, (long long)st.warps);
        EXPECT_TRUE(bytes_equal(got.data, want.data));
        EXPECT_TRUE(bytes_equal(got.scale, want.scale));
        EXPECT_EQ(n_got, n_want);
      }
    }
  }
}

}  // namespace
}  // namespace fp8flow::test
