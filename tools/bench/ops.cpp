// fp8flow-bench ops: verify and time each FP8/MXFP4 op at the shapes of the papers.
//
// For every case (op x shape):
//   verify  the op on the GPU and on the CPU reference at the same K and min(M, --verify-rows)
//           rows (expert splits scaled to match), inputs made by the CPU reference and uploaded;
//           outputs (data, scales, underflow count) compared bit for bit; output buffers are
//           poisoned differently on each side so an unwritten byte cannot pass;
//   time    the full shape with CUDA events (warm-up, then median and min over --reps), rotating
//           over several input/output sets when one set is smaller than 4x the L2;
//   report  ms, GB/s (bytes read + written, counted per op below, scales included), % of the
//           device-to-device copy bandwidth measured in the same run, the speed-up over the naive
//           path where there is one (a separate row), and the published time where known.
// Without a CUDA device the CPU reference runs on small shapes and nothing is verified.
// The expert-compute rows (SwiGLU, permute, router, grouped GEMMs) come from ops_moe.cpp and run
// after these, into the same report.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <deque>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "cli.h"
#include "harness.h"
#include "inputs.h"
#include "ops_moe.h"

namespace fp8flow::bench {
namespace {

using Groups = std::vector<int64_t>;

// ---------------------------------------------------------------------------------------------
// Bytes of each tensor form at M x K (the building blocks of every op's count below).
double d(int64_t v) {
  return static_cast<double>(v);
}
// BF16 [M][K].
double bf16_bytes(int64_t M, int64_t K) {
  return 2 * d(M) * d(K);
}
// E4M3 row-wise [M][K] + F32 scales [ceil(K/128)][M].
double fp8_row_bytes(int64_t M, int64_t K) {
  return d(M) * d(K) + 4 * d(rowwise_tiles(K)) * d(M);
}
// E4M3 column-wise X^T [K][M] + F32 scales [tiles(M, groups)][K].
double fp8_col_bytes(int64_t M, int64_t K, std::span<const int64_t> g) {
  return d(K) * d(M) + 4 * d(rowwise_tiles(M, g)) * d(K);
}
// MXFP4 [M][K]: E2M1x2 data (K/2 bytes a row) + E8M0 scales [M][K/32].
double mx_bytes(int64_t M, int64_t K) {
  return d(M) * d(K) / 2 + d(M) * d(K / 32);
}

// ---------------------------------------------------------------------------------------------
// Ops as the bench sees them: which input form they read, how many bytes one call moves, and how
// to allocate their outputs (in an arena on either device) and call them.

enum class Src { Bf16, Fp8, Mx };

// The input forms of one M x K problem: BF16 values, their E4M3 row-wise quantization, their MXFP4
// quantization (only the form an op reads is filled).
struct Inputs {
  TensorView bf16;
  ScaledTensor fp8;
  ScaledTensor mx;
};

struct Shape {
  int64_t M = 0, K = 0;
  std::span<const int64_t> groups;  // m_splits of the column-wise outputs; empty = one group
};

// A ready call plus the outputs a verification compares.
struct Prepared {
  std::function<void(Stream)> call;
  NamedViews outputs;
};

struct OpDef {
  std::string name;
  Src src = Src::Bf16;
  std::function<double(const Shape&)> bytes;  // read + written by one call
  // `count`: also request the transpose's underflow count (verification only; not timed).
  std::function<Prepared(Arena&, const Inputs&, const Shape&, bool count)> prepare;
};

ScaledTensor fp8_row(Arena& a, const Shape& s) {
  return a.scaled(DType::E4M3, ScaleLayout::Rowwise1x128, s.M, s.K);
}
ScaledTensor fp8_col(Arena& a, const Shape& s) {
  return a.scaled(DType::E4M3, ScaleLayout::Rowwise1x128, s.K, s.M, s.groups);
}
ScaledTensor mxfp4(Arena& a, const Shape& s) {
  return a.scaled(DType::E2M1x2, ScaleLayout::Mx1x32, s.M, s.K);
}
NamedViews outs(const char* name, const ScaledTensor& t) {
  return {{std::string(name) + ".data", t.data}, {std::string(name) + ".scale", t.scale}};
}
void append(NamedViews& a, const NamedViews& b) {
  a.insert(a.end(), b.begin(), b.end());
}

// `timed_count`: the timed calls also count underflows (what MoELayer does with
// MoEConfig::count_underflow); otherwise only the verification call does.
OpDef op_transpose(TransposeScalePolicy policy, bool timed_count = false) {
  OpDef o;
  o.name = policy == TransposeScalePolicy::ColumnTight ? "transpose_scaled col_tight"
                                                       : "transpose_scaled tile_max";
  if (timed_count) o.name += "+count";
  o.src = Src::Fp8;
  // Reads E4M3 [M][K] + its scales [K/128][M]; writes E4M3 [K][M] + scales [tiles(M)][K].
  o.bytes = [](const Shape& s) {
    return fp8_row_bytes(s.M, s.K) + fp8_col_bytes(s.M, s.K, s.groups);
  };
  o.prepare = [policy, timed_count](Arena& a, const Inputs& in, const Shape& s, bool count) {
    count = count || timed_count;
    const ScaledTensor out = fp8_col(a, s);
    TransposeOptions opt;
    opt.policy = policy;
    Prepared p;
    p.outputs = outs("out_t", out);
    if (count) {
      const TensorView c = a.tensor(DType::I64, 1, 1);
      opt.underflow_count = c.ptr<int64_t>();
      p.outputs.emplace_back("underflow_count", c);
    }
    const ScaledTensor x = in.fp8;
    p.call = [x, out, opt](Stream st) { transpose_scaled(x, out, opt, st); };
    return p;
  };
  return o;
}

OpDef op_naive_transpose() {
  OpDef o;
  o.name = "naive: dequantize+quantize_transposed";
  o.src = Src::Fp8;
  // dequantize: E4M3 [M][K] + scales -> BF16 [M][K]; quantize_transposed: BF16 [M][K] ->
  // E4M3 [K][M] + scales [tiles(M)][K]. The BF16 intermediate is written and read once.
  o.bytes = [](const Shape& s) {
    return fp8_row_bytes(s.M, s.K) + 2 * bf16_bytes(s.M, s.K) + fp8_col_bytes(s.M, s.K, s.groups);
  };
  o.prepare = [](Arena& a, const Inputs& in, const Shape& s, bool) {
    const TensorView tmp = a.tensor(DType::BF16, s.M, s.K);
    const ScaledTensor out = fp8_col(a, s);
    const ScaledTensor x = in.fp8;
    return Prepared{[x, tmp, out](Stream st) {
                      dequantize(x, tmp, st);
                      quantize_transposed(tmp, out, {}, st);
                    },
                    outs("out_t", out)};
  };
  return o;
}

OpDef op_quantize() {
  OpDef o;
  o.name = "quantize";
  o.src = Src::Bf16;
  // Reads BF16 [M][K]; writes E4M3 [M][K] + scales [K/128][M].
  o.bytes = [](const Shape& s) { return bf16_bytes(s.M, s.K) + fp8_row_bytes(s.M, s.K); };
  o.prepare = [](Arena& a, const Inputs& in, const Shape& s, bool) {
    const ScaledTensor out = fp8_row(a, s);
    const TensorView x = in.bf16;
    return Prepared{[x, out](Stream st) { quantize(x, out, {}, st); }, outs("out", out)};
  };
  return o;
}

OpDef op_quantize_transposed() {
  OpDef o;
  o.name = "quantize_transposed";
  o.src = Src::Bf16;
  // Reads BF16 [M][K]; writes E4M3 [K][M] + scales [tiles(M)][K].
  o.bytes = [](const Shape& s) { return bf16_bytes(s.M, s.K) + fp8_col_bytes(s.M, s.K, s.groups); };
  o.prepare = [](Arena& a, const Inputs& in, const Shape& s, bool) {
    const ScaledTensor out = fp8_col(a, s);
    const TensorView x = in.bf16;
    return Prepared{[x, out](Stream st) { quantize_transposed(x, out, {}, st); },
                    outs("out_t", out)};
  };
  return o;
}

OpDef op_quantize_both() {
  OpDef o;
  o.name = "quantize_both";
  o.src = Src::Bf16;
  // Reads BF16 [M][K] once; writes E4M3 [M][K] + scales and E4M3 [K][M] + scales.
  o.bytes = [](const Shape& s) {
    return bf16_bytes(s.M, s.K) + fp8_row_bytes(s.M, s.K) + fp8_col_bytes(s.M, s.K, s.groups);
  };
  o.prepare = [](Arena& a, const Inputs& in, const Shape& s, bool) {
    const ScaledTensor out = fp8_row(a, s);
    const ScaledTensor out_t = fp8_col(a, s);
    const TensorView x = in.bf16;
    Prepared p{[x, out, out_t](Stream st) { quantize_both(x, out, out_t, {}, st); },
               outs("out", out)};
    append(p.outputs, outs("out_t", out_t));
    return p;
  };
  return o;
}

OpDef op_naive_quantize_both() {
  OpDef o;
  o.name = "naive: quantize+quantize_transposed";
  o.src = Src::Bf16;
  // Two kernels, so BF16 [M][K] is read twice; same outputs as quantize_both.
  o.bytes = [](const Shape& s) {
    return 2 * bf16_bytes(s.M, s.K) + fp8_row_bytes(s.M, s.K) + fp8_col_bytes(s.M, s.K, s.groups);
  };
  o.prepare = [](Arena& a, const Inputs& in, const Shape& s, bool) {
    const ScaledTensor out = fp8_row(a, s);
    const ScaledTensor out_t = fp8_col(a, s);
    const TensorView x = in.bf16;
    Prepared p{[x, out, out_t](Stream st) {
                 quantize(x, out, {}, st);
                 quantize_transposed(x, out_t, {}, st);
               },
               outs("out", out)};
    append(p.outputs, outs("out_t", out_t));
    return p;
  };
  return o;
}

OpDef op_dequantize() {
  OpDef o;
  o.name = "dequantize";
  o.src = Src::Fp8;
  // Reads E4M3 [M][K] + scales [K/128][M]; writes BF16 [M][K].
  o.bytes = [](const Shape& s) { return fp8_row_bytes(s.M, s.K) + bf16_bytes(s.M, s.K); };
  o.prepare = [](Arena& a, const Inputs& in, const Shape& s, bool) {
    const TensorView out = a.tensor(DType::BF16, s.M, s.K);
    const ScaledTensor x = in.fp8;
    return Prepared{[x, out](Stream st) { dequantize(x, out, st); }, {{"out", out}}};
  };
  return o;
}

OpDef op_fp8_to_mxfp4() {
  OpDef o;
  o.name = "fp8_to_mxfp4";
  o.src = Src::Fp8;
  // Reads E4M3 [M][K] + scales [K/128][M]; writes E2M1x2 [M][K] + E8M0 [M][K/32].
  o.bytes = [](const Shape& s) { return fp8_row_bytes(s.M, s.K) + mx_bytes(s.M, s.K); };
  o.prepare = [](Arena& a, const Inputs& in, const Shape& s, bool) {
    const ScaledTensor out = mxfp4(a, s);
    const ScaledTensor x = in.fp8;
    return Prepared{[x, out](Stream st) { fp8_to_mxfp4(x, out, st); }, outs("out", out)};
  };
  return o;
}

OpDef op_naive_fp8_to_mxfp4() {
  OpDef o;
  o.name = "naive: dequantize+quantize_mxfp4";
  o.src = Src::Fp8;
  // dequantize to BF16 [M][K], then quantize_mxfp4 of it.
  o.bytes = [](const Shape& s) {
    return fp8_row_bytes(s.M, s.K) + 2 * bf16_bytes(s.M, s.K) + mx_bytes(s.M, s.K);
  };
  o.prepare = [](Arena& a, const Inputs& in, const Shape& s, bool) {
    const TensorView tmp = a.tensor(DType::BF16, s.M, s.K);
    const ScaledTensor out = mxfp4(a, s);
    const ScaledTensor x = in.fp8;
    return Prepared{[x, tmp, out](Stream st) {
                      dequantize(x, tmp, st);
                      quantize_mxfp4(tmp, out, st);
                    },
                    outs("out", out)};
  };
  return o;
}

OpDef op_mxfp4_to_fp8() {
  OpDef o;
  o.name = "mxfp4_to_fp8";
  o.src = Src::Mx;
  // Reads E2M1x2 [M][K] + E8M0 [M][K/32]; writes E4M3 [M][K] + scales [K/128][M].
  o.bytes = [](const Shape& s) { return mx_bytes(s.M, s.K) + fp8_row_bytes(s.M, s.K); };
  o.prepare = [](Arena& a, const Inputs& in, const Shape& s, bool) {
    const ScaledTensor out = fp8_row(a, s);
    const ScaledTensor x = in.mx;
    return Prepared{[x, out](Stream st) { mxfp4_to_fp8(x, out, st); }, outs("out", out)};
  };
  return o;
}

OpDef op_naive_mxfp4_to_fp8() {
  OpDef o;
  o.name = "naive: dequantize+quantize";
  o.src = Src::Mx;
  // dequantize MXFP4 to BF16 [M][K], then quantize it row-wise.
  o.bytes = [](const Shape& s) {
    return mx_bytes(s.M, s.K) + 2 * bf16_bytes(s.M, s.K) + fp8_row_bytes(s.M, s.K);
  };
  o.prepare = [](Arena& a, const Inputs& in, const Shape& s, bool) {
    const TensorView tmp = a.tensor(DType::BF16, s.M, s.K);
    const ScaledTensor out = fp8_row(a, s);
    const ScaledTensor x = in.mx;
    return Prepared{[x, tmp, out](Stream st) {
                      dequantize(x, tmp, st);
                      quantize(tmp, out, {}, st);
                    },
                    outs("out", out)};
  };
  return o;
}

OpDef op_mxfp4_to_fp8_transposed() {
  OpDef o;
  o.name = "mxfp4_to_fp8_transposed";
  o.src = Src::Mx;
  // Reads E2M1x2 [M][K] + E8M0 [M][K/32]; writes E4M3 [K][M] + scales [tiles(M)][K].
  o.bytes = [](const Shape& s) { return mx_bytes(s.M, s.K) + fp8_col_bytes(s.M, s.K, s.groups); };
  o.prepare = [](Arena& a, const Inputs& in, const Shape& s, bool) {
    const ScaledTensor out = fp8_col(a, s);
    const ScaledTensor x = in.mx;
    return Prepared{[x, out](Stream st) { mxfp4_to_fp8_transposed(x, out, st); },
                    outs("out_t", out)};
  };
  return o;
}

OpDef op_naive_mxfp4_to_fp8_transposed() {
  OpDef o;
  o.name = "naive: dequantize+quantize_transposed";
  o.src = Src::Mx;
  // dequantize MXFP4 to BF16 [M][K], then quantize_transposed of it.
  o.bytes = [](const Shape& s) {
    return mx_bytes(s.M, s.K) + 2 * bf16_bytes(s.M, s.K) + fp8_col_bytes(s.M, s.K, s.groups);
  };
  o.prepare = [](Arena& a, const Inputs& in, const Shape& s, bool) {
    const TensorView tmp = a.tensor(DType::BF16, s.M, s.K);
    const ScaledTensor out = fp8_col(a, s);
    const ScaledTensor x = in.mx;
    return Prepared{[x, tmp, out](Stream st) {
                      dequantize(x, tmp, st);
                      quantize_transposed(tmp, out, {}, st);
                    },
                    outs("out_t", out)};
  };
  return o;
}

OpDef op_quantize_mxfp4() {
  OpDef o;
  o.name = "quantize_mxfp4";
  o.src = Src::Bf16;
  // Reads BF16 [M][K]; writes E2M1x2 [M][K] + E8M0 [M][K/32].
  o.bytes = [](const Shape& s) { return bf16_bytes(s.M, s.K) + mx_bytes(s.M, s.K); };
  o.prepare = [](Arena& a, const Inputs& in, const Shape& s, bool) {
    const ScaledTensor out = mxfp4(a, s);
    const TensorView x = in.bf16;
    return Prepared{[x, out](Stream st) { quantize_mxfp4(x, out, st); }, outs("out", out)};
  };
  return o;
}

// ---------------------------------------------------------------------------------------------
// Cases.

struct CaseSpec {
  const OpDef* op = nullptr;
  const OpDef* naive = nullptr;  // its own row; the op row gets naive_ms / op_ms
  int64_t M = 0, K = 0;
  Groups groups;                  // m_splits (empty = one group)
  std::string group_tag;          // appended to the shape label (e.g. the groups' alignment)
  double published_ms = 0;        // the op's published time at this shape, if any
  double published_naive_ms = 0;  // the naive path's
  std::string shape_label() const {
    std::string s = std::to_string(M) + "x" + std::to_string(K);
    if (!groups.empty()) {
      s += " g" + std::to_string(groups.size());
      if (std::adjacent_find(groups.begin(), groups.end(), std::not_equal_to<>()) != groups.end())
        s += "u";  // uneven sizes
      s += group_tag;
    }
    return s;
  }
  std::string label() const { return op->name + " " + shape_label(); }
};

struct OpTable {
  OpDef col_tight = op_transpose(TransposeScalePolicy::ColumnTight);
  OpDef tile_max = op_transpose(TransposeScalePolicy::TileMax);
  OpDef col_tight_count = op_transpose(TransposeScalePolicy::ColumnTight, true);
  OpDef naive_transpose = op_naive_transpose();
  OpDef quantize = op_quantize();
  OpDef quantize_transposed = op_quantize_transposed();
  OpDef quantize_both = op_quantize_both();
  OpDef naive_quantize_both = op_naive_quantize_both();
  OpDef dequantize = op_dequantize();
  OpDef fp8_to_mxfp4 = op_fp8_to_mxfp4();
  OpDef naive_fp8_to_mxfp4 = op_naive_fp8_to_mxfp4();
  OpDef mxfp4_to_fp8 = op_mxfp4_to_fp8();
  OpDef naive_mxfp4_to_fp8 = op_naive_mxfp4_to_fp8();
  OpDef mxfp4_to_fp8_transposed = op_mxfp4_to_fp8_transposed();
  OpDef naive_mxfp4_to_fp8_transposed = op_naive_mxfp4_to_fp8_transposed();
  OpDef quantize_mxfp4 = op_quantize_mxfp4();
};

// Published operator times (recipe.md sections 4 and 7; FP8-Flow artifact, one Hopper GPU). The
// paper's 0.590 ms at 32768x7168 matches the published kernel split over 32 experts on our H100
// (0.52 ms as one group), so it is shown on both rows of that shape; so is its 1.52 ms for
// dequantize + requantize.
double published_transpose_ms(int64_t M, int64_t K) {
  if (M == 28672 && K == 1280) return 0.152;
  if (M == 32768 && K == 7168) return 0.590;
  return 0;
}
double published_naive_transpose_ms(int64_t M, int64_t K) {
  return M == 32768 && K == 7168 ? 1.52 : 0;
}

// The case list. `max_rows` > 0 caps M (quick and CPU runs; expert splits scaled along).
std::vector<CaseSpec> build_cases(const OpTable& t, int64_t max_rows) {
  std::vector<CaseSpec> cases;
  auto add = [&](const OpDef& op, const OpDef* naive, int64_t M, int64_t K, Groups g,
                 std::string tag = {}) {
    CaseSpec c;
    c.group_tag = std::move(tag);
    c.op = &op;
    c.naive = naive;
    c.M = max_rows > 0 ? std::min(M, max_rows) : M;
    c.K = K;
    c.groups = scale_groups(g, M, c.M);
    if (max_rows <= 0 && (&op == &t.col_tight || &op == &t.tile_max || &op == &t.col_tight_count)) {
      c.published_ms = published_transpose_ms(M, K);
      c.published_naive_ms = published_naive_transpose_ms(M, K);
    }
    cases.push_back(std::move(c));
  };
  struct TShape {
    int64_t M, K;
    Groups g;
  };
  const std::vector<TShape> tshapes = {{28672, 1280, {}},
                                       {24576, 2048, {}},
                                       {24576, 5120, {}},
                                       {32768, 7168, {}},
                                       {32768, 8192, {}},
                                       {32768, 9216, {}},
                                       {32768, 7168, equal_groups(32768, 32)}};
  for (const auto& s : tshapes) {
    add(t.col_tight, &t.naive_transpose, s.M, s.K, s.g);
    add(t.tile_max, &t.naive_transpose, s.M, s.K, s.g);
  }
  add(t.col_tight_count, nullptr, 32768, 7168, {});
  // The layer's form (fp8-flow's four wgrad operands at dsv3-shard): ColumnTight with the
  // underflow count, over 32 uneven expert segments padded to `a` rows (a32: MoEConfig::align's
  // default for the FP8 recipes, a16 its former one; partial tiles and group starts not on
  // 128-token boundaries).
  for (const int64_t a : {int64_t{16}, int64_t{32}, int64_t{128}}) {
    const Groups layer_groups = uneven_groups(32768, 32, a, 7);
    const std::string tag = "/a" + std::to_string(a);
    for (const int64_t k : {int64_t{7168}, int64_t{2048}}) {
      add(t.col_tight, nullptr, 32768, k, layer_groups, tag);
      add(t.col_tight_count, nullptr, 32768, k, layer_groups, tag);
    }
  }
  const int64_t M = 32768, K = 7168;
  add(t.quantize, nullptr, M, K, {});
  add(t.quantize_transposed, nullptr, M, K, {});
  add(t.quantize_both, &t.naive_quantize_both, M, K, {});
  add(t.dequantize, nullptr, M, K, {});
  add(t.fp8_to_mxfp4, &t.naive_fp8_to_mxfp4, M, K, {});
  add(t.mxfp4_to_fp8, &t.naive_mxfp4_to_fp8, M, K, {});
  add(t.mxfp4_to_fp8_transposed, &t.naive_mxfp4_to_fp8_transposed, M, K, {});
  add(t.quantize_mxfp4, nullptr, M, K, {});
  return cases;
}

// ---------------------------------------------------------------------------------------------
// Running one row.

struct Env {
  const Options* opt = nullptr;
  DeviceInfo dev;
  bool gpu = false;
  std::vector<uint16_t> host_bf16;  // the random BF16 master (prefixes are the inputs)
  Buffer dev_bf16;                  // the same on the device (GPU runs)
  double copy_gbps = 0;
  int reps = 0, warmup = 0;
};

TensorView master_view(const Env& env, Device dev, int64_t M, int64_t K) {
  void* p = dev == Device::Cpu ? const_cast<uint16_t*>(env.host_bf16.data()) : env.dev_bf16.data();
  return TensorView{p, DType::BF16, M, K, -1, dev};
}

// Allocates the input form `src` reads (no values yet).
Inputs alloc_inputs(Arena& a, Src src, int64_t M, int64_t K) {
  Inputs in;
  const Shape s{M, K, {}};
  if (src == Src::Bf16) in.bf16 = a.tensor(DType::BF16, M, K);
  if (src == Src::Fp8) in.fp8 = fp8_row(a, s);
  if (src == Src::Mx) in.mx = mxfp4(a, s);
  return in;
}

// Fills the form `src` reads from BF16 values `x` (same device as the arena's tensors), through
// the library: a copy, quantize, or quantize_mxfp4.
// Errors say that they happened while making the input, not in the op under test.
void fill_inputs(Inputs& in, Src src, const TensorView& x, Stream st) {
  try {
    if (src == Src::Bf16) copy_view(in.bf16, x);
    if (src == Src::Fp8) quantize(x, in.fp8, {}, st);
    if (src == Src::Mx) quantize_mxfp4(x, in.mx, st);
  } catch (const std::exception& e) {
    throw std::runtime_error(std::string("making the input (") + to_string(x.device) +
                             "): " + e.what());
  }
}

void copy_inputs(Inputs& dst, const Inputs& from, Src src) {
  if (src == Src::Bf16) copy_view(dst.bf16, from.bf16);
  if (src == Src::Fp8) {
    copy_view(dst.fp8.data, from.fp8.data);
    copy_view(dst.fp8.scale, from.fp8.scale);
  }
  if (src == Src::Mx) {
    copy_view(dst.mx.data, from.mx.data);
    copy_view(dst.mx.scale, from.mx.scale);
  }
}

struct Verification {
  std::string status = "-";  // ok, MISMATCH, error, - (not run)
  std::string detail;
  std::optional<int64_t> underflow;  // the reference's count (transposes)
  int64_t rows = 0;
};

Verification verify_case(const Env& env, const OpDef& op, const CaseSpec& c) {
  Verification v;
  const int64_t vM = std::min(c.M, env.opt->verify_rows);
  v.rows = vM;
  const Groups vg = scale_groups(c.groups, c.M, vM);
  const Shape s{vM, c.K, vg};
  try {
    Arena host(Device::Cpu), dev(Device::Cuda);
    Inputs hin = alloc_inputs(host, op.src, vM, c.K);
    fill_inputs(hin, op.src, master_view(env, Device::Cpu, vM, c.K), nullptr);
    Inputs din = alloc_inputs(dev, op.src, vM, c.K);
    copy_inputs(din, hin, op.src);
    const Prepared want = op.prepare(host, hin, s, true);
    const Prepared got = op.prepare(dev, din, s, true);
    want.call(nullptr);
    got.call(bench_stream());
    sync_stream();
    const Comparison cmp = compare_outputs(got.outputs, want.outputs);
    v.status = cmp.equal ? "ok" : "MISMATCH";
    v.detail = cmp.detail;
    for (const auto& [name, view] : want.outputs)
      if (name == "underflow_count") v.underflow = *view.ptr<int64_t>();
  } catch (const std::exception& e) {
    v.status = "error";
    v.detail = e.what();
  }
  return v;
}

struct Measured {
  Timing t;
  int sets = 1;
};

Measured time_case_gpu(const Env& env, const OpDef& op, const CaseSpec& c) {
  const Shape s{c.M, c.K, c.groups};
  Arena a(Device::Cuda);
  std::deque<Inputs> ins;  // stable addresses not needed, but cheap
  std::vector<Prepared> sets;
  ins.push_back(alloc_inputs(a, op.src, c.M, c.K));
  fill_inputs(ins[0], op.src, master_view(env, Device::Cuda, c.M, c.K), bench_stream());
  sets.push_back(op.prepare(a, ins[0], s, false));
  sync_stream();
  const size_t set_bytes = a.bytes_allocated();
  const size_t budget = static_cast<size_t>(0.6 * static_cast<double>(device_memory().first));
  const int n = rotation_sets(set_bytes, env.dev.l2_bytes, budget);
  for (int i = 1; i < n; ++i) {
    ins.push_back(alloc_inputs(a, op.src, c.M, c.K));
    copy_inputs(ins.back(), ins[0], op.src);
    sets.push_back(op.prepare(a, ins.back(), s, false));
  }
  Measured m;
  m.sets = n;
  m.t = time_gpu([&](int i) { sets[static_cast<size_t>(i % n)].call(bench_stream()); }, env.warmup,
                 env.reps);
  return m;
}

Measured time_case_cpu(const Env& env, const OpDef& op, const CaseSpec& c) {
  const Shape s{c.M, c.K, c.groups};
  Arena a(Device::Cpu);
  Inputs in = alloc_inputs(a, op.src, c.M, c.K);
  fill_inputs(in, op.src, master_view(env, Device::Cpu, c.M, c.K), nullptr);
  const Prepared p = op.prepare(a, in, s, false);
  Measured m;
  m.t = time_cpu([&](int) { p.call(nullptr); }, env.warmup, env.reps);
  return m;
}

// Copy bandwidth for a call that reads and writes `bytes` in all (cached per size): a device copy
// of bytes / 2, over enough buffer pairs that the L2 cannot hold one between its uses.
CopyBandwidth same_size_copy(const Env& env, double bytes) {
  static std::map<size_t, CopyBandwidth> cache;
  const size_t half = (static_cast<size_t>(bytes / 2) + 255) / 256 * 256;
  if (const auto it = cache.find(half); it != cache.end()) return it->second;
  const size_t budget = static_cast<size_t>(0.3 * static_cast<double>(device_memory().first));
  const int sets = rotation_sets(2 * half, env.dev.l2_bytes, budget);
  const CopyBandwidth bw = measure_copy_bandwidth(half, env.warmup, env.reps, sets);
  cache[half] = bw;
  return bw;
}

// Runs one op at one shape into a new report row; returns the row.
size_t run_row(const Env& env, Report& rep, const OpDef& op, const CaseSpec& c,
               std::vector<std::string>& problems) {
  const size_t r = rep.add_row();
  const Shape s{c.M, c.K, c.groups};
  const bool naive = &op != c.op;
  rep.set(r, "label", (naive ? "  " : "") + op.name);
  rep.set(r, "case", op.name);
  if (naive) rep.set(r, "naive_of", c.op->name);
  rep.set(r, "shape", c.shape_label());
  rep.set(r, "M", c.M);
  rep.set(r, "K", c.K);
  rep.set(r, "groups", static_cast<int64_t>(c.groups.empty() ? 1 : c.groups.size()));
  rep.set(r, "backend", std::string(env.gpu ? "sm90" : "cpu-reference"));
  const double bytes = op.bytes(s);
  rep.set(r, "bytes", static_cast<int64_t>(std::llround(bytes)));

  if (env.gpu && env.opt->verify) {
    const Verification v = verify_case(env, op, c);
    rep.set(r, "verify", v.status);
    rep.set(r, "verify_rows", v.rows);
    if (!v.detail.empty()) {
      rep.set(r, "verify_detail", v.detail);
      problems.push_back(op.name + " " + c.shape_label() + ": verify " + v.status + ": " +
                         v.detail);
    }
    if (v.underflow) {
      rep.set(r, "underflow_count", *v.underflow);
      rep.set(r, "notes",
              "uflow " + std::to_string(*v.underflow) + "/" + std::to_string(v.rows * c.K));
    }
  } else {
    rep.set(r, "verify", std::string("-"));
  }

  try {
    const Measured m = env.gpu ? time_case_gpu(env, op, c) : time_case_cpu(env, op, c);
    rep.set(r, "median_ms", m.t.median_ms);
    rep.set(r, "min_ms", m.t.min_ms);
    rep.set(r, "reps", static_cast<int64_t>(m.t.reps));
    rep.set(r, "sets", static_cast<int64_t>(m.sets));
    if (m.t.gate_timed_out) {
      rep.set(r, "gate_timeout", true);
      problems.push_back(op.name + " " + c.shape_label() +
                         ": the launch gate timed out (does the op synchronize the host?); "
                         "its times include host time");
    }
    const double gbps = bytes / (m.t.median_ms * 1e6);
    rep.set(r, "gbps", gbps);
    if (env.copy_gbps > 0) rep.set(r, "pct_copy", 100.0 * gbps / env.copy_gbps);
    if (env.gpu) {
      // The same bytes moved by a copy (half read, half written), timed the same way: small
      // calls pay a launch and a first-load latency that the 1 GiB copy amortizes.
      const CopyBandwidth same = same_size_copy(env, bytes);
      if (same.gbps > 0) rep.set(r, "pct_copy_same", 100.0 * gbps / same.gbps);
    }
    const double published = naive ? c.published_naive_ms : c.published_ms;
    if (published > 0) {
      rep.set(r, "published_ms", published);
      rep.set(r, "vs_published", published / m.t.median_ms);
    }
    std::fprintf(stderr, "  %-40s %-16s %10.4f ms  %s\n",
                 std::get<std::string>(rep.get(r, "label")).c_str(), c.shape_label().c_str(),
                 m.t.median_ms, std::get<std::string>(rep.get(r, "verify")).c_str());
  } catch (const std::exception& e) {
    rep.set(r, "error", std::string(e.what()));
    problems.push_back(op.name + " " + c.shape_label() + ": " + e.what());
    std::fprintf(stderr, "  %-40s %-16s error: %s\n",
                 std::get<std::string>(rep.get(r, "label")).c_str(), c.shape_label().c_str(),
                 e.what());
  }
  return r;
}

double number(const Value& v) {
  return v.index() == 3 ? std::get<double>(v) : 0;
}

int run_ops(const Options& opt) {
  const OpTable ops;
  Env env;
  env.opt = &opt;
  env.dev = query_device();
  env.gpu = env.dev.gpu;
  // The CPU reference is plain loops: small shapes and few repetitions.
  const int64_t max_rows = env.gpu ? (opt.quick ? 4096 : 0) : 256;
  env.reps = env.gpu ? opt.reps : std::min(opt.reps, 3);
  env.warmup = env.gpu ? opt.warmup : std::min(opt.warmup, 1);

  std::vector<CaseSpec> cases = build_cases(ops, max_rows);
  if (!opt.only.empty())
    std::erase_if(cases,
                  [&](const CaseSpec& c) { return c.label().find(opt.only) == std::string::npos; });
  MoeEnv moe;
  moe.gpu = env.gpu;
  moe.quick = opt.quick;
  moe.verify = opt.verify;
  moe.reps = env.reps;
  moe.warmup = env.warmup;
  moe.l2_bytes = env.dev.l2_bytes;
  moe.gemm_algos = opt.gemm_algos;
  const std::vector<std::string> moe_labels = moe_case_labels(moe, opt.only);
  if (opt.list) {
    for (const auto& c : cases) {
      std::printf("%s\n", c.label().c_str());
      if (c.naive) std::printf("%s %s\n", c.naive->name.c_str(), c.shape_label().c_str());
    }
    for (const auto& l : moe_labels) std::printf("%s\n", l.c_str());
    return 0;
  }
  if (cases.empty() && moe_labels.empty()) {
    std::fprintf(stderr, "fp8flow-bench ops: no case matches --only '%s' (see --list)\n",
                 opt.only.c_str());
    return 2;
  }

  Report rep;
  rep.meta("tool", std::string("fp8flow-bench ops"));
  rep.meta("fp8flow", std::string(version_string()));
  rep.meta("git", git_rev());
  rep.meta("date", utc_now());
  rep.meta("mode", std::string(env.gpu ? "gpu" : "cpu-reference"));
  if (env.gpu) {
    rep.meta("device", env.dev.name);
    rep.meta("sm_count", static_cast<int64_t>(env.dev.sm_count));
    rep.meta("compute_capability",
             std::to_string(env.dev.cc_major) + "." + std::to_string(env.dev.cc_minor));
    rep.meta("l2_bytes", env.dev.l2_bytes);
    rep.meta("memory_bytes", env.dev.mem_bytes);
    rep.meta("cuda_runtime", env.dev.runtime);
    rep.meta("cuda_driver", env.dev.driver);
  } else {
    std::printf(
        "fp8flow-bench ops: no CUDA device found (%s build): running the CPU reference on small "
        "shapes (%lld rows); nothing is verified and the times are the reference's, not a GPU's.\n",
        FP8FLOW_WITH_CUDA ? "CUDA" : "CPU-only", static_cast<long long>(max_rows));
  }
  rep.meta("reps", static_cast<int64_t>(env.reps));
  rep.meta("warmup", static_cast<int64_t>(env.warmup));
  rep.meta("quick", opt.quick);
  rep.meta("verify", env.gpu && opt.verify);
  if (env.gpu && opt.verify) rep.meta("verify_rows", opt.verify_rows);

  // One random BF16 master, large enough for every case (prefixes are the inputs).
  int64_t max_elems = 0;
  for (const auto& c : cases) max_elems = std::max(max_elems, c.M * c.K);
  std::fprintf(stderr, "fp8flow-bench ops: generating %.1f M random BF16 values\n",
               static_cast<double>(max_elems) / 1e6);
  env.host_bf16 = random_bf16(static_cast<size_t>(max_elems));
  if (env.gpu) {
    env.dev_bf16 = Buffer(Device::Cuda, env.host_bf16.size() * 2, 0);
    const TensorView h = master_view(env, Device::Cpu, 1, max_elems);
    copy_view(master_view(env, Device::Cuda, 1, max_elems), h);
    const CopyBandwidth bw = measure_copy_bandwidth(size_t{1} << 30, 3, std::max(env.reps / 2, 10));
    env.copy_gbps = bw.gbps;
    moe.copy_gbps = bw.gbps;
    rep.meta("copy_d2d_gbps", bw.gbps);
    rep.meta("copy_d2d_bytes", static_cast<int64_t>(bw.bytes));
    std::fprintf(stderr,
                 "fp8flow-bench ops: device-to-device copy %.0f GB/s (read+write, %zu MiB)\n",
                 bw.gbps, bw.bytes >> 20);
  }

  rep.columns({
      {"label", "case", 40, true, 0, true},
      {"shape", "shape", 16, true, 0, true},
      {"verify", "verify", 8, true},
      {"median_ms", "ms med", 9, false, 4},
      {"min_ms", "ms min", 9, false, 4},
      {"gbps", "GB/s", 8, false, 1},
      {"pct_copy", "%copy", 6, false, 1},
      {"pct_copy_same", "%cp=", 5, false, 1},
      {"tflops", "TFLOP/s", 7, false, 1},
      {"pct_dense", "%dense", 6, false, 1},
      {"vs_naive", "x naive", 7, false, 2},
      {"published_ms", "publ. ms", 8, false, 3},
      {"sets", "sets", 4, false},
      {"notes", "notes", 0, true},
  });

  std::vector<std::string> problems;
  std::map<std::string, size_t> naive_rows;  // naive label -> row (shared by both policies)
  std::vector<std::pair<size_t, std::string>> want_ratio;
  for (const auto& c : cases) {
    const size_t r = run_row(env, rep, *c.op, c, problems);
    if (!c.naive) continue;
    const std::string key = c.naive->name + " " + c.shape_label();
    if (!naive_rows.count(key)) naive_rows[key] = run_row(env, rep, *c.naive, c, problems);
    want_ratio.emplace_back(r, key);
  }
  for (const auto& [r, key] : want_ratio) {
    const double op_ms = number(rep.get(r, "median_ms"));
    const double naive_ms = number(rep.get(naive_rows[key], "median_ms"));
    if (op_ms > 0 && naive_ms > 0) {
      rep.set(r, "naive_ms", naive_ms);
      rep.set(r, "vs_naive", naive_ms / op_ms);
    }
  }
  run_moe_cases(moe, opt.only, rep, problems);

  std::printf("%s", rep.table().c_str());
  std::printf(
      "# GB/s: bytes read + written by one call (scales included); %%copy: of the "
      "device-to-device\n"
      "# copy above; %%cp=: of a copy moving the same bytes (timed alike); x naive: naive time / "
      "op time (naive rows: two kernels through BF16);\n"
      "# publ. ms: FP8-Flow paper (0.590 ms at 32768x7168 matches the published kernel over 32\n"
      "# experts; 0.52 ms as one group on our H100; 1.52 ms its dequantize + requantize);\n"
      "# uflow: nonzero elements the transpose rounded (reference count, verification shape);\n"
      "# sets: input/output sets rotated so the L2 cannot hold one between uses.\n"
      "# MoE rows: swiglu/router/make_permutation verified bit for bit (1024 rows / tokens), "
      "permute\n"
      "# at the timed shape; permute GB/s counts X once (its k gathers mostly hit L2) + rows "
      "written\n"
      "# + maps + probs. gemm rows: TFLOP/s = 2*M*N*K / time, verified by relative error < 1e-2 "
      "at\n"
      "# 3 experts (N 384, K 256); %%dense: grouped / dense throughput (dense = 1 expert, all "
      "rows).\n"
      "# f32: wgrad with F32 dW (the layer's main grad). algoN (--gemm-algos): cuBLASLt heuristic\n"
      "# result N (GroupedGemmOptions::algo), also compared with algo 0 at the timed shape; notes\n"
      "# give its config (tile/stages/cluster: cublasLtMatmulTile_t/Stages_t/ClusterShape_t ids);\n"
      "# verify n/a: the small verification shape has fewer results; skipped: none at this "
      "index.\n");
  int mismatches = 0, errors = 0;
  for (size_t r = 0; r < rep.rows(); ++r) {
    const std::string v = std::get<std::string>(rep.get(r, "verify"));
    if (v == "MISMATCH") ++mismatches;
    // Rows with an error; a launch gate that timed out means the op synchronized the host.
    if (v == "error" || rep.get(r, "error").index() == 4 || rep.get(r, "gate_timeout").index() == 1)
      ++errors;
  }
  rep.meta("mismatches", static_cast<int64_t>(mismatches));
  rep.meta("errors", static_cast<int64_t>(errors));
  if (!problems.empty()) {
    std::printf("\nproblems (%zu):\n", problems.size());
    for (const auto& p : problems) std::printf("  %s\n", p.c_str());
  }
  std::printf("%s: %d rows, %d mismatches, %d errors\n", env.gpu ? "gpu" : "cpu-reference",
              static_cast<int>(rep.rows()), mismatches, errors);
  if (!opt.json_path.empty()) {
    rep.write_json(opt.json_path);
    std::printf("wrote %s\n", opt.json_path.c_str());
  }
  if (!env.gpu) return 0;  // the CPU fallback reports; it has nothing to verify
  return mismatches || errors ? 1 : 0;
}

}  // namespace

FP8FLOW_BENCH_SUBCOMMAND(ops, "verify and time the FP8/MXFP4 ops (transpose, quantize, MXFP4)",
                         run_ops);

}  // namespace fp8flow::bench
