// TensorView: a non-owning (pointer, shape, dtype, device) view, row-major and contiguous.
// Tensor: an owning host tensor (64-byte aligned). Device memory is owned by the CUDA backend's
// DeviceTensor (epmoe/cuda/device_tensor.h), which hands out the same TensorView.
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "epmoe/core/dtype.h"
#include "epmoe/core/error.h"

namespace epmoe {

enum class Device : uint8_t { kCpu, kCuda };

constexpr int kMaxDims = 4;

struct Shape {
  std::array<int64_t, kMaxDims> dims{};
  int rank = 0;

  Shape() = default;
  Shape(std::initializer_list<int64_t> d);
  explicit Shape(const std::vector<int64_t>& d);
  int64_t operator[](int i) const { return dims[i]; }
  // Checked: throws Error(kInvalidArgument) for a negative dimension or a product beyond int64.
  int64_t numel() const;
  bool operator==(const Shape& o) const;
  bool operator!=(const Shape& o) const { return !(*this == o); }
  std::string str() const;  // "[37, 256]"
};

template <typename T>
constexpr DType dtype_of();
template <>
constexpr DType dtype_of<float>() {
  return DType::kF32;
}
template <>
constexpr DType dtype_of<bf16>() {
  return DType::kBF16;
}
template <>
constexpr DType dtype_of<f16>() {
  return DType::kF16;
}
template <>
constexpr DType dtype_of<fp8e4m3>() {
  return DType::kF8E4M3;
}
template <>
constexpr DType dtype_of<int32_t>() {
  return DType::kI32;
}
template <>
constexpr DType dtype_of<int64_t>() {
  return DType::kI64;
}

struct TensorView {
  void* data = nullptr;
  Shape shape;
  DType dtype = DType::kF32;
  Device device = Device::kCpu;

  int64_t numel() const { return shape.numel(); }
  size_t nbytes() const;  // checked: throws Error(kInvalidArgument) when it overflows
  int64_t size(int i) const { return shape[i]; }

  template <typename T>
  T* as() const {
    EPMOE_CHECK(dtype_of<T>() == dtype, kInvalidArgument, "tensor holds {}, accessed as {}",
                dtype_name(dtype), dtype_name(dtype_of<T>()));
    return static_cast<T*>(data);
  }
  // Throws Error(kInvalidArgument) naming `what` unless dtype and shape match exactly.
  void expect(const char* what, DType dt, const Shape& s) const;
};

class Tensor {
 public:
  Tensor() = default;
  Tensor(DType dtype, const Shape& shape);
  static Tensor zeros(DType dtype, const Shape& shape);

  TensorView view() const { return TensorView{data_.get(), shape_, dtype_, Device::kCpu}; }
  operator TensorView() const { return view(); }
  template <typename T>
  T* as() const {
    return view().as<T>();
  }
  const Shape& shape() const { return shape_; }
  DType dtype() const { return dtype_; }
  int64_t numel() const { return shape_.numel(); }
  size_t nbytes() const { return view().nbytes(); }
  bool empty() const { return numel() == 0; }
  bool defined() const { return data_ != nullptr; }

 private:
  struct Free {
    void operator()(void* p) const;
  };
  std::unique_ptr<void, Free> data_;
  Shape shape_{0};  // a default tensor holds no elements
  DType dtype_ = DType::kF32;
};

// Conversions of whole host tensors (f32 <-> bf16/f16/fp8), element by element.
Tensor to_f32(const TensorView& t);
Tensor to_dtype(const TensorView& t, DType dtype);

}  // namespace epmoe
