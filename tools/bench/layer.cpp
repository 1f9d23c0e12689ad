// fp8flow-bench layer: one MoE layer (fp8flow::MoELayer: router + routed experts + combine) timed
// end to end for each precision recipe, side by side in one run.
//
//   fp8flow-bench layer [--config dsv3-shard|dsv2-lite|small] [--recipe NAME|all]
//                       [--routing balanced|skewed] [--reps N] [--warmup N] [--json FILE]
//   fp8flow-bench layer --ep N [...]        expert parallel, one thread per GPU (N GPUs)
//   mpirun -np N fp8flow-bench layer [...]  expert parallel, one process per GPU
//
// Expert parallel (--ep N > 1, or mpirun): MoELayer(cfg, w, comm, stream) on every rank (rank
// setup shared with `comm`, ranks.h), weak scaling: each rank keeps the config's T tokens and its
// E experts as LOCAL experts, so the layer has E * N global experts (dsv3-shard: 32 per rank,
// 4096 tokens x top-8 per rank, as the papers' EP runs). The gate [E N][H] and bias are the same
// on every rank; x, dy and the local masters are seeded per rank. ep_max_recv_rows: the worst
// case if its pools fit on every rank (free memory - 1 GiB), else 1.5x the balanced expectation
// T k (skewed: 1.25x the hot rank's expectation). Per step, the slowest rank's time (after a
// barrier), median over steps; rank 0 prints and writes --json. --ep 1 is the single-GPU path.
// Without a GPU, N InProcess ranks run the tiny CPU shape.
//
// Per recipe: seeded random BF16 master weights (shared by every recipe), a layer sized for T
// tokens, one context; `warmup` untimed steps, then `reps` timed steps. One step is
//   forward(x) -> backward(dy) -> refresh_weights()
// with CUDA events between the calls, so forward, backward and the weight cast (refresh_weights:
// the FP8 / BF16 copies of the masters an optimizer step would require) are timed separately;
// "step" is forward + backward (one event interval, the weight cast excluded). Medians over reps.
// forward has one host synchronization by design (the expert offsets), so its time includes the
// host's turnaround at that point; that is the layer's real cost.
//
// NOTES: the expert weights are filled by repeating a 16 Mi-element random chunk (distinct
// values do not change GEMM time and generating 1.4 G normals on the host would dominate the
// run); x, dy and the router gate are fully random. Balanced routing relies on i.i.d. tokens and a
// random gate (logits ~ N(0, 1)): every expert gets T k / E rows in expectation; the table's
// "load" column (max / mean padded rows per expert) shows how close the run came.
#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "cli.h"
#include "fp8flow/comm.h"
#include "fp8flow/formats.h"
#include "fp8flow/moe.h"
#include "fp8flow/version.h"
#include "harness.h"
#include "ranks.h"

#if FP8FLOW_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace fp8flow::bench {
namespace {

constexpr double kMiB = 1024.0 * 1024.0;
constexpr double kGiB = 1024.0 * kMiB;

struct LayerShape {
  std::string name;
  int64_t T = 0, H = 0, F = 0, E = 0;
  RouterConfig router;
  std::string router_note;
};

// The named configurations (the brief's shapes); `tiny` is the CPU-reference fallback.
bool make_shape(const std::string& name, LayerShape& s) {
  s.name = name;
  if (name == "dsv3-shard") {
    // DeepSeek-V3's router as is: sigmoid + bias, top-8, 8 groups, top-4 groups, scaling 2.5.
    // With E = 32 local experts the 8 groups hold 4 experts each (a supported group size; the
    // full model has 8 groups of 32 over 256 experts).
    s.T = 4096, s.H = 7168, s.F = 2048, s.E = 32;
    s.router = RouterConfig::deepseek_v3();
    s.router_note =
        "DeepSeek-V3 router (sigmoid+bias, top-8, scaling 2.5), 8 groups of 4 of the 32 local "
        "experts, top-4 groups";
    return true;
  }
  if (name == "dsv2-lite") {
    // DeepSeek-V2-Lite: softmax top-6 without renormalization, no group limit. F = 1408 is
    // already 11 x 128, so no rounding is needed.
    s.T = 4096, s.H = 2048, s.F = 1408, s.E = 64;
    s.router = RouterConfig::softmax_topk(6, false);
    s.router_note =
        "softmax top-6, not renormalized (DeepSeek-V2-Lite); F 1408 = 11 x 128, unrounded";
    return true;
  }
  if (name == "small") {
    s.T = 4096, s.H = 1280, s.F = 1024, s.E = 64;
    s.router = RouterConfig::softmax_topk(7, true);
    s.router_note = "softmax top-7, renormalized";
    return true;
  }
  return false;
}

struct RecipeName {
  const char* name;
  Recipe recipe;
};
constexpr RecipeName kRecipes[] = {
    {"bf16", Recipe::Bf16},
    {"fp8-blockwise", Recipe::Fp8Blockwise},
    {"fp8-flow", Recipe::Fp8Flow},
    {"fp8-flow-mxfp4", Recipe::Fp8FlowMxfp4},
};

// ---------------------------------------------------------------------------------------------
// Seeded host data.

uint64_t splitmix(uint64_t& s) {
  uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// n values ~ N(0, sd^2) (Box-Muller), reproducible for a seed.
std::vector<float> normals(size_t n, float sd, uint64_t seed) {
  std::vector<float> v(n);
  uint64_t s = seed * 0x2545F4914F6CDD1Dull + 7;
  for (size_t i = 0; i < n; i += 2) {
    const double u1 = (static_cast<double>(splitmix(s) >> 11) + 1.0) * 0x1p-53;  // (0, 1]
    const double u2 = static_cast<double>(splitmix(s) >> 11) * 0x1p-53;
    const double r = std::sqrt(-2.0 * std::log(u1)) * sd;
    v[i] = static_cast<float>(r * std::cos(6.283185307179586 * u2));
    if (i + 1 < n) v[i + 1] = static_cast<float>(r * std::sin(6.283185307179586 * u2));
  }
  return v;
}

std::vector<uint16_t> to_bf16(const std::vector<float>& f) {
  std::vector<uint16_t> h(f.size());
  for (size_t i = 0; i < f.size(); ++i) h[i] = fmt::bf16_from_f32(f[i]);
  return h;
}

// Copies `bytes` of host data into `dst` (contiguous), repeating it when dst is larger.
void upload_repeat(const TensorView& dst, const void* src, size_t bytes) {
  const size_t n = dst.bytes();
  for (size_t off = 0; off < n; off += bytes) {
    const int64_t len = static_cast<int64_t>(std::min(bytes, n - off));
    // Byte views (E4M3: one byte an element) of the destination range and the source.
    const TensorView d{static_cast<uint8_t*>(dst.data) + off, DType::E4M3, 1, len, -1, dst.device};
    const TensorView s{const_cast<void*>(src), DType::E4M3, 1, len, -1, Device::Cpu};
    copy_view(d, s);
  }
}

// ---------------------------------------------------------------------------------------------
// Timing of one step's phases.

struct PhaseTimes {
  std::vector<double> fwd, bwd, step, wcast;
  std::vector<double> host;  // GPU: host wall clock of the forward + backward calls (enqueue time)
};

#if FP8FLOW_WITH_CUDA
void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("fp8flow-bench layer: ") + what + ": " +
                             cudaGetErrorString(e));
}
#define LAYER_CUDA(expr) check_cuda((expr), #expr)

