// Expert-parallel dispatch and combine: routed rows travel from the rank that owns the token to the
// rank that owns the expert (dispatch) and back (combine), landing directly in the permuted +
// padded expert-major layout that the grouped GEMMs consume (permute.h), so the expert side needs
// no separate permute pass.
//
// Model. N ranks (Communicator::size()), E_g global experts split contiguously: rank r owns
// experts [r * E_l, (r + 1) * E_l), E_l = E_g / N. One routed row per (token, slot) pair (the
// dedup variant at the end of this header sends one per (token, rank)). Each rank routes its own
// T tokens over all E_g experts.
//
// Source side ("send order"). The pairs of a rank sorted by global expert, flat index t * k + j
// ascending within an expert: exactly the plan make_permutation(topk_idx, E_g, align = 1) makes
// (its src_slot[0, n) lists the pairs, its dest_row gives each pair's send row). Rows to rank j
// are then contiguous: [send_offsets[j], send_offsets[j] + send_rows[j]).
//
// Expert side ("receive order" -> "permuted order"). Rank r receives, from each source s in rank
// order, the rows s routed to r's experts, grouped by local expert, in s's order. The permuted
// layout it writes has segments per local expert e (padded to `align`, zero pad rows, FP8 pad
// scale 2^-127, MX pad scale byte 0, prob 0, as permute writes them); inside a segment the rows
// come source-rank ascending, then in the source's order. If the global token order is the
// concatenation of the ranks' tokens, that is exactly the single-GPU permuted layout of the same
// global routing restricted to r's experts: the reason an EP run can equal a single-GPU run bit
// for bit.
//
// Counts exchange: every rank all_gathers its per-expert pair counts [E_g] (one host
// synchronization); make_dispatch_layout turns the [N][E_g] matrix into the all-to-all sizes, the
// local experts' padded segments (m_splits) and a small table from which the row maps
// (permuted row <-> received row) are computed on the device (make_dispatch_maps).
//
// Wire format (DispatchWire): every routed row travels as one fixed-size record:
//   [data: D bytes][scales: S bytes][prob: 4 bytes, optional][zero pad to a multiple of 16]
//   BF16  D = 2H, S = 0                       F32   D = 4H, S = 0
//   FP8   D = H (E4M3), S = ceil(H/128) rounded up to 4 (the row's 1x128 scales, one E8M0 code
//         per tile: the F32 scales are powers of two, which E8M0 holds exactly; see below)
//   MXFP4 D = H/2 (E2M1x2), S = H/32 (E8M0)
// A record without scales or prob is the plain row (so a received BF16 buffer IS a [rows][H]
// tensor), and a prob-only record (no data) is 4 bytes (a received buffer IS an F32 [rows] vector).
// At H = 7168: BF16 + prob 14352 B, FP8 + prob 7232 B (1.98x fewer), MXFP4 + prob 3824 B (3.75x).
// FP8 scales on the wire: the F32 scales of DispatchRows (F32 [tiles][rows]) must be powers of two
// in [2^-127, 2^127], what every fp8flow quantizer writes; each arrives with its exact F32 bits
// (2^-127 as the F32 subnormal). Any other value (not a power of two, zero, negative, Inf, NaN)
// arrives as NaN, never as a different finite scale. An F32 scale on the wire would make the FP8
// record 2.4% larger (7408 B) for no information.
//
// Determinism: every output is a pure function of the inputs; bytes move unchanged (NaN payloads
// included); the CUDA backend matches the CPU reference bit for bit. No host synchronization
// except inside exchange_dispatch_counts (the counts all_gather) and whatever the communicator's
// all_to_all_v does.
//
// Devices: Cpu tensors -> reference backend; Cuda tensors -> sm_90a kernels. The collectives run
// on the communicator's device (InProcess: Cpu; NCCL: Cuda); tensors must be on that device.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "fp8flow/comm.h"
#include "fp8flow/types.h"

