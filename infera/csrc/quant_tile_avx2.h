// The tile kernel of quant_gemm.cpp for AVX2 (x86-64-v3: AVX2, FMA, F16C; no VNNI, no AVX-512).
// A 64-byte vector of the layout is two 32-byte halves, rows 0-7 and rows 8-15 of the tile, and
// vpdpbusd becomes maddubs (u8 x s8 products, pairs summed in int16) then madd with ones (pairs of
// int16 summed in int32), which leaves the same integer in each lane:
// - Q4 and T2 quants (<= 15) never saturate: a block adds its 16 products per int16 lane there
//   (16 * 15 * 127 < 2^15) and widens them once;
// - Q8 quants (u8 up to 255) would: they run as signed weights w = q - 128 (q xor 0x80),
//   maddubs(|w|, x * sign(w)) (|w| <= 128, |x| <= 127), widened at every vector, the accumulator
//   starting 128 * sum(x) higher.
// The float epilogue is the AVX-512 kernel's op for op, so the two give bitwise identical results.
#pragma once

#include <immintrin.h>

#include <cstring>

#include "quant_gemm.h"

namespace infera_quant {

using namespace infera;

inline __m256 half8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }

// One pass over all blocks for half H (0 or 1) of each of the NT tiles, or for both halves when
// H == 2 (NH "half tiles" of 8 rows, each with MR accumulators in registers). The first halves
// prefetch the tiles' next bytes, `ahead` further on.
template <int ENC, int NT, int MR, int H>
inline void half_pass(const BlockLayout& L, const uint8_t* const* tiles, const Activations& A, int64_t m0,
                      int64_t ahead, float (&out)[NT][MR][TILE]) {
  constexpr int NH = H == 2 ? 2 * NT : NT;
  const __m256i low4 = _mm256_set1_epi8(0x0F), low2 = _mm256_set1_epi8(0x03), ones = _mm256_set1_epi16(1);
  const int64_t nb = L.nb, K = L.K, sg = L.sg, nsa = L.nsa, second = L.nsb * TILE;
  const bool has_min = L.has_min;
  const int8_t* q = A.q.data();
  const float *xd = A.d.data(), *xds = A.ds.data();
  const int32_t *init = A.init.data(), *xsum = A.sum.data();
  const uint8_t* wq[NH];   // half i's quants: the 32 bytes at 32 * h in each 64-byte vector
  const at::Half* sc[NH];  // its scale array 0 (8 rows at 8 * h); array 1 is `second` further
  bool lead[NH];           // whether it is a first half (which prefetches)
  for (int i = 0; i < NH; ++i) {
    const int t = H == 2 ? i / 2 : i, h = H == 2 ? i % 2 : H;
    wq[i] = tiles[t] + 32 * h;
    sc[i] = reinterpret_cast<const at::Half*>(tiles[t] + L.tile_quant_bytes) + 8 * h;
    lead[i] = h == 0;
  }
  __m256 accf[NH][MR];
  for (int i = 0; i < NH; ++i)
    for (int m = 0; m < MR; ++m) accf[i][m] = _mm256_setzero_ps();
  for (int64_t b = 0, sb = 0, in_group = 0; b < nb; ++b) {
    __m256i acc[NH][MR], acc2[NH][MR];
    __m256i start[MR];
    const int8_t* xb[MR];
    for (int m = 0; m < MR; ++m) {
      const int64_t j = (m0 + m) * nb + b;
      start[m] = _mm256_set1_epi32(ENC == Q8 ? init[j] + 128 * xsum[j] : init[j]);
      xb[m] = q + (m0 + m) * K + b * 32;
    }
    if constexpr (ENC == Q8) {
      for (int i = 0; i < NH; ++i)
        for (int m = 0; m < MR; ++m) acc[i][m] = start[m];
      for (int k = 0; k < 8; ++k) {
        __m256i w[NH], aw[NH];
        for (int i = 0; i < NH; ++i) {
          w[i] = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq[i] + b * 512 + k * 64)),
                                  _mm256_set1_epi8(char(0x80)));
          if (lead[i]) prefetch(wq[i] + ahead + b * 512 + k * 64);
          aw[i] = _mm256_abs_epi8(w[i]);
        }
        for (int m = 0; m < MR; ++m) {
          const __m256i x = bcast4(xb[m] + 4 * k);
          for (int i = 0; i < NH; ++i) {
            const __m256i p = _mm256_maddubs_epi16(aw[i], _mm256_sign_epi8(x, w[i]));
            acc[i][m] = _mm256_add_epi32(acc[i][m], _mm256_madd_epi16(p, ones));
          }
        }
      }
    } else {
      for (int i = 0; i < NH; ++i)
        for (int m = 0; m < MR; ++m) acc[i][m] = acc2[i][m] = _mm256_setzero_si256();  // int16 sums
      for (int p = 0; p < 4; ++p) {
        __m256i lo[NH], hi[NH];
        for (int i = 0; i < NH; ++i) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq[i] + b * 256 + p * 64));
          if (lead[i]) prefetch(wq[i] + ahead + b * 256 + p * 64);
          lo[i] = _mm256_and_si256(v, low4);
          hi[i] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
        }
        for (int m = 0; m < MR; ++m) {
          const __m256i xa = bcast4(xb[m] + 4 * p), xc = bcast4(xb[m] + 16 + 4 * p);
          for (int i = 0; i < NH; ++i) {
            if constexpr (ENC == Q4) {
              acc[i][m] = _mm256_add_epi16(acc[i][m], _mm256_add_epi16(_mm256_maddubs_epi16(lo[i], xa),
                                                                       _mm256_maddubs_epi16(hi[i], xc)));
            } else {
              auto trits = [&](__m256i a, __m256i c) {  // (16-bit shifts carry the next byte's bits in: mask)
                return _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(a, low2), xa),
                                        _mm256_maddubs_epi16(_mm256_and_si256(c, low2), xc));
              };
              acc[i][m] = _mm256_add_epi16(acc[i][m], trits(lo[i], hi[i]));
              acc2[i][m] = _mm256_add_epi16(acc2[i][m], trits(_mm256_srli_epi16(lo[i], 2), _mm256_srli_epi16(hi[i], 2)));
            }
          }
        }
      }
      for (int i = 0; i < NH; ++i) {
        for (int m = 0; m < MR; ++m) {
          acc[i][m] = _mm256_add_epi32(start[m], _mm256_madd_epi16(acc[i][m], ones));
          if constexpr (ENC == T2) acc2[i][m] = _mm256_add_epi32(start[m], _mm256_madd_epi16(acc2[i][m], ones));
        }
      }
    }
    for (int i = 0; i < NH; ++i) {
      const at::Half* s0 = sc[i] + sb * TILE;
      if (lead[i]) {
        prefetch(reinterpret_cast<const uint8_t*>(s0) + ahead);
        if (nsa > 1) prefetch(reinterpret_cast<const uint8_t*>(s0 + second) + ahead);
      }
      const __m256 d0 = nsa > 0 ? half8(s0) : _mm256_set1_ps(1.f);
      const __m256 d1 = nsa > 1 ? half8(s0 + second) : _mm256_setzero_ps();
      for (int m = 0; m < MR; ++m) {
        const __m256 dx = _mm256_set1_ps(xd[(m0 + m) * nb + b]);
        accf[i][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[i][m]), _mm256_mul_ps(d0, dx), accf[i][m]);
        if constexpr (ENC == T2) {
          accf[i][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc2[i][m]), _mm256_mul_ps(d1, dx), accf[i][m]);
        } else {
          if (has_min) accf[i][m] = _mm256_fmadd_ps(d1, _mm256_set1_ps(xds[(m0 + m) * nb + b]), accf[i][m]);
        }
      }
    }
    if (++in_group == sg) in_group = 0, ++sb;
  }
  for (int i = 0; i < NH; ++i) {
    const int t = H == 2 ? i / 2 : i, h = H == 2 ? i % 2 : H;
    for (int m = 0; m < MR; ++m) _mm256_storeu_ps(out[t][m] + 8 * h, accf[i][m]);
  }
}

// out[t][m][r]: row r of tile t times activation row m0 + m, over all blocks. Both halves of the
// tiles in one pass when their accumulators fit the 16 registers, else one pass per half (the
// second reads the tiles from cache; rows are independent, so the sums are the same).
// The kinds this kernel runs (the others take quant_gemm.cpp's rows path).
constexpr bool tile_kernel_has(int64_t enc, int64_t sub) { return sub == SUB_NONE && enc <= T2; }

template <int ENC, int SUB, int NT, int MR>
inline void tile_kernel(const BlockLayout& L, const uint8_t* const* tiles, const Activations& A, int64_t m0,
                        int64_t ahead, float (&out)[NT][MR][TILE]) {
  if constexpr (2 * NT * MR * (ENC == T2 ? 2 : 1) <= 4) {
    half_pass<ENC, NT, MR, 2>(L, tiles, A, m0, ahead, out);
  } else {
    half_pass<ENC, NT, MR, 0>(L, tiles, A, m0, ahead, out);
    half_pass<ENC, NT, MR, 1>(L, tiles, A, m0, ahead, out);
  }
}

}  // namespace infera_quant
