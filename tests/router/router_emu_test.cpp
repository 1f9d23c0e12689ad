// Host emulation of the router's CUDA kernels, so their lane logic is tested where no GPU exists:
// the kernel headers are compiled as host code with a small CUDA vocabulary defined here (every
// thread of a CTA is a fiber; warp shuffles, ballots and reductions exchange values through a
// per-warp barrier; __syncthreads is a CTA barrier; CTAs run one after another). The launch chain
// (kernels/router_launch.cuh) is the one the CUDA backend runs, so grids, chunking, workspace
// offsets and reduction levels are exercised too. Results must equal the CPU reference bit for
// bit. What this cannot test: the real hardware's memory system, timing and intrinsics (the GPU
// tests in router_gpu_test.cpp do).
#include <gtest/gtest.h>
#include <ucontext.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <vector>

#include "router/router_testing.h"  // first: it may include the CUDA runtime API headers

// ---- The CUDA vocabulary the kernels use, for the host ------------------------------------
#if FP8FLOW_WITH_CUDA
#include <vector_functions.h>  // float4, make_float4 (host-callable)
#else
struct alignas(16) float4 {
  float x, y, z, w;
};
inline float4 make_float4(float a, float b, float c, float d) {
  return {a, b, c, d};
}
#endif

#define FP8FLOW_ROUTER_HOST_EMULATION 1
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __grid_constant__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __shared__ static  // CTAs run one at a time

struct EmuDim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline EmuDim3 threadIdx, blockIdx, blockDim, gridDim;  // set by the scheduler per fiber

namespace emu {

struct Barrier {
  int n = 0, count = 0;
  uint64_t phase = 0;
  void wait();
};

// Context switching between the scheduler and the fibers. x86-64: a six-register switch (no
// system calls; swapcontext's signal-mask syscall made this emulation several times slower);
// elsewhere: ucontext.
#if defined(__x86_64__)
extern "C" void fp8flow_router_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .globl fp8flow_router_emu_switch
  .type fp8flow_router_emu_switch, @function
fp8flow_router_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size fp8flow_router_emu_switch, .-fp8flow_router_emu_switch
)");
struct Ctx {
  void* sp = nullptr;
};
inline void switch_ctx(Ctx& from, Ctx& to) {
  fp8flow_router_emu_switch(&from.sp, to.sp);
}
// A fresh context that starts in entry() on the given stack (entry must never return).
inline void make_ctx(Ctx& c, char* stack, size_t size, void (*entry)()) {
  auto top = reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t{15};
  auto* sp = reinterpret_cast<void**>(top - 16);  // return address at a 16-aligned slot
  *sp = reinterpret_cast<void*>(entry);
  for (int r = 0; r < 6; ++r) *--sp = nullptr;  // rbp rbx r12 r13 r14 r15
  c.sp = sp;
}
#else
struct Ctx {
  ucontext_t uc;
};
inline void switch_ctx(Ctx& from, Ctx& to) {
  swapcontext(&from.uc, &to.uc);
}
inline void make_ctx(Ctx& c, char* stack, size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

struct Fiber {
  Ctx ctx;
  bool done = false;
};

inline Ctx g_sched;
inline std::vector<Fiber> g_fibers;
inline std::vector<std::unique_ptr<char[]>> g_stacks;
inline int g_cur = 0;
inline std::function<void()> g_body;
inline Barrier g_cta;
inline std::vector<Barrier> g_warp_bar;
inline std::vector<std::array<std::array<uint32_t, 32>, 2>> g_warp_slot;
constexpr size_t kStack = 256 * 1024;

inline void yield() {
  switch_ctx(g_fibers[g_cur].ctx, g_sched);
}

inline void Barrier::wait() {
  const uint64_t my = phase;
  if (++count == n) {
    count = 0;
    ++phase;
    return;
  }
  while (phase == my) yield();
}

inline void fiber_main() {
  g_body();
  g_fibers[g_cur].done = true;
  yield();  // never resumed
  std::abort();
}

// Runs body() as `block` threads of each of `grid` CTAs.
inline void launch(unsigned grid, unsigned block, std::function<void()> body) {
  g_body = std::move(body);
  gridDim = {grid, 1, 1};
  blockDim = {block, 1, 1};
  while (g_stacks.size() < block) g_stacks.emplace_back(new char[kStack]);
  g_fibers.assign(block, Fiber{});
  const unsigned warps = (block + 31) / 32;
  for (unsigned b = 0; b < grid; ++b) {
    blockIdx = {b, 1, 1};
    g_cta = Barrier{static_cast<int>(block)};
    g_warp_bar.assign(warps, Barrier{});
    for (unsigned w = 0; w < warps; ++w)
      g_warp_bar[w].n = static_cast<int>(std::min(32u, block - 32 * w));
    g_warp_slot.assign(warps, {});
    for (unsigned i = 0; i < block; ++i) {
      g_fibers[i].done = false;
      make_ctx(g_fibers[i].ctx, g_stacks[i].get(), kStack, fiber_main);
    }
    for (bool any = true; any;) {
      any = false;
      for (unsigned i = 0; i < block; ++i) {
        if (g_fibers[i].done) continue;
        any = true;
        g_cur = static_cast<int>(i);
        threadIdx = {i, 0, 0};
        switch_ctx(g_sched, g_fibers[i].ctx);
      }
    }
  }
}

template <class T>
uint32_t bits_of(T v) {
  static_assert(sizeof(T) == 4);
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return u;
}
template <class T>
T from_bits(uint32_t u) {
  T v;
  std::memcpy(&v, &u, 4);
  return v;
}

// Each lane publishes v; every lane gets all 32 published values. One barrier per exchange: the
// slots alternate, and a lane can publish into the same buffer again only after the next
// exchange's barrier, which every lane reaches only after reading this one.
inline std::array<uint32_t, 32> gather(uint32_t v) {
  const unsigned w = threadIdx.x / 32, lane = threadIdx.x % 32;
  auto& slots = g_warp_slot[w][g_warp_bar[w].phase & 1];
  slots[lane] = v;
  g_warp_bar[w].wait();
  return slots;
}

template <class T>
T exchange(T v, int src) {
  return from_bits<T>(gather(bits_of(v))[src & 31]);
}

}  // namespace emu

