// quantize / quantize_transposed / quantize_both / dequantize: validate on the host, then route to
// the reference backend (Cpu tensors) or the sm_90a backend (Cuda tensors).
#include "fp8flow/quantize.h"

#include "common/backend.h"
#include "ops/quantize/quantize_backends.h"

namespace fp8flow {
namespace {

using detail::Check;

void check_input(const Check& c, const TensorView& in) {
  c.view(in, "in", {DType::F32, DType::BF16});
  c.contiguous(in, "in");
  c.cols_multiple(in, "in", 16);
}

void check_rowwise_out(const Check& c, const TensorView& in, const ScaledTensor& out) {
  c.that(out.layout == ScaleLayout::Rowwise1x128 || out.layout == ScaleLayout::Block128x128,
         "out.layout", "Rowwise1x128 or Block128x128", to_string(out.layout));
  c.scaled(out, "out", out.layout, {DType::E4M3, DType::E5M2});
  c.that(out.col_groups.empty(), "out.col_groups", "empty (row-wise output of X [M][K])",
         detail::cat(out.col_groups.size(), " groups"));
  c.shape(out.data, "out.data", in.rows, in.cols);
  c.contiguous(out.data, "out.data");
  c.same_device(in, "in", out.data, "out.data");
}

void check_transposed_out(const Check& c, const TensorView& in, const ScaledTensor& out_t) {
  c.scaled(out_t, "out_t", ScaleLayout::Rowwise1x128, {DType::E4M3, DType::E5M2});
  c.shape(out_t.data, "out_t.data", in.cols, in.rows);
  c.contiguous(out_t.data, "out_t.data");
  c.same_device(in, "in", out_t.data, "out_t.data");
}

void check_cuda(const Check& c,
                std::initializer_list<std::pair<const TensorView*, const char*>> ts) {
  detail::require_cuda_backend(c);
  for (auto [t, name] : ts) detail::require_device_pointer(c, *t, name);
}

// The kernels read X and write row-wise codes with 16-byte vector accesses and FP32 scales with
// 4-byte stores. (Rows of X^T [K][M] may start anywhere: its kernel adapts its store width.)
void check_cuda_alignment(const Check& c, const TensorView& in, const ScaledTensor* out,
                          const ScaledTensor* out_t) {
  c.aligned(in, "in", 16);
  if (out) {
    c.aligned(out->data, "out.data", 16);
    c.aligned(out->scale, "out.scale", 4);
  }
  if (out_t) c.aligned(out_t->scale, "out_t.scale", 4);
}

}  // namespace

void quantize(const TensorView& in, const ScaledTensor& out, const QuantizeOptions&,
              Stream stream) {
  const Check c("quantize");
  check_input(c, in);
  check_rowwise_out(c, in, out);
  if (in.device == Device::Cpu) return ref::quantize(in, out);
  check_cuda(c, {{&in, "in"}, {&out.data, "out.data"}, {&out.scale, "out.scale"}});
  check_cuda_alignment(c, in, &out, nullptr);
  FP8FLOW_SM90(sm90::quantize(in, out, stream));
}

void quantize_transposed(const TensorView& in, const ScaledTensor& out_t, const QuantizeOptions&,
                         Stream stream) {
  const Check c("quantize_transposed");
  check_input(c, in);
  check_transposed_out(c, in, out_t);
  if (in.device == Device::Cpu) return ref::quantize_transposed(in, out_t);
  check_cuda(c, {{&in, "in"}, {&out_t.data, "out_t.data"}, {&out_t.scale, "out_t.scale"}});
  check_cuda_alignment(c, in, nullptr, &out_t);
  FP8FLOW_SM90(sm90::quantize_transposed(in, out_t, stream));
}

void quantize_both(const TensorView& in, const ScaledTensor& out, const ScaledTensor& out_t,
                   const QuantizeOptions&, Stream stream) {
  const Check c("quantize_both");
  check_input(c, in);
  check_rowwise_out(c, in, out);
  c.that(out.layout == ScaleLayout::Rowwise1x128, "out.layout", "Rowwise1x128",
         to_string(out.layout));
  check_transposed_out(c, in, out_t);
  if (in.device == Device::Cpu) {
    ref::quantize(in, out);
    ref::quantize_transposed(in, out_t);
    return;
  }
  check_cuda(c, {{&in, "in"},
                 {&out.data, "out.data"},
                 {&out.scale, "out.scale"},
                 {&out_t.data, "out_t.data"},
                 {&out_t.scale, "out_t.scale"}});
  check_cuda_alignment(c, in, &out, &out_t);
  FP8FLOW_SM90(sm90::quantize_both(in, out, out_t, stream));
}

void dequantize(const ScaledTensor& in, const TensorView& out, Stream stream) {
  const Check c("dequantize");
  const bool mx = in.layout == ScaleLayout::Mx1x32;
  c.scaled(in, "in", in.layout,
           mx ? std::initializer_list<DType>{DType::E2M1x2}
              : std::initializer_list<DType>{DType::E4M3, DType::E5M2});
  c.view(out, "out", {DType::F32, DType::BF16});
  c.shape(out, "out", in.data.rows, in.data.cols);
  c.same_device(in.data, "in.data", out, "out");
  if (in.data.device == Device::Cpu) return ref::dequantize(in, out);
  check_cuda(c, {{&in.data, "in.data"}, {&in.scale, "in.scale"}, {&out, "out"}});
  // Element alignment only: the kernel vectorizes where pointers and row pitches allow.
  c.aligned(out, "out", static_cast<size_t>(dtype_bits(out.dtype) / 8));
  if (!mx) c.aligned(in.scale, "in.scale", 4);
  FP8FLOW_SM90(sm90::dequantize(in, out, stream));
}

}  // namespace fp8flow
