// GPU routing v6: softmax rows of 16-bit logits (no bias, no softcap) in whole warps, one row per
// warp. v3 (route_gpu_v3.cuh) serves these rows with the same exact 32-bit keys (the logit's
// order-preserving bits above the id field), but its softmax-by-p rows (no renormalization:
// Qwen1.5, Qwen2, DeepSeek-V2) sum the denominator in expert order, a chain of E dependent adds
// that runs through the rounds (Qwen2 1.93-2.06 us against Qwen3-30B's 1.57-1.73 with twice the
// experts, H200), and its rounds and group steps are runtime loops. Here, with v5's lessons
// (route_gpu_v5.cuh):
//
// - The rounds are unrolled to kRounds (>= Kr; rounds past Kr change nothing), so they are one
//   basic block (no loop, no branch) and independent chains interleave with them.
// - Softmax by p: the row max is one warp max right after the sort; the lanes' numerators go to
//   shared memory and every lane sums them in expert order (the reference's rounding, so p is its
//   bits), in shares placed after each shuffle of the group steps and each round's warp max,
//   where v3 added 8 terms per round inside runtime loops. (A tree sum across lanes was 0.2-0.3
//   us faster but missed the contract's 1e-6: see below.)
// - Groups (DeepSeek-V2: 8 groups of 20, 4 lanes of 5) are runs of 1 << kGroupLanesLog2 lanes
//   known at compile time: the run's top key by two shuffles, its rank by v6_group_rank. Groups
//   rank by their top z, which orders them as the reference's p does except where different z
//   round to the same p; then (the last kept and the first dropped group have equal p, rare) the
//   groups are ranked again by p and the rounds run again, as in v3.
// - The first row's logits load first; a warp's next row loads while this one is ranked.
//
// Ties rank the lower id first (the key's id field), NaN is -inf, absent experts (past E, or in a
// dropped group) have key 0. Weights: by logit (renormalize, no groups) w = exp(z - top) per slot,
// by p numerator / denominator in expert order, as v2 and v3 compute them, so the bytes are theirs.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "gpu/route_gpu_common.cuh"
#include "gpu/route_gpu_v2.cuh"
#include "gpu/route_gpu_v3.cuh"
#include "gpu/route_gpu_v5.cuh"
#include "gpu/vendor.h"

