// block_fp8_gemm through cuBLASLt's block-scaled FP8 matmul (CUDA 12.9+, compute capability 9.x):
// the vendor library path of the FP8 dispatch chain (spec/fp8.md). cuBLASLt is column-major, so
// the row-major product out[M, N] = A[M, K] x B[N, K]^T is asked for as its transpose
//   D[N, M] = op(W)[N, K] x X[K, M]   with W = B (TRANSA = T) and X = A (TRANSB = N),
// which makes B the "A" operand (BLK128x128 scales, row-major [N/128, K/128] as checkpoints store
// them) and A the "B" operand (VEC128 scales, one per 128 values of K, stored M-contiguous: our
// column-major layout). Everything the library would need but we cannot give it (other scale
// layouts, bias, partial k-blocks, unaligned rows) is declined, so the call falls to our kernels.
#include <cublasLt.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>

#include "core/env_switch.h"
#include "gpu/fp8_gpu.h"
#include "gpu/gpu_check.h"
#include "gpu/gpu_runtime.h"
#include "moekit/error.h"

namespace moekit::gpu {
namespace {

void check_lt(cublasStatus_t status, const char* call) {
  if (status == CUBLAS_STATUS_SUCCESS) return;
  fail("gpu", call, cublasLtGetStatusName(status),
       std::string("failed: ") + cublasLtGetStatusString(status));
}
#define MOEKIT_LT_CHECK(call) check_lt((call), #call)

// One cuBLASLt handle per device, made on first use and kept for the process (creating one is a
// host-side call, not a stream operation, so a first call inside graph capture is fine).
cublasLtHandle_t handle_for(int device) {
  static std::mutex mutex;
  static std::map<int, cublasLtHandle_t> handles;
  std::lock_guard lock(mutex);
  auto found = handles.find(device);
  if (found != handles.end()) return found->second;
  DeviceGuard guard(device);
  cublasLtHandle_t handle = nullptr;
  MOEKIT_LT_CHECK(cublasLtCreate(&handle));
  handles.emplace(device, handle);
  return handle;
}

cudaDataType_t out_type(DType dtype) {
  switch (dtype) {
    case DType::bf16:
      return CUDA_R_16BF;
    case DType::f16:
      return CUDA_R_16F;
    default:
      return CUDA_R_32F;
  }
}

// Largest power of two (up to 256) dividing the address: what the heuristic may assume.
uint32_t alignment_of(const void* p) {
  const auto address = reinterpret_cast<uintptr_t>(p);
  uint32_t alignment = 256;
  while (alignment > 1 && address % alignment != 0) alignment /= 2;
  return alignment;
}

// The descriptors of one call. Made per call (cheap host work); the algorithm is cached per shape.
struct Descriptors {
  cublasLtMatmulDesc_t matmul = nullptr;
  cublasLtMatrixLayout_t w = nullptr, x = nullptr, d = nullptr;
  cublasLtMatmulPreference_t preference = nullptr;

