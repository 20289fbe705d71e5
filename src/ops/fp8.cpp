// FP8 front ends: validation (spec/fp8.md) and one dispatch table per op whose entries say why
// they decline.
#include "moekit/ops/fp8.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "cpu/fp8_cpu.h"
#ifdef MOEKIT_HAVE_GPU
#include "gpu/fp8_gemm_sm90.h"
#include "gpu/fp8_gpu.h"
#include "gpu/gpu_runtime.h"
#endif
#include "moekit/error.h"
#include "ops/fp8_problem.h"
#include "reference/fp8_reference.h"

namespace moekit {

const char* scale_layout_name(ScaleLayout layout) {
  switch (layout) {
    case ScaleLayout::row_major:
      return "row_major";
    case ScaleLayout::column_major:
      return "column_major";
    case ScaleLayout::column_major_tma:
      return "column_major_tma";
    case ScaleLayout::packed_ue8m0:
      return "packed_ue8m0";
  }
  return "?";
}

ScaleAddressing scale_addressing(ScaleLayout layout, int64_t rows, int64_t groups) {
  switch (layout) {
    case ScaleLayout::row_major:
      return {layout, groups, 1};
    case ScaleLayout::column_major:
      return {layout, 1, rows};
    case ScaleLayout::column_major_tma:
    case ScaleLayout::packed_ue8m0:
      return {layout, 1, fp8::align4(rows)};
  }
  return {};
}

ScaleStorage group_quant_scale_storage(int64_t M, int64_t K, const GroupQuantConfig& config) {
  const int64_t G = config.group_size > 0 ? fp8::ceil_div(K, config.group_size) : 0;
  switch (config.layout) {
    case ScaleLayout::row_major:
      return {DType::f32, {M, G}};
    case ScaleLayout::column_major:
      return {DType::f32, {G, M}};
    case ScaleLayout::column_major_tma:
      return {DType::f32, {G, fp8::align4(M)}};
    case ScaleLayout::packed_ue8m0:
      return {DType::i32, {fp8::ceil_div(G, 4), fp8::align4(M)}};
  }
  return {DType::f32, {0, 0}};
}

size_t w8a8_block_fp8_linear_workspace_size(int64_t M, int64_t K) {
  if (M <= 0 || K <= 0) return 0;
  // q (e4m3 [M, K]), then the f32 scales [M, ceil(K/128)] from a 64-byte boundary.
  const auto q_bytes = static_cast<size_t>((M * K + 63) / 64 * 64);
  return q_bytes + static_cast<size_t>(M * fp8::ceil_div(K, kFp8BlockSize)) * sizeof(float);
}

size_t silu_and_mul_grouped_block_fp8_gemm_masked_workspace_size(int64_t G, int64_t M, int64_t K) {
  if (G <= 0 || M <= 0 || K <= 0) return 0;
  // q (e4m3 [G, M, K]), then from a 64-byte boundary the f32 scales, column-major TMA-aligned
  // per group ([G, ceil(K/128), align4(M)]).
  const auto q_bytes = static_cast<size_t>((G * M * K + 63) / 64 * 64);
  return q_bytes +
         static_cast<size_t>(G * fp8::align4(M) * fp8::ceil_div(K, kFp8BlockSize)) * sizeof(float);
}

namespace {

// ---- Dispatch tables, fastest first; ops/dispatch.h says which entries a call considers.
// GPU entries go first: for the GEMM and the linear layer the vendor library path
// ("gpu.cublaslt"), then our Hopper tensor-core kernel ("gpu.sm90"; for the linear layer at decode
// sizes "gpu.sm90.fused", which quantizes x inside it), then our portable kernel ("gpu"), which
// serves every call the others decline.

#ifdef MOEKIT_HAVE_GPU
// The GPU linear layer: quantize on the GPU into the workspace, then the GEMM entry that serves.
// cuBLASLt reads activation scales M-contiguous (VEC128), so its variant writes the same workspace
// bytes column-major instead of row-major.
W8a8LinearProblem with_column_major_scales(W8a8LinearProblem p) {
  const int64_t M = p.gemm.m, G = p.quant.groups;
  const TensorView scales(p.quant.scales.data(), DType::f32, {G, M}, p.quant.scales.device());
  p.quant.scales = p.gemm.a_scales = scales;
  p.quant.scale_at = p.gemm.a_scale_at = scale_addressing(ScaleLayout::column_major, M, G);
  return p;
}

std::string gpu_linear_cublaslt_supports(const W8a8LinearProblem& p) {
  const W8a8LinearProblem q = with_column_major_scales(p);
  std::string why = gpu::group_quant_supports(q.quant);
  return why.empty() ? gpu::cublaslt_gemm_supports(q.gemm) : why;
}
void gpu_linear_cublaslt(const W8a8LinearProblem& p) {
  const W8a8LinearProblem q = with_column_major_scales(p);
  gpu::per_token_group_quant_fp8(q.quant);
  gpu::cublaslt_block_fp8_gemm(q.gemm);
}

std::string gpu_linear_supports(const W8a8LinearProblem& p) {
  std::string why = gpu::group_quant_supports(p.quant);
  if (!why.empty()) return why;
  if (gpu::block_gemm_sm90_supports(p.gemm).empty()) return "";
  return gpu::block_gemm_supports(p.gemm);
}
// The layer's GEMM launch, in words, where moekit's Hopper kernel takes it.
std::string gpu_linear_plan(const W8a8LinearProblem& p) {
  if (!gpu::block_gemm_sm90_supports(p.gemm).empty()) return "";
  return "quantization, then " + gpu::block_gemm_sm90_plan(p.gemm);
}
void gpu_linear(const W8a8LinearProblem& p) {
  gpu::per_token_group_quant_fp8(p.quant);
  if (gpu::block_gemm_sm90_supports(p.gemm).empty())
    gpu::block_fp8_gemm_sm90(p.gemm);
  else
    gpu::block_fp8_gemm(p.gemm);
}
#define MOEKIT_GPU_ENTRY(...) __VA_ARGS__,
#else
#define MOEKIT_GPU_ENTRY(...)
#endif

template <class Problem>
std::string reference_supports(const Problem& p);
template <>
std::string reference_supports(const GroupQuantProblem& p) {
  return p.x.device().is_cpu() ? "" : "tensors are on " + p.x.device().str();
}
template <>
std::string reference_supports(const BlockGemmProblem& p) {
  return p.a.device().is_cpu() ? "" : "tensors are on " + p.a.device().str();
}
template <>
std::string reference_supports(const W8a8LinearProblem& p) {
  return reference_supports(p.quant);
}
template <>
std::string reference_supports(const BlockQuantizeWeightProblem& p) {
  return p.w.device().is_cpu() ? "" : "tensors are on " + p.w.device().str();
}

using cpu::Fp8Isa;

const GroupQuantImplementation kGroupQuantTable[] = {
    MOEKIT_GPU_ENTRY(
        {"gpu", Backend::gpu, gpu::group_quant_supports, gpu::per_token_group_quant_fp8}){
        "cpu.avx512", Backend::cpu, cpu::fp8_supports<Fp8Isa::avx512>,
        cpu::per_token_group_quant_fp8<Fp8Isa::avx512>},
    {"cpu.avx2", Backend::cpu, cpu::fp8_supports<Fp8Isa::avx2>,
     cpu::per_token_group_quant_fp8<Fp8Isa::avx2>},
    {"cpu.scalar", Backend::cpu, cpu::fp8_supports<Fp8Isa::portable>,
     cpu::per_token_group_quant_fp8<Fp8Isa::portable>},
    {"reference", Backend::reference, reference_supports<GroupQuantProblem>,
     reference::per_token_group_quant_fp8},
};

const BlockGemmImplementation kBlockGemmTable[] = {
    MOEKIT_GPU_ENTRY(
        {"gpu.cublaslt", Backend::gpu, gpu::cublaslt_gemm_supports, gpu::cublaslt_block_fp8_gemm})
        MOEKIT_GPU_ENTRY({"gpu.sm90", Backend::gpu, gpu::block_gemm_sm90_supports,
                          gpu::block_fp8_gemm_sm90, gpu::block_gemm_sm90_plan})
            MOEKIT_GPU_ENTRY({"gpu", Backend::gpu, gpu::block_gemm_supports, gpu::block_fp8_gemm}){
                "cpu.amx", Backend::cpu, cpu::fp8_supports<Fp8Isa::amx>,
                cpu::block_fp8_gemm<Fp8Isa::amx>},
    {"cpu.avx512bf16", Backend::cpu, cpu::fp8_supports<Fp8Isa::avx512bf16>,
     cpu::block_fp8_gemm<Fp8Isa::avx512bf16>},
    {"cpu.avx512", Backend::cpu, cpu::fp8_supports<Fp8Isa::avx512>,
     cpu::block_fp8_gemm<Fp8Isa::avx512>},
    {"cpu.avx2", Backend::cpu, cpu::fp8_supports<Fp8Isa::avx2>, cpu::block_fp8_gemm<Fp8Isa::avx2>},
    {"cpu.scalar", Backend::cpu, cpu::fp8_supports<Fp8Isa::portable>,
     cpu::block_fp8_gemm<Fp8Isa::portable>},
    {"reference", Backend::reference, reference_supports<BlockGemmProblem>,
     reference::block_fp8_gemm},
};

const W8a8LinearImplementation kW8a8LinearTable[] = {
    MOEKIT_GPU_ENTRY(
        {"gpu.cublaslt", Backend::gpu, gpu_linear_cublaslt_supports, gpu_linear_cublaslt})
        MOEKIT_GPU_ENTRY({"gpu.sm90.fused", Backend::gpu, gpu::w8a8_linear_sm90_fused_supports,
                          gpu::w8a8_linear_sm90_fused, gpu::w8a8_linear_sm90_fused_plan})
            MOEKIT_GPU_ENTRY({"gpu", Backend::gpu, gpu_linear_supports, gpu_linear,
                              gpu_linear_plan}){"cpu.amx", Backend::cpu,
                                                cpu::fp8_supports<Fp8Isa::amx>,
                                                cpu::w8a8_block_fp8_linear<Fp8Isa::amx>},
    {"cpu.avx512bf16", Backend::cpu, cpu::fp8_supports<Fp8Isa::avx512bf16>,
     cpu::w8a8_block_fp8_linear<Fp8Isa::avx512bf16>},
    {"cpu.avx512", Backend::cpu, cpu::fp8_supports<Fp8Isa::avx512>,
     cpu::w8a8_block_fp8_linear<Fp8Isa::avx512>},
    {"cpu.avx2", Backend::cpu, cpu::fp8_supports<Fp8Isa::avx2>,
     cpu::w8a8_block_fp8_linear<Fp8Isa::avx2>},
    {"cpu.scalar", Backend::cpu, cpu::fp8_supports<Fp8Isa::portable>,
     cpu::w8a8_block_fp8_linear<Fp8Isa::portable>},
    {"reference", Backend::reference, reference_supports<W8a8LinearProblem>,
     reference::w8a8_block_fp8_linear},
};

const BlockQuantizeWeightImplementation kBlockQuantizeWeightTable[] = {
    MOEKIT_GPU_ENTRY({"gpu", Backend::gpu, gpu::block_quantize_weight_supports,
                      gpu::block_quantize_weight}){"cpu.avx512", Backend::cpu,
                                                   cpu::fp8_supports<Fp8Isa::avx512>,
                                                   cpu::block_quantize_weight<Fp8Isa::avx512>},
    {"cpu.avx2", Backend::cpu, cpu::fp8_supports<Fp8Isa::avx2>,
     cpu::block_quantize_weight<Fp8Isa::avx2>},
    {"cpu.scalar", Backend::cpu, cpu::fp8_supports<Fp8Isa::portable>,
     cpu::block_quantize_weight<Fp8Isa::portable>},
    {"reference", Backend::reference, reference_supports<BlockQuantizeWeightProblem>,
     reference::block_quantize_weight},
};

// The first entry of `table` of backend kBackend that serves p, or null with each one's reason
// appended to `reasons` (the per-group entries below run their groups through it).
template <Backend kBackend, class Problem>
const Fp8Implementation<Problem>* entry_of(std::span<const Fp8Implementation<Problem>> table,
                                           const Problem& p, std::string& reasons) {
  for (const Fp8Implementation<Problem>& impl : table) {
    if (impl.backend != kBackend) continue;
    const std::string why_not = impl.supports(p);
    if (why_not.empty()) return &impl;
    reasons += std::string(reasons.empty() ? "" : "; ") + impl.name + ": " + why_not;
  }
  return nullptr;
}

// grouped_block_fp8_gemm: our Hopper kernel runs every group in one launch; otherwise each group
// is a block_fp8_gemm served by the first entry of that op's table of the backend named here.
template <Backend kBackend>
const BlockGemmImplementation* gemm_entry_of(const BlockGemmProblem& p, std::string& reasons) {
  return entry_of<kBackend, BlockGemmProblem>(kBlockGemmTable, p, reasons);
}

template <Backend kBackend>
std::string per_group_supports(const GroupedBlockGemmProblem& p) {
  std::string reasons;
  if (p.groups == 0 || gemm_entry_of<kBackend>(p.group(0), reasons) != nullptr) return "";
  return "no block_fp8_gemm entry of this backend serves a group (" + reasons + ")";
}

// With masked_m, the host backends read each group's rows and multiply only those; the GPU's
// calls multiply every row (the rows past masked_m[g] are unspecified; reading the counts on the
// host would synchronize the stream).
// Groups of M rows share one entry (picked once); a group of fewer rows gets the entry that serves
// its own row count (the CPU's entries are chosen by M).
template <Backend kBackend>
void per_group_gemm(const GroupedBlockGemmProblem& p) {
  std::string reasons;
  const BlockGemmImplementation* whole = gemm_entry_of<kBackend>(p.group(0), reasons);
  for (int64_t g = 0; g < p.groups; ++g) {
    int64_t rows = p.m;
    if (p.masked() && kBackend != Backend::gpu)
      rows = std::clamp<int64_t>(p.masked_m.data_as<const int32_t>()[g * p.masked_m.stride(0)], 0,
                                 p.m);
    if (rows == 0) continue;
    const BlockGemmProblem group = p.group(g, rows);
    (rows == p.m ? whole : gemm_entry_of<kBackend>(group, reasons))->run(group);
  }
}

template <Backend kBackend>
std::string per_group_plan(const GroupedBlockGemmProblem& p) {
  std::string reasons;
  const BlockGemmProblem group = p.group(0);
  const BlockGemmImplementation* impl = gemm_entry_of<kBackend>(group, reasons);
  std::string text = std::to_string(p.groups) + " calls of " + impl->name;
  if (impl->describe != nullptr) text += " (" + impl->describe(group) + ")";
  return text;
}

const GroupedBlockGemmImplementation kGroupedBlockGemmTable[] = {
    MOEKIT_GPU_ENTRY({"gpu.sm90.grouped_wide", Backend::gpu, gpu::grouped_wide_gemm_sm90_supports,
                      gpu::grouped_wide_block_fp8_gemm_sm90, gpu::grouped_wide_gemm_sm90_plan})
        MOEKIT_GPU_ENTRY({"gpu.sm90.grouped", Backend::gpu, gpu::grouped_gemm_sm90_supports,
                          gpu::grouped_block_fp8_gemm_sm90, gpu::grouped_gemm_sm90_plan})
            MOEKIT_GPU_ENTRY({"gpu.per_group", Backend::gpu, per_group_supports<Backend::gpu>,
                              per_group_gemm<Backend::gpu>, per_group_plan<Backend::gpu>}){
                "cpu.per_group", Backend::cpu, per_group_supports<Backend::cpu>,
                per_group_gemm<Backend::cpu>, per_group_plan<Backend::cpu>},
    {"reference.per_group", Backend::reference, per_group_supports<Backend::reference>,
     per_group_gemm<Backend::reference>, per_group_plan<Backend::reference>},
};

// grouped_block_fp8_gemm_contiguous apart: each maximal run of consecutive blocks with one
// in-range index is a block_fp8_gemm of its rows, served by the first entry of that op's table of
// the backend named here that takes it (the CPU's entries are chosen by M).
struct BlockRun {
  int64_t group, first_row, rows;
};

// The runs of p's blocks, block i's index read at indices[i * kContiguousBlockRows * stride].
std::vector<BlockRun> block_runs(const ContiguousBlockGemmProblem& p, const int32_t* indices,
                                 int64_t stride) {
  std::vector<BlockRun> runs;
  for (int64_t first = 0; first < p.m; first += kContiguousBlockRows) {
    const int64_t g = indices[first * stride];
    const int64_t rows = std::min(kContiguousBlockRows, p.m - first);
    if (g < 0 || g >= p.groups) continue;  // padding
    if (!runs.empty() && runs.back().group == g &&
        runs.back().first_row + runs.back().rows == first)
      runs.back().rows += rows;
    else
      runs.push_back({g, first, rows});
  }
  return runs;
}

#ifdef MOEKIT_HAVE_GPU
// The indices are on the device, maybe written by the previous kernel: wait for the stream, then
// copy the span of them to the host.
std::vector<BlockRun> gpu_block_runs(const ContiguousBlockGemmProblem& p) {
  const int64_t last = (p.m - 1) * p.m_indices.stride(0), low = std::min<int64_t>(0, last);
  std::vector<int32_t> host(static_cast<size_t>(std::max<int64_t>(0, last) - low + 1));
  gpu::synchronize(p.stream);
  gpu_hooks().memcpy(host.data(), false, p.m_indices.data_as<const int32_t>() + low, true,
                     host.size() * sizeof(int32_t));
  return block_runs(p, host.data() - low, p.m_indices.stride(0));
}
#endif

template <Backend kBackend>
std::vector<BlockRun> block_runs_of(const ContiguousBlockGemmProblem& p) {
#ifdef MOEKIT_HAVE_GPU
  if constexpr (kBackend == Backend::gpu) return gpu_block_runs(p);
#endif
  return block_runs(p, p.m_indices.data_as<const int32_t>(), p.m_indices.stride(0));
}

// The problem of a first block of rows, which supports() and the plan ask about.
BlockGemmProblem first_block_of(const ContiguousBlockGemmProblem& p) {
  return p.rows_of(0, 0, std::min(p.m, kContiguousBlockRows));
}

template <Backend kBackend>
std::string per_segment_supports(const ContiguousBlockGemmProblem& p) {
  std::string reasons;
  if (p.groups == 0 || p.m == 0 || gemm_entry_of<kBackend>(first_block_of(p), reasons) != nullptr)
    return "";
  return "no block_fp8_gemm entry of this backend serves a block of rows (" + reasons + ")";
}

template <Backend kBackend>
void per_segment_gemm(const ContiguousBlockGemmProblem& p) {
  std::string reasons;
  for (const BlockRun& run : block_runs_of<kBackend>(p)) {
    const BlockGemmProblem rows = p.rows_of(run.group, run.first_row, run.rows);
    gemm_entry_of<kBackend>(rows, reasons)->run(rows);
  }
}

template <Backend kBackend>
std::string per_segment_plan(const ContiguousBlockGemmProblem& p) {
  std::string reasons;
  const BlockGemmProblem block = first_block_of(p);
  const BlockGemmImplementation* impl = gemm_entry_of<kBackend>(block, reasons);
  if (impl == nullptr) return "";
  std::string text =
      "block_fp8_gemm (" + std::string(impl->name) + " at " + std::to_string(block.m) + " rows";
  if (impl->describe != nullptr) text += ": " + impl->describe(block);
  text += ") per run of blocks with one index";
  if (kBackend == Backend::gpu) text += ", the stream synchronized to read the indices on the host";
  return text;
}

// gpu.sm90.contiguous first (one launch, the indices read on the device); then each backend's runs
// of blocks apart.
const ContiguousBlockGemmImplementation kContiguousBlockGemmTable[] = {
    MOEKIT_GPU_ENTRY({"gpu.sm90.contiguous", Backend::gpu, gpu::contiguous_gemm_sm90_supports,
                      gpu::contiguous_block_fp8_gemm_sm90, gpu::contiguous_gemm_sm90_plan})
        MOEKIT_GPU_ENTRY({"gpu.per_segment", Backend::gpu, per_segment_supports<Backend::gpu>,
                          per_segment_gemm<Backend::gpu>, per_segment_plan<Backend::gpu>}){
            "cpu.per_segment", Backend::cpu, per_segment_supports<Backend::cpu>,
            per_segment_gemm<Backend::cpu>, per_segment_plan<Backend::cpu>},
    {"reference.per_segment", Backend::reference, per_segment_supports<Backend::reference>,
     per_segment_gemm<Backend::reference>, per_segment_plan<Backend::reference>},
};

// silu_and_mul_group_quant_fp8_masked: each group a call of the gated quantization's first entry
// of the backend named here (the host backends on the group's rows only, the GPU on all M: reading
// masked_m on the host would synchronize the stream).
template <Backend kBackend>
const GroupQuantImplementation* quant_entry_of(const GroupQuantProblem& p, std::string& reasons) {
  return entry_of<kBackend, GroupQuantProblem>(kGroupQuantTable, p, reasons);
}

template <Backend kBackend>
std::string masked_quant_supports(const MaskedGatedQuantProblem& p) {
  std::string reasons;
  if (p.groups == 0 || quant_entry_of<kBackend>(p.first, reasons) != nullptr) return "";
  return "no silu_and_mul_group_quant_fp8 entry of this backend serves a group (" + reasons + ")";
}

template <Backend kBackend>
void masked_quant(const MaskedGatedQuantProblem& p) {
  std::string reasons;
  const GroupQuantImplementation* entry = quant_entry_of<kBackend>(p.first, reasons);
  for (int64_t g = 0; g < p.groups; ++g) {
    int64_t rows = p.first.rows;
    if (kBackend != Backend::gpu)
      rows = std::clamp<int64_t>(p.masked_m.data_as<const int32_t>()[g * p.masked_m.stride(0)], 0,
                                 rows);
    if (rows > 0) entry->run(p.group(g, rows));
  }
}

template <Backend kBackend>
std::string masked_quant_plan(const MaskedGatedQuantProblem& p) {
  std::string reasons;
  return std::to_string(p.groups) + " calls of " + quant_entry_of<kBackend>(p.first, reasons)->name;
}

#ifdef MOEKIT_HAVE_GPU
std::string gpu_masked_quant_plan(const MaskedGatedQuantProblem& p) {
  return "one launch for the " + std::to_string(p.groups) + " groups of up to " +
         std::to_string(p.first.rows) + " rows, the counts read on the device";
}
#endif

// gpu.masked first (one launch, the counts read on the device); gpu.per_group where a group's rows
// do not follow the previous group's.
const MaskedGatedQuantImplementation kMaskedGatedQuantTable[] = {
    MOEKIT_GPU_ENTRY({"gpu.masked", Backend::gpu, gpu::masked_gated_quant_supports,
                      gpu::silu_and_mul_group_quant_fp8_masked, gpu_masked_quant_plan})
        MOEKIT_GPU_ENTRY({"gpu.per_group", Backend::gpu, masked_quant_supports<Backend::gpu>,
                          masked_quant<Backend::gpu>, masked_quant_plan<Backend::gpu>}){
            "cpu.per_group", Backend::cpu, masked_quant_supports<Backend::cpu>,
            masked_quant<Backend::cpu>, masked_quant_plan<Backend::cpu>},
    {"reference.per_group", Backend::reference, masked_quant_supports<Backend::reference>,
     masked_quant<Backend::reference>, masked_quant_plan<Backend::reference>},
};

// silu_and_mul_grouped_block_fp8_gemm_masked apart: the first entry of the backend named here of
// silu_and_mul_group_quant_fp8_masked's table into the workspace, then of
// grouped_block_fp8_gemm_masked's (two launches on the GPU).
template <Backend kBackend>
std::string silu_gemm_apart_supports(const MaskedSiluGemmProblem& p) {
  if (!p.workspace)
    return "no workspace for the quantized activations (silu_and_mul_grouped_block_fp8_gemm_"
           "masked_workspace_size)";
  std::string reasons;
  if (entry_of<kBackend, MaskedGatedQuantProblem>(kMaskedGatedQuantTable, p.quant, reasons) ==
      nullptr)
    return "no silu_and_mul_group_quant_fp8_masked entry serves (" + reasons + ")";
  if (entry_of<kBackend, GroupedBlockGemmProblem>(kGroupedBlockGemmTable, p.gemm, reasons) ==
      nullptr)
    return "no grouped_block_fp8_gemm_masked entry serves (" + reasons + ")";
  return "";
}

template <Backend kBackend>
void silu_gemm_apart(const MaskedSiluGemmProblem& p) {
  std::string reasons;
  entry_of<kBackend, MaskedGatedQuantProblem>(kMaskedGatedQuantTable, p.quant, reasons)
      ->run(p.quant);
  entry_of<kBackend, GroupedBlockGemmProblem>(kGroupedBlockGemmTable, p.gemm, reasons)->run(p.gemm);
}

template <Backend kBackend>
std::string silu_gemm_apart_plan(const MaskedSiluGemmProblem& p) {
  std::string reasons;
  const MaskedGatedQuantImplementation* quant =
      entry_of<kBackend, MaskedGatedQuantProblem>(kMaskedGatedQuantTable, p.quant, reasons);
  const GroupedBlockGemmImplementation* gemm =
      entry_of<kBackend, GroupedBlockGemmProblem>(kGroupedBlockGemmTable, p.gemm, reasons);
  std::string text = std::string(quant->name) + ", then " + gemm->name;
  if (gemm->describe != nullptr) text += " (" + gemm->describe(p.gemm) + ")";
  return text;
}

// gpu.sm90.fused first (one launch: the GEMM's kernel quantizes silu(gate) * up itself); each
// backend's two steps apart where a workspace is given.
const MaskedSiluGemmImplementation kMaskedSiluGemmTable[] = {
    MOEKIT_GPU_ENTRY({"gpu.sm90.fused", Backend::gpu, gpu::silu_grouped_gemm_sm90_supports,
                      gpu::silu_and_mul_grouped_block_fp8_gemm_sm90,
                      gpu::silu_grouped_gemm_sm90_plan})
        MOEKIT_GPU_ENTRY({"gpu.apart", Backend::gpu, silu_gemm_apart_supports<Backend::gpu>,
                          silu_gemm_apart<Backend::gpu>, silu_gemm_apart_plan<Backend::gpu>}){
            "cpu.apart", Backend::cpu, silu_gemm_apart_supports<Backend::cpu>,
            silu_gemm_apart<Backend::cpu>, silu_gemm_apart_plan<Backend::cpu>},
    {"reference.apart", Backend::reference, silu_gemm_apart_supports<Backend::reference>,
     silu_gemm_apart<Backend::reference>, silu_gemm_apart_plan<Backend::reference>},
};

// ---- Messages.

std::string str(int64_t v) { return std::to_string(v); }
std::string str(DType d) { return std::string(dtype_name(d)); }
std::string str(float v) {
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, "%g", static_cast<double>(v));
  return buffer;
}
std::string str(const void* p) {
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, "%p", p);
  return buffer;
}
std::string shape_str(int64_t a, int64_t b) {
  // Appending (rather than "[" + ...) avoids GCC 12's false -Wrestrict at -O3.
  std::string s = "[";
  s += str(a);
  s += ", ";
  s += str(b);
  s += "]";
  return s;
}
std::string layout_name(ScaleLayout layout) {
  if (layout > ScaleLayout::packed_ue8m0) return "layout " + str(static_cast<int64_t>(layout));
  return scale_layout_name(layout);
}

