#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "moekit/error.h"
#include "moekit/safetensors.h"
#include "moekit/tensor.h"

namespace moekit {
namespace {

namespace fs = std::filesystem;

// Each test gets its own folder so that leftover files are easy to detect and never shared.
class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    static int counter = 0;
    const std::string test = ::testing::UnitTest::GetInstance()->current_test_info()->name();
    dir_ = fs::temp_directory_path() / ("moekit_st_" + std::to_string(::getpid()) + "_" +
                                        std::to_string(counter++) + "_" + test);
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  std::string file(const std::string& name) const { return (dir_ / name).string(); }

  std::vector<std::string> listing() const {
    std::vector<std::string> out;
    for (const auto& e : fs::directory_iterator(dir_)) out.push_back(e.path().filename().string());
    std::sort(out.begin(), out.end());
    return out;
  }

  fs::path dir_;
};

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string le64(uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[static_cast<size_t>(i)] = static_cast<char>(v >> (8 * i));
  return s;
}

// A file laid out by hand: length prefix, header text as given, data buffer.
std::string raw_file(const std::string& header, const std::string& data = {}) {
  return le64(header.size()) + header + data;
}

// The message of the moekit::Error that fn throws, or a test failure if it throws nothing.
std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    EXPECT_EQ(e.op(), "safetensors") << e.what();
    return e.what();
  }
  ADD_FAILURE() << "expected moekit::Error, nothing was thrown";
  return {};
}

std::string open_error(const std::string& path) {
  return error_of([&] { SafetensorsFile::open(path); });
}

// Deterministic bytes, so every bit pattern (NaNs included) must survive the round trip.
std::vector<unsigned char> pattern(size_t n, uint32_t seed) {
  std::vector<unsigned char> out(n);
  uint32_t x = seed * 2654435761u + 1;
  for (auto& b : out) {
    x = x * 1664525u + 1013904223u;
    b = static_cast<unsigned char>(x >> 24);
  }
  return out;
}

std::string view_bytes(const TensorView& v) {
  return std::string(static_cast<const char*>(v.data()), v.nbytes());
}

std::vector<int64_t> shape_of(const TensorView& v) { return {v.shape().begin(), v.shape().end()}; }

TEST_F(SafetensorsTest, RoundTripsEveryDtypeWithMetadata) {
  std::vector<std::vector<unsigned char>> storage;
  std::vector<NamedTensor> tensors;
  uint32_t seed = 1;
  for (DType d : kAllDTypes) {
    const std::vector<int64_t> shape = {3, 5};
    storage.push_back(pattern(15 * dtype_size(d), seed++));
    tensors.emplace_back("t_" + std::string(dtype_name(d)),
                         TensorView(storage.back().data(), d, shape));
  }
  // Zero-size, 0-d scalar and 6-d tensors.
  tensors.emplace_back("empty_f32", TensorView(nullptr, DType::f32, {0, 4}));
  tensors.emplace_back("empty_u8", TensorView(nullptr, DType::u8, {2, 0}));
  int64_t scalar = -1234567890123;
  tensors.emplace_back("scalar_i64", TensorView(&scalar, DType::i64, std::span<const int64_t>()));
  storage.push_back(pattern(8, 99));
  tensors.emplace_back("six_d", TensorView(storage.back().data(), DType::u8, {1, 2, 1, 2, 1, 2}));
  // Non-contiguous input: the transpose of a 3x4 matrix.
  std::vector<float> base(12);
  for (size_t i = 0; i < base.size(); ++i) base[i] = static_cast<float>(i) + 0.5f;
  const int64_t t_shape[] = {4, 3};
  const int64_t t_strides[] = {1, 4};
  tensors.emplace_back("transposed", TensorView(base.data(), DType::f32, t_shape, t_strides));

  const std::map<std::string, std::string> meta = {{"format", "pt"}, {"note", "a \"quoted\" é"}};
  const std::string path = file("model.safetensors");
  write_safetensors(path, tensors, meta);
  EXPECT_EQ(listing(), std::vector<std::string>{"model.safetensors"});

  const SafetensorsFile f = SafetensorsFile::open(path);
  EXPECT_EQ(f.path(), path);
  EXPECT_EQ(f.metadata(), meta);
  EXPECT_EQ(f.names().size(), tensors.size());
  for (size_t i = 0; i < std::size(kAllDTypes); ++i) {
    const auto& [name, in] = tensors[i];
    SCOPED_TRACE(name);
    ASSERT_TRUE(f.contains(name));
    const TensorView out = f.get(name);
    EXPECT_EQ(out.dtype(), in.dtype());
    EXPECT_EQ(shape_of(out), shape_of(in));
    EXPECT_TRUE(out.device().is_cpu());
    EXPECT_TRUE(out.is_contiguous());
    EXPECT_EQ(reinterpret_cast<uintptr_t>(out.data()) % dtype_size(out.dtype()), 0u);
    EXPECT_EQ(view_bytes(out), view_bytes(in));
  }
  EXPECT_EQ(f.get("empty_f32").numel(), 0);
  EXPECT_EQ(shape_of(f.get("empty_f32")), (std::vector<int64_t>{0, 4}));
  EXPECT_EQ(shape_of(f.get("empty_u8")), (std::vector<int64_t>{2, 0}));
  const TensorView s = f.get("scalar_i64");
  EXPECT_EQ(s.ndim(), 0);
  EXPECT_EQ(s.dtype(), DType::i64);
  EXPECT_EQ(*s.data_as<int64_t>(), scalar);
  EXPECT_EQ(shape_of(f.get("six_d")), (std::vector<int64_t>{1, 2, 1, 2, 1, 2}));
  EXPECT_EQ(view_bytes(f.get("six_d")), view_bytes(tensors[std::size(kAllDTypes) + 3].second));
  const TensorView t = f.get("transposed");
  EXPECT_EQ(shape_of(t), (std::vector<int64_t>{4, 3}));
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 3; ++j) EXPECT_EQ(t.data_as<float>()[i * 3 + j], base[j * 4 + i]);
}

