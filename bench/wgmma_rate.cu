// How fast do fp8 wgmma run on their own, with shared-memory operands and nothing else? Session 13
// (docs/perf/fp8-gpu-sm90.md) ablated the tiles kernel at M=4096, N=7168, K=16384: its tensor work
// with no copies took 972 us (~990 TFLOP/s), cuBLASLt's whole GEMM 713-737 us. This program tells
// whether that is the rate of the instruction shape (m64n128k32 from shared memory, two
// warpgroups per SM) or of the kernel around it. One CTA per SM runs `iterations` k-blocks (4
// wgmma of k = 32 each) per consumer warpgroup, in three ways:
//   accumulate  one fragment for every k-block, one commit group in flight behind the next;
//   promote     a fresh fragment per k-block, waited for, then added into f32 (the tiles kernel
//               before session 13);
//   two         two fragments taking turns, k-block i + 1's wgmma during i's promotion (after).
// Rows with "copies" add the tiles kernel's copy pipeline (session 17): a producer warpgroup (one
// thread of it copying, registers moved to the consumers with setmaxnreg as in the tiles kernel)
// streams that many bytes per k-block from an L2-resident buffer into a ring of its own (bulk
// copies of 8 to 32 KB); the consumers wait for k-block kb's copy before its wgmma and arrive on
// its slot after its promotion, as the tiles kernel's full and empty barriers do. The wgmma still
// read their fixed tiles. "copies only" rows (session 18) run the same pipeline with no wgmma: the
// copies' own rate. Session 18 (H200): 32 KB per k-block stream at 8.5-9.3 TB/s with or without
// the wgmma beside them, and a k-block with both takes as long as the slower of the two, so the
// copies do not take shared-memory bandwidth from the tensor work (docs/perf/fp8-gpu-sm90.md).
// Both operands are e4m3 1.0, so every product is 1 and every output element must equal 128 x
// the k-blocks run: each row is verified before it is printed (the accumulate mode over 128
// k-blocks, see run_row). Constant operands toggle few bits,
// so the card may clock higher than on real data: read the rates as upper bounds, and the printed
// clock (SM cycles over the global timer, CTA 0) beside them.
// A standalone experiment program, built with the GPU backend as wgmma_rate:
//   wgmma_rate [iterations]      (default 1024)
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cuda_check.h"
#include "gpu/sm90/ptx.h"
#include "gpu/sm90/wgmma_fp8.h"
#include "gpu/vendor.h"

