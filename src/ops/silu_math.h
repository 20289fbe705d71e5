// SiLU-and-mul, the activation of a gated MLP (Qwen3's and DeepSeek's experts and dense MLPs):
// y = silu(gate) * up with silu(g) = g / (1 + e^-g), in f32. One definition for every backend
// (host C++ and CUDA device code include this), so that the reference, the CPU and the GPU write
// the same bits: the exponential is moekit's own (libm's expf and CUDA's differ in the last bit),
// built of fmaf, rintf and products with powers of two, which are correctly rounded or exact on
// both, and written with no a * b + c that a compiler could contract into an FMA on one side only.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MOEKIT_HOST_DEVICE __host__ __device__
#else
#define MOEKIT_HOST_DEVICE
#endif

namespace moekit {

// 2^k for -126 <= k <= 127, from its bits.
MOEKIT_HOST_DEVICE inline float power_of_two(int k) {
  const auto bits = static_cast<uint32_t>(k + 127) << 23;
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  return std::bit_cast<float>(bits);
#endif
}

// e^x in f32, within 2 ulp of the exact value (Cody-Waite reduction by ln 2, Cephes' degree-5
// polynomial on [-ln2/2, ln2/2]); +inf past 88.7228, and 0 below -87.3365 (where 1 + e^x is 1).
MOEKIT_HOST_DEVICE inline float exp_f32(float x) {
  if (x != x) return x;
  if (x > 88.7228317f) return INFINITY;
  if (x < -87.3365479f) return 0.0f;
  const float k = rintf(x * 1.44269502f);  // log2(e)
  float r = fmaf(-k, 0.693359375f, x);     // ln 2, high part (exact product)
  r = fmaf(-k, -2.12194440e-4f, r);        // ln 2, low part
  const float r2 = r * r;
  float p = 1.9875691500e-4f;
  p = fmaf(p, r, 1.3981999507e-3f);
  p = fmaf(p, r, 8.3334519073e-3f);
  p = fmaf(p, r, 4.1665795894e-2f);
  p = fmaf(p, r, 1.6666665459e-1f);
  p = fmaf(p, r, 5.0000001201e-1f);
  const float e_r = fmaf(p, r2, r) + 1.0f;
  // e_r * 2^k as two products by powers of two: the first exact, the second rounded once (to a
  // subnormal or inf at the ends), as ldexpf would (which costs more on the GPU).
  const int k_int = static_cast<int>(k);  // -126..128
  const int k1 = k_int / 2, k2 = k_int - k1;
  return e_r * power_of_two(k1) * power_of_two(k2);
}

// silu(gate) * up; NaN in either gives NaN, silu(-inf) is NaN (as -inf * sigmoid(-inf) in torch).
// Every NaN comes out as the one positive quiet NaN: x86 passes an operand's NaN on with its sign
// (which of two depends on the compiler's operand order), NVIDIA GPUs return this canonical one,
// so the quantized byte of a NaN is 0x7f on every backend.
MOEKIT_HOST_DEVICE inline float silu_and_mul_f32(float gate, float up) {
  const float silu = gate / (1.0f + exp_f32(-gate));
  const float y = silu * up;
#if defined(__CUDA_ARCH__)
  return y != y ? __uint_as_float(0x7fc00000u) : y;
#else
  return y != y ? std::bit_cast<float>(0x7fc00000u) : y;
#endif
}

}  // namespace moekit
