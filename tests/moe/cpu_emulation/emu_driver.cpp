// Emulated sm90 MoE helpers (CPU threads, fake_cuda/) vs fp8flow::ref, bit for bit. Run with
// tests/moe/cpu_emulation/run.sh; see there for what it does and does not check.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "common/test_util.h"
#include "moe/gate_values.h"
#include "moe/moe_backends.h"
// Last: the fake runtime (emu::sm_count); its macros must not touch the headers above.
#include <cuda_runtime.h>

using namespace fp8flow;
using namespace fp8flow::test;

namespace {

using Kind = GateFill;

struct Case {
  int64_t T, H, E;
  int sms;  // fake SM count: picks the tile variant
};

const char* kind_name(Kind k) {
  return k == Kind::Normal ? "normal" : k == Kind::Wide ? "wide" : "tiny";
}

void check_gate(const Case& c, Kind k) {
  SCOPED_TRACE(::testing::Message() << "T " << c.T << " H " << c.H << " E " << c.E << " sms "
                                    << c.sms << " " << kind_name(k));
  emu::sm_count = c.sms;
  const HostTensor x = host_from_values(gate_values(c.T * c.H, k, 1 + c.T), DType::BF16, c.T, c.H);
  const HostTensor wg =
      host_from_values(gate_values(c.E * c.H, k, 2 + c.E, 0.05f), DType::F32, c.E, c.H);
  const HostTensor dl = host_from_values(gate_values(c.T * c.E, k, 3 + c.H), DType::F32, c.T, c.E);
  const HostTensor dxe =
      host_from_values(gate_values(c.T * c.H, Kind::Normal, 4), DType::F32, c.T, c.H);
  HostTensor l1(DType::F32, c.T, c.E, 0x5A), l2(DType::F32, c.T, c.E, 0xA5);
  ref::moe_gate_logits(x.v, wg.v, l1.v);
  sm90::moe_gate_logits(x.v, wg.v, l2.v, nullptr);
  EXPECT_TRUE(bytes_equal(l1, l2)) << "logits";
  HostTensor dx1(DType::BF16, c.T, c.H, 0x5A), dx2(DType::BF16, c.T, c.H, 0xA5);
  HostTensor dw1(DType::F32, c.E, c.H, 0x5A), dw2(DType::F32, c.E, c.H, 0xA5);
  ref::moe_gate_backward(dl.v, wg.v, x.v, dxe.v, dx1.v, dw1.v);
  sm90::moe_gate_backward(dl.v, wg.v, x.v, dxe.v, dx2.v, dw2.v, nullptr);
  EXPECT_TRUE(bytes_equal(dx1, dx2)) << "dx";
  EXPECT_TRUE(bytes_equal(dw1, dw2)) << "dW";
  if (k == Kind::Tiny) {  // the case is only meaningful with signed zeros of both signs
    int neg = 0, pos = 0;
    for (int64_t i = 0; i < c.E * c.H; ++i) {
      const uint32_t b = reinterpret_cast<const uint32_t*>(dw1.buf.data())[i];
      neg += b == 0x80000000u;
      pos += b == 0;
    }
    EXPECT_GT(neg, 0);
    EXPECT_GT(pos, 0);
  }
}

}  // namespace

TEST(MoeEmu, GateGemms) {
  // sms 132: the variants the GPU takes at these sizes (small tiles); sms 1: the big tiles.
  const std::vector<Case> cases = {
      {1, 128, 4, 132},    {37, 128, 32, 132}, {77, 256, 36, 132}, {33, 128, 256, 132},
      {100, 384, 32, 132}, {50, 128, 256, 1},  {70, 256, 64, 1},   {130, 256, 4, 1},
      {600, 128, 4, 1},    {31, 256, 4, 1},    {65, 128, 40, 1},   {37, 7168, 32, 132},
  };
  for (const Case& c : cases)
    for (Kind k : {Kind::Normal, Kind::Wide, Kind::Tiny}) check_gate(c, k);
}

TEST(MoeEmu, NonFiniteCount) {
  for (int sms : {132, 1})
    for (DType d : {DType::F32, DType::BF16})
      for (auto [r, c] : {std::pair<int64_t, int64_t>{5, 7}, {1000, 129}, {1, 3}, {64, 128}}) {
        SCOPED_TRACE(::testing::Message()
                     << to_string(d) << " " << r << "x" << c << " sms " << sms);
        emu::sm_count = sms;
        std::vector<float> v = gate_values(r * c, Kind::Normal, 9);
        std::mt19937_64 rng(r * c);
        const float bad[] = {std::nanf(""), -std::nanf(""), INFINITY, -INFINITY};
        for (int i = 0; i < 60; ++i) v[rng() % v.size()] = bad[i % 4];
        v.back() = INFINITY;  // the tail (numel % 16 bytes) too
        const HostTensor t = host_from_values(v, d, r, c);
        int64_t n1 = 5, n2 = 5;  // counts add to what is there
        ref::moe_count_nonfinite(t.v, &n1);
        sm90::moe_count_nonfinite(t.v, &n2, nullptr);
        EXPECT_EQ(n1, n2);
        EXPECT_GT(n1, 5);
      }
}

TEST(MoeEmu, ToBf16) {
  emu::sm_count = 132;
  std::vector<float> v = gate_values(3 * 1001, Kind::Wide, 11);
  v[7] = std::nanf("");
  v[8] = -INFINITY;
  const HostTensor in = host_from_values(v, DType::F32, 3, 1001);
  HostTensor a(DType::BF16, 3, 1001, 0x5A), b(DType::BF16, 3, 1001, 0xA5);
  ref::moe_to_bf16(in.v, a.v);
  sm90::moe_to_bf16(in.v, b.v, nullptr);
  EXPECT_TRUE(bytes_equal(a, b));
}
