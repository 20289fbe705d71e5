// The FP8 subcommands of the moekit CLI: quant (per-token-group activation quantization), gemm
// (block-scaled FP8 GEMM) and quantize-weight (128x128 block weight quantization), each from one
// safetensors file to another. Validation of shapes and dtypes is the library's (spec/fp8.md); the
// CLI only checks what it needs to size its outputs. Output is written atomically, and only when
// the op succeeded.
#include <cstring>
#include <optional>
#include <string>

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
  Tensor q = Tensor::empty(DType::f8e4m3, {M, K});
  Tensor scales = Tensor::empty(storage.dtype, {storage.shape[0], storage.shape[1]});
  // The TMA-aligned layouts leave their padding rows untouched: write zeros there, not garbage.
  if (scales.nbytes() > 0) std::memset(scales.data(), 0, scales.nbytes());
  per_token_group_quant_fp8(x, q, scales, config, options);
  write_safetensors(flags.common.output, {{"q", q.view()}, {"scales", scales.view()}});
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
  Tensor out = Tensor::empty(out_dtype, {a.size(0), b.size(0)});
  block_fp8_gemm(a, a_scales, ScaleLayout::row_major, b, b_scales, bias, out, options);
  write_safetensors(flags.common.output, {{"out", out.view()}});
  return 0;
}

int run_quantize_weight(const Fp8CommonFlags& flags) {
  const OpOptions options = op_options(flags);
  const SafetensorsFile file = SafetensorsFile::open(flags.input);
  const TensorView w = require("quantize-weight", file, "weight");
  require_2d("quantize-weight", "weight", w, "[N, K]");
  const int64_t N = w.size(0), K = w.size(1);
  constexpr int64_t kBlock = 128;
  Tensor weight = Tensor::empty(DType::f8e4m3, {N, K});
  Tensor scale_inv =
      Tensor::empty(DType::f32, {(N + kBlock - 1) / kBlock, (K + kBlock - 1) / kBlock});
  block_quantize_weight(w, weight, scale_inv, options);
  write_safetensors(flags.output,
                    {{"weight", weight.view()}, {"weight_scale_inv", scale_inv.view()}});
  return 0;
}

}  // namespace moekit::cli
