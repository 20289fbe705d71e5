// Every argument error of the routing contract (spec/routing.md, "Arguments that are errors"):
// route throws moekit::Error naming the argument and the bad value, and writes nothing.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "moekit/backend.h"
#include "moekit/error.h"
#include "moekit/ops/route.h"
#include "moekit/tensor.h"

namespace moekit {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr uint8_t kPattern = 0xa5;  // every byte of the outputs before the call

// A valid call (T tokens, E experts, K slots, f32 logits and bias, f32 weights, i32 ids) whose
// pieces a test breaks one at a time. The outputs live in pattern-filled memory large enough for
// any of the shapes and dtypes used here, so any write shows.
struct Call {
  int64_t tokens, experts;
  std::vector<float> logits_data, bias_data;
  std::vector<uint8_t> weights_memory, ids_memory;
  TensorView logits, weights, ids;
  std::optional<TensorView> bias;
  RouterConfig config;
  RouteOptions options;

  Call(int64_t t, int64_t e, int k)
      : tokens(t),
        experts(e),
        logits_data(static_cast<size_t>(t * e + 16), 0.5f),
        bias_data(static_cast<size_t>(e + 16), 0.0f),
        weights_memory(static_cast<size_t>((t + 2) * (k + 2) * 8 + 64), kPattern),
        ids_memory(weights_memory.size(), kPattern) {
    for (size_t i = 0; i < logits_data.size(); ++i)
      logits_data[i] = std::sin(static_cast<float>(i));
    logits = TensorView(logits_data.data(), DType::f32, {t, e});
    weights = Weights(DType::f32, {t, k});
    ids = Ids(DType::i32, {t, k});
    config.topk = k;
  }
  TensorView Logits(DType dtype, std::initializer_list<int64_t> shape) {
    return TensorView(logits_data.data(), dtype, shape);
  }
  TensorView Bias(DType dtype, std::initializer_list<int64_t> shape) {
    return TensorView(bias_data.data(), dtype, shape);
  }
  TensorView Weights(DType dtype, std::initializer_list<int64_t> shape) {
    return TensorView(weights_memory.data(), dtype, shape);
  }
  TensorView Ids(DType dtype, std::initializer_list<int64_t> shape) {
    return TensorView(ids_memory.data(), dtype, shape);
  }
  void Route() const { route(logits, bias, config, weights, ids, options); }
  bool Untouched() const {
    for (uint8_t b : weights_memory)
      if (b != kPattern) return false;
    for (uint8_t b : ids_memory)
      if (b != kPattern) return false;
    return true;
  }
};

// Runs call (route or a wrapper on c's tensors), expects an Error naming argument with a value
// that value_ok accepts, both in the message, and c's outputs untouched.
void ExpectRejected(const Call& c, const std::function<void()>& call, const std::string& argument,
                    const std::function<bool(const std::string&)>& value_ok,
                    const std::string& want) {
  try {
    call();
    ADD_FAILURE() << "no Error thrown; expected one naming " << argument << "=" << want;
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_EQ(e.argument(), argument) << what;
    EXPECT_TRUE(value_ok(e.value()))
        << "value \"" << e.value() << "\", expected " << want << "; message: " << what;
    EXPECT_NE(what.find(e.argument()), std::string::npos) << what;
    EXPECT_NE(what.find(e.value()), std::string::npos) << what;
  }
  EXPECT_TRUE(c.Untouched()) << "outputs written by a rejected call";
}

void ExpectRejected(const Call& c, const std::string& argument, const std::string& value) {
  ExpectRejected(
      c, [&] { c.Route(); }, argument, [&](const std::string& v) { return v == value; }, value);
}

// For float arguments: the value must read back as the bad number (NaN as NaN).
void ExpectRejectedNumber(const Call& c, const std::string& argument, float value) {
  auto same_number = [value](const std::string& v) {
    char* end = nullptr;
    const float parsed = std::strtof(v.c_str(), &end);
    if (v.empty() || *end != '\0') return false;
    return std::isnan(value) ? std::isnan(parsed) : parsed == value;
  };
  ExpectRejected(
      c, [&] { c.Route(); }, argument, same_number, std::to_string(value));
}

// A fake device pointer: validation must fail before anything dereferences it.
void* FakeGpuPointer() { return reinterpret_cast<void*>(uintptr_t{0x1000}); }

TEST(RouteErrors, TopkBelowOne) {
  Call zero(2, 8, 0);
  ExpectRejected(zero, "topk", "0");
  Call negative(2, 8, 2);
  negative.config.topk = -1;
  ExpectRejected(negative, "topk", "-1");
}

TEST(RouteErrors, RoutedSlotsBelowOne) {
  Call c(2, 8, 2);
  c.config.num_shared_experts = 2;  // K - S = 0
  ExpectRejected(c, "num_shared_experts", "2");
  c.config.num_shared_experts = 3;
  ExpectRejected(c, "num_shared_experts", "3");
  Call one(2, 8, 1);
  one.config.num_shared_experts = 1;
  ExpectRejected(one, "num_shared_experts", "1");
  c.config.num_shared_experts = -1;  // negative S is no shared slot count either
  ExpectRejected(c, "num_shared_experts", "-1");
}

TEST(RouteErrors, RoutedSlotsAboveExperts) {
  Call c(2, 8, 9);
  ExpectRejected(c, "topk", "9");
  Call shared(2, 8, 10);
  shared.config.num_shared_experts = 1;  // 9 routed of 8
  ExpectRejected(shared, "topk", "10");
  Call single(2, 1, 2);
  ExpectRejected(single, "topk", "2");
}

TEST(RouteErrors, GroupsDoNotDivideExperts) {
  Call c(2, 8, 2);
  c.config.num_groups = 3;
  ExpectRejected(c, "num_groups", "3");
  c.config.num_groups = 0;
  ExpectRejected(c, "num_groups", "0");
  c.config.num_groups = 16;  // more groups than experts
  ExpectRejected(c, "num_groups", "16");
}

TEST(RouteErrors, TopkGroupsBelowOne) {
  Call c(2, 8, 2);
  c.config.num_groups = 4;
  c.config.topk_groups = 0;
  ExpectRejected(c, "topk_groups", "0");
  c.config.topk_groups = -2;
  ExpectRejected(c, "topk_groups", "-2");
}

TEST(RouteErrors, TopkGroupsAboveGroups) {
  Call c(2, 8, 2);
  c.config.num_groups = 4;
  c.config.topk_groups = 5;
  ExpectRejected(c, "topk_groups", "5");
  Call ungrouped(2, 8, 2);
  ungrouped.config.topk_groups = 2;  // G = 1
  ExpectRejected(ungrouped, "topk_groups", "2");
}

TEST(RouteErrors, KeptGroupsHoldFewerExpertsThanRoutedSlots) {
  Call c(2, 8, 3);
  c.config.num_groups = 4;  // EPG = 2
  c.config.topk_groups = 1;
  ExpectRejected(c, "topk_groups", "1");
  Call shared(2, 8, 4);
  shared.config.num_shared_experts = 1;  // Kr = 3 > 2
  shared.config.num_groups = 4;
  shared.config.topk_groups = 1;
  ExpectRejected(shared, "topk_groups", "1");
}

TEST(RouteErrors, SoftcapWithNonSoftmaxScoring) {
  for (Scoring scoring : {Scoring::sigmoid, Scoring::sqrtsoftplus}) {
    Call c(2, 8, 2);
    c.config.scoring = scoring;
    c.config.softcap = 30.0f;
    ExpectRejectedNumber(c, "softcap", 30.0f);
  }
}

TEST(RouteErrors, SoftcapNegativeOrNotFinite) {
  for (float softcap : {-1.0f, -0.5f, kNaN, kInf}) {
    SCOPED_TRACE(std::to_string(softcap));
    Call c(2, 8, 2);
    c.config.softcap = softcap;
    ExpectRejectedNumber(c, "softcap", softcap);
  }
}

TEST(RouteErrors, BiasLengthIsNotNumExperts) {
  Call c(2, 8, 2);
  c.bias = c.Bias(DType::f32, {7});
  ExpectRejected(c, "bias.shape", "[7]");
  c.bias = c.Bias(DType::f32, {9});
  ExpectRejected(c, "bias.shape", "[9]");
}

TEST(RouteErrors, BiasWrongRank) {
  Call c(2, 8, 2);
  c.bias = c.Bias(DType::f32, {1, 8});
  ExpectRejected(c, "bias.shape", "[1, 8]");
  c.bias = c.Bias(DType::f32, {8, 1});
  ExpectRejected(c, "bias.shape", "[8, 1]");
}

TEST(RouteErrors, WeightsShapeIsNotTokensByTopk) {
  Call c(2, 8, 2);
  for (const TensorView& w : {c.Weights(DType::f32, {2, 3}), c.Weights(DType::f32, {3, 2}),
                              c.Weights(DType::f32, {4}), c.Weights(DType::f32, {2, 2, 1})}) {
    c.weights = w;
    ExpectRejected(c, "weights.shape", w.shape_str());
  }
}

TEST(RouteErrors, IdsShapeIsNotTokensByTopk) {
  Call c(2, 8, 2);
  for (const TensorView& i : {c.Ids(DType::i32, {2, 1}), c.Ids(DType::i32, {1, 2}),
                              c.Ids(DType::i32, {4}), c.Ids(DType::i64, {2, 2, 1})}) {
    c.ids = i;
    ExpectRejected(c, "ids.shape", i.shape_str());
  }
}

TEST(RouteErrors, UnsupportedLogitsDtype) {
  for (DType dtype : {DType::i32, DType::i64, DType::u8, DType::f8e4m3, DType::f8e5m2}) {
    Call c(2, 8, 2);
    c.logits = c.Logits(dtype, {2, 8});
    ExpectRejected(c, "logits.dtype", std::string(dtype_name(dtype)));
  }
}

TEST(RouteErrors, UnsupportedWeightsDtype) {
  for (DType dtype : {DType::f16, DType::bf16, DType::i32}) {
    Call c(2, 8, 2);
    c.weights = c.Weights(dtype, {2, 2});
    ExpectRejected(c, "weights.dtype", std::string(dtype_name(dtype)));
  }
}

TEST(RouteErrors, UnsupportedIdsDtype) {
  for (DType dtype : {DType::f32, DType::u8, DType::bf16}) {
    Call c(2, 8, 2);
    c.ids = c.Ids(dtype, {2, 2});
    ExpectRejected(c, "ids.dtype", std::string(dtype_name(dtype)));
  }
}

TEST(RouteErrors, UnsupportedBiasDtype) {
  for (DType dtype : {DType::i32, DType::f8e4m3}) {
    Call c(2, 8, 2);
    c.bias = c.Bias(dtype, {8});
    ExpectRejected(c, "bias.dtype", std::string(dtype_name(dtype)));
  }
}

TEST(RouteErrors, RoutedScalingFactorNotPositiveAndFinite) {
  for (float rsf : {0.0f, -1.0f, -2.5f, kNaN, kInf, -kInf}) {
    SCOPED_TRACE(std::to_string(rsf));
    Call c(2, 8, 2);
    c.config.routed_scaling_factor = rsf;
    ExpectRejectedNumber(c, "routed_scaling_factor", rsf);
  }
}

TEST(RouteErrors, NumValidTokensOutOfRange) {
  Call c(2, 8, 2);
  c.config.num_valid_tokens = 3;
  ExpectRejected(c, "num_valid_tokens", "3");
  c.config.num_valid_tokens = -2;
  ExpectRejected(c, "num_valid_tokens", "-2");
}

TEST(RouteErrors, LogitsNotTwoDimensional) {
  Call c(2, 8, 2);
  c.logits = c.Logits(DType::f32, {16});
  ExpectRejected(c, "logits.shape", "[16]");
  c.logits = c.Logits(DType::f32, {1, 2, 8});
  ExpectRejected(c, "logits.shape", "[1, 2, 8]");
}

TEST(RouteErrors, NumExpertsOutOfRange) {
  Call big(2, 2049, 2);
  ExpectRejected(big, "num_experts", "2049");
  Call none(2, 0, 1);
  ExpectRejected(none, "num_experts", "0");
}

TEST(RouteErrors, TopkAbove64) {
  Call c(2, 128, 65);
  ExpectRejected(c, "topk", "65");
}

TEST(RouteErrors, NumGroupsAbove64) {
  Call c(2, 130, 2);
  c.config.num_groups = 65;  // divides 130
  ExpectRejected(c, "num_groups", "65");
}

TEST(RouteErrors, GpuBackendRequestedButNotPresent) {
  if (backend_available(Backend::gpu)) GTEST_SKIP() << "this machine has the GPU backend";
  Call c(2, 8, 2);
  c.options.backend = Backend::gpu;
  ExpectRejected(c, "backend", "gpu");
  // Tensors on a GPU device pick the GPU backend by default.
  Call on_gpu(2, 8, 2);
  on_gpu.logits = TensorView(FakeGpuPointer(), DType::f32, {2, 8}, Device::gpu());
  on_gpu.weights = TensorView(FakeGpuPointer(), DType::f32, {2, 2}, Device::gpu());
  on_gpu.ids = TensorView(FakeGpuPointer(), DType::i32, {2, 2}, Device::gpu());
  try {
    on_gpu.Route();
    ADD_FAILURE() << "route accepted GPU tensors without a GPU backend";
  } catch (const Error& e) {
    EXPECT_EQ(e.argument(), "backend") << e.what();
    EXPECT_EQ(e.value(), "gpu") << e.what();
  }
}

TEST(RouteErrors, TensorsOnDifferentDevices) {
  Call c(2, 8, 2);
  c.bias = TensorView(FakeGpuPointer(), DType::f32, {8}, Device::gpu());
  ExpectRejected(c, "bias.device", Device::gpu().str());
  Call w(2, 8, 2);
  w.weights = TensorView(FakeGpuPointer(), DType::f32, {2, 2}, Device::gpu(1));
  ExpectRejected(w, "weights.device", Device::gpu(1).str());
  Call i(2, 8, 2);
  i.ids = TensorView(FakeGpuPointer(), DType::i32, {2, 2}, Device::gpu());
  ExpectRejected(i, "ids.device", Device::gpu().str());
}

TEST(RouteErrors, WrappersValidateToo) {
  Call c(2, 8, 2);
  ExpectRejected(
      c, [&] { topk_softmax(c.weights, c.ids, c.logits, true, -1.0f); }, "softcap",
      [](const std::string& v) { return std::strtof(v.c_str(), nullptr) == -1.0f; }, "-1");
  ExpectRejected(
      c, [&] { grouped_topk(c.logits, c.weights, c.ids, true, 3, 1); }, "num_groups",
      [](const std::string& v) { return v == "3"; }, "3");
  const TensorView short_bias = c.Bias(DType::f32, {7});
  ExpectRejected(
      c, [&] { biased_grouped_topk(c.logits, short_bias, c.weights, c.ids, true, 4, 2); },
      "bias.shape", [](const std::string& v) { return v == "[7]"; }, "[7]");
  ExpectRejected(
      c,
      [&] {
        topk_sigmoid(c.weights, c.ids, c.Logits(DType::i32, {2, 8}), true);
      },
      "logits.dtype", [](const std::string& v) { return v == "i32"; }, "i32");
}

TEST(RouteErrors, EmptyBatchIsStillValidated) {
  Call c(0, 8, 9);  // T = 0 does nothing, but an invalid call is still an error
  ExpectRejected(c, "topk", "9");
  Call rsf(0, 8, 2);
  rsf.config.routed_scaling_factor = 0.0f;
  ExpectRejectedNumber(rsf, "routed_scaling_factor", 0.0f);
}

}  // namespace
}  // namespace moekit
