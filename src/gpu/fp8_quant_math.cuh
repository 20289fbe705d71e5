// The scalar steps of group quantization (spec/fp8.md, per_token_group_quant_fp8) and of SiLU-and-mul
// before it, shared by the quantization kernels (fp8_quant_gpu.cu) and the Hopper kernels that
// quantize their activations inside the GEMM (fp8_gemm_sm90.cu: the linear layer, the MoE down
// projection), so that all write the same bytes and scales as the reference: amax in f32 with NaN ignored (fmaxf), the scale by a true f32 division, q =
// e4m3(x / scale) from the correctly rounded f32 quotient.
#pragma once

#include <cstdint>

#include "gpu/vendor.h"
#include "moekit/ops/fp8.h"
#include "ops/silu_math.h"

namespace moekit::gpu {

enum class Wide : int { f32, f16, bf16 };  // the element types x and w may have

constexpr int kChunk = 8;  // elements a lane loads and converts at a time

// The bits of 8 consecutive elements: 8 f32 words, or 4 words of 16-bit pairs (low half first).
template <Wide kType>
struct RawChunk {
  uint32_t w[kType == Wide::f32 ? 8 : 4];
};

template <Wide kType>
__device__ __forceinline__ void decode_raw(const RawChunk<kType>& r, float (&v)[kChunk]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if constexpr (kType == Wide::f32) {
      v[2 * j] = __uint_as_float(r.w[2 * j]);
      v[2 * j + 1] = __uint_as_float(r.w[2 * j + 1]);
    } else if constexpr (kType == Wide::bf16) {
      v[2 * j] = __uint_as_float(r.w[j] << 16);
      v[2 * j + 1] = __uint_as_float(r.w[j] & 0xffff0000u);
    } else {
      v[2 * j] = vendor::half_bits_to_float(static_cast<uint16_t>(r.w[j]));
      v[2 * j + 1] = vendor::half_bits_to_float(static_cast<uint16_t>(r.w[j] >> 16));
    }
  }
}

// max(amax, |v|) over the chunk's values, each found as decode_raw finds it but by other
// operations (|v| straight from the bits), so that the compiler does not keep the decoded values
// for the division that decodes them again.
template <Wide kType>
__device__ __forceinline__ float chunk_amax(const RawChunk<kType>& r, float amax) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if constexpr (kType == Wide::f32) {
      amax = fmaxf(amax, fabsf(__uint_as_float(r.w[2 * j])));
      amax = fmaxf(amax, fabsf(__uint_as_float(r.w[2 * j + 1])));
    } else if constexpr (kType == Wide::bf16) {
      amax = fmaxf(amax, fabsf(__uint_as_float(__byte_perm(r.w[j], 0u, 0x1044))));  // low << 16
      amax = fmaxf(amax, __uint_as_float(r.w[j] & 0x7fff0000u));
    } else {
      amax = fmaxf(amax, vendor::half_bits_to_float(static_cast<uint16_t>(r.w[j] & 0x7fffu)));
      amax = fmaxf(amax, vendor::half_bits_to_float(static_cast<uint16_t>(r.w[j] >> 16 & 0x7fffu)));
    }
  }
  return amax;
}

// x / scale, the f32 division rounded to nearest, computed as CUDA's own division (div.rn.f32)
// computes it: a refined reciprocal r of the divisor, q = x * r, then q -= (scale * q - x) * r.
// That sequence is exact whenever the operands pass its range check (FCHK, else a slow path);
// here the divisor's half runs once per group, and the range holds by construction: a scale in
// [2^-60, 2^60] and |x| >= 2^-80 keep x, scale and the quotient far from overflow and underflow.
// A smaller |x| makes |x / scale| < 2^-20, whose e4m3 byte is a zero of x's sign; the sequence
// then returns a value below 2^-18 of x's sign (the residual's rounding error, at most half the
// least subnormal, times r is at most half of |x| * r), and the negated residual keeps -0 a -0
// (-0 - r * (+0)). A scale outside the range is brought into it by a power of two, 2^100 or
// 2^-100, and x with it: x * 2^100 is exact, and x * 2^-100 rounds only where |x / scale| < 2^-86
// (a zero byte, of x's sign still). A power of two (every ue8m0 scale) multiplies by its
// reciprocal, which is exact and so is the division; 0, inf and NaN multiply by 1 / scale too.
// No path calls a division routine, which would spill a unit's values around the call.
struct GroupDivisor {
  float scale;
  bool power_of_two;  // in [2^-126, 2^126]: x * (1 / scale), the reciprocal exact, is x / scale
  bool fast;          // in [2^-60, 2^60]: divide_fast is exact
};

