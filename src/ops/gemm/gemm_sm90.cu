// sm_90a backend of the grouped GEMMs: one cuBLASLt matmul per non-empty expert, spread over up
// to 8 internal streams (lanes) forked from and joined into the caller's stream with events.
// FP8: block-scaled, A = the 128x128-scaled weight (BLK128x128_32F) or, for wgrad, the 1x128-scaled
// X^T slice; B = the 1x128-scaled activation (VEC128_32F); TN layout, FP32 accumulation, BF16/F32
// out. BF16: plain cuBLASLt (TN fprop, NN dgrad, NT wgrad).
// Bench: fp8flow_tests --gtest_also_run_disabled_tests --gtest_filter='GemmBench*' (DeepSeek-V3
// shard: 32 experts x 1024 rows, H 7168, F 2048); fp8flow-bench ops once the lead wires it in.
// Napkin: FC1 fprop 2*32768*4096*7168 = 1.92 TFLOP, ~1.5 ms at the 1300 TFLOP/s cuBLASLt reaches
// on one expert-sized GEMM; the scale packing below moves 2 * 4 * ceil(K/128) * M bytes (7 MB at
// FC1, ~3 us), negligible.
//
// NOTES (cuBLASLt 13.1 on H200, measured with GemmProbe.DISABLED_CublasLtBlockScaling):
// - Block-scaled FP8 on Hopper is TN only (NN/TT/NT rejected), and the scale-mode pairs are
//   BLK128x128 x VEC128 (either operand order) and VEC128 x VEC128; BLK x BLK is rejected. So dgrad
//   needs a transposed weight copy (transpose_block_weights), and wgrad uses the 1x128-along-tokens
//   copies of dY and X. BF16 and F32 outputs, beta = 0 or 1 (accumulate), E4M3/E5M2 mixes work.
// - The 1x128 operand's outer size (n = the expert's rows here) must be a multiple of 8 (n = 130 is
//   rejected, 136 works); m and k only need 16-byte leading dimensions (m = 200, k = 208 work, with
//   partial 128-blocks handled).
// - cuBLASLt 13.1 has no grouped (ragged) matmul for block-scaled FP8 on Hopper (that arrives as
//   CUBLASLT_BATCH_MODE_GROUPED in 13.4), so each expert is its own matmul. Host cost: ~15 us per
//   expert (~0.45 ms per 32-expert call) against ~50 us of GPU time per expert at DeepSeek shapes,
//   so the launches run ahead of the GPU; a CUDA graph of the call replays at the same throughput.
//   The lanes let experts overlap their tail waves: +35% for FC2-shaped experts (short K), -2%
//   for FC1 fprop, so streams is an option (default 4). With many small experts (the `small`
//   layer config: 64 experts of ~450 rows) the step is host-bound on these calls, so each lane's
//   calls are issued by its own host thread (LaneThreads; GroupedGemmOptions::threaded_enqueue).
// - VEC128_32F scale tensors have no leading-dimension attribute: cuBLASLt reads [ceil(K/128)][n]
//   with stride n = the expert's row count. An expert's slice of the [ceil(K/128)][M] activation
//   scales therefore has the wrong stride and is repacked into the workspace (one small kernel for
//   all experts). wgrad needs no repacking: its scales [tiles][N] are per-expert row ranges.
// - BLK128x128_32F scale tensors are read with the K blocks padded to a multiple of 4 (probe:
//   stride 4 matches an FP64 reference at K = 256, stride 2 is wrong; same at K = 640); weights
//   with ceil(K/128) % 4 != 0 get a padded copy in the workspace (cudaMemcpy2DAsync per expert).
// - Determinism: plans (descriptor + algorithm) are cached per problem key (dims, leading dims,
//   types, scale modes, beta, and the 16..256-byte alignment class of the A/B/D pointers, which
//   the heuristic must respect); the algorithm never splits K (see select_algo), so there is no
//   cross-CTA reduction and each output element is summed by one CTA in a fixed order. With few
//   output tiles and a long K (e.g. m=4096 n<=240 k=7168) the heuristic only offers split-K
//   (splitK 2, COMPUTE_TYPE reduction): we then force SPLITK_NUM = 1 and validate with
//   cublasLtMatmulAlgoCheck.
// - GroupedGemmOptions::algo > 0 picks another of the heuristic's (up to 16) split-K-free results
//   (select_algo_index), for tuning: the FP8 wgrad with F32 out at the DeepSeek-V3 shard runs the
//   heuristic's first choice at ~422 TFLOP/s, ~3x off its floors. algo is part of the plan key.
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <compare>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <functional>
#include <map>
#include <mutex>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "common/cuda_check.h"
#include "ops/gemm/gemm_backends.h"
#include "ops/gemm/own_fprop.h"
#include "ops/gemm/own_wgrad.h"

