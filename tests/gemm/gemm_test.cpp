// Grouped GEMMs and transpose_block_weights: the CPU reference against an independent path
// (fp8flow::dequantize + a plain FP64 matmul), the argument checks, and (on a GPU) the cuBLASLt
// backend against the CPU reference. GPU results differ from the FP64 reference by FP32
// accumulation order (and Hopper's FP8 tensor-core accumulation inside each 128-K block), so they
// are compared per output row by relative error: ||got - ref|| / ||ref|| < 1e-2 for BF16 outputs
// (BF16 rounding is ~2^-9), < 1e-3 for F32 outputs. NaN positions must match exactly.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include "common/ref_access.h"
#include "common/test_util.h"
#include "fp8flow/gemm.h"
#if FP8FLOW_WITH_CUDA
#include "ops/gemm/own_fprop.h"
#include "ops/gemm/own_wgrad.h"
#endif

namespace fp8flow::test {
namespace {

constexpr double kTolBf16 = 1e-2;
constexpr double kTolF32 = 1e-3;

double tol_for(DType d) {
  return d == DType::BF16 ? kTolBf16 : kTolF32;
}

// A quantized tensor on the host owning its storage. Never copied (HostTensor views point into
// their own buffer), only moved.
struct HostQ {
  HostTensor data, scale;
  ScaleLayout layout = ScaleLayout::Rowwise1x128;
  std::vector<int64_t> groups;
  ScaledTensor view() const { return ScaledTensor{data.v, scale.v, layout, groups}; }
};

HostQ make_q(DType d, ScaleLayout layout, int64_t rows, int64_t cols,
             std::vector<int64_t> groups = {}) {
  HostQ q;
  q.layout = layout;
  q.groups = std::move(groups);
  q.data = HostTensor(d, rows, cols);
  const Shape2D s = scale_shape(layout, rows, cols, q.groups);
  q.scale = HostTensor(DType::F32, s.rows, s.cols);
  return q;
}

// Row-wise (1x128) quantized copy of x [rows][cols].
HostQ quant_rows(const std::vector<float>& x, int64_t rows, int64_t cols, DType d = DType::E4M3) {
  const HostTensor in = host_from_values(x, DType::F32, rows, cols);
  HostQ q = make_q(d, ScaleLayout::Rowwise1x128, rows, cols);
  quantize(in.v, q.view());
  return q;
}

// 128x128-block quantized weight [rows][cols].
HostQ quant_block(const std::vector<float>& x, int64_t rows, int64_t cols, DType d = DType::E4M3) {
  const HostTensor in = host_from_values(x, DType::F32, rows, cols);
  HostQ q = make_q(d, ScaleLayout::Block128x128, rows, cols);
  quantize(in.v, q.view());
  return q;
}

// Column-wise (128x1 along tokens) copy of x [M][K], stored transposed [K][M], tiles per group.
HostQ quant_cols(const std::vector<float>& x, int64_t M, int64_t K,
                 const std::vector<int64_t>& groups, DType d = DType::E4M3) {
  const HostTensor in = host_from_values(x, DType::F32, M, K);
  HostQ q = make_q(d, ScaleLayout::Rowwise1x128, K, M, groups);
  quantize_transposed(in.v, q.view());
  return q;
}

HostQ transposed_weights(const HostQ& w) {
  HostQ t = make_q(w.data.v.dtype, ScaleLayout::Block128x128, w.data.v.cols, w.data.v.rows);
  transpose_block_weights(w.view(), t.view());
  return t;
}

// Values the tensor represents (fp8flow::dequantize), as FP64, row-major.
std::vector<double> values(const HostQ& q) {
  HostTensor out(DType::F32, q.data.v.rows, q.data.v.cols);
  dequantize(q.view(), out.v);
  return std::vector<double>(out.ptr<float>(), out.ptr<float>() + out.v.numel());
}

std::vector<double> values(const HostTensor& t) {
  std::vector<double> v(static_cast<size_t>(t.v.numel()));
  for (int64_t r = 0; r < t.v.rows; ++r)
    for (int64_t c = 0; c < t.v.cols; ++c)
      v[static_cast<size_t>(r * t.v.cols + c)] = ref::load_f32(t.v, r, c);
  return v;
}

std::vector<ScaledTensor> views(const std::vector<HostQ>& qs) {
  std::vector<ScaledTensor> v;
  for (const HostQ& q : qs) v.push_back(q.view());
  return v;
}
std::vector<TensorView> views(const std::vector<HostTensor>& ts) {
  std::vector<TensorView> v;
  for (const HostTensor& t : ts) v.push_back(t.v);
  return v;
}

std::vector<int64_t> starts_of(const std::vector<int64_t>& splits) {
  std::vector<int64_t> s(splits.size() + 1, 0);
  std::partial_sum(splits.begin(), splits.end(), s.begin() + 1);
  return s;
}

// Worst per-row relative error of got rows [r0, r1) against ref(r, c); NaN/Inf must match.
template <typename RefFn>
::testing::AssertionResult rows_close(const TensorView& got, RefFn ref, int64_t r0, int64_t r1,
                                      double tol) {
  double worst = 0;
  int64_t worst_row = -1;
  for (int64_t r = r0; r < r1; ++r) {
    double err = 0, nrm = 0;
    for (int64_t c = 0; c < got.cols; ++c) {
      const double g = ref::load_f32(got, r, c), e = ref(r, c);
      if (!std::isfinite(g) || !std::isfinite(e)) {
        const bool same = (std::isnan(g) && std::isnan(e)) || g == e;
        if (!same)
          return ::testing::AssertionFailure()
                 << "non-finite mismatch at (" << r << ", " << c << "): got " << g << ", ref " << e;
        continue;
      }
      err += (g - e) * (g - e);
      nrm += e * e;
    }
    const double rel = nrm > 0 ? std::sqrt(err / nrm) : (err > 0 ? INFINITY : 0.0);
    if (rel > worst) worst = rel, worst_row = r;
  }
  if (worst <= tol) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "row " << worst_row << ": relative error " << worst << " > " << tol;
}

// Plain FP64 references from dequantized values.
// fprop: y[m][n] = sum_k x[m][k] w_e[n][k].
std::vector<double> naive_fprop(const std::vector<double>& x,
                                const std::vector<std::vector<double>>& w,
                                const std::vector<int64_t>& splits, int64_t N, int64_t K) {
  const std::vector<int64_t> s = starts_of(splits);
  std::vector<double> y(static_cast<size_t>(s.back() * N), 0.0);
  for (size_t e = 0; e < splits.size(); ++e)
    for (int64_t m = s[e]; m < s[e + 1]; ++m)
      for (int64_t n = 0; n < N; ++n) {
        double acc = 0;
        for (int64_t k = 0; k < K; ++k)
          acc += x[static_cast<size_t>(m * K + k)] * w[e][static_cast<size_t>(n * K + k)];
        y[static_cast<size_t>(m * N + n)] = acc;
      }
  return y;
}
// dgrad: dx[m][k] = sum_n dy[m][n] w_e[n][k].
std::vector<double> naive_dgrad(const std::vector<double>& dy,
                                const std::vector<std::vector<double>>& w,
                                const std::vector<int64_t>& splits, int64_t N, int64_t K) {
  const std::vector<int64_t> s = starts_of(splits);
  std::vector<double> dx(static_cast<size_t>(s.back() * K), 0.0);
  for (size_t e = 0; e < splits.size(); ++e)
    for (int64_t m = s[e]; m < s[e + 1]; ++m)
      for (int64_t k = 0; k < K; ++k) {
        double acc = 0;
        for (int64_t n = 0; n < N; ++n)
          acc += dy[static_cast<size_t>(m * N + n)] * w[e][static_cast<size_t>(n * K + k)];
        dx[static_cast<size_t>(m * K + k)] = acc;
      }
  return dx;
}
// wgrad from token-major values dy [M][N], x [M][K]: dw_e[n][k] = sum_{m in e} dy[m][n] x[m][k].
std::vector<std::vector<double>> naive_wgrad(const std::vector<double>& dy,
                                             const std::vector<double>& x,
                                             const std::vector<int64_t>& splits, int64_t N,
                                             int64_t K) {
  const std::vector<int64_t> s = starts_of(splits);
  std::vector<std::vector<double>> dw(splits.size(),
                                      std::vector<double>(static_cast<size_t>(N * K), 0.0));
  for (size_t e = 0; e < splits.size(); ++e)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) {
        double acc = 0;
        for (int64_t m = s[e]; m < s[e + 1]; ++m)
          acc += dy[static_cast<size_t>(m * N + n)] * x[static_cast<size_t>(m * K + k)];
        dw[e][static_cast<size_t>(n * K + k)] = acc;
      }
  return dw;
}
// [R][C] -> [C][R].
std::vector<double> transpose(const std::vector<double>& a, int64_t R, int64_t C) {
  std::vector<double> t(a.size());
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c)
      t[static_cast<size_t>(c * R + r)] = a[static_cast<size_t>(r * C + c)];
  return t;
}

// A small MoE problem: E experts, weights [N][K], activations [M][K], output grads [M][N].
struct Problem {
  int64_t N, K;
  std::vector<int64_t> splits;
  int64_t M() const { return std::accumulate(splits.begin(), splits.end(), int64_t{0}); }
  size_t E() const { return splits.size(); }
};

std::vector<HostQ> make_weights(const Problem& p, uint64_t seed, DType d = DType::E4M3) {
  std::vector<HostQ> w;
  for (size_t e = 0; e < p.E(); ++e)
    w.push_back(quant_block(make_values(p.N, p.K, Fill::Normal, seed + e), p.N, p.K, d));
  return w;
}

