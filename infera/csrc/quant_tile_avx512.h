// The tile kernel of quant_gemm.cpp for AVX-512 with VNNI: a u8 x s8 dot product (vpdpbusd) of
// one 64-byte vector (4 quants of each of 16 rows) with 4 activation bytes broadcast to all lanes
// advances the 16 rows of a tile at once.
#pragma once

#include <immintrin.h>

#include <cstring>

#include "quant_gemm.h"

namespace infera_quant {

using namespace infera;

constexpr bool tile_kernel_has(int64_t, int64_t) { return true; }  // every kind of INFERA_BLOCK_KINDS

inline __m512 half16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Sub-scales as int16 pairs, one pair per row lane: (a[r], b[r]) of two int8 arrays of 16 rows.
inline __m512i subscale_pairs(const int8_t* a, const int8_t* b) {
  const __m128i va = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a));
  const __m128i vb = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b));
  return _mm512_cvtepi8_epi16(_mm256_set_m128i(_mm_unpackhi_epi8(va, vb), _mm_unpacklo_epi8(va, vb)));
}

// 16 int8 sub-scales (one per row of a tile), in float
inline __m512 int8x16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

inline __m512i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }

// The high bits of a Q5 or Q6 block (one or two vectors after its nibbles, see quant_gemm.cpp) put
// above the nibbles of nibble vector p: a rotation of each 32-bit lane takes the bits of a byte's
// value to bit 4 (and 5) of the same byte, and a mask keeps them.
template <int ENC>
struct HighBits {
  static constexpr int PLANES = ENC == Q6 ? 2 : 1;
  __m512i mask, rot_lo[4], rot_hi[4];
  HighBits() : mask(_mm512_set1_epi8(ENC == Q6 ? 0x30 : 0x10)) {
    for (int p = 0; p < 4; ++p) {  // left rotations: Q5 bit p -> 4, bit 4 + p -> 4; Q6 bits 2p.. -> 4..
      rot_lo[p] = _mm512_set1_epi32(ENC == Q6 ? (4 - 2 * p) & 31 : 4 - p);
      rot_hi[p] = _mm512_set1_epi32(ENC == Q6 ? (4 - 2 * p) & 31 : -p & 31);
    }
  }
  // lo |= the high bits of the low nibbles' values, hi |= those of the high nibbles' (h: the block's
  // high-bit vectors)
  void add(const __m512i* h, int p, __m512i& lo, __m512i& hi) const {
    lo = _mm512_ternarylogic_epi32(lo, _mm512_rolv_epi32(h[0], rot_lo[p]), mask, 0xF8);  // lo | (rot & mask)
    hi = _mm512_ternarylogic_epi32(hi, _mm512_rolv_epi32(h[PLANES - 1], rot_hi[p]), mask, 0xF8);
  }
};

