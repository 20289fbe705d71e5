// Reference FP8: spec/fp8.md written as code, one element at a time, in f32.
#include "reference/fp8_reference.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <vector>

#include "moekit/tensor.h"
#include "ops/gated_activation.h"

namespace moekit::reference {
namespace {

float x_at(const TensorView& t, int64_t row, int64_t col) {
  return load_as_f32(t.data(), t.dtype(), row * t.stride(0) + col * t.stride(1));
}

void store_at(const TensorView& t, int64_t row, int64_t col, float v) {
  store_from_f32(t.data(), t.dtype(), row * t.stride(0) + col * t.stride(1), v);
}

// max(|x|) over a run, NaN ignored (std::max keeps its first argument when the second is NaN).
float amax_of_row_run(const TensorView& x, int64_t row, int64_t begin, int64_t end) {
  float amax = 0.0f;
  for (int64_t k = begin; k < end; ++k) amax = std::max(amax, std::fabs(x_at(x, row, k)));
  return amax;
}

}  // namespace

float ue8m0_round_up(float scale) {
  const uint32_t bits = std::bit_cast<uint32_t>(scale);
  const uint32_t exponent = bits >> 23;
  const uint32_t mantissa = bits & 0x7fffffu;
  if (mantissa == 0) return scale;  // already a power of two (or zero, or inf)
  // A subnormal's power of two above it is its mantissa's (2^23 lands on the smallest normal).
  if (exponent == 0) return std::bit_cast<float>(std::bit_ceil(mantissa));
  return std::bit_cast<float>((exponent + 1) << 23);
}

float group_scale(float amax, float eps, bool ue8m0) {
  amax = std::max(amax, eps);
  const float scale = amax / kFp8E4m3Max;
  return ue8m0 ? ue8m0_round_up(scale) : scale;
}

void per_token_group_quant_fp8(const GroupQuantProblem& p) {
  if (p.gated) {  // the f32 activations silu(gate) * up, then their plain quantization
    Tensor activations;
    per_token_group_quant_fp8(gated_as_plain(p, activations));
    return;
  }
  const int64_t G = p.groups;
  std::vector<float> row_scales(static_cast<size_t>(G));
  for (int64_t m = 0; m < p.rows; ++m) {
    for (int64_t g = 0; g < G; ++g) {
      const int64_t begin = g * p.group_size;
      const int64_t end = std::min(begin + p.group_size, p.cols);
      const float scale = group_scale(amax_of_row_run(p.x, m, begin, end), p.eps, p.ue8m0);
      for (int64_t k = begin; k < end; ++k)
        store_at(p.q, m, k, x_at(p.x, m, k) / scale);  // true division, then RNE + saturation
      row_scales[static_cast<size_t>(g)] = scale;
    }
    if (!p.scale_at.packed()) {
      for (int64_t g = 0; g < G; ++g)
        p.scales.data_as<float>()[p.scale_at.offset(m, g)] = row_scales[static_cast<size_t>(g)];
      continue;
    }
    // Packed UE8M0: byte j of word w is the exponent byte of group 4w + j (0 past the last group).
    for (int64_t w = 0; w * 4 < G; ++w) {
      uint32_t word = 0;
      for (int64_t j = 0; j < 4 && 4 * w + j < G; ++j) {
        const uint32_t exponent_byte =
            std::bit_cast<uint32_t>(row_scales[static_cast<size_t>(4 * w + j)]) >> 23;
        word |= exponent_byte << (8 * j);
      }
      p.scales.data_as<uint32_t>()[p.scale_at.offset(m, 4 * w)] = word;
    }
  }
}

void block_fp8_gemm(const BlockGemmProblem& p) {
  const TensorView& bs = p.b_scales;
  // The operands' rows are decoded to f32 (x_at's values) once per pass of up to kPassRows rows
  // of a, not once per product: only the time changes. Each output element still sums its
  // k-blocks, and each block its products, in order.
  constexpr int64_t kPassRows = 64;
  const auto K = static_cast<size_t>(p.k);
  std::vector<float> a_rows(static_cast<size_t>(std::min(p.m, kPassRows)) * K), b_row(K);
  for (int64_t m0 = 0; m0 < p.m; m0 += kPassRows) {
    const int64_t rows = std::min(kPassRows, p.m - m0);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t k = 0; k < p.k; ++k) a_rows[r * p.k + k] = x_at(p.a, m0 + r, k);
    for (int64_t n = 0; n < p.n; ++n) {
      for (int64_t k = 0; k < p.k; ++k) b_row[k] = x_at(p.b, n, k);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t m = m0 + r;
        const float* a_row = a_rows.data() + r * p.k;
        float total = 0.0f;
        for (int64_t kb = 0; kb < p.k_blocks; ++kb) {
          const int64_t begin = kb * kFp8BlockSize;
          const int64_t end = std::min(begin + kFp8BlockSize, p.k);
          float partial = 0.0f;  // a missing tail of a partial block contributes zeros
          for (int64_t k = begin; k < end; ++k) partial += a_row[k] * b_row[k];
          const float a_scale = read_scale(p.a_scales.data(), p.a_scale_at, m, kb);
          const float b_scale = x_at(bs, n / kFp8BlockSize, kb);
          total += partial * a_scale * b_scale;
        }
        if (p.has_bias()) total += load_as_f32(p.bias.data(), p.bias.dtype(), n * p.bias.stride(0));
        store_at(p.out, m, n, total);  // the one rounding to the out dtype
      }
    }
  }
}

void w8a8_block_fp8_linear(const W8a8LinearProblem& p) {
  per_token_group_quant_fp8(p.quant);
  block_fp8_gemm(p.gemm);
}

void block_quantize_weight(const BlockQuantizeWeightProblem& p) {
  const int64_t row_blocks = fp8::ceil_div(p.n, kFp8BlockSize);
  const int64_t col_blocks = fp8::ceil_div(p.k, kFp8BlockSize);
  for (int64_t nb = 0; nb < row_blocks; ++nb) {
    for (int64_t kb = 0; kb < col_blocks; ++kb) {
      const int64_t n0 = nb * kFp8BlockSize, n1 = std::min(n0 + kFp8BlockSize, p.n);
      const int64_t k0 = kb * kFp8BlockSize, k1 = std::min(k0 + kFp8BlockSize, p.k);
      float amax = 0.0f;
      for (int64_t n = n0; n < n1; ++n) amax = std::max(amax, amax_of_row_run(p.w, n, k0, k1));
      const float scale = std::max(amax, kWeightAmaxFloor) / kFp8E4m3Max;
      for (int64_t n = n0; n < n1; ++n)
        for (int64_t k = k0; k < k1; ++k) store_at(p.weight, n, k, x_at(p.w, n, k) / scale);
      store_at(p.weight_scale_inv, nb, kb, scale);
    }
  }
}

}  // namespace moekit::reference