// Four events per step (owned; destroyed on every path).
struct Events {
  cudaEvent_t e[4] = {};
  Events() {
    for (auto& x : e) LAYER_CUDA(cudaEventCreate(&x));
  }
  ~Events() {
    for (auto& x : e)
      if (x) cudaEventDestroy(x);
  }
  Events(const Events&) = delete;
  Events& operator=(const Events&) = delete;
};

float elapsed(cudaEvent_t a, cudaEvent_t b) {
  float ms = 0;
  LAYER_CUDA(cudaEventElapsedTime(&ms, a, b));
  return ms;
}
#endif

// Runs one step; `times` (may be null: warm-up) gets the phase times in ms.
// rank, n: the stall monitor's report (ranks.h), n = the step's number in the recipe.
void run_step(MoELayer& layer, MoEContext& ctx, const TensorView& x, const TensorView& y,
              const TensorView& dy, const MoEGrads& g, bool gpu, [[maybe_unused]] Stream st,
              PhaseTimes* times, [[maybe_unused]] int rank = 0, [[maybe_unused]] int64_t n = -1) {
  if (gpu) {
#if FP8FLOW_WITH_CUDA
    const auto cs = reinterpret_cast<cudaStream_t>(st);
    Events ev;
    const auto h0 = std::chrono::steady_clock::now();
    LAYER_CUDA(cudaEventRecord(ev.e[0], cs));
    rank_progress(rank, "step: MoELayer::forward", n);
    layer.forward(x, y, ctx, {}, st);
    LAYER_CUDA(cudaEventRecord(ev.e[1], cs));
    rank_progress(rank, "step: MoELayer::backward", n);
    layer.backward(dy, g, ctx, st);
    LAYER_CUDA(cudaEventRecord(ev.e[2], cs));
    const auto h1 = std::chrono::steady_clock::now();
    rank_progress(rank, "step: refresh_weights", n);
    layer.refresh_weights(st);
    LAYER_CUDA(cudaEventRecord(ev.e[3], cs));
    rank_progress(rank, "step: cudaStreamSynchronize (the GPU finishing the step)", n);
    LAYER_CUDA(cudaStreamSynchronize(cs));
    rank_progress(rank, "step: done", n);
    if (times) {
      times->fwd.push_back(elapsed(ev.e[0], ev.e[1]));
      times->bwd.push_back(elapsed(ev.e[1], ev.e[2]));
      times->step.push_back(elapsed(ev.e[0], ev.e[2]));
      times->wcast.push_back(elapsed(ev.e[2], ev.e[3]));
      times->host.push_back(std::chrono::duration<double, std::milli>(h1 - h0).count());
    }
    return;
#else
    throw std::runtime_error("fp8flow-bench layer: GPU timing in a CPU-only build");
#endif
  }
  using clk = std::chrono::steady_clock;
  const auto ms = [](clk::time_point a, clk::time_point b) {
    return std::chrono::duration<double, std::milli>(b - a).count();
  };
  const auto t0 = clk::now();
  layer.forward(x, y, ctx);
  const auto t1 = clk::now();
  layer.backward(dy, g, ctx);
  const auto t2 = clk::now();
  layer.refresh_weights();
  const auto t3 = clk::now();
  if (times) {
    times->fwd.push_back(ms(t0, t1));
    times->bwd.push_back(ms(t1, t2));
    times->step.push_back(ms(t0, t2));
    times->wcast.push_back(ms(t2, t3));
  }
}

double number(const Value& v) {
  return v.index() == 3 ? std::get<double>(v) : 0;
}

