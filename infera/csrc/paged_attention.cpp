// Paged attention for the CPU over short queries (decode steps, speculative verification,
// small prefill chunks): K/V are read in place from the block-paged cache, no gather copy.
// Work is split over (sequence, KV head); the G query heads that share a KV head and all the
// sequence's query positions are processed together, so each K/V row is read once. The cache
// holds the query's dtype, or int8 with a float scale per token and head.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include "vec512.h"
#endif

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

#if defined(__AVX512F__)
using namespace infera_vec;

// AVX-512 path for head sizes of 16 * NC: a K/V row is NC vectors of floats. Positions go in
// tiles of 16; a tile's K rows are widened to floats once, the dot products of each query row with
// them are reduced 16 at a time (sum16), and V is accumulated in registers, a few query rows at a
// time. An int8 row's scale multiplies its score (K) or its probability (V), not its elements.

// The sums of v[0], ..., v[15] as one vector: interleave-and-add at 32 bits, 64 bits, then 128-bit lanes.
inline __m512 sum16(const __m512* v) {
  __m512 a[8], b[4];
  for (int j = 0; j < 8; ++j)
    a[j] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * j], v[2 * j + 1]), _mm512_unpackhi_ps(v[2 * j], v[2 * j + 1]));
  for (int j = 0; j < 4; ++j) {
    const __m512d x = _mm512_castps_pd(a[2 * j]), y = _mm512_castps_pd(a[2 * j + 1]);
    b[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }  // b[j] holds, in lane l, the lane-l partial sums of v[4j], ..., v[4j + 3]
  const __m512 c = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], 0x88), _mm512_shuffle_f32x4(b[0], b[1], 0xDD));
  const __m512 d = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], 0x88), _mm512_shuffle_f32x4(b[2], b[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x88), _mm512_shuffle_f32x4(c, d, 0xDD));
}

// s[0, n) <- softmax(s[0, n)); s[n, width) <- 0.
inline void softmax_row(float* s, int64_t n, int64_t width) {
  __m512 m = _mm512_set1_ps(-INFINITY);
  for (int64_t t = 0; t < n; t += 16) m = _mm512_mask_max_ps(m, first_lanes(n - t), m, _mm512_loadu_ps(s + t));
  const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(m));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t t = 0; t < width; t += 16) {
    const __m512 e = _mm512_maskz_mov_ps(first_lanes(n - t), exp512(_mm512_sub_ps(_mm512_loadu_ps(s + t), mx)));
    _mm512_storeu_ps(s + t, e);
    sum = _mm512_add_ps(sum, e);
  }
  const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
  for (int64_t t = 0; t < n; t += 16) _mm512_storeu_ps(s + t, _mm512_mul_ps(_mm512_loadu_ps(s + t), inv));
}

