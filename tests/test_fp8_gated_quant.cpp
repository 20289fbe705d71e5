// silu_and_mul_group_quant_fp8: moekit's f32 exponential and SiLU against libm in double, and the
// op on every implementation of its table against the plain group quantization of the f32
// activations silu(gate) * up, bit for bit (seed printed; MOEKIT_TEST_SEED repeats a run).
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "cpu/fp8_cpu.h"
#include "moekit/dtype.h"
#include "moekit/error.h"
#include "moekit/ops/fp8.h"
#include "ops/fp8_problem.h"
#include "ops/silu_math.h"

namespace moekit {
namespace {

std::mt19937_64 rng_for(const std::string& test) {
  static const uint64_t seed = [] {
    const char* env = std::getenv("MOEKIT_TEST_SEED");
    const uint64_t s = env ? std::strtoull(env, nullptr, 10) : std::random_device{}();
    std::printf("gated quant seed: %llu (set MOEKIT_TEST_SEED to repeat)\n",
                static_cast<unsigned long long>(s));
    return s;
  }();
  return std::mt19937_64(seed ^ std::hash<std::string>{}(test));
}

// Distance in f32 units in the last place between a float and an exact value.
double ulps(float got, double exact) {
  const double ulp = std::nextafter(static_cast<float>(std::fabs(exact)), INFINITY) -
                     static_cast<float>(std::fabs(exact));
  return std::fabs(static_cast<double>(got) - exact) / ulp;
}

TEST(GatedQuantMath, ExponentialWithinTwoUlpOfLibm) {
  std::mt19937_64 rng = rng_for("exp");
  double worst = 0.0;
  float worst_x = 0.0f;
  std::vector<float> xs;
  for (float x = -87.33f; x <= 0.0f; x += 0.00390625f) xs.push_back(x);
  std::uniform_real_distribution<float> any(-87.33f, 0.0f);
  for (int i = 0; i < 200000; ++i) xs.push_back(any(rng));
  for (float x : xs) {
    const double e = ulps(exp_nonpositive_f32(x), std::exp(static_cast<double>(x)));
    if (e > worst) worst = e, worst_x = x;
  }
  std::printf("exp_nonpositive_f32: worst %.3f ulp at x=%.9g over %zu values\n", worst, worst_x,
              xs.size());
  EXPECT_LE(worst, 2.0);
  EXPECT_EQ(exp_nonpositive_f32(0.0f), 1.0f);
  EXPECT_EQ(exp_nonpositive_f32(-0.0f), 1.0f);
  EXPECT_EQ(exp_nonpositive_f32(-88.0f), 0.0f);  // round(-88 / ln 2) = -127
  EXPECT_EQ(exp_nonpositive_f32(-1000.0f), 0.0f);
  EXPECT_EQ(exp_nonpositive_f32(-INFINITY), 0.0f);
  EXPECT_EQ(exp_nonpositive_f32(std::nanf("")), 0.0f);  // clamped as -inf is
  // Near the end the value is subnormal, rounded once from e_r * 2^-126.
  for (const float x : {-87.3365f, -87.5f, -87.6f}) {
    const float end = exp_nonpositive_f32(x);
    EXPECT_GT(end, 0.0f) << x;
    EXPECT_LE(std::fabs(end - std::exp(static_cast<double>(x))), 0x1p-149) << x;
  }
}

TEST(GatedQuantMath, SiluAndMulFollowsTheFormulaAndItsEdges) {
  std::mt19937_64 rng = rng_for("silu");
  double worst = 0.0;
  // Moderate gates, and far negative ones (silu(g) = g e^g / (1 + e^g), still normal down to -87).
  for (const auto& [lo, hi] : {std::pair{-30.0f, 30.0f}, std::pair{-87.0f, -30.0f}}) {
    std::uniform_real_distribution<float> gates(lo, hi), ups(-30.0f, 30.0f);
    for (int i = 0; i < 100000; ++i) {
      const float g = gates(rng), u = ups(rng);
      const double e = std::exp(-std::fabs(static_cast<double>(g)));
      const double exact = (g >= 0 ? g : g * e) / (1.0 + e) * u;
      if (exact != 0.0) worst = std::max(worst, ulps(silu_and_mul_f32(g, u), exact));
    }
  }
  std::printf("silu_and_mul_f32: worst %.3f ulp\n", worst);
  EXPECT_LE(worst, 4.0);  // the exponential's 2 ulp, the product's, division's and product's
  EXPECT_EQ(silu_and_mul_f32(0.0f, 5.0f), 0.0f);
  EXPECT_EQ(silu_and_mul_f32(100.0f, 2.0f), 200.0f);  // e^-100 is 0: silu(g) = g
  EXPECT_EQ(silu_and_mul_f32(INFINITY, 1.0f), INFINITY);
  const float far_negative = silu_and_mul_f32(-100.0f, 1.0f);  // -100 * e^-100 flushed: -0
  EXPECT_EQ(far_negative, 0.0f);
  EXPECT_TRUE(std::signbit(far_negative));
  // Far negative gates keep their tiny normal values: silu(-87) is about -1.4e-36.
  EXPECT_NEAR(silu_and_mul_f32(-87.0f, 1.0f) / (-87.0 * std::exp(-87.0)), 1.0, 1e-6);
  // Every NaN is the one positive quiet NaN, whatever the operands' NaN signs.
  for (const float y :
       {silu_and_mul_f32(-INFINITY, 1.0f), silu_and_mul_f32(std::nanf(""), 1.0f),
        silu_and_mul_f32(-std::nanf(""), 1.0f), silu_and_mul_f32(1.0f, -std::nanf("")),
        silu_and_mul_f32(-std::nanf(""), std::nanf("")),
        silu_and_mul_f32(std::nanf(""), -std::nanf(""))})
    EXPECT_EQ(std::bit_cast<uint32_t>(y), 0x7fc00000u);
}

// The CPU's vector SiLU (fp8_cpu_kernels.h) has the scalar function's bits in every lane: random
// gates over the whole f32 range and the edges (zeros, subnormals, the exponential's ends near
// -87.3 and -104, huge, inf, NaN of both signs), rows with a partial last vector.
TEST(GatedQuantMath, VectorSiluHasTheScalarBits) {
  std::mt19937_64 rng = rng_for("vector silu");
  const std::vector<float> edges = {
      0.0f,     -0.0f,     1e-45f,        -1e-45f,        1e-39f,  -1e-39f,  87.3365f, -87.3365f,
      -87.5f,   87.7f,     -87.7f,        -103.9f,        -104.0f, -104.1f,  -1e30f,   1e30f,
      INFINITY, -INFINITY, std::nanf(""), -std::nanf(""), 3.4e38f, -3.4e38f, 1.0f,     -1.0f};
  for (const int64_t cols : {int64_t{1}, int64_t{7}, int64_t{16}, int64_t{1013}}) {
    const int64_t rows = 3;
    std::vector<float> x(static_cast<size_t>(rows * 2 * cols));
    for (size_t i = 0; i < x.size(); ++i) {
      if (rng() % 4 == 0) {
        x[i] = edges[rng() % edges.size()];
      } else {  // any finite bits of either sign
        uint32_t bits = static_cast<uint32_t>(rng());
        if ((bits & 0x7f800000u) == 0x7f800000u) bits &= 0xbfffffffu;
        x[i] = std::bit_cast<float>(bits);
      }
    }
    std::vector<float> want(static_cast<size_t>(rows * cols));
    cpu::silu_and_mul_rows(cpu::Fp8Isa::portable, x.data(), rows, cols, want.data());
    for (cpu::Fp8Isa isa : {cpu::Fp8Isa::avx2, cpu::Fp8Isa::avx512}) {
      if (isa == cpu::Fp8Isa::avx2 && !cpu_features().avx2) continue;
      if (isa == cpu::Fp8Isa::avx512 && !cpu_features().avx512) continue;
      std::vector<float> got(want.size(), -1.0f);
      cpu::silu_and_mul_rows(isa, x.data(), rows, cols, got.data());
      for (size_t i = 0; i < want.size(); ++i) {
        const size_t gate = i / static_cast<size_t>(cols) * static_cast<size_t>(2 * cols) +
                            i % static_cast<size_t>(cols);
        ASSERT_EQ(std::bit_cast<uint32_t>(got[i]), std::bit_cast<uint32_t>(want[i]))
            << "isa " << static_cast<int>(isa) << " gate " << x[gate] << " up "
            << x[gate + static_cast<size_t>(cols)];
      }
    }
  }
}

constexpr uint8_t kSentinel = 0xA5;

Tensor filled(DType dtype, std::initializer_list<int64_t> shape) {
  Tensor t = Tensor::empty(dtype, shape);
  std::memset(t.data(), kSentinel, t.nbytes());
  return t;
}

struct Case {
  int64_t m, k;  // x is [m, 2k]
  int group;
  DType dtype;
  ScaleLayout layout;
  bool ue8m0;
};

std::string describe(const Case& c) {
  return "M=" + std::to_string(c.m) + " K=" + std::to_string(c.k) +
         " group=" + std::to_string(c.group) + " " + std::string(dtype_name(c.dtype)) + " " +
         scale_layout_name(c.layout) + (c.ue8m0 ? " ue8m0" : "");
}

// Every implementation of the table that serves the gated problem writes the bytes and scales it
// writes for the plain problem over y = silu_and_mul_f32(gate, up) as an f32 tensor; the public op
// (default dispatch) too; and nothing past q's row or the scales' storage is written.
void check_case(std::mt19937_64& rng, const Case& c) {
  SCOPED_TRACE(describe(c));
  const int64_t M = c.m, K = c.k;
  Tensor x = Tensor::empty(c.dtype, {M, 2 * K});
  Tensor y = Tensor::empty(DType::f32, {M, K});
  std::uniform_real_distribution<float> value(-12.0f, 12.0f);
  for (int64_t i = 0; i < x.numel(); ++i) {
    float v = value(rng) * std::ldexp(1.0f, static_cast<int>(rng() % 9) - 4);
    if (rng() % 997 == 0) v = (rng() % 2) ? std::nanf("") : -INFINITY;
    store_from_f32(x.data(), c.dtype, i, v);
  }
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k)
      y.data_as<float>()[m * K + k] =
          silu_and_mul_f32(load_as_f32(x.data(), c.dtype, m * 2 * K + k),
                           load_as_f32(x.data(), c.dtype, m * 2 * K + K + k));
  GroupQuantConfig config;
  config.group_size = c.group;
  config.layout = c.layout;
  config.ue8m0 = c.ue8m0;
  const ScaleStorage s = group_quant_scale_storage(M, K, config);
  Tensor q_want = filled(DType::f8e4m3, {M, K}), s_want = filled(s.dtype, {s.shape[0], s.shape[1]});
  Tensor q = filled(DType::f8e4m3, {M, K}), scales = filled(s.dtype, {s.shape[0], s.shape[1]});
  const GroupQuantProblem gated =
      make_group_quant_problem("test", x, q, scales, config, OpOptions{}, true);
  const GroupQuantProblem plain = make_group_quant_problem("test", y, q_want, s_want, config, {});
  int served = 0;
  for (const GroupQuantImplementation& impl : group_quant_implementations()) {
    if (!impl.supports(gated).empty() || impl.backend == Backend::gpu) continue;
    SCOPED_TRACE(impl.name);
    std::memset(q_want.data(), kSentinel, q_want.nbytes());
    std::memset(s_want.data(), kSentinel, s_want.nbytes());
    std::memset(q.data(), kSentinel, q.nbytes());
    std::memset(scales.data(), kSentinel, scales.nbytes());
    impl.run(plain);
    impl.run(gated);
    EXPECT_EQ(std::memcmp(q.data(), q_want.data(), q.nbytes()), 0);
    EXPECT_EQ(std::memcmp(scales.data(), s_want.data(), scales.nbytes()), 0);
    ++served;
  }
  EXPECT_GE(served, 2);  // the reference and at least the portable CPU kernel
  // The public op: what the dispatch picks for the gated problem writes what it picks for y.
  std::memset(q.data(), kSentinel, q.nbytes());
  std::memset(scales.data(), kSentinel, scales.nbytes());
  per_token_group_quant_fp8(y, q_want, s_want, config);
  silu_and_mul_group_quant_fp8(x, q, scales, config);
  EXPECT_EQ(std::memcmp(q.data(), q_want.data(), q.nbytes()), 0);
  EXPECT_EQ(std::memcmp(scales.data(), s_want.data(), scales.nbytes()), 0);
}

TEST(GatedQuant, EveryImplementationQuantizesTheF32Activations) {
  std::mt19937_64 rng = rng_for("gated");
  const ScaleLayout layouts[] = {ScaleLayout::row_major, ScaleLayout::column_major,
                                 ScaleLayout::column_major_tma, ScaleLayout::packed_ue8m0};
  for (ScaleLayout layout : layouts)
    for (DType dtype : {DType::bf16, DType::f16, DType::f32}) {
      const bool ue8m0 = layout == ScaleLayout::packed_ue8m0 || rng() % 2 == 0;
      check_case(rng, {1 + static_cast<int64_t>(rng() % 9), 768, 128, dtype, layout, ue8m0});
    }
  check_case(rng, {5, 48, 16, DType::bf16, ScaleLayout::row_major, false});
  check_case(rng, {3, 1536, 256, DType::bf16, ScaleLayout::column_major_tma, false});
  check_case(rng, {0, 128, 128, DType::bf16, ScaleLayout::row_major, false});
}

TEST(GatedQuant, GateIsTheFirstHalfAndUpTheSecond) {
  // One row, K = 16: gate 1 and up 2 in the first 8 columns, gate 2 and up 1 in the rest.
  Tensor x = Tensor::empty(DType::f32, {1, 32});
  for (int k = 0; k < 16; ++k) {
    x.data_as<float>()[k] = k < 8 ? 1.0f : 2.0f;       // gate
    x.data_as<float>()[16 + k] = k < 8 ? 2.0f : 1.0f;  // up
  }
  GroupQuantConfig config;
  config.group_size = 16;
  Tensor q = filled(DType::f8e4m3, {1, 16}), scales = filled(DType::f32, {1, 1});
  silu_and_mul_group_quant_fp8(x, q, scales, config);
  const double first = 2.0 / (1.0 + std::exp(-1.0)), second = 2.0 / (1.0 + std::exp(-2.0));
  EXPECT_NEAR(scales.data_as<float>()[0], second / 448.0, 1e-6 * second / 448.0);
  EXPECT_EQ(q.data_as<uint8_t>()[8], 0x7e);  // the group's amax quantizes to 448
  EXPECT_NEAR(f8e4m3_to_f32(q.data_as<uint8_t>()[0]), first / second * 448.0,
              16.0);  // steps of 32 there
  // A negative NaN gate quantizes to the positive NaN byte, the group's scale unchanged.
  x.data_as<float>()[1] = -std::nanf("");
  silu_and_mul_group_quant_fp8(x, q, scales, config);
  EXPECT_EQ(q.data_as<uint8_t>()[1], 0x7f);
  EXPECT_NEAR(scales.data_as<float>()[0], second / 448.0, 1e-6 * second / 448.0);
}

// The message of the moekit::Error `call` throws, or "no error".
template <class Call>
std::string message(Call&& call) {
  try {
    call();
  } catch (const Error& e) {
    return std::string(e.what());
  }
  return "no error";
}

TEST(GatedQuant, BadArgumentsNameTheArgumentAndWriteNothing) {
  GroupQuantConfig config;
  Tensor odd = Tensor::empty(DType::bf16, {2, 255});
  Tensor x = Tensor::empty(DType::bf16, {2, 512});
  std::memset(x.data(), 0, x.nbytes());
  Tensor q = filled(DType::f8e4m3, {2, 256});
  Tensor q_full = filled(DType::f8e4m3, {2, 512});
  Tensor scales = filled(DType::f32, {2, 2});
  const std::string odd_width =
      message([&] { silu_and_mul_group_quant_fp8(odd, q, scales, config); });
  EXPECT_NE(odd_width.find("x.shape"), std::string::npos) << odd_width;
  EXPECT_NE(odd_width.find("odd width"), std::string::npos) << odd_width;
  const std::string wrong_q =
      message([&] { silu_and_mul_group_quant_fp8(x, q_full, scales, config); });
  EXPECT_NE(wrong_q.find("q.shape"), std::string::npos) << wrong_q;
  EXPECT_NE(wrong_q.find("[2, 256]"), std::string::npos) << wrong_q;
  Tensor wrong_scales = filled(DType::f32, {2, 4});
  const std::string bad_scales =
      message([&] { silu_and_mul_group_quant_fp8(x, q, wrong_scales, config); });
  EXPECT_NE(bad_scales.find("scales"), std::string::npos) << bad_scales;
  for (const Tensor* t : {&q, &q_full, &scales, &wrong_scales})
    for (size_t i = 0; i < t->nbytes(); ++i)
      ASSERT_EQ(static_cast<const uint8_t*>(t->data())[i], kSentinel) << "written on error";
  // A valid call on the same tensors writes q and scales.
  silu_and_mul_group_quant_fp8(x, q, scales, config);
  EXPECT_EQ(q.data_as<uint8_t>()[0], 0);  // silu(0) * 0 = 0
  EXPECT_EQ(scales.data_as<float>()[0], 1e-10f / kFp8E4m3Max);
  EXPECT_EQ(explain_silu_and_mul_group_quant_fp8(x, q, scales, config).empty(), false);
}

// The masked layout on the host entries: each group's first rows as the gated op quantizes them on
// their own (logical scales compared, so M's and the group's addressing may differ), every other
// row of q and scale untouched.
void check_masked(std::mt19937_64& rng, ScaleLayout layout, const std::vector<int32_t>& counts) {
  SCOPED_TRACE(scale_layout_name(layout));
  const auto G = static_cast<int64_t>(counts.size());
  const int64_t M = 6, K = 256;
  GroupQuantConfig config;
  config.layout = layout;
  config.ue8m0 = layout == ScaleLayout::packed_ue8m0;
  Tensor x = Tensor::empty(DType::bf16, {G, M, 2 * K});
  std::uniform_real_distribution<float> value(-6.0f, 6.0f);
  for (int64_t i = 0; i < x.numel(); ++i) store_from_f32(x.data(), DType::bf16, i, value(rng));
  Tensor masked_m = Tensor::empty(DType::i32, {G});
  std::memcpy(masked_m.data(), counts.data(), counts.size() * 4);
  const ScaleStorage s = group_quant_scale_storage(M, K, config);
  const ScaleAddressing at_m = scale_addressing(layout, M, K / config.group_size);
  for (const MaskedGatedQuantImplementation& impl : masked_gated_quant_implementations()) {
    if (impl.backend == Backend::gpu) continue;
    SCOPED_TRACE(impl.name);
    Tensor q = filled(DType::f8e4m3, {G, M, K}),
           scales = filled(s.dtype, {G, s.shape[0], s.shape[1]});
    OpOptions options;
    options.implementation = impl.name;
    silu_and_mul_group_quant_fp8_masked(x, masked_m, q, scales, config, options);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t rows = std::clamp<int64_t>(counts[static_cast<size_t>(g)], 0, M);
      const auto* q_group = q.data_as<uint8_t>() + g * M * K;
      const auto* s_group =
          static_cast<const uint8_t*>(scales.data()) + g * s.shape[0] * s.shape[1] * 4;
      if (rows > 0) {
        const int64_t x_shape[2] = {rows, 2 * K}, x_strides[2] = {2 * K, 1};
        const TensorView x_rows(x.data_as<uint16_t>() + g * M * 2 * K, DType::bf16, x_shape,
                                x_strides);
        const ScaleStorage own = group_quant_scale_storage(rows, K, config);
        Tensor want_q = filled(DType::f8e4m3, {rows, K});
        Tensor want_s = filled(own.dtype, {own.shape[0], own.shape[1]});
        silu_and_mul_group_quant_fp8(x_rows, want_q, want_s, config, OpOptions{Backend::reference});
        EXPECT_EQ(std::memcmp(q_group, want_q.data(), want_q.nbytes()), 0) << "group " << g;
        const ScaleAddressing at_rows = scale_addressing(layout, rows, K / config.group_size);
        for (int64_t m = 0; m < rows; ++m)
          for (int64_t grp = 0; grp < K / config.group_size; ++grp)
            EXPECT_EQ(read_scale(s_group, at_m, m, grp), read_scale(want_s.data(), at_rows, m, grp))
                << "group " << g << " row " << m;
      }
      for (int64_t i = rows * K; i < M * K; ++i) {
        ASSERT_EQ(q_group[i], kSentinel) << "group " << g << ": q written past its rows";
      }
      if (layout == ScaleLayout::row_major) {
        for (int64_t i = rows * s.shape[1] * 4; i < s.shape[0] * s.shape[1] * 4; ++i) {
          ASSERT_EQ(s_group[i], kSentinel) << "group " << g << ": scales written past its rows";
        }
      }
    }
  }
}

