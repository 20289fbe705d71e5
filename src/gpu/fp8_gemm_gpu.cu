// Portable GPU block-scaled FP8 GEMM (spec/fp8.md): out = A x B^T with 1 x 128 activation scales
// (any of the four layouts) and 128 x 128 weight scales (f32 or bf16, any strides), plus bias.
// It serves every valid call (it is the GPU fallback after the tensor-core kernels) and is tuned
// for decode, where M is small and the time is the weight's bytes over memory bandwidth.
//
// Each 128-wide k-block's dot products are summed in f32 from exact values (every e4m3 value is
// an f16 and a product of two is exact in f32), then scaled by As[m, kb] * Bs[n / 128, kb] and
// added to the f32 total. Every sum has a fixed order (no atomics): bitwise deterministic.
//
// Two kernels:
// - cuda_cores: a block takes 4 weight rows and kM activation rows; its threads split K in
//   16-byte chunks (thread t takes chunks t, t + blockDim, ...), so every block has all its weight
//   bytes in flight at once. A thread decodes a chunk of A once for the 4 weight rows, sums 16
//   products per (m, n) and scales the sum into its total; warps reduce by shuffles, then the
//   warps' sums are added in warp order. Used for M <= 2 (two FMAs per weight byte at most) and
//   wherever the vendor has no matrix-unit API.
// - matrix_units (vendor::wmma, f16 inputs, f32 accumulators): a block takes 16 weight rows and
//   16 * kMTiles activation rows; its 8 warps take alternate k-blocks. A warp decodes the k-block's
//   16 x 128 weight bytes and its activation bytes into f16 tiles in shared memory, multiplies them
//   (8 steps of k = 16) into a fresh accumulator, stores it to shared memory and scales each
//   element into its total; the next k-block's bytes are loaded while this one multiplies (two
//   k-blocks in flight for M <= 16). Used for M >= 3: the matrix units do the multiplications, so
//   the cost per weight byte no longer grows with M.
// Both read rows with 16-byte loads where pointers and row strides allow, else 4-byte or single
// byte loads; bytes past K (and rows past M or N) are zeros.
#include <algorithm>
#include <cstdint>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "gpu/fp8_gpu.h"
#include "gpu/gpu_check.h"
#include "gpu/gpu_runtime.h"
#include "gpu/vendor.h"

