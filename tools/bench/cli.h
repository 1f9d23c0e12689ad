// fp8flow-bench command line: the options every subcommand understands, and the registry that
// makes a subcommand one file: define `int run_x(const Options&)` in x.cpp and register it with
// FP8FLOW_BENCH_SUBCOMMAND(x, "one-line summary", run_x). CMake globs tools/bench/*.cpp.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace fp8flow::bench {

struct Options {
  std::string subcommand;
  std::string json_path;       // --json FILE: also write the rows as JSON
  int reps = 50;               // --reps N: timed repetitions per case (median and min reported)
  int warmup = 10;             // --warmup N: untimed launches before timing
  std::string only;            // --only TEXT: run the cases whose label contains TEXT
  bool quick = false;          // --quick: small shapes (smoke test)
  bool verify = true;          // --no-verify: skip the GPU vs CPU reference comparison
  int64_t verify_rows = 2048;  // --verify-rows N: rows of the verification shape (same K)
  bool list = false;           // --list: print the case labels and exit
  bool reps_given = false;     // --reps / --warmup were on the command line (subcommands with
  bool warmup_given = false;   //   other defaults, e.g. layer: 10 / 3)
  std::string config;          // --config NAME (layer: dsv3-shard, dsv2-lite, small)
  std::string recipe;          // --recipe NAME|all (layer)
  std::string routing;         // --routing balanced|skewed (layer)
  int gpus = 0;                // --gpus N (comm: ranks, one thread per GPU; 0 = all visible)
  int ep = 0;                  // --ep N (layer: expert-parallel ranks; 0/1 = one GPU)
  bool ep_dedup = true;        // layer: MoEConfig::ep_dedup (--ep-record: false)
  bool overlap_wgrad = true;   // layer: MoEConfig::overlap_wgrad (--no-overlap-wgrad: false)
  int align = 0;               // layer: MoEConfig::align (--align N; 0: the config's default)
  int gemm_streams = 0;        // layer: MoEConfig::gemm_streams (--gemm-streams N; 0: its default)
  int gemm_algos = 0;          // --gemm-algos N (ops: FP8 GEMMs also with cuBLASLt algo 1..N-1)
  std::vector<std::string> extra;  // arguments left for the subcommand (after --)
};

using SubcommandFn = int (*)(const Options&);

struct Subcommand {
  const char* name;
  const char* summary;
  SubcommandFn run;
};

// Registered subcommands, in registration order.
std::vector<Subcommand>& subcommands();

struct SubcommandRegistrar {
  SubcommandRegistrar(const char* name, const char* summary, SubcommandFn fn) {
    subcommands().push_back({name, summary, fn});
  }
};

#define FP8FLOW_BENCH_SUBCOMMAND(name, summary, fn) \
  static const ::fp8flow::bench::SubcommandRegistrar fp8flow_bench_reg_##name(#name, summary, fn)

}  // namespace fp8flow::bench
