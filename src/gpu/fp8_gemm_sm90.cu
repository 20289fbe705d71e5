// block_fp8_gemm on Hopper tensor cores (sm_90a): TMA tile loads into a shared-memory ring guarded
// by mbarriers, fp8 wgmma, and DeepGEMM's "promotion": each 128-wide k-block is multiplied into a
// fresh f32 fragment (4 wgmma of k = 32), which is then added to the running f32 accumulator times
// As[m, kb] * Bs[n / 128, kb]. That applies the per-block scales exactly where the contract puts
// them and keeps the tensor cores' reduced-precision fp8 accumulation to 128 products.
//
// Two kernels, one warpgroup of each CTA producing (one thread issues every TMA copy) and two
// consuming (wgmma, promotion, epilogue):
//
// - tiles (large M): CTA tile 128 x 128 of out; the consumer warpgroups take 64 rows each. A and B
//   tiles (128 x 128 bytes, 128-byte swizzle) arrive together, 6 stages deep. CTAs are numbered in
//   groups of 8 tile rows so that the CTAs resident at once share A and B tiles in L2. Two
//   producer warps put each k-block's scale products beside its tiles. Each consumer keeps two
//   fragments, so one k-block's wgmma run while the previous one is promoted.
// - swap (M <= 128, decode and small batches): the weight is the wgmma M side and the tokens its
//   N side (8..128), so no tensor-core rows are wasted on padding tokens. A CTA takes 128 weight
//   rows (64 per consumer warpgroup) or 64 (the warpgroups take alternate k-blocks), and up to 8
//   CTAs of a cluster split K so that the weight streams from every SM; their partial sums meet
//   through distributed shared memory, added in rank order: bitwise deterministic. The host picks
//   rows and split from a small cost model over the clusters the device holds in one wave.
//
// Swap grids and tiles grids of a few waves launch with programmatic dependent launch
// (MOEKIT_GPU_PDL=0 turns it off): a kernel lets the next one start at once, and waits for the
// previous one before it reads or writes the activations, their scales or the output. The tiles
// kernel prefetches its first tiles into L2 before that wait; the swap kernel loads its first
// weight tiles into shared memory where the caller promises that B is not the previous kernel's
// output (BlockGemmProblem::b_static, from OpOptions::static_weights or the linear layer), and
// where its whole k-range fits the ring it is built for two CTAs per SM, so that the next call's
// CTAs load all their weights while this call runs.
//
// The linear layer at decode sizes (w8a8_linear_sm90_fused, M <= 16) runs the swap kernel built to
// quantize bf16 x itself: the consumers read the CTA's rows of x (prefetched into L2 ahead of the
// weights), quantize them with the group quantization's own helpers (fp8_quant_math.cuh) into
// swizzled token tiles and scales in shared memory, then multiply as usual: no workspace, no
// second kernel, and the GEMM's layout and split, so the same bits as the two-kernel path.
//
// Rows past M, columns past N and k past K are zeros filled in by the copy engine, and the
// epilogue writes only inside [M, N]. The host builds both tensor maps per call
// (cuTensorMapEncodeTiled through the runtime's driver entry point: no libcuda link) and passes
// them as __grid_constant__ parameters.
#include <cuda.h>  // CUtensorMap and its enums only; the driver is reached through the runtime
#include <cudaTypedefs.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <tuple>

#include "core/env_switch.h"
#include "gpu/fp8_gemm_sm90.h"
#include "gpu/fp8_gpu.h"
#include "gpu/fp8_quant_math.cuh"
#include "gpu/gpu_check.h"
#include "gpu/gpu_runtime.h"
#include "gpu/sm90/ptx.h"
#include "gpu/sm90/wgmma_fp8.h"
#include "gpu/vendor.h"
#include "moekit/error.h"

