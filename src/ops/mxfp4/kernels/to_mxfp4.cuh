// Row-wise streaming conversions to MXFP4 (device code):
//   sm90_e4m3_1x128_to_mxfp4: FP8 E4M3 with 1x128 scales -> MXFP4 (fp8_to_mxfp4)
//   sm90_quantize_mxfp4<T>:   F32 or BF16 -> MXFP4 (quantize_mxfp4)
//
// Work split: a CTA of 256 threads does 256 * kUnits consecutive units; thread t does units t,
// t + 256, ... (every warp access is contiguous) and issues all its loads before any math.
//
// fp8_to_mxfp4: a unit is one 32-block: 32 B of E4M3 in (two LDG.128) plus the tile's FP32 scale
// (a 4-byte load shared by 4 lanes), 16 B of E2M1x2 out (one STG.128) and the E8M0 byte. The
// element step is table-driven (kernels/mxfp4_tables.h): 7 byte-wise threshold compares per 4
// elements; it is exact for tiles whose scale is 2^t, t in [-140, 119] (every FP32 product
// e4m3 * 2^t exact). Other tiles (odd scales, or t >= 120 where products overflow) take a generic
// fmt:: path on the FP32 products dequantize would compute. NOTES: one thread per block rather
// than two halves joined by a shuffle: the per-block scalar work (exponent, table row) is done
// once, and the store is a full 16 B.
//
// quantize_mxfp4: a unit is half a 32-block (16 elements: 64 B of F32 or 32 B of BF16); lanes
// 2i and 2i+1 own one block and combine their amax with one __shfl_xor. F32: per element one FMUL
// by 2^-X and a 3-compare binary search over the FP32 bit thresholds of E2M1 rounding. BF16: two
// elements per 32-bit word, seven 16x2 threshold compares (VIADDMNMX) summed into both codes at
// once (bf16x2_to_e2m1x2), the thresholds moved by X instead of the data scaled (rev 076a6d2 used
// the F32 step on BF16 too: 0.335 ms at 32768 x 7168 on an H100, 59% of copy, instruction-bound).
//
// Napkin math at 32768 x 7168 (DeepSeek-V3 hidden): fp8_to_mxfp4 moves 1 + 4/128 B in and
// 0.5 + 1/32 B out per element = 1.56 B/elem = 367 MB; at 2.4 TB/s (80% of an H100's 3.0 TB/s
// copy) 0.153 ms. quantize_mxfp4 from BF16: 2.53 B/elem = 595 MB, 0.25 ms; from F32 4.53 B/elem.
// Bench: fp8flow-bench ops (fp8_to_mxfp4, quantize_mxfp4 rows).
#pragma once

#include <cuda_runtime.h>

#include "ops/mxfp4/kernels/mxfp4_tables.h"