namespace moekit::gpu {

namespace {

constexpr int kChunkBytes = 16;
constexpr int kChunksPerBlock = kFp8BlockSize / kChunkBytes;  // 8 chunks per k-block

enum class Wide : int { f32, f16, bf16 };

// One call, by value (graph-capturable).
struct GemmArgs {
  const uint8_t* a;
  int64_t a_row_stride;  // bytes
  int a_load_bytes;      // widest load the rows allow: 16, 4 or 1
  const uint8_t* b;
  int64_t b_row_stride;
  int b_load_bytes;
  const void* a_scales;  // f32, or i32 words when packed
  int64_t a_scale_row_stride, a_scale_group_stride;
  bool a_scales_packed;
  const void* b_scales;
  int64_t b_scale_row_stride, b_scale_col_stride;
  bool b_scales_bf16;
  const void* bias;  // nullptr when there is none
  int64_t bias_stride;
  Wide bias_type;
  void* out;
  int64_t out_row_stride;
  Wide out_type;
  int64_t m, n, k, k_blocks;
  int64_t m_tiles;  // activation-row tiles per weight tile
  int64_t tiles;    // m_tiles * weight tiles: what the blocks take, m_tiles fastest
};

// ---- Scalar reads and the output.

__device__ __forceinline__ float a_scale(const GemmArgs& g, int64_t m, int64_t kb) {
  if (g.a_scales_packed) {  // byte kb % 4 of word kb / 4: the power of two 2^(byte - 127)
    const int64_t word = m * g.a_scale_row_stride + (kb >> 2) * g.a_scale_group_stride;
    const uint32_t byte = __ldg(static_cast<const uint8_t*>(g.a_scales) + word * 4 + (kb & 3));
    return __uint_as_float(byte << 23);
  }
  return __ldg(static_cast<const float*>(g.a_scales) + m * g.a_scale_row_stride +
               kb * g.a_scale_group_stride);
}

__device__ __forceinline__ float b_scale(const GemmArgs& g, int64_t nb, int64_t kb) {
  const int64_t i = nb * g.b_scale_row_stride + kb * g.b_scale_col_stride;
  if (g.b_scales_bf16)
    return __uint_as_float(
        static_cast<uint32_t>(__ldg(static_cast<const unsigned short*>(g.b_scales) + i)) << 16);
  return __ldg(static_cast<const float*>(g.b_scales) + i);
}

__device__ __forceinline__ float load_wide(const void* base, Wide type, int64_t i) {
  switch (type) {
    case Wide::f32:
      return __ldg(static_cast<const float*>(base) + i);
    case Wide::bf16:
      return __uint_as_float(
          static_cast<uint32_t>(__ldg(static_cast<const unsigned short*>(base) + i)) << 16);
    case Wide::f16:
      return vendor::half_bits_to_float(__ldg(static_cast<const unsigned short*>(base) + i));
  }
  return 0.0f;
}

// f32 -> bf16 bits, to nearest even, as moekit::f32_to_bf16 (NaN stays a quiet NaN).
__device__ __forceinline__ uint16_t bf16_bits(float f) {
  const uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// out[m, n] = total (+ bias[n]), rounded once to the out dtype (to nearest even).
__device__ __forceinline__ void store_out(const GemmArgs& g, int64_t m, int64_t n, float total) {
  if (g.bias != nullptr) total += load_wide(g.bias, g.bias_type, n * g.bias_stride);
  const int64_t i = m * g.out_row_stride + n;
  switch (g.out_type) {
    case Wide::f32:
      static_cast<float*>(g.out)[i] = total;
      break;
    case Wide::bf16:
      static_cast<uint16_t*>(g.out)[i] = bf16_bits(total);
      break;
    case Wide::f16:
      static_cast<uint16_t*>(g.out)[i] = __half_as_ushort(__float2half_rn(total));
      break;
  }
}

// ---- Byte chunks.

// Bytes [col, col + 16) of a row, zero at and past `end`, one at a time: chunks at the end of a
// row and rows that allow no wider loads. Out of line, so that the kernels' loops stay small.
__device__ __noinline__ uint4 load_chunk_bytes(const uint8_t* row, int64_t col, int64_t end) {
  uint32_t w[4] = {0, 0, 0, 0};
  for (int i = 0; i < kChunkBytes && col + i < end; ++i)
    w[i / 4] |= static_cast<uint32_t>(__ldg(row + col + i)) << (8 * (i % 4));
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// Bytes [col, col + 16) of a row (col a multiple of 16), zero at and past `end`.
__device__ __forceinline__ uint4 load_chunk(const uint8_t* row, int64_t col, int64_t end,
                                            int load_bytes) {
  if (col + kChunkBytes <= end) {
    if (load_bytes == 16) return __ldg(reinterpret_cast<const uint4*>(row + col));
    if (load_bytes == 4) {
      const auto* p = reinterpret_cast<const unsigned int*>(row + col);
      return make_uint4(__ldg(p), __ldg(p + 1), __ldg(p + 2), __ldg(p + 3));
    }
  }
  if (col >= end) return make_uint4(0, 0, 0, 0);
  return load_chunk_bytes(row, col, end);
}

// 16 e4m3 bytes -> 8 words of f16 pairs (exact), in byte order.
__device__ __forceinline__ void decode_to_halves(const uint4& bytes, uint32_t (&halves)[8]) {
  const uint32_t words[4] = {bytes.x, bytes.y, bytes.z, bytes.w};
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    halves[2 * w] = vendor::e4m3x2_to_half2_bits(words[w] & 0xffffu);
    halves[2 * w + 1] = vendor::e4m3x2_to_half2_bits(words[w] >> 16);
  }
}

// 16 e4m3 bytes -> 16 f32 (exact).
__device__ __forceinline__ void decode_to_floats(const uint4& bytes, float (&f)[kChunkBytes]) {
  uint32_t halves[8];
  decode_to_halves(bytes, halves);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    f[2 * i] = vendor::half_bits_to_float(static_cast<uint16_t>(halves[i]));
    f[2 * i + 1] = vendor::half_bits_to_float(static_cast<uint16_t>(halves[i] >> 16));
  }
}

// ---- cuda_cores kernel.

constexpr int kCoreRows = 4;      // weight rows per tile (same 128-row scale block)
constexpr int kCoreMaxWarps = 8;  // threads split K: up to 8 warps per block
constexpr int kCoreChunksPerThread = 2;

// One thread's loads for one step of a tile: kSteps chunks of the kCoreRows weight rows and of the
// kM activation rows, and their scales.
template <int kM, int kSteps>
struct CoreBatch {
  uint4 w[kSteps][kCoreRows];
  uint4 a[kSteps][kM];
  float as[kSteps][kM];
  float bs[kSteps];
};

// A block walks (tile, batch) steps: batch b of a tile is chunks [b, b + 1) * kSteps * blockDim,
// thread t taking chunks t, t + blockDim, ... of it.
struct CoreStep {
  int64_t tile, batch;
  int64_t m0, n0;  // the tile's first activation and weight rows
};

template <int kM>
__device__ __forceinline__ CoreStep core_step(const GemmArgs& g, int64_t tile) {
  return {tile, 0, (tile % g.m_tiles) * kM, (tile / g.m_tiles) * kCoreRows};
}

template <int kM, int kSteps>
__device__ __forceinline__ void load_core_batch(const GemmArgs& g, const CoreStep& step,
                                                bool vectors, CoreBatch<kM, kSteps>& b) {
  const int64_t threads = blockDim.x;
  const int64_t first = step.batch * kSteps * threads + threadIdx.x;  // this thread's first chunk
  const int64_t nb = step.n0 / kFp8BlockSize;
  // The common case, decided once per batch: every row inside the matrix, every chunk whole and
  // 16-byte aligned.
  if (vectors && step.n0 + kCoreRows <= g.n && step.m0 + kM <= g.m &&
      (first + (kSteps - 1) * threads + 1) * kChunkBytes <= g.k) {
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      const int64_t c = first + s * threads;
      const int64_t col = c * kChunkBytes;
#pragma unroll
      for (int r = 0; r < kCoreRows; ++r)
        b.w[s][r] =
            __ldg(reinterpret_cast<const uint4*>(g.b + (step.n0 + r) * g.b_row_stride + col));
#pragma unroll
      for (int i = 0; i < kM; ++i) {
        b.a[s][i] =
            __ldg(reinterpret_cast<const uint4*>(g.a + (step.m0 + i) * g.a_row_stride + col));
        b.as[s][i] = a_scale(g, step.m0 + i, c / kChunksPerBlock);
      }
      b.bs[s] = b_scale(g, nb, c / kChunksPerBlock);
    }
    return;
  }
  // Anything else (the last chunks of K, rows past M or N, narrower loads); absent chunks are
  // zeros with zero scales, so they add nothing.
#pragma unroll
  for (int s = 0; s < kSteps; ++s) {
    const int64_t c = first + s * threads;
    const bool present = c * kChunkBytes < g.k;
    const int64_t col = c * kChunkBytes, kb = present ? c / kChunksPerBlock : 0;
#pragma unroll
    for (int r = 0; r < kCoreRows; ++r) {
      const int64_t n = step.n0 + r;
      b.w[s][r] =
          load_chunk(g.b + n * g.b_row_stride, col, present && n < g.n ? g.k : 0, g.b_load_bytes);
    }
#pragma unroll
    for (int i = 0; i < kM; ++i) {
      const int64_t m = step.m0 + i;
      const bool row = present && m < g.m;
      b.a[s][i] = load_chunk(g.a + m * g.a_row_stride, col, row ? g.k : 0, g.a_load_bytes);
      b.as[s][i] = row ? a_scale(g, m, kb) : 0.0f;
    }
    b.bs[s] = present ? b_scale(g, nb, kb) : 0.0f;
  }
}

template <int kM, int kSteps>
__device__ __forceinline__ void accumulate_core_batch(const CoreBatch<kM, kSteps>& b,
                                                      float (&total)[kM][kCoreRows]) {
#pragma unroll
  for (int s = 0; s < kSteps; ++s) {
    float a_values[kM][kChunkBytes];
#pragma unroll
    for (int i = 0; i < kM; ++i) decode_to_floats(b.a[s][i], a_values[i]);
#pragma unroll
    for (int r = 0; r < kCoreRows; ++r) {
      float w_values[kChunkBytes];
      decode_to_floats(b.w[s][r], w_values);
#pragma unroll
      for (int i = 0; i < kM; ++i) {
        float even = 0.0f, odd = 0.0f;  // two chains: half the dependent latency
#pragma unroll
        for (int j = 0; j < kChunkBytes; j += 2) {
          even = fmaf(a_values[i][j], w_values[j], even);
          odd = fmaf(a_values[i][j + 1], w_values[j + 1], odd);
        }
        total[i][r] = fmaf((even + odd) * b.as[s][i], b.bs[s], total[i][r]);
      }
    }
  }
}

// Blocks stay resident and walk their steps as a pipeline: the next step's loads are issued before
// this step's math (two register sets, used in turn), so the weight stream never stops. A tile's
// sums are reduced after its last batch: butterfly sums in each warp (the same bits in every
// lane), then the warps' sums in warp order.
template <int kM, int kSteps>
__global__ void __launch_bounds__(kCoreMaxWarps* kLanes) gemm_cuda_cores_kernel(const GemmArgs g) {
  __shared__ float warp_sums[kCoreMaxWarps][kM * kCoreRows];
  const int lane = vendor::lane_id();
  const int warp = static_cast<int>(threadIdx.x) / kLanes;
  const int warps = static_cast<int>(blockDim.x) / kLanes;
  const bool vectors = g.a_load_bytes == 16 && g.b_load_bytes == 16;
  const int64_t chunks = (g.k + kChunkBytes - 1) / kChunkBytes;
  const int64_t per_batch = int64_t{kSteps} * blockDim.x;
  const int64_t batches = chunks > 0 ? (chunks + per_batch - 1) / per_batch : 1;

  float total[kM][kCoreRows];
#pragma unroll
  for (int i = 0; i < kM; ++i)
#pragma unroll
    for (int r = 0; r < kCoreRows; ++r) total[i][r] = 0.0f;

  // One step: start loading the next step into `upcoming`, add this one's products, and finish the
  // tile after its last batch.
  CoreStep step = core_step<kM>(g, blockIdx.x);
  auto run_step = [&](const CoreBatch<kM, kSteps>& current, CoreBatch<kM, kSteps>& upcoming) {
    CoreStep next = step;
    if (++next.batch == batches) next = core_step<kM>(g, step.tile + gridDim.x);
    // Past the last step: this step's bytes again (never used).
    CoreStep load = next;
    if (next.tile >= g.tiles) load = step;
    load_core_batch(g, load, vectors, upcoming);
    accumulate_core_batch(current, total);
    if (next.batch == 0) {  // the tile is complete
#pragma unroll
      for (int i = 0; i < kM; ++i) {
#pragma unroll
        for (int r = 0; r < kCoreRows; ++r) {
          float v = total[i][r];
#pragma unroll
          for (int offset = kLanes / 2; offset > 0; offset >>= 1) v += vendor::shfl_xor(v, offset);
          if (lane == 0) warp_sums[warp][i * kCoreRows + r] = v;
          total[i][r] = 0.0f;
        }
      }
      __syncthreads();
      if (threadIdx.x < kM * kCoreRows) {
        const int64_t m = step.m0 + threadIdx.x / kCoreRows;
        const int64_t n = step.n0 + threadIdx.x % kCoreRows;
        float sum = 0.0f;
        for (int w = 0; w < warps; ++w) sum += warp_sums[w][threadIdx.x];
        if (m < g.m && n < g.n) store_out(g, m, n, sum);
      }
      __syncthreads();  // warp_sums is rewritten by the next tile
    }
    step = next;
  };

  CoreBatch<kM, kSteps> x, y;
  if (step.tile < g.tiles) load_core_batch(g, step, vectors, x);
  while (step.tile < g.tiles) {
    run_step(x, y);
    if (step.tile >= g.tiles) break;
    run_step(y, x);
  }
}

// ---- matrix_units kernel.

#if MOEKIT_GPU_HAS_WMMA
namespace wmma = vendor::wmma;

constexpr int kTileRows = 16;    // weight rows per block, activation rows per tile
constexpr int kMatrixWarps = 8;  // warps per block, taking alternate k-blocks
constexpr int kMatrixThreads = kMatrixWarps * kLanes;
constexpr int kPitch = kFp8BlockSize + 8;  // halves per staged row: conflict-free fragments
constexpr int kProductPitch = 20;          // floats per accumulator row: few bank conflicts
constexpr int kStagedBytes = kTileRows * kPitch * 2;  // one f16 tile: 4352
constexpr int kProductBytes = kTileRows * kProductPitch * 4;
constexpr int kWarpSharedBytes = 2 * kStagedBytes + kProductBytes + 256;  // + a scales: 10240
constexpr int kMatrixSharedBytes = kMatrixWarps * kWarpSharedBytes;       // 81920
static_assert(kWarpSharedBytes % 128 == 0, "each warp's shared memory stays 128-byte aligned");

// One k-block of a warp in registers. Load c of a lane covers row 4 c + lane / 8 of the tile,
// bytes [16 (lane % 8), + 16) of the k-block, so that each load instruction reads 4 whole rows.
template <int kMTiles, int kActChunks>
struct KBlockBytes {
  uint4 w[4];
  uint4 a[kMTiles][kActChunks];  // kActChunks = 2: only activation rows 0-7 (M <= 8)
  float as[(kTileRows * kMTiles + kLanes - 1) / kLanes];  // rows lane, lane + 32
  float bs;
};

template <int kMTiles, int kActChunks>
__device__ __forceinline__ void load_k_block(const GemmArgs& g, int64_t m0, int64_t n0, int64_t kb,
                                             bool vectors,
                                             KBlockBytes<kMTiles, kActChunks>& bytes) {
  const int lane = vendor::lane_id();
  const int64_t col = kb * kFp8BlockSize + (lane % 8) * kChunkBytes;
  if (vectors && (kb + 1) * kFp8BlockSize <= g.k) {  // whole k-block, aligned rows
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int64_t n = n0 + 4 * c + lane / 8;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (n < g.n) v = __ldg(reinterpret_cast<const uint4*>(g.b + n * g.b_row_stride + col));
      bytes.w[c] = v;
    }
#pragma unroll
    for (int t = 0; t < kMTiles; ++t) {
#pragma unroll
      for (int c = 0; c < kActChunks; ++c) {
        const int64_t m = m0 + t * kTileRows + 4 * c + lane / 8;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (m < g.m) v = __ldg(reinterpret_cast<const uint4*>(g.a + m * g.a_row_stride + col));
        bytes.a[t][c] = v;
      }
    }
  } else {  // the last, partial k-block, or rows that allow no 16-byte loads
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int64_t n = n0 + 4 * c + lane / 8;
      bytes.w[c] = load_chunk(g.b + n * g.b_row_stride, col, n < g.n ? g.k : 0, g.b_load_bytes);
    }
#pragma unroll
    for (int t = 0; t < kMTiles; ++t) {
#pragma unroll
      for (int c = 0; c < kActChunks; ++c) {
        const int64_t m = m0 + t * kTileRows + 4 * c + lane / 8;
        bytes.a[t][c] =
            load_chunk(g.a + m * g.a_row_stride, col, m < g.m ? g.k : 0, g.a_load_bytes);
      }
    }
  }
