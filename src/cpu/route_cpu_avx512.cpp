// The routing kernel on 16 lanes of AVX-512 (f, bw, vl, dq). Compiled with -mavx512f -mavx512bw
// -mavx512vl -mavx512dq -mfma -mf16c -mbmi2; called only when cpu_features().avx512.
// GCC 12 reports the intentionally undefined vectors inside its own AVX-512 intrinsics
// (_mm512_undefined_ps) as uninitialized once they are inlined here.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>

#include "cpu/route_cpu_kernel.h"

namespace moekit::cpu {
namespace {

struct Avx512 {
  static constexpr int kWidth = 16;
  using F = __m512;
  using I = __m512i;
  using M = __mmask16;

  static F set1(float v) { return _mm512_set1_ps(v); }
  static I set1_i(int32_t v) { return _mm512_set1_epi32(v); }
  static F iota() { return _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0); }
  static I iota_i() {
    return _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  }

  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static void store_i(int32_t* p, I v) { _mm512_storeu_si512(p, v); }
  static F widen_bf16(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static F load_bf16(const uint16_t* p) {
    return widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static F load_f16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  // Partial loads read only the first n (< 16) elements (masked lanes never fault).
  static F load_partial(const float* p, int n) { return _mm512_maskz_loadu_ps(lanes_below(n), p); }
  static F load_bf16_partial(const uint16_t* p, int n) {
    return widen_bf16(_mm256_maskz_loadu_epi16(lanes_below(n), p));
  }
  static F load_f16_partial(const uint16_t* p, int n) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes_below(n), p));
  }

  // glibc's expf on eight doubles (see kExp2fTable).
  static __m512d exp_as_libm(__m512d x) {
    const __m512d z = _mm512_mul_pd(_mm512_set1_pd(kExpfInvLn2N), x);
    __m512d k = _mm512_add_pd(z, _mm512_set1_pd(kExpfShift));
    const __m512i k_bits = _mm512_castpd_si512(k);
    k = _mm512_sub_pd(k, _mm512_set1_pd(kExpfShift));
    const __m512d r = _mm512_sub_pd(z, k);
    const __m512i index = _mm512_and_si512(k_bits, _mm512_set1_epi64(31));
    const __m512i table = _mm512_i64gather_epi64(index, kExp2fTable, 8);
    const __m512d scale =
        _mm512_castsi512_pd(_mm512_add_epi64(table, _mm512_slli_epi64(k_bits, 47)));
    const __m512d c01 =
        _mm512_fmadd_pd(_mm512_set1_pd(kExpfPoly[0]), r, _mm512_set1_pd(kExpfPoly[1]));
    __m512d y = _mm512_fmadd_pd(_mm512_set1_pd(kExpfPoly[2]), r, _mm512_set1_pd(1.0));
    y = _mm512_fmadd_pd(c01, _mm512_mul_pd(r, r), y);
    return _mm512_mul_pd(y, scale);
  }
  static F exp_as_libm(F x) {
    x = min(max(x, set1(kExpfLowest)), set1(kExpfHighest));
    const __m256 low = _mm512_cvtpd_ps(exp_as_libm(_mm512_cvtps_pd(_mm512_castps512_ps256(x))));
    const __m256 high = _mm512_cvtpd_ps(exp_as_libm(_mm512_cvtps_pd(_mm512_extractf32x8_ps(x, 1))));
    return _mm512_insertf32x8(_mm512_castps256_ps512(low), high, 1);
  }

  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  static F min(F a, F b) { return _mm512_min_ps(a, b); }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  static F sqrt(F a) { return _mm512_sqrt_ps(a); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }    // a * b + c
  static F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a * b
  static F round(F a) {
    return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static F and_bits(F a, F b) { return _mm512_and_ps(a, b); }
  static F or_bits(F a, F b) { return _mm512_or_ps(a, b); }
  static F xor_bits(F a, F b) { return _mm512_xor_ps(a, b); }

  static M gt(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static M ge(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
  static M lt(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  static M eq(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
  static M isnan(F a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q); }
  static M lanes_below(int n) {
    return static_cast<M>(_bzhi_u32(0xFFFFu, static_cast<unsigned>(n)));
  }
  static M mask_and(M a, M b) { return static_cast<M>(a & b); }
  static M mask_or(M a, M b) { return static_cast<M>(a | b); }
  static F select(M m, F if_true, F if_false) { return _mm512_mask_blend_ps(m, if_false, if_true); }
  static int popcount(M m) { return __builtin_popcount(m); }

  static F rotate(F v, int r) {  // lane i <- lane (i + r) % 16
    return _mm512_permutexvar_ps(_mm512_and_si512(add_i(iota_i(), set1_i(r)), set1_i(15)), v);
  }
  static float hsum(F v) { return _mm512_reduce_add_ps(v); }
  static float hmax(F v) { return _mm512_reduce_max_ps(v); }
  static float hmin(F v) { return _mm512_reduce_min_ps(v); }

  static I to_int(F a) { return _mm512_cvtps_epi32(a); }
  static F to_float(I a) { return _mm512_cvtepi32_ps(a); }
  static F as_float(I a) { return _mm512_castsi512_ps(a); }
  static I as_int(F a) { return _mm512_castps_si512(a); }
  static I add_i(I a, I b) { return _mm512_add_epi32(a, b); }
  static I sub_i(I a, I b) { return _mm512_sub_epi32(a, b); }
  static I and_i(I a, I b) { return _mm512_and_si512(a, b); }
  static I or_i(I a, I b) { return _mm512_or_si512(a, b); }
  static I srai(I a, int n) { return _mm512_srai_epi32(a, static_cast<unsigned>(n)); }
  static I slli(I a, int n) { return _mm512_slli_epi32(a, static_cast<unsigned>(n)); }

  static M lt_i(I a, I b) { return _mm512_cmplt_epi32_mask(a, b); }
  static I count_add(I count, M m) { return _mm512_mask_add_epi32(count, m, count, set1_i(1)); }

  // Stores the lanes of m, packed to the front, to score, and their ids (first_id + lane) to id;
  // 16 lanes are written to each (a register compress and a plain store: compress-to-memory is
  // slow on some cores).
  static int compress_store(float* score, int32_t* id, F v, int32_t first_id, M m) {
    _mm512_storeu_ps(score, _mm512_maskz_compress_ps(m, v));
    _mm512_storeu_si512(id, _mm512_maskz_compress_epi32(m, add_i(iota_i(), set1_i(first_id))));
    return __builtin_popcount(m);
  }
};

}  // namespace

void route_rows_avx512(const RouteArgs& args) { route_rows<Avx512>(args); }

}  // namespace moekit::cpu
