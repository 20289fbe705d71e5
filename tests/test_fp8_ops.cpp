// FP8 ops (spec/fp8.md): hand-computed cases for the formulas, then every implementation of every
// dispatch table that serves on this machine against the reference, on random and adversarial
// inputs (seed printed; MOEKIT_TEST_SEED repeats a run).
#include <gtest/gtest.h>
#include <xmmintrin.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "cpu/fp8_cpu.h"
#include "moekit/ops/fp8.h"
#include "ops/fp8_problem.h"
#include "reference/fp8_reference.h"

namespace moekit {
namespace {

// Debug and sanitizer builds run a smaller set of shapes (the reference is scalar).
#if !defined(NDEBUG) || defined(__SANITIZE_ADDRESS__)
constexpr bool kQuickBuild = true;
#else
constexpr bool kQuickBuild = false;
#endif

uint64_t test_seed() {
  static const uint64_t seed = [] {
    const char* env = std::getenv("MOEKIT_TEST_SEED");
    const uint64_t s = env ? std::strtoull(env, nullptr, 10) : std::random_device{}();
    std::printf("fp8 ops seed: %llu (set MOEKIT_TEST_SEED to repeat)\n",
                static_cast<unsigned long long>(s));
    return s;
  }();
  return seed;
}

std::mt19937_64 rng_for(const std::string& test) {
  return std::mt19937_64(test_seed() ^ std::hash<std::string>{}(test));
}

constexpr uint8_t kSentinelByte = 0xA5;  // fills outputs before a call: what stays was not written

Tensor filled(DType dtype, std::initializer_list<int64_t> shape) {
  Tensor t = Tensor::empty(dtype, shape);
  std::memset(t.data(), kSentinelByte, t.nbytes());
  return t;
}

float uniform(std::mt19937_64& rng, float lo, float hi) {
  return std::uniform_real_distribution<float>(lo, hi)(rng);
}
int pick(std::mt19937_64& rng, int n) { return static_cast<int>(rng() % static_cast<uint64_t>(n)); }

Tensor random_e4m3(std::mt19937_64& rng, int64_t rows, int64_t cols) {
  Tensor t = Tensor::empty(DType::f8e4m3, {rows, cols});
  for (int64_t i = 0; i < t.numel(); ++i)
    t.data_as<uint8_t>()[i] = f32_to_f8e4m3(uniform(rng, -448.0f, 448.0f));
  return t;
}

float value_at(const TensorView& t, int64_t i) { return load_as_f32(t.data(), t.dtype(), i); }

// Implementations of a table, other than the reference, that serve p on this machine.
template <class Problem>
std::vector<const Fp8Implementation<Problem>*> fast_implementations(
    std::span<const Fp8Implementation<Problem>> table, const Problem& p) {
  std::vector<const Fp8Implementation<Problem>*> out;
  for (const auto& impl : table) {
    if (impl.backend == Backend::reference) continue;
    const std::string why_not = impl.supports(p);
    if (why_not.empty()) {
      out.push_back(&impl);
    } else {
      static std::vector<std::string> said;
      const std::string line = std::string(impl.name) + " skipped: " + why_not;
      if (std::find(said.begin(), said.end(), line) == said.end()) {
        said.push_back(line);
        std::printf("%s\n", line.c_str());
      }
    }
  }
  return out;
}

constexpr ScaleLayout kLayouts[] = {ScaleLayout::row_major, ScaleLayout::column_major,
                                    ScaleLayout::column_major_tma, ScaleLayout::packed_ue8m0};

// ---------------------------------------------------------------------------------------------
// Hand-computed cases.

struct GroupQuantRun {
  Tensor x, q, scales;
};

// Quantizes rows of f32 values with the public op (default backend) into sentinel-filled outputs.
GroupQuantRun quantize(const std::vector<std::vector<float>>& rows, const GroupQuantConfig& c,
                       const OpOptions& options = {}) {
  const auto M = static_cast<int64_t>(rows.size());
  const auto K = static_cast<int64_t>(rows[0].size());
  GroupQuantRun r;
  r.x = Tensor::empty(DType::f32, {M, K});
  for (int64_t m = 0; m < M; ++m)
    std::memcpy(r.x.data_as<float>() + m * K, rows[static_cast<size_t>(m)].data(), K * 4);
  r.q = filled(DType::f8e4m3, {M, K});
  const ScaleStorage s = group_quant_scale_storage(M, K, c);
  r.scales = filled(s.dtype, {s.shape[0], s.shape[1]});
  per_token_group_quant_fp8(r.x, r.q, r.scales, c, options);
  return r;
}

TEST(Fp8Formula, AllZeroGroupUsesTheEpsFloor) {
  GroupQuantConfig c;
  c.group_size = 16;
  for (Backend backend : {Backend::reference, Backend::cpu}) {
    const GroupQuantRun r = quantize({std::vector<float>(32, 0.0f)}, c, {backend});
    EXPECT_EQ(r.scales.data_as<float>()[0], 1e-10f / 448.0f);
    EXPECT_EQ(r.scales.data_as<float>()[1], 1e-10f / 448.0f);
    for (int i = 0; i < 32; ++i) EXPECT_EQ(r.q.data_as<uint8_t>()[i], 0);
  }
}

TEST(Fp8Formula, ScaleIsAmaxOver448AndValuesDivideByIt) {
  GroupQuantConfig c;
  c.group_size = 16;
  std::vector<float> row(16, 0.0f);
  row[3] = -7.0f;  // amax 7: scale 7/448 = 1/64 exactly, so q = x * 64
  row[5] = 1.0f / 64;
  row[9] = 0.1f;  // 6.4 -> e4m3 6.5 (0x4d)
  for (Backend backend : {Backend::reference, Backend::cpu}) {
    const GroupQuantRun r = quantize({row}, c, {backend});
    EXPECT_EQ(r.scales.data_as<float>()[0], 1.0f / 64);
    const uint8_t* q = r.q.data_as<uint8_t>();
    EXPECT_EQ(q[3], 0xfe);  // -448
    EXPECT_EQ(q[5], 0x38);  // 1.0
    EXPECT_EQ(q[9], 0x4d);  // 6.5
    EXPECT_EQ(f8e4m3_to_f32(q[9]), 6.5f);
  }
}

TEST(Fp8Formula, Ue8m0RoundsScalesUpToPowersOfTwo) {
  GroupQuantConfig c;
  c.group_size = 16;
  c.ue8m0 = true;
  std::vector<float> row(64, 0.0f);
  row[0] = 448.0f;   // scale 1: a power of two stays
  row[16] = 449.0f;  // 449/448 -> 2
  row[32] = 100.0f;  // 0.2232 -> 0.25
  row[48] = 1.0f;    // 1/448 -> 2^-8
  row[49] = 0.99f;   // 0.99 / 2^-8 = 253.44 -> 256
  for (Backend backend : {Backend::reference, Backend::cpu}) {
    const GroupQuantRun r = quantize({row}, c, {backend});
    const float* s = r.scales.data_as<float>();
    EXPECT_EQ(s[0], 1.0f);
    EXPECT_EQ(s[1], 2.0f);
    EXPECT_EQ(s[2], 0.25f);
    EXPECT_EQ(s[3], 1.0f / 256);
    const uint8_t* q = r.q.data_as<uint8_t>();
    EXPECT_EQ(f8e4m3_to_f32(q[0]), 448.0f);
    EXPECT_EQ(f8e4m3_to_f32(q[16]), 224.0f);  // 224.5 -> 224
    EXPECT_EQ(f8e4m3_to_f32(q[32]), 384.0f);  // 400: a tie between 384 and 416, to even
    EXPECT_EQ(f8e4m3_to_f32(q[48]), 256.0f);
    EXPECT_EQ(f8e4m3_to_f32(q[49]), 256.0f);
  }
  EXPECT_EQ(reference::ue8m0_round_up(0.75f), 1.0f);
  EXPECT_EQ(reference::ue8m0_round_up(std::ldexp(1.0f, -140)), std::ldexp(1.0f, -140));
  EXPECT_EQ(reference::ue8m0_round_up(std::ldexp(3.0f, -140)), std::ldexp(1.0f, -138));
  EXPECT_EQ(reference::ue8m0_round_up(std::ldexp(1.5f, -127)), std::ldexp(1.0f, -126));
}

TEST(Fp8Formula, SaturatesAt448AndKeepsNaN) {
  // The group formula keeps |x / scale| <= 448 (up to rounding), so the encoders are driven
  // directly: everything past 448 saturates, NaN stays NaN, and ties round to even.
  const std::vector<float> x = {448.0f,
                                463.9f,
                                464.0f,
                                1e30f,
                                std::numeric_limits<float>::infinity(),
                                -500.0f,
                                std::nanf(""),
                                -std::nanf(""),
                                0.0f,
                                -0.0f,
                                17.0f,
                                19.0f,
                                std::ldexp(1.0f, -10),
                                std::ldexp(3.0f, -10),
                                std::ldexp(1.0f, -20)};
  const std::vector<uint8_t> expected = {0x7e, 0x7e, 0x7e, 0x7e, 0x7e, 0xfe, 0x7f, 0xff,
                                         0x00, 0x80, 0x58, 0x5a, 0x00, 0x02, 0x00};
  for (cpu::Fp8Isa isa : {cpu::Fp8Isa::portable, cpu::Fp8Isa::avx2, cpu::Fp8Isa::avx512}) {
    if (isa == cpu::Fp8Isa::avx2 && !cpu_features().avx2) continue;
    if (isa == cpu::Fp8Isa::avx512 && !cpu_features().avx512) continue;
    std::vector<uint8_t> q(x.size());
    cpu::divide_to_e4m3(isa, x.data(), static_cast<int64_t>(x.size()), 1.0f, q.data());
    for (size_t i = 0; i < x.size(); ++i) {
      EXPECT_EQ(q[i], expected[i]) << "isa " << static_cast<int>(isa) << " x=" << x[i];
      EXPECT_EQ(q[i], f32_to_f8e4m3(x[i])) << x[i];
    }
  }
}

TEST(Fp8Formula, EncodersMatchTheScalarConversionOnEveryBinade) {
  // Every exponent with the mantissas that decide rounding (ties and their neighbours) plus a
  // random mantissa, both signs: the vector encoders must equal f32_to_f8e4m3 bit for bit.
  std::mt19937_64 rng = rng_for("encoders");
  std::vector<float> x;
  for (uint32_t sign = 0; sign < 2; ++sign) {
    for (uint32_t exponent = 0; exponent < 256; ++exponent) {
      for (uint32_t top = 0; top < 16; ++top) {  // the 3 kept mantissa bits and the round bit
        const uint32_t base = sign << 31 | exponent << 23 | top << 19;
        for (uint32_t low : {0u, 1u, 0x7ffffu, 0x40000u, static_cast<uint32_t>(rng() & 0x7ffff)})
          x.push_back(std::bit_cast<float>(base | low));
      }
      // Subnormal e4m3 ties sit at other bit positions: sweep the mantissa's top 12 bits.
      if (exponent >= 110 && exponent <= 121)
        for (uint32_t m = 0; m < 4096; ++m)
          x.push_back(std::bit_cast<float>(sign << 31 | exponent << 23 | m << 11));
    }
  }
  for (int i = 0; i < 100000; ++i) x.push_back(std::bit_cast<float>(static_cast<uint32_t>(rng())));
  for (cpu::Fp8Isa isa : {cpu::Fp8Isa::portable, cpu::Fp8Isa::avx2, cpu::Fp8Isa::avx512}) {
    if (isa == cpu::Fp8Isa::avx2 && !cpu_features().avx2) continue;
    if (isa == cpu::Fp8Isa::avx512 && !cpu_features().avx512) continue;
    std::vector<uint8_t> q(x.size());
    cpu::divide_to_e4m3(isa, x.data(), static_cast<int64_t>(x.size()), 1.0f, q.data());
    int64_t mismatches = 0;
    for (size_t i = 0; i < x.size(); ++i) {
      if (q[i] != f32_to_f8e4m3(x[i]) && ++mismatches < 5)
        ADD_FAILURE() << "isa " << static_cast<int>(isa) << ": bits 0x" << std::hex
                      << std::bit_cast<uint32_t>(x[i]) << " -> 0x" << int{q[i]} << ", expected 0x"
                      << int{f32_to_f8e4m3(x[i])};
    }
    EXPECT_EQ(mismatches, 0);
  }
}

TEST(Fp8Formula, PackedUe8m0WordsAreLittleEndianGroupBytes) {
  // 5 groups of 16 with amax 448 * 2^j: scales 2^j, exponent bytes 127 + j. Word 0 holds groups
  // 0-3 (byte j = group j), word 1 group 4 and three zero bytes. Padding rows stay untouched.
  GroupQuantConfig c;
  c.group_size = 16;
  c.ue8m0 = true;
  c.layout = ScaleLayout::packed_ue8m0;
  std::vector<float> row(80, 0.0f);
  for (int j = 0; j < 5; ++j) row[static_cast<size_t>(16 * j + 1)] = std::ldexp(448.0f, j);
  for (Backend backend : {Backend::reference, Backend::cpu}) {
    const GroupQuantRun r = quantize({row}, c, {backend});
    ASSERT_EQ(r.scales.size(0), 2);
    ASSERT_EQ(r.scales.size(1), 4);
    const uint32_t* words = r.scales.data_as<uint32_t>();
    EXPECT_EQ(words[0], 0x8281807fu);  // at [0, 0]
    EXPECT_EQ(words[4], 0x00000083u);  // at [1, 0]
    const uint8_t* bytes = r.scales.data_as<uint8_t>();
    EXPECT_EQ(bytes[0], 0x7f);  // group 0 in the first byte in memory
    for (int pad_row = 1; pad_row < 4; ++pad_row) {
      EXPECT_EQ(words[pad_row], 0xa5a5a5a5u);
      EXPECT_EQ(words[4 + pad_row], 0xa5a5a5a5u);
    }
  }
}

TEST(Fp8Formula, ColumnMajorLayoutsPlaceGroupsAndLeaveTmaPaddingUntouched) {
  GroupQuantConfig c;
  c.group_size = 16;
  std::vector<std::vector<float>> rows(3, std::vector<float>(32, 0.0f));
  for (int m = 0; m < 3; ++m)
    for (int g = 0; g < 2; ++g) rows[m][static_cast<size_t>(16 * g)] = 448.0f * (1 + m + 10 * g);
  for (ScaleLayout layout : {ScaleLayout::column_major, ScaleLayout::column_major_tma}) {
    c.layout = layout;
    for (Backend backend : {Backend::reference, Backend::cpu}) {
      const GroupQuantRun r = quantize(rows, c, {backend});
      const int64_t stride = layout == ScaleLayout::column_major ? 3 : 4;
      ASSERT_EQ(r.scales.size(1), stride);
      const float* s = r.scales.data_as<float>();
      for (int m = 0; m < 3; ++m)
        for (int g = 0; g < 2; ++g)
          EXPECT_EQ(s[g * stride + m], static_cast<float>(1 + m + 10 * g))
              << scale_layout_name(layout);
      if (layout == ScaleLayout::column_major_tma) {
        EXPECT_EQ(std::bit_cast<uint32_t>(s[3]), 0xa5a5a5a5u);
        EXPECT_EQ(std::bit_cast<uint32_t>(s[7]), 0xa5a5a5a5u);
      }
    }
  }
}

TEST(Fp8Formula, GemmScalesEachBlockSumAndAddsBias) {
  // K = 200: block 0 (128 elements) and a partial block 1 (72). A = 1, B = 2 everywhere.
  // out = 128*2*As0*Bs0 + 72*2*As1*Bs1 + bias.
  const int64_t M = 2, N = 3, K = 200;
  Tensor a = Tensor::empty(DType::f8e4m3, {M, K});
  Tensor b = Tensor::empty(DType::f8e4m3, {N, K});
  std::memset(a.data(), 0x38, a.nbytes());  // 1.0
  std::memset(b.data(), 0x40, b.nbytes());  // 2.0
  Tensor as = Tensor::empty(DType::f32, {M, 2});
  const float as_values[] = {0.5f, 0.25f, 1.0f, 2.0f};
  std::memcpy(as.data(), as_values, sizeof as_values);
  Tensor bs = Tensor::empty(DType::f32, {1, 2});
  bs.data_as<float>()[0] = 0.125f;
  bs.data_as<float>()[1] = 4.0f;
  Tensor bias = Tensor::empty(DType::f32, {N});
  for (int n = 0; n < N; ++n) bias.data_as<float>()[n] = static_cast<float>(n);
  for (Backend backend : {Backend::reference, Backend::cpu}) {
    Tensor out = filled(DType::f32, {M, N});
    block_fp8_gemm(a, as, ScaleLayout::row_major, b, bs, bias.view(), out, {backend});
    for (int m = 0; m < M; ++m)
      for (int n = 0; n < N; ++n)
        EXPECT_EQ(out.data_as<float>()[m * N + n],
                  256.0f * as_values[2 * m] * 0.125f + 144.0f * as_values[2 * m + 1] * 4.0f + n);
  }
}

// Every e4m3 byte through both GEMM paths (streaming M <= 16, packed M > 16), as A and B: with
// the other operand selecting one element, out is the byte's exact value, NaN for 0x7f and 0xff.
// As A, a row holding the NaN bytes makes its whole output row NaN (NaN x 0 is NaN), so row 0
// holds them as zeros and only the other rows keep them.
TEST(Fp8Formula, GemmDecodesEveryByteExactly) {
  for (int64_t M : {1, 3, 6, 20}) {
    for (bool bytes_in_a : {true, false}) {
      const int64_t K = 256, N = 256;
      Tensor a = Tensor::empty(DType::f8e4m3, {M, K});
      Tensor b = Tensor::empty(DType::f8e4m3, {N, K});
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t k = 0; k < K; ++k) {
          const auto byte = static_cast<uint8_t>(k);
          const bool drop_nan = m == 0 && (byte & 0x7f) == 0x7f;
          a.data_as<uint8_t>()[m * K + k] =
              bytes_in_a ? (drop_nan ? 0 : byte) : (k == 0 ? 0x38 : 0);
        }
      }
      for (int64_t n = 0; n < N; ++n)
        for (int64_t k = 0; k < K; ++k)
          b.data_as<uint8_t>()[n * K + k] =
              bytes_in_a ? (k == n ? 0x38 : 0) : (k == 0 ? static_cast<uint8_t>(n) : 0);
      Tensor as = Tensor::empty(DType::f32, {M, 2});
      for (int64_t i = 0; i < 2 * M; ++i) as.data_as<float>()[i] = 1.0f;
      Tensor bs = Tensor::empty(DType::bf16, {2, 2});
      for (int64_t i = 0; i < 4; ++i) bs.data_as<uint16_t>()[i] = f32_to_bf16(1.0f);
      Tensor out = filled(DType::f32, {M, N});
      const BlockGemmProblem problem = make_block_gemm_problem(
          "test", a, as, ScaleLayout::row_major, b, bs, std::nullopt, out, {});
      for (const auto* impl : fast_implementations(block_gemm_implementations(), problem)) {
        std::memset(out.data(), kSentinelByte, out.nbytes());
        impl->run(problem);
        for (int64_t m = 0; m < M; ++m) {
          for (int64_t n = 0; n < N; ++n) {
            const auto byte = static_cast<uint8_t>(n);
            float expected = f8e4m3_to_f32(byte);
            if (bytes_in_a && m == 0 && std::isnan(expected)) expected = 0.0f;
            if (bytes_in_a && m > 0) expected = std::nanf("");
            const float got = out.data_as<float>()[m * N + n];
            if (std::isnan(expected)) {
              EXPECT_TRUE(std::isnan(got)) << impl->name << " byte " << n << " M=" << M;
            } else {
              EXPECT_EQ(got, expected)
                  << impl->name << " byte " << n << " M=" << M << (bytes_in_a ? " in A" : " in B");
            }
          }
        }
      }
    }
  }
}

