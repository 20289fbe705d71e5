// Exhaustive tests of the dtype conversions against independent (ldexp / table based) references.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "moekit/dtype.h"
#include "moekit/error.h"

namespace moekit {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// Describes one narrow floating format in a way independent of the library's bit tricks.
struct Format {
  const char* name;
  int exp_bits;
  int man_bits;
  uint32_t max_finite;  // magnitude encoding of the largest finite value
  bool has_inf;         // the encoding after max_finite is +inf
  bool saturates;       // finite overflow clamps to max instead of becoming inf
  float (*to_f32)(uint32_t);
  uint32_t (*from_f32)(float);

  int bias() const { return (1 << (exp_bits - 1)) - 1; }
  uint32_t sign_bit() const { return 1u << (exp_bits + man_bits); }
  int num_patterns() const { return 1 << (1 + exp_bits + man_bits); }

  // Independent decoding of a finite magnitude encoding with ldexp; exact in double.
  double decode_magnitude(uint32_t mag) const {
    const uint32_t exp = mag >> man_bits;
    const uint32_t man = mag & ((1u << man_bits) - 1);
    if (exp == 0) return std::ldexp(static_cast<double>(man), 1 - bias() - man_bits);
    return std::ldexp(static_cast<double>(man + (1u << man_bits)),
                      static_cast<int>(exp) - bias() - man_bits);
  }
  // Value the encoding right after max_finite would have with an unbounded exponent range.
  double next_after_max() const { return decode_magnitude(max_finite + 1); }
  bool is_nan(uint32_t bits) const {
    const uint32_t mag = bits & (sign_bit() - 1);
    if (has_inf) return mag > max_finite + 1;
    return mag > max_finite;
  }
  bool is_inf(uint32_t bits) const {
    return has_inf && (bits & (sign_bit() - 1)) == max_finite + 1;
  }
};

const Format kF16{"f16",
                  5,
                  10,
                  0x7bff,
                  true,
                  false,
                  [](uint32_t b) { return f16_to_f32(static_cast<uint16_t>(b)); },
                  [](float f) -> uint32_t { return f32_to_f16(f); }};
const Format kBF16{"bf16",
                   8,
                   7,
                   0x7f7f,
                   true,
                   false,
                   [](uint32_t b) { return bf16_to_f32(static_cast<uint16_t>(b)); },
                   [](float f) -> uint32_t { return f32_to_bf16(f); }};
const Format kE4M3{"f8e4m3",
                   4,
                   3,
                   0x7e,
                   false,
                   true,
                   [](uint32_t b) { return f8e4m3_to_f32(static_cast<uint8_t>(b)); },
                   [](float f) -> uint32_t { return f32_to_f8e4m3(f); }};
const Format kE5M2{"f8e5m2",
                   5,
                   2,
                   0x7b,
                   true,
                   true,
                   [](uint32_t b) { return f8e5m2_to_f32(static_cast<uint8_t>(b)); },
                   [](float f) -> uint32_t { return f32_to_f8e5m2(f); }};
const Format* const kFormats[] = {&kF16, &kBF16, &kE4M3, &kE5M2};

float up(float f) { return std::nextafter(f, kInf); }
float down(float f) { return std::nextafter(f, -kInf); }

// Exact f32 of a double that must be representable; fails the test otherwise.
float exact_f32(double d) {
  const float f = static_cast<float>(d);
  EXPECT_EQ(static_cast<double>(f), d) << "not representable in f32: " << d;
  return f;
}

TEST(DTypeDecode, EveryPatternMatchesLdexpAndRoundTrips) {
  for (const Format* fmt : kFormats) {
    SCOPED_TRACE(fmt->name);
    for (int p = 0; p < fmt->num_patterns(); ++p) {
      const auto bits = static_cast<uint32_t>(p);
      const bool neg = (bits & fmt->sign_bit()) != 0;
      const uint32_t mag = bits & (fmt->sign_bit() - 1);
      const float f = fmt->to_f32(bits);
      if (fmt->is_nan(bits)) {
        ASSERT_TRUE(std::isnan(f)) << "pattern " << p;
        ASSERT_EQ(std::signbit(f), neg) << "pattern " << p;
        const uint32_t back = fmt->from_f32(f);
        ASSERT_TRUE(fmt->is_nan(back)) << "pattern " << p << " -> " << back;
        ASSERT_EQ((back & fmt->sign_bit()) != 0, neg) << "pattern " << p;
        // A quiet NaN (top mantissa bit set) survives unchanged, payload included.
        if (mag & (1u << (fmt->man_bits - 1))) {
          ASSERT_EQ(back, bits) << "pattern " << p;
        }
        continue;
      }
      double expected =
          fmt->is_inf(bits) ? std::numeric_limits<double>::infinity() : fmt->decode_magnitude(mag);
      if (neg) expected = -expected;
      ASSERT_EQ(static_cast<double>(f), expected) << "pattern " << p;
      ASSERT_EQ(std::signbit(f), neg) << "pattern " << p;  // -0 keeps its sign
      ASSERT_EQ(fmt->from_f32(f), bits) << "pattern " << p;
    }
  }
}

TEST(DTypeDecode, Bf16IsTopHalfOfF32) {
  for (uint32_t p = 0; p < 0x10000; ++p) {
    ASSERT_EQ(f32_bits(bf16_to_f32(static_cast<uint16_t>(p))), p << 16);
  }
}

// For every pair of adjacent non-negative finite values (lo, hi): the midpoint ties to the even
// encoding, and one f32 ulp either side goes to the nearer one. Negative values mirror.
TEST(DTypeRounding, MidpointsOfEveryAdjacentPair) {
  for (const Format* fmt : kFormats) {
    SCOPED_TRACE(fmt->name);
    for (uint32_t lo_bits = 0; lo_bits < fmt->max_finite; ++lo_bits) {
      const uint32_t hi_bits = lo_bits + 1;
      const double lo = fmt->decode_magnitude(lo_bits);
      const double hi = fmt->decode_magnitude(hi_bits);
      const float mid = exact_f32((lo + hi) / 2);
      const uint32_t even = (lo_bits & 1) == 0 ? lo_bits : hi_bits;
      for (const uint32_t sign : {0u, fmt->sign_bit()}) {
        const float s = sign ? -1.0f : 1.0f;
        ASSERT_EQ(fmt->from_f32(s * mid), sign | even) << "lo " << lo_bits;
        ASSERT_EQ(fmt->from_f32(s * down(mid)), sign | lo_bits) << "lo " << lo_bits;
        ASSERT_EQ(fmt->from_f32(s * up(mid)), sign | hi_bits) << "lo " << lo_bits;
        ASSERT_EQ(fmt->from_f32(s * exact_f32(lo)), sign | lo_bits) << "lo " << lo_bits;
      }
    }
  }
}

// Reference rounding by table search: independent of the bit-level implementation.
uint32_t reference_round(const Format& fmt, const std::vector<double>& table, float f) {
  const uint32_t sign = std::signbit(f) ? fmt.sign_bit() : 0u;
  if (std::isnan(f)) return ~0u;  // checked separately
  const double x = std::fabs(static_cast<double>(f));
  // table holds values of encodings 0 .. max_finite + 1 (the last one possibly hypothetical).
  uint32_t idx;
  if (x >= table.back()) {
    idx = static_cast<uint32_t>(table.size() - 1);
  } else {
    const auto it = std::upper_bound(table.begin(), table.end(), x);
    const auto i = static_cast<uint32_t>(it - table.begin() - 1);
    // 2x and lo + hi are exact in double, so this comparison is exact.
    const double twice = 2 * x, sum = table[i] + table[i + 1];
    idx = twice < sum ? i : twice > sum ? i + 1 : ((i & 1) == 0 ? i : i + 1);
  }
  if (idx > fmt.max_finite && (fmt.saturates || !fmt.has_inf)) {
    idx = fmt.max_finite;  // FP8 saturation
  }
  if (std::isinf(f)) idx = fmt.has_inf ? fmt.max_finite + 1 : fmt.max_finite;
  return sign | idx;
}

TEST(DTypeRounding, SampledF32MatchesTableReference) {
  std::mt19937 rng(12345);
  std::vector<uint32_t> inputs;
  for (int i = 0; i < (1 << 18); ++i) inputs.push_back(rng());
  // A strided sweep over all f32 patterns reaches every exponent, both signs, inf and NaN.
  for (uint64_t u = 0; u <= 0xffffffffull; u += 8191) inputs.push_back(static_cast<uint32_t>(u));
  for (const Format* fmt : kFormats) {
    SCOPED_TRACE(fmt->name);
    std::vector<double> table;
    for (uint32_t m = 0; m <= fmt->max_finite + 1; ++m) table.push_back(fmt->decode_magnitude(m));
    for (const uint32_t u : inputs) {
      const float f = f32_from_bits(u);
      const uint32_t got = fmt->from_f32(f);
      if (std::isnan(f)) {
        ASSERT_TRUE(fmt->is_nan(got)) << std::hex << u;
        ASSERT_EQ((got & fmt->sign_bit()) != 0, std::signbit(f)) << std::hex << u;
      } else {
        ASSERT_EQ(got, reference_round(*fmt, table, f)) << std::hex << u;
      }
    }
  }
}

TEST(DTypeRounding, E4M3Saturation) {
  // 448 = 0x7e; a hypothetical 480 would be 0x7f, so the rounding midpoint is 464.
  for (const float s : {1.0f, -1.0f}) {
    const uint8_t max = s > 0 ? 0x7e : 0xfe;
    for (const float v : {448.0f, up(448.0f), down(464.0f), 464.0f, up(464.0f), 480.0f, 1000.0f,
                          1e30f, std::numeric_limits<float>::max(), kInf}) {
      EXPECT_EQ(f32_to_f8e4m3(s * v), max) << s * v;
    }
    EXPECT_EQ(f32_to_f8e4m3(s * down(448.0f)), max);
    EXPECT_EQ(f32_to_f8e4m3(s * 416.0f), max - 1);  // 0x7d
    EXPECT_EQ(f32_to_f8e4m3(s * 432.0f), max);      // tie 416/448 -> even 0x7e
    EXPECT_EQ(f32_to_f8e4m3(s * down(432.0f)), max - 1);
    EXPECT_EQ(f8e4m3_to_f32(max), s * 448.0f);
  }
}

TEST(DTypeRounding, E5M2SaturationAndInf) {
  // 57344 = 0x7b (odd); the midpoint to 61440 (the inf encoding) is 59392, which would tie to
  // even 0x7c = inf, but finite values must saturate.
  for (const float s : {1.0f, -1.0f}) {
    const uint8_t sign = s > 0 ? 0x00 : 0x80;
    for (const float v : {57344.0f, up(57344.0f), down(59392.0f), 59392.0f, up(59392.0f), 61440.0f,
                          1e30f, std::numeric_limits<float>::max()}) {
      EXPECT_EQ(f32_to_f8e5m2(s * v), sign | 0x7b) << s * v;
    }
    EXPECT_EQ(f32_to_f8e5m2(s * kInf), sign | 0x7c);
    EXPECT_EQ(f8e5m2_to_f32(sign | 0x7c), s * kInf);
    EXPECT_EQ(f8e5m2_to_f32(sign | 0x7b), s * 57344.0f);
  }
}

TEST(DTypeRounding, F16AndBf16OverflowToInf) {
  // f16 max 65504; midpoint to 65536 ties to even 0x7c00 = inf.
  EXPECT_EQ(f32_to_f16(down(65520.0f)), 0x7bff);
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7c00);
  EXPECT_EQ(f32_to_f16(-65520.0f), 0xfc00);
  EXPECT_EQ(f32_to_f16(1e10f), 0x7c00);
  EXPECT_EQ(f32_to_f16(kInf), 0x7c00);
  EXPECT_EQ(f32_to_f16(-kInf), 0xfc00);
  EXPECT_EQ(f32_to_f16(std::numeric_limits<float>::max()), 0x7c00);
  // bf16 max 0x7f7f; f32 0x7f7f8000 is the tie to inf.
  EXPECT_EQ(f32_to_bf16(f32_from_bits(0x7f7f7fff)), 0x7f7f);
  EXPECT_EQ(f32_to_bf16(f32_from_bits(0x7f7f8000)), 0x7f80);
  EXPECT_EQ(f32_to_bf16(std::numeric_limits<float>::max()), 0x7f80);
  EXPECT_EQ(f32_to_bf16(-kInf), 0xff80);
}

