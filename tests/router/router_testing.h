// Router test helpers: host/device output bundles, running the op on either backend, an
// independent FP32 selection (sorting, not keys) and an FP64 model of the forward and backward.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include "common/test_util.h"
#include "fp8flow/router.h"

namespace fp8flow::test::router_testing {

inline bool same_bits_or_both_nan(float a, float b) {
  if (std::isnan(a) && std::isnan(b)) return true;
  uint32_t x, y;
  std::memcpy(&x, &a, 4);
  std::memcpy(&y, &b, 4);
  return x == y;
}

// Host outputs of router_forward.
struct HostOut {
  HostTensor idx, w, counts, scores, seq_counts, loss;
  HostOut(int64_t T, int64_t E, const RouterConfig& cfg, bool with_scores = true)
      : idx(DType::I32, T, cfg.top_k),
        w(DType::F32, T, cfg.top_k),
        counts(DType::I32, 1, E),
        scores(DType::F32, with_scores ? T : 0, with_scores ? E : 0),
        seq_counts(DType::I32, cfg.aux_enabled() ? T / cfg.seq_len : 0, E),
        loss(DType::F32, cfg.aux_enabled() ? 1 : 0, 1) {}
  RouterOutputs views() {
    RouterOutputs o;
    o.topk_idx = idx.v;
    o.topk_weight = w.v;
    o.tokens_per_expert = counts.v;
    if (scores.v.rows) o.scores = scores.v;
    if (seq_counts.v.rows || loss.v.rows) o.seq_counts = seq_counts.v;
    if (loss.v.rows) o.aux_loss = loss.v;
    return o;
  }
  int32_t* I() { return idx.ptr<int32_t>(); }
  float* W() { return w.ptr<float>(); }
  int32_t* C() { return counts.ptr<int32_t>(); }
  float* S() { return scores.ptr<float>(); }
  int32_t* SC() { return seq_counts.ptr<int32_t>(); }
  float L() { return loss.ptr<float>()[0]; }
};

inline HostOut run_forward_cpu(const std::vector<float>& logits, int64_t T, int64_t E,
                               const std::vector<float>* bias, const RouterConfig& cfg) {
  HostTensor x = host_from_values(logits, DType::F32, T, E);
  HostTensor b;
  if (bias) b = host_from_values(*bias, DType::F32, 1, E);
  HostOut o(T, E, cfg);
  router_forward(x.v, bias ? b.v : TensorView{}, o.views(), cfg);
  return o;
}

inline std::vector<float> run_backward_cpu(const std::vector<float>& logits, int64_t T, int64_t E,
                                           HostOut& fwd, const std::vector<float>& dw,
                                           const float* d_aux, const RouterConfig& cfg) {
  HostTensor x = host_from_values(logits, DType::F32, T, E);
  HostTensor g = host_from_values(dw, DType::F32, T, cfg.top_k);
  HostTensor da(DType::F32, 1, 1);
  if (d_aux) da.ptr<float>()[0] = *d_aux;
  HostTensor dx(DType::F32, T, E);
  const bool aux = cfg.aux_enabled();
  router_backward(x.v, fwd.idx.v, g.v, aux ? fwd.seq_counts.v : TensorView{},
                  (aux && d_aux) ? da.v : TensorView{}, dx.v, cfg);
  return std::vector<float>(dx.ptr<float>(), dx.ptr<float>() + T * E);
}

// ---------------------------------------------------------------------------------------------
// Independent selection: from FP32 scores (as the op returned them), sort by (value desc, NaN
// last, index asc). Group scores: FP32 sum of the two best values of each group.
inline bool better(float a, int ia, float b, int ib) {
  const bool na = std::isnan(a), nb = std::isnan(b);
  if (na != nb) return nb;
  if (!na && a != b) return a > b;
  return ia < ib;
}

inline std::vector<int> select_sorted(const float* s, const float* bias, int E,
                                      const RouterConfig& cfg) {
  std::vector<float> v(E);
  for (int i = 0; i < E; ++i) v[i] = bias ? s[i] + bias[i] : s[i];
  std::vector<int> cand;
  if (cfg.n_groups > 1) {
    const int gs = E / cfg.n_groups;
    std::vector<float> gscore(cfg.n_groups);
    for (int g = 0; g < cfg.n_groups; ++g) {
      std::vector<int> m(gs);
      std::iota(m.begin(), m.end(), g * gs);
      std::sort(m.begin(), m.end(), [&](int a, int b) { return better(v[a], a, v[b], b); });
      gscore[g] = v[m[0]] + v[m[1]];
    }
    std::vector<int> gi(cfg.n_groups);
    std::iota(gi.begin(), gi.end(), 0);
    std::sort(gi.begin(), gi.end(),
              [&](int a, int b) { return better(gscore[a], a, gscore[b], b); });
    for (int r = 0; r < cfg.topk_groups; ++r)
      for (int i = gi[r] * gs; i < (gi[r] + 1) * gs; ++i) cand.push_back(i);
  } else {
    cand.resize(E);
    std::iota(cand.begin(), cand.end(), 0);
  }
  std::sort(cand.begin(), cand.end(), [&](int a, int b) { return better(v[a], a, v[b], b); });
  cand.resize(cfg.top_k);
  return cand;
}

// ---------------------------------------------------------------------------------------------
// FP64 model with the selection (idx) and the per-sequence counts held fixed.
struct Model64 {
  int64_t T, E;
  RouterConfig cfg;
  std::vector<int32_t> idx;     // [T][k]
  std::vector<int32_t> counts;  // [B][E] (aux)

