// The AVX2 (+FMA, F16C) vector abstraction of fp8_cpu_kernels.h. Included by fp8_cpu_avx2.cpp and
// by fp8_cpu_avx512.cpp, which reuses its 8-lane decoders and transpose; both are compiled with the
// ISA flags this needs. Internal linkage, as fp8_cpu_kernels.h explains.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace moekit::cpu {
namespace {  // NOLINT(build/namespaces): deliberately per translation unit

// e4m3 -> f16 bits: sign to bit 15, the 7 exponent-mantissa bits to bits 13..7. As f16 (bias 15)
// that is the e4m3 value (bias 7) times 2^-8, subnormals included, so F16C converts it exactly.
// The NaN bytes 0x7f / 0xff become +-1.875 (480 / 256) and must be caught separately.
inline __m128i e4m3_to_f16_bits(__m128i bytes_in_high_halves) {
  // srai copies the sign into bit 14 as well; the mask clears that copy.
  return _mm_and_si128(_mm_srai_epi16(bytes_in_high_halves, 1), _mm_set1_epi16(-16385));  // ~0x4000
}
inline __m256i e4m3_to_f16_bits(__m256i bytes_in_high_halves) {
  return _mm256_and_si256(_mm256_srai_epi16(bytes_in_high_halves, 1), _mm256_set1_epi16(-16385));
}

// The f32 bits that load_e4m3_tiny keeps of a sign-extended byte shifted left by 20.
constexpr int kTinyMask = static_cast<int>(0x87f00000u);

// f32 lanes (as int32 bits) -> e4m3 codes in the low byte of each lane, exactly as
// moekit::f32_to_f8e4m3: RNE, saturation to 448, NaN -> 0x7f with the sign.
inline __m256i e4m3_codes(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i magnitude = _mm256_and_si256(bits, _mm256_set1_epi32(0x7fffffff));
  const __m256i sign = _mm256_srli_epi32(_mm256_andnot_si256(magnitude, bits), 24);
  // At or above 2^-6 (normal in e4m3): rebias the exponent and round away 20 mantissa bits.
  const __m256i rebased = _mm256_sub_epi32(magnitude, _mm256_set1_epi32(120 << 23));
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(rebased, 20), _mm256_set1_epi32(1));
  const __m256i normal = _mm256_srli_epi32(
      _mm256_add_epi32(_mm256_add_epi32(rebased, _mm256_set1_epi32(0x7ffff)), odd), 20);
  // Below: the f32 addition rounds |v| to a multiple of 2^-9 (the ulp of 2^14), nearest even.
  const __m256 shifted = _mm256_add_ps(_mm256_castsi256_ps(magnitude), _mm256_set1_ps(16384.0f));
  const __m256i subnormal =
      _mm256_sub_epi32(_mm256_castps_si256(shifted), _mm256_set1_epi32(0x46800000));
  const __m256i is_normal = _mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32((121 << 23) - 1));
  __m256i code = _mm256_blendv_epi8(subnormal, normal, is_normal);
  code = _mm256_min_epu32(code, _mm256_set1_epi32(0x7e));
  const __m256i is_nan = _mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(0x7f800000));
  code = _mm256_blendv_epi8(code, _mm256_set1_epi32(0x7f), is_nan);
  return _mm256_or_si256(code, sign);
}

struct Avx2 {
  static constexpr int kLanes = 8;
  static constexpr int kProbeBytes = 32;
  static constexpr int kRegisters = 16;
  static constexpr int kMicroRows = 6;  // 6 x 16 accumulators: 12 of the 16 registers
  using F = __m256;

  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  // An empty asm that claims to change v: v stays in a register instead of being folded into
  // every instruction that reads it as a memory operand.
  static void keep_in_register(F& v) { __asm__("" : "+x"(v)); }
  static F div(F a, F b) { return _mm256_div_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static float reduce_add(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static float reduce_max(F v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
  }

  static F load_f16(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static F load_bf16(const uint16_t* p) {
    const __m256i wide =
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
  static F abs(F v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v); }
  static F neg(F v) { return _mm256_xor_ps(v, _mm256_set1_ps(-0.0f)); }
  // g >= 0 ? a : b per lane (b where g is NaN).
  static F select_nonnegative(F g, F a, F b) {
    return _mm256_blendv_ps(b, a, _mm256_cmp_ps(g, _mm256_setzero_ps(), _CMP_GE_OQ));
  }
  // 2^k from j = 1.5 * 2^23 + k: k + 127 in the exponent field, 0 where that is <= 0.
  static F power_of_two_of_shifted(F j) {
    const __m256i field =
        _mm256_add_epi32(_mm256_castps_si256(j), _mm256_set1_epi32(127 - 0x4B400000));
    return _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_max_epi32(field, _mm256_setzero_si256()), 23));
  }
  // Every NaN lane as the positive quiet NaN 0x7fc00000.
  static F canonical_nan(F v) {
    return _mm256_blendv_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc00000)),
                            _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  // maxps returns its second operand when either is NaN: a NaN v leaves acc as it was.
  static F max_ignoring_nan(F acc, F v) { return _mm256_max_ps(v, acc); }
  static void store_e4m3(uint8_t* dst, F v) {
    const __m256i code = e4m3_codes(v);
    const __m128i words =
        _mm_packus_epi32(_mm256_castsi256_si128(code), _mm256_extracti128_si256(code, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), _mm_packus_epi16(words, words));
  }

