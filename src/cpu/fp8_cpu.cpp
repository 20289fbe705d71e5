// CPU FP8: what each ISA build serves, the problem -> plain-args translation, and the portable
// build of the kernels (8 lanes of plain C++ that the compiler may vectorize with the baseline
// ISA).
#include "cpu/fp8_cpu.h"

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>

#include "cpu/fp8_cpu_kernels.h"
#include "moekit/backend.h"
#include "moekit/dtype.h"
#include "moekit/tensor.h"
#include "ops/gated_activation.h"

namespace moekit::cpu {
namespace {

// The exact f32 value of every e4m3 byte.
struct E4m3Values {
  float value[256];
  E4m3Values() {
    for (int b = 0; b < 256; ++b) value[b] = f8e4m3_to_f32(static_cast<uint8_t>(b));
  }
};
const float* e4m3_values() {
  static const E4m3Values table;
  return table.value;
}

struct Portable {
  static constexpr int kLanes = 8;
  static constexpr int kProbeBytes = 32;
  static constexpr int kRegisters = 16;
  static constexpr int kMicroRows = 4;
  struct F {
    float v[8];
  };
  struct Probe {};  // the table decodes NaN bytes to NaN: nothing to catch

  template <class Op>
  static F map(Op op) {
    F r;
    for (int i = 0; i < kLanes; ++i) r.v[i] = op(i);
    return r;
  }
  static F zero() { return set1(0.0f); }
  static F set1(float x) {
    return map([&](int) { return x; });
  }
  static F load(const float* p) {
    return map([&](int i) { return p[i]; });
  }
  static void store(float* p, F x) { std::memcpy(p, x.v, sizeof x.v); }
  static void keep_in_register(F&) {}
  static F div(F a, F b) {
    return map([&](int i) { return a.v[i] / b.v[i]; });
  }
  static F mul(F a, F b) {
    return map([&](int i) { return a.v[i] * b.v[i]; });
  }
  static F add(F a, F b) {
    return map([&](int i) { return a.v[i] + b.v[i]; });
  }
  static F fma(F a, F b, F c) {
    return map([&](int i) { return a.v[i] * b.v[i] + c.v[i]; });
  }
  static float reduce_add(F x) {
    float s = 0.0f;
    for (float e : x.v) s += e;
    return s;
  }
  static float reduce_max(F x) {
    float m = x.v[0];
    for (float e : x.v) m = e > m ? e : m;
    return m;
  }
  static F load_f16(const uint16_t* p) {
    return map([&](int i) { return f16_to_f32(p[i]); });
  }
  static F load_bf16(const uint16_t* p) {
    return map([&](int i) { return load_wide(p, Fp8Float::bf16, i); });
  }
  static F abs(F x) {
    return map([&](int i) { return __builtin_fabsf(x.v[i]); });
  }
  static F max_ignoring_nan(F acc, F x) {
    return map([&](int i) { return x.v[i] > acc.v[i] ? x.v[i] : acc.v[i]; });
  }
  static void store_e4m3(uint8_t* dst, F x) {
    for (int i = 0; i < kLanes; ++i) dst[i] = f32_to_f8e4m3(x.v[i]);
  }

