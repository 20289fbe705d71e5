// FP8 argument errors (spec/fp8.md): each invalid call throws moekit::Error naming the op, the
// argument and its value, and writes nothing (the outputs keep their sentinel bytes).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "moekit/error.h"
#include "moekit/ops/fp8.h"

namespace moekit {
namespace {

constexpr uint8_t kSentinel = 0x5a;

Tensor sentinel(DType dtype, std::initializer_list<int64_t> shape) {
  Tensor t = Tensor::empty(dtype, shape);
  std::memset(t.data(), kSentinel, t.nbytes());
  return t;
}

bool untouched(const Tensor& t) {
  const auto* p = t.data_as<const uint8_t>();
  for (size_t i = 0; i < t.nbytes(); ++i)
    if (p[i] != kSentinel) return false;
  return true;
}

// Runs call, which must throw Error(op, argument, value); the outputs must stay untouched.
void expect_error(const std::function<void()>& call, const std::string& op,
                  const std::string& argument, const std::string& value,
                  std::initializer_list<const Tensor*> outputs) {
  SCOPED_TRACE(op + ": " + argument + "=" + value);
  try {
    call();
    ADD_FAILURE() << "no error thrown";
  } catch (const Error& e) {
    EXPECT_EQ(e.op(), op) << e.what();
    EXPECT_EQ(e.argument(), argument) << e.what();
    if (!value.empty()) {
      EXPECT_EQ(e.value(), value) << e.what();
    }
    EXPECT_EQ(std::string(e.what()).rfind(op + ": " + argument + "=", 0), 0u) << e.what();
  }
  for (const Tensor* t : outputs) EXPECT_TRUE(untouched(*t)) << "an output was written";
}

TensorView on_gpu(const TensorView& t) {
  return TensorView(t.data(), t.dtype(), t.shape(), t.strides(), Device::gpu(0));
}
TensorView with_dtype(const TensorView& t, DType dtype) {
  return TensorView(t.data(), dtype, t.shape(), t.strides(), t.device());
}
TensorView with_null_data(const TensorView& t) {
  return TensorView(nullptr, t.dtype(), t.shape(), t.strides(), t.device());
}

// ---- per_token_group_quant_fp8

struct QuantCall {
  Tensor x = Tensor::empty(DType::bf16, {3, 256});
  Tensor q = sentinel(DType::f8e4m3, {3, 256});
  Tensor scales = sentinel(DType::f32, {3, 2});
  GroupQuantConfig config;
  QuantCall() { std::memset(x.data(), 0, x.nbytes()); }
};

constexpr const char* kQuant = "per_token_group_quant_fp8";

TEST(Fp8Errors, GroupQuantArguments) {
  QuantCall c;
  auto run = [&](const TensorView& x, const TensorView& q, const TensorView& s,
                 const GroupQuantConfig& config, const OpOptions& options = {}) {
    return [=] { per_token_group_quant_fp8(x, q, s, config, options); };
  };
  const std::initializer_list<const Tensor*> outs = {&c.q, &c.scales};
  {
    const int64_t shape[] = {1, 3, 256};
    expect_error(run(TensorView(c.x.data(), DType::bf16, shape), c.q, c.scales, c.config), kQuant,
                 "x.shape", "[1, 3, 256]", outs);
  }
  expect_error(run(with_dtype(c.x, DType::i32), c.q, c.scales, c.config), kQuant, "x.dtype", "i32",
               outs);
  {
    const int64_t shape[] = {3, 256}, strides[] = {512, 2};
    expect_error(run(TensorView(c.x.data(), DType::bf16, shape, strides), c.q, c.scales, c.config),
                 kQuant, "x.strides", "[512, 2]", outs);
  }
  for (int group : {8, 40, 272, 0, -16}) {
    GroupQuantConfig config;
    config.group_size = group;
    expect_error(run(c.x, c.q, c.scales, config), kQuant, "group_size", std::to_string(group),
                 outs);
  }
  {
    GroupQuantConfig config;
    config.group_size = 96;  // a multiple of 16 that does not divide K = 256
    expect_error(run(c.x, c.q, c.scales, config), kQuant, "group_size", "96", outs);
    try {
      per_token_group_quant_fp8(c.x, c.q, c.scales, config);
    } catch (const Error& e) {
      EXPECT_STREQ(e.what(), "per_token_group_quant_fp8: group_size=96 does not divide K=256");
    }
  }
  {
    GroupQuantConfig config;
    config.layout = ScaleLayout::packed_ue8m0;  // without ue8m0
    Tensor words = sentinel(DType::i32, {1, 4});
    expect_error(run(c.x, c.q, words, config), kQuant, "layout", "packed_ue8m0", {&c.q, &words});
  }
  for (float eps : {0.0f, -1.0f, std::numeric_limits<float>::infinity(), std::nanf("")}) {
    GroupQuantConfig config;
    config.eps = eps;
    expect_error(run(c.x, c.q, c.scales, config), kQuant, "eps", "", outs);
  }
  {
    Tensor q = sentinel(DType::f8e4m3, {3, 128});
    expect_error(run(c.x, q, c.scales, c.config), kQuant, "q.shape", "[3, 128]", {&q, &c.scales});
  }
  expect_error(run(c.x, with_dtype(c.q, DType::f8e5m2), c.scales, c.config), kQuant, "q.dtype",
               "f8e5m2", outs);
  {
    Tensor s = sentinel(DType::f32, {2, 3});  // the column-major shape, given for row-major
    expect_error(run(c.x, c.q, s, c.config), kQuant, "scales.shape", "[2, 3]", {&c.q, &s});
  }
  {
    GroupQuantConfig config;
    config.layout = ScaleLayout::column_major_tma;  // storage [2, align4(3) = 4]
    Tensor s = sentinel(DType::f32, {2, 3});
    expect_error(run(c.x, c.q, s, config), kQuant, "scales.shape", "[2, 3]", {&c.q, &s});
  }
  {
    GroupQuantConfig config;
    config.layout = ScaleLayout::packed_ue8m0;
    config.ue8m0 = true;
    Tensor s = sentinel(DType::f32, {1, 4});  // right shape, but packed words are i32
    expect_error(run(c.x, c.q, s, config), kQuant, "scales.dtype", "f32", {&c.q, &s});
  }
  {
    Tensor s = sentinel(DType::f32, {3, 4});
    const int64_t shape[] = {3, 2}, strides[] = {4, 1};
    expect_error(run(c.x, c.q, TensorView(s.data(), DType::f32, shape, strides), c.config), kQuant,
                 "scales.strides", "[4, 1]", {&c.q, &s});
  }
  expect_error(run(c.x, on_gpu(c.q), c.scales, c.config), kQuant, "q.device", "gpu:0", outs);
  expect_error(run(c.x, c.q, on_gpu(c.scales), c.config), kQuant, "scales.device", "gpu:0", outs);
  expect_error(run(with_null_data(c.x), c.q, c.scales, c.config), kQuant, "x.data", "null", outs);
  expect_error(run(c.x, c.q, c.scales, c.config, {Backend::gpu}), kQuant, "backend", "gpu", outs);
  expect_error([&] { explain_per_token_group_quant_fp8(c.x, c.q, c.scales, GroupQuantConfig{8}); },
               kQuant, "group_size", "8", outs);
}

// ---- block_fp8_gemm

struct GemmCall {
  Tensor a = Tensor::empty(DType::f8e4m3, {3, 256});
  Tensor as = Tensor::empty(DType::f32, {3, 2});
  Tensor b = Tensor::empty(DType::f8e4m3, {128, 256});
  Tensor bs = Tensor::empty(DType::f32, {1, 2});
  Tensor bias = Tensor::empty(DType::f32, {128});
  Tensor out = sentinel(DType::bf16, {3, 128});
  GemmCall() {
    for (Tensor* t : {&a, &as, &b, &bs, &bias}) std::memset(t->data(), 0, t->nbytes());
  }
};

constexpr const char* kGemm = "block_fp8_gemm";

TEST(Fp8Errors, GemmArguments) {
  GemmCall c;
  auto run = [&](const TensorView& a, const TensorView& as, ScaleLayout layout, const TensorView& b,
                 const TensorView& bs, const std::optional<TensorView>& bias, const TensorView& out,
                 const OpOptions& options = {}) {
    return [=] { block_fp8_gemm(a, as, layout, b, bs, bias, out, options); };
  };
  const auto row = ScaleLayout::row_major;
  const std::initializer_list<const Tensor*> outs = {&c.out};
  expect_error(run(with_dtype(c.a, DType::bf16), c.as, row, c.b, c.bs, std::nullopt, c.out), kGemm,
               "a.dtype", "bf16", outs);
  {
    Tensor b = Tensor::empty(DType::f8e4m3, {128, 200});
    expect_error(run(c.a, c.as, row, b, c.bs, std::nullopt, c.out), kGemm, "b.shape", "[128, 200]",
                 outs);
  }
  expect_error(run(c.a, c.as, ScaleLayout::column_major, c.b, c.bs, std::nullopt, c.out), kGemm,
               "a_scales.shape", "[3, 2]", outs);
  {
    Tensor words = Tensor::empty(DType::f32, {1, 4});  // packed storage shape, f32 instead of i32
    expect_error(run(c.a, words, ScaleLayout::packed_ue8m0, c.b, c.bs, std::nullopt, c.out), kGemm,
                 "a_scales.dtype", "f32", outs);
  }
  {
    Tensor bs = Tensor::empty(DType::f32, {2, 2});
    expect_error(run(c.a, c.as, row, c.b, bs, std::nullopt, c.out), kGemm, "b_scales.shape",
                 "[2, 2]", outs);
  }
  expect_error(run(c.a, c.as, row, c.b, with_dtype(c.bs, DType::f16), std::nullopt, c.out), kGemm,
               "b_scales.dtype", "f16", outs);
  {
    Tensor bias = Tensor::empty(DType::f32, {64});
    expect_error(run(c.a, c.as, row, c.b, c.bs, bias.view(), c.out), kGemm, "bias.shape", "[64]",
                 outs);
  }
  expect_error(run(c.a, c.as, row, c.b, c.bs, with_dtype(c.bias, DType::i32), c.out), kGemm,
               "bias.dtype", "i32", outs);
  {
    Tensor out = sentinel(DType::f32, {3, 64});
    expect_error(run(c.a, c.as, row, c.b, c.bs, std::nullopt, out), kGemm, "out.shape", "[3, 64]",
                 {&out});
  }
  expect_error(run(c.a, c.as, row, c.b, c.bs, std::nullopt, with_dtype(c.out, DType::f8e4m3)),
               kGemm, "out.dtype", "f8e4m3", outs);
  {
    Tensor out = sentinel(DType::f32, {3, 256});
    const int64_t shape[] = {3, 128}, strides[] = {256, 2};
    expect_error(run(c.a, c.as, row, c.b, c.bs, std::nullopt,
                     TensorView(out.data(), DType::f32, shape, strides)),
                 kGemm, "out.strides", "[256, 2]", {&out});
  }
  expect_error(run(c.a, c.as, row, on_gpu(c.b), c.bs, std::nullopt, c.out), kGemm, "b.device",
               "gpu:0", outs);
  expect_error(run(c.a, c.as, row, c.b, c.bs, on_gpu(c.bias), c.out), kGemm, "bias.device", "gpu:0",
               outs);
  expect_error(run(c.a, c.as, row, with_null_data(c.b), c.bs, std::nullopt, c.out), kGemm, "b.data",
               "null", outs);
  {
    const int64_t shape[] = {3, 2};  // f32 scales one byte off their alignment
    const TensorView misaligned(c.as.data_as<char>() + 1, DType::f32, shape);
    expect_error(run(c.a, misaligned, row, c.b, c.bs, std::nullopt, c.out), kGemm, "a_scales.data",
                 "", outs);
  }
  expect_error(run(c.a, c.as, static_cast<ScaleLayout>(7), c.b, c.bs, std::nullopt, c.out), kGemm,
               "a_scales_layout", "", outs);
  expect_error(
      [&] {
        explain_block_fp8_gemm(c.a, c.as, row, c.b, with_dtype(c.bs, DType::f16), std::nullopt,
                               c.out);
      },
      kGemm, "b_scales.dtype", "f16", outs);
}

// ---- grouped_block_fp8_gemm: its own checks name the 3-D argument; group 0's planes go through
// block_fp8_gemm's checks (so those name the plane's shape).

struct GroupedCall {
  Tensor a = Tensor::empty(DType::f8e4m3, {2, 3, 256});
  Tensor as = Tensor::empty(DType::f32, {2, 3, 2});
  Tensor b = Tensor::empty(DType::f8e4m3, {2, 128, 256});
  Tensor bs = Tensor::empty(DType::f32, {2, 1, 2});
  Tensor out = sentinel(DType::bf16, {2, 3, 128});
  GroupedCall() {
    for (Tensor* t : {&a, &as, &b, &bs}) std::memset(t->data(), 0, t->nbytes());
  }
};

constexpr const char* kGrouped = "grouped_block_fp8_gemm";

TEST(Fp8Errors, GroupedGemmArguments) {
  GroupedCall c;
  const auto row = ScaleLayout::row_major;
  auto run = [&](const TensorView& a, const TensorView& as, const TensorView& b,
                 const TensorView& bs, const TensorView& out) {
    return [=] { grouped_block_fp8_gemm(a, as, row, b, bs, out); };
  };
  const std::initializer_list<const Tensor*> outs = {&c.out};
  {
    Tensor a = Tensor::empty(DType::f8e4m3, {3, 256});
    expect_error(run(a, c.as, c.b, c.bs, c.out), kGrouped, "a.shape", "[3, 256]", outs);
  }
  {
    Tensor b = Tensor::empty(DType::f8e4m3, {3, 128, 256});
    expect_error(run(c.a, c.as, b, c.bs, c.out), kGrouped, "b.shape", "[3, 128, 256]", outs);
  }
  {
    Tensor out = sentinel(DType::bf16, {1, 3, 128});
    expect_error(run(c.a, c.as, c.b, c.bs, out), kGrouped, "out.shape", "[1, 3, 128]", {&out});
  }
  {
    Tensor bs = Tensor::empty(DType::f32, {2, 1, 3});  // group 0's plane [1, 3]: K has 2 blocks
    expect_error(run(c.a, c.as, c.b, bs, c.out), kGrouped, "b_scales.shape", "[1, 3]", outs);
  }
  expect_error(run(c.a, c.as, c.b, c.bs, with_dtype(c.out, DType::i32)), kGrouped, "out.dtype",
               "i32", outs);
  {
    Tensor out = sentinel(DType::bf16, {3 * 128 + 64});  // the second group overlaps the first
    const int64_t shape[] = {2, 3, 128}, strides[] = {64, 128, 1};
    expect_error(run(c.a, c.as, c.b, c.bs, TensorView(out.data(), DType::bf16, shape, strides)),
                 kGrouped, "out.strides", "", {&out});
  }
  expect_error([&] { explain_grouped_block_fp8_gemm(c.a, c.as, row, on_gpu(c.b), c.bs, c.out); },
               kGrouped, "b.device", "gpu:0", outs);
}

TEST(Fp8Errors, GroupedGemmMaskedArguments) {
  GroupedCall c;
  const auto row = ScaleLayout::row_major;
  constexpr const char* kMasked = "grouped_block_fp8_gemm_masked";
  const auto run = [&](const TensorView& masked_m) {
    return [=] { grouped_block_fp8_gemm_masked(c.a, c.as, row, c.b, c.bs, masked_m, c.out); };
  };
  const std::initializer_list<const Tensor*> outs = {&c.out};
  Tensor three = Tensor::empty(DType::i32, {3}), counts = Tensor::empty(DType::i32, {2});
  std::memset(counts.data(), 0, counts.nbytes());
  expect_error(run(three), kMasked, "masked_m.shape", "[3]", outs);
  expect_error(run(with_dtype(counts, DType::i64)), kMasked, "masked_m.dtype", "i64", outs);
  expect_error(run(on_gpu(counts)), kMasked, "masked_m.device", "gpu:0", outs);
  expect_error(run(with_null_data(counts)), kMasked, "masked_m.data", "null", outs);
  {  // the op's own checks name the masked op
    Tensor a = Tensor::empty(DType::f8e4m3, {3, 256});
    expect_error([&] { grouped_block_fp8_gemm_masked(a, c.as, row, c.b, c.bs, counts, c.out); },
                 kMasked, "a.shape", "[3, 256]", outs);
  }
  // The hint of expected rows: at least 1 (above M it counts as M).
  for (const int64_t expected : {int64_t{0}, int64_t{-3}})
    expect_error(
        [&] { grouped_block_fp8_gemm_masked(c.a, c.as, row, c.b, c.bs, counts, c.out, expected); },
        kMasked, "expected_rows", std::to_string(expected), outs);
  EXPECT_THROW(explain_grouped_block_fp8_gemm_masked(c.a, c.as, row, c.b, c.bs, counts, c.out, 0),
               Error);
}

// grouped_block_fp8_gemm_contiguous: m_indices i32 [M] on a's device; b and b_scales [G, ...] of
// one G; a, its scales, out [M, N] and b's plane 0 through block_fp8_gemm's checks.
TEST(Fp8Errors, GroupedGemmContiguousArguments) {
  constexpr const char* kContiguous = "grouped_block_fp8_gemm_contiguous";
  const auto row = ScaleLayout::row_major;
  Tensor a = Tensor::empty(DType::f8e4m3, {3, 256}), as = Tensor::empty(DType::f32, {3, 2});
  Tensor b = Tensor::empty(DType::f8e4m3, {2, 128, 256}), bs = Tensor::empty(DType::f32, {2, 1, 2});
  Tensor indices = Tensor::empty(DType::i32, {3});
  for (Tensor* t : {&a, &as, &b, &bs, &indices}) std::memset(t->data(), 0, t->nbytes());
  Tensor out = sentinel(DType::bf16, {3, 128});
  const auto run = [&](const TensorView& m_indices) {
    return [=] { grouped_block_fp8_gemm_contiguous(a, as, row, b, bs, m_indices, out); };
  };
  const std::initializer_list<const Tensor*> outs = {&out};
  {
    Tensor four = Tensor::empty(DType::i32, {4}), column = Tensor::empty(DType::i32, {3, 1});
    expect_error(run(four), kContiguous, "m_indices.shape", "[4]", outs);
    expect_error(run(column), kContiguous, "m_indices.shape", "[3, 1]", outs);
  }
  expect_error(run(with_dtype(indices, DType::i64)), kContiguous, "m_indices.dtype", "i64", outs);
  expect_error(run(on_gpu(indices)), kContiguous, "m_indices.device", "gpu:0", outs);
  expect_error(run(with_null_data(indices)), kContiguous, "m_indices.data", "null", outs);
  {
    Tensor bs3 = Tensor::empty(DType::f32, {3, 1, 2});  // b has G=2
    expect_error([&] { grouped_block_fp8_gemm_contiguous(a, as, row, b, bs3, indices, out); },
                 kContiguous, "b_scales.shape", "[3, 1, 2]", outs);
  }
  {
    const TensorView b2(b.data(), DType::f8e4m3, {128, 256});  // one expert's [N, K]
    expect_error([&] { grouped_block_fp8_gemm_contiguous(a, as, row, b2, bs, indices, out); },
                 kContiguous, "b.shape", "[128, 256]", outs);
  }
  {
    Tensor out4 = sentinel(DType::bf16, {4, 128});
    expect_error([&] { grouped_block_fp8_gemm_contiguous(a, as, row, b, bs, indices, out4); },
                 kContiguous, "out.shape", "[4, 128]", {&out4, &out});
  }
  expect_error(
      [&] { explain_grouped_block_fp8_gemm_contiguous(a, as, row, b, bs, on_gpu(indices), out); },
      kContiguous, "m_indices.device", "gpu:0", outs);
  // The valid call runs (every row's index 0) and writes out.
  grouped_block_fp8_gemm_contiguous(a, as, row, b, bs, indices, out);
  EXPECT_FALSE(untouched(out));
}

// silu_and_mul_grouped_block_fp8_gemm_masked: its own checks (x [G, M, 2K], b against x, the
// quantization's group and layout, the hint, the workspace) and its halves' name the op; nothing is
// written to out or the workspace on error.
TEST(Fp8Errors, SiluGroupedGemmMaskedArguments) {
  constexpr const char* kOp = "silu_and_mul_grouped_block_fp8_gemm_masked";
  Tensor x = Tensor::empty(DType::bf16, {2, 3, 512});
  std::memset(x.data(), 0, x.nbytes());
  Tensor b = Tensor::empty(DType::f8e4m3, {2, 128, 256});
  std::memset(b.data(), 0, b.nbytes());
  Tensor bs = Tensor::empty(DType::f32, {2, 1, 2});
  std::memset(bs.data(), 0, bs.nbytes());
  Tensor counts = Tensor::empty(DType::i32, {2});
  std::memset(counts.data(), 0, counts.nbytes());
  Tensor out = sentinel(DType::bf16, {2, 3, 128});
  const size_t bytes = silu_and_mul_grouped_block_fp8_gemm_masked_workspace_size(2, 3, 256);
  EXPECT_EQ(bytes, 1536u + 2 * 2 * 4 * 4);  // q [2, 3, 256], then f32 scales [2, 2, align4(3)]
  EXPECT_EQ(silu_and_mul_grouped_block_fp8_gemm_masked_workspace_size(0, 3, 256), 0u);
  Tensor space = sentinel(DType::u8, {static_cast<int64_t>(bytes) + 16});
  void* ws = space.data_as<uint8_t>() + (16 - reinterpret_cast<uintptr_t>(space.data()) % 16) % 16;
  const std::initializer_list<const Tensor*> outs = {&out, &space};
  const auto run = [&](const TensorView& x_, const TensorView& b_, const GroupQuantConfig& config,
                       int64_t expected, void* workspace, size_t workspace_bytes) {
    return [=] {
      silu_and_mul_grouped_block_fp8_gemm_masked(x_, counts, b_, bs, out, config, expected,
                                                 workspace, workspace_bytes, {Backend::cpu});
    };
  };
  const GroupQuantConfig plain;
  expect_error(run(TensorView(x.data(), DType::bf16, {3, 512}), b, plain, 0, ws, bytes), kOp,
               "x.shape", "[3, 512]", outs);
  expect_error(run(TensorView(x.data(), DType::bf16, {2, 3, 511}), b, plain, 0, ws, bytes), kOp,
               "x.shape", "[2, 3, 511]", outs);
  expect_error(run(x, TensorView(b.data(), DType::f8e4m3, {2, 128, 128}), plain, 0, ws, bytes), kOp,
               "b.shape", "[2, 128, 128]", outs);
  expect_error(run(x, TensorView(b.data(), DType::f8e4m3, {128, 256}), plain, 0, ws, bytes), kOp,
               "b.shape", "[128, 256]", outs);
  GroupQuantConfig group64;
  group64.group_size = 64;
  expect_error(run(x, b, group64, 0, ws, bytes), kOp, "group_size", "64", outs);
  GroupQuantConfig columns;
  columns.layout = ScaleLayout::column_major;
  expect_error(run(x, b, columns, 0, ws, bytes), kOp, "layout", "column_major", outs);
  expect_error(run(x, b, plain, -1, ws, bytes), kOp, "expected_rows", "-1", outs);
  expect_error(run(x, b, plain, 0, ws, bytes - 1), kOp, "workspace_bytes",
               std::to_string(bytes - 1), outs);
  expect_error(run(x, b, plain, 0, nullptr, bytes), kOp, "workspace", "null", outs);
  expect_error(run(x, b, plain, 0, static_cast<uint8_t*>(ws) + 4, bytes), kOp, "workspace", "",
               outs);
  // The halves' checks name the op too: x's dtype, masked_m's shape.
  expect_error(run(with_dtype(x, DType::i32), b, plain, 0, ws, bytes), kOp, "x.dtype", "i32", outs);
  expect_error(
      [&] {
        silu_and_mul_grouped_block_fp8_gemm_masked(x, TensorView(counts.data(), DType::i32, {1}), b,
                                                   bs, out, plain, 0, ws, bytes, {Backend::cpu});
      },
      kOp, "masked_m.shape", "[1]", outs);
  // Without a workspace no host entry serves: an error naming the backend.
  expect_error(run(x, b, plain, 0, nullptr, 0), kOp, "backend", "cpu", outs);
}

// block_fp8_gemm with a workspace: the CPU entries want none below 6 rows (AMX's tiles take one
// from there); a null pointer for a nonzero size and a misaligned one are errors that write
// nothing; a workspace changes nothing on the CPU.
TEST(Fp8Errors, GemmWorkspaceArguments) {
  GemmCall c;
  EXPECT_EQ(block_fp8_gemm_workspace_size(3, 128, 256, Device::cpu()), 0u);
  EXPECT_THROW(block_fp8_gemm_workspace_size(-1, 128, 256, Device::cpu()), Error);
  Tensor ws = sentinel(DType::u8, {64});
  auto run = [&](void* workspace, size_t bytes) {
    return [=] {
      block_fp8_gemm(c.a, c.as, ScaleLayout::row_major, c.b, c.bs, std::nullopt, c.out, workspace,
                     bytes);
    };
  };
  const std::initializer_list<const Tensor*> outs = {&c.out, &ws};
  expect_error(run(nullptr, 16), kGemm, "workspace", "null", outs);
  expect_error(run(ws.data_as<char>() + 4, 16), kGemm, "workspace", "", outs);
  for (int64_t i = 0; i < c.a.numel(); ++i) c.a.data_as<uint8_t>()[i] = (i * 7) % 0x7e;
  for (int64_t i = 0; i < c.b.numel(); ++i) c.b.data_as<uint8_t>()[i] = (i * 5 + 3) % 0x7e;
  for (int64_t i = 0; i < c.as.numel(); ++i) c.as.data_as<float>()[i] = 0.01f;
  for (int64_t i = 0; i < c.bs.numel(); ++i) c.bs.data_as<float>()[i] = 0.02f;
  Tensor plain = sentinel(DType::bf16, {3, 128});
  block_fp8_gemm(c.a, c.as, ScaleLayout::row_major, c.b, c.bs, std::nullopt, plain);
  block_fp8_gemm(c.a, c.as, ScaleLayout::row_major, c.b, c.bs, std::nullopt, c.out, ws.data(), 64);
  EXPECT_EQ(std::memcmp(plain.data(), c.out.data(), plain.nbytes()), 0);
}

// ---- w8a8_block_fp8_linear

constexpr const char* kLinear = "w8a8_block_fp8_linear";

TEST(Fp8Errors, LinearArguments) {
  Tensor x = Tensor::empty(DType::bf16, {3, 300});
  std::memset(x.data(), 0, x.nbytes());
  Tensor weight = Tensor::empty(DType::f8e4m3, {64, 300});
  Tensor scale_inv = Tensor::empty(DType::bf16, {1, 3});
  Tensor y = sentinel(DType::bf16, {3, 64});
  const size_t bytes = w8a8_block_fp8_linear_workspace_size(3, 300);
  EXPECT_EQ(bytes, 960u + 3 * 3 * 4);  // 900 bytes rounded up to 64, then 3 x 3 f32 scales
  // With N and the device: the GEMM's workspace besides, from the next 256-byte boundary (on the
  // CPU only the AMX GEMM's, from 6 rows).
  EXPECT_EQ(w8a8_block_fp8_linear_workspace_size(3, 64, 300, Device::cpu()), bytes);
  const size_t gemm = block_fp8_gemm_workspace_size(4096, 7168, 16384, Device::cpu());
  const size_t quant = w8a8_block_fp8_linear_workspace_size(4096, 16384);
  EXPECT_EQ(w8a8_block_fp8_linear_workspace_size(4096, 7168, 16384, Device::cpu()),
            gemm == 0 ? quant : (quant + 255) / 256 * 256 + gemm);
  expect_error([] { w8a8_block_fp8_linear_workspace_size(3, -1, 300, Device::cpu()); }, kLinear,
               "M, N, K", "3, -1, 300", {});
  Tensor ws = sentinel(DType::u8, {static_cast<int64_t>(bytes) + 64});
  const std::initializer_list<const Tensor*> outs = {&y, &ws};
  auto run = [&](const TensorView& x_view, const TensorView& w, const TensorView& s,
                 const TensorView& y_view, void* workspace, size_t workspace_bytes) {
    return [=] {
      w8a8_block_fp8_linear(x_view, w, s, std::nullopt, y_view, workspace, workspace_bytes);
    };
  };
  expect_error(run(x, weight, scale_inv, y, ws.data(), bytes - 1), kLinear, "workspace_bytes",
               std::to_string(bytes - 1), outs);
  expect_error(run(x, weight, scale_inv, y, nullptr, bytes), kLinear, "workspace", "null", outs);
  expect_error(run(x, weight, scale_inv, y, ws.data_as<char>() + 4, bytes), kLinear, "workspace",
               "", outs);
  expect_error(run(with_dtype(x, DType::f8e4m3), weight, scale_inv, y, ws.data(), bytes), kLinear,
               "x.dtype", "f8e4m3", outs);
  {
    Tensor s = Tensor::empty(DType::f32, {1, 2});  // ceil(300 / 128) = 3 blocks of K
    expect_error(run(x, weight, s, y, ws.data(), bytes), kLinear, "weight_scale_inv.shape",
                 "[1, 2]", outs);
  }
  {
    Tensor w = Tensor::empty(DType::f8e4m3, {64, 256});
    expect_error(run(x, w, scale_inv, y, ws.data(), bytes), kLinear, "weight.shape", "[64, 256]",
                 outs);
  }
  {
    Tensor y2 = sentinel(DType::bf16, {3, 65});
    expect_error(run(x, weight, scale_inv, y2, ws.data(), bytes), kLinear, "y.shape", "[3, 65]",
                 {&y2, &ws});
  }
  expect_error(run(x, with_dtype(weight, DType::bf16), scale_inv, y, ws.data(), bytes), kLinear,
               "weight.dtype", "bf16", outs);
  expect_error(run(x, weight, scale_inv, on_gpu(y), ws.data(), bytes), kLinear, "y.device", "gpu:0",
               outs);
}

// ---- block_quantize_weight

constexpr const char* kWeight = "block_quantize_weight";

TEST(Fp8Errors, BlockQuantizeWeightArguments) {
  Tensor w = Tensor::empty(DType::f32, {130, 256});
  std::memset(w.data(), 0, w.nbytes());
  Tensor weight = sentinel(DType::f8e4m3, {130, 256});
  Tensor scales = sentinel(DType::f32, {2, 2});
  const std::initializer_list<const Tensor*> outs = {&weight, &scales};
  auto run = [&](const TensorView& w_view, const TensorView& q, const TensorView& s) {
    return [=] { block_quantize_weight(w_view, q, s); };
  };
  expect_error(run(with_dtype(w, DType::i64), weight, scales), kWeight, "w.dtype", "i64", outs);
  {
    Tensor q = sentinel(DType::f8e4m3, {128, 256});
    expect_error(run(w, q, scales), kWeight, "weight.shape", "[128, 256]", {&q, &scales});
  }
  expect_error(run(w, weight, with_dtype(scales, DType::bf16)), kWeight, "weight_scale_inv.dtype",
               "bf16", outs);
  {
    Tensor s = sentinel(DType::f32, {1, 2});
    expect_error(run(w, weight, s), kWeight, "weight_scale_inv.shape", "[1, 2]", {&weight, &s});
  }
  expect_error(run(w, on_gpu(weight), scales), kWeight, "weight.device", "gpu:0", outs);
}

}  // namespace
}  // namespace moekit