  explicit Descriptors(const BlockGemmProblem& p) {
    MOEKIT_LT_CHECK(cublasLtMatmulDescCreate(&matmul, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t transpose = CUBLAS_OP_T, none = CUBLAS_OP_N;
    set(CUBLASLT_MATMUL_DESC_TRANSA, transpose);
    set(CUBLASLT_MATMUL_DESC_TRANSB, none);
    const int32_t w_mode = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F;
    const int32_t x_mode = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
    set(CUBLASLT_MATMUL_DESC_A_SCALE_MODE, w_mode);
    set(CUBLASLT_MATMUL_DESC_B_SCALE_MODE, x_mode);
    const void* w_scales = p.b_scales.data();
    const void* x_scales = p.a_scales.data();
    set(CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, w_scales);
    set(CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, x_scales);
    const auto n = static_cast<uint64_t>(p.n), m = static_cast<uint64_t>(p.m),
               k = static_cast<uint64_t>(p.k);
    MOEKIT_LT_CHECK(cublasLtMatrixLayoutCreate(&w, CUDA_R_8F_E4M3, k, n, p.b.stride(0)));
    MOEKIT_LT_CHECK(cublasLtMatrixLayoutCreate(&x, CUDA_R_8F_E4M3, k, m, p.a.stride(0)));
    MOEKIT_LT_CHECK(cublasLtMatrixLayoutCreate(&d, out_type(p.out.dtype()), n, m, p.out.stride(0)));
    MOEKIT_LT_CHECK(cublasLtMatmulPreferenceCreate(&preference));
    // No workspace: an op allocates nothing, and without one no algorithm can split K with a
    // reduction whose order could vary between runs.
    const uint64_t workspace = 0;
    prefer(CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, workspace);
    prefer(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, alignment_of(p.b.data()));
    prefer(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, alignment_of(p.a.data()));
    prefer(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, alignment_of(p.out.data()));
    prefer(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, alignment_of(p.out.data()));
  }
  ~Descriptors() {
    if (preference) (void)cublasLtMatmulPreferenceDestroy(preference);
    if (d) (void)cublasLtMatrixLayoutDestroy(d);
    if (x) (void)cublasLtMatrixLayoutDestroy(x);
    if (w) (void)cublasLtMatrixLayoutDestroy(w);
    if (matmul) (void)cublasLtMatmulDescDestroy(matmul);
  }
  Descriptors(const Descriptors&) = delete;
  Descriptors& operator=(const Descriptors&) = delete;

  template <class T>
  void set(cublasLtMatmulDescAttributes_t attribute, const T& value) {
    MOEKIT_LT_CHECK(cublasLtMatmulDescSetAttribute(matmul, attribute, &value, sizeof value));
  }
  template <class T>
  void prefer(cublasLtMatmulPreferenceAttributes_t attribute, const T& value) {
    MOEKIT_LT_CHECK(
        cublasLtMatmulPreferenceSetAttribute(preference, attribute, &value, sizeof value));
  }
};

// What decides the algorithm: the shape, the strides, the output type, the alignments.
using PlanKey = std::tuple<int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, DType,
                           uint32_t, uint32_t, uint32_t>;

PlanKey plan_key(const BlockGemmProblem& p) {
  return {p.a.device().index,
          p.m,
          p.n,
          p.k,
          p.a.stride(0),
          p.b.stride(0),
          p.out.stride(0),
          p.out.dtype(),
          alignment_of(p.a.data()),
          alignment_of(p.b.data()),
          alignment_of(p.out.data())};
}

// MOEKIT_CUBLASLT_ALGO=r (a tuning knob, like MOEKIT_SM90_SWAP): take the heuristic's r-th
// algorithm (0 = its first, the default) where it returns that many, and describe it on stderr.
constexpr int kMaxAlgorithmRank = 15;
int algorithm_rank() {
  static const int rank = std::clamp(env::integer("MOEKIT_CUBLASLT_ALGO", 0), 0, kMaxAlgorithmRank);
  return rank;
}

void describe_algorithm(const BlockGemmProblem& p, const cublasLtMatmulAlgo_t& algorithm, int rank,
                        int returned) {
  auto config = [&](cublasLtMatmulAlgoConfigAttributes_t attribute) {
    uint32_t value = 0;  // every attribute read here fits 32 bits (ids, enums, counts)
    size_t written = 0;
    if (cublasLtMatmulAlgoConfigGetAttribute(&algorithm, attribute, &value, sizeof(value),
                                             &written) != CUBLAS_STATUS_SUCCESS)
      return -1;
    return static_cast<int>(value);
  };
  std::fprintf(stderr,
               "cublaslt M=%lld N=%lld K=%lld: algorithm %d of %d: id %d tile %d stages %d "
               "cluster %d split-k %d swizzle %d\n",
               static_cast<long long>(p.m), static_cast<long long>(p.n),
               static_cast<long long>(p.k), rank, returned, config(CUBLASLT_ALGO_CONFIG_ID),
               config(CUBLASLT_ALGO_CONFIG_TILE_ID), config(CUBLASLT_ALGO_CONFIG_STAGES_ID),
               config(CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID),
               config(CUBLASLT_ALGO_CONFIG_SPLITK_NUM), config(CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING));
}

// The heuristic's first algorithm for this shape (or the knob's), or none when cuBLASLt has no
// kernel for it.
// Cached, so that supports() and the call after it ask cuBLASLt once per shape.
std::optional<cublasLtMatmulAlgo_t> algorithm_for(const BlockGemmProblem& p) {
  static std::mutex mutex;
  static std::map<PlanKey, std::optional<cublasLtMatmulAlgo_t>> plans;
  const PlanKey key = plan_key(p);
  {
    std::lock_guard lock(mutex);
    auto found = plans.find(key);
    if (found != plans.end()) return found->second;
  }
  const cublasLtHandle_t handle = handle_for(p.a.device().index);
  std::optional<cublasLtMatmulAlgo_t> algorithm;
  {
    DeviceGuard guard(p.a.device().index);
    Descriptors desc(p);
    const int wanted = algorithm_rank();
    cublasLtMatmulHeuristicResult_t results[kMaxAlgorithmRank + 1]{};
    int returned = 0;
    const cublasStatus_t status =
        cublasLtMatmulAlgoGetHeuristic(handle, desc.matmul, desc.w, desc.x, desc.d, desc.d,
                                       desc.preference, wanted + 1, results, &returned);
    if (status == CUBLAS_STATUS_SUCCESS && returned > 0) {
      const int rank = std::min(wanted, returned - 1);
      if (results[rank].state == CUBLAS_STATUS_SUCCESS) algorithm = results[rank].algo;
      if (algorithm && !env::text("MOEKIT_CUBLASLT_ALGO").empty())
        describe_algorithm(p, *algorithm, rank, returned);
    }
  }
  std::lock_guard lock(mutex);
  plans.emplace(key, algorithm);
  return algorithm;
}

std::string str(int64_t v) { return std::to_string(v); }

constexpr int64_t kSmallM = 128;
constexpr int64_t kLongK = 32;  // k-blocks
constexpr double kPersistentFill = 0.9;

}  // namespace

std::string cublaslt_gemm_supports(const BlockGemmProblem& p) {
  if (!p.a.device().is_gpu()) return "tensors are on " + p.a.device().str();
  if (cublasLtGetVersion() < 120900)
    return "cuBLASLt " + std::to_string(cublasLtGetVersion()) + " predates block scaling (12.9)";
  const DeviceProperties props = device_properties(p.a.device().index);
  if (props.major != 9)
    return "block-scaled FP8 (VEC128 x BLK128x128) is cuBLASLt's on compute capability 9.x only, "
           "not " +
           std::to_string(props.major) + "." + std::to_string(props.minor);
  if (p.has_bias()) return "bias needs an epilogue cuBLASLt's block-scaled FP8 does not offer";
  const bool sm90_serves = block_gemm_sm90_supports(p).empty();
  // Measured on an H200 (docs/perf/fp8.md): up to 128 tokens moekit's Hopper kernel (weights as
  // the wgmma M side, split K over a cluster) beats cuBLASLt, which spends ~17-23 us there.
  if (p.m <= kSmallM && sm90_serves)
    return "M=" + str(p.m) + " <= " + str(kSmallM) + ": gpu.sm90 is faster for few tokens";
  if (sm90_serves) {
    const Sm90LargeMPlan sm90 = block_gemm_sm90_large_m_plan(p);
    // Where moekit's tiles kernel splits a long K over clusters (grids of fewer tiles than half
    // the SMs) it measured faster on an H200 (fp8-gpu-sm90.md, session 16: M=256 N=4096 K=7168
    // 20.5 vs 22.7 us). MOEKIT_CUBLASLT_DEFER_SPLIT=0 keeps cuBLASLt there (timing knob).
    if (p.k_blocks >= kLongK && sm90.tiles_split > 1 &&
        env::integer("MOEKIT_CUBLASLT_DEFER_SPLIT", 1) != 0)
      return "gpu.sm90 splits K over clusters of " + str(sm90.tiles_split) +
             " CTAs for this grid of " +
             str(fp8::ceil_div(p.m, kFp8BlockSize) * fp8::ceil_div(p.n, kFp8BlockSize)) +
             " tiles: faster";
    // Where moekit's persistent wide tiles fill their rounds of tiles (>= 90 %) they measured
    // faster on an H200 (fp8-gpu-sm90.md, session 23: M=4096 N=7168 K=16384 727 vs 733 us, M=2048
    // N=4096 K=7168 87.7 vs 90.1; at 85 % fill, M=2048 N=7168 K=16384, 375 vs 355), and in one
    // round, which the plan takes only with more tiles than half the SMs, at any fill measured
    // (session 39: 55 %, M=256 N=9216 K=4096, 26.53 vs 27.55; 73 %, M=1024 N=3072 K=4096, 25.66
    // vs 26.53; 85 %, M=512 N=7168 K=2048, 15.78 vs 16.09).
    // MOEKIT_CUBLASLT_DEFER_PERSISTENT=0 keeps cuBLASLt there (timing knob).
    if ((sm90.persistent_fill >= kPersistentFill || sm90.persistent_rounds == 1) &&
        env::integer("MOEKIT_CUBLASLT_DEFER_PERSISTENT", 1) != 0)
      return sm90.persistent_rounds == 1
                 ? "gpu.sm90's persistent wide tiles take one round of tiles: faster"
                 : "gpu.sm90's persistent wide tiles fill " +
                       std::to_string(std::lround(sm90.persistent_fill * 100)) +
                       " % of their rounds of tiles: faster";
  }
  if (p.k % kFp8BlockSize != 0) return "K=" + str(p.k) + " is not a multiple of 128";
  if (p.n % 16 != 0) return "N=" + str(p.n) + " is not a multiple of 16";
  if (p.k_blocks % 4 != 0)
    return "K/128=" + str(p.k_blocks) + " is not a multiple of 4 (16-byte rows of b_scales)";
  if (p.a_scale_at.layout != ScaleLayout::column_major &&
      !(p.a_scale_at.layout == ScaleLayout::column_major_tma && p.m % 4 == 0))
    return "a_scales must be column-major (VEC128 stores them M-contiguous)";
  // VEC128 scales have no leading dimension: the k-blocks' scales must lie M apart, which they do
  // not where the rows are a part of a larger call's (grouped_block_fp8_gemm_contiguous's runs).
  if (p.k_blocks > 1 && p.a_scale_at.group_stride != p.m)
    return "a_scales' k-blocks lie " + str(p.a_scale_at.group_stride) +
           " apart, not M=" + str(p.m) + " (VEC128 scales have no leading dimension)";
  if (p.b_scales.dtype() != DType::f32) return "b_scales must be f32";
  if (p.b_scales.stride(1) != 1 || (p.n_blocks > 1 && p.b_scales.stride(0) != p.k_blocks))
    return "b_scales must be contiguous row-major";
  if (p.a.stride(0) % 16 != 0 || p.b.stride(0) % 16 != 0)
    return "rows of a and b must start 16 bytes apart";
  if (p.out.stride(0) * static_cast<int64_t>(dtype_size(p.out.dtype())) % 16 != 0)
    return "rows of out must start 16 bytes apart";
  if (alignment_of(p.a.data()) < 16 || alignment_of(p.b.data()) < 16 ||
      alignment_of(p.out.data()) < 16 || alignment_of(p.a_scales.data()) < 16 ||
      alignment_of(p.b_scales.data()) < 16)
    return "a, b, out and the scales must be 16-byte aligned";
  if (!algorithm_for(p)) return "cuBLASLt has no algorithm for this shape";
  return "";
}

void cublaslt_block_fp8_gemm(const BlockGemmProblem& p) {
  const std::optional<cublasLtMatmulAlgo_t> algorithm = algorithm_for(p);
  if (!algorithm)
    fail("block_fp8_gemm", "backend", "gpu.cublaslt", "has no algorithm for this shape");
  DeviceGuard guard(p.a.device().index);
  Descriptors desc(p);
  const float alpha = 1.0f, beta = 0.0f;
  MOEKIT_LT_CHECK(cublasLtMatmul(handle_for(p.a.device().index), desc.matmul, &alpha, p.b.data(),
                                 desc.w, p.a.data(), desc.x, &beta, p.out.data(), desc.d,
                                 p.out.data(), desc.d, &*algorithm, nullptr, 0,
                                 static_cast<cudaStream_t>(p.stream)));
}

}  // namespace moekit::gpu