TEST(DTypeRounding, NaN) {
  for (const uint32_t nan_bits : {0x7fc00000u, 0x7f800001u, 0x7fffffffu, 0x7fa00000u}) {
    for (const uint32_t sign : {0u, 0x80000000u}) {
      const float f = f32_from_bits(sign | nan_bits);
      SCOPED_TRACE(testing::Message() << std::hex << (sign | nan_bits));
      const uint16_t h = f32_to_f16(f);
      EXPECT_EQ(h & 0x7c00, 0x7c00);
      EXPECT_NE(h & 0x0200, 0);  // quiet
      EXPECT_EQ((h & 0x8000) != 0, sign != 0);
      const uint16_t b = f32_to_bf16(f);
      EXPECT_EQ(b & 0x7f80, 0x7f80);
      EXPECT_NE(b & 0x0040, 0);  // quiet
      EXPECT_EQ((b & 0x8000) != 0, sign != 0);
      EXPECT_EQ(f32_to_f8e4m3(f), sign ? 0xff : 0x7f);
      const uint8_t e5 = f32_to_f8e5m2(f);
      EXPECT_EQ(e5 & 0x7c, 0x7c);
      EXPECT_NE(e5 & 0x02, 0);  // quiet
      EXPECT_EQ((e5 & 0x80) != 0, sign != 0);
    }
  }
  EXPECT_TRUE(std::isnan(f8e4m3_to_f32(0x7f)));
  EXPECT_TRUE(std::isnan(f8e4m3_to_f32(0xff)));
  EXPECT_TRUE(std::signbit(f8e4m3_to_f32(0xff)));
}

