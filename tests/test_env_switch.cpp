// The environment-switch readers (src/core/env_switch.h): unset, recognized and unrecognized text.
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>

#include "core/env_switch.h"

namespace moekit {
namespace {

constexpr const char* kName = "MOEKIT_TEST_ENV_SWITCH";

// Sets (or, with nullptr, unsets) the test variable for one scope.
struct Scoped {
  explicit Scoped(const char* value) {
    if (value != nullptr)
      setenv(kName, value, 1);
    else
      unsetenv(kName);
  }
  ~Scoped() { unsetenv(kName); }
};

TEST(EnvSwitch, TextIsEmptyWhenUnset) {
  {
    Scoped unset(nullptr);
    EXPECT_EQ(env::text(kName), "");
  }
  Scoped set("grouped");
  EXPECT_EQ(env::text(kName), "grouped");
}

TEST(EnvSwitch, IsComparesTheWholeText) {
  {
    Scoped unset(nullptr);
    EXPECT_FALSE(env::is(kName, "1"));
  }
  Scoped set("10");
  EXPECT_FALSE(env::is(kName, "1"));
  EXPECT_TRUE(env::is(kName, "10"));
}

TEST(EnvSwitch, ChoiceIsMinusOneUnlessYesOrNo) {
  {
    Scoped unset(nullptr);
    EXPECT_EQ(env::choice(kName), -1);
  }
  {
    Scoped yes("1");
    EXPECT_EQ(env::choice(kName), 1);
  }
  {
    Scoped no("0");
    EXPECT_EQ(env::choice(kName), 0);
  }
  {
    Scoped other("yes");
    EXPECT_EQ(env::choice(kName), -1);
  }
  Scoped named("reduce");
  EXPECT_EQ(env::choice(kName, "vote", "reduce"), 0);
  EXPECT_EQ(env::choice(kName), -1);
}

TEST(EnvSwitch, IntegerFallsBackOnAnythingButAWholeNumber) {
  {
    Scoped unset(nullptr);
    EXPECT_EQ(env::integer(kName, 7), 7);
  }
  for (const char* bad : {"", "abc", "12abc", "1.5", "99999999999999999999"}) {
    Scoped set(bad);
    EXPECT_EQ(env::integer(kName, -1), -1) << "'" << bad << "'";
  }
  {
    Scoped set("16");
    EXPECT_EQ(env::integer(kName, 0), 16);
  }
  Scoped negative("-3");
  EXPECT_EQ(env::integer(kName, 0), -3);
}

}  // namespace
}  // namespace moekit