namespace moekit::gpu {
namespace {

constexpr const char* kOp = "block_fp8_gemm";
constexpr int kBlockK = 128;     // bytes of K per stage: one 128-byte swizzle row, one k-block
constexpr int kWarpgroup = 128;  // threads
constexpr int kConsumers = 2;    // consumer warpgroups per CTA
constexpr int kThreads = kWarpgroup * (kConsumers + 1);
constexpr int kSharedAlign = 1024;  // 128-byte swizzle atoms are 1024 bytes

enum class OutType : int { f32, bf16, f16 };
enum class BiasType : int { none, f32, bf16, f16 };

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
  int early_tiles;       // swap kernel, early_weights: at most this many tiles before the wait
  // Tiles kernel with scales copied by TMA (kScaleFeed != warps): the weight-scale map's box of
  // 16 bytes holds b_scale_lanes elements along k-blocks (b_scale_k_inner) or along N blocks.
  bool b_scale_k_inner;
  int b_scale_lanes;
};

// Tiles kernel: tensor maps of the activation and weight scales (used where the kernel copies the
// scales with TMA; zeros otherwise).
struct ScaleMaps {
  CUtensorMap a;
  CUtensorMap b;
};

// ---- Device helpers, compiled only where the kernels have bodies (the sm_90a pass).
#if MOEKIT_SM90A

constexpr int kProducerRegisters = 40;  // 128 * 40 + 256 * 232 <= 64K registers
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

// ---- The tiles kernel (any M; chosen for M > 128).
//
// kOverlap: the consumers keep two wgmma fragments, so that k-block i + 1's wgmma run while
// k-block i's products are scaled into the accumulators (H200, M=4096 N=7168 K=16384: 988 vs
// 1115-1153 us; docs/perf/fp8-gpu-sm90.md, session 13).
//
// kScaleFeed: who puts each k-block's scales beside its tiles (the scale warps, or the copy engine
// with the tiles). kPair: clusters of two CTAs on neighbouring tile rows, each copying half of
// the shared B tile into both rings; a stage is refilled once the consumers of both CTAs are done
// with it (session 15).

namespace tiles {
constexpr int kBlockM = 128, kBlockN = 128, kStages = 6;
constexpr int kTileBytes = kBlockM * kBlockK;  // A or B tile (kBlockN == kBlockM)
constexpr int kStageBytes = 2 * kTileBytes;
// A stage's scale region: the scale warps' 128 products, or the TMA box of the activation scales
// with rows inner (512 bytes), and at kScaleABoxBytes the weight scales' box (16 bytes). (The
// region still has room for a k-inner box, which now goes to the box ring below: shrinking it to
// 640 bytes is left for a session with a GPU to test it.)
constexpr int kScaleABoxBytes = kBlockM * 16;  // 128 rows x 16 bytes, the largest box
constexpr int kScaleBytes = kScaleABoxBytes + 128;
// Activation-scale boxes of 4 k-blocks (a_k_inner) are copied once, with their first k-block's
// stage, into a ring of their own: a slot is overwritten 12 k-blocks later, when both consumer
// warpgroups (of both CTAs in pairs) have read it, since a stage is refilled 6 k-blocks after its
// last use and each k-block's factors are read before its stage is released.
constexpr int kScaleBoxSlots = 3;
constexpr size_t kSharedBytes = kSharedAlign + static_cast<size_t>(kStages) * kStageBytes +
                                kStages * kScaleBytes + kScaleBoxSlots * kScaleABoxBytes +
                                2 * kStages * sizeof(uint64_t);
// Who puts a stage's scales into shared memory: producer warps 1 and 2 (any layout, products
// written), or the copy engine with the tiles, as boxes of the activation scales with k-blocks
// (or packed words) inner, 4 per row (a_k_inner), or rows inner, 128 per k-block (a_m_inner).
enum class ScaleFeed : int { warps, a_k_inner, a_m_inner };
constexpr int kOverlapGroup = 4;  // kOverlap: k-blocks per turn of the consumers' loop
#if MOEKIT_SM90A
constexpr int kScaleWarps = 2;  // producer warps 1 and 2 write the scale products
// The scale warps keep 12 loads in flight (with 40 registers they spill).
constexpr int kScaleProducerRegisters = 56;  // 128 * 56 + 256 * 224 <= 64K registers
constexpr int kScaleConsumerRegisters = 224;
// kOverlap: ring slots a CTA goes through (whole groups; past k_blocks a slot holds no copy).
__device__ constexpr int overlap_slots(int k_blocks) {
  return (k_blocks + kOverlapGroup - 1) / kOverlapGroup * kOverlapGroup;
}

// Where a tile row's scale product sits in its stage's 128 floats: rows r and r + 8
// of a consumer thread side by side (one 8-byte load).
__device__ constexpr int scale_slot(int row) { return row / 16 * 16 + row % 8 * 2 + row % 16 / 8; }

// A ring position: slot s of kStages and the parity of its current phase.
struct RingPosition {
  int stage = 0;
  uint32_t phase = 0;
  __device__ void advance() {
    if (++stage == kStages) {
      stage = 0;
      phase ^= 1;
    }
  }
};
#endif
}  // namespace tiles

// Scales from the scale warps: producer warps 1 and 2 multiply each k-block's activation scales
// (any layout) by its weight scale and put the 128 products beside the stage's tiles, so that a
// consumer thread reads its two rows' factors with one shared load instead of computing addresses
// and loading global scales: the consumers' loop went from ~161 to ~103 SASS instructions per
// k-block, and the kernel from 974 to 919 us at M=4096 N=7168 K=16384 (H200, ncu at 1.68-1.69
// GHz; docs/perf/fp8-gpu-sm90.md, session 14). Scales copied with the tiles: the stage's full
// barrier waits for the copies alone (1,552 k -> 1,439 k cycles at that shape, session 15); the
// consumers read the two factors and the weight scale and multiply.
template <bool kOverlap, tiles::ScaleFeed kScaleFeed, bool kPair>
__global__ void __launch_bounds__(kThreads, 1)
    gemm_tiles_kernel(const __grid_constant__ CUtensorMap a_map,
                      const __grid_constant__ CUtensorMap b_map, const GemmArgs args,
                      const __grid_constant__ ScaleMaps scale_maps) {
#if MOEKIT_SM90A
  using namespace tiles;
  constexpr bool kCopiedScales = kScaleFeed != ScaleFeed::warps;
  // Per stage: the weight scales' 16 bytes, and the activation scales' box (a_m_inner) or, with
  // the first k-block of each box, its 4 k-blocks (a_k_inner).
  constexpr int kScaleCopyBytes = (kScaleFeed == ScaleFeed::a_m_inner ? kBlockM * 4 : 0) + 16;
  constexpr int kScaleFloats = kScaleBytes / 4;  // a stage's scale region, in floats
  constexpr int kGroupRows = 8;                  // tile rows per rasterization group
  extern __shared__ uint8_t shared_raw[];
  uint8_t* stages = align_shared(shared_raw);
  auto* scales = reinterpret_cast<float*>(stages + kStages * kStageBytes);
  auto* scale_boxes = reinterpret_cast<float*>(stages + kStages * (kStageBytes + kScaleBytes));
  auto* full = reinterpret_cast<uint64_t*>(stages + kStages * (kStageBytes + kScaleBytes) +
                                           kScaleBoxSlots * kScaleABoxBytes);
  uint64_t* empty = full + kStages;
  // Warp-uniform, which lets the compiler keep descriptors in uniform registers.
  const int warpgroup = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x) / kWarpgroup, 0);
  const int k_blocks = args.k_blocks;

  // Tile of this CTA: groups of kGroupRows tile rows, rows fastest inside a group.
  const int per_group = kGroupRows * args.tiles_n;
  const int group = static_cast<int>(blockIdx.x) / per_group;
  const int first_row = group * kGroupRows;
  const int group_rows = min(args.tiles_m - first_row, kGroupRows);
  const int in_group = static_cast<int>(blockIdx.x) % per_group;
  const int m0 = (first_row + in_group % group_rows) * kBlockM;
  const int n0 = (in_group / group_rows) * kBlockN;
  const int nb = n0 / kBlockN;
  // Pairs: the group's row count is even (the host pairs only even tiles_m), so CTAs 2j and
  // 2j + 1 of a cluster hold rows 2i and 2i + 1 of one column tile.
  const uint32_t rank = kPair ? sm90::cluster_rank() : 0;
  // kOverlap: the consumers take k-blocks in groups of 4; the last group's slots past k_blocks
  // are only barrier arrivals (their stages keep old bytes: the consumers multiply them, so that
  // every path has the same wgmma in flight, and add nothing).
  const int slots = kOverlap ? overlap_slots(k_blocks) : k_blocks;

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      sm90::mbarrier_init(&full[s], kCopiedScales ? 1 : 1 + kScaleWarps * 32);
      // Lane 0 of every consumer warp (of both CTAs in pairs: the stage holds the peer's copy).
      sm90::mbarrier_init(&empty[s], kConsumers * 4 * (kPair ? 2 : 1));
    }
    sm90::fence_barrier_init();
  }
  // Pairs: the peer's barriers are initialized before any copy or arrival reaches them.
  if constexpr (kPair)
    sm90::cluster_sync();
  else
    __syncthreads();
  vendor::allow_next_grid();  // the next kernel may set up while this one runs

  if (warpgroup == kConsumers) {
    sm90::registers_shrink<kScaleProducerRegisters>();
    // Pairs: no thread leaves while the peer may still arrive on this CTA's barriers.
    const auto leave = [&] {
      __syncwarp();
      if constexpr (kPair) {
        sm90::cluster_arrive();
        sm90::cluster_wait();
      }
    };
    const int producer_warp = static_cast<int>(threadIdx.x) / 32 % 4;
    if (threadIdx.x == kConsumers * kWarpgroup) {
      sm90::prefetch_tensor_map(&a_map);
      sm90::prefetch_tensor_map(&b_map);
      if constexpr (kCopiedScales) {
        sm90::prefetch_tensor_map(&scale_maps.a);
        sm90::prefetch_tensor_map(&scale_maps.b);
      }
      for (int kb = 0; kb < min(k_blocks, kStages); ++kb) {
        sm90::tma_prefetch_2d(&a_map, kb * kBlockK, m0);
        sm90::tma_prefetch_2d(&b_map, kb * kBlockK, n0 + static_cast<int>(rank) * (kBlockN / 2));
      }
      vendor::wait_for_previous_grid();
      RingPosition ring;
      for (int kb = 0; kb < slots; ++kb, ring.advance()) {
        sm90::mbarrier_wait(&empty[ring.stage], ring.phase ^ 1);
        uint64_t* bar = &full[ring.stage];
        if (kb >= k_blocks) {
          sm90::mbarrier_arrive(bar);
          continue;
        }
        uint8_t* stage = stages + ring.stage * kStageBytes;
        const int word = args.scales.a_packed ? kb >> 2 : kb;  // of the activation scales
        // a_k_inner: this k-block opens a box of 4 words (16 k-blocks where packed).
        const bool opens_box = kScaleFeed == ScaleFeed::a_k_inner && (word & 3) == 0 &&
                               (!args.scales.a_packed || (kb & 3) == 0);
        sm90::mbarrier_arrive_expect_tx(bar, kStageBytes + (kCopiedScales ? kScaleCopyBytes : 0) +
                                                 (opens_box ? kScaleABoxBytes : 0));
        sm90::tma_load_2d(stage, &a_map, bar, kb * kBlockK, m0);
        if constexpr (kPair) {  // this CTA's half of the B tile, into both rings
          const int half = static_cast<int>(rank) * (kBlockN / 2);
          sm90::tma_load_2d_multicast(stage + kTileBytes + half * kBlockK, &b_map, bar,
                                      kb * kBlockK, n0 + half, 0x3);
        } else {
          sm90::tma_load_2d(stage + kTileBytes, &b_map, bar, kb * kBlockK, n0);
        }
        if constexpr (kCopiedScales) {
          // The boxes' first element: 16-byte boxes start at a multiple of their element count.
          float* region = scales + ring.stage * kScaleFloats;
          if constexpr (kScaleFeed == ScaleFeed::a_k_inner) {
            if (opens_box)
              sm90::tma_load_2d(scale_boxes + (word >> 2) % kScaleBoxSlots * (kScaleABoxBytes / 4),
                                &scale_maps.a, bar, word, m0);
          } else {
            sm90::tma_load_2d(region, &scale_maps.a, bar, m0, word);
          }
          const int inner = args.b_scale_k_inner ? kb : nb;
          sm90::tma_load_2d(region + kScaleABoxBytes / 4, &scale_maps.b, bar,
                            inner & -args.b_scale_lanes, args.b_scale_k_inner ? nb : kb);
        }
      }
    } else if (!kCopiedScales && producer_warp >= 1 && producer_warp <= kScaleWarps) {
      // Rows r0 and r0 + 64 of the tile; 4 k-blocks' loads in flight at a time.
      const int r0 = (producer_warp - 1) * 32 + static_cast<int>(threadIdx.x) % 32;
      const int rows[2] = {min(m0 + r0, args.m - 1), min(m0 + r0 + 64, args.m - 1)};
      float product[2][4];
      const auto load_products = [&](int first_kb) {
        float a[2][4], b[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int kb = min(first_kb + j, k_blocks - 1);
          b[j] = b_scale(args.scales, nb, kb);
#pragma unroll
          for (int i = 0; i < 2; ++i) a[i][j] = a_scale(args.scales, rows[i], kb);
        }
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int i = 0; i < 2; ++i) product[i][j] = a[i][j] * b[j];
      };
      vendor::wait_for_previous_grid();
      load_products(0);
      RingPosition ring;
      for (int first = 0; first < slots; first += 4) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (first + j >= slots) break;
          sm90::mbarrier_wait(&empty[ring.stage], ring.phase ^ 1);
          float* stage_scales = scales + ring.stage * kScaleFloats;
          stage_scales[scale_slot(r0)] = product[0][j];
          stage_scales[scale_slot(r0 + 64)] = product[1][j];
          sm90::mbarrier_arrive(&full[ring.stage]);
          ring.advance();
        }
        if (first + 4 < slots) load_products(first + 4);
      }
    }
    leave();
    return;
  }

  sm90::registers_grow<kScaleConsumerRegisters>();
  const int t = static_cast<int>(threadIdx.x) % kWarpgroup;
  const int warp = t / 32, lane = t % 32;
  const int tile_row = warpgroup * 64 + warp * 16 + lane / 4;  // and tile_row + 8
  const int row0 = m0 + tile_row;
  vendor::wait_for_previous_grid();

  float acc[64], part[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = 0.0f;
  const uint8_t* a_half = stages + warpgroup * 64 * kBlockK;  // + stage offset
  // After every lane's last read of the stage (its scales): the stage goes back to the producer.
  const auto release = [&](int stage) {
    __syncwarp();
    if (lane == 0) {
      sm90::mbarrier_arrive(&empty[stage]);
      if constexpr (kPair) sm90::mbarrier_arrive_peer(&empty[stage], rank ^ 1);
    }
  };
  // The scale products of rows tile_row and tile_row + 8 for k-block kb in `stage`.
  const auto stage_factors = [&](int stage, int kb) {
    const float* region = scales + stage * kScaleFloats;
    if constexpr (!kCopiedScales) {
      return *reinterpret_cast<const float2*>(region + scale_slot(tile_row));
    } else {
      const bool packed = args.scales.a_packed;
      uint32_t w0, w1;
      if constexpr (kScaleFeed == ScaleFeed::a_k_inner) {
        const int word = packed ? kb >> 2 : kb;
        const auto* words = reinterpret_cast<const uint32_t*>(
            scale_boxes + (word >> 2) % kScaleBoxSlots * (kScaleABoxBytes / 4));
        w0 = words[tile_row * 4 + (word & 3)];
        w1 = words[(tile_row + 8) * 4 + (word & 3)];
      } else {
        const auto* words = reinterpret_cast<const uint32_t*>(region);
        w0 = words[tile_row];
        w1 = words[tile_row + 8];
      }
      if (packed) {  // exponent byte kb % 4 of the word
        const int shift = (kb & 3) * 8;
        w0 = (w0 >> shift & 0xffu) << 23;
        w1 = (w1 >> shift & 0xffu) << 23;
      }
      const float* b_box = region + kScaleABoxBytes / 4;
      const int b_index = (args.b_scale_k_inner ? kb : nb) & (args.b_scale_lanes - 1);
      const uint32_t b_bf16 = reinterpret_cast<const uint16_t*>(b_box)[b_index];
      const float b = args.scales.b_bf16 ? __uint_as_float(b_bf16 << 16) : b_box[b_index];
      return make_float2(__uint_as_float(w0) * b, __uint_as_float(w1) * b);
    }
  };

  if constexpr (kOverlap) {
    // Two fragments take turns over groups of kOverlapGroup k-blocks: k-block i + 1's wgmma run
    // while i's products are scaled into acc, so the tensor cores wait only for the group's last
    // promotion. No wgmma is in flight across the loop's back edge: the copies that carry a
    // fragment around a loop read it, and ptxas then serializes every wgmma of the kernel.
    float part2[64];
    RingPosition ring;
    int stage1 = 0, stage2 = 0;
    float2 factors1{}, factors2{};
    const auto issue = [&](float(&fragment)[64], int& stage, float2& factors, int kb) {
      stage = ring.stage;
      sm90::mbarrier_wait(&full[stage], ring.phase);
      factors = stage_factors(stage, kb);
      issue_k_block<kBlockN>(fragment, a_half + stage * kStageBytes,
                             stages + stage * kStageBytes + kTileBytes);
      ring.advance();
    };
    // After its wgmma are done: releases the stage and scales the products into acc (not past
    // k_blocks).
    const auto promote = [&](float(&fragment)[64], int stage, float2 factors, int kb) {
#pragma unroll
      for (int i = 0; i < 64; ++i) sm90::fence_operand(fragment[i]);  // read after the wait
      release(stage);
      if (kb < k_blocks) promote_tile_fragment(acc, fragment, factors.x, factors.y);
    };
    static_assert(kOverlapGroup == 4, "the loop below takes four k-blocks a turn");
    for (int kb = 0; kb < slots; kb += kOverlapGroup) {
      issue(part, stage1, factors1, kb);
      issue(part2, stage2, factors2, kb + 1);
      sm90::wgmma_wait<1>();
      promote(part, stage1, factors1, kb);
      issue(part, stage1, factors1, kb + 2);
      sm90::wgmma_wait<1>();
      promote(part2, stage2, factors2, kb + 1);
      issue(part2, stage2, factors2, kb + 3);
      sm90::wgmma_wait<1>();
      promote(part, stage1, factors1, kb + 2);
      sm90::wgmma_wait<0>();
      promote(part2, stage2, factors2, kb + 3);
    }
  } else {
    RingPosition ring;
    for (int kb = 0; kb < k_blocks; ++kb, ring.advance()) {
      sm90::mbarrier_wait(&full[ring.stage], ring.phase);
      const float2 factors = stage_factors(ring.stage, kb);
      multiply_k_block<kBlockN>(part, a_half + ring.stage * kStageBytes,
                                stages + ring.stage * kStageBytes + kTileBytes);
      release(ring.stage);
      promote_tile_fragment(acc, part, factors.x, factors.y);
    }
  }
  // Pairs: this thread's last arrival on the peer is done; the peer may leave once all have said
  // so.
  if constexpr (kPair) sm90::cluster_arrive();

  const Epilogue& e = args.epilogue;
  const bool has_bias = e.bias_type != BiasType::none;
#pragma unroll
  for (int j = 0; j < kBlockN / 8; ++j) {
    const int col = n0 + 8 * j + 2 * (lane % 4);
    const float bias0 = has_bias && col < args.n ? bias_at(e, col) : 0.0f;
    const float bias1 = has_bias && col + 1 < args.n ? bias_at(e, col + 1) : 0.0f;
    if (row0 < args.m)
      store_pair(e, row0, col, args.n, acc[4 * j + 0] + bias0, acc[4 * j + 1] + bias1);
    if (row0 + 8 < args.m)
      store_pair(e, row0 + 8, col, args.n, acc[4 * j + 2] + bias0, acc[4 * j + 3] + bias1);
  }
  if constexpr (kPair) sm90::cluster_wait();
#else
  (void)a_map;
  (void)b_map;
  (void)args;
  (void)scale_maps;
#endif
}

// ---- The swap kernel (M <= 128): weight rows on the wgmma M side, tokens on its N side.
//
// kRows = 128: each consumer warpgroup owns 64 weight rows and multiplies every k-block (a token
// tile serves 128 rows). kRows = 64: both warpgroups share 64 rows and take alternate k-blocks,
// adding through shared memory at the end (twice the CTAs per weight: for grids that clusters of
// 4 or 8 would not fit in one wave).
//
// kCoResident: registers for two CTAs per SM (no register reallocation; for kTokens <= 16, whose
// accumulators are small), so that with PDL the next call's CTAs become resident beside this
// call's and fill their rings while it finishes.

