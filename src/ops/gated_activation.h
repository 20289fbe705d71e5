// The host backends' way to silu_and_mul_group_quant_fp8 (GroupQuantProblem::gated): the f32
// activations silu(gate) * up as a tensor of their own, then the plain quantization of it. The
// same math as the GPU's kernel, which computes them in registers (silu_math.h).
#pragma once

#include "moekit/dtype.h"
#include "moekit/tensor.h"
#include "ops/fp8_problem.h"
#include "ops/silu_math.h"

namespace moekit {

// y [M, K] f32 on the host for a gated problem, and the plain problem over it (y must outlive it).
inline GroupQuantProblem gated_as_plain(const GroupQuantProblem& p, Tensor& y) {
  y = Tensor::empty(DType::f32, {p.rows, p.cols});
  const DType dtype = p.x.dtype();
  for (int64_t m = 0; m < p.rows; ++m) {
    const int64_t row = m * p.x.stride(0);
    float* out = y.data_as<float>() + m * p.cols;
    for (int64_t k = 0; k < p.cols; ++k)
      out[k] = silu_and_mul_f32(load_as_f32(p.x.data(), dtype, row + k),
                                load_as_f32(p.x.data(), dtype, row + p.cols + k));
  }
  GroupQuantProblem plain = p;
  plain.x = y;
  plain.gated = false;
  return plain;
}

}  // namespace moekit