#pragma unroll
  for (int s = 0; s < static_cast<int>(sizeof(bytes.as) / sizeof(float)); ++s) {
    const int64_t i = lane + s * kLanes;
    bytes.as[s] = i < kTileRows * kMTiles && m0 + i < g.m ? a_scale(g, m0 + i, kb) : 0.0f;
  }
  bytes.bs = b_scale(g, n0 / kFp8BlockSize, kb);
}

// Decodes a lane's chunks into the f16 tile (chunk c: row 4 c + lane / 8, columns
// 16 (lane % 8)...).
template <int kChunks>
__device__ __forceinline__ void stage_chunks(const uint4 (&chunks)[kChunks], __half* tile) {
  const int lane = vendor::lane_id();
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    uint4* to = reinterpret_cast<uint4*>(tile + (4 * c + lane / 8) * kPitch + (lane % 8) * 16);
    uint32_t h[8];
    decode_to_halves(chunks[c], h);
    to[0] = make_uint4(h[0], h[1], h[2], h[3]);
    to[1] = make_uint4(h[4], h[5], h[6], h[7]);
  }
}

// Multiplies one k-block into the totals: stage its bytes as f16 tiles, start loading k-block
// `refill` into the freed registers, multiply (8 steps of k = 16 into a fresh accumulator per
// activation tile), then scale each accumulator element into the totals.
template <int kMTiles, int kActChunks>
__device__ __forceinline__ void multiply_k_block(const GemmArgs& g, int64_t m0, int64_t n0,
                                                 int64_t refill, bool vectors,
                                                 KBlockBytes<kMTiles, kActChunks>& bytes,
                                                 uint8_t* mine, float (&total)[kMTiles][8]) {
  const int lane = vendor::lane_id();
  auto* weights = reinterpret_cast<__half*>(mine);
  auto* acts = reinterpret_cast<__half*>(mine + kStagedBytes);
  auto* product = reinterpret_cast<float*>(mine + 2 * kStagedBytes);
  auto* a_scales = reinterpret_cast<float*>(mine + 2 * kStagedBytes + kProductBytes);
  constexpr int kScaleSlots = static_cast<int>(sizeof(bytes.as) / sizeof(float));

  stage_chunks(bytes.w, weights);
#pragma unroll
  for (int i = 0; i < kScaleSlots; ++i)
    if (lane + i * kLanes < kTileRows * kMTiles) a_scales[lane + i * kLanes] = bytes.as[i];
  const float bs = bytes.bs;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> part[kMTiles];
#pragma unroll
  for (int t = 0; t < kMTiles; ++t) {
    stage_chunks(bytes.a[t], acts);
    vendor::sync_lanes();
    if (t == kMTiles - 1 && refill < g.k_blocks)  // every byte is staged: reuse the registers
      load_k_block(g, m0, n0, refill, vectors, bytes);
    wmma::fill_fragment(part[t], 0.0f);
#pragma unroll
    for (int k = 0; k < kFp8BlockSize; k += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> w_frag;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> a_frag;
      wmma::load_matrix_sync(w_frag, weights + k, kPitch);
      wmma::load_matrix_sync(a_frag, acts + k, kPitch);
      wmma::mma_sync(part[t], w_frag, a_frag, part[t]);
    }
    vendor::sync_lanes();  // the activation tile is restaged next
  }
  // part[t] (n, m) -> total: lane l holds weight row l / 2, activation columns 8 (l % 2)..+8.
  const int row = lane / 2, col = (lane % 2) * 8;
#pragma unroll
  for (int t = 0; t < kMTiles; ++t) {
    wmma::store_matrix_sync(product, part[t], kProductPitch, wmma::mem_row_major);
    vendor::sync_lanes();
#pragma unroll
    for (int j = 0; j < 8; ++j)
      total[t][j] = fmaf(product[row * kProductPitch + col + j] * a_scales[t * kTileRows + col + j],
                         bs, total[t][j]);
    vendor::sync_lanes();
  }
}

