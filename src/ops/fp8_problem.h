// What an FP8 implementation receives: arguments already validated by the front end (src/ops/
// fp8.cpp), with every default resolved. Implementations (reference, cpu, gpu) include this and
// nothing of the front end.
#pragma once

#include <array>
#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <string>

#include "moekit/ops/fp8.h"
#include "ops/dispatch.h"

namespace moekit {

// Where the logical scale (row m, group g) of a [M, G] scale tensor lives in its storage
// (spec/fp8.md, "Scale layouts"). Offsets are in elements: f32 values, or i32 words when packed.
struct ScaleAddressing {
  ScaleLayout layout = ScaleLayout::row_major;
  int64_t row_stride = 0;    // between rows m and m + 1
  int64_t group_stride = 0;  // between groups g and g + 1 (packed: between words 4w and 4w + 4)

  bool packed() const { return layout == ScaleLayout::packed_ue8m0; }
  // The f32 or i32 element holding (m, g); for packed layouts byte g % 4 of that word.
  int64_t offset(int64_t m, int64_t g) const {
    return m * row_stride + (packed() ? g / 4 : g) * group_stride;
  }
};
ScaleAddressing scale_addressing(ScaleLayout layout, int64_t rows, int64_t groups);

// Reads the logical scale (m, g) as f32: a packed exponent byte e is the power of two 2^(e - 127).
inline float read_scale(const void* storage, const ScaleAddressing& at, int64_t m, int64_t g) {
  const int64_t i = at.offset(m, g);
  uint32_t bits;
  if (at.packed()) {
    bits = static_cast<uint32_t>(static_cast<const uint8_t*>(storage)[i * 4 + g % 4]) << 23;
  } else {
    std::memcpy(&bits, static_cast<const char*>(storage) + i * 4, 4);
  }
  float scale;
  std::memcpy(&scale, &bits, 4);
  return scale;
}

inline constexpr int kFp8BlockSize = 128;  // weight blocks are 128 x 128; activation groups 1 x 128

namespace fp8 {
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t align4(int64_t v) { return ceil_div(v, 4) * 4; }
}  // namespace fp8

// per_token_group_quant_fp8 (and the first half of w8a8_block_fp8_linear), and
// silu_and_mul_group_quant_fp8 (`gated`).
struct GroupQuantProblem {
  TensorView x;       // [M, K] f32/f16/bf16, stride(1) == 1; gated: [M, 2K], gate then up
  TensorView q;       // [M, K] f8e4m3, stride(1) == 1
  TensorView scales;  // contiguous storage of `layout` (f32, or i32 when packed)
  ScaleAddressing scale_at;
  int64_t rows = 0;    // M
  int64_t cols = 0;    // K
  int64_t groups = 0;  // ceil(K / group_size): the last group is partial when K % group_size != 0
                       // (only w8a8_block_fp8_linear asks for that; the public op needs K % g == 0)
  int group_size = 128;
  bool ue8m0 = false;
  float eps = 1e-10f;
  // Quantize silu_and_mul_f32(x[m, k], x[m, K + k]) (silu_math.h) in place of x[m, k].
  bool gated = false;
  int num_threads = 0;
  void* stream = nullptr;
};

// block_fp8_gemm: out = A x B^T with per-block scales (and the second half of the linear layer).
struct BlockGemmProblem {
  TensorView a;         // [M, K] f8e4m3, stride(1) == 1
  TensorView a_scales;  // logical [M, k_blocks] in `a_scale_at.layout`, contiguous storage
  ScaleAddressing a_scale_at;
  TensorView b;         // [N, K] f8e4m3, stride(1) == 1
  TensorView b_scales;  // [n_blocks, k_blocks] f32/bf16, any strides
  TensorView bias;      // [N] f32/bf16/f16, any stride; data() == nullptr when there is none
  TensorView out;       // [M, N] f32/bf16/f16, stride(1) == 1
  int64_t m = 0, n = 0, k = 0;
  int64_t k_blocks = 0;  // ceil(K / 128)
  int64_t n_blocks = 0;  // ceil(N / 128)
  int num_threads = 0;
  void* stream = nullptr;
  bool b_static = false;  // b is not written by the previous kernel (OpOptions::static_weights)
  // Scratch on the tensors' device (block_fp8_gemm_workspace_size), zero-filled before its first
  // use; null: none (implementations that want one do without).
  void* workspace = nullptr;
  size_t workspace_bytes = 0;

