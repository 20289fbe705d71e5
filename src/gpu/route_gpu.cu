// GPU routing: spec/routing.md on one warp per token row, every valid call (E 1..2048, K 1..64,
// G 1..64, all scorings and dtypes) served by one kernel template.
//
// Layout: lane r of the row's warp holds the consecutive experts [r * kVpl, (r + 1) * kVpl) as kNv
// chunks of kV (each one vector load: 16 bytes where kV allows). Values stay in registers as
// 32-bit order-preserving keys of the selection score (NaN is -inf; absent or dropped experts are
// key 0, below every real score).
//
// Top-k: each lane keeps its best two candidates (key, expert id). A round is one warp max
// reduction and one ballot: the lowest lane holding the max wins (lanes hold consecutive experts,
// so that is the lowest expert id), steps down to its runner-up, and rescans its registers only
// when it wins a third time without a rescan, which random rows rarely need. Lane k keeps slot k
// (and k + 32).
//
// Softmax with renormalization and no groups ranks by the capped, biased logit z (p is monotone in
// z, so the order agrees up to ties of p) and needs only one exp per slot, because the softmax
// denominator cancels: w_k = exp(z_k - max) / sum_j exp(z_j - max). The other softmax cases rank by
// p itself, exactly as the reference does, with the denominator summed in expert order.
//
// Launches use programmatic dependent launch where the device has it (sm_90+), so a call's launch
// overlaps the previous kernel; MOEKIT_GPU_PDL=0 turns that off.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "gpu/gpu_check.h"
#include "gpu/gpu_runtime.h"
#include "gpu/route_gpu.h"
#include "gpu/vendor.h"

