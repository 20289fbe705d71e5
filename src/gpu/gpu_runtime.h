// The GPU runtime as seen from plain C++: hooks for the core, device queries, error checks.
#pragma once

#include <functional>
#include <string>

#include "core/gpu_hooks.h"

namespace moekit::gpu {

GpuHooks make_hooks();  // the table that core/backend.cpp installs when the GPU backend is built

struct DeviceProperties {
  std::string name;
  int major = 0, minor = 0;  // compute capability
  int sm_count = 0;
  int warp_size = 32;
  size_t shared_memory_per_block_optin = 0;
};
DeviceProperties device_properties(int device);  // cached; throws Error

// Blocks of `kernel` (a __global__ function) with `threads` threads and `shared_bytes` of dynamic
// shared memory resident at once on one SM of `device` (at least 1), asked once per (kernel,
// threads, bytes, device). A host-side query: allowed while a stream is being captured. The caller
// has `device` current.
int resident_blocks_per_sm(const void* kernel, int threads, size_t shared_bytes, int device);

// Whether kernels on `device` may be launched overlapping the previous kernel of their stream
// (programmatic dependent launch: compute capability 9.0+), unless MOEKIT_GPU_PDL=0 (A/B timing).
bool programmatic_launch_allowed(int device);

// For tests and the CLI; inside an op only where its plan says so
// (grouped_block_fp8_gemm_contiguous's "gpu.per_segment", which reads the indices on the host).
void synchronize(void* stream);

// ---- Benchmark helpers (the CLI's bench and the GPU tests; never inside an op).

// The device the calling thread works on (cudaGetDevice); throws Error.
int current_device();

// Captures `calls_per_graph` calls of enqueue(stream) into one graph on a fresh non-default stream,
// replays it a few times to warm up, then times `replays` replays with events and returns the
// median time per call in microseconds. enqueue must only enqueue work on the stream it is given.
double median_graph_replay_us(const std::function<void(void* stream)>& enqueue, int calls_per_graph,
                              int replays);

// The timing half of median_graph_replay_us, for a caller that keeps the graph (e.g. to replay it
// again traced): `exec` (a cudaGraphExec_t of calls_per_graph calls) replayed on `stream` a few
// times to warm up, then `replays` replays timed, each behind an untimed one so that the host's
// launch of the graph is not in the interval; the median time per call in microseconds.
double median_exec_replay_us(void* exec, void* stream, int calls_per_graph, int replays);

// Device-to-device copy rate of a buffer far larger than L2, counting bytes read plus bytes
// written (the denominator for "fraction of memory bandwidth"), in GB/s (1e9 bytes per second).
double measure_copy_bandwidth_gbs();

}  // namespace moekit::gpu