const Problem kSmall{384, 256, {0, 144, 64}};

// ---------------------------------------------------------------------------------------------
// CPU reference.

TEST(GemmRef, FpropMatchesDequantizedMatmul) {
  for (const Problem& p : {kSmall, Problem{336, 208, {32, 0, 48}}}) {
    const HostQ x = quant_rows(make_values(p.M(), p.K, Fill::Normal, 1), p.M(), p.K);
    const std::vector<HostQ> w = make_weights(p, 10);
    std::vector<std::vector<double>> wv;
    for (const HostQ& q : w) wv.push_back(values(q));
    const std::vector<double> want = naive_fprop(values(x), wv, p.splits, p.N, p.K);
    for (DType od : {DType::F32, DType::BF16}) {
      HostTensor y(od, p.M(), p.N);
      grouped_gemm_fprop(x.view(), views(w), y.v, p.splits, {});
      // Same FP64 sums in the same order: equal up to the output rounding.
      EXPECT_TRUE(rows_close(
          y.v, [&](int64_t r, int64_t c) { return want[r * p.N + c]; }, 0, p.M(),
          od == DType::F32 ? 1e-7 : 4e-3));
    }
  }
}

TEST(GemmRef, TransposeBlockWeightsIsExact) {
  for (auto [N, K] : {std::pair<int64_t, int64_t>{272, 400}, {128, 128}, {16, 48}}) {
    const HostQ w = quant_block(make_values(N, K, Fill::WideRange, 3), N, K);
    const HostQ t = transposed_weights(w);
    EXPECT_EQ(values(t), transpose(values(w), N, K));
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k)
        ASSERT_EQ(ref::byte_at(t.data.v, k, n), ref::byte_at(w.data.v, n, k));
  }
}

TEST(GemmRef, DgradWithTransposedWeightsMatchesMatmul) {
  const Problem p = kSmall;
  const HostQ dy = quant_rows(make_values(p.M(), p.N, Fill::Normal, 2), p.M(), p.N);
  const std::vector<HostQ> w = make_weights(p, 20);
  std::vector<HostQ> wt;
  std::vector<std::vector<double>> wv;
  for (const HostQ& q : w) wt.push_back(transposed_weights(q)), wv.push_back(values(q));
  const std::vector<double> want = naive_dgrad(values(dy), wv, p.splits, p.N, p.K);
  HostTensor dx(DType::F32, p.M(), p.K);
  grouped_gemm_dgrad(dy.view(), views(wt), dx.v, p.splits, {});
  EXPECT_TRUE(rows_close(
      dx.v, [&](int64_t r, int64_t c) { return want[r * p.K + c]; }, 0, p.M(), 1e-7));
}

TEST(GemmRef, WgradMatchesMatmulAndZeroesEmptyExperts) {
  const Problem p{384, 256, {0, 144, 64, 0}};
  const std::vector<float> dyv = make_values(p.M(), p.N, Fill::Normal, 4);
  const std::vector<float> xv = make_values(p.M(), p.K, Fill::Normal, 5);
  const HostQ dy_t = quant_cols(dyv, p.M(), p.N, p.splits);
  const HostQ x_t = quant_cols(xv, p.M(), p.K, p.splits);
  const auto want = naive_wgrad(transpose(values(dy_t), p.N, p.M()),
                                transpose(values(x_t), p.K, p.M()), p.splits, p.N, p.K);
  std::vector<HostTensor> dw;
  for (size_t e = 0; e < p.E(); ++e) dw.emplace_back(DType::F32, p.N, p.K);  // poisoned 0xA5
  grouped_gemm_wgrad(dy_t.view(), x_t.view(), views(dw), p.splits, {});
  for (size_t e = 0; e < p.E(); ++e) {
    SCOPED_TRACE(e);
    EXPECT_TRUE(rows_close(
        dw[e].v, [&](int64_t r, int64_t c) { return want[e][r * p.K + c]; }, 0, p.N, 1e-7));
    if (p.splits[e] == 0)
      EXPECT_TRUE(std::all_of(dw[e].ptr<float>(), dw[e].ptr<float>() + p.N * p.K,
                              [](float v) { return v == 0.f; }));
  }
}

TEST(GemmRef, AccumulateAddsToTheOldOutput) {
  const Problem p{128, 128, {16, 0, 32}};
  const HostQ dy_t = quant_cols(make_values(p.M(), p.N, Fill::Normal, 6), p.M(), p.N, p.splits);
  const HostQ x_t = quant_cols(make_values(p.M(), p.K, Fill::Normal, 7), p.M(), p.K, p.splits);
  std::vector<HostTensor> fresh, acc;
  std::vector<std::vector<float>> old;
  for (size_t e = 0; e < p.E(); ++e) {
    fresh.emplace_back(DType::F32, p.N, p.K);
    old.push_back(make_values(p.N, p.K, Fill::Normal, 100 + e));
    acc.push_back(host_from_values(old.back(), DType::F32, p.N, p.K));
  }
  grouped_gemm_wgrad(dy_t.view(), x_t.view(), views(fresh), p.splits, {});
  grouped_gemm_wgrad(dy_t.view(), x_t.view(), views(acc), p.splits, {}, {.accumulate = true});
  for (size_t e = 0; e < p.E(); ++e) {
    SCOPED_TRACE(e);
    // acc rounds old + sum once; old + fresh rounds twice: equal to FP32 precision.
    EXPECT_TRUE(rows_close(
        acc[e].v,
        [&](int64_t r, int64_t c) {
          return static_cast<double>(old[e][r * p.K + c]) + ref::load_f32(fresh[e].v, r, c);
        },
        0, p.N, 1e-6));
    if (p.splits[e] == 0)  // nothing to add: unchanged, bit for bit
      for (int64_t i = 0; i < p.N * p.K; ++i) ASSERT_EQ(acc[e].ptr<float>()[i], old[e][i]);
  }
}

TEST(GemmRef, NaNPropagatesThroughRowsAndColumns) {
  const Problem p = kSmall;
  HostQ x = quant_rows(make_values(p.M(), p.K, Fill::Normal, 8), p.M(), p.K);
  std::vector<HostQ> w = make_weights(p, 30);
  ref::byte_at(x.data.v, 150, 7) = 0x7F;     // expert 2, row 150: NaN in every output column
  ref::byte_at(w[2].data.v, 5, 200) = 0xFF;  // expert 2, weight row 5: NaN in output column 5
  HostTensor y(DType::BF16, p.M(), p.N);
  grouped_gemm_fprop(x.view(), views(w), y.v, p.splits, {});
  for (int64_t m = 0; m < p.M(); ++m)
    for (int64_t n = 0; n < p.N; ++n) {
      const bool nan = std::isnan(ref::load_f32(y.v, m, n));
      const bool want = m == 150 || (m >= 144 && n == 5);
      ASSERT_EQ(nan, want) << m << ", " << n;
    }
}

TEST(GemmRef, Bf16VariantsMatchMatmul) {
  const Problem p{64, 48, {0, 130, 2, 64}};  // any M_e for BF16
  const std::vector<float> xv = make_values(p.M(), p.K, Fill::Normal, 9);
  const std::vector<float> dyv = make_values(p.M(), p.N, Fill::Normal, 10);
  const HostTensor x = host_from_values(xv, DType::BF16, p.M(), p.K);
  const HostTensor dy = host_from_values(dyv, DType::BF16, p.M(), p.N);
  std::vector<HostTensor> w;
  std::vector<std::vector<double>> wv;
  for (size_t e = 0; e < p.E(); ++e) {
    w.push_back(
        host_from_values(make_values(p.N, p.K, Fill::Normal, 40 + e), DType::BF16, p.N, p.K));
    wv.push_back(values(w.back()));
  }
  const auto yw = naive_fprop(values(x), wv, p.splits, p.N, p.K);
  const auto dxw = naive_dgrad(values(dy), wv, p.splits, p.N, p.K);
  const auto dww = naive_wgrad(values(dy), values(x), p.splits, p.N, p.K);
  HostTensor y(DType::F32, p.M(), p.N), dx(DType::F32, p.M(), p.K);
  std::vector<HostTensor> dw;
  for (size_t e = 0; e < p.E(); ++e) dw.emplace_back(DType::F32, p.N, p.K);
  grouped_gemm_fprop_bf16(x.v, views(w), y.v, p.splits, {});
  grouped_gemm_dgrad_bf16(dy.v, views(w), dx.v, p.splits, {});
  grouped_gemm_wgrad_bf16(dy.v, x.v, views(dw), p.splits, {});
  EXPECT_TRUE(rows_close(
      y.v, [&](int64_t r, int64_t c) { return yw[r * p.N + c]; }, 0, p.M(), 1e-7));
  EXPECT_TRUE(rows_close(
      dx.v, [&](int64_t r, int64_t c) { return dxw[r * p.K + c]; }, 0, p.M(), 1e-7));
  for (size_t e = 0; e < p.E(); ++e)
    EXPECT_TRUE(rows_close(
        dw[e].v, [&](int64_t r, int64_t c) { return dww[e][r * p.K + c]; }, 0, p.N, 1e-7));
}

