// sm_90a backend of quantize / quantize_transposed / quantize_both / dequantize: picks the kernel
// instance for the dtypes and layout, sizes the grid, launches on the caller's stream. Arguments
// were validated by quantize.cpp (shapes, dtypes, groups, device pointers, alignment).
// Kernels: kernels/quantize_tile.cuh (row-wise, column-wise, both), kernels/quantize_block.cuh
// (128x128 weights), kernels/dequantize.cuh.
#include <cuda_runtime.h>

#include "common/cuda_check.h"
#include "common/groups.h"
#include "ops/quantize/kernels/dequantize.cuh"
#include "ops/quantize/kernels/quantize_block.cuh"
#include "ops/quantize/kernels/quantize_tile.cuh"
#include "ops/quantize/quantize_backends.h"

namespace fp8flow::sm90 {
namespace {

cudaStream_t as_cuda(Stream s) {
  return reinterpret_cast<cudaStream_t>(s);
}

// Calls f(In{}, std::bool_constant<kE5M2>{}) for the runtime dtypes.
template <typename Fn>
void dispatch_in_fp8(DType in, DType fp8, Fn&& f) {
  const bool e5 = fp8 == DType::E5M2;
  if (in == DType::BF16) {
    if (e5)
      f(uint16_t{}, std::true_type{});
    else
      f(uint16_t{}, std::false_type{});
  } else {
    if (e5)
      f(float{}, std::true_type{});
    else
      f(float{}, std::false_type{});
  }
}

// Row-wise and/or column-wise tile kernel over token tiles `tiles` (UniformTiles or GroupTiles).
template <bool kRow, bool kCol, typename Tiles>
void launch_tile(const char* op, const TensorView& in, int32_t num_tiles, const Tiles& tiles,
                 const ScaledTensor* out, const ScaledTensor* out_t, DType fp8, Stream stream) {
  TileArgs a{};
  a.in = in.data;
  a.M = static_cast<int32_t>(in.rows);
  a.K = static_cast<int32_t>(in.cols);
  a.tiles_k = static_cast<int32_t>((in.cols + 127) / 128);
  if (out) {
    a.out = static_cast<uint8_t*>(out->data.data);
    a.scale = static_cast<float*>(out->scale.data);
  }
  if (out_t) {
    a.out_t = static_cast<uint8_t*>(out_t->data.data);
    a.scale_t = static_cast<float*>(out_t->scale.data);
  }
  const int64_t blocks = static_cast<int64_t>(num_tiles) * a.tiles_k;
  if (blocks == 0) return;
  dispatch_in_fp8(in.dtype, fp8, [&](auto in_tag, auto e5_tag) {
    using In = decltype(in_tag);
    constexpr bool kE5M2 = decltype(e5_tag)::value;
    sm90_quantize_tile_kernel<In, kE5M2, kRow, kCol, Tiles>
        <<<static_cast<unsigned>(blocks), TileCfg<In>::kThreads, 0, as_cuda(stream)>>>(a, tiles);
  });
  FP8FLOW_CUDA_CHECK_LAUNCH(op);
}

// Column-wise (and optionally row-wise) over the token tiles of out_t.col_groups.
template <bool kRow>
void launch_transposed(const char* op, const TensorView& in, const ScaledTensor* out,
                       const ScaledTensor& out_t, Stream stream) {
  if (in.rows == 0 || in.cols == 0) return;
  const DType fp8 = out_t.data.dtype;
  if (out_t.col_groups.empty()) {
    const UniformTiles u{static_cast<int32_t>(in.rows)};
    launch_tile<kRow, true>(op, in, static_cast<int32_t>((in.rows + 127) / 128), u, out, &out_t,
                            fp8, stream);
  } else {
    const detail::GroupTiles g = detail::make_group_tiles(out_t.col_groups, in.rows);
    launch_tile<kRow, true>(op, in, g.total_tiles, g, out, &out_t, fp8, stream);
  }
}

}  // namespace

void quantize(const TensorView& in, const ScaledTensor& out, Stream stream) {
  const int64_t M = in.rows, K = in.cols;
  if (M == 0 || K == 0) return;
  const DType fp8 = out.data.dtype;
  if (out.layout == ScaleLayout::Block128x128) {
    const int32_t tiles_k = static_cast<int32_t>((K + 127) / 128);
    const int64_t blocks = ((M + 127) / 128) * tiles_k;
    dispatch_in_fp8(in.dtype, fp8, [&](auto in_tag, auto e5_tag) {
      using In = decltype(in_tag);
      constexpr bool kE5M2 = decltype(e5_tag)::value;
      sm90_quantize_block128_kernel<In, kE5M2>
          <<<static_cast<unsigned>(blocks), kBlockQuantThreads, 0, as_cuda(stream)>>>(
              static_cast<const In*>(in.data), static_cast<int32_t>(M), static_cast<int32_t>(K),
              tiles_k, static_cast<uint8_t*>(out.data.data), static_cast<float*>(out.scale.data));
    });
    FP8FLOW_CUDA_CHECK_LAUNCH("quantize");
    return;
  }
  const UniformTiles u{static_cast<int32_t>(M)};
  launch_tile<true, false>("quantize", in, static_cast<int32_t>((M + 127) / 128), u, &out, nullptr,
                           fp8, stream);
}

void quantize_transposed(const TensorView& in, const ScaledTensor& out_t, Stream stream) {
  launch_transposed<false>("quantize_transposed", in, nullptr, out_t, stream);
}

void quantize_both(const TensorView& in, const ScaledTensor& out, const ScaledTensor& out_t,
                   Stream stream) {
  if (out.data.dtype != out_t.data.dtype) {
    // Two FP8 formats: the fused kernel is instantiated per format, so run the two halves.
    quantize(in, out, stream);
    quantize_transposed(in, out_t, stream);
    return;
  }
  launch_transposed<true>("quantize_both", in, &out, out_t, stream);
}

namespace {

template <DqCodes kCodes, DqLayout kLayout, typename Out>
void launch_dequant(const DequantArgs& base, const dq::DqTilesParam<kLayout>& tp, bool vec,
                    Stream stream) {
  DequantArgs a = base;
  if (vec) {
    constexpr int kElems = kCodes == DqCodes::E2M1 ? 32 : 16;
    a.lanes_c = a.C / kElems;
    int lanes = 1;
    while (lanes < a.lanes_c && lanes < 64) lanes *= 2;
    const int rows = kDqThreads / lanes;
    a.nb_c = (a.lanes_c + lanes - 1) / lanes;
    const int64_t rows_per_cta = static_cast<int64_t>(rows) * kDqRowsPerThread;
    const int64_t blocks = a.nb_c * ((a.R + rows_per_cta - 1) / rows_per_cta);
    sm90_dequantize_vec_kernel<kCodes, kLayout, Out>
        <<<static_cast<unsigned>(blocks), dim3(lanes, rows), 0, as_cuda(stream)>>>(a, tp);
  } else {
    a.lanes_c = a.C;
    a.nb_c = (a.C + 31) / 32;
    const int64_t blocks = a.nb_c * ((a.R + 7) / 8);
    sm90_dequantize_scalar_kernel<kCodes, kLayout, Out>
        <<<static_cast<unsigned>(blocks), dim3(32, 8), 0, as_cuda(stream)>>>(a, tp);
  }
  FP8FLOW_CUDA_CHECK_LAUNCH("dequantize");
}

template <DqCodes kCodes, typename Out>
void dequant_layout(const ScaledTensor& in, const DequantArgs& a, bool vec, Stream stream) {
  if constexpr (kCodes == DqCodes::E2M1) {
    launch_dequant<kCodes, DqLayout::Mx, Out>(a, 0, vec, stream);
  } else if (in.layout == ScaleLayout::Block128x128) {
    launch_dequant<kCodes, DqLayout::Block, Out>(a, 0, vec, stream);
  } else if (in.col_groups.empty()) {
    launch_dequant<kCodes, DqLayout::RowwiseUniform, Out>(a, 0, vec, stream);
  } else {
    const detail::GroupTiles g = detail::make_group_tiles(in.col_groups, in.data.cols);
    launch_dequant<kCodes, DqLayout::RowwiseGrouped, Out>(a, g, vec, stream);
  }
}

bool aligned16(const void* p, size_t pitch_bytes) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && pitch_bytes % 16 == 0;
}

}  // namespace

