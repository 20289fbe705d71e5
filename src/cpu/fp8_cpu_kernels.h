// The CPU FP8 kernels, written once over a small SIMD abstraction V and instantiated per ISA
// (fp8_cpu.cpp: portable lanes; fp8_cpu_avx2.cpp; fp8_cpu_avx512.cpp).
//
// V provides: kLanes (f32 lanes per vector F), kMicroRows (rows of the GEMM microkernel, whose
// columns are two vectors), kRegisters (vector registers); f32 arithmetic; loads of f32/f16/bf16
// lanes; store_e4m3 (RNE, saturating, NaN kept: bit-exact with moekit::f32_to_f8e4m3); and the
// e4m3 -> f32 decoders. All but load_e4m3_tiny produce value * 2^-8 (the F16C trick below is
// exact at that scale; the GEMMs undo it in the block scale, a power of two, so every product and
// partial sum is the exact one scaled):
//   load_e4m3_tiny: kLanes bytes in natural order to value * 2^-120 (shift and mask into f32 bits;
//     NaN bytes come out finite and are noted by probe_bytes, over kProbeBytes), for the streaming
//     small-M GEMM;
//   convert_e4m3_row: up to 128 bytes in natural order, NaN exact, into ceil(len / 16) * 16
//     floats (zero past len);
//   transpose_8x8: to pack weight tiles k-major.
//
// Linkage: V is defined in an unnamed namespace in each ISA file and everything below is a
// template over V (or lives in this header's unnamed namespace), so no ISA's code can be picked by
// the linker for another. For the same reason this code calls only non-inline library functions
// (f32_to_bf16, ...) and C functions, never inline library code such as std::min.
#pragma once

#include <omp.h>
#include <xmmintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "moekit/dtype.h"