TEST(GemmWorkspace, PureFunctionOfShape) {
  const std::vector<int64_t> s{0, 144, 64};
  const size_t lanes4 = 4 * (size_t{8} << 20);
  EXPECT_EQ(grouped_gemm_workspace_bytes(GroupedGemmKind::Bf16Fprop, 384, 256, s), lanes4);
  EXPECT_EQ(grouped_gemm_workspace_bytes(GroupedGemmKind::Fp8Wgrad, 384, 256, s), lanes4);
  EXPECT_EQ(grouped_gemm_workspace_bytes(GroupedGemmKind::Bf16Wgrad, 384, 256, s, {.streams = 1}),
            size_t{8} << 20);
  // fprop, K = 256: packed scales 2 x 144 and 2 x 64 floats (each rounded up to 256 bytes), plus
  // weight scales with 2 K blocks padded to 4: 3 experts x 3 x 4 floats (256 bytes each).
  EXPECT_EQ(grouped_gemm_workspace_bytes(GroupedGemmKind::Fp8Fprop, 384, 256, s),
            lanes4 + 0 + 1280 + 512 + 3 * 256);
  // dgrad contracts over N = 384 (3 blocks, padded to 4); K = 256 gives 2 weight block rows.
  EXPECT_EQ(grouped_gemm_workspace_bytes(GroupedGemmKind::Fp8Dgrad, 384, 256, s),
            lanes4 + 0 + 1792 + 768 + 3 * 256);
  // K = 512: 4 blocks, no weight padding.
  EXPECT_EQ(grouped_gemm_workspace_bytes(GroupedGemmKind::Fp8Fprop, 384, 512, s),
            lanes4 + 0 + 2304 + 1024);
}

// ---------------------------------------------------------------------------------------------
// Argument checks: every bad input raises fp8flow::Error naming the op and the argument.

template <typename F>
void expect_error(F&& f, const std::string& op, const std::string& arg) {
  try {
    f();
    ADD_FAILURE() << "no error (expected one naming " << op << " / " << arg << ")";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("fp8flow::" + op + ":"), std::string::npos) << msg;
    EXPECT_NE(msg.find(arg), std::string::npos) << msg;
  }
}

struct CheckFixture {
  Problem p = kSmall;
  HostQ x = quant_rows(make_values(p.M(), p.K, Fill::Normal, 11), p.M(), p.K);
  HostQ dy = quant_rows(make_values(p.M(), p.N, Fill::Normal, 12), p.M(), p.N);
  std::vector<HostQ> w = make_weights(p, 50);
  std::vector<HostQ> wt;
  HostQ dy_t = quant_cols(make_values(p.M(), p.N, Fill::Normal, 13), p.M(), p.N, p.splits);
  HostQ x_t = quant_cols(make_values(p.M(), p.K, Fill::Normal, 14), p.M(), p.K, p.splits);
  HostTensor y{DType::BF16, p.M(), p.N}, dx{DType::BF16, p.M(), p.K};
  std::vector<HostTensor> dw;
  CheckFixture() {
    for (const HostQ& q : w) wt.push_back(transposed_weights(q));
    for (size_t e = 0; e < p.E(); ++e) dw.emplace_back(DType::F32, p.N, p.K);
  }
};

TEST(GemmCheck, FpropRejectsBadArguments) {
  CheckFixture f;
  const auto W = views(f.w);
  const std::string op = "grouped_gemm_fprop";
  auto fprop = [&](ScaledTensor x, std::span<const ScaledTensor> w, TensorView y,
                   std::vector<int64_t> s,
                   GroupedGemmOptions o = {}) { grouped_gemm_fprop(x, w, y, s, {}, o); };
  {
    ScaledTensor x = f.x.view();
    x.data.dtype = DType::BF16;
    expect_error([&] { fprop(x, W, f.y.v, f.p.splits); }, op, "x.data");
  }
  {
    ScaledTensor x = f.x.view();
    x.layout = ScaleLayout::Block128x128;
    expect_error([&] { fprop(x, W, f.y.v, f.p.splits); }, op, "x.layout");
  }
  {
    ScaledTensor x = f.x.view();
    x.col_groups = f.p.splits;
    expect_error([&] { fprop(x, W, f.y.v, f.p.splits); }, op, "x.col_groups");
  }
  expect_error([&] { fprop(f.x.view(), W, f.y.v, {0, 144, 48}); }, op, "m_splits");
  expect_error([&] { fprop(f.x.view(), W, f.y.v, {8, 136, 64}); }, op, "m_splits[0]");
  expect_error([&] { fprop(f.x.view(), W, f.y.v, {-16, 160, 64}); }, op, "m_splits[0]");
  expect_error([&] { fprop(f.x.view(), W, f.y.v, {}); }, op, "m_splits");
  expect_error([&] { fprop(f.x.view(), std::span(W).first(2), f.y.v, f.p.splits); }, op, "w");
  {
    auto W2 = W;
    W2[1].layout = ScaleLayout::Rowwise1x128;
    expect_error([&] { fprop(f.x.view(), W2, f.y.v, f.p.splits); }, op, "w[1].layout");
  }
  {
    auto W2 = W;
    W2[2] = f.wt[2].view();  // [K][N] instead of [N][K]
    expect_error([&] { fprop(f.x.view(), W2, f.y.v, f.p.splits); }, op, "w[2].data");
  }
  {
    auto W2 = W;
    W2[0].data.dtype = DType::E5M2;
    ScaledTensor x = f.x.view();
    x.data.dtype = DType::E5M2;
    expect_error([&] { fprop(x, W2, f.y.v, f.p.splits); }, op, "w[0]");
  }
  {
    TensorView y = f.y.v;
    y.dtype = DType::E4M3;
    expect_error([&] { fprop(f.x.view(), W, y, f.p.splits); }, op, "y");
  }
  {
    TensorView y = f.y.v;
    y.cols = f.p.N - 16;
    expect_error([&] { fprop(f.x.view(), W, y, f.p.splits); }, op, "w[0].data");
  }
  {
    TensorView y = f.y.v;
    y.rows -= 16;
    expect_error([&] { fprop(f.x.view(), W, y, f.p.splits); }, op, "y");
  }
  {
    TensorView y = f.y.v;
    y.cols = 8;
    y.ld = 8;
    expect_error([&] { fprop(f.x.view(), W, y, f.p.splits); }, op, "y");
  }
  {
    HostTensor wide(DType::BF16, f.p.M(), f.p.N + 4);  // row pitch 776 B, not a multiple of 16
    TensorView y = wide.v;
    y.cols = f.p.N;
    y.ld = f.p.N + 4;
    expect_error([&] { fprop(f.x.view(), W, y, f.p.splits); }, op, "y");
  }
  expect_error([&] { fprop(f.x.view(), W, f.y.v, f.p.splits, {.accumulate = true}); }, op,
               "options.accumulate");
  expect_error([&] { fprop(f.x.view(), W, f.y.v, f.p.splits, {.streams = 0}); }, op,
               "options.streams");
  expect_error([&] { fprop(f.x.view(), W, f.y.v, f.p.splits, {.streams = 9}); }, op,
               "options.streams");
  expect_error([&] { fprop(f.x.view(), W, f.y.v, f.p.splits, {.streams = 4, .first_stream = 5}); },
               op, "options.first_stream");
  expect_error([&] { fprop(f.x.view(), W, f.y.v, f.p.splits, {.streams = 1, .first_stream = -1}); },
               op, "options.first_stream");
  {
    TensorView y = f.y.v;
    y.device = Device::Cuda;
    expect_error([&] { fprop(f.x.view(), W, y, f.p.splits); }, op, "y");
  }
  {
    TensorView y = f.y.v;
    y.data = nullptr;
    expect_error([&] { fprop(f.x.view(), W, y, f.p.splits); }, op, "y");
  }
}

TEST(GemmCheck, FpropRejectsDimsNotMultipleOf16) {
  // K = 200 (quantize itself refuses it, so build the views directly; contents do not matter).
  const HostQ x = make_q(DType::E4M3, ScaleLayout::Rowwise1x128, 16, 200);
  std::vector<HostQ> w;
  w.push_back(make_q(DType::E4M3, ScaleLayout::Block128x128, 384, 200));
  HostTensor y(DType::BF16, 16, 384);
  const std::vector<int64_t> s{16};
  expect_error([&] { grouped_gemm_fprop(x.view(), views(w), y.v, s, {}); }, "grouped_gemm_fprop",
               "x.data");
  // N = 376.
  const HostQ x2 = make_q(DType::E4M3, ScaleLayout::Rowwise1x128, 16, 256);
  std::vector<HostQ> w2;
  w2.push_back(make_q(DType::E4M3, ScaleLayout::Block128x128, 376, 256));
  HostTensor y2(DType::BF16, 16, 376);
  expect_error([&] { grouped_gemm_fprop(x2.view(), views(w2), y2.v, s, {}); }, "grouped_gemm_fprop",
               "y");
}

TEST(GemmCheck, DgradRejectsUntransposedWeights) {
  CheckFixture f;
  expect_error([&] { grouped_gemm_dgrad(f.dy.view(), views(f.w), f.dx.v, f.p.splits, {}); },
               "grouped_gemm_dgrad", "w_t[0].data");
  TensorView dx = f.dx.v;
  dx.rows = 16;
  expect_error([&] { grouped_gemm_dgrad(f.dy.view(), views(f.wt), dx, f.p.splits, {}); },
               "grouped_gemm_dgrad", "dx");
}

