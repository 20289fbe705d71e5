// The CPU routing kernel, written once over a small SIMD abstraction V and instantiated per ISA
// (route_cpu.cpp: scalar, route_cpu_avx2.cpp, route_cpu_avx512.cpp).
//
// V provides: kWidth; vector types F (float lanes), I (int32 lanes), M (lane mask); loads (f32,
// bf16, f16, and partial ones that read only n lanes), arithmetic, compares, select, horizontal
// max, int bit tricks for exp/log, count_add (I += mask) and compress_store (pack the masked lanes
// to the front).
//
// Linkage: each ISA file defines its V in an unnamed namespace, so every instantiation here has
// internal linkage and never meets another ISA's copy at link time. For the same reason this code
// calls only C functions (expf, tanhf, omp_*) and no inline library templates (std::min, ...),
// whose out-of-line copies could otherwise be compiled with AVX2 and picked for the scalar path.
//
// Per row (all in f32, see spec/routing.md):
//   1. Activation, vectorized, into row scratch. Softmax with renormalization selects on the
//      (softcapped, biased) logits z, since p is monotone in z and the denominator cancels: only
//      the Kr selected exps are computed. Otherwise exp(z - m) is computed for the whole row and
//      summed in index order, exactly as the reference does.
//   2. Groups: vectorized per-group max or top-2 sum, the TG best kept as ranges of experts.
//   3. Top-Kr: a threshold t that at least Kr allowed scores reach (the Kr-th largest of per-lane
//      maxima over disjoint strided subsets), the candidates >= t compressed out with their ids,
//      then ranked branch-free (score descending, lower id first).
//   4. Weights, shared slots, renormalization and scaling, with the reference's operations.
//   Softmax rows whose max is +-inf, or whose selection reaches underflowing probabilities, are
//   redone by an exact scalar copy of the reference (rare; keeps ids identical in those cases).
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
  const void* logits = nullptr;  // [T, E], inner stride 1
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

// Vector math with errors of about 1 ulp, so weights agree with libm's to well within 1e-6.
template <class V>
struct VectorMath {
  using F = typename V::F;
  using I = typename V::I;

