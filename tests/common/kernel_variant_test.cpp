// detail::KernelVariant: the environment's choice is read once, a set(v) overrides it for later
// calls and set(-1) (or any negative value) returns to it.
#include <gtest/gtest.h>

#include "common/kernel_variant.h"

namespace fp8flow::test {
namespace {

int g_env_calls = 0;
int env_three() {
  ++g_env_calls;
  return 3;
}

TEST(KernelVariant, EnvironmentOnceThenOverride) {
  detail::KernelVariant v(env_three);
  g_env_calls = 0;
  EXPECT_EQ(v.get(), 3);
  EXPECT_EQ(v.get(), 3);
  EXPECT_EQ(g_env_calls, 1);
  v.set(0);
  EXPECT_EQ(v.get(), 0);
  v.set(2);
  EXPECT_EQ(v.get(), 2);
  v.set(-1);
  EXPECT_EQ(v.get(), 3);
  v.set(-7);
  EXPECT_EQ(v.get(), 3);
  EXPECT_EQ(g_env_calls, 1);
}

}  // namespace
}  // namespace fp8flow::test
