// The routing kernel on 8 lanes of AVX2 (with FMA and F16C). Compiled with -mavx2 -mfma -mf16c
// -mbmi2; called only when cpu_features().avx2.
#include <immintrin.h>

#include "cpu/route_cpu_kernel.h"

namespace moekit::cpu {
namespace {

// For each 8-bit lane mask, the byte indices of the set lanes, packed to the front (compress).
struct CompressTable {
  uint64_t indices[256];
};
constexpr CompressTable make_compress_table() {
  CompressTable table{};
  for (int mask = 0; mask < 256; ++mask) {
    uint64_t packed = 0;
    int count = 0;
    for (int lane = 0; lane < 8; ++lane) {
      if (mask & (1 << lane)) packed |= static_cast<uint64_t>(lane) << (8 * count++);
    }
    table.indices[mask] = packed;
  }
  return table;
}
constexpr CompressTable kCompressTable = make_compress_table();

struct Avx2 {
  static constexpr int kWidth = 8;
  using F = __m256;
  using I = __m256i;
  using M = __m256;  // all-ones lanes

  static F set1(float v) { return _mm256_set1_ps(v); }
  static I set1_i(int32_t v) { return _mm256_set1_epi32(v); }
  static F iota() { return _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7); }
  static I iota_i() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }

  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static void store_i(int32_t* p, I v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
  static F load_bf16(const uint16_t* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static F load_f16(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  // Partial loads read only the first n (< 8) elements: the row may end at a page boundary.
  static F load_partial(const float* p, int n) {
    return _mm256_maskload_ps(p, _mm256_castps_si256(lanes_below(n)));
  }
  static F load_bf16_partial(const uint16_t* p, int n) {
    alignas(16) uint16_t buffer[8] = {};
    for (int i = 0; i < n; ++i) buffer[i] = p[i];
    return load_bf16(buffer);
  }
  static F load_f16_partial(const uint16_t* p, int n) {
    alignas(16) uint16_t buffer[8] = {};
    for (int i = 0; i < n; ++i) buffer[i] = p[i];
    return load_f16(buffer);
  }

  // glibc's expf on four doubles (see kExp2fTable).
  static __m256d exp_as_libm(__m256d x) {
    const __m256d z = _mm256_mul_pd(_mm256_set1_pd(kExpfInvLn2N), x);
    __m256d k = _mm256_add_pd(z, _mm256_set1_pd(kExpfShift));
    const __m256i k_bits = _mm256_castpd_si256(k);
    k = _mm256_sub_pd(k, _mm256_set1_pd(kExpfShift));
    const __m256d r = _mm256_sub_pd(z, k);
    const __m256i index = _mm256_and_si256(k_bits, _mm256_set1_epi64x(31));
    const __m256i table =
        _mm256_i64gather_epi64(reinterpret_cast<const long long*>(kExp2fTable), index, 8);
    const __m256d scale =
        _mm256_castsi256_pd(_mm256_add_epi64(table, _mm256_slli_epi64(k_bits, 47)));
    const __m256d c01 =
        _mm256_fmadd_pd(_mm256_set1_pd(kExpfPoly[0]), r, _mm256_set1_pd(kExpfPoly[1]));
    __m256d y = _mm256_fmadd_pd(_mm256_set1_pd(kExpfPoly[2]), r, _mm256_set1_pd(1.0));
    y = _mm256_fmadd_pd(c01, _mm256_mul_pd(r, r), y);
    return _mm256_mul_pd(y, scale);
  }
  static F exp_as_libm(F x) {
    x = min(max(x, set1(kExpfLowest)), set1(kExpfHighest));
    const __m128 low = _mm256_cvtpd_ps(exp_as_libm(_mm256_cvtps_pd(_mm256_castps256_ps128(x))));
    const __m128 high = _mm256_cvtpd_ps(exp_as_libm(_mm256_cvtps_pd(_mm256_extractf128_ps(x, 1))));
    return _mm256_set_m128(high, low);
  }

  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F div(F a, F b) { return _mm256_div_ps(a, b); }
  static F min(F a, F b) { return _mm256_min_ps(a, b); }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  static F sqrt(F a) { return _mm256_sqrt_ps(a); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }    // a * b + c
  static F fnmadd(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }  // c - a * b
  static F round(F a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static F and_bits(F a, F b) { return _mm256_and_ps(a, b); }
  static F or_bits(F a, F b) { return _mm256_or_ps(a, b); }
  static F xor_bits(F a, F b) { return _mm256_xor_ps(a, b); }

  static M gt(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  static M ge(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_GE_OQ); }
  static M lt(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  static M eq(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_EQ_OQ); }
  static M isnan(F a) { return _mm256_cmp_ps(a, a, _CMP_UNORD_Q); }
  static M lanes_below(int n) {
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), iota_i()));
  }
  static M mask_and(M a, M b) { return _mm256_and_ps(a, b); }
  static M mask_or(M a, M b) { return _mm256_or_ps(a, b); }
  static F select(M m, F if_true, F if_false) { return _mm256_blendv_ps(if_false, if_true, m); }
  static int popcount(M m) {
    return __builtin_popcount(static_cast<unsigned>(_mm256_movemask_ps(m)));
  }

  static F rotate(F v, int r) {  // lane i <- lane (i + r) % 8
    return _mm256_permutevar8x32_ps(v, _mm256_and_si256(add_i(iota_i(), set1_i(r)), set1_i(7)));
  }
  static float hmin(F v) {
    __m128 m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_min_ps(m, _mm_movehl_ps(m, m));
    m = _mm_min_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
  }
  static float hsum(F v) {
    __m128 m = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_add_ps(m, _mm_movehl_ps(m, m));
    m = _mm_add_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
  }
  static float hmax(F v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
  }

  static I to_int(F a) { return _mm256_cvtps_epi32(a); }
  static F to_float(I a) { return _mm256_cvtepi32_ps(a); }
  static F as_float(I a) { return _mm256_castsi256_ps(a); }
  static I as_int(F a) { return _mm256_castps_si256(a); }
  static I add_i(I a, I b) { return _mm256_add_epi32(a, b); }
  static I sub_i(I a, I b) { return _mm256_sub_epi32(a, b); }
  static I and_i(I a, I b) { return _mm256_and_si256(a, b); }
  static I or_i(I a, I b) { return _mm256_or_si256(a, b); }
  static I srai(I a, int n) { return _mm256_srai_epi32(a, n); }
  static I slli(I a, int n) { return _mm256_slli_epi32(a, n); }

  static M lt_i(I a, I b) { return _mm256_castsi256_ps(_mm256_cmpgt_epi32(b, a)); }
  // count + 1 in the lanes of m (a true lane is -1).
  static I count_add(I count, M m) { return _mm256_sub_epi32(count, _mm256_castps_si256(m)); }

  // Stores the lanes of m, packed to the front, to score, and their ids (first_id + lane) to id;
  // 8 lanes are written to each.
  static int compress_store(float* score, int32_t* id, F v, int32_t first_id, M m) {
    const unsigned bits = static_cast<unsigned>(_mm256_movemask_ps(m));
    const __m256i lanes = _mm256_cvtepu8_epi32(
        _mm_cvtsi64_si128(static_cast<long long>(kCompressTable.indices[bits])));
    _mm256_storeu_ps(score, _mm256_permutevar8x32_ps(v, lanes));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(id), add_i(lanes, set1_i(first_id)));
    return __builtin_popcount(bits);
  }
};

}  // namespace

void route_rows_avx2(const RouteArgs& args) { route_rows<Avx2>(args); }

}  // namespace moekit::cpu
