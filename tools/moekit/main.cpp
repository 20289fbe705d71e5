// moekit: the command-line front end (route, quant, gemm, quantize-weight, check, bench, explain,
// backends, --version).
#include <fmt/core.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <optional>
#include <string>

#include "commands.h"
#include "moekit/error.h"
#include "moekit/ops/route.h"
#include "moekit/route_harness.h"
#include "moekit/safetensors.h"
#ifdef MOEKIT_HAVE_GPU
#include "gpu/gpu_runtime.h"
#endif

namespace moekit::cli {
namespace {

// RouterConfig fields as command-line options (shared by route and explain).
struct RouteFlags {
  int topk = 0;
  std::string scoring = "softmax";
  int groups = 1;
  int topk_groups = 1;
  std::string group_score = "auto";
  float softcap = 0.0f;
  bool no_renormalize = false;
  int shared_experts = 0;
  float routed_scaling_factor = 1.0f;
  bool apply_scaling_on_output = false;
  int64_t valid_tokens = -1;
  std::string backend;
  std::string ids_dtype = "i32";
  int threads = 0;
  bool verbose = false;

  void add_to(CLI::App& app) {
    app.add_option("--topk", topk, "slots per token, including shared-expert slots")->required();
    app.add_option("--scoring", scoring, "softmax | sigmoid | sqrtsoftplus");
    app.add_option("--groups", groups, "expert groups (1 = ungrouped)");
    app.add_option("--topk-groups", topk_groups, "groups kept per token");
    app.add_option("--group-score", group_score, "max | top2_sum | auto (top2_sum iff bias)");
    app.add_option("--softcap", softcap, "softmax logit softcap c (0 = off)");
    app.add_flag("--no-renormalize", no_renormalize, "keep the raw routed weights");
    app.add_option("--shared-experts", shared_experts, "fused shared-expert slots");
    app.add_option("--routed-scaling-factor", routed_scaling_factor, "rsf");
    app.add_flag("--apply-scaling-on-output", apply_scaling_on_output, "multiply weights by rsf");
    app.add_option("--valid-tokens", valid_tokens, "rows at or past it are padding");
    app.add_option("--backend", backend, "reference | cpu | gpu (default: the fastest present)");
    app.add_option("--ids-dtype", ids_dtype, "i32 | i64");
    app.add_option("--threads", threads, "CPU threads (0 = all)");
    app.add_flag("--verbose", verbose, "print which implementation runs and why others do not");
  }

  RouterConfig config() const {
    RouterConfig c;
    c.topk = topk;
    if (scoring == "softmax")
      c.scoring = Scoring::softmax;
    else if (scoring == "sigmoid")
      c.scoring = Scoring::sigmoid;
    else if (scoring == "sqrtsoftplus")
      c.scoring = Scoring::sqrtsoftplus;
    else
      fail("route", "--scoring", scoring, "is not one of softmax, sigmoid, sqrtsoftplus");
    c.num_groups = groups;
    c.topk_groups = topk_groups;
    if (group_score == "auto")
      c.group_score = GroupScore::automatic;
    else if (group_score == "max")
      c.group_score = GroupScore::max;
    else if (group_score == "top2_sum")
      c.group_score = GroupScore::top2_sum;
    else
      fail("route", "--group-score", group_score, "is not one of max, top2_sum, auto");
    c.softcap = softcap;
    c.renormalize = !no_renormalize;
    c.num_shared_experts = shared_experts;
    c.routed_scaling_factor = routed_scaling_factor;
    c.apply_scaling_on_output = apply_scaling_on_output;
    c.num_valid_tokens = valid_tokens;
    return c;
  }

