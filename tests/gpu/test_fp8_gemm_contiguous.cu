// grouped_block_fp8_gemm_contiguous on the GPU (DeepGEMM's contiguous layout, MoE prefill): the
// Hopper entry ("gpu.sm90.contiguous", persistent 128-row tiles) against block_fp8_gemm's
// "gpu.sm90" wide tiles on the whole a with each block's expert: every row of a block with an
// index in range has those bytes (its padding rows included: the block's first index decides);
// padding blocks (index -1, or G and past) stay unwritten; a second call gives the same bytes;
// indices written late by the kernel before are the ones used. Also the fallback "gpu.per_segment"
// (indices read on the host) and the dispatch's choices. Skips without a GPU; where the Hopper
// entry does not serve (not Hopper, no sm_90a code) it says why.
#include <gtest/gtest.h>

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

constexpr const char* kContiguous = "gpu.sm90.contiguous";
constexpr const char* kPerSegment = "gpu.per_segment";
constexpr uint8_t kSentinel = 0xA5;
constexpr int64_t kBlock = kContiguousBlockRows;

using gpu_test::ScopedEnv;

struct Case {
  int64_t experts, n, k;
  // Each block's index (-1 or >= experts: padding); the last block has `last_rows` rows.
  std::vector<int32_t> blocks;
  int64_t last_rows = kBlock;
  ScaleLayout layout = ScaleLayout::row_major;
  DType out = DType::bf16;
  DType b_scales = DType::f32;
  int64_t rows() const { return (static_cast<int64_t>(blocks.size()) - 1) * kBlock + last_rows; }
};

std::string describe(const Case& c) {
  std::string blocks;
  for (int32_t e : c.blocks) blocks += (blocks.empty() ? "" : ",") + std::to_string(e);
  return "G=" + std::to_string(c.experts) + " M=" + std::to_string(c.rows()) +
         " N=" + std::to_string(c.n) + " K=" + std::to_string(c.k) + " blocks [" + blocks + "] " +
         scale_layout_name(c.layout) + " out=" + std::string(dtype_name(c.out)) +
         " b_scales=" + std::string(dtype_name(c.b_scales));
}

struct Operands {
  Tensor a, as, b, bs;
  std::vector<int32_t> indices;  // per row: the block's index on its first row, others scattered
};

Operands make_operands(std::mt19937_64& rng, const Case& c) {
  const int64_t G = c.experts, M = c.rows(), N = c.n, K = c.k;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  GroupQuantConfig config;
  config.layout = c.layout;
  config.ue8m0 = c.layout == ScaleLayout::packed_ue8m0;
  const ScaleStorage storage = group_quant_scale_storage(M, K, config);
  Tensor x = Tensor::empty(DType::f32, {M, K});
  for (int64_t i = 0; i < x.numel(); ++i) x.data_as<float>()[i] = normal(rng);
  Tensor a = Tensor::empty(DType::f8e4m3, {M, K});
  Tensor as = Tensor::empty(storage.dtype, {storage.shape[0], storage.shape[1]});
  std::memset(as.data(), 0, as.nbytes());  // (the TMA-aligned layouts' padding rows)
  per_token_group_quant_fp8(x, a, as, config, {Backend::cpu});
  Tensor b = Tensor::empty(DType::f8e4m3, {G, N, K});
  for (int64_t i = 0; i < b.numel(); ++i) {
    const auto byte = static_cast<uint8_t>(rng());
    b.data_as<uint8_t>()[i] = (byte & 0x7f) == 0x7f ? static_cast<uint8_t>(byte ^ 1) : byte;
  }
  Tensor bs = Tensor::empty(c.b_scales, {G, (N + 127) / 128, (K + 127) / 128});
  std::uniform_real_distribution<float> u(0.001f, 0.01f);
  for (int64_t i = 0; i < bs.numel(); ++i) store_from_f32(bs.data(), bs.dtype(), i, u(rng));
  // A block's other rows carry indices the op must not read: -1 (DeepGEMM's padding rows) or
  // another expert.
  std::vector<int32_t> indices(static_cast<size_t>(M));
  for (int64_t r = 0; r < M; ++r)
    indices[static_cast<size_t>(r)] =
        r % kBlock == 0 ? c.blocks[static_cast<size_t>(r / kBlock)]
                        : (rng() % 3 == 0 ? -1 : static_cast<int32_t>(rng() % (G + 1)));
  const Device gpu = Device::gpu();
  return {Tensor::copy_of(a, gpu), Tensor::copy_of(as, gpu), Tensor::copy_of(b, gpu),
          Tensor::copy_of(bs, gpu), indices};
}

