// Router CPU reference: exact tie and NaN rules, group-limited selection, selection against an
// independent sort-based implementation, weights / aux loss / d logits against an FP64 model with
// stated bounds, and the FP64 model's gradient against central finite differences.
#include <gtest/gtest.h>

#include <cmath>
#include <map>

#include "router/router_testing.h"

namespace fp8flow::test {
namespace {

using namespace router_testing;

constexpr double kUlp = 1.0 / (1 << 24);  // 2^-24: half an FP32 ulp at 1, relative

uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

RouterConfig sigmoid_cfg(int k, int groups = 1, int topk_groups = 1, float scaling = 1.0f) {
  RouterConfig c;
  c.kind = RouterKind::SigmoidBias;
  c.top_k = k;
  c.n_groups = groups;
  c.topk_groups = topk_groups;
  c.scaling = scaling;
  return c;
}

RouterConfig softmax_cfg(int k, bool renorm, int groups = 1, int topk_groups = 1) {
  RouterConfig c = RouterConfig::softmax_topk(k, renorm);
  c.n_groups = groups;
  c.topk_groups = topk_groups;
  return c;
}

// Every row's idx are distinct experts in [0, E); counts and seq_counts are their histograms.
void expect_consistent(HostOut& o, int64_t T, int64_t E, const RouterConfig& cfg) {
  const int k = cfg.top_k;
  std::vector<int64_t> hist(E, 0);
  std::vector<int64_t> seq_hist(cfg.aux_enabled() ? (T / cfg.seq_len) * E : 0, 0);
  for (int64_t t = 0; t < T; ++t) {
    for (int j = 0; j < k; ++j) {
      const int e = o.I()[t * k + j];
      ASSERT_GE(e, 0);
      ASSERT_LT(e, E);
      for (int j2 = 0; j2 < j; ++j2) ASSERT_NE(o.I()[t * k + j2], e) << "token " << t;
      ++hist[e];
      if (cfg.aux_enabled()) ++seq_hist[(t / cfg.seq_len) * E + e];
    }
  }
  for (int64_t i = 0; i < E; ++i) EXPECT_EQ(o.C()[i], hist[i]) << "expert " << i;
  for (size_t i = 0; i < seq_hist.size(); ++i) EXPECT_EQ(o.SC()[i], seq_hist[i]) << i;
}

TEST(RouterRef, EqualLogitsPickTheFirstExperts) {
  const int64_t T = 3, E = 64;
  for (float v : {0.0f, 3.5f, -7.0f, -200.0f}) {
    for (RouterConfig cfg : {sigmoid_cfg(6), sigmoid_cfg(6, 8, 2, 2.5f), softmax_cfg(6, true),
                             softmax_cfg(6, false), softmax_cfg(6, true, 32, 3)}) {
      const std::vector<float> x(T * E, v);
      HostOut o = run_forward_cpu(x, T, E, nullptr, cfg);
      for (int64_t t = 0; t < T; ++t) {
        for (int j = 0; j < 6; ++j) {
          EXPECT_EQ(o.I()[t * 6 + j], j) << "v " << v;
          const double want = cfg.renormalize ? cfg.scaling / 6.0 : cfg.scaling / 64.0;
          // sigmoid(-200) == 0: 0 / (0 + 1e-20) == 0.
          if (v == -200.0f && cfg.kind == RouterKind::SigmoidBias) {
            EXPECT_EQ(o.W()[t * 6 + j], 0.0f);
          } else {
            EXPECT_NEAR(o.W()[t * 6 + j], want, want * 16 * kUlp) << "v " << v;
          }
        }
      }
      for (int64_t i = 0; i < E; ++i) EXPECT_EQ(o.C()[i], i < 6 ? T : 0);
    }
  }
}

TEST(RouterRef, OrderIsDescendingWithTiesToLowerIndex) {
  const std::vector<float> x = {1, 3, 3, 2, 3, -1, 2, 0};
  for (RouterConfig cfg : {sigmoid_cfg(8), softmax_cfg(8, true)}) {
    HostOut o = run_forward_cpu(x, 1, 8, nullptr, cfg);
    const std::vector<int> want = {1, 2, 4, 3, 6, 0, 7, 5};
    for (int j = 0; j < 8; ++j) EXPECT_EQ(o.I()[j], want[j]) << j;
    for (int j = 1; j < 8; ++j) EXPECT_GE(o.W()[j - 1], o.W()[j]);
    EXPECT_EQ(o.W()[0], o.W()[1]);
    EXPECT_EQ(o.W()[1], o.W()[2]);
  }
}

TEST(RouterRef, BiasSteersSelectionButNotWeights) {
  // Equal scores; the bias alone decides, and the weights stay equal.
  std::vector<float> x(8, 0.5f), b(8, 0.0f);
  b[7] = 0.25f;
  b[2] = 0.125f;
  HostOut o = run_forward_cpu(x, 1, 8, &b, sigmoid_cfg(2, 1, 1, 2.5f));
  EXPECT_EQ(o.I()[0], 7);
  EXPECT_EQ(o.I()[1], 2);
  EXPECT_EQ(o.W()[0], o.W()[1]);
  EXPECT_NEAR(o.W()[0], 1.25, 4 * kUlp);
  // A large negative bias removes the best expert; the weights come from unbiased scores.
  x = {4, 1, 0, 0, 0, 0, 0, 2};
  b.assign(8, 0.0f);
  b[0] = -5.0f;
  o = run_forward_cpu(x, 1, 8, &b, sigmoid_cfg(2));
  EXPECT_EQ(o.I()[0], 7);
  EXPECT_EQ(o.I()[1], 1);
  const double s7 = 1 / (1 + std::exp(-2.0)), s1 = 1 / (1 + std::exp(-1.0));
  EXPECT_NEAR(o.W()[0], s7 / (s7 + s1), 16 * kUlp);
}

TEST(RouterRef, GroupLimitedSelectionSkipsAStrongExpertInAWeakGroup) {
  // 4 groups of 4. Group 0 holds the single best expert but a poor second: its group score (sum
  // of the top two) loses to groups 1 and 2.
  std::vector<float> x = {10, -10, -10, -10, 3, 3, -1, -1, 2.5f, 2.5f, 0, 0, -3, -3, -3, -3};
  HostOut o = run_forward_cpu(x, 1, 16, nullptr, sigmoid_cfg(3, 4, 2));
  EXPECT_EQ(o.I()[0], 4);
  EXPECT_EQ(o.I()[1], 5);
  EXPECT_EQ(o.I()[2], 8);
  // Without groups expert 0 wins.
  o = run_forward_cpu(x, 1, 16, nullptr, sigmoid_cfg(3));
  EXPECT_EQ(o.I()[0], 0);
  // Ties between groups go to the lower group.
  x = {1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0};
  o = run_forward_cpu(x, 1, 16, nullptr, sigmoid_cfg(4, 4, 2));
  for (int j = 0; j < 4; ++j) EXPECT_EQ(o.I()[j], std::vector<int>({0, 1, 4, 5})[j]);
}

struct Case {
  RouterConfig cfg;
  int64_t E;
  bool bias;
};

std::vector<Case> selection_cases() {
  std::vector<Case> cs;
  cs.push_back({RouterConfig::deepseek_v3(), 256, true});
  cs.push_back({sigmoid_cfg(8), 256, true});
  cs.push_back({sigmoid_cfg(6, 8, 3), 64, true});    // group size 8: one lane
  cs.push_back({sigmoid_cfg(6, 4, 2), 64, false});   // group size 16: two lanes
  cs.push_back({sigmoid_cfg(4, 16, 4), 64, true});   // group size 4
  cs.push_back({sigmoid_cfg(7, 30, 5), 60, true});   // group size 2, E % 8 == 4
  cs.push_back({sigmoid_cfg(8, 2, 1), 256, true});   // group size 128
  cs.push_back({softmax_cfg(2, true), 8, false});    // Mixtral
  cs.push_back({softmax_cfg(8, false), 64, false});  // Qwen2-MoE
  cs.push_back({softmax_cfg(6, true), 160, false});  // E not a power of two
  cs.push_back({softmax_cfg(1, true), 4, true});
  cs.push_back({softmax_cfg(4, true, 3, 2), 12, false});  // group size 4, E = 12
  return cs;
}

TEST(RouterRef, SelectionMatchesAnIndependentSort) {
  int seed = 0;
  for (const Case& c : selection_cases()) {
    for (int levels : {0, 8, 2}) {  // continuous, and quantized logits (many exact ties)
      const int64_t T = 40;
      const auto x = random_logits(T, c.E, ++seed, 2.0f, levels);
      const auto b = random_bias(c.E, ++seed, levels ? 0.0f : 0.1f);
      HostOut o = run_forward_cpu(x, T, c.E, c.bias ? &b : nullptr, c.cfg);
      expect_consistent(o, T, c.E, c.cfg);
      for (int64_t t = 0; t < T; ++t) {
        const auto want = select_sorted(o.S() + t * c.E, c.bias ? b.data() : nullptr,
                                        static_cast<int>(c.E), c.cfg);
        for (int j = 0; j < c.cfg.top_k; ++j)
          ASSERT_EQ(o.I()[t * c.cfg.top_k + j], want[j])
              << "E " << c.E << " k " << c.cfg.top_k << " groups " << c.cfg.n_groups << " levels "
              << levels << " token " << t << " slot " << j;
      }
    }
  }
}

TEST(RouterRef, NaNScoresAreNeverSelectedUnlessNothingElseIsLeft) {
  const float nan = NAN;
  const int64_t E = 8;
  std::vector<float> x = {
      nan,      1,         2,   nan,
      0,        5,         nan, 3,  // NaNs skipped: 5 (5), 7 (3), 2 (2), 1 (1)
      nan,      nan,       nan, nan,
      nan,      nan,       nan, nan,  // all NaN: 0..3
      nan,      nan,       1,   nan,
      nan,      nan,       2,   nan,  // two numbers, then NaNs by index: 6, 2, 0, 1
      INFINITY, -INFINITY, 0,   0,
      0,        0,         0,   0,  // sigmoid(+Inf) = 1, sigmoid(-Inf) = 0
  };
  HostOut o = run_forward_cpu(x, 4, E, nullptr, sigmoid_cfg(4));
  const std::vector<int> want = {5, 7, 2, 1, 0, 1, 2, 3, 6, 2, 0, 1, 0, 2, 3, 4};
  for (int i = 0; i < 16; ++i) EXPECT_EQ(o.I()[i], want[i]) << i;
  for (int j = 0; j < 4; ++j) {
    EXPECT_FALSE(std::isnan(o.W()[j]));
    EXPECT_EQ(bits(o.W()[4 + j]), 0x7FC00000u);  // canonical NaN
    EXPECT_EQ(bits(o.W()[8 + j]), 0x7FC00000u);  // the NaN scores poison the sum
  }
  EXPECT_EQ(bits(o.S()[0]), 0x7FC00000u);
  EXPECT_EQ(o.S()[24], 1.0f);
  EXPECT_EQ(o.S()[25], 0.0f);

  // Softmax: one NaN logit makes the whole row NaN, so the first k experts are taken.
  std::vector<float> y = {1, 2, 3, nan, 0, 5, 1, 3};
  HostOut so = run_forward_cpu(y, 1, E, nullptr, softmax_cfg(3, true));
  for (int j = 0; j < 3; ++j) {
    EXPECT_EQ(so.I()[j], j);
    EXPECT_EQ(bits(so.W()[j]), 0x7FC00000u);
  }
  for (int i = 0; i < E; ++i) EXPECT_EQ(bits(so.S()[i]), 0x7FC00000u);

  // Groups: a group whose top two include a NaN scores NaN and ranks last.
  std::vector<float> z = {nan, 9, 1, 1, 0, 0, 0, 0};  // groups of 2: {nan,9} {1,1} {0,0} {0,0}
  HostOut go = run_forward_cpu(z, 1, E, nullptr, sigmoid_cfg(2, 4, 1));
  EXPECT_EQ(go.I()[0], 2);
  EXPECT_EQ(go.I()[1], 3);
}

TEST(RouterRef, WeightsMatchFp64) {
  // Bound: |w32 - w64| <= (6 + k + R) * 2^-24 * w64 where R = max |x_i - max x| (softmax's
  // exp(x - m) inherits the rounding of x - m); sigmoid: R = 0.
  int seed = 100;
  for (const Case& c : selection_cases()) {
    const int64_t T = 32;
    const auto x = random_logits(T, c.E, ++seed);
    const auto b = random_bias(c.E, ++seed);
    HostOut o = run_forward_cpu(x, T, c.E, c.bias ? &b : nullptr, c.cfg);
    const Model64 m = model_from(o, T, c.E, c.cfg);
    const auto w = m.weights(to_f64(x));
    const int k = c.cfg.top_k;
    for (int64_t t = 0; t < T; ++t) {
      double R = 0;
      if (c.cfg.kind == RouterKind::Softmax) {
        const float mx = *std::max_element(&x[t * c.E], &x[(t + 1) * c.E]);
        for (int64_t i = 0; i < c.E; ++i) R = std::max(R, double(mx) - x[t * c.E + i]);
      }
      for (int j = 0; j < k; ++j) {
        const double want = w[t * k + j];
        EXPECT_NEAR(o.W()[t * k + j], want, (6 + k + R) * kUlp * std::fabs(want))
            << "E " << c.E << " token " << t << " slot " << j;
      }
      if (c.cfg.renormalize) {
        double sum = 0;
        for (int j = 0; j < k; ++j) sum += o.W()[t * k + j];
        EXPECT_NEAR(sum, c.cfg.scaling, (32 + 4 * k + 2 * R) * kUlp * c.cfg.scaling);
      }
    }
  }
}

TEST(RouterRef, AuxLossOfUniformScoresIsAlpha) {
  // Equal logits: experts 0..k-1 take every token, f_i = E / k for them, P_i = 1 / E.
  for (int64_t S : {1, 4, 16}) {
    RouterConfig cfg = sigmoid_cfg(2);
    cfg.aux_alpha = 0.01f;
    cfg.seq_len = S;
    const int64_t T = 16, E = 8;
    HostOut o = run_forward_cpu(std::vector<float>(T * E, 0.3f), T, E, nullptr, cfg);
    EXPECT_NEAR(o.L(), 0.01, 0.01 * 8 * kUlp);
    expect_consistent(o, T, E, cfg);
  }
}

TEST(RouterRef, AuxLossMatchesFp64) {
  // Bound: 1e-6 relative (per-element error ~10 ulp, summation error of depth-log2 trees and
  // runs of 8: the FP32 result is within ~20 ulp; 1e-6 ~ 17 ulp of headroom on top).
  int seed = 300;
  for (RouterKind kind : {RouterKind::SigmoidBias, RouterKind::Softmax}) {
    for (int64_t E : {8, 64, 256}) {
      for (int64_t S : {1, 3, 8, 24, 96, 192}) {
        RouterConfig cfg =
            kind == RouterKind::SigmoidBias ? RouterConfig::deepseek_v3() : softmax_cfg(4, true);
        if (E != 256) cfg.n_groups = cfg.topk_groups = 1;
        if (E == 8) cfg.top_k = 2;
        cfg.aux_alpha = 1e-3f;
        cfg.seq_len = S;
        const int64_t T = 192;
        const auto x = random_logits(T, E, ++seed);
        HostOut o = run_forward_cpu(x, T, E, nullptr, cfg);
        expect_consistent(o, T, E, cfg);
        const double want = model_from(o, T, E, cfg).aux_loss(to_f64(x));
        EXPECT_NEAR(o.L(), want, 1e-6 * want) << "E " << E << " S " << S;
        EXPECT_GT(o.L(), 0.0f);
      }
    }
  }
}

struct GradCase {
  RouterConfig cfg;
  int64_t T, E;
};

std::vector<GradCase> grad_cases() {
  std::vector<GradCase> cs;
  RouterConfig v3 = RouterConfig::deepseek_v3(0.05f, 4);
  v3.n_groups = 4;
  v3.topk_groups = 2;
  v3.top_k = 4;
  cs.push_back({v3, 8, 32});
  RouterConfig sm = softmax_cfg(3, true);
  sm.aux_alpha = 0.1f;
  sm.seq_len = 2;
  sm.scaling = 1.5f;
  cs.push_back({sm, 6, 16});
  cs.push_back({softmax_cfg(2, false), 5, 8});
  RouterConfig sg = sigmoid_cfg(3, 1, 1, 2.0f);
  sg.renormalize = false;
  sg.aux_alpha = 0.2f;
  sg.seq_len = 5;
  cs.push_back({sg, 5, 12});
  return cs;
}

TEST(RouterRef, Fp64GradientMatchesFiniteDifferences) {
  int seed = 500;
  for (const GradCase& c : grad_cases()) {
    const auto x = random_logits(c.T, c.E, ++seed, 1.5f);
    HostOut o = run_forward_cpu(x, c.T, c.E, nullptr, c.cfg);
    const Model64 m = model_from(o, c.T, c.E, c.cfg);
    const auto dw = random_logits(c.T, c.cfg.top_k, ++seed, 1.0f);
    const float d_aux = 0.75f;
    auto xd = to_f64(x);
    std::vector<double> scale;
    const auto g = m.grad(xd, dw, d_aux, &scale);
    const auto dx32 = run_backward_cpu(x, c.T, c.E, o, dw, &d_aux, c.cfg);
    double gmax = 0;
    for (double v : g) gmax = std::max(gmax, std::fabs(v));
    ASSERT_GT(gmax, 1e-3);
    const double h = 1e-5;
    for (size_t i = 0; i < xd.size(); ++i) {
      const double x0 = xd[i];
      xd[i] = x0 + h;
      const double lp = m.objective(xd, dw, d_aux);
      xd[i] = x0 - h;
      const double lm = m.objective(xd, dw, d_aux);
      xd[i] = x0;
      const double fd = (lp - lm) / (2 * h);
      EXPECT_NEAR(g[i], fd, 1e-7 * gmax + 1e-6 * std::fabs(fd)) << "element " << i;
      // The FP32 backward against the same finite differences: FP32 rounding (BackwardMatchesFp64
      // bounds it per element) plus the FD error above.
      EXPECT_NEAR(dx32[i], fd, 16 * kUlp * scale[i] + 1e-7 * gmax + 1e-6 * std::fabs(fd))
          << "FP32 element " << i;
    }
  }
}

TEST(RouterRef, BackwardMatchesFp64) {
  // Bound: |dx32 - dx64| <= 16 * 2^-24 * s_i * (|ds_i| + 2 max_row |ds|), ds = dL/ds (FP64).
  // Why: the sigmoid's 1 - s and softmax's ds_i - dot cancel (absolute error ~ s_i |ds_i| ulp),
  // and ds_i carries the roundings of the renormalization and aux terms (~ max_row |ds| ulp).
  int seed = 700;
  for (const GradCase& c0 : grad_cases()) {
    for (int64_t T : {c0.T, int64_t{64}}) {
      GradCase c = c0;
      c.T = T;
      if (c.cfg.aux_enabled() && T % c.cfg.seq_len) c.cfg.seq_len = T;
      const auto x = random_logits(c.T, c.E, ++seed, 2.0f);
      HostOut o = run_forward_cpu(x, c.T, c.E, nullptr, c.cfg);
      const auto dw = random_logits(c.T, c.cfg.top_k, ++seed, 1.0f);
      const float d_aux = 0.75f;
      const auto dx = run_backward_cpu(x, c.T, c.E, o, dw, &d_aux, c.cfg);
      std::vector<double> scale;
      const auto want = model_from(o, c.T, c.E, c.cfg).grad(to_f64(x), dw, d_aux, &scale);
      double worst = 0;
      for (int64_t i = 0; i < c.T * c.E; ++i) {
        const double err = std::fabs(dx[i] - want[i]);
        ASSERT_LE(err, 16 * kUlp * scale[i] + 1e-30) << "T " << c.T << " E " << c.E << " element "
                                                     << i << ": " << dx[i] << " vs " << want[i];
        if (scale[i] > 0) worst = std::max(worst, err / (kUlp * scale[i]));
      }
      EXPECT_GT(worst, 0.0);  // the bound is not vacuous: FP32 does differ from FP64
    }
  }
}

TEST(RouterRef, BackwardWithoutAuxGradientIgnoresTheAuxTerm) {
  RouterConfig cfg = RouterConfig::deepseek_v3(0.1f, 8);
  cfg.n_groups = 1;
  const int64_t T = 16, E = 32;
  const auto x = random_logits(T, E, 901);
  HostOut o = run_forward_cpu(x, T, E, nullptr, cfg);
  const auto dw = random_logits(T, cfg.top_k, 902, 1.0f);
  const auto dx = run_backward_cpu(x, T, E, o, dw, nullptr, cfg);
  const float zero = 0.0f;
  const auto dx0 = run_backward_cpu(x, T, E, o, dw, &zero, cfg);
  for (size_t i = 0; i < dx.size(); ++i)
    EXPECT_NEAR(dx[i], dx0[i], 1e-7 * std::fabs(dx[i]) + 1e-12);
  // Unselected experts get no gradient through the weights (sigmoid: rows are independent).
  for (int64_t t = 0; t < T; ++t) {
    std::vector<bool> sel(E, false);
    for (int j = 0; j < cfg.top_k; ++j) sel[o.I()[t * cfg.top_k + j]] = true;
    for (int64_t i = 0; i < E; ++i)
      if (!sel[i]) EXPECT_EQ(dx[t * E + i], 0.0f);
  }
}

TEST(RouterRef, EmptyInputZeroesCountsAndLoss) {
  RouterConfig cfg = RouterConfig::deepseek_v3(0.1f, 4);
  HostOut o(0, 256, cfg);
  HostTensor x(DType::F32, 0, 256);
  router_forward(x.v, {}, o.views(), cfg);
  for (int i = 0; i < 256; ++i) EXPECT_EQ(o.C()[i], 0);
  EXPECT_EQ(o.L(), 0.0f);
}

TEST(RouterRef, IsDeterministic) {
  const RouterConfig cfg = RouterConfig::deepseek_v3(1e-4f, 16);
  const int64_t T = 64, E = 256;
  const auto x = random_logits(T, E, 77);
  const auto b = random_bias(E, 78);
  HostOut a = run_forward_cpu(x, T, E, &b, cfg), c = run_forward_cpu(x, T, E, &b, cfg);
  EXPECT_TRUE(bytes_equal(a.idx, c.idx));
  EXPECT_TRUE(bytes_equal(a.w, c.w));
  EXPECT_TRUE(bytes_equal(a.loss, c.loss));
}

}  // namespace
}  // namespace fp8flow::test
