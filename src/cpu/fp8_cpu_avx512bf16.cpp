// The packed (M >= kBf16MinM) block-scaled FP8 GEMM on AVX-512 BF16 dot products, and the same
// tiles on AMX tile dot products (TDPBF16PS; M >= kAmxMinM). Compiled with -mavx512f -mavx512bw
// -mavx512vl -mavx512dq -mavx512bf16 -mamx-tile -mamx-bf16 -mfma -mf16c -mbmi2; called only when
// cpu_features().avx512_bf16 (the dispatch entry cpu.avx512bf16) or .amx_bf16 (cpu.amx). Smaller M
// stays on the streaming kernel of fp8_cpu_avx512.cpp, which this file does not compile.
//
// Why bf16 is exact here: an e4m3 value has a 4-bit significand and exponents 2^-9..2^8, so it
// (and value x 2^-8, the scale the decoder below produces) is a bf16 normal; vdpbf16ps multiplies
// pairs of them exactly in f32 (8-bit significands) and adds two products per f32 lane per
// instruction: twice the f32 FMA's work per instruction. vdpbf16ps treats denormal inputs as zero
// and flushes denormal results whatever MXCSR says, which cannot matter: every nonzero product is
// at least 2^-17 x 2^-17 = 2^-34 and every partial sum a multiple of that, far above f32's smallest
// normal 2^-126. Within a 128-K block the sum is then scaled as the f32 kernel (PackedGemm) does;
// only the order of the additions differs (pairs first), so results differ from it in the last
// bits. TDPBF16PS multiplies the same bf16 pairs exactly and adds them in K order into f32 with
// round-to-nearest-even (denormals flushed, which the same bound makes moot): another order again.
//
// GCC 12 reports the intentionally undefined pass-through operands of AVX-512 intrinsics
// (_mm512_undefined_ps) as maybe-uninitialized once they are inlined here.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <immintrin.h>

#include "cpu/fp8_cpu_avx2.h"
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
// AMX: a tile is 16 rows of 64 bytes (16 K pairs of a row, or 16 columns of a K pair), so a step of
// the microkernel takes 32 activation rows (two A tiles) by 32 weight rows (two B tiles) over 16 K
// pairs into four 16 x 16 f32 tiles: the 8 tile registers. Tasks of 256 rows (M = 256 in one pass
// over the weights, as kBf16TileM).
constexpr int kAmxMicroRows = 32;
constexpr int kAmxTileM = 8 * kAmxMicroRows;
constexpr int kAmxPairs = 16;  // K pairs per tile step

// The tile shapes of every AMX build here: 8 tiles of 16 rows x 64 bytes (palette 1).
struct alignas(64) AmxConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

// 32 e4m3 bytes -> 32 bf16 holding value x 2^-8 (exact: through f16 bits and F16C, as
// Avx2::convert_e4m3_row, then f32 -> bf16, exact for these values). NaN bytes (0x7f, 0xff) become
// bf16 NaN, so NaN propagates through the products as in the f32 kernel.
inline __m512i decode32(__m256i bytes) {
  const __m512i high_halves = _mm512_slli_epi16(_mm512_cvtepu8_epi16(bytes), 8);
  const __m512i f16 =
      _mm512_and_si512(_mm512_srai_epi16(high_halves, 1), _mm512_set1_epi16(-16385));  // ~0x4000
  const __m512 lo = _mm512_cvtph_ps(_mm512_castsi512_si256(f16));
  const __m512 hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(f16, 1));
  const __m512i bf16 = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
  const __mmask32 nan = _mm256_cmpeq_epi8_mask(_mm256_and_si256(bytes, _mm256_set1_epi8(0x7f)),
                                               _mm256_set1_epi8(0x7f));
  return _mm512_mask_mov_epi16(bf16, nan, _mm512_set1_epi16(0x7fc0));
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

