// The routing check harness shared by `moekit check`, `moekit bench` and the tests: the model
// table of spec/routing.md, input generators (random and adversarial) and the tie-aware comparison
// of a backend's output with the reference's.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "moekit/ops/route.h"
#include "moekit/tensor.h"

namespace moekit::harness {

struct ModelRow {
  std::string name;
  int num_experts;
  RouterConfig config;  // topk includes shared slots
  bool has_bias;
  int hidden;
};
const std::vector<ModelRow>& model_table();
// The row named `name`; throws moekit::Error if the table has none.
const ModelRow& model_row(const std::string& name);
const std::vector<int64_t>& token_counts();  // 1, 2, 7, 16, 64, 256, 1024, 4096, 8192, 16384

// What the logits look like.
enum class InputKind {
  random,     // normal(0, 2) logits, bias normal(0, 0.5)
  ties,       // logits from {-1, 0, 1}: exact ties everywhere
  nan_inf,    // rows of all-NaN, all -inf, some +inf, NaN mixed with finite, -inf mixed
  saturated,  // |logits| in [17, 60]: sigmoid saturates to exactly 0 or 1
  padding,    // random, with num_valid_tokens = tokens / 2
};
const char* input_kind_name(InputKind kind);

struct RouteCase {
  std::string label;
  int64_t tokens = 0;
  int num_experts = 0;
  RouterConfig config;
  bool has_bias = false;
  DType logits_dtype = DType::bf16;
  DType bias_dtype = DType::f32;
  DType ids_dtype = DType::i32;
  InputKind kind = InputKind::random;
  uint64_t seed = 0;
};

struct RouteInputs {
  Tensor logits;               // [T, E] on the CPU
  std::optional<Tensor> bias;  // [E] on the CPU
  std::optional<TensorView> bias_view() const {
    return bias ? std::optional<TensorView>(bias->view()) : std::nullopt;
  }
};
// Deterministic in the case's seed. Also sets case.config.num_valid_tokens for InputKind::padding.
RouteInputs make_inputs(RouteCase& route_case);

struct RouteOutputs {
  Tensor weights;  // f32 [T, K] on the CPU
  Tensor ids;      // i32/i64 [T, K] on the CPU
};
// Outputs filled with a poison pattern (NaN weights, ids 0x7f7f7f7f) so unwritten slots show.
RouteOutputs make_poisoned_outputs(const RouteCase& route_case);

struct Comparison {
  // Over rows whose routed ids match the reference's as sets; absolute, or relative to weights
  // above 1.
  double max_weight_error = 0.0;
  int64_t id_differences = 0;        // rows whose routed id set differs from the reference's
  int64_t near_tie_differences = 0;  // of those, rows where every swap is a near-tie
  int64_t invalid_rows = 0;  // duplicated / out-of-range ids, NaN weights, bad padding or shared
  bool pass = false;
  std::string first_problem;  // "row 17: ids {3, 5} vs reference {3, 9}: scores 0.12 vs 0.31"
};
// Compares outputs (on the CPU) against the reference outputs for the same inputs.
Comparison compare_with_reference(const RouteCase& route_case, const RouteInputs& inputs,
                                  const RouteOutputs& reference, const RouteOutputs& candidate);

// A case for one model-table row: its config, bias and expert count, bf16 logits.
RouteCase model_case(const ModelRow& row, int64_t tokens, InputKind kind, uint64_t seed);

// Runs the reference on the case: the expected outputs.
RouteOutputs run_reference(const RouteCase& route_case, const RouteInputs& inputs);

// Runs the case on a backend into poisoned outputs, staging through the GPU (synchronous copies)
// when the backend is the GPU. Returns the outputs on the CPU.
RouteOutputs run_backend(Backend backend, const RouteCase& route_case, const RouteInputs& inputs);

}  // namespace moekit::harness
