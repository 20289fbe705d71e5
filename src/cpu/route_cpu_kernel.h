// The CPU routing kernel, written once over a small SIMD abstraction V and instantiated per ISA
// (route_cpu.cpp: one scalar lane, route_cpu_avx2.cpp: 8 lanes, route_cpu_avx512.cpp: 16).
//
// V provides kWidth; vector types F (float lanes), I (int32 lanes), M (lane mask); loads (f32,
// bf16, f16, and partial ones that read only n elements), arithmetic, compares, select,
// horizontal min/max, lane rotation, int bit tricks for exp/log, count_add (I += mask),
// compress_store (pack the masked lanes to the front) and exp_as_libm (glibc's expf, exactly).
//
// Linkage: each ISA file defines its V in an unnamed namespace, so every instantiation here has
// internal linkage and never meets another ISA's copy at link time. For the same reason this code
// calls only C functions (expf, tanhf, omp_*) and no inline library templates (std::min, ...),
// whose out-of-line copies could otherwise be compiled with AVX2 and picked for the scalar path.
//
// Per row (f32 on upcast inputs, spec/routing.md):
//   1. Activation, vectorized, into row scratch, keeping lane-wise maxima (or top two) on the
//      way. Softmax with renormalization selects on the softcapped, biased logits z: p is
//      monotone in z and the denominator cancels, so only the candidates' exps are computed and
//      the weights are normalized in double. Other softmax rows (no renormalization, top-2-sum
//      groups, which add p's, or more than 16 routed experts) compute p exactly as the
//      reference: libm's expf, reproduced in SIMD, and the sum in index order (four rows' chains
//      side by side).
//   2. Groups: lane-wise top two per group, vectorized; the TG best groups kept (ties: lower id)
//      as ranges of experts. A near-tie between the last kept and the first dropped group sends
//      the row to an exact path, since rounding could order them differently.
//   3. Top-Kr: the Kr-th largest of the lane-wise top lists is a threshold that at least Kr
//      allowed experts reach (each entry is a distinct expert); the experts at or above it (about
//      Kr of them) are compressed out with their ids and ranked branch-free: score descending,
//      then lower id, the reference's order.
//   4. Weights, shared slots, renormalization and scaling, with the reference's f32 operations.
//   Exact paths (scalar copies of the reference, with libm) take the rare rows the fast path
//   cannot match: softmax rows whose max is +-inf or whose selection reaches underflowing
//   probabilities, and group near-ties.
#pragma once

#include <math.h>  // expf, tanhf: C functions, see "Linkage" above
#include <omp.h>

#include <cstdint>
#include <cstring>

namespace moekit::cpu {

enum class LogitsFormat : uint8_t { f32, f16, bf16 };
enum class Activation : uint8_t { softmax, sigmoid, sqrtsoftplus };

inline constexpr int kMaxExperts = 2048;
inline constexpr int kMaxLanes = 16;
// Row scratch length: whole-vector reads and writes may run up to two vectors past E.
inline constexpr int kRowScratch = kMaxExperts + 2 * kMaxLanes;

// One route call as plain data, so the ISA files need no inline code from the rest of the library.
struct RouteArgs {
  const void* logits = nullptr;   // [T, E], inner stride 1
  int64_t logits_row_stride = 0;  // elements
  LogitsFormat logits_format = LogitsFormat::f32;
  const float* bias = nullptr;  // [kRowScratch], zero past E; nullptr when there is no bias
  bool bias_has_nan = false;
  float* weights = nullptr;  // [T, K], inner stride 1
  int64_t weights_row_stride = 0;
  void* ids = nullptr;  // [T, K] int32 or int64, inner stride 1
  int64_t ids_row_stride = 0;
  bool ids_are_i64 = false;
  int64_t num_tokens = 0;
  int64_t num_valid_tokens = 0;
  int num_experts = 0;
  int topk = 0;
  int num_routed = 0;
  int num_shared = 0;
  int num_groups = 1;
  int topk_groups = 1;
  bool group_top2_sum = false;
  Activation activation = Activation::softmax;
  float softcap = 0.0f;
  bool renormalize = true;
  float routed_scaling_factor = 1.0f;
  bool apply_scaling_on_output = false;
  int num_threads = 0;
};

void route_rows_scalar(const RouteArgs& args);
void route_rows_avx2(const RouteArgs& args);
void route_rows_avx512(const RouteArgs& args);

inline constexpr float kInf = __builtin_inff();
inline constexpr float kFloatMax = 3.40282347e+38f;

// glibc's expf (2.27 and later, from ARM's optimized-routines; the FMA build that x86-64 picks
// on AVX2 machines): exp(x) = 2^(k/32) 2^(r/32), the first from this table (2^(i/32) with
// i << 47 taken off its bits), the second a cubic in double, rounded to float once.
// V::exp_as_libm reproduces it (checked bit for bit on 10^8 inputs), so that exp(z - max) and
// the sums over it are the reference's exactly; a plain f32 polynomial differs in 1 result of 4.
// With another libm it is simply an exp within about half an ulp.
inline constexpr uint64_t kExp2fTable[32] = {
    0x3ff0000000000000, 0x3fefd9b0d3158574, 0x3fefb5586cf9890f, 0x3fef9301d0125b51,
    0x3fef72b83c7d517b, 0x3fef54873168b9aa, 0x3fef387a6e756238, 0x3fef1e9df51fdee1,
    0x3fef06fe0a31b715, 0x3feef1a7373aa9cb, 0x3feedea64c123422, 0x3feece086061892d,
    0x3feebfdad5362a27, 0x3feeb42b569d4f82, 0x3feeab07dd485429, 0x3feea47eb03a5585,
    0x3feea09e667f3bcd, 0x3fee9f75e8ec5f74, 0x3feea11473eb0187, 0x3feea589994cce13,
    0x3feeace5422aa0db, 0x3feeb737b0cdc5e5, 0x3feec49182a3f090, 0x3feed503b23e255d,
    0x3feee89f995ad3ad, 0x3feeff76f2fb5e47, 0x3fef199bdd85529c, 0x3fef3720dcef9069,
    0x3fef5818dcfba487, 0x3fef7c97337b9b5f, 0x3fefa4afa2a490da, 0x3fefd0765b6e4540,
};
inline constexpr double kExpfInvLn2N = 0x1.71547652b82fep+0 * 32;
inline constexpr double kExpfShift = 0x1.8p+52;  // adding it rounds to an integer
inline constexpr double kExpfPoly[3] = {0x1.c6af84b912394p-5 / 32 / 32 / 32,
                                        0x1.ebfce50fac4f3p-3 / 32 / 32, 0x1.62e42ff0c52d6p-1 / 32};
// Inputs are clamped to this range first: the ends give 0 and +inf, as expf does beyond them.
inline constexpr float kExpfLowest = -104.0f, kExpfHighest = 89.0f;
// exp(x) is a normal float above this. Where results that small are never used (their
// selection takes the exact path, and added to a sum of at least 1 they vanish), arguments are
// raised to it: subnormal results cost a microcode assist of ~100 cycles each on Intel cores.
inline constexpr float kExpNormalFloor = -87.0f;

// Vector math within about an ulp of libm's, for selection and for weights that are normalized
// afterwards. The one-lane build calls libm itself: the reference's arithmetic, bit for bit.
template <class V>
struct VectorMath {
  using F = typename V::F;
  using I = typename V::I;
  static constexpr bool kLibm = V::kWidth == 1;