TEST_F(SafetensorsTest, WritesTheOfficialLayout) {
  std::vector<float> a = {1, 2, 3};
  std::vector<uint8_t> b = {7};
  std::vector<int64_t> c = {5};
  const std::string path = file("layout.safetensors");
  write_safetensors(path,
                    {{"a", TensorView(a.data(), DType::f32, {3})},
                     {"b", TensorView(b.data(), DType::u8, {1})},
                     {"c", TensorView(c.data(), DType::i64, {1})}},
                    {{"k", "v"}});
  const std::string bytes = read_bytes(path);
  ASSERT_GE(bytes.size(), 8u);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i)
    n = (n << 8) | static_cast<unsigned char>(bytes[static_cast<size_t>(i)]);
  EXPECT_EQ((8 + n) % 8, 0u) << "the data buffer must start 8-byte aligned";
  const std::string header = bytes.substr(8, n);
  // The JSON is followed only by fewer than 8 spaces of padding.
  const size_t json_end = header.find_last_not_of(' ') + 1;
  EXPECT_EQ(header[json_end - 1], '}');
  EXPECT_LT(header.size() - json_end, 8u);
  const auto json = nlohmann::json::parse(header);
  EXPECT_EQ(json["__metadata__"]["k"], "v");
  // Tensors are packed with no gaps (larger elements first), as the official reader requires.
  EXPECT_EQ(json["c"]["data_offsets"], nlohmann::json::array({0, 8}));
  EXPECT_EQ(json["a"]["data_offsets"], nlohmann::json::array({8, 20}));
  EXPECT_EQ(json["b"]["data_offsets"], nlohmann::json::array({20, 21}));
  EXPECT_EQ(json["a"]["dtype"], "F32");
  EXPECT_EQ(json["a"]["shape"], nlohmann::json::array({3}));
  EXPECT_EQ(bytes.size(), 8 + n + 21);
}

