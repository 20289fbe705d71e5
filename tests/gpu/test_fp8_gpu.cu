// GPU FP8 kernels (src/gpu/fp8_gpu.h) against the reference run on host copies of the same bytes:
// group quantization (bytes and scales exact over every layout, group size, x dtype, ue8m0, eps,
// partial last groups, padded and misaligned rows, adversarial values), block_quantize_weight
// (exact), the portable GEMM (both of its kernels and the dispatch between them: random shapes with
// partial blocks, odd and unaligned sizes, every output, bias and scale form; every e4m3 byte
// decoded exactly; NaN propagation), outputs poisoned before each run and every element checked,
// bitwise determinism, CUDA graph capture, and the public ops' dispatch to these entries. Every
// test skips on a machine without a GPU; random tests print their seed (MOEKIT_TEST_SEED repeats).
// MOEKIT_FP8_GPU_TIMINGS=1 also times the decode GEMM and the group quantization (verified first).
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "gpu/fp8_gpu.h"
#include "gpu/gpu_check.h"
#include "gpu/gpu_runtime.h"
#include "gpu_test_support.h"
#include "late_counts.cuh"
#include "moekit/backend.h"
#include "moekit/error.h"
#include "moekit/ops/fp8.h"
#include "moekit/tensor.h"
#include "ops/fp8_problem.h"
#include "reference/fp8_reference.h"

namespace moekit {
namespace {

using gpu_test::Stream;

uint64_t test_seed(const char* test) {
  uint64_t seed;
  if (const char* env = std::getenv("MOEKIT_TEST_SEED"))
    seed = std::strtoull(env, nullptr, 0);
  else
    seed = (static_cast<uint64_t>(std::random_device{}()) << 32) ^ std::random_device{}();
  std::printf("%s: seed %llu (MOEKIT_TEST_SEED to repeat)\n", test,
              static_cast<unsigned long long>(seed));
  return seed;
}

constexpr uint8_t kPoison = 0xA5;  // every output byte before a run: what stays was not written

float uniform(std::mt19937_64& rng, float lo, float hi) {
  return std::uniform_real_distribution<float>(lo, hi)(rng);
}
int64_t pick_index(std::mt19937_64& rng, size_t n) {
  return static_cast<int64_t>(rng() % static_cast<uint64_t>(n));
}
template <class T>
T pick(std::mt19937_64& rng, std::initializer_list<T> values) {
  return values.begin()[pick_index(rng, values.size())];
}
bool chance(std::mt19937_64& rng, double p) {
  return std::uniform_real_distribution<double>(0, 1)(rng) < p;
}

bool is_e4m3_nan(uint8_t b) { return (b & 0x7f) == 0x7f; }
// Equal bytes, or two e4m3 NaNs (the hardware encoder writes every NaN as 0x7f).
bool same_e4m3(uint8_t a, uint8_t b) { return a == b || (is_e4m3_nan(a) && is_e4m3_nan(b)); }

// ---- Tensors that live twice: a host copy (what the reference reads and writes) and a device
// copy of the same bytes, both viewed through the same 2-D geometry inside a 1-D storage.

struct Geometry {
  int64_t offset = 0;  // elements before [0, 0]
  int64_t rows = 0, cols = 0;
  int64_t row_stride = 0, col_stride = 1;
  int64_t elements() const {
    if (rows == 0 || cols == 0) return std::max<int64_t>(offset, 1);
    return offset + (rows - 1) * row_stride + (cols - 1) * col_stride + 1;
  }
};

Geometry dense(int64_t rows, int64_t cols, int64_t row_pad = 0, int64_t offset = 0) {
  return {offset, rows, cols, cols + row_pad, 1};
}

struct Twin {
  DType dtype = DType::u8;
  Geometry at;
  Tensor host, device;

  Twin() = default;
  Twin(DType d, const Geometry& g) : dtype(d), at(g) {
    host = Tensor::empty(dtype, {at.elements()});
    std::memset(host.data(), kPoison, host.nbytes());
  }
  TensorView view_on(const Tensor& storage) const {
    char* base = static_cast<char*>(storage.data()) + at.offset * dtype_size(dtype);
    const std::array<int64_t, 2> shape{at.rows, at.cols}, strides{at.row_stride, at.col_stride};
    return TensorView(base, dtype, shape, strides, storage.device());
  }
  TensorView host_view() const { return view_on(host); }
  TensorView device_view() const { return view_on(device); }
  int64_t index(int64_t r, int64_t c) const {
    return at.offset + r * at.row_stride + c * at.col_stride;
  }
  void set(int64_t r, int64_t c, float v) { store_from_f32(host.data(), dtype, index(r, c), v); }
  float get(const Tensor& storage, int64_t r, int64_t c) const {
    return load_as_f32(storage.data(), dtype, index(r, c));
  }
  void upload() { device = Tensor::copy_of(host, Device::gpu()); }
  // A new device copy of the host bytes (e.g. poisoned outputs for a second run).
  Tensor fresh_device() const { return Tensor::copy_of(host, Device::gpu()); }
  Tensor download() const { return Tensor::copy_of(device, Device::cpu()); }
};

// A 1-D [n] view with a stride, as bias is.
TensorView strided_vector(const Tensor& storage, DType dtype, int64_t n, int64_t stride) {
  const std::array<int64_t, 1> shape{n}, strides{stride};
  return TensorView(storage.data(), dtype, shape, strides, storage.device());
}

constexpr ScaleLayout kLayouts[] = {ScaleLayout::row_major, ScaleLayout::column_major,
                                    ScaleLayout::column_major_tma, ScaleLayout::packed_ue8m0};
constexpr int kGroupSizes[] = {16, 32, 64, 128, 256};
constexpr DType kWideTypes[] = {DType::f32, DType::f16, DType::bf16};

// ---------------------------------------------------------------------------------------------
// The vendor conversion helpers: the integer versions (what sm_80, MUSA and HIP builds run) and
// what this device runs, against moekit's scalar conversions.

__global__ void encode_kernel(const float* x, int n, uint8_t* soft, uint8_t* used) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i >= n) return;
  soft[i] = static_cast<uint8_t>(gpu::vendor::fp8_soft::e4m3_from_float(x[i]));
  used[i] = static_cast<uint8_t>(gpu::vendor::e4m3x2_from_floats(x[i], 0.0f));
}

__global__ void decode_kernel(uint32_t* soft, uint32_t* used) {
  const uint32_t pair = threadIdx.x | ((255u - threadIdx.x) << 8);  // every byte in both halves
  soft[threadIdx.x] = gpu::vendor::fp8_soft::e4m3x2_to_half2_bits(pair);
  used[threadIdx.x] = gpu::vendor::e4m3x2_to_half2_bits(pair);
}

