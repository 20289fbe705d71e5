// The packed (M >= kBf16MinM) block-scaled FP8 GEMM on AVX-512 BF16 dot products. Compiled with
// -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16 -mfma -mf16c -mbmi2; called only when
// cpu_features().avx512_bf16 (the dispatch entry cpu.avx512bf16). Smaller M stays on the streaming
// kernel of fp8_cpu_avx512.cpp, which this file does not compile; where the CPU has AMX, the tile
// kernel of fp8_cpu_amx.cpp takes these shapes.
//
// Why bf16 is exact here: an e4m3 value has a 4-bit significand and exponents 2^-9..2^8, so it
// (and value x 2^-8, the scale of fp8_cpu_bf16_decode.h's decoder) is a bf16 normal; vdpbf16ps
// multiplies pairs of them exactly in f32 (8-bit significands) and adds two products per f32 lane
// per instruction: twice the f32 FMA's work per instruction. vdpbf16ps treats denormal inputs as
// zero and flushes denormal results whatever MXCSR says, which cannot matter: every nonzero product
// is at least 2^-17 x 2^-17 = 2^-34 and every partial sum a multiple of that, far above f32's
// smallest normal 2^-126. Within a 128-K block the sum is then scaled as the f32 kernel
// (PackedGemm) does; only the order of the additions differs (pairs first), so results differ from
// it in the last bits.
//
// GCC 12 reports the intentionally undefined pass-through operands of AVX-512 intrinsics
// (_mm512_undefined_ps) as maybe-uninitialized once they are inlined here.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <immintrin.h>

#include "cpu/fp8_cpu_avx2.h"
#include "cpu/fp8_cpu_bf16_decode.h"
#include "cpu/fp8_cpu_kernels.h"

namespace moekit::cpu {
namespace {

constexpr int kPairs = kBlock / 2;  // bf16 pairs (one f32 lane of vdpbf16ps) per K block
constexpr int kBf16MicroRows = 12;  // 12 x 32 accumulators: 24 of the 32 registers
// Activation rows per task: taller than PackedGemm's kTileM (120), so that the weights stream
// from memory fewer times (once up to M = 264). With the doubled arithmetic rate, decoding weight
// rows straight from memory took a third of the time at kTileM on the Zen 4 VM (M = 256,
// N = 4096, K = 7168: 3 passes over 29 MB of weights); one pass gained 15-30% there.
constexpr int kBf16TileM = 22 * kBf16MicroRows;
constexpr int kBf16Lanes = 16;
constexpr int kBf16Nr = 2 * kBf16Lanes;
static_assert(kTileN % kBf16Nr == 0 && kTileN % 8 == 0);

// As PackedGemm (fp8_cpu_kernels.h), with tiles of bf16 pairs: per task (up to kBf16TileM
// activation rows x kTileN weight rows) and per 128-block of K, the weight tile is decoded once
// into b[pair][column] (the two bf16 of K pair p of weight row n in one 32-bit word: a 32-bit
// transpose of the decoded rows); each group of kBf16MicroRows activation rows is decoded in
// natural order (a row's pair p is its word p, broadcast to all lanes) and a 12 x 32 microkernel of
// vdpbf16ps accumulates the block, scaled into the task's totals. The tiling (and so which task
// computes an output, and in which order) depends only on the shape, never on the thread count.
struct PackedGemmBf16 {
  const BlockGemmArgs& g;
  GemmEdges edges{g};
  alignas(64) uint32_t b[kPairs][kTileN];
  alignas(64) float totals[kBf16TileM][kTileN];
  alignas(64) uint32_t a[kBf16MicroRows][kPairs];
  alignas(64) uint32_t rows8[8][kPairs];
  float row_scale[kBf16MicroRows];

  explicit PackedGemmBf16(const BlockGemmArgs& args) : g(args) {}

  static __m512bh as_bf16(__m512i v) { return reinterpret_cast<__m512bh>(v); }
  // As Avx512::keep_in_register: v stays in a register instead of a memory operand of each use.
  static void keep_in_register(__m512i& v) { __asm__("" : "+v"(v)); }

