// The linear layer's fused Hopper entry ("gpu.sm90.fused": bf16 x quantized inside the swap GEMM
// kernel) against the two-kernel path it replaces at decode sizes ("gpu": per_token_group_quant_fp8
// into the workspace, then block_fp8_gemm_sm90): the same bytes out for every M <= 16, model
// shapes and ragged ones, every output dtype, with and without bias, and rows holding NaN, inf,
// zero and saturating groups (with the dispatch's groups rule lifted, so that every plan the kernel
// can run is compared); the dispatch's choice;
// graph capture; and, as a diagnostic, where a fused call's time goes. Skips without a GPU, and
// where the fused entry does not serve (not Hopper, no sm_90a code) says why.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "gpu/fp8_gemm_sm90.h"
#include "gpu/gpu_check.h"
#include "gpu/gpu_runtime.h"
#include "gpu_test_support.h"
#include "moekit/dtype.h"
#include "moekit/ops/fp8.h"
#include "moekit/tensor.h"
#include "sm90_trace_print.h"

namespace moekit {
namespace {

constexpr const char* kFused = "gpu.sm90.fused";
constexpr const char* kTwoKernels = "gpu";

using gpu_test::seed_for;

Tensor gpu_copy(const Tensor& t) { return Tensor::copy_of(t.view(), Device::gpu()); }
Tensor host_copy(const Tensor& t) { return Tensor::copy_of(t.view(), Device::cpu()); }
TensorView first_rows(const Tensor& t, int64_t rows) {  // of a contiguous [M, K]
  return TensorView(t.data(), t.dtype(), {rows, t.size(1)}, t.device());
}

// Random e4m3 bytes, NaN (0x7f, 0xff) excluded.
Tensor random_weight(std::mt19937_64& rng, int64_t n, int64_t k) {
  Tensor t = Tensor::empty(DType::f8e4m3, {n, k});
  auto* bytes = t.data_as<uint8_t>();
  for (int64_t i = 0; i < t.numel(); ++i) {
    const auto b = static_cast<uint8_t>(rng());
    bytes[i] = (b & 0x7f) == 0x7f ? static_cast<uint8_t>(b ^ 1) : b;
  }
  return t;
}

Tensor random_scales(std::mt19937_64& rng, int64_t n, int64_t k, DType dtype) {
  Tensor t = Tensor::empty(dtype, {(n + 127) / 128, (k + 127) / 128});
  std::uniform_real_distribution<float> u(0.001f, 0.01f);
  for (int64_t i = 0; i < t.numel(); ++i) store_from_f32(t.data(), dtype, i, u(rng));
  return t;
}

// bf16 activations, normal with a few outliers; with `adversarial`, rows get groups of 128 that
// hold a NaN, an inf, only zeros (and -0), values past e4m3's range, or subnormal-sized values.
Tensor random_x(std::mt19937_64& rng, int64_t m, int64_t k, bool adversarial) {
  Tensor x = Tensor::empty(DType::bf16, {m, k});
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int64_t i = 0; i < x.numel(); ++i) {
    const float v = normal(rng);
    store_from_f32(x.data(), DType::bf16, i, rng() % 64 == 0 ? 40.0f * v : v);
  }
  if (!adversarial) return x;
  const int64_t groups = (k + 127) / 128;
  for (int64_t row = 0; row < m; ++row) {
    const int64_t g = static_cast<int64_t>(rng() % static_cast<uint64_t>(groups));
    const int64_t first = g * 128, last = std::min(k, first + 128);
    const int64_t at = first + static_cast<int64_t>(rng() % static_cast<uint64_t>(last - first));
    auto put = [&](int64_t col, float v) {
      store_from_f32(x.data(), DType::bf16, row * k + col, v);
    };
    switch (row % 6) {
      case 0:
        put(at, NAN);
        break;
      case 1:
        put(at, row % 12 == 1 ? INFINITY : -INFINITY);
        break;
      case 2:
        for (int64_t c = first; c < last; ++c) put(c, c % 2 == 0 ? 0.0f : -0.0f);
        break;
      case 3:
        for (int64_t c = first; c < last; ++c) put(c, 1e30f * normal(rng));
        break;
      case 4:
        for (int64_t c = first; c < last; ++c) put(c, 1e-38f * normal(rng));
        break;
      default:
        break;  // an ordinary row
    }
  }
  return x;
}

// The reason the named linear entry gives ("" when it serves), and whether it is what the
// dispatch picks.
struct Verdict {
  std::string reason;
  bool chosen = false;
  std::string picked;
};

Verdict verdict_of(const char* name, const TensorView& x, const TensorView& w, const TensorView& ws,
                   const std::optional<TensorView>& bias, const TensorView& y, void* workspace,
                   size_t bytes) {
  OpOptions any;
  any.backend = Backend::gpu;
  Verdict v{"not in the table"};
  for (const ImplementationChoice& r :
       explain_w8a8_block_fp8_linear(x, w, ws, bias, y, workspace, bytes, any)) {
    if (r.name == name) v.reason = r.reason, v.chosen = r.chosen;
    if (r.chosen) v.picked = r.name;
  }
  return v;
}

// Hopper with sm_90a code: the fused entry must serve M <= 16 (elsewhere it declines, said why),
// but for the measured exception: too many groups (tokens x a CTA's k-blocks) for its plan.
bool fused_expected() { return gpu::device_properties(0).major == 9; }
bool too_many_groups(const std::string& reason) {
  return reason.find(" groups > ") != std::string::npos;
}

struct Shape {
  const char* name;
  int64_t n, k;
};

TEST(GpuFp8LinearFused, EqualsTheTwoKernelPathBitForBit) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(seed_for("EqualsTheTwoKernelPathBitForBit"));
  // Every plan the kernel can run, also where the dispatch's groups rule prefers the two kernels.
  gpu_test::ScopedEnv no_limit("MOEKIT_SM90_FUSED_GROUPS", "1000000");
  const Shape shapes[] = {
      {"DeepSeek-V3 gate_up", 4096, 7168}, {"DeepSeek-V3 down", 7168, 2048},
      {"DeepSeek-V3 kv_a", 576, 7168},     {"Qwen3-30B q_proj", 4096, 2048},
      {"Qwen3-30B o_proj", 2048, 4096},    {"Qwen3 expert down", 2048, 768},
      {"ragged N and K", 200, 1040},       {"one k-block", 72, 128},
  };
  const DType outs[] = {DType::bf16, DType::f32, DType::f16};
  const DType biases[] = {DType::u8, DType::bf16, DType::f32, DType::f16};  // u8: no bias
  int compared = 0, declined = 0;
  for (const Shape& s : shapes) {
    const Tensor w = random_weight(rng, s.n, s.k);
    const Tensor w_d = gpu_copy(w);
    const Tensor ws_d =
        gpu_copy(random_scales(rng, s.n, s.k, s.k == 2048 ? DType::bf16 : DType::f32));
    const Tensor x_all = random_x(rng, 16, s.k, /*adversarial=*/s.n != 4096);
    const Tensor x_all_d = gpu_copy(x_all);
    for (int64_t m = 1; m <= 16; ++m) {
      const DType out = outs[m % 3];
      const DType bias_type = biases[(m + s.k) % 4];
      std::optional<Tensor> bias_d;
      if (bias_type != DType::u8) {
        Tensor b = Tensor::empty(bias_type, {s.n});
        std::normal_distribution<float> normal(0.0f, 1.0f);
        for (int64_t i = 0; i < s.n; ++i) store_from_f32(b.data(), bias_type, i, normal(rng));
        bias_d = gpu_copy(b);
      }
      std::optional<TensorView> bias;
      if (bias_d) bias = bias_d->view();
      const TensorView x = first_rows(x_all_d, m);
      const size_t bytes = w8a8_block_fp8_linear_workspace_size(m, s.k);
      Tensor workspace = Tensor::empty(DType::u8, {static_cast<int64_t>(bytes)}, Device::gpu());
      Tensor y_two = Tensor::empty(out, {m, s.n}, Device::gpu());
      Tensor y_fused = Tensor::empty(out, {m, s.n}, Device::gpu());
      const std::string what = std::string(s.name) + " M=" + std::to_string(m) +
                               (m % 2 == 0 ? " (static weights)" : "") + " out " +
                               std::string(dtype_name(out)) + " bias " +
                               (bias ? std::string(dtype_name(bias_type)) : "none");
      const Verdict v = verdict_of(kFused, x, w_d, ws_d, bias, y_fused, workspace.data(), bytes);
      if (!v.reason.empty()) {
        ++declined;
        if (fused_expected() && !too_many_groups(v.reason))
          ADD_FAILURE() << kFused << " declines " << what << ": " << v.reason;
        continue;
      }
      EXPECT_TRUE(v.chosen) << what << " picks " << v.picked;
      OpOptions two;
      two.implementation = kTwoKernels;
      w8a8_block_fp8_linear(x, w_d, ws_d, bias, y_two, workspace.data(), bytes, two);
      // The fused path reads no workspace: poisoned, it must stay so (nothing written there).
      MOEKIT_GPU_CHECK(cudaMemset(workspace.data(), 0xA5, bytes));
      OpOptions fused;
      fused.implementation = kFused;
      // With the caller's promise the fused kernel loads weights before the wait; without it,
      // after: the same layout, so the same bytes either way.
      fused.static_weights = m % 2 == 0;
      w8a8_block_fp8_linear(x, w_d, ws_d, bias, y_fused, workspace.data(), bytes, fused);
      gpu::synchronize(nullptr);
      const Tensor a = host_copy(y_two), b = host_copy(y_fused), ws_after = host_copy(workspace);
      ++compared;
      EXPECT_EQ(std::memcmp(a.data(), b.data(), a.nbytes()), 0) << what;
      bool untouched = true;
      for (int64_t i = 0; i < ws_after.numel(); ++i)
        untouched &= ws_after.data_as<uint8_t>()[i] == 0xA5;
      EXPECT_TRUE(untouched) << what << ": the fused path wrote into the workspace";
    }
  }
  std::printf("  %d calls compared, %d declined\n", compared, declined);
}