  // NaN bytes seen so far: the signed byte max reaches 0x7f, the unsigned one 0xff.
  struct Probe {
    __m256i signed_max, unsigned_max;
  };
  static Probe probe_init() { return {_mm256_set1_epi8(-128), _mm256_setzero_si256()}; }
  static bool probe_found_nan(const Probe& p) {
    const __m256i pos = _mm256_cmpeq_epi8(p.signed_max, _mm256_set1_epi8(0x7f));
    const __m256i neg = _mm256_cmpeq_epi8(p.unsigned_max, _mm256_set1_epi8(-1));
    return _mm256_movemask_epi8(_mm256_or_si256(pos, neg)) != 0;
  }

  // Notes NaN bytes among kProbeBytes bytes.
  static void probe_bytes(Probe& probe, const uint8_t* src) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
    probe.signed_max = _mm256_max_epi8(probe.signed_max, raw);
    probe.unsigned_max = _mm256_max_epu8(probe.unsigned_max, raw);
  }
  // 8 bytes -> their values x 2^-120, as f32 bits (sign << 31 | (b & 0x7f) << 20): sign-extend,
  // shift, mask. e4m3 subnormals become f32 subnormals, exact as long as denormals are not flushed
  // (KeepDenormals); NaN bytes become finite and are caught by probe_bytes.
  static F load_e4m3_tiny(const uint8_t* src) {
    const __m256i wide =
        _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src)));
    return _mm256_castsi256_ps(
        _mm256_and_si256(_mm256_slli_epi32(wide, 20), _mm256_set1_epi32(kTinyMask)));
  }

  // len <= 128 bytes -> ceil(len / 16) * 16 floats (value * 2^-8; zero past len; NaN exact).
  static void convert_e4m3_row(const uint8_t* src, int len, float* dst) {
    __m128i signed_max = _mm_set1_epi8(-128), unsigned_max = _mm_setzero_si128();
    auto convert16 = [&](__m128i bytes, float* out) {
      signed_max = _mm_max_epi8(signed_max, bytes);
      unsigned_max = _mm_max_epu8(unsigned_max, bytes);
      const __m128i lo = e4m3_to_f16_bits(_mm_unpacklo_epi8(_mm_setzero_si128(), bytes));
      const __m128i hi = e4m3_to_f16_bits(_mm_unpackhi_epi8(_mm_setzero_si128(), bytes));
      _mm256_storeu_ps(out, _mm256_cvtph_ps(lo));
      _mm256_storeu_ps(out + 8, _mm256_cvtph_ps(hi));
    };
    int i = 0;
    for (; i + 16 <= len; i += 16)
      convert16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)), dst + i);
    if (i < len) {
      alignas(16) uint8_t tail[16] = {};
      std::memcpy(tail, src + i, static_cast<size_t>(len - i));
      convert16(_mm_load_si128(reinterpret_cast<const __m128i*>(tail)), dst + i);
    }
    const __m128i pos = _mm_cmpeq_epi8(signed_max, _mm_set1_epi8(0x7f));
    const __m128i neg = _mm_cmpeq_epi8(unsigned_max, _mm_set1_epi8(-1));
    if (_mm_movemask_epi8(_mm_or_si128(pos, neg)) != 0) {  // rare
      const uint32_t nan_bits = 0x7fc00000u;
      float nan;
      std::memcpy(&nan, &nan_bits, 4);
      for (int k = 0; k < len; ++k)
        if ((src[k] & 0x7f) == 0x7f) dst[k] = nan;
    }
  }

  static void transpose_8x8(const float* src, int64_t src_stride, float* dst, int64_t dst_stride) {
    __m256 r[8], t[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * src_stride);
    for (int i = 0; i < 8; i += 2) {
      t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
      r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
      r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
      r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
      r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int i = 0; i < 4; ++i) {
      _mm256_storeu_ps(dst + i * dst_stride, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
      _mm256_storeu_ps(dst + (i + 4) * dst_stride, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
    }
  }
};

}  // namespace
}  // namespace moekit::cpu
