// fp8flow-bench ops, expert-compute rows: weighted SwiGLU (+quantize), permute/unpermute and the
// routing plan, the DeepSeek-V3 router, and the grouped GEMMs at the DeepSeek-V3 shard shape.
//
// Each case builds its inputs from seeded host random data (uploaded when the arena is on the
// GPU), so the GPU and CPU reference see the same bytes. For every case:
//   verify  GPU vs CPU reference at a verification shape: bit for bit for SwiGLU, permute and the
//           router (outputs poisoned differently on each side); relative Frobenius error < 1e-2
//           for the GEMMs (cuBLASLt FP32 accumulation vs the FP64 reference; BF16 outputs);
//   time    with CUDA events (harness time_gpu), rotating input/output sets past 4x the L2;
//   report  ms, GB/s and % of the copy bandwidth (memory-bound ops), or TFLOP/s and the grouped /
//           dense throughput ratio (GEMMs; the dense row is the same API with one expert of all
//           rows, in the same run), and the published time where known.
// Without a GPU the CPU reference runs at small shapes (nothing verified).
#include "ops_moe.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <iomanip>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "fp8flow/gemm.h"
#include "fp8flow/permute.h"
#include "fp8flow/router.h"
#include "fp8flow/swiglu.h"
#include "inputs.h"

