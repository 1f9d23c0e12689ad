// fp8flow's PyTorch binding: converts torch tensors to fp8flow views and registers the ops with
// TORCH_LIBRARY(fp8flow, ...), so they are reachable as torch.ops.fp8flow.* (and from TorchScript /
// torch.compile, where the tensor-only ops have Meta kernels for shape inference). No numerics
// here: every computation is the C++ library's; this file allocates outputs, picks the device, the
// current CUDA stream, and maps dtypes.
//
// Tensors: 2-D; inputs are made contiguous (.contiguous(): a copy only when strided), outputs are
// allocated contiguous here. dtype mapping torch -> fp8flow:
//   float32 F32, bfloat16 BF16, float8_e4m3fn E4M3, float8_e5m2 E5M2, float8_e8m0fnu E8M0,
//   float4_e2m1fn_x2 E2M1x2 ([R][C/2] bytes = [R][C] logical elements), int32 I32, int64 I64,
//   uint8: whichever byte format the argument expects (so code written for torch builds without the
//   float8/float4 dtypes still works). Outputs use the native torch dtypes where this torch has
//   them (float8 since 2.1, float8_e8m0fnu since 2.7, float4_e2m1fn_x2 since 2.8), uint8 otherwise.
// Devices: CPU tensors run the library's reference backend, CUDA tensors its sm_90a backend on
//   the tensor's device and the current torch CUDA stream (no host synchronization added here).
// Errors: fp8flow::Error (a std::runtime_error) propagates unchanged; torch turns it into a
//   Python RuntimeError with the same message, which fp8flow/_errors.py re-raises as fp8flow.Error.
//   Errors this file raises itself use the library's "fp8flow::<op>: <arg>: expected X, got Y"
//   form.
//
// The MoE layer: a torch custom class fp8flow.MoELayer owns the C++ MoELayer (pools, FP8 weight
// copies) and holds the weight tensors it views; fp8flow.MoEContext holds one MoEContext (saved
// state of one forward) and returns it to its layer's free list when destroyed, so contexts are
// allocated once and reused step after step (one per forward in flight). Expert parallelism: the
// layer's constructor takes an optional fp8flow.Communicator (ep_size = its ranks; w1/w2 then hold
// the rank's local experts) and keeps a reference to it, so the communicator outlives the layer.
#include <torch/custom_class.h>
#include <torch/extension.h>
#include <torch/library.h>
#include <torch/version.h>

#include <cstring>
#include <memory>
#include <mutex>
#include <span>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#ifdef FP8FLOW_PY_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "fp8flow/comm.h"
#include "fp8flow/fp8flow.h"

#define FP8FLOW_TORCH_AT_LEAST(major, minor) \
  (TORCH_VERSION_MAJOR > (major) ||          \
   (TORCH_VERSION_MAJOR == (major) && TORCH_VERSION_MINOR >= (minor)))

namespace fp8flow::py {
namespace {

template <typename... A>
std::string cat(const A&... a) {
  std::ostringstream os;
  (os << ... << a);
  return os.str();
}

[[noreturn]] void fail(const std::string& op, const std::string& arg, const std::string& expected,
                       const std::string& got, ErrorKind kind = ErrorKind::InvalidArgument) {
  throw Error(kind, cat("fp8flow::", op, ": ", arg, ": expected ", expected, ", got ", got));
}

// ---- dtypes ------------------------------------------------------------------------------------

bool is_byte_format(DType d) {
  return d == DType::E4M3 || d == DType::E5M2 || d == DType::E8M0 || d == DType::E2M1x2;
}

// torch dtype -> fp8flow dtype; `want` resolves uint8 (a byte format the argument expects).
DType dtype_of(const at::Tensor& t, DType want, const std::string& op, const std::string& arg) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::F32;
    case at::kBFloat16:
      return DType::BF16;
    case at::kInt:
      return DType::I32;
    case at::kLong:
      return DType::I64;
#if FP8FLOW_TORCH_AT_LEAST(2, 1)
    case c10::ScalarType::Float8_e4m3fn:
      return DType::E4M3;
    case c10::ScalarType::Float8_e5m2:
      return DType::E5M2;
#endif
#if FP8FLOW_TORCH_AT_LEAST(2, 7)
    case c10::ScalarType::Float8_e8m0fnu:
      return DType::E8M0;
#endif
#if FP8FLOW_TORCH_AT_LEAST(2, 8)
    case c10::ScalarType::Float4_e2m1fn_x2:
      return DType::E2M1x2;
#endif
    case at::kByte:
      if (is_byte_format(want)) return want;
      break;
    default:
      break;
  }
  fail(op, arg + ".dtype", cat("a dtype fp8flow maps (", to_string(want), " here)"),
       cat(t.scalar_type()));
}

// fp8flow dtype -> the torch dtype outputs are allocated with.
at::ScalarType scalar_of(DType d) {
  switch (d) {
    case DType::F32:
      return at::kFloat;
    case DType::BF16:
      return at::kBFloat16;
    case DType::I32:
      return at::kInt;
    case DType::I64:
      return at::kLong;
#if FP8FLOW_TORCH_AT_LEAST(2, 1)
    case DType::E4M3:
      return c10::ScalarType::Float8_e4m3fn;
    case DType::E5M2:
      return c10::ScalarType::Float8_e5m2;
#endif
#if FP8FLOW_TORCH_AT_LEAST(2, 7)
    case DType::E8M0:
      return c10::ScalarType::Float8_e8m0fnu;
#endif
#if FP8FLOW_TORCH_AT_LEAST(2, 8)
    case DType::E2M1x2:
      return c10::ScalarType::Float4_e2m1fn_x2;
#endif
    default:
      return at::kByte;
  }
}

DType fp8_format(const std::string& fmt, const std::string& op) {
  if (fmt == "e4m3") return DType::E4M3;
  if (fmt == "e5m2") return DType::E5M2;
  fail(op, "fmt", "'e4m3' or 'e5m2'", cat("'", fmt, "'"));
}

// ---- devices and streams -----------------------------------------------------------------------

Device device_of(const at::Tensor& t, const std::string& op, const std::string& arg) {
  if (t.is_cpu()) return Device::Cpu;
  if (t.is_cuda()) return Device::Cuda;
  fail(op, arg + ".device", "cpu or cuda", cat(t.device()));
}