bool is_wide_float(DType d) { return d == DType::f32 || d == DType::f16 || d == DType::bf16; }

// ---- Checks shared by the ops. `name` is the argument as the op's signature calls it.

void check_matrix(const char* op, const std::string& name, const TensorView& t, const char* dims) {
  if (t.ndim() != 2) fail(op, name + ".shape", t.shape_str(), std::string("must be ") + dims);
}

void check_shape(const char* op, const std::string& name, const TensorView& t, int64_t rows,
                 int64_t cols, const std::string& why) {
  if (t.ndim() != 2 || t.size(0) != rows || t.size(1) != cols)
    fail(op, name + ".shape", t.shape_str(), "must be " + shape_str(rows, cols) + " " + why);
}

void check_wide_dtype(const char* op, const std::string& name, const TensorView& t) {
  if (!is_wide_float(t.dtype()))
    fail(op, name + ".dtype", str(t.dtype()), "is not supported (f32, f16 or bf16)");
}

void check_fp8_dtype(const char* op, const std::string& name, const TensorView& t) {
  if (t.dtype() != DType::f8e4m3)
    fail(op, name + ".dtype", str(t.dtype()), "is not supported (f8e4m3)");
}

// Kernels read rows as contiguous runs; rows themselves may be strided (not overlapping).
void check_rows_contiguous(const char* op, const std::string& name, const TensorView& t) {
  const bool unit = t.size(1) <= 1 || t.stride(1) == 1;
  const bool rows_apart = t.size(0) <= 1 || t.stride(0) >= t.size(1);
  if (!unit || !rows_apart)
    fail(op, name + ".strides", shape_str(t.stride(0), t.stride(1)),
         "must keep each row contiguous (stride 1 along the last dimension, rows not overlapping)");
}