namespace moekit::cpu {

enum class Fp8Float : uint8_t { f32, f16, bf16 };  // the wide formats an FP8 op reads or writes

// One call of each op as plain data, so the ISA files need no inline code of the library.
struct GroupQuantArgs {
  const void* x = nullptr;   // [rows, cols], unit stride along cols
  int64_t x_row_stride = 0;  // elements
  Fp8Float x_format = Fp8Float::f32;
  uint8_t* q = nullptr;  // [rows, cols], unit stride along cols
  int64_t q_row_stride = 0;
  void* scales =
      nullptr;  // f32, or i32 words when packed (exponent byte of group 4w + j in byte j)
  int64_t scale_row_stride = 0;    // elements (words when packed)
  int64_t scale_group_stride = 0;  // between groups (packed: between words)
  bool packed = false;
  int64_t rows = 0, cols = 0, groups = 0;  // the last group may be partial
  int group_size = 128;
  bool ue8m0 = false;
  float eps = 1e-10f;
  int num_threads = 0;
};

struct BlockGemmArgs {
  const uint8_t* a = nullptr;  // [m, k] e4m3, unit stride along k
  int64_t a_row_stride = 0;
  const void* a_scales = nullptr;  // logical [m, ceil(k/128)]: f32, or packed UE8M0 words
  int64_t a_scale_row_stride = 0;
  int64_t a_scale_group_stride = 0;
  bool a_scales_packed = false;
  const uint8_t* b = nullptr;  // [n, k] e4m3, unit stride along k
  int64_t b_row_stride = 0;
  const void* b_scales = nullptr;  // [ceil(n/128), ceil(k/128)] f32 or bf16
  int64_t b_scale_row_stride = 0;
  int64_t b_scale_col_stride = 0;
  bool b_scales_bf16 = false;
  const void* bias = nullptr;  // [n] or nullptr
  int64_t bias_stride = 0;
  Fp8Float bias_format = Fp8Float::f32;
  void* out = nullptr;  // [m, n], unit stride along n
  int64_t out_row_stride = 0;
  Fp8Float out_format = Fp8Float::f32;
  int64_t m = 0, n = 0, k = 0;
  int num_threads = 0;
};

struct BlockQuantizeWeightArgs {
  const void* w = nullptr;  // [n, k], unit stride along k
  int64_t w_row_stride = 0;
  Fp8Float w_format = Fp8Float::f32;
  uint8_t* weight = nullptr;  // [n, k], unit stride along k
  int64_t weight_row_stride = 0;
  float* scales = nullptr;  // [ceil(n/128), ceil(k/128)]
  int64_t scale_row_stride = 0;
  int64_t scale_col_stride = 0;
  int64_t n = 0, k = 0;
  int num_threads = 0;
};

// silu_and_mul_group_quant_fp8's activations: y[m, k] = silu_and_mul_f32(x[m, k], x[m, cols + k])
// (ops/silu_math.h), the same bits, into y [rows, cols] f32 (contiguous).
struct GatedRowsArgs {
  const void* x = nullptr;   // [rows, 2 cols]: gate then up, unit stride along cols
  int64_t x_row_stride = 0;  // elements
  Fp8Float x_format = Fp8Float::f32;
  float* y = nullptr;
  int64_t rows = 0, cols = 0;
  int num_threads = 0;
};

// Per-ISA entry points (fp8_cpu.cpp, fp8_cpu_avx2.cpp, fp8_cpu_avx512.cpp). The AVX2 and AVX-512
// ones may only be called when cpu_features() says so.
void group_quant_portable(const GroupQuantArgs& args);
void group_quant_avx2(const GroupQuantArgs& args);
void group_quant_avx512(const GroupQuantArgs& args);
void block_gemm_portable(const BlockGemmArgs& args);
void block_gemm_avx2(const BlockGemmArgs& args);
void block_gemm_avx512(const BlockGemmArgs& args);
// The packed GEMM on AVX-512 BF16 dot products (fp8_cpu_avx512bf16.cpp), for any M (dispatch
// gives it M >= kBf16MinM); only when cpu_features().avx512_bf16.
void block_gemm_avx512bf16(const BlockGemmArgs& args);
// The packed GEMM on AMX tile dot products (fp8_cpu_amx.cpp), for any M (dispatch gives it
// M >= kAmxMinM); only when cpu_features().amx_bf16. `workspace` (the activations decoded once, as
// the tiles read them): 64-byte aligned, workspace_bytes of at least
// block_gemm_amx_workspace_bytes(m, n, k, 1); the kernel's panels then hold as many rows as it
// holds, up to what block_gemm_amx_workspace_bytes(m, n, k, its threads) asks for.
int64_t block_gemm_amx_workspace_bytes(int64_t m, int64_t n, int64_t k, int threads);
void block_gemm_amx(const BlockGemmArgs& args, void* workspace, int64_t workspace_bytes);
void block_quantize_weight_portable(const BlockQuantizeWeightArgs& args);
void block_quantize_weight_avx2(const BlockQuantizeWeightArgs& args);
void block_quantize_weight_avx512(const BlockQuantizeWeightArgs& args);
void gated_rows_avx2(const GatedRowsArgs& args);
void gated_rows_avx512(const GatedRowsArgs& args);
// q[i] = e4m3(x[i] / divisor) through each build's encoder (for tests; cpu::divide_to_e4m3).
void divide_to_e4m3_portable(const float* x, int64_t n, float divisor, uint8_t* q);
void divide_to_e4m3_avx2(const float* x, int64_t n, float divisor, uint8_t* q);
void divide_to_e4m3_avx512(const float* x, int64_t n, float divisor, uint8_t* q);

// See "Linkage" above: internal linkage for everything an ISA file compiles from here.
namespace {  // NOLINT(build/namespaces): deliberately per translation unit

constexpr int kBlock = 128;  // the K block of both scales, and the weights' N block
constexpr int kTileN = 64;   // weight rows per task of the packed GEMM (divides kBlock)
constexpr int kTileM = 120;  // activation rows per task of the packed GEMM (micro rows: 4, 6, 12)
constexpr int kSmallTileN = kBlock;  // weight rows per tile of the small-M GEMM (at most)
// Up to this many rows the GEMM streams the weights (in passes of kStreamRows): decoding a weight
// tile into a k-major stack tile only pays off once enough rows reuse it. Measured on Zen 4
// (docs/perf/fp8.md), N=4096 K=7168, one core: the streaming passes are FMA-bound from M = 3
// (AVX-512 ~75 GFLOP/s, AVX2 ~73) and beat the f32 packed GEMMs up to M = 64 (AVX-512: 56 and 70
// at 32 and 64; AVX2: 33-64 from 17 to 64), from where the two are about equal.
constexpr int kStreamMaxM = 64;
// Where the CPU has AVX-512 BF16, its packed GEMM takes over from this many rows instead (Zen 4,
// N=4096 K=7168: 43 GFLOP/s at M = 17 against ~75 streaming; at M = 32 0.074 vs 0.067-0.075
// TFLOP/s on 1 thread, 0.134 vs 0.115 on 2; at M = 64 0.095 vs 0.075).
constexpr int kBf16MinM = 25;
// Where the CPU has AMX-BF16, the packed GEMM on tiles takes over from this many rows (Xeon with
// AMX, N=4096 K=7168: at M <= 32 the tile kernel takes ~3.2 ms on 1 thread whatever M, decoding the
// weights; streaming takes 2.79 / 3.32 / 3.61 ms at M = 5 / 6 / 7, and on 2 threads 1.41 / 1.68 /
// 1.82 against the tiles' 1.65-1.67; N=4096 K=2048 crosses at the same M).
constexpr int kAmxMinM = 6;
constexpr int kPrefetchBlocks = 4;      // how far ahead the packed GEMM prefetches rows
constexpr float kDecodeScale = 256.0f;  // decoders return value * 2^-8
// The streaming GEMM's weights decode to value x 2^-120 (load_e4m3_tiny) and its activations to
// value x 2^-8 x 2^120: products are exact x 2^-8 again.
constexpr float kTinyScale = 0x1p-120f;
constexpr float kTinyUndo = 0x1p120f;

// The packed GEMMs' weight tiles: a tile's rows sit K bytes apart, 128 bytes of each per block,
// too many streams for hardware prefetchers, so each row's block kPrefetchBlocks ahead is
// requested (into L2) by hand.
inline void prefetch_ahead(const uint8_t* row_block, int64_t k0, int64_t k) {
  constexpr int64_t kAhead = kPrefetchBlocks * kBlock;
  if (k0 + kAhead < k) {
    __builtin_prefetch(row_block + kAhead, 0, 2);
    __builtin_prefetch(row_block + kAhead + 64, 0, 2);
  }
}
constexpr float kE4m3Max = 448.0f;

template <class T>
constexpr T lesser(T a, T b) {
  return b < a ? b : a;
}
template <class T>
constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}
inline float float_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float quiet_nan() { return float_from_bits(0x7fc00000u); }
inline bool is_e4m3_nan(uint8_t b) { return (b & 0x7fu) == 0x7fu; }

// Threads for `items` independent work items totalling `work` elementary operations: all that
// were asked for (0 = all available), but none idle and none for tiny calls.
inline int thread_count(int requested, int64_t items, double work) {
  int threads = requested > 0 ? requested : omp_get_max_threads();
  if (work < 1 << 16) threads = 1;
  if (items < threads) threads = static_cast<int>(items < 1 ? 1 : items);
  return threads;
}

inline float load_wide(const void* base, Fp8Float format, int64_t i) {
  switch (format) {
    case Fp8Float::f32:
      return static_cast<const float*>(base)[i];
    case Fp8Float::f16:
      return f16_to_f32(static_cast<const uint16_t*>(base)[i]);
    case Fp8Float::bf16:
      return float_from_bits(static_cast<uint32_t>(static_cast<const uint16_t*>(base)[i]) << 16);
  }
  return 0.0f;
}

inline void store_wide(void* base, Fp8Float format, int64_t i, float v) {
  switch (format) {
    case Fp8Float::f32:
      static_cast<float*>(base)[i] = v;
      return;
    case Fp8Float::f16:
      static_cast<uint16_t*>(base)[i] = f32_to_f16(v);
      return;
    case Fp8Float::bf16:
      static_cast<uint16_t*>(base)[i] = f32_to_bf16(v);
      return;
  }
}

// ---- Quantization (group quant and weight quant share the two passes over a run).

// Elements of one run of a wide format, kLanes at a time; a tail is read through a zeroed copy.
template <class V, Fp8Float kFormat>
struct WideRun {
  using F = typename V::F;
  static constexpr int L = V::kLanes;
  static constexpr int kBytes = kFormat == Fp8Float::f32 ? 4 : 2;