constexpr int kMaxSplits = 8;        // portable cluster size
constexpr int kMaxFusedTokens = 16;  // token tiles the fused linear layer is built for
// Tokens up to which the fused linear layer is faster even where the ring does not hold a CTA's
// k-range (see w8a8_linear_sm90_fused_supports).
constexpr int kMaxTokensPastTheRing = 4;

// kQuantizeX: the token tiles are not copied into the ring but quantized from bf16 x by the
// consumers into a region of their own, one tile per k-block of the CTA's range.
template <int kTokens, int kRows, bool kQuantizeX>
struct Swap {
  static constexpr int kWeightBytes = kRows * kBlockK;
  static constexpr int kTokenBytes = kTokens * kBlockK;  // >= 1024: tiles stay atom-aligned
  static constexpr int kStageBytes = kWeightBytes + (kQuantizeX ? 0 : kTokenBytes);
  static constexpr int kRegisters = kTokens / 2;  // accumulator floats per thread
  // After the main loop the stages hold each consumer thread's partial sums.
  static constexpr int kPartialBytes = kConsumers * kRegisters * kWarpgroup * 4;
  // The ring depth measured best where the weight loads wait for the previous kernel (v3): deeper
  // rings only delay the first wgmma then (8 -> 16 stages: 10.7 -> 12.0 us at M=1, K=7168).
  static constexpr int kLateStages = kTokens >= 128 ? 4 : kTokens >= 64 ? 6 : 8;
  static_assert(kRows == 64 || kRows == 128);
  // The fewest stages (even: see the kernel) that hold the partial sums.
  static int min_stages() {
    const int stages = std::max(2, (kPartialBytes + kStageBytes - 1) / kStageBytes);
    return (stages + 1) / 2 * 2;
  }
  // Threads whose sums go to rank 0 of a split (only warpgroup 0 when alternating).
  static constexpr int kSenders = kRows == 64 ? kWarpgroup : kConsumers * kWarpgroup;
  // Rank 0's inbox for the other ranks' sums (push_sums): [splits - 1][kRegisters / 4][kSenders]
  // float4s, so that a warp's 16-byte stores (and rank 0's loads) of one slot land on 512
  // consecutive bytes: no bank conflicts. ([sender][kRegisters] put a warp's stores kRegisters * 4
  // bytes apart: 8-way conflicts at 64 tokens, where pushed sums then lost 0.9 us at M=64.)
  static size_t inbox_bytes(int splits) {
    return static_cast<size_t>(splits - 1) * kSenders * kRegisters * 4;
  }
  // Shared memory: stages | token tiles [L] (kQuantizeX) | full, empty barriers, sums barrier |
  // a scales [L][kTokens] | b scales [L] | inbox (16-byte aligned).
  static size_t token_tile_bytes(int k_blocks_per_split) {
    return kQuantizeX ? static_cast<size_t>(k_blocks_per_split) * kTokenBytes : 0;
  }
  static size_t shared_bytes(int k_blocks_per_split, int stages, size_t inbox) {
    return kSharedAlign + static_cast<size_t>(stages) * (kStageBytes + 2 * sizeof(uint64_t)) +
           token_tile_bytes(k_blocks_per_split) + sizeof(uint64_t) +
           static_cast<size_t>(k_blocks_per_split) * (kTokens + 1) * 4 + 16 + inbox;
  }
};

#if MOEKIT_SM90A
// Ring position of a k-block: stage index and the parity of its use of that stage.
struct RingSlot {
  int stage = 0;
  uint32_t phase = 0;
  __device__ __forceinline__ void advance(int by, int stages) {
    stage += by;
    if (stage >= stages) {
      stage -= stages;
      phase ^= 1;
    }
  }
};

// The fused linear layer's token tiles, quantized by the consumer threads (`thread` 0..255) before
// their main loop: a group of the quantization (128 elements of a row) is exactly a k-block, so
// group g is token g % tokens of k-block g / tokens of the CTA's range. 8 lanes take a group, 16
// elements each (two chunks), reduce its amax with shuffles, write their 16 bytes into tile i, row
// `token`, where TMA's 128-byte swizzle would put them (16-byte unit u of row r at unit u ^ r % 8),
// and the group's scale into a_scales[i][token] (one lane). Columns past K are zeros. Batches of
// kBatch passes: every load of a batch is issued before any is quantized (these loads wait behind
// the weight stream, so one batch for the whole k-range where the registers allow).
template <int kTokens, int kBatch>
__device__ __forceinline__ void quantize_token_tiles(const GemmArgs& args, int t0, int kb_begin,
                                                     int count, uint8_t* token_tiles,
                                                     float* a_scales, int thread) {
  using Raw = RawChunk<Wide::bf16>;
  constexpr int kGroupLanes = kBlockK / (2 * kChunk);                    // 8
  constexpr int kGroupsPerPass = kConsumers * kWarpgroup / kGroupLanes;  // 32
  constexpr int kGroupsPerBatch = kBatch * kGroupsPerPass;
  const Activations& x = args.activations;
  const int lane = thread % kLanes, part = lane % kGroupLanes;
  const int tokens = min(kTokens, args.m - t0);
  const int groups = count * tokens;
  const int first = thread / kGroupLanes;
  // Passes past the last group are skipped whole (the same in every thread).
  auto load = [&](int base, Raw(&raw)[kBatch][2]) {
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      if (base + b * kGroupsPerPass >= groups) break;
      const int group = base + b * kGroupsPerPass + first;
      const int token = group % tokens, i = group / tokens;
      const int col = (kb_begin + i) * kBlockK + part * 2 * kChunk;
      const auto* row = static_cast<const uint16_t*>(x.x) + (t0 + token) * x.row_stride;
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const bool inside = group < groups && col + (c + 1) * kChunk <= x.k;
        const uint4 v = inside ? __ldg(reinterpret_cast<const uint4*>(row + col + c * kChunk))
                               : make_uint4(0, 0, 0, 0);
        raw[b][c].w[0] = v.x, raw[b][c].w[1] = v.y, raw[b][c].w[2] = v.z, raw[b][c].w[3] = v.w;
      }
    }
  };
  auto quantize = [&](int base, const Raw(&raw)[kBatch][2]) {
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      if (base + b * kGroupsPerPass >= groups) break;
      const int group = base + b * kGroupsPerPass + first;
      float amax = chunk_amax<Wide::bf16>(raw[b][1], chunk_amax<Wide::bf16>(raw[b][0], 0.0f));
#pragma unroll
      for (int offset = 1; offset < kGroupLanes; offset <<= 1)
        amax = fmaxf(amax, vendor::shfl_xor(amax, offset));
      if (group >= groups) continue;
      const float scale = group_scale(amax, x.eps, x.ue8m0);
      uint32_t words[4];
      with_divide(divisor_for(scale), [&](auto divide) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          float v[kChunk];
          decode_raw<Wide::bf16>(raw[b][c], v);
          words[2 * c] = e4m3x4(divide(v[0]), divide(v[1]), divide(v[2]), divide(v[3]));
          words[2 * c + 1] = e4m3x4(divide(v[4]), divide(v[5]), divide(v[6]), divide(v[7]));
        }
      });
      const int token = group % tokens, i = group / tokens;
      uint8_t* row = token_tiles + i * (kTokens * kBlockK) + token * kBlockK;
      *reinterpret_cast<uint4*>(row + (part ^ (token % 8)) * 16) =
          make_uint4(words[0], words[1], words[2], words[3]);
      if (part == 0) a_scales[i * kTokens + token] = scale;
    }
  };
  // Trip counts are the same in every lane of a warp: every lane reaches the shuffles.
  for (int base = 0; base < groups; base += kGroupsPerBatch) {
    Raw raw[kBatch][2];
    load(base, raw);
    quantize(base, raw);
  }
  sm90::fence_proxy_async_shared();  // the tiles are wgmma operands
}

// Rows past M of the fused linear layer's token tiles: zero bytes with scale 0, as the copy engine
// fills them for the GEMM (their sums are never stored). The consumer threads (`thread` 0..255)
// write them before waiting for the previous grid: they do not depend on it.
template <int kTokens>
__device__ __forceinline__ void zero_padding_rows(int tokens, int count, uint8_t* token_tiles,
                                                  float* a_scales, int thread) {
  const int padding = kTokens - tokens;
  const int per_tile = padding * (kBlockK / 16);  // 16-byte units
  for (int unit = thread; unit < count * per_tile; unit += kConsumers * kWarpgroup)
    *reinterpret_cast<uint4*>(token_tiles + unit / per_tile * (kTokens * kBlockK) +
                              tokens * kBlockK + unit % per_tile * 16) = make_uint4(0, 0, 0, 0);
  for (int j = thread; j < count * padding; j += kConsumers * kWarpgroup)
    a_scales[j / padding * kTokens + tokens + j % padding] = 0.0f;
}
#endif

// ---- Phase stamps (builds with MOEKIT_FP8_TRACE only; see Sm90TracePhase in fp8_gemm_sm90.h).
// Each CTA keeps its stamps in shared memory; thread 0 takes a ticket (a global counter: the
// order of entry, so ticket / grid size is the call) as it enters and writes the record as it
// leaves. Without MOEKIT_FP8_TRACE the macros below are empty and the kernels hold none of this.
#ifdef MOEKIT_FP8_TRACE
constexpr int kTraceCapacity = 32768;  // records: 256 calls of 128 CTAs
__device__ Sm90TraceRecord trace_records[kTraceCapacity];
__device__ uint32_t trace_ticket;

#if MOEKIT_SM90A
struct TraceCta {
  uint64_t time_ns[kSm90TracePhases];
  uint64_t cycles[kSm90TracePhases];
  float sink;
};

__device__ __forceinline__ void trace_stamp(TraceCta& cta, Sm90TracePhase phase) {
  volatile TraceCta& v = cta;
  const int p = static_cast<int>(phase);
  v.time_ns[p] = vendor::global_timer_ns();
  v.cycles[p] = vendor::sm_cycles();
}

// Stamps `phase` once every value of `values` has arrived: their sum goes to shared memory first
// (the adds and loads before a stamp may otherwise complete after it).
template <int N>
__device__ __forceinline__ void trace_stamp_after(TraceCta& cta, Sm90TracePhase phase,
                                                  const float (&values)[N]) {
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < N; ++i) sum += values[i];
  static_cast<volatile TraceCta&>(cta).sink = sum;
  trace_stamp(cta, phase);
}

// Thread 0, first thing: the entry stamp, the other stamps cleared, the ticket requested (kept in
// a register and only read at the end, so the atomic's round trip delays nothing before that).
__device__ __forceinline__ uint32_t trace_enter(TraceCta& cta) {
  trace_stamp(cta, Sm90TracePhase::entry);
  volatile TraceCta& v = cta;
  for (int p = 1; p < kSm90TracePhases; ++p) {
    v.time_ns[p] = 0;
    v.cycles[p] = 0;
  }
  return atomicAdd(&trace_ticket, 1u);
}

// Thread 0, last thing: the exit stamp and the record.
__device__ __forceinline__ void trace_leave(TraceCta& cta, uint32_t ticket, uint32_t rank) {
  trace_stamp(cta, Sm90TracePhase::exit);
  const volatile TraceCta& v = cta;
  if (ticket >= kTraceCapacity) return;
  Sm90TraceRecord& r = trace_records[ticket];
  for (int p = 0; p < kSm90TracePhases; ++p) {
    r.time_ns[p] = v.time_ns[p];
    r.cycles[p] = v.cycles[p];
  }
  r.ticket = ticket;
  r.grid_ctas = gridDim.x * gridDim.y;
  r.block_x = blockIdx.x;
  r.block_y = blockIdx.y;
  r.rank = rank;
  r.sm = vendor::sm_id();
}

