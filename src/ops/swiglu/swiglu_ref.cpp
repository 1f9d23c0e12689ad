// CPU reference backend of the SwiGLU ops: the definition the CUDA kernels are tested against, bit
// for bit. Plain loops over rows and 1x128 tiles, written for reading; the element math and the
// encoders are the shared __host__ __device__ functions of swiglu_math.h.
#include <vector>

#include "common/ref_access.h"
#include "ops/swiglu/swiglu_backends.h"
#include "ops/swiglu/swiglu_math.h"

namespace fp8flow::ref {
namespace {

using swiglu_detail::OutKind;
namespace sd = swiglu_detail;

float prob_at(const TensorView& prob, bool weighted, int64_t m) {
  return weighted ? static_cast<const float*>(prob.data)[m] : 1.0f;
}

// Quantizes one row's results y[0, n) (n % 128 == 0) into data row `r` starting at column `col0`,
// with scales at scale[(col0 + t * 128) / 128][r].
template <OutKind K>
void quantize_row(const std::vector<float>& y, const ScaledTensor& out, int64_t r, int64_t col0) {
  const int64_t n = static_cast<int64_t>(y.size());
  for (int64_t c0 = 0; c0 < n; c0 += sd::kTile) {
    float amax = 0.0f;
    for (int64_t c = c0; c < c0 + sd::kTile; ++c) amax = sd::amax_max(amax, sd::amax_term(y[c]));
    const int e = sd::scale_exponent<K>(amax);
    scale_at(out.scale, (col0 + c0) / sd::kTile, r) = fmt::exp2i(e);
    const float inv = fmt::exp2i(-e);
    for (int64_t c = c0; c < c0 + sd::kTile; ++c)
      byte_at(out.data, r, col0 + c) = sd::encode_fp8<K>(y[c], inv);
  }
}

template <OutKind K>
void quantize_row(const std::vector<float>& y, const TensorView& out, int64_t r, int64_t col0) {
  auto* row = static_cast<uint16_t*>(out.data) + r * out.stride() + col0;
  for (size_t c = 0; c < y.size(); ++c) row[c] = sd::encode_bf16(y[c]);
}

template <OutKind K, typename Out>
void forward(const TensorView& in, const TensorView& prob, const Out& out, bool weighted) {
  const int64_t M = in.rows, F = in.cols / 2;
  std::vector<float> y(static_cast<size_t>(F));
  for (int64_t m = 0; m < M; ++m) {
    const float p = prob_at(prob, weighted, m);
    for (int64_t j = 0; j < F; ++j)
      y[j] = sd::forward(load_f32(in, m, j), load_f32(in, m, F + j), p);
    quantize_row<K>(y, out, m, 0);
  }
}

template <OutKind K, typename Out>
void backward(const TensorView& dy, const TensorView& in, const TensorView& prob, const Out& din,
              const TensorView& dprob, bool weighted) {
  const int64_t M = in.rows, F = in.cols / 2;
  std::vector<float> da(static_cast<size_t>(F)), db(static_cast<size_t>(F));
  std::vector<float> dp(static_cast<size_t>(F));
  for (int64_t m = 0; m < M; ++m) {
    const float p = prob_at(prob, weighted, m);
    for (int64_t j = 0; j < F; ++j) {
      const sd::Grad g =
          sd::backward(load_f32(dy, m, j), load_f32(in, m, j), load_f32(in, m, F + j), p);
      da[j] = g.da;
      db[j] = g.db;
      dp[j] = g.dp;
    }
    quantize_row<K>(da, din, m, 0);
    quantize_row<K>(db, din, m, F);
    if (!weighted) continue;
    // dprob: the documented order (swiglu.h), i.e. what one warp of the kernel does.
    float part[sd::kLanes];
    for (int l = 0; l < sd::kLanes; ++l) {
      part[l] = 0.0f;
      for (int64_t c0 = int64_t{l} * sd::kChunk; c0 < F; c0 += sd::kLanes * sd::kChunk)
        for (int64_t c = c0; c < c0 + sd::kChunk; ++c) part[l] = hd::add(part[l], dp[c]);
    }
    for (int d = sd::kLanes / 2; d >= 1; d /= 2)
      for (int l = 0; l < d; ++l) part[l] = hd::add(part[l], part[l + d]);
    static_cast<float*>(dprob.data)[m] = sd::canonical_f32(part[0]);
  }
}

}  // namespace

void swiglu(const TensorView& in, const TensorView& prob, const ScaledTensor& out, bool weighted) {
  if (out.data.dtype == DType::E4M3)
    forward<OutKind::E4M3>(in, prob, out, weighted);
  else
    forward<OutKind::E5M2>(in, prob, out, weighted);
}

void swiglu(const TensorView& in, const TensorView& prob, const TensorView& out, bool weighted) {
  forward<OutKind::BF16>(in, prob, out, weighted);
}

void swiglu_backward(const TensorView& dy, const TensorView& in, const TensorView& prob,
                     const ScaledTensor& din, const TensorView& dprob, bool weighted) {
  if (din.data.dtype == DType::E4M3)
    backward<OutKind::E4M3>(dy, in, prob, din, dprob, weighted);
  else
    backward<OutKind::E5M2>(dy, in, prob, din, dprob, weighted);
}

void swiglu_backward(const TensorView& dy, const TensorView& in, const TensorView& prob,
                     const TensorView& din, const TensorView& dprob, bool weighted) {
  backward<OutKind::BF16>(dy, in, prob, din, dprob, weighted);
}

}  // namespace fp8flow::ref