  static F load(const void* base, int64_t i) {
    const char* p = static_cast<const char*>(base) + i * kBytes;
    if constexpr (kFormat == Fp8Float::f32) return V::load(reinterpret_cast<const float*>(p));
    if constexpr (kFormat == Fp8Float::f16)
      return V::load_f16(reinterpret_cast<const uint16_t*>(p));
    if constexpr (kFormat == Fp8Float::bf16)
      return V::load_bf16(reinterpret_cast<const uint16_t*>(p));
  }
  static F load_tail(const void* base, int64_t i, int64_t count) {
    using Element = std::conditional_t<kFormat == Fp8Float::f32, float, uint16_t>;
    alignas(64) Element padded[L] = {};
    std::memcpy(padded, static_cast<const char*>(base) + i * kBytes, count * kBytes);
    return load(padded, 0);
  }

  // max |x| over [0, len), NaN ignored (as std::max(amax, |x|) in the reference).
  static float amax(const void* x, int64_t len) {
    typename V::F acc = V::zero();
    int64_t i = 0;
    for (; i + L <= len; i += L) acc = V::max_ignoring_nan(acc, V::abs(load(x, i)));
    if (i < len) acc = V::max_ignoring_nan(acc, V::abs(load_tail(x, i, len - i)));
    return V::reduce_max(acc);
  }

