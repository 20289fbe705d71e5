// `moekit bench`: verify against the reference, then time; one row per model and token count with
// the median time, tokens/s, the ratio to a one-pass memory roofline and to a measured peer.
#include <fmt/core.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>
#include <vector>

#include "bench_peers.h"
#include "commands.h"
#include "moekit/error.h"
#include "moekit/route_harness.h"
#ifdef MOEKIT_HAVE_GPU
#include "gpu/gpu_runtime.h"
#endif

namespace moekit::cli {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

}  // namespace

double measure_cpu_copy_bandwidth(int threads) {
  const size_t bytes = size_t{256} << 20;
  std::vector<char> src(bytes, 1), dst(bytes, 0);
  double best = 0.0;
  for (int rep = 0; rep < 5; ++rep) {
    const auto start = Clock::now();
#pragma omp parallel num_threads(threads)
    {
      const size_t n = static_cast<size_t>(omp_get_num_threads());
      const size_t i = static_cast<size_t>(omp_get_thread_num());
      const size_t chunk = bytes / n;
      std::memcpy(dst.data() + i * chunk, src.data() + i * chunk, chunk);
    }
    best = std::max(best, 2.0 * static_cast<double>(bytes) / seconds_since(start));
  }
  return best;
}

double median_cpu_call_us(const std::function<void(int)>& call) {
  const auto first = Clock::now();
  call(0);
  const bool slow = seconds_since(first) > 50e-3;
  int batch = 1;
  for (;;) {
    const auto start = Clock::now();
    for (int i = 0; i < batch; ++i) call(i);
    if (seconds_since(start) > 2e-3 || batch > (1 << 20)) break;
    batch *= 2;
  }
  std::vector<double> samples;
  for (int rep = 0; rep < (slow ? 5 : 15); ++rep) {
    const auto start = Clock::now();
    for (int i = 0; i < batch; ++i) call(i);
    samples.push_back(seconds_since(start) * 1e6 / batch);
  }
  std::sort(samples.begin(), samples.end());
  return samples[samples.size() / 2];
}

namespace {

struct Row {
  std::string model;
  int64_t tokens;
  std::string backend;
  double median_us;
  double bytes;
  bool verified;
};

// Median microseconds per route call on the CPU. Calls rotate over enough copies of the input that
// the logits do not sit in the caches between calls (as in a model, where they were just written
// by the router GEMM... but of a different token batch each layer).
double time_cpu(const harness::RouteCase& c, const harness::RouteInputs& in, Backend backend,
                int threads) {
  const size_t set_bytes = in.logits.nbytes();
  const int copies = static_cast<int>(
      std::clamp<size_t>((size_t{64} << 20) / std::max<size_t>(set_bytes, 1), 1, 64));
  std::vector<Tensor> logits;
  for (int i = 0; i < copies; ++i) logits.push_back(Tensor::copy_of(in.logits, Device::cpu()));
  harness::RouteOutputs out = harness::make_poisoned_outputs(c);
  RouteOptions options;
  options.backend = backend;
  options.num_threads = threads;
  return median_cpu_call_us([&](int i) {
    route(logits[static_cast<size_t>(i % copies)], in.bias_view(), c.config, out.weights, out.ids,
          options);
  });
}

#ifdef MOEKIT_HAVE_GPU
double time_gpu(const harness::RouteCase& c, const harness::RouteInputs& in) {
  const Device gpu = Device::gpu();
  Tensor logits = Tensor::copy_of(in.logits, gpu);
  std::optional<Tensor> bias;
  if (in.bias) bias = Tensor::copy_of(*in.bias, gpu);
  Tensor weights = Tensor::empty(DType::f32, {c.tokens, c.config.topk}, gpu);
  Tensor ids = Tensor::empty(c.ids_dtype, {c.tokens, c.config.topk}, gpu);
  const std::optional<TensorView> bias_view =
      bias ? std::optional<TensorView>(bias->view()) : std::nullopt;
  return gpu::median_graph_replay_us(
      [&](void* stream) {
        RouteOptions options;
        options.backend = Backend::gpu;
        options.stream = stream;
        options.static_weights = true;  // the bias is a weight, as a model runner calls its router
        route(logits, bias_view, c.config, weights, ids, options);
      },
      /*calls_per_graph=*/20, /*replays=*/50);
}
#endif

bool verify(const harness::RouteCase& c, const harness::RouteInputs& in, Backend backend) {
  const harness::RouteOutputs out = harness::run_backend(backend, c, in);
  const harness::RouteOutputs ref = harness::run_reference(c, in);
  return harness::compare_with_reference(c, in, ref, out).pass;
}

}  // namespace