TEST_F(SafetensorsTest, NamesAreInDataOffsetOrder) {
  // The JSON lists z, a, m; the data buffer holds a, m, z.
  const std::string header = R"({"z":{"dtype":"U8","shape":[1],"data_offsets":[2,3]},)"
                             R"("a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},)"
                             R"("m":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}})";
  const std::string path = file("order.safetensors");
  write_bytes(path, raw_file(header, "xyz"));
  const SafetensorsFile f = SafetensorsFile::open(path);
  EXPECT_EQ(f.names(), (std::vector<std::string>{"a", "m", "z"}));
  EXPECT_EQ(*f.get("z").data_as<char>(), 'z');

  // The writer's data order: larger elements first, input order otherwise.
  std::vector<unsigned char> bytes(64);
  write_safetensors(file("w.safetensors"), {{"b", TensorView(bytes.data(), DType::f32, {2})},
                                            {"u", TensorView(bytes.data(), DType::u8, {2})},
                                            {"a", TensorView(bytes.data(), DType::f32, {2})},
                                            {"h", TensorView(bytes.data(), DType::bf16, {2})},
                                            {"l", TensorView(bytes.data(), DType::i64, {2})}});
  EXPECT_EQ(SafetensorsFile::open(file("w.safetensors")).names(),
            (std::vector<std::string>{"l", "b", "a", "h", "u"}));
}

TEST_F(SafetensorsTest, CopiesMisalignedDataIntoAlignedMemory) {
  const float values[] = {1.5f, -2.0f, 3.25f};
  std::string header = R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,12]}})";
  // Make the data buffer start at an odd file offset, so the f32 data is misaligned in the mapping.
  while ((8 + header.size()) % 4 != 1) header += ' ';
  std::string data(sizeof(values), '\0');
  std::memcpy(data.data(), values, sizeof(values));
  const std::string path = file("unaligned.safetensors");
  write_bytes(path, raw_file(header, data));

  SafetensorsFile f = SafetensorsFile::open(path);
  const TensorView w = f.get("w");
  EXPECT_EQ(reinterpret_cast<uintptr_t>(w.data()) % 4, 0u);
  ASSERT_EQ(w.numel(), 3);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(w.data_as<float>()[i], values[i]);
  EXPECT_EQ(f.get("w").data(), w.data()) << "the aligned copy is made once and cached";

  // A moved file keeps its copies and mapping alive.
  SafetensorsFile moved = std::move(f);
  EXPECT_EQ(moved.get("w").data(), w.data());
  EXPECT_EQ(w.data_as<float>()[2], 3.25f);
}

TEST_F(SafetensorsTest, ZeroSizeTensorsAndEmptyBufferAreValid) {
  const std::string path = file("empty_buffer.safetensors");
  write_bytes(path, raw_file(R"({"e":{"dtype":"BF16","shape":[0,3],"data_offsets":[0,0]},)"
                             R"("__metadata__":{}})"));
  const SafetensorsFile f = SafetensorsFile::open(path);
  EXPECT_EQ(f.names(), std::vector<std::string>{"e"});
  EXPECT_EQ(f.get("e").numel(), 0);
  EXPECT_TRUE(f.metadata().empty());
}

TEST_F(SafetensorsTest, UnknownNameIsAnError) {
  const std::string path = file("x.safetensors");
  std::vector<float> a = {1};
  write_safetensors(path, {{"a", TensorView(a.data(), DType::f32, {1})}});
  const SafetensorsFile f = SafetensorsFile::open(path);
  EXPECT_FALSE(f.contains("nope"));
  const std::string msg = error_of([&] { f.get("nope"); });
  EXPECT_NE(msg.find("nope"), std::string::npos) << msg;
}

// ---- Malformed files.

TEST_F(SafetensorsTest, EveryStrictPrefixOfAValidFileIsRejected) {
  std::vector<float> a = {1, 2, 3};
  std::vector<uint16_t> b = {4, 5};
  const std::string good = file("good.safetensors");
  write_safetensors(
      good,
      {{"a", TensorView(a.data(), DType::f32, {3})}, {"b", TensorView(b.data(), DType::f16, {2})}},
      {{"k", "v"}});
  const std::string bytes = read_bytes(good);
  ASSERT_NO_THROW(SafetensorsFile::open(good));
  const std::string path = file("prefix.safetensors");
  for (size_t n = 0; n < bytes.size(); ++n) {
    SCOPED_TRACE("prefix length " + std::to_string(n));
    write_bytes(path, bytes.substr(0, n));
    const std::string msg = open_error(path);
    EXPECT_FALSE(msg.empty());
  }
}