  RouteOptions options() const {
    RouteOptions o;
    o.backend = backend.empty() ? fastest_backend() : parse_backend(backend);
    o.num_threads = threads;
    return o;
  }
};

void print_choices(const std::vector<ImplementationChoice>& rows) {
  for (const ImplementationChoice& row : rows)
    std::fprintf(stderr, "  %-12s %s\n", row.name.c_str(), describe_choice(row).c_str());
}

int run_route(const std::string& input, const std::string& output, const RouteFlags& flags) {
  const RouterConfig config = flags.config();
  RouteOptions options = flags.options();
  const DType ids_dtype = parse_dtype(flags.ids_dtype);
  if (ids_dtype != DType::i32 && ids_dtype != DType::i64)
    fail("route", "--ids-dtype", flags.ids_dtype, "is not one of i32, i64");
  const SafetensorsFile file = SafetensorsFile::open(input);
  if (!file.contains("logits")) fail("route", "--input", input, "has no tensor named \"logits\"");
  const TensorView logits = file.get("logits");
  std::optional<TensorView> bias;
  if (file.contains("bias")) bias = file.get("bias");
  if (logits.ndim() != 2)
    fail("route", "logits.shape", logits.shape_str(), "must be [tokens, experts]");
  const int64_t T = logits.size(0);
  Tensor weights = Tensor::empty(DType::f32, {T, config.topk});
  Tensor ids = Tensor::empty(ids_dtype, {T, config.topk});
  if (flags.verbose) {
    std::fprintf(stderr, "route dispatch:\n");
    print_choices(explain_route(logits, bias, config, weights, ids, options));
  }
  if (options.backend == Backend::gpu) {
    // Stage through the GPU: inputs up, route, results down.
    const Device gpu = Device::gpu();
    Tensor d_logits = Tensor::copy_of(logits, gpu);
    std::optional<Tensor> d_bias;
    if (bias) d_bias = Tensor::copy_of(*bias, gpu);
    Tensor d_weights = Tensor::empty(DType::f32, {T, config.topk}, gpu);
    Tensor d_ids = Tensor::empty(ids_dtype, {T, config.topk}, gpu);
    route(d_logits, d_bias ? std::optional<TensorView>(d_bias->view()) : std::nullopt, config,
          d_weights, d_ids, options);
    copy(weights, d_weights);
    copy(ids, d_ids);
  } else {
    route(logits, bias, config, weights, ids, options);
  }
  write_safetensors(output, {{"weights", weights.view()}, {"ids", ids.view()}});
  return 0;
}

int run_explain(const std::string& model, int64_t tokens, const std::string& backend) {
  for (const harness::ModelRow& row : harness::model_table()) {
    if (!model.empty() && row.name != model) continue;
    RouteOptions options;
    options.backend = backend.empty() ? fastest_backend() : parse_backend(backend);
    const Device device = options.backend == Backend::gpu ? Device::gpu() : Device::cpu();
    // Shapes only: explain never touches data, so views of fake addresses would do, but real
    // (tiny) allocations keep every pointer check honest.
    Tensor logits = Tensor::empty(DType::bf16, {tokens, row.num_experts}, device);
    std::optional<Tensor> bias;
    if (row.has_bias) bias = Tensor::empty(DType::f32, {row.num_experts}, device);
    Tensor weights = Tensor::empty(DType::f32, {tokens, row.config.topk}, device);
    Tensor ids = Tensor::empty(DType::i32, {tokens, row.config.topk}, device);
    std::printf("%s, %lld tokens, backend %s:\n", row.name.c_str(), static_cast<long long>(tokens),
                std::string(backend_name(*options.backend)).c_str());
    for (const ImplementationChoice& c :
         explain_route(logits, bias ? std::optional<TensorView>(bias->view()) : std::nullopt,
                       row.config, weights, ids, options))
      std::printf("  %-12s %s\n", c.name.c_str(), describe_choice(c).c_str());
    if (!model.empty()) return 0;
  }
  if (!model.empty()) fail("explain", "--model", model, "is not a row of the model table");
  return 0;
}

}  // namespace
}  // namespace moekit::cli

