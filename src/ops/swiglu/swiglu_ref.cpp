// CPU reference backend of the SwiGLU ops: the definition the CUDA kernels are tested against, bit
// for bit. Plain loops over rows and 1x128 tiles, written for reading; the element math and the
// encoders are the shared __host__ __device__ functions of swiglu_math.h.
#include <type_traits>
#include <vector>

#include "common/ref_access.h"
#include "ops/quantize/kernels/dequant_value.h"
#include "ops/swiglu/swiglu_backends.h"
#include "ops/swiglu/swiglu_math.h"

namespace fp8flow::ref {
namespace {

using swiglu_detail::OutKind;
namespace sd = swiglu_detail;

float prob_at(const TensorView& prob, bool weighted, int64_t m) {
  return weighted ? static_cast<const float*>(prob.data)[m] : 1.0f;
}

// Element (m, c) of the SwiGLU input [M][2F]: BF16, or its saved FP8 copy decoded exactly as
// dequantize() decodes it (code * scale, one FP32 multiply).
float in_at(const TensorView& in, int64_t m, int64_t c) {
  return load_f32(in, m, c);
}
float in_at(const ScaledTensor& in, int64_t m, int64_t c) {
  return detail::dequant_value(fmt::e4m3_to_f32(byte_at(in.data, m, c)),
                               scale_at(in.scale, c / sd::kTile, m));
}
const TensorView& data_of(const TensorView& in) {
  return in;
}
const TensorView& data_of(const ScaledTensor& in) {
  return in.data;
}

// Quantizes one row's values y[0, n) (n % 128 == 0) into data row `r` starting at column `col0`,
// with scales at scale[(col0 + t * 128) / 128][r].
template <OutKind K, sd::NanCode N = sd::NanCode::Canonical>
void quantize_row(const std::vector<float>& y, const ScaledTensor& out, int64_t r, int64_t col0) {
  const int64_t n = static_cast<int64_t>(y.size());
  for (int64_t c0 = 0; c0 < n; c0 += sd::kTile) {
    float amax = 0.0f;
    for (int64_t c = c0; c < c0 + sd::kTile; ++c) amax = sd::amax_max(amax, sd::amax_term(y[c]));
    const int e = sd::scale_exponent<K>(amax);
    scale_at(out.scale, (col0 + c0) / sd::kTile, r) = fmt::exp2i(e);
    const float inv = fmt::exp2i(-e);
    for (int64_t c = c0; c < c0 + sd::kTile; ++c)
      byte_at(out.data, r, col0 + c) = sd::encode_fp8<K, N>(y[c], inv);
  }
}

template <OutKind K>
void quantize_row(const std::vector<float>& y, const TensorView& out, int64_t r, int64_t col0) {
  auto* row = static_cast<uint16_t*>(out.data) + r * out.stride() + col0;
  for (size_t c = 0; c < y.size(); ++c) row[c] = sd::encode_bf16(y[c]);
}

// in_q (optional): the E4M3 1x128 copy of `in`, with the scale rule and encoding of quantize().
template <OutKind K, typename Out>
void forward(const TensorView& in, const TensorView& prob, const Out& out, bool weighted,
             const ScaledTensor* in_q = nullptr) {
  const int64_t M = in.rows, F = in.cols / 2;
  std::vector<float> y(static_cast<size_t>(F)), h(static_cast<size_t>(2 * F));
  for (int64_t m = 0; m < M; ++m) {
    const float p = prob_at(prob, weighted, m);
    for (int64_t j = 0; j < F; ++j)
      y[j] = sd::forward(load_f32(in, m, j), load_f32(in, m, F + j), p);
    quantize_row<K>(y, out, m, 0);
    if (in_q == nullptr) continue;
    for (int64_t c = 0; c < 2 * F; ++c) h[c] = load_f32(in, m, c);
    quantize_row<OutKind::E4M3, sd::NanCode::AsQuantize>(h, *in_q, m, 0);
  }
}

// In: TensorView (BF16) or ScaledTensor (its saved E4M3 copy, decoded by in_at).
template <OutKind K, typename In, typename Out>
void backward(const TensorView& dy, const In& in, const TensorView& prob, const Out& din,
              const TensorView& dprob, bool weighted) {
  const int64_t M = data_of(in).rows, F = data_of(in).cols / 2;
  std::vector<float> da(static_cast<size_t>(F)), db(static_cast<size_t>(F));
  std::vector<float> dp(static_cast<size_t>(F));
  for (int64_t m = 0; m < M; ++m) {
    const float p = prob_at(prob, weighted, m);
    for (int64_t j = 0; j < F; ++j) {
      const sd::Grad g = sd::backward(load_f32(dy, m, j), in_at(in, m, j), in_at(in, m, F + j), p);
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

// Calls fn(std::integral_constant<OutKind, K>) for the FP8 kind K of dtype d (E4M3 or E5M2).
template <typename Fn>
void with_fp8_kind(DType d, Fn&& fn) {
  if (d == DType::E4M3)
    fn(std::integral_constant<OutKind, OutKind::E4M3>{});
  else
    fn(std::integral_constant<OutKind, OutKind::E5M2>{});
}

}  // namespace

void swiglu(const TensorView& in, const TensorView& prob, const ScaledTensor& out, bool weighted) {
  with_fp8_kind(out.data.dtype, [&](auto k) { forward<k.value>(in, prob, out, weighted); });
}

void swiglu(const TensorView& in, const TensorView& prob, const TensorView& out, bool weighted) {
  forward<OutKind::BF16>(in, prob, out, weighted);
}

void swiglu(const TensorView& in, const TensorView& prob, const ScaledTensor& out,
            const ScaledTensor& in_q, bool weighted) {
  with_fp8_kind(out.data.dtype, [&](auto k) { forward<k.value>(in, prob, out, weighted, &in_q); });
}

void swiglu_backward(const TensorView& dy, const TensorView& in, const TensorView& prob,
                     const ScaledTensor& din, const TensorView& dprob, bool weighted) {
  with_fp8_kind(din.data.dtype,
                [&](auto k) { backward<k.value>(dy, in, prob, din, dprob, weighted); });
}

void swiglu_backward(const TensorView& dy, const TensorView& in, const TensorView& prob,
                     const TensorView& din, const TensorView& dprob, bool weighted) {
  backward<OutKind::BF16>(dy, in, prob, din, dprob, weighted);
}

void swiglu_backward(const TensorView& dy, const ScaledTensor& in, const TensorView& prob,
                     const ScaledTensor& din, const TensorView& dprob, bool weighted) {
  with_fp8_kind(din.data.dtype,
                [&](auto k) { backward<k.value>(dy, in, prob, din, dprob, weighted); });
}

}  // namespace fp8flow::ref