namespace fp8flow {

// ---- Host-side layout ---------------------------------------------------------------------------

// Everything the host knows after the counts exchange. Row counts, not bytes.
struct DispatchLayout {
  int ranks = 1, rank = 0;
  int64_t experts = 0;          // E_g
  int64_t local_experts = 0;    // E_l = E_g / ranks; this rank owns [rank * E_l, (rank + 1) * E_l)
  int align = 1;                // expert segment alignment of the permuted layout
  std::vector<int64_t> counts;  // [ranks][E_g]: pairs rank s routes to global expert e (row-major)
  std::vector<int64_t> send_rows, send_offsets;  // [ranks]: to rank j (offsets = prefix sums)
  std::vector<int64_t> recv_rows, recv_offsets;  // [ranks]: from rank s
  int64_t send_total = 0;                        // rows this rank sends (= its valid pairs)
  int64_t recv_total = 0;                        // rows this rank receives
  std::vector<int64_t> tokens_per_expert;        // [E_l]: rows received per local expert
  std::vector<int64_t> m_splits;                 // [E_l]: padded segment sizes
  std::vector<int64_t> offsets;                  // [E_l + 1]: padded segment starts
  int64_t padded_rows = 0;                       // M_pad = offsets[E_l]
  int64_t max_recv_total = 0;                    // largest recv_total over all ranks
  int64_t max_padded_rows = 0;                   // largest padded_rows over all ranks
  // The row-map table make_dispatch_maps uploads (layout: see src/ops/dispatch/dispatch_map.h):
  // offsets [E_l + 1], per-(expert, source) prefix [E_l][ranks + 1], chunk starts [E_l][ranks].
  std::vector<int64_t> table;
};

// Builds the layout of rank `rank` from all ranks' per-expert counts (all_counts [ranks][experts],
// rank-major, what all_gather returns). experts % ranks == 0, counts >= 0, align a power of two in
// [1, 128]. Pure host function (what the CPU tests exercise).
DispatchLayout make_dispatch_layout(std::span<const int64_t> all_counts, int ranks, int rank,
                                    int64_t experts, int align);

// The counts exchange: all_gather of `my_counts` ([experts] pairs per global expert, host) over
// comm, then make_dispatch_layout for comm.rank(). Collective; synchronizes the host.
DispatchLayout exchange_dispatch_counts(Communicator& comm, std::span<const int64_t> my_counts,
                                        int64_t experts, int align, Stream stream = nullptr);

// Host reference of the row map: the received row that lands in permuted row r, or -1 for a pad
// row (r in [0, padded_rows)). The device maps are computed by the same function.
int64_t dispatch_recv_row(const DispatchLayout& layout, int64_t r);

// Upper bound on rows received by one rank for any routing: ranks * T_max * min(k, E_l) (top-k
// picks distinct experts, so a token sends at most min(k, E_l) rows to one rank).
int64_t dispatch_max_recv_rows(int ranks, int64_t max_tokens, int64_t topk, int64_t local_experts);

// ---- Wire format --------------------------------------------------------------------------------

struct DispatchWire {
  DType dtype = DType::BF16;  // data dtype: BF16, F32, E4M3, E2M1x2 (none: prob-only, see below)
  int64_t hidden = 0;         // H (0 with no data: a prob-only record)
  int64_t data_bytes = 0;     // D
  int64_t scale_bytes = 0;    // S
  int64_t prob_offset = -1;   // byte offset of the prob in the record; -1: no prob
  int64_t row_bytes = 0;      // record size (multiple of 16 when there is data; 4 for prob-only)
};

// The record of a payload: data dtype BF16 / F32 (no scales), E4M3 (1x128 F32 scales) or E2M1x2
// (E8M0 scales), hidden H (BF16 H % 8, F32 H % 4, E4M3 H % 16, E2M1x2 H % 128), with or without
// the prob. hidden == 0: prob-only record (with_prob must be true). Pure host function.
DispatchWire dispatch_wire(DType data_dtype, int64_t hidden, bool with_prob);

// ---- Device row maps ----------------------------------------------------------------------------

// perm_to_recv I32 [>= padded_rows]: received row landing in permuted row r (-1 on pad rows;
//   entries past padded_rows are set to -1 too);
// recv_to_perm I32 [>= recv_total]: permuted row of received row q.
// table: I64 [>= layout.table.size()] device scratch for the uploaded table (Cuda; ignored on Cpu).
// CUDA: one async host-to-device copy of the table (from pageable memory) and one kernel.
void make_dispatch_maps(const DispatchLayout& layout, const TensorView& table,
                        const TensorView& perm_to_recv, const TensorView& recv_to_perm,
                        Stream stream = nullptr);

// ---- Pack / unpack (local, no communication) ---------------------------------------------------

// Rows in one payload, and their probabilities.
//   data   BF16 / F32 [R][H] (no scale) | E4M3 [R][H] with scale F32 [ceil(H/128)][R] (R
//          contiguous, the Rowwise1x128 layout) | E2M1x2 [R][H] with scale E8M0 [R][H/32].
//          Empty (data == nullptr): no rows, prob only.
//   prob   optional F32 (see each op for its indexing).
struct DispatchRows {
  TensorView data;
  TensorView scale;
  TensorView prob;
};

// Gathers records: record i (i in [0, n), n = wire.rows) is in row map[i] / k and, when the wire
// has a prob, in.prob[map[i]] (in.prob flat, indexed by the map entry: topk_weight [T][k] with the
// source plan's src_slot and k; a per-row [R] vector with k = 1). map I32 [>= n], entries in
// [0, in rows * k) (a negative entry writes a zero record). wire: a byte tensor [n][row_bytes]
// (any 8-bit dtype, e.g. E4M3, used as bytes), 16-byte aligned on Cuda.
// CUDA: one CTA per 32 records, 16-byte loads/stores, scales through shared memory-free 4-byte
// gathers; memory bound.
void dispatch_pack(const DispatchRows& in, const TensorView& map, int k, const TensorView& wire,
                   Stream stream = nullptr);

// Scatters records into rows: out row r (r in [0, R), R = out rows or prob numel) is record
// map[r], or a pad row where map[r] < 0 (zero data, FP8 scale 2^-127, MX scale byte 0, prob 0).
// map empty (data == nullptr): the identity (R <= wire rows). out.prob F32 [R] when the wire has
// a prob (required then), absent otherwise.
void dispatch_unpack(const TensorView& wire, const TensorView& map, const DispatchRows& out,
                     Stream stream = nullptr);

// ---- Dispatch / combine (collective)
// -------------------------------------------------------------

// Wire buffers on the communicator's device: send >= send_total records, recv >= recv_total
// records (dispatch; the other way round for combine), 16-byte aligned.
struct DispatchBuffers {
  void* send = nullptr;
  size_t send_bytes = 0;
  void* recv = nullptr;
  size_t recv_bytes = 0;
};

// Pipelining (DispatchOptions::chunks = C > 1): the rows of every (source, destination) pair are
// split into C runs (pair of n rows: run c = its rows [n c / C, n (c + 1) / C), floor), and each
// run goes pack -> all_to_all_v -> unpack on its own; on Cuda the all_to_all_v of run c runs on
// the communicator's side stream (high priority, created once per communicator) while `stream`
// packs run c + 1 and unpacks run c - 1 (events between them), so pack and unpack hide behind the
// transfer and every link stays busy in every run. Results are bit-identical for every C (a row's
// record and its permuted row do not depend on the chunking); pad rows are written with run 0.
// The stream semantics are unchanged: all work is ordered after prior work on `stream`, and later
// work on `stream` sees the results. On Cpu (InProcess) the runs execute one after another.
// C = 1: one pack, one all_to_all_v, one unpack, all on `stream`. C = 0: automatic (kAutoChunks
// on a Cuda communicator when the mean records per rank are at least kAutoChunkMinBytes, else 1;
// computed from the layout's global counts, so equal on every rank). Every rank must use the same
// C (it sets the all_to_all_v sizes; a mismatch is an InProcess Comm error, an NCCL timeout).
// More than 256 ranks: no chunking.
//
// In place (DispatchOptions::in_place): the data part of the rows skips the records. Dispatch:
// the pack kernel writes the data rows (send order) to the front of buffers.send and only the
// small [scales][prob] records (S + 4 bytes: FP8 4 ceil(H/128), MXFP4 H/32; nothing for BF16 /
// F32 without prob) behind them; one all_to_all_segments moves every (peer, local expert) block
// of data rows straight into its rows of out.data (the permuted layout is expert-major, then
// source-rank-major, so the rows rank p sends for local expert e are one contiguous block of
// both the sender's send order and the receiver's out.data) plus one record message per peer;
// the unpack then writes only the scales, probs and the pad rows (zero data). Unpack's data copy
// is gone. Combine: no pack at all; each (source, expert) block of in.data (or in.prob) goes
// straight from the permuted rows to its send-order rows of out. Results are bit-identical to the
// record path for every payload and chunk count (chunks split the per-peer rows as above, and a
// run's blocks are their intersections with the (peer, expert) blocks). Buffers: dispatch needs
// buffers.send >= send_total (D + S + 4) and buffers.recv >= recv_total (S + 4) bytes (never more
// than the record path), combine none. Prob-only dispatch (no data) always uses the record path.
// Every rank must use the same setting (a mismatch is an InProcess Comm error, an NCCL error or
// timeout). Auto = kAutoInPlace: off. Measured on 4 H100s (bench/RESULTS.md) in place is 2-4x
// slower than the record path: one NCCL message per (peer, local expert) block (4 x 64 per rank at
// 256 experts) costs more than the unpack it saves.
enum class InPlace : int { Auto = 0, On = 1, Off = 2 };

struct DispatchOptions {
  int chunks = 0;  // 0: automatic; >= 1: that many runs
  InPlace in_place = InPlace::Auto;
  static constexpr bool kAutoInPlace = false;
  // Measured on 4 H100s (NVSwitch, 32768 routed rows x H 7168 per rank, bench/RESULTS.md): 4 runs
  // gained nothing over 1 (BF16 1.94 vs 1.90 ms, MXFP4 0.63 vs 0.56 ms): NCCL's all-to-all already
  // saturates the copy engines/SMs it shares with pack and unpack. Re-measured on 4 H200s with
  // batched timing (session 10): 2 / 4 runs 6-10% SLOWER than 1 (BF16 1.78 / 1.77 vs 1.67 ms, FP8
  // 0.94 / 0.95 vs 0.86 ms). So automatic = 1.
  static constexpr int kAutoChunks = 1;
  static constexpr int64_t kAutoChunkMinBytes = int64_t{8} << 20;
};

// Whether dispatch / combine move the data in place under `opts` (see above; prob-only dispatch
// never does).
bool dispatch_in_place(const DispatchOptions& opts = {});

// The run count dispatch / combine use for records of `row_bytes` under `opts` (see above).
int dispatch_chunks(const DispatchLayout& layout, int64_t row_bytes, Device device,
                    const DispatchOptions& opts = {});

// Dispatch: pack this rank's rows in send order (map = the source plan's src_slot, k its top-k,
// in.prob = topk_weight [T][k] or empty), one all_to_all_v, unpack into the permuted layout of
// this rank's experts (perm_to_recv from make_dispatch_maps): out data [M][H] (M >= padded_rows;
// rows past padded_rows are written as pad rows), out.scale as in DispatchRows, out.prob [M] F32
// when in.prob is given.
void dispatch(Communicator& comm, const DispatchLayout& layout, const DispatchRows& in,
              const TensorView& send_map, int k, const TensorView& perm_to_recv,
              const DispatchRows& out, const DispatchBuffers& buffers, Stream stream = nullptr,
              const DispatchOptions& opts = {});

// Combine: the way back. Pack rows of the permuted layout in receive order (recv_to_perm), one
// all_to_all_v with the dispatch sizes reversed, landing in send order on the source rank:
// out [send_total][H] BF16/F32 rows (or an F32 [send_total] vector for a prob-only combine of
// in.prob [M]). The received buffer is the output itself (plain records), so buffers.recv is
// unused; buffers.send holds recv_total records. The source rank then sums a token's k rows with
// unpermute(out, y, source_plan) (slot order, FP32), which is the single-GPU combine.
void combine(Communicator& comm, const DispatchLayout& layout, const DispatchRows& in,
             const TensorView& recv_to_perm, const TensorView& out, const DispatchBuffers& buffers,
             Stream stream = nullptr, const DispatchOptions& opts = {});

// ---- Token dedup: one record per (token, destination rank) --------------------------------------
//
// The record path above sends a token's row once per routed pair: with top-k over E_g experts on N
// ranks, a token whose k experts sit on n_t distinct ranks travels k times although n_t copies
// would do (uniform routing: n_t = N (1 - (1 - 1/N)^k) on average, 3.6 instead of 8 at N 4, k 8;
// 5.3 at N 8). Dedup dispatch (DeepEP's per-rank dedup) sends one record per (token, destination
// rank) and expands it on the destination into every permuted row of that token's pairs there.
// Outputs are bit-identical to dispatch() (same permuted layout, pad rows, probs); combine is
// unchanged (it returns one row per pair; summing on the expert side would change the FP32
// summation order of the single-GPU combine).
//
// The dedup record: [data D][scales S][k slots of (I32 destination permuted row or -1, F32 prob)]
// zero-padded to a multiple of 16: at H 7168, k 8: BF16 14400 B, FP8 7296 B, MXFP4 3872 B per
// record (the record path's per-pair record with prob + 48-64 B), sent n_t instead of k times per
// token.
// Slot j of a token's record to rank r describes its pair j when expert topk_idx[t][j] is on r.

// The host plan of one rank: which tokens go to which rank, and where each pair lands there.
// Every destination row is computable at the source because the layout's all-gathered counts
// give every rank's segments.
struct DedupPlan {
  int ranks = 1, rank = 0, k = 1;
  int64_t tokens = 0;                            // T of this rank
  std::vector<int64_t> send_rows, send_offsets;  // [ranks]: records to rank j
  std::vector<int64_t> recv_rows, recv_offsets;  // [ranks]: records from rank s
  int64_t send_total = 0, recv_total = 0;
  std::vector<int32_t> token;  // [send_total]: source token of each record, send order (rank
                               // major, tokens ascending within a rank)
  std::vector<int32_t> slots;  // [send_total][k]: destination permuted row of the record's pair
                               // j (token t: pair t k + j), or -1 when that pair goes elsewhere
  // I32 words of the device copy (upload_dedup_plan): tokens, then slots.
  int64_t device_words() const { return send_total * (1 + int64_t{k}); }
};

// Upper bound on DedupPlan::device_words() for T tokens, top-k, N ranks: T min(k, N) records.
int64_t dedup_plan_max_words(int64_t tokens, int k, int ranks);

// Tokens of this rank with at least one pair on each rank: [ranks]. topk_idx [T][k] host, every
// entry in [0, experts); experts % ranks == 0. (The second form needs no layout: a caller can
// all_gather these counts together with the per-expert ones, as MoELayer does.)
std::vector<int64_t> dedup_token_counts(const DispatchLayout& layout,
                                        std::span<const int32_t> topk_idx, int k);
std::vector<int64_t> dedup_token_counts(std::span<const int32_t> topk_idx, int k, int ranks,
                                        int64_t experts);

// The plan of layout.rank from its routing topk_idx [T][k] (host; the routing whose per-expert
// counts are layout.counts[rank]) and every rank's dedup_token_counts (all_tokens [ranks][ranks],
// rank-major). Pure host function.
DedupPlan make_dedup_plan(const DispatchLayout& layout, std::span<const int32_t> topk_idx, int k,
                          std::span<const int64_t> all_tokens);
// The same into `plan`, reusing its vectors' storage (a caller that makes one plan per step, as
// MoELayer does, then skips their allocation and zero fill). `plan` is overwritten; on an error it
// is left in an unspecified state.
void make_dedup_plan(const DispatchLayout& layout, std::span<const int32_t> topk_idx, int k,
                     std::span<const int64_t> all_tokens, DedupPlan& plan);

// The plan of make_dedup_plan without its token and slot arrays: sizes and offsets from
// all_tokens alone (no pass over the routing), for build_dedup_plan. tokens: T of this rank.
DedupPlan make_dedup_plan_sizes(const DispatchLayout& layout, int64_t tokens, int k,
                                std::span<const int64_t> all_tokens);

// The device words of a plan (upload_dedup_plan's layout, plan.device_words() I32 in plan_dev)
// built on the device from the device routing, the same words upload_dedup_plan(make_dedup_plan
// (...)) writes: topk_idx [T][k] I32 and the source plan of make_permutation(topk_idx, E_g,
// align 1) (its dest_row [T][k] on the device, and its offsets [E_g + 1] on the host, which a
// caller has after the counts exchange). plan: make_dedup_plan_sizes' (or make_dedup_plan's).
// work: I32, at least dedup_build_work_words(E_g, ranks). CPU tensors: the reference backend.
// At most kDedupBuildMaxRanks ranks. No host synchronization (one small copy and one single-CTA
// kernel on CUDA).
constexpr int kDedupBuildMaxRanks = 32;
void build_dedup_plan(const DedupPlan& plan, const DispatchLayout& layout,
                      const TensorView& topk_idx, const TensorView& dest_row,
                      std::span<const int64_t> src_offsets, const TensorView& work,
                      const TensorView& plan_dev, Stream stream = nullptr);
int64_t dedup_build_work_words(int64_t experts, int ranks);

// Collective: dedup_token_counts, their all_gather (one small collective, a host
// synchronization), make_dedup_plan.
DedupPlan exchange_dedup_plan(Communicator& comm, const DispatchLayout& layout,
                              std::span<const int32_t> topk_idx, int k, Stream stream = nullptr);

// The dedup record of a payload (BF16, F32, E4M3, E2M1x2 data, hidden H, top-k k): prob_offset is
// -1 (the probs travel in the slots).
DispatchWire dispatch_dedup_wire(DType data_dtype, int64_t hidden, int k);

// The plan's arrays on the device: plan_dev I32 [>= plan.device_words()] on the communicator's
// device (Cpu: a copy; Cuda: async host-to-device copies from the plan's vectors, staged before
// the call returns, so the plan may be destroyed after it). Once per plan: every dispatch_dedup
// with the same plan (a layer's x forward and dy backward) reads the same upload.
void upload_dedup_plan(const DedupPlan& plan, const TensorView& plan_dev, Stream stream = nullptr);

// Dedup dispatch: in.data [T][H] (+ in.scale as in DispatchRows; in.prob = topk_weight [T][k] or
// empty) -> out: exactly what dispatch() writes (out rows M >= padded_rows, rows past padded_rows
// as pad rows; out.prob [M] when in.prob is given). plan_dev: this plan's upload_dedup_plan (the
// caller keeps them together; a stale upload routes rows wrongly); map: I32 [>= M] scratch
// (received record of each permuted row). buffers: send >= send_total records, recv >=
// recv_total records of dispatch_dedup_wire's size, 16-byte aligned. Steps: pack (records), one
// all_to_all_v, an expansion (each received record read once and written to every row it fills,
// with the map and probs of those rows), unpack (scales by the map; pad rows).
void dispatch_dedup(Communicator& comm, const DispatchLayout& layout, const DedupPlan& plan,
                    const DispatchRows& in, const TensorView& plan_dev, const TensorView& map,
                    const DispatchRows& out, const DispatchBuffers& buffers,
                    Stream stream = nullptr);

}  // namespace fp8flow
