// `moekit bench --op gemm|quant|linear|quantize-weight --backend gpu`: every GPU implementation of
// block_fp8_gemm that serves a shape (cuBLASLt, moekit's Hopper kernel, moekit's portable kernel),
// each verified against the reference on its first rows, then timed by CUDA-graph replay with the
// weights rotating over copies larger than L2 (as in a model, where each layer has its own). Prints
// us, TFLOP/s, GB/s and the ratio to the HBM floor (bytes moved once / measured copy bandwidth),
// and marks the implementation the dispatch picks. The GEMMs run with OpOptions::static_weights, as
// a model runner calls them (each layer's weights are written once, at load): moekit's Hopper
// kernel then starts loading weights while the previous call finishes (MOEKIT_SM90_EARLY=0 times it
// without). `--op linear` times w8a8_block_fp8_linear through every GPU entry that serves, marking
// the one the dispatch picks: a linear layer's whole call (bf16 x quantized inside the GEMM kernel,
// "gpu.sm90.fused", or into a workspace by a kernel of its own before the GEMM), at decode sizes.
#include <fmt/core.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "commands.h"
#include "moekit/error.h"
#ifdef MOEKIT_HAVE_GPU
#include "gpu/gpu_runtime.h"
#endif
#include "ops/fp8_problem.h"

