// GPU-only, DISABLED_ by default (run with --gtest_also_run_disabled_tests):
//  - GemmProbe.DISABLED_CublasLtBlockScaling: what cuBLASLt 13.x accepts for block-scaled FP8 on
//    this GPU (scale-mode pairs, transposes, FP32 out with beta = 1, odd sizes, the stride of each
//    scale tensor), each supported case checked against an FP64 reference. Prints a table.
//  - GemmBench.DISABLED_Perf: the grouped GEMMs at the DeepSeek-V3 shard shape (32 experts x 1024
//    rows, H 7168, F 2048; balanced and skewed routing) against the same API with one expert
//    (= dense cuBLASLt at the same total rows), FP8 and BF16, 1 and 4 streams. Prints TFLOP/s.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "common/test_util.h"
#include "fp8flow/gemm.h"

#if FP8FLOW_WITH_CUDA
#include <cublasLt.h>
#include <cuda_runtime.h>

namespace fp8flow::test {
namespace {

#define CK(x) ASSERT_EQ((x), cudaSuccess) << #x

// ------------------------------------------------------------------------------------------
// Probe.

struct ProbeCase {
  const char* name;
  cublasOperation_t ta, tb;
  int64_t m, n, k;
  int32_t a_mode, b_mode;  // 4 = VEC128_32F, 5 = BLK128x128_32F
  cudaDataType_t a_type, b_type, d_type;
  bool beta_one;
  int64_t a_sstride, b_sstride;  // assumed scale-tensor stride (see scale_index)
  bool heuristic_only = false;   // big shapes: only ask the heuristic, no run / reference
  uint32_t align = 256;          // CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_{A,B,C,D}_BYTES
  bool no_reduction = false;     // CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK = NONE
};

// Hypothesis under test. VEC128 on an operand with contraction k and outer size o: scale of
// (kk, i) at (kk / 128) * stride + i. BLK128x128: at (i / 128) * stride + kk / 128.
int64_t scale_index(int32_t mode, int64_t kk, int64_t i, int64_t stride) {
  return mode == CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F ? (kk / 128) * stride + i
                                                         : (i / 128) * stride + kk / 128;
}
int64_t scale_count(int32_t mode, int64_t k, int64_t o, int64_t stride) {
  return mode == CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F ? ((k + 127) / 128) * stride
                                                         : ((o + 127) / 128) * stride;
}

float fp8_value(cudaDataType_t t, uint8_t c) {
  return t == CUDA_R_8F_E4M3 ? fmt::e4m3_to_f32(c) : fmt::e5m2_to_f32(c);
}

void set_prefs(cublasLtMatmulPreference_t pref, const ProbeCase& c, uint64_t ws) {
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws,
                                       sizeof(ws));
  for (auto a :
       {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES})
    cublasLtMatmulPreferenceSetAttribute(pref, a, &c.align, sizeof(c.align));
  if (c.no_reduction) {
    const uint32_t none = CUBLASLT_REDUCTION_SCHEME_NONE;
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &none,
                                         sizeof(none));
  }
}