TEST(GpuFp8Vendor, ConversionHelpersMatchTheScalarConversions) {
  SKIP_WITHOUT_GPU();
  const uint64_t seed = test_seed("ConversionHelpersMatchTheScalarConversions");
  std::mt19937_64 rng(seed);
  std::vector<float> x;
  for (uint32_t sign = 0; sign < 2; ++sign) {
    for (uint32_t exponent = 0; exponent < 256; ++exponent) {
      for (uint32_t top = 0; top < 16; ++top) {
        const uint32_t base = sign << 31 | exponent << 23 | top << 19;
        for (uint32_t low : {0u, 1u, 0x7ffffu, 0x40000u, static_cast<uint32_t>(rng() & 0x7ffff)})
          x.push_back(std::bit_cast<float>(base | low));
      }
      if (exponent >= 110 && exponent <= 121)
        for (uint32_t m = 0; m < 4096; ++m)
          x.push_back(std::bit_cast<float>(sign << 31 | exponent << 23 | m << 11));
    }
  }
  for (int i = 0; i < 100000; ++i) x.push_back(std::bit_cast<float>(static_cast<uint32_t>(rng())));
  const auto n = static_cast<int64_t>(x.size());
  Tensor x_host = Tensor::empty(DType::f32, {n});
  std::memcpy(x_host.data(), x.data(), x.size() * sizeof(float));
  const Tensor x_device = Tensor::copy_of(x_host, Device::gpu());
  const Tensor soft = Tensor::empty(DType::u8, {n}, Device::gpu());
  const Tensor used = Tensor::empty(DType::u8, {n}, Device::gpu());
  encode_kernel<<<static_cast<unsigned>((n + 255) / 256), 256>>>(
      x_device.data_as<float>(), static_cast<int>(n), soft.data_as<uint8_t>(),
      used.data_as<uint8_t>());
  MOEKIT_GPU_CHECK(cudaGetLastError());
  gpu::synchronize(nullptr);
  const Tensor soft_host = Tensor::copy_of(soft, Device::cpu());
  const Tensor used_host = Tensor::copy_of(used, Device::cpu());
  int64_t soft_bad = 0, used_bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t expected = f32_to_f8e4m3(x[static_cast<size_t>(i)]);
    const uint8_t s = soft_host.data_as<uint8_t>()[i], u = used_host.data_as<uint8_t>()[i];
    if (s != expected && ++soft_bad <= 3)
      ADD_FAILURE() << "soft encode 0x" << std::hex << std::bit_cast<uint32_t>(x[i]) << " -> 0x"
                    << int{s} << ", expected 0x" << int{expected};
    if (!same_e4m3(u, expected) && ++used_bad <= 3)
      ADD_FAILURE() << "encode 0x" << std::hex << std::bit_cast<uint32_t>(x[i]) << " -> 0x"
                    << int{u} << ", expected 0x" << int{expected};
  }
  EXPECT_EQ(soft_bad, 0);
  EXPECT_EQ(used_bad, 0);

  const Tensor soft_pairs = Tensor::empty(DType::i32, {256}, Device::gpu());
  const Tensor used_pairs = Tensor::empty(DType::i32, {256}, Device::gpu());
  decode_kernel<<<1, 256>>>(static_cast<uint32_t*>(soft_pairs.data()),
                            static_cast<uint32_t*>(used_pairs.data()));
  MOEKIT_GPU_CHECK(cudaGetLastError());
  gpu::synchronize(nullptr);
  const Tensor soft_p = Tensor::copy_of(soft_pairs, Device::cpu());
  const Tensor used_p = Tensor::copy_of(used_pairs, Device::cpu());
  for (uint32_t b = 0; b < 256; ++b) {
    for (const Tensor* t : {&soft_p, &used_p}) {
      const uint32_t bits = static_cast<const uint32_t*>(t->data())[b];
      const float lo = f16_to_f32(static_cast<uint16_t>(bits));
      const float hi = f16_to_f32(static_cast<uint16_t>(bits >> 16));
      const float e_lo = f8e4m3_to_f32(static_cast<uint8_t>(b));
      const float e_hi = f8e4m3_to_f32(static_cast<uint8_t>(255 - b));
      const bool ok = (std::isnan(e_lo) ? std::isnan(lo)
                                        : lo == e_lo && std::signbit(lo) == std::signbit(e_lo)) &&
                      (std::isnan(e_hi) ? std::isnan(hi)
                                        : hi == e_hi && std::signbit(hi) == std::signbit(e_hi));
      EXPECT_TRUE(ok) << (t == &soft_p ? "soft" : "used") << " decode of bytes 0x" << std::hex << b
                      << ", 0x" << (255 - b) << ": 0x" << bits;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Group quantization.

struct QuantCase {
  int64_t m = 1, k = 128;
  int group = 128;
  DType dtype = DType::bf16;
  ScaleLayout layout = ScaleLayout::row_major;
  bool ue8m0 = false;
  float eps = 1e-10f;
  bool adversarial = false;
  bool gated = false;  // silu_and_mul_group_quant_fp8: x is [M, 2K], gate then up
  int64_t x_row_pad = 0, x_offset = 0, q_row_pad = 0;  // elements
  int64_t x_cols() const { return gated ? 2 * k : k; }
  std::string describe() const {
    char text[256];
    std::snprintf(text, sizeof text,
                  "%sM=%lld K=%lld group=%d x=%s %s%s eps=%g%s x_pad=%lld x_offset=%lld q_pad=%lld",
                  gated ? "gated " : "", static_cast<long long>(m), static_cast<long long>(k),
                  group, std::string(dtype_name(dtype)).c_str(), scale_layout_name(layout),
                  ue8m0 ? " ue8m0" : "", static_cast<double>(eps),
                  adversarial ? " adversarial" : "", static_cast<long long>(x_row_pad),
                  static_cast<long long>(x_offset), static_cast<long long>(q_row_pad));
    return text;
  }
};

// One row of x: groups of mixed kinds (zero, ordinary magnitudes from 2^-20 to 2^20, huge, tiny)
// and, when adversarial, inf, NaN of both signs and all-NaN groups.
void fill_row(std::mt19937_64& rng, std::vector<float>& row, int group, bool adversarial) {
  const auto K = static_cast<int64_t>(row.size());
  for (int64_t g0 = 0; g0 < K; g0 += group) {
    const int64_t g1 = std::min<int64_t>(g0 + group, K);
    const int kind = static_cast<int>(rng() % (adversarial ? 12 : 8));
    const float magnitude = std::ldexp(1.0f, static_cast<int>(rng() % 41) - 20);
    for (int64_t k = g0; k < g1; ++k) {
      float v = uniform(rng, -1.0f, 1.0f);
      switch (kind) {
        case 0:
          v = 0.0f;
          break;
        case 1:
          v *= 1e30f;
          break;
        case 2:
          v *= 1e-38f;
          break;
        case 8:
          v = std::numeric_limits<float>::quiet_NaN();
          break;
        default:
          v *= magnitude;
          break;
      }
      row[static_cast<size_t>(k)] = v;
    }
    if (kind == 9) row[static_cast<size_t>(g0)] = std::numeric_limits<float>::infinity();
    if (kind == 10) row[static_cast<size_t>(g1 - 1)] = std::nanf("");
    if (kind == 11) row[static_cast<size_t>((g0 + g1) / 2)] = -std::nanf("");
  }
}

// The problem for views of x, q and scales: through the front end when K is a multiple of the
// group, else built as w8a8_block_fp8_linear builds it (partial last group).
GroupQuantProblem quant_problem(const TensorView& x, const TensorView& q, const TensorView& scales,
                                const GroupQuantConfig& c, void* stream) {
  OpOptions options;
  options.stream = stream;
  if (x.size(1) % c.group_size == 0)
    return make_group_quant_problem("test", x, q, scales, c, options);
  GroupQuantProblem p;
  p.x = x;
  p.q = q;
  p.scales = scales;
  p.rows = x.size(0);
  p.cols = x.size(1);
  p.groups = fp8::ceil_div(p.cols, c.group_size);
  p.scale_at = scale_addressing(c.layout, p.rows, p.groups);
  p.group_size = c.group_size;
  p.ue8m0 = c.ue8m0;
  p.eps = c.eps;
  p.stream = stream;
  return p;
}

struct QuantTwins {
  Twin x, q, scales;
  GroupQuantConfig config;
};

QuantTwins make_quant_twins(const QuantCase& c, const std::vector<float>& values) {
  QuantTwins t;
  const int64_t cols = c.x_cols();
  t.x = Twin(c.dtype, dense(c.m, cols, c.x_row_pad, c.x_offset));
  for (int64_t m = 0; m < c.m; ++m)
    for (int64_t k = 0; k < cols; ++k) t.x.set(m, k, values[static_cast<size_t>(m * cols + k)]);
  t.q = Twin(DType::f8e4m3, dense(c.m, c.k, c.q_row_pad));
  t.config.group_size = c.group;
  t.config.ue8m0 = c.ue8m0;
  t.config.layout = c.layout;
  t.config.eps = c.eps;
  const ScaleStorage s = group_quant_scale_storage(c.m, c.k, t.config);
  t.scales = Twin(s.dtype, dense(s.shape[0], s.shape[1]));
  t.x.upload();
  t.q.upload();
  t.scales.upload();
  return t;
}

// Whole storages equal: e4m3 NaNs of either sign match; the padding must still be poison in both.
int64_t q_mismatches(const Tensor& expected, const Tensor& got, std::string& first) {
  int64_t count = 0;
  const auto* e = static_cast<const uint8_t*>(expected.data());
  const auto* g = static_cast<const uint8_t*>(got.data());
  for (int64_t i = 0; i < static_cast<int64_t>(expected.nbytes()); ++i) {
    if (same_e4m3(e[i], g[i])) continue;
    if (count++ == 0) {
      char text[96];
      std::snprintf(text, sizeof text, "byte %lld: expected 0x%02x, got 0x%02x",
                    static_cast<long long>(i), e[i], g[i]);
      first = text;
    }
  }
  return count;
}

// Runs the case on the GPU and compares with the reference; returns whether it passed.
// Gated cases: silu_and_mul_group_quant_fp8, whose GPU kernel computes the reference's f32
// activations (silu_math.h), so the same bytes and scales exactly.
bool check_quant(const QuantCase& c, uint64_t seed, cudaStream_t stream) {
  std::mt19937_64 rng(seed);
  const int64_t cols = c.x_cols();
  std::vector<float> values(static_cast<size_t>(c.m * cols));
  std::vector<float> row(static_cast<size_t>(cols));
  for (int64_t m = 0; m < c.m; ++m) {
    fill_row(rng, row, c.group, c.adversarial);
    std::copy(row.begin(), row.end(), values.begin() + m * cols);
  }
  QuantTwins t = make_quant_twins(c, values);
  const auto problem = [&](const TensorView& x, const TensorView& q, const TensorView& scales,
                           cudaStream_t on) {
    if (!c.gated) return quant_problem(x, q, scales, t.config, on);
    OpOptions options;
    options.stream = on;
    return make_group_quant_problem("test", x, q, scales, t.config, options, true);
  };
  reference::per_token_group_quant_fp8(
      problem(t.x.host_view(), t.q.host_view(), t.scales.host_view(), nullptr));
  const GroupQuantProblem p =
      problem(t.x.device_view(), t.q.device_view(), t.scales.device_view(), stream);
  const std::string why = gpu::group_quant_supports(p);
  EXPECT_EQ(why, "") << c.describe();
  if (!why.empty()) return false;
  gpu::per_token_group_quant_fp8(p);
  gpu::synchronize(stream);
  std::string first;
  const int64_t bad_q = q_mismatches(t.q.host, t.q.download(), first);
  const Tensor scales = t.scales.download();
  const bool scales_equal = std::memcmp(scales.data(), t.scales.host.data(), scales.nbytes()) == 0;
  EXPECT_EQ(bad_q, 0) << c.describe() << " seed " << seed << ": " << first;
  EXPECT_TRUE(scales_equal) << c.describe() << " seed " << seed << ": scale storage differs";
  return bad_q == 0 && scales_equal;
}

QuantCase random_quant_case(std::mt19937_64& rng, ScaleLayout layout, int group, DType dtype) {
  QuantCase c;
  c.layout = layout;
  c.group = group;
  c.dtype = dtype;
  c.m = pick<int64_t>(rng, {1, 2, 3, 5, 8, 17, 64, 130});
  c.k = group * (1 + pick_index(rng, chance(rng, 0.8) ? 8 : 40));
  c.ue8m0 = layout == ScaleLayout::packed_ue8m0 || chance(rng, 0.5);
  c.adversarial = chance(rng, 0.4);
  if (chance(rng, 0.2)) c.eps = pick(rng, {1e-4f, 1e-30f, 3.0f});
  switch (rng() % 5) {
    case 0:
      break;
    case 1:
      c.x_row_pad = 8;  // still 16-byte aligned rows for 16-bit x
      break;
    case 2:
      c.x_row_pad = 3;  // unaligned rows: element loads
      break;
    case 3:
      c.x_offset = 1;  // unaligned pointer
      c.q_row_pad = 5;
      break;
    case 4:
      c.x_row_pad = 64;
      c.q_row_pad = 16;
      break;
  }
  return c;
}

TEST(GpuFp8Quant, EveryLayoutGroupSizeAndDtypeMatchesTheReferenceExactly) {
  SKIP_WITHOUT_GPU();
  Stream stream;
  const uint64_t seed = test_seed("EveryLayoutGroupSizeAndDtypeMatchesTheReferenceExactly");
  std::mt19937_64 rng(seed);
  int failures = 0;
  for (int round = 0; round < 3; ++round)
    for (ScaleLayout layout : kLayouts)
      for (int group : kGroupSizes)
        for (DType dtype : kWideTypes) {
          failures +=
              !check_quant(random_quant_case(rng, layout, group, dtype), rng(), stream.get());
          if (failures > 10) FAIL() << "stopping after " << failures << " failing cases";
        }
}

// silu_and_mul_group_quant_fp8 on the GPU (the general kernel loading gate and up halves): x rows
// of 2K elements at aligned and unaligned places.
TEST(GpuFp8Quant, SiluAndMulMatchesTheReferenceExactly) {
  SKIP_WITHOUT_GPU();
  Stream stream;
  const uint64_t seed = test_seed("SiluAndMulMatchesTheReferenceExactly");
  std::mt19937_64 rng(seed);
  int failures = 0;
  // Every layout, group size and dtype twice: a random case (aligned or not, partial units), and
  // rows of whole units, aligned, with adversarial values (the unchecked kernels: one pass, or 2
  // and 4 for packed words of groups of 128 and 256).
  for (ScaleLayout layout : kLayouts)
    for (int group : kGroupSizes)
      for (DType dtype : kWideTypes) {
        QuantCase random = random_quant_case(rng, layout, group, dtype);
        random.m = std::min<int64_t>(random.m, 17);
        QuantCase whole;
        whole.layout = layout;
        whole.group = group;
        whole.dtype = dtype;
        whole.ue8m0 = layout == ScaleLayout::packed_ue8m0 || chance(rng, 0.5);
        whole.m = pick<int64_t>(rng, {1, 3, 17, 64});
        whole.k = pick<int64_t>(rng, {1024, 2048});
        whole.x_row_pad = pick<int64_t>(rng, {0, 8});
        whole.adversarial = true;
        for (QuantCase& c : {std::ref(random), std::ref(whole)}) {
          c.gated = true;
          failures += !check_quant(c, rng(), stream.get());
        }
        if (failures > 10) FAIL() << "stopping after " << failures << " failing cases";
      }
  // The experts' widths: Qwen3-30B (768), Qwen3-235B (1536), DeepSeek-V3 (2048), decode and more
  // (3000 rows: warps walk several units).
  for (int64_t k : {768, 1536, 2048})
    for (int64_t m : {1, 4, 64, 3000}) {
      QuantCase c;
      c.m = m;
      c.k = k;
      c.gated = true;
      failures += !check_quant(c, rng(), stream.get());
    }
  EXPECT_EQ(failures, 0);
}

// The masked layout through gpu.masked (one launch, the counts read on the device) and
// gpu.per_group (one gated call per group, every row): each group's rows below its count have the
// reference's bytes and logical scales, e4m3 NaNs of either sign alike (a group with an inf: inf /
// inf); gpu.masked writes nothing of the other rows (q and scales keep their poison). Every scale
// layout; K = 768 (the unchecked kernels) and 384 (rows of partial units: the checked one).
TEST(GpuFp8Quant, SiluAndMulMaskedMatchesTheReferenceOnEachGroupsRows) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(test_seed("SiluAndMulMaskedMatchesTheReferenceOnEachGroupsRows"));
  const std::vector<int32_t> counts = {4, 0, 1, 7, -3, 2};
  const int64_t G = static_cast<int64_t>(counts.size()), M = 4;
  constexpr uint8_t kPoison = 0xA5;
  for (const char* implementation : {"gpu.masked", "gpu.per_group"})
    for (ScaleLayout layout : kLayouts)
      for (const int64_t K : {int64_t{768}, int64_t{384}}) {
        SCOPED_TRACE(std::string(implementation) + " " + scale_layout_name(layout) +
                     " K=" + std::to_string(K));
        GroupQuantConfig config;
        config.layout = layout;
        config.ue8m0 = layout == ScaleLayout::packed_ue8m0 || chance(rng, 0.5);
        const ScaleStorage s = group_quant_scale_storage(M, K, config);
        Tensor x = Tensor::empty(DType::bf16, {G, M, 2 * K});
        std::vector<float> row(static_cast<size_t>(2 * K));
        for (int64_t r = 0; r < G * M; ++r) {
          fill_row(rng, row, 128, chance(rng, 0.3));
          for (int64_t k = 0; k < 2 * K; ++k)
            store_from_f32(x.data(), DType::bf16, r * 2 * K + k, row[static_cast<size_t>(k)]);
        }
        Tensor counts_host = Tensor::empty(DType::i32, {G});
        std::memcpy(counts_host.data(), counts.data(), counts.size() * 4);
        Tensor q_ref = Tensor::empty(DType::f8e4m3, {G, M, K});
        Tensor s_ref = Tensor::empty(s.dtype, {G, s.shape[0], s.shape[1]});
        silu_and_mul_group_quant_fp8_masked(x, counts_host, q_ref, s_ref, config,
                                            OpOptions{Backend::reference});
        Tensor q_poison = Tensor::empty(DType::f8e4m3, {G, M, K});
        Tensor s_poison = Tensor::empty(s.dtype, {G, s.shape[0], s.shape[1]});
        std::memset(q_poison.data(), kPoison, q_poison.nbytes());
        std::memset(s_poison.data(), kPoison, s_poison.nbytes());
        const Tensor x_gpu = Tensor::copy_of(x, Device::gpu());
        const Tensor counts_gpu = Tensor::copy_of(counts_host, Device::gpu());
        Tensor q_gpu = Tensor::copy_of(q_poison, Device::gpu());
        Tensor s_gpu = Tensor::copy_of(s_poison, Device::gpu());
        OpOptions options{Backend::gpu};
        options.implementation = implementation;
        silu_and_mul_group_quant_fp8_masked(x_gpu, counts_gpu, q_gpu, s_gpu, config, options);
        const Tensor q = Tensor::copy_of(q_gpu, Device::cpu()),
                     sc = Tensor::copy_of(s_gpu, Device::cpu());
        const ScaleAddressing at = scale_addressing(layout, M, K / 128);
        const size_t plane = static_cast<size_t>(s.shape[0] * s.shape[1]) * 4;
        const bool untouched = std::string(implementation) == "gpu.masked";
        for (int64_t g = 0; g < G; ++g) {
          const int64_t rows = std::clamp<int64_t>(counts[static_cast<size_t>(g)], 0, M);
          const uint8_t *got = q.data_as<uint8_t>() + g * M * K,
                        *want = q_ref.data_as<uint8_t>() + g * M * K;
          for (int64_t i = 0; i < (untouched ? M : rows) * K; ++i) {
            const bool ok = i < rows * K ? same_e4m3(got[i], want[i]) : got[i] == kPoison;
            if (!ok) {
              ADD_FAILURE() << "group " << g << " row " << i / K << " column " << i % K << ": byte "
                            << int{got[i]} << ", expected "
                            << int{i < rows * K ? want[i] : kPoison};
              break;
            }
          }
          const uint8_t* got_scales = sc.data_as<uint8_t>() + g * plane;
          for (int64_t m = 0; m < (untouched ? M : rows); ++m)
            for (int64_t grp = 0; grp < K / 128; ++grp) {
              if (m < rows) {
                EXPECT_EQ(read_scale(got_scales, at, m, grp),
                          read_scale(s_ref.data_as<uint8_t>() + g * plane, at, m, grp))
                    << "group " << g << " row " << m;
              } else {
                uint32_t word;
                std::memcpy(&word, got_scales + at.offset(m, grp) * 4, 4);
                EXPECT_EQ(word, 0xA5A5A5A5u) << "group " << g << " row " << m << " written";
              }
            }
        }
      }
}

// x [G, M, 2K] bf16 of N(0, 2) values, for the masked layout's tests.
Tensor random_masked_x(std::mt19937_64& rng, int64_t G, int64_t M, int64_t K) {
  Tensor x = Tensor::empty(DType::bf16, {G, M, 2 * K});
  std::normal_distribution<float> value(0.0f, 2.0f);
  for (int64_t i = 0; i < x.numel(); ++i) store_from_f32(x.data(), DType::bf16, i, value(rng));
  return x;
}

// The masked layout's bytes q and row-major f32 scales sc (copied back from the GPU, poisoned with
// kPoison before the call) against the reference's: on group g's first rows[g] rows every byte
// (e4m3 NaNs of either sign alike) and scale that differs, past them every byte and scale word
// that is not the poison (written).
int64_t masked_mismatches(const Tensor& q, const Tensor& sc, const Tensor& q_ref,
                          const Tensor& s_ref, const std::vector<int64_t>& rows, int64_t M,
                          int64_t K) {
  int64_t wrong = 0;
  for (int64_t g = 0; g < static_cast<int64_t>(rows.size()); ++g) {
    const int64_t used = rows[static_cast<size_t>(g)];
    for (int64_t i = 0; i < M * K; ++i) {
      const uint8_t got = q.data_as<uint8_t>()[g * M * K + i];
      wrong +=
          i < used * K ? !same_e4m3(got, q_ref.data_as<uint8_t>()[g * M * K + i]) : got != kPoison;
    }
    for (int64_t i = 0; i < M * K / 128; ++i) {
      uint32_t got, want;
      std::memcpy(&got, sc.data_as<uint8_t>() + (g * M * K / 128 + i) * 4, 4);
      std::memcpy(&want, s_ref.data_as<uint8_t>() + (g * M * K / 128 + i) * 4, 4);
      wrong += i < used * K / 128 ? got != want : got != 0xA5A5A5A5u;
    }
  }
  return wrong;
}

// Each group's rows under `counts`: min(max(count, 0), M).
std::vector<int64_t> rows_under(const std::vector<int32_t>& counts, int64_t M) {
  std::vector<int64_t> rows;
  for (const int32_t c : counts) rows.push_back(std::clamp<int64_t>(c, 0, M));
  return rows;
}

// silu_and_mul_group_quant_fp8_masked of x [G, M, 2K] through gpu.masked (row-major scales) against
// the reference: masked_mismatches of the result. With `stale`, masked_m holds those counts until
// the kernel before (let overlap the quantization) writes `counts`.
int64_t gpu_masked_quant_mismatches(const Tensor& x, const std::vector<int32_t>& counts,
                                    const std::vector<int32_t>& stale = {}) {
  const int64_t G = x.size(0), M = x.size(1), K = x.size(2) / 2;
  Tensor counts_host = Tensor::empty(DType::i32, {G}), stale_host = Tensor::empty(DType::i32, {G});
  std::memcpy(counts_host.data(), counts.data(), counts.size() * 4);
  std::memcpy(stale_host.data(), (stale.empty() ? counts : stale).data(), counts.size() * 4);
  GroupQuantConfig config;
  Tensor q_ref = Tensor::empty(DType::f8e4m3, {G, M, K});
  Tensor s_ref = Tensor::empty(DType::f32, {G, M, K / 128});
  silu_and_mul_group_quant_fp8_masked(x, counts_host, q_ref, s_ref, config,
                                      OpOptions{Backend::reference});
  const Tensor x_gpu = Tensor::copy_of(x, Device::gpu());
  const Tensor counts_gpu = Tensor::copy_of(counts_host, Device::gpu());
  Tensor masked_m = Tensor::copy_of(stale_host, Device::gpu());
  Tensor q_gpu = Tensor::empty(DType::f8e4m3, {G, M, K}, Device::gpu());
  Tensor s_gpu = Tensor::empty(DType::f32, {G, M, K / 128}, Device::gpu());
  MOEKIT_GPU_CHECK(cudaMemset(q_gpu.data(), kPoison, q_gpu.nbytes()));
  MOEKIT_GPU_CHECK(cudaMemset(s_gpu.data(), kPoison, s_gpu.nbytes()));
  MOEKIT_GPU_CHECK(cudaDeviceSynchronize());
  const Stream stream;
  OpOptions options{Backend::gpu};
  options.implementation = "gpu.masked";
  options.stream = stream.get();
  if (!stale.empty())
    gpu_test::write_counts_late<<<1, 128, 0, stream.get()>>>(masked_m.data_as<int32_t>(),
                                                             counts_gpu.data_as<const int32_t>(),
                                                             static_cast<int>(G), 200000);
  silu_and_mul_group_quant_fp8_masked(x_gpu, masked_m, q_gpu, s_gpu, config, options);
  MOEKIT_GPU_CHECK(cudaStreamSynchronize(stream.get()));
  return masked_mismatches(Tensor::copy_of(q_gpu, Device::cpu()),
                           Tensor::copy_of(s_gpu, Device::cpu()), q_ref, s_ref,
                           rows_under(counts, M), M, K);
}

// Groups of many rows: more live units than the grid has warps, so each warp walks several,
// looking up each one's row past empty and partly filled groups (counts at, over and under the
// capacity). gpu.masked against the reference on each group's rows; K = 768 (unchecked kernel) and
// 384 (checked).
TEST(GpuFp8Quant, SiluAndMulMaskedWarpsWalkSeveralRows) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(test_seed("SiluAndMulMaskedWarpsWalkSeveralRows"));
  const std::vector<int32_t> counts = {1200, 0, 999, 1, 5000, -1, 517};
  for (const int64_t K : {int64_t{768}, int64_t{384}}) {
    SCOPED_TRACE("K=" + std::to_string(K));
    const Tensor x = random_masked_x(rng, static_cast<int64_t>(counts.size()), 1200, K);
    EXPECT_EQ(gpu_masked_quant_mismatches(x, counts), 0);
  }
}

