// Extras of the Hopper FP8 GEMM (fp8_gemm_sm90.cu) for tests and benchmarks; the op entry points
// are in fp8_gpu.h.
#pragma once

#include <string>

#include "ops/fp8_problem.h"

namespace moekit::gpu {

// The launch the kernel would make for the problem, in words ("swap: 8 tokens x 64 weight rows
// per CTA, K split 2 ways ..."). Only for a problem block_gemm_sm90_supports() accepts.
std::string block_gemm_sm90_plan(const BlockGemmProblem& problem);
// The fused linear layer's launch, in words (w8a8_linear_sm90_fused_supports must accept it).
std::string w8a8_linear_sm90_fused_plan(const W8a8LinearProblem& problem);

}  // namespace moekit::gpu