namespace {

namespace sm90 = moekit::gpu::sm90;
namespace vendor = moekit::gpu::vendor;

// none: copies rows only, the consumers wait for each copy and release it with no wgmma (the
// copies' own rate; each consumer thread counts its k-blocks into its accumulators instead).
enum Mode : int { accumulate, promote, two, none };
const char* mode_name(int mode) {
  return mode == accumulate ? "accumulate"
         : mode == promote  ? "promote"
         : mode == two      ? "two"
                            : "copies only";
}

constexpr int kWarpgroup = 128;
constexpr int kBlockK = 128;               // bytes of K per k-block
constexpr int kATileBytes = 64 * kBlockK;  // one warpgroup's 64 rows

constexpr size_t kCopySource = size_t{32} << 20;  // bytes the copies read (L2-resident)

// The A tiles and the B tile, then (copies rows) the copy ring and its barriers.
constexpr size_t operand_bytes(int n, int groups) {
  return static_cast<size_t>(groups) * kATileBytes + static_cast<size_t>(n) * kBlockK;
}
constexpr size_t shared_bytes(int n, int groups, int copy_bytes = 0, int slots = 0) {
  return 1024 + operand_bytes(n, groups) +
         (copy_bytes ? static_cast<size_t>(slots) * copy_bytes + 2 * slots * 8 : 0);
}

#if MOEKIT_SM90A
constexpr uint32_t kOneE4m3 = 0x38383838u;  // four e4m3 1.0

// The 4 wgmma of one k-block into d (fresh: d starts at 0), committed as one group. fence: a
// compiler fence on d first, which must not come while a group on d is in flight (ptxas would then
// serialize every wgmma): the accumulate mode chains its groups without it.
template <int N>
__device__ __forceinline__ void issue(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b,
                                      bool fresh, bool fence) {
  if (fence) {
#pragma unroll
    for (int i = 0; i < N / 2; ++i) sm90::fence_operand(d[i]);
  }
  sm90::wgmma_fence();
#pragma unroll
  for (int k = 0; k < kBlockK / 32; ++k)
    sm90::WgmmaFp8<N>::run(d, desc_a + 2 * k, desc_b + 2 * k, !(fresh && k == 0));
  sm90::wgmma_commit();
}

template <int N>
__device__ __forceinline__ void add_into(float (&acc)[N / 2], float (&part)[N / 2], float scale) {
#pragma unroll
  for (int i = 0; i < N / 2; ++i) sm90::fence_operand(part[i]);
#pragma unroll
  for (int i = 0; i < N / 2; ++i) acc[i] += part[i] * scale;
}
#endif

// out[CTA][thread][i]: the thread's accumulators; clock[0..1]: CTA 0's SM cycles and nanoseconds.
// kCopyBytes > 0: a producer warpgroup copies that many bytes of `source` per k-block (see the
// top) into a ring of kCopySlots slots, in bulk copies of kChunk bytes.
template <int N, int kGroups, int kMode, int kCopyBytes = 0, int kCopySlots = 4, int kChunk = 16384>
__global__ void __launch_bounds__((kGroups + (kCopyBytes ? 1 : 0)) * kWarpgroup, 1)
    rate_kernel(int iterations, float scale, float* out, unsigned long long* clock,
                const uint8_t* source) {
#if MOEKIT_SM90A
  static_assert(kCopyBytes == 0 || kMode != accumulate, "copies pace on promoted k-blocks");
  static_assert(kCopyBytes > 0 || kMode != none, "copies-only rows copy");
  static_assert(kCopyBytes % kChunk == 0, "copies go in whole chunks");
  extern __shared__ uint8_t raw[];
  uint8_t* base = raw + (1024 - sm90::shared_address(raw) % 1024) % 1024;
  uint32_t* words = reinterpret_cast<uint32_t*>(base);
  const int word_count = static_cast<int>(operand_bytes(N, kGroups) / 4);
  for (int i = static_cast<int>(threadIdx.x); i < word_count; i += blockDim.x) words[i] = kOneE4m3;
  uint8_t* ring = base + operand_bytes(N, kGroups);
  auto* copied = reinterpret_cast<uint64_t*>(ring + kCopySlots * kCopyBytes);  // copy done
  uint64_t* consumed = copied + kCopySlots;  // the consumers are past the slot's k-block
  if (kCopyBytes && threadIdx.x == 0) {
    for (int s = 0; s < kCopySlots; ++s) {
      sm90::mbarrier_init(&copied[s], 1);
      sm90::mbarrier_init(&consumed[s], kGroups * 4);
    }
    sm90::fence_barrier_init();
  }
  sm90::fence_proxy_async_shared();  // the generic stores, before the wgmma read them
  __syncthreads();

  // Copies rows: the consumers' registers, the most that fits beside a 24- or 40-register producer
  // warpgroup (the tiles kernel's 232 / 40 for two consumer warpgroups).
  constexpr int kProducerRegisters = kGroups > 2 ? 24 : 40;
  constexpr int kFitting = (65536 / kWarpgroup - kProducerRegisters) / kGroups / 8 * 8;
  constexpr int kConsumerRegisters = kFitting < 232 ? kFitting : 232;
  if (kCopyBytes && static_cast<int>(threadIdx.x) >= kGroups * kWarpgroup) {
    sm90::registers_shrink<kProducerRegisters>();
    if (threadIdx.x != kGroups * kWarpgroup) return;
    const size_t per_cta = static_cast<size_t>(blockIdx.x) * 7919 * 8192;  // spread the CTAs
    for (int kb = 0; kb < iterations; ++kb) {
      const int slot = kb % kCopySlots;
      const uint32_t use = static_cast<uint32_t>(kb / kCopySlots);
      if (use > 0) {  // the slot's previous copy has landed and its k-block is consumed
        sm90::mbarrier_wait(&copied[slot], (use - 1) & 1);
        sm90::mbarrier_wait(&consumed[slot], (use - 1) & 1);
      }
      sm90::mbarrier_arrive_expect_tx(&copied[slot], kCopyBytes);
      for (int chunk = 0; chunk < kCopyBytes; chunk += kChunk) {
        const size_t at = (per_cta + static_cast<size_t>(kb) * kCopyBytes + chunk) / kChunk %
                          (kCopySource / kChunk) * kChunk;  // whole chunks inside the source
        sm90::bulk_load(ring + slot * kCopyBytes + chunk, source + at, kChunk, &copied[slot]);
      }
    }
    for (int kb = std::max(0, iterations - kCopySlots); kb < iterations; ++kb)
      sm90::mbarrier_wait(&copied[kb % kCopySlots], (kb / kCopySlots) & 1);  // none in flight
    return;
  }
  if constexpr (kCopyBytes > 0) sm90::registers_grow<kConsumerRegisters>();
  // Copies rows: k-block kb's copy has landed (before its wgmma); lane 0 of each consumer warp
  // says k-block kb is done (after its promotion). The waits also keep the consumers within a ring
  // of the copies, so that no barrier runs two phases ahead of its waiter.
  const auto copy_landed = [&](int kb) {
    if (kCopyBytes) sm90::mbarrier_wait(&copied[kb % kCopySlots], (kb / kCopySlots) & 1);
  };
  const auto consumed_k_block = [&](int kb) {
    if (kCopyBytes && threadIdx.x % 32 == 0) sm90::mbarrier_arrive(&consumed[kb % kCopySlots]);
  };

  const int group = static_cast<int>(threadIdx.x) / kWarpgroup;
  const uint64_t desc_a = sm90::smem_descriptor_sw128(base + group * kATileBytes);
  const uint64_t desc_b = sm90::smem_descriptor_sw128(base + kGroups * kATileBytes);
  const unsigned long long cycles0 = clock64();
  const unsigned long long ns0 = vendor::global_timer_ns();

  float acc[N / 2];
#pragma unroll
  for (int i = 0; i < N / 2; ++i) acc[i] = 0.0f;
  if constexpr (kMode == accumulate) {
    for (int it = 0; it < iterations; ++it) {
      issue<N>(acc, desc_a, desc_b, false, false);
      sm90::wgmma_wait<1>();
    }
    sm90::wgmma_wait<0>();
#pragma unroll
    for (int i = 0; i < N / 2; ++i) sm90::fence_operand(acc[i]);
  } else if constexpr (kMode == promote) {
    float part[N / 2];
    for (int it = 0; it < iterations; ++it) {
      copy_landed(it);
      issue<N>(part, desc_a, desc_b, true, true);
      sm90::wgmma_wait<0>();
      add_into<N>(acc, part, scale);
      consumed_k_block(it);
    }
  } else if constexpr (kMode == none) {
    for (int it = 0; it < iterations; ++it) {
      copy_landed(it);
#pragma unroll
      for (int i = 0; i < N / 2; ++i) acc[i] += 128.0f;
      consumed_k_block(it);
    }
  } else {  // two fragments, in pairs of k-blocks (none in flight across the back edge)
    float part[N / 2], part2[N / 2];
    for (int it = 0; it < iterations; it += 2) {
      copy_landed(it);
      issue<N>(part, desc_a, desc_b, true, true);
      copy_landed(it + 1);
      issue<N>(part2, desc_a, desc_b, true, true);
      sm90::wgmma_wait<1>();
      add_into<N>(acc, part, scale);
      consumed_k_block(it);
      sm90::wgmma_wait<0>();
      add_into<N>(acc, part2, scale);
      consumed_k_block(it + 1);
    }
  }

  if (blockIdx.x == 0 && threadIdx.x == 0) {
    clock[0] = clock64() - cycles0;
    clock[1] = vendor::global_timer_ns() - ns0;
  }
  float* mine =
      out + (static_cast<size_t>(blockIdx.x) * kGroups * kWarpgroup + threadIdx.x) * (N / 2);
#pragma unroll
  for (int i = 0; i < N / 2; ++i) mine[i] = acc[i];
#else
  (void)iterations;
  (void)scale;
  (void)out;
  (void)clock;
  (void)source;
#endif
}

struct Row {
  int n, groups, mode;
  int copy_bytes = 0;        // per k-block, by the producer warpgroup
  int slots = 0, chunk = 0;  // its ring and its bulk copies' size
};
using RateKernel = void (*)(int, float, float*, unsigned long long*, const uint8_t*);

// Runs one row: a launch to verify (every accumulator equal to 128 x the k-blocks it ran), then the
// median of 5 timed launches. Prints the row. The accumulate mode is verified over 128 k-blocks
// only: the tensor cores keep about 14 bits of an fp8 accumulation, so once one fragment holds
// 2^14 a unit product no longer changes it (H200: it stays at 16384), which is why the kernels
// promote into f32 registers.
void run_row(const Row& row, RateKernel kernel, int sms, int iterations, float* out,
             unsigned long long* clock, const uint8_t* source) {
  const size_t shared = shared_bytes(row.n, row.groups, row.copy_bytes, row.slots);
  CK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                          static_cast<int>(shared)));
  const dim3 grid(static_cast<unsigned>(sms)),
      block(static_cast<unsigned>((row.groups + (row.copy_bytes ? 1 : 0)) * kWarpgroup));
  // The consumer threads' accumulators (the producer writes none).
  const size_t values = static_cast<size_t>(sms) * row.groups * kWarpgroup * (row.n / 2);
  CK(cudaMemset(out, 0, values * sizeof(float)));
  const int checked = row.mode == accumulate ? std::min(iterations, 128) : iterations;
  kernel<<<grid, block, shared>>>(checked, 1.0f, out, clock, source);
  CK(cudaGetLastError());
  CK(cudaDeviceSynchronize());
  std::vector<float> host(values);
  CK(cudaMemcpy(host.data(), out, values * sizeof(float), cudaMemcpyDeviceToHost));
  const float want = 128.0f * static_cast<float>(checked);
  size_t wrong = 0;
  for (float v : host) wrong += v != want;

  cudaEvent_t start, stop;
  CK(cudaEventCreate(&start));
  CK(cudaEventCreate(&stop));
  std::vector<float> ms(5);
  for (float& t : ms) {
    CK(cudaEventRecord(start));
    kernel<<<grid, block, shared>>>(iterations, 1.0f, out, clock, source);
    CK(cudaEventRecord(stop));
    CK(cudaEventSynchronize(stop));
    CK(cudaEventElapsedTime(&t, start, stop));
  }
  std::sort(ms.begin(), ms.end());
  unsigned long long cycles_ns[2] = {0, 0};
  CK(cudaMemcpy(cycles_ns, clock, sizeof cycles_ns, cudaMemcpyDeviceToHost));
  CK(cudaEventDestroy(start));
  CK(cudaEventDestroy(stop));

  const double us = ms[2] * 1e3;
  const double flops = row.mode == none ? 0.0
                                        : 2.0 * 64 * row.n * kBlockK *
                                              static_cast<double>(iterations) * row.groups * sms;
  const double mhz =
      cycles_ns[1] > 0 ? 1e3 * static_cast<double>(cycles_ns[0]) / static_cast<double>(cycles_ns[1])
                       : 0.0;
  const double peak = static_cast<double>(sms) * 8192.0 * mhz * 1e6;  // dense fp8 per SM per clock
  char copies[64] = "";
  if (row.copy_bytes)
    std::snprintf(copies, sizeof copies, "  + %d KB copies/k-block (%d x %d KB), %.0f GB/s",
                  row.copy_bytes / 1024, row.slots, row.chunk / 1024,
                  static_cast<double>(row.copy_bytes) * iterations * sms / (us * 1e3));
  std::printf(
      "m64n%-3dk32  %d warpgroups  %-10s  %9.1f us  %7.1f TFLOP/s  %6.0f MHz  %5.1f%%  %s%s\n",
      row.n, row.groups, mode_name(row.mode), us, flops / us * 1e-6, mhz,
      peak > 0 ? 100.0 * flops / (us * 1e-6) / peak : 0.0, wrong == 0 ? "verified" : "WRONG",
      copies);
  if (wrong != 0)
    std::printf("  %zu of %zu accumulators differ from %.0f (first: %.0f)\n", wrong, values,
                static_cast<double>(want), static_cast<double>(host[0]));
}

}  // namespace

