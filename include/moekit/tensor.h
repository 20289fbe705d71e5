// TensorView (non-owning: data, dtype, shape, strides, device) and Tensor (owning, aligned memory).
// Strides are in elements, not bytes, as in torch.
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "moekit/dtype.h"

namespace moekit {

enum class DeviceKind : uint8_t { cpu, gpu };

struct Device {
  DeviceKind kind = DeviceKind::cpu;
  int index = 0;

  static Device cpu() { return {}; }
  static Device gpu(int index = 0) { return {DeviceKind::gpu, index}; }
  bool is_cpu() const { return kind == DeviceKind::cpu; }
  bool is_gpu() const { return kind == DeviceKind::gpu; }
  std::string str() const;  // "cpu", "gpu:0"
  bool operator==(const Device&) const = default;
};

inline constexpr int kMaxDims = 6;

class TensorView {
 public:
  TensorView() = default;
  // Contiguous (row-major) view.
  TensorView(void* data, DType dtype, std::span<const int64_t> shape, Device device = {});
  TensorView(void* data, DType dtype, std::initializer_list<int64_t> shape, Device device = {})
      : TensorView(data, dtype, std::span<const int64_t>(shape.begin(), shape.size()), device) {}
  // Strided view.
  TensorView(void* data, DType dtype, std::span<const int64_t> shape,
             std::span<const int64_t> strides, Device device = {});

  void* data() const { return data_; }
  template <class T>
  T* data_as() const {
    return static_cast<T*>(data_);
  }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  int ndim() const { return ndim_; }
  int64_t size(int dim) const { return shape_[static_cast<size_t>(dim)]; }
  int64_t stride(int dim) const { return strides_[static_cast<size_t>(dim)]; }
  std::span<const int64_t> shape() const { return {shape_.data(), static_cast<size_t>(ndim_)}; }
  std::span<const int64_t> strides() const { return {strides_.data(), static_cast<size_t>(ndim_)}; }
  int64_t numel() const;
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype_); }
  bool is_contiguous() const;
  std::string shape_str() const;  // "[4096, 128]"

 private:
  void* data_ = nullptr;
  DType dtype_ = DType::f32;
  Device device_{};
  int ndim_ = 0;
  std::array<int64_t, kMaxDims> shape_{};
  std::array<int64_t, kMaxDims> strides_{};
};

// Owning, contiguous, 64-byte aligned tensor on a device. Move-only.
class Tensor {
 public:
  Tensor() = default;
  static Tensor empty(DType dtype, std::span<const int64_t> shape, Device device = {});
  static Tensor empty(DType dtype, std::initializer_list<int64_t> shape, Device device = {}) {
    return empty(dtype, std::span<const int64_t>(shape.begin(), shape.size()), device);
  }
  // Copies a view (any strides) into a new contiguous tensor on the given device.
  static Tensor copy_of(const TensorView& src, Device device);

  const TensorView& view() const { return view_; }
  operator const TensorView&() const { return view_; }  // NOLINT: views are the currency of ops
  void* data() const { return view_.data(); }
  template <class T>
  T* data_as() const {
    return view_.data_as<T>();
  }
  DType dtype() const { return view_.dtype(); }
  int64_t size(int dim) const { return view_.size(dim); }
  int64_t numel() const { return view_.numel(); }
  size_t nbytes() const { return view_.nbytes(); }
  Device device() const { return view_.device(); }

 private:
  std::shared_ptr<void> storage_;
  TensorView view_;
};

// Copies between contiguous views of equal dtype and shape, across devices (host <-> gpu).
void copy(const TensorView& dst, const TensorView& src);

}  // namespace moekit
