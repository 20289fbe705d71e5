// The packed (M >= kAmxMinM) block-scaled FP8 GEMM on AMX tile dot products (TDPBF16PS). Compiled
// with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16 -mamx-tile -mamx-bf16 -mfma -mf16c
// -mbmi2; called only when cpu_features().amx_bf16 (the dispatch entry cpu.amx).
//
// The weights are the tiles' A operand and the activations their B operand, so that neither needs
// a transpose per task: a weight row decodes (fp8_cpu_bf16_decode.h, exact bf16 of value x 2^-8)
// straight into an A tile's row of K pairs, and the activations are decoded once per call into a
// panel already laid out as B tiles (per 32 rows and K block: [pair][row] words, the two bf16 of a
// K pair in one 32-bit word), which every task reads. A step multiplies 32 weight rows (two A
// tiles) by 32 activation rows (two B tiles) over a K block into four 16 x 16 f32 tiles (the 8 tile
// registers); the tiles are stored and scaled into the task's totals [weight row][activation row]
// with that K block's activation scales (a vector along the rows) times its weight-scale factor.
//
// Exactness as in fp8_cpu_avx512bf16.cpp: the bf16 values are the e4m3 ones x 2^-8 exactly,
// TDPBF16PS multiplies them exactly and adds in K order in f32 (round to nearest even; its
// denormal flushing cannot matter, every product being at least 2^-34). Which operand is A does
// not change a product or the order of the sums, so the results are those of the bf16 kernel's
// tiles; only the summation order differs from the f32 kernel. The tiling (and so which task
// computes an output, and in which order) depends only on the shape, never on the thread count.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // as in fp8_cpu_avx512bf16.cpp
#endif

#include <immintrin.h>

#include "cpu/fp8_cpu_avx2.h"
#include "cpu/fp8_cpu_bf16_decode.h"
#include "cpu/fp8_cpu_kernels.h"

namespace moekit::cpu {
namespace {

constexpr int kPairs = kBlock / 2;    // bf16 pairs per K block
constexpr int kTilePairs = 16;        // K pairs per tile (rows of 64 bytes)
constexpr int kStep = 32;             // weight rows (two A tiles) and activation rows (two B tiles)
constexpr int kTaskRows = 8 * kStep;  // activation rows per task (M = 256 in one weight pass)
constexpr int kTaskCols = 2 * kBlock;  // weight rows per task: two weight-scale blocks
constexpr int kChunkTiles = 2;         // row tiles per panel, at least
constexpr int kChunkBlocks = 8;        // K blocks per chunk of a task's loop (run)
constexpr int64_t kPanelBlockWords = int64_t{kPairs} * kStep;  // 32 rows x one K block: 8 KB

// The tile shapes of every build here: 8 tiles of 16 rows x 64 bytes (palette 1).
struct alignas(64) AmxConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

// The row tiling, a function of M alone: row tiles of equal height in whole steps.
struct RowTiling {
  int64_t tiles = 0, height = 0;
  explicit RowTiling(int64_t m)
      : tiles(ceil_div<int64_t>(m, kTaskRows)),
        height(lesser<int64_t>(kTaskRows, ceil_div<int64_t>(ceil_div(m, tiles), kStep) * kStep)) {}
  // Row tiles per panel: kChunkTiles, or more where that leaves a thread fewer than two tasks
  // (which rows share a panel changes no sum: only when they are decoded).
  int64_t panel_tiles(int64_t n_tiles, int threads) const {
    const int64_t wanted = ceil_div<int64_t>(2 * int64_t{threads}, n_tiles);
    return lesser<int64_t>(tiles, wanted > kChunkTiles ? wanted : kChunkTiles);
  }
  // Bytes of a panel of `panel` row tiles (the last panel may be shorter).
  int64_t panel_bytes(int64_t m, int64_t k, int64_t panel) const {
    const int64_t rows = ceil_div<int64_t>(lesser<int64_t>(m, panel * height), kStep) * kStep;
    return rows / kStep * ceil_div<int64_t>(k, kBlock) * kPanelBlockWords * 4;
  }
};

// Rows [row0, row0 + rows) (rows <= 32) of K block kb, as the panel's B tiles: dst[pair][row].
// Rows past `rows` and K past the block's length are zeros.
void decode_panel_block(const BlockGemmArgs& g, int64_t row0, int rows, int64_t kb, uint32_t* dst) {
  const int64_t k0 = kb * kBlock;
  const int len = static_cast<int>(lesser<int64_t>(kBlock, g.k - k0));
  alignas(64) uint32_t decoded[16][kPairs];
  for (int half = 0; half < 2; ++half) {
    for (int i = 0; i < 16; ++i) {
      const int r = half * 16 + i;
      if (r < rows) {
        const uint8_t* row_block = g.a + (row0 + r) * g.a_row_stride + k0;
        prefetch_ahead(row_block, k0, g.k);
        decode_row(row_block, len, reinterpret_cast<uint16_t*>(decoded[i]));
        const int decoded_pairs = ceil_div(len, 32) * 16;
        std::memset(decoded[i] + decoded_pairs, 0, (kPairs - decoded_pairs) * 4);
      } else {
        std::memset(decoded[i], 0, sizeof decoded[i]);
      }
    }
    // A 32-bit transpose moves bits unchanged (NaN payloads included).
    for (int p8 = 0; p8 < kPairs; p8 += 8)
      for (int i8 = 0; i8 < 16; i8 += 8)
        Avx2::transpose_8x8(reinterpret_cast<const float*>(&decoded[i8][p8]), kPairs,
                            reinterpret_cast<float*>(dst + p8 * kStep + half * 16 + i8), kStep);
  }
}

// One task: activation rows [m0, m0 + rows) by weight rows [n0, n0 + cols), from the panel of the
// chunk that starts at row panel0. Per thread (256 KB of totals, on the thread's stack).
struct AmxTask {
  const BlockGemmArgs& g;
  GemmEdges edges{g};
  alignas(64) float totals[kTaskCols][kTaskRows];        // [weight row][activation row]
  alignas(64) uint32_t weights[kStep][kPairs];           // a step's weight rows, decoded: A tiles
  alignas(64) float sums[kStep][kStep];                  // a step's four f32 tiles, stored
  alignas(64) float row_scale[kChunkBlocks][kTaskRows];  // the K chunk's activation scales