void check_device(const char* op, const std::string& name, const TensorView& t, Device device,
                  const std::string& first) {
  if (t.device() != device)
    fail(op, name + ".device", t.device().str(),
         "differs from " + first + ".device=" + device.str());
}

// A pointer for every non-empty tensor, aligned to its elements (kernels read them as such).
void check_data(const char* op, const std::string& name, const TensorView& t) {
  if (t.numel() > 0 && t.data() == nullptr)
    fail(op, name + ".data", "null", "pointer given for a non-empty tensor");
  const size_t element = dtype_size(t.dtype());
  if (reinterpret_cast<uintptr_t>(t.data()) % element != 0)
    fail(op, name + ".data", str(static_cast<const void*>(t.data())),
         "is not aligned to its " + std::to_string(element) + "-byte elements");
}

// masked_m of the masked layouts: i32 [groups], contiguous, on the tensors' device.
void check_masked_m(const char* op, const TensorView& masked_m, int64_t groups, Device device,
                    const char* first) {
  if (masked_m.ndim() != 1 || masked_m.size(0) != groups)
    fail(op, "masked_m.shape", masked_m.shape_str(),
         "must be [" + str(groups) + "] (one row count per group)");
  if (masked_m.dtype() != DType::i32)
    fail(op, "masked_m.dtype", str(masked_m.dtype()), "is not supported (i32)");
  check_device(op, "masked_m", masked_m, device, first);
  check_data(op, "masked_m", masked_m);
  if (groups > 1 && masked_m.stride(0) != 1)
    fail(op, "masked_m.strides", "[" + str(masked_m.stride(0)) + "]", "must be [1]");
}

