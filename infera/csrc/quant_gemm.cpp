// Matrix products with block-quantized weights on CPU (GGUF Q8_0, Q4_0/1, Q5_0/1, Q4_K, Q5_K, Q6_K
// and infera's formats).
//
// Layout (built by infera/quant/layout.py): output rows are taken 16 at a time ("tiles") and the
// inputs in blocks of 32. For each block of a tile, 64-byte vectors hold 4 consecutive quants of
// each of the 16 rows side by side (int32 lane r = row r), so one u8 x s8 VNNI dot product
// (vpdpbusd) with 4 activation bytes broadcast to all lanes advances 16 rows at once and a block
// ends with the 16 rows' integer dots in the 16 lanes: no horizontal sums, no padding along K.
// After the quants of a tile come its fp16 scale arrays, [array][scale index][16 rows], one scale
// per `sg` blocks, then its int8 sub-scales, [j][block][16 rows], if any.
//
// Encodings: Q8 = one u8 per weight (int8 + 128), vector k of a block holding values 4k..4k+3;
// Q4 = a nibble per weight, vector p holding bytes 4p..4p+3 of the row's 16-byte block in GGUF
// order (low nibbles: values 4p.., high: 16+4p..); T2 = the same nibbles, each holding two trits
// (t1 + 1) | (t2 + 1) << 2; Q5, Q6 = the nibbles, then the quants' bit 4 (and 5) in one (Q5) or two
// (Q6) more vectors: byte i of lane r holds the high bits of the row's values 4p + i, p = 0..3 --
// Q5: of the low nibbles' value in bit p, of the high nibbles' (16 + 4p + i) in bit 4 + p; Q6: of
// the low nibbles' in bits 2p, 2p + 1 of the first vector, of the high nibbles' in the second.
// A weight is d * (q - offset) [+ m] (Q8, Q4, Q5, Q6) or a1 * t1 + a2 * t2 (T2), where d and m are
// the fp16 scales times the block's int8 sub-scales (SUB_BLOCK: d * s0, m * s1; SUB_HALF: d * s0
// for values 0-15, d * s1 for 16-31), products exact in float for GGUF's 6- and 8-bit sub-scales.
//
// Activations are quantized to int8 per block of 32 (as llama.cpp's q8_0), so block b adds
// d_w * d_x * (sum q_w q_x - offset * sum q_x) [+ m * d_x * sum q_x] to each row; for layouts with
// sub-scales (K-quants) per scale group of sg blocks (as its q8_K), so a group adds
// d0 * d_x * sum_b s0_b dot_b + d1 * d_x * sum_b s1_b sum_b (SUB_BLOCK's min; SUB_HALF: the offset
// times the sub-scaled quant sums comes off the first term), the sub-scales applied to integers. Batches of
// AMX_MIN_ROWS rows or more go to quant_gemm_amx.cpp where the CPU has AMX. The tile kernels:
// quant_tile_avx512.h (VNNI) and quant_tile_avx2.h (maddubs, a tile as two halves of 8 rows; for
// batches its rows kernel: a block unpacked once for up to 96 activation rows); the scalar build
// sums row by row.
#include <ATen/Parallel.h>

#include "ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "quant_gemm.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include "quant_tile_avx512.h"
#define INFERA_VNNI 1
#define INFERA_TILE_KERNEL 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include "quant_tile_avx2.h"
#define INFERA_AVX2 1
#define INFERA_TILE_KERNEL 1
#endif