// out[t][m][r]: row r of tile t times activation row m0 + m, over all blocks. Each tile's
// bytes `ahead` further on (the thread's next tiles) are prefetched as its blocks go by.
// (Layout fields are read into locals once: per-block divisions and reloads cost more than the
// dot products on small matrices.) Sub-scale layouts add each block's dot times the rows'
// sub-scales up in float over a scale group (exact products), then scale once per group: a
// group's d0 * dx * (dots - offset * term) [SUB_HALF] or d0 * dx * dots + d1 * dx * term [min],
// with the term the group's sub-scale pairs times the activations' quant sums (dpwssd).
template <int ENC, int SUB, int NT, int MR>
inline void tile_kernel(const BlockLayout& L, const uint8_t* const* tiles, const Activations& A, int64_t m0,
                        int64_t ahead, float (&out)[NT][MR][TILE]) {
  constexpr int64_t BLOCK = TILE * block_quant_bytes(ENC);  // a block's quants in a tile
  constexpr bool HIGH = ENC == Q5 || ENC == Q6, HALVES = SUB == SUB_HALF;  // HALVES: acc2 sums values 16-31
  constexpr bool GROUPED = SUB != SUB_NONE;
  const __m512i low4 = _mm512_set1_epi8(0x0F), low2 = _mm512_set1_epi8(0x03);
  const HighBits<ENC> high_bits;
  const int64_t nb = L.nb, K = L.K, sg = L.sg, nsa = L.nsa, second = L.nsb * TILE, sub1 = nb * TILE;
  const int64_t nsums = L.nsub_sums();
  const bool has_min = L.has_min;
  const int8_t* q = A.q.data();
  const float *xd = A.d.data(), *xds = A.ds.data();
  const int32_t* init = A.init.data();
  const at::Half* sc[NT];  // scale array 0 of each tile; array 1 is `second` further
  const int8_t* sub[NT];   // sub-scales 0 of each tile; sub-scales 1 are `sub1` further
  for (int t = 0; t < NT; ++t) {
    sc[t] = reinterpret_cast<const at::Half*>(tiles[t] + L.tile_quant_bytes);
    sub[t] = reinterpret_cast<const int8_t*>(tiles[t] + L.tile_quant_bytes + L.tile_scale_bytes);
  }
  __m512 accf[NT][MR], dots[NT][MR];  // dots (GROUPED): the group's sub-scaled dots so far
  for (int t = 0; t < NT; ++t)
    for (int m = 0; m < MR; ++m) accf[t][m] = dots[t][m] = _mm512_setzero_ps();
  for (int64_t b = 0, sb = 0, in_group = 0; b < nb; ++b) {
    __m512i acc[NT][MR], acc2[NT][MR];
    for (int m = 0; m < MR; ++m) {
      const __m512i start = GROUPED ? _mm512_setzero_si512() : _mm512_set1_epi32(init[(m0 + m) * nb + b]);
      for (int t = 0; t < NT; ++t) acc[t][m] = acc2[t][m] = start;
    }
    const int8_t* xb[MR];
    for (int m = 0; m < MR; ++m) xb[m] = q + (m0 + m) * K + b * 32;
    if constexpr (ENC == Q8) {
      for (int k = 0; k < 8; ++k) {
        __m512i w[NT];
        for (int t = 0; t < NT; ++t) {
          w[t] = _mm512_loadu_si512(tiles[t] + b * BLOCK + k * 64);
          prefetch(tiles[t] + ahead + b * BLOCK + k * 64);
        }
        for (int m = 0; m < MR; ++m) {
          const __m512i x = bcast4(xb[m] + 4 * k);
          for (int t = 0; t < NT; ++t) acc[t][m] = _mm512_dpbusd_epi32(acc[t][m], w[t], x);
        }
      }
    } else {
      __m512i high[NT][HighBits<ENC>::PLANES];
      if constexpr (HIGH) {
        for (int t = 0; t < NT; ++t) {
          for (int j = 0; j < HighBits<ENC>::PLANES; ++j) {
            high[t][j] = _mm512_loadu_si512(tiles[t] + b * BLOCK + 256 + j * 64);
            prefetch(tiles[t] + ahead + b * BLOCK + 256 + j * 64);
          }
        }
      }
      for (int p = 0; p < 4; ++p) {
        __m512i lo[NT], hi[NT];
        for (int t = 0; t < NT; ++t) {
          const __m512i v = _mm512_loadu_si512(tiles[t] + b * BLOCK + p * 64);
          prefetch(tiles[t] + ahead + b * BLOCK + p * 64);
          lo[t] = _mm512_and_si512(v, low4);
          hi[t] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
          if constexpr (HIGH) high_bits.add(high[t], p, lo[t], hi[t]);
        }
        for (int m = 0; m < MR; ++m) {
          const __m512i xa = bcast4(xb[m] + 4 * p), xc = bcast4(xb[m] + 16 + 4 * p);
          for (int t = 0; t < NT; ++t) {
            if constexpr (ENC == T2) {
              acc[t][m] = _mm512_dpbusd_epi32(acc[t][m], _mm512_and_si512(lo[t], low2), xa);
              acc[t][m] = _mm512_dpbusd_epi32(acc[t][m], _mm512_and_si512(hi[t], low2), xc);
              // (16-bit shifts carry the next byte's low bits in: mask again)
              acc2[t][m] = _mm512_dpbusd_epi32(acc2[t][m], _mm512_and_si512(_mm512_srli_epi16(lo[t], 2), low2), xa);
              acc2[t][m] = _mm512_dpbusd_epi32(acc2[t][m], _mm512_and_si512(_mm512_srli_epi16(hi[t], 2), low2), xc);
            } else {
              acc[t][m] = _mm512_dpbusd_epi32(acc[t][m], lo[t], xa);
              if constexpr (HALVES) acc2[t][m] = _mm512_dpbusd_epi32(acc2[t][m], hi[t], xc);
              else acc[t][m] = _mm512_dpbusd_epi32(acc[t][m], hi[t], xc);
            }
          }
        }
      }
    }
    if constexpr (GROUPED) {
      for (int t = 0; t < NT; ++t) {
        const int8_t* s = sub[t] + b * TILE;
        if (b % 4 == 0) prefetch(s + ahead), prefetch(s + sub1 + ahead);
        const __m512 s_lo = int8x16(s), s_hi = HALVES ? int8x16(s + sub1) : s_lo;
        for (int m = 0; m < MR; ++m) {
          dots[t][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[t][m]), s_lo, dots[t][m]);
          if constexpr (HALVES) dots[t][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc2[t][m]), s_hi, dots[t][m]);
        }
      }
      if (in_group == sg - 1) {
        const int64_t b0 = b - in_group;
        __m512i term[NT][MR];
        for (int t = 0; t < NT; ++t)
          for (int m = 0; m < MR; ++m) term[t][m] = _mm512_setzero_si512();
        for (int k = 0, n = group_pairs(L); k < n; ++k) {
          for (int t = 0; t < NT; ++t) {
            const auto [pa, pb] = group_pair(L, sub[t], b0, k);
            const __m512i pair = subscale_pairs(pa, pb);
            for (int m = 0; m < MR; ++m) {
              const int32_t x = sum_pair(A.bsum.data() + ((m0 + m) * nb + b0) * nsums + 2 * k);
              term[t][m] = _mm512_dpwssd_epi32(term[t][m], pair, _mm512_set1_epi32(x));
            }
          }
        }
        for (int t = 0; t < NT; ++t) {
          const at::Half* s0 = sc[t] + sb * TILE;
          prefetch(reinterpret_cast<const uint8_t*>(s0) + ahead);
          const __m512 d0 = half16(s0), d1 = nsa > 1 ? half16(s0 + second) : _mm512_setzero_ps();
          for (int m = 0; m < MR; ++m) {
            const __m512 dx = _mm512_set1_ps(xd[(m0 + m) * nb + b0]), tf = _mm512_cvtepi32_ps(term[t][m]);
            if constexpr (HALVES) dots[t][m] = _mm512_fnmadd_ps(tf, _mm512_set1_ps(float(L.offset)), dots[t][m]);
            accf[t][m] = _mm512_fmadd_ps(dots[t][m], _mm512_mul_ps(d0, dx), accf[t][m]);
            if (has_min) accf[t][m] = _mm512_fmadd_ps(tf, _mm512_mul_ps(d1, dx), accf[t][m]);
            dots[t][m] = _mm512_setzero_ps();
          }
        }
      }
    } else {
      for (int t = 0; t < NT; ++t) {
        const at::Half* s0 = sc[t] + sb * TILE;
        prefetch(reinterpret_cast<const uint8_t*>(s0) + ahead);
        if (nsa > 1) prefetch(reinterpret_cast<const uint8_t*>(s0 + second) + ahead);
        const __m512 d0 = nsa > 0 ? half16(s0) : _mm512_set1_ps(1.f);
        const __m512 d1 = nsa > 1 ? half16(s0 + second) : _mm512_setzero_ps();
        for (int m = 0; m < MR; ++m) {
          const __m512 dx = _mm512_set1_ps(xd[(m0 + m) * nb + b]);
          accf[t][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[t][m]), _mm512_mul_ps(d0, dx), accf[t][m]);
          if constexpr (ENC == T2) {
            accf[t][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc2[t][m]), _mm512_mul_ps(d1, dx), accf[t][m]);
          } else if (has_min) {
            accf[t][m] = _mm512_fmadd_ps(d1, _mm512_set1_ps(xds[(m0 + m) * nb + b]), accf[t][m]);
          }
        }
      }
    }
    if (++in_group == sg) in_group = 0, ++sb;
  }
  for (int t = 0; t < NT; ++t)
    for (int m = 0; m < MR; ++m) _mm512_storeu_ps(out[t][m], accf[t][m]);
}

}  // namespace infera_quant
