// GPU FP8 quantization (spec/fp8.md): per_token_group_quant_fp8 and block_quantize_weight, with
// bytes and scales equal to the reference's. Each value is computed as the reference computes it:
// amax in f32 with NaN ignored (fmaxf), the scale by a true f32 division, q = e4m3(x / scale) from
// the correctly rounded f32 quotient (a plain reciprocal multiply only where it is exact, for a
// power-of-two scale: see with_divide), rounded to nearest even with saturation
// (vendor::e4m3x2_from_floats). Only the sign of a NaN byte may differ (hardware writes 0x7f).
//
// Group quantization is memory-bound. A warp takes "units" of a row: 1024 elements, covering at
// least 4 whole groups, so that a packed UE8M0 word (4 groups) is written whole by one lane (no
// read-modify-write). The grid is a few blocks per SM and each warp walks its units as a pipeline:
// the next unit's loads are issued before the current one is quantized, so every warp always has
// a unit of bytes in flight. Rows of whole units with 16-byte aligned x and q rows (every model
// shape with K a multiple of 1024) take the streaming kernel, which issues about 0.3 instructions
// per element (bf16, group 128; the general kernel about 0.7, issue-bound on an H200); anything
// else takes the general kernel: a lane takes 8 consecutive elements a pass (one 16-byte load for
// 16-bit x, two for f32), the group_size / 8 lanes of a group (2..32) reduce their amax with
// shuffles, bounds are checked per element, packed words are assembled in shared memory.
//
// silu_and_mul_group_quant_fp8 (gated) takes the general kernel, which then also computes
// y = silu(gate) * up from both halves (ops/silu_math.h's bits). It is bound by its ~50
// instructions per element, not by memory, so its units are one pass (256 elements; 2 or 4 for
// packed words of groups of 128 / 256) to spread small M over many warps, and rows of whole
// units run without per-element checks. Its masked form runs the same kernel once for all G
// groups, the counts read on the device; where the groups' capacity is large, its warps walk only
// the rows under the counts, so that the capacity costs no loads (GroupQuantArgs::live_walk).
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "core/env_switch.h"
#include "gpu/fp8_gpu.h"
#include "gpu/fp8_quant_math.cuh"
#include "gpu/gpu_check.h"
#include "gpu/gpu_runtime.h"
#include "gpu/vendor.h"
#include "ops/silu_math.h"

