// The moekit CLI end to end: route on files, errors (one line, exit code 2, nothing written),
// check, bench --json, backends, --version.
#include <gtest/gtest.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>

#include "cli_test_support.h"
#include "moekit/ops/route.h"
#include "moekit/safetensors.h"

namespace moekit {
namespace {

namespace fs = std::filesystem;

using Result = testing::CliResult;

class Cli : public testing::CliTest {
 protected:
  // Writes logits [T, E] (bf16) and an optional bias to a safetensors file.
  std::string write_input(int64_t T, int64_t E, bool with_bias, uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal(0.0f, 2.0f);
    logits_ = Tensor::empty(DType::bf16, {T, E});
    for (int64_t i = 0; i < T * E; ++i) logits_.data_as<uint16_t>()[i] = f32_to_bf16(normal(rng));
    std::vector<NamedTensor> tensors = {{"logits", logits_.view()}};
    if (with_bias) {
      bias_ = Tensor::empty(DType::f32, {E});
      for (int64_t e = 0; e < E; ++e) bias_.data_as<float>()[e] = 0.1f * normal(rng);
      tensors.push_back({"bias", bias_.view()});
    }
    const std::string p = path("in.safetensors");
    write_safetensors(p, tensors);
    return p;
  }

  Tensor logits_, bias_;
};

TEST_F(Cli, RouteWritesWhatTheLibraryComputes) {
  const std::string in = write_input(37, 256, true, 7);
  const std::string out = path("out.safetensors");
  const Result r = run("route --input " + in + " --output " + out +
                       " --topk 9 --scoring sigmoid --groups 8 --topk-groups 4"
                       " --shared-experts 1 --routed-scaling-factor 2.5 --backend cpu");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const SafetensorsFile file = SafetensorsFile::open(out);
  const TensorView weights = file.get("weights"), ids = file.get("ids");
  ASSERT_EQ(weights.dtype(), DType::f32);
  ASSERT_EQ(ids.dtype(), DType::i32);
  ASSERT_EQ(weights.shape_str(), "[37, 9]");
  Tensor want_w = Tensor::empty(DType::f32, {37, 9}), want_ids = Tensor::empty(DType::i32, {37, 9});
  RouterConfig c;
  c.topk = 9;
  c.scoring = Scoring::sigmoid;
  c.num_groups = 8;
  c.topk_groups = 4;
  c.num_shared_experts = 1;
  c.routed_scaling_factor = 2.5f;
  route(logits_, bias_.view(), c, want_w, want_ids, RouteOptions{.backend = Backend::cpu});
  EXPECT_EQ(0, std::memcmp(weights.data(), want_w.data(), want_w.nbytes()));
  EXPECT_EQ(0, std::memcmp(ids.data(), want_ids.data(), want_ids.nbytes()));
}

TEST_F(Cli, RouteErrorsAreOneLineExitTwoAndWriteNothing) {
  const std::string in = write_input(4, 8, false, 1);
  const std::string out = path("out.safetensors");
  const std::array<std::string, 7> bad = {
      "route --input " + path("missing.safetensors") + " --output " + out + " --topk 2",
      "route --input " + in + " --output " + out + " --topk 0",
      "route --input " + in + " --output " + out + " --topk 9",
      "route --input " + in + " --output " + out + " --topk 2 --scoring cosine",
      "route --input " + in + " --output " + out + " --topk 2 --groups 3",
      "route --input " + in + " --output " + out + " --topk 2 --backend tpu",
      "route --input " + in + " --output " + out + " --topk two",
  };
  for (const std::string& args : bad) {
    const Result r = run(args);
    EXPECT_EQ(r.exit_code, 2) << args;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << args << ": " << r.err;
    EXPECT_NE(r.err.find("error"), std::string::npos) << r.err;
    EXPECT_FALSE(fs::exists(out)) << args;
  }
  // A malformed input file.
  { std::ofstream(path("bad.safetensors")) << "not a safetensors file at all"; }
  const Result r =
      run("route --input " + path("bad.safetensors") + " --output " + out + " --topk 2");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_FALSE(fs::exists(out));
  // Nothing else was left in the folder (no temporary files).
  for (const auto& entry : fs::directory_iterator(dir_)) {
    const std::string name = entry.path().filename().string();
    EXPECT_TRUE(name == "in.safetensors" || name == "bad.safetensors" || name == "stdout" ||
                name == "stderr")
        << name;
  }
}

TEST_F(Cli, RouteErrorNamesTheArgument) {
  const std::string in = write_input(4, 8, false, 2);
  const Result r = run("route --input " + in + " --output " + path("o.safetensors") + " --topk 9");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("topk=9"), std::string::npos) << r.err;
}

TEST_F(Cli, VersionAndBackends) {
  Result r = run("--version");
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_NE(r.out.find(MOEKIT_VERSION), std::string::npos) << r.out;
  r = run("backends");
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_NE(r.out.find("reference"), std::string::npos);
  EXPECT_NE(r.out.find("cpu"), std::string::npos);
}

TEST_F(Cli, CheckPassesOnTheModelTable) {
  const Result r = run("check --op route --quick --backend cpu --seed 42");
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("seed 42"), std::string::npos);
  EXPECT_NE(r.out.find("DeepSeek-V3"), std::string::npos);
  EXPECT_EQ(r.out.find("FAIL "), std::string::npos) << r.out;
}

TEST_F(Cli, BenchJsonHasTheAgreedKeys) {
  const Result r =
      run("bench --op route --backend cpu --threads 1 --json --model Qwen3-30B-A3B --tokens 16");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const nlohmann::json rows = nlohmann::json::parse(r.out);
  ASSERT_TRUE(rows.is_array());
  ASSERT_EQ(rows.size(), 1u);
  for (const char* key : {"op", "model", "tokens", "backend", "median_us"})
    EXPECT_TRUE(rows[0].contains(key)) << key;
  EXPECT_EQ(rows[0]["model"], "Qwen3-30B-A3B");
  EXPECT_EQ(rows[0]["tokens"], 16);
  EXPECT_GT(rows[0]["median_us"].get<double>(), 0.0);
  EXPECT_TRUE(rows[0]["verified"].get<bool>());
}

TEST_F(Cli, ExplainSaysWhichImplementationRuns) {
  const Result r = run("explain --model Qwen3-30B-A3B --tokens 64 --backend cpu");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("runs"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("reference"), std::string::npos) << r.out;
}

}  // namespace
}  // namespace moekit
