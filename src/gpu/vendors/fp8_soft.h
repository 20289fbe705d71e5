// FP8 (OCP e4m3fn) conversions in integer code, exactly as moekit/dtype.h defines them, for
// architectures without conversion instructions: every vendor header includes this after its own
// names, so the CUDA spellings below (__float_as_uint, __byte_perm, __half2) are the vendor's.
#pragma once

#include <cstdint>
#include <cstring>

namespace moekit::gpu::vendor::fp8_soft {

// f32 -> e4m3 byte: round to nearest even, saturating to +-448 (inf included), NaN to sign|0x7f.
__device__ __forceinline__ uint32_t e4m3_from_float(float f) {
  const uint32_t u = __float_as_uint(f);
  const uint32_t sign = (u >> 24) & 0x80u;
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7fu;
  uint32_t magnitude;
  if (a >= (121u << 23)) {  // an e4m3 normal (>= 2^-6): rebias, round 20 mantissa bits away
    const uint32_t r = a - (120u << 23);
    magnitude = (r + 0x7ffffu + ((r >> 20) & 1u)) >> 20;
  } else {  // an e4m3 subnormal or zero: the significand in units of 2^-9
    const int e = static_cast<int>(a >> 23);
    const uint32_t significand = e != 0 ? ((a & 0x7fffffu) | 0x800000u) : a;
    const int shift = min(141 - max(e, 1), 31);
    magnitude = (significand + ((1u << (shift - 1)) - 1u) + ((significand >> shift) & 1u)) >> shift;
  }
  return sign | min(magnitude, 0x7eu);
}

// Two e4m3 bytes (low byte first) -> two f16 bit patterns (low half first), exactly.
__device__ __forceinline__ uint32_t e4m3x2_to_half2_bits(uint32_t pair) {
  // Each byte's 7 magnitude bits shifted into an f16 make value * 2^-8 (subnormals included);
  // the multiplication by 2^8 is exact.
  const uint32_t spread = __byte_perm(pair, 0u, 0x1404u);  // bytes [0, b0, 0, b1]
  const uint32_t scaled = (spread & 0x80008000u) | ((spread >> 1) & 0x3f803f80u);
  __half2 h;
  memcpy(&h, &scaled, 4);
  h = __hmul2(h, __floats2half2_rn(256.0f, 256.0f));
  uint32_t bits;
  memcpy(&bits, &h, 4);
  if ((pair & 0x7fu) == 0x7fu) bits = (bits & 0xffff0000u) | 0x7fffu;
  if ((pair & 0x7f00u) == 0x7f00u) bits = (bits & 0x0000ffffu) | 0x7fff0000u;
  return bits;
}

}  // namespace moekit::gpu::vendor::fp8_soft
