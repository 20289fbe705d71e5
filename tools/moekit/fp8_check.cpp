// The FP8 part of `moekit check`: per_token_group_quant_fp8 (group 128, row-major and packed UE8M0
// scales) and block_fp8_gemm (bf16 and f32 out), then w8a8_block_fp8_linear (bf16 x and y) and
// block_quantize_weight, on every tested backend against the reference, over the linear-layer
// shapes of FP8 checkpoints (spec/fp8.md). The reference GEMM is scalar: on large shapes it runs
// on the first rows only (the backend still runs every row), and the table says so.
#include <fmt/core.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "commands.h"
#include "moekit/error.h"
#include "moekit/ops/fp8.h"
#include "ops/fp8_problem.h"
#include "ops/silu_math.h"

namespace moekit::cli {

std::string Fp8Shape::name() const { return fmt::format("{} {} N={} K={}", model, layer, n, k); }

const std::vector<Fp8Shape>& fp8_shapes() {
  static const std::vector<Fp8Shape> shapes = {
      // Qwen3-30B-A3B: hidden 2048, 32 query heads of 128, experts of 768.
      {"Qwen3-30B-A3B", "q_proj", 4096, 2048},
      {"Qwen3-30B-A3B", "o_proj", 2048, 4096},
      {"Qwen3-30B-A3B", "expert gate_up", 1536, 2048},
      {"Qwen3-30B-A3B", "expert down", 2048, 768},
      // Qwen3-235B-A22B: hidden 4096, 64 query heads of 128, experts of 1536.
      {"Qwen3-235B-A22B", "q_proj", 8192, 4096},
      {"Qwen3-235B-A22B", "o_proj", 4096, 8192},
      {"Qwen3-235B-A22B", "expert gate_up", 3072, 4096},
      {"Qwen3-235B-A22B", "expert down", 4096, 1536},
      // DeepSeek-V3: hidden 7168, q_lora 1536, 128 heads (192 q, 128 v), experts of 2048.
      {"DeepSeek-V3", "q_b_proj", 24576, 1536},
      {"DeepSeek-V3", "o_proj", 7168, 16384},
      {"DeepSeek-V3", "expert gate_up", 4096, 7168},
      {"DeepSeek-V3", "expert down", 7168, 2048},
      // SGLang's block FP8 GEMM tests (K=3884: a partial last block).
      {"SGLang test", "odd", 7748, 3884},
      {"SGLang test", "large", 13824, 5120},
      {"SGLang test", "small", 1088, 512},
  };
  return shapes;
}

namespace {

// Uniform +-448 cast to e4m3, through a table of 2^16 evenly spaced values: 4 bytes per rng draw.
const std::array<uint8_t, 65536>& e4m3_table() {
  static const std::array<uint8_t, 65536> table = [] {
    std::array<uint8_t, 65536> t{};
    for (size_t i = 0; i < t.size(); ++i)
      t[i] = f32_to_f8e4m3(-448.0f + 896.0f * (static_cast<float>(i) + 0.5f) / 65536.0f);
    return t;
  }();
  return table;
}

void fill_e4m3(std::mt19937_64& rng, const Tensor& t) {
  const auto& table = e4m3_table();
  auto* p = t.data_as<uint8_t>();
  const int64_t n = t.numel();
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const uint64_t r = rng();
    for (int j = 0; j < 4; ++j) p[i + j] = table[(r >> (16 * j)) & 0xffff];
  }
  for (; i < n; ++i) p[i] = table[rng() & 0xffff];
}

void fill_scales(std::mt19937_64& rng, const Tensor& t) {
  std::uniform_real_distribution<float> u(0.0f, 0.01f);
  for (int64_t i = 0; i < t.numel(); ++i) t.data_as<float>()[i] = u(rng);
}

constexpr int64_t kBlock = 128;
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Standard normal quantiles at (i + 0.5) / 2^16 (|x| <= 4.3), by bisection on erfc: 4 normal
// values per rng draw, as fill_e4m3 draws its uniform ones.
const std::array<float, 65536>& normal_table() {
  static const std::array<float, 65536> table = [] {
    std::array<float, 65536> t{};
    for (size_t i = 0; i < t.size(); ++i) {
      const double p = (static_cast<double>(i) + 0.5) / 65536.0;
      double low = -6.0, high = 6.0;  // Phi(x) = erfc(-x / sqrt 2) / 2 is increasing
      for (int step = 0; step < 60; ++step) {
        const double mid = 0.5 * (low + high);
        (0.5 * std::erfc(-mid / std::sqrt(2.0)) < p ? low : high) = mid;
      }
      t[i] = static_cast<float>(0.5 * (low + high));
    }
    return t;
  }();
  return table;
}

// t [rows, cols] e4m3 from normal values, cast per block of `block_rows` x 128 (the last ones
// partial) as DeepGEMM's per_token (block_rows 1) and per_block (128) casts do: x * 448 / amax,
// scale amax / 448 (amax at least 1e-4), scales row-major [ceil(rows / block_rows), ceil(cols /
// 128)].
void fill_normal_blocks(std::mt19937_64& rng, const Tensor& t, const Tensor& scales,
                        int64_t block_rows) {
  const auto& table = normal_table();
  const int64_t rows = t.size(0), cols = t.size(1), G = ceil_div(cols, kBlock);
  std::vector<float> x(static_cast<size_t>(rows * cols));
  for (size_t i = 0; i < x.size(); i += 4) {
    const uint64_t r = rng();
    for (size_t j = 0; j < 4 && i + j < x.size(); ++j) x[i + j] = table[(r >> (16 * j)) & 0xffff];
  }
  auto* q = t.data_as<uint8_t>();
  for (int64_t r0 = 0; r0 < rows; r0 += block_rows) {
    const int64_t r1 = std::min(rows, r0 + block_rows);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t c0 = g * kBlock, c1 = std::min(cols, c0 + kBlock);
      float amax = 1e-4f;
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c) amax = std::max(amax, std::fabs(x[r * cols + c]));
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c)
          q[r * cols + c] = f32_to_f8e4m3(x[r * cols + c] * (448.0f / amax));
      scales.data_as<float>()[(r0 / block_rows) * G + g] = amax / 448.0f;
    }
  }
}

