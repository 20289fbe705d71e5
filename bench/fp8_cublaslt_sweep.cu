// Sweep of cuBLASLt's block-scaled FP8 algorithms (A: BLK128x128 weights, B: VEC128 activations,
// bf16 out) for one shape, the way src/gpu/fp8_gemm_cublaslt.cu calls it: the heuristic's results
// with several workspace sizes, then explicit configurations (algorithm ids x tiles x stages x
// cluster shapes x CTA swizzle x custom options), each checked with cublasLtMatmulAlgoCheck, run
// once and verified against the reference (sampled rows) and timed as CUDA-graph replays (median).
// A standalone experiment program (docs/perf/fp8.md, "cuBLASLt configuration sweep"), built with
// the GPU backend as fp8_cublaslt_sweep (or by hand:
//   nvcc -std=c++17 -O2 -arch=sm_90a bench/fp8_cublaslt_sweep.cu -lcublasLt -o /tmp/sweep):
//   fp8_cublaslt_sweep [M N K [seconds]]
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "cuda_check.h"

#define LK(x)                                                                                    \
  do {                                                                                           \
    cublasStatus_t s_ = (x);                                                                     \
    if (s_ != CUBLAS_STATUS_SUCCESS) {                                                           \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cublasLtGetStatusName(s_)); \
      std::exit(1);                                                                              \
    }                                                                                            \
  } while (0)

__device__ uint32_t mix(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  x ^= x >> 33;
  return static_cast<uint32_t>(x);
}

__global__ void fill_fp8(__nv_fp8_e4m3* p, size_t n, uint64_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    const float u = (mix(seed * 0x9E3779B97F4A7C15ULL + i) & 0xFFFFFF) / float(1 << 24);
    p[i] = __nv_fp8_e4m3((u * 2.f - 1.f) * 400.f);
  }
}

__global__ void fill_scales(float* p, size_t n, uint64_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    const uint32_t r = mix(seed * 0x9E3779B97F4A7C15ULL + i);
    p[i] = ldexpf(1.f + (r & 255) / 256.f, -12 - int((r >> 8) % 4));
  }
}

// Reference for selected rows: out[m, n] = sum_kb ws[n/128, kb] * xs[kb, m] * sum_k x*w in f32.
__global__ void reference_rows(const __nv_fp8_e4m3* x, const __nv_fp8_e4m3* w, const float* xs,
                               const float* ws, const int* rows, int rows_n, int M, int N, int K,
                               float* ref) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  const int r = blockIdx.y;
  if (n >= N || r >= rows_n) return;
  const int m = rows[r];
  const int kb_n = K / 128;
  float acc = 0.f;
  for (int kb = 0; kb < kb_n; ++kb) {
    float part = 0.f;
    for (int k = kb * 128; k < kb * 128 + 128; ++k)
      part += float(x[size_t(m) * K + k]) * float(w[size_t(n) * K + k]);
    acc += part * ws[size_t(n / 128) * kb_n + kb] * xs[size_t(kb) * M + m];
  }
  ref[size_t(r) * N + n] = acc;
}

struct Config {
  int id = -1, tile = 0, stages = 0, splitk = 1, reduction = 0, swizzle = 0, custom = 0, inner = 0,
      cluster = 0;
  size_t workspace = 0;
  std::string how;
  bool operator<(const Config& o) const {
    return std::tie(id, tile, stages, splitk, reduction, swizzle, custom, inner, cluster) <
           std::tie(o.id, o.tile, o.stages, o.splitk, o.reduction, o.swizzle, o.custom, o.inner,
                    o.cluster);
  }
};

int config_get(const cublasLtMatmulAlgo_t& a, cublasLtMatmulAlgoConfigAttributes_t attr) {
  uint64_t v = 0;
  size_t written = 0;
  if (cublasLtMatmulAlgoConfigGetAttribute(&a, attr, &v, sizeof v, &written) !=
      CUBLAS_STATUS_SUCCESS) {
    // Sizes differ per attribute (uint16/uint32/int32): ask for the exact size.
    size_t need = 0;
    cublasLtMatmulAlgoConfigGetAttribute(&a, attr, nullptr, 0, &need);
    v = 0;
    if (need == 0 || need > 8 ||
        cublasLtMatmulAlgoConfigGetAttribute(&a, attr, &v, need, &written) != CUBLAS_STATUS_SUCCESS)
      return -1;
  }
  return static_cast<int>(v);
}

