// Paged attention for the CPU over short queries (decode steps, speculative verification,
// small prefill chunks): K/V are read in place from the block-paged cache, no gather copy.
// Work is split over (sequence, KV head); the G query heads that share a KV head and all the
// sequence's query positions are processed together, so each K/V row is read once. The cache
// holds the query's dtype, a 16-bit float (float16 or bfloat16, widened as it is read), int8
// with a float scale per token and head, or 2-bit codes (kivi2, infera/layers/kivi.py: keys per
// channel of a block, values per token; each query reads the exact keys and values of the staged
// blocks of its residual zone: the first block, its own and those before it).
#include <ATen/Parallel.h>

#include "ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "vec.h"

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#define PA_VECTOR
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

struct HeadLayout {
  int64_t Hq, G, D, block_size, row_stride, scale_stride;
};

// A 2-bit cache's other arrays at one KV head and sequence: key parameters per block ([2][D]:
// scales, minimums), value parameters per slot ([2][D / group]), the staged exact rows
// ([slots][2: K, V][block_size] rows, 16-bit) and the sequence's staging slots: table block 0's,
// then those of blocks zone, zone + 1, ..., zone + residual (-1: not staged), zone being the residual
// zone's first block for its first query.
template <typename scalar_t>
struct KiviView {
  using stage_t = std::conditional_t<std::is_same_v<scalar_t, float>, c10::Half, c10::BFloat16>;
  const c10::BFloat16* k_params;
  const c10::BFloat16* v_params;
  const stage_t* staging;
  int64_t k_param_stride, v_param_stride, stage_row_stride;
  const int64_t* stage_slots;
  int64_t zone, residual;
  // position t's exact key row (its value row is block_size rows on), or nullptr where it has none
  const stage_t* exact_row(int64_t t, int64_t bs) const {
    const int64_t b = t / bs, i = b == 0 ? 0 : (b >= zone && b - zone <= residual ? 1 + b - zone : -1);
    return i < 0 || stage_slots[i] < 0 ? nullptr : staging + (stage_slots[i] * 2 * bs + t % bs) * stage_row_stride;
  }
  // the first position of a query at p's residual zone (it reads exact rows there and in block 0)
  int64_t zone_start(int64_t p, int64_t bs) const { return std::max<int64_t>(0, p / bs - residual + 1) * bs; }
};

// A 2-bit row in float: byte j holds channel j + i * D / 4 in bits 2i, 2i + 1; a key's channel d is
// code * scale[d] + min[d], a value's code * scale[g] + min[g] for its group g.
inline void kivi_key_row(const uint8_t* codes, const c10::BFloat16* params, int64_t D, float* out) {
  const int64_t Q = D / 4;
  for (int64_t d = 0; d < D; ++d)
    out[d] = static_cast<float>((codes[d % Q] >> (2 * (d / Q))) & 3) * static_cast<float>(params[d]) +
             static_cast<float>(params[D + d]);
}
inline void kivi_value_row(const uint8_t* codes, const c10::BFloat16* params, int64_t D, float* out) {
  const int64_t Q = D / 4, g = infera::kivi_group(D), groups = D / g;
  for (int64_t d = 0; d < D; ++d)
    out[d] = static_cast<float>((codes[d % Q] >> (2 * (d / Q))) & 3) * static_cast<float>(params[d / g]) +
             static_cast<float>(params[groups + d / g]);
}

// One sequence and KV head: queries at positions [ctx - nq, ctx) over cache positions [0, ctx),
// causal; with window > 0 the query at p sees positions (p - window, p] only (a sliding-window
// layer). q and out point at the sequence's first query row, head h * G.
template <typename scalar_t, typename cache_t>
void attend(const scalar_t* q, const cache_t* k_cache, const cache_t* v_cache, const float* k_scale,
            const float* v_scale, const KiviView<scalar_t>* kivi, const int64_t* table, int64_t nq, int64_t ctx,
            int64_t window, scalar_t* out, const HeadLayout& L, float scale, std::vector<float>& qf,
            std::vector<float>& scores, std::vector<float>& acc) {
  constexpr bool kivi2 = std::is_same_v<cache_t, uint8_t>;
  const int64_t G = L.G, D = L.D, rows = nq * G, first = ctx - nq;
  // the first position row r sees, and the rows that see position t: [r_begin(t), r_end(t))
  auto lo = [&](int64_t r) { return window > 0 ? std::max<int64_t>(0, first + r / G + 1 - window) : 0; };
  auto r_begin = [&](int64_t t) { return std::max<int64_t>(0, t - first) * G; };
  auto r_end = [&](int64_t t) { return window > 0 ? std::min(rows, (t - first + window) * G) : rows; };
  qf.resize(rows * D);
  scores.assign(rows * ctx, 0.f);
  acc.assign(rows * D, 0.f);
  for (int64_t i = 0; i < nq; ++i)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t d = 0; d < D; ++d) qf[(i * G + g) * D + d] = static_cast<float>(q[i * L.Hq * D + g * D + d]) * scale;
  const int64_t bs = L.block_size;
  float kf[256], vf[256], kx[256], vx[256];
  auto slot_of = [&](int64_t t) { return table[t / bs] * bs + t % bs; };
  // (kivi2) t's exact rows into `into` (key, or value with `value`) if it has them
  auto exact = [&](int64_t t, bool value, float* into) {
    if constexpr (kivi2) {
      if (const auto* row = kivi->exact_row(t, bs)) {
        for (int64_t d = 0; d < D; ++d) into[d] = static_cast<float>(row[(value ? bs * kivi->stage_row_stride : 0) + d]);
        return true;
      }
    }
    return false;
  };
  auto in_zone = [&](int64_t r, int64_t t) { return t < bs || t >= kivi->zone_start(first + r / G, bs); };
  for (int64_t t = lo(0); t < ctx; ++t) {
    const int64_t slot = slot_of(t);
    if constexpr (kivi2)
      kivi_key_row(k_cache + slot * L.row_stride, kivi->k_params + slot / bs * kivi->k_param_stride, D, kf);
    else
      load_row(k_cache, k_scale, slot, L.row_stride, L.scale_stride, D, kf);
    const bool has_exact = exact(t, false, kx);
    for (int64_t r = r_begin(t); r < r_end(t); ++r) {  // queries that see position t
      const float* qr = qf.data() + r * D;
      const float* k = has_exact && in_zone(r, t) ? kx : kf;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t d = 0; d < D; ++d) s += qr[d] * k[d];
      scores[r * ctx + t] = s;
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t visible = first + r / G + 1;
    float* s = scores.data() + r * ctx;
    const float m = *std::max_element(s + lo(r), s + visible);
    float sum = 0.f;
    for (int64_t t = lo(r); t < visible; ++t) sum += (s[t] = std::exp(s[t] - m));
    const float inv = 1.f / sum;
    for (int64_t t = lo(r); t < visible; ++t) s[t] *= inv;
  }
  for (int64_t t = lo(0); t < ctx; ++t) {
    if constexpr (kivi2)
      kivi_value_row(v_cache + slot_of(t) * L.row_stride, kivi->v_params + slot_of(t) * kivi->v_param_stride, D, vf);
    else
      load_row(v_cache, v_scale, slot_of(t), L.row_stride, L.scale_stride, D, vf);
    const bool has_exact = exact(t, true, vx);
    for (int64_t r = r_begin(t); r < r_end(t); ++r) {
      const float p = scores[r * ctx + t];
      const float* v = has_exact && in_zone(r, t) ? vx : vf;
      float* a = acc.data() + r * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) a[d] += p * v[d];
    }
  }
  for (int64_t i = 0; i < nq; ++i)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t d = 0; d < D; ++d) out[i * L.Hq * D + g * D + d] = static_cast<scalar_t>(acc[(i * G + g) * D + d]);
}

