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

// ---- FP8 (OCP e4m3fn) conversions, as moekit/dtype.h defines them (see vendor.h).

namespace fp8_soft {  // integer versions, for architectures without the conversion instructions

// f32 -> e4m3 byte: round to nearest even, saturating to +-448 (inf included), NaN to sign|0x7f.
__device__ __forceinline__ uint32_t e4m3_from_float(float f) {
  const uint32_t u = __float_as_uint(f);
  const uint32_t sign = (u >> 24) & 0x80u;
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7fu;
  uint32_t magnitude;
  if (a >= (121u << 23)) {  // an e4m3 normal (>= 2^-6): rebias, round 20 mantissa bits away
    const uint32_t r = a - (120u << 23);
    magnitude = (r + 0x7ffffu + ((r >> 20) & 1u)) >> 20;
  } else {  // an e4m3 subnormal or zero: the significand in units of 2^-9
    const int e = static_cast<int>(a >> 23);
    const uint32_t significand = e != 0 ? ((a & 0x7fffffu) | 0x800000u) : a;
    const int shift = min(141 - max(e, 1), 31);
    magnitude = (significand + ((1u << (shift - 1)) - 1u) + ((significand >> shift) & 1u)) >> shift;
  }
  return sign | min(magnitude, 0x7eu);
}

// Two e4m3 bytes (low byte first) -> two f16 bit patterns (low half first), exactly.
__device__ __forceinline__ uint32_t e4m3x2_to_half2_bits(uint32_t pair) {
  // Each byte's 7 magnitude bits shifted into an f16 make value * 2^-8 (subnormals included);
  // the multiplication by 2^8 is exact.
  const uint32_t spread = __byte_perm(pair, 0u, 0x1404u);  // bytes [0, b0, 0, b1]
  const uint32_t scaled = (spread & 0x80008000u) | ((spread >> 1) & 0x3f803f80u);
  __half2 h;
  memcpy(&h, &scaled, 4);
  h = __hmul2(h, __floats2half2_rn(256.0f, 256.0f));
  uint32_t bits;
  memcpy(&bits, &h, 4);
  if ((pair & 0x7fu) == 0x7fu) bits = (bits & 0xffff0000u) | 0x7fffu;
  if ((pair & 0x7f00u) == 0x7f00u) bits = (bits & 0x0000ffffu) | 0x7fff0000u;
  return bits;
}

}  // namespace fp8_soft

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
