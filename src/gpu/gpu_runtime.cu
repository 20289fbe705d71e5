// The GPU runtime services behind core/gpu_hooks.h and gpu_runtime.h.
#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "core/env_switch.h"
#include "gpu/gpu_check.h"
#include "gpu/gpu_runtime.h"
#include "gpu/vendor.h"
#include "moekit/error.h"

namespace moekit::gpu {
namespace {

void* gpu_malloc(size_t bytes, int device) {
  DeviceGuard guard(device);
  void* ptr = nullptr;
  MOEKIT_GPU_CHECK(cudaMalloc(&ptr, bytes));
  return ptr;
}

void gpu_free(void* ptr) {
  // A free during teardown after the driver shut down is not worth an exception from a destructor.
  if (ptr) (void)cudaFree(ptr);
}

void gpu_memcpy(void* dst, bool /*dst_on_gpu*/, const void* src, bool /*src_on_gpu*/,
                size_t bytes) {
  // Unified addressing: the runtime knows which side each pointer is on.
  MOEKIT_GPU_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDefault));
  // cudaMemcpy returns before a copy from pageable memory (or between device buffers) has landed,
  // and it runs on the default stream, which a non-blocking stream does not wait for: without
  // this, a kernel enqueued next on such a stream could run first and see, or be overwritten by,
  // the copy. The hook promises a finished copy.
  MOEKIT_GPU_CHECK(cudaStreamSynchronize(nullptr));
}

int gpu_device_count() {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  // No device, or a driver without one, means the backend is absent rather than broken.
  if (status == cudaErrorNoDevice || status == cudaErrorInsufficientDriver) {
    (void)cudaGetLastError();
    return 0;
  }
  MOEKIT_GPU_CHECK(status);
  return count;
}

std::string gpu_describe(int device) {
  const DeviceProperties p = device_properties(device);
  return p.name + ", sm_" + std::to_string(p.major) + std::to_string(p.minor) + ", " +
         std::to_string(p.sm_count) + " SMs";
}

// Runs the destructor-like cleanup of the timing helpers even when a call throws.
template <class F>
struct Cleanup {
  F f;
  ~Cleanup() { f(); }
};
template <class F>
Cleanup(F) -> Cleanup<F>;

}  // namespace

GpuHooks make_hooks() {
  GpuHooks hooks;
  hooks.malloc = gpu_malloc;
  hooks.free = gpu_free;
  hooks.memcpy = gpu_memcpy;
  hooks.device_count = gpu_device_count;
  hooks.describe = gpu_describe;
  return hooks;
}

DeviceProperties device_properties(int device) {
  static std::mutex mutex;
  static std::map<int, DeviceProperties> cache;
  std::lock_guard<std::mutex> lock(mutex);
  if (auto it = cache.find(device); it != cache.end()) return it->second;
  cudaDeviceProp prop{};
  MOEKIT_GPU_CHECK(cudaGetDeviceProperties(&prop, device));
  DeviceProperties p;
  p.name = prop.name;
  p.major = prop.major;
  p.minor = prop.minor;
  p.sm_count = prop.multiProcessorCount;
  p.warp_size = prop.warpSize;
  p.shared_memory_per_block_optin = prop.sharedMemPerBlockOptin;
  cache.emplace(device, p);
  return p;
}

int resident_blocks_per_sm(const void* kernel, int threads, size_t shared_bytes, int device) {
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, size_t, int>, int> cache;
  const auto key = std::make_tuple(kernel, threads, shared_bytes, device);
  std::lock_guard<std::mutex> lock(mutex);
  if (auto it = cache.find(key); it != cache.end()) return it->second;
  int blocks = 0;
  MOEKIT_GPU_CHECK(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, shared_bytes));
  blocks = std::max(blocks, 1);
  cache.emplace(key, blocks);
  return blocks;
}

bool programmatic_launch_allowed(int device) {
  static const bool allowed = !env::is("MOEKIT_GPU_PDL", "0");
  return allowed && device_properties(device).major >= 9;
}

void synchronize(void* stream) {
  MOEKIT_GPU_CHECK(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)));
}

int current_device() {
  int device = 0;
  MOEKIT_GPU_CHECK(cudaGetDevice(&device));
  return device;
}