template <int kMTiles, int kActChunks>
__global__ void __launch_bounds__(kMatrixThreads, kMTiles == 1 ? 2 : 1)
    gemm_matrix_units_kernel(const GemmArgs g) {
  extern __shared__ __align__(128) uint8_t shared[];
  const int lane = vendor::lane_id();
  const int warp = static_cast<int>(threadIdx.x) / kLanes;
  const bool vectors = g.a_load_bytes == 16 && g.b_load_bytes == 16;
  uint8_t* mine = shared + warp * kWarpSharedBytes;
  auto* sums = reinterpret_cast<float*>(shared);  // [warp][tile][16 n][16 m], after the k-blocks

  for (int64_t tile = blockIdx.x; tile < g.tiles; tile += gridDim.x) {
    const int64_t m0 = (tile % g.m_tiles) * kTileRows * kMTiles;
    const int64_t n0 = (tile / g.m_tiles) * kTileRows;
    float total[kMTiles][8];
#pragma unroll
    for (int t = 0; t < kMTiles; ++t)
#pragma unroll
      for (int j = 0; j < 8; ++j) total[t][j] = 0.0f;
    if constexpr (kActChunks < 4) {  // activation rows 8-15 are never staged: zeros
      auto* zeros = reinterpret_cast<uint4*>(mine + kStagedBytes + 8 * kPitch * 2);
      for (int i = lane; i < 8 * kPitch * 2 / 16; i += kLanes) zeros[i] = make_uint4(0, 0, 0, 0);
    }

    // Warp w takes k-blocks w, w + 8, ...; with at most 8 activation rows, two register sets in
    // turn keep two k-blocks in flight while one multiplies (more rows leave no room for two).
    const int64_t kbs = g.k_blocks;
    if constexpr (kMTiles == 1 && kActChunks == 2) {
      KBlockBytes<kMTiles, kActChunks> x, y;
      if (warp < kbs) load_k_block(g, m0, n0, warp, vectors, x);
      if (warp + kMatrixWarps < kbs) load_k_block(g, m0, n0, warp + kMatrixWarps, vectors, y);
      for (int64_t kb = warp; kb < kbs; kb += 2 * kMatrixWarps) {
        multiply_k_block(g, m0, n0, kb + 2 * kMatrixWarps, vectors, x, mine, total);
        if (kb + kMatrixWarps < kbs)
          multiply_k_block(g, m0, n0, kb + 3 * kMatrixWarps, vectors, y, mine, total);
      }
    } else {
      KBlockBytes<kMTiles, kActChunks> x;
      if (warp < kbs) load_k_block(g, m0, n0, warp, vectors, x);
      for (int64_t kb = warp; kb < kbs; kb += kMatrixWarps)
        multiply_k_block(g, m0, n0, kb + kMatrixWarps, vectors, x, mine, total);
    }

    // The warps' totals, added in warp order.
    __syncthreads();  // every warp is done with its tiles: the shared memory holds sums now
    const int row = lane / 2, col = (lane % 2) * 8;
#pragma unroll
    for (int t = 0; t < kMTiles; ++t)
#pragma unroll
      for (int j = 0; j < 8; ++j)
        sums[((warp * kMTiles + t) * kTileRows + row) * 16 + col + j] = total[t][j];
    __syncthreads();
    for (int i = static_cast<int>(threadIdx.x); i < kMTiles * kTileRows * kTileRows;
         i += kMatrixThreads) {
      const int n_in = i % kTileRows, m_in = i / kTileRows;  // n fastest: coalesced rows of out
      const int t = m_in / kTileRows, c = m_in % kTileRows;
      float sum = 0.0f;
      for (int w = 0; w < kMatrixWarps; ++w)
        sum += sums[((w * kMTiles + t) * kTileRows + n_in) * 16 + c];
      const int64_t m = m0 + m_in, n = n0 + n_in;
      if (m < g.m && n < g.n) store_out(g, m, n, sum);
    }
    __syncthreads();  // the next tile stages into this memory
  }
}
#endif  // MOEKIT_GPU_HAS_WMMA

