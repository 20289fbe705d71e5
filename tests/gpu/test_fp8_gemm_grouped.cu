// grouped_block_fp8_gemm on the GPU: the one-launch Hopper entry ("gpu.sm90.grouped") against
// block_fp8_gemm's "gpu.sm90" entry called once per group: the same bytes for every group, over
// model shapes and ragged ones, k-ranges of odd length (where the alternating warpgroups swap
// roles from group to group), every swap layout it inherits, shallow rings that wrap within a
// group, every activation-scale layout and output dtype; the gaps between groups stay unwritten;
// the per-group entry where the grouped one declines. Skips without a GPU; where the grouped
// entry does not serve (not Hopper, no sm_90a code) it says why.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "gpu/gpu_check.h"
#include "gpu_test_support.h"
#include "late_counts.cuh"
#include "moekit/dtype.h"
#include "moekit/ops/fp8.h"
#include "moekit/tensor.h"
#include "ops/fp8_problem.h"

namespace moekit {
namespace {

constexpr const char* kGrouped = "gpu.sm90.grouped";
constexpr const char* kGroupedWide = "gpu.sm90.grouped_wide";
constexpr uint8_t kSentinel = 0xA5;

using gpu_test::ScopedEnv;

struct Case {
  int64_t groups, m, n, k;
  ScaleLayout layout = ScaleLayout::row_major;
  DType out = DType::bf16;
  DType b_scales = DType::f32;
  bool static_weights = true;
};

std::string describe(const Case& c) {
  return "G=" + std::to_string(c.groups) + " M=" + std::to_string(c.m) +
         " N=" + std::to_string(c.n) + " K=" + std::to_string(c.k) + " " +
         scale_layout_name(c.layout) + " out=" + std::string(dtype_name(c.out)) +
         " b_scales=" + std::string(dtype_name(c.b_scales)) + (c.static_weights ? " static" : "");
}

// The operands on the GPU, a quantized from random activations group by group.
struct Operands {
  Tensor a, as, b, bs;
  int64_t gap = 5;  // out elements between groups beyond M x N
};

Operands make_operands(std::mt19937_64& rng, const Case& c) {
  const int64_t G = c.groups, M = c.m, N = c.n, K = c.k;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  GroupQuantConfig config;
  config.layout = c.layout;
  config.ue8m0 = c.layout == ScaleLayout::packed_ue8m0;
  const ScaleStorage storage = group_quant_scale_storage(M, K, config);
  Tensor a = Tensor::empty(DType::f8e4m3, {G, M, K});
  Tensor as = Tensor::empty(storage.dtype, {G, storage.shape[0], storage.shape[1]});
  std::memset(as.data(), 0, as.nbytes());  // (the TMA-aligned layouts' padding rows)
  for (int64_t g = 0; g < G; ++g) {
    Tensor x = Tensor::empty(DType::f32, {M, K});
    for (int64_t i = 0; i < x.numel(); ++i) x.data_as<float>()[i] = normal(rng);
    per_token_group_quant_fp8(x, plane_of(a, g), plane_of(as, g), config, {Backend::cpu});
  }
  Tensor b = Tensor::empty(DType::f8e4m3, {G, N, K});
  for (int64_t i = 0; i < b.numel(); ++i) {
    const auto byte = static_cast<uint8_t>(rng());
    b.data_as<uint8_t>()[i] = (byte & 0x7f) == 0x7f ? static_cast<uint8_t>(byte ^ 1) : byte;
  }
  Tensor bs = Tensor::empty(c.b_scales, {G, (N + 127) / 128, (K + 127) / 128});
  std::uniform_real_distribution<float> u(0.001f, 0.01f);
  for (int64_t i = 0; i < bs.numel(); ++i) store_from_f32(bs.data(), bs.dtype(), i, u(rng));
  const Device gpu = Device::gpu();
  return {Tensor::copy_of(a, gpu), Tensor::copy_of(as, gpu), Tensor::copy_of(b, gpu),
          Tensor::copy_of(bs, gpu)};
}

// out [G, M, N] with `gap` elements after each group, filled with the sentinel.
Tensor sentinel_out(const Case& c, int64_t gap) {
  Tensor out = Tensor::empty(c.out, {c.groups * (c.m * c.n + gap)}, Device::gpu());
  MOEKIT_GPU_CHECK(cudaMemset(out.data(), kSentinel, out.nbytes()));
  return out;
}

TensorView grouped_view(const Tensor& out, const Case& c, int64_t gap) {
  const int64_t shape[] = {c.groups, c.m, c.n}, strides[] = {c.m * c.n + gap, c.n, 1};
  return TensorView(out.data(), c.out, shape, strides, out.device());
}

// Runs the case through `implementation` of the grouped op and through gpu.sm90 per group;
// expects the same bytes and untouched gaps. Returns false (with a message) where the grouped
// entry declines.
// The swap layout ("rows,splits") a grouped plan's detail names: each group's out has the bits
// gpu.sm90 writes with that layout (the grouped plan may pick another than group 0's own).
std::string layout_of(const std::string& detail) {
  int tokens = 0, rows = 0, splits = 0;
  const size_t at = detail.find("launch: ");
  if (at == std::string::npos ||
      std::sscanf(detail.c_str() + at, "launch: %d tokens x %d weight rows per CTA, K split %d",
                  &tokens, &rows, &splits) != 3)
    return "";
  return std::to_string(rows) + "," + std::to_string(splits);
}

bool check_case(std::mt19937_64& rng, const Case& c, const char* implementation = kGrouped) {
  SCOPED_TRACE(describe(c));
  const Operands o = make_operands(rng, c);
  Tensor grouped = sentinel_out(c, o.gap);
  OpOptions options;
  options.backend = Backend::gpu;
  options.static_weights = c.static_weights;
  options.implementation = implementation;
  const TensorView out = grouped_view(grouped, c, o.gap);
  std::string layout;
  for (const ImplementationChoice& row :
       explain_grouped_block_fp8_gemm(o.a, o.as, c.layout, o.b, o.bs, out, options)) {
    if (row.name != implementation) continue;
    if (!row.chosen) {
      std::printf("%s declines %s: %s\n", implementation, describe(c).c_str(), row.reason.c_str());
      return false;
    }
    std::printf("%s: %s\n", describe(c).c_str(), row.detail.c_str());
    layout = layout_of(row.detail);
    if (implementation == std::string(kGrouped)) EXPECT_FALSE(layout.empty()) << row.detail;
  }
  grouped_block_fp8_gemm(o.a, o.as, c.layout, o.b, o.bs, out, options);
  OpOptions single = options;
  single.implementation = "gpu.sm90";
  // The per-group entry runs gpu.sm90's own plan; the grouped one, its layout.
  std::optional<ScopedEnv> same_layout;
  if (!layout.empty()) same_layout.emplace("MOEKIT_SM90_SWAP", layout);
  const Tensor got = Tensor::copy_of(grouped, Device::cpu());
  const size_t element = dtype_size(c.out);
  for (int64_t g = 0; g < c.groups; ++g) {
    Tensor expected = Tensor::empty(c.out, {c.m, c.n}, Device::gpu());
    block_fp8_gemm(plane_of(o.a, g), plane_of(o.as, g), c.layout, plane_of(o.b, g),
                   plane_of(o.bs, g), std::nullopt, expected, single);
    const Tensor want = Tensor::copy_of(expected, Device::cpu());
    const char* group = got.data_as<char>() + g * (c.m * c.n + o.gap) * element;
    EXPECT_EQ(std::memcmp(group, want.data(), want.nbytes()), 0) << "group " << g;
    for (size_t byte = want.nbytes(); byte < want.nbytes() + o.gap * element; ++byte)
      EXPECT_EQ(static_cast<uint8_t>(group[byte]), kSentinel) << "gap after group " << g;
  }
  MOEKIT_GPU_CHECK(cudaDeviceSynchronize());
  return true;
}

bool grouped_entry_present() {
  if (!backend_available(Backend::gpu)) return false;
  std::mt19937_64 rng(1);
  const Case probe{2, 1, 128, 256};
  const Operands o = make_operands(rng, probe);
  Tensor out = sentinel_out(probe, o.gap);
  OpOptions options;
  options.backend = Backend::gpu;
  for (const ImplementationChoice& row : explain_grouped_block_fp8_gemm(
           o.a, o.as, probe.layout, o.b, o.bs, grouped_view(out, probe, o.gap), options))
    if (row.name == kGrouped) {
      if (!row.chosen) std::printf("%s does not serve here: %s\n", kGrouped, row.reason.c_str());
      return row.chosen;
    }
  return false;
}

TEST(GpuGroupedGemm, OneLaunchEqualsBlockFp8GemmPerGroupBitForBit) {
  SKIP_WITHOUT_ENTRY(grouped_entry_present(), kGrouped);
  std::mt19937_64 rng(gpu_test::seed_for("GpuGroupedGemm.OneLaunchEquals"));
  const Case cases[] = {
      {4, 1, 4096, 7168},  // gate_up of the issue's decode shape
      {3, 4, 4096, 7168, ScaleLayout::row_major, DType::bf16, DType::f32, false},
      {3, 16, 4096, 7168},
      {3, 5, 7168, 2048, ScaleLayout::column_major_tma, DType::f32, DType::bf16},
      {2, 16, 4096, 3840},  // 30 k-blocks: 15 per rank, odd
      {5, 9, 200, 384, ScaleLayout::packed_ue8m0, DType::f16},
      {3, 2, 7748, 3968, ScaleLayout::column_major},  // 31 k-blocks
      {1, 16, 512, 1024},
      {6, 3, 1536, 2048},  // an MoE expert's gate_up (Qwen3-30B-A3B)
      // Token tiles of 32 and 64 rows
      {3, 24, 4096, 7168},
      {2, 64, 1536, 2048, ScaleLayout::row_major, DType::f32},
      {3, 33, 2048, 768, ScaleLayout::column_major},
      {4, 50, 200, 3840, ScaleLayout::column_major_tma, DType::f16},
  };
  int served = 0;
  for (const Case& c : cases) served += check_case(rng, c);
  EXPECT_GE(served, 11);
}

TEST(GpuGroupedGemm, EverySwapLayoutAndShallowRings) {
  SKIP_WITHOUT_ENTRY(grouped_entry_present(), kGrouped);
  std::mt19937_64 rng(gpu_test::seed_for("GpuGroupedGemm.EverySwapLayout"));
  for (const char* layout : {"64,1", "128,1", "64,2", "128,2", "64,4", "128,4", "64,8"}) {
    ScopedEnv force("MOEKIT_SM90_SWAP", layout);
    SCOPED_TRACE(std::string("MOEKIT_SM90_SWAP=") + layout);
    EXPECT_TRUE(check_case(rng, {3, 8, 1024, 4352}));  // 34 k-blocks: some ranks' ranges odd
    EXPECT_TRUE(check_case(rng, {2, 13, 384, 4224, ScaleLayout::row_major, DType::f32}));
  }
  for (const char* stages : {"2", "4", "6"}) {  // the ring wraps within every group
    ScopedEnv ring("MOEKIT_SM90_GROUPED_STAGES", stages);
    SCOPED_TRACE(std::string("MOEKIT_SM90_GROUPED_STAGES=") + stages);
    EXPECT_TRUE(check_case(rng, {4, 16, 4096, 3840}));
    EXPECT_TRUE(check_case(
        rng, {3, 1, 2048, 1152, ScaleLayout::row_major, DType::bf16, DType::f32, false}));
  }
}

// A masked call's counts on the GPU: `counts` (zeros where empty), and masked_m holding `stale`
// (or the counts) until write_late() has the kernel before the GEMM, on the call's own stream,
// write the counts; options for the GPU on that stream.
struct MaskedCounts {
  Tensor counts_gpu, masked_m;
  gpu_test::Stream stream;
  OpOptions options;
  bool late;
  int groups;
  MaskedCounts(const Case& c, const std::vector<int32_t>& counts, const std::vector<int32_t>& stale)
      : late(!stale.empty()), groups(static_cast<int>(c.groups)) {
    Tensor host = Tensor::empty(DType::i32, {c.groups});
    std::memset(host.data(), 0, host.nbytes());
    if (!counts.empty()) std::memcpy(host.data(), counts.data(), counts.size() * 4);
    counts_gpu = Tensor::copy_of(host, Device::gpu());
    if (late) std::memcpy(host.data(), stale.data(), stale.size() * 4);
    masked_m = Tensor::copy_of(host, Device::gpu());
    options.backend = Backend::gpu;
    options.static_weights = c.static_weights;
    options.stream = stream.get();
  }
  // After the operands and sentinels (other streams) are written: the late counts, if any.
  void write_late() const {
    MOEKIT_GPU_CHECK(cudaDeviceSynchronize());
    if (late)
      gpu_test::write_counts_late<<<1, 128, 0, stream.get()>>>(
          masked_m.data_as<int32_t>(), counts_gpu.data_as<const int32_t>(), groups, 200000);
  }
};

// The masked layout through the Hopper entry: group g's first min(max(masked_m[g], 0), M) rows
// have the bytes of gpu.sm90 on the whole group; every other byte of out stays as it was (the
// entry skips what has no rows, groups without rows included). With `stale` counts, masked_m
// holds those until the kernel before the GEMM (in its stream) writes `counts` late. With
// `expected_rows` (> 0) the call passes that hint, and the plan must take `planned_tokens` tokens
// per token tile.
void check_masked(std::mt19937_64& rng, const Case& c, const std::vector<int32_t>& counts,
                  const std::vector<int32_t>& stale = {}, int64_t expected_rows = 0,
                  int planned_tokens = 0) {
  SCOPED_TRACE(describe(c) + (stale.empty() ? "" : ", counts written late") +
               (expected_rows > 0 ? ", expected rows " + std::to_string(expected_rows) : ""));
  const Operands o = make_operands(rng, c);
  Tensor grouped = sentinel_out(c, o.gap);
  MaskedCounts call(c, counts, stale);
  const Tensor& masked_m = call.masked_m;
  OpOptions& options = call.options;
  const TensorView out = grouped_view(grouped, c, o.gap);
  std::string chosen, layout, detail;
  for (const ImplementationChoice& row :
       expected_rows > 0
           ? explain_grouped_block_fp8_gemm_masked(o.a, o.as, c.layout, o.b, o.bs, masked_m, out,
                                                   expected_rows, options)
           : explain_grouped_block_fp8_gemm_masked(o.a, o.as, c.layout, o.b, o.bs, masked_m, out,
                                                   options))
    if (row.chosen) {
      chosen = row.name;
      layout = layout_of(row.detail);
      detail = row.detail;
    }
  ASSERT_EQ(chosen, kGrouped);
  ASSERT_FALSE(layout.empty());
  if (planned_tokens > 0)
    EXPECT_NE(detail.find("launch: " + std::to_string(planned_tokens) + " tokens"),
              std::string::npos)
        << detail;
  call.write_late();
  if (expected_rows > 0)
    grouped_block_fp8_gemm_masked(o.a, o.as, c.layout, o.b, o.bs, masked_m, out, expected_rows,
                                  options);
  else
    grouped_block_fp8_gemm_masked(o.a, o.as, c.layout, o.b, o.bs, masked_m, out, options);
  MOEKIT_GPU_CHECK(cudaStreamSynchronize(call.stream.get()));
  options.stream = nullptr;
  const ScopedEnv same_layout("MOEKIT_SM90_SWAP", layout);
  const Tensor got = Tensor::copy_of(grouped, Device::cpu());
  OpOptions single = options;
  single.implementation = "gpu.sm90";
  const size_t element = dtype_size(c.out);
  for (int64_t g = 0; g < c.groups; ++g) {
    const int64_t rows = std::clamp<int64_t>(counts[static_cast<size_t>(g)], 0, c.m);
    const auto* group =
        got.data_as<uint8_t>() + g * (c.m * c.n + o.gap) * static_cast<int64_t>(element);
    const size_t valid = static_cast<size_t>(rows * c.n) * element;
    // Past 64 rows (the masked layout's capacity; row-major scales) gpu.sm90 multiplies each
    // 64-row token tile of the group's rows alone: on all M it would take the tiles kernel.
    const int64_t chunk = c.m > 64 ? 64 : c.m;
    for (int64_t t0 = 0; t0 < rows; t0 += chunk) {
      const int64_t m = c.m > 64 ? std::min(chunk, rows - t0) : c.m;
      const TensorView a = plane_of(o.a, g), as = plane_of(o.as, g);
      const TensorView a_rows(static_cast<uint8_t*>(a.data()) + t0 * a.stride(0), a.dtype(),
                              std::array<int64_t, 2>{m, c.k},
                              std::array<int64_t, 2>{a.stride(0), 1}, a.device());
      const TensorView as_rows(static_cast<uint8_t*>(as.data()) +
                                   t0 * as.stride(0) * static_cast<int64_t>(dtype_size(as.dtype())),
                               as.dtype(), std::array<int64_t, 2>{m, as.size(1)},
                               std::array<int64_t, 2>{as.stride(0), as.stride(1)}, as.device());
      Tensor expected = Tensor::empty(c.out, {m, c.n}, Device::gpu());
      block_fp8_gemm(c.m > 64 ? a_rows : a, c.m > 64 ? as_rows : as, c.layout, plane_of(o.b, g),
                     plane_of(o.bs, g), std::nullopt, expected, single);
      const Tensor want = Tensor::copy_of(expected, Device::cpu());
      const size_t bytes = static_cast<size_t>(std::min(m, rows - t0) * c.n) * element;
      EXPECT_EQ(std::memcmp(group + t0 * c.n * static_cast<int64_t>(element), want.data(), bytes),
                0)
          << "group " << g << ", " << rows << " rows, from row " << t0;
    }
    size_t written = 0;
    for (size_t byte = valid; byte < (c.m * c.n + o.gap) * element; ++byte)
      written += group[byte] != kSentinel;
    EXPECT_EQ(written, 0u) << "bytes written past group " << g << "'s " << rows << " rows";
  }
}

TEST(GpuGroupedGemm, MaskedGroupsUseTheirRowsOnly) {
  SKIP_WITHOUT_ENTRY(grouped_entry_present(), kGrouped);
  std::mt19937_64 rng(gpu_test::seed_for("GpuGroupedGemm.Masked"));
  check_masked(rng, {6, 16, 4096, 7168}, {16, 0, 3, 17, 1, -2});
  check_masked(rng, {5, 4, 1536, 2048}, {0, 0, 4, 2, 0});  // K split 4, group 0 empty
  check_masked(rng, {4, 8, 200, 384, ScaleLayout::column_major_tma, DType::f32}, {8, 5, 0, 7});
  check_masked(rng, {3, 16, 2048, 3840, ScaleLayout::row_major, DType::bf16, DType::f32, false},
               {9, 16, 2});
  check_masked(rng, {3, 2, 512, 1024}, {0, 0, 0});  // nothing to do: nothing written
  check_masked(rng, {4, 40, 1536, 2048, ScaleLayout::column_major}, {0, 40, 17, 1});  // 64 tokens
  // The capacities of DeepEP's low-latency dispatch: M past the kernel's 64-row token tiles, one
  // CTA row of the grid per tile, the counts a few rows or many.
  check_masked(rng, {5, 256, 1536, 2048}, {0, 3, 70, 256, 1});
  check_masked(rng, {6, 200, 2048, 768, ScaleLayout::row_major, DType::f32}, {1, 0, 0, 199, 2, 0});
  {
    ScopedEnv ring("MOEKIT_SM90_GROUPED_STAGES", "2");
    check_masked(rng, {7, 16, 4096, 3840}, {1, 0, 16, 0, 0, 5, 16});
  }
}

// The hint of the rows most groups have (DeepGEMM's expected_m) plans the token tile for them
// (without it: 16) and changes no bit: each group's rows still have gpu.sm90's.
TEST(GpuGroupedGemm, MaskedExpectedRowsPlanTheTokenTile) {
  SKIP_WITHOUT_ENTRY(grouped_entry_present(), kGrouped);
  std::mt19937_64 rng(gpu_test::seed_for("GpuGroupedGemm.MaskedExpectedRows"));
  check_masked(rng, {4, 64, 4096, 7168}, {64, 0, 64, 33}, {}, 64, 64);
  check_masked(rng, {5, 256, 1536, 2048}, {0, 3, 70, 256, 1}, {}, 64, 64);
  check_masked(rng, {5, 256, 1536, 2048}, {0, 3, 70, 256, 1}, {}, 30, 32);
  check_masked(rng, {6, 128, 2048, 768}, {1, 0, 0, 1, 2, 0}, {}, 1, 8);
  check_masked(rng, {3, 16, 512, 1024, ScaleLayout::column_major_tma}, {16, 2, 9}, {}, 500, 16);
  // The same counts written late by the kernel before, with a hint.
  check_masked(rng, {5, 200, 1024, 768}, {0, 199, 3, 64, 65}, {7, 0, 0, 130, 0}, 48, 64);
}

// The counts are the previous kernel's output: the kernel before the GEMM (in its stream) writes
// them late, while the GEMM's CTAs already run (programmatic dependent launch), and the GEMM uses
// the new counts, never the old ones. Groups over several load batches of the list (150 > 128),
// and one slice taking every group with rows, many ring laps.
TEST(GpuGroupedGemm, MaskedCountsWrittenByTheKernelBeforeAreTheOnesUsed) {
  SKIP_WITHOUT_ENTRY(grouped_entry_present(), kGrouped);
  std::mt19937_64 rng(gpu_test::seed_for("GpuGroupedGemm.MaskedLate"));
  const std::vector<int32_t> counts = {0, 1, 0, 0, 3, 0, 2, 0, 0, 1, 0, 0};
  const std::vector<int32_t> other = {1, 0, 0, 2, 0, 0, 0, 1, 0, 0, 4, 0};
  check_masked(rng, {12, 4, 1536, 2048}, counts, other);
  check_masked(rng, {12, 16, 384, 1152, ScaleLayout::column_major_tma}, other, counts);
  std::vector<int32_t> many(150, 0), before(150, 0);
  for (size_t g = 0; g < many.size(); ++g) {
    many[g] = g % 7 == 3 || g > 140 ? static_cast<int32_t>(g % 5 + 1) : 0;
    before[g] = g % 11 == 0 ? 2 : 0;
  }
  check_masked(rng, {150, 5, 256, 512}, many, before);
  ScopedEnv one_slice("MOEKIT_SM90_GROUPED_SLICES", "1");
  ScopedEnv ring("MOEKIT_SM90_GROUPED_STAGES", "4");
  check_masked(rng, {12, 4, 1024, 768}, counts, other);
  check_masked(rng, {150, 5, 256, 512}, before, many);
  // One CTA row taking every token tile with rows, several of them per group.
  check_masked(rng, {5, 200, 256, 512}, {0, 199, 3, 64, 65}, {7, 0, 0, 130, 0});
}

// Slices of the groups over the grid (MOEKIT_SM90_GROUPED_SLICES): the same sums per group, so
// the bits of gpu.sm90, whole and masked, with early weight loads (slice z's first group is z) and
// without, and with more slices than groups asked for (clamped).
TEST(GpuGroupedGemm, SlicesOfTheGroupsKeepEachGroupsBits) {
  SKIP_WITHOUT_ENTRY(grouped_entry_present(), kGrouped);
  std::mt19937_64 rng(gpu_test::seed_for("GpuGroupedGemm.Slices"));
  for (const char* slices : {"2", "3", "5", "64"}) {
    ScopedEnv spread("MOEKIT_SM90_GROUPED_SLICES", slices);
    SCOPED_TRACE(std::string("MOEKIT_SM90_GROUPED_SLICES=") + slices);
    EXPECT_TRUE(check_case(rng, {5, 1, 1536, 2048}));  // K split 4
    EXPECT_TRUE(check_case(
        rng, {4, 16, 4096, 3840, ScaleLayout::row_major, DType::bf16, DType::f32, false}));
    {
      ScopedEnv force("MOEKIT_SM90_SWAP", "64,1");
      EXPECT_TRUE(check_case(rng, {7, 3, 1536, 2048, ScaleLayout::column_major_tma}));
    }
    check_masked(rng, {7, 8, 1536, 2048}, {0, 8, 3, 0, 9, 1, 0});
    check_masked(rng, {6, 16, 2048, 3840}, {16, 0, 0, 5, 0, 2});
  }
}

TEST(GpuGroupedGemm, PerGroupEntryServesWhatTheGroupedOneDeclines) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(gpu_test::seed_for("GpuGroupedGemm.PerGroup"));
  // M=65 is past the grouped kernel's token tiles, and K=256's activation-scale rows (8 bytes)
  // cannot be copied with the wide tiles; its groups run as gpu.sm90 calls.
  const Case wide{3, 65, 256, 256};
  const Operands o = make_operands(rng, wide);
  Tensor out = sentinel_out(wide, o.gap);
  OpOptions options;
  options.backend = Backend::gpu;
  std::string chosen;
  for (const ImplementationChoice& row : explain_grouped_block_fp8_gemm(
           o.a, o.as, wide.layout, o.b, o.bs, grouped_view(out, wide, o.gap), options)) {
    if (row.chosen) chosen = row.name;
    if (row.name == kGrouped || row.name == kGroupedWide)
      std::printf("%s: %s\n", row.name.c_str(), row.reason.c_str());
  }
  EXPECT_EQ(chosen, "gpu.per_group");
  if (grouped_entry_present()) check_case(rng, wide, "gpu.per_group");
}

// Masked, with the groups expected to hold more rows than a token tile (64), the persistent wide
// tiles serve where their scales can be copied with the tiles (K = 512: rows of 16 bytes); where
// they cannot (K = 256: rows of 8 bytes) and few groups sit at a capacity of at most twice the
// expected rows, one GEMM per group does (measured faster than the grouped launch), else the
// grouped launch.
TEST(GpuGroupedGemm, ManyExpectedRowsGoToTheWideTiles) {
  SKIP_WITHOUT_ENTRY(grouped_entry_present(), kGrouped);
  // The entry chosen for G groups of M x N=256 x K: masked with the hint `expected`, or (0) whole.
  const auto chosen_for = [](int64_t G, int64_t M, int64_t expected, int64_t K) {
    const Device gpu = Device::gpu();
    const int64_t N = 256;
    const Tensor a = Tensor::empty(DType::f8e4m3, {G, M, K}, gpu);
    const Tensor as = Tensor::empty(DType::f32, {G, M, K / 128}, gpu);
    const Tensor b = Tensor::empty(DType::f8e4m3, {G, N, K}, gpu);
    const Tensor bs = Tensor::empty(DType::f32, {G, N / 128, K / 128}, gpu);
    const Tensor counts = Tensor::empty(DType::i32, {G}, gpu);
    const Tensor out = Tensor::empty(DType::bf16, {G, M, N}, gpu);
    OpOptions options;
    options.backend = Backend::gpu;
    std::string chosen;
    for (const ImplementationChoice& row :
         expected > 0
             ? explain_grouped_block_fp8_gemm_masked(a, as, ScaleLayout::row_major, b, bs, counts,
                                                     out, expected, options)
             : explain_grouped_block_fp8_gemm(a, as, ScaleLayout::row_major, b, bs, out, options)) {
      if (row.chosen) chosen = row.name;
      if (row.name == kGroupedWide && !row.chosen)
        std::printf("G=%lld M=%lld expected %lld K=%lld: %s declines: %s\n",
                    static_cast<long long>(G), static_cast<long long>(M),
                    static_cast<long long>(expected), static_cast<long long>(K), kGroupedWide,
                    row.reason.c_str());
    }
    return chosen;
  };
  EXPECT_EQ(chosen_for(4, 256, 256, 512), kGroupedWide);
  EXPECT_EQ(chosen_for(4, 256, 128, 512), kGroupedWide);
  EXPECT_EQ(chosen_for(4, 1024, 256, 512), kGroupedWide);
  EXPECT_EQ(chosen_for(40, 256, 65, 512), kGroupedWide);
  EXPECT_EQ(chosen_for(4, 256, 1000, 512), kGroupedWide);  // (a hint past M counts as M)
  EXPECT_EQ(chosen_for(4, 256, 64, 512), kGrouped);        // the rows fit a token tile
  EXPECT_EQ(chosen_for(300, 256, 256, 512), kGrouped);     // more groups than the list holds
  EXPECT_EQ(chosen_for(4, 256, 256, 256), "gpu.per_group");
  EXPECT_EQ(chosen_for(8, 200, 100, 256), "gpu.per_group");
  EXPECT_EQ(chosen_for(4, 1024, 256, 256), kGrouped);  // capacity past twice the expected rows
  EXPECT_EQ(chosen_for(9, 256, 256, 256), kGrouped);   // more groups
  // Whole groups: the wide tiles past 64 rows, up to 2^17 rows x k-blocks per group (measured
  // faster than one GEMM per group), else one GEMM per group.
  EXPECT_EQ(chosen_for(4, 64, 0, 512), kGrouped);
  EXPECT_EQ(chosen_for(4, 65, 0, 512), kGroupedWide);
  EXPECT_EQ(chosen_for(2, 2048, 0, 7168), kGroupedWide);  // 2048 x 56 k-blocks
  EXPECT_EQ(chosen_for(2, 4096, 0, 2048), kGroupedWide);  // 4096 x 16
  EXPECT_EQ(chosen_for(2, 4096, 0, 7168), "gpu.per_group");
}

// The persistent wide tiles (the masked layout with expected rows past 64; with `counts` empty,
// whole groups of M > 64 rows): group g's first min(max(masked_m[g], 0), M) rows (whole: all M)
// have the bytes of gpu.sm90's wide tiles on the whole group (MOEKIT_SM90_TILES_ROWS=256; M > 128,
// so that it takes tiles, not the swap kernel); nothing is written past the group's last tile
// with rows (128 or 256 rows, as the plan says), in the gaps, or for a group without rows. With
// `stale` counts, masked_m holds those until the kernel before the GEMM writes `counts` late.
// `gap`: out elements between groups (a multiple of 8 keeps 16-bit planes on 16 bytes: TMA stores).
void check_wide(std::mt19937_64& rng, const Case& c, const std::vector<int32_t>& counts,
                int64_t expected_rows, const std::vector<int32_t>& stale = {}, int64_t gap = 8) {
  const bool whole = counts.empty();
  SCOPED_TRACE(describe(c) +
               (whole ? ", whole groups" : ", expected rows " + std::to_string(expected_rows)) +
               (stale.empty() ? "" : ", counts written late") + ", gap " + std::to_string(gap));
  ASSERT_GT(c.m, 128);
  Operands o = make_operands(rng, c);
  o.gap = gap;
  Tensor grouped = sentinel_out(c, o.gap);
  MaskedCounts counted(c, counts, stale);
  const Tensor &masked_m = counted.masked_m, &counts_gpu = counted.counts_gpu;
  OpOptions& options = counted.options;
  const TensorView out = grouped_view(grouped, c, o.gap);
  std::string chosen;
  int tile_rows = 0;  // the plan's, from its detail
  for (const ImplementationChoice& row :
       whole ? explain_grouped_block_fp8_gemm(o.a, o.as, c.layout, o.b, o.bs, out, options)
             : explain_grouped_block_fp8_gemm_masked(o.a, o.as, c.layout, o.b, o.bs, masked_m, out,
                                                     expected_rows, options))
    if (row.chosen) {
      chosen = row.name;
      std::printf("%s: %s: %s\n", describe(c).c_str(), row.name.c_str(), row.detail.c_str());
      const size_t at = row.detail.find("launch: ");
      if (at != std::string::npos) std::sscanf(row.detail.c_str() + at, "launch: %d x", &tile_rows);
    } else if (row.name == kGroupedWide) {
      std::printf("%s: %s declines: %s\n", describe(c).c_str(), kGroupedWide, row.reason.c_str());
    }
  ASSERT_EQ(chosen, kGroupedWide);
  // Tiles of 128 rows where the groups hold (are expected to hold) at most 128, else 256.
  EXPECT_EQ(tile_rows, (whole ? c.m : expected_rows) <= 128 ? 128 : 256);
  counted.write_late();
  const auto call = [&](const Tensor& groups_rows) {
    if (whole)
      grouped_block_fp8_gemm(o.a, o.as, c.layout, o.b, o.bs, out, options);
    else
      grouped_block_fp8_gemm_masked(o.a, o.as, c.layout, o.b, o.bs, groups_rows, out, expected_rows,
                                    options);
  };
  call(masked_m);
  MOEKIT_GPU_CHECK(cudaStreamSynchronize(counted.stream.get()));
  const Tensor got = Tensor::copy_of(grouped, Device::cpu());
  // Twice: the same bytes (the counts are final by now).
  options.stream = nullptr;
  call(counts_gpu);
  const Tensor again = Tensor::copy_of(grouped, Device::cpu());
  EXPECT_EQ(std::memcmp(got.data(), again.data(), got.nbytes()), 0) << "a second call differs";
  const ScopedEnv wide_tiles("MOEKIT_SM90_TILES_ROWS", "256");
  OpOptions single = options;
  single.implementation = "gpu.sm90";
  const size_t element = dtype_size(c.out);
  for (int64_t g = 0; g < c.groups; ++g) {
    const int64_t rows = whole ? c.m : std::clamp<int64_t>(counts[static_cast<size_t>(g)], 0, c.m);
    const auto* group =
        got.data_as<uint8_t>() + g * (c.m * c.n + o.gap) * static_cast<int64_t>(element);
    if (rows > 0) {
      Tensor expected = Tensor::empty(c.out, {c.m, c.n}, Device::gpu());
      block_fp8_gemm(plane_of(o.a, g), plane_of(o.as, g), c.layout, plane_of(o.b, g),
                     plane_of(o.bs, g), std::nullopt, expected, single);
      const Tensor want = Tensor::copy_of(expected, Device::cpu());
      EXPECT_EQ(std::memcmp(group, want.data(), static_cast<size_t>(rows * c.n) * element), 0)
          << "group " << g << ", " << rows << " rows";
    }
    const int64_t tiled =  // rows its tiles may write
        std::min((rows + tile_rows - 1) / tile_rows * tile_rows, c.m);
    size_t written = 0;
    for (size_t byte = static_cast<size_t>(tiled * c.n) * element;
         byte < static_cast<size_t>(c.m * c.n + o.gap) * element; ++byte)
      written += group[byte] != kSentinel;
    EXPECT_EQ(written, 0u) << "bytes written past group " << g << "'s tiles of " << rows << " rows";
  }
}

TEST(GpuGroupedGemm, MaskedWideTilesTakeEachGroupsRows) {
  SKIP_WITHOUT_ENTRY(grouped_entry_present(), kGrouped);
  std::mt19937_64 rng(gpu_test::seed_for("GpuGroupedGemm.MaskedWide"));
  // DeepGEMM's masked case, bf16 out stored by TMA, row-major scales (k-inner boxes); then with
  // planes 5 elements apart (the threads store, two columns at a time only where aligned).
  check_wide(rng, {4, 256, 4096, 7168}, {256, 0, 130, 1}, 256);
  check_wide(rng, {3, 384, 512, 1024}, {384, 200, 0}, 256, {}, 5);
  // Column-major TMA-aligned scales (m-inner boxes), f32 out stored by the threads, a ragged N.
  check_wide(rng, {3, 300, 200, 512, ScaleLayout::column_major_tma, DType::f32}, {300, 299, -1},
             200);
  // 40 groups (two batches of the count scan), f16 out, bf16 weight scales, counts past M.
  std::vector<int32_t> forty(40);
  for (size_t g = 0; g < forty.size(); ++g)
    forty[g] = g % 5 == 0 ? 0 : g % 5 == 1 ? 136 : g % 5 == 2 ? 500 : static_cast<int32_t>(g + 1);
  check_wide(rng, {40, 136, 256, 1024, ScaleLayout::row_major, DType::f16, DType::bf16}, forty,
             100);
  // Packed UE8M0 scales; the weights not promised static.
  check_wide(rng, {2, 512, 384, 1024, ScaleLayout::packed_ue8m0, DType::bf16, DType::f32, false},
             {512, 257}, 300);
  // 32 k-blocks (the last turn of the 3-stage ring padded), counts written late by the kernel
  // before.
  check_wide(rng, {5, 260, 512, 4096}, {0, 259, 3, 260, 65}, 128, {7, 0, 0, 130, 0});
  // Qwen3-30B's down projection (K=768: 6 k-blocks, weight-scale rows of 24 bytes, or 12 in
  // bf16, which only the loader warp reads), 256- and 128-row tiles.
  check_wide(rng, {6, 200, 256, 768, ScaleLayout::column_major_tma}, {200, 0, 77, 129, 1, 200},
             150);
  check_wide(rng, {4, 136, 384, 768, ScaleLayout::column_major_tma, DType::f32, DType::bf16},
             {136, 5, 0, 100}, 100);
  // Pairs of CTAs sharing A tiles forced where K is long, and CTAs alone where it is short (the
  // plan's other choice each time): the same bits.
  {
    const ScopedEnv paired("MOEKIT_SM90_GROUPED_PAIR", "1");
    check_wide(rng, {4, 300, 256, 4096}, {300, 1, 0, 257}, 200);
    check_wide(rng, {3, 200, 512, 3072, ScaleLayout::row_major, DType::bf16}, {130, 0, 64}, 100);
  }
  {
    const ScopedEnv alone("MOEKIT_SM90_GROUPED_PAIR", "0");
    check_wide(rng, {3, 384, 512, 1024}, {384, 200, 0}, 256);
  }
  // No rows anywhere: nothing written.
  check_wide(rng, {3, 200, 256, 512}, {0, -4, 0}, 150);
}

// Whole groups past the grouped kernel's 64-row token tiles take the wide tiles too, every row of
// every group (one launch instead of one GEMM per group).
TEST(GpuGroupedGemm, WholeGroupsPast64RowsTakeTheWideTiles) {
  SKIP_WITHOUT_ENTRY(grouped_entry_present(), kGrouped);
  std::mt19937_64 rng(gpu_test::seed_for("GpuGroupedGemm.WholeWide"));
  check_wide(rng, {3, 256, 1024, 2048}, {}, 0);
  check_wide(rng, {5, 300, 384, 1024, ScaleLayout::column_major_tma, DType::f32}, {}, 0);
  check_wide(rng, {2, 520, 256, 4096, ScaleLayout::row_major, DType::bf16, DType::bf16}, {}, 0, {},
             5);
}

// Whole groups of 65 to 128 rows take 128-row tiles (half the wide tiles' padding): each group's
// rows have the bytes of gpu.sm90's wide tiles, computed here on the group's rows padded with
// zeros to 256 (gpu.sm90 takes the swap kernel at 128 rows and fewer).
TEST(GpuGroupedGemm, WholeGroupsOf128RowsOrFewerTakeNarrowTiles) {
  SKIP_WITHOUT_ENTRY(grouped_entry_present(), kGrouped);
  std::mt19937_64 rng(gpu_test::seed_for("GpuGroupedGemm.WholeNarrow"));
  for (const Case& c : {Case{3, 100, 384, 1024},
                        Case{2, 128, 200, 2048, ScaleLayout::row_major, DType::f32, DType::bf16}}) {
    SCOPED_TRACE(describe(c));
    const Operands o = make_operands(rng, c);
    Tensor grouped = sentinel_out(c, o.gap);
    OpOptions options;
    options.backend = Backend::gpu;
    options.static_weights = true;
    const TensorView out = grouped_view(grouped, c, o.gap);
    std::string detail;
    for (const ImplementationChoice& row :
         explain_grouped_block_fp8_gemm(o.a, o.as, c.layout, o.b, o.bs, out, options))
      if (row.chosen) {
        EXPECT_EQ(row.name, kGroupedWide);
        detail = row.detail;
      }
    std::printf("%s: %s\n", describe(c).c_str(), detail.c_str());
    EXPECT_NE(detail.find("128 x 128 tiles"), std::string::npos) << detail;
    grouped_block_fp8_gemm(o.a, o.as, c.layout, o.b, o.bs, out, options);
    const Tensor got = Tensor::copy_of(grouped, Device::cpu());
    const ScopedEnv wide_tiles("MOEKIT_SM90_TILES_ROWS", "256");
    OpOptions single = options;
    single.implementation = "gpu.sm90";
    const Tensor a = Tensor::copy_of(o.a, Device::cpu()), as = Tensor::copy_of(o.as, Device::cpu());
    const int64_t padded = 256, k_blocks = (c.k + 127) / 128;
    const size_t element = dtype_size(c.out);
    for (int64_t g = 0; g < c.groups; ++g) {
      Tensor a_rows = Tensor::empty(DType::f8e4m3, {padded, c.k});
      Tensor as_rows = Tensor::empty(DType::f32, {padded, k_blocks});
      std::memset(a_rows.data(), 0, a_rows.nbytes());
      std::memset(as_rows.data(), 0, as_rows.nbytes());
      std::memcpy(a_rows.data(), plane_of(a, g).data(), static_cast<size_t>(c.m * c.k));
      std::memcpy(as_rows.data(), plane_of(as, g).data(), static_cast<size_t>(c.m * k_blocks) * 4);
      Tensor expected = Tensor::empty(c.out, {padded, c.n}, Device::gpu());
      block_fp8_gemm(Tensor::copy_of(a_rows, Device::gpu()),
                     Tensor::copy_of(as_rows, Device::gpu()), c.layout, plane_of(o.b, g),
                     plane_of(o.bs, g), std::nullopt, expected, single);
      const Tensor want = Tensor::copy_of(expected, Device::cpu());
      const char* group = got.data_as<char>() + g * (c.m * c.n + o.gap) * element;
      EXPECT_EQ(std::memcmp(group, want.data(), static_cast<size_t>(c.m * c.n) * element), 0)
          << "group " << g;
      for (size_t byte = static_cast<size_t>(c.m * c.n) * element;
           byte < static_cast<size_t>(c.m * c.n + o.gap) * element; ++byte)
        EXPECT_EQ(static_cast<uint8_t>(group[byte]), kSentinel) << "gap after group " << g;
    }
  }
}

}  // namespace
}  // namespace moekit