Config describe(const cublasLtMatmulAlgo_t& a, size_t workspace, const std::string& how) {
  Config c;
  c.id = config_get(a, CUBLASLT_ALGO_CONFIG_ID);
  c.tile = config_get(a, CUBLASLT_ALGO_CONFIG_TILE_ID);
  c.stages = config_get(a, CUBLASLT_ALGO_CONFIG_STAGES_ID);
  c.splitk = config_get(a, CUBLASLT_ALGO_CONFIG_SPLITK_NUM);
  c.reduction = config_get(a, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME);
  c.swizzle = config_get(a, CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING);
  c.custom = config_get(a, CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION);
  c.inner = config_get(a, CUBLASLT_ALGO_CONFIG_INNER_SHAPE_ID);
  c.cluster = config_get(a, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID);
  c.workspace = workspace;
  c.how = how;
  return c;
}

template <class T>
void set_config(cublasLtMatmulAlgo_t& a, cublasLtMatmulAlgoConfigAttributes_t attr, T v) {
  LK(cublasLtMatmulAlgoConfigSetAttribute(&a, attr, &v, sizeof v));
}

struct Problem {
  int M, N, K;
  __nv_fp8_e4m3 *x, *w;
  float *xs, *ws;
  __nv_bfloat16* out;
  void* workspace;
  size_t workspace_bytes;
  cublasLtHandle_t lt;
  cublasLtMatmulDesc_t desc;
  cublasLtMatrixLayout_t lw, lx, ld;
  cudaStream_t stream;
  std::vector<int> rows;
  std::vector<float> ref;  // rows x N
};

void make_descs(Problem& p) {
  LK(cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t t = CUBLAS_OP_T, n = CUBLAS_OP_N;
  LK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &t, sizeof t));
  LK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &n, sizeof n));
  const int32_t wm = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F;
  const int32_t xm = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
  LK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &wm, sizeof wm));
  LK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &xm, sizeof xm));
  const void* wsp = p.ws;
  const void* xsp = p.xs;
  LK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &wsp,
                                    sizeof wsp));
  LK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &xsp,
                                    sizeof xsp));
  LK(cublasLtMatrixLayoutCreate(&p.lw, CUDA_R_8F_E4M3, p.K, p.N, p.K));
  LK(cublasLtMatrixLayoutCreate(&p.lx, CUDA_R_8F_E4M3, p.K, p.M, p.K));
  LK(cublasLtMatrixLayoutCreate(&p.ld, CUDA_R_16BF, p.N, p.M, p.N));
}

cublasStatus_t matmul(Problem& p, const cublasLtMatmulAlgo_t& a, size_t workspace) {
  const float alpha = 1.f, beta = 0.f;
  return cublasLtMatmul(p.lt, p.desc, &alpha, p.w, p.lw, p.x, p.lx, &beta, p.out, p.ld, p.out, p.ld,
                        &a, workspace ? p.workspace : nullptr, workspace, p.stream);
}

// Max |out - ref| / max |ref| over the sampled rows; -1 when the call failed.
double verify(Problem& p, const cublasLtMatmulAlgo_t& a, size_t workspace) {
  CK(cudaMemsetAsync(p.out, 0xff, size_t(p.M) * p.N * 2, p.stream));
  if (matmul(p, a, workspace) != CUBLAS_STATUS_SUCCESS) return -1;
  if (cudaStreamSynchronize(p.stream) != cudaSuccess) {
    std::fprintf(stderr, "sync failed: %s\n", cudaGetErrorString(cudaGetLastError()));
    std::exit(2);
  }
  std::vector<__nv_bfloat16> row(p.N);
  double worst = 0, scale = 0, sum_err = 0, sum_ref = 0;
  for (size_t r = 0; r < p.rows.size(); ++r) {
    CK(cudaMemcpy(row.data(), p.out + size_t(p.rows[r]) * p.N, p.N * 2, cudaMemcpyDeviceToHost));
    for (int n = 0; n < p.N; ++n) {
      const double ref = p.ref[r * p.N + n], got = __bfloat162float(row[n]);
      if (!std::isfinite(got)) return 1e30;
      worst = std::max(worst, std::fabs(got - ref));
      scale = std::max(scale, std::fabs(ref));
      sum_err += std::fabs(got - ref);
      sum_ref += std::fabs(ref);
    }
  }
  // Contract (spec/fp8.md): mean|out - ref| / mean|ref| within bf16 rounding (< ~4e-3).
  return sum_err / sum_ref;
}

