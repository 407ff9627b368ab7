// The Python bindings of infera's CPU kernels: one module built from every source in this folder.
#include <torch/extension.h>

#include "decoder_layer.h"
#include "ops.h"

namespace {

// The instruction sets this build's vector paths were compiled for (infera/kernels picks the build).
std::string compiled_isa() {
  std::string isa = "scalar";
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
  isa = "AVX2+FMA+F16C";
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  isa = "AVX-512";
#endif
#if defined(__AVX512VNNI__)
  isa += " VNNI";
#endif
#if defined(__AVX512BF16__)
  isa += " BF16";
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  isa += " AMX";
#endif
  return isa;
}

}  // namespace

// One module is built per ISA level and several can load into one process (the tests run each level):
// every class is module-local, so each module registers its own.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace infera;
  m.doc() = "infera's CPU kernels";
  m.attr("ISA") = compiled_isa();
  py::class_<BlockLayout>(m, "Layout", py::module_local())
      .def(py::init<int64_t, int64_t, int64_t, int64_t, bool, int64_t, int64_t>(), py::arg("encoding"),
           py::arg("in_features"), py::arg("scale_group"), py::arg("num_scale_arrays"), py::arg("has_min"),
           py::arg("offset"), py::arg("sub_scales") = int64_t(SUB_NONE))
      .def_readonly("row_bytes", &BlockLayout::row_bytes);
  m.def("gemm", &gemm, "x @ W^T for a packed block-quantized W", py::arg("x"), py::arg("w"), py::arg("layout"),
        py::arg("out_features"), py::arg("bias") = py::none(), py::arg("threshold") = 0.0,
        py::arg("indptr") = py::none(), py::arg("indices") = py::none(), py::arg("values") = py::none(),
        py::arg("ic_scale") = py::none(), py::arg("ic_min") = py::none(), py::arg("ic_group") = 0);
  m.def("amx_available", &amx_available, "whether batches of AMX_MIN_ROWS rows or more take AMX tiles");
  m.attr("AMX_MIN_ROWS") = AMX_MIN_ROWS;
  m.def("dequantize", &dequantize, "rows of a packed weight in float", py::arg("w"), py::arg("layout"),
        py::arg("out_features"), py::arg("ids") = py::none(), py::arg("dtype") = at::kFloat);
  m.def("float_linear", &float_linear, "x @ W^T (+ bias) for float W (bfloat16 decode rows: weight-streaming dots)",
        py::arg("x"), py::arg("w"), py::arg("bias") = py::none());
  m.def("apply_token_bitmask", &apply_token_bitmask, "mask disallowed tokens' logits to -inf, in place");
  m.def("top_tokens", &top_tokens, "each row's argmax and (with_probs) its softmax probability",
        py::arg("logits"), py::arg("with_probs"));
  m.def("rms_norm", &rms_norm, "RMSNorm over rows");
  m.def("fused_add_rms_norm", &fused_add_rms_norm, "residual += x; x = rms_norm(residual), in place");
  m.def("rotary", &rotary, "rotate-half RoPE on q and k, in place");
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up");
  m.def("paged_attention", &paged_attention, "paged attention over short causal queries (window > 0: each "
        "query sees its last `window` positions)", py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("k_scale"), py::arg("v_scale"), py::arg("block_tables"), py::arg("query_starts"),
        py::arg("context_lens"), py::arg("scale"), py::arg("window") = 0);
  m.def("kivi_paged_attention", &kivi_paged_attention, "paged attention over a 2-bit (kivi2) cache: each query "
        "reads exact staged rows in block 0 and its residual zone", py::arg("q"), py::arg("k_codes"),
        py::arg("v_codes"), py::arg("k_params"), py::arg("v_params"), py::arg("staging"), py::arg("block_tables"),
        py::arg("query_starts"), py::arg("context_lens"), py::arg("stage_slots"), py::arg("scale"),
        py::arg("residual"), py::arg("window") = 0);
  m.def("kivi_store_kv", &kivi_store_kv, "write K/V rows into a 2-bit (kivi2) cache: values quantized, staged "
        "blocks' rows kept exact, full blocks' keys quantized", py::arg("k_codes"), py::arg("v_codes"), py::arg("k_params"),
        py::arg("v_params"), py::arg("staging"), py::arg("k"), py::arg("v"), py::arg("slot_mapping"),
        py::arg("stage_mapping"));
  m.def("store_kv", &store_kv, "write K/V rows into paged cache slots (int8 caches: quantized)", py::arg("k_cache"),
        py::arg("v_cache"), py::arg("k"), py::arg("v"), py::arg("slot_mapping"), py::arg("k_scale") = py::none(),
        py::arg("v_scale") = py::none());

  using OptTensor = c10::optional<at::Tensor>;
  py::class_<Linear>(m, "Linear", py::module_local())
      .def(py::init([](at::Tensor weight, OptTensor bias, std::optional<BlockLayout> layout, int64_t out_features,
                       double threshold, OptTensor indptr, OptTensor indices, OptTensor values, OptTensor ic_scale,
                       OptTensor ic_min, int64_t ic_group) {
             return Linear{weight, bias, layout, out_features, threshold, indptr, indices, values, ic_scale, ic_min,
                           ic_group};
           }),
           py::arg("weight"), py::arg("bias") = py::none(), py::arg("layout") = py::none(),
           py::arg("out_features") = 0, py::arg("threshold") = 0.0, py::arg("indptr") = py::none(),
           py::arg("indices") = py::none(), py::arg("values") = py::none(), py::arg("ic_scale") = py::none(),
           py::arg("ic_min") = py::none(), py::arg("ic_group") = 0);
  py::class_<MoE>(m, "MoE", py::module_local())
      .def(py::init([](at::Tensor router, std::vector<Linear> gate_up, std::vector<Linear> down, int64_t top_k,
                       bool normalize, std::optional<Linear> shared_gate_up, std::optional<Linear> shared_down,
                       OptTensor shared_gate) {
             TORCH_CHECK(gate_up.size() == down.size() && static_cast<int64_t>(gate_up.size()) == router.size(0),
                         "one gate_up and one down Linear per expert");
             return MoE{router, std::move(gate_up), std::move(down), top_k, normalize, shared_gate_up, shared_down,
                        shared_gate};
           }),
           py::arg("router"), py::arg("gate_up"), py::arg("down"), py::arg("top_k"), py::arg("normalize"),
           py::arg("shared_gate_up") = py::none(), py::arg("shared_down") = py::none(),
           py::arg("shared_gate") = py::none());
  py::class_<DecoderLayer>(m, "DecoderLayer", py::module_local())
      .def(py::init([](at::Tensor input_norm, at::Tensor post_norm, OptTensor q_norm, OptTensor k_norm, Linear qkv,
                       Linear o, std::optional<Linear> gate_up, std::optional<Linear> down, int64_t num_heads,
                       int64_t num_kv_heads, int64_t head_dim, double scale, at::Tensor k_cache, at::Tensor v_cache,
                       OptTensor k_scale, OptTensor v_scale, std::optional<MoE> moe) {
             TORCH_CHECK(moe.has_value() != (gate_up.has_value() && down.has_value()),
                         "a layer has a dense MLP (gate_up and down) or a mixture of experts");
             return DecoderLayer{input_norm, post_norm, q_norm, k_norm, qkv, o, gate_up, down, moe, num_heads,
                                 num_kv_heads, head_dim, scale, k_cache, v_cache, k_scale, v_scale};
           }),
           py::arg("input_norm"), py::arg("post_norm"), py::arg("q_norm"), py::arg("k_norm"), py::arg("qkv"),
           py::arg("o"), py::arg("gate_up"), py::arg("down"), py::arg("num_heads"), py::arg("num_kv_heads"),
           py::arg("head_dim"), py::arg("scale"), py::arg("k_cache"), py::arg("v_cache"), py::arg("k_scale"),
           py::arg("v_scale"), py::arg("moe") = py::none());
  py::class_<DecoderStack>(m, "DecoderStack", py::module_local())
      .def(py::init([](std::vector<DecoderLayer> layers, at::Tensor cos, at::Tensor sin, double eps) {
             return DecoderStack{std::move(layers), cos, sin, eps};
           }),
           py::arg("layers"), py::arg("cos"), py::arg("sin"), py::arg("eps"))
      .def("forward", &DecoderStack::forward, py::arg("hidden"), py::arg("positions"), py::arg("slot_mapping"),
           py::arg("block_tables"), py::arg("context_lens"), py::arg("query_start") = py::none());
}