  bool has_bias() const { return bias.data() != nullptr; }
};

// Rows first .. first + rows - 1 of p, as block_fp8_gemm would receive them (the activation
// scales keep M's addressing, from row `first`). Rows are independent in every implementation.
inline BlockGemmProblem row_band(const BlockGemmProblem& p, int64_t first, int64_t rows) {
  const auto band_of = [&](const TensorView& t) {
    return TensorView(static_cast<char*>(t.data()) + first * t.stride(0) * dtype_size(t.dtype()),
                      t.dtype(), std::array<int64_t, 2>{rows, t.size(1)},
                      std::array<int64_t, 2>{t.stride(0), t.stride(1)}, t.device());
  };
  BlockGemmProblem band = p;
  band.a = band_of(p.a);
  band.out = band_of(p.out);
  band.a_scales =
      TensorView(static_cast<char*>(p.a_scales.data()) + p.a_scale_at.offset(first, 0) * 4,
                 p.a_scales.dtype(), p.a_scales.shape(), p.a_scales.strides(), p.a_scales.device());
  band.m = rows;
  return band;
}

// Plane g of a 3-D tensor [G, R, C] as a 2-D view [R, C] (same strides).
inline TensorView plane_of(const TensorView& t, int64_t g) {
  const int64_t shape[2] = {t.size(1), t.size(2)};
  const int64_t strides[2] = {t.stride(1), t.stride(2)};
  return TensorView(static_cast<char*>(t.data()) + g * t.stride(0) * dtype_size(t.dtype()),
                    t.dtype(), shape, strides, t.device());
}

// grouped_block_fp8_gemm: `groups` independent block_fp8_gemm problems of one shape, stacked along
// dimension 0 (no bias). group(g) is plane g's problem, as block_fp8_gemm would receive it.
struct GroupedBlockGemmProblem {
  TensorView a;         // [G, M, K] f8e4m3, stride(2) == 1
  TensorView a_scales;  // [G, ...]: each plane the contiguous storage of `a_scales_layout`
  ScaleLayout a_scales_layout = ScaleLayout::row_major;
  TensorView b;         // [G, N, K] f8e4m3, stride(2) == 1
  TensorView b_scales;  // [G, ceil(N/128), ceil(K/128)] f32/bf16, any strides
  TensorView out;       // [G, M, N] f32/bf16/f16, stride(2) == 1
  // [G] i32 on the tensors' device, or none (data() null): group g's rows are its first
  // min(max(masked_m[g], 0), M); the rest of its out rows are unspecified after the call.
  TensorView masked_m;
  // Masked only: the rows most groups are expected to have (DeepGEMM's expected_m), 1..M; 0 when
  // the caller gave none. A timing hint: the GPU plans its token tile for it; no bits depend on it.
  int64_t expected_rows = 0;
  int64_t groups = 0, m = 0, n = 0, k = 0;
  int num_threads = 0;
  void* stream = nullptr;
  bool b_static = false;  // as BlockGemmProblem::b_static

  bool masked() const { return masked_m.data() != nullptr; }
  // Group g's problem on its first `rows` rows (the activation scales keep M's addressing).
  BlockGemmProblem group(int64_t g, int64_t rows) const { return row_band(group(g), 0, rows); }
  BlockGemmProblem group(int64_t g) const {
    BlockGemmProblem p;
    p.a = plane_of(a, g);
    p.a_scales = plane_of(a_scales, g);
    p.b = plane_of(b, g);
    p.b_scales = plane_of(b_scales, g);
    p.out = plane_of(out, g);
    p.m = m;
    p.n = n;
    p.k = k;
    p.k_blocks = fp8::ceil_div(k, kFp8BlockSize);
    p.n_blocks = fp8::ceil_div(n, kFp8BlockSize);
    p.a_scale_at = scale_addressing(a_scales_layout, m, p.k_blocks);
    p.num_threads = num_threads;
    p.stream = stream;
    p.b_static = b_static;
    return p;
  }
};

// grouped_block_fp8_gemm_contiguous (DeepGEMM's contiguous layout, MoE prefill): the rows of a
// are cut into blocks of kContiguousBlockRows (the last may be partial); every row of block i
// multiplies b[e] with e = m_indices[i * kContiguousBlockRows] (the block's first row's index;
// DeepGEMM aligns each expert's rows to 128, so this is each row's own index). A block whose e is
// outside [0, G) is padding: nothing is multiplied for it and its out rows are not written.
inline constexpr int64_t kContiguousBlockRows = 128;
struct ContiguousBlockGemmProblem {
  TensorView a;         // [M, K] f8e4m3, stride(1) == 1
  TensorView a_scales;  // logical [M, k_blocks] in `a_scale_at.layout`, contiguous storage
  ScaleAddressing a_scale_at;
  TensorView b;          // [G, N, K] f8e4m3, stride(2) == 1
  TensorView b_scales;   // [G, ceil(N/128), ceil(K/128)] f32/bf16, any strides
  TensorView m_indices;  // [M] i32 on a's device (any stride)
  TensorView out;        // [M, N] f32/bf16/f16, stride(1) == 1
  int64_t groups = 0, m = 0, n = 0, k = 0;
  int num_threads = 0;
  void* stream = nullptr;
  bool b_static = false;  // as BlockGemmProblem::b_static

