// Dispatch / combine: host-side layout (counts -> sizes, segments, map table), wire format,
// argument validation, routing to the reference (Cpu) or sm_90a (Cuda) backend, and the
// collective compositions (pack -> all_to_all_v -> unpack).
#include "fp8flow/dispatch.h"

#include <algorithm>
#include <climits>
#include <functional>
#include <memory>
#include <string>

#include "common/backend.h"
#include "common/check.h"
#include "ops/dispatch/dispatch_backends.h"
#include "ops/dispatch/dispatch_map.h"

namespace fp8flow {

namespace {

using detail::cat;
using detail::Check;
using detail::WireArgs;
using detail::WireScale;

int64_t align16(int64_t b) {
  return (b + 15) / 16 * 16;
}

bool present(const TensorView& t) {
  return t.data != nullptr;
}

bool is_byte_dtype(DType d) {
  return dtype_bits(d) == 8;
}

// The wire of a row set (data dtype and H from `data`, prob present or not).
DispatchWire wire_of(const Check& c, const DispatchRows& rows, const char* arg) {
  if (!present(rows.data)) {
    c.that(present(rows.prob), cat(arg, ".prob"), "given when there is no data (prob-only)",
           "empty");
    return dispatch_wire(DType::F32, 0, true);
  }
  c.view(rows.data, cat(arg, ".data"), {DType::BF16, DType::F32, DType::E4M3, DType::E2M1x2});
  return dispatch_wire(rows.data.dtype, rows.data.cols, present(rows.prob));
}

// Validates a row set of R rows against its wire and fills the row side of WireArgs.
void row_side(const Check& c, const DispatchRows& rows, const char* arg, const DispatchWire& w,
              int64_t R, WireArgs& a) {
  const std::string an(arg);
  if (w.hidden > 0) {
    c.shape(rows.data, an + ".data", R, w.hidden);
    c.contiguous(rows.data, an + ".data");
    a.rows_data = static_cast<uint8_t*>(rows.data.data);
    a.data_bytes = w.data_bytes;
    a.rows = R;
    if (w.dtype == DType::E4M3) {
      const int64_t tiles = (w.hidden + 127) / 128;
      c.view(rows.scale, an + ".scale", {DType::F32});
      c.shape(rows.scale, an + ".scale", tiles, R);
      c.contiguous(rows.scale, an + ".scale");
      c.same_device(rows.data, an + ".data", rows.scale, an + ".scale");
      a.scale = WireScale::Col;
      a.tiles = tiles;
    } else if (w.dtype == DType::E2M1x2) {
      c.view(rows.scale, an + ".scale", {DType::E8M0});
      c.shape(rows.scale, an + ".scale", R, w.hidden / 32);
      c.contiguous(rows.scale, an + ".scale");
      c.same_device(rows.data, an + ".data", rows.scale, an + ".scale");
      a.scale = WireScale::Row;
    } else {
      c.that(!present(rows.scale), an + ".scale", cat("empty for ", to_string(w.dtype), " rows"),
             "a tensor");
    }
    a.rows_scale = rows.scale.data;
    a.scale_bytes = w.scale_bytes;
  }
  if (present(rows.prob)) {
    c.view(rows.prob, an + ".prob", {DType::F32});
    c.contiguous(rows.prob, an + ".prob");
    if (w.hidden > 0) c.same_device(rows.data, an + ".data", rows.prob, an + ".prob");
    a.prob = static_cast<float*>(rows.prob.data);
    a.prob_len = rows.prob.numel();
    a.prob_offset = w.prob_offset;
  }
}

Device rows_device(const DispatchRows& r) {
  return present(r.data) ? r.data.device : r.prob.device;
}

void check_wire_tensor(const Check& c, const TensorView& wire, const DispatchWire& w,
                       int64_t min_rows, Device dev) {
  c.view(wire, "wire");
  c.that(is_byte_dtype(wire.dtype), "wire.dtype", "an 8-bit dtype (bytes)", to_string(wire.dtype));
  c.contiguous(wire, "wire");
  c.that(wire.cols == w.row_bytes, "wire.cols", cat(w.row_bytes, " (record bytes)"),
         cat(wire.cols));
  c.that(wire.rows >= min_rows, "wire.rows", cat("at least ", min_rows), cat(wire.rows));
  c.that(wire.device == dev, "wire.device", to_string(dev), to_string(wire.device));
}

void check_map(const Check& c, const TensorView& map, const char* arg, int64_t n, Device dev) {
  c.view(map, arg, {DType::I32});
  c.contiguous(map, arg);
  c.that(map.numel() >= n, arg, cat("at least ", n, " entries"), cat(map.numel()));
  c.that(map.device == dev, cat(arg, ".device"), to_string(dev), to_string(map.device));
}

void require_cuda(const Check& c, std::initializer_list<std::pair<const void*, const char*>> ps,
                  Device dev) {
  if (dev != Device::Cuda) return;
  detail::require_cuda_backend(c);
  for (auto [p, name] : ps) {
    if (!p) continue;
    const TensorView t{const_cast<void*>(p), DType::E4M3, 1, 1, -1, Device::Cuda};
    detail::require_device_pointer(c, t, name);
  }
}

void aligned16(const Check& c, const void* p, const char* arg) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  c.that(a % 16 == 0, arg, "a 16-byte aligned pointer",
         cat("address ending 0x", std::hex, a % 256));
}

// A pack / unpack on Cuda: the backend exists, every pointer of `a` is device memory, and the
// rows and the wire are 16-byte aligned (vector loads and stores). side: "in" or "out".
void require_cuda_wire(const Check& c, const WireArgs& a, Device dev, const std::string& side) {
  const std::string data = side + ".data", scale = side + ".scale", prob = side + ".prob";
  require_cuda(c,
               {{a.rows_data, data.c_str()},
                {a.rows_scale, scale.c_str()},
                {a.prob, prob.c_str()},
                {a.wire, "wire"},
                {a.map, "map"}},
               dev);
  if (a.rows_data) aligned16(c, a.rows_data, data.c_str());
  aligned16(c, a.wire, "wire");
}

void run_pack(const Check& c, const WireArgs& a, Device dev, Stream stream) {
  if (a.wire_rows == 0) return;
  if (dev == Device::Cpu) return ref::dispatch_pack(a);
  require_cuda_wire(c, a, dev, "in");
  FP8FLOW_SM90(sm90::dispatch_pack(a, stream));
  (void)stream;
}

void run_unpack(const Check& c, const WireArgs& a, Device dev, Stream stream) {
  if (a.map_rows == 0) return;
  if (dev == Device::Cpu) return ref::dispatch_unpack(a);
  require_cuda_wire(c, a, dev, "out");
  FP8FLOW_SM90(sm90::dispatch_unpack(a, stream));
  (void)stream;
}

// Pack: validated WireArgs for rows `in` (R rows), map, k, into `wire_ptr` (n records).
WireArgs pack_args(const Check& c, const DispatchRows& in, const DispatchWire& w,
                   const TensorView& map, int k, void* wire_ptr, int64_t n) {
  c.that(k >= 1, "k", "at least 1", cat(k));
  WireArgs a;
  const int64_t R = present(in.data) ? in.data.rows : 0;
  row_side(c, in, "in", w, R, a);
  check_map(c, map, "map", n, rows_device(in));
  a.map = static_cast<const int32_t*>(map.data);
  a.k = k;
  a.wire = static_cast<uint8_t*>(wire_ptr);
  a.wire_rows = n;
  a.map_rows = n;
  a.row_bytes = w.row_bytes;
  return a;
}

}  // namespace