  // q[i] = e4m3(x[i] / scale), a true division as the reference does.
  static void quantize(const void* x, int64_t len, float scale, uint8_t* q) {
    const F divisor = V::set1(scale);
    int64_t i = 0;
    for (; i + L <= len; i += L) V::store_e4m3(q + i, V::div(load(x, i), divisor));
    if (i < len) {
      uint8_t bytes[L];
      V::store_e4m3(bytes, V::div(load_tail(x, i, len - i), divisor));
      std::memcpy(q + i, bytes, static_cast<size_t>(len - i));
    }
  }
};

// Steps 1-2 of the contract, as reference::group_scale computes them.
inline float group_scale(float amax, float eps, bool ue8m0) {
  if (amax < eps) amax = eps;
  const float scale = amax / kE4m3Max;
  if (!ue8m0) return scale;
  const uint32_t bits = bits_of(scale);
  const uint32_t exponent = bits >> 23, mantissa = bits & 0x7fffffu;
  if (mantissa == 0) return scale;
  if (exponent != 0) return float_from_bits((exponent + 1) << 23);
  uint32_t power = 1;  // a subnormal's next power of two
  while (power < mantissa) power <<= 1;
  return float_from_bits(power);
}

// Groups of 16 (four packed words) per work item, so that threads never share a word.
constexpr int64_t kGroupsPerItem = 16;

template <class V, Fp8Float kFormat>
void group_quant_typed(const GroupQuantArgs& g) {
  using Run = WideRun<V, kFormat>;
  const int64_t items_per_row = ceil_div(g.groups, kGroupsPerItem);
  const int64_t items = g.rows * items_per_row;
  const int threads = thread_count(g.num_threads, items, static_cast<double>(g.rows) * g.cols);
  const int64_t element_bytes = kFormat == Fp8Float::f32 ? 4 : 2;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t row = item / items_per_row;
    const int64_t g_begin = (item % items_per_row) * kGroupsPerItem;
    const int64_t g_end = lesser(g_begin + kGroupsPerItem, g.groups);
    const char* x_row = static_cast<const char*>(g.x) + row * g.x_row_stride * element_bytes;
    uint8_t* q_row = g.q + row * g.q_row_stride;
    float scales[kGroupsPerItem];
    for (int64_t grp = g_begin; grp < g_end; ++grp) {
      const int64_t begin = grp * g.group_size;
      const int64_t len = lesser<int64_t>(g.group_size, g.cols - begin);
      const void* x = x_row + begin * element_bytes;
      const float scale = group_scale(Run::amax(x, len), g.eps, g.ue8m0);
      Run::quantize(x, len, scale, q_row + begin);
      scales[grp - g_begin] = scale;
    }
    if (!g.packed) {
      float* out = static_cast<float*>(g.scales) + row * g.scale_row_stride;
      for (int64_t grp = g_begin; grp < g_end; ++grp)
        out[grp * g.scale_group_stride] = scales[grp - g_begin];
    } else {
      uint32_t* words = static_cast<uint32_t*>(g.scales) + row * g.scale_row_stride;
      for (int64_t w = g_begin / 4; w * 4 < g_end; ++w) {
        uint32_t word = 0;  // bytes of groups past the last are 0
        for (int64_t j = 0; j < 4 && w * 4 + j < g_end; ++j)
          word |= (bits_of(scales[w * 4 + j - g_begin]) >> 23) << (8 * j);
        words[w * g.scale_group_stride] = word;
      }
    }
  }
}

template <class V>
void run_group_quant(const GroupQuantArgs& g) {
  switch (g.x_format) {
    case Fp8Float::f32:
      return group_quant_typed<V, Fp8Float::f32>(g);
    case Fp8Float::f16:
      return group_quant_typed<V, Fp8Float::f16>(g);
    case Fp8Float::bf16:
      return group_quant_typed<V, Fp8Float::bf16>(g);
  }
}

// ops/silu_math.h's exp_nonpositive_f32 and silu_and_mul_f32 on kLanes values, operation for
// operation (fma is a true fused multiply-add, every other step rounded on its own), so every
// lane has the scalar function's bits. V needs, besides the arithmetic: neg, abs,
// max_ignoring_nan (fmaxf's NaN rule), select_nonnegative(g, a, b) = g >= 0 ? a : b,
// power_of_two_of_shifted(j) (2^k from j = 1.5 * 2^23 + k, 0 where k < -126) and canonical_nan.
template <class V>
typename V::F exp_nonpositive_lanes(typename V::F x) {
  using F = typename V::F;
  constexpr float kShifter = 12582912.0f;
  const F clamped = V::max_ignoring_nan(V::set1(-104.0f), x);
  const F j = V::fma(clamped, V::set1(1.44269502f), V::set1(kShifter));
  const F minus_k = V::neg(V::add(j, V::set1(-kShifter)));
  F r = V::fma(minus_k, V::set1(0.693359375f), clamped);
  r = V::fma(minus_k, V::set1(-2.12194440e-4f), r);
  const F r2 = V::mul(r, r);
  F p = V::set1(1.9875691500e-4f);
  p = V::fma(p, r, V::set1(1.3981999507e-3f));
  p = V::fma(p, r, V::set1(8.3334519073e-3f));
  p = V::fma(p, r, V::set1(4.1665795894e-2f));
  p = V::fma(p, r, V::set1(1.6666665459e-1f));
  p = V::fma(p, r, V::set1(5.0000001201e-1f));
  const F e_r = V::add(V::fma(p, r2, r), V::set1(1.0f));
  return V::mul(e_r, V::power_of_two_of_shifted(j));
}

template <class V>
typename V::F silu_and_mul_lanes(typename V::F gate, typename V::F up) {
  using F = typename V::F;
  const F t = exp_nonpositive_lanes<V>(V::neg(V::abs(gate)));
  const F numerator = V::select_nonnegative(gate, gate, V::mul(gate, t));
  return V::canonical_nan(V::mul(V::div(numerator, V::add(V::set1(1.0f), t)), up));
}

template <class V, Fp8Float kFormat>
void gated_rows_typed(const GatedRowsArgs& g) {
  using Run = WideRun<V, kFormat>;
  constexpr int L = V::kLanes;
  const int threads =
      thread_count(g.num_threads, g.rows, 20.0 * static_cast<double>(g.rows) * g.cols);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t m = 0; m < g.rows; ++m) {
    const int64_t gate = m * g.x_row_stride, up = gate + g.cols;
    float* y = g.y + m * g.cols;
    int64_t k = 0;
    for (; k + L <= g.cols; k += L)
      V::store(y + k, silu_and_mul_lanes<V>(Run::load(g.x, gate + k), Run::load(g.x, up + k)));
    if (k < g.cols) {  // the tail through zero-padded lanes
      alignas(64) float out[L];
      V::store(out, silu_and_mul_lanes<V>(Run::load_tail(g.x, gate + k, g.cols - k),
                                          Run::load_tail(g.x, up + k, g.cols - k)));
      std::memcpy(y + k, out, static_cast<size_t>(g.cols - k) * sizeof(float));
    }
  }
}