namespace {

using namespace infera;
using namespace infera_quant;
using Layout = BlockLayout;

// Quant e (0-31) of block b of row r of a tile, as stored (unsigned, high bits included).
inline int quant(const Layout& L, const uint8_t* tile, int64_t r, int64_t b, int e) {
  const uint8_t* block = tile + b * TILE * L.bbytes;
  const int i = L.enc == Q8 ? e : e % 16, h = e / 16, p = i / 4;
  const uint8_t byte = block[p * 64 + 4 * r + i % 4];
  if (L.enc == Q8) return byte;
  const int q = h ? byte >> 4 : byte & 15;
  if (L.enc == Q5) return q | ((block[256 + 4 * r + i % 4] >> (4 * h + p)) & 1) << 4;
  if (L.enc == Q6) return q | ((block[256 + 64 * h + 4 * r + i % 4] >> (2 * p)) & 3) << 4;
  return q;
}

// Scale array a of block b for row r of a tile, times its sub-scale for value e of the block.
inline float scale(const Layout& L, const uint8_t* tile, int64_t a, int64_t r, int64_t b, int e) {
  const float s = float(L.scales(tile, a, b)[r]);
  if (L.sub == SUB_BLOCK) return s * float(L.sub_scales(tile, a, b)[r]);
  if (L.sub == SUB_HALF && a == 0) return s * float(L.sub_scales(tile, e / 16, b)[r]);
  return s;
}

// Value of weight (n, k), in float: the reference the fast paths are tested against.
float weight_value(const Layout& L, const uint8_t* w, int64_t n, int64_t k) {
  const uint8_t* tile = w + (n / TILE) * L.tile_bytes;
  const int64_t r = n % TILE, b = k / 32;
  const int e = k % 32, q = quant(L, tile, r, b, e);
  const float d = L.nsa > 0 ? scale(L, tile, 0, r, b, e) : 1.f;
  const float s1 = L.nsa > 1 ? scale(L, tile, 1, r, b, e) : 0.f;
  if (L.enc == T2) return d * float((q & 3) - 1) + s1 * float((q >> 2) - 1);
  return d * float(q - L.offset) + (L.has_min ? s1 : 0.f);
}

inline void load_block(const float* x, float* out) { std::memcpy(out, x, 32 * sizeof(float)); }
inline void load_block(const at::BFloat16* x, float* out) {
#if defined(INFERA_VNNI)
  for (int h = 0; h < 2; ++h) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16 * h));
    _mm512_storeu_ps(out + 16 * h, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)));
  }
#elif defined(INFERA_AVX2)
  for (int h = 0; h < 4; ++h) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + 8 * h));
    _mm256_storeu_ps(out + 8 * h, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16)));
  }
#else
  for (int e = 0; e < 32; ++e) out[e] = float(x[e]);
#endif
}

// The largest |v| of 32 floats.
inline float block_amax(const float* v) {
#if defined(INFERA_VNNI)
  return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(v)), _mm512_abs_ps(_mm512_loadu_ps(v + 16))));
#elif defined(INFERA_AVX2)
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 m = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(v + 8 * i)));
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  return _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
#else
  float amax = 0.f;
  for (int e = 0; e < 32; ++e) amax = std::max(amax, std::fabs(v[e]));
  return amax;
#endif
}

// int8 quants of 32 floats at scale amax / 127 (round to nearest even); returns their sum.
inline int32_t quantize_block(const float* v, float amax, int8_t* out) {
  const float inv = amax > 0 ? 127.f / amax : 0.f;
#if defined(INFERA_VNNI)
  const __m512 id = _mm512_set1_ps(inv);
  const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(v), id));
  const __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(v + 16), id));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtepi32_epi8(qa));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16), _mm512_cvtepi32_epi8(qb));
  return _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
#elif defined(INFERA_AVX2)
  const __m256 id = _mm256_set1_ps(inv);
  __m256i q[4], total = _mm256_setzero_si256();
  for (int i = 0; i < 4; ++i) {
    q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + 8 * i), id));  // (nearest even, as nearbyint)
    total = _mm256_add_epi32(total, q[i]);
  }
  // packs interleave 4-value groups across the 128-bit lanes: put them back in order
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),
                      _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
  t4 = _mm_add_epi32(t4, _mm_unpackhi_epi64(t4, t4));
  return _mm_cvtsi128_si32(_mm_add_epi32(t4, _mm_shuffle_epi32(t4, 1)));
#else
  int32_t total = 0;
  for (int e = 0; e < 32; ++e) {
    const int q = int(std::nearbyint(v[e] * inv));
    out[e] = int8_t(q);
    total += q;
  }
  return total;
#endif
}