__device__ __forceinline__ GroupDivisor divisor_for(float scale) {
  const uint32_t bits = __float_as_uint(scale);
  GroupDivisor d;
  d.scale = scale;
  d.power_of_two = (bits & 0x7fffffu) == 0 && bits - 0x00800000u <= 0x7e000000u;
  d.fast = bits - 0x21800000u <= 0x5d800000u - 0x21800000u;  // 2^-60 .. 2^60 (their bits)
  return d;
}

// The refined reciprocal of a scale in [2^-60, 2^60] (CUDA's division's own: rcp.approx and one
// Newton step). The estimate is the hardware's in this range, without __fdividef's subnormal guard.
__device__ __forceinline__ float refined_reciprocal(float scale) {
  const float approximate = vendor::reciprocal_estimate(scale);
  return __fmaf_rn(approximate, __fmaf_rn(approximate, -scale, 1.0f), approximate);
}

// x / scale for a scale in [2^-60, 2^60] and its refined reciprocal.
__device__ __forceinline__ float divide_fast(float x, float scale, float reciprocal) {
  const float q = __fmul_rn(x, reciprocal);
  return __fmaf_rn(-reciprocal, __fmaf_rn(q, scale, -x), q);
}

// Four quotients as e4m3 bytes of a word, the first in the low byte.
__device__ __forceinline__ uint32_t e4m3x4(float a, float b, float c, float d) {
  return vendor::e4m3x2_from_floats(a, b) | uint32_t{vendor::e4m3x2_from_floats(c, d)} << 16;
}

// Calls body(divide) with divide(x) == x / the divisor's scale: the branch on the divisor's kind
// is taken once for every value the body divides.
template <class Body>
__device__ __forceinline__ void with_divide(const GroupDivisor& d, Body&& body) {
  const float scale = d.scale;
  if (d.power_of_two) {
    const float reciprocal = __uint_as_float(0x7f000000u - __float_as_uint(scale));  // exact
    body([=](float x) { return __fmul_rn(x, reciprocal); });
  } else if (d.fast) {
    const float reciprocal = refined_reciprocal(scale);
    body([=](float x) { return divide_fast(x, scale, reciprocal); });
  } else if (scale > 0.0f && scale < INFINITY) {  // brought into the range, x with it
    const float prescale = scale < 0x1p-60f ? 0x1p100f : 0x1p-100f;
    const float divisor = scale * prescale, reciprocal = refined_reciprocal(divisor);
    body([=](float x) { return divide_fast(__fmul_rn(x, prescale), divisor, reciprocal); });
  } else {  // 0, inf or NaN (a scale is never negative): x * (1 / scale) is x / scale
    const float reciprocal = scale == 0.0f ? INFINITY : scale == INFINITY ? 0.0f : scale;
    body([=](float x) { return __fmul_rn(x, reciprocal); });
  }
}

// amax / 448 rounded to nearest f32 (amax >= 0), without a division routine: in f64, a * RN(1/448)
// corrected by its residual is a / 448 rounded to f64 (Markstein: exact for any f32 a, far from
// f64's limits), and rounding that to f32 gives the f32 quotient (double rounding is innocuous
// for a quotient of f32 numbers since 53 >= 2 * 24 + 2). The correction of inf would be NaN.
__device__ __forceinline__ float divide_by_e4m3_max(float amax) {
  constexpr double kReciprocal = 1.0 / static_cast<double>(kFp8E4m3Max);
  const double a = amax;
  const double q = __dmul_rn(a, kReciprocal);
  const double quotient = __fma_rn(-kReciprocal, __fma_rn(q, kFp8E4m3Max, -a), q);
  return amax == INFINITY ? amax : __double2float_rn(quotient);
}

