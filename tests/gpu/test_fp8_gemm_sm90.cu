// The Hopper block-scaled FP8 GEMM (gpu::block_fp8_gemm_sm90) against the reference: random shapes
// it accepts (both kernels: the 128 x 128 tiles one and the swapped small-M one with its cluster
// split of K), every out dtype, bias dtypes, all activation-scale layouts, f32/bf16 and strided
// weight scales, padded rows; outputs poisoned and every element checked. Also bitwise
// determinism, declines with reasons, and (printed, not asserted) timings over CUDA-graph replays.
// Every test skips without a GPU of compute capability 9.x or without sm_90a code in the build.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <future>
#include <map>
#include <numeric>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "gpu/fp8_gemm_sm90.h"
#include "gpu/fp8_gpu.h"
#include "gpu/gpu_check.h"
#include "gpu/gpu_runtime.h"
#include "gpu_test_support.h"
#include "moekit/backend.h"
#include "moekit/dtype.h"
#include "moekit/error.h"
#include "moekit/ops/fp8.h"
#include "moekit/tensor.h"
#include "ops/fp8_problem.h"
#include "reference/fp8_reference.h"
#include "sm90_trace_print.h"

namespace moekit {
namespace {

constexpr const char* kOp = "block_fp8_gemm";

// Skips unless a Hopper GPU is present; the build's sm_90a code is checked per test through
// supports() on a small problem (see Sm90Available).
bool hopper_present() {
  if (!backend_available(Backend::gpu)) return false;
  return gpu::device_properties(0).major == 9;
}

#define SKIP_WITHOUT_HOPPER()                                                                  \
  do {                                                                                         \
    if (!hopper_present()) GTEST_SKIP() << "no GPU of compute capability 9.x on this machine"; \
  } while (0)

using gpu_test::Stream;

uint64_t test_seed() {
  if (const char* env = std::getenv("MOEKIT_TEST_SEED")) return std::strtoull(env, nullptr, 0);
  return (static_cast<uint64_t>(std::random_device{}()) << 32) ^ std::random_device{}();
}

struct GemmCase {
  int64_t m = 1, n = 128, k = 128;
  int64_t a_row_pad = 0, b_row_pad = 0, out_row_pad = 0;  // elements past each row
  ScaleLayout layout = ScaleLayout::row_major;
  DType b_scale_dtype = DType::f32;
  bool b_scales_transposed = false;  // stored [k_blocks, n_blocks], viewed with strides (1, nb)
  DType out_dtype = DType::f32;
  std::optional<DType> bias_dtype;
  uint64_t seed = 0;

  int64_t lda() const { return k + a_row_pad; }
  int64_t ldb() const { return k + b_row_pad; }
  int64_t ldo() const { return n + out_row_pad; }
  int64_t k_blocks() const { return (k + 127) / 128; }
  int64_t n_blocks() const { return (n + 127) / 128; }
};

std::string describe(const GemmCase& c) {
  char text[400];
  std::snprintf(text, sizeof text,
                "M=%lld N=%lld K=%lld lda=%lld ldb=%lld ldo=%lld a_scales=%s b_scales=%s%s out=%s "
                "bias=%s seed=%llu",
                static_cast<long long>(c.m), static_cast<long long>(c.n),
                static_cast<long long>(c.k), static_cast<long long>(c.lda()),
                static_cast<long long>(c.ldb()), static_cast<long long>(c.ldo()),
                scale_layout_name(c.layout), std::string(dtype_name(c.b_scale_dtype)).c_str(),
                c.b_scales_transposed ? " (transposed)" : "",
                std::string(dtype_name(c.out_dtype)).c_str(),
                c.bias_dtype ? std::string(dtype_name(*c.bias_dtype)).c_str() : "none",
                static_cast<unsigned long long>(c.seed));
  return text;
}

// Every operand as one flat tensor (padding included); views_of() lays the shapes over them, so
// the host and device copies share one description.
struct Buffers {
  Tensor a, a_scales, b, b_scales, bias, out;
};

struct Views {
  TensorView a, a_scales, b, b_scales;
  std::optional<TensorView> bias;
  TensorView out;
};

Views views_of(const Buffers& buf, const GemmCase& c, Device device) {
  Views v;
  const int64_t M = c.m, N = c.n, K = c.k, KB = c.k_blocks(), NB = c.n_blocks();
  const std::array<int64_t, 2> a_shape{M, K}, a_strides{c.lda(), 1};
  v.a = TensorView(buf.a.data(), DType::f8e4m3, a_shape, a_strides, device);
  GroupQuantConfig config;
  config.group_size = 128;
  config.layout = c.layout;
  config.ue8m0 = c.layout == ScaleLayout::packed_ue8m0;
  const ScaleStorage storage = group_quant_scale_storage(M, K, config);
  v.a_scales = TensorView(buf.a_scales.data(), storage.dtype, storage.shape, device);
  const std::array<int64_t, 2> b_shape{N, K}, b_strides{c.ldb(), 1};
  v.b = TensorView(buf.b.data(), DType::f8e4m3, b_shape, b_strides, device);
  const std::array<int64_t, 2> bs_shape{NB, KB};
  const std::array<int64_t, 2> bs_strides =
      c.b_scales_transposed ? std::array<int64_t, 2>{1, NB} : std::array<int64_t, 2>{KB, 1};
  v.b_scales = TensorView(buf.b_scales.data(), c.b_scale_dtype, bs_shape, bs_strides, device);
  if (c.bias_dtype) {
    const std::array<int64_t, 1> shape{N};
    v.bias = TensorView(buf.bias.data(), *c.bias_dtype, shape, device);
  }
  const std::array<int64_t, 2> out_shape{M, N}, out_strides{c.ldo(), 1};
  v.out = TensorView(buf.out.data(), c.out_dtype, out_shape, out_strides, device);
  return v;
}

// Random inputs on the host; the padding bytes of A and B are NaN codes and the padding of the
// scale layouts NaN, so a kernel that read them would show it; out is poisoned (all bits set).
Buffers make_host_buffers(const GemmCase& c) {
  std::mt19937_64 rng(c.seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  Buffers buf;
  const int64_t M = c.m, N = c.n, K = c.k, KB = c.k_blocks(), NB = c.n_blocks();

  auto fp8_matrix = [&](int64_t rows, int64_t ld) {
    Tensor t = Tensor::empty(DType::u8, {std::max<int64_t>(rows * ld, 1)});
    auto* p = t.data_as<uint8_t>();
    std::memset(p, 0x7f, t.nbytes());  // e4m3 NaN in the padding
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t k = 0; k < K; ++k) p[r * ld + k] = f32_to_f8e4m3(normal(rng) * 32.0f);
    return t;
  };
  buf.a = fp8_matrix(M, c.lda());
  buf.b = fp8_matrix(N, c.ldb());

  GroupQuantConfig config;
  config.group_size = 128;
  config.layout = c.layout;
  config.ue8m0 = c.layout == ScaleLayout::packed_ue8m0;
  const ScaleStorage storage = group_quant_scale_storage(M, K, config);
  buf.a_scales = Tensor::empty(storage.dtype, {storage.shape[0] * storage.shape[1]});
  const ScaleAddressing at = scale_addressing(c.layout, M, KB);
  if (c.layout == ScaleLayout::packed_ue8m0) {
    auto* bytes = static_cast<uint8_t*>(buf.a_scales.data());
    std::memset(bytes, 0xff, buf.a_scales.nbytes());
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < KB; ++g)
        bytes[at.offset(m, g) * 4 + g % 4] = static_cast<uint8_t>(114 + rng() % 8);  // 2^-13..-6
  } else {
    auto* f = buf.a_scales.data_as<float>();
    std::fill_n(f, buf.a_scales.numel(), std::nanf(""));
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < KB; ++g)
        f[at.offset(m, g)] = std::ldexp(1.0f + uniform(rng), -13 + static_cast<int>(rng() % 7));
  }

  buf.b_scales = Tensor::empty(c.b_scale_dtype, {NB * KB});
  for (int64_t nb = 0; nb < NB; ++nb)
    for (int64_t kb = 0; kb < KB; ++kb) {
      const int64_t i = c.b_scales_transposed ? nb + kb * NB : nb * KB + kb;
      store_from_f32(buf.b_scales.data(), c.b_scale_dtype, i,
                     std::ldexp(0.5f + uniform(rng), -8 + static_cast<int>(rng() % 3)));
    }

  if (c.bias_dtype) {
    buf.bias = Tensor::empty(*c.bias_dtype, {N});
    for (int64_t n = 0; n < N; ++n) store_from_f32(buf.bias.data(), *c.bias_dtype, n, normal(rng));
  }
  buf.out = Tensor::empty(c.out_dtype, {std::max<int64_t>(M * c.ldo(), 1)});
  std::memset(buf.out.data(), 0xff, buf.out.nbytes());
  return buf;
}

Buffers to_device(const Buffers& host) {
  const Device gpu = Device::gpu();
  Buffers d;
  d.a = Tensor::copy_of(host.a, gpu);
  d.a_scales = Tensor::copy_of(host.a_scales, gpu);
  d.b = Tensor::copy_of(host.b, gpu);
  d.b_scales = Tensor::copy_of(host.b_scales, gpu);
  if (host.bias.data()) d.bias = Tensor::copy_of(host.bias, gpu);
  d.out = Tensor::copy_of(host.out, gpu);
  return d;
}

BlockGemmProblem problem_of(const Views& v, const GemmCase& c, void* stream) {
  OpOptions options;
  options.stream = stream;
  return make_block_gemm_problem(kOp, v.a, v.a_scales, c.layout, v.b, v.b_scales, v.bias, v.out,
                                 options);
}

// The reference's output for the case (computed on the host, in the case's out dtype).
Tensor reference_output(const GemmCase& c, const Buffers& host) {
  const Views hv = views_of(host, c, Device::cpu());
  Tensor out = Tensor::empty(c.out_dtype, {std::max<int64_t>(c.m * c.ldo(), 1)});
  std::memset(out.data(), 0xff, out.nbytes());
  const std::array<int64_t, 2> shape{c.m, c.n}, strides{c.ldo(), 1};
  const TensorView out_view(out.data(), c.out_dtype, shape, strides, Device::cpu());
  OpOptions options;
  const BlockGemmProblem p = make_block_gemm_problem(kOp, hv.a, hv.a_scales, c.layout, hv.b,
                                                     hv.b_scales, hv.bias, out_view, options);
  // Rows are independent in the reference, so bands of rows on threads of their own give its
  // bits in a fraction of the time (the single-threaded reference was most of the suite's time).
  const int64_t threads = std::clamp<int64_t>(std::thread::hardware_concurrency() / 4, 1, 8);
  const int64_t band = std::max<int64_t>((c.m + threads - 1) / threads, 1);
  std::vector<std::thread> workers;
  for (int64_t first = 0; first < c.m; first += band)
    workers.emplace_back([&p, first, rows = std::min(band, c.m - first)] {
      reference::block_fp8_gemm(row_band(p, first, rows));
    });
  for (std::thread& worker : workers) worker.join();
  return out;
}