int run_bench(const BenchOptions& options) {
  if (options.op != "route" && options.op != "gemm" && options.op != "quant" &&
      options.op != "linear" && options.op != "quantize-weight" && options.op != "gemm-grouped")
    fail("bench", "--op", options.op,
         "is not a benchmarked op (route, gemm, gemm-grouped, quant, linear, quantize-weight)");
  const Backend backend = options.backend ? *options.backend : fastest_backend();
  if (options.op == "gemm-grouped" && backend != Backend::gpu)
    fail(
        "bench", "--op", options.op,
        "is benchmarked on the GPU only (elsewhere it is G calls of --op gemm): add --backend gpu");
  if (!backend_available(backend))
    fail("bench", "--backend", std::string(backend_name(backend)),
         "is not present on this machine");
  if (!options.implementation.empty() && options.op != "gemm")
    fail("bench", "--implementation", options.implementation, "applies to --op gemm only");
  if (options.replays < 1 || options.replays > 100000)
    fail("bench", "--replays", std::to_string(options.replays), "must be 1..100000");
  if (options.data != "uniform" && options.op != "gemm")
    fail("bench", "--data", options.data, "applies to --op gemm only");
  parse_fp8_data(options.data);  // (an unknown name fails before any work)
  const int threads = options.threads > 0 ? options.threads : omp_get_max_threads();
  if (options.op != "route") return run_fp8_bench(options, backend, threads);
  double bandwidth = 0.0;  // bytes/s, read + write
  std::string bandwidth_source;
#ifdef MOEKIT_HAVE_GPU
  if (backend == Backend::gpu) {
    bandwidth = gpu::measure_copy_bandwidth_gbs() * 1e9;
    bandwidth_source = "GPU device-to-device copy";
  }
#endif
  if (backend != Backend::gpu) {
    bandwidth = measure_cpu_copy_bandwidth(threads);
    bandwidth_source = fmt::format("CPU memcpy, {} thread(s)", threads);
  }
  bool found = false;
  std::vector<Row> rows;
  bool all_verified = true;
  uint64_t seed = 12345;
  for (const harness::ModelRow& model : harness::model_table()) {
    if (!options.model.empty() && model.name != options.model) continue;
    found = true;
    for (int64_t tokens : harness::token_counts()) {
      if (options.tokens > 0 && tokens != options.tokens) continue;
      harness::RouteCase c = harness::model_case(model, tokens, harness::InputKind::random, seed++);
      const harness::RouteInputs in = harness::make_inputs(c);
      const bool ok = verify(c, in, backend);
      all_verified = all_verified && ok;
      double us = 0.0;
#ifdef MOEKIT_HAVE_GPU
      if (backend == Backend::gpu) us = time_gpu(c, in);
#endif
      if (backend != Backend::gpu) us = time_cpu(c, in, backend, threads);
      const double bytes = static_cast<double>(in.logits.nbytes()) +
                           (in.bias ? static_cast<double>(in.bias->nbytes()) : 0.0) +
                           static_cast<double>(tokens * model.config.topk * (4 + 4));
      rows.push_back({model.name, tokens, std::string(backend_name(backend)), us, bytes, ok});
    }
  }
  if (!found) fail("bench", "--model", options.model, "is not a row of the model table");

  if (options.json) {
    nlohmann::json out = nlohmann::json::array();
    for (const Row& r : rows) {
      const std::optional<double> peer = peer_us(backend, r.model, r.tokens, threads);
      out.push_back({{"op", "route"},
                     {"model", r.model},
                     {"tokens", r.tokens},
                     {"backend", r.backend},
                     {"threads", backend == Backend::gpu ? 0 : threads},
                     {"median_us", r.median_us},
                     {"tokens_per_s", static_cast<double>(r.tokens) / (r.median_us * 1e-6)},
                     {"roofline_us", r.bytes / bandwidth * 1e6},
                     {"verified", r.verified},
                     {"peer_us", peer ? nlohmann::json(*peer) : nlohmann::json(nullptr)}});
    }
    std::printf("%s\n", out.dump(1).c_str());
    return all_verified ? 0 : 1;
  }
  std::printf("moekit bench route, backend %s, %s; roofline = bytes moved once / %.1f GB/s (%s)\n",
              std::string(backend_name(backend)).c_str(),
              backend == Backend::gpu
                  ? "CUDA-graph replay, median per call, bias static (OpOptions::static_weights)"
                  : fmt::format("{} thread(s), median per call", threads).c_str(),
              bandwidth / 1e9, bandwidth_source.c_str());
  std::printf("%-20s %6s %10s %12s %11s %10s %10s %8s\n", "model", "tokens", "median us",
              "tokens/s", "roofline us", "of roofline", "peer us", "vs peer");
  for (const Row& r : rows) {
    const double roofline_us = r.bytes / bandwidth * 1e6;
    const std::optional<double> peer = peer_us(backend, r.model, r.tokens, threads);
    std::printf("%-20s %6lld %10.3f %12.4g %11.3f %9.1f%% %10s %8s%s\n", r.model.c_str(),
                static_cast<long long>(r.tokens), r.median_us,
                static_cast<double>(r.tokens) / (r.median_us * 1e-6), roofline_us,
                100.0 * roofline_us / r.median_us,
                peer ? fmt::format("{:.3f}", *peer).c_str() : "-",
                peer ? fmt::format("{:.1f}x", *peer / r.median_us).c_str() : "-",
                r.verified ? "" : "  NOT VERIFIED");
  }
  std::printf("peer: %s\n", peer_description(backend).c_str());
  return all_verified ? 0 : 1;
}

}  // namespace moekit::cli
