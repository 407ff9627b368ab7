// A Llama-family decoder stack (dense or mixture-of-experts MLPs) run for a decode step in one call:
// the same kernels the PyTorch modules call one by one (so the same results, bit for bit), chained
// here without returning to Python between them. On a small model a decode step is ~10 kernel calls
// per layer of a few microseconds each: the Python between them cost as much as the kernels.
#include "decoder_layer.h"

#include <algorithm>
#include <utility>

namespace infera {

at::Tensor Linear::operator()(const at::Tensor& x) const {
  if (!layout) return float_linear(x, weight, bias);
  return gemm(x, weight, *layout, out_features, bias, threshold, indptr, indices, values, ic_scale, ic_min, ic_group);
}

at::Tensor MoE::operator()(const at::Tensor& x) const {
  const int64_t T = x.size(0), E = static_cast<int64_t>(gate_up.size());
  auto expert = [&](int64_t e, const at::Tensor& rows) { return down[e](silu_and_mul(gate_up[e](rows))); };
  auto [weights, ids] = at::topk(float_linear(x, router, c10::nullopt).to(at::kFloat).softmax(-1), top_k, -1);
  if (normalize) weights = weights / weights.sum(-1, true);
  weights = weights.to(x.scalar_type());
  at::Tensor out = at::zeros_like(x);
  if (T == 1) {  // one token: its experts in ascending order, no sort or gathering (measured: ~15% of a step)
    std::vector<std::pair<int64_t, int64_t>> chosen;  // (expert, slot)
    const int64_t* id = ids.data_ptr<int64_t>();
    for (int64_t j = 0; j < top_k; ++j) chosen.emplace_back(id[j], j);
    std::sort(chosen.begin(), chosen.end());
    for (const auto& [e, j] : chosen) out += expert(e, x) * weights[0][j];
  } else {  // tokens grouped by expert with one sort
    const at::Tensor flat = ids.flatten();
    const at::Tensor order = at::argsort(flat, /*stable=*/true, 0, false);
    const at::Tensor tokens = at::div(order, top_k, "floor");
    const at::Tensor token_weights = weights.flatten().index_select(0, order);
    const at::Tensor counts = at::bincount(flat, {}, E);
    const int64_t* count = counts.data_ptr<int64_t>();
    for (int64_t e = 0, start = 0; e < E; start += count[e], ++e) {
      if (count[e] == 0) continue;
      const at::Tensor rows = tokens.narrow(0, start, count[e]);
      out.index_add_(0, rows, expert(e, x.index({rows})) * token_weights.narrow(0, start, count[e]).unsqueeze(1));
    }
  }
  if (shared_gate_up) {
    const at::Tensor shared = (*shared_down)(silu_and_mul((*shared_gate_up)(x)));
    out += at::sigmoid(float_linear(x, *shared_gate, c10::nullopt)) * shared;
  }
  return out;
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
    hidden = layer.moe ? (*layer.moe)(hidden) : (*layer.down)(silu_and_mul((*layer.gate_up)(hidden)));
  }
  return {hidden, residual};
}

}  // namespace infera
