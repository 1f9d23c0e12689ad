// Shared setup of the expert-parallel MoELayer tests (ep_layer_test.cpp on InProcess ranks,
// ep_gpu_test.cpp on NCCL ranks): the problem, its global tokens and weights, the layer config,
// and the comparison of the ranks' outputs against a single-rank reference.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "common/test_data.h"
#include "common/test_util.h"
#include "fp8flow/dispatch.h"
#include "fp8flow/formats.h"
#include "fp8flow/moe.h"

namespace fp8flow::test::eptest {

struct EpProblem {
  std::vector<int64_t> T = {40, 23};  // tokens per rank
  int64_t H = 256, F = 256, Eg = 8;
  RouterConfig router = RouterConfig::softmax_topk(2, true);
  bool bias = false;
  bool dedup = false;  // MoEConfig::ep_dedup
  uint64_t seed = 1;
  int64_t tg() const {
    int64_t t = 0;
    for (auto v : T) t += v;
    return t;
  }
  int64_t tmax() const {
    int64_t t = 0;
    for (auto v : T) t = std::max(t, v);
    return t;
  }
};

// N ranks' routings for the dedup plan tests: rank s routes T[s] tokens (tokens_of(s)) to k of
// E = El N experts, distinct per token (random, or experts 0..k-1 when skew), with the per-expert
// counts [N][E] and every rank's dedup_token_counts [N][N].
struct DedupRoutings {
  std::vector<int64_t> T, counts, all_tokens;
  std::vector<std::vector<int32_t>> idx;
};
template <typename TokensOf>
DedupRoutings dedup_routings(int N, int k, int64_t El, std::mt19937& rng, TokensOf tokens_of,
                             bool skew = false) {
  const int64_t E = El * N;
  DedupRoutings d;
  d.T.resize(N);
  d.idx.resize(N);
  d.counts.assign(static_cast<size_t>(N * E), 0);
  for (int s = 0; s < N; ++s) {
    d.T[s] = tokens_of(s);
    for (int64_t t = 0; t < d.T[s]; ++t) {
      std::vector<int32_t> e(static_cast<size_t>(E));
      for (int64_t i = 0; i < E; ++i) e[i] = static_cast<int32_t>(i);
      if (!skew) std::shuffle(e.begin(), e.end(), rng);
      for (int j = 0; j < k; ++j) {
        d.idx[s].push_back(e[j]);
        ++d.counts[s * E + e[j]];
      }
    }
  }
  for (int s = 0; s < N; ++s) {
    const std::vector<int64_t> c = dedup_token_counts(d.idx[s], k, N, E);
    d.all_tokens.insert(d.all_tokens.end(), c.begin(), c.end());
  }
  return d;
}

// The global problem: all ranks' tokens (concatenated) and all experts' weights.
struct Global {
  EpProblem p;
  HostTensor x, dy, gate, bias, w1, w2;
};

// Seeds: x seed, dy seed + 1, gate seed + 2, then (with draw_bias) bias seed + 3, then W1, W2.
// ep_gpu_test.cpp draws no bias (its W1/W2 are seed + 3, seed + 4).
inline Global make_global(const EpProblem& p, bool draw_bias = true) {
  Global g;
  g.p = p;
  const int64_t T = p.tg(), H = p.H, F = p.F, E = p.Eg;
  g.x = host_from_values(normal_values(T * H, 1.f, p.seed), DType::BF16, T, H);
  g.dy = host_from_values(normal_values(T * H, 1.f, p.seed + 1), DType::BF16, T, H);
  g.gate = host_from_values(normal_values(E * H, 1.f / std::sqrt(float(H)), p.seed + 2), DType::F32,
                            E, H);
  uint64_t s = p.seed + 3;
  if (draw_bias) g.bias = host_from_values(normal_values(E, 0.05f, s++), DType::F32, 1, E);
  g.w1 = host_from_values(normal_values(E * 2 * F * H, 1.f / std::sqrt(float(H)), s++), DType::BF16,
                          E * 2 * F, H);
  g.w2 = host_from_values(normal_values(E * H * F, 1.f / std::sqrt(float(F)), s), DType::BF16,
                          E * H, F);
  return g;
}

inline MoEConfig config(const EpProblem& p, Recipe r, int ep, int64_t max_tokens) {
  MoEConfig c;
  c.hidden = p.H;
  c.ffn = p.F;
  c.experts = p.Eg;
  c.router = p.router;
  c.recipe = r;
  c.max_tokens = max_tokens;
  c.ep_size = ep;
  c.ep_dedup = p.dedup && ep > 1;
  return c;
}

// One rank's outputs (casts: filled by the CPU runs only).
struct Out {
  HostTensor y, dx, dw1, dw2, dgate;
  MoECastCount casts;
};

// Relative RMS difference of two BF16/F32 tensors.
inline double rel_rms(const HostTensor& a, const HostTensor& b) {
  auto val = [](const HostTensor& t, int64_t i) {
    return t.v.dtype == DType::F32
               ? double(reinterpret_cast<const float*>(t.buf.data())[i])
               : double(fmt::bf16_to_f32(reinterpret_cast<const uint16_t*>(t.buf.data())[i]));
  };
  double num = 0, den = 0;
  for (int64_t i = 0; i < a.v.numel(); ++i) {
    const double d = val(a, i) - val(b, i);
    num += d * d;
    den += val(b, i) * val(b, i);
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

// EP outputs vs a reference run over all tokens and experts (ref: one Out with global shapes).
// One rank (N == 1) holds all tokens. bitwise: y, dx, dW1/dW2 slices bit for bit, dgate (the sum
// over ranks) within 1e-5 relative RMS; else everything within `bound`.
inline void compare(const Global& g, const std::vector<Out>& ep, const Out& ref, bool bitwise,
                    double bound) {
  EpProblem p = g.p;
  const int N = static_cast<int>(ep.size());
  if (N == 1) p.T = {p.tg()};
  const int64_t El = p.Eg / N;
  int64_t t0 = 0;
  for (int q = 0; q < N; ++q) {
    SCOPED_TRACE(::testing::Message() << "rank " << q << " of " << N);
    const int64_t T = p.T[q];
    const HostTensor ry = slice_rows(ref.y, t0, T), rdx = slice_rows(ref.dx, t0, T);
    const HostTensor rw1 = slice_rows(ref.dw1, q * El * 2 * p.F, El * 2 * p.F);
    const HostTensor rw2 = slice_rows(ref.dw2, q * El * p.H, El * p.H);
    if (bitwise) {
      EXPECT_TRUE(bytes_equal(ep[q].y, ry)) << "y";
      EXPECT_TRUE(bytes_equal(ep[q].dx, rdx)) << "dx";
      EXPECT_TRUE(bytes_equal(ep[q].dw1, rw1)) << "dw1";
      EXPECT_TRUE(bytes_equal(ep[q].dw2, rw2)) << "dw2";
    } else {
      EXPECT_LT(rel_rms(ep[q].y, ry), bound) << "y";
      EXPECT_LT(rel_rms(ep[q].dx, rdx), bound) << "dx";
      EXPECT_LT(rel_rms(ep[q].dw1, rw1), bound) << "dw1";
      EXPECT_LT(rel_rms(ep[q].dw2, rw2), bound) << "dw2";
    }
    t0 += T;
  }
  // dgate: this rank's tokens' part; the sum over ranks is the single-GPU gradient up to FP32
  // summation order.
  HostTensor sum(DType::F32, p.Eg, p.H, 0);
  for (int q = 0; q < N; ++q)
    for (int64_t i = 0; i < sum.v.numel(); ++i)
      sum.ptr<float>()[i] += reinterpret_cast<const float*>(ep[q].dgate.buf.data())[i];
  EXPECT_LT(rel_rms(sum, ref.dgate), bitwise ? 1e-5 : bound) << "dgate";
}

}  // namespace fp8flow::test::eptest
