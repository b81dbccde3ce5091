#include "epmoe/core/tensor.h"

#include <cstdlib>
#include <cstring>

#include "epmoe/core/checked.h"

namespace epmoe {

Shape::Shape(std::initializer_list<int64_t> d) {
  EPMOE_CHECK(d.size() <= kMaxDims, kInvalidArgument, "tensor rank {} exceeds {}", d.size(),
              kMaxDims);
  for (int64_t v : d) dims[rank++] = v;
}

Shape::Shape(const std::vector<int64_t>& d) {
  EPMOE_CHECK(d.size() <= kMaxDims, kInvalidArgument, "tensor rank {} exceeds {}", d.size(),
              kMaxDims);
  for (int64_t v : d) dims[rank++] = v;
}

int64_t Shape::numel() const {
  int64_t n = 1;
  for (int i = 0; i < rank; ++i) {
    if (__builtin_mul_overflow(n, dims[i], &n) || dims[i] < 0)
      EPMOE_FAIL(kInvalidArgument, "the element count of shape {} {}", str(),
                 dims[i] < 0 ? "has a negative dimension" : "overflows int64");
  }
  return n;
}

bool Shape::operator==(const Shape& o) const {
  if (rank != o.rank) return false;
  for (int i = 0; i < rank; ++i)
    if (dims[i] != o.dims[i]) return false;
  return true;
}

std::string Shape::str() const {
  std::string s = "[";
  for (int i = 0; i < rank; ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

size_t TensorView::nbytes() const {
  return checked_mul(size_t(numel()), dtype_size(dtype), "tensor byte size");
}

void TensorView::expect(const char* what, DType dt, const Shape& s) const {
  EPMOE_CHECK(dtype == dt, kInvalidArgument, "{} must be {}, got {}", what, dtype_name(dt),
              dtype_name(dtype));
  EPMOE_CHECK(shape == s, kInvalidArgument, "{} must have shape {}, got {}", what, s.str(),
              shape.str());
  EPMOE_CHECK(data != nullptr || numel() == 0, kInvalidArgument, "{} has no data", what);
}

void Tensor::Free::operator()(void* p) const { std::free(p); }

Tensor::Tensor(DType dtype, const Shape& shape) : shape_(shape), dtype_(dtype) {
  for (int i = 0; i < shape.rank; ++i)
    EPMOE_CHECK(shape[i] >= 0, kInvalidArgument, "negative dimension in shape {}", shape.str());
  const size_t bytes = nbytes();
  size_t alloc = checked_add(bytes, size_t(63), "tensor allocation size") / 64 * 64;
  if (alloc == 0) alloc = 64;
  void* p = std::aligned_alloc(64, alloc);
  EPMOE_CHECK(p != nullptr, kInvalidArgument, "cannot allocate {} bytes for tensor {}", bytes,
              shape.str());
  data_.reset(p);
}

Tensor Tensor::zeros(DType dtype, const Shape& shape) {
  Tensor t(dtype, shape);
  std::memset(t.data_.get(), 0, t.nbytes());
  return t;
}

namespace {
float load_as_f32(const void* p, DType dt, int64_t i) {
  switch (dt) {
    case DType::kF32:
      return static_cast<const float*>(p)[i];
    case DType::kBF16:
      return bf16_to_f32(static_cast<const bf16*>(p)[i]);
    case DType::kF16:
      return f16_to_f32(static_cast<const f16*>(p)[i]);
    case DType::kF8E4M3:
      return fp8e4m3_to_f32(static_cast<const fp8e4m3*>(p)[i]);
    case DType::kI32:
      return float(static_cast<const int32_t*>(p)[i]);
    case DType::kI64:
      return float(static_cast<const int64_t*>(p)[i]);
  }
  return 0.0f;
}
void store_from_f32(void* p, DType dt, int64_t i, float v) {
  switch (dt) {
    case DType::kF32:
      static_cast<float*>(p)[i] = v;
      break;
    case DType::kBF16:
      static_cast<bf16*>(p)[i] = f32_to_bf16(v);
      break;
    case DType::kF16:
      static_cast<f16*>(p)[i] = f32_to_f16(v);
      break;
    case DType::kF8E4M3:
      static_cast<fp8e4m3*>(p)[i] = f32_to_fp8e4m3(v);
      break;
    default:
      EPMOE_FAIL(kInvalidArgument, "cannot convert floats to {}", dtype_name(dt));
  }
}
}  // namespace

Tensor to_f32(const TensorView& t) { return to_dtype(t, DType::kF32); }

Tensor to_dtype(const TensorView& t, DType dtype) {
  EPMOE_CHECK(t.device == Device::kCpu, kInvalidArgument, "to_dtype needs a host tensor");
  Tensor out(dtype, t.shape);
  if (dtype == t.dtype) {
    // An empty view may hold no pointer at all: memcpy's arguments must not be null.
    if (t.nbytes() > 0) std::memcpy(out.view().data, t.data, t.nbytes());
    return out;
  }
  const int64_t n = t.numel();
  for (int64_t i = 0; i < n; ++i)
    store_from_f32(out.view().data, dtype, i, load_as_f32(t.data, t.dtype, i));
  return out;
}

}  // namespace epmoe
