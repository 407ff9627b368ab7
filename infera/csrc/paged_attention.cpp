// Paged attention for the CPU over short queries (decode steps, speculative verification,
// small prefill chunks): K/V are read in place from the block-paged cache, no gather copy.
// Work is split over (sequence, KV head); the G query heads that share a KV head and all the
// sequence's query positions are processed together, so each K/V row is read once. The cache
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

struct Layout {
  int64_t Hq, G, D, block_size, row_stride, scale_stride;
};

// One sequence and KV head: queries at positions [ctx - nq, ctx) over cache positions [0, ctx),
// causal. q and out point at the sequence's first query row, head h * G.
template <typename scalar_t, typename cache_t>
void attend(const scalar_t* q, const cache_t* k_cache, const cache_t* v_cache, const float* k_scale,
            const float* v_scale, const int64_t* table, int64_t nq, int64_t ctx, scalar_t* out, const Layout& L,
            float scale, std::vector<float>& qf, std::vector<float>& scores, std::vector<float>& acc) {
  const int64_t G = L.G, D = L.D, rows = nq * G, first = ctx - nq;
  qf.resize(rows * D);
  scores.assign(rows * ctx, 0.f);
  acc.assign(rows * D, 0.f);
  for (int64_t i = 0; i < nq; ++i)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t d = 0; d < D; ++d) qf[(i * G + g) * D + d] = static_cast<float>(q[i * L.Hq * D + g * D + d]) * scale;
  float kf[256], vf[256];
  for (int64_t t = 0; t < ctx; ++t) {
    load_row(k_cache, k_scale, table[t / L.block_size] * L.block_size + t % L.block_size, L.row_stride,
             L.scale_stride, D, kf);
    for (int64_t r = std::max<int64_t>(0, t - first) * G; r < rows; ++r) {  // queries that see position t
      const float* qr = qf.data() + r * D;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t d = 0; d < D; ++d) s += qr[d] * kf[d];
      scores[r * ctx + t] = s;
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t visible = first + r / G + 1;
    float* s = scores.data() + r * ctx;
    const float m = *std::max_element(s, s + visible);
    float sum = 0.f;
    for (int64_t t = 0; t < visible; ++t) sum += (s[t] = std::exp(s[t] - m));
    const float inv = 1.f / sum;
    for (int64_t t = 0; t < visible; ++t) s[t] *= inv;
  }
  for (int64_t t = 0; t < ctx; ++t) {
    load_row(v_cache, v_scale, table[t / L.block_size] * L.block_size + t % L.block_size, L.row_stride,
             L.scale_stride, D, vf);
    for (int64_t r = std::max<int64_t>(0, t - first) * G; r < rows; ++r) {
      const float p = scores[r * ctx + t];
      float* a = acc.data() + r * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) a[d] += p * vf[d];
    }
  }
  for (int64_t i = 0; i < nq; ++i)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t d = 0; d < D; ++d) out[i * L.Hq * D + g * D + d] = static_cast<scalar_t>(acc[(i * G + g) * D + d]);
}

}  // namespace

// q: [T, Hq, D], the queries of S sequences back to back (sequence s owns rows
// query_start[s] .. query_start[s + 1], the last positions of its context_lens[s] tokens);
// k_cache, v_cache: [num_blocks, block_size, Hkv, D] in q's dtype, or int8 with
// k_scale, v_scale: [num_blocks, block_size, Hkv] float32; block_tables: [S, max_blocks] int64.
// Returns [T, Hq, D].
torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                              c10::optional<torch::Tensor> k_scale, c10::optional<torch::Tensor> v_scale,
                              torch::Tensor block_tables, torch::Tensor query_start, torch::Tensor context_lens,
                              double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "KV cache must be contiguous");
  for (const auto& t : {block_tables, query_start, context_lens})
    TORCH_CHECK(t.scalar_type() == torch::kLong, "block tables, query starts and context lengths must be int64");
  const bool quantized = k_cache.scalar_type() == torch::kChar;
  TORCH_CHECK(quantized == (k_scale.has_value() && v_scale.has_value()), "an int8 cache needs its scales");
  TORCH_CHECK(quantized || q.scalar_type() == k_cache.scalar_type(), "query and cache dtypes differ");
  TORCH_CHECK(!quantized || (k_scale->is_contiguous() && v_scale->is_contiguous() &&
                             k_scale->scalar_type() == torch::kFloat), "scales must be contiguous float32");
  q = q.contiguous();
  block_tables = block_tables.contiguous();
  query_start = query_start.contiguous();
  context_lens = context_lens.contiguous();
  const int64_t S = context_lens.size(0), Hq = q.size(1), D = q.size(2), Hkv = k_cache.size(2);
  TORCH_CHECK(query_start.size(0) == S + 1 && block_tables.size(0) == S, "one query range and table per sequence");
  TORCH_CHECK(D <= 256 && Hq % Hkv == 0 && k_cache.size(3) == D, "unsupported head layout");
  const Layout L{Hq, Hq / Hkv, D, k_cache.size(1), Hkv * D, Hkv};
  const int64_t max_blocks = block_tables.size(1);
  const float* ks = quantized ? k_scale->data_ptr<float>() : nullptr;
  const float* vs = quantized ? v_scale->data_ptr<float>() : nullptr;
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* starts = query_start.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s)
    TORCH_CHECK(starts[s + 1] - starts[s] <= lens[s] && lens[s] <= max_blocks * L.block_size, "bad query range");
  auto out = torch::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND(at::ScalarType::BFloat16, q.scalar_type(), "paged_attention", [&] {
    auto run = [&](auto* kp, auto* vp) {
      const scalar_t* qp = q.data_ptr<scalar_t>();
      scalar_t* op = out.data_ptr<scalar_t>();
      at::parallel_for(0, S * Hkv, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> qf, scores, acc;
        for (int64_t item = begin; item < end; ++item) {
          const int64_t s = item / Hkv, h = item % Hkv, row = starts[s] * Hq + h * L.G;
          attend(qp + row * D, kp + h * D, vp + h * D, ks ? ks + h : nullptr, vs ? vs + h : nullptr,
                 tables + s * max_blocks, starts[s + 1] - starts[s], lens[s], op + row * D, L,
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
  m.def("paged_attention", &paged_attention, "paged attention over short causal queries (CPU)");
}
