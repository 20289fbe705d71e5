#include "moekit/route_harness.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <iterator>
#include <limits>
#include <random>

#include "moekit/error.h"
#include "ops/route_problem.h"
#include "reference/route_reference.h"

namespace moekit::harness {
namespace {

RouterConfig config(int topk, Scoring scoring, int groups, int topk_groups, bool renormalize,
                    int shared, float rsf) {
  RouterConfig c;
  c.topk = topk;
  c.scoring = scoring;
  c.num_groups = groups;
  c.topk_groups = topk_groups;
  c.renormalize = renormalize;
  c.num_shared_experts = shared;
  c.routed_scaling_factor = rsf;
  return c;
}

}  // namespace

const std::vector<ModelRow>& model_table() {
  static const std::vector<ModelRow> rows = [] {
    const Scoring softmax = Scoring::softmax, sigmoid = Scoring::sigmoid;
    std::vector<ModelRow> r = {
        {"Mixtral-8x7B", 8, config(2, softmax, 1, 1, true, 0, 1.0f), false, 4096},
        {"Qwen1.5-MoE-A2.7B", 60, config(4, softmax, 1, 1, false, 0, 1.0f), false, 2048},
        {"Qwen2-57B-A14B", 64, config(8, softmax, 1, 1, false, 0, 1.0f), false, 3584},
        {"Qwen3-30B-A3B", 128, config(8, softmax, 1, 1, true, 0, 1.0f), false, 2048},
        {"Qwen3-235B-A22B", 128, config(8, softmax, 1, 1, true, 0, 1.0f), false, 4096},
        {"Qwen3.5-35B-A3B", 256, config(8, softmax, 1, 1, true, 0, 1.0f), false, 2048},
        {"Qwen3-Next-80B-A3B", 512, config(10, softmax, 1, 1, true, 0, 1.0f), false, 2048},
        {"DeepSeek-V2", 160, config(6, softmax, 8, 3, false, 0, 16.0f), false, 5120},
        {"DeepSeek-V3", 256, config(9, sigmoid, 8, 4, true, 1, 2.5f), true, 7168},
        {"Kimi-K2", 384, config(9, sigmoid, 1, 1, true, 1, 2.827f), true, 7168},
        {"GLM-4.5", 160, config(9, sigmoid, 1, 1, true, 1, 2.5f), true, 5120},
    };
    r[7].config.group_score = GroupScore::max;
    r[8].config.group_score = GroupScore::top2_sum;
    return r;
  }();
  return rows;
}

const ModelRow& model_row(const std::string& name) {
  for (const ModelRow& row : model_table())
    if (row.name == name) return row;
  fail("model_row", "name", name, "is not a row of the model table");
}

const std::vector<int64_t>& token_counts() {
  static const std::vector<int64_t> counts = {1, 2, 7, 16, 64, 256, 1024, 4096, 8192, 16384};
  return counts;
}

const char* input_kind_name(InputKind kind) {
  switch (kind) {
    case InputKind::random:
      return "random";
    case InputKind::ties:
      return "ties";
    case InputKind::nan_inf:
      return "nan/inf";
    case InputKind::saturated:
      return "saturated";
    case InputKind::padding:
      return "padding";
  }
  return "?";
}

RouteInputs make_inputs(RouteCase& c) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
  std::mt19937_64 rng(c.seed);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  const int64_t T = c.tokens;
  const int E = c.num_experts;
  RouteInputs in;
  in.logits = Tensor::empty(c.logits_dtype, {T, E});
  auto put = [&](int64_t t, int e, float v) {
    store_from_f32(in.logits.data(), c.logits_dtype, t * E + e, v);
  };
  for (int64_t t = 0; t < T; ++t) {
    switch (c.kind) {
      case InputKind::random:
      case InputKind::padding:
        for (int e = 0; e < E; ++e) put(t, e, normal(rng));
        break;
      case InputKind::ties:
        for (int e = 0; e < E; ++e) put(t, e, static_cast<float>(static_cast<int>(rng() % 3) - 1));
        break;
      case InputKind::saturated:
        for (int e = 0; e < E; ++e) {
          const float magnitude = 17.0f + static_cast<float>(rng() % 44);
          put(t, e, rng() % 4 == 0 ? -magnitude : magnitude);
        }
        break;
      case InputKind::nan_inf: {
        const int pattern = static_cast<int>(t % 6);
        for (int e = 0; e < E; ++e) {
          float v = normal(rng);
          if (pattern == 0) v = kNaN;                     // all NaN
          if (pattern == 1) v = -kInf;                    // all -inf
          if (pattern == 2 && rng() % 5 == 0) v = kInf;   // some +inf
          if (pattern == 3 && rng() % 3 == 0) v = kNaN;   // NaN mixed with finite
          if (pattern == 4 && rng() % 2 == 0) v = -kInf;  // -inf mixed with finite
          if (pattern == 5 && rng() % 4 == 0) v = (rng() % 2) ? kInf : kNaN;  // everything
          put(t, e, v);
        }
        break;
      }
    }
  }
  if (c.has_bias) {
    in.bias = Tensor::empty(c.bias_dtype, {E});
    std::normal_distribution<float> bias_normal(0.0f, 0.5f);
    for (int e = 0; e < E; ++e) {
      float v = bias_normal(rng);
      if (c.kind == InputKind::ties) v = static_cast<float>(rng() % 2) * 0.5f;
      store_from_f32(in.bias->data(), c.bias_dtype, e, v);
    }
  }
  if (c.kind == InputKind::padding) c.config.num_valid_tokens = T / 2;
  return in;
}