  // Rows first .. first + rows - 1 times b[g], as block_fp8_gemm would receive them (the
  // activation scales keep M's addressing, from row `first`).
  BlockGemmProblem rows_of(int64_t g, int64_t first, int64_t rows) const {
    BlockGemmProblem p;
    p.a = a;
    p.out = out;
    p.a_scale_at = a_scale_at;
    p.a_scales = a_scales;
    p.b = plane_of(b, g);
    p.b_scales = plane_of(b_scales, g);
    p.m = m;
    p.n = n;
    p.k = k;
    p.k_blocks = fp8::ceil_div(k, kFp8BlockSize);
    p.n_blocks = fp8::ceil_div(n, kFp8BlockSize);
    p.num_threads = num_threads;
    p.stream = stream;
    p.b_static = b_static;
    return row_band(p, first, rows);
  }
};

// silu_and_mul_group_quant_fp8_masked: `groups` gated quantizations of one shape stacked along
// dimension 0 (DeepGEMM's masked layout); group g's rows are its first
// min(max(masked_m[g], 0), M), the rest of its q and scales unspecified after the call.
struct MaskedGatedQuantProblem {
  GroupQuantProblem first;  // group 0's plane (gated, M rows)
  int64_t groups = 0;
  int64_t x_stride = 0, q_stride = 0, scale_stride = 0;  // elements between groups' planes
  TensorView masked_m;                                   // [groups] i32 on x's device

