// route's front end: validation (spec/routing.md, "Arguments that are errors") and the one
// dispatch table whose entries say why they decline.
#include "moekit/ops/route.h"

#include <cmath>
#include <string>

#include "cpu/route_cpu.h"
#include "moekit/error.h"
#include "ops/route_problem.h"
#include "reference/route_reference.h"
#ifdef MOEKIT_HAVE_GPU
#include "gpu/route_gpu.h"
#endif

namespace moekit {
namespace {

std::string reference_supports(const RouteProblem& p) {
  if (!p.logits.device().is_cpu()) return "tensors are on " + p.logits.device().str();
  return "";
}

// Fastest first. The first entry of the requested backend that serves the problem runs.
const RouteImplementation kRouteTable[] = {
#ifdef MOEKIT_HAVE_GPU
    {"gpu", Backend::gpu, gpu::route_supports, gpu::route, gpu::route_kernel_name},
#endif
    {"cpu.avx512", Backend::cpu, cpu::route_supports_avx512, cpu::route_avx512},
    {"cpu.avx2", Backend::cpu, cpu::route_supports_avx2, cpu::route_avx2},
    {"cpu.scalar", Backend::cpu, cpu::route_supports_scalar, cpu::route_scalar},
    {"reference", Backend::reference, reference_supports, reference::route},
};

std::string str(int64_t v) { return std::to_string(v); }
std::string str(int v) { return std::to_string(v); }
std::string str(float v) {
  std::string s = std::to_string(v);
  if (s.find('.') != std::string::npos) {  // trim trailing zeros: 2.500000 -> 2.5
    s.erase(s.find_last_not_of('0') + 1);
    if (s.back() == '.') s.pop_back();
  }
  return s;
}
std::string str(DType d) { return std::string(dtype_name(d)); }

bool is_float_input(DType d) { return d == DType::f32 || d == DType::f16 || d == DType::bf16; }

}  // namespace

RouteProblem make_route_problem(const char* op, const TensorView& logits,
                                const std::optional<TensorView>& bias, const RouterConfig& c,
                                const TensorView& weights, const TensorView& ids,
                                const RouteOptions& options) {
  // Tensors.
  if (logits.ndim() != 2) fail(op, "logits.shape", logits.shape_str(), "must be [tokens, experts]");
  if (!is_float_input(logits.dtype()))
    fail(op, "logits.dtype", str(logits.dtype()), "is not supported (f32, f16 or bf16)");
  const int64_t T = logits.size(0);
  const int64_t E = logits.size(1);
  if (E < 1 || E > 2048) fail(op, "num_experts", str(E), "is outside the supported range 1..2048");
  if (bias) {
    if (bias->ndim() != 1 || bias->size(0) != E)
      fail(op, "bias.shape", bias->shape_str(), "must be [" + str(E) + "] (one per expert)");
    if (!is_float_input(bias->dtype()))
      fail(op, "bias.dtype", str(bias->dtype()), "is not supported (f32, f16 or bf16)");
    if (bias->device() != logits.device())
      fail(op, "bias.device", bias->device().str(),
           "differs from logits.device=" + logits.device().str());
  }
  // Config.
  const int K = c.topk, S = c.num_shared_experts, G = c.num_groups, TG = c.topk_groups;
  if (K < 1) fail(op, "topk", str(K), "must be at least 1");
  if (K > 64) fail(op, "topk", str(K), "exceeds the supported maximum of 64");
  if (S < 0) fail(op, "num_shared_experts", str(S), "must not be negative");
  if (K - S < 1)
    fail(op, "num_shared_experts", str(S),
         "leaves no routed slot: it must be less than topk=" + str(K));
  if (K - S > E)
    fail(op, "topk", str(K),
         "asks for " + str(K - S) + " routed experts but num_experts=" + str(E));
  if (G < 1 || G > 64) fail(op, "num_groups", str(G), "is outside the supported range 1..64");
  if (E % G != 0) fail(op, "num_groups", str(G), "does not divide num_experts=" + str(E));
  if (TG < 1 || TG > G)
    fail(op, "topk_groups", str(TG), "must be between 1 and num_groups=" + str(G));
  if (TG * (E / G) < K - S)
    fail(op, "topk_groups", str(TG),
         "keeps " + str(TG * (E / G)) + " experts, fewer than the " + str(K - S) + " routed slots");
  if (!(c.softcap >= 0.0f) || std::isinf(c.softcap))
    fail(op, "softcap", str(c.softcap), "must be finite and >= 0");
  if (c.softcap > 0.0f && c.scoring != Scoring::softmax)
    fail(op, "softcap", str(c.softcap), "applies to softmax scoring only");
  if (!(c.routed_scaling_factor > 0.0f) || std::isinf(c.routed_scaling_factor))
    fail(op, "routed_scaling_factor", str(c.routed_scaling_factor), "must be finite and > 0");
  if (c.num_valid_tokens < -1 || c.num_valid_tokens > T)
    fail(op, "num_valid_tokens", str(c.num_valid_tokens),
         "must be -1 (all) or between 0 and tokens=" + str(T));
  // Outputs.
  if (weights.ndim() != 2 || weights.size(0) != T || weights.size(1) != K)
    fail(op, "weights.shape", weights.shape_str(), "must be [" + str(T) + ", " + str(K) + "]");
  if (ids.ndim() != 2 || ids.size(0) != T || ids.size(1) != K)
    fail(op, "ids.shape", ids.shape_str(), "must be [" + str(T) + ", " + str(K) + "]");
  if (weights.dtype() != DType::f32)
    fail(op, "weights.dtype", str(weights.dtype()), "is not supported (f32)");
  if (ids.dtype() != DType::i32 && ids.dtype() != DType::i64)
    fail(op, "ids.dtype", str(ids.dtype()), "is not supported (i32 or i64)");
  if (weights.device() != logits.device())
    fail(op, "weights.device", weights.device().str(),
         "differs from logits.device=" + logits.device().str());
  if (ids.device() != logits.device())
    fail(op, "ids.device", ids.device().str(),
         "differs from logits.device=" + logits.device().str());
  if (T > 0 && (logits.data() == nullptr || weights.data() == nullptr || ids.data() == nullptr))
    fail(op, "data", "null", "pointer given for a non-empty tensor");
  if (bias && bias->data() == nullptr) fail(op, "bias.data", "null", "pointer given for the bias");

  RouteProblem p;
  p.logits = logits;
  if (bias) p.bias = *bias;
  p.weights = weights;
  p.ids = ids;
  p.num_tokens = T;
  p.num_experts = static_cast<int>(E);
  p.topk = K;
  p.num_shared = S;
  p.num_routed = K - S;
  p.num_groups = G;
  p.topk_groups = TG;
  p.group_score = c.group_score == GroupScore::automatic
                      ? (bias ? GroupScore::top2_sum : GroupScore::max)
                      : c.group_score;
  p.scoring = c.scoring;
  p.softcap = c.softcap;
  p.renormalize = c.renormalize;
  p.routed_scaling_factor = c.routed_scaling_factor;
  p.apply_scaling_on_output = c.apply_scaling_on_output;
  p.num_valid_tokens = c.num_valid_tokens < 0 ? T : c.num_valid_tokens;
  p.num_threads = options.num_threads;
  p.stream = options.stream;
  p.static_bias = options.static_weights;
  return p;
}

std::vector<ImplementationChoice> explain_route(const TensorView& logits,
                                                const std::optional<TensorView>& bias,
                                                const RouterConfig& config,
                                                const TensorView& weights, const TensorView& ids,
                                                const RouteOptions& options) {
  const RouteProblem p = make_route_problem("route", logits, bias, config, weights, ids, options);
  return explain_table<RouteProblem>(kRouteTable, p, logits.device(), options);
}

void route(const TensorView& logits, const std::optional<TensorView>& bias,
           const RouterConfig& config, const TensorView& weights, const TensorView& ids,
           const RouteOptions& options) {
  const RouteProblem p = make_route_problem("route", logits, bias, config, weights, ids, options);
  dispatch<RouteProblem>("route", kRouteTable, p, logits.device(), options, p.num_tokens == 0);
}

// ---- Named wrappers.

void topk_softmax(const TensorView& topk_weights, const TensorView& topk_ids,
                  const TensorView& gating_output, bool renormalize, float moe_softcapping,
                  const std::optional<TensorView>& correction_bias, const RouteOptions& options) {
  RouterConfig c;
  c.topk = topk_weights.ndim() == 2 ? static_cast<int>(topk_weights.size(1)) : 0;
  c.scoring = Scoring::softmax;
  c.renormalize = renormalize;
  c.softcap = moe_softcapping;
  route(gating_output, correction_bias, c, topk_weights, topk_ids, options);
}

void topk_sigmoid(const TensorView& topk_weights, const TensorView& topk_ids,
                  const TensorView& gating_output, bool renormalize,
                  const std::optional<TensorView>& correction_bias, const RouteOptions& options) {
  RouterConfig c;
  c.topk = topk_weights.ndim() == 2 ? static_cast<int>(topk_weights.size(1)) : 0;
  c.scoring = Scoring::sigmoid;
  c.renormalize = renormalize;
  route(gating_output, correction_bias, c, topk_weights, topk_ids, options);
}

void grouped_topk(const TensorView& gating_output, const TensorView& topk_weights,
                  const TensorView& topk_ids, bool renormalize, int num_expert_group,
                  int topk_group, int num_fused_shared_experts, float routed_scaling_factor,
                  Scoring scoring, int64_t num_token_non_padded, const RouteOptions& options) {
  RouterConfig c;
  c.topk = topk_weights.ndim() == 2 ? static_cast<int>(topk_weights.size(1)) : 0;
  c.scoring = scoring;
  c.num_groups = num_expert_group;
  c.topk_groups = topk_group;
  c.group_score = GroupScore::max;
  c.renormalize = renormalize;
  c.num_shared_experts = num_fused_shared_experts;
  c.routed_scaling_factor = routed_scaling_factor;
  c.num_valid_tokens = num_token_non_padded;
  route(gating_output, std::nullopt, c, topk_weights, topk_ids, options);
}

void biased_grouped_topk(const TensorView& gating_output, const TensorView& correction_bias,
                         const TensorView& topk_weights, const TensorView& topk_ids,
                         bool renormalize, int num_expert_group, int topk_group,
                         int num_fused_shared_experts, float routed_scaling_factor,
                         bool apply_routed_scaling_factor_on_output, int64_t num_token_non_padded,
                         const RouteOptions& options) {
  RouterConfig c;
  c.topk = topk_weights.ndim() == 2 ? static_cast<int>(topk_weights.size(1)) : 0;
  c.scoring = Scoring::sigmoid;
  c.num_groups = num_expert_group;
  c.topk_groups = topk_group;
  c.group_score = GroupScore::top2_sum;
  c.renormalize = renormalize;
  c.num_shared_experts = num_fused_shared_experts;
  c.routed_scaling_factor = routed_scaling_factor;
  c.apply_scaling_on_output = apply_routed_scaling_factor_on_output;
  c.num_valid_tokens = num_token_non_padded;
  route(gating_output, correction_bias, c, topk_weights, topk_ids, options);
}

}  // namespace moekit