namespace fp8flow::bench {
namespace {

using Groups = std::vector<int64_t>;

double d(int64_t v) {
  return static_cast<double>(v);
}

// ---------------------------------------------------------------------------------------------
// Seeded inputs.

enum class Fill {
  Bytes,  // every byte value (FP8/E2M1/E8M0/BF16 codes, NaNs included): pure data movement
  Fp8,    // E4M3 codes without NaN, |x| <= 120
  Bf16,   // BF16 values N(0,1) * 2^[-4,4] (inputs.h random_bf16)
  Pow2,   // F32 scales 2^[-4,4]
  Prob,   // F32 in [0, 1)
  Logit,  // F32 in [-4, 4)
  Bias,   // F32 in [-0.05, 0.05)
};

uint64_t mix(uint64_t& s) {
  uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Fills `v` (contiguous, either device) with seeded values of kind `f`. Large tensors repeat a
// 16 MiB random chunk (enough for timing; verification shapes are smaller than one chunk).
void fill(const TensorView& v, Fill f, uint64_t seed) {
  const size_t n = v.bytes();
  if (n == 0) return;
  const size_t chunk = std::min(n, size_t{16} << 20);
  std::vector<uint8_t> h(chunk);
  uint64_t s = seed * 0x2545F4914F6CDD1Dull + 1;
  auto f32 = [&](float lo, float hi) {
    for (size_t i = 0; i + 4 <= chunk; i += 4) {
      const float u = static_cast<float>(mix(s) >> 40) * 0x1p-24f;
      const float x = lo + (hi - lo) * u;
      std::memcpy(&h[i], &x, 4);
    }
  };
  switch (f) {
    case Fill::Bytes:
      for (auto& b : h) b = static_cast<uint8_t>(mix(s));
      break;
    case Fill::Fp8:
      for (auto& b : h) {
        const uint64_t r = mix(s);
        b = static_cast<uint8_t>((r & 0x80u) | ((r >> 8) % 0x70u));
      }
      break;
    case Fill::Bf16: {
      const std::vector<uint16_t> x = random_bf16(chunk / 2, seed);
      std::memcpy(h.data(), x.data(), chunk / 2 * 2);
      break;
    }
    case Fill::Pow2:
      for (size_t i = 0; i + 4 <= chunk; i += 4) {
        const float x = std::ldexp(1.0f, static_cast<int>(mix(s) % 9) - 4);
        std::memcpy(&h[i], &x, 4);
      }
      break;
    case Fill::Prob:
      f32(0.0f, 1.0f);
      break;
    case Fill::Logit:
      f32(-4.0f, 4.0f);
      break;
    case Fill::Bias:
      f32(-0.05f, 0.05f);
      break;
  }
  for (size_t off = 0; off < n; off += chunk) {
    const int64_t len = static_cast<int64_t>(std::min(chunk, n - off));
    // Byte views (E4M3 is one byte an element) of the destination range and the chunk.
    const TensorView dst{static_cast<uint8_t*>(v.data) + off, DType::E4M3, 1, len, -1, v.device};
    const TensorView src{h.data(), DType::E4M3, 1, len, -1, Device::Cpu};
    copy_view(dst, src);
  }
}

// A host vector copied into a new arena tensor.
TensorView upload_i32(Arena& a, const std::vector<int32_t>& x, int64_t rows, int64_t cols) {
  const TensorView t = a.tensor(DType::I32, rows, cols);
  copy_view(t, TensorView{const_cast<int32_t*>(x.data()), DType::I32, rows, cols, -1, Device::Cpu});
  return t;
}

void fill_scaled(const ScaledTensor& t, Fill data, Fill scale, uint64_t seed) {
  fill(t.data, data, seed);
  fill(t.scale, scale, seed + 1);
}

Stream stream_for(const Arena& a) {
  return a.device() == Device::Cpu ? nullptr : bench_stream();
}

// ---------------------------------------------------------------------------------------------
// Cases.

enum class Size { Timed, Verify };

struct MoeCall {
  std::function<void(Stream)> call;
  NamedViews outputs;
  double work = 0;  // bytes (read + written) or FLOPs of one call
};

struct MoeCase {
  std::string name, shape;
  bool flops = false;       // work is FLOPs: TFLOP/s instead of GB/s
  double rel_tol = 0;       // 0: verify bit for bit; > 0: relative Frobenius error bound
  double published_ms = 0;  // published time at the timed shape (full runs only)
  std::string dense;        // grouped GEMM rows: label of the dense reference row
  std::string notes;
  int batch = 32;  // timed launches per gate (harness time_gpu)
  std::function<MoeCall(Arena&, Size)> prepare;
  // Grouped GEMM rows run with GroupedGemmOptions::algo = gemm_algo (--gemm-algos); for algo > 0,
  // `baseline` prepares the same timed call with algo 0 (same seeded inputs) to compare against.
  bool gemm = false;
  int gemm_algo = 0;
  std::function<MoeCall(Arena&)> baseline;
  std::string label() const { return name + " " + shape; }
};

// Shapes of one run mode: full (GPU), quick (GPU, --quick) or the CPU reference fallback.
enum class Mode { Full, Quick, Cpu };

// --- SwiGLU: in BF16 [M][2F], prob F32 [M], dy BF16 [M][F].

void add_swiglu(std::vector<MoeCase>& out, Mode mode) {
  const int64_t F = 2048;
  const int64_t M = mode == Mode::Full ? 32768 : mode == Mode::Quick ? 4096 : 256;
  const int64_t vM = 1024;
  struct V {
    const char* name;
    bool bwd, fp8;
    double published;
    bool saved = false;  // fp8-flow recipes: forward also writes the E4M3 h, backward reads it
  };
  const V vs[] = {{"swiglu fwd e4m3", false, true, 0.118},
                  {"swiglu fwd bf16", false, false, 0},
                  {"swiglu bwd e4m3+dprob", true, true, 0.211},
                  {"swiglu bwd bf16+dprob", true, false, 0},
                  {"swiglu fwd e4m3+saved e4m3 h", false, true, 0, true},
                  {"swiglu bwd e4m3+dprob from e4m3 h", true, true, 0, true}};
  for (const V& v : vs) {
    MoeCase c;
    c.name = v.name;
    c.shape = std::to_string(M) + "x2x" + std::to_string(F);
    if (mode == Mode::Full) c.published_ms = v.published;
    c.prepare = [v, M, vM, F](Arena& a, Size size) {
      const int64_t m = size == Size::Verify ? vM : M;
      const TensorView in = a.tensor(DType::BF16, m, 2 * F);
      const TensorView prob = a.tensor(DType::F32, m, 1);
      fill(in, Fill::Bf16, 11);
      fill(prob, Fill::Prob, 12);
      const double mf = d(m) * d(F);
      MoeCall r;
      if (!v.bwd) {
        // Reads in (4 MF bytes) and prob (4 M); writes y: E4M3 MF + F32 scales [F/128][M], or
        // BF16 2 MF.
        if (v.saved) {
          // + the saved copy of in: E4M3 2 MF + F32 scales [2F/128][M].
          const ScaledTensor y = a.scaled(DType::E4M3, ScaleLayout::Rowwise1x128, m, F);
          const ScaledTensor hq = a.scaled(DType::E4M3, ScaleLayout::Rowwise1x128, m, 2 * F);
          r.call = [in, prob, y, hq](Stream st) { swiglu(in, prob, y, hq, {}, st); };
          r.outputs = {
              {"y.data", y.data}, {"y.scale", y.scale}, {"h.data", hq.data}, {"h.scale", hq.scale}};
          r.work =
              4 * mf + 4 * d(m) + mf + 4 * d(F / 128) * d(m) + 2 * mf + 4 * d(2 * F / 128) * d(m);
        } else if (v.fp8) {
          const ScaledTensor y = a.scaled(DType::E4M3, ScaleLayout::Rowwise1x128, m, F);
          r.call = [in, prob, y](Stream st) { swiglu(in, prob, y, {}, st); };
          r.outputs = {{"y.data", y.data}, {"y.scale", y.scale}};
          r.work = 4 * mf + 4 * d(m) + mf + 4 * d(F / 128) * d(m);
        } else {
          const TensorView y = a.tensor(DType::BF16, m, F);
          r.call = [in, prob, y](Stream st) { swiglu(in, prob, y, {}, st); };
          r.outputs = {{"y", y}};
          r.work = 4 * mf + 4 * d(m) + 2 * mf;
        }
        return r;
      }
      // Backward reads dy (2 MF), in (4 MF), prob (4 M); writes din: E4M3 2 MF + F32 scales
      // [2F/128][M], or BF16 4 MF; and dprob (4 M).
      const TensorView dy = a.tensor(DType::BF16, m, F);
      fill(dy, Fill::Bf16, 13);
      const TensorView dprob = a.tensor(DType::F32, m, 1);
      if (v.saved) {
        // From the saved E4M3 h (made here by the forward): in is read as E4M3 2 MF + F32 scales
        // [2F/128][M] instead of BF16 4 MF.
        const ScaledTensor y = a.scaled(DType::E4M3, ScaleLayout::Rowwise1x128, m, F);
        const ScaledTensor hq = a.scaled(DType::E4M3, ScaleLayout::Rowwise1x128, m, 2 * F);
        swiglu(in, prob, y, hq, {}, stream_for(a));
        const ScaledTensor din = a.scaled(DType::E4M3, ScaleLayout::Rowwise1x128, m, 2 * F);
        r.call = [dy, hq, prob, din, dprob](Stream st) {
          swiglu_backward(dy, hq, prob, din, dprob, {}, st);
        };
        r.outputs = {{"din.data", din.data}, {"din.scale", din.scale}, {"dprob", dprob}};
        r.work = 2 * mf + 2 * mf + 4 * d(2 * F / 128) * d(m) + 4 * d(m) + 2 * mf +
                 4 * d(2 * F / 128) * d(m) + 4 * d(m);
      } else if (v.fp8) {
        const ScaledTensor din = a.scaled(DType::E4M3, ScaleLayout::Rowwise1x128, m, 2 * F);
        r.call = [dy, in, prob, din, dprob](Stream st) {
          swiglu_backward(dy, in, prob, din, dprob, {}, st);
        };
        r.outputs = {{"din.data", din.data}, {"din.scale", din.scale}, {"dprob", dprob}};
        r.work = 6 * mf + 4 * d(m) + 2 * mf + 4 * d(2 * F / 128) * d(m) + 4 * d(m);
      } else {
        const TensorView din = a.tensor(DType::BF16, m, 2 * F);
        r.call = [dy, in, prob, din, dprob](Stream st) {
          swiglu_backward(dy, in, prob, din, dprob, {}, st);
        };
        r.outputs = {{"din", din}, {"dprob", dprob}};
        r.work = 6 * mf + 8 * d(m) + 4 * mf;
      }
      return r;
    };
    out.push_back(std::move(c));
  }
}

// --- Permute: uniform top-k routing (k distinct experts per token), plan, then the moves.

std::vector<int32_t> route_uniform(int64_t T, int64_t k, int64_t E, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> idx(static_cast<size_t>(T * k));
  std::vector<int32_t> perm(static_cast<size_t>(E));
  std::iota(perm.begin(), perm.end(), 0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < k; ++j) {  // partial Fisher-Yates: k distinct experts (k <= E)
      std::uniform_int_distribution<int64_t> u(j, E - 1);
      std::swap(perm[static_cast<size_t>(j)], perm[static_cast<size_t>(u(rng))]);
      idx[static_cast<size_t>(t * k + j)] = perm[static_cast<size_t>(j)];
    }
  return idx;
}

// M_pad of a routing: sum over experts of the count rounded up to `align`.
int64_t padded_rows(const std::vector<int32_t>& idx, int64_t E, int64_t align) {
  std::vector<int64_t> cnt(static_cast<size_t>(E), 0);
  for (int32_t e : idx)
    if (e >= 0 && e < E) ++cnt[static_cast<size_t>(e)];
  int64_t r = 0;
  for (int64_t c : cnt) r += (c + align - 1) / align * align;
  return r;
}

enum class PermOp { Plan, Fp8, Mx, Bf16, Unpermute };

void add_permute(std::vector<MoeCase>& out, Mode mode) {
  const int64_t T = mode == Mode::Full ? 4096 : mode == Mode::Quick ? 512 : 256;
  const int64_t k = 8, H = 7168;
  const int align = 16;
  struct V {
    const char* name;
    PermOp op;
  };
  const V vs[] = {{"make_permutation", PermOp::Plan},
                  {"permute fp8+scales+probs", PermOp::Fp8},
                  {"permute mxfp4+e8m0+probs", PermOp::Mx},
                  {"permute bf16", PermOp::Bf16},
                  {"unpermute bf16", PermOp::Unpermute}};
  for (int64_t E : {int64_t{32}, int64_t{256}})
    for (const V& v : vs) {
      MoeCase c;
      c.name = std::string(v.name) + " E=" + std::to_string(E);
      c.shape = std::to_string(T) + "x" + std::to_string(H) + " k" + std::to_string(k);
      if (mode == Mode::Full && v.op == PermOp::Fp8) {
        c.published_ms = 1.127;
        c.notes = "publ.: FP8 permute+pad, 4096 tok, top-8, H 7168";
      }
      // Verified at the timed shape (the CPU reference is a plain gather).
      c.prepare = [op = v.op, T, k, H, E, align](Arena& a, Size) {
        const Stream st = stream_for(a);
        const std::vector<int32_t> idx = route_uniform(T, k, E, 100 + static_cast<uint64_t>(E));
        const int64_t bound = permutation_max_rows(T, k, E, align);
        const TensorView ids = upload_i32(a, idx, T, k);
        const PermutationPlan plan{a.tensor(DType::I32, 1, E), a.tensor(DType::I64, 1, E + 1),
                                   a.tensor(DType::I32, T, k), a.tensor(DType::I32, 1, bound),
                                   a.tensor(DType::I32, 1, 1)};
        const size_t ws_bytes =
            a.device() == Device::Cpu ? 0 : permutation_workspace_bytes(T, k, E);
        void* ws =
            ws_bytes ? a.tensor(DType::E4M3, 1, static_cast<int64_t>(ws_bytes)).data : nullptr;
        const PermutationOptions popt{align};
        MoeCall r;
        if (op == PermOp::Plan) {
          r.call = [ids, E, plan, ws, ws_bytes, popt](Stream s) {
            make_permutation(ids, E, plan, ws, ws_bytes, popt, s);
          };
          r.outputs = {{"tokens_per_expert", plan.tokens_per_expert},
                       {"offsets", plan.offsets},
                       {"dest_row", plan.dest_row},
                       {"src_slot", plan.src_slot},
                       {"invalid", plan.invalid}};
          // Reads topk_idx; writes counts, offsets (I64), dest_row, all of src_slot, invalid.
          // The workspace traffic (histograms, scans) is not counted.
          r.work = 4 * d(T * k) + 4 * d(E) + 8 * d(E + 1) + 4 * d(T * k) + 4 * d(bound) + 4;
          return r;
        }
        make_permutation(ids, E, plan, ws, ws_bytes, popt, st);
        const int64_t R = padded_rows(idx, E, align);
        const int64_t tiles = rowwise_tiles(H);
        const TensorView w = a.tensor(DType::F32, T, k);
        fill(w, Fill::Prob, 21);
        // Bytes: each token row of X is gathered k times, but after the first read it mostly
        // comes from L2, so X (and its scales) count once: X read once + rows written + the maps
        // (src_slot read per output row) + probabilities (topk_weight read, prob written).
        if (op == PermOp::Fp8) {
          const ScaledTensor x = a.scaled(DType::E4M3, ScaleLayout::Rowwise1x128, T, H);
          fill_scaled(x, Fill::Bytes, Fill::Pow2, 22);
          const ScaledTensor y = a.scaled(DType::E4M3, ScaleLayout::Rowwise1x128, R, H);
          const TensorView prob = a.tensor(DType::F32, 1, R);
          r.call = [x, y, plan, w, prob](Stream s) { permute(x, y, plan, {w, prob}, s); };
          r.outputs = {{"y.data", y.data}, {"y.scale", y.scale}, {"prob", prob}};
          r.work = d(T) * d(H) + 4 * d(tiles) * d(T) + d(R) * d(H) + 4 * d(tiles) * d(R) +
                   4 * d(R) + 4 * d(T * k) + 4 * d(R);
        } else if (op == PermOp::Mx) {
          const ScaledTensor x = a.scaled(DType::E2M1x2, ScaleLayout::Mx1x32, T, H);
          fill_scaled(x, Fill::Bytes, Fill::Bytes, 23);
          const ScaledTensor y = a.scaled(DType::E2M1x2, ScaleLayout::Mx1x32, R, H);
          const TensorView prob = a.tensor(DType::F32, 1, R);
          r.call = [x, y, plan, w, prob](Stream s) { permute(x, y, plan, {w, prob}, s); };
          r.outputs = {{"y.data", y.data}, {"y.scale", y.scale}, {"prob", prob}};
          const double rb = d(H / 2 + H / 32);
          r.work = d(T) * rb + d(R) * rb + 4 * d(R) + 4 * d(T * k) + 4 * d(R);
        } else if (op == PermOp::Bf16) {
          const TensorView x = a.tensor(DType::BF16, T, H);
          fill(x, Fill::Bytes, 24);
          const TensorView y = a.tensor(DType::BF16, R, H);
          r.call = [x, y, plan](Stream s) { permute(x, y, plan, {}, s); };
          r.outputs = {{"y", y}};
          r.work = 2 * d(T) * d(H) + 2 * d(R) * d(H) + 4 * d(R);
        } else {
          // unpermute: reads the T*k real rows of y (distinct rows, each once), dest_row; writes
          // out [T][H].
          const TensorView y = a.tensor(DType::BF16, R, H);
          fill(y, Fill::Bf16, 25);
          const TensorView o = a.tensor(DType::BF16, T, H);
          r.call = [y, o, plan](Stream s) { unpermute(y, o, plan, s); };
          r.outputs = {{"out", o}};
          r.work = 2 * d(T * k) * d(H) + 2 * d(T) * d(H) + 4 * d(T * k);
        }
        return r;
      };
      out.push_back(std::move(c));
    }
}

// --- Router: DeepSeek-V3 (sigmoid + bias, 8 groups / top-4 groups, k = 8, scaling 2.5), no aux.

void add_router(std::vector<MoeCase>& out, Mode mode) {
  const int64_t T = mode == Mode::Full ? 32768 : mode == Mode::Quick ? 4096 : 256;
  const int64_t vT = 1024, E = 256;
  for (const bool bwd : {false, true}) {
    MoeCase c;
    c.name = bwd ? "router bwd dsv3" : "router fwd dsv3";
    c.shape = std::to_string(T) + "x" + std::to_string(E);
    c.prepare = [bwd, T, vT, E](Arena& a, Size size) {
      const RouterConfig cfg = RouterConfig::deepseek_v3();
      const int64_t t = size == Size::Verify ? vT : T, k = cfg.top_k;
      const TensorView logits = a.tensor(DType::F32, t, E);
      const TensorView bias = a.tensor(DType::F32, 1, E);
      fill(logits, Fill::Logit, 31);
      fill(bias, Fill::Bias, 32);
      RouterOutputs ro;
      ro.topk_idx = a.tensor(DType::I32, t, k);
      ro.topk_weight = a.tensor(DType::F32, t, k);
      ro.tokens_per_expert = a.tensor(DType::I32, 1, E);
      if (router_workspace_bytes(t, E, cfg) != 0)
        throw std::runtime_error("router: workspace expected to be 0 without the aux loss");
      MoeCall r;
      if (!bwd) {
        r.call = [logits, bias, ro, cfg](Stream s) {
          router_forward(logits, bias, ro, cfg, {}, s);
        };
        r.outputs = {{"topk_idx", ro.topk_idx},
                     {"topk_weight", ro.topk_weight},
                     {"tokens_per_expert", ro.tokens_per_expert}};
        // Reads logits and bias; writes topk_idx, topk_weight (I32 + F32 [T][k]) and the counts.
        r.work = 4 * d(t) * d(E) + 4 * d(E) + 8 * d(t * k) + 4 * d(E);
        return r;
      }
      router_forward(logits, bias, ro, cfg, {}, stream_for(a));
      const TensorView dw = a.tensor(DType::F32, t, k);
      fill(dw, Fill::Logit, 33);
      const TensorView dlogits = a.tensor(DType::F32, t, E);
      const TensorView idx = ro.topk_idx;
      r.call = [logits, idx, dw, dlogits, cfg](Stream s) {
        router_backward(logits, idx, dw, {}, {}, dlogits, cfg, s);
      };
      r.outputs = {{"d_logits", dlogits}};
      // Reads logits, topk_idx, d_topk_weight; writes d_logits.
      r.work = 4 * d(t) * d(E) + 8 * d(t * k) + 4 * d(t) * d(E);
      return r;
    };
    out.push_back(std::move(c));
  }
}

// --- Grouped GEMMs: FC1 (N = 2F = 4096, K = H = 7168) and FC2 (N = H = 7168, K = F = 2048).

// Skewed routing: weights 1/(e+1)^1.2, sizes multiples of 16, same total (as GemmBench).
Groups skewed_splits(int64_t E, int64_t total) {
  std::vector<double> w(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e) w[static_cast<size_t>(e)] = 1.0 / std::pow(d(e) + 1.0, 1.2);
  const double sum = std::accumulate(w.begin(), w.end(), 0.0);
  Groups s(static_cast<size_t>(E));
  int64_t used = 0;
  for (int64_t e = 1; e < E; ++e) {
    s[static_cast<size_t>(e)] =
        static_cast<int64_t>(w[static_cast<size_t>(e)] / sum * d(total)) / 16 * 16;
    used += s[static_cast<size_t>(e)];
  }
  s[0] = total - used;
  return s;
}

struct GemmDims {
  int64_t N = 0, K = 0;
  Groups splits;
  DType wgrad_out = DType::BF16;  // dW dtype of the FP8/BF16 wgrad (F32: the layer's main grad)
  int algo = 0;                   // GroupedGemmOptions::algo
};

MoeCall prepare_gemm(Arena& a, GroupedGemmKind kind, const GemmDims& g) {
  const int64_t N = g.N, K = g.K, E = static_cast<int64_t>(g.splits.size());
  const int64_t M = std::accumulate(g.splits.begin(), g.splits.end(), int64_t{0});
  // The splits live as long as the call (the column-wise operands' col_groups point into them).
  const auto splits = std::make_shared<const Groups>(g.splits);
  GroupedGemmOptions o;
  o.algo = g.algo;
  Workspace ws;
  if (a.device() == Device::Cuda) {
    ws.bytes = grouped_gemm_workspace_bytes(kind, N, K, *splits, o);
    if (ws.bytes) ws.data = a.tensor(DType::E4M3, 1, static_cast<int64_t>(ws.bytes)).data;
  }
  const auto R = ScaleLayout::Rowwise1x128, B = ScaleLayout::Block128x128;
  uint64_t seed = 40;
  MoeCall r;
  r.work = 2 * d(M) * d(N) * d(K);
  // The experts' FP8 weights as slices of one [E rows][cols] tensor with contiguous scales (the
  // layer's layout, which the experimental one-launch kernel requires: FP8FLOW_OWN_GEMM=1).
  auto weights8 = [&](int64_t rows, int64_t cols) {
    const int64_t rb = (rows + 127) / 128, cb = (cols + 127) / 128;
    const int64_t ss = (rb * cb + 3) / 4 * 4;  // scale floats per expert, 16-byte aligned slices
    const TensorView data = a.tensor(DType::E4M3, E * rows, cols);
    const TensorView scale = a.tensor(DType::F32, E, ss);
    std::vector<ScaledTensor> w;
    for (int64_t e = 0; e < E; ++e) {
      w.push_back(ScaledTensor{TensorView{static_cast<uint8_t*>(data.data) + e * rows * cols,
                                          DType::E4M3, rows, cols, -1, data.device},
                               TensorView{static_cast<float*>(scale.data) + e * ss, DType::F32, rb,
                                          cb, -1, scale.device},
                               B,
                               {}});
      fill_scaled(w.back(), Fill::Fp8, Fill::Pow2, ++seed);
    }
    return w;
  };
  auto weights16 = [&](int64_t rows, int64_t cols) {
    std::vector<TensorView> w;
    for (int64_t e = 0; e < E; ++e) {
      w.push_back(a.tensor(DType::BF16, rows, cols));
      fill(w.back(), Fill::Bf16, ++seed);
    }
    return w;
  };
  auto dweights = [&]() {
    std::vector<TensorView> w;
    for (int64_t e = 0; e < E; ++e) {
      w.push_back(a.tensor(g.wgrad_out, N, K));
      r.outputs.emplace_back("dw[" + std::to_string(e) + "]", w.back());
    }
    return w;
  };
  auto act8 = [&](int64_t rows, int64_t cols, std::span<const int64_t> groups) {
    const ScaledTensor t = a.scaled(DType::E4M3, R, rows, cols, groups);
    fill_scaled(t, Fill::Fp8, Fill::Pow2, ++seed);
    return t;
  };
  auto act16 = [&](int64_t rows, int64_t cols) {
    const TensorView t = a.tensor(DType::BF16, rows, cols);
    fill(t, Fill::Bf16, ++seed);
    return t;
  };
  switch (kind) {
    case GroupedGemmKind::Fp8Fprop: {
      const ScaledTensor x = act8(M, K, {});
      const auto w = weights8(N, K);
      const TensorView y = a.tensor(DType::BF16, M, N);
      r.outputs = {{"y", y}};
      r.call = [x, w, y, splits, ws, o](Stream s) {
        grouped_gemm_fprop(x, w, y, *splits, ws, o, s);
      };
      break;
    }
    case GroupedGemmKind::Fp8Dgrad: {
      const ScaledTensor dy = act8(M, N, {});
      const auto w_t = weights8(K, N);  // W_e^T [K][N] (random: any weight will do)
      const TensorView dx = a.tensor(DType::BF16, M, K);
      r.outputs = {{"dx", dx}};
      r.call = [dy, w_t, dx, splits, ws, o](Stream s) {
        grouped_gemm_dgrad(dy, w_t, dx, *splits, ws, o, s);
      };
      break;
    }
    case GroupedGemmKind::Fp8Wgrad: {
      const ScaledTensor dy_t = act8(N, M, *splits);
      const ScaledTensor x_t = act8(K, M, *splits);
      const auto dw = dweights();
      r.call = [dy_t, x_t, dw, splits, ws, o](Stream s) {
        grouped_gemm_wgrad(dy_t, x_t, dw, *splits, ws, o, s);
      };
      break;
    }
    case GroupedGemmKind::Bf16Fprop: {
      const TensorView x = act16(M, K);
      const auto w = weights16(N, K);
      const TensorView y = a.tensor(DType::BF16, M, N);
      r.outputs = {{"y", y}};
      r.call = [x, w, y, splits, ws, o](Stream s) {
        grouped_gemm_fprop_bf16(x, w, y, *splits, ws, o, s);
      };
      break;
    }
    case GroupedGemmKind::Bf16Dgrad: {
      const TensorView dy = act16(M, N);
      const auto w = weights16(N, K);
      const TensorView dx = a.tensor(DType::BF16, M, K);
      r.outputs = {{"dx", dx}};
      r.call = [dy, w, dx, splits, ws, o](Stream s) {
        grouped_gemm_dgrad_bf16(dy, w, dx, *splits, ws, o, s);
      };
      break;
    }
    case GroupedGemmKind::Bf16Wgrad: {
      const TensorView dy = act16(M, N);
      const TensorView x = act16(M, K);
      const auto dw = dweights();
      r.call = [dy, x, dw, splits, ws, o](Stream s) {
        grouped_gemm_wgrad_bf16(dy, x, dw, *splits, ws, o, s);
      };
      break;
    }
  }
  return r;
}

// gemm_algos > 1 (--gemm-algos N): for the FP8 rows at the balanced split, also one row per
// GroupedGemmOptions::algo = 1..N-1 (GPU modes only; indices the heuristic does not return are
// reported as skipped).
void add_gemm(std::vector<MoeCase>& out, Mode mode, int gemm_algos) {
  // Timed splits per mode; verification at 3 experts (K 256, N 384) with the same pattern.
  const int64_t E = mode == Mode::Full ? 32 : mode == Mode::Quick ? 8 : 3;
  const int64_t rows = mode == Mode::Full ? 1024 : mode == Mode::Quick ? 256 : 128;
  const int64_t M = E * rows;
  struct Split {
    const char* tag;
    Groups timed, verify;
  };
  const Split splits[] = {
      {"bal", Groups(static_cast<size_t>(E), rows), {128, 128, 128}},
      {"skew", mode == Mode::Cpu ? Groups{272, 0, 112} : skewed_splits(E, M), {272, 0, 112}},
      {"dense", {M}, {384}}};
  struct Fc {
    const char* tag;
    int64_t N, K;
  };
  const Fc fcs[] = {{"FC1", 4096, 7168}, {"FC2", 7168, 2048}};
  struct Variant {
    GroupedGemmKind kind;
    DType wgrad_out;  // wgrad only
  };
  const Variant variants[] = {
      {GroupedGemmKind::Fp8Fprop, DType::BF16},  {GroupedGemmKind::Fp8Dgrad, DType::BF16},
      {GroupedGemmKind::Fp8Wgrad, DType::BF16},  {GroupedGemmKind::Fp8Wgrad, DType::F32},
      {GroupedGemmKind::Bf16Fprop, DType::BF16}, {GroupedGemmKind::Bf16Dgrad, DType::BF16},
      {GroupedGemmKind::Bf16Wgrad, DType::BF16}};
  for (const Fc& fc : fcs)
    for (const Variant& v : variants) {
      const GroupedGemmKind kind = v.kind;
      const bool fp8 = kind == GroupedGemmKind::Fp8Fprop || kind == GroupedGemmKind::Fp8Dgrad ||
                       kind == GroupedGemmKind::Fp8Wgrad;
      const char* op =
          kind == GroupedGemmKind::Fp8Fprop || kind == GroupedGemmKind::Bf16Fprop   ? "fprop"
          : kind == GroupedGemmKind::Fp8Dgrad || kind == GroupedGemmKind::Bf16Dgrad ? "dgrad"
                                                                                    : "wgrad";
      // "f32": the F32 dW the layer accumulates into (its main grad), 2x the BF16 row's writes.
      const std::string name = std::string("gemm ") + fc.tag + (fp8 ? " fp8 " : " bf16 ") + op +
                               (v.wgrad_out == DType::F32 ? " f32" : "");
      // The CPU fallback runs the FP64 reference: a small N x K.
      const int64_t N = mode == Mode::Cpu ? 384 : fc.N, K = mode == Mode::Cpu ? 256 : fc.K;
      auto make = [&](const Split& s, int algo) {
        MoeCase c;
        c.name = algo > 0 ? name + " algo" + std::to_string(algo) : name;
        const int64_t ne = static_cast<int64_t>(s.timed.size());
        c.shape = std::string(s.tag) + " " + std::to_string(ne) +
                  (std::string(s.tag) == "skew" ? "/" + std::to_string(M)
                                                : "x" + std::to_string(s.timed[0]));
        c.flops = true;
        c.rel_tol = 1e-2;
        c.batch = 4;  // one call enqueues E GEMMs over several streams
        c.notes = "N " + std::to_string(N) + " K " + std::to_string(K);
        c.gemm = true;
        c.gemm_algo = algo;
        const GemmDims timed{N, K, s.timed, v.wgrad_out, algo},
            verify{384, 256, s.verify, v.wgrad_out, algo};
        c.prepare = [kind, timed, verify](Arena& a, Size size) {
          return prepare_gemm(a, kind, size == Size::Verify ? verify : timed);
        };
        if (algo > 0) {
          GemmDims base = timed;
          base.algo = 0;
          c.baseline = [kind, base](Arena& a) { return prepare_gemm(a, kind, base); };
        }
        return c;
      };
      std::string dense_label;
      for (const Split& s : splits) {
        MoeCase c = make(s, 0);
        if (std::string(s.tag) == "dense") dense_label = c.label();
        out.push_back(std::move(c));
      }
      // Grouped rows point at the dense row of the same op and FC (pushed last of the three).
      for (size_t i = out.size() - 3; i + 1 < out.size(); ++i) out[i].dense = dense_label;
      if (fp8 && mode != Mode::Cpu)
        for (int algo = 1; algo < gemm_algos; ++algo) {
          MoeCase c = make(splits[0], algo);
          c.dense = dense_label;
          out.push_back(std::move(c));
        }
    }
}

std::vector<MoeCase> build_cases(const MoeEnv& env, const std::string& only) {
  const Mode mode = !env.gpu ? Mode::Cpu : env.quick ? Mode::Quick : Mode::Full;
  std::vector<MoeCase> cases;
  add_swiglu(cases, mode);
  add_permute(cases, mode);
  add_router(cases, mode);
  add_gemm(cases, mode, env.gemm_algos);
  if (!only.empty())
    std::erase_if(cases,
                  [&](const MoeCase& c) { return c.label().find(only) == std::string::npos; });
  return cases;
}

// ---------------------------------------------------------------------------------------------
// Running.

// Relative Frobenius error of BF16/F32 outputs: ||got - want|| / ||want|| over all outputs.
// `equal` (optional): set to whether every output byte is the same.
double rel_error(const NamedViews& got, const NamedViews& want, bool* equal = nullptr) {
  if (got.size() != want.size()) throw std::runtime_error("different number of outputs");
  double err = 0, ref = 0;
  if (equal) *equal = true;
  for (size_t i = 0; i < got.size(); ++i) {
    const TensorView& g = got[i].second;
    const std::vector<uint8_t> a = host_bytes(g), b = host_bytes(want[i].second);
    if (a.size() != b.size()) throw std::runtime_error(got[i].first + ": sizes differ");
    if (equal && a != b) *equal = false;
    const bool f32 = g.dtype == DType::F32;
    const size_t n = a.size() / (f32 ? 4 : 2);
    for (size_t j = 0; j < n; ++j) {
      double x, y;
      if (f32) {
        float fx, fy;
        std::memcpy(&fx, &a[4 * j], 4);
        std::memcpy(&fy, &b[4 * j], 4);
        x = fx;
        y = fy;
      } else {
        uint16_t hx, hy;
        std::memcpy(&hx, &a[2 * j], 2);
        std::memcpy(&hy, &b[2 * j], 2);
        x = fmt::bf16_to_f32(hx);
        y = fmt::bf16_to_f32(hy);
      }
      err += (x - y) * (x - y);
      ref += y * y;
    }
  }
  const double e = std::sqrt(err / std::max(ref, 1e-300));
  return std::isnan(e) ? INFINITY : e;
}

struct Verified {
  std::string status = "-", detail;
  double rel_err = -1;
};

Verified verify_case(const MoeCase& c) {
  Verified v;
  try {
    Arena host(Device::Cpu), dev(Device::Cuda);
    const MoeCall want = c.prepare(host, Size::Verify);
    const MoeCall got = c.prepare(dev, Size::Verify);
    want.call(nullptr);
    got.call(bench_stream());
    sync_stream();
    if (c.rel_tol > 0) {
      v.rel_err = rel_error(got.outputs, want.outputs);
      v.status = v.rel_err < c.rel_tol ? "ok" : "MISMATCH";
      if (v.status != "ok") {
        std::ostringstream os;
        os << "relative error " << v.rel_err << " >= " << c.rel_tol;
        v.detail = os.str();
      }
    } else {
      const Comparison cmp = compare_outputs(got.outputs, want.outputs);
      v.status = cmp.equal ? "ok" : "MISMATCH";
      v.detail = cmp.detail;
    }
  } catch (const std::exception& e) {
    v.status = "error";
    v.detail = e.what();
  }
  return v;
}

// A --gemm-algos row against algo 0 at the timed shape (the kernels that are timed; the FP64
// reference only runs at the small verification shape, where the heuristic may pick other ones).
struct VsDefault {
  double rel_err = -1;
  bool bitwise = false;
};

VsDefault compare_to_default(const MoeCase& c) {
  Arena a(Device::Cuda);
  const MoeCall got = c.prepare(a, Size::Timed);
  const MoeCall base = c.baseline(a);
  got.call(bench_stream());
  base.call(bench_stream());
  sync_stream();
  VsDefault v;
  v.rel_err = rel_error(got.outputs, base.outputs, &v.bitwise);
  return v;
}

// An --gemm-algos index the heuristic does not return for this problem (GroupedGemmOptions::algo).
bool algo_not_returned(const MoeCase& c, const std::string& what) {
  return c.gemm_algo > 0 && what.find("options.algo") != std::string::npos;
}

struct Timed {
  Timing t;
  int sets = 1;
  double work = 0;
};

Timed time_case(const MoeEnv& env, const MoeCase& c) {
  Timed m;
  if (!env.gpu) {
    Arena a(Device::Cpu);
    const MoeCall p = c.prepare(a, Size::Timed);
    m.work = p.work;
    m.t = time_cpu([&](int) { p.call(nullptr); }, env.warmup, env.reps);
    return m;
  }
  Arena a(Device::Cuda);
  std::vector<MoeCall> sets;
  sets.push_back(c.prepare(a, Size::Timed));
  sync_stream();
  m.work = sets[0].work;
  const size_t budget = static_cast<size_t>(0.6 * static_cast<double>(device_memory().first));
  const int n = rotation_sets(a.bytes_allocated(), env.l2_bytes, budget);
  for (int i = 1; i < n; ++i) sets.push_back(c.prepare(a, Size::Timed));
  sync_stream();
  m.sets = n;
  m.t = time_gpu([&](int i) { sets[static_cast<size_t>(i % n)].call(bench_stream()); }, env.warmup,
                 env.reps, c.batch);
  return m;
}

size_t run_row(const MoeEnv& env, Report& rep, const MoeCase& c,
               std::vector<std::string>& problems) {
  const size_t r = rep.add_row();
  rep.set(r, "label", c.name);
  rep.set(r, "case", c.name);
  rep.set(r, "shape", c.shape);
  rep.set(r, "backend", std::string(env.gpu ? "sm90" : "cpu-reference"));
  std::string notes = c.notes;
  if (c.gemm) rep.set(r, "gemm_algo", static_cast<int64_t>(c.gemm_algo));
  if (env.gpu && c.gemm_algo > 0) {
    try {
      if (env.verify) {
        const VsDefault d = compare_to_default(c);
        rep.set(r, "vs_algo0_rel_err", d.rel_err);
        rep.set(r, "vs_algo0_bitwise", d.bitwise);
        std::ostringstream os;
        os << " | vs algo0 " << (d.bitwise ? "bitwise equal" : "rel err ") << std::setprecision(2);
        if (!d.bitwise) os << d.rel_err;
        notes += os.str();
        if (!(d.rel_err < c.rel_tol))
          problems.push_back(c.label() + ": relative error vs algo 0 at the timed shape " +
                             std::to_string(d.rel_err) + " >= " + std::to_string(c.rel_tol));
      }
    } catch (const std::exception& e) {
      rep.set(r, "verify", std::string("-"));
      if (!algo_not_returned(c, e.what())) {
        rep.set(r, "error", std::string(e.what()));
        problems.push_back(c.label() + ": vs algo 0: " + e.what());
        std::fprintf(stderr, "  %-40s %-16s error: %s\n", c.name.c_str(), c.shape.c_str(),
                     e.what());
        return r;
      }
      rep.set(r, "notes", notes + " | skipped: " + e.what());
      std::fprintf(stderr, "  %-40s %-16s skipped (the heuristic returns fewer algorithms)\n",
                   c.name.c_str(), c.shape.c_str());
      return r;
    }
  }
  if (!notes.empty()) rep.set(r, "notes", notes);
  if (env.gpu && env.verify) {
    Verified v = verify_case(c);
    if (v.status == "error" && algo_not_returned(c, v.detail)) {
      // The small verification shape has a shorter heuristic list: only the timed-shape check.
      v.status = "n/a";
      rep.set(r, "verify_detail", v.detail);
      v.detail.clear();
    }
    rep.set(r, "verify", v.status);
    rep.set(r, "verify_mode", std::string(c.rel_tol > 0 ? "rel_err" : "bitwise"));
    if (v.rel_err >= 0) rep.set(r, "verify_rel_err", v.rel_err);
    if (!v.detail.empty()) {
      rep.set(r, "verify_detail", v.detail);
      problems.push_back(c.label() + ": verify " + v.status + ": " + v.detail);
    }
  } else {
    rep.set(r, "verify", std::string("-"));
  }
  try {
    const Timed m = time_case(env, c);
    rep.set(r, "median_ms", m.t.median_ms);
    rep.set(r, "min_ms", m.t.min_ms);
    rep.set(r, "reps", static_cast<int64_t>(m.t.reps));
    rep.set(r, "sets", static_cast<int64_t>(m.sets));
    if (m.t.gate_timed_out) {
      rep.set(r, "gate_timeout", true);
      problems.push_back(c.label() +
                         ": the launch gate timed out (does the op synchronize the host?); "
                         "its times include host time");
    }
    if (c.flops) {
      rep.set(r, "flops", m.work);
      rep.set(r, "tflops", m.work / (m.t.median_ms * 1e9));
    } else {
      rep.set(r, "bytes", static_cast<int64_t>(std::llround(m.work)));
      const double gbps = m.work / (m.t.median_ms * 1e6);
      rep.set(r, "gbps", gbps);
      if (env.copy_gbps > 0) rep.set(r, "pct_copy", 100.0 * gbps / env.copy_gbps);
    }
    if (c.published_ms > 0) {
      rep.set(r, "published_ms", c.published_ms);
      rep.set(r, "vs_published", c.published_ms / m.t.median_ms);
    }
    std::string algos;
    if (c.gemm && env.gpu) {
      algos = grouped_gemm_last_algos();  // the timed calls' plans
      rep.set(r, "algo_config", algos);
      if (c.gemm_algo > 0) rep.set(r, "notes", notes + " | " + algos);
    }
    // One plan (balanced / dense): its config; skewed splits have one plan per expert size.
    const std::string shown = algos.find("; ") == std::string::npos ? algos : "(several plans)";
    std::fprintf(stderr, "  %-40s %-16s %10.4f ms  %s%s%s\n", c.name.c_str(), c.shape.c_str(),
                 m.t.median_ms, std::get<std::string>(rep.get(r, "verify")).c_str(),
                 shown.empty() ? "" : "  ", shown.c_str());
  } catch (const std::exception& e) {
    if (algo_not_returned(c, e.what())) {  // --no-verify: found out here
      rep.set(r, "notes", notes + " | skipped: " + e.what());
      std::fprintf(stderr, "  %-40s %-16s skipped (the heuristic returns fewer algorithms)\n",
                   c.name.c_str(), c.shape.c_str());
      return r;
    }
    rep.set(r, "error", std::string(e.what()));
    problems.push_back(c.label() + ": " + e.what());
    std::fprintf(stderr, "  %-40s %-16s error: %s\n", c.name.c_str(), c.shape.c_str(), e.what());
  }
  return r;
}

}  // namespace

std::vector<std::string> moe_case_labels(const MoeEnv& env, const std::string& only) {
  std::vector<std::string> labels;
  for (const MoeCase& c : build_cases(env, only)) labels.push_back(c.label());
  return labels;
}

void run_moe_cases(const MoeEnv& env, const std::string& only, Report& rep,
                   std::vector<std::string>& problems) {
  const std::vector<MoeCase> cases = build_cases(env, only);
  std::map<std::string, size_t> row_of;
  for (const MoeCase& c : cases) row_of[c.label()] = run_row(env, rep, c, problems);
  // Grouped / dense throughput (same FLOPs, so dense_ms / grouped_ms) where both rows ran.
  for (const MoeCase& c : cases) {
    if (c.dense.empty() || !row_of.count(c.dense)) continue;
    const Value& g = rep.get(row_of[c.label()], "median_ms");
    const Value& dn = rep.get(row_of[c.dense], "median_ms");
    if (!std::holds_alternative<double>(g) || !std::holds_alternative<double>(dn)) continue;
    const double gm = std::get<double>(g), dm = std::get<double>(dn);
    if (gm > 0 && dm > 0) {
      rep.set(row_of[c.label()], "dense_ms", dm);
      rep.set(row_of[c.label()], "pct_dense", 100.0 * dm / gm);
    }
  }
}

}  // namespace fp8flow::bench