  // Cephes-style: x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial. 2^n is applied in two
  // halves so that overflow gives inf and results down to the smallest subnormal stay right.
  static F exp(F x) {
    if constexpr (kLibm) return V::exp_as_libm(x);
    x = V::min(V::max(x, V::set1(-110.0f)), V::set1(89.0f));
    const F n = V::round(V::mul(x, V::set1(1.44269504088896341f)));
    F r = V::fnmadd(n, V::set1(0.693145751953125f), x);
    r = V::fnmadd(n, V::set1(1.428606820309417232e-6f), r);
    F p = V::set1(1.9875691500e-4f);
    p = V::fmadd(p, r, V::set1(1.3981999507e-3f));
    p = V::fmadd(p, r, V::set1(8.3334519073e-3f));
    p = V::fmadd(p, r, V::set1(4.1665795894e-2f));
    p = V::fmadd(p, r, V::set1(1.6666665459e-1f));
    p = V::fmadd(p, r, V::set1(5.0000001201e-1f));
    p = V::fmadd(p, V::mul(r, r), V::add(r, V::set1(1.0f)));
    const I ni = V::to_int(n);
    const I half = V::srai(ni, 1);
    const F scale_a = V::as_float(V::slli(V::add_i(half, V::set1_i(127)), 23));
    const F scale_b = V::as_float(V::slli(V::add_i(V::sub_i(ni, half), V::set1_i(127)), 23));
    return V::mul(V::mul(p, scale_a), scale_b);
  }

  // Natural log for x >= 1 (finite): Cephes logf.
  static F log_at_least_one(F x) {
    const I bits = V::as_int(x);
    F e = V::to_float(V::sub_i(V::srai(bits, 23), V::set1_i(126)));
    F m = V::as_float(V::or_i(V::and_i(bits, V::set1_i(0x007fffff)), V::set1_i(0x3f000000)));
    const auto below = V::lt(m, V::set1(0.707106781186547524f));
    e = V::select(below, V::sub(e, V::set1(1.0f)), e);
    m = V::sub(V::select(below, V::add(m, m), m), V::set1(1.0f));
    const F z = V::mul(m, m);
    F y = V::set1(7.0376836292e-2f);
    y = V::fmadd(y, m, V::set1(-1.1514610310e-1f));
    y = V::fmadd(y, m, V::set1(1.1676998740e-1f));
    y = V::fmadd(y, m, V::set1(-1.2420140846e-1f));
    y = V::fmadd(y, m, V::set1(1.4249322787e-1f));
    y = V::fmadd(y, m, V::set1(-1.6668057665e-1f));
    y = V::fmadd(y, m, V::set1(2.0000714765e-1f));
    y = V::fmadd(y, m, V::set1(-2.4999993993e-1f));
    y = V::fmadd(y, m, V::set1(3.3333331174e-1f));
    y = V::mul(V::mul(y, m), z);
    y = V::fmadd(e, V::set1(-2.12194440e-4f), y);
    y = V::fnmadd(z, V::set1(0.5f), y);
    return V::fmadd(e, V::set1(0.693359375f), V::add(m, y));
  }

  // 1 / (1 + exp(-x)), the reference's formula; x is never NaN here. 1 + exp(-x) is 1 for
  // x > 17 anyway, so the exponent stays above kExpNormalFloor.
  static F sigmoid(F x) {
    const F e = exp(V::max(V::sub(V::set1(0.0f), x), V::set1(kExpNormalFloor)));
    return V::div(V::set1(1.0f), V::add(V::set1(1.0f), e));
  }

