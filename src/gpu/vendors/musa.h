// Moore Threads MUSA: the CUDA runtime names the GPU sources use, mapped to MUSA's (in the style
// of ggml-cuda/vendors/musa.h), and the warp helpers every vendor header provides (see vendor.h).
#pragma once

#include <musa_bf16.h>
#include <musa_fp16.h>
#include <musa_runtime.h>

#include <cstdint>
#include <cstring>
#include <utility>

#define MOEKIT_GPU_VENDOR_NAME "musa"
// No matrix-unit path assumed (a wmma-style API could be aliased here): kernels use CUDA cores.
#define MOEKIT_GPU_HAS_WMMA 0

#define cudaDevAttrMultiProcessorCount musaDevAttrMultiProcessorCount
#define cudaDeviceGetAttribute musaDeviceGetAttribute
#define cudaDeviceProp musaDeviceProp
#define cudaDeviceSynchronize musaDeviceSynchronize
#define cudaError_t musaError_t
#define cudaErrorInsufficientDriver musaErrorInsufficientDriver
#define cudaErrorNoDevice musaErrorNoDevice
#define cudaEventCreate musaEventCreate
#define cudaEventDestroy musaEventDestroy
#define cudaEventElapsedTime musaEventElapsedTime
#define cudaEventRecord musaEventRecord
#define cudaEventSynchronize musaEventSynchronize
#define cudaEvent_t musaEvent_t
#define cudaFree musaFree
#define cudaGetDevice musaGetDevice
#define cudaGetDeviceCount musaGetDeviceCount
#define cudaGetDeviceProperties musaGetDeviceProperties
#define cudaGetErrorName musaGetErrorName
#define cudaGetErrorString musaGetErrorString
#define cudaGetLastError musaGetLastError
#define cudaGraphDestroy musaGraphDestroy
#define cudaGraphExecDestroy musaGraphExecDestroy
#define cudaGraphExec_t musaGraphExec_t
#define cudaGraphInstantiateWithFlags musaGraphInstantiateWithFlags
#define cudaGraphLaunch musaGraphLaunch
#define cudaGraph_t musaGraph_t
#define cudaMalloc musaMalloc
#define cudaMemcpy musaMemcpy
#define cudaMemcpyAsync musaMemcpyAsync
#define cudaMemcpyDefault musaMemcpyDefault
#define cudaMemcpyDeviceToDevice musaMemcpyDeviceToDevice
#define cudaMemsetAsync musaMemsetAsync
#define cudaOccupancyMaxActiveBlocksPerMultiprocessor musaOccupancyMaxActiveBlocksPerMultiprocessor
#define cudaSetDevice musaSetDevice
#define cudaStreamBeginCapture musaStreamBeginCapture
#define cudaStreamCaptureModeGlobal musaStreamCaptureModeGlobal
#define cudaStreamCaptureModeThreadLocal musaStreamCaptureModeThreadLocal
#define cudaStreamCreateWithFlags musaStreamCreateWithFlags
#define cudaStreamDestroy musaStreamDestroy
#define cudaStreamEndCapture musaStreamEndCapture
#define cudaStreamNonBlocking musaStreamNonBlocking
#define cudaStreamSynchronize musaStreamSynchronize
#define cudaStream_t musaStream_t
#define cudaSuccess musaSuccess

namespace moekit::gpu::vendor {

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
  return static_cast<uint32_t>(__ballot_sync(0xffffffffu, predicate));
}
__device__ __forceinline__ bool any(bool predicate) { return __any_sync(0xffffffffu, predicate); }

// No warp-reduce instruction assumed: a butterfly of shuffles.
__device__ __forceinline__ uint32_t reduce_max(uint32_t value) {
  for (int mask = 16; mask > 0; mask >>= 1) value = max(value, shfl_xor(value, mask));
  return value;
}
__device__ __forceinline__ uint32_t reduce_min(uint32_t value) {
  for (int mask = 16; mask > 0; mask >>= 1) value = min(value, shfl_xor(value, mask));
  return value;
}

__device__ __forceinline__ float half_bits_to_float(uint16_t bits) {
  return __half2float(__ushort_as_half(bits));
}

__device__ __forceinline__ int lowest_lane(uint32_t mask) { return __ffs(mask) - 1; }

// A reciprocal estimate of d in [2^-126, 2^126): the fast division's.
__device__ __forceinline__ float reciprocal_estimate(float d) { return __fdividef(1.0f, d); }

// 16-byte load and store of data touched once: plain accesses (no cache hints assumed).
__device__ __forceinline__ uint4 load_once(const uint4* p) { return *p; }
__device__ __forceinline__ void store_once(uint4* p, uint4 v) { *p = v; }

// ---- FP8 (OCP e4m3fn) conversions, as moekit/dtype.h defines them (see vendor.h): integer
// code, no conversion instructions assumed.

}  // namespace moekit::gpu::vendor

#include "gpu/vendors/fp8_soft.h"  // the integer versions (fp8_soft::)

namespace moekit::gpu::vendor {

__device__ __forceinline__ uint16_t e4m3x2_from_floats(float lo, float hi) {
  return static_cast<uint16_t>(fp8_soft::e4m3_from_float(lo) |
                               (fp8_soft::e4m3_from_float(hi) << 8));
}
__device__ __forceinline__ uint32_t e4m3x2_to_half2_bits(uint32_t pair) {
  return fp8_soft::e4m3x2_to_half2_bits(pair & 0xffffu);
}

// Timers for diagnosis builds (MOEKIT_FP8_TRACE): no device-wide clock assumed, so the cycle
// counter stands in for both (stamps of different SMs then do not compare); no SM id.
__device__ __forceinline__ uint64_t global_timer_ns() { return clock64(); }
__device__ __forceinline__ uint64_t sm_cycles() { return clock64(); }
__device__ __forceinline__ uint32_t sm_id() { return 0; }

// No programmatic dependent launch: kernels simply run in stream order.
__device__ __forceinline__ void wait_for_previous_grid() {}
__device__ __forceinline__ void allow_next_grid() {}

template <class... Params, class... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes,
                   cudaStream_t stream, bool /*overlap_previous*/, Args&&... args) {
  kernel<<<grid, block, shared_bytes, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
}

}  // namespace moekit::gpu::vendor