// ---- Layout -------------------------------------------------------------------------------------

DispatchLayout make_dispatch_layout(std::span<const int64_t> all_counts, int ranks, int rank,
                                    int64_t experts, int align) {
  const Check c("make_dispatch_layout");
  c.that(ranks >= 1, "ranks", "at least 1", cat(ranks));
  c.that(rank >= 0 && rank < ranks, "rank", cat("in [0, ", ranks, ")"), cat(rank));
  c.that(experts >= 1 && experts % ranks == 0, "experts",
         cat("a positive multiple of ranks (", ranks, ")"), cat(experts));
  c.that(align >= 1 && align <= 128 && (align & (align - 1)) == 0, "align",
         "a power of two in [1, 128]", cat(align));
  c.that(static_cast<int64_t>(all_counts.size()) == int64_t{ranks} * experts, "all_counts",
         cat(int64_t{ranks} * experts, " entries (ranks x experts)"), cat(all_counts.size()));
  for (size_t i = 0; i < all_counts.size(); ++i)
    if (!(all_counts[i] >= 0 && all_counts[i] < INT32_MAX))
      c.that(false, "all_counts", "entries in [0, 2^31)",
             cat(all_counts[i], " at [", i / experts, "][", i % experts, "]"));
  DispatchLayout l;
  l.ranks = ranks;
  l.rank = rank;
  l.experts = experts;
  const int64_t El = experts / ranks, N = ranks;
  l.local_experts = El;
  l.align = align;
  l.counts.assign(all_counts.begin(), all_counts.end());
  auto cnt = [&](int64_t s, int64_t e) { return l.counts[static_cast<size_t>(s * experts + e)]; };
  auto pad = [&](int64_t n) { return (n + align - 1) / align * align; };

  l.send_rows.assign(N, 0);
  l.send_offsets.assign(N, 0);
  l.recv_rows.assign(N, 0);
  l.recv_offsets.assign(N, 0);
  for (int64_t j = 0; j < N; ++j)
    for (int64_t e = j * El; e < (j + 1) * El; ++e) l.send_rows[j] += cnt(rank, e);
  for (int64_t s = 0; s < N; ++s)
    for (int64_t e = rank * El; e < (rank + 1) * El; ++e) l.recv_rows[s] += cnt(s, e);
  for (int64_t j = 1; j < N; ++j) {
    l.send_offsets[j] = l.send_offsets[j - 1] + l.send_rows[j - 1];
    l.recv_offsets[j] = l.recv_offsets[j - 1] + l.recv_rows[j - 1];
  }
  l.send_total = l.send_offsets[N - 1] + l.send_rows[N - 1];
  l.recv_total = l.recv_offsets[N - 1] + l.recv_rows[N - 1];

  l.tokens_per_expert.assign(El, 0);
  l.m_splits.assign(El, 0);
  l.offsets.assign(El + 1, 0);
  for (int64_t e = 0; e < El; ++e) {
    for (int64_t s = 0; s < N; ++s) l.tokens_per_expert[e] += cnt(s, rank * El + e);
    l.m_splits[e] = pad(l.tokens_per_expert[e]);
    l.offsets[e + 1] = l.offsets[e] + l.m_splits[e];
  }
  l.padded_rows = l.offsets[El];
  for (int64_t r = 0; r < N; ++r) {
    int64_t recv = 0, padded = 0;
    for (int64_t e = r * El; e < (r + 1) * El; ++e) {
      int64_t n = 0;
      for (int64_t s = 0; s < N; ++s) n += cnt(s, e);
      recv += n;
      padded += pad(n);
    }
    l.max_recv_total = std::max(l.max_recv_total, recv);
    l.max_padded_rows = std::max(l.max_padded_rows, padded);
  }
  c.that(l.max_padded_rows < INT32_MAX && l.send_total < INT32_MAX, "all_counts",
         "row totals < 2^31 on every rank", cat(l.max_padded_rows));

  // Map table (dispatch_map.h).
  l.table.assign(static_cast<size_t>(detail::dispatch_table_size(El, N)), 0);
  int64_t* off = l.table.data();
  int64_t* pre = off + (El + 1);
  int64_t* start = pre + El * (N + 1);
  for (int64_t e = 0; e <= El; ++e) off[e] = l.offsets[e];
  for (int64_t e = 0; e < El; ++e) {
    pre[e * (N + 1)] = 0;
    for (int64_t s = 0; s < N; ++s)
      pre[e * (N + 1) + s + 1] = pre[e * (N + 1) + s] + cnt(s, rank * El + e);
  }
  for (int64_t s = 0; s < N; ++s) {
    int64_t row = l.recv_offsets[s];
    for (int64_t e = 0; e < El; ++e) {
      start[e * N + s] = row;
      row += cnt(s, rank * El + e);
    }
  }
  return l;
}

