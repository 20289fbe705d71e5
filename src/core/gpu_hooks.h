// The few GPU runtime services the core needs (allocation, copies, device queries), filled in by
// the GPU backend when it is built. Keeps src/core free of vendor headers.
#pragma once

#include <cstddef>
#include <string>

namespace moekit {

struct GpuHooks {
  void* (*malloc)(size_t bytes, int device) = nullptr;
  void (*free)(void* ptr) = nullptr;
  // Synchronous copy; the flags say which side is device memory.
  void (*memcpy)(void* dst, bool dst_on_gpu, const void* src, bool src_on_gpu,
                 size_t bytes) = nullptr;
  int (*device_count)() = nullptr;
  std::string (*describe)(int device) = nullptr;  // "NVIDIA H100 80GB HBM3, sm_90, 132 SMs"
};

// The table for this build: all null when the GPU backend is not compiled in.
const GpuHooks& gpu_hooks();

}  // namespace moekit