// One thread of the producer warpgroup's idle warps, where the weights load early: spins (with
// short sleeps, at most 40 us) until the last 16 bytes of stage 0's weight tile, cleared by
// thread 0 before the copy was issued, turn nonzero. A diagnosis only: random fp8 weights are
// nonzero there; all-zero bytes would read as "not seen" (0).
__device__ __forceinline__ void trace_weights_landed(TraceCta& cta, const uint8_t* tile_end) {
  const volatile uint4* word = reinterpret_cast<const volatile uint4*>(tile_end - 16);
  const uint64_t start = vendor::global_timer_ns();
  while (true) {
    const uint4 v = make_uint4(word->x, word->y, word->z, word->w);
    if ((v.x | v.y | v.z | v.w) != 0) {
      trace_stamp(cta, Sm90TracePhase::first_weights_landed);
      return;
    }
    if (vendor::global_timer_ns() - start > 40000) return;
    __nanosleep(20);
  }
}
#endif
#define MOEKIT_SWAP_TRACE(...) __VA_ARGS__
#else
#define MOEKIT_SWAP_TRACE(...)
#endif

template <int kTokens, int kRows, bool kCoResident, bool kQuantizeX>
__global__ void __launch_bounds__(kThreads, kCoResident ? 2 : 1)
    gemm_swap_kernel(const __grid_constant__ CUtensorMap w_map,
                     const __grid_constant__ CUtensorMap x_map, const GemmArgs args) {
#if MOEKIT_SM90A
  using Config = Swap<kTokens, kRows, kQuantizeX>;
  constexpr bool kAlternate = kRows == 64;
  constexpr int kRegisters = Config::kRegisters;
  extern __shared__ uint8_t shared_raw[];
  const int stage_count = args.stages;
  const int splits = args.splits;
  // The same offsets in every CTA (the largest count: the first ranks may hold one k-block less).
  const int max_count = (args.k_blocks + splits - 1) / splits;
  uint8_t* stages = align_shared(shared_raw);
  uint8_t* token_tiles = stages + stage_count * Config::kStageBytes;  // kQuantizeX
  auto* full =
      reinterpret_cast<uint64_t*>(token_tiles + (kQuantizeX ? max_count * Config::kTokenBytes : 0));
  uint64_t* empty = full + stage_count;
  uint64_t* sums_ready = empty + stage_count;                 // push_sums, in rank 0
  auto* a_scales = reinterpret_cast<float*>(sums_ready + 1);  // [L][kTokens]

  const int warpgroup = static_cast<int>(threadIdx.x) / kWarpgroup;
  const int split = splits > 1 ? static_cast<int>(sm90::cluster_rank()) : 0;
  const int n0 = static_cast<int>(blockIdx.x) / splits * kRows;
  const int t0 = static_cast<int>(blockIdx.y) * kTokens;
  const int kb_begin = static_cast<int>(static_cast<int64_t>(split) * args.k_blocks / splits);
  const int kb_end = static_cast<int>(static_cast<int64_t>(split + 1) * args.k_blocks / splits);
  const int count = kb_end - kb_begin;  // >= 1: the host keeps splits <= k_blocks
  float* b_scales = a_scales + count * kTokens;
  auto* inbox = reinterpret_cast<float*>(
      (reinterpret_cast<uintptr_t>(a_scales + max_count * (kTokens + 1)) + 15) / 16 * 16);
  const bool push = splits > 1 && args.push_sums;
  MOEKIT_SWAP_TRACE(__shared__ TraceCta trace_cta; uint32_t trace_ticket_of_cta = 0);
  MOEKIT_SWAP_TRACE(const auto stamp = [&](Sm90TracePhase p) { trace_stamp(trace_cta, p); });

  if (threadIdx.x == 0) {
    MOEKIT_SWAP_TRACE(trace_ticket_of_cta = trace_enter(trace_cta));
    MOEKIT_SWAP_TRACE(if (args.early_weights) {
      *reinterpret_cast<uint4*>(stages + Config::kWeightBytes - 16) = make_uint4(0, 0, 0, 0);
      sm90::fence_proxy_async_shared();
    });
    for (int s = 0; s < stage_count; ++s) {
      sm90::mbarrier_init(&full[s], 1);
      // Alternating: local k-block i uses stage i % stages and warpgroup i % 2; the stage count is
      // even, so a stage always belongs to one warpgroup. Else both warpgroups read every stage.
      sm90::mbarrier_init(&empty[s], (kAlternate ? 1 : kConsumers) * 4);  // lane 0 of each warp
    }
    sm90::mbarrier_init(sums_ready, max(1, (splits - 1) * Config::kSenders));
    sm90::fence_barrier_init();
  }
  __syncthreads();
  // push_sums: every thread arrives now and waits before its CTA's sums move, so that rank 0's
  // barrier is initialized before any other rank arrives on it.
  if (push) sm90::cluster_arrive();
  vendor::allow_next_grid();  // the next kernel may set up while this one runs

  if (warpgroup == kConsumers) {
    // Measured without register reallocation where the consumers quantize (all keep the launch's).
    if constexpr (!kCoResident && !kQuantizeX) sm90::registers_shrink<kProducerRegisters>();
    if (threadIdx.x == kConsumers * kWarpgroup) {
      if constexpr (kQuantizeX) {
        // This CTA's x rows into L2 ahead of the weights (each row's k-range is contiguous).
        const Activations& x = args.activations;
        const int tokens = min(kTokens, args.m - t0);
        const int col_end = min(kb_end * kBlockK, x.k);
        for (int r = 0; r < tokens; ++r)
          sm90::bulk_prefetch_l2(
              static_cast<const uint16_t*>(x.x) + (t0 + r) * x.row_stride + kb_begin * kBlockK,
              static_cast<uint32_t>(col_end - kb_begin * kBlockK) * 2);
      }
      sm90::prefetch_tensor_map(&w_map);
      if constexpr (!kQuantizeX) sm90::prefetch_tensor_map(&x_map);
      const int first = min(count, stage_count);
      int i = 0;
      if (args.early_weights) {
        // The weights are not the previous kernel's output (the host's promise, b_static): the
        // first tiles go straight into the ring while it finishes; the token tiles only after.
        const int first_early = min(first, args.early_tiles);
        for (int j = 0; j < first_early; ++j) {
          sm90::mbarrier_arrive_expect_tx(&full[j], Config::kStageBytes);
          sm90::tma_load_2d(stages + j * Config::kStageBytes, &w_map, &full[j],
                            (kb_begin + j) * kBlockK, n0);
        }
        vendor::wait_for_previous_grid();
        MOEKIT_SWAP_TRACE(stamp(Sm90TracePhase::producer_waited));
        if constexpr (!kQuantizeX) {
          for (int j = 0; j < first_early; ++j)
            sm90::tma_load_2d(stages + j * Config::kStageBytes + Config::kWeightBytes, &x_map,
                              &full[j], (kb_begin + j) * kBlockK, t0);
        }
        i = first_early;
      } else {
        // The first weight tiles into L2 while the previous kernel finishes; then wait for it.
        for (int j = 0; j < first; ++j) sm90::tma_prefetch_2d(&w_map, (kb_begin + j) * kBlockK, n0);
        vendor::wait_for_previous_grid();
        MOEKIT_SWAP_TRACE(stamp(Sm90TracePhase::producer_waited));
      }
      RingSlot slot;
      slot.advance(i, stage_count);  // i is 0 or at most one lap
      for (; i < count; ++i, slot.advance(1, stage_count)) {
        sm90::mbarrier_wait(&empty[slot.stage], slot.phase ^ 1);
        uint8_t* stage = stages + slot.stage * Config::kStageBytes;
        const int k = (kb_begin + i) * kBlockK;
        sm90::mbarrier_arrive_expect_tx(&full[slot.stage], Config::kStageBytes);
        sm90::tma_load_2d(stage, &w_map, &full[slot.stage], k, n0);
        if constexpr (!kQuantizeX)
          sm90::tma_load_2d(stage + Config::kWeightBytes, &x_map, &full[slot.stage], k, t0);
      }
      MOEKIT_SWAP_TRACE(stamp(Sm90TracePhase::last_issued));
    }
    MOEKIT_SWAP_TRACE(else if (threadIdx.x == kConsumers * kWarpgroup + 32 && args.early_weights) {
      trace_weights_landed(trace_cta, stages + Config::kWeightBytes);
    });
    __syncwarp();
    if (push) {
      sm90::cluster_wait();
    } else if (splits > 1) {  // the consumers' two cluster barriers
      sm90::cluster_sync();
      sm90::cluster_sync();
    }
    return;
  }

  if constexpr (!kCoResident && !kQuantizeX) sm90::registers_grow<kConsumerRegisters>();
  const int t = static_cast<int>(threadIdx.x) % kWarpgroup;
  const int warp = t / 32, lane = t % 32;
  const int consumer_thread = static_cast<int>(threadIdx.x);  // 0..255
  // Before the wait, what does not depend on the previous kernel: the weight scales, where the
  // host promises static weights (as for the early weight tiles), and the launch arguments read
  // after it (vendor::wait_for_previous_grid_after: their constant-cache misses then overlap the
  // previous grid's tail instead of adding to this call's chain).
  // Each thread's first weight scale stays in a register until the activation scales' loads after
  // the wait are issued: storing it at once would hold the thread at its load, before the wait.
  float held_b_scale = 0.0f;
  if (args.early_weights) {
    if (consumer_thread < count)
      held_b_scale = b_scale(args.scales, n0 / kFp8BlockSize, kb_begin + consumer_thread);
    for (int i = consumer_thread + kConsumers * kWarpgroup; i < count; i += kConsumers * kWarpgroup)
      b_scales[i] = b_scale(args.scales, n0 / kFp8BlockSize, kb_begin + i);
  }
  if constexpr (kQuantizeX) {
    zero_padding_rows<kTokens>(min(kTokens, args.m - t0), count, token_tiles, a_scales,
                               consumer_thread);
    sm90::fence_proxy_async_shared();  // the tiles are wgmma operands
  }
  const auto word = [](auto v) { return static_cast<uint32_t>(v); };
  vendor::wait_for_previous_grid_after(
      word(reinterpret_cast<uintptr_t>(args.scales.a)) ^ word(args.scales.a_row_stride) ^
      word(args.scales.a_group_stride) ^ word(args.scales.a_packed) ^
      word(reinterpret_cast<uintptr_t>(args.epilogue.out)) ^ word(args.epilogue.out_row_stride) ^
      word(args.epilogue.out_type) ^ word(args.epilogue.out_pairs) ^
      word(reinterpret_cast<uintptr_t>(args.epilogue.bias)) ^ word(args.epilogue.bias_stride) ^
      word(args.epilogue.bias_type) ^ word(args.m) ^ word(args.n) ^ word(args.push_sums));
  MOEKIT_SWAP_TRACE(if (threadIdx.x == 0) stamp(Sm90TracePhase::consumer_waited));

  if constexpr (kQuantizeX) {
    // The k-range's token tiles and scales, while the weight tiles arrive; 8 passes of 32 groups
    // (all of a 16-token tile over 14 k-blocks) in one batch where the registers allow.
    quantize_token_tiles<kTokens, kCoResident ? 4 : 8>(args, t0, kb_begin, count, token_tiles,
                                                       a_scales, consumer_thread);
  } else {
    // All scales of this CTA's k-range into shared memory, while the first tiles arrive: a batch
    // of independent loads per thread, then the stores (one memory latency, not one per element).
    constexpr int kScaleBatch = 8;
    const int scale_count = count * kTokens;
    for (int base = consumer_thread; base < scale_count;
         base += kScaleBatch * kConsumers * kWarpgroup) {
      float value[kScaleBatch];
#pragma unroll
      for (int j = 0; j < kScaleBatch; ++j) {
        const int i = base + j * kConsumers * kWarpgroup;
        const int token = min(t0 + i % kTokens, args.m - 1);
        value[j] = i < scale_count ? a_scale(args.scales, token, kb_begin + i / kTokens) : 0.0f;
      }
#pragma unroll
      for (int j = 0; j < kScaleBatch; ++j) {
        const int i = base + j * kConsumers * kWarpgroup;
        if (i < scale_count) a_scales[i] = value[j];
      }
    }
  }
  if (!args.early_weights) {
    for (int i = consumer_thread; i < count; i += kConsumers * kWarpgroup)
      b_scales[i] = b_scale(args.scales, n0 / kFp8BlockSize, kb_begin + i);
  } else if (consumer_thread < count) {
    b_scales[consumer_thread] = held_b_scale;
  }
  sm90::named_barrier(1, kConsumers * kWarpgroup);
  MOEKIT_SWAP_TRACE(if (threadIdx.x == 0) stamp(Sm90TracePhase::scales_staged));

  float acc[kRegisters], part[kRegisters];
#pragma unroll
  for (int i = 0; i < kRegisters; ++i) acc[i] = 0.0f;
  const int row_offset = kAlternate ? 0 : warpgroup * 64 * kBlockK;
  RingSlot slot;
  if (kAlternate) slot.advance(warpgroup, stage_count);
  const int step = kAlternate ? kConsumers : 1;
  for (int i = kAlternate ? warpgroup : 0; i < count; i += step, slot.advance(step, stage_count)) {
    sm90::mbarrier_wait(&full[slot.stage], slot.phase);
    MOEKIT_SWAP_TRACE(if (threadIdx.x == 0 && i == 0) stamp(Sm90TracePhase::first_stage_full));
    const uint8_t* stage = stages + slot.stage * Config::kStageBytes;
    const uint8_t* token_tile =
        kQuantizeX ? token_tiles + i * Config::kTokenBytes : stage + Config::kWeightBytes;
    multiply_k_block<kTokens>(part, stage + row_offset, token_tile);
    if (lane == 0) sm90::mbarrier_arrive(&empty[slot.stage]);

    const float sb = b_scales[i];
    const float* sa = a_scales + i * kTokens + 2 * (lane % 4);
#pragma unroll
    for (int j = 0; j < kTokens / 8; ++j) {
      const float2 a = *reinterpret_cast<const float2*>(sa + 8 * j);
      const float scale0 = sb * a.x, scale1 = sb * a.y;
      acc[4 * j + 0] += part[4 * j + 0] * scale0;
      acc[4 * j + 1] += part[4 * j + 1] * scale1;
      acc[4 * j + 2] += part[4 * j + 2] * scale0;
      acc[4 * j + 3] += part[4 * j + 3] * scale1;
    }
  }

  MOEKIT_SWAP_TRACE(if (t == 0 && warpgroup == (kAlternate ? (count - 1) % 2 : 0))
                        trace_stamp_after(trace_cta, Sm90TracePhase::last_consumed, acc));
  // The stages are idle once both warpgroups are past their last k-block (every copy landed,
  // every wgmma finished): they hold partial sums, slot r of thread t at r * 128 + t.
  // Alternating: warpgroup 1's sums into warpgroup 0 (same fragment slots), which goes on alone.
  float* partial =
      reinterpret_cast<float*>(stages) + (kAlternate ? 0 : warpgroup * kRegisters * kWarpgroup);
  if (kAlternate || (splits > 1 && !push)) sm90::named_barrier(1, kConsumers * kWarpgroup);
  if constexpr (kAlternate) {
    if (warpgroup == 1) {
#pragma unroll
      for (int r = 0; r < kRegisters; ++r) partial[r * kWarpgroup + t] = acc[r];
    }
    sm90::named_barrier(1, kConsumers * kWarpgroup);
    if (warpgroup == 0) {
#pragma unroll
      for (int r = 0; r < kRegisters; ++r) acc[r] += partial[r * kWarpgroup + t];
    }
  }
  const bool sums_here = !kAlternate || warpgroup == 0;  // this thread holds sums to pass on
  const bool stores = split == 0 && sums_here;
  if (push) {
    // Each other rank stores its sums into rank 0's inbox and arrives on its barrier (release);
    // rank 0 adds them in rank order: the same order, so the same bits, as the pull below.
    const int sender = kAlternate ? t : consumer_thread;
    sm90::cluster_wait();  // rank 0's barrier is initialized
    if (split != 0) {
      if (sums_here) {
        float* slot = inbox + ((split - 1) * kRegisters * Config::kSenders + 4 * sender);
#pragma unroll
        for (int r = 0; r < kRegisters; r += 4)
          sm90::store_shared_remote(slot + r * Config::kSenders, 0, acc[r], acc[r + 1], acc[r + 2],
                                    acc[r + 3]);
        sm90::mbarrier_arrive_remote(sums_ready, 0);
      }
      MOEKIT_SWAP_TRACE(if (threadIdx.x == 0) {
        trace_stamp_after(trace_cta, Sm90TracePhase::sums_done, acc);
        trace_leave(trace_cta, trace_ticket_of_cta, split);
      });
      return;
    }
    if (stores) {
      sm90::mbarrier_wait_cluster(sums_ready, 0);
      for (int rank = 1; rank < splits; ++rank) {
        const float* slot = inbox + ((rank - 1) * kRegisters * Config::kSenders + 4 * sender);
#pragma unroll
        for (int r = 0; r < kRegisters; r += 4) {
          const float4 v = *reinterpret_cast<const float4*>(slot + r * Config::kSenders);
          acc[r] += v.x;
          acc[r + 1] += v.y;
          acc[r + 2] += v.z;
          acc[r + 3] += v.w;
        }
      }
    }
  } else if (splits > 1) {
    if (split != 0 && sums_here) {
#pragma unroll
      for (int r = 0; r < kRegisters; ++r) partial[r * kWarpgroup + t] = acc[r];
    }
    sm90::cluster_sync();  // every CTA's sums are in its shared memory
    if (stores) {
      for (int rank = 1; rank < splits; ++rank) {
#pragma unroll
        for (int r = 0; r < kRegisters; ++r)
          acc[r] += sm90::load_shared_remote(&partial[r * kWarpgroup + t], rank);
      }
      // The other CTAs may leave once these reads are done; the stores need not wait for them.
      sm90::cluster_arrive();
    } else {
      sm90::cluster_sync();  // keeps this CTA (its shared memory) alive until read
    }
  }
  MOEKIT_SWAP_TRACE(if (threadIdx.x == 0)
                        trace_stamp_after(trace_cta, Sm90TracePhase::sums_done, acc));
  if (!stores) {
    MOEKIT_SWAP_TRACE(if (threadIdx.x == 0) trace_leave(trace_cta, trace_ticket_of_cta, split));
    return;
  }

  const Epilogue& e = args.epilogue;
  const int row0 = n0 + (kAlternate ? 0 : warpgroup * 64) + warp * 16 + lane / 4;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int n = row0 + 8 * h;
    if (n >= args.n) continue;
    const float bias = e.bias_type != BiasType::none ? bias_at(e, n) : 0.0f;
#pragma unroll
    for (int j = 0; j < kTokens / 8; ++j) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int token = t0 + 8 * j + 2 * (lane % 4) + c;
        if (token < args.m)
          store_one(e, token * e.out_row_stride + n, acc[4 * j + 2 * h + c] + bias);
      }
    }
  }
  MOEKIT_SWAP_TRACE(if (threadIdx.x == 0) stamp(Sm90TracePhase::stores_issued));
  if (splits > 1 && !push) sm90::cluster_wait();  // completes this thread's arrival above
  MOEKIT_SWAP_TRACE(if (threadIdx.x == 0) trace_leave(trace_cta, trace_ticket_of_cta, split));