// What every rank of one run shares (options resolved, shapes, report layout).
struct LayerRun {
  bool gpu = false;
  int reps = 10, warmup = 3;
  int ep = 1;                 // ranks (1: the single-GPU layer, no communicator)
  bool ep_dedup = true;       // MoEConfig::ep_dedup (--ep-record: false)
  bool overlap_wgrad = true;  // MoEConfig::overlap_wgrad (--no-overlap-wgrad: false)
  int align = 0;              // MoEConfig::align (--align; 0: its default)
  int gemm_streams = 0;       // MoEConfig::gemm_streams (--gemm-streams; 0: its default)
  LayerShape shape;  // shape.E: experts per rank (local); the layer has E * ep global experts
  std::vector<RecipeName> recipes;
  std::string routing, routing_note;
  int hot = 1;
  double fwd_flop = 0;  // expert GEMM FLOPs of one forward on one rank (T k routed rows)
};

// Rows a rank may receive (MoEConfig::ep_max_recv_rows) when the worst case does not fit:
// balanced, 1.5x the expectation T k; skewed, 1.25x rank 0's expectation (every token's `hot`
// picks land on rank 0's experts, the other k - hot spread over the ranks). 0: the worst case.
int64_t bounded_recv_rows(const LayerRun& L) {
  const int64_t T = L.shape.T, k = L.shape.router.top_k, ep = L.ep;
  const int64_t worst = ep * T * std::min(k, L.shape.E);
  const int64_t want =
      L.routing == "balanced" ? (3 * T * k + 1) / 2 : (5 * T * (L.hot * ep + (k - L.hot)) + 3) / 4;
  return std::min(worst, want);
}

// Per-rank values gathered on every rank (comm null: this rank's only).
std::vector<int64_t> gather(Communicator* comm, const std::vector<int64_t>& mine, Stream st) {
  return comm ? comm->all_gather(mine, st) : mine;
}

// Per repetition the slowest rank's time (ms), from every rank's times (comm null: as is).
std::vector<double> slowest(Communicator* comm, const std::vector<double>& ms, int reps,
                            Stream st) {
  if (!comm) return ms;
  std::vector<int64_t> ns(static_cast<size_t>(reps), 0);
  for (size_t i = 0; i < ms.size() && i < ns.size(); ++i) ns[i] = static_cast<int64_t>(ms[i] * 1e6);
  const std::vector<int64_t> all = comm->all_gather(ns, st);
  std::vector<double> out(static_cast<size_t>(reps), 0.0);
  for (size_t q = 0; q < all.size() / ns.size(); ++q)
    for (size_t i = 0; i < out.size(); ++i)
      out[i] = std::max(out[i], static_cast<double>(all[q * ns.size() + i]) / 1e6);
  return out;
}