// ---- Host side.

int widest_load(const void* data, int64_t row_stride, int64_t rows) {
  const auto address = reinterpret_cast<uintptr_t>(data);
  for (int bytes : {16, 4}) {
    if (address % bytes == 0 && (rows <= 1 || row_stride % bytes == 0)) return bytes;
  }
  return 1;
}

Wide wide_of(DType dtype) {
  return dtype == DType::f32 ? Wide::f32 : dtype == DType::f16 ? Wide::f16 : Wide::bf16;
}

GemmArgs args_of(const BlockGemmProblem& p) {
  GemmArgs g{};
  g.a = static_cast<const uint8_t*>(p.a.data());
  g.a_row_stride = p.a.stride(0);
  g.a_load_bytes = widest_load(g.a, g.a_row_stride, p.m);
  g.b = static_cast<const uint8_t*>(p.b.data());
  g.b_row_stride = p.b.stride(0);
  g.b_load_bytes = widest_load(g.b, g.b_row_stride, p.n);
  g.a_scales = p.a_scales.data();
  g.a_scale_row_stride = p.a_scale_at.row_stride;
  g.a_scale_group_stride = p.a_scale_at.group_stride;
  g.a_scales_packed = p.a_scale_at.packed();
  g.b_scales = p.b_scales.data();
  g.b_scale_row_stride = p.b_scales.stride(0);
  g.b_scale_col_stride = p.b_scales.stride(1);
  g.b_scales_bf16 = p.b_scales.dtype() == DType::bf16;
  if (p.has_bias()) {
    g.bias = p.bias.data();
    g.bias_stride = p.bias.stride(0);
    g.bias_type = wide_of(p.bias.dtype());
  }
  g.out = p.out.data();
  g.out_row_stride = p.out.stride(0);
  g.out_type = wide_of(p.out.dtype());
  g.m = p.m;
  g.n = p.n;
  g.k = p.k;
  g.k_blocks = p.k_blocks;
  return g;
}