template <int NC, typename scalar_t, typename cache_t>
void attend_avx512(const scalar_t* q, const cache_t* k_cache, const cache_t* v_cache, const float* k_scale,
                   const float* v_scale, const int64_t* table, int64_t nq, int64_t ctx, scalar_t* out,
                   const Layout& L, float scale, std::vector<float>& qf, std::vector<float>& scores,
                   std::vector<float>& tile) {
  constexpr int64_t D = 16 * NC, RB = 24 / NC;  // RB query rows' V accumulators fill 24 registers
  const int64_t G = L.G, rows = nq * G, first = ctx - nq, width = (ctx + 15) / 16 * 16;
  auto slot = [&](int64_t t) { return table[t / L.block_size] * L.block_size + t % L.block_size; };
  auto visible = [&](int64_t r) { return first + r / G + 1; };  // row r = query r / G, head r % G
  qf.resize(rows * D);
  scores.resize(rows * width);
  tile.resize(16 * D);  // one tile of K rows as floats
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < D; ++d) qf[r * D + d] = static_cast<float>(q[(r / G) * L.Hq * D + (r % G) * D + d]) * scale;
  for (int64_t t0 = 0; t0 < ctx; t0 += 16) {
    const int64_t n = std::min<int64_t>(16, ctx - t0);
    for (int64_t t = t0 + 16; t < std::min(t0 + 32, ctx); ++t) {  // the next tile's K and V rows, from DRAM
      const int64_t st = slot(t);
      for (int64_t b = 0; b < D * static_cast<int64_t>(sizeof(cache_t)); b += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(k_cache + st * L.row_stride) + b, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(v_cache + st * L.row_stride) + b, _MM_HINT_T1);
      }
    }
    __m512 ks = _mm512_set1_ps(1.f);
    for (int64_t i = 0; i < 16; ++i) {
      const cache_t* k = k_cache + (i < n ? slot(t0 + i) : 0) * L.row_stride;
      for (int c = 0; c < NC; ++c) _mm512_storeu_ps(tile.data() + i * D + 16 * c, i < n ? load16(k + 16 * c) : _mm512_setzero_ps());
    }
    if (k_scale) {
      alignas(64) float s[16] = {};
      for (int64_t i = 0; i < n; ++i) s[i] = k_scale[slot(t0 + i) * L.scale_stride];
      ks = _mm512_load_ps(s);
    }
    for (int64_t r = std::max<int64_t>(0, t0 - first) * G; r < rows; ++r) {  // the rows that see position t0
      __m512 dot[16];
      for (int i = 0; i < 16; ++i) {
        dot[i] = _mm512_mul_ps(_mm512_loadu_ps(qf.data() + r * D), _mm512_loadu_ps(tile.data() + i * D));
        for (int c = 1; c < NC; ++c)
          dot[i] = _mm512_fmadd_ps(_mm512_loadu_ps(qf.data() + r * D + 16 * c), _mm512_loadu_ps(tile.data() + i * D + 16 * c), dot[i]);
      }
      _mm512_storeu_ps(scores.data() + r * width + t0, _mm512_mul_ps(sum16(dot), ks));
    }
  }
  for (int64_t r = 0; r < rows; ++r) softmax_row(scores.data() + r * width, visible(r), width);
  for (int64_t r0 = 0; r0 < rows; r0 += RB) {
    const int64_t nr = std::min(RB, rows - r0);
    __m512 a[RB][NC];
    for (int j = 0; j < RB; ++j)
      for (int c = 0; c < NC; ++c) a[j][c] = _mm512_setzero_ps();
    for (int64_t t = 0; t < visible(r0 + nr - 1); ++t) {
      const int64_t st = slot(t);
      const cache_t* v = v_cache + st * L.row_stride;
      const float vs = v_scale ? v_scale[st * L.scale_stride] : 1.f;
      __m512 row[NC];
      for (int c = 0; c < NC; ++c) row[c] = load16(v + 16 * c);
      for (int j = 0; j < RB; ++j) {
        if (j >= nr) break;
        const __m512 p = _mm512_set1_ps(scores[(r0 + j) * width + t] * vs);
        for (int c = 0; c < NC; ++c) a[j][c] = _mm512_fmadd_ps(p, row[c], a[j][c]);
      }
    }
    for (int64_t j = 0; j < nr; ++j) {
      alignas(64) float o[D];
      for (int c = 0; c < NC; ++c) _mm512_store_ps(o + 16 * c, a[j][c]);
      const int64_t r = r0 + j;
      for (int64_t d = 0; d < D; ++d) out[(r / G) * L.Hq * D + (r % G) * D + d] = static_cast<scalar_t>(o[d]);
    }
  }
}
#endif

}  // namespace

// q: [T, Hq, D], the queries of S sequences back to back (sequence s owns rows
// query_start[s] .. query_start[s + 1], or row s alone without query_start: the last positions
// of its context_lens[s] tokens);
// k_cache, v_cache: [num_blocks, block_size, Hkv, D] in q's dtype, or int8 with
// k_scale, v_scale: [num_blocks, block_size, Hkv] float32; block_tables: [S, max_blocks] int64.
// Returns [T, Hq, D].
torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                              c10::optional<torch::Tensor> k_scale, c10::optional<torch::Tensor> v_scale,
                              torch::Tensor block_tables, c10::optional<torch::Tensor> query_starts,
                              torch::Tensor context_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "KV cache must be contiguous");
  // no query_starts: one query row per sequence (a decode step)
  torch::Tensor query_start = query_starts.has_value() ? *query_starts : torch::arange(context_lens.size(0) + 1);
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
      using cache_t = std::remove_pointer_t<decltype(kp)>;
      const scalar_t* qp = q.data_ptr<scalar_t>();
      scalar_t* op = out.data_ptr<scalar_t>();
      auto fn = &attend<scalar_t, cache_t>;