// One rank: its tensors, then every recipe timed; rank 0 (rep non-null) gets the rows. comm null:
// the single-GPU layer. Every collective below is reached by every rank in the same order, also
// when a recipe fails on some rank (the failure travels in the gathered `ok` flag).
int layer_rank(const LayerRun& L, Communicator* comm, Stream st, Report* rep) {
  const bool gpu = L.gpu;
  const Device where = gpu ? Device::Cuda : Device::Cpu;
  const int rank = comm ? comm->rank() : 0;
  const int64_t T = L.shape.T, H = L.shape.H, F = L.shape.F, E = L.shape.E;
  const int64_t Eg = E * L.ep;
  const int reps = std::max(L.reps, 1), warmup = L.warmup;
  const uint64_t rs = 1000 * static_cast<uint64_t>(rank);  // per-rank seed offset (rank 0: 0)

  // This rank's tensors: local expert masters, the replicated gate and bias, x, dy, outputs and
  // gradients.
  if (rank == 0)
    std::fprintf(stderr,
                 "fp8flow-bench layer: generating inputs (%s, T %lld H %lld F %lld E %lld)\n",
                 L.shape.name.c_str(), static_cast<long long>(T), static_cast<long long>(H),
                 static_cast<long long>(F), static_cast<long long>(Eg));
  rank_progress(rank, "generating inputs");
  Arena arena(where);
  const TensorView w1 = arena.tensor(DType::BF16, E * 2 * F, H);
  const TensorView w2 = arena.tensor(DType::BF16, E * H, F);
  const TensorView gate = arena.tensor(DType::F32, Eg, H);
  const TensorView bias = arena.tensor(DType::F32, 1, Eg);
  const TensorView x = arena.tensor(DType::BF16, T, H);
  const TensorView dy = arena.tensor(DType::BF16, T, H);
  const TensorView y = arena.tensor(DType::BF16, T, H);
  const MoEGrads grads{arena.tensor(DType::BF16, T, H),
                       arena.tensor(DType::F32, E * 2 * F, H),
                       arena.tensor(DType::F32, E * H, F),
                       arena.tensor(DType::F32, Eg, H),
                       {}};
  {
    const size_t chunk = size_t{16} << 20;  // elements of the repeated weight chunk
    const std::vector<uint16_t> c1 =
        to_bf16(normals(std::min<size_t>(chunk, w1.numel()), 1.0f / std::sqrt(float(H)), 11 + rs));
    upload_repeat(w1, c1.data(), c1.size() * 2);
    const std::vector<uint16_t> c2 =
        to_bf16(normals(std::min<size_t>(chunk, w2.numel()), 1.0f / std::sqrt(float(F)), 12 + rs));
    upload_repeat(w2, c2.data(), c2.size() * 2);
    // The gate and bias are replicated: the same seed on every rank.
    const std::vector<float> g =
        normals(static_cast<size_t>(Eg * H), 1.0f / std::sqrt(float(H)), 13);
    upload_repeat(gate, g.data(), g.size() * 4);
    std::vector<float> b(static_cast<size_t>(Eg), 0.0f);
    if (L.routing == "skewed")
      for (int e = 0; e < L.hot; ++e) b[static_cast<size_t>(e)] = 1.0f;
    upload_repeat(bias, b.data(), b.size() * 4);
    const std::vector<uint16_t> hx = to_bf16(normals(static_cast<size_t>(T * H), 1.0f, 14 + rs));
    upload_repeat(x, hx.data(), hx.size() * 2);
    const std::vector<uint16_t> hdy = to_bf16(normals(static_cast<size_t>(T * H), 1.0f, 15 + rs));
    upload_repeat(dy, hdy.data(), hdy.size() * 2);
  }
#if FP8FLOW_WITH_CUDA
  if (gpu) LAYER_CUDA(cudaDeviceSynchronize());  // uploads done before the bench stream runs
#endif
  const MoEWeights weights{gate, bias, w1, w2};
  if (rep) rep->meta("shared_tensor_bytes", static_cast<int64_t>(arena.bytes_allocated()));

  int errors = 0;
  for (const auto& rn : L.recipes) {
    MoEConfig cfg;
    cfg.hidden = H;
    cfg.ffn = F;
    cfg.experts = Eg;
    cfg.router = L.shape.router;
    cfg.recipe = rn.recipe;
    cfg.max_tokens = T;
    cfg.overlap_wgrad = L.overlap_wgrad;
    if (L.align > 0) cfg.align = L.align;
    if (L.gemm_streams > 0) cfg.gemm_streams = L.gemm_streams;
    std::string error;
    // Pools: the single-GPU layer as before; with EP the worst-case receive bound if it fits on
    // every rank, else bounded_recv_rows (agreed on collectively: the config must match).
    if (comm) {
      cfg.ep_size = L.ep;
      cfg.ep_dedup = L.ep_dedup;
      size_t free_b = SIZE_MAX;
      if (gpu) free_b = device_memory().first;
      const size_t margin = gpu ? size_t{1} << 30 : 0;  // NCCL, cuBLASLt and the allocator
      const size_t worst = MoELayer::memory_plan(cfg, DType::BF16, where).step_bytes(1);
      cfg.ep_max_recv_rows = bounded_recv_rows(L);
      const size_t bounded = MoELayer::memory_plan(cfg, DType::BF16, where).step_bytes(1);
      const std::vector<int64_t> fit =
          gather(comm,
                 {worst + margin <= free_b ? 1 : 0, bounded + margin <= free_b ? 1 : 0,
                  static_cast<int64_t>(std::min<size_t>(free_b, INT64_MAX))},
                 st);
      bool all_worst = true, all_bounded = true;
      int64_t min_free = INT64_MAX;
      for (size_t q = 0; q < fit.size(); q += 3) {
        all_worst = all_worst && fit[q] == 1;
        all_bounded = all_bounded && fit[q + 1] == 1;
        min_free = std::min(min_free, fit[q + 2]);
      }
      if (all_worst) cfg.ep_max_recv_rows = 0;
      if (!all_worst && !all_bounded)
        error = "pools need " + std::to_string(bounded >> 20) + " MiB (+1 GiB margin), " +
                std::to_string(min_free >> 20) + " MiB free on the fullest rank";
    }
    const MoEMemoryPlan plan = MoELayer::memory_plan(cfg, DType::BF16, where);
    if (rank == 0)
      std::fprintf(stderr, "fp8flow-bench layer: %s: pools %.3f GiB, timing %d + %d steps\n",
                   rn.name, static_cast<double>(plan.step_bytes(1)) / kGiB, warmup, L.reps);
    PhaseTimes pt;
    int wcasts = 0;
    MoECastCount cc{};
    size_t saved = 0, saved_routing = 0, layer_pool = 0, ctx_pool = 0;
    int64_t padded = 0, sum_rows = 0, max_rows = 0, nsplits = 0;
    bool nonfinite = false;
    bool comm_broken = false;
    if (error.empty()) {
      try {
        if (gpu && !comm) {
          const size_t free_b = device_memory().first;
          if (plan.step_bytes(1) > free_b)
            throw std::runtime_error("pools need " + std::to_string(plan.step_bytes(1) >> 20) +
                                     " MiB, " + std::to_string(free_b >> 20) + " MiB free");
        }
        rank_progress(rank, "MoELayer construction and make_context");
        MoELayer layer = comm ? MoELayer(cfg, weights, comm, gpu ? st : nullptr)
                              : MoELayer(cfg, weights, gpu ? st : nullptr);
        MoEContext ctx = layer.make_context();
        int64_t step_no = 0;
        auto step = [&](PhaseTimes* t) {
          rank_progress(rank, "step: barrier before it", step_no);
          if (comm) comm->barrier(st);  // the ranks start each step together
          run_step(layer, ctx, x, y, dy, grads, gpu, st, t, rank, step_no++);
        };
        for (int i = 0; i < warmup; ++i) step(nullptr);
        const int wc0 = layer.weight_casts();
        for (int i = 0; i < reps; ++i) step(&pt);
        rank_progress(rank, "recipe done, statistics");
        wcasts = (layer.weight_casts() - wc0) / reps;
        cc = ctx.casts();
        saved = ctx.saved_activation_bytes();
        saved_routing = ctx.saved_routing_bytes();
        layer_pool = layer.pool_bytes();
        ctx_pool = ctx.pool_bytes();
        const std::vector<int64_t>& ms = ctx.m_splits();
        padded = ctx.padded_rows();
        nsplits = static_cast<int64_t>(ms.size());
        for (int64_t v : ms) sum_rows += v, max_rows = std::max(max_rows, v);
        nonfinite = ctx.nonfinite().any();
      } catch (const Error& e) {
        error = e.what();
        comm_broken = comm && e.kind() == ErrorKind::Comm;
      } catch (const std::exception& e) {
        error = e.what();
      }
    }
    if (comm_broken) throw std::runtime_error(error);  // the communicator is gone: stop the run
    // Every rank's outcome and statistics (fixed size, so a failed rank still takes part).
    const std::vector<int64_t> st_all =
        gather(comm,
               {error.empty() ? 1 : 0, static_cast<int64_t>(saved), max_rows, sum_rows, nsplits,
                static_cast<int64_t>(layer_pool + ctx_pool), nonfinite ? 1 : 0},
               st);
    constexpr size_t kStats = 7;
    const int nranks = static_cast<int>(st_all.size() / kStats);
    int failed_rank = -1;
    int64_t saved_max = 0, rows_max = 0, rows_sum = 0, experts = 0, recv_max = 0, pool_max = 0;
    bool any_nonfinite = false;
    for (int q = 0; q < nranks; ++q) {
      const int64_t* v = &st_all[q * kStats];
      if (!v[0] && failed_rank < 0) failed_rank = q;
      saved_max = std::max(saved_max, v[1]);
      rows_max = std::max(rows_max, v[2]);
      rows_sum += v[3];
      recv_max = std::max(recv_max, v[3]);
      experts += v[4];
      pool_max = std::max(pool_max, v[5]);
      any_nonfinite = any_nonfinite || v[6];
    }
    const bool ok = failed_rank < 0;
    std::vector<double> fwd_t, bwd_t, step_t, wcast_t, host_t;
    if (ok) {
      fwd_t = slowest(comm, pt.fwd, reps, st);
      bwd_t = slowest(comm, pt.bwd, reps, st);
      step_t = slowest(comm, pt.step, reps, st);
      wcast_t = slowest(comm, pt.wcast, reps, st);
      if (!pt.host.empty()) host_t = slowest(comm, pt.host, reps, st);
    }
    if (!error.empty() && comm)
      std::fprintf(stderr, "fp8flow-bench layer: rank %d: %s: %s\n", rank, rn.name, error.c_str());
    if (!rep) continue;
    const size_t r = rep->add_row();
    rep->set(r, "recipe", std::string(rn.name));
    if (!ok) {
      rep->set(r, "error",
               !error.empty() ? error
                              : "failed on rank " + std::to_string(failed_rank) +
                                    " (its message is on stderr)");
      ++errors;
      continue;
    }
    const double fwd = median_of(fwd_t), bwd = median_of(bwd_t), stp = median_of(step_t);
    rep->set(r, "fwd_ms", fwd);
    rep->set(r, "bwd_ms", bwd);
    rep->set(r, "step_ms", stp);
    rep->set(r, "step_min_ms", *std::min_element(step_t.begin(), step_t.end()));
    rep->set(r, "weight_cast_ms", median_of(wcast_t));
    if (!host_t.empty()) rep->set(r, "host_ms", median_of(host_t));
    if (stp > 0) {
      rep->set(r, "tokens_per_s", static_cast<double>(T) / (stp * 1e-3));
      rep->set(r, "tflops", 3.0 * L.fwd_flop / (stp * 1e-3) / 1e12);
      rep->set(r, "gflops", 3.0 * L.fwd_flop / (stp * 1e-3) / 1e9);
    }
    if (fwd > 0) rep->set(r, "tflops_fwd", L.fwd_flop / (fwd * 1e-3) / 1e12);
    if (bwd > 0) rep->set(r, "tflops_bwd", 2.0 * L.fwd_flop / (bwd * 1e-3) / 1e12);
    rep->set(r, "casts", static_cast<int64_t>(cc.total()));
    rep->set(r, "casts_fwd", static_cast<int64_t>(cc.forward));
    rep->set(r, "casts_bwd", static_cast<int64_t>(cc.backward));
    rep->set(r, "conversions", static_cast<int64_t>(cc.conversions));
    rep->set(r, "weight_casts", static_cast<int64_t>(wcasts));
    // With EP: saved and pool are the largest rank's (rank 0's own values are in *_rank0).
    rep->set(r, "saved_activation_bytes", saved_max);
    rep->set(r, "saved_routing_bytes", static_cast<int64_t>(saved_routing));
    rep->set(r, "saved_gib", static_cast<double>(saved_max) / kGiB);
    rep->set(r, "saved_mib", static_cast<double>(saved_max) / kMiB);
    rep->set(r, "layer_pool_bytes", static_cast<int64_t>(layer_pool));
    rep->set(r, "context_pool_bytes", static_cast<int64_t>(ctx_pool));
    rep->set(r, "weight_copy_bytes", static_cast<int64_t>(plan.weight_copy_bytes));
    rep->set(r, "pool_bytes", pool_max);
    rep->set(r, "pool_gib", static_cast<double>(pool_max) / kGiB);
    rep->set(r, "pool_mib", static_cast<double>(pool_max) / kMiB);
    rep->set(r, "overlap_wgrad", static_cast<int64_t>(cfg.overlap_wgrad && gpu ? 1 : 0));
    rep->set(r, "align", static_cast<int64_t>(cfg.resolved_align()));
    rep->set(r, "gemm_streams", static_cast<int64_t>(cfg.gemm_streams));
    if (static_cast<size_t>(pool_max) != plan.step_bytes(1))
      rep->set(r, "note", std::string("pool bytes differ from memory_plan"));
    if (comm) {
      rep->set(r, "saved_activation_bytes_rank0", static_cast<int64_t>(saved));
      rep->set(r, "ep_max_recv_rows", cfg.ep_max_recv_rows);
      rep->set(r, "ep_dedup", static_cast<int64_t>(cfg.ep_dedup ? 1 : 0));
      rep->set(r, "max_recv_rows", recv_max);
      if (rows_sum > 0)
        rep->set(r, "rank_load",
                 static_cast<double>(recv_max) * nranks / static_cast<double>(rows_sum));
    }
    if (experts > 0) {
      rep->set(r, "padded_rows", comm ? rows_sum : padded);
      rep->set(r, "max_expert_rows", rows_max);
      if (rows_sum > 0)
        rep->set(r, "load",
                 static_cast<double>(rows_max) * static_cast<double>(experts) /
                     static_cast<double>(rows_sum));
    }
    if (any_nonfinite) rep->set(r, "nonfinite", true);
  }
  return errors;
}

