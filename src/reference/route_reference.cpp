// Reference routing: spec/routing.md written as code, one token row at a time, in f32.
#include "reference/route_reference.h"

#include <cmath>
#include <limits>
#include <vector>

namespace moekit::reference {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// A score that is NaN ranks with the lowest (spec: NaN is treated as -inf).
float nan_to_neg_inf(float v) { return std::isnan(v) ? -kInf : v; }

// Strict order used everywhere: larger score first, then lower index.
bool ranks_before(float score_a, int a, float score_b, int b) {
  return score_a > score_b || (score_a == score_b && a < b);
}

float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

float sqrt_softplus(float x) {
  if (x == kInf) x = std::numeric_limits<float>::max();
  const float softplus = x > 20.0f ? x : std::log1p(std::exp(x));
  return std::sqrt(softplus);
}

// Fills selection[e] and weight_source[e] for one row (step 1 of the contract).
void activate(const RouteProblem& p, const std::vector<float>& x, const std::vector<float>& bias,
              std::vector<float>& selection, std::vector<float>& weight_source) {
  const int E = p.num_experts;
  if (p.scoring == Scoring::softmax) {
    std::vector<float>& z = selection;  // reuse: z becomes p in place
    for (int e = 0; e < E; ++e) {
      float v = x[e];
      if (p.softcap > 0.0f) v = p.softcap * std::tanh(v / p.softcap);
      v += bias[e];
      // NaN logits (and NaN made by a non-finite bias) are -inf: probability 0.
      z[e] = std::isnan(x[e]) ? -kInf : nan_to_neg_inf(v);
    }
    float m = -kInf;
    for (int e = 0; e < E; ++e) m = std::max(m, z[e]);
    if (m == -kInf) {  // all -inf / NaN: p = 0 everywhere
      for (int e = 0; e < E; ++e) z[e] = 0.0f;
    } else if (m == kInf) {  // +inf entries share the mass equally
      float count = 0.0f;
      for (int e = 0; e < E; ++e) count += z[e] == kInf ? 1.0f : 0.0f;
      for (int e = 0; e < E; ++e) z[e] = z[e] == kInf ? 1.0f / count : 0.0f;
    } else {
      float sum = 0.0f;
      for (int e = 0; e < E; ++e) {
        z[e] = std::exp(z[e] - m);
        sum += z[e];
      }
      for (int e = 0; e < E; ++e) z[e] = z[e] / sum;
    }
    weight_source = selection;
    return;
  }
  for (int e = 0; e < E; ++e) {
    const float v = nan_to_neg_inf(x[e]);
    const float s = p.scoring == Scoring::sigmoid ? sigmoid(v) : sqrt_softplus(v);
    weight_source[e] = s;
    selection[e] = nan_to_neg_inf(s + bias[e]);
  }
}

// Step 2: which experts may be selected. allowed[e] = 1 for experts of kept groups.
void keep_best_groups(const RouteProblem& p, const std::vector<float>& selection,
                      std::vector<char>& allowed) {
  const int G = p.num_groups;
  const int EPG = p.experts_per_group();
  std::vector<float> group_score(G);
  for (int g = 0; g < G; ++g) {
    float first = -kInf, second = -kInf;  // the two largest scores of the group
    for (int j = 0; j < EPG; ++j) {
      const float v = selection[g * EPG + j];
      if (v > first) {
        second = first;
        first = v;
      } else if (v > second) {
        second = v;
      }
    }
    float score = first;
    if (p.group_score == GroupScore::top2_sum && EPG >= 2) score = first + second;
    group_score[g] = nan_to_neg_inf(score);
  }
  std::vector<char> kept(G, 0);
  for (int round = 0; round < p.topk_groups; ++round) {
    int best = -1;
    for (int g = 0; g < G; ++g) {
      if (kept[g]) continue;
      if (best < 0 || ranks_before(group_score[g], g, group_score[best], best)) best = g;
    }
    kept[best] = 1;
  }
  for (int e = 0; e < p.num_experts; ++e) allowed[e] = kept[e / EPG];
}

template <class IdT>
void route_typed(const RouteProblem& p) {
  const int E = p.num_experts, K = p.topk, Kr = p.num_routed;
  std::vector<float> x(E), bias(E, 0.0f);
  std::vector<float> selection(E), weight_source(E);
  std::vector<char> allowed(E);
  std::vector<int> slot_id(K);
  std::vector<float> slot_weight(K);
  if (p.has_bias())
    for (int e = 0; e < E; ++e)
      bias[e] = load_as_f32(p.bias.data(), p.bias.dtype(), e * p.bias.stride(0));

  for (int64_t t = 0; t < p.num_tokens; ++t) {
    float* w_row = p.weights.data_as<float>() + t * p.weights.stride(0);
    IdT* id_row = p.ids.data_as<IdT>() + t * p.ids.stride(0);
    const int64_t ws = p.weights.stride(1), is = p.ids.stride(1);
    if (t >= p.num_valid_tokens) {  // padding row
      for (int k = 0; k < K; ++k) {
        w_row[k * ws] = 0.0f;
        id_row[k * is] = static_cast<IdT>(-1);
      }
      continue;
    }
    for (int e = 0; e < E; ++e)
      x[e] = load_as_f32(p.logits.data(), p.logits.dtype(),
                         t * p.logits.stride(0) + e * p.logits.stride(1));
    activate(p, x, bias, selection, weight_source);

    std::fill(allowed.begin(), allowed.end(), 1);
    if (p.num_groups > 1) keep_best_groups(p, selection, allowed);

    // Step 3: Kr best allowed experts, in selection order.
    for (int k = 0; k < Kr; ++k) {
      int best = -1;
      for (int e = 0; e < E; ++e) {
        if (!allowed[e]) continue;
        if (best < 0 || ranks_before(selection[e], e, selection[best], best)) best = e;
      }
      allowed[best] = 0;  // taken
      slot_id[k] = best;
    }
    // Steps 4-7.
    float routed_sum = 0.0f;
    for (int k = 0; k < Kr; ++k) {
      slot_weight[k] = weight_source[slot_id[k]];
      routed_sum += slot_weight[k];
    }
    for (int j = 0; j < p.num_shared; ++j) {
      slot_id[Kr + j] = E + j;
      slot_weight[Kr + j] = routed_sum / p.routed_scaling_factor;
    }
    for (int k = 0; k < K; ++k) {
      float w = slot_weight[k];
      if (p.renormalize && routed_sum > 0.0f) w = w / routed_sum;
      if (p.apply_scaling_on_output) w = w * p.routed_scaling_factor;
      w_row[k * ws] = w;
      id_row[k * is] = static_cast<IdT>(slot_id[k]);
    }
  }
}

}  // namespace

void selection_scores(const RouteProblem& p, int64_t row, float* scores) {
  const int E = p.num_experts;
  std::vector<float> x(E), bias(E, 0.0f), selection(E), weight_source(E);
  if (p.has_bias())
    for (int e = 0; e < E; ++e)
      bias[e] = load_as_f32(p.bias.data(), p.bias.dtype(), e * p.bias.stride(0));
  for (int e = 0; e < E; ++e)
    x[e] = load_as_f32(p.logits.data(), p.logits.dtype(),
                       row * p.logits.stride(0) + e * p.logits.stride(1));
  activate(p, x, bias, selection, weight_source);
  for (int e = 0; e < E; ++e) scores[e] = selection[e];
}

void route(const RouteProblem& problem) {
  if (problem.ids.dtype() == DType::i64)
    route_typed<int64_t>(problem);
  else
    route_typed<int32_t>(problem);
}

}  // namespace moekit::reference
