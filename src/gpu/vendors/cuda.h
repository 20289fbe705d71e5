// NVIDIA CUDA: the dialect the GPU sources are written in, so this header only adds the warp
// helpers every vendor header provides (see vendor.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <cstring>
#include <utility>

#define MOEKIT_GPU_VENDOR_NAME "cuda"
// Matrix units through the wmma API: every architecture this project builds (sm_70 and later).
#define MOEKIT_GPU_HAS_WMMA 1

namespace moekit::gpu::vendor {

// Hardware warp width. Kernels work on 32-lane logical warps (kLanes in vendor.h).
inline constexpr int kWarpSize = 32;

__device__ __forceinline__ int lane_id() { return static_cast<int>(threadIdx.x) & 31; }
__device__ __forceinline__ void sync_lanes() { __syncwarp(); }

template <class T>
__device__ __forceinline__ T shfl(T value, int src_lane) {
  return __shfl_sync(0xffffffffu, value, src_lane);
}
template <class T>
__device__ __forceinline__ T shfl_xor(T value, int lane_mask) {
  return __shfl_xor_sync(0xffffffffu, value, lane_mask);
}
__device__ __forceinline__ uint32_t ballot(bool predicate) {
  return __ballot_sync(0xffffffffu, predicate);
}
__device__ __forceinline__ bool any(bool predicate) { return __any_sync(0xffffffffu, predicate); }

// Warp-wide max / min of an unsigned value: one instruction (redux.sync) from sm_80 on.
__device__ __forceinline__ uint32_t reduce_max(uint32_t value) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return __reduce_max_sync(0xffffffffu, value);
#else
  for (int mask = 16; mask > 0; mask >>= 1) value = max(value, shfl_xor(value, mask));
  return value;
#endif
}
__device__ __forceinline__ uint32_t reduce_min(uint32_t value) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return __reduce_min_sync(0xffffffffu, value);
#else
  for (int mask = 16; mask > 0; mask >>= 1) value = min(value, shfl_xor(value, mask));
  return value;
#endif
}

__device__ __forceinline__ float half_bits_to_float(uint16_t bits) {
  return __half2float(__ushort_as_half(bits));
}

__device__ __forceinline__ int lowest_lane(uint32_t mask) { return __ffs(mask) - 1; }

// The hardware's reciprocal estimate (MUFU.RCP) of d in [2^-126, 2^126): the bits __fdividef(1, d)
// gives there, without its range handling (which scales a denormal or huge d: 5 instructions).
__device__ __forceinline__ float reciprocal_estimate(float d) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(d));
  return r;
}

// 16-byte load and store of data touched once: evict-first in the caches (ld/st.global.cs).
__device__ __forceinline__ uint4 load_once(const uint4* p) { return __ldcs(p); }
__device__ __forceinline__ void store_once(uint4* p, uint4 v) { __stcs(p, v); }

// ---- FP8 (OCP e4m3fn) conversions, as moekit/dtype.h defines them (see vendor.h).

}  // namespace moekit::gpu::vendor

#include "gpu/vendors/fp8_soft.h"  // the integer versions (fp8_soft::)

namespace moekit::gpu::vendor {

// Two f32 -> two e4m3 bytes (lo in the low byte): round to nearest even, finite values past 448
// and +-inf saturate to +-448, NaN stays NaN (sm_89+ makes every NaN 0x7f).
__device__ __forceinline__ uint16_t e4m3x2_from_floats(float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  return __nv_cvt_float2_to_fp8x2(make_float2(lo, hi), __NV_SATFINITE, __NV_E4M3);
#else
  return static_cast<uint16_t>(fp8_soft::e4m3_from_float(lo) |
                               (fp8_soft::e4m3_from_float(hi) << 8));
#endif
}

// Two e4m3 bytes (the low 16 bits, low byte first) -> two f16 bit patterns (low half first),
// exactly: every e4m3 value is an f16; NaN becomes an f16 NaN.
__device__ __forceinline__ uint32_t e4m3x2_to_half2_bits(uint32_t pair) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  const __half2_raw h =
      __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(pair), __NV_E4M3);
  return static_cast<uint32_t>(h.x) | (static_cast<uint32_t>(h.y) << 16);
#else
  return fp8_soft::e4m3x2_to_half2_bits(pair & 0xffffu);
#endif
}

// Matrix-unit fragments and operations (wmma::fragment, load_matrix_sync, mma_sync, ...).
namespace wmma = nvcuda::wmma;

// Timers for diagnosis builds (MOEKIT_FP8_TRACE): the device-wide clock in nanoseconds
// (%globaltimer: one clock for every SM, so stamps of different CTAs compare; a compiler barrier,
// so that a stamp stays between the memory accesses around it), and this SM's cycle counter
// (finer, but each SM's own).
__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t ns;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns)::"memory");
  return ns;
}
__device__ __forceinline__ uint64_t sm_cycles() { return clock64(); }
__device__ __forceinline__ uint32_t sm_id() {
  uint32_t id;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
  return id;
}

// Programmatic dependent launch (sm_90+): a kernel launched with overlap_previous = true may start
// while the previous kernel in the stream runs; it must call wait_for_previous_grid() before it
// touches memory that kernel writes, and allow_next_grid() lets the next one start early.
__device__ __forceinline__ void wait_for_previous_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cudaGridDependencySynchronize();
#endif
}
__device__ __forceinline__ void allow_next_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cudaTriggerProgrammaticLaunchCompletion();
#endif
}

// Launches kernel<<<grid, block, shared_bytes, stream>>>(args...), overlapping its launch with
// the previous kernel in the stream when asked (needs compute capability 9.0 or later).
template <class... Params, class... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes,
                   cudaStream_t stream, bool overlap_previous, Args&&... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared_bytes;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = overlap_previous ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

}  // namespace moekit::gpu::vendor