#if defined(PA_VECTOR)
using namespace infera_vec;

// This level's vector operations, W floats to a register. The vector paths below are written
// once over them; AVX-512 and AVX2 results differ only where the lane count orders the
// arithmetic (tiles of T = U * W positions, dot-product and lane sums), each deterministic.
#if defined(__AVX512F__)
struct Vec {
  using reg = __m512;
  using mask = __mmask16;
  static constexpr int64_t W = 16, U = 2;  // tiles of U * W positions (one softmax update each)
  static constexpr int64_t RB = 4, KB = 4;  // V accumulation: RB query rows x KB column vectors in registers
  template <typename T> static reg load(const T* p) { return load16(p); }
  static reg codes(const uint8_t* p, int shift) { return codes16(p, shift); }  // (p[i] >> shift) & 3
  template <typename T> static void store(T* p, reg x) { store16(p, round16<T>(x)); }
  static void store(int8_t* p, reg x) {  // x already integral
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(x)));
  }
  static reg set1(float x) { return _mm512_set1_ps(x); }
  static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static reg div(reg a, reg b) { return _mm512_div_ps(a, b); }
  static reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static reg min(reg a, reg b) { return _mm512_min_ps(a, b); }
  static reg max(reg a, reg b) { return _mm512_max_ps(a, b); }
  static reg abs(reg x) { return _mm512_abs_ps(x); }
  static reg round(reg x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static reg exp(reg x) { return exp512(x); }
  static float hsum(reg x) { return _mm512_reduce_add_ps(x); }
  static float hmax(reg x) { return _mm512_reduce_max_ps(x); }
  static mask first(int64_t n) { return first_lanes(n); }  // lanes [0, n)
  static mask range(int64_t a, int64_t b) { return first(b) & ~first(a); }  // lanes [a, b)
  static reg select(mask m, reg a, reg b) { return _mm512_mask_blend_ps(m, b, a); }  // a where m, else b

  // The sums of v[0], ..., v[15] as one vector: interleave-and-add at 32 bits, 64 bits, then 128-bit lanes.
  static reg sum(const reg* v) {
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
};
#else
struct Vec {
  using reg = __m256;
  using mask = __m256;
  static constexpr int64_t W = 8, U = 4;  // tiles of U * W positions (one softmax update each)
  static constexpr int64_t RB = 2, KB = 4;  // V accumulation: RB query rows x KB column vectors in registers
  template <typename T> static reg load(const T* p) { return load8(p); }
  static reg codes(const uint8_t* p, int shift) { return codes8(p, shift); }  // (p[i] >> shift) & 3
  template <typename T> static void store(T* p, reg x) { store8(p, round8<T>(x)); }
  static reg set1(float x) { return _mm256_set1_ps(x); }
  static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static reg div(reg a, reg b) { return _mm256_div_ps(a, b); }
  static reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static reg min(reg a, reg b) { return _mm256_min_ps(a, b); }
  static reg max(reg a, reg b) { return _mm256_max_ps(a, b); }
  static reg abs(reg x) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), x); }
  static reg round(reg x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static reg exp(reg x) { return exp256(x); }
  static float hsum(reg x) { return hsum8(x); }
  static float hmax(reg x) { return hmax8(x); }
  static mask first(int64_t n) {  // lanes [0, n)
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::clamp<int64_t>(n, 0, 8))),
                                                  _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
  }
  static mask range(int64_t a, int64_t b) { return _mm256_andnot_ps(first(a), first(b)); }  // lanes [a, b)
  static reg select(mask m, reg a, reg b) { return _mm256_blendv_ps(b, a, m); }  // a where m, else b

  // The sums of v[0], ..., v[7] as one vector: pairwise horizontal adds, then the 128-bit halves.
  static reg sum(const reg* v) {
    const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    // a: sums of v[0..3] over lanes 0-3, then over lanes 4-7; b: the same for v[4..7]
    return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
  }
};
#endif

// Vector path for head sizes 16, 32, 64, 128 and 256 (a K/V row is D / W vectors of floats), split along
// the context: positions go in chunks of CHUNK (at absolute positions), each (sequence, KV head,
// chunk) an independent work item, so one long sequence still keeps every thread busy
// (flash-decoding). An item runs an online softmax over tiles of W positions (the chunk's K/V rows
// prefetched into L2 at its start): each query row's W scores are reduced together (Vec::sum), and
// the row's running max, sum and V accumulator are updated. The chunks' partial results are merged
// in chunk order. A query row's arithmetic depends only on its position and the cache, never on
// the batch or on other query rows, so decoding and speculative verification give bitwise the
// same rows. An int8 row's scale multiplies its score (K) or its probability (V), not its elements.
constexpr int64_t CHUNK = 128;
constexpr int64_t PREFETCH_TILES = 2;  // how far ahead a chunk's K/V rows are fetched (measured: 1-4 alike)