namespace moekit::gpu {
namespace {

constexpr int kWarpsPerBlock = 4;  // rows per block: small blocks keep decode launches cheap
constexpr int kThreadsPerBlock = kWarpsPerBlock * kLanes;
constexpr int kMaxGroups = 64;
constexpr int kBlocksPerSm = 16;  // grid cap: past it warps take several rows (grid stride)
constexpr uint32_t kNoKey = 0;    // removed, dropped or absent: below key(-inf) = 0x007fffff
constexpr uint32_t kNoId = 0xffffffffu;

enum class Mode : int {
  softmax_by_logit,  // softmax, renormalize, G == 1: rank by z, one exp per slot
  softmax_by_prob,   // other softmax cases: rank by p
  sigmoid,
  sqrt_softplus,
};

// Bias storage types, as the kernel sees them.
enum class BiasType : int { none, f32, f16, bf16 };

// Everything a launch needs, by value (no pointers to host memory: graph-capturable).
struct RouteArgs {
  const void* logits;
  int64_t logits_row_stride;  // elements
  const void* bias;
  BiasType bias_type;
  float* weights;
  int64_t weights_row_stride;
  void* ids;
  int64_t ids_row_stride;
  bool ids_i64;
  int64_t num_tokens;
  int64_t num_valid_tokens;
  int num_experts;
  int topk;
  int num_routed;
  int num_groups;
  int topk_groups;
  int experts_per_group;
  uint64_t group_magic;      // e / experts_per_group == (e * group_magic) >> 32 for e, EPG <= 2048
  int group_register_lanes;  // > 0: each group is this many whole lanes, no scratch
  int group_scan_lanes;      // else: lanes that scan one group's keys from shared memory together,
  int group_scan_per_lane;   //   keys per lane of that scan,
  int group_scan_step;       //   and groups per pass of the row's lanes
  bool group_top2_sum;
  Mode mode;
  float softcap;
  bool renormalize;
  float routed_scaling_factor;
  bool apply_scaling_on_output;
  bool logits_bf16;          // 16-bit logits: bf16 (else f16)
  bool logits_vector_loads;  // rows (and the pointer) are aligned for the chunk's vector load
  bool bias_vector_loads;
};

// ---- Scalar math, written as the reference writes it (separate roundings, accurate functions).

__device__ __forceinline__ float nan_to_neg_inf(float v) { return isnan(v) ? -INFINITY : v; }

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

__device__ __forceinline__ float sqrt_softplus(float x) {
  if (x == INFINITY) x = FLT_MAX;
  const float softplus = x > 20.0f ? x : log1pf(expf(x));
  return sqrtf(softplus);
}

// The weight source of sigmoid / sqrtsoftplus scoring (bias-free).
__device__ __forceinline__ float activate(Mode mode, float x) {
  const float v = nan_to_neg_inf(x);
  return mode == Mode::sigmoid ? sigmoid(v) : sqrt_softplus(v);
}

// c * tanh(v / c), with the tanh taken in double and rounded once: tanhf's 2-ulp error, scaled
// by c (often 30), would move z by ~1e-5; rounded from double it is the host libm's correctly
// rounded value. Out of line: softcap is rare, and inlined per expert it would cost registers.
__device__ __noinline__ float softcap_logit(float v, float softcap) {
  const float t = static_cast<float>(tanh(static_cast<double>(__fdiv_rn(v, softcap))));
  return __fmul_rn(softcap, t);
}

// Softmax's z: softcap first, then bias; NaN (in the logit or made by the bias) is -inf. A NaN
// logit stays NaN through tanh, the products and the sum, so testing v alone is enough.
__device__ __forceinline__ float softmax_logit(float x, float bias, float softcap) {
  const float v = softcap > 0.0f ? softcap_logit(x, softcap) : x;
  return nan_to_neg_inf(__fadd_rn(v, bias));
}

// Order-preserving map of a non-NaN f32 to u32: key(-inf) = 0x007fffff. (-0 ranks just below +0;
// both are 0 to the reference, so either order is a tie it accepts.)
__device__ __forceinline__ uint32_t order_key(float f) {
  const uint32_t u = __float_as_uint(f);
  return u ^ (static_cast<uint32_t>(static_cast<int32_t>(u) >> 31) | 0x80000000u);
}
__device__ __forceinline__ float key_value(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

__device__ __forceinline__ float warp_sum(float v) {
  // Butterfly: every lane adds the same pairs (a + b == b + a), so all lanes get the same bits.
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) v += vendor::shfl_xor(v, mask);
  return v;
}

// ---- Loads.

// Storage types of logits and bias. 16-bit storage is f16 or bf16, told apart at run time (a
// warp-uniform select per element), which halves the kernel instances.
struct F32 {
  using Storage = float;
  static __device__ __forceinline__ float from_bits(uint32_t bits, bool /*is_bf16*/) {
    return __uint_as_float(bits);
  }
};
struct Bits16 {
  using Storage = uint16_t;
  static __device__ __forceinline__ float from_bits(uint32_t bits, bool is_bf16) {
    return is_bf16 ? __uint_as_float(bits << 16)
                   : vendor::half_bits_to_float(static_cast<uint16_t>(bits));
  }
};

template <class Type>
__device__ __forceinline__ float load_one(const void* base, int64_t index, bool is_bf16) {
  using S = typename Type::Storage;
  const S* p = static_cast<const S*>(base) + index;
  if constexpr (sizeof(S) == 4)
    return Type::from_bits(__float_as_uint(__ldg(reinterpret_cast<const float*>(p))), is_bf16);
  else
    return Type::from_bits(__ldg(reinterpret_cast<const unsigned short*>(p)), is_bf16);
}

// Loads kV consecutive elements starting at element `first` of `base` (an element index of a
// chunk-aligned position) as f32; elements at or past `count` read as 0. One or two vector loads
// when `vector_ok` and the chunk is whole, else element by element.
template <class Type, int kV>
__device__ __forceinline__ void load_chunk(const void* base, int64_t first, int count,
                                           bool vector_ok, bool is_bf16, float (&out)[kV]) {
  using S = typename Type::Storage;
  constexpr int kBytes = kV * static_cast<int>(sizeof(S));
  if (vector_ok && count >= kV) {
    const char* p = static_cast<const char*>(base) + first * static_cast<int64_t>(sizeof(S));
    uint32_t words[kBytes / 4];
    if constexpr (kBytes % 16 == 0) {
#pragma unroll
      for (int i = 0; i < kBytes / 16; ++i) {
        const uint4 v = __ldg(reinterpret_cast<const uint4*>(p) + i);
        words[4 * i] = v.x, words[4 * i + 1] = v.y, words[4 * i + 2] = v.z, words[4 * i + 3] = v.w;
      }
    } else if constexpr (kBytes == 8) {
      const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
      words[0] = v.x, words[1] = v.y;
    } else {
      static_assert(kBytes == 4, "chunks are 4, 8 or a multiple of 16 bytes");
      words[0] = __ldg(reinterpret_cast<const unsigned int*>(p));
    }
    if constexpr (sizeof(S) == 4) {
#pragma unroll
      for (int j = 0; j < kV; ++j) out[j] = Type::from_bits(words[j], false);
    } else if (is_bf16) {  // warp-uniform: one branch per chunk, not a select per element
#pragma unroll
      for (int j = 0; j < kV; ++j)
        out[j] = __uint_as_float(j % 2 ? words[j / 2] & 0xffff0000u : words[j / 2] << 16);
    } else {
#pragma unroll
      for (int j = 0; j < kV; ++j)
        out[j] = vendor::half_bits_to_float(static_cast<uint16_t>(words[j / 2] >> (16 * (j % 2))));
    }
  } else {
#pragma unroll
    for (int j = 0; j < kV; ++j)
      out[j] = j < count ? load_one<Type>(base, first + j, is_bf16) : 0.0f;
  }
}

template <int kV>
__device__ __forceinline__ void load_bias_chunk(const RouteArgs& a, int64_t first, int count,
                                                float (&out)[kV]) {
  switch (a.bias_type) {
    case BiasType::f32:
      load_chunk<F32, kV>(a.bias, first, count, a.bias_vector_loads, false, out);
      break;
    case BiasType::f16:
    case BiasType::bf16:
      load_chunk<Bits16, kV>(a.bias, first, count, a.bias_vector_loads,
                             a.bias_type == BiasType::bf16, out);
      break;
    case BiasType::none:
#pragma unroll
      for (int j = 0; j < kV; ++j) out[j] = 0.0f;
      break;
  }
}

// ---- Stores.

__device__ __forceinline__ void store_slot(const RouteArgs& a, int64_t row, int slot, float weight,
                                           int64_t id) {
  a.weights[row * a.weights_row_stride + slot] = weight;
  if (a.ids_i64)
    static_cast<int64_t*>(a.ids)[row * a.ids_row_stride + slot] = id;
  else
    static_cast<int32_t*>(a.ids)[row * a.ids_row_stride + slot] = static_cast<int32_t>(id);
}

// ---- Groups.

// Merges the (first, second) largest keys of the lanes `lanes` apart within aligned runs of `run`
// lanes (run a power of two), so that every lane of a run ends with the run's top two.
__device__ __forceinline__ void merge_top2(uint32_t& first, uint32_t& second, int run) {
  for (int offset = 1; offset < run; offset <<= 1) {
    const uint32_t other_first = vendor::shfl_xor(first, offset);
    const uint32_t other_second = vendor::shfl_xor(second, offset);
    second = max(min(first, other_first), max(second, other_second));
    first = max(first, other_first);
  }
}

__device__ __forceinline__ void add_to_top2(uint32_t key, uint32_t& first, uint32_t& second) {
  second = max(second, min(first, key));
  first = max(first, key);
}

// The group's score from its two largest selection keys (every group has >= 1 expert, and >= 2
// when top2_sum applies). NaN (e.g. inf + -inf) ranks with the lowest.
__device__ __forceinline__ float group_score(const RouteArgs& a, uint32_t first, uint32_t second) {
  float score = key_value(first);
  if (a.group_top2_sum && a.experts_per_group >= 2) score = score + key_value(second);
  return nan_to_neg_inf(score);
}

// ---- The kernel.

// One warp per row; lane r holds experts [r * kVpl, (r + 1) * kVpl) as kNv chunks of kV (one
// vector load each). Because lanes hold consecutive experts, the lowest lane among equal
// candidates has the lowest expert id.
template <class Type, int kV, int kNv>
__global__ void __launch_bounds__(kThreadsPerBlock) route_rows_kernel(const RouteArgs a) {
  constexpr int kVpl = kV * kNv;  // experts per lane
  constexpr int kSlots = 2;       // slots per lane: K <= 64
  __shared__ float group_scores[kWarpsPerBlock][kMaxGroups];
  // Scratch of E words per warp: the softmax terms to sum in order, the keys of groups that are
  // not whole lanes.
  extern __shared__ uint32_t scan_keys[];

  // Launched so that it may start while the previous kernel (often the one writing the logits)
  // still runs: wait for it before touching memory, and let the next kernel start early.
  vendor::wait_for_previous_grid();
  vendor::allow_next_grid();

  const int r = vendor::lane_id();
  const int warp = static_cast<int>(threadIdx.x) / kLanes;
  const int E = a.num_experts;
  const int Kr = a.num_routed;
  const int my_first = r * kVpl;  // this lane's first expert
  auto expert_of = [&](int i) { return my_first + i; };

  // The bias is the same for every row: up to 16 experts per lane it is loaded once and kept in
  // registers; past that, registers are scarce and each row reloads it (from L1).
  constexpr bool kBiasOncePerWarp = kVpl <= 16;
  float bias[kVpl];
  auto load_bias = [&] {
#pragma unroll
    for (int c = 0; c < kNv; ++c) {
      float chunk[kV];
      load_bias_chunk<kV>(a, my_first + c * kV, E - my_first - c * kV, chunk);
#pragma unroll
      for (int j = 0; j < kV; ++j) bias[c * kV + j] = chunk[j];
    }
  };
  if constexpr (kBiasOncePerWarp) load_bias();

  // Every lane holds only real experts when E fills the layout; else those past E get kNoKey
  // (a warp-uniform test, so full rows pay nothing for it).
  const bool row_full = E == kLanes * kVpl;
  auto drop_absent = [&](uint32_t(&keys)[kVpl]) {
    if (!row_full) {
#pragma unroll
      for (int i = 0; i < kVpl; ++i)
        if (expert_of(i) >= E) keys[i] = kNoKey;
    }
  };

  const int64_t rows_per_step = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp; row < a.num_tokens;
       row += rows_per_step) {
    if (row >= a.num_valid_tokens) {  // padding row: ids -1, weights 0
#pragma unroll
      for (int q = 0; q < kSlots; ++q) {
        const int slot = r + q * kLanes;
        if (slot < a.topk) store_slot(a, row, slot, 0.0f, -1);
      }
      continue;
    }
    const int64_t row_offset = row * a.logits_row_stride;
    if constexpr (!kBiasOncePerWarp) load_bias();

    // 1. Logits -> selection keys (and, for softmax by p, the probabilities).
    float value[kVpl];
#pragma unroll
    for (int c = 0; c < kNv; ++c) {
      float chunk[kV];
      const int count = E - my_first - c * kV;
      load_chunk<Type, kV>(a.logits, row_offset + my_first + c * kV, count, a.logits_vector_loads,
                           a.logits_bf16, chunk);
#pragma unroll
      for (int j = 0; j < kV; ++j) value[c * kV + j] = chunk[j];
    }
    uint32_t key[kVpl];
    if (a.mode == Mode::softmax_by_logit || a.mode == Mode::softmax_by_prob) {
#pragma unroll
      for (int i = 0; i < kVpl; ++i) {
        value[i] = softmax_logit(value[i], bias[i], a.softcap);
        key[i] = order_key(value[i]);
      }
      drop_absent(key);
      if (a.mode == Mode::softmax_by_prob) {
        uint32_t lane_max = kNoKey;
#pragma unroll
        for (int i = 0; i < kVpl; ++i) lane_max = max(lane_max, key[i]);
        const float m = key_value(vendor::reduce_max(lane_max));
        if (m == -INFINITY) {  // all -inf / NaN: p = 0 everywhere
#pragma unroll
          for (int i = 0; i < kVpl; ++i) value[i] = 0.0f;
        } else if (m == INFINITY) {  // the +inf entries share the mass equally
          float lane_count = 0.0f;
#pragma unroll
          for (int i = 0; i < kVpl; ++i)
            lane_count += key[i] != kNoKey && value[i] == INFINITY ? 1.0f : 0.0f;
          const float count = warp_sum(lane_count);
#pragma unroll
          for (int i = 0; i < kVpl; ++i) value[i] = value[i] == INFINITY ? 1.0f / count : 0.0f;
        } else {
#pragma unroll
          for (int i = 0; i < kVpl; ++i) value[i] = key[i] != kNoKey ? expf(value[i] - m) : 0.0f;
          // Summed in expert order, as the reference does: unnormalized weights (scaled by rsf)
          // are then within an ulp or two of its own, not a reordering's several. Through shared
          // memory, every lane reading the same address: a chain of adds, not of shuffles.
          float* staged = reinterpret_cast<float*>(scan_keys) + warp * E;
#pragma unroll
          for (int i = 0; i < kVpl; ++i)
            if (expert_of(i) < E) staged[expert_of(i)] = value[i];
          vendor::sync_lanes();
          float sum = 0.0f;
#pragma unroll 8
          for (int e = 0; e < E; ++e) sum += staged[e];
          vendor::sync_lanes();  // the scratch is rewritten below and by the next row
#pragma unroll
          for (int i = 0; i < kVpl; ++i) value[i] = value[i] / sum;
        }
#pragma unroll
        for (int i = 0; i < kVpl; ++i) key[i] = order_key(value[i]);
        drop_absent(key);
      }
    } else {
#pragma unroll
      for (int i = 0; i < kVpl; ++i) {
        const float selection = nan_to_neg_inf(__fadd_rn(activate(a.mode, value[i]), bias[i]));
        key[i] = order_key(selection);
      }
      drop_absent(key);
    }

    // 2. Groups: score each group, keep the best TG (ties: lower group id), drop the others' keys.
    if (a.num_groups > 1) {
      const int G = a.num_groups;
      float* scores = group_scores[warp];
      if (a.group_register_lanes > 0) {
        // Each group is `run` whole lanes: lane top-2, then merge across the run.
        const int run = a.group_register_lanes;
        uint32_t first = kNoKey, second = kNoKey;
#pragma unroll
        for (int i = 0; i < kVpl; ++i) add_to_top2(key[i], first, second);
        merge_top2(first, second, run);
        if (r % run == 0 && r / run < G) scores[r / run] = group_score(a, first, second);
      } else {
        // Any other shape: keys through shared memory, `run` lanes scan each group.
        uint32_t* keys = scan_keys + warp * E;
#pragma unroll
        for (int i = 0; i < kVpl; ++i)
          if (expert_of(i) < E) keys[expert_of(i)] = key[i];
        vendor::sync_lanes();
        const int run = a.group_scan_lanes;
        const int EPG = a.experts_per_group;
        const int per_lane = a.group_scan_per_lane;
        for (int first_group = 0; first_group < G; first_group += a.group_scan_step) {
          const int g = first_group + r / run;
          uint32_t first = kNoKey, second = kNoKey;
          if (g < G) {
            const int begin = (r % run) * per_lane;
            const int end = min(EPG, begin + per_lane);
            for (int t = begin; t < end; ++t) add_to_top2(keys[g * EPG + t], first, second);
          }
          merge_top2(first, second, run);
          if (r % run == 0 && g < G) scores[g] = group_score(a, first, second);
        }
      }
      vendor::sync_lanes();
      uint64_t kept = 0;
      for (int pass = 0; pass * kLanes < G; ++pass) {
        const int g = r + pass * kLanes;
        bool keep = false;
        if (g < G) {
          const float mine = scores[g];
          int rank = 0;
          for (int h = 0; h < G; ++h) {
            const float other = scores[h];
            rank += other > mine || (other == mine && h < g);
          }
          keep = rank < a.topk_groups;
        }
        kept |= static_cast<uint64_t>(vendor::ballot(keep)) << (pass * kLanes);
      }
#pragma unroll
      for (int i = 0; i < kVpl; ++i) {
        const uint64_t g = (static_cast<uint64_t>(expert_of(i)) * a.group_magic) >> 32;
        if (expert_of(i) < E && !((kept >> g) & 1u)) key[i] = kNoKey;
      }
      vendor::sync_lanes();  // the scratch is rewritten by the next row
    }

    // 3. Top-Kr. Each lane's best two candidates (ties: lower id, as ids grow with i).
    uint32_t head_key = kNoKey, head_id = kNoId, next_key = kNoKey, next_id = kNoId;
#pragma unroll
    for (int i = 0; i < kVpl; ++i) {
      if (key[i] > head_key) {
        next_key = head_key, next_id = head_id;
        head_key = key[i], head_id = static_cast<uint32_t>(expert_of(i));
      } else if (key[i] > next_key) {
        next_key = key[i], next_id = static_cast<uint32_t>(expert_of(i));
      }
    }
    // Lanes whose `next` is no longer their exact runner-up (it was promoted): warp-uniform.
    uint32_t stale = 0;
    uint32_t slot_key[kSlots], slot_id[kSlots];
#pragma unroll
    for (int q = 0; q < kSlots; ++q) slot_key[q] = kNoKey, slot_id[q] = kNoId;
    // A round: the row's best key (one warp reduction); its lowest holding lane wins (it has the
    // lowest expert id) and steps down to its runner-up, or rescans when that is stale.
    uint32_t top_key = kNoKey;
    for (int k = 0; k < Kr; ++k) {
      const uint32_t best_key = vendor::reduce_max(head_key);
      const uint32_t holders = vendor::ballot(head_key == best_key);
      const uint32_t winner_bit = holders & (0u - holders);
      const uint32_t winner_id = vendor::shfl(head_id, vendor::lowest_lane(holders));
      if (k == 0) top_key = best_key;
      if (r == k % kLanes) {
        if (k < kLanes)
          slot_key[0] = best_key, slot_id[0] = winner_id;
        else
          slot_key[1] = best_key, slot_id[1] = winner_id;
      }
      const bool won = (winner_bit >> r) & 1u;
      if (winner_bit & stale) {
        // A third win since the lane's last scan: the best two among its elements ranked after
        // the one just taken.
        if (won) {
          const uint32_t taken_key = head_key, taken_id = head_id;
          head_key = next_key = kNoKey;
          head_id = next_id = kNoId;
#pragma unroll
          for (int i = 0; i < kVpl; ++i) {
            const uint32_t id = static_cast<uint32_t>(expert_of(i));
            const bool after = key[i] < taken_key || (key[i] == taken_key && id > taken_id);
            const uint32_t k_i = after ? key[i] : kNoKey;
            if (k_i > head_key) {
              next_key = head_key, next_id = head_id;
              head_key = k_i, head_id = id;
            } else if (k_i > next_key) {
              next_key = k_i, next_id = id;
            }
          }
        }
      } else if (won) {
        head_key = next_key, head_id = next_id;
      }
      stale ^= winner_bit;  // a promotion makes `next` stale; a rescan makes it exact again
    }

    // 4-7. Weights, shared slots, renormalization, scaling. Lane r holds slot r (and r + 32).
    float weight[kSlots];
    const float top = key_value(top_key);  // softmax by logit: the row's max z
#pragma unroll
    for (int q = 0; q < kSlots; ++q) {
      weight[q] = 0.0f;
      if (r + q * kLanes >= Kr) continue;
      float w;
      if (a.mode == Mode::softmax_by_logit) {
        const float z = key_value(slot_key[q]);
        w = top == -INFINITY  ? 0.0f
            : top == INFINITY ? (z == INFINITY ? 1.0f : 0.0f)
                              : expf(z - top);
      } else if (a.bias_type != BiasType::none &&
                 (a.mode == Mode::sigmoid || a.mode == Mode::sqrt_softplus)) {
        // The bias-free weight: recompute it from the logit (bitwise what ranking used).
        w = activate(a.mode, load_one<Type>(a.logits, row_offset + slot_id[q], a.logits_bf16));
      } else {
        w = key_value(slot_key[q]);  // the selection score is the weight source
      }
      weight[q] = w;
    }
    // Summed in slot order, as the reference does (shared slots carry the raw sum).
    float routed_sum = 0.0f;
    for (int k = 0; k < Kr; ++k) {
      routed_sum += vendor::shfl(k < kLanes ? weight[0] : weight[1], k % kLanes);
    }
#pragma unroll
    for (int q = 0; q < kSlots; ++q) {
      const int slot = r + q * kLanes;
      if (slot >= a.topk) continue;
      float w = weight[q];
      int64_t id = slot_id[q];
      if (slot >= Kr) {  // fused shared expert
        id = E + (slot - Kr);
        w = routed_sum / a.routed_scaling_factor;
      }
      if (a.renormalize && routed_sum > 0.0f) w = w / routed_sum;
      if (a.apply_scaling_on_output) w = __fmul_rn(w, a.routed_scaling_factor);
      store_slot(a, row, slot, w, id);
    }
  }
}

// ---- Host side.

using KernelFn = void (*)(RouteArgs);

struct Layout {
  int v;   // experts per chunk (one vector load)
  int nv;  // chunks per lane
  KernelFn kernel;
  int experts_per_lane() const { return v * nv; }
};

// Experts per lane grow 2, 4, 8, ... 64: E up to 64, 128, ..., 2048 (and 12 for E up to 384, so
// that Kimi-K2's 384 keep every lane busy). 16-byte loads from E > 128 (16-bit logits: 8 per
// chunk; f32: 4 per chunk).
template <class Type>
Layout warp_per_row_layout(int num_experts) {
  constexpr bool kWide = sizeof(typename Type::Storage) == 2;
  if (num_experts <= 64) return {2, 1, route_rows_kernel<Type, 2, 1>};
  if (num_experts <= 128) return {4, 1, route_rows_kernel<Type, 4, 1>};
  if constexpr (kWide) {
    if (num_experts <= 256) return {8, 1, route_rows_kernel<Type, 8, 1>};
    if (num_experts <= 384) return {4, 3, route_rows_kernel<Type, 4, 3>};  // all 32 lanes busy
    if (num_experts <= 512) return {8, 2, route_rows_kernel<Type, 8, 2>};
    if (num_experts <= 1024) return {8, 4, route_rows_kernel<Type, 8, 4>};
    return {8, 8, route_rows_kernel<Type, 8, 8>};
  } else {
    if (num_experts <= 256) return {4, 2, route_rows_kernel<Type, 4, 2>};
    if (num_experts <= 512) return {4, 4, route_rows_kernel<Type, 4, 4>};
    if (num_experts <= 1024) return {4, 8, route_rows_kernel<Type, 4, 8>};
    return {4, 16, route_rows_kernel<Type, 4, 16>};
  }
}

Layout pick_layout(const RouteProblem& p) {
  switch (p.logits.dtype()) {
    case DType::f32:
      return warp_per_row_layout<F32>(p.num_experts);
    case DType::f16:
    case DType::bf16:
      return warp_per_row_layout<Bits16>(p.num_experts);
    default:
      break;
  }
  fail("route", "logits.dtype", std::string(dtype_name(p.logits.dtype())),
       "is not supported by the gpu kernel (f32, f16 or bf16)");
}

BiasType bias_type_of(const RouteProblem& p) {
  if (!p.has_bias()) return BiasType::none;
  switch (p.bias.dtype()) {
    case DType::f32:
      return BiasType::f32;
    case DType::f16:
      return BiasType::f16;
    case DType::bf16:
      return BiasType::bf16;
    default:
      break;
  }
  fail("route", "bias.dtype", std::string(dtype_name(p.bias.dtype())),
       "is not supported by the gpu kernel (f32, f16 or bf16)");
}

// Whether chunks of `v` elements of `element_size` bytes can be read with vector loads: the piece
// size (at most 16 bytes) must divide the pointer and the row stride in bytes.
bool vector_loads_ok(const void* data, int64_t row_stride, size_t element_size, int v) {
  const auto piece = static_cast<int64_t>(std::min<size_t>(16, element_size * v));
  const auto address = static_cast<int64_t>(reinterpret_cast<uintptr_t>(data));
  return address % piece == 0 && (row_stride * static_cast<int64_t>(element_size)) % piece == 0;
}

bool is_power_of_two(int x) { return x > 0 && (x & (x - 1)) == 0; }

// Programmatic dependent launch where the device has it (compute capability 9.0+), unless
// MOEKIT_GPU_PDL=0 (for A/B timing).
bool overlap_previous_kernel(int device) {
  static const bool allowed = [] {
    const char* env = std::getenv("MOEKIT_GPU_PDL");
    return env == nullptr || std::string(env) != "0";
  }();
  return allowed && device_properties(device).major >= 9;
}

}  // namespace

