// What every GPU test file needs: skipping on a machine without a GPU, and a stream per test.
#pragma once

#include <gtest/gtest.h>

#include "gpu/gpu_check.h"
#include "moekit/backend.h"

#define SKIP_WITHOUT_GPU()                                    \
  do {                                                        \
    if (!::moekit::backend_available(::moekit::Backend::gpu)) \
      GTEST_SKIP() << "no GPU on this machine";               \
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

}  // namespace moekit::gpu_test