namespace moekit::cli {

#ifdef MOEKIT_HAVE_GPU
namespace {

struct GpuRow {
  std::string shape;
  int64_t m, n, k;
  std::string implementation;
  bool dispatched = false;  // what block_fp8_gemm picks with no implementation named
  bool verified = false;
  double median_us = 0.0;
  double bytes = 0.0, flops = 0.0;
};

constexpr const char* kGemmImplementations[] = {"gpu.cublaslt", "gpu.sm90", "gpu"};

// Copies of a weight on the GPU covering >= 256 MiB (several times L2; at most 16), for the calls
// of a graph to rotate over.
std::vector<Tensor> weight_copies(const TensorView& w) {
  const int copies = static_cast<int>(
      std::clamp<size_t>((size_t{256} << 20) / std::max<size_t>(w.nbytes(), 1), 1, 16));
  std::vector<Tensor> weights;
  for (int i = 0; i < copies; ++i) weights.push_back(Tensor::copy_of(w, Device::gpu()));
  return weights;
}

// only: one implementation's row (empty: every implementation that serves).
std::vector<GpuRow> bench_gemm_shape(const std::string& name, int64_t M, int64_t N, int64_t K,
                                     uint64_t seed, Fp8Data data, const std::string& only,
                                     int replays) {
  const Device gpu = Device::gpu();
  const Fp8GemmInputs in = make_fp8_gemm_inputs(M, N, K, seed, data);
  const Tensor a = Tensor::copy_of(in.a, gpu), b_scales = Tensor::copy_of(in.b_scales, gpu);
  const Tensor as_row = Tensor::copy_of(in.a_scales, gpu);
  const Tensor as_col = Tensor::copy_of(column_major_scales(in.a_scales), gpu);
  const std::vector<Tensor> weights = weight_copies(in.b);
  const size_t weight_bytes = in.b.nbytes();
  const int copies = static_cast<int>(weights.size());
  Tensor out = Tensor::empty(DType::bf16, {M, N}, gpu);
  // The op's scratch, zero-filled once (as a caller would keep one per stream);
  // MOEKIT_BENCH_NO_WORKSPACE=1 times the calls without one.
  const char* no_workspace = std::getenv("MOEKIT_BENCH_NO_WORKSPACE");
  const size_t workspace_bytes = no_workspace != nullptr && std::string(no_workspace) == "1"
                                     ? 0
                                     : block_fp8_gemm_workspace_size(M, N, K, gpu);
  Tensor workspace_tensor = zero_filled_bytes(workspace_bytes, gpu);
  void* workspace = workspace_bytes > 0 ? workspace_tensor.data() : nullptr;
  const int64_t rows = std::min<int64_t>(M, K > 8192 ? 2 : 4);
  Tensor ref = Tensor::empty(DType::f32, {rows, N});
  block_fp8_gemm(first_rows(in.a, rows), first_rows(in.a_scales, rows), ScaleLayout::row_major,
                 in.b, in.b_scales, std::nullopt, ref, OpOptions{Backend::reference});

  OpOptions any;
  any.backend = Backend::gpu;
  any.static_weights = true;
  const std::string dispatched =
      chosen_name(explain_block_fp8_gemm(a, as_col, ScaleLayout::column_major, weights[0], b_scales,
                                         std::nullopt, out, workspace, workspace_bytes, any));
  std::vector<GpuRow> result;
  for (const char* implementation : kGemmImplementations) {
    if (!only.empty() && only != implementation) continue;
    // cuBLASLt reads VEC128 scales M-contiguous; our kernels are timed with SGLang's row-major.
    const bool library = std::string(implementation) == "gpu.cublaslt";
    const TensorView as = library ? as_col.view() : as_row.view();
    const ScaleLayout layout = library ? ScaleLayout::column_major : ScaleLayout::row_major;
    OpOptions op = any;
    op.implementation = implementation;
    if (chosen_name(explain_block_fp8_gemm(a, as, layout, weights[0], b_scales, std::nullopt, out,
                                           workspace, workspace_bytes, op))
            .empty())
      continue;
    GpuRow row{name, M, N, K, implementation, implementation == dispatched};
    block_fp8_gemm(a, as, layout, weights[0], b_scales, std::nullopt, out, workspace,
                   workspace_bytes, op);
    row.verified = relative_mean_error(first_rows(Tensor::copy_of(out.view(), Device::cpu()), rows),
                                       ref) < 1e-3 + 1.0 / 256;  // spec/fp8.md, bf16 out
    int call = 0;
    row.median_us = gpu::median_graph_replay_us(
        [&](void* stream) {
          op.stream = stream;
          block_fp8_gemm(a, as, layout, weights[static_cast<size_t>(call++ % copies)], b_scales,
                         std::nullopt, out, workspace, workspace_bytes, op);
        },
        /*calls_per_graph=*/std::max(copies, 4), replays);
    row.bytes = static_cast<double>(weight_bytes + in.b_scales.nbytes() + in.a.nbytes() +
                                    in.a_scales.nbytes() + out.nbytes());
    row.flops = 2.0 * static_cast<double>(M) * static_cast<double>(N) * static_cast<double>(K);
    result.push_back(row);
  }
  return result;
}

constexpr const char* kLinearImplementations[] = {"gpu.cublaslt", "gpu.sm90.fused", "gpu"};

std::vector<GpuRow> bench_linear_gpu(const std::string& name, int64_t M, int64_t N, int64_t K,
                                     uint64_t seed, int replays) {
  const Device gpu = Device::gpu();
  const Tensor x_host = random_fp8_activations(seed, M, K);
  const Fp8GemmInputs w = make_fp8_gemm_inputs(1, N, K, seed + 1);  // its b and b_scales
  const Tensor x = Tensor::copy_of(x_host, gpu), b_scales = Tensor::copy_of(w.b_scales, gpu);
  const std::vector<Tensor> weights = weight_copies(w.b);
  const size_t weight_bytes = w.b.nbytes();
  const int copies = static_cast<int>(weights.size());
  Tensor y = Tensor::empty(DType::bf16, {M, N}, gpu);
  // The layer's scratch with the GEMM's, zero-filled once (MOEKIT_BENCH_NO_WORKSPACE=1: only the
  // quantized activations', so the GEMM runs without one).
  const char* no_workspace = std::getenv("MOEKIT_BENCH_NO_WORKSPACE");
  const size_t workspace_bytes = no_workspace != nullptr && std::string(no_workspace) == "1"
                                     ? w8a8_block_fp8_linear_workspace_size(M, K)
                                     : w8a8_block_fp8_linear_workspace_size(M, N, K, gpu);
  Tensor workspace = zero_filled_bytes(workspace_bytes, gpu);
  const int64_t rows = std::min<int64_t>(M, 4);
  Tensor ref = Tensor::empty(DType::f32, {rows, N});
  const size_t ref_bytes = w8a8_block_fp8_linear_workspace_size(rows, K);
  Tensor ref_workspace = Tensor::empty(DType::u8, {static_cast<int64_t>(ref_bytes)});
  w8a8_block_fp8_linear(first_rows(x_host, rows), w.b, w.b_scales, std::nullopt, ref,
                        ref_workspace.data(), ref_bytes, OpOptions{Backend::reference});

  OpOptions any;
  any.backend = Backend::gpu;
  any.static_weights = true;  // as a model runner calls its layers
  const std::string dispatched = chosen_name(explain_w8a8_block_fp8_linear(
      x, weights[0], b_scales, std::nullopt, y, workspace.data(), workspace_bytes, any));
  // What the dispatch picks, and the entries after it that serve too (the fused entry's
  // two-kernel alternative), each timed the same way.
  std::vector<GpuRow> result;
  for (const char* implementation : kLinearImplementations) {
    OpOptions op = any;
    op.implementation = implementation;
    if (chosen_name(explain_w8a8_block_fp8_linear(x, weights[0], b_scales, std::nullopt, y,
                                                  workspace.data(), workspace_bytes, op))
            .empty())
      continue;
    GpuRow row{name, M, N, K, implementation, implementation == dispatched};
    w8a8_block_fp8_linear(x, weights[0], b_scales, std::nullopt, y, workspace.data(),
                          workspace_bytes, op);
    row.verified = relative_mean_error(first_rows(Tensor::copy_of(y.view(), Device::cpu()), rows),
                                       ref) < 1e-3 + 1.0 / 256;  // spec/fp8.md, bf16 out
    int call = 0;
    row.median_us = gpu::median_graph_replay_us(
        [&](void* stream) {
          op.stream = stream;
          w8a8_block_fp8_linear(x, weights[static_cast<size_t>(call++ % copies)], b_scales,
                                std::nullopt, y, workspace.data(), workspace_bytes, op);
        },
        /*calls_per_graph=*/std::max(copies, 4), replays);
    row.bytes = static_cast<double>(x.nbytes() + weight_bytes + w.b_scales.nbytes() + y.nbytes());
    row.flops = 2.0 * static_cast<double>(M) * static_cast<double>(N) * static_cast<double>(K);
    result.push_back(row);
  }
  return result;
}

// The grouped GEMM's GPU entries: the decode-size kernel, the persistent wide tiles (past 64 rows
// per group), one gpu.sm90 launch per group.
constexpr const char* kGroupedKernel = "gpu.sm90.grouped";
constexpr const char* kGroupedWide = "gpu.sm90.grouped_wide";
constexpr const char* kPerGroup = "gpu.per_group";
constexpr int64_t kBenchGroups = 8;

// grouped_block_fp8_gemm of kBenchGroups GEMMs of one shape (N a multiple of 128), each entry that
// serves timed per call and reported per GEMM: us / G, and one GEMM's bytes and flops. Verified on
// the first rows of the first and last groups.
std::vector<GpuRow> bench_grouped_gpu(const std::string& name, int64_t M, int64_t N, int64_t K,
                                      uint64_t seed, int replays) {
  const Device gpu = Device::gpu();
  const int64_t G = kBenchGroups;
  const Fp8GemmInputs x = make_fp8_gemm_inputs(G * M, 1, K, seed);      // its a and a_scales
  const Fp8GemmInputs w = make_fp8_gemm_inputs(1, G * N, K, seed + 1);  // its b and b_scales
  const Tensor a = Tensor::copy_of(x.a, gpu), as = Tensor::copy_of(x.a_scales, gpu);
  const Tensor b_scales = Tensor::copy_of(w.b_scales, gpu);
  const std::vector<Tensor> weights = weight_copies(w.b);
  const int copies = static_cast<int>(weights.size());
  Tensor out = Tensor::empty(DType::bf16, {G * M, N}, gpu);
  const int64_t rows = std::min<int64_t>(M, 2);
  std::vector<Tensor> refs;
  for (const int64_t g : {int64_t{0}, G - 1}) {
    refs.push_back(Tensor::empty(DType::f32, {rows, N}));
    block_fp8_gemm(first_rows(plane_of(as_groups(x.a, G), g), rows),
                   first_rows(plane_of(as_groups(x.a_scales, G), g), rows), ScaleLayout::row_major,
                   plane_of(as_groups(w.b, G), g), plane_of(as_groups(w.b_scales, G), g),
                   std::nullopt, TensorView(refs.back().data(), DType::f32, {rows, N}),
                   OpOptions{Backend::reference});
  }
  OpOptions any;
  any.backend = Backend::gpu;
  any.static_weights = true;
  const auto explain = [&](const OpOptions& op) {
    return chosen_name(explain_grouped_block_fp8_gemm(
        as_groups(a, G), as_groups(as, G), ScaleLayout::row_major, as_groups(weights[0], G),
        as_groups(b_scales, G), as_groups(out, G), op));
  };
  const std::string dispatched = explain(any);
  // The masked layout with every other group given no rows (an MoE step where half the experts
  // get no tokens): timed per group that has rows.
  Tensor masked_host = Tensor::empty(DType::i32, {G});
  for (int64_t g = 0; g < G; ++g)
    masked_host.data_as<int32_t>()[g] = g % 2 == 0 ? static_cast<int32_t>(M) : 0;
  const Tensor masked_m = Tensor::copy_of(masked_host, gpu);
  std::vector<GpuRow> result;
  // Past 16 rows the masked layout also runs with the hint of M expected rows (unhinted, it plans
  // for 16 and streams a group's weights once per 16 rows); past 64, the wide tiles take it.
  struct Variant {
    const char* implementation;
    bool masked;
    int64_t expected_rows;  // 0: no hint
  };
  std::vector<Variant> variants = {{kGroupedWide, false, 0},
                                   {kGroupedKernel, false, 0},
                                   {kPerGroup, false, 0},
                                   {kGroupedKernel, true, 0}};
  if (M > 16) variants.push_back({kGroupedKernel, true, M});
  if (M > 64) variants.push_back({kGroupedWide, true, M});
  for (const auto& [implementation, masked, expected_rows] : variants) {
    OpOptions op = any;
    op.implementation = implementation;
    if (explain(op).empty()) continue;
    const int64_t active = masked ? G / 2 : G;
    GpuRow row{name + " G=" + std::to_string(G) +
                   (masked ? ", " + std::to_string(active) + " with rows" : "") +
                   (expected_rows > 0 ? ", expected " + std::to_string(expected_rows) : ""),
               M,
               N,
               K,
               implementation,
               implementation == dispatched && !masked};
    const auto call = [&](const Tensor& weight) {
      if (masked && expected_rows > 0)
        grouped_block_fp8_gemm_masked(as_groups(a, G), as_groups(as, G), ScaleLayout::row_major,
                                      as_groups(weight, G), as_groups(b_scales, G), masked_m,
                                      as_groups(out, G), expected_rows, op);
      else if (masked)
        grouped_block_fp8_gemm_masked(as_groups(a, G), as_groups(as, G), ScaleLayout::row_major,
                                      as_groups(weight, G), as_groups(b_scales, G), masked_m,
                                      as_groups(out, G), op);
      else
        grouped_block_fp8_gemm(as_groups(a, G), as_groups(as, G), ScaleLayout::row_major,
                               as_groups(weight, G), as_groups(b_scales, G), as_groups(out, G), op);
    };
    call(weights[0]);
    const Tensor host = Tensor::copy_of(out.view(), Device::cpu());
    row.verified = true;
    for (size_t i = 0; i < (masked ? 1 : refs.size()); ++i) {  // (group G - 1 has none if masked)
      const int64_t g = i == 0 ? 0 : G - 1;
      const TensorView got(host.data_as<uint16_t>() + g * M * N, DType::bf16, {rows, N});
      row.verified = row.verified &&
                     relative_mean_error(got, refs[i]) < 1e-3 + 1.0 / 256;  // spec/fp8.md, bf16
    }
    int next = 0;
    row.median_us = gpu::median_graph_replay_us(
                        [&](void* stream) {
                          op.stream = stream;
                          call(weights[static_cast<size_t>(next++ % copies)]);
                        },
                        /*calls_per_graph=*/std::max(copies, 4), replays) /
                    static_cast<double>(active);
    row.bytes = static_cast<double>(w.b.nbytes() + w.b_scales.nbytes() + x.a.nbytes() +
                                    x.a_scales.nbytes() + out.nbytes()) /
                static_cast<double>(G);
    row.flops = 2.0 * static_cast<double>(M) * static_cast<double>(N) * static_cast<double>(K);
    result.push_back(row);
  }
  return result;
}

// grouped_block_fp8_gemm_contiguous as an MoE prefill lays it out (DeepGEMM's contiguous layout):
// expert e's rows_of_expert[e] rows from block to block, each expert's padded to 128 (padding
// rows indexed -1), timed per call through what the dispatch picks, reported per expert: us / E,
// and an expert's share of the bytes and flops (its rows only). Verified on the first rows of the
// first and last experts.
std::optional<GpuRow> bench_contiguous_gpu(const std::string& name,
                                           const std::vector<int64_t>& rows_of_expert, int64_t N,
                                           int64_t K, uint64_t seed, int replays) {
  const Device gpu = Device::gpu();
  const auto E = static_cast<int64_t>(rows_of_expert.size());
  std::vector<int32_t> indices;
  std::vector<int64_t> first_row;  // each expert's
  int64_t live = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t rows = rows_of_expert[static_cast<size_t>(e)];
    first_row.push_back(static_cast<int64_t>(indices.size()));
    live += rows;
    for (int64_t r = 0;
         r < (rows + kContiguousBlockRows - 1) / kContiguousBlockRows * kContiguousBlockRows; ++r)
      indices.push_back(r < rows ? static_cast<int32_t>(e) : -1);
  }
  const auto M = static_cast<int64_t>(indices.size());
  const Fp8GemmInputs x = make_fp8_gemm_inputs(M, 1, K, seed);          // its a and a_scales
  const Fp8GemmInputs w = make_fp8_gemm_inputs(1, E * N, K, seed + 1);  // its b and b_scales
  // (column-major activation scales, as DeepGEMM takes them: M-inner, any K)
  const Tensor a = Tensor::copy_of(x.a, gpu);
  const Tensor as = Tensor::copy_of(column_major_scales(x.a_scales), gpu);
  const Tensor b_scales = Tensor::copy_of(w.b_scales, gpu);
  const std::vector<Tensor> weights = weight_copies(w.b);
  const int copies = static_cast<int>(weights.size());
  Tensor host_indices = Tensor::empty(DType::i32, {M});
  std::memcpy(host_indices.data(), indices.data(), indices.size() * 4);
  const Tensor m_indices = Tensor::copy_of(host_indices, gpu);
  Tensor out = Tensor::empty(DType::bf16, {M, N}, gpu);
  OpOptions op;
  op.backend = Backend::gpu;
  op.static_weights = true;
  const std::string chosen = chosen_name(explain_grouped_block_fp8_gemm_contiguous(
      a, as, ScaleLayout::column_major, as_groups(weights[0], E), as_groups(b_scales, E), m_indices,
      out, op));
  // (gpu.per_segment reads the indices on the host: no CUDA graph can hold it)
  if (chosen != "gpu.sm90.contiguous") return std::nullopt;
  GpuRow row{name + " E=" + std::to_string(E) + ", contiguous", live / E, N, K, chosen, true};
  const auto call = [&](const Tensor& weight) {
    grouped_block_fp8_gemm_contiguous(a, as, ScaleLayout::column_major, as_groups(weight, E),
                                      as_groups(b_scales, E), m_indices, out, op);
  };
  call(weights[0]);
  const Tensor host = Tensor::copy_of(out.view(), Device::cpu());
  row.verified = true;
  for (const int64_t e : {int64_t{0}, E - 1}) {
    const int64_t first = first_row[static_cast<size_t>(e)];
    const int64_t rows = std::min<int64_t>(rows_of_expert[static_cast<size_t>(e)], 2);
    if (rows == 0) continue;
    Tensor ref = Tensor::empty(DType::f32, {rows, N});
    const auto from = [&](const TensorView& t) {
      return TensorView(static_cast<char*>(t.data()) + first * t.stride(0) * dtype_size(t.dtype()),
                        t.dtype(), {rows, t.size(1)});
    };
    block_fp8_gemm(from(x.a), from(x.a_scales), ScaleLayout::row_major,
                   plane_of(as_groups(w.b, E), e), plane_of(as_groups(w.b_scales, E), e),
                   std::nullopt, ref, OpOptions{Backend::reference});
    const TensorView got(host.data_as<uint16_t>() + first * N, DType::bf16, {rows, N});
    row.verified =
        row.verified && relative_mean_error(got, ref) < 1e-3 + 1.0 / 256;  // spec/fp8.md, bf16
  }
  int next = 0;
  row.median_us = gpu::median_graph_replay_us(
                      [&](void* stream) {
                        op.stream = stream;
                        call(weights[static_cast<size_t>(next++ % copies)]);
                      },
                      /*calls_per_graph=*/std::max(copies, 4), replays) /
                  static_cast<double>(E);
  row.bytes = static_cast<double>(w.b.nbytes() + w.b_scales.nbytes() + x.a.nbytes() +
                                  x.a_scales.nbytes() + out.nbytes()) /
              static_cast<double>(E);
  row.flops = 2.0 * static_cast<double>(live) * static_cast<double>(N) * static_cast<double>(K) /
              static_cast<double>(E);
  return row;
}

// The counts an MoE decode step's rows rotate over, on the GPU: set s gives `rows` rows to each
// expert g with g % (G / active) == s (at most 16 sets, each expert in at most one), so that the
// weights of a graph's calls come from HBM as in a model, not from L2.
std::vector<Tensor> decode_count_sets(int64_t G, int64_t active, int64_t rows) {
  const int64_t sets = std::min<int64_t>(16, G / active), stride = G / active;
  std::vector<Tensor> counts;
  for (int64_t set = 0; set < sets; ++set) {
    Tensor host = Tensor::empty(DType::i32, {G});
    for (int64_t g = 0; g < G; ++g)
      host.data_as<int32_t>()[g] = g % stride == set ? static_cast<int32_t>(rows) : 0;
    counts.push_back(Tensor::copy_of(host, Device::gpu()));
  }
  return counts;
}

// Median us per expert with rows of `call(counts, stream)` replayed over the sets in turn.
template <class Call>
double us_per_active_expert(const Call& call, const std::vector<Tensor>& counts, int64_t active,
                            int replays) {
  size_t next = 0;
  return gpu::median_graph_replay_us(
             [&](void* stream) { call(counts[next++ % counts.size()], stream); },
             /*calls_per_graph=*/static_cast<int>(counts.size()), replays) /
         static_cast<double>(active);
}

// An MoE decode step's grouped GEMM in the masked layout: G experts of capacity M, `active` of them
// given `rows` rows (Qwen3-30B-A3B at one token: 8 of 128, one row each), through `implementation`
// (gpu.sm90.grouped unless named), us per expert with rows; none where that entry declines. Each
// call of the replayed graph picks another set of experts (16 sets, each expert in at most one), so
// their weights come from HBM as in a model, not from L2. Verified on the first set's first expert.
std::optional<GpuRow> bench_masked_decode_gpu(const std::string& name, int64_t M, int64_t rows,
                                              int64_t N, int64_t K, int64_t G, int64_t active,
                                              int64_t expected_rows, uint64_t seed, int replays,
                                              const char* implementation = kGroupedKernel) {
  const Device gpu = Device::gpu();
  const Fp8GemmInputs x = make_fp8_gemm_inputs(G * M, 1, K, seed);
  const Fp8GemmInputs w = make_fp8_gemm_inputs(1, G * N, K, seed + 1);
  const Tensor a = Tensor::copy_of(x.a, gpu), as = Tensor::copy_of(x.a_scales, gpu);
  const Tensor b = Tensor::copy_of(w.b, gpu), b_scales = Tensor::copy_of(w.b_scales, gpu);
  Tensor out = Tensor::empty(DType::bf16, {G * M, N}, gpu);
  const std::vector<Tensor> counts = decode_count_sets(G, active, rows);
  OpOptions op;
  op.backend = Backend::gpu;
  op.static_weights = true;
  op.implementation = implementation;
  GpuRow row{name + " G=" + std::to_string(G) +
                 (rows < M ? " capacity " + std::to_string(M) : std::string()) + ", " +
                 std::to_string(active) + " with rows" +
                 (expected_rows > 0 ? ", expected " + std::to_string(expected_rows) : ""),
             rows,
             N,
             K,
             op.implementation,
             false};
  const auto call = [&](const Tensor& masked_m, void* stream) {
    op.stream = stream;
    if (expected_rows > 0)
      grouped_block_fp8_gemm_masked(as_groups(a, G), as_groups(as, G), ScaleLayout::row_major,
                                    as_groups(b, G), as_groups(b_scales, G), masked_m,
                                    as_groups(out, G), expected_rows, op);
    else
      grouped_block_fp8_gemm_masked(as_groups(a, G), as_groups(as, G), ScaleLayout::row_major,
                                    as_groups(b, G), as_groups(b_scales, G), masked_m,
                                    as_groups(out, G), op);
  };
  const auto choices =
      expected_rows > 0
          ? explain_grouped_block_fp8_gemm_masked(
                as_groups(a, G), as_groups(as, G), ScaleLayout::row_major, as_groups(b, G),
                as_groups(b_scales, G), counts[0], as_groups(out, G), expected_rows, op)
          : explain_grouped_block_fp8_gemm_masked(
                as_groups(a, G), as_groups(as, G), ScaleLayout::row_major, as_groups(b, G),
                as_groups(b_scales, G), counts[0], as_groups(out, G), op);
  if (chosen_name(choices).empty()) return std::nullopt;
  call(counts[0], nullptr);
  const int64_t checked = std::min<int64_t>(rows, 2);
  Tensor ref = Tensor::empty(DType::f32, {checked, N});
  block_fp8_gemm(first_rows(plane_of(as_groups(x.a, G), 0), checked),
                 first_rows(plane_of(as_groups(x.a_scales, G), 0), checked), ScaleLayout::row_major,
                 plane_of(as_groups(w.b, G), 0), plane_of(as_groups(w.b_scales, G), 0),
                 std::nullopt, TensorView(ref.data(), DType::f32, {checked, N}),
                 OpOptions{Backend::reference});
  const Tensor host = Tensor::copy_of(out.view(), Device::cpu());
  row.verified =
      relative_mean_error(TensorView(host.data_as<uint16_t>(), DType::bf16, {checked, N}), ref) <
      1e-3 + 1.0 / 256;  // spec/fp8.md, bf16
  row.median_us = us_per_active_expert(call, counts, active, replays);
  // Bytes per expert with rows: its weights, and its rows of a, a_scales and out (not capacity's).
  row.bytes = static_cast<double>(w.b.nbytes() + w.b_scales.nbytes()) / static_cast<double>(G) +
              static_cast<double>(x.a.nbytes() + x.a_scales.nbytes() + out.nbytes()) /
                  static_cast<double>(G * M) * static_cast<double>(rows);
  row.flops = 2.0 * static_cast<double>(rows) * static_cast<double>(N) * static_cast<double>(K);
  return row;
}

// An MoE decode step's down projection with its activation quantized inside
// (silu_and_mul_grouped_block_fp8_gemm_masked): x [G, M, 2K] bf16 (the gate_up GEMM's out), G
// experts of capacity M, `active` of them with `rows` rows, through `implementation`
// (gpu.sm90.fused: one launch; gpu.apart: the masked gated quantization's launch, then the grouped
// GEMM's), us per expert with rows. The counts rotate over sets of experts as in
// bench_masked_decode_gpu. Verified against the reference on the first set's first row; none where
// that entry declines.
std::optional<GpuRow> bench_masked_silu_down_gpu(const std::string& name, int64_t M, int64_t N,
                                                 int64_t K, int64_t G, int64_t active, int64_t rows,
                                                 int64_t expected_rows, const char* implementation,
                                                 uint64_t seed, int replays) {
  const Device gpu = Device::gpu();
  const Tensor x_host = random_fp8_activations(seed, G * M, 2 * K);  // bf16 [G * M, 2K]
  const Fp8GemmInputs w = make_fp8_gemm_inputs(1, G * N, K, seed + 1);
  const Tensor x = Tensor::copy_of(x_host, gpu);
  const Tensor b = Tensor::copy_of(w.b, gpu), b_scales = Tensor::copy_of(w.b_scales, gpu);
  Tensor out = Tensor::empty(DType::bf16, {G * M, N}, gpu);
  const std::vector<Tensor> counts = decode_count_sets(G, active, rows);
  const size_t bytes = std::string(implementation) == "gpu.apart"
                           ? silu_and_mul_grouped_block_fp8_gemm_masked_workspace_size(G, M, K)
                           : 0;
  const Tensor workspace = zero_filled_bytes(bytes, gpu);
  void* ws = bytes > 0 ? workspace.data() : nullptr;
  OpOptions op;
  op.backend = Backend::gpu;
  op.static_weights = true;
  op.implementation = implementation;
  GpuRow row{name + " G=" + std::to_string(G) +
                 (M > 1 ? " capacity " + std::to_string(M) : std::string()) + ", " +
                 std::to_string(active) + " with rows" +
                 (expected_rows > 0 ? ", expected " + std::to_string(expected_rows) : ""),
             rows,
             N,
             K,
             implementation,
             false};
  const auto call = [&](const Tensor& masked_m, void* stream) {
    op.stream = stream;
    silu_and_mul_grouped_block_fp8_gemm_masked(as_groups(x, G), masked_m, as_groups(b, G),
                                               as_groups(b_scales, G), as_groups(out, G),
                                               GroupQuantConfig{}, expected_rows, ws, bytes, op);
  };
  if (chosen_name(explain_silu_and_mul_grouped_block_fp8_gemm_masked(
                      as_groups(x, G), counts[0], as_groups(b, G), as_groups(b_scales, G),
                      as_groups(out, G), GroupQuantConfig{}, expected_rows, ws, bytes, op))
          .empty())
    return std::nullopt;
  call(counts[0], nullptr);
  // The reference on group 0 (in the first set): its one row.
  const int64_t one[] = {1, M, 2 * K}, one_strides[] = {M * 2 * K, 2 * K, 1};
  const TensorView x0(x_host.data(), DType::bf16, one, one_strides);
  Tensor ref = Tensor::empty(DType::f32, {1, M, N});
  Tensor one_count = Tensor::empty(DType::i32, {1});
  one_count.data_as<int32_t>()[0] = 1;
  const size_t ref_bytes = silu_and_mul_grouped_block_fp8_gemm_masked_workspace_size(1, M, K);
  const Tensor ref_space = zero_filled_bytes(ref_bytes, Device::cpu());
  const TensorView b0 = as_groups(w.b, G), bs0 = as_groups(w.b_scales, G);  // group 0 first
  silu_and_mul_grouped_block_fp8_gemm_masked(
      x0, one_count, TensorView(b0.data(), b0.dtype(), {1, N, K}),
      TensorView(bs0.data(), bs0.dtype(), {1, bs0.size(1), bs0.size(2)}), ref, GroupQuantConfig{},
      0, ref_space.data(), ref_bytes, OpOptions{Backend::reference});
  const Tensor host = Tensor::copy_of(out.view(), Device::cpu());
  row.verified = relative_mean_error(TensorView(host.data_as<uint16_t>(), DType::bf16, {1, N}),
                                     TensorView(ref.data(), DType::f32, {1, N})) < 1e-3 + 1.0 / 256;
  row.median_us = us_per_active_expert(call, counts, active, replays);
  // Bytes per expert with rows: its weights, its rows of x and of out.
  row.bytes = static_cast<double>(w.b.nbytes() + w.b_scales.nbytes()) / static_cast<double>(G) +
              static_cast<double>(rows * (2 * K * 2 + N * 2));
  row.flops = 2.0 * static_cast<double>(rows * N) * static_cast<double>(K);
  return row;
}

// block_quantize_weight of a bf16 weight [N, K] (verified on its first two block rows).
GpuRow bench_quantize_weight_gpu(const std::string& name, int64_t N, int64_t K, uint64_t seed,
                                 int replays) {
  const Device gpu = Device::gpu();
  const Tensor w_host = random_bf16_weight(seed, N, K);
  const Tensor w = Tensor::copy_of(w_host, gpu);
  Tensor q = Tensor::empty(DType::f8e4m3, {N, K}, gpu);
  Tensor s = Tensor::empty(DType::f32, {(N + 127) / 128, (K + 127) / 128}, gpu);
  GpuRow row{name, N, N, K, "", true};
  const Fp8WeightCheck check =
      check_fp8_quantize_weight(first_rows(w_host, std::min<int64_t>(N, 256)), Backend::gpu);
  row.implementation = check.implementation;
  row.verified =
      !check.implementation.empty() && check.diffs == check.near_ties && check.scale_diffs == 0;
  if (check.implementation.empty()) return row;
  OpOptions op;
  op.backend = Backend::gpu;
  row.median_us = gpu::median_graph_replay_us(
      [&](void* stream) {
        op.stream = stream;
        block_quantize_weight(w, q, s, op);
      },
      /*calls_per_graph=*/4, replays);
  row.bytes = static_cast<double>(w.nbytes() + q.nbytes() + s.nbytes());
  return row;
}

// gated: silu_and_mul_group_quant_fp8 of x [M, 2K] (an MLP's gate_up output) into q [M, K].
GpuRow bench_quant_gpu(const std::string& name, int64_t M, int64_t K, ScaleLayout layout,
                       uint64_t seed, int replays, bool gated = false) {
  const Device gpu = Device::gpu();
  const Tensor x_host = random_fp8_activations(seed, M, gated ? 2 * K : K);
  GroupQuantConfig c;
  c.layout = layout;
  c.ue8m0 = layout == ScaleLayout::packed_ue8m0;
  const ScaleStorage s = group_quant_scale_storage(M, K, c);
  const Tensor x = Tensor::copy_of(x_host, gpu);
  Tensor q = Tensor::empty(DType::f8e4m3, {M, K}, gpu);
  Tensor scales = Tensor::empty(s.dtype, {s.shape[0], s.shape[1]}, gpu);
  OpOptions op;
  op.backend = Backend::gpu;
  GpuRow row{name, M, 0, K, "", true};
  const Fp8QuantCheck check =
      check_fp8_quant(first_rows(x_host, std::min<int64_t>(M, 256)), layout, Backend::gpu, gated);
  row.implementation = check.implementation;
  row.verified = check.ran && check.diffs == check.near_ties && check.scale_diffs == 0;
  if (!check.ran) return row;
  row.median_us = gpu::median_graph_replay_us(
      [&](void* stream) {
        op.stream = stream;
        if (gated)
          silu_and_mul_group_quant_fp8(x, q, scales, c, op);
        else
          per_token_group_quant_fp8(x, q, scales, c, op);
      },
      /*calls_per_graph=*/4, replays);
  row.bytes = static_cast<double>(x.nbytes() + q.nbytes() + scales.nbytes());
  return row;
}

// silu_and_mul_group_quant_fp8_masked between an MoE decode step's grouped GEMMs: x [G, M, 2K]
// bf16, `active` groups (evenly spaced) given one row each, through one implementation. Verified
// against the reference on those rows; bytes counted for them only (the work a step needs).
GpuRow bench_masked_gated_quant_gpu(const std::string& name, int64_t G, int64_t M, int64_t K,
                                    int64_t active, const char* implementation, uint64_t seed,
                                    int replays) {
  const Device gpu = Device::gpu();
  const Tensor x_host = random_fp8_activations(seed, G * M, 2 * K);
  const TensorView x_planes(const_cast<void*>(x_host.data()), DType::bf16, {G, M, 2 * K});
  Tensor counts_host = Tensor::empty(DType::i32, {G});
  for (int64_t g = 0; g < G; ++g) counts_host.data_as<int32_t>()[g] = g % (G / active) == 0 ? 1 : 0;
  GroupQuantConfig c;
  const ScaleStorage s = group_quant_scale_storage(M, K, c);
  Tensor q_ref = Tensor::empty(DType::f8e4m3, {G, M, K});
  Tensor s_ref = Tensor::empty(s.dtype, {G, s.shape[0], s.shape[1]});
  silu_and_mul_group_quant_fp8_masked(x_planes, counts_host, q_ref, s_ref, c,
                                      OpOptions{Backend::reference});
  const Tensor x = Tensor::copy_of(x_planes, gpu), counts = Tensor::copy_of(counts_host, gpu);
  Tensor q = Tensor::empty(DType::f8e4m3, {G, M, K}, gpu);
  Tensor scales = Tensor::empty(s.dtype, {G, s.shape[0], s.shape[1]}, gpu);
  OpOptions op;
  op.backend = Backend::gpu;
  op.implementation = implementation;
  GpuRow row{name, G * M, 0, K, implementation, false};
  silu_and_mul_group_quant_fp8_masked(x, counts, q, scales, c, op);
  const Tensor q_host = Tensor::copy_of(q.view(), Device::cpu());
  row.verified = true;
  for (int64_t g = 0; g < G; g += G / active)  // each active group's one row
    row.verified = row.verified && std::memcmp(q_host.data_as<uint8_t>() + g * M * K,
                                               q_ref.data_as<uint8_t>() + g * M * K, K) == 0;
  row.median_us = gpu::median_graph_replay_us(
      [&](void* stream) {
        op.stream = stream;
        silu_and_mul_group_quant_fp8_masked(x, counts, q, scales, c, op);
      },
      /*calls_per_graph=*/4, replays);
  row.bytes = static_cast<double>(active * (2 * K * 2 + K + K / 128 * 4));
  return row;
}

// "N=<n> K=<k>" (the table's names start so) as {n, k}; none for anything else.
std::optional<std::pair<int64_t, int64_t>> custom_shape(const std::string& model) {
  long long n = 0, k = 0;
  int used = 0;
  if (std::sscanf(model.c_str(), "N=%lld K=%lld%n", &n, &k, &used) != 2 ||
      used != static_cast<int>(model.size()))
    return std::nullopt;
  if (n < 1 || k < 1 || n > (1 << 20) || k > (1 << 20))
    fail("bench", "--model", model, "has N or K outside 1..1048576");
  return std::pair<int64_t, int64_t>{n, k};
}

}  // namespace

