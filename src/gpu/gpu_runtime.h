// The GPU runtime as seen from plain C++: hooks for the core, device queries, error checks.
#pragma once

#include <string>

#include "core/gpu_hooks.h"

namespace moekit::gpu {

GpuHooks make_hooks();  // the table that core/backend.cpp installs when the GPU backend is built

struct DeviceProperties {
  std::string name;
  int major = 0, minor = 0;  // compute capability
  int sm_count = 0;
  int warp_size = 32;
  size_t shared_memory_per_block_optin = 0;
};
DeviceProperties device_properties(int device);  // cached; throws Error

void synchronize(void* stream);  // for tests and the CLI, never called inside an op

}  // namespace moekit::gpu
