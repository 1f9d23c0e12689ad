// fp8flow::MoELayer: one MoE layer composed of the public ops, four recipes (see moe.h for the
// dataflow and the cast-count definition). Memory comes from two pools allocated once: the layer's
// scratch pool and each context's saved-state pool; every per-call tensor is a view into them.
#include "fp8flow/moe.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "common/backend.h"
#include "common/check.h"
#include "fp8flow/comm.h"
#include "fp8flow/dispatch.h"
#include "fp8flow/formats.h"
#include "fp8flow/gemm.h"
#include "fp8flow/mxfp4.h"
#include "fp8flow/permute.h"
#include "fp8flow/quantize.h"
#include "fp8flow/swiglu.h"
#include "fp8flow/transpose.h"
#include "moe/moe_backends.h"
#include "ops/gemm/gemm_backends.h"

namespace fp8flow {

const char* to_string(Recipe r) {
  switch (r) {
    case Recipe::Bf16:
      return "bf16";
    case Recipe::Fp8Blockwise:
      return "fp8-blockwise";
    case Recipe::Fp8Flow:
      return "fp8-flow";
    case Recipe::Fp8FlowMxfp4:
      return "fp8-flow-mxfp4";
  }
  return "?";
}

namespace {

using detail::cat;
using detail::Check;

constexpr size_t kAlign = 256;
size_t align_up(size_t a) {
  return (a + kAlign - 1) / kAlign * kAlign;
}
size_t nbytes(DType d, int64_t r, int64_t c) {
  return static_cast<size_t>(r) * static_cast<size_t>(c) * dtype_bits(d) / 8;
}

struct Slot {
  size_t off = 0, bytes = 0;
};

// Bump layout of one pool: slots are laid out first, the memory allocated after.
struct Layout {
  size_t total = 0;
  Slot add(size_t bytes) {
    Slot s{total, bytes};
    total += align_up(bytes);
    return s;
  }
};

// A tensor slot and (for quantized tensors) its scale slot.
struct QSlot {
  Slot data, scale;
};

// The memory behind one pool plus view makers.
struct Pool {
  Device dev = Device::Cpu;
  uint8_t* base = nullptr;
  size_t bytes = 0;

  Pool() = default;
  Pool(const Pool&) = delete;
  Pool& operator=(const Pool&) = delete;
  Pool(Pool&& o) noexcept { *this = std::move(o); }
  Pool& operator=(Pool&& o) noexcept {
    std::swap(dev, o.dev);
    std::swap(base, o.base);
    std::swap(bytes, o.bytes);
    return *this;
  }
  ~Pool() { detail::moe_free(dev, base); }

  void allocate(Device d, size_t n, Stream stream) {
    dev = d;
    bytes = n;
    base = static_cast<uint8_t*>(detail::moe_alloc(d, n, stream));
  }
  void* ptr(const Slot& s) const { return base + s.off; }
  TensorView view(const Slot& s, DType d, int64_t r, int64_t c) const {
    if (nbytes(d, r, c) > s.bytes)
      detail::throw_error(ErrorKind::InvalidArgument,
                          cat("fp8flow::MoELayer: internal: pool slot of ", s.bytes,
                              " bytes too small for [", r, "][", c, "] ", to_string(d)));
    return TensorView{base + s.off, d, r, c, -1, dev};
  }
  // Row-wise FP8 [R][C], scale [C/128][R].
  ScaledTensor rowwise(const QSlot& q, int64_t r, int64_t c) const {
    return ScaledTensor{view(q.data, DType::E4M3, r, c),
                        view(q.scale, DType::F32, (c + 127) / 128, r),
                        ScaleLayout::Rowwise1x128,
                        {}};
  }
  // Column-wise copy stored transposed: data [K][M], scale [tiles][K], groups = m_splits.
  ScaledTensor colwise(const QSlot& q, int64_t k, int64_t m,
                       std::span<const int64_t> splits) const {
    return ScaledTensor{view(q.data, DType::E4M3, k, m),
                        view(q.scale, DType::F32, rowwise_tiles(m, splits), k),
                        ScaleLayout::Rowwise1x128, splits};
  }
  // MXFP4 [R][C], scale E8M0 [R][C/32].
  ScaledTensor mx(const QSlot& q, int64_t r, int64_t c) const {
    return ScaledTensor{view(q.data, DType::E2M1x2, r, c),
                        view(q.scale, DType::E8M0, r, c / 32),
                        ScaleLayout::Mx1x32,
                        {}};
  }
};

QSlot add_rowwise(Layout& l, int64_t r, int64_t c, bool need = true) {
  if (!need) return {};
  return {l.add(nbytes(DType::E4M3, r, c)), l.add(nbytes(DType::F32, (c + 127) / 128, r))};
}
// Column-wise [K][M] with up to M/128 + E tiles per row.
QSlot add_colwise(Layout& l, int64_t k, int64_t m, int64_t groups, bool need = true) {
  if (!need) return {};
  return {l.add(nbytes(DType::E4M3, k, m)), l.add(nbytes(DType::F32, m / 128 + groups + 1, k))};
}
QSlot add_mx(Layout& l, int64_t r, int64_t c, bool need = true) {
  if (!need) return {};
  return {l.add(nbytes(DType::E2M1x2, r, c)), l.add(nbytes(DType::E8M0, r, c / 32))};
}
Slot add_if(Layout& l, bool need, size_t bytes) {
  return need ? l.add(bytes) : Slot{};
}

bool is_fp8(Recipe r) {
  return r != Recipe::Bf16;
}
bool is_flow(Recipe r) {
  return r == Recipe::Fp8Flow || r == Recipe::Fp8FlowMxfp4;
}

// Counter slots in the context's int64 counter block.
enum Counter : int {
  kNfX,
  kNfY,
  kNfDy,
  kNfDx,
  kNfDw1,
  kNfDw2,
  kNfDgate,
  kUnderflow0,  // 4 transposes: dyp, a, dh, xp
  kNumCounters = kUnderflow0 + 4,
};

}  // namespace

// ------------------------------------------------------------------------------------------------
struct MoEContext::State {
  Recipe recipe = Recipe::Bf16;
  Pool pool;
  // Routing state (all recipes).
  Slot logits, topk_idx, topk_w, tpe_router, tpe, offsets, dest_row, src_slot, invalid, prob,
      counters;
  Slot seq_counts, aux_loss;  // aux loss on only
  // Saved activations: FC1 input, FC1 output, FC2 input in the recipe's saved format.
  Slot xp_bf16, a_bf16;  // Bf16
  QSlot xp_t, a_t;       // Fp8Blockwise (column-wise FP8 copies)
  QSlot xp_q, a_q;       // Fp8Flow (row-wise FP8)
  QSlot xp_mx, a_mx;     // Fp8FlowMxfp4
  Slot h;                // FC1 output (SwiGLU input) BF16 [M][2F]: Bf16, Fp8Blockwise
  QSlot h_q;             // ... as E4M3 1x128 (written by the fused SwiGLU): Fp8Flow, Fp8FlowMxfp4

  int64_t T = 0, Mp = 0, E = 0, H = 0, F = 0, k = 0;
  int64_t seq_len = 0;  // aux loss on: the router's seq_len, else 0
  // Expert parallelism (EP layers only): row maps of the last forward, its layout (host) and the
  // number of rows this rank sent (its valid pairs: the source plan's rows).
  Slot p2r, r2p, ep_table;
  DispatchLayout layout;
  DedupPlan dedup;  // cfg.ep_dedup: the forward's plan, reused by the backward's dy dispatch
  Slot ep_plan;     // ... and its device words (build_dedup_plan), made once in the forward
  Slot ep_build;    // build_dedup_plan's table
  int64_t n_send = 0;
  Stream stream = nullptr;  // of the last forward/backward: the accessors read on it
  std::vector<int64_t> m_splits;
  TensorView x;  // the caller's forward input (gate wgrad)
  bool forward_done = false;
  bool dw_counted = true;  // the last backward counted NaN/Inf in dW1, dW2 (or none ran yet)
  MoECastCount casts;
  MoEDebugViews debug;
  const void* layer = nullptr;