// kivi_key_row / kivi_value_row a vector at a time where a group of W codes' channels share a group
template <int64_t D>
inline void kivi_key_row_vec(const uint8_t* codes, const c10::BFloat16* params, float* out) {
  constexpr int64_t Q = D / 4;
  if constexpr (Q % Vec::W == 0) {
    for (int c = 0; c < 4; ++c)
      for (int64_t j = 0; j < Q; j += Vec::W)
        Vec::store(out + c * Q + j, Vec::fmadd(Vec::codes(codes + j, 2 * c), Vec::load(params + c * Q + j),
                                               Vec::load(params + D + c * Q + j)));
  } else {
    kivi_key_row(codes, params, D, out);
  }
}
template <int64_t D>
inline void kivi_value_row_vec(const uint8_t* codes, const c10::BFloat16* params, float* out) {
  constexpr int64_t Q = D / 4, g = infera::kivi_group(D), groups = D / g;
  if constexpr (Q % Vec::W == 0 && g % Vec::W == 0) {
    for (int c = 0; c < 4; ++c)
      for (int64_t j = 0; j < Q; j += Vec::W) {
        const int64_t group = (c * Q + j) / g;
        Vec::store(out + c * Q + j, Vec::fmadd(Vec::codes(codes + j, 2 * c), Vec::set1(static_cast<float>(params[group])),
                                               Vec::set1(static_cast<float>(params[groups + group]))));
      }
  } else {
    kivi_value_row(codes, params, D, out);
  }
}

// acc[j] = acc[j] * corr[j] + sum over i < most of p[j][i] * V row i, for NR query rows and the KB
// column vectors acc and vrow[i] + k0 point at; p is 0 at positions a row does not see (so adding
// them changes nothing), V rows are float rows (the cache's own, or the widened tile's).
template <int NR, int64_t KB, int64_t D>
inline void accumulate_v(float* acc, const float* corr, const float* p, const float* const* vrow, int64_t k0,
                         int64_t most) {
  constexpr int64_t W = Vec::W, T = W * Vec::U;
  Vec::reg a[NR][KB];
  for (int j = 0; j < NR; ++j)
    for (int k = 0; k < KB; ++k) a[j][k] = Vec::mul(Vec::load(acc + j * D + W * k), Vec::set1(corr[j]));
  for (int64_t i = 0; i < most; ++i) {
    Vec::reg v[KB];
    for (int k = 0; k < KB; ++k) v[k] = Vec::load(vrow[i] + k0 + W * k);
    for (int j = 0; j < NR; ++j) {
      const Vec::reg pi = Vec::set1(p[j * T + i]);
      for (int k = 0; k < KB; ++k) a[j][k] = Vec::fmadd(pi, v[k], a[j][k]);
    }
  }
  for (int j = 0; j < NR; ++j)
    for (int k = 0; k < KB; ++k) Vec::store(acc + j * D + W * k, a[j][k]);
}

