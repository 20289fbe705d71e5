// A kernel for the masked layout's tests: it writes the counts late, after letting the next kernel
// (the GEMM under test) start, so that the test shows the GEMM uses the counts written by the
// kernel before it and not what masked_m held when it started.
#pragma once

#include <cstdint>

#include "gpu/vendor.h"

namespace moekit::gpu_test {
namespace {

// Lets the next kernel start at once (programmatic dependent launch), spins for `cycles`, then
// writes counts[g] into masked_m[g].
__global__ void write_counts_late(int32_t* masked_m, const int32_t* counts, int groups,
                                  long long cycles) {
  gpu::vendor::allow_next_grid();
  const long long start = clock64();
  while (clock64() - start < cycles) {
  }
  for (int g = static_cast<int>(threadIdx.x); g < groups; g += static_cast<int>(blockDim.x))
    masked_m[g] = counts[g];
}

}  // namespace
}  // namespace moekit::gpu_test