TEST(GemmCheck, WgradRejectsBadArguments) {
  CheckFixture f;
  const std::string op = "grouped_gemm_wgrad";
  auto DW = views(f.dw);
  auto wgrad = [&](ScaledTensor a, ScaledTensor b, std::span<const TensorView> dw,
                   std::vector<int64_t> s,
                   GroupedGemmOptions o = {}) { grouped_gemm_wgrad(a, b, dw, s, {}, o); };
  {
    const std::vector<int64_t> other{16, 128, 64};
    ScaledTensor a = f.dy_t.view();
    a.col_groups = other;
    expect_error([&] { wgrad(a, f.x_t.view(), DW, f.p.splits); }, op, "dy_t");
  }
  expect_error([&] { wgrad(f.dy_t.view(), f.x_t.view(), DW, {16, 128, 64}); }, op, "col_groups");
  expect_error([&] { wgrad(f.dy_t.view(), f.x_t.view(), std::span(DW).first(1), f.p.splits); }, op,
               "dw");
  {
    auto DW2 = DW;
    DW2[1].cols = f.p.N;
    expect_error([&] { wgrad(f.dy_t.view(), f.x_t.view(), DW2, f.p.splits); }, op, "dw[1]");
  }
  {
    auto DW2 = DW;
    DW2[0].dtype = DType::BF16;  // accumulate needs F32
    expect_error([&] { wgrad(f.dy_t.view(), f.x_t.view(), DW2, f.p.splits, {.accumulate = true}); },
                 op, "options.accumulate");
  }
  {
    ScaledTensor b = f.x_t.view();
    b.data.cols -= 16;
    expect_error([&] { wgrad(f.dy_t.view(), b, DW, f.p.splits); }, op, "x_t");
  }
  // Swapped operands: x_t [K][M] where dy_t [N][M] belongs gives dw of the wrong shape.
  expect_error([&] { wgrad(f.x_t.view(), f.dy_t.view(), DW, f.p.splits); }, op, "dw[0]");
}

TEST(GemmCheck, Bf16RejectsBadArguments) {
  const Problem p{64, 40, {8, 8}};
  HostTensor x(DType::BF16, 16, 40), y(DType::BF16, 16, 64), xf(DType::F32, 16, 40);
  std::vector<HostTensor> w;
  for (int e = 0; e < 2; ++e) w.emplace_back(DType::BF16, 64, 40);
  const std::string op = "grouped_gemm_fprop_bf16";
  expect_error([&] { grouped_gemm_fprop_bf16(xf.v, views(w), y.v, p.splits, {}); }, op, "x");
  HostTensor x36(DType::BF16, 16, 36);
  expect_error([&] { grouped_gemm_fprop_bf16(x36.v, views(w), y.v, p.splits, {}); }, op, "x");
  expect_error(
      [&] {
        grouped_gemm_fprop_bf16(x.v, views(w), y.v, std::vector<int64_t>{8, 4}, {});
      },
      op, "m_splits");
  HostTensor dy(DType::BF16, 16, 64), dx(DType::BF16, 16, 48);
  expect_error([&] { grouped_gemm_dgrad_bf16(dy.v, views(w), dx.v, p.splits, {}); },
               "grouped_gemm_dgrad_bf16", "w[0]");
  HostTensor x8(DType::BF16, 8, 40);
  std::vector<HostTensor> dw;
  for (int e = 0; e < 2; ++e) dw.emplace_back(DType::F32, 64, 40);
  expect_error([&] { grouped_gemm_wgrad_bf16(dy.v, x8.v, views(dw), p.splits, {}); },
               "grouped_gemm_wgrad_bf16", "x");
}

TEST(GemmCheck, RejectsNegativeAlgo) {
  CheckFixture f;
  const GroupedGemmOptions o{.algo = -1};
  expect_error([&] { grouped_gemm_fprop(f.x.view(), views(f.w), f.y.v, f.p.splits, {}, o); },
               "grouped_gemm_fprop", "options.algo");
  expect_error([&] { grouped_gemm_dgrad(f.dy.view(), views(f.wt), f.dx.v, f.p.splits, {}, o); },
               "grouped_gemm_dgrad", "options.algo");
  expect_error(
      [&] { grouped_gemm_wgrad(f.dy_t.view(), f.x_t.view(), views(f.dw), f.p.splits, {}, o); },
      "grouped_gemm_wgrad", "options.algo");
  const Problem p{64, 40, {8, 8}};
  HostTensor x(DType::BF16, 16, 40), y(DType::BF16, 16, 64);
  std::vector<HostTensor> w;
  for (int e = 0; e < 2; ++e) w.emplace_back(DType::BF16, 64, 40);
  expect_error([&] { grouped_gemm_fprop_bf16(x.v, views(w), y.v, p.splits, {}, o); },
               "grouped_gemm_fprop_bf16", "options.algo");
  try {
    grouped_gemm_fprop(f.x.view(), views(f.w), f.y.v, f.p.splits, {}, {.algo = -7});
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::InvalidArgument) << e.what();
    EXPECT_NE(std::string(e.what()).find("got -7"), std::string::npos) << e.what();
  }
}

// The CPU reference has no algorithms to choose from: a valid algo changes nothing.
TEST(GemmRef, AlgoIsIgnoredByTheReference) {
  CheckFixture f;
  HostTensor y0(DType::BF16, f.p.M(), f.p.N), y3(DType::BF16, f.p.M(), f.p.N);
  grouped_gemm_fprop(f.x.view(), views(f.w), y0.v, f.p.splits, {});
  grouped_gemm_fprop(f.x.view(), views(f.w), y3.v, f.p.splits, {}, {.algo = 3});
  EXPECT_TRUE(bytes_equal(y0, y3));
  if (!cuda_available()) EXPECT_EQ(grouped_gemm_last_algos(), "");  // no Cuda call ran
}

TEST(GemmCheck, TransposeRejectsBadArguments) {
  const HostQ w = quant_block(make_values(128, 256, Fill::Normal, 1), 128, 256);
  HostQ t = make_q(DType::E4M3, ScaleLayout::Block128x128, 256, 128);
  const std::string op = "transpose_block_weights";
  expect_error([&] { transpose_block_weights(w.view(), w.view()); }, op, "w_t.data");
  {
    ScaledTensor tt = t.view();
    tt.data.dtype = DType::E5M2;
    expect_error([&] { transpose_block_weights(w.view(), tt); }, op, "w_t.data");
  }
  const HostQ odd = quant_block(make_values(120, 256, Fill::Normal, 1), 120, 256);
  HostQ odd_t = make_q(DType::E4M3, ScaleLayout::Block128x128, 256, 120);
  expect_error([&] { transpose_block_weights(odd.view(), odd_t.view()); }, op, "w.data");
}

TEST(GemmCheck, CudaTensorsWithoutAGpuAreUnsupported) {
  if (cuda_available()) GTEST_SKIP() << "a GPU is present: covered by the GemmGpu tests";
  CheckFixture f;
  ScaledTensor x = f.x.view();
  x.data.device = x.scale.device = Device::Cuda;
  auto W = views(f.w);
  for (auto& w : W) w.data.device = w.scale.device = Device::Cuda;
  TensorView y = f.y.v;
  y.device = Device::Cuda;
  try {
    grouped_gemm_fprop(x, W, y, f.p.splits, {});
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Unsupported) << e.what();
    EXPECT_NE(std::string(e.what()).find("fp8flow::grouped_gemm_fprop: device"), std::string::npos)
        << e.what();
  }
}

// ---------------------------------------------------------------------------------------------
// CUDA backend against the CPU reference.
#if FP8FLOW_WITH_CUDA
#include <cuda_runtime.h>

struct DevQ {
  DeviceTensor data, scale;
  ScaleLayout layout = ScaleLayout::Rowwise1x128;
  std::vector<int64_t> groups;
  ScaledTensor view() const { return ScaledTensor{data.v, scale.v, layout, groups}; }
};
DevQ to_dev(const HostQ& h) {
  DevQ d;
  d.data = DeviceTensor(h.data);
  d.scale = DeviceTensor(h.scale);
  d.layout = h.layout;
  d.groups = h.groups;
  return d;
}
std::vector<DevQ> to_dev(const std::vector<HostQ>& hs) {
  std::vector<DevQ> d;
  for (const HostQ& h : hs) d.push_back(to_dev(h));
  return d;
}
std::vector<ScaledTensor> views(const std::vector<DevQ>& qs) {
  std::vector<ScaledTensor> v;
  for (const DevQ& q : qs) v.push_back(q.view());
  return v;
}
std::vector<TensorView> views(const std::vector<DeviceTensor>& ts) {
  std::vector<TensorView> v;
  for (const DeviceTensor& t : ts) v.push_back(t.v);
  return v;
}

struct DevWorkspace {
  DeviceTensor buf;
  Workspace ws;
  explicit DevWorkspace(size_t bytes) : buf(DType::E4M3, 1, static_cast<int64_t>(bytes)) {
    ws = Workspace{buf.p, bytes};
  }
};

const std::vector<Problem> kGpuProblems = {
    {384, 256, {0, 144, 64}},                  // K blocks 2 (padded weight scales), N blocks 3
    {512, 1024, {256, 0, 384, 128}},           // no padding either way
    {336, 208, {32, 96, 0, 16}},               // partial 128-blocks in N and K
    {128, 640, {128, 128}},                    // K blocks 5
    {256, 128, {0, 0, 512, 16, 0, 32, 0, 0}},  // skewed, mostly empty
};

std::string name(const Problem& p) {
  std::string s = "N=" + std::to_string(p.N) + " K=" + std::to_string(p.K) + " splits=";
  for (int64_t v : p.splits) s += std::to_string(v) + ",";
  return s;
}

