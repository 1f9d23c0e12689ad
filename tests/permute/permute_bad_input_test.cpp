// Every bad argument of the permute ops raises fp8flow::Error whose message names the op and the
// argument (CPU tensors; the CUDA-only checks are in permute_gpu_test.cpp).
#include "permute_test_util.h"

namespace fp8flow::test {
namespace {

struct Fixture {
  int64_t T = 16, k = 2, E = 4, H = 128;
  int align = 16;
  std::vector<int32_t> idx = route_uniform(16, 2, 4, 1);
  HostTensor ids = host_i32(idx, T, k);
  HostPlan plan = make_host_plan(idx, T, k, E, align);
  int64_t R = permutation_max_rows(T, k, E, align);
};

TEST(PermuteBadInput, MakePermutation) {
  Fixture s;
  const PermutationPlan p = s.plan.view();
  auto run = [&](const TensorView& ids, int64_t E, const PermutationPlan& pl, int align = 16) {
    make_permutation(ids, E, pl, nullptr, 0, PermutationOptions{align});
  };
  HostTensor f32(DType::F32, s.T, s.k);
  expect_error([&] { run(f32.v, s.E, p); }, "make_permutation", "topk_idx");
  HostTensor k0(DType::I32, s.T, 0), k33(DType::I32, s.T, 33);
  expect_error([&] { run(k0.v, s.E, p); }, "make_permutation", "topk_idx");
  expect_error([&] { run(k33.v, s.E, p); }, "make_permutation", "topk_idx");
  expect_error([&] { run(s.ids.v, 0, p); }, "make_permutation", "num_experts");
  expect_error([&] { run(s.ids.v, 1025, p); }, "make_permutation", "num_experts");
  for (int a : {0, 3, 256, -16})
    expect_error([&] { run(s.ids.v, s.E, p, a); }, "make_permutation", "options.align");
  {
    PermutationPlan q = p;
    q.tokens_per_expert.cols = s.E - 1;
    expect_error([&] { run(s.ids.v, s.E, q); }, "make_permutation", "plan.tokens_per_expert");
  }
  {
    PermutationPlan q = p;
    q.offsets.dtype = DType::F32;
    expect_error([&] { run(s.ids.v, s.E, q); }, "make_permutation", "plan.offsets");
    q = p;
    q.offsets.cols = s.E;
    expect_error([&] { run(s.ids.v, s.E, q); }, "make_permutation", "plan.offsets");
  }
  {
    PermutationPlan q = p;
    q.dest_row.cols = s.k + 1;
    expect_error([&] { run(s.ids.v, s.E, q); }, "make_permutation", "plan.dest_row");
  }
  {
    PermutationPlan q = p;
    q.src_slot.cols = s.R - 1;  // smaller than the max-rows bound
    expect_error([&] { run(s.ids.v, s.E, q); }, "make_permutation", "plan.src_slot");
  }
  {
    PermutationPlan q = p;
    q.invalid.cols = 2;
    expect_error([&] { run(s.ids.v, s.E, q); }, "make_permutation", "plan.invalid");
  }
  {
    PermutationPlan q = p;
    q.dest_row.data = nullptr;
    expect_error([&] { run(s.ids.v, s.E, q); }, "make_permutation", "plan.dest_row");
  }
  {
    PermutationPlan q = p;
    q.src_slot.device = Device::Cuda;
    expect_error([&] { run(s.ids.v, s.E, q); }, "make_permutation", "plan.src_slot");
  }
  {
    HostTensor strided(DType::I32, s.T, s.k * 2);
    TensorView v = strided.v;
    v.cols = s.k;
    v.ld = s.k * 2;
    expect_error([&] { run(v, s.E, p); }, "make_permutation", "topk_idx");
  }
  {
    // T * k + E * (align - 1) must fit int32.
    TensorView huge{s.ids.buf.data(), DType::I32, int64_t{1} << 27, 32, -1, Device::Cpu};
    expect_error([&] { run(huge, s.E, p); }, "make_permutation", "topk_idx");
  }
}

TEST(PermuteBadInput, PermuteFp8AndMx) {
  Fixture s;
  const PermutationPlan p = s.plan.view();
  const int64_t tiles = s.H / 128;
  HostTensor x(DType::E4M3, s.T, s.H), xs(DType::F32, tiles, s.T);
  HostTensor y(DType::E4M3, s.R, s.H), ys(DType::F32, tiles, s.R);
  HostTensor w(DType::F32, s.T, s.k), prob(DType::F32, 1, s.R);
  const ScaledTensor in{x.v, xs.v}, out{y.v, ys.v};
  permute(in, out, p, {w.v, prob.v});  // the good call works

  ScaledTensor bad = in;
  bad.layout = ScaleLayout::Block128x128;
  expect_error([&] { permute(bad, out, p); }, "permute", "in.layout");
  bad = in;
  bad.data.dtype = DType::BF16;
  expect_error([&] { permute(bad, out, p); }, "permute", "in.data");
  HostTensor y5(DType::E5M2, s.R, s.H);
  expect_error([&] { permute(in, ScaledTensor{y5.v, ys.v}, p); }, "permute", "out.data");
  bad = in;
  bad.data.rows = s.T - 1;
  bad.scale.cols = s.T - 1;
  expect_error([&] { permute(bad, out, p); }, "permute", "in.data");
  bad = in;
  bad.scale.rows = tiles + 1;
  expect_error([&] { permute(bad, out, p); }, "permute", "in.scale");
  ScaledTensor bo = out;
  bo.scale.cols = s.R - 1;
  expect_error([&] { permute(in, bo, p); }, "permute", "out.scale");
  bo = out;
  bo.data.cols = s.H - 16;
  expect_error([&] { permute(in, bo, p); }, "permute", "out.data");
  {  // H % 16 for FP8
    HostTensor x8(DType::E4M3, s.T, 120), xs8(DType::F32, 1, s.T), y8(DType::E4M3, s.R, 120),
        ys8(DType::F32, 1, s.R);
    expect_error(
        [&] {
          permute(ScaledTensor{x8.v, xs8.v}, ScaledTensor{y8.v, ys8.v}, p);
        },
        "permute", "in.data");
  }
  {  // more rows than src_slot
    HostTensor yb(DType::E4M3, s.R + 1, s.H), ysb(DType::F32, tiles, s.R + 1);
    expect_error([&] { permute(in, ScaledTensor{yb.v, ysb.v}, p); }, "permute", "plan.src_slot");
  }
  {  // col_groups
    const int64_t groups[] = {s.H};
    ScaledTensor g = in;
    g.col_groups = groups;
    expect_error([&] { permute(g, out, p); }, "permute", "in.col_groups");
  }
  // Probabilities: both or neither, right shapes.
  expect_error([&] { permute(in, out, p, {w.v, {}}); }, "permute", "probs.prob");
  expect_error([&] { permute(in, out, p, {{}, prob.v}); }, "permute", "probs.topk_weight");
  {
    TensorView pr = prob.v;
    pr.cols = s.R - 1;
    expect_error([&] { permute(in, out, p, {w.v, pr}); }, "permute", "probs.prob");
    TensorView wb = w.v;
    wb.dtype = DType::BF16;
    expect_error([&] { permute(in, out, p, {wb, prob.v}); }, "permute", "probs.topk_weight");
  }
  {  // plan with bad k
    PermutationPlan q = p;
    q.dest_row.cols = 0;
    expect_error([&] { permute(in, out, q); }, "permute", "plan.dest_row");
    q = p;
    q.dest_row.dtype = DType::I64;
    expect_error([&] { permute(in, out, q); }, "permute", "plan.dest_row");
  }
  {  // MXFP4: H % 32, scale shape, dtype
    HostTensor mx(DType::E2M1x2, s.T, s.H), ms(DType::E8M0, s.T, s.H / 32);
    HostTensor my(DType::E2M1x2, s.R, s.H), mys(DType::E8M0, s.R, s.H / 32);
    const ScaledTensor mi{mx.v, ms.v, ScaleLayout::Mx1x32}, mo{my.v, mys.v, ScaleLayout::Mx1x32};
    permute(mi, mo, p);
    ScaledTensor b2 = mo;
    b2.scale.cols = s.H / 32 - 1;
    expect_error([&] { permute(mi, b2, p); }, "permute", "out.scale");
    b2 = mo;
    b2.scale.dtype = DType::F32;
    expect_error([&] { permute(mi, b2, p); }, "permute", "out.scale");
    b2 = mo;
    b2.layout = ScaleLayout::Rowwise1x128;
    expect_error([&] { permute(mi, b2, p); }, "permute", "out.layout");
    HostTensor m48(DType::E2M1x2, s.T, 48), ms48(DType::E8M0, s.T, 1);
    expect_error(
        [&] {
          permute(ScaledTensor{m48.v, ms48.v, ScaleLayout::Mx1x32}, mo, p);
        },
        "permute", "in.data");
  }
}

TEST(PermuteBadInput, PermuteBf16) {
  Fixture s;
  const PermutationPlan p = s.plan.view();
  HostTensor x(DType::BF16, s.T, s.H), y(DType::BF16, s.R, s.H), yf(DType::F32, s.R, s.H);
  permute(x.v, y.v, p);
  expect_error([&] { permute(x.v, yf.v, p); }, "permute", "out");
  HostTensor x8(DType::E4M3, s.T, s.H);
  expect_error([&] { permute(x8.v, y.v, p); }, "permute", "in");
  HostTensor x12(DType::BF16, s.T, 12), y12(DType::BF16, s.R, 12);
  expect_error([&] { permute(x12.v, y12.v, p); }, "permute", "in");
  HostTensor xt(DType::BF16, s.T + 1, s.H);
  expect_error([&] { permute(xt.v, y.v, p); }, "permute", "in");
  TensorView xnull = x.v;
  xnull.data = nullptr;
  expect_error([&] { permute(xnull, y.v, p); }, "permute", "in");
  TensorView cuda_out = y.v;
  cuda_out.device = Device::Cuda;
  expect_error([&] { permute(x.v, cuda_out, p); }, "permute", "out");
}

TEST(PermuteBadInput, UnpermuteAndBackward) {
  Fixture s;
  const PermutationPlan p = s.plan.view();
  const int64_t R = s.plan.m_pad(s.E);
  HostTensor y(DType::BF16, R, s.H), out(DType::BF16, s.T, s.H), w(DType::F32, s.T, s.k);
  unpermute(y.v, out.v, p);
  HostTensor y8(DType::E4M3, R, s.H);
  expect_error([&] { unpermute(y8.v, out.v, p); }, "unpermute", "y");
  HostTensor y12(DType::BF16, R, 12), o12(DType::BF16, s.T, 12);
  expect_error([&] { unpermute(y12.v, o12.v, p); }, "unpermute", "y");
  HostTensor o_bad(DType::BF16, s.T + 1, s.H);
  expect_error([&] { unpermute(y.v, o_bad.v, p); }, "unpermute", "out");
  HostTensor o_e(DType::E4M3, s.T, s.H);
  expect_error([&] { unpermute(y.v, o_e.v, p); }, "unpermute", "out");
  HostTensor w_bad(DType::F32, s.T, s.k + 1);
  expect_error([&] { unpermute_weighted(y.v, w_bad.v, out.v, p); }, "unpermute_weighted",
               "topk_weight");
  TensorView out_cuda = out.v;
  out_cuda.device = Device::Cuda;
  expect_error([&] { unpermute(y.v, out_cuda, p); }, "unpermute", "out");

  HostTensor dprob(DType::F32, 1, R), dw(DType::F32, s.T, s.k);
  permute_probs_backward(dprob.v, p, dw.v);
  HostTensor dw_bad(DType::F32, s.T, s.k + 1);
  expect_error([&] { permute_probs_backward(dprob.v, p, dw_bad.v); }, "permute_probs_backward",
               "dweight");
  HostTensor dprob_bf(DType::BF16, 1, R);
  expect_error([&] { permute_probs_backward(dprob_bf.v, p, dw.v); }, "permute_probs_backward",
               "dprob");

  HostTensor dout(DType::BF16, s.T, s.H), dy(DType::BF16, R, s.H);
  unpermute_weighted_backward(dout.v, y.v, w.v, p, dy.v, dw.v);
  HostTensor dy_f(DType::F32, R, s.H);
  expect_error([&] { unpermute_weighted_backward(dout.v, y.v, w.v, p, dy_f.v, dw.v); },
               "unpermute_weighted_backward", "dy");
  expect_error([&] { unpermute_weighted_backward(dout.v, y.v, w.v, p, dy.v, dw_bad.v); },
               "unpermute_weighted_backward", "dweight");
  HostTensor y_h(DType::BF16, R, s.H + 8);
  expect_error([&] { unpermute_weighted_backward(dout.v, y_h.v, w.v, p, dy.v, dw.v); },
               "unpermute_weighted_backward", "y");
  HostTensor dout_t(DType::BF16, s.T - 1, s.H);
  expect_error([&] { unpermute_weighted_backward(dout_t.v, y.v, w.v, p, dy.v, dw.v); },
               "unpermute_weighted_backward", "dout");
}

// A CPU-only build (or no GPU) given Cuda tensors raises Unsupported instead of falling back.
TEST(PermuteBadInput, CudaTensorsWithoutCudaBackend) {
  if (cuda_available()) GTEST_SKIP() << "a CUDA device is visible: covered by PermuteGpu.*";
  Fixture s;
  PermutationPlan p = s.plan.view();
  TensorView ids = s.ids.v;
  ids.device = Device::Cuda;
  for (TensorView* t : {&p.tokens_per_expert, &p.offsets, &p.dest_row, &p.src_slot, &p.invalid})
    t->device = Device::Cuda;
  expect_error([&] { make_permutation(ids, s.E, p, nullptr, 0); }, "make_permutation", "device",
               ErrorKind::Unsupported);
}

}  // namespace
}  // namespace fp8flow::test
