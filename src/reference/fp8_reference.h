// The FP8 contract (spec/fp8.md) as scalar code: the oracle for every backend. Serves any valid
// problem whose tensors are on the CPU.
#pragma once

#include "ops/fp8_problem.h"

namespace moekit::reference {

void per_token_group_quant_fp8(const GroupQuantProblem& problem);
void block_fp8_gemm(const BlockGemmProblem& problem);
void w8a8_block_fp8_linear(const W8a8LinearProblem& problem);
void block_quantize_weight(const BlockQuantizeWeightProblem& problem);

// Steps 1-2 of the group quantization for a group whose max |x| (NaN ignored) is amax.
float group_scale(float amax, float eps, bool ue8m0);
// 2^ceil(log2(scale)) for a positive scale, exactly, from the f32 bits: the power of two >= scale
// (an exact power of two stays; inf stays inf).
float ue8m0_round_up(float scale);

}  // namespace moekit::reference
