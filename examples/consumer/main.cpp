// Smallest use of the public API: quantize a BF16 matrix row-wise on the CPU reference backend
// and check one scale. Built against an installed fp8flow by .ci/run.
#include <cstdio>
#include <vector>

#include "fp8flow/fp8flow.h"

int main() {
  using namespace fp8flow;
  const int64_t M = 4, K = 256;
  std::vector<uint16_t> x(M * K);
  for (int64_t i = 0; i < M * K; ++i) x[i] = fmt::bf16_from_f32(float(i % 97) - 48.f);
  std::vector<uint8_t> q(M * K);
  std::vector<float> s(2 * M);
  const TensorView in{x.data(), DType::BF16, M, K};
  const ScaledTensor out{
      {q.data(), DType::E4M3, M, K}, {s.data(), DType::F32, 2, M}, ScaleLayout::Rowwise1x128};
  quantize(in, out);
  std::printf("fp8flow %s: scale[0][0] = %g (expect 0.125)\n", version_string(), s[0]);
  return s[0] == 0.125f ? 0 : 1;
}
