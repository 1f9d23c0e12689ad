// One MoE layer (router + routed experts + combine) on one GPU, composed only of fp8flow's public
// ops, with four precision recipes side by side:
//
//   Bf16          BF16 dataflow and BF16 grouped GEMMs (FP32 accumulation).
//   Fp8Blockwise  the honest naive FP8 baseline ("TE blockwise"): BF16 dataflow, every FP8 GEMM
//                 operand quantized from BF16 right before its GEMM, the column-wise (wgrad) copies
//                 re-quantized from BF16, and Q/DQ around the dispatch point. 12 explicit casts.
//   Fp8Flow       FP8-Flow: 2 explicit casts (x before dispatch, dy before combine-grad); FP8 data
//                 and scales travel through permute, SwiGLU(+bwd) fused with quantization, every
//                 wgrad operand made by the scaling-aware transpose from the row-wise FP8 tensor
//                 that fprop/dgrad consumed, BF16 only at GEMM outputs. The SwiGLU input (FC1
//                 output h) is saved for backward as E4M3 with 1x128 scales, written by the
//                 forward SwiGLU kernel from the same read (DeepSeek-V3 report sec. 3.3, "Low-
//                 Precision Storage"): the forward uses the exact BF16 h, the backward SwiGLU its
//                 E4M3 rounding; the BF16 h is scratch.
//   Fp8FlowMxfp4  as Fp8Flow, but the activations saved for backward (FC1 input, FC2 input) are
//                 stored as MXFP4 and expanded directly (mxfp4_to_fp8_transposed) to the
//                 column-wise FP8 copies the wgrads need.
//
// Notation: T tokens, H hidden, F expert FFN width, E experts, k = router.top_k, M_pad permuted
// rows (each expert's segment padded to `align`).
//
// Dataflow (per recipe, in launch order; "Q" = quantize, "QT" = quantize_transposed, "DQ" =
// dequantize, "TS" = transpose_scaled, "GG" = grouped GEMM; casts counted by MoECastCount marked
// *):
//
//  all       logits = x . W_g^T (FP32, internal gate kernel); router_forward; make_permutation;
//            ONE host sync: the E + 1 padded offsets (and the non-finite count of x) are copied
//            to the host to form m_splits for the grouped GEMMs and the transposes.
//  Bf16      fwd: permute(x bf16) -> GG fprop bf16 -> swiglu(bf16 out) -> GG fprop bf16 ->
//                 unpermute -> y
//            bwd: permute(dy bf16) -> GG dgrad/wgrad bf16 (FC2) -> swiglu_backward(bf16) ->
//                 GG dgrad/wgrad bf16 (FC1) -> unpermute(F32) -> permute_probs_backward ->
//                 router_backward -> gate backward (dx += d_logits . W_g, dW_g)
//  Fp8Blockwise fwd: Q*(x) -> DQ*(x) -> permute(bf16) -> Q*(xp) -> QT*(xp) -> GG fprop ->
//                 swiglu(bf16 out) -> Q*(a) -> QT*(a) -> GG fprop -> unpermute
//            bwd: Q*(dy) -> DQ*(dy) -> permute(bf16) -> Q*(dyp) -> QT*(dyp) -> GG dgrad + wgrad
//                 (FC2) -> swiglu_backward(bf16 out) -> Q*(dh) -> QT*(dh) -> GG dgrad + wgrad (FC1)
//                 -> unpermute(F32) -> router/gate backward as above.          6 + 6 = 12 casts
//  Fp8Flow   fwd: Q*(x) -> permute(FP8 + scales + probs) -> GG fprop -> swiglu(FP8 out, + FP8
//                 copy of h saved) -> GG fprop -> unpermute
//            bwd: Q*(dy) -> permute(FP8) -> GG dgrad (FC2) -> TS(dyp), TS(a) -> GG wgrad (FC2) ->
//                 swiglu_backward(FP8 h in, FP8 out) -> GG dgrad (FC1) -> TS(dh), TS(xp) ->
//                 GG wgrad (FC1) -> unpermute(F32) -> router/gate backward.    1 + 1 = 2 casts
//  Fp8FlowMxfp4 as Fp8Flow, plus fwd: fp8_to_mxfp4(xp), fp8_to_mxfp4(a) (saved forms);
//            bwd: mxfp4_to_fp8_transposed(xp4), mxfp4_to_fp8_transposed(a4) replace TS(xp), TS(a).
//                                                                              1 + 1 = 2 casts
//
// What counts as a cast (MoECastCount::casts): each launch of quantize, quantize_transposed,
// quantize_both, quantize_mxfp4 or dequantize on an activation or a gradient, i.e. a conversion
// between BF16/F32 and a quantized format (recipe.md section 3's table). Not counted there, and
// reported separately: FP8 -> FP8 / FP8 <-> MXFP4 conversions (transpose_scaled, fp8_to_mxfp4,
// mxfp4_to_fp8*) in MoECastCount::conversions, and the weight casts in MoELayer::weight_casts()
// (per refresh_weights: FP8 recipes 2 quantize launches, W1 and W2 as whole tensors; the Bf16
// recipe with F32 masters 2 F32 -> BF16 conversions; else none). Quantization fused
// into another op (swiglu / swiglu_backward FP8 outputs, the FP8 copy of h written by the forward
// swiglu) is not an explicit cast.
//
// Weights (MoEWeights, non-owning views, same device): W_g F32 [E][H] (router gate), optional
// selection bias F32 [1][E]; master weights W1 [E * 2F][H] and W2 [E * H][F], both BF16 or both F32
// (FP8 recipes quantize either directly; the Bf16 recipe keeps BF16 copies of F32 masters in its
// pool, made by refresh_weights), each one contiguous tensor with expert e's rows at
// [e * 2F, (e+1) * 2F) (gate rows first, then up) and [e * H, (e+1) * H).
// One tensor per matrix (not per-expert views) so that the FP8 copies are made by one quantize
// launch each and the gradients land in one contiguous F32 buffer. The FP8 copies (W_e 128x128
// block-scaled and W_e^T via transpose_block_weights) are made by refresh_weights(), once per step
// after the optimizer has updated the masters (the constructor calls it once).
//
// One GPU, no expert parallelism: the "dispatch point" is where the EP all-to-all would sit
// (between the quantization of x and permute; combine-grad likewise for dy). The naive recipe
// still pays its Q/DQ there, so that it stays an honest baseline for the EP case.
//
// Expert parallelism (MoELayer(cfg, w, comm, stream), cfg.ep_size == comm->size() ranks;
// dispatch.h has the mechanics): cfg.experts is the GLOBAL expert count E_g; rank r owns experts
// [r E_l, (r+1) E_l), E_l = E_g / ep_size. Weights: gate (and bias) [E_g] replicated on every
// rank; w1/w2 hold only the local experts ([E_l * 2F][H], [E_l * H][F]). Each rank routes its own
// T tokens over E_g, then the permute at the dispatch point becomes dispatch (pack -> all-to-all
// -> rows land in the permuted + padded layout of the local experts) and the final unpermute
// becomes combine (all-to-all back, then the same slot-ordered FP32 sum on the token's rank).
// Payloads: bf16 BF16 (+ prob); fp8-blockwise and fp8-flow FP8 + 1x128 scales (+ prob): the
// naive recipe quantizes before the all-to-all and dequantizes after it (its casts 1/2 and 7/8),
// fp8-flow consumes the received FP8 directly; fp8-flow-mxfp4 MXFP4 + E8M0 (+ prob): fp8_to_mxfp4
// before, mxfp4_to_fp8 after (2 conversions), and the received MXFP4 rows ARE the saved FC1 input
// (its forward fp8_to_mxfp4(xp) disappears). Backward: dy goes out like x (BF16 for bf16, FP8
// for the others), dx rows come back BF16 with dprob (F32) in a second, small all-to-all.
// Combine stays BF16. Equality: with the global tokens = the ranks' tokens concatenated in rank
// order, y, dx and each rank's dW1/dW2 slice equal the single-GPU layer's bit for bit for bf16,
// fp8-blockwise and fp8-flow (the expert rank's segments are the single-GPU ones); fp8-flow-mxfp4
// equals the 1-rank EP layer bit for bit (its MXFP4 transport changes the FC1 input vs. the
// comm-less layer). grads.dgate (and d_logits' aux part) are this rank's tokens' contribution:
// sum (all-reduce) dgate over the ranks as for any replicated parameter. With the aux loss on,
// each rank's aux loss covers its own sequences. One host sync per forward as before, plus the
// counts all_gather (x's non-finite count travels with the counts, so every rank throws together).
// cfg.ep_max_recv_rows bounds the rows a rank may receive (memory); a forward that would exceed it
// on any rank throws on every rank.
//
// Gradients: of L = sum(y * dy) (+ aux_loss when the router's aux loss is on), with the top-k
// selection held fixed. dx includes the router path (d_logits . W_g); dgate = d_logits^T . x.
// Determinism: same inputs, same bits, step after step (tested on the CPU backend); the gate GEMMs
// and the router are bit-identical between backends, so both pick the same experts.
// Non-finite values: forward counts NaN/Inf in x (and throws, naming x, unless
// MoEForwardOptions::reject_nonfinite_input is false) and y; backward counts dy, dx and dgate, and
// dW1, dW2 only when MoEBackwardOptions::count_nonfinite_weight_grads is on (else
// MoENonFinite::dw1/dw2 read -1, "not counted"); MoEContext::nonfinite() reports them. Why the
// weight gradients are off by default: they are the optimizer's to check (Megatron's found-inf /
// grad-norm pass reads every gradient anyway), and counting them here reads dW1 + dW2 a second
// time (F32 [E*2F][H] + [E*H][F]: 5.6 GB, ~1.9 ms per step at the DeepSeek-V3 shard shape, about
// a tenth of the step). Nothing is lost for the layer's own inputs: a NaN/Inf in x or dy, or one
// made inside the layer, shows in x, y, dy, dx or dgate first (an FP8 code of NaN stays NaN
// through every GEMM and conversion); with finite inputs an F32 dW can only become non-finite by
// overflowing the accumulation (|sum| > 3.4e38).
//
// Memory: the layer owns one scratch pool, the context one saved-state pool, both allocated once
// (at construction) on the weights' device, sized for max_tokens; forward/backward never allocate.
// Temporaries of forward, backward phase 1 (FC2) and phase 2 (FC1 + router) share the scratch
// pool (inside a phase each has its own slot: simple, not minimal). MoELayer::pool_bytes() +
// MoEContext::pool_bytes() per context in flight is the device memory of a step besides the
// caller's tensors and the GEMM library's own (cuBLASLt handles, internal streams).
// Streams: every launch goes to `stream`; the only host sync is forward's copy of the offsets.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "fp8flow/router.h"
#include "fp8flow/types.h"