namespace fp8flow::sm90 {
namespace {

using detail::cat;
using detail::ceil_div;
using detail::kLaneWorkspaceBytes;
using detail::kMaxLanes;

const char* lt_status_name(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS:
      return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED:
      return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED:
      return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE:
      return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH:
      return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR:
      return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED:
      return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR:
      return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED:
      return "CUBLAS_STATUS_NOT_SUPPORTED";
    default:
      return "cublasStatus (other)";
  }
}

#define FP8FLOW_LT_CHECK(op, expr)                                           \
  do {                                                                       \
    const cublasStatus_t fp8flow_st_ = (expr);                               \
    if (fp8flow_st_ != CUBLAS_STATUS_SUCCESS)                                \
      ::fp8flow::detail::throw_error(                                        \
          ::fp8flow::ErrorKind::Cuda,                                        \
          ::fp8flow::detail::cat("fp8flow::", op, ": ", #expr,               \
                                 " failed: ", lt_status_name(fp8flow_st_))); \
  } while (0)

cudaDataType_t cuda_type(DType d) {
  switch (d) {
    case DType::F32:
      return CUDA_R_32F;
    case DType::BF16:
      return CUDA_R_16BF;
    case DType::E4M3:
      return CUDA_R_8F_E4M3;
    case DType::E5M2:
      return CUDA_R_8F_E5M2;
    default:
      return CUDA_R_32F;  // unreachable: validated
  }
}

constexpr int32_t kNoScale = -1;

// One cuBLASLt problem: everything the descriptor, layouts and algorithm depend on.
struct LtKey {
  int32_t device = 0;
  int32_t a_type = 0, b_type = 0, d_type = 0;
  int32_t a_scale = kNoScale, b_scale = kNoScale;  // cublasLtMatmulMatrixScale_t or kNoScale
  int32_t transa = 0, transb = 0;
  int64_t m = 0, n = 0, k = 0, lda = 0, ldb = 0, ldd = 0;
  int32_t accumulate = 0;
  // Alignment (bytes, 16..256) of the A, B and D pointers: the heuristic may only pick algorithms
  // that are valid for these (CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_*).
  int32_t a_align = 16, b_align = 16, d_align = 16;
  int32_t algo = 0;  // GroupedGemmOptions::algo: index into the heuristic's results
  auto operator<=>(const LtKey&) const = default;
};

int32_t ptr_align(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  int32_t al = 256;
  while (al > 16 && a % static_cast<uintptr_t>(al) != 0) al >>= 1;
  return al;
}

struct LtPlan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulAlgo_t algo{};
  size_t workspace = 0;
  const char* how = "";  // which selection step found the algorithm (see select_algo)
  std::string summary;   // shape and algorithm config (grouped_gemm_last_algos)
};

void destroy_plan(LtPlan& p) {
  if (p.d) cublasLtMatrixLayoutDestroy(p.d);
  if (p.b) cublasLtMatrixLayoutDestroy(p.b);
  if (p.a) cublasLtMatrixLayoutDestroy(p.a);
  if (p.desc) cublasLtMatmulDescDestroy(p.desc);
  p = LtPlan{};
}

struct LtJob {
  LtKey key;
  const void* a = nullptr;
  const void* b = nullptr;
  void* d = nullptr;
  const void* a_scale = nullptr;
  const void* b_scale = nullptr;
  double flops = 0;
  LtPlan* plan = nullptr;
};

// Host threads that enqueue lanes 1..kMaxLanes-1 of a call while the caller enqueues lane 0
// (cuBLASLt's host cost, ~11-17 us per expert on an H100 host, bounds steps with many small
// experts). Fork-join: run() hands every thread the same task and returns once all are done.
// Created on first use and never destroyed (detached threads parked on a condition variable).
class LaneThreads {
 public:
  explicit LaneThreads(int device) : device_(device) {
    for (int l = 1; l < kMaxLanes; ++l) std::thread([this, l] { loop(l); }).detach();
  }
  // task(l) for l in [0, lanes): l == 0 on the calling thread. Rethrows the first exception.
  void run(int lanes, const std::function<void(int)>& task) {
    {
      std::lock_guard<std::mutex> lk(m_);
      task_ = &task;
      lanes_ = lanes;
      pending_ = lanes - 1;
      err_ = nullptr;
      ++gen_;
    }
    work_.notify_all();
    std::exception_ptr mine;
    try {
      task(0);
    } catch (...) {
      mine = std::current_exception();
    }
    std::unique_lock<std::mutex> lk(m_);
    done_.wait(lk, [this] { return pending_ == 0; });
    task_ = nullptr;
    if (mine) std::rethrow_exception(mine);
    if (err_) std::rethrow_exception(err_);
  }

 private:
  void loop(int lane) {
    cudaSetDevice(device_);
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lk(m_);
    for (;;) {
      work_.wait(lk, [&] { return gen_ != seen; });
      seen = gen_;
      if (lane >= lanes_) continue;
      const std::function<void(int)>* task = task_;
      lk.unlock();
      std::exception_ptr e;
      try {
        (*task)(lane);
      } catch (...) {
        e = std::current_exception();
      }
      lk.lock();
      if (e && !err_) err_ = e;
      if (--pending_ == 0) done_.notify_one();
    }
  }
  int device_;
  std::mutex m_;
  std::condition_variable work_, done_;
  uint64_t gen_ = 0;
  int lanes_ = 0, pending_ = 0;
  const std::function<void(int)>* task_ = nullptr;
  std::exception_ptr err_;
};

// Threaded enqueue (above) is on unless FP8FLOW_GEMM_THREADS=0.
bool threads_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("FP8FLOW_GEMM_THREADS");
    return !(v && *v == '0');
  }();
  return on;
}

// Per-device state, created on first use and kept for the process lifetime (never destroyed, so
// no CUDA calls run during static destruction).
struct DeviceContext {
  bool ready = false;
  cublasLtHandle_t lt = nullptr;
  cudaStream_t lanes[kMaxLanes] = {};
  cudaEvent_t fork = nullptr;
  cudaEvent_t join[kMaxLanes] = {};
  std::map<LtKey, LtPlan> plans;
  std::string last;  // summaries of the latest call's plans (grouped_gemm_last_algos)
  // Threaded enqueue: a handle and plan copies per lane >= 1 (lane 0 uses lt and plans).
  LaneThreads* threads = nullptr;  // leaked on purpose
  cublasLtHandle_t lane_lt[kMaxLanes] = {};
  std::map<LtKey, LtPlan> lane_plans[kMaxLanes];
};

constexpr int kMaxDevices = 64;
constexpr size_t kMaxPlans = 4096;

// The calling thread's current device, checked against the per-device tables.
int current_device(const char* op) {
  int dev = 0;
  FP8FLOW_CUDA_CHECK(op, cudaGetDevice(&dev));
  if (dev < 0 || dev >= kMaxDevices)
    detail::throw_error(ErrorKind::Unsupported, cat("fp8flow::", op, ": device ", dev, ": at most ",
                                                    kMaxDevices, " devices"));
  return dev;
}

