// GPU routing v4: grouped sigmoid routing (DeepSeek-V3's shape: 8 groups of 32 experts) with two
// lanes per group, rows of 16 lanes, 2 rows per warp. v3 (route_gpu_v3.cuh) spreads a DeepSeek-V3
// row over a whole warp (8 experts per lane, a group is 4 lanes) with 64-bit keys: at prefill it
// executes ~1160 warp instructions per row. Here:
//
// - Keys are 32 bits first: the top 24 bits of the order key of s + b above an 8-bit id field (E
//   <= 256), so a compare-exchange is a max and a min, and a top-k round a 4-step reduction of one
//   word, each instruction serving 2 rows. Truncated scores may tie where the exact ones differ, so
//   the rounds run once more (the (Kr+1)-th key) and any two adjacent keys of those Kr + 1 whose
//   24-bit scores are equal send the warp's rows to the exact pass: 64-bit keys (score, id), the
//   same steps. Otherwise the two orders agree on the top Kr (truncation only reorders keys of
//   equal truncated score, which are adjacent). Group scores are exact in both passes.
// - A lane sorts its 16 keys once (runs of 8 by Batcher's network, merged into its top 8 and a 9th)
//   and the winner of a round shifts its sorted keys, as in v3; a group's top two are its two
//   lanes' exact top two merged by one exchange.
// - The bias sits in shared memory, loaded once per block.
//
// Weights: v2's sigmoid of each winner's logit, read again (an L1 hit); sums in slot order. So the
// outputs are v2's and v3's bit for bit. Serves sigmoid with either group score, G <= 8, experts
// per group <= 32, at most 8 routed slots (a lane's sorted top 8 is all it can give) and K <= 16
// (one slot per lane).
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "gpu/route_gpu_common.cuh"
#include "gpu/route_gpu_v2.cuh"
#include "gpu/route_gpu_v3.cuh"
#include "gpu/vendor.h"