template <class T>
T __shfl_sync(unsigned, T v, int src) {
  return emu::exchange(v, src);
}
template <class T>
T __shfl_xor_sync(unsigned, T v, int o) {
  return emu::exchange(v, static_cast<int>(threadIdx.x % 32) ^ o);
}
inline unsigned __ballot_sync(unsigned, bool pred) {
  const auto all = emu::gather(pred ? 1u : 0u);
  unsigned r = 0;
  for (int l = 0; l < 32; ++l) r |= all[l] << l;
  return r;
}
inline unsigned __reduce_max_sync(unsigned, unsigned v) {
  const auto all = emu::gather(v);
  return *std::max_element(all.begin(), all.end());
}
inline void __syncthreads() {
  emu::g_cta.wait();
}
inline void __syncwarp(unsigned = 0xFFFFFFFFu) {
  emu::g_warp_bar[threadIdx.x / 32].wait();
}
inline int __ffs(int x) {
  return __builtin_ffs(x);
}
inline float __uint_as_float(unsigned u) {
  return emu::from_bits<float>(u);
}
template <class T>
T __ldg(const T* p) {
  return *p;
}
inline float4 __ldcs(const float4* p) {
  return *p;
}
inline void __stcs(float4* p, float4 v) {
  *p = v;
}
inline int atomicAdd(int* p, int v) {
  const int old = *p;  // one fiber runs at a time: plain read-modify-write is atomic here
  *p = old + v;
  return old;
}

#include "ops/router/kernels/router_launch.cuh"