// As PackedGemm (fp8_cpu_kernels.h), with tiles of bf16 pairs: per task (up to kBf16TileM
// activation rows x kTileN weight rows) and per 128-block of K, the weight tile is decoded once
// into b[pair][column] (the two bf16 of K pair p of weight row n in one 32-bit word: a 32-bit
// transpose of the decoded rows); each group of kBf16MicroRows activation rows is decoded in
// natural order (a row's pair p is its word p, broadcast to all lanes) and a 12 x 32 microkernel of
// vdpbf16ps accumulates the block, scaled into the task's totals. The tiling (and so which task
// computes an output, and in which order) depends only on the shape, never on the thread count.
// kAmx: the same tiles on AMX (amx_micro): 32-row groups, 256-row tasks; the b and a arrays are
// already laid out as AMX's B tiles (rows of K pairs) and A tiles (rows of a row's pairs).
template <bool kAmx>
struct PackedGemmBf16 {
  static constexpr int kMicroRows = kAmx ? kAmxMicroRows : kBf16MicroRows;
  static constexpr int kTaskRows = kAmx ? kAmxTileM : kBf16TileM;
  // Weight rows per task: AMX's tasks take two weight-scale blocks (each task decodes its
  // activation rows once per K block, so wider tasks decode them fewer times).
  static constexpr int kCols = kAmx ? 2 * kBlock : kTileN;
  static constexpr int kScaleBlocks = (kCols + kBlock - 1) / kBlock;  // weight-scale blocks
  const BlockGemmArgs& g;
  GemmEdges edges{g};
  alignas(64) uint32_t b[kPairs][kCols];
  alignas(64) float totals[kTaskRows][kCols];
  alignas(64) uint32_t a[kMicroRows][kPairs];
  alignas(64) uint32_t rows8[8][kPairs];
  alignas(64) float step_sums[kAmx ? kAmxMicroRows : 1][kBf16Nr];  // AMX: a step's four f32 tiles
  float row_scale[kMicroRows];

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

  // Rows [0, 32) of `a` (zeros past the group) times columns [n, n + 32) of `b` over `pairs` K
  // pairs (zeros past them up to a whole tile step), into totals.
  void amx_micro(int pairs, int m, int n, float block_scale) {
    constexpr int kARowBytes = kPairs * 4, kBRowBytes = kCols * 4, kCRowBytes = kBf16Nr * 4;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int p = 0; p < pairs; p += kAmxPairs) {
      _tile_loadd(4, &a[0][p], kARowBytes);
      _tile_loadd(5, &a[16][p], kARowBytes);
      _tile_loadd(6, &b[p][n], kBRowBytes);
      _tile_loadd(7, &b[p][n + 16], kBRowBytes);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, &step_sums[0][0], kCRowBytes);
    _tile_stored(1, &step_sums[0][16], kCRowBytes);
    _tile_stored(2, &step_sums[16][0], kCRowBytes);
    _tile_stored(3, &step_sums[16][16], kCRowBytes);
    for (int r = 0; r < kAmxMicroRows; ++r) {
      const __m512 scale = _mm512_set1_ps(row_scale[r] * block_scale);
      float* total = &totals[m + r][n];
      _mm512_storeu_ps(
          total, _mm512_fmadd_ps(_mm512_load_ps(&step_sums[r][0]), scale, _mm512_loadu_ps(total)));
      _mm512_storeu_ps(total + kBf16Lanes,
                       _mm512_fmadd_ps(_mm512_load_ps(&step_sums[r][kBf16Lanes]), scale,
                                       _mm512_loadu_ps(total + kBf16Lanes)));
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
    // Decoded: ceil(len / 32) * 16 pairs, a whole number of AMX steps (and of 8-pair transposes).
    const int pairs8 = ceil_div(len, 32) * 16;
    for (int n8 = 0; n8 < kCols; n8 += 8) {
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
                            reinterpret_cast<float*>(&b[p8][n8]), kCols);
    }
  }

  void task(int64_t m0, int rows, int64_t n0, int cols) {
    for (int r = 0; r < rows; ++r) std::memset(totals[r], 0, sizeof totals[r]);
    for (int64_t kb = 0; kb * kBlock < g.k; ++kb) {
      const int64_t k0 = kb * kBlock;
      const int len = static_cast<int>(lesser<int64_t>(kBlock, g.k - k0));
      const int pairs = ceil_div(len, 2);  // an odd len's last pair ends in a decoded zero
      decode_weight_tile(n0, cols, k0, len);
      // Each weight-scale block's factor (AMX: per block of the task's columns; the row's
      // factor is the activation scale times it, in that order, as below).
      float block_scale[kScaleBlocks];
      for (int j = 0; j < kScaleBlocks; ++j)
        block_scale[j] = j * kBlock < cols
                             ? edges.b_scale(n0 + j * kBlock, kb) * (kDecodeScale * kDecodeScale)
                             : 0.0f;
      for (int m = 0; m < rows; m += kMicroRows) {
        const int group = lesser(kMicroRows, rows - m);
        for (int r = 0; r < group; ++r) {
          const uint8_t* row_block = g.a + (m0 + m + r) * g.a_row_stride + k0;
          prefetch_ahead(row_block, k0, g.k);
          decode_row(row_block, len, reinterpret_cast<uint16_t*>(a[r]));
          row_scale[r] = edges.a_scale(m0 + m + r, kb) * (kAmx ? 1.0f : block_scale[0]);
        }
        if constexpr (kAmx) {
          // The tiles take whole groups: rows past it multiply zeros into totals never stored.
          for (int r = group; r < kMicroRows; ++r) {
            std::memset(a[r], 0, sizeof a[r]);
            row_scale[r] = 0.0f;
          }
          for (int n = 0; n < cols; n += kBf16Nr) amx_micro(pairs, m, n, block_scale[n / kBlock]);
        } else {
          for (int n = 0; n < cols; n += kBf16Nr) micro_rows(group, pairs, m, n);
        }
      }
    }
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < cols; ++c) edges.store(m0 + r, n0 + c, totals[r][c]);
  }
};

