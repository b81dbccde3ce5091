// The expected tensors of a golden layer file (../shared/golden/*): the input tokens, the layer's
// output and the routing, each checked like a weight (name, dtype, shape, values) before use.
#pragma once

#include "epmoe/core/config.h"
#include "epmoe/core/tensor.h"

namespace epmoe {

class SafetensorsFile;

struct GoldenTensors {
  Tensor input;         // [T, H] bf16, or f32 when the file stores f32
  Tensor output;        // [T, H] f32
  Tensor topk_ids;      // [T, top_k] int32, each in [0, n_routed_experts)
  Tensor topk_weights;  // [T, top_k] f32, finite
};

// Reads `input`, `output`, `topk_ids` (I32 or I64) and `topk_weights` of `file` for the layer
// `config` (the routed top_k, whatever the fusion setting). Throws Error(kMissingTensor) or
// Error(kBadFile) naming the file, the tensor and what is wrong (dtype, shape, an id out of range
// or beyond int32, a non-finite value).
GoldenTensors read_golden_tensors(const SafetensorsFile& file, const MoeConfig& config);

}  // namespace epmoe
