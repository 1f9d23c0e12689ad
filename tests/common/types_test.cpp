// Public types and host-side checks: scale shapes per layout, group tiling, and the error messages
// (op, argument, expected, got) every op relies on.
#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "common/check.h"
#include "common/groups.h"
#include "fp8flow/types.h"
#include "fp8flow/version.h"

namespace fp8flow {
namespace {

TEST(Types, ScaleShapes) {
  auto s = scale_shape(ScaleLayout::Rowwise1x128, 300, 7168);
  EXPECT_EQ(s.rows, 56);
  EXPECT_EQ(s.cols, 300);
  s = scale_shape(ScaleLayout::Rowwise1x128, 300, 7170);
  EXPECT_EQ(s.rows, 57);
  s = scale_shape(ScaleLayout::Block128x128, 4096, 7168);
  EXPECT_EQ(s.rows, 32);
  EXPECT_EQ(s.cols, 56);
  s = scale_shape(ScaleLayout::Mx1x32, 10, 7168);
  EXPECT_EQ(s.rows, 10);
  EXPECT_EQ(s.cols, 224);
  const std::vector<int64_t> groups{0, 128, 5, 300, 0, 77};
  EXPECT_EQ(rowwise_tiles(510, groups), 0 + 1 + 1 + 3 + 0 + 1);
  s = scale_shape(ScaleLayout::Rowwise1x128, 64, 510, groups);
  EXPECT_EQ(s.rows, 6);
  EXPECT_EQ(s.cols, 64);
}

TEST(Types, GroupTilesNeverSpanGroups) {
  const std::vector<int64_t> groups{0, 128, 5, 300, 0, 77, 0};
  const detail::GroupTiles g = detail::make_group_tiles(groups, 510);
  EXPECT_EQ(g.total_tiles, 6);
  const int32_t want_c0[6] = {0, 128, 133, 261, 389, 433};
  const int32_t want_w[6] = {128, 5, 128, 128, 44, 77};
  for (int32_t t = 0; t < g.total_tiles; ++t) {
    int32_t c0, w;
    g.tile_cols(t, c0, w);
    EXPECT_EQ(c0, want_c0[t]) << t;
    EXPECT_EQ(w, want_w[t]) << t;
  }
  const detail::GroupTiles one = detail::make_group_tiles({}, 300);
  EXPECT_EQ(one.total_tiles, 3);
  int32_t c0, w;
  one.tile_cols(2, c0, w);
  EXPECT_EQ(c0, 256);
  EXPECT_EQ(w, 44);
  // The persistent kernels' walking lookup equals tile_cols along every nondecreasing visit
  // order with strides 1..7 from every start (empty groups skipped; first call a binary search).
  for (int stride = 1; stride <= 7; ++stride)
    for (int32_t start = 0; start < g.total_tiles; ++start) {
      int cursor = -1;
      for (int32_t t = start; t < g.total_tiles; t += stride) {
        int32_t wc0, ww;
        g.tile_cols_walk(t, cursor, wc0, ww);
        EXPECT_EQ(wc0, want_c0[t]) << "stride " << stride << " start " << start << " tile " << t;
        EXPECT_EQ(ww, want_w[t]) << "stride " << stride << " start " << start << " tile " << t;
      }
    }
  // ... and along visit orders that step back (ColumnTight's channel-block groups restart the
  // tiles): random tiles, each a walk from the previous one's cursor.
  std::mt19937 rng(3);
  int cursor = -1;
  for (int i = 0; i < 2000; ++i) {
    const int32_t t = static_cast<int32_t>(rng() % static_cast<uint32_t>(g.total_tiles));
    int32_t wc0, ww;
    g.tile_cols_walk(t, cursor, wc0, ww);
    EXPECT_EQ(wc0, want_c0[t]) << "random visit " << i << " tile " << t;
    EXPECT_EQ(ww, want_w[t]) << "random visit " << i << " tile " << t;
  }
}

// Runs f, expects fp8flow::Error of `kind` whose message contains every fragment.
template <typename F>
void expect_error(F f, ErrorKind kind, std::initializer_list<const char*> fragments) {
  try {
    f();
    ADD_FAILURE() << "no fp8flow::Error thrown";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), kind) << e.what();
    for (const char* frag : fragments)
      EXPECT_NE(std::string(e.what()).find(frag), std::string::npos)
          << "message '" << e.what() << "' lacks '" << frag << "'";
  }
}

