// fp8flow-bench layer: one MoE layer (fp8flow::MoELayer: router + routed experts + combine) timed
// end to end for each precision recipe, side by side in one run.
//
//   fp8flow-bench layer [--config dsv3-shard|dsv2-lite|small] [--recipe NAME|all]
//                       [--routing balanced|skewed] [--reps N] [--warmup N] [--json FILE]
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
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "cli.h"
#include "fp8flow/formats.h"
#include "fp8flow/moe.h"
#include "fp8flow/version.h"
#include "harness.h"

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
void run_step(MoELayer& layer, MoEContext& ctx, const TensorView& x, const TensorView& y,
              const TensorView& dy, const MoEGrads& g, bool gpu, PhaseTimes* times) {
  if (gpu) {
#if FP8FLOW_WITH_CUDA
    const Stream st = bench_stream();
    const auto cs = reinterpret_cast<cudaStream_t>(st);
    Events ev;
    LAYER_CUDA(cudaEventRecord(ev.e[0], cs));
    layer.forward(x, y, ctx, {}, st);
    LAYER_CUDA(cudaEventRecord(ev.e[1], cs));
    layer.backward(dy, g, ctx, st);
    LAYER_CUDA(cudaEventRecord(ev.e[2], cs));
    layer.refresh_weights(st);
    LAYER_CUDA(cudaEventRecord(ev.e[3], cs));
    sync_stream();
    if (times) {
      times->fwd.push_back(elapsed(ev.e[0], ev.e[1]));
      times->bwd.push_back(elapsed(ev.e[1], ev.e[2]));
      times->step.push_back(elapsed(ev.e[0], ev.e[2]));
      times->wcast.push_back(elapsed(ev.e[2], ev.e[3]));
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

int run_layer(const Options& opt) {
  const DeviceInfo dev = query_device();
  const bool gpu = dev.gpu;
  const Device where = gpu ? Device::Cuda : Device::Cpu;
  const int reps = opt.reps_given ? opt.reps : 10;
  const int warmup = opt.warmup_given ? opt.warmup : 3;

  // Options.
  const std::string config = opt.config.empty() ? "dsv3-shard" : opt.config;
  LayerShape shape;
  if (!make_shape(config, shape)) {
    std::fprintf(stderr,
                 "fp8flow-bench layer: --config: expected dsv3-shard, dsv2-lite or small, got "
                 "'%s'\n",
                 config.c_str());
    return 2;
  }
  const std::string recipe_opt = opt.recipe.empty() ? "all" : opt.recipe;
  std::vector<RecipeName> recipes;
  for (const auto& r : kRecipes)
    if (recipe_opt == "all" || recipe_opt == r.name) recipes.push_back(r);
  if (recipes.empty()) {
    std::fprintf(stderr,
                 "fp8flow-bench layer: --recipe: expected bf16, fp8-blockwise, fp8-flow, "
                 "fp8-flow-mxfp4 or all, got '%s'\n",
                 recipe_opt.c_str());
    return 2;
  }
  const std::string routing = opt.routing.empty() ? "balanced" : opt.routing;
  if (routing != "balanced" && routing != "skewed") {
    std::fprintf(stderr, "fp8flow-bench layer: --routing: expected balanced or skewed, got '%s'\n",
                 routing.c_str());
    return 2;
  }
  if (!opt.only.empty() || opt.quick || opt.list)
    std::fprintf(stderr, "fp8flow-bench layer: --only, --quick and --list are ignored\n");

  // Without a GPU: the `small` configuration shrunk to a size the CPU reference runs quickly.
  if (!gpu) {
    std::printf(
        "fp8flow-bench layer: no CUDA device found (%s build): running the CPU reference of the "
        "'small' configuration shrunk to T 64, H 256, F 256, E 8, top-2 (--config %s ignored); "
        "times are the CPU reference's, not a GPU's.\n",
        FP8FLOW_WITH_CUDA ? "CUDA" : "CPU-only", config.c_str());
    shape.name = "small-cpu-tiny";
    shape.T = 64, shape.H = 256, shape.F = 256, shape.E = 8;
    shape.router = RouterConfig::softmax_topk(2, true);
    shape.router_note = "softmax top-2, renormalized";
  }
  const int64_t T = shape.T, H = shape.H, F = shape.F, E = shape.E;
  const int64_t k = shape.router.top_k;
  const int64_t rows = T * k;
  const int hot = static_cast<int>(std::max<int64_t>(1, k / 2));
  const std::string routing_note =
      routing == "balanced" ? "balanced: random gate N(0, 1/H), i.i.d. tokens, zero selection bias"
                            : "skewed: selection bias +1 on experts 0.." + std::to_string(hot - 1) +
                                  " (picked by every token), 0 elsewhere";

  Report rep;
  rep.meta("tool", std::string("fp8flow-bench layer"));
  rep.meta("fp8flow", std::string(version_string()));
  rep.meta("git", git_rev());
  rep.meta("date", utc_now());
  rep.meta("mode", std::string(gpu ? "gpu" : "cpu-reference"));
  if (gpu) {
    rep.meta("device", dev.name);
    rep.meta("sm_count", static_cast<int64_t>(dev.sm_count));
    rep.meta("compute_capability",
             std::to_string(dev.cc_major) + "." + std::to_string(dev.cc_minor));
    rep.meta("memory_bytes", dev.mem_bytes);
    rep.meta("cuda_runtime", dev.runtime);
    rep.meta("cuda_driver", dev.driver);
  }
  rep.meta("config", shape.name);
  rep.meta("T", T);
  rep.meta("H", H);
  rep.meta("F", F);
  rep.meta("E", E);
  rep.meta("top_k", k);
  rep.meta("routed_rows", rows);
  rep.meta("router", shape.router_note);
  rep.meta("routing", routing_note);
  rep.meta("reps", static_cast<int64_t>(reps));
  rep.meta("warmup", static_cast<int64_t>(warmup));
  const double fwd_flop = 6.0 * static_cast<double>(rows) * static_cast<double>(H) *
                          static_cast<double>(F);  // 2 r H 2F + 2 r F H
  rep.meta("expert_gemm_tflop_fwd", fwd_flop / 1e12);
  rep.meta("expert_gemm_tflop_step", 3.0 * fwd_flop / 1e12);

  // Shared tensors: masters, gate, bias, x, dy, outputs and gradients.
  std::fprintf(stderr, "fp8flow-bench layer: generating inputs (%s, T %lld H %lld F %lld E %lld)\n",
               shape.name.c_str(), static_cast<long long>(T), static_cast<long long>(H),
               static_cast<long long>(F), static_cast<long long>(E));
  Arena arena(where);
  const TensorView w1 = arena.tensor(DType::BF16, E * 2 * F, H);
  const TensorView w2 = arena.tensor(DType::BF16, E * H, F);
  const TensorView gate = arena.tensor(DType::F32, E, H);
  const TensorView bias = arena.tensor(DType::F32, 1, E);
  const TensorView x = arena.tensor(DType::BF16, T, H);
  const TensorView dy = arena.tensor(DType::BF16, T, H);
  const TensorView y = arena.tensor(DType::BF16, T, H);
  const MoEGrads grads{arena.tensor(DType::BF16, T, H),
                       arena.tensor(DType::F32, E * 2 * F, H),
                       arena.tensor(DType::F32, E * H, F),
                       arena.tensor(DType::F32, E, H),
                       {}};
  {
    const size_t chunk = size_t{16} << 20;  // elements of the repeated weight chunk
    const std::vector<uint16_t> c1 =
        to_bf16(normals(std::min<size_t>(chunk, w1.numel()), 1.0f / std::sqrt(float(H)), 11));
    upload_repeat(w1, c1.data(), c1.size() * 2);
    const std::vector<uint16_t> c2 =
        to_bf16(normals(std::min<size_t>(chunk, w2.numel()), 1.0f / std::sqrt(float(F)), 12));
    upload_repeat(w2, c2.data(), c2.size() * 2);
    const std::vector<float> g =
        normals(static_cast<size_t>(E * H), 1.0f / std::sqrt(float(H)), 13);
    upload_repeat(gate, g.data(), g.size() * 4);
    std::vector<float> b(static_cast<size_t>(E), 0.0f);
    if (routing == "skewed")
      for (int e = 0; e < hot; ++e) b[static_cast<size_t>(e)] = 1.0f;
    upload_repeat(bias, b.data(), b.size() * 4);
    const std::vector<uint16_t> hx = to_bf16(normals(static_cast<size_t>(T * H), 1.0f, 14));
    upload_repeat(x, hx.data(), hx.size() * 2);
    const std::vector<uint16_t> hdy = to_bf16(normals(static_cast<size_t>(T * H), 1.0f, 15));
    upload_repeat(dy, hdy.data(), hdy.size() * 2);
  }
#if FP8FLOW_WITH_CUDA
  if (gpu) LAYER_CUDA(cudaDeviceSynchronize());  // uploads done before the bench stream runs
#endif
  const MoEWeights weights{gate, bias, w1, w2};
  rep.meta("shared_tensor_bytes", static_cast<int64_t>(arena.bytes_allocated()));

  rep.columns({
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
      {"vs_bf16", "x bf16", 6, false, 2},
      {"vs_blockwise", "x blockw", 8, false, 2},
  });

  int errors = 0;
  for (const auto& rn : recipes) {
    const size_t r = rep.add_row();
    rep.set(r, "recipe", std::string(rn.name));
    try {
      MoEConfig cfg;
      cfg.hidden = H;
      cfg.ffn = F;
      cfg.experts = E;
      cfg.router = shape.router;
      cfg.recipe = rn.recipe;
      cfg.max_tokens = T;
      const MoEMemoryPlan plan = MoELayer::memory_plan(cfg, DType::BF16, where);
      std::fprintf(stderr, "fp8flow-bench layer: %s: pools %.3f GiB, timing %d + %d steps\n",
                   rn.name, static_cast<double>(plan.step_bytes(1)) / kGiB, warmup, reps);
      if (gpu) {
        const size_t free_b = device_memory().first;
        if (plan.step_bytes(1) > free_b)
          throw std::runtime_error("pools need " + std::to_string(plan.step_bytes(1) >> 20) +
                                   " MiB, " + std::to_string(free_b >> 20) + " MiB free");
      }
      MoELayer layer(cfg, weights, gpu ? bench_stream() : nullptr);
      MoEContext ctx = layer.make_context();
      for (int i = 0; i < warmup; ++i) run_step(layer, ctx, x, y, dy, grads, gpu, nullptr);
      PhaseTimes pt;
      const int wc0 = layer.weight_casts();
      for (int i = 0; i < std::max(reps, 1); ++i) run_step(layer, ctx, x, y, dy, grads, gpu, &pt);
      const int wcasts = (layer.weight_casts() - wc0) / std::max(reps, 1);
      const double fwd = median_of(pt.fwd), bwd = median_of(pt.bwd), step = median_of(pt.step);
      rep.set(r, "fwd_ms", fwd);
      rep.set(r, "bwd_ms", bwd);
      rep.set(r, "step_ms", step);
      rep.set(r, "step_min_ms", *std::min_element(pt.step.begin(), pt.step.end()));
      rep.set(r, "weight_cast_ms", median_of(pt.wcast));
      if (step > 0) {
        rep.set(r, "tokens_per_s", static_cast<double>(T) / (step * 1e-3));
        rep.set(r, "tflops", 3.0 * fwd_flop / (step * 1e-3) / 1e12);
        rep.set(r, "gflops", 3.0 * fwd_flop / (step * 1e-3) / 1e9);
      }
      if (fwd > 0) rep.set(r, "tflops_fwd", fwd_flop / (fwd * 1e-3) / 1e12);
      if (bwd > 0) rep.set(r, "tflops_bwd", 2.0 * fwd_flop / (bwd * 1e-3) / 1e12);
      const MoECastCount cc = ctx.casts();
      rep.set(r, "casts", static_cast<int64_t>(cc.total()));
      rep.set(r, "casts_fwd", static_cast<int64_t>(cc.forward));
      rep.set(r, "casts_bwd", static_cast<int64_t>(cc.backward));
      rep.set(r, "conversions", static_cast<int64_t>(cc.conversions));
      rep.set(r, "weight_casts", static_cast<int64_t>(wcasts));
      rep.set(r, "saved_activation_bytes", static_cast<int64_t>(ctx.saved_activation_bytes()));
      rep.set(r, "saved_routing_bytes", static_cast<int64_t>(ctx.saved_routing_bytes()));
      rep.set(r, "saved_gib", static_cast<double>(ctx.saved_activation_bytes()) / kGiB);
      rep.set(r, "saved_mib", static_cast<double>(ctx.saved_activation_bytes()) / kMiB);
      rep.set(r, "layer_pool_bytes", static_cast<int64_t>(layer.pool_bytes()));
      rep.set(r, "context_pool_bytes", static_cast<int64_t>(ctx.pool_bytes()));
      rep.set(r, "weight_copy_bytes", static_cast<int64_t>(plan.weight_copy_bytes));
      const size_t pool = layer.pool_bytes() + ctx.pool_bytes();
      rep.set(r, "pool_bytes", static_cast<int64_t>(pool));
      rep.set(r, "pool_gib", static_cast<double>(pool) / kGiB);
      rep.set(r, "pool_mib", static_cast<double>(pool) / kMiB);
      if (pool != plan.step_bytes(1))
        rep.set(r, "note", std::string("pool bytes differ from memory_plan"));
      const std::vector<int64_t>& ms = ctx.m_splits();
      if (!ms.empty()) {
        int64_t sum = 0, mx = 0;
        for (int64_t v : ms) sum += v, mx = std::max(mx, v);
        rep.set(r, "padded_rows", ctx.padded_rows());
        rep.set(r, "max_expert_rows", mx);
        if (sum > 0)
          rep.set(
              r, "load",
              static_cast<double>(mx) * static_cast<double>(ms.size()) / static_cast<double>(sum));
      }
      if (ctx.nonfinite().any()) rep.set(r, "nonfinite", true);
    } catch (const std::exception& e) {
      rep.set(r, "error", std::string(e.what()));
      ++errors;
    }
  }

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
  std::printf(
      "# %s: T %lld tokens, H %lld, F %lld, E %lld, top-%lld (%lld routed rows); %s; %s.\n"
      "# %s times: median of %d steps after %d warm-up steps (%s). step = forward + backward;\n"
      "# wcast = refresh_weights (weight copies, once per optimizer step; not in step).\n"
      "# tokens/s = T / step; %s = expert GEMM FLOPs of fwd + bwd (6 r H F + 12 r H F,\n"
      "# r = routed rows, router/gate GEMMs not counted) / step. casts = explicit\n"
      "# quantize/dequantize launches per step (fwd + bwd); conv = FP8->FP8 / MXFP4 conversions;\n"
      "# wcasts = weight cast launches per refresh. saved = activations saved for backward\n"
      "# (routing state excluded); pool = layer scratch + weight copies + one context's pool,\n"
      "# allocated once (MoEMemoryPlan; includes the FP8 W / W^T copies, which bf16 with BF16\n"
      "# masters does not need; excludes caller tensors and cuBLASLt's own memory) -- not a\n"
      "# measured peak. load = max / mean padded rows per expert.\n"
      "# x bf16 / x blockw = their step time / this recipe's (>1: faster).\n",
      shape.name.c_str(), static_cast<long long>(T), static_cast<long long>(H),
      static_cast<long long>(F), static_cast<long long>(E), static_cast<long long>(k),
      static_cast<long long>(rows), shape.router_note.c_str(), routing_note.c_str(),
      gpu ? "GPU" : "CPU reference", reps, warmup,
      gpu ? "CUDA events; forward includes its one host sync" : "host wall clock",
      gpu ? "TFLOP/s" : "GFLOP/s");
  if (!gpu) std::printf("no GPU found: CPU reference times, not GPU performance.\n");
  if (!opt.json_path.empty()) {
    rep.write_json(opt.json_path);
    std::printf("wrote %s\n", opt.json_path.c_str());
  }
  return errors ? 1 : 0;
}

}  // namespace

FP8FLOW_BENCH_SUBCOMMAND(layer, "time one MoE layer (fwd, bwd, step) per precision recipe",
                         run_layer);

}  // namespace fp8flow::bench