TEST_F(SafetensorsTest, TooShortFileIsRejected) {
  const std::string path = file("short.safetensors");
  write_bytes(path, "abc");
  const std::string msg = open_error(path);
  EXPECT_NE(msg.find("too short"), std::string::npos) << msg;
  EXPECT_NE(msg.find(path), std::string::npos) << msg;
}

TEST_F(SafetensorsTest, EmptyFileIsRejected) {
  const std::string path = file("empty.safetensors");
  write_bytes(path, "");
  const std::string msg = open_error(path);
  EXPECT_NE(msg.find("too short"), std::string::npos) << msg;
  EXPECT_NE(msg.find(path), std::string::npos) << msg;
}

TEST_F(SafetensorsTest, HeaderLengthPastEndOfFileIsRejected) {
  const std::string path = file("long_header.safetensors");
  write_bytes(path, le64(1000) + "{}");
  const std::string msg = open_error(path);
  EXPECT_NE(msg.find("header_length=1000"), std::string::npos) << msg;
  EXPECT_NE(msg.find("past the end"), std::string::npos) << msg;
}

TEST_F(SafetensorsTest, HugeHeaderLengthIsRejected) {
  const std::string path = file("huge_header.safetensors");
  for (uint64_t n : {uint64_t{200} << 20, ~uint64_t{0}, uint64_t{1} << 63}) {
    write_bytes(path, le64(n) + "{}");
    const std::string msg = open_error(path);
    EXPECT_NE(msg.find("header_length=" + std::to_string(n)), std::string::npos) << msg;
    EXPECT_NE(msg.find("exceeds the limit"), std::string::npos) << msg;
  }
}

TEST_F(SafetensorsTest, InvalidJsonIsRejected) {
  const std::string path = file("bad_json.safetensors");
  write_bytes(path, raw_file(R"({"a": {"dtype": "F32",)"));
  const std::string msg = open_error(path);
  EXPECT_NE(msg.find("not valid JSON"), std::string::npos) << msg;
}

TEST_F(SafetensorsTest, NulBytesInHeaderAreRejected) {
  const std::string path = file("nul.safetensors");
  write_bytes(path, raw_file(std::string("{}\0{\"x\": 1", 10)));
  const std::string msg = open_error(path);
  EXPECT_NE(msg.find("not valid JSON"), std::string::npos) << msg;
}

TEST_F(SafetensorsTest, JsonThatIsNotAnObjectIsRejected) {
  const std::string path = file("array.safetensors");
  write_bytes(path, raw_file("[1, 2, 3]"));
  const std::string msg = open_error(path);
  EXPECT_NE(msg.find("not a JSON object"), std::string::npos) << msg;
}

TEST_F(SafetensorsTest, EntryThatIsNotAnObjectIsRejected) {
  const std::string path = file("entry.safetensors");
  write_bytes(path, raw_file(R"({"w": 3})"));
  const std::string msg = open_error(path);
  EXPECT_NE(msg.find("w=3"), std::string::npos) << msg;
  EXPECT_NE(msg.find("must be an object"), std::string::npos) << msg;
}

TEST_F(SafetensorsTest, MissingDtypeIsRejected) {
  const std::string path = file("no_dtype.safetensors");
  write_bytes(path, raw_file(R"({"w":{"shape":[1],"data_offsets":[0,4]}})", "abcd"));
  const std::string msg = open_error(path);
  EXPECT_NE(msg.find("w.dtype"), std::string::npos) << msg;
  EXPECT_NE(msg.find("required"), std::string::npos) << msg;
}

TEST_F(SafetensorsTest, MissingShapeIsRejected) {
  const std::string path = file("no_shape.safetensors");
  write_bytes(path, raw_file(R"({"w":{"dtype":"F32","data_offsets":[0,4]}})", "abcd"));
  const std::string msg = open_error(path);
  EXPECT_NE(msg.find("w.shape"), std::string::npos) << msg;
  EXPECT_NE(msg.find("required"), std::string::npos) << msg;
}

TEST_F(SafetensorsTest, MissingDataOffsetsIsRejected) {
  const std::string path = file("no_offsets.safetensors");
  write_bytes(path, raw_file(R"({"w":{"dtype":"F32","shape":[1]}})", "abcd"));
  const std::string msg = open_error(path);
  EXPECT_NE(msg.find("w.data_offsets"), std::string::npos) << msg;
  EXPECT_NE(msg.find("required"), std::string::npos) << msg;
}