  TensorView counter_view() const { return pool.view(counters, DType::I64, 1, kNumCounters); }
  int64_t* counter(int i) const { return static_cast<int64_t*>(pool.ptr(counters)) + i; }
};

MoEContext::MoEContext(std::unique_ptr<State> s) : s_(std::move(s)) {}
MoEContext::MoEContext(MoEContext&&) noexcept = default;
MoEContext& MoEContext::operator=(MoEContext&&) noexcept = default;
MoEContext::~MoEContext() = default;

int64_t MoEContext::tokens() const {
  return s_->T;
}
int64_t MoEContext::padded_rows() const {
  return s_->Mp;
}
const std::vector<int64_t>& MoEContext::m_splits() const {
  return s_->m_splits;
}
size_t MoEContext::pool_bytes() const {
  return s_->pool.bytes;
}
MoECastCount MoEContext::casts() const {
  return s_->casts;
}
MoEDebugViews MoEContext::debug_views() const {
  return s_->debug;
}

namespace {

// Bytes of the activations recipe r saves for backward at M padded rows: the FC1 input, the FC1
// output h (the SwiGLU input) and the FC2 input, in the recipe's saved formats, with scales.
// `colwise_tiles`: scale tiles per row of Fp8Blockwise's column-wise copies [K][M].
size_t saved_bytes(Recipe r, int64_t M, int64_t H, int64_t F, int64_t colwise_tiles) {
  // h: BF16, or in the FP8-flow recipes E4M3 with 1x128 scales (DeepSeek-V3's practice).
  size_t b = is_flow(r) ? nbytes(DType::E4M3, M, 2 * F) + nbytes(DType::F32, 2 * F / 128, M)
                        : nbytes(DType::BF16, M, 2 * F);
  switch (r) {
    case Recipe::Bf16:
      b += nbytes(DType::BF16, M, H) + nbytes(DType::BF16, M, F);
      break;
    case Recipe::Fp8Blockwise:
      b += nbytes(DType::E4M3, H, M) + nbytes(DType::F32, colwise_tiles, H);
      b += nbytes(DType::E4M3, F, M) + nbytes(DType::F32, colwise_tiles, F);
      break;
    case Recipe::Fp8Flow:
      b += nbytes(DType::E4M3, M, H) + nbytes(DType::F32, H / 128, M);
      b += nbytes(DType::E4M3, M, F) + nbytes(DType::F32, F / 128, M);
      break;
    case Recipe::Fp8FlowMxfp4:
      b += nbytes(DType::E2M1x2, M, H) + nbytes(DType::E8M0, M, H / 32);
      b += nbytes(DType::E2M1x2, M, F) + nbytes(DType::E8M0, M, F / 32);
      break;
  }
  return b;
}

}  // namespace

size_t MoEContext::saved_activation_bytes() const {
  const State& s = *s_;
  return saved_bytes(s.recipe, s.Mp, s.H, s.F, rowwise_tiles(s.Mp, s.m_splits));
}

size_t MoEContext::saved_routing_bytes() const {
  const State& s = *s_;
  // (E here: the experts the router sees, E_g under expert parallelism.)
  return (s.seq_len > 0 ? nbytes(DType::I32, s.T / s.seq_len, s.E) + sizeof(float) : 0) +  // aux
         nbytes(DType::F32, s.T, s.E) + nbytes(DType::I32, s.T, s.k) * 2 +  // logits, idx, w
         nbytes(DType::I32, s.T, s.k) + nbytes(DType::I32, 1, s.Mp) +       // dest_row, src_slot
         nbytes(DType::I64, 1, s.E + 1) + nbytes(DType::I32, 1, 2 * s.E) +  // offsets, counts
         nbytes(DType::F32, 1, s.Mp);                                       // prob
}

MoETransposeUnderflow MoEContext::transpose_underflow() const {
  int64_t c[kNumCounters];
  detail::moe_copy_to_host(s_->pool.dev, c, s_->counter(0), sizeof c, s_->stream);
  return {c[kUnderflow0], c[kUnderflow0 + 1], c[kUnderflow0 + 2], c[kUnderflow0 + 3]};
}

float MoEContext::aux_loss() const {
  if (s_->aux_loss.bytes == 0) return 0.0f;
  float v = 0.0f;
  detail::moe_copy_to_host(s_->pool.dev, &v, s_->pool.ptr(s_->aux_loss), sizeof v, s_->stream);
  return v;
}

MoENonFinite MoEContext::nonfinite() const {
  int64_t c[kNumCounters];
  detail::moe_copy_to_host(s_->pool.dev, c, s_->counter(0), sizeof c, s_->stream);
  MoENonFinite n;
  n.x = c[kNfX];
  n.y = c[kNfY];
  n.dy = c[kNfDy];
  n.dx = c[kNfDx];
  n.dw1 = s_->dw_counted ? c[kNfDw1] : MoENonFinite::kNotCounted;
  n.dw2 = s_->dw_counted ? c[kNfDw2] : MoENonFinite::kNotCounted;
  n.dgate = c[kNfDgate];
  return n;
}

// ------------------------------------------------------------------------------------------------
struct MoELayer::Impl {
  MoEConfig cfg;
  MoEWeights w;
  Device dev = Device::Cpu;
  int64_t H = 0, F = 0, E = 0, k = 0, Tmax = 0, Mmax = 0;
  // Expert parallelism: E above is the LOCAL expert count E_l (weights, GEMMs, segments); Eg the
  // global one the router and the gate see (== E without EP). Rmax: rows one rank may receive.
  Communicator* comm = nullptr;
  int64_t Eg = 0, Rmax = 0;
  bool ep = false;
  // EP scratch: dispatch wire buffers (send: this rank's records, recv: received records; the
  // combine reuses send for the expert side's records), combine outputs in send order (rows BF16
  // [T k][H], dprob F32 [T k]), the dprob records, and x as MXFP4 (fp8-flow-mxfp4).
  Slot ep_send, ep_recv, ep_rows, ep_prob, ep_psend;
  Slot ep_map;  // cfg.ep_dedup: the permuted rows' record map (scratch of each dispatch)
  QSlot xq_mx;
  uint64_t forwards = 0;  // forward calls so far (cfg.mxfp4_stochastic's seed sequence)
  int weight_casts = 0;
  size_t weight_copy_bytes = 0;

  Pool pool;
  // Weights' FP8 copies: W1 [E*2F][H], W2 [E*H][F] (128x128 blocks), and per-expert transposes.
  QSlot w1q, w2q, w1t, w2t;
  // BF16 copies of F32 masters (Bf16 recipe only): [E*2F][H], [E*H][F].
  Slot w1_bf16, w2_bf16;
  bool bf16_copies = false;
  // Scratch.
  Slot perm_ws, router_ws, gemm_ws;
  Slot d_aux;          // F32 1.0: the aux loss enters the total loss with weight 1
  QSlot xq;            // quantized x [T][H] (fp8 recipes)
  Slot x_deq;          // dequantized x BF16 [T][H] (blockwise)
  Slot xp_bf16;        // permuted x BF16 [M][H] (blockwise; bf16 saves it in the context)
  QSlot xp_q;          // row-wise FC1 input [M][H] (blockwise, mxfp4; flow saves it)
  Slot h_bf16;         // FC1 out BF16 [M][2F] (flow, mxfp4: scratch, saved as FP8 in the context)
  Slot a_bf16;         // SwiGLU out BF16 (blockwise)
  QSlot a_q;           // row-wise FC2 input (blockwise, mxfp4)
  Slot yp;             // FC2 out BF16 [M][H]
  QSlot dyq;           // quantized dy [T][H]
  Slot dy_deq;         // BF16 [T][H] (blockwise)
  Slot dyp_bf16;       // BF16 [M][H] (bf16, blockwise)
  QSlot dyp_q, dyp_t;  // FC2 grad row-wise [M][H] and column-wise [H][M]
  Slot da;             // BF16 [M][F] FC2 dgrad out
  Slot dh_bf16;        // BF16 [M][2F] SwiGLU grad (bf16, blockwise)
  QSlot dh_q, dh_t;    // FC1 grad row-wise [M][2F], column-wise [2F][M]
  QSlot xp_t, a_t;     // column-wise FC1/FC2 inputs for wgrad (flow, mxfp4)
  Slot dxp;            // BF16 [M][H] FC1 dgrad out
  Slot dx_exp;         // F32 [T][H]
  Slot dprob;          // F32 [M]
  Slot dtw;            // F32 [T][k]
  Slot dlogits;        // F32 [T][E]

  std::vector<ScaledTensor> w1q_e, w2q_e, w1t_e, w2t_e;
  std::vector<TensorView> w1_e, w2_e;

  // cfg.overlap_wgrad: the side stream the wgrads run on (created with the pool), its GEMM
  // workspace, and how many internal GEMM streams it may use (0: no overlap).
  detail::SideStream side;
  Slot gemm_ws_side;
  int side_lanes = 0;

  Impl() = default;
  Impl(const Impl&) = delete;
  Impl& operator=(const Impl&) = delete;
  ~Impl() { detail::moe_side_destroy(side); }