// Runs the case through `implementation`; expects each block with an index in range to hold the
// bytes gpu.sm90's wide tiles write for those rows with that expert, padding blocks untouched,
// the same bytes from a second call. `late`: the indices are written by the kernel before the GEMM
// (in its stream), while m_indices still holds stale ones (all -1) as the GEMM starts.
void check_case(std::mt19937_64& rng, const Case& c, const char* implementation, bool late = false,
                const char* plan_has = "") {
  SCOPED_TRACE(describe(c) + " through " + implementation + (late ? ", indices written late" : ""));
  ASSERT_GT(c.rows(), 128);  // (so that gpu.sm90 takes tiles, not the swap kernel)
  const Operands o = make_operands(rng, c);
  const int64_t M = c.rows();
  Tensor host_indices = Tensor::empty(DType::i32, {M});
  std::memcpy(host_indices.data(), o.indices.data(), o.indices.size() * 4);
  const Tensor indices = Tensor::copy_of(host_indices, Device::gpu());
  std::vector<int32_t> stale(o.indices.size(), -1);
  std::memcpy(host_indices.data(), stale.data(), stale.size() * 4);
  const Tensor m_indices = Tensor::copy_of(late ? host_indices : indices, Device::gpu());
  Tensor out = Tensor::empty(c.out, {M, c.n}, Device::gpu());
  MOEKIT_GPU_CHECK(cudaMemset(out.data(), kSentinel, out.nbytes()));
  gpu_test::Stream stream;
  OpOptions options;
  options.backend = Backend::gpu;
  options.static_weights = true;
  options.implementation = implementation;
  options.stream = stream.get();
  for (const ImplementationChoice& row : explain_grouped_block_fp8_gemm_contiguous(
           o.a, o.as, c.layout, o.b, o.bs, m_indices, out, options))
    if (row.name == implementation) {
      ASSERT_TRUE(row.chosen) << row.reason;
      std::printf("%s: %s\n", describe(c).c_str(), row.detail.c_str());
      ASSERT_NE(row.detail.find(plan_has), std::string::npos) << row.detail;
    }
  MOEKIT_GPU_CHECK(cudaDeviceSynchronize());
  if (late)
    gpu_test::write_counts_late<<<1, 128, 0, stream.get()>>>(m_indices.data_as<int32_t>(),
                                                             indices.data_as<const int32_t>(),
                                                             static_cast<int>(M), 200000);
  grouped_block_fp8_gemm_contiguous(o.a, o.as, c.layout, o.b, o.bs, m_indices, out, options);
  MOEKIT_GPU_CHECK(cudaStreamSynchronize(stream.get()));
  const Tensor got = Tensor::copy_of(out, Device::cpu());
  grouped_block_fp8_gemm_contiguous(o.a, o.as, c.layout, o.b, o.bs, indices, out, options);
  MOEKIT_GPU_CHECK(cudaStreamSynchronize(stream.get()));
  const Tensor again = Tensor::copy_of(out, Device::cpu());
  EXPECT_EQ(std::memcmp(got.data(), again.data(), got.nbytes()), 0) << "a second call differs";

  const ScopedEnv wide_tiles("MOEKIT_SM90_TILES_ROWS", "256");
  OpOptions single;
  single.backend = Backend::gpu;
  single.implementation = "gpu.sm90";
  const size_t row_bytes = static_cast<size_t>(c.n) * dtype_size(c.out);
  std::vector<std::optional<Tensor>> per_expert(static_cast<size_t>(c.experts));
  for (size_t i = 0; i < c.blocks.size(); ++i) {
    const int32_t e = c.blocks[i];
    const int64_t first = static_cast<int64_t>(i) * kBlock;
    const int64_t rows = std::min(kBlock, M - first);
    const auto* block = got.data_as<uint8_t>() + first * static_cast<int64_t>(row_bytes);
    if (e < 0 || e >= c.experts) {
      size_t written = 0;
      for (size_t byte = 0; byte < static_cast<size_t>(rows) * row_bytes; ++byte)
        written += block[byte] != kSentinel;
      EXPECT_EQ(written, 0u) << "bytes written in padding block " << i << " (index " << e << ")";
      continue;
    }
    std::optional<Tensor>& want = per_expert[static_cast<size_t>(e)];
    if (!want) {
      Tensor expected = Tensor::empty(c.out, {M, c.n}, Device::gpu());
      block_fp8_gemm(o.a, o.as, c.layout, plane_of(o.b, e), plane_of(o.bs, e), std::nullopt,
                     expected, single);
      want = Tensor::copy_of(expected, Device::cpu());
    }
    EXPECT_EQ(std::memcmp(block, want->data_as<uint8_t>() + first * row_bytes, rows * row_bytes), 0)
        << "block " << i << " (expert " << e << ", " << rows << " rows)";
  }
}