// The streaming GEMM (M <= 16) decodes weights through f32 subnormals (value x 2^-120): every
// weight byte, through every row count's kernel, must come out exact, also when the caller's
// MXCSR flushes denormals (DAZ | FTZ, as torch.set_flush_denormal sets), and the caller's MXCSR
// must be left as it was. Activation row m holds (1 + (m % 3) / 8) x 2^(m % 4) everywhere, so
// out[m, n] = value(byte n) x that, exactly; one thread, so the kernel runs on this thread.
TEST(Fp8Formula, StreamingGemmDecodesEveryWeightByteWithDenormalsFlushed) {
  const int64_t N = 256, K = 256 + 40;  // a partial last block too
  Tensor b = Tensor::empty(DType::f8e4m3, {N, K});
  std::memset(b.data(), 0, b.nbytes());
  for (int64_t n = 0; n < N; ++n)
    b.data_as<uint8_t>()[n * K + (n * 37) % K] = static_cast<uint8_t>(n);  // byte n, any column
  Tensor bs = Tensor::empty(DType::f32, {2, 3});
  for (int64_t i = 0; i < bs.numel(); ++i) bs.data_as<float>()[i] = 1.0f;
  for (int64_t M = 1; M <= 16; ++M) {
    Tensor a = Tensor::empty(DType::f8e4m3, {M, K});
    std::vector<float> row_value(static_cast<size_t>(M));
    for (int64_t m = 0; m < M; ++m) {
      row_value[m] = std::ldexp(1.0f + 0.125f * static_cast<float>(m % 3), static_cast<int>(m % 4));
      for (int64_t k = 0; k < K; ++k) a.data_as<uint8_t>()[m * K + k] = f32_to_f8e4m3(row_value[m]);
      ASSERT_EQ(f8e4m3_to_f32(f32_to_f8e4m3(row_value[m])), row_value[m]);
    }
    Tensor as = Tensor::empty(DType::f32, {M, 3});
    for (int64_t i = 0; i < as.numel(); ++i) as.data_as<float>()[i] = 1.0f;
    Tensor out = filled(DType::f32, {M, N});
    OpOptions options;
    options.num_threads = 1;
    const BlockGemmProblem problem = make_block_gemm_problem("test", a, as, ScaleLayout::row_major,
                                                             b, bs, std::nullopt, out, options);
    for (const auto* impl : fast_implementations(block_gemm_implementations(), problem)) {
      std::memset(out.data(), kSentinelByte, out.nbytes());
      const unsigned saved = _mm_getcsr();
      const unsigned flushing = saved | 0x8040u;  // FTZ | DAZ
      _mm_setcsr(flushing);
      impl->run(problem);
      const unsigned after = _mm_getcsr();
      _mm_setcsr(saved);
      EXPECT_EQ(after, flushing) << impl->name << " changed the caller's MXCSR";
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t n = 0; n < N; ++n) {
          const float value = f8e4m3_to_f32(static_cast<uint8_t>(n));
          const float got = out.data_as<float>()[m * N + n];
          if (std::isnan(value)) {
            EXPECT_TRUE(std::isnan(got)) << impl->name << " byte " << n << " M=" << M;
          } else {
            EXPECT_EQ(got, value * row_value[m]) << impl->name << " byte " << n << " M=" << M;
          }
        }
      }
    }
  }
}

