#include <gtest/gtest.h>

#include "moekit/backend.h"
#include "moekit/error.h"
#include "moekit/tensor.h"

namespace moekit {
namespace {

TEST(Tensor, ContiguousViewStridesAndSize) {
  float data[24];
  TensorView v(data, DType::f32, {2, 3, 4});
  EXPECT_EQ(v.ndim(), 3);
  EXPECT_EQ(v.stride(0), 12);
  EXPECT_EQ(v.stride(1), 4);
  EXPECT_EQ(v.stride(2), 1);
  EXPECT_EQ(v.numel(), 24);
  EXPECT_EQ(v.nbytes(), 96u);
  EXPECT_TRUE(v.is_contiguous());
  EXPECT_EQ(v.shape_str(), "[2, 3, 4]");
}

TEST(Tensor, StridedViewIsNotContiguous) {
  float data[24];
  const int64_t shape[] = {3, 4}, strides[] = {8, 2};
  TensorView v(data, DType::f32, shape, strides);
  EXPECT_FALSE(v.is_contiguous());
  const int64_t bad_strides[] = {1};
  EXPECT_THROW(TensorView(data, DType::f32, shape, bad_strides), Error);
}

TEST(Tensor, NegativeShapeAndTooManyDimsAreErrors) {
  EXPECT_THROW(TensorView(nullptr, DType::f32, {2, -1}), Error);
  EXPECT_THROW(TensorView(nullptr, DType::f32, {1, 1, 1, 1, 1, 1, 1}), Error);
}

TEST(Tensor, EmptyIsAlignedAndCopyOfGathersStrides) {
  Tensor t = Tensor::empty(DType::f32, {3, 4});
  EXPECT_EQ(reinterpret_cast<uintptr_t>(t.data()) % 64, 0u);
  float data[24];
  for (int i = 0; i < 24; ++i) data[i] = static_cast<float>(i);
  const int64_t shape[] = {3, 4}, strides[] = {8, 2};
  Tensor c = Tensor::copy_of(TensorView(data, DType::f32, shape, strides), Device::cpu());
  ASSERT_TRUE(c.view().is_contiguous());
  for (int r = 0; r < 3; ++r)
    for (int k = 0; k < 4; ++k) EXPECT_EQ(c.data_as<float>()[r * 4 + k], data[r * 8 + k * 2]);
}

TEST(Tensor, CopyChecksDtypeAndShape) {
  Tensor a = Tensor::empty(DType::f32, {4}), b = Tensor::empty(DType::i32, {4});
  Tensor c = Tensor::empty(DType::f32, {5});
  EXPECT_THROW(copy(a, b), Error);
  EXPECT_THROW(copy(a, c), Error);
}

TEST(Backends, ReferenceAndCpuAlwaysPresent) {
  const std::vector<BackendInfo> list = backends();
  ASSERT_GE(list.size(), 2u);
  EXPECT_EQ(list[0].backend, Backend::reference);
  EXPECT_EQ(list[1].backend, Backend::cpu);
  EXPECT_TRUE(backend_available(Backend::reference));
  EXPECT_EQ(parse_backend("cpu"), Backend::cpu);
  try {
    parse_backend("tpu");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.value(), "tpu");
    EXPECT_NE(std::string(e.what()).find("tpu"), std::string::npos);
  }
}

TEST(Backends, GpuTensorWithoutGpuIsAClearError) {
  if (backend_available(Backend::gpu)) GTEST_SKIP() << "this machine has a GPU";
  EXPECT_THROW(Tensor::empty(DType::f32, {4}, Device::gpu()), Error);
}

}  // namespace
}  // namespace moekit
