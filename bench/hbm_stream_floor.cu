// How fast can one call read a decode GEMM's weights, and nothing else? The FP8 decode goal (issue
// 4: N=4096 K=7168, M = 1..16 within 80 % of weight bytes / copy bandwidth) is measured per call,
// with calls back to back in a CUDA graph. This program times kernels that only stream the same
// 29.4 MB of weights the same way (rotating over copies larger than L2, programmatic dependent
// launch as the GEMM uses it) and do no arithmetic, so each row is a floor for a GEMM kernel of
// that structure:
//   loads   plain 16-byte loads from every thread (blocks per SM x threads x loads in flight);
//   tiles   the swap kernel's stream: 2-D TMA boxes of rows x 128 bytes of [N, K], a ring of
//           `stages` slots filled by one thread, emptied by one consumer warp, CTAs = N tiles x
//           K splits, the first `stages` boxes issued before griddepcontrol.wait ("early");
//   bulk    the same ring fed by 1-D bulk copies of contiguous chunks (a weight layout that puts a
//           CTA's bytes together).
// A standalone experiment program (docs/perf/fp8-gpu-sm90.md, "stream floor"), built with the GPU
// backend as hbm_stream_floor:
//   hbm_stream_floor [N K]      (default 4096 7168)
#include <cuda.h>  // CUtensorMap and its enums only; the driver is reached through the runtime
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "cuda_check.h"
#include "gpu/sm90/ptx.h"
#include "gpu/vendor.h"

