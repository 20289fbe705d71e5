// GPU FP8 quantization (spec/fp8.md): per_token_group_quant_fp8 and block_quantize_weight, with
// bytes and scales equal to the reference's. Each value is computed as the reference computes it:
// amax in f32 with NaN ignored (fmaxf), the scale by a true f32 division, q = e4m3(x / scale) from
// the correctly rounded f32 quotient (never a plain reciprocal multiply: see divide_fast), rounded
// to nearest even with saturation (vendor::e4m3x2_from_floats). Only the sign of a NaN byte may
// differ (hardware writes 0x7f).
//
// Group quantization is memory-bound. A lane takes 8 consecutive elements (one 16-byte load for
// 16-bit x, two for f32) and the group_size / 8 lanes of a group (2..32) reduce their amax with
// shuffles. A warp takes "units" of a row: 4 runs of 256 elements, covering at least 4 whole
// groups, so that a packed UE8M0 word (4 groups) is assembled in shared memory and written whole
// by one lane (no read-modify-write). The grid is a few blocks per SM and each warp walks its units
// as a pipeline: the next unit's loads are issued before the current one is quantized, so every
// warp always has a unit of bytes in flight.
#include <algorithm>
#include <cstdint>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "gpu/fp8_gpu.h"
#include "gpu/gpu_check.h"
#include "gpu/gpu_runtime.h"
#include "gpu/vendor.h"

namespace moekit::gpu {
namespace {

enum class Wide : int { f32, f16, bf16 };  // the element types x and w may have

constexpr int kChunk = 8;                       // elements per lane per pass
constexpr int kPassElements = kLanes * kChunk;  // 256
constexpr int kPasses = 4;                      // passes per unit
constexpr int kUnitElements = kPasses * kPassElements;
constexpr int kQuantWarps = 8;  // warps per block
constexpr int kQuantThreads = kQuantWarps * kLanes;
constexpr int kQuantBlocksPerSm = 4;  // grid: warps walk many units each (a pipeline)

// One group quantization call, by value (graph-capturable).
struct GroupQuantArgs {
  const void* x;
  int64_t x_row_stride;  // elements
  uint8_t* q;
  int64_t q_row_stride;
  void* scales;  // f32, or i32 words when packed
  int64_t scale_row_stride;
  int64_t scale_group_stride;  // packed: between words
  bool packed;
  int64_t rows, cols, groups;  // the last group may be partial
  int64_t units_per_row, units;
  float eps;
  bool ue8m0;
  bool x_vectors;  // x rows allow 16-byte loads
  bool q_vectors;  // q rows allow 8-byte stores
};

struct WeightQuantArgs {
  const void* w;
  int64_t w_row_stride;
  uint8_t* weight;
  int64_t weight_row_stride;
  float* scales;
  int64_t scale_row_stride, scale_col_stride;
  int64_t n, k;
  bool w_vectors, weight_vectors;
};

// ---- Loads and stores of 8-element chunks.

// The bits of 8 consecutive elements: 8 f32 words, or 4 words of 16-bit pairs (low half first).
template <Wide kType>
struct RawChunk {
  uint32_t w[kType == Wide::f32 ? 8 : 4];
};

// Elements [first, first + 8) of base; those at or past `count` are 0. Vector loads when allowed
// (first is a multiple of 8, so the chunk is then 16-byte aligned).
template <Wide kType>
__device__ __forceinline__ RawChunk<kType> load_raw(const void* base, int64_t first, int64_t count,
                                                    bool vectors) {
  RawChunk<kType> r;
  if constexpr (kType == Wide::f32) {
    const auto* words = static_cast<const unsigned int*>(base) + first;
    if (vectors && count >= kChunk) {
      const uint4 lo = __ldg(reinterpret_cast<const uint4*>(words));
      const uint4 hi = __ldg(reinterpret_cast<const uint4*>(words) + 1);
      r.w[0] = lo.x, r.w[1] = lo.y, r.w[2] = lo.z, r.w[3] = lo.w;
      r.w[4] = hi.x, r.w[5] = hi.y, r.w[6] = hi.z, r.w[7] = hi.w;
    } else {
#pragma unroll
      for (int j = 0; j < kChunk; ++j) r.w[j] = j < count ? __ldg(words + j) : 0u;
    }
  } else {
    const auto* halves = static_cast<const unsigned short*>(base) + first;
    if (vectors && count >= kChunk) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(halves));
      r.w[0] = v.x, r.w[1] = v.y, r.w[2] = v.z, r.w[3] = v.w;
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t lo = 2 * j < count ? __ldg(halves + 2 * j) : 0u;
        const uint32_t hi = 2 * j + 1 < count ? __ldg(halves + 2 * j + 1) : 0u;
        r.w[j] = lo | (hi << 16);
      }
    }
  }
  return r;
}