namespace moekit::gpu::route_detail {

constexpr int kV6MaxSlots = kLanes;  // K: one slot per lane

// A lane's kVpl 16-bit logits as loaded, before any use (so that a prefetch does not wait for
// them): packed two to a word where kVpl is even, else one per word (16-bit loads).
template <int kVpl>
struct V6Raw {
  static constexpr bool kPacked = kVpl % 2 == 0;
  static constexpr int kWords = kPacked ? kVpl / 2 : kVpl;
  uint32_t w[kWords];
  __device__ __forceinline__ uint32_t bits(int i) const {
    if constexpr (kPacked)
      return i % 2 ? w[i / 2] >> 16 : w[i / 2] & 0xffffu;
    else
      return w[i];
  }
};

// Loads kVpl 16-bit logits from element `first` (+0 at or past `count`): one or two vector loads
// where the row is whole and aligned, else element by element.
template <int kVpl>
__device__ __forceinline__ void v6_load(const RouteArgs& a, int64_t first, int count,
                                        V6Raw<kVpl>& raw) {
  const auto* p = static_cast<const unsigned short*>(a.logits) + first;
  if constexpr (V6Raw<kVpl>::kPacked) {
    if (a.logits_vector_loads && count >= kVpl) {
      load_words<kVpl * 2>(reinterpret_cast<const char*>(p), raw.w);
      return;
    }
#pragma unroll
    for (int w = 0; w < kVpl / 2; ++w) {
      const uint32_t low = 2 * w < count ? __ldg(p + 2 * w) : 0u;
      const uint32_t high = 2 * w + 1 < count ? __ldg(p + 2 * w + 1) : 0u;
      raw.w[w] = low | (high << 16);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kVpl; ++i) raw.w[i] = i < count ? __ldg(p + i) : 0u;
  }
}

// The lane's keys in expert order (the logit's order-preserving bits above the id field; NaN as
// -inf; 0 past my_count), built two at a time from the packed words without a branch per element:
// a word's NaN test is one add per word (a half above inf carries into its bit 15), the order
// transform flips the sign bit of a positive half and every bit of a negative one. A lane with a
// NaN (rare) takes the element-wise path; only the last lanes of a row mask keys past E.
template <int kVpl>
__device__ __forceinline__ void v6_keys(const V6Raw<kVpl>& raw, const Format16& format,
                                        uint32_t my_id_field, int my_count, uint32_t (&key)[kVpl]) {
  bool nan_free = false;
  if constexpr (V6Raw<kVpl>::kPacked) {
    const uint32_t nan_carry = (0x7fffu - format.inf_bits) * 0x10001u;
    uint32_t nan_bits = 0;
#pragma unroll
    for (int w = 0; w < kVpl / 2; ++w) nan_bits |= (raw.w[w] & 0x7fff7fffu) + nan_carry;
    nan_free = (nan_bits & 0x80008000u) == 0;
    if (nan_free) {
#pragma unroll
      for (int w = 0; w < kVpl / 2; ++w) {
        const uint32_t word = raw.w[w];
        const uint32_t ordered = word ^ (0x80008000u | ((word >> 15) & 0x00010001u) * 0x7fffu);
        key[2 * w] = (ordered << 16) | (my_id_field - 2 * w);
        key[2 * w + 1] = (ordered & 0xffff0000u) | (my_id_field - 2 * w - 1);
      }
    }
  }
  if (!nan_free) {
#pragma unroll
    for (int i = 0; i < kVpl; ++i)
      key[i] = narrow_key(format.nan_to_neg_inf(raw.bits(i)), my_id_field - i);
  }
  if (my_count < kVpl) {
#pragma unroll
    for (int i = 0; i < kVpl; ++i) key[i] = i < my_count ? key[i] : 0u;
  }
}

// softmax_numerator (route_gpu_v2.cuh) without its branches, which would split the rounds'
// basic block: the same value, the cases by selects.
__device__ __forceinline__ float v6_numerator(float z, float max_z) {
  const float e = expf(z - max_z);
  const float of_inf_max = z == INFINITY ? 1.0f : 0.0f;
  return max_z == -INFINITY ? 0.0f : max_z == INFINITY ? of_inf_max : e;
}

// The top Kr of a row by unrolled rounds: a round is one warp max of the lanes' heads (keys are
// unique), the lane whose head it is shifts its sorted keys, lane k keeps round k's winner. Rounds
// past Kr run (no branch) and only move slots of lanes k >= Kr, which are dropped; so `won` needs
// no test of k (one instruction less in each round's chain). side(k - 1) runs in round k >= 1,
// after its warp max is issued: work independent of the rounds (softmax by p: the denominator's
// steps) placed where it fills the max's latency. side returns a fence, a word that is 0 but
// computed from the side work's result, and the next warp max's operand is xor-ed with it: ptxas
// schedules by dependences, and without one it hoisted every round's warp max above the side work
// (the rounds ran back to back, then the side work as one block). `fence` is the first one (from
// side work before the rounds). kTopKnown: `top` is the row's top key already (round 0 needs no
// warp max); else round 0 sets it. Returns lane k's slot key (0 for k >= Kr).
struct V6NoSideWork {
  __device__ __forceinline__ uint32_t operator()(int) const { return 0; }
};
template <int kRounds, bool kTopKnown, int kVpl, class SideWork = V6NoSideWork>
__device__ __forceinline__ uint32_t v6_rounds(uint32_t (&key)[kVpl], int Kr, int lane,
                                              uint32_t& top, SideWork&& side = {},
                                              uint32_t fence = 0) {
  constexpr int kDepth = kVpl < kRounds ? kVpl : kRounds;  // a lane wins at most kRounds times
  uint32_t slot = 0;
#pragma unroll
  for (int k = 0; k < kRounds; ++k) {
    const uint32_t best = kTopKnown && k == 0 ? top : vendor::reduce_max(key[0] ^ fence);
    if (!kTopKnown && k == 0) top = best;
    if (k >= 1) fence = side(k - 1);
    const bool won = key[0] == best;
    slot = lane == k ? best : slot;
#pragma unroll
    for (int i = 0; i + 1 < kDepth; ++i) key[i] = won ? key[i + 1] : key[i];
    key[kDepth - 1] = won ? 0u : key[kDepth - 1];
  }
  return lane < Kr ? slot : 0u;
}

// The groups' ranks (v5_group_rank's comparisons) for runs of 1 << kLog2Run lanes known at compile
// time, G <= 32 >> kLog2Run: lane `first` of a run compares the groups first, first + run, ...
// (all its shuffles at once), then the run's lanes add their counts. side(w) runs after each
// batch of shuffles is issued (w = 0 .. kLog2Run), where it fills their latency; its fence (see
// v6_rounds) goes into the next batch's operand, and the last one out through `fence`.
template <int kLog2Run>
constexpr int kV6RankWindows = 1 + kLog2Run;
template <int kLog2Run, class SideWork>
__device__ __forceinline__ int v6_group_rank(float score, int num_groups, int g, SideWork&& side,
                                             uint32_t& fence) {
  constexpr int kRun = 1 << kLog2Run;
  constexpr int kPerLane = ((kLanes >> kLog2Run) + kRun - 1) / kRun;  // groups a lane compares
  const int first = vendor::lane_id() & (kRun - 1);
  const float fenced_score = __uint_as_float(__float_as_uint(score) ^ fence);
  float other[kPerLane];
#pragma unroll
  for (int j = 0; j < kPerLane; ++j)
    other[j] = vendor::shfl(fenced_score, ((j * kRun + first) << kLog2Run) & (kLanes - 1));
  fence = side(0);
  int beaten_by = 0;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int h = j * kRun + first;
    // Bitwise, not short-circuit: no branch.
    beaten_by += (h < num_groups) & ((other[j] > score) | ((other[j] == score) & (h < g)));
  }
#pragma unroll
  for (int s = 0; s < kLog2Run; ++s) {
    const int others = vendor::shfl_xor(beaten_by ^ static_cast<int>(fence), 1 << s);
    fence = side(1 + s);
    beaten_by += others;
  }
  return beaten_by;
}

