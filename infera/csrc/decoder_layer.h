// The decoder stack of decoder_layer.cpp: weights and caches gathered once from the PyTorch
// modules (infera/models/llama_native.py), run per decode step without Python in between.
#pragma once

#include "ops.h"

#include <optional>
#include <tuple>
#include <vector>

namespace infera {

// y = x W^T (+ b): a packed block-quantized W when `layout` is set, else a float W.
struct Linear {
  at::Tensor weight;
  c10::optional<at::Tensor> bias;
  std::optional<BlockLayout> layout;
  int64_t out_features = 0;
  double threshold = 0.0;
  c10::optional<at::Tensor> indptr, indices, values, ic_scale, ic_min;
  int64_t ic_group = 0;

  at::Tensor operator()(const at::Tensor& x) const;
};

// A sparse mixture-of-experts MLP, computed as infera.layers.moe.SparseMoeBlock computes it.
struct MoE {
  at::Tensor router;                  // [experts, hidden]
  std::vector<Linear> gate_up, down;  // one of each per expert
  int64_t top_k;
  bool normalize;                     // renormalize the top-k probabilities (Mixtral, Qwen3-MoE)
  std::optional<Linear> shared_gate_up, shared_down;  // Qwen2-MoE's shared expert
  c10::optional<at::Tensor> shared_gate;              // [1, hidden]: its per-token sigmoid gate

  at::Tensor operator()(const at::Tensor& x) const;
};

struct DecoderLayer {
  at::Tensor input_norm, post_norm;
  c10::optional<at::Tensor> q_norm, k_norm;  // per-head RMSNorm of queries and keys (Qwen3)
  Linear qkv, o;
  std::optional<Linear> gate_up, down;  // the dense MLP, or
  std::optional<MoE> moe;               // a mixture of experts
  int64_t num_heads, num_kv_heads, head_dim;
  double scale;
  at::Tensor k_cache, v_cache;
  c10::optional<at::Tensor> k_scale, v_scale;  // an int8 cache's scales
};

struct DecoderStack {
  std::vector<DecoderLayer> layers;
  at::Tensor cos, sin;  // RoPE tables [max_position, head_dim / 2]
  double eps;

  // The layers over `hidden` [T, hidden] (embedded tokens; every token a short query over the
  // paged cache, as paged_attention takes them): (last layer's output, residual stream).
  std::tuple<at::Tensor, at::Tensor> forward(at::Tensor hidden, const at::Tensor& positions,
                                             const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                                             const at::Tensor& context_lens,
                                             const c10::optional<at::Tensor>& query_start) const;
};

}  // namespace infera