// Heuristic only (no data): how many algorithms, and whether the best splits K.
std::string probe_heuristic(const ProbeCase& c) {
  char line[512];
  void* dummy = nullptr;
  cudaMalloc(&dummy, 1 << 20);
  cublasLtHandle_t lt;
  cublasLtCreate(&lt);
  cublasLtMatmulDesc_t desc;
  cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F);
  cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &c.ta, sizeof(c.ta));
  cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &c.tb, sizeof(c.tb));
  cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &c.a_mode,
                                 sizeof(int32_t));
  cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &c.b_mode,
                                 sizeof(int32_t));
  cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &dummy, sizeof(dummy));
  cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &dummy, sizeof(dummy));
  cublasLtMatrixLayout_t la, lb, ld;
  const int64_t lda = c.ta == CUBLAS_OP_T ? c.k : c.m, ldb = c.tb == CUBLAS_OP_N ? c.k : c.n;
  cublasLtMatrixLayoutCreate(&la, c.a_type, c.ta == CUBLAS_OP_N ? c.m : c.k,
                             c.ta == CUBLAS_OP_N ? c.k : c.m, lda);
  cublasLtMatrixLayoutCreate(&lb, c.b_type, c.tb == CUBLAS_OP_N ? c.k : c.n,
                             c.tb == CUBLAS_OP_N ? c.n : c.k, ldb);
  cublasLtMatrixLayoutCreate(&ld, c.d_type, c.m, c.n, c.m);
  cublasLtMatmulPreference_t pref;
  cublasLtMatmulPreferenceCreate(&pref);
  set_prefs(pref, c, uint64_t{8} << 20);
  cublasLtMatmulHeuristicResult_t res[8] = {};
  int count = 0;
  const cublasStatus_t st =
      cublasLtMatmulAlgoGetHeuristic(lt, desc, la, lb, ld, ld, pref, 8, res, &count);
  int32_t sk = 0;
  uint32_t red = 0;
  size_t w = 0;
  if (count > 0) {
    cublasLtMatmulAlgoConfigGetAttribute(&res[0].algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &sk,
                                         sizeof sk, &w);
    cublasLtMatmulAlgoConfigGetAttribute(&res[0].algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &red,
                                         sizeof red, &w);
  }
  std::snprintf(
      line, sizeof line, "%-46s align %u%s: status %d, %d algos; best splitK %d reduction %u",
      c.name, c.align, c.no_reduction ? " no-reduction" : "", static_cast<int>(st), count, sk, red);
  cublasLtMatmulPreferenceDestroy(pref);
  cublasLtMatrixLayoutDestroy(la);
  cublasLtMatrixLayoutDestroy(lb);
  cublasLtMatrixLayoutDestroy(ld);
  cublasLtMatmulDescDestroy(desc);
  cublasLtDestroy(lt);
  cudaFree(dummy);
  return line;
}

