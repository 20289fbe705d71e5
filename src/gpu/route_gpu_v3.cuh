// GPU routing v3: routing with unique packed keys, lanes that sort their keys once, and rows of 4,
// 8, 16 or 32 lanes (grouped routing: 32, groups of whole lanes). v2 (route_gpu_v2.cuh) measured
// instruction-bound at prefill and latency-bound at decode (docs/perf/routing.md); v3 removes, per
// row:
//
// - The ballot, the lowest-lane search and the id shuffle of every top-k round. A key holds the
//   expert id below the score, (score order) << bits | (0xffff - id), so keys of a row are unique,
//   ties go to the lower id by themselves, and the round's winner is the one lane whose head equals
//   the row max. Where the score is a 16-bit logit (bf16 / f16 logits, softmax, no bias: z = x) the
//   key is 32 bits (order-preserving image of x << 16 | id field) and a row max is one redux.max;
//   everything else (f32 logits, a bias, sigmoid's s + b) takes 64-bit keys (order key of the f32
//   score << 32 | id field << 16 | the 16-bit logit, if any) and a row max of two reductions.
// - The best-two bookkeeping and its rescans: each lane sorts its keys descending once (Batcher's
//   odd-even merge network; with 12 or 16 keys per lane only the top 4, refilled in the rare
//   lane that uses them up), and the winner of a round shifts its sorted registers by one
//   (selects with constant indices, no dynamic register indexing).
// - Carrying the sigmoid weight beside the key: it comes back at the end for the K winners from
//   the logit packed in the key (16-bit logits) or a reload of x[id] (f32: the row was just read),
//   with v2's exact sigmoid, so the bits match v2.
// - Whole warps for rows of prefill batches: rows of 16, 8 or 4 lanes (16 experts per lane where E
//   allows) let one instruction serve 2, 4 or 8 rows; decode keeps 32-lane rows (the shortest
//   chain), with 5 or 12 experts per lane where that fills every lane (160, 384 experts).
//
// Softmax weights come back from the key as in v2 (softmax by logit: exp(z - top); softmax by p:
// numerator over the denominator summed in expert order through shared memory). The grid is the
// resident capacity (the host asks the occupancy API once per instance) with a grid-stride loop.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "gpu/route_gpu_common.cuh"
#include "gpu/route_gpu_v2.cuh"
#include "gpu/vendor.h"

