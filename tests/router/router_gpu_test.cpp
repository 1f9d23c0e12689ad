// Router CUDA backend == CPU reference, bit for bit: topk_idx, weights, counts, per-sequence
// counts, scores, aux loss and d logits, over every row geometry (E from 4 to 256), both score
// kinds, group sizes 2..128, aux-loss sequence lengths that do and do not fill the kernels' runs
// and chunks, random / tied / adversarial (NaN, Inf, huge) logits, and the DeepSeek-V3 shape at T =
// 65536. Skips (with the reason printed) where no GPU is visible.
#include <gtest/gtest.h>

#include "router/router_testing.h"

#if FP8FLOW_WITH_CUDA
#include <cuda_runtime_api.h>

#include "ops/router/router_backends.h"  // sm90::router_set_forward_variant
#endif

namespace fp8flow::test {
namespace {

using namespace router_testing;

#if FP8FLOW_WITH_CUDA

struct DevOut {
  DeviceTensor idx, w, counts, scores, seq_counts, loss;
  DevOut(int64_t T, int64_t E, const RouterConfig& cfg)
      : idx(DType::I32, T, cfg.top_k),
        w(DType::F32, T, cfg.top_k),
        counts(DType::I32, 1, E),
        scores(DType::F32, T, E),
        seq_counts(DType::I32, cfg.aux_enabled() ? T / cfg.seq_len : 0, E),
        loss(DType::F32, 1, 1) {}
  RouterOutputs views(const RouterConfig& cfg) const {
    RouterOutputs o;
    o.topk_idx = idx.v;
    o.topk_weight = w.v;
    o.tokens_per_expert = counts.v;
    o.scores = scores.v;
    if (cfg.aux_enabled()) {
      o.seq_counts = seq_counts.v;
      o.aux_loss = loss.v;
    }
    return o;
  }
};

DeviceTensor workspace_for(int64_t T, int64_t E, const RouterConfig& cfg) {
  const size_t bytes = router_workspace_bytes(T, E, cfg);
  return DeviceTensor(DType::I32, 1, static_cast<int64_t>((bytes + 3) / 4));
}

struct Inputs {
  std::vector<float> x, bias, dw;
};

Inputs make_inputs(int64_t T, int64_t E, int k, Fill fill, int levels, uint64_t seed) {
  Inputs in;
  in.x = fill == Fill::Normal ? random_logits(T, E, seed, 2.0f, levels)
                              : make_values(T, E, fill, seed);
  in.bias = random_bias(E, seed + 1, levels ? 0.0f : 0.05f);
  in.dw = random_logits(T, k, seed + 2, 1.0f);
  return in;
}

// Forward + backward on both backends; every output compared byte for byte.
void expect_gpu_matches_cpu(int64_t T, int64_t E, const RouterConfig& cfg, bool use_bias,
                            const Inputs& in, const std::string& label) {
  SCOPED_TRACE(label);
  const bool aux = cfg.aux_enabled();
  // CPU.
  HostOut ref = run_forward_cpu(in.x, T, E, use_bias ? &in.bias : nullptr, cfg);
  const float d_aux = 0.625f;
  const auto ref_dx = run_backward_cpu(in.x, T, E, ref, in.dw, aux ? &d_aux : nullptr, cfg);

  // GPU.
  HostTensor hx = host_from_values(in.x, DType::F32, T, E);
  HostTensor hb = host_from_values(in.bias, DType::F32, 1, E);
  DeviceTensor x(hx), b(hb);
  DevOut out(T, E, cfg);
  DeviceTensor ws = workspace_for(T, E, cfg);
  router_forward(x.v, use_bias ? b.v : TensorView{}, out.views(cfg), cfg, ws.v);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);

  EXPECT_TRUE(bytes_equal(out.idx.to_host(), ref.idx)) << "topk_idx";
  EXPECT_TRUE(bytes_equal(out.w.to_host(), ref.w)) << "topk_weight";
  EXPECT_TRUE(bytes_equal(out.counts.to_host(), ref.counts)) << "tokens_per_expert";
  EXPECT_TRUE(bytes_equal(out.scores.to_host(), ref.scores)) << "scores";
  if (aux) {
    EXPECT_TRUE(bytes_equal(out.seq_counts.to_host(), ref.seq_counts)) << "seq_counts";
    EXPECT_TRUE(bytes_equal(out.loss.to_host(), ref.loss))
        << "aux_loss " << out.loss.to_host().ptr<float>()[0] << " vs " << ref.L();
  }

