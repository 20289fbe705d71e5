// Measured peer timings that `moekit bench` prints ratios against. Each table says where its
// numbers come from; a row without a peer prints "-".
#pragma once

#include <optional>
#include <string>

#include "moekit/backend.h"

namespace moekit::cli {

struct PeerTiming {
  const char* model;
  long long tokens;
  double us;
};

// GPU: SGLang's Triton router (moe_fused_gate, the fastest public router), H100 SXM, CUDA-graph
// replay, bf16 logits (shared/spec/background-performance.md, appendix, 2026-11-28).
inline constexpr PeerTiming kGpuPeer[] = {
    {"Qwen3-30B-A3B", 1, 2.78},
    {"Qwen3-30B-A3B", 64, 2.85},
    {"Qwen3-30B-A3B", 1024, 3.02},
    {"Qwen3-30B-A3B", 4096, 4.57},
    {"Qwen3-30B-A3B", 8192, 7.34},
    {"Qwen3-30B-A3B", 16384, 12.71},
    {"Qwen3.5-35B-A3B", 1, 2.70},
    {"Qwen3.5-35B-A3B", 64, 2.81},
    {"Qwen3.5-35B-A3B", 1024, 3.39},
    {"Qwen3.5-35B-A3B", 4096, 7.21},
    {"Qwen3.5-35B-A3B", 8192, 12.55},
    {"Qwen3.5-35B-A3B", 16384, 23.08},
    {"Qwen3-Next-80B-A3B", 1, 3.84},
    {"Qwen3-Next-80B-A3B", 64, 3.90},
    {"Qwen3-Next-80B-A3B", 1024, 5.09},
    {"Qwen3-Next-80B-A3B", 4096, 13.73},
    {"Qwen3-Next-80B-A3B", 8192, 25.14},
    {"Qwen3-Next-80B-A3B", 16384, 47.61},
    {"DeepSeek-V3", 1, 3.66},
    {"DeepSeek-V3", 64, 3.76},
    {"DeepSeek-V3", 1024, 4.80},
    {"DeepSeek-V3", 4096, 12.04},
    {"DeepSeek-V3", 8192, 21.76},
    {"DeepSeek-V3", 16384, 41.11},
    {"Kimi-K2", 1, 3.29},
    {"Kimi-K2", 64, 3.40},
    {"Kimi-K2", 1024, 4.58},
    {"Kimi-K2", 4096, 12.18},
    {"Kimi-K2", 8192, 22.31},
    {"Kimi-K2", 16384, 42.48},
};

// CPU, one thread: the torch-native path (softmax + topk + renormalize; sigmoid + grouped masking
// + topk) on one core of the project's AMD EPYC development machine, as measured in issue 2
// (docs/perf/routing-cpu.md).
inline constexpr PeerTiming kCpuPeerOneThread[] = {
    {"Qwen3-30B-A3B", 4096, 4096 / 0.6},  // 0.6 M tokens/s (issue 2's measurement)
    {"DeepSeek-V3", 4096, 4096 / 0.17},   // 0.17 M tokens/s (issue 2's measurement)
};

inline std::optional<double> peer_us(Backend backend, const std::string& model, long long tokens,
                                     int threads) {
  auto find = [&](const auto& table) -> std::optional<double> {
    for (const PeerTiming& p : table)
      if (model == p.model && tokens == p.tokens) return p.us;
    return std::nullopt;
  };
  if (backend == Backend::gpu) return find(kGpuPeer);
  if (backend == Backend::cpu && threads == 1) return find(kCpuPeerOneThread);
  return std::nullopt;
}

inline std::string peer_description(Backend backend) {
  if (backend == Backend::gpu)
    return "SGLang Triton router (moe_fused_gate), H100 SXM, CUDA graph "
           "(background-performance.md)";
  return "torch-native CPU routing, one core of an AMD EPYC (issue 2; docs/perf/routing-cpu.md); "
         "shown for --threads 1, '-' where no peer was measured";
}

}  // namespace moekit::cli
