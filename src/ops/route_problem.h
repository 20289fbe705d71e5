// What a route implementation receives: arguments already validated by the front end, with every
// default resolved. Implementations (reference, cpu, gpu) include this and nothing of the front
// end.
#pragma once

#include <cstdint>
#include <string>

#include "moekit/ops/route.h"
#include "ops/dispatch.h"

namespace moekit {

struct RouteProblem {
  TensorView logits;                         // [T, E], f32/f16/bf16
  TensorView bias;                           // [E] or data() == nullptr when there is no bias
  TensorView weights;                        // [T, K] f32
  TensorView ids;                            // [T, K] i32/i64
  int64_t num_tokens = 0;                    // T
  int num_experts = 0;                       // E
  int topk = 0;                              // K
  int num_routed = 0;                        // Kr = K - S
  int num_shared = 0;                        // S
  int num_groups = 1;                        // G
  int topk_groups = 1;                       // TG
  GroupScore group_score = GroupScore::max;  // resolved: never automatic
  Scoring scoring = Scoring::softmax;
  float softcap = 0.0f;
  bool renormalize = true;
  float routed_scaling_factor = 1.0f;
  bool apply_scaling_on_output = false;
  int64_t num_valid_tokens = 0;  // resolved: in [0, T]
  int num_threads = 0;
  void* stream = nullptr;
  bool static_bias = false;  // the bias is not written by the kernel just before (OpOptions)

  bool has_bias() const { return bias.data() != nullptr; }
  int experts_per_group() const { return num_experts / num_groups; }
};

// One entry of route's dispatch table (see ops/dispatch.h).
using RouteImplementation = Implementation<RouteProblem>;

}  // namespace moekit

namespace moekit {
// Validates a route call against spec/routing.md (throws Error naming the argument and value,
// before anything is written) and resolves every default. `op` names the caller in messages.
RouteProblem make_route_problem(const char* op, const TensorView& logits,
                                const std::optional<TensorView>& bias, const RouterConfig& config,
                                const TensorView& weights, const TensorView& ids,
                                const RouteOptions& options);
}  // namespace moekit
