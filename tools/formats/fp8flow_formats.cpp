// fp8flow-formats: dumps fp8flow's number-format encoders (include/fp8flow/formats.h) for a list of
// float32 values, so that scripts/check_formats_torch.py can compare them bit for bit with PyTorch
// and ml_dtypes.
//
// Usage: fp8flow-formats IN.f32 OUT.bin
//   IN.f32   raw little-endian IEEE float32 values (file size a multiple of 4; may be empty).
//
// OUT.bin (all integers and floats little-endian; sections follow each other with no padding):
//   offset 0   8 bytes   magic "FP8FLOWF"
//   offset 8   uint32    format version = 1
//   offset 12  uint32    header size in bytes = 32 (sections start here)
//   offset 16  uint64    n = number of input values
//   offset 24  uint64    reserved, 0
//   then, for value i = 0 .. n-1 of the input, in this order:
//     e4m3    n x uint8   fmt::e4m3_from_f32(x[i])
//     e5m2    n x uint8   fmt::e5m2_from_f32(x[i])
//     e2m1    n x uint8   fmt::e2m1_from_f32(x[i]) (code in bits 0-3; bits 4-7 zero)
//     e8m0    n x uint8   fmt::e8m0_from_f32(x[i])
//     bf16    n x uint16  fmt::bf16_from_f32(x[i])
//     e2m1x2  ceil(n/2) x uint8: byte j = fmt::pack_e2m1x2(e2m1[2j], e2m1[2j+1]), the element
//             with the lower index in bits 0-3 (e2m1[n] taken as 0 when n is odd)
//   then the decode tables, float32:
//     dec_e4m3  256 x float32   fmt::e4m3_to_f32(code), code = 0 .. 255
//     dec_e5m2  256 x float32   fmt::e5m2_to_f32(code)
//     dec_e2m1   16 x float32   fmt::e2m1_to_f32(code), code = 0 .. 15
//     dec_e8m0  256 x float32   fmt::e8m0_to_f32(code)
//   Total size: 32 + 6n + ceil(n/2) + 4 * (256 + 256 + 16 + 256) bytes.
#include <bit>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <vector>

#include "fp8flow/formats.h"

static_assert(std::endian::native == std::endian::little, "fp8flow-formats assumes little-endian");

namespace {

namespace fmt = fp8flow::fmt;

template <typename T>
void put(std::vector<uint8_t>& out, const T& v) {
  const auto* p = reinterpret_cast<const uint8_t*>(&v);
  out.insert(out.end(), p, p + sizeof(T));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3 || !std::strcmp(argv[1], "-h") || !std::strcmp(argv[1], "--help")) {
    std::fprintf(
        argc == 3 ? stdout : stderr,
        "usage: fp8flow-formats IN.f32 OUT.bin\n"
        "  Encodes each little-endian float32 of IN.f32 as E4M3, E5M2, E2M1, E8M0, BF16 and\n"
        "  packed E2M1x2 with fp8flow's format math, plus decode tables; the layout is\n"
        "  documented at the top of tools/formats/fp8flow_formats.cpp.\n");
    return argc == 3 ? 0 : 2;
  }
  std::ifstream in(argv[1], std::ios::binary);
  if (!in) {
    std::fprintf(stderr, "fp8flow-formats: cannot read %s\n", argv[1]);
    return 1;
  }
  const std::vector<char> raw((std::istreambuf_iterator<char>(in)),
                              std::istreambuf_iterator<char>());
  if (raw.size() % 4) {
    std::fprintf(stderr, "fp8flow-formats: %s: size %zu is not a multiple of 4\n", argv[1],
                 raw.size());
    return 1;
  }
  const size_t n = raw.size() / 4;
  std::vector<float> x(n);
  if (n) std::memcpy(x.data(), raw.data(), raw.size());

  std::vector<uint8_t> e4m3(n), e5m2(n), e2m1(n + 1, 0), e8m0(n);
  std::vector<uint16_t> bf16(n);
  for (size_t i = 0; i < n; ++i) {
    e4m3[i] = fmt::e4m3_from_f32(x[i]);
    e5m2[i] = fmt::e5m2_from_f32(x[i]);
    e2m1[i] = fmt::e2m1_from_f32(x[i]);
    e8m0[i] = fmt::e8m0_from_f32(x[i]);
    bf16[i] = fmt::bf16_from_f32(x[i]);
  }

  std::vector<uint8_t> out;
  out.reserve(32 + 7 * n + 4096);
  out.insert(out.end(), {'F', 'P', '8', 'F', 'L', 'O', 'W', 'F'});
  put(out, uint32_t{1});
  put(out, uint32_t{32});
  put(out, static_cast<uint64_t>(n));
  put(out, uint64_t{0});
  out.insert(out.end(), e4m3.begin(), e4m3.end());
  out.insert(out.end(), e5m2.begin(), e5m2.end());
  out.insert(out.end(), e2m1.begin(), e2m1.begin() + static_cast<std::ptrdiff_t>(n));
  out.insert(out.end(), e8m0.begin(), e8m0.end());
  for (const uint16_t h : bf16) put(out, h);
  for (size_t j = 0; j < (n + 1) / 2; ++j)
    out.push_back(fmt::pack_e2m1x2(e2m1[2 * j], e2m1[2 * j + 1]));
  for (int c = 0; c < 256; ++c) put(out, fmt::e4m3_to_f32(static_cast<uint8_t>(c)));
  for (int c = 0; c < 256; ++c) put(out, fmt::e5m2_to_f32(static_cast<uint8_t>(c)));
  for (int c = 0; c < 16; ++c) put(out, fmt::e2m1_to_f32(static_cast<uint8_t>(c)));
  for (int c = 0; c < 256; ++c) put(out, fmt::e8m0_to_f32(static_cast<uint8_t>(c)));

  std::ofstream f(argv[2], std::ios::binary);
  f.write(reinterpret_cast<const char*>(out.data()), static_cast<std::streamsize>(out.size()));
  if (!f) {
    std::fprintf(stderr, "fp8flow-formats: cannot write %s\n", argv[2]);
    return 1;
  }
  return 0;
}