// Quantize activation row x into row m of A (one scale per block, or per scale group where L has
// sub-scales); `mul` (per input, optional) scales it first.
template <typename T>
void quantize_row(const T* x, const float* mul, int64_t m, float threshold, const Layout& L, Activations& A) {
  const int64_t K = A.K, nb = A.nb, group = L.sub == SUB_NONE ? 1 : L.sg, nsums = L.nsub_sums();
  int8_t* q = A.q.data() + m * K;
  float* xf = A.xf.empty() ? nullptr : A.xf.data() + m * K;
  alignas(64) float blk[8 * 32];
  for (int64_t b0 = 0; b0 < nb; b0 += group) {
    float amax = 0.f;
    for (int64_t j = 0; j < group; ++j) {
      const int64_t b = b0 + j;
      float* v = blk + 32 * j;
      load_block(x + b * 32, v);
      if (mul) {
        for (int e = 0; e < 32; ++e) v[e] *= mul[b * 32 + e];
      }
      if (xf) std::memcpy(xf + b * 32, v, 32 * sizeof(float));
      if (threshold > 0) {
        for (int e = 0; e < 32; ++e) {
          if (std::fabs(v[e]) > threshold) {
            A.outliers[m].push_back(int32_t(b * 32 + e));
            v[e] = 0.f;
          }
        }
      }
      amax = std::max(amax, block_amax(v));
    }
    const float d = amax / 127.f;
    for (int64_t j = 0; j < group; ++j) {
      const int64_t b = b0 + j, i = m * nb + b;
      const int32_t sum = quantize_block(blk + 32 * j, amax, q + b * 32);
      A.d[i] = d;
      A.ds[i] = d * float(sum);
      A.init[i] = int32_t(-L.offset * sum);
      A.sum[i] = sum;
      if (nsums == 1) A.bsum[i] = int16_t(sum);
      if (nsums == 2) {
        int32_t low = 0;
        for (int e = 0; e < 16; ++e) low += q[b * 32 + e];
        A.bsum[2 * i] = int16_t(low);
        A.bsum[2 * i + 1] = int16_t(sum - low);
      }
    }
  }
}

// Sub-scale layouts, row r of a tile, in the tile kernels' op order: per scale group, the sum in
// float of each block's (SUB_HALF: half block's) integer dot times its sub-scale (exact: below
// 2^24), and the int32 sum of the min's sub-scales (SUB_BLOCK) or of the sub-scales (SUB_HALF,
// times the offset) times the quant sums; then the group's two products.
float row_dot_groups(const Layout& L, const uint8_t* tile, int64_t r, const Activations& A, int64_t m) {
  const bool halves = L.sub == SUB_HALF;
  const int64_t ns = L.nsub_sums();
  float total = 0.f;
  for (int64_t b0 = 0; b0 < L.nb; b0 += L.sg) {
    float dots = 0.f;
    int32_t sums = 0;
    for (int64_t b = b0; b < b0 + L.sg; ++b) {
      int32_t dot[2] = {0, 0};
      for (int e = 0; e < 32; ++e) dot[halves && e >= 16] += quant(L, tile, r, b, e) * A.q[m * L.K + b * 32 + e];
      const int32_t s0 = L.sub_scales(tile, 0, b)[r], s1 = L.nsub > 1 ? L.sub_scales(tile, 1, b)[r] : 0;
      const int16_t* bs = A.bsum.data() + (m * L.nb + b) * ns;
      dots = std::fma(float(dot[0]), float(s0), dots);
      if (halves) dots = std::fma(float(dot[1]), float(s1), dots);
      sums += halves ? s0 * bs[0] + s1 * bs[1] : L.has_min ? s1 * bs[0] : 0;
    }
    if (halves) dots = std::fma(-float(sums), float(L.offset), dots);
    const float dx = A.d[m * L.nb + b0];
    total = std::fma(dots, float(L.scales(tile, 0, b0)[r]) * dx, total);
    if (L.has_min) total = std::fma(float(sums), float(L.scales(tile, 1, b0)[r]) * dx, total);
  }
  return total;
}