// Makes the tensor's CUDA device current (restored on exit) and names the current torch stream.
class DeviceScope {
 public:
  DeviceScope(const at::Tensor& t, const std::string& op) {
    if (!t.is_cuda()) return;
#ifdef FP8FLOW_PY_CUDA
    guard_.set_device(t.device());
    stream_ =
        reinterpret_cast<Stream>(c10::cuda::getCurrentCUDAStream(t.device().index()).stream());
#else
    fail(op, "device", "cpu (this fp8flow torch extension was built without CUDA)", cat(t.device()),
         ErrorKind::Unsupported);
#endif
  }
  Stream stream() const {
    return stream_;
  }

 private:
#ifdef FP8FLOW_PY_CUDA
  c10::cuda::OptionalCUDAGuard guard_;
#endif
  Stream stream_ = nullptr;
};

// ---- views -------------------------------------------------------------------------------------

// A 2-D tensor with unit-stride rows as a TensorView (E2M1x2: logical elements, two per byte).
TensorView view_of(const at::Tensor& t, const std::string& op, const std::string& arg,
                   DType want = DType::F32) {
  if (!t.defined()) fail(op, arg, "a tensor", "None");
  if (t.dim() != 2) fail(op, arg, "a 2-D tensor", cat(t.dim(), "-D"));
  const DType d = dtype_of(t, want, op, arg);
  const int64_t rows = t.size(0), cols = t.size(1);
  if (cols > 1 && t.stride(1) != 1 && rows * cols > 0)
    fail(op, arg, "rows with unit stride (stride(1) == 1)",
         cat("strides (", t.stride(0), ", ", t.stride(1), ")"));
  const int64_t ld = rows > 1 ? t.stride(0) : cols;
  if (ld < cols) fail(op, arg, cat("stride(0) >= ", cols), cat(ld));
  TensorView v;
  v.data = rows * cols > 0 ? t.data_ptr() : nullptr;
  v.dtype = d;
  const int mult = d == DType::E2M1x2 ? 2 : 1;
  v.rows = rows;
  v.cols = cols * mult;
  v.ld = ld * mult;
  v.device = device_of(t, op, arg);
  return v;
}

// Output allocation: [rows][cols] logical elements of dtype d (E2M1x2: [rows][cols/2] bytes).
at::Tensor alloc(DType d, int64_t rows, int64_t cols, const at::Tensor& like) {
  const int64_t storage_cols = d == DType::E2M1x2 ? cols / 2 : cols;
  return at::empty({rows, storage_cols}, like.options().dtype(scalar_of(d)));
}

std::vector<int64_t> groups_of(c10::ArrayRef<int64_t> g) {
  return std::vector<int64_t>(g.begin(), g.end());
}

ScaledTensor scaled_of(const at::Tensor& data, const at::Tensor& scale, ScaleLayout layout,
                       const std::vector<int64_t>& groups, const std::string& op,
                       const std::string& arg) {
  const DType data_want = layout == ScaleLayout::Mx1x32 ? DType::E2M1x2 : DType::E4M3;
  const DType scale_want = layout == ScaleLayout::Mx1x32 ? DType::E8M0 : DType::F32;
  ScaledTensor s;
  s.data = view_of(data, op, arg + ".data", data_want);
  s.scale = view_of(scale, op, arg + ".scale", scale_want);
  s.layout = layout;
  s.col_groups = std::span<const int64_t>(groups.data(), groups.size());
  return s;
}

ScaleLayout fp8_layout(const std::string& layout, const std::string& op) {
  if (layout == "rowwise") return ScaleLayout::Rowwise1x128;
  if (layout == "block") return ScaleLayout::Block128x128;
  if (layout == "mx") return ScaleLayout::Mx1x32;
  fail(op, "layout", "'rowwise', 'block' or 'mx'", cat("'", layout, "'"));
}

void check_2d(const at::Tensor& t, const std::string& op, const std::string& arg) {
  if (t.dim() != 2) fail(op, arg, "a 2-D tensor", cat(t.dim(), "-D"));
}

// ---- tensor ops (CPU and CUDA kernels; Meta kernels below) -------------------------------------

std::tuple<at::Tensor, at::Tensor> quantize_op(const at::Tensor& x_in, std::string layout,
                                               std::string fmt) {
  // The library wants contiguous rows: copy strided inputs (no-op when contiguous).
  const at::Tensor x = x_in.contiguous();

  const char* op = "quantize";
  const ScaleLayout l = fp8_layout(layout, op);
  const DType d = fp8_format(fmt, op);
  check_2d(x, op, "in");
  DeviceScope ds(x, op);
  const int64_t M = x.size(0), K = x.size(1);
  const Shape2D ss = scale_shape(l, M, K);
  at::Tensor data = alloc(d, M, K, x), scale = alloc(DType::F32, ss.rows, ss.cols, x);
  ScaledTensor out{view_of(data, op, "out.data", d), view_of(scale, op, "out.scale"), l, {}};
  quantize(view_of(x, op, "in"), out, {}, ds.stream());
  return {data, scale};
}