// Reference GEMM work per case (multiply-adds; the scalar reference does about 0.25e9/s): above
// it, the reference runs on the first rows (at least one).
constexpr double kReferenceMacs = 6e7;

// Logical scale (m, g) of a row-major f32 or packed UE8M0 scales tensor.
float scale_at(const TensorView& scales, ScaleLayout layout, int64_t m, int64_t g) {
  if (layout == ScaleLayout::row_major) return scales.data_as<float>()[m * scales.stride(0) + g];
  const int64_t word = g / 4;
  const uint8_t e = scales.data_as<uint8_t>()[(word * scales.stride(0) + m) * 4 + g % 4];
  return std::bit_cast<float>(static_cast<uint32_t>(e) << 23);
}

// Where a backend's tensors live: inputs are copied there and outputs back (GPU), or used as is.
Device device_of(Backend backend) {
  return backend == Backend::gpu ? Device::gpu() : Device::cpu();
}
Tensor staged(const TensorView& t, Backend backend) {
  return Tensor::copy_of(t, device_of(backend));
}
Tensor to_host(const Tensor& t) { return Tensor::copy_of(t.view(), Device::cpu()); }

// bf16 [rows, cols] drawn from N(0, sigma), one value in `outlier_every` (a power of two) scaled
// by `outlier_scale`, so that quantization groups and blocks differ in scale.
Tensor random_normal_bf16(uint64_t seed, int64_t rows, int64_t cols, float sigma,
                          uint64_t outlier_every, float outlier_scale) {
  std::mt19937_64 rng(seed);
  Tensor t = Tensor::empty(DType::bf16, {rows, cols});
  std::normal_distribution<float> normal(0.0f, sigma);
  for (int64_t i = 0; i < t.numel(); ++i) {
    float v = normal(rng);
    if ((rng() & (outlier_every - 1)) == 0) v *= outlier_scale;
    store_from_f32(t.data(), DType::bf16, i, v);
  }
  return t;
}

// Whether a differing e4m3 byte is a rounding near-tie: value / scale (`ratio`) within one f32 ulp
// of the midpoint of the two e4m3 values (spec/fp8.md allows those to round either way).
bool near_tie(float ratio, uint8_t want, uint8_t got) {
  const float mid = 0.5f * (f8e4m3_to_f32(want) + f8e4m3_to_f32(got));
  const float ulp = std::nextafter(std::fabs(ratio), INFINITY) - std::fabs(ratio);
  return std::fabs(ratio - mid) <= ulp;
}

// spec/fp8.md: 1e-3 for f32 out, plus bf16's rounding (2^-8 relative, at most) for bf16 out.
double gemm_tolerance(DType out) { return 1e-3 + (out == DType::bf16 ? 1.0 / 256 : 0.0); }

// w8a8_block_fp8_linear of bf16 x on `backend` (the workspace on its device) against the
// reference's linear layer on the first ref.size(0) rows: the relative mean error, or a negative
// value when no implementation of `backend` serves. `implementation` receives the chosen entry.
double linear_error(const TensorView& x, const Fp8GemmInputs& weight, const TensorView& ref,
                    Backend backend, std::string& implementation) {
  const int64_t M = x.size(0), N = weight.b.size(0), K = x.size(1);
  const Tensor x_on = staged(x, backend), b_on = staged(weight.b, backend);
  const Tensor bs_on = staged(weight.b_scales, backend);
  Tensor y_on = staged(Tensor::empty(DType::bf16, {M, N}).view(), backend);
  const size_t bytes = w8a8_block_fp8_linear_workspace_size(M, N, K, device_of(backend));
  Tensor workspace = zero_filled_bytes(bytes, device_of(backend));  // (with the GEMM's part)
  OpOptions op;
  op.backend = backend;
  implementation = chosen_name(explain_w8a8_block_fp8_linear(x_on, b_on, bs_on, std::nullopt, y_on,
                                                             workspace.data(), bytes, op));
  if (implementation.empty()) return -1.0;
  w8a8_block_fp8_linear(x_on, b_on, bs_on, std::nullopt, y_on, workspace.data(), bytes, op);
  return relative_mean_error(first_rows(to_host(y_on), ref.size(0)), ref);
}

