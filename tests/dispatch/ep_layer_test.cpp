// The expert-parallel MoELayer on the CPU: N ranks simulated by the InProcess communicator, each
// with its own tokens (different counts per rank) and its slice of the experts, against the
// single-rank layer of the same global weights and the concatenated tokens. Bit for bit for y, dx
// and each rank's dW1/dW2 slice for bf16, fp8-blockwise and fp8-flow (vs the comm-less layer) and
// for fp8-flow-mxfp4 (vs the 1-rank EP layer: its MXFP4 transport is part of the math; vs the
// comm-less layer it stays within a stated bound). dgate: the ranks' partial sums add up to the
// single-GPU one (FP32, different summation order). Plus config mismatch across ranks, the receive
// bound, non-finite input on one rank, and bad construction arguments.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "common/test_util.h"
#include "dispatch/ep_test_util.h"
#include "fp8flow/comm.h"
#include "fp8flow/moe.h"

namespace fp8flow::test {
namespace {

using namespace eptest;

TensorView rows_of(const HostTensor& t, int64_t r0, int64_t n) {
  TensorView v = t.v;
  v.data = const_cast<uint8_t*>(t.buf.data()) + r0 * t.v.row_bytes();
  v.rows = n;
  return v;
}

// One rank's layer run over tokens [t0, t0 + T) and experts [e0, e0 + El).
Out run_rank(const Global& g, Recipe r, Communicator* comm, int ep, int64_t t0, int64_t T,
             int64_t e0, int64_t El, int64_t max_tokens) {
  const EpProblem& p = g.p;
  const int64_t H = p.H, F = p.F;
  MoEWeights w{g.gate.v, p.bias ? g.bias.v : TensorView{}, rows_of(g.w1, e0 * 2 * F, El * 2 * F),
               rows_of(g.w2, e0 * H, El * H)};
  MoELayer layer(config(p, r, ep, max_tokens), w, comm);
  MoEContext ctx = layer.make_context();
  Out o;
  o.y = HostTensor(DType::BF16, T, H);
  layer.forward(rows_of(g.x, t0, T), o.y.v, ctx);
  o.dx = HostTensor(DType::BF16, T, H);
  o.dw1 = HostTensor(DType::F32, El * 2 * F, H);
  o.dw2 = HostTensor(DType::F32, El * H, F);
  o.dgate = HostTensor(DType::F32, p.Eg, H);
  layer.backward(rows_of(g.dy, t0, T), MoEGrads{o.dx.v, o.dw1.v, o.dw2.v, o.dgate.v, {}}, ctx);
  o.casts = ctx.casts();
  return o;
}

std::vector<Out> run_ep(const Global& g, Recipe r, int N) {
  std::vector<Out> outs(N);
  std::vector<int64_t> t0(N, 0);
  for (int q = 1; q < N; ++q) t0[q] = t0[q - 1] + g.p.T[q - 1];
  const int64_t El = g.p.Eg / N;
  const int64_t tmax = g.p.tmax();
  run_in_process(N, [&](Communicator& comm) {
    const int q = comm.rank();
    outs[q] = run_rank(g, r, &comm, N, t0[q], g.p.T[q], q * El, El, tmax);
  });
  return outs;
}

Out run_single(const Global& g, Recipe r, Communicator* comm) {
  return run_rank(g, r, comm, 1, 0, g.p.tg(), 0, g.p.Eg, g.p.tmax() * int64_t(g.p.T.size()));
}

void check_recipes(const EpProblem& p, std::initializer_list<int> ranks) {
  const Global g = make_global(p);
  for (Recipe r : {Recipe::Bf16, Recipe::Fp8Blockwise, Recipe::Fp8Flow, Recipe::Fp8FlowMxfp4}) {
    SCOPED_TRACE(to_string(r));
    const Out single = run_single(g, r, nullptr);
    // The 1-rank EP layer (same global problem): max_tokens equal to the single run's.
    Out ep1;
    run_in_process(1, [&](Communicator& comm) { ep1 = run_single(g, r, &comm); });
    const bool mx = r == Recipe::Fp8FlowMxfp4;
    {
      SCOPED_TRACE("EP(1) vs comm-less");
      compare(g, {ep1}, single, !mx, 0.25);
    }
    for (int N : ranks) {
      if (static_cast<int>(p.T.size()) != N) continue;
      SCOPED_TRACE(::testing::Message() << "EP(" << N << ")");
      const std::vector<Out> ep = run_ep(g, r, N);
      compare(g, ep, mx ? ep1 : single, true, 0);
      {
        // Dedup dispatch (one record per (token, rank)): every output bit-identical.
        SCOPED_TRACE("ep_dedup");
        Global gd = g;
        gd.p.dedup = true;
        const std::vector<Out> epd = run_ep(gd, r, N);
        for (int q = 0; q < N; ++q) {
          SCOPED_TRACE(::testing::Message() << "rank " << q);
          EXPECT_TRUE(bytes_equal(epd[q].y, ep[q].y)) << "y";
          EXPECT_TRUE(bytes_equal(epd[q].dx, ep[q].dx)) << "dx";
          EXPECT_TRUE(bytes_equal(epd[q].dw1, ep[q].dw1)) << "dw1";
          EXPECT_TRUE(bytes_equal(epd[q].dw2, ep[q].dw2)) << "dw2";
          EXPECT_TRUE(bytes_equal(epd[q].dgate, ep[q].dgate)) << "dgate";
        }
      }
      // Cast counts are the recipe's (2 conversions more for the MXFP4 transport, one less saved).
      EXPECT_EQ(ep[0].casts.forward, single.casts.forward);
      EXPECT_EQ(ep[0].casts.backward, single.casts.backward);
      EXPECT_EQ(ep[0].casts.conversions, single.casts.conversions + (mx ? 1 : 0));
    }
  }
}

TEST(EpLayer, TwoRanksEqualsSingleGpu) {
  EpProblem p;
  p.T = {40, 23};
  check_recipes(p, {2});
}

TEST(EpLayer, FourRanksSigmoidBiasEqualsSingleGpu) {
  EpProblem p;
  p.T = {17, 1, 30, 9};
  p.router = RouterConfig::deepseek_v3();
  p.router.top_k = 3;
  p.router.n_groups = 1;
  p.router.topk_groups = 1;
  p.bias = true;
  p.seed = 7;
  check_recipes(p, {4});
}

TEST(EpLayer, ThreeRanksSkewedTopK) {
  // 12 experts over 3 ranks, k = 4 of 12, larger H.
  EpProblem p;
  p.T = {25, 8, 31};
  p.Eg = 12;
  p.H = 512;
  p.router = RouterConfig::softmax_topk(4, false);
  p.seed = 11;
  check_recipes(p, {3});
}

TEST(EpLayer, RankReceivingNothing) {
  // A large bias keeps every token away from rank 1's experts (4, 5, 6, 7).
  EpProblem p;
  p.T = {20, 12};
  p.router = RouterConfig::deepseek_v3();
  p.router.top_k = 2;
  p.router.n_groups = 1;
  p.router.topk_groups = 1;
  p.bias = true;
  const Global g0 = make_global(p);
  Global g = make_global(p);
  for (int e = 4; e < 8; ++e) g.bias.ptr<float>()[e] = -100.f;
  for (Recipe r : {Recipe::Fp8Flow, Recipe::Bf16}) {
    const Out single = run_single(g, r, nullptr);
    const std::vector<Out> ep = run_ep(g, r, 2);
    compare(g, ep, single, true, 0);
    for (int64_t i = 0; i < ep[1].dw1.v.numel(); ++i)
      ASSERT_EQ(reinterpret_cast<const float*>(ep[1].dw1.buf.data())[i], 0.0f);
  }
}

void expect_error(const std::function<void()>& f, ErrorKind kind, const std::string& what) {
  try {
    f();
    ADD_FAILURE() << "no error (" << what << ")";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), kind) << e.what();
    EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
  }
}