TEST(GatedQuantMasked, EachGroupQuantizesItsRowsOnly) {
  std::mt19937_64 rng = rng_for("masked");
  check_masked(rng, ScaleLayout::row_major, {6, 0, 3, 9, -1});
  check_masked(rng, ScaleLayout::column_major_tma, {2, 6, 0});
  check_masked(rng, ScaleLayout::packed_ue8m0, {5, 1});
  check_masked(rng, ScaleLayout::row_major, {0, 0});  // nothing to quantize: nothing written
}

TEST(GatedQuantMasked, BadArgumentsNameTheArgument) {
  GroupQuantConfig config;
  Tensor x = Tensor::empty(DType::bf16, {3, 4, 512});
  std::memset(x.data(), 0, x.nbytes());
  Tensor q = filled(DType::f8e4m3, {3, 4, 256}), scales = filled(DType::f32, {3, 4, 2});
  Tensor counts = Tensor::empty(DType::i32, {3});
  std::memset(counts.data(), 0, counts.nbytes());
  Tensor two_counts = Tensor::empty(DType::i32, {2});
  EXPECT_NE(message([&] {
              silu_and_mul_group_quant_fp8_masked(x, two_counts, q, scales, config);
            }).find("masked_m.shape"),
            std::string::npos);
  Tensor float_counts = Tensor::empty(DType::f32, {3});
  EXPECT_NE(message([&] {
              silu_and_mul_group_quant_fp8_masked(x, float_counts, q, scales, config);
            }).find("masked_m.dtype"),
            std::string::npos);
  Tensor flat = Tensor::empty(DType::bf16, {4, 512});
  EXPECT_NE(message([&] {
              silu_and_mul_group_quant_fp8_masked(flat, counts, q, scales, config);
            }).find("x.shape"),
            std::string::npos);
  Tensor q_two = filled(DType::f8e4m3, {2, 4, 256});
  EXPECT_NE(message([&] {
              silu_and_mul_group_quant_fp8_masked(x, counts, q_two, scales, config);
            }).find("q.shape"),
            std::string::npos);
  Tensor q_wide = filled(DType::f8e4m3, {3, 4, 512});
  EXPECT_NE(message([&] {
              silu_and_mul_group_quant_fp8_masked(x, counts, q_wide, scales, config);
            }).find("q.shape"),
            std::string::npos);
  // Overlapping groups of q: stride(0) of 256 elements for planes of 4 x 256.
  const int64_t shape[3] = {3, 4, 256}, strides[3] = {256, 256, 1};
  const TensorView overlapping(q.data(), DType::f8e4m3, shape, strides);
  EXPECT_NE(message([&] {
              silu_and_mul_group_quant_fp8_masked(x, counts, overlapping, scales, config);
            }).find("q.strides"),
            std::string::npos);
  for (size_t i = 0; i < q.nbytes(); ++i)
    ASSERT_EQ(q.data_as<uint8_t>()[i], kSentinel) << "written on error";
  EXPECT_FALSE(explain_silu_and_mul_group_quant_fp8_masked(x, counts, q, scales, config).empty());
}