  std::vector<double> scores(const double* x) const {
    std::vector<double> s(E);
    if (cfg.kind == RouterKind::SigmoidBias) {
      for (int64_t i = 0; i < E; ++i) s[i] = 1.0 / (1.0 + std::exp(-x[i]));
    } else {
      double m = -INFINITY, sum = 0;
      for (int64_t i = 0; i < E; ++i) m = std::max(m, x[i]);
      for (int64_t i = 0; i < E; ++i) sum += (s[i] = std::exp(x[i] - m));
      for (int64_t i = 0; i < E; ++i) s[i] /= sum;
    }
    return s;
  }
  // Weights [T][k].
  std::vector<double> weights(const std::vector<double>& x) const {
    const int k = cfg.top_k;
    std::vector<double> w(T * k);
    for (int64_t t = 0; t < T; ++t) {
      const auto s = scores(&x[t * E]);
      double z = 0;
      for (int j = 0; j < k; ++j) z += s[idx[t * k + j]];
      for (int j = 0; j < k; ++j)
        w[t * k + j] =
            (cfg.renormalize ? s[idx[t * k + j]] / (z + 1e-20) : s[idx[t * k + j]]) * cfg.scaling;
    }
    return w;
  }
  double aux_loss(const std::vector<double>& x) const {
    const int64_t S = cfg.seq_len, B = T / S;
    double total = 0;
    for (int64_t b = 0; b < B; ++b) {
      std::vector<double> P(E, 0.0);
      for (int64_t t = b * S; t < (b + 1) * S; ++t) {
        const auto s = scores(&x[t * E]);
        const double r = std::accumulate(s.begin(), s.end(), 0.0) + 1e-20;
        for (int64_t i = 0; i < E; ++i) P[i] += s[i] / r / S;
      }
      for (int64_t i = 0; i < E; ++i)
        total += double(E) / (double(cfg.top_k) * S) * counts[b * E + i] * P[i];
    }
    return cfg.aux_alpha * total / B;
  }
  // L = sum dw * w + d_aux * aux.
  double objective(const std::vector<double>& x, const std::vector<float>& dw, double d_aux) const {
    const auto w = weights(x);
    double L = 0;
    for (size_t i = 0; i < w.size(); ++i) L += dw[i] * w[i];
    if (cfg.aux_enabled()) L += d_aux * aux_loss(x);
    return L;
  }
  // Analytic gradient of objective. `scale` (optional) gets s_i * (|ds_i| + 2 max_i' |ds_i'|) per
  // element, ds = d objective / d scores: the magnitude FP32 rounding errors scale with (the
  // sigmoid's 1 - s cancels, softmax's ds_i - dot cancels, ds inherits the row's roundings).
  std::vector<double> grad(const std::vector<double>& x, const std::vector<float>& dw, double d_aux,
                           std::vector<double>* scale = nullptr) const {
    const int k = cfg.top_k;
    const bool aux = cfg.aux_enabled();
    const int64_t S = aux ? cfg.seq_len : 1;
    std::vector<double> dx(T * E);
    for (int64_t t = 0; t < T; ++t) {
      const auto s = scores(&x[t * E]);
      std::vector<double> ds(E, 0.0);
      double z = 0;
      for (int j = 0; j < k; ++j) z += s[idx[t * k + j]];
      const double D = z + 1e-20;
      double dot = 0;
      for (int j = 0; j < k; ++j) dot += dw[t * k + j] * cfg.scaling * s[idx[t * k + j]] / D;
      for (int j = 0; j < k; ++j) {
        const double g = dw[t * k + j] * cfg.scaling;
        ds[idx[t * k + j]] += cfg.renormalize ? (g - dot) / D : g;
      }
      if (aux) {
        const double r = std::accumulate(s.begin(), s.end(), 0.0) + 1e-20;
        const double coef = d_aux * cfg.aux_alpha / double(T);
        std::vector<double> a(E);
        double da = 0;
        for (int64_t i = 0; i < E; ++i) {
          a[i] = coef * double(E) / (double(k) * S) * counts[(t / S) * E + i];
          da += a[i] * s[i] / r;
        }
        for (int64_t i = 0; i < E; ++i) ds[i] += (a[i] - da) / r;
      }
      if (scale) {
        scale->resize(T * E);
        double rmax = 0;
        for (int64_t i = 0; i < E; ++i) rmax = std::max(rmax, std::fabs(ds[i]));
        for (int64_t i = 0; i < E; ++i) (*scale)[t * E + i] = s[i] * (std::fabs(ds[i]) + 2 * rmax);
      }
      if (cfg.kind == RouterKind::SigmoidBias) {
        for (int64_t i = 0; i < E; ++i) dx[t * E + i] = ds[i] * s[i] * (1 - s[i]);
      } else {
        double d = 0;
        for (int64_t i = 0; i < E; ++i) d += ds[i] * s[i];
        for (int64_t i = 0; i < E; ++i) dx[t * E + i] = s[i] * (ds[i] - d);
      }
    }
    return dx;
  }
};

inline Model64 model_from(const HostOut& o_const, int64_t T, int64_t E, const RouterConfig& cfg) {
  HostOut& o = const_cast<HostOut&>(o_const);
  Model64 m{T, E, cfg, {}, {}};
  m.idx.assign(o.I(), o.I() + T * cfg.top_k);
  if (cfg.aux_enabled()) m.counts.assign(o.SC(), o.SC() + (T / cfg.seq_len) * E);
  return m;
}

inline std::vector<double> to_f64(const std::vector<float>& v) {
  return std::vector<double>(v.begin(), v.end());
}

// Random logits: N(0, sd), optionally quantized to a few levels (many exact ties).
inline std::vector<float> random_logits(int64_t T, int64_t E, uint64_t seed, float sd = 2.0f,
                                        int levels = 0) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.f, sd);
  std::vector<float> x(T * E);
  for (auto& v : x) {
    v = nd(rng);
    if (levels > 0) v = std::round(v * levels / 4.0f) / (levels / 4.0f);
  }
  return x;
}

