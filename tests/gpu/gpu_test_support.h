// What every GPU test file needs: skipping on a machine without a GPU, a stream per test, and a
// printed seed for random tests.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <random>
#include <string>

#include "gpu/gpu_check.h"
#include "moekit/backend.h"

#define SKIP_WITHOUT_GPU()                                    \
  do {                                                        \
    if (!::moekit::backend_available(::moekit::Backend::gpu)) \
      GTEST_SKIP() << "no GPU on this machine";               \
  } while (0)

// Skips a test without a GPU, or where `present` (evaluated after the GPU check) says that the
// entry `name` under test does not serve on this one.
#define SKIP_WITHOUT_ENTRY(present, name)                             \
  do {                                                                \
    SKIP_WITHOUT_GPU();                                               \
    if (!(present)) GTEST_SKIP() << (name) << " does not serve here"; \
  } while (0)

namespace moekit::gpu_test {

// A non-blocking stream for one test.
class Stream {
 public:
  Stream() { MOEKIT_GPU_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking)); }
  ~Stream() { (void)cudaStreamDestroy(stream_); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  cudaStream_t get() const { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
};

// Sets an environment variable for one scope (restoring what was there before).
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const std::string& value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    setenv(name, value.c_str(), 1);
  }
  ~ScopedEnv() {
    if (old_)
      setenv(name_, old_->c_str(), 1);
    else
      unsetenv(name_);
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  const char* name_;
  std::optional<std::string> old_;
};

// A random seed for `test`, or MOEKIT_TEST_SEED's, printed so that a failure can be repeated.
inline uint64_t seed_for(const char* test) {
  uint64_t seed = std::random_device{}();
  if (const char* env = std::getenv("MOEKIT_TEST_SEED")) seed = std::strtoull(env, nullptr, 0);
  std::printf("%s: seed %llu (MOEKIT_TEST_SEED to repeat)\n", test,
              static_cast<unsigned long long>(seed));
  return seed;
}

}  // namespace moekit::gpu_test
