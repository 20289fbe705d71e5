// Hopper (sm_90a) instructions the FP8 GEMM needs, one small named function each: mbarriers, the
// bulk tensor copy engine (TMA), warpgroup MMA bookkeeping, register reallocation, cluster barriers
// and distributed shared memory. NVIDIA-only: included by fp8_gemm_sm90.cu and by the experiment
// program bench/hbm_stream_floor.cu (the only user of tma_load_3d, the L2 policy and bulk_load).
// Every body is compiled only in the sm_90a device pass (MOEKIT_SM90A); elsewhere the functions are
// empty, and the host side never launches a kernel built from them (block_gemm_sm90_supports
// checks).
#pragma once

#include <cstdint>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MOEKIT_SM90A 1
#else
#define MOEKIT_SM90A 0
#endif

namespace moekit::gpu::sm90 {

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---- mbarriers (64-bit, in shared memory).

__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t arrivals) {
#if MOEKIT_SM90A
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(shared_address(bar)), "r"(arrivals)
               : "memory");
#else
  (void)bar;
  (void)arrivals;
#endif
}

// Makes initialized barriers visible to the copy engine and to the other CTAs of a cluster.
__device__ __forceinline__ void fence_barrier_init() {
#if MOEKIT_SM90A
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#endif
}

// One arrival that also announces `bytes` the copy engine will deliver in this phase.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
#if MOEKIT_SM90A
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(shared_address(bar)),
               "r"(bytes)
               : "memory");
#else
  (void)bar;
  (void)bytes;
#endif
}

__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
#if MOEKIT_SM90A
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(shared_address(bar)) : "memory");
#else
  (void)bar;
#endif
}

// One try: whether the phase of parity `parity` of the barrier at shared address `address` has
// completed.
__device__ __forceinline__ bool mbarrier_try_wait(uint32_t address, uint32_t parity) {
  uint32_t done = 0;
#if MOEKIT_SM90A
  asm volatile(
      "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(address), "r"(parity)
      : "memory");
#else
  (void)address;
  (void)parity;
#endif
  return done != 0;
}

// Waits until the phase of parity `parity` has completed.
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
#if MOEKIT_SM90A
  const uint32_t address = shared_address(bar);
  while (!mbarrier_try_wait(address, parity)) {
  }
#else
  (void)bar;
  (void)parity;
#endif
}

// mbarrier_wait for a phase that has usually completed already: one try, and the retry loop out
// of the straight path, so that a full stage costs a straight run of instructions. In the swap
// kernel's consumer loop that form of code, which ptxas once produced by accident, ran M=64
// N=4096 K=7168 3.7 % faster than the inline spin (H200, fp8-gpu-sm90.md, session 19, item 8);
// written this way it ran as fast as that build (session 20, item 4).
__device__ __forceinline__ void mbarrier_wait_likely_done(uint64_t* bar, uint32_t parity) {
#if MOEKIT_SM90A
  const uint32_t address = shared_address(bar);
  if (__builtin_expect(!mbarrier_try_wait(address, parity), 0))
    while (!mbarrier_try_wait(address, parity)) {
    }
#else
  (void)bar;
  (void)parity;
#endif
}

// ---- Bulk tensor copies (TMA).

__device__ __forceinline__ void prefetch_tensor_map(const void* map) {
#if MOEKIT_SM90A
  asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
#else
  (void)map;
#endif
}

// Copies the box at (inner, outer) of a 2-D tensor map into shared memory at dst; completes as
// transaction bytes on bar. Out-of-bounds elements arrive as zeros (and still count as bytes).
__device__ __forceinline__ void tma_load_2d(void* dst, const void* map, uint64_t* bar, int inner,
                                            int outer) {
#if MOEKIT_SM90A
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4}], [%2];" ::"r"(shared_address(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(shared_address(bar)), "r"(inner), "r"(outer)
      : "memory");
#else
  (void)dst;
  (void)map;
  (void)bar;
  (void)inner;
  (void)outer;
#endif
}

