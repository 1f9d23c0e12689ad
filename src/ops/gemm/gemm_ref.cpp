// CPU reference backend of the grouped GEMMs: every operand element is decoded and multiplied by
// its scale (exact in FP64), products are summed in FP64 in index order, and the sum (plus the old
// output with accumulate) is rounded once to FP32, then to BF16 (RNE) for BF16 outputs. Slow and
// plain: the definition the cuBLASLt backend is tested against (to FP32-accumulation accuracy).
#include <vector>

#include "common/groups.h"
#include "common/ref_access.h"
#include "ops/gemm/gemm_backends.h"

namespace fp8flow::ref {
namespace {

// Store an FP64 sum into an F32/BF16 output, adding the old value first when accumulating.
void store_sum(const TensorView& out, int64_t r, int64_t c, double acc, bool accumulate) {
  if (accumulate) acc += static_cast<double>(load_f32(out, r, c));
  store_f32(out, r, c, static_cast<float>(acc));
}

double dot(const double* a, const double* b, int64_t n) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Dequantized 128x128-block-scaled matrix [R][C] as FP64, row-major.
std::vector<double> dequant_block(const ScaledTensor& t) {
  const int64_t R = t.data.rows, C = t.data.cols;
  std::vector<double> v(static_cast<size_t>(R * C));
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c)
      v[static_cast<size_t>(r * C + c)] =
          static_cast<double>(fp8_decode(t.data.dtype, byte_at(t.data, r, c))) *
          static_cast<double>(scale_at(t.scale, r / 128, c / 128));
  return v;
}

// Columns [c0, c0 + w) of a Rowwise1x128 tensor with column groups, as FP64 [R][w].
std::vector<double> dequant_rowwise_cols(const ScaledTensor& t, const detail::GroupTiles& g,
                                         int64_t c0, int64_t w) {
  const int64_t R = t.data.rows;
  std::vector<double> v(static_cast<size_t>(R * w));
  for (int32_t tile = 0; tile < g.total_tiles; ++tile) {
    int32_t t0, tw;
    g.tile_cols(tile, t0, tw);
    if (t0 + tw <= c0 || t0 >= c0 + w) continue;
    for (int64_t r = 0; r < R; ++r) {
      const double s = static_cast<double>(scale_at(t.scale, tile, r));
      for (int64_t c = t0; c < t0 + tw; ++c)
        v[static_cast<size_t>(r * w + (c - c0))] =
            static_cast<double>(fp8_decode(t.data.dtype, byte_at(t.data, r, c))) * s;
    }
  }
  return v;
}

std::vector<double> bf16_rows(const TensorView& t, int64_t r0, int64_t rows) {
  std::vector<double> v(static_cast<size_t>(rows * t.cols));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < t.cols; ++c)
      v[static_cast<size_t>(r * t.cols + c)] = static_cast<double>(load_f32(t, r0 + r, c));
  return v;
}

}  // namespace

void grouped_gemm_rowwise(const ScaledTensor& a, std::span<const ScaledTensor> b,
                          const TensorView& out, std::span<const int64_t> m_splits,
                          bool accumulate) {
  const int64_t Kc = a.data.cols, Nout = out.cols;
  std::vector<double> row(static_cast<size_t>(Kc));
  int64_t m0 = 0;
  for (size_t e = 0; e < m_splits.size(); ++e) {
    const int64_t me = m_splits[e];
    if (me == 0) continue;
    const std::vector<double> w = dequant_block(b[e]);
    for (int64_t m = m0; m < m0 + me; ++m) {
      for (int64_t k = 0; k < Kc; ++k)
        row[static_cast<size_t>(k)] =
            static_cast<double>(fp8_decode(a.data.dtype, byte_at(a.data, m, k))) *
            static_cast<double>(scale_at(a.scale, k / 128, m));
      for (int64_t n = 0; n < Nout; ++n)
        store_sum(out, m, n, dot(row.data(), w.data() + static_cast<size_t>(n * Kc), Kc),
                  accumulate);
    }
    m0 += me;
  }
}