std::string probe_one(const ProbeCase& c) {
  char line[512];
  std::mt19937 rng(1234);
  const int64_t m = c.m, n = c.n, k = c.k;
  if (c.heuristic_only) return probe_heuristic(c);
  // A is op(A) m x k; stored col-major (k x m, ld k) when transposed, (m x k, ld m) otherwise.
  std::vector<uint8_t> A(static_cast<size_t>(m * k)), B(static_cast<size_t>(k * n));
  auto code = [&] { return static_cast<uint8_t>((rng() & 0x80u) | (rng() % 0x60u)); };
  for (auto& v : A) v = code();
  for (auto& v : B) v = code();
  std::vector<float> sa(static_cast<size_t>(scale_count(c.a_mode, k, m, c.a_sstride))),
      sb(static_cast<size_t>(scale_count(c.b_mode, k, n, c.b_sstride)));
  for (auto& v : sa) v = std::ldexp(1.f, static_cast<int>(rng() % 9) - 4);
  for (auto& v : sb) v = std::ldexp(1.f, static_cast<int>(rng() % 9) - 4);
  const int64_t lda = c.ta == CUBLAS_OP_T ? k : m, ldb = c.tb == CUBLAS_OP_N ? k : n;
  auto a_at = [&](int64_t i, int64_t kk) {
    return c.ta == CUBLAS_OP_T ? A[static_cast<size_t>(i * k + kk)]
                               : A[static_cast<size_t>(i + kk * m)];
  };
  auto b_at = [&](int64_t kk, int64_t j) {
    return c.tb == CUBLAS_OP_N ? B[static_cast<size_t>(kk + j * k)]
                               : B[static_cast<size_t>(j + kk * n)];
  };
  std::vector<float> C0(static_cast<size_t>(m * n));
  for (auto& v : C0) v = static_cast<float>(static_cast<int>(rng() % 200) - 100);
  std::vector<double> want(static_cast<size_t>(m * n));
  for (int64_t j = 0; j < n; ++j)
    for (int64_t i = 0; i < m; ++i) {
      double acc = c.beta_one ? C0[static_cast<size_t>(i + j * m)] : 0.0;
      for (int64_t kk = 0; kk < k; ++kk)
        acc += static_cast<double>(fp8_value(c.a_type, a_at(i, kk))) *
               sa[static_cast<size_t>(scale_index(c.a_mode, kk, i, c.a_sstride))] *
               static_cast<double>(fp8_value(c.b_type, b_at(kk, j))) *
               sb[static_cast<size_t>(scale_index(c.b_mode, kk, j, c.b_sstride))];
      want[static_cast<size_t>(i + j * m)] = acc;
    }
  const size_t dsz = c.d_type == CUDA_R_32F ? 4 : 2;
  void *dA, *dB, *dD, *dsa, *dsb, *ws;
  const size_t ws_bytes = size_t{32} << 20;
  cudaMalloc(&dA, A.size());
  cudaMalloc(&dB, B.size());
  cudaMalloc(&dD, static_cast<size_t>(m * n) * dsz);
  cudaMalloc(&dsa, sa.size() * 4);
  cudaMalloc(&dsb, sb.size() * 4);
  cudaMalloc(&ws, ws_bytes);
  cudaMemcpy(dA, A.data(), A.size(), cudaMemcpyHostToDevice);
  cudaMemcpy(dB, B.data(), B.size(), cudaMemcpyHostToDevice);
  cudaMemcpy(dsa, sa.data(), sa.size() * 4, cudaMemcpyHostToDevice);
  cudaMemcpy(dsb, sb.data(), sb.size() * 4, cudaMemcpyHostToDevice);
  if (c.d_type == CUDA_R_32F) {
    cudaMemcpy(dD, C0.data(), C0.size() * 4, cudaMemcpyHostToDevice);
  } else {
    std::vector<uint16_t> h(C0.size());
    for (size_t i = 0; i < h.size(); ++i) h[i] = fmt::bf16_from_f32(C0[i]);
    cudaMemcpy(dD, h.data(), h.size() * 2, cudaMemcpyHostToDevice);
  }
  cublasLtHandle_t lt;
  cublasLtCreate(&lt);
  cublasLtMatmulDesc_t desc;
  cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F);
  cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &c.ta, sizeof(c.ta));
  cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &c.tb, sizeof(c.tb));
  cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &c.a_mode,
                                 sizeof(int32_t));
  cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &c.b_mode,
                                 sizeof(int32_t));
  cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &dsa, sizeof(dsa));
  cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &dsb, sizeof(dsb));
  cublasLtMatrixLayout_t la, lb, ld;
  cublasLtMatrixLayoutCreate(&la, c.a_type, c.ta == CUBLAS_OP_N ? m : k,
                             c.ta == CUBLAS_OP_N ? k : m, lda);
  cublasLtMatrixLayoutCreate(&lb, c.b_type, c.tb == CUBLAS_OP_N ? k : n,
                             c.tb == CUBLAS_OP_N ? n : k, ldb);
  cublasLtMatrixLayoutCreate(&ld, c.d_type, m, n, m);
  cublasLtMatmulPreference_t pref;
  cublasLtMatmulPreferenceCreate(&pref);
  const uint64_t wsb = ws_bytes;
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsb,
                                       sizeof(wsb));
  cublasLtMatmulHeuristicResult_t res[8] = {};
  int count = 0;
  const cublasStatus_t hst =
      cublasLtMatmulAlgoGetHeuristic(lt, desc, la, lb, ld, ld, pref, 8, res, &count);
  std::string out;
  if (hst != CUBLAS_STATUS_SUCCESS || count == 0) {
    std::snprintf(line, sizeof line, "%-46s heuristic: status %d, %d algos -> NOT SUPPORTED",
                  c.name, static_cast<int>(hst), count);
    out = line;
  } else {
    int red_nonzero = 0, splitk_gt1 = 0;
    for (int i = 0; i < count; ++i) {
      uint32_t red = 0;
      int32_t sk = 1;
      size_t w = 0;
      cublasLtMatmulAlgoConfigGetAttribute(&res[i].algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME,
                                           &red, sizeof red, &w);
      cublasLtMatmulAlgoConfigGetAttribute(&res[i].algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &sk,
                                           sizeof sk, &w);
      red_nonzero += red != 0;
      splitk_gt1 += sk > 1;
    }
    const float one = 1.f, zero = 0.f;
    const cublasStatus_t rst =
        cublasLtMatmul(lt, desc, &one, dA, la, dB, lb, c.beta_one ? &one : &zero, dD, ld, dD, ld,
                       &res[0].algo, ws, ws_bytes, nullptr);
    const cudaError_t sync = cudaDeviceSynchronize();
    double err = 0, nrm = 0;
    if (rst == CUBLAS_STATUS_SUCCESS && sync == cudaSuccess) {
      std::vector<uint8_t> h(static_cast<size_t>(m * n) * dsz);
      cudaMemcpy(h.data(), dD, h.size(), cudaMemcpyDeviceToHost);
      for (int64_t i = 0; i < m * n; ++i) {
        double g;
        if (c.d_type == CUDA_R_32F)
          g = reinterpret_cast<float*>(h.data())[i];
        else
          g = fmt::bf16_to_f32(reinterpret_cast<uint16_t*>(h.data())[i]);
        err += (g - want[static_cast<size_t>(i)]) * (g - want[static_cast<size_t>(i)]);
        nrm += want[static_cast<size_t>(i)] * want[static_cast<size_t>(i)];
      }
    }
    std::snprintf(line, sizeof line,
                  "%-46s heuristic ok (%d algos, %d with reduction, %d split-K), run %d/%s, "
                  "rel err %.3g (%s), ws %zu",
                  c.name, count, red_nonzero, splitk_gt1, static_cast<int>(rst),
                  cudaGetErrorString(sync), std::sqrt(err / std::max(nrm, 1e-300)),
                  std::sqrt(err / std::max(nrm, 1e-300)) < 1e-2 ? "MATCHES hypothesis" : "WRONG",
                  res[0].workspaceSize);
    out = line;
  }
  cublasLtMatmulPreferenceDestroy(pref);
  cublasLtMatrixLayoutDestroy(la);
  cublasLtMatrixLayoutDestroy(lb);
  cublasLtMatrixLayoutDestroy(ld);
  cublasLtMatmulDescDestroy(desc);
  cublasLtDestroy(lt);
  cudaFree(dA);
  cudaFree(dB);
  cudaFree(dD);
  cudaFree(dsa);
  cudaFree(dsb);
  cudaFree(ws);
  (void)cudaGetLastError();
  return out;
}