int main(int argc, char** argv) {
  using namespace moekit;
  using namespace moekit::cli;
  CLI::App app{"moekit: MoE routing and friends for Qwen- and DeepSeek-family models"};
  app.require_subcommand(0, 1);
  app.set_version_flag("--version", std::string("moekit ") + MOEKIT_VERSION);

  CLI::App* route_cmd = app.add_subcommand("route", "route a safetensors file of logits");
  std::string input, output;
  route_cmd
      ->add_option("--input", input, "safetensors with \"logits\" [T, E] and optional \"bias\" [E]")
      ->required();
  route_cmd->add_option("--output", output, "safetensors to write \"weights\" and \"ids\" to")
      ->required();
  RouteFlags route_flags;
  route_flags.add_to(*route_cmd);

  // FP8 subcommands: each reads one safetensors file and writes another.
  const auto add_fp8_common = [](CLI::App& cmd, Fp8CommonFlags& flags, const std::string& reads,
                                 const std::string& writes) {
    cmd.add_option("--input", flags.input, "safetensors with " + reads)->required();
    cmd.add_option("--output", flags.output, "safetensors to write " + writes + " to")->required();
    cmd.add_option("--backend", flags.backend,
                   "reference | cpu | gpu (default: the fastest present)");
    cmd.add_option("--threads", flags.threads, "CPU threads (0 = all)");
  };
  CLI::App* quant_cmd =
      app.add_subcommand("quant", "per-token-group FP8 (e4m3) quantization of activations");
  QuantOptions quant;
  add_fp8_common(*quant_cmd, quant.common, "\"x\" [M, K] (f32/f16/bf16)",
                 "\"q\" (e4m3) and \"scales\"");
  quant_cmd->add_option("--group-size", quant.group_size, "elements per scale group (16..256)")
      ->required();
  quant_cmd->add_flag("--ue8m0", quant.ue8m0, "round scales up to powers of two");
  quant_cmd->add_option("--layout", quant.layout,
                        "scales storage: row | col | col-tma | packed (packed needs --ue8m0)");

  CLI::App* gemm_cmd = app.add_subcommand("gemm", "block-scaled FP8 GEMM: out = A x B^T");
  GemmOptions gemm;
  add_fp8_common(*gemm_cmd, gemm.common,
                 "\"a\" [M, K], \"a_scales\", \"b\" [N, K], \"b_scales\", optional \"bias\"",
                 "\"out\" [M, N]");
  gemm_cmd->add_option("--out-dtype", gemm.out_dtype, "bf16 | f16 | f32");

  CLI::App* quantize_weight_cmd = app.add_subcommand(
      "quantize-weight", "128x128 block FP8 quantization of a weight, as in FP8 checkpoints");
  Fp8CommonFlags quantize_weight;
  add_fp8_common(*quantize_weight_cmd, quantize_weight, "\"weight\" [N, K] (f32/f16/bf16)",
                 "\"weight\" (e4m3) and \"weight_scale_inv\"");

  CLI::App* check_cmd =
      app.add_subcommand("check", "every backend against the reference, on the model table");
  CheckOptions check;
  std::string check_backend;
  uint64_t check_seed = 0;
  check_cmd->add_option("--backend", check_backend, "only this backend");
  auto* seed_opt = check_cmd->add_option("--seed", check_seed, "seed for the random inputs");
  check_cmd->add_flag("--verbose", check.verbose, "print the dispatch choice of every row");
  check_cmd->add_flag("--quick", check.quick, "token counts up to 1024 only");
  check_cmd->add_option("--op", check.op, "route | fp8 | all (default all)");

  CLI::App* bench_cmd = app.add_subcommand("bench", "verify, then time, with roofline ratios");
  BenchOptions bench;
  std::string bench_backend;
  bench_cmd->add_option("--op", bench.op,
                        "route | gemm | gemm-grouped | quant | linear | quantize-weight");
  bench_cmd->add_option("--backend", bench_backend, "reference | cpu | gpu");
  bench_cmd->add_option("--threads", bench.threads, "CPU threads (0 = all)");
  bench_cmd->add_flag("--json", bench.json, "print a JSON array instead of a table");
  bench_cmd->add_option("--model", bench.model,
                        "one model-table row (GPU --op gemm and linear: also any \"N=<n> K=<k>\")");
  bench_cmd->add_option("--tokens", bench.tokens,
                        "one token count (--op gemm and --op linear: any M, not only the table's)");
  bench_cmd->add_option("--implementation", bench.implementation,
                        "--op gemm: only this implementation (see explain)");
  bench_cmd->add_option("--replays", bench.replays,
                        "GPU: graph replays timed per row (default 20)");
  bench_cmd->add_option("--data", bench.data,
                        "--op gemm operands: uniform (SGLang's tests, default) | normal "
                        "(DeepGEMM's: normal values, per-block amax cast) | ones (all 1.0: "
                        "a power diagnostic)");

  CLI::App* explain_cmd = app.add_subcommand(
      "explain", "which implementation of an op runs at a shape, and why the others do not");
  std::string explain_op = "route", explain_model, explain_backend;
  std::optional<int64_t> explain_tokens;
  ExplainFp8Options explain_fp8;
  explain_cmd->add_option("--op", explain_op,
                          "route (default) | gemm | linear | gemm-grouped | gemm-contiguous");
  CLI::Option* explain_model_opt = explain_cmd->add_option(
      "--model", explain_model, "route: one model-table row (default: all)");
  explain_cmd->add_option("--tokens", explain_tokens,
                          "token count, M of the FP8 ops (default: route 4096, else 1)");
  const CLI::Option* explain_grouped_opts[] = {
      explain_cmd->add_option("--groups", explain_fp8.groups,
                              "gemm-grouped: G, the GEMMs; gemm-contiguous: the experts (8)"),
      explain_cmd->add_option("--expected-rows", explain_fp8.expected_rows,
                              "gemm-grouped: the masked layout, most groups holding this many "
                              "rows (default: whole groups)")};
  const CLI::Option* explain_fp8_opts[] = {
      explain_cmd->add_option("--n", explain_fp8.n, "FP8 ops: N, the weight's rows (4096)"),
      explain_cmd->add_option("--k", explain_fp8.k, "FP8 ops: K (7168)"),
      explain_cmd->add_flag("--static-weights", explain_fp8.static_weights,
                            "FP8 ops: promise static weights (OpOptions::static_weights)"),
      explain_grouped_opts[0], explain_grouped_opts[1]};
  explain_cmd->add_option("--backend", explain_backend, "reference | cpu | gpu");

  CLI::App* backends_cmd = app.add_subcommand("backends", "the backends of this build and machine");

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::Success& e) {  // --version
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "moekit: error: %s\n", e.what());
    return 2;
  }
  try {
    if (route_cmd->parsed()) return run_route(input, output, route_flags);
    if (quant_cmd->parsed()) return run_quant(quant);
    if (gemm_cmd->parsed()) return run_gemm(gemm);
    if (quantize_weight_cmd->parsed()) return run_quantize_weight(quantize_weight);
    if (check_cmd->parsed()) {
      if (!check_backend.empty()) check.backend = parse_backend(check_backend);
      if (*seed_opt) check.seed = check_seed;
      return run_check(check);
    }
    if (bench_cmd->parsed()) {
      if (!bench_backend.empty()) bench.backend = parse_backend(bench_backend);
      return run_bench(bench);
    }
    if (explain_cmd->parsed()) {
      // A flag of the other kind of op is an error, not ignored.
      if (explain_op == "route") {
        for (const CLI::Option* o : explain_fp8_opts)
          if (o->count() > 0)
            fail("explain", o->get_name(), o->as<std::string>(),
                 "is for --op gemm, linear, gemm-grouped or gemm-contiguous");
        return run_explain(explain_model, explain_tokens.value_or(4096), explain_backend);
      }
      if (explain_model_opt->count() > 0)
        fail("explain", "--model", explain_model, "is for --op route");
      for (const CLI::Option* o : explain_grouped_opts) {
        const bool groups = o == explain_grouped_opts[0];  // (--groups: the experts, contiguous)
        if (o->count() == 0 || explain_op == "gemm-grouped" ||
            (groups && explain_op == "gemm-contiguous"))
          continue;
        fail("explain", o->get_name(), o->as<std::string>(),
             groups ? "is for --op gemm-grouped or gemm-contiguous" : "is for --op gemm-grouped");
      }
      explain_fp8.op = explain_op;
      explain_fp8.m = explain_tokens.value_or(1);
      explain_fp8.backend = explain_backend;
      return run_explain_fp8(explain_fp8);
    }
    if (backends_cmd->parsed()) {
      for (const BackendInfo& b : backends())
        std::printf("%-10s %s\n", b.name.c_str(), b.detail.c_str());
      return 0;
    }
    std::printf("%s", app.help().c_str());
    return 0;
  } catch (const Error& e) {
    std::fprintf(stderr, "moekit: error: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moekit: error: %s\n", e.what());
    return 2;
  }
}