namespace fp8flow {

enum class Recipe : uint8_t { Bf16, Fp8Blockwise, Fp8Flow, Fp8FlowMxfp4 };
const char* to_string(Recipe);

struct MoEConfig {
  int64_t hidden = 0;   // H, % 128 == 0
  int64_t ffn = 0;      // F, % 128 == 0
  int64_t experts = 0;  // E, 4..256, % 4 == 0 (router limits)
  // top_k = k. Aux loss (aux_alpha != 0): forward computes it (MoEContext::aux_loss()), every
  // T must be a multiple of seq_len, and backward adds its gradient with weight 1 (total loss =
  // task loss + aux_loss) to d_logits, dgate and dx.
  RouterConfig router;
  Recipe recipe = Recipe::Fp8Flow;
  // Expert segment alignment in rows: a power of two in [16, 128], or 0 (the default): 32 for the
  // FP8 recipes, 16 for Bf16 (config() reports the value in use). 16 is the least the GEMMs take;
  // the FP8 recipes' column-wise copies ([cols][M_pad], written by the scaling-aware transposes
  // and mxfp4_to_fp8_transposed, read by the wgrads) start each expert at its row offset, and an
  // offset of 16 mod 32 bytes leaves 32-byte sectors half written by two CTAs: on an H100 the
  // transpose ran 1.46x slower and the dsv3-shard fp8-flow step 2% slower at 16 than at 32, for
  // 0.6% more padded rows (bench/RESULTS.md).
  int align = 0;
  int resolved_align() const { return align != 0 ? align : (recipe == Recipe::Bf16 ? 16 : 32); }
  int64_t max_tokens = 0;  // T of any call <= max_tokens (sizes the pools)
  int gemm_streams = 4;    // GroupedGemmOptions::streams
  // Cuda: backward runs the FC1 weight-gradient GEMM (and the column-wise copies only it reads)
  // on a second stream of the layer, concurrently with the rest of backward (FC1 dgrad, combine
  // with EP, unpermute, router and gate backward), and joins it into the caller's stream before
  // backward returns. Same kernels on the same inputs: results are bit-identical to false. Costs
  // one more GEMM workspace (8 MiB per internal stream). That wgrad uses internal GEMM streams
  // [gemm_streams, gemm_streams + n), n = min(gemm_streams, 8 - gemm_streams); with
  // gemm_streams == 8 there is no room and backward runs on one stream. Ignored on the Cpu.
  bool overlap_wgrad = true;
  // Fp8Flow: the four scaling-aware transposes of backward also count the elements they round
  // (underflow to subnormal or zero), read by MoEContext::transpose_underflow(). A diagnostic:
  // it costs about 16% of the transposes' time on an H100 (bench/RESULTS.md), so it is off
  // unless asked for (transpose_underflow() then reports zeros).
  bool count_underflow = false;
  // Fp8FlowMxfp4: the saved activations that only the weight gradients read (the FC2 input a, and
  // the FC1 input without EP; with EP the saved FC1 input is the dispatched MXFP4 payload, which
  // the forward also uses, and stays RNE) are rounded to E2M1 stochastically (Mxfp4Rounding)
  // instead of RNE: unbiased weight gradients from the 4-bit copies. Forward number n (counted per
  // layer from 0) rounds tensor j (0: FC1 input, 1: FC2 input) with a seed derived from
  // (mxfp4_seed, 2 n + j): reproducible run to run; give every layer its own mxfp4_seed. Forward
  // outputs and dx are unchanged by this option (bit for bit); only dW1 and dW2 differ. Ignored
  // by the other recipes.
  bool mxfp4_stochastic = false;
  uint64_t mxfp4_seed = 0;
  // Expert parallelism: ranks of the communicator given to the constructor (1: no EP), and the
  // most rows one rank may receive in a forward (0: the worst case, ep_size * max_tokens *
  // min(top_k, experts / ep_size); pools scale with it).
  int ep_size = 1;
  int64_t ep_max_recv_rows = 0;
  // EP dispatches (x forward, dy backward) send one record per (token, destination rank) and
  // expand it there (dispatch_dedup) instead of one per routed pair; results are bit-identical.
  // Costs per forward: a device-to-host copy of topk_idx before the step's one host sync, N more
  // values in the counts all_gather, the plan's sizes on the host (make_dedup_plan_sizes) and its
  // words on the device (build_dedup_plan; the host make_dedup_plan above kDedupBuildMaxRanks
  // ranks); the backward reuses the plan. On by default (measured: at EP2 every recipe's step
  // 0.3-6% faster, at EP4 even with the host-built plan; bench/RESULTS.md); false: one record per
  // routed pair. Ignored without a communicator.
  bool ep_dedup = true;
  // Debug: no reuse of scratch memory between forward, backward phase 1 (FC2) and phase 2 (FC1),
  // so that every MoEDebugViews view held in scratch stays valid until the layer's next call.
  bool debug_no_scratch_reuse = false;
};

struct MoEWeights {
  TensorView gate;       // F32 [E][H]
  TensorView gate_bias;  // optional F32 [1][E] (selection bias, not differentiated); empty: none
  TensorView w1;         // BF16 or F32 [E * 2F][H]
  TensorView w2;         // BF16 or F32 [E * H][F] (same dtype as w1)
};

// Backward outputs (caller-owned, same device as the weights, contiguous, overwritten).
struct MoEGrads {
  TensorView dx;        // BF16 [T][H]: expert path + router path (d_logits . W_g)
  TensorView dw1;       // F32 [E * 2F][H]
  TensorView dw2;       // F32 [E * H][F]
  TensorView dgate;     // F32 [E][H]
  TensorView d_logits;  // optional F32 [T][E] (empty: kept internal)
};

struct MoECastCount {
  int forward = 0;      // explicit quantize/dequantize launches in the last forward
  int backward = 0;     // ... in the last backward
  int conversions = 0;  // FP8->FP8 and FP8<->MXFP4 launches (transpose_scaled, mxfp4 ones), fwd+bwd
  int total() const { return forward + backward; }
};

// Non-finite element counts (NaN or +-Inf) seen at the layer's boundaries in the last step.
// dw1 and dw2 are kNotCounted (-1) when the last backward ran without
// MoEBackwardOptions::count_nonfinite_weight_grads (0 after a forward with no backward yet).
struct MoENonFinite {
  static constexpr int64_t kNotCounted = -1;
  int64_t x = 0, y = 0, dy = 0, dx = 0, dw1 = 0, dw2 = 0, dgate = 0;
  bool weight_grads_counted() const { return dw1 != kNotCounted && dw2 != kNotCounted; }
  bool any() const { return x > 0 || y > 0 || dy > 0 || dx > 0 || dw1 > 0 || dw2 > 0 || dgate > 0; }
};

struct MoETransposeUnderflow {
  int64_t fc2_grad = 0, fc2_x = 0, fc1_grad = 0, fc1_x = 0;
  int64_t total() const { return fc2_grad + fc2_x + fc1_grad + fc1_x; }
};

// Views of the FP8 operands the GEMMs consumed in the last forward/backward (debug/test hook).
// Empty for recipes without them (Bf16). Device: the layer's. Validity: Fp8Flow's fprop operands
// are the saved tensors (valid until the context's next forward); the others live in the layer's
// scratch, which later phases reuse: set MoEConfig::debug_no_scratch_reuse to read them all after
// backward (then valid until the layer's next call).
struct MoEDebugViews {
  ScaledTensor fc1_fprop_x;   // row-wise FP8 FC1 input [M_pad][H] (Fp8Blockwise/Fp8Flow/Mxfp4)
  ScaledTensor fc2_fprop_x;   // row-wise FP8 FC2 input [M_pad][F]
  ScaledTensor fc1_wgrad_x;   // column-wise copy [H][M_pad] the FC1 wgrad consumed
  ScaledTensor fc2_wgrad_x;   // column-wise copy [F][M_pad] the FC2 wgrad consumed
  ScaledTensor fc2_dgrad_dy;  // row-wise FC2 output grad [M_pad][H] the FC2 dgrad consumed
  ScaledTensor fc2_wgrad_dy;  // its column-wise copy [H][M_pad] the FC2 wgrad consumed
  ScaledTensor fc1_dgrad_dy;  // row-wise FC1 output grad [M_pad][2F] the FC1 dgrad consumed
  ScaledTensor fc1_wgrad_dy;  // its column-wise copy [2F][M_pad] the FC1 wgrad consumed
  TensorView topk_idx;        // I32 [T][k]
  TensorView topk_weight;     // F32 [T][k]
  // FC1 output h BF16 [M_pad][2F] of the last forward (all recipes; Fp8Flow/Mxfp4: in scratch),
  // and its E4M3 1x128 copy saved for the backward SwiGLU (Fp8Flow/Mxfp4; a context tensor).
  TensorView fc1_out;
  ScaledTensor swiglu_saved_in;
};

class MoELayer;
class Communicator;

// The state saved between forward and backward of one micro-batch. Owns its memory (allocated once
// when made by MoELayer::make_context); reusable step after step.
class MoEContext {
 public:
  MoEContext(MoEContext&&) noexcept;
  MoEContext& operator=(MoEContext&&) noexcept;
  ~MoEContext();