template <bool kAmx>
void packed_gemm_bf16(const BlockGemmArgs& g) {
  using Kernel = PackedGemmBf16<kAmx>;
  // As packed_gemm (fp8_cpu_kernels.h): row tiles of equal height in whole micro rows, a function
  // of M alone (so each output's sum, and the task that computes it, do not depend on threads).
  const int64_t m_tiles = ceil_div<int64_t>(g.m, Kernel::kTaskRows);
  const int64_t tile_m = lesser<int64_t>(
      Kernel::kTaskRows,
      ceil_div<int64_t>(ceil_div(g.m, m_tiles), Kernel::kMicroRows) * Kernel::kMicroRows);
  const int64_t n_tiles = ceil_div<int64_t>(g.n, Kernel::kCols);
  const int64_t tasks = m_tiles * n_tiles;
  const int threads =
      thread_count(g.num_threads, tasks, static_cast<double>(g.m) * g.n * (g.k + 1));
#pragma omp parallel num_threads(threads)
  {
    if constexpr (kAmx) {
      const AmxConfig config;
      _tile_loadconfig(&config);  // per thread: the tile registers are thread state
    }
    Kernel kernel(g);  // per-thread tiles, on this thread's stack
#pragma omp for schedule(dynamic)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t m0 = (t / n_tiles) * tile_m, n0 = (t % n_tiles) * Kernel::kCols;
      kernel.task(m0, static_cast<int>(lesser<int64_t>(tile_m, g.m - m0)), n0,
                  static_cast<int>(lesser<int64_t>(Kernel::kCols, g.n - n0)));
    }
    if constexpr (kAmx) _tile_release();
  }
}

}  // namespace

void block_gemm_avx512bf16(const BlockGemmArgs& g) { packed_gemm_bf16<false>(g); }
void block_gemm_amx(const BlockGemmArgs& g) { packed_gemm_bf16<true>(g); }

}  // namespace moekit::cpu
