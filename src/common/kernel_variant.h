// Which kernel variant an op launches, for A/B timing of kernel versions in one binary (host code).
// The environment chooses once (the op's own parser of its variables), a test hook can override
// it for later calls (set(v), v >= 0) and set(-1) returns to the environment's choice. All
// variants of an op give the same bits; the switch only picks the code path. Not synchronized
// with running ops: tests set it between calls.
#pragma once

#include <atomic>

namespace fp8flow::detail {

class KernelVariant {
 public:
  using FromEnv = int (*)();  // the environment's choice, >= 0; called once
  constexpr explicit KernelVariant(FromEnv from_env) : from_env_(from_env) {}

  int get() {
    const int o = override_.load(std::memory_order_relaxed);
    if (o >= 0) return o;
    int e = env_.load(std::memory_order_relaxed);
    if (e < 0) {  // first use (a race computes the same value twice)
      e = from_env_();
      env_.store(e, std::memory_order_relaxed);
    }
    return e;
  }
  void set(int variant) { override_.store(variant < 0 ? -1 : variant, std::memory_order_relaxed); }

 private:
  FromEnv from_env_;
  std::atomic<int> override_{-1}, env_{-1};
};

}  // namespace fp8flow::detail