TEST(DTypeRounding, SignedZeroAndUnderflow) {
  EXPECT_EQ(f32_to_f16(0.0f), 0x0000);
  EXPECT_EQ(f32_to_f16(-0.0f), 0x8000);
  EXPECT_EQ(f32_to_bf16(-0.0f), 0x8000);
  EXPECT_EQ(f32_to_f8e4m3(-0.0f), 0x80);
  EXPECT_EQ(f32_to_f8e5m2(-0.0f), 0x80);
  EXPECT_TRUE(std::signbit(f16_to_f32(0x8000)));
  EXPECT_TRUE(std::signbit(f8e4m3_to_f32(0x80)));
  EXPECT_TRUE(std::signbit(f8e5m2_to_f32(0x80)));
  // Tiny negatives (including f32 subnormals) underflow to -0.
  const float denorm_min = std::numeric_limits<float>::denorm_min();
  for (const float v : {denorm_min, std::numeric_limits<float>::min(), 1e-30f}) {
    EXPECT_EQ(f32_to_f16(-v), 0x8000) << v;
    EXPECT_EQ(f32_to_f8e4m3(-v), 0x80) << v;
    EXPECT_EQ(f32_to_f8e5m2(-v), 0x80) << v;
    EXPECT_EQ(f32_to_f16(v), 0x0000) << v;
  }
  EXPECT_EQ(f32_to_bf16(-denorm_min), 0x8000);
  EXPECT_EQ(f32_to_bf16(f32_from_bits(0x8000ffff)), 0x8001);  // rounds up to a bf16 subnormal
}

