// Backends present in this build and on this machine.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace moekit {

enum class Backend : uint8_t { reference, cpu, gpu };

struct BackendInfo {
  Backend backend;
  std::string name;    // "reference", "cpu", "gpu"
  std::string detail;  // e.g. "x86-64 avx2 fma f16c, 2 threads" or the GPU's name and arch
};

// What this build and this machine have, slowest first (the reference is always present).
std::vector<BackendInfo> backends();
bool backend_available(Backend backend);
std::string_view backend_name(Backend backend);
Backend parse_backend(std::string_view name);  // throws Error naming the value
// The fastest backend present (gpu, then cpu, then reference).
Backend fastest_backend();

// How to run one op call: shared by every op.
struct OpOptions {
  std::optional<Backend> backend;  // none: the fastest backend present for the tensors' device
  int num_threads = 0;             // CPU backend: 0 = all available
  void* stream = nullptr;          // GPU backend: the stream to enqueue on
  // Only the dispatch-table entry of this name may serve ("gpu.cublaslt", "cpu.avx2"; see
  // `moekit explain`): for benchmarks and tests that compare implementations. Empty: any.
  std::string implementation{};
  // The weight operand (b of block_fp8_gemm; route's bias) is not written by the kernel enqueued
  // just before this op on its stream (true of a model's weights, loaded once). GPU kernels may
  // then start reading it before that kernel has finished (programmatic dependent launch on
  // sm_90), which hides most of the gap between the two. Wrong if that kernel writes the weight:
  // leave false then. w8a8_block_fp8_linear needs no promise: its own quantization kernel runs
  // just before.
  bool static_weights = false;
};

// One row of an op's dispatch table as considered for one call (the explain_* functions): which
// implementation runs and why each other one declines.
struct ImplementationChoice {
  std::string name;  // e.g. "cpu.avx2"
  Backend backend;
  bool chosen = false;
  std::string reason;  // why it declines (empty when it serves)
  std::string detail;  // the chosen entry, where it says: how it will run (GPU kernel, layout)
};

// CPU features found at run time (cpuid), used by dispatch tables.
struct CpuFeatures {
  bool avx2 = false;         // with fma and f16c
  bool avx512 = false;       // f, bw, vl, dq
  bool avx512_bf16 = false;  // avx512 and AVX512_BF16 (vdpbf16ps, vcvtne2ps2bf16)
  // avx512_bf16 and AMX-TILE + AMX-BF16, their register state enabled by the OS and granted to
  // this process (Linux: arch_prctl ARCH_REQ_XCOMP_PERM, asked once here)
  bool amx_bf16 = false;
};
const CpuFeatures& cpu_features();

}  // namespace moekit
