// The tile kernel of quant_gemm.cpp for AVX-512 with VNNI: a u8 x s8 dot product (vpdpbusd) of
// one 64-byte vector (4 quants of each of 16 rows) with 4 activation bytes broadcast to all lanes
// advances the 16 rows of a tile at once.
#pragma once

#include <immintrin.h>

#include <cstring>

#include "quant_gemm.h"

namespace infera_quant {

using namespace infera;

inline __m512 half16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

inline __m512i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }

// out[t][m][r]: row r of tile t times activation row m0 + m, over all blocks. Each tile's
// bytes `ahead` further on (the thread's next tiles) are prefetched as its blocks go by.
// (Layout fields are read into locals once: per-block divisions and reloads cost more than the
// dot products on small matrices.)
template <int ENC, int NT, int MR>
inline void tile_kernel(const BlockLayout& L, const uint8_t* const* tiles, const Activations& A, int64_t m0,
                        int64_t ahead, float (&out)[NT][MR][TILE]) {
  const __m512i low4 = _mm512_set1_epi8(0x0F), low2 = _mm512_set1_epi8(0x03);
  const int64_t nb = L.nb, K = L.K, sg = L.sg, nsa = L.nsa, second = L.nsb * TILE;
  const bool has_min = L.has_min;
  const int8_t* q = A.q.data();
  const float *xd = A.d.data(), *xds = A.ds.data();
  const int32_t* init = A.init.data();
  const at::Half* sc[NT];  // scale array 0 of each tile; array 1 is `second` further
  for (int t = 0; t < NT; ++t) sc[t] = reinterpret_cast<const at::Half*>(tiles[t] + L.tile_quant_bytes);
  __m512 accf[NT][MR];
  for (int t = 0; t < NT; ++t)
    for (int m = 0; m < MR; ++m) accf[t][m] = _mm512_setzero_ps();
  for (int64_t b = 0, sb = 0, in_group = 0; b < nb; ++b) {
    __m512i acc[NT][MR], acc2[NT][MR];
    for (int m = 0; m < MR; ++m) {
      const __m512i start = _mm512_set1_epi32(init[(m0 + m) * nb + b]);
      for (int t = 0; t < NT; ++t) acc[t][m] = acc2[t][m] = start;
    }
    const int8_t* xb[MR];
    for (int m = 0; m < MR; ++m) xb[m] = q + (m0 + m) * K + b * 32;
    if constexpr (ENC == Q8) {
      for (int k = 0; k < 8; ++k) {
        __m512i w[NT];
        for (int t = 0; t < NT; ++t) {
          w[t] = _mm512_loadu_si512(tiles[t] + b * 512 + k * 64);
          prefetch(tiles[t] + ahead + b * 512 + k * 64);
        }
        for (int m = 0; m < MR; ++m) {
          const __m512i x = bcast4(xb[m] + 4 * k);
          for (int t = 0; t < NT; ++t) acc[t][m] = _mm512_dpbusd_epi32(acc[t][m], w[t], x);
        }
      }
    } else {
      for (int p = 0; p < 4; ++p) {
        __m512i lo[NT], hi[NT];
        for (int t = 0; t < NT; ++t) {
          const __m512i v = _mm512_loadu_si512(tiles[t] + b * 256 + p * 64);
          prefetch(tiles[t] + ahead + b * 256 + p * 64);
          lo[t] = _mm512_and_si512(v, low4);
          hi[t] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        }
        for (int m = 0; m < MR; ++m) {
          const __m512i xa = bcast4(xb[m] + 4 * p), xc = bcast4(xb[m] + 16 + 4 * p);
          for (int t = 0; t < NT; ++t) {
            if constexpr (ENC == Q4) {
              acc[t][m] = _mm512_dpbusd_epi32(acc[t][m], lo[t], xa);
              acc[t][m] = _mm512_dpbusd_epi32(acc[t][m], hi[t], xc);
            } else {
              acc[t][m] = _mm512_dpbusd_epi32(acc[t][m], _mm512_and_si512(lo[t], low2), xa);
              acc[t][m] = _mm512_dpbusd_epi32(acc[t][m], _mm512_and_si512(hi[t], low2), xc);
              // (16-bit shifts carry the next byte's low bits in: mask again)
              acc2[t][m] = _mm512_dpbusd_epi32(acc2[t][m], _mm512_and_si512(_mm512_srli_epi16(lo[t], 2), low2), xa);
              acc2[t][m] = _mm512_dpbusd_epi32(acc2[t][m], _mm512_and_si512(_mm512_srli_epi16(hi[t], 2), low2), xc);
            }
          }
        }
      }
    }
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
        } else {
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
