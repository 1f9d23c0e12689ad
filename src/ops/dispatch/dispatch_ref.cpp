// CPU reference backend of the dispatch ops: plain byte loops defining what the CUDA kernels must
// produce bit for bit (bytes move unchanged; pad rows as permute writes them).
#include <algorithm>
#include <cstring>

#include "fp8flow/formats.h"
#include "ops/dispatch/dispatch_backends.h"
#include "ops/dispatch/dispatch_map.h"

namespace fp8flow::ref {
namespace {

using detail::WireArgs;
using detail::WireScale;

// Copies one row's scales between the row tensor (row `row`) and a record (at `rec`).
void scales_to_record(const WireArgs& a, int64_t row, uint8_t* rec) {
  if (a.scale == WireScale::Col) {
    const float* s = static_cast<const float*>(a.rows_scale);
    for (int64_t b = 0; b < a.tiles; ++b) {
      uint32_t bits = 0;
      std::memcpy(&bits, &s[b * a.rows + row], 4);
      rec[b] = detail::wire_scale_code(bits);
    }
  } else if (a.scale == WireScale::Row) {
    std::memcpy(rec, static_cast<const uint8_t*>(a.rows_scale) + row * a.scale_bytes,
                static_cast<size_t>(a.scale_bytes));
  }
}

void record_to_scales(const WireArgs& a, const uint8_t* rec, int64_t row) {
  if (a.scale == WireScale::Col) {
    float* s = static_cast<float*>(a.rows_scale);
    for (int64_t b = 0; b < a.tiles; ++b) {
      if (rec) {
        const uint32_t bits = detail::wire_scale_bits(rec[b]);
        std::memcpy(&s[b * a.rows + row], &bits, 4);
      } else {
        s[b * a.rows + row] = fmt::exp2i(fmt::kMinScaleExp);  // 2^-127, as permute's pad rows
      }
    }
  } else if (a.scale == WireScale::Row) {
    uint8_t* d = static_cast<uint8_t*>(a.rows_scale) + row * a.scale_bytes;
    if (rec)
      std::memcpy(d, rec, static_cast<size_t>(a.scale_bytes));
    else
      std::memset(d, 0, static_cast<size_t>(a.scale_bytes));
  }
}

}  // namespace

void dispatch_pack(const WireArgs& a) {
  for (int64_t i = 0; i < a.wire_rows; ++i) {
    if (!detail::in_chunk(a.filter, i)) continue;
    uint8_t* rec = a.row_bytes > 0 ? a.wire + i * a.row_bytes : nullptr;
    if (rec) std::memset(rec, 0, static_cast<size_t>(a.row_bytes));
    uint8_t* drec = a.data_apart ? (a.rows_data ? a.data_wire + i * a.data_bytes : nullptr) : rec;
    if (a.data_apart && drec) std::memset(drec, 0, static_cast<size_t>(a.data_bytes));
    for (int32_t j = 0; j < a.slot_k; ++j) {  // dedup slots: (row, prob of pair map[i] k + j)
      const int32_t row = a.slots[i * a.slot_k + j];
      const int64_t pair = int64_t{a.map[i]} * a.slot_k + j;
      const float p = a.prob && row >= 0 && pair >= 0 && pair < a.prob_len ? a.prob[pair] : 0.0f;
      std::memcpy(rec + a.slot_offset() + 8 * j, &row, 4);
      std::memcpy(rec + a.slot_offset() + 8 * j + 4, &p, 4);
    }
    const int32_t m = a.map[i];
    const int64_t limit = a.rows_data ? a.rows * a.k : a.prob_len;
    if (m < 0 || m >= limit) continue;  // a zero record, as the kernel writes
    const int64_t row = m / a.k;
    if (a.rows_data)
      std::memcpy(drec, a.rows_data + row * a.data_bytes, static_cast<size_t>(a.data_bytes));
    if (rec) scales_to_record(a, row, rec + a.rec_data());
    if (a.prob_offset >= 0 && m < a.prob_len) std::memcpy(rec + a.prob_offset, &a.prob[m], 4);
  }
}

void dispatch_dedup_build(const detail::DedupBuildArgs& a) {
  const int N = a.ranks, k = a.k;
  const int32_t *base = a.table, *soff = a.table + a.experts, *send = soff + N;
  std::vector<int64_t> next(soff, soff + N), rec(static_cast<size_t>(N), -1);
  int32_t* token = a.plan;
  int32_t* slots = a.plan + a.send_total;
  for (int64_t t = 0; t < a.tokens; ++t) {
    uint32_t mask = 0;
    for (int j = 0; j < k; ++j) {
      const int32_t e = a.idx[t * k + j];
      if (e >= 0 && e < a.experts) mask |= 1u << (e / a.local_experts);
    }
    for (int r = 0; r < N; ++r) {
      if (!(mask >> r & 1u)) continue;
      rec[r] = next[r]++;
      if (rec[r] >= send[r]) continue;
      token[rec[r]] = static_cast<int32_t>(t);
      std::fill_n(slots + rec[r] * k, k, -1);
    }
    for (int j = 0; j < k; ++j) {
      const int32_t e = a.idx[t * k + j];
      if (e < 0 || e >= a.experts) continue;
      const int r = e / a.local_experts;
      if (rec[r] < send[r]) slots[rec[r] * k + j] = base[e] + a.dest_row[t * k + j];
    }
  }
}

void dispatch_dedup_expand(const WireArgs& a, int32_t* map, int64_t map_len, float* prob) {
  for (int64_t r = 0; r < map_len; ++r) {
    map[r] = -1;
    if (prob) prob[r] = 0.0f;
  }
  for (int64_t q = 0; q < a.wire_rows; ++q)
    for (int32_t j = 0; j < a.slot_k; ++j) {
      const uint8_t* sl = a.wire + q * a.row_bytes + a.slot_offset() + 8 * j;
      int32_t row = 0;
      std::memcpy(&row, sl, 4);
      if (row < 0 || row >= map_len) continue;
      map[row] = static_cast<int32_t>(q);
      if (prob) std::memcpy(&prob[row], sl + 4, 4);
      if (a.rows_data)
        std::memcpy(a.rows_data + row * a.data_bytes, a.wire + q * a.row_bytes,
                    static_cast<size_t>(a.data_bytes));
    }
}

void dispatch_unpack(const WireArgs& a) {
  for (int64_t r = 0; r < a.map_rows; ++r) {
    const int64_t q = a.map ? a.map[r] : r;
    const bool valid = q >= 0 && q < a.wire_rows;
    if (!detail::in_chunk(a.filter, valid ? q : -1)) continue;
    const uint8_t* rec = valid && a.row_bytes > 0 ? a.wire + q * a.row_bytes : nullptr;
    if (a.rows_data) {
      uint8_t* d = a.rows_data + r * a.data_bytes;
      if (!valid)
        std::memset(d, 0, static_cast<size_t>(a.data_bytes));
      else if (!a.data_apart && !a.data_done)  // the row's data arrived in place / was expanded
        std::memcpy(d, rec, static_cast<size_t>(a.data_bytes));
    }
    record_to_scales(a, rec ? rec + a.rec_data() : nullptr, r);
    if (a.prob_offset >= 0) {
      if (valid)
        std::memcpy(&a.prob[r], rec + a.prob_offset, 4);
      else
        a.prob[r] = 0.0f;
    }
  }
}

void dispatch_maps(const DispatchLayout& l, int32_t* perm_to_recv, int64_t perm_len,
                   int32_t* recv_to_perm) {
  const detail::DispatchTable tb{l.table.data(), static_cast<int32_t>(l.local_experts),
                                 static_cast<int32_t>(l.ranks)};
  for (int64_t r = 0; r < perm_len; ++r) {
    const int64_t q = r < l.padded_rows ? detail::dispatch_recv_row(tb, r) : -1;
    perm_to_recv[r] = static_cast<int32_t>(q);
    if (q >= 0) recv_to_perm[q] = static_cast<int32_t>(r);
  }
}

}  // namespace fp8flow::ref