  explicit AmxTask(const BlockGemmArgs& args) : g(args) {}

  // Weight rows [n, n + 32) of K block kb (len bytes) into `weights` (zero rows past cols).
  void decode_weights(int64_t n, int rows, int64_t k0, int len) {
    for (int r = 0; r < kStep; ++r) {
      if (r < rows) {
        decode_row(g.b + (n + r) * g.b_row_stride + k0, len,
                   reinterpret_cast<uint16_t*>(weights[r]));
      } else {
        std::memset(weights[r], 0, sizeof weights[r]);  // past N: zero rows, never stored
      }
    }
  }

  // Requests the 32 weight rows from n of the K block at k0 into L1, a step ahead of their
  // decode (the rows sit K bytes apart: too many streams for the hardware prefetchers).
  void prefetch_weights(int64_t n, int rows, int64_t k0, int len) const {
    for (int r = 0; r < rows; ++r) {
      const uint8_t* row_block = g.b + (n + r) * g.b_row_stride + k0;
      _mm_prefetch(reinterpret_cast<const char*>(row_block), _MM_HINT_T0);
      if (len > 64) _mm_prefetch(reinterpret_cast<const char*>(row_block + 64), _MM_HINT_T0);
    }
  }

  // `weights` times the panel block's 32 rows over `pairs` K pairs (a whole number of tile
  // steps), scaled into totals[n..n+32)[m..m+32).
  void step(const uint32_t* block, int pairs, int n, int m, const float* scales,
            float block_scale) {
    constexpr int kWeightRowBytes = kPairs * 4, kPanelRowBytes = kStep * 4;
    constexpr int kSumRowBytes = kStep * 4;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int p = 0; p < pairs; p += kTilePairs) {
      _tile_loadd(4, &weights[0][p], kWeightRowBytes);
      _tile_loadd(5, &weights[16][p], kWeightRowBytes);
      _tile_loadd(6, block + p * kStep, kPanelRowBytes);
      _tile_loadd(7, block + p * kStep + 16, kPanelRowBytes);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, &sums[0][0], kSumRowBytes);
    _tile_stored(1, &sums[0][16], kSumRowBytes);
    _tile_stored(2, &sums[16][0], kSumRowBytes);
    _tile_stored(3, &sums[16][16], kSumRowBytes);
    // The factor of an activation row: its scale times the weight block's, in that order.
    const __m512 factor = _mm512_set1_ps(block_scale);
    const __m512 scale0 = _mm512_mul_ps(_mm512_load_ps(&scales[m]), factor);
    const __m512 scale1 = _mm512_mul_ps(_mm512_load_ps(&scales[m + 16]), factor);
    for (int r = 0; r < kStep; ++r) {
      float* total = &totals[n + r][m];
      _mm512_store_ps(total,
                      _mm512_fmadd_ps(_mm512_load_ps(&sums[r][0]), scale0, _mm512_load_ps(total)));
      _mm512_store_ps(total + 16, _mm512_fmadd_ps(_mm512_load_ps(&sums[r][16]), scale1,
                                                  _mm512_load_ps(total + 16)));
    }
  }