// The counts are the previous kernel's output: the kernel before writes them late, after letting
// the quantization start while masked_m still holds stale counts. The rows under the new counts
// have the reference's bytes and scales, and nothing else is written (the stale counts name other
// groups and more rows). Three stale sets: other groups, more rows in the same groups, and the new
// counts themselves (written late all the same). Capacities of 8 (every row's x loaded) and 200
// (the live rows walked).
TEST(GpuFp8Quant, SiluAndMulMaskedUsesTheCountsTheKernelBeforeWrites) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(test_seed("SiluAndMulMaskedUsesTheCountsTheKernelBeforeWrites"));
  const std::vector<int32_t> counts = {1, 0, 0, 3, 0, 1, 0, 0, 2, 0, 0, 1};
  const std::vector<std::vector<int32_t>> stale_sets = {
      {0, 8, 1, 0, 2, 0, 0, 8, 0, 1, 5, 0}, {8, 0, 0, 8, 0, 8, 0, 0, 8, 0, 0, 8}, counts};
  for (const int64_t M : {int64_t{8}, int64_t{200}})
    for (const std::vector<int32_t>& stale : stale_sets) {
      SCOPED_TRACE("M=" + std::to_string(M) + ", stale counts set " +
                   std::to_string(&stale - stale_sets.data()));
      const Tensor x = random_masked_x(rng, static_cast<int64_t>(counts.size()), M, 768);
      EXPECT_EQ(gpu_masked_quant_mismatches(x, counts, stale), 0);
    }
}

