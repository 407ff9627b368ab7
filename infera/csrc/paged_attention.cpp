// Paged decode attention for the CPU: one query token per sequence, K/V read in place from
// the block-paged cache (no gather copy). Work is split over (sequence, KV head); the G query
// heads that share a KV head are processed together so each K/V row is read once. The cache
// holds the query's dtype, or int8 with a float scale per token and head.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// Row `slot` of a cache as floats: cast, times its scale for an int8 cache.
template <typename cache_t>
inline void load_row(const cache_t* cache, const float* scales, int64_t slot, int64_t row_stride,
                     int64_t scale_stride, int64_t D, float* out) {
  const cache_t* row = cache + slot * row_stride;
  const float s = scales ? scales[slot * scale_stride] : 1.f;
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) out[d] = static_cast<float>(row[d]) * s;
}

template <typename scalar_t, typename cache_t>
void decode_one(const scalar_t* q, const cache_t* k_cache, const cache_t* v_cache, const float* k_scale,
                const float* v_scale, const int64_t* table, int64_t len, scalar_t* out, int64_t G, int64_t D,
                int64_t block_size, int64_t row_stride, int64_t scale_stride, float scale, std::vector<float>& qf,
                std::vector<float>& scores, std::vector<float>& acc) {
  qf.resize(G * D);
  scores.resize(G * len);
  acc.assign(G * D, 0.f);
  for (int64_t i = 0; i < G * D; ++i) qf[i] = static_cast<float>(q[i]) * scale;
  float kf[256], vf[256];
  for (int64_t t = 0; t < len; ++t) {
    load_row(k_cache, k_scale, table[t / block_size] * block_size + t % block_size, row_stride, scale_stride, D, kf);
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = qf.data() + g * D;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t d = 0; d < D; ++d) s += qg[d] * kf[d];
      scores[g * len + t] = s;
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* s = scores.data() + g * len;
    float m = *std::max_element(s, s + len);
    float sum = 0.f;
    for (int64_t t = 0; t < len; ++t) sum += (s[t] = std::exp(s[t] - m));
    float inv = 1.f / sum;
    for (int64_t t = 0; t < len; ++t) s[t] *= inv;
  }
  for (int64_t t = 0; t < len; ++t) {
    load_row(v_cache, v_scale, table[t / block_size] * block_size + t % block_size, row_stride, scale_stride, D, vf);
    for (int64_t g = 0; g < G; ++g) {
      const float p = scores[g * len + t];
      float* a = acc.data() + g * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) a[d] += p * vf[d];
    }
  }
  for (int64_t i = 0; i < G * D; ++i) out[i] = static_cast<scalar_t>(acc[i]);
}

}  // namespace

// q: [B, Hq, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D] in q's dtype, or int8 with
// k_scale, v_scale: [num_blocks, block_size, Hkv] float32; block_tables: [B, max_blocks] int64;
// context_lens: [B] int64. Returns [B, Hq, D].
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                               c10::optional<torch::Tensor> k_scale, c10::optional<torch::Tensor> v_scale,
                               torch::Tensor block_tables, torch::Tensor context_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "KV cache must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == torch::kLong && context_lens.scalar_type() == torch::kLong,
              "block tables and context lengths must be int64");
  const bool quantized = k_cache.scalar_type() == torch::kChar;
  TORCH_CHECK(quantized == (k_scale.has_value() && v_scale.has_value()), "an int8 cache needs its scales");
  TORCH_CHECK(quantized || q.scalar_type() == k_cache.scalar_type(), "query and cache dtypes differ");
  q = q.contiguous();
  block_tables = block_tables.contiguous();
  context_lens = context_lens.contiguous();
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t block_size = k_cache.size(1), Hkv = k_cache.size(2), max_blocks = block_tables.size(1);
  TORCH_CHECK(D <= 256 && Hq % Hkv == 0 && k_cache.size(3) == D, "unsupported head layout");
  const int64_t G = Hq / Hkv;
  TORCH_CHECK(!quantized || (k_scale->is_contiguous() && v_scale->is_contiguous() &&
                             k_scale->scalar_type() == torch::kFloat), "scales must be contiguous float32");
  const float* ks = quantized ? k_scale->data_ptr<float>() : nullptr;
  const float* vs = quantized ? v_scale->data_ptr<float>() : nullptr;
  auto out = torch::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND(at::ScalarType::BFloat16, q.scalar_type(), "decode_attention", [&] {
    auto run = [&](auto* kp, auto* vp) {
      const scalar_t* qp = q.data_ptr<scalar_t>();
      const int64_t* tables = block_tables.data_ptr<int64_t>();
      const int64_t* lens = context_lens.data_ptr<int64_t>();
      scalar_t* op = out.data_ptr<scalar_t>();
      at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> qf, scores, acc;
        for (int64_t item = begin; item < end; ++item) {
          const int64_t b = item / Hkv, h = item % Hkv;
          decode_one(qp + (b * Hq + h * G) * D, kp + h * D, vp + h * D, ks ? ks + h : nullptr, vs ? vs + h : nullptr,
                     tables + b * max_blocks, lens[b], op + (b * Hq + h * G) * D, G, D, block_size, Hkv * D, Hkv,
                     static_cast<float>(scale), qf, scores, acc);
        }
      });
    };
    if (quantized) {
      run(k_cache.data_ptr<int8_t>(), v_cache.data_ptr<int8_t>());
    } else {
      run(k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>());
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "paged decode attention (CPU)");
}