// The second table: the linear layer at each token count and the weight quantization of the
// shape's first block rows (all of a partial last block row where N has one), every backend.
int check_linear_and_weights(const CheckOptions& options, uint64_t seed,
                             const std::vector<Backend>& tested) {
  std::printf(
      "\nFP8: w8a8_block_fp8_linear (bf16 x as a model's activations, quantized in the call; "
      "e4m3 weight; bf16 y) and block_quantize_weight (bf16 N(0, 0.02) weight, its first block "
      "rows) vs the reference\n");
  std::printf("%-44s %-11s %-9s %-30s %-22s %s\n", "shape", "M", "backend", "implementation",
              "linear bf16 rel / w diffs", "result");
  std::vector<int64_t> token_counts = {1, 7};
  if (!options.quick) token_counts.push_back(83);
  int failures = 0;
  uint64_t case_seed = seed ^ 0x11aea7ULL;
  for (const Fp8Shape& shape : fp8_shapes()) {
    const int64_t N = shape.n, K = shape.k;
    const Fp8GemmInputs weight = make_fp8_gemm_inputs(0, N, K, case_seed++);
    // Two whole block rows, and the partial one where N has it.
    const int64_t w_rows = std::min<int64_t>(N, 2 * kBlock + N % kBlock);
    const Tensor w = random_bf16_weight(case_seed++, w_rows, K);
    for (int64_t M : token_counts) {
      const Tensor x = random_fp8_activations(case_seed++, M, K);
      const int64_t ref_rows = std::clamp<int64_t>(
          static_cast<int64_t>(kReferenceMacs / static_cast<double>(N * K)), 1, M);
      Tensor ref = Tensor::empty(DType::f32, {ref_rows, N});
      const size_t ref_bytes = w8a8_block_fp8_linear_workspace_size(ref_rows, K);
      Tensor ref_workspace = Tensor::empty(DType::u8, {static_cast<int64_t>(ref_bytes)});
      w8a8_block_fp8_linear(first_rows(x, ref_rows), weight.b, weight.b_scales, std::nullopt, ref,
                            ref_workspace.data(), ref_bytes, OpOptions{Backend::reference});
      for (Backend backend : tested) {
        std::string implementation;
        const double error = linear_error(x, weight, ref, backend, implementation);
        std::string problem;
        if (error >= 0.0 && !(error < gemm_tolerance(DType::bf16)))
          problem = fmt::format("linear bf16 rel error {:.3g} >= {:.3g}", error,
                                gemm_tolerance(DType::bf16));
        const std::string rows_note =
            ref_rows < M ? fmt::format("{} (ref {})", M, ref_rows) : std::to_string(M);
        std::printf("%-44s %-11s %-9s %-30s %-22s %s\n", shape.name().c_str(), rows_note.c_str(),
                    std::string(backend_name(backend)).c_str(),
                    error >= 0.0 ? implementation.c_str() : "no implementation",
                    error >= 0.0 ? fmt::format("{:.3g}", error).c_str() : "-",
                    error < 0.0       ? "SKIP"
                    : problem.empty() ? "PASS"
                                      : "FAIL");
        if (!problem.empty()) {
          ++failures;
          std::printf("    %s\n", problem.c_str());
        }
      }
    }
    for (Backend backend : tested) {
      const Fp8WeightCheck c = check_fp8_quantize_weight(w, backend);
      std::string problem;
      if (c.diffs != c.near_ties)
        problem = fmt::format("weight bytes differ beyond near-ties: {}", c.diffs - c.near_ties);
      if (c.scale_diffs > 0)
        problem +=
            fmt::format("{}weight scales differ: {}", problem.empty() ? "" : "; ", c.scale_diffs);
      std::printf(
          "%-44s %-11s %-9s %-30s %-22s %s\n", shape.name().c_str(),
          fmt::format("w {}x{}", w_rows, K).c_str(), std::string(backend_name(backend)).c_str(),
          c.implementation.empty() ? "no implementation" : c.implementation.c_str(),
          c.implementation.empty() ? "-" : fmt::format("{} ({})", c.diffs, c.near_ties).c_str(),
          c.implementation.empty() ? "SKIP"
          : problem.empty()        ? "PASS"
                                   : "FAIL");
      if (!problem.empty()) {
        ++failures;
        std::printf("    %s\n", problem.c_str());
      }
    }
  }
  return failures;
}

