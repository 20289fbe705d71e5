// The grouped swap kernel (grouped_block_fp8_gemm at decode sizes; included by fp8_gemm_sm90.cu
// only): the swap kernel's layout, split and sums for one group's GEMM, with every CTA taking its
// weight tile in group after group within one launch. Its producer streams the k-blocks of all
// groups through one ring, so the weight stream does not stop between groups: a decode call's
// fixed costs (the grid's start after the previous grid, the first touches after the wait, the
// sums and stores of the tail; docs/perf/fp8-gpu-sm90.md, v10) are paid once per launch, and
// each group's tail overlaps the next group's weight copies.
#pragma once

#include "gpu/sm90/gemm_swap.cuh"

namespace moekit::gpu {
namespace {  // one translation unit includes this: fp8_gemm_sm90.cu

// Where the groups lie, in elements of each tensor (the tensor maps carry a and b's).
struct GroupStrides {
  int groups;
  int64_t a_scales;  // f32 values (i32 words where packed) between groups' activation scales
  int64_t b_scales;  // weight-scale elements between groups
  int64_t out;       // out elements between groups
  // K split: rank 0 adds and stores a group's sums after the next group's k-loop (two inbox
  // slots), so that no rank waits for the others between groups.
  bool late_sums;
  // [groups] i32 on the device, or null: group g's rows are its first min(max(masked_m[g], 0), m)
  // (DeepGEMM's masked layout). The items are then the token tiles with rows, (group, tile), and
  // a CTA holds at most max_items of them (shared memory).
  const int* masked_m;
  int max_items;
  int64_t x;  // gated build: bf16 elements between groups' x planes (args.activations.x)
};

// The masked build's item: group and token tile in one word.
constexpr int kItemTileBits = 11;
constexpr int kMaxItemTiles = 1 << kItemTileBits;

// The producer warpgroup's registers after reallocation: its scale loader spilled in the swap
// kernel's 40. The consumers' growth must fit what the producers give back, or it waits forever
// (a 64 / 224 build hung on an H200, session 30): at most the 168 per thread of the launch.
constexpr int kGroupedProducerRegisters = 56;
constexpr int kGroupedConsumerRegisters = 224;
static_assert(kWarpgroup * kGroupedProducerRegisters +
                      kConsumers * kWarpgroup * kGroupedConsumerRegisters <=
                  kThreads * 168,
              "register reallocation past the launch's 168 per thread");

// kGated (silu_and_mul_grouped_block_fp8_gemm_masked): the stages carry weight tiles only; each
// scale buffer also holds the item's token tiles, which the scale loaders quantize from bf16 x,
// silu(gate) * up, instead of the producer copying them.
template <int kTokens, int kRows, bool kGated = false>
struct SwapGrouped {
  using Config = Swap<kTokens, kRows, kGated>;
  static constexpr bool kAlternate = kRows == 64;
  // Warpgroup 1's sums on their way to warpgroup 0 (alternating layout): a region of their own,
  // as the ring is busy with the next group's tiles.
  static constexpr int kPartialBytes = kAlternate ? Config::kRegisters * kWarpgroup * 4 : 0;
  // The scale loader (warps 1-3 of the producer warpgroup) fills a ring of kScaleDepth buffers
  // with each group's scales, as many groups ahead as the ring allows: loads issued under the
  // weight stream take 1-2 us (v10), longer than a short group's k-loop.
  static constexpr int kScaleDepth = 4;
  static constexpr int kScaleLoaders = 3 * 32;
  // One group's a scales [L][kTokens] then b scales [L], in floats (16-byte multiples: the
  // consumers read pairs).
  __host__ __device__ static int scale_buffer_floats(int k_blocks_per_split) {
    return (k_blocks_per_split * (kTokens + 1) + 3) / 4 * 4;
  }
  // The gated build's token tiles of one scale buffer (one per k-block of the CTA's range).
  __host__ __device__ static int token_tile_bytes(int k_blocks_per_split) {
    return kGated ? k_blocks_per_split * Config::kTokenBytes : 0;
  }
  // Shared memory: stages | the gated build's token tiles (kScaleDepth buffers) | full, empty
  // barriers | sums-ready, inbox-free barriers (one per inbox slot) | scale full, scale empty
  // barriers | scale buffers | warpgroup 1's sums | 2 inbox slots (16-byte aligned; `inbox` is one
  // slot's bytes) | the masked build's work: each group's rows, the CTA's items and their count
  // (`list_words` = groups + max_items + 1; 0 for the unmasked build, which lists none).
  static size_t shared_bytes(int k_blocks_per_split, int stages, size_t inbox, int list_words) {
    return static_cast<size_t>(list_words + 1) * 4 + kSharedAlign +
           static_cast<size_t>(stages) * (Config::kStageBytes + 2 * sizeof(uint64_t)) +
           static_cast<size_t>(kScaleDepth) * token_tile_bytes(k_blocks_per_split) +
           (4 + 2 * kScaleDepth) * sizeof(uint64_t) + inbox +
           static_cast<size_t>(kScaleDepth) * scale_buffer_floats(k_blocks_per_split) * 4 +
           kPartialBytes + 16 + inbox;
  }
};

// The builds: whole groups; masked (strides.masked_m given) with M within one token tile; masked
// with a capacity of several. Each a build of its own, so that the lighter ones keep their items
// simple at compile time: with the lookups decided at run time, the unmasked launch measured 3-6 %
// slower at the expert and down shapes (H200, session 29), and the several tiles' listing made a
// one-tile launch 3-9 % slower (session 32).
enum class GroupedBuild { whole, masked, masked_tiles };

// The gated build's token tiles of one item: each 128-element group of silu(gate) * up of its rows
// (a k-block of a token) is quantized by 16 lanes of a loader warp, 8 elements each (a loader
// warp takes two groups a pass, the 3 warps six), as silu_and_mul_group_quant_fp8's GPU kernel
// does it: the same chunks, the same amax shuffles over 16 lanes, so the same bytes and scales.
// The bytes go where TMA's 128-byte swizzle would put them (16-byte unit u of row r at unit
// u ^ r % 8), the scales into the item's a-scale slots [k-block][token].
constexpr int kGatedGroupLanes = kBlockK / kChunk;                              // 16
constexpr int kGatedGroupsPerPass = 3 * kLanes / kGatedGroupLanes;             // 6
constexpr int kGatedBatch = 4;  // passes whose loads are in flight at once
// `between()` runs once the first batch's loads are issued (the b scales' loads: one round trip
// for both). Passes past the last group are skipped whole (the same in every loader); the halves
// of a warp past it work on ones (any zero would send the warp's quotients down the slow division
// path of silu_and_mul_chunk) and write nothing.
template <class Between>
__device__ __forceinline__ void quantize_gated_tiles(const Activations& x, const int64_t x_plane,
                                                     int t0, int tokens, int kb_begin, int count,
                                                     int token_bytes, uint8_t* tiles,
                                                     float* a_scales, int a_stride, int loader,
                                                     Between&& between) {
  const int part = loader % kGatedGroupLanes, first = loader / kGatedGroupLanes;
  const int groups = count * tokens;
  const auto* base = static_cast<const uint16_t*>(x.x) + x_plane;
  for (int batch = 0; batch < groups; batch += kGatedBatch * kGatedGroupsPerPass) {
    RawChunk<Wide::bf16> gate[kGatedBatch], up[kGatedBatch];
#pragma unroll
    for (int b = 0; b < kGatedBatch; ++b) {
      if (batch + b * kGatedGroupsPerPass >= groups) break;
      const int group = batch + b * kGatedGroupsPerPass + first;
      const int token = group % tokens, i = group / tokens;
      constexpr uint32_t kOnes = 0x3f803f80u;  // two bf16 ones
      uint4 g = make_uint4(kOnes, kOnes, kOnes, kOnes), u = g;
      if (group < groups) {
        const uint16_t* at = base + (t0 + token) * x.row_stride + (kb_begin + i) * kBlockK +
                             part * kChunk;
        g = __ldg(reinterpret_cast<const uint4*>(at));
        u = __ldg(reinterpret_cast<const uint4*>(at + x.k));
      }
      gate[b].w[0] = g.x, gate[b].w[1] = g.y, gate[b].w[2] = g.z, gate[b].w[3] = g.w;
      up[b].w[0] = u.x, up[b].w[1] = u.y, up[b].w[2] = u.z, up[b].w[3] = u.w;
    }
    if (batch == 0) between();
#pragma unroll
    for (int b = 0; b < kGatedBatch; ++b) {
      if (batch + b * kGatedGroupsPerPass >= groups) break;
      const int group = batch + b * kGatedGroupsPerPass + first;
      // Every lane of the warp takes the vote in silu_and_mul_chunk and the shuffles.
      float v[kChunk], w[kChunk];
      decode_raw<Wide::bf16>(gate[b], v);
      decode_raw<Wide::bf16>(up[b], w);
      silu_and_mul_chunk(v, w);
      uint32_t lo, hi;
      const float scale = quantize_group_chunk<kGatedGroupLanes>(v, x.eps, x.ue8m0, lo, hi);
      if (group >= groups) continue;
      const int token = group % tokens, i = group / tokens;
      uint8_t* row = tiles + i * token_bytes + token * kBlockK;
      *reinterpret_cast<uint2*>(row + ((part / 2) ^ (token % 8)) * 16 + (part % 2) * 8) =
          make_uint2(lo, hi);
      if (part == 0) a_scales[i * a_stride + token] = scale;
    }
  }
  if (groups == 0) between();  // (a listed item has rows: not reached)
}

template <int kTokens, int kRows, GroupedBuild kBuild, bool kGated = false>
__global__ void __launch_bounds__(kThreads, 1)
    gemm_swap_grouped_kernel(const __grid_constant__ CUtensorMap w_map,
                             const __grid_constant__ CUtensorMap x_map, const GemmArgs args,
                             const GroupStrides strides) {
#if MOEKIT_SM90A
  using Config = Swap<kTokens, kRows, kGated>;
  constexpr bool kAlternate = kRows == 64;
  constexpr int kRegisters = Config::kRegisters;
  static_assert(!kGated || kBuild != GroupedBuild::whole, "the gated build is masked");
  extern __shared__ uint8_t shared_raw[];
  const int stage_count = args.stages;
  const int splits = args.splits;
  const int groups = strides.groups;
  const int max_count = (args.k_blocks + splits - 1) / splits;
  uint8_t* stages = align_shared(shared_raw);
  using Grouped = SwapGrouped<kTokens, kRows, kGated>;
  // Gated: buffer b's token tiles (1024-byte aligned: the stages' bytes are multiples of 1024).
  uint8_t* token_tiles = stages + stage_count * Config::kStageBytes;
  const int tile_buffer_bytes = Grouped::token_tile_bytes(max_count);
  auto* full = reinterpret_cast<uint64_t*>(token_tiles + Grouped::kScaleDepth * tile_buffer_bytes);
  uint64_t* empty = full + stage_count;
  // Inbox slot g % 2 takes group g's sums: sums_ready[slot] in rank 0 (the other ranks' sums are
  // in), inbox_free[slot] in the other ranks (rank 0 has read the sums there).
  uint64_t* sums_ready = empty + stage_count;
  uint64_t* inbox_free = sums_ready + 2;
  constexpr int kScaleDepth = Grouped::kScaleDepth;
  uint64_t* scale_full = inbox_free + 2;  // the loader has filled buffer g % depth for group g
  uint64_t* scale_empty = scale_full + kScaleDepth;  // the consumers are done with it
  const int buffer_floats = Grouped::scale_buffer_floats(max_count);
  auto* scale_buffers = reinterpret_cast<float*>(scale_empty + kScaleDepth);
  float* partial = scale_buffers + kScaleDepth * buffer_floats;
  const int slot_floats = (splits - 1) * Config::kSenders * kRegisters;  // one inbox slot
  auto* inbox = reinterpret_cast<float*>(
      (reinterpret_cast<uintptr_t>(partial) + Grouped::kPartialBytes + 15) /
      16 * 16);
  // The masked build's work: group g has group_rows[g] rows; the CTA's item a is token tile
  // work_item[a] & (kMaxItemTiles - 1) of group work_item[a] >> kItemTileBits.
  auto* group_rows = reinterpret_cast<int*>(inbox + 2 * slot_floats);
  int* work_item = group_rows + groups;
  int* work_count = work_item + strides.max_items;

  const int warpgroup = static_cast<int>(threadIdx.x) / kWarpgroup;
  const int split = splits > 1 ? static_cast<int>(sm90::cluster_rank()) : 0;
  const int n0 = static_cast<int>(blockIdx.x) / splits * kRows;
  // Slice y of the grid takes groups y, y + slices, ...: where one group's tiles leave SMs idle,
  // the groups spread over them (the host keeps slices <= groups).
  const int slice = static_cast<int>(blockIdx.y), slices = static_cast<int>(gridDim.y);
  const int kb_begin = static_cast<int>(static_cast<int64_t>(split) * args.k_blocks / splits);
  const int kb_end = static_cast<int>(static_cast<int64_t>(split + 1) * args.k_blocks / splits);
  const int count = kb_end - kb_begin;  // >= 1: the host keeps splits <= k_blocks
  const bool push = splits > 1;         // the host plans pushed sums wherever K is split

  if (threadIdx.x == 0) {
    for (int s = 0; s < stage_count; ++s) {
      sm90::mbarrier_init(&full[s], 1);
      sm90::mbarrier_init(&empty[s], (kAlternate ? 1 : kConsumers) * 4);  // lane 0 of each warp
    }
    for (int slot = 0; slot < 2; ++slot) {
      sm90::mbarrier_init(&sums_ready[slot], max(1, (splits - 1) * Config::kSenders));
      sm90::mbarrier_init(&inbox_free[slot], 1);
    }
    for (int b = 0; b < kScaleDepth; ++b) {
      sm90::mbarrier_init(&scale_full[b], Grouped::kScaleLoaders);
      sm90::mbarrier_init(&scale_empty[b], 1);
    }
    sm90::fence_barrier_init();
  }
  __syncthreads();
  // Every thread arrives now and waits before its CTA's first remote access, so that the other
  // ranks' barriers are initialized by then.
  if (push) sm90::cluster_arrive();
  vendor::allow_next_grid();

  // With masked_m (the previous kernel's output), the token tiles with rows, group by group, are
  // the items, dealt to the slices in turn (so that a slice does not get every group with rows
  // where they alternate with empty ones); a capacity of many token tiles costs no CTAs, only the
  // tiles with rows. Without, item a is group slice + a * slices, its M rows one token tile.
  constexpr bool masked = kBuild != GroupedBuild::whole;
  constexpr bool several_tiles = kBuild == GroupedBuild::masked_tiles;
  if constexpr (masked) {
    vendor::wait_for_previous_grid();
    if (static_cast<int>(threadIdx.x) / 32 == kConsumers * 4 + 1) {
      // Every count's load in flight at once: each round trip after the wait takes 1-2 us under
      // the other SMs' weight streams (v10), and 4 in a row (128 groups, one per lane at a time)
      // cost the MoE decode step's launches 0.7-1 us (fp8-gpu-sm90.md, session 32).
      constexpr int kLoads = 4;
      const int lane = static_cast<int>(threadIdx.x) % 32;
      int listed = 0;
      for (int base = 0; base < groups; base += kLoads * 32) {
        int counts[kLoads];
#pragma unroll
        for (int j = 0; j < kLoads; ++j) {
          const int group = base + j * 32 + lane;
          counts[j] = group < groups ? __ldg(strides.masked_m + group) : 0;
        }
#pragma unroll
        for (int j = 0; j < kLoads; ++j) {
          const int group = base + j * 32 + lane;
          const int rows = group < groups ? min(max(counts[j], 0), args.m) : 0;
          if (group < groups) group_rows[group] = rows;
          const int tiles = (rows + kTokens - 1) / kTokens;
          if (!several_tiles || !__any_sync(~0u, tiles > 1)) {
            // At most one tile per group (decode): a ballot places them. The scan below cost a
            // Qwen3-30B MoE decode step 1 us per launch (fp8-gpu-sm90.md, session 32).
            const unsigned active = __ballot_sync(~0u, tiles > 0);
            const int at = listed + __popc(active & ((1u << lane) - 1u));
            if (tiles > 0 && at % slices == slice) work_item[at / slices] = group << kItemTileBits;
            listed += __popc(active);
            continue;
          }
          int scan = tiles;  // inclusive prefix sum over the lanes
#pragma unroll
          for (int offset = 1; offset < 32; offset *= 2) {
            const int before = __shfl_up_sync(~0u, scan, offset);
            if (lane >= offset) scan += before;
          }
          for (int tile = 0, at = listed + scan - tiles; tile < tiles; ++tile, ++at)
            if (at % slices == slice) work_item[at / slices] = group << kItemTileBits | tile;
          listed += __shfl_sync(~0u, scan, 31);
        }
      }
      if (lane == 0) *work_count = (listed - slice + slices - 1) / slices;
    }
    __syncthreads();
  }
  const int items = masked ? *work_count : (groups - slice + slices - 1) / slices;
  const auto group_of = [&](int item) {
    return masked ? work_item[item] >> kItemTileBits : slice + item * slices;
  };
  const auto t0_of = [&](int item) {
    return several_tiles ? (work_item[item] & (kMaxItemTiles - 1)) * kTokens : 0;
  };
  const auto rows_of = [&](int item) { return masked ? group_rows[group_of(item)] : args.m; };

  if (warpgroup == kConsumers) {
    // The gated build keeps the launch's registers: its loaders quantize (and the consumers'
    // growth would take what they need).
    if constexpr (!kGated) sm90::registers_shrink<kGroupedProducerRegisters>();
    if (threadIdx.x == kConsumers * kWarpgroup) {
      sm90::prefetch_tensor_map(&w_map);
      if constexpr (!kGated) sm90::prefetch_tensor_map(&x_map);
      // Copy q is k-block q % count of item q / count, in ring slot q % stages.
      const int total = items * count;
      int q = 0;
      if (args.early_weights) {
        // The first group's first weight tiles while the previous kernel finishes (static weights,
        // the host's promise; never with masked_m); its token tiles after the wait.
        const int early = min(min(count, stage_count), args.early_tiles);
        for (int j = 0; j < early; ++j) {
          sm90::mbarrier_arrive_expect_tx(&full[j], Config::kStageBytes);
          sm90::tma_load_3d(stages + j * Config::kStageBytes, &w_map, &full[j],
                            (kb_begin + j) * kBlockK, n0, slice);
        }
        vendor::wait_for_previous_grid();
        for (int j = 0; j < early; ++j)
          sm90::tma_load_3d(stages + j * Config::kStageBytes + Config::kWeightBytes, &x_map,
                            &full[j], (kb_begin + j) * kBlockK, 0, slice);
        q = early;
      } else {
        vendor::wait_for_previous_grid();
      }
      RingSlot slot;
      slot.advance(q, stage_count);  // q is 0 or at most one lap
      int item = q / count, i = q % count;
      for (; q < total; ++q, slot.advance(1, stage_count)) {
        const int group = group_of(item);
        sm90::mbarrier_wait(&empty[slot.stage], slot.phase ^ 1);
        uint8_t* stage = stages + slot.stage * Config::kStageBytes;
        const int k = (kb_begin + i) * kBlockK;
        sm90::mbarrier_arrive_expect_tx(&full[slot.stage], Config::kStageBytes);
        sm90::tma_load_3d(stage, &w_map, &full[slot.stage], k, n0, group);
        if constexpr (!kGated)
          sm90::tma_load_3d(stage + Config::kWeightBytes, &x_map, &full[slot.stage], k,
                            t0_of(item), group);
        if (++i == count) {
          i = 0;
          ++item;
        }
      }
    }
    if (threadIdx.x >= kConsumers * kWarpgroup + 32) {
      // Warps 1-3: item a's scales into buffer a % depth, a [count][kTokens] (tokens past the
      // group's rows read its last row) then b [count], once the consumers are done with item
      // a - depth's.
      const int loader = static_cast<int>(threadIdx.x) - (kConsumers * kWarpgroup + 32);
      // Gated: only the b scales are loaded; the a scales come with the quantized tiles.
      const int scale_count = count * kTokens, scale_total = scale_count + count;
      const int load_first = kGated ? scale_count : 0;
      vendor::wait_for_previous_grid();  // the activation scales are its output
      for (int item = 0; item < items; ++item) {
        const int group = group_of(item), rows = rows_of(item), t0 = t0_of(item);
        const int buffer = item % kScaleDepth;
        if (item >= kScaleDepth)
          sm90::mbarrier_wait(&scale_empty[buffer],
                              static_cast<uint32_t>(item / kScaleDepth - 1) & 1u);
        Scales scales = args.scales;
        scales.a = static_cast<const uint8_t*>(scales.a) + group * strides.a_scales * 4;
        scales.b = static_cast<const uint8_t*>(scales.b) +
                   group * strides.b_scales * (scales.b_bf16 ? 2 : 4);
        float* to = scale_buffers + buffer * buffer_floats;
        const auto load_scales = [&] {
          constexpr int kBatch = 8;  // loads in flight per thread
          for (int base = load_first + loader; base < scale_total;
               base += kBatch * Grouped::kScaleLoaders) {
            float value[kBatch];
#pragma unroll
            for (int j = 0; j < kBatch; ++j) {
              const int i = base + j * Grouped::kScaleLoaders;
              value[j] = i < scale_count ? a_scale(scales, min(t0 + i % kTokens, rows - 1),
                                                   kb_begin + i / kTokens)
                         : i < scale_total
                             ? b_scale(scales, n0 / kFp8BlockSize, kb_begin + i - scale_count)
                             : 0.0f;
            }
#pragma unroll
            for (int j = 0; j < kBatch; ++j) {
              const int i = base + j * Grouped::kScaleLoaders;
              if (i < scale_total) to[i] = value[j];
            }
          }
        };
        if constexpr (kGated) {
          // The b scales' loads go out beside the first x loads.
          quantize_gated_tiles(args.activations, group * strides.x, t0, min(kTokens, rows - t0),
                               kb_begin, count, Config::kTokenBytes,
                               token_tiles + buffer * tile_buffer_bytes, to, kTokens, loader,
                               load_scales);
          sm90::fence_proxy_async_shared();  // the tiles are wgmma operands
        } else {
          load_scales();
        }
        sm90::mbarrier_arrive(&scale_full[buffer]);  // release: the stores above come first
      }
    }
    __syncwarp();
    if (push) sm90::cluster_wait();
    return;
  }

  if constexpr (!kGated) sm90::registers_grow<kGroupedConsumerRegisters>();
  const int t = static_cast<int>(threadIdx.x) % kWarpgroup;
  const int warp = t / 32, lane = t % 32;
  const int consumer_thread = static_cast<int>(threadIdx.x);  // 0..255
  const int sender = kAlternate ? t : consumer_thread;
  const bool sums_here = !kAlternate || warpgroup == 0;  // this thread holds sums to pass on
  const bool stores = split == 0 && sums_here;
  const int row_offset = kAlternate ? 0 : warpgroup * 64 * kBlockK;
  const int step = kAlternate ? kConsumers : 1;
  const int row0 = n0 + (kAlternate ? 0 : warpgroup * 64) + warp * 16 + lane / 4;
  const int element = out_bytes(args.epilogue.out_type);
  vendor::wait_for_previous_grid();  // the activations and their scales are its output
  if (push) sm90::cluster_wait();

  const auto store_item = [&](int item, const float(&sums)[kRegisters]) {
    Epilogue e = args.epilogue;
    e.out = static_cast<uint8_t*>(e.out) + group_of(item) * strides.out * element;
    store_sums<kTokens>(e, row0, t0_of(item), rows_of(item), args.n, lane, sums);
  };
  // Rank 0: an item's sums from the other ranks added, their slot handed back, the item stored.
  const auto finish_item = [&](int item, float(&sums)[kRegisters]) {
    const int slot = item & 1;
    sm90::mbarrier_wait_cluster(&sums_ready[slot], static_cast<uint32_t>(item / 2) & 1u);
    add_pushed_sums<kTokens, kRows>(inbox + slot * slot_floats, splits, sender, sums);
    if (item + 2 < items) {  // the slot takes item + 2's sums next
      sm90::named_barrier(2, Config::kSenders);
      if (sender == 0)
        for (int rank = 1; rank < splits; ++rank)
          sm90::mbarrier_arrive_remote(&inbox_free[slot], static_cast<uint32_t>(rank));
    }
    store_item(item, sums);
  };
  float pending[kRegisters];  // late_sums: rank 0's sums of the item before

  for (int item = 0; item < items; ++item) {
    const int buffer = item % kScaleDepth;
    sm90::mbarrier_wait(&scale_full[buffer], static_cast<uint32_t>(item / kScaleDepth) & 1u);
    const float* a_scales = scale_buffers + buffer * buffer_floats;
    const float* b_scales = a_scales + count * kTokens;

    float acc[kRegisters], part[kRegisters];
#pragma unroll
    for (int r = 0; r < kRegisters; ++r) acc[r] = 0.0f;
    // A k-block's ring slot follows its copy's place q in the stream. Alternating: warpgroup w
    // takes the copies with q % 2 == w, so that a stage (their count is even) always belongs to
    // one warpgroup, as the ring's parity waits need; in an item that starts on an odd q the
    // warpgroups swap the single GEMM's roles, and acc0 + acc1 has the bits of acc1 + acc0.
    const int first = kAlternate ? (warpgroup + item * count) & 1 : 0;
    for (int i = first; i < count; i += step) {
      const int q = item * count + i;
      const int stage_index = q % stage_count;
      const auto phase = static_cast<uint32_t>(q / stage_count) & 1u;
      sm90::mbarrier_wait_likely_done(&full[stage_index], phase);
      const uint8_t* stage = stages + stage_index * Config::kStageBytes;
      const uint8_t* tokens = kGated ? token_tiles + buffer * tile_buffer_bytes +
                                           i * Config::kTokenBytes
                                     : stage + Config::kWeightBytes;
      issue_k_block<kTokens>(part, stage + row_offset, tokens);
      const float sb = b_scales[i];
      float2 a_pairs[kTokens / 8];
      const float* sa = a_scales + i * kTokens + 2 * (lane % 4);
#pragma unroll
      for (int j = 0; j < kTokens / 8; ++j)
        a_pairs[j] = *reinterpret_cast<const float2*>(sa + 8 * j);
      wait_k_block<kTokens>(part);
      if (lane == 0) sm90::mbarrier_arrive(&empty[stage_index]);
#pragma unroll
      for (int j = 0; j < kTokens / 8; ++j) {
        const float scale0 = sb * a_pairs[j].x, scale1 = sb * a_pairs[j].y;
        acc[4 * j + 0] += part[4 * j + 0] * scale0;
        acc[4 * j + 1] += part[4 * j + 1] * scale1;
        acc[4 * j + 2] += part[4 * j + 2] * scale0;
        acc[4 * j + 3] += part[4 * j + 3] * scale1;
      }
    }

    // Alternating: warpgroup 1's sums into warpgroup 0's (same fragment slots).
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
    // The other ranks push their sums into rank 0's inbox slot item % 2 (once rank 0 has read
    // item - 2's there); rank 0 adds them in rank order, as the single GEMM does, and stores the
    // item: at once, or (late_sums) after the next item's k-loop, when they have long arrived.
    if (push && sums_here) {
      const int slot = item & 1;
      if (split != 0) {
        if (item >= 2)
          sm90::mbarrier_wait_cluster(&inbox_free[slot], static_cast<uint32_t>(item / 2 - 1) & 1u);
        push_sums<kTokens, kRows>(inbox + slot * slot_floats, &sums_ready[slot], split, sender,
                                  acc);
      } else if (!strides.late_sums) {
        finish_item(item, acc);
      } else {
        if (item > 0) finish_item(item - 1, pending);
#pragma unroll
        for (int r = 0; r < kRegisters; ++r) pending[r] = acc[r];
        if (item + 1 == items) finish_item(item, pending);
      }
    } else if (stores) {
      store_item(item, acc);
    }
    sm90::named_barrier(1, kConsumers * kWarpgroup);  // the item's scales and sums are read
    if (consumer_thread == 0) sm90::mbarrier_arrive(&scale_empty[buffer]);
  }
#else
  (void)w_map;
  (void)x_map;
  (void)args;
  (void)strides;
#endif
}

}  // namespace
}  // namespace moekit::gpu