namespace {

namespace sm90 = moekit::gpu::sm90;
namespace vendor = moekit::gpu::vendor;

// A value no 16 bytes of the filled weights xor to, so the store that keeps the loads alive never
// happens (the fill is a constant byte: every xor of four equal words is 0).
constexpr uint32_t kNever = 0x9e3779b9u;

// kCount words of this thread, blockDim.x apart from `first` (zeros past `end`).
template <int kCount>
__device__ __forceinline__ void load_words(uint4 (&v)[kCount], const uint4* words, size_t first,
                                           size_t end) {
#pragma unroll
  for (int u = 0; u < kCount; ++u) {
    const size_t j = first + size_t{blockDim.x} * u;
    v[u] = j < end ? vendor::load_once(words + j) : make_uint4(0, 0, 0, 0);
  }
}

template <int kCount>
__device__ __forceinline__ uint32_t xor_of(const uint4 (&v)[kCount]) {
  uint32_t acc = 0;
#pragma unroll
  for (int u = 0; u < kCount; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  return acc;
}

// The xor of this thread's words from `first` to `end`, kInFlight loads at a time.
template <int kInFlight>
__device__ __forceinline__ uint32_t xor_stream(const uint4* words, size_t first, size_t end) {
  uint32_t acc = 0;
  for (size_t i = first; i < end; i += size_t{blockDim.x} * kInFlight) {
    uint4 v[kInFlight];
    load_words(v, words, i, end);
    acc ^= xor_of(v);
  }
  return acc;
}

// This block's contiguous share of the words: [begin, end).
__device__ __forceinline__ void share_of_block(size_t total_words, size_t& begin, size_t& end) {
  const size_t share = (total_words + gridDim.x - 1) / gridDim.x;
  begin = blockIdx.x * share;
  end = std::min(total_words, begin + share);
}

// ---- loads: every thread streams 16-byte words of its block's contiguous share.
template <int kInFlight>
__global__ void read_by_loads(const uint4* words, size_t total_words, int early, uint32_t* sink) {
  vendor::allow_next_grid();
  if (!early) vendor::wait_for_previous_grid();
  size_t begin, end;
  share_of_block(total_words, begin, end);
  const uint32_t acc = xor_stream<kInFlight>(words, begin + threadIdx.x, end);
  if (early) vendor::wait_for_previous_grid();
  if (acc == kNever) sink[blockIdx.x * blockDim.x + threadIdx.x] = acc;
}

// ---- held: as loads, but each thread's first kHeld words are loaded before griddepcontrol.wait
// and kept in registers until after it, as a GEMM must keep weights until its activations are
// ready; the rest is streamed after the wait, 4 words in flight.
template <int kHeld>
__global__ void __launch_bounds__(512)
    read_held(const uint4* words, size_t total_words, uint32_t* sink) {
  vendor::allow_next_grid();
  size_t begin, end;
  share_of_block(total_words, begin, end);
  uint4 held[kHeld];
  load_words(held, words, begin + threadIdx.x, end);
  vendor::wait_for_previous_grid();
  const uint32_t acc =
      xor_of(held) ^ xor_stream<4>(words, begin + threadIdx.x + size_t{blockDim.x} * kHeld, end);
  if (acc == kNever) sink[blockIdx.x * blockDim.x + threadIdx.x] = acc;
}

// ---- tiles / bulk: a ring of shared-memory slots, one producer thread, one consumer warp.
struct RingShape {
  int tile_rows;  // tiles: rows per box (box = tile_rows x 128 bytes); bulk: unused
  int splits;     // tiles: CTAs along K per row tile
  int chunks;     // slots' worth of bytes each CTA streams
  uint32_t chunk_bytes;
  int stages;
  int early;           // issue the first `stages` chunks before griddepcontrol.wait
  size_t cta_bytes;    // bulk: bytes per CTA (contiguous)
  int evict_first;     // tiles: the boxes' lines first out of L2
  int blocks_per_box;  // tiles: 128-byte k-blocks per box (2: a 3-D map, two tiles in one copy)
};

template <bool kTiles>
__global__ void __launch_bounds__(384)
    read_by_ring(const __grid_constant__ CUtensorMap map, const uint8_t* bytes, RingShape shape,
                 uint32_t* sink) {
  extern __shared__ __align__(1024) uint8_t shared[];
  uint8_t* ring =
      reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(shared) + 1023) & ~uintptr_t{1023});
  uint64_t* full = reinterpret_cast<uint64_t*>(ring + size_t{shape.chunk_bytes} * shape.stages);
  uint64_t* empty = full + shape.stages;
  vendor::allow_next_grid();
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  if (threadIdx.x == 0) {
    if (kTiles) sm90::prefetch_tensor_map(&map);
    for (int s = 0; s < shape.stages; ++s) {
      sm90::mbarrier_init(&full[s], 1);
      sm90::mbarrier_init(&empty[s], 1);
    }
    sm90::fence_barrier_init();
  }
  __syncthreads();
  const int row_tile = static_cast<int>(blockIdx.x) / shape.splits;
  const int split = static_cast<int>(blockIdx.x) % shape.splits;
  auto issue = [&](int i) {
    const int s = i % shape.stages;
    uint8_t* slot = ring + size_t{shape.chunk_bytes} * s;
    sm90::mbarrier_arrive_expect_tx(&full[s], shape.chunk_bytes);
    if (kTiles) {
      const int k_block = split * shape.chunks + i;
      if (shape.blocks_per_box == 2)
        sm90::tma_load_3d(slot, &map, &full[s], 0, row_tile * shape.tile_rows, 2 * k_block);
      else if (shape.evict_first)
        sm90::tma_load_2d_hinted(slot, &map, &full[s], k_block * 128, row_tile * shape.tile_rows,
                                 sm90::l2_policy_evict_first());
      else
        sm90::tma_load_2d(slot, &map, &full[s], k_block * 128, row_tile * shape.tile_rows);
    } else {
      sm90::bulk_load(slot, bytes + shape.cta_bytes * blockIdx.x + size_t{shape.chunk_bytes} * i,
                      shape.chunk_bytes, &full[s]);
    }
  };
  if (warp == 0) {
    if (lane == 0) {
      const int first = std::min(shape.stages, shape.chunks);
      if (!shape.early) vendor::wait_for_previous_grid();
      for (int i = 0; i < first; ++i) issue(i);
      if (shape.early) vendor::wait_for_previous_grid();
      for (int i = first; i < shape.chunks; ++i) {
        const int s = i % shape.stages;
        sm90::mbarrier_wait(&empty[s], static_cast<uint32_t>((i / shape.stages - 1) & 1));
        issue(i);
      }
    }
  } else if (warp == 1) {
    // The GEMM's consumers wait for the previous grid (its activations) before their first use.
    vendor::wait_for_previous_grid();
    uint32_t acc = 0;
    for (int i = 0; i < shape.chunks; ++i) {
      const int s = i % shape.stages;
      sm90::mbarrier_wait(&full[s], static_cast<uint32_t>((i / shape.stages) & 1));
      acc ^= reinterpret_cast<const uint32_t*>(ring + size_t{shape.chunk_bytes} * s)[lane];
      __syncwarp();
      if (lane == 0) sm90::mbarrier_arrive(&empty[s]);
    }
    if (acc == kNever) sink[blockIdx.x * 32 + lane] = acc;
  }
  __syncthreads();  // warps past the first two (GEMM-sized blocks) stay until the CTA ends
}