// The third table: grouped_block_fp8_gemm over the models' expert layers (kGroups experts of one
// shape at decode token counts), whole and in the masked layout (groups of M, none, fewer, M
// rows), every backend against the reference on each group's first rows.
int check_grouped(const CheckOptions& options, uint64_t seed, const std::vector<Backend>& tested) {
  constexpr int64_t kGroups = 4;
  std::printf(
      "\nFP8: grouped_block_fp8_gemm (%lld experts of a shape, bf16 out), whole and masked "
      "(rows per group M, 0, M - 1, M) vs the reference per group\n",
      static_cast<long long>(kGroups));
  std::printf("%-44s %-11s %-9s %-22s %10s %10s %s\n", "shape", "M", "backend", "implementation",
              "bf16 rel", "masked rel", "result");
  std::vector<int64_t> token_counts = {1, 5};
  if (!options.quick) token_counts.push_back(16);
  int failures = 0;
  uint64_t case_seed = seed ^ 0x960c9edULL;
  for (const Fp8Shape& shape : fp8_shapes()) {
    if (shape.layer.find("expert") == std::string::npos || shape.n % kBlock != 0) continue;
    const int64_t N = shape.n, K = shape.k;
    const Fp8GemmInputs weights = make_fp8_gemm_inputs(0, kGroups * N, K, case_seed++);
    for (const int64_t M : token_counts) {
      const Fp8GemmInputs x = make_fp8_gemm_inputs(kGroups * M, 0, K, case_seed++);
      const int32_t counts[kGroups] = {static_cast<int32_t>(M), 0, static_cast<int32_t>(M - 1),
                                       static_cast<int32_t>(M)};
      Tensor masked_host = Tensor::empty(DType::i32, {kGroups});
      std::memcpy(masked_host.data(), counts, sizeof counts);
      // The reference on each group's first rows (as many as the reference's budget allows).
      const int64_t ref_rows = std::clamp<int64_t>(
          static_cast<int64_t>(kReferenceMacs / static_cast<double>(kGroups * N * K)), 1, M);
      std::vector<Tensor> refs;
      for (int64_t g = 0; g < kGroups; ++g) {
        refs.push_back(Tensor::empty(DType::f32, {ref_rows, N}));
        block_fp8_gemm(first_rows(plane_of(as_groups(x.a, kGroups), g), ref_rows),
                       first_rows(plane_of(as_groups(x.a_scales, kGroups), g), ref_rows),
                       ScaleLayout::row_major, plane_of(as_groups(weights.b, kGroups), g),
                       plane_of(as_groups(weights.b_scales, kGroups), g), std::nullopt, refs.back(),
                       OpOptions{Backend::reference});
      }
      for (Backend backend : tested) {
        const Tensor a = staged(x.a, backend), as = staged(x.a_scales, backend);
        const Tensor b = staged(weights.b, backend), bs = staged(weights.b_scales, backend);
        const Tensor masked_m = staged(masked_host, backend);
        Tensor out = Tensor::empty(DType::bf16, {kGroups * M, N}, device_of(backend));
        OpOptions op;
        op.backend = backend;
        const std::string implementation = chosen_name(explain_grouped_block_fp8_gemm(
            as_groups(a, kGroups), as_groups(as, kGroups), ScaleLayout::row_major,
            as_groups(b, kGroups), as_groups(bs, kGroups), as_groups(out, kGroups), op));
        // The largest error over the groups' checked rows (masked: the rows each group has).
        const auto error_of = [&](bool masked) {
          if (masked)
            grouped_block_fp8_gemm_masked(as_groups(a, kGroups), as_groups(as, kGroups),
                                          ScaleLayout::row_major, as_groups(b, kGroups),
                                          as_groups(bs, kGroups), masked_m, as_groups(out, kGroups),
                                          op);
          else
            grouped_block_fp8_gemm(as_groups(a, kGroups), as_groups(as, kGroups),
                                   ScaleLayout::row_major, as_groups(b, kGroups),
                                   as_groups(bs, kGroups), as_groups(out, kGroups), op);
          const Tensor host = to_host(out);
          double worst = 0.0;
          for (int64_t g = 0; g < kGroups; ++g) {
            const int64_t rows = masked ? std::min<int64_t>(counts[g], ref_rows) : ref_rows;
            if (rows <= 0) continue;
            worst = std::max(
                worst, relative_mean_error(first_rows(plane_of(as_groups(host, kGroups), g), rows),
                                           first_rows(refs[static_cast<size_t>(g)], rows)));
          }
          return worst;
        };
        const double whole = error_of(false), masked = error_of(true);
        const bool pass =
            whole < gemm_tolerance(DType::bf16) && masked < gemm_tolerance(DType::bf16);
        const std::string rows_note =
            ref_rows < M ? fmt::format("{} (ref {})", M, ref_rows) : std::to_string(M);
        std::printf("%-44s %-11s %-9s %-22s %10.3g %10.3g %s\n", shape.name().c_str(),
                    rows_note.c_str(), std::string(backend_name(backend)).c_str(),
                    implementation.c_str(), whole, masked, pass ? "PASS" : "FAIL");
        failures += pass ? 0 : 1;
      }
    }
  }
  return failures;
}

// The fourth table: silu_and_mul_group_quant_fp8 of the experts' gate_up outputs (x [M, 2I] bf16,
// I the down projection's K), row-major and packed UE8M0 scales, every backend against the
// reference: q bytes equal except rounding near-ties, scales bit-exact, as for the plain table.
int check_gated(const CheckOptions& options, uint64_t seed, const std::vector<Backend>& tested) {
  std::printf(
      "\nFP8: silu_and_mul_group_quant_fp8 (an expert's activation: x [M, 2I] bf16 -> q [M, I]), "
      "row-major and packed scales, vs the reference\n");
  std::printf("%-44s %4s %-9s %-22s %-24s %s\n", "shape", "M", "backend", "implementation",
              "q (near-tie)/scale diffs", "result");
  std::vector<int64_t> token_counts = {1, 7};
  if (!options.quick) token_counts.push_back(83);
  int failures = 0;
  uint64_t case_seed = seed ^ 0x5111ULL;
  for (const Fp8Shape& shape : fp8_shapes()) {
    if (shape.layer.find("expert down") == std::string::npos || shape.k % kBlock != 0) continue;
    const int64_t I = shape.k;
    for (const int64_t M : token_counts) {
      const Tensor x = random_fp8_activations(case_seed++, M, 2 * I);
      for (Backend backend : tested) {
        const Fp8QuantCheck row = check_fp8_quant(x, ScaleLayout::row_major, backend, true);
        const Fp8QuantCheck packed = check_fp8_quant(x, ScaleLayout::packed_ue8m0, backend, true);
        const bool ran = row.ran && packed.ran;
        const int64_t q_diffs = row.diffs + packed.diffs;
        const int64_t scale_diffs = row.scale_diffs + packed.scale_diffs;
        const int64_t near = row.near_ties + packed.near_ties;
        const bool pass = ran && q_diffs == near && scale_diffs == 0;
        std::printf("%-44s %4lld %-9s %-22s %-24s %s\n",
                    (shape.model + " expert act I=" + std::to_string(I)).c_str(),
                    static_cast<long long>(M), std::string(backend_name(backend)).c_str(),
                    ran ? row.implementation.c_str() : "no implementation",
                    ran ? fmt::format("{} ({})/{}", q_diffs, near, scale_diffs).c_str() : "-",
                    !ran   ? "SKIP"
                    : pass ? "PASS"
                           : "FAIL");
        failures += ran && !pass ? 1 : 0;
      }
    }
  }
  return failures;
}