// Runs the GPU kernel on a fresh device copy; returns the whole out buffer (padding included).
Tensor run_sm90(const GemmCase& c, const Buffers& host, cudaStream_t stream) {
  const Buffers dev = to_device(host);
  const Views dv = views_of(dev, c, Device::gpu());
  const BlockGemmProblem p = problem_of(dv, c, stream);
  const std::string why = gpu::block_gemm_sm90_supports(p);
  EXPECT_EQ(why, "") << describe(c);
  if (!why.empty()) return Tensor::copy_of(host.out, Device::cpu());
  std::printf("  plan %s\n", gpu::block_gemm_sm90_plan(p).c_str());
  gpu::block_fp8_gemm_sm90(p);
  MOEKIT_GPU_CHECK(cudaGetLastError());
  gpu::synchronize(stream);
  return Tensor::copy_of(dev.out, Device::cpu());
}

// Every element of [M, N] written and close to the reference; the row padding untouched.
bool outputs_agree(const GemmCase& c, const Tensor& out, const Tensor& ref) {
  double abs_error = 0.0, abs_ref = 0.0, worst = 0.0;
  int64_t unwritten = 0, far = 0, padding_written = 0, worst_at = -1;
  const auto* out_bytes = static_cast<const uint8_t*>(out.data());
  const size_t es = dtype_size(c.out_dtype);
  for (int64_t m = 0; m < c.m; ++m) {
    for (int64_t n = 0; n < c.ldo(); ++n) {
      const int64_t i = m * c.ldo() + n;
      if (n >= c.n) {
        for (size_t b = 0; b < es; ++b) padding_written += out_bytes[i * es + b] != 0xff;
        continue;
      }
      const double o = load_as_f32(out.data(), c.out_dtype, i);
      const double r = load_as_f32(ref.data(), c.out_dtype, i);
      if (!std::isfinite(o)) {
        ++unwritten;
        continue;
      }
      abs_error += std::fabs(o - r);
      abs_ref += std::fabs(r);
      if (std::fabs(o - r) > worst) {
        worst = std::fabs(o - r);
        worst_at = i;
      }
    }
  }
  const double mean_ref = abs_ref / std::max<double>(1.0, static_cast<double>(c.m * c.n));
  // Per element: far beyond rounding (catches a wrong tile that the mean would dilute).
  for (int64_t m = 0; m < c.m; ++m)
    for (int64_t n = 0; n < c.n; ++n) {
      const int64_t i = m * c.ldo() + n;
      const double o = load_as_f32(out.data(), c.out_dtype, i);
      const double r = load_as_f32(ref.data(), c.out_dtype, i);
      if (std::isfinite(o) && std::fabs(o - r) > 0.02 * std::fabs(r) + 0.02 * mean_ref) ++far;
    }
  const double relative = abs_error / std::max(abs_ref, 1e-30);
  const double tolerance = c.out_dtype == DType::f32    ? 1e-3
                           : c.out_dtype == DType::bf16 ? 4e-3
                                                        : 2e-3;
  const bool pass = unwritten == 0 && far == 0 && padding_written == 0 && relative < tolerance;
  std::printf("  %s relative error %.2e: %s\n", pass ? "ok  " : "FAIL", relative,
              describe(c).c_str());
  EXPECT_TRUE(pass) << describe(c) << ": relative error " << relative << " (tolerance " << tolerance
                    << "), " << unwritten << " unwritten, " << far << " far off, "
                    << padding_written << " padding bytes written, worst " << worst << " at ["
                    << (worst_at >= 0 ? worst_at / c.ldo() : -1) << ", "
                    << (worst_at >= 0 ? worst_at % c.ldo() : -1) << "]";
  return pass;
}

// Every activation-scale layout of the contract.
constexpr ScaleLayout kLayouts[] = {ScaleLayout::row_major, ScaleLayout::column_major,
                                    ScaleLayout::column_major_tma, ScaleLayout::packed_ue8m0};

GemmCase random_case(std::mt19937_64& rng, int64_t m, int64_t n, int64_t k) {
  GemmCase c;
  c.m = m;
  c.n = n;
  c.k = k;
  c.layout = kLayouts[rng() % 4];
  c.b_scale_dtype = rng() % 2 ? DType::bf16 : DType::f32;
  c.b_scales_transposed = rng() % 3 == 0;
  const DType outs[] = {DType::f32, DType::bf16, DType::f16};
  c.out_dtype = outs[rng() % 3];
  const DType biases[] = {DType::f32, DType::bf16, DType::f16};
  if (rng() % 2) c.bias_dtype = biases[rng() % 3];
  // Row strides stay multiples of 16 bytes (TMA); K itself need not be.
  c.a_row_pad = (16 - k % 16) % 16 + 16 * static_cast<int64_t>(rng() % 3);
  c.b_row_pad = (16 - k % 16) % 16 + 16 * static_cast<int64_t>(rng() % 2);
  c.out_row_pad = static_cast<int64_t>(rng() % 4);  // odd strides: no paired stores
  c.seed = rng();
  return c;
}

// The plan the Hopper GEMM takes for the case under the current knobs.
std::string plan_of_case(const GemmCase& c, const Buffers& host, cudaStream_t stream) {
  const Buffers dev = to_device(host);
  return gpu::block_gemm_sm90_plan(problem_of(views_of(dev, c, Device::gpu()), c, stream));
}

// Runs the case twice in a row on one stream (same inputs and output: the second call overlaps
// the first through PDL and must not change a bit), then once on fresh buffers: the two outputs
// bitwise equal, and close to the reference. Returns the plan ("" where the kernel declines).
std::string check_twice_equals_once(const GemmCase& c, const Buffers& host, const Tensor& expected,
                                    cudaStream_t stream) {
  const Buffers dev = to_device(host);
  const BlockGemmProblem p = problem_of(views_of(dev, c, Device::gpu()), c, stream);
  const std::string why = gpu::block_gemm_sm90_supports(p);
  EXPECT_EQ(why, "") << describe(c);
  if (!why.empty()) return "";
  const std::string plan = gpu::block_gemm_sm90_plan(p);
  gpu::block_fp8_gemm_sm90(p);
  gpu::block_fp8_gemm_sm90(p);
  MOEKIT_GPU_CHECK(cudaGetLastError());
  gpu::synchronize(stream);
  const Tensor twice = Tensor::copy_of(dev.out, Device::cpu());
  const Tensor once = run_sm90(c, host, stream);
  EXPECT_EQ(std::memcmp(once.data(), twice.data(), once.nbytes()), 0) << describe(c);
  outputs_agree(c, once, expected);
  return plan;
}

// Runs the cases on the GPU one by one and their references in parallel on the host.
void check_cases(const std::vector<GemmCase>& cases) {
  Stream stream;
  std::vector<Buffers> hosts;
  hosts.reserve(cases.size());
  for (const GemmCase& c : cases) hosts.push_back(make_host_buffers(c));
  std::vector<std::future<Tensor>> refs;
  for (size_t i = 0; i < cases.size(); ++i)
    refs.push_back(
        std::async(std::launch::async, [&, i] { return reference_output(cases[i], hosts[i]); }));
  for (size_t i = 0; i < cases.size(); ++i) {
    const Tensor out = run_sm90(cases[i], hosts[i], stream.get());
    const Tensor ref = refs[i].get();
    outputs_agree(cases[i], out, ref);
  }
}

