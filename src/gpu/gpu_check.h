// Vendor runtime errors as moekit::Error (op "gpu", argument = the call, value = the error's name),
// and a scope that runs on one device. For GPU sources only: it includes the vendor headers.
#pragma once

#include <string>

#include "gpu/vendor.h"
#include "moekit/error.h"

namespace moekit::gpu {

inline void check(cudaError_t status, const char* call) {
  if (status == cudaSuccess) return;
  fail("gpu", call, cudaGetErrorName(status), std::string("failed: ") + cudaGetErrorString(status));
}

// Runs a scope on `device`, restoring the caller's device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (device != previous_) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    int now = previous_;
    if (cudaGetDevice(&now) == cudaSuccess && now != previous_) (void)cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace moekit::gpu

// MOEKIT_GPU_CHECK(cudaMalloc(&p, n)) throws Error("gpu", "cudaMalloc(&p, n)",
// "cudaErrorMemory...").
#define MOEKIT_GPU_CHECK(call) ::moekit::gpu::check((call), #call)