TEST(GpuFp8LinearFused, DispatchPicksItAtDecodeSizesOnly) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(seed_for("DispatchPicksItAtDecodeSizesOnly"));
  // The groups rule's picks on a 132-SM Hopper (H200, H100 SXM), where it was measured: DeepSeek-V3
  // gate_up (64-row CTAs with 28 k-blocks past an 8-stage ring: M <= 4 fused), Qwen3-30B q_proj
  // (64-row CTAs whose ring holds their 8 k-blocks: M <= 12 fused), Qwen3-30B o_proj (128-row CTAs
  // whose ring holds the range: every M), DeepSeek-V3 o_proj (64 k-blocks: M = 1; beyond, its
  // 16-token tiles may also not fit beside the ring, a decline said as such). Elsewhere the plans
  // may differ: the entry then only has to serve up to those M or decline for that reason.
  struct Layer {
    int64_t n, k, fused_up_to;
    bool long_range;
  };
  const bool measured_card = fused_expected() && gpu::device_properties(0).sm_count == 132;
  const Layer layers[] = {{4096, 7168, 4, false},
                          {4096, 2048, 12, false},
                          {2048, 4096, 16, false},
                          {7168, 16384, 1, true}};
  for (const auto& [N, K, fused_up_to, long_range] : layers) {
    const Tensor w_d = gpu_copy(random_weight(rng, N, K));
    const Tensor ws_d = gpu_copy(random_scales(rng, N, K, DType::f32));
    const Tensor x_d = gpu_copy(random_x(rng, 64, K, false));
    for (int64_t m : {1, 2, 3, 4, 5, 6, 7, 8, 12, 13, 16, 17, 64}) {
      const TensorView x = first_rows(x_d, m);
      const size_t bytes = w8a8_block_fp8_linear_workspace_size(m, K);
      Tensor workspace = Tensor::empty(DType::u8, {static_cast<int64_t>(bytes)}, Device::gpu());
      Tensor y = Tensor::empty(DType::bf16, {m, N}, Device::gpu());
      const Verdict v = verdict_of(kFused, x, w_d, ws_d, std::nullopt, y, workspace.data(), bytes);
      std::printf("  N=%lld K=%lld M=%lld picks %s; %s: %s\n", static_cast<long long>(N),
                  static_cast<long long>(K), static_cast<long long>(m), v.picked.c_str(), kFused,
                  v.reason.empty() ? "serves" : v.reason.c_str());
      const bool declined_by_rule =
          too_many_groups(v.reason) ||
          (long_range && v.reason.find("token tiles fit") != std::string::npos);
      if (m > 16) {
        EXPECT_EQ(v.reason, "M=" + std::to_string(m) +
                                " > 16 (the quantization is fused into token tiles of 8 and 16)");
      } else if (m <= fused_up_to) {
        if (fused_expected()) EXPECT_TRUE(v.chosen) << v.reason;
      } else if (measured_card) {
        EXPECT_TRUE(declined_by_rule) << "N=" << N << " K=" << K << " M=" << m << ": " << v.reason;
      } else if (fused_expected() && !declined_by_rule) {
        EXPECT_TRUE(v.chosen) << v.reason;
      }
      if (fused_expected() && !v.chosen) EXPECT_EQ(v.picked, kTwoKernels);
    }
  }
  // Wider activations are the two-kernel path's.
  const int64_t N = 4096, K = 7168;
  const Tensor w_d = gpu_copy(random_weight(rng, N, K));
  const Tensor ws_d = gpu_copy(random_scales(rng, N, K, DType::f32));
  Tensor x32 = Tensor::empty(DType::f32, {2, K}, Device::gpu());
  const size_t bytes = w8a8_block_fp8_linear_workspace_size(2, K);
  Tensor workspace = Tensor::empty(DType::u8, {static_cast<int64_t>(bytes)}, Device::gpu());
  Tensor y = Tensor::empty(DType::bf16, {2, N}, Device::gpu());
  const Verdict v = verdict_of(kFused, x32, w_d, ws_d, std::nullopt, y, workspace.data(), bytes);
  if (fused_expected()) EXPECT_EQ(v.reason, "x is f32, not bf16");
}