TEST(GemmGpu, Fp8FpropMatchesReference) {
  FP8FLOW_REQUIRE_GPU();
  for (const Problem& p : kGpuProblems) {
    SCOPED_TRACE(name(p));
    const HostQ x = quant_rows(make_values(p.M(), p.K, Fill::Normal, 21), p.M(), p.K);
    const std::vector<HostQ> w = make_weights(p, 60);
    const DevQ xd = to_dev(x);
    const std::vector<DevQ> wd = to_dev(w);
    for (DType od : {DType::BF16, DType::F32}) {
      HostTensor want(od, p.M(), p.N);
      grouped_gemm_fprop(x.view(), views(w), want.v, p.splits, {});
      DeviceTensor y(od, p.M(), p.N);
      DevWorkspace ws(grouped_gemm_workspace_bytes(GroupedGemmKind::Fp8Fprop, p.N, p.K, p.splits,
                                                   {.streams = 8}));  // enough for every call below
      grouped_gemm_fprop(xd.view(), views(wd), y.v, p.splits, ws.ws);
      const HostTensor got = y.to_host();
      EXPECT_TRUE(rows_close(
          got.v, [&](int64_t r, int64_t c) { return ref::load_f32(want.v, r, c); }, 0, p.M(),
          tol_for(od)));
      // Deterministic, and independent of how experts are spread over streams.
      DeviceTensor y1(od, p.M(), p.N);
      grouped_gemm_fprop(xd.view(), views(wd), y1.v, p.splits, ws.ws, {.streams = 1});
      EXPECT_TRUE(bytes_equal(got, y1.to_host()));
      grouped_gemm_fprop(xd.view(), views(wd), y1.v, p.splits, ws.ws, {.streams = 8});
      EXPECT_TRUE(bytes_equal(got, y1.to_host()));
      grouped_gemm_fprop(xd.view(), views(wd), y1.v, p.splits, ws.ws,
                         {.streams = 3, .first_stream = 5});
      EXPECT_TRUE(bytes_equal(got, y1.to_host()));
    }
  }
}

TEST(GemmGpu, TransposeBlockWeightsMatchesReference) {
  FP8FLOW_REQUIRE_GPU();
  for (auto [N, K] : {std::pair<int64_t, int64_t>{272, 400}, {1024, 768}, {16, 48}, {4096, 7168}}) {
    SCOPED_TRACE(std::to_string(N) + "x" + std::to_string(K));
    const HostQ w = quant_block(make_values(N, K, Fill::WideRange, 5), N, K);
    const HostQ want = transposed_weights(w);
    const DevQ wd = to_dev(w);
    DevQ td = to_dev(make_q(DType::E4M3, ScaleLayout::Block128x128, K, N));
    transpose_block_weights(wd.view(), td.view());
    EXPECT_TRUE(bytes_equal(td.data.to_host(), want.data));
    EXPECT_TRUE(bytes_equal(td.scale.to_host(), want.scale));
  }
}

TEST(GemmGpu, Fp8DgradMatchesReference) {
  FP8FLOW_REQUIRE_GPU();
  for (const Problem& p : kGpuProblems) {
    for (DType gd : {DType::E4M3, DType::E5M2}) {
      SCOPED_TRACE(name(p) + (gd == DType::E5M2 ? " dy E5M2" : " dy E4M3"));
      const HostQ dy = quant_rows(make_values(p.M(), p.N, Fill::Normal, 22), p.M(), p.N, gd);
      std::vector<HostQ> w = make_weights(p, 70);  // ptr() is non-const
      std::vector<HostQ> wt;
      for (const HostQ& q : w) wt.push_back(transposed_weights(q));
      HostTensor want(DType::BF16, p.M(), p.K);
      grouped_gemm_dgrad(dy.view(), views(wt), want.v, p.splits, {});
      const DevQ dyd = to_dev(dy);
      const std::vector<DevQ> wd = to_dev(w);
      std::vector<DevQ> wtd;  // transposed on the GPU
      for (const DevQ& q : wd) {
        wtd.push_back(to_dev(make_q(DType::E4M3, ScaleLayout::Block128x128, p.K, p.N)));
        transpose_block_weights(q.view(), wtd.back().view());
      }
      DeviceTensor dx(DType::BF16, p.M(), p.K);
      DevWorkspace ws(grouped_gemm_workspace_bytes(GroupedGemmKind::Fp8Dgrad, p.N, p.K, p.splits));
      grouped_gemm_dgrad(dyd.view(), views(wtd), dx.v, p.splits, ws.ws);
      EXPECT_TRUE(rows_close(
          dx.to_host().v, [&](int64_t r, int64_t c) { return ref::load_f32(want.v, r, c); }, 0,
          p.M(), kTolBf16));
    }
  }
}

// Expert output `got` (rows x cols on the device) matches the reference `want` within tol, and an
// empty expert's (split 0) bits are want's (zeros, or left untouched). Returns the host copy.
HostTensor expect_expert_close(const DeviceTensor& got, const HostTensor& want, int64_t rows,
                               int64_t split, double tol) {
  const HostTensor g = got.to_host();
  EXPECT_TRUE(rows_close(
      g.v, [&](int64_t r, int64_t c) { return ref::load_f32(want.v, r, c); }, 0, rows, tol));
  if (split == 0) EXPECT_TRUE(bytes_equal(g, want));
  return g;
}

TEST(GemmGpu, Fp8WgradMatchesReferenceAndAccumulates) {
  FP8FLOW_REQUIRE_GPU();
  for (const Problem& p : kGpuProblems) {
    SCOPED_TRACE(name(p));
    const HostQ dy_t = quant_cols(make_values(p.M(), p.N, Fill::Normal, 23), p.M(), p.N, p.splits);
    const HostQ x_t = quant_cols(make_values(p.M(), p.K, Fill::Normal, 24), p.M(), p.K, p.splits);
    const DevQ dyd = to_dev(dy_t), xd = to_dev(x_t);
    DevWorkspace ws(grouped_gemm_workspace_bytes(GroupedGemmKind::Fp8Wgrad, p.N, p.K, p.splits));
    // BF16 out, overwrite (poisoned outputs; empty experts must come back zero).
    {
      std::vector<HostTensor> want;
      std::vector<DeviceTensor> got;
      for (size_t e = 0; e < p.E(); ++e)
        want.emplace_back(DType::BF16, p.N, p.K), got.emplace_back(DType::BF16, p.N, p.K);
      grouped_gemm_wgrad(dy_t.view(), x_t.view(), views(want), p.splits, {});
      grouped_gemm_wgrad(dyd.view(), xd.view(), views(got), p.splits, ws.ws);
      for (size_t e = 0; e < p.E(); ++e) {
        SCOPED_TRACE(e);
        expect_expert_close(got[e], want[e], p.N, p.splits[e], kTolBf16);
      }
    }
    // F32 out, accumulate into existing values (the main-grad update).
    {
      std::vector<HostTensor> want;
      std::vector<DeviceTensor> got;
      for (size_t e = 0; e < p.E(); ++e) {
        want.push_back(
            host_from_values(make_values(p.N, p.K, Fill::Normal, 200 + e), DType::F32, p.N, p.K));
        got.emplace_back(want.back());
      }
      grouped_gemm_wgrad(dy_t.view(), x_t.view(), views(want), p.splits, {}, {.accumulate = true});
      grouped_gemm_wgrad(dyd.view(), xd.view(), views(got), p.splits, ws.ws, {.accumulate = true});
      for (size_t e = 0; e < p.E(); ++e) {
        SCOPED_TRACE(e);
        expect_expert_close(got[e], want[e], p.N, p.splits[e], kTolF32);  // empty: untouched
      }
    }
  }
}

// Random operands of an FP8 fprop (x, w) and wgrad (dy_t, x_t) over p, on the host and device.
struct FpropWgradInputs {
  HostQ x;
  std::vector<HostQ> w;
  DevQ xd;
  std::vector<DevQ> wd;
  DevQ dyd, xtd;
  FpropWgradInputs(const Problem& p, uint64_t seed)
      : x(quant_rows(make_values(p.M(), p.K, Fill::Normal, seed), p.M(), p.K)),
        w(make_weights(p, seed + 10)),
        xd(to_dev(x)),
        wd(to_dev(w)),
        dyd(to_dev(
            quant_cols(make_values(p.M(), p.N, Fill::Normal, seed + 1), p.M(), p.N, p.splits))),
        xtd(to_dev(
            quant_cols(make_values(p.M(), p.K, Fill::Normal, seed + 2), p.M(), p.K, p.splits))) {}
};

// Two grouped calls in flight at once, issued on two caller streams with disjoint internal stream
// ranges and separate workspaces (what MoEConfig::overlap_wgrad does): each gives the bits it
// gives alone. Repeated so that the two overlap on the device.
TEST(GemmGpu, ConcurrentCallsOnDisjointStreamRanges) {
  FP8FLOW_REQUIRE_GPU();
  const Problem p{1024, 2048, {512, 0, 1024, 256, 128, 512, 0, 640}};
  const FpropWgradInputs in(p, 31);
  const auto& [x, w, xd, wd, dyd, xtd] = in;
  const GroupedGemmOptions oa{.streams = 4}, ob{.streams = 4, .first_stream = 4};
  DevWorkspace wsa(grouped_gemm_workspace_bytes(GroupedGemmKind::Fp8Fprop, p.N, p.K, p.splits, oa));
  DevWorkspace wsb(grouped_gemm_workspace_bytes(GroupedGemmKind::Fp8Wgrad, p.N, p.K, p.splits, ob));
  auto make_dw = [&] {
    std::vector<DeviceTensor> dw;
    for (size_t e = 0; e < p.E(); ++e) dw.emplace_back(DType::F32, p.N, p.K);
    return dw;
  };
  DeviceTensor y_alone(DType::BF16, p.M(), p.N), y(DType::BF16, p.M(), p.N);
  std::vector<DeviceTensor> dw_alone = make_dw(), dw = make_dw();
  grouped_gemm_fprop(xd.view(), views(wd), y_alone.v, p.splits, wsa.ws, oa);
  grouped_gemm_wgrad(dyd.view(), xtd.view(), views(dw_alone), p.splits, wsb.ws, ob);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  cudaStream_t sa = nullptr, sb = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&sa, cudaStreamNonBlocking), cudaSuccess);
  ASSERT_EQ(cudaStreamCreateWithFlags(&sb, cudaStreamNonBlocking), cudaSuccess);
  for (int i = 0; i < 4; ++i) {
    grouped_gemm_fprop(xd.view(), views(wd), y.v, p.splits, wsa.ws, oa, sa);
    grouped_gemm_wgrad(dyd.view(), xtd.view(), views(dw), p.splits, wsb.ws, ob, sb);
  }
  ASSERT_EQ(cudaStreamSynchronize(sa), cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(sb), cudaSuccess);
  EXPECT_TRUE(bytes_equal(y.to_host(), y_alone.to_host()));
  for (size_t e = 0; e < p.E(); ++e)
    EXPECT_TRUE(bytes_equal(dw[e].to_host(), dw_alone[e].to_host())) << "expert " << e;
  cudaStreamDestroy(sa);
  cudaStreamDestroy(sb);
}