// kVpl experts per lane (lane r holds [r * kVpl, (r + 1) * kVpl)), E <= 32 * kVpl; kRounds >= Kr;
// kByP: softmax by p (no renormalization, or groups), else by logit; kGroupLanesLog2: groups of
// 1 << kGroupLanesLog2 lanes (group score max, softmax by p), or kNoGroups. One row per warp,
// grid-stride over the rows.
template <int kVpl, int kRounds, bool kByP, int kGroupLanesLog2 = kNoGroups>
__global__ void __launch_bounds__(kThreadsPerBlock, 8) route_rows_v6_kernel(const RouteArgs a) {
  constexpr bool kGrouped = kGroupLanesLog2 >= 0;
  static_assert(!kGrouped || kByP, "groups rank by p");
  static_assert(kRounds <= kLanes);

  // Softmax by p: each warp's row of numerators, summed in expert order.
  __shared__ __align__(16) float terms[kWarpsPerBlock][kByP ? kLanes * kVpl : 4];

  RouteTrace trace;  // -DMOEKIT_ROUTE_TRACE only (route_gpu_common.cuh)
  trace.mark(0);
  read_args_then_wait(a);
  vendor::allow_next_grid();
  trace.mark(1);

  const int lane = vendor::lane_id();
  const int warp = static_cast<int>(threadIdx.x) / kLanes;
  const int E = a.num_experts;
  const int Kr = a.num_routed;
  const int my_first = lane * kVpl;
  const int my_count = max(0, min(kVpl, E - my_first));
  const uint32_t my_id_field = id_field(my_first);  // expert my_first + i: my_id_field - i
  const Format16 format(a.logits_bf16);
  const int g = lane >> (kGrouped ? kGroupLanesLog2 : 0);

  const int64_t rows_per_step = static_cast<int64_t>(gridDim.x) * a.block_warps;
  int64_t row = static_cast<int64_t>(blockIdx.x) * a.block_warps + warp;
  V6Raw<kVpl> raw;
  if (row < a.num_valid_tokens)
    v6_load<kVpl>(a, row * a.logits_row_stride + my_first, my_count, raw);

  for (; row < a.num_tokens; row += rows_per_step) {
    if (row >= a.num_valid_tokens) {  // padding: ids -1, weights 0
      if (lane < a.topk) store_slot(a, row, lane, 0.0f, -1);
      continue;
    }
    trace.mark_after(2, raw.w[0]);  // the logits arrived

    // Keys (NaN as -inf; 0 past E), z in expert order (softmax by p), the lane's sort.
    uint32_t key[kVpl];
    v6_keys<kVpl>(raw, format, my_id_field, my_count, key);
    [[maybe_unused]] float z[kVpl];  // (past E: masked in the denominator)
    if constexpr (kByP) {
#pragma unroll
      for (int i = 0; i < kVpl; ++i) z[i] = format.to_float(narrow_key_bits(key[i]));
    }
    odd_even_sort<0, power_of_two_at_least(kVpl), kVpl>(key);
    const int64_t next = row + rows_per_step;
    if (next < a.num_valid_tokens)
      v6_load<kVpl>(a, next * a.logits_row_stride + my_first, my_count, raw);
    trace.mark_after(3, key[0]);

    // Softmax by p: the denominator, a chain of E dependent adds in expert order, is the row's
    // longest path. (Expert order is the reference's rounding: a tree sum across the lanes rounds
    // differently and missed the contract's 1e-6 by 7 % on a row of 281 experts.) It starts as
    // soon as the row max is known, from one warp max right after the sort (the top key: round
    // 0's winner, which the best group holds, so round 0 needs no warp max of its own). Its steps
    // are windows placed after each latency of the group steps and the rounds: the warp issues in
    // order, so a share of adds placed there fills that latency (one block of adds would not).
    // Window 0: the lane's numerators to shared memory; windows 1 .. kSumSteps: every lane adds
    // the next kShare float4s of the row's terms (all lanes the same words: a broadcast). Absent
    // experts add +0, which changes no bit of the non-negative sum.
    constexpr int kTerms4 = kLanes * kVpl / 4;  // float4s of terms per row
    // Group steps: the run's top (kGroupLanesLog2 shuffles), the ranks (v6_group_rank), the
    // ballots for the check by p; ungrouped: window 0 alone, right after the warp max.
    constexpr int kGroupWindows =
        kGrouped ? kGroupLanesLog2 + kV6RankWindows<kGroupLanesLog2> + 1 : 1;
    constexpr int kChainWindows = kGroupWindows - 1 + kRounds - 1;
    // (At most 8 float4s a window, the rest after the rounds: the 16-per-lane instance by p, a
    // shape of no model row, spilled 16 bytes with 15 a window; it keeps 24 bytes of stack at 8,
    // 8 before these windows.)
    constexpr int kEvenShare = (kTerms4 + kChainWindows - 1) / kChainWindows;
    constexpr int kShare = kEvenShare < 8 ? kEvenShare : 8;
    constexpr int kSumSteps = (kTerms4 + kShare - 1) / kShare;
    [[maybe_unused]] float* const row_terms = terms[warp];
    uint32_t top = 0, fence = 0;  // (fence: see v6_rounds)
    float top_z = -INFINITY, sum = 0.0f;
    auto window = [&](int w) -> uint32_t {
      if constexpr (kByP) {
        if (w == 0) {
          top_z = top != 0 ? format.to_float(narrow_key_bits(top)) : -INFINITY;
#pragma unroll
          for (int i = 0; i < kVpl; ++i) {
            const float n = v6_numerator(z[i], top_z);
            row_terms[my_first + i] = i < my_count ? n : 0.0f;
          }
          vendor::sync_lanes();
        } else if (w <= kSumSteps) {
          const float4* four = reinterpret_cast<const float4*>(row_terms);
#pragma unroll
          for (int v = (w - 1) * kShare; v < w * kShare; ++v) {
            if (v < kTerms4) {
              const float4 t = four[v];
              sum = sum + t.x;
              sum = sum + t.y;
              sum = sum + t.z;
              sum = sum + t.w;
            }
          }
          return __float_as_uint(sum) & 0x80000000u;  // 0 (see v6_rounds' fence)
        }
      }
      return 0u;
    };
    if constexpr (kByP) top = vendor::reduce_max(key[0]);
    if constexpr (kByP && !kGrouped) window(0);

    // Groups: each run's top key, the groups ranked by their top z; those ranked TG or worse
    // drop their keys. The z of the last kept and the first dropped group, for the check by p.
    [[maybe_unused]] uint32_t sorted[kVpl];
    [[maybe_unused]] float group_z = -INFINITY, last_kept = 0.0f, first_dropped = 0.0f;
    [[maybe_unused]] auto keep_groups = [&](int rank) {
      const bool keep = (rank < a.topk_groups) & (g < a.num_groups);
#pragma unroll
      for (int i = 0; i < kVpl; ++i) key[i] = keep ? sorted[i] : 0u;
    };
    if constexpr (kGrouped) {
      // (Fences as in v6_rounds: each window's adds before the next shuffle.)
      uint32_t group_top = key[0];
#pragma unroll
      for (int s = 0; s < kGroupLanesLog2; ++s) {
        const uint32_t other = vendor::shfl_xor(group_top ^ fence, 1 << s);
        fence = window(s);  // s = 0: the numerators, once the warp max is in
        group_top = ::max(group_top, other);
      }
      // A group past E (all keys 0) gets z = NaN (narrow_key_bits(0) is all ones): the ranks
      // skip it (h < G) and it is never kept, so no branch tests for it.
      group_z = format.to_float(narrow_key_bits(group_top));
#pragma unroll
      for (int i = 0; i < kVpl; ++i) sorted[i] = key[i];
      const int rank = v6_group_rank<kGroupLanesLog2>(
          group_z, a.num_groups, g, [&](int w) { return window(kGroupLanesLog2 + w); }, fence);
      keep_groups(rank);
      // (Every group kept: no lane votes, and the check below does not run.)
      const int fenced_rank = rank ^ static_cast<int>(fence);
      const uint32_t last_kept_lanes = vendor::ballot(fenced_rank == a.topk_groups - 1);
      const uint32_t first_dropped_lanes = vendor::ballot(fenced_rank == a.topk_groups);
      fence = window(kGroupWindows - 1);
      last_kept = vendor::shfl(group_z, vendor::lowest_lane(last_kept_lanes) & (kLanes - 1));
      first_dropped =
          vendor::shfl(group_z, vendor::lowest_lane(first_dropped_lanes) & (kLanes - 1));
    }
    trace.mark_after(4, key[0]);

    // The top Kr; softmax by p: the rest of the denominator's windows in rounds 1 .. kRounds - 1.
    uint32_t slot = v6_rounds<kRounds, kByP>(
        key, Kr, lane, top, [&](int k) { return window(kGroupWindows + k); }, fence);
#pragma unroll
    for (int w = kChainWindows + 1; w <= kSumSteps; ++w) window(w);
    // A +inf max: the numerators are 1 for +inf and 0 else, so the sum is their count. All -inf:
    // every numerator 0; the weights stay 0.
    float denominator = 1.0f;
    if constexpr (kByP) {
      denominator = top_z == -INFINITY ? 1.0f : sum;
      vendor::sync_lanes();  // the terms are rewritten by the next row
    }
    if constexpr (!kByP) top_z = top != 0 ? format.to_float(narrow_key_bits(top)) : -INFINITY;
    if constexpr (kGrouped) {
      // Different z that round to the same p: the reference may keep another group of that p
      // (the lowest id). Rank the groups by p and run the rounds again (rare; row-uniform). The
      // top key's group may be dropped then, so round 0 takes its warp max again.
      if (a.topk_groups < a.num_groups && last_kept != first_dropped &&
          v6_numerator(last_kept, top_z) / denominator ==
              v6_numerator(first_dropped, top_z) / denominator) {
        keep_groups(v6_group_rank<kGroupLanesLog2>(
            nan_to_neg_inf(v6_numerator(group_z, top_z) / denominator), a.num_groups, g,
            V6NoSideWork{}, fence));
        uint32_t unused = 0;
        slot = v6_rounds<kRounds, false>(key, Kr, lane, unused);
      }
    }
    trace.mark_after(5, slot);

    // 4-7. Lane k's weight (k < Kr), their sum in slot order (lanes past Kr hold +0, which changes
    // no bit), shared slots, renormalization, scaling.
    float weight = 0.0f;
    if (lane < Kr) {
      const float zk = format.to_float(narrow_key_bits(slot));
      if constexpr (kByP) {
        weight = v6_numerator(zk, top_z) / denominator;
      } else {
        weight = top_z == -INFINITY  ? 0.0f
                 : top_z == INFINITY ? (zk == INFINITY ? 1.0f : 0.0f)
                                     : expf(zk - top_z);
      }
    }
    const float routed_sum = slot_order_sum<kRounds>(weight);
    trace.mark_after(6, __float_as_uint(routed_sum));
    if (lane < a.topk) finish_and_store_slot(a, row, lane, weight, key_id(slot), routed_sum);
    trace.mark(7);
    trace.print(row == 0, E, a.topk, "wait loads keys+sort groups rounds weights stored");
  }
}

}  // namespace moekit::gpu::route_detail
