// GPU routing v2: rows over the lanes of a warp like v1 (route_gpu.cu), but one kernel per scoring
// mode and experts-per-lane count, so that a row's work is straight-line code. v1 measured as
// instruction-bound (docs/perf/routing.md); what v2 removes, per row:
//
// - Runtime mode switches: the mode is a template constant, so the other modes' code and
//   registers are gone (v1 carries all of them, and a softcap test per element, in every instance).
// - Branches around every sigmoid: 1 / (1 + exp(-x)) with the division done as the fast path of
//   a correctly rounded reciprocal (MUFU.RCP and one Newton step, exactly what __frcp_rn does for
//   1 <= d < 2^126), so the lane's sigmoids interleave; a lane with d >= 2^126 (x < -87.3, or
//   -inf) redoes those elements with a scaled reciprocal.
// - A second pass over global memory: v1 reloads the logit of each selected expert for the
//   bias-free sigmoid weight; v2 keeps the weight source of each lane's candidates in registers.
// - Shared memory for groups: v2 serves only groups that are whole runs of lanes (DeepSeek-V2 with
//   5 experts per lane, DeepSeek-V3, ...), scores them with shuffles and ranks them with G
//   shuffles, all in flight at once (v1: a loop of G dependent shared-memory loads).
// - Softmax by p (no renormalization, or groups) ranks by z like softmax by logit: p is monotone
//   in z, so the order agrees up to exact ties of p, which the contract accepts. The denominator
//   is still summed in expert order (through shared memory), but only the selected slots are
//   divided by it, and group scores are p of each group's top two, exactly as the reference.
// - The routed sum is one batch of shuffles per 8 slots (v1: a dependent shuffle per slot).
//
// Layout: a row is kRowLanes lanes (32, or 16 for two rows per warp in long batches); lane r of
// the row holds experts [r * kVpl, (r + 1) * kVpl), E <= kRowLanes * kVpl. Whole warps take kVpl
// in {1, 2, 4, 5, 8, 12, 16} (160 experts fill all 32 lanes with 5 each, v1: 20 lanes of 8; 384
// with 12), half warps 8 or 16. The top-k rounds are v1's (best two per lane, a rescan on a third
// win), with the first best-two as a tournament.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "gpu/route_gpu_common.cuh"
#include "gpu/vendor.h"

