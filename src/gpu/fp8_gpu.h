// GPU FP8 kernels as entries of the FP8 dispatch tables (src/ops/fp8.cpp). Only declared here so
// that plain C++ front ends can list them; each supports() returns "" when it serves the problem,
// else the reason it declines. Every run enqueues on problem.stream: no host synchronization, no
// allocation, no host-device copy (graph-capturable).
#pragma once

#include <string>

#include "ops/fp8_problem.h"

namespace moekit::gpu {

// per_token_group_quant_fp8 (fp8_quant_gpu.cu): every scale layout, group sizes 16..256, the
// partial last group the linear layer asks for. Bytes equal to the reference's.
std::string group_quant_supports(const GroupQuantProblem& problem);
void per_token_group_quant_fp8(const GroupQuantProblem& problem);
// silu_and_mul_group_quant_fp8_masked in one launch over the G x M rows (fp8_quant_gpu.cu): each
// group's rows past its count (read on the device) are skipped and nothing of them is written.
// Needs each group's x and q rows right after the previous group's.
std::string masked_gated_quant_supports(const MaskedGatedQuantProblem& problem);
void silu_and_mul_group_quant_fp8_masked(const MaskedGatedQuantProblem& problem);

// block_quantize_weight (fp8_quant_gpu.cu). Bytes equal to the reference's.
std::string block_quantize_weight_supports(const BlockQuantizeWeightProblem& problem);
void block_quantize_weight(const BlockQuantizeWeightProblem& problem);

// block_fp8_gemm, moekit's portable kernel (fp8_gemm_gpu.cu): serves every valid call; tuned for
// the weight-bandwidth-bound small-M (decode) regime.
std::string block_gemm_supports(const BlockGemmProblem& problem);
void block_fp8_gemm(const BlockGemmProblem& problem);
// Its two kernels, whatever the shape (block_fp8_gemm picks by M), for tests and benchmarks.
void block_fp8_gemm_cuda_cores(const BlockGemmProblem& problem);
void block_fp8_gemm_matrix_units(const BlockGemmProblem& problem);

// block_fp8_gemm on Hopper tensor cores (fp8_gemm_sm90.cu): TMA + wgmma, sm_90a builds on
// compute capability 9.0 only.
std::string block_gemm_sm90_supports(const BlockGemmProblem& problem);
void block_fp8_gemm_sm90(const BlockGemmProblem& problem);
// What the kernel's plan for a problem it supports does at large M, so that other entries can
// defer to it where that is measured faster.
struct Sm90LargeMPlan {
  int tiles_split = 1;  // the CTAs of a cluster that split K (1: none)
  // Where the plan is persistent (a CTA or pair per SM taking tile after tile), how full its
  // rounds of tiles are: units / (rounds x resident CTAs or pairs), in (0, 1]; else 0.
  double persistent_fill = 0;
  int64_t persistent_rounds = 0;  // (0 where the plan is not persistent)
};
Sm90LargeMPlan block_gemm_sm90_large_m_plan(const BlockGemmProblem& problem);
// The scratch the GPU entries can use for block_fp8_gemm (block_fp8_gemm_workspace_size): on
// Hopper, where M > 128, a 256 x 128 f32 tile per SM and a flag word each, for the persistent
// kernel's last round split over K; 0 elsewhere.
size_t block_gemm_workspace_size(int64_t m, int64_t n, int64_t k, int device);

// w8a8_block_fp8_linear as one Hopper kernel (fp8_gemm_sm90.cu): the swap kernel of
// block_fp8_gemm_sm90, whose consumers quantize bf16 x (group 128) into shared memory themselves
// instead of reading the workspace the two-kernel path writes; M <= 16 (where a CTA's k-range
// exceeds its ring, M x its k-blocks <= 168: measured slower beyond). Same plan, same sums: the
// bytes equal per_token_group_quant_fp8 then block_fp8_gemm_sm90's. Writes only y.
std::string w8a8_linear_sm90_fused_supports(const W8a8LinearProblem& problem);
void w8a8_linear_sm90_fused(const W8a8LinearProblem& problem);

// grouped_block_fp8_gemm (and its masked layout) on Hopper at decode sizes (fp8_gemm_sm90.cu,
// M <= 64; masked, any capacity M, the token tiles with rows taken as items): group 0's swap plan,
// every CTA taking its weight tile in group after group within one launch, so that the weight
// stream runs on from group to group. Each group's out (masked: its rows) bitwise equals
// block_fp8_gemm_sm90's on those rows; masked, nothing else of out is written.
std::string grouped_gemm_sm90_supports(const GroupedBlockGemmProblem& problem);
void grouped_block_fp8_gemm_sm90(const GroupedBlockGemmProblem& problem);
std::string grouped_gemm_sm90_plan(const GroupedBlockGemmProblem& problem);

// grouped_block_fp8_gemm on Hopper past the grouped kernel's token tiles (fp8_gemm_sm90.cu):
// whole groups of M > 64 rows, or the masked layout with more than 64 rows expected per group. The
// persistent tiles kernel takes every group's rows in one launch (128 x 128 tiles for groups of at
// most 128 rows, else 256 x 128; the counts read on the device, no tile past a group's rows
// multiplied; the weight scales read by a loader warp, any layout). Each group's rows get the bits
// block_fp8_gemm_sm90's wide tiles give them; masked, out rows past a group's count but inside its
// last tile may be written, nothing else.
std::string grouped_wide_gemm_sm90_supports(const GroupedBlockGemmProblem& problem);
void grouped_wide_block_fp8_gemm_sm90(const GroupedBlockGemmProblem& problem);
std::string grouped_wide_gemm_sm90_plan(const GroupedBlockGemmProblem& problem);

// grouped_block_fp8_gemm_contiguous on Hopper (fp8_gemm_sm90.cu): the persistent tiles kernel's
// contiguous builds (in pairs of CTAs sharing A tiles where the column tiles pair up): 128 x 128
// tiles of a's blocks, or 256 x 128 tiles over each run of blocks with one index, each tile
// multiplying the weights of its index (read on the device after the previous kernel; padding
// blocks skipped, their out rows not written). Each row gets the bits block_fp8_gemm_sm90's wide
// tiles give it.
std::string contiguous_gemm_sm90_supports(const ContiguousBlockGemmProblem& problem);
void contiguous_block_fp8_gemm_sm90(const ContiguousBlockGemmProblem& problem);
std::string contiguous_gemm_sm90_plan(const ContiguousBlockGemmProblem& problem);

// silu_and_mul_grouped_block_fp8_gemm_masked in one Hopper launch (fp8_gemm_sm90.cu): the masked
// grouped kernel, whose producer warps quantize silu(gate) * up of each item's token tiles (bf16 x,
// group 128) into shared memory instead of the tiles being copied from a workspace. Same plan,
// same sums: each group's rows bitwise equal silu_and_mul_group_quant_fp8_masked's GPU launch then
// grouped_block_fp8_gemm_sm90's. Writes only out (the groups' rows).
std::string silu_grouped_gemm_sm90_supports(const MaskedSiluGemmProblem& problem);
void silu_and_mul_grouped_block_fp8_gemm_sm90(const MaskedSiluGemmProblem& problem);
std::string silu_grouped_gemm_sm90_plan(const MaskedSiluGemmProblem& problem);

// block_fp8_gemm through cuBLASLt's block-scaled FP8 (fp8_gemm_cublaslt.cu): A scales VEC128,
// B scales BLK128x128, compute capability 9.0.
std::string cublaslt_gemm_supports(const BlockGemmProblem& problem);
void cublaslt_block_fp8_gemm(const BlockGemmProblem& problem);

}  // namespace moekit::gpu