RouteOutputs make_poisoned_outputs(const RouteCase& c) {
  const int64_t T = c.tokens, K = c.config.topk;
  RouteOutputs out{Tensor::empty(DType::f32, {T, K}), Tensor::empty(c.ids_dtype, {T, K})};
  std::fill_n(out.weights.data_as<float>(), T * K, std::numeric_limits<float>::quiet_NaN());
  std::memset(out.ids.data(), 0x7f, out.ids.nbytes());
  return out;
}

RouteCase model_case(const ModelRow& row, int64_t tokens, InputKind kind, uint64_t seed) {
  RouteCase c;
  c.label = row.name;
  c.tokens = tokens;
  c.num_experts = row.num_experts;
  c.config = row.config;
  c.has_bias = row.has_bias;
  c.kind = kind;
  c.seed = seed;
  return c;
}

RouteOutputs run_backend(Backend backend, const RouteCase& c, const RouteInputs& in) {
  RouteOutputs out = make_poisoned_outputs(c);
  RouteOptions options;
  options.backend = backend;
  if (backend != Backend::gpu) {
    route(in.logits, in.bias_view(), c.config, out.weights, out.ids, options);
    return out;
  }
  const Device gpu = Device::gpu();
  Tensor logits = Tensor::copy_of(in.logits, gpu);
  std::optional<Tensor> bias;
  if (in.bias) bias = Tensor::copy_of(*in.bias, gpu);
  Tensor weights = Tensor::copy_of(out.weights, gpu);  // poisoned too
  Tensor ids = Tensor::copy_of(out.ids, gpu);
  route(logits, bias ? std::optional<TensorView>(bias->view()) : std::nullopt, c.config, weights,
        ids, options);
  copy(out.weights, weights);  // synchronous: the route has finished
  copy(out.ids, ids);
  return out;
}

RouteOutputs run_reference(const RouteCase& c, const RouteInputs& in) {
  RouteOutputs out = make_poisoned_outputs(c);
  route(in.logits, in.bias_view(), c.config, out.weights, out.ids,
        RouteOptions{.backend = Backend::reference});
  return out;
}

namespace {

int64_t id_at(const Tensor& ids, int64_t i) {
  return ids.dtype() == DType::i64 ? ids.data_as<int64_t>()[i] : ids.data_as<int32_t>()[i];
}

bool near_tie(float a, float b) {
  if (a == b) return true;
  if (!std::isfinite(a) || !std::isfinite(b)) return false;
  return std::fabs(a - b) <= 1e-6f * std::max(std::fabs(a), std::fabs(b));
}

std::string list(const std::vector<int64_t>& v) {
  std::string s = "{";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "}";
}

}  // namespace