template <class V>
void run_gated_rows(const GatedRowsArgs& g) {
  switch (g.x_format) {
    case Fp8Float::f32:
      return gated_rows_typed<V, Fp8Float::f32>(g);
    case Fp8Float::f16:
      return gated_rows_typed<V, Fp8Float::f16>(g);
    case Fp8Float::bf16:
      return gated_rows_typed<V, Fp8Float::bf16>(g);
  }
}

template <class V, Fp8Float kFormat>
void block_quantize_weight_typed(const BlockQuantizeWeightArgs& g) {
  using Run = WideRun<V, kFormat>;
  const int64_t row_blocks = ceil_div<int64_t>(g.n, kBlock);
  const int64_t col_blocks = ceil_div<int64_t>(g.k, kBlock);
  const int64_t items = row_blocks * col_blocks;
  const int threads = thread_count(g.num_threads, items, static_cast<double>(g.n) * g.k);
  const int64_t element_bytes = kFormat == Fp8Float::f32 ? 4 : 2;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t nb = item / col_blocks, kb = item % col_blocks;
    const int64_t n0 = nb * kBlock, n1 = lesser<int64_t>(n0 + kBlock, g.n);
    const int64_t k0 = kb * kBlock, len = lesser<int64_t>(kBlock, g.k - k0);
    auto x_at = [&](int64_t row) {
      return static_cast<const char*>(g.w) + (row * g.w_row_stride + k0) * element_bytes;
    };
    float amax = 0.0f;
    for (int64_t row = n0; row < n1; ++row) {
      const float row_amax = Run::amax(x_at(row), len);
      if (amax < row_amax) amax = row_amax;
    }
    const float scale = (amax < 1e-4f ? 1e-4f : amax) / kE4m3Max;
    for (int64_t row = n0; row < n1; ++row)
      Run::quantize(x_at(row), len, scale, g.weight + row * g.weight_row_stride + k0);
    g.scales[nb * g.scale_row_stride + kb * g.scale_col_stride] = scale;
  }
}

template <class V>
void run_block_quantize_weight(const BlockQuantizeWeightArgs& g) {
  switch (g.w_format) {
    case Fp8Float::f32:
      return block_quantize_weight_typed<V, Fp8Float::f32>(g);
    case Fp8Float::f16:
      return block_quantize_weight_typed<V, Fp8Float::f16>(g);
    case Fp8Float::bf16:
      return block_quantize_weight_typed<V, Fp8Float::bf16>(g);
  }
}

// ---- Block-scaled GEMM.

// Reads the scales and writes the output of one call.
struct GemmEdges {
  const BlockGemmArgs& g;

  float a_scale(int64_t m, int64_t kb) const {
    if (g.a_scales_packed) {
      const int64_t word = m * g.a_scale_row_stride + (kb / 4) * g.a_scale_group_stride;
      const uint8_t byte = static_cast<const uint8_t*>(g.a_scales)[word * 4 + kb % 4];
      return float_from_bits(static_cast<uint32_t>(byte) << 23);
    }
    return static_cast<const float*>(
        g.a_scales)[m * g.a_scale_row_stride + kb * g.a_scale_group_stride];
  }
  float b_scale(int64_t n, int64_t kb) const {
    const int64_t i = (n / kBlock) * g.b_scale_row_stride + kb * g.b_scale_col_stride;
    return load_wide(g.b_scales, g.b_scales_bf16 ? Fp8Float::bf16 : Fp8Float::f32, i);
  }
  // The one rounding to the output format, after the bias.
  void store(int64_t m, int64_t n, float total) const {
    if (g.bias) total += load_wide(g.bias, g.bias_format, n * g.bias_stride);
    store_wide(g.out, g.out_format, m * g.out_row_stride + n, total);
  }
};

// Small M (decode): stream each weight row once per pass of R <= kStreamRows activation rows.
// Per pass and K chunk the activations are decoded once into a stack buffer, exact x 2^112
// (convert_e4m3_row, then x kTinyUndo); the weights are decoded in registers by load_e4m3_tiny to
// exact x 2^-120 (shift and mask: the cheapest exact decode, some 3 instructions a vector). Every
// product is thus the exact one x 2^-8, the same as the packed GEMM's (kDecodeScale, undone in the
// block scale), and none underflows: the smallest is 2^-26. Register blocking: R x kWeightRows
// accumulators, each activation vector load feeding kWeightRows FMAs and each weight decode R.
template <class V, int R>
struct SmallMGemm {
  using F = typename V::F;
  static constexpr int L = V::kLanes;
  // Weight rows per step: as many as the registers hold next to R x kWeightRows accumulators, their
  // weight vectors, the activation and the mask (the NaN probe's two may live in memory); 4 at
  // most (streams to prefetch). AVX2: R = 1-2: 4, 3: 3, 4-6: 2; AVX-512: R = 1-6: 4, 7-8: 3.
  static constexpr int kFit = (V::kRegisters - 2) / (R + 1);
  static constexpr int kWeightRows = kFit < 1 ? 1 : lesser(4, kFit);
  static constexpr int64_t kKChunk = (8192 / R) / kBlock * kBlock;  // 32 KB of activations
  static constexpr int64_t kKChunkBlocks = kKChunk / kBlock;
  static_assert(kBlock % V::kProbeBytes == 0 && kBlock % L == 0);