TEST(Fp8Formula, BlockQuantizeWeightUsesTheBlockAmaxWithItsFloor) {
  Tensor w = Tensor::empty(DType::f32, {130, 130});
  std::memset(w.data(), 0, w.nbytes());
  w.data_as<float>()[0] = 896.0f;             // block (0, 0): amax 896 -> scale 2
  w.data_as<float>()[5 * 130 + 129] = -3.0f;  // block (0, 1): amax 3 -> scale 3/448
  // block (1, 0) all zero: scale 1e-4/448; block (1, 1): 1e-5 < the floor.
  w.data_as<float>()[129 * 130 + 129] = 1e-5f;
  for (Backend backend : {Backend::reference, Backend::cpu}) {
    Tensor q = filled(DType::f8e4m3, {130, 130});
    Tensor s = filled(DType::f32, {2, 2});
    block_quantize_weight(w, q, s, {backend});
    const float* scale = s.data_as<float>();
    EXPECT_EQ(scale[0], 2.0f);
    EXPECT_EQ(scale[1], 3.0f / 448.0f);
    EXPECT_EQ(scale[2], 1e-4f / 448.0f);
    EXPECT_EQ(scale[3], 1e-4f / 448.0f);
    EXPECT_EQ(q.data_as<uint8_t>()[0], 0x7e);
    EXPECT_EQ(q.data_as<uint8_t>()[5 * 130 + 129], 0xfe);
    EXPECT_EQ(q.data_as<uint8_t>()[129 * 130 + 129], f32_to_f8e4m3(1e-5f / (1e-4f / 448.0f)));
  }
}

// ---------------------------------------------------------------------------------------------
// Group quantization: every implementation against the reference, bytes and scales exact.

// x for one row: groups of mixed magnitudes, some all zero, rare inf / NaN (adversarial rows).
void fill_row(std::mt19937_64& rng, float* row, int64_t K, int group, bool adversarial) {
  for (int64_t g0 = 0; g0 < K; g0 += group) {
    const int kind = pick(rng, 16);
    const float magnitude = std::ldexp(1.0f, pick(rng, 40) - 20);
    for (int64_t k = g0; k < std::min<int64_t>(g0 + group, K); ++k)
      row[k] = kind == 0 ? 0.0f : uniform(rng, -1.0f, 1.0f) * magnitude;
    if (adversarial && kind == 1) row[g0] = std::numeric_limits<float>::infinity();
    if (adversarial && kind == 2) row[g0 + group / 2] = std::nanf("");
    if (adversarial && kind == 3) row[g0] = -std::nanf("");
  }
}

struct QuantDiff {
  int64_t near_ties = 0;
  int64_t other = 0;
};

// q bytes of an implementation vs the reference: a difference is tolerated only where x / scale
// lies within one f32 ulp of the midpoint between the two e4m3 values (a rounding near-tie).
QuantDiff compare_quantized(const TensorView& x, const TensorView& q_ref, const TensorView& q,
                            const GroupQuantProblem& p, const TensorView& ref_scales) {
  QuantDiff d;
  for (int64_t m = 0; m < p.rows; ++m) {
    for (int64_t k = 0; k < p.cols; ++k) {
      const uint8_t r = q_ref.data_as<uint8_t>()[m * q_ref.stride(0) + k];
      const uint8_t v = q.data_as<uint8_t>()[m * q.stride(0) + k];
      if (r == v) continue;
      const float scale = read_scale(ref_scales.data(), p.scale_at, m, k / p.group_size);
      const float ratio = value_at(x, m * x.stride(0) + k) / scale;
      const float mid = 0.5f * (f8e4m3_to_f32(r) + f8e4m3_to_f32(v));
      const float ulp = std::nextafter(std::fabs(ratio), INFINITY) - std::fabs(ratio);
      if (std::fabs(ratio - mid) <= ulp)
        ++d.near_ties;
      else
        ++d.other;
    }
  }
  return d;
}

void check_group_quant(std::mt19937_64& rng, int64_t M, int64_t K, int group, DType dtype,
                       ScaleLayout layout, bool ue8m0, bool adversarial, int threads) {
  SCOPED_TRACE("M=" + std::to_string(M) + " K=" + std::to_string(K) +
               " group=" + std::to_string(group) + " " + std::string(dtype_name(dtype)) + " " +
               scale_layout_name(layout) + (ue8m0 ? " ue8m0" : "") +
               (adversarial ? " adversarial" : "") + " threads=" + std::to_string(threads));
  std::vector<float> values(static_cast<size_t>(M * K));
  for (int64_t m = 0; m < M; ++m) fill_row(rng, values.data() + m * K, K, group, adversarial);
  // Rows of x strided by K + 8 (rows contiguous, not the whole tensor).
  Tensor storage = Tensor::empty(dtype, {M, K + 8});
  const int64_t shape[] = {M, K}, strides[] = {K + 8, 1};
  const TensorView x(storage.data(), dtype, shape, strides);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k)
      store_from_f32(x.data(), dtype, m * (K + 8) + k, values[static_cast<size_t>(m * K + k)]);

  GroupQuantConfig c;
  c.group_size = group;
  c.layout = layout;
  c.ue8m0 = ue8m0;
  const ScaleStorage s = group_quant_scale_storage(M, K, c);
  Tensor q_ref = filled(DType::f8e4m3, {M, K});
  Tensor s_ref = filled(s.dtype, {s.shape[0], s.shape[1]});
  const OpOptions options{std::nullopt, threads};
  const GroupQuantProblem p_ref = make_group_quant_problem("test", x, q_ref, s_ref, c, options);
  reference::per_token_group_quant_fp8(p_ref);

  Tensor q = filled(DType::f8e4m3, {M, K});
  Tensor scales = filled(s.dtype, {s.shape[0], s.shape[1]});
  const GroupQuantProblem p = make_group_quant_problem("test", x, q, scales, c, options);
  for (const auto* impl : fast_implementations(group_quant_implementations(), p)) {
    std::memset(q.data(), kSentinelByte, q.nbytes());
    std::memset(scales.data(), kSentinelByte, scales.nbytes());
    impl->run(p);
    const QuantDiff d = compare_quantized(x, q_ref, q, p, s_ref);
    EXPECT_EQ(d.other, 0) << impl->name << ": q bytes differ beyond rounding near-ties";
    if (d.near_ties > 0)
      std::printf("%s: %lld near-tie q differences\n", impl->name,
                  static_cast<long long>(d.near_ties));
    // Scales (and the padding left untouched) bit for bit.
    EXPECT_EQ(std::memcmp(scales.data(), s_ref.data(), scales.nbytes()), 0)
        << impl->name << ": scales differ";
  }
}

TEST(Fp8GroupQuant, EveryLayoutGroupSizeAndDtypeMatchesTheReference) {
  std::mt19937_64 rng = rng_for("group quant");
  const int64_t rows[] = {1, 7, 83, 5};
  const int groups[] = {16, 32, 48, 64, 128, 256};
  const DType dtypes[] = {DType::f32, DType::f16, DType::bf16};
  int cases = 0;
  for (ScaleLayout layout : kLayouts) {
    for (int group : groups) {
      for (DType dtype : dtypes) {
        const int64_t M = rows[pick(rng, 4)];
        const int64_t K = group * (1 + pick(rng, kQuickBuild ? 5 : 12));  // up to 12 groups
        const bool ue8m0 = layout == ScaleLayout::packed_ue8m0 || pick(rng, 2) == 0;
        check_group_quant(rng, M, K, group, dtype, layout, ue8m0, pick(rng, 3) == 0, pick(rng, 3));
        ++cases;
      }
    }
  }
  // Every M with the default configuration, and the shapes of SGLang's tests (row-major, 128).
  for (int64_t M : rows)
    check_group_quant(rng, M, 512, 128, DType::bf16, ScaleLayout::row_major, false, false, 0);
  if (!kQuickBuild)
    for (int64_t K : {4096, 7168})
      check_group_quant(rng, 83, K, 128, DType::bf16, ScaleLayout::column_major_tma, false, true,
                        0);
  EXPECT_GT(cases, 0);
}

// ---------------------------------------------------------------------------------------------
// GEMM: every implementation against the reference.

struct GemmCase {
  int64_t m, n, k;
  DType out = DType::f32;
  bool bias = false;
  DType bias_dtype = DType::f32;
  ScaleLayout layout = ScaleLayout::row_major;
  DType b_scale_dtype = DType::f32;
  int threads = 0;
  bool strided_out = false;
  int nan_bytes = 0;  // NaN bytes (0x7f, 0xff) written at random places of A and of B each
};

std::string describe(const GemmCase& c) {
  return "M=" + std::to_string(c.m) + " N=" + std::to_string(c.n) + " K=" + std::to_string(c.k) +
         " out=" + std::string(dtype_name(c.out)) +
         (c.bias ? " bias=" + std::string(dtype_name(c.bias_dtype)) : "") +
         " a_scales=" + scale_layout_name(c.layout) +
         " b_scales=" + std::string(dtype_name(c.b_scale_dtype)) +
         " threads=" + std::to_string(c.threads) + (c.strided_out ? " strided out" : "") +
         (c.nan_bytes ? " nan_bytes=" + std::to_string(c.nan_bytes) : "");
}

// The tolerance of spec/fp8.md: 1e-3 relative mean error, plus the rounding of half outputs.
double gemm_tolerance(DType out) {
  return 1e-3 + (out == DType::bf16 ? 1.0 / 256 : out == DType::f16 ? 1.0 / 2048 : 0.0);
}