// Median microseconds per matmul over CUDA-graph replays of `per_graph` matmuls.
double time_graph(Problem& p, const cublasLtMatmulAlgo_t& a, size_t workspace, int per_graph,
                  int replays) {
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CK(cudaStreamBeginCapture(p.stream, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < per_graph; ++i) matmul(p, a, workspace);
  CK(cudaStreamEndCapture(p.stream, &graph));
  CK(cudaGraphInstantiate(&exec, graph, 0));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  CK(cudaGraphLaunch(exec, p.stream));
  std::vector<float> ms;
  for (int r = 0; r < replays; ++r) {
    CK(cudaEventRecord(e0, p.stream));
    CK(cudaGraphLaunch(exec, p.stream));
    CK(cudaEventRecord(e1, p.stream));
    CK(cudaEventSynchronize(e1));
    float t = 0;
    CK(cudaEventElapsedTime(&t, e0, e1));
    ms.push_back(t);
  }
  std::sort(ms.begin(), ms.end());
  CK(cudaEventDestroy(e0));
  CK(cudaEventDestroy(e1));
  CK(cudaGraphExecDestroy(exec));
  CK(cudaGraphDestroy(graph));
  return ms[ms.size() / 2] * 1000.0 / per_graph;
}

struct Result {
  Config c;
  double us, err;
};

int main(int argc, char** argv) {
  Problem p{};
  p.M = argc > 3 ? std::atoi(argv[1]) : 4096;
  p.N = argc > 3 ? std::atoi(argv[2]) : 7168;
  p.K = argc > 3 ? std::atoi(argv[3]) : 16384;
  const double budget_s = argc > 4 ? std::atof(argv[4]) : 150;
  const auto start = std::chrono::steady_clock::now();
  auto elapsed = [&] {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("card %s, %d SMs; cuBLASLt %zu, cudart %zu\n", prop.name, prop.multiProcessorCount,
              cublasLtGetVersion(), cublasLtGetCudartVersion());
  std::printf("M=%d N=%d K=%d bf16 out, A=W BLK128x128, B=X VEC128\n", p.M, p.N, p.K);
  const size_t kb = p.K / 128;
  CK(cudaMalloc(&p.x, size_t(p.M) * p.K));
  CK(cudaMalloc(&p.w, size_t(p.N) * p.K));
  CK(cudaMalloc(&p.xs, kb * p.M * 4));
  CK(cudaMalloc(&p.ws, kb * ((p.N + 127) / 128) * 4));
  CK(cudaMalloc(&p.out, size_t(p.M) * p.N * 2));
  p.workspace_bytes = size_t(64) << 20;
  CK(cudaMalloc(&p.workspace, p.workspace_bytes));
  CK(cudaStreamCreate(&p.stream));
  fill_fp8<<<1024, 256>>>(p.x, size_t(p.M) * p.K, 1);
  fill_fp8<<<1024, 256>>>(p.w, size_t(p.N) * p.K, 2);
  fill_scales<<<64, 256>>>(p.xs, kb * p.M, 3);
  fill_scales<<<64, 256>>>(p.ws, kb * ((p.N + 127) / 128), 4);
  for (int r = 0; r < 16; ++r) p.rows.push_back(int((int64_t(r) * 2654435761u) % p.M));
  p.rows[0] = 0;
  p.rows[1] = p.M - 1;
  int* rows_d;
  float* ref_d;
  CK(cudaMalloc(&rows_d, p.rows.size() * 4));
  CK(cudaMalloc(&ref_d, p.rows.size() * p.N * 4));
  CK(cudaMemcpy(rows_d, p.rows.data(), p.rows.size() * 4, cudaMemcpyHostToDevice));
  reference_rows<<<dim3((p.N + 127) / 128, p.rows.size()), 128>>>(
      p.x, p.w, p.xs, p.ws, rows_d, p.rows.size(), p.M, p.N, p.K, ref_d);
  CK(cudaDeviceSynchronize());
  p.ref.resize(p.rows.size() * p.N);
  CK(cudaMemcpy(p.ref.data(), ref_d, p.ref.size() * 4, cudaMemcpyDeviceToHost));
  LK(cublasLtCreate(&p.lt));
  make_descs(p);
  const double flops = 2.0 * p.M * p.N * p.K;

  std::vector<Result> results;
  std::set<Config> seen;
  auto consider = [&](const cublasLtMatmulAlgo_t& a, size_t workspace, const std::string& how,
                      bool print_dupe) {
    Config c = describe(a, workspace, how);
    if (seen.count(c)) {
      if (print_dupe) std::printf("  %s: same configuration as an earlier one\n", how.c_str());
      return;
    }
    seen.insert(c);
    const double err = verify(p, a, workspace);
    if (err < 0) {
      std::printf("  %s: cublasLtMatmul refused\n", how.c_str());
      return;
    }
    const double us = err < 4e-3 ? time_graph(p, a, workspace, 10, 5) : -1;
    results.push_back({c, us, err});
    std::printf(
        "  %-22s id %3d tile %3d stages %2d splitk %d red %d swz %d custom %d inner %d cluster %2d "
        "ws %8zu: err %.2e %8.1f us %7.1f TFLOP/s%s\n",
        how.c_str(), c.id, c.tile, c.stages, c.splitk, c.reduction, c.swizzle, c.custom, c.inner,
        c.cluster, workspace, err, us, us > 0 ? flops / us * 1e-6 : 0.0,
        us > 0 ? "" : "  (NOT VERIFIED)");
    std::fflush(stdout);
  };

  cublasLtMatmulPreference_t pref;
  LK(cublasLtMatmulPreferenceCreate(&pref));
  const uint32_t align = 256;
  for (auto attr :
       {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES})
    LK(cublasLtMatmulPreferenceSetAttribute(pref, attr, &align, sizeof align));

  // (a) The heuristic with workspace 0, 4, 32, 64 MiB, asking for 64 results.
  std::printf("(a) heuristic\n");
  for (size_t mib : {0, 4, 32, 64}) {
    const uint64_t bytes = mib << 20;
    LK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &bytes,
                                            sizeof bytes));
    cublasLtMatmulHeuristicResult_t h[64]{};
    int got = 0;
    const cublasStatus_t s =
        cublasLtMatmulAlgoGetHeuristic(p.lt, p.desc, p.lw, p.lx, p.ld, p.ld, pref, 64, h, &got);
    std::printf(" workspace %zu MiB: %s, %d results\n", mib, cublasLtGetStatusName(s), got);
    for (int i = 0; i < got; ++i)
      if (h[i].state == CUBLAS_STATUS_SUCCESS)
        consider(h[i].algo, h[i].workspaceSize ? bytes : 0,
                 "heur ws" + std::to_string(mib) + " #" + std::to_string(i), true);
  }

  // (b) Explicit configurations.
  int ids[256];
  int id_count = 0;
  LK(cublasLtMatmulAlgoGetIds(p.lt, CUBLAS_COMPUTE_32F, CUDA_R_32F, CUDA_R_8F_E4M3, CUDA_R_8F_E4M3,
                              CUDA_R_16BF, CUDA_R_16BF, 256, ids, &id_count));
  std::printf("(b) %d algorithm ids:", id_count);
  for (int i = 0; i < id_count; ++i) std::printf(" %d", ids[i]);
  std::printf("\n");
  // b1: the heuristic limited to each id (64 MiB workspace allowed).
  {
    cublasLtMatmulPreference_t lim;
    LK(cublasLtMatmulPreferenceCreate(&lim));
    for (auto attr :
         {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
          CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES})
      LK(cublasLtMatmulPreferenceSetAttribute(lim, attr, &align, sizeof align));
    const uint32_t mode = CUBLASLT_SEARCH_LIMITED_BY_ALGO_ID;
    LK(cublasLtMatmulPreferenceSetAttribute(lim, CUBLASLT_MATMUL_PREF_SEARCH_MODE, &mode,
                                            sizeof mode));
    const uint64_t bytes = p.workspace_bytes;
    LK(cublasLtMatmulPreferenceSetAttribute(lim, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &bytes,
                                            sizeof bytes));
    for (int i = 0; i < id_count; ++i) {
      cublasLtMatmulHeuristicResult_t h[32]{};
      for (auto& r : h)
        LK(cublasLtMatmulAlgoInit(p.lt, CUBLAS_COMPUTE_32F, CUDA_R_32F, CUDA_R_8F_E4M3,
                                  CUDA_R_8F_E4M3, CUDA_R_16BF, CUDA_R_16BF, ids[i], &r.algo));
      int got = 0;
      const cublasStatus_t s =
          cublasLtMatmulAlgoGetHeuristic(p.lt, p.desc, p.lw, p.lx, p.ld, p.ld, lim, 32, h, &got);
      std::printf(" id %d limited heuristic: %s, %d results\n", ids[i], cublasLtGetStatusName(s),
                  got);
      for (int j = 0; j < got; ++j)
        if (h[j].state == CUBLAS_STATUS_SUCCESS)
          consider(h[j].algo, h[j].workspaceSize ? bytes : 0,
                   "lim id" + std::to_string(ids[i]) + " #" + std::to_string(j), false);
    }
  }
  // b2: enumerate the capabilities of each id, starting from the heuristic's configuration where
  // the id is the heuristic's (its tile is not among the capabilities there).
  cublasLtMatmulAlgo_t heuristic_algo{};
  bool have_heuristic = false;
  {
    const uint64_t zero = 0;
    LK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &zero,
                                            sizeof zero));
    cublasLtMatmulHeuristicResult_t h{};
    int got = 0;
    if (cublasLtMatmulAlgoGetHeuristic(p.lt, p.desc, p.lw, p.lx, p.ld, p.ld, pref, 1, &h, &got) ==
            CUBLAS_STATUS_SUCCESS &&
        got > 0) {
      heuristic_algo = h.algo;
      have_heuristic = true;
    }
  }
  const int clusters[] = {CUBLASLT_CLUSTER_SHAPE_AUTO,  CUBLASLT_CLUSTER_SHAPE_1x1x1,
                          CUBLASLT_CLUSTER_SHAPE_2x1x1, CUBLASLT_CLUSTER_SHAPE_1x2x1,
                          CUBLASLT_CLUSTER_SHAPE_2x2x1, CUBLASLT_CLUSTER_SHAPE_4x1x1,
                          CUBLASLT_CLUSTER_SHAPE_1x4x1};
  int checked = 0, passed = 0;
  std::map<int, int> refusals;
  for (int i = 0; i < id_count && elapsed() < budget_s; ++i) {
    cublasLtMatmulAlgo_t base;
    LK(cublasLtMatmulAlgoInit(p.lt, CUBLAS_COMPUTE_32F, CUDA_R_32F, CUDA_R_8F_E4M3, CUDA_R_8F_E4M3,
                              CUDA_R_16BF, CUDA_R_16BF, ids[i], &base));
    if (have_heuristic && config_get(heuristic_algo, CUBLASLT_ALGO_CONFIG_ID) == ids[i])
      base = heuristic_algo;
    size_t written = 0;
    uint32_t tiles[512];
    uint32_t stages[512];
    int tile_n = 0, stage_n = 0;
    if (cublasLtMatmulAlgoCapGetAttribute(&base, CUBLASLT_ALGO_CAP_TILE_IDS, tiles, sizeof tiles,
                                          &written) == CUBLAS_STATUS_SUCCESS)
      tile_n = int(written / 4);
    if (cublasLtMatmulAlgoCapGetAttribute(&base, CUBLASLT_ALGO_CAP_STAGES_IDS, stages,
                                          sizeof stages, &written) == CUBLAS_STATUS_SUCCESS)
      stage_n = int(written / 4);
    int32_t swz = 0, custom_max = 0, splitk = 0;
    cublasLtMatmulAlgoCapGetAttribute(&base, CUBLASLT_ALGO_CAP_CTA_SWIZZLING_SUPPORT, &swz,
                                      sizeof swz, &written);
    cublasLtMatmulAlgoCapGetAttribute(&base, CUBLASLT_ALGO_CAP_CUSTOM_OPTION_MAX, &custom_max,
                                      sizeof custom_max, &written);
    cublasLtMatmulAlgoCapGetAttribute(&base, CUBLASLT_ALGO_CAP_SPLITK_SUPPORT, &splitk,
                                      sizeof splitk, &written);
    if (tile_n == 0) {  // no tile list: the base's own tile, none, and the large ones
      const int own = config_get(base, CUBLASLT_ALGO_CONFIG_TILE_ID);
      for (uint32_t t : {uint32_t(std::max(own, 0)), 0u, 18u, 20u, 21u, 23u, 24u, 32u, 31u})
        if (std::find(tiles, tiles + tile_n, t) == tiles + tile_n) tiles[tile_n++] = t;
    }
    if (stage_n == 0)
      stages[stage_n++] = uint32_t(std::max(config_get(base, CUBLASLT_ALGO_CONFIG_STAGES_ID), 0));
    const int own_custom = config_get(base, CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION);
    for (int t = 0; t < tile_n; ++t) {
      // Prune: at M=4096 N=7168 only large tiles (>= 128x64 in area) keep the tensor cores fed.
      static const std::set<uint32_t> large = {
          CUBLASLT_MATMUL_TILE_UNDEFINED, CUBLASLT_MATMUL_TILE_128x64,
          CUBLASLT_MATMUL_TILE_64x128,    CUBLASLT_MATMUL_TILE_128x128,
          CUBLASLT_MATMUL_TILE_128x256,   CUBLASLT_MATMUL_TILE_256x128,
          CUBLASLT_MATMUL_TILE_64x256,    CUBLASLT_MATMUL_TILE_256x64,
          CUBLASLT_MATMUL_TILE_128x192,   CUBLASLT_MATMUL_TILE_192x128,
          CUBLASLT_MATMUL_TILE_128x160,   CUBLASLT_MATMUL_TILE_160x128,
          CUBLASLT_MATMUL_TILE_64x512,    CUBLASLT_MATMUL_TILE_512x64,
          CUBLASLT_MATMUL_TILE_128x96,    CUBLASLT_MATMUL_TILE_96x128,
          CUBLASLT_MATMUL_TILE_128x320,   CUBLASLT_MATMUL_TILE_128x384,
          CUBLASLT_MATMUL_TILE_64x384,    CUBLASLT_MATMUL_TILE_64x320,
          CUBLASLT_MATMUL_TILE_64x192};
      if (!large.count(tiles[t])) continue;
      for (int s = 0; s < stage_n; ++s)
        for (int cl : clusters)
          for (int sw = 0; sw <= (swz ? 1 : 0); ++sw)
            for (int co = 0; co <= std::min(custom_max, 160); ++co) {
              if (elapsed() > budget_s) break;
              cublasLtMatmulAlgo_t a = base;
              set_config(a, CUBLASLT_ALGO_CONFIG_TILE_ID, uint32_t(tiles[t]));
              set_config(a, CUBLASLT_ALGO_CONFIG_STAGES_ID, uint32_t(stages[s]));
              set_config(a, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, int32_t(1));
              set_config(a, CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING, uint32_t(sw));
              set_config(a, CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION, uint32_t(co));
              set_config(a, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID, uint16_t(cl));
              cublasLtMatmulHeuristicResult_t r{};
              ++checked;
              const cublasStatus_t st =
                  cublasLtMatmulAlgoCheck(p.lt, p.desc, p.lw, p.lx, p.ld, p.ld, &a, &r);
              if (st != CUBLAS_STATUS_SUCCESS) {
                ++refusals[int(st)];
                continue;
              }
              if (r.workspaceSize > p.workspace_bytes) continue;
              ++passed;
              consider(a, r.workspaceSize ? p.workspace_bytes : 0,
                       "cfg id" + std::to_string(ids[i]) + (co == own_custom ? "" : ""), false);
            }
    }
  }
  for (auto [status, count] : refusals)
    std::printf(" AlgoCheck refused %d with %s\n", count,
                cublasLtGetStatusName(cublasStatus_t(status)));
  std::printf("(b) %d configurations checked, %d passed cublasLtMatmulAlgoCheck; %.0f s\n", checked,
              passed, elapsed());

  std::sort(results.begin(), results.end(), [](const Result& a, const Result& b) {
    return (a.us > 0 ? a.us : 1e30) < (b.us > 0 ? b.us : 1e30);
  });
  // The best 12 re-timed against the heuristic's choice, alternating (A B A B A B), since the
  // clock drifts with temperature and power over a sweep.
  std::printf("best 12, each re-timed 3 times alternating with the heuristic's choice (H):\n");
  for (size_t i = 0; i < std::min<size_t>(12, results.size()); ++i) {
    const Result& r = results[i];
    if (r.us <= 0) break;
    cublasLtMatmulAlgo_t a;
    LK(cublasLtMatmulAlgoInit(p.lt, CUBLAS_COMPUTE_32F, CUDA_R_32F, CUDA_R_8F_E4M3, CUDA_R_8F_E4M3,
                              CUDA_R_16BF, CUDA_R_16BF, r.c.id, &a));
    set_config(a, CUBLASLT_ALGO_CONFIG_TILE_ID, uint32_t(r.c.tile));
    set_config(a, CUBLASLT_ALGO_CONFIG_STAGES_ID, uint32_t(r.c.stages));
    set_config(a, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, int32_t(r.c.splitk));
    set_config(a, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, uint32_t(r.c.reduction));
    set_config(a, CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING, uint32_t(r.c.swizzle));
    set_config(a, CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION, uint32_t(r.c.custom));
    set_config(a, CUBLASLT_ALGO_CONFIG_INNER_SHAPE_ID, uint16_t(r.c.inner));
    set_config(a, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID, uint16_t(r.c.cluster));
    cublasLtMatmulHeuristicResult_t chk{};
    const bool ok = cublasLtMatmulAlgoCheck(p.lt, p.desc, p.lw, p.lx, p.ld, p.ld, &a, &chk) ==
                    CUBLAS_STATUS_SUCCESS;
    double t[3] = {0, 0, 0}, h[3] = {0, 0, 0};
    if (ok && have_heuristic)
      for (int j = 0; j < 3; ++j) {
        h[j] = time_graph(p, heuristic_algo, 0, 20, 5);
        t[j] = time_graph(p, a, r.c.workspace, 20, 5);
      }
    std::printf(
        " %-22s id %3d tile %3d stages %2d splitk %d red %d swz %d custom %3d inner %d cluster %2d "
        "ws %zu: %.1f us (%.0f) | re-made %s: %.1f %.1f %.1f us (%.0f %.0f %.0f TFLOP/s), "
        "H %.1f %.1f %.1f us\n",
        r.c.how.c_str(), r.c.id, r.c.tile, r.c.stages, r.c.splitk, r.c.reduction, r.c.swizzle,
        r.c.custom, r.c.inner, r.c.cluster, r.c.workspace, r.us, flops / r.us * 1e-6,
        ok ? "check ok" : "CHECK FAILED", t[0], t[1], t[2], t[0] ? flops / t[0] * 1e-6 : 0,
        t[1] ? flops / t[1] * 1e-6 : 0, t[2] ? flops / t[2] * 1e-6 : 0, h[0], h[1], h[2]);
    std::fflush(stdout);
  }
  std::printf("done in %.0f s\n", elapsed());
  return 0;
}