// A contiguous scale tensor of the storage group_quant_scale_storage says.
void check_scale_storage(const char* op, const std::string& name, const TensorView& scales,
                         int64_t M, int64_t K, int group_size, ScaleLayout layout) {
  GroupQuantConfig config;
  config.group_size = group_size;
  config.layout = layout;
  const ScaleStorage storage = group_quant_scale_storage(M, K, config);
  const std::string why = "(the " + layout_name(layout) + " storage of " + shape_str(M, K) +
                          " in groups of " + str(int64_t{group_size}) + ")";
  if (scales.dtype() != storage.dtype)
    fail(op, name + ".dtype", str(scales.dtype()), "must be " + str(storage.dtype) + " " + why);
  check_shape(op, name, scales, storage.shape[0], storage.shape[1], why);
  if (!scales.is_contiguous())
    fail(op, name + ".strides", shape_str(scales.stride(0), scales.stride(1)),
         "must be contiguous " + why);
}

void check_bias(const char* op, const std::optional<TensorView>& bias, int64_t N, Device device,
                const std::string& first) {
  if (!bias) return;
  if (bias->ndim() != 1 || bias->size(0) != N)
    fail(op, "bias.shape", bias->shape_str(), "must be [" + str(N) + "] (one per output column)");
  check_wide_dtype(op, "bias", *bias);
  check_device(op, "bias", *bias, device, first);
  check_data(op, "bias", *bias);
}

// b [N, K] e4m3 and its block scales [ceil(N/128), ceil(K/128)] f32/bf16 (names as the op has
// them).
void check_weight(const char* op, const std::string& b_name, const TensorView& b,
                  const std::string& scales_name, const TensorView& b_scales, int64_t K,
                  Device device, const std::string& first) {
  check_matrix(op, b_name, b, "[N, K]");
  check_fp8_dtype(op, b_name, b);
  if (b.size(1) != K)
    fail(op, b_name + ".shape", b.shape_str(),
         "must have K=" + str(K) + " columns, as " + first + " has");
  check_rows_contiguous(op, b_name, b);
  check_device(op, b_name, b, device, first);
  const int64_t N = b.size(0);
  if (b_scales.dtype() != DType::f32 && b_scales.dtype() != DType::bf16)
    fail(op, scales_name + ".dtype", str(b_scales.dtype()), "is not supported (f32 or bf16)");
  check_shape(op, scales_name, b_scales, fp8::ceil_div(N, kFp8BlockSize),
              fp8::ceil_div(K, kFp8BlockSize),
              "(one per 128 x 128 block of " + b_name + " " + shape_str(N, K) + ")");
  check_device(op, scales_name, b_scales, device, first);
  check_data(op, b_name, b);
  check_data(op, scales_name, b_scales);
}

void check_output(const char* op, const std::string& name, const TensorView& out, int64_t M,
                  int64_t N, Device device, const std::string& first) {
  check_shape(op, name, out, M, N, "(rows of the input x columns of the weight)");
  check_wide_dtype(op, name, out);
  check_rows_contiguous(op, name, out);
  check_device(op, name, out, device, first);
  check_data(op, name, out);
}

// ---- Problems without checks: the front ends below validate first.

GroupQuantProblem group_quant_problem_of(const TensorView& x, const TensorView& q,
                                         const TensorView& scales, ScaleLayout layout,
                                         int group_size, bool ue8m0, float eps,
                                         const OpOptions& options) {
  GroupQuantProblem p;
  p.x = x;
  p.q = q;
  p.scales = scales;
  p.rows = x.size(0);
  p.cols = x.size(1);
  p.groups = fp8::ceil_div(p.cols, group_size);
  p.scale_at = scale_addressing(layout, p.rows, p.groups);
  p.group_size = group_size;
  p.ue8m0 = ue8m0;
  p.eps = eps;
  p.num_threads = options.num_threads;
  p.stream = options.stream;
  return p;
}

BlockGemmProblem block_gemm_problem_of(const TensorView& a, const TensorView& a_scales,
                                       ScaleLayout layout, const TensorView& b,
                                       const TensorView& b_scales,
                                       const std::optional<TensorView>& bias, const TensorView& out,
                                       const OpOptions& options) {
  BlockGemmProblem p;
  p.a = a;
  p.a_scales = a_scales;
  p.b = b;
  p.b_scales = b_scales;
  if (bias) p.bias = *bias;
  p.out = out;
  p.m = a.size(0);
  p.n = b.size(0);
  p.k = a.size(1);
  p.k_blocks = fp8::ceil_div(p.k, kFp8BlockSize);
  p.n_blocks = fp8::ceil_div(p.n, kFp8BlockSize);
  p.a_scale_at = scale_addressing(layout, p.m, p.k_blocks);
  p.num_threads = options.num_threads;
  p.stream = options.stream;
  p.b_static = options.static_weights;
  return p;
}

constexpr const char* kGroupQuantOp = "per_token_group_quant_fp8";
constexpr const char* kGatedQuantOp = "silu_and_mul_group_quant_fp8";
constexpr const char* kGemmOp = "block_fp8_gemm";
constexpr const char* kLinearOp = "w8a8_block_fp8_linear";
constexpr const char* kWeightOp = "block_quantize_weight";
constexpr const char* kGroupedGemmOp = "grouped_block_fp8_gemm";
constexpr const char* kContiguousOp = "grouped_block_fp8_gemm_contiguous";

}  // namespace

std::span<const GroupQuantImplementation> group_quant_implementations() { return kGroupQuantTable; }
std::span<const BlockGemmImplementation> block_gemm_implementations() { return kBlockGemmTable; }
std::span<const W8a8LinearImplementation> w8a8_linear_implementations() { return kW8a8LinearTable; }
std::span<const BlockQuantizeWeightImplementation> block_quantize_weight_implementations() {
  return kBlockQuantizeWeightTable;
}
std::span<const GroupedBlockGemmImplementation> grouped_block_gemm_implementations() {
  return kGroupedBlockGemmTable;
}
std::span<const MaskedGatedQuantImplementation> masked_gated_quant_implementations() {
  return kMaskedGatedQuantTable;
}
std::span<const MaskedSiluGemmImplementation> masked_silu_gemm_implementations() {
  return kMaskedSiluGemmTable;
}
std::span<const ContiguousBlockGemmImplementation> contiguous_block_gemm_implementations() {
  return kContiguousBlockGemmTable;
}