// The blocks run at once, at most one per tile: they stay resident and walk their tiles, so no
// second wave leaves SMs idle at the end.
unsigned grid_for(int64_t tiles, const void* kernel, int threads, int shared_bytes, int device) {
  const int64_t resident =
      int64_t{device_properties(device).sm_count} *
      resident_blocks_per_sm(kernel, threads, static_cast<size_t>(shared_bytes), device);
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(tiles, resident)));
}

cudaStream_t stream_of(const BlockGemmProblem& p) { return static_cast<cudaStream_t>(p.stream); }

void run_cuda_cores(const BlockGemmProblem& p) {
  GemmArgs g = args_of(p);
  const int kM = p.m == 1 ? 1 : p.m == 2 ? 2 : 4;
  g.m_tiles = fp8::ceil_div(p.m, kM);
  g.tiles = g.m_tiles * fp8::ceil_div(p.n, kCoreRows);
  // Enough warps that each thread has about kCoreChunksPerThread chunks of a row.
  const int64_t chunks = fp8::ceil_div(p.k, kChunkBytes);
  const int warps = static_cast<int>(
      std::clamp<int64_t>(fp8::ceil_div(chunks, kLanes * kCoreChunksPerThread), 1, kCoreMaxWarps));
  void (*kernel)(GemmArgs) = kM == 1   ? gemm_cuda_cores_kernel<1, kCoreChunksPerThread>
                             : kM == 2 ? gemm_cuda_cores_kernel<2, kCoreChunksPerThread>
                                       : gemm_cuda_cores_kernel<4, 1>;
  const int device = p.a.device().index;
  const unsigned grid =
      grid_for(g.tiles, reinterpret_cast<const void*>(kernel), warps * kLanes, 0, device);
  MOEKIT_GPU_CHECK(
      vendor::launch(kernel, dim3(grid), dim3(warps * kLanes), 0, stream_of(p), false, g));
}

