// fp8flow-bench: the project's benchmark and verification tool.
//   fp8flow-bench ops [--json FILE] [--reps N] [--warmup N] [--only TEXT] [--quick] ...
//   fp8flow-bench layer [--config NAME] [--recipe NAME|all] [--routing balanced|skewed] ...
//   fp8flow-bench layer --ep N ...   (or: mpirun -np N fp8flow-bench layer)  expert parallel
//   fp8flow-bench comm [--gpus N] [--quick] ...   (or: mpirun -np N fp8flow-bench comm)
// Each subcommand lives in its own file and registers itself (cli.h); this file only parses the
// common options and dispatches.
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>

#include "cli.h"
#include "fp8flow/version.h"

namespace fp8flow::bench {

std::vector<Subcommand>& subcommands() {
  static std::vector<Subcommand> list;
  return list;
}

namespace {

void usage(FILE* f) {
  std::fprintf(f,
               "usage: fp8flow-bench SUBCOMMAND [options]\n"
               "\n"
               "subcommands:\n");
  for (const auto& s : subcommands()) std::fprintf(f, "  %-8s %s\n", s.name, s.summary);
  std::fprintf(
      f,
      "\n"
      "options:\n"
      "  --json FILE        also write the result rows as JSON to FILE\n"
      "  --reps N           timed repetitions per case (default 50; median and min)\n"
      "  --warmup N         untimed launches before timing (default 10)\n"
      "  --only TEXT        only the cases whose label contains TEXT (e.g. transpose,\n"
      "                     7168, tile_max); --list shows the labels\n"
      "  --quick            small shapes (a smoke test; no published comparison)\n"
      "  --no-verify        skip the bit-exact GPU vs CPU reference check\n"
      "  --verify-rows N    rows of the verification shape (default 2048; same K)\n"
      "  --list             print the case labels and exit\n"
      "  --gemm-algos N     ops: the FP8 grouped GEMM rows (balanced split) also with\n"
      "                     cuBLASLt heuristic result 1..N-1 (GroupedGemmOptions::algo),\n"
      "                     each checked against algo 0 at the timed shape\n"
      "  --config NAME      layer: dsv3-shard (default), dsv2-lite or small\n"
      "  --recipe NAME|all  layer: bf16, fp8-blockwise, fp8-flow, fp8-flow-mxfp4 or all (default)\n"
      "  --routing R        layer: balanced (default) or skewed (a few experts biased hot)\n"
      "  --ep N             layer: expert parallel over N GPUs, one thread each (NCCL); each\n"
      "                     rank keeps the config's T tokens and E local experts (E*N global;\n"
      "                     weak scaling); times are the slowest rank's. Under mpirun the\n"
      "                     ranks are mpirun's (mpirun -np N fp8flow-bench layer). Without a\n"
      "                     GPU: N simulated ranks on the CPU (tiny shape). --ep 1: one GPU\n"
      "  --ep-record        layer with EP: dispatch one record per routed pair instead of\n"
      "                     one per (token, rank) expanded on the expert side (the default,\n"
      "                     MoEConfig::ep_dedup, --ep-dedup; same results)\n"
      "  --align N          layer: expert segment alignment in rows (MoEConfig::align, a\n"
      "                     power of two in [16, 128]; default: 32 for the FP8 recipes, 16\n"
      "                     for bf16)\n"
      "  --gemm-streams N   layer: internal streams of the per-expert GEMMs\n"
      "                     (MoEConfig::gemm_streams, 1..8; default 4)\n"
      "  --no-overlap-wgrad layer: backward on one stream (MoEConfig::overlap_wgrad off; by\n"
      "                     default the wgrads run on a second stream; same results)\n"
      "  --gpus N           comm: N ranks, one thread per GPU (default: all visible GPUs);\n"
      "                     under mpirun one process per GPU instead (mpirun -np N ...)\n"
      "  -h, --help         this help\n"
      "\n"
      "layer defaults: --reps 10 --warmup 3 (full steps). comm defaults: --reps 20 --warmup 5.\n"
      "Without a CUDA device (or in a CPU-only build) `ops` runs the CPU reference on small\n"
      "shapes, says so, and exits 0. With one, it exits nonzero on any mismatch or error.\n"
      "fp8flow %s\n",
      version_string());
}

bool parse_int(const char* s, int64_t& out) {
  char* end = nullptr;
  const long long v = std::strtoll(s, &end, 10);
  if (!s[0] || *end) return false;
  out = v;
  return true;
}

}  // namespace
}  // namespace fp8flow::bench

