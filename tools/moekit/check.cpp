// `moekit check`: every backend present against the reference, over the model table.
#include <fmt/core.h>

#include <cstdio>
#include <random>

#include "commands.h"
#include "moekit/error.h"
#include "moekit/route_harness.h"
#ifdef MOEKIT_HAVE_GPU
#include "gpu/gpu_runtime.h"
#endif

namespace moekit::cli {
namespace {

using harness::InputKind;

// The dispatch table's verdict for a case: which entry runs and why the others decline.
std::vector<ImplementationChoice> explain_case(Backend backend, const harness::RouteCase& c,
                                               const harness::RouteInputs& in) {
  const Device device = backend == Backend::gpu ? Device::gpu() : Device::cpu();
  // Dispatch depends on shapes, dtypes, strides and device: tiny stand-ins of the right kind.
  Tensor logits = Tensor::empty(c.logits_dtype, {c.tokens, c.num_experts}, device);
  std::optional<Tensor> bias;
  if (in.bias) bias = Tensor::empty(c.bias_dtype, {c.num_experts}, device);
  Tensor weights = Tensor::empty(DType::f32, {c.tokens, c.config.topk}, device);
  Tensor ids = Tensor::empty(c.ids_dtype, {c.tokens, c.config.topk}, device);
  RouteOptions options;
  options.backend = backend;
  return explain_route(logits, bias ? std::optional<TensorView>(bias->view()) : std::nullopt,
                       c.config, weights, ids, options);
}

int check_route(const CheckOptions& options, const std::vector<Backend>& tested, uint64_t seed);

}  // namespace

int run_check(const CheckOptions& options) {
  if (options.op != "route" && options.op != "fp8" && options.op != "all")
    fail("check", "--op", options.op, "is not one of route, fp8, all");
  const uint64_t seed = options.seed ? *options.seed : std::random_device{}();
  std::printf("moekit check: seed %llu (rerun with --seed %llu)\n",
              static_cast<unsigned long long>(seed), static_cast<unsigned long long>(seed));
  std::vector<Backend> tested;
  for (const BackendInfo& info : backends()) {
    if (options.backend ? info.backend != *options.backend : info.backend == Backend::reference)
      continue;
    tested.push_back(info.backend);
    std::printf("backend %-9s %s\n", info.name.c_str(), info.detail.c_str());
  }
  if (options.backend && tested.empty())
    fail("check", "--backend", std::string(backend_name(*options.backend)),
         "is not present on this machine");
  int failures = 0;
  if (options.op != "fp8") failures += check_route(options, tested, seed);
  if (options.op != "route") failures += run_fp8_check(options, seed, tested);
  std::printf("\n%s: %d failing row(s); seed %llu\n", failures ? "FAIL" : "PASS", failures,
              static_cast<unsigned long long>(seed));
  return failures ? 1 : 0;
}

namespace {

// The routing table: every model row and token count, on each tested backend.
int check_route(const CheckOptions& options, const std::vector<Backend>& tested, uint64_t seed) {
  const InputKind kinds[] = {InputKind::random, InputKind::ties, InputKind::nan_inf,
                             InputKind::saturated, InputKind::padding};
  std::printf("\n%-20s %6s %-9s %-12s %12s %-22s %s\n", "model", "tokens", "backend",
              "implementation", "max |dw|", "id diffs (near-tie)", "result");
  int failures = 0;
  uint64_t case_seed = seed;
  for (const harness::ModelRow& row : harness::model_table()) {
    for (int64_t tokens : harness::token_counts()) {
      if (options.quick && tokens > 1024) continue;
      for (Backend backend : tested) {
        double max_error = 0.0;
        int64_t diffs = 0, near = 0;
        bool pass = true;
        std::string problem, implementation;
        std::vector<ImplementationChoice> dispatch;
        for (InputKind kind : kinds) {
          // Adversarial inputs at prefill sizes add time, not coverage.
          if (kind != InputKind::random && tokens > 1024) continue;
          harness::RouteCase c = harness::model_case(row, tokens, kind, case_seed++);
          const harness::RouteInputs in = harness::make_inputs(c);
          if (dispatch.empty()) {
            dispatch = explain_case(backend, c, in);
            implementation = "(none)";
            for (const ImplementationChoice& choice : dispatch)
              if (choice.chosen) implementation = choice.name;
          }
          const harness::RouteOutputs ref = harness::run_reference(c, in);
          const harness::RouteOutputs out = harness::run_backend(backend, c, in);
          const harness::Comparison cmp = harness::compare_with_reference(c, in, ref, out);
          max_error = std::max(max_error, cmp.max_weight_error);
          diffs += cmp.id_differences;
          near += cmp.near_tie_differences;
          if (!cmp.pass) {
            pass = false;
            if (problem.empty())
              problem =
                  std::string(harness::input_kind_name(kind)) + " inputs, " + cmp.first_problem;
          }
        }
        std::printf("%-20s %6lld %-9s %-12s %12.3g %-22s %s\n", row.name.c_str(),
                    static_cast<long long>(tokens), std::string(backend_name(backend)).c_str(),
                    implementation.c_str(), max_error, fmt::format("{} ({})", diffs, near).c_str(),
                    pass ? "PASS" : "FAIL");
        if (!pass) {
          ++failures;
          std::printf("    %s\n", problem.c_str());
        }
        if (options.verbose)
          for (const ImplementationChoice& choice : dispatch)
            if (!choice.chosen)
              std::printf("    %-12s %s\n", choice.name.c_str(), describe_choice(choice).c_str());
      }
    }
  }
  std::printf("routing: %d failing row(s); inputs per row: random%s\n", failures,
              " (+ ties, nan/inf, saturated, padding up to 1024 tokens)");
  return failures;
}

}  // namespace

}  // namespace moekit::cli