namespace moekit::gpu::route_detail {

// The id field of a key: larger for lower ids, so that equal scores rank the lower id first.
__device__ __forceinline__ uint32_t id_field(int id) { return 0xffffu - static_cast<uint32_t>(id); }
__device__ __forceinline__ int id_of_field(uint32_t field) {
  return static_cast<int>(0xffffu - field);
}

// ---- 16-bit logits: raw bit patterns.

// Loads kV consecutive 16-bit patterns (each in the low half of a word) starting at element
// `first`; elements at or past `count` read as 0 (+0.0). One vector load when allowed.
template <int kV>
__device__ __forceinline__ void load_bits16(const void* base, int64_t first, int count,
                                            bool vector_ok, uint32_t (&out)[kV]) {
  constexpr int kBytes = kV * 2;
  if constexpr (kBytes >= 4) {
    if (vector_ok && count >= kV) {
      uint32_t words[kBytes / 4];
      load_words<kBytes>(static_cast<const char*>(base) + first * 2, words);
#pragma unroll
      for (int j = 0; j < kV; ++j) out[j] = j % 2 ? words[j / 2] >> 16 : words[j / 2] & 0xffffu;
      return;
    }
  }
  const auto* p = static_cast<const unsigned short*>(base) + first;
#pragma unroll
  for (int j = 0; j < kV; ++j) out[j] = j < count ? __ldg(p + j) : 0u;
}

// What distinguishes bf16 from f16 bit patterns, as values uniform over the kernel (one instance
// serves both formats).
struct Format16 {
  bool bf16;
  uint32_t inf_bits;  // of +inf, without the sign: a larger magnitude is NaN
  uint32_t neg_inf_bits;
  __device__ __forceinline__ explicit Format16(bool is_bf16)
      : bf16(is_bf16),
        inf_bits(is_bf16 ? 0x7f80u : 0x7c00u),
        neg_inf_bits(is_bf16 ? 0xff80u : 0xfc00u) {}
  __device__ __forceinline__ float to_float(uint32_t bits) const {
    return bf16 ? __uint_as_float(bits << 16)
                : vendor::half_bits_to_float(static_cast<uint16_t>(bits));
  }
  // NaN as -inf (spec/routing.md): the pattern that ranks and weighs as the reference's.
  __device__ __forceinline__ uint32_t nan_to_neg_inf(uint32_t bits) const {
    return (bits & 0x7fffu) > inf_bits ? neg_inf_bits : bits;
  }
};

// A 32-bit key: the order-preserving image of a 16-bit float pattern (NaN already -inf) in the
// upper half, the id field in the lower. Equal values and -0 / +0 rank by id (the reference treats
// them as equal).
__device__ __forceinline__ uint32_t narrow_key(uint32_t bits16, uint32_t id_low) {
  const uint32_t u = bits16 << 16;
  const uint32_t ordered = u ^ (static_cast<uint32_t>(static_cast<int32_t>(u) >> 31) | 0x80000000u);
  return (ordered & 0xffff0000u) | id_low;
}
// The 16-bit pattern a narrow key was made from.
__device__ __forceinline__ uint32_t narrow_key_bits(uint32_t key) {
  const uint32_t ordered = key >> 16;
  return (ordered & 0x8000u) ? (ordered & 0x7fffu) : (~ordered & 0xffffu);
}

// ---- Keys of either width.

template <bool kWide>
using V3Key = std::conditional_t<kWide, uint64_t, uint32_t>;

__device__ __forceinline__ uint64_t wide_key(float score, uint32_t low) {
  return (static_cast<uint64_t>(order_key(score)) << 32) | low;
}
__device__ __forceinline__ float wide_key_score(uint64_t key) {
  return key_value(static_cast<uint32_t>(key >> 32));
}
__device__ __forceinline__ int key_id(uint32_t key) { return id_of_field(key & 0xffffu); }
__device__ __forceinline__ int key_id(uint64_t key) {
  return id_of_field(static_cast<uint32_t>(key) >> 16);
}

// Sorts keys descending: Batcher's odd-even merge network for kN (a power of two) keys at kLo,
// written as recursive templates so that every index is a constant (no local memory). Keys at or
// past kLimit count as 0 (the least): every comparator puts the larger key at the lower index, so
// such padding never moves, and comparators that touch it are left out.
template <int kLimit, class Key, int kSize>
__device__ __forceinline__ void compare_exchange(Key (&k)[kSize], int lo, int hi) {
  if (hi >= kLimit) return;  // a constant after unrolling
  const Key a = k[lo], b = k[hi];
  if constexpr (sizeof(Key) == 4) {  // a max and a min (a compare and two selects otherwise)
    k[lo] = ::max(a, b);
    k[hi] = ::min(a, b);
  } else {
    const bool swap = b > a;
    k[lo] = swap ? b : a;
    k[hi] = swap ? a : b;
  }
}
template <int kLo, int kN, int kR, int kLimit, class Key, int kSize>
__device__ __forceinline__ void odd_even_merge(Key (&k)[kSize]) {
  constexpr int kStep = kR * 2;
  if constexpr (kStep < kN) {
    odd_even_merge<kLo, kN, kStep, kLimit>(k);
    odd_even_merge<kLo + kR, kN, kStep, kLimit>(k);
#pragma unroll
    for (int i = kLo + kR; i + kR < kLo + kN; i += kStep) compare_exchange<kLimit>(k, i, i + kR);
  } else {
    compare_exchange<kLimit>(k, kLo, kLo + kR);
  }
}
constexpr int power_of_two_at_least(int n) {
  int p = 1;
  while (p < n) p *= 2;
  return p;
}
template <int kLo, int kN, int kLimit, class Key, int kSize>
__device__ __forceinline__ void odd_even_sort(Key (&k)[kSize]) {
  if constexpr (kN > 1 && kLo < kLimit) {
    constexpr int kHalf = kN / 2;
    odd_even_sort<kLo, kHalf, kLimit>(k);
    odd_even_sort<kLo + kHalf, kHalf, kLimit>(k);
    odd_even_merge<kLo, kN, 1, kLimit>(k);
  }
}

// The kD largest of kSize keys, sorted descending, into k[0, kD) (kD a power of two below
// kSize; the rest of k is left in any order): each run of kD keys sorted, then runs merged
// pairwise keeping the larger half (the larger of a[i] and b[kD - 1 - i] is a bitonic sequence
// holding the top kD; a bitonic merge sorts it). About half the comparators of a full sort, and
// the rounds then shift kD keys, not kSize.
template <int kD, class Key, int kSize>
__device__ __forceinline__ void sort_top(Key (&k)[kSize]) {
  constexpr int kPadded = power_of_two_at_least(kSize);
  // Each run on its own (a run of padding only is skipped by odd_even_sort).
  odd_even_sort<0, kD, kSize>(k);
  if constexpr (kPadded > kD) odd_even_sort<kD, kD, kSize>(k);
  if constexpr (kPadded > 2 * kD) {
    odd_even_sort<2 * kD, kD, kSize>(k);
    odd_even_sort<3 * kD, kD, kSize>(k);
  }
  static_assert(kPadded <= 4 * kD, "at most four runs");
#pragma unroll
  for (int width = kD; width < kPadded; width *= 2) {
#pragma unroll
    for (int lo = 0; lo < kPadded; lo += 2 * width) {
      const int other = lo + width;  // merge the top kD of run `other` into run `lo`
      if (other >= kSize) continue;  // all padding
#pragma unroll
      for (int i = 0; i < kD; ++i) {
        if (lo + i >= kSize || other + kD - 1 - i >= kSize) continue;  // padding never wins
        const Key b = k[other + kD - 1 - i];
        k[lo + i] = b > k[lo + i] ? b : k[lo + i];
      }
#pragma unroll
      for (int j = kD / 2; j > 0; j /= 2) {
#pragma unroll
        for (int i = 0; i < kD; ++i)
          if ((i & j) == 0) compare_exchange<kSize>(k, lo + i, lo + i + j);
      }
    }
  }
}

// Collectives over the kRowLanes lanes of one row (an aligned run of the warp).
template <int kRowLanes>
struct V3Row {
  static_assert(kRowLanes == 32 || kRowLanes == 16 || kRowLanes == 8 || kRowLanes == 4);
  int first_lane;  // of this row in the warp