// The same sums for CPUs without AVX2 or AVX512-VNNI, one row at a time.
float row_dot_generic(const Layout& L, const uint8_t* w, int64_t n, const Activations& A, int64_t m) {
  const uint8_t* tile = w + (n / TILE) * L.tile_bytes;
  const int64_t r = n % TILE;
  if (L.sub != SUB_NONE) return row_dot_groups(L, tile, r, A, m);
  float total = 0.f;
  for (int64_t b = 0; b < L.nb; ++b) {
    const int64_t i = m * L.nb + b;
    int32_t dot1 = A.init[i], dot2 = dot1;  // T2: the first and second trits
    for (int e = 0; e < 32; ++e) {
      const int x = A.q[m * L.K + b * 32 + e], q = quant(L, tile, r, b, e);
      if (L.enc == T2) {
        dot1 += (q & 3) * x;
        dot2 += (q >> 2) * x;
      } else {
        dot1 += q * x;
      }
    }
    const float dx = A.d[i];
    const float d0 = L.nsa > 0 ? scale(L, tile, 0, r, b, 0) : 1.f;
    total += d0 * dx * float(dot1);
    if (L.enc == T2) total += scale(L, tile, 1, r, b, 0) * dx * float(dot2);
    if (L.has_min) total += scale(L, tile, 1, r, b, 0) * A.ds[i];
  }
  return total;
}

void check_packed(const at::Tensor& w, const Layout& L, int64_t N) {
  TORCH_CHECK(w.dim() == 2 && w.size(1) == L.row_bytes && w.scalar_type() == at::kByte && w.is_contiguous(),
              "packed weight must be contiguous uint8 [rows, ", L.row_bytes, "], got ", w.sizes(), " ",
              w.scalar_type());
  TORCH_CHECK(w.size(0) % TILE == 0 && N <= w.size(0) && N > w.size(0) - TILE,
              "packed weight has ", w.size(0), " rows (a multiple of 16) for ", N, " outputs");
}

struct Extras {  // what is added to the int8 product in float
  const float* bias = nullptr;
  const float* row_shift = nullptr;  // per-IC groups: [group][m] added to every row of the group
  int64_t ic_group = 0;              // per-IC groups: rows per group (activation rows [group * M, ...))
  const int32_t* indptr = nullptr;
  const int32_t* indices = nullptr;
  const float* values = nullptr;
  bool outliers = false;
};

// Writes rows [n0, n0 + 16) x activation row m of y from the 16 lane sums.
template <typename OutT>
inline void store_tile(float* sums, const Layout& L, const uint8_t* w, const Activations& A, const Extras& ex,
                       int64_t n0, int64_t m, int64_t M, int64_t N, OutT* y) {
  const int64_t rows = std::min<int64_t>(TILE, N - n0);
  if (ex.row_shift) {
    const float shift = ex.row_shift[(n0 / ex.ic_group) * M + m];
    for (int64_t r = 0; r < rows; ++r) sums[r] += shift;
  }
  if (ex.outliers || ex.indptr) {
    const float* xf = A.xf.data() + m * L.K;
    for (int64_t r = 0; r < rows; ++r) {
      for (int32_t k : A.outliers[m]) sums[r] += xf[k] * weight_value(L, w, n0 + r, k);
      if (ex.indptr) {
        for (int32_t i = ex.indptr[n0 + r]; i < ex.indptr[n0 + r + 1]; ++i) sums[r] += ex.values[i] * xf[ex.indices[i]];
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) y[m * N + n0 + r] = OutT(sums[r] + (ex.bias ? ex.bias[n0 + r] : 0.f));
}

// The scalar path: row by row (where no tile kernel is built for L's encoding and sub-scales).
template <typename OutT>
void run_rows_generic(const Layout& L, const uint8_t* w, const Activations& A, const Extras& ex, int64_t M,
                      int64_t N, OutT* y) {
  const int64_t ntiles = (N + TILE - 1) / TILE;
  at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    float sums[TILE];
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t m = 0; m < M; ++m) {
        const int64_t base = ex.ic_group ? (t * TILE / ex.ic_group) * M : 0;
        for (int64_t r = 0; r < TILE; ++r)
          sums[r] = t * TILE + r < N ? row_dot_generic(L, w, t * TILE + r, A, base + m) : 0.f;
        store_tile(sums, L, w, A, ex, t * TILE, m, M, N, y);
      }
    }
  });
}

