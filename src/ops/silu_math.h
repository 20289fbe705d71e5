// SiLU-and-mul, the activation of a gated MLP (Qwen3's and DeepSeek's experts and dense MLPs):
// y = silu(gate) * up with silu(g) = g / (1 + e^-g), in f32. One definition for every backend
// (host C++ and CUDA device code include this), so that the reference, the CPU and the GPU write
// the same bits: the exponential is moekit's own (libm's expf and CUDA's differ in the last bit),
// built of fmaf, sums, products and bit shifts, which are correctly rounded or exact on both, with
// every product and sum rounded on its own (mul_rn, add_rn), so that no compiler contracts them
// into an FMA on one side only.
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

// The bits of a float, and a float of bits, on the host and the device.
MOEKIT_HOST_DEVICE inline uint32_t bits_of(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  return std::bit_cast<uint32_t>(x);
#endif
}

MOEKIT_HOST_DEVICE inline float float_of(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  return std::bit_cast<float>(bits);
#endif
}

// a * b and a + b rounded on their own: nvcc would otherwise contract a product and a later sum
// into one FMA (the host compiles with contraction off: ISO C++, no -ffp-contract=fast).
MOEKIT_HOST_DEVICE inline float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

MOEKIT_HOST_DEVICE inline float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// e^x in f32 for x <= 0 (SiLU only needs e^-|g|), within 2 ulp of the exact value where that is
// normal (Cody-Waite reduction by ln 2, Cephes' degree-5 polynomial on [-ln2/2, ln2/2]); 0 where
// round(x / ln 2) < -126 (x below about -87.7: the value would be subnormal) and for -inf and NaN
// (clamped to -104 first; SiLU passes a NaN gate on through its numerator). No float-to-int
// conversion and one scaling product: k = round(x / ln 2) comes out of one fmaf with 1.5 * 2^23,
// whose bits hold k, so 2^k is a shift of them, and e_r * 2^k rounds once (to a subnormal at k =
// -126). About 15 instructions on a GPU.
MOEKIT_HOST_DEVICE inline float exp_nonpositive_f32(float x) {
  constexpr float kShifter = 12582912.0f;  // 1.5 * 2^23: j = kShifter + k has k in its low bits
  const float clamped = fmaxf(x, -104.0f);
  const float j = fmaf(clamped, 1.44269502f, kShifter);  // log2(e); rounds to an integer
  const float k = add_rn(j, -kShifter);                  // exact, -150..0
  float r = fmaf(-k, 0.693359375f, clamped);             // ln 2, high part (exact product)
  r = fmaf(-k, -2.12194440e-4f, r);                      // ln 2, low part
  const float r2 = mul_rn(r, r);
  float p = 1.9875691500e-4f;
  p = fmaf(p, r, 1.3981999507e-3f);
  p = fmaf(p, r, 8.3334519073e-3f);
  p = fmaf(p, r, 4.1665795894e-2f);
  p = fmaf(p, r, 1.6666665459e-1f);
  p = fmaf(p, r, 5.0000001201e-1f);
  const float e_r = add_rn(fmaf(p, r2, r), 1.0f);
  // 2^k: k + 127 in the exponent field (bits(j) = bits(kShifter) + k), or 0 where that is <= 0.
  const int field = static_cast<int>(bits_of(j) - 0x4B400000u) + 127;
  return mul_rn(e_r, float_of(static_cast<uint32_t>(field > 0 ? field : 0) << 23));
}

// silu(g) = g / (1 + e^-g) as a numerator and a denominator in [1, 2], so that the exponential
// never overflows: g / (1 + t) for g >= 0 and g * t / (1 + t) below, with t = e^-|g| in [0, 1].
struct SiluParts {
  float numerator, denominator;
};

MOEKIT_HOST_DEVICE inline SiluParts silu_parts(float gate) {
  const float t = exp_nonpositive_f32(-fabsf(gate));
  return {gate >= 0.0f ? gate : mul_rn(gate, t), add_rn(1.0f, t)};
}

// silu(gate) * up, the quotient of silu_parts rounded once (IEEE division); NaN in either gives
// NaN, silu(-inf) is NaN (as -inf * sigmoid(-inf) in torch). Every NaN comes out as the one
// positive quiet NaN: x86 passes an operand's NaN on with its sign (which of two depends on the
// compiler's operand order), NVIDIA GPUs return this canonical one, so the quantized byte of a NaN
// is 0x7f on every backend.
MOEKIT_HOST_DEVICE inline float silu_and_mul_f32(float gate, float up) {
  const SiluParts silu = silu_parts(gate);
  const float y = mul_rn(silu.numerator / silu.denominator, up);
#if defined(__CUDA_ARCH__)
  return y;  // a NaN here came out of an NVIDIA GPU's product: the canonical one already
#else
  return y != y ? float_of(0x7fc00000u) : y;
#endif
}

}  // namespace moekit