TEST(GemmProbe, DISABLED_CublasLtBlockScaling) {
  FP8FLOW_REQUIRE_GPU();
  std::printf("cuBLASLt version %zu\n", cublasLtGetVersion());
  constexpr int32_t V = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
  constexpr int32_t B = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F;
  const auto E4 = CUDA_R_8F_E4M3, E5 = CUDA_R_8F_E5M2, BF = CUDA_R_16BF, F32 = CUDA_R_32F;
  const auto T = CUBLAS_OP_T, N = CUBLAS_OP_N;
  const ProbeCase cases[] = {
      // fprop shape: A = weight (2D), B = activation (1D), TN.
      {"TN 2Dx1D k=256 wscale stride 4 (padded)", T, N, 384, 256, 256, B, V, E4, E4, BF, false, 4,
       256},
      {"TN 2Dx1D k=256 wscale stride 2 (unpadded)", T, N, 384, 256, 256, B, V, E4, E4, BF, false, 2,
       256},
      {"TN 2Dx1D k=640 wscale stride 8 (padded)", T, N, 256, 128, 640, B, V, E4, E4, BF, false, 8,
       128},
      {"TN 2Dx1D k=640 wscale stride 5 (unpadded)", T, N, 256, 128, 640, B, V, E4, E4, BF, false, 5,
       128},
      {"TN 2Dx1D k=1024 (kb=8)", T, N, 512, 256, 1024, B, V, E4, E4, BF, false, 8, 256},
      {"TN 2Dx1D k=208 (partial K block)", T, N, 336, 128, 208, B, V, E4, E4, BF, false, 4, 128},
      {"TN 2Dx1D n=136 (n%8==0, n%16!=0)", T, N, 384, 136, 256, B, V, E4, E4, BF, false, 4, 136},
      {"TN 2Dx1D n=130 (n%8!=0)", T, N, 384, 130, 256, B, V, E4, E4, BF, false, 4, 130},
      {"TN 2Dx1D n=130, act scale stride 132", T, N, 384, 130, 256, B, V, E4, E4, BF, false, 4,
       132},
      {"TN 2Dx1D m=200 (m%16!=0)", T, N, 200, 256, 256, B, V, E4, E4, BF, false, 4, 256},
      {"TN 2Dx1D F32 out beta=0", T, N, 384, 256, 256, B, V, E4, E4, F32, false, 4, 256},
      {"TN 2Dx1D F32 out beta=1", T, N, 384, 256, 256, B, V, E4, E4, F32, true, 4, 256},
      {"TN 2Dx1D BF16 out beta=1", T, N, 384, 256, 256, B, V, E4, E4, BF, true, 4, 256},
      {"TN 2Dx1D A E4M3 x B E5M2", T, N, 384, 256, 256, B, V, E4, E5, BF, false, 4, 256},
      {"TN 2Dx1D A E5M2 x B E4M3", T, N, 384, 256, 256, B, V, E5, E4, BF, false, 4, 256},
      {"TN 1Dx2D (A activation, B weight)", T, N, 256, 384, 256, V, B, E4, E4, BF, false, 256, 4},
      // wgrad shape: both 1D along the token contraction.
      {"TN 1Dx1D k=144 (wgrad)", T, N, 256, 384, 144, V, V, E4, E4, BF, false, 256, 384},
      {"TN 1Dx1D k=144 F32 beta=1 (wgrad acc)", T, N, 256, 384, 144, V, V, E4, E4, F32, true, 256,
       384},
      {"TN 1Dx1D k=16 (wgrad, tiny expert)", T, N, 256, 384, 16, V, V, E4, E4, BF, false, 256, 384},
      {"TN 2Dx2D", T, N, 384, 256, 256, B, B, E4, E4, BF, false, 4, 4},
      // dgrad without a transposed copy: A = W [N][K] read as is (NN), or NT.
      {"NN 2Dx1D (dgrad on untransposed W)", N, N, 384, 256, 256, B, V, E4, E4, BF, false, 4, 256},
      {"TT 2Dx1D", T, T, 384, 256, 256, B, V, E4, E4, BF, false, 4, 256},
      {"NT 1Dx1D", N, T, 256, 384, 256, V, V, E4, E4, BF, false, 256, 384},
  };
  for (const ProbeCase& c : cases) std::printf("PROBE %s\n", probe_one(c).c_str());
  // Which preference makes the heuristic give up at small n (seen: m=4096 n=240 k=7168)?
  for (int64_t n : {240, 224, 128, 64, 16, 256}) {
    for (uint32_t align : {16u, 256u})
      for (bool none : {false, true}) {
        const std::string nm = "heur FC1 fprop m4096 k7168 n=" + std::to_string(n);
        ProbeCase c{nm.c_str(), T,  N,     4096, n, 7168, B,     V,   E4,
                    E4,         BF, false, 56,   n, true, align, none};
        std::printf("PROBE %s\n", probe_one(c).c_str());
      }
  }
  for (int64_t n : {240, 112, 16}) {
    const std::string nm = "heur FC2 fprop m7168 k2048 n=" + std::to_string(n);
    ProbeCase c{nm.c_str(), T, N, 7168, n, 2048, B, V, E4, E4, BF, false, 16, n, true, 256, true};
    std::printf("PROBE %s\n", probe_one(c).c_str());
    const std::string nm2 = "heur FC1 wgrad m7168 n4096 k=" + std::to_string(n);
    ProbeCase c2{nm2.c_str(), T,   N,    7168, 4096, n,    V,  V,   E4,
                 E4,          F32, true, 7168, 4096, true, 16, true};
    std::printf("PROBE %s\n", probe_one(c2).c_str());
  }
}