DispatchLayout exchange_dispatch_counts(Communicator& comm, std::span<const int64_t> my_counts,
                                        int64_t experts, int align, Stream stream) {
  const Check c("exchange_dispatch_counts");
  c.that(static_cast<int64_t>(my_counts.size()) == experts, "my_counts",
         cat(experts, " entries (experts)"), cat(my_counts.size()));
  const std::vector<int64_t> all = comm.all_gather(my_counts, stream);
  return make_dispatch_layout(all, comm.size(), comm.rank(), experts, align);
}

int64_t dispatch_recv_row(const DispatchLayout& l, int64_t r) {
  if (r < 0 || r >= l.padded_rows) return -1;
  const detail::DispatchTable tb{l.table.data(), static_cast<int32_t>(l.local_experts),
                                 static_cast<int32_t>(l.ranks)};
  return detail::dispatch_recv_row(tb, r);
}

int64_t dispatch_max_recv_rows(int ranks, int64_t max_tokens, int64_t topk, int64_t local_experts) {
  return int64_t{ranks} * max_tokens * std::min(topk, local_experts);
}

DispatchWire dispatch_wire(DType data_dtype, int64_t hidden, bool with_prob) {
  const Check c("dispatch_wire");
  DispatchWire w;
  if (hidden == 0) {
    c.that(with_prob, "with_prob", "true for a prob-only record (hidden == 0)", "false");
    w.dtype = DType::F32;
    w.prob_offset = 0;
    w.row_bytes = 4;
    return w;
  }
  w.dtype = data_dtype;
  w.hidden = hidden;
  switch (data_dtype) {
    case DType::BF16:
      c.that(hidden > 0 && hidden % 8 == 0, "hidden", "a positive multiple of 8 (BF16)",
             cat(hidden));
      w.data_bytes = 2 * hidden;
      break;
    case DType::F32:
      c.that(hidden > 0 && hidden % 4 == 0, "hidden", "a positive multiple of 4 (F32)",
             cat(hidden));
      w.data_bytes = 4 * hidden;
      break;
    case DType::E4M3:
      c.that(hidden > 0 && hidden % 16 == 0, "hidden", "a positive multiple of 16 (E4M3)",
             cat(hidden));
      w.data_bytes = hidden;
      w.scale_bytes = ((hidden + 127) / 128 + 3) / 4 * 4;  // E8M0 codes (dispatch_backends.h)
      break;
    case DType::E2M1x2:
      c.that(hidden > 0 && hidden % 128 == 0, "hidden", "a positive multiple of 128 (E2M1x2)",
             cat(hidden));
      w.data_bytes = hidden / 2;
      w.scale_bytes = hidden / 32;
      break;
    default:
      c.fail(ErrorKind::InvalidArgument, "data_dtype",
             cat("expected BF16, F32, E4M3 or E2M1x2, got ", to_string(data_dtype)));
  }
  const int64_t used = w.data_bytes + w.scale_bytes;
  if (with_prob) w.prob_offset = used;
  w.row_bytes = align16(used + (with_prob ? 4 : 0));
  return w;
}

// ---- Maps, pack, unpack ------------------------------------------------------------------------

void make_dispatch_maps(const DispatchLayout& l, const TensorView& table,
                        const TensorView& perm_to_recv, const TensorView& recv_to_perm,
                        Stream stream) {
  const Check c("make_dispatch_maps");
  c.that(
      static_cast<int64_t>(l.table.size()) == detail::dispatch_table_size(l.local_experts, l.ranks),
      "layout.table", "the table of make_dispatch_layout", cat(l.table.size(), " entries"));
  const Device dev = perm_to_recv.device;
  check_map(c, perm_to_recv, "perm_to_recv", l.padded_rows, dev);
  check_map(c, recv_to_perm, "recv_to_perm", l.recv_total, dev);
  if (dev == Device::Cpu)
    return ref::dispatch_maps(l, static_cast<int32_t*>(perm_to_recv.data), perm_to_recv.numel(),
                              static_cast<int32_t*>(recv_to_perm.data));
  c.view(table, "table", {DType::I64});
  c.that(table.numel() >= static_cast<int64_t>(l.table.size()), "table",
         cat("at least ", l.table.size(), " entries"), cat(table.numel()));
  c.that(table.device == dev, "table.device", to_string(dev), to_string(table.device));
  require_cuda(c,
               {{table.data, "table"},
                {perm_to_recv.data, "perm_to_recv"},
                {recv_to_perm.data, "recv_to_perm"}},
               dev);
  FP8FLOW_SM90(sm90::dispatch_maps(l, static_cast<int64_t*>(table.data),
                                   static_cast<int32_t*>(perm_to_recv.data), perm_to_recv.numel(),
                                   static_cast<int32_t*>(recv_to_perm.data), stream));
  (void)stream;
}

void dispatch_pack(const DispatchRows& in, const TensorView& map, int k, const TensorView& wire,
                   Stream stream) {
  const Check c("dispatch_pack");
  const DispatchWire w = wire_of(c, in, "in");
  const Device dev = rows_device(in);
  check_wire_tensor(c, wire, w, wire.rows, dev);
  WireArgs a = pack_args(c, in, w, map, k, wire.data, wire.rows);
  run_pack(c, a, dev, stream);
}

