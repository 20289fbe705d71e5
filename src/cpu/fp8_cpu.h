// CPU FP8 kernels as entries of the FP8 dispatch tables: threads over rows / tiles, SIMD inside,
// no allocation per call (but the AMX GEMM's panel where the caller gives no workspace). One build
// per ISA (portable, AVX2, AVX-512), picked at run time; plus avx512bf16 and amx: the GEMMs from 25
// rows on AVX-512 BF16 dot products, or from 6 on AMX tiles (the rest as avx512).
#pragma once

#include <string>

#include "ops/fp8_problem.h"

namespace moekit::cpu {

enum class Fp8Isa : uint8_t { portable, avx2, avx512, avx512bf16, amx };

// "" when this ISA's build serves the problem, else the reason it declines.
// avx512bf16 and amx are instantiated for the two GEMM ops only.
template <Fp8Isa kIsa>
std::string fp8_supports(const GroupQuantProblem& problem);
template <Fp8Isa kIsa>
std::string fp8_supports(const BlockGemmProblem& problem);
template <Fp8Isa kIsa>
std::string fp8_supports(const W8a8LinearProblem& problem);
template <Fp8Isa kIsa>
std::string fp8_supports(const BlockQuantizeWeightProblem& problem);

template <Fp8Isa kIsa>
void per_token_group_quant_fp8(const GroupQuantProblem& problem);
template <Fp8Isa kIsa>
void block_fp8_gemm(const BlockGemmProblem& problem);
template <Fp8Isa kIsa>
void w8a8_block_fp8_linear(const W8a8LinearProblem& problem);
template <Fp8Isa kIsa>
void block_quantize_weight(const BlockQuantizeWeightProblem& problem);

// Scratch bytes block_fp8_gemm's CPU kernels use where the caller gives them (the AMX GEMM's
// activations, decoded once into the tiles' layout, and 64 bytes to align them), 0 where none.
size_t block_gemm_workspace_size(int64_t m, int64_t n, int64_t k);

// For tests: q[i] = e4m3(x[i] / divisor) through one build's vector encoder (the ISA must be
// present: cpu_features()).
void divide_to_e4m3(Fp8Isa isa, const float* x, int64_t n, float divisor, uint8_t* q);
// For tests: y [rows, cols] = silu_and_mul_f32(gate, up) of x [rows, 2 cols] f32 (gate, then up)
// through one build's vector code (portable: the scalar function).
void silu_and_mul_rows(Fp8Isa isa, const float* x, int64_t rows, int64_t cols, float* y);

}  // namespace moekit::cpu