double median_exec_replay_us(void* exec_handle, void* stream_handle, int calls_per_graph,
                             int replays) {
  if (calls_per_graph < 1) fail("gpu", "calls_per_graph", std::to_string(calls_per_graph), "< 1");
  if (replays < 1) fail("gpu", "replays", std::to_string(replays), "< 1");
  const auto exec = static_cast<cudaGraphExec_t>(exec_handle);
  const auto stream = static_cast<cudaStream_t>(stream_handle);
  cudaEvent_t start = nullptr, stop = nullptr;
  Cleanup cleanup{[&] {
    if (start) (void)cudaEventDestroy(start);
    if (stop) (void)cudaEventDestroy(stop);
  }};
  MOEKIT_GPU_CHECK(cudaEventCreate(&start));
  MOEKIT_GPU_CHECK(cudaEventCreate(&stop));
  for (int i = 0; i < 3; ++i) MOEKIT_GPU_CHECK(cudaGraphLaunch(exec, stream));
  MOEKIT_GPU_CHECK(cudaStreamSynchronize(stream));

  // Each timed replay follows an untimed one on the stream: the start event then completes when
  // the GPU finishes that lead replay, by which time the host has submitted the timed one, so the
  // interval holds the replay's GPU time and not the host's launch of the graph (on an idle GPU the
  // start event completes at once and the first kernel waits for that launch, several us).
  // MOEKIT_BENCH_COLD_REPLAY=1 times replays launched on an idle GPU, as before session 40.
  static const bool cold = env::is("MOEKIT_BENCH_COLD_REPLAY", "1");
  std::vector<double> per_call_us;
  per_call_us.reserve(static_cast<size_t>(replays));
  for (int r = 0; r < replays; ++r) {
    if (!cold) MOEKIT_GPU_CHECK(cudaGraphLaunch(exec, stream));
    MOEKIT_GPU_CHECK(cudaEventRecord(start, stream));
    MOEKIT_GPU_CHECK(cudaGraphLaunch(exec, stream));
    MOEKIT_GPU_CHECK(cudaEventRecord(stop, stream));
    MOEKIT_GPU_CHECK(cudaEventSynchronize(stop));
    float ms = 0.0f;
    MOEKIT_GPU_CHECK(cudaEventElapsedTime(&ms, start, stop));
    per_call_us.push_back(1000.0 * static_cast<double>(ms) / calls_per_graph);
  }
  std::sort(per_call_us.begin(), per_call_us.end());
  const size_t n = per_call_us.size();
  return n % 2 ? per_call_us[n / 2] : 0.5 * (per_call_us[n / 2 - 1] + per_call_us[n / 2]);
}

double median_graph_replay_us(const std::function<void(void* stream)>& enqueue, int calls_per_graph,
                              int replays) {
  if (calls_per_graph < 1) fail("gpu", "calls_per_graph", std::to_string(calls_per_graph), "< 1");
  if (replays < 1) fail("gpu", "replays", std::to_string(replays), "< 1");
  cudaStream_t stream = nullptr;
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  Cleanup cleanup{[&] {
    if (exec) (void)cudaGraphExecDestroy(exec);
    if (graph) (void)cudaGraphDestroy(graph);
    if (stream) (void)cudaStreamDestroy(stream);
  }};
  MOEKIT_GPU_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

  // One eager call first, so that any lazy set-up (module loading) happens outside the capture.
  enqueue(stream);
  MOEKIT_GPU_CHECK(cudaStreamSynchronize(stream));

  MOEKIT_GPU_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  try {
    for (int i = 0; i < calls_per_graph; ++i) enqueue(stream);
  } catch (...) {
    cudaGraph_t partial = nullptr;
    (void)cudaStreamEndCapture(stream, &partial);
    if (partial) (void)cudaGraphDestroy(partial);
    throw;
  }
  MOEKIT_GPU_CHECK(cudaStreamEndCapture(stream, &graph));
  MOEKIT_GPU_CHECK(cudaGraphInstantiateWithFlags(&exec, graph, 0));

  return median_exec_replay_us(exec, stream, calls_per_graph, replays);
}

double measure_copy_bandwidth_gbs() {
  constexpr size_t kBytes = size_t{1} << 30;  // 1 GiB each way: far past any L2
  constexpr int kCopies = 10;
  void* src = nullptr;
  void* dst = nullptr;
  cudaStream_t stream = nullptr;
  cudaEvent_t start = nullptr, stop = nullptr;
  Cleanup cleanup{[&] {
    if (src) (void)cudaFree(src);
    if (dst) (void)cudaFree(dst);
    if (start) (void)cudaEventDestroy(start);
    if (stop) (void)cudaEventDestroy(stop);
    if (stream) (void)cudaStreamDestroy(stream);
  }};
  MOEKIT_GPU_CHECK(cudaMalloc(&src, kBytes));
  MOEKIT_GPU_CHECK(cudaMalloc(&dst, kBytes));
  MOEKIT_GPU_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  MOEKIT_GPU_CHECK(cudaEventCreate(&start));
  MOEKIT_GPU_CHECK(cudaEventCreate(&stop));
  MOEKIT_GPU_CHECK(cudaMemsetAsync(src, 1, kBytes, stream));
  MOEKIT_GPU_CHECK(cudaMemcpyAsync(dst, src, kBytes, cudaMemcpyDeviceToDevice, stream));  // warm
  std::vector<double> seconds;
  for (int i = 0; i < kCopies; ++i) {
    MOEKIT_GPU_CHECK(cudaEventRecord(start, stream));
    MOEKIT_GPU_CHECK(cudaMemcpyAsync(dst, src, kBytes, cudaMemcpyDeviceToDevice, stream));
    MOEKIT_GPU_CHECK(cudaEventRecord(stop, stream));
    MOEKIT_GPU_CHECK(cudaEventSynchronize(stop));
    float ms = 0.0f;
    MOEKIT_GPU_CHECK(cudaEventElapsedTime(&ms, start, stop));
    seconds.push_back(static_cast<double>(ms) * 1e-3);
  }
  std::sort(seconds.begin(), seconds.end());
  return 2.0 * static_cast<double>(kBytes) / seconds[seconds.size() / 2] / 1e9;
}

}  // namespace moekit::gpu