std::string route_supports(const RouteProblem& p) {
  if (!p.logits.device().is_gpu())
    return "tensors are on " + p.logits.device().str() + ", not on a GPU";
  auto inner = [](const char* name, int64_t stride) {
    return std::string(name) + " rows are not contiguous (inner stride " + std::to_string(stride) +
           ")";
  };
  if (p.num_experts > 1 && p.logits.stride(1) != 1) return inner("logits", p.logits.stride(1));
  if (p.topk > 1 && p.weights.stride(1) != 1) return inner("weights", p.weights.stride(1));
  if (p.topk > 1 && p.ids.stride(1) != 1) return inner("ids", p.ids.stride(1));
  if (p.has_bias() && p.num_experts > 1 && p.bias.stride(0) != 1)
    return "bias is not contiguous (stride " + std::to_string(p.bias.stride(0)) + ")";
  return "";
}

void route(const RouteProblem& p) {
  if (p.num_tokens == 0) return;
  const int E = p.num_experts;
  const Layout layout = pick_layout(p);

  RouteArgs a{};
  a.logits = p.logits.data();
  a.logits_row_stride = p.logits.stride(0);
  a.bias = p.has_bias() ? p.bias.data() : nullptr;
  a.bias_type = bias_type_of(p);
  a.weights = p.weights.data_as<float>();
  a.weights_row_stride = p.weights.stride(0);
  a.ids = p.ids.data();
  a.ids_row_stride = p.ids.stride(0);
  a.ids_i64 = p.ids.dtype() == DType::i64;
  a.num_tokens = p.num_tokens;
  a.num_valid_tokens = p.num_valid_tokens;
  a.num_experts = E;
  a.topk = p.topk;
  a.num_routed = p.num_routed;
  a.num_groups = p.num_groups;
  a.topk_groups = p.topk_groups;
  a.experts_per_group = p.experts_per_group();
  a.group_magic = ((uint64_t{1} << 32) + a.experts_per_group - 1) / a.experts_per_group;
  a.group_top2_sum = p.group_score == GroupScore::top2_sum;
  switch (p.scoring) {
    case Scoring::softmax:
      a.mode = p.renormalize && p.num_groups == 1 ? Mode::softmax_by_logit : Mode::softmax_by_prob;
      break;
    case Scoring::sigmoid:
      a.mode = Mode::sigmoid;
      break;
    case Scoring::sqrtsoftplus:
      a.mode = Mode::sqrt_softplus;
      break;
  }
  a.softcap = p.softcap;
  a.renormalize = p.renormalize;
  a.routed_scaling_factor = p.routed_scaling_factor;
  a.apply_scaling_on_output = p.apply_scaling_on_output;
  a.logits_bf16 = p.logits.dtype() == DType::bf16;
  a.logits_vector_loads = vector_loads_ok(a.logits, p.num_tokens > 1 ? a.logits_row_stride : 0,
                                          dtype_size(p.logits.dtype()), layout.v);
  a.bias_vector_loads =
      a.bias != nullptr && vector_loads_ok(a.bias, 0, dtype_size(p.bias.dtype()), layout.v);

  // Softmax by p sums its terms through shared memory; groups that are whole lanes need no
  // scratch, any other shape scans keys there.
  const size_t scratch_per_warp = sizeof(uint32_t) * static_cast<size_t>(E) * kWarpsPerBlock;
  size_t scratch_bytes = a.mode == Mode::softmax_by_prob ? scratch_per_warp : 0;
  if (p.num_groups > 1) {
    const int EPG = a.experts_per_group;
    const int vpl = layout.experts_per_lane();
    if (EPG % vpl == 0 && is_power_of_two(EPG / vpl)) {
      a.group_register_lanes = EPG / vpl;
    } else {
      int run = 1;  // lanes per group: the largest power of two with G * run <= 32
      while (run * 2 * p.num_groups <= kLanes && run * 2 <= EPG) run *= 2;
      a.group_scan_lanes = run;
      a.group_scan_per_lane = (EPG + run - 1) / run;
      a.group_scan_step = kLanes / run;
      scratch_bytes = scratch_per_warp;
    }
  }

  const int device = p.logits.device().index;
  DeviceGuard on_device(device);
  const int64_t blocks_needed = (p.num_tokens + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const int64_t block_cap = static_cast<int64_t>(device_properties(device).sm_count) * kBlocksPerSm;
  const auto blocks = static_cast<unsigned>(std::min(blocks_needed, block_cap));
  const auto stream = static_cast<cudaStream_t>(p.stream);
  MOEKIT_GPU_CHECK(vendor::launch(layout.kernel, dim3(blocks), dim3(kThreadsPerBlock),
                                  scratch_bytes, stream, overlap_previous_kernel(device), a));
}

}  // namespace moekit::gpu