// One lock per device, held for a whole call: a call only touches its device's context (handle,
// plan caches, lanes, lane threads), so calls on different devices - a process with a thread per
// GPU, such as the expert-parallel layer's ranks in thread mode - never wait on each other. (One
// process-wide lock, as before session 10, coupled the ranks: a launch can block the host until
// its own GPU drains - under CUDA's default lazy module loading, the first launch of a kernel
// loads its module under the context lock and waits for the device's queued work - and if that
// work is an all-to-all waiting for a peer while this thread holds the lock the peer needs before
// it can issue its part, neither moves, and the communicator's watchdog, which needs the same
// context lock, cannot report it.)
std::mutex& gemm_mutex(int dev) {
  static std::mutex m[kMaxDevices];
  return m[dev];
}

DeviceContext* contexts() {
  static DeviceContext ctx[kMaxDevices];
  return ctx;
}

// Device dev's context (created on first use); the caller holds gemm_mutex(dev).
DeviceContext& device_context(const char* op, int dev) {
  DeviceContext& c = contexts()[dev];
  if (!c.ready) {
    FP8FLOW_LT_CHECK(op, cublasLtCreate(&c.lt));
    for (int i = 0; i < kMaxLanes; ++i) {
      FP8FLOW_CUDA_CHECK(op, cudaStreamCreateWithFlags(&c.lanes[i], cudaStreamNonBlocking));
      FP8FLOW_CUDA_CHECK(op, cudaEventCreateWithFlags(&c.join[i], cudaEventDisableTiming));
    }
    FP8FLOW_CUDA_CHECK(op, cudaEventCreateWithFlags(&c.fork, cudaEventDisableTiming));
    c.ready = true;
  }
  if (c.plans.size() >= kMaxPlans) {  // bound the cache; only reached with very varied shapes
    for (auto& kv : c.plans) destroy_plan(kv.second);
    c.plans.clear();
    for (auto& lp : c.lane_plans) {
      for (auto& kv : lp) destroy_plan(kv.second);
      lp.clear();
    }
  }
  return c;
}

// One call's hold on its current device: the device, its lock (held for the whole call) and its
// context.
struct DeviceCall {
  int dev;
  std::lock_guard<std::mutex> lock;
  DeviceContext& ctx;
  explicit DeviceCall(const char* op)
      : dev(current_device(op)), lock(gemm_mutex(dev)), ctx(device_context(op, dev)) {}
};

bool log_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("FP8FLOW_GEMM_LOG");
    return v && *v && *v != '0';
  }();
  return on;
}

template <typename T>
T algo_attr(const cublasLtMatmulAlgo_t& algo, cublasLtMatmulAlgoConfigAttributes_t attr) {
  T v{};
  size_t written = 0;
  if (cublasLtMatmulAlgoConfigGetAttribute(&algo, attr, &v, sizeof(v), &written) !=
      CUBLAS_STATUS_SUCCESS)
    return T{};
  return v;
}

void set_scale_pointers(const char* op, const LtPlan& p, const LtJob& j) {
  FP8FLOW_LT_CHECK(op, cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER,
                                                      &j.a_scale, sizeof(j.a_scale)));
  FP8FLOW_LT_CHECK(op, cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER,
                                                      &j.b_scale, sizeof(j.b_scale)));
}

bool non_split(const cublasLtMatmulAlgo_t& a) {
  return algo_attr<int32_t>(a, CUBLASLT_ALGO_CONFIG_SPLITK_NUM) <= 1 &&
         algo_attr<uint32_t>(a, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME) ==
             CUBLASLT_REDUCTION_SCHEME_NONE;
}

// Up to `max` (8 for the default selection) heuristic results for the plan's descriptors under
// `reduction_mask`.
int heuristic(cublasLtHandle_t lt, const LtKey& k, const LtPlan& p, uint32_t reduction_mask,
              cublasLtMatmulHeuristicResult_t* res, int max, cublasStatus_t& st) {
  cublasLtMatmulPreference_t pref = nullptr;
  st = cublasLtMatmulPreferenceCreate(&pref);
  if (st != CUBLAS_STATUS_SUCCESS) return 0;
  const uint64_t max_ws = kLaneWorkspaceBytes;
  const uint32_t al[4] = {static_cast<uint32_t>(k.a_align), static_cast<uint32_t>(k.b_align),
                          static_cast<uint32_t>(k.d_align), static_cast<uint32_t>(k.d_align)};
  st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &max_ws,
                                            sizeof(max_ws));
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                                              &reduction_mask, sizeof(reduction_mask));
  const cublasLtMatmulPreferenceAttributes_t attrs[4] = {
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
  for (int i = 0; i < 4 && st == CUBLAS_STATUS_SUCCESS; ++i)
    st = cublasLtMatmulPreferenceSetAttribute(pref, attrs[i], &al[i], sizeof(al[i]));
  int count = 0;
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatmulAlgoGetHeuristic(lt, p.desc, p.a, p.b, p.d, p.d, pref, max, res, &count);
  cublasLtMatmulPreferenceDestroy(pref);
  return st == CUBLAS_STATUS_SUCCESS ? count : 0;
}

