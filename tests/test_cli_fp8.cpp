// The moekit CLI's FP8 subcommands end to end (quant, gemm, quantize-weight): each writes exactly
// what calling the library op directly computes, and errors are one line, exit code 2, nothing
// written. Random inputs (seed printed; MOEKIT_TEST_SEED repeats a run).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "cli_test_support.h"
#include "moekit/backend.h"
#include "moekit/ops/fp8.h"
#include "moekit/safetensors.h"

namespace moekit {
namespace {

namespace fs = std::filesystem;

uint64_t test_seed() {
  static const uint64_t seed = [] {
    const char* env = std::getenv("MOEKIT_TEST_SEED");
    const uint64_t s = env != nullptr ? std::strtoull(env, nullptr, 10)
                                      : (uint64_t{std::random_device{}()} << 32) ^
                                            uint64_t { std::random_device{}() };
    std::printf("cli fp8 seed: %llu (set MOEKIT_TEST_SEED to repeat)\n",
                static_cast<unsigned long long>(s));
    return s;
  }();
  return seed;
}

using Result = testing::CliResult;

class CliFp8 : public testing::CliTest {
 protected:
  void SetUp() override {
    CliTest::SetUp();
    rng_.seed(test_seed() ^ std::hash<std::string>{}(test_name()));
  }

  // A random tensor of a floating dtype, values ~ N(0, sigma) with a few outliers.
  Tensor random(DType dtype, std::initializer_list<int64_t> shape, float sigma = 1.0f) {
    Tensor t = Tensor::empty(dtype, shape);
    std::normal_distribution<float> normal(0.0f, sigma);
    std::uniform_int_distribution<int> outlier(0, 63);
    for (int64_t i = 0; i < t.numel(); ++i) {
      float v = normal(rng_);
      if (outlier(rng_) == 0) v *= 30.0f;
      store_from_f32(t.data(), dtype, i, v);
    }
    return t;
  }

  static void expect_same(const TensorView& got, const TensorView& want, const std::string& what) {
    ASSERT_EQ(got.dtype(), want.dtype()) << what;
    ASSERT_EQ(got.shape_str(), want.shape_str()) << what;
    EXPECT_EQ(0, std::memcmp(got.data(), want.data(), want.nbytes())) << what;
  }

  // The folder holds only these files (plus stdout/stderr): nothing temporary was left.
  void expect_only(const std::vector<std::string>& names) {
    for (const auto& entry : fs::directory_iterator(dir_)) {
      const std::string name = entry.path().filename().string();
      EXPECT_TRUE(name == "stdout" || name == "stderr" ||
                  std::find(names.begin(), names.end(), name) != names.end())
          << "unexpected file " << name;
    }
  }