// ---- per_token_group_quant_fp8

GroupQuantProblem make_group_quant_problem(const char* op, const TensorView& x, const TensorView& q,
                                           const TensorView& scales, const GroupQuantConfig& c,
                                           const OpOptions& options, bool gated) {
  check_matrix(op, "x", x, gated ? "[M, 2K]" : "[M, K]");
  check_wide_dtype(op, "x", x);
  check_rows_contiguous(op, "x", x);
  if (gated && x.size(1) % 2 != 0)
    fail(op, "x.shape", x.shape_str(), "has an odd width: it holds gate and up halves [M, 2K]");
  const int64_t M = x.size(0), K = gated ? x.size(1) / 2 : x.size(1);
  const Device device = x.device();
  if (c.group_size < 16 || c.group_size > 256 || c.group_size % 16 != 0)
    fail(op, "group_size", str(int64_t{c.group_size}),
         "must be a multiple of 16 between 16 and 256");
  if (K % c.group_size != 0)
    fail(op, "group_size", str(int64_t{c.group_size}), "does not divide K=" + str(K));
  if (c.layout > ScaleLayout::packed_ue8m0)
    fail(op, "layout", layout_name(c.layout), "is not a ScaleLayout");
  if (c.layout == ScaleLayout::packed_ue8m0 && !c.ue8m0)
    fail(op, "layout", layout_name(c.layout), "needs ue8m0=true (it stores exponents only)");
  if (!(c.eps > 0.0f) || std::isinf(c.eps)) fail(op, "eps", str(c.eps), "must be finite and > 0");
  check_shape(op, "q", q, M, K, gated ? "(x's rows, half its width)" : "(the shape of x)");
  check_fp8_dtype(op, "q", q);
  check_rows_contiguous(op, "q", q);
  check_device(op, "q", q, device, "x");
  check_scale_storage(op, "scales", scales, M, K, c.group_size, c.layout);
  check_device(op, "scales", scales, device, "x");
  check_data(op, "x", x);
  check_data(op, "q", q);
  check_data(op, "scales", scales);
  GroupQuantProblem p =
      group_quant_problem_of(x, q, scales, c.layout, c.group_size, c.ue8m0, c.eps, options);
  if (gated) {
    p.gated = true;
    p.cols = K;
    p.groups = fp8::ceil_div(K, c.group_size);
    p.scale_at = scale_addressing(c.layout, M, p.groups);
  }
  return p;
}

void per_token_group_quant_fp8(const TensorView& x, const TensorView& q, const TensorView& scales,
                               const GroupQuantConfig& config, const OpOptions& options) {
  const GroupQuantProblem p =
      make_group_quant_problem(kGroupQuantOp, x, q, scales, config, options);
  dispatch<GroupQuantProblem>(kGroupQuantOp, kGroupQuantTable, p, x.device(), options,
                              p.rows == 0 || p.cols == 0);
}

std::vector<ImplementationChoice> explain_per_token_group_quant_fp8(const TensorView& x,
                                                                    const TensorView& q,
                                                                    const TensorView& scales,
                                                                    const GroupQuantConfig& config,
                                                                    const OpOptions& options) {
  const GroupQuantProblem p =
      make_group_quant_problem(kGroupQuantOp, x, q, scales, config, options);
  return explain_table<GroupQuantProblem>(kGroupQuantTable, p, x.device(), options);
}

// ---- silu_and_mul_group_quant_fp8: the same table, each entry reading gate and up halves.

void silu_and_mul_group_quant_fp8(const TensorView& x, const TensorView& q,
                                  const TensorView& scales, const GroupQuantConfig& config,
                                  const OpOptions& options) {
  const GroupQuantProblem p =
      make_group_quant_problem(kGatedQuantOp, x, q, scales, config, options, true);
  dispatch<GroupQuantProblem>(kGatedQuantOp, kGroupQuantTable, p, x.device(), options,
                              p.rows == 0 || p.cols == 0);
}

std::vector<ImplementationChoice> explain_silu_and_mul_group_quant_fp8(
    const TensorView& x, const TensorView& q, const TensorView& scales,
    const GroupQuantConfig& config, const OpOptions& options) {
  const GroupQuantProblem p =
      make_group_quant_problem(kGatedQuantOp, x, q, scales, config, options, true);
  return explain_table<GroupQuantProblem>(kGroupQuantTable, p, x.device(), options);
}

// ---- silu_and_mul_group_quant_fp8_masked

namespace {
constexpr const char* kMaskedGatedQuantOp = "silu_and_mul_group_quant_fp8_masked";

// `op` names the caller in messages.
MaskedGatedQuantProblem make_masked_gated_quant_problem(
    const TensorView& x, const TensorView& masked_m, const TensorView& q, const TensorView& scales,
    const GroupQuantConfig& config, const OpOptions& options,
    const char* op = kMaskedGatedQuantOp) {
  const auto check_3d = [&](const char* name, const TensorView& t, const char* dims) {
    if (t.ndim() != 3) fail(op, std::string(name) + ".shape", t.shape_str(), dims);
  };
  check_3d("x", x, "must be [G, M, 2K]");
  check_3d("q", q, "must be [G, M, K]");
  check_3d("scales", scales, "must be [G, ...] (each group's scale storage)");
  const int64_t G = x.size(0);
  for (const auto& [name, t] :
       {std::pair<const char*, const TensorView*>{"q", &q}, {"scales", &scales}})
    if (t->size(0) != G)
      fail(op, std::string(name) + ".shape", t->shape_str(),
           "must have G=" + str(G) + " groups (dimension 0), as x has");
  // Group 0's planes pass silu_and_mul_group_quant_fp8's checks; the others share their shapes.
  MaskedGatedQuantProblem p;
  p.first = make_group_quant_problem(op, plane_of(x, 0), plane_of(q, 0), plane_of(scales, 0),
                                     config, options, true);
  check_masked_m(op, masked_m, G, x.device(), "x");
  // Groups of q and scales must not overlap (each is written).
  const int64_t M = x.size(1), K = q.size(2);
  const int64_t q_extent = (M - 1) * q.stride(1) + K;
  if (G > 1 && M > 0 && K > 0 && q.stride(0) < q_extent)
    fail(op, "q.strides", "[" + str(q.stride(0)) + ", " + str(q.stride(1)) + ", 1]",
         "must keep the groups apart (stride(0) >= " + str(q_extent) + ")");
  const int64_t scale_extent = scales.size(1) * scales.size(2);
  if (G > 1 && scales.stride(0) < scale_extent)
    fail(op, "scales.strides", "[" + str(scales.stride(0)) + ", ...]",
         "must keep the groups apart (stride(0) >= " + str(scale_extent) + ")");
  p.groups = G;
  p.x_stride = x.stride(0);
  p.q_stride = q.stride(0);
  p.scale_stride = scales.stride(0);
  p.masked_m = masked_m;
  return p;
}
}  // namespace

void silu_and_mul_group_quant_fp8_masked(const TensorView& x, const TensorView& masked_m,
                                         const TensorView& q, const TensorView& scales,
                                         const GroupQuantConfig& config, const OpOptions& options) {
  const MaskedGatedQuantProblem p =
      make_masked_gated_quant_problem(x, masked_m, q, scales, config, options);
  dispatch<MaskedGatedQuantProblem>(kMaskedGatedQuantOp, kMaskedGatedQuantTable, p, x.device(),
                                    options,
                                    p.groups == 0 || p.first.rows == 0 || p.first.cols == 0);
}

std::vector<ImplementationChoice> explain_silu_and_mul_group_quant_fp8_masked(
    const TensorView& x, const TensorView& masked_m, const TensorView& q, const TensorView& scales,
    const GroupQuantConfig& config, const OpOptions& options) {
  const MaskedGatedQuantProblem p =
      make_masked_gated_quant_problem(x, masked_m, q, scales, config, options);
  return explain_table<MaskedGatedQuantProblem>(kMaskedGatedQuantTable, p, x.device(), options);
}

// ---- block_fp8_gemm

BlockGemmProblem make_block_gemm_problem(const char* op, const TensorView& a,
                                         const TensorView& a_scales, ScaleLayout layout,
                                         const TensorView& b, const TensorView& b_scales,
                                         const std::optional<TensorView>& bias,
                                         const TensorView& out, const OpOptions& options) {
  check_matrix(op, "a", a, "[M, K]");
  check_fp8_dtype(op, "a", a);
  check_rows_contiguous(op, "a", a);
  check_data(op, "a", a);
  const int64_t M = a.size(0), K = a.size(1);
  const Device device = a.device();
  if (layout > ScaleLayout::packed_ue8m0)
    fail(op, "a_scales_layout", layout_name(layout), "is not a ScaleLayout");
  check_scale_storage(op, "a_scales", a_scales, M, K, kFp8BlockSize, layout);
  check_device(op, "a_scales", a_scales, device, "a");
  check_data(op, "a_scales", a_scales);
  check_weight(op, "b", b, "b_scales", b_scales, K, device, "a");
  const int64_t N = b.size(0);
  check_bias(op, bias, N, device, "a");
  check_output(op, "out", out, M, N, device, "a");
  return block_gemm_problem_of(a, a_scales, layout, b, b_scales, bias, out, options);
}

