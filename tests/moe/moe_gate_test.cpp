// The MoE layer's internal gate GEMMs and non-finite counter (src/moe/moe_backends.h): CUDA ==
// CPU reference bit for bit, at every tile variant the launcher picks on an H100 (132 SMs), token
// counts that are no multiple of any tile, E = 4, 32, 256 and H = 128, 7168; inputs whose
// summation order shows in the bits (wide-range values; tiny values whose products underflow to
// signed zeros, so an extra or a missing term flips the sign of a zero). The router's expert
// selection depends on these bits. GPU tests skip without a device; the CPU tests check the
// reference's own contract (sequential order from +0, signed zeros, counter semantics). Also the
// stacked weight transpose MoELayer::refresh_weights uses.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <tuple>
#include <vector>

#include "common/test_util.h"
#include "moe/gate_values.h"
#include "moe/moe_backends.h"
#include "ops/gemm/gemm_backends.h"

namespace fp8flow::test {
namespace {

using Kind = GateFill;

struct GateInputs {
  HostTensor x, wg, dl, dx_exp;
};

GateInputs gate_inputs(int64_t T, int64_t H, int64_t E, Kind k) {
  GateInputs g;
  g.x = host_from_values(gate_values(T * H, k, 1 + T), DType::BF16, T, H);
  g.wg = host_from_values(gate_values(E * H, k, 2 + E, 0.05f), DType::F32, E, H);
  g.dl = host_from_values(gate_values(T * E, k, 3 + H), DType::F32, T, E);
  g.dx_exp = host_from_values(gate_values(T * H, Kind::Normal, 4), DType::F32, T, H);
  return g;
}

uint32_t f32_bits_at(const HostTensor& t, int64_t i) {
  uint32_t b;
  std::memcpy(&b, t.buf.data() + 4 * i, 4);
  return b;
}

// ---------------------------------------------------------------------------------------------
// CPU: the reference is the sequential chain from +0 it claims to be.
TEST(MoEGateRef, SequentialChainsAndSignedZeros) {
  const int64_t T = 3, H = 128, E = 4;
  for (Kind k : {Kind::Wide, Kind::Tiny}) {
    const GateInputs g = gate_inputs(T, H, E, k);
    HostTensor logits(DType::F32, T, E), dx(DType::BF16, T, H), dw(DType::F32, E, H);
    ref::moe_gate_logits(g.x.v, g.wg.v, logits.v);
    ref::moe_gate_backward(g.dl.v, g.wg.v, g.x.v, g.dx_exp.v, dx.v, dw.v);
    const auto* xp = g.x.buf.data();
    auto xval = [&](int64_t t, int64_t h) {
      uint16_t b;
      std::memcpy(&b, xp + 2 * (t * H + h), 2);
      return fmt::bf16_to_f32(b);
    };
    const float* w = reinterpret_cast<const float*>(g.wg.buf.data());
    const float* d = reinterpret_cast<const float*>(g.dl.buf.data());
    for (int64_t t = 0; t < T; ++t)
      for (int64_t e = 0; e < E; ++e) {
        float acc = 0.0f;
        for (int64_t h = 0; h < H; ++h) acc = std::fma(xval(t, h), w[e * H + h], acc);
        uint32_t want;
        std::memcpy(&want, &acc, 4);
        EXPECT_EQ(f32_bits_at(logits, t * E + e), want);
      }
    int neg_zero = 0;
    for (int64_t e = 0; e < E; ++e)
      for (int64_t h = 0; h < H; ++h) {
        float acc = 0.0f;
        for (int64_t t = 0; t < T; ++t) acc = std::fma(d[t * E + e], xval(t, h), acc);
        uint32_t want;
        std::memcpy(&want, &acc, 4);
        EXPECT_EQ(f32_bits_at(dw, e * H + h), want);
        neg_zero += want == 0x80000000u;
      }
    if (k == Kind::Tiny) EXPECT_GT(neg_zero, 0);  // the signed-zero case is exercised
  }
}

TEST(MoEGateRef, CountNonFiniteAddsToTheCounter) {
  std::vector<float> v(35, 1.0f);
  v[3] = std::nanf("");
  v[34] = -INFINITY;
  v[10] = 3.0e38f;  // finite in F32 and BF16
  for (DType d : {DType::F32, DType::BF16}) {
    const HostTensor t = host_from_values(v, d, 5, 7);
    int64_t n = 7;
    ref::moe_count_nonfinite(t.v, &n);
    EXPECT_EQ(n, 9) << to_string(d);
  }
}

#if FP8FLOW_WITH_CUDA
// ---------------------------------------------------------------------------------------------
// GPU == CPU, bit for bit. With 132 SMs the launcher picks: logits TM = 2 for all but (16900, E
// 32: TM 4) and (8500, E 256: TM 8); dW TM=2,TN=4 except E 256 with H 7168 (TM=4,TN=8). Every T
// below leaves a partial tile (logits 32/64/128 tokens, dx 64, dW chunks of 32).
struct GateCase {
  int64_t T, H, E;
};

void gate_gpu_vs_cpu(const GateCase& c, Kind k) {
  SCOPED_TRACE(::testing::Message()
               << "T " << c.T << " H " << c.H << " E " << c.E << " kind " << static_cast<int>(k));
  const GateInputs g = gate_inputs(c.T, c.H, c.E, k);
  HostTensor l_ref(DType::F32, c.T, c.E), dx_ref(DType::BF16, c.T, c.H),
      dw_ref(DType::F32, c.E, c.H);
  ref::moe_gate_logits(g.x.v, g.wg.v, l_ref.v);
  ref::moe_gate_backward(g.dl.v, g.wg.v, g.x.v, g.dx_exp.v, dx_ref.v, dw_ref.v);
  DeviceTensor x(g.x), wg(g.wg), dl(g.dl), dxe(g.dx_exp);
  DeviceTensor l(DType::F32, c.T, c.E), dx(DType::BF16, c.T, c.H), dw(DType::F32, c.E, c.H);
  sm90::moe_gate_logits(x.v, wg.v, l.v, nullptr);
  sm90::moe_gate_backward(dl.v, wg.v, x.v, dxe.v, dx.v, dw.v, nullptr);
  EXPECT_TRUE(bytes_equal(l.to_host(), l_ref)) << "logits";
  EXPECT_TRUE(bytes_equal(dx.to_host(), dx_ref)) << "dx";
  EXPECT_TRUE(bytes_equal(dw.to_host(), dw_ref)) << "dW";
}

TEST(MoEGateGpu, BitExactVsReference) {
  FP8FLOW_REQUIRE_GPU();
  const GateCase cases[] = {{1, 128, 4},      {77, 128, 4},    {77, 128, 32},   {77, 128, 256},
                            {77, 7168, 4},    {77, 7168, 32},  {77, 7168, 256}, {300, 7168, 32},
                            {16900, 128, 32}, {8500, 128, 256}};
  // The CPU reference costs ~3 ns per fma: the big-T cases (tile variants) run the wide-range
  // inputs only, the big-H*E ones skip the normal inputs.
  for (const GateCase& c : cases)
    for (Kind k : {Kind::Normal, Kind::Wide, Kind::Tiny}) {
      const int64_t fmas = c.T * c.H * c.E;
      if (c.T > 8000 && k != Kind::Wide) continue;
      if (fmas > 50'000'000 && k == Kind::Normal) continue;
      gate_gpu_vs_cpu(c, k);
    }
}

// The counter: F32 and BF16, sizes with a tail (numel % 16 bytes), a tensor large enough for the
// grid-stride loop, counts added to the existing value.
TEST(MoEGateGpu, NonFiniteCountMatchesReference) {
  FP8FLOW_REQUIRE_GPU();
  for (DType d : {DType::F32, DType::BF16})
    for (auto [r, c] : {std::pair<int64_t, int64_t>{5, 7}, {1, 3}, {2048, 1531}, {64, 128}}) {
      SCOPED_TRACE(::testing::Message() << to_string(d) << " " << r << "x" << c);
      std::vector<float> v = gate_values(r * c, Kind::Normal, 9);
      std::mt19937_64 rng(static_cast<uint64_t>(r * c));
      const float bad[] = {std::nanf(""), -std::nanf(""), INFINITY, -INFINITY};
      for (int i = 0; i < 100; ++i) v[rng() % v.size()] = bad[i % 4];
      v.back() = INFINITY;
      const HostTensor h = host_from_values(v, d, r, c);
      int64_t want = 5;
      ref::moe_count_nonfinite(h.v, &want);
      DeviceTensor t(h);
      const HostTensor init = host_from_values({0.f, 0.f}, DType::F32, 1, 2);  // 8 zero bytes
      DeviceTensor cnt(init);
      int64_t five = 5;
      ASSERT_EQ(cudaMemcpy(cnt.p, &five, sizeof five, cudaMemcpyHostToDevice), cudaSuccess);
      sm90::moe_count_nonfinite(t.v, static_cast<int64_t*>(cnt.p), nullptr);
      int64_t got = 0;
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      ASSERT_EQ(cudaMemcpy(&got, cnt.p, sizeof got, cudaMemcpyDeviceToHost), cudaSuccess);
      EXPECT_EQ(got, want);
      EXPECT_GT(want, 5);
    }
}

// MoELayer::refresh_weights makes every expert's W_e^T with ONE stacked launch per matrix
// (sm90::transpose_block_weights_batched): bit-identical to the per-expert public op, codes and
// scales, including partial 128-blocks along K.
TEST(MoEWeightsGpu, BatchedBlockTransposeMatchesPerExpert) {
  FP8FLOW_REQUIRE_GPU();
  for (auto [B, N, K] :
       {std::tuple<int64_t, int64_t, int64_t>{3, 256, 400}, {1, 128, 16}, {32, 128, 256}}) {
    SCOPED_TRACE(::testing::Message() << B << " x " << N << " x " << K);
    const int64_t nb = N / 128, kb = (K + 127) / 128;
    HostTensor codes(DType::E4M3, B * N, K), sc(DType::F32, B * nb, kb);
    std::mt19937_64 rng(static_cast<uint64_t>(B * N * K));
    for (auto& b : codes.buf) b = static_cast<uint8_t>(rng());
    for (int64_t i = 0; i < B * nb * kb; ++i)
      sc.ptr<float>()[i] = std::ldexp(1.f, static_cast<int>(rng() % 200) - 100);
    DeviceTensor w(codes), ws(sc);
    DeviceTensor t1(DType::E4M3, B * K, N), s1(DType::F32, B * kb, nb);
    DeviceTensor t2(DType::E4M3, B * K, N), s2(DType::F32, B * kb, nb);
    sm90::transpose_block_weights_batched(ScaledTensor{w.v, ws.v, ScaleLayout::Block128x128, {}},
                                          ScaledTensor{t1.v, s1.v, ScaleLayout::Block128x128, {}},
                                          B, nullptr);
    for (int64_t b = 0; b < B; ++b) {
      auto slice = [&](const DeviceTensor& d, int64_t rows, int64_t cols) {
        TensorView v = d.v;
        v.data = static_cast<uint8_t*>(d.p) + b * rows * cols * dtype_bits(d.v.dtype) / 8;
        v.rows = rows;
        v.cols = cols;
        return v;
      };
      transpose_block_weights(
          ScaledTensor{slice(w, N, K), slice(ws, nb, kb), ScaleLayout::Block128x128, {}},
          ScaledTensor{slice(t2, K, N), slice(s2, kb, nb), ScaleLayout::Block128x128, {}});
    }
    EXPECT_TRUE(bytes_equal(t1.to_host(), t2.to_host()));
    EXPECT_TRUE(bytes_equal(s1.to_host(), s2.to_host()));
  }
}
#endif

}  // namespace
}  // namespace fp8flow::test
