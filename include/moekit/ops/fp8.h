// Block-scaled FP8 (e4m3) as used by Qwen3-*-FP8 and DeepSeek-V3 checkpoints. The contract is
// spec/fp8.md: per-token-group activation quantization, block-scaled GEMM (out = A x B^T with
// 1x128 activation scales and 128x128 weight scales), the w8a8 linear layer and weight
// quantization.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <vector>

#include "moekit/backend.h"
#include "moekit/tensor.h"

namespace moekit {

inline constexpr float kFp8E4m3Max = 448.0f;

// Physical storage of per-token-group scales (logical shape [M, K / group]).
enum class ScaleLayout : uint8_t {
  row_major,         // f32 [M, G]
  column_major,      // f32 stored [G, M] (strides (1, M))
  column_major_tma,  // f32 stored [G, align4(M)] (strides (1, align4(M)))
  packed_ue8m0,      // i32 stored [ceil(G / 4), align4(M)]: exponent bytes of 4 groups per word
};
// "row_major", "column_major", "column_major_tma", "packed_ue8m0"; "?" for any other value.
const char* scale_layout_name(ScaleLayout layout);

struct GroupQuantConfig {
  int group_size = 128;  // 16..256; a divisor of K that is a multiple of 16
  bool ue8m0 = false;    // round scales up to powers of two (required by packed_ue8m0)
  ScaleLayout layout = ScaleLayout::row_major;
  float eps = 1e-10f;  // amax floor
};

// The physical shape and dtype of the scales tensor for x [M, K] under config.
struct ScaleStorage {
  DType dtype;
  std::array<int64_t, 2> shape;
};
ScaleStorage group_quant_scale_storage(int64_t M, int64_t K, const GroupQuantConfig& config);

// x [M, K] f32/f16/bf16 (rows contiguous) -> q f8e4m3 [M, K] (rows contiguous), scales in the
// config's layout (a contiguous tensor of group_quant_scale_storage's shape and dtype). Only the
// logical scales are written: the padding rows M..align4(M) of the TMA-aligned layouts are left
// untouched, and in a packed word the bytes of groups past K / group_size are written as 0.
void per_token_group_quant_fp8(const TensorView& x, const TensorView& q, const TensorView& scales,
                               const GroupQuantConfig& config, const OpOptions& options = {});

// The activation of a gated MLP quantized for the GEMM after it (SGLang's
// per_token_group_quant_fp8 with fuse_silu_and_mul): y = silu(x[:, :K]) * x[:, K:] of x [M, 2K]
// (f32/f16/bf16, rows contiguous), kept in f32 (never rounded to x's dtype), then quantized as
// per_token_group_quant_fp8(y) into q [M, K] and scales. silu(g) = g / (1 + e^-g) with moekit's
// own f32 exponential (within 2 ulp of e^x) and every NaN made the positive quiet NaN, so every
// backend writes the same bytes.
void silu_and_mul_group_quant_fp8(const TensorView& x, const TensorView& q,
                                  const TensorView& scales, const GroupQuantConfig& config,
                                  const OpOptions& options = {});
// The same over G groups in DeepGEMM's masked layout (MoE decode, between
// grouped_block_fp8_gemm_masked's gate_up and down): x [G, M, 2K], masked_m i32 [G] on x's device,
// q [G, M, K] and scales [G, ...] (each group's plane the contiguous storage
// group_quant_scale_storage(M, K, config) gives, as grouped_block_fp8_gemm's a_scales). Group g's
// first min(max(masked_m[g], 0), M) rows are quantized as silu_and_mul_group_quant_fp8 would; the
// rest of its q and scales are unspecified afterwards (the host backends and the GPU's one launch,
// which reads the counts on the device, leave them; the GPU's per-group fallback, taken where a
// group's rows do not follow the previous group's, quantizes every row).
void silu_and_mul_group_quant_fp8_masked(const TensorView& x, const TensorView& masked_m,
                                         const TensorView& q, const TensorView& scales,
                                         const GroupQuantConfig& config,
                                         const OpOptions& options = {});

// out [M, N] (f32/bf16/f16) = A [M, K] (f8e4m3) x B [N, K]^T (f8e4m3), scaled per 128-block of K by
// a_scales (logical [M, ceil(K/128)], stored in a_scales_layout; packed_ue8m0 holds i32 words) and
// b_scales [ceil(N/128), ceil(K/128)] (f32 or bf16), plus bias [N] (f32/bf16/f16) if given.
// Partial blocks behave as zero-padded.
void block_fp8_gemm(const TensorView& a, const TensorView& a_scales, ScaleLayout a_scales_layout,
                    const TensorView& b, const TensorView& b_scales,
                    const std::optional<TensorView>& bias, const TensorView& out,
                    const OpOptions& options = {});
// The same with scratch space: `workspace` holds block_fp8_gemm_workspace_size(M, N, K, device)
// bytes on the tensors' device, 16-byte aligned, zero-filled before its first use (each call, of
// any shape, leaves it ready for the next; one workspace per stream); or none (null, 0 bytes).
// With it, Hopper's large-M kernel splits a last round of tiles that is at most half full over K
// across the SMs that would otherwise idle, and the CPU's AMX kernel (from 6 rows) decodes the
// activations into it once (whatever it held) instead of into memory it allocates for the call.
size_t block_fp8_gemm_workspace_size(int64_t M, int64_t N, int64_t K, const Device& device);
void block_fp8_gemm(const TensorView& a, const TensorView& a_scales, ScaleLayout a_scales_layout,
                    const TensorView& b, const TensorView& b_scales,
                    const std::optional<TensorView>& bias, const TensorView& out, void* workspace,
                    size_t workspace_bytes, const OpOptions& options = {});

// y [M, N] = dynamic per-token-group(128) quantization of x [M, K] (f32/f16/bf16), then
// block_fp8_gemm with weight [N, K] f8e4m3 and weight_scale_inv [ceil(N/128), ceil(K/128)].
// The quantized activations live in a caller-provided workspace of
// w8a8_block_fp8_linear_workspace_size(M, K) bytes (on the tensors' device, 16-byte aligned):
// q e4m3 [M, K] at offset 0, then the row-major f32 scales [M, ceil(K/128)] at align64(M * K).
// K need not be a multiple of 128: the last group is partial (its amax covers the elements there
// are) and the GEMM zero-pads it.
size_t w8a8_block_fp8_linear_workspace_size(int64_t M, int64_t K);
// The same, then (from the next 256-byte boundary) block_fp8_gemm's workspace for M x N x K on
// `device`, which the layer's GEMM uses when workspace_bytes covers it: those bytes zero-filled
// before their first use, as block_fp8_gemm asks (one workspace per stream). Equal to the
// two-argument size where the GEMM wants none (CPU, M <= 128, a GPU before Hopper).
size_t w8a8_block_fp8_linear_workspace_size(int64_t M, int64_t N, int64_t K, const Device& device);
void w8a8_block_fp8_linear(const TensorView& x, const TensorView& weight,
                           const TensorView& weight_scale_inv,
                           const std::optional<TensorView>& bias, const TensorView& y,
                           void* workspace, size_t workspace_bytes, const OpOptions& options = {});

// G independent GEMMs of one shape in one call (DeepGEMM's grouped GEMM with every row used):
// out[g] = block_fp8_gemm(a[g], a_scales[g], b[g], b_scales[g]) for g < G, without bias, with
// a [G, M, K] f8e4m3, a_scales [G, ...] (each group's plane the storage block_fp8_gemm takes in
// a_scales_layout), b [G, N, K] f8e4m3, b_scales [G, ceil(N/128), ceil(K/128)] f32/bf16 and out
// [G, M, N] f32/bf16/f16 (groups must not overlap). On Hopper, for decode sizes (M <= 64), one
// launch streams every group's weights back to back ("gpu.sm90.grouped": one grid start and one
// tail for all G instead of one each, the groups spread over the SMs), each group's out bitwise
// equal to what block_fp8_gemm's "gpu.sm90" entry writes with the same swap layout (the one the
// explain detail names; the grouped plan may leave K unsplit where the lone GEMM splits it). Past
// 64 rows ("gpu.sm90.grouped_wide", up to 2^17 rows x k-blocks per group, where TMA can copy the
// activation scales: rows on 16 bytes) one launch of persistent tiles (128 x 128 for groups of at
// most 128 rows, else 256 x 128) takes every group's rows, each group's out bitwise equal to what
// "gpu.sm90" writes with its wide tiles (MOEKIT_SM90_TILES_ROWS=256); elsewhere each group is a
// block_fp8_gemm call of the backend's own entries.
void grouped_block_fp8_gemm(const TensorView& a, const TensorView& a_scales,
                            ScaleLayout a_scales_layout, const TensorView& b,
                            const TensorView& b_scales, const TensorView& out,
                            const OpOptions& options = {});
// The same in DeepGEMM's masked layout (MoE decode under CUDA graphs): masked_m i32 [G] on the
// tensors' device (typically written by the kernel before, e.g. the dispatch of tokens to
// experts) gives group g's rows: its first min(max(masked_m[g], 0), M). Only those rows of out[g]
// are defined afterwards (the rest may or may not be written); groups with none cost no weight
// traffic on Hopper ("gpu.sm90.grouped" skips them and writes nothing for them). M is the
// experts' capacity: on Hopper one launch at any M up to 2048 token tiles of 16, whose CTAs take
// only the token tiles with rows (each group's rows have the bits of "gpu.sm90" on them, 64 rows
// at a time). Where the caller expects more than 64 rows per group (the overload below), the wide
// tiles take the groups' rows instead ("gpu.sm90.grouped_wide": the counts read on the device,
// tiles of 128 rows for a hint of at most 128, else 256; out rows past a group's count inside its
// last tile may be written too).
void grouped_block_fp8_gemm_masked(const TensorView& a, const TensorView& a_scales,
                                   ScaleLayout a_scales_layout, const TensorView& b,
                                   const TensorView& b_scales, const TensorView& masked_m,
                                   const TensorView& out, const OpOptions& options = {});
// The same with a hint, DeepGEMM's expected_m: most groups have about `expected_rows` rows (>= 1;
// above M it counts as M). Hopper plans its token tile for that many rows instead of 16: 1..8 for
// one-token decode steps, up to 64 where experts take tens of rows (each token tile of a group
// streams the group's weights once). The hint changes the speed only: each group's rows still have
// the bits of "gpu.sm90" with the plan's layout.
void grouped_block_fp8_gemm_masked(const TensorView& a, const TensorView& a_scales,
                                   ScaleLayout a_scales_layout, const TensorView& b,
                                   const TensorView& b_scales, const TensorView& masked_m,
                                   const TensorView& out, int64_t expected_rows,
                                   const OpOptions& options = {});

// MoE prefill in DeepGEMM's contiguous layout (m_grouped_fp8_gemm_nt_contiguous): every expert's
// rows stacked in one a [M, K] f8e4m3 with its a_scales (the storage block_fp8_gemm takes for a in
// a_scales_layout), the experts' weights b [G, N, K] f8e4m3 and b_scales [G, ceil(N/128),
// ceil(K/128)] f32/bf16, m_indices i32 [M] on a's device (any stride) and out [M, N]
// f32/bf16/f16. The rows are taken in blocks of 128 (the last may be partial); every row of block
// i is multiplied by expert e = m_indices[128 i], the block's first row's index (DeepGEMM aligns
// each expert's rows to 128; the other rows' indices are not read): its out rows are
// block_fp8_gemm's of those rows with b[e] and b_scales[e], without bias. A block whose index is
// outside [0, G) is padding: nothing is multiplied for it and its out rows are not written. Hopper
// takes every block in one launch that reads the indices on the device ("gpu.sm90.contiguous",
// where TMA can copy the activation scales, i.e. rows on 16 bytes, as DeepGEMM's column-major
// TMA-aligned layout always has; the bits of "gpu.sm90"'s wide tiles); the other entries run each
// run of consecutive blocks with one index as a block_fp8_gemm call of their backend's entries,
// with that call's bits (the GPU's, "gpu.per_segment", synchronizes the stream to read the indices
// on the host).
void grouped_block_fp8_gemm_contiguous(const TensorView& a, const TensorView& a_scales,
                                       ScaleLayout a_scales_layout, const TensorView& b,
                                       const TensorView& b_scales, const TensorView& m_indices,
                                       const TensorView& out, const OpOptions& options = {});

// An MoE down projection in DeepGEMM's masked layout, its activation quantized inside:
// out[g] = grouped_block_fp8_gemm_masked of silu_and_mul_group_quant_fp8_masked(x)[g] and b[g],
// with x [G, M, 2K] (the gate_up projection's out: gate then up halves; f32/f16/bf16), masked_m
// i32 [G] on x's device, b [G, N, K] f8e4m3, b_scales [G, ceil(N/128), ceil(K/128)] f32/bf16, out
// [G, M, N] f32/bf16/f16. config: group_size 128 and the row_major layout (the scales never leave
// the op: inside it they are column-major TMA-aligned, which TMA copies at any K); eps and ue8m0
// as for the quantization. expected_rows: 0, or the hint grouped_block_fp8_gemm_masked takes. Only
// group g's first min(max(masked_m[g], 0), M) rows of out are defined afterwards, with the bytes of
// the two ops in a row on the same backend (the quantization's scales column-major TMA-aligned).
// On Hopper
// (bf16 x, K a multiple of 128) one launch: the GEMM's kernel quantizes silu(gate) * up of its
// token tiles itself ("gpu.sm90.fused": no workspace, one grid start fewer than the two ops). The
// other entries run the two ops apart through a workspace of
// silu_and_mul_grouped_block_fp8_gemm_masked_workspace_size(G, M, K) bytes (16-byte aligned, on
// x's device), or decline without one (workspace null, 0 bytes).
size_t silu_and_mul_grouped_block_fp8_gemm_masked_workspace_size(int64_t G, int64_t M, int64_t K);
void silu_and_mul_grouped_block_fp8_gemm_masked(
    const TensorView& x, const TensorView& masked_m, const TensorView& b,
    const TensorView& b_scales, const TensorView& out, const GroupQuantConfig& config,
    int64_t expected_rows, void* workspace, size_t workspace_bytes, const OpOptions& options = {});

// W [N, K] (f32/bf16/f16) -> weight f8e4m3 [N, K] and weight_scale_inv f32
// [ceil(N/128), ceil(K/128)]: per 128x128 block, scale = max(amax, 1e-4) / 448.
void block_quantize_weight(const TensorView& w, const TensorView& weight,
                           const TensorView& weight_scale_inv, const OpOptions& options = {});

// ---- Which implementation runs (each op's dispatch table, fastest first): one row per entry
// considered, saying which one serves and why each other one declines. Same arguments as the op;
// throws the op's Error on an invalid call.
std::vector<ImplementationChoice> explain_per_token_group_quant_fp8(const TensorView& x,
                                                                    const TensorView& q,
                                                                    const TensorView& scales,
                                                                    const GroupQuantConfig& config,
                                                                    const OpOptions& options = {});
std::vector<ImplementationChoice> explain_silu_and_mul_group_quant_fp8(
    const TensorView& x, const TensorView& q, const TensorView& scales,
    const GroupQuantConfig& config, const OpOptions& options = {});
std::vector<ImplementationChoice> explain_silu_and_mul_group_quant_fp8_masked(
    const TensorView& x, const TensorView& masked_m, const TensorView& q, const TensorView& scales,
    const GroupQuantConfig& config, const OpOptions& options = {});
std::vector<ImplementationChoice> explain_block_fp8_gemm(
    const TensorView& a, const TensorView& a_scales, ScaleLayout a_scales_layout,
    const TensorView& b, const TensorView& b_scales, const std::optional<TensorView>& bias,
    const TensorView& out, const OpOptions& options = {});
std::vector<ImplementationChoice> explain_block_fp8_gemm(
    const TensorView& a, const TensorView& a_scales, ScaleLayout a_scales_layout,
    const TensorView& b, const TensorView& b_scales, const std::optional<TensorView>& bias,
    const TensorView& out, void* workspace, size_t workspace_bytes, const OpOptions& options = {});
std::vector<ImplementationChoice> explain_w8a8_block_fp8_linear(
    const TensorView& x, const TensorView& weight, const TensorView& weight_scale_inv,
    const std::optional<TensorView>& bias, const TensorView& y, void* workspace,
    size_t workspace_bytes, const OpOptions& options = {});
std::vector<ImplementationChoice> explain_grouped_block_fp8_gemm(
    const TensorView& a, const TensorView& a_scales, ScaleLayout a_scales_layout,
    const TensorView& b, const TensorView& b_scales, const TensorView& out,
    const OpOptions& options = {});
std::vector<ImplementationChoice> explain_grouped_block_fp8_gemm_masked(
    const TensorView& a, const TensorView& a_scales, ScaleLayout a_scales_layout,
    const TensorView& b, const TensorView& b_scales, const TensorView& masked_m,
    const TensorView& out, const OpOptions& options = {});
std::vector<ImplementationChoice> explain_grouped_block_fp8_gemm_masked(
    const TensorView& a, const TensorView& a_scales, ScaleLayout a_scales_layout,
    const TensorView& b, const TensorView& b_scales, const TensorView& masked_m,
    const TensorView& out, int64_t expected_rows, const OpOptions& options = {});
std::vector<ImplementationChoice> explain_grouped_block_fp8_gemm_contiguous(
    const TensorView& a, const TensorView& a_scales, ScaleLayout a_scales_layout,
    const TensorView& b, const TensorView& b_scales, const TensorView& m_indices,
    const TensorView& out, const OpOptions& options = {});
std::vector<ImplementationChoice> explain_silu_and_mul_grouped_block_fp8_gemm_masked(
    const TensorView& x, const TensorView& masked_m, const TensorView& b,
    const TensorView& b_scales, const TensorView& out, const GroupQuantConfig& config,
    int64_t expected_rows, void* workspace, size_t workspace_bytes, const OpOptions& options = {});
std::vector<ImplementationChoice> explain_block_quantize_weight(const TensorView& w,
                                                                const TensorView& weight,
                                                                const TensorView& weight_scale_inv,
                                                                const OpOptions& options = {});

}  // namespace moekit