// Many groups (a thousand experts' planes of 2 rows, counts 0 to 3): gpu.masked against the
// reference on each group's rows, nothing else written (row-major scales).
TEST(GpuFp8Quant, SiluAndMulMaskedOverManyGroups) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(test_seed("SiluAndMulMaskedOverManyGroups"));
  for (const int64_t G : {int64_t{1024}, int64_t{1030}}) {
    SCOPED_TRACE("G=" + std::to_string(G));
    std::vector<int32_t> counts(static_cast<size_t>(G));
    for (int32_t& c : counts) c = static_cast<int32_t>(rng() % 4);
    EXPECT_EQ(gpu_masked_quant_mismatches(random_masked_x(rng, G, 2, 768), counts), 0);
  }
}

TEST(GpuFp8Quant, PartialLastGroupAsTheLinearLayerAsks) {
  SKIP_WITHOUT_GPU();
  Stream stream;
  const uint64_t seed = test_seed("PartialLastGroupAsTheLinearLayerAsks");
  std::mt19937_64 rng(seed);
  for (ScaleLayout layout : kLayouts) {
    for (int group : kGroupSizes) {
      for (int64_t k : {int64_t{1}, int64_t{group - 1}, int64_t{group + 7}, 3 * int64_t{group} + 9,
                        int64_t{300}, int64_t{3884}}) {
        if (k % group == 0) continue;
        QuantCase c = random_quant_case(rng, layout, group, pick(rng, {DType::f32, DType::bf16}));
        c.k = k;
        check_quant(c, rng(), stream.get());
      }
    }
  }
}

// With one element of 448 per group the scale is exactly 1, so q = e4m3(x): every binade's
// rounding-deciding mantissas (ties, their neighbours), subnormals and random bits, both signs.
TEST(GpuFp8Quant, EncoderMatchesTheScalarConversionOnEveryBinade) {
  SKIP_WITHOUT_GPU();
  Stream stream;
  const uint64_t seed = test_seed("EncoderMatchesTheScalarConversionOnEveryBinade");
  std::mt19937_64 rng(seed);
  std::vector<float> probes;
  for (uint32_t sign = 0; sign < 2; ++sign) {
    for (uint32_t exponent = 0; exponent <= 127 + 8; ++exponent) {
      for (uint32_t top = 0; top < 16; ++top) {
        const uint32_t base = sign << 31 | exponent << 23 | top << 19;
        for (uint32_t low : {0u, 1u, 0x7ffffu, 0x40000u, static_cast<uint32_t>(rng() & 0x7ffff)})
          probes.push_back(std::bit_cast<float>(base | low));
      }
      if (exponent >= 110 && exponent <= 121)
        for (uint32_t m = 0; m < 4096; m += 3)
          probes.push_back(std::bit_cast<float>(sign << 31 | exponent << 23 | m << 11));
    }
  }
  for (int i = 0; i < 20000; ++i) probes.push_back(uniform(rng, -448.0f, 448.0f));
  std::vector<float> values;
  for (size_t i = 0; i < probes.size(); ++i) {
    if (!(std::fabs(probes[i]) <= 448.0f)) continue;
    if (values.size() % 16 == 0) values.push_back(448.0f);
    values.push_back(probes[i]);
  }
  while (values.size() % 1024 != 0) values.push_back(values.size() % 16 == 0 ? 448.0f : 0.0f);
  QuantCase c;
  c.dtype = DType::f32;
  c.group = 16;
  c.k = 1024;
  c.m = static_cast<int64_t>(values.size()) / c.k;
  QuantTwins t = make_quant_twins(c, values);
  const GroupQuantProblem p = quant_problem(t.x.device_view(), t.q.device_view(),
                                            t.scales.device_view(), t.config, stream.get());
  gpu::per_token_group_quant_fp8(p);
  gpu::synchronize(stream.get());
  const Tensor q = t.q.download();
  int64_t mismatches = 0;
  for (size_t i = 0; i < values.size(); ++i) {
    const uint8_t got = static_cast<const uint8_t*>(q.data())[i];
    const uint8_t expected = f32_to_f8e4m3(values[i]);
    if (got != expected && ++mismatches <= 5)
      ADD_FAILURE() << "bits 0x" << std::hex << std::bit_cast<uint32_t>(values[i]) << " -> 0x"
                    << int{got} << ", expected 0x" << int{expected};
  }
  EXPECT_EQ(mismatches, 0);
  const Tensor scales = t.scales.download();
  for (int64_t i = 0; i < scales.numel(); ++i)
    ASSERT_EQ(static_cast<const float*>(scales.data())[i], 1.0f) << "group " << i;
}

// x / scale must be the correctly rounded f32 quotient: values placed within a few ulps of the
// points where x / scale meets an e4m3 rounding tie (where a quotient one ulp off changes the
// byte), for scales from 2^-75 to 2^75 (inside and outside the kernel's fast division range), with
// tiny and subnormal values near its 2^-80 cut as well.
TEST(GpuFp8Quant, DivisionIsExactNearRoundingTies) {
  SKIP_WITHOUT_GPU();
  Stream stream;
  const uint64_t seed = test_seed("DivisionIsExactNearRoundingTies");
  std::mt19937_64 rng(seed);
  std::vector<float> magnitudes;  // the finite positive e4m3 values, ascending
  for (int b = 1; b < 0x7f; ++b) magnitudes.push_back(f8e4m3_to_f32(static_cast<uint8_t>(b)));
  const int64_t M = 2048, K = 1024;  // groups of 16: the first element sets the scale
  std::vector<float> values(static_cast<size_t>(M * K));
  for (int64_t g0 = 0; g0 < M * K; g0 += 16) {
    const float amax = std::ldexp(uniform(rng, 1.0f, 2.0f), static_cast<int>(rng() % 151) - 75 + 8);
    const float scale = amax / 448.0f;  // as the kernel and the reference compute it
    values[static_cast<size_t>(g0)] = chance(rng, 0.5) ? amax : -amax;
    for (int64_t i = 1; i < 16; ++i) {
      float x;
      if (chance(rng, 0.1)) {  // around the fast path's 2^-80 cut, and subnormal
        x = std::ldexp(uniform(rng, 1.0f, 2.0f), static_cast<int>(rng() % 145) - 150);
      } else {
        const size_t k = static_cast<size_t>(rng() % (magnitudes.size() - 1));
        const float tie = 0.5f * (magnitudes[k] + magnitudes[k + 1]);  // exact in f32
        x = tie * scale;
        for (int steps = static_cast<int>(rng() % 5) - 2; steps != 0; steps += steps > 0 ? -1 : 1)
          x = std::nextafter(x, steps > 0 ? INFINITY : 0.0f);
      }
      if (!(std::fabs(x) <= amax)) x = 0.0f;
      values[static_cast<size_t>(g0 + i)] = chance(rng, 0.5) ? x : -x;
    }
  }
  QuantCase c;
  c.dtype = DType::f32;
  c.group = 16;
  c.m = M;
  c.k = K;
  c.eps = 1e-30f;  // keep every amax
  QuantTwins t = make_quant_twins(c, values);
  reference::per_token_group_quant_fp8(
      quant_problem(t.x.host_view(), t.q.host_view(), t.scales.host_view(), t.config, nullptr));
  gpu::per_token_group_quant_fp8(quant_problem(t.x.device_view(), t.q.device_view(),
                                               t.scales.device_view(), t.config, stream.get()));
  gpu::synchronize(stream.get());
  std::string first;
  EXPECT_EQ(q_mismatches(t.q.host, t.q.download(), first), 0) << first;
  const Tensor scales = t.scales.download();
  EXPECT_EQ(std::memcmp(scales.data(), t.scales.host.data(), scales.nbytes()), 0);
}

TEST(GpuFp8Quant, LargeRowsUseEveryUnit) {
  SKIP_WITHOUT_GPU();
  Stream stream;
  const uint64_t seed = test_seed("LargeRowsUseEveryUnit");
  std::mt19937_64 rng(seed);
  // More units than the grid has warps (grid-stride loop), model K, column-major TMA and packed.
  for (ScaleLayout layout : {ScaleLayout::column_major_tma, ScaleLayout::packed_ue8m0}) {
    QuantCase c;
    c.m = 5001;
    c.k = 7168;
    c.layout = layout;
    c.ue8m0 = true;
    c.adversarial = true;
    check_quant(c, rng(), stream.get());
  }
}

// A case for the streaming kernel: m x k in `layout`, `group`, `dtype`, UE8M0 scales where packed
// (else at random), adversarial groups and eps at random, and 16-byte aligned padded rows or not.
QuantCase streaming_case(std::mt19937_64& rng, ScaleLayout layout, int group, DType dtype,
                         int64_t m, int64_t k) {
  QuantCase c;
  c.layout = layout;
  c.group = group;
  c.dtype = dtype;
  c.m = m;
  c.k = k;
  c.ue8m0 = layout == ScaleLayout::packed_ue8m0 || chance(rng, 0.5);
  c.adversarial = chance(rng, 0.6);
  if (chance(rng, 0.3)) c.eps = pick(rng, {1e-4f, 1e-30f, 3.0f});
  if (chance(rng, 0.5)) {
    c.x_row_pad = 64;
    c.q_row_pad = 16;
  }
  return c;
}

// Rows of whole 1024-element units with 16-byte aligned x and q rows take the streaming kernel:
// every layout, group size and dtype there, with adversarial groups (inf scales, all-zero and
// all-NaN groups, huge and tiny scales outside the fast division's range) and padded rows.
TEST(GpuFp8Quant, WholeUnitRowsMatchTheReferenceExactly) {
  SKIP_WITHOUT_GPU();
  Stream stream;
  const uint64_t seed = test_seed("WholeUnitRowsMatchTheReferenceExactly");
  std::mt19937_64 rng(seed);
  int failures = 0;
  for (ScaleLayout layout : kLayouts) {
    for (int group : kGroupSizes) {
      for (DType dtype : kWideTypes) {
        // More units than the grid has warps (7 a row: warps cross row ends).
        const bool walk = dtype == DType::bf16 && (group == 16 || group == 128);
        const int64_t m = walk ? 700 : pick<int64_t>(rng, {1, 3, 64, 333});
        const int64_t k = walk ? 7168 : 1024 * pick<int64_t>(rng, {1, 3, 7});
        const QuantCase c = streaming_case(rng, layout, group, dtype, m, k);
        failures += !check_quant(c, rng(), stream.get());
        if (failures > 10) FAIL() << "stopping after " << failures << " failing cases";
      }
    }
  }
}