#else
  (void)w_map;
  (void)x_map;
  (void)args;
#endif
}

// ---- Host side.

using EncodeTiled = PFN_cuTensorMapEncodeTiled_v12000;

// cuTensorMapEncodeTiled from the driver the runtime loaded (null where it has none).
EncodeTiled encode_tiled() {
  static const EncodeTiled fn = [] {
    void* entry = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    const cudaError_t status = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &entry,
                                                                12000, cudaEnableDefault, &found);
    if (status != cudaSuccess || found != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      return static_cast<EncodeTiled>(nullptr);
    }
    return reinterpret_cast<EncodeTiled>(entry);
  }();
  return fn;
}

// A [rows, cols] byte matrix (row stride in bytes) read in boxes of box_rows x 128 bytes with
// 128-byte swizzle; out-of-bounds elements read as zeros. l2_promotion: the L2 line size each
// box row's request is widened to (0 none, 1..3 64, 128, 256 bytes).
CUtensorMap make_tile_map(const char* name, const void* base, int64_t rows, int64_t cols,
                          int64_t row_stride, int box_rows, int l2_promotion = 3) {
  const CUtensorMapL2promotion promotions[4] = {
      CU_TENSOR_MAP_L2_PROMOTION_NONE, CU_TENSOR_MAP_L2_PROMOTION_L2_64B,
      CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B};
  CUtensorMap map{};
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  // A single row has no meaningful stride: any multiple of 16 past the row will do.
  const int64_t stride = rows > 1 ? row_stride : (cols + 15) / 16 * 16;
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(stride)};
  const cuuint32_t box[2] = {kBlockK, static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult status = encode_tiled()(
      &map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<void*>(base), dims, strides, box,
      element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
      promotions[l2_promotion], CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (status != CUDA_SUCCESS)
    fail(kOp, std::string(name) + " tensor map", "CUresult " + std::to_string(status),
         "cuTensorMapEncodeTiled failed");
  return map;
}

// A [outer, inner] matrix of 2- or 4-byte elements read in unswizzled boxes of box_inner x
// box_outer (box_inner x element = 16 bytes); out-of-bounds elements read as zeros.
CUtensorMap make_scale_map(const char* name, const void* base, int element_bytes, int64_t inner,
                           int64_t outer, int64_t outer_stride_bytes, int box_inner,
                           int box_outer) {
  CUtensorMap map{};
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(inner), static_cast<cuuint64_t>(outer)};
  const int64_t stride = outer > 1 ? outer_stride_bytes : (inner * element_bytes + 15) / 16 * 16;
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(stride)};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(box_inner),
                             static_cast<cuuint32_t>(box_outer)};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult status = encode_tiled()(
      &map, element_bytes == 2 ? CU_TENSOR_MAP_DATA_TYPE_UINT16 : CU_TENSOR_MAP_DATA_TYPE_UINT32, 2,
      const_cast<void*>(base), dims, strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
      CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_NONE,
      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (status != CUDA_SUCCESS)
    fail(kOp, std::string(name) + " tensor map", "CUresult " + std::to_string(status),
         "cuTensorMapEncodeTiled failed");
  return map;
}

// How the tiles kernel gets its scales for p: copied with the tiles (TMA) where both scale
// tensors have a unit-stride dimension, a 16-byte aligned start and other strides of whole 16
// bytes; else written by the scale warps. b_k_inner: the weight scales' unit stride runs along K.
tiles::ScaleFeed tiles_scale_feed(const BlockGemmProblem& p, bool& b_k_inner) {
  using tiles::ScaleFeed;
  const auto aligned = [](const void* q) { return reinterpret_cast<uintptr_t>(q) % 16 == 0; };
  const auto boxable = [](int64_t count, int64_t stride_bytes) {
    return count == 1 || (stride_bytes % 16 == 0 && stride_bytes < (int64_t{1} << 40));
  };
  if (!aligned(p.a_scales.data()) || !aligned(p.b_scales.data())) return ScaleFeed::warps;
  const int64_t n_blocks = fp8::ceil_div(p.n, kFp8BlockSize);
  const int64_t b_bytes = p.b_scales.dtype() == DType::bf16 ? 2 : 4;
  if (p.b_scales.stride(1) == 1 && boxable(n_blocks, p.b_scales.stride(0) * b_bytes))
    b_k_inner = true;
  else if (p.b_scales.stride(0) == 1 && boxable(p.k_blocks, p.b_scales.stride(1) * b_bytes))
    b_k_inner = false;
  else
    return ScaleFeed::warps;
  const ScaleAddressing& at = p.a_scale_at;
  const int64_t words = at.packed() ? fp8::ceil_div(p.k_blocks, 4) : p.k_blocks;
  if (at.group_stride == 1 && boxable(p.m, at.row_stride * 4)) return ScaleFeed::a_k_inner;
  if (at.row_stride == 1 && boxable(words, at.group_stride * 4)) return ScaleFeed::a_m_inner;
  return ScaleFeed::warps;
}