namespace fp8flow::test {
namespace {

using namespace router_testing;
namespace K = fp8flow::sm90::router_kernels_host_emulation;

template <typename F>
void dispatch_lanes(int lanes, F&& f) {
  switch (lanes) {
    case 1:
      return f(std::integral_constant<int, 1>{});
    case 2:
      return f(std::integral_constant<int, 2>{});
    case 4:
      return f(std::integral_constant<int, 4>{});
    case 8:
      return f(std::integral_constant<int, 8>{});
    case 16:
      return f(std::integral_constant<int, 16>{});
    default:
      return f(std::integral_constant<int, 32>{});
  }
}

struct EmuLauncher {
  unsigned max_ctas = 2;  // small, so the backward's grid-stride loop and prefetch are used
  bool sort = false;      // the forward variant: router_fwd_sm90_f32<G, sort>
  void memset_zero(void* p, size_t n) {
    if (n) std::memset(p, 0, n);
  }
  void fwd(int lanes, unsigned grid, const K::FwdParams& p) {
    dispatch_lanes(lanes, [&](auto g) {
      constexpr int G = decltype(g)::value;
      emu::launch(grid, K::kFwdWarps * 32, [&] {
        if (sort)
          K::router_fwd_sm90_f32<G, true>(p);
        else
          K::router_fwd_sm90_f32<G, false>(p);
      });
    });
  }
  void reduce(unsigned grid, const float* in, float* out, int64_t segs, int64_t rows_in,
              int64_t rows_out, int64_t cols) {
    emu::launch(grid, K::kAuxBlock,
                [&] { K::router_aux_reduce_sm90(in, out, segs, rows_in, rows_out, cols); });
  }
  void terms(unsigned grid, const float* psum, const int32_t* seq_counts, float* loss, int64_t seqs,
             int experts, int64_t seq_len, float fscale) {
    emu::launch(grid, K::kAuxBlock, [&] {
      K::router_aux_terms_sm90(psum, seq_counts, loss, seqs, experts, seq_len, fscale);
    });
  }
  void final(const float* total, float* loss, float alpha, int64_t seqs) {
    emu::launch(1, 1, [&] { K::router_aux_final_sm90(total, loss, alpha, seqs); });
  }
  unsigned bwd_max_ctas(int) { return max_ctas; }
  void bwd(int lanes, unsigned grid, const K::BwdParams& p) {
    dispatch_lanes(lanes, [&](auto g) {
      emu::launch(grid, K::kBwdWarps * 32, [&] { K::router_bwd_sm90_f32<decltype(g)::value>(p); });
    });
  }
};

// The aux loss's intermediate sums by their definition (router_math.h), from the reference's
// scores: P_sum[b][i] (runs of 8 tokens summed in order, runs combined by the stride-doubling
// tree) and loss[b] = tree_i (f_bi * P_sum_bi / S).
float tree(std::vector<float> v) {
  const size_t n = v.size();
  for (size_t st = 1; st < n; st *= 2)
    for (size_t i = 0; i + st < n; i += 2 * st) v[i] = hd::add(v[i], v[i + st]);
  return n ? v[0] : 0.0f;
}

void aux_intermediates(HostOut& ref, int64_t T, int64_t E, const RouterConfig& cfg,
                       std::vector<float>& psum, std::vector<float>& loss) {
  const int64_t S = cfg.seq_len, B = T / S, runs = (S + 7) / 8;
  const int slots = 8 * fp8flow::router::lanes_for(E);
  psum.assign(B * E, 0.0f);
  loss.assign(B, 0.0f);
  std::vector<float> shat(T * E);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<float> row(slots, 0.0f);
    for (int64_t i = 0; i < E; ++i) row[i] = ref.S()[t * E + i];
    const float d = hd::add(tree(row), 1e-20f);
    for (int64_t i = 0; i < E; ++i) shat[t * E + i] = hd::div(ref.S()[t * E + i], d);
  }
  const float fscale = hd::div(float(E), float(int64_t{cfg.top_k} * S));
  for (int64_t b = 0; b < B; ++b) {
    std::vector<float> terms(E);
    for (int64_t i = 0; i < E; ++i) {
      std::vector<float> run_sums(runs, 0.0f);
      for (int64_t p = 0; p < S; ++p)
        run_sums[p / 8] = hd::add(run_sums[p / 8], shat[(b * S + p) * E + i]);
      psum[b * E + i] = tree(run_sums);
      const float f = hd::mul(float(ref.SC()[b * E + i]), fscale);
      terms[i] = hd::mul(f, hd::div(psum[b * E + i], float(S)));
    }
    loss[b] = tree(terms);
  }
}

::testing::AssertionResult floats_equal(const float* got, const std::vector<float>& want) {
  for (size_t i = 0; i < want.size(); ++i)
    if (!same_bits_or_both_nan(got[i], want[i]))
      return ::testing::AssertionFailure()
             << "element " << i << ": " << got[i] << " vs " << want[i];
  return ::testing::AssertionSuccess();
}

// Emulated kernels vs the CPU reference: every output, byte for byte.
// The forward kernel variant the checks below run (both must match the reference).
bool g_sort = false;

void expect_emulation_matches_reference(int64_t T, int64_t E, const RouterConfig& cfg,
                                        const std::vector<float>& x, const std::vector<float>* bias,
                                        uint64_t seed, const std::string& label) {
  SCOPED_TRACE(label + (g_sort ? " (sorted forward)" : ""));
  const bool aux = cfg.aux_enabled();
  HostOut ref = run_forward_cpu(x, T, E, bias, cfg);
  const auto dw = random_logits(T, cfg.top_k, seed, 1.0f);
  const float d_aux = 0.625f;
  const auto ref_dx = run_backward_cpu(x, T, E, ref, dw, aux ? &d_aux : nullptr, cfg);

  HostTensor hx = host_from_values(x, DType::F32, T, E);
  HostTensor hb;
  if (bias) hb = host_from_values(*bias, DType::F32, 1, E);
  HostOut got(T, E, cfg);
  const size_t ws_bytes = router_workspace_bytes(T, E, cfg);
  HostTensor ws(DType::F32, 1, static_cast<int64_t>(ws_bytes / 4 + 1), 0xA5);
  EmuLauncher launch;
  launch.sort = g_sort;
  K::forward_chain(launch, hx.v, bias ? hb.v : TensorView{}, got.views(), cfg, ws.v);
  EXPECT_TRUE(bytes_equal(got.idx, ref.idx)) << "topk_idx";
  EXPECT_TRUE(bytes_equal(got.w, ref.w)) << "topk_weight";
  EXPECT_TRUE(bytes_equal(got.counts, ref.counts)) << "tokens_per_expert";
  EXPECT_TRUE(bytes_equal(got.scores, ref.scores)) << "scores";
  if (aux) {
    EXPECT_TRUE(bytes_equal(got.seq_counts, ref.seq_counts)) << "seq_counts";
    EXPECT_TRUE(bytes_equal(got.loss, ref.loss)) << "aux_loss " << got.L() << " vs " << ref.L();
    // The workspace's per-sequence column sums and losses, against their definition.
    if (T > 0) {
      std::vector<float> psum, loss;
      aux_intermediates(ref, T, E, cfg, psum, loss);
      const auto plan = fp8flow::router::make_aux_plan(T, E, cfg);
      const float* w = ws.ptr<float>();
      EXPECT_TRUE(floats_equal(w + plan.col_off.back(), psum)) << "P_sum";
      EXPECT_TRUE(floats_equal(w + plan.loss_off[0], loss)) << "per-sequence loss";
    }
  }

  HostTensor hdw = host_from_values(dw, DType::F32, T, cfg.top_k);
  HostTensor hda(DType::F32, 1, 1);
  hda.ptr<float>()[0] = d_aux;
  HostTensor dx(DType::F32, T, E);
  K::backward_chain(launch, hx.v, got.idx.v, hdw.v, aux ? got.seq_counts.v : TensorView{},
                    aux ? hda.v : TensorView{}, dx.v, cfg);
  EXPECT_TRUE(bytes_equal(dx, host_from_values(ref_dx, DType::F32, T, E))) << "d_logits";
}

RouterConfig cfg_of(RouterKind kind, int k, int groups, int topk_groups, bool renorm, float scaling,
                    float alpha, int64_t S) {
  RouterConfig c;
  c.kind = kind;
  c.top_k = k;
  c.n_groups = groups;
  c.topk_groups = topk_groups;
  c.renormalize = renorm;
  c.scaling = scaling;
  c.aux_alpha = alpha;
  c.seq_len = S;
  return c;
}

struct EmuCase {
  int64_t E;
  RouterConfig cfg;
  bool bias;
};

std::vector<EmuCase> emu_cases() {
  const auto Sig = RouterKind::SigmoidBias;
  const auto Soft = RouterKind::Softmax;
  return {
      {256, RouterConfig::deepseek_v3(1e-4f, 0), true},        // G 32, groups of 4 lanes
      {256, cfg_of(Sig, 8, 2, 1, true, 2.5f, 0, 0), true},     // group size 128
      {256, cfg_of(Soft, 8, 128, 8, false, 1, 0, 0), false},   // group size 2
      {160, cfg_of(Soft, 6, 1, 1, true, 1, 1e-2f, 0), false},  // padded lanes 20..31
      {128, cfg_of(Sig, 8, 16, 4, true, 1, 1e-3f, 0), true},   // G 16, group size 8
      {64, cfg_of(Sig, 6, 1, 1, true, 1, 1e-3f, 0), true},     // G 8
      {64, cfg_of(Soft, 8, 4, 2, false, 1, 0, 0), false},      // group size 16
      {60, cfg_of(Sig, 4, 15, 3, true, 1, 1e-3f, 0), true},    // E % 8 == 4, group size 4
      {32, cfg_of(Soft, 4, 1, 1, true, 1, 0, 0), false},       // G 4
      {16, cfg_of(Sig, 3, 8, 2, false, 3, 1e-2f, 0), true},    // G 2, group size 2
      {12, cfg_of(Soft, 2, 3, 1, true, 1, 0, 0), false},       // G 2, half padded
      {8, cfg_of(Soft, 2, 1, 1, true, 1, 1e-2f, 0), false},    // Mixtral, G 1
      {8, cfg_of(Sig, 8, 1, 1, true, 1, 0, 0), true},          // k == E
      {4, cfg_of(Soft, 1, 1, 1, false, 1, 1e-2f, 0), false},   // G 1, half padded
  };
}

void check_shapes_and_configs() {
  uint64_t seed = 11;
  for (const EmuCase& c : emu_cases()) {
    for (int64_t T : {1, 21, 70}) {
      for (int64_t S : {T, int64_t{1}, int64_t{7}, int64_t{35}}) {
        RouterConfig cfg = c.cfg;
        if (!cfg.aux_enabled() && S != T) continue;
        if (cfg.aux_enabled()) cfg.seq_len = S;
        if (T % S || (S != T && S >= T)) continue;
        for (int variant = 0; variant < 3; ++variant) {
          const auto x = variant == 2 ? make_values(T, c.E, Fill::Adversarial, seed)
                                      : random_logits(T, c.E, seed, 2.0f, variant ? 4 : 0);
          const auto b = random_bias(c.E, seed + 1, variant ? 0.0f : 0.05f);
          expect_emulation_matches_reference(
              T, c.E, cfg, x, c.bias ? &b : nullptr, seed + 2,
              "E " + std::to_string(c.E) + " k " + std::to_string(cfg.top_k) + " groups " +
                  std::to_string(cfg.n_groups) + " T " + std::to_string(T) + " S " +
                  std::to_string(cfg.seq_len) + " variant " + std::to_string(variant));
          seed += 3;
          if (::testing::Test::HasFailure()) return;
        }
      }
    }
  }
}

void check_equal_and_nan_rows() {
  for (float v : {0.0f, NAN}) {
    for (const EmuCase& c : emu_cases()) {
      RouterConfig cfg = c.cfg;
      if (cfg.aux_enabled()) cfg.seq_len = 3;
      const std::vector<float> x(6 * c.E, v), b(c.E, 0.0f);
      expect_emulation_matches_reference(6, c.E, cfg, x, c.bias ? &b : nullptr, 5,
                                         "E " + std::to_string(c.E) + " v " + std::to_string(v));
      if (::testing::Test::HasFailure()) return;
    }
  }
}

void check_aux_reduction_levels() {
  // 33 chunks of 64 tokens in one sequence: two column-sum levels (33 -> 2 -> 1).
  RouterConfig cfg = cfg_of(RouterKind::Softmax, 1, 1, 1, true, 1, 1e-2f, 2112);
  expect_emulation_matches_reference(2112, 256, cfg, random_logits(2112, 256, 71), nullptr, 72,
                                     "T 2112 one sequence");
  // 40 sequences of one token: per-sequence losses reduced in two levels (40 -> 2 -> 1); and
  // sequences of 9 tokens (runs of 8 + 1, one chunk each).
  cfg.seq_len = 1;
  expect_emulation_matches_reference(40, 256, cfg, random_logits(40, 256, 73), nullptr, 74, "S 1");
  cfg = RouterConfig::deepseek_v3(1e-3f, 9);
  const auto b = random_bias(256, 75);
  expect_emulation_matches_reference(297, 256, cfg, random_logits(297, 256, 76), &b, 77, "S 9");
}

// Adversarial ties: logits of a few levels (most equal), a bias of two values (equal selection
// values across lanes and groups), rows mostly NaN (NaN keys selected, ties among them), and rows
// of +-Inf, 0 and NaN (saturated sigmoids, NaN softmax rows); every case, k and group setting.
void check_adversarial_ties() {
  uint64_t seed = 301;
  for (const EmuCase& c : emu_cases()) {
    const int64_t T = 21;
    RouterConfig cfg = c.cfg;
    if (cfg.aux_enabled()) cfg.seq_len = 7;
    for (int fill = 0; fill < 4; ++fill) {
      const auto x = tie_logits(T, c.E, cfg.top_k, fill, seed);
      const auto b = tie_bias(c.E, seed + 1);
      expect_emulation_matches_reference(
          T, c.E, cfg, x, c.bias ? &b : nullptr, seed + 2,
          "ties E " + std::to_string(c.E) + " k " + std::to_string(cfg.top_k) + " groups " +
              std::to_string(cfg.n_groups) + " fill " + std::to_string(fill));
      seed += 3;
      if (::testing::Test::HasFailure()) return;
    }
  }
}

// Each check runs the default forward kernel and the sorted one (router_fwd_sm90_f32<G, true>).
struct SortedForward {
  explicit SortedForward(bool on) { g_sort = on; }
  ~SortedForward() { g_sort = false; }
};

TEST(RouterEmu, KernelsMatchReferenceAcrossShapesAndConfigs) {
  check_shapes_and_configs();
}
TEST(RouterEmu, EqualAndNaNRows) {
  check_equal_and_nan_rows();
}
TEST(RouterEmu, AuxReductionLevels) {
  check_aux_reduction_levels();
}
TEST(RouterEmu, AdversarialTies) {
  check_adversarial_ties();
}
TEST(RouterEmu, SortedForwardMatchesReferenceAcrossShapesAndConfigs) {
  SortedForward on(true);
  check_shapes_and_configs();
}
TEST(RouterEmu, SortedForwardEqualAndNaNRows) {
  SortedForward on(true);
  check_equal_and_nan_rows();
}
TEST(RouterEmu, SortedForwardAuxReductionLevels) {
  SortedForward on(true);
  check_aux_reduction_levels();
}
TEST(RouterEmu, SortedForwardAdversarialTies) {
  SortedForward on(true);
  check_adversarial_ties();
}

}  // namespace
}  // namespace fp8flow::test