// Captured into a graph, with PDL between calls of the same layer: the same bytes as direct calls
// on a drained stream.
TEST(GpuFp8LinearFused, CapturesIntoAGraph) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(seed_for("CapturesIntoAGraph"));
  const int64_t M = 4, N = 4096, K = 7168;
  const Tensor x_d = gpu_copy(random_x(rng, M, K, true));
  const Tensor w_d = gpu_copy(random_weight(rng, N, K));
  const Tensor ws_d = gpu_copy(random_scales(rng, N, K, DType::f32));
  const size_t bytes = w8a8_block_fp8_linear_workspace_size(M, K);
  Tensor workspace = Tensor::empty(DType::u8, {static_cast<int64_t>(bytes)}, Device::gpu());
  Tensor direct = Tensor::empty(DType::bf16, {M, N}, Device::gpu());
  const Verdict v =
      verdict_of(kFused, x_d, w_d, ws_d, std::nullopt, direct, workspace.data(), bytes);
  if (!v.reason.empty()) {
    if (fused_expected()) FAIL() << kFused << " declines: " << v.reason;
    GTEST_SKIP() << kFused << " declines: " << v.reason;
  }
  OpOptions op;
  op.implementation = kFused;
  w8a8_block_fp8_linear(x_d, w_d, ws_d, std::nullopt, direct, workspace.data(), bytes, op);
  gpu::synchronize(nullptr);
  const Tensor want = host_copy(direct);

  constexpr int kCalls = 3;
  std::vector<Tensor> replayed;
  for (int i = 0; i < kCalls; ++i)
    replayed.push_back(Tensor::empty(DType::bf16, {M, N}, Device::gpu()));
  gpu_test::Stream stream;
  op.stream = stream.get();
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  MOEKIT_GPU_CHECK(cudaStreamBeginCapture(stream.get(), cudaStreamCaptureModeGlobal));
  for (int i = 0; i < kCalls; ++i)
    w8a8_block_fp8_linear(x_d, w_d, ws_d, std::nullopt, replayed[i], workspace.data(), bytes, op);
  MOEKIT_GPU_CHECK(cudaStreamEndCapture(stream.get(), &graph));
  MOEKIT_GPU_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  for (int replay = 0; replay < 2; ++replay) MOEKIT_GPU_CHECK(cudaGraphLaunch(exec, stream.get()));
  MOEKIT_GPU_CHECK(cudaStreamSynchronize(stream.get()));
  for (int i = 0; i < kCalls; ++i)
    EXPECT_EQ(std::memcmp(host_copy(replayed[i]).data(), want.data(), want.nbytes()), 0)
        << "call " << i;
  (void)cudaGraphExecDestroy(exec);
  (void)cudaGraphDestroy(graph);
}

