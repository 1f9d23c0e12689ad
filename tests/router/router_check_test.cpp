// Router argument checking: every bad configuration, shape, dtype, device or pointer raises
// fp8flow::Error whose message names the op and the argument.
#include <gtest/gtest.h>

#include <functional>
#include <string>

#include "router/router_testing.h"

namespace fp8flow::test {
namespace {

using namespace router_testing;

void expect_error(const std::function<void()>& f, const std::string& op, const std::string& arg,
                  ErrorKind kind = ErrorKind::InvalidArgument) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one naming " << arg;
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_EQ(e.kind(), kind) << msg;
    EXPECT_NE(msg.find("fp8flow::" + op + ": " + arg + ":"), std::string::npos)
        << "message '" << msg << "' does not name " << op << " / " << arg;
  }
}

// A valid forward call on the CPU that each test breaks in one place.
struct Fwd {
  int64_t T, E;
  RouterConfig cfg;
  HostTensor x, bias;
  HostOut out;
  RouterOutputs o;
  Fwd(int64_t T_, int64_t E_, RouterConfig c)
      : T(T_), E(E_), cfg(c), x(DType::F32, T_, E_), bias(DType::F32, 1, E_), out(T_, E_, c) {
    std::fill(x.ptr<float>(), x.ptr<float>() + T * E, 0.5f);
    std::fill(bias.ptr<float>(), bias.ptr<float>() + E, 0.0f);
    o = out.views();
  }
  void run() { router_forward(x.v, bias.v, o, cfg); }
};

RouterConfig v3_aux() {
  return RouterConfig::deepseek_v3(1e-3f, 4);
}

TEST(RouterCheck, ValidCallsPass) {
  Fwd f(8, 256, v3_aux());
  EXPECT_NO_THROW(f.run());
  Fwd g(8, 8, RouterConfig::softmax_topk(2, true));
  EXPECT_NO_THROW(g.run());
}

TEST(RouterCheck, BadConfig) {
  const std::string op = "router_forward";
  auto with = [&](int64_t T, int64_t E, const std::function<void(RouterConfig&)>& edit,
                  const std::string& arg) {
    RouterConfig c = RouterConfig::deepseek_v3();
    c.n_groups = c.topk_groups = 1;
    edit(c);
    RouterConfig shapes = c;  // build outputs with shapes that stay valid
    shapes.top_k = std::max(1, std::min(c.top_k, 8));
    if (c.aux_enabled() && (c.seq_len <= 0 || T % c.seq_len)) shapes.aux_alpha = 0;
    Fwd f(T, E, shapes);
    f.cfg = c;
    if (c.aux_enabled() && !shapes.aux_enabled()) {  // give aux outputs of some plausible shape
      static HostTensor sc(DType::I32, 1, 256), l(DType::F32, 1, 1);
      f.o.seq_counts = TensorView{sc.buf.data(), DType::I32, 1, E, -1, Device::Cpu};
      f.o.aux_loss = l.v;
    }
    expect_error([&] { f.run(); }, op, arg);
  };
  with(
      8, 4, [](RouterConfig& c) { c.top_k = 6; }, "cfg.top_k");  // k > E
  with(
      8, 64, [](RouterConfig& c) { c.top_k = 0; }, "cfg.top_k");
  with(
      8, 64, [](RouterConfig& c) { c.top_k = 9; }, "cfg.top_k");
  with(
      8, 64, [](RouterConfig& c) { c.n_groups = 6; }, "cfg.n_groups");  // E % n_groups
  with(
      8, 64, [](RouterConfig& c) { c.n_groups = 0; }, "cfg.n_groups");
  with(
      8, 48, [](RouterConfig& c) { c.n_groups = 2; }, "cfg.n_groups");  // group size 24
  with(
      8, 256, [](RouterConfig& c) { c.n_groups = 256; }, "cfg.n_groups");  // group size 1
  with(
      8, 96, [](RouterConfig& c) { c.n_groups = 2; }, "cfg.n_groups");  // 48: 6 lanes
  with(
      8, 64, [](RouterConfig& c) { c.n_groups = 8, c.topk_groups = 9; }, "cfg.topk_groups");
  with(
      8, 64, [](RouterConfig& c) { c.n_groups = 8, c.topk_groups = 0; }, "cfg.topk_groups");
  with(
      8, 64, [](RouterConfig& c) { c.n_groups = 16, c.topk_groups = 1, c.top_k = 6; },
      "cfg.topk_groups");  // 1 group of 4 cannot hold 6 experts
  with(
      10, 64, [](RouterConfig& c) { c.aux_alpha = 0.1f, c.seq_len = 4; }, "cfg.seq_len");  // T % S
  with(
      8, 64, [](RouterConfig& c) { c.aux_alpha = 0.1f, c.seq_len = 0; }, "cfg.seq_len");
  with(
      8, 64, [](RouterConfig& c) { c.scaling = NAN; }, "cfg.scaling");
  with(
      8, 64, [](RouterConfig& c) { c.aux_alpha = INFINITY; }, "cfg.aux_alpha");
  with(
      8, 64, [](RouterConfig& c) { c.kind = static_cast<RouterKind>(7); }, "cfg.kind");
}