// The GPU dispatch's verdicts at M rows x N x K and G experts, row-major activation scales
// (the operands' bytes are never read: explain only plans).
std::vector<ImplementationChoice> explain_on_gpu(int64_t N, int64_t K, int64_t M = 256,
                                                 int64_t G = 2) {
  const Device gpu = Device::gpu();
  const int64_t k_blocks = (K + 127) / 128;
  const Tensor a = Tensor::empty(DType::f8e4m3, {M, K}, gpu);
  const Tensor as = Tensor::empty(DType::f32, {M, k_blocks}, gpu);
  const Tensor b = Tensor::empty(DType::f8e4m3, {G, N, K}, gpu);
  const Tensor bs = Tensor::empty(DType::f32, {G, (N + 127) / 128, k_blocks}, gpu);
  const Tensor indices = Tensor::empty(DType::i32, {M}, gpu);
  const Tensor out = Tensor::empty(DType::bf16, {M, N}, gpu);
  OpOptions options;
  options.backend = Backend::gpu;
  return explain_grouped_block_fp8_gemm_contiguous(a, as, ScaleLayout::row_major, b, bs, indices,
                                                   out, options);
}

bool contiguous_entry_present() {
  if (!backend_available(Backend::gpu)) return false;
  // (4 k-blocks: rows of row-major scales on 16 bytes, as TMA copies them)
  for (const ImplementationChoice& row : explain_on_gpu(128, 512))
    if (row.name == kContiguous) {
      if (!row.chosen) std::printf("%s does not serve here: %s\n", kContiguous, row.reason.c_str());
      return row.chosen;
    }
  return false;
}

TEST(GpuContiguousGemm, EachBlockTakesItsExpertsWeights) {
  SKIP_WITHOUT_ENTRY(contiguous_entry_present(), kContiguous);
  std::mt19937_64 rng(gpu_test::seed_for("GpuContiguousGemm.EachBlock"));
  const ScopedEnv rows("MOEKIT_SM90_CONTIGUOUS_ROWS", "128");  // (the 256-row build: below)
  // A DeepSeek-V3 gate_up slice: 4 experts of 1, 3, 0 and 2 blocks, a padding block between them,
  // one at the end; bf16 out stored by TMA, row-major scales (k-inner boxes).
  check_case(rng, {4, 4096, 7168, {0, 1, 1, 1, -1, 3, 3, -1}}, kContiguous);
  // Column-major TMA-aligned scales (m-inner boxes), f32 out stored by the threads, a ragged N, a
  // partial last block, an index past the experts (padding too).
  check_case(rng, {3, 200, 512, {2, 0, 3, 1, 1}, 77, ScaleLayout::column_major_tma, DType::f32},
             kContiguous);
  // Packed UE8M0 scales, f16 out, bf16 weight scales, 18 k-blocks (the 4-stage ring's last turn
  // padded).
  check_case(
      rng,
      {5, 384, 2304, {4, 4, 0, 2, 2, 2}, 128, ScaleLayout::packed_ue8m0, DType::f16, DType::bf16},
      kContiguous);
  // Qwen3-30B-A3B down (N=2048 K=768): many experts, one block each; 6 k-blocks, so the scales
  // column-major TMA-aligned (as DeepGEMM takes them: row-major rows of 24 bytes are not TMA's).
  std::vector<int32_t> many;
  for (int32_t e = 0; e < 40; ++e) many.push_back(e % 7 == 3 ? -1 : e);
  check_case(rng, {40, 2048, 768, many, kBlock, ScaleLayout::column_major_tma}, kContiguous);
}