void dispatch_unpack(const TensorView& wire, const TensorView& map, const DispatchRows& out,
                     Stream stream) {
  const Check c("dispatch_unpack");
  const DispatchWire w = wire_of(c, out, "out");
  const Device dev = rows_device(out);
  check_wire_tensor(c, wire, w, 0, dev);
  const int64_t R = present(out.data) ? out.data.rows : out.prob.numel();
  WireArgs a;
  row_side(c, out, "out", w, R, a);
  if (present(out.prob))
    c.that(out.prob.numel() == R, "out.prob", cat(R, " elements (out rows)"),
           cat(out.prob.numel()));
  if (present(map)) {
    check_map(c, map, "map", R, dev);
    a.map = static_cast<const int32_t*>(map.data);
  }
  a.wire = static_cast<uint8_t*>(wire.data);
  a.wire_rows = wire.rows;
  a.row_bytes = w.row_bytes;
  a.map_rows = R;
  run_unpack(c, a, dev, stream);
}

// ---- Collectives --------------------------------------------------------------------------------

namespace {

// The output rows carry the input's payload (data dtype, H, prob or not).
void check_same_payload(const Check& c, const DispatchWire& w, const DispatchWire& wo) {
  c.that(wo.dtype == w.dtype && wo.hidden == w.hidden && wo.prob_offset == w.prob_offset, "out",
         cat("rows of the same payload as in (", to_string(w.dtype), ", H ", w.hidden,
             w.prob_offset >= 0 ? ", with prob)" : ", no prob)"),
         cat(to_string(wo.dtype), ", H ", wo.hidden,
             wo.prob_offset >= 0 ? ", with prob" : ", no prob"));
}

void check_layout_comm(const Check& c, Communicator& comm, const DispatchLayout& l, Device dev) {
  c.that(l.ranks == comm.size() && l.rank == comm.rank(), "layout",
         cat("a layout of rank ", comm.rank(), " of ", comm.size()),
         cat("rank ", l.rank, " of ", l.ranks));
  c.that(comm.device() == dev, "comm", cat("a communicator on ", to_string(dev)),
         cat("one on ", to_string(comm.device()), " (", comm.backend(), ")"));
}

void check_buffer(const Check& c, const void* p, size_t have, int64_t need, const char* arg) {
  c.that(have >= static_cast<size_t>(need), cat(arg, "_bytes"), cat("at least ", need), cat(have));
  if (need > 0) {
    c.that(p != nullptr, arg, "a non-null pointer", "nullptr");
    aligned16(c, p, arg);
  }
}

// The filter of run c of C over record segments (rows, prefix offsets).
detail::ChunkFilter filter_of(const std::vector<int64_t>& rows, const std::vector<int64_t>& off,
                              int C, int c) {
  detail::ChunkFilter f;
  if (C <= 1) return f;
  const auto N = static_cast<int>(rows.size());
  f.chunks = C;
  f.chunk = c;
  f.segments = N;
  for (int j = 0; j < N; ++j) f.seg[j] = static_cast<int32_t>(off[j]);
  f.seg[N] = static_cast<int32_t>(off[N - 1] + rows[N - 1]);
  return f;
}

// The pipeline resources of a communicator (Cuda), created on first use.
void* pipe_state(Communicator& comm) {
#if FP8FLOW_WITH_CUDA
  std::shared_ptr<void>& slot = comm.op_state();
  if (!slot) slot = sm90::pipe_create();
  return slot.get();
#else
  (void)comm;
  return nullptr;
#endif
}

// Run r of C of the records of peer segments (rows, prefix offsets): [begin, end) per peer.
std::pair<int64_t, int64_t> run_rows(const std::vector<int64_t>& rows, size_t j, int r, int C) {
  return {detail::chunk_begin(rows[j], r, C), detail::chunk_begin(rows[j], r + 1, C)};
}

// The collective body of dispatch (unpack given) and combine (unpack null): C runs of
// pack -> exchange(r) -> unpack (pack / unpack skipped when null). Run c's records of peer j are
// [n_j c / C, n_j (c + 1) / C) of its segment on both sides: the pack filter uses the send
// segments, the unpack filter the receive segments. With C > 1 on Cuda the exchanges run on the
// side stream:
//   stream: pack0 pack1 | wait a0, unpack0, pack2 | wait a1, unpack1, pack3 | ... | wait aC-1, ...
//   side:   wait p0, a2a0 | wait p1, a2a1 | ...
// so a2a(c) overlaps pack(c + 1) and unpack(c - 1), and `stream` ends after every run. The
// "packed" event is recorded even without a pack, so the side stream always starts after the
// work queued on `stream` before the call.
void run_runs(const Check& c, Communicator& comm, Device dev, Stream stream, int C,
              const WireArgs* pack, const std::vector<int64_t>& send_rows,
              const std::vector<int64_t>& send_off, const std::vector<int64_t>& recv_rows,
              const std::vector<int64_t>& recv_off,
              const std::function<void(int, Stream)>& exchange, const WireArgs* unpack) {
  void* st = dev == Device::Cuda && C > 1 ? pipe_state(comm) : nullptr;
  Stream side = stream;
  FP8FLOW_SM90(if (st) side = sm90::pipe_side(st));
  auto record = [&](int which, int r, Stream s) {
    FP8FLOW_SM90(if (st) sm90::pipe_record(st, which, r, s));
    (void)which, (void)r, (void)s;
  };
  auto wait = [&](int which, int r, Stream s) {
    FP8FLOW_SM90(if (st) sm90::pipe_wait(st, which, r, s));
    (void)which, (void)r, (void)s;
  };
  auto run_pack_of = [&](int r) {
    if (pack) {
      WireArgs a = *pack;
      a.filter = filter_of(send_rows, send_off, C, r);
      run_pack(c, a, dev, stream);
    }
    record(0, r, stream);
  };
  run_pack_of(0);
  for (int r = 0; r < C; ++r) {
    wait(0, r, side);
    exchange(r, side);
    record(1, r, side);
    if (r + 1 < C) run_pack_of(r + 1);
    wait(1, r, stream);
    if (unpack) {
      WireArgs a = *unpack;
      a.filter = filter_of(recv_rows, recv_off, C, r);
      run_unpack(c, a, dev, stream);
    }
  }
}

// The record exchange of run r: one all_to_all_v of records of B bytes.
std::function<void(int, Stream)> record_exchange(Communicator& comm, int C, const void* send,
                                                 const std::vector<int64_t>& send_rows,
                                                 const std::vector<int64_t>& send_off, void* recv,
                                                 const std::vector<int64_t>& recv_rows,
                                                 const std::vector<int64_t>& recv_off, int64_t B) {
  return [&comm, C, send, &send_rows, &send_off, recv, &recv_rows, &recv_off, B](int r, Stream s) {
    const size_t N = send_rows.size();
    std::vector<int64_t> sb(N), so(N), rb(N), ro(N);
    for (size_t j = 0; j < N; ++j) {
      const auto [s0, s1] = run_rows(send_rows, j, r, C);
      const auto [r0, r1] = run_rows(recv_rows, j, r, C);
      sb[j] = (s1 - s0) * B;
      so[j] = (send_off[j] + s0) * B;
      rb[j] = (r1 - r0) * B;
      ro[j] = (recv_off[j] + r0) * B;
    }
    comm.all_to_all_v(send, sb, so, recv, rb, ro, s);
  };
}

// In-place segments of run r (DispatchOptions::in_place), rows of D bytes.
// Token side: rows in send order at `tok` (row send_offsets[j] + i: the i-th row exchanged with
// rank j); the rows of peer j for its local expert e are a contiguous block, in expert order.
// Expert side: the permuted rows at `perm`; the rows of source s for local expert e start at
// offsets[e] + (rows of e from sources < s). Both sides cut the blocks with the run's rows of
// the peer segment, so the k-th non-empty segment of a pair matches on both ends.
void token_side_segments(const DispatchLayout& l, int r, int C, uint8_t* tok, int64_t D,
                         std::vector<CommSegment>& out) {
  const int64_t El = l.local_experts;
  for (size_t j = 0; j < l.send_rows.size(); ++j) {
    const auto [c0, c1] = run_rows(l.send_rows, j, r, C);
    int64_t x = 0;
    for (int64_t e = 0; e < El; ++e) {
      const int64_t n = l.counts[static_cast<size_t>(l.rank * l.experts + j * El + e)];
      const int64_t lo = std::max(x, c0), hi = std::min(x + n, c1);
      if (hi > lo)
        out.push_back({static_cast<int>(j), tok + (l.send_offsets[j] + lo) * D, (hi - lo) * D});
      x += n;
    }
  }
}

void expert_side_segments(const DispatchLayout& l, int r, int C, uint8_t* perm, int64_t D,
                          std::vector<CommSegment>& out) {
  const int64_t El = l.local_experts, N = l.ranks;
  auto cnt = [&](int64_t s, int64_t e) {
    return l.counts[static_cast<size_t>(s * l.experts + l.rank * El + e)];
  };
  for (int64_t s = 0; s < N; ++s) {
    const auto [c0, c1] = run_rows(l.recv_rows, static_cast<size_t>(s), r, C);
    int64_t y = 0;
    for (int64_t e = 0; e < El; ++e) {
      const int64_t n = cnt(s, e);
      int64_t first = l.offsets[e];  // permuted row of source s's first row for e
      for (int64_t s2 = 0; s2 < s; ++s2) first += cnt(s2, e);
      const int64_t lo = std::max(y, c0), hi = std::min(y + n, c1);
      if (hi > lo) out.push_back({static_cast<int>(s), perm + (first + lo - y) * D, (hi - lo) * D});
      y += n;
    }
  }
}

// One record segment per peer: run r's records of the peer segments (rows, prefix offsets).
void record_segments(const std::vector<int64_t>& rows, const std::vector<int64_t>& off, int r,
                     int C, uint8_t* base, int64_t B, std::vector<CommSegment>& out) {
  if (B == 0) return;
  for (size_t j = 0; j < rows.size(); ++j) {
    const auto [c0, c1] = run_rows(rows, j, r, C);
    if (c1 > c0) out.push_back({static_cast<int>(j), base + (off[j] + c0) * B, (c1 - c0) * B});
  }
}

}  // namespace