  // sqrt(softplus(x)), softplus(x) = x above 20; +inf counts as the largest finite float.
  static F sqrt_softplus(F x) {
    x = V::min(x, V::set1(kFloatMax));
    if constexpr (kLibm) return V::sqrt(x > 20.0f ? x : log1pf(expf(x)));
    const F y = exp(V::min(x, V::set1(20.0f)));
    const F u = V::add(V::set1(1.0f), y);
    const F d = V::sub(u, V::set1(1.0f));
    // log1p(y) = log(u) * y / (u - 1) corrects the rounding of 1 + y; y itself when u == 1.
    const F safe_d = V::select(V::eq(d, V::set1(0.0f)), V::set1(1.0f), d);
    const F log1p_y =
        V::select(V::eq(d, V::set1(0.0f)), y, V::mul(log_at_least_one(u), V::div(y, safe_d)));
    return V::sqrt(V::select(V::gt(x, V::set1(20.0f)), x, log1p_y));
  }
};

// Routes rows one at a time with per-thread scratch (the object itself, on the thread's stack).
template <class V>
class RowRouter {
 public:
  using F = typename V::F;
  using I = typename V::I;
  using M = typename V::M;
  using Math = VectorMath<V>;
  static constexpr int kW = V::kWidth;

  explicit RowRouter(const RouteArgs& args) : a_(args) {
    select_on_logits_ = args.activation == Activation::softmax && args.renormalize &&
                        !(args.num_groups > 1 && args.group_top2_sum) &&
                        args.num_routed <= kMaxRoutedOnLogits;
    sum_exps_in_order_ = args.activation == Activation::softmax && !select_on_logits_;
    range_begin_[0] = 0;
    range_end_[0] = args.num_experts;
    num_ranges_ = 1;
    num_allowed_ = args.num_experts;
  }
  RowRouter(const RowRouter&) = delete;
  RowRouter& operator=(const RowRouter&) = delete;

  // Routes rows [begin, end).
  void route(int64_t begin, int64_t end) {
    switch (a_.logits_format) {
      case LogitsFormat::f32:
        return route_rows<LogitsFormat::f32>(begin, end);
      case LogitsFormat::f16:
        return route_rows<LogitsFormat::f16>(begin, end);
      case LogitsFormat::bf16:
        return route_rows<LogitsFormat::bf16>(begin, end);
    }
  }

 private:
  // Softmax selection below this log-distance from the row max (p < ~1e-33 / E) risks ties that
  // only the reference's exact p values resolve; such rows go to route_softmax_exactly.
  static constexpr float kUnderflowLogMargin = -75.0f;
  static constexpr float kSmallestExactP = 1e-35f;  // > exp(kExpNormalFloor) >= any raised p
  // Kept and dropped groups whose scores are this close (relative, absolute below 1), but not
  // equal, may rank the other way in the reference's arithmetic; such rows go by the exact
  // paths.
  static constexpr float kGroupTieMargin = 1e-5f;
  // Lane-wise top-J lists for the threshold: J * kW covers K <= 64, at most 8 lists.
  static constexpr int kMaxLaneTop = (64 + kW - 1) / kW < 8 ? (64 + kW - 1) / kW : 8;
  // Candidates are ranked up to this many, else (e.g. rows of equal scores) sorted by insertion.
  static constexpr int kRankLimit = 128;
  // Rows with at most this many allowed experts skip the threshold: all are candidates.
  static constexpr int kDirectLimit = 2 * kW > 16 ? 2 * kW : 16;
  // Softmax with renormalization selects on the logits for up to this many routed experts. The
  // reference adds their p in f32, so its weights carry up to about Kr / 2 ulps of rounding
  // that the double normalization does not share; beyond 16 that can pass 1e-6 (with rsf), and
  // the exact route costs about the same there.
  static constexpr int kMaxRoutedOnLogits = 16;
  // Rows whose in-order sums run side by side (route_softmax_batch).
  static constexpr int kSumBatch = 4;

  // ---- Loading.

