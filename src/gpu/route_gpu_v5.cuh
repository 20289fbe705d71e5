// GPU routing v5: sigmoid routing (with or without groups) in whole-warp rows with 32-bit keys.
// v3 (route_gpu_v3.cuh) serves sigmoid rows with 64-bit keys (score, id): every compare-exchange
// of its sort is two compares and four selects, every top-k round two warp reductions, ~1160-1250
// warp instructions per DeepSeek-V3 row. Here, as in v4 but one row per warp (v3's occupancy and
// chain):
//
// - Keys are 32 bits first: the top bits of the order key of s + b above an id field of 8 bits
//   (E <= 256) or 9 (E <= 512), so a compare-exchange is a max and a min, and a round one
//   redux.max. A lane sorts its 8, 12 or 16 keys into its top 8 (Batcher's network per run of 8
//   or 4, runs merged; with 12 or 16, the 9th too); a round's winner shifts its sorted keys.
// - Truncated scores may tie where the exact ones differ. Truncation only reorders keys of equal
//   truncated score (adjacent in both orders): where two consecutive winners of the rounds tie,
//   the set is right and only their order is open, restored from the slots' exact keys; where a
//   key left after the rounds ties with the Kr-th, the row is redone with 64-bit keys (score, id),
//   the same steps.
// - Groups are runs of whole lanes (a power of two); group scores use the exact scores (each
//   lane's top two, merged over the group's lanes), so both passes keep the same groups.
// - The sigmoid of each expert (the weight source) goes to shared memory as the keys are built;
//   the winners' weights are read back, not computed again.
// - Memory latency in series is what a decode row cannot afford: the first row's logits load
//   before the bias, the bias loads before griddepcontrol.wait under the caller's promise
//   (RouteArgs::bias_before_wait), and a warp's next row loads while this one is ranked.
// - DeepSeek-V3's groups (runs of 4 lanes) have their own instance, whose group steps hold no
//   loop, and so do ungrouped rows (no group scores at all). Long batches are bound by the integer
//   pipe; there the rounds read the lanes' sorted keys and write their winners through shared
//   memory (kListInShared) instead of selects.
//
// The sigmoid, its NaN and range handling and the slot-order sum are v2's, so the outputs are v2's
// and v3's bit for bit. Serves sigmoid scoring, E <= 512, Kr <= 8, K <= 32 (one slot per lane),
// groups of whole lanes.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "gpu/route_gpu_common.cuh"
#include "gpu/route_gpu_v2.cuh"
#include "gpu/route_gpu_v3.cuh"
#include "gpu/route_gpu_v4.cuh"
#include "gpu/vendor.h"