  const BlockGemmArgs& g;
  GemmEdges edges{g};
  int64_t m0 = 0;
  alignas(64) float a[R][kKChunk];
  float a_scales[R][kKChunkBlocks];
  float scales[R][kKChunkBlocks];  // a_scales x the tile's weight block scale x kDecodeScale
  alignas(64) float totals[kSmallTileN][R][L];
  bool nan_column[kSmallTileN];

  SmallMGemm(const BlockGemmArgs& args, int64_t first_row) : g(args), m0(first_row) {}

  // The activations of [k0, k0 + len) x 2^112, zero up to the end of the last 128-block (NaN kept).
  void decode_activations(int64_t k0, int64_t len) {
    const int64_t padded = ceil_div<int64_t>(len, kBlock) * kBlock;
    const F up = V::set1(kTinyUndo);
    for (int r = 0; r < R; ++r) {
      const uint8_t* src = g.a + (m0 + r) * g.a_row_stride + k0;
      float* dst = a[r];
      for (int64_t j = 0; j < len; j += kBlock)
        V::convert_e4m3_row(src + j, static_cast<int>(lesser<int64_t>(kBlock, len - j)), dst + j);
      for (int64_t i = ceil_div<int64_t>(len, 16) * 16; i < padded; ++i) dst[i] = 0.0f;
      for (int64_t i = 0; i < padded; i += L) V::store(dst + i, V::mul(V::load(dst + i), up));
      for (int64_t j = 0; j < ceil_div<int64_t>(len, kBlock); ++j)
        a_scales[r][j] = edges.a_scale(m0 + r, k0 / kBlock + j);
    }
  }

  // kRows weight rows from n over the activations' K chunk [k0, k0 + len) into totals[t...].
  template <int kRows>
  void weight_rows(int64_t n, int t, int64_t k0, int64_t len) {
    const uint8_t* rows[kRows];
    for (int w = 0; w < kRows; ++w) rows[w] = g.b + (n + w) * g.b_row_stride + k0;
    typename V::Probe probe = V::probe_init();
    for (int64_t j = 0; j * kBlock < len; ++j) {
      const int64_t kb0 = j * kBlock;
      const int64_t block_len = lesser<int64_t>(kBlock, len - kb0);
      const uint8_t* src[kRows];
      alignas(64) uint8_t tail[kRows][kBlock];
      for (int w = 0; w < kRows; ++w) {
        src[w] = rows[w] + kb0;
        if (block_len < kBlock) {  // the end of K: zero-padded (the activations are zero there too)
          std::memset(tail[w], 0, kBlock);
          std::memcpy(tail[w], src[w], static_cast<size_t>(block_len));
          src[w] = tail[w];
        }
      }
      // The next rows' same block, into L2: with several activation rows the K chunk is short
      // (kKChunk), so each row is a short stream that the hardware prefetchers pick up late.
      for (int w = 0; w < kRows; ++w) {
        if (n + kRows + w < g.n) {
          const uint8_t* next = g.b + (n + kRows + w) * g.b_row_stride + k0 + kb0;
          __builtin_prefetch(next, 0, 2);
          __builtin_prefetch(next + 64, 0, 2);
        }
      }
      F acc[R][kRows];
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
        for (int w = 0; w < kRows; ++w) acc[r][w] = V::zero();
#pragma GCC unroll 16
      for (int v = 0; v < kBlock; v += L) {
        if (v % V::kProbeBytes == 0) {
#pragma GCC unroll 16
          for (int w = 0; w < kRows; ++w) V::probe_bytes(probe, src[w] + v);
        }
        F b[kRows];
#pragma GCC unroll 16
        for (int w = 0; w < kRows; ++w) b[w] = V::load_e4m3_tiny(src[w] + v);
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
          F x = V::load(&a[r][kb0 + v]);
          if constexpr (kRows > 1) V::keep_in_register(x);  // one load for kRows FMAs
#pragma GCC unroll 16
          for (int w = 0; w < kRows; ++w) acc[r][w] = V::fma(x, b[w], acc[r][w]);
        }
      }
#pragma GCC unroll 16
      for (int w = 0; w < kRows; ++w) {
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
          float* total = totals[t + w][r];
          V::store(total, V::fma(acc[r][w], V::set1(scales[r][j]), V::load(total)));
        }
      }
    }
    if (V::probe_found_nan(probe)) {  // rare: find which rows hold a NaN byte
      for (int w = 0; w < kRows; ++w)
        for (int64_t k = 0; k < len; ++k) nan_column[t + w] |= is_e4m3_nan(rows[w][k]);
    }
  }

  // Weight rows [n_begin, n_end), in tiles that stay within one 128-row block of weight scales.
  void run(int64_t n_begin, int64_t n_end) {
    const int64_t k_chunks = ceil_div<int64_t>(g.k, kKChunk);
    for (int64_t n_tile = n_begin, tile_end; n_tile < n_end; n_tile = tile_end) {
      tile_end = lesser(n_end, (n_tile / kBlock + 1) * kBlock);
      const int tile = static_cast<int>(tile_end - n_tile);
      std::memset(totals, 0, sizeof totals);
      std::memset(nan_column, 0, sizeof nan_column);
      for (int64_t c = 0; c < k_chunks; ++c) {
        const int64_t k0 = c * kKChunk, len = lesser<int64_t>(kKChunk, g.k - k0);
        if (k_chunks > 1 || n_tile == n_begin) decode_activations(k0, len);
        for (int64_t j = 0; j < ceil_div<int64_t>(len, kBlock); ++j) {
          const float b_scale = edges.b_scale(n_tile, k0 / kBlock + j) * kDecodeScale;
          for (int r = 0; r < R; ++r) scales[r][j] = a_scales[r][j] * b_scale;
        }
        int t = 0;
        for (; t + kWeightRows <= tile; t += kWeightRows)
          weight_rows<kWeightRows>(n_tile + t, t, k0, len);
        for (; t < tile; ++t) weight_rows<1>(n_tile + t, t, k0, len);
      }
      for (int t = 0; t < tile; ++t)
        for (int r = 0; r < R; ++r)
          edges.store(m0 + r, n_tile + t,
                      nan_column[t] ? quiet_nan() : V::reduce_add(V::load(totals[t][r])));
    }
  }
};