template <Wide kType>
__device__ __forceinline__ void decode_raw(const RawChunk<kType>& r, float (&v)[kChunk]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if constexpr (kType == Wide::f32) {
      v[2 * j] = __uint_as_float(r.w[2 * j]);
      v[2 * j + 1] = __uint_as_float(r.w[2 * j + 1]);
    } else if constexpr (kType == Wide::bf16) {
      v[2 * j] = __uint_as_float(r.w[j] << 16);
      v[2 * j + 1] = __uint_as_float(r.w[j] & 0xffff0000u);
    } else {
      v[2 * j] = vendor::half_bits_to_float(static_cast<uint16_t>(r.w[j]));
      v[2 * j + 1] = vendor::half_bits_to_float(static_cast<uint16_t>(r.w[j] >> 16));
    }
  }
}

template <Wide kType>
__device__ __forceinline__ void load_chunk(const void* base, int64_t first, int64_t count,
                                           bool vectors, float (&v)[kChunk]) {
  decode_raw<kType>(load_raw<kType>(base, first, count, vectors), v);
}

// Writes the 8 bytes (lo: bytes 0-3, hi: 4-7) at base[first..], only those before `count`.
__device__ __forceinline__ void store_chunk(uint8_t* base, int64_t first, int64_t count,
                                            bool vectors, uint32_t lo, uint32_t hi) {
  if (vectors && count >= kChunk) {
    *reinterpret_cast<uint2*>(base + first) = make_uint2(lo, hi);
    return;
  }
#pragma unroll
  for (int j = 0; j < kChunk; ++j)
    if (j < count) base[first + j] = static_cast<uint8_t>((j < 4 ? lo : hi) >> (8 * (j % 4)));
}

__device__ __forceinline__ float max_abs(const float (&v)[kChunk]) {
  float amax = 0.0f;  // fmaxf ignores a NaN operand, as std::max(amax, |x|) does
#pragma unroll
  for (int j = 0; j < kChunk; ++j) amax = fmaxf(amax, fabsf(v[j]));
  return amax;
}

// x / scale, the f32 division rounded to nearest, computed as CUDA's own division (div.rn.f32)
// computes it: a refined reciprocal r of the divisor, q = x * r, then q += (x - scale * q) * r.
// That sequence is exact whenever the operands pass its range check (FCHK, else a slow path);
// here the divisor's half runs once per group, and the range holds by construction: a scale in
// [2^-60, 2^60] and |x| >= 2^-80 keep x, scale and the quotient far from overflow and underflow.
// A smaller |x| makes |x / scale| < 2^-20, whose e4m3 byte is a zero of x's sign whatever the f32
// quotient, and x * 0 is that zero. Any other scale divides with __fdiv_rn itself.
struct GroupDivisor {
  float scale, reciprocal;
  bool fast;
};

__device__ __forceinline__ GroupDivisor divisor_for(float scale) {
  const float approximate = __fdividef(1.0f, scale);  // the hardware reciprocal (rcp.approx)
  GroupDivisor d;
  d.scale = scale;
  d.reciprocal = __fmaf_rn(approximate, __fmaf_rn(approximate, -scale, 1.0f), approximate);
  d.fast = scale >= 0x1p-60f && scale <= 0x1p60f;
  return d;
}

__device__ __forceinline__ float divide_fast(float x, const GroupDivisor& d) {
  const float q = __fmaf_rn(x, d.reciprocal, 0.0f);
  const float corrected = __fmaf_rn(d.reciprocal, __fmaf_rn(q, -d.scale, x), q);
  return fabsf(x) < 0x1p-80f ? x * 0.0f : corrected;
}