inline std::vector<float> random_bias(int64_t E, uint64_t seed, float sd = 0.1f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.f, sd);
  std::vector<float> b(E);
  for (auto& v : b) v = nd(rng);
  return b;
}

// Adversarial ties (fill 0..3): logits of one or two levels per unit (most equal); rows with at
// most k finite logits of a few integer values, the rest NaN (NaN keys selected, tied); rows of
// -Inf, +Inf, 0 and NaN (saturated sigmoids, NaN softmax rows).
inline std::vector<float> tie_logits(int64_t T, int64_t E, int k, int fill, uint64_t seed) {
  if (fill < 2) return random_logits(T, E, seed, 2.0f, fill + 1);
  std::mt19937_64 rng(seed);
  std::vector<float> x(T * E, 0.0f);
  const float pool[4] = {-INFINITY, INFINITY, 0.0f, NAN};
  for (int64_t t = 0; t < T; ++t) {
    const int64_t finite = static_cast<int64_t>(rng() % (k + 1));
    for (int64_t e = 0; e < E; ++e) {
      float v = pool[rng() % 4];
      if (fill == 2) v = e < finite ? float(int(rng() % 5) - 2) : NAN;
      x[t * E + e] = v;
    }
    if (fill == 2) std::shuffle(x.begin() + t * E, x.begin() + (t + 1) * E, rng);
  }
  return x;
}

// A bias of two values (0 and 0.25): equal selection values across lanes and groups.
inline std::vector<float> tie_bias(int64_t E, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<float> b(E);
  for (auto& v : b) v = (rng() % 2) ? 0.25f : 0.0f;
  return b;
}

}  // namespace fp8flow::test::router_testing