std::tuple<at::Tensor, at::Tensor> quantize_transposed_op(const at::Tensor& x_in,
                                                          c10::ArrayRef<int64_t> groups,
                                                          std::string fmt) {
  // The library wants contiguous rows: copy strided inputs (no-op when contiguous).
  const at::Tensor x = x_in.contiguous();

  const char* op = "quantize_transposed";
  const DType d = fp8_format(fmt, op);
  check_2d(x, op, "in");
  DeviceScope ds(x, op);
  const std::vector<int64_t> g = groups_of(groups);
  const int64_t M = x.size(0), K = x.size(1);
  const Shape2D ss = scale_shape(ScaleLayout::Rowwise1x128, K, M, g);
  at::Tensor data = alloc(d, K, M, x), scale = alloc(DType::F32, ss.rows, ss.cols, x);
  ScaledTensor out{view_of(data, op, "out_t.data", d), view_of(scale, op, "out_t.scale"),
                   ScaleLayout::Rowwise1x128, std::span<const int64_t>(g.data(), g.size())};
  quantize_transposed(view_of(x, op, "in"), out, {}, ds.stream());
  return {data, scale};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize_both_op(
    const at::Tensor& x_in, c10::ArrayRef<int64_t> groups, std::string fmt) {
  // The library wants contiguous rows: copy strided inputs (no-op when contiguous).
  const at::Tensor x = x_in.contiguous();

  const char* op = "quantize_both";
  const DType d = fp8_format(fmt, op);
  check_2d(x, op, "in");
  DeviceScope ds(x, op);
  const std::vector<int64_t> g = groups_of(groups);
  const int64_t M = x.size(0), K = x.size(1);
  const Shape2D ss = scale_shape(ScaleLayout::Rowwise1x128, M, K);
  const Shape2D st = scale_shape(ScaleLayout::Rowwise1x128, K, M, g);
  at::Tensor data = alloc(d, M, K, x), scale = alloc(DType::F32, ss.rows, ss.cols, x);
  at::Tensor data_t = alloc(d, K, M, x), scale_t = alloc(DType::F32, st.rows, st.cols, x);
  ScaledTensor out{view_of(data, op, "out.data", d),
                   view_of(scale, op, "out.scale"),
                   ScaleLayout::Rowwise1x128,
                   {}};
  ScaledTensor out_t{view_of(data_t, op, "out_t.data", d), view_of(scale_t, op, "out_t.scale"),
                     ScaleLayout::Rowwise1x128, std::span<const int64_t>(g.data(), g.size())};
  quantize_both(view_of(x, op, "in"), out, out_t, {}, ds.stream());
  return {data, scale, data_t, scale_t};
}

at::ScalarType out_float_dtype(c10::optional<at::ScalarType> t, const std::string& op) {
  const at::ScalarType s = t.has_value() ? *t : at::kBFloat16;
  if (s != at::kFloat && s != at::kBFloat16)
    fail(op, "out_dtype", "torch.float32 or torch.bfloat16", cat(s));
  return s;
}

at::Tensor dequantize_op(const at::Tensor& data_in, const at::Tensor& scale_in, std::string layout,
                         c10::ArrayRef<int64_t> groups, c10::optional<at::ScalarType> out_dtype) {
  // The library wants contiguous rows: copy strided inputs (no-op when contiguous).
  const at::Tensor data = data_in.contiguous();
  const at::Tensor scale = scale_in.contiguous();

  const char* op = "dequantize";
  const ScaleLayout l = fp8_layout(layout, op);
  const at::ScalarType os = out_float_dtype(out_dtype, op);
  check_2d(data, op, "in.data");
  DeviceScope ds(data, op);
  const std::vector<int64_t> g = groups_of(groups);
  const ScaledTensor in = scaled_of(data, scale, l, g, op, "in");
  at::Tensor out = at::empty({in.data.rows, in.data.cols}, data.options().dtype(os));
  dequantize(in, view_of(out, op, "out"), ds.stream());
  return out;
}

TransposeScalePolicy policy_of(const std::string& p, const std::string& op) {
  if (p == "column_tight") return TransposeScalePolicy::ColumnTight;
  if (p == "tile_max") return TransposeScalePolicy::TileMax;
  fail(op, "policy", "'column_tight' or 'tile_max'", cat("'", p, "'"));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> transpose_scaled_op(const at::Tensor& data_in,
                                                                   const at::Tensor& scale_in,
                                                                   c10::ArrayRef<int64_t> groups,
                                                                   std::string policy) {
  // The library wants contiguous rows: copy strided inputs (no-op when contiguous).
  const at::Tensor data = data_in.contiguous();
  const at::Tensor scale = scale_in.contiguous();

  const char* op = "transpose_scaled";
  TransposeOptions opt;
  opt.policy = policy_of(policy, op);
  check_2d(data, op, "in.data");
  DeviceScope ds(data, op);
  const std::vector<int64_t> g = groups_of(groups);
  const ScaledTensor in = scaled_of(data, scale, ScaleLayout::Rowwise1x128, {}, op, "in");
  const int64_t M = in.data.rows, K = in.data.cols;
  const Shape2D st = scale_shape(ScaleLayout::Rowwise1x128, K, M, g);
  at::Tensor data_t = alloc(in.data.dtype, K, M, data);
  at::Tensor scale_t = alloc(DType::F32, st.rows, st.cols, data);
  at::Tensor underflow = at::zeros({}, data.options().dtype(at::kLong));
  opt.underflow_count = underflow.data_ptr<int64_t>();
  ScaledTensor out{view_of(data_t, op, "out_t.data", in.data.dtype),
                   view_of(scale_t, op, "out_t.scale"), ScaleLayout::Rowwise1x128,
                   std::span<const int64_t>(g.data(), g.size())};
  transpose_scaled(in, out, opt, ds.stream());
  return {data_t, scale_t, underflow};
}

std::tuple<at::Tensor, at::Tensor> alloc_mx(int64_t M, int64_t K, const at::Tensor& like) {
  if (K % 2 != 0) fail("mxfp4", "cols", "an even number of elements", cat(K));
  const Shape2D ss = scale_shape(ScaleLayout::Mx1x32, M, K);
  return {alloc(DType::E2M1x2, M, K, like), alloc(DType::E8M0, ss.rows, ss.cols, like)};
}

std::tuple<at::Tensor, at::Tensor> quantize_mxfp4_op(const at::Tensor& x_in) {
  // The library wants contiguous rows: copy strided inputs (no-op when contiguous).
  const at::Tensor x = x_in.contiguous();

  const char* op = "quantize_mxfp4";
  check_2d(x, op, "in");
  DeviceScope ds(x, op);
  const TensorView in = view_of(x, op, "in");
  if (in.cols % 32 != 0)  // the library checks this too; here it would break the allocation first
    fail(op, "in.cols", "a multiple of 32", cat(in.cols));
  auto [data, scale] = alloc_mx(in.rows, in.cols, x);
  quantize_mxfp4(in, scaled_of(data, scale, ScaleLayout::Mx1x32, {}, op, "out"), ds.stream());
  return {data, scale};
}

std::tuple<at::Tensor, at::Tensor> fp8_to_mxfp4_op(const at::Tensor& data_in,
                                                   const at::Tensor& scale_in) {
  // The library wants contiguous rows: copy strided inputs (no-op when contiguous).
  const at::Tensor data = data_in.contiguous();
  const at::Tensor scale = scale_in.contiguous();

  const char* op = "fp8_to_mxfp4";
  check_2d(data, op, "in.data");
  DeviceScope ds(data, op);
  const ScaledTensor in = scaled_of(data, scale, ScaleLayout::Rowwise1x128, {}, op, "in");
  if (in.data.cols % 128 != 0)  // as the library requires; checked first for the allocation
    fail(op, "in.data.cols", "a multiple of 128", cat(in.data.cols));
  auto [od, os] = alloc_mx(in.data.rows, in.data.cols, data);
  fp8_to_mxfp4(in, scaled_of(od, os, ScaleLayout::Mx1x32, {}, op, "out"), ds.stream());
  return {od, os};
}

std::tuple<at::Tensor, at::Tensor> mxfp4_to_fp8_op(const at::Tensor& data_in,
                                                   const at::Tensor& scale_in) {
  // The library wants contiguous rows: copy strided inputs (no-op when contiguous).
  const at::Tensor data = data_in.contiguous();
  const at::Tensor scale = scale_in.contiguous();

  const char* op = "mxfp4_to_fp8";
  check_2d(data, op, "in.data");
  DeviceScope ds(data, op);
  const ScaledTensor in = scaled_of(data, scale, ScaleLayout::Mx1x32, {}, op, "in");
  const int64_t M = in.data.rows, K = in.data.cols;
  const Shape2D ss = scale_shape(ScaleLayout::Rowwise1x128, M, K);
  at::Tensor od = alloc(DType::E4M3, M, K, data), os = alloc(DType::F32, ss.rows, ss.cols, data);
  ScaledTensor out{view_of(od, op, "out.data", DType::E4M3),
                   view_of(os, op, "out.scale"),
                   ScaleLayout::Rowwise1x128,
                   {}};
  mxfp4_to_fp8(in, out, ds.stream());
  return {od, os};
}

std::tuple<at::Tensor, at::Tensor> mxfp4_to_fp8_transposed_op(const at::Tensor& data_in,
                                                              const at::Tensor& scale_in,
                                                              c10::ArrayRef<int64_t> groups) {
  // The library wants contiguous rows: copy strided inputs (no-op when contiguous).
  const at::Tensor data = data_in.contiguous();
  const at::Tensor scale = scale_in.contiguous();

  const char* op = "mxfp4_to_fp8_transposed";
  check_2d(data, op, "in.data");
  DeviceScope ds(data, op);
  const std::vector<int64_t> g = groups_of(groups);
  const ScaledTensor in = scaled_of(data, scale, ScaleLayout::Mx1x32, {}, op, "in");
  const int64_t M = in.data.rows, K = in.data.cols;
  const Shape2D st = scale_shape(ScaleLayout::Rowwise1x128, K, M, g);
  at::Tensor od = alloc(DType::E4M3, K, M, data), os = alloc(DType::F32, st.rows, st.cols, data);
  ScaledTensor out{view_of(od, op, "out_t.data", DType::E4M3), view_of(os, op, "out_t.scale"),
                   ScaleLayout::Rowwise1x128, std::span<const int64_t>(g.data(), g.size())};
  mxfp4_to_fp8_transposed(in, out, ds.stream());
  return {od, os};
}

// ---- Meta kernels (shapes only; used by torch.compile / fake tensors) --------------------------

at::Tensor meta(DType d, int64_t rows, int64_t cols, const at::Tensor& like) {
  return alloc(d, rows, cols, like);
}

std::tuple<at::Tensor, at::Tensor> quantize_meta(const at::Tensor& x, std::string layout,
                                                 std::string fmt) {
  const ScaleLayout l = fp8_layout(layout, "quantize");
  check_2d(x, "quantize", "in");
  const Shape2D ss = scale_shape(l, x.size(0), x.size(1));
  return {meta(fp8_format(fmt, "quantize"), x.size(0), x.size(1), x),
          meta(DType::F32, ss.rows, ss.cols, x)};
}

std::tuple<at::Tensor, at::Tensor> quantize_transposed_meta(const at::Tensor& x,
                                                            c10::ArrayRef<int64_t> groups,
                                                            std::string fmt) {
  check_2d(x, "quantize_transposed", "in");
  const std::vector<int64_t> g = groups_of(groups);
  const Shape2D st = scale_shape(ScaleLayout::Rowwise1x128, x.size(1), x.size(0), g);
  return {meta(fp8_format(fmt, "quantize_transposed"), x.size(1), x.size(0), x),
          meta(DType::F32, st.rows, st.cols, x)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize_both_meta(
    const at::Tensor& x, c10::ArrayRef<int64_t> groups, std::string fmt) {
  auto [d, s] = quantize_meta(x, "rowwise", fmt);
  auto [dt, st] = quantize_transposed_meta(x, groups, fmt);
  return {d, s, dt, st};
}

at::Tensor dequantize_meta(const at::Tensor& data, const at::Tensor& scale, std::string layout,
                           c10::ArrayRef<int64_t> groups, c10::optional<at::ScalarType> out_dtype) {
  const ScaleLayout l = fp8_layout(layout, "dequantize");
  check_2d(data, "dequantize", "in.data");
  const int64_t cols = l == ScaleLayout::Mx1x32 ? data.size(1) * 2 : data.size(1);
  return at::empty({data.size(0), cols},
                   data.options().dtype(out_float_dtype(out_dtype, "dequantize")));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> transpose_scaled_meta(const at::Tensor& data,
                                                                     const at::Tensor& scale,
                                                                     c10::ArrayRef<int64_t> groups,
                                                                     std::string policy) {
  policy_of(policy, "transpose_scaled");
  check_2d(data, "transpose_scaled", "in.data");
  const std::vector<int64_t> g = groups_of(groups);
  const Shape2D st = scale_shape(ScaleLayout::Rowwise1x128, data.size(1), data.size(0), g);
  return {at::empty({data.size(1), data.size(0)}, data.options()),
          meta(DType::F32, st.rows, st.cols, data), at::empty({}, data.options().dtype(at::kLong))};
}

std::tuple<at::Tensor, at::Tensor> quantize_mxfp4_meta(const at::Tensor& x) {
  check_2d(x, "quantize_mxfp4", "in");
  return alloc_mx(x.size(0), x.size(1), x);
}

std::tuple<at::Tensor, at::Tensor> fp8_to_mxfp4_meta(const at::Tensor& data, const at::Tensor&) {
  check_2d(data, "fp8_to_mxfp4", "in.data");
  return alloc_mx(data.size(0), data.size(1), data);
}

std::tuple<at::Tensor, at::Tensor> mxfp4_to_fp8_meta(const at::Tensor& data, const at::Tensor&) {
  check_2d(data, "mxfp4_to_fp8", "in.data");
  const int64_t M = data.size(0), K = data.size(1) * 2;
  const Shape2D ss = scale_shape(ScaleLayout::Rowwise1x128, M, K);
  return {meta(DType::E4M3, M, K, data), meta(DType::F32, ss.rows, ss.cols, data)};
}

std::tuple<at::Tensor, at::Tensor> mxfp4_to_fp8_transposed_meta(const at::Tensor& data,
                                                                const at::Tensor&,
                                                                c10::ArrayRef<int64_t> groups) {
  check_2d(data, "mxfp4_to_fp8_transposed", "in.data");
  const int64_t M = data.size(0), K = data.size(1) * 2;
  const std::vector<int64_t> g = groups_of(groups);
  const Shape2D st = scale_shape(ScaleLayout::Rowwise1x128, K, M, g);
  return {meta(DType::E4M3, K, M, data), meta(DType::F32, st.rows, st.cols, data)};
}

// ---- expert-parallel communicator (needs the library's comm implementation) --------------------

// fp8flow.Communicator: owns one fp8flow Communicator. Defined in every build (so that the MoE
// layer's constructor can name it); without the library's comm implementation its constructor
// throws Unsupported (comm_available() says which).
class CommunicatorHolder : public torch::CustomClassHolder {
 public:
  // id: uint8 [128] (nccl_unique_id of rank 0, distributed by the caller); current CUDA device.
  CommunicatorHolder(at::Tensor id, int64_t rank, int64_t size, int64_t timeout_ms) {
    const char* op = "make_nccl_communicator";
#ifdef FP8FLOW_PY_HAVE_COMM
    const at::Tensor b = id.to(at::kCPU).contiguous();
    if (b.scalar_type() != at::kByte || b.numel() != int64_t{sizeof(NcclUniqueIdBytes)})
      fail(op, "id", cat("uint8 tensor of ", sizeof(NcclUniqueIdBytes), " bytes"),
           cat(b.scalar_type(), " of ", b.numel(), " elements"));
    NcclUniqueIdBytes u{};
    std::memcpy(u.bytes, b.data_ptr(), sizeof(u.bytes));
    comm_ = make_nccl_communicator(u, static_cast<int>(rank), static_cast<int>(size), timeout_ms);
#else
    fail(op, "build", "a libfp8flow.a with the communicator implementation (branch `comm`)",
         "one without", ErrorKind::Unsupported);
#endif
  }
#ifdef FP8FLOW_PY_HAVE_COMM
  int64_t rank() const {
    return comm_->rank();
  }
  int64_t size() const {
    return comm_->size();
  }
  std::string backend() const {
    return comm_->backend();
  }
#else
  int64_t rank() const {
    return 0;
  }
  int64_t size() const {
    return 1;
  }
  std::string backend() const {
    return "none";
  }
#endif
  Communicator& comm() {
    return *comm_;
  }

 private:
  std::unique_ptr<Communicator> comm_;
};

#ifdef FP8FLOW_PY_HAVE_COMM
at::Tensor nccl_unique_id_op() {
  const NcclUniqueIdBytes u = nccl_unique_id();
  at::Tensor t = at::empty({int64_t{sizeof(u.bytes)}}, at::TensorOptions().dtype(at::kByte));
  std::memcpy(t.data_ptr(), u.bytes, sizeof(u.bytes));
  return t;
}
#endif

// ---- the MoE layer -----------------------------------------------------------------------------

Recipe recipe_of(const std::string& r) {
  for (Recipe x : {Recipe::Bf16, Recipe::Fp8Blockwise, Recipe::Fp8Flow, Recipe::Fp8FlowMxfp4})
    if (r == to_string(x)) return x;
  fail("MoELayer", "recipe", "'bf16', 'fp8-blockwise', 'fp8-flow' or 'fp8-flow-mxfp4'",
       cat("'", r, "'"));
}

RouterKind router_kind_of(const std::string& k) {
  if (k == "softmax") return RouterKind::Softmax;
  if (k == "sigmoid") return RouterKind::SigmoidBias;
  fail("MoELayer", "router", "'softmax' or 'sigmoid'", cat("'", k, "'"));
}

class MoEContextHolder;

class MoELayerHolder : public torch::CustomClassHolder {
 public:
  MoELayerHolder(int64_t hidden, int64_t ffn, int64_t experts, int64_t top_k, std::string router,
                 int64_t n_groups, int64_t topk_groups, bool renormalize, double scaling,
                 double aux_alpha, int64_t seq_len, std::string recipe, int64_t align,
                 int64_t max_tokens, int64_t gemm_streams, at::Tensor gate,
                 c10::optional<at::Tensor> gate_bias, at::Tensor w1, at::Tensor w2,
                 c10::optional<c10::intrusive_ptr<CommunicatorHolder>> comm,
                 int64_t ep_max_recv_rows, bool ep_dedup, bool count_underflow,
                 bool mxfp4_stochastic, int64_t mxfp4_seed) {
    cfg_.hidden = hidden;
    cfg_.ffn = ffn;
    cfg_.experts = experts;
    cfg_.router.kind = router_kind_of(router);
    cfg_.router.top_k = static_cast<int>(top_k);
    cfg_.router.n_groups = static_cast<int>(n_groups);
    cfg_.router.topk_groups = static_cast<int>(topk_groups);
    cfg_.router.renormalize = renormalize;
    cfg_.router.scaling = static_cast<float>(scaling);
    cfg_.router.aux_alpha = static_cast<float>(aux_alpha);
    cfg_.router.seq_len = seq_len;
    cfg_.recipe = recipe_of(recipe);
    if (align > 0) cfg_.align = static_cast<int>(align);  // 0: MoEConfig's default
    cfg_.max_tokens = max_tokens;
    if (gemm_streams > 0) cfg_.gemm_streams = static_cast<int>(gemm_streams);
    cfg_.count_underflow = count_underflow;    // MoEContext::transpose_underflow (a diagnostic)
    cfg_.mxfp4_stochastic = mxfp4_stochastic;  // fp8-flow-mxfp4: saved forms rounded stochastically
    cfg_.mxfp4_seed = static_cast<uint64_t>(mxfp4_seed);
    // Expert parallelism: ep_size = the communicator's ranks; w1/w2 are this rank's experts. The
    // communicator is held here (declared before layer_, so it outlives the layer).
    if (comm.has_value() && *comm) {
      comm_ = *comm;
      cfg_.ep_size = static_cast<int>(comm_->size());
      cfg_.ep_max_recv_rows = ep_max_recv_rows;  // 0: the C++ worst case
      cfg_.ep_dedup = ep_dedup;                  // dispatch one record per (token, rank)
    }
    hold(gate, gate_bias, w1, w2);
    DeviceScope ds(w1_, "MoELayer");
    layer_ = comm_ ? std::make_unique<MoELayer>(cfg_, weights(), &comm_->comm(), ds.stream())
                   : std::make_unique<MoELayer>(cfg_, weights(), ds.stream());
  }

  // Re-make the FP8 (or BF16) weight copies from the held weight tensors (after an optimizer step).
  void refresh_weights() {
    std::lock_guard<std::mutex> lk(mu_);
    DeviceScope ds(w1_, "MoELayer::refresh_weights");
    layer_->refresh_weights(ds.stream());
  }

  // New weight tensors (same shapes, dtypes and device; e.g. after `param.data = ...`) + refresh.
  void set_weights(at::Tensor gate, c10::optional<at::Tensor> gate_bias, at::Tensor w1,
                   at::Tensor w2) {
    std::lock_guard<std::mutex> lk(mu_);
    if (w1.device() != w1_.device())
      fail("MoELayer::refresh_weights", "w.w1.device", cat(w1_.device(), " (the layer's)"),
           cat(w1.device()));
    hold(gate, gate_bias, w1, w2);
    DeviceScope ds(w1_, "MoELayer::refresh_weights");
    layer_->refresh_weights(weights(), ds.stream());
  }

  // A context from the free list, or a new one (allocates its pool once).
  std::unique_ptr<MoEContext> acquire() {
    std::lock_guard<std::mutex> lk(mu_);
    if (!free_.empty()) {
      auto c = std::move(free_.back());
      free_.pop_back();
      return c;
    }
    DeviceScope ds(w1_, "MoELayer::make_context");
    auto c = std::make_unique<MoEContext>(layer_->make_context());
    ++contexts_made_;
    ctx_pool_bytes_ = c->pool_bytes();
    return c;
  }
  void release(std::unique_ptr<MoEContext> c) {
    std::lock_guard<std::mutex> lk(mu_);
    free_.push_back(std::move(c));
  }

  MoELayer& layer() { return *layer_; }
  std::mutex& mu() { return mu_; }
  const at::Tensor& w1() const { return w1_; }

  int64_t pool_bytes() const { return static_cast<int64_t>(layer_->pool_bytes()); }
  int64_t context_pool_bytes() const { return static_cast<int64_t>(ctx_pool_bytes_); }
  int64_t contexts() const { return contexts_made_; }
  int64_t weight_casts() const { return layer_->weight_casts(); }
  int64_t max_tokens() const { return cfg_.max_tokens; }
  int64_t ep_size() const { return cfg_.ep_size; }
  int64_t ep_max_recv_rows() const { return cfg_.ep_max_recv_rows; }
  bool ep_dedup() const { return cfg_.ep_dedup; }
  std::string recipe() const { return to_string(cfg_.recipe); }
  // Layer pool + every context made so far (the device memory fp8flow owns for this layer).
  int64_t device_bytes() const { return pool_bytes() + contexts_made_ * context_pool_bytes(); }

 private:
  void hold(const at::Tensor& gate, const c10::optional<at::Tensor>& bias, const at::Tensor& w1,
            const at::Tensor& w2) {
    gate_ = gate;
    bias_ = bias.has_value() ? *bias : at::Tensor();
    w1_ = w1;
    w2_ = w2;
    const char* op = "MoELayer";
    for (auto [t, name] : {std::pair{&gate_, "w.gate"}, std::pair{&w1_, "w.w1"},
                           std::pair{&w2_, "w.w2"}, std::pair{&bias_, "w.gate_bias"}}) {
      if (!t->defined()) continue;
      if (t->device() != w1_.device())
        fail(op, cat(name, ".device"), cat(w1_.device(), " (as w.w1)"), cat(t->device()));
    }
    if (bias_.defined() && bias_.dim() == 1) bias_ = bias_.view({1, bias_.size(0)});
  }
  MoEWeights weights() const {
    const char* op = "MoELayer";
    MoEWeights w;
    w.gate = view_of(gate_, op, "w.gate");
    if (bias_.defined()) w.gate_bias = view_of(bias_, op, "w.gate_bias");
    w.w1 = view_of(w1_, op, "w.w1");
    w.w2 = view_of(w2_, op, "w.w2");
    return w;
  }

  MoEConfig cfg_;
  at::Tensor gate_, bias_, w1_, w2_;
  c10::intrusive_ptr<CommunicatorHolder> comm_;  // before layer_: destroyed after it
  std::unique_ptr<MoELayer> layer_;
  std::mutex mu_;
  std::vector<std::unique_ptr<MoEContext>> free_;
  int64_t contexts_made_ = 0;
  size_t ctx_pool_bytes_ = 0;
};

class MoEContextHolder : public torch::CustomClassHolder {
 public:
  MoEContextHolder(c10::intrusive_ptr<MoELayerHolder> owner, std::unique_ptr<MoEContext> ctx)
      : owner_(std::move(owner)), ctx_(std::move(ctx)) {}
  ~MoEContextHolder() override {
    if (owner_ && ctx_) owner_->release(std::move(ctx_));
  }

  MoEContext& ctx() { return *ctx_; }
  MoELayerHolder& owner() { return *owner_; }
  at::Tensor x;  // the forward's input, kept until backward (the gate's wgrad reads it)

  double aux_loss() const { return ctx_->aux_loss(); }
  std::vector<int64_t> casts() const {
    const MoECastCount c = ctx_->casts();
    return {c.forward, c.backward, c.conversions};
  }
  std::vector<int64_t> nonfinite() const {
    const MoENonFinite n = ctx_->nonfinite();
    return {n.x, n.y, n.dy, n.dx, n.dw1, n.dw2, n.dgate};
  }
  std::vector<int64_t> transpose_underflow() const {
    const MoETransposeUnderflow u = ctx_->transpose_underflow();
    return {u.fc2_grad, u.fc2_x, u.fc1_grad, u.fc1_x};
  }
  int64_t tokens() const { return ctx_->tokens(); }
  int64_t padded_rows() const { return ctx_->padded_rows(); }
  std::vector<int64_t> m_splits() const { return ctx_->m_splits(); }
  int64_t saved_activation_bytes() const {
    return static_cast<int64_t>(ctx_->saved_activation_bytes());
  }
  int64_t saved_routing_bytes() const { return static_cast<int64_t>(ctx_->saved_routing_bytes()); }
  int64_t pool_bytes() const { return static_cast<int64_t>(ctx_->pool_bytes()); }
  // Copies of the routing of the last forward (test hook: feed the same selection to a reference).
  at::Tensor topk_idx() const { return routing_copy(ctx_->debug_views().topk_idx, at::kInt); }
  at::Tensor topk_weight() const {
    return routing_copy(ctx_->debug_views().topk_weight, at::kFloat);
  }

 private:
  at::Tensor routing_copy(const TensorView& v, at::ScalarType st) const {
    const at::Device dev = owner_->w1().device();
    // Synchronizes like the context's accessors: the copy is ordered on the current stream.
    DeviceScope ds(owner_->w1(), "MoEContext::debug_views");
    return at::from_blob(v.data, {v.rows, v.cols}, at::TensorOptions().dtype(st).device(dev))
        .clone();
  }
  c10::intrusive_ptr<MoELayerHolder> owner_;
  std::unique_ptr<MoEContext> ctx_;
};

void check_same_device(const at::Tensor& t, const MoELayerHolder& L, const std::string& op,
                       const std::string& arg) {
  if (t.device() != L.w1().device())
    fail(op, cat(arg, ".device"), cat(L.w1().device(), " (the layer's)"), cat(t.device()));
}

std::tuple<at::Tensor, c10::intrusive_ptr<MoEContextHolder>> moe_forward_op(
    const c10::intrusive_ptr<MoELayerHolder>& L, const at::Tensor& x_in, bool reject_nonfinite) {
  const char* op = "MoELayer::forward";
  check_2d(x_in, op, "x");
  check_same_device(x_in, *L, op, "x");
  const at::Tensor x = x_in.contiguous();
  DeviceScope ds(x, op);
  at::Tensor y = at::empty_like(x);
  auto holder = c10::make_intrusive<MoEContextHolder>(L, L->acquire());
  holder->x = x;
  MoEForwardOptions opt;
  opt.reject_nonfinite_input = reject_nonfinite;
  {
    std::lock_guard<std::mutex> lk(L->mu());
    L->layer().forward(view_of(x, op, "x"), view_of(y, op, "y"), holder->ctx(), opt, ds.stream());
  }
  return {y, holder};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_backward_op(
    const c10::intrusive_ptr<MoEContextHolder>& C, const at::Tensor& dy_in) {
  const char* op = "MoELayer::backward";
  MoELayerHolder& L = C->owner();
  check_2d(dy_in, op, "dy");
  check_same_device(dy_in, L, op, "dy");
  const at::Tensor dy = dy_in.contiguous();
  DeviceScope ds(dy, op);
  const MoEConfig& cfg = L.layer().config();
  // dW1/dW2: this rank's experts (E / ep_size); dgate: every expert (this rank's tokens' part).
  const int64_t T = dy.size(0), H = cfg.hidden, F = cfg.ffn, Eg = cfg.experts,
                E = cfg.experts / cfg.ep_size;
  const auto f32 = dy.options().dtype(at::kFloat);
  at::Tensor dx = at::empty({T, H}, dy.options().dtype(at::kBFloat16));
  at::Tensor dw1 = at::empty({E * 2 * F, H}, f32), dw2 = at::empty({E * H, F}, f32);
  at::Tensor dgate = at::empty({Eg, H}, f32);
  MoEGrads g;
  g.dx = view_of(dx, op, "grads.dx");
  g.dw1 = view_of(dw1, op, "grads.dw1");
  g.dw2 = view_of(dw2, op, "grads.dw2");
  g.dgate = view_of(dgate, op, "grads.dgate");
  {
    std::lock_guard<std::mutex> lk(L.mu());
    L.layer().backward(view_of(dy, op, "dy"), g, C->ctx(), ds.stream());
  }
  C->x = at::Tensor();
  return {dx, dw1, dw2, dgate};
}

bool comm_available_op() {
#ifdef FP8FLOW_PY_HAVE_COMM
  return built_with_nccl();
#else
  return false;
#endif
}

// Whether fp8flow.MoE can run expert-parallel from torch: the C++ MoELayer takes a communicator
// (include/fp8flow/moe.h), and torch processes can only share fp8flow's NCCL one.
bool moe_ep_available_op() {
  return comm_available_op();
}

bool cuda_available_op() {
#ifdef FP8FLOW_PY_CUDA
  return fp8flow::cuda_available();
#else
  return false;
#endif
}

std::string version_op() {
  return version_string();
}

// Test hook: throws fp8flow::Error(kind, msg), to check that Python sees the same message.
void throw_op(std::string kind, std::string msg) {
  ErrorKind k = ErrorKind::InvalidArgument;
  if (kind == "unsupported") k = ErrorKind::Unsupported;
  if (kind == "cuda") k = ErrorKind::Cuda;
  if (kind == "comm") k = ErrorKind::Comm;
  throw Error(k, msg);
}

}  // namespace
}  // namespace fp8flow::py

// ------------------------------------------------------------------------------------------------
using namespace fp8flow::py;  // NOLINT

TORCH_LIBRARY(fp8flow, m) {
  // Registered first: the MoE layer's constructor takes one.
  m.class_<CommunicatorHolder>("Communicator")
      .def(torch::init<at::Tensor, int64_t, int64_t, int64_t>())
      .def("rank", &CommunicatorHolder::rank)
      .def("size", &CommunicatorHolder::size)
      .def("backend", &CommunicatorHolder::backend);
  m.class_<MoELayerHolder>("MoELayer")
      .def(torch::init<int64_t, int64_t, int64_t, int64_t, std::string, int64_t, int64_t, bool,
                       double, double, int64_t, std::string, int64_t, int64_t, int64_t, at::Tensor,
                       c10::optional<at::Tensor>, at::Tensor, at::Tensor,
                       c10::optional<c10::intrusive_ptr<CommunicatorHolder>>, int64_t, bool, bool,
                       bool, int64_t>())
      .def("ep_size", &MoELayerHolder::ep_size)
      .def("ep_max_recv_rows", &MoELayerHolder::ep_max_recv_rows)
      .def("ep_dedup", &MoELayerHolder::ep_dedup)
      .def("refresh_weights", &MoELayerHolder::refresh_weights)
      .def("set_weights", &MoELayerHolder::set_weights)
      .def("pool_bytes", &MoELayerHolder::pool_bytes)
      .def("context_pool_bytes", &MoELayerHolder::context_pool_bytes)
      .def("contexts", &MoELayerHolder::contexts)
      .def("device_bytes", &MoELayerHolder::device_bytes)
      .def("weight_casts", &MoELayerHolder::weight_casts)
      .def("max_tokens", &MoELayerHolder::max_tokens)
      .def("recipe", &MoELayerHolder::recipe);
  m.class_<MoEContextHolder>("MoEContext")
      .def("aux_loss", &MoEContextHolder::aux_loss)
      .def("casts", &MoEContextHolder::casts)
      .def("nonfinite", &MoEContextHolder::nonfinite)
      .def("transpose_underflow", &MoEContextHolder::transpose_underflow)
      .def("tokens", &MoEContextHolder::tokens)
      .def("padded_rows", &MoEContextHolder::padded_rows)
      .def("m_splits", &MoEContextHolder::m_splits)
      .def("saved_activation_bytes", &MoEContextHolder::saved_activation_bytes)
      .def("saved_routing_bytes", &MoEContextHolder::saved_routing_bytes)
      .def("pool_bytes", &MoEContextHolder::pool_bytes)
      .def("topk_idx", &MoEContextHolder::topk_idx)
      .def("topk_weight", &MoEContextHolder::topk_weight);
#ifdef FP8FLOW_PY_HAVE_COMM
  m.def("nccl_unique_id() -> Tensor", &nccl_unique_id_op);
#endif

  m.def("quantize(Tensor x, str layout='rowwise', str fmt='e4m3') -> (Tensor, Tensor)");
  m.def("quantize_transposed(Tensor x, int[] groups=[], str fmt='e4m3') -> (Tensor, Tensor)");
  m.def(
      "quantize_both(Tensor x, int[] groups=[], str fmt='e4m3') -> (Tensor, Tensor, Tensor, "
      "Tensor)");
  m.def(
      "dequantize(Tensor data, Tensor scale, str layout='rowwise', int[] groups=[], "
      "ScalarType? out_dtype=None) -> Tensor");
  m.def(
      "transpose_scaled(Tensor data, Tensor scale, int[] groups=[], str policy='column_tight') "
      "-> (Tensor, Tensor, Tensor)");
  m.def("quantize_mxfp4(Tensor x) -> (Tensor, Tensor)");
  m.def("fp8_to_mxfp4(Tensor data, Tensor scale) -> (Tensor, Tensor)");
  m.def("mxfp4_to_fp8(Tensor data, Tensor scale) -> (Tensor, Tensor)");
  m.def("mxfp4_to_fp8_transposed(Tensor data, Tensor scale, int[] groups=[]) -> (Tensor, Tensor)");

  m.def(
      "moe_forward(__torch__.torch.classes.fp8flow.MoELayer layer, Tensor x, "
      "bool reject_nonfinite=True) -> (Tensor, __torch__.torch.classes.fp8flow.MoEContext)",
      &moe_forward_op);
  m.def(
      "moe_backward(__torch__.torch.classes.fp8flow.MoEContext ctx, Tensor dy) -> (Tensor, "
      "Tensor, Tensor, Tensor)",
      &moe_backward_op);

  m.def("cuda_available() -> bool", &cuda_available_op);
  m.def("comm_available() -> bool", &comm_available_op);
  m.def("moe_ep_available() -> bool", &moe_ep_available_op);
  m.def("version() -> str", &version_op);
  m.def("_throw(str kind, str msg) -> ()", &throw_op);
}

#define FP8FLOW_IMPL_ALL(m, fn)                            \
  m.impl("quantize", &quantize##fn);                       \
  m.impl("quantize_transposed", &quantize_transposed##fn); \
  m.impl("quantize_both", &quantize_both##fn);             \
  m.impl("dequantize", &dequantize##fn);                   \
  m.impl("transpose_scaled", &transpose_scaled##fn);       \
  m.impl("quantize_mxfp4", &quantize_mxfp4##fn);           \
  m.impl("fp8_to_mxfp4", &fp8_to_mxfp4##fn);               \
  m.impl("mxfp4_to_fp8", &mxfp4_to_fp8##fn);               \
  m.impl("mxfp4_to_fp8_transposed", &mxfp4_to_fp8_transposed##fn)

TORCH_LIBRARY_IMPL(fp8flow, CPU, m) {
  FP8FLOW_IMPL_ALL(m, _op);
}
TORCH_LIBRARY_IMPL(fp8flow, CUDA, m) {
  FP8FLOW_IMPL_ALL(m, _op);
}
TORCH_LIBRARY_IMPL(fp8flow, Meta, m) {
  FP8FLOW_IMPL_ALL(m, _meta);
}

// The Python module fp8flow._C: importing it runs the registrations above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "fp8flow torch ops (registered as torch.ops.fp8flow.*)";
  mod.attr("torch_version_built") = TORCH_VERSION;
#ifdef FP8FLOW_PY_CUDA
  mod.attr("with_cuda") = true;
#else
  mod.attr("with_cuda") = false;
#endif
#ifdef FP8FLOW_PY_HAVE_COMM
  mod.attr("with_comm") = true;
#else
  mod.attr("with_comm") = false;
#endif
}