// Partial attention of `rows` query rows over cache positions [c0, c1); row r is query r / G (at
// position first + r / G), head r % G, at q + (r / G) * Hq * D + (r % G) * D. Writes, per row,
// the max score m, the sum l of e^(s - m) and acc = sum of e^(s - m) v, as
// part = [m: rows][l: rows][acc: rows x D]. With AVX512-BF16, a bfloat16 cache's K rows are
// multiplied as they are (pair dot products: exact products, float sums); float caches' rows are
// read in place; other K and V rows are widened to a float tile first. V rows are accumulated into
// a few query rows at a time, in registers (accumulate_v). The online softmax updates a row's max
// and sum once a tile of T = U * W positions (U groups of W lanes). With window > 0 row r sees
// positions (its position - window, its position] only: tiles no row's window reaches are skipped
// (on the chunk's grid of tiles, so a row's arithmetic still depends on its position alone), and a
// tile's lanes before a row's window are masked like those after its position. `tmp`: rows * (T + 1)
// floats. A 2-bit cache's (kivi) rows are decoded into the float tiles, and the staged exact rows
// into two more, which a row reads at the positions of its residual zone (and of block 0).
template <int64_t D, typename scalar_t, typename cache_t>
void attend_chunk(const scalar_t* q, int64_t rows, int64_t first, int64_t window, const cache_t* k_cache,
                  const cache_t* v_cache, const float* k_scale, const float* v_scale, const KiviView<scalar_t>* kivi,
                  const int64_t* table, int64_t c0, int64_t c1, const HeadLayout& L, float scale, float* part,
                  float* tmp) {
  constexpr int64_t W = Vec::W, U = Vec::U, T = W * U, NC = D / W, RB = Vec::RB, KB = std::min(NC, Vec::KB);
  constexpr bool kivi2 = std::is_same_v<cache_t, uint8_t>;
#if defined(__AVX512BF16__)
  constexpr bool bf16_dots = std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<cache_t, c10::BFloat16> &&
                             D % 32 == 0;
#else
  constexpr bool bf16_dots = false;
#endif
  float *m = part, *l = part + rows, *acc = part + 2 * rows;
  const int64_t G = L.G, Hq = L.Hq;
  float *prob = tmp, *corr = tmp + rows * T;  // per row: p * V scale [T], correction
  for (int64_t r = 0; r < rows; ++r) m[r] = -INFINITY, l[r] = 0.f;
  std::fill(acc, acc + rows * D, 0.f);
  // a window: from the first tile (on the chunk's grid) that row 0's window reaches
  if (window > 0) c0 += std::max<int64_t>(0, first + 1 - window - c0) / T * T;
  constexpr bool widen = !std::is_same_v<cache_t, float>;  // float rows are used where they are
  alignas(64) float kt[widen && !bf16_dots ? T * D : 1], vt[widen ? T * D : 1];
  alignas(64) float kx[kivi2 ? T * D : 1], vx[kivi2 ? T * D : 1];
  // the tile's K and V rows in float (unused: K with bf16_dots); (kivi2) its exact rows, or the same
  const float *kf[T], *vf[T], *kex[T], *vex[T], *vsel[T];
  const int64_t bs = L.block_size;
  int64_t slots[CHUNK];  // the chunk's cache slots (counted along the block table: no division a position)
  for (int64_t t = c0, b = c0 / L.block_size, o = c0 % L.block_size; t < c1; ++t) {
    slots[t - c0] = table[b] * L.block_size + o;
    if (++o == L.block_size) o = 0, ++b;
  }
  auto qrow = [&](int64_t r) { return q + (r / G) * Hq * D + (r % G) * D; };
  // positions of the tile at t0 (n of them) that row r sees: lanes [from, seen)
  auto seen = [&](int64_t r, int64_t t0, int64_t n) { return std::min(n, first + r / G + 1 - t0); };
  auto from = [&](int64_t r, int64_t t0) {
    return window > 0 ? std::max<int64_t>(0, first + r / G + 1 - window - t0) : 0;
  };
  // K/V rows [i0, i1) of the chunk into L2: the first PREFETCH_TILES tiles' at the start, then each
  // tile's that many tiles ahead, so the rows arrive while earlier tiles compute
  auto prefetch = [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < std::min(i1, c1 - c0); ++i) {
      for (int64_t b = 0; b < D * static_cast<int64_t>(sizeof(cache_t)); b += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(k_cache + slots[i] * L.row_stride) + b, _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(v_cache + slots[i] * L.row_stride) + b, _MM_HINT_T1);
      }
    }
  };
  prefetch(0, PREFETCH_TILES * T);
  for (int64_t t0 = c0; t0 < c1; t0 += T) {
    const int64_t n = std::min(T, c1 - t0);
    prefetch(t0 - c0 + PREFETCH_TILES * T, t0 - c0 + (PREFETCH_TILES + 1) * T);
    const int64_t* tile_slots = slots + (t0 - c0);
    alignas(64) float ks[T], vs[T];
    const cache_t* krow[T];
    for (int64_t i = 0; i < T; ++i) {
      krow[i] = k_cache + (i < n ? tile_slots[i] : tile_slots[0]) * L.row_stride;  // (lanes past n are masked out)
      const cache_t* v = v_cache + tile_slots[i < n ? i : 0] * L.row_stride;
      if constexpr (kivi2) {
        const int64_t slot = i < n ? tile_slots[i] : tile_slots[0];
        kivi_key_row_vec<D>(krow[i], kivi->k_params + slot / bs * kivi->k_param_stride, kt + i * D);
        if (i < n) kivi_value_row_vec<D>(v, kivi->v_params + slot * kivi->v_param_stride, vt + i * D);
        kf[i] = kex[i] = kt + i * D, vf[i] = vex[i] = vt + i * D;
        if (const auto* row = i < n ? kivi->exact_row(t0 + i, bs) : nullptr) {
          for (int64_t c = 0; c < NC; ++c) {
            Vec::store(kx + i * D + W * c, Vec::load(row + W * c));
            Vec::store(vx + i * D + W * c, Vec::load(row + bs * kivi->stage_row_stride + W * c));
          }
          kex[i] = kx + i * D, vex[i] = vx + i * D;
        }
      } else if constexpr (widen) {
        for (int64_t c = 0; c < NC; ++c) {
          if constexpr (!bf16_dots) Vec::store(kt + i * D + W * c, Vec::load(krow[i] + W * c));
          if (i < n) Vec::store(vt + i * D + W * c, Vec::load(v + W * c));
        }
        kf[i] = kt + i * D, vf[i] = vt + i * D;
      } else {
        kf[i] = krow[i], vf[i] = v;
      }
      ks[i] = (i < n && k_scale ? k_scale[tile_slots[i] * L.scale_stride] : 1.f) * scale;
      vs[i] = i < n && v_scale ? v_scale[tile_slots[i] * L.scale_stride] : 1.f;
    }
    // the rows that see some of the tile: [r_first, r_end) (past its start; their windows reach it)
    const int64_t r_first = std::max<int64_t>(0, t0 - first) * G;
    const int64_t r_end = window > 0 ? std::min(rows, (t0 + n - 1 + window - first) * G) : rows;
    for (int64_t r = r_first; r < r_end; ++r) {
      const int64_t sees = seen(r, t0, n), skip = from(r, t0);
      Vec::reg s[U];  // the tile's scores, W a group (-inf where the row does not see)
      Vec::reg top = Vec::set1(-INFINITY);
      for (int64_t u = 0; u < U; ++u) {
        if (sees <= u * W || skip >= (u + 1) * W) {
          s[u] = Vec::set1(-INFINITY);
          continue;
        }
        Vec::reg dot[W];
        if constexpr (bf16_dots) {
#if defined(__AVX512BF16__)
          __m512bh qv[NC / 2];
          for (int c = 0; c < NC / 2; ++c) qv[c] = (__m512bh)_mm512_loadu_si512(qrow(r) + 32 * c);
          for (int i = 0; i < 16; ++i) {
            const cache_t* k = krow[u * W + i];
            dot[i] = _mm512_dpbf16_ps(_mm512_setzero_ps(), qv[0], (__m512bh)_mm512_loadu_si512(k));
            for (int c = 1; c < NC / 2; ++c)
              dot[i] = _mm512_dpbf16_ps(dot[i], qv[c], (__m512bh)_mm512_loadu_si512(k + 32 * c));
          }
#endif
        } else {
          Vec::reg qv[NC];
          for (int c = 0; c < NC; ++c) qv[c] = Vec::load(qrow(r) + W * c);
          // (kivi2) lanes [0, sink) and [zone, W) read exact keys: block 0 and the row's residual zone
          const int64_t sink = kivi2 ? bs - t0 - u * W : 0;
          const int64_t zone = kivi2 ? kivi->zone_start(first + r / G, bs) - t0 - u * W : W;
          for (int i = 0; i < W; ++i) {
            const float* k = i < sink || i >= zone ? kex[u * W + i] : kf[u * W + i];
            dot[i] = Vec::mul(qv[0], Vec::load(k));
            for (int c = 1; c < NC; ++c) dot[i] = Vec::fmadd(qv[c], Vec::load(k + W * c), dot[i]);
          }
        }
        s[u] = Vec::select(Vec::range(skip - u * W, sees - u * W), Vec::mul(Vec::sum(dot), Vec::load(ks + u * W)),
                           Vec::set1(-INFINITY));
        top = Vec::max(top, s[u]);
      }
      const float m_new = std::max(m[r], Vec::hmax(top));
      corr[r] = m_new == m[r] ? 1.f : std::exp(m[r] - m_new);  // 0 before the first tile
      Vec::reg total = Vec::set1(0.f);
      for (int64_t u = 0; u < U; ++u) {
        Vec::reg e = Vec::set1(0.f);
        if (u * W < sees && skip < (u + 1) * W)
          e = Vec::select(Vec::range(skip - u * W, sees - u * W), Vec::exp(Vec::sub(s[u], Vec::set1(m_new))), e);
        total = Vec::add(total, e);
        Vec::store(prob + r * T + u * W, Vec::mul(e, Vec::load(vs + u * W)));
      }
      l[r] = l[r] * corr[r] + Vec::hsum(total);
      m[r] = m_new;
    }
    for (int64_t r0 = r_first, nr; r0 < r_end; r0 += nr) {
      nr = std::min(RB, r_end - r0);
      const float* const* vrows = vf;
      if constexpr (kivi2) {  // rows of one block (one residual zone): the tile's V rows each reads
        const int64_t block = (first + r0 / G) / bs;
        while ((first + (r0 + nr - 1) / G) / bs != block) --nr;
        const int64_t zone = kivi->zone_start(first + r0 / G, bs);
        for (int64_t i = 0; i < T; ++i) vsel[i] = t0 + i < bs || t0 + i >= zone ? vex[i] : vf[i];
        vrows = vsel;
      }
      const int64_t most = seen(r0 + nr - 1, t0, n);
      for (int64_t k0 = 0; k0 < D; k0 += KB * W) {
        float *a = acc + r0 * D + k0, *c = corr + r0, *p = prob + r0 * T;
        switch (nr) {  // (nr <= RB <= 4)
          case 1: accumulate_v<1, KB, D>(a, c, p, vrows, k0, most); break;
          case 2: accumulate_v<2, KB, D>(a, c, p, vrows, k0, most); break;
          case 3: accumulate_v<3, KB, D>(a, c, p, vrows, k0, most); break;
          default: accumulate_v<4, KB, D>(a, c, p, vrows, k0, most); break;
        }
      }
    }
  }
}