// The fifth table: silu_and_mul_grouped_block_fp8_gemm_masked, the experts' down projections with
// their activation quantized inside (x [G, M, 2I] bf16, I the down projection's K; rows per group
// M, 0, M - 1, M), every backend (given a workspace: on Hopper the fused launch serves anyway)
// against the reference on each group's first rows.
int check_silu_grouped(const CheckOptions& options, uint64_t seed,
                       const std::vector<Backend>& tested) {
  constexpr int64_t kGroups = 4;
  std::printf(
      "\nFP8: silu_and_mul_grouped_block_fp8_gemm_masked (%lld experts' down projections, "
      "silu_and_mul quantized inside, bf16 out; rows per group M, 0, M - 1, M) vs the reference\n",
      static_cast<long long>(kGroups));
  std::printf("%-44s %-11s %-9s %-22s %10s %s\n", "shape", "M", "backend", "implementation",
              "bf16 rel", "result");
  std::vector<int64_t> token_counts = {1, 5};
  if (!options.quick) token_counts.push_back(16);
  int failures = 0;
  uint64_t case_seed = seed ^ 0x5d0eULL;
  for (const Fp8Shape& shape : fp8_shapes()) {
    if (shape.layer.find("expert down") == std::string::npos || shape.k % kBlock != 0) continue;
    const int64_t N = shape.n, K = shape.k;
    const Fp8GemmInputs weights = make_fp8_gemm_inputs(0, kGroups * N, K, case_seed++);
    for (const int64_t M : token_counts) {
      const Tensor x = random_fp8_activations(case_seed++, kGroups * M, 2 * K);
      const int32_t counts[kGroups] = {static_cast<int32_t>(M), 0, static_cast<int32_t>(M - 1),
                                       static_cast<int32_t>(M)};
      Tensor masked_host = Tensor::empty(DType::i32, {kGroups});
      std::memcpy(masked_host.data(), counts, sizeof counts);
      const size_t bytes = silu_and_mul_grouped_block_fp8_gemm_masked_workspace_size(kGroups, M, K);
      // The reference on each group's first rows (as many as its budget allows).
      const int64_t ref_rows = std::clamp<int64_t>(
          static_cast<int64_t>(kReferenceMacs / static_cast<double>(kGroups * N * K)), 1, M);
      Tensor ref_counts = Tensor::empty(DType::i32, {kGroups});
      for (int64_t g = 0; g < kGroups; ++g)
        ref_counts.data_as<int32_t>()[g] = std::min<int32_t>(counts[g], ref_rows);
      Tensor ref = Tensor::empty(DType::f32, {kGroups * M, N});
      const Tensor ref_space = zero_filled_bytes(bytes, Device::cpu());
      silu_and_mul_grouped_block_fp8_gemm_masked(
          as_groups(x, kGroups), ref_counts, as_groups(weights.b, kGroups),
          as_groups(weights.b_scales, kGroups), as_groups(ref, kGroups), GroupQuantConfig{}, 0,
          ref_space.data(), bytes, OpOptions{Backend::reference});
      for (Backend backend : tested) {
        const Tensor x_on = staged(x, backend), masked_m = staged(masked_host, backend);
        const Tensor b = staged(weights.b, backend), bs = staged(weights.b_scales, backend);
        const Tensor space = zero_filled_bytes(bytes, device_of(backend));
        Tensor out = Tensor::empty(DType::bf16, {kGroups * M, N}, device_of(backend));
        OpOptions op;
        op.backend = backend;
        const auto call_args = [&](auto&& f) {
          return f(as_groups(x_on, kGroups), masked_m, as_groups(b, kGroups),
                   as_groups(bs, kGroups), as_groups(out, kGroups), GroupQuantConfig{}, int64_t{0},
                   space.data(), bytes, op);
        };
        const std::string implementation = chosen_name(call_args(
            [](auto&&... a) { return explain_silu_and_mul_grouped_block_fp8_gemm_masked(a...); }));
        call_args([](auto&&... a) { silu_and_mul_grouped_block_fp8_gemm_masked(a...); });
        const Tensor host = to_host(out);
        double worst = 0.0;
        for (int64_t g = 0; g < kGroups; ++g) {
          const int64_t rows = std::min<int64_t>(counts[g], ref_rows);
          if (rows <= 0) continue;
          worst = std::max(
              worst, relative_mean_error(first_rows(plane_of(as_groups(host, kGroups), g), rows),
                                         first_rows(plane_of(as_groups(ref, kGroups), g), rows)));
        }
        const bool pass = worst < gemm_tolerance(DType::bf16);
        const std::string rows_note =
            ref_rows < M ? fmt::format("{} (ref {})", M, ref_rows) : std::to_string(M);
        std::printf("%-44s %-11s %-9s %-22s %10.3g %s\n", shape.name().c_str(), rows_note.c_str(),
                    std::string(backend_name(backend)).c_str(), implementation.c_str(), worst,
                    pass ? "PASS" : "FAIL");
        failures += pass ? 0 : 1;
      }
    }
  }
  return failures;
}

}  // namespace

