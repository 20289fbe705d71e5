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
//   groups of 8 tile rows so that the CTAs resident at once share A and B tiles in L2. Each
//   k-block's scales arrive with its tiles (TMA boxes) where their layout allows, else two
//   producer warps put the scale products beside them; on long k-ranges pairs of CTAs share B
//   tiles (TMA multicast). Each consumer keeps two fragments, so one k-block's wgmma run while
//   the previous one is promoted. Wide tiles (256 x 128, where the scales are copied and the grid
//   is large) have a persistent kernel of their own (gemm_wide_persistent.cuh): each consumer
//   warpgroup takes 128 rows in two waves of 64 per k-block, 3 stages, pairs of CTAs share A
//   tiles, and a CTA or pair per SM takes tile after tile, storing each (by TMA from shared
//   memory where the out allows) while the next tile's copies run.
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
// This file plans and launches; the kernels are in sm90/gemm_tiles.cuh,
// sm90/gemm_wide_persistent.cuh and sm90/gemm_swap.cuh, what they share in sm90/gemm_common.cuh
// (headers of this translation unit only).
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
#include <limits>
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
#include "gpu/sm90/gemm_common.cuh"
#include "gpu/sm90/gemm_swap.cuh"
#include "gpu/sm90/gemm_swap_grouped.cuh"
#include "gpu/sm90/gemm_tiles.cuh"
#include "gpu/sm90/gemm_wide_persistent.cuh"
#include "gpu/sm90/ptx.h"
#include "gpu/sm90/wgmma_fp8.h"
#include "gpu/vendor.h"
#include "moekit/error.h"

namespace moekit::gpu {
namespace {

constexpr const char* kOp = "block_fp8_gemm";

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

// A byte tensor map of `rank` (2 or 3) dimensions read in boxes with the 128-byte swizzle;
// out-of-bounds elements read as zeros. l2_promotion: the L2 line size each box row's request is
// widened to (0 none, 1..3 64, 128, 256 bytes). `op` and `name` label a failure.
CUtensorMap encode_byte_tiles(const char* op, const char* name, const void* base, cuuint32_t rank,
                              const cuuint64_t* dims, const cuuint64_t* strides,
                              const cuuint32_t* box, int l2_promotion) {
  const CUtensorMapL2promotion promotions[4] = {
      CU_TENSOR_MAP_L2_PROMOTION_NONE, CU_TENSOR_MAP_L2_PROMOTION_L2_64B,
      CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B};
  const cuuint32_t element_strides[3] = {1, 1, 1};
  CUtensorMap map{};
  const CUresult status = encode_tiled()(
      &map, CU_TENSOR_MAP_DATA_TYPE_UINT8, rank, const_cast<void*>(base), dims, strides, box,
      element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
      promotions[l2_promotion], CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (status != CUDA_SUCCESS)
    fail(op, std::string(name) + " tensor map", "CUresult " + std::to_string(status),
         "cuTensorMapEncodeTiled failed");
  return map;
}

// A [rows, cols] byte matrix (row stride in bytes) read in boxes of box_rows x 128 bytes.
CUtensorMap make_tile_map(const char* name, const void* base, int64_t rows, int64_t cols,
                          int64_t row_stride, int box_rows, int l2_promotion = 3) {
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  // A single row has no meaningful stride: any multiple of 16 past the row will do.
  const int64_t stride = rows > 1 ? row_stride : (cols + 15) / 16 * 16;
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(stride)};
  const cuuint32_t box[2] = {kBlockK, static_cast<cuuint32_t>(box_rows)};
  return encode_byte_tiles(kOp, name, base, 2, dims, strides, box, l2_promotion);
}

// make_tile_map for `groups` such matrices `group_stride` bytes apart: boxes of one group's
// box_rows x 128 bytes (rows past a group's last read as zeros, as past a matrix's).
CUtensorMap make_grouped_tile_map(const char* name, const void* base, int64_t groups, int64_t rows,
                                  int64_t cols, int64_t row_stride, int64_t group_stride,
                                  int box_rows, int l2_promotion = 3) {
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows),
                              static_cast<cuuint64_t>(groups)};
  // Strides of a single row or group are never used: any multiple of 16 past its extent will do.
  const int64_t rows_apart = rows > 1 ? row_stride : (cols + 15) / 16 * 16;
  const int64_t groups_apart = groups > 1 ? group_stride : rows * rows_apart;
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(rows_apart),
                                 static_cast<cuuint64_t>(groups_apart)};
  const cuuint32_t box[3] = {kBlockK, static_cast<cuuint32_t>(box_rows), 1};
  return encode_byte_tiles("grouped_block_fp8_gemm", name, base, 3, dims, strides, box,
                           l2_promotion);
}

#ifdef MOEKIT_FP8_TRACE
// Diagnosis builds, MOEKIT_SM90_TILES_ABLATE=5: make_tile_map's matrix as a 3-D view (128 bytes,
// rows, k-blocks) whose boxes hold two k-blocks' tiles, one after the other.
CUtensorMap make_pair_tile_map(const void* base, int64_t rows, int64_t cols, int64_t row_stride,
                               int box_rows, int l2_promotion) {
  const CUtensorMapL2promotion promotions[4] = {
      CU_TENSOR_MAP_L2_PROMOTION_NONE, CU_TENSOR_MAP_L2_PROMOTION_L2_64B,
      CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B};
  CUtensorMap map{};
  const cuuint64_t dims[3] = {kBlockK, static_cast<cuuint64_t>(rows),
                              static_cast<cuuint64_t>(cols / kBlockK)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(row_stride), kBlockK};
  const cuuint32_t box[3] = {kBlockK, static_cast<cuuint32_t>(box_rows), 2};
  const cuuint32_t element_strides[3] = {1, 1, 1};
  const CUresult status = encode_tiled()(
      &map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 3, const_cast<void*>(base), dims, strides, box,
      element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
      promotions[l2_promotion], CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (status != CUDA_SUCCESS)
    fail(kOp, "paired tile map", "CUresult " + std::to_string(status),
         "cuTensorMapEncodeTiled failed");
  return map;
}
#endif

// Persistent tiles: out [M, N] bf16 or f16 written in boxes of 64 columns x `rows` rows (the
// tile's, 256 or 128) from shared memory with the 128-byte swizzle (rows on 16 bytes; the box is
// clipped at the edges). groups > 0: `groups` such matrices `group_stride` elements apart, the
// group the third dimension.
CUtensorMap make_out_map(const BlockGemmProblem& p, int rows = 256, int64_t groups = 0,
                         int64_t group_stride = 0) {
  CUtensorMap map{};
  const CUtensorMapDataType type = p.out.dtype() == DType::f16 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                                               : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(p.n), static_cast<cuuint64_t>(p.m),
                              static_cast<cuuint64_t>(groups)};
  // Strides of a single row or group are never used: any multiple of 16 past its extent will do.
  const int64_t stride = p.m > 1 ? p.out.stride(0) * 2 : (p.n * 2 + 15) / 16 * 16;
  const int64_t groups_apart = groups > 1 ? group_stride * 2 : p.m * stride;
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(stride),
                                 static_cast<cuuint64_t>(groups_apart)};
  const cuuint32_t box[3] = {persistent::kOutBoxColumns, static_cast<cuuint32_t>(rows), 1};
  const cuuint32_t element_strides[3] = {1, 1, 1};
  const CUresult status =
      encode_tiled()(&map, type, groups > 0 ? 3 : 2, p.out.data(), dims, strides, box,
                     element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                     CU_TENSOR_MAP_L2_PROMOTION_NONE, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (status != CUDA_SUCCESS)
    fail(kOp, "out tensor map", "CUresult " + std::to_string(status),
         "cuTensorMapEncodeTiled failed");
  return map;
}