#if defined(__AVX512F__)
      if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>) {
        switch (D) {
          case 16: fn = &attend_avx512<1, scalar_t, cache_t>; break;
          case 32: fn = &attend_avx512<2, scalar_t, cache_t>; break;
          case 64: fn = &attend_avx512<4, scalar_t, cache_t>; break;
          case 128: fn = &attend_avx512<8, scalar_t, cache_t>; break;
          default: break;
        }
      }
#endif
      at::parallel_for(0, S * Hkv, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> qf, scores, scratch;
        for (int64_t item = begin; item < end; ++item) {
          const int64_t s = item / Hkv, h = item % Hkv, row = starts[s] * Hq + h * L.G;
          fn(qp + row * D, kp + h * D, vp + h * D, ks ? ks + h : nullptr, vs ? vs + h : nullptr,
             tables + s * max_blocks, starts[s + 1] - starts[s], lens[s], op + row * D, L,
             static_cast<float>(scale), qf, scores, scratch);
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

// Token i's K/V rows (k, v: [T, ...], each token's row contiguous) into flat slot slot_mapping[i]
// of k_cache / v_cache ([num_blocks, block_size, ...] with the same row shape and dtype: the K/V
// themselves, or an int8 cache's scales); a negative slot is skipped.
void store_kv(torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor k, torch::Tensor v,
              torch::Tensor slot_mapping) {
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes() &&
              k_cache.dim() == k.dim() + 1 && k_cache.sizes().slice(2) == k.sizes().slice(1),
              "the caches must be contiguous [blocks, block_size, ...] with the rows of k and v, got ",
              k_cache.sizes(), " for ", k.sizes());
  TORCH_CHECK(k.sizes() == v.sizes() && k.scalar_type() == k_cache.scalar_type() &&
              v.scalar_type() == k_cache.scalar_type(), "k, v and the caches must share a shape and dtype");
  TORCH_CHECK(slot_mapping.scalar_type() == torch::kLong && slot_mapping.dim() == 1 &&
              slot_mapping.size(0) == k.size(0), "slot_mapping must be int64 [T]");
  for (const auto& t : {k, v}) {
    int64_t expected = 1;
    for (int64_t d = t.dim() - 1; d >= 1; expected *= t.size(d--))
      TORCH_CHECK(t.size(d) == 1 || t.stride(d) == expected, "each token's K/V row must be contiguous");
  }
  const int64_t row = k.numel() / std::max<int64_t>(1, k.size(0)), slots = k_cache.numel() / std::max<int64_t>(1, row);
  const torch::Tensor sm = slot_mapping.contiguous();
  const int64_t* sp = sm.data_ptr<int64_t>();
  const int64_t bytes = row * k.element_size();
  for (int64_t i = 0; i < k.size(0); ++i) TORCH_CHECK(sp[i] < slots, "slot ", sp[i], " is out of the cache");
  auto* kc = static_cast<char*>(k_cache.data_ptr());
  auto* vc = static_cast<char*>(v_cache.data_ptr());
  const auto* kp = static_cast<const char*>(k.data_ptr());
  const auto* vp = static_cast<const char*>(v.data_ptr());
  const int64_t ks = k.stride(0) * k.element_size(), vs = v.stride(0) * v.element_size();
  at::parallel_for(0, k.size(0), 64, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      if (sp[i] < 0) continue;
      std::memcpy(kc + sp[i] * bytes, kp + i * ks, bytes);
      std::memcpy(vc + sp[i] * bytes, vp + i * vs, bytes);
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention", &paged_attention, "paged attention over short causal queries (CPU)");
  m.def("store_kv", &store_kv, "write K/V rows into paged cache slots (CPU)");
}