TEST(Types, CheckMessagesNameOpArgumentExpectedAndGot) {
  const detail::Check c("someop");
  float buf[16];
  TensorView t{buf, DType::BF16, 2, 8};
  expect_error([&] { c.view(t, "in", {DType::F32}); }, ErrorKind::InvalidArgument,
               {"fp8flow::someop", "in", "expected dtype F32", "got BF16"});
  TensorView null_view{nullptr, DType::F32, 2, 8};
  expect_error([&] { c.view(null_view, "x"); }, ErrorKind::InvalidArgument, {"x", "nullptr"});
  TensorView empty{nullptr, DType::F32, 0, 8};
  EXPECT_NO_THROW(c.view(empty, "x"));
  TensorView neg{buf, DType::F32, -1, 8};
  expect_error([&] { c.view(neg, "x"); }, ErrorKind::InvalidArgument, {"non-negative"});
  TensorView huge{buf, DType::F32, int64_t{1} << 32, 8};
  expect_error([&] { c.view(huge, "x"); }, ErrorKind::InvalidArgument, {"each dim"});
  TensorView bad_ld{buf, DType::F32, 2, 8, 4};
  expect_error([&] { c.view(bad_ld, "x"); }, ErrorKind::InvalidArgument, {"ld >= cols"});
  TensorView odd_fp4{buf, DType::E2M1x2, 2, 7};
  expect_error([&] { c.view(odd_fp4, "x"); }, ErrorKind::InvalidArgument, {"even cols"});
  TensorView mis{reinterpret_cast<char*>(buf) + 1, DType::E4M3, 1, 16};
  expect_error([&] { c.aligned(mis, "out", 16); }, ErrorKind::InvalidArgument,
               {"out", "aligned to 16"});
  const std::vector<int64_t> groups{3, -1};
  expect_error([&] { c.groups(groups, "col_groups", 2); }, ErrorKind::InvalidArgument,
               {"col_groups[1]", "non-negative"});
  const std::vector<int64_t> groups2{3, 4};
  expect_error([&] { c.groups(groups2, "col_groups", 8); }, ErrorKind::InvalidArgument,
               {"summing to 8", "sum 7"});
}

// cat() is exactly the ostringstream of its arguments, on its fast path (text and integers of
// every width and sign, including the extremes) and its stream fallbacks (floats, bool, char,
// uint8_t, manipulators, messages past the fast buffer).
template <typename... A>
std::string streamed(const A&... a) {
  std::ostringstream os;
  (os << ... << a);
  return os.str();
}

TEST(Types, CatEqualsTheStream) {
  using detail::cat;
  const std::string str = "a string";
  const std::string_view sv = "a view";
  EXPECT_EQ(cat("x", str, sv, 'c'), streamed("x", str, sv, 'c'));
  EXPECT_EQ(cat(int8_t{-5}, uint8_t{200}, int16_t{-32768}, uint16_t{65535}),
            streamed(int8_t{-5}, uint8_t{200}, int16_t{-32768}, uint16_t{65535}));
  EXPECT_EQ(
      cat(INT32_MIN, INT32_MAX, UINT32_MAX, INT64_MIN, INT64_MAX, UINT64_MAX, size_t{0}),
      streamed(INT32_MIN, INT32_MAX, UINT32_MAX, INT64_MIN, INT64_MAX, UINT64_MAX, size_t{0}));
  EXPECT_EQ(cat("x", 1.5, " ", 1e-30f, true), streamed("x", 1.5, " ", 1e-30f, true));
  EXPECT_EQ(cat("address 0x", std::hex, 255), "address 0xff");
  EXPECT_EQ(cat("[", -1, ", ", 7168, "]"), "[-1, 7168]");
  const std::string long_text(300, 'q');
  EXPECT_EQ(cat(long_text, 12), long_text + "12");  // past the 256-byte buffer: the stream
  EXPECT_EQ(cat(std::string(250, 'a'), INT64_MIN), std::string(250, 'a') + "-9223372036854775808");
  EXPECT_EQ(cat(), "");
}

TEST(Types, ScaledTensorChecks) {
  const detail::Check c("op");
  uint8_t q[256];
  float s[4];
  ScaledTensor t{{q, DType::E4M3, 2, 128}, {s, DType::F32, 1, 2}, ScaleLayout::Rowwise1x128};
  EXPECT_NO_THROW(c.scaled(t, "x", ScaleLayout::Rowwise1x128, {DType::E4M3}));
  t.scale.cols = 3;
  expect_error([&] { c.scaled(t, "x", ScaleLayout::Rowwise1x128, {DType::E4M3}); },
               ErrorKind::InvalidArgument, {"x.scale", "shape [1, 2]", "[1, 3]"});
  t.scale.cols = 2;
  t.scale.dtype = DType::E8M0;
  expect_error([&] { c.scaled(t, "x", ScaleLayout::Rowwise1x128, {DType::E4M3}); },
               ErrorKind::InvalidArgument, {"x.scale", "F32"});
  t.scale.dtype = DType::F32;
  expect_error([&] { c.scaled(t, "x", ScaleLayout::Block128x128, {DType::E4M3}); },
               ErrorKind::InvalidArgument, {"x.layout", "Block128x128"});
  t.scale.device = Device::Cuda;
  expect_error([&] { c.scaled(t, "x", ScaleLayout::Rowwise1x128, {DType::E4M3}); },
               ErrorKind::InvalidArgument, {"x.scale", "Cuda"});
}

TEST(Types, CudaAvailabilityIsReported) {
  // Not an assertion on the machine: it documents what the GPU tests will do here.
  std::printf("cuda_available() = %d (%s)\n", int(cuda_available()), version_string());
  SUCCEED();
}

}  // namespace
}  // namespace fp8flow