TEST_F(SafetensorsTest, UnknownDtypeIsRejected) {
  const std::string path = file("f64.safetensors");
  write_bytes(path,
              raw_file(R"({"w":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}})", "abcdefgh"));
  const std::string msg = open_error(path);
  EXPECT_NE(msg.find("w.dtype=\"F64\""), std::string::npos) << msg;
  EXPECT_NE(msg.find("not a supported dtype"), std::string::npos) << msg;
}

TEST_F(SafetensorsTest, OurOwnDtypeSpellingIsNotASafetensorsName) {
  const std::string path = file("lower.safetensors");
  write_bytes(path, raw_file(R"({"w":{"dtype":"f32","shape":[1],"data_offsets":[0,4]}})", "abcd"));
  const std::string msg = open_error(path);
  EXPECT_NE(msg.find("w.dtype=\"f32\""), std::string::npos) << msg;
}

TEST_F(SafetensorsTest, NegativeShapeIsRejected) {
  const std::string path = file("neg.safetensors");
  write_bytes(path, raw_file(R"({"w":{"dtype":"U8","shape":[2,-1],"data_offsets":[0,0]}})"));
  const std::string msg = open_error(path);
  EXPECT_NE(msg.find("w.shape"), std::string::npos) << msg;
  EXPECT_NE(msg.find("non-negative integers, not -1"), std::string::npos) << msg;
}

TEST_F(SafetensorsTest, NonIntegerShapeIsRejected) {
  const std::string path = file("float_dim.safetensors");
  write_bytes(path, raw_file(R"({"w":{"dtype":"U8","shape":[2.0],"data_offsets":[0,2]}})", "ab"));
  const std::string msg = open_error(path);
  EXPECT_NE(msg.find("non-negative integers"), std::string::npos) << msg;
}

TEST_F(SafetensorsTest, TooManyDimensionsAreRejected) {
  const std::string path = file("rank7.safetensors");
  write_bytes(
      path, raw_file(R"({"w":{"dtype":"U8","shape":[1,1,1,1,1,1,1],"data_offsets":[0,1]}})", "a"));
  const std::string msg = open_error(path);
  EXPECT_NE(msg.find("more than 6 dimensions"), std::string::npos) << msg;
}

TEST_F(SafetensorsTest, OverflowingShapeIsRejected) {
  const std::string path = file("overflow.safetensors");
  // Even with a zero dimension the others would overflow the strides a view derives.
  for (const char* shape : {"[4294967296,4294967296]", "[0,4294967296,4294967296]",
                            "[18446744073709551615]", "[2305843009213693952]"}) {
    write_bytes(path, raw_file(std::string(R"({"w":{"dtype":"F32","shape":)") + shape +
                               R"(,"data_offsets":[0,0]}})"));
    const std::string msg = open_error(path);
    EXPECT_NE(msg.find("overflows"), std::string::npos) << msg;
  }
}

TEST_F(SafetensorsTest, OffsetsOutOfBoundsAreRejected) {
  const std::string path = file("oob.safetensors");
  write_bytes(path, raw_file(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                             std::string(8, 'x')));
  const std::string msg = open_error(path);
  EXPECT_NE(msg.find("w.data_offsets=[4,12]"), std::string::npos) << msg;
  EXPECT_NE(msg.find("past the data buffer of 8 bytes"), std::string::npos) << msg;
}

TEST_F(SafetensorsTest, HugeOffsetsAreRejected) {
  const std::string path = file("huge_offsets.safetensors");
  write_bytes(path, raw_file(R"({"w":{"dtype":"U8","shape":[1],)"
                             R"("data_offsets":[18446744073709551615,18446744073709551615]}})",
                             "x"));
  const std::string msg = open_error(path);
  EXPECT_NE(msg.find("past the data buffer"), std::string::npos) << msg;
}

TEST_F(SafetensorsTest, MalformedOffsetsAreRejected) {
  const std::string path = file("bad_offsets.safetensors");
  for (const char* offsets : {"[0]", "[0,1,2]", "[-1,0]", "\"0,1\"", "[0,1.5]"}) {
    write_bytes(path, raw_file(std::string(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":)") +
                                   offsets + "}}",
                               "xx"));
    const std::string msg = open_error(path);
    EXPECT_NE(msg.find("must be [begin, end]"), std::string::npos) << msg;
  }
}