void block_fp8_gemm(const TensorView& a, const TensorView& a_scales, ScaleLayout a_scales_layout,
                    const TensorView& b, const TensorView& b_scales,
                    const std::optional<TensorView>& bias, const TensorView& out,
                    const OpOptions& options) {
  block_fp8_gemm(a, a_scales, a_scales_layout, b, b_scales, bias, out, nullptr, 0, options);
}

size_t block_fp8_gemm_workspace_size(int64_t M, int64_t N, int64_t K, const Device& device) {
  if (M < 0 || N < 0 || K < 0)
    fail(kGemmOp, "M, N, K", str(M) + ", " + str(N) + ", " + str(K), "must not be negative");
#ifdef MOEKIT_HAVE_GPU
  if (device.is_gpu()) return gpu::block_gemm_workspace_size(M, N, K, device.index);
#endif
  return device.is_cpu() ? cpu::block_gemm_workspace_size(M, N, K) : 0;
}

namespace {
size_t linear_gemm_workspace_offset(int64_t M, int64_t K) {
  return (w8a8_block_fp8_linear_workspace_size(M, K) + 255) / 256 * 256;
}
}  // namespace

size_t w8a8_block_fp8_linear_workspace_size(int64_t M, int64_t N, int64_t K, const Device& device) {
  if (M < 0 || N < 0 || K < 0)
    fail(kLinearOp, "M, N, K", str(M) + ", " + str(N) + ", " + str(K), "must not be negative");
  const size_t gemm = block_fp8_gemm_workspace_size(M, N, K, device);
  return gemm == 0 ? w8a8_block_fp8_linear_workspace_size(M, K)
                   : linear_gemm_workspace_offset(M, K) + gemm;
}

// The problem with its workspace, checked against block_fp8_gemm_workspace_size.
BlockGemmProblem with_workspace(BlockGemmProblem p, void* workspace, size_t workspace_bytes) {
  if (workspace_bytes == 0 && workspace == nullptr) return p;  // none
  const Device device = p.a.device();
  const size_t needed = block_fp8_gemm_workspace_size(p.m, p.n, p.k, device);
  if (workspace_bytes > 0 && workspace_bytes < needed)
    fail(kGemmOp, "workspace_bytes", std::to_string(workspace_bytes),
         "is less than block_fp8_gemm_workspace_size(" + str(p.m) + ", " + str(p.n) + ", " +
             str(p.k) + ", " + device.str() + ")=" + std::to_string(needed));
  if (workspace_bytes > 0 && workspace == nullptr)
    fail(kGemmOp, "workspace", "null",
         "pointer given for " + std::to_string(workspace_bytes) + " bytes");
  if (reinterpret_cast<uintptr_t>(workspace) % 16 != 0)
    fail(kGemmOp, "workspace", str(static_cast<const void*>(workspace)), "is not 16-byte aligned");
  p.workspace = workspace_bytes > 0 ? workspace : nullptr;
  p.workspace_bytes = workspace_bytes;
  return p;
}

void block_fp8_gemm(const TensorView& a, const TensorView& a_scales, ScaleLayout a_scales_layout,
                    const TensorView& b, const TensorView& b_scales,
                    const std::optional<TensorView>& bias, const TensorView& out, void* workspace,
                    size_t workspace_bytes, const OpOptions& options) {
  const BlockGemmProblem p =
      with_workspace(make_block_gemm_problem(kGemmOp, a, a_scales, a_scales_layout, b, b_scales,
                                             bias, out, options),
                     workspace, workspace_bytes);
  dispatch<BlockGemmProblem>(kGemmOp, kBlockGemmTable, p, a.device(), options,
                             p.m == 0 || p.n == 0);
}

std::vector<ImplementationChoice> explain_block_fp8_gemm(
    const TensorView& a, const TensorView& a_scales, ScaleLayout a_scales_layout,
    const TensorView& b, const TensorView& b_scales, const std::optional<TensorView>& bias,
    const TensorView& out, void* workspace, size_t workspace_bytes, const OpOptions& options) {
  const BlockGemmProblem p =
      with_workspace(make_block_gemm_problem(kGemmOp, a, a_scales, a_scales_layout, b, b_scales,
                                             bias, out, options),
                     workspace, workspace_bytes);
  return explain_table<BlockGemmProblem>(kBlockGemmTable, p, a.device(), options);
}

std::vector<ImplementationChoice> explain_block_fp8_gemm(
    const TensorView& a, const TensorView& a_scales, ScaleLayout a_scales_layout,
    const TensorView& b, const TensorView& b_scales, const std::optional<TensorView>& bias,
    const TensorView& out, const OpOptions& options) {
  return explain_block_fp8_gemm(a, a_scales, a_scales_layout, b, b_scales, bias, out, nullptr, 0,
                                options);
}

// ---- w8a8_block_fp8_linear

W8a8LinearProblem make_w8a8_linear_problem(const char* op, const TensorView& x,
                                           const TensorView& weight,
                                           const TensorView& weight_scale_inv,
                                           const std::optional<TensorView>& bias,
                                           const TensorView& y, void* workspace,
                                           size_t workspace_bytes, const OpOptions& options) {
  check_matrix(op, "x", x, "[M, K]");
  check_wide_dtype(op, "x", x);
  check_rows_contiguous(op, "x", x);
  check_data(op, "x", x);
  const int64_t M = x.size(0), K = x.size(1);
  const Device device = x.device();
  check_weight(op, "weight", weight, "weight_scale_inv", weight_scale_inv, K, device, "x");
  const int64_t N = weight.size(0);
  check_bias(op, bias, N, device, "x");
  check_output(op, "y", y, M, N, device, "x");
  const size_t needed = w8a8_block_fp8_linear_workspace_size(M, K);
  if (workspace_bytes < needed)
    fail(op, "workspace_bytes", std::to_string(workspace_bytes),
         "is less than w8a8_block_fp8_linear_workspace_size(" + str(M) + ", " + str(K) +
             ")=" + std::to_string(needed));
  if (needed > 0 && workspace == nullptr)
    fail(op, "workspace", "null", "pointer given for " + std::to_string(needed) + " bytes");
  if (reinterpret_cast<uintptr_t>(workspace) % 16 != 0)
    fail(op, "workspace", str(static_cast<const void*>(workspace)), "is not 16-byte aligned");

  // The quantized activations and their row-major f32 scales, carved from the workspace.
  const int64_t G = fp8::ceil_div(K, kFp8BlockSize);
  auto* bytes = static_cast<char*>(workspace);
  const TensorView q(bytes, DType::f8e4m3, {M, K}, device);
  const TensorView q_scales(bytes + (M * K + 63) / 64 * 64, DType::f32, {M, G}, device);
  W8a8LinearProblem p;
  p.quant = group_quant_problem_of(x, q, q_scales, ScaleLayout::row_major, kFp8BlockSize,
                                   /*ue8m0=*/false, GroupQuantConfig{}.eps, options);
  p.gemm = block_gemm_problem_of(q, q_scales, ScaleLayout::row_major, weight, weight_scale_inv,
                                 bias, y, options);
  // The GEMM's own workspace, where the caller's covers it (w8a8_block_fp8_linear_workspace_size
  // with N and the device).
  const size_t gemm_bytes = block_fp8_gemm_workspace_size(M, N, K, device);
  const size_t gemm_offset = linear_gemm_workspace_offset(M, K);
  if (gemm_bytes > 0 && workspace_bytes >= gemm_offset + gemm_bytes) {
    p.gemm.workspace = bytes + gemm_offset;
    p.gemm.workspace_bytes = gemm_bytes;
  }
  // The kernel just before the GEMM is this layer's quantization, which starts its successor only
  // once everything before it has finished: the weight may be read early whatever the caller says.
  p.gemm.b_static = true;
  p.static_weights = options.static_weights;
  return p;
}

void w8a8_block_fp8_linear(const TensorView& x, const TensorView& weight,
                           const TensorView& weight_scale_inv,
                           const std::optional<TensorView>& bias, const TensorView& y,
                           void* workspace, size_t workspace_bytes, const OpOptions& options) {
  const W8a8LinearProblem p = make_w8a8_linear_problem(kLinearOp, x, weight, weight_scale_inv, bias,
                                                       y, workspace, workspace_bytes, options);
  dispatch<W8a8LinearProblem>(kLinearOp, kW8a8LinearTable, p, x.device(), options,
                              p.gemm.m == 0 || p.gemm.n == 0);
}

std::vector<ImplementationChoice> explain_w8a8_block_fp8_linear(
    const TensorView& x, const TensorView& weight, const TensorView& weight_scale_inv,
    const std::optional<TensorView>& bias, const TensorView& y, void* workspace,
    size_t workspace_bytes, const OpOptions& options) {
  const W8a8LinearProblem p = make_w8a8_linear_problem(kLinearOp, x, weight, weight_scale_inv, bias,
                                                       y, workspace, workspace_bytes, options);
  return explain_table<W8a8LinearProblem>(kW8a8LinearTable, p, x.device(), options);
}

// ---- block_quantize_weight