TEST(RouterCheck, BadLogits) {
  const std::string op = "router_forward";
  {
    Fwd f(8, 64, RouterConfig::softmax_topk(2, true));
    f.x.v.dtype = DType::BF16;
    expect_error([&] { f.run(); }, op, "logits");
  }
  for (int64_t E : {6, 260, 0}) {  // E % 4, E > 256, no experts
    HostTensor x(DType::F32, 8, E);
    Fwd f(8, 8, RouterConfig::softmax_topk(2, true));
    expect_error([&] { router_forward(x.v, {}, f.o, f.cfg); }, op, "logits.cols");
  }
  {
    Fwd f(8, 64, RouterConfig::softmax_topk(2, true));
    f.x.v.ld = 68;
    expect_error([&] { f.run(); }, op, "logits");
  }
  {
    Fwd f(8, 64, RouterConfig::softmax_topk(2, true));
    f.x.v.data = nullptr;
    expect_error([&] { f.run(); }, op, "logits");
  }
}

TEST(RouterCheck, BadOutputsAndBias) {
  const std::string op = "router_forward";
  auto broken = [&](const std::function<void(Fwd&)>& edit, const std::string& arg) {
    Fwd f(8, 64, RouterConfig::deepseek_v3(0.1f, 4));
    f.cfg.n_groups = f.cfg.topk_groups = 1;
    edit(f);
    expect_error([&] { f.run(); }, op, arg);
  };
  broken([](Fwd& f) { f.o.topk_idx.dtype = DType::F32; }, "out.topk_idx");
  broken([](Fwd& f) { f.o.topk_idx.cols = 9; }, "out.topk_idx");
  broken([](Fwd& f) { f.o.topk_idx.rows = 7; }, "out.topk_idx");
  broken([](Fwd& f) { f.o.topk_weight.dtype = DType::BF16; }, "out.topk_weight");
  broken([](Fwd& f) { f.o.topk_weight.rows = 9; }, "out.topk_weight");
  broken([](Fwd& f) { f.o.tokens_per_expert.cols = 60; }, "out.tokens_per_expert");
  broken([](Fwd& f) { f.o.tokens_per_expert.dtype = DType::I64; }, "out.tokens_per_expert");
  broken([](Fwd& f) { f.o.scores.cols = 32; }, "out.scores");
  broken([](Fwd& f) { f.bias.v.cols = 32; }, "bias");
  broken([](Fwd& f) { f.bias.v.dtype = DType::BF16; }, "bias");
  broken([](Fwd& f) { f.o.seq_counts.rows = 3; }, "out.seq_counts");  // T / S = 2
  broken([](Fwd& f) { f.o.seq_counts = {}; }, "out.seq_counts");
  broken([](Fwd& f) { f.o.aux_loss = {}; }, "out.aux_loss");
  broken([](Fwd& f) { f.o.aux_loss.cols = 2; }, "out.aux_loss");
  broken([](Fwd& f) { f.cfg.aux_alpha = 0; }, "out.seq_counts");  // aux off: must be empty
  broken([](Fwd& f) { f.o.topk_weight.device = Device::Cuda; }, "out.topk_weight");
  broken([](Fwd& f) { f.bias.v.device = Device::Cuda; }, "bias");
}