namespace moekit::gpu::route_detail {

constexpr int kV5ListKeys = 8;       // sorted keys a lane carries into the rounds: Kr <= 8
constexpr int kV5RunKeys = 8;        // keys are built and sorted in runs of 8
constexpr int kV5MaxSlots = kLanes;  // K: one slot per lane
constexpr int kNoGroups = -2;        // route_rows_v5_kernel's kGroupLanesLog2 for ungrouped rows

// A lane holds kExpertsPerLane consecutive experts in runs of 8 (the last one 4 long with 12):
// E <= 256 (8), 384 (12: Kimi-K2 fills all 32 lanes, where 16 leave 8 idle) or 512 (16).
template <class Logits, int kExpertsPerLane>
struct V5Layout {
  static_assert(kExpertsPerLane == 8 || kExpertsPerLane == 12 || kExpertsPerLane == 16);
  static constexpr bool k16 = sizeof(typename Logits::Storage) == 2;
  static constexpr int kVpl = kExpertsPerLane;
  static constexpr int kRuns = (kVpl + kV5RunKeys - 1) / kV5RunKeys;
  static constexpr int kMaxExperts = kLanes * kVpl;          // 256, 384 or 512
  static constexpr int kIdBits = kVpl == 8 ? 8 : 9;          // id field of a 32-bit key
  static constexpr uint32_t kIdMask = (1u << kIdBits) - 1u;  // larger field for lower ids
  static constexpr int kWords = kVpl * (k16 ? 2 : 4) / 4;    // a lane's logits as 32-bit words
  static constexpr int kStride = kVpl + 4;  // floats per lane in shared memory: 16-byte pieces of
                                            // 8 consecutive lanes hit different banks
  static_assert(kIdMask + 1 >= static_cast<uint32_t>(kMaxExperts));
  // Elements of run r (8, or the 4 left at the end with 12).
  static constexpr int run_length(int r) {
    return kVpl - r * kV5RunKeys < kV5RunKeys ? kVpl - r * kV5RunKeys : kV5RunKeys;
  }
};

template <class L, class Key>
__device__ __forceinline__ int v5_key_id(Key key) {
  if constexpr (sizeof(Key) == 4)
    return static_cast<int>(L::kIdMask - (key & L::kIdMask));
  else
    return key_id(key);
}

// The row's logits of this lane (kVpl elements from my_first; 0 past the row's count), as words.
template <class L>
__device__ __forceinline__ void v5_load(const RouteArgs& a, int64_t first, int count,
                                        uint32_t (&words)[L::kWords]) {
  if (a.logits_vector_loads && count >= L::kVpl) {
    constexpr int kElement = L::k16 ? 2 : 4;
    load_words<L::kWords * 4>(static_cast<const char*>(a.logits) + first * kElement, words);
  } else if constexpr (L::k16) {
    uint32_t bits[L::kVpl];
    load_bits16<L::kVpl>(a.logits, first, count, false, bits);
#pragma unroll
    for (int w = 0; w < L::kWords; ++w) words[w] = bits[2 * w] | (bits[2 * w + 1] << 16);
  } else {
    const auto* p = static_cast<const float*>(a.logits) + first;
#pragma unroll
    for (int i = 0; i < L::kVpl; ++i) words[i] = i < count ? __float_as_uint(__ldg(p + i)) : 0u;
  }
}

// This lane's bias (kVpl elements from my_first). Past E, -inf: those keys then rank below every
// expert's (score -inf, and a larger id than any), so no per-element mask is needed. NaN as -inf
// here, once, instead of on every s + b (the same value: s is finite).
template <class L>
__device__ __forceinline__ void v5_load_bias(const RouteArgs& a, int my_first, int my_count,
                                             float (&bias)[L::kVpl]) {
#pragma unroll
  for (int c = 0; c < L::kVpl / kV5RunKeys; ++c) {
    float chunk[kV5RunKeys];
    load_bias_chunk<kV5RunKeys>(a, my_first + c * kV5RunKeys, my_count - c * kV5RunKeys, chunk);
#pragma unroll
    for (int j = 0; j < kV5RunKeys; ++j)
      bias[c * kV5RunKeys + j] =
          c * kV5RunKeys + j < my_count ? nan_to_neg_inf(chunk[j]) : -INFINITY;
  }
  if constexpr (L::kVpl % kV5RunKeys != 0) {  // the last 4 of 12
    constexpr int kFirst = L::kVpl / kV5RunKeys * kV5RunKeys, kTail = L::kVpl - kFirst;
    float chunk[kTail];
    load_bias_chunk<kTail>(a, my_first + kFirst, my_count - kFirst, chunk);
#pragma unroll
    for (int j = 0; j < kTail; ++j)
      bias[kFirst + j] = kFirst + j < my_count ? nan_to_neg_inf(chunk[j]) : -INFINITY;
  }
}

// What the key pass of one row needs besides the logits and the bias.
struct V5Row {
  Format16 format;
  float* my_weights;  // this lane's experts' sigmoid, written by the first pass
  int my_first;       // this lane's first expert
};

// 1-2. The lane's keys (s + b above the id), sorted into its top 8, and the lane's top two exact
// order keys (for group scores). `local` gets the sorted top 8 and, with two runs, the 9th (the
// largest key below them: a lane that wins 8 rounds then shows it to the boundary test). The first
// pass also writes each expert's sigmoid (the weight source) to shared memory.
template <class L, bool kTopTwo = true, class Key>
__device__ __forceinline__ void v5_lane_keys(const V5Row& row, const uint32_t (&words)[L::kWords],
                                             const float (&bias)[L::kVpl], bool write_weights,
                                             Key (&local)[kV5ListKeys + 1], uint32_t& first,
                                             uint32_t& second) {
  constexpr bool kNarrow = sizeof(Key) == 4;
  first = second = 0;
#pragma unroll
  for (int i = 0; i <= kV5ListKeys; ++i) local[i] = Key{0};
#pragma unroll
  for (int run = 0; run < L::kRuns; ++run) {
    const int length = L::run_length(run);  // (a constant once unrolled; past it: key 0)
    // v2's sigmoid: the reciprocal's fast path for every element, the scaled one only where the
    // lane has d >= 2^126 (x < -87.3, -inf or NaN; a branch of this lane alone).
    float x[kV5RunKeys], s[kV5RunKeys];
    float largest_d = 1.0f;  // d >= 1 or NaN, which fmaxf drops: one max per element, one test
#pragma unroll
    for (int j = 0; j < kV5RunKeys; ++j) {
      const int i = run * kV5RunKeys + (j < length ? j : 0);
      const uint32_t word = L::k16 ? words[i / 2] : words[i];
      const uint32_t bits = L::k16 ? (i % 2 ? word >> 16 : word & 0xffffu) : word;
      x[j] = L::k16 ? row.format.to_float(bits) : __uint_as_float(bits);
      const float d = 1.0f + expf(-x[j]);
      s[j] = reciprocal_in_range(d);
      if (j < length) largest_d = fmaxf(largest_d, d);
    }
    if (!(largest_d < 0x1p126f)) {
#pragma unroll
      for (int j = 0; j < kV5RunKeys; ++j) {
        const float d = 1.0f + expf(-x[j]);
        if (!(d < 0x1p126f)) s[j] = reciprocal_of_huge(d);
      }
    }
    // A NaN logit is -inf (the contract), whose sigmoid is +0: here NaN flows through exp and
    // the reciprocal (never into largest_d: fmaxf drops it) and one max per element turns the
    // NaN sigmoid into +0, where a test and a select per element would clean the logit.
#pragma unroll
    for (int j = 0; j < kV5RunKeys; ++j) s[j] = fmaxf(s[j], 0.0f);
    if (write_weights) {
      float4* out = reinterpret_cast<float4*>(row.my_weights + run * kV5RunKeys);
      out[0] = make_float4(s[0], s[1], s[2], s[3]);
      if (length > 4) out[1] = make_float4(s[4], s[5], s[6], s[7]);
    }
    Key k[kV5RunKeys];
#pragma unroll
    for (int j = 0; j < kV5RunKeys; ++j) {
      const int i = run * kV5RunKeys + (j < length ? j : 0);
      // Past E the bias is -inf: such keys rank below every expert's. s is in [0, 1] and the
      // bias has no NaN (as -inf since loaded), so s + b is never NaN.
      const uint32_t order = order_key(__fadd_rn(s[j], bias[i]));
      if constexpr (kTopTwo) add_to_top2(order, first, second);  // (group scores)
      const int id = row.my_first + i;
      if constexpr (kNarrow)
        k[j] = (order & ~L::kIdMask) | (L::kIdMask - static_cast<uint32_t>(id));
      else
        k[j] = (static_cast<uint64_t>(order) << 32) | (id_field(id) << 16);
      if (j >= length) k[j] = Key{0};  // (a run of 4: its sort's comparisons with 0 fold away)
    }
    v4_sort8(k);
    if (run == 0) {
#pragma unroll
      for (int j = 0; j < kV5RunKeys; ++j) local[j] = k[j];
    } else {  // merge into the top 8; the larger of the smaller ones is the 9th
#pragma unroll
      for (int j = 0; j < kV5RunKeys; ++j) {
        Key high = local[j], low = k[kV5RunKeys - 1 - j];
        v4_order(high, low);
        local[j] = high;
        local[kV5ListKeys] = low > local[kV5ListKeys] ? low : local[kV5ListKeys];
      }
#pragma unroll
      for (int step = kV5RunKeys / 2; step > 0; step /= 2) {
#pragma unroll
        for (int j = 0; j < kV5RunKeys; ++j)
          if ((j & step) == 0) v4_order(local[j], local[j + step]);
      }
    }
  }
}

// The rank of group g among the row's G (higher score first, ties to the lower group id), where
// groups are runs of 1 << log2_run lanes that hold their group's score. Lane p of a run compares
// groups p, p + run, p + 2 run, ...; the run's lanes then add their counts. DeepSeek-V3 (runs of
// 4 lanes, 8 groups): 2 + 2 shuffles and a third of group_rank's instructions, which has every
// lane compare every group. Every lane runs the same trips (full-warp shuffles). kLog2Run: the
// run length known at compile time (then no loop is left), or -1 (log2_run).
template <int kLog2Run>
__device__ __forceinline__ int v5_group_rank(float score, int num_groups, int g, int log2_run) {
  if constexpr (kLog2Run >= 0) log2_run = kLog2Run;
  const int run = 1 << log2_run;
  const int first = vendor::lane_id() & (run - 1);
  const int trips = (num_groups + run - 1) >> log2_run;
  // Two comparisons a trip, so that DeepSeek-V3's two are one trip with no remainder; a trip
  // past the last group compares nothing (h >= G). With kLog2Run, G <= 32 >> kLog2Run.
  constexpr int kMaxTrips = kLog2Run >= 0 ? (kLanes >> kLog2Run) >> kLog2Run : kLanes;
  int beaten_by = 0;
#pragma unroll 1
  for (int j = 0; j < (kLog2Run >= 0 ? kMaxTrips : trips); j += 2) {
#pragma unroll
    for (int step = 0; step < 2; ++step) {
      const int h = ((j + step) << log2_run) + first;
      const float other = vendor::shfl(score, (h << log2_run) & (kLanes - 1));
      // Bitwise, not short-circuit: no branch between the shuffles.
      beaten_by += (h < num_groups) & ((other > score) | ((other == score) & (h < g)));
    }
  }
#pragma unroll
  for (int offset = 1; offset < kLanes; offset <<= 1)
    if (offset < run) beaten_by += vendor::shfl_xor(beaten_by, offset);  // (uniform)
  return beaten_by;
}

// What the truncated keys left open: nothing; the order of slots whose truncated scores tie inside
// the top Kr (the set is right: the exact order of those slots is restored from their exact
// keys); or the set itself (the Kr-th and the (Kr+1)-th key tie: the row again, exactly).
enum class V5Fix { none, reorder, exact };

// 3. The top Kr: groups ranked TG or worse drop their keys, then the rounds: a round is one warp
// max of the lanes' heads, the lane whose head it is (keys are unique) shifts its sorted keys up
// by one, lane k keeps slot k. With 32-bit keys `fix` (every lane the same) says what truncated
// scores that tie leave open: two consecutive winners that tie (a warp-uniform test on the
// rounds' maxima) leave their order open; a head left after the last round that ties with the
// Kr-th winner leaves the set open (it is the (Kr+1)-th key or sits between them: one vote, no
// extra round). Returns lane k's slot key (k < Kr; 0 elsewhere).
//
// kListInShared (32-bit keys): the lane's sorted keys go to `list` (12 words of shared memory, its
// own) and the winner of a round loads its next key from there, where the register list shifts
// all of its keys (8 selects a round on the integer pipe, which bounds long batches: ~110 of a
// DeepSeek-V3 row's ~365 integer-pipe instructions), at one shared-memory load more in the
// chain of every round. Lane 0 then also writes each round's winner to `winners` (the warp's
// Kr words), and after the rounds lane k reads slot k and the tie tests read neighbours there:
// no per-round select or tie test on the integer pipe.
template <class L, bool kListInShared = false, bool kUnrolled = false, class Key>
__device__ __forceinline__ Key v5_rounds(const RouteArgs& a, Key (&local)[kV5ListKeys + 1],
                                         bool keep, V5Fix& fix, uint32_t* list = nullptr,
                                         uint32_t* winners = nullptr) {
  constexpr bool kNarrow = sizeof(Key) == 4;
  static_assert(kNarrow || !kListInShared);
  const V3Row<kLanes> row_lanes{0};
  const int lane = vendor::lane_id();
  const int Kr = a.num_routed;
#pragma unroll
  for (int i = 0; i <= kV5ListKeys; ++i) local[i] = keep ? local[i] : Key{0};
  if constexpr (kListInShared) {
    static_assert(kV5ListKeys + 1 <= 12);
    uint4* out = reinterpret_cast<uint4*>(list);
    out[0] = make_uint4(local[0], local[1], local[2], local[3]);
    out[1] = make_uint4(local[4], local[5], local[6], local[7]);
    out[2] = make_uint4(local[8], 0u, 0u, 0u);  // a lane past its 9th key shows 0 (none)
  }
  Key slot = 0, previous = 0;
  bool tie_inside = false;
  if constexpr (kListInShared) {
    int next = 1;  // the index of the lane's next key
    for (int k = 0; k < Kr; ++k) {
      const Key best = row_lanes.max(local[0]);
      if (lane == 0) winners[k] = best;
      if (local[0] == best) local[0] = list[next++];
    }
    vendor::sync_lanes();  // the winners, written by lane 0
    slot = lane < Kr ? winners[lane] : 0u;
    const Key before = lane >= 1 && lane < Kr ? winners[lane - 1] : 0u;
    tie_inside = vendor::any(lane >= 1 && lane < Kr && ((slot ^ before) & ~L::kIdMask) == 0);
    previous = winners[Kr - 1];
    vendor::sync_lanes();  // read before the next row's rounds rewrite them
  } else {
    // A round; `counted`: a round k < Kr (the tie tests take those only).
    Key head_after = 0;  // (unrolled: the head left after round Kr - 1)
    auto round = [&](int k, bool counted) {
      const Key best = row_lanes.max(local[0]);
      const bool won = local[0] == best;
      slot = lane == k ? best : slot;
#pragma unroll
      for (int i = 0; i < kV5ListKeys; ++i) local[i] = won ? local[i + 1] : local[i];
      local[kV5ListKeys] = won ? Key{0} : local[kV5ListKeys];
      if constexpr (kNarrow) {
        tie_inside |= counted && k > 0 && ((best ^ previous) & ~L::kIdMask) == 0;
        previous = counted ? best : previous;
        if constexpr (kUnrolled) head_after = k == Kr - 1 ? local[0] : head_after;
      }
    };
    if constexpr (kUnrolled) {
      // Unrolled to the most rounds: a round past Kr moves only slots of lanes k >= Kr (dropped
      // below) and keys no later round reads; the tie tests and the head left for the boundary
      // test are selects on the side, off the rounds' chain. Kimi-K2 at 16 experts per lane in
      // 128 registers: 1.93 -> 1.88 us at 1 token; in 64 registers it spilled, and with 8 per
      // lane it lost (DeepSeek-V3 1.67 -> 1.71, GLM-4.5 +0.01; H200).
#pragma unroll
      for (int k = 0; k < kV5ListKeys; ++k) round(k, k < Kr);
      slot = lane < Kr ? slot : Key{0};
      if constexpr (kNarrow) local[0] = head_after;  // (read by the boundary test only)
    } else {
      for (int k = 0; k < Kr; ++k) round(k, true);
    }
  }
  fix = V5Fix::none;
  if constexpr (kNarrow) {
    const bool tie_at_boundary = local[0] != 0 && ((local[0] ^ previous) & ~L::kIdMask) == 0;
    if (vendor::any(tie_at_boundary))
      fix = V5Fix::exact;
    else if (tie_inside)
      fix = V5Fix::reorder;
  }
  return slot;
}

// Where the slots' set is right but truncated scores tied inside it: each slot's exact key
// (score, id) from the sigmoid and bias in shared memory (the bits the keys were built from), its
// rank among the Kr, and lane k takes the slot of rank k. Returns lane k's expert.
template <class L>
__device__ __forceinline__ int v5_reorder(const RouteArgs& a, int slot_id, const float* weights,
                                          const float* bias) {
  const int lane = vendor::lane_id();
  const int Kr = a.num_routed;
  const int at = (slot_id / L::kVpl) * L::kStride + slot_id % L::kVpl;
  const uint64_t exact =
      lane < Kr
          ? (static_cast<uint64_t>(order_key(nan_to_neg_inf(__fadd_rn(weights[at], bias[at]))))
             << 32) |
                (id_field(slot_id) << 16)
          : 0;
  // Unrolled to the most slots, so that the shuffles issue back to back (a loop to Kr waits for
  // each one in turn: 0.16 us on the 64-token DeepSeek-V3 bench call).
  int rank = 0;
#pragma unroll
  for (int j = 0; j < kV5ListKeys; ++j) rank += (j < Kr) & (vendor::shfl(exact, j) > exact);
  int id = slot_id;
#pragma unroll
  for (int j = 0; j < kV5ListKeys; ++j) {
    const int other_rank = vendor::shfl(rank, j), other_id = vendor::shfl(slot_id, j);
    id = j < Kr && other_rank == lane ? other_id : id;
  }
  return id;
}

// Logits: V3LogitsF32 or V3Logits16 (bf16 / f16 told apart at run time, as in v3).
// kExpertsPerLane: 8, 12 or 16 (V5Layout). kNarrowFirst: 32-bit keys with the exact pass as
// fallback (else the exact pass only: for measuring). kGroupLanesLog2: groups of 1 <<
// kGroupLanesLog2 lanes known at compile time (DeepSeek-V3's 4: its group steps then hold no loop
// and no branch), or -1 (from the arguments, groups or none), or kNoGroups (ungrouped at compile
// time: no group scores). kListInShared: the rounds read each lane's sorted keys from shared memory
// (v5_rounds; long batches). kMinBlocks: blocks per SM the registers must allow: 8 (64 registers)
// everywhere but 12 or 16 experts per lane in short batches, where 4 (up to 128 registers) leave
// room for the next row's prefetch and unrolled rounds (16 per lane, session 8: Kimi-K2 at 1 token
// 2.05 -> 1.91 us, H200) at the cost of occupancy, which long batches need (4096 tokens: 7.78 ->
// 8.30). One row per warp, grid-stride over the rows.
template <class Logits, int kExpertsPerLane, bool kNarrowFirst, int kGroupLanesLog2 = -1,
          bool kListInShared = false, int kMinBlocks = 8>
__global__ void __launch_bounds__(kThreadsPerBlock, kMinBlocks)
    route_rows_v5_kernel(const RouteArgs a) {
  using L = V5Layout<Logits, kExpertsPerLane>;
  __shared__ __align__(16) float lane_weights[kWarpsPerBlock][kLanes * L::kStride];
  // Each lane's bias for a reorder, or (kListInShared) its sorted keys during the rounds.
  __shared__ __align__(16) float lane_bias[kWarpsPerBlock][kLanes * L::kStride];
  __shared__ uint32_t round_winners[kWarpsPerBlock][kListInShared ? kV5ListKeys : 1];

  RouteTrace trace;  // -DMOEKIT_ROUTE_TRACE only (route_gpu_common.cuh)
  trace.mark(0);
  const int lane = vendor::lane_id();
  const int warp = static_cast<int>(threadIdx.x) / kLanes;
  const int E = a.num_experts;
  const int Kr = a.num_routed;
  const int my_first = lane * L::kVpl;
  const int my_count = max(0, min(L::kVpl, E - my_first));

  // The bias, the same for every row, in registers. A weight the kernel before does not write
  // (the caller's promise, OpOptions::static_weights) loads before the wait, while that kernel
  // still runs: its latency leaves the row's chain (DeepSeek-V3 at 1 token 1.92 -> 1.79 us, H200).
  float bias[L::kVpl];
  if (a.bias_before_wait) v5_load_bias<L>(a, my_first, my_count, bias);
  read_args_then_wait(a);
  vendor::allow_next_grid();
  trace.mark(1);

  // A warp's next row loads while this one is ranked (padding rows, all past the valid ones,
  // load nothing): with several rows per warp (prefill) its memory latency then overlaps. Not
  // with 12 or 16 experts per lane in 64 registers, which are full (16 spilled).
  constexpr bool kPrefetch = kExpertsPerLane == 8 || kMinBlocks <= 4;
  const int64_t rows_per_step = static_cast<int64_t>(gridDim.x) * a.block_warps;
  int64_t row = static_cast<int64_t>(blockIdx.x) * a.block_warps + warp;
  uint32_t words[L::kWords];
  if (kPrefetch && row < a.num_valid_tokens)
    v5_load<L>(a, row * a.logits_row_stride + my_first, my_count, words);
  if (!a.bias_before_wait) v5_load_bias<L>(a, my_first, my_count, bias);  // beside the logits

  float* const weights = lane_weights[warp];
  const V5Row base{Format16(a.logits_bf16), weights + lane * L::kStride, my_first};

  // Groups: runs of group_lanes lanes.
  constexpr bool kFixedGroups = kGroupLanesLog2 >= 0;
  constexpr bool kMayGroup = kGroupLanesLog2 != kNoGroups;
  const bool grouped = kFixedGroups || (kMayGroup && a.num_groups > 1);
  const int log2_run = kFixedGroups ? kGroupLanesLog2 : kMayGroup ? a.group_lanes_log2 : 0;
  const int g = lane >> log2_run;

  for (; row < a.num_tokens; row += rows_per_step) {
    if (row >= a.num_valid_tokens) {  // padding: ids -1, weights 0
      if (lane < a.topk) store_slot(a, row, lane, 0.0f, -1);
      continue;
    }
    const int64_t first = row * a.logits_row_stride + my_first;
    if (!kPrefetch) v5_load<L>(a, first, my_count, words);

    // Keys, the group ranks (exact scores), the top Kr.
    using Narrow = std::conditional_t<kNarrowFirst, uint32_t, uint64_t>;
    Narrow local[kV5ListKeys + 1];
    uint32_t top_order = 0, second_order = 0;
    trace.mark_after(2, words[0] ^ __float_as_uint(bias[0]));  // logits and bias arrived
    v5_lane_keys<L, kMayGroup>(base, words, bias, true, local, top_order, second_order);
    trace.mark_after(3, static_cast<uint32_t>(local[0] ^ top_order));
    const int64_t next = row + rows_per_step;
    if (kPrefetch && next < a.num_valid_tokens)
      v5_load<L>(a, next * a.logits_row_stride + my_first, my_count, words);
    bool keep = true;
    if (grouped) {
      merge_top2(top_order, second_order, 1 << log2_run);
      const float score = group_score(a, top_order, second_order);
      // Every lane ranks (the shuffles need the whole warp), then lanes past G drop.
      const int rank = v5_group_rank<kGroupLanesLog2>(score, a.num_groups, g, log2_run);
      keep = (rank < a.topk_groups) & (g < a.num_groups);
    }
    V5Fix fix = V5Fix::none;
    trace.mark_after(4, static_cast<uint32_t>(keep));
    // (The list, when in shared memory, takes the lane's bias slots: a reorder writes them only
    // after the rounds.)
    constexpr bool kSharedRounds = kListInShared && kNarrowFirst;
    constexpr bool kUnrolledRounds = kMinBlocks <= 4;  // (the roomy instance: see v5_rounds)
    int slot_id = v5_key_id<L>(v5_rounds<L, kSharedRounds, kUnrolledRounds>(
        a, local, keep, fix, reinterpret_cast<uint32_t*>(lane_bias[warp] + lane * L::kStride),
        round_winners[warp]));
    trace.mark_after(5, static_cast<uint32_t>(slot_id));
    if constexpr (kNarrowFirst) {
      if (fix == V5Fix::exact) {  // every lane (a vote): the row again with 64-bit keys (rare)
        uint64_t exact[kV5ListKeys + 1];
        uint32_t again[L::kWords];
        v5_load<L>(a, first, my_count, again);
        v5_lane_keys<L, kMayGroup>(base, again, bias, false, exact, top_order, second_order);
        slot_id = v5_key_id<L>(v5_rounds<L>(a, exact, keep, fix));
      }
    }

    // 4-7. Slot k's sigmoid from shared memory (written by this row's lanes: a barrier first),
    // the sum in slot order (Kr <= 8; lanes past Kr hold +0, which changes no bit), shared slots,
    // renormalization, scaling.
    // A reorder reads other lanes' bias: it goes to shared memory then (rare). Stored up front,
    // the store would wait for the bias loads, and the first row's logits loads behind it.
    if (fix == V5Fix::reorder) {
      float* mine = lane_bias[warp] + lane * L::kStride;
#pragma unroll
      for (int i = 0; i < L::kVpl; i += 4)
        *reinterpret_cast<float4*>(mine + i) =
            make_float4(bias[i], bias[i + 1], bias[i + 2], bias[i + 3]);
    }
    vendor::sync_lanes();
    if (fix == V5Fix::reorder) slot_id = v5_reorder<L>(a, slot_id, weights, lane_bias[warp]);
    const int id = lane < Kr ? slot_id : 0;
    const float weight = lane < Kr ? weights[(id / L::kVpl) * L::kStride + id % L::kVpl] : 0.0f;
    const float routed_sum = slot_order_sum<kV5ListKeys>(weight);
    trace.mark_after(6, __float_as_uint(routed_sum));
    vendor::sync_lanes();  // the next row rewrites the sigmoids
    if (lane < a.topk) finish_and_store_slot(a, row, lane, weight, slot_id, routed_sum);
    trace.mark(7);
    trace.print(row == 0, E, a.topk, "wait loads keys+sort groups rounds weights stored");
  }
}

}  // namespace moekit::gpu::route_detail