// The table's columns (rank_load only with EP).
void set_columns(Report& rep, bool gpu, bool ep) {
  std::vector<Column> cols{
      {"recipe", "recipe", 15, true, 0, true},
      {"fwd_ms", gpu ? "fwd ms" : "fwd ms(cpu)", 11, false, 3},
      {"bwd_ms", gpu ? "bwd ms" : "bwd ms(cpu)", 11, false, 3},
      {"step_ms", gpu ? "step ms" : "step ms(cpu)", 12, false, 3},
      {"weight_cast_ms", "wcast ms", 8, false, 3},
      {"tokens_per_s", "tokens/s", 10, false, 0},
      // The CPU fallback's tiny shape shows GFLOP/s and MiB (JSON keeps tflops and bytes too).
      {gpu ? "tflops" : "gflops", gpu ? "TFLOP/s" : "GFLOP/s", 8, false, gpu ? 1 : 3},
      {"casts", "casts", 5, false},
      {"conversions", "conv", 4, false},
      {"weight_casts", "wcasts", 6, false},
      {gpu ? "saved_gib" : "saved_mib", gpu ? "saved GiB" : "saved MiB", 9, false, 3},
      {gpu ? "pool_gib" : "pool_mib", gpu ? "pool GiB" : "pool MiB", 8, false, 3},
      {"load", "load", 5, false, 2},
  };
  if (gpu) cols.insert(cols.begin() + 5, {"host_ms", "host ms", 7, false, 3});
  if (ep) cols.push_back({"rank_load", "rload", 5, false, 2});
  cols.push_back({"vs_bf16", "x bf16", 6, false, 2});
  cols.push_back({"vs_blockwise", "x blockw", 8, false, 2});
  rep.columns(std::move(cols));
}