  // Deterministic: a second run gives the same bits (counters re-zeroed, not accumulated).
  router_forward(x.v, use_bias ? b.v : TensorView{}, out.views(cfg), cfg, ws.v);
  EXPECT_TRUE(bytes_equal(out.counts.to_host(), ref.counts)) << "tokens_per_expert, 2nd run";
  if (aux) EXPECT_TRUE(bytes_equal(out.loss.to_host(), ref.loss)) << "aux_loss, 2nd run";

  // Backward, from the GPU's own forward outputs (equal to the CPU's).
  HostTensor hdw = host_from_values(in.dw, DType::F32, T, cfg.top_k);
  HostTensor hda(DType::F32, 1, 1);
  hda.ptr<float>()[0] = d_aux;
  DeviceTensor dw(hdw), da(hda), dx(DType::F32, T, E);
  router_backward(x.v, out.idx.v, dw.v, aux ? out.seq_counts.v : TensorView{},
                  aux ? da.v : TensorView{}, dx.v, cfg);
  const HostTensor got_dx = dx.to_host();
  HostTensor want_dx = host_from_values(ref_dx, DType::F32, T, E);
  EXPECT_TRUE(bytes_equal(got_dx, want_dx)) << "d_logits";
}

RouterConfig make_cfg(RouterKind kind, int k, int groups, int topk_groups, bool renorm,
                      float scaling, float alpha, int64_t S) {
  RouterConfig c;
  c.kind = kind;
  c.top_k = k;
  c.n_groups = groups;
  c.topk_groups = topk_groups;
  c.renormalize = renorm;
  c.scaling = scaling;
  c.aux_alpha = alpha;
  c.seq_len = S;
  return c;
}

struct GpuCase {
  int64_t E;
  RouterConfig cfg;
  bool bias;
};

std::vector<GpuCase> gpu_cases() {
  const auto Sig = RouterKind::SigmoidBias;
  const auto Soft = RouterKind::Softmax;
  return {
      {256, RouterConfig::deepseek_v3(1e-4f, 0), true},          // V3, G = 32, groups of 4 lanes
      {256, make_cfg(Sig, 8, 2, 1, true, 2.5f, 0, 0), true},     // group size 128 (16 lanes)
      {256, make_cfg(Soft, 8, 128, 8, false, 1, 0, 0), false},   // group size 2
      {160, make_cfg(Soft, 6, 1, 1, true, 1, 1e-2f, 0), false},  // lanes 20..31 are padding
      {128, make_cfg(Sig, 8, 16, 4, true, 1, 1e-3f, 0), true},   // G = 16, group size 8
      {64, make_cfg(Sig, 6, 1, 1, true, 1, 1e-3f, 0), true},     // V2-Lite-like, G = 8
      {64, make_cfg(Soft, 8, 4, 2, false, 1, 0, 0), false},      // Qwen-like, group size 16
      {60, make_cfg(Sig, 4, 15, 3, true, 1, 1e-3f, 0), true},    // E % 8 == 4, group size 4
      {32, make_cfg(Soft, 4, 1, 1, true, 1, 0, 0), false},       // G = 4
      {16, make_cfg(Sig, 3, 8, 2, false, 3, 1e-2f, 0), true},    // G = 2, group size 2
      {12, make_cfg(Soft, 2, 3, 1, true, 1, 0, 0), false},       // G = 2, half padded
      {8, make_cfg(Soft, 2, 1, 1, true, 1, 1e-2f, 0), false},    // Mixtral, G = 1
      {8, make_cfg(Sig, 8, 1, 1, true, 1, 0, 0), true},          // k == E
      {4, make_cfg(Soft, 1, 1, 1, false, 1, 1e-2f, 0), false},   // G = 1, half padded
  };
}

void check_shapes_and_configs() {
  uint64_t seed = 1;
  for (const GpuCase& c : gpu_cases()) {
    // Token counts: one, a partial run, partial chunks, and several CTAs.
    for (int64_t T : {1, 7, 333, 2048 + 24}) {
      // Aux sequence lengths: whole, single tokens, partial runs of 8 (7, 37).
      for (int64_t S : {T, int64_t{1}, int64_t{7}, int64_t{37}}) {
        RouterConfig cfg = c.cfg;
        if (!cfg.aux_enabled() && S != T) continue;
        if (cfg.aux_enabled()) cfg.seq_len = S;
        if (T % S || (S != T && S >= T)) continue;
        for (auto [fill, levels] : {std::pair{Fill::Normal, 0}, std::pair{Fill::Normal, 4},
                                    std::pair{Fill::Adversarial, 0}}) {
          const Inputs in = make_inputs(T, c.E, cfg.top_k, fill, levels, seed++);
          expect_gpu_matches_cpu(T, c.E, cfg, c.bias, in,
                                 "E " + std::to_string(c.E) + " k " + std::to_string(cfg.top_k) +
                                     " groups " + std::to_string(cfg.n_groups) + " T " +
                                     std::to_string(T) + " S " + std::to_string(cfg.seq_len) +
                                     " fill " + std::to_string(int(fill)) + "/" +
                                     std::to_string(levels));
          if (::testing::Test::HasFailure()) return;
        }
      }
    }
  }
}

TEST(RouterGpu, MatchesReferenceAcrossShapesAndConfigs) {
  FP8FLOW_REQUIRE_GPU();
  check_shapes_and_configs();
}

void check_aux_sequence_lengths() {
  // E = 256: runs of 8 tokens, chunks of 64, reduction fan-in 32 (levels at 2048 and 65536).
  const int64_t T = 8192;
  uint64_t seed = 50;
  for (int64_t S : {1, 2, 8, 9, 64, 100, 128, 2048, 4096, 8192}) {
    if (T % S) continue;
    RouterConfig cfg = RouterConfig::deepseek_v3(1e-4f, S);
    expect_gpu_matches_cpu(T, 256, cfg, true, make_inputs(T, 256, 8, Fill::Normal, 0, seed++),
                           "S " + std::to_string(S));
  }
  // E = 8 (G = 1): chunks of 2048 tokens.
  for (int64_t S : {3, 256, 6144}) {
    RouterConfig cfg = make_cfg(RouterKind::Softmax, 2, 1, 1, true, 1, 1e-2f, S);
    expect_gpu_matches_cpu(6144, 8, cfg, false, make_inputs(6144, 8, 2, Fill::Normal, 0, seed++),
                           "E 8 S " + std::to_string(S));
  }
}

TEST(RouterGpu, AuxSequenceLengthsAcrossRunsAndChunks) {
  FP8FLOW_REQUIRE_GPU();
  check_aux_sequence_lengths();
}

void check_deepseek_v3_full_size() {
  const int64_t T = 65536, E = 256;
  expect_gpu_matches_cpu(T, E, RouterConfig::deepseek_v3(1e-4f, 4096), true,
                         make_inputs(T, E, 8, Fill::Normal, 0, 4242), "V3 T 65536 S 4096");
  expect_gpu_matches_cpu(T, E, RouterConfig::deepseek_v3(1e-4f, T), true,
                         make_inputs(T, E, 8, Fill::Normal, 0, 4343), "V3 T 65536 S T");
}

TEST(RouterGpu, DeepSeekV3AtFullSize) {
  FP8FLOW_REQUIRE_GPU();
  check_deepseek_v3_full_size();
}

void check_equal_logits_and_all_nan() {
  for (float v : {0.0f, NAN}) {
    for (const GpuCase& c : gpu_cases()) {
      RouterConfig cfg = c.cfg;
      if (cfg.aux_enabled()) cfg.seq_len = 5;
      Inputs in;
      in.x.assign(10 * c.E, v);
      in.bias.assign(c.E, 0.0f);
      in.dw = random_logits(10, cfg.top_k, 9, 1.0f);
      expect_gpu_matches_cpu(10, c.E, cfg, c.bias, in, "E " + std::to_string(c.E));
      HostOut ref = run_forward_cpu(in.x, 10, c.E, nullptr, cfg);
      for (int j = 0; j < cfg.top_k; ++j) EXPECT_EQ(ref.I()[j], j);
    }
  }
}

TEST(RouterGpu, EqualLogitsAndAllNaN) {
  FP8FLOW_REQUIRE_GPU();
  check_equal_logits_and_all_nan();
}

// Adversarial ties (router_testing.h tie_logits / tie_bias) for every case, both forward variants.
void check_adversarial_ties() {
  uint64_t seed = 301;
  for (const GpuCase& c : gpu_cases()) {
    for (int64_t T : {21, 2048 + 24}) {
      RouterConfig cfg = c.cfg;
      if (cfg.aux_enabled()) cfg.seq_len = T == 21 ? 7 : 8;
      for (int fill = 0; fill < 4; ++fill) {
        Inputs in;
        in.x = tie_logits(T, c.E, cfg.top_k, fill, seed);
        in.bias = tie_bias(c.E, seed + 1);
        in.dw = random_logits(T, cfg.top_k, seed + 2, 1.0f);
        expect_gpu_matches_cpu(T, c.E, cfg, c.bias, in,
                               "ties E " + std::to_string(c.E) + " k " + std::to_string(cfg.top_k) +
                                   " groups " + std::to_string(cfg.n_groups) + " T " +
                                   std::to_string(T) + " fill " + std::to_string(fill));
        seed += 3;
        if (::testing::Test::HasFailure()) return;
      }
    }
  }
}

TEST(RouterGpu, AdversarialTies) {
  FP8FLOW_REQUIRE_GPU();
  for (int v : {0, 1}) {
    SCOPED_TRACE(testing::Message() << "forward variant " << v);
    const ScopedKernelVariant variant(sm90::router_set_forward_variant, v);
    check_adversarial_ties();
    if (HasFailure()) return;
  }
}

// The sorted forward (sm90::router_set_forward_variant(1), the default) through the checks above,
// bit for bit, whatever FP8FLOW_ROUTER_FWD_SORT says.
TEST(RouterGpu, SortedForwardMatchesReference) {
  FP8FLOW_REQUIRE_GPU();
  const ScopedKernelVariant variant(sm90::router_set_forward_variant, 1);
  check_shapes_and_configs();
  if (HasFailure()) return;
  check_equal_logits_and_all_nan();
  if (HasFailure()) return;
  check_aux_sequence_lengths();
  if (HasFailure()) return;
  check_deepseek_v3_full_size();
}

TEST(RouterGpu, EmptyTokens) {
  FP8FLOW_REQUIRE_GPU();
  RouterConfig cfg = RouterConfig::deepseek_v3(1e-4f, 4);
  DeviceTensor x(DType::F32, 0, 256);
  DevOut out(0, 256, cfg);
  router_forward(x.v, {}, out.views(cfg), cfg, {});
  HostTensor counts = out.counts.to_host();
  for (int i = 0; i < 256; ++i) EXPECT_EQ(counts.ptr<int32_t>()[i], 0);
  EXPECT_EQ(out.loss.to_host().ptr<float>()[0], 0.0f);
  DeviceTensor dw(DType::F32, 0, 8), dx(DType::F32, 0, 256), da(DType::F32, 1, 1);
  EXPECT_NO_THROW(router_backward(x.v, out.idx.v, dw.v, out.seq_counts.v, da.v, dx.v, cfg));
}

TEST(RouterGpu, WorkspaceAndAlignmentChecks) {
  FP8FLOW_REQUIRE_GPU();
  const int64_t T = 64, E = 256;
  RouterConfig cfg = RouterConfig::deepseek_v3(1e-4f, 16);
  DeviceTensor x(DType::F32, T, E);
  DevOut out(T, E, cfg);
  ASSERT_GT(router_workspace_bytes(T, E, cfg), 0u);
  DeviceTensor small(DType::I32, 1, 4);
  try {
    router_forward(x.v, {}, out.views(cfg), cfg, small.v);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("fp8flow::router_forward: workspace:"), std::string::npos)
        << e.what();
  }
  TensorView shifted = x.v;  // 4-byte offset: not 16-byte aligned
  shifted.data = static_cast<float*>(x.v.data) + 1;
  shifted.rows = T - 1;
  DevOut out2(T - 1, E, cfg);
  RouterConfig cfg2 = cfg;
  cfg2.aux_alpha = 0;
  try {
    router_forward(shifted, {}, out2.views(cfg2), cfg2, {});
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("fp8flow::router_forward: logits:"), std::string::npos)
        << e.what();
  }
}

#else

TEST(RouterGpu, SkippedInCpuOnlyBuild) {
  GTEST_SKIP() << "CPU-only build: GPU tests skipped";
}

#endif

}  // namespace
}  // namespace fp8flow::test