// The scale storage of a logical [M, G] scale matrix in `layout` (packed: exponent bytes).
Tensor scale_tensor(const std::vector<float>& logical, int64_t M, int64_t K, ScaleLayout layout) {
  GroupQuantConfig c;
  c.layout = layout;
  const ScaleStorage s = group_quant_scale_storage(M, K, c);
  Tensor t = filled(s.dtype, {s.shape[0], s.shape[1]});
  const int64_t G = fp8::ceil_div(K, 128);
  const ScaleAddressing at = scale_addressing(layout, M, G);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < G; ++g) {
      const float v = logical[static_cast<size_t>(m * G + g)];
      if (layout == ScaleLayout::packed_ue8m0) {
        // Bytes of missing groups are 0, as the quantizer writes them.
        if (g % 4 == 0) t.data_as<uint32_t>()[at.offset(m, g)] = 0;
        t.data_as<uint8_t>()[at.offset(m, g) * 4 + g % 4] =
            static_cast<uint8_t>(std::bit_cast<uint32_t>(v) >> 23);
      } else {
        t.data_as<float>()[at.offset(m, g)] = v;
      }
    }
  }
  return t;
}

// Every implementation that serves the case (or only the one named `only`, which must serve it)
// against the reference.
void check_gemm(std::mt19937_64& rng, const GemmCase& c, const std::string& only = "") {
  SCOPED_TRACE(describe(c));
  const int64_t M = c.m, N = c.n, K = c.k, G = fp8::ceil_div(K, 128);
  Tensor a = random_e4m3(rng, M, K);
  Tensor b = random_e4m3(rng, N, K);
  for (Tensor* t : {&a, &b})
    for (int i = 0; i < c.nan_bytes && t->numel() > 0; ++i)
      t->data_as<uint8_t>()[rng() % static_cast<uint64_t>(t->numel())] = pick(rng, 2) ? 0x7f : 0xff;
  std::vector<float> a_scales(static_cast<size_t>(M * G));
  for (float& v : a_scales)
    v = c.layout == ScaleLayout::packed_ue8m0 ? std::ldexp(1.0f, -5 - pick(rng, 8))
                                              : uniform(rng, 0.0f, 0.01f);
  Tensor as = scale_tensor(a_scales, M, K, c.layout);
  Tensor bs = Tensor::empty(c.b_scale_dtype, {fp8::ceil_div(N, 128), G});
  for (int64_t i = 0; i < bs.numel(); ++i)
    store_from_f32(bs.data(), bs.dtype(), i, uniform(rng, 0.0f, 0.01f));
  Tensor bias = Tensor::empty(c.bias_dtype, {N});
  for (int64_t i = 0; i < N; ++i)
    store_from_f32(bias.data(), bias.dtype(), i, uniform(rng, -50, 50));
  const std::optional<TensorView> bias_view =
      c.bias ? std::optional<TensorView>(bias.view()) : std::nullopt;

  const int64_t out_stride = c.strided_out ? N + 5 : N;
  Tensor ref_storage = filled(c.out, {M, out_stride});
  Tensor out_storage = filled(c.out, {M, out_stride});
  const int64_t shape[] = {M, N}, strides[] = {out_stride, 1};
  const TensorView ref(ref_storage.data(), c.out, shape, strides);
  const TensorView out(out_storage.data(), c.out, shape, strides);
  const OpOptions options{std::nullopt, c.threads};
  reference::block_fp8_gemm(
      make_block_gemm_problem("test", a, as, c.layout, b, bs, bias_view, ref, options));
  const BlockGemmProblem p =
      make_block_gemm_problem("test", a, as, c.layout, b, bs, bias_view, out, options);
  auto implementations = fast_implementations(block_gemm_implementations(), p);
  if (!only.empty()) {
    std::erase_if(implementations, [&](const auto* impl) { return impl->name != only; });
    ASSERT_EQ(implementations.size(), 1u) << only << " does not serve the case";
  }
  for (const auto* impl : implementations) {
    std::memset(out_storage.data(), kSentinelByte, out_storage.nbytes());
    impl->run(p);
    double error = 0.0, magnitude = 0.0;
    int64_t nan_mismatch = 0;
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t n = 0; n < N; ++n) {
        const float r = value_at(ref, m * out_stride + n), v = value_at(out, m * out_stride + n);
        if (std::isnan(r) != std::isnan(v)) ++nan_mismatch;
        if (std::isnan(r) || std::isnan(v)) continue;
        error += std::fabs(static_cast<double>(v) - r);
        magnitude += std::fabs(static_cast<double>(r));
      }
    }
    EXPECT_EQ(nan_mismatch, 0) << impl->name;
    if (M * N > 0 && magnitude > 0) {
      EXPECT_LT(error / magnitude, gemm_tolerance(c.out)) << impl->name;
    }
    if (c.strided_out) {  // the gaps between rows are not written
      const size_t esize = dtype_size(c.out);
      for (int64_t m = 0; m < M; ++m)
        for (size_t byte = N * esize; byte < out_stride * esize; ++byte)
          ASSERT_EQ(static_cast<uint8_t*>(out.data())[m * out_stride * esize + byte],
                    kSentinelByte);
    }
  }
}

TEST(Fp8Gemm, ShapesOutputsBiasAndScaleLayoutsMatchTheReference) {
  std::mt19937_64 rng = rng_for("gemm");
  const DType outs[] = {DType::f32, DType::bf16, DType::f16};
  const DType wides[] = {DType::f32, DType::bf16, DType::f16};
  std::vector<int64_t> ms = {1, 7, 83, 256}, ns = {128, 512, 1088, 200}, ks = {256, 300, 512};
  if (kQuickBuild) {
    ms = {1, 2, 7, 83};
    ns = {128, 200};
    ks = {256, 300};
  }
  int index = 0;
  for (int64_t m : ms) {
    for (int64_t n : ns) {
      for (int64_t k : ks) {
        GemmCase c{m, n, k};
        // Cycle the options so that each value meets many shapes; the rest at random.
        c.out = outs[index % 3];
        c.layout = kLayouts[(index / 3) % 4];
        c.bias = (index / 12) % 2 == 0;
        c.bias_dtype = wides[pick(rng, 3)];
        c.b_scale_dtype = pick(rng, 2) ? DType::f32 : DType::bf16;
        c.threads = pick(rng, 4);
        c.strided_out = pick(rng, 4) == 0;
        check_gemm(rng, c);
        ++index;
      }
    }
  }
}

TEST(Fp8Gemm, EdgeShapes) {
  std::mt19937_64 rng = rng_for("gemm edges");
  // Empty M or N; K = 0 (only the bias); K below one block; N and M just past tile edges; every
  // small M of the streaming path; odd thread counts.
  const GemmCase cases[] = {
      {0, 64, 128},
      {3, 0, 128},
      {4, 64, 0, DType::f32, true},
      {2, 9, 1},
      {5, 65, 17},
      {49, 129, 129, DType::bf16, true},
      {3, 300, 1000},
      {4, 131, 640},
      {8, 200, 5000},
      {16, 130, 300},
      {17, 130, 300},
      {24, 130, 300},  // the last streamed M where the CPU has AVX-512 BF16, then its first packed
      {25, 130, 300},
      {64, 130, 300},  // the last streamed M on AVX-512 and AVX2, then their first f32 packed
      {65, 130, 300},
      {12, 64, 2700, DType::bf16, true},
      {1, 1, 8200, DType::f32, false},
      {97, 70, 200, DType::f16, true, DType::bf16, ScaleLayout::packed_ue8m0, DType::bf16, 3},
  };
  for (const GemmCase& c : cases) check_gemm(rng, c);
}

TEST(Fp8Gemm, PublicOpMatchesTheReference) {
  std::mt19937_64 rng = rng_for("gemm public");
  const int64_t M = 9, N = 136, K = 384;
  Tensor a = random_e4m3(rng, M, K), b = random_e4m3(rng, N, K);
  Tensor as = Tensor::empty(DType::f32, {M, 3}), bs = Tensor::empty(DType::f32, {2, 3});
  for (int64_t i = 0; i < as.numel(); ++i) as.data_as<float>()[i] = uniform(rng, 0, 0.01f);
  for (int64_t i = 0; i < bs.numel(); ++i) bs.data_as<float>()[i] = uniform(rng, 0, 0.01f);
  Tensor ref = filled(DType::f32, {M, N}), out = filled(DType::f32, {M, N});
  block_fp8_gemm(a, as, ScaleLayout::row_major, b, bs, std::nullopt, ref, {Backend::reference});
  block_fp8_gemm(a, as, ScaleLayout::row_major, b, bs, std::nullopt, out);
  double error = 0, magnitude = 0;
  for (int64_t i = 0; i < M * N; ++i) {
    error += std::fabs(out.data_as<float>()[i] - ref.data_as<float>()[i]);
    magnitude += std::fabs(ref.data_as<float>()[i]);
  }
  EXPECT_LT(error / magnitude, 1e-3);
}

// ---------------------------------------------------------------------------------------------
// cpu.avx512bf16 and cpu.amx: the packed GEMM (M > 24, or M > 5 on AMX) on AVX-512 BF16 dot
// products or on AMX tile dot products. Their sums run in other orders than the f32 kernels' (pairs
// of products first, or K order within a tile step), so each is held to the contract's tolerance of
// the reference, plus NaN placement, and to bitwise determinism across runs and thread counts.

class Fp8GemmPacked : public ::testing::TestWithParam<const char*> {
 protected:
  // The entry under test, or "" where this CPU lacks it (the test is then skipped).
  static std::string implementation() {
    const std::string name = GetParam();
    const bool present = name == "cpu.amx" ? cpu_features().amx_bf16 : cpu_features().avx512_bf16;
    if (!present) std::printf("this CPU lacks what %s needs: not tested here\n", name.c_str());
    return present ? name : "";
  }
  // The fewest rows the entry serves (the dispatch's kAmxMinM and kBf16MinM).
  static int64_t least_rows() { return std::string(GetParam()) == "cpu.amx" ? 6 : 25; }
};
// (A named function for the suffixes: a lambda's parameter shadows the macro's own.)
std::string packed_kernel_suffix(const ::testing::TestParamInfo<const char*>& kernel) {
  return std::string(kernel.param) == "cpu.amx" ? "amx" : "avx512bf16";
}
INSTANTIATE_TEST_SUITE_P(Kernels, Fp8GemmPacked, ::testing::Values("cpu.avx512bf16", "cpu.amx"),
                         packed_kernel_suffix);

