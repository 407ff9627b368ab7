// Stores into the 2-bit KV cache (kivi2, infera/layers/kivi.py: store_kv, to the bit): values
// quantized per token in groups of channels, keys quantized per channel over a block's tokens once
// it is full; the rows of blocks with a staging slot also kept exact (16-bit). Codes are planar:
// byte j of a row holds channel j + i * D / 4 in bits 2i, 2i + 1; each group has a bfloat16 scale
// and minimum.
#include <ATen/Parallel.h>

#include "ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

// A group of n values, stride apart (kivi.quantize): its minimum and (max - min) / 3 rounded to
// bfloat16, stored at low and scale and returned as floats (minimum, scale).
template <typename T>
std::pair<float, float> group_params(const T* x, int64_t n, int64_t stride, c10::BFloat16* scale,
                                     c10::BFloat16* low) {
  float lo = std::numeric_limits<float>::infinity(), hi = -lo;
  for (int64_t i = 0; i < n; ++i) {
    const float v = static_cast<float>(x[i * stride]);
    lo = std::min(lo, v), hi = std::max(hi, v);
  }
  *low = c10::BFloat16(lo);
  *scale = c10::BFloat16(std::max((hi - static_cast<float>(*low)) / 3.f, 1e-8f));
  return {static_cast<float>(*low), static_cast<float>(*scale)};
}

// x's 2-bit code, rounded to nearest even and clamped to 0..3, at bits 2 (d / Q) of channel d's byte
inline uint8_t code_bits(float x, std::pair<float, float> params, int64_t d, int64_t Q) {
  const float c = std::clamp(std::nearbyint((x - params.first) / params.second), 0.f, 3.f);
  return static_cast<uint8_t>(static_cast<int>(c) << (2 * (d / Q)));
}

}  // namespace