  static Probe probe_init() { return {}; }
  static bool probe_found_nan(const Probe&) { return false; }
  static void probe_bytes(Probe&, const uint8_t*) {}
  static F load_e4m3_tiny(const uint8_t* src) {
    return map([&](int i) { return e4m3_values()[src[i]] * kTinyScale; });
  }
  static void convert_e4m3_row(const uint8_t* src, int len, float* dst) {
    const int padded = (len + 15) / 16 * 16;
    for (int i = 0; i < padded; ++i) dst[i] = i < len ? decode(src[i]) : 0.0f;
  }
  static void transpose_8x8(const float* src, int64_t src_stride, float* dst, int64_t dst_stride) {
    for (int i = 0; i < 8; ++i)
      for (int j = 0; j < 8; ++j) dst[j * dst_stride + i] = src[i * src_stride + j];
  }
  static float decode(uint8_t b) { return e4m3_values()[b] * (1.0f / kDecodeScale); }
};

Fp8Float wide_format(DType dtype) {
  return dtype == DType::f16    ? Fp8Float::f16
         : dtype == DType::bf16 ? Fp8Float::bf16
                                : Fp8Float::f32;
}

GroupQuantArgs args_of(const GroupQuantProblem& p) {
  GroupQuantArgs a;
  a.x = p.x.data();
  a.x_row_stride = p.x.stride(0);
  a.x_format = wide_format(p.x.dtype());
  a.q = p.q.data_as<uint8_t>();
  a.q_row_stride = p.q.stride(0);
  a.scales = p.scales.data();
  a.scale_row_stride = p.scale_at.row_stride;
  a.scale_group_stride = p.scale_at.group_stride;
  a.packed = p.scale_at.packed();
  a.rows = p.rows;
  a.cols = p.cols;
  a.groups = p.groups;
  a.group_size = p.group_size;
  a.ue8m0 = p.ue8m0;
  a.eps = p.eps;
  a.num_threads = p.num_threads;
  return a;
}

BlockGemmArgs args_of(const BlockGemmProblem& p) {
  BlockGemmArgs a;
  a.a = p.a.data_as<const uint8_t>();
  a.a_row_stride = p.a.stride(0);
  a.a_scales = p.a_scales.data();
  a.a_scale_row_stride = p.a_scale_at.row_stride;
  a.a_scale_group_stride = p.a_scale_at.group_stride;
  a.a_scales_packed = p.a_scale_at.packed();
  a.b = p.b.data_as<const uint8_t>();
  a.b_row_stride = p.b.stride(0);
  a.b_scales = p.b_scales.data();
  a.b_scale_row_stride = p.b_scales.stride(0);
  a.b_scale_col_stride = p.b_scales.stride(1);
  a.b_scales_bf16 = p.b_scales.dtype() == DType::bf16;
  if (p.has_bias()) {
    a.bias = p.bias.data();
    a.bias_stride = p.bias.stride(0);
    a.bias_format = wide_format(p.bias.dtype());
  }
  a.out = p.out.data();
  a.out_row_stride = p.out.stride(0);
  a.out_format = wide_format(p.out.dtype());
  a.m = p.m;
  a.n = p.n;
  a.k = p.k;
  a.num_threads = p.num_threads;
  return a;
}

BlockQuantizeWeightArgs args_of(const BlockQuantizeWeightProblem& p) {
  BlockQuantizeWeightArgs a;
  a.w = p.w.data();
  a.w_row_stride = p.w.stride(0);
  a.w_format = wide_format(p.w.dtype());
  a.weight = p.weight.data_as<uint8_t>();
  a.weight_row_stride = p.weight.stride(0);
  a.scales = p.weight_scale_inv.data_as<float>();
  a.scale_row_stride = p.weight_scale_inv.stride(0);
  a.scale_col_stride = p.weight_scale_inv.stride(1);
  a.n = p.n;
  a.k = p.k;
  a.num_threads = p.num_threads;
  return a;
}

// Why an ISA build cannot run here, or "".
template <Fp8Isa kIsa>
std::string isa_declines(Device device) {
  if (!device.is_cpu()) return "tensors are on " + device.str();
  if (kIsa == Fp8Isa::amx && !cpu_features().amx_bf16)
    return "CPU lacks amx_bf16 (AMX-TILE and AMX-BF16, enabled by the OS for this process)";
  if (kIsa == Fp8Isa::avx512bf16 && !cpu_features().avx512_bf16)
    return "CPU lacks avx512_bf16 (with avx512 f, bw, vl, dq)";
  if (kIsa == Fp8Isa::avx512 && !cpu_features().avx512) return "CPU lacks avx512 (f, bw, vl, dq)";
  if (kIsa == Fp8Isa::avx2 && !cpu_features().avx2) return "CPU lacks avx2 (with fma, f16c)";
  return "";
}

template <Fp8Isa kIsa>
void group_quant_kernel(const GroupQuantArgs& a) {
  if constexpr (kIsa == Fp8Isa::avx512 || kIsa == Fp8Isa::avx512bf16 || kIsa == Fp8Isa::amx)
    group_quant_avx512(a);
  if constexpr (kIsa == Fp8Isa::avx2) group_quant_avx2(a);
  if constexpr (kIsa == Fp8Isa::portable) group_quant_portable(a);
}
constexpr uintptr_t kPanelAlign = 64;  // the AMX panel's tile rows on whole cache lines
void* align_panel(void* bytes) {
  const auto address = reinterpret_cast<uintptr_t>(bytes);
  return reinterpret_cast<void*>((address + kPanelAlign - 1) & ~(kPanelAlign - 1));
}

// `workspace`: the caller's (block_fp8_gemm_workspace_size), or null. The AMX kernel decodes the
// activations into it once; without one (or one too small) it allocates its own for the call.
template <Fp8Isa kIsa>
void block_gemm_kernel(const BlockGemmArgs& a, [[maybe_unused]] void* workspace,
                       [[maybe_unused]] size_t workspace_bytes) {
  if constexpr (kIsa == Fp8Isa::amx) {
    const size_t least = static_cast<size_t>(block_gemm_amx_workspace_bytes(a.m, a.n, a.k, 1));
    if (workspace != nullptr && workspace_bytes >= least + kPanelAlign) {
      block_gemm_amx(a, align_panel(workspace),
                     static_cast<int64_t>(workspace_bytes - kPanelAlign));
    } else {  // uninitialized: the kernel writes all it reads
      const int threads = a.num_threads > 0 ? a.num_threads : omp_get_max_threads();
      const auto bytes = block_gemm_amx_workspace_bytes(a.m, a.n, a.k, threads);
      const std::unique_ptr<uint8_t[]> own(new uint8_t[static_cast<size_t>(bytes) + kPanelAlign]);
      block_gemm_amx(a, align_panel(own.get()), bytes);
    }
  }
  if constexpr (kIsa == Fp8Isa::avx512bf16) block_gemm_avx512bf16(a);
  if constexpr (kIsa == Fp8Isa::avx512) block_gemm_avx512(a);
  if constexpr (kIsa == Fp8Isa::avx2) block_gemm_avx2(a);
  if constexpr (kIsa == Fp8Isa::portable) block_gemm_portable(a);
}

}  // namespace

void group_quant_portable(const GroupQuantArgs& args) { run_group_quant<Portable>(args); }
void block_gemm_portable(const BlockGemmArgs& args) { run_block_gemm<Portable>(args); }
void block_quantize_weight_portable(const BlockQuantizeWeightArgs& args) {
  run_block_quantize_weight<Portable>(args);
}
void divide_to_e4m3_portable(const float* x, int64_t n, float divisor, uint8_t* q) {
  WideRun<Portable, Fp8Float::f32>::quantize(x, n, divisor, q);
}

void divide_to_e4m3(Fp8Isa isa, const float* x, int64_t n, float divisor, uint8_t* q) {
  switch (isa) {
    case Fp8Isa::avx512:
    case Fp8Isa::avx512bf16:
    case Fp8Isa::amx:
      return divide_to_e4m3_avx512(x, n, divisor, q);
    case Fp8Isa::avx2:
      return divide_to_e4m3_avx2(x, n, divisor, q);
    case Fp8Isa::portable:
      return divide_to_e4m3_portable(x, n, divisor, q);
  }
}

void silu_and_mul_rows(Fp8Isa isa, const float* x, int64_t rows, int64_t cols, float* y) {
  GatedRowsArgs a;
  a.x = x;
  a.x_row_stride = 2 * cols;
  a.x_format = Fp8Float::f32;
  a.y = y;
  a.rows = rows;
  a.cols = cols;
  switch (isa) {
    case Fp8Isa::avx512:
    case Fp8Isa::avx512bf16:
    case Fp8Isa::amx:
      return gated_rows_avx512(a);
    case Fp8Isa::avx2:
      return gated_rows_avx2(a);
    case Fp8Isa::portable:
      for (int64_t i = 0; i < rows * cols; ++i)
        y[i] = silu_and_mul_f32(x[i / cols * 2 * cols + i % cols],
                                x[i / cols * 2 * cols + cols + i % cols]);
  }
}

template <Fp8Isa kIsa>
std::string fp8_supports(const GroupQuantProblem& p) {
  return isa_declines<kIsa>(p.x.device());
}
namespace {
// The bf16 and AMX kernels are the packed GEMM only: the streaming kernel (avx512) serves small M.
template <Fp8Isa kIsa>
std::string packed_declines_small_m(int64_t m) {
  if constexpr (kIsa == Fp8Isa::avx512bf16 || kIsa == Fp8Isa::amx) {
    const int least = kIsa == Fp8Isa::amx ? kAmxMinM : kBf16MinM;
    if (m < least)
      return "M < " + std::to_string(least) + ": the streaming kernel of cpu.avx512 is faster";
  }
  return "";
}
}  // namespace

template <Fp8Isa kIsa>
std::string fp8_supports(const BlockGemmProblem& p) {
  std::string why = isa_declines<kIsa>(p.a.device());
  return why.empty() ? packed_declines_small_m<kIsa>(p.m) : why;
}
template <Fp8Isa kIsa>
std::string fp8_supports(const W8a8LinearProblem& p) {
  std::string why = isa_declines<kIsa>(p.quant.x.device());
  return why.empty() ? packed_declines_small_m<kIsa>(p.gemm.m) : why;
}
template <Fp8Isa kIsa>
std::string fp8_supports(const BlockQuantizeWeightProblem& p) {
  return isa_declines<kIsa>(p.w.device());
}

template <Fp8Isa kIsa>
void per_token_group_quant_fp8(const GroupQuantProblem& p) {
  if (p.gated) {  // silu(gate) * up first, rows over the threads (not fused here yet)
    Tensor activations;
    const GroupQuantProblem plain = plain_over(p, activations);
    GatedRowsArgs rows;
    rows.x = p.x.data();
    rows.x_row_stride = p.x.stride(0);
    rows.x_format = wide_format(p.x.dtype());
    rows.y = activations.data_as<float>();
    rows.rows = p.rows;
    rows.cols = p.cols;
    rows.num_threads = p.num_threads;
    if constexpr (kIsa == Fp8Isa::avx512 || kIsa == Fp8Isa::avx512bf16 || kIsa == Fp8Isa::amx)
      gated_rows_avx512(rows);
    if constexpr (kIsa == Fp8Isa::avx2) gated_rows_avx2(rows);
    if constexpr (kIsa == Fp8Isa::portable) {
      const int threads = thread_count(p.num_threads, p.rows, 40.0 * p.rows * p.cols);
#pragma omp parallel for num_threads(threads) schedule(static)
      for (int64_t m = 0; m < p.rows; ++m) gated_row(p, m, rows.y + m * p.cols);
    }
    group_quant_kernel<kIsa>(args_of(plain));
    return;
  }
  group_quant_kernel<kIsa>(args_of(p));
}
template <Fp8Isa kIsa>
void block_fp8_gemm(const BlockGemmProblem& p) {
  block_gemm_kernel<kIsa>(args_of(p), p.workspace, p.workspace_bytes);
}
template <Fp8Isa kIsa>
void w8a8_block_fp8_linear(const W8a8LinearProblem& p) {
  group_quant_kernel<kIsa>(args_of(p.quant));
  block_gemm_kernel<kIsa>(args_of(p.gemm), p.gemm.workspace, p.gemm.workspace_bytes);
}
template <Fp8Isa kIsa>
void block_quantize_weight(const BlockQuantizeWeightProblem& p) {
  const BlockQuantizeWeightArgs a = args_of(p);
  if constexpr (kIsa == Fp8Isa::avx512) block_quantize_weight_avx512(a);
  if constexpr (kIsa == Fp8Isa::avx2) block_quantize_weight_avx2(a);
  if constexpr (kIsa == Fp8Isa::portable) block_quantize_weight_portable(a);
}

size_t block_gemm_workspace_size(int64_t m, int64_t n, int64_t k) {
  if (!cpu_features().amx_bf16 || m < kAmxMinM || n == 0 || k == 0) return 0;
  const int threads = omp_get_max_threads();
  return static_cast<size_t>(block_gemm_amx_workspace_bytes(m, n, k, threads)) + kPanelAlign;
}

#define MOEKIT_FP8_CPU_INSTANTIATE(isa)                                      \
  template std::string fp8_supports<isa>(const GroupQuantProblem&);          \
  template std::string fp8_supports<isa>(const BlockGemmProblem&);           \
  template std::string fp8_supports<isa>(const W8a8LinearProblem&);          \
  template std::string fp8_supports<isa>(const BlockQuantizeWeightProblem&); \
  template void per_token_group_quant_fp8<isa>(const GroupQuantProblem&);    \
  template void block_fp8_gemm<isa>(const BlockGemmProblem&);                \
  template void w8a8_block_fp8_linear<isa>(const W8a8LinearProblem&);        \
  template void block_quantize_weight<isa>(const BlockQuantizeWeightProblem&);
MOEKIT_FP8_CPU_INSTANTIATE(Fp8Isa::portable)
MOEKIT_FP8_CPU_INSTANTIATE(Fp8Isa::avx2)
MOEKIT_FP8_CPU_INSTANTIATE(Fp8Isa::avx512)
#undef MOEKIT_FP8_CPU_INSTANTIATE
#define MOEKIT_FP8_CPU_INSTANTIATE_GEMMS(isa)                       \
  template std::string fp8_supports<isa>(const BlockGemmProblem&);  \
  template std::string fp8_supports<isa>(const W8a8LinearProblem&); \
  template void block_fp8_gemm<isa>(const BlockGemmProblem&);       \
  template void w8a8_block_fp8_linear<isa>(const W8a8LinearProblem&);
MOEKIT_FP8_CPU_INSTANTIATE_GEMMS(Fp8Isa::avx512bf16)
MOEKIT_FP8_CPU_INSTANTIATE_GEMMS(Fp8Isa::amx)
#undef MOEKIT_FP8_CPU_INSTANTIATE_GEMMS

}  // namespace moekit::cpu