bool dispatch_in_place(const DispatchOptions& opts) {
  const Check c("dispatch");
  const int v = static_cast<int>(opts.in_place);
  c.that(v >= 0 && v <= 2, "opts.in_place", "Auto, On or Off", cat(v));
  if (opts.in_place == InPlace::Auto) return DispatchOptions::kAutoInPlace;
  return opts.in_place == InPlace::On;
}

int dispatch_chunks(const DispatchLayout& l, int64_t row_bytes, Device device,
                    const DispatchOptions& opts) {
  const Check c("dispatch");
  c.that(opts.chunks >= 0 && opts.chunks <= 64, "opts.chunks", "in [0, 64] (0: automatic)",
         cat(opts.chunks));
  if (l.ranks > detail::kMaxChunkSegments) return 1;
  if (opts.chunks >= 1) return opts.chunks;
  if (device != Device::Cuda) return 1;
  int64_t rows = 0;
  for (int64_t v : l.counts) rows += v;
  const int64_t mean_bytes = rows / std::max(1, l.ranks) * row_bytes;
  return mean_bytes >= DispatchOptions::kAutoChunkMinBytes ? DispatchOptions::kAutoChunks : 1;
}

void dispatch(Communicator& comm, const DispatchLayout& l, const DispatchRows& in,
              const TensorView& send_map, int k, const TensorView& perm_to_recv,
              const DispatchRows& out, const DispatchBuffers& buf, Stream stream,
              const DispatchOptions& opts) {
  const Check c("dispatch");
  const DispatchWire w = wire_of(c, in, "in");
  const DispatchWire wo = wire_of(c, out, "out");
  check_same_payload(c, w, wo);
  const Device dev = rows_device(in);
  check_layout_comm(c, comm, l, dev);
  const int64_t B = w.row_bytes;
  // In place: data rows [send_total][D] then side records [send_total][side_bytes] in
  // buffers.send, side records [recv_total][side_bytes] in buffers.recv (D is a multiple of 16,
  // so the side records start 16-byte aligned).
  const bool in_place = dispatch_in_place(opts) && w.hidden > 0;
  const int64_t D = w.data_bytes;
  const int64_t side_bytes = w.scale_bytes + (w.prob_offset >= 0 ? 4 : 0);
  const int64_t send_need = in_place ? l.send_total * (D + side_bytes) : l.send_total * B;
  const int64_t recv_need = in_place ? l.recv_total * side_bytes : l.recv_total * B;
  check_buffer(c, buf.send, buf.send_bytes, send_need, "buffers.send");
  check_buffer(c, buf.recv, buf.recv_bytes, recv_need, "buffers.recv");
  const int64_t M = present(out.data) ? out.data.rows : out.prob.numel();
  c.that(M >= l.padded_rows, "out", cat("at least ", l.padded_rows, " rows (padded_rows)"), cat(M));
  if (present(in.prob) && present(in.data))
    c.that(in.prob.numel() == in.data.rows * k, "in.prob",
           cat(in.data.rows * k, " elements (T x k, the top-k weights)"), cat(in.prob.numel()));

  const int C = dispatch_chunks(l, B, dev, opts);
  WireArgs pa = pack_args(c, in, w, send_map, k, buf.send, l.send_total);
  WireArgs ua;
  row_side(c, out, "out", wo, M, ua);
  check_map(c, perm_to_recv, "perm_to_recv", M, dev);
  ua.map = static_cast<const int32_t*>(perm_to_recv.data);
  ua.wire = static_cast<uint8_t*>(buf.recv);
  ua.wire_rows = l.recv_total;
  ua.row_bytes = B;
  ua.map_rows = M;
  if (!in_place) {
    run_runs(c, comm, dev, stream, C, &pa, l.send_rows, l.send_offsets, l.recv_rows, l.recv_offsets,
             record_exchange(comm, C, buf.send, l.send_rows, l.send_offsets, buf.recv, l.recv_rows,
                             l.recv_offsets, B),
             &ua);
    return;
  }
  auto* send = static_cast<uint8_t*>(buf.send);
  uint8_t* side_send = send + l.send_total * D;
  for (WireArgs* a : {&pa, &ua}) {
    a->data_apart = true;
    a->row_bytes = side_bytes;
    if (a->prob_offset >= 0) a->prob_offset = w.scale_bytes;
  }
  pa.data_wire = send;
  pa.wire = side_send;
  auto* data_out = static_cast<uint8_t*>(out.data.data);
  auto* recv = static_cast<uint8_t*>(buf.recv);
  const auto exchange = [&](int r, Stream st) {
    std::vector<CommSegment> sends, recvs;
    token_side_segments(l, r, C, send, D, sends);
    record_segments(l.send_rows, l.send_offsets, r, C, side_send, side_bytes, sends);
    expert_side_segments(l, r, C, data_out, D, recvs);
    record_segments(l.recv_rows, l.recv_offsets, r, C, recv, side_bytes, recvs);
    comm.all_to_all_segments(sends, recvs, st);
  };
  run_runs(c, comm, dev, stream, C, &pa, l.send_rows, l.send_offsets, l.recv_rows, l.recv_offsets,
           exchange, &ua);
}