// tma_load_2d into the same offset of every CTA in `cta_mask` (bit r: cluster rank r), each
// CTA's barrier at `bar`'s offset taking the bytes that land there.
__device__ __forceinline__ void tma_load_2d_multicast(void* dst, const void* map, uint64_t* bar,
                                                      int inner, int outer, uint16_t cta_mask) {
#if MOEKIT_SM90A
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      ".multicast::cluster [%0], [%1, {%3, %4}], [%2], %5;" ::"r"(shared_address(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(shared_address(bar)), "r"(inner), "r"(outer),
      "h"(cta_mask)
      : "memory");
#else
  (void)dst;
  (void)map;
  (void)bar;
  (void)inner;
  (void)outer;
  (void)cta_mask;
#endif
}

// tma_load_2d_multicast for a 3-D tensor map: the box at (c0, c1, c2) into every CTA of the mask.
__device__ __forceinline__ void tma_load_3d_multicast(void* dst, const void* map, uint64_t* bar,
                                                      int c0, int c1, int c2, uint16_t cta_mask) {
#if MOEKIT_SM90A
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"
      ".multicast::cluster [%0], [%1, {%3, %4, %5}], [%2], %6;" ::"r"(shared_address(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(shared_address(bar)), "r"(c0), "r"(c1), "r"(c2),
      "h"(cta_mask)
      : "memory");
#else
  (void)dst;
  (void)map;
  (void)bar;
  (void)c0;
  (void)c1;
  (void)c2;
  (void)cta_mask;
#endif
}

// tma_load_2d for a 3-D tensor map: the box at (c0, c1, c2).
__device__ __forceinline__ void tma_load_3d(void* dst, const void* map, uint64_t* bar, int c0,
                                            int c1, int c2) {
#if MOEKIT_SM90A
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4, %5}], [%2];" ::"r"(shared_address(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(shared_address(bar)), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
#else
  (void)dst;
  (void)map;
  (void)bar;
  (void)c0;
  (void)c1;
  (void)c2;
#endif
}

// An L2 policy for the copies below: the lines they bring in are the first to be replaced.
__device__ __forceinline__ uint64_t l2_policy_evict_first() {
  uint64_t policy = 0;
#if MOEKIT_SM90A
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
#endif
  return policy;
}
// tma_load_2d with an L2 policy (l2_policy_evict_first).
__device__ __forceinline__ void tma_load_2d_hinted(void* dst, const void* map, uint64_t* bar,
                                                   int inner, int outer, uint64_t policy) {
#if MOEKIT_SM90A
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
      " [%0], [%1, {%3, %4}], [%2], %5;" ::"r"(shared_address(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(shared_address(bar)), "r"(inner), "r"(outer),
      "l"(policy)
      : "memory");
#else
  (void)dst;
  (void)map;
  (void)bar;
  (void)inner;
  (void)outer;
  (void)policy;
#endif
}

// Copies `bytes` (a multiple of 16, both addresses 16-byte aligned) at `global` into shared memory
// at dst; completes as transaction bytes on bar. The contiguous counterpart of tma_load_2d.
__device__ __forceinline__ void bulk_load(void* dst, const void* global, uint32_t bytes,
                                          uint64_t* bar) {
#if MOEKIT_SM90A
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::
          "r"(shared_address(dst)),
      "l"(global), "r"(bytes), "r"(shared_address(bar))
      : "memory");
#else
  (void)dst;
  (void)global;
  (void)bytes;
  (void)bar;
#endif
}

// Copies `bytes` (a multiple of 16, both addresses 16-byte aligned) of shared memory at `src` to
// `global` through the copy engine, in this thread's bulk group: the thread goes on at once, and
// bulk_commit_and_wait_read() waits only until the engine has read the source, not for the global
// writes.
__device__ __forceinline__ void bulk_store(void* global, const void* src, uint32_t bytes) {
#if MOEKIT_SM90A
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(global),
               "r"(shared_address(src)), "r"(bytes)
               : "memory");
#else
  (void)global;
  (void)src;
  (void)bytes;
#endif
}

// Copies the box at (inner, outer) of `map`'s tensor from shared memory at `src` (laid out as the
// map's swizzle says) to global memory, in this thread's bulk group. Elements past the tensor's
// rows are not written; at the end of a row the last 16 bytes are written whole (with N=4100 and
// 8190 bf16 the padding after column N changed, H200), so keep rows a multiple of 16 bytes.
__device__ __forceinline__ void tma_store_2d(const void* map, const void* src, int inner,
                                             int outer) {
#if MOEKIT_SM90A
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];" ::"l"(
                   reinterpret_cast<uint64_t>(map)),
               "r"(shared_address(src)), "r"(inner), "r"(outer)
               : "memory");
#else
  (void)map;
  (void)src;
  (void)inner;
  (void)outer;
#endif
}