TEST(EpLayer, MismatchedConfigAcrossRanks) {
  EpProblem p;
  const Global g = make_global(p);
  // Rank 1 asks for another recipe: every rank throws a Comm error naming the config.
  std::vector<std::string> msgs(2);
  expect_error(
      [&] {
        run_in_process(2, [&](Communicator& comm) {
          const int q = comm.rank();
          MoEConfig c = config(p, q == 1 ? Recipe::Bf16 : Recipe::Fp8Flow, 2, p.tmax());
          MoEWeights w{g.gate.v,
                       {},
                       rows_of(g.w1, q * 4 * 2 * p.F, 4 * 2 * p.F),
                       rows_of(g.w2, q * 4 * p.H, 4 * p.H)};
          try {
            MoELayer l(c, w, &comm);
          } catch (const Error& e) {
            msgs[q] = e.what();
            throw;
          }
        });
      },
      ErrorKind::Comm, "MoELayer: cfg");
  EXPECT_EQ(msgs[0], msgs[1]);
  EXPECT_NE(msgs[0].find("on rank 1"), std::string::npos) << msgs[0];
}

TEST(EpLayer, BadConstruction) {
  EpProblem p;
  const Global g = make_global(p);
  const MoEWeights half{g.gate.v, {}, rows_of(g.w1, 0, 4 * 2 * p.F), rows_of(g.w2, 0, 4 * p.H)};
  // ep_size without a communicator.
  expect_error([&] { MoELayer l(config(p, Recipe::Fp8Flow, 2, 64), half); },
               ErrorKind::InvalidArgument, "cfg.ep_size");
  // ep_size not the communicator's size.
  expect_error(
      [&] {
        run_in_process(2, [&](Communicator& comm) {
          MoELayer l(config(p, Recipe::Fp8Flow, 4, 64), half, &comm);
        });
      },
      ErrorKind::InvalidArgument, "cfg.ep_size");
  // Full (global) expert weights given to an EP layer.
  expect_error(
      [&] {
        run_in_process(2, [&](Communicator& comm) {
          MoELayer l(config(p, Recipe::Fp8Flow, 2, 64), MoEWeights{g.gate.v, {}, g.w1.v, g.w2.v},
                     &comm);
        });
      },
      ErrorKind::InvalidArgument, "w.w1");
}