// Rows of whole 512- or 256-element units but not of 1024 (K = 768 and 1536: the inputs of
// Qwen3's expert down projections) take the streaming kernel with 2 or 1 chunks a lane; packed
// scales need 4 whole groups a unit, else (and for rows of no whole unit) the general kernel.
TEST(GpuFp8Quant, SmallerUnitRowsMatchTheReferenceExactly) {
  SKIP_WITHOUT_GPU();
  Stream stream;
  const uint64_t seed = test_seed("SmallerUnitRowsMatchTheReferenceExactly");
  std::mt19937_64 rng(seed);
  int failures = 0;
  for (int64_t k :
       {int64_t{256}, int64_t{512}, int64_t{768}, int64_t{1536}, int64_t{2560}, int64_t{2816}}) {
    for (ScaleLayout layout : kLayouts) {
      for (int group : kGroupSizes) {
        for (DType dtype : kWideTypes) {
          // More units than the grid has warps (warps cross row ends), for two model shapes.
          const bool walk = dtype == DType::bf16 && group == 128 && (k == 768 || k == 1536);
          const int64_t m = walk ? 3001 : pick<int64_t>(rng, {1, 3, 64, 333});
          const QuantCase c = streaming_case(rng, layout, group, dtype, m, k);
          failures += !check_quant(c, rng(), stream.get());
          if (failures > 10) FAIL() << "stopping after " << failures << " failing cases";
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// block_quantize_weight.

struct WeightCase {
  int64_t n, k;
  DType dtype;
  int64_t w_row_pad = 0, w_offset = 0, weight_row_pad = 0;
  int scale_form = 0;  // 0 contiguous, 1 transposed storage, 2 padded rows
  bool adversarial = false;
  std::string describe() const {
    return "N=" + std::to_string(n) + " K=" + std::to_string(k) +
           " w=" + std::string(dtype_name(dtype)) + " w_pad=" + std::to_string(w_row_pad) +
           " w_offset=" + std::to_string(w_offset) +
           " weight_pad=" + std::to_string(weight_row_pad) +
           " scale_form=" + std::to_string(scale_form) + (adversarial ? " adversarial" : "");
  }
};

bool check_weight_quant(const WeightCase& c, uint64_t seed, cudaStream_t stream) {
  std::mt19937_64 rng(seed);
  Twin w(c.dtype, dense(c.n, c.k, c.w_row_pad, c.w_offset));
  for (int64_t n = 0; n < c.n; ++n) {
    const float magnitude = std::ldexp(1.0f, static_cast<int>(rng() % 21) - 15);
    for (int64_t k = 0; k < c.k; ++k) w.set(n, k, uniform(rng, -1, 1) * magnitude);
  }
  if (c.adversarial) {  // a zero block (the floor), a NaN (ignored by amax), an inf (scale inf)
    for (int64_t n = 0; n < std::min<int64_t>(c.n, 128); ++n)
      for (int64_t k = 0; k < std::min<int64_t>(c.k, 128); ++k) w.set(n, k, 0.0f);
    w.set(c.n - 1, c.k - 1, std::nanf(""));
    if (c.n > 128) w.set(128, 0, std::numeric_limits<float>::infinity());
  }
  Twin weight(DType::f8e4m3, dense(c.n, c.k, c.weight_row_pad));
  const int64_t nb = fp8::ceil_div(c.n, 128), kb = fp8::ceil_div(c.k, 128);
  Geometry sg = dense(nb, kb);
  if (c.scale_form == 1) sg = {0, nb, kb, 1, nb};
  if (c.scale_form == 2) sg = dense(nb, kb, 3);
  Twin scales(DType::f32, sg);
  w.upload();
  weight.upload();
  scales.upload();
  reference::block_quantize_weight(make_block_quantize_weight_problem(
      "test", w.host_view(), weight.host_view(), scales.host_view(), {}));
  OpOptions options;
  options.stream = stream;
  const BlockQuantizeWeightProblem p = make_block_quantize_weight_problem(
      "test", w.device_view(), weight.device_view(), scales.device_view(), options);
  const std::string why = gpu::block_quantize_weight_supports(p);
  EXPECT_EQ(why, "") << c.describe();
  if (!why.empty()) return false;
  gpu::block_quantize_weight(p);
  gpu::synchronize(stream);
  std::string first;
  const int64_t bad = q_mismatches(weight.host, weight.download(), first);
  const Tensor s = scales.download();
  const bool scales_equal = std::memcmp(s.data(), scales.host.data(), s.nbytes()) == 0;
  EXPECT_EQ(bad, 0) << c.describe() << " seed " << seed << ": " << first;
  EXPECT_TRUE(scales_equal) << c.describe() << " seed " << seed << ": weight_scale_inv differs";
  return bad == 0 && scales_equal;
}

TEST(GpuFp8Weight, BlockQuantizeWeightMatchesTheReferenceExactly) {
  SKIP_WITHOUT_GPU();
  Stream stream;
  const uint64_t seed = test_seed("BlockQuantizeWeightMatchesTheReferenceExactly");
  std::mt19937_64 rng(seed);
  int failures = 0;
  for (int i = 0; i < 40 && failures < 10; ++i) {
    WeightCase c{pick<int64_t>(rng, {1, 7, 127, 128, 129, 300, 513}),
                 pick<int64_t>(rng, {1, 16, 100, 128, 200, 384, 777}),
                 kWideTypes[pick_index(rng, 3)]};
    c.w_row_pad = pick<int64_t>(rng, {0, 0, 8, 3});
    c.w_offset = pick<int64_t>(rng, {0, 0, 1});
    c.weight_row_pad = pick<int64_t>(rng, {0, 0, 16, 5});
    c.scale_form = static_cast<int>(rng() % 3);
    c.adversarial = chance(rng, 0.3);
    failures += !check_weight_quant(c, rng(), stream.get());
  }
}

// ---------------------------------------------------------------------------------------------
// GEMM.

enum class GemmKernel { dispatch, cuda_cores, matrix_units };
constexpr GemmKernel kGemmKernels[] = {GemmKernel::dispatch, GemmKernel::cuda_cores,
                                       GemmKernel::matrix_units};
const char* kernel_name(GemmKernel k) {
  return k == GemmKernel::dispatch     ? "dispatch"
         : k == GemmKernel::cuda_cores ? "cuda_cores"
                                       : "matrix_units";
}

void run_gemm(const BlockGemmProblem& p, GemmKernel kernel) {
  switch (kernel) {
    case GemmKernel::dispatch:
      gpu::block_fp8_gemm(p);
      break;
    case GemmKernel::cuda_cores:
      gpu::block_fp8_gemm_cuda_cores(p);
      break;
    case GemmKernel::matrix_units:
      gpu::block_fp8_gemm_matrix_units(p);
      break;
  }
}

struct GemmCase {
  int64_t m, n, k;
  DType out = DType::f32;
  bool bias = false;
  DType bias_dtype = DType::f32;
  int64_t bias_stride = 1;
  ScaleLayout layout = ScaleLayout::row_major;
  DType b_scale_dtype = DType::f32;
  int b_scale_form = 0;  // 0 contiguous, 1 transposed storage, 2 padded rows
  int64_t a_row_pad = 0, a_offset = 0, b_row_pad = 0, b_offset = 0, out_row_pad = 0;
  std::string describe() const {
    char text[320];
    std::snprintf(text, sizeof text,
                  "M=%lld N=%lld K=%lld out=%s bias=%s/%lld a_scales=%s b_scales=%s/%d "
                  "a_pad=%lld a_offset=%lld b_pad=%lld b_offset=%lld out_pad=%lld",
                  static_cast<long long>(m), static_cast<long long>(n), static_cast<long long>(k),
                  std::string(dtype_name(out)).c_str(),
                  bias ? std::string(dtype_name(bias_dtype)).c_str() : "none",
                  static_cast<long long>(bias_stride), scale_layout_name(layout),
                  std::string(dtype_name(b_scale_dtype)).c_str(), b_scale_form,
                  static_cast<long long>(a_row_pad), static_cast<long long>(a_offset),
                  static_cast<long long>(b_row_pad), static_cast<long long>(b_offset),
                  static_cast<long long>(out_row_pad));
    return text;
  }
};

// A case's inputs (host and device) and its poisoned output.
struct GemmTwins {
  Twin a, a_scales, b, b_scales, out;
  Tensor bias_host, bias_device;
  int64_t bias_stride = 1;
  DType bias_dtype = DType::f32;
  bool has_bias = false;

  std::optional<TensorView> bias_on(const Tensor& storage, int64_t n) const {
    if (!has_bias) return std::nullopt;
    return strided_vector(storage, bias_dtype, n, bias_stride);
  }
};

void fill_a_scales(Twin& t, std::mt19937_64& rng, int64_t M, int64_t G, ScaleLayout layout) {
  const ScaleAddressing at = scale_addressing(layout, M, G);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < G; ++g) {
      if (layout == ScaleLayout::packed_ue8m0) {
        auto* words = static_cast<uint32_t*>(t.host.data());
        if (g % 4 == 0) words[at.offset(m, g)] = 0;  // bytes of missing groups are 0
        static_cast<uint8_t*>(t.host.data())[at.offset(m, g) * 4 + g % 4] =
            static_cast<uint8_t>(127 - 5 - rng() % 8);
      } else {
        static_cast<float*>(t.host.data())[at.offset(m, g)] = uniform(rng, 0.0f, 0.01f);
      }
    }
  }
}

// Random e4m3 bytes of finite values in [-448, 448].
void fill_e4m3(Twin& t, std::mt19937_64& rng) {
  for (int64_t r = 0; r < t.at.rows; ++r)
    for (int64_t c = 0; c < t.at.cols; ++c)
      static_cast<uint8_t*>(t.host.data())[t.index(r, c)] =
          f32_to_f8e4m3(uniform(rng, -448.0f, 448.0f));
}

GemmTwins make_gemm_twins(const GemmCase& c, std::mt19937_64& rng) {
  GemmTwins t;
  const int64_t G = fp8::ceil_div(c.k, 128), NB = fp8::ceil_div(c.n, 128);
  t.a = Twin(DType::f8e4m3, dense(c.m, c.k, c.a_row_pad, c.a_offset));
  fill_e4m3(t.a, rng);
  t.b = Twin(DType::f8e4m3, dense(c.n, c.k, c.b_row_pad, c.b_offset));
  fill_e4m3(t.b, rng);
  GroupQuantConfig config;
  config.layout = c.layout;
  const ScaleStorage s = group_quant_scale_storage(c.m, c.k, config);
  t.a_scales = Twin(s.dtype, dense(s.shape[0], s.shape[1]));
  fill_a_scales(t.a_scales, rng, c.m, G, c.layout);
  Geometry bg = dense(NB, G);
  if (c.b_scale_form == 1) bg = {0, NB, G, 1, NB};
  if (c.b_scale_form == 2) bg = dense(NB, G, 3);
  t.b_scales = Twin(c.b_scale_dtype, bg);
  for (int64_t r = 0; r < NB; ++r)
    for (int64_t g = 0; g < G; ++g) t.b_scales.set(r, g, uniform(rng, 0.0f, 0.01f));
  t.has_bias = c.bias;
  t.bias_dtype = c.bias_dtype;
  t.bias_stride = c.bias_stride;
  t.bias_host = Tensor::empty(c.bias_dtype, {std::max<int64_t>(c.n * c.bias_stride, 1)});
  for (int64_t i = 0; i < t.bias_host.numel(); ++i)
    store_from_f32(t.bias_host.data(), c.bias_dtype, i, uniform(rng, -50.0f, 50.0f));
  t.out = Twin(c.out, dense(c.m, c.n, c.out_row_pad));
  t.a.upload();
  t.b.upload();
  t.a_scales.upload();
  t.b_scales.upload();
  t.out.upload();
  t.bias_device = Tensor::copy_of(t.bias_host, Device::gpu());
  return t;
}

BlockGemmProblem gemm_problem(const GemmTwins& t, ScaleLayout layout, bool on_device,
                              const Tensor& out_storage, void* stream) {
  OpOptions options;
  options.stream = stream;
  auto view = [&](const Twin& twin) { return on_device ? twin.device_view() : twin.host_view(); };
  return make_block_gemm_problem("test", view(t.a), view(t.a_scales), layout, view(t.b),
                                 view(t.b_scales),
                                 t.bias_on(on_device ? t.bias_device : t.bias_host, t.b.at.rows),
                                 t.out.view_on(out_storage), options);
}

// The tolerance of spec/fp8.md: 1e-3 relative mean error, plus the rounding of half outputs.
double gemm_tolerance(DType out) {
  return 1e-3 + (out == DType::bf16 ? 1.0 / 256 : out == DType::f16 ? 1.0 / 2048 : 0.0);
}

struct GemmComparison {
  double relative_error = 0.0;
  int64_t nan_mismatches = 0;
  int64_t padding_written = 0;  // bytes outside [M, N] that are not poison any more
};

GemmComparison compare_gemm(const Twin& out, const Tensor& expected, const Tensor& got) {
  GemmComparison cmp;
  double error = 0.0, magnitude = 0.0;
  for (int64_t m = 0; m < out.at.rows; ++m) {
    for (int64_t n = 0; n < out.at.cols; ++n) {
      const float r = out.get(expected, m, n), v = out.get(got, m, n);
      if (std::isnan(r) != std::isnan(v)) ++cmp.nan_mismatches;
      if (std::isnan(r) || std::isnan(v)) continue;
      error += std::fabs(static_cast<double>(v) - r);
      magnitude += std::fabs(static_cast<double>(r));
    }
  }
  cmp.relative_error = magnitude > 0 ? error / magnitude : error;
  // Every byte of the storage that is not an element of [M, N] must still be poison.
  const size_t esize = dtype_size(out.dtype);
  const auto* bytes = static_cast<const uint8_t*>(got.data());
  for (size_t i = 0; i < got.nbytes(); ++i) {
    const auto element = static_cast<int64_t>(i / esize);
    const int64_t row = element / out.at.row_stride, col = element % out.at.row_stride;
    const bool inside = row < out.at.rows && col < out.at.cols;
    if (!inside && bytes[i] != kPoison) ++cmp.padding_written;
  }
  return cmp;
}

// Runs the case on each kernel against one reference result; returns whether all passed.
bool check_gemm(const GemmCase& c, uint64_t seed, cudaStream_t stream,
                std::initializer_list<GemmKernel> kernels = {
                    GemmKernel::dispatch, GemmKernel::cuda_cores, GemmKernel::matrix_units}) {
  std::mt19937_64 rng(seed);
  GemmTwins t = make_gemm_twins(c, rng);
  Tensor expected = Tensor::copy_of(t.out.host, Device::cpu());
  reference::block_fp8_gemm(gemm_problem(t, c.layout, false, expected, nullptr));
  bool ok = true;
  for (GemmKernel kernel : kernels) {
    const Tensor out = t.out.fresh_device();
    const BlockGemmProblem p = gemm_problem(t, c.layout, true, out, stream);
    EXPECT_EQ(gpu::block_gemm_supports(p), "") << c.describe();
    run_gemm(p, kernel);
    gpu::synchronize(stream);
    const GemmComparison cmp = compare_gemm(t.out, expected, Tensor::copy_of(out, Device::cpu()));
    const bool pass = cmp.nan_mismatches == 0 && cmp.padding_written == 0 &&
                      cmp.relative_error < gemm_tolerance(c.out);
    EXPECT_TRUE(pass) << kernel_name(kernel) << " " << c.describe() << " seed " << seed
                      << ": relative error " << cmp.relative_error << ", " << cmp.nan_mismatches
                      << " NaN mismatches, " << cmp.padding_written
                      << " bytes written outside [M, N]";
    ok = ok && pass;
  }
  return ok;
}

GemmCase random_gemm_case(std::mt19937_64& rng, int64_t m) {
  GemmCase c{m, pick<int64_t>(rng, {1, 5, 16, 64, 127, 128, 129, 200, 300, 513}),
             pick<int64_t>(rng, {1, 15, 16, 100, 128, 129, 300, 640, 1000, 2100})};
  c.out = kWideTypes[pick_index(rng, 3)];
  c.bias = chance(rng, 0.5);
  c.bias_dtype = kWideTypes[pick_index(rng, 3)];
  c.bias_stride = pick<int64_t>(rng, {1, 1, 3});
  c.layout = kLayouts[pick_index(rng, 4)];
  c.b_scale_dtype = chance(rng, 0.5) ? DType::f32 : DType::bf16;
  c.b_scale_form = static_cast<int>(rng() % 3);
  switch (rng() % 5) {
    case 0:
      break;
    case 1:  // aligned padding: 16-byte loads
      c.a_row_pad = 16;
      c.b_row_pad = 32;
      break;
    case 2:  // rows 4-byte aligned
      c.a_row_pad = 4;
      c.b_row_pad = 12;
      c.out_row_pad = 3;
      break;
    case 3:  // odd strides and offsets: byte loads
      c.a_row_pad = 3;
      c.a_offset = 1;
      c.b_row_pad = 5;
      c.b_offset = 3;
      break;
    case 4:
      c.out_row_pad = 1;
      c.b_offset = 16;
      break;
  }
  return c;
}

TEST(GpuFp8Gemm, RandomShapesMatchTheReferenceOnBothKernels) {
  SKIP_WITHOUT_GPU();
  Stream stream;
  const uint64_t seed = test_seed("RandomShapesMatchTheReferenceOnBothKernels");
  std::mt19937_64 rng(seed);
  int failures = 0;
  for (int64_t m : {1, 2, 3, 4, 7, 8, 16, 33, 64, 200}) {
    for (int i = 0; i < 6; ++i) {
      GemmCase c = random_gemm_case(rng, m);
      // Keep the scalar reference quick: shrink K for the largest products.
      while (c.m * c.n * c.k > (int64_t{24} << 20)) c.k = std::max<int64_t>(1, c.k / 2);
      failures += !check_gemm(c, rng(), stream.get());
      if (failures > 10) FAIL() << "stopping after " << failures << " failing cases";
    }
  }
}

TEST(GpuFp8Gemm, EdgeShapes) {
  SKIP_WITHOUT_GPU();
  Stream stream;
  const uint64_t seed = test_seed("EdgeShapes");
  std::mt19937_64 rng(seed);
  GemmCase cases[] = {
      {1, 7748, 3884},                     // odd model-like shape: rows only 4-byte aligned
      {2, 7748, 3884, DType::bf16, true},  // and with bias
      {3, 130, 3884, DType::f16},          // matrix units on a partial k-block
      {17, 129, 129, DType::bf16, true},   // two activation tiles, partial everything
      {4, 64, 0, DType::f32, true},        // K = 0: out = bias
      {5, 1, 1},                           // a single weight row and k
      {65, 40, 300, DType::f32, false},    // past 64 rows: several activation tile groups
      {1, 1, 8200},                        // one long row
      {16, 256, 7168, DType::bf16, true, DType::bf16, 2, ScaleLayout::packed_ue8m0},
  };
  cases[1].layout = ScaleLayout::column_major_tma;
  cases[3].b_scale_dtype = DType::bf16;
  cases[3].b_scale_form = 1;
  for (const GemmCase& c : cases) check_gemm(c, rng(), stream.get());
}

TEST(GpuFp8Gemm, EmptyProblemsWriteNothing) {
  SKIP_WITHOUT_GPU();
  Stream stream;
  std::mt19937_64 rng(1);
  for (GemmCase c : {GemmCase{0, 64, 128}, GemmCase{3, 0, 128}}) {
    GemmTwins t = make_gemm_twins(c, rng);
    for (GemmKernel kernel : kGemmKernels) {
      run_gemm(gemm_problem(t, c.layout, true, t.out.device, stream.get()), kernel);
      gpu::synchronize(stream.get());
    }
    const Tensor out = t.out.download();
    EXPECT_EQ(std::memcmp(out.data(), t.out.host.data(), out.nbytes()), 0) << c.describe();
  }
}

// Every e4m3 byte as A and as B, the other operand selecting one element and all scales 1: out is
// the byte's exact value (NaN for 0x7f and 0xff). As A, a row holding NaN bytes makes its whole
// output row NaN, so row 0 holds them as zeros.
TEST(GpuFp8Gemm, DecodesEveryByteExactly) {
  SKIP_WITHOUT_GPU();
  Stream stream;
  for (int64_t M : {1, 3, 20}) {
    for (bool bytes_in_a : {true, false}) {
      GemmCase c{M, 256, 256};
      std::mt19937_64 rng(7);
      GemmTwins t = make_gemm_twins(c, rng);
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t k = 0; k < 256; ++k) {
          const auto byte = static_cast<uint8_t>(k);
          const bool drop_nan = m == 0 && is_e4m3_nan(byte);
          static_cast<uint8_t*>(t.a.host.data())[t.a.index(m, k)] =
              bytes_in_a ? (drop_nan ? 0 : byte) : (k == 0 ? 0x38 : 0);
        }
      }
      for (int64_t n = 0; n < 256; ++n)
        for (int64_t k = 0; k < 256; ++k)
          static_cast<uint8_t*>(t.b.host.data())[t.b.index(n, k)] =
              bytes_in_a ? (k == n ? 0x38 : 0) : (k == 0 ? static_cast<uint8_t>(n) : 0);
      for (int64_t i = 0; i < M * 2; ++i) static_cast<float*>(t.a_scales.host.data())[i] = 1.0f;
      for (int64_t i = 0; i < 4; ++i) t.b_scales.set(i / 2, i % 2, 1.0f);
      t.a.upload();
      t.b.upload();
      t.a_scales.upload();
      t.b_scales.upload();
      for (GemmKernel kernel : {GemmKernel::cuda_cores, GemmKernel::matrix_units}) {
        const Tensor out_device = t.out.fresh_device();
        run_gemm(gemm_problem(t, c.layout, true, out_device, stream.get()), kernel);
        gpu::synchronize(stream.get());
        const Tensor out = Tensor::copy_of(out_device, Device::cpu());
        int64_t bad = 0;
        for (int64_t m = 0; m < M; ++m) {
          for (int64_t n = 0; n < 256; ++n) {
            float expected = f8e4m3_to_f32(static_cast<uint8_t>(n));
            if (bytes_in_a && m == 0 && std::isnan(expected)) expected = 0.0f;
            if (bytes_in_a && m > 0) expected = std::nanf("");
            const float got = t.out.get(out, m, n);
            const bool ok = std::isnan(expected) ? std::isnan(got) : got == expected;
            if (!ok && ++bad <= 3)
              ADD_FAILURE() << kernel_name(kernel) << " M=" << M << (bytes_in_a ? " A" : " B")
                            << " byte " << n << " row " << m << ": " << got << ", expected "
                            << expected;
          }
        }
        EXPECT_EQ(bad, 0) << kernel_name(kernel) << " M=" << M;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Determinism, graph capture, dispatch.

std::vector<uint8_t> bytes_of(const Tensor& device) {
  const Tensor host = Tensor::copy_of(device, Device::cpu());
  const auto* p = static_cast<const uint8_t*>(host.data());
  return std::vector<uint8_t>(p, p + host.nbytes());
}

TEST(GpuFp8, BitwiseDeterministic) {
  SKIP_WITHOUT_GPU();
  Stream stream;
  std::mt19937_64 rng(3);
  for (int64_t m : {1, 2, 7, 64}) {
    GemmCase c{m, 1000, 7168, DType::bf16, true};
    GemmTwins t = make_gemm_twins(c, rng);
    for (GemmKernel kernel : {GemmKernel::cuda_cores, GemmKernel::matrix_units}) {
      std::vector<uint8_t> first;
      for (int run = 0; run < 3; ++run) {
        const Tensor out = t.out.fresh_device();
        run_gemm(gemm_problem(t, c.layout, true, out, stream.get()), kernel);
        gpu::synchronize(stream.get());
        if (run == 0)
          first = bytes_of(out);
        else
          EXPECT_TRUE(bytes_of(out) == first) << kernel_name(kernel) << " M=" << m;
      }
    }
  }
  QuantCase q;
  q.m = 300;
  q.k = 7168;
  q.adversarial = true;
  std::vector<float> values(static_cast<size_t>(q.m * q.k));
  for (float& v : values) v = uniform(rng, -3.0f, 3.0f);
  QuantTwins t = make_quant_twins(q, values);
  std::vector<uint8_t> first;
  for (int run = 0; run < 3; ++run) {
    const Tensor out = t.q.fresh_device();
    gpu::per_token_group_quant_fp8(quant_problem(t.x.device_view(), t.q.view_on(out),
                                                 t.scales.device_view(), t.config, stream.get()));
    gpu::synchronize(stream.get());
    if (run == 0)
      first = bytes_of(out);
    else
      EXPECT_TRUE(bytes_of(out) == first) << "group quant run " << run + 1;
  }
}

// The linear layer's two halves (quantize into the workspace, then the GEMM) captured into one
// graph: capturing succeeds only if neither synchronizes nor allocates; replays give the eager
// bytes, which agree with the reference.
TEST(GpuFp8, QuantAndGemmCaptureIntoCudaGraph) {
  SKIP_WITHOUT_GPU();
  Stream stream;
  const uint64_t seed = test_seed("QuantAndGemmCaptureIntoCudaGraph");
  std::mt19937_64 rng(seed);
  for (int64_t M : {1, 5, 40}) {
    const int64_t N = 300, K = 300;  // K: a partial last group and k-block
    Twin x(DType::bf16, dense(M, K));
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) x.set(m, k, std::normal_distribution<float>(0, 1)(rng));
    Twin w(DType::f8e4m3, dense(N, K));
    fill_e4m3(w, rng);
    Twin wsi(DType::f32, dense(fp8::ceil_div(N, 128), fp8::ceil_div(K, 128)));
    for (int64_t i = 0; i < wsi.host.numel(); ++i)
      static_cast<float*>(wsi.host.data())[i] = uniform(rng, 0, 0.001f);
    Twin y(DType::bf16, dense(M, N));
    const size_t bytes = w8a8_block_fp8_linear_workspace_size(M, K);
    Twin workspace(DType::u8, dense(1, static_cast<int64_t>(bytes)));
    x.upload();
    w.upload();
    wsi.upload();
    y.upload();
    workspace.upload();

    auto problem_on = [&](const Tensor& y_storage, const Tensor& ws_storage, bool on_device) {
      OpOptions options;
      options.stream = on_device ? stream.get() : nullptr;
      return make_w8a8_linear_problem("test", on_device ? x.device_view() : x.host_view(),
                                      on_device ? w.device_view() : w.host_view(),
                                      on_device ? wsi.device_view() : wsi.host_view(), std::nullopt,
                                      y.view_on(y_storage), ws_storage.data(), bytes, options);
    };
    Tensor y_ref = Tensor::copy_of(y.host, Device::cpu());
    Tensor ws_ref = Tensor::copy_of(workspace.host, Device::cpu());
    reference::w8a8_block_fp8_linear(problem_on(y_ref, ws_ref, false));

    auto enqueue = [&](const W8a8LinearProblem& p) {
      gpu::per_token_group_quant_fp8(p.quant);
      gpu::block_fp8_gemm(p.gemm);
    };
    const Tensor y_eager = y.fresh_device(), ws_eager = workspace.fresh_device();
    enqueue(problem_on(y_eager, ws_eager, true));
    gpu::synchronize(stream.get());

    const Tensor y_graph = y.fresh_device(), ws_graph = workspace.fresh_device();
    cudaGraph_t graph = nullptr;
    MOEKIT_GPU_CHECK(cudaStreamBeginCapture(stream.get(), cudaStreamCaptureModeGlobal));
    enqueue(problem_on(y_graph, ws_graph, true));
    MOEKIT_GPU_CHECK(cudaStreamEndCapture(stream.get(), &graph));
    cudaGraphExec_t exec = nullptr;
    MOEKIT_GPU_CHECK(cudaGraphInstantiateWithFlags(&exec, graph, 0));
    EXPECT_TRUE(bytes_of(y_graph) == bytes_of(y.fresh_device())) << "capturing ran the kernels";
    for (int replay = 0; replay < 3; ++replay)
      MOEKIT_GPU_CHECK(cudaGraphLaunch(exec, stream.get()));
    gpu::synchronize(stream.get());
    EXPECT_TRUE(bytes_of(y_graph) == bytes_of(y_eager)) << "M=" << M << ": replay differs";
    EXPECT_TRUE(bytes_of(ws_graph) == bytes_of(ws_eager)) << "M=" << M << ": replay differs";
    MOEKIT_GPU_CHECK(cudaGraphExecDestroy(exec));
    MOEKIT_GPU_CHECK(cudaGraphDestroy(graph));

    // The eager run against the reference: quantized bytes and scales exact, y in tolerance.
    const Tensor ws_host = Tensor::copy_of(ws_eager, Device::cpu());
    const auto q_bytes = static_cast<size_t>(M * K);
    const auto scales_at = static_cast<size_t>((M * K + 63) / 64 * 64);
    EXPECT_EQ(std::memcmp(ws_host.data(), ws_ref.data(), q_bytes), 0) << "M=" << M << ": q";
    EXPECT_EQ(std::memcmp(static_cast<const char*>(ws_host.data()) + scales_at,
                          static_cast<const char*>(ws_ref.data()) + scales_at, bytes - scales_at),
              0)
        << "M=" << M << ": scales";
    const GemmComparison cmp = compare_gemm(y, y_ref, Tensor::copy_of(y_eager, Device::cpu()));
    EXPECT_LT(cmp.relative_error, gemm_tolerance(DType::bf16)) << "M=" << M;
    EXPECT_EQ(cmp.nan_mismatches, 0);
  }
}

// The row named "gpu" of an explain table, if the table has one.
std::optional<ImplementationChoice> gpu_row(const std::vector<ImplementationChoice>& rows) {
  for (const ImplementationChoice& row : rows)
    if (row.name == "gpu") return row;
  return std::nullopt;
}

TEST(GpuFp8, PublicOpsDispatchToTheGpuEntries) {
  SKIP_WITHOUT_GPU();
  Stream stream;
  const uint64_t seed = test_seed("PublicOpsDispatchToTheGpuEntries");
  std::mt19937_64 rng(seed);
  OpOptions options;
  options.backend = Backend::gpu;
  options.stream = stream.get();
  options.implementation = "gpu";

  // Group quantization.
  QuantCase qc;
  qc.m = 33;
  qc.k = 1024;
  qc.layout = ScaleLayout::packed_ue8m0;
  qc.ue8m0 = true;
  std::vector<float> values(static_cast<size_t>(qc.m * qc.k));
  for (float& v : values) v = uniform(rng, -10.0f, 10.0f);
  QuantTwins q = make_quant_twins(qc, values);
  const auto quant_row = gpu_row(explain_per_token_group_quant_fp8(
      q.x.device_view(), q.q.device_view(), q.scales.device_view(), q.config, options));
  if (!quant_row) GTEST_SKIP() << "the FP8 dispatch tables have no \"gpu\" entries yet";
  EXPECT_TRUE(quant_row->chosen) << quant_row->reason;
  per_token_group_quant_fp8(q.x.device_view(), q.q.device_view(), q.scales.device_view(), q.config,
                            options);
  reference::per_token_group_quant_fp8(
      quant_problem(q.x.host_view(), q.q.host_view(), q.scales.host_view(), q.config, nullptr));
  gpu::synchronize(stream.get());
  std::string first;
  EXPECT_EQ(q_mismatches(q.q.host, q.q.download(), first), 0) << first;
  const Tensor scales = q.scales.download();
  EXPECT_EQ(std::memcmp(scales.data(), q.scales.host.data(), scales.nbytes()), 0);

  // GEMM.
  GemmCase gc{9, 300, 1000, DType::bf16, true};
  GemmTwins g = make_gemm_twins(gc, rng);
  const auto gemm_row = gpu_row(explain_block_fp8_gemm(
      g.a.device_view(), g.a_scales.device_view(), gc.layout, g.b.device_view(),
      g.b_scales.device_view(), g.bias_on(g.bias_device, gc.n), g.out.device_view(), options));
  ASSERT_TRUE(gemm_row.has_value());
  EXPECT_TRUE(gemm_row->chosen) << gemm_row->reason;
  block_fp8_gemm(g.a.device_view(), g.a_scales.device_view(), gc.layout, g.b.device_view(),
                 g.b_scales.device_view(), g.bias_on(g.bias_device, gc.n), g.out.device_view(),
                 options);
  Tensor expected = Tensor::copy_of(g.out.host, Device::cpu());
  reference::block_fp8_gemm(gemm_problem(g, gc.layout, false, expected, nullptr));
  gpu::synchronize(stream.get());
  const GemmComparison cmp = compare_gemm(g.out, expected, g.out.download());
  EXPECT_LT(cmp.relative_error, gemm_tolerance(gc.out));
  EXPECT_EQ(cmp.nan_mismatches + cmp.padding_written, 0);

  // Weight quantization.
  Twin w(DType::bf16, dense(200, 300));
  for (int64_t n = 0; n < 200; ++n)
    for (int64_t k = 0; k < 300; ++k) w.set(n, k, uniform(rng, -0.1f, 0.1f));
  Twin weight(DType::f8e4m3, dense(200, 300)), wsi(DType::f32, dense(2, 3));
  w.upload();
  weight.upload();
  wsi.upload();
  const auto weight_row = gpu_row(explain_block_quantize_weight(
      w.device_view(), weight.device_view(), wsi.device_view(), options));
  ASSERT_TRUE(weight_row.has_value());
  EXPECT_TRUE(weight_row->chosen) << weight_row->reason;
  block_quantize_weight(w.device_view(), weight.device_view(), wsi.device_view(), options);
  reference::block_quantize_weight(make_block_quantize_weight_problem(
      "test", w.host_view(), weight.host_view(), wsi.host_view(), {}));
  gpu::synchronize(stream.get());
  EXPECT_EQ(q_mismatches(weight.host, weight.download(), first), 0) << first;
  const Tensor wsi_got = wsi.download();
  EXPECT_EQ(std::memcmp(wsi_got.data(), wsi.host.data(), wsi_got.nbytes()), 0);
}

TEST(GpuFp8, EntriesSayWhyTheyDecline) {
  SKIP_WITHOUT_GPU();
  // Host tensors.
  QuantCase c;
  c.m = 2;
  c.k = 96;
  c.group = 48;  // valid for the op, not for the GPU kernel
  std::vector<float> values(static_cast<size_t>(c.m * c.k), 1.0f);
  QuantTwins t = make_quant_twins(c, values);
  const GroupQuantProblem host =
      quant_problem(t.x.host_view(), t.q.host_view(), t.scales.host_view(), t.config, nullptr);
  EXPECT_NE(gpu::group_quant_supports(host).find("not on a GPU"), std::string::npos);
  const GroupQuantProblem device = quant_problem(t.x.device_view(), t.q.device_view(),
                                                 t.scales.device_view(), t.config, nullptr);
  EXPECT_NE(gpu::group_quant_supports(device).find("group_size=48"), std::string::npos)
      << gpu::group_quant_supports(device);
  std::mt19937_64 rng(5);
  GemmCase g{3, 5, 7};
  GemmTwins gt = make_gemm_twins(g, rng);
  EXPECT_NE(gpu::block_gemm_supports(gemm_problem(gt, g.layout, false, gt.out.host, nullptr))
                .find("not on a GPU"),
            std::string::npos);
}

// ---------------------------------------------------------------------------------------------
// Timings (MOEKIT_FP8_GPU_TIMINGS=1): CUDA-graph replays, weights rotating over copies larger
// than L2 as in a model; each configuration verified against the reference first.

// Relative error of out's first rows x first columns against the reference on those.
double verify_corner(const Tensor& a, const Tensor& as, const Tensor& b, const Tensor& bs,
                     const Tensor& out_device, int64_t rows, int64_t cols) {
  const int64_t K = a.size(1), G = fp8::ceil_div(K, 128);
  const TensorView a_part(a.data(), DType::f8e4m3, {rows, K});
  const TensorView as_part(as.data(), DType::f32, {rows, G});
  const TensorView b_part(b.data(), DType::f8e4m3, {cols, K});
  const TensorView bs_part(bs.data(), DType::f32, {fp8::ceil_div(cols, 128), G});
  Tensor ref = Tensor::empty(DType::f32, {rows, cols});
  reference::block_fp8_gemm(make_block_gemm_problem(
      "verify", a_part, as_part, ScaleLayout::row_major, b_part, bs_part, std::nullopt, ref, {}));
  const Tensor out = Tensor::copy_of(out_device, Device::cpu());
  const int64_t N = out.size(1);
  double error = 0.0, magnitude = 0.0;
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t n = 0; n < cols; ++n) {
      const double r = ref.data_as<float>()[m * cols + n];
      const double v = load_as_f32(out.data(), out.dtype(), m * N + n);
      error += std::fabs(v - r);
      magnitude += std::fabs(r);
    }
  }
  return error / std::max(magnitude, 1e-30);
}

TEST(GpuFp8Timing, DecodeGemmAndGroupQuant) {
  SKIP_WITHOUT_GPU();
  if (std::getenv("MOEKIT_FP8_GPU_TIMINGS") == nullptr)
    GTEST_SKIP() << "set MOEKIT_FP8_GPU_TIMINGS=1 to time";
  const Device gpu = Device::gpu();
  const double copy_gbs = gpu::measure_copy_bandwidth_gbs();
  std::printf("device: %s; copy bandwidth %.0f GB/s (read + write)\n",
              gpu_hooks().describe(0).c_str(), copy_gbs);
  std::mt19937_64 rng(11);
  auto random_bytes = [&](Tensor& t) {
    auto* p = static_cast<uint8_t*>(t.data());
    for (size_t i = 0; i < t.nbytes(); i += 8) {
      uint64_t r = rng();
      for (size_t j = 0; j < 8 && i + j < t.nbytes(); ++j, r >>= 8) {
        const auto byte = static_cast<uint8_t>(r);
        p[i + j] = is_e4m3_nan(byte) ? 0 : byte;
      }
    }
  };
  struct Shape {
    int64_t n, k;
  };
  for (const Shape& shape :
       {Shape{4096, 7168}, Shape{7168, 2048}, Shape{2048, 7168}, Shape{18432, 7168}}) {
    const int64_t N = shape.n, K = shape.k, G = fp8::ceil_div(K, 128);
    Tensor b = Tensor::empty(DType::f8e4m3, {N, K});
    random_bytes(b);
    Tensor bs = Tensor::empty(DType::f32, {fp8::ceil_div(N, 128), G});
    for (int64_t i = 0; i < bs.numel(); ++i) bs.data_as<float>()[i] = uniform(rng, 0, 0.01f);
    const double weight_bytes = static_cast<double>(b.nbytes());
    const int copies = static_cast<int>(std::clamp(256e6 / weight_bytes, 2.0, 16.0));
    std::vector<Tensor> weights;
    for (int i = 0; i < copies; ++i) weights.push_back(Tensor::copy_of(b, gpu));
    const Tensor bs_device = Tensor::copy_of(bs, gpu);
    const double floor_us = weight_bytes / (copy_gbs * 1e3);
    for (int64_t M : {1, 2, 3, 4, 6, 8, 12, 16, 32, 64}) {
      Tensor a = Tensor::empty(DType::f8e4m3, {M, K});
      random_bytes(a);
      Tensor as = Tensor::empty(DType::f32, {M, G});
      for (int64_t i = 0; i < as.numel(); ++i) as.data_as<float>()[i] = uniform(rng, 0, 0.01f);
      const Tensor a_device = Tensor::copy_of(a, gpu), as_device = Tensor::copy_of(as, gpu);
      const Tensor out = Tensor::empty(DType::bf16, {M, N}, gpu);
      for (GemmKernel kernel : {GemmKernel::cuda_cores, GemmKernel::matrix_units}) {
        std::vector<BlockGemmProblem> problems;
        for (const Tensor& weight : weights)
          problems.push_back(make_block_gemm_problem("time", a_device, as_device,
                                                     ScaleLayout::row_major, weight, bs_device,
                                                     std::nullopt, out, {}));
        run_gemm(problems[0], kernel);
        gpu::synchronize(nullptr);
        const double error = verify_corner(a, as, b, bs, out, std::min<int64_t>(M, 2), 256);
        EXPECT_LT(error, gemm_tolerance(DType::bf16)) << kernel_name(kernel) << " M=" << M;
        int call = 0;
        const double us = gpu::median_graph_replay_us(
            [&](void* stream) {
              BlockGemmProblem p = problems[static_cast<size_t>(call++ % copies)];
              p.stream = stream;
              run_gemm(p, kernel);
            },
            copies, 20);
        std::printf(
            "gemm N=%5lld K=%5lld M=%3lld %-12s %8.2f us  %7.0f GB/s of weights  %5.1f%% of the "
            "HBM floor (%.2f us)%s\n",
            static_cast<long long>(N), static_cast<long long>(K), static_cast<long long>(M),
            kernel_name(kernel), us, weight_bytes / (us * 1e3), 100.0 * floor_us / us, floor_us,
            error < gemm_tolerance(DType::bf16) ? "" : "  WRONG");
      }
    }
  }

  // Group quantization of [16384, 7168] bf16, group 128: read 2 bytes, write 1 (+ scales).
  const int64_t M = 16384, K = 7168;
  for (ScaleLayout layout : {ScaleLayout::row_major, ScaleLayout::packed_ue8m0}) {
    GroupQuantConfig config;
    config.layout = layout;
    config.ue8m0 = layout == ScaleLayout::packed_ue8m0;
    Tensor x = Tensor::empty(DType::bf16, {M, K});
    auto* bits = static_cast<uint16_t*>(x.data());
    for (int64_t i = 0; i < M * K; i += 4) {  // +-[1, 2) with random mantissas, quickly
      const uint64_t r = rng();
      for (int j = 0; j < 4; ++j)
        bits[i + j] = static_cast<uint16_t>((r >> (16 * j)) & 0x807f) | 0x3f80;
    }
    const Tensor x_device = Tensor::copy_of(x, gpu);
    const Tensor q = Tensor::empty(DType::f8e4m3, {M, K}, gpu);
    const ScaleStorage s = group_quant_scale_storage(M, K, config);
    const Tensor scales = Tensor::empty(s.dtype, {s.shape[0], s.shape[1]}, gpu);
    OpOptions options;
    GroupQuantProblem p = make_group_quant_problem("time", x_device, q, scales, config, options);
    gpu::per_token_group_quant_fp8(p);
    gpu::synchronize(nullptr);
    // Verify the first rows' bytes against the reference.
    const int64_t rows = 8;
    Tensor q_ref = Tensor::empty(DType::f8e4m3, {rows, K});
    GroupQuantConfig row_major;
    row_major.ue8m0 = config.ue8m0;
    Tensor s_ref = Tensor::empty(DType::f32, {rows, K / 128});
    reference::per_token_group_quant_fp8(make_group_quant_problem(
        "verify", TensorView(x.data(), DType::bf16, {rows, K}), q_ref, s_ref, row_major, {}));
    const Tensor q_host = Tensor::copy_of(q, Device::cpu());
    const bool exact = std::memcmp(q_host.data(), q_ref.data(), rows * K) == 0;
    EXPECT_TRUE(exact) << scale_layout_name(layout);
    const double us = gpu::median_graph_replay_us(
        [&](void* stream) {
          p.stream = stream;
          gpu::per_token_group_quant_fp8(p);
        },
        4, 20);
    const double moved = 3.0 * static_cast<double>(M * K) + static_cast<double>(scales.nbytes());
    std::printf(
        "quant %lldx%lld bf16 g=128 %-16s %8.2f us  %7.0f GB/s  %5.1f%% of copy bandwidth%s\n",
        static_cast<long long>(M), static_cast<long long>(K), scale_layout_name(layout), us,
        moved / (us * 1e3), 100.0 * moved / (us * 1e3) / copy_gbs, exact ? "" : "  WRONG");
  }
}

}  // namespace
}  // namespace moekit