// tma_store_2d for a 3-D tensor map: the box at (c0, c1, c2).
__device__ __forceinline__ void tma_store_3d(const void* map, const void* src, int c0, int c1,
                                             int c2) {
#if MOEKIT_SM90A
  asm volatile(
      "cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {%2, %3, %4}], [%1];" ::"l"(
          reinterpret_cast<uint64_t>(map)),
      "r"(shared_address(src)), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
#else
  (void)map;
  (void)src;
  (void)c0;
  (void)c1;
  (void)c2;
#endif
}

// Closes this thread's bulk group (its copies go on; bulk_wait_read waits for them).
__device__ __forceinline__ void bulk_commit() {
#if MOEKIT_SM90A
  asm volatile("cp.async.bulk.commit_group;" ::: "memory");
#endif
}

// Waits until every copy of this thread's closed bulk groups has read its shared-memory source.
__device__ __forceinline__ void bulk_wait_read() {
#if MOEKIT_SM90A
  asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
#endif
}

// Closes this thread's bulk group and waits until every copy in its groups has read its source.
__device__ __forceinline__ void bulk_commit_and_wait_read() {
  bulk_commit();
  bulk_wait_read();
}

// Pulls the box at (inner, outer) into L2 only (no shared memory, no barrier). Safe before the
// previous grid has finished: L2 is where every SM's writes land, so a later read still sees them.
__device__ __forceinline__ void tma_prefetch_2d(const void* map, int inner, int outer) {
#if MOEKIT_SM90A
  asm volatile("cp.async.bulk.prefetch.tensor.2d.L2.global [%0, {%1, %2}];" ::"l"(
                   reinterpret_cast<uint64_t>(map)),
               "r"(inner), "r"(outer)
               : "memory");
#else
  (void)map;
  (void)inner;
  (void)outer;
#endif
}

// Pulls `bytes` (a multiple of 16, 16-byte aligned) at `global` into L2 only, like
// tma_prefetch_2d: safe before the previous grid has finished.
__device__ __forceinline__ void bulk_prefetch_l2(const void* global, uint32_t bytes) {
#if MOEKIT_SM90A
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(global), "r"(bytes) : "memory");
#else
  (void)global;
  (void)bytes;
#endif
}

// ---- Warpgroup MMA bookkeeping.

// Shared-memory matrix descriptor of a K-major operand tile stored by TMA with 128-byte swizzle:
// rows of 128 bytes, 8-row atoms 1024 bytes apart (the tile starts 1024-byte aligned). Stepping
// along K inside the 128-byte row is adding bytes to the start address.
__device__ __forceinline__ uint64_t smem_descriptor_sw128(const void* tile) {
  const uint32_t address = shared_address(tile);
  uint64_t desc = 0;
  desc |= static_cast<uint64_t>((address & 0x3ffff) >> 4);  // start address
  desc |= static_cast<uint64_t>(16 >> 4) << 16;             // leading byte offset (unused here)
  desc |= static_cast<uint64_t>(1024 >> 4) << 32;           // stride byte offset: 8-row atoms
  desc |= static_cast<uint64_t>(1) << 62;                   // 128-byte swizzle
  return desc;
}

// The same descriptor as two words: the high word is the same for every such tile, and the low
// word of a tile `bytes` further on is `bytes / 16` more (the start address field holds shared
// addresses up to 256 KB, so no carry leaves it). A loop then steps descriptors with 32-bit adds
// instead of rebuilding them from addresses.
constexpr uint32_t kSw128DescriptorHigh = (1024 >> 4) | (1u << 30);
__device__ __forceinline__ uint32_t smem_descriptor_sw128_low(const void* tile) {
  return static_cast<uint32_t>(smem_descriptor_sw128(tile));
}
__device__ __forceinline__ uint64_t sw128_descriptor(uint32_t low) {
  return static_cast<uint64_t>(kSw128DescriptorHigh) << 32 | low;
}

// Orders this thread's register accesses before the warpgroup's next wgmma.
__device__ __forceinline__ void wgmma_fence() {
#if MOEKIT_SM90A
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if MOEKIT_SM90A
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
#endif
}
// Waits until at most `kPending` committed wgmma groups are still running.
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
#if MOEKIT_SM90A
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(kPending) : "memory");
#endif
}
// Keeps the compiler from moving accesses of an accumulator register across wgmma boundaries.
__device__ __forceinline__ void fence_operand(float& r) { asm volatile("" : "+f"(r)::"memory"); }

// ---- Register reallocation between warpgroups (needs a register cap at kernel entry).

template <int kRegisters>
__device__ __forceinline__ void registers_grow() {
#if MOEKIT_SM90A
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kRegisters));
#endif
}
template <int kRegisters>
__device__ __forceinline__ void registers_shrink() {
#if MOEKIT_SM90A
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kRegisters));
#endif
}

// Orders this thread's earlier shared-memory writes (generic proxy) before later reads of the async
// proxy: wgmma operands written by threads instead of the copy engine.
__device__ __forceinline__ void fence_proxy_async_shared() {
#if MOEKIT_SM90A
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
#endif
}

// A barrier among `threads` threads of the CTA (whole warps) on hardware barrier `id` (1..15;
// __syncthreads uses 0).
__device__ __forceinline__ void named_barrier(int id, int threads) {
#if MOEKIT_SM90A
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
#else
  (void)id;
  (void)threads;
#endif
}

// ---- Flags between CTAs of a grid, through global memory (gpu scope).