// The algorithm of a plan: always one without split-K (so no cross-CTA reduction, atomic or not).
//  1. The first heuristic result with the reduction mask set to NONE.
//  2. cuBLASLt's heuristic sometimes returns nothing under that mask (seen for block-scaled FP8 at
//     small n, e.g. m=4096 n=240 k=7168): then the unrestricted results, taking one that does not
//     split K, or forcing split-K off on one (SPLITK_NUM = 1, NONE) and validating it with
//     cublasLtMatmulAlgoCheck.
// Throws Unsupported when neither works.
void select_algo(const char* op, cublasLtHandle_t lt, const LtKey& k, LtPlan& p) {
  cublasLtMatmulHeuristicResult_t res[8] = {};
  cublasStatus_t st = CUBLAS_STATUS_SUCCESS;
  int count = heuristic(lt, k, p, CUBLASLT_REDUCTION_SCHEME_NONE, res, 8, st);
  for (int i = 0; i < count; ++i)
    if (res[i].state == CUBLAS_STATUS_SUCCESS && non_split(res[i].algo)) {
      p.algo = res[i].algo;
      p.workspace = res[i].workspaceSize;
      p.how = "heuristic";
      return;
    }
  const cublasStatus_t st_none = st;
  const int count_none = count;
  count = heuristic(lt, k, p, CUBLASLT_REDUCTION_SCHEME_MASK, res, 8, st);
  for (int i = 0; i < count; ++i)
    if (res[i].state == CUBLAS_STATUS_SUCCESS && non_split(res[i].algo)) {
      p.algo = res[i].algo;
      p.workspace = res[i].workspaceSize;
      p.how = "heuristic (all reductions allowed), a non-split result";
      return;
    }
  for (int i = 0; i < count; ++i) {
    cublasLtMatmulAlgo_t a = res[i].algo;
    const int32_t one = 1;
    const uint32_t none = CUBLASLT_REDUCTION_SCHEME_NONE;
    cublasLtMatmulHeuristicResult_t chk{};
    if (cublasLtMatmulAlgoConfigSetAttribute(&a, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &one,
                                             sizeof(one)) == CUBLAS_STATUS_SUCCESS &&
        cublasLtMatmulAlgoConfigSetAttribute(&a, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &none,
                                             sizeof(none)) == CUBLAS_STATUS_SUCCESS &&
        cublasLtMatmulAlgoCheck(lt, p.desc, p.a, p.b, p.d, p.d, &a, &chk) ==
            CUBLAS_STATUS_SUCCESS &&
        chk.workspaceSize <= kLaneWorkspaceBytes && non_split(a)) {
      p.algo = a;
      p.workspace = chk.workspaceSize;
      p.how = "heuristic (all reductions allowed), split-K forced off";
      return;
    }
  }
  detail::throw_error(
      ErrorKind::Unsupported,
      cat("fp8flow::", op, ": cuBLASLt has no algorithm without split-K for m=", k.m, " n=", k.n,
          " k=", k.k, " lda=", k.lda, " ldb=", k.ldb, " ldd=", k.ldd, " trans=", k.transa, k.transb,
          " types=", k.a_type, "/", k.b_type, "/", k.d_type, " scale modes=", k.a_scale, "/",
          k.b_scale, " alignment=", k.a_align, "/", k.b_align, "/", k.d_align, " (",
          lt_status_name(st_none), ", ", count_none, " results without reduction; ",
          lt_status_name(st), ", ", count, " with)"));
}

// GroupedGemmOptions::algo > 0: the k.algo-th usable result (state SUCCESS, no split-K, no
// reduction) of up to kMaxAlgoResults heuristic results under reduction mask NONE. Usable result 0
// is what select_algo's first step picks (same heuristic call, larger requested count), but
// algo = 0 keeps going through select_algo so that the default is unchanged, fallbacks included.
// Throws InvalidArgument naming options.algo and the number of usable results past the list.
constexpr int kMaxAlgoResults = 16;

void select_algo_index(const char* op, cublasLtHandle_t lt, const LtKey& k, LtPlan& p) {
  cublasLtMatmulHeuristicResult_t res[kMaxAlgoResults] = {};
  cublasStatus_t st = CUBLAS_STATUS_SUCCESS;
  const int count = heuristic(lt, k, p, CUBLASLT_REDUCTION_SCHEME_NONE, res, kMaxAlgoResults, st);
  int usable = 0;
  for (int i = 0; i < count; ++i) {
    if (res[i].state != CUBLAS_STATUS_SUCCESS || !non_split(res[i].algo)) continue;
    if (usable == k.algo) {
      p.algo = res[i].algo;
      p.workspace = res[i].workspaceSize;
      p.how = "heuristic, options.algo";
      return;
    }
    ++usable;
  }
  detail::throw_error(
      ErrorKind::InvalidArgument,
      cat("fp8flow::", op, ": options.algo: expected < ", usable,
          " (the usable cuBLASLt heuristic ", "results, of ", kMaxAlgoResults,
          " requested, without split-K, for m=", k.m, " n=", k.n, " k=", k.k, " lda=", k.lda,
          " ldb=", k.ldb, " ldd=", k.ldd, "; ", lt_status_name(st), "), got ", k.algo));
}

// The descriptor and layouts of one problem (into p; the caller destroys p on a throw).
void make_desc(const char* op, const LtJob& j, LtPlan& p) {
  const LtKey& k = j.key;
  {
    FP8FLOW_LT_CHECK(op, cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t ta = static_cast<cublasOperation_t>(k.transa);
    const cublasOperation_t tb = static_cast<cublasOperation_t>(k.transb);
    FP8FLOW_LT_CHECK(
        op, cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
    FP8FLOW_LT_CHECK(
        op, cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
    if (k.a_scale != kNoScale) {
      const int32_t am = k.a_scale, bm = k.b_scale;
      FP8FLOW_LT_CHECK(op, cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE,
                                                          &am, sizeof(am)));
      FP8FLOW_LT_CHECK(op, cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE,
                                                          &bm, sizeof(bm)));
      const int8_t fast_accum = 0;  // block scaling promotes every 128-K block anyway
      FP8FLOW_LT_CHECK(op, cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_FAST_ACCUM,
                                                          &fast_accum, sizeof(fast_accum)));
      set_scale_pointers(op, p, j);
    }
    const bool an = ta == CUBLAS_OP_N, bn = tb == CUBLAS_OP_N;
    FP8FLOW_LT_CHECK(op, cublasLtMatrixLayoutCreate(&p.a, static_cast<cudaDataType_t>(k.a_type),
                                                    an ? k.m : k.k, an ? k.k : k.m, k.lda));
    FP8FLOW_LT_CHECK(op, cublasLtMatrixLayoutCreate(&p.b, static_cast<cudaDataType_t>(k.b_type),
                                                    bn ? k.k : k.n, bn ? k.n : k.k, k.ldb));
    FP8FLOW_LT_CHECK(op, cublasLtMatrixLayoutCreate(&p.d, static_cast<cudaDataType_t>(k.d_type),
                                                    k.m, k.n, k.ldd));
  }
}

