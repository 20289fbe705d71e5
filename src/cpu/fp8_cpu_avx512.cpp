// The FP8 CPU kernels on 16 lanes of AVX-512 (F, BW, VL, DQ). Compiled with -mavx512f -mavx512bw
// -mavx512vl -mavx512dq -mfma -mf16c -mbmi2; called only when cpu_features().avx512. The 8-lane
// decoders and the transpose that pack GEMM tiles are AVX2's (the tile layout does not depend on
// the vector width).
//
// GCC 12 reports the intentionally undefined pass-through operands of AVX-512 intrinsics
// (_mm512_undefined_ps) as maybe-uninitialized, or (-O2 with the sanitizers) uninitialized, once
// they are inlined here.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

#include <immintrin.h>

#include "cpu/fp8_cpu_avx2.h"
#include "cpu/fp8_cpu_kernels.h"

namespace moekit::cpu {
namespace {

struct Avx512 {
  static constexpr int kLanes = 16;
  static constexpr int kProbeBytes = 64;
  static constexpr int kRegisters = 32;
  static constexpr int kMicroRows = 12;  // 12 x 32 accumulators: 24 of the 32 registers
  using F = __m512;

  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  // An empty asm that claims to change v: v stays in a register instead of being folded into
  // every instruction that reads it as a memory operand.
  static void keep_in_register(F& v) { __asm__("" : "+v"(v)); }
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static float reduce_add(F v) {
    const __m256 half =
        _mm256_add_ps(_mm512_castps512_ps256(v),
                      _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    return Avx2::reduce_add(half);
  }
  static float reduce_max(F v) {
    const __m256 half =
        _mm256_max_ps(_mm512_castps512_ps256(v),
                      _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    return Avx2::reduce_max(half);
  }

  static F load_f16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static F load_bf16(const uint16_t* p) {
    const __m512i wide =
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
  static F abs(F v) { return _mm512_andnot_ps(_mm512_set1_ps(-0.0f), v); }
  static F neg(F v) { return _mm512_xor_ps(v, _mm512_set1_ps(-0.0f)); }
  static F select_nonnegative(F g, F a, F b) {  // as Avx2's
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_GE_OQ), b, a);
  }
  static F power_of_two_of_shifted(F j) {  // as Avx2's
    const __m512i field =
        _mm512_add_epi32(_mm512_castps_si512(j), _mm512_set1_epi32(127 - 0x4B400000));
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_max_epi32(field, _mm512_setzero_si512()), 23));
  }
  static F canonical_nan(F v) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), v,
                                _mm512_castsi512_ps(_mm512_set1_epi32(0x7fc00000)));
  }
  // As with AVX2, vmaxps returns its second operand when either is NaN.
  static F max_ignoring_nan(F acc, F v) { return _mm512_max_ps(v, acc); }
  static void store_e4m3(uint8_t* dst, F v) {
    const __m256i lo = e4m3_codes(_mm512_castps512_ps256(v));
    const __m256i hi = e4m3_codes(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    const __m512i codes = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtepi32_epi8(codes));
  }

  struct Probe {
    __m512i signed_max, unsigned_max;
  };
  static Probe probe_init() { return {_mm512_set1_epi8(-128), _mm512_setzero_si512()}; }
  static bool probe_found_nan(const Probe& p) {
    return (_mm512_cmpeq_epi8_mask(p.signed_max, _mm512_set1_epi8(0x7f)) |
            _mm512_cmpeq_epi8_mask(p.unsigned_max, _mm512_set1_epi8(-1))) != 0;
  }

  static void probe_bytes(Probe& probe, const uint8_t* src) {
    const __m512i raw = _mm512_loadu_si512(src);
    probe.signed_max = _mm512_max_epi8(probe.signed_max, raw);
    probe.unsigned_max = _mm512_max_epu8(probe.unsigned_max, raw);
  }
  // 16 bytes -> their values x 2^-120, as Avx2::load_e4m3_tiny.
  static F load_e4m3_tiny(const uint8_t* src) {
    const __m512i wide =
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
    return _mm512_castsi512_ps(
        _mm512_and_si512(_mm512_slli_epi32(wide, 20), _mm512_set1_epi32(kTinyMask)));
  }

  static void convert_e4m3_row(const uint8_t* src, int len, float* dst) {
    Avx2::convert_e4m3_row(src, len, dst);
  }
  static void transpose_8x8(const float* src, int64_t src_stride, float* dst, int64_t dst_stride) {
    Avx2::transpose_8x8(src, src_stride, dst, dst_stride);
  }
};

}  // namespace

void group_quant_avx512(const GroupQuantArgs& args) { run_group_quant<Avx512>(args); }
void block_gemm_avx512(const BlockGemmArgs& args) { run_block_gemm<Avx512>(args); }
void block_quantize_weight_avx512(const BlockQuantizeWeightArgs& args) {
  run_block_quantize_weight<Avx512>(args);
}
void gated_rows_avx512(const GatedRowsArgs& args) { run_gated_rows<Avx512>(args); }
void divide_to_e4m3_avx512(const float* x, int64_t n, float divisor, uint8_t* q) {
  WideRun<Avx512, Fp8Float::f32>::quantize(x, n, divisor, q);
}

}  // namespace moekit::cpu
