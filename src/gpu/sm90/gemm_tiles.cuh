// The Hopper block-FP8 GEMM's tiles kernel (large M; included by fp8_gemm_sm90.cu only).
#pragma once

#include "gpu/sm90/gemm_common.cuh"

namespace moekit::gpu {
namespace {  // one translation unit includes this: fp8_gemm_sm90.cu

// ---- The tiles kernel (any M; chosen for M > 128).
//
// kOverlap: the consumers keep two wgmma fragments, so that k-block i + 1's wgmma run while
// k-block i's products are scaled into the accumulators (H200, M=4096 N=7168 K=16384: 988 vs
// 1115-1153 us; docs/perf/fp8-gpu-sm90.md, session 13).
//
// kScaleFeed: who puts each k-block's scales beside its tiles (the scale warps, or the copy engine
// with the tiles). kCluster: CTAs alone; pairs (clusters of two CTAs on neighbouring tile rows,
// each copying half of the shared B tile into both rings; a stage is refilled once the consumers
// of both CTAs are done with it, session 15); or a split of K over the CTAs of a cluster, each
// rank adding the partial sums of its share of the tile's rows, read from the others' shared
// memory (grids with fewer tiles than half the SMs).
//
// Its tiles are 128 x 128; wide tiles (256 x 128) have a kernel of their own, persistent
// (gemm_wide_persistent.cuh).

namespace tiles {
constexpr int kBlockN = 128;
// A tile's shape: 128 x 128 (the tiles kernel: every scale feed and cluster); 256 x 128 (wide, the
// persistent kernel: scales copied with the tiles, no split), which copies a quarter fewer bytes
// from L2 per product (48 KB per k-block for twice the work of 32 KB) and holds two 64-register
// accumulators per consumer thread, filled in two waves of wgmma per k-block (DeepGEMM's 256 x 128
// config made 1405 TFLOP/s at M=4096 N=7168 K=16384 on an H200 against 1186-1215 for its 128 x 128
// one; fp8-gpu-sm90.md, session 19). Measured, not kept (session 21): 192 x 128 with three consumer
// warpgroups of 64 rows, same bits but slower everywhere (M=1024 N=4096 K=7168 75.8 against 53.4
// us, 192 CTAs for 132 SMs; M=4096 N=7168 K=16384 901-914 against 811-873 us).
template <int kRows>
struct Shape {
  static_assert(kRows == 128 || kRows == 256, "tiles of 128 or 256 rows");
  static constexpr int kBlockM = kRows;
  static constexpr int kRowsPerGroup = kRows / kConsumers;  // per consumer warpgroup
  // Waves of 64-row wgmma per consumer warpgroup and k-block.
  static constexpr int kWaves = kRowsPerGroup / 64;
  static constexpr int kTileBytesA = kRows * kBlockK;
  static constexpr int kTileBytesB = kBlockN * kBlockK;
  static constexpr int kStageBytes = kTileBytesA + kTileBytesB;
  // (256: the persistent kernel's ring, beside the out tile's shared memory)
  static constexpr int kStages = kRows == 128 ? 6 : 3;
  // A stage's scale region: the scale warps' 128 products, or the TMA box of the activation
  // scales with rows inner (4 bytes a row), and at kScaleBOffset the weight scales' box (16
  // bytes). (128 rows: the region still has room for a k-inner box, which now goes to the box
  // ring below: shrinking it to 640 bytes is left for a session with a GPU to test it.)
  static constexpr int kScaleABoxBytes = kRows * 16;  // rows x 16 bytes, the largest box
  static constexpr int kScaleBOffset = kRows == 128 ? kScaleABoxBytes : kRows * 4;
  static constexpr int kScaleBytes = kScaleBOffset + 128;
  // Activation-scale boxes of 4 k-blocks (a_k_inner) are copied once, with their first k-block's
  // stage, into a ring of their own: a slot is overwritten 12 k-blocks later, when both consumer
  // warpgroups (of both CTAs in pairs) have read it, since a stage is refilled kStages (at most
  // 6) k-blocks after its last use and each k-block's factors are read before its stage is
  // released.
  static constexpr int kScaleBoxSlots = 3;
  // (the tiles kernel's; the persistent wide kernel adds its out tile: persistent::kSharedBytes)
  static constexpr size_t kSharedBytes = kSharedAlign + static_cast<size_t>(kStages) * kStageBytes +
                                         kStages * kScaleBytes + kScaleBoxSlots * kScaleABoxBytes +
                                         2 * kStages * sizeof(uint64_t);
};
using Narrow = Shape<128>;
constexpr int kBlockM = Narrow::kBlockM, kStages = Narrow::kStages;
constexpr size_t kSharedBytes = Narrow::kSharedBytes;
// Who puts a stage's scales into shared memory: producer warps 1 and 2 (any layout, products
// written), or the copy engine with the tiles, as boxes of the activation scales with k-blocks
// (or packed words) inner, 4 per row (a_k_inner), or rows inner, 128 per k-block (a_m_inner).
enum class ScaleFeed : int { warps, a_k_inner, a_m_inner };
// What the CTAs of a cluster share: nothing (no cluster), B tiles (pairs), or K (split).
enum class Cluster : int { none, pair, split };
constexpr int kMaxSplit = 4;  // split: CTAs of a cluster splitting K (2..4)
// The epilogue's staged rows of f32 over the ring: 8 floats of padding make the consumers' 8-byte
// stores free of bank conflicts (a half-warp's four rows fall on distinct banks).
constexpr int kStagedStride = kBlockN + 8;
static_assert(Shape<128>::kBlockM * kStagedStride * 4 <=
                  Shape<128>::kStages * Shape<128>::kStageBytes,
              "the staged tile fits the ring");
constexpr int kOverlapGroup = 4;  // kOverlap: k-blocks per turn of the consumers' loop
// Diagnosis builds (MOEKIT_FP8_TRACE) time the copy pipeline alone: MOEKIT_SM90_TILES_ABLATE=1,
// the consumers only wait for each stage and release it (no wgmma, no promotion: the output is
// wrong); 2, as 1 without the B tiles; 3, as 1 without the A tiles; 4, as 1 without the scales;
// 5, as 4 with two k-blocks per copy (3-D tensor maps: one box of A's two tiles into a stage pair's
// first stage, one of B's into its second; even k-block counts, no pairs of CTAs); 6, the tensor
// work alone: the producer arrives on each stage without copying anything, so the consumers
// multiply whatever the ring holds (the output is wrong); 7, the whole kernel without the
// promotion (the consumers neither read the factors nor scale the products into acc); 8, the whole
// kernel without the scale copies (the consumers read stale factors). Session 17 (H200): at M=4096
// N=7168 K=16384 the copies alone took 681 us, cuBLASLt's whole GEMM 707-790; session 18: the
// tensor work alone 738-757 us, the whole kernel without the promotion 730-764.
enum Ablation : int {
  kCopiesOnly = 1,
  kCopiesOfA = 2,
  kCopiesOfB = 3,
  kCopiesNoScales = 4,
  kPairedCopies = 5,
  kNoCopies = 6,
  kNoPromotion = 7,
  kNoScaleCopies = 8
};
#ifdef MOEKIT_FP8_TRACE
__device__ inline int ablation(const GemmArgs& args) { return args.tiles_ablation; }
#else
__device__ constexpr int ablation(const GemmArgs&) { return 0; }
#endif
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

// A ring position: slot s of kRingStages and the parity of its current phase.
template <int kRingStages>
struct RingPosition {
  int stage = 0;
  uint32_t phase = 0;
  __device__ void advance() {
    if (++stage == kRingStages) {
      stage = 0;
      phase ^= 1;
    }
  }
};
#endif
}  // namespace tiles

// Diagnosis builds: the cycles the tiles kernel's threads spend waiting on its ring, in the slots
// kTilesFullWaits and kTilesEmptyWaits of the CTA's trace record (fp8_gemm_sm90.h).
#ifdef MOEKIT_FP8_TRACE
#define MOEKIT_TILES_TRACE(...) __VA_ARGS__
#else
#define MOEKIT_TILES_TRACE(...)
#endif

// Scales from the scale warps: producer warps 1 and 2 multiply each k-block's activation scales
// (any layout) by its weight scale and put the 128 products beside the stage's tiles, so that a
// consumer thread reads its two rows' factors with one shared load instead of computing addresses
// and loading global scales: the consumers' loop went from ~161 to ~103 SASS instructions per
// k-block, and the kernel from 974 to 919 us at M=4096 N=7168 K=16384 (H200, ncu at 1.68-1.69
// GHz; docs/perf/fp8-gpu-sm90.md, session 14). Scales copied with the tiles: the stage's full
// barrier waits for the copies alone (1,552 k -> 1,439 k cycles at that shape, session 15); the
// consumers read the two factors and the weight scale and multiply.

template <bool kOverlap, tiles::ScaleFeed kScaleFeed, tiles::Cluster kCluster>
__global__ void __launch_bounds__(kThreads, 1)
    gemm_tiles_kernel(const __grid_constant__ CUtensorMap a_map,
                      const __grid_constant__ CUtensorMap b_map, const GemmArgs args,
                      const __grid_constant__ ScaleMaps scale_maps) {
#if MOEKIT_SM90A
  using namespace tiles;
  using S = Narrow;
  constexpr int kBlockM = S::kBlockM, kStages = S::kStages, kStageBytes = S::kStageBytes;
  constexpr int kScaleABoxBytes = S::kScaleABoxBytes, kScaleBytes = S::kScaleBytes;
  constexpr int kScaleBoxSlots = S::kScaleBoxSlots;
  constexpr bool kCopiedScales = kScaleFeed != ScaleFeed::warps;
  constexpr bool kPair = kCluster == Cluster::pair;
  constexpr bool kSplit = kCluster == Cluster::split;
  // The consumer warpgroups, and the rows each takes.
  constexpr int kGroups = kConsumers, kRowsPerGroup = S::kRowsPerGroup;
  static_assert(!kSplit || kOverlap, "the split takes k-blocks in the overlap's groups of 4");
  using Ring = RingPosition<kStages>;
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

  // Split: the CTAs of a cluster share one tile, rank r taking groups of 4 k-blocks from the r-th
  // share of them.
  const int splits = kSplit ? args.splits : 1;
  const int tile = static_cast<int>(blockIdx.x) / splits;
  // Tile of this CTA: groups of kGroupRows tile rows, rows fastest inside a group.
  const int per_group = kGroupRows * args.tiles_n;
  const int group = tile / per_group;
  const int first_row = group * kGroupRows;
  const int group_rows = min(args.tiles_m - first_row, kGroupRows);
  const int in_group = tile % per_group;
  const int m0 = (first_row + in_group % group_rows) * kBlockM;
  const int n0 = (in_group / group_rows) * kBlockN;
  const int nb = n0 / kBlockN;
  // Pairs: the group's row count is even (the host pairs only even tiles_m), so CTAs 2j and
  // 2j + 1 of a cluster hold rows 2i and 2i + 1 of one column tile (which share B tiles).
  const uint32_t rank = kPair || kSplit ? sm90::cluster_rank() : 0;
  int kb_begin = 0, kb_count = k_blocks;  // this CTA's k-blocks
  if constexpr (kSplit) {
    const int k_groups = (k_blocks + kOverlapGroup - 1) / kOverlapGroup;
    kb_begin = k_groups * static_cast<int>(rank) / splits * kOverlapGroup;
    kb_count =
        min(k_groups * (static_cast<int>(rank) + 1) / splits * kOverlapGroup, k_blocks) - kb_begin;
  }
  // kOverlap: the consumers take k-blocks in groups of 4; the last group's slots past the CTA's
  // k-blocks are only barrier arrivals (their stages keep old bytes: the consumers multiply them,
  // so that every path has the same wgmma in flight, and add nothing).
  const int slots = kOverlap ? overlap_slots(kb_count) : kb_count;

  MOEKIT_TILES_TRACE(__shared__ TraceCta trace_cta; __shared__ uint32_t trace_ticket_of_cta;
                     uint64_t waited = 0);  // this thread's cycles in ring waits
  if (threadIdx.x == 0) {
    MOEKIT_TILES_TRACE(trace_ticket_of_cta = trace_enter(trace_cta));
    for (int s = 0; s < kStages; ++s) {
      sm90::mbarrier_init(&full[s], kCopiedScales ? 1 : 1 + kScaleWarps * 32);
      // Lane 0 of every consumer warp (of both CTAs in pairs: the stage holds the peer's copy).
      sm90::mbarrier_init(&empty[s], kGroups * 4 * (kPair ? 2 : 1));
    }
    sm90::fence_barrier_init();
  }
  // Pairs: the peer's barriers are initialized before any copy or arrival reaches them.
  if constexpr (kPair)
    sm90::cluster_sync();
  else
    __syncthreads();
  vendor::allow_next_grid();  // the next kernel may set up while this one runs

  if (warpgroup == kGroups) {
    sm90::registers_shrink<kScaleProducerRegisters>();
    // Pairs: no thread leaves while the peer may still arrive on this CTA's barriers.
    // Split: every thread takes part in both of the exchange's cluster barriers.
    const auto leave = [&] {
      __syncwarp();
      if constexpr (kPair || kSplit) {
        sm90::cluster_arrive();
        sm90::cluster_wait();
      }
      if constexpr (kSplit) {
        sm90::cluster_arrive();
        sm90::cluster_wait();
      }
    };
    const int producer_warp = static_cast<int>(threadIdx.x) / 32 % 4;
    if (threadIdx.x == kGroups * kWarpgroup) {
      sm90::prefetch_tensor_map(&a_map);
      sm90::prefetch_tensor_map(&b_map);
      if constexpr (kCopiedScales) {
        sm90::prefetch_tensor_map(&scale_maps.a);
        sm90::prefetch_tensor_map(&scale_maps.b);
      }
      for (int kb = kb_begin;
           ablation(args) != kPairedCopies && kb < kb_begin + min(kb_count, kStages); ++kb) {
        sm90::tma_prefetch_2d(&a_map, kb * kBlockK, m0);
        sm90::tma_prefetch_2d(&b_map, kb * kBlockK, n0 + static_cast<int>(rank) * (kBlockN / 2));
      }
      vendor::wait_for_previous_grid();
      Ring ring;
      for (int i = 0; i < slots; ++i, ring.advance()) {
        MOEKIT_TILES_TRACE(const uint64_t wait_start = vendor::sm_cycles());
        sm90::mbarrier_wait(&empty[ring.stage], ring.phase ^ 1);
        MOEKIT_TILES_TRACE(waited += vendor::sm_cycles() - wait_start);
        uint64_t* bar = &full[ring.stage];
        if (i >= kb_count || ablation(args) == kNoCopies) {
          sm90::mbarrier_arrive(bar);
          continue;
        }
        const int kb = kb_begin + i;
        uint8_t* stage = stages + ring.stage * kStageBytes;
        const int word = args.scales.a_packed ? kb >> 2 : kb;  // of the activation scales
        // a_k_inner: this k-block opens a box of 4 words (16 k-blocks where packed), as does the
        // CTA's first (a split may begin inside a box).
        const bool opens_box =
            kScaleFeed == ScaleFeed::a_k_inner &&
            (((word & 3) == 0 && (!args.scales.a_packed || (kb & 3) == 0)) || (kSplit && i == 0));
        const int ablated = ablation(args);
        if constexpr (!kPair) {
          if (ablated == kPairedCopies) {  // a stage pair (even, odd): one A and one B copy
            if (i % 2 == 0) {
              uint64_t* next = &full[ring.stage + 1];
              sm90::mbarrier_wait(&empty[ring.stage + 1], ring.phase ^ 1);
              sm90::mbarrier_arrive_expect_tx(bar, kStageBytes);
              sm90::tma_load_3d(stage, &a_map, bar, 0, m0, kb);
              sm90::mbarrier_arrive_expect_tx(next, kStageBytes);
              sm90::tma_load_3d(stage + kStageBytes, &b_map, next, 0, n0, kb);
            }
            continue;
          }
        }
        const bool scales_copied =
            kCopiedScales && ablated < kCopiesNoScales && ablated != kNoScaleCopies;
        sm90::mbarrier_arrive_expect_tx(
            bar, kStageBytes -
                     (ablated == kCopiesOfA   ? S::kTileBytesB
                      : ablated == kCopiesOfB ? S::kTileBytesA
                                              : 0) +
                     (scales_copied ? kScaleCopyBytes + (opens_box ? kScaleABoxBytes : 0) : 0));
        if (ablated != kCopiesOfB) {
          sm90::tma_load_2d(stage, &a_map, bar, kb * kBlockK, m0);
        }
        if (ablated != kCopiesOfA) {
          if constexpr (kPair) {  // this CTA's half of the B tile, into both rings
            const int half = static_cast<int>(rank) * (kBlockN / 2);
            sm90::tma_load_2d_multicast(stage + S::kTileBytesA + half * kBlockK, &b_map, bar,
                                        kb * kBlockK, n0 + half, 0x3);
          } else {
            sm90::tma_load_2d(stage + S::kTileBytesA, &b_map, bar, kb * kBlockK, n0);
          }
        }
        if (scales_copied) {
          // The boxes' first element: 16-byte boxes start at a multiple of their element count.
          float* region = scales + ring.stage * kScaleFloats;
          if constexpr (kScaleFeed == ScaleFeed::a_k_inner) {
            if (opens_box)
              sm90::tma_load_2d(scale_boxes + (word >> 2) % kScaleBoxSlots * (kScaleABoxBytes / 4),
                                &scale_maps.a, bar, kSplit ? word & ~3 : word, m0);
          } else {
            sm90::tma_load_2d(region, &scale_maps.a, bar, m0, word);
          }
          const int inner = args.b_scale_k_inner ? kb : nb;
          sm90::tma_load_2d(region + S::kScaleBOffset / 4, &scale_maps.b, bar,
                            inner & -args.b_scale_lanes, args.b_scale_k_inner ? nb : kb);
        }
      }
      MOEKIT_TILES_TRACE(if (trace_ticket_of_cta < kTraceCapacity) {
        Sm90TraceRecord& r = trace_records[trace_ticket_of_cta];
        r.cycles[static_cast<int>(kTilesEmptyWaits)] = waited;
        r.time_ns[static_cast<int>(kTilesEmptyWaits)] = 1;
      });
    } else if (!kCopiedScales && producer_warp >= 1 && producer_warp <= kScaleWarps) {
      // Rows r0 and r0 + 64 of the tile; 4 k-blocks' loads in flight at a time.
      const int r0 = (producer_warp - 1) * 32 + static_cast<int>(threadIdx.x) % 32;
      const int rows[2] = {min(m0 + r0, args.m - 1), min(m0 + r0 + 64, args.m - 1)};
      float product[2][4];
      const auto load_products = [&](int first_kb) {
        float a[2][4], b[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int kb = kb_begin + min(first_kb + j, kb_count - 1);
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
      Ring ring;
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
  constexpr int kWaves = S::kWaves;
  const int t = static_cast<int>(threadIdx.x) % kWarpgroup;
  const int warp = t / 32, lane = t % 32;
  // This thread's rows: tile_row and tile_row + 8 of each wave (64 rows apart).
  const int tile_row = warpgroup * kRowsPerGroup + warp * 16 + lane / 4;
  vendor::wait_for_previous_grid();

  float acc[kWaves][64], part[64];
#pragma unroll
  for (int w = 0; w < kWaves; ++w)
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[w][i] = 0.0f;
  // The warpgroup's 64 rows of the A tile (+ stage offset).
  const uint8_t* a_half = stages + warpgroup * kRowsPerGroup * kBlockK;
  // After every lane's last read of the stage (its scales): the stage goes back to the producer.
  const auto release = [&](int stage) {
    __syncwarp();
    if (lane == 0) {
      sm90::mbarrier_arrive(&empty[stage]);
      if constexpr (kPair) sm90::mbarrier_arrive_peer(&empty[stage], rank ^ 1);
    }
  };
  // Scales copied with the tiles: the weight scale of k-block kb in `stage`.
  const auto stage_b_scale = [&](int stage, int kb) {
    const float* b_box = scales + stage * kScaleFloats + S::kScaleBOffset / 4;
    const int b_index = (args.b_scale_k_inner ? kb : nb) & (args.b_scale_lanes - 1);
    const uint32_t b_bf16 = reinterpret_cast<const uint16_t*>(b_box)[b_index];
    return args.scales.b_bf16 ? __uint_as_float(b_bf16 << 16) : b_box[b_index];
  };
  // The scale products of rows row and row + 8 for k-block kb in `stage` (weight_scale(): the
  // weight scale, where the scales are copied; called after the activation scales' reads).
  const auto stage_products = [&](int stage, int kb, int row, auto weight_scale) {
    if constexpr (!kCopiedScales) {
      return *reinterpret_cast<const float2*>(scales + stage * kScaleFloats + scale_slot(row));
    } else {
      const bool packed = args.scales.a_packed;
      uint32_t w0, w1;
      if constexpr (kScaleFeed == ScaleFeed::a_k_inner) {
        const int word = packed ? kb >> 2 : kb;
        const auto* words = reinterpret_cast<const uint32_t*>(
            scale_boxes + (word >> 2) % kScaleBoxSlots * (kScaleABoxBytes / 4));
        w0 = words[row * 4 + (word & 3)];
        w1 = words[(row + 8) * 4 + (word & 3)];
      } else {
        const auto* words = reinterpret_cast<const uint32_t*>(scales + stage * kScaleFloats);
        w0 = words[row];
        w1 = words[row + 8];
      }
      if (packed) {  // exponent byte kb % 4 of the word
        const int shift = (kb & 3) * 8;
        w0 = (w0 >> shift & 0xffu) << 23;
        w1 = (w1 >> shift & 0xffu) << 23;
      }
      const float b = weight_scale();
      return make_float2(__uint_as_float(w0) * b, __uint_as_float(w1) * b);
    }
  };
  const auto stage_factors = [&](int stage, int kb, int row) {
    return stage_products(stage, kb, row, [&] { return stage_b_scale(stage, kb); });
  };

  if constexpr (kOverlap) {
    // Two fragments take turns over groups of kOverlapGroup k-blocks: k-block i + 1's wgmma run
    // while i's products are scaled into acc, so the tensor cores wait only for the group's last
    // promotion. No wgmma is in flight across the loop's back edge: the copies that carry a
    // fragment around a loop read it, and ptxas then serializes every wgmma of the kernel.
    float part2[64];
    Ring ring;
    int stage1 = 0, stage2 = 0;
    float2 factors1{}, factors2{};
    const auto issue = [&](float(&fragment)[64], int& stage, float2& factors, int kb) {
      stage = ring.stage;
      MOEKIT_TILES_TRACE(const uint64_t wait_start = vendor::sm_cycles());
      sm90::mbarrier_wait(&full[stage], ring.phase);
      MOEKIT_TILES_TRACE(waited += vendor::sm_cycles() - wait_start);
      if (ablation(args) != kNoPromotion) factors = stage_factors(stage, kb, tile_row);
      issue_k_block<kBlockN>(fragment, a_half + stage * kStageBytes,
                             stages + stage * kStageBytes + S::kTileBytesA);
      ring.advance();
    };
    // After its wgmma are done: releases the stage and scales the products into acc (slot i of
    // the CTA's k-range; nothing past its end).
    const auto promote = [&](float(&fragment)[64], int stage, float2 factors, int i) {
#pragma unroll
      for (int r = 0; r < 64; ++r) sm90::fence_operand(fragment[r]);  // read after the wait
      release(stage);
      if (i < kb_count && ablation(args) != kNoPromotion)
        promote_tile_fragment(acc[0], fragment, factors.x, factors.y);
    };
    static_assert(kOverlapGroup == 4, "the loop below takes four k-blocks a turn");
    const bool copies_only = ablation(args) >= kCopiesOnly && ablation(args) <= kPairedCopies;
    for (int i = 0; copies_only && i < slots; ++i, ring.advance()) {
      sm90::mbarrier_wait(&full[ring.stage], ring.phase);
      release(ring.stage);
    }
    for (int i = 0; !copies_only && i < slots; i += kOverlapGroup) {
      const int kb = kb_begin + i;
      issue(part, stage1, factors1, kb);
      issue(part2, stage2, factors2, kb + 1);
      sm90::wgmma_wait<1>();
      promote(part, stage1, factors1, i);
      issue(part, stage1, factors1, kb + 2);
      sm90::wgmma_wait<1>();
      promote(part2, stage2, factors2, i + 1);
      issue(part2, stage2, factors2, kb + 3);
      sm90::wgmma_wait<1>();
      promote(part, stage1, factors1, i + 2);
      sm90::wgmma_wait<0>();
      promote(part2, stage2, factors2, i + 3);
    }
  } else {
    Ring ring;
    for (int kb = 0; kb < k_blocks; ++kb, ring.advance()) {
      sm90::mbarrier_wait(&full[ring.stage], ring.phase);
      const float2 factors = stage_factors(ring.stage, kb, tile_row);
      multiply_k_block<kBlockN>(part, a_half + ring.stage * kStageBytes,
                                stages + ring.stage * kStageBytes + S::kTileBytesA);
      release(ring.stage);
      promote_tile_fragment(acc[0], part, factors.x, factors.y);
    }
  }
  MOEKIT_TILES_TRACE(if (threadIdx.x == 0)
                         trace_stamp_after(trace_cta, Sm90TracePhase::last_consumed, acc[0]));
  // Pairs: this thread's last arrival on the peer is done; the peer may leave once all have said
  // so.
  if constexpr (kPair) sm90::cluster_arrive();

  // The epilogue goes through shared memory: the fragments are staged as rows of f32 over the
  // ring (idle once both warpgroups are past their loops), then each thread stores four
  // neighbouring columns of a row at a time in a loop. Storing from the fragments took 32
  // unrolled, type-switched stores per thread: straight-line code fetched once per tile, which
  // stalled on instruction fetch (Nsight Compute, H200, an early split build at M=256 N=4096
  // K=2048: "no instruction" 44 % of the samples) and took 57 of the kernel's 80 KB of code. Split:
  // each rank stages its partial tile, then adds the ranks' rows it owns in rank order, reading
  // the others through distributed shared memory.
  float* staged = reinterpret_cast<float*>(stages);
  sm90::named_barrier(1, kGroups * kWarpgroup);
#pragma unroll
  for (int w = 0; w < kWaves; ++w) {
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) {
      float* at = staged + (tile_row + 64 * w) * kStagedStride + 8 * j + 2 * (lane % 4);
      *reinterpret_cast<float2*>(at) = make_float2(acc[w][4 * j], acc[w][4 * j + 1]);
      *reinterpret_cast<float2*>(at + 8 * kStagedStride) =
          make_float2(acc[w][4 * j + 2], acc[w][4 * j + 3]);
    }
  }
  // Rows [first, last) of the tile, every `step`-th from this warp's: a warpgroup its own half of
  // the rows, or in a split the rank's share of the 128, over all consumer warps.
  int first = warpgroup * kRowsPerGroup + warp, last = (warpgroup + 1) * kRowsPerGroup, step = 4;
  if constexpr (kSplit) {
    sm90::cluster_arrive();
    sm90::cluster_wait();
    first = kBlockM * static_cast<int>(rank) / splits + warpgroup * 4 + warp;
    last = kBlockM * (static_cast<int>(rank) + 1) / splits;
    step = 4 * kGroups;
  } else {
    sm90::named_barrier(2 + warpgroup, kWarpgroup);
  }
  MOEKIT_TILES_TRACE(if (threadIdx.x == 0) trace_stamp(trace_cta, Sm90TracePhase::sums_done));
  const Epilogue& e = args.epilogue;
  const int col = n0 + 4 * lane;
  const float4 bias = bias_quad(args, col);
  if constexpr (kSplit) {
    // All of this thread's reads first (at most 8 rows of up to 4 ranks), so that their latencies
    // overlap; once they are done the other CTAs may leave, while this one stores.
    constexpr int kMaxRows = kBlockM / 2 / (4 * kGroups);
    float4 sums[kMaxRows];
#pragma unroll
    for (int i = 0; i < kMaxRows; ++i) {
      const float* at = staged + (first + i * step) * kStagedStride + 4 * lane;
      if (first + i * step >= last) break;
      sums[i] = sm90::load_shared_remote4(at, 0);
#pragma unroll
      for (int sender = 1; sender < kMaxSplit; ++sender) {
        if (sender >= splits) break;
        const float4 u = sm90::load_shared_remote4(at, sender);
        sums[i].x += u.x;
        sums[i].y += u.y;
        sums[i].z += u.z;
        sums[i].w += u.w;
      }
    }
    sm90::cluster_arrive();
#pragma unroll
    for (int i = 0; i < kMaxRows; ++i) {
      const int r = first + i * step;
      if (r >= last || m0 + r >= args.m) break;
      store_quad(e, m0 + r, col, args.n,
                 make_float4(sums[i].x + bias.x, sums[i].y + bias.y, sums[i].z + bias.z,
                             sums[i].w + bias.w));
    }
    sm90::cluster_wait();  // no CTA leaves while the others may still read its rows
  } else {
#pragma unroll 2
    for (int r = first; r < last; r += step) {
      if (m0 + r >= args.m) break;
      const float4 v = *reinterpret_cast<const float4*>(staged + r * kStagedStride + 4 * lane);
      store_quad(e, m0 + r, col, args.n,
                 make_float4(v.x + bias.x, v.y + bias.y, v.z + bias.z, v.w + bias.w));
    }
  }
  MOEKIT_TILES_TRACE(if (threadIdx.x == 0) trace_stamp(trace_cta, Sm90TracePhase::stores_issued));
  if constexpr (kPair) sm90::cluster_wait();
  MOEKIT_TILES_TRACE(if (threadIdx.x == 0) {
    volatile TraceCta& v = trace_cta;
    v.cycles[static_cast<int>(kTilesFullWaits)] = waited;
    v.time_ns[static_cast<int>(kTilesFullWaits)] = 1;
    trace_leave(trace_cta, trace_ticket_of_cta, rank);
  });
#else
  (void)a_map;
  (void)b_map;
  (void)args;
  (void)scale_maps;
#endif
}

}  // namespace
}  // namespace moekit::gpu