// ------------------------------------------------------------------------------------------
// Benchmark.

struct DevBuf {
  void* p = nullptr;
  size_t n = 0;
  explicit DevBuf(size_t bytes) : n(bytes) {
    EXPECT_EQ(cudaMalloc(&p, bytes ? bytes : 1), cudaSuccess);
  }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  ~DevBuf() { cudaFree(p); }
};

// Random FP8 codes (no NaN, moderate range) or BF16 values in [-2, 2], tiled from a 16 MiB chunk.
void fill_random(void* p, size_t bytes, bool bf16, uint64_t seed) {
  static std::vector<uint8_t> fp8_chunk, bf16_chunk;
  std::vector<uint8_t>& chunk = bf16 ? bf16_chunk : fp8_chunk;
  if (chunk.empty()) {
    chunk.resize(size_t{16} << 20);
    std::mt19937_64 rng(seed);
    if (bf16) {
      auto* h = reinterpret_cast<uint16_t*>(chunk.data());
      for (size_t i = 0; i < chunk.size() / 2; ++i)
        h[i] = static_cast<uint16_t>((rng() & 0x807Fu) | 0x3F00u | ((rng() & 1u) << 7));
    } else {
      for (auto& b : chunk) b = static_cast<uint8_t>((rng() & 0x80u) | (rng() % 0x70u));
    }
  }
  for (size_t off = 0; off < bytes; off += chunk.size())
    EXPECT_EQ(cudaMemcpy(static_cast<uint8_t*>(p) + off, chunk.data(),
                         std::min(chunk.size(), bytes - off), cudaMemcpyHostToDevice),
              cudaSuccess);
}

