// Each rule of the routing contract (spec/routing.md) on a small hand-computed case, run on every
// CPU-side backend present (the GPU backend has its own tests). Expected weights are computed here
// from the contract's formulas on explicit numbers, never by calling moekit.
#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <optional>
#include <set>
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
constexpr float kWeightSentinel = -12345.0f;
constexpr int64_t kIdSentinel = -777;

// ---- The contract's formulas, in double, on explicit numbers.

double Sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
double SqrtSoftplus(double x) { return std::sqrt(x > 20.0 ? x : std::log1p(std::exp(x))); }
double Softcap(double x, double c) { return c * std::tanh(x / c); }
// Softmax of finite values.
std::vector<double> Softmax(const std::vector<double>& z) {
  const double m = *std::max_element(z.begin(), z.end());
  double sum = 0.0;
  std::vector<double> p(z.size());
  for (size_t i = 0; i < z.size(); ++i) sum += p[i] = std::exp(z[i] - m);
  for (double& v : p) v /= sum;
  return p;
}

// ---- Independent encoders for values exactly representable in f16 / bf16.

uint16_t Bf16Exact(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  EXPECT_EQ(u & 0xffffu, 0u) << f << " is not exact in bf16";
  return static_cast<uint16_t>(u >> 16);
}

uint16_t F16Exact(float f) {
  const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  if (std::isnan(f)) return 0x7e00;
  if (std::isinf(f)) return sign | 0x7c00;
  if (f == 0.0f) return sign;
  int exp = 0;
  const double m = std::frexp(std::fabs(static_cast<double>(f)), &exp);  // f = m * 2^exp
  const int biased = exp - 1 + 15;
  const double mantissa = (2.0 * m - 1.0) * 1024.0;
  EXPECT_TRUE(biased >= 1 && biased <= 30 && mantissa == std::floor(mantissa))
      << f << " is not exact in f16";
  return static_cast<uint16_t>(sign | (biased << 10) | static_cast<int>(mantissa));
}

size_t ElementSize(DType dtype) { return dtype == DType::f32 ? 4 : 2; }

// Stores v as element i of a byte buffer of dtype f32 / f16 / bf16, exactly.
void Store(std::vector<uint8_t>& buffer, DType dtype, int64_t i, float v) {
  uint8_t* at = buffer.data() + static_cast<size_t>(i) * ElementSize(dtype);
  if (dtype == DType::f32) {
    std::memcpy(at, &v, 4);
  } else {
    const uint16_t h = dtype == DType::f16 ? F16Exact(v) : Bf16Exact(v);
    std::memcpy(at, &h, 2);
  }
}

// ---- Running a case.

// The backends these tests cover: every one present except the GPU.
std::vector<Backend> TestedBackends() {
  std::vector<Backend> out;
  for (const BackendInfo& info : backends())
    if (info.backend != Backend::gpu) out.push_back(info.backend);
  return out;
}

// Runs body once per tested backend; an Error thrown by one backend is a failure of that backend
// only.
void ForEachBackend(const std::function<void(Backend)>& body) {
  for (Backend b : TestedBackends()) {
    SCOPED_TRACE("backend " + std::string(backend_name(b)));
    try {
      body(b);
    } catch (const Error& e) {
      ADD_FAILURE() << "backend " << backend_name(b) << " threw: " << e.what();
    }
  }
}

// A routing problem: logits [T, E] given row-major in f32 (stored as logits_dtype, possibly with a
// row stride > E or an inner stride > 1), an optional bias [E].
struct Case {
  int64_t tokens = 1;
  int64_t experts = 0;
  std::vector<float> logits;
  std::optional<std::vector<float>> bias;
  RouterConfig config;
  DType logits_dtype = DType::f32;
  DType bias_dtype = DType::f32;
  DType ids_dtype = DType::i32;
  int64_t row_stride = 0;    // 0: E * inner_stride
  int64_t inner_stride = 1;  // elements between neighbouring experts of one row
};

struct Result {
  std::vector<float> weights;  // [T, K]
  std::vector<int64_t> ids;    // [T, K], widened
};

// The logits of a case laid out as its view says; unused gaps hold NaN so reading them shows.
struct LogitsBuffer {
  std::vector<uint8_t> data;
  TensorView view;
};
LogitsBuffer MakeLogits(const Case& c) {
  const int64_t inner = c.inner_stride;
  const int64_t row = c.row_stride ? c.row_stride : c.experts * inner;
  const int64_t elements = c.tokens == 0 ? 1 : (c.tokens - 1) * row + (c.experts - 1) * inner + 1;
  LogitsBuffer b;
  b.data.resize(static_cast<size_t>(elements) * ElementSize(c.logits_dtype));
  for (int64_t i = 0; i < elements; ++i) Store(b.data, c.logits_dtype, i, kNaN);
  for (int64_t t = 0; t < c.tokens; ++t)
    for (int64_t e = 0; e < c.experts; ++e)
      Store(b.data, c.logits_dtype, t * row + e * inner,
            c.logits[static_cast<size_t>(t * c.experts + e)]);
  const int64_t shape[] = {c.tokens, c.experts};
  const int64_t strides[] = {row, inner};
  b.view = TensorView(b.data.data(), c.logits_dtype, shape, strides);
  return b;
}

Result RunCase(const Case& c, Backend backend, const RouteOptions& base_options = {}) {
  EXPECT_EQ(static_cast<int64_t>(c.logits.size()), c.tokens * c.experts);
  const int64_t K = c.config.topk;
  LogitsBuffer logits = MakeLogits(c);
  std::vector<uint8_t> bias;
  std::optional<TensorView> bias_view;
  if (c.bias) {
    const auto n = static_cast<int64_t>(c.bias->size());
    bias.resize(static_cast<size_t>(n) * ElementSize(c.bias_dtype));
    for (int64_t e = 0; e < n; ++e) Store(bias, c.bias_dtype, e, (*c.bias)[static_cast<size_t>(e)]);
    bias_view = TensorView(bias.data(), c.bias_dtype, {n});
  }
  std::vector<float> weights(static_cast<size_t>(c.tokens * K), kWeightSentinel);
  std::vector<int64_t> ids64(static_cast<size_t>(c.tokens * K), kIdSentinel);
  std::vector<int32_t> ids32(static_cast<size_t>(c.tokens * K), static_cast<int32_t>(kIdSentinel));
  const bool wide = c.ids_dtype == DType::i64;
  RouteOptions options = base_options;
  options.backend = backend;
  route(logits.view, bias_view, c.config, TensorView(weights.data(), DType::f32, {c.tokens, K}),
        TensorView(wide ? static_cast<void*>(ids64.data()) : ids32.data(), c.ids_dtype,
                   {c.tokens, K}),
        options);
  Result r;
  r.weights = weights;
  r.ids = wide ? ids64 : std::vector<int64_t>(ids32.begin(), ids32.end());
  return r;
}