// The tiles kernel's scale maps for the plan's feed (zeros for the scale warps).
ScaleMaps scale_maps_of(const BlockGemmProblem& p, tiles::ScaleFeed feed, bool b_k_inner) {
  using tiles::ScaleFeed;
  ScaleMaps maps{};
  if (feed == ScaleFeed::warps) return maps;
  const ScaleAddressing& at = p.a_scale_at;
  const int64_t words = at.packed() ? fp8::ceil_div(p.k_blocks, 4) : p.k_blocks;
  if (feed == ScaleFeed::a_k_inner)
    maps.a = make_scale_map("a_scales", p.a_scales.data(), 4, words, p.m, at.row_stride * 4, 4,
                            tiles::kBlockM);
  else
    maps.a = make_scale_map("a_scales", p.a_scales.data(), 4, p.m, words, at.group_stride * 4,
                            tiles::kBlockM, 1);
  const int b_bytes = p.b_scales.dtype() == DType::bf16 ? 2 : 4;
  const int64_t n_blocks = fp8::ceil_div(p.n, kFp8BlockSize);
  if (b_k_inner)
    maps.b = make_scale_map("b_scales", p.b_scales.data(), b_bytes, p.k_blocks, n_blocks,
                            p.b_scales.stride(0) * b_bytes, 16 / b_bytes, 1);
  else
    maps.b = make_scale_map("b_scales", p.b_scales.data(), b_bytes, n_blocks, p.k_blocks,
                            p.b_scales.stride(1) * b_bytes, 16 / b_bytes, 1);
  return maps;
}

GemmArgs args_of(const BlockGemmProblem& p) {
  GemmArgs g{};
  g.scales.a = p.a_scales.data();
  g.scales.a_row_stride = p.a_scale_at.row_stride;
  g.scales.a_group_stride = p.a_scale_at.group_stride;
  g.scales.a_packed = p.a_scale_at.packed();
  g.scales.b = p.b_scales.data();
  g.scales.b_row_stride = p.b_scales.stride(0);
  g.scales.b_col_stride = p.b_scales.stride(1);
  g.scales.b_bf16 = p.b_scales.dtype() == DType::bf16;
  Epilogue& e = g.epilogue;
  e.out = p.out.data();
  e.out_row_stride = p.out.stride(0);
  e.out_type = p.out.dtype() == DType::f32    ? OutType::f32
               : p.out.dtype() == DType::bf16 ? OutType::bf16
                                              : OutType::f16;
  const auto element = static_cast<int64_t>(dtype_size(p.out.dtype()));
  e.out_pairs = reinterpret_cast<uintptr_t>(p.out.data()) % (2 * element) == 0 &&
                (p.m <= 1 || p.out.stride(0) % 2 == 0);
  if (p.has_bias()) {
    e.bias = p.bias.data();
    e.bias_stride = p.bias.stride(0);
    e.bias_type = p.bias.dtype() == DType::f32    ? BiasType::f32
                  : p.bias.dtype() == DType::bf16 ? BiasType::bf16
                                                  : BiasType::f16;
  }
  g.m = static_cast<int>(p.m);
  g.n = static_cast<int>(p.n);
  g.k_blocks = static_cast<int>(p.k_blocks);
  return g;
}

using KernelFn = void (*)(CUtensorMap, CUtensorMap, GemmArgs);
using TilesKernelFn = void (*)(CUtensorMap, CUtensorMap, GemmArgs, ScaleMaps);

// The launch plan for a problem: which kernel, grid, cluster and shared memory.
struct Plan {
  KernelFn kernel = nullptr;  // swap
  TilesKernelFn tiles_kernel = nullptr;
  bool swap = false;
  int tokens = 0;  // swap: tokens per CTA (the wgmma N)
  int rows = 0;    // swap: weight rows per CTA
  int splits = 1;
  int cluster_capacity = 0;  // swap: clusters of `splits` CTAs resident at once
  int stages = 0;            // swap: ring depth
  bool early_weights = false;
  bool co_resident = false;  // swap: the kernel built for two CTAs per SM
  bool push_sums = false;
  int early_tiles = 0;              // swap, early_weights: weight tiles loaded before the wait
  int weight_promotion = 0;         // swap: the weight map's L2 promotion (0 none, 1..3 64..256 B)
  bool ring_holds_k_range = false;  // swap: every k-block of a CTA has its own stage
  bool overlap = false;             // tiles: k-block i + 1's wgmma run during i's promotion
  tiles::ScaleFeed scale_feed = tiles::ScaleFeed::warps;  // tiles
  bool pair = false;             // tiles: clusters of two CTAs sharing B tiles (splits = 2)
  bool b_scale_k_inner = false;  // tiles, copied scales: the weight-scale map's inner dimension
  dim3 grid;
  size_t shared_bytes = 0;
};

// How many clusters of `splits` CTAs of this kernel fit on the device at once (cached).
int cluster_capacity(KernelFn kernel, int splits, size_t shared_bytes, int device) {
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, size_t, int>, int> cache;
  const auto key =
      std::make_tuple(reinterpret_cast<const void*>(kernel), splits, shared_bytes, device);
  std::lock_guard<std::mutex> lock(mutex);
  if (auto it = cache.find(key); it != cache.end()) return it->second;
  MOEKIT_GPU_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(shared_bytes)));
  int capacity = 0;
  if (splits == 1) {
    MOEKIT_GPU_CHECK(
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&capacity, kernel, kThreads, shared_bytes));
    capacity *= device_properties(device).sm_count;
  } else {
    cudaLaunchConfig_t config{};
    config.gridDim = dim3(static_cast<unsigned>(splits));
    config.blockDim = dim3(kThreads);
    config.dynamicSmemBytes = shared_bytes;
    cudaLaunchAttribute attribute{};
    attribute.id = cudaLaunchAttributeClusterDimension;
    attribute.val.clusterDim.x = static_cast<unsigned>(splits);
    attribute.val.clusterDim.y = 1;
    attribute.val.clusterDim.z = 1;
    config.attrs = &attribute;
    config.numAttrs = 1;
    MOEKIT_GPU_CHECK(cudaOccupancyMaxActiveClusters(&capacity, kernel, &config));
  }
  cache.emplace(key, capacity);
  return capacity;
}

// MOEKIT_SM90_SWAP="rows,splits" forces the swap layout (for timing experiments only).
// Read at every plan, not once: the GPU tests set it per scope.
bool forced_swap(int& rows, int& splits) {
  return std::sscanf(env::text("MOEKIT_SM90_SWAP").c_str(), "%d,%d", &rows, &splits) == 2;
}

// Estimated microseconds of one wave of swap CTAs, each multiplying `k_blocks` k-blocks of `rows`
// weight rows by `tokens` tokens with `active` CTAs streaming at once. Fitted on an H200 (see
// docs/perf/fp8-gpu-sm90.md): a fixed 3.5 us per wave, then the larger of the CTA's bytes (token
// tiles count half: they come from L2) over its share of 4 TB/s, at most 50 GB/s per SM, and its
// tensor work at half the fp8 rate (each k-block waits for its wgmma before the promotion).
double swap_wave_us(int rows, int tokens, int k_blocks, int64_t active) {
  constexpr double kFixedUs = 3.5, kBandwidth = 4.0e12, kPerSmBandwidth = 50e9;
  constexpr double kTensorFlopsPerSm = 4096 * 1.9e9 * 0.5;
  const double bytes = static_cast<double>(k_blocks) * kBlockK * (rows + tokens / 2.0);
  const double bandwidth = std::min(kPerSmBandwidth, kBandwidth / static_cast<double>(active));
  const double flops = 2.0 * rows * tokens * kBlockK * k_blocks;
  return kFixedUs + 1e6 * std::max(bytes / bandwidth, flops / kTensorFlopsPerSm);
}

// Swap-kernel choices besides the layout, each measured on an H200 (docs/perf/fp8-gpu-sm90.md,
// v4): weight tiles into the ring before the previous kernel ends (where B is static), a ring of up
// to 16 stages (no deeper than the CTA's k-blocks), and for token tiles of 16 or fewer split sums
// pushed to rank 0 and the two-CTAs-per-SM build where the whole k-range of a CTA fits its ring (so
// the next call's CTAs load all their weights while this one runs). The environment overrides each,
// for timing experiments only: MOEKIT_SM90_STAGES=n (n > 0), MOEKIT_SM90_EARLY, MOEKIT_SM90_PUSH,
// MOEKIT_SM90_CORESIDENT and MOEKIT_SM90_SPLIT3 (clusters of 3, see plan_swap) = 0 or 1,
// MOEKIT_SM90_EARLY_TILES=n (n > 0: at most n weight tiles before the wait, the rest of the ring
// after the token tiles; session 8), MOEKIT_SM90_W_PROMOTION=0..3 (the weight map's L2
// promotion: none, 64, 128, 256 bytes; session 11).
constexpr int kMaxSwapStages = 16;

struct SwapOverrides {
  int stages = 0;                                            // 0: the planner's
  int early_weights = -1, push_sums = -1, co_resident = -1;  // -1: the planner's
  int odd_splits = -1;                                       // -1: the planner's
  int early_tiles = 0;                                       // 0: every stage's
  int weight_promotion = -1;                                 // -1: the planner's
};

// Read at every plan, not once: the GPU tests set them per scope.
SwapOverrides swap_overrides() {
  SwapOverrides o;
  o.stages = env::integer("MOEKIT_SM90_STAGES", o.stages);
  o.early_weights = env::integer("MOEKIT_SM90_EARLY", o.early_weights);
  o.push_sums = env::integer("MOEKIT_SM90_PUSH", o.push_sums);
  o.co_resident = env::integer("MOEKIT_SM90_CORESIDENT", o.co_resident);
  o.odd_splits = env::integer("MOEKIT_SM90_SPLIT3", o.odd_splits);
  o.early_tiles = env::integer("MOEKIT_SM90_EARLY_TILES", o.early_tiles);
  o.weight_promotion = env::integer("MOEKIT_SM90_W_PROMOTION", o.weight_promotion);
  return o;
}

// Weight rows per CTA and CTAs per cluster splitting K: they fix the order of the sums, so the
// fused linear layer takes the GEMM's to write the same bits.
struct SwapLayout {
  int rows = 0;
  int splits = 0;
};

