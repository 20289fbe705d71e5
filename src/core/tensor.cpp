#include "moekit/tensor.h"

#include <cstdlib>
#include <cstring>

#include "core/gpu_hooks.h"
#include "moekit/error.h"

namespace moekit {

std::string Device::str() const {
  return is_cpu() ? std::string("cpu") : "gpu:" + std::to_string(index);
}

namespace {
void check_rank(size_t ndim) {
  if (ndim > static_cast<size_t>(kMaxDims))
    fail("tensor", "ndim", std::to_string(ndim), "exceeds the maximum of 6 dimensions");
}
}  // namespace

TensorView::TensorView(void* data, DType dtype, std::span<const int64_t> shape, Device device)
    : data_(data), dtype_(dtype), device_(device), ndim_(static_cast<int>(shape.size())) {
  check_rank(shape.size());
  int64_t stride = 1;
  for (int d = ndim_ - 1; d >= 0; --d) {
    if (shape[static_cast<size_t>(d)] < 0)
      fail("tensor", "shape", std::to_string(shape[static_cast<size_t>(d)]), "is negative");
    shape_[static_cast<size_t>(d)] = shape[static_cast<size_t>(d)];
    strides_[static_cast<size_t>(d)] = stride;
    stride *= shape[static_cast<size_t>(d)];
  }
}

TensorView::TensorView(void* data, DType dtype, std::span<const int64_t> shape,
                       std::span<const int64_t> strides, Device device)
    : data_(data), dtype_(dtype), device_(device), ndim_(static_cast<int>(shape.size())) {
  check_rank(shape.size());
  if (strides.size() != shape.size())
    fail("tensor", "strides", std::to_string(strides.size()) + " values",
         "do not match the shape's " + std::to_string(shape.size()) + " dimensions");
  for (size_t d = 0; d < shape.size(); ++d) {
    if (shape[d] < 0) fail("tensor", "shape", std::to_string(shape[d]), "is negative");
    shape_[d] = shape[d];
    strides_[d] = strides[d];
  }
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int d = 0; d < ndim_; ++d) n *= shape_[static_cast<size_t>(d)];
  return n;
}

bool TensorView::is_contiguous() const {
  int64_t expected = 1;
  for (int d = ndim_ - 1; d >= 0; --d) {
    const auto i = static_cast<size_t>(d);
    if (shape_[i] != 1 && strides_[i] != expected) return false;
    expected *= shape_[i];
  }
  return true;
}

std::string TensorView::shape_str() const {
  std::string s = "[";
  for (int d = 0; d < ndim_; ++d) {
    if (d) s += ", ";
    s += std::to_string(shape_[static_cast<size_t>(d)]);
  }
  return s + "]";
}

Tensor Tensor::empty(DType dtype, std::span<const int64_t> shape, Device device) {
  Tensor t;
  t.view_ = TensorView(nullptr, dtype, shape, device);
  const size_t bytes = std::max<size_t>(t.view_.nbytes(), 1);
  if (device.is_cpu()) {
    const size_t rounded = (bytes + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, rounded);
    if (!p) fail("tensor", "bytes", std::to_string(bytes), "could not be allocated on the cpu");
    t.storage_ = std::shared_ptr<void>(p, [](void* q) { std::free(q); });
  } else {
    const GpuHooks& gpu = gpu_hooks();
    if (!gpu.malloc)
      fail("tensor", "device", device.str(), "is not available: this build has no GPU backend");
    void* p = gpu.malloc(bytes, device.index);
    t.storage_ = std::shared_ptr<void>(p, [free = gpu.free](void* q) { free(q); });
  }
  t.view_ = TensorView(t.storage_.get(), dtype, shape, device);
  return t;
}

namespace {
// Copies a strided CPU view element by element into contiguous memory.
void gather_contiguous(void* dst, const TensorView& src) {
  const size_t esize = dtype_size(src.dtype());
  const int64_t n = src.numel();
  std::array<int64_t, kMaxDims> index{};
  auto* out = static_cast<char*>(dst);
  const auto* in = static_cast<const char*>(src.data());
  for (int64_t i = 0; i < n; ++i) {
    int64_t offset = 0;
    for (int d = 0; d < src.ndim(); ++d) offset += index[static_cast<size_t>(d)] * src.stride(d);
    std::memcpy(out + static_cast<size_t>(i) * esize, in + offset * static_cast<int64_t>(esize),
                esize);
    for (int d = src.ndim() - 1; d >= 0; --d) {
      if (++index[static_cast<size_t>(d)] < src.size(d)) break;
      index[static_cast<size_t>(d)] = 0;
    }
  }
}
}  // namespace

Tensor Tensor::copy_of(const TensorView& src, Device device) {
  Tensor t = empty(src.dtype(), src.shape(), device);
  if (src.numel() == 0) return t;
  if (src.is_contiguous()) {
    copy(t.view(), src);
  } else {
    if (!src.device().is_cpu())
      fail("tensor", "src", src.device().str(), "must be contiguous to copy from a GPU");
    Tensor host = empty(src.dtype(), src.shape(), Device::cpu());
    gather_contiguous(host.data(), src);
    copy(t.view(), host.view());
  }
  return t;
}

void copy(const TensorView& dst, const TensorView& src) {
  if (dst.dtype() != src.dtype())
    fail("copy", "dst.dtype", std::string(dtype_name(dst.dtype())),
         "differs from src.dtype=" + std::string(dtype_name(src.dtype())));
  if (dst.numel() != src.numel())
    fail("copy", "dst.shape", dst.shape_str(), "differs from src.shape=" + src.shape_str());
  if (!dst.is_contiguous() || !src.is_contiguous())
    fail("copy", "tensors", dst.shape_str(), "must be contiguous");
  if (dst.nbytes() == 0) return;
  if (dst.device().is_cpu() && src.device().is_cpu()) {
    std::memcpy(dst.data(), src.data(), dst.nbytes());
    return;
  }
  const GpuHooks& gpu = gpu_hooks();
  if (!gpu.memcpy)
    fail("copy", "device", (dst.device().is_gpu() ? dst : src).device().str(),
         "is not available: this build has no GPU backend");
  gpu.memcpy(dst.data(), dst.device().is_gpu(), src.data(), src.device().is_gpu(), dst.nbytes());
}

}  // namespace moekit