// e4m3(v / scale) for the 8 values, true divisions, as two words of bytes.
__device__ __forceinline__ void quantize_chunk(const float (&v)[kChunk], const GroupDivisor& d,
                                               uint32_t& lo, uint32_t& hi) {
  float q[kChunk];
  if (d.fast) {
#pragma unroll
    for (int j = 0; j < kChunk; ++j) q[j] = divide_fast(v[j], d);
  } else {
#pragma unroll
    for (int j = 0; j < kChunk; ++j) q[j] = __fdiv_rn(v[j], d.scale);
  }
  uint32_t pairs[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) pairs[j] = vendor::e4m3x2_from_floats(q[2 * j], q[2 * j + 1]);
  lo = pairs[0] | (pairs[1] << 16);
  hi = pairs[2] | (pairs[3] << 16);
}

// Steps 1-2 of the contract, exactly as reference::group_scale.
__device__ __forceinline__ float group_scale(float amax, float eps, bool ue8m0) {
  const float scale = __fdiv_rn(fmaxf(amax, eps), kFp8E4m3Max);
  if (!ue8m0) return scale;
  const uint32_t bits = __float_as_uint(scale);
  const uint32_t exponent = bits >> 23, mantissa = bits & 0x7fffffu;
  if (mantissa == 0) return scale;  // a power of two already (or inf)
  // A subnormal's power of two above it is its mantissa's: 1 << ceil(log2(mantissa)).
  if (exponent == 0) return __uint_as_float(1u << (32 - __clz(mantissa - 1)));
  return __uint_as_float((exponent + 1) << 23);
}

// ---- per_token_group_quant_fp8

template <Wide kType, int kGroupSize>
__global__ void __launch_bounds__(kQuantThreads) group_quant_kernel(const GroupQuantArgs a) {
  constexpr int kGroupLanes = kGroupSize / kChunk;         // 2..32, a power of two
  constexpr int kUnitGroups = kUnitElements / kGroupSize;  // 4..64, a multiple of 4
  constexpr int kPassGroups = kPassElements / kGroupSize;  // 1..16
  static_assert(kUnitGroups % 4 == 0 && kUnitGroups / 4 <= kLanes, "unit of whole words");
  __shared__ uint32_t exponent_words[kQuantWarps][kUnitGroups / 4];

  const int lane = vendor::lane_id();
  const int warp = static_cast<int>(threadIdx.x) / kLanes;
  auto* exponent_bytes = reinterpret_cast<uint8_t*>(exponent_words[warp]);
  const int64_t warps_in_grid = static_cast<int64_t>(gridDim.x) * kQuantWarps;
  auto load_unit = [&](int64_t unit, RawChunk<kType>(&raw)[kPasses]) {
    const int64_t row = unit / a.units_per_row;
    const int64_t first = (unit % a.units_per_row) * kUnitElements + lane * kChunk;
#pragma unroll
    for (int p = 0; p < kPasses; ++p) {
      const int64_t col = first + p * kPassElements;
      raw[p] = load_raw<kType>(a.x, row * a.x_row_stride + col, a.cols - col, a.x_vectors);
    }
  };

  int64_t unit = static_cast<int64_t>(blockIdx.x) * kQuantWarps + warp;
  RawChunk<kType> raw[kPasses];
  if (unit < a.units) load_unit(unit, raw);
  for (; unit < a.units; unit += warps_in_grid) {
    // The next unit's bytes are on their way while this one is quantized.
    RawChunk<kType> next[kPasses];  // past the last unit: this unit's bytes again (unused)
    load_unit(unit + warps_in_grid < a.units ? unit + warps_in_grid : unit, next);

    const int64_t row = unit / a.units_per_row;
    const int64_t unit_start = (unit % a.units_per_row) * kUnitElements;
    const int64_t q_row = row * a.q_row_stride;
#pragma unroll
    for (int p = 0; p < kPasses; ++p) {
      float v[kChunk];
      decode_raw<kType>(raw[p], v);
      float amax = max_abs(v);
#pragma unroll
      for (int offset = 1; offset < kGroupLanes; offset <<= 1)
        amax = fmaxf(amax, vendor::shfl_xor(amax, offset));
      const float scale = group_scale(amax, a.eps, a.ue8m0);
      const int64_t col = unit_start + p * kPassElements + lane * kChunk;
      uint32_t lo, hi;
      quantize_chunk(v, divisor_for(scale), lo, hi);
      store_chunk(a.q, q_row + col, a.cols - col, a.q_vectors, lo, hi);

      const int64_t group = col / kGroupSize;
      if (lane % kGroupLanes == 0) {  // the group's first lane writes its scale
        if (a.packed) {
          // Exponent byte of the scale (a power of two); groups past the last are 0.
          exponent_bytes[p * kPassGroups + lane / kGroupLanes] =
              group < a.groups ? static_cast<uint8_t>(__float_as_uint(scale) >> 23) : 0;
        } else if (group < a.groups) {
          static_cast<float*>(a.scales)[row * a.scale_row_stride + group * a.scale_group_stride] =
              scale;
        }
      }
    }
    if (a.packed) {
      vendor::sync_lanes();
      const int64_t word = unit_start / kGroupSize / 4 + lane;
      if (lane < kUnitGroups / 4 && 4 * word < a.groups)
        static_cast<uint32_t*>(a.scales)[row * a.scale_row_stride + word * a.scale_group_stride] =
            exponent_words[warp][lane];
      vendor::sync_lanes();  // the words are rewritten by this warp's next unit
    }
#pragma unroll
    for (int p = 0; p < kPasses; ++p) raw[p] = next[p];
  }
}

