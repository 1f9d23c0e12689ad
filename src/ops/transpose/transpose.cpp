// transpose_scaled: validate on the host, then route to the reference backend (Cpu tensors) or the
// sm_90a backend (Cuda tensors).
#include "fp8flow/transpose.h"

#include <cstdint>

#include "common/backend.h"
#include "ops/transpose/transpose_backends.h"

namespace fp8flow {
namespace {

using detail::Check;

void check_aligned_ptr(const Check& c, const TensorView& t, const char* arg, size_t bytes) {
  const auto addr = reinterpret_cast<uintptr_t>(t.data);
  c.that(addr % bytes == 0, arg, detail::cat("data pointer aligned to ", bytes, " bytes"),
         detail::cat("address ending 0x", std::hex, addr % 256));
}

bool policy_ok(TransposeScalePolicy p) {
  return p == TransposeScalePolicy::TileMax || p == TransposeScalePolicy::ColumnTight;
}

}  // namespace

void transpose_scaled(const ScaledTensor& in, const ScaledTensor& out_t,
                      const TransposeOptions& opts, Stream stream) {
  const Check c("transpose_scaled");
  c.that(in.layout == ScaleLayout::Rowwise1x128, "in.layout", "Rowwise1x128", to_string(in.layout));
  c.that(in.col_groups.empty(), "in.col_groups", "empty (in is row-wise X [M][K])",
         detail::cat(in.col_groups.size(), " groups"));
  c.scaled(in, "in", ScaleLayout::Rowwise1x128, {DType::E4M3});
  c.contiguous(in.data, "in.data");
  c.cols_multiple(in.data, "in.data", 128);
  const int64_t M = in.data.rows, K = in.data.cols;

  c.that(out_t.layout == ScaleLayout::Rowwise1x128, "out_t.layout", "Rowwise1x128",
         to_string(out_t.layout));
  c.view(out_t.data, "out_t.data", {DType::E4M3});
  c.shape(out_t.data, "out_t.data", K, M);
  c.contiguous(out_t.data, "out_t.data");
  c.scaled(out_t, "out_t", ScaleLayout::Rowwise1x128, {DType::E4M3});
  c.same_device(in.data, "in.data", out_t.data, "out_t.data");
  c.that(policy_ok(opts.policy), "opts.policy", "TileMax or ColumnTight",
         detail::cat(static_cast<int>(opts.policy)));

  if (in.data.device == Device::Cpu) {
    ref::transpose_scaled(in, out_t, opts.policy, opts.underflow_count);
    return;
  }
  detail::require_cuda_backend(c);
  detail::require_device_pointer(c, in.data, "in.data");
  detail::require_device_pointer(c, in.scale, "in.scale");
  detail::require_device_pointer(c, out_t.data, "out_t.data");
  detail::require_device_pointer(c, out_t.scale, "out_t.scale");
  if (opts.underflow_count) {
    const TensorView counter{opts.underflow_count, DType::I64, 1, 1, -1, Device::Cuda};
    detail::require_device_pointer(c, counter, "opts.underflow_count");
  }
  check_aligned_ptr(c, in.data, "in.data", 16);
  check_aligned_ptr(c, out_t.data, "out_t.data", 16);
  c.that(K / 128 <= 65535, "in.data", "at most 65535 * 128 columns (grid limit)",
         detail::cat(K, " columns"), ErrorKind::Unsupported);
#if FP8FLOW_WITH_CUDA
  sm90::transpose_scaled(in, out_t, opts.policy, opts.underflow_count, stream);
#else
  (void)stream;  // unreachable: require_cuda_backend throws in a CPU-only build
#endif
}

}  // namespace fp8flow