TEST_P(Fp8GemmPacked, RandomShapesMatchTheReference) {
  const std::string kernel = implementation();
  if (kernel.empty()) GTEST_SKIP() << "CPU lacks " << GetParam();
  std::mt19937_64 rng = rng_for("gemm " + kernel);
  const DType outs[] = {DType::f32, DType::bf16, DType::f16};
  const DType wides[] = {DType::f32, DType::bf16, DType::f16};
  const int cases = kQuickBuild ? 8 : 36;
  for (int index = 0; index < cases; ++index) {
    GemmCase c{least_rows() + pick(rng, 301 - least_rows()), 1 + pick(rng, 700),
               1 + pick(rng, 1100)};
    if (index % 4 == 0) c.k = 128 * (1 + pick(rng, 8));  // whole blocks too
    c.out = outs[index % 3];
    c.layout = kLayouts[(index / 3) % 4];
    c.bias = index % 2 == 0;
    c.bias_dtype = wides[pick(rng, 3)];
    c.b_scale_dtype = pick(rng, 2) ? DType::f32 : DType::bf16;
    c.threads = pick(rng, 4);
    c.strided_out = pick(rng, 4) == 0;
    check_gemm(rng, c, kernel);
  }
  // A DeepSeek-like odd shape: N and K past whole blocks (7748 = 60.5 x 128, 3884 = 30.3 x 128).
  check_gemm(rng, {kQuickBuild ? 25 : 40, 7748, 3884, DType::bf16, true, DType::bf16}, kernel);
  // Three row tiles of 224 rows: the AMX kernel's activations in two panels (two tiles, then one).
  check_gemm(rng, {601, 70, 300, DType::f32}, kernel);
}

// Both kernels multiply exactly and sum in f32, per 128-block, so they may differ from the f32
// kernel only by f32 rounding (a few ulp of the sums): far tighter than the contract's 1e-3, so
// that a lost or doubled product (an odd K's last pair, a partial block, an edge column or row of
// a tile) cannot hide in the tolerance.
TEST_P(Fp8GemmPacked, AgreesWithTheF32KernelToF32Rounding) {
  const std::string kernel = implementation();
  if (kernel.empty()) GTEST_SKIP() << "CPU lacks " << GetParam();
  std::mt19937_64 rng = rng_for("gemm " + kernel + " vs f32");
  for (int index = 0; index < (kQuickBuild ? 4 : 16); ++index) {
    const int64_t M = least_rows() + pick(rng, 301 - least_rows());
    const int64_t N = 1 + pick(rng, 400), K = 1 + pick(rng, 900);
    const int64_t G = fp8::ceil_div(K, 128);
    SCOPED_TRACE("M=" + std::to_string(M) + " N=" + std::to_string(N) + " K=" + std::to_string(K));
    Tensor a = random_e4m3(rng, M, K), b = random_e4m3(rng, N, K);
    Tensor as = Tensor::empty(DType::f32, {M, G});
    Tensor bs = Tensor::empty(DType::f32, {fp8::ceil_div(N, 128), G});
    for (Tensor* t : {&as, &bs})
      for (int64_t i = 0; i < t->numel(); ++i) t->data_as<float>()[i] = uniform(rng, 0, 0.01f);
    Tensor f32_kernel = filled(DType::f32, {M, N}), packed = filled(DType::f32, {M, N});
    OpOptions options;
    options.num_threads = 1 + pick(rng, 3);
    options.implementation = "cpu.avx512";
    block_fp8_gemm(a, as, ScaleLayout::row_major, b, bs, std::nullopt, f32_kernel, options);
    options.implementation = kernel;
    block_fp8_gemm(a, as, ScaleLayout::row_major, b, bs, std::nullopt, packed, options);
    double difference = 0, magnitude = 0;
    for (int64_t i = 0; i < M * N; ++i) {
      difference += std::fabs(static_cast<double>(packed.data_as<float>()[i]) -
                              f32_kernel.data_as<float>()[i]);
      magnitude += std::fabs(static_cast<double>(f32_kernel.data_as<float>()[i]));
    }
    EXPECT_LT(difference, 2e-6 * magnitude);
  }
}

TEST_P(Fp8GemmPacked, NaNBytesGiveNaNWhereTheReferenceDoes) {
  const std::string kernel = implementation();
  if (kernel.empty()) GTEST_SKIP() << "CPU lacks " << GetParam();
  std::mt19937_64 rng = rng_for("gemm " + kernel + " nan");
  for (const int64_t m : {25, 60, 131}) {
    GemmCase c{m, 200, 300, DType::f32};
    c.nan_bytes = 3;
    check_gemm(rng, c, kernel);
    c.out = DType::bf16;
    c.bias = true;
    check_gemm(rng, c, kernel);
  }
}

TEST_P(Fp8GemmPacked, BitwiseTheSameAcrossRunsAndThreadCounts) {
  const std::string kernel = implementation();
  if (kernel.empty()) GTEST_SKIP() << "CPU lacks " << GetParam();
  std::mt19937_64 rng = rng_for("gemm " + kernel + " determinism");
  // Two row tiles; then three of one weight tile, which the AMX kernel decodes in panels of two
  // tiles on one thread and of all three on three.
  for (const auto& [M, N] : {std::pair<int64_t, int64_t>{300, 700}, {601, 100}}) {
    const int64_t K = 1000, G = fp8::ceil_div(K, 128);
    SCOPED_TRACE("M=" + std::to_string(M) + " N=" + std::to_string(N));
    Tensor a = random_e4m3(rng, M, K), b = random_e4m3(rng, N, K);
    Tensor as = Tensor::empty(DType::f32, {M, G});
    Tensor bs = Tensor::empty(DType::f32, {fp8::ceil_div(N, 128), G});
    for (Tensor* t : {&as, &bs})
      for (int64_t i = 0; i < t->numel(); ++i) t->data_as<float>()[i] = uniform(rng, 0, 0.01f);
    std::vector<uint8_t> first;  // the first run's output bytes
    for (const int threads : {1, 2, 3, 1, 2, 3}) {
      OpOptions options;
      options.num_threads = threads;
      options.implementation = kernel;
      Tensor out = filled(DType::f32, {M, N});
      block_fp8_gemm(a, as, ScaleLayout::row_major, b, bs, std::nullopt, out, options);
      const auto* bytes = out.data_as<const uint8_t>();
      if (first.empty()) {
        first.assign(bytes, bytes + out.nbytes());
        continue;
      }
      EXPECT_EQ(std::memcmp(bytes, first.data(), first.size()), 0) << threads << " threads";
    }
  }
}

// The AMX kernel decodes the activations once into the caller's workspace (of
// block_fp8_gemm_workspace_size bytes, any 16-byte alignment) or, without one, into its own: the
// same bits either way. A workspace below that size is an error that writes nothing.
TEST(Fp8GemmPacked, AmxTakesTheCallersWorkspaceWithTheSameBits) {
  if (!cpu_features().amx_bf16) GTEST_SKIP() << "CPU lacks amx_bf16";
  const std::string kernel = "cpu.amx";
  std::mt19937_64 rng = rng_for("gemm " + kernel + " workspace");
  EXPECT_EQ(block_fp8_gemm_workspace_size(5, 200, 1000, Device::cpu()), 0u);  // streamed
  for (const int64_t M : {6, 300, 601}) {
    const int64_t N = 200, K = 1000, G = fp8::ceil_div(K, 128);
    SCOPED_TRACE("M=" + std::to_string(M));
    Tensor a = random_e4m3(rng, M, K), b = random_e4m3(rng, N, K);
    Tensor as = Tensor::empty(DType::f32, {M, G}), bs = Tensor::empty(DType::f32, {2, G});
    for (Tensor* t : {&as, &bs})
      for (int64_t i = 0; i < t->numel(); ++i) t->data_as<float>()[i] = uniform(rng, 0, 0.01f);
    const size_t bytes = block_fp8_gemm_workspace_size(M, N, K, Device::cpu());
    ASSERT_GT(bytes, 0u);
    std::vector<uint8_t> workspace(bytes + 16, 0xa5);  // stale bytes: the kernel writes first
    OpOptions options;
    options.implementation = kernel;
    Tensor own = filled(DType::f32, {M, N}), given = filled(DType::f32, {M, N});
    block_fp8_gemm(a, as, ScaleLayout::row_major, b, bs, std::nullopt, own, options);
    void* aligned16 = workspace.data() + (16 - reinterpret_cast<uintptr_t>(workspace.data()) % 16);
    block_fp8_gemm(a, as, ScaleLayout::row_major, b, bs, std::nullopt, given, aligned16, bytes,
                   options);
    EXPECT_EQ(std::memcmp(own.data(), given.data(), own.nbytes()), 0);
    Tensor untouched = filled(DType::f32, {M, N});
    EXPECT_THROW(block_fp8_gemm(a, as, ScaleLayout::row_major, b, bs, std::nullopt, untouched,
                                aligned16, bytes - 1, options),
                 Error);
    Tensor fresh = filled(DType::f32, {M, N});
    EXPECT_EQ(std::memcmp(untouched.data(), fresh.data(), fresh.nbytes()), 0);
  }
}

// The packed GEMM takes over from the streaming kernel from 6 rows on AMX tiles where the CPU has
// them, else from 25 on AVX-512 BF16 dot products; each entry says why it declines.
TEST(Fp8GemmPacked, ServesFromItsLeastRowsAndLeavesFewerToTheStreamingKernel) {
  const CpuFeatures& cpu = cpu_features();
  for (const int64_t M : {5, 6, 24, 25}) {
    Tensor a = Tensor::empty(DType::f8e4m3, {M, 128}), b = Tensor::empty(DType::f8e4m3, {64, 128});
    Tensor as = Tensor::empty(DType::f32, {M, 1}), bs = Tensor::empty(DType::f32, {1, 1});
    Tensor out = Tensor::empty(DType::bf16, {M, 64});
    std::string chosen;
    for (const ImplementationChoice& row :
         explain_block_fp8_gemm(a, as, ScaleLayout::row_major, b, bs, std::nullopt, out)) {
      if (row.chosen) chosen = row.name;
      const bool amx = row.name == "cpu.amx";
      if (!amx && row.name != "cpu.avx512bf16") continue;
      const int64_t least = amx ? 6 : 25;
      if (amx && !cpu.amx_bf16)
        EXPECT_EQ(row.reason,
                  "CPU lacks amx_bf16 (AMX-TILE and AMX-BF16, enabled by the OS for this process)");
      else if (!amx && !cpu.avx512_bf16)
        EXPECT_EQ(row.reason, "CPU lacks avx512_bf16 (with avx512 f, bw, vl, dq)");
      else if (M < least)
        EXPECT_EQ(row.reason, "M < " + std::to_string(least) +
                                  ": the streaming kernel of cpu.avx512 is faster");
      else
        EXPECT_EQ(row.reason, "");
    }
    const std::string packed = cpu.amx_bf16 && M >= 6       ? "cpu.amx"
                               : cpu.avx512_bf16 && M >= 25 ? "cpu.avx512bf16"
                               : cpu.avx512                 ? "cpu.avx512"
                               : cpu.avx2                   ? "cpu.avx2"
                                                            : "cpu.scalar";
    EXPECT_EQ(chosen, packed) << "M=" << M;
  }
}

