// The moekit CLI's subcommands. Each returns the process exit code; errors in the user's input
// surface as moekit::Error (main prints one line and exits 2).
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "moekit/backend.h"
#include "moekit/ops/fp8.h"
#include "moekit/tensor.h"

namespace moekit::cli {

// One dispatch-table verdict as the CLI prints it: "runs", "declines: <reason>", or, for an entry
// that would serve but comes after the chosen one, "serves too, but an earlier entry runs".
inline std::string describe_choice(const ImplementationChoice& choice) {
  if (choice.chosen) return choice.detail.empty() ? "runs" : "runs: " + choice.detail;
  if (choice.reason.empty()) return "serves too, but an earlier entry runs";
  return "declines: " + choice.reason;
}

struct CheckOptions {
  std::optional<Backend> backend;  // none: every backend present except the reference
  std::optional<uint64_t> seed;    // none: a fresh seed, printed
  bool verbose = false;            // print each implementation choice and why others declined
  bool quick = false;              // decode token counts and 1024 only
  std::string op = "all";          // route | fp8 | all
};
int run_check(const CheckOptions& options);

// The FP8 part of `moekit check` (fp8_check.cpp): per_token_group_quant_fp8 and block_fp8_gemm on
// each tested backend against the reference, over the FP8 linear-layer shape table. Prints a table;
// returns the number of failing rows.
int run_fp8_check(const CheckOptions& options, uint64_t seed, const std::vector<Backend>& tested);

struct BenchOptions {
  std::string op = "route";
  std::optional<Backend> backend;  // none: the fastest present
  int threads = 0;                 // CPU threads; 0 = all
  bool json = false;
  std::string model;   // empty: every model-table row
  int64_t tokens = 0;  // 0: every token count of the model table
  // Only this dispatch entry ("cpu.avx2", "gpu.sm90"; see `moekit explain`), --op gemm: to compare
  // implementations, or to run one alone (for a clock or power trace). Empty: the CPU bench times
  // the dispatch's pick, the GPU bench every implementation that serves.
  std::string implementation;
  // GPU: CUDA-graph replays timed per row (the median is reported). More replays make a row run
  // long enough to sample the card's clock and power beside it.
  int replays = 20;
  // FP8 GEMM operands (--op gemm): "uniform" (SGLang's tests) or "normal" (DeepGEMM's tests and
  // published figures); see Fp8Data.
  std::string data = "uniform";
};
int run_bench(const BenchOptions& options);

// Median microseconds per call of call(i) on the CPU: batches calibrated to about 2 ms, 15 of them
// (5 when one call takes over 50 ms). call(i) may rotate over copies of its inputs (bench.cpp).
double median_cpu_call_us(const std::function<void(int)>& call);

// Copy bandwidth (bytes read + written per second) of `threads` CPU threads over buffers far larger
// than the caches: the denominator of the CPU roofline (bench.cpp).
double measure_cpu_copy_bandwidth(int threads);

// ---- FP8 check/bench helpers (fp8_check.cpp).

// A linear layer's weight shape in an FP8 checkpoint: weight [n, k].
struct Fp8Shape {
  std::string model;  // "DeepSeek-V3", "Qwen3-30B-A3B", ... ("SGLang test" for its test shapes)
  std::string layer;  // "q_proj", "expert gate_up", ...
  int64_t n, k;
  std::string name() const;  // "DeepSeek-V3 o_proj N=7168 K=16384"
};
const std::vector<Fp8Shape>& fp8_shapes();

// Random block_fp8_gemm operands. uniform (`moekit check`, SGLang's block FP8 tests): A [m, k] and
// B [n, k] uniform in +-448 cast to e4m3, row-major A scales and f32 B scales uniform in
// [0, 0.01). normal (DeepGEMM's tests, behind its published TFLOPS): standard normal values cast
// as its per_token / per_block casts do, each 1 x 128 group of A and 128 x 128 block of B scaled so
// that its largest magnitude is 448, the scale amax / 448. The two draw different power from the
// tensor cores (the bits toggle differently), which moves the clock of a power-capped card.
// ones: every operand e4m3 1.0 and every scale 1, so few bits toggle and the card draws less power
// than on real data (a diagnostic: does a kernel's time depend on its power?).
enum class Fp8Data { uniform, normal, ones };
struct Fp8GemmInputs {
  Tensor a, a_scales, b, b_scales;
};
Fp8GemmInputs make_fp8_gemm_inputs(int64_t m, int64_t n, int64_t k, uint64_t seed,
                                   Fp8Data data = Fp8Data::uniform);
// "uniform" | "normal" | "ones" (--data); throws naming the option otherwise.
Fp8Data parse_fp8_data(const std::string& name);
// Row-major f32 scales [M, G] (host) copied into column-major storage ([G, M], M contiguous): the
// layout cuBLASLt's VEC128 activation scales need.
Tensor column_major_scales(const TensorView& row_major);
// `bytes` zero bytes (at least one) on `device`: an op's workspace, zero-filled once as its
// contract asks.
Tensor zero_filled_bytes(size_t bytes, Device device);
// The first `rows` rows of a (rows contiguous) as a view.
TensorView first_rows(const TensorView& t, int64_t rows);
// A contiguous [rows, cols] tensor as [groups, rows / groups, cols] (grouped_block_fp8_gemm).
TensorView as_groups(const Tensor& t, int64_t groups);
// sum |out - ref| / sum |ref| over the first ref.size(0) rows of out (any float dtypes).
double relative_mean_error(const TensorView& out, const TensorView& ref);
// The name of the implementation explain_* chose, or empty when none serves.
std::string chosen_name(const std::vector<ImplementationChoice>& choices);

// per_token_group_quant_fp8 (group 128; packed_ue8m0 implies ue8m0) of x on `backend` against the
// reference: q byte differences, those of them that are rounding near-ties (x / scale within one
// f32 ulp of the midpoint of the two e4m3 values), and differing scale words.
struct Fp8QuantCheck {
  bool ran = false;            // false: no implementation of `backend` serves
  std::string implementation;  // the one explain_per_token_group_quant_fp8 chose
  int64_t diffs = 0, near_ties = 0, scale_diffs = 0;
};
Fp8QuantCheck check_fp8_quant(const TensorView& x, ScaleLayout layout, Backend backend,
                              bool gated = false);
// Activations as a model's: N(0, 1) with 1/64 outliers x30, bf16 [m, k].
Tensor random_fp8_activations(uint64_t seed, int64_t m, int64_t k);
// A bf16 weight [n, k] as a checkpoint's before quantization: N(0, 0.02) with 1/256 outliers x20,
// so that blocks differ in scale.
Tensor random_bf16_weight(uint64_t seed, int64_t n, int64_t k);

// block_quantize_weight of w on `backend` against the reference: weight bytes that differ, those
// of them that are rounding near-ties (w / scale within one f32 ulp of the midpoint of the two
// e4m3 values), and differing scales.
struct Fp8WeightCheck {
  std::string implementation;  // the one explain_block_quantize_weight chose; empty: none serves
  int64_t diffs = 0, near_ties = 0, scale_diffs = 0;
};
Fp8WeightCheck check_fp8_quantize_weight(const TensorView& w, Backend backend);

// `moekit bench --op gemm|quant|linear|quantize-weight` (fp8_bench.cpp); returns the exit code. The
// GPU backend's table (fp8_bench_gpu.cpp) times every GPU implementation that serves each shape.
int run_fp8_bench(const BenchOptions& options, Backend backend, int threads);
int run_fp8_bench_gpu(const BenchOptions& options);

// The FP8 subcommands (fp8_commands.cpp): safetensors in, safetensors out (written atomically, and
// only on success).
struct Fp8CommonFlags {
  std::string input, output;
  std::string backend;  // empty: the fastest present for CPU tensors
  int threads = 0;      // CPU threads; 0 = all
};

// quant: "x" [M, K] -> "q" f8e4m3 [M, K] and "scales" in the layout's physical storage.
struct QuantOptions {
  Fp8CommonFlags common;
  int group_size = 128;
  bool ue8m0 = false;
  std::string layout = "row";  // row | col | col-tma | packed
};
int run_quant(const QuantOptions& options);

// gemm: "a", "a_scales" (row-major), "b", "b_scales", optional "bias" -> "out" [M, N].
struct GemmOptions {
  Fp8CommonFlags common;
  std::string out_dtype = "bf16";  // bf16 | f16 | f32
};
int run_gemm(const GemmOptions& options);

// quantize-weight: "weight" [N, K] -> "weight" f8e4m3 and "weight_scale_inv" f32.
int run_quantize_weight(const Fp8CommonFlags& options);

// explain --op gemm | linear | gemm-grouped: the dispatch of block_fp8_gemm (a_scales row-major,
// as `gemm` reads them), w8a8_block_fp8_linear (bf16 x) or grouped_block_fp8_gemm (G GEMMs; with
// expected_rows, its masked layout with that hint) at M x N x K with bf16 out, every entry's
// answer and the chosen one's plan (GPU kernel, layout). Operands are allocated, never read.
struct ExplainFp8Options {
  std::string op = "gemm";
  int64_t m = 1, n = 4096, k = 7168;
  int64_t groups = 8;                    // gemm-grouped
  std::optional<int64_t> expected_rows;  // gemm-grouped: the masked layout, with this hint
  std::string backend;                   // empty: the fastest present
  bool static_weights = false;
};
int run_explain_fp8(const ExplainFp8Options& options);

}  // namespace moekit::cli