// A [outer, inner] matrix of 2- or 4-byte elements read in unswizzled boxes of box_inner x
// box_outer (box_inner x element = 16 bytes); out-of-bounds elements read as zeros. groups > 0:
// `groups` such matrices group_stride_bytes apart, the group the third dimension (boxes of one).
CUtensorMap make_scale_map(const char* name, const void* base, int element_bytes, int64_t inner,
                           int64_t outer, int64_t outer_stride_bytes, int box_inner, int box_outer,
                           int64_t groups = 0, int64_t group_stride_bytes = 0) {
  CUtensorMap map{};
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(inner), static_cast<cuuint64_t>(outer),
                              static_cast<cuuint64_t>(groups)};
  const int64_t stride = outer > 1 ? outer_stride_bytes : (inner * element_bytes + 15) / 16 * 16;
  const int64_t groups_apart = groups > 1 ? group_stride_bytes : outer * stride;
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(stride),
                                 static_cast<cuuint64_t>(groups_apart)};
  const cuuint32_t box[3] = {static_cast<cuuint32_t>(box_inner), static_cast<cuuint32_t>(box_outer),
                             1};
  const cuuint32_t element_strides[3] = {1, 1, 1};
  const CUresult status = encode_tiled()(
      &map, element_bytes == 2 ? CU_TENSOR_MAP_DATA_TYPE_UINT16 : CU_TENSOR_MAP_DATA_TYPE_UINT32,
      groups > 0 ? 3 : 2, const_cast<void*>(base), dims, strides, box, element_strides,
      CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_NONE,
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

// How the persistent kernel's groups' builds get the activation scales (their weight scales are
// stored by a loader warp, any layout): copied with the tiles where tiles_scale_feed would copy
// them; else the scale warps (which those builds do not have: they decline).
tiles::ScaleFeed activation_scale_feed(const BlockGemmProblem& p) {
  using tiles::ScaleFeed;
  const auto boxable = [](int64_t count, int64_t stride_bytes) {
    return count == 1 || (stride_bytes % 16 == 0 && stride_bytes < (int64_t{1} << 40));
  };
  if (reinterpret_cast<uintptr_t>(p.a_scales.data()) % 16 != 0) return ScaleFeed::warps;
  const ScaleAddressing& at = p.a_scale_at;
  const int64_t words = at.packed() ? fp8::ceil_div(p.k_blocks, 4) : p.k_blocks;
  if (at.group_stride == 1 && boxable(p.m, at.row_stride * 4)) return ScaleFeed::a_k_inner;
  if (at.row_stride == 1 && boxable(words, at.group_stride * 4)) return ScaleFeed::a_m_inner;
  return ScaleFeed::warps;
}

// The tiles kernel's scale maps for the plan's feed (zeros for the scale warps), for tiles of
// `rows` rows. groups > 0: of that many groups (p is group 0's problem), the scale tensors' planes
// a_group_bytes and b_group_bytes apart; a_groups false: the activation scales are one matrix
// (the contiguous layout), only the weight scales have planes.
ScaleMaps scale_maps_of(const BlockGemmProblem& p, tiles::ScaleFeed feed, bool b_k_inner, int rows,
                        int64_t groups = 0, int64_t a_group_bytes = 0, int64_t b_group_bytes = 0,
                        bool a_groups = true, bool b_map = true) {
  using tiles::ScaleFeed;
  ScaleMaps maps{};
  if (feed == ScaleFeed::warps) return maps;
  const ScaleAddressing& at = p.a_scale_at;
  const int64_t words = at.packed() ? fp8::ceil_div(p.k_blocks, 4) : p.k_blocks;
  const int64_t a_planes = a_groups ? groups : 0;
  if (feed == ScaleFeed::a_k_inner)
    maps.a = make_scale_map("a_scales", p.a_scales.data(), 4, words, p.m, at.row_stride * 4, 4,
                            rows, a_planes, a_group_bytes);
  else
    maps.a = make_scale_map("a_scales", p.a_scales.data(), 4, p.m, words, at.group_stride * 4, rows,
                            1, a_planes, a_group_bytes);
  if (!b_map) return maps;  // (the groups' builds: their loader warp reads the weight scales)
  const int b_bytes = p.b_scales.dtype() == DType::bf16 ? 2 : 4;
  const int64_t n_blocks = fp8::ceil_div(p.n, kFp8BlockSize);
  if (b_k_inner)
    maps.b = make_scale_map("b_scales", p.b_scales.data(), b_bytes, p.k_blocks, n_blocks,
                            p.b_scales.stride(0) * b_bytes, 16 / b_bytes, 1, groups, b_group_bytes);
  else
    maps.b = make_scale_map("b_scales", p.b_scales.data(), b_bytes, n_blocks, p.k_blocks,
                            p.b_scales.stride(1) * b_bytes, 16 / b_bytes, 1, groups, b_group_bytes);
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
using PersistentKernelFn = void (*)(CUtensorMap, CUtensorMap, GemmArgs, ScaleMaps, CUtensorMap);

// The launch plan for a problem: which kernel, grid, cluster and shared memory.
struct Plan {
  KernelFn kernel = nullptr;  // swap
  TilesKernelFn tiles_kernel = nullptr;
  PersistentKernelFn persistent_kernel = nullptr;  // tiles, wide, persistent
  bool swap = false;
  int tokens = 0;  // swap: tokens per CTA (the wgmma N)
  int rows = 0;    // swap: weight rows per CTA
  int splits = 1;
  int cluster_capacity = 0;  // swap: clusters of `splits` CTAs resident at once
  int stages = 0;            // swap: ring depth
  bool early_weights = false;
  bool co_resident = false;  // swap: the kernel built for two CTAs per SM
  bool push_sums = false;
  bool bulk_stores = false;    // swap: rank 0's out tile through shared memory and bulk copies
  bool loader_scales = false;  // swap: activation scales loaded by producer warps, group by group
  int early_tiles = 0;         // swap, early_weights: weight tiles loaded before the wait
  int weight_promotion = 0;    // swap: the weight map's L2 promotion (0 none, 1..3 64..256 B)
  bool ring_holds_k_range = false;  // swap: every k-block of a CTA has its own stage
  bool overlap = false;             // tiles: k-block i + 1's wgmma run during i's promotion
  tiles::ScaleFeed scale_feed = tiles::ScaleFeed::warps;  // tiles
  int tile_rows = 128;                                    // tiles: 128 or 256 (wide)
  bool pair = false;              // tiles: clusters of two CTAs sharing B (wide: A) tiles
  bool persistent = false;        // tiles, wide: a CTA (or pair) per SM takes tile after tile
  bool out_tma = false;           // persistent: 16-bit out stored by TMA from a staged tile
  double persistent_fill = 0;     // persistent: units / (rounds x resident units)
  int64_t persistent_rounds = 0;  // persistent: rounds of resident units
  int split_units = 0;            // persistent: the last round's units, split over K (0: none)
  int split_pairs = 0;            // persistent: the pairs (CTAs) that share them
  int tiles_split = 1;            // tiles: CTAs of a cluster splitting K (splits = tiles_split)
  bool b_scale_k_inner = false;   // tiles, copied scales: the weight-scale map's inner dimension
  int tile_promotion = 2;         // tiles: the A and B maps' L2 promotion (as weight_promotion)
  dim3 grid;
  size_t shared_bytes = 0;
};

// The swap kernel's launch arguments from its plan (the GEMM's and the fused linear layer's).
void set_swap_args(const Plan& plan, GemmArgs& args) {
  args.splits = plan.splits;
  args.stages = plan.stages;
  args.early_weights = plan.early_weights;
  args.push_sums = plan.push_sums;
  args.bulk_stores = plan.bulk_stores;
  args.loader_scales = plan.loader_scales;
  args.early_tiles = plan.early_tiles;
#ifdef MOEKIT_FP8_TRACE
  args.tiles_ablation = env::integer("MOEKIT_SM90_SWAP_ABLATE", 0);
#endif
}

// How many clusters of `splits` CTAs of this kernel fit on the device at once (cached).
template <typename Kernel>
int cluster_capacity(Kernel kernel, int splits, size_t shared_bytes, int device) {
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
// promotion: none, 64, 128, 256 bytes; session 11), MOEKIT_SM90_BULK_STORES = 0 or 1 (rank 0's out
// tile through shared memory and bulk copies; session 19), MOEKIT_SM90_SCALE_LOADER = 0 or 1 (the
// activation scales loaded by producer warps; session 19). Diagnosis builds (MOEKIT_FP8_TRACE) also
// read MOEKIT_SM90_SWAP_ABLATE (bits: 1 activation scales not loaded, 2 no stores; wrong outputs).
constexpr int kMaxSwapStages = 16;

struct SwapOverrides {
  int stages = 0;                                            // 0: the planner's
  int early_weights = -1, push_sums = -1, co_resident = -1;  // -1: the planner's
  int odd_splits = -1;                                       // -1: the planner's
  int early_tiles = 0;                                       // 0: every stage's
  int weight_promotion = -1;                                 // -1: the planner's
  int bulk_stores = -1;                                      // -1: the planner's
  int loader_scales = -1;                                    // -1: the planner's
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
  o.bulk_stores = env::integer("MOEKIT_SM90_BULK_STORES", o.bulk_stores);
  o.loader_scales = env::integer("MOEKIT_SM90_SCALE_LOADER", o.loader_scales);
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
    bool (*staging_fits)(int, int);
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
       Rows128::min_stages(), Rows128::kLateStages, Rows128::shared_bytes, Rows128::inbox_bytes,
       Rows128::staging_fits},
      {gemm_swap_kernel<kTokens, 64, false, kQuantizeX>, co_resident_64, 64, Rows64::min_stages(),
       Rows64::kLateStages, Rows64::shared_bytes, Rows64::inbox_bytes, Rows64::staging_fits}};
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
  // Rank 0's out tile through shared memory and bulk copies, where the rows are 16-byte aligned
  // and the ring holds the staged tile, for token tiles of 32 or more (H200, moekit bench, three
  // rounds: M=64 N=4096 K=7168 13.11 -> 12.91 us; M = 1..16 and N=7168 K=2048 M=1 within -0.05 ..
  // +0.09 us: left out; fp8-gpu-sm90.md, session 19). MOEKIT_SM90_BULK_STORES=0 or 1 forces it.
  const int element = static_cast<int>(dtype_size(p.out.dtype()));
  const int bulk = overrides.bulk_stores;
  plan.bulk_stores = (bulk >= 0 ? bulk != 0 : kTokens >= 32) &&
                     reinterpret_cast<uintptr_t>(p.out.data()) % 16 == 0 &&
                     p.out.stride(0) * element % 16 == 0 && p.n * element % 16 == 0 &&
                     chosen->staging_fits(plan.stages, element);
  // The activation scales loaded by two producer warps, a group of k-blocks at a time, instead of
  // by the consumers before their loop: off (H200, N=4096 K=7168, three rounds: M = 1 / 16 / 64
  // 9.55 -> 10.08, 9.89 -> 10.49, 12.35 -> 12.97 us; fp8-gpu-sm90.md, session 19). Timing knob
  // MOEKIT_SM90_SCALE_LOADER=1.
  plan.loader_scales = !kQuantizeX && overrides.loader_scales > 0;
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
constexpr int kTilesWideLeastK = 16;
constexpr int64_t kTilesPairGrid = 128;
// A split's fixed cost in k-blocks (~0.37 us each): H200, M=256 N=4096, K=7168 and 2048 (session
// 16) put it at ~4.5 us, ~12 k-blocks of a 128 x 128 tile.
constexpr int kTilesSplitCost = 12;

// The tiles kernel built for the plan's fragments, scale feed and cluster (the split needs two
// fragments).
template <tiles::Cluster kCluster>
TilesKernelFn tiles_kernel_for(const Plan& plan) {
  using tiles::ScaleFeed;
  if constexpr (kCluster != tiles::Cluster::split)
    if (!plan.overlap) return gemm_tiles_kernel<false, ScaleFeed::warps, kCluster>;
  switch (plan.scale_feed) {
    case ScaleFeed::a_k_inner:
      return gemm_tiles_kernel<true, ScaleFeed::a_k_inner, kCluster>;
    case ScaleFeed::a_m_inner:
      return gemm_tiles_kernel<true, ScaleFeed::a_m_inner, kCluster>;
    case ScaleFeed::warps:
      break;
  }
  return gemm_tiles_kernel<true, ScaleFeed::warps, kCluster>;
}

// Persistent wide tiles: the kernel for the plan's feed, cluster and out path, and whether it
// splits the last round (a build of its own: the items of a split round in the loop of every
// tile cost the whole rounds 3 % at M=1024 N=4096 K=7168, 45.2 -> 46.7 us, H200, session 24,
// run 2).
template <persistent::Out kOut, bool kSplit>
PersistentKernelFn wide_persistent_kernel_for(const Plan& plan) {
  using tiles::Cluster;
  using tiles::ScaleFeed;
  const bool k_inner = plan.scale_feed == ScaleFeed::a_k_inner;
  if (plan.pair)
    return k_inner ? gemm_wide_persistent_kernel<ScaleFeed::a_k_inner, Cluster::pair, kOut, kSplit>
                   : gemm_wide_persistent_kernel<ScaleFeed::a_m_inner, Cluster::pair, kOut, kSplit>;
  return k_inner ? gemm_wide_persistent_kernel<ScaleFeed::a_k_inner, Cluster::none, kOut, kSplit>
                 : gemm_wide_persistent_kernel<ScaleFeed::a_m_inner, Cluster::none, kOut, kSplit>;
}

template <persistent::Out kOut>
PersistentKernelFn wide_persistent_kernel_for(const Plan& plan) {
  return plan.split_units > 0 ? wide_persistent_kernel_for<kOut, true>(plan)
                              : wide_persistent_kernel_for<kOut, false>(plan);
}

PersistentKernelFn wide_persistent_kernel_for(const Plan& plan, DType out) {
  using persistent::Out;
  if (!plan.out_tma) return wide_persistent_kernel_for<Out::threads>(plan);
  return out == DType::f16 ? wide_persistent_kernel_for<Out::f16_tma>(plan)
                           : wide_persistent_kernel_for<Out::bf16_tma>(plan);
}

// The groups' builds of the persistent kernel (no split round): the plan's feed and out path,
// tiles of kRows rows, CTAs alone or in pairs sharing A tiles.
template <persistent::Groups kGroups, int kRows, persistent::Out kOut, tiles::Cluster kCluster>
PersistentKernelFn grouped_persistent_kernel_for(const Plan& plan) {
  using tiles::ScaleFeed;
  return plan.scale_feed == ScaleFeed::a_k_inner
             ? gemm_wide_persistent_kernel<ScaleFeed::a_k_inner, kCluster, kOut, false, kGroups,
                                           kRows>
             : gemm_wide_persistent_kernel<ScaleFeed::a_m_inner, kCluster, kOut, false, kGroups,
                                           kRows>;
}

template <persistent::Groups kGroups, int kRows, persistent::Out kOut>
PersistentKernelFn grouped_persistent_kernel_for(const Plan& plan) {
  if (plan.pair)
    return grouped_persistent_kernel_for<kGroups, kRows, kOut, tiles::Cluster::pair>(plan);
  return grouped_persistent_kernel_for<kGroups, kRows, kOut, tiles::Cluster::none>(plan);
}

template <persistent::Groups kGroups, int kRows>
PersistentKernelFn grouped_persistent_kernel_for(const Plan& plan, DType out) {
  using persistent::Out;
  if (!plan.out_tma) return grouped_persistent_kernel_for<kGroups, kRows, Out::threads>(plan);
  return out == DType::f16 ? grouped_persistent_kernel_for<kGroups, kRows, Out::f16_tma>(plan)
                           : grouped_persistent_kernel_for<kGroups, kRows, Out::bf16_tma>(plan);
}

TilesKernelFn tiles_kernel_for(const Plan& plan) {
  if (plan.pair) return tiles_kernel_for<tiles::Cluster::pair>(plan);
  if (plan.tiles_split > 1) return tiles_kernel_for<tiles::Cluster::split>(plan);
  return tiles_kernel_for<tiles::Cluster::none>(plan);
}

// The split of K over a cluster for a tiles grid of `tiles` tiles (1: none): the least estimated
// time in k-blocks, waves of the clusters the device holds at once x (the k-blocks of a rank, in
// whole groups of 4, plus 4 for a tile's prologue and epilogue), plus kTilesSplitCost for the
// exchange of sums and the SMs a split grid keeps from the next call. Each rank takes at least
// two groups. MOEKIT_SM90_TILES_SPLIT=n forces n (1..4) where K allows
// (timing knob and tests).
int tiles_split_for(const BlockGemmProblem& p, int64_t tiles, int device_index) {
  const int64_t k_groups = fp8::ceil_div(p.k_blocks, tiles::kOverlapGroup);
  const int forced = env::integer("MOEKIT_SM90_TILES_SPLIT", 0);
  int best_split = 1;
  double best = 0.0;
  bool found = false;
  for (int split = 1; split <= tiles::kMaxSplit; ++split) {
    if (split > 1 && k_groups < 2 * split) break;
    if (forced > 0 && split != forced) continue;
    const TilesKernelFn kernel =
        split > 1 ? gemm_tiles_kernel<true, tiles::ScaleFeed::warps, tiles::Cluster::split>
                  : gemm_tiles_kernel<true, tiles::ScaleFeed::warps, tiles::Cluster::none>;
    const int capacity = cluster_capacity(kernel, split, tiles::kSharedBytes, device_index);
    if (capacity < 1) continue;
    const double waves = static_cast<double>(fp8::ceil_div(tiles, capacity));
    const double cost =
        waves * (static_cast<double>(fp8::ceil_div(k_groups, split)) * tiles::kOverlapGroup + 4) +
        (split > 1 ? kTilesSplitCost : 0);
    if (found && cost >= best) continue;
    found = true;
    best = cost;
    best_split = split;
  }
  return best_split;
}

// The persistent kernel's last round split over K (persistent::item_at) where the caller gave a
// workspace and the last round is at most half full: each of the last round's units is cut into
// `parts` equal ranges of k-blocks, one per pair, so that no pair's range straddles two units
// (a pair with two items paid ~1.5 us to switch; H200, fp8-gpu-sm90.md, session 25). A unit's
// last pair adds the other parts' 128 KB tiles from L2, ~1.2 us each, so the parts trade a
// shorter range against more tiles to add: the fewest k-blocks of ceil(k_blocks / parts) +
// kSplitAddBlocks x (parts - 1), at most as many pairs as there are. Measured on an H200
// (session 25, run 2), 4 parts against the session-24 ranges of a third of a unit that straddled
// units: M=1280 N=4096 K=7168 71.6 -> 66.8 us, M=2304 116.9 -> 111.3, M=2560 N=7168 K=16384
// 447.9 -> 443.3 (cuBLASLt 63.4, 106.3, 456.8); without a split 83.3, 127.4, 474.5. The fill
// counts the split round as its range plus kSplitFixupBlocks + kSplitAddBlocks per added tile
// (16 k-blocks at 4 parts, ~13 us; the stamps put the round at 11-14 us beyond its range, session
// 25, run 6), which keeps session 24's picks: cuBLASLt keeps the N=4096 K=7168 shapes.
// Only on long k-ranges (kTilesLongK): at 16 k-blocks the split round lost (H200, session 39:
// M=2048 N=7168 K=2048 57.15 against 53.95 us without it, M=4096 N=1536 K=2048 30.30 against
// 27.54), at 32 it won (M=512 N=9216 K=4096 45.54 against 50.41, M=2048 N=3072 K=4096 46.84
// against 49.37). MOEKIT_SM90_SPLIT_ROUND=0 turns the split off, 2 splits whatever the last
// round's fill and k-range; MOEKIT_SM90_SPLIT_PARTS=n forces n parts where they fit (timing
// knobs).
constexpr int kSplitFixupBlocks = 10;
constexpr int kSplitAddBlocks = 2;

// The workspace: a flag word per SM, then a partial tile per SM. The same layout for every plan on
// a device, so that the flags stay zero between calls of any shapes.
size_t split_flag_bytes(int sm_count) {
  return (static_cast<size_t>(sm_count) * 4 + 255) / 256 * 256;
}
size_t split_workspace_bytes(int sm_count) {
  return split_flag_bytes(sm_count) + static_cast<size_t>(sm_count) * persistent::kPartialBytes;
}
void split_last_round(const BlockGemmProblem& p, int64_t units, int64_t slots, int sm_count,
                      Plan& plan) {
  const int64_t knob = env::integer("MOEKIT_SM90_SPLIT_ROUND", 1);
  if (knob == 0 || p.workspace == nullptr) return;
  if (units <= slots || units % slots == 0) return;
  if (knob != 2 && p.k_blocks < kTilesLongK) return;
  const int64_t rest = units % slots;
  if (knob != 2 && 2 * rest > slots) return;
  const int64_t most_parts = std::min<int64_t>(slots / rest, p.k_blocks);
  const auto cost = [&](int64_t parts) {
    return fp8::ceil_div(p.k_blocks, parts) + kSplitAddBlocks * (parts - 1);
  };
  int64_t parts = 1;
  for (int64_t n = 2; n <= most_parts; ++n)
    if (parts == 1 || cost(n) < cost(parts)) parts = n;
  if (const int64_t forced = env::integer("MOEKIT_SM90_SPLIT_PARTS", 0); forced > 0)
    parts = std::min(forced, most_parts);
  const int64_t pairs = rest * parts;
  if (parts < 2 || p.workspace_bytes < split_workspace_bytes(sm_count) ||
      pairs * plan.splits > sm_count)
    return;
  plan.split_units = static_cast<int>(rest);
  plan.split_pairs = static_cast<int>(pairs);
  const int64_t rounds = units / slots;
  plan.persistent_fill =
      static_cast<double>(units * p.k_blocks) /
      static_cast<double>(slots * (rounds * p.k_blocks + cost(parts) + kSplitFixupBlocks));
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
  // Wide tiles (256 x 128, persistent) where the scales are copied, on k-ranges of 16 k-blocks or
  // more, where their grid has more tiles than half the SMs: 128-row tiles would then need more
  // rounds of CTAs than the wide ones (H200, fp8-gpu-sm90.md, session 39: M=1024 N=4096 K=2048
  // 23.12 -> 16.01 us, M=512 N=7168 K=2048 22.06 -> 15.78, M=256 N=9216 K=4096 33.46 -> 26.53,
  // M=1024 N=3072 K=4096 33.01 -> 25.66; at 64 tiles for 132 SMs they lost, M=512 N=4096 K=2048
  // 14.73 against 11.73). Session 20 had taken them on long k-ranges with a CTA per SM (M=1024
  // N=4096 K=7168 54.1-54.9 -> 52.5-53.5 us).
  // MOEKIT_SM90_TILES_ROWS=128 or 256 forces the row count where it can be served (timing knob).
  const bool long_k = p.k_blocks >= kTilesLongK;
  const int64_t tiles_n = fp8::ceil_div(p.n, tiles::kBlockN);
  const int rows = env::integer("MOEKIT_SM90_TILES_ROWS", -1);
  const bool wide_pays =
      p.k_blocks >= kTilesWideLeastK && 2 * fp8::ceil_div(p.m, 256) * tiles_n > device.sm_count;
  if (plan.scale_feed != tiles::ScaleFeed::warps && (rows == 256 || (rows < 0 && wide_pays)))
    plan.tile_rows = 256;
  const bool wide = plan.tile_rows == 256;
  const bool narrow = plan.tile_rows == 128;
  const int64_t tiles_m = fp8::ceil_div(p.m, plan.tile_rows);
  const int pair = env::integer("MOEKIT_SM90_TILES_PAIR", -1);
  // Pairs of 128-row tiles share B (neighbouring tile rows: an even row count); pairs of wide
  // tiles share A (neighbouring tile columns: an even column count).
  plan.pair = (wide ? tiles_n : tiles_m) % 2 == 0 &&
              (pair >= 0 ? pair != 0 : long_k && tiles_m * tiles_n >= kTilesPairGrid);
  // Grids of fewer tiles than the SMs split K over clusters (two fragments only, not in pairs):
  // M=256 N=4096 K=7168 has 64 tiles for 132 SMs.
  if (plan.overlap && !plan.pair && narrow)
    plan.tiles_split = tiles_split_for(p, tiles_m * tiles_n, device_index);
  plan.splits = plan.pair ? 2 : plan.tiles_split;
  // Wide tiles are persistent (fp8-gpu-sm90.md, session 23: 7-12 % faster than a tile per CTA at
  // M = 1024..4096, H200). Their out tile goes out by TMA tensor stores where the out is 16-bit
  // without bias, with rows on 16 bytes and N a multiple of 8 (a store wrote the whole 16 bytes in
  // which a row ends: the out padding of N=4100 and 8190 changed on an H200); else the threads
  // store it (f32, bias, ragged N, unaligned rows).
  plan.persistent = wide;
  plan.out_tma = plan.persistent && p.out.dtype() != DType::f32 && !p.has_bias() && p.n % 8 == 0 &&
                 reinterpret_cast<uintptr_t>(p.out.data()) % 16 == 0 &&
                 (p.m <= 1 || p.out.stride(0) % 8 == 0);
  if (plan.persistent)
    plan.persistent_kernel = wide_persistent_kernel_for(plan, p.out.dtype());
  else
    plan.tiles_kernel = tiles_kernel_for(plan);
  // A and B tiles with 128-byte L2 promotion: each box row is 128 bytes of a K-byte row, and the
  // 256-byte default cost 2-7 % at M = 256..1024 (H200, session 17: M=256 N=7168 K=2048 12.3 ->
  // 11.4 us). MOEKIT_SM90_TILES_PROMOTION=0..3 forces none, 64, 128 or 256 bytes (timing knob).
  const int promotion = env::integer("MOEKIT_SM90_TILES_PROMOTION", -1);
  if (promotion >= 0 && promotion <= 3) plan.tile_promotion = promotion;
  plan.grid = dim3(static_cast<unsigned>(tiles_m * tiles_n * plan.tiles_split));
  plan.shared_bytes = tiles::kSharedBytes;
  if (plan.persistent) {  // as many CTAs (pairs) as are resident at once, or as there are units
    plan.shared_bytes = persistent::kSharedBytes;
    const int64_t units = tiles_m * tiles_n / plan.splits;
    const int resident =
        cluster_capacity(plan.persistent_kernel, plan.splits, plan.shared_bytes, device_index);
    const int64_t slots = std::max(resident, 1);
    plan.grid = dim3(static_cast<unsigned>(std::min<int64_t>(units, slots) * plan.splits));
    plan.persistent_rounds = fp8::ceil_div(units, slots);
    plan.persistent_fill =
        static_cast<double>(units) / static_cast<double>(plan.persistent_rounds * slots);
    split_last_round(p, units, slots, device.sm_count, plan);
    if (plan.split_units > 0)  // (as many resident: the same shared memory and threads)
      plan.persistent_kernel = wide_persistent_kernel_for(plan, p.out.dtype());
  }
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

// ---- grouped_block_fp8_gemm at decode sizes (gemm_swap_grouped.cuh).

using GroupedKernelFn = void (*)(CUtensorMap, CUtensorMap, GemmArgs, GroupStrides);
using GroupedBytesFn = size_t (*)(int, int, int, int);
// Token tiles of 8 to 64 rows, as the swap kernel's: whole groups up to M=64; the masked layout at
// any M up to 2048 token tiles (its capacity; the counts at decode are a few rows), whose token
// tiles with rows are the items the CTAs take (grouped_planned_problem).
constexpr int kMaxGroupedTokens = 64;
// Groups up to which a masked call whose groups are expected to hold many rows goes to one GEMM
// per group (measured at 4; each group is a launch of its own there).
constexpr int64_t kMaxGroupsPerGroupGemm = 8;
constexpr int kGroupedStages = 12;

struct GroupedPlan {
  Plan plan;  // group 0's swap plan, with the grouped kernel's ring depth and shared memory
  GroupedKernelFn kernel = nullptr;
  int max_items = 0;  // masked: the items (token tiles with rows) a CTA can list
};

template <int kTokens, int kRows, bool kGated>
size_t grouped_shared_bytes(int per_split, int stages, int splits, int groups) {
  using Config = Swap<kTokens, kRows, false>;
  return SwapGrouped<kTokens, kRows, kGated>::shared_bytes(
      per_split, stages, splits > 1 ? Config::inbox_bytes(splits) : 0, groups);
}

// The gated builds (silu_and_mul_grouped_block_fp8_gemm_masked) exist for token tiles of up to
// kMaxGatedTokens: their token tiles sit in shared memory beside the ring, 4 items deep.
constexpr int kMaxGatedTokens = 32;

// The grouped kernel of a build, or null where there is none (gated past kMaxGatedTokens or whole).
template <int kTokens, int kRows>
GroupedKernelFn grouped_kernel_of(GroupedBuild build, bool gated) {
  if (gated) {
    if constexpr (kTokens <= kMaxGatedTokens) {
      if (build == GroupedBuild::masked)
        return gemm_swap_grouped_kernel<kTokens, kRows, GroupedBuild::masked, true>;
      if (build == GroupedBuild::masked_tiles)
        return gemm_swap_grouped_kernel<kTokens, kRows, GroupedBuild::masked_tiles, true>;
    }
    return nullptr;
  }
  switch (build) {
    case GroupedBuild::whole:
      return gemm_swap_grouped_kernel<kTokens, kRows, GroupedBuild::whole>;
    case GroupedBuild::masked:
      return gemm_swap_grouped_kernel<kTokens, kRows, GroupedBuild::masked>;
    default:
      return gemm_swap_grouped_kernel<kTokens, kRows, GroupedBuild::masked_tiles>;
  }
}

template <int kTokens>
void grouped_kernel_of(int rows, GroupedBuild build, bool gated, GroupedKernelFn& kernel,
                       GroupedBytesFn& bytes) {
  kernel = rows == 64 ? grouped_kernel_of<kTokens, 64>(build, gated)
                      : grouped_kernel_of<kTokens, 128>(build, gated);
  if (gated)
    bytes = rows == 64 ? grouped_shared_bytes<kTokens, 64, true>
                       : grouped_shared_bytes<kTokens, 128, true>;
  else
    bytes = rows == 64 ? grouped_shared_bytes<kTokens, 64, false>
                       : grouped_shared_bytes<kTokens, 128, false>;
}

// The problem a grouped plan is made for: group 0, where masked on the caller's expected rows,
// else on at most 16: a capacity's token tiles with rows are the items, and every token tile of a
// group streams the group's weights once. At decode the counts are a few rows (H200, a Qwen3-30B
// MoE step at capacity 128, one row per expert: planned for 8 / 16 / 32 / 64 rows 1.46 / 1.53 /
// 1.67 / 2.25 us per gate_up; fp8-gpu-sm90.md, session 32), while 16 halves the weight passes of
// 8 where an expert has many rows. MOEKIT_SM90_GROUPED_MASKED_ROWS=r plans for r where the caller
// gave no hint (timing knob).
BlockGemmProblem grouped_planned_problem(const GroupedBlockGemmProblem& p) {
  const int64_t unhinted = env::integer("MOEKIT_SM90_GROUPED_MASKED_ROWS", 16);
  const int64_t rows =
      std::clamp<int64_t>(p.expected_rows > 0 ? p.expected_rows : unhinted, 1, kMaxGroupedTokens);
  return p.masked() && p.m > rows ? p.group(0, rows) : p.group(0);
}

// The swap plan of `problem` with layout {rows, splits} (null: the planner's), for its token width.
bool grouped_swap_plan(const BlockGemmProblem& problem, int device_index, const SwapLayout* layout,
                       Plan& plan) {
  const DeviceProperties& device = device_properties(device_index);
  if (problem.m <= 8) return plan_swap<8, false>(problem, device, device_index, layout, plan);
  if (problem.m <= 16) return plan_swap<16, false>(problem, device, device_index, layout, plan);
  if (problem.m <= 32) return plan_swap<32, false>(problem, device, device_index, layout, plan);
  return plan_swap<64, false>(problem, device, device_index, layout, plan);
}

// A grouped plan for group 0's swap plan `plan` (its layout and split fix the order of the sums):
// the grouped kernel, as many of that plan's stages as fit beside the kernel's own shared memory,
// and the slices of the groups one wave holds (MOEKIT_SM90_GROUPED_SLICES=s forces s, a timing
// knob). `gated`: the build that quantizes silu(gate) * up itself. Returns "" or why there is none.
std::string grouped_plan_of(const GroupedBlockGemmProblem& p, int device_index,
                            GroupedPlan& grouped, bool gated = false) {
  const BlockGemmProblem first = grouped_planned_problem(p);
  Plan& plan = grouped.plan;
  if (!plan.swap || plan.tokens > kMaxGroupedTokens)
    return "the plan of group 0 is not a swap plan of 8 to 64 tokens (" +
           block_gemm_sm90_plan(first) + ")";
  if (plan.splits > 1 && !plan.push_sums) return "the plan of group 0 pulls its sums through DSMEM";
  GroupedBytesFn bytes = nullptr;
  const bool masked = p.masked();
  const int64_t token_tiles = fp8::ceil_div(p.m, int64_t{plan.tokens});
  const GroupedBuild build = !masked            ? GroupedBuild::whole
                             : token_tiles == 1 ? GroupedBuild::masked
                                                : GroupedBuild::masked_tiles;
  switch (plan.tokens) {
    case 8:
      grouped_kernel_of<8>(plan.rows, build, gated, grouped.kernel, bytes);
      break;
    case 16:
      grouped_kernel_of<16>(plan.rows, build, gated, grouped.kernel, bytes);
      break;
    case 32:
      grouped_kernel_of<32>(plan.rows, build, gated, grouped.kernel, bytes);
      break;
    default:
      grouped_kernel_of<64>(plan.rows, build, gated, grouped.kernel, bytes);
      break;
  }
  if (grouped.kernel == nullptr)
    return "no build quantizing silu(gate) * up for " + std::to_string(plan.tokens) +
           "-token tiles (at most " + std::to_string(kMaxGatedTokens) + ")";
  // The grid: x the row tiles (times the split), y the slices of the groups; the masked layout's
  // token tiles (of its capacity M) are items within them.
  if (masked && token_tiles > kMaxItemTiles)
    return "M=" + std::to_string(p.m) + " makes over " + std::to_string(kMaxItemTiles) +
           " token tiles";
  if (!masked && token_tiles > 1) return "M is past the plan's token tile";
  plan.grid.z = 1;
  // Slices: as many as the clusters that fit at once hold beside the row tiles
  // (MOEKIT_SM90_GROUPED_SLICES=s forces s). The masked build's item list is sized before the
  // shared memory is known, for the slices of one CTA per SM; its grid takes at least as many
  // slices, so that the list is never short.
  const int64_t clusters = int64_t{plan.grid.x} / plan.splits;  // one slice's
  const int forced = env::integer("MOEKIT_SM90_GROUPED_SLICES", 0);
  const int64_t most_items = masked ? p.groups * token_tiles : p.groups;
  const auto slices_of = [&](int64_t wave) {
    return std::clamp<int64_t>(forced > 0 ? forced : wave / clusters, 1, most_items);
  };
  const int64_t fewest_slices = slices_of(device_properties(device_index).sm_count / plan.splits);
  const int64_t max_items = masked ? fp8::ceil_div(most_items, fewest_slices) : 0;
  if (masked && max_items + p.groups > (int64_t{1} << 16))  // (shared memory: a few thousand)
    return "the list of " + std::to_string(p.groups) + " groups' " + std::to_string(token_tiles) +
           " token tiles does not fit shared memory";
  grouped.max_items = static_cast<int>(max_items);
  const int per_split = static_cast<int>(fp8::ceil_div(first.k_blocks, plan.splits));
  const size_t limit = device_properties(device_index).shared_memory_per_block_optin;
  // 12 stages (H200, moekit bench --op gemm-grouped, 8 groups, N=4096 K=7168: M=1 / 4 / 16 8.12 /
  // 8.23 / 8.47 us per GEMM against 8.18 / 8.32 / 8.59 with 16, one run; 20 measured slower with
  // the build before the scale loader; fp8-gpu-sm90.md, session 29), or fewer where that is what
  // fits. MOEKIT_SM90_GROUPED_STAGES=n (even) forces n (timing knob).
  int stages = env::integer("MOEKIT_SM90_GROUPED_STAGES", kGroupedStages);
  stages = std::max(2, (stages + 1) / 2 * 2);
  // The masked build's list: each group's rows, the CTA's items, their count.
  const int listed = masked ? static_cast<int>(p.groups) + grouped.max_items + 1 : 0;
  while (stages > 2 && bytes(per_split, stages, plan.splits, listed) + 1024 > limit) stages -= 2;
  plan.stages = stages;
  plan.shared_bytes = bytes(per_split, stages, plan.splits, listed);
  if (plan.shared_bytes + 1024 > limit)
    return "the scales of a CTA's k-range and the list of " + std::to_string(p.groups) +
           " groups' token tiles do not fit shared memory";
  // masked_m is the previous kernel's output: no weights load before its wait.
  plan.early_weights = plan.early_weights && !masked;
  plan.co_resident = false;
  plan.bulk_stores = false;
  plan.loader_scales = false;
  plan.early_tiles = std::min(plan.early_tiles, plan.stages);
  plan.cluster_capacity =
      cluster_capacity(grouped.kernel, plan.splits, plan.shared_bytes, device_index);
  if (plan.cluster_capacity < 1) return "no cluster of the grouped kernel fits an SM";
  const int64_t wave_slices = slices_of(plan.cluster_capacity);
  plan.grid.y = static_cast<unsigned>(masked ? std::max(fewest_slices, wave_slices) : wave_slices);
  return "";
}

// Estimated microseconds of a grouped plan for `groups` groups with rows, dealt to the slices in
// turn: each busy CTA's groups x (its weight bytes over its share of 4.2 TB/s, at most 50 GB/s
// per SM, plus 1 us per group where K is split: the cluster's sums and their waits). Fitted on an
// H200 (fp8-gpu-sm90.md, session 30: at the experts' shapes every layout without a split, its
// groups spread over the SMs, beat the split plans by 20-55 %).
double grouped_plan_us(const Plan& plan, int64_t groups, int64_t k_blocks) {
  const int64_t busy_slices = std::min<int64_t>(plan.grid.y, groups);
  const int64_t ctas = int64_t{plan.grid.x} * busy_slices;
  const double bytes_per_us = std::min(50e3, 4.2e6 / static_cast<double>(ctas));
  const int64_t per_split = fp8::ceil_div(k_blocks, plan.splits);
  const double group_us =
      static_cast<double>(per_split * plan.rows * kBlockK) / bytes_per_us + (plan.splits > 1);
  return static_cast<double>(fp8::ceil_div(groups, int64_t{plan.grid.y})) * group_us;
}

// The grouped kernel's plan: of group 0's swap plan and the layouts of 64 and 128 rows without a
// K split, each with the slices of the groups one wave holds, the one with the least estimated
// time; only group 0's plan where MOEKIT_SM90_SWAP forces a layout. Every group has rows, or
// (masked) half of them, as the masked layout's launch cannot know how many: where two tie, the
// larger rows, or (masked) the smaller, whose groups each spread over more SMs (H200, session 30,
// 4 of 8 groups with rows: 64 rows 1.53 / 4.03 / 4.39 us per group against 128 rows' 2.24 / 4.71 /
// 5.05 at the Qwen3-30B and 235B experts' gate_up and DeepSeek-V3's down). Each group's out has
// the bits gpu.sm90 writes with the plan's layout. Returns "" or why there is none.
std::string grouped_plan_for(const GroupedBlockGemmProblem& p, int device_index,
                             GroupedPlan& grouped) {
  const BlockGemmProblem first = grouped_planned_problem(p);
  std::string why = grouped_swap_plan(first, device_index, nullptr, grouped.plan)
                        ? grouped_plan_of(p, device_index, grouped)
                        : "no swap layout fits group 0 (" + block_gemm_sm90_plan(first) + ")";
  int rows = 0, splits = 0;
  if (forced_swap(rows, splits)) return why;
  const bool masked = p.masked();
  const int64_t with_rows = masked ? (p.groups + 1) / 2 : p.groups;
  double best = why.empty() ? grouped_plan_us(grouped.plan, with_rows, first.k_blocks)
                            : std::numeric_limits<double>::infinity();
  for (const int candidate_rows : {masked ? 64 : 128, masked ? 128 : 64}) {
    const SwapLayout layout{candidate_rows, 1};
    GroupedPlan candidate;
    const bool found = grouped_swap_plan(first, device_index, &layout, candidate.plan);
    if (!found || !grouped_plan_of(p, device_index, candidate).empty()) continue;
    const double us = grouped_plan_us(candidate.plan, with_rows, first.k_blocks);
    if (us < best * 0.999) {
      best = us;
      grouped = candidate;
      why.clear();
    }
  }
  return why;
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
        &attributes, reinterpret_cast<const void*>(
                         gemm_tiles_kernel<false, tiles::ScaleFeed::warps, tiles::Cluster::none>));
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

size_t block_gemm_workspace_size(int64_t m, int64_t n, int64_t k, int device) {
  if (m <= 128 || n == 0 || k == 0) return 0;  // the swap kernel, or nothing to do
  const DeviceProperties& props = device_properties(device);
  if (props.major != 9) return 0;
  return split_workspace_bytes(props.sm_count);
}

Sm90LargeMPlan block_gemm_sm90_large_m_plan(const BlockGemmProblem& p) {
  if (p.m == 0 || p.n == 0) return {};
  const int device = p.a.device().index;
  DeviceGuard on_device(device);
  const Plan plan = plan_for(p, device);
  return {plan.tiles_split, plan.persistent_fill, plan.persistent_rounds};
}

std::string block_gemm_sm90_plan(const BlockGemmProblem& p) {
  if (p.m == 0 || p.n == 0) return "nothing to do";
  const int device = p.a.device().index;
  DeviceGuard on_device(device);
  const Plan plan = plan_for(p, device);
  char text[300];
  char early[40] = "", split[72] = "", promotion[32] = "no L2 promotion";
  if (plan.tile_promotion > 0)
    std::snprintf(promotion, sizeof promotion, "%d-byte L2 promotion", 32 << plan.tile_promotion);
  if (plan.tiles_split > 1)
    std::snprintf(split, sizeof split, ", K split %d ways (cluster)", plan.tiles_split);
  if (plan.split_units > 0)
    std::snprintf(split, sizeof split, ", last round of %d units split over K by %d %s",
                  plan.split_units, plan.split_pairs, plan.pair ? "pairs" : "CTAs");
  if (plan.early_weights)
    std::snprintf(
        early, sizeof early,
        plan.early_tiles < plan.stages ? ", early weight loads (%d)" : ", early weight loads",
        plan.early_tiles);
  if (plan.swap)
    std::snprintf(text, sizeof text,
                  "swap: %d tokens x %d weight rows per CTA, K split %d ways (cluster), grid %u x "
                  "%u, %d stages, %zu B shared, %d clusters resident%s%s%s%s%s%s",
                  plan.tokens, plan.rows, plan.splits, plan.grid.x, plan.grid.y, plan.stages,
                  plan.shared_bytes, plan.cluster_capacity, early,
                  plan.co_resident ? ", 2 CTAs per SM" : "", plan.push_sums ? ", pushed sums" : "",
                  plan.bulk_stores ? ", bulk-copied stores" : "",
                  plan.loader_scales ? ", scales loaded by producer warps" : "",
                  plan.weight_promotion == 0 ? ", weights unpromoted in L2" : "");
  else
    std::snprintf(text, sizeof text, "tiles: %d x 128, grid %u, %zu B shared%s%s%s%s, %s",
                  plan.tile_rows, plan.grid.x, plan.shared_bytes,
                  !plan.pair              ? ""
                  : plan.tile_rows == 256 ? ", pairs sharing A tiles (cluster of 2)"
                                          : ", pairs sharing B tiles (cluster of 2)",
                  split,
                  plan.out_tma      ? ", two waves per k-block, persistent, TMA stores"
                  : plan.persistent ? ", two waves per k-block, persistent"
                  : plan.overlap    ? ", two fragments take turns"
                                    : "",
                  plan.scale_feed == tiles::ScaleFeed::warps ? ", scales from the scale warps"
                                                             : ", scales copied with the tiles",
                  promotion);
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
    set_swap_args(plan, args);
    launch(plan, plan.kernel, p.stream, device, first, second, args);
    return;
  }
  // Pairs: each CTA copies half of the shared tile (A for wide tiles, else B) into both rings.
  const bool wide = plan.tile_rows == 256;
  first =
      make_tile_map("a", p.a.data(), p.m, p.k, p.a.stride(0),
                    plan.pair && wide ? plan.tile_rows / 2 : plan.tile_rows, plan.tile_promotion);
  second =
      make_tile_map("b", p.b.data(), p.n, p.k, p.b.stride(0),
                    plan.pair && !wide ? tiles::kBlockN / 2 : tiles::kBlockN, plan.tile_promotion);
  args.tiles_m = static_cast<int>(fp8::ceil_div(p.m, plan.tile_rows));
  args.tiles_n = static_cast<int>(fp8::ceil_div(p.n, tiles::kBlockN));
  args.splits = plan.tiles_split;
  args.b_scale_k_inner = plan.b_scale_k_inner;
  args.b_scale_lanes = p.b_scales.dtype() == DType::bf16 ? 8 : 4;
#ifdef MOEKIT_FP8_TRACE
  args.tiles_ablation = env::integer("MOEKIT_SM90_TILES_ABLATE", 0);
  if (args.tiles_ablation != 0 && plan.persistent)
    fail(kOp, "MOEKIT_SM90_TILES_ABLATE", std::to_string(args.tiles_ablation),
         "the persistent wide tiles take no ablation (MOEKIT_SM90_TILES_ROWS=128 takes tiles of "
         "128 rows)");
  if (args.tiles_ablation == tiles::kPairedCopies) {
    if (plan.pair || plan.tile_rows != 128 || p.k_blocks % 2 != 0 || p.k % kBlockK != 0)
      fail(kOp, "MOEKIT_SM90_TILES_ABLATE", "5",
           "two k-blocks per copy need an even k-block count, K a multiple of 128, no pairs "
           "of CTAs (MOEKIT_SM90_TILES_PAIR=0) and tiles of 128 rows");
    first = make_pair_tile_map(p.a.data(), p.m, p.k, p.a.stride(0), tiles::kBlockM,
                               plan.tile_promotion);
    second = make_pair_tile_map(p.b.data(), p.n, p.k, p.b.stride(0), tiles::kBlockN,
                                plan.tile_promotion);
  }
#endif
  const ScaleMaps maps = scale_maps_of(p, plan.scale_feed, plan.b_scale_k_inner, plan.tile_rows);
  if (plan.persistent) {
    const CUtensorMap out_map = plan.out_tma ? make_out_map(p) : CUtensorMap{};
    if (plan.split_units > 0) {  // flags first, then a tile per CTA
      args.sk_units = plan.split_units;
      args.sk_pairs = plan.split_pairs;
      args.sk_flags = static_cast<uint32_t*>(p.workspace);
      args.sk_partials = reinterpret_cast<float*>(
          static_cast<char*>(p.workspace) + split_flag_bytes(device_properties(device).sm_count));
    }
    launch(plan, plan.persistent_kernel, p.stream, device, first, second, args, maps, out_map);
    return;
  }
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
  // The consumers quantize the CTA's whole k-range before their first product, so where the range
  // is longer than the ring the weight tiles past it wait, and the fewer stages beside the token
  // tiles (8 here, 12-16 in the two-kernel GEMM) start the stream later: the more groups (tokens x
  // k-blocks of the range), the more the second kernel's ~1 us is outweighed. Measured on an H200
  // against the two kernels (docs/perf/fp8-gpu-sm90.md, session 38: 12 shapes, M = 1..16; us,
  // fused vs two): 128-row CTAs past the ring win at <= 96 groups (N=24576 K=1536 M=8 15.15 vs
  // 15.89) and lose from 128 (N=9216 K=4096 M=4 13.1 vs 12.8, N=7168 K=16384 M=2 32.4 vs 31.0);
  // 64-row CTAs with 8-token tiles win at 128 (N=4096 K=8192 M=4 11.3 vs 11.7) and lose at 168
  // (N=4096 K=7168 M=6 11.1 vs 10.8); with 16-token tiles they lose at 128 even where the ring
  // holds the range (N=4096 K=2048 M=16 7.1 vs 6.7; M=12, 96 groups, 6.4 vs 6.8); 128-row CTAs
  // whose ring holds the range win or tie up to M=16. MOEKIT_SM90_FUSED_GROUPS=n sets one limit for
  // every plan (timing knob).
  const int forced_limit = env::integer("MOEKIT_SM90_FUSED_GROUPS", -1);
  const int64_t range = fp8::ceil_div(g.k_blocks, plan.splits);
  const bool limited = forced_limit >= 0 || plan.rows != 128 || !plan.ring_holds_k_range;
  const int limit = forced_limit >= 0                     ? forced_limit
                    : plan.rows == 64 && plan.tokens == 8 ? kMostFusedGroupsOf64RowsBy8
                                                          : kMostFusedGroups;
  if (limited && g.m * range > limit)
    return "M=" + str(g.m) + " x a CTA's " + str(range) + " k-blocks = " + str(g.m * range) +
           " groups > " + str(limit) + " for " + str(plan.rows) + "-row CTAs with " +
           str(plan.tokens) + "-token tiles and a ring of " + str(plan.stages) +
           " stages (measured slower than quantizing in a kernel of its own)";
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
  set_swap_args(plan, args);
  const CUtensorMap weight = make_tile_map("weight", g.b.data(), g.n, g.k, g.b.stride(0), plan.rows,
                                           plan.weight_promotion);
  const CUtensorMap unused{};  // the kernel reads x itself, not through a tensor map
  launch(plan, plan.kernel, g.stream, device, weight, unused, args);
}

namespace {
// What the grouped kernel needs of a call before any plan is made ("" where it may serve).
std::string grouped_gemm_sm90_checks(const GroupedBlockGemmProblem& p) {
  if (p.groups == 0) return "";
  const BlockGemmProblem first = p.group(0);
  if (std::string why = block_gemm_sm90_supports(first); !why.empty()) return why;
  if (p.m > kMaxGroupedTokens && !p.masked())
    return "M=" + str(p.m) + " > " + str(kMaxGroupedTokens) +
           " (the grouped kernel takes decode sizes, token tiles of 8 to 64, or the masked layout)";
  if (p.groups > 1 && (p.a.stride(0) % 16 != 0 || p.b.stride(0) % 16 != 0))
    return "a's or b's groups are not 16 bytes apart (TMA needs it)";
  if (p.groups > (int64_t{1} << 20)) return "G=" + str(p.groups) + " > 2^20 groups";
  // Experts expected to hold more rows than a token tile, few of them, at a capacity of at most
  // twice that: each token tile would stream its group's weights again, and one block_fp8_gemm per
  // group (all M rows, the tiles kernel) is faster. H200, N=4096 K=7168, G=4, us per group with
  // rows (fp8-gpu-sm90.md, session 33): 256 rows at capacity 256 39.5 here against 20.4 per group;
  // 128 at 256 21.3 against 20.3; 256 at 1024 39.5 against 46.4 (this entry kept).
  if (p.masked() && p.expected_rows > kMaxGroupedTokens && p.groups <= kMaxGroupsPerGroupGemm &&
      p.m <= 2 * p.expected_rows)
    return str(p.groups) + " groups expected to hold " + str(p.expected_rows) +
           " rows each, past the " + str(kMaxGroupedTokens) +
           "-row token tiles, at a capacity of at most twice that: one GEMM per group is faster";
  return "";
}
}  // namespace

std::string grouped_gemm_sm90_supports(const GroupedBlockGemmProblem& p) {
  if (std::string why = grouped_gemm_sm90_checks(p); !why.empty()) return why;
  if (p.groups == 0 || p.m == 0 || p.n == 0) return "";
  const int device = p.a.device().index;
  DeviceGuard on_device(device);
  GroupedPlan grouped;
  return grouped_plan_for(p, device, grouped);
}

std::string grouped_gemm_sm90_plan(const GroupedBlockGemmProblem& p) {
  if (p.groups == 0 || p.m == 0 || p.n == 0) return "nothing to do";
  const int device = p.a.device().index;
  DeviceGuard on_device(device);
  GroupedPlan grouped;
  if (!grouped_plan_for(p, device, grouped).empty()) return "no grouped plan";
  const Plan& plan = grouped.plan;
  char text[300];
  std::snprintf(
      text, sizeof text,
      "grouped swap, %lld groups in one launch: %d tokens x %d weight rows per CTA, K "
      "split %d ways (cluster), grid %u x %u (row tiles, slices of the %s), %d stages, %zu B "
      "shared%s%s",
      static_cast<long long>(p.groups), plan.tokens, plan.rows, plan.splits, plan.grid.x,
      plan.grid.y, p.masked() ? "token tiles with rows" : "groups", plan.stages, plan.shared_bytes,
      plan.early_weights ? ", early weight loads" : "", plan.splits > 1 ? ", pushed sums" : "");
  return text;
}

void grouped_block_fp8_gemm_sm90(const GroupedBlockGemmProblem& p) {
  if (p.groups == 0 || p.m == 0 || p.n == 0) return;
  const int device = p.a.device().index;
  DeviceGuard on_device(device);
  GroupedPlan grouped;
  if (std::string why = grouped_plan_for(p, device, grouped); !why.empty())
    fail("grouped_block_fp8_gemm", "backend", "gpu.sm90.grouped", "has no plan: " + why);
  const Plan& plan = grouped.plan;
  const BlockGemmProblem first = p.group(0);
  GemmArgs args = args_of(first);
  set_swap_args(plan, args);
  const CUtensorMap weights =
      make_grouped_tile_map("b", p.b.data(), p.groups, p.n, p.k, p.b.stride(1), p.b.stride(0),
                            plan.rows, plan.weight_promotion);
  const CUtensorMap tokens = make_grouped_tile_map("a", p.a.data(), p.groups, p.m, p.k,
                                                   p.a.stride(1), p.a.stride(0), plan.tokens);
  // MOEKIT_SM90_GROUPED_LATE_SUMS=0 stores each group before the next one's k-loop (timing knob).
  const GroupStrides strides{static_cast<int>(p.groups),
                             p.a_scales.stride(0),
                             p.b_scales.stride(0),
                             p.out.stride(0),
                             env::integer("MOEKIT_SM90_GROUPED_LATE_SUMS", 1) != 0,
                             p.masked() ? p.masked_m.data_as<const int>() : nullptr,
                             grouped.max_items,
                             0};
  launch(plan, grouped.kernel, p.stream, device, weights, tokens, args, strides);
}

// ---- grouped_block_fp8_gemm with many rows per group: persistent wide tiles.
//
// Past the grouped kernel's 64-row token tiles (whole groups of M > 64, or the masked layout with
// more than 64 rows expected per group), each token tile of a group would stream its weights
// again, and one GEMM per group pays a launch and a tail each; instead the persistent wide kernel
// (gemm_wide_persistent.cuh, grouped build) takes 256 x 128 tiles of every group's rows in one
// launch. Its CTAs read the counts (masked) after the wait, number the tiles of the groups' rows
// group after group, and take them in turn: no tile past a group's rows is multiplied, and a
// group's rows get the sums block_fp8_gemm's wide tiles give them (the same products in the same
// order).

// Groups whose first tiles the CTAs list in shared memory, past the kernel's own.
constexpr int64_t kMaxGroupedWideGroups = 256;
// Whole groups up to which (M x k-blocks per group) one launch beats one GEMM per group, whose
// launches get pairs of CTAs sharing A tiles and a split last round but pay a tail each. H200,
// session 35, 8 groups, us per GEMM, one launch against one each: N=4096 K=7168 M=256 12.46 /
// 19.25, M=1024 43.90 / 45.69, M=2048 87.59 / 92.18, M=4096 202.47 / 184.85 (lost); N=7168 K=2048
// M=512 12.74 / 22.49, M=4096 93.81 / 153.31. Session 36 (loader warp, pairs at K <= 2048), run
// 9: K=7168 M=2048 93.53 / 87.85, M=4096 197.38 / 199.51 (run 8: 170.58 / 202.74), M=8192 404.81 /
// 405.50; K=2048 M=4096 103.86 / 156.74, M=8192 208.63 / 314.49: the bound stays.
constexpr int64_t kMostGroupedWideWork = int64_t{1} << 17;
static_assert(persistent::SharedLayout<256>::kSharedBytes +
                      (kMaxGroupedWideGroups + 1) * sizeof(int) <=
                  232448,
              "fits the opt-in shared memory of sm_90");
static_assert(persistent::SharedLayout<128>::kSharedBytes +
                      (kMaxGroupedWideGroups + 1) * sizeof(int) <=
                  232448,
              "fits the opt-in shared memory of sm_90");
// Pairs of CTAs sharing A tiles in the grouped wide build up to this many k-blocks (measured
// below, grouped_wide_plan_for).
constexpr int64_t kMostPairedGroupedKBlocks = 16;
// Groups of at most this many rows (masked: expected) take tiles of 128 rows: a 256-row tile
// would multiply as many padding rows again.
constexpr int64_t kMostRowsOfNarrowTiles = 128;

namespace {
// Why the grouped wide tiles do not serve p ("" where they do); the plan in `plan`.
std::string grouped_wide_plan_for(const GroupedBlockGemmProblem& p, int device_index, Plan& plan) {
  if (!p.masked() && p.m <= kMaxGroupedTokens)
    return "M=" + str(p.m) + " <= " + str(kMaxGroupedTokens) +
           " (the grouped kernel's token tiles take whole groups)";
  const int64_t k_blocks = fp8::ceil_div(p.k, int64_t{kFp8BlockSize});
  // (MOEKIT_SM90_GROUPED_WIDE_MOST=n moves the bound: timing knob)
  const int64_t most_work =
      env::integer("MOEKIT_SM90_GROUPED_WIDE_MOST", static_cast<int>(kMostGroupedWideWork));
  if (!p.masked() && p.m * k_blocks > most_work)
    return "whole groups of M x k-blocks = " + str(p.m * k_blocks) + " > " + str(most_work) +
           ": one GEMM per group is faster";
  if (p.masked() && p.expected_rows <= kMaxGroupedTokens)
    return p.expected_rows == 0
               ? std::string("no expected rows given (the grouped kernel plans for decode)")
               : "expected rows " + str(p.expected_rows) + " <= " + str(kMaxGroupedTokens) +
                     " (the grouped kernel's token tiles take them)";
  if (p.groups > kMaxGroupedWideGroups)
    return "G=" + str(p.groups) + " > " + str(kMaxGroupedWideGroups) + " groups";
  const BlockGemmProblem first = p.group(0);
  if (std::string why = block_gemm_sm90_supports(first); !why.empty()) return why;
  if (p.groups > 1 && (p.a.stride(0) % 16 != 0 || p.b.stride(0) % 16 != 0))
    return "a's or b's groups are not 16 bytes apart (TMA needs it)";
  plan.tile_rows = (p.masked() ? p.expected_rows : p.m) <= kMostRowsOfNarrowTiles ? 128 : 256;
  // Every group's rows are at most M: at most this many tiles, which the kernel counts in ints.
  const int64_t most_units = p.groups * fp8::ceil_div(p.m, int64_t{plan.tile_rows}) *
                             fp8::ceil_div(p.n, int64_t{tiles::kBlockN});
  if (most_units > std::numeric_limits<int>::max()) return "more tiles than an int counts";
  plan.scale_feed = activation_scale_feed(first);
  if (plan.scale_feed == tiles::ScaleFeed::warps ||
      (p.groups > 1 && (p.a_scales.stride(0) * 4) % 16 != 0))
    return "the activation scales cannot be copied with the tiles (TMA: 16-byte aligned planes "
           "and rows)";
  plan.persistent = true;
  plan.out_tma = p.out.dtype() != DType::f32 && p.n % 8 == 0 &&
                 reinterpret_cast<uintptr_t>(p.out.data()) % 16 == 0 &&
                 (p.m <= 1 || p.out.stride(1) % 8 == 0) &&
                 (p.groups <= 1 || p.out.stride(0) % 8 == 0);
  // Pairs of CTAs take the two column tiles of a unit, each copying half of the A tile into both
  // rings, where the column tiles pair up and K is short. H200, session 36, run 8, us per GEMM,
  // pairs against CTAs alone: 8 DeepSeek-V3 down GEMMs (K=2048) of 4096 rows 90.85 / 97.32; at
  // K=7168 they lost: gate_up M=4096 181.11 / 170.58, M=1024 43.33 / 42.71, DeepGEMM's masked
  // case 13.40 / 13.16; Qwen3-30B gate_up (K=2048) at 128 rows 1.00 / 0.99.
  // MOEKIT_SM90_GROUPED_PAIR=0 or 1 forces them off or on (timing knob).
  const int pair = env::integer("MOEKIT_SM90_GROUPED_PAIR", -1);
  plan.pair = fp8::ceil_div(p.n, int64_t{tiles::kBlockN}) % 2 == 0 &&
              (pair >= 0 ? pair != 0 : k_blocks <= kMostPairedGroupedKBlocks);
  plan.splits = plan.pair ? 2 : 1;
  using persistent::Groups;
  plan.persistent_kernel =
      plan.tile_rows == 128
          ? grouped_persistent_kernel_for<Groups::planes, 128>(plan, p.out.dtype())
          : grouped_persistent_kernel_for<Groups::planes, 256>(plan, p.out.dtype());
  plan.shared_bytes = (plan.tile_rows == 128 ? persistent::SharedLayout<128>::kSharedBytes
                                             : persistent::SharedLayout<256>::kSharedBytes) +
                      static_cast<size_t>(p.groups + 1) * sizeof(int);
  const int resident =
      cluster_capacity(plan.persistent_kernel, plan.splits, plan.shared_bytes, device_index);
  if (resident < 1) return "no CTA (pair) of the grouped wide kernel fits the device";
  // As many CTAs (pairs) as are resident, or as the capacity has tiles (pairs of them).
  plan.grid = dim3(static_cast<unsigned>(
      std::max<int64_t>(1, std::min<int64_t>(most_units / plan.splits, resident)) * plan.splits));
  return "";
}
}  // namespace

std::string grouped_wide_gemm_sm90_supports(const GroupedBlockGemmProblem& p) {
  if (p.groups == 0 || p.m == 0 || p.n == 0) return "";
  const int device = p.a.device().index;
  DeviceGuard on_device(device);
  Plan plan;
  return grouped_wide_plan_for(p, device, plan);
}

std::string grouped_wide_gemm_sm90_plan(const GroupedBlockGemmProblem& p) {
  if (p.groups == 0 || p.m == 0 || p.n == 0) return "nothing to do";
  const int device = p.a.device().index;
  DeviceGuard on_device(device);
  Plan plan;
  if (!grouped_wide_plan_for(p, device, plan).empty()) return "no grouped wide plan";
  char text[300];
  std::snprintf(text, sizeof text,
                "grouped wide tiles, %lld groups in one launch: %d x 128 tiles of the groups' "
                "rows%s, %u persistent CTAs%s, activation scales %s, %s",
                static_cast<long long>(p.groups), plan.tile_rows,
                p.masked() ? " (the counts')" : "", plan.grid.x,
                plan.pair ? " in pairs sharing A tiles" : "",
                plan.scale_feed == tiles::ScaleFeed::a_k_inner ? "k-inner" : "m-inner",
                plan.out_tma ? "TMA stores" : "the threads store");
  return text;
}

void grouped_wide_block_fp8_gemm_sm90(const GroupedBlockGemmProblem& p) {
  if (p.groups == 0 || p.m == 0 || p.n == 0) return;
  const int device = p.a.device().index;
  DeviceGuard on_device(device);
  Plan plan;
  if (std::string why = grouped_wide_plan_for(p, device, plan); !why.empty())
    fail("grouped_block_fp8_gemm", "backend", "gpu.sm90.grouped_wide", "has no plan: " + why);
  const BlockGemmProblem first = p.group(0);
  GemmArgs args = args_of(first);
  const CUtensorMap a_map =  // (pairs: each CTA copies half of the A tile)
      make_grouped_tile_map("a", p.a.data(), p.groups, p.m, p.k, p.a.stride(1), p.a.stride(0),
                            plan.pair ? plan.tile_rows / 2 : plan.tile_rows, plan.tile_promotion);
  const CUtensorMap b_map =
      make_grouped_tile_map("b", p.b.data(), p.groups, p.n, p.k, p.b.stride(1), p.b.stride(0),
                            tiles::kBlockN, plan.tile_promotion);
  args.tiles_m = static_cast<int>(fp8::ceil_div(p.m, int64_t{plan.tile_rows}));
  args.tiles_n = static_cast<int>(fp8::ceil_div(p.n, int64_t{tiles::kBlockN}));
  args.splits = plan.splits;
  args.b_scale_k_inner = plan.b_scale_k_inner;
  args.b_scale_lanes = p.b_scales.dtype() == DType::bf16 ? 8 : 4;
  args.masked_m = p.masked() ? p.masked_m.data_as<const int>() : nullptr;
  args.groups = static_cast<int>(p.groups);
  args.out_group_stride = p.out.stride(0);
  // (pairs of columns stored as one vector: in every group's plane, not only group 0's)
  if (p.groups > 1 && p.out.stride(0) % 2 != 0) args.epilogue.out_pairs = false;
  args.b_scale_group_stride = p.b_scales.stride(0);
  const ScaleMaps maps =
      scale_maps_of(first, plan.scale_feed, plan.b_scale_k_inner, plan.tile_rows, p.groups,
                    p.a_scales.stride(0) * 4, 0, /*a_groups=*/true, /*b_map=*/false);
  const CUtensorMap out_map =
      plan.out_tma ? make_out_map(first, plan.tile_rows, p.groups, p.out.stride(0)) : CUtensorMap{};
  launch(plan, plan.persistent_kernel, p.stream, device, a_map, b_map, args, maps, out_map);
}

// ---- grouped_block_fp8_gemm_contiguous: persistent tiles of a's blocks.
//
// DeepGEMM's contiguous layout (MoE prefill): the experts' rows one after another in one [M, K]
// a, each expert's rows starting on a 128-row block. The persistent kernel's contiguous builds
// take the 128 x 128 tiles of the whole a (a tile's CTA reads its block's index after the wait
// and multiplies that expert's weights, the weight maps' third coordinate, or skips a padding
// block on both sides of the ring), or 256 x 128 tiles over each run of blocks with one index,
// listed by the CTAs after the wait (gemm_wide_persistent.cuh, kRunTiles). Each row gets the
// products of block_fp8_gemm's wide tiles in their order: the same bits.

// The 256-row build follows each run of blocks with one index (two blocks a tile, a run of odd
// length ending on a tile of one block); its CTAs list the tiles in shared memory, 2 bytes each,
// for at most this many blocks. It takes the place of the 128-row build where the experts average
// at least kLeastBlocksPerRunTiles blocks, or kLeastBlocksPerShortRunTiles where K has at most
// kMostShortRunTileKBlocks k-blocks. Tiles of one block (odd runs) lose where K is long (the
// guess, not measured: half a tile's work per stage of a 3-stage ring, against 4 stages in the
// 128-row build). H200, session 37, run 4, us per expert, 128 / 256 rows: DeepSeek-V3 gate_up
// (N=4096 K=7168) 8 experts x 1024 rows 46.06 / 43.03, x 256 rows (every run two blocks) 13.80
// / 12.61; Qwen3-30B-A3B prefill, 128 experts of 64-448 rows (2.4 blocks on average, half the runs
// odd), gate_up (K=2048) 1.86 / 1.98, down (K=768) 1.19 / 1.13. Where the runs' lengths are
// unknown, the plan expects few tiles of one block only from long runs or short K.
constexpr int64_t kMostRunTileBlocks = 1024;
constexpr int64_t kLeastBlocksPerRunTiles = 4;
constexpr int64_t kLeastBlocksPerShortRunTiles = 2;
constexpr int64_t kMostShortRunTileKBlocks = 8;
static_assert(persistent::SharedLayout<256>::kSharedBytes + sizeof(int) +
                      kMostRunTileBlocks * sizeof(uint16_t) <=
                  232448,
              "fits the opt-in shared memory of sm_90");

namespace {
// Why the contiguous build does not serve p ("" where it does); the plan in `plan`.
std::string contiguous_plan_for(const ContiguousBlockGemmProblem& p, int device_index, Plan& plan) {
  const BlockGemmProblem first = p.rows_of(0, 0, p.m);
  if (std::string why = block_gemm_sm90_supports(first); !why.empty()) return why;
  if (p.groups > 1 && p.b.stride(0) % 16 != 0)
    return "b's groups are not 16 bytes apart (TMA needs it)";
  if (p.groups > std::numeric_limits<int>::max()) return "G=" + str(p.groups) + " groups";
  const int64_t blocks = fp8::ceil_div(p.m, kContiguousBlockRows);
  const int64_t tiles_n = fp8::ceil_div(p.n, int64_t{tiles::kBlockN});
  const int64_t units = blocks * tiles_n;  // (128-row tiles: at least as many as 256-row ones)
  if (units > std::numeric_limits<int>::max()) return "more tiles than an int counts";
  plan.scale_feed = activation_scale_feed(first);
  if (plan.scale_feed == tiles::ScaleFeed::warps)
    return "the activation scales cannot be copied with the tiles (TMA: rows on 16 bytes; "
           "DeepGEMM's column-major TMA-aligned layout always is)";
  // MOEKIT_SM90_CONTIGUOUS_ROWS=128 or 256 forces the build (timing knob and tests).
  const int rows = env::integer("MOEKIT_SM90_CONTIGUOUS_ROWS", 0);
  const int64_t least_blocks =
      fp8::ceil_div(p.k, int64_t{kFp8BlockSize}) <= kMostShortRunTileKBlocks
          ? kLeastBlocksPerShortRunTiles
          : kLeastBlocksPerRunTiles;
  plan.tile_rows =
      blocks <= kMostRunTileBlocks && (rows > 0 ? rows == 256 : blocks >= least_blocks * p.groups)
          ? 256
          : static_cast<int>(kContiguousBlockRows);
  plan.persistent = true;
  // Pairs of CTAs take the two column tiles of a block (one expert), each copying half of the A
  // tile into both rings, where the column tiles pair up. MOEKIT_SM90_CONTIGUOUS_PAIR=0 or 1
  // forces them off or on (timing knob).
  const int pair = env::integer("MOEKIT_SM90_CONTIGUOUS_PAIR", -1);
  plan.pair = tiles_n % 2 == 0 && pair != 0;
  plan.splits = plan.pair ? 2 : 1;
  plan.out_tma = p.out.dtype() != DType::f32 && p.n % 8 == 0 &&
                 reinterpret_cast<uintptr_t>(p.out.data()) % 16 == 0 &&
                 (p.m <= 1 || p.out.stride(0) % 8 == 0);
  using persistent::Groups;
  plan.persistent_kernel =
      plan.tile_rows == 256
          ? grouped_persistent_kernel_for<Groups::contiguous, 256>(plan, p.out.dtype())
          : grouped_persistent_kernel_for<Groups::contiguous, 128>(plan, p.out.dtype());
  plan.shared_bytes = plan.tile_rows == 256
                          ? persistent::SharedLayout<256>::kSharedBytes + sizeof(int) +
                                static_cast<size_t>(blocks) * sizeof(uint16_t)
                          : persistent::SharedLayout<128>::kSharedBytes;
  const int resident =
      cluster_capacity(plan.persistent_kernel, plan.splits, plan.shared_bytes, device_index);
  if (resident < 1) return "no CTA (pair) of the contiguous build fits the device";
  plan.grid =
      dim3(static_cast<unsigned>(std::min<int64_t>(units / plan.splits, resident) * plan.splits));
  return "";
}
}  // namespace

std::string contiguous_gemm_sm90_supports(const ContiguousBlockGemmProblem& p) {
  if (p.groups == 0 || p.m == 0 || p.n == 0) return "";
  const int device = p.a.device().index;
  DeviceGuard on_device(device);
  Plan plan;
  return contiguous_plan_for(p, device, plan);
}

std::string contiguous_gemm_sm90_plan(const ContiguousBlockGemmProblem& p) {
  if (p.groups == 0 || p.m == 0 || p.n == 0) return "nothing to do";
  const int device = p.a.device().index;
  DeviceGuard on_device(device);
  Plan plan;
  if (!contiguous_plan_for(p, device, plan).empty()) return "no contiguous plan";
  char text[300];
  std::snprintf(text, sizeof text,
                "persistent %s, each with its index's weights, %lld experts in one launch, %u "
                "CTAs%s, activation scales %s, %s",
                plan.tile_rows == 256
                    ? "256 x 128 tiles of each run of a's blocks with one index (a run of odd "
                      "length ending on 128 rows)"
                    : "128 x 128 tiles of a's blocks",
                static_cast<long long>(p.groups), plan.grid.x,
                plan.pair ? " in pairs sharing A tiles" : "",
                plan.scale_feed == tiles::ScaleFeed::a_k_inner ? "k-inner" : "m-inner",
                plan.out_tma ? "TMA stores" : "the threads store");
  return text;
}

void contiguous_block_fp8_gemm_sm90(const ContiguousBlockGemmProblem& p) {
  if (p.groups == 0 || p.m == 0 || p.n == 0) return;
  const int device = p.a.device().index;
  DeviceGuard on_device(device);
  Plan plan;
  if (std::string why = contiguous_plan_for(p, device, plan); !why.empty())
    fail("grouped_block_fp8_gemm_contiguous", "backend", "gpu.sm90.contiguous",
         "has no plan: " + why);
  const BlockGemmProblem first = p.rows_of(0, 0, p.m);
  GemmArgs args = args_of(first);
  const CUtensorMap a_map =  // (pairs: each CTA copies half of the A tile)
      make_tile_map("a", p.a.data(), p.m, p.k, p.a.stride(0),
                    plan.pair ? plan.tile_rows / 2 : plan.tile_rows, plan.tile_promotion);
  const CUtensorMap b_map =
      make_grouped_tile_map("b", p.b.data(), p.groups, p.n, p.k, p.b.stride(1), p.b.stride(0),
                            tiles::kBlockN, plan.tile_promotion);
  args.tiles_m = static_cast<int>(fp8::ceil_div(p.m, kContiguousBlockRows));
  args.tiles_n = static_cast<int>(fp8::ceil_div(p.n, int64_t{tiles::kBlockN}));
  args.splits = plan.splits;
  args.b_scale_k_inner = plan.b_scale_k_inner;
  args.b_scale_lanes = p.b_scales.dtype() == DType::bf16 ? 8 : 4;
  args.groups = static_cast<int>(p.groups);
  args.m_indices = p.m_indices.data_as<const int>();
  args.m_index_stride = p.m_indices.stride(0);
  // a and its scales are one matrix (2-D maps), the weights G planes (a 3-D map; their scales
  // read by the loader warp).
  args.b_scale_group_stride = p.b_scales.stride(0);
  const ScaleMaps maps = scale_maps_of(first, plan.scale_feed, plan.b_scale_k_inner, plan.tile_rows,
                                       0, 0, 0, false, /*b_map=*/false);
  // (boxes of a block's rows: the 256-row build stores a tile of one block or of two)
  const CUtensorMap out_map =
      plan.out_tma ? make_out_map(first, static_cast<int>(kContiguousBlockRows)) : CUtensorMap{};
  launch(plan, plan.persistent_kernel, p.stream, device, a_map, b_map, args, maps, out_map);
}

// ---- silu_and_mul_grouped_block_fp8_gemm_masked in one launch.

namespace {
// The gated build's plan: the layout (rows, split) and token tile the GEMM half alone would take,
// so that the sums, hence the bytes, are those of the two ops apart; "" or why there is none.
std::string silu_grouped_plan_for(const MaskedSiluGemmProblem& p, int device,
                                  GroupedPlan& grouped) {
  GroupedPlan apart;
  if (std::string why = grouped_plan_for(p.gemm, device, apart); !why.empty()) return why;
  const SwapLayout layout{apart.plan.rows, apart.plan.splits};
  if (!grouped_swap_plan(grouped_planned_problem(p.gemm), device, &layout, grouped.plan))
    return "the GEMM's layout has no swap plan";
  return grouped_plan_of(p.gemm, device, grouped, /*gated=*/true);
}
}  // namespace

std::string silu_grouped_gemm_sm90_supports(const MaskedSiluGemmProblem& p) {
  const GroupQuantProblem& quant = p.quant.first;
  if (quant.x.dtype() != DType::bf16)
    return "x is " + std::string(dtype_name(quant.x.dtype())) + " (the kernel quantizes bf16)";
  if (p.gemm.k % kFp8BlockSize != 0) return "K=" + str(p.gemm.k) + " is not a multiple of 128";
  if (reinterpret_cast<uintptr_t>(quant.x.data()) % 16 != 0 || quant.x.stride(0) % 8 != 0 ||
      (p.quant.groups > 1 && p.quant.x_stride % 8 != 0))
    return "x's rows or groups do not start on 16 bytes (its loads are 16 bytes wide)";
  // (The GEMM half's own plan is made once, inside silu_grouped_plan_for.)
  if (std::string why = grouped_gemm_sm90_checks(p.gemm); !why.empty()) return why;
  if (p.gemm.groups == 0 || p.gemm.m == 0 || p.gemm.n == 0) return "";
  const int device = p.gemm.b.device().index;
  DeviceGuard on_device(device);
  GroupedPlan grouped;
  return silu_grouped_plan_for(p, device, grouped);
}

std::string silu_grouped_gemm_sm90_plan(const MaskedSiluGemmProblem& p) {
  if (p.gemm.groups == 0 || p.gemm.m == 0 || p.gemm.n == 0) return "nothing to do";
  const int device = p.gemm.b.device().index;
  DeviceGuard on_device(device);
  GroupedPlan grouped;
  if (!silu_grouped_plan_for(p, device, grouped).empty()) return "no grouped plan";
  const Plan& plan = grouped.plan;
  char text[300];
  std::snprintf(text, sizeof text,
                "grouped swap quantizing silu(gate) * up itself, %lld groups in one launch: %d "
                "tokens x %d weight rows per CTA, K split %d ways (cluster), grid %u x %u (row "
                "tiles, slices of the token tiles with rows), %d stages, %zu B shared",
                static_cast<long long>(p.gemm.groups), plan.tokens, plan.rows, plan.splits,
                plan.grid.x, plan.grid.y, plan.stages, plan.shared_bytes);
  return text;
}

void silu_and_mul_grouped_block_fp8_gemm_sm90(const MaskedSiluGemmProblem& p) {
  const GroupedBlockGemmProblem& g = p.gemm;
  if (g.groups == 0 || g.m == 0 || g.n == 0) return;
  const int device = g.b.device().index;
  DeviceGuard on_device(device);
  GroupedPlan grouped;
  if (std::string why = silu_grouped_plan_for(p, device, grouped); !why.empty())
    fail("silu_and_mul_grouped_block_fp8_gemm_masked", "backend", "gpu.sm90.fused",
         "has no plan: " + why);
  const Plan& plan = grouped.plan;
  GemmArgs args = args_of(g.group(0));
  set_swap_args(plan, args);
  const GroupQuantProblem& quant = p.quant.first;
  args.activations = {quant.x.data(), quant.x.stride(0), static_cast<int>(g.k), quant.eps,
                      quant.ue8m0};
  const CUtensorMap weights =
      make_grouped_tile_map("b", g.b.data(), g.groups, g.n, g.k, g.b.stride(1), g.b.stride(0),
                            plan.rows, plan.weight_promotion);
  const CUtensorMap unused{};  // the kernel quantizes its token tiles from x itself
  const GroupStrides strides{static_cast<int>(g.groups),
                             g.a_scales.stride(0),
                             g.b_scales.stride(0),
                             g.out.stride(0),
                             env::integer("MOEKIT_SM90_GROUPED_LATE_SUMS", 1) != 0,
                             g.masked_m.data_as<const int>(),
                             grouped.max_items,
                             p.quant.x_stride};
  launch(plan, grouped.kernel, g.stream, device, weights, unused, args, strides);
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
