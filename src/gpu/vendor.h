// The one include for vendor specifics: picks vendors/musa.h, vendors/hip.h or vendors/cuda.h, so
// GPU sources use CUDA names and the helpers below and never test the vendor themselves.
//
// Every vendor header provides, in moekit::gpu::vendor, for 32-lane logical warps:
//   kWarpSize                 the hardware warp width
//   lane_id(), sync_lanes()   lane in the logical warp; a barrier over it
//   shfl(v, src), shfl_xor(v, mask), ballot(pred), any(pred)
//   reduce_max(u32), reduce_min(u32)   warp-wide, result in every lane
//   half_bits_to_float(u16)   IEEE binary16 bits to f32
//   lowest_lane(mask)         index of the lowest set bit of a ballot
//   reciprocal_estimate(d)    the hardware's reciprocal estimate, for d in [2^-126, 2^126) only
//                             (CUDA: the bits of __fdividef(1, d) there)
//   wait_for_previous_grid(), allow_next_grid()   programmatic dependent launch (no-ops where the
//                             vendor has none; wait_for_previous_grid_after(touched) below)
//   launch(kernel, grid, block, shared_bytes, stream, overlap_previous, args...)   host side
//   global_timer_ns(), sm_cycles(), sm_id()   timers for diagnosis builds: a device-wide clock
//                             in ns, this SM's cycle counter, the SM's index (0 where unknown)
//   e4m3x2_from_floats(lo, hi)   two f32 -> two OCP e4m3fn bytes (lo in the low byte): round to
//                             nearest even, +-448 saturation (inf too), NaN stays NaN (its sign
//                             may be lost)
//   e4m3x2_to_half2_bits(pair)   two e4m3 bytes (low byte first) -> two f16 bit patterns (low
//                             half first), exact; NaN -> an f16 NaN
// and MOEKIT_GPU_HAS_WMMA: 1 where vendor::wmma (the nvcuda::wmma API: fragment,
// load_matrix_sync, mma_sync, store_matrix_sync with f16 inputs and f32 accumulators) exists.
#pragma once

#if defined(__MUSACC__) || defined(MOEKIT_GPU_MUSA)
#include "gpu/vendors/musa.h"
#elif defined(__HIP_PLATFORM_AMD__) || defined(MOEKIT_GPU_HIP)
#include "gpu/vendors/hip.h"
#else
#include "gpu/vendors/cuda.h"
#endif

namespace moekit::gpu {
// Lanes of the logical warp every kernel is written for.
inline constexpr int kLanes = 32;

namespace vendor {
// wait_for_previous_grid(), ordered after the reads that produced `touched`: a kernel combines a
// word of each cache line of its launch arguments into `touched`, so that those lines (constant
// memory, a new copy for every launch, a miss on first use) arrive while the previous grid still
// runs instead of in this one's chain after the wait (docs/perf/routing.md, session 5). The branch
// is what orders the reads first; what it guards, letting the next grid start, is harmless
// whatever the words are (every kernel that waits also allows it).
__device__ __forceinline__ void wait_for_previous_grid_after(uint32_t touched) {
  if (touched == 0x5bd1e995u) allow_next_grid();
  wait_for_previous_grid();
}
}  // namespace vendor
}  // namespace moekit::gpu
