// `moekit bench --op gemm|quant|linear|quantize-weight`: block_fp8_gemm (bf16 out),
// per_token_group_quant_fp8, w8a8_block_fp8_linear (bf16 x quantized, then the GEMM: a linear
// layer's whole call) and block_quantize_weight (a bf16 weight at load time) on a CPU backend. Each
// row is verified against the reference first (on its first rows: the reference is scalar), then
// timed: median microseconds per call, GB/s, TFLOP/s and the ratio to the one-pass memory roofline
// (bytes moved once / measured memcpy bandwidth).
#include <fmt/core.h>

#include <algorithm>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <vector>

#include "commands.h"
#include "moekit/error.h"

namespace moekit::cli {
namespace {

struct Row {
  std::string model;  // the shape's name
  int64_t tokens;
  std::string implementation;
  double median_us;
  double bytes;
  double flops;  // 0: not a FLOP-bound op
  bool verified;
};

constexpr int64_t kBlock = 128;

bool selected(const BenchOptions& options, const std::string& model, const std::string& name) {
  return options.model.empty() || options.model == model || options.model == name;
}

// Rows of `shape` that the reference computes when verifying (it is scalar).
constexpr int64_t kVerifyRows = 4;

OpOptions bench_op_options(Backend backend, int threads, const std::string& implementation) {
  OpOptions op;
  op.backend = backend;
  op.num_threads = threads;
  op.implementation = implementation;
  return op;
}

// Copies of a weight covering >= 64 MiB (at most 8), for calls to rotate over: the weights then
// come from memory, as in a model (each layer has its own).
std::vector<Tensor> weight_copies(const TensorView& w) {
  const int copies = static_cast<int>(
      std::clamp<size_t>((size_t{64} << 20) / std::max<size_t>(w.nbytes(), 1), 1, 8));
  std::vector<Tensor> weights;
  for (int i = 0; i < copies; ++i) weights.push_back(Tensor::copy_of(w, Device::cpu()));
  return weights;
}

Row bench_gemm(const Fp8Shape& shape, int64_t M, const OpOptions& op, uint64_t seed, Fp8Data data) {
  const int64_t N = shape.n, K = shape.k;
  const Fp8GemmInputs in = make_fp8_gemm_inputs(M, N, K, seed, data);
  Tensor out = Tensor::empty(DType::bf16, {M, N});
  Row row{shape.name(), M, "", 0.0, 0.0, 2.0 * static_cast<double>(M * N * K), false};
  row.implementation = chosen_name(explain_block_fp8_gemm(
      in.a, in.a_scales, ScaleLayout::row_major, in.b, in.b_scales, std::nullopt, out, op));
  // Verify: the backend on every row, the reference on the first ones.
  block_fp8_gemm(in.a, in.a_scales, ScaleLayout::row_major, in.b, in.b_scales, std::nullopt, out,
                 op);
  const int64_t rows = std::min(M, kVerifyRows);
  Tensor ref = Tensor::empty(DType::f32, {rows, N});
  block_fp8_gemm(first_rows(in.a, rows), first_rows(in.a_scales, rows), ScaleLayout::row_major,
                 in.b, in.b_scales, std::nullopt, ref, OpOptions{Backend::reference});
  row.verified = relative_mean_error(out, ref) < 1e-3 + 1.0 / 256;  // spec/fp8.md, bf16 out
  const std::vector<Tensor> weights = weight_copies(in.b);
  row.median_us = median_cpu_call_us([&](int i) {
    block_fp8_gemm(in.a, in.a_scales, ScaleLayout::row_major,
                   weights[static_cast<size_t>(i) % weights.size()], in.b_scales, std::nullopt, out,
                   op);
  });
  row.bytes = static_cast<double>(in.b.nbytes() + in.b_scales.nbytes() + in.a.nbytes() +
                                  in.a_scales.nbytes() + out.nbytes());
  return row;
}

// The linear layer as a model calls it: bf16 x [M, K], e4m3 weight [N, K] with 128 x 128 scales,
// bf16 y; the quantized activations in a workspace the caller owns. Verified against the
// reference's linear layer (its quantization, then its GEMM) on the first rows.
Row bench_linear(const Fp8Shape& shape, int64_t M, const OpOptions& op, uint64_t seed) {
  const int64_t N = shape.n, K = shape.k;
  const Tensor x = random_fp8_activations(seed, M, K);
  const Fp8GemmInputs w = make_fp8_gemm_inputs(1, N, K, seed + 1);  // its b and b_scales
  Tensor y = Tensor::empty(DType::bf16, {M, N});
  const size_t workspace_bytes = w8a8_block_fp8_linear_workspace_size(M, K);
  Tensor workspace = Tensor::empty(DType::u8, {static_cast<int64_t>(workspace_bytes)});
  Row row{shape.name(), M, "", 0.0, 0.0, 2.0 * static_cast<double>(M * N * K), false};
  row.implementation = chosen_name(explain_w8a8_block_fp8_linear(
      x, w.b, w.b_scales, std::nullopt, y, workspace.data(), workspace_bytes, op));
  w8a8_block_fp8_linear(x, w.b, w.b_scales, std::nullopt, y, workspace.data(), workspace_bytes, op);
  const int64_t rows = std::min(M, kVerifyRows);
  Tensor ref = Tensor::empty(DType::f32, {rows, N});
  const size_t ref_bytes = w8a8_block_fp8_linear_workspace_size(rows, K);
  Tensor ref_workspace = Tensor::empty(DType::u8, {static_cast<int64_t>(ref_bytes)});
  w8a8_block_fp8_linear(first_rows(x, rows), w.b, w.b_scales, std::nullopt, ref,
                        ref_workspace.data(), ref_bytes, OpOptions{Backend::reference});
  row.verified = relative_mean_error(y, ref) < 1e-3 + 1.0 / 256;  // spec/fp8.md, bf16 out
  const std::vector<Tensor> weights = weight_copies(w.b);
  row.median_us = median_cpu_call_us([&](int i) {
    w8a8_block_fp8_linear(x, weights[static_cast<size_t>(i) % weights.size()], w.b_scales,
                          std::nullopt, y, workspace.data(), workspace_bytes, op);
  });
  row.bytes = static_cast<double>(x.nbytes() + w.b.nbytes() + w.b_scales.nbytes() + y.nbytes());
  return row;
}

// block_quantize_weight of a bf16 weight [N, K]; verified against the reference on its first two
// block rows; "tokens" holds N.
Row bench_quantize_weight(const std::string& name, int64_t N, int64_t K, Backend backend,
                          int threads, uint64_t seed) {
  const Tensor w = random_bf16_weight(seed, N, K);
  Tensor q = Tensor::empty(DType::f8e4m3, {N, K});
  Tensor s = Tensor::empty(DType::f32, {(N + kBlock - 1) / kBlock, (K + kBlock - 1) / kBlock});
  OpOptions op;
  op.backend = backend;
  op.num_threads = threads;
  Row row{name, N, "", 0.0, 0.0, 0.0, false};
  const Fp8WeightCheck check =
      check_fp8_quantize_weight(first_rows(w, std::min<int64_t>(N, 2 * kBlock)), backend);
  row.implementation = check.implementation;
  row.verified =
      !check.implementation.empty() && check.diffs == check.near_ties && check.scale_diffs == 0;
  if (check.implementation.empty()) return row;
  row.median_us = median_cpu_call_us([&](int) { block_quantize_weight(w, q, s, op); });
  row.bytes = static_cast<double>(w.nbytes() + q.nbytes() + s.nbytes());
  return row;
}

// gated: silu_and_mul_group_quant_fp8 of x [M, 2K] into q [M, K].
Row bench_quant(const std::string& name, int64_t M, int64_t K, ScaleLayout layout, Backend backend,
                int threads, uint64_t seed, bool gated = false) {
  const Tensor x = random_fp8_activations(seed, M, gated ? 2 * K : K);
  GroupQuantConfig c;
  c.group_size = static_cast<int>(kBlock);
  c.layout = layout;
  c.ue8m0 = layout == ScaleLayout::packed_ue8m0;
  const ScaleStorage s = group_quant_scale_storage(M, K, c);
  Tensor q = Tensor::empty(DType::f8e4m3, {M, K});
  Tensor scales = Tensor::empty(s.dtype, {s.shape[0], s.shape[1]});
  OpOptions op;
  op.backend = backend;
  op.num_threads = threads;
  Row row{name, M, "", 0.0, 0.0, 0.0, false};
  // Verify on the first 64 rows (the reference is scalar).
  const Fp8QuantCheck check =
      check_fp8_quant(first_rows(x, std::min<int64_t>(M, 64)), layout, backend, gated);
  row.implementation = check.implementation;
  row.verified = check.ran && check.diffs == check.near_ties && check.scale_diffs == 0;
  row.median_us = median_cpu_call_us([&](int) {
    if (gated)
      silu_and_mul_group_quant_fp8(x, q, scales, c, op);
    else
      per_token_group_quant_fp8(x, q, scales, c, op);
  });
  row.bytes = static_cast<double>(x.nbytes() + q.nbytes() + scales.nbytes());
  return row;
}

}  // namespace

int run_fp8_bench(const BenchOptions& options, Backend backend, int threads) {
  if (backend == Backend::gpu) return run_fp8_bench_gpu(options);
  const double bandwidth = measure_cpu_copy_bandwidth(threads);
  std::vector<Row> rows;
  bool found = false;
  uint64_t seed = 12345;
  if (options.op == "gemm" || options.op == "linear") {
    const std::vector<std::pair<std::string, std::pair<int64_t, int64_t>>> wanted = {
        {"DeepSeek-V3", {4096, 7168}}, {"Qwen3-30B-A3B", {4096, 2048}}};
    for (const auto& [model, nk] : wanted) {
      for (const Fp8Shape& shape : fp8_shapes()) {
        if (shape.model != model || shape.n != nk.first || shape.k != nk.second) continue;
        if (!selected(options, shape.model, shape.name())) continue;
        found = true;
        const std::vector<int64_t> token_counts = options.tokens > 0
                                                      ? std::vector<int64_t>{options.tokens}
                                                      : std::vector<int64_t>{1, 16, 32, 64, 256};
        const OpOptions op = bench_op_options(backend, threads, options.implementation);
        for (int64_t M : token_counts)
          rows.push_back(options.op == "gemm"
                             ? bench_gemm(shape, M, op, seed++, parse_fp8_data(options.data))
                             : bench_linear(shape, M, op, seed++));
      }
    }
  } else if (options.op == "quantize-weight") {
    const int64_t N = 4096, K = 7168;
    const std::string name = fmt::format("DeepSeek-V3 weight N={} K={}", N, K);
    if (selected(options, "DeepSeek-V3", name) && (options.tokens == 0 || options.tokens == N)) {
      found = true;
      rows.push_back(bench_quantize_weight(name, N, K, backend, threads, seed++));
    }
  } else {
    const int64_t M = 4096, K = 7168;
    for (ScaleLayout layout : {ScaleLayout::row_major, ScaleLayout::packed_ue8m0}) {
      const std::string name = fmt::format(
          "DeepSeek-V3 x K={} {}", K, layout == ScaleLayout::row_major ? "row" : "packed-ue8m0");
      if (!selected(options, "DeepSeek-V3", name)) continue;
      found = true;
      if (options.tokens > 0 && M != options.tokens) continue;
      rows.push_back(bench_quant(name, M, K, layout, backend, threads, seed++));
    }
    // silu_and_mul_group_quant_fp8 of a Qwen3-30B-A3B expert's gate_up output (x [M, 2 x 768]).
    const std::string gated = "Qwen3-30B-A3B expert act silu_and_mul x [4096, 1536] row";
    if (selected(options, "Qwen3-30B-A3B", gated) && (options.tokens == 0 || options.tokens == M)) {
      found = true;
      rows.push_back(
          bench_quant(gated, M, 768, ScaleLayout::row_major, backend, threads, seed++, true));
    }
  }
  if (!found) fail("bench", "--model", options.model, "is not a shape of bench --op " + options.op);
  const bool all_verified =
      std::all_of(rows.begin(), rows.end(), [](const Row& r) { return r.verified; });
  const std::string backend_str(backend_name(backend));
  if (options.json) {
    nlohmann::json out = nlohmann::json::array();
    for (const Row& r : rows) {
      out.push_back(
          {{"op", options.op},
           {"model", r.model},
           {"tokens", r.tokens},
           {"backend", backend_str},
           {"implementation", r.implementation},
           {"threads", threads},
           {"median_us", r.median_us},
           {"gb_per_s", r.bytes / (r.median_us * 1e-6) / 1e9},
           {"tflop_per_s", r.flops > 0.0 ? nlohmann::json(r.flops / (r.median_us * 1e-6) / 1e12)
                                         : nlohmann::json(nullptr)},
           {"roofline_us", r.bytes / bandwidth * 1e6},
           {"verified", r.verified}});
    }
    std::printf("%s\n", out.dump(1).c_str());
    return all_verified ? 0 : 1;
  }
  std::printf(
      "moekit bench %s, backend %s, %d thread(s), median per call; roofline = bytes moved once / "
      "%.1f GB/s (CPU memcpy, %d thread(s))\n",
      options.op.c_str(), backend_str.c_str(), threads, bandwidth / 1e9, threads);
  std::printf("%-40s %6s %-12s %11s %9s %9s %11s %11s\n", "shape", "tokens", "impl", "median us",
              "GB/s", "TFLOP/s", "roofline us", "of roofline");
  for (const Row& r : rows) {
    const double roofline_us = r.bytes / bandwidth * 1e6;
    std::printf(
        "%-40s %6lld %-12s %11.2f %9.2f %9s %11.2f %10.1f%%%s\n", r.model.c_str(),
        static_cast<long long>(r.tokens), r.implementation.c_str(), r.median_us,
        r.bytes / (r.median_us * 1e-6) / 1e9,
        r.flops > 0.0 ? fmt::format("{:.3f}", r.flops / (r.median_us * 1e-6) / 1e12).c_str() : "-",
        roofline_us, 100.0 * roofline_us / r.median_us, r.verified ? "" : "  NOT VERIFIED");
  }
  std::printf(
      "bytes: %s. TFLOP/s counts 2*M*N*K. No ratio to the FMA peak: measuring it portably would "
      "need ISA-specific code built with its own flags, which the CLI does not carry.\n",
      options.op == "gemm"     ? "weight (e4m3) + weight scales + A (e4m3) + A scales + bf16 out"
      : options.op == "linear" ? "x (bf16) + weight (e4m3) + weight scales + bf16 y"
      : options.op == "quantize-weight" ? "bf16 weight + e4m3 weight + f32 scales (tokens: N)"
                                        : "x (bf16) + q (e4m3) + scales");
  return all_verified ? 0 : 1;
}

}  // namespace moekit::cli
