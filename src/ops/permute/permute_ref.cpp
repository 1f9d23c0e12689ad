// CPU reference backend of the permute ops: plain loops that define the results the CUDA kernels
// must match bit for bit (same FP32 operations through hd::, same order, same NaN rule).
#include <cstring>
#include <vector>

#include "common/hd_math.h"
#include "common/ref_access.h"
#include "ops/permute/permute_backends.h"

namespace fp8flow::ref {
namespace {

// The canonical quiet NaN written wherever FP32 arithmetic produced a NaN (the GPU returns
// 0x7FFFFFFF, x86 propagates an operand's payload: both are mapped to this).
float canonical_nan(float x) {
  return fmt::f32_is_nan(x) ? fmt::f32_from_bits(0x7FC00000u) : x;
}

const int32_t* i32(const TensorView& t) {
  return static_cast<const int32_t*>(t.data);
}
const float* f32(const TensorView& t) {
  return static_cast<const float*>(t.data);
}

}  // namespace

void make_permutation(const TensorView& topk_idx, int64_t num_experts, const PermutationPlan& plan,
                      int align) {
  const int64_t n = topk_idx.numel(), E = num_experts;
  const int32_t* idx = i32(topk_idx);
  std::vector<int64_t> count(static_cast<size_t>(E), 0), offset(static_cast<size_t>(E + 1), 0);
  int64_t invalid = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int32_t e = idx[i];
    if (e >= 0 && e < E)
      ++count[static_cast<size_t>(e)];
    else
      ++invalid;
  }
  for (int64_t e = 0; e < E; ++e)
    offset[static_cast<size_t>(e + 1)] =
        offset[static_cast<size_t>(e)] +
        (count[static_cast<size_t>(e)] + align - 1) / align * align;

  int32_t* src = static_cast<int32_t*>(plan.src_slot.data);
  int32_t* dest = static_cast<int32_t*>(plan.dest_row.data);
  for (int64_t r = 0; r < plan.src_slot.numel(); ++r) src[r] = -1;
  std::vector<int64_t> next(offset.begin(), offset.end() - 1);
  for (int64_t i = 0; i < n; ++i) {
    const int32_t e = idx[i];
    if (e < 0 || e >= E) {
      dest[i] = -1;
      continue;
    }
    const int64_t row = next[static_cast<size_t>(e)]++;
    dest[i] = static_cast<int32_t>(row);
    src[row] = static_cast<int32_t>(i);
  }
  for (int64_t e = 0; e < E; ++e)
    static_cast<int32_t*>(plan.tokens_per_expert.data)[e] =
        static_cast<int32_t>(count[static_cast<size_t>(e)]);
  for (int64_t e = 0; e <= E; ++e) {
    if (plan.offsets.dtype == DType::I64)
      static_cast<int64_t*>(plan.offsets.data)[e] = offset[static_cast<size_t>(e)];
    else
      static_cast<int32_t*>(plan.offsets.data)[e] =
          static_cast<int32_t>(offset[static_cast<size_t>(e)]);
  }
  static_cast<int32_t*>(plan.invalid.data)[0] = static_cast<int32_t>(invalid);
}

void permute_rows(const detail::PermuteRowsArgs& a) {
  const int64_t R = a.out.rows, T = a.in.rows, H = a.in.cols, k = a.k, pairs = T * k;
  const size_t row_bytes = a.in.row_bytes();
  const int32_t* src = i32(a.src_slot);
  const float* w = f32(a.topk_weight);
  const float pad_scale = fmt::exp2i(fmt::kMinScaleExp);  // 2^-127: the all-zero tile's scale
  for (int64_t r = 0; r < R; ++r) {
    const int32_t slot = src[r];
    const bool valid = slot >= 0 && slot < pairs;
    const int64_t t = valid ? slot / k : 0;
    auto* out_row = static_cast<uint8_t*>(a.out.data) + r * row_bytes;
    const auto* in_row = static_cast<const uint8_t*>(a.in.data) + t * row_bytes;
    if (!valid) {
      std::memset(out_row, 0, row_bytes);
    } else if (a.scale_by_prob) {
      for (int64_t h = 0; h < H; ++h)
        store_f32(a.out, r, h, canonical_nan(hd::mul(load_f32(a.in, t, h), w[slot])));
    } else {
      std::memcpy(out_row, in_row, row_bytes);
    }
    if (a.col_scale) {
      for (int64_t b = 0; b < a.in_scale.rows; ++b)
        scale_at(a.out_scale, b, r) = valid ? scale_at(a.in_scale, b, t) : pad_scale;
    }
    if (a.row_scale) {
      const int64_t nb = a.in_scale.cols;
      auto* o = static_cast<uint8_t*>(a.out_scale.data) + r * nb;
      if (valid)
        std::memcpy(o, static_cast<const uint8_t*>(a.in_scale.data) + t * nb,
                    static_cast<size_t>(nb));
      else
        std::memset(o, 0, static_cast<size_t>(nb));
    }
    if (a.probs) static_cast<float*>(a.prob.data)[r] = valid ? w[slot] : 0.0f;
  }
}