// silu_and_mul_grouped_block_fp8_gemm_masked on every host entry: each group's rows with the bytes
// of the gated quantization then the masked grouped GEMM called apart on the same backend, nothing
// else of out written; the CPU's within the contract's tolerance of the reference's.
TEST(SiluGroupedGemm, HostEntriesEqualTheTwoOpsApart) {
  std::mt19937_64 rng = rng_for("silu grouped gemm");
  const std::vector<int32_t> counts = {3, 0, 7, -1, 1};
  const auto G = static_cast<int64_t>(counts.size());
  const int64_t M = 7, N = 200, K = 384;
  for (const bool ue8m0 : {false, true}) {
    SCOPED_TRACE(ue8m0 ? "ue8m0" : "f32 scales");
    GroupQuantConfig config;
    config.ue8m0 = ue8m0;
    Tensor x = Tensor::empty(DType::bf16, {G, M, 2 * K});
    std::normal_distribution<float> value(0.0f, 2.0f);
    for (int64_t i = 0; i < x.numel(); ++i) store_from_f32(x.data(), DType::bf16, i, value(rng));
    Tensor b = Tensor::empty(DType::f8e4m3, {G, N, K});
    for (int64_t i = 0; i < b.numel(); ++i) {
      const auto byte = static_cast<uint8_t>(rng());
      b.data_as<uint8_t>()[i] = (byte & 0x7f) == 0x7f ? static_cast<uint8_t>(byte ^ 1) : byte;
    }
    Tensor bs = Tensor::empty(DType::f32, {G, 2, 3});
    std::uniform_real_distribution<float> scale(0.001f, 0.01f);
    for (int64_t i = 0; i < bs.numel(); ++i) bs.data_as<float>()[i] = scale(rng);
    Tensor masked_m = Tensor::empty(DType::i32, {G});
    std::memcpy(masked_m.data(), counts.data(), counts.size() * 4);
    const size_t bytes = silu_and_mul_grouped_block_fp8_gemm_masked_workspace_size(G, M, K);
    std::vector<Tensor> outs;
    for (const Backend backend : {Backend::reference, Backend::cpu}) {
      SCOPED_TRACE(backend_name(backend));
      const OpOptions options{backend};
      Tensor space = Tensor::empty(DType::u8, {static_cast<int64_t>(bytes)});
      Tensor out = filled(DType::f32, {G, M, N});
      silu_and_mul_grouped_block_fp8_gemm_masked(x, masked_m, b, bs, out, config, 2, space.data(),
                                                 bytes, options);
      // Apart: the gated quantization into q and column-major TMA-aligned scales (the op's own
      // layout), then the GEMM.
      GroupQuantConfig inside = config;
      inside.layout = ScaleLayout::column_major_tma;
      Tensor q = filled(DType::f8e4m3, {G, M, K}), q_scales = filled(DType::f32, {G, 3, 8});
      silu_and_mul_group_quant_fp8_masked(x, masked_m, q, q_scales, inside, options);
      Tensor want = filled(DType::f32, {G, M, N});
      grouped_block_fp8_gemm_masked(q, q_scales, ScaleLayout::column_major_tma, b, bs, masked_m,
                                    want, options);
      for (int64_t g = 0; g < G; ++g) {
        const int64_t rows = std::clamp<int64_t>(counts[static_cast<size_t>(g)], 0, M);
        const auto* got = out.data_as<uint8_t>() + g * M * N * 4;
        EXPECT_EQ(std::memcmp(got, want.data_as<uint8_t>() + g * M * N * 4,
                              static_cast<size_t>(rows * N * 4)),
                  0)
            << "group " << g;
        for (int64_t i = rows * N * 4; i < M * N * 4; ++i)
          ASSERT_EQ(got[i], kSentinel) << "group " << g << " byte " << i;
      }
      outs.push_back(std::move(out));
    }
    double error = 0, magnitude = 0;
    for (int64_t g = 0; g < G; ++g)
      for (int64_t i = 0; i < std::clamp<int64_t>(counts[static_cast<size_t>(g)], 0, M) * N; ++i) {
        const float ref = outs[0].data_as<float>()[g * M * N + i];
        error += std::fabs(static_cast<double>(outs[1].data_as<float>()[g * M * N + i]) - ref);
        magnitude += std::fabs(static_cast<double>(ref));
      }
    EXPECT_LT(error / magnitude, 1e-3);  // spec/fp8.md, f32 out
    // Without a workspace no host entry serves; explain says why each declines.
    Tensor out = filled(DType::f32, {G, M, N});
    EXPECT_THROW(silu_and_mul_grouped_block_fp8_gemm_masked(x, masked_m, b, bs, out, config, 0,
                                                            nullptr, 0, OpOptions{Backend::cpu}),
                 Error);
    for (const ImplementationChoice& row : explain_silu_and_mul_grouped_block_fp8_gemm_masked(
             x, masked_m, b, bs, out, config, 0, nullptr, 0, OpOptions{Backend::cpu}))
      if (row.backend == Backend::cpu) {
        EXPECT_FALSE(row.chosen);
        EXPECT_NE(row.reason.find("no workspace"), std::string::npos) << row.reason;
      }
  }
}

}  // namespace
}  // namespace moekit