void upload_dedup_plan(const DedupPlan& plan, const TensorView& plan_dev, Stream stream) {
  const Check c("upload_dedup_plan");
  c.that(plan.k >= 1 && static_cast<int64_t>(plan.token.size()) == plan.send_total &&
             static_cast<int64_t>(plan.slots.size()) == plan.send_total * plan.k,
         "plan", "a plan of make_dedup_plan",
         cat(plan.token.size(), " tokens and ", plan.slots.size(), " slot entries for ",
             plan.send_total, " records"));
  const Device dev = plan_dev.device;
  check_map(c, plan_dev, "plan_dev", plan.device_words(), dev);
  auto* pd = static_cast<int32_t*>(plan_dev.data);
  if (plan.send_total == 0) return;
  if (dev == Device::Cpu) {
    std::copy(plan.token.begin(), plan.token.end(), pd);
    std::copy(plan.slots.begin(), plan.slots.end(), pd + plan.send_total);
    return;
  }
  require_cuda(c, {{pd, "plan_dev"}}, dev);
  FP8FLOW_SM90(sm90::dispatch_dedup_upload(plan, pd, stream));
  (void)stream;
}

int64_t dedup_build_work_words(int64_t experts, int ranks) {
  return experts + 2 * int64_t{ranks};
}