void grouped_gemm_wgrad(const ScaledTensor& dy_t, const ScaledTensor& x_t,
                        std::span<const TensorView> dw, std::span<const int64_t> m_splits,
                        bool accumulate) {
  const int64_t N = dy_t.data.rows, K = x_t.data.rows;
  const detail::GroupTiles g = detail::make_group_tiles(m_splits, dy_t.data.cols);
  int64_t m0 = 0;
  for (size_t e = 0; e < m_splits.size(); ++e) {
    const int64_t me = m_splits[e];
    const std::vector<double> d = dequant_rowwise_cols(dy_t, g, m0, me);  // [N][me]
    const std::vector<double> x = dequant_rowwise_cols(x_t, g, m0, me);   // [K][me]
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k)
        store_sum(
            dw[e], n, k,
            dot(d.data() + static_cast<size_t>(n * me), x.data() + static_cast<size_t>(k * me), me),
            accumulate);
    m0 += me;
  }
}

void grouped_gemm_fprop_bf16(const TensorView& x, std::span<const TensorView> w,
                             const TensorView& y, std::span<const int64_t> m_splits,
                             bool accumulate) {
  const int64_t K = x.cols, N = y.cols;
  int64_t m0 = 0;
  for (size_t e = 0; e < m_splits.size(); ++e) {
    const int64_t me = m_splits[e];
    if (me == 0) continue;
    const std::vector<double> we = bf16_rows(w[e], 0, N);  // [N][K]
    const std::vector<double> xe = bf16_rows(x, m0, me);   // [me][K]
    for (int64_t m = 0; m < me; ++m)
      for (int64_t n = 0; n < N; ++n)
        store_sum(
            y, m0 + m, n,
            dot(xe.data() + static_cast<size_t>(m * K), we.data() + static_cast<size_t>(n * K), K),
            accumulate);
    m0 += me;
  }
}

void grouped_gemm_dgrad_bf16(const TensorView& dy, std::span<const TensorView> w,
                             const TensorView& dx, std::span<const int64_t> m_splits,
                             bool accumulate) {
  const int64_t N = dy.cols, K = dx.cols;
  int64_t m0 = 0;
  std::vector<double> wt(static_cast<size_t>(K * N));
  for (size_t e = 0; e < m_splits.size(); ++e) {
    const int64_t me = m_splits[e];
    if (me == 0) continue;
    for (int64_t n = 0; n < N; ++n)  // W_e^T [K][N], so both operands are dotted along N
      for (int64_t k = 0; k < K; ++k)
        wt[static_cast<size_t>(k * N + n)] = static_cast<double>(load_f32(w[e], n, k));
    const std::vector<double> de = bf16_rows(dy, m0, me);  // [me][N]
    for (int64_t m = 0; m < me; ++m)
      for (int64_t k = 0; k < K; ++k)
        store_sum(
            dx, m0 + m, k,
            dot(de.data() + static_cast<size_t>(m * N), wt.data() + static_cast<size_t>(k * N), N),
            accumulate);
    m0 += me;
  }
}

void grouped_gemm_wgrad_bf16(const TensorView& dy, const TensorView& x,
                             std::span<const TensorView> dw, std::span<const int64_t> m_splits,
                             bool accumulate) {
  const int64_t N = dy.cols, K = x.cols;
  int64_t m0 = 0;
  for (size_t e = 0; e < m_splits.size(); ++e) {
    const int64_t me = m_splits[e];
    // Transposed copies [N][me] and [K][me] so the token sum runs over contiguous memory.
    std::vector<double> d(static_cast<size_t>(N * me)), xv(static_cast<size_t>(K * me));
    for (int64_t m = 0; m < me; ++m) {
      for (int64_t n = 0; n < N; ++n)
        d[static_cast<size_t>(n * me + m)] = static_cast<double>(load_f32(dy, m0 + m, n));
      for (int64_t k = 0; k < K; ++k)
        xv[static_cast<size_t>(k * me + m)] = static_cast<double>(load_f32(x, m0 + m, k));
    }
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k)
        store_sum(dw[e], n, k,
                  dot(d.data() + static_cast<size_t>(n * me),
                      xv.data() + static_cast<size_t>(k * me), me),
                  accumulate);
    m0 += me;
  }
}

void transpose_block_weights(const ScaledTensor& w, const ScaledTensor& w_t) {
  const int64_t N = w.data.rows, K = w.data.cols;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) byte_at(w_t.data, k, n) = byte_at(w.data, n, k);
  for (int64_t i = 0; i < w.scale.rows; ++i)
    for (int64_t j = 0; j < w.scale.cols; ++j) scale_at(w_t.scale, j, i) = scale_at(w.scale, i, j);
}

}  // namespace fp8flow::ref
