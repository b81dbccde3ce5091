#include "epmoe/weights/golden.h"

#include <cmath>
#include <cstring>

#include "epmoe/weights/safetensors.h"

namespace epmoe {

namespace {

// Checks that `name` exists with `rank` dims matching `dims` (-1: any) and a dtype of `allowed`.
TensorView expect_tensor(const SafetensorsFile& file, const char* name,
                         std::initializer_list<DType> allowed, const Shape& expected,
                         const char* dtype_words) {
  const TensorView t = file.tensor(name);  // Error(kMissingTensor) naming file and tensor
  bool dtype_ok = false;
  for (DType d : allowed) dtype_ok |= t.dtype == d;
  EPMOE_CHECK(dtype_ok, kBadFile, "'{}': tensor '{}' holds {}, expected {}", file.path(), name,
              dtype_name(t.dtype), dtype_words);
  bool shape_ok = t.shape.rank == expected.rank;
  for (int i = 0; shape_ok && i < expected.rank; ++i)
    shape_ok = expected[i] < 0 || expected[i] == t.shape[i];
  std::string want = "[";
  for (int i = 0; i < expected.rank; ++i)
    want += (i ? ", " : "") + (expected[i] < 0 ? std::string("T") : std::to_string(expected[i]));
  EPMOE_CHECK(shape_ok, kBadFile, "'{}': tensor '{}' has shape {}, expected {}]", file.path(), name,
              t.shape.str(), want);
  return t;
}

void check_finite(const Tensor& t, const SafetensorsFile& file, const char* name) {
  const float* p = t.as<float>();
  const int64_t n = t.numel();
  const int64_t w = t.shape().rank == 2 ? t.shape()[1] : 1;
  for (int64_t i = 0; i < n; ++i)
    EPMOE_CHECK(std::isfinite(p[i]), kNumeric, "'{}': tensor '{}' holds {} at [{}, {}]",
                file.path(), name, p[i], i / w, i % w);
}

}  // namespace

GoldenTensors read_golden_tensors(const SafetensorsFile& file, const MoeConfig& config) {
  const int64_t H = config.hidden, K = config.top_k, E = config.n_routed_experts;
  const TensorView in = expect_tensor(file, "input", {DType::kBF16, DType::kF16, DType::kF32},
                                      Shape{-1, H}, "a float dtype (BF16, F16, F32)");
  const int64_t T = in.shape[0];
  const TensorView out = expect_tensor(file, "output", {DType::kBF16, DType::kF16, DType::kF32},
                                       Shape{T, H}, "a float dtype (BF16, F16, F32)");
  const TensorView ids = expect_tensor(file, "topk_ids", {DType::kI32, DType::kI64}, Shape{T, K},
                                       "an integer dtype (I32, I64)");
  const TensorView w = expect_tensor(file, "topk_weights", {DType::kBF16, DType::kF16, DType::kF32},
                                     Shape{T, K}, "a float dtype (BF16, F16, F32)");
  GoldenTensors g;
  g.input = to_dtype(in, in.dtype == DType::kF32 ? DType::kF32 : DType::kBF16);
  g.output = to_f32(out);
  check_finite(g.output, file, "output");
  g.topk_weights = to_f32(w);
  check_finite(g.topk_weights, file, "topk_weights");
  // Ids: loaded with memcpy (the mapping may leave them unaligned), range-checked one by one.
  g.topk_ids = Tensor(DType::kI32, {T, K});
  int32_t* dst = g.topk_ids.as<int32_t>();
  const uint8_t* src = static_cast<const uint8_t*>(ids.data);
  for (int64_t i = 0; i < T * K; ++i) {
    int64_t v = 0;
    if (ids.dtype == DType::kI64) {
      std::memcpy(&v, src + size_t(i) * 8, 8);
    } else {
      int32_t v32 = 0;
      std::memcpy(&v32, src + size_t(i) * 4, 4);
      v = v32;
    }
    EPMOE_CHECK(
        v >= 0 && v < E, kBadFile,
        "'{}': tensor 'topk_ids' holds {} at [{}, {}], outside the {} routed experts [0, {})",
        file.path(), v, i / K, i % K, E, E);
    dst[i] = int32_t(v);
  }
  return g;
}

}  // namespace epmoe
