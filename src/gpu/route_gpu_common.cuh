// Shared by the GPU routing kernels (route_gpu.cu: v1, route_gpu_v2.cuh: v2, route_gpu_v3.cuh:
// v3): launch arguments,
// scalar math written as the reference writes it, order-preserving keys, loads and stores, and the
// group helpers. Device code for route_gpu.cu only (one translation unit).
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "gpu/vendor.h"

namespace moekit::gpu::route_detail {

constexpr int kWarpsPerBlock = 4;  // rows per block: small blocks keep decode launches cheap
constexpr int kThreadsPerBlock = kWarpsPerBlock * kLanes;
constexpr int kMaxGroups = 64;
constexpr int kBlocksPerSm = 16;  // grid cap: past it warps take several rows (grid stride)
constexpr uint32_t kNoKey = 0;    // removed, dropped or absent: below key(-inf) = 0x007fffff
constexpr uint32_t kNoId = 0xffffffffu;

// Phase clocks of one row, for development only (compile with -DMOEKIT_ROUTE_TRACE; off, every
// call compiles away): lane 0 of the first row prints the SM clock cycles between consecutive
// marks (v3: entry, after the wait, bias, keys, sort, rounds, weights, stores), in one launch of
// every 256. mark_after(i, v) reads the clock only once v is known (a branch on it), so the mark
// cannot move above the work that produced v.
#ifdef MOEKIT_ROUTE_TRACE
__device__ unsigned int route_trace_launches = 0;
struct RouteTrace {
  long long t[8] = {};
  __device__ __forceinline__ void mark(int i) { t[i] = clock64(); }
  __device__ __forceinline__ void mark_after(int i, uint32_t v) {
    if (v != 0x5bd1e995u) t[i] = clock64();
  }
  // phases: the names of the 7 intervals, e.g. v3's "wait bias keys sort rounds weights stored".
  __device__ void print(bool first_row, int experts, int topk, const char* phases) const {
    if (!first_row || blockIdx.x != 0 || threadIdx.x != 0) return;
    if (atomicAdd(&route_trace_launches, 1u) % 256 != 128) return;
    printf("trace E=%d K=%d cycles (%s): %lld %lld %lld %lld %lld %lld %lld\n", experts, topk,
           phases, t[1] - t[0], t[2] - t[1], t[3] - t[2], t[4] - t[3], t[5] - t[4], t[6] - t[5],
           t[7] - t[6]);
  }
};
#else
struct RouteTrace {
  __device__ __forceinline__ void mark(int) {}
  __device__ __forceinline__ void mark_after(int, uint32_t) {}
  __device__ __forceinline__ void print(bool, int, int, const char*) const {}
};
#endif

enum class Mode : int {
  softmax_by_logit,  // softmax, renormalize, G == 1: rank by z, one exp per slot
  softmax_by_prob,   // other softmax cases: rank by p (v1; v2 ranks by z, see route_gpu_v2.cuh)
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
  int group_lanes_log2;      // v2: log2 of group_register_lanes (v2 serves only whole-lane groups)
  bool group_top2_sum;
  Mode mode;
  float softcap;
  bool renormalize;
  float routed_scaling_factor;
  bool apply_scaling_on_output;
  bool logits_bf16;          // 16-bit logits: bf16 (else f16)
  bool logits_vector_loads;  // rows (and the pointer) are aligned for the chunk's vector load
  bool bias_vector_loads;
  bool bias_before_wait;  // v3, v5: the bias loads before the wait (OpOptions::static_weights)
  int block_warps;        // v3: warps per block of the launch (kWarpsPerBlock or fewer)
  bool tree_denominator;  // v3 softmax by p: lane sums and a butterfly (an experiment)
  bool early_terms;       // v3 softmax by p: start the ordered denominator beside the sort
};

// Waits for the previous grid (programmatic dependent launch) after reading one word of every 16
// bytes of the launch arguments (vendor::wait_for_previous_grid_after: their constant-cache misses
// then overlap the previous grid; ncu counted ~0.8 stall cycles per issued instruction on them at
// decode, Kimi-K2, 2 tokens). MOEKIT_ROUTE_NO_ARG_TOUCH (compile time) leaves the reads out, to
// measure them.
__device__ __forceinline__ void read_args_then_wait(const RouteArgs& a) {
#ifndef MOEKIT_ROUTE_NO_ARG_TOUCH
  static_assert(sizeof(RouteArgs) <= 176, "touch a word of every 16 bytes of the arguments");
  const auto word = [](auto v) { return static_cast<uint32_t>(v); };
  vendor::wait_for_previous_grid_after(
      word(reinterpret_cast<uintptr_t>(a.logits)) ^ word(a.bias_type) ^ word(a.weights_row_stride) ^
      word(a.ids_row_stride) ^ word(a.ids_i64) ^ word(a.num_tokens) ^ word(a.num_experts) ^
      word(a.num_groups) ^ word(a.topk_groups) ^ word(a.group_register_lanes) ^
      word(a.group_scan_per_lane) ^ word(a.group_lanes_log2) ^ word(a.mode) ^ word(a.renormalize) ^
      word(a.block_warps) ^ word(a.early_terms));
#else
  vendor::wait_for_previous_grid();
#endif
}

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

// The kBytes bytes at p (aligned to min(kBytes, 16), or to 8 for 24) as 32-bit words: 16-byte
// vector loads, 8-byte loads for 8 or 24 bytes, or one 4-byte load.
template <int kBytes>
__device__ __forceinline__ void load_words(const char* p, uint32_t (&words)[kBytes / 4]) {
  if constexpr (kBytes % 16 == 0) {
#pragma unroll
    for (int i = 0; i < kBytes / 16; ++i) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(p) + i);
      words[4 * i] = v.x, words[4 * i + 1] = v.y, words[4 * i + 2] = v.z, words[4 * i + 3] = v.w;
    }
  } else if constexpr (kBytes % 8 == 0) {  // (24 bytes: a lane of 12 16-bit logits)
#pragma unroll
    for (int i = 0; i < kBytes / 8; ++i) {
      const uint2 v = __ldg(reinterpret_cast<const uint2*>(p) + i);
      words[2 * i] = v.x, words[2 * i + 1] = v.y;
    }
  } else {
    static_assert(kBytes == 4, "chunks are 4, 8 or a multiple of 16 bytes");
    words[0] = __ldg(reinterpret_cast<const unsigned int*>(p));
  }
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
    load_words<kBytes>(p, words);
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

