// The FP8 subcommands of the moekit CLI: quant (per-token-group activation quantization), gemm
// (block-scaled FP8 GEMM) and quantize-weight (128x128 block weight quantization), each from one
// safetensors file to another; and explain --op gemm | linear | gemm-grouped | gemm-contiguous
// (the dispatch at a shape). Validation of shapes and dtypes is the library's (spec/fp8.md); the
// CLI only checks what it needs to size its outputs. Output is written atomically, and only when
// the op succeeded.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "commands.h"
#include "moekit/error.h"
#include "moekit/ops/fp8.h"
#include "moekit/safetensors.h"

namespace moekit::cli {
namespace {

OpOptions op_options(const Fp8CommonFlags& flags) {
  OpOptions o;
  // No backend named: the fastest one present for CPU tensors (the op decides).
  if (!flags.backend.empty()) o.backend = parse_backend(flags.backend);
  o.num_threads = flags.threads;
  return o;
}

// With --backend gpu the op runs on device copies of the inputs and its outputs come back to the
// host before they are written; other backends use the mapped file as is.
struct Staged {
  std::optional<Tensor> copy;
  TensorView view;
};
Staged stage(const TensorView& t, const OpOptions& options) {
  if (options.backend != Backend::gpu) return {std::nullopt, t};
  Tensor copy = Tensor::copy_of(t, Device::gpu());
  const TensorView view = copy.view();
  return {std::move(copy), view};
}
// A host output, and where the op writes it (itself, or a device copy that starts equal to it).
struct Output {
  Tensor host;
  std::optional<Tensor> device;
  TensorView target() const { return device ? device->view() : host.view(); }
  // What the op wrote, on the host (a copy either way: outputs are small next to the inputs).
  Tensor result() const { return Tensor::copy_of(target(), Device::cpu()); }
};
Output output(Tensor host, const OpOptions& options) {
  Output o{std::move(host), std::nullopt};
  if (options.backend == Backend::gpu) o.device = Tensor::copy_of(o.host.view(), Device::gpu());
  return o;
}

TensorView require(const char* op, const SafetensorsFile& file, const std::string& name) {
  if (!file.contains(name))
    fail(op, "--input", file.path(), "has no tensor named \"" + name + "\"");
  return file.get(name);
}

void require_2d(const char* op, const std::string& name, const TensorView& t, const char* dims) {
  if (t.ndim() != 2) fail(op, name + ".shape", t.shape_str(), std::string("must be ") + dims);
}

ScaleLayout parse_layout(const std::string& name) {
  if (name == "row") return ScaleLayout::row_major;
  if (name == "col") return ScaleLayout::column_major;
  if (name == "col-tma") return ScaleLayout::column_major_tma;
  if (name == "packed") return ScaleLayout::packed_ue8m0;
  fail("quant", "--layout", name, "is not one of row, col, col-tma, packed");
}

DType parse_out_dtype(const std::string& name) {
  if (name == "bf16") return DType::bf16;
  if (name == "f16") return DType::f16;
  if (name == "f32") return DType::f32;
  fail("gemm", "--out-dtype", name, "is not one of bf16, f16, f32");
}

}  // namespace

int run_quant(const QuantOptions& flags) {
  GroupQuantConfig config;
  config.group_size = flags.group_size;
  config.ue8m0 = flags.ue8m0;
  config.layout = parse_layout(flags.layout);
  const OpOptions options = op_options(flags.common);
  const SafetensorsFile file = SafetensorsFile::open(flags.common.input);
  const TensorView x = require("quant", file, "x");
  require_2d("quant", "x", x, "[M, K]");
  const int64_t M = x.size(0), K = x.size(1);
  const ScaleStorage storage = group_quant_scale_storage(M, K, config);
  Tensor zeroed = Tensor::empty(storage.dtype, {storage.shape[0], storage.shape[1]});
  // The TMA-aligned layouts leave their padding rows untouched: write zeros there, not garbage.
  if (zeroed.nbytes() > 0) std::memset(zeroed.data(), 0, zeroed.nbytes());
  const Staged x_in = stage(x, options);
  const Output q = output(Tensor::empty(DType::f8e4m3, {M, K}), options);
  const Output scales = output(std::move(zeroed), options);
  per_token_group_quant_fp8(x_in.view, q.target(), scales.target(), config, options);
  const Tensor q_out = q.result(), scales_out = scales.result();
  write_safetensors(flags.common.output, {{"q", q_out.view()}, {"scales", scales_out.view()}});
  return 0;
}

int run_gemm(const GemmOptions& flags) {
  const DType out_dtype = parse_out_dtype(flags.out_dtype);
  const OpOptions options = op_options(flags.common);
  const SafetensorsFile file = SafetensorsFile::open(flags.common.input);
  const TensorView a = require("gemm", file, "a");
  const TensorView a_scales = require("gemm", file, "a_scales");
  const TensorView b = require("gemm", file, "b");
  const TensorView b_scales = require("gemm", file, "b_scales");
  std::optional<TensorView> bias;
  if (file.contains("bias")) bias = file.get("bias");
  require_2d("gemm", "a", a, "[M, K]");
  require_2d("gemm", "b", b, "[N, K]");
  const Staged a_in = stage(a, options), as_in = stage(a_scales, options);
  const Staged b_in = stage(b, options), bs_in = stage(b_scales, options);
  std::optional<Staged> bias_in;
  if (bias) bias_in = stage(*bias, options);
  const Output out = output(Tensor::empty(out_dtype, {a.size(0), b.size(0)}), options);
  // The op's scratch where the implementation on that device wants one, zero-filled.
  const Device device = a_in.view.device();
  const size_t workspace_bytes =
      block_fp8_gemm_workspace_size(a.size(0), b.size(0), a.size(1), device);
  Tensor workspace = zero_filled_bytes(workspace_bytes, device);
  block_fp8_gemm(a_in.view, as_in.view, ScaleLayout::row_major, b_in.view, bs_in.view,
                 bias_in ? std::optional<TensorView>(bias_in->view) : std::nullopt, out.target(),
                 workspace_bytes > 0 ? workspace.data() : nullptr, workspace_bytes, options);
  const Tensor result = out.result();
  write_safetensors(flags.common.output, {{"out", result.view()}});
  return 0;
}

int run_quantize_weight(const Fp8CommonFlags& flags) {
  const OpOptions options = op_options(flags);
  const SafetensorsFile file = SafetensorsFile::open(flags.input);
  const TensorView w = require("quantize-weight", file, "weight");
  require_2d("quantize-weight", "weight", w, "[N, K]");
  const int64_t N = w.size(0), K = w.size(1);
  constexpr int64_t kBlock = 128;
  const Staged w_in = stage(w, options);
  const Output weight = output(Tensor::empty(DType::f8e4m3, {N, K}), options);
  const Output scale_inv = output(
      Tensor::empty(DType::f32, {(N + kBlock - 1) / kBlock, (K + kBlock - 1) / kBlock}), options);
  block_quantize_weight(w_in.view, weight.target(), scale_inv.target(), options);
  const Tensor weight_out = weight.result(), scale_inv_out = scale_inv.result();
  write_safetensors(flags.output,
                    {{"weight", weight_out.view()}, {"weight_scale_inv", scale_inv_out.view()}});
  return 0;
}

namespace {
void print_explained(const std::string& title, const OpOptions& options, bool static_weights,
                     const std::vector<ImplementationChoice>& choices) {
  std::printf("%s, backend %s%s:\n", title.c_str(),
              std::string(backend_name(*options.backend)).c_str(),
              static_weights ? ", static weights" : "");
  int width = 20;  // the names' column (wider where a name is longer)
  for (const ImplementationChoice& c : choices)
    width = std::max(width, static_cast<int>(c.name.size()));
  for (const ImplementationChoice& c : choices)
    std::printf("  %-*s %s\n", width, c.name.c_str(), describe_choice(c).c_str());
}

// explain --op gemm-grouped: G GEMMs [G, M, K] x [G, N, K], whole or masked (the counts, zeros,
// are never read: the GPU reads them on the device, the host entries when they run).
int explain_grouped_gemm(const ExplainFp8Options& flags, const OpOptions& options,
                         const Device& device) {
  const int64_t G = flags.groups, M = flags.m, N = flags.n, K = flags.k;
  const int64_t k_blocks = (K + 127) / 128;
  const Tensor a = Tensor::empty(DType::f8e4m3, {G, M, K}, device);
  const Tensor a_scales = Tensor::empty(DType::f32, {G, M, k_blocks}, device);
  const Tensor b = Tensor::empty(DType::f8e4m3, {G, N, K}, device);
  const Tensor b_scales = Tensor::empty(DType::f32, {G, (N + 127) / 128, k_blocks}, device);
  const Tensor out = Tensor::empty(DType::bf16, {G, M, N}, device);
  std::string title = "gemm-grouped G=" + std::to_string(G) + " M=" + std::to_string(M) +
                      " N=" + std::to_string(N) + " K=" + std::to_string(K);
  std::vector<ImplementationChoice> choices;
  if (flags.expected_rows) {
    Tensor counts = Tensor::empty(DType::i32, {G}, device);
    choices =
        explain_grouped_block_fp8_gemm_masked(a, a_scales, ScaleLayout::row_major, b, b_scales,
                                              counts, out, *flags.expected_rows, options);
    title += ", masked, expected rows " + std::to_string(*flags.expected_rows);
  } else {
    choices = explain_grouped_block_fp8_gemm(a, a_scales, ScaleLayout::row_major, b, b_scales, out,
                                             options);
  }
  print_explained(title, options, flags.static_weights, choices);
  return 0;
}

// explain --op gemm-contiguous: DeepGEMM's contiguous layout, M rows of a [M, K] in 128-row
// blocks against G experts' [G, N, K], the activation scales column-major as DeepGEMM takes them
// (the indices are never read: the GPU reads them on the device, the host entries when they run).
int explain_contiguous_gemm(const ExplainFp8Options& flags, const OpOptions& options,
                            const Device& device) {
  const int64_t G = flags.groups, M = flags.m, N = flags.n, K = flags.k;
  const int64_t k_blocks = (K + 127) / 128;
  const Tensor a = Tensor::empty(DType::f8e4m3, {M, K}, device);
  const Tensor a_scales = Tensor::empty(DType::f32, {k_blocks, M}, device);
  const Tensor b = Tensor::empty(DType::f8e4m3, {G, N, K}, device);
  const Tensor b_scales = Tensor::empty(DType::f32, {G, (N + 127) / 128, k_blocks}, device);
  const Tensor m_indices = Tensor::empty(DType::i32, {M}, device);
  const Tensor out = Tensor::empty(DType::bf16, {M, N}, device);
  print_explained("gemm-contiguous M=" + std::to_string(M) + " N=" + std::to_string(N) +
                      " K=" + std::to_string(K) + ", " + std::to_string(G) +
                      " experts, column-major activation scales",
                  options, flags.static_weights,
                  explain_grouped_block_fp8_gemm_contiguous(a, a_scales, ScaleLayout::column_major,
                                                            b, b_scales, m_indices, out, options));
  return 0;
}
}  // namespace

int run_explain_fp8(const ExplainFp8Options& flags) {
  if (flags.op != "gemm" && flags.op != "linear" && flags.op != "gemm-grouped" &&
      flags.op != "gemm-contiguous")
    fail("explain", "--op", flags.op,
         "is not one of route, gemm, linear, gemm-grouped, gemm-contiguous");
  for (const auto& [name, value] : {std::pair<const char*, int64_t>{"--tokens", flags.m},
                                    {"--n", flags.n},
                                    {"--k", flags.k},
                                    {"--groups", flags.groups},
                                    {"--expected-rows", flags.expected_rows.value_or(1)}})
    if (value < 1) fail("explain", name, std::to_string(value), "must be at least 1");
  OpOptions options;
  options.backend = flags.backend.empty() ? fastest_backend() : parse_backend(flags.backend);
  options.static_weights = flags.static_weights;
  if (!backend_available(*options.backend))
    fail("explain", "--backend", flags.backend, "is not present on this machine");
  const Device device = options.backend == Backend::gpu ? Device::gpu() : Device::cpu();
  const int64_t M = flags.m, N = flags.n, K = flags.k;
  const int64_t k_blocks = (K + 127) / 128;
  if (flags.op == "gemm-grouped") return explain_grouped_gemm(flags, options, device);
  if (flags.op == "gemm-contiguous") return explain_contiguous_gemm(flags, options, device);
  const Tensor b = Tensor::empty(DType::f8e4m3, {N, K}, device);
  const Tensor b_scales = Tensor::empty(DType::f32, {(N + 127) / 128, k_blocks}, device);
  const Tensor out = Tensor::empty(DType::bf16, {M, N}, device);
  std::vector<ImplementationChoice> choices;
  if (flags.op == "gemm") {
    const Tensor a = Tensor::empty(DType::f8e4m3, {M, K}, device);
    const Tensor a_scales = Tensor::empty(DType::f32, {M, k_blocks}, device);
    const size_t bytes = block_fp8_gemm_workspace_size(M, N, K, device);
    const Tensor workspace =
        Tensor::empty(DType::u8, {static_cast<int64_t>(std::max<size_t>(bytes, 1))}, device);
    choices = explain_block_fp8_gemm(a, a_scales, ScaleLayout::row_major, b, b_scales, std::nullopt,
                                     out, bytes > 0 ? workspace.data() : nullptr, bytes, options);
  } else {
    const Tensor x = Tensor::empty(DType::bf16, {M, K}, device);
    const size_t bytes = w8a8_block_fp8_linear_workspace_size(M, N, K, device);
    const Tensor workspace = Tensor::empty(DType::u8, {static_cast<int64_t>(bytes)}, device);
    choices = explain_w8a8_block_fp8_linear(x, b, b_scales, std::nullopt, out, workspace.data(),
                                            bytes, options);
  }
  print_explained(
      flags.op + " M=" + std::to_string(M) + " N=" + std::to_string(N) + " K=" + std::to_string(K),
      options, flags.static_weights, choices);
  return 0;
}

}  // namespace moekit::cli
