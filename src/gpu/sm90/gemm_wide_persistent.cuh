// The Hopper block-FP8 GEMM's persistent wide-tiles kernel (included by fp8_gemm_sm90.cu only).
#pragma once

#include <type_traits>  // std::integral_constant

#include "gpu/sm90/gemm_common.cuh"
#include "gpu/sm90/gemm_tiles.cuh"

namespace moekit::gpu {
namespace {  // one translation unit includes this: fp8_gemm_sm90.cu

// ---- Persistent tiles (256 x 128, or 128 x 128 in the groups' builds): one CTA (or pair) per SM
// takes tile after tile.
//
// A tile per CTA spent 7-8 us of a ~53 us (M=1024) or ~113 us (M=4096 N=7168 K=16384) life
// outside its loop: the first stage's copies, then staging and storing the tile while the tensor
// cores idled (H200, fp8-gpu-sm90.md, session 21, item 4). Here the producer runs on into the next
// tile's k-blocks while the consumers store the last one, so only the first tile's copies and the
// last tile's stores are not overlapped. Each consumer warpgroup takes 128 rows in two waves of 64
// per k-block (the wave's wgmma, then their products scaled into that wave's accumulator); the
// other warpgroup's wgmma run while one promotes. Each output element takes the same products in
// the same order as with 128-row tiles (gemm_tiles.cuh): the same bits (but where a workspace
// lets the last round be split over K: persistent::item_at).
// - The ring has 3 stages, for the out tile's 64 KB of shared memory of its own; the ring and the
//   activation-scale box slots run on across items (a tile's k-blocks, or a range of them), each
//   padded to whole turns of the ring (the producer arrives on the padding slots without copies,
//   the consumers wait for them and release them), so that every item starts on stage 0 and the
//   loop's stages stay constants.
// - The epilogue, where the out is 16-bit with rows on 16 bytes and N a multiple of 8: the
//   consumers stage the tile in the out dtype (two boxes of 64 columns with the 128-byte swizzle)
//   and one thread stores it with two TMA tensor copies, which run on while the next tile's loop
//   starts. Elsewhere (f32 out, ragged N, unaligned rows) each warpgroup stages a wave at a time in
//   f32 and its threads store rows.
// Pairs: the two CTAs of a cluster take the two column tiles of the same units, in the same order,
// each copying half of the shared A tile into both rings (TMA multicast).
// The groups' builds (persistent::Groups): planes, G GEMMs along the maps' third coordinate (the
// counts read after the wait, each group's first tile listed in shared memory), or contiguous,
// one a whose 128-row blocks each take their index's weights (a padding block skipped by every
// role alike; in 256-row tiles, two blocks of a run with one index, listed after the wait: see
// kRunTiles). They may take 128-row tiles (one wave per warpgroup, 4 stages: SharedLayout), and
// producer warp 1 stores their weight scales into the stages (any layout; see kScaleLoader).
//
// Measured against a tile per CTA (H200, fp8-gpu-sm90.md, sessions 22 and 23): M=1024 N=4096
// K=7168 48.95-49.39 -> 45.09-45.15 us (one tile per CTA: the TMA stores alone), M=4096 N=7168
// K=16384 730.8-757.1 -> 677.2-720.9 us; 7-12 % at M = 1024..4096 on two shapes (session 23).
// A first version that stored the fragments from registers as bf16 pairs with 4 stages was
// slower (49.3 -> 52.5 us; 740-800 -> 766-795).
namespace persistent {
constexpr int kOutBoxColumns = 64;  // bf16: 128 bytes, the swizzle's row
// The shared memory of the build for tiles of kRows x 128: 256 rows (the wide tiles, 3 stages),
// or 128 (grouped builds for groups of at most 128 rows and the contiguous layout's 128-row
// blocks, 4 stages). The out tile's region holds the 16-bit tile, or a wave of 64 f32 rows per
// consumer warpgroup.
template <int kRows>
struct SharedLayout {
  using S = tiles::Shape<kRows>;
  static constexpr int kStages = kRows == 256 ? 3 : 4;
  static constexpr int kStageBytes = S::kStageBytes;
  static constexpr int kOutBoxBytes = kRows * kOutBoxColumns * 2;
  static constexpr int kTileOutBytes = tiles::kBlockN / kOutBoxColumns * kOutBoxBytes;
  static constexpr int kWaveOutBytes = kConsumers * 64 * tiles::kBlockN * 4;
  static constexpr int kOutBytes = kTileOutBytes > kWaveOutBytes ? kTileOutBytes : kWaveOutBytes;
  static constexpr size_t kSharedBytes = kSharedAlign + static_cast<size_t>(kStages) * kStageBytes +
                                         kOutBytes + kStages * S::kScaleBytes +
                                         S::kScaleBoxSlots * S::kScaleABoxBytes +
                                         2 * kStages * sizeof(uint64_t);
  static_assert(kSharedBytes <= 232448, "fits the opt-in shared memory of sm_90");
};
using Wide = SharedLayout<256>;
constexpr size_t kSharedBytes = Wide::kSharedBytes;
// Which GEMMs a build multiplies: one; `groups` stacked along the maps' third coordinate (whole
// or masked, grouped_block_fp8_gemm); or one [M, K] a whose 128-row blocks each multiply the
// weights of their index (m_indices, DeepGEMM's contiguous layout).
enum class Groups : int { none, planes, contiguous };
// How the out tile leaves, a build each: by TMA from a bf16 or f16 tile (16-bit out, no bias,
// rows on 16 bytes, N a multiple of 8), or by the threads (any out). One epilogue per build: with
// both in one kernel (and the bias in the TMA one) the code grew from 2.2 k to 5.7 k instructions
// and the kernel slowed down, its loop unchanged (M=1024 N=4096 K=7168 45.0 -> 46.7 us, M=4096
// N=7168 K=16384 670 -> 733; with the bias read by one switch, 4.8 k instructions, still 45.3 ->
// 46.3 and 679-685 -> 727-743; H200, session 23, runs 2 and 3).
enum class Out : int { bf16_tma, f16_tma, threads };

// ---- The split last round (stream-K). Where the units do not fill whole rounds, the last round's
// units would leave some pairs idle for a whole unit's time (M=4096 N=7168 K=16384: 448 units for
// 66 pairs, 52 in the last round). Instead, the last `sk_units` units' k-blocks, in order, are cut
// into `sk_pairs` equal ranges, one per pair (the planner makes `sk_pairs` a multiple of
// `sk_units`, so that no range straddles two units: fp8_gemm_sm90.cu). A range that ends inside a
// unit leaves that unit's sums of its k-blocks in the pair's workspace tile (a partial item); the
// pair whose range holds the unit's last k-block adds them to its own sums, in the order of the
// pairs, and stores the unit (a final item). Each pair takes its partial item first, so the pairs
// that finish a unit never wait long; and a pair waits only for pairs of lower index, whose CTAs
// the grid launches first (the grid is no larger than what is resident at once). The sums are the
// same for every call of a shape on a device (bitwise), though not the unsplit ones: a unit's
// k-blocks go into as many sums as it has ranges.
struct Item {
  int unit = -1;    // -1: no more items
  int k_begin = 0;  // the k-blocks of the unit this item multiplies
  int k_end = 0;
  bool partial = false;    // its sums go to this pair's workspace tile
  int first_partner = -1;  // a final item: the first pair whose partial tile it adds
};
constexpr int kPartialBytes = 256 * tiles::kBlockN * 4;  // a CTA's workspace tile

// Item j of pair `pair` of `pairs` in a build that splits the last round: its units of whole
// rounds (pair, pair + pairs, ... below units - sk_units), then its range of the split round;
// unit -1 past its last.
__device__ __forceinline__ Item item_at(const GemmArgs& args, int units, int pair, int pairs,
                                        int j) {
  Item item;
  const int whole_units = units - args.sk_units;
  const int whole_items = pair < whole_units ? (whole_units - 1 - pair) / pairs + 1 : 0;
  const int kb = args.k_blocks;
  if (j < whole_items) {
    item.unit = pair + j * pairs;
    item.k_end = kb;
    return item;
  }
  j -= whole_items;
  if (pair >= args.sk_pairs) return item;
  const long long total = static_cast<long long>(args.sk_units) * kb;
  const auto range_begin = [&](long long q) { return static_cast<int>(q * total / args.sk_pairs); };
  const int begin = range_begin(pair), end = range_begin(pair + 1);
  const int first = begin / kb, last = (end - 1) / kb;
  const bool last_partial = end - last * kb < kb;
  // The partial item (the range's last unit) first, then the others in order.
  if (j > last - first) return item;
  const int segment = !last_partial ? j : j == 0 ? last - first : j - 1;
  const int unit = first + segment;
  item.unit = whole_units + unit;
  item.k_begin = max(begin - unit * kb, 0);
  item.k_end = min(end - unit * kb, kb);
  item.partial = item.k_end < kb;
  if (!item.partial && item.k_begin > 0) {  // the pair whose range holds the unit's k-block 0
    const int at = unit * kb;
    int q = static_cast<int>(static_cast<long long>(at) * args.sk_pairs / total);
    while (range_begin(q + 1) <= at) ++q;
    while (range_begin(q) > at) --q;
    item.first_partner = q;
  }
  return item;
}
}  // namespace persistent

// Diagnosis builds (MOEKIT_FP8_TRACE): consumer thread 0 of the build that splits the last round
// writes its stamps (fp8_gemm_sm90.h, persistent_trace) straight into its record, so that no
// shared memory or registers are taken from the kernel.
#ifdef MOEKIT_FP8_TRACE
#define MOEKIT_PERSISTENT_TRACE(...) __VA_ARGS__
__device__ float persistent_trace_sink;
#if MOEKIT_SM90A
struct PersistentTrace {
  uint32_t ticket = kTraceCapacity;
  __device__ __forceinline__ void stamp_at(Sm90TracePhase phase, uint64_t ns, uint64_t cycles) {
    if (ticket >= kTraceCapacity) return;
    Sm90TraceRecord& r = trace_records[ticket];
    r.time_ns[static_cast<int>(phase)] = ns;
    r.cycles[static_cast<int>(phase)] = cycles;
  }
  __device__ __forceinline__ void enter() {
    const uint64_t ns = vendor::global_timer_ns(), cycles = vendor::sm_cycles();
    ticket = atomicAdd(&trace_ticket, 1u);
    stamp_at(Sm90TracePhase::entry, ns, cycles);
  }
  __device__ __forceinline__ void stamp(Sm90TracePhase phase) {
    stamp_at(phase, vendor::global_timer_ns(), vendor::sm_cycles());
  }
  // Once `values` have arrived (a store of their sum waits for every load and wgmma behind them).
  __device__ __forceinline__ void stamp_after(Sm90TracePhase phase, const float (&values)[64]) {
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < 64; ++i) sum += values[i];
    *static_cast<volatile float*>(&persistent_trace_sink) = sum;
    stamp(phase);
  }
  __device__ __forceinline__ void leave(uint32_t rank) {
    stamp(Sm90TracePhase::exit);
    if (ticket < kTraceCapacity) trace_label(trace_records[ticket], ticket, rank);
  }
};
#endif
#else
#define MOEKIT_PERSISTENT_TRACE(...)
#endif

template <tiles::ScaleFeed kScaleFeed, tiles::Cluster kCluster, persistent::Out kOut, bool kSplit,
          persistent::Groups kGroups = persistent::Groups::none, int kRows = 256>
__global__ void __launch_bounds__(kThreads, 1)
    gemm_wide_persistent_kernel(const __grid_constant__ CUtensorMap a_map,
                                const __grid_constant__ CUtensorMap b_map, const GemmArgs args,
                                const __grid_constant__ ScaleMaps scale_maps,
                                const __grid_constant__ CUtensorMap out_map) {
#if MOEKIT_SM90A
  using namespace tiles;
  using S = Shape<kRows>;
  using Layout = persistent::SharedLayout<kRows>;
  constexpr int kBlockM = S::kBlockM, kStages = Layout::kStages;
  constexpr int kStageBytes = Layout::kStageBytes;
  constexpr bool kGrouped = kGroups == persistent::Groups::planes;
  constexpr bool kContiguous = kGroups == persistent::Groups::contiguous;
  constexpr int kScaleABoxBytes = S::kScaleABoxBytes, kScaleBytes = S::kScaleBytes;
  constexpr int kScaleBoxSlots = S::kScaleBoxSlots;
  constexpr int kWaves = S::kWaves, kRowsPerGroup = S::kRowsPerGroup;
  constexpr bool kPair = kCluster == Cluster::pair;
  constexpr bool kTma = kOut != persistent::Out::threads;
  static_assert(kCluster != Cluster::split, "no K split with wide tiles");
  static_assert(kGroups == persistent::Groups::none || !kSplit, "the groups' tiles: unsplit");
  static_assert(kRows == 256 || kGroups != persistent::Groups::none, "128 rows: grouped builds");
  // Contiguous in 256-row tiles: the tiles follow each run of blocks with one index, two blocks a
  // tile from the run's first; a run of odd length ends on a tile of one block, whose 128 rows the
  // two consumer warpgroups take a wave (64 rows) each, as in 128-row tiles (the A tile's other
  // rows are copied but not multiplied, and nothing past the block is stored). Warp 0 lists the
  // tiles after the wait (run_tiles, below).
  constexpr bool kRunTiles = kContiguous && kRows == 256;
  constexpr int kIndexRows = static_cast<int>(kContiguousBlockRows);  // rows per index
  static_assert(!kContiguous || kRows == kContiguousBlockRows || kRunTiles,
                "a tile of one index: a block, or two of one run");
  constexpr bool kKInner = kScaleFeed == ScaleFeed::a_k_inner;
  static_assert(kKInner || kScaleFeed == ScaleFeed::a_m_inner, "scales copied with the tiles");
  using Ring = RingPosition<kStages>;
  // The groups' builds: the weight scales are not copied by TMA but stored into each stage by
  // producer warp 1 as f32 (any strides and dtype: Qwen3-30B's down projection has K=768, 6
  // k-blocks, rows of 24 bytes that TMA cannot copy); each stage's full barrier then waits for
  // its arrival too.
  constexpr bool kScaleLoader = kGroups != persistent::Groups::none;
  constexpr int kScaleCopyBytes = (kKInner ? 0 : kBlockM * 4) + (kScaleLoader ? 0 : 16);
  constexpr int kScaleFloats = kScaleBytes / 4;
  constexpr int kGroupRows = 8;  // tile rows per rasterization group, as the wide tiles kernel
  constexpr int kUnitColumns = kPair ? 2 : 1;
  extern __shared__ uint8_t shared_raw[];
  uint8_t* stages = align_shared(shared_raw);
  uint8_t* staged = stages + kStages * kStageBytes;  // the out tile, bf16
  float* scales = reinterpret_cast<float*>(staged + Layout::kOutBytes);
  float* scale_boxes = scales + kStages * kScaleBytes / 4;
  auto* full = reinterpret_cast<uint64_t*>(scale_boxes + kScaleBoxSlots * kScaleABoxBytes / 4);
  uint64_t* empty = full + kStages;
  const int warpgroup = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x) / kWarpgroup, 0);
  const uint32_t rank = kPair ? sm90::cluster_rank() : 0;

  // Units of kUnitColumns neighbouring column tiles, ordered as the wide tiles kernel orders its
  // tiles; this CTA takes column `rank` of its pair's units pair, pair + pairs, ... of the whole
  // rounds, then its items of the split round (persistent::item_at).
  // Grouped: the units are the tiles of the groups' rows, group after group; group g's first is
  // first_unit[g] (groups + 1 words past the barriers, listed below once the counts are final).
  [[maybe_unused]] int* first_unit = reinterpret_cast<int*>(empty + kStages);
  // Contiguous in 256-row tiles: the tile count, then each tile's first block << 1 | (one block
  // only), in the order of a's rows (past the barriers, as first_unit).
  [[maybe_unused]] int* run_tile_count = first_unit;
  [[maybe_unused]] uint16_t* run_tiles = reinterpret_cast<uint16_t*>(first_unit + 1);
  [[maybe_unused]] bool single_block = false;  // of the tile origin() found last (kRunTiles)
  int units = args.tiles_m * (args.tiles_n / kUnitColumns);
  const int pair = static_cast<int>(blockIdx.x) / kUnitColumns;  // (a CTA where not in pairs)
  const int pairs = static_cast<int>(gridDim.x) / kUnitColumns;
  // Grouped: the group of the unit origin() found last (a thread's units only grow).
  [[maybe_unused]] int unit_group = 0;
  // Contiguous: the index of the block at row m0, -1 for padding (read after the wait: the indices
  // are the previous kernel's output).
  [[maybe_unused]] const auto block_index = [&](int m0) {
    const int index = args.m_indices[static_cast<int64_t>(m0) * args.m_index_stride];
    return index >= 0 && index < args.groups ? index : -1;
  };
  const auto origin = [&](int unit, int& m0, int& n0) {
    int tiles_m = args.tiles_m;
    if constexpr (kGrouped) {
      while (first_unit[unit_group + 1] <= unit) ++unit_group;
      unit -= first_unit[unit_group];
      tiles_m =
          (first_unit[unit_group + 1] - first_unit[unit_group]) / (args.tiles_n / kUnitColumns);
    }
    if constexpr (kRunTiles) tiles_m = *run_tile_count;
    const int per_group = kGroupRows * (args.tiles_n / kUnitColumns);
    const int group = unit / per_group;
    const int first_row = group * kGroupRows;
    const int group_rows = min(tiles_m - first_row, kGroupRows);
    const int in_group = unit % per_group;
    const int tile_m = first_row + in_group % group_rows;
    if constexpr (kRunTiles) {
      const int tile = run_tiles[tile_m];
      m0 = (tile >> 1) * kIndexRows;
      single_block = (tile & 1) != 0;
    } else {
      m0 = tile_m * kBlockM;
    }
    n0 = ((in_group / group_rows) * kUnitColumns + static_cast<int>(rank)) * kBlockN;
  };
  // Activation-scale boxes (a_k_inner): one per 4 words (a word: a k-block, or 4 packed ones).
  // Their slots count on across items.
  const auto word_of = [&](int kb) { return args.scales.a_packed ? kb >> 2 : kb; };
  const int k_blocks = args.k_blocks;
  const int slots = (k_blocks + kStages - 1) / kStages * kStages;  // a tile's, whole turns
  const int words = args.scales.a_packed ? (k_blocks + 3) / 4 : k_blocks;
  const int boxes_per_tile = (words + 3) / 4;  // (a tile's, in a build that does not split)

  MOEKIT_PERSISTENT_TRACE(PersistentTrace trace; const bool tracing = kSplit && threadIdx.x == 0;
                          if (tracing) trace.enter());
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      sm90::mbarrier_init(&full[s], kScaleLoader ? 2 : 1);
      sm90::mbarrier_init(&empty[s], kConsumers * 4 * (kPair ? 2 : 1));
    }
    sm90::fence_barrier_init();
  }
  if constexpr (kPair)
    sm90::cluster_sync();
  else
    __syncthreads();
  vendor::allow_next_grid();
  if constexpr (kGrouped) {
    // The counts are the previous kernel's output: every thread waits for it, warp 0 lists each
    // group's first unit (a warp scan of their tile counts), and the CTA meets before any unit.
    // Without counts every group has all m rows.
    vendor::wait_for_previous_grid();
    if (threadIdx.x < 32) {
      const int lane = static_cast<int>(threadIdx.x);
      int before = 0;
      for (int g0 = 0; g0 < args.groups; g0 += 32) {
        const int g = g0 + lane;
        const int rows = g >= args.groups ? 0
                         : args.masked_m  ? min(max(args.masked_m[g], 0), args.m)
                                          : args.m;
        const int own = (rows + kBlockM - 1) / kBlockM * (args.tiles_n / kUnitColumns);
        int inclusive = own;
#pragma unroll
        for (int d = 1; d < 32; d *= 2) {
          const int below = __shfl_up_sync(0xffffffffu, inclusive, d);
          if (lane >= d) inclusive += below;
        }
        if (g < args.groups) first_unit[g] = before + inclusive - own;
        before += __shfl_sync(0xffffffffu, inclusive, 31);
      }
      if (lane == 0) first_unit[args.groups] = before;
    }
    __syncthreads();
    units = first_unit[args.groups];
  }
  if constexpr (kRunTiles) {
    // The indices are the previous kernel's output: every thread waits for it; warp 0 lists the
    // tiles of each run of blocks with one index in range (args.tiles_m blocks, 32 at a time: a
    // block opens a tile where it lies an even number of blocks into its run), and the CTA meets
    // before any unit.
    vendor::wait_for_previous_grid();
    if (threadIdx.x < 32) {
      const int lane = static_cast<int>(threadIdx.x);
      const int blocks = args.tiles_m;
      int run_start = 0, listed = 0;  // (of the blocks before this pass)
      for (int b0 = 0; b0 < blocks; b0 += 32) {
        const int b = b0 + lane;
        const int index = b < blocks ? block_index(b * kIndexRows) : -1;
        const bool opens_run = b < blocks && (b == 0 || block_index((b - 1) * kIndexRows) != index);
        int start = opens_run ? b : run_start;  // this block's run's first block
#pragma unroll
        for (int d = 1; d < 32; d *= 2) start = max(start, __shfl_up_sync(0xffffffffu, start, d));
        run_start = __shfl_sync(0xffffffffu, start, 31);
        const bool opens = index >= 0 && ((b - start) & 1) == 0;
        const bool alone = b + 1 >= blocks || block_index((b + 1) * kIndexRows) != index;
        const unsigned openers = __ballot_sync(0xffffffffu, opens);
        if (opens)
          run_tiles[listed + __popc(openers & ((1u << lane) - 1u))] =
              static_cast<uint16_t>(b << 1 | (alone ? 1 : 0));
        listed += __popc(openers);
      }
      if (lane == 0) *run_tile_count = listed;
    }
    __syncthreads();
    units = *run_tile_count * (args.tiles_n / kUnitColumns);
  }

  if (warpgroup == kConsumers) {
    sm90::registers_shrink<kProducerRegisters>();
    if (threadIdx.x == kConsumers * kWarpgroup) {
      sm90::prefetch_tensor_map(&a_map);
      sm90::prefetch_tensor_map(&b_map);
      sm90::prefetch_tensor_map(&scale_maps.a);
      sm90::prefetch_tensor_map(&scale_maps.b);
      if constexpr (kTma) sm90::prefetch_tensor_map(&out_map);
      vendor::wait_for_previous_grid();
      Ring ring;
      if constexpr (kSplit) {
        int box_base = 0;  // boxes the CTA's earlier items opened
        // Copies k-blocks k_begin .. k_end - 1 of a unit into the ring, padded to whole turns.
        const auto produce = [&](int unit, int k_begin, int k_end) {
          int m0, n0;
          origin(unit, m0, n0);
          const int nb = n0 / kBlockN;
          const int length = k_end - k_begin;
          const int item_slots = (length + kStages - 1) / kStages * kStages;  // whole turns
          const int first_box = word_of(k_begin) >> 2;
          for (int i = 0; i < item_slots; ++i, ring.advance()) {
            sm90::mbarrier_wait(&empty[ring.stage], ring.phase ^ 1);
            uint64_t* bar = &full[ring.stage];
            if (i >= length) {  // padding to a whole turn: no copies
              sm90::mbarrier_arrive(bar);
              continue;
            }
            const int kb = k_begin + i;
            uint8_t* stage = stages + ring.stage * kStageBytes;
            const int word = word_of(kb);
            // (an item may start inside a box: it opens that box, from the box's first word)
            const bool opens_box =
                kKInner &&
                (i == 0 || ((word & 3) == 0 && (!args.scales.a_packed || (kb & 3) == 0)));
            sm90::mbarrier_arrive_expect_tx(
                bar, kStageBytes + kScaleCopyBytes + (opens_box ? kScaleABoxBytes : 0));
            if constexpr (kPair) {  // this CTA's half of the A tile, into both rings
              const int half = static_cast<int>(rank) * (kBlockM / 2);
              sm90::tma_load_2d_multicast(stage + half * kBlockK, &a_map, bar, kb * kBlockK,
                                          m0 + half, 0x3);
            } else {
              sm90::tma_load_2d(stage, &a_map, bar, kb * kBlockK, m0);
            }
            sm90::tma_load_2d(stage + S::kTileBytesA, &b_map, bar, kb * kBlockK, n0);
            float* region = scales + ring.stage * kScaleFloats;
            if constexpr (kKInner) {
              if (opens_box)
                sm90::tma_load_2d(scale_boxes + (box_base + (word >> 2) - first_box) %
                                                    kScaleBoxSlots * (kScaleABoxBytes / 4),
                                  &scale_maps.a, bar, word & ~3, m0);
            } else {
              sm90::tma_load_2d(region, &scale_maps.a, bar, m0, word);
            }
            const int inner = args.b_scale_k_inner ? kb : nb;
            sm90::tma_load_2d(region + S::kScaleBOffset / 4, &scale_maps.b, bar,
                              inner & -args.b_scale_lanes, args.b_scale_k_inner ? nb : kb);
          }
          box_base += (word_of(k_end - 1) >> 2) - first_box + 1;
        };
        for (int j = 0;; ++j) {
          const persistent::Item item = persistent::item_at(args, units, pair, pairs, j);
          if (item.unit < 0) break;
          produce(item.unit, item.k_begin, item.k_end);
        }
      } else {  // every unit a whole tile: the loop as before the split, not `produce`, whose
                // use here renamed the consumers' registers (their loop's SASS is kept as it was)
        int box_base = 0;  // boxes the CTA's earlier tiles opened
        // Grouped: the unit's group is every map's third coordinate. Contiguous: the block's index
        // is the weights' maps' third coordinate (a and its scales are one matrix).
        int weights_group = 0;
        const auto copy_rows = [&](void* dst, const CUtensorMap* map, uint64_t* bar, int c0,
                                   int c1) {
          if constexpr (kGrouped)
            sm90::tma_load_3d(dst, map, bar, c0, c1, unit_group);
          else
            sm90::tma_load_2d(dst, map, bar, c0, c1);
        };
        const auto copy_weights = [&](void* dst, const CUtensorMap* map, uint64_t* bar, int c0,
                                      int c1) {
          if constexpr (kGroups != persistent::Groups::none)
            sm90::tma_load_3d(dst, map, bar, c0, c1, weights_group);
          else
            sm90::tma_load_2d(dst, map, bar, c0, c1);
        };
        for (int unit = pair; unit < units; unit += pairs, box_base += boxes_per_tile) {
          int m0, n0;
          origin(unit, m0, n0);
          if constexpr (kContiguous) {
            weights_group = block_index(m0);
            if (weights_group < 0) continue;  // padding (the consumers skip it too)
          } else {
            weights_group = unit_group;
          }
          const int nb = n0 / kBlockN;
          // A tile of one block in pairs (kRunTiles): rank 0's half of the A tile is the block;
          // rank 1 copies none, and both rings expect that half less.
          const bool half_only = kPair && kRunTiles && single_block;
          const int a_bytes_less = half_only ? kBlockM / 2 * kBlockK : 0;
          for (int kb = 0; kb < slots; ++kb, ring.advance()) {
            sm90::mbarrier_wait(&empty[ring.stage], ring.phase ^ 1);
            uint64_t* bar = &full[ring.stage];
            if (kb >= k_blocks) {  // padding to a whole turn: no copies
              sm90::mbarrier_arrive(bar);
              continue;
            }
            uint8_t* stage = stages + ring.stage * kStageBytes;
            const int word = args.scales.a_packed ? kb >> 2 : kb;
            const bool opens_box =
                kKInner && (word & 3) == 0 && (!args.scales.a_packed || (kb & 3) == 0);
            sm90::mbarrier_arrive_expect_tx(bar, kStageBytes - a_bytes_less + kScaleCopyBytes +
                                                     (opens_box ? kScaleABoxBytes : 0));
            if constexpr (kPair) {  // this CTA's half of the A tile, into both rings
              const int half = static_cast<int>(rank) * (kBlockM / 2);
              if (half_only && rank == 1) {
                // (no copy: the block is rank 0's half)
              } else if constexpr (kGrouped)
                sm90::tma_load_3d_multicast(stage + half * kBlockK, &a_map, bar, kb * kBlockK,
                                            m0 + half, unit_group, 0x3);
              else
                sm90::tma_load_2d_multicast(stage + half * kBlockK, &a_map, bar, kb * kBlockK,
                                            m0 + half, 0x3);
            } else {
              copy_rows(stage, &a_map, bar, kb * kBlockK, m0);
            }
            copy_weights(stage + S::kTileBytesA, &b_map, bar, kb * kBlockK, n0);
            float* region = scales + ring.stage * kScaleFloats;
            if constexpr (kKInner) {
              if (opens_box)
                copy_rows(
                    scale_boxes + (box_base + (word >> 2)) % kScaleBoxSlots * (kScaleABoxBytes / 4),
                    &scale_maps.a, bar, word, m0);
            } else {
              copy_rows(region, &scale_maps.a, bar, m0, word);
            }
            if constexpr (!kScaleLoader) {
              const int inner = args.b_scale_k_inner ? kb : nb;
              copy_weights(region + S::kScaleBOffset / 4, &scale_maps.b, bar,
                           inner & -args.b_scale_lanes, args.b_scale_k_inner ? nb : kb);
            }
          }
        }
      }
    }
    if constexpr (kScaleLoader) {
      if (threadIdx.x / 32 == kConsumers * 4 + 1) {
        // The weight scales of each unit's k-blocks, 32 at a time (a load per lane), into the
        // ring's stages in the producer's order (padding slots only arrived on).
        const int lane = static_cast<int>(threadIdx.x) % 32;
        vendor::wait_for_previous_grid();
        Ring ring;
        for (int unit = pair; unit < units; unit += pairs) {
          int m0, n0;
          origin(unit, m0, n0);
          int group = unit_group;
          if constexpr (kContiguous) {
            group = block_index(m0);
            if (group < 0) continue;  // padding (as the producer and the consumers)
          }
          const int64_t row = static_cast<int64_t>(group) * args.b_scale_group_stride +
                              static_cast<int64_t>(n0 / kBlockN) * args.scales.b_row_stride;
          for (int kb0 = 0; kb0 < slots; kb0 += 32) {
            float mine = 0.0f;
            if (kb0 + lane < k_blocks) {
              const int64_t at = row + static_cast<int64_t>(kb0 + lane) * args.scales.b_col_stride;
              mine = args.scales.b_bf16
                         ? __uint_as_float(static_cast<uint32_t>(__ldg(
                                               static_cast<const uint16_t*>(args.scales.b) + at))
                                           << 16)
                         : __ldg(static_cast<const float*>(args.scales.b) + at);
            }
            for (int i = 0; i < 32 && kb0 + i < slots; ++i, ring.advance()) {
              const float value = __shfl_sync(0xffffffffu, mine, i);
              if (lane == 0) {
                sm90::mbarrier_wait(&empty[ring.stage], ring.phase ^ 1);
                scales[ring.stage * kScaleFloats + S::kScaleBOffset / 4] = value;
                sm90::mbarrier_arrive(&full[ring.stage]);  // (a release: the store is seen)
              }
            }
          }
        }
      }
    }
    // Pairs: no thread leaves while the peer may still arrive on this CTA's barriers.
    __syncwarp();
    if constexpr (kPair) {
      sm90::cluster_arrive();
      sm90::cluster_wait();
    }
    return;
  }

  sm90::registers_grow<kConsumerRegisters>();
  const int t = static_cast<int>(threadIdx.x) % kWarpgroup;
  const int warp = t / 32, lane = t % 32;
  const int tile_row = warpgroup * kRowsPerGroup + warp * 16 + lane / 4;
  vendor::wait_for_previous_grid();  // (out may still be read by the previous kernel)
  MOEKIT_PERSISTENT_TRACE(if (tracing) trace.stamp(Sm90TracePhase::consumer_waited));

  float acc[kWaves][64], part[64];
  const uint8_t* a_half = stages + warpgroup * kRowsPerGroup * kBlockK;
  const uint32_t a_low = sm90::smem_descriptor_sw128_low(a_half);
  const uint32_t b_low = sm90::smem_descriptor_sw128_low(stages + S::kTileBytesA);
  const auto release = [&](int stage) {
    __syncwarp();
    if (lane == 0) {
      sm90::mbarrier_arrive(&empty[stage]);
      if constexpr (kPair) sm90::mbarrier_arrive_peer(&empty[stage], rank ^ 1);
    }
  };
  // The wide tiles kernel's k-block (gemm_tiles.cuh): the scale words loaded right after the
  // stage's wait, the factors computed while the first wave's wgmma run.
  constexpr int kRowStep = kKInner ? 8 * 4 : 8;
  // (zero: 0, opaque to the compiler; see the loops below.) waves: kWaves, or 1 for a tile of one
  // block (kRunTiles), whose 128 rows the two warpgroups take a wave each.
  constexpr int kWaveDescriptor = 64 * kBlockK / 16;  // a wave's rows in a descriptor's units
  const auto k_block = [&](int stage, uint32_t phase, int kb, int nb, int box_base, int zero,
                           auto waves) {
    constexpr int kTileWaves = decltype(waves)::value;
    const int row_shift = kTileWaves < kWaves ? 64 * warpgroup : 0;  // (a tile of one block)
    const uint32_t* a_words[kTileWaves];
#pragma unroll
    for (int v = 0; v < kTileWaves; ++v) {
      const int row = tile_row - row_shift + 64 * v;
      if constexpr (kKInner) {
        const int word = args.scales.a_packed ? kb >> 2 : kb;
        a_words[v] =
            reinterpret_cast<const uint32_t*>(
                scale_boxes + (box_base + (word >> 2)) % kScaleBoxSlots * (kScaleABoxBytes / 4)) +
            row * 4 + (word & 3);
      } else {
        a_words[v] = reinterpret_cast<const uint32_t*>(scales + zero + stage * kScaleFloats) + row;
      }
    }
    const int b_index =
        kScaleLoader ? 0 : (args.b_scale_k_inner ? kb : nb) & (args.b_scale_lanes - 1);
    const bool b_bf16 = !kScaleLoader && args.scales.b_bf16;  // (the loader stores f32)
    const int b_byte = b_bf16 ? 2 * b_index : 4 * b_index;
    const uint32_t* b_word_at = reinterpret_cast<const uint32_t*>(
                                    scales + zero + stage * kScaleFloats + S::kScaleBOffset / 4) +
                                b_byte / 4;
    const int b_shift = b_bf16 ? 16 - 8 * (b_byte & 2) : 0;
    const uint32_t b_mask = b_bf16 ? 0xffff0000u : 0xffffffffu;
    sm90::mbarrier_wait(&full[stage], phase);
    uint32_t a_word[kTileWaves][2];
#pragma unroll
    for (int v = 0; v < kTileWaves; ++v) {
      a_word[v][0] = a_words[v][0];
      a_word[v][1] = a_words[v][kRowStep];
    }
    const uint32_t b_word = *b_word_at;
    const uint32_t stage_low = zero + stage * (kStageBytes / 16);
    const uint32_t a_stage_low = stage_low - (row_shift / 64) * kWaveDescriptor;
    float2 factors[kTileWaves];
#pragma unroll
    for (int w = 0; w < kTileWaves; ++w) {
      issue_k_block_at<kBlockN>(part, a_low + a_stage_low + w * kWaveDescriptor, b_low + stage_low);
      if (w == 0) {
        const float b = __uint_as_float(b_word << b_shift & b_mask);
        const auto factor = [&](uint32_t word) {
          if (args.scales.a_packed) word = (word >> ((kb & 3) * 8) & 0xffu) << 23;
          return __uint_as_float(word) * b;
        };
#pragma unroll
        for (int v = 0; v < kTileWaves; ++v)
          factors[v] = make_float2(factor(a_word[v][0]), factor(a_word[v][1]));
      }
      wait_k_block<kBlockN>(part);
      if (w == kTileWaves - 1) release(stage);
      promote_tile_fragment(acc[w], part, factors[w].x, factors[w].y);
    }
  };

  // ---- The epilogue: out = acc (+ bias[col]), rounded once to the out dtype. Each thread holds
  // columns n0 + 8 j + 2 (lane % 4) + {0, 1} of rows tile_row + 64 w + 8 half. (Without bias a
  // zero is added, which makes -0 +0, as the 128-row tiles kernel does.)
  const Epilogue& e = args.epilogue;
  // 16-bit out, no bias (TMA builds): the tile in `staged`, once the last tile's stores have read
  // it: box j / 8 holds columns 64 (j / 8) .. + 63, rows of 128 bytes whose 16-byte chunks are
  // swizzled by row % 8 (= lane / 4 here, so a warp's 32 stores fall on distinct banks). Then
  // consumer thread 0 stores the two boxes, which run on while the next tile's loop starts.
  const auto stage_and_store_16bit = [&](int m0, int n0) {
    if (threadIdx.x == 0) sm90::bulk_wait_read();
    sm90::named_barrier(1, kConsumers * kWarpgroup);
    // (worked out here, not held across the loop: registers, as above)
    int swizzle = lane / 4, opaque = 0;
    asm volatile("" : "+r"(swizzle), "+r"(opaque));
    uint8_t* staged_at = staged + opaque;  // (an offset, not a laundered pointer: shared stores)
    // (a tile of one block: a wave per warpgroup, rows 64 x warpgroup ..)
    const bool one_wave = kRunTiles && single_block;
    const int row_shift = one_wave ? 64 * warpgroup : 0;
    const auto stage = [&](auto pair_bits) {
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
        for (int w = 0; w < kWaves; ++w) {
          if (one_wave && w > 0) continue;
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int row = tile_row - row_shift + 64 * w + 8 * half;
            uint8_t* row_at = staged_at + row * (persistent::kOutBoxColumns * 2) + 4 * (lane % 4);
            *reinterpret_cast<uint32_t*>(row_at + j / 8 * Layout::kOutBoxBytes +
                                         ((j % 8) ^ swizzle) * 16) =
                pair_bits(acc[w][4 * j + 2 * half] + 0.0f, acc[w][4 * j + 2 * half + 1] + 0.0f);
          }
        }
      }
    };
    if constexpr (kOut == persistent::Out::f16_tma)
      stage([](float x, float y) {
        const __half2 h = __floats2half2_rn(x, y);
        return *reinterpret_cast<const uint32_t*>(&h);
      });
    else
      stage([](float x, float y) {
        const __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
        return *reinterpret_cast<const uint32_t*>(&h);
      });
    sm90::fence_proxy_async_shared();  // the writes, visible to the copy engine
    sm90::named_barrier(1, kConsumers * kWarpgroup);
    if (threadIdx.x == 0) {
#pragma unroll
      for (int box = 0; box < kBlockN / persistent::kOutBoxColumns; ++box)
        if constexpr (kRunTiles) {  // boxes of a block's rows (out_map's): one block or two
          for (int block = 0; block < (single_block ? 1 : 2); ++block)
            sm90::tma_store_2d(&out_map,
                               staged + box * Layout::kOutBoxBytes +
                                   block * kIndexRows * persistent::kOutBoxColumns * 2,
                               n0 + box * persistent::kOutBoxColumns, m0 + block * kIndexRows);
        } else if constexpr (kGrouped)
          sm90::tma_store_3d(&out_map, staged + box * Layout::kOutBoxBytes,
                             n0 + box * persistent::kOutBoxColumns, m0, unit_group);
        else
          sm90::tma_store_2d(&out_map, staged + box * Layout::kOutBoxBytes,
                             n0 + box * persistent::kOutBoxColumns, m0);
      sm90::bulk_commit();
    }
  };
  // Any out (f32, ragged N, unaligned rows): each warpgroup stages a wave (64 rows) at a time in
  // f32 in its half of `staged` (rows of 512 bytes whose 16-byte chunks are swizzled by row % 8:
  // a warp's 8-byte stores take the two wavefronts they need), then its warps store rows of four
  // columns per thread, as the 128-row tiles kernel does.
  const auto stage_and_store_f32 = [&](int m0, int n0) {
    constexpr int kRowBytes = kBlockN * 4;
    uint8_t* half_at = staged + warpgroup * (64 * kRowBytes);
    static_assert(kConsumers * 64 * kRowBytes <= Layout::kOutBytes, "a wave per warpgroup");
    const int col = n0 + 4 * lane;
    const float4 bias = bias_quad(args, col);
    const bool one_wave = kRunTiles && single_block;  // (a tile of one block: a wave each)
#pragma unroll
    for (int w = 0; w < kWaves; ++w) {
      if (one_wave && w > 0) break;
      sm90::named_barrier(2 + warpgroup, kWarpgroup);  // the last wave's rows are stored
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = warp * 16 + lane / 4 + 8 * half;  // of the wave's 64
#pragma unroll
        for (int j = 0; j < kBlockN / 8; ++j) {
          const int chunk = (2 * j + (lane % 4) / 2) ^ (lane / 4);
          *reinterpret_cast<float2*>(half_at + row * kRowBytes + chunk * 16 + 8 * (lane % 2)) =
              make_float2(acc[w][4 * j + 2 * half], acc[w][4 * j + 2 * half + 1]);
        }
      }
      sm90::named_barrier(2 + warpgroup, kWarpgroup);
      const int first_row = m0 + (one_wave ? 64 : kRowsPerGroup) * warpgroup + 64 * w;
#pragma unroll 2
      for (int r = warp; r < 64; r += 4) {
        if (first_row + r >= args.m) break;
        const float4 v =
            *reinterpret_cast<const float4*>(half_at + r * kRowBytes + (lane ^ (r % 8)) * 16);
        const float4 sum = make_float4(v.x + bias.x, v.y + bias.y, v.z + bias.z, v.w + bias.w);
        if constexpr (kGrouped) {  // the unit's group's out
          Epilogue in_group = e;
          in_group.out = static_cast<uint8_t*>(e.out) +
                         unit_group * args.out_group_stride * out_bytes(e.out_type);
          store_quad(in_group, first_row + r, col, args.n, sum);
        } else {
          store_quad(e, first_row + r, col, args.n, sum);
        }
      }
    }
  };

  if constexpr (kSplit) {
    static_assert(kRows == 256, "the workspace tiles hold two waves");
    // The split round's workspace: the tile of CTA `rank` of pair q, as 32 float4 per consumer
    // thread in register order (a warp's stores and loads are 512 contiguous bytes).
    const int consumer = static_cast<int>(threadIdx.x);  // 0..255
    const auto partial_tile = [&](int q) {
      return reinterpret_cast<float4*>(args.sk_partials) +
             static_cast<size_t>(q * kUnitColumns + static_cast<int>(rank)) *
                 (persistent::kPartialBytes / 16) +
             consumer;
    };
    const auto flag_of = [&](int q) { return args.sk_flags + q * kUnitColumns + rank; };
    // The partial tile's stores are issued here and published (fence, flag) only once the pair's
    // next item is multiplied, or as the CTA leaves: the 128 KB drain to L2 while the tensor cores
    // work instead of in front of them (2.5-3.6 us a CTA, H200, fp8-gpu-sm90.md, session 25). A
    // pair never waits for a flag before it has published its own, so no wait can close a cycle.
    bool unpublished = false;
    const auto save_partial = [&]() {
      float4* tile = partial_tile(pair);
#pragma unroll
      for (int v = 0; v < 32; ++v)
        tile[v * kConsumers * kWarpgroup] =
            make_float4(acc[v / 16][4 * (v % 16)], acc[v / 16][4 * (v % 16) + 1],
                        acc[v / 16][4 * (v % 16) + 2], acc[v / 16][4 * (v % 16) + 3]);
      unpublished = true;
    };
    const auto publish_partial = [&]() {
      if (!unpublished) return;
      unpublished = false;
      __threadfence();
      sm90::named_barrier(1, kConsumers * kWarpgroup);
      if (consumer == 0) sm90::store_release_gpu(flag_of(pair), 1);
      MOEKIT_PERSISTENT_TRACE(if (tracing) trace.stamp(persistent_trace::partial_published));
    };
    // acc = ((acc + partial of first_partner) + ...) + partial of pair - 1: the same order in every
    // call. Each partner's tile is added as soon as its flag is seen (the earlier partners publish
    // earlier), and its flag goes back to zero for the next call.
    const auto add_partials = [&](int first_partner) {
#pragma unroll 1
      for (int q = first_partner; q < pair; ++q) {
        if (consumer == 0) {
          while (sm90::load_acquire_gpu(flag_of(q)) == 0) {
          }
          *flag_of(q) = 0;
          MOEKIT_PERSISTENT_TRACE(if (q == pair - 1) trace.stamp(persistent_trace::partners_ready));
        }
        sm90::named_barrier(1, kConsumers * kWarpgroup);
        const float4* tile = partial_tile(q);
#pragma unroll
        for (int v = 0; v < 32; ++v) {
          const float4 p = __ldcg(tile + v * kConsumers * kWarpgroup);
          float* a = &acc[v / 16][4 * (v % 16)];
          a[0] += p.x;
          a[1] += p.y;
          a[2] += p.z;
          a[3] += p.w;
        }
      }
    };

    uint32_t phase = 0;
    int box_base = 0;
    // k-blocks k_begin .. k_begin + length - 1 of a unit into acc. Whole turns of the ring,
    // unrolled so that each stage's addresses are constants; then the last turn, its slots past the
    // k-blocks only waited for and released.
    const auto multiply = [&](int k_begin, int length, int nb, int boxes) {
#pragma unroll
      for (int w = 0; w < kWaves; ++w)
#pragma unroll
        for (int i = 0; i < 64; ++i) acc[w][i] = 0.0f;
      const int whole = length / kStages * kStages;  // k-blocks in whole turns
      for (int first = 0; first < whole; first += kStages, phase ^= 1) {
        // The stages' scale addresses and wgmma descriptors are worked out per turn, not hoisted
        // out of these loops: held for every stage and wave they exceeded the registers, uniform
        // and not (ptxas spilled ~40 of them). An opaque zero, not a laundered pointer, so that the
        // scale reads stay shared-memory loads.
        int zero = 0;
        asm volatile("" : "+r"(zero));
#pragma unroll
        for (int stage = 0; stage < kStages; ++stage)
          k_block(stage, phase, k_begin + first + stage, nb, boxes, zero,
                  std::integral_constant<int, kWaves>{});
      }
      if (whole < length) {
        int zero = 0;
        asm volatile("" : "+r"(zero));
#pragma unroll
        for (int stage = 0; stage < kStages; ++stage) {
          if (whole + stage < length) {
            k_block(stage, phase, k_begin + whole + stage, nb, boxes, zero,
                    std::integral_constant<int, kWaves>{});
          } else {
            sm90::mbarrier_wait(&full[stage], phase);
            release(stage);
          }
        }
        phase ^= 1;
      }
    };
    const auto store_tile = [&](int m0, int n0) {
      if constexpr (kTma)
        stage_and_store_16bit(m0, n0);
      else
        stage_and_store_f32(m0, n0);
    };
    MOEKIT_PERSISTENT_TRACE(bool whole_stamped = false);
    for (int j = 0;; ++j) {
      const persistent::Item item = persistent::item_at(args, units, pair, pairs, j);
      if (item.unit < 0) break;
      MOEKIT_PERSISTENT_TRACE(if (tracing && !whole_stamped && item.unit >= units - args.sk_units) {
        trace.stamp(persistent_trace::whole_done);
        whole_stamped = true;
      });
      int m0, n0;
      origin(item.unit, m0, n0);
      const int first_box = word_of(item.k_begin) >> 2;
      // (k_block adds the word's box to box_base - first_box)
      multiply(item.k_begin, item.k_end - item.k_begin, n0 / kBlockN, box_base - first_box);
      box_base += (word_of(item.k_end - 1) >> 2) - first_box + 1;
      publish_partial();  // (an earlier item's)
      if (item.partial) {
        MOEKIT_PERSISTENT_TRACE(
            if (tracing) trace.stamp_after(persistent_trace::partial_multiplied, acc[0]));
        save_partial();
        MOEKIT_PERSISTENT_TRACE(if (tracing) trace.stamp(persistent_trace::partial_saved));
        continue;
      }
      if (item.first_partner >= 0) {
        MOEKIT_PERSISTENT_TRACE(if (tracing)
                                    trace.stamp_after(persistent_trace::final_multiplied, acc[0]));
        add_partials(item.first_partner);
        MOEKIT_PERSISTENT_TRACE(if (tracing)
                                    trace.stamp_after(persistent_trace::partials_added, acc[0]));
      }
      store_tile(m0, n0);
      MOEKIT_PERSISTENT_TRACE(if (tracing && whole_stamped)
                                  trace.stamp(Sm90TracePhase::stores_issued));
    }
    publish_partial();  // (the CTA's last item's)
  } else {  // every unit a whole tile: the loop as before the split, so that this build's SASS
            // stays as it was (the items in this loop cost the whole rounds 3 %: see kSplit)
    uint32_t phase = 0;
    int box_base = 0;
    const int whole = k_blocks / kStages * kStages;  // k-blocks in whole turns
    for (int unit = pair; unit < units; unit += pairs, box_base += boxes_per_tile) {
      int m0, n0;
      origin(unit, m0, n0);
      if constexpr (kContiguous)
        if (block_index(m0) < 0) continue;  // padding: nothing multiplied, nothing stored
      const int nb = n0 / kBlockN;
#pragma unroll
      for (int w = 0; w < kWaves; ++w)
#pragma unroll
        for (int i = 0; i < 64; ++i) acc[w][i] = 0.0f;
      // Whole turns of the ring, unrolled so that each stage's addresses are constants; then the
      // last turn, its slots past the k-blocks only waited for and released.
      const auto multiply = [&](auto waves) {
        for (int first = 0; first < whole; first += kStages, phase ^= 1) {
          // The stages' scale addresses and wgmma descriptors are worked out per turn, not hoisted
          // out of these loops: held for every stage and wave they exceeded the registers, uniform
          // and not (ptxas spilled ~40 of them). An opaque zero, not a laundered pointer, so that
          // the scale reads stay shared-memory loads.
          int zero = 0;
          asm volatile("" : "+r"(zero));
#pragma unroll
          for (int stage = 0; stage < kStages; ++stage)
            k_block(stage, phase, first + stage, nb, box_base, zero, waves);
        }
        if (whole < slots) {
          int zero = 0;
          asm volatile("" : "+r"(zero));
#pragma unroll
          for (int stage = 0; stage < kStages; ++stage) {
            if (whole + stage < k_blocks) {
              k_block(stage, phase, whole + stage, nb, box_base, zero, waves);
            } else {
              sm90::mbarrier_wait(&full[stage], phase);
              release(stage);
            }
          }
          phase ^= 1;
        }
      };
      if constexpr (kRunTiles) {
        if (single_block)
          multiply(std::integral_constant<int, 1>{});
        else
          multiply(std::integral_constant<int, kWaves>{});
      } else {
        multiply(std::integral_constant<int, kWaves>{});
      }
      if constexpr (kTma)
        stage_and_store_16bit(m0, n0);
      else
        stage_and_store_f32(m0, n0);
    }
  }
  if (kTma && threadIdx.x == 0)
    sm90::bulk_wait_read();  // shared memory stays until the copies read it
  // Pairs: this thread's last arrival on the peer is done; neither CTA leaves before both say so.
  if constexpr (kPair) {
    sm90::cluster_arrive();
    sm90::cluster_wait();
  }
  MOEKIT_PERSISTENT_TRACE(if (tracing) trace.leave(rank));
#else
  (void)a_map;
  (void)b_map;
  (void)args;
  (void)scale_maps;
  (void)out_map;
#endif
}

}  // namespace
}  // namespace moekit::gpu