void fill_meta(Report& rep, const LayerRun& L, const std::string& mode) {
  const int64_t T = L.shape.T, H = L.shape.H, F = L.shape.F, E = L.shape.E;
  const int64_t k = L.shape.router.top_k;
  rep.meta("tool", std::string("fp8flow-bench layer"));
  rep.meta("fp8flow", std::string(version_string()));
  rep.meta("git", git_rev());
  rep.meta("date", utc_now());
  rep.meta("mode", mode);
  if (L.gpu) {
    const DeviceInfo dev = query_device();
    rep.meta("device", dev.name);
    rep.meta("sm_count", static_cast<int64_t>(dev.sm_count));
    rep.meta("compute_capability",
             std::to_string(dev.cc_major) + "." + std::to_string(dev.cc_minor));
    rep.meta("memory_bytes", dev.mem_bytes);
    rep.meta("cuda_runtime", dev.runtime);
    rep.meta("cuda_driver", dev.driver);
  }
  rep.meta("config", L.shape.name);
  if (L.ep > 1) {
    rep.meta("ep", static_cast<int64_t>(L.ep));
    rep.meta("experts_global", E * L.ep);
    rep.meta("experts_per_rank", E);
    rep.meta("scaling", std::string("weak: T tokens and E local experts per rank"));
  }
  rep.meta("T", T);
  rep.meta("H", H);
  rep.meta("F", F);
  rep.meta("E", E * L.ep);
  rep.meta("top_k", k);
  rep.meta("routed_rows", T * k);
  rep.meta("router", L.shape.router_note);
  rep.meta("routing", L.routing_note);
  rep.meta("reps", static_cast<int64_t>(L.reps));
  rep.meta("warmup", static_cast<int64_t>(L.warmup));
  rep.meta("expert_gemm_tflop_fwd", L.fwd_flop / 1e12);
  rep.meta("expert_gemm_tflop_step", 3.0 * L.fwd_flop / 1e12);
}

