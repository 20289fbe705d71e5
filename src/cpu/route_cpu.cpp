// CPU routing: what each ISA build serves, the RouteProblem -> RouteArgs translation, and the
// portable scalar build of the kernel (one lane, plain C++).
#include "cpu/route_cpu.h"

#include <math.h>  // expf

#include <cstdint>
#include <cstring>
#include <string>

#include "cpu/route_cpu_kernel.h"
#include "moekit/backend.h"
#include "moekit/dtype.h"

namespace moekit::cpu {
namespace {

// One lane of everything: the same algorithms as the SIMD builds.
struct Scalar {
  static constexpr int kWidth = 1;
  using F = float;
  using I = int32_t;
  using M = bool;

  static uint32_t bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
  }
  static float from_bits(uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }

  static F set1(float v) { return v; }
  static I set1_i(int32_t v) { return v; }
  static F iota() { return 0.0f; }
  static I iota_i() { return 0; }

  static F load(const float* p) { return *p; }
  static void store(float* p, F v) { *p = v; }
  static void store_i(int32_t* p, I v) { *p = v; }
  static F load_bf16(const uint16_t* p) { return from_bits(static_cast<uint32_t>(*p) << 16); }
  static F load_f16(const uint16_t* p) { return f16_to_f32(*p); }
  // Never called with one lane (a tail is always empty); here for the interface.
  static F load_partial(const float* p, int n) { return n > 0 ? *p : 0.0f; }
  static F load_bf16_partial(const uint16_t* p, int n) { return n > 0 ? load_bf16(p) : 0.0f; }
  static F load_f16_partial(const uint16_t* p, int n) { return n > 0 ? load_f16(p) : 0.0f; }

  static F exp_as_libm(F x) { return expf(x); }

  static F add(F a, F b) { return a + b; }
  static F sub(F a, F b) { return a - b; }
  static F mul(F a, F b) { return a * b; }
  static F div(F a, F b) { return a / b; }
  static F min(F a, F b) { return b < a ? b : a; }
  static F max(F a, F b) { return a < b ? b : a; }
  static F sqrt(F a) { return __builtin_sqrtf(a); }
  static F fmadd(F a, F b, F c) { return a * b + c; }
  static F fnmadd(F a, F b, F c) { return c - a * b; }
  // Round to nearest even for |a| < 2^22 (all exp needs) without a libm call.
  static F round(F a) { return (a + 12582912.0f) - 12582912.0f; }
  static F and_bits(F a, F b) { return from_bits(bits(a) & bits(b)); }
  static F or_bits(F a, F b) { return from_bits(bits(a) | bits(b)); }
  static F xor_bits(F a, F b) { return from_bits(bits(a) ^ bits(b)); }

  static M gt(F a, F b) { return a > b; }
  static M ge(F a, F b) { return a >= b; }
  static M lt(F a, F b) { return a < b; }
  static M eq(F a, F b) { return a == b; }
  static M isnan(F a) { return a != a; }
  static M lanes_below(int n) { return n > 0; }
  static M mask_and(M a, M b) { return a && b; }
  static M mask_or(M a, M b) { return a || b; }
  static F select(M m, F if_true, F if_false) { return m ? if_true : if_false; }
  static int popcount(M m) { return m ? 1 : 0; }
  static F rotate(F v, int) { return v; }
  static float hsum(F v) { return v; }
  static float hmax(F v) { return v; }
  static float hmin(F v) { return v; }

  static I to_int(F a) { return static_cast<int32_t>(a); }
  static F to_float(I a) { return static_cast<float>(a); }
  static F as_float(I a) { return from_bits(static_cast<uint32_t>(a)); }
  static I as_int(F a) { return static_cast<int32_t>(bits(a)); }
  static I add_i(I a, I b) { return a + b; }
  static I sub_i(I a, I b) { return a - b; }
  static I and_i(I a, I b) { return a & b; }
  static I or_i(I a, I b) { return a | b; }
  static I srai(I a, int n) { return a >> n; }
  static I slli(I a, int n) { return static_cast<int32_t>(static_cast<uint32_t>(a) << n); }