  int64_t tokens() const;                        // T of the last forward
  int64_t padded_rows() const;                   // M_pad of the last forward
  const std::vector<int64_t>& m_splits() const;  // padded rows per expert (host)
  // Bytes of the activations saved for backward by the last forward (recipe-dependent tensors:
  // the FC1 input, FC1 output and FC2 input in their saved formats, with scales: Bf16 all BF16;
  // Fp8Blockwise column-wise E4M3 copies of the FC1/FC2 inputs + BF16 FC1 output; Fp8Flow
  // row-wise E4M3 for all three; Fp8FlowMxfp4 MXFP4 FC1/FC2 inputs + E4M3 FC1 output), and of the
  // routing state (logits, top-k, plan, probabilities), which every recipe keeps.
  size_t saved_activation_bytes() const;
  size_t saved_routing_bytes() const;
  size_t pool_bytes() const;
  MoECastCount casts() const;
  // Elements changed by the scaling-aware transposes of the last backward (underflow to
  // subnormal/zero, see transpose.h), per transposed operand; Fp8Flow with
  // MoEConfig::count_underflow only (0 otherwise; the MXFP4 expansions are not counted).
  // Synchronizes the host.
  MoETransposeUnderflow transpose_underflow() const;
  // The accessors that synchronize read on the stream of the context's last forward/backward.
  // The router's auxiliary load-balancing loss of the last forward (0 when off). Synchronizes.
  float aux_loss() const;
  // Non-finite counts of the last forward and backward. Synchronizes the host.
  MoENonFinite nonfinite() const;
  MoEDebugViews debug_views() const;

