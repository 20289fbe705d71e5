// The host backends' way to silu_and_mul_group_quant_fp8 (GroupQuantProblem::gated): the f32
// activations silu(gate) * up as a tensor of their own, then the plain quantization of it. The
// same math as the GPU's kernel, which computes them in registers (silu_math.h).
#pragma once

#include "moekit/dtype.h"
#include "moekit/tensor.h"
#include "ops/fp8_problem.h"
#include "ops/silu_math.h"

namespace moekit {

// Row m's activations silu(gate) * up of a gated problem into out[0, K).
inline void gated_row(const GroupQuantProblem& p, int64_t m, float* out) {
  const int64_t row = m * p.x.stride(0), K = p.cols;
  switch (p.x.dtype()) {
    case DType::f32: {
      const float* x = p.x.data_as<const float>() + row;
      for (int64_t k = 0; k < K; ++k) out[k] = silu_and_mul_f32(x[k], x[K + k]);
      return;
    }
    case DType::bf16: {
      const auto* x = p.x.data_as<const uint16_t>() + row;
      for (int64_t k = 0; k < K; ++k)
        out[k] = silu_and_mul_f32(bf16_to_f32(x[k]), bf16_to_f32(x[K + k]));
      return;
    }
    default:
      for (int64_t k = 0; k < K; ++k)
        out[k] = silu_and_mul_f32(load_as_f32(p.x.data(), p.x.dtype(), row + k),
                                  load_as_f32(p.x.data(), p.x.dtype(), row + K + k));
  }
}

// A host tensor y [M, K] f32 for a gated problem's activations (filled by the caller, e.g. with
// gated_row), and the plain problem over it (y must outlive it).
inline GroupQuantProblem plain_over(const GroupQuantProblem& p, Tensor& y) {
  y = Tensor::empty(DType::f32, {p.rows, p.cols});
  GroupQuantProblem plain = p;
  plain.x = y;
  plain.gated = false;
  return plain;
}

// The same with y filled row after row (the reference's way).
inline GroupQuantProblem gated_as_plain(const GroupQuantProblem& p, Tensor& y) {
  GroupQuantProblem plain = plain_over(p, y);
  for (int64_t m = 0; m < p.rows; ++m) gated_row(p, m, y.data_as<float>() + m * p.cols);
  return plain;
}

}  // namespace moekit