void build_dedup_plan(const DedupPlan& plan, const DispatchLayout& l, const TensorView& topk_idx,
                      const TensorView& dest_row, std::span<const int64_t> src_offsets,
                      const TensorView& work, const TensorView& plan_dev, Stream stream) {
  const Check c("build_dedup_plan");
  const int64_t N = l.ranks, E = l.experts;
  c.that(plan.ranks == l.ranks && plan.rank == l.rank && plan.k >= 1 &&
             static_cast<int64_t>(plan.send_offsets.size()) == N &&
             static_cast<int64_t>(plan.send_rows.size()) == N,
         "plan", cat("a plan of rank ", l.rank, " of ", l.ranks, " (make_dedup_plan_sizes)"),
         cat("rank ", plan.rank, " of ", plan.ranks));
  c.that(N <= detail::kMaxBuildRanks, "layout",
         cat("at most ", detail::kMaxBuildRanks, " ranks (one destination mask word)"), cat(N));
  const int64_t T = plan.tokens, k = plan.k;
  c.view(topk_idx, "topk_idx", {DType::I32});
  c.contiguous(topk_idx, "topk_idx");
  c.shape(topk_idx, "topk_idx", T, k);
  const Device dev = topk_idx.device;
  c.view(dest_row, "dest_row", {DType::I32});
  c.contiguous(dest_row, "dest_row");
  c.shape(dest_row, "dest_row", T, k);
  c.that(dest_row.device == dev, "dest_row.device", to_string(dev), to_string(dest_row.device));
  c.that(static_cast<int64_t>(src_offsets.size()) == E + 1, "src_offsets",
         cat(E + 1, " entries (the source plan's offsets)"), cat(src_offsets.size()));
  check_map(c, work, "work", dedup_build_work_words(E, static_cast<int>(N)), dev);
  check_map(c, plan_dev, "plan_dev", plan.device_words(), dev);
  // The table: base[e] = first row of e's pairs there - the source plan's offset of e, then the
  // send offsets and ends. Rows and offsets fit I32 (checked).
  const std::vector<int64_t> first = detail::dedup_first_rows(l);
  std::vector<int32_t> table(static_cast<size_t>(dedup_build_work_words(E, static_cast<int>(N))));
  for (int64_t e = 0; e < E; ++e) {
    const int64_t b = first[e] - src_offsets[e];
    c.that(b > INT32_MIN && b < INT32_MAX && first[e] < INT32_MAX, "layout",
           "permuted rows below 2^31", cat(first[e]));
    table[e] = static_cast<int32_t>(b);
  }
  for (int64_t r = 0; r < N; ++r) {
    table[E + r] = static_cast<int32_t>(plan.send_offsets[r]);
    table[E + N + r] = static_cast<int32_t>(plan.send_offsets[r] + plan.send_rows[r]);
  }
  detail::DedupBuildArgs a;
  a.idx = static_cast<const int32_t*>(topk_idx.data);
  a.dest_row = static_cast<const int32_t*>(dest_row.data);
  a.tokens = static_cast<int32_t>(T);
  a.k = static_cast<int32_t>(k);
  a.ranks = static_cast<int32_t>(N);
  a.local_experts = static_cast<int32_t>(l.local_experts);
  a.experts = static_cast<int32_t>(E);
  a.send_total = static_cast<int32_t>(plan.send_total);
  a.plan = static_cast<int32_t*>(plan_dev.data);
  auto* td = static_cast<int32_t*>(work.data);
  a.table = td;
  if (dev == Device::Cpu) {
    std::copy(table.begin(), table.end(), td);
    ref::dispatch_dedup_build(a);
    return;
  }
  require_cuda(
      c, {{a.idx, "topk_idx"}, {a.dest_row, "dest_row"}, {td, "work"}, {a.plan, "plan_dev"}}, dev);
  FP8FLOW_SM90(sm90::dispatch_dedup_build(a, table, td, stream));
  (void)stream;
}

void dispatch_dedup(Communicator& comm, const DispatchLayout& l, const DedupPlan& plan,
                    const DispatchRows& in, const TensorView& plan_dev, const TensorView& map,
                    const DispatchRows& out, const DispatchBuffers& buf, Stream stream) {
  const Check c("dispatch_dedup");
  c.that(present(in.data), "in.data", "rows (dedup dispatch moves data rows)", "empty");
  const DispatchWire w0 = wire_of(c, in, "in");
  const DispatchWire wo = wire_of(c, out, "out");
  check_same_payload(c, w0, wo);
  const Device dev = rows_device(in);
  check_layout_comm(c, comm, l, dev);
  // token / slots: the host arrays of make_dedup_plan, or none (make_dedup_plan_sizes: plan_dev
  // filled by build_dedup_plan); only plan_dev and the sizes are read here.
  const bool host_arrays = static_cast<int64_t>(plan.token.size()) == plan.send_total &&
                           static_cast<int64_t>(plan.slots.size()) == plan.send_total * plan.k;
  const bool sizes_only = plan.token.empty() && plan.slots.empty();
  c.that(plan.ranks == l.ranks && plan.rank == l.rank && plan.k >= 1 &&
             (host_arrays || sizes_only) &&
             static_cast<int64_t>(plan.send_rows.size()) == l.ranks &&
             static_cast<int64_t>(plan.recv_rows.size()) == l.ranks,
         "plan", cat("a plan of rank ", l.rank, " of ", l.ranks, " (make_dedup_plan)"),
         cat("rank ", plan.rank, " of ", plan.ranks, ", ", plan.token.size(), " tokens for ",
             plan.send_total, " records"));
  const int k = plan.k;
  const DispatchWire w = dispatch_dedup_wire(in.data.dtype, in.data.cols, k);
  const int64_t B = w.row_bytes;
  c.that(in.data.rows == plan.tokens, "in.data", cat(plan.tokens, " rows (the plan's tokens)"),
         cat(in.data.rows));
  if (present(in.prob))
    c.that(in.prob.numel() == plan.tokens * k, "in.prob",
           cat(plan.tokens * k, " elements (T x k, the top-k weights)"), cat(in.prob.numel()));
  check_buffer(c, buf.send, buf.send_bytes, plan.send_total * B, "buffers.send");
  check_buffer(c, buf.recv, buf.recv_bytes, plan.recv_total * B, "buffers.recv");
  const int64_t M = out.data.rows;
  c.that(M >= l.padded_rows, "out", cat("at least ", l.padded_rows, " rows (padded_rows)"), cat(M));
  check_map(c, plan_dev, "plan_dev", plan.device_words(), dev);
  check_map(c, map, "map", M, dev);
  auto* pd = static_cast<int32_t*>(plan_dev.data);
  auto* mp = static_cast<int32_t*>(map.data);

  // Pack: record i <- token plan.token[i] (map with k = 1), slots from plan.slots.
  WireArgs pa;
  row_side(c, in, "in", w, in.data.rows, pa);
  pa.prob_offset = -1;  // the probs travel in the slots
  pa.map = pd;
  pa.k = 1;
  pa.slots = pd + plan.send_total;
  pa.slot_k = k;
  pa.wire = static_cast<uint8_t*>(buf.send);
  pa.wire_rows = pa.map_rows = plan.send_total;
  pa.row_bytes = B;
  // Expansion: each received record's data to its slots' rows, map and probs; then the unpack
  // writes the pad rows' data and every row's scales by that map (pad rows where it is -1).
  WireArgs ua;
  row_side(c, out, "out", w, M, ua);
  float* out_prob = ua.prob;
  ua.prob = nullptr;
  ua.prob_offset = -1;
  ua.map = mp;
  ua.map_rows = M;
  ua.wire = static_cast<uint8_t*>(buf.recv);
  ua.wire_rows = plan.recv_total;
  ua.row_bytes = B;
  ua.slot_k = k;
  ua.data_done = true;  // the expansion below writes the received rows' data

  if (dev == Device::Cuda)
    require_cuda(c, {{pd, "plan_dev"}, {mp, "map"}, {out_prob, "out.prob"}}, dev);
  run_pack(c, pa, dev, stream);
  std::vector<int64_t> sb(l.ranks), so(l.ranks), rb(l.ranks), ro(l.ranks);
  for (int j = 0; j < l.ranks; ++j) {
    sb[j] = plan.send_rows[j] * B;
    so[j] = plan.send_offsets[j] * B;
    rb[j] = plan.recv_rows[j] * B;
    ro[j] = plan.recv_offsets[j] * B;
  }
  comm.all_to_all_v(buf.send, sb, so, buf.recv, rb, ro, stream);
  if (dev == Device::Cpu)
    ref::dispatch_dedup_expand(ua, mp, M, out_prob);
  else
    FP8FLOW_SM90(sm90::dispatch_dedup_expand(ua, mp, M, out_prob, stream));
  run_unpack(c, ua, dev, stream);
}