// Threaded enqueue (one host thread per internal stream; on by default when every stream gets at
// least two experts) gives the bits of the caller-only enqueue, for every kind, with empty experts
// in the split; checked against the CPU reference too.
TEST(GemmGpu, ThreadedEnqueueSameBits) {
  FP8FLOW_REQUIRE_GPU();
  std::vector<int64_t> splits(40);
  for (size_t e = 0; e < splits.size(); ++e) splits[e] = (e % 7 == 3) ? 0 : 16 * ((e * 5) % 9 + 1);
  const Problem p{256, 384, splits};
  const FpropWgradInputs in(p, 51);
  const auto& [x, w, xd, wd, dyd, xtd] = in;
  HostTensor want(DType::BF16, p.M(), p.N);
  grouped_gemm_fprop(x.view(), views(w), want.v, p.splits, {});
  for (int streams : {4, 8}) {
    SCOPED_TRACE("streams " + std::to_string(streams));
    HostTensor got[2];
    std::vector<HostTensor> dw_got[2];
    for (int t = 0; t < 2; ++t) {
      const GroupedGemmOptions o{.streams = streams, .threaded_enqueue = t == 1};
      DevWorkspace ws(
          grouped_gemm_workspace_bytes(GroupedGemmKind::Fp8Fprop, p.N, p.K, p.splits, o));
      DeviceTensor y(DType::BF16, p.M(), p.N);
      std::vector<DeviceTensor> dw;
      for (size_t e = 0; e < p.E(); ++e) dw.emplace_back(DType::F32, p.N, p.K);
      for (int rep = 0; rep < 3; ++rep) {
        grouped_gemm_fprop(xd.view(), views(wd), y.v, p.splits, ws.ws, o);
        grouped_gemm_wgrad(dyd.view(), xtd.view(), views(dw), p.splits, ws.ws, o);
      }
      got[t] = y.to_host();
      for (const DeviceTensor& d : dw) dw_got[t].push_back(d.to_host());
    }
    EXPECT_TRUE(bytes_equal(got[0], got[1]));
    for (size_t e = 0; e < p.E(); ++e) EXPECT_TRUE(bytes_equal(dw_got[0][e], dw_got[1][e])) << e;
    EXPECT_TRUE(rows_close(
        got[1].v, [&](int64_t r, int64_t c) { return ref::load_f32(want.v, r, c); }, 0, p.M(),
        kTolBf16));
  }
}

// Few output tiles and a long contraction: cuBLASLt's heuristic offers only split-K algorithms
// there (block-scaled FP8, e.g. m=4096 n=240 k=7168), so the backend forces split-K off on one and
// validates it (FP8FLOW_GEMM_LOG=1 shows "split-K forced off"). Those algorithms must be right too.
TEST(GemmGpu, Fp8SplitKFreeFallbackMatchesReference) {
  FP8FLOW_REQUIRE_GPU();
  for (const Problem& p : {Problem{1024, 7168, {32, 0, 16}}, Problem{7168, 1024, {16, 32}}}) {
    SCOPED_TRACE(name(p));
    const HostQ x = quant_rows(make_values(p.M(), p.K, Fill::Normal, 31), p.M(), p.K);
    const HostQ dy = quant_rows(make_values(p.M(), p.N, Fill::Normal, 32), p.M(), p.N);
    const std::vector<HostQ> w = make_weights(p, 110);
    std::vector<HostQ> wt;
    for (const HostQ& q : w) wt.push_back(transposed_weights(q));
    HostTensor y_want(DType::BF16, p.M(), p.N), dx_want(DType::BF16, p.M(), p.K);
    grouped_gemm_fprop(x.view(), views(w), y_want.v, p.splits, {});
    grouped_gemm_dgrad(dy.view(), views(wt), dx_want.v, p.splits, {});
    const DevQ xd = to_dev(x), dyd = to_dev(dy);
    const std::vector<DevQ> wd = to_dev(w), wtd = to_dev(wt);
    DeviceTensor y(DType::BF16, p.M(), p.N), dx(DType::BF16, p.M(), p.K);
    DevWorkspace ws(
        std::max(grouped_gemm_workspace_bytes(GroupedGemmKind::Fp8Fprop, p.N, p.K, p.splits),
                 grouped_gemm_workspace_bytes(GroupedGemmKind::Fp8Dgrad, p.N, p.K, p.splits)));
    grouped_gemm_fprop(xd.view(), views(wd), y.v, p.splits, ws.ws);
    grouped_gemm_dgrad(dyd.view(), views(wtd), dx.v, p.splits, ws.ws);
    EXPECT_TRUE(rows_close(
        y.to_host().v, [&](int64_t r, int64_t c) { return ref::load_f32(y_want.v, r, c); }, 0,
        p.M(), kTolBf16));
    EXPECT_TRUE(rows_close(
        dx.to_host().v, [&](int64_t r, int64_t c) { return ref::load_f32(dx_want.v, r, c); }, 0,
        p.M(), kTolBf16));
  }
}

TEST(GemmGpu, Fp8NaNPropagates) {
  FP8FLOW_REQUIRE_GPU();
  const Problem p = kSmall;
  HostQ x = quant_rows(make_values(p.M(), p.K, Fill::Normal, 25), p.M(), p.K);
  std::vector<HostQ> w = make_weights(p, 80);
  ref::byte_at(x.data.v, 150, 7) = 0x7F;
  ref::byte_at(w[2].data.v, 5, 200) = 0xFF;
  HostTensor want(DType::BF16, p.M(), p.N);
  grouped_gemm_fprop(x.view(), views(w), want.v, p.splits, {});
  const DevQ xd = to_dev(x);
  const std::vector<DevQ> wd = to_dev(w);
  DeviceTensor y(DType::BF16, p.M(), p.N);
  DevWorkspace ws(grouped_gemm_workspace_bytes(GroupedGemmKind::Fp8Fprop, p.N, p.K, p.splits));
  grouped_gemm_fprop(xd.view(), views(wd), y.v, p.splits, ws.ws);
  EXPECT_TRUE(rows_close(
      y.to_host().v, [&](int64_t r, int64_t c) { return ref::load_f32(want.v, r, c); }, 0, p.M(),
      kTolBf16));
}

TEST(GemmGpu, Bf16VariantsMatchReference) {
  FP8FLOW_REQUIRE_GPU();
  for (const Problem& p : {Problem{384, 256, {0, 130, 64}}, Problem{96, 520, {1, 0, 77, 256}}}) {
    SCOPED_TRACE(name(p));
    const HostTensor x =
        host_from_values(make_values(p.M(), p.K, Fill::Normal, 26), DType::BF16, p.M(), p.K);
    const HostTensor dy =
        host_from_values(make_values(p.M(), p.N, Fill::Normal, 27), DType::BF16, p.M(), p.N);
    std::vector<HostTensor> w;
    std::vector<DeviceTensor> wd;
    for (size_t e = 0; e < p.E(); ++e) {
      w.push_back(
          host_from_values(make_values(p.N, p.K, Fill::Normal, 90 + e), DType::BF16, p.N, p.K));
      wd.emplace_back(w.back());
    }
    const DeviceTensor xd(x), dyd(dy);
    DevWorkspace ws(grouped_gemm_workspace_bytes(GroupedGemmKind::Bf16Fprop, p.N, p.K, p.splits));
    for (DType od : {DType::BF16, DType::F32}) {
      HostTensor y(od, p.M(), p.N), dx(od, p.M(), p.K);
      grouped_gemm_fprop_bf16(x.v, views(w), y.v, p.splits, {});
      grouped_gemm_dgrad_bf16(dy.v, views(w), dx.v, p.splits, {});
      DeviceTensor yg(od, p.M(), p.N), dxg(od, p.M(), p.K);
      grouped_gemm_fprop_bf16(xd.v, views(wd), yg.v, p.splits, ws.ws);
      grouped_gemm_dgrad_bf16(dyd.v, views(wd), dxg.v, p.splits, ws.ws);
      EXPECT_TRUE(rows_close(
          yg.to_host().v, [&](int64_t r, int64_t c) { return ref::load_f32(y.v, r, c); }, 0, p.M(),
          tol_for(od)));
      EXPECT_TRUE(rows_close(
          dxg.to_host().v, [&](int64_t r, int64_t c) { return ref::load_f32(dx.v, r, c); }, 0,
          p.M(), tol_for(od)));
      std::vector<HostTensor> dw;
      std::vector<DeviceTensor> dwg;
      for (size_t e = 0; e < p.E(); ++e)
        dw.emplace_back(od, p.N, p.K), dwg.emplace_back(od, p.N, p.K);
      grouped_gemm_wgrad_bf16(dy.v, x.v, views(dw), p.splits, {});
      grouped_gemm_wgrad_bf16(dyd.v, xd.v, views(dwg), p.splits, ws.ws);
      for (size_t e = 0; e < p.E(); ++e)
        EXPECT_TRUE(rows_close(
            dwg[e].to_host().v, [&](int64_t r, int64_t c) { return ref::load_f32(dw[e].v, r, c); },
            0, p.N, tol_for(od)));
    }
    // Accumulate into F32.
    std::vector<HostTensor> acc;
    std::vector<DeviceTensor> accg;
    for (size_t e = 0; e < p.E(); ++e) {
      acc.push_back(
          host_from_values(make_values(p.N, p.K, Fill::Normal, 300 + e), DType::F32, p.N, p.K));
      accg.emplace_back(acc.back());
    }
    grouped_gemm_wgrad_bf16(dy.v, x.v, views(acc), p.splits, {}, {.accumulate = true});
    grouped_gemm_wgrad_bf16(dyd.v, xd.v, views(accg), p.splits, ws.ws, {.accumulate = true});
    for (size_t e = 0; e < p.E(); ++e)
      EXPECT_TRUE(rows_close(
          accg[e].to_host().v, [&](int64_t r, int64_t c) { return ref::load_f32(acc[e].v, r, c); },
          0, p.N, kTolF32));
  }
}