  // K blocks in chunks, so that a weight step's slice of the totals stays in L1 over the chunk
  // (the chunk's panel, 256 rows x 8 blocks = 512 KB, in L2); within the chunk each weight step's
  // blocks in order, so that every total still sums its blocks in K order.
  void run(const uint32_t* panel, int64_t panel0, int64_t m0, int rows, int64_t n0, int cols) {
    const int64_t k_blocks = ceil_div<int64_t>(g.k, kBlock);
    const int padded_rows = ceil_div(rows, kStep) * kStep;
    for (int c = 0; c < cols; ++c) std::memset(totals[c], 0, padded_rows * sizeof(float));
    for (int64_t chunk = 0; chunk < k_blocks; chunk += kChunkBlocks) {
      const int blocks = static_cast<int>(lesser<int64_t>(kChunkBlocks, k_blocks - chunk));
      for (int j = 0; j < blocks; ++j)
        for (int r = 0; r < padded_rows; ++r)
          row_scale[j][r] = r < rows ? edges.a_scale(m0 + r, chunk + j) : 0.0f;
      for (int n = 0; n < cols; n += kStep) {
        const int step_rows = lesser(kStep, cols - n);
        for (int j = 0; j < blocks; ++j) {
          const int64_t kb = chunk + j, k0 = kb * kBlock;
          const int len = block_length(kb);
          decode_weights(n0 + n, step_rows, k0, len);
          if (j + 1 < blocks) {  // the step's next block, or the next step's first
            prefetch_weights(n0 + n, step_rows, k0 + kBlock, block_length(kb + 1));
          } else if (n + kStep < cols) {
            prefetch_weights(n0 + n + kStep, lesser(kStep, cols - n - kStep), chunk * kBlock,
                             block_length(chunk));
          }
          const int pairs = ceil_div(len, 32) * kTilePairs;  // whole tile steps (zeros past len)
          const float block_scale = edges.b_scale(n0 + n, kb) * (kDecodeScale * kDecodeScale);
          for (int m = 0; m < padded_rows; m += kStep) {
            const int64_t group = (m0 - panel0 + m) / kStep;
            step(panel + (group * k_blocks + kb) * kPanelBlockWords, pairs, n, m, row_scale[j],
                 block_scale);
          }
        }
      }
    }
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < cols; ++c) edges.store(m0 + r, n0 + c, totals[c][r]);
  }

  int block_length(int64_t kb) const {
    return static_cast<int>(lesser<int64_t>(kBlock, g.k - kb * kBlock));
  }
};

}  // namespace

int64_t block_gemm_amx_workspace_bytes(int64_t m, int64_t n, int64_t k, int threads) {
  const RowTiling tiling(m);
  return tiling.panel_bytes(m, k, tiling.panel_tiles(ceil_div<int64_t>(n, kTaskCols), threads));
}

void block_gemm_amx(const BlockGemmArgs& g, void* workspace, int64_t workspace_bytes) {
  const RowTiling tiling(g.m);
  const int64_t k_blocks = ceil_div<int64_t>(g.k, kBlock);
  const int64_t n_tiles = ceil_div<int64_t>(g.n, kTaskCols);
  auto* panel = static_cast<uint32_t*>(workspace);
  const int threads = thread_count(g.num_threads, tiling.tiles * n_tiles,
                                   static_cast<double>(g.m) * g.n * (g.k + 1));
  // As many row tiles per panel as this thread count wants, or as the workspace holds.
  const int64_t tile_bytes = tiling.height / kStep * k_blocks * kPanelBlockWords * 4;
  const int64_t panel_tiles = lesser<int64_t>(
      tiling.panel_tiles(n_tiles, threads),
      workspace_bytes / tile_bytes > kChunkTiles ? workspace_bytes / tile_bytes : kChunkTiles);
#pragma omp parallel num_threads(threads)
  {
    const AmxConfig config;
    _tile_loadconfig(&config);  // per thread: the tile registers are thread state
    AmxTask task(g);            // per-thread totals, on this thread's stack
    for (int64_t chunk = 0; chunk < tiling.tiles; chunk += panel_tiles) {
      const int64_t panel0 = chunk * tiling.height;
      const int64_t chunk_tiles = lesser<int64_t>(panel_tiles, tiling.tiles - chunk);
      const int64_t panel_end = lesser<int64_t>(g.m, panel0 + chunk_tiles * tiling.height);
      const int64_t groups = ceil_div<int64_t>(panel_end - panel0, kStep);
      // The chunk's activations, once (each thread's share; the barrier ends the loop).
#pragma omp for schedule(static)
      for (int64_t u = 0; u < groups * k_blocks; ++u) {
        const int64_t group = u / k_blocks, kb = u % k_blocks;
        const int64_t row0 = panel0 + group * kStep;
        decode_panel_block(g, row0, static_cast<int>(lesser<int64_t>(kStep, panel_end - row0)), kb,
                           panel + u * kPanelBlockWords);
      }
      // Its tasks (the loop's barrier keeps the panel until every task is done).
#pragma omp for schedule(dynamic)
      for (int64_t t = 0; t < chunk_tiles * n_tiles; ++t) {
        const int64_t m0 = panel0 + (t / n_tiles) * tiling.height;
        const int64_t n0 = (t % n_tiles) * kTaskCols;
        task.run(panel, panel0, m0, static_cast<int>(lesser<int64_t>(tiling.height, g.m - m0)), n0,
                 static_cast<int>(lesser<int64_t>(kTaskCols, g.n - n0)));
      }
    }
    _tile_release();
  }
}

}  // namespace moekit::cpu