void combine(Communicator& comm, const DispatchLayout& l, const DispatchRows& in,
             const TensorView& recv_to_perm, const TensorView& out, const DispatchBuffers& buf,
             Stream stream, const DispatchOptions& opts) {
  const Check c("combine");
  c.that(!present(in.scale), "in.scale", "empty (combine moves BF16/F32 rows or a prob vector)",
         "a tensor");
  c.that(present(in.data) != present(in.prob), "in",
         "either rows (in.data, BF16/F32) or a prob vector (in.prob), not both", "both or none");
  if (present(in.data)) c.view(in.data, "in.data", {DType::BF16, DType::F32});
  const DispatchWire w = wire_of(c, in, "in");
  const Device dev = rows_device(in);
  check_layout_comm(c, comm, l, dev);
  const int64_t B = w.row_bytes;
  if (w.hidden > 0) {
    c.that(w.row_bytes == w.data_bytes, "in.data", "rows of a multiple of 16 bytes",
           cat(w.data_bytes, " bytes"));
    c.view(out, "out", {in.data.dtype});
    c.shape(out, "out", l.send_total, w.hidden);
    c.contiguous(out, "out");
    c.that(in.data.rows >= l.padded_rows, "in.data",
           cat("at least ", l.padded_rows, " rows (padded_rows)"), cat(in.data.rows));
  } else {
    c.view(out, "out", {DType::F32});
    c.contiguous(out, "out");
    c.that(out.numel() == l.send_total, "out", cat(l.send_total, " elements (send_total)"),
           cat(out.numel()));
  }
  c.that(out.device == dev, "out.device", to_string(dev), to_string(out.device));
  const bool in_place = dispatch_in_place(opts);
  if (!in_place) check_buffer(c, buf.send, buf.send_bytes, l.recv_total * B, "buffers.send");
  if (dev == Device::Cuda && l.send_total > 0) aligned16(c, out.data, "out");
  const int C = dispatch_chunks(l, B, dev, opts);
  if (!in_place) {
    WireArgs pa = pack_args(c, in, w, recv_to_perm, 1, buf.send, l.recv_total);
    run_runs(c, comm, dev, stream, C, &pa, l.recv_rows, l.recv_offsets, l.send_rows, l.send_offsets,
             record_exchange(comm, C, buf.send, l.recv_rows, l.recv_offsets, out.data, l.send_rows,
                             l.send_offsets, B),
             nullptr);
    return;
  }
  // In place: no pack; every (source, expert) block of the permuted rows goes straight to its
  // send-order rows on the source rank (the dispatch segments, reversed).
  const int64_t R = present(in.data) ? in.data.rows : in.prob.numel();
  c.that(R >= l.padded_rows, present(in.data) ? "in.data" : "in.prob",
         cat("at least ", l.padded_rows, " rows (padded_rows)"), cat(R));
  if (dev == Device::Cuda) {
    detail::require_cuda_backend(c);
    require_cuda(c, {{present(in.data) ? in.data.data : in.prob.data, "in"}, {out.data, "out"}},
                 dev);
  }
  auto* perm = static_cast<uint8_t*>(present(in.data) ? in.data.data : in.prob.data);
  auto* tok = static_cast<uint8_t*>(out.data);
  const auto exchange = [&](int r, Stream st) {
    std::vector<CommSegment> sends, recvs;
    expert_side_segments(l, r, C, perm, B, sends);
    token_side_segments(l, r, C, tok, B, recvs);
    comm.all_to_all_segments(sends, recvs, st);
  };
  run_runs(c, comm, dev, stream, C, nullptr, l.recv_rows, l.recv_offsets, l.send_rows,
           l.send_offsets, exchange, nullptr);
}

}  // namespace fp8flow