std::vector<int64_t> RowIds(const Result& r, int64_t row, int64_t K) {
  return {r.ids.begin() + row * K, r.ids.begin() + (row + 1) * K};
}

// Checks one output row: ids exactly, weights within 1e-6 (relative above 1).
void ExpectRow(const Result& r, int64_t row, const std::vector<int64_t>& ids,
               const std::vector<double>& weights) {
  const auto K = static_cast<int64_t>(ids.size());
  ASSERT_EQ(weights.size(), ids.size());
  EXPECT_EQ(RowIds(r, row, K), ids) << "row " << row;
  for (int64_t k = 0; k < K; ++k) {
    const float got = r.weights[static_cast<size_t>(row * K + k)];
    const double want = weights[static_cast<size_t>(k)];
    EXPECT_NEAR(got, want, 1e-6 * std::max(1.0, std::fabs(want))) << "row " << row << " slot " << k;
  }
}

// Softmax top-k over one row of finite logits: ids given, weights p[id] (optionally renormalized).
std::vector<double> Pick(const std::vector<double>& source, const std::vector<int64_t>& ids,
                         bool renormalize) {
  std::vector<double> w;
  double sum = 0.0;
  for (int64_t id : ids) sum += source[static_cast<size_t>(id)];
  for (int64_t id : ids) w.push_back(source[static_cast<size_t>(id)] / (renormalize ? sum : 1.0));
  return w;
}

std::vector<double> Widen(const std::vector<float>& v) { return {v.begin(), v.end()}; }

RouterConfig Config(int topk, Scoring scoring, bool renormalize) {
  RouterConfig c;
  c.topk = topk;
  c.scoring = scoring;
  c.renormalize = renormalize;
  return c;
}

// ---- Selection and weights.

TEST(RouteRules, SoftmaxSelectsTopKInScoreDescendingOrder) {
  Case c;
  c.tokens = 2;
  c.experts = 6;
  c.logits = {0.5f, 2.0f, -1.0f, 3.0f,  1.0f, 0.0f,   // row 0
              3.0f, 0.0f, 1.0f,  -1.0f, 2.0f, 0.5f};  // row 1
  c.config = Config(3, Scoring::softmax, false);
  const std::vector<double> p0 = Softmax({0.5, 2.0, -1.0, 3.0, 1.0, 0.0});
  const std::vector<double> p1 = Softmax({3.0, 0.0, 1.0, -1.0, 2.0, 0.5});
  ForEachBackend([&](Backend b) {
    const Result r = RunCase(c, b);
    ExpectRow(r, 0, {3, 1, 4}, Pick(p0, {3, 1, 4}, false));
    ExpectRow(r, 1, {0, 4, 2}, Pick(p1, {0, 4, 2}, false));
  });
}

TEST(RouteRules, RenormalizeDividesRoutedWeightsByTheirSum) {
  Case c;
  c.experts = 6;
  c.logits = {0.5f, 2.0f, -1.0f, 3.0f, 1.0f, 0.0f};
  const std::vector<double> p = Softmax(Widen(c.logits));
  for (bool renormalize : {false, true}) {
    SCOPED_TRACE(renormalize ? "renormalize" : "no renormalize");
    c.config = Config(3, Scoring::softmax, renormalize);
    ForEachBackend([&](Backend b) {
      const Result r = RunCase(c, b);
      ExpectRow(r, 0, {3, 1, 4}, Pick(p, {3, 1, 4}, renormalize));
    });
  }
}

TEST(RouteRules, TiesGoToLowerExpertId) {
  // Ties of the top value at ids 2, 10, 18 and of the next at 5, 13; far apart so that SIMD lanes
  // and remainder loops both hold a tied value. Every K cuts through a tie somewhere.
  Case c;
  c.experts = 19;
  c.logits.assign(19, -1.0f);
  c.logits[2] = c.logits[10] = c.logits[18] = 2.0f;
  c.logits[5] = c.logits[13] = 0.5f;
  const std::vector<int64_t> order = {2, 10, 18, 5, 13, 0, 1, 3};
  for (Scoring scoring : {Scoring::softmax, Scoring::sigmoid, Scoring::sqrtsoftplus}) {
    std::vector<double> source = Softmax(Widen(c.logits));
    for (size_t e = 0; e < source.size() && scoring != Scoring::softmax; ++e)
      source[e] = scoring == Scoring::sigmoid ? Sigmoid(c.logits[e]) : SqrtSoftplus(c.logits[e]);
    for (int K = 1; K <= 16; ++K) {
      const bool renormalize = K > 8;  // the CPU kernel selects differently with renormalize
      const int Kr = renormalize ? K - 8 : K;
      SCOPED_TRACE("scoring " + std::to_string(static_cast<int>(scoring)) +
                   " K=" + std::to_string(Kr) + " renormalize=" + std::to_string(renormalize));
      c.config = Config(Kr, scoring, renormalize);
      const std::vector<int64_t> ids(order.begin(), order.begin() + Kr);
      ForEachBackend([&](Backend b) {
        const Result r = RunCase(c, b);
        ExpectRow(r, 0, ids, Pick(source, ids, renormalize));
        // Equal logits give bitwise equal weights.
        for (int k = 1; k < Kr && k < 3; ++k) EXPECT_EQ(r.weights[0], r.weights[k]);
        if (Kr >= 5) {
          EXPECT_EQ(r.weights[3], r.weights[4]);
        }
      });
    }
  }
}

