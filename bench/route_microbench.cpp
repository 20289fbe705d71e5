// Google Benchmark micro-benchmarks of route on the CPU backends, one per model-table row, for
// profiling and A/B comparisons while tuning (`moekit bench` is the verified, user-facing table).
//   build/release/route_microbench --benchmark_filter=Qwen3-30B --benchmark_repetitions=5
#include <benchmark/benchmark.h>

#include "moekit/route_harness.h"

namespace {

using namespace moekit;

void route_model(benchmark::State& state, const harness::ModelRow& row, Backend backend) {
  harness::RouteCase c;
  c.tokens = state.range(0);
  c.num_experts = row.num_experts;
  c.config = row.config;
  c.has_bias = row.has_bias;
  c.seed = 1;
  const harness::RouteInputs in = harness::make_inputs(c);
  harness::RouteOutputs out = harness::make_poisoned_outputs(c);
  RouteOptions options;
  options.backend = backend;
  options.num_threads = 1;
  for (auto _ : state) {
    route(in.logits, in.bias_view(), c.config, out.weights, out.ids, options);
    benchmark::DoNotOptimize(out.weights.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * c.tokens);
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(in.logits.nbytes()));
}

const int registered = [] {
  for (const harness::ModelRow& row : harness::model_table()) {
    benchmark::RegisterBenchmark(("route/cpu/" + row.name).c_str(), route_model, row, Backend::cpu)
        ->Arg(16)
        ->Arg(4096);
    benchmark::RegisterBenchmark(("route/reference/" + row.name).c_str(), route_model, row,
                                 Backend::reference)
        ->Arg(256);
  }
  return 0;
}();

}  // namespace

BENCHMARK_MAIN();
