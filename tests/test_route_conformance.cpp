// Every CPU-side backend against the reference over randomized shapes and adversarial inputs,
// with tie-aware id comparison (spec/routing.md, "Agreement between backends").
#include <gtest/gtest.h>

#include <cstdlib>
#include <random>

#include "moekit/error.h"
#include "moekit/route_harness.h"

namespace moekit {
namespace {

using harness::InputKind;

uint64_t test_seed() {
  static const uint64_t seed = [] {
    const char* env = std::getenv("MOEKIT_TEST_SEED");
    const uint64_t s = env ? std::strtoull(env, nullptr, 10) : std::random_device{}();
    std::printf("route conformance seed: %llu (set MOEKIT_TEST_SEED to repeat)\n",
                static_cast<unsigned long long>(s));
    return s;
  }();
  return seed;
}

// A random valid case: E from the contract's list, K up to 64, groups, shared slots, dtypes.
harness::RouteCase random_case(std::mt19937_64& rng, uint64_t case_seed) {
  static const int kExperts[] = {1, 2, 3, 8, 48, 60, 64, 128, 160, 256, 384, 512, 896, 2048};
  static const DType kFloat[] = {DType::f32, DType::f16, DType::bf16};
  static const InputKind kKinds[] = {InputKind::random,  InputKind::random,    InputKind::ties,
                                     InputKind::nan_inf, InputKind::saturated, InputKind::padding};
  auto pick = [&](int n) { return static_cast<int>(rng() % static_cast<uint64_t>(n)); };
  harness::RouteCase c;
  c.num_experts = kExperts[pick(14)];
  const int E = c.num_experts;
  RouterConfig& cfg = c.config;
  cfg.scoring = static_cast<Scoring>(pick(3));
  // Groups: a divisor of E up to 64 (half of the cases stay ungrouped).
  if (pick(2) == 0) {
    std::vector<int> divisors;
    for (int g = 2; g <= std::min(E, 64); ++g)
      if (E % g == 0) divisors.push_back(g);
    if (!divisors.empty()) {
      cfg.num_groups = divisors[static_cast<size_t>(pick(static_cast<int>(divisors.size())))];
      cfg.topk_groups = 1 + pick(cfg.num_groups);
      cfg.group_score = pick(2) ? GroupScore::max : GroupScore::top2_sum;
    }
  }
  const int allowed = cfg.topk_groups * (E / cfg.num_groups);
  const int routed = 1 + pick(std::min(allowed, 64));
  cfg.num_shared_experts = pick(3) == 0 ? pick(std::min(3, 64 - routed) + 1) : 0;
  cfg.topk = routed + cfg.num_shared_experts;
  cfg.renormalize = pick(4) != 0;
  cfg.routed_scaling_factor = pick(2) ? 1.0f : 2.5f;
  cfg.apply_scaling_on_output = pick(3) == 0;
  if (cfg.scoring == Scoring::softmax && pick(4) == 0)
    cfg.softcap = 30.0f * static_cast<float>(pick(2) + 1) / 10.0f;
  c.has_bias = pick(2) == 0;
  c.logits_dtype = kFloat[pick(3)];
  c.bias_dtype = kFloat[pick(3)];
  c.ids_dtype = pick(4) == 0 ? DType::i64 : DType::i32;
  c.kind = kKinds[pick(6)];
  c.tokens = pick(8) == 0 ? 0 : 1 + pick(E >= 896 ? 40 : 200);
  c.seed = case_seed;
  return c;
}

std::string describe(const harness::RouteCase& c) {
  const RouterConfig& k = c.config;
  return "E=" + std::to_string(c.num_experts) + " T=" + std::to_string(c.tokens) +
         " K=" + std::to_string(k.topk) + " S=" + std::to_string(k.num_shared_experts) +
         " scoring=" + std::to_string(static_cast<int>(k.scoring)) +
         " G=" + std::to_string(k.num_groups) + " TG=" + std::to_string(k.topk_groups) +
         " group_score=" + std::to_string(static_cast<int>(k.group_score)) +
         " softcap=" + std::to_string(k.softcap) + " renorm=" + std::to_string(k.renormalize) +
         " rsf=" + std::to_string(k.routed_scaling_factor) +
         " on_output=" + std::to_string(k.apply_scaling_on_output) +
         " bias=" + std::to_string(c.has_bias) +
         " logits=" + std::string(dtype_name(c.logits_dtype)) +
         " bias_dtype=" + std::string(dtype_name(c.bias_dtype)) +
         " ids=" + std::string(dtype_name(c.ids_dtype)) +
         " inputs=" + harness::input_kind_name(c.kind) + " case_seed=" + std::to_string(c.seed);
}

void check_backend(Backend backend, int cases) {
  std::mt19937_64 rng(test_seed() ^ static_cast<uint64_t>(backend) * 0x9e3779b97f4a7c15ull);
  int64_t near_ties = 0;
  for (int i = 0; i < cases; ++i) {
    harness::RouteCase c = random_case(rng, rng());
    const harness::RouteInputs in = harness::make_inputs(c);
    const harness::RouteOutputs ref = harness::run_reference(c, in);
    harness::RouteOutputs out = harness::make_poisoned_outputs(c);
    RouteOptions options;
    options.backend = backend;
    options.num_threads = 1 + static_cast<int>(rng() % 2);
    route(in.logits, in.bias_view(), c.config, out.weights, out.ids, options);
    const harness::Comparison cmp = harness::compare_with_reference(c, in, ref, out);
    near_ties += cmp.near_tie_differences;
    ASSERT_TRUE(cmp.pass) << "case " << i << ": " << describe(c) << "\n  " << cmp.first_problem
                          << "\n  invalid rows " << cmp.invalid_rows << ", id differences "
                          << cmp.id_differences << " (" << cmp.near_tie_differences
                          << " near-ties), max weight error " << cmp.max_weight_error;
    // Run to run: bitwise identical.
    harness::RouteOutputs again = harness::make_poisoned_outputs(c);
    route(in.logits, in.bias_view(), c.config, again.weights, again.ids, options);
    ASSERT_EQ(0, std::memcmp(out.weights.data(), again.weights.data(), out.weights.nbytes()))
        << describe(c);
    ASSERT_EQ(0, std::memcmp(out.ids.data(), again.ids.data(), out.ids.nbytes())) << describe(c);
  }
  std::printf("%s: %d cases agree with the reference (%lld rows differ only by near-ties)\n",
              std::string(backend_name(backend)).c_str(), cases, static_cast<long long>(near_ties));
}

TEST(RouteConformance, CpuMatchesReferenceOnRandomShapes) { check_backend(Backend::cpu, 400); }

// The model table at decode and small prefill sizes, every input kind.
TEST(RouteConformance, CpuMatchesReferenceOnModelTable) {
  uint64_t case_seed = test_seed();
  for (const harness::ModelRow& row : harness::model_table()) {
    for (int64_t tokens : {int64_t{1}, int64_t{7}, int64_t{64}, int64_t{300}}) {
      for (InputKind kind : {InputKind::random, InputKind::ties, InputKind::nan_inf,
                             InputKind::saturated, InputKind::padding}) {
        harness::RouteCase c = harness::model_case(row, tokens, kind, case_seed++);
        const harness::RouteInputs in = harness::make_inputs(c);
        const harness::RouteOutputs ref = harness::run_reference(c, in);
        harness::RouteOutputs out = harness::make_poisoned_outputs(c);
        route(in.logits, in.bias_view(), c.config, out.weights, out.ids,
              RouteOptions{.backend = Backend::cpu});
        const harness::Comparison cmp = harness::compare_with_reference(c, in, ref, out);
        ASSERT_TRUE(cmp.pass) << row.name << " " << describe(c) << ": " << cmp.first_problem;
      }
    }
  }
}

TEST(RouteConformance, ModelRowsAreFoundByNameAndUnknownNamesAreErrors) {
  EXPECT_EQ(harness::model_row("DeepSeek-V3").num_experts, 256);
  EXPECT_EQ(harness::model_row("Qwen3-30B-A3B").config.topk, 8);
  try {
    harness::model_row("Qwen9");
    ADD_FAILURE() << "no error for an unknown row";
  } catch (const Error& e) {
    EXPECT_EQ(e.argument(), "name");
    EXPECT_EQ(e.value(), "Qwen9");
  }
}

// The comparison itself must catch what it is there to catch.
TEST(RouteConformance, ComparisonDetectsWrongOutputs) {
  harness::RouteCase c;
  c.tokens = 4;
  c.num_experts = 16;
  c.config.topk = 3;
  c.logits_dtype = DType::f32;  // no exact ties, so a swapped id is never a near-tie
  c.seed = test_seed();
  const harness::RouteInputs in = harness::make_inputs(c);
  const harness::RouteOutputs ref = harness::run_reference(c, in);
  auto copy_of = [&](const harness::RouteOutputs& o) {
    return harness::RouteOutputs{Tensor::copy_of(o.weights, Device::cpu()),
                                 Tensor::copy_of(o.ids, Device::cpu())};
  };
  EXPECT_TRUE(harness::compare_with_reference(c, in, ref, copy_of(ref)).pass);
  harness::RouteOutputs wrong_weight = copy_of(ref);
  wrong_weight.weights.data_as<float>()[5] += 1e-5f;
  EXPECT_FALSE(harness::compare_with_reference(c, in, ref, wrong_weight).pass);
  harness::RouteOutputs duplicate = copy_of(ref);
  duplicate.ids.data_as<int32_t>()[1] = duplicate.ids.data_as<int32_t>()[0];
  EXPECT_FALSE(harness::compare_with_reference(c, in, ref, duplicate).pass);
  harness::RouteOutputs out_of_range = copy_of(ref);
  out_of_range.ids.data_as<int32_t>()[2] = 16;
  EXPECT_FALSE(harness::compare_with_reference(c, in, ref, out_of_range).pass);
  harness::RouteOutputs not_a_tie = copy_of(ref);
  // Replace the best expert of row 0 by the worst one: a real mis-route, not a near-tie.
  int32_t* ids = not_a_tie.ids.data_as<int32_t>();
  const int32_t chosen[3] = {ids[0], ids[1], ids[2]};
  int32_t unchosen = -1;
  for (int32_t e = 0; e < 16; ++e)
    if (e != chosen[0] && e != chosen[1] && e != chosen[2]) unchosen = e;
  ids[0] = unchosen;
  EXPECT_FALSE(harness::compare_with_reference(c, in, ref, not_a_tie).pass);
}

}  // namespace
}  // namespace moekit
