// Grouped GEMMs and transpose_block_weights: validate on the host, then route to the reference
// backend (Cpu tensors) or the sm_90a cuBLASLt backend (Cuda tensors). Both backends accept exactly
// the same calls: every shape/alignment rule is checked here, before either runs.
#include <algorithm>
#include <string>

#include "common/backend.h"
#include "ops/gemm/gemm_backends.h"

namespace fp8flow {

const char* to_string(GroupedGemmKind k) {
  switch (k) {
    case GroupedGemmKind::Fp8Fprop:
      return "Fp8Fprop";
    case GroupedGemmKind::Fp8Dgrad:
      return "Fp8Dgrad";
    case GroupedGemmKind::Fp8Wgrad:
      return "Fp8Wgrad";
    case GroupedGemmKind::Bf16Fprop:
      return "Bf16Fprop";
    case GroupedGemmKind::Bf16Dgrad:
      return "Bf16Dgrad";
    case GroupedGemmKind::Bf16Wgrad:
      return "Bf16Wgrad";
  }
  return "?";
}

namespace detail {

Fp8RowwiseWorkspace fp8_rowwise_workspace(int64_t nout, int64_t kc,
                                          std::span<const int64_t> m_splits, int lanes) {
  Fp8RowwiseWorkspace w;
  w.lanes_bytes = static_cast<size_t>(lanes) * kLaneWorkspaceBytes;
  w.scales_offset = w.lanes_bytes;
  size_t scales = 0;
  for (int64_t me : m_splits)
    scales += align_up(static_cast<size_t>(ceil_div(kc, 128) * me) * 4, kWorkspaceAlign);
  w.wscales_offset = w.scales_offset + scales;
  w.pad_weights = ceil_div(kc, 128) % 4 != 0;
  if (w.pad_weights)
    w.wscales_stride = align_up(static_cast<size_t>(ceil_div(nout, 128) * padded_k_blocks(kc)) * 4,
                                kWorkspaceAlign);
  w.total = w.wscales_offset + w.wscales_stride * m_splits.size();
  return w;
}

size_t packed_scale_offset(int64_t kc, std::span<const int64_t> m_splits, size_t e) {
  size_t off = 0;
  for (size_t i = 0; i < e; ++i)
    off += align_up(static_cast<size_t>(ceil_div(kc, 128) * m_splits[i]) * 4, kWorkspaceAlign);
  return off;
}

}  // namespace detail

namespace {

using detail::cat;
using detail::Check;

int lanes_of(const GroupedGemmOptions& o) {
  return std::clamp(o.streams, 1, detail::kMaxLanes);
}

void check_options(const Check& c, const GroupedGemmOptions& o) {
  c.that(o.streams >= 1 && o.streams <= detail::kMaxLanes, "options.streams",
         cat("1..", detail::kMaxLanes), cat(o.streams));
  c.that(o.first_stream >= 0 && o.first_stream + o.streams <= detail::kMaxLanes,
         "options.first_stream", cat("0..", detail::kMaxLanes, " - options.streams (",
                                     detail::kMaxLanes - o.streams, ")"),
         cat(o.first_stream));
  // The upper bound depends on the problem: the CUDA backend checks it when it builds the plan.
  c.that(o.algo >= 0, "options.algo", ">= 0 (an index into cuBLASLt's heuristic results)",
         cat(o.algo));
}

// m_splits: 1..kMaxGroups experts, sizes >= 0 (multiples of `align`), summing to `total`.
void check_splits(const Check& c, std::span<const int64_t> m_splits, int64_t total, int64_t align) {
  c.that(!m_splits.empty(), "m_splits", "at least one expert", "none");
  c.groups(m_splits, "m_splits", total);
  if (align > 1)
    for (size_t i = 0; i < m_splits.size(); ++i)
      if (!(m_splits[i] % align == 0))
        c.that(false, cat("m_splits[", i, "]"), cat("a multiple of ", align), cat(m_splits[i]));
}

// cuBLASLt and the scale-packing kernel read scales with 16-byte loads.
void check_scale_ptr(const Check& c, const TensorView& scale, const std::string& arg) {
  const auto addr = reinterpret_cast<uintptr_t>(scale.data);
  c.that(addr % 16 == 0, arg, "a data pointer aligned to 16 bytes",
         cat("address ending 0x", std::hex, addr % 256));
}

void check_count(const Check& c, size_t count, const std::string& arg, size_t experts) {
  c.that(count == experts, arg, cat(experts, " views (one per expert, as m_splits)"), cat(count));
}

// An output view: BF16 or F32, [rows][cols], 16-byte aligned rows; accumulate needs F32.
void check_out(const Check& c, const TensorView& t, const std::string& arg, int64_t rows,
               int64_t cols, const GroupedGemmOptions& o) {
  c.view(t, arg, {DType::BF16, DType::F32});
  c.shape(t, arg, rows, cols);
  c.aligned(t, arg, 16);
  if (o.accumulate)
    c.that(t.dtype == DType::F32, "options.accumulate", cat("an F32 ", arg, " (accumulate)"),
           cat(arg, " dtype ", to_string(t.dtype)));
}

void check_fp8_pair(const Check& c, DType a, const std::string& arg_a, DType b,
                    const std::string& arg_b) {
  c.that(!(a == DType::E5M2 && b == DType::E5M2), arg_b,
         cat("E4M3 when ", arg_a, " is E5M2 (no E5M2 x E5M2 GEMM)"), "E5M2");
}

void check_workspace(const Check& c, const Workspace& ws, size_t need) {
  c.that(ws.bytes >= need, "workspace.bytes", cat(">= ", need, " (grouped_gemm_workspace_bytes)"),
         cat(ws.bytes));
  if (need == 0) return;
  c.that(ws.data != nullptr, "workspace.data", "a non-null device pointer", "nullptr");
  c.that(reinterpret_cast<uintptr_t>(ws.data) % detail::kWorkspaceAlign == 0, "workspace.data",
         cat("a pointer aligned to ", detail::kWorkspaceAlign, " bytes"),
         cat("address ending 0x", std::hex, reinterpret_cast<uintptr_t>(ws.data) % 256));
  detail::require_device_pointer(c, TensorView{ws.data, DType::E4M3, 1, 1, -1, Device::Cuda},
                                 "workspace.data");
}

void require_cuda(const Check& c,
                  std::initializer_list<std::pair<const TensorView*, std::string>> ts) {
  detail::require_cuda_backend(c);
  for (const auto& [t, name] : ts) detail::require_device_pointer(c, *t, name);
}

// fprop / dgrad: out [M][Nout] = a [M][Kc] (1x128) . b_e^T, b_e [Nout][Kc] (128x128).
void check_rowwise(const Check& c, const ScaledTensor& a, const char* an,
                   std::span<const ScaledTensor> b, const char* bn, const TensorView& out,
                   const char* on, std::span<const int64_t> m_splits, const GroupedGemmOptions& o) {
  const std::string as = an, bs = bn;
  check_options(c, o);
  c.scaled(a, as, ScaleLayout::Rowwise1x128, {DType::E4M3, DType::E5M2});
  c.that(a.col_groups.empty(), as + ".col_groups", "empty (1x128 tiles along the contraction dim)",
         cat(a.col_groups.size(), " groups"));
  const int64_t M = a.data.rows, Kc = a.data.cols;
  c.cols_multiple(a.data, as + ".data", detail::kFp8DimAlign);
  c.aligned(a.data, as + ".data", 16);
  check_scale_ptr(c, a.scale, as + ".scale");
  check_splits(c, m_splits, M, detail::kFp8RowAlign);
  check_count(c, b.size(), bs, m_splits.size());
  c.view(out, on, {DType::BF16, DType::F32});
  const int64_t Nout = out.cols;
  c.that(Nout % detail::kFp8DimAlign == 0, on, cat("cols divisible by ", detail::kFp8DimAlign),
         cat(Nout));
  check_out(c, out, on, M, Nout, o);
  c.same_device(a.data, as + ".data", out, on);
  for (size_t e = 0; e < b.size(); ++e) {
    const std::string n = cat(bs, "[", e, "]");
    c.scaled(b[e], n, ScaleLayout::Block128x128, {DType::E4M3, DType::E5M2});
    c.shape(b[e].data, n + ".data", Nout, Kc);
    c.aligned(b[e].data, n + ".data", 16);
    check_scale_ptr(c, b[e].scale, n + ".scale");
    c.same_device(a.data, as + ".data", b[e].data, n + ".data");
    check_fp8_pair(c, a.data.dtype, as, b[e].data.dtype, n);
  }
}

void check_wgrad_operand(const Check& c, const ScaledTensor& t, const std::string& arg,
                         std::span<const int64_t> m_splits) {
  c.scaled(t, arg, ScaleLayout::Rowwise1x128, {DType::E4M3, DType::E5M2});
  c.that(t.col_groups.size() == m_splits.size() &&
             std::equal(t.col_groups.begin(), t.col_groups.end(), m_splits.begin()),
         arg + ".col_groups", "equal to m_splits (128-token tiles restart per expert)",
         cat(t.col_groups.size(), " groups"));
  c.that(t.data.rows % detail::kFp8DimAlign == 0, arg + ".data",
         cat("rows divisible by ", detail::kFp8DimAlign), cat(t.data.rows));
  c.aligned(t.data, arg + ".data", 16);
  check_scale_ptr(c, t.scale, arg + ".scale");
}

void check_dw(const Check& c, std::span<const TensorView> dw, const TensorView& ref_dev,
              const std::string& ref_name, int64_t N, int64_t K, size_t experts,
              const GroupedGemmOptions& o) {
  check_count(c, dw.size(), "dw", experts);
  for (size_t e = 0; e < dw.size(); ++e) {
    const std::string n = cat("dw[", e, "]");
    check_out(c, dw[e], n, N, K, o);
    c.same_device(ref_dev, ref_name, dw[e], n);
  }
}

void check_bf16(const Check& c, const TensorView& t, const std::string& arg) {
  c.view(t, arg, {DType::BF16});
  c.cols_multiple(t, arg, detail::kBf16DimAlign);
  c.aligned(t, arg, 16);
}

// Per-expert BF16 weights w[e] [N][K] on the device of `anchor` (named `anchor_name`).
void check_bf16_weights(const Check& c, std::span<const TensorView> w, int64_t N, int64_t K,
                        const TensorView& anchor, const char* anchor_name) {
  for (size_t e = 0; e < w.size(); ++e) {
    const std::string n = cat("w[", e, "]");
    check_bf16(c, w[e], n);
    c.shape(w[e], n, N, K);
    c.same_device(anchor, anchor_name, w[e], n);
  }
}

}  // namespace

size_t grouped_gemm_workspace_bytes(GroupedGemmKind kind, int64_t n, int64_t k,
                                    std::span<const int64_t> m_splits,
                                    const GroupedGemmOptions& options) {
  const int lanes = lanes_of(options);
  switch (kind) {
    case GroupedGemmKind::Fp8Fprop:
      return detail::fp8_rowwise_workspace(n, k, m_splits, lanes).total;
    case GroupedGemmKind::Fp8Dgrad:
      return detail::fp8_rowwise_workspace(k, n, m_splits, lanes).total;
    default:
      return static_cast<size_t>(lanes) * detail::kLaneWorkspaceBytes;
  }
}

void grouped_gemm_fprop(const ScaledTensor& x, std::span<const ScaledTensor> w, const TensorView& y,
                        std::span<const int64_t> m_splits, const Workspace& ws,
                        const GroupedGemmOptions& o, Stream stream) {
  const Check c("grouped_gemm_fprop");
  check_rowwise(c, x, "x", w, "w", y, "y", m_splits, o);
  if (x.data.device == Device::Cpu)
    return ref::grouped_gemm_rowwise(x, w, y, m_splits, o.accumulate);
  require_cuda(c, {{&x.data, "x.data"}, {&x.scale, "x.scale"}, {&y, "y"}});
  for (size_t e = 0; e < w.size(); ++e) {
    detail::require_device_pointer(c, w[e].data, cat("w[", e, "].data"));
    detail::require_device_pointer(c, w[e].scale, cat("w[", e, "].scale"));
  }
  check_workspace(
      c, ws,
      grouped_gemm_workspace_bytes(GroupedGemmKind::Fp8Fprop, y.cols, x.data.cols, m_splits, o));
#if FP8FLOW_WITH_CUDA  // a CPU-only build has thrown in require_cuda above
  sm90::grouped_gemm_rowwise(c.op(), x, w, y, m_splits, ws, o, stream);
#else
  (void)stream;
#endif
}

void grouped_gemm_dgrad(const ScaledTensor& dy, std::span<const ScaledTensor> w_t,
                        const TensorView& dx, std::span<const int64_t> m_splits,
                        const Workspace& ws, const GroupedGemmOptions& o, Stream stream) {
  const Check c("grouped_gemm_dgrad");
  check_rowwise(c, dy, "dy", w_t, "w_t", dx, "dx", m_splits, o);
  if (dy.data.device == Device::Cpu)
    return ref::grouped_gemm_rowwise(dy, w_t, dx, m_splits, o.accumulate);
  require_cuda(c, {{&dy.data, "dy.data"}, {&dy.scale, "dy.scale"}, {&dx, "dx"}});
  for (size_t e = 0; e < w_t.size(); ++e) {
    detail::require_device_pointer(c, w_t[e].data, cat("w_t[", e, "].data"));
    detail::require_device_pointer(c, w_t[e].scale, cat("w_t[", e, "].scale"));
  }
  check_workspace(
      c, ws,
      grouped_gemm_workspace_bytes(GroupedGemmKind::Fp8Dgrad, dy.data.cols, dx.cols, m_splits, o));
#if FP8FLOW_WITH_CUDA  // a CPU-only build has thrown in require_cuda above
  sm90::grouped_gemm_rowwise(c.op(), dy, w_t, dx, m_splits, ws, o, stream);
#else
  (void)stream;
#endif
}

void grouped_gemm_wgrad(const ScaledTensor& dy_t, const ScaledTensor& x_t,
                        std::span<const TensorView> dw, std::span<const int64_t> m_splits,
                        const Workspace& ws, const GroupedGemmOptions& o, Stream stream) {
  const Check c("grouped_gemm_wgrad");
  check_options(c, o);
  check_wgrad_operand(c, dy_t, "dy_t", m_splits);
  check_wgrad_operand(c, x_t, "x_t", m_splits);
  const int64_t N = dy_t.data.rows, K = x_t.data.rows, M = dy_t.data.cols;
  c.that(x_t.data.cols == M, "x_t.data", cat("cols ", M, " (tokens, as dy_t)"), cat(x_t.data.cols));
  check_splits(c, m_splits, M, detail::kFp8RowAlign);
  c.same_device(dy_t.data, "dy_t.data", x_t.data, "x_t.data");
  check_fp8_pair(c, dy_t.data.dtype, "dy_t", x_t.data.dtype, "x_t");
  check_dw(c, dw, dy_t.data, "dy_t.data", N, K, m_splits.size(), o);
  if (dy_t.data.device == Device::Cpu)
    return ref::grouped_gemm_wgrad(dy_t, x_t, dw, m_splits, o.accumulate);
  require_cuda(c, {{&dy_t.data, "dy_t.data"},
                   {&dy_t.scale, "dy_t.scale"},
                   {&x_t.data, "x_t.data"},
                   {&x_t.scale, "x_t.scale"}});
  for (size_t e = 0; e < dw.size(); ++e)
    detail::require_device_pointer(c, dw[e], cat("dw[", e, "]"));
  check_workspace(c, ws,
                  grouped_gemm_workspace_bytes(GroupedGemmKind::Fp8Wgrad, N, K, m_splits, o));
#if FP8FLOW_WITH_CUDA  // a CPU-only build has thrown in require_cuda above
  sm90::grouped_gemm_wgrad(dy_t, x_t, dw, m_splits, ws, o, stream);
#else
  (void)stream;
#endif
}

void grouped_gemm_fprop_bf16(const TensorView& x, std::span<const TensorView> w,
                             const TensorView& y, std::span<const int64_t> m_splits,
                             const Workspace& ws, const GroupedGemmOptions& o, Stream stream) {
  const Check c("grouped_gemm_fprop_bf16");
  check_options(c, o);
  check_bf16(c, x, "x");
  const int64_t M = x.rows, K = x.cols;
  check_splits(c, m_splits, M, 1);
  check_count(c, w.size(), "w", m_splits.size());
  c.view(y, "y", {DType::BF16, DType::F32});
  const int64_t N = y.cols;
  c.that(N % detail::kBf16DimAlign == 0, "y", cat("cols divisible by ", detail::kBf16DimAlign),
         cat(N));
  check_out(c, y, "y", M, N, o);
  c.same_device(x, "x", y, "y");
  check_bf16_weights(c, w, N, K, x, "x");
  if (x.device == Device::Cpu) return ref::grouped_gemm_fprop_bf16(x, w, y, m_splits, o.accumulate);
  require_cuda(c, {{&x, "x"}, {&y, "y"}});
  for (size_t e = 0; e < w.size(); ++e) detail::require_device_pointer(c, w[e], cat("w[", e, "]"));
  check_workspace(c, ws,
                  grouped_gemm_workspace_bytes(GroupedGemmKind::Bf16Fprop, N, K, m_splits, o));
#if FP8FLOW_WITH_CUDA  // a CPU-only build has thrown in require_cuda above
  sm90::grouped_gemm_fprop_bf16(x, w, y, m_splits, ws, o, stream);
#else
  (void)stream;
#endif
}

void grouped_gemm_dgrad_bf16(const TensorView& dy, std::span<const TensorView> w,
                             const TensorView& dx, std::span<const int64_t> m_splits,
                             const Workspace& ws, const GroupedGemmOptions& o, Stream stream) {
  const Check c("grouped_gemm_dgrad_bf16");
  check_options(c, o);
  check_bf16(c, dy, "dy");
  const int64_t M = dy.rows, N = dy.cols;
  check_splits(c, m_splits, M, 1);
  check_count(c, w.size(), "w", m_splits.size());
  c.view(dx, "dx", {DType::BF16, DType::F32});
  const int64_t K = dx.cols;
  c.that(K % detail::kBf16DimAlign == 0, "dx", cat("cols divisible by ", detail::kBf16DimAlign),
         cat(K));
  check_out(c, dx, "dx", M, K, o);
  c.same_device(dy, "dy", dx, "dx");
  check_bf16_weights(c, w, N, K, dy, "dy");
  if (dy.device == Device::Cpu)
    return ref::grouped_gemm_dgrad_bf16(dy, w, dx, m_splits, o.accumulate);
  require_cuda(c, {{&dy, "dy"}, {&dx, "dx"}});
  for (size_t e = 0; e < w.size(); ++e) detail::require_device_pointer(c, w[e], cat("w[", e, "]"));
  check_workspace(c, ws,
                  grouped_gemm_workspace_bytes(GroupedGemmKind::Bf16Dgrad, N, K, m_splits, o));
#if FP8FLOW_WITH_CUDA  // a CPU-only build has thrown in require_cuda above
  sm90::grouped_gemm_dgrad_bf16(dy, w, dx, m_splits, ws, o, stream);
#else
  (void)stream;
#endif
}

void grouped_gemm_wgrad_bf16(const TensorView& dy, const TensorView& x,
                             std::span<const TensorView> dw, std::span<const int64_t> m_splits,
                             const Workspace& ws, const GroupedGemmOptions& o, Stream stream) {
  const Check c("grouped_gemm_wgrad_bf16");
  check_options(c, o);
  check_bf16(c, dy, "dy");
  check_bf16(c, x, "x");
  const int64_t M = dy.rows, N = dy.cols, K = x.cols;
  c.that(x.rows == M, "x", cat("rows ", M, " (tokens, as dy)"), cat(x.rows));
  check_splits(c, m_splits, M, 1);
  c.same_device(dy, "dy", x, "x");
  check_dw(c, dw, dy, "dy", N, K, m_splits.size(), o);
  if (dy.device == Device::Cpu)
    return ref::grouped_gemm_wgrad_bf16(dy, x, dw, m_splits, o.accumulate);
  require_cuda(c, {{&dy, "dy"}, {&x, "x"}});
  for (size_t e = 0; e < dw.size(); ++e)
    detail::require_device_pointer(c, dw[e], cat("dw[", e, "]"));
  check_workspace(c, ws,
                  grouped_gemm_workspace_bytes(GroupedGemmKind::Bf16Wgrad, N, K, m_splits, o));
#if FP8FLOW_WITH_CUDA  // a CPU-only build has thrown in require_cuda above
  sm90::grouped_gemm_wgrad_bf16(dy, x, dw, m_splits, ws, o, stream);
#else
  (void)stream;
#endif
}

std::string grouped_gemm_last_algos() {
#if FP8FLOW_WITH_CUDA
  return sm90::last_algos();
#else
  return {};
#endif
}

void transpose_block_weights(const ScaledTensor& w, const ScaledTensor& w_t, Stream stream) {
  const Check c("transpose_block_weights");
  c.scaled(w, "w", ScaleLayout::Block128x128, {DType::E4M3, DType::E5M2});
  c.scaled(w_t, "w_t", ScaleLayout::Block128x128, {w.data.dtype});
  const int64_t N = w.data.rows, K = w.data.cols;
  c.that(N % 16 == 0 && N <= int64_t{65535} * 128, "w.data",
         "rows divisible by 16, at most 65535 * 128", cat(N));
  c.cols_multiple(w.data, "w.data", 16);
  c.contiguous(w.data, "w.data");
  c.shape(w_t.data, "w_t.data", K, N);
  c.contiguous(w_t.data, "w_t.data");
  c.aligned(w.data, "w.data", 16);
  c.aligned(w_t.data, "w_t.data", 16);
  c.same_device(w.data, "w.data", w_t.data, "w_t.data");
  if (w.data.device == Device::Cpu) return ref::transpose_block_weights(w, w_t);
  require_cuda(c, {{&w.data, "w.data"},
                   {&w.scale, "w.scale"},
                   {&w_t.data, "w_t.data"},
                   {&w_t.scale, "w_t.scale"}});
#if FP8FLOW_WITH_CUDA  // a CPU-only build has thrown in require_cuda above
  sm90::transpose_block_weights(w, w_t, stream);
#else
  (void)stream;
#endif
}

}  // namespace fp8flow