// The 256-row build (forced): each run of blocks with one index in tiles of two blocks from the
// run's first, a run of odd length ending on a tile of one block, whose rows past the block are
// not stored (they are the next run's, padding, or past M).
TEST(GpuContiguousGemm, RunTilesOfTwoBlocksEqualTheBlocks) {
  SKIP_WITHOUT_ENTRY(contiguous_entry_present(), kContiguous);
  std::mt19937_64 rng(gpu_test::seed_for("GpuContiguousGemm.RunTiles"));
  const ScopedEnv rows("MOEKIT_SM90_CONTIGUOUS_ROWS", "256");
  // Runs of 1, 3 (a tile of two, then one) and 2 blocks between padding; TMA stores.
  check_case(rng, {4, 4096, 7168, {0, 1, 1, 1, -1, 3, 3, -1}}, kContiguous, false, "256 x 128");
  // f32 out stored by the threads, a tile of two whose second block is the partial last one, an
  // index past the experts.
  check_case(rng, {3, 200, 512, {2, 0, 3, 1, 1}, 77, ScaleLayout::column_major_tma, DType::f32},
             kContiguous, false, "256 x 128");
  // A tile of one block that is the partial last one; packed UE8M0 scales, f16 out, bf16 weight
  // scales.
  check_case(
      rng,
      {5, 384, 2304, {4, 4, 0, 2, 2, 2}, 100, ScaleLayout::packed_ue8m0, DType::f16, DType::bf16},
      kContiguous, false, "256 x 128");
  // Random runs of 1-5 blocks (neighbours with one index make longer runs), padding among them,
  // CTAs alone, then in pairs.
  std::vector<int32_t> runs;
  while (runs.size() < 60) {
    const int32_t e = rng() % 7 == 0 ? -1 : static_cast<int32_t>(rng() % 16);
    for (uint64_t i = 0, n = 1 + rng() % 5; i < n; ++i) runs.push_back(e);
  }
  {
    const ScopedEnv alone("MOEKIT_SM90_CONTIGUOUS_PAIR", "0");
    check_case(rng, {16, 512, 1024, runs, 33, ScaleLayout::column_major_tma}, kContiguous, false,
               "256 x 128");
  }
  check_case(rng, {16, 512, 1024, runs, 128, ScaleLayout::column_major_tma}, kContiguous, false,
             "256 x 128");
  // Indices written late: the tiles are listed from the ones the kernel before wrote.
  check_case(rng, {3, 512, 1024, {1, 1, 0, -1, 2, 2, 2}}, kContiguous, /*late=*/true, "256 x 128");
}

// The plan: 256-row tiles where the experts average four blocks or more, or two where K has at
// most 8 k-blocks; 128-row ones below.
TEST(GpuContiguousGemm, RunTilesWhereRunsAreLongOrKShort) {
  SKIP_WITHOUT_ENTRY(contiguous_entry_present(), kContiguous);
  const auto detail = [&](int64_t M, int64_t G, int64_t K) {
    for (const ImplementationChoice& row : explain_on_gpu(256, K, M, G))
      if (row.name == kContiguous) return row.detail;
    return std::string();
  };
  const auto expect_rows = [&](int64_t M, int64_t G, int64_t K, const char* tiles) {
    const std::string plan = detail(M, G, K);
    EXPECT_NE(plan.find(tiles), std::string::npos)
        << "M=" << M << " G=" << G << " K=" << K << ": " << plan;
  };
  expect_rows(8 * 512, 8, 2048, "256 x 128");        // 4 blocks an expert
  expect_rows(8 * 512 - 128, 8, 2048, "128 x 128");  // 31 blocks for 8 experts
  expect_rows(8 * 256, 8, 1024, "256 x 128");        // 2 blocks an expert, 8 k-blocks
  expect_rows(8 * 256 - 128, 8, 1024, "128 x 128");
  expect_rows(8 * 256, 8, 1536, "128 x 128");  // 12 k-blocks
}

TEST(GpuContiguousGemm, IndicesWrittenByTheKernelBeforeAreTheOnesUsed) {
  SKIP_WITHOUT_ENTRY(contiguous_entry_present(), kContiguous);
  std::mt19937_64 rng(gpu_test::seed_for("GpuContiguousGemm.Late"));
  const ScopedEnv rows("MOEKIT_SM90_CONTIGUOUS_ROWS", "128");
  check_case(rng, {3, 512, 1024, {1, 1, 0, -1, 2}}, kContiguous, /*late=*/true);
}

TEST(GpuContiguousGemm, PerSegmentFallbackGivesTheSameRows) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(gpu_test::seed_for("GpuContiguousGemm.PerSegment"));
  // The fallback runs gpu.sm90 per run of blocks; with the wide tiles forced (runs of more than
  // 128 rows) its rows have the same bytes.
  const ScopedEnv wide_tiles("MOEKIT_SM90_TILES_ROWS", "256");
  check_case(rng, {3, 256, 1024, {0, 0, -1, 2, 2, 2}}, kPerSegment);
}

// Where the Hopper build declines (here: row-major scales whose rows TMA cannot copy), the
// dispatch takes the per-segment fallback and says why.
TEST(GpuContiguousGemm, DeclinedShapesFallBackToPerSegment) {
  SKIP_WITHOUT_ENTRY(contiguous_entry_present(), kContiguous);
  std::string chosen, reason;
  for (const ImplementationChoice& row : explain_on_gpu(256, 768)) {  // (6 k-blocks: 24-byte rows)
    if (row.chosen) chosen = row.name;
    if (row.name == kContiguous) reason = row.reason;
  }
  EXPECT_EQ(chosen, kPerSegment);
  EXPECT_NE(reason.find("scales"), std::string::npos) << reason;
}

}  // namespace
}  // namespace moekit