namespace infera {

// k, v: [T, Hkv, D] (each token's row contiguous); slot_mapping [T] (-1: skip); stage_mapping [T]:
// the staging row of each token (slot * block_size + offset; -1: its block has no staging slot);
// staging [slots, 2 (K, V), block_size, Hkv, D] of a 16-bit float (float16 under float32 k, else
// k's dtype). A token whose slot is its block's last completes the block: its keys are quantized
// from the staged keys, or from the block's tokens among k (rounded as staged) where it has none.
void kivi_store_kv(at::Tensor k_codes, at::Tensor v_codes, at::Tensor k_params, at::Tensor v_params,
                   at::Tensor staging, at::Tensor k, at::Tensor v, at::Tensor slot_mapping, at::Tensor stage_mapping) {
  TORCH_CHECK(k.dim() == 3 && k.sizes() == v.sizes() && k.scalar_type() == v.scalar_type() &&
              (k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16),
              "k and v must be [T, Hkv, D] of float32 or bfloat16");
  TORCH_CHECK(staging.scalar_type() == (k.scalar_type() == at::kFloat ? at::kHalf : at::kBFloat16),
              "staging must be float16 under float32 rows, bfloat16 under bfloat16 rows");
  for (const auto& t : {k, v})
    TORCH_CHECK((t.size(2) == 1 || t.stride(2) == 1) && (t.size(1) == 1 || t.stride(1) == t.size(2)),
                "each token's K/V row must be contiguous");
  const int64_t T = k.size(0), Hkv = k.size(1), D = k.size(2), Q = D / 4, g = kivi_group(D), groups = D / g;
  const int64_t bs = k_codes.size(1), num_blocks = k_codes.size(0);
  TORCH_CHECK(D % 4 == 0 && D % g == 0 && k_codes.scalar_type() == at::kByte && v_codes.sizes() == k_codes.sizes() &&
              k_codes.sizes() == at::IntArrayRef({num_blocks, bs, Hkv, Q}), "bad 2-bit codes");
  TORCH_CHECK(k_params.sizes() == at::IntArrayRef({num_blocks, Hkv, 2, D}) &&
              v_params.sizes() == at::IntArrayRef({num_blocks, bs, Hkv, 2, groups}) &&
              k_params.scalar_type() == at::kBFloat16 && v_params.scalar_type() == at::kBFloat16,
              "bad 2-bit cache parameters");
  TORCH_CHECK(staging.dim() == 5 && staging.size(1) == 2 && staging.size(2) == bs && staging.size(3) == Hkv &&
              staging.size(4) == D, "staging must be [slots, 2, block_size, Hkv, D]");
  for (const auto& t : {k_codes, v_codes, k_params, v_params, staging})
    TORCH_CHECK(t.is_contiguous(), "the 2-bit cache's arrays must be contiguous");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && stage_mapping.scalar_type() == at::kLong &&
              slot_mapping.numel() == T && stage_mapping.numel() == T, "slot and stage mappings must be int64 [T]");
  const at::Tensor sm = slot_mapping.contiguous(), st = stage_mapping.contiguous();
  const int64_t *slots = sm.data_ptr<int64_t>(), *stage = st.data_ptr<int64_t>();
  for (int64_t i = 0; i < T; ++i) {
    TORCH_CHECK(slots[i] < num_blocks * bs && stage[i] < staging.size(0) * bs, "slot ", slots[i], " or staging row ",
                stage[i], " is out of the cache");
    TORCH_CHECK(slots[i] < 0 || slots[i] % bs != bs - 1 || stage[i] >= 0 ||
                (i >= bs - 1 && slots[i - bs + 1] == slots[i] - bs + 1),
                "a block without a staging slot is completed by its own tokens only");
  }
  uint8_t *kc = k_codes.data_ptr<uint8_t>(), *vc = v_codes.data_ptr<uint8_t>();
  auto *kp = k_params.data_ptr<c10::BFloat16>(), *vp = v_params.data_ptr<c10::BFloat16>();
  AT_DISPATCH_FLOATING_TYPES_AND(at::ScalarType::BFloat16, k.scalar_type(), "kivi_store_kv", [&] {
    using stage_t = std::conditional_t<std::is_same_v<scalar_t, float>, c10::Half, c10::BFloat16>;
    const scalar_t *kx = k.data_ptr<scalar_t>(), *vx = v.data_ptr<scalar_t>();
    stage_t* rows = staging.data_ptr<stage_t>();
    const int64_t ks = k.stride(0), vs = v.stride(0), row = Hkv * D;
    auto key_row = [&](int64_t r) { return rows + (r / bs * 2 * bs + r % bs) * row; };  // staging row r's key
    at::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {  // values, and the keys into staging
      for (int64_t i = b; i < e; ++i) {
        if (slots[i] < 0) continue;
        uint8_t* codes = vc + slots[i] * Hkv * Q;
        std::memset(codes, 0, Hkv * Q);
        for (int64_t h = 0; h < Hkv; ++h) {
          const scalar_t* x = vx + i * vs + h * D;
          c10::BFloat16* params = vp + (slots[i] * Hkv + h) * 2 * groups;
          for (int64_t j = 0; j < groups; ++j) {
            const auto p = group_params(x + j * g, g, 1, params + j, params + groups + j);
            for (int64_t d = j * g; d < (j + 1) * g; ++d)
              codes[h * Q + d % Q] |= code_bits(static_cast<float>(x[d]), p, d, Q);
          }
        }
        if (stage[i] >= 0) {
          stage_t *kd = key_row(stage[i]), *vd = kd + bs * row;
          for (int64_t c = 0; c < row; ++c) kd[c] = static_cast<stage_t>(kx[i * ks + c]), vd[c] = static_cast<stage_t>(vx[i * vs + c]);
        }
      }
    });
    std::vector<int64_t> ends;  // tokens that complete their block
    for (int64_t i = 0; i < T; ++i)
      if (slots[i] >= 0 && slots[i] % bs == bs - 1) ends.push_back(i);
    at::parallel_for(0, static_cast<int64_t>(ends.size()) * Hkv, 1, [&](int64_t b, int64_t e) {
      std::vector<stage_t> fresh(bs * D);  // a block's keys from k, rounded as staged
      for (int64_t item = b; item < e; ++item) {
        const int64_t i = ends[item / Hkv], h = item % Hkv, block = slots[i] / bs;
        const stage_t* x = stage[i] >= 0 ? key_row(stage[i] - bs + 1) + h * D : fresh.data();
        const int64_t stride = stage[i] >= 0 ? row : D;
        if (stage[i] < 0)
          for (int64_t t = 0; t < bs; ++t)
            for (int64_t d = 0; d < D; ++d) fresh[t * D + d] = static_cast<stage_t>(kx[(i - bs + 1 + t) * ks + h * D + d]);
        uint8_t* codes = kc + (block * bs * Hkv + h) * Q;  // row t at codes + t * Hkv * Q
        for (int64_t t = 0; t < bs; ++t) std::memset(codes + t * Hkv * Q, 0, Q);
        c10::BFloat16* params = kp + (block * Hkv + h) * 2 * D;
        for (int64_t d = 0; d < D; ++d) {
          const auto p = group_params(x + d, bs, stride, params + d, params + D + d);
          for (int64_t t = 0; t < bs; ++t)
            codes[t * Hkv * Q + d % Q] |= code_bits(static_cast<float>(x[t * stride + d]), p, d, Q);
        }
      }
    });
  });
}

}  // namespace infera
