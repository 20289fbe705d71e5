// silu_and_mul_grouped_block_fp8_gemm_masked on the GPU: the one-launch Hopper entry
// ("gpu.sm90.fused", its kernel quantizing silu(gate) * up itself) against the two ops apart on the
// GPU ("gpu.apart": silu_and_mul_group_quant_fp8_masked's launch, then grouped_block_fp8_gemm's)
// byte for byte on each group's rows, nothing written past them; against the reference within the
// contract's tolerance; with counts written late by the kernel before; the entries' choices.
// Skips without a GPU; where the fused entry does not serve (not Hopper, no sm_90a code) it says
// why.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "gpu/gpu_check.h"
#include "gpu_test_support.h"
#include "late_counts.cuh"
#include "moekit/dtype.h"
#include "moekit/ops/fp8.h"
#include "moekit/tensor.h"

namespace moekit {
namespace {

constexpr const char* kFused = "gpu.sm90.fused";
constexpr uint8_t kSentinel = 0xA5;

struct Case {
  int64_t groups, m, n, k;
  std::vector<int32_t> counts;
  int64_t expected_rows = 0;
  bool ue8m0 = false;
  DType out = DType::bf16;
  bool special_values = false;  // NaN, inf, huge and tiny gates and ups in group 0
};

std::string describe(const Case& c) {
  return "G=" + std::to_string(c.groups) + " M=" + std::to_string(c.m) +
         " N=" + std::to_string(c.n) + " K=" + std::to_string(c.k) +
         " expected=" + std::to_string(c.expected_rows) + (c.ue8m0 ? " ue8m0" : "") +
         " out=" + std::string(dtype_name(c.out)) + (c.special_values ? " special values" : "");
}

struct Operands {
  Tensor x, b, bs;  // on the host
};

Operands make_operands(std::mt19937_64& rng, const Case& c) {
  const int64_t G = c.groups, M = c.m, N = c.n, K = c.k;
  std::normal_distribution<float> normal(0.0f, 2.0f);
  Tensor x = Tensor::empty(DType::bf16, {G, M, 2 * K});
  for (int64_t i = 0; i < x.numel(); ++i) store_from_f32(x.data(), DType::bf16, i, normal(rng));
  if (c.special_values) {
    const float specials[] = {std::numeric_limits<float>::quiet_NaN(),
                              std::numeric_limits<float>::infinity(),
                              -std::numeric_limits<float>::infinity(),
                              3e38f,
                              -3e38f,
                              1e-30f,
                              -1e-38f,
                              0.0f,
                              -0.0f,
                              90.0f,
                              -90.0f};
    // Row 0 of group 0: one special gate or up every 7 elements; row 1 (if any): every gate 0.
    for (int64_t i = 0; i < 2 * K; i += 7)
      store_from_f32(x.data(), DType::bf16, i, specials[(i / 7) % std::size(specials)]);
    if (M > 1)
      for (int64_t i = 0; i < K; ++i) store_from_f32(x.data(), DType::bf16, 2 * K + i, 0.0f);
  }
  Tensor b = Tensor::empty(DType::f8e4m3, {G, N, K});
  for (int64_t i = 0; i < b.numel(); ++i) {
    const auto byte = static_cast<uint8_t>(rng());
    b.data_as<uint8_t>()[i] = (byte & 0x7f) == 0x7f ? static_cast<uint8_t>(byte ^ 1) : byte;
  }
  Tensor bs = Tensor::empty(DType::f32, {G, (N + 127) / 128, K / 128});
  std::uniform_real_distribution<float> u(0.001f, 0.01f);
  for (int64_t i = 0; i < bs.numel(); ++i) bs.data_as<float>()[i] = u(rng);
  return {std::move(x), std::move(b), std::move(bs)};
}

GroupQuantConfig config_of(const Case& c) {
  GroupQuantConfig config;
  config.ue8m0 = c.ue8m0;
  return config;
}

// The op through `implementation` into a sentinel-filled out on the GPU (with a workspace where
// `workspace`), the counts in masked_m written late where `stale` is given; the chosen entry's
// name in `chosen` (else every entry's reason). Returns out on the host.
Tensor run_on_gpu(const Case& c, const Operands& o, const char* implementation, bool workspace,
                  const std::vector<int32_t>& stale, std::string& chosen) {
  const Device gpu = Device::gpu();
  const Tensor x = Tensor::copy_of(o.x, gpu), b = Tensor::copy_of(o.b, gpu),
               bs = Tensor::copy_of(o.bs, gpu);
  Tensor counts = Tensor::empty(DType::i32, {c.groups});
  std::memcpy(counts.data(), c.counts.data(), counts.nbytes());
  const Tensor counts_gpu = Tensor::copy_of(counts, gpu);
  if (!stale.empty()) std::memcpy(counts.data(), stale.data(), counts.nbytes());
  const Tensor masked_m = Tensor::copy_of(counts, gpu);
  Tensor out = Tensor::empty(c.out, {c.groups, c.m, c.n}, gpu);
  MOEKIT_GPU_CHECK(cudaMemset(out.data(), kSentinel, out.nbytes()));
  const size_t bytes =
      workspace ? silu_and_mul_grouped_block_fp8_gemm_masked_workspace_size(c.groups, c.m, c.k) : 0;
  Tensor space = Tensor::empty(DType::u8, {static_cast<int64_t>(std::max<size_t>(bytes, 1))}, gpu);
  void* ws = workspace ? space.data() : nullptr;
  const gpu_test::Stream stream;
  OpOptions options;
  options.backend = Backend::gpu;
  options.implementation = implementation;
  options.stream = stream.get();
  chosen.clear();
  std::string reasons;
  for (const ImplementationChoice& row : explain_silu_and_mul_grouped_block_fp8_gemm_masked(
           x, masked_m, b, bs, out, config_of(c), c.expected_rows, ws, bytes, options)) {
    if (row.chosen) chosen = row.name;
    reasons += row.name + ": " + row.reason + "; ";
  }
  if (chosen.empty()) {
    chosen = "none (" + reasons + ")";
    return Tensor();
  }
  MOEKIT_GPU_CHECK(cudaDeviceSynchronize());
  if (!stale.empty())
    gpu_test::write_counts_late<<<1, 128, 0, stream.get()>>>(masked_m.data_as<int32_t>(),
                                                             counts_gpu.data_as<const int32_t>(),
                                                             static_cast<int>(c.groups), 200000);
  silu_and_mul_grouped_block_fp8_gemm_masked(x, masked_m, b, bs, out, config_of(c), c.expected_rows,
                                             ws, bytes, options);
  MOEKIT_GPU_CHECK(cudaStreamSynchronize(stream.get()));
  return Tensor::copy_of(out, Device::cpu());
}

// Whether the fused entry serves a Qwen3-30B decode step here (printing why not).
bool fused_entry_present() {
  const Case probe{4, 1, 2048, 768, {1, 0, 1, 0}, 1};
  std::mt19937_64 rng(1);
  const Operands o = make_operands(rng, probe);
  const Device gpu = Device::gpu();
  const Tensor x = Tensor::copy_of(o.x, gpu), b = Tensor::copy_of(o.b, gpu),
               bs = Tensor::copy_of(o.bs, gpu);
  const Tensor masked_m = Tensor::empty(DType::i32, {4}, gpu);
  const Tensor out = Tensor::empty(DType::bf16, {4, 1, 2048}, gpu);
  OpOptions options;
  options.backend = Backend::gpu;
  for (const ImplementationChoice& row : explain_silu_and_mul_grouped_block_fp8_gemm_masked(
           x, masked_m, b, bs, out, config_of(probe), 1, nullptr, 0, options))
    if (row.name == kFused) {
      if (!row.chosen) std::printf("%s does not serve here: %s\n", kFused, row.reason.c_str());
      return row.chosen;
    }
  return false;
}

// The fused launch (no workspace) against the two launches apart: each group's rows the same
// bytes, every other byte of out untouched (the sentinel). With `stale`, masked_m holds those
// counts until the kernel before writes the case's.
void check_fused_equals_apart(std::mt19937_64& rng, const Case& c,
                              const std::vector<int32_t>& stale = {}) {
  SCOPED_TRACE(describe(c) + (stale.empty() ? "" : ", counts written late"));
  const Operands o = make_operands(rng, c);
  std::string chosen;
  const Tensor fused = run_on_gpu(c, o, kFused, false, stale, chosen);
  ASSERT_EQ(chosen, kFused);
  const Tensor apart = run_on_gpu(c, o, "gpu.apart", true, stale, chosen);
  ASSERT_EQ(chosen, "gpu.apart");
  const size_t element = dtype_size(c.out);
  for (int64_t g = 0; g < c.groups; ++g) {
    const int64_t rows = std::clamp<int64_t>(c.counts[static_cast<size_t>(g)], 0, c.m);
    const size_t plane = static_cast<size_t>(c.m * c.n) * element;
    const auto* got = fused.data_as<uint8_t>() + g * plane;
    const auto* want = apart.data_as<uint8_t>() + g * plane;
    const size_t valid = static_cast<size_t>(rows * c.n) * element;
    EXPECT_EQ(std::memcmp(got, want, valid), 0) << "group " << g << ", " << rows << " rows";
    size_t written = 0;
    for (size_t byte = valid; byte < plane; ++byte) written += got[byte] != kSentinel;
    EXPECT_EQ(written, 0u) << "bytes written past group " << g << "'s " << rows << " rows";
  }
}

TEST(GpuSiluGroupedGemm, OneLaunchEqualsTheTwoOpsApartBitForBit) {
  SKIP_WITHOUT_ENTRY(fused_entry_present(), kFused);
  std::mt19937_64 rng(gpu_test::seed_for("GpuSiluGroupedGemm.OneLaunchEquals"));
  // Qwen3-30B-A3B's down projection at a decode step (capacity 8 and 128, hint 1).
  check_fused_equals_apart(rng,
                           {16, 8, 2048, 768, {1, 0, 0, 3, 0, 0, 1, 0, 8, 0, 0, 0, 2, 0, 0, 1}, 1});
  check_fused_equals_apart(rng, {12, 128, 2048, 768, {1, 0, 0, 1, 0, 1, 0, 0, 1, 0, 1, 1}, 1});
  // Qwen3-235B's and DeepSeek-V3's down projections, 16 rows, f32 out, ue8m0 scales.
  check_fused_equals_apart(rng, {6, 16, 4096, 1536, {16, 0, 5, 16, 1, -3}, 16, true, DType::f32});
  check_fused_equals_apart(rng, {3, 16, 7168, 2048, {9, 16, 2}, 0});
  // Several token tiles per group (capacity 200, tiles of 16 and 32 rows).
  check_fused_equals_apart(rng, {5, 200, 512, 768, {0, 199, 3, 64, 65}, 0});
  check_fused_equals_apart(rng, {4, 96, 1024, 1024, {96, 33, 0, 40}, 30, false, DType::f16});
  // K split over a cluster where the grouped plan takes one (few row tiles, long K).
  check_fused_equals_apart(rng, {2, 4, 256, 4096, {4, 3}, 4});
  // NaN, inf, huge, tiny and zero gates and ups.
  check_fused_equals_apart(rng, {3, 4, 1024, 768, {4, 2, 1}, 4, false, DType::bf16, true});
  // Nothing to do: nothing written.
  check_fused_equals_apart(rng, {3, 2, 512, 1024, {0, 0, -1}, 0});
}

// The counts are the previous kernel's output: the kernel before writes them late, while the
// fused launch's CTAs already run, and the launch uses the new counts.
TEST(GpuSiluGroupedGemm, CountsWrittenByTheKernelBeforeAreTheOnesUsed) {
  SKIP_WITHOUT_ENTRY(fused_entry_present(), kFused);
  std::mt19937_64 rng(gpu_test::seed_for("GpuSiluGroupedGemm.CountsLate"));
  check_fused_equals_apart(rng, {8, 16, 2048, 768, {1, 0, 16, 0, 3, 0, 0, 2}, 0},
                           {0, 16, 0, 5, 0, 0, 9, 0});
  check_fused_equals_apart(rng, {5, 200, 1024, 768, {0, 199, 3, 64, 65}, 24}, {7, 0, 0, 130, 0});
}

// The fused launch against the reference (the two ops apart on the host) within the contract's
// tolerance for bf16 out: the bytes equal to the GPU's apart are also right.
TEST(GpuSiluGroupedGemm, AgreesWithTheReference) {
  SKIP_WITHOUT_ENTRY(fused_entry_present(), kFused);
  std::mt19937_64 rng(gpu_test::seed_for("GpuSiluGroupedGemm.Reference"));
  const Case c{4, 8, 1024, 768, {8, 0, 3, 1}, 8};
  const Operands o = make_operands(rng, c);
  std::string chosen;
  const Tensor fused = run_on_gpu(c, o, kFused, false, {}, chosen);
  ASSERT_EQ(chosen, kFused);
  Tensor counts = Tensor::empty(DType::i32, {c.groups});
  std::memcpy(counts.data(), c.counts.data(), counts.nbytes());
  Tensor ref = Tensor::empty(DType::f32, {c.groups, c.m, c.n});
  const size_t bytes =
      silu_and_mul_grouped_block_fp8_gemm_masked_workspace_size(c.groups, c.m, c.k);
  std::vector<uint8_t> space(bytes + 16);
  void* ws = space.data() + (16 - reinterpret_cast<uintptr_t>(space.data()) % 16) % 16;
  silu_and_mul_grouped_block_fp8_gemm_masked(o.x, counts, o.b, o.bs, ref, config_of(c), 0, ws,
                                             bytes, {Backend::reference});
  for (int64_t g = 0; g < c.groups; ++g) {
    const int64_t rows = std::clamp<int64_t>(c.counts[static_cast<size_t>(g)], 0, c.m);
    double error = 0, magnitude = 0;
    for (int64_t i = 0; i < rows * c.n; ++i) {
      const float want = ref.data_as<float>()[g * c.m * c.n + i];
      const float got = load_as_f32(fused.data(), DType::bf16, g * c.m * c.n + i);
      error += std::fabs(static_cast<double>(got) - want);
      magnitude += std::fabs(static_cast<double>(want));
    }
    if (rows > 0)
      EXPECT_LT(error / magnitude, 1e-3 + 1.0 / 256) << "group " << g;  // spec/fp8.md, bf16
  }
}

// The dispatch: without a workspace only the fused entry serves (an f32 x then has none, a clear
// error); with one, gpu.apart takes what the fused entry declines.
TEST(GpuSiluGroupedGemm, EntriesDeclineWithTheirReasons) {
  SKIP_WITHOUT_ENTRY(fused_entry_present(), kFused);
  const Device gpu = Device::gpu();
  const int64_t G = 2, M = 4, N = 256, K = 768;
  const Tensor x = Tensor::empty(DType::f32, {G, M, 2 * K}, gpu);
  const Tensor b = Tensor::empty(DType::f8e4m3, {G, N, K}, gpu);
  const Tensor bs = Tensor::empty(DType::f32, {G, 2, K / 128}, gpu);
  const Tensor masked_m = Tensor::empty(DType::i32, {G}, gpu);
  const Tensor out = Tensor::empty(DType::bf16, {G, M, N}, gpu);
  OpOptions options;
  options.backend = Backend::gpu;
  const auto chosen_of = [&](void* ws, size_t bytes, std::string& fused_reason) {
    std::string chosen;
    for (const ImplementationChoice& row : explain_silu_and_mul_grouped_block_fp8_gemm_masked(
             x, masked_m, b, bs, out, GroupQuantConfig{}, 0, ws, bytes, options)) {
      if (row.chosen) chosen = row.name;
      if (row.name == kFused) fused_reason = row.reason;
    }
    return chosen;
  };
  std::string reason;
  EXPECT_EQ(chosen_of(nullptr, 0, reason), "");
  EXPECT_NE(reason.find("x is f32"), std::string::npos) << reason;
  EXPECT_THROW(silu_and_mul_grouped_block_fp8_gemm_masked(
                   x, masked_m, b, bs, out, GroupQuantConfig{}, 0, nullptr, 0, options),
               Error);
  const size_t bytes = silu_and_mul_grouped_block_fp8_gemm_masked_workspace_size(G, M, K);
  const Tensor space = Tensor::empty(DType::u8, {static_cast<int64_t>(bytes)}, gpu);
  EXPECT_EQ(chosen_of(space.data(), bytes, reason), "gpu.apart");
  // bf16 x, but a hint of 64 rows: the plan's 64-token tiles have no fused build.
  const Tensor x16 = Tensor::empty(DType::bf16, {G, 64, 2 * K}, gpu);
  const Tensor out64 = Tensor::empty(DType::bf16, {G, 64, N}, gpu);
  std::string chosen, why;
  for (const ImplementationChoice& row : explain_silu_and_mul_grouped_block_fp8_gemm_masked(
           x16, masked_m, b, bs, out64, GroupQuantConfig{}, 64, nullptr, 0, options)) {
    if (row.chosen) chosen = row.name;
    if (row.name == kFused) why = row.reason;
  }
  EXPECT_EQ(chosen, "");
  EXPECT_NE(why.find("64-token tiles"), std::string::npos) << why;
}

}  // namespace
}  // namespace moekit