TEST(Sm90BlockFp8Gemm, FixedShapesAgreeWithReference) {
  SKIP_WITHOUT_HOPPER();
  const uint64_t seed = test_seed();
  std::printf("FixedShapesAgreeWithReference: seed %llu (MOEKIT_TEST_SEED to repeat)\n",
              static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  // Each kernel and token width: swap 8 (M 1, 7), 16, 32, 64 (cluster split 8 at N=1024), 128;
  // tiles (M 200, 1000) with partial M and N tiles; K not a multiple of 128.
  const std::array<std::array<int64_t, 3>, 12> shapes{{{1, 4096, 7168},
                                                       {7, 384, 1024},
                                                       {13, 256, 896},
                                                       {30, 640, 512},
                                                       {64, 1024, 7168},
                                                       {100, 512, 1024},
                                                       {128, 512, 2048},
                                                       {200, 640, 1536},
                                                       {1000, 1000, 512},
                                                       {64, 200, 1000},
                                                       {1, 72, 48},
                                                       {333, 136, 200}}};
  std::vector<GemmCase> cases;
  for (const auto& s : shapes) cases.push_back(random_case(rng, s[0], s[1], s[2]));
  check_cases(cases);
}

TEST(Sm90BlockFp8Gemm, RandomShapesAgreeWithReference) {
  SKIP_WITHOUT_HOPPER();
  const uint64_t seed = test_seed();
  std::printf("RandomShapesAgreeWithReference: seed %llu (MOEKIT_TEST_SEED to repeat)\n",
              static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  const int64_t ms[] = {1, 7, 64, 128, 200, 1000, 3, 16, 40, 129};
  const int64_t ns[] = {128, 256, 384, 200, 1408, 64, 4096};
  const int64_t ks[] = {128, 256, 384, 640, 2048, 100, 1152};
  std::vector<GemmCase> cases;
  while (cases.size() < 24) {
    const int64_t m = ms[rng() % std::size(ms)], n = ns[rng() % std::size(ns)],
                  k = ks[rng() % std::size(ks)];
    if (m * n * k > 400'000'000) continue;  // keeps the host reference quick
    cases.push_back(random_case(rng, m, n, k));
  }
  check_cases(cases);
}

TEST(Sm90BlockFp8Gemm, BitwiseDeterministic) {
  SKIP_WITHOUT_HOPPER();
  const uint64_t seed = test_seed();
  std::printf("BitwiseDeterministic: seed %llu\n", static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  Stream stream;
  // A cluster-split swap case and a tiles case.
  for (const auto& s :
       std::array<std::array<int64_t, 3>, 2>{{{16, 1024, 7168}, {300, 768, 2048}}}) {
    const GemmCase c = random_case(rng, s[0], s[1], s[2]);
    const Buffers host = make_host_buffers(c);
    const Tensor first = run_sm90(c, host, stream.get());
    const Tensor second = run_sm90(c, host, stream.get());
    EXPECT_EQ(std::memcmp(first.data(), second.data(), first.nbytes()), 0) << describe(c);
  }
}

TEST(Sm90BlockFp8Gemm, DeclinesWhatItCannotServe) {
  SKIP_WITHOUT_HOPPER();
  // K = 3884: rows of A are 3884 bytes apart, not a multiple of 16 (TMA).
  GemmCase c;
  c.m = 4;
  c.n = 256;
  c.k = 3884;
  c.seed = 1;
  {
    const Buffers dev = to_device(make_host_buffers(c));
    const BlockGemmProblem p = problem_of(views_of(dev, c, Device::gpu()), c, nullptr);
    const std::string why = gpu::block_gemm_sm90_supports(p);
    EXPECT_NE(why.find("3884"), std::string::npos) << "reason: '" << why << "'";
  }
  // A base pointer one byte off.
  c.k = 256;
  c.a_row_pad = 16;
  {
    const Buffers dev = to_device(make_host_buffers(c));
    Views v = views_of(dev, c, Device::gpu());
    const std::array<int64_t, 2> shape{c.m, c.k}, strides{c.lda(), 1};
    v.a = TensorView(static_cast<char*>(dev.a.data()) + 1, DType::f8e4m3, shape, strides,
                     Device::gpu());
    const std::string why = gpu::block_gemm_sm90_supports(problem_of(v, c, nullptr));
    EXPECT_NE(why.find("aligned"), std::string::npos) << "reason: '" << why << "'";
  }
  // Tensors on the CPU.
  {
    const Buffers host = make_host_buffers(c);
    const BlockGemmProblem p = problem_of(views_of(host, c, Device::cpu()), c, nullptr);
    EXPECT_NE(gpu::block_gemm_sm90_supports(p), "");
  }
}

// The planner's swap choices on the decode shapes (the reasons `moekit explain` prints are these
// plans). With static weights (b_static): early weight loads everywhere, a 16-stage ring where K
// is long; for up to 16 tokens pushed sums, and two CTAs per SM where a CTA's k-range fits its
// ring; neither for wider tiles; weight tiles without L2 promotion (session 11). Without the
// promise: no early loads, the shallower ring, one CTA per SM.
TEST(Sm90BlockFp8Gemm, PlansFollowTheMeasuredChoices) {
  SKIP_WITHOUT_HOPPER();
  auto plan_of = [](int64_t m, int64_t n, int64_t k, bool b_static = true) {
    GemmCase c;
    c.m = m;
    c.n = n;
    c.k = k;
    c.out_dtype = DType::bf16;
    c.seed = 3;
    const Buffers dev = to_device(make_host_buffers(c));
    BlockGemmProblem p = problem_of(views_of(dev, c, Device::gpu()), c, nullptr);
    p.b_static = b_static;
    const std::string plan = gpu::block_gemm_sm90_plan(p);
    std::printf("  M=%lld N=%lld K=%lld: %s\n", static_cast<long long>(m),
                static_cast<long long>(n), static_cast<long long>(k), plan.c_str());
    return plan;
  };
  auto has = [](const std::string& plan, const char* what) {
    return plan.find(what) != std::string::npos;
  };
  const std::string long_k = plan_of(1, 4096, 7168);
  EXPECT_TRUE(has(long_k, "16 stages") && has(long_k, "early weight loads") &&
              has(long_k, "pushed sums") && !has(long_k, "2 CTAs per SM") &&
              has(long_k, "weights unpromoted in L2") && !has(long_k, "bulk-copied stores"))
      << long_k;
  const std::string short_k = plan_of(16, 4096, 2048);
  EXPECT_TRUE(has(short_k, "2 CTAs per SM") && has(short_k, "pushed sums")) << short_k;
  const std::string wide = plan_of(17, 4096, 2048);  // 32-token tiles: v3's sums and residency
  EXPECT_TRUE(has(wide, "32 tokens") && has(wide, "early weight loads") &&
              !has(wide, "2 CTAs per SM") && !has(wide, "pushed sums"))
      << wide;
  // Large M: the tiles kernel with two fragments taking turns (session 13), scales copied with the
  // tiles, and on long k-ranges with about a CTA per SM pairs sharing B tiles (session 15).
  const std::string large = plan_of(512, 4096, 7168);
  EXPECT_TRUE(has(large, "tiles: 128 x 128") && has(large, "two fragments take turns") &&
              has(large, "scales copied") && has(large, "pairs sharing B"))
      << large;
  // Wide tiles where a wide grid still has a CTA per SM, in pairs sharing A tiles (session 20).
  const std::string wide_tiles = plan_of(1024, 4096, 7168);
  EXPECT_TRUE(has(wide_tiles, "tiles: 256 x 128") && has(wide_tiles, "scales copied") &&
              has(wide_tiles, "pairs sharing A"))
      << wide_tiles;
  // 64 tiles: no pairs; K split over clusters of 2 (128 CTAs).
  const std::string few = plan_of(256, 4096, 7168);
  EXPECT_TRUE(has(few, "scales copied") && !has(few, "pairs sharing B") &&
              has(few, "K split 2 ways"))
      << few;
  const std::string short_range = plan_of(2048, 7168, 2048);  // 16 k-blocks: no pairs
  EXPECT_TRUE(has(short_range, "scales copied") && !has(short_range, "pairs") &&
              !has(short_range, "K split"))
      << short_range;
  // 112 tiles: a split would take two waves. A and B tiles with 128-byte L2 promotion (session 17).
  const std::string near_full = plan_of(256, 7168, 2048);
  EXPECT_TRUE(!has(near_full, "K split") && has(near_full, "128-byte L2 promotion")) << near_full;
  const std::string odd = plan_of(300, 4096, 4224);  // 33 k-blocks: 132-byte scale rows
  EXPECT_TRUE(has(odd, "scales from the scale warps")) << odd;
  const std::string batch = plan_of(64, 4096, 7168);
  // 64-token tiles: 8 of the 12 stages' weight tiles before the wait (session 8); the out tile
  // through shared memory and bulk copies (session 19).
  EXPECT_TRUE(has(batch, "early weight loads (8)") && !has(batch, "pushed sums") &&
              !has(batch, "2 CTAs per SM") && has(batch, "64 weight rows") &&
              has(batch, "K split 2 ways") && has(batch, "bulk-copied stores"))
      << batch;
  // Clusters of 3 where 64-row CTAs in pairs would leave half the SMs idle (fp8-gpu-sm90.md, v5).
  const std::string narrow = plan_of(64, 2048, 7168);
  EXPECT_TRUE(has(narrow, "64 weight rows") && has(narrow, "K split 3 ways")) << narrow;
  for (const auto& [m, n, k] : {std::array<int64_t, 3>{1, 4096, 7168}, {16, 4096, 2048}}) {
    const std::string unpromised = plan_of(m, n, k, /*b_static=*/false);
    EXPECT_TRUE(!has(unpromised, "early weight loads") && has(unpromised, "8 stages") &&
                !has(unpromised, "2 CTAs per SM"))
        << unpromised;
  }
}

using gpu_test::ScopedEnv;

// Sets MOEKIT_SM90_SWAP (the swap kernel's rows per CTA and cluster split) for one scope.
class ForcedSwap {
 public:
  ForcedSwap(int rows, int splits)
      : env_("MOEKIT_SM90_SWAP", std::to_string(rows) + "," + std::to_string(splits)) {}

 private:
  ScopedEnv env_;
};

// The swap kernel's tuning knobs for one scope: ring depth (0: the planner's), early weight loads,
// two CTAs per SM, pushed split sums (each 0 or 1 forced, -1 the planner's), weight tiles before
// the wait (0: the planner's).
struct SwapTuning {
  int stages;
  int early;
  int co_resident;
  int push;
  int early_tiles = 0;
};

std::string knob(int value) { return value < 0 ? "" : std::to_string(value); }

class ForcedTuning {
 public:
  explicit ForcedTuning(const SwapTuning& t)
      : stages_("MOEKIT_SM90_STAGES", std::to_string(t.stages)),
        early_("MOEKIT_SM90_EARLY", knob(t.early)),
        co_resident_("MOEKIT_SM90_CORESIDENT", knob(t.co_resident)),
        push_("MOEKIT_SM90_PUSH", knob(t.push)),
        early_tiles_("MOEKIT_SM90_EARLY_TILES", std::to_string(t.early_tiles)) {}

 private:
  ScopedEnv stages_, early_, co_resident_, push_, early_tiles_;
};

// Every swap layout the planner may pick (64 or 128 weight rows, clusters of 1..8, 3 and 6 too),
// whichever it would choose on this device.
TEST(Sm90BlockFp8Gemm, EverySwapLayoutAgreesWithReference) {
  SKIP_WITHOUT_HOPPER();
  const uint64_t seed = test_seed();
  std::printf("EverySwapLayoutAgreesWithReference: seed %llu (MOEKIT_TEST_SEED to repeat)\n",
              static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  Stream stream;
  const int64_t ms[] = {1, 16, 50, 100};
  for (const int rows : {64, 128}) {
    for (const int splits : {1, 2, 3, 4, 6, 8}) {  // 3 and 6: uneven k-ranges per rank
      const GemmCase c = random_case(rng, ms[rng() % 4], 320, 4096);
      const Buffers host = make_host_buffers(c);
      std::future<Tensor> ref =
          std::async(std::launch::async, [&] { return reference_output(c, host); });
      Tensor out;
      {
        ForcedSwap force(rows, splits);
        out = run_sm90(c, host, stream.get());
      }
      outputs_agree(c, out, ref.get());
    }
  }
}

// The tiles kernel with two fragments taking turns (k-blocks in groups of 4, stale slots past K)
// against the reference and, bit for bit, against one fragment: each output element takes the
// same products in the same order. Also bit for bit against two fragments: scales copied with the
// tiles (TMA) where the layouts allow it, and pairs of CTAs sharing B tiles (multicast) where the
// tile rows pair up (M = 129, 256, 200 and 1024 here). K-block counts of 1, 3, 8, 16, 33 and 56;
// partial tiles; every activation-scale layout on every shape (the weight scales' dtype and
// orientation at random), against the reference on one layout per shape.
TEST(Sm90BlockFp8Gemm, TilesTwoFragmentsEqualOneBitForBit) {
  SKIP_WITHOUT_HOPPER();
  const uint64_t seed = test_seed();
  std::printf("TilesTwoFragmentsEqualOneBitForBit: seed %llu (MOEKIT_TEST_SEED to repeat)\n",
              static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  Stream stream;
  const std::array<std::array<int64_t, 3>, 6> shapes{{{129, 256, 1024},
                                                      {300, 384, 2000},
                                                      {256, 200, 4224},
                                                      {513, 1152, 384},
                                                      {200, 130, 128},
                                                      {1024, 640, 7168}}};
  int copied = 0, paired = 0;
  for (size_t shape = 0; shape < shapes.size(); ++shape) {
    const auto& s = shapes[shape];
    for (size_t l = 0; l < 4; ++l) {
      GemmCase c = random_case(rng, s[0], s[1], s[2]);
      c.layout = kLayouts[l];
      // Weight scales the copies can read for the two TMA-copied activation layouts, so that the
      // count of copied cases below does not hang on the draw.
      if (l >= 2) c.b_scales_transposed = false;
      const Buffers host = make_host_buffers(c);
      const bool check_reference = l == shape % 4;
      std::future<Tensor> ref;
      if (check_reference)
        ref = std::async(std::launch::async, [&] { return reference_output(c, host); });
      const auto run = [&](const char* overlap, const char* scales, const char* pair) {
        ScopedEnv whole_k("MOEKIT_SM90_TILES_SPLIT", "1");  // a split adds its sums apart
        ScopedEnv o("MOEKIT_SM90_TILES_OVERLAP", overlap);
        ScopedEnv f("MOEKIT_SM90_TILES_SCALES", scales);
        ScopedEnv p("MOEKIT_SM90_TILES_PAIR", pair);
        return run_sm90(c, host, stream.get());
      };
      const Tensor one = run("0", "warps", "0");
      const Tensor two = run("1", "warps", "0");
      const Tensor copies = run("1", "copied", "0");
      const Tensor pairs = run("1", "copied", "1");
      {
        ScopedEnv whole_k("MOEKIT_SM90_TILES_SPLIT", "1");
        ScopedEnv f("MOEKIT_SM90_TILES_SCALES", "copied");
        ScopedEnv p("MOEKIT_SM90_TILES_PAIR", "1");
        const std::string plan = plan_of_case(c, host, stream.get());
        copied += plan.find("scales copied") != std::string::npos;
        paired += plan.find("pairs sharing B") != std::string::npos;
      }
      if (check_reference) outputs_agree(c, two, ref.get());
      EXPECT_EQ(std::memcmp(one.data(), two.data(), two.nbytes()), 0) << describe(c);
      EXPECT_EQ(std::memcmp(copies.data(), two.data(), two.nbytes()), 0) << describe(c);
      EXPECT_EQ(std::memcmp(pairs.data(), two.data(), two.nbytes()), 0) << describe(c);
    }
  }
  // Column-major TMA-aligned and packed scales are copied wherever the weight scales allow it;
  // four of the six shapes pair up.
  std::printf(" of 24 cases, %d copied their scales with the tiles, %d ran in pairs\n", copied,
              paired);
  EXPECT_GE(copied, 6);
  EXPECT_EQ(paired, 16);
}

// Wide tiles (256 x 128, MOEKIT_SM90_TILES_ROWS=256, the persistent kernel: two waves of 64 rows
// per consumer warpgroup and k-block) bit for bit against 128 x 128 tiles over the whole K without
// pairs: each output element takes the same products in the same order. Every activation-scale
// layout on every shape (partial tiles of rows, columns and K; k-block counts 1, 3, 6, 8, 16, 33
// and 56, so that the wide loop's ring of 3 stages ends on each of them), the cases' random out
// dtypes and biases; on one layout per shape also twice in a row
// on one stream (PDL) bitwise equal to a fresh call and close to the reference. Also in pairs of
// CTAs, which share A tiles (multicast) where the column tiles pair up (N = 130, 200, 256 here).
// Wide tiles need the scales copied with the tiles; elsewhere the plan keeps 128 rows.
TEST(Sm90BlockFp8Gemm, WideTilesEqualNarrowBitForBit) {
  SKIP_WITHOUT_HOPPER();
  const uint64_t seed = test_seed();
  std::printf("WideTilesEqualNarrowBitForBit: seed %llu (MOEKIT_TEST_SEED to repeat)\n",
              static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  Stream stream;
  const std::array<std::array<int64_t, 3>, 7> shapes{{{257, 384, 1024},
                                                      {513, 1152, 384},
                                                      {512, 256, 7168},
                                                      {300, 130, 2000},
                                                      {200, 256, 128},
                                                      {600, 200, 4224},
                                                      {260, 256, 768}}};
  const auto has = [](const std::string& plan, const char* what) {
    return plan.find(what) != std::string::npos;
  };
  struct Rows {
    const char* knob;
    const char* plan;   // the plan's tile
    const char* pairs;  // the plan's pairs
    int runs = 0, paired = 0;
  };
  Rows rows_of[] = {{"256", "tiles: 256 x 128", "pairs sharing A"}};
  for (size_t shape = 0; shape < shapes.size(); ++shape) {
    const auto& s = shapes[shape];
    for (size_t l = 0; l < 4; ++l) {
      GemmCase c = random_case(rng, s[0], s[1], s[2]);
      c.layout = kLayouts[l];
      // Row-major and TMA-aligned activation scales with f32 weight scales in rows: copied (so
      // wide) wherever the k-blocks are a multiple of 4, whatever the seed (3 shapes x 2 layouts).
      if (l == 0 || l == 2) {
        c.b_scale_dtype = DType::f32;
        c.b_scales_transposed = false;
      }
      const Buffers host = make_host_buffers(c);
      // The reference (on the host, the slow part) for one layout per shape.
      const bool check_reference = l == shape % 4;
      std::shared_future<Tensor> ref;
      if (check_reference)
        ref = std::async(std::launch::async, [&] { return reference_output(c, host); }).share();
      ScopedEnv whole_k("MOEKIT_SM90_TILES_SPLIT", "1");
      Tensor narrow;
      {
        ScopedEnv rows("MOEKIT_SM90_TILES_ROWS", "128");
        ScopedEnv no_pairs("MOEKIT_SM90_TILES_PAIR", "0");
        narrow = run_sm90(c, host, stream.get());
      }
      for (Rows& r : rows_of) {
        ScopedEnv rows("MOEKIT_SM90_TILES_ROWS", r.knob);
        Tensor pairs;
        {
          ScopedEnv with_pairs("MOEKIT_SM90_TILES_PAIR", "1");
          pairs = run_sm90(c, host, stream.get());
          const std::string plan = plan_of_case(c, host, stream.get());
          r.paired += has(plan, r.plan) && has(plan, r.pairs);
        }
        ScopedEnv no_pairs("MOEKIT_SM90_TILES_PAIR", "0");
        const std::string plan = plan_of_case(c, host, stream.get());
        if (check_reference) check_twice_equals_once(c, host, ref.get(), stream.get());
        const Tensor alone = run_sm90(c, host, stream.get());
        const bool copied = has(plan, "scales copied");
        EXPECT_EQ(has(plan, r.plan), copied) << plan;
        r.runs += copied;
        EXPECT_EQ(std::memcmp(alone.data(), narrow.data(), alone.nbytes()), 0)
            << r.plan << ": " << describe(c) << ", " << plan;
        EXPECT_EQ(std::memcmp(pairs.data(), narrow.data(), pairs.nbytes()), 0)
            << r.plan << " in pairs: " << describe(c) << ", " << plan;
      }
    }
  }
  // Row-major activation scales are copied wherever the weight scales allow it (the odd k-block
  // counts' rows are not 16-byte multiples), column-major TMA-aligned and packed ones too.
  for (const Rows& r : rows_of) {
    std::printf(" of 28 cases, %d ran %s, %d in %s\n", r.runs, r.plan, r.paired, r.pairs);
    EXPECT_GE(r.runs, 6) << r.plan;
    EXPECT_GE(r.paired, 1) << r.plan;
  }
}

// Persistent wide tiles on grids of more tiles than resident CTAs, so that each CTA (or pair) takes
// several tiles, its ring and activation-scale box slots running on from one to the next, each
// tile padded to whole turns of the ring (k-blocks 8, 16 and 4 are not multiples of its 3 stages,
// 12 is): bitwise equal to 128 x 128 tiles (a tile per CTA), out padding included, on every
// activation-scale layout, both weight-scale dtypes, in pairs and alone, with partial row and
// column tiles. Each case runs with both epilogues: TMA stores (bf16 or f16 out without bias, N a
// multiple of 8) and the threads' stores (f32 out with a bias, or bf16 out with a bias and N not a
// multiple of 8: a TMA store writes the whole 16 bytes in which a row ends).
TEST(Sm90BlockFp8Gemm, PersistentWideTilesEqualNarrowBitForBit) {
  SKIP_WITHOUT_HOPPER();
  const uint64_t seed = test_seed();
  std::printf("PersistentWideTilesEqualNarrowBitForBit: seed %llu (MOEKIT_TEST_SEED to repeat)\n",
              static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  Stream stream;
  // 256 tiles in pairs; 9 x 33 tiles alone (odd column count), the last row and column tiles
  // partial; 4 x 64 in pairs, the last row and column tiles partial; 9 x 32 in pairs, the last
  // row tile partial, 12 k-blocks.
  const std::array<std::array<int64_t, 3>, 4> shapes{
      {{2048, 4096, 1024}, {2100, 4104, 2048}, {1000, 8184, 512}, {2100, 4096, 1536}}};
  const auto has = [](const std::string& plan, const char* what) {
    return plan.find(what) != std::string::npos;
  };
  const std::array<DType, 3> bias_dtypes{DType::f32, DType::bf16, DType::f16};
  ScopedEnv whole_k("MOEKIT_SM90_TILES_SPLIT", "1");
  ScopedEnv rows("MOEKIT_SM90_TILES_ROWS", "256");
  ScopedEnv pairs("MOEKIT_SM90_TILES_PAIR", "1");  // (where the column tiles are even)
  int persistent_runs = 0, paired = 0, tma_runs = 0, thread_runs = 0, biased_runs = 0;
  for (const auto& s : shapes) {
    for (size_t l = 0; l < 4; ++l) {
      GemmCase base = random_case(rng, s[0], s[1], s[2]);
      base.layout = kLayouts[l];
      base.bias_dtype.reset();
      // Out rows on 16 bytes (TMA stores).
      base.out_row_pad = (8 - base.n % 8) % 8 + 8 * static_cast<int64_t>(rng() % 2);
      // bf16 out; f16 out; f32 out with a bias (threads' stores); bf16 out with N not a multiple
      // of 8 and a bias (threads' stores).
      std::array<GemmCase, 4> cases{base, base, base, base};
      cases[0].out_dtype = DType::bf16;
      cases[1].out_dtype = DType::f16;
      cases[2].out_dtype = DType::f32;
      cases[2].bias_dtype = bias_dtypes[rng() % 3];
      cases[3].out_dtype = DType::bf16;
      cases[3].n -= 2;
      cases[3].out_row_pad += 2;
      cases[3].bias_dtype = bias_dtypes[rng() % 3];
      for (size_t v = 0; v < cases.size(); ++v) {
        const GemmCase& c = cases[v];
        const Buffers host = make_host_buffers(c);
        Tensor narrow, persistent;
        {
          ScopedEnv tiles_of_128("MOEKIT_SM90_TILES_ROWS", "128");
          const std::string plan = plan_of_case(c, host, stream.get());
          EXPECT_FALSE(has(plan, "persistent")) << plan;
          narrow = run_sm90(c, host, stream.get());
        }
        const std::string plan = plan_of_case(c, host, stream.get());
        // Every wide plan is persistent; TMA stores for the first two variants only.
        EXPECT_EQ(has(plan, "persistent"), has(plan, "tiles: 256 x 128")) << plan;
        if (has(plan, "persistent")) EXPECT_EQ(has(plan, "TMA stores"), v < 2) << plan;
        persistent_runs += has(plan, "persistent");
        paired += has(plan, "persistent") && has(plan, "pairs sharing A");
        tma_runs += has(plan, "TMA stores");
        thread_runs += has(plan, "persistent") && !has(plan, "TMA stores");
        biased_runs += has(plan, "persistent") && c.bias_dtype.has_value();
        persistent = run_sm90(c, host, stream.get());
        EXPECT_EQ(std::memcmp(persistent.data(), narrow.data(), narrow.nbytes()), 0)
            << describe(c) << ", " << plan;
      }
    }
  }
  std::printf(
      " of 64 cases, %d ran persistent (%d with TMA stores, %d with the threads' stores, "
      "%d with a bias), %d in pairs\n",
      persistent_runs, tma_runs, thread_runs, biased_runs, paired);
  EXPECT_GE(persistent_runs, 32);
  EXPECT_GE(tma_runs, 16);
  EXPECT_GE(thread_runs, 16);
  EXPECT_GE(biased_runs, 16);
  EXPECT_GE(paired, 16);
}

// The persistent kernel's last round split over K (a workspace given; wide tiles, pairs and the
// split, which the plan takes on 32+ k-blocks only, forced on 8 k-blocks to keep the reference
// short, and 3 parts a unit): 72 units for 66 pairs and 153
// CTAs alone for 132 on a 132-SM card, so ranges of 2 or 3 k-blocks that begin inside scale boxes
// and units summed by three pairs or CTAs. Against the reference on row-major and packed activation
// scales, with TMA stores (bf16 or f16 out, N a multiple of 8) and the threads' stores (f32 out
// with a bias, or 16-bit out at N=2100); twice in a row on one stream (PDL) bitwise equal to a call
// on fresh buffers with the same workspace; the flags zero again after the calls.
TEST(Sm90BlockFp8Gemm, SplitLastRoundAgreesWithReference) {
  SKIP_WITHOUT_HOPPER();
  const uint64_t seed = test_seed();
  std::printf("SplitLastRoundAgreesWithReference: seed %llu (MOEKIT_TEST_SEED to repeat)\n",
              static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  Stream stream;
  ScopedEnv rows("MOEKIT_SM90_TILES_ROWS", "256");
  ScopedEnv pairs("MOEKIT_SM90_TILES_PAIR", "1");  // (where the column tiles are even)
  ScopedEnv parts("MOEKIT_SM90_SPLIT_PARTS", "3");
  ScopedEnv split("MOEKIT_SM90_SPLIT_ROUND", "2");  // (the last rounds here are at most half full)
  const std::array<std::array<int64_t, 3>, 2> shapes{{{2200, 2048, 1024}, {2200, 2100, 1000}}};
  const size_t bytes = gpu::block_gemm_workspace_size(2200, 2100, 1024, 0);
  ASSERT_GT(bytes, 0u);
  Tensor workspace = Tensor::empty(DType::u8, {static_cast<int64_t>(bytes)}, Device::gpu());
  MOEKIT_GPU_CHECK(cudaMemset(workspace.data(), 0, bytes));
  const auto with_workspace = [&](BlockGemmProblem p) {
    p.workspace = workspace.data();
    p.workspace_bytes = bytes;
    return p;
  };
  std::vector<GemmCase> cases;
  for (const auto& s : shapes)
    for (const ScaleLayout layout : {ScaleLayout::row_major, ScaleLayout::packed_ue8m0})
      for (const bool tma : {true, false}) {
        GemmCase c = random_case(rng, s[0], s[1], s[2]);
        c.layout = layout;
        c.b_scales_transposed = false;  // (a layout the copied scales read: wide tiles)
        // 16-bit out without bias (f16 on packed scales), or f32 out with a bias.
        c.out_dtype = !tma                                  ? DType::f32
                      : layout == ScaleLayout::packed_ue8m0 ? DType::f16
                                                            : DType::bf16;
        c.bias_dtype.reset();
        if (!tma) c.bias_dtype = DType::bf16;
        c.out_row_pad = tma ? (8 - c.n % 8) % 8 : 1;
        cases.push_back(c);
      }
  std::vector<Buffers> hosts;
  for (const GemmCase& c : cases) hosts.push_back(make_host_buffers(c));
  std::vector<std::future<Tensor>> refs;
  for (size_t i = 0; i < cases.size(); ++i)
    refs.push_back(
        std::async(std::launch::async, [&, i] { return reference_output(cases[i], hosts[i]); }));
  int split_runs = 0;
  for (size_t i = 0; i < cases.size(); ++i) {
    const GemmCase& c = cases[i];
    const bool tma = c.out_dtype != DType::f32 && c.n % 8 == 0;  // (else the threads store)
    const Buffers dev = to_device(hosts[i]);
    const BlockGemmProblem p =
        with_workspace(problem_of(views_of(dev, c, Device::gpu()), c, stream.get()));
    ASSERT_EQ(gpu::block_gemm_sm90_supports(p), "") << describe(c);
    const std::string plan = gpu::block_gemm_sm90_plan(p);
    std::printf("  plan %s\n", plan.c_str());
    const size_t at = plan.find("split over K by ");
    EXPECT_NE(at, std::string::npos) << plan;
    EXPECT_EQ(plan.find("TMA stores") != std::string::npos, tma) << plan;
    const int ctas = at == std::string::npos
                         ? 0
                         : std::atoi(plan.c_str() + at + 16) *
                               (plan.find("pairs sharing A") != std::string::npos ? 2 : 1);
    split_runs += ctas > 0;
    gpu::block_fp8_gemm_sm90(p);
    gpu::block_fp8_gemm_sm90(p);
    MOEKIT_GPU_CHECK(cudaGetLastError());
    gpu::synchronize(stream.get());
    const Tensor twice = Tensor::copy_of(dev.out, Device::cpu());
    const Buffers fresh = to_device(hosts[i]);
    gpu::block_fp8_gemm_sm90(
        with_workspace(problem_of(views_of(fresh, c, Device::gpu()), c, stream.get())));
    MOEKIT_GPU_CHECK(cudaGetLastError());
    gpu::synchronize(stream.get());
    const Tensor once = Tensor::copy_of(fresh.out, Device::cpu());
    EXPECT_EQ(std::memcmp(once.data(), twice.data(), once.nbytes()), 0) << describe(c);
    std::vector<uint32_t> flags(static_cast<size_t>(gpu::device_properties(0).sm_count));
    MOEKIT_GPU_CHECK(
        cudaMemcpy(flags.data(), workspace.data(), flags.size() * 4, cudaMemcpyDeviceToHost));
    EXPECT_EQ(std::count(flags.begin(), flags.end(), 0u), static_cast<int64_t>(flags.size()))
        << "flags left set: " << plan;
    outputs_agree(c, once, refs[i].get());
  }
  EXPECT_EQ(split_runs, 8);
}

// The tiles kernel with K split over clusters of 2, 3 and 4 CTAs (and the planner's choice): each
// rank multiplies its share of the k-blocks (whole groups of 4; a share may begin inside a packed
// scale box) and stages its partial tile; each then adds its share of the tile's rows from every
// rank, in rank order, through distributed shared memory, and stores them. Against the reference
// on every activation-scale layout; twice in a row on one stream (PDL) bitwise equal to a fresh
// call; partial tiles and K.
TEST(Sm90BlockFp8Gemm, TilesSplitKAgreesWithReference) {
  SKIP_WITHOUT_HOPPER();
  const uint64_t seed = test_seed();
  std::printf("TilesSplitKAgreesWithReference: seed %llu (MOEKIT_TEST_SEED to repeat)\n",
              static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  Stream stream;
  // k-blocks 32, 56, 16 (partial), 24 (partial), 8: splits allowed up to 4, 4, 2, 3, 1.
  const std::array<std::array<int64_t, 3>, 5> shapes{
      {{200, 384, 4096}, {256, 640, 7168}, {300, 130, 2000}, {129, 1152, 3000}, {256, 256, 1024}}};
  int split_runs = 0;
  for (const auto& s : shapes) {
    for (const ScaleLayout layout : kLayouts) {
      GemmCase c = random_case(rng, s[0], s[1], s[2]);
      c.layout = layout;
      const Buffers host = make_host_buffers(c);
      std::future<Tensor> ref =
          std::async(std::launch::async, [&] { return reference_output(c, host); });
      const Tensor expected = ref.get();
      const int64_t k_groups = (c.k_blocks() + 3) / 4;
      for (const char* split : {"", "2", "3", "4"}) {
        ScopedEnv force("MOEKIT_SM90_TILES_SPLIT", split);
        std::printf("  split %s\n", *split ? split : "(planner)");
        const std::string plan = check_twice_equals_once(c, host, expected, stream.get());
        if (*split) {
          const int n = std::atoi(split);
          const bool fits = k_groups >= 2 * n;
          EXPECT_EQ(plan.find("K split " + std::to_string(n) + " ways") != std::string::npos, fits)
              << plan << ": " << describe(c);
          split_runs += fits;
        }
      }
    }
  }
  // Per layout: 3 + 3 + 1 + 2 + 0 forced splits run.
  EXPECT_EQ(split_runs, 4 * 9);
}

// Every tuning of the swap kernel (shallowest and deepest rings, weight loads before the previous
// grid's end or after, two CTAs per SM, pushed or pulled split sums, the planner's choice) on
// token widths 8..128, M just below and above the widths where the planner's choices change
// (16 | 17, 32 | 33, 64 | 65), K-ranges that fit the ring or not, partial K blocks and cluster
// splits; each case twice in a row on one stream (the second call overlaps the first through PDL)
// and the two outputs bitwise equal to a fresh call's.
TEST(Sm90BlockFp8Gemm, EverySwapTuningAgreesWithReference) {
  SKIP_WITHOUT_HOPPER();
  const uint64_t seed = test_seed();
  std::printf("EverySwapTuningAgreesWithReference: seed %llu (MOEKIT_TEST_SEED to repeat)\n",
              static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  Stream stream;
  const std::array<std::array<int64_t, 3>, 8> shapes{{{1, 4096, 7168},
                                                      {9, 512, 2000},
                                                      {16, 640, 4096},
                                                      {17, 512, 4224},
                                                      {32, 256, 2048},
                                                      {33, 384, 7168},
                                                      {64, 1024, 3000},
                                                      {65, 256, 1024}}};
  const SwapTuning tunings[] = {{2, 0, 0, 0}, {24, 1, 0, 1},    {8, 1, 1, 1},   {0, 0, 1, 0},
                                {4, 1, 1, 1}, {16, 1, 0, 1, 3}, {0, -1, -1, -1}};
  for (const SwapTuning& tuning : tunings) {
    std::printf(" stages %d, early %d, co-resident %d, push %d, early tiles %d\n", tuning.stages,
                tuning.early, tuning.co_resident, tuning.push, tuning.early_tiles);
    for (const auto& s : shapes) {
      const GemmCase c = random_case(rng, s[0], s[1], s[2]);
      const Buffers host = make_host_buffers(c);
      std::future<Tensor> ref =
          std::async(std::launch::async, [&] { return reference_output(c, host); });
      ForcedTuning force(tuning);
      check_twice_equals_once(c, host, ref.get(), stream.get());
    }
  }
}

// A knob that must not change a bit: the case with `knob` = 0, then with 1 through
// check_twice_equals_once (reference, PDL), the two outputs bitwise equal. Returns the plan with 1.
std::string check_knob_keeps_bits(const GemmCase& c, const Buffers& host, const Tensor& expected,
                                  const char* knob, cudaStream_t stream) {
  Tensor off;
  {
    ScopedEnv zero(knob, "0");
    off = run_sm90(c, host, stream);
  }
  ScopedEnv one(knob, "1");
  const std::string plan = check_twice_equals_once(c, host, expected, stream);
  const Tensor on = run_sm90(c, host, stream);
  EXPECT_EQ(std::memcmp(on.data(), off.data(), on.nbytes()), 0)
      << knob << ": " << describe(c) << ", " << plan;
  return plan;
}

// The swap kernel's out tile through shared memory and bulk copies (MOEKIT_SM90_BULK_STORES=1,
// where the out rows are 16-byte aligned and N's last tile ends on 16 bytes) bit for bit against
// element stores (=0): both row counts, clusters of 1, 2 and 4 (pushed and pulled sums), token
// widths 8..128 with partial token tiles, partial weight tiles (N = 8 (mod 64) and 16 + 128 i),
// every out dtype and bias at random; twice in a row on one stream (PDL) bitwise equal to a fresh
// call, and close to the reference. A row pitch off 16 bytes falls back to element stores, as does
// a ring too shallow for the staged tile (some 100- and 128-token layouts).
TEST(Sm90BlockFp8Gemm, BulkCopiedStoresEqualElementStores) {
  SKIP_WITHOUT_HOPPER();
  const uint64_t seed = test_seed();
  std::printf("BulkCopiedStoresEqualElementStores: seed %llu (MOEKIT_TEST_SEED to repeat)\n",
              static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  Stream stream;
  const int64_t ms[] = {1, 9, 16, 33, 64, 100, 128};
  const char* layouts[] = {"64,1", "64,2", "128,1", "128,2", "128,4"};
  int bulk = 0, cases = 0;
  for (const char* layout : layouts) {
    for (const int64_t m : ms) {
      GemmCase c = random_case(rng, m, 8 + 64 * static_cast<int64_t>(1 + rng() % 6), 2304);
      if (rng() % 2) c.n = 16 + 128 * static_cast<int64_t>(1 + rng() % 3);
      c.out_row_pad = 8 * static_cast<int64_t>(rng() % 3);  // 16-byte row pitch in every dtype
      const bool aligned = cases % 7 != 6;
      if (!aligned) c.out_row_pad = 1;  // off 16 bytes: element stores
      ++cases;
      const Buffers host = make_host_buffers(c);
      std::future<Tensor> ref =
          std::async(std::launch::async, [&] { return reference_output(c, host); });
      ScopedEnv force("MOEKIT_SM90_SWAP", layout);
      const std::string plan =
          check_knob_keeps_bits(c, host, ref.get(), "MOEKIT_SM90_BULK_STORES", stream.get());
      const bool bulk_plan = plan.find("bulk-copied stores") != std::string::npos;
      // Up to 64 tokens the staged tile always fits the ring; wider ones where the ring is deep.
      if (!aligned || m <= 64) EXPECT_EQ(bulk_plan, aligned) << plan << ": " << describe(c);
      bulk += bulk_plan;
    }
  }
  std::printf(" %d of %d cases took bulk-copied stores\n", bulk, cases);
}

// The swap kernel's activation scales loaded by two producer warps group by group
// (MOEKIT_SM90_SCALE_LOADER=1; the consumers wait for each group's barrier) bit for bit against
// the consumers loading them all before their loop: both row counts, clusters of 1-4 (k-ranges
// not a multiple of the group), token widths 8..128, every scale layout and out dtype at random;
// twice in a row on one stream (PDL) bitwise equal to a fresh call, and close to the reference.
TEST(Sm90BlockFp8Gemm, ScaleLoaderWarpsEqualConsumerLoads) {
  SKIP_WITHOUT_HOPPER();
  const uint64_t seed = test_seed();
  std::printf("ScaleLoaderWarpsEqualConsumerLoads: seed %llu (MOEKIT_TEST_SEED to repeat)\n",
              static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  Stream stream;
  const int64_t ms[] = {1, 9, 16, 33, 64, 100, 128};
  int loaded = 0, cases = 0;
  for (const char* layout : {"64,1", "64,2", "128,3", "128,4", ""}) {
    for (const int64_t m : ms) {
      const GemmCase c = random_case(rng, m, 64 * static_cast<int64_t>(2 + rng() % 5), 2944);
      const Buffers host = make_host_buffers(c);
      std::future<Tensor> ref =
          std::async(std::launch::async, [&] { return reference_output(c, host); });
      ScopedEnv force("MOEKIT_SM90_SWAP", layout);
      const std::string plan =
          check_knob_keeps_bits(c, host, ref.get(), "MOEKIT_SM90_SCALE_LOADER", stream.get());
      loaded += plan.find("scales loaded by producer warps") != std::string::npos;
      ++cases;
    }
  }
  EXPECT_EQ(loaded, cases) << "every case loaded its scales in the producer's warps";
}

// ---- Timings (printed, never asserted): CUDA events around CUDA-graph replays.

struct TimedShape {
  int64_t m, n, k;
};

// A shape's inputs in enough copies that the weights do not all sit in L2 (calls rotate through
// them), and the problems over them.
struct TimedInputs {
  GemmCase c;
  Buffers host;
  std::vector<Buffers> devs;
  std::vector<BlockGemmProblem> problems;
};

TimedInputs timed_inputs(const TimedShape& s, uint64_t seed) {
  TimedInputs in;
  GemmCase& c = in.c;
  c.m = s.m;
  c.n = s.n;
  c.k = s.k;
  c.out_dtype = DType::bf16;
  c.seed = seed;
  const double weight_bytes = static_cast<double>(s.n) * static_cast<double>(s.k);
  const int copies = static_cast<int>(std::clamp(std::ceil(256e6 / weight_bytes), 1.0, 16.0));
  in.host = make_host_buffers(c);
  for (int i = 0; i < copies; ++i) in.devs.push_back(to_device(in.host));
  for (const Buffers& d : in.devs)
    in.problems.push_back(problem_of(views_of(d, c, Device::gpu()), c, nullptr));
  return in;
}

// Median microseconds per call over graph replays; prints one line.
double time_and_print(const TimedInputs& in, const char* label) {
  const GemmCase& c = in.c;
  const std::string why = gpu::block_gemm_sm90_supports(in.problems[0]);
  if (!why.empty()) {
    std::printf("  M=%lld N=%lld K=%lld declined: %s\n", static_cast<long long>(c.m),
                static_cast<long long>(c.n), static_cast<long long>(c.k), why.c_str());
    return 0.0;
  }
  const auto copies = static_cast<double>(in.problems.size());
  const double us = gpu::median_graph_replay_us(
                        [&](void* stream) {
                          for (BlockGemmProblem p : in.problems) {
                            p.stream = stream;
                            gpu::block_fp8_gemm_sm90(p);
                          }
                        },
                        1, 20) /
                    copies;
  const double m = static_cast<double>(c.m), n = static_cast<double>(c.n),
               k = static_cast<double>(c.k);
  const double flops = 2.0 * m * n * k;
  const double bytes = m * k + n * k + 2.0 * m * n;
  std::printf("  M=%-5lld N=%-5lld K=%-5lld %-8s %9.2f us %7.1f TFLOPS %7.0f GB/s  [%s]\n",
              static_cast<long long>(c.m), static_cast<long long>(c.n), static_cast<long long>(c.k),
              label, us, flops / us * 1e-6, bytes / us * 1e-3,
              gpu::block_gemm_sm90_plan(in.problems[0]).c_str());
  return us;
}

TEST(Sm90BlockFp8Gemm, PrintsTimings) {
  SKIP_WITHOUT_HOPPER();
  const gpu::DeviceProperties props = gpu::device_properties(0);
  std::printf("Sm90 timings on %s (%d SMs)\n", props.name.c_str(), props.sm_count);
  const TimedShape shapes[] = {
      {4096, 7168, 16384}, {64, 4096, 7168},  {1, 4096, 7168},    {4, 4096, 7168}, {16, 4096, 7168},
      {128, 4096, 7168},   {512, 4096, 7168}, {2048, 7168, 2048}, {1, 7168, 2048}, {1, 2048, 7168}};
  std::mt19937_64 rng(7);
  for (const TimedShape& s : shapes) {
    const TimedInputs in = timed_inputs(s, rng());
    time_and_print(in, "auto");
    // The first rows of the large case against the reference (a sub-problem of 2 rows).
    if (s.m == 4096) {
      const GemmCase& c = in.c;
      Tensor out = Tensor::copy_of(in.devs[0].out, Device::cpu());
      GemmCase sub = c;
      sub.m = 2;
      const Views hv = views_of(in.host, c, Device::cpu());
      const std::array<int64_t, 2> a_shape{2, c.k}, a_strides{c.lda(), 1};
      const std::array<int64_t, 2> as_shape{2, c.k_blocks()};
      const std::array<int64_t, 2> out_shape{2, c.n}, out_strides{c.ldo(), 1};
      Tensor ref = Tensor::empty(c.out_dtype, {2 * c.ldo()});
      OpOptions options;
      const BlockGemmProblem p = make_block_gemm_problem(
          kOp, TensorView(hv.a.data(), DType::f8e4m3, a_shape, a_strides),
          TensorView(hv.a_scales.data(), DType::f32, as_shape), ScaleLayout::row_major, hv.b,
          hv.b_scales, std::nullopt, TensorView(ref.data(), c.out_dtype, out_shape, out_strides),
          options);
      reference::block_fp8_gemm(p);
      Tensor got = Tensor::empty(c.out_dtype, {2 * c.ldo()});
      std::memcpy(got.data(), out.data(), got.nbytes());
      outputs_agree(sub, got, ref);
    }
  }
  std::printf("  copy bandwidth %.0f GB/s\n", gpu::measure_copy_bandwidth_gbs());
}

// Each swap tuning forced in turn on the decode shapes (printed only).
TEST(Sm90BlockFp8Gemm, PrintsSwapTuningTimings) {
  SKIP_WITHOUT_HOPPER();
  std::mt19937_64 rng(13);
  const TimedShape shapes[] = {{1, 4096, 7168},  {4, 4096, 7168},  {16, 4096, 7168},
                               {64, 4096, 7168}, {1, 4096, 2048},  {16, 4096, 2048},
                               {1, 7168, 2048},  {16, 7168, 2048}, {128, 4096, 7168}};
  // The planner's choice, then v3's (8 stages, no early loads, one CTA per SM, pulled sums), then
  // the planner's with one choice reversed at a time.
  const SwapTuning tunings[] = {{0, -1, -1, -1}, {8, 0, 0, 0},    {0, 0, -1, -1},
                                {0, -1, -1, 0},  {0, -1, -1, 1},  {0, -1, 0, -1},
                                {0, -1, 1, -1},  {8, -1, -1, -1}, {24, -1, -1, -1}};
  for (const TimedShape& s : shapes) {
    const TimedInputs in = timed_inputs(s, rng());
    for (const SwapTuning& t : tunings) {
      ForcedTuning force(t);
      const std::string label = "s" + std::to_string(t.stages) + "e" + knob(t.early) + "c" +
                                knob(t.co_resident) + "p" + knob(t.push);
      time_and_print(in, label.c_str());
    }
  }
}

// The M=64 experiments of issue 4 (docs/perf/fp8-gpu-sm90.md, v5), each setting in turn on the
// shapes whose plans they change (printed only): clusters of 3 (MOEKIT_SM90_SPLIT3: 0 none, 1 for
// both row counts), pushed sums through the conflict-free inbox (MOEKIT_SM90_PUSH=1), forced
// layouts (MOEKIT_SM90_SWAP).
TEST(Sm90BlockFp8Gemm, PrintsM64ExperimentTimings) {
  SKIP_WITHOUT_HOPPER();
  std::mt19937_64 rng(17);
  const TimedShape shapes[] = {{64, 4096, 7168}, {128, 4096, 7168}, {48, 4096, 7168},
                               {64, 2048, 7168}, {64, 7168, 2048},  {16, 4096, 7168}};
  struct Setting {
    const char* label;
    const char* split3;
    const char* push;
    const char* swap;
  };
  const Setting settings[] = {{"auto", "", "", ""},          {"no3", "0", "", ""},
                              {"all3", "1", "", ""},         {"auto+push", "", "1", ""},
                              {"no3+push", "0", "1", ""},    {"128,3", "", "", "128,3"},
                              {"128,3+p", "", "1", "128,3"}, {"64,3", "", "", "64,3"},
                              {"128,6", "", "", "128,6"},    {"auto", "", "", ""}};
  for (const TimedShape& s : shapes) {
    const TimedInputs in = timed_inputs(s, rng());
    for (const Setting& setting : settings) {
      ScopedEnv split3("MOEKIT_SM90_SPLIT3", setting.split3);
      ScopedEnv push("MOEKIT_SM90_PUSH", setting.push);
      ScopedEnv swap("MOEKIT_SM90_SWAP", setting.swap);
      time_and_print(in, setting.label);
    }
  }
}

// Each swap layout forced in turn, for tuning the planner (printed only).
TEST(Sm90BlockFp8Gemm, PrintsSwapLayoutTimings) {
  SKIP_WITHOUT_HOPPER();
  std::mt19937_64 rng(11);
  const std::array<std::array<int, 2>, 7> layouts{
      {{64, 1}, {64, 2}, {64, 4}, {128, 1}, {128, 2}, {128, 4}, {128, 8}}};
  for (const int64_t m : {1, 16, 64, 128}) {
    const TimedInputs in = timed_inputs({m, 4096, 7168}, rng());
    for (const auto& l : layouts) {
      ForcedSwap force(l[0], l[1]);
      const std::string label = std::to_string(l[0]) + "," + std::to_string(l[1]);
      time_and_print(in, label.c_str());
    }
  }
}

// ---- Phase stamps (builds configured with -DMOEKIT_FP8_TRACE=ON; skipped otherwise).
//
// Where one call's time goes (docs/perf/fp8-gpu-sm90.md, v10): the decode shapes as `moekit bench`
// runs them (static weights, bf16 out, weights rotating over copies, CUDA-graph replays), a few
// replays recorded, and for each call inside a replay (its first call follows the previous replay's
// end, not a kernel, and is left out) the phases of its CTAs in ns from the call's first entry:
// min / median / max over CTAs, each the median over calls. MOEKIT_TRACE_CSV=path appends every
// record there.

using gpu_test::median_of;
using gpu_test::print_trace;

// One CSV line per trace record (MOEKIT_TRACE_CSV): the shape, the calls per graph, the record's
// labels, then its stamps in ns and in SM cycles.
void write_trace_csv(std::FILE* csv, const TimedShape& s, int calls,
                     const gpu::Sm90TraceRecord& r) {
  std::fprintf(csv, "%lld,%lld,%lld,%d,%u,%u,%u,%u,%u,%u", static_cast<long long>(s.m),
               static_cast<long long>(s.n), static_cast<long long>(s.k), calls, r.ticket,
               r.grid_ctas, r.block_x, r.block_y, r.rank, r.sm);
  for (uint64_t t : r.time_ns) std::fprintf(csv, ",%llu", static_cast<unsigned long long>(t));
  for (uint64_t t : r.cycles) std::fprintf(csv, ",%llu", static_cast<unsigned long long>(t));
  std::fprintf(csv, "\n");
}

// The tiles kernel's ring waits (diagnosis builds, MOEKIT_FP8_TRACE): per CTA, its time and SM
// clock (entry to exit stamps), the share of it that consumer thread 0 spent waiting for full
// stages and that the producer thread spent waiting for empty ones. Tiles of 128 rows (the
// persistent wide kernel records nothing). Honours the other timing and ablation knobs of the
// library (e.g. MOEKIT_SM90_TILES_ABLATE=7), so that runs can be compared.
// Checks that every CTA left a whole record and that no wait exceeds its CTA's time.
TEST(Sm90BlockFp8Gemm, PrintsTilesRingWaits) {
  SKIP_WITHOUT_HOPPER();
  if (!gpu::block_gemm_sm90_trace_built())
    GTEST_SKIP() << "built without MOEKIT_FP8_TRACE: the tiles kernel records no waits";
  const gpu::DeviceProperties props = gpu::device_properties(0);
  std::printf("Tiles ring waits on %s (%d SMs)\n", props.name.c_str(), props.sm_count);
  ScopedEnv tiles_of_128("MOEKIT_SM90_TILES_ROWS", "128");
  std::mt19937_64 rng(23);
  constexpr int kCalls = 3;
  for (const TimedShape& s : {TimedShape{4096, 7168, 16384}, TimedShape{1024, 4096, 7168}}) {
    TimedInputs in = timed_inputs(s, rng());
    Stream stream;
    for (BlockGemmProblem& p : in.problems) p.stream = stream.get();
    gpu::block_fp8_gemm_sm90(in.problems[0]);  // warm-up
    MOEKIT_GPU_CHECK(cudaStreamSynchronize(stream.get()));
    gpu::block_gemm_sm90_trace_reset();
    for (int i = 0; i < kCalls; ++i)
      gpu::block_fp8_gemm_sm90(in.problems[static_cast<size_t>(i) % in.problems.size()]);
    MOEKIT_GPU_CHECK(cudaStreamSynchronize(stream.get()));
    const std::vector<gpu::Sm90TraceRecord> records = gpu::block_gemm_sm90_trace_read();
    ASSERT_FALSE(records.empty());
    const uint32_t grid = records[0].grid_ctas;
    EXPECT_EQ(records.size(), std::min<size_t>(static_cast<size_t>(grid) * kCalls,
                                               gpu::block_gemm_sm90_trace_capacity()));
    const int at_entry = static_cast<int>(gpu::Sm90TracePhase::entry);
    const int at_exit = static_cast<int>(gpu::Sm90TracePhase::exit);
    const int full = static_cast<int>(gpu::kTilesFullWaits);
    const int empty = static_cast<int>(gpu::kTilesEmptyWaits);
    std::vector<double> us, ghz, full_share, empty_share;
    // Consumer thread 0's milestones, us from the CTA's entry.
    const gpu::Sm90TracePhase milestones[] = {gpu::Sm90TracePhase::last_consumed,
                                              gpu::Sm90TracePhase::sums_done,
                                              gpu::Sm90TracePhase::stores_issued};
    std::vector<double> milestone_us[3];
    for (const gpu::Sm90TraceRecord& r : records) {
      for (int j = 0; j < 3; ++j) {
        const int at = static_cast<int>(milestones[j]);
        if (r.time_ns[at] != 0)
          milestone_us[j].push_back(static_cast<double>(r.time_ns[at] - r.time_ns[at_entry]) *
                                    1e-3);
      }
      ASSERT_TRUE(r.time_ns[at_entry] != 0 && r.time_ns[at_exit] > r.time_ns[at_entry]) << r.ticket;
      ASSERT_EQ(r.time_ns[empty], 1u) << "the producer's wait count is missing, CTA " << r.ticket;
      const double cycles = static_cast<double>(r.cycles[at_exit] - r.cycles[at_entry]);
      const double ns = static_cast<double>(r.time_ns[at_exit] - r.time_ns[at_entry]);
      EXPECT_LE(static_cast<double>(r.cycles[full]), cycles) << r.ticket;
      EXPECT_LE(static_cast<double>(r.cycles[empty]), cycles) << r.ticket;
      us.push_back(ns * 1e-3);
      ghz.push_back(cycles / ns);
      full_share.push_back(static_cast<double>(r.cycles[full]) / cycles);
      empty_share.push_back(static_cast<double>(r.cycles[empty]) / cycles);
    }
    std::printf(
        "M=%lld N=%lld K=%lld, %u CTAs x %d calls [%s]\n  per CTA (median): %.2f us at %.3f GHz; "
        "consumer thread 0 waiting for full stages %.1f %%, producer waiting for empty stages "
        "%.1f %%\n",
        static_cast<long long>(s.m), static_cast<long long>(s.n), static_cast<long long>(s.k), grid,
        kCalls, gpu::block_gemm_sm90_plan(in.problems[0]).c_str(), median_of(us), median_of(ghz),
        100.0 * median_of(full_share), 100.0 * median_of(empty_share));
    if (!milestone_us[0].empty() && !milestone_us[1].empty() && !milestone_us[2].empty())
      std::printf(
          "  consumer thread 0 (median us from entry): loop done %.2f, tile staged %.2f, stores "
          "issued %.2f\n",
          median_of(milestone_us[0]), median_of(milestone_us[1]), median_of(milestone_us[2]));
  }
}

TEST(Sm90BlockFp8Gemm, PrintsPhaseStamps) {
  SKIP_WITHOUT_HOPPER();
  const bool traced = gpu::block_gemm_sm90_trace_built();
  const gpu::DeviceProperties props = gpu::device_properties(0);
  std::printf("Phase stamps on %s (%d SMs)%s\n", props.name.c_str(), props.sm_count,
              traced ? "" : ": built without MOEKIT_FP8_TRACE, times only");
  std::FILE* csv = nullptr;
  if (const char* path = std::getenv("MOEKIT_TRACE_CSV")) csv = std::fopen(path, "a");
  std::mt19937_64 rng(19);
  const TimedShape shapes[] = {
      {1, 4096, 7168}, {4, 4096, 7168}, {16, 4096, 7168}, {64, 4096, 7168}, {1, 7168, 2048}};
  constexpr int kTracedReplays = 4;
  for (const TimedShape& s : shapes) {
    TimedInputs in = timed_inputs(s, rng());
    for (BlockGemmProblem& p : in.problems) p.b_static = true;  // as `moekit bench` calls it
    const int calls = static_cast<int>(in.problems.size());
    Stream stream;
    for (BlockGemmProblem& p : in.problems) p.stream = stream.get();
    gpu::block_fp8_gemm_sm90(in.problems[0]);  // lazy set-up outside the capture
    MOEKIT_GPU_CHECK(cudaStreamSynchronize(stream.get()));
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    MOEKIT_GPU_CHECK(cudaStreamBeginCapture(stream.get(), cudaStreamCaptureModeThreadLocal));
    for (const BlockGemmProblem& p : in.problems) gpu::block_fp8_gemm_sm90(p);
    MOEKIT_GPU_CHECK(cudaStreamEndCapture(stream.get(), &graph));
    MOEKIT_GPU_CHECK(cudaGraphInstantiateWithFlags(&exec, graph, 0));
    const double us_per_call = gpu::median_exec_replay_us(exec, stream.get(), calls, 20);
    std::printf("M=%lld N=%lld K=%lld: %.2f us per call (graph of %d, %s build) [%s]\n",
                static_cast<long long>(s.m), static_cast<long long>(s.n),
                static_cast<long long>(s.k), us_per_call, calls, traced ? "traced" : "plain",
                gpu::block_gemm_sm90_plan(in.problems[0]).c_str());
    if (traced) {
      gpu::block_gemm_sm90_trace_reset();
      for (int i = 0; i < kTracedReplays; ++i)
        MOEKIT_GPU_CHECK(cudaGraphLaunch(exec, stream.get()));
      const std::vector<gpu::Sm90TraceRecord> records = gpu::block_gemm_sm90_trace_read();
      print_trace(records, calls);
      if (csv != nullptr) {
        for (const gpu::Sm90TraceRecord& r : records) write_trace_csv(csv, s, calls, r);
      }
    }
    (void)cudaGraphExecDestroy(exec);
    (void)cudaGraphDestroy(graph);
  }
  if (csv != nullptr) std::fclose(csv);
}

// Where the split last round's time goes (diagnosis builds, MOEKIT_FP8_TRACE): the persistent
// kernel with a workspace, calls rotating over weight copies as in the timings above, one graph
// replay traced. Prints, per step of consumer thread 0 (fp8_gemm_sm90.h, persistent_trace), the
// min / median / max over CTAs in us from the call's first entry, and the median of each CTA's
// time from its previous step. Checks that every CTA of a split plan left a whole record in order.
TEST(Sm90BlockFp8Gemm, PrintsSplitRoundStamps) {
  SKIP_WITHOUT_HOPPER();
  if (!gpu::block_gemm_sm90_trace_built())
    GTEST_SKIP() << "built without MOEKIT_FP8_TRACE: the persistent kernel records nothing";
  const gpu::DeviceProperties props = gpu::device_properties(0);
  std::printf("Split round stamps on %s (%d SMs)\n", props.name.c_str(), props.sm_count);
  std::FILE* csv = nullptr;
  if (const char* path = std::getenv("MOEKIT_TRACE_CSV")) csv = std::fopen(path, "a");
  std::mt19937_64 rng(29);
  namespace pt = gpu::persistent_trace;
  using Phase = gpu::Sm90TracePhase;
  // Consumer thread 0's steps, in the order a CTA passes them.
  const std::pair<Phase, const char*> steps[] = {{Phase::entry, "entry"},
                                                 {Phase::consumer_waited, "griddepcontrol.wait"},
                                                 {pt::whole_done, "whole units done"},
                                                 {pt::partial_multiplied, "partial multiplied"},
                                                 {pt::partial_saved, "partial stored"},
                                                 {pt::partial_published, "partial published"},
                                                 {pt::final_multiplied, "final multiplied"},
                                                 {pt::partners_ready, "last flag seen"},
                                                 {pt::partials_added, "partials added"},
                                                 {Phase::stores_issued, "last stores issued"},
                                                 {Phase::exit, "exit"}};
  for (const TimedShape& s : {TimedShape{1280, 4096, 7168}, TimedShape{2304, 4096, 7168},
                              TimedShape{2560, 7168, 16384}}) {
    TimedInputs in = timed_inputs(s, rng());
    const size_t bytes = gpu::block_gemm_workspace_size(s.m, s.n, s.k, 0);
    ASSERT_GT(bytes, 0u);
    Tensor workspace = Tensor::empty(DType::u8, {static_cast<int64_t>(bytes)}, Device::gpu());
    MOEKIT_GPU_CHECK(cudaMemset(workspace.data(), 0, bytes));
    for (BlockGemmProblem& p : in.problems) {
      p.workspace = workspace.data();
      p.workspace_bytes = bytes;
    }
    const std::string plan = gpu::block_gemm_sm90_plan(in.problems[0]);
    const double us = time_and_print(in, "traced");
    if (plan.find("split over K") == std::string::npos) {
      std::printf("  (no split round in this plan: nothing recorded)\n");
      continue;
    }
    const int calls = static_cast<int>(in.problems.size());
    gpu::block_gemm_sm90_trace_reset();
    {
      Stream stream;
      for (BlockGemmProblem p : in.problems) {
        p.stream = stream.get();
        gpu::block_fp8_gemm_sm90(p);
      }
      MOEKIT_GPU_CHECK(cudaStreamSynchronize(stream.get()));
    }
    const std::vector<gpu::Sm90TraceRecord> records = gpu::block_gemm_sm90_trace_read();
    ASSERT_FALSE(records.empty());
    const uint32_t grid = records[0].grid_ctas;
    ASSERT_EQ(records.size(), std::min<size_t>(static_cast<size_t>(grid) * calls,
                                               gpu::block_gemm_sm90_trace_capacity()));
    constexpr int kSteps = 11;
    std::vector<double> at[kSteps], own[kSteps], reached(kSteps, 0.0);
    int steady = 0;
    for (int call = 1; call < calls; ++call) {  // (the first follows set-up, not a call)
      const size_t first = static_cast<size_t>(call) * grid;
      if (first + grid > records.size()) break;
      ++steady;
      uint64_t t0 = UINT64_MAX;
      for (size_t i = first; i < first + grid; ++i)
        t0 = std::min<uint64_t>(t0, records[i].time_ns[static_cast<int>(Phase::entry)]);
      for (size_t i = first; i < first + grid; ++i) {
        const gpu::Sm90TraceRecord& r = records[i];
        ASSERT_NE(r.time_ns[static_cast<int>(Phase::exit)], 0u) << "CTA " << r.ticket;
        uint64_t previous = 0;
        for (int j = 0; j < kSteps; ++j) {
          const uint64_t t = r.time_ns[static_cast<int>(steps[j].first)];
          if (t == 0) continue;
          EXPECT_GE(t, previous) << steps[j].second << ", CTA " << r.ticket;
          at[j].push_back(static_cast<double>(t - t0) * 1e-3);
          if (previous != 0) own[j].push_back(static_cast<double>(t - previous) * 1e-3);
          previous = t;
          reached[j] += 1.0;
        }
        if (csv != nullptr) write_trace_csv(csv, s, calls, r);
      }
    }
    std::printf("  %d calls of %u CTAs (untraced graph above: %.2f us per call, traced build)\n",
                steady, grid, us);
    std::printf("  %-22s %8s %8s %8s %9s %6s\n", "step (consumer thread 0)", "min", "median", "max",
                "own", "CTAs");
    for (int j = 0; j < kSteps; ++j) {
      if (at[j].empty()) continue;
      std::sort(at[j].begin(), at[j].end());
      std::printf("  %-22s %8.2f %8.2f %8.2f %9.2f %6.0f\n", steps[j].second, at[j].front(),
                  median_of(at[j]), at[j].back(), own[j].empty() ? 0.0 : median_of(own[j]),
                  reached[j] / std::max(steady, 1));
    }
  }
  if (csv != nullptr) std::fclose(csv);
}

}  // namespace
}  // namespace moekit