// Where a fused call's time goes (a diagnostic, left out of gpu_check with the other Prints*): the
// fused layer at N=4096 K=7168 (28 k-blocks per CTA, past an 8-stage ring), M=1 and 16 (the
// dispatch's groups limit lifted), replayed as `moekit bench` replays it (static weights,
// weights rotating over 9 copies, a CUDA graph of one call per copy): the time per call, and in
// builds with MOEKIT_FP8_TRACE the swap kernel's phase stamps.
TEST(GpuFp8LinearFused, PrintsPhaseStamps) {
  SKIP_WITHOUT_GPU();
  if (!fused_expected()) GTEST_SKIP() << "not a Hopper GPU";
  const bool traced = gpu::block_gemm_sm90_trace_built();
  std::mt19937_64 rng(seed_for("PrintsPhaseStamps"));
  constexpr int64_t N = 4096, K = 7168;
  constexpr int kCopies = 9;  // 9 x 29 MB of weights: more than L2 holds
  std::vector<Tensor> w_d, ws_d;
  for (int c = 0; c < kCopies; ++c) {
    w_d.push_back(gpu_copy(random_weight(rng, N, K)));
    ws_d.push_back(gpu_copy(random_scales(rng, N, K, DType::f32)));
  }
  gpu_test::ScopedEnv no_limit("MOEKIT_SM90_FUSED_GROUPS", "1000000");
  for (const int64_t m : {int64_t{1}, int64_t{16}}) {
    const Tensor x_d = gpu_copy(random_x(rng, m, K, false));
    const size_t bytes = w8a8_block_fp8_linear_workspace_size(m, K);
    Tensor workspace = Tensor::empty(DType::u8, {static_cast<int64_t>(bytes)}, Device::gpu());
    Tensor y = Tensor::empty(DType::bf16, {m, N}, Device::gpu());
    gpu_test::Stream stream;
    OpOptions op;
    op.implementation = kFused;
    op.static_weights = true;
    op.stream = stream.get();
    const auto call = [&](int c) {
      w8a8_block_fp8_linear(x_d, w_d[c], ws_d[c], std::nullopt, y, workspace.data(), bytes, op);
    };
    call(0);  // set-up outside the capture
    MOEKIT_GPU_CHECK(cudaStreamSynchronize(stream.get()));
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    MOEKIT_GPU_CHECK(cudaStreamBeginCapture(stream.get(), cudaStreamCaptureModeThreadLocal));
    for (int c = 0; c < kCopies; ++c) call(c);
    MOEKIT_GPU_CHECK(cudaStreamEndCapture(stream.get(), &graph));
    MOEKIT_GPU_CHECK(cudaGraphInstantiateWithFlags(&exec, graph, 0));
    const double us_per_call = gpu::median_exec_replay_us(exec, stream.get(), kCopies, 20);
    std::printf("N=%lld K=%lld M=%lld: %.2f us per call (%s build)\n", static_cast<long long>(N),
                static_cast<long long>(K), static_cast<long long>(m), us_per_call,
                traced ? "traced" : "plain");
    if (traced) {
      gpu::block_gemm_sm90_trace_reset();
      for (int i = 0; i < 4; ++i) MOEKIT_GPU_CHECK(cudaGraphLaunch(exec, stream.get()));
      gpu_test::print_trace(gpu::block_gemm_sm90_trace_read(), kCopies);
    }
    (void)cudaGraphExecDestroy(exec);
    (void)cudaGraphDestroy(graph);
  }
}

}  // namespace
}  // namespace moekit
