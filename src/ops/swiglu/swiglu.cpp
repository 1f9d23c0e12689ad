// swiglu / swiglu_backward: validate on the host, then route to the reference backend (Cpu
// tensors) or the sm_90a backend (Cuda tensors). The output's type picks the variant: a
// ScaledTensor gets FP8 + 1x128 scales, a TensorView gets BF16; an extra in_q (forward) writes
// the saved E4M3 copy of the input, a ScaledTensor `in` (backward) reads it.
#include "fp8flow/swiglu.h"

#include <initializer_list>
#include <utility>

#include "common/backend.h"
#include "ops/swiglu/swiglu_backends.h"

// FP8FLOW_SM90 (common/backend.h): CPU-only builds have no sm90:: symbols; check_cuda has thrown
// Unsupported before such a call is reached.

namespace fp8flow {
namespace {

using detail::cat;
using detail::Check;
using Named = std::pair<const TensorView*, const char*>;

// in (BF16) or its saved FP8 copy's data: [M][2F], F % 128 == 0, contiguous. Returns F.
int64_t check_in_shape(const Check& c, const TensorView& in, const char* arg) {
  c.contiguous(in, arg);
  c.that(in.cols % 256 == 0, arg,
         "cols = 2F with F a multiple of 128 (gate | up), i.e. cols divisible by 256",
         cat("cols ", in.cols));
  return in.cols / 2;
}
int64_t check_in(const Check& c, const TensorView& in) {
  c.view(in, "in", {DType::BF16});
  return check_in_shape(c, in, "in");
}
// The saved input of the backward: E4M3 [M][2F] Rowwise1x128, one group per row. Returns F.
int64_t check_in(const Check& c, const ScaledTensor& in) {
  c.scaled(in, "in", ScaleLayout::Rowwise1x128, {DType::E4M3});
  c.that(in.col_groups.empty(), "in.col_groups", "empty (one group per row)",
         cat(in.col_groups.size(), " groups"));
  return check_in_shape(c, in.data, "in.data");
}

// A per-row F32 vector of M elements ([M][1] or [1][M], contiguous), or, unweighted, an empty view.
void check_row_vector(const Check& c, const TensorView& v, const char* arg, int64_t M,
                      bool weighted, const TensorView& like) {
  if (!weighted) {
    c.that(v.data == nullptr && v.numel() == 0, arg,
           "an empty view ({}) when SwigluOptions::weighted is false",
           cat("[", v.rows, ", ", v.cols, "] at ", v.data));
    return;
  }
  c.view(v, arg, {DType::F32});
  c.that((v.rows == M && v.cols == 1) || (v.rows == 1 && v.cols == M), arg,
         cat("shape [", M, ", 1] or [1, ", M, "] (one value per row of in)"),
         cat("[", v.rows, ", ", v.cols, "]"));
  if (v.cols == 1) {
    c.that(v.ld < 0 || v.ld == 1 || v.rows <= 1, arg, "contiguous elements (ld 1)",
           cat("ld ", v.ld));
  } else {
    c.contiguous(v, arg);
  }
  c.same_device(like, "in", v, arg);
}

void check_fp8_out(const Check& c, const ScaledTensor& out, const char* arg, int64_t M,
                   int64_t cols, const TensorView& in,
                   std::initializer_list<DType> dtypes = {DType::E4M3, DType::E5M2}) {
  c.scaled(out, arg, ScaleLayout::Rowwise1x128, dtypes);
  c.that(out.col_groups.empty(), cat(arg, ".col_groups"), "empty (one group per row)",
         cat(out.col_groups.size(), " groups"));
  c.shape(out.data, cat(arg, ".data"), M, cols);
  c.contiguous(out.data, cat(arg, ".data"));
  c.same_device(in, "in", out.data, cat(arg, ".data"));
}

void check_bf16_out(const Check& c, const TensorView& out, const char* arg, int64_t M, int64_t cols,
                    const TensorView& in) {
  c.view(out, arg, {DType::BF16});
  c.shape(out, arg, M, cols);
  c.contiguous(out, arg);
  c.same_device(in, "in", out, arg);
}

void check_dy(const Check& c, const TensorView& dy, int64_t M, int64_t F, const TensorView& in) {
  c.view(dy, "dy", {DType::BF16});
  c.shape(dy, "dy", M, F);
  c.contiguous(dy, "dy");
  c.same_device(in, "in", dy, "dy");
}

// Cuda: backend present, device pointers, 16-byte alignment of the vector-accessed tensors.
void check_cuda(const Check& c, std::initializer_list<Named> vec16,
                std::initializer_list<Named> others) {
  detail::require_cuda_backend(c);
  for (auto [t, name] : vec16) {
    detail::require_device_pointer(c, *t, name);
    if (t->numel() > 0) c.aligned(*t, name, 16);
  }
  for (auto [t, name] : others) {
    if (t->data == nullptr && t->numel() == 0) continue;  // unweighted prob / dprob
    detail::require_device_pointer(c, *t, name);
    if (t->numel() > 0) c.aligned(*t, name, 4);
  }
}

}  // namespace

void swiglu(const TensorView& in, const TensorView& prob, const ScaledTensor& out,
            const SwigluOptions& opt, [[maybe_unused]] Stream stream) {
  const Check c("swiglu");
  const int64_t F = check_in(c, in);
  check_row_vector(c, prob, "prob", in.rows, opt.weighted, in);
  check_fp8_out(c, out, "out", in.rows, F, in);
  if (in.device == Device::Cpu) return ref::swiglu(in, prob, out, opt.weighted);
  check_cuda(c, {{&in, "in"}, {&out.data, "out.data"}},
             {{&prob, "prob"}, {&out.scale, "out.scale"}});
  FP8FLOW_SM90(sm90::swiglu(in, prob, out, opt.weighted, stream));
}

void swiglu(const TensorView& in, const TensorView& prob, const TensorView& out,
            const SwigluOptions& opt, [[maybe_unused]] Stream stream) {
  const Check c("swiglu");
  const int64_t F = check_in(c, in);
  check_row_vector(c, prob, "prob", in.rows, opt.weighted, in);
  check_bf16_out(c, out, "out", in.rows, F, in);
  if (in.device == Device::Cpu) return ref::swiglu(in, prob, out, opt.weighted);
  check_cuda(c, {{&in, "in"}, {&out, "out"}}, {{&prob, "prob"}});
  FP8FLOW_SM90(sm90::swiglu(in, prob, out, opt.weighted, stream));
}

void swiglu(const TensorView& in, const TensorView& prob, const ScaledTensor& out,
            const ScaledTensor& in_q, const SwigluOptions& opt, [[maybe_unused]] Stream stream) {
  const Check c("swiglu");
  const int64_t F = check_in(c, in);
  check_row_vector(c, prob, "prob", in.rows, opt.weighted, in);
  check_fp8_out(c, out, "out", in.rows, F, in);
  check_fp8_out(c, in_q, "in_q", in.rows, 2 * F, in, {DType::E4M3});
  if (in.device == Device::Cpu) return ref::swiglu(in, prob, out, in_q, opt.weighted);
  check_cuda(c, {{&in, "in"}, {&out.data, "out.data"}, {&in_q.data, "in_q.data"}},
             {{&prob, "prob"}, {&out.scale, "out.scale"}, {&in_q.scale, "in_q.scale"}});
  FP8FLOW_SM90(sm90::swiglu(in, prob, out, in_q, opt.weighted, stream));
}

void swiglu_backward(const TensorView& dy, const TensorView& in, const TensorView& prob,
                     const ScaledTensor& din, const TensorView& dprob, const SwigluOptions& opt,
                     [[maybe_unused]] Stream stream) {
  const Check c("swiglu_backward");
  const int64_t F = check_in(c, in);
  check_dy(c, dy, in.rows, F, in);
  check_row_vector(c, prob, "prob", in.rows, opt.weighted, in);
  check_fp8_out(c, din, "din", in.rows, 2 * F, in);
  check_row_vector(c, dprob, "dprob", in.rows, opt.weighted, in);
  if (in.device == Device::Cpu) return ref::swiglu_backward(dy, in, prob, din, dprob, opt.weighted);
  check_cuda(c, {{&dy, "dy"}, {&in, "in"}, {&din.data, "din.data"}},
             {{&prob, "prob"}, {&din.scale, "din.scale"}, {&dprob, "dprob"}});
  FP8FLOW_SM90(sm90::swiglu_backward(dy, in, prob, din, dprob, opt.weighted, stream));
}

void swiglu_backward(const TensorView& dy, const TensorView& in, const TensorView& prob,
                     const TensorView& din, const TensorView& dprob, const SwigluOptions& opt,
                     [[maybe_unused]] Stream stream) {
  const Check c("swiglu_backward");
  const int64_t F = check_in(c, in);
  check_dy(c, dy, in.rows, F, in);
  check_row_vector(c, prob, "prob", in.rows, opt.weighted, in);
  check_bf16_out(c, din, "din", in.rows, 2 * F, in);
  check_row_vector(c, dprob, "dprob", in.rows, opt.weighted, in);
  if (in.device == Device::Cpu) return ref::swiglu_backward(dy, in, prob, din, dprob, opt.weighted);
  check_cuda(c, {{&dy, "dy"}, {&in, "in"}, {&din, "din"}}, {{&prob, "prob"}, {&dprob, "dprob"}});
  FP8FLOW_SM90(sm90::swiglu_backward(dy, in, prob, din, dprob, opt.weighted, stream));
}

void swiglu_backward(const TensorView& dy, const ScaledTensor& in, const TensorView& prob,
                     const ScaledTensor& din, const TensorView& dprob, const SwigluOptions& opt,
                     [[maybe_unused]] Stream stream) {
  const Check c("swiglu_backward");
  const int64_t F = check_in(c, in);
  const TensorView& d = in.data;
  check_dy(c, dy, d.rows, F, d);
  check_row_vector(c, prob, "prob", d.rows, opt.weighted, d);
  check_fp8_out(c, din, "din", d.rows, 2 * F, d);
  check_row_vector(c, dprob, "dprob", d.rows, opt.weighted, d);
  if (d.device == Device::Cpu) return ref::swiglu_backward(dy, in, prob, din, dprob, opt.weighted);
  check_cuda(
      c, {{&dy, "dy"}, {&d, "in.data"}, {&din.data, "din.data"}},
      {{&prob, "prob"}, {&in.scale, "in.scale"}, {&din.scale, "din.scale"}, {&dprob, "dprob"}});
  FP8FLOW_SM90(sm90::swiglu_backward(dy, in, prob, din, dprob, opt.weighted, stream));
}

}  // namespace fp8flow
