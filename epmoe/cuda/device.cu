#include <fmt/format.h>

#include "epmoe/cuda/cuda_check.h"
#include "epmoe/cuda/device.h"

namespace epmoe::cuda {

int device_count() noexcept {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

std::string device_description(int device) {
  cudaDeviceProp prop{};
  const cudaError_t e = cudaGetDeviceProperties(&prop, device);
  if (e != cudaSuccess) {
    cudaGetLastError();  // do not leave the error for an unrelated later check
    EPMOE_FAIL(kCuda, "no CUDA device {}: {}", device, cudaGetErrorString(e));
  }
  return fmt::format("{} (sm_{}{}, {} SMs, {:.0f} GiB)", prop.name, prop.major, prop.minor,
                     prop.multiProcessorCount, double(prop.totalGlobalMem) / (1ull << 30));
}

void require_device() {
  EPMOE_CHECK(device_count() > 0, kUnsupported,
              "no CUDA GPU is available on this machine (the cuda backend needs one)");
}

void DeviceTensor::Free::operator()(void* p) const { cudaFree(p); }

DeviceTensor::DeviceTensor(DType dtype, const Shape& shape) : shape_(shape), dtype_(dtype) {
  size_t bytes = nbytes();
  void* p = nullptr;
  EPMOE_CUDA_CHECK(cudaMalloc(&p, bytes ? bytes : 16));
  data_.reset(p);
}

DeviceTensor DeviceTensor::from_host(const TensorView& host) {
  DeviceTensor t(host.dtype, host.shape);
  t.copy_from_host(host);
  return t;
}

void DeviceTensor::copy_from_host(const TensorView& host) {
  EPMOE_CHECK(host.dtype == dtype_ && host.shape == shape_, kInvalidArgument,
              "copy_from_host: host tensor {} {} does not match device tensor {} {}",
              dtype_name(host.dtype), host.shape.str(), dtype_name(dtype_), shape_.str());
  if (nbytes())
    EPMOE_CUDA_CHECK(cudaMemcpy(data_.get(), host.data, nbytes(), cudaMemcpyHostToDevice));
}

Tensor DeviceTensor::to_host() const {
  Tensor h(dtype_, shape_);
  if (nbytes())
    EPMOE_CUDA_CHECK(cudaMemcpy(h.view().data, data_.get(), nbytes(), cudaMemcpyDeviceToHost));
  return h;
}

void DeviceTensor::fill_bytes(int byte) {
  if (nbytes()) EPMOE_CUDA_CHECK(cudaMemset(data_.get(), byte, nbytes()));
}

void ensure_rows(DeviceTensor& t, DType dt, const Shape& s) {
  bool fits = t.view().data && t.dtype() == dt && t.shape().rank == s.rank && t.shape()[0] >= s[0];
  for (int i = 1; fits && i < s.rank; ++i) fits = t.shape()[i] == s[i];
  if (fits) return;
  Shape grown = s;
  grown.dims[0] = s[0] + s[0] / 4;
  t = DeviceTensor(dt, grown);
}

}  // namespace epmoe::cuda