namespace fp8flow::sm90 {

constexpr int kToMxThreads = 256;

struct Fp8ToMxParams {
  const uint4* in;          // E4M3 [M][K]: block u at in[2u], in[2u + 1]
  const float* in_scale;    // F32 [K/128][M]
  uint4* out;               // E2M1x2 [M][K]: block u at out[u]
  uint8_t* out_scale;       // E8M0 [M][K/32]: block u at out_scale[u]
  uint32_t rows;            // M
  uint32_t blocks_per_row;  // K/32
  mx::FastDiv div_blocks;
  mx::E4m3ToE2m1 tab;
  uint64_t seed;  // stochastic rounding (kSr): element (r, k) takes fmt::sr_bits(seed, r K + k)
};

template <typename T>
struct QuantizeMxParams {
  const T* in;         // F32 or BF16 (uint16_t) [M][K]
  uint2* out;          // E2M1x2 [M][K]
  uint8_t* out_scale;  // E8M0 [M][K/32]
  uint32_t rows;
  uint32_t units_per_row;  // K/16
  mx::FastDiv div_units;
  mx::E2m1Thresholds th;
  mx::Bf16E2m1 bf;  // BF16 input: the lane-pair encoder's constants
};

// Row and unit column of this thread's unit j: CTA base (blockIdx.x * units_per_cta) split with
// 32-bit divisions only (blockIdx.x < 2^31 and units_per_row * units_per_cta < 2^31).
struct UnitCursor {
  uint32_t row0, col0;
  __device__ UnitCursor(const mx::FastDiv& div, uint32_t units_per_row, uint32_t units_per_cta) {
    const uint32_t bx = blockIdx.x;
    const uint32_t q1 = div.div(bx), r1 = bx - q1 * units_per_row;
    const uint32_t q2 = div.div(r1 * units_per_cta);
    row0 = q1 * units_per_cta + q2;
    col0 = r1 * units_per_cta - q2 * units_per_row;
  }
  __device__ void at(const mx::FastDiv& div, uint32_t units_per_row, uint32_t offset, uint32_t& row,
                     uint32_t& col) const {
    const uint32_t local = col0 + offset;
    const uint32_t q = div.div(local);
    row = row0 + q;
    col = local - q * units_per_row;
  }
};

// kSr: stochastic element rounding (Mxfp4Rounding): the shared exponent as under RNE, then per
// element the reference's own FP32 steps (decode * scale, mul_pow2, fmt::e2m1_from_f32_sr); about
// 40 instructions per element instead of the table's few: opt-in, for the layer's saved forms.
template <int kUnits, bool kSr = false>
__global__ void __launch_bounds__(kToMxThreads)
    sm90_e4m3_1x128_to_mxfp4(const __grid_constant__ Fp8ToMxParams p) {
  constexpr int kRows = mx::E4m3ToE2m1::kShifts;
  __shared__ __align__(16) uint32_t s_theta[kRows][8];
  for (int i = threadIdx.x; i < kRows * 8; i += kToMxThreads)
    s_theta[i / 8][i % 8] = p.tab.theta[i / 8][i % 8];

  const UnitCursor cur(p.div_blocks, p.blocks_per_row, kToMxThreads * kUnits);
  uint4 q[kUnits][2];
  float s[kUnits];
  uint32_t row[kUnits], col[kUnits];
#pragma unroll
  for (int j = 0; j < kUnits; ++j) {
    cur.at(p.div_blocks, p.blocks_per_row, j * kToMxThreads + threadIdx.x, row[j], col[j]);
    q[j][0] = q[j][1] = make_uint4(0, 0, 0, 0);
    s[j] = 1.0f;
    if (row[j] < p.rows) {
      const size_t u = static_cast<size_t>(row[j]) * p.blocks_per_row + col[j];
      q[j][0] = __ldcs(p.in + 2 * u);
      q[j][1] = __ldcs(p.in + 2 * u + 1);
      s[j] = __ldg(p.in_scale + static_cast<size_t>(col[j] / 4) * p.rows + row[j]);
    }
  }
  __syncthreads();  // s_theta

#pragma unroll
  for (int j = 0; j < kUnits; ++j) {
    const uint32_t w0[4] = {q[j][0].x, q[j][0].y, q[j][0].z, q[j][0].w};
    const uint32_t w1[4] = {q[j][1].x, q[j][1].y, q[j][1].z, q[j][1].w};
    int t;
    const bool exact = mx::e4m3_scale_exact(s[j], t);
    const uint32_t key = max(mx::fp8_half_key(w0, s[j], exact), mx::fp8_half_key(w1, s[j], exact));
    int x = 0;
    const bool finite = mx::fp8_block_exponent(key, s[j], exact, x);
    uint32_t out[4] = {0, 0, 0, 0};
    if (kSr && finite) {
      const uint64_t index0 = (static_cast<uint64_t>(row[j]) * p.blocks_per_row + col[j]) * 32;
#pragma unroll 4
      for (int i = 0; i < 32; ++i) {
        const uint32_t word = i < 16 ? w0[i / 4] : w1[(i - 16) / 4];
        const float v = fmt::e4m3_to_f32(static_cast<uint8_t>(word >> (8 * (i % 4)))) * s[j];
        const uint32_t code =
            fmt::e2m1_from_f32_sr(fmt::mul_pow2(v, -x), fmt::sr_bits(p.seed, index0 + i));
        out[i / 8] |= code << (4 * (i % 8));
      }
    } else if (finite) {
      const uint32_t* th = s_theta[mx::fp8_theta_row(t, x)];
      mx::fp8_half_encode(w0, s[j], exact, x, th, out);
      mx::fp8_half_encode(w1, s[j], exact, x, th, out + 2);
    }
    if (row[j] < p.rows) {
      const size_t u = static_cast<size_t>(row[j]) * p.blocks_per_row + col[j];
      __stcs(p.out + u, make_uint4(out[0], out[1], out[2], out[3]));
      p.out_scale[u] = finite ? fmt::e8m0_from_exponent(x) : fmt::kE8M0NaN;
    }
  }
}

// F32 / BF16 element access for the quantizer: 16 elements per unit as 4 (F32) or 2 (BF16) uint4.
template <typename T>
struct UnitLoad;
template <>
struct UnitLoad<float> {
  static constexpr int kVecs = 4;
  __device__ static float get(const uint4* v, int i) {
    const uint32_t* w = reinterpret_cast<const uint32_t*>(v);
    return __uint_as_float(w[i]);
  }
};
template <>
struct UnitLoad<uint16_t> {
  static constexpr int kVecs = 2;
  __device__ static float get(const uint4* v, int i) {
    const uint32_t* w = reinterpret_cast<const uint32_t*>(v);
    return __uint_as_float((i & 1) ? (w[i / 2] & 0xFFFF0000u) : (w[i / 2] << 16));
  }
};

template <typename T, int kUnits>
__global__ void __launch_bounds__(kToMxThreads)
    sm90_quantize_mxfp4(const __grid_constant__ QuantizeMxParams<T> p) {
  using L = UnitLoad<T>;
  const UnitCursor cur(p.div_units, p.units_per_row, kToMxThreads * kUnits);
  uint4 v[kUnits][L::kVecs];
  uint32_t row[kUnits], col[kUnits];
#pragma unroll
  for (int j = 0; j < kUnits; ++j) {
    cur.at(p.div_units, p.units_per_row, j * kToMxThreads + threadIdx.x, row[j], col[j]);
    const uint4* src = reinterpret_cast<const uint4*>(p.in) +
                       (static_cast<size_t>(row[j]) * p.units_per_row + col[j]) * L::kVecs;
#pragma unroll
    for (int i = 0; i < L::kVecs; ++i)
      v[j][i] = row[j] < p.rows ? __ldcs(src + i) : make_uint4(0, 0, 0, 0);
  }

#pragma unroll
  for (int j = 0; j < kUnits; ++j) {
    // Key: the largest |x| as bits; NaN and Inf have the largest bits, so key >= Inf flags the
    // block as NaN. Otherwise it is the finite amax.
    uint32_t key = 0;
    if constexpr (L::kVecs == 2) {  // BF16: 16-bit lanes
      key = mx::max_bf16_magnitude(reinterpret_cast<const uint32_t*>(v[j])) << 16;
    } else {
#pragma unroll
      for (int i = 0; i < 16; ++i) key = max(key, __float_as_uint(L::get(v[j], i)) & 0x7FFFFFFFu);
    }
    key = max(key, __shfl_xor_sync(0xFFFFFFFFu, key, 1));
    const bool finite = key < 0x7F800000u;
    const int x = fmt::mx_shared_exponent(__uint_as_float(key));
    uint32_t out[2] = {0, 0};
    if (L::kVecs == 2 && finite && x >= mx::kBf16MinX) {
      // BF16 lane pairs (kernels/mxfp4_tables.h): ~8 instructions per element instead of ~16.
      uint32_t cst[7];
      mx::bf16_e2m1_consts(p.bf.base, x, cst);
      const uint32_t* w = reinterpret_cast<const uint32_t*>(v[j]);
      uint32_t b[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) b[i] = mx::bf16x2_to_e2m1x2(w[i], cst);
      out[0] = mx::prmt(mx::prmt(b[0], b[1], 0x0040), mx::prmt(b[2], b[3], 0x0040), 0x5410);
      out[1] = mx::prmt(mx::prmt(b[4], b[5], 0x0040), mx::prmt(b[6], b[7], 0x0040), 0x5410);
    } else if (finite) {
      const float down = fmt::exp2i(-x);
#pragma unroll
      for (int i = 0; i < 16; ++i)
        out[i / 8] |= mx::quantize_e2m1(L::get(v[j], i), down, p.th.th) << (4 * (i % 8));
    }
    if (row[j] < p.rows) {
      const size_t u = static_cast<size_t>(row[j]) * p.units_per_row + col[j];
      __stcs(p.out + u, make_uint2(out[0], out[1]));
      if ((threadIdx.x & 1) == 0)
        p.out_scale[u / 2] = finite ? fmt::e8m0_from_exponent(x) : fmt::kE8M0NaN;
    }
  }
}

}  // namespace fp8flow::sm90
