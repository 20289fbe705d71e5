// The moekit CLI's subcommands. Each returns the process exit code; errors in the user's input
// surface as moekit::Error (main prints one line and exits 2).
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "moekit/backend.h"

namespace moekit::cli {

struct CheckOptions {
  std::optional<Backend> backend;  // none: every backend present except the reference
  std::optional<uint64_t> seed;    // none: a fresh seed, printed
  bool verbose = false;            // print each implementation choice and why others declined
  bool quick = false;              // decode token counts and 1024 only
};
int run_check(const CheckOptions& options);

struct BenchOptions {
  std::string op = "route";
  std::optional<Backend> backend;  // none: the fastest present
  int threads = 0;                 // CPU threads; 0 = all
  bool json = false;
  std::string model;   // empty: every model-table row
  int64_t tokens = 0;  // 0: every token count of the model table
};
int run_bench(const BenchOptions& options);

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

}  // namespace moekit::cli