// Steps 1-2 of the contract, exactly as reference::group_scale.
__device__ __forceinline__ float group_scale(float amax, float eps, bool ue8m0) {
  const float scale = divide_by_e4m3_max(fmaxf(amax, eps));
  if (!ue8m0) return scale;
  const uint32_t bits = __float_as_uint(scale);
  const uint32_t exponent = bits >> 23, mantissa = bits & 0x7fffffu;
  if (mantissa == 0) return scale;  // a power of two already (or inf)
  // A subnormal's power of two above it is its mantissa's: 1 << ceil(log2(mantissa)).
  if (exponent == 0) return __uint_as_float(1u << (32 - __clz(mantissa - 1)));
  return __uint_as_float((exponent + 1) << 23);
}

__device__ __forceinline__ float max_abs(const float (&v)[kChunk]) {
  float amax = 0.0f;  // fmaxf ignores a NaN operand, as std::max(amax, |x|) does
#pragma unroll
  for (int j = 0; j < kChunk; ++j) amax = fmaxf(amax, fabsf(v[j]));
  return amax;
}

// e4m3(v / scale) for the 8 values, true divisions, as two words of bytes.
__device__ __forceinline__ void quantize_chunk(const float (&v)[kChunk], const GroupDivisor& d,
                                               uint32_t& lo, uint32_t& hi) {
  with_divide(d, [&](auto divide) {
    lo = e4m3x4(divide(v[0]), divide(v[1]), divide(v[2]), divide(v[3]));
    hi = e4m3x4(divide(v[4]), divide(v[5]), divide(v[6]), divide(v[7]));
  });
}

// A lane's 8 values of a group whose kGroupLanes lanes (consecutive, a power of two) hold its
// values in turn: the group's amax (NaN ignored) by shuffles, its scale (returned), and the lane's
// 8 bytes in lo, hi. Every lane of the warp calls it (the shuffles).
template <int kGroupLanes>
__device__ __forceinline__ float quantize_group_chunk(const float (&v)[kChunk], float eps,
                                                      bool ue8m0, uint32_t& lo, uint32_t& hi) {
  float amax = max_abs(v);
#pragma unroll
  for (int offset = 1; offset < kGroupLanes; offset <<= 1)
    amax = fmaxf(amax, vendor::shfl_xor(amax, offset));
  const float scale = group_scale(amax, eps, ue8m0);
  quantize_chunk(v, divisor_for(scale), lo, hi);
  return scale;
}

// v[j] = silu_and_mul_f32(v[j], u[j]), the same bits. Each quotient takes the sequence the GPU's
// IEEE division takes after its range check (divide_fast: one refined reciprocal, one
// correction), which is exact for a denominator in [1, 2] and a numerator in [2^-80, 2^100]; the
// check and its branch per value (about 4 of ~35 instructions) become one vote of the warp: where
// any lane holds another numerator (0, tiny, huge, inf, NaN), the whole warp divides with the
// operator. Straight-line code also lets the 8 values' chains interleave.
__device__ __forceinline__ void silu_and_mul_chunk(float (&v)[kChunk], const float (&u)[kChunk]) {
  float numerator[kChunk], denominator[kChunk];
  bool usual = true;
#pragma unroll
  for (int j = 0; j < kChunk; ++j) {
    const SiluParts silu = silu_parts(v[j]);
    numerator[j] = silu.numerator, denominator[j] = silu.denominator;
    const float magnitude = fabsf(silu.numerator);
    usual = usual && magnitude >= 0x1p-80f && magnitude <= 0x1p100f;
  }
  if (!vendor::any(!usual)) {
#pragma unroll
    for (int j = 0; j < kChunk; ++j)
      v[j] = __fmul_rn(
          divide_fast(numerator[j], denominator[j], refined_reciprocal(denominator[j])), u[j]);
  } else {
#pragma unroll
    for (int j = 0; j < kChunk; ++j) v[j] = __fmul_rn(numerator[j] / denominator[j], u[j]);
  }
}

}  // namespace moekit::gpu