namespace moekit::gpu {
namespace {

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
  bool x_vectors;        // x rows allow 16-byte loads
  bool up_vectors;       // gated: the up halves allow 16-byte loads
  bool q_vectors;        // q rows allow 8-byte stores
  bool streaming_hints;  // streaming kernel: evict-first loads of x and stores of q (A/B knob)
  bool allow_first;      // the next kernel may launch before this one's wait (quant_allow_first)
  // The streaming kernel's walk: each warp advances `unit_step` units (a whole grid of warps) at
  // a time, `column_step` units along the row, or `column_step_wrapped` (< 0) when that passes
  // the row's end (column unit >= `wrap_from`) and one more row is crossed. The byte steps of the
  // x, q and scale pointers for either case.
  int64_t unit_step;
  int64_t row_step;  // the general kernel's walk: unit_step / units_per_row (and column_step)
  // The masked layout in one launch (general kernel): rows are G planes of plane_rows; plane g's
  // rows from min(max(masked_m[g], 0), plane_rows) on are neither quantized nor written, and its
  // scales start scale_plane_stride elements (words) after plane g - 1's. masked_m null: one
  // plane.
  const int32_t* masked_m;
  int64_t masked_m_stride;
  int plane_rows;
  int64_t scale_plane_stride;
  // Masked: the warps walk only the rows under the counts ("live" rows, looked up from the
  // counts: see live_rows), or all G x plane_rows rows, each row's x loaded beside its count and
  // skipped past it. The second takes one round trip after the wait where the first takes two
  // (the counts, then x), but loads every row's x: the host walks the live rows where that is
  // more than kMaskedLoadAllBytes.
  bool live_walk;
  int rounds;  // units the first warp quantizes (others as many, or one fewer)
  int column_step, column_step_wrapped, wrap_from;
  int64_t x_step, x_step_wrapped, q_step, q_step_wrapped, scale_step, scale_step_wrapped;
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

// Blocks per SM the unchecked gated kernels are compiled for (their registers): as many as fit
// without spilling (ptxas), fewer for more passes and for f32 x (twice the raw words). Their
// long dependent chains want many warps, but 5 blocks of the one-pass 16-bit kernel (12-16 bytes
// of spills) were 4 % slower than 4 on an H200 (docs/perf/fp8.md, session 31).
template <Wide kType, bool kGatedWhole, int kPasses>
constexpr int kGatedWholeBlocksPerSm = [] {
  if (!kGatedWhole) return 1;
  const int words = kPasses * (kType == Wide::f32 ? 2 : 1);
  return words == 1 ? 4 : words == 2 ? 3 : words == 4 ? 2 : 1;
}();

// The masked layout's "live" rows: the rows under the counts, plane after plane. Warp-collective
// (every lane the same `live`): returns the number of live rows and sets `row` to x's row of live
// row `live` (unchanged where live >= that number). Each plane's count is clamped to [0,
// plane_rows]. A warp reads the counts 128 at a time, every load of a batch in flight at once
// (after the wait each round trip is a first touch); the sum stays below 2^31 (host: G x M does).
__device__ __forceinline__ int live_rows(const GroupQuantArgs& a, int64_t live, int64_t& row) {
  constexpr int kLoads = 4;
  const int lane = vendor::lane_id();
  const int planes = static_cast<int>(a.rows / a.plane_rows);
  int before = 0;  // live rows of the planes before the batch's current 32
  for (int base = 0; base < planes; base += kLoads * kLanes) {
    int counts[kLoads];
#pragma unroll
    for (int j = 0; j < kLoads; ++j) {
      const int plane = base + j * kLanes + lane;
      counts[j] = plane < planes ? __ldg(a.masked_m + plane * a.masked_m_stride) : 0;
    }
#pragma unroll
    for (int j = 0; j < kLoads; ++j) {
      const int rows = min(max(counts[j], 0), a.plane_rows);
      int through = rows;  // live rows of this lane's plane and the lanes' before it
#pragma unroll
      for (int offset = 1; offset < kLanes; offset <<= 1) {
        const int below = vendor::shfl(through, max(lane - offset, 0));
        if (lane >= offset) through += below;
      }
      const int total = vendor::shfl(through, kLanes - 1);
      if (live >= before && live < before + total) {
        // The first lane whose planes reach past `live` holds it.
        const int at = vendor::lowest_lane(vendor::ballot(live < before + through));
        const int start = vendor::shfl(through - rows, at);
        row = int64_t{base + j * kLanes + at} * a.plane_rows + (live - before - start);
      }
      before += total;
    }
  }
  return before;
}

// ---- per_token_group_quant_fp8

// Waits for the kernel before (x is its output). allow_first (quant_allow_first): the next kernel
// may launch before that wait, not after it; it waits for this one's end before it touches
// memory, and meanwhile its CTAs take the SMs the previous kernel leaves.
__device__ __forceinline__ void wait_for_previous_kernel(bool allow_first) {
  if (allow_first) vendor::allow_next_grid();
  vendor::wait_for_previous_grid();
  if (!allow_first) vendor::allow_next_grid();
}

// kGated (silu_and_mul_group_quant_fp8): x rows hold gate then up halves of `cols` each, both
// loaded with the unit (and the next unit's ahead, as for plain x), and the kernel quantizes
// silu_and_mul_f32(gate, up). kPasses: passes of 256 elements per unit (4 for plain x; gated rows
// take the fewest that hold whole packed words, so that small M still spreads over many warps).
// kWhole: rows of whole units, x (both halves) and q 16-byte aligned: no bounds or alignment
// checks per element.
template <Wide kType, int kGroupSize, bool kGated, int kPasses, bool kWhole>
__global__ void __launch_bounds__(kQuantThreads,
                                  (kGatedWholeBlocksPerSm<kType, kGated && kWhole, kPasses>))
    group_quant_kernel(const GroupQuantArgs a) {
  constexpr int kUnit = kPasses * kPassElements;
  constexpr int kGroupLanes = kGroupSize / kChunk;  // 2..32, a power of two
  constexpr int kUnitGroups = kUnit / kGroupSize;   // whole words of 4 where scales are packed
  constexpr int kPassGroups = kPassElements / kGroupSize;  // 1..16
  static_assert(kGroupSize <= kPassElements, "a pass holds whole groups");
  __shared__ uint32_t exponent_words[kQuantWarps][kUnitGroups / 4 > 0 ? kUnitGroups / 4 : 1];

  // x is the previous kernel's output (launched overlapping it: see per_token_group_quant_fp8).
  wait_for_previous_kernel(a.allow_first);
  const int lane = vendor::lane_id();
  const int warp = static_cast<int>(threadIdx.x) / kLanes;
  auto* exponent_bytes = reinterpret_cast<uint8_t*>(exponent_words[warp]);
  const int64_t warps_in_grid = static_cast<int64_t>(gridDim.x) * kQuantWarps;
  // Elements of a row left from col (whole rows: every chunk is whole), and 16-byte loads.
  auto left = [&](int64_t col) { return kWhole ? int64_t{kChunk} : a.cols - col; };
  const bool x_vectors = kWhole || a.x_vectors, up_vectors = kWhole || a.up_vectors;
  const bool q_vectors = kWhole || a.q_vectors;
  // A warp's place: the row and column of its unit, advanced by the grid's step of units without
  // a division (the host sets row_step and column_step: the step's rows and the rest).
  struct Place {
    int64_t row;
    int column;  // units_per_row < 2^31: rows of fewer than 2^39 elements
  };
  const int units_per_row = static_cast<int>(a.units_per_row);
  auto advance = [&](Place at) {
    at.column += a.column_step;
    at.row += a.row_step;
    if (at.column >= units_per_row) at.column -= units_per_row, ++at.row;
    return at;
  };
  // raw: x's chunks (gated: gate's), up: gated, up's.
  auto load_unit = [&](Place at, RawChunk<kType>(&raw)[kPasses], RawChunk<kType>(&up)[kPasses]) {
    const int64_t first = int64_t{at.column} * kUnit + lane * kChunk;
#pragma unroll
    for (int p = 0; p < kPasses; ++p) {
      const int64_t col = first + p * kPassElements;
      const int64_t x_at = at.row * a.x_row_stride + col;
      raw[p] = load_raw<kType>(a.x, x_at, left(col), x_vectors);
      if constexpr (kGated) up[p] = load_raw<kType>(a.x, x_at + a.cols, left(col), up_vectors);
    }
  };
  // The row's first scale (its plane's storage, then the row in it), and whether it is skipped:
  // past its plane's count where the warps walk the capacity's rows (see live_walk).
  auto scale_row_of = [&](int64_t row, bool& skipped) {
    skipped = false;
    if (a.masked_m == nullptr) return row * a.scale_row_stride;
    const int plane = static_cast<int>(row) / a.plane_rows,
              m = static_cast<int>(row) % a.plane_rows;
    if (!a.live_walk)  // a negative count: 0 rows
      skipped = m >= __ldg(a.masked_m + plane * a.masked_m_stride);
    return plane * a.scale_plane_stride + m * a.scale_row_stride;
  };
  auto quantize_unit = [&](Place at, const RawChunk<kType>(&raw)[kPasses],
                           const RawChunk<kType>(&up)[kPasses]) {
    bool skipped;
    const int64_t scale_row = scale_row_of(at.row, skipped);
    if (skipped) return;  // the whole warp: a unit lies in one row
    const int64_t unit_start = int64_t{at.column} * kUnit;
    const int64_t q_row = at.row * a.q_row_stride;
#pragma unroll
    for (int p = 0; p < kPasses; ++p) {
      float v[kChunk];
      decode_raw<kType>(raw[p], v);
      if constexpr (kGated) {
        float u[kChunk];
        decode_raw<kType>(up[p], u);
        silu_and_mul_chunk(v, u);
      }
      uint32_t lo, hi;
      const float scale = quantize_group_chunk<kGroupLanes>(v, a.eps, a.ue8m0, lo, hi);
      const int64_t col = unit_start + p * kPassElements + lane * kChunk;
      store_chunk(a.q, q_row + col, left(col), q_vectors, lo, hi);

      const int64_t group = col / kGroupSize;
      if (lane % kGroupLanes == 0) {  // the group's first lane writes its scale
        if (a.packed) {
          // Exponent byte of the scale (a power of two); groups past the last are 0.
          exponent_bytes[p * kPassGroups + lane / kGroupLanes] =
              kWhole || group < a.groups ? static_cast<uint8_t>(__float_as_uint(scale) >> 23) : 0;
        } else if (kWhole || group < a.groups) {
          static_cast<float*>(a.scales)[scale_row + group * a.scale_group_stride] = scale;
        }
      }
    }
    if (a.packed) {
      vendor::sync_lanes();
      const int64_t word = unit_start / kGroupSize / 4 + lane;
      if (lane < kUnitGroups / 4 && (kWhole || 4 * word < a.groups))
        static_cast<uint32_t*>(a.scales)[scale_row + word * a.scale_group_stride] =
            exponent_words[warp][lane];
      vendor::sync_lanes();  // the words are rewritten by this warp's next unit
    }
  };

  // Walking the live rows: units are numbered over them only, and each unit's row is looked up
  // (a capacity of many rows per plane then costs nothing but the grid's idle warps).
  auto live_place = [&](int64_t live_unit, int64_t& units) {
    int64_t row = 0;
    units = int64_t{live_rows(a, live_unit / units_per_row, row)} * units_per_row;
    return Place{row, static_cast<int>(live_unit % units_per_row)};
  };
  int64_t unit = static_cast<int64_t>(blockIdx.x) * kQuantWarps + warp;
  int64_t units = a.units;
  Place at{unit / units_per_row, static_cast<int>(unit % units_per_row)};
  if (a.live_walk) at = live_place(unit, units);
  if (unit >= units) return;  // the whole warp
  RawChunk<kType> raw[kPasses], up[kPasses];
  load_unit(at, raw, up);
  for (;;) {
    // The next unit's bytes are on their way while this one is quantized (past the warp's last
    // unit: this unit's again, unused).
    const bool more = unit + warps_in_grid < units;
    Place next_at = at;
    if (more) next_at = a.live_walk ? live_place(unit + warps_in_grid, units) : advance(at);
    RawChunk<kType> next[kPasses], next_up[kPasses];
    load_unit(next_at, next, next_up);
    quantize_unit(at, raw, up);
    if (!more) return;
    unit += warps_in_grid;
    at = next_at;
#pragma unroll
    for (int p = 0; p < kPasses; ++p) {
      raw[p] = next[p];
      if constexpr (kGated) up[p] = next_up[p];
    }
  }
}

// ---- per_token_group_quant_fp8 over whole units (rows of multiples of 1024 elements, x and q
// rows 16-byte aligned): the same units, walked with fewer instructions per element. A lane takes
// 4 chunks of ONE group (two groups of 16 for the smallest size), so a group's amax needs fewer
// shuffles, and its scale and divisor are computed once per 32 (16) elements instead of 8: the
// group's kGroupSize / 32 lanes take its chunks in turn (lane t of a group of 128: chunks t, t + 4,
// t + 8, t + 12), so each 16-byte load instruction still reads whole 32-byte sectors. Each warp
// walks its units with pointer increments (no division), two buffers of raw chunks alternating:
// the next unit's loads are issued before the current one is quantized. Packed exponent words are
// assembled with shuffles.

// Rows whose length is a multiple of 512 or 256 but not of 1024 (the inputs of Qwen3's expert
// down projections: K = 768, 1536) take the same kernel with 2 or 1 chunks a lane, units of 512 or
// 256 elements, and more blocks per SM so that as many bytes stay in flight.
constexpr int kMaxLaneChunks = kUnitElements / (kLanes * kChunk);  // 4 chunks a lane per unit

// Blocks per SM the streaming kernel is compiled for (registers): 16-bit x keeps two units of raw
// chunks (32 registers at 4 chunks a lane) in 64; f32 x has twice the bytes. Smaller units need
// fewer registers, so more warps keep bytes in flight: as many as fit without spilling (ptxas).
template <Wide kType, int kLaneChunks>
constexpr int kStreamBlocksPerSm = kType == Wide::f32 ? (kLaneChunks == 4 ? 2 : 4)
                                   : kLaneChunks == 4 ? 4
                                   : kLaneChunks == 2 ? 5
                                                      : 6;

template <Wide kType>
__device__ __forceinline__ RawChunk<kType> load_aligned_chunk(const void* chunk, bool once) {
  RawChunk<kType> r;
  constexpr int kVectors = sizeof(r.w) / sizeof(uint4);
#pragma unroll
  for (int i = 0; i < kVectors; ++i) {
    const uint4* p = static_cast<const uint4*>(chunk) + i;
    const uint4 v = once ? vendor::load_once(p) : __ldg(p);
    r.w[4 * i] = v.x, r.w[4 * i + 1] = v.y, r.w[4 * i + 2] = v.z, r.w[4 * i + 3] = v.w;
  }
  return r;
}

template <Wide kType, int kGroupSize, int kLaneChunks>
__global__ void __launch_bounds__(kQuantThreads, (kStreamBlocksPerSm<kType, kLaneChunks>))
    group_quant_stream_kernel(const GroupQuantArgs a) {
  constexpr int kLaneElements = kLaneChunks * kChunk;  // 32, 16 or 8
  constexpr int kUnit = kLanes * kLaneElements;        // 1024, 512 or 256
  // A lane's chunks lie in one span: its group, or (groups smaller than its elements) its own.
  constexpr int kSpan = kGroupSize < kLaneElements ? kLaneElements : kGroupSize;
  constexpr int kSpanLanes = kSpan / kLaneElements;        // lanes sharing a span: 1..32
  constexpr int kLaneGroups = kSpan / kGroupSize;          // groups a lane holds: 1 (2 for 16)
  constexpr int kGroupChunks = kLaneChunks / kLaneGroups;  // a group's chunks in one lane
  constexpr int kChunkStride = kSpanLanes * kChunk;        // elements between a lane's chunks
  // Contiguous chunk pairs of a group: 16-byte stores.
  constexpr int kStoreChunks = kSpanLanes == 1 && kGroupChunks % 2 == 0 ? 2 : 1;
  constexpr int kUnitGroups = kUnit / kGroupSize;
  static_assert(kSpan <= kUnit && kGroupChunks >= 1, "a unit holds whole groups");
  constexpr int kWordLanes = 4 * kSpanLanes / kLaneGroups;  // lanes holding a packed word's groups
  constexpr int kElementBytes = kType == Wide::f32 ? 4 : 2;
  using Raw = RawChunk<kType>;

  wait_for_previous_kernel(a.allow_first);  // as in group_quant_kernel
  const int lane = vendor::lane_id();
  const int span = lane / kSpanLanes;
  const int first_group = span * kLaneGroups;  // in the unit
  const int exponent_shift = 8 * (first_group % 4);

  const int64_t unit =
      static_cast<int64_t>(blockIdx.x) * kQuantWarps + static_cast<int>(threadIdx.x) / kLanes;
  if (unit >= a.units) return;  // the whole warp
  // Units this warp quantizes: `rounds`, or one fewer for the warps past units % unit_step.
  int units_left = a.rounds - (unit + (a.rounds - 1) * a.unit_step >= a.units ? 1 : 0);
  const int64_t row = unit / a.units_per_row;
  int column_unit = static_cast<int>(unit - row * a.units_per_row);
  const int64_t first = int64_t{column_unit} * kUnit + span * kSpan + (lane % kSpanLanes) * kChunk;
  const char* x = static_cast<const char*>(a.x) + (row * a.x_row_stride + first) * kElementBytes;
  uint8_t* q = a.q + row * a.q_row_stride + first;
  const int64_t slot = a.packed ? int64_t{column_unit} * (kUnitGroups / 4) + lane / kWordLanes
                                : int64_t{column_unit} * kUnitGroups + first_group;
  char* scale = static_cast<char*>(a.scales) +
                (row * a.scale_row_stride + slot * a.scale_group_stride) * int64_t{sizeof(float)};

  auto load = [&](Raw(&raw)[kLaneChunks]) {
#pragma unroll
    for (int c = 0; c < kLaneChunks; ++c)
      raw[c] = load_aligned_chunk<kType>(x + c * kChunkStride * kElementBytes, a.streaming_hints);
  };
  // The values are decoded twice (for the amax, then chunk by chunk for the bytes): 64 registers
  // hold two units of raw chunks, not a unit of f32 values besides (see chunk_amax).
  auto quantize = [&](const Raw(&raw)[kLaneChunks]) {
    float scales[kLaneGroups];
    uint32_t exponents = 0;  // packed: this lane's exponent bytes where its word holds them
#pragma unroll
    for (int i = 0; i < kLaneGroups; ++i) {
      float amax = 0.0f;  // fmaxf ignores a NaN operand, as std::max(amax, |x|) does
#pragma unroll
      for (int c = i * kGroupChunks; c < (i + 1) * kGroupChunks; ++c)
        amax = chunk_amax<kType>(raw[c], amax);
#pragma unroll
      for (int offset = 1; offset < kSpanLanes; offset <<= 1)
        amax = fmaxf(amax, vendor::shfl_xor(amax, offset));
      scales[i] = group_scale(amax, a.eps, a.ue8m0);
      exponents |= (__float_as_uint(scales[i]) >> 23) << (exponent_shift + 8 * i);
    }
    if (a.packed) {
#pragma unroll
      for (int offset = kSpanLanes; offset < kWordLanes; offset <<= 1)
        exponents |= vendor::shfl_xor(exponents, offset);
      if (lane % kWordLanes == 0) *reinterpret_cast<uint32_t*>(scale) = exponents;
    } else if (lane % kSpanLanes == 0) {
#pragma unroll
      for (int i = 0; i < kLaneGroups; ++i)
        reinterpret_cast<float*>(scale)[i * a.scale_group_stride] = scales[i];
    }
#pragma unroll
    for (int i = 0; i < kLaneGroups; ++i) {
      with_divide(divisor_for(scales[i]), [&](auto divide) {
#pragma unroll
        for (int c = i * kGroupChunks; c < (i + 1) * kGroupChunks; c += kStoreChunks) {
          uint32_t words[2 * kStoreChunks];
#pragma unroll
          for (int k = 0; k < kStoreChunks; ++k) {
            float v[kChunk];
            decode_raw<kType>(raw[c + k], v);
            words[2 * k] = e4m3x4(divide(v[0]), divide(v[1]), divide(v[2]), divide(v[3]));
            words[2 * k + 1] = e4m3x4(divide(v[4]), divide(v[5]), divide(v[6]), divide(v[7]));
          }
          if constexpr (kStoreChunks == 2) {
            uint4* to = reinterpret_cast<uint4*>(q + c * kChunk);
            const uint4 bytes = make_uint4(words[0], words[1], words[2], words[3]);
            if (a.streaming_hints)
              vendor::store_once(to, bytes);
            else
              *to = bytes;
          } else
            *reinterpret_cast<uint2*>(q + c * kChunkStride) = make_uint2(words[0], words[1]);
        }
      });
    }
  };
  // Quantizes `current` while `next` receives the following unit; false after the warp's last.
  auto step = [&](const Raw(&current)[kLaneChunks], Raw(&next)[kLaneChunks]) {
    const bool more = --units_left > 0;
    const bool wrap = column_unit >= a.wrap_from;
    column_unit += wrap ? a.column_step_wrapped : a.column_step;
    const int64_t x_step = wrap ? a.x_step_wrapped : a.x_step;
    x += more ? x_step : 0;  // past the last unit: this unit's bytes again (unused)
    load(next);
    quantize(current);
    q += wrap ? a.q_step_wrapped : a.q_step;
    scale += wrap ? a.scale_step_wrapped : a.scale_step;
    return more;
  };
  Raw first_buffer[kLaneChunks], second_buffer[kLaneChunks];
  load(first_buffer);
  while (step(first_buffer, second_buffer) && step(second_buffer, first_buffer)) {
  }
}

using GroupQuantKernel = void (*)(GroupQuantArgs);

// The streaming kernel with `lane_chunks` chunks a lane (4, 2 or 1), or the general one (0). Gated
// problems take the general one with units of `gated_passes` passes, checked per element unless
// `whole`.
template <Wide kType, int kGroupSize>
GroupQuantKernel group_quant_kernel_of(int lane_chunks, bool gated, int gated_passes, bool whole) {
  if (gated) {
    if (!whole) return group_quant_kernel<kType, kGroupSize, true, kPasses, false>;
    if (gated_passes == 1) return group_quant_kernel<kType, kGroupSize, true, 1, true>;
    if constexpr (kGroupSize >= 128) {  // packed words of 4 groups need 2 or 4 passes
      if (gated_passes == 4 * kGroupSize / kPassElements)
        return group_quant_kernel<kType, kGroupSize, true, 4 * kGroupSize / kPassElements, true>;
    }
    return nullptr;
  }
  if constexpr (kGroupSize <= kLanes * kChunk) {  // units of 256 hold groups up to 256
    if (lane_chunks == 1) return group_quant_stream_kernel<kType, kGroupSize, 1>;
  }
  if (lane_chunks == 2) return group_quant_stream_kernel<kType, kGroupSize, 2>;
  if (lane_chunks == 4) return group_quant_stream_kernel<kType, kGroupSize, 4>;
  return group_quant_kernel<kType, kGroupSize, false, kPasses, false>;
}

template <Wide kType>
GroupQuantKernel group_quant_kernel_for(int group_size, int lane_chunks, bool gated,
                                        int gated_passes, bool whole) {
  switch (group_size) {
    case 16:
      return group_quant_kernel_of<kType, 16>(lane_chunks, gated, gated_passes, whole);
    case 32:
      return group_quant_kernel_of<kType, 32>(lane_chunks, gated, gated_passes, whole);
    case 64:
      return group_quant_kernel_of<kType, 64>(lane_chunks, gated, gated_passes, whole);
    case 128:
      return group_quant_kernel_of<kType, 128>(lane_chunks, gated, gated_passes, whole);
    case 256:
      return group_quant_kernel_of<kType, 256>(lane_chunks, gated, gated_passes, whole);
    default:
      return nullptr;
  }
}

// Chunks a lane of the streaming kernel takes for rows of `cols` elements: the largest unit
// (1024, 512 or 256 elements) that divides the row, holds whole groups, and for packed scales whole
// words of 4 groups (written by one lane, no read-modify-write); 0 when none does.
// MOEKIT_GPU_QUANT_SMALL_UNITS=0 keeps such rows on the general kernel (an A/B knob).
int stream_lane_chunks(int64_t cols, int group_size, bool packed) {
  static const int smallest = env::is("MOEKIT_GPU_QUANT_SMALL_UNITS", "0") ? kMaxLaneChunks : 1;
  for (int chunks = kMaxLaneChunks; chunks >= smallest; chunks /= 2) {
    const int64_t unit = int64_t{kLanes} * kChunk * chunks;
    if (cols % unit == 0 && unit >= group_size && (!packed || (unit / group_size) % 4 == 0))
      return chunks;
  }
  return 0;
}

// Blocks per SM the streaming kernel is launched with over units of 1024 elements: 2, fewer than
// the 4 that fit for 16-bit x (f32 x fits 2). Measured on an H200 (docs/perf/fp8.md, bf16 x
// [16384, 7168], group 128): 4 blocks 96.1 us, 3 blocks 97.1, 2 blocks 87.0 (row-major scales;
// packed UE8M0 alike). Half the warps keep half the bytes queued at the memory system, which
// serves them more efficiently; the ceiling of moving the same bytes with 4-block walks or a plain
// grid-stride copy was 93-95 us. MOEKIT_GPU_QUANT_BLOCKS_PER_SM=n sets it (an A/B knob, read once
// like the others: no getenv on the decode path).
constexpr int kStreamGridBlocksPerSm = 2;

int stream_grid_blocks_per_sm() {
  static const int blocks = [] {
    const int n = env::integer("MOEKIT_GPU_QUANT_BLOCKS_PER_SM", 0);
    return n > 0 ? n : kStreamGridBlocksPerSm;
  }();
  return blocks;
}

// Blocks per SM of the unchecked gated kernels (A/B knob MOEKIT_GPU_QUANT_GATED_BLOCKS; as many
// as fit is the default).
int gated_blocks_per_sm() {
  static const int blocks = [] {
    const int n = env::integer("MOEKIT_GPU_QUANT_GATED_BLOCKS", 0);
    return n > 0 ? n : 64;
  }();
  return blocks;
}

// MOEKIT_GPU_QUANT_HINTS=1: the streaming kernel loads x and stores q evict-first (an A/B knob
// while measuring; off by default).
bool streaming_hints() {
  static const bool on = env::is("MOEKIT_GPU_QUANT_HINTS", "1");
  return on;
}

// The quantization kernels let the next kernel launch before they wait for the previous one,
// not after: every kernel launched behind them (the GEMMs of the linear layer) waits for them
// before it touches memory, so nothing changes but when the next kernel's CTAs take the SMs the
// previous one leaves (and, with static weights, start loading them) instead of after this one's
// wait. A dependent grid launches only once every CTA of this one has allowed it, so those CTAs
// are all resident first. MOEKIT_GPU_QUANT_ALLOW_FIRST=0 allows it after the wait (A/B knob).
bool quant_allow_first() {
  static const bool on = !env::is("MOEKIT_GPU_QUANT_ALLOW_FIRST", "0");
  return on;
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

namespace {

// The masked layout's planes, for a launch over all of them (see GroupQuantArgs::masked_m).
struct MaskedPlanes {
  const int32_t* counts;
  int64_t counts_stride;
  int plane_rows;
  int64_t scale_plane_stride;
};

// Masked calls whose every row's x is at most this many bytes load it all (one round trip, see
// GroupQuantArgs::live_walk). On an H200 (fp8.md, session 34), at a Qwen3-30B decode step's 8
// rows in 128 groups (K = 768, bf16), loading all rows against walking the live rows: capacity 1
// (0.4 MB) 0.7 us faster, capacity 16 (6.3 MB) 0.1-0.4 us faster, capacity 128 (50 MB) 9.4 us
// slower. Where between 6.3 and 50 MB the two cross was not measured.
constexpr int64_t kMaskedLoadAllBytes = int64_t{8} << 20;

void launch_group_quant(const GroupQuantProblem& p, const MaskedPlanes* masked) {
  if (p.rows == 0 || p.cols == 0) return;
  GroupQuantArgs a{};
  if (masked != nullptr) {
    a.masked_m = masked->counts;
    a.masked_m_stride = masked->counts_stride;
    a.plane_rows = masked->plane_rows;
    a.scale_plane_stride = masked->scale_plane_stride;
    const int64_t x_row_bytes =
        (p.gated ? 2 : 1) * p.cols * static_cast<int64_t>(dtype_size(p.x.dtype()));
    a.live_walk = p.rows * x_row_bytes > kMaskedLoadAllBytes;
  }
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
  a.eps = p.eps;
  a.ue8m0 = p.ue8m0;
  const auto x_size = static_cast<int64_t>(dtype_size(p.x.dtype()));
  a.x_vectors = aligned(a.x, a.x_row_stride * x_size, p.rows, 16);
  a.up_vectors = a.x_vectors && p.cols * x_size % 16 == 0;
  a.q_vectors = aligned(a.q, a.q_row_stride, p.rows, 8);
  // Rows of whole units, 16-byte loads and stores: the streaming kernel.
  int lane_chunks = stream_lane_chunks(p.cols, p.group_size, a.packed);
  const int64_t unit_elements =
      lane_chunks > 0 ? int64_t{kLanes} * kChunk * lane_chunks : int64_t{kUnitElements};
  a.units_per_row = fp8::ceil_div(p.cols, unit_elements);
  a.units = p.rows * a.units_per_row;
  if (a.units_per_row > INT32_MAX || !a.x_vectors || !aligned(a.q, a.q_row_stride, p.rows, 16) ||
      p.gated)
    lane_chunks = 0;
  // Gated rows: units of the fewest passes holding whole packed words (one pass of 256 elements
  // otherwise), unchecked where the rows are whole units and aligned.
  const int gated_passes = a.packed ? std::max(1, 4 * p.group_size / kPassElements) : 1;
  const int64_t gated_unit = int64_t{gated_passes} * kPassElements;
  const bool gated_whole = p.gated && p.cols % gated_unit == 0 && a.x_vectors && a.q_vectors;
  if (gated_whole) {
    a.units_per_row = p.cols / gated_unit;
    a.units = p.rows * a.units_per_row;
  } else if (lane_chunks == 0) {  // the general kernel: units of 1024, the last one partial
    a.units_per_row = fp8::ceil_div(p.cols, kUnitElements);
    a.units = p.rows * a.units_per_row;
  }
  const bool whole_units = lane_chunks > 0;

  GroupQuantKernel kernel = nullptr;
  switch (wide_of(p.x.dtype())) {
    case Wide::f32:
      kernel = group_quant_kernel_for<Wide::f32>(p.group_size, lane_chunks, p.gated, gated_passes,
                                                 gated_whole);
      break;
    case Wide::f16:
      kernel = group_quant_kernel_for<Wide::f16>(p.group_size, lane_chunks, p.gated, gated_passes,
                                                 gated_whole);
      break;
    case Wide::bf16:
      kernel = group_quant_kernel_for<Wide::bf16>(p.group_size, lane_chunks, p.gated, gated_passes,
                                                  gated_whole);
      break;
  }
  if (kernel == nullptr)
    fail("per_token_group_quant_fp8", "group_size", std::to_string(p.group_size),
         "is not served by the gpu kernel (16, 32, 64, 128 or 256)");

  const int device = p.x.device().index;
  DeviceGuard on_device(device);
  // As many blocks as fit at once (the streaming kernel's launch bounds set its count, at most
  // kStreamGridBlocksPerSm over units of 1024; at most kQuantBlocksPerSm of the general one): each
  // warp then walks its units as a pipeline, and no second wave leaves SMs idle at the end.
  const int64_t blocks_needed = fp8::ceil_div(a.units, kQuantWarps);
  const int resident =
      resident_blocks_per_sm(reinterpret_cast<const void*>(kernel), kQuantThreads, 0, device);
  int per_sm = whole_units ? resident : std::min(kQuantBlocksPerSm, resident);
  if (gated_whole) per_sm = std::min(gated_blocks_per_sm(), resident);
  if (lane_chunks == kMaxLaneChunks) per_sm = std::min(per_sm, stream_grid_blocks_per_sm());
  const int64_t block_cap = int64_t{device_properties(device).sm_count} * per_sm;
  int64_t blocks = std::min(blocks_needed, block_cap);
  a.row_step = blocks * kQuantWarps / a.units_per_row;  // the general kernel's walk
  a.column_step = static_cast<int>(blocks * kQuantWarps % a.units_per_row);
  if (whole_units) {
    // Every warp the same number of units (the fewest blocks that need no more rounds), so no
    // last round runs with a few warps; then the steps of the walk.
    const int64_t rounds = fp8::ceil_div(a.units, blocks * kQuantWarps);
    blocks = fp8::ceil_div(a.units, rounds * kQuantWarps);
    const int64_t step = blocks * kQuantWarps;
    const int64_t step_rows = step / a.units_per_row, column_step = step % a.units_per_row;
    const int64_t unit_slots = unit_elements / p.group_size / (a.packed ? 4 : 1);
    a.unit_step = step;
    a.rounds = static_cast<int>(fp8::ceil_div(a.units, step));  // the first warp's units
    a.column_step = static_cast<int>(column_step);
    a.column_step_wrapped = static_cast<int>(column_step - a.units_per_row);
    a.wrap_from = static_cast<int>(a.units_per_row - column_step);
    a.x_step = (step_rows * a.x_row_stride + column_step * unit_elements) * x_size;
    a.x_step_wrapped = a.x_step + (a.x_row_stride - a.units_per_row * unit_elements) * x_size;
    a.q_step = step_rows * a.q_row_stride + column_step * unit_elements;
    a.q_step_wrapped = a.q_step + a.q_row_stride - a.units_per_row * unit_elements;
    const int64_t scale_bytes = sizeof(float);
    a.scale_step =
        (step_rows * a.scale_row_stride + column_step * unit_slots * a.scale_group_stride) *
        scale_bytes;
    a.scale_step_wrapped =
        a.scale_step +
        (a.scale_row_stride - a.units_per_row * unit_slots * a.scale_group_stride) * scale_bytes;
  }
  a.streaming_hints = streaming_hints();
  a.allow_first = quant_allow_first();
  // Overlapping the previous kernel hides the launch gap (about 1% of a 100 us call).
  MOEKIT_GPU_CHECK(vendor::launch(kernel, dim3(static_cast<unsigned>(blocks)), dim3(kQuantThreads),
                                  0, static_cast<cudaStream_t>(p.stream),
                                  programmatic_launch_allowed(device), a));
}

// A view of `rows` rows from t's first, with t's strides.
TensorView with_rows(const TensorView& t, int64_t rows) {
  const int64_t shape[2] = {rows, t.size(1)};
  const int64_t strides[2] = {t.stride(0), t.stride(1)};
  return TensorView(t.data(), t.dtype(), shape, strides, t.device());
}

}  // namespace

void per_token_group_quant_fp8(const GroupQuantProblem& p) { launch_group_quant(p, nullptr); }

std::string masked_gated_quant_supports(const MaskedGatedQuantProblem& p) {
  const GroupQuantProblem& first = p.first;
  if (std::string why = group_quant_supports(first); !why.empty()) return why;
  if (p.groups * first.rows > INT32_MAX)
    return "G x M = " + std::to_string(p.groups * first.rows) + " rows is more than 2^31 - 1";
  if (p.groups > 1 && p.x_stride != first.rows * first.x.stride(0))
    return "x's groups are not one after another (group stride " + std::to_string(p.x_stride) +
           " elements, M x row stride " + std::to_string(first.rows * first.x.stride(0)) + ")";
  if (p.groups > 1 && p.q_stride != first.rows * first.q.stride(0))
    return "q's groups are not one after another (group stride " + std::to_string(p.q_stride) +
           " elements, M x row stride " + std::to_string(first.rows * first.q.stride(0)) + ")";
  return "";
}

void silu_and_mul_group_quant_fp8_masked(const MaskedGatedQuantProblem& p) {
  if (p.groups == 0 || p.first.rows == 0) return;
  GroupQuantProblem all = p.first;  // the G planes' rows one after another
  all.rows = p.groups * p.first.rows;
  all.x = with_rows(p.first.x, all.rows);
  all.q = with_rows(p.first.q, all.rows);
  const MaskedPlanes planes{p.masked_m.data_as<const int32_t>(), p.masked_m.stride(0),
                            static_cast<int>(p.first.rows), p.scale_stride};
  launch_group_quant(all, &planes);
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