  struct State;

 private:
  friend class MoELayer;
  explicit MoEContext(std::unique_ptr<State> s);
  std::unique_ptr<State> s_;
};

struct MoEForwardOptions {
  // forward throws fp8flow::Error naming x when x holds NaN/Inf (checked at the one host sync).
  bool reject_nonfinite_input = true;
};

struct MoEBackwardOptions {
  // Count NaN/Inf in grads.dw1 and grads.dw2 (MoENonFinite::dw1, dw2): one extra read of both
  // (see "Non-finite values" above for why this is off by default). dy, dx and dgate are always
  // counted.
  bool count_nonfinite_weight_grads = false;
};

// Memory of a layer for a config, computed without allocating (MoELayer::memory_plan).
struct MoEMemoryPlan {
  size_t layer_pool_bytes = 0;            // scratch + weight copies (MoELayer::pool_bytes())
  size_t weight_copy_bytes = 0;           // of which FP8 W, W^T (and BF16 copies of F32 masters)
  size_t context_pool_bytes = 0;          // per context in flight (MoEContext::pool_bytes())
  int64_t max_padded_rows = 0;            // M_pad bound: T k + E (align - 1)
  size_t saved_activation_bytes_max = 0;  // saved activations at max_tokens and that M_pad bound
  size_t step_bytes(int contexts = 1) const {
    return layer_pool_bytes + contexts * context_pool_bytes;
  }
};

class MoELayer {
 public:
  // Pool sizes the constructor would allocate for cfg, masters of dtype `master` (BF16 or F32) on
  // `dev` (GEMM workspaces are sized only for Cuda). Pure host function.
  static MoEMemoryPlan memory_plan(const MoEConfig& cfg, DType master, Device dev);