#ifdef INFERA_TILE_KERNEL
// The tile kernel of L's encoding and sub-scales (tile_kernel_has(L.enc, L.sub) holds).
template <int NT, int MR>
inline void call_tile_kernel(const Layout& L, const uint8_t* const* tiles, const Activations& A, int64_t m0,
                             int64_t ahead, float (&out)[NT][MR][TILE]) {
#define INFERA_KIND(ENC, SUB)                                                          \
  if constexpr (tile_kernel_has(ENC, SUB)) {                                           \
    if (L.enc == ENC && L.sub == SUB) return tile_kernel<ENC, SUB, NT, MR>(L, tiles, A, m0, ahead, out); \
  }
  INFERA_BLOCK_KINDS(INFERA_KIND)
#undef INFERA_KIND
}
#endif

#ifdef INFERA_AVX2
// Batches on AVX2 (rows_kernel_has(L.enc, L.sub)): the activation rows in chunks of up to 96 (a
// chunk's float sums stay in L1) and about 1 MiB, each copied block-major into a panel (which stays
// in L2), then the threads' tiles, one at a time, against the panel.
template <typename OutT>
void run_tile_rows(const Layout& L, const uint8_t* w, const Activations& A, const Extras& ex, int64_t M, int64_t N,
                   OutT* y) {
  const int64_t ntiles = (N + TILE - 1) / TILE, groups = ex.ic_group ? (N + ex.ic_group - 1) / ex.ic_group : 1;
  const int64_t row_bytes = L.K + L.nb * int64_t(sizeof(RowBlock) + L.nsub_sums() * sizeof(int16_t));
  const int64_t chunk = std::clamp<int64_t>((1 << 20) / (groups * row_bytes), 4, RowPanel::MAX_ROWS);
  static thread_local RowPanel buffer;  // reused between calls
  RowPanel& panel = buffer;             // (the caller's, in every thread)
  for (int64_t mc = 0; mc < M; mc += chunk) {
    const int64_t rows = std::min(M - mc, chunk);
    panel.resize(L, groups * rows);
    at::parallel_for(0, L.nb, 1, [&](int64_t b0, int64_t b1) { panel.fill(L, A, M, mc, rows, b0, b1); });
    at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
      alignas(64) float sums[RowPanel::MAX_ROWS * TILE];
      for (int64_t t = t0; t < t1; ++t) {
        // the output lines this tile writes, fetched while it computes (a large y misses the caches)
        for (int64_t m = 0; m < rows; ++m) _mm_prefetch(reinterpret_cast<const char*>(y + (mc + m) * N + t * TILE), _MM_HINT_T0);
        const int64_t row0 = ex.ic_group ? (t * TILE / ex.ic_group) * rows : 0;  // this group's activations
#define INFERA_KIND(ENC, SUB)                                                                          \
  if constexpr (rows_kernel_has(ENC, SUB)) {                                                          \
    if (L.enc == ENC && L.sub == SUB) rows_kernel<ENC, SUB>(L, w + t * L.tile_bytes, panel, row0, rows, sums); \
  }
        INFERA_BLOCK_KINDS(INFERA_KIND)
#undef INFERA_KIND
        for (int64_t m = 0; m < rows; ++m) store_tile(sums + m * TILE, L, w, A, ex, t * TILE, mc + m, M, N, y);
      }
    });
  }
}
#endif