// Descriptor, layouts and the heuristic's first algorithm (or options.algo's) for one problem.
LtPlan make_plan(const char* op, cublasLtHandle_t lt, const LtJob& j) {
  const LtKey& k = j.key;
  LtPlan p;
  try {
    make_desc(op, j, p);
    if (k.algo == 0)
      select_algo(op, lt, k, p);
    else
      select_algo_index(op, lt, k, p);
    char buf[320];
    std::snprintf(
        buf, sizeof(buf),
        "m=%lld n=%lld k=%lld algo#%d id=%d tile=%u stages=%u splitk=%d swizzle=%u "
        "custom=%u cluster=%u ws=%zu",
        (long long)k.m, (long long)k.n, (long long)k.k, k.algo,
        algo_attr<int32_t>(p.algo, CUBLASLT_ALGO_CONFIG_ID),
        algo_attr<uint32_t>(p.algo, CUBLASLT_ALGO_CONFIG_TILE_ID),
        algo_attr<uint32_t>(p.algo, CUBLASLT_ALGO_CONFIG_STAGES_ID),
        algo_attr<int32_t>(p.algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM),
        algo_attr<uint32_t>(p.algo, CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING),
        algo_attr<uint32_t>(p.algo, CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION),
        static_cast<unsigned>(algo_attr<uint16_t>(p.algo, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID)),
        p.workspace);
    p.summary = buf;
    if (log_enabled())
      std::fprintf(stderr,
                   "fp8flow gemm plan [%s] %s lda=%lld ldb=%lld ldd=%lld trans=%d%d types=%d/%d/%d "
                   "scale=%d/%d acc=%d reduction=%u align=%d/%d/%d via %s\n",
                   op, p.summary.c_str(), (long long)k.lda, (long long)k.ldb, (long long)k.ldd,
                   k.transa, k.transb, k.a_type, k.b_type, k.d_type, k.a_scale, k.b_scale,
                   k.accumulate, algo_attr<uint32_t>(p.algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME),
                   k.a_align, k.b_align, k.d_align, p.how);
  } catch (...) {
    destroy_plan(p);
    throw;
  }
  return p;
}

// A copy of `main` for one enqueue thread: its own descriptor (the per-job scale pointers are
// descriptor attributes) with main's algorithm, so every lane runs exactly main's plan.
LtPlan lane_plan(const char* op, const LtPlan& main, const LtJob& j) {
  LtPlan p;
  try {
    make_desc(op, j, p);
  } catch (...) {
    destroy_plan(p);
    throw;
  }
  p.algo = main.algo;
  p.workspace = main.workspace;
  p.how = main.how;
  p.summary = main.summary;
  return p;
}

// Runs the jobs: one stream when lanes == 1, else forked over `lanes` lanes (longest first onto
// the least-loaded lane; the assignment only affects timing, never results).
void run_jobs(const char* op, DeviceContext& ctx, std::vector<LtJob>& jobs, const Workspace& ws,
              const GroupedGemmOptions& opt, cudaStream_t stream) {
  ctx.last.clear();
  for (LtJob& j : jobs) {
    j.key.algo = opt.algo;
    j.key.a_align = ptr_align(j.a);
    j.key.b_align = ptr_align(j.b);
    j.key.d_align = ptr_align(j.d);
    auto it = ctx.plans.find(j.key);
    if (it == ctx.plans.end()) it = ctx.plans.emplace(j.key, make_plan(op, ctx.lt, j)).first;
    j.plan = &it->second;
    if (ctx.last.find(j.plan->summary) == std::string::npos)
      ctx.last += (ctx.last.empty() ? "" : "; ") + j.plan->summary;
  }
  if (jobs.empty()) return;
  const int lanes =
      std::min<int>(std::clamp(opt.streams, 1, kMaxLanes), static_cast<int>(jobs.size()));
  std::vector<size_t> order(jobs.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t x, size_t y) { return jobs[x].flops > jobs[y].flops; });
  std::vector<double> load(static_cast<size_t>(lanes), 0.0);
  // Internal streams [first, first + lanes): disjoint ranges let calls on different caller
  // streams run concurrently (the fork event is re-recorded per call; a wait binds to the record
  // before it, so sharing it is safe on the host-serialized path).
  const int first = std::clamp(opt.first_stream, 0, kMaxLanes - lanes);
  cudaStream_t* lane_streams = ctx.lanes + first;
  cudaEvent_t* lane_joins = ctx.join + first;
  if (lanes > 1) {
    FP8FLOW_CUDA_CHECK(op, cudaEventRecord(ctx.fork, stream));
    for (int l = 0; l < lanes; ++l)
      FP8FLOW_CUDA_CHECK(op, cudaStreamWaitEvent(lane_streams[l], ctx.fork, 0));
  }
  static const float kOne = 1.0f, kZero = 0.0f;
  // The lane of each job (longest first onto the least-loaded lane), in issue order per lane.
  std::vector<std::vector<size_t>> per_lane(static_cast<size_t>(lanes));
  std::vector<int> lane_of(jobs.size(), 0);
  for (size_t idx : order) {
    const int lane = static_cast<int>(std::min_element(load.begin(), load.end()) - load.begin());
    load[static_cast<size_t>(lane)] += jobs[idx].flops;
    per_lane[static_cast<size_t>(lane)].push_back(idx);
    lane_of[idx] = lane;
  }
  // Several lanes with several jobs each, not inside graph capture: one host thread per lane.
  cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
  FP8FLOW_CUDA_CHECK(op, cudaStreamIsCapturing(stream, &cap));
  const bool threaded = opt.threaded_enqueue && lanes > 1 &&
                        jobs.size() >= 2 * static_cast<size_t>(lanes) &&
                        cap == cudaStreamCaptureStatusNone && threads_enabled();
  if (threaded) {  // lane plans and handles, made here, on this thread
    int dev = 0;
    FP8FLOW_CUDA_CHECK(op, cudaGetDevice(&dev));
    if (!ctx.threads) ctx.threads = new LaneThreads(dev);
    for (int l = 1; l < lanes; ++l) {
      if (!ctx.lane_lt[l]) FP8FLOW_LT_CHECK(op, cublasLtCreate(&ctx.lane_lt[l]));
      for (size_t idx : per_lane[static_cast<size_t>(l)]) {
        auto it = ctx.lane_plans[l].find(jobs[idx].key);
        if (it == ctx.lane_plans[l].end())
          ctx.lane_plans[l].emplace(jobs[idx].key, lane_plan(op, *jobs[idx].plan, jobs[idx]));
      }
    }
  }
  auto enqueue = [&](size_t idx, int lane) {
    const LtJob& j = jobs[idx];
    cudaStream_t s = lanes > 1 ? lane_streams[lane] : stream;
    void* lane_ws =
        static_cast<uint8_t*>(ws.data) + static_cast<size_t>(lane) * kLaneWorkspaceBytes;
    const bool own = threaded && lane > 0;
    const LtPlan& p = own ? ctx.lane_plans[lane].find(j.key)->second : *j.plan;
    if (j.key.a_scale != kNoScale) set_scale_pointers(op, p, j);
    FP8FLOW_LT_CHECK(op, cublasLtMatmul(own ? ctx.lane_lt[lane] : ctx.lt, p.desc, &kOne, j.a, p.a,
                                        j.b, p.b, j.key.accumulate ? &kOne : &kZero, j.d, p.d, j.d,
                                        p.d, &p.algo, lane_ws, kLaneWorkspaceBytes, s));
  };
  if (threaded) {
    ctx.threads->run(lanes, [&](int lane) {
      for (size_t idx : per_lane[static_cast<size_t>(lane)]) enqueue(idx, lane);
    });
  } else {  // one thread: issue order longest first, across the lanes
    for (size_t idx : order) enqueue(idx, lane_of[idx]);
  }
  if (lanes > 1) {
    for (int l = 0; l < lanes; ++l) {
      FP8FLOW_CUDA_CHECK(op, cudaEventRecord(lane_joins[l], lane_streams[l]));
      FP8FLOW_CUDA_CHECK(op, cudaStreamWaitEvent(stream, lane_joins[l], 0));
    }
  }
}