// out rows of one (sequence, KV head) from its chunks' partial results, merged in chunk order;
// chunks a row does not reach (l = 0) are skipped.
template <typename scalar_t>
void merge_chunks(const float* parts, int64_t nchunks, int64_t rows, const HeadLayout& L, scalar_t* out) {
  const int64_t D = L.D, stride = rows * (D + 2);
  std::vector<float> w(nchunks);  // a row's chunk weights e^(m - top)
  for (int64_t r = 0; r < rows; ++r) {
    float top = -INFINITY;
    for (int64_t c = 0; c < nchunks; ++c)
      if (parts[c * stride + rows + r] > 0.f) top = std::max(top, parts[c * stride + r]);
    float den = 0.f;
    for (int64_t c = 0; c < nchunks; ++c) {
      const float* part = parts + c * stride;
      w[c] = part[rows + r] > 0.f ? std::exp(part[r] - top) : 0.f;
      den += w[c] * part[rows + r];
    }
    scalar_t* o = out + (r / L.G) * L.Hq * D + (r % L.G) * D;
    for (int64_t d = 0; d < D; d += Vec::W) {
      Vec::reg num = Vec::set1(0.f);
      for (int64_t c = 0; c < nchunks; ++c)
        if (w[c] > 0.f) num = Vec::add(num, Vec::mul(Vec::set1(w[c]), Vec::load(parts + c * stride + 2 * rows + r * D + d)));
      Vec::store(o + d, Vec::div(num, Vec::set1(den)));
    }
  }
}
#endif

// A 2-bit cache's arrays for every head and sequence (kivi_paged_attention), as KiviViews per item.
template <typename scalar_t>
struct KiviArrays {
  const c10::BFloat16 *k_params, *v_params;
  const typename KiviView<scalar_t>::stage_t* staging;
  const int64_t* stage_slots;  // [S, residual + 2]
  int64_t Hkv, D, groups, residual;
  KiviView<scalar_t> view(int64_t s, int64_t h, int64_t zone) const {
    return {k_params + h * 2 * D, v_params + h * 2 * groups, staging + h * D, Hkv * 2 * D, Hkv * 2 * groups,
            Hkv * D, stage_slots + (residual + 2) * s, zone, residual};
  }
};

