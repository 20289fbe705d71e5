// The Hopper block-FP8 GEMM's swap kernel (M <= 128, decode; included by fp8_gemm_sm90.cu only),
// with its quantizing build for the linear layer and its phase stamps (MOEKIT_FP8_TRACE).
#pragma once

#include "gpu/fp8_gemm_sm90.h"
#include "gpu/fp8_quant_math.cuh"
#include "gpu/sm90/gemm_common.cuh"

namespace moekit::gpu {
namespace {  // one translation unit includes this: fp8_gemm_sm90.cu

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
// Groups (tokens x k-blocks of a CTA's range) up to which the fused linear layer was measured
// faster than its two kernels (see w8a8_linear_sm90_fused_supports): the first for 64-row CTAs
// with 8-token tiles, the second for other plans; none for 128-row CTAs whose ring holds the range.
constexpr int kMostFusedGroupsOf64RowsBy8 = 128;
constexpr int kMostFusedGroups = 96;

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
  // bulk_stores: rank 0 stages its out tile [token][row] (rows of kStoreRows values, padded by 16
  // bytes: a warp's stores of 8 rows x 4 tokens fall in different banks) in the idle stages, after
  // the partial sums' slots, and the copy engine writes each token's row.
  static constexpr int kStoreRows = kRows == 64 ? 64 : 128;  // rows of the tile a CTA stores
  static constexpr int store_pitch(int element_bytes) { return kStoreRows * element_bytes + 16; }
  static constexpr int kStagingOffset = (kPartialBytes + 127) / 128 * 128;
  static bool staging_fits(int stages, int element_bytes) {
    return kStagingOffset + kTokens * store_pitch(element_bytes) <= stages * kStageBytes;
  }
  // loader_scales: the producer warpgroup's warps 2 and 3 load the activation scales in groups of
  // kScaleGroup k-blocks, each group's barrier completing when its scales are in shared memory.
  static constexpr int kScaleGroup = 4;
  static constexpr int kLoaderThreads = 2 * kLanes;
  __host__ __device__ static int scale_groups(int k_blocks_per_split) {
    return (k_blocks_per_split + kScaleGroup - 1) / kScaleGroup;
  }
  // Shared memory: stages | token tiles [L] (kQuantizeX) | full, empty barriers, sums barrier |
  // scale-group barriers | a scales [L][kTokens] | b scales [L] | inbox (16-byte aligned).
  __host__ __device__ static size_t token_tile_bytes(int k_blocks_per_split) {
    return kQuantizeX ? static_cast<size_t>(k_blocks_per_split) * kTokenBytes : 0;
  }
  static size_t shared_bytes(int k_blocks_per_split, int stages, size_t inbox) {
    return kSharedAlign + static_cast<size_t>(stages) * (kStageBytes + 2 * sizeof(uint64_t)) +
           token_tile_bytes(k_blocks_per_split) + sizeof(uint64_t) +
           static_cast<size_t>(scale_groups(k_blocks_per_split)) * sizeof(uint64_t) +
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

// The fused linear layer's token tiles: a group of the quantization (128 elements of a row) is
// exactly a k-block, so group g is token g % tokens of k-block g / tokens of the CTA's range. 4
// lanes take a group, 32 elements each (four chunks: the scale, its divisor and the shuffles
// serve 32 values, not 16 as with 8 lanes), reduce its amax with shuffles, write their 32 bytes
// into tile i, row `token`, where TMA's 128-byte swizzle would put them (16-byte unit u of row r
// at unit u ^ r % 8), and the group's scale into a_scales[i][token] (one lane). Columns past K
// are zeros.
constexpr int kGroupLanes = 4;
constexpr int kPartChunks = kBlockK / (kGroupLanes * kChunk);  // 4
using RawGroup = RawChunk<Wide::bf16>[kPartChunks];

// Lane `part` of `group`'s lanes loads its 32 elements (zeros past the last group or past K).
__device__ __forceinline__ void load_group_part(const Activations& x, int t0, int kb_begin,
                                                int tokens, int groups, int group, int part,
                                                RawGroup& raw) {
  const int token = group % tokens, i = group / tokens;
  const int col = (kb_begin + i) * kBlockK + part * kPartChunks * kChunk;
  const auto* row = static_cast<const uint16_t*>(x.x) + (t0 + token) * x.row_stride;
#pragma unroll
  for (int c = 0; c < kPartChunks; ++c) {
    const bool inside = group < groups && col + (c + 1) * kChunk <= x.k;
    const uint4 v = inside ? __ldg(reinterpret_cast<const uint4*>(row + col + c * kChunk))
                           : make_uint4(0, 0, 0, 0);
    raw[c].w[0] = v.x, raw[c].w[1] = v.y, raw[c].w[2] = v.z, raw[c].w[3] = v.w;
  }
}

// Two bf16 maxima at once (PTX max.bf16x2: where one operand is NaN, the other).
__device__ __forceinline__ uint32_t max_bf16x2(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("max.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
}

// max(|v|) over a lane's 32 values with NaN ignored, as fmaxf over their f32 values from 0 finds
// it: each pair's sign bits cleared, then a tree of max.bf16x2 (bf16 order is f32 order, so the
// maximum is the same value), then the two halves in f32.
__device__ __forceinline__ float part_amax(const RawGroup& raw) {
  static_assert(kPartChunks == 4);
  uint32_t w[8];
#pragma unroll
  for (int j = 0; j < 8; ++j)  // chunks 0-1 against 2-3, each pair's sign bits cleared
    w[j] = max_bf16x2(raw[j / 4].w[j % 4] & 0x7fff7fffu, raw[2 + j / 4].w[j % 4] & 0x7fff7fffu);
#pragma unroll
  for (int j = 0; j < 4; ++j) w[j] = max_bf16x2(w[j], w[j + 4]);
  w[0] = max_bf16x2(max_bf16x2(w[0], w[2]), max_bf16x2(w[1], w[3]));
  return fmaxf(fmaxf(__uint_as_float(w[0] << 16), __uint_as_float(w[0] & 0xffff0000u)), 0.0f);
}

// A lane's share of a group, once the group's amax is known: its 32 bytes into row `token` of
// `tile` and (lane 0 of the group) the scale.
__device__ __forceinline__ void store_group_part(const Activations& x, float amax, int part,
                                                 int token, const RawGroup& raw, uint8_t* tile,
                                                 float* scale_slot) {
  const float scale = group_scale(amax, x.eps, x.ue8m0);
  uint32_t words[2 * kPartChunks];
  with_divide(divisor_for(scale), [&](auto divide) {
#pragma unroll
    for (int c = 0; c < kPartChunks; ++c) {
      float v[kChunk];
      decode_raw<Wide::bf16>(raw[c], v);
      words[2 * c] = e4m3x4(divide(v[0]), divide(v[1]), divide(v[2]), divide(v[3]));
      words[2 * c + 1] = e4m3x4(divide(v[4]), divide(v[5]), divide(v[6]), divide(v[7]));
    }
  });
  uint8_t* row = tile + token * kBlockK;
#pragma unroll
  for (int u = 0; u < kPartChunks / 2; ++u) {
    const int unit = part * (kPartChunks / 2) + u;  // 16 bytes = two chunks
    *reinterpret_cast<uint4*>(row + (unit ^ (token % 8)) * 16) =
        make_uint4(words[4 * u], words[4 * u + 1], words[4 * u + 2], words[4 * u + 3]);
  }
  if (part == 0) *scale_slot = scale;
}

// Quantizes `group` from its lanes' loads. Every lane of the warp calls it (the shuffles); a
// group past the last writes nothing.
template <int kTokens>
__device__ __forceinline__ void quantize_group_part(const Activations& x, int tokens, int groups,
                                                    int group, int part, const RawGroup& raw,
                                                    uint8_t* token_tiles, float* a_scales) {
  float amax = part_amax(raw);
#pragma unroll
  for (int offset = 1; offset < kGroupLanes; offset <<= 1)
    amax = fmaxf(amax, vendor::shfl_xor(amax, offset));
  if (group >= groups) return;
  const int token = group % tokens, i = group / tokens;
  store_group_part(x, amax, part, token, raw, token_tiles + i * (kTokens * kBlockK),
                   &a_scales[i * kTokens + token]);
}

// The token tiles quantized by the consumer threads (`thread` 0..255) before their main loop, in
// batches of kBatch passes of 64 groups: every load of a batch is issued before any is quantized
// (these loads wait behind the weight stream, so one batch for the whole k-range where the
// registers allow).
template <int kTokens, int kBatch>
__device__ __forceinline__ void quantize_token_tiles(const GemmArgs& args, int t0, int kb_begin,
                                                     int count, uint8_t* token_tiles,
                                                     float* a_scales, int thread) {
  constexpr int kGroupsPerPass = kConsumers * kWarpgroup / kGroupLanes;  // 64
  constexpr int kGroupsPerBatch = kBatch * kGroupsPerPass;
  const Activations& x = args.activations;
  const int part = thread % kGroupLanes;
  const int tokens = min(kTokens, args.m - t0);
  const int groups = count * tokens;
  const int first = thread / kGroupLanes;
  // Trip counts are the same in every lane of a warp: every lane reaches the shuffles. Passes
  // past the last group are skipped whole (the same in every thread).
  for (int base = 0; base < groups; base += kGroupsPerBatch) {
    RawGroup raw[kBatch];
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      if (base + b * kGroupsPerPass >= groups) break;
      load_group_part(x, t0, kb_begin, tokens, groups, base + b * kGroupsPerPass + first, part,
                      raw[b]);
    }
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      if (base + b * kGroupsPerPass >= groups) break;
      quantize_group_part<kTokens>(x, tokens, groups, base + b * kGroupsPerPass + first, part,
                                   raw[b], token_tiles, a_scales);
    }
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

// Pushed sums (Swap::inbox_bytes): a rank other than 0 stores its thread's sums into rank 0's
// inbox slot and arrives on rank 0's barrier (release at cluster scope).
template <int kTokens, int kRows>
__device__ __forceinline__ void push_sums(float* inbox, uint64_t* sums_ready, int split, int sender,
                                          const float (&acc)[kTokens / 2]) {
  using Config = Swap<kTokens, kRows, false>;
  float* slot = inbox + ((split - 1) * Config::kRegisters * Config::kSenders + 4 * sender);
#pragma unroll
  for (int r = 0; r < Config::kRegisters; r += 4)
    sm90::store_shared_remote(slot + r * Config::kSenders, 0, acc[r], acc[r + 1], acc[r + 2],
                              acc[r + 3]);
  sm90::mbarrier_arrive_remote(sums_ready, 0);
}

// Rank 0, once its barrier says the other ranks' sums are in: adds them in rank order (the order,
// so the bits, of the pulled sums).
template <int kTokens, int kRows>
__device__ __forceinline__ void add_pushed_sums(const float* inbox, int splits, int sender,
                                                float (&acc)[kTokens / 2]) {
  using Config = Swap<kTokens, kRows, false>;
  for (int rank = 1; rank < splits; ++rank) {
    const float* slot = inbox + ((rank - 1) * Config::kRegisters * Config::kSenders + 4 * sender);
#pragma unroll
    for (int r = 0; r < Config::kRegisters; r += 4) {
      const float4 v = *reinterpret_cast<const float4*>(slot + r * Config::kSenders);
      acc[r] += v.x;
      acc[r + 1] += v.y;
      acc[r + 2] += v.z;
      acc[r + 3] += v.w;
    }
  }
}

// A consumer thread's sums (rows row0 and row0 + 8, its tokens of the tile at t0), bias added,
// stored element by element inside [m, n].
template <int kTokens>
__device__ __forceinline__ void store_sums(const Epilogue& e, int row0, int t0, int m, int n,
                                           int lane, const float (&acc)[kTokens / 2]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = row0 + 8 * h;
    if (row >= n) continue;
    const float bias = e.bias_type != BiasType::none ? bias_at(e, row) : 0.0f;
#pragma unroll
    for (int j = 0; j < kTokens / 8; ++j) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int token = t0 + 8 * j + 2 * (lane % 4) + c;
        if (token < m) store_one(e, token * e.out_row_stride + row, acc[4 * j + 2 * h + c] + bias);
      }
    }
  }
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

// A record's labels: its ticket, the grid, the CTA, its cluster rank and its SM.
__device__ __forceinline__ void trace_label(Sm90TraceRecord& r, uint32_t ticket, uint32_t rank) {
  r.ticket = ticket;
  r.grid_ctas = gridDim.x * gridDim.y;
  r.block_x = blockIdx.x;
  r.block_y = blockIdx.y;
  r.rank = rank;
  r.sm = vendor::sm_id();
}

// Thread 0, last thing: the exit stamp and the record's reached phases (the others stay as the
// reset left them, or as another thread wrote them: the tiles kernel's producer wait count).
__device__ __forceinline__ void trace_leave(TraceCta& cta, uint32_t ticket, uint32_t rank) {
  trace_stamp(cta, Sm90TracePhase::exit);
  const volatile TraceCta& v = cta;
  if (ticket >= kTraceCapacity) return;
  Sm90TraceRecord& r = trace_records[ticket];
  for (int p = 0; p < kSm90TracePhases; ++p) {
    if (v.time_ns[p] == 0) continue;
    r.time_ns[p] = v.time_ns[p];
    r.cycles[p] = v.cycles[p];
  }
  trace_label(r, ticket, rank);
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
  auto* full = reinterpret_cast<uint64_t*>(token_tiles + Config::token_tile_bytes(max_count));
  uint64_t* empty = full + stage_count;
  uint64_t* sums_ready = empty + stage_count;  // push_sums, in rank 0
  uint64_t* scales_ready = sums_ready + 1;     // loader_scales: one per group of k-blocks
  auto* a_scales = reinterpret_cast<float*>(scales_ready + Config::scale_groups(max_count));

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
  const bool loader_scales = !kQuantizeX && args.loader_scales;
#ifdef MOEKIT_FP8_TRACE
  // Diagnosis (MOEKIT_SM90_SWAP_ABLATE bits): 1 the activation scales not loaded (1.0), 2 no
  // stores.
  const int ablation = args.tiles_ablation;
#else
  constexpr int ablation = 0;
#endif
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
    if (loader_scales)
      for (int g = 0; g < Config::scale_groups(count); ++g)
        sm90::mbarrier_init(&scales_ready[g], Config::kLoaderThreads);
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
    const int loader = static_cast<int>(threadIdx.x) - (kConsumers * kWarpgroup + 2 * kLanes);
    if (loader_scales && loader >= 0) {
      // Warps 2 and 3: the activation scales group by group, the next group's loads in flight
      // while this one's are stored, so that the consumers wait for the scales of the k-blocks
      // they reach, not for all of them (H200: the whole range before the loop cost an M=64 call
      // ~0.9 us).
      constexpr int kPerThread =
          (Config::kScaleGroup * kTokens + Config::kLoaderThreads - 1) / Config::kLoaderThreads;
      const int groups = Config::scale_groups(count);
      const auto load = [&](int g, float(&v)[kPerThread]) {
#pragma unroll
        for (int j = 0; j < kPerThread; ++j) {
          const int i = g * Config::kScaleGroup * kTokens + j * Config::kLoaderThreads + loader;
          const int token = min(t0 + i % kTokens, args.m - 1);
          v[j] = i < count * kTokens && !(ablation & 1)
                     ? a_scale(args.scales, token, kb_begin + i / kTokens)
                     : 1.0f;
        }
      };
      vendor::wait_for_previous_grid();  // the scales are the previous kernel's output
      float current[kPerThread], next[kPerThread];
      load(0, current);
      for (int g = 0; g < groups; ++g) {
        if (g + 1 < groups) load(g + 1, next);
#pragma unroll
        for (int j = 0; j < kPerThread; ++j) {
          const int i = g * Config::kScaleGroup * kTokens + j * Config::kLoaderThreads + loader;
          if (i < count * kTokens) a_scales[i] = current[j];
        }
        sm90::mbarrier_arrive(&scales_ready[g]);  // release: the stores above come first
#pragma unroll
        for (int j = 0; j < kPerThread; ++j) current[j] = next[j];
      }
    }
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
    // The k-range's token tiles and scales, while the weight tiles arrive; 4 passes of 64 groups
    // (all of a 16-token tile over 14 k-blocks) in one batch where the registers allow.
    quantize_token_tiles<kTokens, kCoResident ? 2 : 4>(args, t0, kb_begin, count, token_tiles,
                                                       a_scales, consumer_thread);
  } else if (!loader_scales) {
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
        value[j] = i < scale_count && !(ablation & 1)
                       ? a_scale(args.scales, token, kb_begin + i / kTokens)
                       : 1.0f;
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
    sm90::mbarrier_wait_likely_done(&full[slot.stage], slot.phase);
    MOEKIT_SWAP_TRACE(if (threadIdx.x == 0 && i == 0) stamp(Sm90TracePhase::first_stage_full));
    const uint8_t* stage = stages + slot.stage * Config::kStageBytes;
    const uint8_t* token_tile =
        kQuantizeX ? token_tiles + i * Config::kTokenBytes : stage + Config::kWeightBytes;
    issue_k_block<kTokens>(part, stage + row_offset, token_tile);
    // Up to 16 tokens the k-block's scales are read while its wgmma run (H200, session 21: M=1
    // 9.45-9.50 -> 9.40-9.41 us, M=4 9.45-9.50 -> 9.36-9.37, M=16 9.84-9.96 -> 9.70-9.73); at 64
    // tokens that was 0.9 % slower, and 32 is not measured. (The reads are written out in both
    // places so that 32+ tokens keep the code that was measured.)
    constexpr bool kScalesUnderWgmma = kTokens <= 16;
    float sb = 0.0f;
    float2 a_pairs[kTokens / 8];
    if constexpr (kScalesUnderWgmma) {
      if (loader_scales) sm90::mbarrier_wait(&scales_ready[i / Config::kScaleGroup], 0);
      sb = b_scales[i];
      const float* sa = a_scales + i * kTokens + 2 * (lane % 4);
#pragma unroll
      for (int j = 0; j < kTokens / 8; ++j)
        a_pairs[j] = *reinterpret_cast<const float2*>(sa + 8 * j);
    }
    wait_k_block<kTokens>(part);
    if (lane == 0) sm90::mbarrier_arrive(&empty[slot.stage]);
    if constexpr (!kScalesUnderWgmma) {
      if (loader_scales) sm90::mbarrier_wait(&scales_ready[i / Config::kScaleGroup], 0);
      sb = b_scales[i];
    }
    const float* sa = a_scales + i * kTokens + 2 * (lane % 4);
#pragma unroll
    for (int j = 0; j < kTokens / 8; ++j) {
      const float2 a =
          kScalesUnderWgmma ? a_pairs[j] : *reinterpret_cast<const float2*>(sa + 8 * j);
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
      if (sums_here) push_sums<kTokens, kRows>(inbox, sums_ready, split, sender, acc);
      MOEKIT_SWAP_TRACE(if (threadIdx.x == 0) {
        trace_stamp_after(trace_cta, Sm90TracePhase::sums_done, acc);
        trace_leave(trace_cta, trace_ticket_of_cta, split);
      });
      return;
    }
    if (stores) {
      sm90::mbarrier_wait_cluster(sums_ready, 0);
      add_pushed_sums<kTokens, kRows>(inbox, splits, sender, acc);
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
  if (ablation & 2) {
  } else if (args.bulk_stores) {
    // The tile, bias added, in the out dtype into shared memory as [token][row], then one bulk copy
    // per token row (the host checked alignment and that N's last tile ends on 16 bytes): a few
    // copy-engine requests instead of every thread's element stores, which stall while the next
    // call's loads fill the memory system (H200: ~1.5 us of a M=64 call).
    constexpr int kStoringThreads = (kAlternate ? 1 : kConsumers) * kWarpgroup;
    const int storing_thread = kAlternate ? t : consumer_thread;
    const int elem = out_bytes(e.out_type), pitch = Config::store_pitch(elem);
    uint8_t* staging = stages + Config::kStagingOffset;
    // Both warpgroups store (128 rows): both must be past their last wgmma on the stages.
    if (!kAlternate) sm90::named_barrier(1, kStoringThreads);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 - n0 + 8 * h;
      const float bias =
          e.bias_type != BiasType::none && n0 + row < args.n ? bias_at(e, n0 + row) : 0.0f;
#pragma unroll
      for (int j = 0; j < kTokens / 8; ++j) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int token = 8 * j + 2 * (lane % 4) + c;
          stage_one(e.out_type, staging + token * pitch + row * elem,
                    acc[4 * j + 2 * h + c] + bias);
        }
      }
    }
    sm90::fence_proxy_async_shared();  // the copy engine reads what these threads wrote
    sm90::named_barrier(2, kStoringThreads);
    const int tokens = min(kTokens, args.m - t0);
    if (storing_thread < tokens) {
      const int row_bytes = min(Config::kStoreRows, args.n - n0) * elem;
      sm90::bulk_store(
          static_cast<uint8_t*>(e.out) + ((t0 + storing_thread) * e.out_row_stride + n0) * elem,
          staging + storing_thread * pitch, static_cast<uint32_t>(row_bytes));
      sm90::bulk_commit_and_wait_read();
    }
  } else {
    store_sums<kTokens>(e, row0, t0, args.m, args.n, lane, acc);
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

}  // namespace
}  // namespace moekit::gpu