TEST(RouteRules, AllEqualLogitsSelectLowestIds) {
  Case c;
  c.experts = 37;
  c.logits.assign(37, 0.25f);
  c.config = Config(5, Scoring::softmax, false);
  ForEachBackend([&](Backend b) {
    const Result r = RunCase(c, b);
    ExpectRow(r, 0, {0, 1, 2, 3, 4}, std::vector<double>(5, 1.0 / 37.0));
  });
}

TEST(RouteRules, SoftcapAppliesBeforeBiasInsideSoftmax) {
  // z = c * tanh(x / c) + b. Without softcap expert 0 would lead (3 > 1 + 1.5), and with the bias
  // applied before the cap it would too (2 tanh(1.5) > 2 tanh(1.25)).
  Case c;
  c.experts = 4;
  c.logits = {3.0f, 1.0f, -2.0f, 0.5f};
  c.bias = std::vector<float>{0.0f, 1.5f, 0.0f, 0.25f};
  c.config = Config(2, Scoring::softmax, false);
  c.config.softcap = 2.0f;
  std::vector<double> z;
  for (int e = 0; e < 4; ++e) z.push_back(Softcap(c.logits[e], 2.0) + (*c.bias)[e]);
  const std::vector<double> p = Softmax(z);
  ForEachBackend([&](Backend b) { ExpectRow(RunCase(c, b), 0, {1, 0}, Pick(p, {1, 0}, false)); });

  // Softcap alone: the order stays, the weights flatten.
  Case d;
  d.experts = 4;
  d.logits = {4.0f, 1.0f, -2.0f, 0.0f};
  d.config = Config(3, Scoring::softmax, true);
  d.config.softcap = 1.5f;
  std::vector<double> zd;
  for (float x : d.logits) zd.push_back(Softcap(x, 1.5));
  const std::vector<double> pd = Softmax(zd);
  ForEachBackend([&](Backend b) {
    ExpectRow(RunCase(d, b), 0, {0, 1, 3}, Pick(pd, {0, 1, 3}, true));
  });
}

TEST(RouteRules, SoftmaxBiasStaysInsideTheSoftmax) {
  // weight = softmax(x + b), not softmax(x): expert 1 gets 0.57 rather than 0.16.
  Case c;
  c.experts = 4;
  c.logits = {1.0f, 0.0f, 0.5f, 0.0f};
  c.bias = std::vector<float>{0.0f, 2.0f, 0.0f, 0.0f};
  c.config = Config(2, Scoring::softmax, false);
  const std::vector<double> p = Softmax({1.0, 2.0, 0.5, 0.0});
  ForEachBackend([&](Backend b) { ExpectRow(RunCase(c, b), 0, {1, 0}, Pick(p, {1, 0}, false)); });
}

TEST(RouteRules, SigmoidSelectsOnBiasedScoreAndWeighsUnbiased) {
  Case c;
  c.experts = 4;
  c.logits = {2.0f, 1.0f, 0.0f, -1.0f};
  std::vector<double> s;
  for (float x : c.logits) s.push_back(Sigmoid(x));
  // Without bias: the two largest logits.
  c.config = Config(2, Scoring::sigmoid, false);
  ForEachBackend([&](Backend b) { ExpectRow(RunCase(c, b), 0, {0, 1}, Pick(s, {0, 1}, false)); });
  // Bias 1 lifts expert 2 (0.5 + 1) to first; its weight stays sigmoid(0) = 0.5.
  c.bias = std::vector<float>{0.0f, 0.0f, 1.0f, 0.0f};
  for (bool renormalize : {false, true}) {
    c.config = Config(2, Scoring::sigmoid, renormalize);
    ForEachBackend([&](Backend b) {
      ExpectRow(RunCase(c, b), 0, {2, 0}, Pick(s, {2, 0}, renormalize));
    });
  }
}

TEST(RouteRules, SqrtSoftplusScoring) {
  Case c;
  c.experts = 4;
  c.logits = {100.0f, 1.0f, -3.0f, 0.5f};  // 100: softplus(x) = x (exp(100) overflows f32)
  std::vector<double> s;
  for (float x : c.logits) s.push_back(SqrtSoftplus(x));
  ASSERT_EQ(s[0], 10.0);
  c.config = Config(3, Scoring::sqrtsoftplus, false);
  ForEachBackend([&](Backend b) { ExpectRow(RunCase(c, b), 0, {0, 1, 3}, {10.0, s[1], s[3]}); });
  // Selection on s + b, weight s.
  c.bias = std::vector<float>{0.0f, 0.0f, 20.0f, 0.0f};
  for (bool renormalize : {false, true}) {
    c.config = Config(3, Scoring::sqrtsoftplus, renormalize);
    ForEachBackend([&](Backend b) {
      ExpectRow(RunCase(c, b), 0, {2, 0, 1}, Pick(s, {2, 0, 1}, renormalize));
    });
  }
}

TEST(RouteRules, SqrtSoftplusCountsPositiveInfinityAsFloatMax) {
  Case c;
  c.experts = 5;
  c.logits = {kInf, 100.0f, 0.0f, -kInf, kNaN};
  const double big = std::sqrt(static_cast<double>(FLT_MAX));  // 2^64
  const std::vector<double> s = {big, 10.0, std::sqrt(std::log(2.0)), 0.0, 0.0};
  for (bool renormalize : {false, true}) {
    c.config = Config(5, Scoring::sqrtsoftplus, renormalize);
    ForEachBackend([&](Backend b) {
      const Result r = RunCase(c, b);
      ExpectRow(r, 0, {0, 1, 2, 3, 4}, Pick(s, {0, 1, 2, 3, 4}, renormalize));
      for (float w : r.weights) EXPECT_TRUE(std::isfinite(w)) << w;
    });
  }
}

// ---- Groups.

// Groups of 2: g0 {3, -3}, g1 {2, 2}, g2 {2.2, 1.5}, g3 {-1, -2} (sigmoid scores).
// max:      g0 0.953 > g2 0.900 > g1 0.881            -> keep g0
// top2_sum: g1 2 * 0.881 = 1.762 > g2 1.718 > g0 1.0  -> keep g1 (two equal maxima count twice)
Case GroupCase(GroupScore score) {
  Case c;
  c.experts = 8;
  c.logits = {3.0f, -3.0f, 2.0f, 2.0f, 2.2f, 1.5f, -1.0f, -2.0f};
  c.config = Config(2, Scoring::sigmoid, false);
  c.config.num_groups = 4;
  c.config.topk_groups = 1;
  c.config.group_score = score;
  return c;
}