TEST(DTypeRounding, Subnormals) {
  // Smallest subnormals: f16 2^-24, e4m3 2^-9, e5m2 2^-16. Half of it ties to even (zero).
  struct Case {
    const Format* fmt;
    int min_exp;
  };
  for (const Case c : {Case{&kF16, -24}, Case{&kE4M3, -9}, Case{&kE5M2, -16}, Case{&kBF16, -133}}) {
    SCOPED_TRACE(c.fmt->name);
    const float min_sub = std::ldexp(1.0f, c.min_exp);
    EXPECT_EQ(c.fmt->from_f32(min_sub), 1u);
    EXPECT_EQ(c.fmt->from_f32(min_sub / 2), 0u);
    EXPECT_EQ(c.fmt->from_f32(up(min_sub / 2)), 1u);
    EXPECT_EQ(c.fmt->from_f32(min_sub * 1.5f), 2u);  // tie between 1 and 2 -> 2
    EXPECT_EQ(c.fmt->from_f32(min_sub * 2.5f), 2u);  // tie between 2 and 3 -> 2
    EXPECT_EQ(c.fmt->to_f32(1), min_sub);
  }
  // Largest subnormal rounding up into the smallest normal.
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -14) - std::ldexp(1.0f, -26)), 0x0400);
  EXPECT_EQ(f32_to_f8e4m3(std::ldexp(1.0f, -6) - std::ldexp(1.0f, -11)), 0x08);
}