  // Validates cfg and weights (fp8flow::Error naming the field), allocates the scratch pool on the
  // weights' device and makes the FP8 weight copies.
  MoELayer(const MoEConfig& cfg, const MoEWeights& w, Stream stream = nullptr);
  // Expert-parallel layer over comm (comm->size() == cfg.ep_size; device == the weights'; the
  // layer keeps the pointer). Collective: checks that every rank passes the same config (and
  // weight dtype), throwing ErrorKind::Comm on every rank otherwise. comm == nullptr: as above.
  MoELayer(const MoEConfig& cfg, const MoEWeights& w, Communicator* comm, Stream stream = nullptr);
  MoELayer(MoELayer&&) noexcept;
  MoELayer& operator=(MoELayer&&) noexcept;
  ~MoELayer();

  // Re-make the FP8 weight copies (once per step, after the optimizer step). Optionally new views
  // (same shapes and device).
  void refresh_weights(Stream stream = nullptr);
  void refresh_weights(const MoEWeights& w, Stream stream = nullptr);

  MoEContext make_context() const;

  // x BF16 [T][H] (1 <= T <= max_tokens), y BF16 [T][H]; contiguous, on the layer's device. x must
  // stay unchanged until backward (the gate's weight gradient reads it).
  void forward(const TensorView& x, const TensorView& y, MoEContext& ctx,
               const MoEForwardOptions& opt = {}, Stream stream = nullptr);
  // dy BF16 [T][H] (T of the context's forward). Once per forward.
  void backward(const TensorView& dy, const MoEGrads& grads, MoEContext& ctx,
                const MoEBackwardOptions& opt, Stream stream = nullptr);
  // Same with default options (weight gradients not checked for NaN/Inf).
  void backward(const TensorView& dy, const MoEGrads& grads, MoEContext& ctx,
                Stream stream = nullptr);

  const MoEConfig& config() const;
  Device device() const;
  size_t pool_bytes() const;
  int weight_casts() const;  // weight cast launches by refresh_weights so far (see above)

  struct Impl;

 private:
  std::unique_ptr<Impl> p_;
};

}  // namespace fp8flow