  GroupedGemmOptions gemm_opt() const {
    GroupedGemmOptions o;
    o.streams = cfg.gemm_streams;
    return o;
  }
  // The wgrads' options with overlap: internal streams after those of gemm_opt().
  GroupedGemmOptions gemm_opt_side() const {
    GroupedGemmOptions o;
    o.streams = std::max(1, side_lanes);
    if (o.streams > 1) o.first_stream = cfg.gemm_streams;
    return o;
  }
  Workspace ws_gemm() const { return Workspace{pool.ptr(gemm_ws), gemm_ws.bytes}; }
  Workspace ws_gemm_side() const { return Workspace{pool.ptr(gemm_ws_side), gemm_ws_side.bytes}; }
};

namespace {

void check_config(const Check& c, const MoEConfig& cfg) {
  c.that(cfg.hidden > 0 && cfg.hidden % 128 == 0, "cfg.hidden", "a positive multiple of 128",
         cat(cfg.hidden));
  c.that(cfg.ffn > 0 && cfg.ffn % 128 == 0, "cfg.ffn", "a positive multiple of 128", cat(cfg.ffn));
  // FP8 recipes: each expert's slice of the 128x128 weight scales ([2F/128][H/128] and
  // [H/128][F/128] F32 per expert) must start 16-byte aligned for the GEMM library.
  if (cfg.recipe != Recipe::Bf16 && cfg.hidden > 0 && cfg.ffn > 0)
    c.that((cfg.hidden / 128) * (cfg.ffn / 128) % 4 == 0, "cfg.hidden, cfg.ffn",
           "(hidden / 128) * (ffn / 128) a multiple of 4 for the FP8 recipes (per-expert weight "
           "scales 16-byte aligned)",
           cat(cfg.hidden, ", ", cfg.ffn));
  c.that(cfg.experts >= 4 && cfg.experts <= 256 && cfg.experts % 4 == 0, "cfg.experts",
         "a multiple of 4 in [4, 256]", cat(cfg.experts));
  c.that(cfg.router.top_k >= 1 && cfg.router.top_k <= 8 && cfg.router.top_k <= cfg.experts,
         "cfg.router.top_k", "in [1, min(8, experts)]", cat(cfg.router.top_k));
  if (cfg.router.aux_enabled())
    c.that(cfg.router.seq_len >= 1 && cfg.router.seq_len <= cfg.max_tokens, "cfg.router.seq_len",
           "in [1, max_tokens] when the aux loss is on", cat(cfg.router.seq_len));
  const int a = cfg.align;
  c.that(a == 0 || (a >= 16 && a <= 128 && (a & (a - 1)) == 0), "cfg.align",
         "0 (automatic) or a power of two in [16, 128]", cat(a));
  c.that(cfg.max_tokens >= 1 && cfg.max_tokens < (int64_t{1} << 24), "cfg.max_tokens",
         "in [1, 2^24)", cat(cfg.max_tokens));
  c.that(cfg.gemm_streams >= 1 && cfg.gemm_streams <= 8, "cfg.gemm_streams", "in [1, 8]",
         cat(cfg.gemm_streams));
  c.that(cfg.ep_size >= 1 && cfg.experts % cfg.ep_size == 0, "cfg.ep_size",
         cat("a positive divisor of cfg.experts (", cfg.experts, ")"), cat(cfg.ep_size));
  c.that(cfg.ep_max_recv_rows >= 0 && cfg.ep_max_recv_rows < (int64_t{1} << 30),
         "cfg.ep_max_recv_rows", "in [0, 2^30)", cat(cfg.ep_max_recv_rows));
}

void check_weights(const Check& c, const MoEConfig& cfg, const MoEWeights& w) {
  // The gate sees all experts; w1/w2 hold the local ones (all of them without EP).
  const int64_t H = cfg.hidden, F = cfg.ffn, E = cfg.experts / cfg.ep_size, Eg = cfg.experts;
  c.view(w.gate, "w.gate", {DType::F32});
  c.shape(w.gate, "w.gate", Eg, H);
  c.contiguous(w.gate, "w.gate");
  c.view(w.w1, "w.w1", {DType::BF16, DType::F32});
  c.shape(w.w1, "w.w1", E * 2 * F, H);
  c.contiguous(w.w1, "w.w1");
  c.view(w.w2, "w.w2", {DType::BF16, DType::F32});
  c.that(w.w2.dtype == w.w1.dtype, "w.w2.dtype", cat(to_string(w.w1.dtype), " (as w.w1)"),
         to_string(w.w2.dtype));
  c.shape(w.w2, "w.w2", E * H, F);
  c.contiguous(w.w2, "w.w2");
  c.same_device(w.w1, "w.w1", w.gate, "w.gate");
  c.same_device(w.w1, "w.w1", w.w2, "w.w2");
  if (w.gate_bias.data) {
    c.view(w.gate_bias, "w.gate_bias", {DType::F32});
    c.that(w.gate_bias.numel() == Eg, "w.gate_bias", cat(Eg, " elements"),
           cat(w.gate_bias.numel()));
    c.same_device(w.w1, "w.w1", w.gate_bias, "w.gate_bias");
  }
  if (w.w1.device == Device::Cuda) {
    detail::require_cuda_backend(c);
    detail::require_device_pointer(c, w.gate, "w.gate");
    detail::require_device_pointer(c, w.w1, "w.w1");
    detail::require_device_pointer(c, w.w2, "w.w2");
    c.aligned(w.gate, "w.gate", 16);
    c.aligned(w.w1, "w.w1", 16);
    c.aligned(w.w2, "w.w2", 16);
  }
}

// Activation-like caller tensor: BF16/F32 [rows][cols], contiguous, on the layer's device.
void check_io(const Check& c, const TensorView& t, const char* name, DType d, int64_t rows,
              int64_t cols, Device dev) {
  c.view(t, name, {d});
  c.shape(t, name, rows, cols);
  c.contiguous(t, name);
  c.that(t.device == dev, cat(name, ".device"), to_string(dev), to_string(t.device));
  if (dev == Device::Cuda) {
    detail::require_device_pointer(c, t, name);
    c.aligned(t, name, 16);
  }
}

// The explicit casts (moe.h: what counts). Every activation/gradient quantize or dequantize of the
// layer goes through these, so MoECastCount is a count of launches, not a table.
void cast_q(int& n, const TensorView& in, const ScaledTensor& out, Stream stream) {
  quantize(in, out, {}, stream);
  ++n;
}
void cast_qt(int& n, const TensorView& in, const ScaledTensor& out_t, Stream stream) {
  quantize_transposed(in, out_t, {}, stream);
  ++n;
}
void cast_dq(int& n, const ScaledTensor& in, const TensorView& out, Stream stream) {
  dequantize(in, out, stream);
  ++n;
}

void count_nonfinite(Device dev, const TensorView& t, int64_t* count, Stream stream) {
  if (dev == Device::Cpu) return ref::moe_count_nonfinite(t, count);
  FP8FLOW_SM90(sm90::moe_count_nonfinite(t, count, stream));
}

}  // namespace

namespace {

// Lays out the layer's scratch pool for cfg (masters of dtype `master`, pool on `dev`): fills the
// slots of m and returns the pool size. Shared by the constructor and MoELayer::memory_plan.
size_t layout_layer(MoELayer::Impl& m, const MoEConfig& cfg, DType master, Device dev) {
  m.cfg = cfg;
  m.cfg.align = cfg.resolved_align();  // 0: the recipe's default (MoEConfig::align)
  m.dev = dev;
  m.H = cfg.hidden;
  m.F = cfg.ffn;
  m.Eg = cfg.experts;
  m.E = cfg.experts / cfg.ep_size;
  m.ep = cfg.ep_size > 1 || m.comm != nullptr;
  m.k = cfg.router.top_k;
  m.Tmax = cfg.max_tokens;
  m.Mmax = permutation_max_rows(m.Tmax, m.k, m.E, m.cfg.align);
  if (m.ep) {
    m.Rmax = cfg.ep_max_recv_rows > 0 ? cfg.ep_max_recv_rows
                                      : dispatch_max_recv_rows(cfg.ep_size, m.Tmax, m.k, m.E);
    m.Mmax = m.Rmax + m.E * (m.cfg.align - 1);
  }
  const int64_t H = m.H, F = m.F, E = m.E, T = m.Tmax, M = m.Mmax, k = m.k, Eg = m.Eg;
  const Recipe r = cfg.recipe;
  const bool fp8 = is_fp8(r), flow = is_flow(r), blk = r == Recipe::Fp8Blockwise,
             mx = r == Recipe::Fp8FlowMxfp4, bf = r == Recipe::Bf16;
  const bool cuda = m.dev == Device::Cuda;

  Layout l;
  if (fp8) {
    m.w1q = {l.add(nbytes(DType::E4M3, E * 2 * F, H)),
             l.add(nbytes(DType::F32, E * 2 * F / 128, H / 128))};
    m.w2q = {l.add(nbytes(DType::E4M3, E * H, F)), l.add(nbytes(DType::F32, E * H / 128, F / 128))};
    m.w1t = {l.add(nbytes(DType::E4M3, E * H, 2 * F)),
             l.add(nbytes(DType::F32, E * H / 128, 2 * F / 128))};
    m.w2t = {l.add(nbytes(DType::E4M3, E * F, H)), l.add(nbytes(DType::F32, E * F / 128, H / 128))};
  }
  m.bf16_copies = bf && master == DType::F32;
  m.w1_bf16 = add_if(l, m.bf16_copies, nbytes(DType::BF16, E * 2 * F, H));
  m.w2_bf16 = add_if(l, m.bf16_copies, nbytes(DType::BF16, E * H, F));
  m.weight_copy_bytes = l.total;
  m.d_aux = add_if(l, cfg.router.aux_enabled(), sizeof(float));
  m.perm_ws = l.add(cuda ? permutation_workspace_bytes(T, k, Eg) : 0);
  m.router_ws = l.add(cuda ? router_workspace_bytes(T, Eg, cfg.router) : 0);
  if (m.ep) {
    // Dispatch records carry the recipe's payload (+ prob); the backward dispatch (no prob) and
    // the combine (BF16 rows, expert side) fit in the same buffers.
    const DType pd = r == Recipe::Bf16           ? DType::BF16
                     : r == Recipe::Fp8FlowMxfp4 ? DType::E2M1x2
                                                 : DType::E4M3;
    const DType bd = r == Recipe::Bf16 ? DType::BF16 : DType::E4M3;  // backward: dy
    const int64_t B =
        std::max(dispatch_wire(pd, H, true).row_bytes, dispatch_wire(bd, H, false).row_bytes);
    const int64_t Bc = dispatch_wire(DType::BF16, H, false).row_bytes;
    int64_t send = std::max(T * k * B, m.Rmax * Bc), recv = m.Rmax * B;
    if (cfg.ep_dedup) {
      // Dedup records: at most T min(k, N) sent (one per token and rank), at most min(N T, Rmax)
      // received (each source sends a token once; never more records than rows).
      const int64_t Bd = std::max(dispatch_dedup_wire(pd, H, static_cast<int>(k)).row_bytes,
                                  dispatch_dedup_wire(bd, H, static_cast<int>(k)).row_bytes);
      const int64_t N = cfg.ep_size, sent = T * std::min<int64_t>(k, N);
      send = std::max(send, sent * Bd);
      recv = std::max(recv, std::min(N * T, m.Rmax) * Bd);
      m.ep_map = l.add(nbytes(DType::I32, 1, M));
    }
    m.ep_send = l.add(static_cast<size_t>(send));
    m.ep_recv = l.add(static_cast<size_t>(recv));
    m.ep_rows = l.add(nbytes(DType::BF16, T * k, H));
    m.ep_prob = l.add(nbytes(DType::F32, 1, T * k));
    m.ep_psend = l.add(nbytes(DType::F32, 1, m.Rmax));
    m.xq_mx = add_mx(l, T, H, r == Recipe::Fp8FlowMxfp4);
  }
  if (cuda) {
    // Bound on every grouped GEMM's workspace for any split of at most M rows over E experts: the
    // packed activation scales are sum_e align256(4 * ceil(K/128) * M_e) <= 4 * ceil(K/128) * M +
    // 256 E, which the {M, 0, ..., 0} split over-counts by E * 256 bytes (added).
    std::vector<int64_t> one(static_cast<size_t>(E), 0);
    one[0] = M;
    size_t need = 0;
    const GroupedGemmOptions o = m.gemm_opt();
    for (auto kind :
         {GroupedGemmKind::Fp8Fprop, GroupedGemmKind::Fp8Dgrad, GroupedGemmKind::Fp8Wgrad,
          GroupedGemmKind::Bf16Fprop, GroupedGemmKind::Bf16Dgrad, GroupedGemmKind::Bf16Wgrad})
      for (auto [n, kk] : {std::pair{2 * F, H}, std::pair{H, F}})
        need = std::max(need, grouped_gemm_workspace_bytes(kind, n, kk, one, o));
    m.gemm_ws = l.add(need + static_cast<size_t>(E) * 256);
    m.side_lanes =
        cfg.overlap_wgrad ? std::min(cfg.gemm_streams, detail::kMaxLanes - cfg.gemm_streams) : 0;
    if (m.side_lanes > 0) {
      size_t side = 0;
      for (auto kind : {GroupedGemmKind::Fp8Wgrad, GroupedGemmKind::Bf16Wgrad})
        for (auto [n, kk] : {std::pair{2 * F, H}, std::pair{H, F}})
          side = std::max(side, grouped_gemm_workspace_bytes(kind, n, kk, one, m.gemm_opt_side()));
      m.gemm_ws_side = l.add(side);
    }
  } else {
    m.side_lanes = 0;
  }
  // Forward temporaries and backward temporaries are never live together: the backward ones
  // start again at the same offset (unless cfg.debug_no_scratch_reuse), so the pool holds the
  // larger of the two sets, not their sum.
  const size_t temps_base = l.total;
  m.xq = add_rowwise(l, T, H, fp8);
  m.x_deq = add_if(l, blk, nbytes(DType::BF16, T, H));
  m.xp_bf16 = add_if(l, blk, nbytes(DType::BF16, M, H));
  m.xp_q = add_rowwise(l, M, H, blk || mx);
  m.h_bf16 = add_if(l, flow, nbytes(DType::BF16, M, 2 * F));
  m.a_bf16 = add_if(l, blk, nbytes(DType::BF16, M, F));
  m.a_q = add_rowwise(l, M, F, blk || mx);
  m.yp = l.add(nbytes(DType::BF16, M, H));
  const size_t forward_end = l.total;
  const bool reuse = !cfg.debug_no_scratch_reuse;
  if (reuse) l.total = temps_base;
  // Backward, phase 1 (FC2: combine-grad cast, permute, FC2 dgrad + wgrad) and phase 2 (SwiGLU
  // backward, FC1 dgrad + wgrad, unpermute, router/gate backward) share memory too; only the FC2
  // dgrad output `da` crosses from one to the other.
  m.da = l.add(nbytes(DType::BF16, M, F));
  const size_t phase1_base = l.total;
  m.dyq = add_rowwise(l, T, H, fp8);
  m.dy_deq = add_if(l, blk, nbytes(DType::BF16, T, H));
  m.dyp_bf16 = add_if(l, bf || blk, nbytes(DType::BF16, M, H));
  m.dyp_q = add_rowwise(l, M, H, fp8);
  m.dyp_t = add_colwise(l, H, M, E, fp8);
  m.a_t = add_colwise(l, F, M, E, flow);
  const size_t phase1_end = l.total;
  if (reuse) l.total = phase1_base;
  m.dh_bf16 = add_if(l, bf || blk, nbytes(DType::BF16, M, 2 * F));
  m.dh_q = add_rowwise(l, M, 2 * F, fp8);
  m.dh_t = add_colwise(l, 2 * F, M, E, fp8);
  m.xp_t = add_colwise(l, H, M, E, flow);
  m.dxp = l.add(nbytes(DType::BF16, M, H));
  m.dx_exp = l.add(nbytes(DType::F32, T, H));
  m.dprob = l.add(nbytes(DType::F32, 1, M));
  m.dtw = l.add(nbytes(DType::F32, T, k));
  m.dlogits = l.add(nbytes(DType::F32, T, Eg));
  l.total = std::max(l.total, phase1_end);
  l.total = std::max(l.total, forward_end);
  return l.total;
}

}  // namespace

MoELayer::MoELayer(const MoEConfig& cfg, const MoEWeights& w, Stream stream)
    : MoELayer(cfg, w, nullptr, stream) {}

namespace {

int64_t f32_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

// What every rank of an EP group must agree on: the config fields that shape the computation or
// the collectives, and the weights' dtype / bias presence.
std::vector<int64_t> config_fingerprint(const MoEConfig& cfg, const MoEWeights& w) {
  const RouterConfig& rc = cfg.router;
  return {cfg.hidden,
          cfg.ffn,
          cfg.experts,
          static_cast<int64_t>(cfg.recipe),
          cfg.align,
          cfg.max_tokens,
          cfg.ep_size,
          cfg.ep_max_recv_rows,
          cfg.ep_dedup ? 1 : 0,
          static_cast<int64_t>(rc.kind),
          rc.top_k,
          rc.n_groups,
          rc.topk_groups,
          rc.renormalize,
          f32_bits(rc.scaling),
          f32_bits(rc.aux_alpha),
          rc.seq_len,
          static_cast<int64_t>(w.w1.dtype),
          w.gate_bias.data != nullptr};
}

}  // namespace

MoELayer::MoELayer(const MoEConfig& cfg, const MoEWeights& w, Communicator* comm, Stream stream)
    : p_(std::make_unique<Impl>()) {
  const Check c("MoELayer");
  if (comm) {
    // First, collectively, so that a mismatch throws on every rank (none is left waiting).
    check_same_on_all_ranks(*comm, config_fingerprint(cfg, w), "MoELayer: cfg", stream);
    c.that(comm->size() == cfg.ep_size, "cfg.ep_size", cat(comm->size(), " (comm->size())"),
           cat(cfg.ep_size));
    c.that(comm->device() == w.w1.device, "comm",
           cat("a communicator on the weights' device (", to_string(w.w1.device), ")"),
           cat(comm->backend(), " on ", to_string(comm->device())));
  } else {
    c.that(cfg.ep_size == 1, "cfg.ep_size", "1 without a communicator", cat(cfg.ep_size));
  }
  check_config(c, cfg);
  check_weights(c, cfg, w);
  Impl& m = *p_;
  m.w = w;
  m.comm = comm;
  m.pool.allocate(w.w1.device, layout_layer(m, cfg, w.w1.dtype, w.w1.device), stream);
  if (m.side_lanes > 0) m.side = detail::moe_side_create(m.dev);
  if (cfg.router.aux_enabled()) {
    const float one = 1.0f;
    detail::moe_copy_from_host(m.dev, m.pool.ptr(m.d_aux), &one, sizeof one, stream);
  }
  const int64_t H = m.H, F = m.F, E = m.E;
  const bool fp8 = is_fp8(cfg.recipe);

  // Per-expert weight views (BF16 views are (re)pointed by refresh_weights).
  m.w1_e.assign(static_cast<size_t>(E), TensorView{nullptr, DType::BF16, 2 * F, H, -1, m.dev});
  m.w2_e.assign(static_cast<size_t>(E), TensorView{nullptr, DType::BF16, H, F, -1, m.dev});
  for (int64_t e = 0; e < E; ++e) {
    if (!fp8) continue;
    auto blk_view = [&](const QSlot& q, int64_t n, int64_t kk) {
      auto* d = static_cast<uint8_t*>(m.pool.ptr(q.data)) + e * n * kk;
      auto* s = static_cast<float*>(m.pool.ptr(q.scale)) + e * (n / 128) * (kk / 128);
      return ScaledTensor{TensorView{d, DType::E4M3, n, kk, -1, m.dev},
                          TensorView{s, DType::F32, n / 128, kk / 128, -1, m.dev},
                          ScaleLayout::Block128x128,
                          {}};
    };
    m.w1q_e.push_back(blk_view(m.w1q, 2 * F, H));
    m.w2q_e.push_back(blk_view(m.w2q, H, F));
    m.w1t_e.push_back(blk_view(m.w1t, H, 2 * F));
    m.w2t_e.push_back(blk_view(m.w2t, F, H));
  }
  refresh_weights(stream);
}

MoELayer::MoELayer(MoELayer&&) noexcept = default;
MoELayer& MoELayer::operator=(MoELayer&&) noexcept = default;
MoELayer::~MoELayer() = default;

const MoEConfig& MoELayer::config() const {
  return p_->cfg;
}
Device MoELayer::device() const {
  return p_->dev;
}
size_t MoELayer::pool_bytes() const {
  return p_->pool.bytes;
}
int MoELayer::weight_casts() const {
  return p_->weight_casts;
}

void MoELayer::refresh_weights(const MoEWeights& w, Stream stream) {
  const Check c("MoELayer::refresh_weights");
  check_weights(c, p_->cfg, w);
  c.that(w.w1.device == p_->dev, "w.w1.device", to_string(p_->dev), to_string(w.w1.device));
  c.that(w.w1.dtype == p_->w.w1.dtype, "w.w1.dtype", to_string(p_->w.w1.dtype),
         to_string(w.w1.dtype));
  p_->w = w;
  refresh_weights(stream);
}

void MoELayer::refresh_weights(Stream stream) {
  Impl& m = *p_;
  // BF16 per-expert views: the masters themselves, or their BF16 copies (F32 masters, Bf16 recipe).
  if (m.bf16_copies) {
    const TensorView c1 = m.pool.view(m.w1_bf16, DType::BF16, m.E * 2 * m.F, m.H);
    const TensorView c2 = m.pool.view(m.w2_bf16, DType::BF16, m.E * m.H, m.F);
    if (m.dev == Device::Cpu) {
      ref::moe_to_bf16(m.w.w1, c1);
      ref::moe_to_bf16(m.w.w2, c2);
    } else {
      FP8FLOW_SM90(sm90::moe_to_bf16(m.w.w1, c1, stream));
      FP8FLOW_SM90(sm90::moe_to_bf16(m.w.w2, c2, stream));
    }
    m.weight_casts += 2;
  }
  auto* w1b = static_cast<uint8_t*>(m.bf16_copies ? m.pool.ptr(m.w1_bf16) : m.w.w1.data);
  auto* w2b = static_cast<uint8_t*>(m.bf16_copies ? m.pool.ptr(m.w2_bf16) : m.w.w2.data);
  for (int64_t e = 0; e < m.E; ++e) {
    m.w1_e[e].data = w1b + nbytes(DType::BF16, e * 2 * m.F, m.H);
    m.w2_e[e].data = w2b + nbytes(DType::BF16, e * m.H, m.F);
  }
  if (!is_fp8(m.cfg.recipe)) return;
  const int64_t H = m.H, F = m.F, E = m.E;
  auto whole = [&](const QSlot& q, int64_t n, int64_t kk) {
    return ScaledTensor{m.pool.view(q.data, DType::E4M3, n, kk),
                        m.pool.view(q.scale, DType::F32, n / 128, kk / 128),
                        ScaleLayout::Block128x128,
                        {}};
  };
  // 128x128 blocks never straddle experts (2F % 128 == H % 128 == 0): one launch per matrix.
  quantize(m.w.w1, whole(m.w1q, E * 2 * F, H), {}, stream);
  quantize(m.w.w2, whole(m.w2q, E * H, F), {}, stream);
  m.weight_casts += 2;
  // W_e^T for every expert: on Cuda one stacked launch per matrix (the per-expert views are slices
  // of whole, contiguous W / W^T tensors; 2F % 128 == H % 128 == 0), else per expert.
  if (m.dev == Device::Cuda) {
    FP8FLOW_SM90(sm90::transpose_block_weights_batched(whole(m.w1q, E * 2 * F, H),
                                                       whole(m.w1t, E * H, 2 * F), E, stream));
    FP8FLOW_SM90(sm90::transpose_block_weights_batched(whole(m.w2q, E * H, F),
                                                       whole(m.w2t, E * F, H), E, stream));
    return;
  }
  for (int64_t e = 0; e < E; ++e) {
    transpose_block_weights(m.w1q_e[e], m.w1t_e[e], stream);
    transpose_block_weights(m.w2q_e[e], m.w2t_e[e], stream);
  }
}

namespace {

// An EP dispatch of token-order rows `in` to this rank's permuted rows `out`: the record path
// (one record per pair, send map src_slot) or, with cfg.ep_dedup, one record per (token, rank)
// by the plan the forward made.
void ep_dispatch_rows(const MoELayer::Impl& m, const MoEContext::State& s, const DispatchRows& in,
                      const TensorView& src_slot, const DispatchRows& out,
                      const DispatchBuffers& buf, Stream stream) {
  const Pool& P = m.pool;
  if (!m.cfg.ep_dedup) {
    dispatch(*m.comm, s.layout, in, src_slot, static_cast<int>(m.k),
             s.pool.view(s.p2r, DType::I32, 1, m.Mmax), out, buf, stream);
    return;
  }
  dispatch_dedup(*m.comm, s.layout, s.dedup, in,
                 s.pool.view(s.ep_plan, DType::I32, 1, static_cast<int64_t>(s.ep_plan.bytes / 4)),
                 P.view(m.ep_map, DType::I32, 1, m.Mmax), out, buf, stream);
}

// Lays out a context's saved-state pool for layer m; returns its size.
size_t layout_context(MoEContext::State* s, const MoELayer::Impl& m) {
  const int64_t H = m.H, F = m.F, E = m.E, T = m.Tmax, M = m.Mmax, k = m.k, Eg = m.Eg;
  const Recipe r = m.cfg.recipe;
  s->recipe = r;
  s->E = Eg;
  s->H = H;
  s->F = F;
  s->k = k;
  Layout l;
  s->logits = l.add(nbytes(DType::F32, T, Eg));
  s->topk_idx = l.add(nbytes(DType::I32, T, k));
  s->topk_w = l.add(nbytes(DType::F32, T, k));
  s->tpe_router = l.add(nbytes(DType::I32, 1, Eg));
  // The routing plan: over the local experts (single GPU), or the source plan over E_g with
  // align 1 (EP: T k rows at most) plus the expert side's row maps.
  s->tpe = l.add(nbytes(DType::I32, 1, Eg));
  s->offsets = l.add(nbytes(DType::I64, 1, Eg + 1));
  s->dest_row = l.add(nbytes(DType::I32, T, k));
  s->src_slot = l.add(nbytes(DType::I32, 1, m.ep ? T * k : M));
  if (m.ep) {
    s->p2r = l.add(nbytes(DType::I32, 1, M));
    s->r2p = l.add(nbytes(DType::I32, 1, m.Rmax));
    s->ep_table = l.add(nbytes(DType::I64, 1, (E + 1) + E * (2 * m.cfg.ep_size + 1)));
    if (m.cfg.ep_dedup) {  // at most T min(k, N) records of 1 + k words
      s->ep_plan =
          l.add(nbytes(DType::I32, 1, dedup_plan_max_words(T, static_cast<int>(k), m.cfg.ep_size)));
      s->ep_build = l.add(nbytes(DType::I32, 1, dedup_build_work_words(Eg, m.cfg.ep_size)));
    }
  }
  s->invalid = l.add(nbytes(DType::I32, 1, 1));
  s->prob = l.add(nbytes(DType::F32, 1, M));
  s->counters = l.add(nbytes(DType::I64, 1, kNumCounters));
  if (m.cfg.router.aux_enabled()) {
    s->seq_len = m.cfg.router.seq_len;
    s->seq_counts = l.add(nbytes(DType::I32, T / m.cfg.router.seq_len, Eg));
    s->aux_loss = l.add(nbytes(DType::F32, 1, 1));
  }
  s->h = add_if(l, !is_flow(r), nbytes(DType::BF16, M, 2 * F));
  s->h_q = add_rowwise(l, M, 2 * F, is_flow(r));
  if (r == Recipe::Bf16) {
    s->xp_bf16 = l.add(nbytes(DType::BF16, M, H));
    s->a_bf16 = l.add(nbytes(DType::BF16, M, F));
  } else if (r == Recipe::Fp8Blockwise) {
    s->xp_t = add_colwise(l, H, M, E);
    s->a_t = add_colwise(l, F, M, E);
  } else if (r == Recipe::Fp8Flow) {
    s->xp_q = add_rowwise(l, M, H);
    s->a_q = add_rowwise(l, M, F);
  } else {
    s->xp_mx = add_mx(l, M, H);
    s->a_mx = add_mx(l, M, F);
  }
  return l.total;
}

}  // namespace

MoEContext MoELayer::make_context() const {
  auto s = std::make_unique<MoEContext::State>();
  s->layer = p_.get();
  s->pool.allocate(p_->dev, layout_context(s.get(), *p_), nullptr);
  return MoEContext(std::move(s));
}

MoEMemoryPlan MoELayer::memory_plan(const MoEConfig& cfg, DType master, Device dev) {
  const Check c("MoELayer::memory_plan");
  check_config(c, cfg);
  c.that(master == DType::BF16 || master == DType::F32, "master", "BF16 or F32", to_string(master));
  Impl m;
  MoEMemoryPlan plan;
  plan.layer_pool_bytes = layout_layer(m, cfg, master, dev);
  MoEContext::State s;
  plan.context_pool_bytes = layout_context(&s, m);
  plan.weight_copy_bytes = m.weight_copy_bytes;
  plan.max_padded_rows = m.Mmax;
  // Column-wise tiles bound: M / 128 full tiles plus one partial tile per expert.
  plan.saved_activation_bytes_max = saved_bytes(cfg.recipe, m.Mmax, m.H, m.F, m.Mmax / 128 + m.E);
  return plan;
}

// ------------------------------------------------------------------------------------------------
void MoELayer::forward(const TensorView& x, const TensorView& y, MoEContext& ctx,
                       const MoEForwardOptions& opt, Stream stream) {
  const Check c("MoELayer::forward");
  Impl& m = *p_;
  c.that(ctx.s_ && ctx.s_->layer == p_.get(), "ctx", "a context made by this layer's make_context",
         "a foreign or moved-from context");
  c.view(x, "x", {DType::BF16});
  c.that(x.rows >= 1 && x.rows <= m.Tmax, "x.rows", cat("in [1, ", m.Tmax, "] (max_tokens)"),
         cat(x.rows));
  check_io(c, x, "x", DType::BF16, x.rows, m.H, m.dev);
  check_io(c, y, "y", DType::BF16, x.rows, m.H, m.dev);
  c.that(x.data != y.data, "y", "a buffer distinct from x", "the same pointer");
  const bool aux = m.cfg.router.aux_enabled();
  if (aux)
    c.that(
        x.rows % m.cfg.router.seq_len == 0, "x.rows",
        cat("a multiple of cfg.router.seq_len (", m.cfg.router.seq_len, ") with the aux loss on"),
        cat(x.rows));

  MoEContext::State& s = *ctx.s_;
  const Pool& P = m.pool;
  const Pool& S = s.pool;
  const int64_t T = x.rows, H = m.H, F = m.F, E = m.E, k = m.k, Eg = m.Eg;
  const Recipe r = m.cfg.recipe;
  const Device dev = m.dev;
  const bool ep = m.ep;
  s.T = T;
  s.x = x;
  s.stream = stream;
  s.forward_done = false;
  s.dw_counted = true;
  s.casts = {};
  s.debug = {};
  const uint64_t forward_number = m.forwards++;
  detail::moe_memset0(dev, S.ptr(s.counters), s.counters.bytes, stream);
  count_nonfinite(dev, x, s.counter(kNfX), stream);

  // Router: gate GEMM, top-k, plan.
  const TensorView logits = S.view(s.logits, DType::F32, T, Eg);
  if (dev == Device::Cpu)
    ref::moe_gate_logits(x, m.w.gate, logits);
  else
    FP8FLOW_SM90(sm90::moe_gate_logits(x, m.w.gate, logits, stream));
  RouterOutputs ro;
  ro.topk_idx = S.view(s.topk_idx, DType::I32, T, k);
  ro.topk_weight = S.view(s.topk_w, DType::F32, T, k);
  ro.tokens_per_expert = S.view(s.tpe_router, DType::I32, 1, Eg);
  if (aux) {
    ro.seq_counts = S.view(s.seq_counts, DType::I32, T / m.cfg.router.seq_len, Eg);
    ro.aux_loss = S.view(s.aux_loss, DType::F32, 1, 1);
  }
  const TensorView bias = m.w.gate_bias.data
                              ? TensorView{m.w.gate_bias.data, DType::F32, 1, Eg, -1, dev}
                              : TensorView{};
  const TensorView router_ws =
      dev == Device::Cuda && m.router_ws.bytes > 0
          ? P.view(m.router_ws, DType::E4M3, 1, static_cast<int64_t>(m.router_ws.bytes))
          : TensorView{};
  router_forward(logits, bias, ro, m.cfg.router, router_ws, stream);
  // The routing plan: single GPU over the local experts, padded; EP: the source plan over E_g
  // (align 1: the send order, dispatch.h).
  const int64_t Ep = ep ? Eg : E;
  PermutationPlan plan;
  plan.tokens_per_expert = S.view(s.tpe, DType::I32, 1, Ep);
  plan.offsets = S.view(s.offsets, DType::I64, 1, Ep + 1);
  plan.dest_row = S.view(s.dest_row, DType::I32, T, k);
  plan.src_slot = S.view(s.src_slot, DType::I32, 1, ep ? T * k : m.Mmax);
  plan.invalid = S.view(s.invalid, DType::I32, 1, 1);
  make_permutation(ro.topk_idx, Ep, plan, P.ptr(m.perm_ws), m.perm_ws.bytes, {ep ? 1 : m.cfg.align},
                   stream);

  // The one host sync of a step: padded offsets (-> m_splits) and the non-finite count of x.
  std::vector<int64_t> off(static_cast<size_t>(Ep + 1));
  int64_t nf_x = 0;
  detail::moe_copy_to_host(dev, &nf_x, s.counter(kNfX), sizeof nf_x, stream, /*sync=*/false);
  // cfg.ep_dedup: the routing comes along (its per-rank token counts join the counts exchange).
  const bool dedup = ep && m.cfg.ep_dedup;
  std::vector<int32_t> idx_host(dedup ? static_cast<size_t>(T * k) : 0);
  if (dedup)
    detail::moe_copy_to_host(dev, idx_host.data(), ro.topk_idx.data,
                             idx_host.size() * sizeof(int32_t), stream, /*sync=*/false);
  detail::moe_copy_to_host(dev, off.data(), S.ptr(s.offsets), off.size() * sizeof(int64_t), stream);
  int64_t M = 0;
  if (ep) {
    // Counts exchange: per-expert counts of the source plan, with x's non-finite count appended
    // so that every rank rejects a bad x together (none is left in a collective), and with
    // cfg.ep_dedup this rank's tokens per destination rank (dedup_token_counts).
    const int N = m.comm->size();
    const int64_t W = Eg + 1 + (dedup ? N : 0);  // values per rank
    std::vector<int64_t> mine(static_cast<size_t>(W));
    for (int64_t e = 0; e < Eg; ++e) mine[e] = off[e + 1] - off[e];
    mine[Eg] = nf_x;
    if (dedup) {  // -1 where the routing has an expert out of range: every rank then fails below
      const bool valid = std::all_of(idx_host.begin(), idx_host.end(),
                                     [&](int32_t e) { return e >= 0 && e < Eg; });
      const std::vector<int64_t> tok =
          valid ? dedup_token_counts(idx_host, static_cast<int>(k), N, Eg)
                : std::vector<int64_t>(static_cast<size_t>(N), -1);
      std::copy(tok.begin(), tok.end(), mine.begin() + Eg + 1);
    }
    const std::vector<int64_t> all = m.comm->all_gather(mine, stream);
    std::vector<int64_t> counts, all_tokens;
    counts.reserve(static_cast<size_t>(N * Eg));
    int64_t nf_any = 0, nf_rank = -1;
    for (int q = 0; q < N; ++q) {
      counts.insert(counts.end(), all.begin() + q * W, all.begin() + q * W + Eg);
      all_tokens.insert(all_tokens.end(), all.begin() + q * W + Eg + 1, all.begin() + (q + 1) * W);
      if (all[q * W + Eg] != 0 && nf_rank < 0) {
        nf_rank = q;
        nf_any = all[q * W + Eg];
      }
    }
    if (opt.reject_nonfinite_input && nf_any != 0)
      c.fail(ErrorKind::InvalidArgument, "x",
             cat("expected finite values on every rank, got ", nf_any, " NaN/Inf elements on rank ",
                 nf_rank));
    s.layout = make_dispatch_layout(counts, N, m.comm->rank(), Eg, m.cfg.align);
    if (s.layout.max_recv_total > m.Rmax)
      c.fail(ErrorKind::InvalidArgument, "cfg.ep_max_recv_rows",
             cat("expected every rank to receive at most ", m.Rmax,
                 " rows (the pools' bound), got ", s.layout.max_recv_total));
    make_dispatch_maps(s.layout, S.view(s.ep_table, DType::I64, 1, s.ep_table.bytes / 8),
                       S.view(s.p2r, DType::I32, 1, m.Mmax),
                       S.view(s.r2p, DType::I32, 1, std::max<int64_t>(1, s.layout.recv_total)),
                       stream);
    if (dedup) {
      for (int q = 0; q < N; ++q)
        if (all_tokens[static_cast<size_t>(q) * static_cast<size_t>(N)] < 0)
          c.fail(ErrorKind::InvalidArgument, "x",
                 cat("a routing with experts in [0, ", Eg,
                     ") on every rank (cfg.ep_dedup), got "
                     "an expert out of range on rank ",
                     q));
      const TensorView plan_dev = S.view(s.ep_plan, DType::I32, 1, s.ep_plan.bytes / 4);
      if (N <= kDedupBuildMaxRanks) {
        // The plan's words built on the device from the routing and the source plan already
        // there (build_dedup_plan; on the CPU its reference backend, so the EP layer's CPU tests
        // cover this wiring); the host only sizes it. The host plan took 0.1-0.4 ms here,
        // between the step's sync and the dispatch.
        s.dedup = make_dedup_plan_sizes(s.layout, T, static_cast<int>(k), all_tokens);
        build_dedup_plan(s.dedup, s.layout, ro.topk_idx, plan.dest_row, off,
                         S.view(s.ep_build, DType::I32, 1, s.ep_build.bytes / 4), plan_dev, stream);
      } else {
        make_dedup_plan(s.layout, idx_host, static_cast<int>(k), all_tokens, s.dedup);
        upload_dedup_plan(s.dedup, plan_dev, stream);
      }
    }
    s.m_splits = s.layout.m_splits;
    M = s.layout.padded_rows;
    s.n_send = off[Eg];
    plan.src_slot = S.view(s.src_slot, DType::I32, 1, s.n_send);
  } else {
    if (opt.reject_nonfinite_input && nf_x != 0)
      c.fail(ErrorKind::InvalidArgument, "x",
             cat("expected finite values, got ", nf_x, " NaN/Inf elements"));
    s.m_splits.resize(static_cast<size_t>(E));
    for (int64_t e = 0; e < E; ++e) s.m_splits[e] = off[e + 1] - off[e];
    M = off[E];
    plan.src_slot = S.view(s.src_slot, DType::I32, 1, M);
  }
  s.Mp = M;
  const std::span<const int64_t> splits(s.m_splits);
  // The dispatch point (EP): token-order rows (+ top-k weights) -> this rank's permuted rows
  // (+ probs); the single-GPU path calls permute at the same place.
  const DispatchBuffers ep_buf{P.ptr(m.ep_send), m.ep_send.bytes, P.ptr(m.ep_recv),
                               m.ep_recv.bytes};
  auto ep_dispatch = [&](const DispatchRows& in, const DispatchRows& out) {
    ep_dispatch_rows(m, s, in, plan.src_slot, out, ep_buf, stream);
  };

  PermuteProbs probs{ro.topk_weight, S.view(s.prob, DType::F32, 1, M)};
  // FC1 output h: saved as is (Bf16, Fp8Blockwise), or scratch whose FP8 copy is saved (flow).
  const TensorView h =
      is_flow(r) ? P.view(m.h_bf16, DType::BF16, M, 2 * F) : S.view(s.h, DType::BF16, M, 2 * F);
  s.debug.fc1_out = h;
  const TensorView yp = P.view(m.yp, DType::BF16, M, H);
  const Workspace ws = m.ws_gemm();
  const GroupedGemmOptions go = m.gemm_opt();
  int& nc = s.casts.forward;
  switch (r) {
    case Recipe::Bf16: {
      const TensorView xp = S.view(s.xp_bf16, DType::BF16, M, H);
      const TensorView a = S.view(s.a_bf16, DType::BF16, M, F);
      if (ep)
        ep_dispatch({x, {}, ro.topk_weight}, {xp, {}, probs.prob});
      else
        permute(x, xp, plan, probs, stream);
      grouped_gemm_fprop_bf16(xp, m.w1_e, h, splits, ws, go, stream);
      swiglu(h, probs.prob, a, {}, stream);
      grouped_gemm_fprop_bf16(a, m.w2_e, yp, splits, ws, go, stream);
      break;
    }
    case Recipe::Fp8Blockwise: {
      const ScaledTensor xq = P.rowwise(m.xq, T, H);
      const TensorView xd = P.view(m.x_deq, DType::BF16, T, H);
      const TensorView xp = P.view(m.xp_bf16, DType::BF16, M, H);
      const ScaledTensor xpq = P.rowwise(m.xp_q, M, H);
      const ScaledTensor xpt = S.colwise(s.xp_t, H, M, splits);
      const TensorView a = P.view(m.a_bf16, DType::BF16, M, F);
      const ScaledTensor aq = P.rowwise(m.a_q, M, F);
      const ScaledTensor at = S.colwise(s.a_t, F, M, splits);
      cast_q(nc, x, xq, stream);  // cast 1: before dispatch
      if (ep) {
        // FP8 on the wire, landing permuted in xpq's buffer; cast 2 dequantizes the permuted rows
        // (pad rows: code 0 x 2^-127 = +0, what permute(bf16) writes), then cast 3 overwrites it.
        ep_dispatch({xq.data, xq.scale, ro.topk_weight}, {xpq.data, xpq.scale, probs.prob});
        cast_dq(nc, xpq, xp, stream);  // cast 2: after dispatch
      } else {
        cast_dq(nc, xq, xd, stream);  // cast 2: after dispatch
        permute(xd, xp, plan, probs, stream);
      }
      cast_q(nc, xp, xpq, stream);   // cast 3: FC1 input row-wise
      cast_qt(nc, xp, xpt, stream);  // cast 4: FC1 input column-wise (saved)
      grouped_gemm_fprop(xpq, m.w1q_e, h, splits, ws, go, stream);
      swiglu(h, probs.prob, a, {}, stream);
      cast_q(nc, a, aq, stream);   // cast 5: FC2 input row-wise
      cast_qt(nc, a, at, stream);  // cast 6: FC2 input column-wise (saved)
      grouped_gemm_fprop(aq, m.w2q_e, yp, splits, ws, go, stream);
      s.debug.fc1_fprop_x = xpq;
      s.debug.fc2_fprop_x = aq;
      break;
    }
    case Recipe::Fp8Flow:
    case Recipe::Fp8FlowMxfp4: {
      const bool mx = r == Recipe::Fp8FlowMxfp4;
      const ScaledTensor xq = P.rowwise(m.xq, T, H);
      const ScaledTensor xpq = mx ? P.rowwise(m.xp_q, M, H) : S.rowwise(s.xp_q, M, H);
      const ScaledTensor aq = mx ? P.rowwise(m.a_q, M, F) : S.rowwise(s.a_q, M, F);
      const ScaledTensor hq = S.rowwise(s.h_q, M, 2 * F);
      cast_q(nc, x, xq, stream);  // cast 1: the only forward cast
      if (ep && mx) {
        // MXFP4 on the wire; the received permuted MXFP4 rows are the saved FC1 input.
        const ScaledTensor xq4 = P.mx(m.xq_mx, T, H);
        const ScaledTensor xp4 = S.mx(s.xp_mx, M, H);
        fp8_to_mxfp4(xq, xq4, stream);
        ep_dispatch({xq4.data, xq4.scale, ro.topk_weight}, {xp4.data, xp4.scale, probs.prob});
        mxfp4_to_fp8(xp4, xpq, stream);
        s.casts.conversions += 2;
      } else if (ep) {
        ep_dispatch({xq.data, xq.scale, ro.topk_weight}, {xpq.data, xpq.scale, probs.prob});
      } else {
        permute(xq, xpq, plan, probs, stream);
      }
      grouped_gemm_fprop(xpq, m.w1q_e, h, splits, ws, go, stream);
      swiglu(h, probs.prob, aq, hq, {}, stream);  // fused SwiGLU + quantize of a, and of h (saved)
      grouped_gemm_fprop(aq, m.w2q_e, yp, splits, ws, go, stream);
      if (mx) {
        // Saved forms: RNE, or stochastic with this forward's seeds (MoEConfig::mxfp4_stochastic).
        auto rounding = [&](uint64_t j) {
          Mxfp4Rounding r;
          r.stochastic = m.cfg.mxfp4_stochastic;
          r.seed = fmt::sr_bits(m.cfg.mxfp4_seed, 2 * forward_number + j) |
                   (uint64_t{fmt::sr_bits(~m.cfg.mxfp4_seed, 2 * forward_number + j)} << 32);
          return r;
        };
        if (!ep) {
          fp8_to_mxfp4(xpq, S.mx(s.xp_mx, M, H), rounding(0), stream);
          ++s.casts.conversions;
        }
        fp8_to_mxfp4(aq, S.mx(s.a_mx, M, F), rounding(1), stream);
        ++s.casts.conversions;
      }
      s.debug.fc1_fprop_x = xpq;
      s.debug.fc2_fprop_x = aq;
      s.debug.swiglu_saved_in = hq;
      break;
    }
  }
  if (ep) {
    // Combine: expert outputs back to the tokens' ranks (send order), then the single-GPU sum.
    const TensorView yr = P.view(m.ep_rows, DType::BF16, s.n_send, H);
    combine(*m.comm, s.layout, {yp, {}, {}},
            S.view(s.r2p, DType::I32, 1, std::max<int64_t>(1, s.layout.recv_total)), yr, ep_buf,
            stream);
    unpermute(yr, y, plan, stream);
  } else {
    unpermute(yp, y, plan, stream);
  }
  count_nonfinite(dev, y, s.counter(kNfY), stream);
  s.debug.topk_idx = ro.topk_idx;
  s.debug.topk_weight = ro.topk_weight;
  s.forward_done = true;
}

// ------------------------------------------------------------------------------------------------
void MoELayer::backward(const TensorView& dy, const MoEGrads& g, MoEContext& ctx, Stream stream) {
  backward(dy, g, ctx, MoEBackwardOptions{}, stream);
}

void MoELayer::backward(const TensorView& dy, const MoEGrads& g, MoEContext& ctx,
                        const MoEBackwardOptions& opt, Stream stream) {
  const Check c("MoELayer::backward");
  Impl& m = *p_;
  c.that(ctx.s_ && ctx.s_->layer == p_.get(), "ctx", "a context made by this layer's make_context",
         "a foreign or moved-from context");
  MoEContext::State& s = *ctx.s_;
  c.that(s.forward_done, "ctx", "a context holding a forward not yet consumed by backward",
         "none (call forward first; backward runs once per forward)");
  const int64_t T = s.T, M = s.Mp, H = m.H, F = m.F, E = m.E, k = m.k, Eg = m.Eg;
  const Device dev = m.dev;
  const bool ep = m.ep;
  check_io(c, dy, "dy", DType::BF16, T, H, dev);
  check_io(c, g.dx, "grads.dx", DType::BF16, T, H, dev);
  check_io(c, g.dw1, "grads.dw1", DType::F32, E * 2 * F, H, dev);
  check_io(c, g.dw2, "grads.dw2", DType::F32, E * H, F, dev);
  check_io(c, g.dgate, "grads.dgate", DType::F32, Eg, H, dev);
  if (g.d_logits.data) check_io(c, g.d_logits, "grads.d_logits", DType::F32, T, Eg, dev);

  const Pool& P = m.pool;
  const Pool& S = s.pool;
  const Recipe r = m.cfg.recipe;
  const std::span<const int64_t> splits(s.m_splits);
  s.casts.backward = 0;
  s.stream = stream;
  count_nonfinite(dev, dy, s.counter(kNfDy), stream);

  const int64_t Ep = ep ? Eg : E;
  PermutationPlan plan;
  plan.tokens_per_expert = S.view(s.tpe, DType::I32, 1, Ep);
  plan.offsets = S.view(s.offsets, DType::I64, 1, Ep + 1);
  plan.dest_row = S.view(s.dest_row, DType::I32, T, k);
  plan.src_slot = S.view(s.src_slot, DType::I32, 1, ep ? s.n_send : M);
  plan.invalid = S.view(s.invalid, DType::I32, 1, 1);
  // EP: dy leaves like x did (no probs); dx rows and dprob come back by combine.
  const DispatchBuffers ep_buf{P.ptr(m.ep_send), m.ep_send.bytes, P.ptr(m.ep_recv),
                               m.ep_recv.bytes};
  const TensorView r2p =
      ep ? S.view(s.r2p, DType::I32, 1, std::max<int64_t>(1, s.layout.recv_total)) : TensorView{};
  auto ep_dispatch = [&](const DispatchRows& in, const DispatchRows& out) {
    ep_dispatch_rows(m, s, in, plan.src_slot, out, ep_buf, stream);
  };
  const TensorView prob = S.view(s.prob, DType::F32, 1, M);
  // FC1 output h as saved: BF16 (Bf16, Fp8Blockwise); the FP8-flow recipes read its E4M3 copy.
  const TensorView h = is_flow(r) ? TensorView{} : S.view(s.h, DType::BF16, M, 2 * F);
  const TensorView da = P.view(m.da, DType::BF16, M, F);
  const TensorView dxp = P.view(m.dxp, DType::BF16, M, H);
  const TensorView dprob = P.view(m.dprob, DType::F32, 1, M);
  const Workspace ws = m.ws_gemm();
  const GroupedGemmOptions go = m.gemm_opt();
  // cfg.overlap_wgrad: the FC1 wgrad (and the column-wise copies only it reads) goes to the side
  // stream `wst`, forked once dh is issued, joined at the end; it overlaps the FC1 dgrad, the
  // combine (EP), unpermute and the router/gate backward. Without it, wst == stream. (The FC2
  // wgrad stays on `stream`: its operands live in phase-1 memory, which phase 2 reuses, and
  // overlapping it with the FC1 dgrad measured no gain: bench/RESULTS.md.)
  const bool ov = m.side.stream != nullptr;
  const Stream wst = ov ? m.side.stream : stream;
  const Workspace wws = ov ? m.ws_gemm_side() : ws;
  const GroupedGemmOptions wgo = ov ? m.gemm_opt_side() : go;
  auto fork = [&] { detail::moe_side_fork(m.side, stream); };
  std::vector<TensorView> dw1_e, dw2_e;
  for (int64_t e = 0; e < E; ++e) {
    dw1_e.push_back(
        TensorView{static_cast<float*>(g.dw1.data) + e * 2 * F * H, DType::F32, 2 * F, H, -1, dev});
    dw2_e.push_back(
        TensorView{static_cast<float*>(g.dw2.data) + e * H * F, DType::F32, H, F, -1, dev});
  }

  int& nc = s.casts.backward;
  switch (r) {
    case Recipe::Bf16: {
      const TensorView dyp = P.view(m.dyp_bf16, DType::BF16, M, H);
      const TensorView dh = P.view(m.dh_bf16, DType::BF16, M, 2 * F);
      const TensorView xp = S.view(s.xp_bf16, DType::BF16, M, H);
      const TensorView a = S.view(s.a_bf16, DType::BF16, M, F);
      if (ep)
        ep_dispatch({dy, {}, {}}, {dyp, {}, {}});
      else
        permute(dy, dyp, plan, {}, stream);
      grouped_gemm_dgrad_bf16(dyp, m.w2_e, da, splits, ws, go, stream);
      grouped_gemm_wgrad_bf16(dyp, a, dw2_e, splits, ws, go, stream);
      swiglu_backward(da, h, prob, dh, dprob, {}, stream);
      fork();
      grouped_gemm_wgrad_bf16(dh, xp, dw1_e, splits, wws, wgo, wst);
      grouped_gemm_dgrad_bf16(dh, m.w1_e, dxp, splits, ws, go, stream);
      break;
    }
    case Recipe::Fp8Blockwise: {
      const ScaledTensor dyq = P.rowwise(m.dyq, T, H);
      const TensorView dyd = P.view(m.dy_deq, DType::BF16, T, H);
      const TensorView dyp = P.view(m.dyp_bf16, DType::BF16, M, H);
      const ScaledTensor dypq = P.rowwise(m.dyp_q, M, H);
      const ScaledTensor dypt = P.colwise(m.dyp_t, H, M, splits);
      const TensorView dh = P.view(m.dh_bf16, DType::BF16, M, 2 * F);
      const ScaledTensor dhq = P.rowwise(m.dh_q, M, 2 * F);
      const ScaledTensor dht = P.colwise(m.dh_t, 2 * F, M, splits);
      const ScaledTensor xpt = S.colwise(s.xp_t, H, M, splits);
      const ScaledTensor at = S.colwise(s.a_t, F, M, splits);
      cast_q(nc, dy, dyq, stream);  // cast 7: before combine-grad dispatch
      if (ep) {
        ep_dispatch({dyq.data, dyq.scale, {}}, {dypq.data, dypq.scale, {}});
        cast_dq(nc, dypq, dyp, stream);  // cast 8: after it (cast 9 overwrites dypq)
      } else {
        cast_dq(nc, dyq, dyd, stream);  // cast 8: after it
        permute(dyd, dyp, plan, {}, stream);
      }
      cast_q(nc, dyp, dypq, stream);   // cast 9: FC2 grad row-wise
      cast_qt(nc, dyp, dypt, stream);  // cast 10: FC2 grad column-wise
      grouped_gemm_dgrad(dypq, m.w2t_e, da, splits, ws, go, stream);
      grouped_gemm_wgrad(dypt, at, dw2_e, splits, ws, go, stream);
      swiglu_backward(da, h, prob, dh, dprob, {}, stream);
      fork();
      cast_qt(nc, dh, dht, wst);  // cast 12: FC1 grad column-wise (read by the wgrad only)
      grouped_gemm_wgrad(dht, xpt, dw1_e, splits, wws, wgo, wst);
      cast_q(nc, dh, dhq, stream);  // cast 11: FC1 grad row-wise
      grouped_gemm_dgrad(dhq, m.w1t_e, dxp, splits, ws, go, stream);
      s.debug.fc1_wgrad_x = xpt;
      s.debug.fc2_wgrad_x = at;
      s.debug.fc2_dgrad_dy = dypq;
      s.debug.fc2_wgrad_dy = dypt;
      s.debug.fc1_dgrad_dy = dhq;
      s.debug.fc1_wgrad_dy = dht;
      break;
    }
    case Recipe::Fp8Flow:
    case Recipe::Fp8FlowMxfp4: {
      const bool mx = r == Recipe::Fp8FlowMxfp4;
      const ScaledTensor dyq = P.rowwise(m.dyq, T, H);
      const ScaledTensor dypq = P.rowwise(m.dyp_q, M, H);
      const ScaledTensor dypt = P.colwise(m.dyp_t, H, M, splits);
      const ScaledTensor dhq = P.rowwise(m.dh_q, M, 2 * F);
      const ScaledTensor dht = P.colwise(m.dh_t, 2 * F, M, splits);
      const ScaledTensor xpt = P.colwise(m.xp_t, H, M, splits);
      const ScaledTensor at = P.colwise(m.a_t, F, M, splits);
      auto ts = [&](const ScaledTensor& in, const ScaledTensor& out, int slot, Stream st) {
        TransposeOptions o;
        if (m.cfg.count_underflow) o.underflow_count = s.counter(kUnderflow0 + slot);
        transpose_scaled(in, out, o, st);
        ++s.casts.conversions;
      };
      // A saved wgrad operand [M][cols] -> its column-wise FP8 copy: directly from MXFP4
      // (fp8-flow-mxfp4) or by the scaling-aware transpose of the saved FP8 (fp8-flow).
      auto saved_to_colwise = [&](const auto& saved_mx, const auto& saved_q, int64_t cols,
                                  const ScaledTensor& out, int slot, Stream st) {
        if (mx) {
          mxfp4_to_fp8_transposed(S.mx(saved_mx, M, cols), out, st);
          ++s.casts.conversions;
        } else {
          ts(S.rowwise(saved_q, M, cols), out, slot, st);
        }
      };
      cast_q(nc, dy, dyq, stream);  // cast 2: the only backward cast
      if (ep)
        ep_dispatch({dyq.data, dyq.scale, {}}, {dypq.data, dypq.scale, {}});
      else
        permute(dyq, dypq, plan, {}, stream);
      grouped_gemm_dgrad(dypq, m.w2t_e, da, splits, ws, go, stream);
      ts(dypq, dypt, 0, stream);
      saved_to_colwise(s.a_mx, s.a_q, F, at, 1, stream);
      grouped_gemm_wgrad(dypt, at, dw2_e, splits, ws, go, stream);
      // Fused SwiGLU-bwd + quantize, on h as saved in E4M3 (the forward used the exact BF16 h).
      swiglu_backward(da, S.rowwise(s.h_q, M, 2 * F), prob, dhq, dprob, {}, stream);
      fork();
      ts(dhq, dht, 2, wst);
      saved_to_colwise(s.xp_mx, s.xp_q, H, xpt, 3, wst);
      grouped_gemm_wgrad(dht, xpt, dw1_e, splits, wws, wgo, wst);
      grouped_gemm_dgrad(dhq, m.w1t_e, dxp, splits, ws, go, stream);
      s.debug.fc1_wgrad_x = xpt;
      s.debug.fc2_wgrad_x = at;
      s.debug.fc2_dgrad_dy = dypq;
      s.debug.fc2_wgrad_dy = dypt;
      s.debug.fc1_dgrad_dy = dhq;
      s.debug.fc1_wgrad_dy = dht;
      break;
    }
  }

  // Combine-grad of the expert path, router and gate.
  const TensorView dx_exp = P.view(m.dx_exp, DType::F32, T, H);
  const TensorView dtw = P.view(m.dtw, DType::F32, T, k);
  if (ep) {
    // dx rows (BF16, as the single-GPU unpermute reads them) and dprob back in send order, then
    // the same unpermute / probs backward over the source plan.
    const TensorView dxr = P.view(m.ep_rows, DType::BF16, s.n_send, H);
    const TensorView dpr = P.view(m.ep_prob, DType::F32, 1, s.n_send);
    combine(*m.comm, s.layout, {dxp, {}, {}}, r2p, dxr, ep_buf, stream);
    combine(*m.comm, s.layout, {{}, {}, dprob}, r2p, dpr,
            {P.ptr(m.ep_psend), m.ep_psend.bytes, nullptr, 0}, stream);
    unpermute(dxr, dx_exp, plan, stream);
    permute_probs_backward(dpr, plan, dtw, stream);
  } else {
    unpermute(dxp, dx_exp, plan, stream);
    permute_probs_backward(dprob, plan, dtw, stream);
  }
  const TensorView logits = S.view(s.logits, DType::F32, T, Eg);
  const TensorView dl = g.d_logits.data ? g.d_logits : P.view(m.dlogits, DType::F32, T, Eg);
  const bool aux = m.cfg.router.aux_enabled();
  const TensorView seq_counts =
      aux ? S.view(s.seq_counts, DType::I32, T / m.cfg.router.seq_len, Eg) : TensorView{};
  const TensorView d_aux = aux ? P.view(m.d_aux, DType::F32, 1, 1) : TensorView{};
  router_backward(logits, S.view(s.topk_idx, DType::I32, T, k), dtw, seq_counts, d_aux, dl,
                  m.cfg.router, stream);
  if (dev == Device::Cpu)
    ref::moe_gate_backward(dl, m.w.gate, s.x, dx_exp, g.dx, g.dgate);
  else
    FP8FLOW_SM90(sm90::moe_gate_backward(dl, m.w.gate, s.x, dx_exp, g.dx, g.dgate, stream));

  detail::moe_side_join(m.side, stream);  // the wgrads (no-op without overlap)
  count_nonfinite(dev, g.dx, s.counter(kNfDx), stream);
  if (opt.count_nonfinite_weight_grads) {  // off by default: moe.h, "Non-finite values"
    count_nonfinite(dev, g.dw1, s.counter(kNfDw1), stream);
    count_nonfinite(dev, g.dw2, s.counter(kNfDw2), stream);
  }
  s.dw_counted = opt.count_nonfinite_weight_grads;
  count_nonfinite(dev, g.dgate, s.counter(kNfDgate), stream);
  s.forward_done = false;
}

}  // namespace fp8flow