TEST(GemmGpu, RejectsSmallWorkspaceAndHostPointers) {
  FP8FLOW_REQUIRE_GPU();
  const Problem p = kSmall;
  const HostQ x = quant_rows(make_values(p.M(), p.K, Fill::Normal, 28), p.M(), p.K);
  const std::vector<HostQ> w = make_weights(p, 90);
  const DevQ xd = to_dev(x);
  const std::vector<DevQ> wd = to_dev(w);
  DeviceTensor y(DType::BF16, p.M(), p.N);
  const size_t need = grouped_gemm_workspace_bytes(GroupedGemmKind::Fp8Fprop, p.N, p.K, p.splits);
  DevWorkspace ws(need + 256);
  expect_error(
      [&] {
        grouped_gemm_fprop(xd.view(), views(wd), y.v, p.splits, {ws.ws.data, need - 1});
      },
      "grouped_gemm_fprop", "workspace.bytes");
  expect_error(
      [&] {
        grouped_gemm_fprop(xd.view(), views(wd), y.v, p.splits,
                           {static_cast<uint8_t*>(ws.ws.data) + 16, need});
      },
      "grouped_gemm_fprop", "workspace.data");
  HostTensor yh(DType::BF16, p.M(), p.N);
  TensorView bad = yh.v;
  bad.device = Device::Cuda;  // a host pointer claiming to be device memory
  expect_error([&] { grouped_gemm_fprop(xd.view(), views(wd), bad, p.splits, ws.ws); },
               "grouped_gemm_fprop", "y");
}

// GroupedGemmOptions::algo: 0 is the default (bitwise, also after other algorithms' plans are
// cached); 1 (when the heuristic returns it) is within the same bound of the FP64 reference and
// deterministic; an index past the heuristic's list is an InvalidArgument naming options.algo.
TEST(GemmGpu, AlgoIndexSelectsOtherHeuristicResults) {
  FP8FLOW_REQUIRE_GPU();
  const Problem p{512, 1024, {256, 0, 384, 128}};
  const HostQ x = quant_rows(make_values(p.M(), p.K, Fill::Normal, 41), p.M(), p.K);
  const std::vector<HostQ> w = make_weights(p, 90);
  const HostQ dy_t = quant_cols(make_values(p.M(), p.N, Fill::Normal, 42), p.M(), p.N, p.splits);
  const HostQ x_t = quant_cols(make_values(p.M(), p.K, Fill::Normal, 43), p.M(), p.K, p.splits);
  const DevQ xd = to_dev(x), dyd = to_dev(dy_t), xtd = to_dev(x_t);
  const std::vector<DevQ> wd = to_dev(w);
  DevWorkspace ws(grouped_gemm_workspace_bytes(GroupedGemmKind::Fp8Fprop, p.N, p.K, p.splits, {}) +
                  grouped_gemm_workspace_bytes(GroupedGemmKind::Fp8Wgrad, p.N, p.K, p.splits, {}));
  // fprop, BF16 out.
  HostTensor want(DType::BF16, p.M(), p.N);
  grouped_gemm_fprop(x.view(), views(w), want.v, p.splits, {});
  auto fprop = [&](GroupedGemmOptions o) {
    DeviceTensor y(DType::BF16, p.M(), p.N);
    grouped_gemm_fprop(xd.view(), views(wd), y.v, p.splits, ws.ws, o);
    return y.to_host();
  };
  const HostTensor def = fprop({});
  EXPECT_NE(grouped_gemm_last_algos().find("algo#0"), std::string::npos)
      << grouped_gemm_last_algos();
  EXPECT_TRUE(bytes_equal(def, fprop({.algo = 0})));
  try {
    const HostTensor a1 = fprop({.algo = 1});
    std::printf("fprop algo 1: %s\n", grouped_gemm_last_algos().c_str());
    EXPECT_NE(grouped_gemm_last_algos().find("algo#1"), std::string::npos);
    EXPECT_TRUE(rows_close(
        a1.v, [&](int64_t r, int64_t c) { return ref::load_f32(want.v, r, c); }, 0, p.M(),
        kTolBf16));
    EXPECT_TRUE(bytes_equal(a1, fprop({.algo = 1})));
  } catch (const Error& e) {
    std::printf("fprop: no algo 1: %s\n", e.what());
    EXPECT_EQ(e.kind(), ErrorKind::InvalidArgument);
    EXPECT_NE(std::string(e.what()).find("options.algo: expected < 1"), std::string::npos)
        << e.what();
  }
  EXPECT_TRUE(bytes_equal(def, fprop({})));  // the cached algo-1 plan does not leak into algo 0
  // wgrad, F32 out (the layer's main-grad GEMM).
  std::vector<HostTensor> wantw;
  for (size_t e = 0; e < p.E(); ++e) wantw.emplace_back(DType::F32, p.N, p.K);
  grouped_gemm_wgrad(dy_t.view(), x_t.view(), views(wantw), p.splits, {});
  auto wgrad = [&](GroupedGemmOptions o) {
    std::vector<DeviceTensor> dw;
    for (size_t e = 0; e < p.E(); ++e) dw.emplace_back(DType::F32, p.N, p.K);
    grouped_gemm_wgrad(dyd.view(), xtd.view(), views(dw), p.splits, ws.ws, o);
    std::vector<HostTensor> h;
    for (const DeviceTensor& t : dw) h.push_back(t.to_host());
    return h;
  };
  const std::vector<HostTensor> wdef = wgrad({}), w0 = wgrad({.algo = 0});
  for (size_t e = 0; e < p.E(); ++e) EXPECT_TRUE(bytes_equal(wdef[e], w0[e]));
  try {
    const std::vector<HostTensor> w1 = wgrad({.algo = 1});
    std::printf("wgrad f32 algo 1: %s\n", grouped_gemm_last_algos().c_str());
    for (size_t e = 0; e < p.E(); ++e) {
      SCOPED_TRACE(e);
      EXPECT_TRUE(rows_close(
          w1[e].v, [&](int64_t r, int64_t c) { return ref::load_f32(wantw[e].v, r, c); }, 0, p.N,
          kTolF32));
      if (p.splits[e] == 0) EXPECT_TRUE(bytes_equal(w1[e], wantw[e]));  // zeroed, no GEMM
    }
  } catch (const Error& e) {
    std::printf("wgrad: no algo 1: %s\n", e.what());
    EXPECT_EQ(e.kind(), ErrorKind::InvalidArgument);
  }
  // Past the list (at most 16 results are requested).
  try {
    fprop({.algo = 16});
    ADD_FAILURE() << "no error for algo 16";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::InvalidArgument) << e.what();
    const std::string msg = e.what();
    EXPECT_NE(msg.find("fp8flow::grouped_gemm_fprop: options.algo: expected < "), std::string::npos)
        << msg;
    EXPECT_NE(msg.find("got 16"), std::string::npos) << msg;
  }
}