// The streaming GEMM's weights pass through f32 subnormals (load_e4m3_tiny): while it runs, this
// thread's MXCSR must neither treat denormal inputs as zero (DAZ) nor flush results (FTZ, for the
// portable build's table x 2^-120), whatever the caller (e.g. torch.set_flush_denormal) chose.
struct KeepDenormals {
  static constexpr unsigned kFlushBits = 0x8040u;  // FTZ | DAZ
  unsigned saved = _mm_getcsr();
  KeepDenormals() {
    if (saved & kFlushBits) _mm_setcsr(saved & ~kFlushBits);
  }
  ~KeepDenormals() {
    if (saved & kFlushBits) _mm_setcsr(saved);
  }
  KeepDenormals(const KeepDenormals&) = delete;
  KeepDenormals& operator=(const KeepDenormals&) = delete;
};

template <class V, int R>
void small_m_gemm(const BlockGemmArgs& g, int64_t m0) {
  using Kernel = SmallMGemm<V, R>;
  // Contiguous ranges of weight rows per thread (whole kWeightRows groups), streamed in order.
  const int64_t groups = ceil_div<int64_t>(g.n, Kernel::kWeightRows);
  const int threads = thread_count(g.num_threads, groups, static_cast<double>(g.n) * g.k * R);
#pragma omp parallel num_threads(threads)
  {
    const KeepDenormals keep_denormals;
    const int64_t count = omp_get_num_threads(), id = omp_get_thread_num();
    const int64_t begin = lesser(groups * id / count * Kernel::kWeightRows, g.n);
    const int64_t end = lesser(groups * (id + 1) / count * Kernel::kWeightRows, g.n);
    Kernel kernel(g, m0);  // per-thread buffers, on this thread's stack
    if (begin < end) kernel.run(begin, end);
  }
}

// Larger M: per task (up to kTileM activation rows x kTileN weight rows) and per 128-block of K,
// the weight tile is decoded once, k-major, into a stack tile; then for each group of kMicroRows
// activation rows, those rows' block is decoded and a register-blocked microkernel of
// kMicroRows x (2 * kLanes) accumulates the block over the tile, scaled into the task's totals.
template <class V>
struct PackedGemm {
  using F = typename V::F;
  static constexpr int L = V::kLanes;
  static constexpr int kMr = V::kMicroRows;
  static constexpr int kNr = 2 * L;
  static_assert(kTileN % kNr == 0 && kTileN % 8 == 0);

  const BlockGemmArgs& g;
  GemmEdges edges{g};
  alignas(64) float b[kBlock][kTileN];
  alignas(64) float totals[kTileM][kTileN];
  alignas(64) float a[kMr][kBlock];
  alignas(64) float rows8[8][kBlock];
  float row_scale[kMr];

  explicit PackedGemm(const BlockGemmArgs& args) : g(args) {}

