// Device discovery and device-owned tensors. Callable with no GPU present: cuda_device_count()
// is then 0 and nothing else needs to be called.
#pragma once

#include <memory>
#include <string>

#include "epmoe/core/tensor.h"

namespace epmoe::cuda {

// Number of usable CUDA devices; 0 when there is no driver or no GPU (never throws).
int device_count() noexcept;
// "NVIDIA H100 80GB HBM3 (sm_90, 132 SMs)"; throws Error(kCuda) for a bad index.
std::string device_description(int device);
// Throws Error(kUnsupported) with one readable line when no GPU is present.
void require_device();

// Owning device tensor (cudaMalloc); view() has device == kCuda.
class DeviceTensor {
 public:
  DeviceTensor() = default;
  DeviceTensor(DType dtype, const Shape& shape);
  static DeviceTensor from_host(const TensorView& host);

  TensorView view() const { return TensorView{data_.get(), shape_, dtype_, Device::kCuda}; }
  operator TensorView() const { return view(); }
  template <typename T>
  T* as() const {
    return view().as<T>();
  }
  const Shape& shape() const { return shape_; }
  DType dtype() const { return dtype_; }
  int64_t numel() const { return shape_.numel(); }
  size_t nbytes() const { return size_t(numel()) * dtype_size(dtype_); }

  void copy_from_host(const TensorView& host);  // synchronous
  Tensor to_host() const;                       // synchronous
  // Fills every byte with `byte` (poisoning before a kernel shows unwritten outputs).
  void fill_bytes(int byte);

 private:
  struct Free {
    void operator()(void* p) const;
  };
  std::unique_ptr<void, Free> data_;
  Shape shape_;
  DType dtype_ = DType::kF32;
};

// Grow-only buffers for sizes learned per call (normal mode): keeps `t` when it already has dtype
// `dt`, the trailing dimensions of `s` and at least s[0] rows (consumers are told the exact row
// count apart); otherwise reallocates with 25 % headroom on the rows.
void ensure_rows(DeviceTensor& t, DType dt, const Shape& s);

}  // namespace epmoe::cuda