size_t elem_bytes(DType d) {
  return static_cast<size_t>(dtype_bits(d) / 8);
}

template <typename T>
T* byte_offset(T* p, size_t bytes) {
  return reinterpret_cast<T*>(reinterpret_cast<uintptr_t>(p) + bytes);
}

// -------------------------------------------------------------------------------------------
// Scale packing: expert e's columns [m0_e, m0_e + M_e) of the [kb][M] activation scales ->
// [kb][M_e] contiguous at dst + dst_e. One float4 per thread; M, m0_e, M_e are multiples of 16.
struct ScalePack {
  int32_t m0[detail::kMaxGroups];
  int32_t me[detail::kMaxGroups];
  int64_t dst[detail::kMaxGroups];  // in floats
};

__global__ void __launch_bounds__(256)
    sm90_pack_vec128_scales(const float* __restrict__ src, int64_t ld, float* __restrict__ dst,
                            const __grid_constant__ ScalePack p) {
  const int e = static_cast<int>(blockIdx.z);
  const int64_t r = blockIdx.y;
  const int me = p.me[e];
  const int i = static_cast<int>((blockIdx.x * blockDim.x + threadIdx.x) * 4);
  if (i >= me) return;
  const float4 v = *reinterpret_cast<const float4*>(src + r * ld + p.m0[e] + i);
  *reinterpret_cast<float4*>(dst + p.dst[e] + r * me + i) = v;
}

}  // namespace

