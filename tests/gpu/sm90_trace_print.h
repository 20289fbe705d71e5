// The Hopper FP8 kernels' phase stamps (diagnosis builds, MOEKIT_FP8_TRACE) printed as a table:
// for each steady call of CUDA-graph replays, each phase's min / median / max over CTAs in ns from
// the call's first entry (medians over calls), and per CTA from its own entry in its SM's cycles.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <map>
#include <numeric>
#include <utility>
#include <vector>

#include "gpu/fp8_gemm_sm90.h"

namespace moekit::gpu_test {

struct TraceCall {
  uint64_t first_entry = ~uint64_t{0}, last_exit = 0;
  std::vector<const gpu::Sm90TraceRecord*> ctas;
};

inline double median_of(std::vector<double> v) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

inline void print_trace(const std::vector<gpu::Sm90TraceRecord>& records, int calls_per_graph) {
  using gpu::Sm90TracePhase;
  constexpr int kPhases = gpu::kSm90TracePhases;
  const char* names[kPhases] = {"entry",
                                "producer waited",
                                "consumer waited",
                                "weights landed / x quantized",
                                "scales staged",
                                "first stage full",
                                "last issued",
                                "last consumed",
                                "sums done",
                                "stores issued",
                                "exit"};
  if (records.empty()) {
    std::printf("  no records\n");
    return;
  }
  const uint32_t grid = records[0].grid_ctas;
  std::vector<TraceCall> calls(records.size() / grid + 1);
  for (const gpu::Sm90TraceRecord& r : records) {
    TraceCall& c = calls[r.ticket / grid];
    c.ctas.push_back(&r);
    c.first_entry = std::min(c.first_entry, r.time_ns[0]);
    c.last_exit = std::max(c.last_exit, r.time_ns[kPhases - 1]);
  }
  // Stamp granularity: the gcd of all differences from the first entry.
  uint64_t step = 0;
  for (const gpu::Sm90TraceRecord& r : records)
    for (int p = 0; p < kPhases; ++p)
      if (r.time_ns[p] != 0)
        step = std::gcd(step, r.time_ns[p] > calls[0].first_entry
                                  ? r.time_ns[p] - calls[0].first_entry
                                  : calls[0].first_entry - r.time_ns[p]);
  // SM clock: cycles over ns between each SM's first and last stamp of the trace.
  std::map<uint32_t, std::pair<const gpu::Sm90TraceRecord*, const gpu::Sm90TraceRecord*>> per_sm;
  for (const gpu::Sm90TraceRecord& r : records) {
    auto [it, fresh] = per_sm.try_emplace(r.sm, &r, &r);
    if (!fresh && r.time_ns[0] < it->second.first->time_ns[0]) it->second.first = &r;
    if (!fresh && r.time_ns[kPhases - 1] > it->second.second->time_ns[kPhases - 1])
      it->second.second = &r;
  }
  std::vector<double> ghz;
  for (const auto& [sm, ends] : per_sm) {
    const double ns = static_cast<double>(ends.second->time_ns[kPhases - 1]) -
                      static_cast<double>(ends.first->time_ns[0]);
    if (ns > 20000)
      ghz.push_back((static_cast<double>(ends.second->cycles[kPhases - 1]) -
                     static_cast<double>(ends.first->cycles[0])) /
                    ns);
  }
  const double clock_ghz = median_of(ghz);

  // Per steady call: min / median / max over CTAs of each phase (globaltimer, from the call's
  // first entry), the previous call's last exit, the next call's first entry; per CTA: each phase
  // from its own entry in its SM's cycles.
  std::vector<double> stat[kPhases][3], own[kPhases], rank0_exit[3], other_exit[3], previous_exit,
      next_entry, reached[kPhases];
  int steady = 0;
  for (size_t i = 1; i + 1 < calls.size(); ++i) {
    const TraceCall& c = calls[i];
    if (c.ctas.size() != grid || calls[i - 1].ctas.size() != grid) continue;
    if (static_cast<int>(i) % calls_per_graph == 0) continue;  // follows a replay's end
    ++steady;
    const auto from_entry = [&](uint64_t t) {
      return static_cast<double>(t) - static_cast<double>(c.first_entry);
    };
    previous_exit.push_back(from_entry(calls[i - 1].last_exit));
    if (calls[i + 1].ctas.size() == grid && static_cast<int>(i + 1) % calls_per_graph != 0)
      next_entry.push_back(from_entry(calls[i + 1].first_entry));
    std::vector<double> r0, rn;
    for (int p = 0; p < kPhases; ++p) {
      std::vector<double> v;
      for (const gpu::Sm90TraceRecord* r : c.ctas) {
        if (r->time_ns[p] == 0) continue;
        v.push_back(from_entry(r->time_ns[p]));
        if (clock_ghz > 0)
          own[p].push_back((static_cast<double>(r->cycles[p]) - static_cast<double>(r->cycles[0])) /
                           clock_ghz);
        if (p == kPhases - 1) (r->rank == 0 ? r0 : rn).push_back(v.back());
      }
      reached[p].push_back(static_cast<double>(v.size()));
      if (v.empty()) continue;
      std::sort(v.begin(), v.end());
      stat[p][0].push_back(v.front());
      stat[p][1].push_back(median_of(v));
      stat[p][2].push_back(v.back());
    }
    for (auto [v, into] : {std::pair{&r0, rank0_exit}, std::pair{&rn, other_exit}}) {
      if (v->empty()) continue;
      std::sort(v->begin(), v->end());
      into[0].push_back(v->front());
      into[1].push_back(median_of(*v));
      into[2].push_back(v->back());
    }
  }
  std::printf("  %d steady calls of %u CTAs; stamps in steps of %llu ns; SM clock %.3f GHz\n",
              steady, grid, static_cast<unsigned long long>(step), clock_ghz);
  std::printf("  %-28s %8s %8s %8s   %8s  (ns from the call's first entry; per CTA from its own)\n",
              "phase", "min", "median", "max", "own");
  std::printf("  %-28s %8s %8.0f\n", "previous call last exit", "", median_of(previous_exit));
  for (int p = 0; p < kPhases; ++p) {
    if (stat[p][1].empty()) {
      std::printf("  %-28s (not reached)\n", names[p]);
      continue;
    }
    std::printf("  %-28s %8.0f %8.0f %8.0f   %8.0f  (%.0f CTAs)\n", names[p], median_of(stat[p][0]),
                median_of(stat[p][1]), median_of(stat[p][2]), median_of(own[p]),
                median_of(reached[p]));
  }
  for (auto [label, v] :
       {std::pair{"exit, rank 0", rank0_exit}, std::pair{"exit, ranks > 0", other_exit}}) {
    if (v[1].empty()) continue;
    std::printf("  %-28s %8.0f %8.0f %8.0f\n", label, median_of(v[0]), median_of(v[1]),
                median_of(v[2]));
  }
  std::printf("  %-28s %8s %8.0f\n", "next call first entry", "", median_of(next_entry));
}

}  // namespace moekit::gpu_test