TEST(RouterCheck, CudaTensors) {
  // Host memory marked Cuda: no device -> Unsupported (device); a device -> not device memory.
  Fwd f(8, 64, RouterConfig::softmax_topk(2, true));
  for (TensorView* t :
       {&f.x.v, &f.o.topk_idx, &f.o.topk_weight, &f.o.tokens_per_expert, &f.o.scores})
    t->device = Device::Cuda;
  if (cuda_available())
    expect_error([&] { router_forward(f.x.v, {}, f.o, f.cfg); }, "router_forward", "logits");
  else
    expect_error([&] { router_forward(f.x.v, {}, f.o, f.cfg); }, "router_forward", "device",
                 ErrorKind::Unsupported);
}

TEST(RouterCheck, BadBackwardArguments) {
  const std::string op = "router_backward";
  const int64_t T = 8, E = 64;
  RouterConfig cfg = RouterConfig::deepseek_v3(0.1f, 4);
  cfg.n_groups = cfg.topk_groups = 1;
  Fwd f(T, E, cfg);
  f.run();
  HostTensor dw(DType::F32, T, cfg.top_k), dx(DType::F32, T, E), da(DType::F32, 1, 1);
  std::fill(dw.ptr<float>(), dw.ptr<float>() + T * cfg.top_k, 1.0f);
  da.ptr<float>()[0] = 1.0f;
  struct Args {
    TensorView x, idx, dw, sc, da, dx;
    RouterConfig cfg;
  };
  const Args ok{f.x.v, f.out.idx.v, dw.v, f.out.seq_counts.v, da.v, dx.v, cfg};
  auto call = [](const Args& a) { router_backward(a.x, a.idx, a.dw, a.sc, a.da, a.dx, a.cfg); };
  EXPECT_NO_THROW(call(ok));
  auto broken = [&](const std::function<void(Args&)>& edit, const std::string& arg) {
    Args a = ok;
    edit(a);
    expect_error([&] { call(a); }, op, arg);
  };
  broken([](Args& a) { a.x.dtype = DType::BF16; }, "logits");
  broken([](Args& a) { a.idx.dtype = DType::F32; }, "topk_idx");
  broken([](Args& a) { a.idx.cols = 7; }, "topk_idx");
  broken([](Args& a) { a.dw.rows = 4; }, "d_topk_weight");
  broken([](Args& a) { a.dw.dtype = DType::I32; }, "d_topk_weight");
  broken([](Args& a) { a.dx.cols = 60; }, "d_logits");
  broken([](Args& a) { a.dx.device = Device::Cuda; }, "d_logits");
  broken([](Args& a) { a.sc = {}; }, "seq_counts");  // aux on: required
  broken([](Args& a) { a.sc.rows = 4; }, "seq_counts");
  broken([](Args& a) { a.da.cols = 2; }, "d_aux_loss");
  broken([](Args& a) { a.cfg.aux_alpha = 0; }, "seq_counts");  // aux off: must be empty
  broken([](Args& a) { a.cfg.top_k = 9; }, "cfg.top_k");
  broken([](Args& a) { a.cfg.seq_len = 3; }, "cfg.seq_len");
}

}  // namespace
}  // namespace fp8flow::test