// ---- Host side.

using EncodeTiled = PFN_cuTensorMapEncodeTiled_v12000;

EncodeTiled encode_tiled() {
  void* entry = nullptr;
  cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
  CK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &entry, 12000, cudaEnableDefault,
                                      &found));
  if (found != cudaDriverEntryPointSuccess) {
    std::fprintf(stderr, "the driver has no cuTensorMapEncodeTiled\n");
    std::exit(1);
  }
  return reinterpret_cast<EncodeTiled>(entry);
}

// A byte matrix [rows, cols] read in boxes of box_rows x 128 bytes, 128-byte swizzle. With
// blocks_per_box 2, a 3-D view (128 bytes, rows, k-blocks) whose boxes hold two k-blocks' tiles,
// one after the other, each swizzled as a 2-D box would be.
CUtensorMap tile_map(const void* base, int64_t rows, int64_t cols, int box_rows, bool promote,
                     int blocks_per_box = 1) {
  const bool pairs = blocks_per_box == 2;
  const auto r = static_cast<cuuint64_t>(rows), c = static_cast<cuuint64_t>(cols);
  const cuuint64_t dims_2d[2] = {c, r}, dims_3d[3] = {128, r, c / 128};
  const cuuint64_t strides[2] = {c, 128};  // the 2-D view uses the first only
  const cuuint32_t box[3] = {128, static_cast<cuuint32_t>(box_rows), 2};
  const cuuint32_t element_strides[3] = {1, 1, 1};
  static const EncodeTiled encode = encode_tiled();
  CUtensorMap map{};
  if (encode(&map, CU_TENSOR_MAP_DATA_TYPE_UINT8, pairs ? 3 : 2, const_cast<void*>(base),
             pairs ? dims_3d : dims_2d, strides, box, element_strides,
             CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
             promote ? CU_TENSOR_MAP_L2_PROMOTION_L2_256B : CU_TENSOR_MAP_L2_PROMOTION_NONE,
             CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS) {
    std::fprintf(stderr, "cuTensorMapEncodeTiled failed (%d-D)\n", pairs ? 3 : 2);
    std::exit(1);
  }
  return map;
}

struct Bench {
  int64_t n = 4096, k = 7168;
  size_t bytes = 0;
  int copies = 0;
  int sms = 0;
  std::vector<uint8_t*> weights;
  uint32_t* sink = nullptr;
  cudaStream_t stream = nullptr;
};

// Median us per call of `launch(copy)` captured as a graph of `rounds` passes over every copy.
template <typename Launch>
double time_calls(Bench& b, Launch launch) {
  constexpr int kRounds = 4;
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  CK(cudaStreamBeginCapture(b.stream, cudaStreamCaptureModeThreadLocal));
  for (int r = 0; r < kRounds; ++r)
    for (int c = 0; c < b.copies; ++c) launch(c);
  CK(cudaStreamEndCapture(b.stream, &graph));
  CK(cudaGraphInstantiate(&exec, graph, 0));
  cudaEvent_t start, stop;
  CK(cudaEventCreate(&start));
  CK(cudaEventCreate(&stop));
  CK(cudaGraphLaunch(exec, b.stream));  // warm
  std::vector<double> us;
  for (int t = 0; t < 15; ++t) {
    // An untimed replay ahead, as in moekit's bench (gpu::median_exec_replay_us): the host's
    // launch of the timed graph then happens while the GPU is busy, outside the interval.
    CK(cudaGraphLaunch(exec, b.stream));
    CK(cudaEventRecord(start, b.stream));
    CK(cudaGraphLaunch(exec, b.stream));
    CK(cudaEventRecord(stop, b.stream));
    CK(cudaEventSynchronize(stop));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, start, stop));
    us.push_back(1000.0 * ms / (kRounds * b.copies));
  }
  CK(cudaEventDestroy(start));
  CK(cudaEventDestroy(stop));
  CK(cudaGraphExecDestroy(exec));
  CK(cudaGraphDestroy(graph));
  std::sort(us.begin(), us.end());
  return us[us.size() / 2];
}