BlockQuantizeWeightProblem make_block_quantize_weight_problem(const char* op, const TensorView& w,
                                                              const TensorView& weight,
                                                              const TensorView& weight_scale_inv,
                                                              const OpOptions& options) {
  check_matrix(op, "w", w, "[N, K]");
  check_wide_dtype(op, "w", w);
  check_rows_contiguous(op, "w", w);
  check_data(op, "w", w);
  const int64_t N = w.size(0), K = w.size(1);
  const Device device = w.device();
  check_shape(op, "weight", weight, N, K, "(the shape of w)");
  check_fp8_dtype(op, "weight", weight);
  check_rows_contiguous(op, "weight", weight);
  check_device(op, "weight", weight, device, "w");
  check_data(op, "weight", weight);
  if (weight_scale_inv.dtype() != DType::f32)
    fail(op, "weight_scale_inv.dtype", str(weight_scale_inv.dtype()), "is not supported (f32)");
  check_shape(op, "weight_scale_inv", weight_scale_inv, fp8::ceil_div(N, kFp8BlockSize),
              fp8::ceil_div(K, kFp8BlockSize), "(one per 128 x 128 block of w)");
  check_device(op, "weight_scale_inv", weight_scale_inv, device, "w");
  check_data(op, "weight_scale_inv", weight_scale_inv);
  BlockQuantizeWeightProblem p;
  p.w = w;
  p.weight = weight;
  p.weight_scale_inv = weight_scale_inv;
  p.n = N;
  p.k = K;
  p.num_threads = options.num_threads;
  p.stream = options.stream;
  return p;
}

void block_quantize_weight(const TensorView& w, const TensorView& weight,
                           const TensorView& weight_scale_inv, const OpOptions& options) {
  const BlockQuantizeWeightProblem p =
      make_block_quantize_weight_problem(kWeightOp, w, weight, weight_scale_inv, options);
  dispatch<BlockQuantizeWeightProblem>(kWeightOp, kBlockQuantizeWeightTable, p, w.device(), options,
                                       p.n == 0 || p.k == 0);
}

std::vector<ImplementationChoice> explain_block_quantize_weight(const TensorView& w,
                                                                const TensorView& weight,
                                                                const TensorView& weight_scale_inv,
                                                                const OpOptions& options) {
  const BlockQuantizeWeightProblem p =
      make_block_quantize_weight_problem(kWeightOp, w, weight, weight_scale_inv, options);
  return explain_table<BlockQuantizeWeightProblem>(kBlockQuantizeWeightTable, p, w.device(),
                                                   options);
}

// ---- grouped_block_fp8_gemm

GroupedBlockGemmProblem make_grouped_block_gemm_problem(const char* op, const TensorView& a,
                                                        const TensorView& a_scales,
                                                        ScaleLayout layout, const TensorView& b,
                                                        const TensorView& b_scales,
                                                        const TensorView& out,
                                                        const OpOptions& options) {
  const auto check_3d = [&](const char* name, const TensorView& t, const char* dims) {
    if (t.ndim() != 3) fail(op, std::string(name) + ".shape", t.shape_str(), dims);
  };
  check_3d("a", a, "must be [G, M, K]");
  const int64_t G = a.size(0);
  const auto check_groups = [&](const char* name, const TensorView& t) {
    if (t.size(0) != G)
      fail(op, std::string(name) + ".shape", t.shape_str(),
           "must have G=" + str(G) + " groups (dimension 0), as a has");
  };
  check_3d("a_scales", a_scales, "must be [G, ...] (each group's scale storage)");
  check_3d("b", b, "must be [G, N, K]");
  check_3d("b_scales", b_scales, "must be [G, ceil(N/128), ceil(K/128)]");
  check_3d("out", out, "must be [G, M, N]");
  check_groups("a_scales", a_scales);
  check_groups("b", b);
  check_groups("b_scales", b_scales);
  check_groups("out", out);
  // Group 0's planes pass block_fp8_gemm's checks; the others share their shapes and strides.
  (void)make_block_gemm_problem(op, plane_of(a, 0), plane_of(a_scales, 0), layout, plane_of(b, 0),
                                plane_of(b_scales, 0), std::nullopt, plane_of(out, 0), options);
  const int64_t M = a.size(1), N = b.size(1);
  // Groups of out must not overlap: the last group starts past the first's last element.
  const int64_t plane_extent = (M - 1) * out.stride(1) + N;
  if (G > 1 && M > 0 && N > 0 && out.stride(0) < plane_extent)
    fail(op, "out.strides",
         out.shape_str() + " strides [" + str(out.stride(0)) + ", " + str(out.stride(1)) + ", " +
             str(out.stride(2)) + "]",
         "must keep the groups apart (stride(0) >= " + str(plane_extent) + ")");
  GroupedBlockGemmProblem p;
  p.a = a;
  p.a_scales = a_scales;
  p.a_scales_layout = layout;
  p.b = b;
  p.b_scales = b_scales;
  p.out = out;
  p.groups = G;
  p.m = M;
  p.n = N;
  p.k = a.size(2);
  p.num_threads = options.num_threads;
  p.stream = options.stream;
  p.b_static = options.static_weights;
  return p;
}

void grouped_block_fp8_gemm(const TensorView& a, const TensorView& a_scales,
                            ScaleLayout a_scales_layout, const TensorView& b,
                            const TensorView& b_scales, const TensorView& out,
                            const OpOptions& options) {
  const GroupedBlockGemmProblem p = make_grouped_block_gemm_problem(
      kGroupedGemmOp, a, a_scales, a_scales_layout, b, b_scales, out, options);
  dispatch<GroupedBlockGemmProblem>(kGroupedGemmOp, kGroupedBlockGemmTable, p, a.device(), options,
                                    p.groups == 0 || p.m == 0 || p.n == 0);
}

namespace {
constexpr const char* kMaskedOp = "grouped_block_fp8_gemm_masked";

GroupedBlockGemmProblem with_masked_m(GroupedBlockGemmProblem p, const TensorView& masked_m,
                                      int64_t expected_rows = 0) {
  check_masked_m(kMaskedOp, masked_m, p.groups, p.a.device(), "a");
  p.masked_m = masked_m;
  p.expected_rows = std::min(expected_rows, p.m);
  return p;
}

int64_t checked_expected_rows(int64_t expected_rows) {
  if (expected_rows < 1)
    fail(kMaskedOp, "expected_rows", std::to_string(expected_rows), "must be at least 1");
  return expected_rows;
}
}  // namespace

void grouped_block_fp8_gemm_masked(const TensorView& a, const TensorView& a_scales,
                                   ScaleLayout a_scales_layout, const TensorView& b,
                                   const TensorView& b_scales, const TensorView& masked_m,
                                   const TensorView& out, const OpOptions& options) {
  const GroupedBlockGemmProblem p =
      with_masked_m(make_grouped_block_gemm_problem(kMaskedOp, a, a_scales, a_scales_layout, b,
                                                    b_scales, out, options),
                    masked_m);
  dispatch<GroupedBlockGemmProblem>(kMaskedOp, kGroupedBlockGemmTable, p, a.device(), options,
                                    p.groups == 0 || p.m == 0 || p.n == 0);
}

void grouped_block_fp8_gemm_masked(const TensorView& a, const TensorView& a_scales,
                                   ScaleLayout a_scales_layout, const TensorView& b,
                                   const TensorView& b_scales, const TensorView& masked_m,
                                   const TensorView& out, int64_t expected_rows,
                                   const OpOptions& options) {
  const GroupedBlockGemmProblem p =
      with_masked_m(make_grouped_block_gemm_problem(kMaskedOp, a, a_scales, a_scales_layout, b,
                                                    b_scales, out, options),
                    masked_m, checked_expected_rows(expected_rows));
  dispatch<GroupedBlockGemmProblem>(kMaskedOp, kGroupedBlockGemmTable, p, a.device(), options,
                                    p.groups == 0 || p.m == 0 || p.n == 0);
}

std::vector<ImplementationChoice> explain_grouped_block_fp8_gemm_masked(
    const TensorView& a, const TensorView& a_scales, ScaleLayout a_scales_layout,
    const TensorView& b, const TensorView& b_scales, const TensorView& masked_m,
    const TensorView& out, int64_t expected_rows, const OpOptions& options) {
  const GroupedBlockGemmProblem p =
      with_masked_m(make_grouped_block_gemm_problem(kMaskedOp, a, a_scales, a_scales_layout, b,
                                                    b_scales, out, options),
                    masked_m, checked_expected_rows(expected_rows));
  return explain_table<GroupedBlockGemmProblem>(kGroupedBlockGemmTable, p, a.device(), options);
}

std::vector<ImplementationChoice> explain_grouped_block_fp8_gemm_masked(
    const TensorView& a, const TensorView& a_scales, ScaleLayout a_scales_layout,
    const TensorView& b, const TensorView& b_scales, const TensorView& masked_m,
    const TensorView& out, const OpOptions& options) {
  const GroupedBlockGemmProblem p =
      with_masked_m(make_grouped_block_gemm_problem(kMaskedOp, a, a_scales, a_scales_layout, b,
                                                    b_scales, out, options),
                    masked_m);
  return explain_table<GroupedBlockGemmProblem>(kGroupedBlockGemmTable, p, a.device(), options);
}

std::vector<ImplementationChoice> explain_grouped_block_fp8_gemm(
    const TensorView& a, const TensorView& a_scales, ScaleLayout a_scales_layout,
    const TensorView& b, const TensorView& b_scales, const TensorView& out,
    const OpOptions& options) {
  const GroupedBlockGemmProblem p = make_grouped_block_gemm_problem(
      kGroupedGemmOp, a, a_scales, a_scales_layout, b, b_scales, out, options);
  return explain_table<GroupedBlockGemmProblem>(kGroupedBlockGemmTable, p, a.device(), options);
}