#if MOEKIT_GPU_HAS_WMMA
// Raises a kernel's dynamic shared memory limit once per device (not a stream operation, so it
// is allowed while a stream is being captured).
void allow_shared_memory(const void* kernel, int bytes, int device) {
  static std::mutex mutex;
  static std::vector<std::pair<const void*, int>> done;
  const std::lock_guard<std::mutex> lock(mutex);
  for (const auto& entry : done)
    if (entry.first == kernel && entry.second == device) return;
  MOEKIT_GPU_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  done.emplace_back(kernel, device);
}

void run_matrix_units(const BlockGemmProblem& p) {
  GemmArgs g = args_of(p);
  const int kMTiles = p.m <= kTileRows ? 1 : p.m <= 2 * kTileRows ? 2 : 4;
  g.m_tiles = fp8::ceil_div(p.m, int64_t{kTileRows} * kMTiles);
  g.tiles = g.m_tiles * fp8::ceil_div(p.n, kTileRows);
  void (*kernel)(GemmArgs) = p.m <= 8       ? gemm_matrix_units_kernel<1, 2>
                             : kMTiles == 1 ? gemm_matrix_units_kernel<1, 4>
                             : kMTiles == 2 ? gemm_matrix_units_kernel<2, 4>
                                            : gemm_matrix_units_kernel<4, 4>;
  const int device = p.a.device().index;
  const auto* entry = reinterpret_cast<const void*>(kernel);
  allow_shared_memory(entry, kMatrixSharedBytes, device);
  const unsigned grid = grid_for(g.tiles, entry, kMatrixThreads, kMatrixSharedBytes, device);
  MOEKIT_GPU_CHECK(vendor::launch(kernel, dim3(grid), dim3(kMatrixThreads), kMatrixSharedBytes,
                                  stream_of(p), false, g));
}
#endif