namespace moekit::gpu::route_detail {

constexpr int kV4RowLanes = 16;        // lanes per row
constexpr int kV4LanesPerGroup = 2;    // a group is two adjacent lanes
constexpr int kV4ExpertsPerLane = 16;  // of its group: the first or the second 16
constexpr int kV4MaxGroups = kV4RowLanes / kV4LanesPerGroup;
constexpr int kV4MaxGroupExperts = kV4LanesPerGroup * kV4ExpertsPerLane;
constexpr int kV4SortedKeys = 8;          // sorted keys per lane: the most routed slots served
constexpr int kV4MaxSlots = kV4RowLanes;  // K: one slot per lane
constexpr int kV4MaxExperts = 256;        // 32-bit keys hold an 8-bit id field
static_assert(kV4MaxGroups * kV4MaxGroupExperts <= kV4MaxExperts);

// 32-bit keys: the top 24 bits of the order key above the id field (255 - id).
__device__ __forceinline__ uint32_t v4_narrow_key(uint32_t order, int id) {
  return (order & 0xffffff00u) | (255u - static_cast<uint32_t>(id));
}

template <class Key>
__device__ __forceinline__ int v4_key_id(Key key) {
  if constexpr (sizeof(Key) == 4)
    return 255 - static_cast<int>(key & 0xffu);
  else
    return key_id(key);
}

// Larger key to a, smaller to b.
__device__ __forceinline__ void v4_order(uint32_t& a, uint32_t& b) {
  const uint32_t high = max(a, b);
  b = min(a, b);
  a = high;
}
__device__ __forceinline__ void v4_order(uint64_t& a, uint64_t& b) {
  const bool swap = b > a;
  const uint64_t high = swap ? b : a;
  b = swap ? a : b;
  a = high;
}

// Sorts 8 keys descending (Batcher's odd-even merge sort: 19 compare-exchanges).
template <class Key>
__device__ __forceinline__ void v4_sort8(Key (&k)[8]) {
  constexpr int kPairs[19][2] = {{0, 1}, {2, 3}, {4, 5}, {6, 7}, {0, 2}, {1, 3}, {4, 6},
                                 {5, 7}, {1, 2}, {5, 6}, {0, 4}, {1, 5}, {2, 6}, {3, 7},
                                 {2, 4}, {3, 5}, {1, 2}, {3, 4}, {5, 6}};
#pragma unroll
  for (int p = 0; p < 19; ++p) v4_order(k[kPairs[p][0]], k[kPairs[p][1]]);
}

// What a lane's pass over its row produced: its sorted keys, and its two largest exact order keys.
template <class Key>
struct V4LaneKeys {
  Key top[kV4SortedKeys + 1];  // descending; top[8]: the 9th (32-bit keys only, else 0)
  uint32_t first, second;
};

// One row as a lane of v4 sees it.
struct V4Row {
  const RouteArgs& a;
  Format16 format;
  V3Row<kV4RowLanes> row_lanes;
  const float* my_bias;  // this lane's experts' bias, in shared memory
  int64_t row_offset;    // of the row's logits
  int r;                 // this lane in the row
  int g;                 // its group
  int my_first;          // its first expert
  int count;             // its experts to load (0 past G and in padding rows)
};

template <class Logits>
struct V4Layout {
  static constexpr bool k16 = sizeof(typename Logits::Storage) == 2;
  static constexpr int kV = v2_chunk<std::conditional_t<k16, LogitsBf16, LogitsF32>,
                                     kV4ExpertsPerLane>();  // elements per vector load
  static constexpr int kNv = kV4ExpertsPerLane / kV;
  static constexpr int kWords = kV * static_cast<int>(sizeof(typename Logits::Storage)) / 4;
  static_assert(kV4SortedKeys % kV == 0 && kV4ExpertsPerLane % kV4SortedKeys == 0);
};

// The group's logits as raw words, every chunk's load issued before any key is built, so that
// their latencies overlap.
template <class Logits>
__device__ __forceinline__ void v4_load_group(
    const V4Row& row, uint32_t (&words)[V4Layout<Logits>::kNv][V4Layout<Logits>::kWords]) {
  using L = V4Layout<Logits>;
  const RouteArgs& a = row.a;
#pragma unroll
  for (int c = 0; c < L::kNv; ++c) {
    const int first = row.my_first + c * L::kV, left = row.count - c * L::kV;
    if (a.logits_vector_loads && left >= L::kV) {
      load_words<L::kWords * 4>(
          static_cast<const char*>(a.logits) +
              (row.row_offset + first) * static_cast<int64_t>(sizeof(typename Logits::Storage)),
          words[c]);
    } else if constexpr (L::k16) {  // element by element; past the group's end: 0
      uint32_t bits[L::kV];
      load_bits16<L::kV>(a.logits, row.row_offset + first, left, false, bits);
#pragma unroll
      for (int w = 0; w < L::kWords; ++w) words[c][w] = bits[2 * w] | (bits[2 * w + 1] << 16);
    } else {
      float x[L::kV];
      v2_load_chunk<LogitsF32, L::kV>(a.logits, row.row_offset + first, left, false, x);
#pragma unroll
      for (int w = 0; w < L::kWords; ++w) words[c][w] = __float_as_uint(x[w]);
    }
  }
}

// 1-2. A lane's keys, sorted, and its two largest exact order keys. Keys are built a run of 8 at a
// time, each run sorted and merged into the top 8 so far (the larger of top[i] and run[7 - i] is a
// bitonic sequence holding the top 8 of both, a bitonic merge sorts it; the largest of the smaller
// ones is the 9th of both). A key: the score s + b (s: v2's exact sigmoid) above the id field.
// exact_huge: elements with d >= 2^126 (x < -87.3, -inf or NaN) take the scaled reciprocal; `huge`
// says whether there were any.
template <class Logits, class Key>
__device__ __forceinline__ V4LaneKeys<Key> v4_lane_keys(
    const V4Row& row, const uint32_t (&words)[V4Layout<Logits>::kNv][V4Layout<Logits>::kWords],
    bool exact_huge, bool& huge) {
  using L = V4Layout<Logits>;
  constexpr bool kNarrow = sizeof(Key) == 4;
  constexpr int kRun = kV4SortedKeys;
  V4LaneKeys<Key> out{};
  uint32_t first = 0, second = 0;  // 32-bit keys: the lane's top two exact order keys
  huge = false;
#pragma unroll
  for (int run = 0; run < kV4ExpertsPerLane / kRun; ++run) {
    Key k[kRun];
#pragma unroll
    for (int j = 0; j < kRun; ++j) {
      const int i = run * kRun + j;
      const uint32_t word = words[i / L::kV][(i % L::kV) * L::kWords / L::kV];
      const uint32_t bits = L::k16 ? (i % 2 ? word >> 16 : word & 0xffffu) : word;
      const float x = L::k16 ? row.format.to_float(bits) : __uint_as_float(bits);
      // A NaN logit gives d = NaN, which fails the range test like x < -87.3: the first pass
      // leaves it to the second, which takes it as -inf (s = 0), as the reference does.
      const float d = 1.0f + expf(-(exact_huge ? nan_to_neg_inf(x) : x));
      const bool in = d < 0x1p126f;
      huge |= !in;
      const float sig = exact_huge && !in ? reciprocal_of_huge(d) : reciprocal_in_range(d);
      const uint32_t order = order_key(nan_to_neg_inf(__fadd_rn(sig, row.my_bias[i])));
      // Past the group's experts: key 0, by a mask (a branch per element serializes them).
      const bool present = i < row.count;
      if constexpr (kNarrow) {
        const uint32_t keep = 0u - static_cast<uint32_t>(present);
        k[j] = keep & v4_narrow_key(order, row.my_first + i);
        add_to_top2(keep & order, first, second);
      } else {
        const uint64_t keep = uint64_t{0} - static_cast<uint64_t>(present);
        k[j] = keep & ((static_cast<uint64_t>(order) << 32) | (id_field(row.my_first + i) << 16));
      }
    }
    v4_sort8(k);
    if (run == 0) {
#pragma unroll
      for (int j = 0; j < kRun; ++j) out.top[j] = k[j];
    } else {
#pragma unroll
      for (int j = 0; j < kRun; ++j) {
        Key high = out.top[j], low = k[kRun - 1 - j];
        v4_order(high, low);
        out.top[j] = high;
        if constexpr (kNarrow) out.top[kRun] = max(out.top[kRun], low);
      }
#pragma unroll
      for (int step = kRun / 2; step > 0; step /= 2) {
#pragma unroll
        for (int j = 0; j < kRun; ++j)
          if ((j & step) == 0) v4_order(out.top[j], out.top[j + step]);
      }
    }
  }
  if constexpr (!kNarrow) {
    first = static_cast<uint32_t>(out.top[0] >> 32);
    second = static_cast<uint32_t>(out.top[1] >> 32);
  }
  out.first = first;
  out.second = second;
  return out;
}

// 2b-3. Groups ranked TG or worse drop their keys (ties: the lower group id, in group_rank); then
// the top-Kr rounds: a round is the row max of the lanes' heads, the lane whose head it is shifts
// its sorted keys up by one, and lane k of the row records slot k. Returns slot r's key. 32-bit
// keys run one more round and set needs_exact where two adjacent keys of the Kr + 1 tie in their
// truncated scores.
template <class Logits, class Key>
__device__ __forceinline__ Key v4_select(const V4Row& row, bool& needs_exact) {
  using L = V4Layout<Logits>;
  constexpr bool kNarrow = sizeof(Key) == 4;
  constexpr int kDepth = kNarrow ? kV4SortedKeys + 1 : kV4SortedKeys;
  const RouteArgs& a = row.a;
  uint32_t words[L::kNv][L::kWords];
  v4_load_group<Logits>(row, words);
  bool huge = false;
  V4LaneKeys<Key> lane = v4_lane_keys<Logits, Key>(row, words, false, huge);
  if (huge) {  // rare: load again and build the keys with the scaled reciprocal where needed
    v4_load_group<Logits>(row, words);
    lane = v4_lane_keys<Logits, Key>(row, words, true, huge);
  }
  // The group's score: its two lanes' top two merged (exact order keys), after the lanes that
  // built their keys again have joined the others for the exchange.
  merge_top2(lane.first, lane.second, kV4LanesPerGroup);
  float score = key_value(lane.first);
  if (a.group_top2_sum && a.experts_per_group >= 2) score = score + key_value(lane.second);
  if (group_rank(row.row_lanes, nan_to_neg_inf(score), a.num_groups, row.g, 1) >= a.topk_groups ||
      row.g >= a.num_groups) {
#pragma unroll
    for (int i = 0; i < kDepth; ++i) lane.top[i] = Key{0};
  }
  Key slot_key = 0;
  Key best = 0;
  const int Kr = a.num_routed;
  const int rounds = kNarrow ? Kr + 1 : Kr;
  for (int k = 0; k < rounds; ++k) {
    best = row.row_lanes.max(lane.top[0]);
    const bool won = lane.top[0] == best;
    slot_key = row.r == k ? best : slot_key;
#pragma unroll
    for (int i = 0; i + 1 < kDepth; ++i) lane.top[i] = won ? lane.top[i + 1] : lane.top[i];
    lane.top[kDepth - 1] = won ? Key{0} : lane.top[kDepth - 1];
  }
  needs_exact = false;
  if constexpr (kNarrow) {
    // Slot k against slot k + 1 (the last routed slot against the extra round's key).
    const Key next = row.row_lanes.shfl(slot_key, row.r + 1);
    const Key after = row.r == Kr - 1 ? best : next;
    needs_exact = row.r < Kr && after != 0 && (slot_key >> 8) == (after >> 8);
  }
  return slot_key;
}

// Logits: V3LogitsF32 or V3Logits16 (bf16 / f16 told apart at run time, as in v3). kNarrowFirst:
// 32-bit keys with the exact pass as fallback (else the exact pass only: for measuring). At most
// 64 registers: 32 warps per SM, so that 8192 rows (4096 warps) are one wave on 132 SMs.
template <class Logits, bool kNarrowFirst>
__global__ void __launch_bounds__(kThreadsPerBlock, 6)
    route_group_lanes_v4_kernel(const RouteArgs a) {
  constexpr int kRowLanes = kV4RowLanes;
  constexpr int kEpl = kV4ExpertsPerLane;
  constexpr bool k16 = sizeof(typename Logits::Storage) == 2;
  using LoadType = std::conditional_t<k16, Bits16, F32>;
  constexpr int kRowsPerWarp = kLanes / kRowLanes;

  read_args_then_wait(a);
  vendor::allow_next_grid();

  const int lane = vendor::lane_id();
  const int r = lane % kRowLanes;
  const int g = r / kV4LanesPerGroup;  // this lane's group, and which part of it
  const int part = r % kV4LanesPerGroup;
  const int row_in_warp = lane / kRowLanes;
  const V3Row<kRowLanes> row_lanes{row_in_warp * kRowLanes};
  const int warp = static_cast<int>(threadIdx.x) / kLanes;
  const int EPG = a.experts_per_group;
  const int Kr = a.num_routed;
  const int my_first = g * EPG + part * kEpl;
  // Experts this lane holds: 0 past G, and the second lane of a group of <= 16 holds none.
  const int my_count = g < a.num_groups ? max(0, min(kEpl, EPG - part * kEpl)) : 0;
  const Format16 format(a.logits_bf16);

  // The bias as f32 in shared memory, loaded once per block: read from there, a row's bias costs
  // no global-memory latency and no branch on its storage type. A lane's 16 floats are padded to
  // 20, so that 8 lanes reading 16-byte pieces hit different banks.
  constexpr int kBiasRow = kEpl + 4;
  __shared__ __align__(16) float lane_bias[kRowLanes * kBiasRow];
  for (int e = static_cast<int>(threadIdx.x); e < kRowLanes * kEpl;
       e += static_cast<int>(blockDim.x)) {
    const int lane_in_row = e / kEpl, i = e % kEpl;
    const int group = lane_in_row / kV4LanesPerGroup;
    const int in_group = (lane_in_row % kV4LanesPerGroup) * kEpl + i;
    float b = 0.0f;
    if (group < a.num_groups && in_group < EPG) {
      const int64_t expert = static_cast<int64_t>(group) * EPG + in_group;
      if (a.bias_type == BiasType::f32) b = load_one<F32>(a.bias, expert, false);
      if (a.bias_type == BiasType::f16 || a.bias_type == BiasType::bf16)
        b = load_one<Bits16>(a.bias, expert, a.bias_type == BiasType::bf16);
    }
    lane_bias[lane_in_row * kBiasRow + i] = b;
  }
  __syncthreads();
  const float* my_bias = lane_bias + r * kBiasRow;

  const int64_t rows_per_step = static_cast<int64_t>(gridDim.x) * a.block_warps * kRowsPerWarp;
  for (int64_t first_row = (static_cast<int64_t>(blockIdx.x) * a.block_warps + warp) * kRowsPerWarp;
       first_row < a.num_tokens; first_row += rows_per_step) {
    const int64_t row = first_row + row_in_warp;
    const bool in_range = row < a.num_tokens;
    const bool valid = row < a.num_valid_tokens;
    if (first_row >= a.num_valid_tokens) {  // every row of the step is padding: ids -1, weights 0
      if (in_range && r < a.topk) store_slot(a, row, r, 0.0f, -1);
      continue;
    }
    const int64_t row_offset = row * a.logits_row_stride;
    const V4Row lane_row{a, format,   row_lanes,           my_bias, row_offset, r,
                         g, my_first, valid ? my_count : 0};

    // Slot r's expert (lanes r < Kr).
    int slot_id = 0;
    if constexpr (kNarrowFirst) {
      bool needs_exact = false;
      slot_id = v4_key_id(v4_select<Logits, uint32_t>(lane_row, needs_exact));
      if (vendor::any(needs_exact))  // any row of the warp: both of them, exactly (rare)
        slot_id = v4_key_id(v4_select<Logits, uint64_t>(lane_row, needs_exact));
    } else {
      bool unused = false;
      slot_id = v4_key_id(v4_select<Logits, uint64_t>(lane_row, unused));
    }

    // 4-7. The sigmoid weight of each routed slot (v2's, from the winner's logit, read again: an
    // L1 hit), their sum in slot order (Kr <= 8; lanes past Kr hold +0, which changes no bit),
    // shared slots, renormalization, scaling.
    float weight = 0.0f;
    if (r < Kr) {
      const float xk =
          valid ? load_one<LoadType>(a.logits, row_offset + slot_id, a.logits_bf16) : 0.0f;
      weight = sigmoid_weight(xk);
    }
    float terms[kV4SortedKeys];
#pragma unroll
    for (int j = 0; j < kV4SortedKeys; ++j) terms[j] = row_lanes.shfl(weight, j);
    float routed_sum = 0.0f;
#pragma unroll
    for (int j = 0; j < kV4SortedKeys; ++j) routed_sum += terms[j];
    if (!in_range || r >= a.topk) continue;
    if (!valid) {  // a padding row beside a valid one
      store_slot(a, row, r, 0.0f, -1);
      continue;
    }
    finish_and_store_slot(a, row, r, weight, slot_id, routed_sum);
  }
}

}  // namespace moekit::gpu::route_detail