  __device__ __forceinline__ uint32_t max(uint32_t v) const {
    if constexpr (kRowLanes == kLanes) {
      return vendor::reduce_max(v);
    } else if constexpr (kRowLanes == kLanes / 2) {
      // Two whole-warp reductions, each blind to the other row: independent, one step each.
      const bool upper = first_lane != 0;
      const uint32_t lower_max = vendor::reduce_max(upper ? 0u : v);
      const uint32_t upper_max = vendor::reduce_max(upper ? v : 0u);
      return upper ? upper_max : lower_max;
    } else {
#pragma unroll
      for (int offset = kRowLanes / 2; offset > 0; offset >>= 1)
        v = ::max(v, vendor::shfl_xor(v, offset));
      return v;
    }
  }
  __device__ __forceinline__ uint64_t max(uint64_t v) const {
    const uint32_t hi = static_cast<uint32_t>(v >> 32), lo = static_cast<uint32_t>(v);
    if constexpr (kRowLanes == kLanes) {
      // The largest upper half, then the largest lower half among the lanes that hold it.
      const uint32_t best_hi = vendor::reduce_max(hi);
      const uint32_t best_lo = vendor::reduce_max(hi == best_hi ? lo : 0u);
      return (static_cast<uint64_t>(best_hi) << 32) | best_lo;
    } else {
#pragma unroll
      for (int offset = kRowLanes / 2; offset > 0; offset >>= 1) {
        const uint64_t other = vendor::shfl_xor(v, offset);
        v = other > v ? other : v;
      }
      return v;
    }
  }
  // Butterfly: every lane adds the same pairs, so all lanes of the row get the same bits.
  __device__ __forceinline__ float sum(float v) const {
#pragma unroll
    for (int offset = kRowLanes / 2; offset > 0; offset >>= 1) v += vendor::shfl_xor(v, offset);
    return v;
  }
  template <class T>
  __device__ __forceinline__ T shfl(T value, int lane_in_row) const {
    return vendor::shfl(value, first_lane + (lane_in_row & (kRowLanes - 1)));
  }
};

// The sigmoid weight source exactly as v2 computes it (so the bits agree): 1 / (1 + exp(-x)) with
// the reciprocal's fast path, or the scaled one for d >= 2^126. For the K winners only.
__device__ __forceinline__ float sigmoid_weight(float x) {
  const float d = 1.0f + expf(-nan_to_neg_inf(x));
  return d < 0x1p126f ? reciprocal_in_range(d) : reciprocal_of_huge(d);
}

// Logits storage as v3 instances see it: f32, or 16-bit (bf16 or f16, told apart at run time by
// RouteArgs::logits_bf16: the two differ only in a few kernel-uniform constants).
struct V3LogitsF32 {
  using Storage = float;
};
struct V3Logits16 {
  using Storage = uint16_t;
};

// kRowLanes lanes per row, kVpl experts per lane (lane r of the row holds experts
// [r * kVpl, (r + 1) * kVpl)), E <= kRowLanes * kVpl, K <= 2 * kRowLanes. kWide: 64-bit keys
// (required unless the logits are 16-bit, softmax, without bias). kTopOnly: sort only the top
// few keys per lane (fewer instructions, more registers: the host picks by measurement).
//
// kGrouped: grouped routing (G > 1) in whole-warp rows, each group a power-of-two run of whole
// lanes (RouteArgs::group_lanes_log2), with sigmoid (group score: max or top2_sum of the selection
// scores, from the run's sorted heads) or softmax by p with group score max. Softmax ranks the
// groups by their top z, which orders them as the reference's p does except where two different z
// round to the same p: that is detected once the denominator is known (the last kept and the first
// dropped group have equal p), and only then the row is redone with the groups ranked by p.
//
// kVoteRounds (64-bit keys in whole-warp rows): a round reduces only the upper half of the heads
// (the score) and takes the lowest lane holding it, by a ballot (equal scores: the lowest lane has
// the lowest id, and a lane's sorted keys put its lower ids first), where the default takes a
// second reduction of the lower halves among the holders. The winning key comes to the slot's
// lane by a shuffle, off the chain of rounds.
template <class Logits, int kVpl, Mode kMode, int kRowLanes, bool kWide, bool kTopOnly,
          bool kGrouped = false, bool kVoteRounds = false>
__global__ void __launch_bounds__(kThreadsPerBlock) route_rows_v3_kernel(const RouteArgs a) {
  static_assert(!kVoteRounds || (kWide && kRowLanes == kLanes), "vote rounds: 64-bit keys, warps");
  static_assert(kMode == Mode::softmax_by_logit || kMode == Mode::softmax_by_prob ||
                kMode == Mode::sigmoid);
  static_assert(!kGrouped || (kRowLanes == kLanes && !kTopOnly && kMode != Mode::softmax_by_logit),
                "groups: whole-warp rows, full sorts, softmax by p or sigmoid");
  using Key = V3Key<kWide>;
  // Sorted keys a lane keeps for the rounds: all of them, or (kTopOnly, 12 or 16 per lane) the
  // top 4 (8 in rows of 4 lanes, which win twice as often), refilled when used up.
  static_assert(!kTopOnly || kVpl > 8);
  constexpr int kDepth = !kTopOnly ? kVpl : kRowLanes == 4 ? 8 : 4;
  constexpr bool k16 = sizeof(typename Logits::Storage) == 2;
  static_assert(kWide || (k16 && kMode != Mode::sigmoid), "32-bit keys hold a 16-bit logit");
  constexpr int kV = v2_chunk<std::conditional_t<k16, LogitsBf16, LogitsF32>, kVpl>();
  constexpr int kNv = kVpl / kV;
  constexpr int kRowsPerWarp = kLanes / kRowLanes;
  constexpr int kSlots = 2;  // K <= 2 * kRowLanes (the host checks)
  constexpr bool kSoftmax = kMode != Mode::sigmoid;
  extern __shared__ float4 terms[];  // softmax by p: kRowLanes * kVpl terms per row

  RouteTrace trace;
  trace.mark(0);
  // The bias (64-bit keys only; the same for every row): before the wait where the caller
  // promises that the kernel before does not write it (OpOptions::static_weights), as in v5.
  float bias[kVpl];
#pragma unroll
  for (int i = 0; i < kVpl; ++i) bias[i] = 0.0f;
  auto load_bias = [&] {
    const int my_first = vendor::lane_id() % kRowLanes * kVpl;
#pragma unroll
    for (int c = 0; c < kNv; ++c) {
      float chunk[kV];
      v2_load_bias_chunk<kV>(a, my_first + c * kV, a.num_experts - my_first - c * kV, chunk);
#pragma unroll
      for (int j = 0; j < kV; ++j) bias[c * kV + j] = chunk[j];
    }
  };
  if constexpr (kWide)
    if (a.bias_before_wait) load_bias();
  read_args_then_wait(a);
  vendor::allow_next_grid();
  trace.mark(1);

  const int lane = vendor::lane_id();
  const int r = lane % kRowLanes;
  const int row_in_warp = lane / kRowLanes;
  const V3Row<kRowLanes> row_lanes{row_in_warp * kRowLanes};
  const int warp = static_cast<int>(threadIdx.x) / kLanes;
  const int E = a.num_experts;
  const int Kr = a.num_routed;
  const int my_first = r * kVpl;
  const bool row_full = E == kRowLanes * kVpl;
  const uint32_t my_id_field = id_field(my_first);  // expert my_first + i: my_id_field - i
  const Format16 format(a.logits_bf16);

  if constexpr (kWide)
    if (!a.bias_before_wait) load_bias();
  trace.mark_after(2, __float_as_uint(bias[0] + bias[kVpl - 1]));

  const int64_t rows_per_step = static_cast<int64_t>(gridDim.x) * a.block_warps * kRowsPerWarp;
  for (int64_t first_row = (static_cast<int64_t>(blockIdx.x) * a.block_warps + warp) * kRowsPerWarp;
       first_row < a.num_tokens; first_row += rows_per_step) {
    const int64_t row = first_row + row_in_warp;
    const bool in_range = row < a.num_tokens;
    const bool valid = row < a.num_valid_tokens;
    if (first_row >= a.num_valid_tokens) {  // every row of the step is padding
      store_padding_slots<kSlots, kRowLanes>(a, row, r, in_range);
      continue;
    }
    const int64_t row_offset = row * a.logits_row_stride;
    const int count = valid ? E - my_first : 0;  // a padding row beside a valid one loads nothing

    // 1. Keys (expert order), and z for softmax by p.
    auto build_keys = [&](Key(&key)[kVpl], float(&z)[kVpl]) {
      if constexpr (!kWide) {
        uint32_t bits[kVpl];
#pragma unroll
        for (int c = 0; c < kNv; ++c) {
          uint32_t chunk[kV];
          load_bits16<kV>(a.logits, row_offset + my_first + c * kV, count - c * kV,
                          a.logits_vector_loads, chunk);
#pragma unroll
          for (int j = 0; j < kV; ++j) bits[c * kV + j] = format.nan_to_neg_inf(chunk[j]);
        }
#pragma unroll
        for (int i = 0; i < kVpl; ++i) {
          key[i] = narrow_key(bits[i], my_id_field - i);
          if constexpr (kMode == Mode::softmax_by_prob) z[i] = format.to_float(bits[i]);
        }
      } else {
        float x[kVpl];
        uint32_t payload[kVpl];  // 16-bit logits: the raw pattern, kept in the key for the weight
#pragma unroll
        for (int c = 0; c < kNv; ++c) {
          if constexpr (k16) {
            uint32_t chunk[kV];
            load_bits16<kV>(a.logits, row_offset + my_first + c * kV, count - c * kV,
                            a.logits_vector_loads, chunk);
            if (format.bf16) {  // warp-uniform
#pragma unroll
              for (int j = 0; j < kV; ++j) x[c * kV + j] = __uint_as_float(chunk[j] << 16);
            } else {
#pragma unroll
              for (int j = 0; j < kV; ++j)
                x[c * kV + j] = vendor::half_bits_to_float(static_cast<uint16_t>(chunk[j]));
            }
#pragma unroll
            for (int j = 0; j < kV; ++j) payload[c * kV + j] = chunk[j];
          } else {
            float chunk[kV];
            v2_load_chunk<LogitsF32, kV>(a.logits, row_offset + my_first + c * kV, count - c * kV,
                                         a.logits_vector_loads, chunk);
#pragma unroll
            for (int j = 0; j < kV; ++j) x[c * kV + j] = chunk[j], payload[c * kV + j] = 0u;
          }
        }
        if constexpr (kSoftmax) {
#pragma unroll
          for (int i = 0; i < kVpl; ++i) {
            z[i] = nan_to_neg_inf(__fadd_rn(x[i], bias[i]));  // (v3 serves no softcap)
            key[i] = wide_key(z[i], (my_id_field - i) << 16);
          }
        } else {
          // v2's sigmoid: the reciprocal's fast path for every element, the scaled one only where
          // a lane has d >= 2^126 (x < -87.3, or -inf).
          float s[kVpl];
          bool out_of_range = false;
#pragma unroll
          for (int i = 0; i < kVpl; ++i) {
            const float d = 1.0f + expf(-nan_to_neg_inf(x[i]));
            s[i] = reciprocal_in_range(d);
            out_of_range |= !(d < 0x1p126f);
          }
          if (out_of_range) {
#pragma unroll
            for (int i = 0; i < kVpl; ++i) {
              const float d = 1.0f + expf(-nan_to_neg_inf(x[i]));
              if (!(d < 0x1p126f)) s[i] = reciprocal_of_huge(d);
            }
          }
#pragma unroll
          for (int i = 0; i < kVpl; ++i)
            key[i] = wide_key(nan_to_neg_inf(__fadd_rn(s[i], bias[i])),
                              ((my_id_field - i) << 16) | payload[i]);
        }
      }
      if (!row_full) {
#pragma unroll
        for (int i = 0; i < kVpl; ++i)
          if (my_first + i >= E) key[i] = 0;
      }
    };
    Key key[kVpl];
    float z[kVpl];  // softmax: the score z of each expert (dead in softmax by logit)
    build_keys(key, z);
    trace.mark_after(3, static_cast<uint32_t>(key[0] ^ key[kVpl - 1]));

    // The score of a key (softmax: z).
    auto score_of = [&](Key k) {
      if constexpr (kWide)
        return wide_key_score(k);
      else
        return format.to_float(narrow_key_bits(k));
    };

    // Softmax by p: the numerators, staged in shared memory to be summed in expert order as v2
    // does; the serial sum runs 8 terms per top-k round (hidden in the rounds' latency) and the
    // rest after them.
    float max_z = 0.0f, inf_count = 0.0f, sum = 0.0f, tree_sum = 0.0f;
    constexpr int kTerms4 = kRowLanes * kVpl / 4;  // float4s of terms per row
    [[maybe_unused]] const float4* staged = terms + (warp * kRowsPerWarp + row_in_warp) * kTerms4;
    [[maybe_unused]] auto add_terms = [&](int v) {  // the 4 terms of float4 v, in order
      const float4 four = staged[v];
      sum = sum + four.x;
      sum = sum + four.y;
      sum = sum + four.z;
      sum = sum + four.w;
    };
    if constexpr (kMode == Mode::softmax_by_prob) {
      Key lane_max = 0;
#pragma unroll
      for (int i = 0; i < kVpl; ++i) lane_max = key[i] > lane_max ? key[i] : lane_max;
      max_z = score_of(row_lanes.max(lane_max));
      float numerator[kVpl];
#pragma unroll
      for (int i = 0; i < kVpl; ++i)
        numerator[i] = key[i] != 0 ? softmax_numerator(z[i], max_z) : 0.0f;
      // With a +inf max: the count of +inf entries (each numerator 1), summed over the row only
      // where some row of the warp needs it (warp-uniform: the sum shuffles).
      bool some_inf = max_z == INFINITY;
      if constexpr (kRowsPerWarp > 1) some_inf = vendor::any(some_inf);
      if (some_inf) {
        float lane_count = 0.0f;
#pragma unroll
        for (int i = 0; i < kVpl; ++i) lane_count += numerator[i];
        inf_count = row_lanes.sum(lane_count);
      }
      // RouteArgs::tree_denominator (an experiment, MOEKIT_GPU_ROUTE_V3_DENOMINATOR=tree): each
      // lane sums its terms in order, then a butterfly over the row (deterministic, every lane the
      // same bits, within an ulp or two of the expert-order sum, not bit for bit).
      if (a.tree_denominator) {
        float lane_sum = 0.0f;
#pragma unroll
        for (int i = 0; i < kVpl; ++i) lane_sum += numerator[i];
        tree_sum = row_lanes.sum(lane_sum);
      }
      float* mine =
          reinterpret_cast<float*>(terms + (warp * kRowsPerWarp + row_in_warp) * kTerms4) +
          my_first;
#pragma unroll
      for (int i = 0; i < kVpl; ++i) mine[i] = numerator[i];
      vendor::sync_lanes();
    }

    // 2. Sort the lane's keys, descending: all of them, or (12 or 16 per lane) the top kDepth.
    [[maybe_unused]] Key unsorted[kVpl];  // for a refill (rebuilding the keys costs more registers)
    auto sort_keys = [&] {
      if constexpr (kDepth < kVpl) {
#pragma unroll
        for (int i = 0; i < kVpl; ++i) unsorted[i] = key[i];
        sort_top<kDepth>(key);
      } else {
        odd_even_sort<0, power_of_two_at_least(kVpl), kVpl>(key);
      }
    };
    // Softmax by p with RouteArgs::early_terms (MOEKIT_GPU_ROUTE_V3_EARLY_TERMS=1): the first
    // kEarlyTerms4 float4s of the denominator are added in the same straight-line block as the
    // sort, so that the compiler can interleave the two independent chains; the rounds then go on
    // from there (the order of the terms is unchanged: the same bits).
    constexpr int kEarlyTerms4 = kTerms4 < 8 ? kTerms4 : 8;
    int first_term4 = 0;  // of the rounds
    if constexpr (kMode == Mode::softmax_by_prob) {
      if (a.early_terms && !a.tree_denominator) {  // warp-uniform
#pragma unroll
        for (int v = 0; v < kEarlyTerms4; ++v) add_terms(v);
        sort_keys();
        first_term4 = kEarlyTerms4;
      } else {
        sort_keys();
      }
    } else {
      sort_keys();
    }

    // 2b. Groups: each run of lanes merges its sorted heads into the group's top two, the group's
    // score, its rank among the row's G (G shuffles, issued together; ties: lower group id), and
    // the lanes of groups ranked TG or worse drop their keys. Softmax scores by z (by_p: by p, the
    // reference's score, once the denominator is known). The scores of the last kept and the first
    // dropped group are kept for the softmax check below.
    [[maybe_unused]] float last_kept = 0.0f, first_dropped = 0.0f;
    [[maybe_unused]] auto keep_best_groups = [&](bool by_p, float denominator_for_p) {
      Key first = key[0];
      Key second = Key{0};
      if constexpr (kVpl > 1) second = key[1];
      const int log2_run = a.group_lanes_log2;
      for (int offset = 1; offset < (1 << log2_run); offset <<= 1) {
        const Key other_first = vendor::shfl_xor(first, offset);
        const Key other_second = vendor::shfl_xor(second, offset);
        const Key low = first < other_first ? first : other_first;
        const Key high = second > other_second ? second : other_second;
        second = low > high ? low : high;
        first = first > other_first ? first : other_first;
      }
      float score = score_of(first);
      if constexpr (kMode == Mode::softmax_by_prob) {
        if (by_p) score = softmax_numerator(nan_to_neg_inf(score), max_z) / denominator_for_p;
      } else {
        if (a.group_top2_sum && a.experts_per_group >= 2) score = score + score_of(second);
      }
      score = nan_to_neg_inf(score);
      const int rank = group_rank(row_lanes, score, a.num_groups, r >> log2_run, log2_run);
      if (rank >= a.topk_groups) {
#pragma unroll
        for (int i = 0; i < kVpl; ++i) key[i] = Key{0};
      }
      if constexpr (kMode == Mode::softmax_by_prob) {
        if (!by_p && a.topk_groups < a.num_groups) {
          last_kept =
              row_lanes.shfl(score, vendor::lowest_lane(vendor::ballot(rank == a.topk_groups - 1)));
          first_dropped =
              row_lanes.shfl(score, vendor::lowest_lane(vendor::ballot(rank == a.topk_groups)));
        }
      }
    };
    if constexpr (kGrouped) keep_best_groups(false, 1.0f);
    trace.mark_after(4, static_cast<uint32_t>(key[0]));

    // 3. Top-Kr: a round is one row max of the lane heads; the lane whose head it is (keys are
    // unique) shifts its sorted keys up by one, and refills them when it has used up kDepth of
    // them (rare: only that lane runs the branch). Lane k % kRowLanes of the row records slot k.
    // with_terms: softmax by p adds 8 terms of the denominator per round.
    auto round = [&](int k, Key& slot, bool with_terms) {
      Key best;
      bool won;
      if constexpr (kVoteRounds) {
        const auto head = static_cast<uint32_t>(key[0] >> 32);
        const uint32_t best_head = vendor::reduce_max(head);
        const uint32_t holders = vendor::ballot(head == best_head);
        won = head == best_head && (holders & ((1u << lane) - 1u)) == 0;
        best = vendor::shfl(key[0], vendor::lowest_lane(holders));
      } else {
        best = row_lanes.max(key[0]);
        won = key[0] == best;
      }
      if constexpr (kMode == Mode::softmax_by_prob) {
        // Terms 8k .. 8k + 7 of the denominator (past the end: +0, which changes no bit of the
        // non-negative sum), independent of the round: they fill its latency.
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int v = first_term4 + 2 * k + h;
          const float4 four = staged[min(v, kTerms4 - 1)];
          const bool in = with_terms && v < kTerms4;
          sum = sum + (in ? four.x : 0.0f);
          sum = sum + (in ? four.y : 0.0f);
          sum = sum + (in ? four.z : 0.0f);
          sum = sum + (in ? four.w : 0.0f);
        }
      }
      slot = r == (k & (kRowLanes - 1)) ? best : slot;
#pragma unroll
      for (int i = 0; i + 1 < kDepth; ++i) key[i] = won ? key[i + 1] : key[i];
      key[kDepth - 1] = won ? Key{0} : key[kDepth - 1];
      if constexpr (kDepth < kVpl) {
        if (won && key[0] == Key{0}) {  // the next kDepth of the lane's keys below `best`
#pragma unroll
          for (int i = 0; i < kVpl; ++i) key[i] = unsorted[i] < best ? unsorted[i] : Key{0};
          sort_top<kDepth>(key);
        }
      }
    };
    Key slots[kSlots] = {0, 0};
    const int first_rounds = min(Kr, kRowLanes);
    const bool ordered_sum = !a.tree_denominator;
    for (int k = 0; k < first_rounds; ++k) round(k, slots[0], ordered_sum);
    for (int k = kRowLanes; k < Kr; ++k) round(k, slots[1], ordered_sum);
    float denominator = 1.0f;
    if constexpr (kMode == Mode::softmax_by_prob) {
      if (ordered_sum)  // (rounds k < Kr took 8k .. 8Kr - 1)
        for (int v = first_term4 + 2 * Kr; v < kTerms4; ++v) add_terms(v);
      vendor::sync_lanes();  // the scratch is rewritten by the next row
      denominator = max_z == INFINITY    ? inf_count
                    : max_z == -INFINITY ? 1.0f
                    : ordered_sum        ? sum
                                         : tree_sum;
    }
    if constexpr (kGrouped && kMode == Mode::softmax_by_prob) {
      // Groups were ranked by z. The reference ranks them by p, which z orders the same way
      // except where different z round to the same p; then the last kept and the first dropped
      // group have equal p (p is monotone in z), and the reference may keep another group of
      // that p (the lowest id). Rare and row-uniform: redo the row with the groups ranked by p.
      if (a.topk_groups < a.num_groups && last_kept != first_dropped &&
          softmax_numerator(last_kept, max_z) / denominator ==
              softmax_numerator(first_dropped, max_z) / denominator) {
        build_keys(key, z);
        odd_even_sort<0, power_of_two_at_least(kVpl), kVpl>(key);
        keep_best_groups(true, denominator);
        slots[0] = slots[1] = Key{0};
        for (int k = 0; k < first_rounds; ++k) round(k, slots[0], false);
        for (int k = kRowLanes; k < Kr; ++k) round(k, slots[1], false);
      }
    }
    trace.mark_after(5, static_cast<uint32_t>(slots[0] ^ slots[1]));
    const float top = score_of(row_lanes.shfl(slots[0], 0));  // softmax: the row's max z

    // 4-7. Weights, shared slots, renormalization, scaling. Lane r of the row holds slot r (and
    // r + kRowLanes).
    float weight[kSlots];
#pragma unroll
    for (int q = 0; q < kSlots; ++q) {
      float w = 0.0f;
      if (r + q * kRowLanes < Kr) {
        if constexpr (kMode == Mode::softmax_by_logit) {
          const float zk = score_of(slots[q]);
          w = top == -INFINITY  ? 0.0f
              : top == INFINITY ? (zk == INFINITY ? 1.0f : 0.0f)
                                : expf(zk - top);
        } else if constexpr (kMode == Mode::softmax_by_prob) {
          w = softmax_numerator(score_of(slots[q]), max_z) / denominator;
        } else {
          float x = 0.0f;
          if constexpr (k16)
            x = format.to_float(static_cast<uint32_t>(slots[q]) & 0xffffu);
          else if (valid)  // the row was just read: an L1 hit
            x = load_one<F32>(a.logits, row_offset + key_id(slots[q]), false);
          w = sigmoid_weight(x);
        }
      }
      weight[q] = w;
    }
    // Summed in slot order, as the reference does; lanes past Kr hold +0 (no bit changes).
    constexpr int kBatch = kRowLanes < 8 ? kRowLanes : 8;
    auto add_slots = [&](float mine, int n, float& total) {
#pragma unroll 1
      for (int k0 = 0; k0 < n; k0 += kBatch) {
        float part[kBatch];
#pragma unroll
        for (int j = 0; j < kBatch; ++j) part[j] = row_lanes.shfl(mine, k0 + j);
#pragma unroll
        for (int j = 0; j < kBatch; ++j) total += part[j];
      }
    };
    float routed_sum = 0.0f;
    add_slots(weight[0], first_rounds, routed_sum);
    if (Kr > kRowLanes) add_slots(weight[1], Kr - kRowLanes, routed_sum);
    trace.mark_after(6, __float_as_uint(routed_sum));
#pragma unroll
    for (int q = 0; q < kSlots; ++q) {
      const int slot = r + q * kRowLanes;
      if (!in_range || slot >= a.topk) continue;
      if (!valid) {  // a padding row beside a valid one
        store_slot(a, row, slot, 0.0f, -1);
        continue;
      }
      finish_and_store_slot(a, row, slot, weight[q], key_id(slots[q]), routed_sum);
    }
    trace.mark(7);
    trace.print(row == 0, E, a.topk, "wait bias keys sort rounds weights stored");
  }
}

}  // namespace moekit::gpu::route_detail