// The attention of S sequences' query rows (paged_attention's arguments as pointers): on the vector
// path, items (sequence, KV head, chunk of CHUNK positions) then a merge of each (sequence, head)'s
// chunks; on the scalar path, one item per (sequence, KV head).
template <typename scalar_t, typename cache_t>
void attention_items(const scalar_t* qp, scalar_t* op, const cache_t* kp, const cache_t* vp, const float* ks,
                     const float* vs, const KiviArrays<scalar_t>* kivi, const int64_t* tables, const int64_t* starts,
                     const int64_t* lens, int64_t S, int64_t max_blocks, int64_t window, const HeadLayout& L,
                     float scale) {
  const int64_t Hq = L.Hq, D = L.D, Hkv = Hq / L.G, head = L.row_stride / Hkv;  // head: a head's cache elements
  auto view = [&](int64_t s, int64_t h) {  // the 2-bit cache's arrays at sequence s, head h
    if (!kivi) return KiviView<scalar_t>{};
    const int64_t first = (lens[s] - (starts[s + 1] - starts[s])) / L.block_size;
    return kivi->view(s, h, std::max<int64_t>(0, first - kivi->residual + 1));
  };
#if defined(PA_VECTOR)
  if constexpr (lanes::loads<scalar_t>) {
    decltype(&attend_chunk<16, scalar_t, cache_t>) chunk_fn = nullptr;
    switch (D) {
      case 16: chunk_fn = &attend_chunk<16, scalar_t, cache_t>; break;
      case 32: chunk_fn = &attend_chunk<32, scalar_t, cache_t>; break;
      case 64: chunk_fn = &attend_chunk<64, scalar_t, cache_t>; break;
      case 128: chunk_fn = &attend_chunk<128, scalar_t, cache_t>; break;
      case 256: chunk_fn = &attend_chunk<256, scalar_t, cache_t>; break;
      default: break;
    }
    if (chunk_fn) {
      // items (s, h, c) in order; sequence s owns items [item0[s], item0[s + 1]) and partial
      // results [part0[s], part0[s + 1]): per head, per chunk, rows x (D + 2) floats
      std::vector<int64_t> item0(S + 1, 0), part0(S + 1, 0), chunks(S);
      for (int64_t s = 0; s < S; ++s) {
        chunks[s] = (lens[s] + CHUNK - 1) / CHUNK;
        item0[s + 1] = item0[s] + Hkv * chunks[s];
        part0[s + 1] = part0[s] + Hkv * chunks[s] * (starts[s + 1] - starts[s]) * L.G * (D + 2);
      }
      std::vector<float> parts(part0[S]);
      at::parallel_for(0, item0[S], 1, [&](int64_t begin, int64_t end) {
        std::vector<float> tmp;
        for (int64_t item = begin; item < end; ++item) {
          const int64_t s = std::upper_bound(item0.begin(), item0.end(), item) - item0.begin() - 1;
          const int64_t h = (item - item0[s]) / chunks[s], c = (item - item0[s]) % chunks[s];
          const int64_t nq = starts[s + 1] - starts[s], rows = nq * L.G;
          const KiviView<scalar_t> kv = view(s, h);
          tmp.resize(rows * (Vec::W * Vec::U + 1));
          chunk_fn(qp + (starts[s] * Hq + h * L.G) * D, rows, lens[s] - nq, window, kp + h * head, vp + h * head,
                   ks ? ks + h : nullptr, vs ? vs + h : nullptr, kivi ? &kv : nullptr, tables + s * max_blocks,
                   c * CHUNK, std::min(lens[s], (c + 1) * CHUNK), L, scale,
                   parts.data() + part0[s] + (h * chunks[s] + c) * rows * (D + 2), tmp.data());
        }
      });
      at::parallel_for(0, S * Hkv, 8, [&](int64_t begin, int64_t end) {
        for (int64_t item = begin; item < end; ++item) {
          const int64_t s = item / Hkv, h = item % Hkv, rows = (starts[s + 1] - starts[s]) * L.G;
          merge_chunks(parts.data() + part0[s] + h * chunks[s] * rows * (D + 2), chunks[s], rows, L,
                       op + (starts[s] * Hq + h * L.G) * D);
        }
      });
      return;
    }
  }
#endif
  at::parallel_for(0, S * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf, scores, scratch;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / Hkv, h = item % Hkv, row = starts[s] * Hq + h * L.G;
      const KiviView<scalar_t> kv = view(s, h);
      attend<scalar_t, cache_t>(qp + row * D, kp + h * head, vp + h * head, ks ? ks + h : nullptr,
                                vs ? vs + h : nullptr, kivi ? &kv : nullptr, tables + s * max_blocks,
                                starts[s + 1] - starts[s], lens[s], window, op + row * D, L, scale, qf, scores,
                                scratch);
    }
  });
}

// One head's K or V row as int8, dst = round(x / s) with s = max|x| / 127 (as quantize_int8, to the
// bit: the same division and rounding, vectors and scalar tail alike); returns s.
template <typename T>
float quantize_row(const T* src, int64_t D, int8_t* dst) {
  float amax = 0.f;
  int64_t d = 0, whole = 0;  // [0, whole): vectors
#if defined(PA_VECTOR)
  if constexpr (lanes::loads<T>) {
    whole = D - D % Vec::W;
    Vec::reg m = Vec::set1(0.f);
    for (; d < whole; d += Vec::W) m = Vec::max(m, Vec::abs(Vec::load(src + d)));
    amax = Vec::hmax(m);
  }
#endif
  for (; d < D; ++d) amax = std::max(amax, std::abs(static_cast<float>(src[d])));
  const float s = std::max(amax, 1e-8f) / 127.f;
#if defined(PA_VECTOR)
  if constexpr (lanes::loads<T>) {
    const Vec::reg vs = Vec::set1(s), lo = Vec::set1(-127.f), hi = Vec::set1(127.f);
    for (d = 0; d < whole; d += Vec::W)
      Vec::store(dst + d, Vec::min(Vec::max(Vec::round(Vec::div(Vec::load(src + d), vs)), lo), hi));
  }
#endif
  for (d = whole; d < D; ++d)
    dst[d] = static_cast<int8_t>(std::clamp(std::nearbyint(static_cast<float>(src[d]) / s), -127.f, 127.f));
  return s;
}

}  // namespace

