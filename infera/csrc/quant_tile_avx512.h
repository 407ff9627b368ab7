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
// dot products on small matrices.)
template <int ENC, int SUB, int NT, int MR>
inline void tile_kernel(const BlockLayout& L, const uint8_t* const* tiles, const Activations& A, int64_t m0,
                        int64_t ahead, float (&out)[NT][MR][TILE]) {
  constexpr int64_t BLOCK = TILE * block_quant_bytes(ENC);  // a block's quants in a tile
  constexpr bool HIGH = ENC == Q5 || ENC == Q6, HALVES = SUB == SUB_HALF;  // HALVES: acc2 sums values 16-31
  const __m512i low4 = _mm512_set1_epi8(0x0F), low2 = _mm512_set1_epi8(0x03);
  const HighBits<ENC> high_bits;
  const int64_t nb = L.nb, K = L.K, sg = L.sg, nsa = L.nsa, second = L.nsb * TILE, sub1 = nb * TILE;
  const bool has_min = L.has_min;
  const int8_t* q = A.q.data();
  const float *xd = A.d.data(), *xds = A.ds.data();
  const int32_t* init = HALVES ? A.init_half.data() : A.init.data();
  const at::Half* sc[NT];  // scale array 0 of each tile; array 1 is `second` further
  const int8_t* sub[NT];   // sub-scales 0 of each tile; sub-scales 1 are `sub1` further
  for (int t = 0; t < NT; ++t) {
    sc[t] = reinterpret_cast<const at::Half*>(tiles[t] + L.tile_quant_bytes);
    sub[t] = reinterpret_cast<const int8_t*>(tiles[t] + L.tile_quant_bytes + L.tile_scale_bytes);
  }
  __m512 accf[NT][MR];
  for (int t = 0; t < NT; ++t)
    for (int m = 0; m < MR; ++m) accf[t][m] = _mm512_setzero_ps();
  for (int64_t b = 0, sb = 0, in_group = 0; b < nb; ++b) {
    __m512i acc[NT][MR], acc2[NT][MR];
    for (int m = 0; m < MR; ++m) {
      const int64_t i = (m0 + m) * nb + b;
      const __m512i start = _mm512_set1_epi32(HALVES ? init[2 * i] : init[i]);
      const __m512i start2 = HALVES ? _mm512_set1_epi32(init[2 * i + 1]) : start;
      for (int t = 0; t < NT; ++t) acc[t][m] = start, acc2[t][m] = start2;
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
    for (int t = 0; t < NT; ++t) {
      const at::Half* s0 = sc[t] + sb * TILE;
      prefetch(reinterpret_cast<const uint8_t*>(s0) + ahead);
      if (nsa > 1) prefetch(reinterpret_cast<const uint8_t*>(s0 + second) + ahead);
      __m512 d0 = nsa > 0 ? half16(s0) : _mm512_set1_ps(1.f);
      __m512 d1 = nsa > 1 ? half16(s0 + second) : _mm512_setzero_ps();
      __m512 d0_hi = d0;  // the scale of values 16-31 (HALVES)
      if constexpr (SUB != SUB_NONE) {
        const int8_t* s = sub[t] + b * TILE;
        if (b % 4 == 0) prefetch(s + ahead), prefetch(s + sub1 + ahead);
        if constexpr (HALVES) d0_hi = _mm512_mul_ps(d0, int8x16(s + sub1));
        else if (nsa > 1) d1 = _mm512_mul_ps(d1, int8x16(s + sub1));
        d0 = _mm512_mul_ps(d0, int8x16(s));
      }
      for (int m = 0; m < MR; ++m) {
        const __m512 dx = _mm512_set1_ps(xd[(m0 + m) * nb + b]);
        accf[t][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[t][m]), _mm512_mul_ps(d0, dx), accf[t][m]);
        if constexpr (ENC == T2) {
          accf[t][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc2[t][m]), _mm512_mul_ps(d1, dx), accf[t][m]);
        } else {
          if constexpr (HALVES) {
            accf[t][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc2[t][m]), _mm512_mul_ps(d0_hi, dx), accf[t][m]);
          }
          if (has_min) accf[t][m] = _mm512_fmadd_ps(d1, _mm512_set1_ps(xds[(m0 + m) * nb + b]), accf[t][m]);
        }
      }
    }
    if (++in_group == sg) in_group = 0, ++sb;
  }
  for (int t = 0; t < NT; ++t)
    for (int m = 0; m < MR; ++m) _mm512_storeu_ps(out[t][m], accf[t][m]);
}

}  // namespace infera_quant