  // Cephes-style: x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial. 2^n is applied in two
  // halves so that overflow gives inf and results down to the smallest subnormal stay right.
  static F exp(F x) {
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

  // Cephes tanhf: odd polynomial below 0.625, 1 - 2 / (exp(2|x|) + 1) above; +-inf gives +-1.
  static F tanh(F x) {
    const F sign = V::and_bits(x, V::set1(-0.0f));
    const F ax = V::xor_bits(x, sign);
    const F z = V::mul(x, x);
    F p = V::set1(-5.70498872745e-3f);
    p = V::fmadd(p, z, V::set1(2.06390887954e-2f));
    p = V::fmadd(p, z, V::set1(-5.37397155531e-2f));
    p = V::fmadd(p, z, V::set1(1.33314422036e-1f));
    p = V::fmadd(p, z, V::set1(-3.33332819422e-1f));
    const F small = V::fmadd(V::mul(p, z), x, x);
    const F e = exp(V::add(ax, ax));
    const F large = V::sub(V::set1(1.0f), V::div(V::set1(2.0f), V::add(e, V::set1(1.0f))));
    return V::select(V::lt(ax, V::set1(0.625f)), small, V::or_bits(large, sign));
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

  // 1 / (1 + exp(-x)), the reference's formula; x is never NaN here.
  static F sigmoid(F x) {
    const F e = exp(V::sub(V::set1(0.0f), x));
    return V::div(V::set1(1.0f), V::add(V::set1(1.0f), e));
  }

  // sqrt(softplus(x)), softplus(x) = x above 20; +inf counts as the largest finite float.
  static F sqrt_softplus(F x) {
    x = V::min(x, V::set1(kFloatMax));
    const F y = exp(V::min(x, V::set1(20.0f)));
    const F u = V::add(V::set1(1.0f), y);
    const F d = V::sub(u, V::set1(1.0f));
    // log1p(y) = log(u) * y / (u - 1) corrects the rounding of 1 + y; y itself when u == 1.
    const F safe_d = V::select(V::eq(d, V::set1(0.0f)), V::set1(1.0f), d);
    const F log1p_y = V::select(V::eq(d, V::set1(0.0f)), y,
                                V::mul(log_at_least_one(u), V::div(y, safe_d)));
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
    num_accumulators_ = (args.num_routed + kW - 1) / kW;
    select_on_logits_ = args.activation == Activation::softmax && args.renormalize &&
                        !(args.num_groups > 1 && args.group_top2_sum);
    range_begin_[0] = 0;
    range_end_[0] = args.num_experts;
    num_ranges_ = 1;
    num_allowed_ = args.num_experts;
  }
  RowRouter(const RowRouter&) = delete;
  RowRouter& operator=(const RowRouter&) = delete;

  void route(int64_t row) {
    if (row >= a_.num_valid_tokens) return write_padding(row);
    switch (a_.logits_format) {
      case LogitsFormat::f32:
        return route_row<LogitsFormat::f32>(
            static_cast<const float*>(a_.logits) + row * a_.logits_row_stride, row);
      case LogitsFormat::f16:
        return route_row<LogitsFormat::f16>(
            static_cast<const uint16_t*>(a_.logits) + row * a_.logits_row_stride, row);
      case LogitsFormat::bf16:
        return route_row<LogitsFormat::bf16>(
            static_cast<const uint16_t*>(a_.logits) + row * a_.logits_row_stride, row);
    }
  }

 private:
  // Softmax selection below this log-distance from the row max (p < ~1e-33 / E) risks ties that
  // only the reference's exact p values resolve; such rows go to route_softmax_exactly.
  static constexpr float kUnderflowLogMargin = -75.0f;
  static constexpr float kUnderflowExp = 2.6e-33f;  // ~exp(-75)
  // Top-k by threshold for Kr up to this, by insertion beyond (and when the threshold admits
  // more than kRankLimit candidates, e.g. rows of equal scores).
  static constexpr int kMaxThresholdK = 64;
  static constexpr int kMaxAccumulators = (kMaxThresholdK + kW - 1) / kW;
  static constexpr int kRankLimit = 128;
  // Rows with at most this many allowed experts skip the threshold: all are candidates.
  static constexpr int kDirectLimit = 2 * kW > 16 ? 2 * kW : 16;

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

  // ---- The row.

  template <LogitsFormat kFormat>
  void route_row(const void* row_logits, int64_t row) {
    const int kr = a_.num_routed;
    if (a_.activation != Activation::softmax) {
      load_gate_scores<kFormat>(row_logits);
      const float* selection = a_.bias != nullptr ? selection_ : source_;
      keep_best_groups(selection);
      select_top(selection, kr);
      // The selected weights again with libm, as the reference computes them: then even the
      // unnormalized sums in shared slots (where one ulp can exceed 1e-6) match it bit for bit.
      for (int k = 0; k < kr; ++k) {
        slot_weight_[k] = exact_gate_score(load_logit<kFormat>(row_logits, top_id_[k]));
      }
      return write_slots(row, /*normalize_in_double=*/false);
    }
    const float row_max = load_softmax_logits<kFormat>(row_logits);
    if (!(row_max > -kInf && row_max < kInf)) {
      return route_softmax_exactly<kFormat>(row_logits, row);
    }
    if (select_on_logits_) {
      keep_best_groups(z_);
      select_top(z_, kr);
      if (top_score_[kr - 1] - row_max < kUnderflowLogMargin) {
        return route_softmax_exactly<kFormat>(row_logits, row);
      }
      // exp(z - max) of the selected only: the softmax denominator cancels in renormalizing.
      const F m = V::set1(row_max);
      for (int k = 0; k < kr; k += kW) {
        V::store(slot_weight_ + k, Math::exp(V::sub(V::load(top_score_ + k), m)));
      }
      return write_slots(row, /*normalize_in_double=*/true);
    }
    const float sum = exp_minus_max(row_max);
    keep_best_groups(source_);
    select_top(source_, kr);
    if (top_score_[kr - 1] < kUnderflowExp) return route_softmax_exactly<kFormat>(row_logits, row);
    if (a_.renormalize) {
      for (int k = 0; k < kr; ++k) slot_weight_[k] = top_score_[k];
      return write_slots(row, /*normalize_in_double=*/true);
    }
    for (int k = 0; k < kr; ++k) slot_weight_[k] = top_score_[k] / sum;
    write_slots(row, /*normalize_in_double=*/false);
  }

  // z_ = logits, softcapped, plus bias, NaN -> -inf (lanes past E: -inf). Returns max z.
  template <LogitsFormat kFormat>
  float load_softmax_logits(const void* row_logits) {
    const int num_experts = a_.num_experts;
    F row_max = V::set1(-kInf);
    int e = 0;
    for (; e + kW <= num_experts; e += kW) {
      const F z = softmax_logit(load_logits<kFormat>(row_logits, e), e);
      V::store(z_ + e, z);
      row_max = V::max(row_max, z);
    }
    if (e < num_experts) {
      F z = softmax_logit(load_logits_partial<kFormat>(row_logits, e, num_experts - e), e);
      z = V::select(V::lanes_below(num_experts - e), z, V::set1(-kInf));
      V::store(z_ + e, z);
      row_max = V::max(row_max, z);
    }
    return V::hmax(row_max);
  }
  F softmax_logit(F x, int e) const {
    F z = x;
    if (a_.softcap > 0.0f) {
      const F cap = V::set1(a_.softcap);
      z = V::mul(cap, Math::tanh(V::div(z, cap)));
    }
    if (a_.bias != nullptr) z = V::add(z, V::load(a_.bias + e));
    // Checks x too: vector min/max inside tanh may turn a NaN into a number.
    return V::select(V::mask_or(V::isnan(x), V::isnan(z)), V::set1(-kInf), z);
  }

  // source_ = exp(z_ - row_max). Without renormalization also returns their sum, added in index
  // order as the reference does (the weights are e / sum then).
  float exp_minus_max(float row_max) {
    const int num_experts = a_.num_experts;
    const F m = V::set1(row_max);
    for (int e = 0; e < num_experts; e += kW) {
      V::store(source_ + e, Math::exp(V::sub(V::load(z_ + e), m)));
    }
    float sum = 0.0f;
    if (!a_.renormalize) {
      for (int e = 0; e < num_experts; ++e) sum += source_[e];
    }
    return sum;
  }

  // Sigmoid / sqrtsoftplus: source_ = s (weight source), selection_ = s + bias (NaN -> -inf).
  template <LogitsFormat kFormat>
  void load_gate_scores(const void* row_logits) {
    const int num_experts = a_.num_experts;
    int e = 0;
    for (; e + kW <= num_experts; e += kW) gate_score(load_logits<kFormat>(row_logits, e), e);
    if (e < num_experts) {
      gate_score(load_logits_partial<kFormat>(row_logits, e, num_experts - e), e);
    }
  }
  void gate_score(F x, int e) {
    const F v = nan_to_neg_inf(x);
    const F s = a_.activation == Activation::sigmoid ? Math::sigmoid(v) : Math::sqrt_softplus(v);
    V::store(source_ + e, s);
    if (a_.bias != nullptr) {
      F selection = V::add(s, V::load(a_.bias + e));
      if (a_.bias_has_nan) selection = nan_to_neg_inf(selection);
      V::store(selection_ + e, selection);
    }
  }

  // The reference's sigmoid / sqrtsoftplus of one logit, with libm.
  float exact_gate_score(float x) const {
    float v = x != x ? -kInf : x;
    if (a_.activation == Activation::sigmoid) return 1.0f / (1.0f + expf(-v));
    if (v == kInf) v = kFloatMax;
    return __builtin_sqrtf(v > 20.0f ? v : log1pf(expf(v)));
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

  // Restricts selection to the TG best groups (ties: lower group id), as merged id ranges.
  void keep_best_groups(const float* selection) {
    const int num_groups = a_.num_groups;
    if (num_groups == 1) return;
    const int group_size = a_.num_experts / num_groups;
    for (int g = 0; g < num_groups; ++g) {
      group_score_[g] = group_score(selection + g * group_size, group_size);
    }
    V::store(group_score_ + num_groups, V::set1(-kInf));  // defined lanes for the ranking
    select_from(group_score_, nullptr, num_groups, a_.topk_groups);
    for (int g = 0; g < num_groups; ++g) group_kept_[g] = 0;
    for (int i = 0; i < a_.topk_groups; ++i) group_kept_[top_id_[i]] = 1;
    num_ranges_ = 0;
    for (int g = 0; g < num_groups; ++g) {
      if (!group_kept_[g]) continue;
      if (num_ranges_ > 0 && range_end_[num_ranges_ - 1] == g * group_size) {
        range_end_[num_ranges_ - 1] += group_size;
      } else {
        range_begin_[num_ranges_] = g * group_size;
        range_end_[num_ranges_] = (g + 1) * group_size;
        ++num_ranges_;
      }
    }
    num_allowed_ = a_.topk_groups * group_size;
  }

  // Group max, or the sum of the two largest (two equal maxima give 2 max); NaN -> -inf.
  float group_score(const float* s, int n) const {
    const bool top2 = a_.group_top2_sum && n >= 2;
    float first = -kInf, second = -kInf;
    if (n >= kW) {
      // Lane-wise top two, then the top two of their union.
      F lane_first = V::set1(-kInf), lane_second = V::set1(-kInf);
      for (int i = 0; i < n; i += kW) {
        F v = V::load(s + i);
        if (n - i < kW) v = V::select(V::lanes_below(n - i), v, V::set1(-kInf));
        lane_second = V::max(lane_second, V::min(lane_first, v));
        lane_first = V::max(lane_first, v);
      }
      first = V::hmax(lane_first);
      if (top2) {
        const M is_first = V::eq(lane_first, V::set1(first));
        if (V::popcount(is_first) >= 2) {
          second = first;
        } else {
          second = max_of(V::hmax(lane_second),
                          V::hmax(V::select(is_first, V::set1(-kInf), lane_first)));
        }
      }
    } else {
      for (int i = 0; i < n; ++i) {
        const float v = s[i];
        if (v > first) {
          second = first;
          first = v;
        } else if (v > second) {
          second = v;
        }
      }
    }
    const float score = top2 ? first + second : first;
    return score != score ? -kInf : score;
  }

  // ---- Top-k.

  // top_score_/top_id_[0, k) = the k best allowed experts by selection, in selection order.
  void select_top(const float* selection, int k) {
    float threshold = -kInf;
    if (num_allowed_ > kDirectLimit && k <= kMaxThresholdK) {
      threshold = subset_threshold(selection, k);
    }
    const int count = collect(selection, threshold);
    select_from(cand_score_, cand_id_, count, k);
  }

  // A score that at least k allowed experts reach: the k-th largest of num_accumulators * kW
  // maxima over disjoint subsets of the allowed experts (each maximum is a distinct expert; an
  // empty subset gives -inf, which every expert reaches).
  float subset_threshold(const float* selection, int k) {
    const int num_acc = num_accumulators_;
    F acc[kMaxAccumulators];
    for (int i = 0; i < num_acc; ++i) acc[i] = V::set1(-kInf);
    int a = 0;
    for (int r = 0; r < num_ranges_; ++r) {
      const int end = range_end_[r];
      for (int e = range_begin_[r]; e < end; e += kW) {
        F v = V::load(selection + e);
        if (end - e < kW) v = V::select(V::lanes_below(end - e), v, V::set1(-kInf));
        acc[a] = V::max(acc[a], v);
        if (++a == num_acc) a = 0;
      }
    }
    for (int i = 0; i < num_acc; ++i) V::store(subset_max_ + i * kW, acc[i]);
    select_from(subset_max_, nullptr, num_acc * kW, k);
    return top_score_[k - 1];
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
        const I ids = V::add_i(V::iota_i(), V::set1_i(e));
        count += V::compress_store(cand_score_ + count, cand_id_ + count, v, ids, V::ge(v, t));
      }
      if (e < end) {
        const F v = V::load(selection + e);
        const I ids = V::add_i(V::iota_i(), V::set1_i(e));
        const M keep = V::mask_and(V::ge(v, t), V::lanes_below(end - e));
        count += V::compress_store(cand_score_ + count, cand_id_ + count, v, ids, keep);
      }
    }
    V::store(cand_score_ + count, V::set1(-kInf));  // defined lanes for the ranking's last vector
    return count;
  }

  // top_score_/top_id_[0, k) = the k best of n (score, id) pairs given in id order (ids null:
  // the index is the id). Scores are never NaN.
  void select_from(const float* score, const int32_t* id, int n, int k) {
    if (n <= kRankLimit) {
      rank(score, n);
      for (int i = 0; i < n; ++i) {
        const int r = rank_[i];
        const int slot = r < k ? r : k;  // slot k is a sink for the unselected
        top_score_[slot] = score[i];
        top_id_[slot] = id != nullptr ? id[i] : i;
      }
    } else {
      insert_best(score, id, n, k);
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
      for (int j = block_end; j < n; ++j) count = V::count_add(count, V::gt(V::set1(score[j]), mine));
      V::store_i(rank_ + b, count);
    }
  }

  // Insertion into a sorted list of the best k; for long candidate lists.
  void insert_best(const float* score, const int32_t* id, int n, int k) {
    int size = 0;
    for (int i = 0; i < n; ++i) {
      const float s = score[i];
      if (size == k && !(s > top_score_[k - 1])) continue;  // later ids lose ties
      int pos = size < k ? size++ : k - 1;
      while (pos > 0 && s > top_score_[pos - 1]) {
        top_score_[pos] = top_score_[pos - 1];
        top_id_[pos] = top_id_[pos - 1];
        --pos;
      }
      top_score_[pos] = s;
      top_id_[pos] = id != nullptr ? id[i] : i;
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
      double routed_sum = 0.0;
      for (int k = 0; k < kr; ++k) routed_sum += slot_weight_[k];
      for (int k = 0; k < kr; ++k) {
        slot_weight_[k] = static_cast<float>(slot_weight_[k] / routed_sum);
      }
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
  int num_accumulators_ = 1;
  bool select_on_logits_ = false;
  int num_ranges_ = 1;
  int num_allowed_ = 0;

  alignas(64) float z_[kRowScratch];          // softmax: logits after softcap and bias
  alignas(64) float source_[kRowScratch];     // weight source: exp(z - max), p or s
  alignas(64) float selection_[kRowScratch];  // sigmoid / sqrtsoftplus with bias: s + bias
  alignas(64) float cand_score_[kRowScratch];
  alignas(64) int32_t cand_id_[kRowScratch];
  alignas(64) int32_t rank_[kRowScratch];
  alignas(64) float top_score_[kRowScratch];
  alignas(64) int32_t top_id_[kRowScratch];
  alignas(64) float slot_weight_[kRowScratch];
  alignas(64) float group_score_[kRowScratch];
  alignas(64) float subset_max_[kMaxAccumulators * kW];
  char group_kept_[kMaxExperts];
  int32_t range_begin_[kMaxExperts];
  int32_t range_end_[kMaxExperts];
};

// Threads over blocks of rows; every row is routed on its own, so the result does not depend on
// the thread count.
template <class V>
void route_rows(const RouteArgs& args) {
  const int64_t num_rows = args.num_tokens;
  if (num_rows <= 0) return;
  constexpr int64_t kBlockWork = 8192;   // logits per block of rows
  constexpr int64_t kSerialWork = 16384;  // below this many logits, threads cost more than they save
  const int64_t work_per_row = args.num_experts;
  const int64_t rows_per_block = work_per_row >= kBlockWork ? 1 : kBlockWork / work_per_row;
  const int64_t num_blocks = (num_rows + rows_per_block - 1) / rows_per_block;
  int64_t threads = args.num_threads > 0 ? args.num_threads : omp_get_max_threads();
  if (threads > num_blocks) threads = num_blocks;
  if (threads <= 1 || num_rows * work_per_row < kSerialWork) {
    RowRouter<V> router(args);
    for (int64_t row = 0; row < num_rows; ++row) router.route(row);
    return;
  }
#pragma omp parallel num_threads(static_cast<int>(threads))
  {
    RowRouter<V> router(args);
#pragma omp for schedule(static)
    for (int64_t block = 0; block < num_blocks; ++block) {
      const int64_t begin = block * rows_per_block;
      const int64_t end = begin + rows_per_block < num_rows ? begin + rows_per_block : num_rows;
      for (int64_t row = begin; row < end; ++row) router.route(row);
    }
  }
}

}  // namespace moekit::cpu
