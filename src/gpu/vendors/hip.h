// AMD HIP: the CUDA runtime names the GPU sources use, mapped to HIP's (in the style of
// ggml-cuda/vendors/hip.h), and the warp helpers every vendor header provides (see vendor.h).
// CDNA wavefronts have 64 lanes: kernels work on 32-lane logical warps, so every shuffle here
// passes width 32 and a ballot returns this half-wave's 32 bits.
#pragma once

#include <hip/hip_bf16.h>
#include <hip/hip_fp16.h>
#include <hip/hip_runtime.h>

#include <cstdint>
#include <cstring>
#include <utility>

#define MOEKIT_GPU_VENDOR_NAME "hip"
// No matrix-unit path assumed (a wmma-style API could be aliased here): kernels use CUDA cores.
#define MOEKIT_GPU_HAS_WMMA 0

#define cudaDevAttrMultiProcessorCount hipDeviceAttributeMultiprocessorCount
#define cudaDeviceGetAttribute hipDeviceGetAttribute
#define cudaDeviceProp hipDeviceProp_t
#define cudaDeviceSynchronize hipDeviceSynchronize
#define cudaError_t hipError_t
#define cudaErrorInsufficientDriver hipErrorInsufficientDriver
#define cudaErrorNoDevice hipErrorNoDevice
#define cudaEventCreate hipEventCreate
#define cudaEventDestroy hipEventDestroy
#define cudaEventElapsedTime hipEventElapsedTime
#define cudaEventRecord hipEventRecord
#define cudaEventSynchronize hipEventSynchronize
#define cudaEvent_t hipEvent_t
#define cudaFree hipFree
#define cudaGetDevice hipGetDevice
#define cudaGetDeviceCount hipGetDeviceCount
#define cudaGetDeviceProperties hipGetDeviceProperties
#define cudaGetErrorName hipGetErrorName
#define cudaGetErrorString hipGetErrorString
#define cudaGetLastError hipGetLastError
#define cudaGraphDestroy hipGraphDestroy
#define cudaGraphExecDestroy hipGraphExecDestroy
#define cudaGraphExec_t hipGraphExec_t
#define cudaGraphInstantiateWithFlags hipGraphInstantiateWithFlags
#define cudaGraphLaunch hipGraphLaunch
#define cudaGraph_t hipGraph_t
#define cudaMalloc hipMalloc
#define cudaMemcpy hipMemcpy
#define cudaMemcpyAsync hipMemcpyAsync
#define cudaMemcpyDefault hipMemcpyDefault
#define cudaMemcpyDeviceToDevice hipMemcpyDeviceToDevice
#define cudaMemsetAsync hipMemsetAsync
#define cudaOccupancyMaxActiveBlocksPerMultiprocessor hipOccupancyMaxActiveBlocksPerMultiprocessor
#define cudaSetDevice hipSetDevice
#define cudaStreamBeginCapture hipStreamBeginCapture
#define cudaStreamCaptureModeGlobal hipStreamCaptureModeGlobal
#define cudaStreamCaptureModeThreadLocal hipStreamCaptureModeThreadLocal
#define cudaStreamCreateWithFlags hipStreamCreateWithFlags
#define cudaStreamDestroy hipStreamDestroy
#define cudaStreamEndCapture hipStreamEndCapture
#define cudaStreamNonBlocking hipStreamNonBlocking
#define cudaStreamSynchronize hipStreamSynchronize
#define cudaStream_t hipStream_t
#define cudaSuccess hipSuccess

namespace moekit::gpu::vendor {

#if defined(__GFX9__)
inline constexpr int kWarpSize = 64;
#else
inline constexpr int kWarpSize = 32;
#endif

__device__ __forceinline__ int lane_id() { return static_cast<int>(threadIdx.x) & 31; }
// A logical warp lives inside one wavefront, which executes in lockstep.
__device__ __forceinline__ void sync_lanes() { __builtin_amdgcn_wave_barrier(); }

template <class T>
__device__ __forceinline__ T shfl(T value, int src_lane) {
  return __shfl(value, src_lane, 32);
}
template <class T>
__device__ __forceinline__ T shfl_xor(T value, int lane_mask) {
  return __shfl_xor(value, lane_mask, 32);
}
__device__ __forceinline__ uint32_t ballot(bool predicate) {
  const uint64_t wave = __ballot(predicate);
  return static_cast<uint32_t>(wave >> (static_cast<int>(threadIdx.x) & (kWarpSize - 32)));
}
__device__ __forceinline__ bool any(bool predicate) { return ballot(predicate) != 0; }

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

// The hardware's reciprocal estimate of d in [2^-126, 2^126) (v_rcp_f32).
__device__ __forceinline__ float reciprocal_estimate(float d) { return __builtin_amdgcn_rcpf(d); }

// 16-byte load and store of data touched once (non-temporal where the compiler has it).
__device__ __forceinline__ uint4 load_once(const uint4* p) {
  return uint4{__builtin_nontemporal_load(&p->x), __builtin_nontemporal_load(&p->y),
               __builtin_nontemporal_load(&p->z), __builtin_nontemporal_load(&p->w)};
}
__device__ __forceinline__ void store_once(uint4* p, uint4 v) {
  __builtin_nontemporal_store(v.x, &p->x);
  __builtin_nontemporal_store(v.y, &p->y);
  __builtin_nontemporal_store(v.z, &p->z);
  __builtin_nontemporal_store(v.w, &p->w);
}

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

// Timers for diagnosis builds (MOEKIT_FP8_TRACE): wall_clock64() counts at a constant rate
// (100 MHz on current parts: 10 ns), clock64() this compute unit's cycles; no SM id.
__device__ __forceinline__ uint64_t global_timer_ns() { return wall_clock64() * 10; }
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