void print_report(Report& rep, const LayerRun& L, const Options& opt, int errors) {
  const int64_t T = L.shape.T, H = L.shape.H, F = L.shape.F, E = L.shape.E;
  const int64_t k = L.shape.router.top_k;
  // Speedups of each recipe's step vs bf16 and vs fp8-blockwise of this run.
  double bf16_ms = 0, blockwise_ms = 0;
  for (size_t r = 0; r < rep.rows(); ++r) {
    const std::string n = std::get<std::string>(rep.get(r, "recipe"));
    if (n == "bf16") bf16_ms = number(rep.get(r, "step_ms"));
    if (n == "fp8-blockwise") blockwise_ms = number(rep.get(r, "step_ms"));
  }
  for (size_t r = 0; r < rep.rows(); ++r) {
    const double ms = number(rep.get(r, "step_ms"));
    if (ms <= 0) continue;
    if (bf16_ms > 0) rep.set(r, "vs_bf16", bf16_ms / ms);
    if (blockwise_ms > 0) rep.set(r, "vs_blockwise", blockwise_ms / ms);
  }
  rep.meta("errors", static_cast<int64_t>(errors));

  std::printf("%s", rep.table().c_str());
  if (L.ep > 1)
    std::printf(
        "# expert parallel, %d ranks, weak scaling: each rank keeps T %lld tokens and %lld local\n"
        "# experts (%lld global experts; the router picks over all of them). Times per step: the\n"
        "# slowest rank's, then the median over steps (each step after a barrier); tokens/s and\n"
        "# TFLOP/s are per rank; saved / pool = the largest rank's; rload = max / mean padded "
        "rows\n"
        "# received per rank (local experts); load is over all %lld experts. Dispatch: %s.\n",
        L.ep, static_cast<long long>(T), static_cast<long long>(E),
        static_cast<long long>(E * L.ep), static_cast<long long>(E * L.ep),
        L.ep_dedup ? "dedup, one record per (token, rank) (--ep-record: one per routed pair)"
                   : "one record per routed pair (--ep-record)");
  std::printf(
      "# %s: T %lld tokens, H %lld, F %lld, E %lld, top-%lld (%lld routed rows); %s; %s.\n"
      "# %s times: median of %d steps after %d warm-up steps (%s). step = forward + backward;\n"
      "# wcast = refresh_weights (weight copies, once per optimizer step; not in step).\n"
      "# host ms (GPU) = host wall clock of the forward + backward calls (enqueue, validation, "
      "the\n"
      "# one host sync): close to step ms means the step is host-bound.\n"
      "# tokens/s = T / step; %s = expert GEMM FLOPs of fwd + bwd (6 r H F + 12 r H F,\n"
      "# r = routed rows, router/gate GEMMs not counted) / step. casts = explicit\n"
      "# quantize/dequantize launches per step (fwd + bwd); conv = FP8->FP8 / MXFP4 conversions;\n"
      "# wcasts = weight cast launches per refresh. saved = activations saved for backward\n"
      "# (routing state excluded); pool = layer scratch + weight copies + one context's pool,\n"
      "# allocated once (MoEMemoryPlan; includes the FP8 W / W^T copies, which bf16 with BF16\n"
      "# masters does not need; excludes caller tensors and cuBLASLt's own memory) -- not a\n"
      "# measured peak. load = max / mean padded rows per expert.\n"
      "# x bf16 / x blockw = their step time / this recipe's (>1: faster). Backward: %s.\n",
      L.shape.name.c_str(), static_cast<long long>(T), static_cast<long long>(H),
      static_cast<long long>(F), static_cast<long long>(E * L.ep), static_cast<long long>(k),
      static_cast<long long>(T * k), L.shape.router_note.c_str(), L.routing_note.c_str(),
      L.gpu ? "GPU" : "CPU reference", L.reps, L.warmup,
      L.gpu ? "CUDA events; forward includes its one host sync" : "host wall clock",
      L.gpu ? "TFLOP/s" : "GFLOP/s",
      !L.gpu ? "one stream (CPU)"
      : L.overlap_wgrad
          ? "wgrads on a second stream, overlapping the dgrad chain (--no-overlap-wgrad: one)"
          : "one stream (--no-overlap-wgrad)");
  if (!L.gpu) std::printf("no GPU found: CPU reference times, not GPU performance.\n");
  if (!opt.json_path.empty()) {
    rep.write_json(opt.json_path);
    std::printf("wrote %s\n", opt.json_path.c_str());
  }
}