// ---------------------------------------------------------------------------------------------
// The linear layer: quantize-then-GEMM reference, K multiple of 128 or not.

TEST(Fp8Linear, MatchesQuantizeThenGemmWithPartialGroups) {
  std::mt19937_64 rng = rng_for("linear");
  struct Case {
    int64_t m, n, k;
    DType x, y;
    bool bias;
  };
  const Case cases[] = {{1, 64, 128, DType::bf16, DType::bf16, false},
                        {5, 200, 300, DType::f32, DType::f32, true},
                        {33, 130, 256, DType::f16, DType::f16, true},
                        {2, 257, 100, DType::bf16, DType::f32, false},
                        {70, 96, 520, DType::bf16, DType::bf16, true}};
  for (const Case& c : cases) {
    SCOPED_TRACE("M=" + std::to_string(c.m) + " N=" + std::to_string(c.n) +
                 " K=" + std::to_string(c.k));
    Tensor x = Tensor::empty(c.x, {c.m, c.k});
    for (int64_t i = 0; i < x.numel(); ++i)
      store_from_f32(x.data(), c.x, i, std::normal_distribution<float>(0, 1)(rng));
    Tensor w = Tensor::empty(DType::f32, {c.n, c.k});
    for (int64_t i = 0; i < w.numel(); ++i)
      w.data_as<float>()[i] = std::normal_distribution<float>(0, 0.05f)(rng);
    Tensor weight = Tensor::empty(DType::f8e4m3, {c.n, c.k});
    Tensor scale_inv =
        Tensor::empty(DType::f32, {fp8::ceil_div(c.n, 128), fp8::ceil_div(c.k, 128)});
    block_quantize_weight(w, weight, scale_inv, {Backend::reference});
    Tensor bias = Tensor::empty(c.y, {c.n});
    for (int64_t i = 0; i < c.n; ++i) store_from_f32(bias.data(), c.y, i, uniform(rng, -1, 1));
    const std::optional<TensorView> bias_view =
        c.bias ? std::optional<TensorView>(bias.view()) : std::nullopt;
    const size_t bytes = w8a8_block_fp8_linear_workspace_size(c.m, c.k);
    Tensor ws_ref = filled(DType::u8, {static_cast<int64_t>(bytes)});
    Tensor ws = filled(DType::u8, {static_cast<int64_t>(bytes)});
    Tensor y_ref = filled(c.y, {c.m, c.n}), y = filled(c.y, {c.m, c.n});
    reference::w8a8_block_fp8_linear(make_w8a8_linear_problem(
        "test", x, weight, scale_inv, bias_view, y_ref, ws_ref.data(), bytes, {}));
    const W8a8LinearProblem p =
        make_w8a8_linear_problem("test", x, weight, scale_inv, bias_view, y, ws.data(), bytes, {});
    auto implementations = fast_implementations(w8a8_linear_implementations(), p);
    for (const auto* impl : implementations) {
      std::memset(ws.data(), kSentinelByte, ws.nbytes());
      impl->run(p);
      // The quantized activations and scales are exact: compare them bit for bit.
      EXPECT_EQ(std::memcmp(ws.data(), ws_ref.data(), c.m * c.k), 0) << impl->name << ": q";
      const size_t scales_at = static_cast<size_t>((c.m * c.k + 63) / 64 * 64);
      EXPECT_EQ(std::memcmp(ws.data_as<char>() + scales_at, ws_ref.data_as<char>() + scales_at,
                            bytes - scales_at),
                0)
          << impl->name << ": scales";
      double error = 0, magnitude = 0;
      for (int64_t i = 0; i < c.m * c.n; ++i) {
        error += std::fabs(value_at(y, i) - value_at(y_ref, i));
        magnitude += std::fabs(value_at(y_ref, i));
      }
      EXPECT_LT(error / magnitude, gemm_tolerance(c.y)) << impl->name;
    }
    // The public op (default backend) too.
    Tensor y_public = filled(c.y, {c.m, c.n});
    w8a8_block_fp8_linear(x, weight, scale_inv, bias_view, y_public, ws.data(), bytes);
    double error = 0, magnitude = 0;
    for (int64_t i = 0; i < c.m * c.n; ++i) {
      error += std::fabs(value_at(y_public, i) - value_at(y_ref, i));
      magnitude += std::fabs(value_at(y_ref, i));
    }
    EXPECT_LT(error / magnitude, gemm_tolerance(c.y));
  }
}

TEST(Fp8Linear, ApproximatesTheUnquantizedProduct) {
  // Sanity of the whole chain: y ~= x W^T within FP8 precision (~2^-4 per element, averaging).
  std::mt19937_64 rng = rng_for("linear accuracy");
  const int64_t M = 4, N = 96, K = 384;
  Tensor x = Tensor::empty(DType::f32, {M, K}), w = Tensor::empty(DType::f32, {N, K});
  for (int64_t i = 0; i < x.numel(); ++i) x.data_as<float>()[i] = uniform(rng, -1, 1);
  for (int64_t i = 0; i < w.numel(); ++i) w.data_as<float>()[i] = uniform(rng, -1, 1);
  Tensor weight = Tensor::empty(DType::f8e4m3, {N, K}),
         scale_inv = Tensor::empty(DType::f32, {1, 3});
  block_quantize_weight(w, weight, scale_inv);
  Tensor y = Tensor::empty(DType::f32, {M, N});
  std::vector<char> workspace(w8a8_block_fp8_linear_workspace_size(M, K) + 64);
  void* aligned = workspace.data() + (64 - reinterpret_cast<uintptr_t>(workspace.data()) % 64);
  w8a8_block_fp8_linear(x, weight, scale_inv, std::nullopt, y, aligned,
                        w8a8_block_fp8_linear_workspace_size(M, K));
  double error = 0, magnitude = 0;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      double exact = 0;
      for (int64_t k = 0; k < K; ++k)
        exact += static_cast<double>(x.data_as<float>()[m * K + k]) * w.data_as<float>()[n * K + k];
      error += std::fabs(y.data_as<float>()[m * N + n] - exact);
      magnitude += std::fabs(exact);
    }
  }
  EXPECT_LT(error / magnitude, 0.05);
}

// ---------------------------------------------------------------------------------------------
// Weight quantization: exact against the reference.

