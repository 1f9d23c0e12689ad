// Emulated sm90 MXFP4 kernels (CPU threads, fake_cuda/) vs fp8flow::ref, bit for bit. Run with
// tests/mxfp4/cpu_emulation/run.sh; see there for what it does and does not check.
#include <gtest/gtest.h>

#include <cstdlib>

#include "common/test_util.h"
#include "mxfp4/mxfp4_test_util.h"
#include "ops/mxfp4/mxfp4_backends.h"

using namespace fp8flow;
using namespace fp8flow::test;

namespace {

const Fill kFillsEmu[] = {Fill::Normal, Fill::WideRange, Fill::Adversarial, Fill::Zeros};

void same(const HostScaled& a, const HostScaled& b, const std::string& what) {
  ASSERT_TRUE(bytes_equal(a.data, b.data)) << what << ": data";
  ASSERT_TRUE(bytes_equal(a.scale, b.scale)) << what << ": scale";
}

}  // namespace

TEST(Emu, QuantizeMxfp4) {
  uint64_t seed = 1;
  for (auto [M, K] : std::vector<std::pair<int64_t, int64_t>>{{1, 32}, {7, 96}, {300, 2048}})
    for (Fill f : kFillsEmu)
      for (DType d : {DType::BF16, DType::F32}) {
        const std::string what = "quantize_mxfp4 " + std::to_string(M) + "x" + std::to_string(K) +
                                 " fill " + std::to_string(int(f)) + " " + to_string(d);
        const HostTensor x = host_from_values(make_values(M, K, f, seed++), d, M, K);
        HostScaled want = alloc_mx(M, K), got = alloc_mx(M, K);
        ref::quantize_mxfp4(x.v, want.st());
        sm90::quantize_mxfp4(x.v, got.st(), nullptr);
        same(want, got, what);
      }
}

TEST(Emu, Fp8ToMxfp4AndBack) {
  uint64_t seed = 100;
  for (auto [M, K] : std::vector<std::pair<int64_t, int64_t>>{{1, 128}, {5, 384}, {300, 2048}}) {
    std::vector<std::pair<std::string, HostScaled>> ins;
    for (Fill f : kFillsEmu)
      ins.emplace_back("values fill " + std::to_string(int(f)),
                       fp8_from_values(make_values(M, K, f, seed++), M, K));
    ins.emplace_back("raw e4m3, NaN codes", fp8_random(M, K, seed++, -140, 125, true));
    for (auto& [name, in] : ins)
      for (const Mxfp4Rounding& rounding : {Mxfp4Rounding{}, Mxfp4Rounding{true, seed * 77}}) {
        HostScaled want = alloc_mx(M, K), got = alloc_mx(M, K);
        ref::fp8_to_mxfp4(in.st(), want.st(), rounding);
        sm90::fp8_to_mxfp4(in.st(), got.st(), rounding, nullptr);
        same(want, got, "fp8_to_mxfp4 " + name + (rounding.stochastic ? " stochastic" : ""));
      }
    for (const HostScaled& in : {mx_random(M, K, seed++, 0, 254, 0.05, 0.05),
                                 mx_random(M, K, seed++, 60, 252, 0.1, 0.03)}) {
      HostScaled want = alloc_fp8(M, K), got = alloc_fp8(M, K);
      ref::mxfp4_to_fp8(in.st(), want.st());
      sm90::mxfp4_to_fp8(in.st(), got.st(), nullptr);
      same(want, got, "mxfp4_to_fp8 " + std::to_string(M) + "x" + std::to_string(K));
    }
  }
}

// Every transposed case with the kernel FP8FLOW_MX_TR_VARIANT selects (run.sh runs this test once
// per variant).
TEST(Emu, Mxfp4ToFp8Transposed) {
  const char* env = std::getenv("FP8FLOW_MX_TR_VARIANT");
  const std::string vname = std::string("variant ") + (env ? env : "0") + ": ";
  const std::vector<TransposedCase> cases = transposed_cases(/*emu_only=*/true);
  uint64_t seed = 200;
  for (const TransposedCase& c : cases) {
    std::vector<std::pair<std::string, HostScaled>> ins;
    for (Fill f : kFillsEmu)
      ins.emplace_back("values fill " + std::to_string(int(f)),
                       mx_from_values(make_values(c.M, c.K, f, seed++), c.M, c.K));
    ins.emplace_back("raw, X >= 126 present", mx_random(c.M, c.K, seed++, 0, 254, 0.05, 0.05));
    ins.emplace_back("raw, exact tiles", mx_random(c.M, c.K, seed++, 60, 252, 0.1, 0.03));
    // The gap-key path (variants 0 and 2) and its edges: span 123 (taken), 124 (not where
    // both ends meet in a tile), tiny-value blocks with bytes <= 6 (ignored by its test) or up
    // to 7.
    ins.emplace_back("raw, span 123", mx_random_gap(c.M, c.K, seed++, 129, 252, 0.0, 0));
    ins.emplace_back("raw, span 124", mx_random_gap(c.M, c.K, seed++, 128, 252, 0.0, 0));
    ins.emplace_back("raw, narrow + tiny", mx_random_gap(c.M, c.K, seed++, 110, 140, 0.2, 6, 0.3));
    ins.emplace_back("raw, wide + tiny 7", mx_random_gap(c.M, c.K, seed++, 130, 252, 0.2, 7));
    // The integer path (variant 0, the default): spreads 11 and 12, sparse small codes, half zeros.
    ins.emplace_back("raw, spread 11", mx_random_gap(c.M, c.K, seed++, 120, 131, 0.0, 0, 0.02));
    ins.emplace_back("raw, spread 12", mx_random_gap(c.M, c.K, seed++, 120, 132, 0.0, 0, 0.02));
    ins.emplace_back("raw, sparse small", mx_random_sparse(c.M, c.K, seed++, 100, 114, 0.03, 2));
    ins.emplace_back("raw, half zeros", mx_random_sparse(c.M, c.K, seed++, 100, 108, 0.5, 7));
    for (auto& [name, in] : ins) {
      HostScaled want = alloc_fp8(c.K, c.M, c.groups), got = alloc_fp8(c.K, c.M, c.groups);
      ref::mxfp4_to_fp8_transposed(in.st(), want.st());
      sm90::mxfp4_to_fp8_transposed(in.st(), got.st(), nullptr);
      same(want, got,
           vname + "transposed " + std::to_string(c.M) + "x" + std::to_string(c.K) + " groups " +
               std::to_string(c.groups.size()) + " " + name);
    }
  }
}