// Quantizes x on `backend` and the reference; q bytes must match except where x / scale lies within
// one f32 ulp of the midpoint between the two e4m3 values (a rounding near-tie); scales exactly.
// gated: silu_and_mul_group_quant_fp8 of x [M, 2K]; the ratios are of its f32 activations (the
// same on every backend, silu_math.h).
Fp8QuantCheck check_fp8_quant(const TensorView& x, ScaleLayout layout, Backend backend,
                              bool gated) {
  Fp8QuantCheck r;
  GroupQuantConfig c;
  c.group_size = static_cast<int>(kBlock);
  c.layout = layout;
  c.ue8m0 = layout == ScaleLayout::packed_ue8m0;
  const int64_t M = x.size(0), K = gated ? x.size(1) / 2 : x.size(1);
  const ScaleStorage s = group_quant_scale_storage(M, K, c);
  auto make = [&](DType dtype, int64_t rows, int64_t cols) {
    Tensor t = Tensor::empty(dtype, {rows, cols});
    std::memset(t.data(), 0, t.nbytes());
    return t;
  };
  Tensor q_ref = make(DType::f8e4m3, M, K), s_ref = make(s.dtype, s.shape[0], s.shape[1]);
  const Tensor x_on = staged(x, backend);
  Tensor q_on = staged(make(DType::f8e4m3, M, K).view(), backend);
  Tensor s_on = staged(make(s.dtype, s.shape[0], s.shape[1]).view(), backend);
  OpOptions options;
  options.backend = backend;
  r.implementation =
      chosen_name(gated ? explain_silu_and_mul_group_quant_fp8(x_on, q_on, s_on, c, options)
                        : explain_per_token_group_quant_fp8(x_on, q_on, s_on, c, options));
  if (r.implementation.empty()) return r;
  r.ran = true;
  if (gated) {
    silu_and_mul_group_quant_fp8(x, q_ref, s_ref, c, OpOptions{Backend::reference});
    silu_and_mul_group_quant_fp8(x_on, q_on, s_on, c, options);
  } else {
    per_token_group_quant_fp8(x, q_ref, s_ref, c, OpOptions{Backend::reference});
    per_token_group_quant_fp8(x_on, q_on, s_on, c, options);
  }
  const Tensor q = to_host(q_on), sc = to_host(s_on);
  const auto* a = s_ref.data_as<uint8_t>();
  const auto* b = sc.data_as<uint8_t>();
  for (size_t i = 0; i < s_ref.nbytes(); i += 4) r.scale_diffs += std::memcmp(a + i, b + i, 4) != 0;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; ++k) {
      const uint8_t want = q_ref.data_as<uint8_t>()[m * K + k];
      const uint8_t got = q.data_as<uint8_t>()[m * K + k];
      if (want == got) continue;
      ++r.diffs;
      const auto at = [&](int64_t col) {
        return load_as_f32(x.data(), x.dtype(), m * x.stride(0) + col);
      };
      const float value = gated ? silu_and_mul_f32(at(k), at(K + k)) : at(k);
      const float ratio = value / scale_at(s_ref, layout, m, k / kBlock);
      r.near_ties += near_tie(ratio, want, got);
    }
  }
  return r;
}

Tensor random_bf16_weight(uint64_t seed, int64_t n, int64_t k) {
  return random_normal_bf16(seed, n, k, 0.02f, 256, 20.0f);
}

Fp8WeightCheck check_fp8_quantize_weight(const TensorView& w, Backend backend) {
  Fp8WeightCheck r;
  const int64_t N = w.size(0), K = w.size(1);
  Tensor q_ref = Tensor::empty(DType::f8e4m3, {N, K});
  Tensor s_ref = Tensor::empty(DType::f32, {ceil_div(N, kBlock), ceil_div(K, kBlock)});
  const Tensor w_on = staged(w, backend);
  Tensor q_on = staged(q_ref.view(), backend), s_on = staged(s_ref.view(), backend);
  OpOptions op;
  op.backend = backend;
  r.implementation = chosen_name(explain_block_quantize_weight(w_on, q_on, s_on, op));
  if (r.implementation.empty()) return r;
  block_quantize_weight(w, q_ref, s_ref, OpOptions{Backend::reference});
  block_quantize_weight(w_on, q_on, s_on, op);
  const Tensor q = to_host(q_on), sc = to_host(s_on);
  for (int64_t i = 0; i < s_ref.numel(); ++i)
    r.scale_diffs += std::bit_cast<uint32_t>(s_ref.data_as<float>()[i]) !=
                     std::bit_cast<uint32_t>(sc.data_as<float>()[i]);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t k = 0; k < K; ++k) {
      const uint8_t want = q_ref.data_as<uint8_t>()[n * K + k];
      const uint8_t got = q.data_as<uint8_t>()[n * K + k];
      if (want == got) continue;
      ++r.diffs;
      const float ratio = load_as_f32(w.data(), w.dtype(), n * w.stride(0) + k) /
                          s_ref.data_as<float>()[(n / kBlock) * ceil_div(K, kBlock) + k / kBlock];
      r.near_ties += near_tie(ratio, want, got);
    }
  }
  return r;
}

Tensor random_fp8_activations(uint64_t seed, int64_t M, int64_t K) {
  return random_normal_bf16(seed, M, K, 1.0f, 64, 30.0f);
}