// ---- grouped_block_fp8_gemm_contiguous

ContiguousBlockGemmProblem make_contiguous_block_gemm_problem(
    const char* op, const TensorView& a, const TensorView& a_scales, ScaleLayout layout,
    const TensorView& b, const TensorView& b_scales, const TensorView& m_indices,
    const TensorView& out, const OpOptions& options) {
  if (b.ndim() != 3) fail(op, "b.shape", b.shape_str(), "must be [G, N, K]");
  if (b_scales.ndim() != 3)
    fail(op, "b_scales.shape", b_scales.shape_str(), "must be [G, ceil(N/128), ceil(K/128)]");
  const int64_t G = b.size(0);
  if (b_scales.size(0) != G)
    fail(op, "b_scales.shape", b_scales.shape_str(),
         "must have G=" + str(G) + " groups (dimension 0), as b has");
  // a, its scales, out and group 0's weight pass block_fp8_gemm's checks; the other groups share
  // the weight's shapes and strides.
  const BlockGemmProblem rows = make_block_gemm_problem(
      op, a, a_scales, layout, plane_of(b, 0), plane_of(b_scales, 0), std::nullopt, out, options);
  if (m_indices.ndim() != 1 || m_indices.size(0) != rows.m)
    fail(op, "m_indices.shape", m_indices.shape_str(),
         "must be [" + str(rows.m) + "] (one expert index per row of a)");
  if (m_indices.dtype() != DType::i32)
    fail(op, "m_indices.dtype", str(m_indices.dtype()), "is not supported (i32)");
  check_device(op, "m_indices", m_indices, a.device(), "a");
  check_data(op, "m_indices", m_indices);
  ContiguousBlockGemmProblem p;
  p.a = a;
  p.a_scales = a_scales;
  p.a_scale_at = rows.a_scale_at;
  p.b = b;
  p.b_scales = b_scales;
  p.m_indices = m_indices;
  p.out = out;
  p.groups = G;
  p.m = rows.m;
  p.n = rows.n;
  p.k = rows.k;
  p.num_threads = options.num_threads;
  p.stream = options.stream;
  p.b_static = options.static_weights;
  return p;
}

void grouped_block_fp8_gemm_contiguous(const TensorView& a, const TensorView& a_scales,
                                       ScaleLayout a_scales_layout, const TensorView& b,
                                       const TensorView& b_scales, const TensorView& m_indices,
                                       const TensorView& out, const OpOptions& options) {
  const ContiguousBlockGemmProblem p = make_contiguous_block_gemm_problem(
      kContiguousOp, a, a_scales, a_scales_layout, b, b_scales, m_indices, out, options);
  dispatch<ContiguousBlockGemmProblem>(kContiguousOp, kContiguousBlockGemmTable, p, a.device(),
                                       options, p.groups == 0 || p.m == 0 || p.n == 0);
}

std::vector<ImplementationChoice> explain_grouped_block_fp8_gemm_contiguous(
    const TensorView& a, const TensorView& a_scales, ScaleLayout a_scales_layout,
    const TensorView& b, const TensorView& b_scales, const TensorView& m_indices,
    const TensorView& out, const OpOptions& options) {
  const ContiguousBlockGemmProblem p = make_contiguous_block_gemm_problem(
      kContiguousOp, a, a_scales, a_scales_layout, b, b_scales, m_indices, out, options);
  return explain_table<ContiguousBlockGemmProblem>(kContiguousBlockGemmTable, p, a.device(),
                                                   options);
}

// ---- silu_and_mul_grouped_block_fp8_gemm_masked

namespace {
constexpr const char* kSiluGemmOp = "silu_and_mul_grouped_block_fp8_gemm_masked";

// Never read: the views of the quantized activations point here where the caller gave no
// workspace, so that both halves validate as complete problems (only entries that need the
// workspace would read them, and those decline without it).
alignas(256) char workspace_placeholder[256];

MaskedSiluGemmProblem make_masked_silu_gemm_problem(
    const TensorView& x, const TensorView& masked_m, const TensorView& b,
    const TensorView& b_scales, const TensorView& out, const GroupQuantConfig& config,
    int64_t expected_rows, void* workspace, size_t workspace_bytes, const OpOptions& options) {
  const char* op = kSiluGemmOp;
  if (x.ndim() != 3) fail(op, "x.shape", x.shape_str(), "must be [G, M, 2K]");
  if (b.ndim() != 3) fail(op, "b.shape", b.shape_str(), "must be [G, N, K]");
  const int64_t G = x.size(0), M = x.size(1), K = x.size(2) / 2;
  if (x.size(2) % 2 != 0)
    fail(op, "x.shape", x.shape_str(), "must be [G, M, 2K] (gate then up): odd last dimension");
  if (b.size(0) != G || b.size(2) != K)
    fail(op, "b.shape", b.shape_str(),
         "must be [G=" + str(G) + ", N, K=" + str(K) + "] (x is " + x.shape_str() + ")");
  if (config.group_size != kFp8BlockSize)
    fail(op, "group_size", str(int64_t{config.group_size}),
         "must be 128 (the GEMM's activation blocks)");
  if (config.layout != ScaleLayout::row_major)
    fail(op, "layout", layout_name(config.layout),
         "must be row_major (the scales stay inside the op)");
  if (expected_rows < 0)
    fail(op, "expected_rows", str(expected_rows), "must be at least 1, or 0 for no hint");
  const size_t needed = silu_and_mul_grouped_block_fp8_gemm_masked_workspace_size(G, M, K);
  if (workspace == nullptr && workspace_bytes > 0)
    fail(op, "workspace", "null",
         "pointer given for " + std::to_string(workspace_bytes) + " bytes");
  if (workspace != nullptr && workspace_bytes < needed)
    fail(op, "workspace_bytes", std::to_string(workspace_bytes),
         "is less than silu_and_mul_grouped_block_fp8_gemm_masked_workspace_size(" + str(G) + ", " +
             str(M) + ", " + str(K) + ")=" + std::to_string(needed));
  if (reinterpret_cast<uintptr_t>(workspace) % 16 != 0)
    fail(op, "workspace", str(static_cast<const void*>(workspace)), "is not 16-byte aligned");

  // The quantized activations [G, M, K] and their f32 scales, carved from the workspace (or the
  // placeholder). The scales column-major TMA-aligned per group ([G, K / 128, align4(M)]): TMA
  // copies them at any K, so that past 64 expected rows the wide tiles take the GEMM (row-major
  // rows of K=768's 6 scales are 24 bytes, which TMA cannot copy). The same values either way.
  auto* bytes = workspace != nullptr ? static_cast<char*>(workspace) : workspace_placeholder;
  const int64_t blocks = fp8::ceil_div(K, kFp8BlockSize);
  const TensorView q(bytes, DType::f8e4m3, {G, M, K}, x.device());
  const TensorView q_scales(bytes + (G * M * K + 63) / 64 * 64, DType::f32,
                            {G, blocks, fp8::align4(M)}, x.device());
  GroupQuantConfig inside = config;
  inside.layout = ScaleLayout::column_major_tma;
  MaskedSiluGemmProblem p;
  p.quant = make_masked_gated_quant_problem(x, masked_m, q, q_scales, inside, options, op);
  p.gemm = make_grouped_block_gemm_problem(op, q, q_scales, ScaleLayout::column_major_tma, b,
                                           b_scales, out, options);
  p.gemm.masked_m = masked_m;
  p.gemm.expected_rows = std::min(expected_rows, M);
  // The GEMM's kernel follows the op's own quantization, which starts its successor only once
  // everything before it has finished: the weights may be read early whatever the caller says.
  p.gemm.b_static = true;
  p.workspace = workspace != nullptr;
  p.static_weights = options.static_weights;
  return p;
}
}  // namespace

void silu_and_mul_grouped_block_fp8_gemm_masked(const TensorView& x, const TensorView& masked_m,
                                                const TensorView& b, const TensorView& b_scales,
                                                const TensorView& out,
                                                const GroupQuantConfig& config,
                                                int64_t expected_rows, void* workspace,
                                                size_t workspace_bytes, const OpOptions& options) {
  const MaskedSiluGemmProblem p = make_masked_silu_gemm_problem(
      x, masked_m, b, b_scales, out, config, expected_rows, workspace, workspace_bytes, options);
  dispatch<MaskedSiluGemmProblem>(kSiluGemmOp, kMaskedSiluGemmTable, p, x.device(), options,
                                  p.gemm.groups == 0 || p.gemm.m == 0 || p.gemm.n == 0);
}

std::vector<ImplementationChoice> explain_silu_and_mul_grouped_block_fp8_gemm_masked(
    const TensorView& x, const TensorView& masked_m, const TensorView& b,
    const TensorView& b_scales, const TensorView& out, const GroupQuantConfig& config,
    int64_t expected_rows, void* workspace, size_t workspace_bytes, const OpOptions& options) {
  const MaskedSiluGemmProblem p = make_masked_silu_gemm_problem(
      x, masked_m, b, b_scales, out, config, expected_rows, workspace, workspace_bytes, options);
  return explain_table<MaskedSiluGemmProblem>(kMaskedSiluGemmTable, p, x.device(), options);
}

}  // namespace moekit