void grouped_gemm_rowwise(const char* op, const ScaledTensor& a, std::span<const ScaledTensor> b,
                          const TensorView& out, std::span<const int64_t> m_splits,
                          const Workspace& ws, const GroupedGemmOptions& opt, Stream stream_) {
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_);
  const int64_t M = a.data.rows, Kc = a.data.cols, Nout = out.cols, kb = ceil_div(Kc, 128);
  const int lanes = std::clamp(opt.streams, 1, kMaxLanes);
  const detail::Fp8RowwiseWorkspace lay = detail::fp8_rowwise_workspace(Nout, Kc, m_splits, lanes);
  if (M == 0 || Nout == 0) return;
  // Experimental: FP8FLOW_OWN_GEMM=1 runs our one-launch kernel where it applies (own_fprop.h).
  static const bool own_gemm = [] {
    const char* v = std::getenv("FP8FLOW_OWN_GEMM");
    return v && v[0] == '1';
  }();
  if (own_gemm && !opt.accumulate && own::own_fprop_supported(a, b, out)) {
    own::own_grouped_fprop(a, b, out, m_splits, stream_);
    return;
  }
  const DeviceCall call(op);
  DeviceContext& ctx = call.ctx;
  const int dev = call.dev;
  auto* wsb = static_cast<uint8_t*>(ws.data);
  auto* packed = reinterpret_cast<float*>(wsb + lay.scales_offset);

  // 1. Pack every expert's activation scales (one launch).
  ScalePack pack;
  int64_t m0 = 0, off = 0, max_me = 0;
  for (size_t e = 0; e < m_splits.size(); ++e) {
    pack.m0[e] = static_cast<int32_t>(m0);
    pack.me[e] = static_cast<int32_t>(m_splits[e]);
    pack.dst[e] = off;
    m0 += m_splits[e];
    off += static_cast<int64_t>(detail::align_up(static_cast<size_t>(kb * m_splits[e]) * 4,
                                                 detail::kWorkspaceAlign)) /
           4;
    max_me = std::max(max_me, m_splits[e]);
  }
  if (kb > 0 && max_me > 0) {
    const dim3 grid(static_cast<unsigned>(ceil_div(max_me / 4, 256)), static_cast<unsigned>(kb),
                    static_cast<unsigned>(m_splits.size()));
    sm90_pack_vec128_scales<<<grid, 256, 0, stream>>>(static_cast<const float*>(a.scale.data), M,
                                                      packed, pack);
    FP8FLOW_CUDA_CHECK_LAUNCH(op);
  }

  // 2. Weight scales with the K blocks padded to a multiple of 4, if they are not already.
  const int64_t nb = ceil_div(Nout, 128), kb4 = detail::padded_k_blocks(Kc);
  if (lay.pad_weights) {
    for (size_t e = 0; e < m_splits.size(); ++e) {
      if (m_splits[e] == 0) continue;
      FP8FLOW_CUDA_CHECK(
          op, cudaMemcpy2DAsync(wsb + lay.wscales_offset + e * lay.wscales_stride,
                                static_cast<size_t>(kb4) * 4, b[e].scale.data,
                                static_cast<size_t>(kb) * 4, static_cast<size_t>(kb) * 4,
                                static_cast<size_t>(nb), cudaMemcpyDeviceToDevice, stream));
    }
  }

  // 3. One matmul per non-empty expert: D (Nout x M_e, col-major) = W_e^T(T) . X_e(N).
  std::vector<LtJob> jobs;
  m0 = 0;
  for (size_t e = 0; e < m_splits.size(); ++e) {
    const int64_t me = m_splits[e];
    if (me > 0) {
      LtJob j;
      LtKey& k = j.key;
      k.device = dev;
      k.a_type = cuda_type(b[e].data.dtype);
      k.b_type = cuda_type(a.data.dtype);
      k.d_type = cuda_type(out.dtype);
      k.a_scale = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F;
      k.b_scale = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
      k.transa = CUBLAS_OP_T;
      k.transb = CUBLAS_OP_N;
      k.m = Nout;
      k.n = me;
      k.k = Kc;
      k.lda = b[e].data.stride();
      k.ldb = a.data.stride();
      k.ldd = out.stride();
      k.accumulate = opt.accumulate ? 1 : 0;
      j.a = b[e].data.data;
      j.b = byte_offset(a.data.data, static_cast<size_t>(m0 * k.ldb));
      j.d = byte_offset(out.data, static_cast<size_t>(m0 * k.ldd) * elem_bytes(out.dtype));
      j.a_scale = lay.pad_weights
                      ? static_cast<const void*>(wsb + lay.wscales_offset + e * lay.wscales_stride)
                      : b[e].scale.data;
      j.b_scale = packed + pack.dst[e];
      j.flops = 2.0 * static_cast<double>(me) * static_cast<double>(Nout) * static_cast<double>(Kc);
      jobs.push_back(j);
    }
    m0 += me;
  }
  run_jobs(op, ctx, jobs, ws, opt, stream);
}

void grouped_gemm_wgrad(const ScaledTensor& dy_t, const ScaledTensor& x_t,
                        std::span<const TensorView> dw, std::span<const int64_t> m_splits,
                        const Workspace& ws, const GroupedGemmOptions& opt, Stream stream_) {
  const char* op = "grouped_gemm_wgrad";
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_);
  const int64_t N = dy_t.data.rows, K = x_t.data.rows;
  if (N == 0 || K == 0) return;
  // Our one-launch kernel (own_wgrad.h) where it applies, with FP8FLOW_OWN_WGRAD=1 (opt-in: slower
  // than cuBLASLt on an H100); options.algo > 0 asks for a cuBLASLt algorithm, so it keeps
  // cuBLASLt.
  static const bool own_wgrad = [] {
    const char* v = std::getenv("FP8FLOW_OWN_WGRAD");
    return v && v[0] == '1';
  }();
  if (own_wgrad && opt.algo == 0 && own::own_wgrad_supported(dy_t, x_t, dw, m_splits)) {
    own::own_grouped_wgrad(dy_t, x_t, dw, m_splits, opt.accumulate, stream_);
    return;
  }
  const DeviceCall call(op);
  DeviceContext& ctx = call.ctx;
  const int dev = call.dev;
  std::vector<LtJob> jobs;
  int64_t m0 = 0, t0 = 0;
  for (size_t e = 0; e < m_splits.size(); ++e) {
    const int64_t me = m_splits[e];
    if (me == 0) {
      if (!opt.accumulate)  // an empty contraction is zero
        FP8FLOW_CUDA_CHECK(op, cudaMemset2DAsync(dw[e].data, dw[e].row_bytes(), 0,
                                                 static_cast<size_t>(K) * elem_bytes(dw[e].dtype),
                                                 static_cast<size_t>(N), stream));
      continue;
    }
    LtJob j;
    LtKey& k = j.key;
    k.device = dev;
    k.a_type = cuda_type(x_t.data.dtype);
    k.b_type = cuda_type(dy_t.data.dtype);
    k.d_type = cuda_type(dw[e].dtype);
    k.a_scale = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
    k.b_scale = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
    k.transa = CUBLAS_OP_T;
    k.transb = CUBLAS_OP_N;
    k.m = K;
    k.n = N;
    k.k = me;
    k.lda = x_t.data.stride();
    k.ldb = dy_t.data.stride();
    k.ldd = dw[e].stride();
    k.accumulate = opt.accumulate ? 1 : 0;
    j.a = byte_offset(x_t.data.data, static_cast<size_t>(m0));
    j.b = byte_offset(dy_t.data.data, static_cast<size_t>(m0));
    j.d = dw[e].data;
    j.a_scale = static_cast<const float*>(x_t.scale.data) + t0 * K;
    j.b_scale = static_cast<const float*>(dy_t.scale.data) + t0 * N;
    j.flops = 2.0 * static_cast<double>(me) * static_cast<double>(N) * static_cast<double>(K);
    jobs.push_back(j);
    m0 += me;
    t0 += ceil_div(me, 128);
  }
  run_jobs(op, ctx, jobs, ws, opt, stream);
}