TEST_F(SafetensorsTest, BeginAfterEndIsRejected) {
  const std::string path = file("begin_end.safetensors");
  write_bytes(path, raw_file(R"({"w":{"dtype":"U8","shape":[0],"data_offsets":[4,0]}})",
                             std::string(8, 'x')));
  const std::string msg = open_error(path);
  EXPECT_NE(msg.find("begin > end"), std::string::npos) << msg;
}

TEST_F(SafetensorsTest, SizeMismatchIsRejected) {
  const std::string path = file("mismatch.safetensors");
  write_bytes(path, raw_file(R"({"w":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,8]}})",
                             std::string(16, 'x')));
  const std::string msg = open_error(path);
  EXPECT_NE(msg.find("w.data_offsets"), std::string::npos) << msg;
  EXPECT_NE(msg.find("span 8 bytes"), std::string::npos) << msg;
  EXPECT_NE(msg.find("needs 12"), std::string::npos) << msg;
}

TEST_F(SafetensorsTest, OverlappingTensorsAreRejected) {
  const std::string path = file("overlap.safetensors");
  write_bytes(path, raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                             R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                             std::string(12, 'x')));
  const std::string msg = open_error(path);
  EXPECT_NE(msg.find("overlaps tensor a"), std::string::npos) << msg;
  EXPECT_NE(msg.find("b.data_offsets"), std::string::npos) << msg;
}

TEST_F(SafetensorsTest, MetadataWithNonStringValuesIsRejected) {
  const std::string path = file("meta.safetensors");
  write_bytes(path, raw_file(R"({"__metadata__":{"ok":"yes","n":5}})"));
  const std::string msg = open_error(path);
  EXPECT_NE(msg.find("__metadata__.n=5"), std::string::npos) << msg;
  EXPECT_NE(msg.find("must be a string"), std::string::npos) << msg;
}

TEST_F(SafetensorsTest, MetadataThatIsNotAnObjectIsRejected) {
  const std::string path = file("meta_array.safetensors");
  write_bytes(path, raw_file(R"({"__metadata__":["a","b"]})"));
  const std::string msg = open_error(path);
  EXPECT_NE(msg.find("__metadata__"), std::string::npos) << msg;
  EXPECT_NE(msg.find("must be an object"), std::string::npos) << msg;
}

TEST_F(SafetensorsTest, DuplicateKeysAreRejected) {
  const std::string path = file("dup_keys.safetensors");
  write_bytes(path, raw_file(R"({"w":{"dtype":"U8","dtype":"F32","shape":[1],)"
                             R"("data_offsets":[0,1]}})",
                             "x"));
  const std::string msg = open_error(path);
  EXPECT_NE(msg.find("more than once"), std::string::npos) << msg;
}

TEST_F(SafetensorsTest, DeeplyNestedHeaderIsRejected) {
  const std::string path = file("deep.safetensors");
  write_bytes(path, raw_file(R"({"w":)" + std::string(10000, '[') + std::string(10000, ']') + "}"));
  const std::string msg = open_error(path);
  EXPECT_NE(msg.find("nested deeper"), std::string::npos) << msg;
}

TEST_F(SafetensorsTest, MissingFileIsRejected) {
  const std::string path = file("does_not_exist.safetensors");
  const std::string msg = open_error(path);
  EXPECT_NE(msg.find(path), std::string::npos) << msg;
  EXPECT_NE(msg.find("cannot be opened"), std::string::npos) << msg;
}

TEST_F(SafetensorsTest, DirectoryIsRejected) {
  const std::string path = file("a_directory");
  fs::create_directory(path);
  const std::string msg = open_error(path);
  EXPECT_NE(msg.find(path), std::string::npos) << msg;
  EXPECT_NE(msg.find("is a directory"), std::string::npos) << msg;
}

// ---- Writer errors leave nothing behind and keep an existing file intact.