int main(int argc, char** argv) {
  using namespace fp8flow::bench;
  Options opt;
  bool help = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&](const char* name) -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "fp8flow-bench: %s needs a value\n", name);
        std::exit(2);
      }
      return argv[++i];
    };
    auto int_value = [&](const char* name, int64_t lo) -> int64_t {
      int64_t v = 0;
      const char* s = value(name);
      if (!parse_int(s, v) || v < lo) {
        std::fprintf(stderr, "fp8flow-bench: %s: expected an integer >= %lld, got '%s'\n", name,
                     static_cast<long long>(lo), s);
        std::exit(2);
      }
      return v;
    };
    if (a == "-h" || a == "--help")
      help = true;
    else if (a == "--json")
      opt.json_path = value("--json");
    else if (a == "--reps") {
      opt.reps = static_cast<int>(int_value("--reps", 1));
      opt.reps_given = true;
    } else if (a == "--warmup") {
      opt.warmup = static_cast<int>(int_value("--warmup", 0));
      opt.warmup_given = true;
    } else if (a == "--config")
      opt.config = value("--config");
    else if (a == "--recipe")
      opt.recipe = value("--recipe");
    else if (a == "--routing")
      opt.routing = value("--routing");
    else if (a == "--gpus")
      opt.gpus = static_cast<int>(int_value("--gpus", 1));
    else if (a == "--ep")
      opt.ep = static_cast<int>(int_value("--ep", 1));
    else if (a == "--ep-dedup")
      opt.ep_dedup = true;
    else if (a == "--ep-record")
      opt.ep_dedup = false;
    else if (a == "--no-overlap-wgrad")
      opt.overlap_wgrad = false;
    else if (a == "--align")
      opt.align = static_cast<int>(int_value("--align", 16));
    else if (a == "--gemm-streams")
      opt.gemm_streams = static_cast<int>(int_value("--gemm-streams", 1));
    else if (a == "--gemm-algos")
      opt.gemm_algos = static_cast<int>(int_value("--gemm-algos", 1));
    else if (a == "--only")
      opt.only = value("--only");
    else if (a == "--quick")
      opt.quick = true;
    else if (a == "--no-verify")
      opt.verify = false;
    else if (a == "--verify-rows")
      opt.verify_rows = int_value("--verify-rows", 1);
    else if (a == "--list")
      opt.list = true;
    else if (a == "--") {
      for (++i; i < argc; ++i) opt.extra.push_back(argv[i]);
    } else if (!a.empty() && a[0] == '-') {
      std::fprintf(stderr, "fp8flow-bench: unknown option '%s' (see --help)\n", a.c_str());
      return 2;
    } else if (opt.subcommand.empty()) {
      opt.subcommand = a;
    } else {
      std::fprintf(stderr, "fp8flow-bench: unexpected argument '%s'\n", a.c_str());
      return 2;
    }
  }
  if (help) {
    usage(stdout);
    return 0;
  }
  if (opt.subcommand.empty()) {
    usage(stderr);
    return 2;
  }
  for (const auto& s : subcommands())
    if (opt.subcommand == s.name) {
      try {
        return s.run(opt);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "fp8flow-bench %s: %s\n", s.name, e.what());
        return 1;
      }
    }
  std::fprintf(stderr, "fp8flow-bench: unknown subcommand '%s' (see --help)\n",
               opt.subcommand.c_str());
  return 2;
}
