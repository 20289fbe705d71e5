// The Hopper block-FP8 GEMM's shared pieces (included by fp8_gemm_sm90.cu only): launch shape
// constants, the kernels' argument structs, scale and output accessors, and the wgmma k-block
// helpers both kernels use.
#pragma once

#include <cuda.h>  // CUtensorMap

#include <cstdint>

#include "gpu/sm90/ptx.h"
#include "gpu/sm90/wgmma_fp8.h"
#include "gpu/vendor.h"

namespace moekit::gpu {
namespace {  // one translation unit includes this: fp8_gemm_sm90.cu

constexpr int kBlockK = 128;     // bytes of K per stage: one 128-byte swizzle row, one k-block
constexpr int kWarpgroup = 128;  // threads
constexpr int kConsumers = 2;    // consumer warpgroups per CTA
constexpr int kThreads = kWarpgroup * (kConsumers + 1);
constexpr int kSharedAlign = 1024;  // 128-byte swizzle atoms are 1024 bytes

enum class OutType : int { f32, bf16, f16 };
enum class BiasType : int { none, f32, bf16, f16 };

__host__ __device__ constexpr int out_bytes(OutType type) { return type == OutType::f32 ? 4 : 2; }

// Where the scales live (ScaleAddressing, plus the b_scales strides and dtype).
struct Scales {
  const void* a;
  int64_t a_row_stride;
  int64_t a_group_stride;
  bool a_packed;
  const void* b;
  int64_t b_row_stride;
  int64_t b_col_stride;
  bool b_bf16;
};

struct Epilogue {
  void* out;
  int64_t out_row_stride;
  OutType out_type;
  bool out_pairs;  // two neighbouring columns can be stored as one aligned vector
  const void* bias;
  int64_t bias_stride;
  BiasType bias_type;
};

// The linear layer's bf16 activations [m, k], quantized inside the swap kernel (kQuantizeX) with
// the group quantization's rule (group 128, eps, ue8m0 as the layer asks).
struct Activations {
  const void* x;
  int64_t row_stride;  // elements
  int k;
  float eps;
  bool ue8m0;
};

struct GemmArgs {
  Scales scales;
  Epilogue epilogue;
  Activations activations;  // swap kernel with kQuantizeX only
  int m, n, k_blocks;
  int tiles_m, tiles_n;  // tiles kernel: out tiles of 128 x 128
  int splits;            // swap kernel: CTAs of one cluster that split K of one weight tile
  int stages;            // swap kernel: depth of the shared-memory ring (even)
  bool early_weights;    // swap kernel: weight tiles into the ring before the previous grid ends
  bool push_sums;        // swap kernel: split CTAs push their sums into rank 0's shared memory
  bool bulk_stores;      // swap kernel: rank 0's out tile through shared memory and bulk copies
  bool loader_scales;    // swap kernel: activation scales loaded by producer warps, per group
  int early_tiles;       // swap kernel, early_weights: at most this many tiles before the wait
  // Tiles kernel with scales copied by TMA (kScaleFeed != warps): the weight-scale map's box of
  // 16 bytes holds b_scale_lanes elements along k-blocks (b_scale_k_inner) or along N blocks.
  bool b_scale_k_inner;
  int b_scale_lanes;
  // Persistent wide tiles with the last round split over K (stream-K): the last sk_units units'
  // k-blocks spread evenly over the first sk_pairs pairs (CTAs where there are no pairs). A unit's
  // k-blocks summed by other pairs reach its last one through sk_partials (a 256 x 128 f32 tile
  // per CTA) and sk_flags (a word per CTA: zero between calls). sk_units == 0: not split.
  int sk_units, sk_pairs;
  float* sk_partials;
  uint32_t* sk_flags;
  // Persistent wide tiles over `groups` GEMMs (grouped_block_fp8_gemm, whole or in DeepGEMM's
  // masked layout; the kernel's kGrouped build): the tensor maps take the group as their third
  // coordinate, out_group_stride is the out elements between groups, and masked_m [groups] i32 on
  // the device gives group g's rows, its first min(max(masked_m[g], 0), m) (null: all m).
  const int* masked_m;
  int groups;
  int64_t out_group_stride;
  // Persistent tiles of DeepGEMM's contiguous layout (the kernel's Groups::contiguous build): the
  // 128-row block at row m multiplies weights m_indices[m * m_index_stride] (i32 on the device;
  // outside [0, groups): padding, skipped).
  const int* m_indices;
  int64_t m_index_stride;
  // The groups' builds: elements between the weight scales of consecutive groups (their loader
  // warp reads scales.b, b_row_stride and b_col_stride from group 0's).
  int64_t b_scale_group_stride;
#ifdef MOEKIT_FP8_TRACE
  int tiles_ablation;  // diagnosis builds: see tiles::ablation
#endif
};

// Tiles kernel: tensor maps of the activation and weight scales (used where the kernel copies the
// scales with TMA; zeros otherwise).
struct ScaleMaps {
  CUtensorMap a;
  CUtensorMap b;
};

// ---- Device helpers, compiled only where the kernels have bodies (the sm_90a pass).
#if MOEKIT_SM90A

constexpr int kProducerRegisters = 40;  // 128 * 40 + 256 * 232 = 384 * 168, the launch's
constexpr int kConsumerRegisters = 232;

// ---- Scalar loads and stores (all four activation-scale layouts, both weight-scale dtypes).

__device__ __forceinline__ float a_scale(const Scales& s, int m, int kb) {
  if (s.a_packed) {
    const int64_t word = m * s.a_row_stride + static_cast<int64_t>(kb >> 2) * s.a_group_stride;
    const uint32_t exponent = __ldg(static_cast<const uint8_t*>(s.a) + word * 4 + (kb & 3));
    return __uint_as_float(exponent << 23);
  }
  return __ldg(static_cast<const float*>(s.a) + m * s.a_row_stride +
               static_cast<int64_t>(kb) * s.a_group_stride);
}

__device__ __forceinline__ float b_scale(const Scales& s, int nb, int kb) {
  const int64_t i = nb * s.b_row_stride + static_cast<int64_t>(kb) * s.b_col_stride;
  if (s.b_bf16) {
    const uint32_t bits = __ldg(static_cast<const uint16_t*>(s.b) + i);
    return __uint_as_float(bits << 16);
  }
  return __ldg(static_cast<const float*>(s.b) + i);
}

__device__ __forceinline__ float bias_at(const Epilogue& e, int n) {
  const int64_t i = n * e.bias_stride;
  switch (e.bias_type) {
    case BiasType::f32:
      return static_cast<const float*>(e.bias)[i];
    case BiasType::bf16:
      return __uint_as_float(static_cast<uint32_t>(static_cast<const uint16_t*>(e.bias)[i]) << 16);
    case BiasType::f16:
      return __half2float(static_cast<const __half*>(e.bias)[i]);
    case BiasType::none:
      break;
  }
  return 0.0f;
}

// The bias of out columns col .. col + 3 (zeros past N, or without a bias).
__device__ __forceinline__ float4 bias_quad(const GemmArgs& args, int col) {
  const Epilogue& e = args.epilogue;
  float4 bias = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  if (e.bias_type != BiasType::none) {
    if (col < args.n) bias.x = bias_at(e, col);
    if (col + 1 < args.n) bias.y = bias_at(e, col + 1);
    if (col + 2 < args.n) bias.z = bias_at(e, col + 2);
    if (col + 3 < args.n) bias.w = bias_at(e, col + 3);
  }
  return bias;
}

// v in the out dtype at p (shared memory: an out tile staged for bulk copies).
__device__ __forceinline__ void stage_one(OutType type, uint8_t* p, float v) {
  switch (type) {
    case OutType::f32:
      *reinterpret_cast<float*>(p) = v;
      break;
    case OutType::bf16:
      *reinterpret_cast<__nv_bfloat16*>(p) = __float2bfloat16_rn(v);
      break;
    case OutType::f16:
      *reinterpret_cast<__half*>(p) = __float2half_rn(v);
      break;
  }
}

__device__ __forceinline__ void store_one(const Epilogue& e, int64_t i, float v) {
  switch (e.out_type) {
    case OutType::f32:
      static_cast<float*>(e.out)[i] = v;
      break;
    case OutType::bf16:
      static_cast<__nv_bfloat16*>(e.out)[i] = __float2bfloat16_rn(v);
      break;
    case OutType::f16:
      static_cast<__half*>(e.out)[i] = __float2half_rn(v);
      break;
  }
}

// out[row, col] = v0 and out[row, col + 1] = v1 where those columns are < n (col is even).
__device__ __forceinline__ void store_pair(const Epilogue& e, int row, int col, int n, float v0,
                                           float v1) {
  if (col >= n) return;
  const int64_t i = row * e.out_row_stride + col;
  if (col + 1 >= n || !e.out_pairs) {
    store_one(e, i, v0);
    if (col + 1 < n) store_one(e, i + 1, v1);
    return;
  }
  switch (e.out_type) {
    case OutType::f32:
      *reinterpret_cast<float2*>(static_cast<float*>(e.out) + i) = make_float2(v0, v1);
      break;
    case OutType::bf16:
      *reinterpret_cast<__nv_bfloat162*>(static_cast<__nv_bfloat16*>(e.out) + i) =
          __floats2bfloat162_rn(v0, v1);
      break;
    case OutType::f16:
      *reinterpret_cast<__half2*>(static_cast<__half*>(e.out) + i) = __floats2half2_rn(v0, v1);
      break;
  }
}

// Two pairs of 16-bit values as one 8-byte word.
template <typename Pair>
__device__ __forceinline__ uint2 packed_pairs(Pair lo, Pair hi) {
  return make_uint2(*reinterpret_cast<const uint32_t*>(&lo),
                    *reinterpret_cast<const uint32_t*>(&hi));
}

// out[row, col .. col + 3] = v where those columns are < n: one vector store where the four are
// in range and aligned, else pairs.
__device__ __forceinline__ void store_quad(const Epilogue& e, int row, int col, int n, float4 v) {
  const int64_t i = row * e.out_row_stride + col;
  const int element = e.out_type == OutType::f32 ? 4 : 2;
  void* p = static_cast<uint8_t*>(e.out) + i * element;
  if (col + 3 < n && reinterpret_cast<uintptr_t>(p) % (4 * element) == 0) {
    switch (e.out_type) {
      case OutType::f32:
        *static_cast<float4*>(p) = v;
        return;
      case OutType::bf16:
        *static_cast<uint2*>(p) =
            packed_pairs(__floats2bfloat162_rn(v.x, v.y), __floats2bfloat162_rn(v.z, v.w));
        return;
      case OutType::f16:
        *static_cast<uint2*>(p) =
            packed_pairs(__floats2half2_rn(v.x, v.y), __floats2half2_rn(v.z, v.w));
        return;
    }
  }
  store_pair(e, row, col, n, v.x, v.y);
  store_pair(e, row, col + 2, n, v.z, v.w);
}

__device__ __forceinline__ uint8_t* align_shared(uint8_t* p) {
  const uint32_t address = sm90::shared_address(p);
  return p + ((kSharedAlign - address % kSharedAlign) % kSharedAlign);
}

// The 4 wgmma of one k-block into a fresh fragment, committed as one group and not waited for.
// No fence on `part` after the commit: in the tiles kernel with two fragments, where other work
// comes between this and the wait, one made ptxas serialize every wgmma (warning C7514).
template <int N>
__device__ __forceinline__ void issue_k_block(float (&part)[N / 2], const uint8_t* a_tile,
                                              const uint8_t* b_tile) {
  const uint64_t desc_a = sm90::smem_descriptor_sw128(a_tile);
  const uint64_t desc_b = sm90::smem_descriptor_sw128(b_tile);
#pragma unroll
  for (int i = 0; i < N / 2; ++i) sm90::fence_operand(part[i]);
  sm90::wgmma_fence();
#pragma unroll
  for (int k = 0; k < kBlockK / 32; ++k)  // 32 bytes of K per wgmma: +2 in 16-byte units
    sm90::WgmmaFp8<N>::run(part, desc_a + 2 * k, desc_b + 2 * k, k > 0);
  sm90::wgmma_commit();
}

// issue_k_block from descriptors' low words (sm90::smem_descriptor_sw128_low), which a loop steps
// with 32-bit adds.
template <int N>
__device__ __forceinline__ void issue_k_block_at(float (&part)[N / 2], uint32_t a_low,
                                                 uint32_t b_low) {
#pragma unroll
  for (int i = 0; i < N / 2; ++i) sm90::fence_operand(part[i]);
  sm90::wgmma_fence();
#pragma unroll
  for (int k = 0; k < kBlockK / 32; ++k)  // 32 bytes of K per wgmma: +2 in 16-byte units
    sm90::WgmmaFp8<N>::run(part, sm90::sw128_descriptor(a_low + 2 * k),
                           sm90::sw128_descriptor(b_low + 2 * k), k > 0);
  sm90::wgmma_commit();
}

// Waits for the fragment's wgmma (issued by issue_k_block or issue_k_block_at).
template <int N>
__device__ __forceinline__ void wait_k_block(float (&part)[N / 2]) {
#pragma unroll
  for (int i = 0; i < N / 2; ++i) sm90::fence_operand(part[i]);
  sm90::wgmma_wait<0>();
#pragma unroll
  for (int i = 0; i < N / 2; ++i) sm90::fence_operand(part[i]);
}

// The 4 wgmma of one k-block into a fresh fragment, then waits for them (the stage is free after).
template <int N>
__device__ __forceinline__ void multiply_k_block(float (&part)[N / 2], const uint8_t* a_tile,
                                                 const uint8_t* b_tile) {
  issue_k_block<N>(part, a_tile, b_tile);
#pragma unroll
  for (int i = 0; i < N / 2; ++i) sm90::fence_operand(part[i]);
  sm90::wgmma_wait<0>();
#pragma unroll
  for (int i = 0; i < N / 2; ++i) sm90::fence_operand(part[i]);
}

// acc += part * scale for a 128-column fragment: rows lane / 4 (scale0) and + 8 (scale1).
__device__ __forceinline__ void promote_tile_fragment(float (&acc)[64], const float (&part)[64],
                                                      float scale0, float scale1) {
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    acc[4 * j + 0] += part[4 * j + 0] * scale0;
    acc[4 * j + 1] += part[4 * j + 1] * scale0;
    acc[4 * j + 2] += part[4 * j + 2] * scale1;
    acc[4 * j + 3] += part[4 * j + 3] * scale1;
  }
}

#endif  // MOEKIT_SM90A

}  // namespace
}  // namespace moekit::gpu
