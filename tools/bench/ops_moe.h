// fp8flow-bench ops: the expert-compute rows (SwiGLU, permute, router, grouped GEMMs), defined in
// ops_moe.cpp and run by `ops` after its transpose/quantize/MXFP4 cases, into the same report.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "harness.h"

namespace fp8flow::bench {

struct MoeEnv {
  bool gpu = false;    // time on the GPU (else: CPU reference on small shapes)
  bool quick = false;  // --quick: small shapes
  bool verify = true;  // verify against the CPU reference first (GPU runs only)
  int reps = 0, warmup = 0;
  int64_t l2_bytes = 0;
  double copy_gbps = 0;  // device-to-device copy bandwidth (read + write) of this run
  int gemm_algos = 0;    // --gemm-algos N: FP8 GEMM rows also for GroupedGemmOptions::algo 1..N-1
};

// Labels ("name shape") of the expert-compute cases whose label contains `only` (all if empty).
std::vector<std::string> moe_case_labels(const MoeEnv& env, const std::string& only);

// Verifies and times those cases, one report row each (same columns as the other ops rows, plus
// "tflops" and "pct_dense" for the GEMMs). Failures go to `problems`.
void run_moe_cases(const MoeEnv& env, const std::string& only, Report& rep,
                   std::vector<std::string>& problems);

}  // namespace fp8flow::bench