Fp8GemmInputs make_fp8_gemm_inputs(int64_t m, int64_t n, int64_t k, uint64_t seed, Fp8Data data) {
  std::mt19937_64 rng(seed);
  Fp8GemmInputs in{Tensor::empty(DType::f8e4m3, {m, k}),
                   Tensor::empty(DType::f32, {m, ceil_div(k, kBlock)}),
                   Tensor::empty(DType::f8e4m3, {n, k}),
                   Tensor::empty(DType::f32, {ceil_div(n, kBlock), ceil_div(k, kBlock)})};
  if (data == Fp8Data::ones) {
    std::memset(in.a.data(), 0x38, in.a.nbytes());  // e4m3 1.0
    std::memset(in.b.data(), 0x38, in.b.nbytes());
    std::fill_n(in.a_scales.data_as<float>(), in.a_scales.numel(), 1.0f);
    std::fill_n(in.b_scales.data_as<float>(), in.b_scales.numel(), 1.0f);
    return in;
  }
  if (data == Fp8Data::normal) {
    fill_normal_blocks(rng, in.a, in.a_scales, 1);
    fill_normal_blocks(rng, in.b, in.b_scales, kBlock);
    return in;
  }
  fill_e4m3(rng, in.a);
  fill_scales(rng, in.a_scales);
  fill_e4m3(rng, in.b);
  fill_scales(rng, in.b_scales);
  return in;
}

Fp8Data parse_fp8_data(const std::string& name) {
  if (name == "uniform") return Fp8Data::uniform;
  if (name == "normal") return Fp8Data::normal;
  if (name == "ones") return Fp8Data::ones;
  fail("bench", "--data", name, "is not uniform, normal or ones");
}

TensorView first_rows(const TensorView& t, int64_t rows) {
  const int64_t shape[] = {rows, t.size(1)};
  const int64_t strides[] = {t.stride(0), t.stride(1)};
  return TensorView(t.data(), t.dtype(), shape, strides, t.device());
}

TensorView as_groups(const Tensor& t, int64_t groups) {
  return TensorView(t.data(), t.dtype(), {groups, t.size(0) / groups, t.size(1)}, t.device());
}

Tensor column_major_scales(const TensorView& row_major) {
  const int64_t M = row_major.size(0), G = row_major.size(1);
  Tensor t = Tensor::empty(DType::f32, {G, M});
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g)
      t.data_as<float>()[g * M + m] = row_major.data_as<float>()[m * row_major.stride(0) + g];
  return t;
}

Tensor zero_filled_bytes(size_t bytes, Device device) {
  Tensor zeros = Tensor::empty(DType::u8, {static_cast<int64_t>(std::max<size_t>(bytes, 1))});
  std::memset(zeros.data(), 0, zeros.nbytes());
  return device.is_cpu() ? std::move(zeros) : Tensor::copy_of(zeros.view(), device);
}

double relative_mean_error(const TensorView& out, const TensorView& ref) {
  double error = 0.0, magnitude = 0.0;
  for (int64_t m = 0; m < ref.size(0); ++m) {
    for (int64_t n = 0; n < ref.size(1); ++n) {
      const double want = load_as_f32(ref.data(), ref.dtype(), m * ref.stride(0) + n);
      const double got = load_as_f32(out.data(), out.dtype(), m * out.stride(0) + n);
      error += std::fabs(got - want);
      magnitude += std::fabs(want);
    }
  }
  return magnitude > 0.0 ? error / magnitude : error;
}

std::string chosen_name(const std::vector<ImplementationChoice>& choices) {
  for (const ImplementationChoice& c : choices)
    if (c.chosen) return c.name;
  return "";
}