// The swap layout (64 or 128 weight rows per CTA, 1, 2, 3, 4 or 8 CTAs per cluster splitting K)
// with the least estimated time: waves of the clusters the device holds at once (several waves cost
// much more than they save) x swap_wave_us; or the `required` one. Returns false when no layout
// fits. kQuantizeX: the kernels that quantize bf16 x themselves.
template <int kTokens, bool kQuantizeX>
bool plan_swap(const BlockGemmProblem& p, const DeviceProperties& device, int device_index,
               const SwapLayout* required, Plan& plan) {
  struct Variant {
    KernelFn kernel;
    KernelFn co_resident;  // null where the accumulators need more than half the registers
    int rows;
    int min_stages;
    int late_stages;
    size_t (*shared_bytes)(int, int, size_t);
    size_t (*inbox_bytes)(int);
  };
  constexpr bool kSmall = kTokens <= 16;  // the widths measured faster with two CTAs per SM
  KernelFn co_resident_128 = nullptr, co_resident_64 = nullptr;
  if constexpr (kSmall) {
    co_resident_128 = gemm_swap_kernel<kTokens, 128, true, kQuantizeX>;
    co_resident_64 = gemm_swap_kernel<kTokens, 64, true, kQuantizeX>;
  }
  using Rows128 = Swap<kTokens, 128, kQuantizeX>;
  using Rows64 = Swap<kTokens, 64, kQuantizeX>;
  const Variant variants[] = {
      {gemm_swap_kernel<kTokens, 128, false, kQuantizeX>, co_resident_128, 128,
       Rows128::min_stages(), Rows128::kLateStages, Rows128::shared_bytes, Rows128::inbox_bytes},
      {gemm_swap_kernel<kTokens, 64, false, kQuantizeX>, co_resident_64, 64, Rows64::min_stages(),
       Rows64::kLateStages, Rows64::shared_bytes, Rows64::inbox_bytes}};
  const SwapOverrides overrides = swap_overrides();
  // Early weight loads only where the caller promises the previous kernel does not write B
  // (OpOptions::static_weights; the linear layer always can): else a load issued before
  // griddepcontrol.wait could read B before that kernel's last writes land.
  const bool early = overrides.early_weights >= 0 ? overrides.early_weights != 0 : p.b_static;
  const int64_t token_tiles = fp8::ceil_div(p.m, kTokens);
  int forced_rows = required != nullptr ? required->rows : 0;
  int forced_splits = required != nullptr ? required->splits : 0;
  const bool forced = required != nullptr || forced_swap(forced_rows, forced_splits);
  double best = 0.0;
  bool found = false;
  const Variant* chosen = nullptr;
  // Clusters of 3 (measured on an H200, docs/perf/fp8-gpu-sm90.md, v5): for 64-row CTAs with
  // token tiles of 64 or more, where 3 x N/64 CTAs fit one wave and 2 x N/64 leave SMs idle (M=64
  // N=2048 K=7168: 64 x 3 11.4 us, the power-of-two pick 128 x 4 13.8 us). 128-row CTAs in
  // clusters of 3 measured slower than 64 x 2 at N=4096 (15.7 vs 14.7 us), which the cost model
  // would not predict, so they are left out. MOEKIT_SM90_SPLIT3=0 leaves clusters of 3 out, =1
  // takes them for both row counts and every width (timing knob); a forced layout
  // (MOEKIT_SM90_SWAP) may name any split of 1..8.
  const int odd_splits = overrides.odd_splits;
  for (const Variant& v : variants) {
    for (int splits = 1; splits <= kMaxSplits; ++splits) {
      if (splits > 1 && p.k_blocks < int64_t{4} * splits) break;  // 4+ k-blocks per CTA
      const bool power_of_two = (splits & (splits - 1)) == 0;
      const bool three =
          splits == 3 && (odd_splits >= 0 ? odd_splits != 0 : kTokens >= 64 && v.rows == 64);
      if (!forced && !power_of_two && !three) continue;
      if (forced && (v.rows != forced_rows || splits != forced_splits)) continue;
      const int per_split = static_cast<int>(fp8::ceil_div(p.k_blocks, splits));
      // Even (warpgroups alternate stages), deep enough for the partial sums, and what fits
      // (1 KB kept for what the system reserves per CTA on sm_90).
      // Pushed sums need an inbox in rank 0; where it does not fit beside the fewest stages,
      // rank 0 pulls them instead.
      const size_t limit = device.shared_memory_per_block_optin;
      const bool push =
          (overrides.push_sums >= 0 ? overrides.push_sums != 0 : kTokens <= 16) && splits > 1 &&
          v.shared_bytes(per_split, v.min_stages, v.inbox_bytes(splits)) + 1024 <= limit;
      const size_t inbox = push ? v.inbox_bytes(splits) : 0;
      int stages = overrides.stages > 0 ? overrides.stages
                   : early              ? std::min(kMaxSwapStages, per_split)
                                        : std::min(v.late_stages, per_split);
      stages = std::max(v.min_stages, (stages + 1) / 2 * 2);
      while (stages > v.min_stages && v.shared_bytes(per_split, stages, inbox) + 1024 > limit)
        stages -= 2;
      const size_t shared_bytes = v.shared_bytes(per_split, stages, inbox);
      if (shared_bytes + 1024 > limit) continue;
      const int capacity = cluster_capacity(v.kernel, splits, shared_bytes, device_index);
      if (capacity < 1) continue;
      const int64_t clusters = fp8::ceil_div(p.n, v.rows) * token_tiles;
      const double waves = static_cast<double>(fp8::ceil_div(clusters, capacity));
      const int64_t active = std::min<int64_t>(clusters, capacity) * splits;
      const double cost = waves * swap_wave_us(v.rows, kTokens, per_split, active);
      if (found && cost >= best) continue;
      found = true;
      best = cost;
      chosen = &v;
      plan.kernel = v.kernel;
      plan.swap = true;
      plan.tokens = kTokens;
      plan.rows = v.rows;
      plan.splits = splits;
      plan.cluster_capacity = capacity;
      plan.grid = dim3(static_cast<unsigned>(clusters / token_tiles * splits),
                       static_cast<unsigned>(token_tiles));
      plan.shared_bytes = shared_bytes;
      plan.stages = stages;
      plan.push_sums = push;
      plan.ring_holds_k_range = per_split <= stages;
    }
  }
  if (!found) return false;
  plan.early_weights = early;
  // 64-token tiles: 8 of the ring's 12 weight tiles before the wait, so that the token tiles
  // issued after it queue behind fewer weight bytes (H200, M=64 N=4096 K=7168, moekit bench, 3
  // interleaved rounds: 13.10-13.12 vs 13.15-13.22 us; a small gain, see fp8-gpu-sm90.md v10);
  // narrower tiles keep every stage (8 of 16 lost 0.3-0.4 us at M = 1..16).
  plan.early_tiles = overrides.early_tiles > 0 ? overrides.early_tiles
                     : kTokens == 64           ? 8
                                               : plan.stages;
  // Weight tiles without L2 promotion: each box row is 128 bytes of a 7 KB-apart row, and 256-byte
  // promotion (the tile maps' default) cost M = 1..16 0.1-0.4 us per call at N=4096 K=7168 (H200,
  // moekit bench, three device runs; M=64 unchanged; fp8-gpu-sm90.md, session 11).
  if (overrides.weight_promotion >= 0 && overrides.weight_promotion <= 3)
    plan.weight_promotion = overrides.weight_promotion;
  // The same layout built for two CTAs per SM, where two fit: the planner's waves count one per
  // SM, the second slot is for the next call, whose early loads then fill its ring (without early
  // loads it measured no faster: 11.05 vs 10.74 us at M=1, K=7168).
  const bool co_resident =
      overrides.co_resident >= 0 ? overrides.co_resident != 0 : early && plan.ring_holds_k_range;
  if (co_resident && chosen->co_resident != nullptr &&
      cluster_capacity(chosen->co_resident, 1, plan.shared_bytes, device_index) >=
          2 * device.sm_count) {
    plan.kernel = chosen->co_resident;
    plan.co_resident = true;
  }
  return true;
}

// Tiles plans: the K-block count and the CTA count from which CTAs pair up (measured choices, see
// plan_for).
constexpr int kTilesLongK = 32;
constexpr int64_t kTilesPairGrid = 128;

// The tiles kernel built for the plan's fragments and scale feed, in pairs or not.
template <bool kPair>
TilesKernelFn tiles_kernel_for(const Plan& plan) {
  using tiles::ScaleFeed;
  if (!plan.overlap) return gemm_tiles_kernel<false, ScaleFeed::warps, kPair>;
  switch (plan.scale_feed) {
    case ScaleFeed::a_k_inner:
      return gemm_tiles_kernel<true, ScaleFeed::a_k_inner, kPair>;
    case ScaleFeed::a_m_inner:
      return gemm_tiles_kernel<true, ScaleFeed::a_m_inner, kPair>;
    case ScaleFeed::warps:
      break;
  }
  return gemm_tiles_kernel<true, ScaleFeed::warps, kPair>;
}

Plan plan_for(const BlockGemmProblem& p, int device_index) {
  const DeviceProperties& device = device_properties(device_index);
  Plan plan;
  if (p.m <= 128) {
    bool found = false;
    if (p.m <= 8)
      found = plan_swap<8, false>(p, device, device_index, nullptr, plan);
    else if (p.m <= 16)
      found = plan_swap<16, false>(p, device, device_index, nullptr, plan);
    else if (p.m <= 32)
      found = plan_swap<32, false>(p, device, device_index, nullptr, plan);
    else if (p.m <= 64)
      found = plan_swap<64, false>(p, device, device_index, nullptr, plan);
    else
      found = plan_swap<128, false>(p, device, device_index, nullptr, plan);
    if (found) return plan;
  }
  plan = Plan{};  // large M (or a k-range whose scales do not fit shared memory)
  const int64_t tiles_m = fp8::ceil_div(p.m, tiles::kBlockM);
  const int64_t tiles_n = fp8::ceil_div(p.n, tiles::kBlockN);
  // Two fragments taking turns (kOverlap) where the padding to groups of 4 k-blocks costs little:
  // K-block counts that are multiples of 4 (every K of the models' linear layers) or 32 and more.
  // MOEKIT_SM90_TILES_OVERLAP=0 or 1 forces it off or on (timing knob).
  const int overlap = env::integer("MOEKIT_SM90_TILES_OVERLAP", -1);
  plan.overlap =
      overlap >= 0 ? overlap != 0 : p.k_blocks % tiles::kOverlapGroup == 0 || p.k_blocks >= 32;
  // Copied scales wherever the layouts allow them (two fragments only), and pairs where they won
  // on an H200 (fp8-gpu-sm90.md, session 15): long k-ranges (K = 2048 lost 1 %) and grids of about
  // one CTA per SM or more (128 and 256 CTAs: -3.5 and -6 %; 64 CTAs lost 2 %); an even tile-row
  // count. Timing knobs: MOEKIT_SM90_TILES_SCALES=warps | copied, MOEKIT_SM90_TILES_PAIR=0 | 1.
  if (plan.overlap && env::text("MOEKIT_SM90_TILES_SCALES") != "warps")
    plan.scale_feed = tiles_scale_feed(p, plan.b_scale_k_inner);
  const bool long_k = p.k_blocks >= kTilesLongK;
  const int pair = env::integer("MOEKIT_SM90_TILES_PAIR", -1);
  plan.pair =
      tiles_m % 2 == 0 && (pair >= 0 ? pair != 0 : long_k && tiles_m * tiles_n >= kTilesPairGrid);
  plan.splits = plan.pair ? 2 : 1;
  plan.tiles_kernel = plan.pair ? tiles_kernel_for<true>(plan) : tiles_kernel_for<false>(plan);
  plan.grid = dim3(static_cast<unsigned>(tiles_m * tiles_n));
  plan.shared_bytes = tiles::kSharedBytes;
  return plan;
}

// The fused kernel's GEMM: its previous kernel is the caller's, not the layer's quantization, so
// weights load before the wait only under the caller's promise (OpOptions::static_weights).
BlockGemmProblem fused_gemm_of(const W8a8LinearProblem& p) {
  BlockGemmProblem g = p.gemm;
  g.b_static = p.static_weights;
  return g;
}

// The fused linear layer's plan: the swap layout the two-kernel path's GEMM takes (the same sums
// in the same order), built from the kernels that quantize x, with their own ring depth, co-
// residency and early weight loads. False where the GEMM's plan is not a swap plan of 8 or 16
// tokens, or where the token tiles of a CTA's k-range do not fit beside the fewest stages.
bool fused_linear_plan_for(const W8a8LinearProblem& p, int device_index, Plan& plan) {
  const DeviceProperties& device = device_properties(device_index);
  const Plan gemm = plan_for(p.gemm, device_index);
  if (!gemm.swap || gemm.tokens > kMaxFusedTokens) return false;
  const SwapLayout layout{gemm.rows, gemm.splits};
  const BlockGemmProblem fused = fused_gemm_of(p);
  plan = Plan{};
  return gemm.tokens == 8 ? plan_swap<8, true>(fused, device, device_index, &layout, plan)
                          : plan_swap<16, true>(fused, device, device_index, &layout, plan);
}

// Launches the plan's kernel: a cluster where K is split, programmatic dependent launch where the
// grid is short.
template <typename Kernel, typename... Params>
void launch(const Plan& plan, Kernel kernel, void* stream, int device, const Params&... params) {
  MOEKIT_GPU_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(plan.shared_bytes)));
  cudaLaunchConfig_t config{};
  config.gridDim = plan.grid;
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = plan.shared_bytes;
  config.stream = static_cast<cudaStream_t>(stream);
  cudaLaunchAttribute attributes[2];
  unsigned count = 0;
  if (plan.splits > 1) {
    attributes[count].id = cudaLaunchAttributeClusterDimension;
    attributes[count].val.clusterDim.x = static_cast<unsigned>(plan.splits);
    attributes[count].val.clusterDim.y = 1;
    attributes[count].val.clusterDim.z = 1;
    ++count;
  }
  // Overlap helps short kernels (decode: 12.3 -> 10.6 us on an H200) but cost the 13-wave
  // M=4096 tiles grid ~7 % in two runs: only grids of a few waves use it.
  const int sm_count = device_properties(device).sm_count;
  if (programmatic_launch_allowed(device) &&
      (plan.swap || plan.grid.x <= 4u * static_cast<unsigned>(sm_count))) {
    attributes[count].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attributes[count].val.programmaticStreamSerializationAllowed = 1;
    ++count;
  }
  config.attrs = attributes;
  config.numAttrs = count;
  MOEKIT_GPU_CHECK(cudaLaunchKernelEx(&config, kernel, params...));
}

std::string str(int64_t v) { return std::to_string(v); }