template <typename OutT>
void run_tiles(const Layout& L, const uint8_t* w, const Activations& A, const Extras& ex, int64_t M, int64_t N,
               OutT* y) {
#ifdef INFERA_TILE_KERNEL
  if (!tile_kernel_has(L.enc, L.sub)) return run_rows_generic(L, w, A, ex, M, N, y);
#ifdef INFERA_AVX2
  if (M > 1 && rows_kernel_has(L.enc, L.sub)) return run_tile_rows(L, w, A, ex, M, N, y);
#endif
  const int64_t ntiles = (N + TILE - 1) / TILE;
  // two accumulators: trits, sub-scales per 16
  const bool two_acc = L.enc == T2 || L.sub == SUB_HALF;
#if defined(INFERA_VNNI)
  // 4 tiles x 1 row when decoding one sequence, 2 tiles x 4 rows (2 x 2 with two accumulators) for batches
  const int nt_max = M == 1 ? 4 : 2;
#else  // AVX2 (8 rows a register): 2 tiles x 1 row in one pass, 1 tile x 4 rows a pass per half (measured;
       // batches of the other encodings than trits take run_tile_rows)
  const int nt_max = M == 1 ? 2 : 1;
#endif
  const int mr_max = M == 1 ? 1 : (two_acc ? 2 : 4);
  const int64_t units = (ntiles + nt_max - 1) / nt_max;
  // activation rows in chunks of about 256 KiB, so a chunk stays in L2 while the thread's tiles pass
  const int64_t m_chunk = std::max<int64_t>(4, (256 * 1024 / L.K) / 4 * 4);
  at::parallel_for(0, units, 1, [&](int64_t u0, int64_t u1) {
    for (int64_t mc = 0; mc < M; mc += m_chunk) {
      const int64_t m_end = std::min(M, mc + m_chunk);
      for (int64_t t = u0 * nt_max; t < std::min(ntiles, u1 * nt_max);) {
        const int nt = ntiles - t >= nt_max ? nt_max : ntiles - t >= 2 ? 2 : 1;
        const uint8_t* tiles[4];
        for (int i = 0; i < nt; ++i) tiles[i] = w + (t + i) * L.tile_bytes;
        const int64_t ahead = nt * L.tile_bytes;  // (prefetches past the weights' end do not fault)
        for (int64_t m0 = mc; m0 < m_end;) {
          const int mr = m_end - m0 >= mr_max ? mr_max : m_end - m0 >= 2 ? 2 : 1;
          const int64_t base = ex.ic_group ? (t * TILE / ex.ic_group) * M : 0;  // this group's activations
          auto emit = [&](auto& accf, int tn, int mn) {
            for (int i = 0; i < tn; ++i) {
              for (int m = 0; m < mn; ++m) store_tile(accf[i][m], L, w, A, ex, (t + i) * TILE, m0 + m, M, N, y);
            }
          };
#define INFERA_TILE(NT, MR)                                          \
  if (nt == NT && mr == MR) {                                        \
    alignas(64) float accf[NT][MR][TILE];                            \
    call_tile_kernel<NT, MR>(L, tiles, A, base + m0, ahead, accf);   \
    emit(accf, NT, MR);                                              \
  }
          INFERA_TILE(4, 1) else INFERA_TILE(2, 4) else INFERA_TILE(2, 2) else INFERA_TILE(2, 1)
          else INFERA_TILE(1, 4) else INFERA_TILE(1, 2) else INFERA_TILE(1, 1)
#undef INFERA_TILE
          m0 += mr;
        }
        t += nt;
      }
    }
  });
#else
  run_rows_generic(L, w, A, ex, M, N, y);
#endif
}

}  // namespace