Comparison compare_with_reference(const RouteCase& c, const RouteInputs& in,
                                  const RouteOutputs& ref, const RouteOutputs& out) {
  Comparison cmp;
  const int64_t T = c.tokens;
  const int K = c.config.topk, S = c.config.num_shared_experts, Kr = K - S;
  const int E = c.num_experts;
  const int64_t valid = c.config.num_valid_tokens < 0 ? T : c.config.num_valid_tokens;
  // The problem, to recompute the reference's selection scores for the near-tie decision.
  const RouteProblem problem =
      make_route_problem("check", in.logits, in.bias_view(), c.config, ref.weights, ref.ids, {});
  std::vector<float> scores(static_cast<size_t>(E));
  auto note = [&](const std::string& problem_text) {
    if (cmp.first_problem.empty()) cmp.first_problem = problem_text;
  };
  const float* w_ref = ref.weights.data_as<float>();
  const float* w_out = out.weights.data_as<float>();
  for (int64_t t = 0; t < T; ++t) {
    const std::string row = "row " + std::to_string(t) + ": ";
    // Validity of the candidate row on its own.
    bool valid_row = true;
    std::vector<int64_t> got, want;
    for (int k = 0; k < K; ++k) {
      const int64_t id = id_at(out.ids, t * K + k);
      const float w = w_out[t * K + k];
      if (std::isnan(w)) {
        valid_row = false;
        note(row + "NaN weight in slot " + std::to_string(k));
      }
      if (t >= valid) {
        if (id != -1 || w != 0.0f) {
          valid_row = false;
          note(row + "padding row must have id -1 and weight 0, got id " + std::to_string(id));
        }
        continue;
      }
      if (k < Kr) {
        if (id < 0 || id >= E) {
          valid_row = false;
          note(row + "routed id " + std::to_string(id) + " out of range");
        }
        got.push_back(id);
        want.push_back(id_at(ref.ids, t * K + k));
      } else if (id != E + (k - Kr)) {
        valid_row = false;
        note(row + "shared slot " + std::to_string(k) + " has id " + std::to_string(id));
      }
    }
    std::vector<int64_t> got_sorted = got, want_sorted = want;
    std::sort(got_sorted.begin(), got_sorted.end());
    std::sort(want_sorted.begin(), want_sorted.end());
    if (std::adjacent_find(got_sorted.begin(), got_sorted.end()) != got_sorted.end()) {
      valid_row = false;
      note(row + "duplicated ids " + list(got));
    }
    if (!valid_row) {
      ++cmp.invalid_rows;
      continue;
    }
    if (t >= valid) continue;
    if (got_sorted != want_sorted) {
      ++cmp.id_differences;
      // Every id only in one output must pair with a near-tied id only in the other.
      std::vector<int64_t> only_got, only_want;
      std::set_difference(got_sorted.begin(), got_sorted.end(), want_sorted.begin(),
                          want_sorted.end(), std::back_inserter(only_got));
      std::set_difference(want_sorted.begin(), want_sorted.end(), got_sorted.begin(),
                          got_sorted.end(), std::back_inserter(only_want));
      reference::selection_scores(problem, t, scores.data());
      // Sort both sides by reference score; pair them in order.
      auto by_score = [&](int64_t a, int64_t b) { return scores[a] > scores[b]; };
      std::sort(only_got.begin(), only_got.end(), by_score);
      std::sort(only_want.begin(), only_want.end(), by_score);
      bool all_near = only_got.size() == only_want.size();
      for (size_t i = 0; all_near && i < only_got.size(); ++i)
        all_near = near_tie(scores[only_got[i]], scores[only_want[i]]);
      if (all_near) {
        ++cmp.near_tie_differences;
      } else {
        note(row + "ids " + list(got) + " vs reference " + list(want) + " (not a near-tie)");
      }
      continue;
    }
    // Same routed set: compare weights slot by slot after matching ids.
    for (int k = 0; k < K; ++k) {
      int match = k;
      if (k < Kr) {
        const int64_t id = id_at(out.ids, t * K + k);
        for (int j = 0; j < Kr; ++j)
          if (id_at(ref.ids, t * K + j) == id) match = j;
      }
      // 1e-6 absolute (the contract) on weights up to 1, relative above: an unnormalized
      // sqrtsoftplus weight can be 1e19, where 1e-6 is far below one f32 ulp.
      // A router that scales its output by rsf scales the rounding of the reference too.
      const double ref_w = w_ref[t * K + match];
      const double scale = c.config.apply_scaling_on_output ? c.config.routed_scaling_factor : 1.0;
      const double err = std::fabs(static_cast<double>(w_out[t * K + k]) - ref_w) /
                         std::max({1.0, std::fabs(ref_w), scale});
      if (!(err <= cmp.max_weight_error)) cmp.max_weight_error = err;
    }
  }
  if (cmp.max_weight_error > 1e-6)
    note("max weight error " + std::to_string(cmp.max_weight_error) + " exceeds 1e-6");
  cmp.pass = cmp.invalid_rows == 0 && cmp.max_weight_error <= 1e-6 &&
             cmp.near_tie_differences == cmp.id_differences;
  return cmp;
}

}  // namespace moekit::harness