void dequantize(const ScaledTensor& in, const TensorView& out, Stream stream) {
  const int64_t R = in.data.rows, C = in.data.cols;
  if (R == 0 || C == 0) return;
  const bool mx = in.layout == ScaleLayout::Mx1x32;
  DequantArgs a{};
  a.in = static_cast<const uint8_t*>(in.data.data);
  a.in_pitch = static_cast<int64_t>(in.data.row_bytes());
  a.scale = in.scale.data;
  a.scale_ld = in.scale.stride();
  a.out = out.data;
  a.out_ld = out.stride();
  a.R = static_cast<int32_t>(R);
  a.C = static_cast<int32_t>(C);
  a.tiles_c = static_cast<int32_t>((C + 127) / 128);
  const bool vec = (mx || C % 16 == 0) && aligned16(in.data.data, in.data.row_bytes()) &&
                   aligned16(out.data, out.row_bytes());
  const bool bf16 = out.dtype == DType::BF16;
  auto run = [&](auto codes_tag) {
    constexpr DqCodes kCodes = decltype(codes_tag)::value;
    if (bf16)
      dequant_layout<kCodes, uint16_t>(in, a, vec, stream);
    else
      dequant_layout<kCodes, float>(in, a, vec, stream);
  };
  if (mx)
    run(std::integral_constant<DqCodes, DqCodes::E2M1>{});
  else if (in.data.dtype == DType::E5M2)
    run(std::integral_constant<DqCodes, DqCodes::E5M2>{});
  else
    run(std::integral_constant<DqCodes, DqCodes::E4M3>{});
}

}  // namespace fp8flow::sm90