  // Group g's problem on its first `rows` rows (the scales keep M's addressing).
  GroupQuantProblem group(int64_t g, int64_t rows) const {
    GroupQuantProblem p = first;
    const auto shifted = [&](const TensorView& t, int64_t stride, int64_t view_rows) {
      const int64_t shape[2] = {view_rows, t.size(1)};
      const int64_t strides[2] = {t.stride(0), t.stride(1)};
      return TensorView(static_cast<char*>(t.data()) + g * stride * dtype_size(t.dtype()),
                        t.dtype(), shape, strides, t.device());
    };
    p.x = shifted(first.x, x_stride, rows);
    p.q = shifted(first.q, q_stride, rows);
    p.scales = shifted(first.scales, scale_stride, first.scales.size(0));
    p.rows = rows;
    return p;
  }
};

// w8a8_block_fp8_linear: quantize x into the workspace (row-major f32 scales, group 128), then the
// GEMM of those against the weight. Both halves are complete problems of their own.
struct W8a8LinearProblem {
  GroupQuantProblem quant;
  BlockGemmProblem gemm;        // gemm.b_static is true: after the layer's own quantization kernel
  bool static_weights = false;  // the caller's promise (OpOptions): for a kernel that quantizes
                                // x itself and so follows the caller's previous kernel directly
};

// silu_and_mul_grouped_block_fp8_gemm_masked (an MoE down projection in DeepGEMM's masked layout):
// the gated quantization of x into the workspace (f32 scales column-major TMA-aligned per group,
// group 128), then the masked grouped GEMM of those against b. Both halves are complete problems of
// their own, sharing masked_m. Without a workspace their q and scales point at a placeholder
// address that no entry reads: the entries that run the halves apart need `workspace`, the fused
// one does not.
struct MaskedSiluGemmProblem {
  MaskedGatedQuantProblem quant;
  GroupedBlockGemmProblem gemm;  // gemm.b_static is true: after the op's own quantization
  bool workspace = false;        // quant.q and quant.scales are the caller's workspace
  bool static_weights = false;   // the caller's promise (OpOptions), for the fused entry
};

// block_quantize_weight: per 128 x 128 block of W, scale = max(amax, 1e-4) / 448.
struct BlockQuantizeWeightProblem {
  TensorView w;                 // [N, K] f32/bf16/f16, stride(1) == 1
  TensorView weight;            // [N, K] f8e4m3, stride(1) == 1
  TensorView weight_scale_inv;  // [ceil(N/128), ceil(K/128)] f32, any strides
  int64_t n = 0, k = 0;
  int num_threads = 0;
  void* stream = nullptr;
};
inline constexpr float kWeightAmaxFloor = 1e-4f;

// One entry of an FP8 op's dispatch table. supports() returns "" when it can serve the problem,
// else the reason it declines ("CPU lacks avx512f", "N=200 is not a multiple of 64").
template <class Problem>
using Fp8Implementation = Implementation<Problem>;
using GroupQuantImplementation = Fp8Implementation<GroupQuantProblem>;
using BlockGemmImplementation = Fp8Implementation<BlockGemmProblem>;
using W8a8LinearImplementation = Fp8Implementation<W8a8LinearProblem>;
using BlockQuantizeWeightImplementation = Fp8Implementation<BlockQuantizeWeightProblem>;
using GroupedBlockGemmImplementation = Fp8Implementation<GroupedBlockGemmProblem>;
using MaskedGatedQuantImplementation = Fp8Implementation<MaskedGatedQuantProblem>;
using MaskedSiluGemmImplementation = Fp8Implementation<MaskedSiluGemmProblem>;
using ContiguousBlockGemmImplementation = Fp8Implementation<ContiguousBlockGemmProblem>;

// The dispatch tables, fastest first (tests run every entry that serves against the reference).
std::span<const GroupQuantImplementation> group_quant_implementations();
std::span<const BlockGemmImplementation> block_gemm_implementations();
std::span<const W8a8LinearImplementation> w8a8_linear_implementations();
std::span<const BlockQuantizeWeightImplementation> block_quantize_weight_implementations();
std::span<const GroupedBlockGemmImplementation> grouped_block_gemm_implementations();
std::span<const MaskedGatedQuantImplementation> masked_gated_quant_implementations();
std::span<const MaskedSiluGemmImplementation> masked_silu_gemm_implementations();
std::span<const ContiguousBlockGemmImplementation> contiguous_block_gemm_implementations();

// Validation against spec/fp8.md (throws Error naming the argument and value, before anything is
// written) into problems. `op` names the caller in messages. gated: x is [M, 2K], gate then up
// halves (silu_and_mul_group_quant_fp8).
GroupQuantProblem make_group_quant_problem(const char* op, const TensorView& x, const TensorView& q,
                                           const TensorView& scales, const GroupQuantConfig& config,
                                           const OpOptions& options, bool gated = false);
BlockGemmProblem make_block_gemm_problem(const char* op, const TensorView& a,
                                         const TensorView& a_scales, ScaleLayout a_scales_layout,
                                         const TensorView& b, const TensorView& b_scales,
                                         const std::optional<TensorView>& bias,
                                         const TensorView& out, const OpOptions& options);
W8a8LinearProblem make_w8a8_linear_problem(const char* op, const TensorView& x,
                                           const TensorView& weight,
                                           const TensorView& weight_scale_inv,
                                           const std::optional<TensorView>& bias,
                                           const TensorView& y, void* workspace,
                                           size_t workspace_bytes, const OpOptions& options);
GroupedBlockGemmProblem make_grouped_block_gemm_problem(
    const char* op, const TensorView& a, const TensorView& a_scales, ScaleLayout a_scales_layout,
    const TensorView& b, const TensorView& b_scales, const TensorView& out,
    const OpOptions& options);
ContiguousBlockGemmProblem make_contiguous_block_gemm_problem(
    const char* op, const TensorView& a, const TensorView& a_scales, ScaleLayout a_scales_layout,
    const TensorView& b, const TensorView& b_scales, const TensorView& m_indices,
    const TensorView& out, const OpOptions& options);
BlockQuantizeWeightProblem make_block_quantize_weight_problem(const char* op, const TensorView& w,
                                                              const TensorView& weight,
                                                              const TensorView& weight_scale_inv,
                                                              const OpOptions& options);

}  // namespace moekit