// Publishes this thread's earlier global writes (and those other threads ordered before it by a
// barrier and their own fence) with the flag's store.
__device__ __forceinline__ void store_release_gpu(uint32_t* flag, uint32_t value) {
#if MOEKIT_SM90A
  asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(flag), "r"(value) : "memory");
#else
  (void)flag;
  (void)value;
#endif
}
__device__ __forceinline__ uint32_t load_acquire_gpu(const uint32_t* flag) {
  uint32_t value = 0;
#if MOEKIT_SM90A
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(value) : "l"(flag) : "memory");
#else
  (void)flag;
#endif
  return value;
}

// ---- Clusters and distributed shared memory.

__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t rank = 0;
#if MOEKIT_SM90A
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
#endif
  return rank;
}

// Every thread of every CTA in the cluster arrives and waits; orders shared-memory writes before
// the barrier with reads after it, across the cluster.
__device__ __forceinline__ void cluster_sync() {
#if MOEKIT_SM90A
  asm volatile(
      "barrier.cluster.arrive.release.aligned;\n"
      "barrier.cluster.wait.acquire.aligned;" ::
          : "memory");
#endif
}

// The two halves of cluster_sync(), for a thread that has work to do between them.
__device__ __forceinline__ void cluster_arrive() {
#if MOEKIT_SM90A
  asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
#endif
}
__device__ __forceinline__ void cluster_wait() {
#if MOEKIT_SM90A
  asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
#endif
}

// The shared::cluster address of `local`'s counterpart in CTA `rank` of the cluster.
__device__ __forceinline__ uint32_t map_shared_remote(const void* local, uint32_t rank) {
  uint32_t remote = 0;
#if MOEKIT_SM90A
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;"
               : "=r"(remote)
               : "r"(shared_address(local)), "r"(rank));
#else
  (void)local;
  (void)rank;
#endif
  return remote;
}

// Stores four floats at `local`'s counterpart (16-byte aligned) in CTA `rank` of the cluster.
__device__ __forceinline__ void store_shared_remote(float* local, uint32_t rank, float a, float b,
                                                    float c, float d) {
#if MOEKIT_SM90A
  asm volatile(
      "st.shared::cluster.v4.f32 [%0], {%1, %2, %3, %4};" ::"r"(map_shared_remote(local, rank)),
      "f"(a), "f"(b), "f"(c), "f"(d)
      : "memory");
#else
  (void)local;
  (void)rank;
  (void)a;
  (void)b;
  (void)c;
  (void)d;
#endif
}

// One arrival on `bar`'s counterpart in CTA `rank`, ordered after this thread's earlier stores
// (release at cluster scope).
__device__ __forceinline__ void mbarrier_arrive_remote(uint64_t* bar, uint32_t rank) {
#if MOEKIT_SM90A
  asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];" ::"r"(
                   map_shared_remote(bar, rank))
               : "memory");
#else
  (void)bar;
  (void)rank;
#endif
}

// One arrival on `bar`'s counterpart in CTA `rank`, with the default CTA-scope release: what a
// consumer uses to hand a stage back to a peer's producer (a cluster-scope release would wait for
// the thread's loads in flight: 60 % slower tiles in pairs, session 13).
__device__ __forceinline__ void mbarrier_arrive_peer(uint64_t* bar, uint32_t rank) {
#if MOEKIT_SM90A
  asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];" ::"r"(map_shared_remote(bar, rank))
               : "memory");
#else
  (void)bar;
  (void)rank;
#endif
}

// mbarrier_wait that also acquires what other CTAs of the cluster released with their arrivals.
__device__ __forceinline__ void mbarrier_wait_cluster(uint64_t* bar, uint32_t parity) {
#if MOEKIT_SM90A
  const uint32_t address = shared_address(bar);
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(address), "r"(parity)
        : "memory");
  } while (!done);
#else
  (void)bar;
  (void)parity;
#endif
}

// Reads the f32 at the same shared-memory offset as `local`, in CTA `rank` of the cluster.
__device__ __forceinline__ float load_shared_remote(const float* local, uint32_t rank) {
  float value = 0.0f;
#if MOEKIT_SM90A
  uint32_t remote = 0;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;"
               : "=r"(remote)
               : "r"(shared_address(local)), "r"(rank));
  asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(value) : "r"(remote) : "memory");
#else
  (void)local;
  (void)rank;
#endif
  return value;
}

// Reads the four f32 at the same shared-memory offset as `local` (16-byte aligned), in CTA `rank`
// of the cluster.
__device__ __forceinline__ float4 load_shared_remote4(const float* local, uint32_t rank) {
  float4 value = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#if MOEKIT_SM90A
  asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];"
               : "=f"(value.x), "=f"(value.y), "=f"(value.z), "=f"(value.w)
               : "r"(map_shared_remote(local, rank))
               : "memory");
#else
  (void)local;
  (void)rank;
#endif
  return value;
}

}  // namespace moekit::gpu::sm90