// The sum of lanes 0 .. kSlots - 1's weights in slot order, the reference's order (every lane the
// same bits; lanes past the routed slots hold +0, which changes no bit): the shuffles first, then
// the adds, so that the shuffles issue back to back.
template <int kSlots>
__device__ __forceinline__ float slot_order_sum(float weight) {
  float terms[kSlots];
#pragma unroll
  for (int k = 0; k < kSlots; ++k) terms[k] = vendor::shfl(weight, k);
  float sum = 0.0f;
#pragma unroll
  for (int k = 0; k < kSlots; ++k) sum += terms[k];
  return sum;
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

// A padding row (past num_valid_tokens): ids -1, weights 0 in the slots lane r holds (r,
// r + kRowLanes, ...: kSlots of them). in_range: the row exists (a warp's last rows may not).
template <int kSlots, int kRowLanes>
__device__ __forceinline__ void store_padding_slots(const RouteArgs& a, int64_t row, int r,
                                                    bool in_range = true) {
#pragma unroll
  for (int q = 0; q < kSlots; ++q) {
    const int slot = r + q * kRowLanes;
    if (in_range && slot < a.topk) store_slot(a, row, slot, 0.0f, -1);
  }
}

// Steps 5-7 of spec/routing.md for one slot, then the store: a fused shared slot (slot >= Kr) gets
// id E + (slot - Kr) and the weight routed_sum / rsf; then renormalization and scaling. Every
// kernel finishes its slots here, so their bits agree.
__device__ __forceinline__ void finish_and_store_slot(const RouteArgs& a, int64_t row, int slot,
                                                      float weight, int64_t id, float routed_sum) {
  if (slot >= a.num_routed) {  // fused shared expert
    id = a.num_experts + (slot - a.num_routed);
    weight = routed_sum / a.routed_scaling_factor;
  }
  if (a.renormalize && routed_sum > 0.0f) weight = weight / routed_sum;
  if (a.apply_scaling_on_output) weight = __fmul_rn(weight, a.routed_scaling_factor);
  store_slot(a, row, slot, weight, id);
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

// The rank of group g among the row's num_groups by score (higher first, ties to the lower group
// id: the contract's rule), where the lanes of a row hold their group's score in runs of
// 1 << log2_run lanes: num_groups shuffles, issued 8 at a time. RowLanes: v2's or v3's row of
// lanes.
template <class RowLanes>
__device__ __forceinline__ int group_rank(const RowLanes& row_lanes, float score, int num_groups,
                                          int g, int log2_run) {
  int rank = 0;
  for (int h0 = 0; h0 < num_groups; h0 += 8) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int h = h0 + j;
      const float other = row_lanes.shfl(score, h << log2_run);
      // Bitwise, not short-circuit: no branch between the shuffles.
      rank += (h < num_groups) & ((other > score) | ((other == score) & (h < g)));
    }
  }
  return rank;
}

}  // namespace moekit::gpu::route_detail