namespace infera {

// q: [T, Hq, D], the queries of S sequences back to back (sequence s owns rows
// query_start[s] .. query_start[s + 1], or row s alone without query_start: the last positions
// of its context_lens[s] tokens);
// k_cache, v_cache: [num_blocks, block_size, Hkv, D] in q's dtype, float16, bfloat16, or int8 with
// k_scale, v_scale: [num_blocks, block_size, Hkv] float32; block_tables: [S, max_blocks] int64.
// window > 0: each query sees its last `window` positions (a sliding-window layer). Returns [T, Hq, D].
at::Tensor paged_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                              c10::optional<at::Tensor> k_scale, c10::optional<at::Tensor> v_scale,
                              at::Tensor block_tables, c10::optional<at::Tensor> query_starts,
                              at::Tensor context_lens, double scale, int64_t window) {
  TORCH_CHECK(window >= 0, "window must be >= 0 (0: none)");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "KV cache must be contiguous");
  // no query_starts: one query row per sequence (a decode step)
  at::Tensor query_start = query_starts.has_value() ? *query_starts : at::arange(context_lens.size(0) + 1);
  for (const auto& t : {block_tables, query_start, context_lens})
    TORCH_CHECK(t.scalar_type() == at::kLong, "block tables, query starts and context lengths must be int64");
  const bool quantized = k_cache.scalar_type() == at::kChar;
  TORCH_CHECK(quantized == (k_scale.has_value() && v_scale.has_value()), "an int8 cache needs its scales");
  const at::ScalarType cache_type = k_cache.scalar_type();
  TORCH_CHECK(v_cache.scalar_type() == cache_type, "K and V caches must share a dtype");
  TORCH_CHECK(quantized || cache_type == q.scalar_type() || cache_type == at::kHalf || cache_type == at::kBFloat16,
              "a ", cache_type, " cache cannot serve ", q.scalar_type(), " queries");
  TORCH_CHECK(!quantized || (k_scale->is_contiguous() && v_scale->is_contiguous() &&
                             k_scale->scalar_type() == at::kFloat), "scales must be contiguous float32");
  q = q.contiguous();
  block_tables = block_tables.contiguous();
  query_start = query_start.contiguous();
  context_lens = context_lens.contiguous();
  const int64_t S = context_lens.size(0), Hq = q.size(1), D = q.size(2), Hkv = k_cache.size(2);
  TORCH_CHECK(query_start.size(0) == S + 1 && block_tables.size(0) == S, "one query range and table per sequence");
  TORCH_CHECK(D <= 256 && Hq % Hkv == 0 && k_cache.size(3) == D, "unsupported head layout");
  const HeadLayout L{Hq, Hq / Hkv, D, k_cache.size(1), Hkv * D, Hkv};
  const int64_t max_blocks = block_tables.size(1);
  const float* ks = quantized ? k_scale->data_ptr<float>() : nullptr;
  const float* vs = quantized ? v_scale->data_ptr<float>() : nullptr;
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* starts = query_start.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s)
    TORCH_CHECK(starts[s + 1] - starts[s] <= lens[s] && lens[s] <= max_blocks * L.block_size, "bad query range");
  auto out = at::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND(at::ScalarType::BFloat16, q.scalar_type(), "paged_attention", [&] {
    auto run = [&](auto* kp, auto* vp) {
      attention_items<scalar_t>(q.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), kp, vp, ks, vs, nullptr, tables,
                                starts, lens, S, max_blocks, window, L, static_cast<float>(scale));
    };
    if (quantized) {
      run(k_cache.data_ptr<int8_t>(), v_cache.data_ptr<int8_t>());
    } else if (cache_type == q.scalar_type()) {
      run(k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>());
    } else if (cache_type == at::kHalf) {
      run(k_cache.data_ptr<at::Half>(), v_cache.data_ptr<at::Half>());
    } else {
      run(k_cache.data_ptr<at::BFloat16>(), v_cache.data_ptr<at::BFloat16>());
    }
  });
  return out;
}

// paged_attention over a 2-bit cache (infera/layers/kivi.py): k_codes, v_codes [num_blocks,
// block_size, Hkv, D / 4] uint8; k_params [num_blocks, Hkv, 2, D] and v_params [num_blocks,
// block_size, Hkv, 2, D / group] bfloat16; staging [slots, 2 (K, V), block_size, Hkv, D] (float16
// under float32 queries, else bfloat16); stage_slots [S, residual + 2]: each sequence's staging
// slots of table block 0, then of blocks zone .. zone + residual (-1: not staged), zone =
// max(0, first query's block - residual + 1). A query at p reads exact rows where staged in block 0
// and in blocks from p's block - residual + 1 on, quantized ones elsewhere.
at::Tensor kivi_paged_attention(at::Tensor q, at::Tensor k_codes, at::Tensor v_codes, at::Tensor k_params,
                                at::Tensor v_params, at::Tensor staging, at::Tensor block_tables,
                                c10::optional<at::Tensor> query_starts, at::Tensor context_lens, at::Tensor stage_slots,
                                double scale, int64_t residual, int64_t window) {
  TORCH_CHECK(window >= 0 && residual >= 1, "window must be >= 0 (0: none), residual >= 1");
  TORCH_CHECK(q.dim() == 3 && k_codes.dim() == 4 && v_codes.sizes() == k_codes.sizes(), "bad shapes");
  const int64_t Hq = q.size(1), D = q.size(2), Hkv = k_codes.size(2), bs = k_codes.size(1);
  TORCH_CHECK(k_codes.scalar_type() == at::kByte && v_codes.scalar_type() == at::kByte && k_codes.size(3) * 4 == D &&
              D <= 256 && D % 4 == 0 && Hq % Hkv == 0, "2-bit codes must be uint8 [blocks, block_size, Hkv, D / 4]");
  const int64_t groups = D / kivi_group(D);
  TORCH_CHECK(k_params.scalar_type() == at::kBFloat16 && v_params.scalar_type() == at::kBFloat16 &&
              k_params.sizes() == at::IntArrayRef({k_codes.size(0), Hkv, 2, D}) &&
              v_params.sizes() == at::IntArrayRef({k_codes.size(0), bs, Hkv, 2, groups}),
              "bad 2-bit cache parameters");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16, "queries must be float32 or bfloat16");
  TORCH_CHECK(staging.scalar_type() == (q.scalar_type() == at::kFloat ? at::kHalf : at::kBFloat16) &&
              staging.dim() == 5 && staging.size(1) == 2 && staging.size(2) == bs && staging.size(3) == Hkv &&
              staging.size(4) == D, "staging must be [slots, 2, block_size, Hkv, D], float16 under float32 queries");
  for (const auto& t : {k_codes, v_codes, k_params, v_params, staging})
    TORCH_CHECK(t.is_contiguous(), "the 2-bit cache's arrays must be contiguous");
  at::Tensor query_start = query_starts.has_value() ? *query_starts : at::arange(context_lens.size(0) + 1);
  for (const auto& t : {block_tables, query_start, context_lens, stage_slots})
    TORCH_CHECK(t.scalar_type() == at::kLong, "block tables, query starts, lengths and stage slots must be int64");
  q = q.contiguous();
  block_tables = block_tables.contiguous();
  query_start = query_start.contiguous();
  context_lens = context_lens.contiguous();
  stage_slots = stage_slots.contiguous();
  const int64_t S = context_lens.size(0), max_blocks = block_tables.size(1);
  TORCH_CHECK(query_start.size(0) == S + 1 && block_tables.size(0) == S &&
              stage_slots.sizes() == at::IntArrayRef({S, residual + 2}),
              "one query range, table and row of residual + 2 stage slots per sequence");
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* starts = query_start.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  const int64_t* stage = stage_slots.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s) {
    const int64_t nq = starts[s + 1] - starts[s];
    TORCH_CHECK(0 < nq && nq <= lens[s] && lens[s] <= max_blocks * bs && (lens[s] - 1) / bs - (lens[s] - nq) / bs < 2,
                "bad query range (a sequence's queries span at most two blocks)");
    for (int64_t i = 0; i < residual + 2; ++i)
      TORCH_CHECK(stage[s * (residual + 2) + i] < staging.size(0), "stage slot out of range");
  }
  const HeadLayout L{Hq, Hq / Hkv, D, bs, Hkv * D / 4, 0};
  auto out = at::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND(at::ScalarType::BFloat16, q.scalar_type(), "kivi_paged_attention", [&] {
    using stage_t = typename KiviView<scalar_t>::stage_t;
    const KiviArrays<scalar_t> arrays{k_params.data_ptr<c10::BFloat16>(), v_params.data_ptr<c10::BFloat16>(),
                                      staging.data_ptr<stage_t>(), stage, Hkv, D, groups, residual};
    attention_items<scalar_t>(q.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), k_codes.data_ptr<uint8_t>(),
                              v_codes.data_ptr<uint8_t>(), nullptr, nullptr, &arrays, tables, starts, lens, S,
                              max_blocks, window, L, static_cast<float>(scale));
  });
  return out;
}