TEST(EpLayer, ReceiveBoundAndNonFiniteThrowOnEveryRank) {
  EpProblem p;
  p.T = {40, 40};
  const Global g = make_global(p);
  std::vector<std::string> msgs(2);
  auto run = [&](int64_t max_recv, bool nan_on_rank1) {
    msgs.assign(2, "");
    run_in_process(2, [&](Communicator& comm) {
      const int q = comm.rank();
      MoEConfig c = config(p, Recipe::Fp8Flow, 2, 40);
      c.ep_max_recv_rows = max_recv;
      MoEWeights w{g.gate.v,
                   {},
                   rows_of(g.w1, q * 4 * 2 * p.F, 4 * 2 * p.F),
                   rows_of(g.w2, q * 4 * p.H, 4 * p.H)};
      MoELayer l(c, w, &comm);
      MoEContext ctx = l.make_context();
      HostTensor x = slice_rows(g.x, q * 40, 40), y(DType::BF16, 40, p.H);
      if (nan_on_rank1 && q == 1) x.ptr<uint16_t>()[5] = 0x7FC0;
      try {
        l.forward(x.v, y.v, ctx);
      } catch (const Error& e) {
        msgs[q] = e.what();
        throw;
      }
    });
  };
  // 80 pairs per rank, 160 in all: a bound of 20 rows cannot hold one rank's share.
  expect_error([&] { run(20, false); }, ErrorKind::InvalidArgument, "cfg.ep_max_recv_rows");
  EXPECT_NE(msgs[0].find("cfg.ep_max_recv_rows"), std::string::npos) << msgs[0];
  EXPECT_NE(msgs[1].find("cfg.ep_max_recv_rows"), std::string::npos) << msgs[1];
  expect_error([&] { run(0, true); }, ErrorKind::InvalidArgument, "on rank 1");
  EXPECT_EQ(msgs[0], msgs[1]);
  run(160, false);  // the bound that always fits
}

}  // namespace
}  // namespace fp8flow::test
