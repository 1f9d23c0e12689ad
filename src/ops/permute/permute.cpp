// make_permutation / permute / unpermute and their backward passes: validate every argument on the
// host, then route to the reference backend (Cpu tensors) or the sm_90a backend (Cuda tensors).
#include "fp8flow/permute.h"

#include <algorithm>
#include <climits>
#include <cstdint>
#include <initializer_list>
#include <utility>

#include "common/backend.h"
#include "ops/permute/permute_backends.h"

namespace fp8flow {
namespace detail {

PlanChunks plan_chunks(int64_t num_pairs, int64_t num_experts) {
  // NOTES: the one-CTA scan kernel walks a [num_chunks][E + 1] histogram; keep it near 16K
  // entries (a few microseconds) while giving the ranking kernel as many warps as that allows.
  PlanChunks p;
  if (num_pairs <= 0) return p;
  const int64_t max_chunks = std::max<int64_t>(8, 16384 / (num_experts + 1));
  int64_t chunk = (num_pairs + max_chunks - 1) / max_chunks;
  chunk = std::max<int64_t>(256, (chunk + 31) / 32 * 32);
  p.chunk = static_cast<int32_t>(chunk);
  p.num_chunks = static_cast<int32_t>((num_pairs + chunk - 1) / chunk);
  return p;
}

}  // namespace detail

namespace {

using detail::Check;
using detail::PermuteRowsArgs;

bool present(const TensorView& t) {
  return t.data != nullptr;
}

// A 1-D tensor: contiguous, numel == n (or >= n with at_least), dtype among `dtypes`.
void vec(const Check& c, const TensorView& t, const std::string& arg,
         std::initializer_list<DType> dtypes, int64_t n, bool at_least = false) {
  c.view(t, arg, dtypes);
  c.contiguous(t, arg);
  if (at_least) {
    c.that(t.numel() >= n, arg, detail::cat("at least ", n, " elements"),
           detail::cat(t.numel(), " ([", t.rows, ", ", t.cols, "])"));
  } else {
    c.that(t.numel() == n, arg, detail::cat(n, " elements"),
           detail::cat(t.numel(), " ([", t.rows, ", ", t.cols, "])"));
  }
}

void mat(const Check& c, const TensorView& t, const std::string& arg,
         std::initializer_list<DType> dtypes, int64_t rows, int64_t cols) {
  c.view(t, arg, dtypes);
  c.shape(t, arg, rows, cols);
  c.contiguous(t, arg);
}

// plan.dest_row I32 [T][k] (T, k from the view): returns {T, k}.
std::pair<int64_t, int64_t> check_dest_row(const Check& c, const PermutationPlan& plan) {
  c.view(plan.dest_row, "plan.dest_row", {DType::I32});
  c.contiguous(plan.dest_row, "plan.dest_row");
  const int64_t k = plan.dest_row.cols;
  c.that(k >= 1 && k <= kMaxTopK, "plan.dest_row", detail::cat("k (cols) in [1, ", kMaxTopK, "]"),
         detail::cat(k));
  c.that(plan.dest_row.rows * k <= INT32_MAX, "plan.dest_row", "T * k < 2^31",
         detail::cat(plan.dest_row.rows * k));
  return {plan.dest_row.rows, k};
}

bool is_pow2_align(int a) {
  return a >= 1 && a <= kMaxPermuteAlign && (a & (a - 1)) == 0;
}

// Cuda tensors: the backend exists, each (non-empty) tensor is device memory.
void check_cuda(const Check& c,
                std::initializer_list<std::pair<const TensorView*, const char*>> ts) {
  detail::require_cuda_backend(c);
  for (auto [t, name] : ts) {
    detail::require_device_pointer(c, *t, name);
    // Natural alignment of the element type (F32/I32: 4 bytes, I64: 8), which kernels assume.
    const size_t elem = std::max(1, dtype_bits(t->dtype) / 8);
    const auto addr = reinterpret_cast<uintptr_t>(t->data);
    c.that(t->numel() == 0 || addr % elem == 0, name,
           detail::cat("data pointer aligned to ", elem, " bytes"),
           detail::cat("address ending 0x", std::hex, addr % 256));
  }
}

void same_devices(const Check& c, const TensorView& ref, const char* ref_name,
                  std::initializer_list<std::pair<const TensorView*, const char*>> ts) {
  for (auto [t, name] : ts) c.same_device(ref, ref_name, *t, name);
}

// Probabilities given with permute: both or neither; shapes [T][k] and [R].
bool check_probs(const Check& c, const PermuteProbs& p, int64_t T, int64_t k, int64_t R) {
  if (!present(p.topk_weight) && !present(p.prob)) return false;
  mat(c, p.topk_weight, "probs.topk_weight", {DType::F32}, T, k);
  vec(c, p.prob, "probs.prob", {DType::F32}, R);
  return true;
}

void run_permute_rows(const Check& c, const PermuteRowsArgs& a, Stream stream) {
  same_devices(c, a.in, "in", {{&a.out, "out"}, {&a.src_slot, "plan.src_slot"}});
  if (a.col_scale || a.row_scale)
    same_devices(c, a.in, "in", {{&a.in_scale, "in.scale"}, {&a.out_scale, "out.scale"}});
  if (a.probs)
    same_devices(c, a.in, "in", {{&a.topk_weight, "probs.topk_weight"}, {&a.prob, "probs.prob"}});
  if (a.in.device == Device::Cpu) return ref::permute_rows(a);
  check_cuda(c, {{&a.in, "in"}, {&a.out, "out"}, {&a.src_slot, "plan.src_slot"}});
  if (a.col_scale || a.row_scale)
    check_cuda(c, {{&a.in_scale, "in.scale"}, {&a.out_scale, "out.scale"}});
  if (a.probs) check_cuda(c, {{&a.topk_weight, "probs.topk_weight"}, {&a.prob, "probs.prob"}});
  if (a.scale_by_prob) check_cuda(c, {{&a.topk_weight, "topk_weight"}});
  if (present(a.dest_row)) {
    same_devices(c, a.in, "in", {{&a.dest_row, "plan.dest_row"}});
    check_cuda(c, {{&a.dest_row, "plan.dest_row"}});
  }
  c.aligned(a.in, "in.data", 16);
  c.aligned(a.out, "out.data", 16);
#if FP8FLOW_WITH_CUDA
  sm90::permute_rows(a, stream);
#else
  (void)stream;
#endif
}

}  // namespace

int64_t permutation_max_rows(int64_t num_tokens, int64_t topk, int64_t num_experts, int align) {
  return num_tokens * topk + num_experts * (static_cast<int64_t>(align) - 1);
}

size_t permutation_workspace_bytes(int64_t num_tokens, int64_t topk, int64_t num_experts) {
  if (num_tokens <= 0 || topk <= 0 || num_experts <= 0) return 0;
  const detail::PlanChunks p = detail::plan_chunks(num_tokens * topk, num_experts);
  const size_t bytes = static_cast<size_t>(p.num_chunks) * static_cast<size_t>(num_experts + 1) * 4;
  return (bytes + 255) / 256 * 256;
}

void make_permutation(const TensorView& topk_idx, int64_t num_experts, const PermutationPlan& plan,
                      void* workspace, size_t workspace_bytes, const PermutationOptions& opt,
                      Stream stream) {
  const Check c("make_permutation");
  c.view(topk_idx, "topk_idx", {DType::I32});
  c.contiguous(topk_idx, "topk_idx");
  const int64_t T = topk_idx.rows, k = topk_idx.cols;
  c.that(k >= 1 && k <= kMaxTopK, "topk_idx", detail::cat("k (cols) in [1, ", kMaxTopK, "]"),
         detail::cat(k));
  c.that(num_experts >= 1 && num_experts <= detail::kMaxGroups, "num_experts",
         detail::cat("in [1, ", detail::kMaxGroups, "]"), detail::cat(num_experts));
  c.that(is_pow2_align(opt.align), "options.align",
         detail::cat("a power of two in [1, ", kMaxPermuteAlign, "]"), detail::cat(opt.align));
  const int64_t bound = permutation_max_rows(T, k, num_experts, opt.align);
  c.that(bound <= INT32_MAX, "topk_idx", "T * k + E * (align - 1) < 2^31", detail::cat(bound));
  const int64_t E = num_experts;
  vec(c, plan.tokens_per_expert, "plan.tokens_per_expert", {DType::I32}, E);
  vec(c, plan.offsets, "plan.offsets", {DType::I64, DType::I32}, E + 1);
  mat(c, plan.dest_row, "plan.dest_row", {DType::I32}, T, k);
  vec(c, plan.src_slot, "plan.src_slot", {DType::I32}, bound, /*at_least=*/true);
  vec(c, plan.invalid, "plan.invalid", {DType::I32}, 1);
  same_devices(c, topk_idx, "topk_idx",
               {{&plan.tokens_per_expert, "plan.tokens_per_expert"},
                {&plan.offsets, "plan.offsets"},
                {&plan.dest_row, "plan.dest_row"},
                {&plan.src_slot, "plan.src_slot"},
                {&plan.invalid, "plan.invalid"}});
  if (topk_idx.device == Device::Cpu) return ref::make_permutation(topk_idx, E, plan, opt.align);

  check_cuda(c, {{&topk_idx, "topk_idx"},
                 {&plan.tokens_per_expert, "plan.tokens_per_expert"},
                 {&plan.offsets, "plan.offsets"},
                 {&plan.dest_row, "plan.dest_row"},
                 {&plan.src_slot, "plan.src_slot"},
                 {&plan.invalid, "plan.invalid"}});
  const size_t need = permutation_workspace_bytes(T, k, E);
  c.that(workspace_bytes >= need, "workspace_bytes",
         detail::cat("at least ", need, " (permutation_workspace_bytes)"),
         detail::cat(workspace_bytes));
  if (need > 0) {
    c.that(workspace != nullptr, "workspace", "a non-null device pointer", "nullptr");
    c.that(
        reinterpret_cast<uintptr_t>(workspace) % 16 == 0, "workspace", "a 16-byte aligned pointer",
        detail::cat("address ending 0x", std::hex, reinterpret_cast<uintptr_t>(workspace) % 256));
    const TensorView ws{workspace, DType::I32, 1, static_cast<int64_t>(need / 4), -1, Device::Cuda};
    detail::require_device_pointer(c, ws, "workspace");
  }
#if FP8FLOW_WITH_CUDA
  sm90::make_permutation(topk_idx, E, plan, opt.align, workspace, stream);
#else
  (void)stream;
#endif
}

void permute(const ScaledTensor& in, const ScaledTensor& out, const PermutationPlan& plan,
             const PermuteProbs& probs, Stream stream) {
  const Check c("permute");
  const auto [T, k] = check_dest_row(c, plan);
  c.that(in.layout == ScaleLayout::Rowwise1x128 || in.layout == ScaleLayout::Mx1x32, "in.layout",
         "Rowwise1x128 (FP8) or Mx1x32 (MXFP4)", to_string(in.layout));
  const bool mx = in.layout == ScaleLayout::Mx1x32;
  if (mx) {
    c.scaled(in, "in", in.layout, {DType::E2M1x2});
    c.scaled(out, "out", in.layout, {DType::E2M1x2});
  } else {
    c.scaled(in, "in", in.layout, {DType::E4M3, DType::E5M2});
    c.scaled(out, "out", in.layout, {DType::E4M3, DType::E5M2});
  }
  c.that(in.col_groups.empty(), "in.col_groups", "empty (row-wise tokens [T][H])",
         detail::cat(in.col_groups.size(), " groups"));
  c.that(out.col_groups.empty(), "out.col_groups", "empty (row-wise rows [R][H])",
         detail::cat(out.col_groups.size(), " groups"));
  c.that(out.data.dtype == in.data.dtype, "out.data",
         detail::cat("dtype ", to_string(in.data.dtype), " (as in.data)"),
         to_string(out.data.dtype));
  c.contiguous(in.data, "in.data");
  c.contiguous(out.data, "out.data");
  c.that(in.data.rows == T, "in.data", detail::cat(T, " rows (T, as plan.dest_row)"),
         detail::cat(in.data.rows));
  const int64_t H = in.data.cols, R = out.data.rows;
  if (!mx) c.cols_multiple(in.data, "in.data", 16);
  c.shape(out.data, "out.data", R, H);
  vec(c, plan.src_slot, "plan.src_slot", {DType::I32}, R, /*at_least=*/true);
  PermuteRowsArgs a;
  a.in = in.data;
  a.out = out.data;
  a.in_scale = in.scale;
  a.out_scale = out.scale;
  a.col_scale = !mx;
  a.row_scale = mx;
  if (check_probs(c, probs, T, k, R)) {
    a.topk_weight = probs.topk_weight;
    a.prob = probs.prob;
    a.probs = true;
  }
  a.src_slot = plan.src_slot;
  a.k = k;
  a.dest_row = plan.dest_row;
  run_permute_rows(c, a, stream);
}

void permute(const TensorView& in, const TensorView& out, const PermutationPlan& plan,
             const PermuteProbs& probs, Stream stream) {
  const Check c("permute");
  const auto [T, k] = check_dest_row(c, plan);
  c.view(in, "in", {DType::BF16, DType::F32});
  c.contiguous(in, "in");
  c.that(in.rows == T, "in", detail::cat(T, " rows (T, as plan.dest_row)"), detail::cat(in.rows));
  c.that(in.row_bytes() % 16 == 0, "in", "rows of a multiple of 16 bytes (H % 8 BF16, H % 4 F32)",
         detail::cat(in.row_bytes(), " bytes"));
  c.view(out, "out", {in.dtype});
  c.contiguous(out, "out");
  const int64_t R = out.rows;
  c.shape(out, "out", R, in.cols);
  vec(c, plan.src_slot, "plan.src_slot", {DType::I32}, R, /*at_least=*/true);
  PermuteRowsArgs a;
  a.in = in;
  a.out = out;
  if (check_probs(c, probs, T, k, R)) {
    a.topk_weight = probs.topk_weight;
    a.prob = probs.prob;
    a.probs = true;
  }
  a.src_slot = plan.src_slot;
  a.k = k;
  a.dest_row = plan.dest_row;
  run_permute_rows(c, a, stream);
}

namespace {

// y [R][H] -> out [T][H], both BF16 or F32, H % 8 == 0.
void check_unpermute(const Check& c, const TensorView& y, const TensorView& out, int64_t T) {
  c.view(y, "y", {DType::BF16, DType::F32});
  c.contiguous(y, "y");
  c.cols_multiple(y, "y", 8);
  mat(c, out, "out", {DType::BF16, DType::F32}, T, y.cols);
}

void run_unpermute(const Check& c, const TensorView& y, const TensorView* w, const TensorView& out,
                   const PermutationPlan& plan, Stream stream) {
  same_devices(c, y, "y", {{&out, "out"}, {&plan.dest_row, "plan.dest_row"}});
  if (w) c.same_device(y, "y", *w, "topk_weight");
  if (y.device == Device::Cpu) return ref::unpermute(y, w, out, plan.dest_row);
  check_cuda(c, {{&y, "y"}, {&out, "out"}, {&plan.dest_row, "plan.dest_row"}});
  if (w) check_cuda(c, {{w, "topk_weight"}});
  c.aligned(y, "y", 16);
  c.aligned(out, "out", 16);
#if FP8FLOW_WITH_CUDA
  sm90::unpermute(y, w, out, plan.dest_row, stream);
#else
  (void)stream;
#endif
}

}  // namespace

void unpermute(const TensorView& y, const TensorView& out, const PermutationPlan& plan,
               Stream stream) {
  const Check c("unpermute");
  const auto [T, k] = check_dest_row(c, plan);
  (void)k;
  check_unpermute(c, y, out, T);
  run_unpermute(c, y, nullptr, out, plan, stream);
}

void unpermute_weighted(const TensorView& y, const TensorView& topk_weight, const TensorView& out,
                        const PermutationPlan& plan, Stream stream) {
  const Check c("unpermute_weighted");
  const auto [T, k] = check_dest_row(c, plan);
  check_unpermute(c, y, out, T);
  mat(c, topk_weight, "topk_weight", {DType::F32}, T, k);
  run_unpermute(c, y, &topk_weight, out, plan, stream);
}

void permute_probs_backward(const TensorView& dprob, const PermutationPlan& plan,
                            const TensorView& dweight, Stream stream) {
  const Check c("permute_probs_backward");
  const auto [T, k] = check_dest_row(c, plan);
  vec(c, dprob, "dprob", {DType::F32}, dprob.numel());
  mat(c, dweight, "dweight", {DType::F32}, T, k);
  same_devices(c, dprob, "dprob", {{&dweight, "dweight"}, {&plan.dest_row, "plan.dest_row"}});
  if (dprob.device == Device::Cpu)
    return ref::permute_probs_backward(dprob, plan.dest_row, dweight);
  check_cuda(c, {{&dprob, "dprob"}, {&dweight, "dweight"}, {&plan.dest_row, "plan.dest_row"}});
#if FP8FLOW_WITH_CUDA
  sm90::permute_probs_backward(dprob, plan.dest_row, dweight, stream);
#else
  (void)stream;
#endif
}

void unpermute_weighted_backward(const TensorView& dout, const TensorView& y,
                                 const TensorView& topk_weight, const PermutationPlan& plan,
                                 const TensorView& dy, const TensorView& dweight, Stream stream) {
  const Check c("unpermute_weighted_backward");
  const auto [T, k] = check_dest_row(c, plan);
  c.view(dout, "dout", {DType::BF16, DType::F32});
  c.contiguous(dout, "dout");
  c.that(dout.rows == T, "dout", detail::cat(T, " rows (T, as plan.dest_row)"),
         detail::cat(dout.rows));
  c.cols_multiple(dout, "dout", 8);
  const int64_t H = dout.cols;
  c.view(y, "y", {DType::BF16, DType::F32});
  c.contiguous(y, "y");
  c.that(y.cols == H, "y", detail::cat(H, " cols (H, as dout)"), detail::cat(y.cols));
  const int64_t R = y.rows;
  mat(c, topk_weight, "topk_weight", {DType::F32}, T, k);
  mat(c, dy, "dy", {dout.dtype}, R, H);
  mat(c, dweight, "dweight", {DType::F32}, T, k);
  vec(c, plan.src_slot, "plan.src_slot", {DType::I32}, R, /*at_least=*/true);
  same_devices(c, dout, "dout",
               {{&y, "y"},
                {&topk_weight, "topk_weight"},
                {&dy, "dy"},
                {&dweight, "dweight"},
                {&plan.dest_row, "plan.dest_row"},
                {&plan.src_slot, "plan.src_slot"}});
  PermuteRowsArgs a;
  a.in = dout;
  a.out = dy;
  a.topk_weight = topk_weight;
  a.scale_by_prob = true;
  a.src_slot = plan.src_slot;
  a.k = k;
  if (dout.device == Device::Cpu) {
    ref::permute_rows(a);
    ref::unpermute_weight_grad(dout, y, plan.dest_row, dweight);
    return;
  }
  check_cuda(c, {{&dout, "dout"},
                 {&y, "y"},
                 {&topk_weight, "topk_weight"},
                 {&dy, "dy"},
                 {&dweight, "dweight"},
                 {&plan.dest_row, "plan.dest_row"},
                 {&plan.src_slot, "plan.src_slot"}});
  c.aligned(dout, "dout", 16);
  c.aligned(y, "y", 16);
  c.aligned(dy, "dy", 16);
#if FP8FLOW_WITH_CUDA
  sm90::permute_rows(a, stream);
  sm90::unpermute_weight_grad(dout, y, plan.dest_row, dweight, stream);
#else
  (void)stream;
#endif
}

}  // namespace fp8flow