int run_fp8_bench_gpu(const BenchOptions& options) {
  const double bandwidth = gpu::measure_copy_bandwidth_gbs() * 1e9;
  std::vector<GpuRow> rows;
  uint64_t seed = 4242;
  auto wanted = [&](const std::string& name, int64_t M) {
    return (options.model.empty() || name.find(options.model) != std::string::npos) &&
           (options.tokens == 0 || options.tokens == M);
  };
  // --model "N=<n> K=<k>" (--op gemm and linear): that shape at the sweep's token counts (or
  // --tokens), a table row's or not, so that a sweep can reach any layer.
  struct Shape {
    std::string name;
    int64_t n, k;
    std::vector<int64_t> tokens;
  };
  auto with_custom = [&](std::vector<Shape> shapes, std::vector<int64_t> sweep) {
    const auto nk = custom_shape(options.model);
    if (!nk) return shapes;
    std::string name = options.model + " (given)";
    for (const Shape& shape : shapes)
      if (shape.n == nk->first && shape.k == nk->second) name = shape.name;
    return std::vector<Shape>{{name, nk->first, nk->second, std::move(sweep)}};
  };
  if (options.op == "gemm") {
    const Fp8Data data = parse_fp8_data(options.data);
    if (!options.implementation.empty() &&
        std::find(std::begin(kGemmImplementations), std::end(kGemmImplementations),
                  options.implementation) == std::end(kGemmImplementations))
      fail("bench", "--implementation", options.implementation,
           "is not a GPU GEMM implementation (gpu.cublaslt, gpu.sm90, gpu)");
    const std::vector<Shape> shapes = with_custom(
        {
            {"N=7168 K=16384 (DeepSeek-V3 o_proj)", 7168, 16384, {4096}},
            {"N=4096 K=7168 (DeepSeek-V3 gate_up)", 4096, 7168, {1, 4, 16, 64, 256, 1024}},
            {"N=4096 K=2048 (Qwen3-30B q_proj)", 4096, 2048, {1, 16, 256, 1024}},
            {"N=7168 K=2048 (DeepSeek-V3 down)", 7168, 2048, {1, 16, 256}},
            // Experts' gate_up at a few hundred tokens per expert (the tiles kernel's K split).
            {"N=3072 K=4096 (Qwen3-235B expert gate_up)", 3072, 4096, {256}},
            {"N=1536 K=2048 (Qwen3-30B expert gate_up)", 1536, 2048, {256}},
        },
        {1, 4, 16, 64, 256, 1024});
    // --tokens M benches any M, not only the table's (a sweep over M for one shape with --model).
    for (const Shape& shape : shapes)
      for (int64_t M : options.tokens > 0 ? std::vector<int64_t>{options.tokens} : shape.tokens)
        if (wanted(shape.name, M))
          for (GpuRow& r : bench_gemm_shape(shape.name, M, shape.n, shape.k, seed++, data,
                                            options.implementation, options.replays))
            rows.push_back(std::move(r));
  } else if (options.op == "linear") {
    const std::vector<Shape> shapes = with_custom(
        {
            {"N=4096 K=7168 (DeepSeek-V3 gate_up)", 4096, 7168, {1, 4, 8, 16, 64}},
            {"N=4096 K=2048 (Qwen3-30B q_proj)", 4096, 2048, {1, 8, 16}},
            {"N=2048 K=4096 (Qwen3-30B o_proj)", 2048, 4096, {1, 16}},
            {"N=9216 K=4096 (Qwen3-235B qkv_proj)", 9216, 4096, {1, 16}},
            {"N=7168 K=2048 (DeepSeek-V3 down)", 7168, 2048, {1, 4, 8, 16}},
            {"N=7168 K=16384 (DeepSeek-V3 o_proj)", 7168, 16384, {2}},
        },
        {1, 2, 4, 6, 8, 10, 12, 16});
    // --tokens M benches any M, as for the GEMM.
    for (const Shape& shape : shapes)
      for (int64_t M : options.tokens > 0 ? std::vector<int64_t>{options.tokens} : shape.tokens)
        if (wanted(shape.name, M))
          for (GpuRow& r :
               bench_linear_gpu(shape.name, M, shape.n, shape.k, seed++, options.replays))
            rows.push_back(std::move(r));
  } else if (options.op == "gemm-grouped") {
    const std::vector<Shape> shapes = {
        {"N=4096 K=7168 (DeepSeek-V3 gate_up)", 4096, 7168, {1, 4, 16, 64, 256, 1024}},
        {"N=7168 K=2048 (DeepSeek-V3 down)", 7168, 2048, {1, 16}},
        {"N=3072 K=4096 (Qwen3-235B expert gate_up)", 3072, 4096, {1}},
        {"N=1536 K=2048 (Qwen3-30B expert gate_up)", 1536, 2048, {1, 4}},
    };
    for (const Shape& shape : shapes)
      for (int64_t M : options.tokens > 0 ? std::vector<int64_t>{options.tokens} : shape.tokens)
        if (wanted(shape.name, M))
          for (GpuRow& r :
               bench_grouped_gpu(shape.name, M, shape.n, shape.k, seed++, options.replays))
            rows.push_back(std::move(r));
    // Qwen3-30B-A3B's experts at one decode token: 8 of its 128 experts get the token.
    for (const Shape& shape : {Shape{"N=1536 K=2048 (Qwen3-30B expert gate_up)", 1536, 2048, {1}},
                               Shape{"N=2048 K=768 (Qwen3-30B expert down)", 2048, 768, {1}}})
      if (wanted(shape.name, 1))
        // Capacity 1, and 128 as DeepEP's low-latency dispatch leaves it (the counts still 1),
        // there also with the hint of 1 expected row.
        for (const auto& [capacity, expected] :
             {std::pair<int64_t, int64_t>{1, 0}, {128, 0}, {128, 1}})
          if (auto row = bench_masked_decode_gpu(shape.name, capacity, 1, shape.n, shape.k, 128, 8,
                                                 expected, seed++, options.replays))
            rows.push_back(std::move(*row));
    // Its down projection with silu_and_mul's quantization inside (one launch) and apart (two).
    const std::string down = "N=2048 K=768 (Qwen3-30B expert down, silu_and_mul in)";
    if (wanted(down, 1))
      for (const auto& [capacity, expected] : {std::pair<int64_t, int64_t>{1, 0}, {128, 1}})
        for (const char* implementation : {"gpu.sm90.fused", "gpu.apart"})
          if (auto row = bench_masked_silu_down_gpu(down, capacity, 2048, 768, 128, 8, 1, expected,
                                                    implementation, seed++, options.replays))
            rows.push_back(std::move(*row));
    // DeepGEMM's published masked case (4 groups of 256 rows; H800: 932 TFLOP/s), with the hint,
    // and beside it 128 rows at capacity 256 and 256 at capacity 1024: the persistent wide tiles
    // (the pick past 64 expected rows), the grouped kernel (its token tiles stop at 64 rows, so
    // each group's weights stream once per tile; it declines the first two for one GEMM per
    // group) and one GEMM per group, each a row where it serves.
    constexpr const char* kManyRowsImplementations[] = {kGroupedWide, kGroupedKernel, kPerGroup};
    const std::string deepgemm = "N=4096 K=7168 (DeepGEMM masked case)";
    for (const auto& [capacity, used] :
         {std::pair<int64_t, int64_t>{256, 256}, {256, 128}, {1024, 256}})
      if (wanted(deepgemm, used))
        for (const char* implementation : kManyRowsImplementations)
          if (auto row = bench_masked_decode_gpu(deepgemm, capacity, used, 4096, 7168, 4, 4, used,
                                                 seed++, options.replays, implementation))
            rows.push_back(std::move(*row));
    // MoE prefill in DeepGEMM's contiguous layout: 8 DeepSeek-V3 experts of 128 (every run of
    // blocks one block long), 256 and 1024 rows (the whole groups above, laid out one after
    // another), and Qwen3-30B-A3B's 128 experts taking a 4096-token prefill's 32768 rows unevenly
    // (rows 64..448, each expert padded to 128).
    for (const int64_t M : {int64_t{128}, int64_t{256}, int64_t{1024}}) {
      const std::string gate_up = "N=4096 K=7168 (DeepSeek-V3 gate_up)";
      if (wanted(gate_up, M))
        if (auto row = bench_contiguous_gpu(gate_up, std::vector<int64_t>(kBenchGroups, M), 4096,
                                            7168, seed++, options.replays))
          rows.push_back(std::move(*row));
    }
    // (and its down projection: K=768, 6 k-blocks, weight-scale rows TMA cannot copy)
    std::vector<int64_t> uneven;
    for (int64_t e = 0; e < 128; ++e) uneven.push_back(64 + (e * 37) % 385);
    for (const auto& [prefill, n, k] :
         {std::tuple<std::string, int64_t, int64_t>{
              "N=1536 K=2048 (Qwen3-30B expert gate_up, prefill)", 1536, 2048},
          {"N=2048 K=768 (Qwen3-30B expert down, prefill)", 2048, 768}})
      if (wanted(prefill, 256))
        if (auto row = bench_contiguous_gpu(prefill, uneven, n, k, seed++, options.replays))
          rows.push_back(std::move(*row));
    // Qwen3-30B-A3B's experts under a large batch in DeepEP's low-latency layout: 128 experts of
    // capacity 256, each with 128 rows.
    const std::string batch = "N=1536 K=2048 (Qwen3-30B expert gate_up, large batch)";
    if (wanted(batch, 128))
      for (const char* implementation : kManyRowsImplementations)
        if (auto row = bench_masked_decode_gpu(batch, 256, 128, 1536, 2048, 128, 128, 128, seed++,
                                               options.replays, implementation))
          rows.push_back(std::move(*row));
    const std::string batch_down =
        "N=2048 K=768 (Qwen3-30B expert down, silu_and_mul in, large batch)";
    if (wanted(batch_down, 128))
      for (const char* implementation : {"gpu.sm90.fused", "gpu.apart"})
        if (auto row = bench_masked_silu_down_gpu(batch_down, 256, 2048, 768, 128, 128, 128, 128,
                                                  implementation, seed++, options.replays))
          rows.push_back(std::move(*row));
  } else if (options.op == "quantize-weight") {
    for (const auto& [n, k] : {std::pair<int64_t, int64_t>{4096, 7168}, {7168, 2048}}) {
      const std::string name = "weight bf16 N=" + std::to_string(n) + " K=" + std::to_string(k);
      if (wanted(name, n))
        rows.push_back(bench_quantize_weight_gpu(name, n, k, seed++, options.replays));
    }
  } else {
    // K=7168: DeepSeek-V3's hidden size (the goal's shape); 1536 and 768: the inputs of the
    // expert down projections of Qwen3-235B and Qwen3-30B (units of 512 and 256 elements).
    struct QuantShape {
      int64_t k;
      ScaleLayout layout;
    };
    for (const QuantShape& shape :
         {QuantShape{7168, ScaleLayout::row_major}, QuantShape{7168, ScaleLayout::packed_ue8m0},
          QuantShape{1536, ScaleLayout::row_major}, QuantShape{768, ScaleLayout::row_major}}) {
      const std::string name = "x bf16 K=" + std::to_string(shape.k) + " g128 " +
                               (shape.layout == ScaleLayout::row_major ? "row" : "ue8m0");
      if (wanted(name, 16384))
        rows.push_back(
            bench_quant_gpu(name, 16384, shape.k, shape.layout, seed++, options.replays));
    }
    // silu_and_mul_group_quant_fp8 at the experts' widths (Qwen3-30B 768, Qwen3-235B 1536): x
    // [M, 2K] bf16, a prefill's 16384 rows and a decode step's 8 (launch-bound).
    for (const int64_t k : {int64_t{768}, int64_t{1536}})
      for (const int64_t m : {int64_t{16384}, int64_t{8}}) {
        const std::string name = "silu_and_mul x bf16 K=" + std::to_string(k) + " g128 row";
        if (wanted(name, m))
          rows.push_back(
              bench_quant_gpu(name, m, k, ScaleLayout::row_major, seed++, options.replays, true));
      }
    // Its masked form at a Qwen3-30B-A3B decode step: 8 of 128 experts with a token, 16 rows each
    // (and 128, as DeepEP's low-latency dispatch leaves them: one launch only).
    const std::string masked = "silu_and_mul masked G=128 M=16 K=768, 8 rows";
    if (wanted(masked, 128 * 16))
      for (const char* implementation : {"gpu.masked", "gpu.per_group"})
        rows.push_back(bench_masked_gated_quant_gpu(masked, 128, 16, 768, 8, implementation, seed++,
                                                    options.replays));
    const std::string capacity = "silu_and_mul masked G=128 M=128 K=768, 8 rows";
    if (wanted(capacity, 128 * 128))
      rows.push_back(bench_masked_gated_quant_gpu(capacity, 128, 128, 768, 8, "gpu.masked", seed++,
                                                  options.replays));
  }
  if (rows.empty()) fail("bench", "--model", options.model, "selects no GPU FP8 shape");
  const bool all_verified =
      std::all_of(rows.begin(), rows.end(), [](const GpuRow& r) { return r.verified; });
  if (options.json) {
    nlohmann::json out = nlohmann::json::array();
    for (const GpuRow& r : rows)
      out.push_back({{"op", options.op},
                     {"shape", r.shape},
                     {"m", r.m},
                     {"n", r.n},
                     {"k", r.k},
                     {"backend", "gpu"},
                     {"implementation", r.implementation},
                     {"dispatched", r.dispatched},
                     {"median_us", r.median_us},
                     {"tflop_per_s", r.flops / (r.median_us * 1e-6) / 1e12},
                     {"gb_per_s", r.bytes / (r.median_us * 1e-6) / 1e9},
                     {"roofline_us", r.bytes / bandwidth * 1e6},
                     {"verified", r.verified}});
    std::printf("%s\n", out.dump(1).c_str());
    return all_verified ? 0 : 1;
  }
  std::printf(
      "moekit bench %s, backend gpu, CUDA-graph replay; HBM floor = bytes moved once / %.0f GB/s "
      "(measured copy bandwidth); * = what the dispatch picks (column-major activation scales, as "
      "the linear layer writes them for cuBLASLt)%s\n",
      options.op.c_str(), bandwidth / 1e9,
      options.op == "gemm" ? "; weights static (OpOptions::static_weights)"
      : options.op == "gemm-grouped"
          ? "; 8 GEMMs of the shape per call, us and bytes per GEMM (gpu.sm90.grouped: one "
            "launch; gpu.sm90.grouped_wide: one launch of 128- or 256-row tiles, past 64 rows a "
            "group; "
            "gpu.sm90.contiguous: DeepGEMM's contiguous layout, one launch of 128-row tiles, or "
            "256-row tiles over runs of blocks; "
            "gpu.per_group: one gpu.sm90 launch each; \"4 with rows\": the masked "
            "layout, every other group without rows, us per group with rows; \"G=128, 8 with "
            "rows\": an MoE decode step, another 8 experts each call, one row each, \"capacity "
            "128\" in planes of 128 rows as DeepEP's low-latency dispatch leaves them); weights "
            "static"
      : options.op == "linear"
          ? "; bf16 x quantized in the call (gpu.sm90.fused: inside the GEMM kernel; else by a "
            "kernel of its own before it); weights static (OpOptions::static_weights)"
          : "");
  std::printf("%-38s %5s %-16s %10s %9s %9s %10s %8s\n", "shape", "M", "impl", "median us",
              "TFLOP/s", "GB/s", "floor us", "of floor");
  for (const GpuRow& r : rows) {
    const double floor_us = r.bytes / bandwidth * 1e6;
    std::printf("%-38s %5lld %-16s %10.2f %9.1f %9.0f %10.2f %7.1f%%%s\n", r.shape.c_str(),
                static_cast<long long>(r.m),
                ((r.dispatched ? "*" : " ") + r.implementation).c_str(), r.median_us,
                r.flops / (r.median_us * 1e-6) / 1e12, r.bytes / (r.median_us * 1e-6) / 1e9,
                floor_us, 100.0 * floor_us / r.median_us, r.verified ? "" : "  NOT VERIFIED");
  }
  return all_verified ? 0 : 1;
}

#else

int run_fp8_bench_gpu(const BenchOptions&) {
  fail("bench", "--backend", "gpu", "is not built into this moekit (no CUDA compiler at build)");
}

#endif

}  // namespace moekit::cli