// From this many activation rows on, the matrix units serve (where the vendor has them).
constexpr int64_t kMatrixUnitsMinM = 3;

}  // namespace

std::string block_gemm_supports(const BlockGemmProblem& p) {
  if (!p.a.device().is_gpu()) return "tensors are on " + p.a.device().str() + ", not on a GPU";
  return "";
}

void block_fp8_gemm(const BlockGemmProblem& p) {
#if MOEKIT_GPU_HAS_WMMA
  if (p.m >= kMatrixUnitsMinM) {
    block_fp8_gemm_matrix_units(p);
    return;
  }
#endif
  block_fp8_gemm_cuda_cores(p);
}

void block_fp8_gemm_cuda_cores(const BlockGemmProblem& p) {
  if (p.m == 0 || p.n == 0) return;
  DeviceGuard on_device(p.a.device().index);
  run_cuda_cores(p);
}

void block_fp8_gemm_matrix_units(const BlockGemmProblem& p) {
#if MOEKIT_GPU_HAS_WMMA
  if (p.m == 0 || p.n == 0) return;
  DeviceGuard on_device(p.a.device().index);
  run_matrix_units(p);
#else
  fail("block_fp8_gemm", "kernel", "matrix_units", "is not built for this vendor");
#endif
}

}  // namespace moekit::gpu
