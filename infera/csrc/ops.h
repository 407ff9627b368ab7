// The CPU kernels' entry points, shared by the sources of the one native module (module.cpp binds
// them for Python; decoder_layer.cpp chains them without returning to Python).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace infera {

// ---- quant_gemm.cpp: products with block-quantized weights ----

enum Encoding : int64_t { Q8 = 0, Q4 = 1, T2 = 2, Q5 = 3, Q6 = 4 };
// int8 sub-scales multiplying the fp16 scales: none, one per block of 32 for each scale array
// (GGUF Q4_K/Q5_K's 6-bit scale and min), or two of scale array 0 per block, for values 0-15 and
// 16-31 (Q6_K's scales of 16 values)
enum SubScales : int64_t { SUB_NONE = 0, SUB_BLOCK = 1, SUB_HALF = 2 };
constexpr int64_t TILE = 16;  // output rows per packed tile

// Quant bytes per row and block of 32: a byte each (Q8), nibbles (Q4, T2), nibbles and a plane of
// 1 (Q5) or 2 (Q6) high bits
constexpr int64_t block_quant_bytes(int64_t enc) { return enc == Q8 ? 32 : enc == Q5 ? 20 : enc == Q6 ? 24 : 16; }

// The (encoding, sub-scales) pairs of infera's formats: the vector kernels are instantiated for these
#define INFERA_BLOCK_KINDS(X) \
  X(Q8, SUB_NONE) X(Q4, SUB_NONE) X(T2, SUB_NONE) X(Q4, SUB_BLOCK) X(Q5, SUB_NONE) X(Q5, SUB_BLOCK) X(Q6, SUB_HALF)

// How a packed weight row reads (infera/quant/layout.py builds the packing).
struct BlockLayout {
  int64_t enc, K, sg, nsa, offset;
  bool has_min;
  int64_t sub;
  int64_t nb, nsb, nsub, bbytes, row_bytes, tile_quant_bytes, tile_scale_bytes, tile_bytes;

  BlockLayout(int64_t enc_, int64_t K_, int64_t sg_, int64_t nsa_, bool has_min_, int64_t offset_,
              int64_t sub_ = SUB_NONE)
      : enc(enc_), K(K_), sg(sg_), nsa(nsa_), offset(offset_), has_min(has_min_), sub(sub_) {
    TORCH_CHECK(enc >= Q8 && enc <= Q6, "unknown encoding ", enc);
    TORCH_CHECK(K > 0 && K % 32 == 0, "in_features must be a multiple of 32, got ", K);
    nb = K / 32;
    TORCH_CHECK(sg >= 1 && nb % sg == 0, "a scale group of ", sg, " blocks does not divide ", nb, " blocks");
    TORCH_CHECK(nsa >= 0 && nsa <= 2 && (!has_min || nsa == 2) && (enc != T2 || nsa == 2),
                "inconsistent scale arrays");
#define INFERA_KIND(ENC, SUB) || (enc == ENC && sub == SUB)
    TORCH_CHECK(false INFERA_BLOCK_KINDS(INFERA_KIND), "no kernel for encoding ", enc, " with sub-scales ", sub);
#undef INFERA_KIND
    TORCH_CHECK(sub == SUB_NONE || nsa > 0, "sub-scales multiply scales: none here");
    // (the integer sums of a group's sub-scales fit int32 for up to 8 blocks; SUB_BLOCK's offset
    // and SUB_HALF's min would need one more integer sum per group)
    TORCH_CHECK(sub == SUB_NONE || (sg % 2 == 0 && sg <= 8 && (sub == SUB_HALF ? !has_min : offset == 0)),
                "sub-scales take scale groups of 2, 4, 6 or 8 blocks, and no offset (SUB_BLOCK) or min (SUB_HALF)");
    nsb = nb / sg;
    nsub = sub == SUB_BLOCK ? nsa : sub == SUB_HALF ? 2 : 0;
    bbytes = block_quant_bytes(enc);
    row_bytes = nb * bbytes + nsa * nsb * 2 + nsub * nb;
    tile_quant_bytes = TILE * nb * bbytes;
    tile_scale_bytes = TILE * nsa * nsb * 2;
    tile_bytes = TILE * row_bytes;
  }
  // int8 quant sums per block the activations keep beside their quants (Activations::bsum)
  int64_t nsub_sums() const { return sub == SUB_BLOCK ? 1 : sub == SUB_HALF ? 2 : 0; }
  // scale `a` of block b for the 16 rows of a tile
  const at::Half* scales(const uint8_t* tile, int64_t a, int64_t b) const {
    return reinterpret_cast<const at::Half*>(tile + tile_quant_bytes) + (a * nsb + b / sg) * TILE;
  }
  // sub-scale j of block b for the 16 rows of a tile (after the scales: [j][block][16 rows])
  const int8_t* sub_scales(const uint8_t* tile, int64_t j, int64_t b) const {
    return reinterpret_cast<const int8_t*>(tile + tile_quant_bytes + tile_scale_bytes) + (j * nb + b) * TILE;
  }
};