int main(int argc, char** argv) {
  const int iterations = argc > 1 ? std::max(2, std::atoi(argv[1]) / 2 * 2) : 1024;
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf(
      "%s, %d SMs; %d k-blocks of 128 per warpgroup; %% = of 8192 fp8 flops per SM per "
      "clock at the clock shown\n",
      prop.name, prop.multiProcessorCount, iterations);
  if (prop.major != 9) {
    std::printf("needs compute capability 9.x (wgmma)\n");
    return 0;
  }
  const int sms = prop.multiProcessorCount;
  float* out = nullptr;
  unsigned long long* clock = nullptr;
  CK(cudaMalloc(&out, static_cast<size_t>(sms) * 2 * kWarpgroup * 128 * sizeof(float)));
  CK(cudaMalloc(&clock, 2 * sizeof(unsigned long long)));
  uint8_t* source = nullptr;  // what the copies rows read: zeros, L2-resident after a pass
  CK(cudaMalloc(&source, kCopySource));
  CK(cudaMemset(source, 0, kCopySource));
  const auto row = [&](const Row& r, RateKernel kernel) {
    run_row(r, kernel, sms, iterations, out, clock, source);
  };
  row({128, 1, accumulate}, rate_kernel<128, 1, accumulate>);
  row({128, 2, accumulate}, rate_kernel<128, 2, accumulate>);
  row({128, 2, promote}, rate_kernel<128, 2, promote>);
  row({128, 2, two}, rate_kernel<128, 2, two>);
  row({256, 1, accumulate}, rate_kernel<256, 1, accumulate>);
  row({256, 2, accumulate}, rate_kernel<256, 2, accumulate>);
  row({64, 2, promote}, rate_kernel<64, 2, promote>);
  row({64, 2, two}, rate_kernel<64, 2, two>);
  // The tiles kernel's k-block (128 x 128: 32 KB copied), and a 192 x 128 tile's (three warpgroups
  // of 64 rows, one fragment each: 40 KB copied).
  row({128, 2, promote, 32768, 4, 16384}, rate_kernel<128, 2, promote, 32768>);
  row({128, 2, two, 32768, 4, 16384}, rate_kernel<128, 2, two, 32768>);
  row({128, 3, promote}, rate_kernel<128, 3, promote>);
  row({128, 3, promote, 40960, 4, 8192}, rate_kernel<128, 3, promote, 40960, 4, 8192>);
  // Session 18: is it the copies' own rate (L2 -> shared memory) or their share of shared memory
  // that slows the tensor work? The copies alone, a deeper ring, larger bulk copies, half the
  // bytes.
  row({128, 2, none, 32768, 4, 16384}, rate_kernel<128, 2, none, 32768>);
  row({128, 2, none, 32768, 6, 16384}, rate_kernel<128, 2, none, 32768, 6>);
  row({128, 2, none, 32768, 6, 32768}, rate_kernel<128, 2, none, 32768, 6, 32768>);
  row({128, 2, two, 32768, 6, 16384}, rate_kernel<128, 2, two, 32768, 6>);
  row({128, 2, two, 32768, 6, 32768}, rate_kernel<128, 2, two, 32768, 6, 32768>);
  row({128, 2, none, 16384, 6, 16384}, rate_kernel<128, 2, none, 16384, 6>);
  row({128, 2, two, 16384, 6, 16384}, rate_kernel<128, 2, two, 16384, 6>);
  row({128, 3, none, 40960, 4, 8192}, rate_kernel<128, 3, none, 40960, 4, 8192>);
  CK(cudaFree(out));
  CK(cudaFree(clock));
  CK(cudaFree(source));
  return 0;
}