  template <LogitsFormat kFormat>
  static F load_logits(const void* row, int e) {
    if constexpr (kFormat == LogitsFormat::f32) {
      return V::load(static_cast<const float*>(row) + e);
    } else if constexpr (kFormat == LogitsFormat::bf16) {
      return V::load_bf16(static_cast<const uint16_t*>(row) + e);
    } else {
      return V::load_f16(static_cast<const uint16_t*>(row) + e);
    }
  }
  template <LogitsFormat kFormat>
  static F load_logits_partial(const void* row, int e, int n) {
    if constexpr (kFormat == LogitsFormat::f32) {
      return V::load_partial(static_cast<const float*>(row) + e, n);
    } else if constexpr (kFormat == LogitsFormat::bf16) {
      return V::load_bf16_partial(static_cast<const uint16_t*>(row) + e, n);
    } else {
      return V::load_f16_partial(static_cast<const uint16_t*>(row) + e, n);
    }
  }
  template <LogitsFormat kFormat>
  static float load_logit(const void* row, int e) {
    if constexpr (kFormat == LogitsFormat::f32) {
      return static_cast<const float*>(row)[e];
    } else if constexpr (kFormat == LogitsFormat::bf16) {
      return bits_to_float(static_cast<uint32_t>(static_cast<const uint16_t*>(row)[e]) << 16);
    } else {
      return half_to_float(static_cast<const uint16_t*>(row)[e]);
    }
  }
  static float bits_to_float(uint32_t bits) {
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
  // Exact IEEE half -> float for every input (subnormals, inf, NaN); from the FP16 library.
  static float half_to_float(uint16_t h) {
    const uint32_t w = static_cast<uint32_t>(h) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
    float magnitude = two_w < (1u << 27) ? denormalized : normalized;
    uint32_t bits;
    std::memcpy(&bits, &magnitude, sizeof bits);
    return bits_to_float(sign | bits);
  }

  static F nan_to_neg_inf(F v) { return V::select(V::isnan(v), V::set1(-kInf), v); }
  static float max_of(float a, float b) { return a > b ? a : b; }

  // Lane-wise top two (as a multiset) of the vectors added. Trivial to construct, as the scratch
  // holds an array of them: start from empty().
  struct LaneTop2 {
    F first, second;
    static LaneTop2 empty() { return {V::set1(-kInf), V::set1(-kInf)}; }
    void add(F v) {
      second = V::max(second, V::min(first, v));
      first = V::max(first, v);
    }
    void merge(const LaneTop2& other) {
      second = V::max(V::min(first, other.first), V::max(second, other.second));
      first = V::max(first, other.first);
    }
  };
  void keep_lane_top(const LaneTop2& top, const float* of) {
    lane_top_[0] = top.first;
    lane_top_[1] = top.second;
    lane_top_count_ = 2;
    lane_top_of_ = of;
  }

  // ---- The rows.

  const void* row_logits(int64_t row) const {
    const size_t size = a_.logits_format == LogitsFormat::f32 ? 4 : 2;
    return static_cast<const char*>(a_.logits) + row * a_.logits_row_stride * size;
  }

  template <LogitsFormat kFormat>
  void route_rows(int64_t begin, int64_t end) {
    if (!sum_exps_in_order_) {
      for (int64_t row = begin; row < end; ++row) {
        if (row >= a_.num_valid_tokens) {
          write_padding(row);
        } else {
          route_row<kFormat>(row_logits(row), row);
        }
      }
      return;
    }
    int64_t batch[kSumBatch];
    int size = 0;
    for (int64_t row = begin; row < end; ++row) {
      if (row >= a_.num_valid_tokens) {
        write_padding(row);
        continue;
      }
      batch[size++] = row;
      if (size == kSumBatch) {
        route_softmax_batch<kFormat>(batch, size);
        size = 0;
      }
    }
    if (size > 0) route_softmax_batch<kFormat>(batch, size);
  }

  // Softmax without renormalization, or with top-2-sum groups: p = exp(z - max) / sum with the
  // reference's own arithmetic (libm's expf, the sum added in index order), so that weights and
  // group sums are its bit for bit. That chain of E dependent adds would dominate the row, so
  // kSumBatch rows run their chains side by side.
  template <LogitsFormat kFormat>
  void route_softmax_batch(const int64_t* rows, int size) {
    float row_max[kSumBatch];
    const float* exps[kSumBatch];
    for (int b = 0; b < kSumBatch; ++b) {
      exps[b] = source_rows_[b < size ? b : 0];  // spare chains repeat the first row
      if (b >= size) continue;
      source_ = source_rows_[b];
      row_max[b] = load_softmax_logits<kFormat>(row_logits(rows[b]));
      if (row_max[b] > -kInf && row_max[b] < kInf) {
        exp_minus_max(row_max[b]);
      } else {  // routed exactly below; zeros keep its chain on defined numbers
        for (int e = 0; e < a_.num_experts; ++e) source_[e] = 0.0f;
      }
    }
    float sum[kSumBatch] = {};
    for (int e = 0; e < a_.num_experts; ++e) {
      for (int b = 0; b < kSumBatch; ++b) sum[b] += exps[b][e];
    }
    for (int b = 0; b < size; ++b) {
      source_ = source_rows_[b];
      if (row_max[b] > -kInf && row_max[b] < kInf) {
        finish_softmax_from_exps<kFormat>(row_logits(rows[b]), rows[b], sum[b]);
      } else {
        route_softmax_exactly<kFormat>(row_logits(rows[b]), rows[b]);
      }
    }
    source_ = source_rows_[0];
  }

  // ---- One row.

  // Sigmoid / sqrtsoftplus, or softmax selecting on the logits (route_softmax_batch takes the
  // other softmax rows).
  template <LogitsFormat kFormat>
  void route_row(const void* row_logits, int64_t row) {
    const int kr = a_.num_routed;
    if (a_.activation != Activation::softmax) {
      load_gate_scores<kFormat>(row_logits);
      const float* selection = a_.bias != nullptr ? selection_ : source_;
      if (!keep_best_groups(selection)) return route_gate_exactly<kFormat>(row_logits, row);
      select_top(selection, kr);
      if (a_.renormalize) {
        for (int k = 0; k < kr; ++k) slot_weight_[k] = source_[top_id_[k]];
      } else {
        // The selected weights again with libm, as the reference computes them: the shared
        // slots carry their unnormalized sum, where a one-ulp difference can exceed 1e-6.
        for (int k = 0; k < kr; ++k) {
          slot_weight_[k] = exact_gate_score(load_logit<kFormat>(row_logits, top_id_[k]));
        }
      }
      return write_slots(row, /*normalize_in_double=*/false);
    }
    const float row_max = load_softmax_logits<kFormat>(row_logits);
    if (!(row_max > -kInf && row_max < kInf)) {
      return route_softmax_exactly<kFormat>(row_logits, row);
    }
    if (!keep_best_groups(z_)) return route_softmax_exactly<kFormat>(row_logits, row);
    // exp(z - max) of the candidates only: the softmax denominator cancels in renormalizing.
    const int count = collect_candidates(z_, kr);
    const F m = V::set1(row_max);
    const F floor = V::set1(kExpNormalFloor);
    for (int i = 0; i < count; i += kW) {
      V::store(cand_weight_ + i, Math::exp(V::max(V::sub(V::load(cand_score_ + i), m), floor)));
    }
    select_from(cand_score_, cand_id_, count, kr, cand_weight_);
    if (top_score_[kr - 1] - row_max < kUnderflowLogMargin) {
      return route_softmax_exactly<kFormat>(row_logits, row);
    }
    write_slots(row, /*normalize_in_double=*/true);
  }

  // p = source_ / sum (source_ = exp(z - max), sum their sum), then groups, selection and
  // weights, all on the reference's p.
  template <LogitsFormat kFormat>
  void finish_softmax_from_exps(const void* row_logits, int64_t row, float sum) {
    const int kr = a_.num_routed;
    const F total = V::set1(sum);
    for (int e = 0; e < a_.num_experts; e += kW) {
      V::store(source_ + e, V::div(V::load(source_ + e), total));
    }
    keep_best_groups(source_);
    select_top(source_, kr);
    // Raised exps (kExpNormalFloor) stay below this; the reference ranks those exactly.
    if (top_score_[kr - 1] < kSmallestExactP) {
      return route_softmax_exactly<kFormat>(row_logits, row);
    }
    for (int k = 0; k < kr; ++k) slot_weight_[k] = top_score_[k];
    write_slots(row, /*normalize_in_double=*/false);
  }

  // z_ = logits, softcapped, plus bias, NaN -> -inf (lanes past E: -inf). Returns max z.
  template <LogitsFormat kFormat>
  float load_softmax_logits(const void* row_logits) {
    const int num_experts = a_.num_experts;
    LaneTop2 top = LaneTop2::empty();
    int e = 0;
    for (; e + kW <= num_experts; e += kW) {
      const F z = softmax_logit(load_logits<kFormat>(row_logits, e), e);
      V::store(z_ + e, z);
      top.add(z);
    }
    if (e < num_experts) {
      F z = softmax_logit(load_logits_partial<kFormat>(row_logits, e, num_experts - e), e);
      z = V::select(V::lanes_below(num_experts - e), z, V::set1(-kInf));
      V::store(z_ + e, z);
      top.add(z);
    }
    keep_lane_top(top, z_);
    return V::hmax(top.first);
  }
  F softmax_logit(F x, int e) const {
    F z = x;
    if (a_.softcap > 0.0f) {
      // libm's tanhf, as the reference: an ulp of tanh times the cap (30 is common) would move
      // the weights by more than 1e-6.
      const F cap = V::set1(a_.softcap);
      alignas(64) float lanes[kW];
      V::store(lanes, V::div(z, cap));
      for (int i = 0; i < kW; ++i) lanes[i] = tanhf(lanes[i]);
      z = V::mul(cap, V::load(lanes));
    }
    if (a_.bias != nullptr) z = V::add(z, V::load(a_.bias + e));
    return nan_to_neg_inf(z);  // a NaN logit stays NaN through tanhf and the bias
  }

  // source_ = exp(z_ - row_max) as libm's expf computes it, or exp(kExpNormalFloor) below that
  // (lanes past E too).
  void exp_minus_max(float row_max) {
    const int num_experts = a_.num_experts;
    const F m = V::set1(row_max);
    const F floor = V::set1(kExpNormalFloor);
    for (int e = 0; e < num_experts; e += kW) {
      V::store(source_ + e, V::exp_as_libm(V::max(V::sub(V::load(z_ + e), m), floor)));
    }
  }

  // Sigmoid / sqrtsoftplus: source_ = s (weight source), selection_ = s + bias (NaN -> -inf).
  template <LogitsFormat kFormat>
  void load_gate_scores(const void* row_logits) {
    const int num_experts = a_.num_experts;
    F lane_max = V::set1(-kInf);  // only the maximum here: registers are taken by the activation
    int e = 0;
    for (; e + kW <= num_experts; e += kW) {
      lane_max = V::max(lane_max, gate_score(load_logits<kFormat>(row_logits, e), e));
    }
    if (e < num_experts) {
      const F selection =
          gate_score(load_logits_partial<kFormat>(row_logits, e, num_experts - e), e);
      lane_max =
          V::max(lane_max, V::select(V::lanes_below(num_experts - e), selection, V::set1(-kInf)));
    }
    lane_top_[0] = lane_max;
    lane_top_count_ = 1;
    lane_top_of_ = a_.bias != nullptr ? selection_ : source_;
  }
  // Stores s and s + bias for the kW experts from e; returns their selection scores.
  F gate_score(F x, int e) {
    const F v = nan_to_neg_inf(x);
    const F s = a_.activation == Activation::sigmoid ? Math::sigmoid(v) : Math::sqrt_softplus(v);
    V::store(source_ + e, s);
    if (a_.bias == nullptr) return s;
    F selection = V::add(s, V::load(a_.bias + e));
    if (a_.bias_has_nan) selection = nan_to_neg_inf(selection);
    V::store(selection_ + e, selection);
    return selection;
  }

  // The reference's sigmoid / sqrtsoftplus of one logit, with libm.
  float exact_gate_score(float x) const {
    float v = x != x ? -kInf : x;
    if (a_.activation == Activation::sigmoid) return 1.0f / (1.0f + expf(-v));
    if (v == kInf) v = kFloatMax;
    return __builtin_sqrtf(v > 20.0f ? v : log1pf(expf(v)));
  }

  // The reference's sigmoid / sqrtsoftplus row, scalar and with libm, for rows whose kept groups
  // hinge on a near-tie.
  template <LogitsFormat kFormat>
  void route_gate_exactly(const void* row_logits, int64_t row) {
    for (int e = 0; e < a_.num_experts; ++e) {
      source_[e] = exact_gate_score(load_logit<kFormat>(row_logits, e));
      if (a_.bias != nullptr) {
        const float selection = source_[e] + a_.bias[e];
        selection_[e] = selection != selection ? -kInf : selection;
      }
    }
    const float* selection = a_.bias != nullptr ? selection_ : source_;
    keep_best_groups(selection);
    select_top(selection, a_.num_routed);
    for (int k = 0; k < a_.num_routed; ++k) slot_weight_[k] = source_[top_id_[k]];
    write_slots(row, /*normalize_in_double=*/false);
  }

  // The reference's softmax, scalar and with libm, for rows the fast path cannot match exactly.
  template <LogitsFormat kFormat>
  void route_softmax_exactly(const void* row_logits, int64_t row) {
    const int num_experts = a_.num_experts;
    float row_max = -kInf;
    for (int e = 0; e < num_experts; ++e) {
      const float x = load_logit<kFormat>(row_logits, e);
      float v = x;
      if (a_.softcap > 0.0f) v = a_.softcap * tanhf(v / a_.softcap);
      v += a_.bias != nullptr ? a_.bias[e] : 0.0f;
      z_[e] = (x != x || v != v) ? -kInf : v;
      row_max = max_of(row_max, z_[e]);
    }
    if (row_max == -kInf) {
      for (int e = 0; e < num_experts; ++e) source_[e] = 0.0f;
    } else if (row_max == kInf) {  // the +inf entries share the mass equally
      float count = 0.0f;
      for (int e = 0; e < num_experts; ++e) count += z_[e] == kInf ? 1.0f : 0.0f;
      for (int e = 0; e < num_experts; ++e) source_[e] = z_[e] == kInf ? 1.0f / count : 0.0f;
    } else {
      float sum = 0.0f;
      for (int e = 0; e < num_experts; ++e) {
        source_[e] = expf(z_[e] - row_max);
        sum += source_[e];
      }
      for (int e = 0; e < num_experts; ++e) source_[e] = source_[e] / sum;
    }
    keep_best_groups(source_);
    select_top(source_, a_.num_routed);
    for (int k = 0; k < a_.num_routed; ++k) slot_weight_[k] = top_score_[k];
    write_slots(row, /*normalize_in_double=*/false);
  }

  // ---- Groups.

  // Restricts selection to the TG best groups (ties: lower group id), as merged id ranges. With
  // groups of at least kW experts, also leaves the lane-wise top two of the kept experts.
  // Returns false when the last kept and the first dropped group nearly tie (see
  // kGroupTieMargin): scores computed with other roundings than the reference's may not
  // order them as it does.
  bool keep_best_groups(const float* selection) {
    const int num_groups = a_.num_groups;
    if (num_groups == 1) return true;
    const int group_size = a_.num_experts / num_groups;
    const bool vector_groups = group_size >= kW;
    for (int g = 0; g < num_groups; ++g) {
      const float* s = selection + g * group_size;
      group_score_[g] = vector_groups ? group_score(s, group_size, group_top_[g])
                                      : group_score_scalar(s, group_size);
    }
    V::store(group_score_ + num_groups, V::set1(-kInf));  // defined lanes for the ranking
    const int kept = a_.topk_groups;
    select_from(group_score_, nullptr, num_groups, kept < num_groups ? kept + 1 : kept, nullptr);
    bool clear = true;
    if (kept < num_groups) {
      const float last = top_score_[kept - 1], next = top_score_[kept];
      const float scale = max_of(1.0f, max_of(max_of(last, -last), max_of(next, -next)));
      clear = last == next || !(last - next <= kGroupTieMargin * scale);  // inf: clear
    }
    for (int g = 0; g < num_groups; ++g) group_kept_[g] = 0;
    for (int i = 0; i < a_.topk_groups; ++i) group_kept_[top_id_[i]] = 1;
    num_ranges_ = 0;
    LaneTop2 kept_top = LaneTop2::empty();
    for (int g = 0; g < num_groups; ++g) {
      if (!group_kept_[g]) continue;
      if (vector_groups) kept_top.merge(group_top_[g]);
      if (num_ranges_ > 0 && range_end_[num_ranges_ - 1] == g * group_size) {
        range_end_[num_ranges_ - 1] += group_size;
      } else {
        range_begin_[num_ranges_] = g * group_size;
        range_end_[num_ranges_] = (g + 1) * group_size;
        ++num_ranges_;
      }
    }
    num_allowed_ = a_.topk_groups * group_size;
    keep_lane_top(kept_top, vector_groups ? selection : nullptr);
    return clear;
  }

  // Group max, or the sum of the two largest (two equal maxima give 2 max); NaN -> -inf. Leaves
  // the group's lane-wise top two (n >= kW).
  float group_score(const float* s, int n, LaneTop2& top) const {
    top = LaneTop2::empty();
    for (int i = 0; i < n; i += kW) {
      F v = V::load(s + i);
      if (n - i < kW) v = V::select(V::lanes_below(n - i), v, V::set1(-kInf));
      top.add(v);
    }
    const float first = V::hmax(top.first);
    if (!a_.group_top2_sum || n < 2) return first != first ? -kInf : first;
    // The second largest is the largest second, or the first of another lane.
    const M is_first = V::eq(top.first, V::set1(first));
    float second = first;
    if (V::popcount(is_first) < 2) {
      second = max_of(V::hmax(top.second), V::hmax(V::select(is_first, V::set1(-kInf), top.first)));
    }
    const float score = first + second;
    return score != score ? -kInf : score;
  }
  // The reference's loop, for groups narrower than a vector.
  float group_score_scalar(const float* s, int n) const {
    float first = -kInf, second = -kInf;
    for (int i = 0; i < n; ++i) {
      const float v = s[i];
      if (v > first) {
        second = first;
        first = v;
      } else if (v > second) {
        second = v;
      }
    }
    const float score = a_.group_top2_sum && n >= 2 ? first + second : first;
    return score != score ? -kInf : score;
  }

  // ---- Top-k.

  // top_score_/top_id_[0, k) = the k best allowed experts by selection, in selection order.
  void select_top(const float* selection, int k) {
    select_from(cand_score_, cand_id_, collect_candidates(selection, k), k, nullptr);
  }

  // cand_score_/cand_id_ = a superset of the k best allowed experts, in id order; the count.
  int collect_candidates(const float* selection, int k) {
    float threshold = -kInf;
    if (num_allowed_ > kDirectLimit) {
      const bool have_lane_top = selection == lane_top_of_;
      if (have_lane_top && (2 * k <= kW || (lane_top_count_ == 1 && k <= kW))) {
        threshold = kth_largest<1>(lane_top_, k);  // the activation pass's lane maxima
      } else if (have_lane_top && lane_top_count_ == 2 && k <= 2 * kW) {
        // The k-th largest of the 2 kW lane-wise top two is near the row's own: few candidates.
        threshold = kth_largest<2>(lane_top_, k);
      } else {
        threshold = lane_top_threshold_for<1>(selection, k);
      }
    }
    return collect(selection, threshold);
  }

  // lane_top_threshold<J> for the J with J * kW >= k (none past kMaxLaneTop: -inf).
  template <int J>
  float lane_top_threshold_for(const float* selection, int k) const {
    if (J * kW >= k) return lane_top_threshold<J>(selection, k);
    if constexpr (J < kMaxLaneTop) {
      return lane_top_threshold_for<J + 1>(selection, k);
    } else {
      return -kInf;  // only the one-lane build with k > 8: every allowed expert is a candidate
    }
  }

  // A score that at least k allowed experts reach: the k-th largest of the lane-wise top J
  // (J * kW >= k distinct experts, or -inf, which every expert reaches).
  template <int J>
  float lane_top_threshold(const float* selection, int k) const {
    F top[J];  // per lane, descending
    for (int i = 0; i < J; ++i) top[i] = V::set1(-kInf);
    for (int r = 0; r < num_ranges_; ++r) {
      const int end = range_end_[r];
      for (int e = range_begin_[r]; e < end; e += kW) {
        F v = V::load(selection + e);
        if (end - e < kW) v = V::select(V::lanes_below(end - e), v, V::set1(-kInf));
        for (int i = 0; i < J; ++i) {  // insertion into the lane's sorted list
          const F higher = V::max(top[i], v);
          v = V::min(top[i], v);
          top[i] = higher;
        }
      }
    }
    return kth_largest<J>(top, k);
  }

  // The k-th largest of J vectors: the smallest value with fewer than k values above it,
  // counted in registers by comparing with every lane rotation of every vector.
  template <int J>
  static float kth_largest(const F* top, int k) {
    const I limit = V::set1_i(k);
    F smallest = V::set1(kInf);
    for (int p = 0; p < J; ++p) {
      I above = V::set1_i(0);
      for (int q = 0; q < J; ++q) {
        for (int rot = 0; rot < kW; ++rot) {
          above = V::count_add(above, V::gt(V::rotate(top[q], rot), top[p]));
        }
      }
      smallest = V::min(smallest, V::select(V::lt_i(above, limit), top[p], V::set1(kInf)));
    }
    return V::hmin(smallest);
  }

  // cand_score_/cand_id_ = allowed experts scoring >= threshold, in id order. Returns the count.
  int collect(const float* selection, float threshold) {
    const F t = V::set1(threshold);
    int count = 0;
    for (int r = 0; r < num_ranges_; ++r) {
      const int end = range_end_[r];
      int e = range_begin_[r];
      for (; e + kW <= end; e += kW) {
        const F v = V::load(selection + e);
        count += V::compress_store(cand_score_ + count, cand_id_ + count, v, e, V::ge(v, t));
      }
      if (e < end) {
        const F v = V::load(selection + e);
        const M keep = V::mask_and(V::ge(v, t), V::lanes_below(end - e));
        count += V::compress_store(cand_score_ + count, cand_id_ + count, v, e, keep);
      }
    }
    V::store(cand_score_ + count, V::set1(-kInf));  // defined lanes for the ranking's last vector
    return count;
  }

  // top_score_/top_id_[0, k) = the k best of n (score, id) pairs given in id order (ids null:
  // the index is the id), and slot_weight_[0, k) their payload if there is one. Scores are
  // never NaN.
  void select_from(const float* score, const int32_t* id, int n, int k, const float* payload) {
    if (n <= kRankLimit) {
      rank(score, n);
      for (int i = 0; i < n; ++i) {
        const int r = rank_[i];
        const int slot = r < k ? r : k;  // slot k is a sink for the unselected
        top_score_[slot] = score[i];
        top_id_[slot] = id != nullptr ? id[i] : i;
        if (payload != nullptr) slot_weight_[slot] = payload[i];
      }
    } else {
      insert_best(score, id, n, k, payload);
    }
  }

  // rank_[i] = how many of the n scores come before score i (larger, or equal with lower index).
  void rank(const float* score, int n) {
    for (int b = 0; b < n; b += kW) {
      const F mine = V::load(score + b);
      I count = V::set1_i(0);
      for (int j = 0; j < b; ++j) count = V::count_add(count, V::ge(V::set1(score[j]), mine));
      const int block_end = b + kW < n ? b + kW : n;
      const F my_index = V::add(V::iota(), V::set1(static_cast<float>(b)));
      for (int j = b; j < block_end; ++j) {
        const F other = V::set1(score[j]);
        const M before = V::mask_or(
            V::gt(other, mine),
            V::mask_and(V::eq(other, mine), V::lt(V::set1(static_cast<float>(j)), my_index)));
        count = V::count_add(count, before);
      }
      for (int j = block_end; j < n; ++j)
        count = V::count_add(count, V::gt(V::set1(score[j]), mine));
      V::store_i(rank_ + b, count);
    }
  }

  // Insertion into a sorted list of the best k; for long candidate lists.
  void insert_best(const float* score, const int32_t* id, int n, int k, const float* payload) {
    int size = 0;
    for (int i = 0; i < n; ++i) {
      const float s = score[i];
      if (size == k && !(s > top_score_[k - 1])) continue;  // later ids lose ties
      int pos = size < k ? size++ : k - 1;
      while (pos > 0 && s > top_score_[pos - 1]) {
        top_score_[pos] = top_score_[pos - 1];
        top_id_[pos] = top_id_[pos - 1];
        if (payload != nullptr) slot_weight_[pos] = slot_weight_[pos - 1];
        --pos;
      }
      top_score_[pos] = s;
      top_id_[pos] = id != nullptr ? id[i] : i;
      if (payload != nullptr) slot_weight_[pos] = payload[i];
    }
  }

  // ---- Output.

  // Steps 4-7 of the contract on slot_weight_[0, Kr) and top_id_[0, Kr), with the reference's
  // f32 operations, or for softmax with renormalization from unnormalized exps, in double: the
  // reference's own rounding (p = e / S, summed in f32) then is the only difference, not twice it.
  void write_slots(int64_t row, bool normalize_in_double) {
    const int kr = a_.num_routed, k_all = a_.topk;
    const float rsf = a_.routed_scaling_factor;
    for (int j = 0; j < a_.num_shared; ++j) top_id_[kr + j] = a_.num_experts + j;
    if (normalize_in_double) {
      double even = 0.0, odd = 0.0;  // two chains; in double the order is immaterial
      for (int k = 0; k + 1 < kr; k += 2) {
        even += slot_weight_[k];
        odd += slot_weight_[k + 1];
      }
      if (kr % 2 != 0) even += slot_weight_[kr - 1];
      const double inverse = 1.0 / (even + odd);
      for (int k = 0; k < kr; ++k) slot_weight_[k] = static_cast<float>(slot_weight_[k] * inverse);
      const float shared = static_cast<float>(1.0 / rsf);  // routed_sum / rsf, renormalized
      for (int j = 0; j < a_.num_shared; ++j) slot_weight_[kr + j] = shared;
    } else {
      float routed_sum = 0.0f;
      for (int k = 0; k < kr; ++k) routed_sum += slot_weight_[k];
      for (int j = 0; j < a_.num_shared; ++j) slot_weight_[kr + j] = routed_sum / rsf;
      if (a_.renormalize && routed_sum > 0.0f) {
        for (int k = 0; k < k_all; ++k) slot_weight_[k] = slot_weight_[k] / routed_sum;
      }
    }
    float* weights = a_.weights + row * a_.weights_row_stride;
    if (a_.apply_scaling_on_output) {
      for (int k = 0; k < k_all; ++k) weights[k] = slot_weight_[k] * rsf;
    } else {
      for (int k = 0; k < k_all; ++k) weights[k] = slot_weight_[k];
    }
    if (a_.ids_are_i64) {
      int64_t* ids = static_cast<int64_t*>(a_.ids) + row * a_.ids_row_stride;
      for (int k = 0; k < k_all; ++k) ids[k] = top_id_[k];
    } else {
      int32_t* ids = static_cast<int32_t*>(a_.ids) + row * a_.ids_row_stride;
      for (int k = 0; k < k_all; ++k) ids[k] = top_id_[k];
    }
  }

  void write_padding(int64_t row) {
    float* weights = a_.weights + row * a_.weights_row_stride;
    for (int k = 0; k < a_.topk; ++k) weights[k] = 0.0f;
    if (a_.ids_are_i64) {
      int64_t* ids = static_cast<int64_t*>(a_.ids) + row * a_.ids_row_stride;
      for (int k = 0; k < a_.topk; ++k) ids[k] = -1;
    } else {
      int32_t* ids = static_cast<int32_t*>(a_.ids) + row * a_.ids_row_stride;
      for (int k = 0; k < a_.topk; ++k) ids[k] = -1;
    }
  }

  const RouteArgs& a_;
  bool select_on_logits_ = false;
  bool sum_exps_in_order_ = false;
  int num_ranges_ = 1;
  int num_allowed_ = 0;
  // Lane-wise top lane_top_count_ of lane_top_of_ over the allowed experts, found on the way.
  F lane_top_[2];
  int lane_top_count_ = 0;
  const float* lane_top_of_ = nullptr;

  alignas(64) float z_[kRowScratch];          // softmax: logits after softcap and bias
  alignas(64) float selection_[kRowScratch];  // sigmoid / sqrtsoftplus with bias: s + bias
  alignas(64) float cand_score_[kRowScratch];
  alignas(64) int32_t cand_id_[kRowScratch];
  alignas(64) float cand_weight_[kRowScratch];
  alignas(64) int32_t rank_[kRowScratch];
  alignas(64) float top_score_[kRowScratch];
  alignas(64) int32_t top_id_[kRowScratch];
  alignas(64) float slot_weight_[kRowScratch];
  alignas(64) float group_score_[kRowScratch];
  char group_kept_[kMaxExperts];
  LaneTop2 group_top_[kMaxExperts / kW];  // per group of at least kW experts
  int32_t range_begin_[kMaxExperts];
  int32_t range_end_[kMaxExperts];
  alignas(64) float source_rows_[kSumBatch][kRowScratch];
  float* source_ = source_rows_[0];  // weight source: exp(z - max), p or s
};

// Threads over blocks of rows; every row is routed on its own, so the result does not depend on
// the thread count.
template <class V>
void route_rows(const RouteArgs& args) {
  const int64_t num_rows = args.num_tokens;
  if (num_rows <= 0) return;
  constexpr int64_t kBlockWork = 8192;    // logits per block of rows
  constexpr int64_t kSerialWork = 16384;  // fewer logits in all: threads cost more than they save
  const int64_t work_per_row = args.num_experts;
  const int64_t rows_per_block = work_per_row >= kBlockWork ? 1 : kBlockWork / work_per_row;
  const int64_t num_blocks = (num_rows + rows_per_block - 1) / rows_per_block;
  int threads = args.num_threads > 0 ? args.num_threads : omp_get_max_threads();
  if (threads > num_blocks) threads = static_cast<int>(num_blocks);
  if (threads <= 1 || num_rows * work_per_row < kSerialWork) {
    RowRouter<V> router(args);
    router.route(0, num_rows);
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    RowRouter<V> router(args);
#pragma omp for schedule(static)
    for (int64_t block = 0; block < num_blocks; ++block) {
      const int64_t begin = block * rows_per_block;
      const int64_t end = begin + rows_per_block < num_rows ? begin + rows_per_block : num_rows;
      router.route(begin, end);
    }
  }
}

}  // namespace moekit::cpu