void fill_ones(void* p, size_t floats) {
  std::vector<float> h(floats, 1.0f);
  EXPECT_EQ(cudaMemcpy(p, h.data(), floats * 4, cudaMemcpyHostToDevice), cudaSuccess);
}

template <typename F>
double time_ms(F&& f, cudaStream_t s, int iters = 10) {
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  f();
  f();
  cudaEventRecord(a, s);
  for (int i = 0; i < iters; ++i) f();
  cudaEventRecord(b, s);
  cudaEventSynchronize(b);
  float ms = 0;
  cudaEventElapsedTime(&ms, a, b);
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return ms / iters;
}

std::vector<int64_t> balanced(int E, int64_t rows) {
  return std::vector<int64_t>(static_cast<size_t>(E), rows);
}

// Skewed routing: Zipf-like weights 1/(e+1)^1.2, sizes multiples of 16, same total.
std::vector<int64_t> skewed(int E, int64_t total) {
  std::vector<double> w(static_cast<size_t>(E));
  for (int e = 0; e < E; ++e) w[static_cast<size_t>(e)] = 1.0 / std::pow(e + 1.0, 1.2);
  const double sum = std::accumulate(w.begin(), w.end(), 0.0);
  std::vector<int64_t> s(static_cast<size_t>(E));
  int64_t used = 0;
  for (int e = 1; e < E; ++e) {
    s[static_cast<size_t>(e)] =
        static_cast<int64_t>(w[static_cast<size_t>(e)] / sum * total) / 16 * 16;
    used += s[static_cast<size_t>(e)];
  }
  s[0] = total - used;
  return s;
}

