// GPU routing: spec/routing.md on one warp per token row, every valid call (E 1..2048, K 1..64,
// G 1..64, all scorings and dtypes) served by one kernel template (v1), and the faster v2 kernels
// where they serve.
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
//
// v5 (route_gpu_v5.cuh) serves sigmoid rows in whole warps with 32-bit keys (grouped at every batch
// size, ungrouped at decode sizes), v6 (route_gpu_v6.cuh) softmax rows of 16-bit logits without
// bias in whole warps (up to 1024 or 4096 tokens; 16 experts per lane and DeepSeek-V2 at every
// size), v4 (route_gpu_v4.cuh) long batches of grouped sigmoid rows where v5 is switched off, v3
// (route_gpu_v3.cuh) softmax without softcap and sigmoid, E <= 512 (grouped: E <= 256 in groups of
// whole lanes, not softmax with top2_sum), where it was measured faster; v2 (route_gpu_v2.cuh)
// what it can of the rest (groups of whole lanes), this kernel everything else.
// route_gpu_kernels.cuh says how to pick or switch off each (MOEKIT_GPU_ROUTE_V1=1,
// MOEKIT_GPU_ROUTE_V2_OFF, MOEKIT_GPU_ROUTE_V3_OFF=1).
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "core/env_switch.h"
#include "gpu/gpu_check.h"
#include "gpu/gpu_runtime.h"
#include "gpu/route_gpu.h"
#include "gpu/route_gpu_common.cuh"
#include "gpu/route_gpu_kernels.cuh"
#include "gpu/route_gpu_v2.cuh"
#include "gpu/route_gpu_v3.cuh"
#include "gpu/route_gpu_v4.cuh"
#include "gpu/route_gpu_v5.cuh"
#include "gpu/route_gpu_v6.cuh"
#include "gpu/vendor.h"

