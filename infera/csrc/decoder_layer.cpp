// A Llama-family decoder stack run for a decode step in one call: the same kernels the PyTorch
// modules call one by one (so the same results, bit for bit), chained here without returning to
// Python between them. On a small model a decode step is ~10 kernel calls per layer of a few
// microseconds each: the Python between them cost as much as the kernels.
#include "decoder_layer.h"

namespace infera {

at::Tensor Linear::operator()(const at::Tensor& x) const {
  if (!layout) return float_linear(x, weight, bias);
  return gemm(x, weight, *layout, out_features, bias, threshold, indptr, indices, values, ic_scale, ic_min, ic_group);
}

std::tuple<at::Tensor, at::Tensor> DecoderStack::forward(at::Tensor hidden, const at::Tensor& positions,
                                                         const at::Tensor& slot_mapping,
                                                         const at::Tensor& block_tables,
                                                         const at::Tensor& context_lens,
                                                         const c10::optional<at::Tensor>& query_start) const {
  TORCH_CHECK(hidden.dim() == 2 && hidden.is_contiguous(), "hidden must be contiguous [tokens, hidden]");
  const int64_t T = hidden.size(0);
  at::Tensor residual;
  for (const DecoderLayer& layer : layers) {
    if (residual.defined()) {
      fused_add_rms_norm(hidden, residual, layer.input_norm, eps);
    } else {
      residual = hidden;
      hidden = rms_norm(hidden, layer.input_norm, eps);
    }
    const int64_t H = layer.num_heads, Hkv = layer.num_kv_heads, D = layer.head_dim;
    const at::Tensor qkv = layer.qkv(hidden);
    at::Tensor q = qkv.narrow(1, 0, H * D).view({T, H, D});
    at::Tensor k = qkv.narrow(1, H * D, Hkv * D).view({T, Hkv, D});
    const at::Tensor v = qkv.narrow(1, (H + Hkv) * D, Hkv * D).view({T, Hkv, D});
    if (layer.q_norm) {
      q = rms_norm(q.reshape({T * H, D}), *layer.q_norm, eps).view({T, H, D});
      k = rms_norm(k.reshape({T * Hkv, D}), *layer.k_norm, eps).view({T, Hkv, D});
    }
    rotary(q, k, cos, sin, positions);
    store_kv(layer.k_cache, layer.v_cache, k, v, slot_mapping, layer.k_scale, layer.v_scale);
    const at::Tensor attn = paged_attention(q, layer.k_cache, layer.v_cache, layer.k_scale, layer.v_scale,
                                            block_tables, query_start, context_lens, layer.scale);
    hidden = layer.o(attn.view({T, H * D}));
    fused_add_rms_norm(hidden, residual, layer.post_norm, eps);
    hidden = layer.down(silu_and_mul(layer.gate_up(hidden)));
  }
  return {hidden, residual};
}

}  // namespace infera