TEST(RouteRules, GroupScoreMaxKeepsGroupOfBestExpert) {
  const Case c = GroupCase(GroupScore::max);
  ForEachBackend([&](Backend b) {
    ExpectRow(RunCase(c, b), 0, {0, 1}, {Sigmoid(3), Sigmoid(-3)});
  });
}

TEST(RouteRules, GroupScoreTop2SumCountsEqualMaximaTwiceAndDropsOtherGroups) {
  // Experts 0 (0.953) and 4 (0.900) score higher than 2 and 3 but their groups are dropped.
  const Case c = GroupCase(GroupScore::top2_sum);
  ForEachBackend([&](Backend b) { ExpectRow(RunCase(c, b), 0, {2, 3}, {Sigmoid(2), Sigmoid(2)}); });
}

TEST(RouteRules, GroupScoreAutomaticIsTop2SumIffBias) {
  Case c = GroupCase(GroupScore::automatic);
  ForEachBackend([&](Backend b) {
    ExpectRow(RunCase(c, b), 0, {0, 1}, {Sigmoid(3), Sigmoid(-3)});
  });
  c.bias = std::vector<float>(8, 0.0f);
  ForEachBackend([&](Backend b) { ExpectRow(RunCase(c, b), 0, {2, 3}, {Sigmoid(2), Sigmoid(2)}); });
}

TEST(RouteRules, GroupTiesKeepLowerGroupIdAndDroppedExpertsAreNeverSelected) {
  // Groups of 2: g0 {-1, -2}, g1 {-3, 1}, g2 {1, -3}, g3 {1, 0}: g1, g2, g3 tie on max; TG = 2
  // keeps g1 and g2. Experts 6 (tied top) and 7 (0.5 > sigmoid(-3)) are never selected.
  Case c;
  c.experts = 8;
  c.logits = {-1.0f, -2.0f, -3.0f, 1.0f, 1.0f, -3.0f, 1.0f, 0.0f};
  c.config = Config(4, Scoring::sigmoid, false);
  c.config.num_groups = 4;
  c.config.topk_groups = 2;
  c.config.group_score = GroupScore::max;
  ForEachBackend([&](Backend b) {
    ExpectRow(RunCase(c, b), 0, {3, 4, 2, 5}, {Sigmoid(1), Sigmoid(1), Sigmoid(-3), Sigmoid(-3)});
  });
  // top2_sum tie between g1 {1, 0} and g2 {0, 1}: g1 is kept.
  c.logits = {-2.0f, -2.0f, 1.0f, 0.0f, 0.0f, 1.0f, -1.0f, -1.0f};
  c.config.topk = 2;
  c.config.topk_groups = 1;
  c.config.group_score = GroupScore::top2_sum;
  ForEachBackend([&](Backend b) { ExpectRow(RunCase(c, b), 0, {2, 3}, {Sigmoid(1), 0.5}); });
}

TEST(RouteRules, GroupedSoftmaxWeighsWithTheFullSoftmax) {
  // DeepSeek-V2 style: softmax over all E, then groups by max; weights are p over all 8 experts.
  Case c = GroupCase(GroupScore::max);
  c.config.scoring = Scoring::softmax;
  c.config.topk_groups = 2;  // keeps g0 (3) and g2 (2.2)
  c.config.topk = 3;
  const std::vector<double> p = Softmax(Widen(c.logits));
  ForEachBackend([&](Backend b) {
    ExpectRow(RunCase(c, b), 0, {0, 4, 5}, Pick(p, {0, 4, 5}, false));
  });
}

// ---- Shared experts and scaling.

TEST(RouteRules, SharedExpertSlotsFollowRoutedOnes) {
  Case c;
  c.experts = 4;
  c.logits = {1.0f, 2.0f, 0.0f, 0.5f};
  const std::vector<double> p = Softmax(Widen(c.logits));
  const double sum = p[1] + p[0];
  const double rsf = 2.5;
  struct Variant {
    bool renormalize, on_output;
    std::vector<double> weights;
  };
  const Variant variants[] = {
      {false, false, {p[1], p[0], sum / rsf}},
      {true, false, {p[1] / sum, p[0] / sum, 0.4}},
      {true, true, {rsf * p[1] / sum, rsf * p[0] / sum, 1.0}},
      {false, true, {rsf * p[1], rsf * p[0], sum}},
  };
  for (const Variant& v : variants) {
    SCOPED_TRACE("renormalize=" + std::to_string(v.renormalize) +
                 " apply_scaling_on_output=" + std::to_string(v.on_output));
    c.config = Config(3, Scoring::softmax, v.renormalize);
    c.config.num_shared_experts = 1;
    c.config.routed_scaling_factor = 2.5f;
    c.config.apply_scaling_on_output = v.on_output;
    ForEachBackend([&](Backend b) { ExpectRow(RunCase(c, b), 0, {1, 0, 4}, v.weights); });
  }
  // Two shared slots: ids E and E + 1, both weighted 1 / rsf after renormalization.
  c.config = Config(4, Scoring::softmax, true);
  c.config.num_shared_experts = 2;
  c.config.routed_scaling_factor = 2.5f;
  ForEachBackend([&](Backend b) {
    ExpectRow(RunCase(c, b), 0, {1, 0, 4, 5}, {p[1] / sum, p[0] / sum, 0.4, 0.4});
  });
}