TEST(GemmBench, DISABLED_Perf) {
  FP8FLOW_REQUIRE_GPU();
  const int E = 32;
  const int64_t M = 32768, H = 7168, F = 2048;
  cudaStream_t st;
  CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  // Largest operands: activations [M][H], weights E x [2F][H], outputs [M][H] BF16, F32 grads.
  const size_t act_n = static_cast<size_t>(M * H), w_n = static_cast<size_t>(E) * 2 * F * H;
  DevBuf act(act_n), grad(act_n), wts(w_n);                    // FP8 codes
  DevBuf act16(act_n * 2), grad16(act_n * 2), wts16(w_n * 2);  // BF16
  DevBuf out(act_n * 2), dwb(w_n * 4);
  DevBuf sc_a(static_cast<size_t>(M) * (H / 128) * 4 * 2),
      sc_g(static_cast<size_t>(M) * (H / 128) * 4 * 2);
  DevBuf sc_w(static_cast<size_t>(E) * (2 * F / 128) * (H / 128) * 4);
  fill_random(act.p, act.n, false, 1);
  fill_random(grad.p, grad.n, false, 2);
  fill_random(wts.p, wts.n, false, 3);
  fill_random(act16.p, act16.n, true, 4);
  fill_random(grad16.p, grad16.n, true, 5);
  fill_random(wts16.p, wts16.n, true, 6);
  fill_ones(sc_a.p, sc_a.n / 4);
  fill_ones(sc_g.p, sc_g.n / 4);
  fill_ones(sc_w.p, sc_w.n / 4);
  const size_t ws_bytes = size_t{256} << 20;
  DevBuf wsb(ws_bytes);

  auto u8 = [](void* p, size_t off) { return static_cast<void*>(static_cast<uint8_t*>(p) + off); };
  struct Shape {
    const char* name;
    int64_t N, K;
  };
  const Shape shapes[] = {{"FC1 (N=2F=4096, K=H=7168)", 2 * F, H},
                          {"FC2 (N=H=7168, K=F=2048)", H, F}};
  std::printf(
      "GemmBench: TFLOP/s (ms), 32 experts x 1024 rows unless noted; dense = 1 expert, %lld rows\n",
      static_cast<long long>(M));
  for (const Shape& sh : shapes) {
    const int64_t N = sh.N, K = sh.K;
    const double flops = 2.0 * M * N * K;
    for (int variant = 0; variant < 3; ++variant) {
      const bool dense = variant == 2;
      const int ne = dense ? 1 : E;
      const std::vector<int64_t> splits =
          dense ? std::vector<int64_t>{M} : (variant == 0 ? balanced(E, M / E) : skewed(E, M));
      const char* vname = dense ? "dense" : (variant == 0 ? "balanced" : "skewed");
      for (int streams : {1, 4}) {
        if (dense && streams == 4) continue;
        const GroupedGemmOptions opt{.accumulate = false, .streams = streams};
        const Workspace ws{wsb.p, ws_bytes};
        // FP8 fprop: x [M][K], w_e [N][K], y [M][N].
        std::vector<ScaledTensor> w(static_cast<size_t>(ne)), wt(static_cast<size_t>(ne));
        std::vector<TensorView> wb(static_cast<size_t>(ne)), dw(static_cast<size_t>(ne));
        const int64_t nb = (N + 127) / 128, kb = (K + 127) / 128;
        for (int e = 0; e < ne; ++e) {
          const size_t eo = static_cast<size_t>(e) * N * K;
          w[e] = ScaledTensor{{u8(wts.p, eo), DType::E4M3, N, K, -1, Device::Cuda},
                              {u8(sc_w.p, static_cast<size_t>(e) * nb * kb * 4), DType::F32, nb, kb,
                               -1, Device::Cuda},
                              ScaleLayout::Block128x128};
          wt[e] = ScaledTensor{{u8(wts.p, eo), DType::E4M3, K, N, -1, Device::Cuda},
                               {u8(sc_w.p, static_cast<size_t>(e) * nb * kb * 4), DType::F32, kb,
                                nb, -1, Device::Cuda},
                               ScaleLayout::Block128x128};
          wb[e] = TensorView{u8(wts16.p, eo * 2), DType::BF16, N, K, -1, Device::Cuda};
          dw[e] = TensorView{u8(dwb.p, eo * 4), DType::F32, N, K, -1, Device::Cuda};
        }
        const ScaledTensor x{{act.p, DType::E4M3, M, K, -1, Device::Cuda},
                             {sc_a.p, DType::F32, kb, M, -1, Device::Cuda},
                             ScaleLayout::Rowwise1x128};
        const ScaledTensor dy{{grad.p, DType::E4M3, M, N, -1, Device::Cuda},
                              {sc_g.p, DType::F32, nb, M, -1, Device::Cuda},
                              ScaleLayout::Rowwise1x128};
        int64_t tiles = 0;
        for (int64_t s : splits) tiles += (s + 127) / 128;
        const ScaledTensor dy_t{{grad.p, DType::E4M3, N, M, -1, Device::Cuda},
                                {sc_g.p, DType::F32, tiles, N, -1, Device::Cuda},
                                ScaleLayout::Rowwise1x128,
                                splits};
        const ScaledTensor x_t{{act.p, DType::E4M3, K, M, -1, Device::Cuda},
                               {sc_a.p, DType::F32, tiles, K, -1, Device::Cuda},
                               ScaleLayout::Rowwise1x128,
                               splits};
        const TensorView y{out.p, DType::BF16, M, N, -1, Device::Cuda};
        const TensorView dx{out.p, DType::BF16, M, K, -1, Device::Cuda};
        std::vector<TensorView> dwb16(static_cast<size_t>(ne));
        for (int e = 0; e < ne; ++e)
          dwb16[e] = TensorView{
              u8(dwb.p, static_cast<size_t>(e) * N * K * 2), DType::BF16, N, K, -1, Device::Cuda};
        const double f8f = time_ms([&] { grouped_gemm_fprop(x, w, y, splits, ws, opt, st); }, st);
        // Host cost of enqueueing one grouped call (validation + per-expert launches), no sync.
        CK(cudaStreamSynchronize(st));
        const auto h0 = std::chrono::steady_clock::now();
        for (int i = 0; i < 5; ++i) grouped_gemm_fprop(x, w, y, splits, ws, opt, st);
        const double host_us =
            std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - h0)
                .count() /
            5;
        CK(cudaStreamSynchronize(st));
        // The same call captured into a CUDA graph and replayed (no host launch cost at all).
        double graph_ms = -1;
        {
          cudaGraph_t g = nullptr;
          cudaGraphExec_t ge = nullptr;
          if (cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal) == cudaSuccess) {
            bool ok = true;
            try {
              grouped_gemm_fprop(x, w, y, splits, ws, opt, st);
            } catch (const Error& e) {
              ok = false;
              std::printf("capture failed: %s\n", e.what());
            }
            const cudaError_t ec = cudaStreamEndCapture(st, &g);
            if (ok && ec == cudaSuccess && cudaGraphInstantiate(&ge, g, 0) == cudaSuccess)
              graph_ms = time_ms([&] { cudaGraphLaunch(ge, st); }, st);
            else
              std::printf("graph capture: %s\n", cudaGetErrorString(ec));
            if (ge) cudaGraphExecDestroy(ge);
            if (g) cudaGraphDestroy(g);
          }
          (void)cudaGetLastError();
        }
        const double f8d =
            time_ms([&] { grouped_gemm_dgrad(dy, wt, dx, splits, ws, opt, st); }, st);
        const double f8w =
            time_ms([&] { grouped_gemm_wgrad(dy_t, x_t, dwb16, splits, ws, opt, st); }, st);
        GroupedGemmOptions acc = opt;
        acc.accumulate = true;
        const double f8wa =
            time_ms([&] { grouped_gemm_wgrad(dy_t, x_t, dw, splits, ws, acc, st); }, st);
        const TensorView xb{act16.p, DType::BF16, M, K, -1, Device::Cuda};
        const TensorView dyb{grad16.p, DType::BF16, M, N, -1, Device::Cuda};
        const double bf =
            time_ms([&] { grouped_gemm_fprop_bf16(xb, wb, y, splits, ws, opt, st); }, st);
        const double bd =
            time_ms([&] { grouped_gemm_dgrad_bf16(dyb, wb, dx, splits, ws, opt, st); }, st);
        const double bw =
            time_ms([&] { grouped_gemm_wgrad_bf16(dyb, xb, dwb16, splits, ws, opt, st); }, st);
        auto tf = [&](double ms) { return flops / (ms * 1e9); };
        std::printf(
            "%-26s %-8s streams=%d | FP8 fprop %5.0f (%.3f; graph %5.0f; host enqueue %.0f us) "
            "dgrad %5.0f (%.3f) wgrad->BF16 %5.0f (%.3f) wgrad+=F32 %5.0f (%.3f) | BF16 fprop "
            "%4.0f "
            "(%.3f) dgrad %4.0f (%.3f) wgrad->BF16 %4.0f (%.3f)\n",
            sh.name, vname, streams, tf(f8f), f8f, graph_ms > 0 ? tf(graph_ms) : -1.0, host_us,
            tf(f8d), f8d, tf(f8w), f8w, tf(f8wa), f8wa, tf(bf), bf, tf(bd), bd, tf(bw), bw);
        std::fflush(stdout);
      }
    }
  }
  // transpose_block_weights over the 32 FC1 experts.
  {
    const int64_t N = 2 * F, K = H, nb = N / 128, kb = K / 128;
    DevBuf t_out(static_cast<size_t>(N * K)), t_sc(static_cast<size_t>(nb * kb) * 4);
    const double ms = time_ms(
        [&] {
          for (int e = 0; e < E; ++e) {
            const ScaledTensor w{
                {u8(wts.p, static_cast<size_t>(e) * N * K), DType::E4M3, N, K, -1, Device::Cuda},
                {u8(sc_w.p, static_cast<size_t>(e) * nb * kb * 4), DType::F32, nb, kb, -1,
                 Device::Cuda},
                ScaleLayout::Block128x128};
            const ScaledTensor t{{t_out.p, DType::E4M3, K, N, -1, Device::Cuda},
                                 {t_sc.p, DType::F32, kb, nb, -1, Device::Cuda},
                                 ScaleLayout::Block128x128};
            transpose_block_weights(w, t, st);
          }
        },
        st, 5);
    std::printf("transpose_block_weights 32 x [4096][7168]: %.3f ms, %.0f GB/s\n", ms,
                2.0 * E * N * K / (ms * 1e6));
  }
  CK(cudaStreamSynchronize(st));
  CK(cudaGetLastError());
  cudaStreamDestroy(st);
}

}  // namespace
}  // namespace fp8flow::test

#endif  // FP8FLOW_WITH_CUDA