namespace moekit::gpu {
namespace route_detail {

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
  read_args_then_wait(a);
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
      store_padding_slots<kSlots, kLanes>(a, row, r);
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
          // The numerators correctly rounded (through double), as the reference's expf gives them
          // all but never: with K up to 64 slots a shared slot sums the routed weights, and where
          // many experts share a logit (saturated inputs) expf's deterministic error of up to
          // 2 ulp repeats in every one of them and adds up past the contract's 1e-6.
#pragma unroll
          for (int i = 0; i < kVpl; ++i)
            value[i] = key[i] != kNoKey ? static_cast<float>(exp(static_cast<double>(value[i] - m)))
                                        : 0.0f;
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
      finish_and_store_slot(a, row, slot, weight[q], slot_id[q], routed_sum);
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

// ---- v2 (route_gpu_v2.cuh): one instance per logits storage, lanes per row, experts per lane
// and mode.

constexpr int kV2MaxExperts = 512;
constexpr int kHalfWarpMaxExperts = 256;
constexpr int kHalfWarpMaxTopk = 32;  // two slots per lane of a 16-lane row

// How a v2 kernel lays out a row: lanes per row (32, or 16 for two rows per warp) and experts per
// lane.
struct V2Shape {
  int row_lanes;
  int experts_per_lane;
};

template <class Logits, int kVpl, int kRowLanes>
Layout v2_instance(Mode mode) {
  constexpr int kV = v2_chunk<Logits, kVpl>();
  switch (mode) {
    case Mode::softmax_by_logit:
      return {kV, kVpl / kV, route_rows_v2_kernel<Logits, kVpl, Mode::softmax_by_logit, kRowLanes>};
    case Mode::softmax_by_prob:
      return {kV, kVpl / kV, route_rows_v2_kernel<Logits, kVpl, Mode::softmax_by_prob, kRowLanes>};
    default:
      return {kV, kVpl / kV, route_rows_v2_kernel<Logits, kVpl, Mode::sigmoid, kRowLanes>};
  }
}

// Experts per lane: the fewest that hold E in the row's lanes; whole warps take 1, 2, 4, 5, 8, 12
// or 16 (160 and 384 fill every lane), half warps 8 or 16.
int v2_experts_per_lane(int num_experts, int row_lanes) {
  if (row_lanes == kLanes) {
    for (int vpl : {1, 2, 4, 5, 8, 12, 16})
      if (num_experts <= kLanes * vpl) return vpl;
  } else {
    for (int vpl : {8, 16})
      if (num_experts <= row_lanes * vpl) return vpl;
  }
  return 0;
}

template <class Logits>
Layout v2_layout(V2Shape shape, Mode mode) {
  if (shape.row_lanes != kLanes)
    return shape.experts_per_lane == 8 ? v2_instance<Logits, 8, 16>(mode)
                                       : v2_instance<Logits, 16, 16>(mode);
  switch (shape.experts_per_lane) {
    case 1:
      return v2_instance<Logits, 1, 32>(mode);
    case 2:
      return v2_instance<Logits, 2, 32>(mode);
    case 4:
      return v2_instance<Logits, 4, 32>(mode);
    case 5:
      return v2_instance<Logits, 5, 32>(mode);
    case 8:
      return v2_instance<Logits, 8, 32>(mode);
    case 12:
      return v2_instance<Logits, 12, 32>(mode);
    default:
      return v2_instance<Logits, 16, 32>(mode);
  }
}

Mode mode_of(const RouteProblem& p) {
  switch (p.scoring) {
    case Scoring::softmax:
      return p.renormalize && p.num_groups == 1 ? Mode::softmax_by_logit : Mode::softmax_by_prob;
    case Scoring::sigmoid:
      return Mode::sigmoid;
    case Scoring::sqrtsoftplus:
      break;
  }
  return Mode::sqrt_softplus;
}

// Softmax by p with fused shared slots and no renormalization: each shared slot holds the sum of
// the Kr routed weights, undivided, and expf's deterministic error (up to 2 ulp, the same in every
// expert of a tied logit) adds up there. Seen past the contract's 1e-6: E=60, Kr=30, S=2, logits in
// {-1, 0, 1}, 1.013e-6 (docs/perf/routing.md, session 13). v2, v3 and v6 decline such calls, and
// v1 takes them: it rounds numerators correctly. No model of the table routes this way; a runtime
// switch in v2 and v3 made the unnormalized softmax rows 4-7 % slower (session 14).
bool needs_exact_numerators(const RouteProblem& p) {
  return mode_of(p) == Mode::softmax_by_prob && p.num_shared > 0 && !p.renormalize;
}
constexpr const char* exact_numerators_why =
    "softmax by p with fused shared slots, not renormalized (expf's error adds up in the shared "
    "slots: v1 rounds numerators correctly)";

bool is_power_of_two(int x) { return x > 0 && (x & (x - 1)) == 0; }

int log2_of(int power_of_two) {
  int log2 = 0;
  while ((1 << log2) < power_of_two) ++log2;
  return log2;
}

// With groups, each group must be a power-of-two run of whole lanes of a full row.
bool groups_are_whole_lanes(const RouteProblem& p, V2Shape shape) {
  if (p.num_groups == 1) return true;
  const int vpl = shape.experts_per_lane, EPG = p.experts_per_group();
  return p.num_experts == shape.row_lanes * vpl && EPG % vpl == 0 && is_power_of_two(EPG / vpl);
}

std::string v2_declines(const RouteProblem& p) {
  const DType dtype = p.logits.dtype();
  if (dtype != DType::f32 && dtype != DType::f16 && dtype != DType::bf16)
    return "logits dtype " + std::string(dtype_name(dtype));
  if (p.scoring == Scoring::sqrtsoftplus) return "sqrtsoftplus scoring";
  if (p.softcap > 0.0f) return "softcap";
  if (p.num_experts > kV2MaxExperts)
    return "E=" + std::to_string(p.num_experts) + " > " + std::to_string(kV2MaxExperts);
  if (needs_exact_numerators(p)) return exact_numerators_why;
  if (!groups_are_whole_lanes(p, {kLanes, v2_experts_per_lane(p.num_experts, kLanes)}))
    return "groups of " + std::to_string(p.experts_per_group()) +
           " experts are not whole runs of lanes (" +
           std::to_string(v2_experts_per_lane(p.num_experts, kLanes)) + " experts per lane)";
  return "";
}

// Two rows per warp (16 lanes each) where v2 serves and the shape fits: E <= 256, K <= 32, groups
// of whole lanes.
bool half_warp_fits(const RouteProblem& p) {
  if (p.num_experts > kHalfWarpMaxExperts || p.topk > kHalfWarpMaxTopk) return false;
  const V2Shape half{kLanes / 2, v2_experts_per_lane(p.num_experts, kLanes / 2)};
  return groups_are_whole_lanes(p, half);
}

// The environment switches, read once: MOEKIT_GPU_ROUTE_V1=1 forces v1; MOEKIT_GPU_ROUTE_V2_OFF
// lists the v2 cases to leave to v1 (logit, prob, sigmoid, grouped), and halfwarp keeps every v2
// call on whole-warp rows.
struct V2Switches {
  bool all_v1 = false;
  bool off_logit = false, off_prob = false, off_sigmoid = false, off_grouped = false;
  bool off_half_warp = false;
};

const V2Switches& v2_switches() {
  static const V2Switches switches = [] {
    V2Switches s;
    s.all_v1 = env::is("MOEKIT_GPU_ROUTE_V1", "1");
    // Split the comma-separated list into its names.
    std::vector<std::string> names(1);
    for (const char c : env::text("MOEKIT_GPU_ROUTE_V2_OFF")) {
      if (c == ',')
        names.emplace_back();
      else
        names.back().push_back(c);
    }
    auto listed = [&](const char* name) {
      return std::find(names.begin(), names.end(), name) != names.end();
    };
    s.off_logit = listed("logit");
    s.off_prob = listed("prob");
    s.off_sigmoid = listed("sigmoid");
    s.off_grouped = listed("grouped");
    s.off_half_warp = listed("halfwarp");
    return s;
  }();
  return switches;
}

// Whether the environment leaves this (v2-servable) problem to v1.
bool v2_switched_off(const RouteProblem& p) {
  const V2Switches& s = v2_switches();
  if (s.all_v1 || (s.off_grouped && p.num_groups > 1)) return true;
  switch (mode_of(p)) {
    case Mode::softmax_by_logit:
      return s.off_logit;
    case Mode::softmax_by_prob:
      return s.off_prob;
    case Mode::sigmoid:
      return s.off_sigmoid;
    default:
      return true;
  }
}

const char* mode_name(Mode mode) {
  switch (mode) {
    case Mode::softmax_by_logit:
      return "softmax by logit";
    case Mode::softmax_by_prob:
      return "softmax by p";
    case Mode::sigmoid:
      return "sigmoid";
    case Mode::sqrt_softplus:
      return "sqrtsoftplus";
  }
  return "?";
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

// The launch arguments every kernel shares; `chunk` is the kernel's experts per vector load.
RouteArgs common_args(const RouteProblem& p, int chunk) {
  RouteArgs a{};
  a.block_warps = kWarpsPerBlock;
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
  a.num_experts = p.num_experts;
  a.topk = p.topk;
  a.num_routed = p.num_routed;
  a.num_groups = p.num_groups;
  a.topk_groups = p.topk_groups;
  a.experts_per_group = p.experts_per_group();
  a.group_magic = ((uint64_t{1} << 32) + a.experts_per_group - 1) / a.experts_per_group;
  a.group_top2_sum = p.group_score == GroupScore::top2_sum;
  a.mode = mode_of(p);
  a.softcap = p.softcap;
  a.renormalize = p.renormalize;
  a.routed_scaling_factor = p.routed_scaling_factor;
  a.apply_scaling_on_output = p.apply_scaling_on_output;
  a.logits_bf16 = p.logits.dtype() == DType::bf16;
  a.logits_vector_loads = vector_loads_ok(a.logits, p.num_tokens > 1 ? a.logits_row_stride : 0,
                                          dtype_size(p.logits.dtype()), chunk);
  a.bias_vector_loads =
      a.bias != nullptr && vector_loads_ok(a.bias, 0, dtype_size(p.bias.dtype()), chunk);
  a.bias_before_wait = p.static_bias;
  return a;
}

void launch_rows(const RouteProblem& p, KernelFn kernel, size_t scratch_bytes, const RouteArgs& a,
                 int rows_per_warp = 1) {
  const int device = p.logits.device().index;
  DeviceGuard on_device(device);
  const int64_t rows_per_block = static_cast<int64_t>(kWarpsPerBlock) * rows_per_warp;
  const int64_t blocks_needed = (p.num_tokens + rows_per_block - 1) / rows_per_block;
  const int64_t block_cap = static_cast<int64_t>(device_properties(device).sm_count) * kBlocksPerSm;
  const auto blocks = static_cast<unsigned>(std::min(blocks_needed, block_cap));
  const auto stream = static_cast<cudaStream_t>(p.stream);
  MOEKIT_GPU_CHECK(vendor::launch(kernel, dim3(blocks), dim3(kThreadsPerBlock), scratch_bytes,
                                  stream, programmatic_launch_allowed(device), a));
}

void route_v1(const RouteProblem& p) {
  const int E = p.num_experts;
  const Layout layout = pick_layout(p);
  RouteArgs a = common_args(p, layout.v);

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
  launch_rows(p, layout.kernel, scratch_bytes, a);
}

// Half-warp rows pay off once the batch has rows enough to keep every SM busy with half as many
// warps; shorter batches (decode) keep the shortest chain, one row per warp.
constexpr int kHalfWarpMinRowsPerSm = 32;

// Where two rows per warp pays (H200, docs/perf/routing.md v2): ungrouped rows of 8 experts per
// half-warp lane (E = 113..128: Qwen3's 128 experts, 16384 tokens 13.1 -> 12.2 us). With fewer
// experts per lane the pairing costs more than it saves (E=64: 8.0 -> 11.4 us at 8192 tokens),
// with 16 (E=256) the kernel spills (Qwen3.5 9.0 -> 11.2 us, DeepSeek-V3 13.7 -> 15.4 us).
bool half_warp_pays(const RouteProblem& p) {
  return p.num_groups <= 1 && v2_experts_per_lane(p.num_experts, kLanes / 2) == 8;
}

// The row layout of a v2 launch: `kernel` is v2 (automatic), v2_whole_warp or v2_half_warp.
V2Shape v2_shape(const RouteProblem& p, RouteKernel kernel) {
  bool half = kernel == RouteKernel::v2_half_warp;
  if (kernel == RouteKernel::v2) {
    const int sm_count = device_properties(p.logits.device().index).sm_count;
    half = half_warp_fits(p) && half_warp_pays(p) && !v2_switches().off_half_warp &&
           p.num_tokens >= static_cast<int64_t>(kHalfWarpMinRowsPerSm) * sm_count;
  }
  const int row_lanes = half ? kLanes / 2 : kLanes;
  return {row_lanes, v2_experts_per_lane(p.num_experts, row_lanes)};
}

// v2, for a problem v2_declines() accepts (and half_warp_fits() for half-warp rows).
void route_v2(const RouteProblem& p, V2Shape shape) {
  const Mode mode = mode_of(p);
  const Layout layout = p.logits.dtype() == DType::f32    ? v2_layout<LogitsF32>(shape, mode)
                        : p.logits.dtype() == DType::bf16 ? v2_layout<LogitsBf16>(shape, mode)
                                                          : v2_layout<LogitsF16>(shape, mode);
  RouteArgs a = common_args(p, layout.v);
  if (p.num_groups > 1) {
    a.group_register_lanes = a.experts_per_group / shape.experts_per_lane;
    a.group_lanes_log2 = log2_of(a.group_register_lanes);
  }
  // Softmax by p stages the denominator's terms: one float per expert slot of the warp's rows.
  const size_t scratch_bytes =
      mode == Mode::softmax_by_prob
          ? sizeof(float) * kLanes * static_cast<size_t>(shape.experts_per_lane) * kWarpsPerBlock
          : 0;
  const int rows_per_warp = kLanes / shape.row_lanes;
  launch_rows(p, layout.kernel, scratch_bytes, a, rows_per_warp);
}

// ---- v3 (route_gpu_v3.cuh): ungrouped rows with packed unique keys and sorted lanes.

constexpr int kV3MaxExperts = 512;

// How a v3 launch lays out a row: lanes per row (32, 16, 8 or 4), experts per lane (1, 2, 4, 5,
// 8, 12 or 16), the key width and the sort.
struct V3Shape {
  int row_lanes;
  int experts_per_lane;
  bool wide_keys;
  bool top_only;     // lanes sort only their top few keys (12 or 16 per lane)
  bool vote_rounds;  // sigmoid, 64-bit keys, whole warps: rounds reduce the score and vote
};

// 32-bit keys hold the score exactly where it is a 16-bit logit: bf16 / f16 logits, softmax, no
// bias (then z = x). Everything else takes 64-bit keys.
bool v3_narrow_keys(const RouteProblem& p) {
  const DType dtype = p.logits.dtype();
  return (dtype == DType::bf16 || dtype == DType::f16) && p.scoring == Scoring::softmax &&
         !p.has_bias();
}

int v3_experts_per_lane(int num_experts, int row_lanes);

// Grouped routing in v3: whole-warp rows of at most 8 experts per lane (E <= 256), each group a
// power-of-two run of whole lanes, sigmoid (either group score) or softmax with group score max
// (softmax's top2_sum sums p, which z does not order: v2 serves it).
constexpr int kV3GroupedMaxExpertsPerLane = 8;

std::string v3_declines_groups(const RouteProblem& p) {
  const std::string grouped = "grouped routing (G=" + std::to_string(p.num_groups) + ")";
  const int vpl = v3_experts_per_lane(p.num_experts, kLanes);
  if (vpl == 0 || vpl > kV3GroupedMaxExpertsPerLane)
    return grouped + " with E=" + std::to_string(p.num_experts) + " > " +
           std::to_string(kLanes * kV3GroupedMaxExpertsPerLane);
  const int EPG = p.experts_per_group();
  if (EPG % vpl != 0 || !is_power_of_two(EPG / vpl))
    return grouped + ": groups of " + std::to_string(EPG) +
           " experts are not whole runs of lanes (" + std::to_string(vpl) + " experts per lane)";
  if (p.scoring == Scoring::softmax && p.group_score == GroupScore::top2_sum)
    return grouped + ": softmax with top2_sum group scores";
  return "";
}

std::string v3_declines(const RouteProblem& p) {
  const DType dtype = p.logits.dtype();
  if (dtype != DType::f32 && dtype != DType::f16 && dtype != DType::bf16)
    return "logits dtype " + std::string(dtype_name(dtype));
  if (p.scoring == Scoring::sqrtsoftplus) return "sqrtsoftplus scoring";
  if (p.softcap > 0.0f) return "softcap";
  if (p.num_experts > kV3MaxExperts)
    return "E=" + std::to_string(p.num_experts) + " > " + std::to_string(kV3MaxExperts);
  if (needs_exact_numerators(p)) return exact_numerators_why;
  if (p.num_groups > 1) return v3_declines_groups(p);
  return "";
}

// The fewest experts per lane that hold E in `row_lanes` lanes, 0 past 16: whole warps take 1, 2,
// 4, 5, 8, 12 or 16 (160 and 384 experts fill every lane), smaller rows 4, 8 or 16 (fewer would
// leave most of the row's lanes idle).
int v3_experts_per_lane(int num_experts, int row_lanes) {
  if (row_lanes == kLanes) {
    for (int vpl : {1, 2, 4, 5, 8, 12, 16})
      if (num_experts <= kLanes * vpl) return vpl;
    return 0;
  }
  for (int vpl : {4, 8, 16})
    if (num_experts <= row_lanes * vpl) return vpl;
  return 0;
}

// Whether rows of `row_lanes` lanes serve the problem (given that v3 does): whole warps always;
// smaller rows with 32-bit keys (the only instances built), E <= 16 per lane and K <= 2 per lane.
bool v3_row_lanes_fit(const RouteProblem& p, int row_lanes) {
  if (row_lanes == kLanes) return true;
  if (row_lanes != 16 && row_lanes != 8 && row_lanes != 4) return false;
  if (p.num_groups > 1) return false;  // grouped instances: whole warps only
  return v3_narrow_keys(p) && v3_experts_per_lane(p.num_experts, row_lanes) != 0 &&
         p.topk <= 2 * row_lanes;
}

template <class Logits, int kVpl, int kRowLanes, bool kWide, bool kTopOnly>
Layout v3_instance(Mode mode, bool vote_rounds) {
  using ChunkLogits =
      std::conditional_t<sizeof(typename Logits::Storage) == 2, LogitsBf16, LogitsF32>;
  constexpr int kV = v2_chunk<ChunkLogits, kVpl>();
  switch (mode) {
    case Mode::softmax_by_logit:
      return {
          kV, kVpl / kV,
          route_rows_v3_kernel<Logits, kVpl, Mode::softmax_by_logit, kRowLanes, kWide, kTopOnly>};
    case Mode::softmax_by_prob:
      return {
          kV, kVpl / kV,
          route_rows_v3_kernel<Logits, kVpl, Mode::softmax_by_prob, kRowLanes, kWide, kTopOnly>};
    default:
      if constexpr (kWide && kRowLanes == kLanes) {
        if (vote_rounds)
          return {kV, kVpl / kV,
                  route_rows_v3_kernel<Logits, kVpl, Mode::sigmoid, kRowLanes, true, kTopOnly,
                                       false, true>};
      }
      if constexpr (kWide)
        return {kV, kVpl / kV,
                route_rows_v3_kernel<Logits, kVpl, Mode::sigmoid, kRowLanes, true, kTopOnly>};
      break;
  }
  fail("route", "mode", mode_name(mode), "has no 32-bit-key v3 kernel");
}

// Grouped instances: whole warps, full sorts, softmax by p or sigmoid (sigmoid: 64-bit keys).
template <class Logits, int kVpl, bool kWide>
Layout v3_grouped_instance(Mode mode, bool vote_rounds) {
  using ChunkLogits =
      std::conditional_t<sizeof(typename Logits::Storage) == 2, LogitsBf16, LogitsF32>;
  constexpr int kV = v2_chunk<ChunkLogits, kVpl>();
  if (mode == Mode::softmax_by_prob)
    return {kV, kVpl / kV,
            route_rows_v3_kernel<Logits, kVpl, Mode::softmax_by_prob, kLanes, kWide, false, true>};
  if constexpr (kWide) {
    if (mode == Mode::sigmoid && vote_rounds)
      return {kV, kVpl / kV,
              route_rows_v3_kernel<Logits, kVpl, Mode::sigmoid, kLanes, true, false, true, true>};
    if (mode == Mode::sigmoid)
      return {kV, kVpl / kV,
              route_rows_v3_kernel<Logits, kVpl, Mode::sigmoid, kLanes, true, false, true>};
  }
  fail("route", "mode", mode_name(mode), "has no grouped v3 kernel with these keys");
}

template <class Logits, bool kWide>
Layout v3_grouped_layout(V3Shape shape, Mode mode) {
  switch (shape.experts_per_lane) {
    case 1:
      return v3_grouped_instance<Logits, 1, kWide>(mode, shape.vote_rounds);
    case 2:
      return v3_grouped_instance<Logits, 2, kWide>(mode, shape.vote_rounds);
    case 4:
      return v3_grouped_instance<Logits, 4, kWide>(mode, shape.vote_rounds);
    case 5:
      return v3_grouped_instance<Logits, 5, kWide>(mode, shape.vote_rounds);
    case 8:
      return v3_grouped_instance<Logits, 8, kWide>(mode, shape.vote_rounds);
    default:
      break;
  }
  fail("route", "experts_per_lane", std::to_string(shape.experts_per_lane),
       "has no grouped v3 kernel");
}

// 12 or 16 experts per lane come in two sorts (all keys, or only the top few); fewer take all.
template <class Logits, int kVpl, int kRowLanes, bool kWide>
Layout v3_sorted(V3Shape shape, Mode mode) {
  if constexpr (kVpl > 8) {
    if (shape.top_only)
      return v3_instance<Logits, kVpl, kRowLanes, kWide, true>(mode, shape.vote_rounds);
  }
  return v3_instance<Logits, kVpl, kRowLanes, kWide, false>(mode, shape.vote_rounds);
}

template <class Logits, int kRowLanes, bool kWide>
Layout v3_by_experts_per_lane(V3Shape shape, Mode mode) {
  switch (shape.experts_per_lane) {
    case 1:
      if constexpr (kRowLanes == kLanes) return v3_sorted<Logits, 1, kRowLanes, kWide>(shape, mode);
      break;
    case 2:
      if constexpr (kRowLanes == kLanes) return v3_sorted<Logits, 2, kRowLanes, kWide>(shape, mode);
      break;
    case 4:
      return v3_sorted<Logits, 4, kRowLanes, kWide>(shape, mode);
    case 5:
      if constexpr (kRowLanes == kLanes) return v3_sorted<Logits, 5, kRowLanes, kWide>(shape, mode);
      break;
    case 8:
      return v3_sorted<Logits, 8, kRowLanes, kWide>(shape, mode);
    case 12:
      if constexpr (kRowLanes == kLanes)
        return v3_sorted<Logits, 12, kRowLanes, kWide>(shape, mode);
      break;
    case 16:
      return v3_sorted<Logits, 16, kRowLanes, kWide>(shape, mode);
    default:
      break;
  }
  fail("route", "experts_per_lane", std::to_string(shape.experts_per_lane), "has no v3 kernel");
}

Layout v3_layout(const RouteProblem& p, V3Shape shape) {
  const Mode mode = mode_of(p);
  if (p.num_groups > 1) {
    if (!shape.wide_keys) return v3_grouped_layout<V3Logits16, false>(shape, mode);
    if (p.logits.dtype() == DType::f32) return v3_grouped_layout<V3LogitsF32, true>(shape, mode);
    return v3_grouped_layout<V3Logits16, true>(shape, mode);
  }
  if (shape.wide_keys) {
    if (p.logits.dtype() == DType::f32)
      return v3_by_experts_per_lane<V3LogitsF32, kLanes, true>(shape, mode);
    return v3_by_experts_per_lane<V3Logits16, kLanes, true>(shape, mode);
  }
  switch (shape.row_lanes) {
    case 4:
      return v3_by_experts_per_lane<V3Logits16, 4, false>(shape, mode);
    case 8:
      return v3_by_experts_per_lane<V3Logits16, 8, false>(shape, mode);
    case 16:
      return v3_by_experts_per_lane<V3Logits16, 16, false>(shape, mode);
    default:
      return v3_by_experts_per_lane<V3Logits16, kLanes, false>(shape, mode);
  }
}

// The environment switches of v3, read once: MOEKIT_GPU_ROUTE_V3_OFF=1 leaves every call to v2 /
// v1; for measuring v3's variants against each other, MOEKIT_GPU_ROUTE_V3_LANES=32|16|8|4 makes
// automatic calls use that many lanes per row wherever it fits (and v3 wherever it serves), and
// MOEKIT_GPU_ROUTE_V3_SORT=full|top their lanes sort all their keys or only the top few.
struct V3Switches {
  bool off = false;
  bool off_grouped = false;  // MOEKIT_GPU_ROUTE_V3_OFF=grouped: grouped routing stays on v2
  int row_lanes = 0;         // 0: the measured rule
  int top_only = -1;         // -1: the measured rule
  int vote_rounds = -1;      // -1: the measured rule
  int block_warps = 0;       // 0: kWarpsPerBlock
  bool tree_denominator = false;
  int early_terms = -1;  // -1: the measured rule
};

const V3Switches& v3_switches() {
  static const V3Switches switches = [] {
    V3Switches s;
    s.off = env::is("MOEKIT_GPU_ROUTE_V3_OFF", "1");
    s.off_grouped = env::is("MOEKIT_GPU_ROUTE_V3_OFF", "grouped");
    s.row_lanes = env::integer("MOEKIT_GPU_ROUTE_V3_LANES", 0);
    s.top_only = env::choice("MOEKIT_GPU_ROUTE_V3_SORT", "top", "full");
    s.tree_denominator = env::is("MOEKIT_GPU_ROUTE_V3_DENOMINATOR", "tree");
    s.early_terms = env::choice("MOEKIT_GPU_ROUTE_V3_EARLY_TERMS");
    const int w = env::integer("MOEKIT_GPU_ROUTE_V3_BLOCK_WARPS", 0);
    s.block_warps = w == 1 || w == 2 || w == 4 ? w : 0;
    s.vote_rounds = env::choice("MOEKIT_GPU_ROUTE_V3_ROUNDS", "vote", "reduce");
    return s;
  }();
  return switches;
}

// The automatic choice, from measurements of every layout and sort at every token count of the
// model table (H200, 132 SMs; docs/perf/routing.md, v3). Rows below 32 lanes pay once the batch
// keeps the SMs busy with fewer warps: from 16 rows per SM, rows of 8 lanes or more (at most 4 rows
// per warp); from 96 rows per SM, the fewest lanes that fit (8 rows per warp for E <= 64). Below
// 16 rows per SM (decode) whole warps keep the shortest chain, except for tiny rows (E <= 16),
// where 8 rows per warp won from 64 tokens (Mixtral).
constexpr int kV3SmallRowsMinRowsPerSm = 16;
constexpr int kV3FewestLanesMinRowsPerSm = 96;
constexpr int kV3TinyRowMaxExperts = 16;
constexpr int64_t kV3TinyRowsMinTokens = 64;
// Lanes of 12 or 16 experts sort only their top keys (fewer instructions, more registers) from
// 1024 tokens in whole warps (Qwen3-Next 3.00 vs 3.11 us at 1024 tokens, 2.27 vs 2.34 at 1) and
// from 48 rows per SM below (Qwen3.5 at 8192 tokens: 5.64 vs 7.24 us; at 4096: 4.69 vs 4.18).
constexpr int64_t kV3TopOnlyWholeWarpMinTokens = 1024;
constexpr int kV3TopOnlySmallRowsMinRowsPerSm = 48;

// The fewest lanes per row, at least `min_lanes`, that serve the problem.
int v3_fewest_row_lanes(const RouteProblem& p, int min_lanes) {
  for (int lanes : {4, 8, 16})
    if (lanes >= min_lanes && v3_row_lanes_fit(p, lanes)) return lanes;
  return kLanes;
}

int v3_automatic_row_lanes(const RouteProblem& p) {
  const int forced = v3_switches().row_lanes;
  if (forced != 0) return v3_row_lanes_fit(p, forced) ? forced : kLanes;
  const int64_t sm_count = device_properties(p.logits.device().index).sm_count;
  const int64_t T = p.num_tokens;
  if (p.num_experts <= kV3TinyRowMaxExperts && T >= kV3TinyRowsMinTokens)
    return v3_fewest_row_lanes(p, 4);
  if (T < kV3SmallRowsMinRowsPerSm * sm_count) return kLanes;
  if (T >= kV3FewestLanesMinRowsPerSm * sm_count) return v3_fewest_row_lanes(p, 4);
  return v3_fewest_row_lanes(p, 8);
}

// Whether the automatic choice sorts only the top keys of each lane (where there are 12 or 16).
bool v3_automatic_top_only(const RouteProblem& p, int row_lanes) {
  const int forced = v3_switches().top_only;
  if (forced >= 0) return forced == 1;
  if (row_lanes == kLanes) return p.num_tokens >= kV3TopOnlyWholeWarpMinTokens;
  const int64_t sm_count = device_properties(p.logits.device().index).sm_count;
  return p.num_tokens >= kV3TopOnlySmallRowsMinRowsPerSm * sm_count;
}

// Sigmoid rows in whole warps: rounds by a reduction of the score and a ballot (vote) or by two
// reductions (reduce). MOEKIT_GPU_ROUTE_V3_ROUNDS=vote|reduce forces one. Measured (H200,
// docs/perf/routing.md, v3 with groups): vote won below 1024 tokens (DeepSeek-V3 2.56 -> 2.48 us
// at 1 token, 2.72 -> 2.64 at 64; Kimi-K2 3.51 -> 3.40 at 64; GLM-4.5 by 0.02) and lost from 4096
// (Kimi-K2 9.10 -> 9.19, DeepSeek-V3 at 8192 13.90 -> 14.45); at 1024 it was mixed.
constexpr int64_t kV3VoteRoundsMaxTokens = 1023;

bool v3_automatic_vote_rounds(const RouteProblem& p) {
  const int forced = v3_switches().vote_rounds;
  if (forced >= 0) return forced == 1;
  return p.num_tokens <= kV3VoteRoundsMaxTokens;
}

// Softmax by p: whether the ordered denominator starts beside the sort (RouteArgs::early_terms;
// MOEKIT_GPU_ROUTE_V3_EARLY_TERMS=1|0 forces it). Measured (H200, docs/perf/routing.md): it pays
// where the rounds (8 terms each) leave a tail to sum after them, in rows of 8 lanes or more:
// Qwen1.5 (60 experts, 4 routed) 2.07 -> 1.99 us at 1 token, 2.21 -> 2.12 at 64, 3.85 -> 3.72 at
// 8192 (8-lane rows), DeepSeek-V2 by 0.03-0.18 at every size; it lost where the rounds take every
// term (Qwen2, 64 experts, 8 routed: 2.13 -> 2.19 at 1 token) and in 4-lane rows (Qwen1.5 at
// 16384 tokens: 6.30 -> 6.76).
constexpr int kV3EarlyTermsMinRowLanes = 8;

bool v3_early_terms(const RouteProblem& p, V3Shape shape) {
  if (mode_of(p) != Mode::softmax_by_prob || v3_switches().tree_denominator) return false;
  const int forced = v3_switches().early_terms;
  if (forced >= 0) return forced == 1;
  const int terms4 = shape.row_lanes * shape.experts_per_lane / 4;  // float4s of terms per row
  return terms4 > 2 * p.num_routed && shape.row_lanes >= kV3EarlyTermsMinRowLanes;
}

// Warps per block of a v3 launch: kWarpsPerBlock, or what MOEKIT_GPU_ROUTE_V3_BLOCK_WARPS=1|2|4
// says (for measuring whether decode batches gain from more, smaller blocks).
int v3_block_warps(const RouteProblem& /*p*/) {
  const int forced = v3_switches().block_warps;
  return forced != 0 ? forced : kWarpsPerBlock;
}

// Wide keys (sigmoid, bias, f32) with 12 or more experts per lane lost to v2 at one token (Kimi-K2:
// 3.25 vs 3.10 us) and in long batches (8192 tokens: 15.8 vs 14.1 us; at 4096 v3 won, 9.06 vs
// 9.30): those stay on v2.
constexpr int64_t kV3WideManyExpertsMaxTokens = 4096;

// Grouped rows with wide keys (DeepSeek-V3) lost to v2 past 4096 tokens (8192: 13.90 vs 13.17 us;
// 16384: 26.74 vs 25.37) and won up to 4096 (7.62 vs 7.84; decode 2.56-2.72 vs 2.72-3.14).
constexpr int64_t kV3WideGroupedMaxTokens = 4096;

bool v3_prefers_v2(const RouteProblem& p) {
  if (v3_switches().row_lanes != 0) return false;  // measuring v3's layouts: v3 wherever it serves
  if (!v2_declines(p).empty() || v2_switched_off(p) || v3_narrow_keys(p)) return false;
  if (p.num_groups > 1) return p.num_tokens > kV3WideGroupedMaxTokens;
  const bool lost = p.num_tokens == 1 || p.num_tokens > kV3WideManyExpertsMaxTokens;
  return v3_experts_per_lane(p.num_experts, kLanes) >= 12 && lost;
}

int v3_row_lanes_of(RouteKernel kernel) {
  switch (kernel) {
    case RouteKernel::v3_lanes16:
    case RouteKernel::v3_full_sort_lanes16:
      return 16;
    case RouteKernel::v3_lanes8:
    case RouteKernel::v3_full_sort_lanes8:
      return 8;
    case RouteKernel::v3_lanes4:
    case RouteKernel::v3_full_sort_lanes4:
      return 4;
    default:
      return kLanes;
  }
}

bool is_v3(RouteKernel kernel) {
  switch (kernel) {
    case RouteKernel::v3:
    case RouteKernel::v3_lanes32:
    case RouteKernel::v3_lanes16:
    case RouteKernel::v3_lanes8:
    case RouteKernel::v3_lanes4:
    case RouteKernel::v3_full_sort_lanes32:
    case RouteKernel::v3_full_sort_lanes16:
    case RouteKernel::v3_full_sort_lanes8:
    case RouteKernel::v3_full_sort_lanes4:
    case RouteKernel::v3_vote_rounds:
      return true;
    default:
      return false;
  }
}

// The shape of a v3 launch: `kernel` is v3 (automatic) or one of v3_lanes*, v3_full_sort_lanes*.
V3Shape v3_shape(const RouteProblem& p, RouteKernel kernel) {
  const int lanes = kernel == RouteKernel::v3 ? v3_automatic_row_lanes(p) : v3_row_lanes_of(kernel);
  const int vpl = v3_experts_per_lane(p.num_experts, lanes);
  bool top_only = kernel == RouteKernel::v3
                      ? v3_automatic_top_only(p, lanes)
                      : kernel == RouteKernel::v3_lanes32 || kernel == RouteKernel::v3_lanes16 ||
                            kernel == RouteKernel::v3_lanes8 || kernel == RouteKernel::v3_lanes4 ||
                            kernel == RouteKernel::v3_vote_rounds;
  const bool vote = kernel == RouteKernel::v3 ? v3_automatic_vote_rounds(p)
                                              : kernel == RouteKernel::v3_vote_rounds;
  return {lanes, vpl, !v3_narrow_keys(p), top_only && vpl > 8,
          vote && lanes == kLanes && mode_of(p) == Mode::sigmoid};
}

// Launches `kernel` over the problem's rows with a grid of at most what is resident at once (no
// partial wave; the kernel walks the rows in a grid-stride loop).
void launch_resident_rows(const RouteProblem& p, KernelFn kernel, size_t scratch_bytes,
                          const RouteArgs& a, int rows_per_warp) {
  const int device = p.logits.device().index;
  DeviceGuard on_device(device);
  const int threads = a.block_warps * kLanes;
  const int64_t rows_per_block = static_cast<int64_t>(a.block_warps) * rows_per_warp;
  const int64_t blocks_needed = (p.num_tokens + rows_per_block - 1) / rows_per_block;
  const int64_t resident =
      static_cast<int64_t>(device_properties(device).sm_count) *
      resident_blocks_per_sm(reinterpret_cast<const void*>(kernel), threads, scratch_bytes, device);
  const auto blocks = static_cast<unsigned>(std::min(blocks_needed, resident));
  MOEKIT_GPU_CHECK(vendor::launch(kernel, dim3(blocks), dim3(threads), scratch_bytes,
                                  static_cast<cudaStream_t>(p.stream),
                                  programmatic_launch_allowed(device), a));
}

// v3, for a problem v3_declines() accepts, in a layout v3_row_lanes_fit() accepts.
void route_v3(const RouteProblem& p, V3Shape shape) {
  const Layout layout = v3_layout(p, shape);
  RouteArgs a = common_args(p, layout.v);
  a.block_warps = v3_block_warps(p);
  a.tree_denominator = v3_switches().tree_denominator;
  a.early_terms = v3_early_terms(p, shape);
  if (p.num_groups > 1) {
    a.group_register_lanes = a.experts_per_group / shape.experts_per_lane;
    a.group_lanes_log2 = log2_of(a.group_register_lanes);
  }
  const size_t scratch_bytes =
      a.mode == Mode::softmax_by_prob
          ? sizeof(float) * kLanes * static_cast<size_t>(shape.experts_per_lane) * a.block_warps
          : 0;
  launch_resident_rows(p, layout.kernel, scratch_bytes, a, kLanes / shape.row_lanes);
}

// ---- v4 (route_gpu_v4.cuh): grouped sigmoid rows, two lanes per group, 32-bit keys first.

// What v4 and v5 both need: f32 / f16 / bf16 logits and sigmoid scoring (empty when so).
std::string sigmoid_kernel_declines(const RouteProblem& p) {
  const DType dtype = p.logits.dtype();
  if (dtype != DType::f32 && dtype != DType::f16 && dtype != DType::bf16)
    return "logits dtype " + std::string(dtype_name(dtype));
  if (p.scoring != Scoring::sigmoid) return "scoring is not sigmoid";
  return "";
}

std::string v4_declines(const RouteProblem& p) {
  if (std::string why = sigmoid_kernel_declines(p); !why.empty()) return why;
  if (p.num_groups <= 1) return "ungrouped routing";
  if (p.num_groups > kV4MaxGroups)
    return "G=" + std::to_string(p.num_groups) + " > " + std::to_string(kV4MaxGroups) + " groups";
  if (p.experts_per_group() > kV4MaxGroupExperts)
    return "groups of " + std::to_string(p.experts_per_group()) + " experts > " +
           std::to_string(kV4MaxGroupExperts);
  if (p.num_routed > kV4SortedKeys)
    return "Kr=" + std::to_string(p.num_routed) + " > " + std::to_string(kV4SortedKeys) +
           " routed slots";
  if (p.topk > kV4MaxSlots)
    return "K=" + std::to_string(p.topk) + " > " + std::to_string(kV4MaxSlots);
  return "";
}

// MOEKIT_GPU_ROUTE_V4=0|1, read once: keep automatic calls off v4, or put them on it wherever it
// serves (for measuring it against v3 / v2); unset, the measured rule.
int v4_forced() {
  static const int forced = env::choice("MOEKIT_GPU_ROUTE_V4");
  return forced;
}

// MOEKIT_GPU_ROUTE_V4_KEYS=exact, read once: v4 skips its 32-bit keys and runs only the exact
// pass (for measuring what the 32-bit keys save).
bool v4_exact_keys_only() {
  static const bool exact = env::is("MOEKIT_GPU_ROUTE_V4_KEYS", "exact");
  return exact;
}

// Where v4 pays (H200, DeepSeek-V3, docs/perf/routing.md session 6): 16384 tokens 20.9 vs 25.6 us
// (v2), but 14.4 vs 13.3 at 8192 and 9.5 vs 7.6 at 4096: a warp's chain (two rows) is longer
// than v3's (one row), its instructions per row fewer, so it pays once the SMs hold several waves.
// Groups of more than 16 experts (a group always takes two lanes of 16). Since session 8 v5 is
// asked first and takes these batches too (16384 tokens: 15.8 vs 20.5 us): v4 runs where v5 is
// switched off (MOEKIT_GPU_ROUTE_V5=0) or where v4 is forced on.
constexpr int64_t kV4MinTokens = 16384;
constexpr int kV4MinExpertsPerGroup = 17;

bool v4_automatic(const RouteProblem& p) {
  if (!v4_declines(p).empty() || v4_forced() == 0) return false;
  return v4_forced() == 1 ||
         (p.num_tokens >= kV4MinTokens && p.experts_per_group() >= kV4MinExpertsPerGroup);
}

// v4, for a problem v4_declines() accepts. Vector loads of logits need every group to start on a
// chunk (the kernel reads the bias element by element, once per block).
void route_v4(const RouteProblem& p) {
  const bool f32 = p.logits.dtype() == DType::f32;
  const int chunk = f32 ? V4Layout<V3LogitsF32>::kV : V4Layout<V3Logits16>::kV;
  RouteArgs a = common_args(p, chunk);
  a.logits_vector_loads = a.logits_vector_loads && a.experts_per_group % chunk == 0;
  const bool narrow = !v4_exact_keys_only();
  const KernelFn kernel = f32 ? (narrow ? route_group_lanes_v4_kernel<V3LogitsF32, true>
                                        : route_group_lanes_v4_kernel<V3LogitsF32, false>)
                              : (narrow ? route_group_lanes_v4_kernel<V3Logits16, true>
                                        : route_group_lanes_v4_kernel<V3Logits16, false>);
  launch_resident_rows(p, kernel, 0, a, kLanes / kV4RowLanes);
}

// ---- v5 (route_gpu_v5.cuh): sigmoid rows in whole warps, 32-bit keys first.

// Experts per lane of a v5 launch: 8 (E <= 256), 12 or 16 (E <= 512).
// Ungrouped rows of 257-384 experts take 12 (Kimi-K2: every lane busy, a third fewer keys per
// lane than 16; groups keep 16, whose runs of lanes hold whole groups).
int v5_experts_per_lane(const RouteProblem& p) {
  if (p.num_experts <= kLanes * 8) return 8;
  return p.num_groups == 1 && p.num_experts <= kLanes * 12 ? 12 : 16;
}

std::string v5_declines(const RouteProblem& p) {
  if (std::string why = sigmoid_kernel_declines(p); !why.empty()) return why;
  constexpr int kMaxExperts = kLanes * 16;
  if (p.num_experts > kMaxExperts)
    return "E=" + std::to_string(p.num_experts) + " > " + std::to_string(kMaxExperts);
  if (p.num_routed > kV5ListKeys)
    return "Kr=" + std::to_string(p.num_routed) + " > " + std::to_string(kV5ListKeys) +
           " routed slots";
  if (p.topk > kV5MaxSlots)
    return "K=" + std::to_string(p.topk) + " > " + std::to_string(kV5MaxSlots);
  if (p.num_groups > 1) {
    const int vpl = v5_experts_per_lane(p), EPG = p.experts_per_group();
    if (EPG % vpl != 0 || !is_power_of_two(EPG / vpl))
      return "groups of " + std::to_string(EPG) + " experts are not whole runs of lanes (" +
             std::to_string(vpl) + " experts per lane)";
  }
  return "";
}

// MOEKIT_GPU_ROUTE_V5=0|1, read once: keep automatic calls off v5, or put them on it wherever it
// serves; unset, the measured rule. MOEKIT_GPU_ROUTE_V5_KEYS=exact: 64-bit keys only (to measure
// what the 32-bit keys save).
int v5_forced() {
  static const int forced = env::choice("MOEKIT_GPU_ROUTE_V5");
  return forced;
}

bool v5_exact_keys_only() {
  static const bool exact = env::is("MOEKIT_GPU_ROUTE_V5_KEYS", "exact");
  return exact;
}

// Where v5 pays (H200, CUDA-graph replay, us per call, v5 against the rule without it;
// docs/perf/routing.md, session 7):
// - Grouped rows (DeepSeek-V3): 1 token 2.21 vs 2.49, 16 2.32 vs 2.59, 64 2.67 vs 2.64, 256 2.41
//   vs 2.68, 1024 2.95 vs 3.21, 4096 5.64 vs 7.32, 8192 10.19 vs 12.94; v4 takes 16384 (19.8 both).
// - Ungrouped, 8 experts per lane (GLM-4.5): 2.11-2.26 vs 2.16-2.28 up to 64 tokens, 2.31 vs 2.35
//   at 256, then v3 (1024: 3.53 vs 2.65; 8192: 9.95 vs 9.51).
// - Ungrouped, 16 experts per lane (Kimi-K2): 3.08 vs 3.44 at 1 token (where v2 serves), even or
//   slower from 2 tokens (256: 3.50 vs 3.21; 16384: 27.6 vs 24.4).
// Session 8 (the bias before the wait under OpOptions::static_weights, in v3 and v5; the group
// steps of DeepSeek-V3 unrolled): DeepSeek-V3 1.66-1.82 us at 1-64 tokens, 8.59 at 8192, 15.85 at
// 16384 (v4: 20.54); Kimi-K2 with the promise: v5 2.31-2.69 vs v3 2.59-2.82 at 2-256 tokens, 3.28
// vs 3.65 at 1024, 8.30 vs 8.36 at 4096, then v3 (8192: 13.76 vs 13.66); GLM-4.5 unchanged in
// kind (1024: v5 3.34 vs v3 2.44; the boundary-tie rows' exact pass, likely).
// Session 9: Kimi-K2 at 12 experts per lane: 1.58 us at 1 token, 2.35 at 1024, 5.92 at 4096 (v3:
// 7.75); 8192 not measured on v5 (v3: 13.6), so the bound stays.
constexpr int64_t kV5UngroupedMaxTokens = 256;
constexpr int64_t kV5WideLanesStaticBiasMaxTokens = 4096;

bool v5_automatic(const RouteProblem& p) {
  if (!v5_declines(p).empty() || v5_forced() == 0) return false;
  if (v5_forced() == 1 || p.num_groups > 1) return true;
  if (v5_experts_per_lane(p) > 8)
    return p.num_tokens == 1 || (p.static_bias && p.num_tokens <= kV5WideLanesStaticBiasMaxTokens);
  return p.num_tokens <= kV5UngroupedMaxTokens;
}

// MOEKIT_GPU_ROUTE_V5_ROUNDS=shared|registers, read once: where v5's rounds keep each lane's
// sorted keys for DeepSeek-V3's groups (1 shared, 0 registers: for measuring); unset (-1), by
// batch size.
int v5_rounds_in_shared_forced() {
  static const int forced = env::choice("MOEKIT_GPU_ROUTE_V5_ROUNDS", "shared", "registers");
  return forced;
}

// The keys in shared memory take the integer pipe's selects off the rounds, at a load in each
// round's chain: for batches that fill the SMs (measured: docs/perf/routing.md, session 8).
constexpr int64_t kV5SharedListMinTokens = 2048;

bool v5_list_in_shared(const RouteProblem& p) {
  const int forced = v5_rounds_in_shared_forced();
  return forced >= 0 ? forced == 1 : p.num_tokens >= kV5SharedListMinTokens;
}

// Ungrouped rows of 12 or 16 experts per lane take up to 128 registers (4 blocks per SM, the next
// row prefetched, rounds unrolled) up to this batch (H200, Kimi-K2 at 16 per lane: 1 token 2.05 ->
// 1.91 us, 1024 3.02 -> 2.80, but 4096 7.78 -> 8.30; docs/perf/routing.md, sessions 8-9).
constexpr int64_t kV5RoomyRegistersMaxTokens = 1024;

bool v5_roomy_registers(const RouteProblem& p) {
  return p.num_tokens <= kV5RoomyRegistersMaxTokens;
}

// group_lanes_log2: 0 ungrouped. Groups of 4 lanes (DeepSeek-V3) and ungrouped rows (no group
// scores: Kimi-K2 -0.25 us at decode) have their own instances.
template <class Logits>
KernelFn v5_kernel(int experts_per_lane, bool narrow, bool grouped, int group_lanes_log2,
                   bool list_in_shared, bool roomy_registers) {
  if (experts_per_lane == 8 && narrow && grouped && group_lanes_log2 == 2)
    return list_in_shared ? route_rows_v5_kernel<Logits, 8, true, 2, true>
                          : route_rows_v5_kernel<Logits, 8, true, 2>;
  if (narrow && !grouped && experts_per_lane == 8)
    return route_rows_v5_kernel<Logits, 8, true, kNoGroups>;
  if (narrow && !grouped && experts_per_lane == 12)
    return roomy_registers ? route_rows_v5_kernel<Logits, 12, true, kNoGroups, false, 4>
                           : route_rows_v5_kernel<Logits, 12, true, kNoGroups>;
  if (narrow && !grouped)
    return roomy_registers ? route_rows_v5_kernel<Logits, 16, true, kNoGroups, false, 4>
                           : route_rows_v5_kernel<Logits, 16, true, kNoGroups>;
  if (experts_per_lane == 8)
    return narrow ? route_rows_v5_kernel<Logits, 8, true> : route_rows_v5_kernel<Logits, 8, false>;
  if (experts_per_lane == 12)  // (ungrouped with 64-bit keys only: MOEKIT_GPU_ROUTE_V5_KEYS=exact)
    return route_rows_v5_kernel<Logits, 12, false, kNoGroups>;
  return narrow ? route_rows_v5_kernel<Logits, 16, true> : route_rows_v5_kernel<Logits, 16, false>;
}

// v5, for a problem v5_declines() accepts.
void route_v5(const RouteProblem& p) {
  const bool f32 = p.logits.dtype() == DType::f32;
  const int vpl = v5_experts_per_lane(p);
  RouteArgs a = common_args(p, f32 ? 4 : 8);  // 16-byte pieces
  // Runs of 8 bias elements; with 12 per lane a 16-bit bias's runs sit 8 bytes apart from
  // 16-byte boundaries: element loads there (it loads before the wait under the promise anyway).
  a.bias_vector_loads = a.bias != nullptr &&
                        vector_loads_ok(a.bias, 0, dtype_size(p.bias.dtype()), kV5RunKeys) &&
                        (vpl != 12 || dtype_size(p.bias.dtype()) == 4);
  a.group_lanes_log2 = p.num_groups > 1 ? log2_of(p.experts_per_group() / vpl) : 0;
  const bool narrow = !v5_exact_keys_only();
  const bool grouped = p.num_groups > 1;
  const bool shared_list = v5_list_in_shared(p);
  const KernelFn kernel = f32 ? v5_kernel<V3LogitsF32>(vpl, narrow, grouped, a.group_lanes_log2,
                                                       shared_list, v5_roomy_registers(p))
                              : v5_kernel<V3Logits16>(vpl, narrow, grouped, a.group_lanes_log2,
                                                      shared_list, v5_roomy_registers(p));
  launch_resident_rows(p, kernel, 0, a, 1);
}

// ---- v6 (route_gpu_v6.cuh): softmax rows of 16-bit logits in whole warps, unrolled rounds.

// Experts per lane and rounds of the instances: 2 (E <= 64; 4 or 8 rounds), 4 (E <= 128; 8), 8
// (E <= 256; 8), 16 (E <= 512; 10: Qwen3-Next's K), and DeepSeek-V2's groups (5 per lane, groups
// of 4 lanes; 6 or 8 rounds).
struct V6Shape {
  int experts_per_lane = 0;  // 0: none
  int rounds = 0;
  bool grouped = false;
};
constexpr int kV6GroupedExpertsPerLane = 5;
constexpr int kV6GroupLanes = 4;

V6Shape v6_shape(const RouteProblem& p) {
  V6Shape shape;
  if (p.num_groups > 1) {
    shape = {kV6GroupedExpertsPerLane, p.num_routed <= 6 ? 6 : 8, true};
  } else {
    for (int vpl : {2, 4, 8, 16}) {
      if (p.num_experts <= kLanes * vpl) {
        shape.experts_per_lane = vpl;
        break;
      }
    }
    shape.rounds = shape.experts_per_lane == 16                       ? 10
                   : shape.experts_per_lane == 2 && p.num_routed <= 4 ? 4
                                                                      : 8;
  }
  return shape;
}

std::string v6_declines(const RouteProblem& p) {
  const DType dtype = p.logits.dtype();
  if (dtype != DType::bf16 && dtype != DType::f16)
    return "logits dtype " + std::string(dtype_name(dtype)) + " (16-bit logits only)";
  if (p.scoring != Scoring::softmax) return "not softmax";
  if (p.has_bias()) return "bias (the keys hold the 16-bit logit)";
  if (p.softcap > 0.0f) return "softcap";
  if (p.num_experts > kLanes * 16)
    return "E=" + std::to_string(p.num_experts) + " > " + std::to_string(kLanes * 16);
  if (p.topk > kV6MaxSlots)
    return "K=" + std::to_string(p.topk) + " > " + std::to_string(kV6MaxSlots);
  if (p.num_groups > 1) {
    const int EPG = p.experts_per_group();
    if (EPG != kV6GroupedExpertsPerLane * kV6GroupLanes || p.num_groups > kLanes / kV6GroupLanes)
      return "groups of " + std::to_string(EPG) + " experts, G=" + std::to_string(p.num_groups) +
             " (grouped: DeepSeek-V2's shape only, groups of " +
             std::to_string(kV6GroupedExpertsPerLane * kV6GroupLanes) +
             ", G <= " + std::to_string(kLanes / kV6GroupLanes) + ")";
    if (p.group_score != GroupScore::max) return "grouped with top2_sum group scores";
  }
  const V6Shape shape = v6_shape(p);
  if (p.num_routed > shape.rounds)
    return "Kr=" + std::to_string(p.num_routed) + " > " + std::to_string(shape.rounds) +
           " rounds (" + std::to_string(shape.experts_per_lane) + " experts per lane)";
  if (needs_exact_numerators(p)) return exact_numerators_why;
  return "";
}

// MOEKIT_GPU_ROUTE_V6=0|1, read once: keep automatic calls off v6, or put them on it wherever it
// serves; unset, the measured rule.
int v6_forced() {
  static const int forced = env::choice("MOEKIT_GPU_ROUTE_V6");
  return forced;
}

// Where v6 pays (H200, CUDA-graph replay, us per call, v6 against v3; docs/perf/routing.md,
// session 9): every softmax row of the table up to 1024 tokens (1 token: Qwen2 1.93 -> 1.44,
// Qwen3-30B 1.56 -> 1.27, Qwen3-Next 2.15 -> 1.54, Mixtral 1.33 -> 1.15, DeepSeek-V2 2.80 ->
// 1.90); up to 4096 the rows of 8 experts per lane (Qwen3.5 4.10 -> 3.85), where v3's rows of
// fewer lanes keep the others (Qwen1.5 3.43 vs 2.98, Qwen3-30B 3.65 vs 2.95); 16 experts per lane
// (Qwen3-Next: 8192 9.44 -> 9.06, 16384 17.6 -> 15.5) and DeepSeek-V2's groups (8192 12.9 ->
// 8.6, 16384 22.4 -> 15.9) at every batch.
constexpr int64_t kV6MaxTokens = 1024;
constexpr int64_t kV6EightPerLaneMaxTokens = 4096;

bool v6_automatic(const RouteProblem& p) {
  if (!v6_declines(p).empty() || v6_forced() == 0) return false;
  if (v6_forced() == 1 || p.num_groups > 1) return true;
  const int vpl = v6_shape(p).experts_per_lane;
  if (vpl == 16 || p.num_tokens <= kV6MaxTokens) return true;
  return p.num_tokens <= kV6EightPerLaneMaxTokens && vpl == 8;
}

template <int kVpl, int kRounds>
KernelFn v6_by_mode(bool by_p) {
  return by_p ? route_rows_v6_kernel<kVpl, kRounds, true>
              : route_rows_v6_kernel<kVpl, kRounds, false>;
}

KernelFn v6_kernel(const V6Shape& shape, bool by_p) {
  if (shape.grouped)
    return shape.rounds == 6 ? route_rows_v6_kernel<kV6GroupedExpertsPerLane, 6, true, 2>
                             : route_rows_v6_kernel<kV6GroupedExpertsPerLane, 8, true, 2>;
  switch (shape.experts_per_lane) {
    case 2:
      return shape.rounds == 4 ? v6_by_mode<2, 4>(by_p) : v6_by_mode<2, 8>(by_p);
    case 4:
      return v6_by_mode<4, 8>(by_p);
    case 8:
      return v6_by_mode<8, 8>(by_p);
    default:
      return v6_by_mode<16, 10>(by_p);
  }
}

// v6, for a problem v6_declines() accepts.
void route_v6(const RouteProblem& p) {
  const V6Shape shape = v6_shape(p);
  // Vector loads of a lane's logits: its kVpl elements (odd kVpl: element loads).
  RouteArgs a = common_args(p, shape.experts_per_lane % 2 == 0 ? shape.experts_per_lane : 1);
  launch_resident_rows(p, v6_kernel(shape, mode_of(p) == Mode::softmax_by_prob), 0, a, 1);
}

bool v3_switched_off(const RouteProblem& p) {
  return v3_switches().off || (v3_switches().off_grouped && p.num_groups > 1);
}

RouteKernel automatic_kernel(const RouteProblem& p) {
  if (v2_switches().all_v1) return RouteKernel::v1;
  // The switches that send calls back to v2 keep them off v4 and v5 too. v4 forced on first; else
  // v5, then v4 (where v5 is switched off).
  if (v4_forced() == 1 && v4_automatic(p) && !v3_switched_off(p)) return RouteKernel::v4;
  if (v5_automatic(p) && !v3_switched_off(p)) return RouteKernel::v5;
  if (v6_automatic(p) && !v3_switched_off(p)) return RouteKernel::v6;
  if (v4_automatic(p) && !v3_switched_off(p)) return RouteKernel::v4;
  if (v3_declines(p).empty() && !v3_switched_off(p) && !v3_prefers_v2(p)) return RouteKernel::v3;
  return v2_declines(p).empty() && !v2_switched_off(p) ? RouteKernel::v2 : RouteKernel::v1;
}

}  // namespace route_detail

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

std::string route_v2_declines(const RouteProblem& p) { return route_detail::v2_declines(p); }

std::string route_v3_declines(const RouteProblem& p) { return route_detail::v3_declines(p); }

std::string route_v4_declines(const RouteProblem& p) { return route_detail::v4_declines(p); }

std::string route_v5_declines(const RouteProblem& p) { return route_detail::v5_declines(p); }

std::string route_v6_declines(const RouteProblem& p) { return route_detail::v6_declines(p); }

bool route_v3_row_lanes_fit(const RouteProblem& p, int row_lanes) {
  return route_detail::v3_declines(p).empty() && route_detail::v3_row_lanes_fit(p, row_lanes);
}

std::string route_kernel_name(const RouteProblem& p) {
  namespace detail = route_detail;
  const RouteKernel kernel = detail::automatic_kernel(p);
  const std::string v3_why = detail::v3_declines(p);
  const std::string not_v3 = !v3_why.empty() ? "v3: " + v3_why
                             : route_detail::v3_switched_off(p)
                                 ? "v3 switched off by the environment"
                                 : "v3: measured slower here";
  if (kernel == RouteKernel::v1) {
    const std::string why = detail::v2_declines(p);
    return "v1 (" + (why.empty() ? std::string("v2 switched off by the environment") : why) + "; " +
           not_v3 + ")";
  }
  if (kernel == RouteKernel::v4)
    return "v4 sigmoid, grouped, " + std::to_string(detail::kV4LanesPerGroup) +
           " lanes per group (" + std::to_string(detail::kV4RowLanes) + " lanes per row, " +
           std::to_string(kLanes / detail::kV4RowLanes) + " rows per warp), " +
           (detail::v4_exact_keys_only() ? "64-bit keys"
                                         : "32-bit keys (64-bit where truncated scores tie)") +
           ", lanes sort their top " + std::to_string(detail::kV4SortedKeys) + " keys";
  if (kernel == RouteKernel::v5)
    return "v5 sigmoid" + std::string(p.num_groups > 1 ? ", grouped" : "") + ", " +
           std::to_string(detail::v5_experts_per_lane(p)) + " experts per lane, 1 row per warp, " +
           (detail::v5_exact_keys_only() ? "64-bit keys"
                                         : "32-bit keys (64-bit where truncated scores tie)") +
           ", lanes sort their top 8 keys";
  if (kernel == RouteKernel::v6) {
    const detail::V6Shape shape = detail::v6_shape(p);
    return "v6 " + std::string(detail::mode_name(detail::mode_of(p))) +
           (shape.grouped ? ", grouped (4 lanes per group)" : "") + ", " +
           std::to_string(shape.experts_per_lane) + " experts per lane, 1 row per warp, " +
           std::to_string(shape.rounds) + " unrolled rounds" +
           (detail::mode_of(p) == detail::Mode::softmax_by_prob
                ? ", denominator in expert order beside the rounds"
                : "");
  }
  if (kernel == RouteKernel::v3) {
    const detail::V3Shape shape = detail::v3_shape(p, RouteKernel::v3);
    const int rows = kLanes / shape.row_lanes;
    return "v3 " + std::string(detail::mode_name(detail::mode_of(p))) + ", " +
           (shape.wide_keys ? "64" : "32") + "-bit keys, " +
           std::to_string(shape.experts_per_lane) + " experts per lane, " +
           std::to_string(shape.row_lanes) + " lanes per row (" + std::to_string(rows) +
           (rows == 1 ? " row" : " rows") + " per warp)" +
           (shape.top_only ? ", lanes sort their top keys only" : "") +
           (shape.vote_rounds ? ", rounds reduce the score and vote" : "") +
           (detail::mode_of(p) == detail::Mode::softmax_by_prob &&
                    detail::v3_switches().tree_denominator
                ? ", denominator summed across lanes (tree)"
                : "") +
           (detail::v3_early_terms(p, shape) ? ", denominator starts beside the sort" : "") +
           (detail::v3_block_warps(p) != detail::kWarpsPerBlock
                ? ", " + std::to_string(detail::v3_block_warps(p)) + " warps per block"
                : "") +
           (p.num_groups > 1
                ? ", grouped (" + std::to_string(p.experts_per_group() / shape.experts_per_lane) +
                      " lanes per group)"
                : "");
  }
  const detail::V2Shape shape = detail::v2_shape(p, RouteKernel::v2);
  std::string name = "v2 " + std::string(detail::mode_name(detail::mode_of(p))) + ", " +
                     std::to_string(shape.experts_per_lane) + " experts per lane, " +
                     (shape.row_lanes == kLanes ? "1 row" : "2 rows") + " per warp";
  if (p.num_groups > 1) name += ", grouped";
  return name + " (" + not_v3 + ")";
}

void route_with_kernel(const RouteProblem& p, RouteKernel kernel) {
  if (p.num_tokens == 0) return;
  if (kernel == RouteKernel::automatic) kernel = route_detail::automatic_kernel(p);
  if (kernel == RouteKernel::v1) return route_detail::route_v1(p);
  if (kernel == RouteKernel::v4) {
    const std::string why = route_detail::v4_declines(p);
    if (!why.empty()) fail("route", "kernel", "v4", "does not serve this problem: " + why);
    return route_detail::route_v4(p);
  }
  if (kernel == RouteKernel::v5) {
    const std::string why = route_detail::v5_declines(p);
    if (!why.empty()) fail("route", "kernel", "v5", "does not serve this problem: " + why);
    return route_detail::route_v5(p);
  }
  if (kernel == RouteKernel::v6) {
    const std::string why = route_detail::v6_declines(p);
    if (!why.empty()) fail("route", "kernel", "v6", "does not serve this problem: " + why);
    return route_detail::route_v6(p);
  }
  if (route_detail::is_v3(kernel)) {
    const std::string why = route_detail::v3_declines(p);
    if (!why.empty()) fail("route", "kernel", "v3", "does not serve this problem: " + why);
    const route_detail::V3Shape shape = route_detail::v3_shape(p, kernel);
    if (!route_detail::v3_row_lanes_fit(p, shape.row_lanes))
      fail("route", "kernel", "v3 with " + std::to_string(shape.row_lanes) + " lanes per row",
           "does not serve this problem (rows below 32 lanes: 16-bit logits, softmax, no bias, "
           "no groups, E <= 16 per lane, K <= 2 per lane)");
    return route_detail::route_v3(p, shape);
  }
  const std::string why = route_detail::v2_declines(p);
  if (!why.empty()) fail("route", "kernel", "v2", "does not serve this problem: " + why);
  if (kernel == RouteKernel::v2_half_warp && !route_detail::half_warp_fits(p))
    fail("route", "kernel", "v2_half_warp",
         "does not serve this problem (E <= 256, K <= 32 and whole-lane groups only)");
  route_detail::route_v2(p, route_detail::v2_shape(p, kernel));
}

bool route_v2_half_warp_fits(const RouteProblem& p) { return route_detail::half_warp_fits(p); }

void route(const RouteProblem& p) { route_with_kernel(p, RouteKernel::automatic); }

}  // namespace moekit::gpu
