// e4m3 -> bf16 decoders of the packed GEMMs on bf16 products (fp8_cpu_avx512bf16.cpp and
// fp8_cpu_amx.cpp; include only from files built with -mavx512bw -mavx512vl -mavx512bf16 -mf16c).
// Unnamed namespace: each ISA file gets its own copy (see "Linkage" in fp8_cpu_kernels.h).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace moekit::cpu {
namespace {  // NOLINT(build/namespaces): deliberately per translation unit

// 32 e4m3 bytes -> 32 bf16 holding value x 2^-8, exactly, in integer steps: a normal byte's bf16
// is its magnitude bits shifted into place (exponent e + 112 = e - 7 - 8 + 127, mantissa m << 4);
// the eight subnormal magnitudes (m x 2^-17 after the scaling, bf16 normals) come from a table;
// then the sign. NaN bytes (0x7f, 0xff) become bf16 NaN 0x7fc0, so NaN propagates through the
// products as in the f32 kernel. The same bits as the F16C decode (f16 bits, cvtph2ps,
// cvtne2ps2bf16) it replaced, checked for all 256 bytes; fewer and cheaper instructions.
inline __m512i decode32(__m256i bytes) {
  const __m512i x = _mm512_cvtepu8_epi16(bytes);
  const __m512i magnitude = _mm512_and_si512(x, _mm512_set1_epi16(0x7f));
  __m512i bf16 = _mm512_add_epi16(_mm512_slli_epi16(magnitude, 4), _mm512_set1_epi16(112 << 7));
  // bf16 of m x 2^-17 for m = 0..7 (lanes 0..7; the rest unused).
  const __m512i subnormals =
      _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,  //
                       0x3860, 0x3840, 0x3820, 0x3800, 0x37c0, 0x3780, 0x3700, 0);
  bf16 = _mm512_mask_permutexvar_epi16(
      bf16, _mm512_cmplt_epu16_mask(magnitude, _mm512_set1_epi16(8)), magnitude, subnormals);
  bf16 = _mm512_or_si512(bf16, _mm512_slli_epi16(_mm512_and_si512(x, _mm512_set1_epi16(0x80)), 8));
  return _mm512_mask_mov_epi16(bf16, _mm512_cmpeq_epi16_mask(magnitude, _mm512_set1_epi16(0x7f)),
                               _mm512_set1_epi16(0x7fc0));
}

// len <= 128 bytes -> ceil(len / 32) * 32 bf16 (zero past len), i.e. ceil(len / 32) * 16 pairs.
inline void decode_row(const uint8_t* src, int len, uint16_t* dst) {
  int i = 0;
  for (; i + 32 <= len; i += 32)
    _mm512_storeu_si512(dst + i,
                        decode32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
  if (i < len) {  // masked load: the bytes past len read as zero and are never touched
    const __mmask32 keep = (1u << (len - i)) - 1u;
    _mm512_storeu_si512(dst + i, decode32(_mm256_maskz_loadu_epi8(keep, src + i)));
  }
}

}  // namespace
}  // namespace moekit::cpu