TEST(Fp8BlockQuantizeWeight, MatchesTheReferenceExactly) {
  std::mt19937_64 rng = rng_for("weight quant");
  const int64_t shapes[][2] = {{1, 100}, {130, 256}, {256, 300}, {7, 1}};
  for (const auto& shape : shapes) {
    for (DType dtype : {DType::f32, DType::bf16, DType::f16}) {
      const int64_t N = shape[0], K = shape[1];
      SCOPED_TRACE("N=" + std::to_string(N) + " K=" + std::to_string(K) + " " +
                   std::string(dtype_name(dtype)));
      Tensor w = Tensor::empty(dtype, {N, K});
      for (int64_t i = 0; i < w.numel(); ++i)
        store_from_f32(w.data(), dtype, i,
                       uniform(rng, -1, 1) * std::ldexp(1.0f, pick(rng, 10) - 5));
      const int64_t NB = fp8::ceil_div(N, 128), KB = fp8::ceil_div(K, 128);
      Tensor q_ref = filled(DType::f8e4m3, {N, K}), s_ref = filled(DType::f32, {NB, KB});
      Tensor q = filled(DType::f8e4m3, {N, K}), s = filled(DType::f32, {NB, KB});
      reference::block_quantize_weight(
          make_block_quantize_weight_problem("test", w, q_ref, s_ref, {}));
      const BlockQuantizeWeightProblem p = make_block_quantize_weight_problem("test", w, q, s, {});
      for (const auto* impl : fast_implementations(block_quantize_weight_implementations(), p)) {
        std::memset(q.data(), kSentinelByte, q.nbytes());
        std::memset(s.data(), kSentinelByte, s.nbytes());
        impl->run(p);
        EXPECT_EQ(std::memcmp(q.data(), q_ref.data(), q.nbytes()), 0) << impl->name;
        EXPECT_EQ(std::memcmp(s.data(), s_ref.data(), s.nbytes()), 0) << impl->name;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Dispatch.

// ---------------------------------------------------------------------------------------------
// grouped_block_fp8_gemm: each group's out has the bits block_fp8_gemm writes for it on the same
// backend; the gaps between groups are not written.

struct GroupedCall {
  Tensor a, as, b, bs, out;  // out: groups `gap` elements apart beyond M x N
  int64_t groups, m, n, k, gap;
  ScaleLayout layout;
};

GroupedCall grouped_call(std::mt19937_64& rng, int64_t G, int64_t M, int64_t N, int64_t K,
                         ScaleLayout layout, DType out, DType b_scale_dtype) {
  GroupedCall c{{}, {}, {}, {}, {}, G, M, N, K, 7, layout};
  const int64_t KB = fp8::ceil_div(K, 128), NB = fp8::ceil_div(N, 128);
  c.a = Tensor::empty(DType::f8e4m3, {G, M, K});
  c.b = Tensor::empty(DType::f8e4m3, {G, N, K});
  for (Tensor* t : {&c.a, &c.b})
    for (int64_t i = 0; i < t->numel(); ++i)
      t->data_as<uint8_t>()[i] = f32_to_f8e4m3(uniform(rng, -448.0f, 448.0f));
  GroupQuantConfig config;
  config.layout = layout;
  const ScaleStorage storage = group_quant_scale_storage(M, K, config);
  c.as = filled(storage.dtype, {G, storage.shape[0], storage.shape[1]});
  const int64_t plane = storage.shape[0] * storage.shape[1];
  for (int64_t g = 0; g < G; ++g) {
    std::vector<float> logical(static_cast<size_t>(M * KB));
    for (float& v : logical)
      v = layout == ScaleLayout::packed_ue8m0 ? std::ldexp(1.0f, -5 - pick(rng, 8))
                                              : uniform(rng, 0.0f, 0.01f);
    const Tensor t = scale_tensor(logical, M, K, layout);
    std::memcpy(c.as.data_as<char>() + g * plane * 4, t.data(), t.nbytes());
  }
  c.bs = Tensor::empty(b_scale_dtype, {G, NB, KB});
  for (int64_t i = 0; i < c.bs.numel(); ++i)
    store_from_f32(c.bs.data(), c.bs.dtype(), i, uniform(rng, 0.0f, 0.01f));
  c.out = filled(out, {G * (M * N + c.gap)});
  return c;
}

TensorView grouped_out(const GroupedCall& c) {
  const int64_t shape[] = {c.groups, c.m, c.n}, strides[] = {c.m * c.n + c.gap, c.n, 1};
  return TensorView(c.out.data(), c.out.dtype(), shape, strides);
}

TEST(Fp8GroupedGemm, EachGroupHasTheBitsOfItsBlockFp8Gemm) {
  std::mt19937_64 rng = rng_for("grouped gemm");
  struct Shape {
    int64_t groups, m, n, k;
    ScaleLayout layout;
    DType out, b_scales;
  };
  const Shape shapes[] = {
      {3, 1, 200, 384, ScaleLayout::row_major, DType::bf16, DType::f32},
      {2, 5, 128, 300, ScaleLayout::column_major_tma, DType::f32, DType::bf16},
      {4, 16, 64, 256, ScaleLayout::packed_ue8m0, DType::f16, DType::f32},
      {1, 3, 130, 128, ScaleLayout::column_major, DType::bf16, DType::bf16},
  };
  for (const Backend backend : {Backend::reference, Backend::cpu}) {
    for (const Shape& s : shapes) {
      SCOPED_TRACE(std::string(backend_name(backend)) + " G=" + std::to_string(s.groups) +
                   " M=" + std::to_string(s.m) + " N=" + std::to_string(s.n) +
                   " K=" + std::to_string(s.k) + " " + scale_layout_name(s.layout));
      GroupedCall c = grouped_call(rng, s.groups, s.m, s.n, s.k, s.layout, s.out, s.b_scales);
      const OpOptions options{backend};
      grouped_block_fp8_gemm(c.a, c.as, s.layout, c.b, c.bs, grouped_out(c), options);
      const size_t element = dtype_size(s.out);
      for (int64_t g = 0; g < s.groups; ++g) {
        Tensor single = filled(s.out, {s.m, s.n});
        block_fp8_gemm(plane_of(c.a, g), plane_of(c.as, g), s.layout, plane_of(c.b, g),
                       plane_of(c.bs, g), std::nullopt, single, options);
        const char* group = c.out.data_as<char>() + g * (s.m * s.n + c.gap) * element;
        EXPECT_EQ(std::memcmp(group, single.data(), single.nbytes()), 0) << "group " << g;
        for (size_t byte = single.nbytes(); byte < single.nbytes() + c.gap * element; ++byte)
          ASSERT_EQ(static_cast<uint8_t>(group[byte]), kSentinelByte) << "gap after group " << g;
      }
    }
  }
}

// The masked layout: group g's first min(max(masked_m[g], 0), M) rows have the bits of
// block_fp8_gemm on those rows; the host backends write nothing else.
TEST(Fp8GroupedGemm, MaskedGroupsUseTheirRowsOnly) {
  std::mt19937_64 rng = rng_for("grouped masked");
  constexpr int64_t G = 5, N = 200, K = 384;
  // M=6: none, all, some, past M (all), negative (none). M=24: groups of 24 and of 5 or 17 rows,
  // which the CPU serves with different entries (its packed kernel from 17 rows).
  const std::vector<std::pair<int64_t, std::array<int32_t, G>>> cases = {{6, {0, 6, 2, 9, -1}},
                                                                         {24, {24, 5, 0, 17, 3}}};
  for (const auto& [M, counts] : cases) {
    GroupedCall c = grouped_call(rng, G, M, N, K, ScaleLayout::row_major, DType::bf16, DType::f32);
    Tensor masked_m = Tensor::empty(DType::i32, {G});
    std::memcpy(masked_m.data(), counts.data(), sizeof(int32_t) * G);
    // (The hint of expected rows changes no byte.)
    for (const auto& [backend, expected] :
         {std::pair{Backend::reference, int64_t{0}}, std::pair{Backend::cpu, int64_t{0}},
          std::pair{Backend::cpu, int64_t{3}}}) {
      SCOPED_TRACE(std::string(backend_name(backend)) + " M=" + std::to_string(M) +
                   " expected rows " + std::to_string(expected));
      std::memset(c.out.data(), kSentinelByte, c.out.nbytes());
      const OpOptions options{backend};
      if (expected > 0)
        grouped_block_fp8_gemm_masked(c.a, c.as, ScaleLayout::row_major, c.b, c.bs, masked_m,
                                      grouped_out(c), expected, options);
      else
        grouped_block_fp8_gemm_masked(c.a, c.as, ScaleLayout::row_major, c.b, c.bs, masked_m,
                                      grouped_out(c), options);
      for (int64_t g = 0; g < G; ++g) {
        const int64_t rows = std::clamp<int64_t>(counts[static_cast<size_t>(g)], 0, M);
        const char* group = c.out.data_as<char>() + g * (M * N + c.gap) * 2;
        if (rows > 0) {
          Tensor single = filled(DType::bf16, {rows, N});
          const TensorView a = plane_of(c.a, g), as = plane_of(c.as, g);
          block_fp8_gemm(TensorView(a.data(), a.dtype(), {rows, K}),
                         TensorView(as.data(), as.dtype(), {rows, as.size(1)}),
                         ScaleLayout::row_major, plane_of(c.b, g), plane_of(c.bs, g), std::nullopt,
                         single, options);
          EXPECT_EQ(std::memcmp(group, single.data(), single.nbytes()), 0) << "group " << g;
        }
        for (int64_t byte = rows * N * 2; byte < (M * N + c.gap) * 2; ++byte)
          ASSERT_EQ(static_cast<uint8_t>(group[byte]), kSentinelByte) << "group " << g;
      }
    }
  }
}

TEST(Fp8GroupedGemm, ExplainNamesThePerGroupEntry) {
  std::mt19937_64 rng = rng_for("grouped explain");
  GroupedCall c = grouped_call(rng, 2, 3, 64, 256, ScaleLayout::row_major, DType::bf16, DType::f32);
  const auto rows =
      explain_grouped_block_fp8_gemm(c.a, c.as, ScaleLayout::row_major, c.b, c.bs, grouped_out(c));
  ASSERT_EQ(rows.size(), grouped_block_gemm_implementations().size());
  int chosen = 0;
  for (const ImplementationChoice& row : rows) {
    chosen += row.chosen;
    if (row.chosen) {
      EXPECT_EQ(row.name, "cpu.per_group");
      EXPECT_EQ(row.detail.rfind("2 calls of cpu.", 0), 0u) << row.detail;
    }
    if (row.backend == Backend::gpu) {
      EXPECT_FALSE(row.reason.empty()) << row.name;
    }
  }
  EXPECT_EQ(chosen, 1);
  const auto on_reference = explain_grouped_block_fp8_gemm(
      c.a, c.as, ScaleLayout::row_major, c.b, c.bs, grouped_out(c), {Backend::reference});
  EXPECT_TRUE(on_reference.back().chosen);
  EXPECT_EQ(on_reference.back().detail, "2 calls of reference");
}

// ---------------------------------------------------------------------------------------------
// grouped_block_fp8_gemm_contiguous: the rows of each run of consecutive 128-row blocks with one
// in-range index have the bits block_fp8_gemm writes for those rows on the same backend; the rows
// of padding blocks (index outside [0, G)) are not written.

struct ContiguousCase {
  int64_t groups, n, k;
  std::vector<int32_t> blocks;  // each block's index (its first row's)
  int64_t last_rows;            // rows of the last block (1..128)
  DType out, b_scales;
  int64_t index_stride;  // of m_indices
};

struct BlockRun {
  int32_t group;
  int64_t first, rows;
};

// The maximal runs of consecutive blocks with one index in [0, G).
std::vector<BlockRun> block_runs(const ContiguousCase& c, int64_t M) {
  std::vector<BlockRun> runs;
  for (size_t i = 0; i < c.blocks.size(); ++i) {
    const int32_t g = c.blocks[i];
    const int64_t first = static_cast<int64_t>(i) * 128, rows = std::min<int64_t>(128, M - first);
    if (g < 0 || g >= c.groups) continue;
    if (!runs.empty() && runs.back().group == g && runs.back().first + runs.back().rows == first)
      runs.back().rows += rows;
    else
      runs.push_back({g, first, rows});
  }
  return runs;
}

void check_contiguous(std::mt19937_64& rng, const ContiguousCase& c, ScaleLayout layout) {
  const int64_t G = c.groups, N = c.n, K = c.k, KB = fp8::ceil_div(K, 128);
  const int64_t M = static_cast<int64_t>(c.blocks.size() - 1) * 128 + c.last_rows;
  Tensor a = random_e4m3(rng, M, K);
  std::vector<float> scales(static_cast<size_t>(M * KB));
  for (float& v : scales)
    v = layout == ScaleLayout::packed_ue8m0 ? std::ldexp(1.0f, -5 - pick(rng, 8))
                                            : uniform(rng, 0.0f, 0.01f);
  const Tensor as = scale_tensor(scales, M, K, layout);
  Tensor b = Tensor::empty(DType::f8e4m3, {G, N, K});
  for (int64_t i = 0; i < b.numel(); ++i)
    b.data_as<uint8_t>()[i] = f32_to_f8e4m3(uniform(rng, -448.0f, 448.0f));
  Tensor bs = Tensor::empty(c.b_scales, {G, fp8::ceil_div(N, 128), KB});
  for (int64_t i = 0; i < bs.numel(); ++i)
    store_from_f32(bs.data(), bs.dtype(), i, uniform(rng, 0.0f, 0.01f));
  // Every row but a block's first carries some other index, in range or not: none is read.
  Tensor index_storage = Tensor::empty(DType::i32, {M * c.index_stride});
  auto* index = index_storage.data_as<int32_t>();
  for (int64_t i = 0; i < M * c.index_stride; ++i)
    index[i] = static_cast<int32_t>(pick(rng, static_cast<int>(G) + 4)) - 2;
  for (size_t i = 0; i < c.blocks.size(); ++i)
    index[static_cast<int64_t>(i) * 128 * c.index_stride] = c.blocks[i];
  const int64_t index_shape[] = {M}, index_strides[] = {c.index_stride};
  const TensorView m_indices(index, DType::i32, index_shape, index_strides);

  const std::vector<BlockRun> runs = block_runs(c, M);
  const size_t row_bytes = static_cast<size_t>(N) * dtype_size(c.out);
  for (const Backend backend : {Backend::reference, Backend::cpu}) {
    SCOPED_TRACE(std::string(backend_name(backend)) + " G=" + std::to_string(G) +
                 " M=" + std::to_string(M) + " N=" + std::to_string(N) + " K=" + std::to_string(K) +
                 " " + scale_layout_name(layout) + " out=" + std::string(dtype_name(c.out)));
    const OpOptions options{backend};
    Tensor out = filled(c.out, {M, N});
    grouped_block_fp8_gemm_contiguous(a, as, layout, b, bs, m_indices, out, options);
    std::vector<bool> written(static_cast<size_t>(M), false);
    for (const BlockRun& run : runs) {
      std::vector<float> run_scales(scales.begin() + run.first * KB,
                                    scales.begin() + (run.first + run.rows) * KB);
      const Tensor run_as = scale_tensor(run_scales, run.rows, K, layout);
      Tensor want = filled(c.out, {run.rows, N});
      block_fp8_gemm(TensorView(a.data_as<uint8_t>() + run.first * K, DType::f8e4m3, {run.rows, K}),
                     run_as, layout, plane_of(b, run.group), plane_of(bs, run.group), std::nullopt,
                     want, options);
      EXPECT_EQ(
          std::memcmp(out.data_as<char>() + run.first * row_bytes, want.data(), want.nbytes()), 0)
          << "rows " << run.first << ".." << run.first + run.rows - 1 << " of expert " << run.group;
      for (int64_t m = run.first; m < run.first + run.rows; ++m)
        written[static_cast<size_t>(m)] = true;
    }
    for (int64_t m = 0; m < M; ++m) {
      if (written[static_cast<size_t>(m)]) continue;
      const auto* row = out.data_as<uint8_t>() + m * row_bytes;
      ASSERT_TRUE(std::all_of(row, row + row_bytes, [](uint8_t v) { return v == kSentinelByte; }))
          << "padding row " << m << " was written";
    }
  }
}

TEST(Fp8ContiguousGemm, EachRunOfBlocksHasTheBitsOfItsBlockFp8Gemm) {
  std::mt19937_64 rng = rng_for("contiguous gemm");
  const ContiguousCase cases[] = {
      // Runs of one expert (2, 2 and 0 ... 0 split by padding), expert 1 without blocks, a padding
      // block of -1 and one of G in the middle, a partial last block; K and N not multiples of 128.
      {4, 200, 300, {2, 2, -1, 0, 4, 0, 3}, 37, DType::f32, DType::f32, 1},
      // Strided indices, bf16 out and b_scales, a padding block first and a run to the end.
      {3, 256, 384, {3, 0, 1, 1}, 100, DType::bf16, DType::bf16, 2},
      // Five experts, one block each in reverse, the last of 1 row; an index far out of range.
      {5, 136, 128, {4, 3, -7, 2, 1, 0}, 1, DType::bf16, DType::f32, 1},
  };
  for (const ContiguousCase& c : cases)
    for (const ScaleLayout layout : kLayouts) check_contiguous(rng, c, layout);
}

TEST(Fp8ContiguousGemm, EmptyCallsWriteNothing) {
  std::mt19937_64 rng = rng_for("contiguous empty");
  const int64_t K = 256;
  Tensor b = random_e4m3(rng, 2 * 64, K);
  const TensorView b3(b.data(), DType::f8e4m3, {2, 64, K});
  Tensor bs = Tensor::empty(DType::f32, {2, 1, 2});
  for (int64_t i = 0; i < bs.numel(); ++i) bs.data_as<float>()[i] = 0.01f;
  for (const Backend backend : {Backend::reference, Backend::cpu}) {
    // M = 0.
    Tensor a0 = Tensor::empty(DType::f8e4m3, {0, K}), as0 = Tensor::empty(DType::f32, {0, 2});
    Tensor idx0 = Tensor::empty(DType::i32, {0}), out0 = filled(DType::f32, {0, 64});
    grouped_block_fp8_gemm_contiguous(a0, as0, ScaleLayout::row_major, b3, bs, idx0, out0,
                                      {backend});
    // G = 0: every block is padding.
    Tensor a = random_e4m3(rng, 3, K), as = Tensor::empty(DType::f32, {3, 2});
    for (int64_t i = 0; i < as.numel(); ++i) as.data_as<float>()[i] = 0.01f;
    Tensor idx = Tensor::empty(DType::i32, {3}), out = filled(DType::f32, {3, 64});
    std::memset(idx.data(), 0, idx.nbytes());
    grouped_block_fp8_gemm_contiguous(
        a, as, ScaleLayout::row_major, TensorView(b.data(), DType::f8e4m3, {0, 64, K}),
        TensorView(bs.data(), DType::f32, {0, 1, 2}), idx, out, {backend});
    const auto* bytes = out.data_as<uint8_t>();
    EXPECT_TRUE(std::all_of(bytes, bytes + out.nbytes(), [](uint8_t v) {
      return v == kSentinelByte;
    })) << backend_name(backend);
  }
}

TEST(Fp8ContiguousGemm, ExplainNamesThePerSegmentEntry) {
  std::mt19937_64 rng = rng_for("contiguous explain");
  const int64_t M = 200, N = 64, K = 256;
  Tensor a = random_e4m3(rng, M, K), as = Tensor::empty(DType::f32, {M, 2});
  Tensor b = Tensor::empty(DType::f8e4m3, {2, N, K}), bs = Tensor::empty(DType::f32, {2, 1, 2});
  Tensor idx = Tensor::empty(DType::i32, {M}), out = filled(DType::bf16, {M, N});
  std::memset(idx.data(), 0, idx.nbytes());
  const auto rows =
      explain_grouped_block_fp8_gemm_contiguous(a, as, ScaleLayout::row_major, b, bs, idx, out);
  ASSERT_EQ(rows.size(), contiguous_block_gemm_implementations().size());
  int chosen = 0;
  for (const ImplementationChoice& row : rows) {
    chosen += row.chosen;
    if (row.chosen) {
      EXPECT_EQ(row.name, "cpu.per_segment");
      EXPECT_EQ(row.detail.rfind("block_fp8_gemm (cpu.", 0), 0u) << row.detail;
      EXPECT_NE(row.detail.find(" at 128 rows) per run of blocks with one index"),
                std::string::npos)
          << row.detail;
    }
    if (row.backend == Backend::gpu) {
      EXPECT_FALSE(row.reason.empty()) << row.name;
    }
  }
  EXPECT_EQ(chosen, 1);
  const auto on_reference = explain_grouped_block_fp8_gemm_contiguous(
      a, as, ScaleLayout::row_major, b, bs, idx, out, {Backend::reference});
  ASSERT_EQ(on_reference.size(), rows.size());
  EXPECT_EQ(on_reference.back().name, "reference.per_segment");
  EXPECT_TRUE(on_reference.back().chosen);
  EXPECT_EQ(on_reference.back().detail,
            "block_fp8_gemm (reference at 128 rows) per run of blocks with one index");
}

TEST(Fp8Dispatch, ExplainNamesTheChoiceAndEveryReason) {
  Tensor a = Tensor::empty(DType::f8e4m3, {2, 128}), b = Tensor::empty(DType::f8e4m3, {64, 128});
  Tensor as = Tensor::empty(DType::f32, {2, 1}), bs = Tensor::empty(DType::f32, {1, 1});
  Tensor out = Tensor::empty(DType::bf16, {2, 64});
  const auto rows = explain_block_fp8_gemm(a, as, ScaleLayout::row_major, b, bs, std::nullopt, out);
  ASSERT_EQ(rows.size(), block_gemm_implementations().size());
  int chosen = 0;
  for (const ImplementationChoice& row : rows) {
    chosen += row.chosen;
    if (row.chosen) {
      EXPECT_TRUE(row.reason.empty()) << row.name;
    }
    std::printf("  %-14s %-8s %s\n", row.name.c_str(),
                row.chosen           ? "chosen"
                : row.reason.empty() ? "serves"
                                     : "declines",
                row.reason.c_str());
  }
  EXPECT_EQ(chosen, 1);
  const std::string expected_cpu = cpu_features().avx512 ? "cpu.avx512"
                                   : cpu_features().avx2 ? "cpu.avx2"
                                                         : "cpu.scalar";
  for (const ImplementationChoice& row : rows) {
    if (row.chosen) {
      EXPECT_EQ(row.name, expected_cpu);
    }
    if (row.name == "cpu.avx512" && !cpu_features().avx512) {
      EXPECT_EQ(row.reason, "CPU lacks avx512 (f, bw, vl, dq)");
    }
    if (row.backend == Backend::reference) {  // serves too, behind the CPU kernels
      EXPECT_EQ(row.reason, "");
      EXPECT_FALSE(row.chosen);
    }
  }
  const auto on_reference = explain_block_fp8_gemm(a, as, ScaleLayout::row_major, b, bs,
                                                   std::nullopt, out, {Backend::reference});
  EXPECT_TRUE(on_reference.back().chosen);
  EXPECT_EQ(on_reference.back().name, "reference");
  EXPECT_EQ(on_reference.front().reason, "backend reference was requested");

  Tensor x = Tensor::empty(DType::bf16, {2, 128}), q = Tensor::empty(DType::f8e4m3, {2, 128});
  Tensor s = Tensor::empty(DType::f32, {2, 1});
  const auto quant_rows = explain_per_token_group_quant_fp8(x, q, s, {});
  EXPECT_EQ(quant_rows.size(), group_quant_implementations().size());
  Tensor w = Tensor::empty(DType::f32, {64, 128});
  EXPECT_EQ(explain_block_quantize_weight(w, b, bs).size(),
            block_quantize_weight_implementations().size());
  const size_t bytes = w8a8_block_fp8_linear_workspace_size(2, 128);
  Tensor ws = Tensor::empty(DType::u8, {static_cast<int64_t>(bytes)});
  EXPECT_EQ(explain_w8a8_block_fp8_linear(x, b, bs, std::nullopt, out, ws.data(), bytes).size(),
            w8a8_linear_implementations().size());
}

TEST(Fp8Dispatch, ANamedImplementationIsTheOnlyOneConsidered) {
  std::mt19937_64 rng(7);
  Tensor a = random_e4m3(rng, 3, 256), b = random_e4m3(rng, 64, 256);
  Tensor as = Tensor::empty(DType::f32, {3, 2}), bs = Tensor::empty(DType::f32, {1, 2});
  for (Tensor* t : {&as, &bs})
    for (int64_t i = 0; i < t->numel(); ++i) t->data_as<float>()[i] = uniform(rng, 0.001f, 0.01f);
  Tensor out = filled(DType::f32, {3, 64}), ref = Tensor::empty(DType::f32, {3, 64});
  OpOptions scalar;
  scalar.implementation = "cpu.scalar";
  const auto rows =
      explain_block_fp8_gemm(a, as, ScaleLayout::row_major, b, bs, std::nullopt, out, scalar);
  for (const ImplementationChoice& row : rows) {
    EXPECT_EQ(row.chosen, row.name == "cpu.scalar") << row.name;
    if (row.name != "cpu.scalar") {
      EXPECT_EQ(row.reason, "implementation cpu.scalar was requested");
    }
  }
  block_fp8_gemm(a, as, ScaleLayout::row_major, b, bs, std::nullopt, out, scalar);
  block_fp8_gemm(a, as, ScaleLayout::row_major, b, bs, std::nullopt, ref, {Backend::reference});
  double error = 0.0, magnitude = 0.0;
  for (int64_t i = 0; i < out.numel(); ++i) {
    error += std::fabs(out.data_as<float>()[i] - ref.data_as<float>()[i]);
    magnitude += std::fabs(ref.data_as<float>()[i]);
  }
  EXPECT_LT(error, 1e-3 * magnitude);

  OpOptions unknown;
  unknown.implementation = "gpu.nonesuch";
  try {
    block_fp8_gemm(a, as, ScaleLayout::row_major, b, bs, std::nullopt, out, unknown);
    FAIL() << "an unknown implementation name must be an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("implementation"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("gpu.nonesuch"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace moekit