at::Tensor gemm(const at::Tensor& x, const at::Tensor& w, const BlockLayout& L, int64_t N,
                const c10::optional<at::Tensor>& bias, double threshold, const c10::optional<at::Tensor>& indptr,
                const c10::optional<at::Tensor>& indices, const c10::optional<at::Tensor>& values,
                const c10::optional<at::Tensor>& ic_scale, const c10::optional<at::Tensor>& ic_min, int64_t ic_group);
at::Tensor dequantize(const at::Tensor& w, const BlockLayout& L, int64_t N, const c10::optional<at::Tensor>& ids,
                      at::ScalarType dtype);

// ---- quant_gemm_amx.cpp: the same products for batches, by AMX tiles in bfloat16 ----

// gemm hands batches of this many rows or more to gemm_amx where it runs (measured: from ~24 rows
// it beats the int8 path, 2x at 64, 2.5x at 512); per-IC groups and sparse terms stay on int8.
constexpr int64_t AMX_MIN_ROWS = 32;
bool amx_available();  // built with AMX, on a CPU and kernel that grant it
at::Tensor gemm_amx(const at::Tensor& x, const at::Tensor& w, const BlockLayout& L, int64_t N,
                    const c10::optional<at::Tensor>& bias);

// ---- float_gemm.cpp: products with float weights ----

// Up to this many rows, bfloat16 products stream the weights through AVX512-BF16 dot products
// (AVX2: widened to fp32 and FMAs); more rows, other dtypes or the scalar level take at::linear.
constexpr int64_t BF16_GEMV_MAX_ROWS = 8;
at::Tensor float_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias);

// ---- fused_ops.cpp: element-wise kernels of the decoder layer ----

at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps);
void fused_add_rms_norm(at::Tensor x, at::Tensor residual, at::Tensor weight, double eps);
void rotary(at::Tensor q, at::Tensor k, at::Tensor cos, at::Tensor sin, at::Tensor positions);
at::Tensor silu_and_mul(at::Tensor x);
void apply_token_bitmask(at::Tensor logits, at::Tensor bitmask, const std::vector<int64_t>& rows, int64_t vocab);
std::tuple<at::Tensor, at::Tensor> top_tokens(at::Tensor logits, bool with_probs);

// ---- paged_attention.cpp ----

at::Tensor paged_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, c10::optional<at::Tensor> k_scale,
                           c10::optional<at::Tensor> v_scale, at::Tensor block_tables,
                           c10::optional<at::Tensor> query_starts, at::Tensor context_lens, double scale,
                           int64_t window = 0);
void store_kv(at::Tensor k_cache, at::Tensor v_cache, at::Tensor k, at::Tensor v, at::Tensor slot_mapping,
              c10::optional<at::Tensor> k_scale, c10::optional<at::Tensor> v_scale);
at::Tensor kivi_paged_attention(at::Tensor q, at::Tensor k_codes, at::Tensor v_codes, at::Tensor k_params,
                                at::Tensor v_params, at::Tensor staging, at::Tensor block_tables,
                                c10::optional<at::Tensor> query_starts, at::Tensor context_lens, at::Tensor stage_slots,
                                double scale, int64_t residual, int64_t window = 0);

// ---- kivi_cache.cpp: the 2-bit KV cache (infera/layers/kivi.py) ----

// channels of a value group
constexpr int64_t kivi_group(int64_t head_dim) { return head_dim < 32 ? head_dim : 32; }
void kivi_store_kv(at::Tensor k_codes, at::Tensor v_codes, at::Tensor k_params, at::Tensor v_params,
                   at::Tensor staging, at::Tensor k, at::Tensor v, at::Tensor slot_mapping, at::Tensor stage_mapping);

}  // namespace infera