// The experimental one-launch kernel (src/ops/gemm/own_fprop_sm90.cu, FP8FLOW_OWN_GEMM=1) against
// the CPU reference and cuBLASLt: segments that are not multiples of 128 rows (partial tiles whose
// extra rows belong to the next expert), empty experts, several K blocks, N tiles.
TEST(GemmGpu, OwnFpropMatchesReference) {
  FP8FLOW_REQUIRE_GPU();
  const std::vector<Problem> problems = {
      // (multiples of 16 rows: the API's contract, which the CPU reference checks)
      {256, 256, {0, 144, 64, 208}},
      {384, 640, {128, 304, 0, 16, 496}},
      {1024, 1024, {512, 0, 704, 304}},
      {128, 128, {16}},
      // more than one raster group of m tiles in an expert (10 and 9 tiles), K past the stages
      {512, 1024, {1200, 16, 0, 1104}},
  };
  for (const Problem& p : problems) {
    SCOPED_TRACE(name(p));
    const int64_t E = static_cast<int64_t>(p.E()), NT = p.N / 128, KT = p.K / 128;
    const HostQ x = quant_rows(make_values(p.M(), p.K, Fill::Normal, 31), p.M(), p.K);
    std::vector<HostQ> w = make_weights(p, 70);  // ptr() is non-const
    // One contiguous [E N][K] weight tensor with contiguous [E N/128][K/128] scales.
    HostQ all = make_q(DType::E4M3, ScaleLayout::Block128x128, E * p.N, p.K);
    for (int64_t e = 0; e < E; ++e) {
      std::memcpy(all.data.ptr<uint8_t>() + e * p.N * p.K, w[e].data.ptr<uint8_t>(),
                  static_cast<size_t>(p.N * p.K));
      std::memcpy(all.scale.ptr<float>() + e * NT * KT, w[e].scale.ptr<float>(),
                  static_cast<size_t>(NT * KT) * sizeof(float));
    }
    const DevQ xd = to_dev(x), alld = to_dev(all);
    std::vector<ScaledTensor> wv;
    for (int64_t e = 0; e < E; ++e)
      wv.push_back(ScaledTensor{TensorView{static_cast<uint8_t*>(alld.data.p) + e * p.N * p.K,
                                           DType::E4M3, p.N, p.K, -1, Device::Cuda},
                                TensorView{static_cast<float*>(alld.scale.p) + e * NT * KT,
                                           DType::F32, NT, KT, -1, Device::Cuda},
                                ScaleLayout::Block128x128,
                                {}});
    HostTensor want(DType::BF16, p.M(), p.N);
    grouped_gemm_fprop(x.view(), views(w), want.v, p.splits, {});
    DeviceTensor y(DType::BF16, p.M(), p.N), y2(DType::BF16, p.M(), p.N);
    ASSERT_TRUE(sm90::own::own_fprop_supported(xd.view(), wv, y.v));
    sm90::own::own_grouped_fprop(xd.view(), wv, y.v, p.splits, nullptr);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const HostTensor got = y.to_host();
    EXPECT_TRUE(rows_close(
        got.v, [&](int64_t r, int64_t c) { return ref::load_f32(want.v, r, c); }, 0, p.M(),
        kTolBf16));
    // Deterministic.
    sm90::own::own_grouped_fprop(xd.view(), wv, y2.v, p.splits, nullptr);
    EXPECT_TRUE(bytes_equal(got, y2.to_host()));
    // Persistent: 3 CTAs loop over every tile (the stage ring runs across tiles), same bits.
    ASSERT_EQ(cudaMemset(y2.v.data, 0xFF, y2.v.bytes()), cudaSuccess);
    sm90::own::own_grouped_fprop(xd.view(), wv, y2.v, p.splits, nullptr, 3);
    EXPECT_TRUE(bytes_equal(got, y2.to_host()));
    // Against cuBLASLt on the same device operands (its per-expert scale slices must start
    // 16-byte aligned).
    if ((NT * KT) % 4 != 0) continue;
    DevWorkspace ws(grouped_gemm_workspace_bytes(GroupedGemmKind::Fp8Fprop, p.N, p.K, p.splits));
    grouped_gemm_fprop(xd.view(), wv, y2.v, p.splits, ws.ws);
    const HostTensor lt = y2.to_host();
    EXPECT_TRUE(rows_close(
        got.v, [&](int64_t r, int64_t c) { return ref::load_f32(lt.v, r, c); }, 0, p.M(),
        kTolBf16));
  }
}

// own_wgrad_supported's contract, on views alone (no GPU needed: nothing is dereferenced), and
// own_grouped_wgrad refusing what it does not support before touching the device.
TEST(GemmCheck, OwnWgradSupportedContract) {
  const int64_t N = 256, K = 384, M = 96;
  auto* base = reinterpret_cast<uint8_t*>(uintptr_t{1} << 20);
  auto view = [&](int64_t off, DType d, int64_t r, int64_t c, int64_t ld = -1) {
    return TensorView{base + off, d, r, c, ld, Device::Cuda};
  };
  const std::vector<int64_t> splits = {32, 0, 64};
  auto op = [&](DType d, int64_t rows) {
    return ScaledTensor{view(0, d, rows, M), view(1 << 16, DType::F32, 2, rows),
                        ScaleLayout::Rowwise1x128, splits};
  };
  ScaledTensor dy = op(DType::E4M3, N), x = op(DType::E4M3, K);
  std::vector<TensorView> dw;
  for (int e = 0; e < 3; ++e) dw.push_back(view((2 + e) << 20, DType::F32, N, K));
  EXPECT_TRUE(sm90::own::own_wgrad_supported(dy, x, dw, splits));

  EXPECT_FALSE(sm90::own::own_wgrad_supported(op(DType::E5M2, N), x, dw, splits));  // E4M3 only
  EXPECT_FALSE(sm90::own::own_wgrad_supported(op(DType::E4M3, N - 16), x, dw, splits));  // N % 128
  std::vector<TensorView> bad = dw;
  bad[1] = view(3 << 20, DType::BF16, N, K);  // F32 dW only
  EXPECT_FALSE(sm90::own::own_wgrad_supported(dy, x, bad, splits));
  bad = dw;
  bad[2] = view(4 << 20, DType::F32, N, K, K + 4);  // one ld for all experts
  EXPECT_FALSE(sm90::own::own_wgrad_supported(dy, x, bad, splits));
  bad = dw;
  bad[0] = view((2 << 20) + 8, DType::F32, N, K);  // TMA stores: 16-byte aligned dW
  EXPECT_FALSE(sm90::own::own_wgrad_supported(dy, x, bad, splits));
  // At most 64 non-empty experts: their tensor maps travel as kernel parameters.
  for (const int n : {64, 65}) {
    const std::vector<int64_t> ns(static_cast<size_t>(n), 16);
    ScaledTensor dyn = dy, xn = x;
    dyn.data.cols = xn.data.cols = 16 * n;
    const std::vector<TensorView> dwn(static_cast<size_t>(n), dw[0]);
    EXPECT_EQ(sm90::own::own_wgrad_supported(dyn, xn, dwn, ns), n == 64) << n;
  }
  try {
    sm90::own::own_grouped_wgrad(op(DType::E5M2, N), x, dw, splits, false, nullptr);
    ADD_FAILURE() << "no error for E5M2";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Unsupported) << e.what();
    EXPECT_NE(std::string(e.what()).find("own_grouped_wgrad"), std::string::npos) << e.what();
  }
}

// The own grouped wgrad (own_wgrad.h) against the CPU reference: experts whose token counts are
// not multiples of 128 (the partial last K block must read zeros, not the next expert's tokens),
// empty experts (zeros, or untouched when accumulating), more K blocks than pipeline stages, more
// tiles than CTAs (persistent loop, the stage ring running across tiles and experts); overwrite
// and accumulate; same bits run to run and at any CTA count.
TEST(GemmGpu, OwnWgradMatchesReference) {
  FP8FLOW_REQUIRE_GPU();
  const std::vector<Problem> problems = {
      {256, 256, {0, 144, 64, 208}},
      {384, 640, {128, 304, 0, 16, 496}},
      {128, 128, {16}},
      {256, 384, {1200, 16, 0, 1104, 0}},  // 10 and 9 K blocks (> 5 stages)
  };
  for (const Problem& p : problems) {
    SCOPED_TRACE(name(p));
    const HostQ dy_t = quant_cols(make_values(p.M(), p.N, Fill::Normal, 41), p.M(), p.N, p.splits);
    const HostQ x_t = quant_cols(make_values(p.M(), p.K, Fill::Normal, 42), p.M(), p.K, p.splits);
    const DevQ dyd = to_dev(dy_t), xd = to_dev(x_t);
    for (const bool acc : {false, true}) {
      SCOPED_TRACE(acc ? "accumulate" : "overwrite");
      std::vector<HostTensor> want;
      std::vector<DeviceTensor> got, again;
      for (size_t e = 0; e < p.E(); ++e) {
        want.push_back(
            host_from_values(make_values(p.N, p.K, Fill::Normal, 300 + e), DType::F32, p.N, p.K));
        got.emplace_back(acc ? DeviceTensor(want.back()) : DeviceTensor(DType::F32, p.N, p.K));
        again.emplace_back(acc ? DeviceTensor(want.back()) : DeviceTensor(DType::F32, p.N, p.K));
      }
      grouped_gemm_wgrad(dy_t.view(), x_t.view(), views(want), p.splits, {}, {.accumulate = acc});
      ASSERT_TRUE(sm90::own::own_wgrad_supported(dyd.view(), xd.view(), views(got), p.splits));
      sm90::own::own_grouped_wgrad(dyd.view(), xd.view(), views(got), p.splits, acc, nullptr);
      sm90::own::own_grouped_wgrad(dyd.view(), xd.view(), views(again), p.splits, acc, nullptr, 3);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      for (size_t e = 0; e < p.E(); ++e) {
        SCOPED_TRACE(e);
        // Empty experts: zeros / untouched.
        const HostTensor g = expect_expert_close(got[e], want[e], p.N, p.splits[e], kTolF32);
        if (acc && p.splits[e] > 0)  // added to, not left as it was
          EXPECT_FALSE(bytes_equal(g, host_from_values(make_values(p.N, p.K, Fill::Normal, 300 + e),
                                                       DType::F32, p.N, p.K)));
        EXPECT_TRUE(bytes_equal(g, again[e].to_host()));  // 3 CTAs over all tiles: same bits
      }
    }
  }
}

#endif  // FP8FLOW_WITH_CUDA

}  // namespace
}  // namespace fp8flow::test