int run_layer(const Options& opt) {
  LayerRun L;
  const bool mpi = under_mpirun();
  const bool gpu = query_device().gpu;
  L.gpu = gpu;
  L.reps = opt.reps_given ? opt.reps : 10;
  L.warmup = opt.warmup_given ? opt.warmup : 3;

  // Options.
  const std::string config = opt.config.empty() ? "dsv3-shard" : opt.config;
  LayerShape& shape = L.shape;
  if (!make_shape(config, shape)) {
    std::fprintf(stderr,
                 "fp8flow-bench layer: --config: expected dsv3-shard, dsv2-lite or small, got "
                 "'%s'\n",
                 config.c_str());
    return 2;
  }
  const std::string recipe_opt = opt.recipe.empty() ? "all" : opt.recipe;
  for (const auto& r : kRecipes)
    if (recipe_opt == "all" || recipe_opt == r.name) L.recipes.push_back(r);
  if (L.recipes.empty()) {
    std::fprintf(stderr,
                 "fp8flow-bench layer: --recipe: expected bf16, fp8-blockwise, fp8-flow, "
                 "fp8-flow-mxfp4 or all, got '%s'\n",
                 recipe_opt.c_str());
    return 2;
  }
  L.routing = opt.routing.empty() ? "balanced" : opt.routing;
  if (L.routing != "balanced" && L.routing != "skewed") {
    std::fprintf(stderr, "fp8flow-bench layer: --routing: expected balanced or skewed, got '%s'\n",
                 L.routing.c_str());
    return 2;
  }
  if (!opt.only.empty() || opt.quick || opt.list)
    std::fprintf(stderr, "fp8flow-bench layer: --only, --quick and --list are ignored\n");

  // Ranks: --ep N (threads, one per GPU; InProcess on the CPU), or the mpirun size.
  L.ep = std::max(opt.ep, 1);
  L.ep_dedup = opt.ep_dedup;
  L.overlap_wgrad = opt.overlap_wgrad;
  L.align = opt.align;
  L.gemm_streams = opt.gemm_streams;
  if (mpi) {
    // mpirun mode: one rank per process and GPU, NCCL bootstrapped over MPI.
    if (!mpirun_mode_available("layer", "--ep", gpu)) return 2;
    if (opt.ep > 1)
      std::fprintf(stderr,
                   "fp8flow-bench layer: --ep %d ignored under mpirun (the ranks are the MPI "
                   "processes)\n",
                   opt.ep);
    L.ep = 0;  // set from MPI below
  } else if (gpu && L.ep > 1) {
    const int gpus = gpu_count();
    if (!built_with_nccl() || L.ep > gpus) {
      std::fprintf(stderr,
                   "fp8flow-bench layer: --ep %d: needs %d GPUs and NCCL (%d visible, NCCL %s)\n",
                   L.ep, L.ep, gpus, built_with_nccl() ? "on" : "off");
      return 2;
    }
  } else if (!gpu && L.ep > 16) {
    std::fprintf(stderr, "fp8flow-bench layer: --ep: at most 16 simulated ranks, got %d\n", L.ep);
    return 2;
  }

  // Without a GPU: the `small` configuration shrunk to a size the CPU reference runs quickly.
  if (!gpu) {
    std::printf(
        "fp8flow-bench layer: no CUDA device found (%s build): running the CPU reference of the "
        "'small' configuration shrunk to T 64, H 256, F 256, E 8, top-2 (--config %s ignored); "
        "times are the CPU reference's, not a GPU's.\n",
        FP8FLOW_WITH_CUDA ? "CUDA" : "CPU-only", config.c_str());
    if (L.ep > 1)
      std::printf(
          "fp8flow-bench layer: --ep %d without a GPU: %d simulated ranks (InProcess "
          "communicator, host memory, one thread each), each with T 64 tokens and 8 local "
          "experts (%d global).\n",
          L.ep, L.ep, 8 * L.ep);
    shape.name = "small-cpu-tiny";
    shape.T = 64, shape.H = 256, shape.F = 256, shape.E = 8;
    shape.router = RouterConfig::softmax_topk(2, true);
    shape.router_note = "softmax top-2, renormalized";
  }
  const int64_t k = shape.router.top_k;
  L.hot = static_cast<int>(std::max<int64_t>(1, k / 2));
  L.routing_note = L.routing == "balanced"
                       ? "balanced: random gate N(0, 1/H), i.i.d. tokens, zero selection bias"
                       : "skewed: selection bias +1 on experts 0.." + std::to_string(L.hot - 1) +
                             " (picked by every token" +
                             (L.ep > 1 ? std::string(", all on rank 0") : "") + "), 0 elsewhere";
  L.fwd_flop = 6.0 * static_cast<double>(shape.T * k) * static_cast<double>(shape.H) *
               static_cast<double>(shape.F);  // 2 r H 2F + 2 r F H

  // The single-GPU (or single CPU) layer: no communicator, the bench stream.
  if (L.ep == 1) {
    Report rep;
    fill_meta(rep, L, gpu ? "gpu" : "cpu-reference");
    set_columns(rep, gpu, false);
    const int errors = layer_rank(L, nullptr, gpu ? bench_stream() : nullptr, &rep);
    print_report(rep, L, opt, errors);
    return errors ? 1 : 0;
  }

  // Expert parallel: one rank each; rank 0 fills the report.
  Report rep;
  int errors = 0, ranks = L.ep;
  auto rank_fn = [&](const std::string& mode) {
    return [&, mode](Communicator& comm, Stream st) {
      LayerRun R = L;
      R.ep = comm.size();
      if (comm.rank() == 0) {
        fill_meta(rep, R, mode);
        set_columns(rep, gpu, R.ep > 1);
      }
      const int e =
          layer_rank(R, R.ep > 1 ? &comm : nullptr, st, comm.rank() == 0 ? &rep : nullptr);
      if (comm.rank() == 0) {
        errors = e;
        ranks = R.ep;  // read after the ranks have joined (L is shared: not written here)
      }
    };
  };
  int failed = 0;
  if (L.ep == 0) {
    if (opt.ep > 0)
      std::fprintf(stderr,
                   "fp8flow-bench layer: under mpirun the ranks are mpirun's (--ep ignored)\n");
    int rank = -1;
    failed = run_ranks_mpi(rank_fn("gpu, ep (nccl, mpirun, one process per GPU)"),
                           "fp8flow-bench layer", &rank);
    if (rank != 0) return failed ? 1 : 0;
  } else if (gpu) {
    failed = run_ranks_threads(L.ep, rank_fn("gpu, ep (nccl, one process, one thread per GPU)"),
                               "fp8flow-bench layer");
  } else {
    failed = run_ranks_inprocess(L.ep, rank_fn("cpu-reference, ep (inprocess, simulated ranks)"),
                                 "fp8flow-bench layer");
  }
  if (failed) return 1;
  L.ep = ranks;
  print_report(rep, L, opt, errors);
  return errors ? 1 : 0;
}

}  // namespace

FP8FLOW_BENCH_SUBCOMMAND(layer, "time one MoE layer (fwd, bwd, step) per precision recipe",
                         run_layer);

}  // namespace fp8flow::bench