  // Rows [0, kRows) of `a` times columns [n, n + 32) of `b` over `pairs` K pairs, into totals.
  template <int kRows>
  void micro(int pairs, int m, int n) {
    __m512 acc[kRows][2];
#pragma GCC unroll 16
    for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int p = 0; p < pairs; ++p) {
      __m512i b0 = _mm512_load_si512(&b[p][n]), b1 = _mm512_load_si512(&b[p][n + kBf16Lanes]);
      keep_in_register(b0);  // else the compiler reloads them for every row
      keep_in_register(b1);
#pragma GCC unroll 16
      for (int r = 0; r < kRows; ++r) {
        const __m512bh x = as_bf16(_mm512_set1_epi32(static_cast<int>(a[r][p])));
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], x, as_bf16(b0));
        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], x, as_bf16(b1));
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < kRows; ++r) {
      const __m512 scale = _mm512_set1_ps(row_scale[r]);
      float* total = &totals[m + r][n];
      _mm512_storeu_ps(total, _mm512_fmadd_ps(acc[r][0], scale, _mm512_loadu_ps(total)));
      _mm512_storeu_ps(total + kBf16Lanes,
                       _mm512_fmadd_ps(acc[r][1], scale, _mm512_loadu_ps(total + kBf16Lanes)));
    }
  }

  template <int kRows = kBf16MicroRows>
  void micro_rows(int rows, int pairs, int m, int n) {
    if constexpr (kRows > 1) {
      if (rows < kRows) return micro_rows<kRows - 1>(rows, pairs, m, n);
    }
    micro<kRows>(pairs, m, n);
  }

  void decode_weight_tile(int64_t n0, int cols, int64_t k0, int len) {
    const int pairs8 = ceil_div(ceil_div(len, 2), 8) * 8;  // decoded: ceil(len / 32) * 16 pairs
    for (int n8 = 0; n8 < kTileN; n8 += 8) {
      for (int i = 0; i < 8; ++i) {
        if (n8 + i < cols) {
          const uint8_t* row_block = g.b + (n0 + n8 + i) * g.b_row_stride + k0;
          prefetch_ahead(row_block, k0, g.k);
          decode_row(row_block, len, reinterpret_cast<uint16_t*>(rows8[i]));
        } else {
          std::memset(rows8[i], 0, sizeof rows8[i]);  // past N: zero columns, never stored
        }
      }
      // A 32-bit transpose moves bits unchanged (NaN payloads included).
      for (int p8 = 0; p8 < pairs8; p8 += 8)
        Avx2::transpose_8x8(reinterpret_cast<const float*>(&rows8[0][p8]), kPairs,
                            reinterpret_cast<float*>(&b[p8][n8]), kTileN);
    }
  }

  void task(int64_t m0, int rows, int64_t n0, int cols) {
    for (int r = 0; r < rows; ++r) std::memset(totals[r], 0, sizeof totals[r]);
    for (int64_t kb = 0; kb * kBlock < g.k; ++kb) {
      const int64_t k0 = kb * kBlock;
      const int len = static_cast<int>(lesser<int64_t>(kBlock, g.k - k0));
      const int pairs = ceil_div(len, 2);  // an odd len's last pair ends in a decoded zero
      decode_weight_tile(n0, cols, k0, len);
      const float b_scale = edges.b_scale(n0, kb) * (kDecodeScale * kDecodeScale);
      for (int m = 0; m < rows; m += kBf16MicroRows) {
        const int group = lesser(kBf16MicroRows, rows - m);
        for (int r = 0; r < group; ++r) {
          const uint8_t* row_block = g.a + (m0 + m + r) * g.a_row_stride + k0;
          prefetch_ahead(row_block, k0, g.k);
          decode_row(row_block, len, reinterpret_cast<uint16_t*>(a[r]));
          row_scale[r] = edges.a_scale(m0 + m + r, kb) * b_scale;
        }
        for (int n = 0; n < cols; n += kBf16Nr) micro_rows(group, pairs, m, n);
      }
    }
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < cols; ++c) edges.store(m0 + r, n0 + c, totals[r][c]);
  }
};

}  // namespace

void block_gemm_avx512bf16(const BlockGemmArgs& g) {
  // As packed_gemm (fp8_cpu_kernels.h): row tiles of equal height in whole micro rows, a function
  // of M alone (so each output's sum, and the task that computes it, do not depend on threads).
  const int64_t m_tiles = ceil_div<int64_t>(g.m, kBf16TileM);
  const int64_t tile_m = lesser<int64_t>(
      kBf16TileM, ceil_div<int64_t>(ceil_div(g.m, m_tiles), kBf16MicroRows) * kBf16MicroRows);
  const int64_t n_tiles = ceil_div<int64_t>(g.n, kTileN);
  const int64_t tasks = m_tiles * n_tiles;
  const int threads =
      thread_count(g.num_threads, tasks, static_cast<double>(g.m) * g.n * (g.k + 1));
#pragma omp parallel num_threads(threads)
  {
    PackedGemmBf16 kernel(g);  // per-thread tiles, on this thread's stack
#pragma omp for schedule(dynamic)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t m0 = (t / n_tiles) * tile_m, n0 = (t % n_tiles) * kTileN;
      kernel.task(m0, static_cast<int>(lesser<int64_t>(tile_m, g.m - m0)), n0,
                  static_cast<int>(lesser<int64_t>(kTileN, g.n - n0)));
    }
  }
}

}  // namespace moekit::cpu