// Why a tensor cannot be read through a tensor map ("" when it can).
std::string tma_reason(const char* name, const TensorView& t) {
  const auto address = reinterpret_cast<uintptr_t>(t.data());
  if (address % 16 != 0) return std::string(name) + " is not 16-byte aligned (TMA needs it)";
  if (t.size(0) > 1 && t.stride(0) % 16 != 0)
    return std::string(name) + " row stride " + str(t.stride(0)) +
           " bytes is not a multiple of 16 (TMA needs it)";
  if (t.size(0) > 1 && t.stride(0) >= (int64_t{1} << 40))
    return std::string(name) + " row stride " + str(t.stride(0)) + " is too large for TMA";
  return "";
}

}  // namespace

std::string block_gemm_sm90_supports(const BlockGemmProblem& p) {
  if (!p.a.device().is_gpu()) return "tensors are on " + p.a.device().str() + ", not on a GPU";
  const int device = p.a.device().index;
  const DeviceProperties props = device_properties(device);
  if (props.major != 9)
    return "needs compute capability 9.x (Hopper), device has " + str(props.major) + "." +
           str(props.minor);
  {
    DeviceGuard on_device(device);
    cudaFuncAttributes attributes{};
    const cudaError_t status = cudaFuncGetAttributes(
        &attributes,
        reinterpret_cast<const void*>(gemm_tiles_kernel<false, tiles::ScaleFeed::warps, false>));
    if (status != cudaSuccess) {
      (void)cudaGetLastError();
      return "this build holds no sm_90a code for the kernel (" +
             std::string(cudaGetErrorName(status)) + ")";
    }
    // binaryVersion 90 with a handful of registers is a plain sm_90 build: the wgmma body is
    // compiled only for sm_90a (the real kernel needs 100+ registers).
    if (attributes.binaryVersion != 90 || attributes.numRegs < 32)
      return "this build holds no sm_90a code for the kernel (binary version " +
             str(attributes.binaryVersion) + ", " + str(attributes.numRegs) + " registers)";
  }
  if (encode_tiled() == nullptr) return "the driver has no cuTensorMapEncodeTiled";
  if (p.k == 0) return "K=0 (nothing to multiply)";
  if (p.m > (int64_t{1} << 31) - kFp8BlockSize || p.n > (int64_t{1} << 31) - kFp8BlockSize ||
      p.k > (int64_t{1} << 31) - kFp8BlockSize)
    return "a dimension exceeds 2^31 - 128";
  if (fp8::ceil_div(p.m, 128) * fp8::ceil_div(p.n, 128) >= (int64_t{1} << 31))
    return "M x N needs more than 2^31 tiles of 128 x 128";
  if (std::string why = tma_reason("a", p.a); !why.empty()) return why;
  if (std::string why = tma_reason("b", p.b); !why.empty()) return why;
  return "";
}

std::string block_gemm_sm90_plan(const BlockGemmProblem& p) {
  if (p.m == 0 || p.n == 0) return "nothing to do";
  const int device = p.a.device().index;
  DeviceGuard on_device(device);
  const Plan plan = plan_for(p, device);
  char text[300];
  char early[40] = "";
  if (plan.early_weights)
    std::snprintf(
        early, sizeof early,
        plan.early_tiles < plan.stages ? ", early weight loads (%d)" : ", early weight loads",
        plan.early_tiles);
  if (plan.swap)
    std::snprintf(text, sizeof text,
                  "swap: %d tokens x %d weight rows per CTA, K split %d ways (cluster), grid %u x "
                  "%u, %d stages, %zu B shared, %d clusters resident%s%s%s%s",
                  plan.tokens, plan.rows, plan.splits, plan.grid.x, plan.grid.y, plan.stages,
                  plan.shared_bytes, plan.cluster_capacity, early,
                  plan.co_resident ? ", 2 CTAs per SM" : "", plan.push_sums ? ", pushed sums" : "",
                  plan.weight_promotion == 0 ? ", weights unpromoted in L2" : "");
  else
    std::snprintf(text, sizeof text, "tiles: 128 x 128, grid %u, %zu B shared%s%s%s", plan.grid.x,
                  plan.shared_bytes, plan.pair ? ", pairs sharing B tiles (cluster of 2)" : "",
                  plan.overlap ? ", two fragments take turns" : "",
                  plan.scale_feed == tiles::ScaleFeed::warps ? ", scales from the scale warps"
                                                             : ", scales copied with the tiles");
  return text;
}

void block_fp8_gemm_sm90(const BlockGemmProblem& p) {
  if (p.m == 0 || p.n == 0) return;
  const int device = p.a.device().index;
  DeviceGuard on_device(device);
  const Plan plan = plan_for(p, device);
  GemmArgs args = args_of(p);

  CUtensorMap first, second;
  if (plan.swap) {
    first =
        make_tile_map("b", p.b.data(), p.n, p.k, p.b.stride(0), plan.rows, plan.weight_promotion);
    second = make_tile_map("a", p.a.data(), p.m, p.k, p.a.stride(0), plan.tokens);
    args.splits = plan.splits;
    args.stages = plan.stages;
    args.early_weights = plan.early_weights;
    args.push_sums = plan.push_sums;
    args.early_tiles = plan.early_tiles;
    launch(plan, plan.kernel, p.stream, device, first, second, args);
    return;
  }
  first = make_tile_map("a", p.a.data(), p.m, p.k, p.a.stride(0), tiles::kBlockM);
  second = make_tile_map("b", p.b.data(), p.n, p.k, p.b.stride(0),
                         plan.pair ? tiles::kBlockN / 2 : tiles::kBlockN);
  args.tiles_m = static_cast<int>(fp8::ceil_div(p.m, tiles::kBlockM));
  args.tiles_n = static_cast<int>(fp8::ceil_div(p.n, tiles::kBlockN));
  args.splits = 1;
  args.b_scale_k_inner = plan.b_scale_k_inner;
  args.b_scale_lanes = p.b_scales.dtype() == DType::bf16 ? 8 : 4;
  const ScaleMaps maps = scale_maps_of(p, plan.scale_feed, plan.b_scale_k_inner);
  launch(plan, plan.tiles_kernel, p.stream, device, first, second, args, maps);
}

std::string w8a8_linear_sm90_fused_supports(const W8a8LinearProblem& p) {
  // The same GEMM kernel the two-kernel path would run, or no bitwise equality with it.
  if (std::string why = block_gemm_sm90_supports(p.gemm); !why.empty()) return why;
  const BlockGemmProblem g = fused_gemm_of(p);
  if (g.m > kMaxFusedTokens)
    return "M=" + str(g.m) + " > " + str(kMaxFusedTokens) +
           " (the quantization is fused into token tiles of 8 and 16)";
  const TensorView& x = p.quant.x;
  if (x.dtype() != DType::bf16) return "x is " + std::string(dtype_name(x.dtype())) + ", not bf16";
  if (p.quant.group_size != kBlockK)
    return "group_size=" + str(p.quant.group_size) + " is not the k-block of 128";
  if (g.k % kChunk != 0)
    return "K=" + str(g.k) + " is not a multiple of 8 (x rows are read 16 bytes at a time)";
  if (reinterpret_cast<uintptr_t>(x.data()) % 16 != 0 || (g.m > 1 && x.stride(0) % kChunk != 0))
    return "x rows are not 16-byte aligned (they are read 16 bytes at a time)";
  if (g.m == 0 || g.n == 0) return "";
  const int device = x.device().index;
  DeviceGuard on_device(device);
  Plan plan;
  if (!fused_linear_plan_for(p, device, plan))
    return "the GEMM's plan is not a swap plan of 8 or 16 tokens whose token tiles fit shared "
           "memory (" +
           block_gemm_sm90_plan(g) + ")";
  // Where a CTA's k-range is longer than its ring, the weight tiles past the ring wait until the
  // consumers, who quantize first, free stages. Measured on an H200 (docs/perf/fp8-gpu-sm90.md,
  // v8): beyond 4 tokens that costs more than the separate quantization kernel (N=4096 K=7168,
  // 14 k-blocks per CTA, 12 stages: M=4 10.9 vs 12.0 us, M=8 12.6 vs 12.0, M=16 16.8 vs 13.3).
  if (!plan.ring_holds_k_range && g.m > kMaxTokensPastTheRing)
    return "M=" + str(g.m) + " > " + str(kMaxTokensPastTheRing) + " and a CTA's " +
           str(fp8::ceil_div(g.k_blocks, plan.splits)) + " k-blocks exceed its ring of " +
           str(plan.stages) + " stages (measured slower than quantizing in a kernel of its own)";
  return "";
}

std::string w8a8_linear_sm90_fused_plan(const W8a8LinearProblem& p) {
  const BlockGemmProblem g = fused_gemm_of(p);
  if (g.m == 0 || g.n == 0) return "nothing to do";
  const int device = g.a.device().index;
  DeviceGuard on_device(device);
  Plan plan;
  if (!fused_linear_plan_for(p, device, plan)) return "no fused plan";
  char text[300];
  std::snprintf(text, sizeof text,
                "swap with x quantized in the kernel: %d tokens x %d weight rows per CTA, K split "
                "%d ways (cluster), grid %u x %u, %d stages, %zu B shared%s%s%s",
                plan.tokens, plan.rows, plan.splits, plan.grid.x, plan.grid.y, plan.stages,
                plan.shared_bytes, plan.early_weights ? ", early weight loads" : "",
                plan.co_resident ? ", 2 CTAs per SM" : "", plan.push_sums ? ", pushed sums" : "");
  return text;
}

void w8a8_linear_sm90_fused(const W8a8LinearProblem& p) {
  const BlockGemmProblem g = fused_gemm_of(p);
  if (g.m == 0 || g.n == 0) return;
  const int device = g.a.device().index;
  DeviceGuard on_device(device);
  Plan plan;
  if (!fused_linear_plan_for(p, device, plan))
    fail("w8a8_block_fp8_linear", "backend", "gpu.sm90.fused", "has no plan for this shape");
  GemmArgs args = args_of(g);
  args.activations = {p.quant.x.data(), p.quant.x.stride(0), static_cast<int>(g.k), p.quant.eps,
                      p.quant.ue8m0};
  args.splits = plan.splits;
  args.stages = plan.stages;
  args.early_weights = plan.early_weights;
  args.push_sums = plan.push_sums;
  args.early_tiles = plan.early_tiles;
  const CUtensorMap weight = make_tile_map("weight", g.b.data(), g.n, g.k, g.b.stride(0), plan.rows,
                                           plan.weight_promotion);
  const CUtensorMap unused{};  // the kernel reads x itself, not through a tensor map
  launch(plan, plan.kernel, g.stream, device, weight, unused, args);
}

// ---- Phase stamps (MOEKIT_FP8_TRACE builds only).

#ifdef MOEKIT_FP8_TRACE
bool block_gemm_sm90_trace_built() { return true; }
int block_gemm_sm90_trace_capacity() { return kTraceCapacity; }

void block_gemm_sm90_trace_reset() {
  MOEKIT_GPU_CHECK(cudaDeviceSynchronize());
  void* records = nullptr;
  MOEKIT_GPU_CHECK(cudaGetSymbolAddress(&records, trace_records));
  MOEKIT_GPU_CHECK(cudaMemset(records, 0, sizeof(Sm90TraceRecord) * kTraceCapacity));
  const uint32_t zero = 0;
  MOEKIT_GPU_CHECK(cudaMemcpyToSymbol(trace_ticket, &zero, sizeof(zero)));
  MOEKIT_GPU_CHECK(cudaDeviceSynchronize());
}

std::vector<Sm90TraceRecord> block_gemm_sm90_trace_read() {
  MOEKIT_GPU_CHECK(cudaDeviceSynchronize());
  uint32_t tickets = 0;
  MOEKIT_GPU_CHECK(cudaMemcpyFromSymbol(&tickets, trace_ticket, sizeof(tickets)));
  std::vector<Sm90TraceRecord> records(std::min<uint32_t>(tickets, kTraceCapacity));
  if (!records.empty())
    MOEKIT_GPU_CHECK(cudaMemcpyFromSymbol(records.data(), trace_records,
                                          sizeof(Sm90TraceRecord) * records.size()));
  return records;
}
#else
bool block_gemm_sm90_trace_built() { return false; }
int block_gemm_sm90_trace_capacity() { return 0; }
void block_gemm_sm90_trace_reset() {}
std::vector<Sm90TraceRecord> block_gemm_sm90_trace_read() { return {}; }
#endif

}  // namespace moekit::gpu