TEST_F(SafetensorsTest, WriterRejectsDuplicateNames) {
  const std::string path = file("out.safetensors");
  std::vector<float> a = {1, 2};
  const std::string msg = error_of([&] {
    write_safetensors(path, {{"w", TensorView(a.data(), DType::f32, {2})},
                             {"w", TensorView(a.data(), DType::f32, {1})}});
  });
  EXPECT_NE(msg.find("name=w"), std::string::npos) << msg;
  EXPECT_NE(msg.find("more than once"), std::string::npos) << msg;
  EXPECT_TRUE(listing().empty());
}

TEST_F(SafetensorsTest, WriterRejectsDuplicateNamesAndKeepsExistingFile) {
  const std::string path = file("out.safetensors");
  write_bytes(path, "old contents");
  std::vector<float> a = {1, 2};
  EXPECT_THROW(write_safetensors(path, {{"w", TensorView(a.data(), DType::f32, {2})},
                                        {"w", TensorView(a.data(), DType::f32, {1})}}),
               Error);
  EXPECT_EQ(listing(), std::vector<std::string>{"out.safetensors"});
  EXPECT_EQ(read_bytes(path), "old contents");
}

TEST_F(SafetensorsTest, WriterRejectsGpuTensorsBeforeTouchingData) {
  const std::string path = file("out.safetensors");
  write_bytes(path, "old contents");
  std::vector<float> a = {1, 2};
  // A dummy device pointer: dereferencing it on the host would crash.
  void* dummy = reinterpret_cast<void*>(uintptr_t{0x1000});
  const std::string msg = error_of([&] {
    write_safetensors(path, {{"ok", TensorView(a.data(), DType::f32, {2})},
                             {"on_gpu", TensorView(dummy, DType::f32, {4, 4}, Device::gpu(0))}});
  });
  EXPECT_NE(msg.find("on_gpu"), std::string::npos) << msg;
  EXPECT_NE(msg.find("gpu:0"), std::string::npos) << msg;
  EXPECT_EQ(listing(), std::vector<std::string>{"out.safetensors"});
  EXPECT_EQ(read_bytes(path), "old contents");
}

TEST_F(SafetensorsTest, WriterRejectsTheMetadataName) {
  const std::string path = file("out.safetensors");
  std::vector<float> a = {1};
  const std::string msg = error_of([&] {
    write_safetensors(path, {{"__metadata__", TensorView(a.data(), DType::f32, {1})}});
  });
  EXPECT_NE(msg.find("__metadata__"), std::string::npos) << msg;
  EXPECT_NE(msg.find("reserved"), std::string::npos) << msg;
  EXPECT_TRUE(listing().empty());
}

TEST_F(SafetensorsTest, WriterRejectsInvalidUtf8Names) {
  const std::string path = file("out.safetensors");
  std::vector<float> a = {1};
  const std::string msg = error_of([&] {
    write_safetensors(path, {{"bad\xff", TensorView(a.data(), DType::f32, {1})}});
  });
  EXPECT_NE(msg.find("header is invalid"), std::string::npos) << msg;
  EXPECT_TRUE(listing().empty());
}

TEST_F(SafetensorsTest, WriterReportsAMissingDirectory) {
  const std::string path = file("no_such_dir/out.safetensors");
  std::vector<float> a = {1};
  const std::string msg = error_of([&] {
    write_safetensors(path, {{"a", TensorView(a.data(), DType::f32, {1})}});
  });
  EXPECT_NE(msg.find(path), std::string::npos) << msg;
  EXPECT_TRUE(listing().empty());
}

TEST_F(SafetensorsTest, WriterReplacesAnExistingFile) {
  const std::string path = file("out.safetensors");
  write_bytes(path, "old contents");
  std::vector<int32_t> a = {1, -2, 3};
  write_safetensors(path, {{"a", TensorView(a.data(), DType::i32, {3})}});
  EXPECT_EQ(listing(), std::vector<std::string>{"out.safetensors"});
  const SafetensorsFile f = SafetensorsFile::open(path);
  EXPECT_EQ(f.get("a").data_as<int32_t>()[1], -2);
}

TEST_F(SafetensorsTest, EmptyFileListRoundTrips) {
  const std::string path = file("nothing.safetensors");
  write_safetensors(path, {});
  const SafetensorsFile f = SafetensorsFile::open(path);
  EXPECT_TRUE(f.names().empty());
  EXPECT_TRUE(f.metadata().empty());
}

}  // namespace
}  // namespace moekit