TEST(RouteRules, ApplyScalingOnOutputMultipliesEverySlot) {
  Case c;
  c.experts = 4;
  c.logits = {0.0f, 1.0f, -1.0f, 2.0f};
  const double s3 = Sigmoid(2), s1 = Sigmoid(1);
  for (bool renormalize : {false, true}) {
    c.config = Config(2, Scoring::sigmoid, renormalize);
    c.config.routed_scaling_factor = 2.0f;
    c.config.apply_scaling_on_output = true;
    const double d = renormalize ? s3 + s1 : 1.0;
    ForEachBackend([&](Backend b) {
      ExpectRow(RunCase(c, b), 0, {3, 1}, {2 * s3 / d, 2 * s1 / d});
    });
    // Without apply_scaling_on_output rsf does not touch routed weights.
    c.config.apply_scaling_on_output = false;
    ForEachBackend([&](Backend b) { ExpectRow(RunCase(c, b), 0, {3, 1}, {s3 / d, s1 / d}); });
  }
}

// ---- Robustness.

TEST(RouteRules, RenormalizeWithZeroRoutedSumLeavesZeros) {
  Case c;
  c.experts = 8;
  c.logits.assign(8, -kInf);
  for (Scoring scoring : {Scoring::softmax, Scoring::sigmoid, Scoring::sqrtsoftplus}) {
    for (bool on_output : {false, true}) {
      SCOPED_TRACE("scoring " + std::to_string(static_cast<int>(scoring)) +
                   " on_output=" + std::to_string(on_output));
      c.config = Config(4, scoring, true);
      c.config.num_shared_experts = 1;
      c.config.routed_scaling_factor = 2.5f;
      c.config.apply_scaling_on_output = on_output;
      ForEachBackend([&](Backend b) { ExpectRow(RunCase(c, b), 0, {0, 1, 2, 8}, {0, 0, 0, 0}); });
    }
  }
}

TEST(RouteRules, NanLogitIsTreatedAsNegativeInfinity) {
  // Softmax: NaN has probability 0, ranks below -50 and ties with -inf (lower id first).
  Case c;
  c.experts = 4;
  c.logits = {kNaN, -50.0f, 0.0f, -kInf};
  const double e = std::exp(-50.0);
  for (bool renormalize : {false, true}) {
    c.config = Config(4, Scoring::softmax, renormalize);
    ForEachBackend([&](Backend b) {
      const Result r = RunCase(c, b);
      ExpectRow(r, 0, {2, 1, 0, 3}, {1 / (1 + e), e / (1 + e), 0, 0});
      EXPECT_EQ(r.weights[2], 0.0f);
      EXPECT_EQ(r.weights[3], 0.0f);
    });
  }
  // Sigmoid and sqrtsoftplus: NaN scores 0 and ranks lowest.
  Case s;
  s.experts = 3;
  s.logits = {kNaN, -10.0f, 0.0f};
  for (bool renormalize : {false, true}) {
    s.config = Config(3, Scoring::sigmoid, renormalize);
    const std::vector<double> sig = {0.0, Sigmoid(-10), 0.5};
    ForEachBackend([&](Backend b) {
      ExpectRow(RunCase(s, b), 0, {2, 1, 0}, Pick(sig, {2, 1, 0}, renormalize));
    });
    s.config = Config(3, Scoring::sqrtsoftplus, renormalize);
    const std::vector<double> ssp = {0.0, SqrtSoftplus(-10), SqrtSoftplus(0)};
    ForEachBackend([&](Backend b) {
      ExpectRow(RunCase(s, b), 0, {2, 1, 0}, Pick(ssp, {2, 1, 0}, renormalize));
    });
  }
}

TEST(RouteRules, AllNanOrAllNegativeInfinitySoftmaxRowsGiveZerosAndLowestIds) {
  Case c;
  c.tokens = 3;
  c.experts = 6;
  c.logits = {kNaN,  kNaN,  kNaN,  kNaN,  kNaN,  kNaN,    // all NaN
              -kInf, -kInf, -kInf, -kInf, -kInf, -kInf,   // all -inf
              -kInf, kNaN,  -kInf, kNaN,  kNaN,  -kInf};  // mixed
  for (bool renormalize : {false, true}) {
    c.config = Config(3, Scoring::softmax, renormalize);
    ForEachBackend([&](Backend b) {
      const Result r = RunCase(c, b);
      for (int64_t t = 0; t < 3; ++t) ExpectRow(r, t, {0, 1, 2}, {0, 0, 0});
    });
  }
}

TEST(RouteRules, PositiveInfinityLogitsShareTheMassEqually) {
  Case c;
  c.experts = 5;
  c.logits = {kInf, 0.0f, kInf, 1.0f, kNaN};
  c.config = Config(3, Scoring::softmax, false);
  ForEachBackend([&](Backend b) { ExpectRow(RunCase(c, b), 0, {0, 2, 1}, {0.5, 0.5, 0.0}); });
  c.logits = {kInf, kInf, 3.0f, kInf, -kInf};
  c.config = Config(2, Scoring::softmax, false);
  ForEachBackend([&](Backend b) { ExpectRow(RunCase(c, b), 0, {0, 1}, {1.0 / 3, 1.0 / 3}); });
  c.config = Config(2, Scoring::softmax, true);
  ForEachBackend([&](Backend b) { ExpectRow(RunCase(c, b), 0, {0, 1}, {0.5, 0.5}); });
  // sigmoid(+inf) = 1.
  c.logits = {0.0f, kInf, kInf, 5.0f, kNaN};
  c.config = Config(3, Scoring::sigmoid, false);
  ForEachBackend([&](Backend b) {
    ExpectRow(RunCase(c, b), 0, {1, 2, 3}, {1.0, 1.0, Sigmoid(5)});
  });
}