using GroupQuantKernel = void (*)(GroupQuantArgs);

template <Wide kType>
GroupQuantKernel group_quant_kernel_for(int group_size) {
  switch (group_size) {
    case 16:
      return group_quant_kernel<kType, 16>;
    case 32:
      return group_quant_kernel<kType, 32>;
    case 64:
      return group_quant_kernel<kType, 64>;
    case 128:
      return group_quant_kernel<kType, 128>;
    case 256:
      return group_quant_kernel<kType, 256>;
    default:
      return nullptr;
  }
}

// Blocks of `kernel` (with `threads` threads) resident on one SM of `device`, cached.
int resident_blocks(const void* kernel, int threads, int device) {
  static std::mutex mutex;
  static std::vector<std::tuple<const void*, int, int, int>> known;
  const std::lock_guard<std::mutex> lock(mutex);
  for (const auto& [k, t, d, blocks] : known)
    if (k == kernel && t == threads && d == device) return blocks;
  int blocks = 0;
  MOEKIT_GPU_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, 0));
  blocks = std::max(blocks, 1);
  known.emplace_back(kernel, threads, device, blocks);
  return blocks;
}

// ---- block_quantize_weight: one block of 256 threads per 128 x 128 tile of w. Thread t takes
// the 8 columns 8 * (t % 16) of rows t / 16 + 16 i, i < 8 (all 64 values stay in registers).

constexpr int kWeightBlock = kFp8BlockSize;
constexpr int kWeightThreads = 256;
constexpr int kWeightRowsPerPass = kWeightThreads / (kWeightBlock / kChunk);  // 16
constexpr int kWeightPasses = kWeightBlock / kWeightRowsPerPass;              // 8

template <Wide kType>
__global__ void __launch_bounds__(kWeightThreads) block_quantize_kernel(const WeightQuantArgs a) {
  __shared__ float warp_amax[kWeightThreads / kLanes];
  const int64_t row_block = blockIdx.y, col_block = blockIdx.x;
  const int t = static_cast<int>(threadIdx.x);
  const int64_t col = col_block * kWeightBlock + (t % (kWeightBlock / kChunk)) * kChunk;
  const int64_t first_row = row_block * kWeightBlock + t / (kWeightBlock / kChunk);

  float v[kWeightPasses][kChunk];
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < kWeightPasses; ++i) {
    const int64_t row = first_row + i * kWeightRowsPerPass;
    load_chunk<kType>(a.w, row * a.w_row_stride + col, row < a.n ? a.k - col : 0, a.w_vectors,
                      v[i]);
    amax = fmaxf(amax, max_abs(v[i]));
  }