  // Rows [0, kRows) of `a` times columns [n, n + kNr) of `b` over the block, into totals[m + r].
  template <int kRows>
  void micro(int len, int m, int n) {
    F acc[kRows][2];
#pragma GCC unroll 16
    for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = V::zero();
    for (int k = 0; k < len; ++k) {
      F b0 = V::load(&b[k][n]), b1 = V::load(&b[k][n + L]);
      V::keep_in_register(b0);  // else the compiler reloads them for every row
      V::keep_in_register(b1);
#pragma GCC unroll 16
      for (int r = 0; r < kRows; ++r) {
        const F x = V::set1(a[r][k]);
        acc[r][0] = V::fma(x, b0, acc[r][0]);
        acc[r][1] = V::fma(x, b1, acc[r][1]);
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < kRows; ++r) {
      const F scale = V::set1(row_scale[r]);
      float* total = &totals[m + r][n];
      V::store(total, V::fma(acc[r][0], scale, V::load(total)));
      V::store(total + L, V::fma(acc[r][1], scale, V::load(total + L)));
    }
  }

  template <int kRows = kMr>
  void micro_rows(int rows, int len, int m, int n) {
    if constexpr (kRows > 1) {
      if (rows < kRows) return micro_rows<kRows - 1>(rows, len, m, n);
    }
    micro<kRows>(len, m, n);
  }

  void decode_weight_tile(int64_t n0, int cols, int64_t k0, int len) {
    for (int n8 = 0; n8 < kTileN; n8 += 8) {
      for (int i = 0; i < 8; ++i) {
        if (n8 + i < cols) {
          const uint8_t* row_block = g.b + (n0 + n8 + i) * g.b_row_stride + k0;
          prefetch_ahead(row_block, k0, g.k);
          V::convert_e4m3_row(row_block, len, rows8[i]);
        } else {
          std::memset(rows8[i], 0, sizeof rows8[i]);  // past N: zero columns, never stored
        }
      }
      for (int k8 = 0; k8 < len; k8 += 8)
        V::transpose_8x8(&rows8[0][k8], kBlock, &b[k8][n8], kTileN);
    }
  }

  void task(int64_t m0, int rows, int64_t n0, int cols) {
    for (int r = 0; r < rows; ++r) std::memset(totals[r], 0, sizeof totals[r]);
    for (int64_t kb = 0; kb * kBlock < g.k; ++kb) {
      const int64_t k0 = kb * kBlock;
      const int len = static_cast<int>(lesser<int64_t>(kBlock, g.k - k0));
      decode_weight_tile(n0, cols, k0, len);
      const float b_scale = edges.b_scale(n0, kb) * (kDecodeScale * kDecodeScale);
      for (int m = 0; m < rows; m += kMr) {
        const int group = lesser(kMr, rows - m);
        for (int r = 0; r < group; ++r) {
          const uint8_t* row_block = g.a + (m0 + m + r) * g.a_row_stride + k0;
          prefetch_ahead(row_block, k0, g.k);
          V::convert_e4m3_row(row_block, len, a[r]);
          row_scale[r] = edges.a_scale(m0 + m + r, kb) * b_scale;
        }
        for (int n = 0; n < cols; n += kNr) micro_rows(group, len, m, n);
      }
    }
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < cols; ++c) edges.store(m0 + r, n0 + c, totals[r][c]);
  }
};

template <class V>
void packed_gemm(const BlockGemmArgs& g) {
  // Row tiles of equal height (whole micro rows, at most kTileM): a thin last tile would decode
  // the weights once more for few rows.
  const int64_t m_tiles = ceil_div<int64_t>(g.m, kTileM);
  const int64_t tile_m = lesser<int64_t>(
      kTileM, ceil_div<int64_t>(ceil_div(g.m, m_tiles), V::kMicroRows) * V::kMicroRows);
  const int64_t n_tiles = ceil_div<int64_t>(g.n, kTileN);
  const int64_t tasks = m_tiles * n_tiles;
  const int threads =
      thread_count(g.num_threads, tasks, static_cast<double>(g.m) * g.n * (g.k + 1));
#pragma omp parallel num_threads(threads)
  {
    PackedGemm<V> kernel(g);  // per-thread tiles, on this thread's stack
    // Row-tile major: concurrent tasks share activation rows; dynamic to even out edge tiles.
#pragma omp for schedule(dynamic)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t m0 = (t / n_tiles) * tile_m, n0 = (t % n_tiles) * kTileN;
      kernel.task(m0, static_cast<int>(lesser<int64_t>(tile_m, g.m - m0)), n0,
                  static_cast<int>(lesser<int64_t>(kTileN, g.n - n0)));
    }
  }
}

// Activation rows per streaming pass: with two weight rows per step (SmallMGemm::kWeightRows).
template <class V>
constexpr int kStreamRows = V::kRegisters >= 32 ? 8 : 6;

template <class V, int R = kStreamRows<V>>
void small_m_pass(const BlockGemmArgs& g, int64_t m0, int rows) {
  if constexpr (R > 1) {
    if (rows < R) return small_m_pass<V, R - 1>(g, m0, rows);
  }
  small_m_gemm<V, R>(g, m0);
}

template <class V>
void run_block_gemm(const BlockGemmArgs& g) {
  if (g.m > kStreamMaxM) return packed_gemm<V>(g);
  // Passes of equal height (M = 9: 5 + 4, not 8 + 1): a thin pass streams the weights for little
  // work.
  const int64_t passes = ceil_div<int64_t>(g.m, kStreamRows<V>);
  const int64_t height = passes > 0 ? ceil_div(g.m, passes) : 0;
  for (int64_t m0 = 0; m0 < g.m; m0 += height)
    small_m_pass<V>(g, m0, static_cast<int>(lesser(height, g.m - m0)));
}

}  // namespace
}  // namespace moekit::cpu