namespace infera {

// y = x @ W^T (+ bias) (+ sparse @ x) for x [M, K] (float32 or bfloat16) and packed W (N outputs).
// `threshold` > 0 keeps inputs with |x| above it out of the int8 product and adds them in float
// (LLM.int8()'s mixed decomposition); indptr/indices/values add an exact CSR term.
// Per-IC groups (ic_scale/ic_min [G, K], ic_group rows each): W[n, k] = s[g, k] * q[n, k] + m[g, k] for
// g = n / ic_group, computed as the unscaled quants times x * s[g], plus x . m[g].
at::Tensor gemm(const at::Tensor& x, const at::Tensor& w, const BlockLayout& L, int64_t N,
                const c10::optional<at::Tensor>& bias, double threshold, const c10::optional<at::Tensor>& indptr,
                const c10::optional<at::Tensor>& indices, const c10::optional<at::Tensor>& values,
                const c10::optional<at::Tensor>& ic_scale, const c10::optional<at::Tensor>& ic_min, int64_t ic_group) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == L.K, "x must be [M, ", L.K, "], got ", x.sizes());
  check_packed(w, L, N);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 || x.scalar_type() == at::kFloat, "x must be float32 or bfloat16");
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0), K = L.K;
  const bool sparse = indptr.has_value();
  if (M >= AMX_MIN_ROWS && !ic_scale.has_value() && !sparse && amx_available()) return gemm_amx(xc, w, L, N, bias);
  static thread_local Activations buffers;  // reused between calls
  Activations& A = buffers;
  const bool ic = ic_scale.has_value();
  at::Tensor ics, icm, shift;
  int64_t groups = 1;
  if (ic) {
    ics = ic_scale->to(at::kFloat).contiguous();
    icm = ic_min->to(at::kFloat).contiguous();
    groups = ics.size(0);
    TORCH_CHECK(ics.dim() == 2 && ics.size(1) == K && icm.sizes() == ics.sizes(), "ic_scale/ic_min must be [G, K]");
    TORCH_CHECK(ic_group > 0 && ic_group % 64 == 0 && groups * ic_group >= N, "per-IC groups of ", ic_group,
                " rows must be a multiple of 64 and cover ", N, " rows");
    TORCH_CHECK(threshold == 0 && !sparse, "per-IC groups take no outliers or sparse terms");
    shift = at::matmul(icm, xc.to(at::kFloat).t()).contiguous();  // [G, M]
  }
  A.resize(groups * M, L, threshold > 0 || sparse);
  at::parallel_for(0, groups * M, 4, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      const int64_t g = i / M, m = i % M;
      const float* mul = ic ? ics.data_ptr<float>() + g * K : nullptr;
      if (bf16) quantize_row(xc.data_ptr<at::BFloat16>() + m * K, mul, i, float(threshold), L, A);
      else quantize_row(xc.data_ptr<float>() + m * K, mul, i, float(threshold), L, A);
    }
  });
  Extras ex;
  if (ic) {
    ex.row_shift = shift.data_ptr<float>();
    ex.ic_group = ic_group;
  }
  const at::Tensor bf = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor ipt = sparse ? indptr->to(at::kInt).contiguous() : at::Tensor();
  const at::Tensor ixt = sparse ? indices->to(at::kInt).contiguous() : at::Tensor();
  const at::Tensor ivt = sparse ? values->to(at::kFloat).contiguous() : at::Tensor();
  if (bf.defined()) ex.bias = bf.data_ptr<float>();
  if (sparse) {
    ex.indptr = ipt.data_ptr<int32_t>();
    ex.indices = ixt.data_ptr<int32_t>();
    ex.values = ivt.data_ptr<float>();
  }
  for (int64_t m = 0; m < M; ++m) ex.outliers |= !A.outliers[m].empty();
  at::Tensor y = at::empty({M, N}, xc.options());
  const uint8_t* wp = w.data_ptr<uint8_t>();
  if (bf16) run_tiles(L, wp, A, ex, M, N, y.data_ptr<at::BFloat16>());
  else run_tiles(L, wp, A, ex, M, N, y.data_ptr<float>());
  return y;
}

// Rows `ids` of W (N outputs) dequantized to `dtype`: an embedding lookup, or all rows.
at::Tensor dequantize(const at::Tensor& w, const BlockLayout& L, int64_t N, const c10::optional<at::Tensor>& ids,
                      at::ScalarType dtype) {
  check_packed(w, L, N);
  const at::Tensor idx = ids.has_value() ? ids->to(at::kLong).contiguous() : at::arange(N, at::kLong);
  const int64_t R = idx.numel(), K = L.K;
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) TORCH_CHECK(ip[r] >= 0 && ip[r] < N, "row index ", ip[r], " out of range");
  at::Tensor out = at::empty({R, K}, at::kFloat);
  float* op = out.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t k = 0; k < K; ++k) op[r * K + k] = weight_value(L, wp, ip[r], k);
    }
  });
  return dtype == at::kFloat ? out : out.to(dtype);
}

}  // namespace infera