#pragma unroll
  for (int offset = 1; offset < kLanes; offset <<= 1)
    amax = fmaxf(amax, vendor::shfl_xor(amax, offset));
  if (vendor::lane_id() == 0) warp_amax[t / kLanes] = amax;
  __syncthreads();
  amax = 0.0f;
#pragma unroll
  for (int w = 0; w < kWeightThreads / kLanes; ++w) amax = fmaxf(amax, warp_amax[w]);
  const float scale = __fdiv_rn(fmaxf(amax, kWeightAmaxFloor), kFp8E4m3Max);
  const GroupDivisor divisor = divisor_for(scale);

#pragma unroll
  for (int i = 0; i < kWeightPasses; ++i) {
    const int64_t row = first_row + i * kWeightRowsPerPass;
    if (row >= a.n) break;
    uint32_t lo, hi;
    quantize_chunk(v[i], divisor, lo, hi);
    store_chunk(a.weight, row * a.weight_row_stride + col, a.k - col, a.weight_vectors, lo, hi);
  }
  if (t == 0) a.scales[row_block * a.scale_row_stride + col_block * a.scale_col_stride] = scale;
}

// ---- Host side.

bool aligned(const void* data, int64_t row_stride_bytes, int64_t rows, int bytes) {
  return reinterpret_cast<uintptr_t>(data) % bytes == 0 &&
         (rows <= 1 || row_stride_bytes % bytes == 0);
}

Wide wide_of(DType dtype) {
  return dtype == DType::f32 ? Wide::f32 : dtype == DType::f16 ? Wide::f16 : Wide::bf16;
}

std::string not_on_gpu(const TensorView& t) {
  return t.device().is_gpu() ? "" : "tensors are on " + t.device().str() + ", not on a GPU";
}

std::string wide_dtype_reason(const char* name, const TensorView& t) {
  const DType d = t.dtype();
  if (d == DType::f32 || d == DType::f16 || d == DType::bf16) return "";
  return std::string(name) + ".dtype " + std::string(dtype_name(d)) + " is not f32, f16 or bf16";
}

std::string inner_stride_reason(const char* name, const TensorView& t) {
  if (t.ndim() != 2 || t.size(1) <= 1 || t.stride(1) == 1) return "";
  return std::string(name) + " rows are not contiguous (inner stride " +
         std::to_string(t.stride(1)) + ")";
}

}  // namespace

std::string group_quant_supports(const GroupQuantProblem& p) {
  if (std::string why = not_on_gpu(p.x); !why.empty()) return why;
  const int g = p.group_size;
  if (g != 16 && g != 32 && g != 64 && g != 128 && g != 256)
    return "group_size=" + std::to_string(g) + " is not 16, 32, 64, 128 or 256";
  if (std::string why = wide_dtype_reason("x", p.x); !why.empty()) return why;
  if (p.q.dtype() != DType::f8e4m3) return "q is not f8e4m3";
  if (std::string why = inner_stride_reason("x", p.x); !why.empty()) return why;
  if (std::string why = inner_stride_reason("q", p.q); !why.empty()) return why;
  return "";
}