namespace {

// BF16 jobs share everything but the transposes, dims and pointers.
LtJob bf16_job(int dev, const TensorView& out, bool accumulate, int transa, int transb, int64_t m,
               int64_t n, int64_t k, int64_t lda, int64_t ldb, const void* a, const void* b,
               void* d) {
  LtJob j;
  LtKey& key = j.key;
  key.device = dev;
  key.a_type = CUDA_R_16BF;
  key.b_type = CUDA_R_16BF;
  key.d_type = cuda_type(out.dtype);
  key.transa = transa;
  key.transb = transb;
  key.m = m;
  key.n = n;
  key.k = k;
  key.lda = lda;
  key.ldb = ldb;
  key.ldd = out.stride();
  key.accumulate = accumulate ? 1 : 0;
  j.a = a;
  j.b = b;
  j.d = d;
  j.flops = 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k);
  return j;
}

}  // namespace

void grouped_gemm_fprop_bf16(const TensorView& x, std::span<const TensorView> w,
                             const TensorView& y, std::span<const int64_t> m_splits,
                             const Workspace& ws, const GroupedGemmOptions& opt, Stream stream_) {
  const char* op = "grouped_gemm_fprop_bf16";
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_);
  const int64_t K = x.cols, N = y.cols;
  if (x.rows == 0 || N == 0) return;
  const DeviceCall call(op);
  DeviceContext& ctx = call.ctx;
  const int dev = call.dev;
  std::vector<LtJob> jobs;
  int64_t m0 = 0;
  for (size_t e = 0; e < m_splits.size(); ++e) {
    const int64_t me = m_splits[e];
    if (me > 0)  // Y_e^T (N x M_e) = W_e^T(T) . X_e^T(N)
      jobs.push_back(bf16_job(
          dev, y, opt.accumulate, CUBLAS_OP_T, CUBLAS_OP_N, N, me, K, w[e].stride(), x.stride(),
          w[e].data, byte_offset(x.data, static_cast<size_t>(m0 * x.stride()) * 2),
          byte_offset(y.data, static_cast<size_t>(m0 * y.stride()) * elem_bytes(y.dtype))));
    m0 += me;
  }
  run_jobs(op, ctx, jobs, ws, opt, stream);
}

void grouped_gemm_dgrad_bf16(const TensorView& dy, std::span<const TensorView> w,
                             const TensorView& dx, std::span<const int64_t> m_splits,
                             const Workspace& ws, const GroupedGemmOptions& opt, Stream stream_) {
  const char* op = "grouped_gemm_dgrad_bf16";
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_);
  const int64_t N = dy.cols, K = dx.cols;
  if (dy.rows == 0 || K == 0) return;
  const DeviceCall call(op);
  DeviceContext& ctx = call.ctx;
  const int dev = call.dev;
  std::vector<LtJob> jobs;
  int64_t m0 = 0;
  for (size_t e = 0; e < m_splits.size(); ++e) {
    const int64_t me = m_splits[e];
    if (me > 0)  // dX_e^T (K x M_e) = W_e^T(N: W_e [N][K] is col-major K x N) . dY_e^T(N)
      jobs.push_back(bf16_job(
          dev, dx, opt.accumulate, CUBLAS_OP_N, CUBLAS_OP_N, K, me, N, w[e].stride(), dy.stride(),
          w[e].data, byte_offset(dy.data, static_cast<size_t>(m0 * dy.stride()) * 2),
          byte_offset(dx.data, static_cast<size_t>(m0 * dx.stride()) * elem_bytes(dx.dtype))));
    m0 += me;
  }
  run_jobs(op, ctx, jobs, ws, opt, stream);
}

void grouped_gemm_wgrad_bf16(const TensorView& dy, const TensorView& x,
                             std::span<const TensorView> dw, std::span<const int64_t> m_splits,
                             const Workspace& ws, const GroupedGemmOptions& opt, Stream stream_) {
  const char* op = "grouped_gemm_wgrad_bf16";
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_);
  const int64_t N = dy.cols, K = x.cols;
  if (N == 0 || K == 0) return;
  const DeviceCall call(op);
  DeviceContext& ctx = call.ctx;
  const int dev = call.dev;
  std::vector<LtJob> jobs;
  int64_t m0 = 0;
  for (size_t e = 0; e < m_splits.size(); ++e) {
    const int64_t me = m_splits[e];
    if (me == 0) {
      if (!opt.accumulate)
        FP8FLOW_CUDA_CHECK(op, cudaMemset2DAsync(dw[e].data, dw[e].row_bytes(), 0,
                                                 static_cast<size_t>(K) * elem_bytes(dw[e].dtype),
                                                 static_cast<size_t>(N), stream));
      continue;
    }
    // dW_e^T (K x N, col-major) = X_e^T(N: X_e [M_e][K] is col-major K x M_e) . dY_e(T)
    jobs.push_back(
        bf16_job(dev, dw[e], opt.accumulate, CUBLAS_OP_N, CUBLAS_OP_T, K, N, me, x.stride(),
                 dy.stride(), byte_offset(x.data, static_cast<size_t>(m0 * x.stride()) * 2),
                 byte_offset(dy.data, static_cast<size_t>(m0 * dy.stride()) * 2), dw[e].data));
    m0 += me;
  }
  run_jobs(op, ctx, jobs, ws, opt, stream);
}

std::string last_algos() {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices) return {};
  std::lock_guard<std::mutex> lock(gemm_mutex(dev));
  return contexts()[dev].last;
}

}  // namespace fp8flow::sm90