// Token i's K/V rows (k, v: [T, Hkv, D], each token's row contiguous) into flat slot
// slot_mapping[i] of k_cache / v_cache ([num_blocks, block_size, Hkv, D]); a negative slot is
// skipped. The caches hold k's dtype, a 16-bit float (k and v rounded to it, to nearest even), or
// int8 with k_scale / v_scale [num_blocks, block_size, Hkv]:
// each head's row stored as round(x / s), s = max|x| / 127 (as quantize_int8 in
// infera/layers/paged_attention.py, to the bit).
void store_kv(at::Tensor k_cache, at::Tensor v_cache, at::Tensor k, at::Tensor v,
              at::Tensor slot_mapping, c10::optional<at::Tensor> k_scale,
              c10::optional<at::Tensor> v_scale) {
  TORCH_CHECK(k.dim() == 3 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
              v_cache.sizes() == k_cache.sizes() && k_cache.dim() == 4 && k_cache.sizes().slice(2) == k.sizes().slice(1),
              "the caches must be contiguous [blocks, block_size, Hkv, D] with the rows of k and v, got ",
              k_cache.sizes(), " for ", k.sizes());
  const bool quantized = k_scale.has_value();
  TORCH_CHECK(quantized == v_scale.has_value() && quantized == (k_cache.scalar_type() == at::kChar),
              "an int8 cache takes both scale tensors, other caches none");
  const at::ScalarType cache_type = k_cache.scalar_type();
  TORCH_CHECK(k.sizes() == v.sizes() && k.scalar_type() == v.scalar_type() && v_cache.scalar_type() == cache_type &&
              (quantized || k.scalar_type() == cache_type || cache_type == at::kHalf || cache_type == at::kBFloat16),
              "k, v and the caches must share a shape and dtype (or the caches a 16-bit float)");
  if (!quantized && k.scalar_type() != cache_type) k = k.to(cache_type), v = v.to(cache_type);
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 &&
              slot_mapping.size(0) == k.size(0), "slot_mapping must be int64 [T]");
  for (const auto& t : {k, v})
    TORCH_CHECK((t.size(2) == 1 || t.stride(2) == 1) && (t.size(1) == 1 || t.stride(1) == t.size(2)),
                "each token's K/V row must be contiguous");
  const int64_t T = k.size(0), Hkv = k.size(1), D = k.size(2), row = Hkv * D;
  const int64_t slots = k_cache.size(0) * k_cache.size(1);
  const at::Tensor sm = slot_mapping.contiguous();
  const int64_t* sp = sm.data_ptr<int64_t>();
  for (int64_t i = 0; i < T; ++i) TORCH_CHECK(sp[i] < slots, "slot ", sp[i], " is out of the cache");
  if (quantized) {
    TORCH_CHECK(k_scale->is_contiguous() && v_scale->is_contiguous() && k_scale->scalar_type() == at::kFloat &&
                v_scale->scalar_type() == at::kFloat && k_scale->numel() == slots * Hkv &&
                v_scale->numel() == slots * Hkv, "scales must be contiguous float32 [blocks, block_size, Hkv]");
    AT_DISPATCH_FLOATING_TYPES_AND(at::ScalarType::BFloat16, k.scalar_type(), "store_kv_int8", [&] {
      auto quantize = [&](const at::Tensor& x, at::Tensor& cache, at::Tensor& scales, int64_t i) {
        const scalar_t* src = x.data_ptr<scalar_t>() + i * x.stride(0);
        int8_t* dst = cache.data_ptr<int8_t>() + sp[i] * row;
        float* sc = scales.data_ptr<float>() + sp[i] * Hkv;
        for (int64_t h = 0; h < Hkv; ++h) sc[h] = quantize_row(src + h * D, D, dst + h * D);
      };
      at::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          if (sp[i] < 0) continue;
          quantize(k, k_cache, *k_scale, i);
          quantize(v, v_cache, *v_scale, i);
        }
      });
    });
    return;
  }
  const int64_t bytes = row * k.element_size();
  auto* kc = static_cast<char*>(k_cache.data_ptr());
  auto* vc = static_cast<char*>(v_cache.data_ptr());
  const auto* kp = static_cast<const char*>(k.data_ptr());
  const auto* vp = static_cast<const char*>(v.data_ptr());
  const int64_t ks = k.stride(0) * k.element_size(), vs = v.stride(0) * v.element_size();
  at::parallel_for(0, T, 64, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      if (sp[i] < 0) continue;
      std::memcpy(kc + sp[i] * bytes, kp + i * ks, bytes);
      std::memcpy(vc + sp[i] * bytes, vp + i * vs, bytes);
    }
  });
}

}  // namespace infera
