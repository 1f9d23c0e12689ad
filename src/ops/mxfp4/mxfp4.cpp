// quantize_mxfp4 / fp8_to_mxfp4 / mxfp4_to_fp8 / mxfp4_to_fp8_transposed: validate on the host,
// then route to the reference backend (Cpu tensors) or the sm_90a backend (Cuda tensors).
#include "fp8flow/mxfp4.h"

#include <utility>

#include "common/backend.h"
#include "ops/mxfp4/mxfp4_backends.h"

namespace fp8flow {
namespace {

using detail::Check;

// MXFP4 [rows][cols]: E2M1x2 data, E8M0 scale [rows][cols/32], contiguous.
void check_mx(const Check& c, const ScaledTensor& t, const std::string& arg) {
  c.scaled(t, arg, ScaleLayout::Mx1x32, {DType::E2M1x2});
  c.contiguous(t.data, arg + ".data");
}

// FP8 row-wise [rows][cols]: E4M3, Rowwise1x128 in one column group, scale [cols/128][rows].
void check_fp8_rowwise(const Check& c, const ScaledTensor& t, const std::string& arg) {
  c.that(t.col_groups.empty(), arg + ".col_groups", "empty (row-wise tensor [M][K])",
         detail::cat(t.col_groups.size(), " groups"));
  c.scaled(t, arg, ScaleLayout::Rowwise1x128, {DType::E4M3});
  c.contiguous(t.data, arg + ".data");
}

void check_cuda_pointers(const Check& c,
                         std::initializer_list<std::pair<const TensorView*, std::string>> ts) {
  detail::require_cuda_backend(c);
  for (const auto& [t, name] : ts) detail::require_device_pointer(c, *t, name);
}

// The kernels move data in 16-byte vectors and F32 scales as words.
void check_pointer_aligned(const Check& c, const TensorView& t, const std::string& arg,
                           size_t bytes) {
  const auto addr = reinterpret_cast<uintptr_t>(t.data);
  c.that(addr % bytes == 0, arg, detail::cat("data pointer aligned to ", bytes, " bytes"),
         detail::cat("address ending 0x", std::hex, addr % 256));
}

}  // namespace

void quantize_mxfp4(const TensorView& in, const ScaledTensor& out, Stream stream) {
  const Check c("quantize_mxfp4");
  c.view(in, "in", {DType::F32, DType::BF16});
  c.contiguous(in, "in");
  c.cols_multiple(in, "in", 32);
  check_mx(c, out, "out");
  c.shape(out.data, "out.data", in.rows, in.cols);
  c.same_device(in, "in", out.data, "out.data");
  if (in.device == Device::Cpu) return ref::quantize_mxfp4(in, out);
  check_cuda_pointers(c, {{&in, "in"}, {&out.data, "out.data"}, {&out.scale, "out.scale"}});
  check_pointer_aligned(c, in, "in", 16);
  check_pointer_aligned(c, out.data, "out.data", 16);
  FP8FLOW_SM90(sm90::quantize_mxfp4(in, out, stream));
}

void fp8_to_mxfp4(const ScaledTensor& in, const ScaledTensor& out, Stream stream) {
  fp8_to_mxfp4(in, out, Mxfp4Rounding{}, stream);
}

void fp8_to_mxfp4(const ScaledTensor& in, const ScaledTensor& out, const Mxfp4Rounding& rounding,
                  Stream stream) {
  const Check c("fp8_to_mxfp4");
  check_fp8_rowwise(c, in, "in");
  c.cols_multiple(in.data, "in.data", 128);
  check_mx(c, out, "out");
  c.shape(out.data, "out.data", in.data.rows, in.data.cols);
  c.same_device(in.data, "in.data", out.data, "out.data");
  if (in.data.device == Device::Cpu) return ref::fp8_to_mxfp4(in, out, rounding);
  check_cuda_pointers(c, {{&in.data, "in.data"},
                          {&in.scale, "in.scale"},
                          {&out.data, "out.data"},
                          {&out.scale, "out.scale"}});
  check_pointer_aligned(c, in.data, "in.data", 16);
  check_pointer_aligned(c, in.scale, "in.scale", 4);
  check_pointer_aligned(c, out.data, "out.data", 16);
  FP8FLOW_SM90(sm90::fp8_to_mxfp4(in, out, rounding, stream));
}

void mxfp4_to_fp8(const ScaledTensor& in, const ScaledTensor& out, Stream stream) {
  const Check c("mxfp4_to_fp8");
  check_mx(c, in, "in");
  c.cols_multiple(in.data, "in.data", 128);
  check_fp8_rowwise(c, out, "out");
  c.shape(out.data, "out.data", in.data.rows, in.data.cols);
  c.same_device(in.data, "in.data", out.data, "out.data");
  if (in.data.device == Device::Cpu) return ref::mxfp4_to_fp8(in, out);
  check_cuda_pointers(c, {{&in.data, "in.data"},
                          {&in.scale, "in.scale"},
                          {&out.data, "out.data"},
                          {&out.scale, "out.scale"}});
  check_pointer_aligned(c, in.data, "in.data", 16);
  check_pointer_aligned(c, out.data, "out.data", 16);
  check_pointer_aligned(c, out.scale, "out.scale", 4);
  FP8FLOW_SM90(sm90::mxfp4_to_fp8(in, out, stream));
}

void mxfp4_to_fp8_transposed(const ScaledTensor& in, const ScaledTensor& out_t, Stream stream) {
  const Check c("mxfp4_to_fp8_transposed");
  check_mx(c, in, "in");
  c.cols_multiple(in.data, "in.data", 128);
  c.scaled(out_t, "out_t", ScaleLayout::Rowwise1x128, {DType::E4M3});
  c.shape(out_t.data, "out_t.data", in.data.cols, in.data.rows);
  c.contiguous(out_t.data, "out_t.data");
  c.same_device(in.data, "in.data", out_t.data, "out_t.data");
  if (in.data.device == Device::Cpu) return ref::mxfp4_to_fp8_transposed(in, out_t);
  check_cuda_pointers(c, {{&in.data, "in.data"},
                          {&in.scale, "in.scale"},
                          {&out_t.data, "out_t.data"},
                          {&out_t.scale, "out_t.scale"}});
  check_pointer_aligned(c, in.data, "in.data", 16);
  // out_t rows are M bytes long, so only the base is required aligned; rows and group offsets that
  // are not 16-byte aligned take the kernel's byte-store path.
  check_pointer_aligned(c, out_t.data, "out_t.data", 16);
  check_pointer_aligned(c, out_t.scale, "out_t.scale", 4);
  FP8FLOW_SM90(sm90::mxfp4_to_fp8_transposed(in, out_t, stream));
}

}  // namespace fp8flow