TEST(RouteRules, NonFiniteBiasKeepsIdsDistinctInRangeAndWritesNoNan) {
  Case c;
  c.tokens = 4;
  c.experts = 8;
  c.logits = {0.0f,  1.0f,  -1.0f, 2.0f,  -2.0f, 0.5f,  3.0f,  -3.0f,  // finite
              -kInf, kInf,  kNaN,  -kInf, kInf,  kNaN,  0.0f,  1.0f,   // non-finite
              kNaN,  kNaN,  kNaN,  kNaN,  kNaN,  kNaN,  kNaN,  kNaN,   // all NaN
              -kInf, -kInf, -kInf, -kInf, -kInf, -kInf, -kInf, -kInf};
  c.bias = std::vector<float>{kInf, kNaN, -kInf, 0.0f, kInf, kNaN, -kInf, 1.0f};
  for (Scoring scoring : {Scoring::softmax, Scoring::sigmoid, Scoring::sqrtsoftplus}) {
    for (GroupScore groups : {GroupScore::automatic, GroupScore::max, GroupScore::top2_sum}) {
      for (bool renormalize : {false, true}) {
        SCOPED_TRACE("scoring " + std::to_string(static_cast<int>(scoring)) + " groups " +
                     std::to_string(static_cast<int>(groups)) +
                     " renormalize=" + std::to_string(renormalize));
        c.config = Config(4, scoring, renormalize);
        c.config.num_shared_experts = 1;
        c.config.routed_scaling_factor = 2.5f;
        if (groups != GroupScore::automatic) {
          c.config.num_groups = 2;
          c.config.topk_groups = 1;
          c.config.group_score = groups;
        }
        ForEachBackend([&](Backend b) {
          const Result r = RunCase(c, b);
          for (int64_t t = 0; t < c.tokens; ++t) {
            const std::vector<int64_t> ids = RowIds(r, t, 4);
            std::set<int64_t> distinct;
            for (int k = 0; k < 3; ++k) {
              EXPECT_GE(ids[k], 0) << "row " << t;
              EXPECT_LT(ids[k], 8) << "row " << t;
              distinct.insert(ids[k]);
            }
            EXPECT_EQ(distinct.size(), 3u) << "row " << t;
            EXPECT_EQ(ids[3], 8) << "row " << t;
          }
          for (float w : r.weights) EXPECT_FALSE(std::isnan(w));
        });
      }
    }
  }
}

TEST(RouteRules, PaddingRowsGetMinusOneIdsAndZeroWeights) {
  Case c;
  c.tokens = 3;
  c.experts = 4;
  c.logits = {1.0f, 2.0f, 0.0f, 0.5f,   // valid
              3.0f, 0.0f, 1.0f, 2.0f,   // padding
              0.0f, 0.0f, 0.0f, 0.0f};  // padding
  const std::vector<double> p = Softmax({1.0, 2.0, 0.0, 0.5});
  const double sum = p[1] + p[0];
  for (DType ids_dtype : {DType::i32, DType::i64}) {
    c.ids_dtype = ids_dtype;
    c.config = Config(3, Scoring::softmax, true);
    c.config.num_shared_experts = 1;
    c.config.routed_scaling_factor = 2.0f;
    c.config.num_valid_tokens = 1;
    ForEachBackend([&](Backend b) {
      const Result r = RunCase(c, b);
      ExpectRow(r, 0, {1, 0, 4}, {p[1] / sum, p[0] / sum, 0.5});
      for (int64_t t = 1; t < 3; ++t) {
        EXPECT_EQ(RowIds(r, t, 3), (std::vector<int64_t>{-1, -1, -1})) << "row " << t;
        for (int k = 0; k < 3; ++k) EXPECT_EQ(r.weights[static_cast<size_t>(t * 3 + k)], 0.0f);
      }
    });
    c.config.num_valid_tokens = 0;
    ForEachBackend([&](Backend b) {
      const Result r = RunCase(c, b);
      for (int64_t id : r.ids) EXPECT_EQ(id, -1);
      for (float w : r.weights) EXPECT_EQ(w, 0.0f);
    });
    c.config.num_valid_tokens = 3;  // = T: no padding
    ForEachBackend([&](Backend b) {
      const Result r = RunCase(c, b);
      for (int64_t id : r.ids) EXPECT_GE(id, 0);
      ExpectRow(r, 0, {1, 0, 4}, {p[1] / sum, p[0] / sum, 0.5});
    });
  }
}

TEST(RouteRules, ZeroTokensWritesNothing) {
  RouterConfig config = Config(2, Scoring::softmax, true);
  for (Backend b : TestedBackends()) {
    SCOPED_TRACE(std::string(backend_name(b)));
    float logits[8] = {};
    float weights[4] = {kWeightSentinel, kWeightSentinel, kWeightSentinel, kWeightSentinel};
    int32_t ids[4] = {-777, -777, -777, -777};
    EXPECT_NO_THROW(route(TensorView(logits, DType::f32, {0, 8}), std::nullopt, config,
                          TensorView(weights, DType::f32, {0, 2}),
                          TensorView(ids, DType::i32, {0, 2}), RouteOptions{.backend = b}));
    for (float w : weights) EXPECT_EQ(w, kWeightSentinel);
    for (int32_t id : ids) EXPECT_EQ(id, -777);
    // Empty tensors may have no storage at all.
    EXPECT_NO_THROW(route(TensorView(nullptr, DType::bf16, {0, 8}), std::nullopt, config,
                          TensorView(nullptr, DType::f32, {0, 2}),
                          TensorView(nullptr, DType::i64, {0, 2}), RouteOptions{.backend = b}));
  }
}

TEST(RouteRules, Int64Ids) {
  Case c;
  c.tokens = 2;
  c.experts = 6;
  c.logits = {0.5f, 2.0f, -1.0f, 3.0f, 1.0f, 0.0f, 3.0f, 0.0f, 1.0f, -1.0f, 2.0f, 0.5f};
  c.ids_dtype = DType::i64;
  c.config = Config(4, Scoring::softmax, false);
  c.config.num_shared_experts = 1;
  const std::vector<double> p0 = Softmax({0.5, 2.0, -1.0, 3.0, 1.0, 0.0});
  const std::vector<double> p1 = Softmax({3.0, 0.0, 1.0, -1.0, 2.0, 0.5});
  ForEachBackend([&](Backend b) {
    const Result r = RunCase(c, b);  // sentinel -777 in all 64 bits: a 32-bit write would show
    ExpectRow(r, 0, {3, 1, 4, 6}, {p0[3], p0[1], p0[4], p0[3] + p0[1] + p0[4]});
    ExpectRow(r, 1, {0, 4, 2, 6}, {p1[0], p1[4], p1[2], p1[0] + p1[4] + p1[2]});
  });
}