int run_fp8_check(const CheckOptions& options, uint64_t seed, const std::vector<Backend>& tested) {
  std::printf(
      "\nFP8: per_token_group_quant_fp8 (group 128; row-major and packed UE8M0 scales, bf16 "
      "x) and block_fp8_gemm (A, B uniform +-448 as e4m3, scales uniform [0, 0.01)) vs the "
      "reference\n");
  std::printf("%-44s %4s %-9s %-22s %-19s %10s %10s %s\n", "shape", "M", "backend",
              "implementation (q/gemm)", "q diffs (near-tie)", "f32 rel", "bf16 rel", "result");
  std::vector<int64_t> token_counts = {1, 7, 83};
  if (!options.quick) token_counts.push_back(256);
  int failures = 0;
  std::vector<std::string> notes;
  uint64_t case_seed = seed ^ 0xf8f8f8f8ULL;
  for (const Fp8Shape& shape : fp8_shapes()) {
    const int64_t N = shape.n, K = shape.k;
    // The weight is shared by the shape's token counts (as in a model).
    Fp8GemmInputs weight = make_fp8_gemm_inputs(0, N, K, case_seed++);
    for (int64_t M : token_counts) {
      std::mt19937_64 rng(case_seed++);
      Fp8GemmInputs in = make_fp8_gemm_inputs(M, 0, K, rng());
      const Tensor x = random_fp8_activations(rng(), M, K);
      // The reference on the first `ref_rows` rows only when the whole case is too slow for it.
      const int64_t ref_rows = std::clamp<int64_t>(
          static_cast<int64_t>(kReferenceMacs / static_cast<double>(N * K)), 1, M);
      Tensor ref = Tensor::empty(DType::f32, {ref_rows, N});
      bool have_ref = false;
      for (Backend backend : tested) {
        const std::string backend_str(backend_name(backend));
        OpOptions op;
        op.backend = backend;
        std::string problem;
        // Quantization: K must be a multiple of the group (SGLang's K=3884 is not).
        std::string q_impl = "-", q_cell = "n/a (K%128)";
        if (K % kBlock == 0) {
          const Fp8QuantCheck row = check_fp8_quant(x, ScaleLayout::row_major, backend);
          const Fp8QuantCheck packed = check_fp8_quant(x, ScaleLayout::packed_ue8m0, backend);
          if (row.ran && packed.ran) {
            q_impl = row.implementation;
            const int64_t diffs = row.diffs + packed.diffs;
            const int64_t near = row.near_ties + packed.near_ties;
            q_cell = fmt::format("{} ({})", diffs, near);
            if (diffs != near)
              problem = fmt::format("q bytes differ beyond near-ties: {}", diffs - near);
            if (row.scale_diffs + packed.scale_diffs > 0)
              problem +=
                  fmt::format("{}scales differ: {} row-major, {} packed",
                              problem.empty() ? "" : "; ", row.scale_diffs, packed.scale_diffs);
          } else {
            q_cell = "no implementation";
          }
        }
        // GEMM, with row-major activation scales and, on the GPU, column-major ones too (the
        // layout cuBLASLt's block-scaled path reads).
        const Tensor a_on = staged(in.a, backend), b_on = staged(weight.b, backend);
        const Tensor bs_on = staged(weight.b_scales, backend);
        std::vector<std::pair<ScaleLayout, Tensor>> a_scales;
        a_scales.emplace_back(ScaleLayout::row_major, staged(in.a_scales, backend));
        if (backend == Backend::gpu)
          a_scales.emplace_back(ScaleLayout::column_major,
                                staged(column_major_scales(in.a_scales), backend));
        std::string g_impl, e32 = "-", e16 = "-";
        bool gemm_ran = false;
        for (const auto& [layout, as_on] : a_scales) {
          Tensor out32 = staged(Tensor::empty(DType::f32, {M, N}), backend);
          Tensor out16 = staged(Tensor::empty(DType::bf16, {M, N}), backend);
          const std::string impl = chosen_name(
              explain_block_fp8_gemm(a_on, as_on, layout, b_on, bs_on, std::nullopt, out32, op));
          g_impl += (g_impl.empty() ? "" : ",") + (impl.empty() ? std::string("-") : impl);
          if (impl.empty()) continue;
          gemm_ran = true;
          if (!have_ref) {
            block_fp8_gemm(first_rows(in.a, ref_rows), first_rows(in.a_scales, ref_rows),
                           ScaleLayout::row_major, weight.b, weight.b_scales, std::nullopt, ref,
                           OpOptions{Backend::reference});
            have_ref = true;
          }
          block_fp8_gemm(a_on, as_on, layout, b_on, bs_on, std::nullopt, out32, op);
          block_fp8_gemm(a_on, as_on, layout, b_on, bs_on, std::nullopt, out16, op);
          const double r32 = relative_mean_error(first_rows(to_host(out32), ref_rows), ref);
          const double r16 = relative_mean_error(first_rows(to_host(out16), ref_rows), ref);
          e32 = (e32 == "-" ? "" : e32 + ",") + fmt::format("{:.3g}", r32);
          e16 = (e16 == "-" ? "" : e16 + ",") + fmt::format("{:.3g}", r16);
          if (!(r32 < gemm_tolerance(DType::f32)))
            problem +=
                fmt::format("{}{} f32 gemm rel error {:.3g} >= {:.3g}", problem.empty() ? "" : "; ",
                            impl, r32, gemm_tolerance(DType::f32));
          if (!(r16 < gemm_tolerance(DType::bf16)))
            problem +=
                fmt::format("{}{} bf16 gemm rel error {:.3g} >= {:.3g}",
                            problem.empty() ? "" : "; ", impl, r16, gemm_tolerance(DType::bf16));
        }
        const bool any_ran = gemm_ran || q_impl != "-";
        const std::string result = !any_ran          ? "SKIP (no implementation)"
                                   : problem.empty() ? "PASS"
                                                     : "FAIL";
        std::string note;
        if (gemm_ran && ref_rows < M)
          note = fmt::format("  [reference on rows 0..{} of {}]", ref_rows - 1, M);
        std::printf("%-44s %4lld %-9s %-22s %-19s %10s %10s %s%s\n", shape.name().c_str(),
                    static_cast<long long>(M), backend_str.c_str(),
                    any_ran ? fmt::format("{}/{}", q_impl, g_impl).c_str() : "no implementation",
                    q_cell.c_str(), e32.c_str(), e16.c_str(), result.c_str(), note.c_str());
        if (!problem.empty()) {
          ++failures;
          std::printf("    %s\n", problem.c_str());
        }
      }
    }
  }
  std::printf(
      "FP8 tolerances: q bytes exact except rounding near-ties (x/scale within one f32 ulp "
      "of the midpoint of two e4m3 values), scales bit-exact; GEMM mean|out-ref|/mean|ref| "
      "< 1e-3 (f32 out), < 1e-3 + 2^-8 (bf16 out: its rounding, spec/fp8.md). The scalar "
      "reference GEMM runs on at most %.0g multiply-adds per case (first rows, as noted).\n",
      kReferenceMacs);
  return failures + check_linear_and_weights(options, seed, tested) +
         check_grouped(options, seed, tested) + check_gated(options, seed, tested) +
         check_silu_grouped(options, seed, tested);
}

}  // namespace moekit::cli
