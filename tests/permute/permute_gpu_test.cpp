// CUDA backend of the permute ops == CPU reference, bit for bit, for every function and payload:
// routing plans (random, skewed, one expert, empty experts, one token, k = 1, invalid ids, every
// alignment), FP8 / MXFP4 / BF16 / F32 row moves with scales and probabilities, unpermute
// (weighted or not, BF16/F32 in and out, NaN/Inf inputs), the backward helpers, the round trip,
// and the CUDA-only argument checks. Skipped (with the reason printed) where no GPU is visible.
#include "permute_test_util.h"

#if FP8FLOW_WITH_CUDA

namespace fp8flow::test {
namespace {

::testing::AssertionResult same(const DeviceTensor& d, const HostTensor& h) {
  return bytes_equal(d.to_host(), h);
}

void compare_plans(const HostPlan& h, const DevicePlan& d) {
  EXPECT_TRUE(same(d.tpe, h.tpe)) << "tokens_per_expert";
  EXPECT_TRUE(same(d.off, h.off)) << "offsets";
  EXPECT_TRUE(same(d.dest, h.dest)) << "dest_row";
  EXPECT_TRUE(same(d.src, h.src)) << "src_slot";
  EXPECT_TRUE(same(d.inv, h.inv)) << "invalid";
}

TEST(PermuteGpu, PlanMatchesReference) {
  FP8FLOW_REQUIRE_GPU();
  auto cases = route_cases();
  cases.push_back({"dsv3_E32", 4096, 8, 32, route_uniform(4096, 8, 32, 31)});
  cases.push_back({"dsv3_E256_skewed", 4096, 8, 256, route_skewed(4096, 8, 256, 32)});
  cases.push_back({"big_T", 65537, 8, 64, route_uniform(65537, 8, 64, 33)});
  cases.push_back({"big_invalid", 20000, 6, 1024, route_with_invalid(20000, 6, 1024, 34, 0.3)});
  for (const auto& rc : cases) {
    for (int align : {1, 8, 16, 32, 64, 128}) {
      for (DType od : {DType::I64, DType::I32}) {
        SCOPED_TRACE(std::string(rc.name) + " align " + std::to_string(align) + " " +
                     to_string(od));
        const int64_t len = permutation_max_rows(rc.T, rc.k, rc.E, align) + (align == 8 ? 1000 : 0);
        const HostPlan h = make_host_plan(rc.idx, rc.T, rc.k, rc.E, align, od, len);
        const DevicePlan d = make_device_plan(rc.idx, rc.T, rc.k, rc.E, align, od, len);
        compare_plans(h, d);
      }
    }
  }
}

TEST(PermuteGpu, PlanIsDeterministicAcrossRuns) {
  FP8FLOW_REQUIRE_GPU();
  const auto idx = route_skewed(3000, 8, 128, 35);
  const DevicePlan a = make_device_plan(idx, 3000, 8, 128, 16);
  const DevicePlan b = make_device_plan(idx, 3000, 8, 128, 16);
  EXPECT_TRUE(bytes_equal(a.src.to_host(), b.src.to_host()));
  EXPECT_TRUE(bytes_equal(a.dest.to_host(), b.dest.to_host()));
}

// One permute case for every payload: GPU result vs reference, R = M_pad and R = bound.
struct PayloadCase {
  int64_t T, k, E, H;
  int align;
  uint64_t seed;
};

std::vector<PayloadCase> payload_cases() {
  return {{301, 4, 8, 128, 16, 1}, {67, 8, 32, 7168, 16, 2}, {67, 8, 32, 7168, 128, 3},
          {1, 8, 32, 7168, 16, 4}, {129, 1, 7, 256, 1, 5},   {50, 2, 3, 2048, 64, 6},
          {0, 4, 8, 128, 16, 7}};
}

TEST(PermuteGpu, Fp8RowsScalesProbsMatchReference) {
  FP8FLOW_REQUIRE_GPU();
  for (const auto& pc : payload_cases()) {
    for (int64_t H : {pc.H, pc.H + 48}) {  // also H not a multiple of 128 (partial last tile)
      SCOPED_TRACE("T " + std::to_string(pc.T) + " H " + std::to_string(H) + " align " +
                   std::to_string(pc.align));
      const auto idx = route_with_invalid(pc.T, pc.k, pc.E, pc.seed, 0.05);
      const HostPlan hp = make_host_plan(idx, pc.T, pc.k, pc.E, pc.align);
      const DevicePlan dp = make_device_plan(idx, pc.T, pc.k, pc.E, pc.align);
      const int64_t tiles = (H + 127) / 128;
      HostTensor x = random_bytes(DType::E4M3, pc.T, H, pc.seed + 10);  // NaN codes included
      HostTensor xs = random_pow2_scales(tiles, pc.T, pc.seed + 11);
      HostTensor w = random_weights(pc.T, pc.k, pc.seed + 12);
      const DeviceTensor dx(x), dxs(xs), dw(w);
      for (int64_t R : {hp.m_pad(pc.E), permutation_max_rows(pc.T, pc.k, pc.E, pc.align)}) {
        for (bool probs : {true, false}) {
          HostTensor y(DType::E4M3, R, H), ys(DType::F32, tiles, R), prob(DType::F32, 1, R);
          DeviceTensor dy(DType::E4M3, R, H), dys(DType::F32, tiles, R), dprob(DType::F32, 1, R);
          permute(ScaledTensor{x.v, xs.v}, ScaledTensor{y.v, ys.v}, hp.view(),
                  probs ? PermuteProbs{w.v, prob.v} : PermuteProbs{});
          permute(ScaledTensor{dx.v, dxs.v}, ScaledTensor{dy.v, dys.v}, dp.view(),
                  probs ? PermuteProbs{dw.v, dprob.v} : PermuteProbs{});
          EXPECT_TRUE(same(dy, y)) << "data R " << R;
          EXPECT_TRUE(same(dys, ys)) << "scales R " << R;
          if (probs) EXPECT_TRUE(same(dprob, prob)) << "probs R " << R;
        }
      }
    }
  }
}

TEST(PermuteGpu, Mxfp4RowsAndE8M0MatchReference) {
  FP8FLOW_REQUIRE_GPU();
  for (const auto& pc : payload_cases()) {
    // H / 32 scale bytes: 4, 224 (16-byte rows), 5 (byte access), 6 (2-byte access).
    for (int64_t H : {pc.H, int64_t{160}, int64_t{192}}) {
      SCOPED_TRACE("T " + std::to_string(pc.T) + " H " + std::to_string(H));
      const auto idx = route_uniform(pc.T, pc.k, pc.E, pc.seed);
      const HostPlan hp = make_host_plan(idx, pc.T, pc.k, pc.E, pc.align);
      const DevicePlan dp = make_device_plan(idx, pc.T, pc.k, pc.E, pc.align);
      const int64_t R = hp.m_pad(pc.E);
      HostTensor x = random_bytes(DType::E2M1x2, pc.T, H, pc.seed + 20);
      HostTensor xs = random_bytes(DType::E8M0, pc.T, H / 32, pc.seed + 21);
      HostTensor w = random_weights(pc.T, pc.k, pc.seed + 22);
      HostTensor y(DType::E2M1x2, R, H), ys(DType::E8M0, R, H / 32), prob(DType::F32, 1, R);
      const DeviceTensor dx(x), dxs(xs), dw(w);
      DeviceTensor dy(DType::E2M1x2, R, H), dys(DType::E8M0, R, H / 32), dprob(DType::F32, 1, R);
      permute(ScaledTensor{x.v, xs.v, ScaleLayout::Mx1x32},
              ScaledTensor{y.v, ys.v, ScaleLayout::Mx1x32}, hp.view(), {w.v, prob.v});
      permute(ScaledTensor{dx.v, dxs.v, ScaleLayout::Mx1x32},
              ScaledTensor{dy.v, dys.v, ScaleLayout::Mx1x32}, dp.view(), {dw.v, dprob.v});
      EXPECT_TRUE(same(dy, y));
      EXPECT_TRUE(same(dys, ys));
      EXPECT_TRUE(same(dprob, prob));
    }
  }
}

// MX scale views at odd addresses take the byte-wide path.
TEST(PermuteGpu, Mxfp4ScalesAtOddAddresses) {
  FP8FLOW_REQUIRE_GPU();
  const int64_t T = 77, k = 4, E = 8, H = 512;
  const auto idx = route_uniform(T, k, E, 40);
  const HostPlan hp = make_host_plan(idx, T, k, E, 16);
  const DevicePlan dp = make_device_plan(idx, T, k, E, 16);
  const int64_t R = hp.m_pad(E);
  HostTensor x = random_bytes(DType::E2M1x2, T, H, 41);
  HostTensor xs_big = random_bytes(DType::E8M0, 1, T * H / 32 + 1, 42);
  HostTensor y(DType::E2M1x2, R, H), ys_big(DType::E8M0, 1, R * H / 32 + 1);
  const DeviceTensor dx(x), dxs_big(xs_big);
  DeviceTensor dy(DType::E2M1x2, R, H), dys_big(DType::E8M0, 1, R * H / 32 + 1);
  auto sub = [&](const TensorView& v, int64_t rows) {
    return TensorView{static_cast<uint8_t*>(v.data) + 1, DType::E8M0, rows, H / 32, -1, v.device};
  };
  permute(ScaledTensor{x.v, sub(xs_big.v, T), ScaleLayout::Mx1x32},
          ScaledTensor{y.v, sub(ys_big.v, R), ScaleLayout::Mx1x32}, hp.view());
  permute(ScaledTensor{dx.v, sub(dxs_big.v, T), ScaleLayout::Mx1x32},
          ScaledTensor{dy.v, sub(dys_big.v, R), ScaleLayout::Mx1x32}, dp.view());
  EXPECT_TRUE(same(dy, y));
  EXPECT_TRUE(same(dys_big, ys_big));  // byte 0 and the last must stay untouched (poison 0xA5)
}

TEST(PermuteGpu, Bf16AndF32RowsMatchReference) {
  FP8FLOW_REQUIRE_GPU();
  for (const auto& pc : payload_cases()) {
    for (DType d : {DType::BF16, DType::F32}) {
      SCOPED_TRACE("T " + std::to_string(pc.T) + " H " + std::to_string(pc.H) + " " + to_string(d));
      const auto idx = route_skewed(pc.T, pc.k, pc.E, pc.seed);
      const HostPlan hp = make_host_plan(idx, pc.T, pc.k, pc.E, pc.align);
      const DevicePlan dp = make_device_plan(idx, pc.T, pc.k, pc.E, pc.align);
      const int64_t R = permutation_max_rows(pc.T, pc.k, pc.E, pc.align);
      HostTensor x = random_bytes(d, pc.T, pc.H, pc.seed + 30);  // NaN payloads included
      HostTensor y(d, R, pc.H);
      const DeviceTensor dx(x);
      DeviceTensor dy(d, R, pc.H);
      permute(x.v, y.v, hp.view());
      permute(dx.v, dy.v, dp.view());
      EXPECT_TRUE(same(dy, y));
    }
  }
}

// permute's CUDA backend reads each token row once and scatters it through plan.dest_row, but
// the op is defined by src_slot alone: a plan whose dest_row disagrees with src_slot (pairs sent to
// another row, to a pad row, out of range, two pairs to one row) must still give the reference's
// rows, bit for bit, with nothing written twice.
TEST(PermuteGpu, RowsFollowSrcSlotWhenDestRowDisagrees) {
  FP8FLOW_REQUIRE_GPU();
  const int64_t T = 300, k = 4, E = 8, H = 1024;
  const int align = 16;
  const auto idx = route_skewed(T, k, E, 77);
  HostPlan hp = make_host_plan(idx, T, k, E, align);
  const int64_t R = permutation_max_rows(T, k, E, align);
  auto* dest = reinterpret_cast<int32_t*>(hp.dest.buf.data());
  const int32_t* src = hp.src_slot();
  int32_t pad = -1;  // a pad row of the plan
  for (int64_t r = 0; r < hp.m_pad(E) && pad < 0; ++r)
    if (src[r] < 0) pad = static_cast<int32_t>(r);
  ASSERT_GE(pad, 0);
  std::swap(dest[0], dest[5]);         // two pairs exchanged
  dest[9] = pad;                       // a pair pointed at a pad row
  dest[13] = static_cast<int32_t>(R);  // out of range
  dest[17] = -1;                       // dropped
  dest[21] = dest[22];                 // two pairs to one row
  auto upload = [&](DevicePlan& dp) {  // the corrupted host plan, as is
    for (auto [h, dv] : {std::pair{&hp.tpe, &dp.tpe},
                         {&hp.off, &dp.off},
                         {&hp.dest, &dp.dest},
                         {&hp.src, &dp.src},
                         {&hp.inv, &dp.inv}})
      ASSERT_EQ(cudaMemcpy(dv->v.data, h->buf.data(), bytes_for(h->v.dtype, h->v.rows, h->v.cols),
                           cudaMemcpyHostToDevice),
                cudaSuccess);
  };
  for (DType d : {DType::BF16, DType::F32}) {
    SCOPED_TRACE(to_string(d));
    const HostTensor x = random_bytes(d, T, H, 78);
    HostTensor y(d, R, H);
    permute(x.v, y.v, hp.view());
    DevicePlan dp(T, k, E, R);
    upload(dp);
    const DeviceTensor dx(x);
    DeviceTensor dy(d, R, H);
    ASSERT_EQ(cudaMemset(dy.v.data, 0x5A, static_cast<size_t>(R * dy.v.row_bytes())), cudaSuccess);
    permute(dx.v, dy.v, dp.view());
    EXPECT_TRUE(same(dy, y));
  }
  {  // MXFP4 rows with their E8M0 scales (scatter half: data of confirmed rows; row half: scales)
    SCOPED_TRACE("MXFP4");
    const HostTensor x = random_bytes(DType::E2M1x2, T, H, 79);
    const HostTensor xs = random_bytes(DType::E8M0, T, H / 32, 80);
    HostTensor y(DType::E2M1x2, R, H), ys(DType::E8M0, R, H / 32);
    permute(ScaledTensor{x.v, xs.v, ScaleLayout::Mx1x32},
            ScaledTensor{y.v, ys.v, ScaleLayout::Mx1x32}, hp.view());
    DevicePlan dp(T, k, E, R);
    upload(dp);
    const DeviceTensor dx(x), dxs(xs);
    DeviceTensor dy(DType::E2M1x2, R, H), dys(DType::E8M0, R, H / 32);
    ASSERT_EQ(cudaMemset(dy.v.data, 0x5A, static_cast<size_t>(R * dy.v.row_bytes())), cudaSuccess);
    ASSERT_EQ(cudaMemset(dys.v.data, 0x5A, static_cast<size_t>(R * dys.v.row_bytes())),
              cudaSuccess);
    permute(ScaledTensor{dx.v, dxs.v, ScaleLayout::Mx1x32},
            ScaledTensor{dy.v, dys.v, ScaleLayout::Mx1x32}, dp.view());
    EXPECT_TRUE(same(dy, y));
    EXPECT_TRUE(same(dys, ys));
  }
}

TEST(PermuteGpu, UnpermuteMatchesReference) {
  FP8FLOW_REQUIRE_GPU();
  struct C {
    int64_t T, k, E, H;
  };
  for (const C c : {C{301, 8, 32, 128}, C{67, 8, 32, 7168}, C{1, 8, 32, 7168}, C{129, 1, 7, 8},
                    C{50, 2, 3, 520}, C{3000, 6, 64, 64}, C{0, 4, 8, 128}}) {
    const auto idx = route_with_invalid(c.T, c.k, c.E, c.H + c.T, 0.1);
    const HostPlan hp = make_host_plan(idx, c.T, c.k, c.E, 16);
    const DevicePlan dp = make_device_plan(idx, c.T, c.k, c.E, 16);
    // Y rows: M_pad, and fewer (rows past the end of y contribute nothing on both backends).
    for (int64_t R : {hp.m_pad(c.E), hp.m_pad(c.E) / 2}) {
      const auto vals = make_values(R, c.H, Fill::Adversarial, c.T + R);
      const HostTensor w = random_weights(c.T, c.k, 50);
      const DeviceTensor dw(w);
      for (DType yd : {DType::BF16, DType::F32}) {
        const HostTensor y = host_from_values(vals, yd, R, c.H);
        const DeviceTensor dyv(y);
        for (DType od : {DType::BF16, DType::F32}) {
          for (bool weighted : {false, true}) {
            SCOPED_TRACE("T " + std::to_string(c.T) + " k " + std::to_string(c.k) + " H " +
                         std::to_string(c.H) + " R " + std::to_string(R) + " y " + to_string(yd) +
                         " out " + to_string(od) + (weighted ? " weighted" : ""));
            HostTensor out(od, c.T, c.H);
            DeviceTensor dout(od, c.T, c.H);
            if (weighted) {
              unpermute_weighted(y.v, w.v, out.v, hp.view());
              unpermute_weighted(dyv.v, dw.v, dout.v, dp.view());
            } else {
              unpermute(y.v, out.v, hp.view());
              unpermute(dyv.v, dout.v, dp.view());
            }
            EXPECT_TRUE(same(dout, out));
          }
        }
      }
    }
  }
}

TEST(PermuteGpu, RoundTripK1ReturnsX) {
  FP8FLOW_REQUIRE_GPU();
  const int64_t T = 1001, k = 1, E = 13, H = 7168;
  const auto idx = route_uniform(T, k, E, 60);
  const DevicePlan dp = make_device_plan(idx, T, k, E, 16);
  const HostTensor x = random_bytes(DType::BF16, T, H, 61);
  const DeviceTensor dx(x);
  const int64_t R = permutation_max_rows(T, k, E, 16);
  DeviceTensor dy(DType::BF16, R, H), back(DType::BF16, T, H);
  permute(dx.v, dy.v, dp.view());
  unpermute(dy.v, back.v, dp.view());
  EXPECT_TRUE(same(back, x));
}

TEST(PermuteGpu, BackwardHelpersMatchReference) {
  FP8FLOW_REQUIRE_GPU();
  struct C {
    int64_t T, k, E, H;
  };
  for (const C c : {C{211, 8, 32, 7168}, C{29, 3, 4, 520}, C{1, 1, 1, 8}, C{0, 2, 2, 16}}) {
    const auto idx = route_with_invalid(c.T, c.k, c.E, c.T + 70, 0.1);
    const HostPlan hp = make_host_plan(idx, c.T, c.k, c.E, 16);
    const DevicePlan dp = make_device_plan(idx, c.T, c.k, c.E, 16);
    const int64_t R = hp.m_pad(c.E);
    // Probabilities.
    HostTensor dprob = host_from_values(make_values(1, R, Fill::Adversarial, 71), DType::F32, 1, R);
    HostTensor dw(DType::F32, c.T, c.k);
    const DeviceTensor ddprob(dprob);
    DeviceTensor ddw(DType::F32, c.T, c.k);
    permute_probs_backward(dprob.v, hp.view(), dw.v);
    permute_probs_backward(ddprob.v, dp.view(), ddw.v);
    EXPECT_TRUE(same(ddw, dw));
    // Weighted unpermute backward.
    for (DType gd : {DType::BF16, DType::F32}) {
      for (DType yd : {DType::BF16, DType::F32}) {
        for (Fill f : {Fill::Normal, Fill::Adversarial}) {
          SCOPED_TRACE("T " + std::to_string(c.T) + " dout " + to_string(gd) + " y " +
                       to_string(yd));
          const HostTensor g = host_from_values(make_values(c.T, c.H, f, 72), gd, c.T, c.H);
          const HostTensor y = host_from_values(make_values(R, c.H, f, 73), yd, R, c.H);
          const HostTensor w = random_weights(c.T, c.k, 74);
          HostTensor dy(gd, R, c.H), dwt(DType::F32, c.T, c.k);
          const DeviceTensor dg(g), dyv(y), dww(w);
          DeviceTensor ddy(gd, R, c.H), ddwt(DType::F32, c.T, c.k);
          unpermute_weighted_backward(g.v, y.v, w.v, hp.view(), dy.v, dwt.v);
          unpermute_weighted_backward(dg.v, dyv.v, dww.v, dp.view(), ddy.v, ddwt.v);
          EXPECT_TRUE(same(ddy, dy));
          EXPECT_TRUE(same(ddwt, dwt));
        }
      }
    }
  }
}

// CUDA-only argument checks (the rest are in permute_bad_input_test.cpp).
TEST(PermuteGpu, BadCudaArguments) {
  FP8FLOW_REQUIRE_GPU();
  const int64_t T = 64, k = 2, E = 4, H = 256;
  const auto idx = route_uniform(T, k, E, 80);
  const DeviceTensor ids(host_i32(idx, T, k));
  DevicePlan dp(T, k, E, permutation_max_rows(T, k, E, 16));
  const size_t need = permutation_workspace_bytes(T, k, E);
  DeviceBytes ws(need + 64);
  expect_error([&] { make_permutation(ids.v, E, dp.view(), ws.p, need - 1); }, "make_permutation",
               "workspace_bytes");
  expect_error([&] { make_permutation(ids.v, E, dp.view(), nullptr, need); }, "make_permutation",
               "workspace");
  expect_error([&] { make_permutation(ids.v, E, dp.view(), static_cast<char*>(ws.p) + 4, need); },
               "make_permutation", "workspace");
  std::vector<uint8_t> host_ws(need + 16);
  expect_error([&] { make_permutation(ids.v, E, dp.view(), host_ws.data(), need); },
               "make_permutation", "workspace");

  make_permutation(ids.v, E, dp.view(), ws.p, need);
  const int64_t R = permutation_max_rows(T, k, E, 16);
  DeviceTensor x(DType::BF16, T + 1, H), y(DType::BF16, R + 1, H);
  // Misaligned rows: a view starting 8 bytes in.
  TensorView xm{static_cast<uint8_t*>(x.p) + 8, DType::BF16, T, H, -1, Device::Cuda};
  TensorView yv{y.p, DType::BF16, R, H, -1, Device::Cuda};
  expect_error([&] { permute(xm, yv, dp.view()); }, "permute", "in.data");
  // Host memory labelled Cuda.
  HostTensor hx(DType::BF16, T, H);
  TensorView hv = hx.v;
  hv.device = Device::Cuda;
  expect_error([&] { permute(hv, yv, dp.view()); }, "permute", "in");
  // A misaligned F32 view (2 bytes in).
  TensorView xv{x.p, DType::BF16, T, H, -1, Device::Cuda};
  DeviceTensor w(DType::F32, T, k), pr(DType::F32, 1, R + 1);
  TensorView prm{static_cast<uint8_t*>(pr.p) + 2, DType::F32, 1, R, -1, Device::Cuda};
  expect_error([&] { permute(xv, yv, dp.view(), {w.v, prm}); }, "permute", "probs.prob");
  // Mixed devices.
  expect_error([&] { permute(hx.v, yv, dp.view()); }, "permute", "out");
}

}  // namespace
}  // namespace fp8flow::test

#endif  // FP8FLOW_WITH_CUDA
