// CPU reference backend of router_forward / router_backward: the definition the CUDA kernels are
// tested against bit for bit. One token row at a time, plain loops; every FP32 operation goes
// through hd:: in the order router_math.h fixes.
#include <algorithm>
#include <array>
#include <cstring>
#include <vector>

#include "ops/router/router_backends.h"

namespace fp8flow::ref {
namespace {

using namespace fp8flow::router;

using Row = std::array<float, kMaxExperts>;

// Stride-doubling pairwise tree over v[0, n) (in place): level l adds v[i + 2^l] into v[i] for i a
// multiple of 2^(l+1) with i + 2^l < n.
float tree_sum(float* v, int64_t n) {
  for (int64_t s = 1; s < n; s *= 2)
    for (int64_t i = 0; i + s < n; i += 2 * s) v[i] = hd::add(v[i], v[i + s]);
  return n > 0 ? v[0] : 0.0f;
}

// Row sum over the 8 * G padded slots (slots >= E are +0): the kernels' lane tree.
float row_sum(Row v, int E, int slots) {
  for (int i = E; i < slots; ++i) v[i] = 0.0f;
  return tree_sum(v.data(), slots);
}

// Scores s [E] of one token from its logits (slots >= E set to +0).
void row_scores(const float* x, int E, int slots, RouterKind kind, Row& s) {
  if (kind == RouterKind::SigmoidBias) {
    for (int i = 0; i < E; ++i) s[i] = hd::sigmoid(x[i]);
  } else {
    Row m;  // max over the padded slots (pads NaN, ignored), same tree as the sums
    for (int i = 0; i < slots; ++i) m[i] = i < E ? x[i] : fmt::f32_from_bits(0x7FC00000u);
    for (int st = 1; st < slots; st *= 2)
      for (int i = 0; i + st < slots; i += 2 * st) m[i] = max_num(m[i], m[i + st]);
    for (int i = 0; i < E; ++i) s[i] = hd::exp(hd::sub(x[i], m[0]));
    const float sum = row_sum(s, E, slots);
    for (int i = 0; i < E; ++i) s[i] = hd::div(s[i], sum);
  }
  for (int i = E; i < slots; ++i) s[i] = 0.0f;
}

// Index of the largest key (ties: lowest index).
int argmax_key(const uint32_t* key, int n) {
  int best = 0;
  for (int i = 1; i < n; ++i)
    if (key[i] > key[best]) best = i;
  return best;
}

struct Selection {
  int idx[kRouterMaxTopK];
  float score[kRouterMaxTopK];
  float denom;  // sum of the selected scores + eps
};

Selection select_row(const Row& s, const float* bias, int E, const RouterConfig& cfg) {
  uint32_t key[kMaxExperts];
  for (int i = 0; i < E; ++i) key[i] = sel_key(bias ? hd::add(s[i], bias[i]) : s[i]);
  if (cfg.n_groups > 1) {
    const int gsize = E / cfg.n_groups;
    uint32_t gkey[kMaxExperts];
    for (int g = 0; g < cfg.n_groups; ++g) {
      Top2 t;
      for (int i = g * gsize; i < (g + 1) * gsize; ++i) t = top2_push(t, key[i]);
      gkey[g] = group_key(t);
    }
    bool keep[kMaxExperts] = {};
    for (int r = 0; r < cfg.topk_groups; ++r) {
      const int g = argmax_key(gkey, cfg.n_groups);
      keep[g] = true;
      gkey[g] = kKeyNone;
    }
    for (int i = 0; i < E; ++i)
      if (!keep[i / gsize]) key[i] = kKeyNone;
  }
  Selection sel;
  for (int j = 0; j < cfg.top_k; ++j) {
    const int e = argmax_key(key, E);
    sel.idx[j] = e;
    sel.score[j] = s[e];
    key[e] = kKeyNone;
  }
  float z = sel.score[0];
  for (int j = 1; j < cfg.top_k; ++j) z = hd::add(z, sel.score[j]);
  sel.denom = hd::add(z, kNormEps);
  return sel;
}

}  // namespace

void router_forward(const TensorView& logits, const TensorView& bias, const RouterOutputs& out,
                    const RouterConfig& cfg) {
  const int64_t T = logits.rows;
  const int E = static_cast<int>(logits.cols);
  const int k = cfg.top_k;
  const int slots = kSlots * lanes_for(E);
  const float* X = logits.ptr<const float>();
  const float* b = bias.data ? bias.ptr<const float>() : nullptr;
  int32_t* idx = out.topk_idx.ptr<int32_t>();
  float* w = out.topk_weight.ptr<float>();
  float* scores = out.scores.data ? out.scores.ptr<float>() : nullptr;
  int32_t* counts = out.tokens_per_expert.ptr<int32_t>();
  std::fill(counts, counts + E, 0);

  const bool aux = cfg.aux_enabled();
  const int64_t S = aux ? cfg.seq_len : 1;
  const int64_t B = aux ? T / S : 0;
  const int64_t runs = (S + kRunTokens - 1) / kRunTokens;
  int32_t* seq_counts = aux ? out.seq_counts.ptr<int32_t>() : nullptr;
  if (aux) std::fill(seq_counts, seq_counts + B * E, 0);
  std::vector<float> run_sums(aux ? static_cast<size_t>(runs) * E : 0);  // [run][E], one sequence
  std::vector<float> seq_loss(static_cast<size_t>(B));
  std::vector<float> column(static_cast<size_t>(runs));
  std::vector<float> terms(static_cast<size_t>(E));

  Row s;
  for (int64_t t = 0; t < T; ++t) {
    row_scores(X + t * E, E, slots, cfg.kind, s);
    if (scores)
      for (int i = 0; i < E; ++i) scores[t * E + i] = canon(s[i]);
    const Selection sel = select_row(s, b, E, cfg);
    for (int j = 0; j < k; ++j) {
      idx[t * k + j] = sel.idx[j];
      w[t * k + j] = canon(topk_weight(sel.score[j], sel.denom, cfg.renormalize, cfg.scaling));
      ++counts[sel.idx[j]];
      if (aux) ++seq_counts[(t / S) * E + sel.idx[j]];
    }
    if (!aux) continue;

    // Normalized scores into this token's run (sequential in token order, from +0).
    const int64_t pos = t % S;
    float* run = run_sums.data() + (pos / kRunTokens) * E;
    if (pos % kRunTokens == 0) std::fill(run, run + E, 0.0f);
    const float denom = hd::add(row_sum(s, E, slots), kNormEps);
    for (int i = 0; i < E; ++i) run[i] = hd::add(run[i], hd::div(s[i], denom));
    if (pos != S - 1) continue;

    // Sequence complete: P_i = tree over runs / S, f_i, loss_b = tree_i f_i * P_i.
    const int64_t bseq = t / S;
    const float fscale = hd::div(static_cast<float>(E), static_cast<float>(int64_t{k} * S));
    for (int i = 0; i < E; ++i) {
      for (int64_t r = 0; r < runs; ++r) column[r] = run_sums[r * E + i];
      const float p = hd::div(tree_sum(column.data(), runs), static_cast<float>(S));
      const float f = hd::mul(static_cast<float>(seq_counts[bseq * E + i]), fscale);
      terms[i] = hd::mul(f, p);
    }
    seq_loss[bseq] = tree_sum(terms.data(), E);
  }
  if (aux) {
    const float total = tree_sum(seq_loss.data(), B);
    out.aux_loss.ptr<float>()[0] =
        B > 0 ? canon(hd::mul(cfg.aux_alpha, hd::div(total, static_cast<float>(B)))) : 0.0f;
  }
}

void router_backward(const TensorView& logits, const TensorView& topk_idx,
                     const TensorView& d_topk_weight, const TensorView& seq_counts,
                     const TensorView& d_aux_loss, const TensorView& d_logits,
                     const RouterConfig& cfg) {
  const int64_t T = logits.rows;
  const int E = static_cast<int>(logits.cols);
  const int k = cfg.top_k;
  const int slots = kSlots * lanes_for(E);
  const float* X = logits.ptr<const float>();
  const int32_t* idx = topk_idx.ptr<const int32_t>();
  const float* dw = d_topk_weight.ptr<const float>();
  float* dx = d_logits.ptr<float>();

  const bool aux = cfg.aux_enabled() && d_aux_loss.data != nullptr;
  const int64_t S = aux ? cfg.seq_len : 1;
  float coef_aux = 0.0f, fscale = 0.0f;
  if (aux) {
    coef_aux =
        hd::div(hd::mul(d_aux_loss.ptr<const float>()[0], cfg.aux_alpha), static_cast<float>(T));
    fscale = hd::div(static_cast<float>(E), static_cast<float>(int64_t{k} * S));
  }

  Row s, ds, tmp;
  for (int64_t t = 0; t < T; ++t) {
    row_scores(X + t * E, E, slots, cfg.kind, s);
    ds.fill(0.0f);

    // Through the weights: w_j = s_ej / D * scaling (or s_ej * scaling).
    float z[kRouterMaxTopK], g[kRouterMaxTopK], coef[kRouterMaxTopK];
    int e[kRouterMaxTopK];
    for (int j = 0; j < k; ++j) {
      e[j] = idx[t * k + j];
      z[j] = (e[j] >= 0 && e[j] < E) ? s[e[j]] : 0.0f;
      g[j] = hd::mul(dw[t * k + j], cfg.scaling);
    }
    if (cfg.renormalize) {
      float zs = z[0];
      for (int j = 1; j < k; ++j) zs = hd::add(zs, z[j]);
      const float D = hd::add(zs, kNormEps);
      float dot = hd::mul(g[0], hd::div(z[0], D));
      for (int j = 1; j < k; ++j) dot = hd::add(dot, hd::mul(g[j], hd::div(z[j], D)));
      for (int j = 0; j < k; ++j) coef[j] = hd::div(hd::sub(g[j], dot), D);
    } else {
      for (int j = 0; j < k; ++j) coef[j] = g[j];
    }
    for (int j = 0; j < k; ++j)
      if (e[j] >= 0 && e[j] < E) ds[e[j]] = hd::add(ds[e[j]], coef[j]);

    // Through the aux loss: d/d shat_i = a_i, shat_i = s_i / Dr.
    if (aux) {
      const int32_t* c = seq_counts.ptr<const int32_t>() + (t / S) * E;
      const float Dr = hd::add(row_sum(s, E, slots), kNormEps);
      float a[kMaxExperts];
      for (int i = 0; i < E; ++i) {
        a[i] = hd::mul(coef_aux, hd::mul(static_cast<float>(c[i]), fscale));
        tmp[i] = hd::mul(a[i], hd::div(s[i], Dr));
      }
      const float dot = row_sum(tmp, E, slots);
      for (int i = 0; i < E; ++i) ds[i] = hd::add(ds[i], hd::div(hd::sub(a[i], dot), Dr));
    }

    // Through sigmoid / softmax.
    float* out = dx + t * E;
    if (cfg.kind == RouterKind::SigmoidBias) {
      for (int i = 0; i < E; ++i)
        out[i] = canon(hd::mul(ds[i], hd::mul(s[i], hd::sub(1.0f, s[i]))));
    } else {
      for (int i = 0; i < E; ++i) tmp[i] = hd::mul(ds[i], s[i]);
      const float dot = row_sum(tmp, E, slots);
      for (int i = 0; i < E; ++i) out[i] = canon(hd::mul(s[i], hd::sub(ds[i], dot)));
    }
  }
}

}  // namespace fp8flow::ref