TEST(RouteRules, HalfAndBfloat16LogitsAndBias) {
  Case c;
  c.experts = 4;
  c.logits = {0.5f, 2.0f, -1.0f, 3.0f};
  c.bias = std::vector<float>{0.0f, 1.5f, 0.0f, -0.25f};
  const std::vector<double> p = Softmax({0.5, 3.5, -1.0, 2.75});
  for (DType logits_dtype : {DType::f32, DType::f16, DType::bf16}) {
    for (DType bias_dtype : {DType::f32, DType::f16, DType::bf16}) {
      SCOPED_TRACE("logits " + std::string(dtype_name(logits_dtype)) + " bias " +
                   std::string(dtype_name(bias_dtype)));
      c.logits_dtype = logits_dtype;
      c.bias_dtype = bias_dtype;
      c.config = Config(2, Scoring::softmax, false);
      ForEachBackend([&](Backend b) { ExpectRow(RunCase(c, b), 0, {1, 3}, {p[1], p[3]}); });
      // sigmoid: s + b = {0.62, 2.38, 0.27, 0.70}; weights bias-free.
      c.config = Config(2, Scoring::sigmoid, false);
      ForEachBackend([&](Backend b) {
        ExpectRow(RunCase(c, b), 0, {1, 3}, {Sigmoid(2), Sigmoid(3)});
      });
    }
  }
}

TEST(RouteRules, StridedLogitsRows) {
  // Rows 8 apart for E = 5; the gaps hold NaN.
  Case c;
  c.tokens = 2;
  c.experts = 5;
  c.logits = {0.5f, 2.0f, -1.0f, 3.0f, 1.0f, 3.0f, 0.0f, 1.0f, -1.0f, 2.0f};
  c.row_stride = 8;
  c.config = Config(2, Scoring::softmax, false);
  const std::vector<double> p0 = Softmax({0.5, 2.0, -1.0, 3.0, 1.0});
  const std::vector<double> p1 = Softmax({3.0, 0.0, 1.0, -1.0, 2.0});
  for (DType dtype : {DType::f32, DType::bf16}) {
    c.logits_dtype = dtype;
    ForEachBackend([&](Backend b) {
      const Result r = RunCase(c, b);
      ExpectRow(r, 0, {3, 1}, {p0[3], p0[1]});
      ExpectRow(r, 1, {0, 4}, {p1[0], p1[4]});
    });
  }
  // Non-contiguous rows (inner stride 2): the reference serves any strides.
  c.row_stride = 0;
  c.inner_stride = 2;
  c.logits_dtype = DType::f32;
  const Result r = RunCase(c, Backend::reference);
  ExpectRow(r, 0, {3, 1}, {p0[3], p0[1]});
  ExpectRow(r, 1, {0, 4}, {p1[0], p1[4]});
}

// ---- Wrappers, determinism, dispatch.

// Smooth, deterministic, tie-free logits.
std::vector<float> WavyLogits(int64_t tokens, int64_t experts) {
  std::vector<float> v(static_cast<size_t>(tokens * experts));
  for (size_t i = 0; i < v.size(); ++i)
    v[i] = static_cast<float>(3.0 * std::sin(0.7311 * static_cast<double>(i) + 0.1) +
                              0.01 * static_cast<double>(i % 97));
  return v;
}

struct Outputs {
  std::vector<float> weights;
  std::vector<int32_t> ids;
  Outputs(int64_t tokens, int64_t topk)
      : weights(static_cast<size_t>(tokens * topk), kWeightSentinel),
        ids(static_cast<size_t>(tokens * topk), -777) {}
  TensorView w(int64_t tokens, int64_t topk) {
    return TensorView(weights.data(), DType::f32, {tokens, topk});
  }
  TensorView i(int64_t tokens, int64_t topk) {
    return TensorView(ids.data(), DType::i32, {tokens, topk});
  }
  bool operator==(const Outputs& o) const {
    return ids == o.ids && weights.size() == o.weights.size() &&
           std::memcmp(weights.data(), o.weights.data(), weights.size() * sizeof(float)) == 0;
  }
};

TEST(RouteRules, WrappersMatchRouteWithEquivalentConfig) {
  constexpr int64_t T = 4, E = 16;
  std::vector<float> logits_data = WavyLogits(T, E);
  std::vector<float> bias_data(E);
  for (int64_t e = 0; e < E; ++e)
    bias_data[static_cast<size_t>(e)] = 0.1f * static_cast<float>(e % 5);
  const TensorView logits(logits_data.data(), DType::f32, {T, E});
  const TensorView bias(bias_data.data(), DType::f32, {E});
  ForEachBackend([&](Backend b) {
    const RouteOptions options{.backend = b};
    auto expect_same = [&](const char* name, int64_t K,
                           const std::function<void(const TensorView&, const TensorView&)>& wrap,
                           const RouterConfig& config, std::optional<TensorView> route_bias) {
      SCOPED_TRACE(name);
      Outputs a(T, K), r(T, K);
      wrap(a.w(T, K), a.i(T, K));
      route(logits, route_bias, config, r.w(T, K), r.i(T, K), options);
      EXPECT_TRUE(a == r);
      for (int32_t id : r.ids) EXPECT_NE(id, -777);
    };
    RouterConfig c = Config(3, Scoring::softmax, true);
    expect_same(
        "topk_softmax", 3,
        [&](const TensorView& w, const TensorView& i) {
          topk_softmax(w, i, logits, true, 0.0f, std::nullopt, options);
        },
        c, std::nullopt);
    c = Config(3, Scoring::softmax, false);
    c.softcap = 2.5f;
    expect_same(
        "topk_softmax softcap bias", 3,
        [&](const TensorView& w, const TensorView& i) {
          topk_softmax(w, i, logits, false, 2.5f, bias, options);
        },
        c, bias);
    c = Config(4, Scoring::sigmoid, true);
    expect_same(
        "topk_sigmoid", 4,
        [&](const TensorView& w, const TensorView& i) {
          topk_sigmoid(w, i, logits, true, bias, options);
        },
        c, bias);
    c = Config(4, Scoring::softmax, true);
    c.num_groups = 4;
    c.topk_groups = 2;
    c.group_score = GroupScore::max;
    c.num_shared_experts = 1;
    c.routed_scaling_factor = 2.5f;
    c.num_valid_tokens = 3;
    expect_same(
        "grouped_topk", 4,
        [&](const TensorView& w, const TensorView& i) {
          grouped_topk(logits, w, i, true, 4, 2, 1, 2.5f, Scoring::softmax, 3, options);
        },
        c, std::nullopt);
    c = Config(4, Scoring::sigmoid, true);
    c.num_groups = 4;
    c.topk_groups = 2;
    c.group_score = GroupScore::top2_sum;
    c.num_shared_experts = 1;
    c.routed_scaling_factor = 2.5f;
    c.apply_scaling_on_output = true;
    c.num_valid_tokens = 3;
    expect_same(
        "biased_grouped_topk", 4,
        [&](const TensorView& w, const TensorView& i) {
          biased_grouped_topk(logits, bias, w, i, true, 4, 2, 1, 2.5f, true, 3, options);
        },
        c, bias);
  });
}