void unpermute(const TensorView& y, const TensorView* topk_weight, const TensorView& out,
               const TensorView& dest_row) {
  const int64_t T = out.rows, H = out.cols, k = dest_row.cols, R = y.rows;
  const int32_t* dest = i32(dest_row);
  const float* w = topk_weight ? f32(*topk_weight) : nullptr;
  for (int64_t t = 0; t < T; ++t) {
    int n = 0;
    for (int64_t j = 0; j < k; ++j) n += dest[t * k + j] >= 0 && dest[t * k + j] < R;
    const bool arith = w != nullptr || n >= 2;
    if (!arith && n == 1 && y.dtype == out.dtype) {  // one contribution: copied, bits unchanged
      for (int64_t j = 0; j < k; ++j) {
        const int32_t d = dest[t * k + j];
        if (d < 0 || d >= R) continue;
        std::memcpy(static_cast<uint8_t*>(out.data) + t * out.row_bytes(),
                    static_cast<const uint8_t*>(y.data) + d * y.row_bytes(), out.row_bytes());
      }
      continue;
    }
    for (int64_t h = 0; h < H; ++h) {
      float acc = 0.0f;
      bool first = true;
      for (int64_t j = 0; j < k; ++j) {
        const int32_t d = dest[t * k + j];
        if (d < 0 || d >= R) continue;
        float v = load_f32(y, d, h);
        if (w) v = hd::mul(v, w[t * k + j]);
        acc = first ? v : hd::add(acc, v);
        first = false;
      }
      store_f32(out, t, h, arith ? canonical_nan(acc) : acc);
    }
  }
}

void permute_probs_backward(const TensorView& dprob, const TensorView& dest_row,
                            const TensorView& dweight) {
  const int64_t n = dest_row.numel(), R = dprob.numel();
  const int32_t* dest = i32(dest_row);
  for (int64_t i = 0; i < n; ++i)
    static_cast<float*>(dweight.data)[i] = dest[i] >= 0 && dest[i] < R ? f32(dprob)[dest[i]] : 0.0f;
}

void unpermute_weight_grad(const TensorView& dout, const TensorView& y, const TensorView& dest_row,
                           const TensorView& dweight) {
  const int64_t T = dout.rows, H = dout.cols, k = dest_row.cols, R = y.rows;
  const int32_t* dest = i32(dest_row);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t j = 0; j < k; ++j) {
      const int32_t d = dest[t * k + j];
      float result = 0.0f;
      if (d >= 0 && d < R) {
        // 8-element chunk c accumulates into partial c % 32 (the CUDA lane that loads it).
        float p[32] = {};
        for (int64_t c = 0; c < H / 8; ++c)
          for (int64_t i = 0; i < 8; ++i)
            p[c % 32] = hd::fma(load_f32(dout, t, c * 8 + i), load_f32(y, d, c * 8 + i), p[c % 32]);
        for (int s = 16; s >= 1; s /= 2)
          for (int l = 0; l < s; ++l) p[l] = hd::add(p[l], p[l + s]);
        result = canonical_nan(p[0]);
      }
      static_cast<float*>(dweight.data)[t * k + j] = result;
    }
  }
}

}  // namespace fp8flow::ref