template <typename... Args>
void launch_kernel(void (*kernel)(Args...), const Bench& b, unsigned blocks, unsigned threads,
                   size_t shared, bool overlap, unsigned cluster, Args... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(blocks);
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = shared;
  config.stream = b.stream;
  cudaLaunchAttribute attributes[2]{};
  unsigned count = 0;
  if (overlap) {
    attributes[count].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attributes[count++].val.programmaticStreamSerializationAllowed = 1;
  }
  if (cluster > 1) {
    attributes[count].id = cudaLaunchAttributeClusterDimension;
    attributes[count++].val.clusterDim = {cluster, 1, 1};
  }
  config.attrs = attributes;
  config.numAttrs = count;
  CK(cudaLaunchKernelEx(&config, kernel, args...));
}

struct Row {
  std::string kind, setting;
  double us;
};

void print_row(const Bench& b, double floor_us, const Row& r) {
  std::printf("  %-6s %-44s %8.2f us %7.0f GB/s %6.1f %% of the copy floor\n", r.kind.c_str(),
              r.setting.c_str(), r.us, static_cast<double>(b.bytes) / (r.us * 1e3),
              100.0 * floor_us / r.us);
  std::fflush(stdout);
}

template <int kInFlight>
double time_loads(Bench& b, int blocks_per_sm, int threads, bool overlap, bool early) {
  const unsigned blocks = static_cast<unsigned>(b.sms * blocks_per_sm);
  return time_calls(b, [&](int c) {
    launch_kernel(read_by_loads<kInFlight>, b, blocks, static_cast<unsigned>(threads), 0, overlap,
                  1u, reinterpret_cast<const uint4*>(b.weights[c]), b.bytes / 16, early ? 1 : 0,
                  b.sink);
  });
}

template <int kHeld>
double time_held(Bench& b, int blocks_per_sm, int threads) {
  const unsigned blocks = static_cast<unsigned>(b.sms * blocks_per_sm);
  return time_calls(b, [&](int c) {
    launch_kernel(read_held<kHeld>, b, blocks, static_cast<unsigned>(threads), 0, true, 1u,
                  reinterpret_cast<const uint4*>(b.weights[c]), b.bytes / 16, b.sink);
  });
}

double time_ring(Bench& b, bool tiles, unsigned ctas, RingShape shape, bool overlap,
                 const std::vector<CUtensorMap>& maps, unsigned threads = 64,
                 unsigned cluster = 1) {
  const size_t shared = size_t{shape.chunk_bytes} * shape.stages + 16 * shape.stages + 1024;
  auto kernel = tiles ? read_by_ring<true> : read_by_ring<false>;
  CK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                          static_cast<int>(shared)));
  return time_calls(b, [&](int c) {
    launch_kernel(kernel, b, ctas, threads, shared, overlap, cluster, maps[c],
                  static_cast<const uint8_t*>(b.weights[c]), shape, b.sink);
  });
}

}  // namespace