namespace moekit::gpu::route_detail {

// Experts per vector load: the largest power of two that divides kVpl and fits 16 bytes.
template <class Logits, int kVpl>
constexpr int v2_chunk() {
  constexpr int kMaxChunk = 16 / static_cast<int>(sizeof(typename Logits::Storage));
  int chunk = 1;
  while (chunk * 2 <= kMaxChunk && kVpl % (chunk * 2) == 0) chunk *= 2;
  return chunk;
}

// 1 / d, correctly rounded, for 1 <= d < 2^126: the reciprocal estimate and one Newton step, the
// fast path of __frcp_rn (whose range test and out-of-line slow path would otherwise split every
// sigmoid into its own basic block). The estimate is the hardware's (vendor::reciprocal_estimate:
// on CUDA the bits __fdividef(1, d) gives in this range, without its 5 instructions of range
// handling, ~5 % of a DeepSeek-V3 row).
__device__ __forceinline__ float reciprocal_in_range(float d) {
  const float estimate = vendor::reciprocal_estimate(d);
  return __fmaf_rn(estimate, __fmaf_rn(-d, estimate, 1.0f), estimate);
}

// 1 / d for d >= 2^126 (whose reciprocal is subnormal): the reciprocal of d / 4, then / 4. Rounded
// twice, so at most one subnormal ulp (2^-149) from the correctly rounded value: far inside the
// contract's tolerances (1e-6 absolute on weights, 1e-6 relative near-ties). +inf gives 0. Written
// out rather than as a division, whose out-of-line slow path would make the kernel spill.
__device__ __forceinline__ float reciprocal_of_huge(float d) {
  if (d == INFINITY) return 0.0f;
  return __fmul_rn(reciprocal_in_range(__fmul_rn(d, 0.25f)), 0.25f);
}

// A lane's candidate for the next top-k round.
struct Candidate {
  uint32_t key;
  uint32_t id;
  float weight_source;  // used only where the key does not give the weight back
};

// The best two of the candidates make(kLo) .. make(kHi - 1), whose ids grow with the index (ties:
// the lower id first), as a tournament: depth log2(count), about 10 instructions per merge, where
// offering the candidates one by one is a chain of count dependent steps.
template <int kLo, int kHi, class Make>
__device__ __forceinline__ void best_two(const Make& make, Candidate& head, Candidate& next) {
  if constexpr (kHi - kLo == 1) {
    head = make(kLo);
    next = Candidate{kNoKey, kNoId, 0.0f};
  } else {
    constexpr int kMid = (kLo + kHi) / 2;
    Candidate left_head, left_next, right_head, right_next;
    best_two<kLo, kMid>(make, left_head, left_next);
    best_two<kMid, kHi>(make, right_head, right_next);
    // The right half (higher ids) must be strictly better to go first.
    const bool right_first = right_head.key > left_head.key;
    head = right_first ? right_head : left_head;
    // The runner-up: the better of the loser's head and the winner's runner-up, the left one
    // (lower ids) first on ties.
    const Candidate low = right_first ? left_head : left_next;
    const Candidate high = right_first ? right_next : right_head;
    next = high.key > low.key ? high : low;
  }
}

// Logits storage as v2 instances see it: the 16-bit format is a template constant, so the
// conversion is one instruction per element (v1 predicates both conversions on a run-time flag).
struct LogitsF32 {
  using Load = F32;
  using Storage = float;
  static constexpr bool kBf16 = false;
};
struct LogitsBf16 {
  using Load = Bits16;
  using Storage = uint16_t;
  static constexpr bool kBf16 = true;
};
struct LogitsF16 {
  using Load = Bits16;
  using Storage = uint16_t;
  static constexpr bool kBf16 = false;
};

template <class Logits, int kV>
__device__ __forceinline__ void v2_load_chunk(const void* base, int64_t first, int count,
                                              bool vector_ok, float (&out)[kV]) {
  using Load = typename Logits::Load;
  if constexpr (kV == 1 && sizeof(typename Logits::Storage) == 2) {
    out[0] = count >= 1 ? load_one<Load>(base, first, Logits::kBf16) : 0.0f;
  } else {
    load_chunk<Load, kV>(base, first, count, vector_ok, Logits::kBf16, out);
  }
}

template <int kV>
__device__ __forceinline__ void v2_load_bias_chunk(const RouteArgs& a, int64_t first, int count,
                                                   float (&out)[kV]) {
  if constexpr (kV == 1) {
    float v = 0.0f;
    if (count >= 1) {
      if (a.bias_type == BiasType::f32) v = load_one<F32>(a.bias, first, false);
      if (a.bias_type == BiasType::f16 || a.bias_type == BiasType::bf16)
        v = load_one<Bits16>(a.bias, first, a.bias_type == BiasType::bf16);
    }
    out[0] = v;
  } else {
    load_bias_chunk<kV>(a, first, count, out);
  }
}

// The numerator of z's softmax probability (p = numerator / denominator), given the row's max z,
// exactly as the reference computes it in the three cases of spec/routing.md: all -inf (0), some
// +inf (1 for those, over their count), finite max (exp(z - max), over the sum).
__device__ __forceinline__ float softmax_numerator(float z, float max_z) {
  if (max_z == -INFINITY) return 0.0f;
  if (max_z == INFINITY) return z == INFINITY ? 1.0f : 0.0f;
  return expf(z - max_z);
}

// Warp collectives over the kRowLanes lanes of one row (the whole warp, or an aligned half).
template <int kRowLanes>
struct RowLanes {
  static_assert(kRowLanes == 32 || kRowLanes == 16, "a row is a warp or half a warp");
  int first_lane;  // of this row in the warp
  // Of keys (0 is the identity). Half warps: two whole-warp reductions, each blind to the other
  // row (one instruction each, independent), where a butterfly would be 4 dependent shuffles.
  __device__ __forceinline__ uint32_t max(uint32_t v) const {
    if constexpr (kRowLanes == kLanes) {
      return vendor::reduce_max(v);
    } else {
      const bool upper = first_lane != 0;
      const uint32_t lower_max = vendor::reduce_max(upper ? 0u : v);
      const uint32_t upper_max = vendor::reduce_max(upper ? v : 0u);
      return upper ? upper_max : lower_max;
    }
  }
  // Butterfly: every lane adds the same pairs, so all lanes of the row get the same bits.
  __device__ __forceinline__ float sum(float v) const {
#pragma unroll
    for (int offset = kRowLanes / 2; offset > 0; offset >>= 1) v += vendor::shfl_xor(v, offset);
    return v;
  }
  // The row's lanes where `predicate` holds, as bits 0 .. kRowLanes - 1.
  __device__ __forceinline__ uint32_t ballot(bool predicate) const {
    const uint32_t all = vendor::ballot(predicate);
    if constexpr (kRowLanes == kLanes)
      return all;
    else
      return (all >> first_lane) & ((1u << kRowLanes) - 1);
  }
  template <class T>
  __device__ __forceinline__ T shfl(T value, int lane_in_row) const {
    return vendor::shfl(value, first_lane + (lane_in_row & (kRowLanes - 1)));
  }
};

// kRowLanes lanes per row: 32 (one row per warp: the shortest chain, for decode) or 16 (two rows
// per warp: the rounds, weights and stores of two rows share each instruction, for prefill).
template <class Logits, int kVpl, Mode kMode, int kRowLanes>
__global__ void __launch_bounds__(kThreadsPerBlock) route_rows_v2_kernel(const RouteArgs a) {
  static_assert(kMode == Mode::softmax_by_logit || kMode == Mode::softmax_by_prob ||
                kMode == Mode::sigmoid);
  constexpr int kV = v2_chunk<Logits, kVpl>();
  constexpr int kNv = kVpl / kV;
  constexpr bool kSoftmax = kMode != Mode::sigmoid;
  // Softmax by logit reads the weight back from the key (z); the others carry it beside the key.
  constexpr bool kCarryWeight = kMode != Mode::softmax_by_logit;
  constexpr int kSlots = 2;  // K <= 2 * kRowLanes (the host checks)
  constexpr int kRowsPerWarp = kLanes / kRowLanes;
  // Softmax by p: the terms of the denominator, kRowLanes * kVpl floats per row (absent experts
  // +0), summed in expert order.
  extern __shared__ float4 terms[];

  read_args_then_wait(a);
  vendor::allow_next_grid();

  const int lane = vendor::lane_id();
  const int r = lane % kRowLanes;  // lane in the row
  const int row_in_warp = lane / kRowLanes;
  const RowLanes<kRowLanes> row_lanes{row_in_warp * kRowLanes};
  const int warp = static_cast<int>(threadIdx.x) / kLanes;
  const int E = a.num_experts;
  const int Kr = a.num_routed;
  const int my_first = r * kVpl;
  const bool row_full = E == kRowLanes * kVpl;  // else lanes past E hold absent experts (key 0)

  float bias[kVpl];  // the same for every row: loaded once (zeros when there is none)
#pragma unroll
  for (int c = 0; c < kNv; ++c) {
    float chunk[kV];
    v2_load_bias_chunk<kV>(a, my_first + c * kV, E - my_first - c * kV, chunk);
#pragma unroll
    for (int j = 0; j < kV; ++j) bias[c * kV + j] = chunk[j];
  }

  const int64_t rows_per_step = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock * kRowsPerWarp;
  for (int64_t first_row =
           (static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp) * kRowsPerWarp;
       first_row < a.num_tokens; first_row += rows_per_step) {
    const int64_t row = first_row + row_in_warp;
    const bool in_range = row < a.num_tokens;
    const bool valid = row < a.num_valid_tokens;  // else a padding row (or past the end)
    if (first_row >= a.num_valid_tokens) {        // every row of the step is padding
      store_padding_slots<kSlots, kRowLanes>(a, row, r, in_range);
      continue;
    }
    // A padding row beside a valid one computes on zeros (no loads) and stores padding.
    const int64_t row_offset = row * a.logits_row_stride;

    // 1. Logits -> selection keys, and the weight source where the key does not give it back.
    float x[kVpl];
#pragma unroll
    for (int c = 0; c < kNv; ++c) {
      float chunk[kV];
      v2_load_chunk<Logits, kV>(a.logits, row_offset + my_first + c * kV,
                                valid ? E - my_first - c * kV : 0, a.logits_vector_loads, chunk);
#pragma unroll
      for (int j = 0; j < kV; ++j) x[c * kV + j] = chunk[j];
    }
    uint32_t key[kVpl];
    float weight_source[kVpl];  // dead (and removed) in softmax by logit
    float max_z = 0.0f, denominator = 1.0f;
    if constexpr (kSoftmax) {
#pragma unroll
      for (int i = 0; i < kVpl; ++i) {
        x[i] = nan_to_neg_inf(__fadd_rn(x[i], bias[i]));  // z (v2 serves no softcap)
        key[i] = order_key(x[i]);
      }
    } else {
      bool out_of_range = false;
#pragma unroll
      for (int i = 0; i < kVpl; ++i) {
        const float d = 1.0f + expf(-nan_to_neg_inf(x[i]));
        weight_source[i] = reciprocal_in_range(d);
        out_of_range |= !(d < 0x1p126f);
      }
      if (out_of_range) {  // x < -87.3 somewhere in the lane (rare, except for -inf logits)
#pragma unroll
        for (int i = 0; i < kVpl; ++i) {
          const float d = 1.0f + expf(-nan_to_neg_inf(x[i]));
          if (!(d < 0x1p126f)) weight_source[i] = reciprocal_of_huge(d);
        }
      }
#pragma unroll
      for (int i = 0; i < kVpl; ++i)
        key[i] = order_key(nan_to_neg_inf(__fadd_rn(weight_source[i], bias[i])));
    }
    if (!row_full) {
#pragma unroll
      for (int i = 0; i < kVpl; ++i)
        if (my_first + i >= E) key[i] = kNoKey;
    }
    if constexpr (kMode == Mode::softmax_by_prob) {
      // p_e = numerator_e / denominator, numerators kept per expert, the denominator summed in
      // expert order as the reference does. Every row takes every step (the rows of a warp may
      // be in different cases) and keeps the one its case needs.
      uint32_t lane_max = kNoKey;
#pragma unroll
      for (int i = 0; i < kVpl; ++i) lane_max = max(lane_max, key[i]);
      max_z = key_value(row_lanes.max(lane_max));
#pragma unroll
      for (int i = 0; i < kVpl; ++i)
        weight_source[i] = key[i] != kNoKey ? softmax_numerator(x[i], max_z) : 0.0f;
      // Some +inf: they share the mass equally (the count, exact in any order).
      float lane_count = 0.0f;
#pragma unroll
      for (int i = 0; i < kVpl; ++i) lane_count += weight_source[i];
      const float inf_count = row_lanes.sum(lane_count);
      // Finite max: through shared memory, every lane of the row reading the same words (a
      // broadcast), 16 bytes at a time, added in expert order; the +0 of absent experts changes
      // no bit of the (positive) sum.
      float4* staged = terms + (warp * kRowsPerWarp + row_in_warp) * (kRowLanes * kVpl / 4);
      float* mine = reinterpret_cast<float*>(staged) + my_first;
#pragma unroll
      for (int i = 0; i < kVpl; ++i) mine[i] = weight_source[i];
      vendor::sync_lanes();
      float sum = 0.0f;
#pragma unroll 8
      for (int v = 0; v < kRowLanes * kVpl / 4; ++v) {
        const float4 four = staged[v];
        sum = sum + four.x;
        sum = sum + four.y;
        sum = sum + four.z;
        sum = sum + four.w;
      }
      vendor::sync_lanes();  // the scratch is rewritten by the next row
      denominator = max_z == INFINITY ? inf_count : max_z == -INFINITY ? 1.0f : sum;
    }

    // 2. Groups (whole runs of 2^group_lanes_log2 lanes): score each group, keep the best TG
    // (ties: lower group id), drop the other groups' keys.
    if (kMode != Mode::softmax_by_logit && a.num_groups > 1) {
      const int log2_run = a.group_lanes_log2;
      uint32_t first = kNoKey, second = kNoKey;
#pragma unroll
      for (int i = 0; i < kVpl; ++i) add_to_top2(key[i], first, second);
      merge_top2(first, second, 1 << log2_run);  // runs are aligned within the row
      float score;
      if constexpr (kMode == Mode::softmax_by_prob) {
        // The reference scores groups by p; p is monotone in z, so the group's two largest p are
        // p of its two largest z, computed here bit for bit as the reference's.
        score = softmax_numerator(key_value(first), max_z) / denominator;
        if (a.group_top2_sum && a.experts_per_group >= 2)
          score = score + softmax_numerator(key_value(second), max_z) / denominator;
        score = nan_to_neg_inf(score);
      } else {
        score = group_score(a, first, second);
      }
      if (group_rank(row_lanes, score, a.num_groups, r >> log2_run, log2_run) >= a.topk_groups) {
#pragma unroll
        for (int i = 0; i < kVpl; ++i) key[i] = kNoKey;
      }
    }

    // 3. Top-Kr. Each lane's best two candidates (ties: lower id, as ids grow with i).
    auto candidate = [&](int i) {
      float w = 0.0f;
      if constexpr (kCarryWeight) w = weight_source[i];
      return Candidate{key[i], static_cast<uint32_t>(my_first + i), w};
    };
    Candidate head, next;
    best_two<0, kVpl>(candidate, head, next);
    uint32_t stale = 0;  // lanes (of the warp) whose `next` was promoted: no longer exact
    // A round: the row's best key; its lowest holding lane wins (it has the lowest expert id)
    // and steps down to its runner-up, or rescans when that is stale. Lane k % kRowLanes of the
    // row records slot k in `slot`.
    auto round = [&](int k, Candidate& slot) {
      const uint32_t best_key = row_lanes.max(head.key);
      const bool holds = head.key == best_key;
      const uint32_t holders = row_lanes.ballot(holds);
      const int winner = vendor::lowest_lane(holders);  // in the row (for the shuffles)
      // The lowest holder wins: tested without `winner`, one step shorter after the ballot.
      const bool won = holds && (holders & ((1u << r) - 1u)) == 0;
      const bool mine = r == (k & (kRowLanes - 1));
      slot.key = mine ? best_key : slot.key;
      const uint32_t winner_id = row_lanes.shfl(head.id, winner);
      slot.id = mine ? winner_id : slot.id;
      if constexpr (kCarryWeight) {
        const float winner_weight_source = row_lanes.shfl(head.weight_source, winner);
        slot.weight_source = mine ? winner_weight_source : slot.weight_source;
      }
      // This round's winners of every row of the warp (one lane: the whole-warp row's bit).
      uint32_t winners;
      if constexpr (kRowsPerWarp == 1)
        winners = holders & (0u - holders);
      else
        winners = vendor::ballot(won);
      if (winners & stale) {  // warp-uniform: every lane scans, the winners keep the result
        // A third win since the winner's last scan: the best two among its elements ranked
        // after the one just taken.
        auto remaining = [&](int i) {
          Candidate c = candidate(i);
          const bool after = (c.key < head.key) | ((c.key == head.key) & (c.id > head.id));
          c.key = after ? c.key : kNoKey;
          return c;
        };
        Candidate scan_head{kNoKey, kNoId, 0.0f}, scan_next{kNoKey, kNoId, 0.0f};
#pragma unroll
        for (int i = 0; i < kVpl; ++i) {
          const Candidate c = remaining(i);
          if (c.key > scan_head.key) {
            scan_next = scan_head;
            scan_head = c;
          } else if (c.key > scan_next.key) {
            scan_next = c;
          }
        }
        if (won && ((stale >> lane) & 1u)) {
          head = scan_head;
          next = scan_next;
        } else if (won) {
          head = next;
        }
      } else if (won) {
        head = next;
      }
      stale ^= winners;  // a promotion makes `next` stale; a rescan makes it exact again
    };
    Candidate slots[kSlots];
#pragma unroll
    for (int q = 0; q < kSlots; ++q) slots[q] = Candidate{kNoKey, kNoId, 0.0f};
    const int first_rounds = min(Kr, kRowLanes);
    for (int k = 0; k < first_rounds; ++k) round(k, slots[0]);
    for (int k = kRowLanes; k < Kr; ++k) round(k, slots[1]);
    const uint32_t top_key = row_lanes.shfl(slots[0].key, 0);  // the row's best key

    // 4-7. Weights, shared slots, renormalization, scaling. Lane r of the row holds slot r (and
    // r + kRowLanes).
    float weight[kSlots];
    const float top = key_value(top_key);  // softmax by logit: the row's max z
#pragma unroll
    for (int q = 0; q < kSlots; ++q) {
      float w = 0.0f;
      if (r + q * kRowLanes < Kr) {
        if constexpr (kMode == Mode::softmax_by_logit) {
          const float z = key_value(slots[q].key);
          w = top == -INFINITY  ? 0.0f
              : top == INFINITY ? (z == INFINITY ? 1.0f : 0.0f)
                                : expf(z - top);
        } else if constexpr (kMode == Mode::softmax_by_prob) {
          w = slots[q].weight_source / denominator;
        } else {
          w = slots[q].weight_source;
        }
      }
      weight[q] = w;
    }
    // Summed in slot order, as the reference does, 8 slots per batch of shuffles. Lanes past Kr
    // hold +0, and adding +0 to the (non-negative) sum changes no bit, so no predicates.
    auto add_slots = [&](float mine, int count, float& sum) {
#pragma unroll 1
      for (int k0 = 0; k0 < count; k0 += 8) {
        float part[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) part[j] = row_lanes.shfl(mine, k0 + j);
#pragma unroll
        for (int j = 0; j < 8; ++j) sum += part[j];
      }
    };
    float routed_sum = 0.0f;
    add_slots(weight[0], first_rounds, routed_sum);
    if (Kr > kRowLanes) add_slots(weight[1], Kr - kRowLanes, routed_sum);
#pragma unroll
    for (int q = 0; q < kSlots; ++q) {
      const int slot = r + q * kRowLanes;
      if (!in_range || slot >= a.topk) continue;
      if (!valid) {  // a padding row beside a valid one
        store_slot(a, row, slot, 0.0f, -1);
        continue;
      }
      finish_and_store_slot(a, row, slot, weight[q], slots[q].id, routed_sum);
    }
  }
}

}  // namespace moekit::gpu::route_detail