  std::mt19937_64 rng_;
};

struct LayoutCase {
  const char* flag;
  ScaleLayout layout;
  bool ue8m0;
};

TEST_F(CliFp8, QuantWritesWhatTheLibraryComputesForEveryLayout) {
  const LayoutCase cases[] = {
      {"row", ScaleLayout::row_major, false},
      {"row", ScaleLayout::row_major, true},
      {"col", ScaleLayout::column_major, false},
      {"col-tma", ScaleLayout::column_major_tma, false},
      {"col-tma", ScaleLayout::column_major_tma, true},
      {"packed", ScaleLayout::packed_ue8m0, true},
  };
  // M = 13 exercises the align4 padding rows; K / 64 = 6 groups a partial packed word.
  const int64_t M = 13, K = 384;
  const int group = 64;
  for (const DType dtype : {DType::bf16, DType::f32, DType::f16}) {
    Tensor x = random(dtype, {M, K}, 3.0f);
    const std::string in = path("in.safetensors");
    write_safetensors(in, {{"x", x.view()}});
    for (const LayoutCase& c : cases) {
      const std::string what =
          std::string(dtype_name(dtype)) + " --layout " + c.flag + (c.ue8m0 ? " --ue8m0" : "");
      const std::string out = path("out.safetensors");
      const Result r = run("quant --input " + in + " --output " + out + " --group-size " +
                           std::to_string(group) + " --layout " + c.flag +
                           (c.ue8m0 ? " --ue8m0" : "") + " --backend reference");
      ASSERT_EQ(r.exit_code, 0) << what << ": " << r.err;

      GroupQuantConfig config;
      config.group_size = group;
      config.ue8m0 = c.ue8m0;
      config.layout = c.layout;
      const ScaleStorage storage = group_quant_scale_storage(M, K, config);
      Tensor q = Tensor::empty(DType::f8e4m3, {M, K});
      Tensor scales = Tensor::empty(storage.dtype, {storage.shape[0], storage.shape[1]});
      std::memset(scales.data(), 0, scales.nbytes());  // the CLI writes zero padding
      per_token_group_quant_fp8(x, q, scales, config, OpOptions{.backend = Backend::reference});

      const SafetensorsFile file = SafetensorsFile::open(out);
      expect_same(file.get("q"), q, what + " q");
      expect_same(file.get("scales"), scales, what + " scales");
      fs::remove(out);
    }
  }
  expect_only({"in.safetensors"});
}

TEST_F(CliFp8, QuantOnCpuMatchesCpu) {
  const int64_t M = 7, K = 256;
  Tensor x = random(DType::bf16, {M, K});
  const std::string in = path("in.safetensors"), out = path("out.safetensors");
  write_safetensors(in, {{"x", x.view()}});
  const Result r =
      run("quant --input " + in + " --output " + out + " --group-size 128 --backend cpu");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  GroupQuantConfig config;
  Tensor q = Tensor::empty(DType::f8e4m3, {M, K}), scales = Tensor::empty(DType::f32, {M, 2});
  per_token_group_quant_fp8(x, q, scales, config, OpOptions{.backend = Backend::cpu});
  const SafetensorsFile file = SafetensorsFile::open(out);
  expect_same(file.get("q"), q, "q");
  expect_same(file.get("scales"), scales, "scales");
}

TEST_F(CliFp8, GemmWritesWhatTheLibraryComputes) {
  // K and N not multiples of 128: partial blocks.
  const int64_t M = 9, N = 200, K = 300;
  const int64_t KB = (K + 127) / 128, NB = (N + 127) / 128;
  // Real quantized operands: activations per token group (K is padded to whole groups of 128 by
  // quantizing a zero-padded copy), the weight per 128x128 block.
  const int64_t Kp = KB * 128;
  Tensor xp = Tensor::empty(DType::f32, {M, Kp});
  Tensor x = random(DType::f32, {M, K});
  std::memset(xp.data(), 0, xp.nbytes());
  for (int64_t m = 0; m < M; ++m)
    std::memcpy(xp.data_as<float>() + m * Kp, x.data_as<float>() + m * K, K * sizeof(float));
  Tensor qp = Tensor::empty(DType::f8e4m3, {M, Kp});
  Tensor a_scales = Tensor::empty(DType::f32, {M, KB});
  per_token_group_quant_fp8(xp, qp, a_scales, GroupQuantConfig{},
                            OpOptions{.backend = Backend::reference});
  Tensor a = Tensor::empty(DType::f8e4m3, {M, K});
  for (int64_t m = 0; m < M; ++m)
    std::memcpy(a.data_as<uint8_t>() + m * K, qp.data_as<uint8_t>() + m * Kp, K);
  Tensor w = random(DType::bf16, {N, K}, 0.05f);
  Tensor b = Tensor::empty(DType::f8e4m3, {N, K});
  Tensor b_scales = Tensor::empty(DType::f32, {NB, KB});
  block_quantize_weight(w, b, b_scales, OpOptions{.backend = Backend::reference});
  Tensor b_scales_bf16 = Tensor::empty(DType::bf16, {NB, KB});
  for (int64_t i = 0; i < NB * KB; ++i)
    b_scales_bf16.data_as<uint16_t>()[i] = f32_to_bf16(b_scales.data_as<float>()[i]);
  Tensor bias = random(DType::f32, {N});

  struct Case {
    const char* backend;
    Backend b;
    const char* out_dtype;
    DType dtype;
    bool with_bias;
    bool bf16_scales;
  };
  const Case cases[] = {
      {"reference", Backend::reference, "bf16", DType::bf16, false, false},
      {"reference", Backend::reference, "f32", DType::f32, true, false},
      {"cpu", Backend::cpu, "bf16", DType::bf16, true, true},
      {"cpu", Backend::cpu, "f16", DType::f16, false, false},
      {"cpu", Backend::cpu, "f32", DType::f32, true, false},
  };
  for (const Case& c : cases) {
    const std::string what = std::string(c.backend) + " " + c.out_dtype +
                             (c.with_bias ? " bias" : "") + (c.bf16_scales ? " bf16 scales" : "");
    const TensorView bs = c.bf16_scales ? b_scales_bf16.view() : b_scales.view();
    std::vector<NamedTensor> tensors = {
        {"a", a.view()}, {"a_scales", a_scales.view()}, {"b", b.view()}, {"b_scales", bs}};
    if (c.with_bias) tensors.push_back({"bias", bias.view()});
    const std::string in = path("in.safetensors"), out = path("out.safetensors");
    write_safetensors(in, tensors);
    // The default --out-dtype is bf16.
    const std::string dtype_flag =
        std::string(c.out_dtype) == "bf16" ? "" : std::string(" --out-dtype ") + c.out_dtype;
    const Result r = run("gemm --input " + in + " --output " + out + dtype_flag + " --backend " +
                         c.backend + " --threads 2");
    ASSERT_EQ(r.exit_code, 0) << what << ": " << r.err;
    Tensor want = Tensor::empty(c.dtype, {M, N});
    block_fp8_gemm(a, a_scales, ScaleLayout::row_major, b, bs,
                   c.with_bias ? std::optional<TensorView>(bias.view()) : std::nullopt, want,
                   OpOptions{.backend = c.b, .num_threads = 2});
    const SafetensorsFile file = SafetensorsFile::open(out);
    expect_same(file.get("out"), want, what);
    fs::remove(out);
  }
  expect_only({"in.safetensors"});
}

TEST_F(CliFp8, QuantizeWeightWritesWhatTheLibraryComputes) {
  const int64_t N = 200, K = 300;
  for (const DType dtype : {DType::bf16, DType::f32, DType::f16}) {
    for (const Backend backend : {Backend::reference, Backend::cpu}) {
      const std::string what =
          std::string(dtype_name(dtype)) + " " + std::string(backend_name(backend));
      Tensor w = random(dtype, {N, K}, 0.02f);
      const std::string in = path("in.safetensors"), out = path("out.safetensors");
      write_safetensors(in, {{"weight", w.view()}});
      const Result r = run("quantize-weight --input " + in + " --output " + out + " --backend " +
                           std::string(backend_name(backend)));
      ASSERT_EQ(r.exit_code, 0) << what << ": " << r.err;
      Tensor weight = Tensor::empty(DType::f8e4m3, {N, K});
      Tensor scale_inv = Tensor::empty(DType::f32, {2, 3});
      block_quantize_weight(w, weight, scale_inv, OpOptions{.backend = backend});
      const SafetensorsFile file = SafetensorsFile::open(out);
      expect_same(file.get("weight"), weight, what + " weight");
      expect_same(file.get("weight_scale_inv"), scale_inv, what + " weight_scale_inv");
      fs::remove(out);
    }
  }
}

TEST_F(CliFp8, ErrorsAreOneLineExitTwoAndWriteNothing) {
  Tensor x = random(DType::bf16, {4, 256});
  const std::string x_in = path("x.safetensors");
  write_safetensors(x_in, {{"x", x.view()}});
  // A gemm input whose "a" is f32 instead of e4m3, and one without "b_scales".
  Tensor a_f32 = random(DType::f32, {4, 256});
  Tensor a = Tensor::empty(DType::f8e4m3, {4, 256});
  std::memset(a.data(), 0x38, a.nbytes());  // 1.0
  Tensor a_scales = random(DType::f32, {4, 2});
  Tensor b = Tensor::empty(DType::f8e4m3, {8, 256});
  std::memset(b.data(), 0x38, b.nbytes());
  Tensor b_scales = random(DType::f32, {1, 2});
  const std::string bad_a = path("bad_a.safetensors"), no_bs = path("no_bs.safetensors"),
                    good = path("good.safetensors");
  write_safetensors(bad_a, {{"a", a_f32.view()},
                            {"a_scales", a_scales.view()},
                            {"b", b.view()},
                            {"b_scales", b_scales.view()}});
  write_safetensors(no_bs, {{"a", a.view()}, {"a_scales", a_scales.view()}, {"b", b.view()}});
  write_safetensors(good, {{"a", a.view()},
                           {"a_scales", a_scales.view()},
                           {"b", b.view()},
                           {"b_scales", b_scales.view()}});
  const std::string out = path("out.safetensors");
  const std::string missing = path("missing.safetensors");
  struct Bad {
    std::string args;
    std::string says;  // a piece the error line must contain
  };
  std::vector<Bad> bad = {
      {"quant --input " + missing + " --output " + out + " --group-size 128", ""},
      {"quant --input " + good + " --output " + out + " --group-size 128", "\"x\""},
      {"quant --input " + x_in + " --output " + out + " --group-size 100", "100"},
      {"quant --input " + x_in + " --output " + out + " --group-size 0", "group_size"},
      {"quant --input " + x_in + " --output " + out + " --group-size 48", "48"},
      {"quant --input " + x_in + " --output " + out + " --group-size 128 --layout packed", ""},
      {"quant --input " + x_in + " --output " + out + " --group-size 128 --layout diagonal",
       "diagonal"},
      {"quant --input " + x_in + " --output " + out, "group-size"},
      {"quant --input " + x_in + " --output " + out + " --group-size 128 --backend tpu", "tpu"},
      {"gemm --input " + missing + " --output " + out, ""},
      {"gemm --input " + good + " --output " + out + " --out-dtype f8e4m3", "f8e4m3"},
      {"gemm --input " + bad_a + " --output " + out, "a"},
      {"gemm --input " + no_bs + " --output " + out, "\"b_scales\""},
      {"gemm --input " + x_in + " --output " + out, "\"a\""},
      {"quantize-weight --input " + missing + " --output " + out, ""},
      {"quantize-weight --input " + x_in + " --output " + out, "\"weight\""},
  };
  if (!backend_available(Backend::gpu)) {
    bad.push_back(
        {"quant --input " + x_in + " --output " + out + " --group-size 128 --backend gpu", "gpu"});
    bad.push_back({"gemm --input " + good + " --output " + out + " --backend gpu", "gpu"});
    bad.push_back({"quantize-weight --input " + x_in + " --output " + out + " --backend gpu", ""});
  }
  for (const Bad& c : bad) {
    const Result r = run(c.args);
    EXPECT_EQ(r.exit_code, 2) << c.args << ": " << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << c.args << ": " << r.err;
    EXPECT_EQ(r.err.rfind("moekit: error: ", 0), 0u) << c.args << ": " << r.err;
    EXPECT_NE(r.err.find(c.says), std::string::npos) << c.args << ": " << r.err;
    EXPECT_FALSE(fs::exists(out)) << c.args;
  }
  expect_only({"x.safetensors", "bad_a.safetensors", "no_bs.safetensors", "good.safetensors"});
  // The good input does run (so the errors above are the flags' and files' doing).
  const Result r = run("gemm --input " + good + " --output " + out + " --backend reference");
  EXPECT_EQ(r.exit_code, 0) << r.err;
}

TEST_F(CliFp8, MissingTensorErrorNamesTensorAndFile) {
  Tensor w = random(DType::f32, {4, 8});
  const std::string in = path("in.safetensors");
  write_safetensors(in, {{"w", w.view()}});
  const Result r = run("quantize-weight --input " + in + " --output " + path("o.safetensors"));
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("\"weight\""), std::string::npos) << r.err;
  EXPECT_NE(r.err.find(in), std::string::npos) << r.err;
}

// `moekit check --op fp8`: FP8 rows only (no routing table), every row PASS, the DeepSeek-V3 shapes
// among them in both tables (quant + GEMM; linear layer + weight quantization), the seed printed.
TEST_F(CliFp8, CheckFp8QuickPassesOnCpu) {
  const Result r = run("check --op fp8 --quick --backend cpu --seed 7");
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("seed 7"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("routing:"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("FAIL"), std::string::npos) << r.out;
  int deepseek_pass = 0;
  size_t start = 0;
  while (start < r.out.size()) {
    size_t end = r.out.find('\n', start);
    if (end == std::string::npos) end = r.out.size();
    const std::string line = r.out.substr(start, end - start);
    if (line.rfind("DeepSeek-V3", 0) == 0 && line.find(" cpu ") != std::string::npos &&
        line.find("PASS") != std::string::npos)
      ++deepseek_pass;
    start = end + 1;
  }
  // 4 shapes x (quant + GEMM at M in {1, 7, 83}; linear at M in {1, 7}; the weight), the
  // 2 expert shapes x the grouped GEMM at M in {1, 5}, the expert activation (I=2048) x the
  // gated quantization at M in {1, 7}, and the expert down shape x the down projection with its
  // activation quantized inside at M in {1, 5}.
  EXPECT_EQ(deepseek_pass, 4 * 3 + 4 * 3 + 2 * 2 + 2 + 2) << r.out;
  EXPECT_NE(r.out.find("w8a8_block_fp8_linear"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("grouped_block_fp8_gemm"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("silu_and_mul_group_quant_fp8"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("silu_and_mul_grouped_block_fp8_gemm_masked"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("w 324x3884"), std::string::npos) << r.out;  // a partial block row
}

// `moekit bench --op gemm --json`, filtered to one shape and token count: a JSON array of one
// verified row with the keys route's rows have.
TEST_F(CliFp8, BenchGemmJsonFiltered) {
  const Result r =
      run("bench --op gemm --backend cpu --threads 1 --json --model Qwen3-30B-A3B --tokens 16");
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  const nlohmann::json rows = nlohmann::json::parse(r.out);
  ASSERT_TRUE(rows.is_array());
  ASSERT_EQ(rows.size(), 1u) << r.out;
  const nlohmann::json& row = rows[0];
  for (const char* key : {"op", "model", "tokens", "backend", "median_us", "gb_per_s",
                          "tflop_per_s", "roofline_us", "verified"})
    EXPECT_TRUE(row.contains(key)) << key << " missing: " << r.out;
  EXPECT_EQ(row["op"], "gemm");
  EXPECT_EQ(row["backend"], "cpu");
  EXPECT_EQ(row["tokens"], 16);
  EXPECT_NE(row["model"].get<std::string>().find("Qwen3-30B-A3B"), std::string::npos);
  EXPECT_GT(row["median_us"].get<double>(), 0.0);
  EXPECT_TRUE(row["verified"].get<bool>());
  // An unknown shape is a one-line error (exit 2).
  EXPECT_EQ(run("bench --op gemm --backend cpu --model nope").exit_code, 2);
}

// `--tokens` times any M on the CPU (3 is not in the table) and `--implementation` one dispatch
// entry (cpu.scalar, present on every CPU, is never the pick where a vector entry serves).
TEST_F(CliFp8, BenchGemmAnyTokenCountOneImplementation) {
  const Result r =
      run("bench --op gemm --backend cpu --threads 1 --json --model Qwen3-30B-A3B --tokens 3 "
          "--implementation cpu.scalar");
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  const nlohmann::json rows = nlohmann::json::parse(r.out);
  ASSERT_TRUE(rows.is_array());
  ASSERT_EQ(rows.size(), 1u) << r.out;
  EXPECT_EQ(rows[0]["tokens"], 3);
  EXPECT_EQ(rows[0]["implementation"], "cpu.scalar");
  EXPECT_TRUE(rows[0]["verified"].get<bool>());
  // An unknown entry, and --implementation where the bench does not take it: one-line errors.
  const Result unknown =
      run("bench --op gemm --backend cpu --model Qwen3-30B-A3B --tokens 1 --implementation nope");
  EXPECT_EQ(unknown.exit_code, 2);
  EXPECT_NE(unknown.err.find("implementation=nope"), std::string::npos) << unknown.err;
  const Result route = run("bench --op route --backend cpu --implementation cpu.avx2");
  EXPECT_EQ(route.exit_code, 2);
  EXPECT_NE(route.err.find("--implementation"), std::string::npos) << route.err;
  // --replays outside 1..100000: a one-line error naming it, before any work.
  const Result replays = run("bench --op gemm --backend cpu --model Qwen3-30B-A3B --replays 0");
  EXPECT_EQ(replays.exit_code, 2);
  EXPECT_NE(replays.err.find("replays=0"), std::string::npos) << replays.err;
}

// `moekit explain --op gemm | linear`: every entry of the op's table with its answer at the shape
// (M from --tokens, --n, --k), exactly one of them running (the reference where it is asked for);
// a bad op, a size below 1 or a flag of the other kind of op (route's --model, gemm's --k) is a
// one-line error naming the flag.
TEST_F(CliFp8, ExplainGemmAndLinearSayWhichImplementationRuns) {
  for (const char* op : {"gemm", "linear"}) {
    const Result r = run(std::string("explain --op ") + op +
                         " --backend reference --tokens 5 --n 256 --k 384 --static-weights");
    ASSERT_EQ(r.exit_code, 0) << op << ": " << r.err;
    EXPECT_NE(r.out.find(std::string(op) + " M=5 N=256 K=384, backend reference, static weights"),
              std::string::npos)
        << r.out;
    EXPECT_NE(r.out.find("reference            runs"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("cpu.scalar           declines: backend reference was requested"),
              std::string::npos)
        << r.out;
  }
  const Result cpu = run("explain --op gemm --backend cpu");
  ASSERT_EQ(cpu.exit_code, 0) << cpu.err;
  EXPECT_NE(cpu.out.find("gemm M=1 N=4096 K=7168, backend cpu:"), std::string::npos) << cpu.out;
  size_t running = 0;  // lines "  <name padded to 20> runs..."
  std::istringstream lines(cpu.out);
  for (std::string line; std::getline(lines, line);)
    running += line.size() >= 27 && line.compare(23, 4, "runs") == 0;
  EXPECT_EQ(running, 1u) << cpu.out;
  for (const auto& [args, flag] :
       {std::pair<const char*, const char*>{"explain --op gemv", "--op=gemv"},
        {"explain --op gemm --k 0", "--k=0"},
        {"explain --op linear --tokens 0", "--tokens=0"},
        {"explain --op gemm --model Qwen3-30B-A3B", "--model=Qwen3-30B-A3B"},
        {"explain --k 2048", "--k=2048"}}) {
    const Result bad = run(args);
    EXPECT_EQ(bad.exit_code, 2) << args;
    EXPECT_NE(bad.err.find(flag), std::string::npos) << args << ": " << bad.err;
  }
}

// `moekit explain --op gemm-grouped`: grouped_block_fp8_gemm's entries at G x M x N x K, whole
// groups or (with --expected-rows) the masked layout with that hint; on the host the per-group
// entries run (the GPU's say why they decline where asked for). The grouped flags are errors for
// the other ops, and bad values name the flag. `--op gemm-contiguous` the same for
// grouped_block_fp8_gemm_contiguous (its --groups: the experts).
TEST_F(CliFp8, ExplainGroupedGemmSaysWhichImplementationRuns) {
  // The line of entry `name` ("  <name> <verdict>", the names' column as wide as the longest).
  const auto verdict_of = [](const std::string& out, const std::string& name) {
    std::istringstream lines(out);
    for (std::string line; std::getline(lines, line);) {
      std::istringstream words(line);
      std::string first;
      words >> first;
      if (first == name) {
        std::string rest;
        std::getline(words >> std::ws, rest);
        return rest;
      }
    }
    return std::string("(no line for ") + name + ")";
  };
  const Result whole =
      run("explain --op gemm-grouped --backend cpu --groups 3 --tokens 5 --n 256 --k 384");
  ASSERT_EQ(whole.exit_code, 0) << whole.err;
  EXPECT_NE(whole.out.find("gemm-grouped G=3 M=5 N=256 K=384, backend cpu:"), std::string::npos)
      << whole.out;
  EXPECT_EQ(verdict_of(whole.out, "cpu.per_group").rfind("runs: 3 calls of cpu.", 0), 0u)
      << whole.out;
  if (whole.out.find("gpu.sm90.grouped_wide") != std::string::npos) {  // (builds with the GPU)
    EXPECT_EQ(verdict_of(whole.out, "gpu.sm90.grouped_wide"), "declines: backend cpu was requested")
        << whole.out;
  }
  const Result masked =
      run("explain --op gemm-grouped --backend reference --tokens 200 --expected-rows 100 "
          "--static-weights");
  ASSERT_EQ(masked.exit_code, 0) << masked.err;
  EXPECT_NE(masked.out.find("gemm-grouped G=8 M=200 N=4096 K=7168, masked, expected rows 100, "
                            "backend reference, static weights:"),
            std::string::npos)
      << masked.out;
  EXPECT_EQ(verdict_of(masked.out, "reference.per_group").rfind("runs: 8 calls of reference", 0),
            0u)
      << masked.out;
  for (const auto& [args, flag] :
       {std::pair<const char*, const char*>{"explain --op gemm-grouped --groups 0", "--groups=0"},
        {"explain --op gemm-grouped --expected-rows 0", "--expected-rows=0"},
        {"explain --op gemm --groups 4", "--groups=4"},
        {"explain --op linear --expected-rows 7", "--expected-rows=7"},
        {"explain --groups 4", "--groups=4"},
        {"explain --op gemm-contiguous --expected-rows 7", "--expected-rows=7"},
        {"explain --op gemm-contiguous --groups 0", "--groups=0"}}) {
    const Result bad = run(args);
    EXPECT_EQ(bad.exit_code, 2) << args;
    EXPECT_NE(bad.err.find(flag), std::string::npos) << args << ": " << bad.err;
  }
  // The contiguous layout: M rows in 128-row blocks against G experts; on the host each run of
  // blocks with one index is a block_fp8_gemm call.
  const Result contiguous =
      run("explain --op gemm-contiguous --backend cpu --groups 4 --tokens 300 --n 256 --k 512");
  ASSERT_EQ(contiguous.exit_code, 0) << contiguous.err;
  EXPECT_NE(contiguous.out.find("gemm-contiguous M=300 N=256 K=512, 4 experts, column-major "
                                "activation scales, backend cpu:"),
            std::string::npos)
      << contiguous.out;
  EXPECT_EQ(verdict_of(contiguous.out, "cpu.per_segment").rfind("runs: block_fp8_gemm (cpu.", 0),
            0u)
      << contiguous.out;
  if (contiguous.out.find("gpu.sm90.contiguous") != std::string::npos) {  // (builds with the GPU)
    EXPECT_EQ(verdict_of(contiguous.out, "gpu.sm90.contiguous"),
              "declines: backend cpu was requested")
        << contiguous.out;
  }
}

// `--data normal`: DeepGEMM's operands (normal values cast per block) instead of uniform ones, and
// `--data ones` (every operand 1.0), still verified against the reference; a different row time is
// allowed, a failed check is not. Other names and other ops are one-line errors naming --data.
TEST_F(CliFp8, BenchGemmNormalData) {
  for (const char* data : {"normal", "ones"}) {
    const Result r =
        run(std::string("bench --op gemm --backend cpu --threads 1 --json --model Qwen3-30B-A3B "
                        "--tokens 3 --data ") +
            data);
    ASSERT_EQ(r.exit_code, 0) << data << ": " << r.out << r.err;
    const nlohmann::json rows = nlohmann::json::parse(r.out);
    ASSERT_EQ(rows.size(), 1u) << r.out;
    EXPECT_TRUE(rows[0]["verified"].get<bool>()) << data;
  }
  for (const char* args : {"bench --op gemm --backend cpu --data weird",
                           "bench --op route --backend cpu --data normal"}) {
    const Result bad = run(args);
    EXPECT_EQ(bad.exit_code, 2) << args;
    EXPECT_NE(bad.err.find("--data"), std::string::npos) << args << ": " << bad.err;
  }
}

// `moekit bench --op linear`: w8a8_block_fp8_linear (bf16 x quantized in the call, then the GEMM)
// at any token count, verified against the reference's linear layer; an unknown op names the
// benchmarked ones.
TEST_F(CliFp8, BenchLinearJsonFiltered) {
  const Result r =
      run("bench --op linear --backend cpu --threads 1 --json --model Qwen3-30B-A3B --tokens 5");
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  const nlohmann::json rows = nlohmann::json::parse(r.out);
  ASSERT_TRUE(rows.is_array());
  ASSERT_EQ(rows.size(), 1u) << r.out;
  const nlohmann::json& row = rows[0];
  EXPECT_EQ(row["op"], "linear");
  EXPECT_EQ(row["tokens"], 5);
  EXPECT_NE(row["model"].get<std::string>().find("Qwen3-30B-A3B"), std::string::npos);
  EXPECT_FALSE(row["implementation"].get<std::string>().empty()) << r.out;
  EXPECT_GT(row["median_us"].get<double>(), 0.0);
  EXPECT_TRUE(row["verified"].get<bool>());
  const Result unknown = run("bench --op lineer --backend cpu");
  EXPECT_EQ(unknown.exit_code, 2);
  EXPECT_NE(unknown.err.find("linear"), std::string::npos) << unknown.err;
}

// `moekit bench --op quantize-weight`: block_quantize_weight of a bf16 weight, verified byte for
// byte against the reference on its first block rows.
TEST_F(CliFp8, BenchQuantizeWeightJson) {
  const Result r = run("bench --op quantize-weight --backend cpu --threads 1 --json");
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  const nlohmann::json rows = nlohmann::json::parse(r.out);
  ASSERT_TRUE(rows.is_array());
  ASSERT_EQ(rows.size(), 1u) << r.out;
  EXPECT_EQ(rows[0]["op"], "quantize-weight");
  EXPECT_FALSE(rows[0]["implementation"].get<std::string>().empty()) << r.out;
  EXPECT_GT(rows[0]["median_us"].get<double>(), 0.0);
  EXPECT_TRUE(rows[0]["verified"].get<bool>());
}

}  // namespace
}  // namespace moekit