int main(int argc, char** argv) {
  Bench b;
  if (argc == 3) {
    b.n = std::atoll(argv[1]);
    b.k = std::atoll(argv[2]);
  }
  if (b.n % 256 != 0 || b.k % 1024 != 0) {
    std::fprintf(stderr, "N must be a multiple of 256 and K of 1024 (got N=%lld K=%lld)\n",
                 static_cast<long long>(b.n), static_cast<long long>(b.k));
    return 2;
  }
  int device = 0;
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, device));
  b.sms = prop.multiProcessorCount;
  b.bytes = static_cast<size_t>(b.n * b.k);
  // Enough copies that a pass over them is past L2 several times over.
  b.copies = static_cast<int>(
      std::max<size_t>(9, 4 * static_cast<size_t>(prop.l2CacheSize) / b.bytes + 1));
  CK(cudaStreamCreateWithFlags(&b.stream, cudaStreamNonBlocking));
  CK(cudaMalloc(&b.sink, 1 << 22));
  for (int c = 0; c < b.copies; ++c) {
    uint8_t* p = nullptr;
    CK(cudaMalloc(&p, b.bytes));
    CK(cudaMemset(p, 0x3c, b.bytes));
    b.weights.push_back(p);
  }
  const double copy_gbs = [&] {
    const size_t bytes = size_t{1} << 30;
    void *src, *dst;
    CK(cudaMalloc(&src, bytes));
    CK(cudaMalloc(&dst, bytes));
    CK(cudaMemset(src, 1, bytes));
    cudaEvent_t start, stop;
    CK(cudaEventCreate(&start));
    CK(cudaEventCreate(&stop));
    std::vector<double> s;
    for (int i = 0; i < 6; ++i) {
      CK(cudaEventRecord(start, b.stream));
      CK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, b.stream));
      CK(cudaEventRecord(stop, b.stream));
      CK(cudaEventSynchronize(stop));
      float ms = 0;
      CK(cudaEventElapsedTime(&ms, start, stop));
      s.push_back(ms * 1e-3);
    }
    std::sort(s.begin(), s.end());
    CK(cudaFree(src));
    CK(cudaFree(dst));
    return 2.0 * static_cast<double>(bytes) / s[s.size() / 2] / 1e9;
  }();
  const double floor_us = static_cast<double>(b.bytes) / (copy_gbs * 1e3);
  std::printf("%s, %d SMs, L2 %d MB; copy bandwidth %.0f GB/s\n", prop.name, b.sms,
              prop.l2CacheSize >> 20, copy_gbs);
  std::printf("one call reads [%lld, %lld] bytes = %.1f MB (copy floor %.2f us), %d copies\n",
              static_cast<long long>(b.n), static_cast<long long>(b.k), b.bytes / 1e6, floor_us,
              b.copies);

  for (int overlap = 0; overlap < 2; ++overlap)
    for (int bps : {1, 2, 4})
      for (int threads : {256, 512}) {
        if (bps * threads > 2048) continue;
        const std::string base = std::to_string(bps) + " blocks/SM x " + std::to_string(threads) +
                                 (overlap ? ", PDL early" : ", no PDL");
        print_row(b, floor_us,
                  {"loads", base + ", 4 deep", time_loads<4>(b, bps, threads, overlap, overlap)});
        print_row(b, floor_us,
                  {"loads", base + ", 8 deep", time_loads<8>(b, bps, threads, overlap, overlap)});
      }

  for (int bps : {1, 2, 4})
    for (int threads : {256, 512}) {
      if (bps * threads > 2048) continue;
      const std::string base = std::to_string(bps) + " blocks/SM x " + std::to_string(threads);
      const double held_kb = 16.0 * bps * threads / 1024;
      print_row(b, floor_us,
                {"held", base + ", " + std::to_string(int(held_kb * 4)) + " KB/SM held",
                 time_held<4>(b, bps, threads)});
      print_row(b, floor_us,
                {"held", base + ", " + std::to_string(int(held_kb * 8)) + " KB/SM held",
                 time_held<8>(b, bps, threads)});
      print_row(b, floor_us,
                {"held", base + ", " + std::to_string(int(held_kb * 16)) + " KB/SM held",
                 time_held<16>(b, bps, threads)});
    }

  if (prop.major == 9) {
    const int k_blocks = static_cast<int>(b.k / 128);
    struct TileCase {
      int rows, splits, stages, early;
      int evict_first = 0, promote = 1;
      unsigned threads = 64, cluster = 1;
      int blocks_per_box = 1;
    };
    const TileCase tile_cases[] = {
        {64, 2, 16, 1},
        {64, 2, 16, 0},
        {64, 2, 12, 1},
        {64, 2, 8, 1},
        {64, 2, 24, 1},
        {64, 1, 24, 1},
        {32, 1, 32, 1},
        {128, 4, 12, 1},
        {64, 4, 12, 1},
        {64, 2, 16, 1, 1, 1},
        {64, 2, 16, 1, 0, 0},
        {64, 2, 16, 1, 1, 0},
        // As the swap kernel launches: 384 threads, clusters of `splits`.
        {64, 2, 16, 1, 0, 0, 384, 1},
        {64, 2, 16, 1, 0, 0, 64, 2},
        {64, 2, 16, 1, 0, 0, 384, 2},
        {128, 4, 12, 1, 0, 0, 384, 1},
        {128, 4, 12, 1, 0, 0, 64, 4},
        {128, 4, 12, 1, 0, 0, 384, 4},
        {64, 4, 12, 1, 0, 0, 384, 1},
        {64, 4, 12, 1, 0, 0, 384, 4},
        // Two k-blocks per copy (16 KB boxes through a 3-D map), the swap kernel's 64 x 2.
        {64, 2, 8, 1, 0, 0, 64, 1, 2},
        {64, 2, 12, 1, 0, 0, 64, 1, 2},
        {64, 2, 8, 1, 0, 0, 384, 2, 2},
        {64, 2, 12, 1, 0, 0, 384, 2, 2},
        // 32 rows x split 1 (no clusters, no cross-CTA sums), boxes of two k-blocks (8 KB).
        {32, 1, 16, 1, 0, 0, 384, 1, 2},
        {32, 1, 24, 1, 0, 0, 384, 1, 2},
        {32, 1, 12, 1, 0, 0, 384, 1, 2},
    };
    for (const TileCase& t : tile_cases) {
      if (k_blocks % (t.splits * t.blocks_per_box) != 0 || b.n % t.rows != 0) continue;
      const uint32_t chunk = static_cast<uint32_t>(t.rows * t.blocks_per_box) * 128;
      if (size_t{chunk} * t.stages + 16 * t.stages + 1024 > size_t{prop.sharedMemPerBlockOptin})
        continue;
      std::vector<CUtensorMap> maps;
      for (int c = 0; c < b.copies; ++c)
        maps.push_back(tile_map(b.weights[c], b.n, b.k, t.rows, t.promote != 0, t.blocks_per_box));
      RingShape shape{t.rows, t.splits,      k_blocks / t.splits / t.blocks_per_box,
                      chunk,  t.stages,      t.early,
                      0,      t.evict_first, t.blocks_per_box};
      const unsigned ctas = static_cast<unsigned>(b.n / t.rows * t.splits);
      const std::string setting =
          std::to_string(ctas) + " CTAs, " + std::to_string(t.rows) + " rows x split " +
          std::to_string(t.splits) + ", " + std::to_string(t.stages) + " stages" +
          (t.early ? ", early" : "") + (t.evict_first ? ", evict-first" : "") +
          (t.promote ? "" : ", no promotion") +
          (t.threads != 64 ? ", " + std::to_string(t.threads) + " threads" : "") +
          (t.cluster > 1 ? ", clusters of " + std::to_string(t.cluster) : "") +
          (t.blocks_per_box == 2 ? ", 2 k-blocks per copy" : "");
      print_row(
          b, floor_us,
          {"tiles", setting, time_ring(b, true, ctas, shape, true, maps, t.threads, t.cluster)});
    }
    struct BulkCase {
      int ctas_per_sm_x2;  // CTAs = SMs * this / 2
      uint32_t chunk;
      int stages, early;
    };
    const BulkCase bulk_cases[] = {
        {2, 16384, 12, 1}, {2, 8192, 24, 1}, {2, 32768, 6, 1},
        {4, 16384, 6, 1},  {4, 8192, 12, 1}, {2, 16384, 12, 0},
    };
    std::vector<CUtensorMap> no_maps(static_cast<size_t>(b.copies));
    for (const BulkCase& c : bulk_cases) {
      const unsigned ctas = static_cast<unsigned>(b.sms * c.ctas_per_sm_x2 / 2);
      // Whole chunks per CTA; the few bytes past the last whole chunk are left unread.
      const size_t cta_bytes = b.bytes / ctas / c.chunk * c.chunk;
      RingShape shape{
          0, 1, static_cast<int>(cta_bytes / c.chunk), c.chunk, c.stages, c.early, cta_bytes, 0, 1};
      const std::string setting =
          std::to_string(ctas) + " CTAs, " + std::to_string(c.chunk / 1024) + " KB chunks, " +
          std::to_string(c.stages) + " stages" + (c.early ? ", early" : "") + " (" +
          std::to_string(100.0 * cta_bytes * ctas / b.bytes).substr(0, 5) + " % of bytes)";
      print_row(b, floor_us, {"bulk", setting, time_ring(b, false, ctas, shape, true, no_maps)});
    }
  }
  for (uint8_t* p : b.weights) CK(cudaFree(p));
  CK(cudaFree(b.sink));
  CK(cudaStreamDestroy(b.stream));
  return 0;
}