TEST(DTypeNames, RoundTrips) {
  const char* names[] = {"f32", "f16", "bf16", "f8e4m3", "f8e5m2", "i32", "i64", "u8"};
  const char* st_names[] = {"F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "I32", "I64", "U8"};
  const size_t sizes[] = {4, 2, 2, 1, 1, 4, 8, 1};
  const bool floating[] = {true, true, true, true, true, false, false, false};
  ASSERT_EQ(std::size(kAllDTypes), 8u);
  for (size_t i = 0; i < std::size(kAllDTypes); ++i) {
    const DType d = kAllDTypes[i];
    EXPECT_EQ(dtype_name(d), names[i]);
    EXPECT_EQ(safetensors_dtype_name(d), st_names[i]);
    EXPECT_EQ(dtype_size(d), sizes[i]);
    EXPECT_EQ(is_floating(d), floating[i]);
    EXPECT_EQ(parse_dtype(dtype_name(d)), d);
    EXPECT_EQ(parse_dtype(safetensors_dtype_name(d)), d);
  }
}

TEST(DTypeNames, UnknownNameThrows) {
  for (const std::string bad : {"float32", "Bf16", "bf16 ", "F8_E4M3FN", "", "fp8"}) {
    try {
      parse_dtype(bad);
      ADD_FAILURE() << "no throw for '" << bad << "'";
    } catch (const Error& e) {
      EXPECT_EQ(e.op(), "dtype");
      EXPECT_EQ(e.argument(), "name");
      EXPECT_EQ(e.value(), bad);
      EXPECT_NE(std::string(e.what()).find("name=" + bad), std::string::npos) << e.what();
    }
  }
}

TEST(DTypeBuffers, LoadStoreAllFloatingDTypes) {
  const float values[] = {0.0f, -0.0f, 1.0f, -2.5f, 0.1f, 300.0f, 1e6f, -kInf};
  for (const DType d : kAllDTypes) {
    if (!is_floating(d)) continue;
    SCOPED_TRACE(dtype_name(d));
    // One spare byte so that the elements start at an odd address.
    std::vector<unsigned char> buf(dtype_size(d) * std::size(values) + 1);
    void* data = buf.data() + 1;
    for (size_t i = 0; i < std::size(values); ++i) {
      store_from_f32(data, d, static_cast<int64_t>(i), values[i]);
    }
    for (size_t i = 0; i < std::size(values); ++i) {
      const float v = values[i];
      float expected = v;
      switch (d) {
        case DType::f16:
          expected = f16_to_f32(f32_to_f16(v));
          break;
        case DType::bf16:
          expected = bf16_to_f32(f32_to_bf16(v));
          break;
        case DType::f8e4m3:
          expected = f8e4m3_to_f32(f32_to_f8e4m3(v));
          break;
        case DType::f8e5m2:
          expected = f8e5m2_to_f32(f32_to_f8e5m2(v));
          break;
        default:
          break;
      }
      const float got = load_as_f32(data, d, static_cast<int64_t>(i));
      EXPECT_EQ(f32_bits(got), f32_bits(expected)) << v;
    }
  }
}

TEST(DTypeBuffers, NonFloatingThrows) {
  int64_t buf[2] = {0, 0};
  for (const DType d : {DType::i32, DType::i64, DType::u8}) {
    EXPECT_THROW(load_as_f32(buf, d, 0), Error);
    EXPECT_THROW(store_from_f32(buf, d, 0, 1.0f), Error);
  }
}

}  // namespace
}  // namespace moekit
