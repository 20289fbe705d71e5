// MoE routing: route(logits, bias?, RouterConfig) -> (weights, ids). The contract is
// spec/routing.md; the short version: score (softmax / sigmoid / sqrtsoftplus), optionally keep
// the best expert groups, take the top K - S experts (ties: lower id), append S fused shared-expert
// slots, renormalize, optionally scale by routed_scaling_factor.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "moekit/backend.h"
#include "moekit/tensor.h"

namespace moekit {

enum class Scoring : uint8_t { softmax, sigmoid, sqrtsoftplus };
enum class GroupScore : uint8_t { automatic, max, top2_sum };  // automatic: top2_sum iff bias

struct RouterConfig {
  int topk = 0;  // K: slots per token, including the shared-expert slots
  Scoring scoring = Scoring::softmax;
  int num_groups = 1;   // G; 1 = ungrouped
  int topk_groups = 1;  // TG
  GroupScore group_score = GroupScore::automatic;
  float softcap = 0.0f;  // softmax only; 0 = off
  bool renormalize = true;
  int num_shared_experts = 0;  // S
  float routed_scaling_factor = 1.0f;
  bool apply_scaling_on_output = false;
  int64_t num_valid_tokens = -1;  // rows at or past it are padding; -1 = all rows valid
};

using RouteOptions = OpOptions;

// logits [T, E] f32/f16/bf16 (rows contiguous for the fast backends), bias [E] f32/f16/bf16 or
// none, weights f32 [T, K], ids i32 or i64 [T, K]. Throws Error on an invalid call, writing
// nothing.
void route(const TensorView& logits, const std::optional<TensorView>& bias,
           const RouterConfig& config, const TensorView& weights, const TensorView& ids,
           const RouteOptions& options = {});

// One row per implementation in the dispatch table considered for this call (ImplementationChoice,
// moekit/backend.h): which one runs and why each other one declines.
std::vector<ImplementationChoice> explain_route(const TensorView& logits,
                                                const std::optional<TensorView>& bias,
                                                const RouterConfig& config,
                                                const TensorView& weights, const TensorView& ids,
                                                const RouteOptions& options = {});

// ---- Named wrappers with the argument lists of SGLang / vLLM / sgl-kernel. They only build a
// RouterConfig. K is taken from the outputs' second dimension.

// sgl-kernel topk_softmax(topk_weights, topk_ids, gating_output, renormalize, moe_softcapping,
// correction_bias).
void topk_softmax(const TensorView& topk_weights, const TensorView& topk_ids,
                  const TensorView& gating_output, bool renormalize, float moe_softcapping = 0.0f,
                  const std::optional<TensorView>& correction_bias = std::nullopt,
                  const RouteOptions& options = {});

// sgl-kernel topk_sigmoid(topk_weights, topk_ids, gating_output, renormalize, correction_bias).
void topk_sigmoid(const TensorView& topk_weights, const TensorView& topk_ids,
                  const TensorView& gating_output, bool renormalize,
                  const std::optional<TensorView>& correction_bias = std::nullopt,
                  const RouteOptions& options = {});

// SGLang grouped_topk (no bias; group score = max): DeepSeek-V2 style.
void grouped_topk(const TensorView& gating_output, const TensorView& topk_weights,
                  const TensorView& topk_ids, bool renormalize, int num_expert_group,
                  int topk_group, int num_fused_shared_experts = 0,
                  float routed_scaling_factor = 1.0f, Scoring scoring = Scoring::softmax,
                  int64_t num_token_non_padded = -1, const RouteOptions& options = {});

// SGLang biased_grouped_topk / sgl-kernel moe_fused_gate: sigmoid + correction bias + groups
// (group score = top2_sum), DeepSeek-V3 style.
void biased_grouped_topk(const TensorView& gating_output, const TensorView& correction_bias,
                         const TensorView& topk_weights, const TensorView& topk_ids,
                         bool renormalize, int num_expert_group, int topk_group,
                         int num_fused_shared_experts = 0, float routed_scaling_factor = 1.0f,
                         bool apply_routed_scaling_factor_on_output = false,
                         int64_t num_token_non_padded = -1, const RouteOptions& options = {});

}  // namespace moekit