void per_token_group_quant_fp8(const GroupQuantProblem& p) {
  if (p.rows == 0 || p.cols == 0) return;
  GroupQuantKernel kernel = nullptr;
  switch (wide_of(p.x.dtype())) {
    case Wide::f32:
      kernel = group_quant_kernel_for<Wide::f32>(p.group_size);
      break;
    case Wide::f16:
      kernel = group_quant_kernel_for<Wide::f16>(p.group_size);
      break;
    case Wide::bf16:
      kernel = group_quant_kernel_for<Wide::bf16>(p.group_size);
      break;
  }
  if (kernel == nullptr)
    fail("per_token_group_quant_fp8", "group_size", std::to_string(p.group_size),
         "is not served by the gpu kernel (16, 32, 64, 128 or 256)");

  GroupQuantArgs a{};
  a.x = p.x.data();
  a.x_row_stride = p.x.stride(0);
  a.q = static_cast<uint8_t*>(p.q.data());
  a.q_row_stride = p.q.stride(0);
  a.scales = p.scales.data();
  a.scale_row_stride = p.scale_at.row_stride;
  a.scale_group_stride = p.scale_at.group_stride;
  a.packed = p.scale_at.packed();
  a.rows = p.rows;
  a.cols = p.cols;
  a.groups = p.groups;
  a.units_per_row = fp8::ceil_div(p.cols, kUnitElements);
  a.units = p.rows * a.units_per_row;
  a.eps = p.eps;
  a.ue8m0 = p.ue8m0;
  const auto x_size = static_cast<int64_t>(dtype_size(p.x.dtype()));
  a.x_vectors = aligned(a.x, a.x_row_stride * x_size, p.rows, 16);
  a.q_vectors = aligned(a.q, a.q_row_stride, p.rows, 8);

  const int device = p.x.device().index;
  DeviceGuard on_device(device);
  // As many blocks as fit at once (at most kQuantBlocksPerSm per SM): each warp then walks its
  // units as a pipeline, and no second wave leaves SMs idle at the end.
  const int64_t blocks_needed = fp8::ceil_div(a.units, kQuantWarps);
  const int per_sm =
      std::min(kQuantBlocksPerSm,
               resident_blocks(reinterpret_cast<const void*>(kernel), kQuantThreads, device));
  const int64_t block_cap = int64_t{device_properties(device).sm_count} * per_sm;
  const auto blocks = static_cast<unsigned>(std::min(blocks_needed, block_cap));
  MOEKIT_GPU_CHECK(vendor::launch(kernel, dim3(blocks), dim3(kQuantThreads), 0,
                                  static_cast<cudaStream_t>(p.stream), false, a));
}

std::string block_quantize_weight_supports(const BlockQuantizeWeightProblem& p) {
  if (std::string why = not_on_gpu(p.w); !why.empty()) return why;
  if (std::string why = wide_dtype_reason("w", p.w); !why.empty()) return why;
  if (p.weight.dtype() != DType::f8e4m3) return "weight is not f8e4m3";
  if (p.weight_scale_inv.dtype() != DType::f32) return "weight_scale_inv is not f32";
  if (std::string why = inner_stride_reason("w", p.w); !why.empty()) return why;
  if (std::string why = inner_stride_reason("weight", p.weight); !why.empty()) return why;
  if (fp8::ceil_div(p.n, kWeightBlock) > 65535)
    return "N=" + std::to_string(p.n) + " has more than 65535 row blocks";
  return "";
}

void block_quantize_weight(const BlockQuantizeWeightProblem& p) {
  if (p.n == 0 || p.k == 0) return;
  WeightQuantArgs a{};
  a.w = p.w.data();
  a.w_row_stride = p.w.stride(0);
  a.weight = static_cast<uint8_t*>(p.weight.data());
  a.weight_row_stride = p.weight.stride(0);
  a.scales = static_cast<float*>(p.weight_scale_inv.data());
  a.scale_row_stride = p.weight_scale_inv.stride(0);
  a.scale_col_stride = p.weight_scale_inv.stride(1);
  a.n = p.n;
  a.k = p.k;
  const auto w_size = static_cast<int64_t>(dtype_size(p.w.dtype()));
  a.w_vectors = aligned(a.w, a.w_row_stride * w_size, p.n, 16);
  a.weight_vectors = aligned(a.weight, a.weight_row_stride, p.n, 8);

  void (*kernel)(WeightQuantArgs) = nullptr;
  switch (wide_of(p.w.dtype())) {
    case Wide::f32:
      kernel = block_quantize_kernel<Wide::f32>;
      break;
    case Wide::f16:
      kernel = block_quantize_kernel<Wide::f16>;
      break;
    case Wide::bf16:
      kernel = block_quantize_kernel<Wide::bf16>;
      break;
  }
  const int device = p.w.device().index;
  DeviceGuard on_device(device);
  const dim3 grid(static_cast<unsigned>(fp8::ceil_div(p.k, kWeightBlock)),
                  static_cast<unsigned>(fp8::ceil_div(p.n, kWeightBlock)));
  MOEKIT_GPU_CHECK(vendor::launch(kernel, grid, dim3(kWeightThreads), 0,
                                  static_cast<cudaStream_t>(p.stream), false, a));
}

}  // namespace moekit::gpu