  static M lt_i(I a, I b) { return a < b; }
  static I count_add(I count, M m) { return count + (m ? 1 : 0); }
  static int compress_store(float* score, int32_t* id, F v, int32_t first_id, M m) {
    *score = v;
    *id = first_id;
    return m ? 1 : 0;
  }
};

std::string not_on_cpu(const char* name, const TensorView& t) {
  return std::string(name) + " is on " + t.device().str() + ", not the CPU";
}

std::string not_contiguous(const char* name, int64_t stride) {
  return std::string(name) + " rows are not contiguous (stride " + std::to_string(stride) + ")";
}

// What every CPU build needs of a (validated) problem; "" when it is served.
std::string check_layout(const RouteProblem& p) {
  if (!p.logits.device().is_cpu()) return not_on_cpu("logits", p.logits);
  if (!p.weights.device().is_cpu()) return not_on_cpu("weights", p.weights);
  if (!p.ids.device().is_cpu()) return not_on_cpu("ids", p.ids);
  if (p.has_bias() && !p.bias.device().is_cpu()) return not_on_cpu("bias", p.bias);
  if (p.num_experts > kMaxExperts || p.topk > kMaxExperts) {  // the front end allows less
    return "num_experts " + std::to_string(p.num_experts) + " or topk " + std::to_string(p.topk) +
           " exceeds the CPU kernels' " + std::to_string(kMaxExperts);
  }
  const DType logits = p.logits.dtype();
  if (logits != DType::f32 && logits != DType::f16 && logits != DType::bf16) {
    return "logits dtype " + std::string(dtype_name(logits)) + " is not f32, f16 or bf16";
  }
  if (p.ids.dtype() != DType::i32 && p.ids.dtype() != DType::i64) {
    return "ids dtype " + std::string(dtype_name(p.ids.dtype())) + " is not i32 or i64";
  }
  // Inner strides matter only where a row has more than one element.
  if (p.num_experts > 1 && p.logits.stride(1) != 1) {
    return not_contiguous("logits", p.logits.stride(1));
  }
  if (p.topk > 1 && p.weights.stride(1) != 1) return not_contiguous("weights", p.weights.stride(1));
  if (p.topk > 1 && p.ids.stride(1) != 1) return not_contiguous("ids", p.ids.stride(1));
  if (p.has_bias() && p.num_experts > 1 && p.bias.stride(0) != 1) {
    return "bias is not contiguous (stride " + std::to_string(p.bias.stride(0)) + ")";
  }
  return "";
}

LogitsFormat logits_format(DType dtype) {
  switch (dtype) {
    case DType::f16:
      return LogitsFormat::f16;
    case DType::bf16:
      return LogitsFormat::bf16;
    default:
      return LogitsFormat::f32;
  }
}

Activation activation(Scoring scoring) {
  switch (scoring) {
    case Scoring::sigmoid:
      return Activation::sigmoid;
    case Scoring::sqrtsoftplus:
      return Activation::sqrtsoftplus;
    default:
      return Activation::softmax;
  }
}

// bias[0, n) = the bias widened to f32 (rows are contiguous: check_layout); per call, so for
// decode it should not cost more than a row.
void widen_bias(const TensorView& t, int n, float* bias) {
  switch (t.dtype()) {
    case DType::f32:
      std::memcpy(bias, t.data(), static_cast<size_t>(n) * sizeof(float));
      return;
    case DType::bf16: {
      const uint16_t* h = t.data_as<const uint16_t>();
      for (int e = 0; e < n; ++e) bias[e] = bf16_to_f32(h[e]);
      return;
    }
    case DType::f16: {
      const uint16_t* h = t.data_as<const uint16_t>();
      for (int e = 0; e < n; ++e) bias[e] = f16_to_f32(h[e]);
      return;
    }
    default:
      for (int e = 0; e < n; ++e) bias[e] = load_as_f32(t.data(), t.dtype(), e);
  }
}

// Widens the bias to f32 once per call (on this stack, shared read-only by the threads) and runs
// one ISA build over the rows.
void run(const RouteProblem& p, void (*route_rows)(const RouteArgs&)) {
  alignas(64) float bias[kRowScratch];
  RouteArgs args;
  if (p.has_bias()) {
    widen_bias(p.bias, p.num_experts, bias);
    for (int e = 0; e < p.num_experts; ++e)
      args.bias_has_nan = args.bias_has_nan || bias[e] != bias[e];
    // Whole vectors read up to two past E.
    for (int e = p.num_experts; e < p.num_experts + 2 * kMaxLanes; ++e) bias[e] = 0.0f;
    args.bias = bias;
  }
  args.logits = p.logits.data();
  args.logits_row_stride = p.logits.stride(0);
  args.logits_format = logits_format(p.logits.dtype());
  args.weights = p.weights.data_as<float>();
  args.weights_row_stride = p.weights.stride(0);
  args.ids = p.ids.data();
  args.ids_row_stride = p.ids.stride(0);
  args.ids_are_i64 = p.ids.dtype() == DType::i64;
  args.num_tokens = p.num_tokens;
  args.num_valid_tokens = p.num_valid_tokens;
  args.num_experts = p.num_experts;
  args.topk = p.topk;
  args.num_routed = p.num_routed;
  args.num_shared = p.num_shared;
  args.num_groups = p.num_groups;
  args.topk_groups = p.topk_groups;
  args.group_top2_sum = p.group_score == GroupScore::top2_sum;
  args.activation = activation(p.scoring);
  args.softcap = p.softcap;
  args.renormalize = p.renormalize;
  args.routed_scaling_factor = p.routed_scaling_factor;
  args.apply_scaling_on_output = p.apply_scaling_on_output;
  args.num_threads = p.num_threads;
  route_rows(args);
}

}  // namespace

void route_rows_scalar(const RouteArgs& args) { route_rows<Scalar>(args); }

std::string route_supports_avx512(const RouteProblem& problem) {
  if (!cpu_features().avx512) return "CPU lacks avx512f (and bw, vl, dq)";
  return check_layout(problem);
}
void route_avx512(const RouteProblem& problem) {
  // Rows of at most 8 experts fill half a 16-lane vector: E = 8 measured faster on AVX2, which
  // every AVX-512 CPU has.
  run(problem, problem.num_experts <= 8 ? route_rows_avx2 : route_rows_avx512);
}

std::string route_supports_avx2(const RouteProblem& problem) {
  if (!cpu_features().avx2) return "CPU lacks avx2 (and fma, bmi2)";
  return check_layout(problem);
}
void route_avx2(const RouteProblem& problem) { run(problem, route_rows_avx2); }

std::string route_supports_scalar(const RouteProblem& problem) { return check_layout(problem); }
void route_scalar(const RouteProblem& problem) { run(problem, route_rows_scalar); }

}  // namespace moekit::cpu