TEST(RouteRules, SameCallTwiceIsBitwiseIdentical) {
  struct Shape {
    int64_t tokens, experts;
    RouterConfig config;
    bool bias;
  };
  RouterConfig v3 = Config(9, Scoring::sigmoid, true);
  v3.num_groups = 8;
  v3.topk_groups = 4;
  v3.num_shared_experts = 1;
  v3.routed_scaling_factor = 2.5f;
  const Shape shapes[] = {{300, 256, v3, true},
                          {300, 128, Config(8, Scoring::softmax, true), false},
                          {33, 60, Config(4, Scoring::sqrtsoftplus, false), true}};
  for (const Shape& s : shapes) {
    SCOPED_TRACE("E=" + std::to_string(s.experts));
    std::vector<float> logits_data = WavyLogits(s.tokens, s.experts);
    std::vector<float> bias_data(WavyLogits(1, s.experts));
    for (float& v : bias_data) v *= 0.1f;
    const TensorView logits(logits_data.data(), DType::f32, {s.tokens, s.experts});
    std::optional<TensorView> bias;
    if (s.bias) bias = TensorView(bias_data.data(), DType::f32, {s.experts});
    const int64_t K = s.config.topk;
    ForEachBackend([&](Backend b) {
      Outputs first(s.tokens, K), second(s.tokens, K);
      route(logits, bias, s.config, first.w(s.tokens, K), first.i(s.tokens, K),
            RouteOptions{.backend = b});
      route(logits, bias, s.config, second.w(s.tokens, K), second.i(s.tokens, K),
            RouteOptions{.backend = b});
      EXPECT_TRUE(first == second);
    });
  }
}

int CountChosen(const std::vector<ImplementationChoice>& rows) {
  return static_cast<int>(std::count_if(rows.begin(), rows.end(),
                                        [](const ImplementationChoice& r) { return r.chosen; }));
}

TEST(RouteRules, ExplainRouteChoosesExactlyOneImplementation) {
  std::vector<float> logits_data = WavyLogits(4, 64);
  const TensorView logits(logits_data.data(), DType::f32, {4, 64});
  Outputs out(4, 8);
  const RouterConfig config = Config(8, Scoring::softmax, true);
  std::vector<RouteOptions> requests = {RouteOptions{}};
  for (Backend b : TestedBackends()) requests.push_back(RouteOptions{.backend = b});
  for (const RouteOptions& options : requests) {
    SCOPED_TRACE(options.backend ? std::string(backend_name(*options.backend)) : "default");
    const std::vector<ImplementationChoice> rows =
        explain_route(logits, std::nullopt, config, out.w(4, 8), out.i(4, 8), options);
    EXPECT_EQ(CountChosen(rows), 1);
    for (const ImplementationChoice& row : rows) {
      if (row.chosen) {
        EXPECT_EQ(row.reason, "") << row.name;
        if (options.backend) {
          EXPECT_EQ(row.backend, *options.backend) << row.name;
        }
      } else if (options.backend && row.backend != *options.backend) {
        EXPECT_NE(row.reason, "") << row.name;
      }
    }
  }
  for (float w : out.weights) EXPECT_EQ(w, kWeightSentinel);  // explaining runs nothing
}

TEST(RouteRules, NonContiguousRowsFallBackToReferenceAndForcedCpuThrows) {
  // Inner stride 2: the CPU kernels need contiguous rows and must say so, naming the stride.
  constexpr int64_t T = 2, E = 8;
  std::vector<float> data = WavyLogits(T, 2 * E);
  const int64_t shape[] = {T, E};
  const int64_t strides[] = {2 * E, 2};
  const TensorView logits(data.data(), DType::f32, shape, strides);
  const RouterConfig config = Config(2, Scoring::softmax, true);
  Outputs out(T, 2);
  const std::vector<ImplementationChoice> rows =
      explain_route(logits, std::nullopt, config, out.w(T, 2), out.i(T, 2));
  EXPECT_EQ(CountChosen(rows), 1);
  const CpuFeatures& cpu = cpu_features();
  for (const ImplementationChoice& row : rows) {
    SCOPED_TRACE(row.name + ": " + row.reason);
    if (row.backend == Backend::reference) {
      EXPECT_TRUE(row.chosen);
    }
    if (row.backend != Backend::cpu) continue;
    EXPECT_FALSE(row.chosen);
    EXPECT_NE(row.reason, "");
    const bool isa_missing =
        (row.name == "cpu.avx512" && !cpu.avx512) || (row.name == "cpu.avx2" && !cpu.avx2);
    if (!isa_missing) {
      EXPECT_NE(row.reason.find("stride"), std::string::npos);
    }
  }
  // Forcing the CPU backend on such a view is an error that names the stride; nothing written.
  try {
    route(logits, std::nullopt, config, out.w(T, 2), out.i(T, 2),
          RouteOptions{.backend = Backend::cpu});
    ADD_FAILURE() << "route on the cpu backend accepted non-contiguous rows";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("stride"), std::string::npos) << e.what();
  }
  for (float w : out.weights) EXPECT_EQ(w, kWeightSentinel);
  for (int32_t id : out.ids) EXPECT_EQ(id, -777);
  // The default choice serves it (with the reference).
  EXPECT_NO_THROW(route(logits, std::nullopt, config, out.w(T, 2), out.i(T, 2)));
  for (int32_t id : out.ids) EXPECT_NE(id, -777);
}

}  // namespace
}  // namespace moekit
