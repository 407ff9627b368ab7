// The tile kernel of quant_gemm.cpp for AVX2 (x86-64-v3: AVX2, FMA, F16C; no VNNI, no AVX-512).
// A 64-byte vector of the layout is two 32-byte halves, rows 0-7 and rows 8-15 of the tile, and
// vpdpbusd becomes maddubs (u8 x s8 products, pairs summed in int16) then madd with ones (pairs of
// int16 summed in int32), which leaves the same integer in each lane:
// - nibble quants never saturate maddubs (at most 63 * 127 * 2 < 2^15 a lane, with the high bits
//   of Q5 and Q6, put above the nibbles by 16-bit shifts and a mask); the int16 lanes sum a group
//   of nibble vectors before they widen: a whole block for Q4 and T2 (16 * 15 * 127 < 2^15), two
//   vectors for Q5 (8 * 31 * 127) and Q6 (4 * 63 * 127 per accumulator of a half block);
// - Q8 quants (u8 up to 255) would: they run as signed weights w = q - 128 (q xor 0x80),
//   maddubs(|w|, x * sign(w)) (|w| <= 128, |x| <= 127), widened at every vector, the accumulator
//   starting 128 * sum(x) higher.
// The float epilogue (fp16 scales, one or two accumulators; for sub-scale layouts, the exact
// products of each block's integer dot and its sub-scale summed over a scale group) is the
// AVX-512 kernel's op for op, so the two give bitwise identical results for every kind.
#pragma once

#include <immintrin.h>

#include <algorithm>
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

// Sub-scales as int16 pairs, one pair per row lane (8 rows of a half tile): (a[r], b[r]). With
// a == b, madd of the rows' int16 sums by it multiplies both by the row's sub-scale.
inline __m256i subscale_pairs(const int8_t* a, const int8_t* b) {
  return _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(a)),
                                                _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b))));
}

// A scale group's sub-scale pairs (group_pair) for the 8 rows of a half tile; returns how many.
inline int group_subscales(const BlockLayout& L, const int8_t* sub, int64_t b0, __m256i (&pairs)[8]) {
  const int n = group_pairs(L);
  for (int k = 0; k < n; ++k) {
    const auto [a, b] = group_pair(L, sub, b0, k);
    pairs[k] = subscale_pairs(a, b);
  }
  return n;
}

// The group-end integer term of one activation row: the pairs times the row's quant-sum pairs.
inline __m256i group_term(const __m256i (&pairs)[8], int n, const int16_t* bsum) {
  __m256i j = _mm256_setzero_si256();
  for (int k = 0; k < n; ++k) {
    j = _mm256_add_epi32(j, _mm256_madd_epi16(pairs[k], _mm256_set1_epi32(sum_pair(bsum + 2 * k))));
  }
  return j;
}

// The float epilogue of a scale group of a sub-scale layout (the AVX-512 kernel's, op for op):
// acc += d0 * dx * (dots - offset * term) [SUB_HALF] or d0 * dx * dots + d1 * dx * term [min],
// dots: the group's sum of sub-scaled block dots in float (see quant_gemm.h).
template <int SUB>
inline __m256 group_epilogue(__m256 acc, __m256 dots, __m256i term, __m256 d0, __m256 d1, float dx, int32_t offset,
                             bool has_min) {
  const __m256 x = _mm256_set1_ps(dx), t = _mm256_cvtepi32_ps(term);
  if constexpr (SUB == SUB_HALF) dots = _mm256_fnmadd_ps(t, _mm256_set1_ps(float(offset)), dots);
  acc = _mm256_fmadd_ps(dots, _mm256_mul_ps(d0, x), acc);
  if (has_min) acc = _mm256_fmadd_ps(t, _mm256_mul_ps(d1, x), acc);
  return acc;
}

// Bit `from` of each byte moved to bit `to` (16-bit shifts: the caller's mask drops the bits that
// cross from the neighbouring byte)
inline __m256i move_bits(__m256i v, int from, int to) {
  return from <= to ? _mm256_slli_epi16(v, to - from) : _mm256_srli_epi16(v, from - to);
}

// The high bits of a Q5 or Q6 block (one or two vectors after its nibbles, see quant_gemm.cpp) put
// above the nibbles of nibble vector p, as the AVX-512 kernel's rotations: Q5's bit p (low nibbles)
// and 4 + p (high nibbles) to bit 4, Q6's bits 2p, 2p + 1 of each plane to bits 4, 5.
template <int ENC>
struct HighBits {
  static constexpr int PLANES = ENC == Q6 ? 2 : 1;
  const __m256i mask = _mm256_set1_epi8(ENC == Q6 ? 0x30 : 0x10);
  // h: the half tile's block (its high-bit vectors at 256 and 320)
  void add(const uint8_t* h, int p, __m256i& lo, __m256i& hi) const {
    const __m256i h0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + 256));
    const __m256i h1 = PLANES == 2 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + 320)) : h0;
    lo = _mm256_or_si256(lo, _mm256_and_si256(move_bits(h0, ENC == Q6 ? 2 * p : p, 4), mask));
    hi = _mm256_or_si256(hi, _mm256_and_si256(move_bits(h1, ENC == Q6 ? 2 * p : 4 + p, 4), mask));
  }
};

// How the integer sums of a block run: quants up to QMAX (unsigned), one or two int32 accumulators
// (T2: the trits; SUB_HALF: values 0-15, 16-31), and maddubs results summed in int16 over GROUP
// nibble vectors before they widen (QMAX * 127 * 2 per maddubs lane, int16 up to 32767: Q4 and T2 a
// whole block, 5- and 6-bit quants two vectors).
template <int ENC, int SUB>
struct BlockSums {
  static constexpr int QMAX = ENC == Q5 ? 31 : ENC == Q6 ? 63 : 15;
  static constexpr bool TWO = ENC == T2 || SUB == SUB_HALF;
  static constexpr int PER_VECTOR = SUB == SUB_HALF ? 1 : 2;  // maddubs into an accumulator per vector
  static constexpr int GROUP = std::min(4, 32767 / (2 * QMAX * 127 * PER_VECTOR));
  static_assert(GROUP > 0 && 4 % GROUP == 0, "int16 sums of a block");
  // int32 accumulators (and int16 partial sums, if they outlive a block's end) per row of a half tile
  static constexpr int REGS = ENC == Q8 ? 1 : (TWO ? 2 : 1) * (GROUP < 4 ? 2 : 1);
};

// One pass over all blocks for half H (0 or 1) of each of the NT tiles, or for both halves when
// H == 2 (NH "half tiles" of 8 rows, each with MR accumulators in registers). The first halves
// prefetch the tiles' next bytes, `ahead` further on. The float epilogue is quant_tile_avx512.h's,
// lane for lane. Sub-scale layouts madd the int16 sums by the rows' sub-scales instead of ones
// (each block's s * dot, exact in int32 and in float) and add them up in float over a scale group
// (group_epilogue).
template <int ENC, int SUB, int NT, int MR, int H>
inline void half_pass(const BlockLayout& L, const uint8_t* const* tiles, const Activations& A, int64_t m0,
                      int64_t ahead, float (&out)[NT][MR][TILE]) {
  using S = BlockSums<ENC, SUB>;
  constexpr int NH = H == 2 ? 2 * NT : NT;
  constexpr int64_t BLOCK = TILE * block_quant_bytes(ENC);  // a block's quants in a tile
  constexpr bool HIGH = ENC == Q5 || ENC == Q6, HALVES = SUB == SUB_HALF, GROUPED = SUB != SUB_NONE;
  const __m256i low4 = _mm256_set1_epi8(0x0F), low2 = _mm256_set1_epi8(0x03), ones = _mm256_set1_epi16(1);
  const HighBits<ENC> high_bits;
  const int64_t nb = L.nb, K = L.K, sg = L.sg, nsa = L.nsa, second = L.nsb * TILE, sub1 = nb * TILE;
  const int64_t nsums = L.nsub_sums();
  const bool has_min = L.has_min;
  const int8_t* q = A.q.data();
  const float *xd = A.d.data(), *xds = A.ds.data();
  const int32_t *init = A.init.data(), *xsum = A.sum.data();
  const uint8_t* wq[NH];   // half i's quants: the 32 bytes at 32 * h in each 64-byte vector
  const at::Half* sc[NH];  // its scale array 0 (8 rows at 8 * h); array 1 is `second` further
  const int8_t* sub[NH];   // its sub-scales 0 (8 rows at 8 * h); sub-scales 1 are `sub1` further
  bool lead[NH];           // whether it is a first half (which prefetches)
  for (int i = 0; i < NH; ++i) {
    const int t = H == 2 ? i / 2 : i, h = H == 2 ? i % 2 : H;
    wq[i] = tiles[t] + 32 * h;
    sc[i] = reinterpret_cast<const at::Half*>(tiles[t] + L.tile_quant_bytes) + 8 * h;
    sub[i] = reinterpret_cast<const int8_t*>(tiles[t] + L.tile_quant_bytes + L.tile_scale_bytes) + 8 * h;
    lead[i] = h == 0;
  }
  __m256 accf[NH][MR], dots[NH][MR];  // dots (GROUPED): the group's sub-scaled dots so far
  for (int i = 0; i < NH; ++i)
    for (int m = 0; m < MR; ++m) accf[i][m] = dots[i][m] = _mm256_setzero_ps();
  for (int64_t b = 0, sb = 0, in_group = 0; b < nb; ++b) {
    __m256i acc[NH][MR], acc2[NH][MR];  // SUB_HALF: acc2 sums values 16-31
    const int8_t* xb[MR];
    for (int m = 0; m < MR; ++m) {
      const int64_t j = (m0 + m) * nb + b;
      const __m256i start = GROUPED ? _mm256_setzero_si256()
                                    : _mm256_set1_epi32(ENC == Q8 ? init[j] + 128 * xsum[j] : init[j]);
      for (int i = 0; i < NH; ++i) acc[i][m] = acc2[i][m] = start;
      xb[m] = q + (m0 + m) * K + b * 32;
    }
    if constexpr (ENC == Q8) {
      for (int k = 0; k < 8; ++k) {
        __m256i w[NH], aw[NH];
        for (int i = 0; i < NH; ++i) {
          w[i] = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq[i] + b * BLOCK + k * 64)),
                                  _mm256_set1_epi8(char(0x80)));
          if (lead[i]) prefetch(wq[i] + ahead + b * BLOCK + k * 64);
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
      if constexpr (HIGH) {
        for (int i = 0; i < NH; ++i) {
          if (lead[i]) {
            for (int j = 0; j < HighBits<ENC>::PLANES; ++j) prefetch(wq[i] + ahead + b * BLOCK + 256 + j * 64);
          }
        }
      }
      __m256i mul[NH], mul2[NH];  // what madd multiplies the int16 sums by: ones, or the rows' sub-scales
      for (int i = 0; i < NH; ++i) {
        mul[i] = mul2[i] = ones;
        if constexpr (GROUPED) {
          const int8_t* s = sub[i] + b * TILE;
          if (lead[i] && b % 4 == 0) prefetch(s + ahead), prefetch(s + sub1 + ahead);
          mul[i] = subscale_pairs(s, s);
          if constexpr (HALVES) mul2[i] = subscale_pairs(s + sub1, s + sub1);
        }
      }
      for (int p0 = 0; p0 < 4; p0 += S::GROUP) {
        __m256i part[NH][MR], part2[NH][MR];  // int16 sums of the group's vectors
        for (int i = 0; i < NH; ++i)
          for (int m = 0; m < MR; ++m) part[i][m] = part2[i][m] = _mm256_setzero_si256();
        for (int p = p0; p < p0 + S::GROUP; ++p) {
          __m256i lo[NH], hi[NH];
          for (int i = 0; i < NH; ++i) {
            const uint8_t* block = wq[i] + b * BLOCK;
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + p * 64));
            if (lead[i]) prefetch(block + ahead + p * 64);
            lo[i] = _mm256_and_si256(v, low4);
            hi[i] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
            if constexpr (HIGH) high_bits.add(block, p, lo[i], hi[i]);
          }
          for (int m = 0; m < MR; ++m) {
            const __m256i xa = bcast4(xb[m] + 4 * p), xc = bcast4(xb[m] + 16 + 4 * p);
            for (int i = 0; i < NH; ++i) {
              if constexpr (ENC == T2) {
                auto trits = [&](__m256i a, __m256i c) {  // (16-bit shifts carry the next byte's bits in: mask)
                  return _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(a, low2), xa),
                                          _mm256_maddubs_epi16(_mm256_and_si256(c, low2), xc));
                };
                part[i][m] = _mm256_add_epi16(part[i][m], trits(lo[i], hi[i]));
                part2[i][m] = _mm256_add_epi16(part2[i][m], trits(_mm256_srli_epi16(lo[i], 2), _mm256_srli_epi16(hi[i], 2)));
              } else if constexpr (HALVES) {
                part[i][m] = _mm256_add_epi16(part[i][m], _mm256_maddubs_epi16(lo[i], xa));
                part2[i][m] = _mm256_add_epi16(part2[i][m], _mm256_maddubs_epi16(hi[i], xc));
              } else {
                part[i][m] = _mm256_add_epi16(part[i][m], _mm256_add_epi16(_mm256_maddubs_epi16(lo[i], xa),
                                                                           _mm256_maddubs_epi16(hi[i], xc)));
              }
            }
          }
        }
        for (int i = 0; i < NH; ++i) {
          for (int m = 0; m < MR; ++m) {
            acc[i][m] = _mm256_add_epi32(acc[i][m], _mm256_madd_epi16(part[i][m], mul[i]));
            if constexpr (S::TWO) acc2[i][m] = _mm256_add_epi32(acc2[i][m], _mm256_madd_epi16(part2[i][m], mul2[i]));
          }
        }
      }
    }
    if constexpr (GROUPED) {
      for (int i = 0; i < NH; ++i) {
        for (int m = 0; m < MR; ++m) {
          dots[i][m] = _mm256_add_ps(dots[i][m], _mm256_cvtepi32_ps(acc[i][m]));
          if constexpr (HALVES) dots[i][m] = _mm256_add_ps(dots[i][m], _mm256_cvtepi32_ps(acc2[i][m]));
        }
      }
      if (in_group == sg - 1) {
        const int64_t b0 = b - in_group;
        __m256i term[NH][MR];
        for (int i = 0; i < NH; ++i)
          for (int m = 0; m < MR; ++m) term[i][m] = _mm256_setzero_si256();
        for (int k = 0, n = group_pairs(L); k < n; ++k) {
          for (int i = 0; i < NH; ++i) {
            const auto [pa, pb] = group_pair(L, sub[i], b0, k);
            const __m256i pair = subscale_pairs(pa, pb);
            for (int m = 0; m < MR; ++m) {
              const int32_t x = sum_pair(A.bsum.data() + ((m0 + m) * nb + b0) * nsums + 2 * k);
              term[i][m] = _mm256_add_epi32(term[i][m], _mm256_madd_epi16(pair, _mm256_set1_epi32(x)));
            }
          }
        }
        for (int i = 0; i < NH; ++i) {
          const at::Half* s0 = sc[i] + sb * TILE;
          if (lead[i]) prefetch(reinterpret_cast<const uint8_t*>(s0) + ahead);
          const __m256 d0 = half8(s0), d1 = nsa > 1 ? half8(s0 + second) : _mm256_setzero_ps();
          for (int m = 0; m < MR; ++m) {
            accf[i][m] = group_epilogue<SUB>(accf[i][m], dots[i][m], term[i][m], d0, d1, xd[(m0 + m) * nb + b0],
                                             int32_t(L.offset), has_min);
            dots[i][m] = _mm256_setzero_ps();
          }
        }
      }
    } else {
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
          } else if (has_min) {
            accf[i][m] = _mm256_fmadd_ps(d1, _mm256_set1_ps(xds[(m0 + m) * nb + b]), accf[i][m]);
          }
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
constexpr bool tile_kernel_has(int64_t, int64_t) { return true; }  // every kind of INFERA_BLOCK_KINDS

template <int ENC, int SUB, int NT, int MR>
inline void tile_kernel(const BlockLayout& L, const uint8_t* const* tiles, const Activations& A, int64_t m0,
                        int64_t ahead, float (&out)[NT][MR][TILE]) {
  if constexpr (2 * NT * MR * BlockSums<ENC, SUB>::REGS <= 4) {
    half_pass<ENC, SUB, NT, MR, 2>(L, tiles, A, m0, ahead, out);
  } else {
    half_pass<ENC, SUB, NT, MR, 0>(L, tiles, A, m0, ahead, out);
    half_pass<ENC, SUB, NT, MR, 1>(L, tiles, A, m0, ahead, out);
  }
}

// ---- batches: a block of a half tile unpacked once, then every activation row of a chunk over it ----
//
// The tile kernel above keeps MR rows' accumulators in registers beside the unpacked quants, which
// leaves too few of the 16 registers (the compiler spills) and unpacks each block once per MR rows.
// The rows kernel turns the loops around: for each half tile and block, the block's 8 quant vectors
// are unpacked into registers once, its scales read once, then each activation row of a chunk
// takes its 8 maddubs (int16 sums widened as BlockSums says) and the float epilogue, its float
// accumulator in memory (out, hot in L1). The activation rows come block-major (RowPanel), so the
// row loop reads one stream. The integer sums are the same integers and the epilogue is the tile
// kernel's op for op, so the results keep the avx512 level's bits.
constexpr bool rows_kernel_has(int64_t enc, int64_t) { return enc == Q8 || enc == Q4 || enc == Q5 || enc == Q6; }

// What the rows kernel reads of an activation row's block: its scale, scale * quant sum (the min
// term) and the integer accumulator's start (Q8: with the 128 * quant sum of its unsigned weights).
struct RowBlock {
  float d, ds;
  int32_t init;
};

// Activation rows of A block-major for the rows kernel: [block][panel row] quants (32 bytes) and
// terms, and for sub-scale layouts the quant sums (bsum) as [scale group][panel row][its sums].
// Panel row g * chunk + m is row g * M + m0 + m of A (per-IC groups g < groups, else g = 0).
struct RowPanel {
  static constexpr int64_t MAX_ROWS = 96;  // of a chunk (the rows kernel's int32 sums stay in L1)
  int64_t rows = 0, group_sums = 0;  // group_sums: the quant sums of a scale group
  std::vector<int8_t> q;
  std::vector<RowBlock> terms;
  std::vector<int16_t> bsum;

  void resize(const BlockLayout& L, int64_t rows_) {
    rows = rows_;
    group_sums = L.sg * L.nsub_sums();
    q.resize(rows * L.K);
    terms.resize(rows * L.nb);
    bsum.resize(rows * L.nb * L.nsub_sums());
  }
  // blocks [b0, b1) of the panel (resized for groups * chunk rows)
  void fill(const BlockLayout& L, const Activations& A, int64_t M, int64_t m0, int64_t chunk, int64_t b0, int64_t b1) {
    const int64_t ns = L.nsub_sums();
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t row = i / chunk * M + m0 + i % chunk, j = row * L.nb + b;
        std::memcpy(q.data() + (b * rows + i) * 32, A.q.data() + row * L.K + b * 32, 32);
        terms[b * rows + i] = {A.d[j], A.ds[j], A.init[j] + (L.enc == Q8 ? 128 * A.sum[j] : 0)};
        if (ns) std::memcpy(sums(b / L.sg, i) + b % L.sg * ns, A.bsum.data() + j * ns, ns * sizeof(int16_t));
      }
    }
  }
  int16_t* sums(int64_t group, int64_t row) { return bsum.data() + (group * rows + row) * group_sums; }
  const int16_t* sums(int64_t group, int64_t row) const { return bsum.data() + (group * rows + row) * group_sums; }
};

// out[m][r] (16 floats a row): row r of the tile times panel row row0 + m, for m < rows (at most
// RowPanel::MAX_ROWS). Sub-scale layouts keep each row's sub-scaled dots of a scale group in L1.
template <int ENC, int SUB>
inline void rows_kernel(const BlockLayout& L, const uint8_t* tile, const RowPanel& P, int64_t row0, int64_t rows,
                        float* out) {
  using S = BlockSums<ENC, SUB>;
  constexpr int64_t BLOCK = TILE * block_quant_bytes(ENC);
  constexpr bool HIGH = ENC == Q5 || ENC == Q6, HALVES = SUB == SUB_HALF, GROUPED = SUB != SUB_NONE;
  static_assert(ENC != T2, "trits take the tile kernel");
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const HighBits<ENC> high_bits;
  const int64_t nb = L.nb, sg = L.sg, nsa = L.nsa, second = L.nsb * TILE, sub1 = nb * TILE;
  const bool has_min = L.has_min, offset = L.offset != 0;
  alignas(32) float dots[GROUPED ? RowPanel::MAX_ROWS * 8 : 1];  // GROUPED: each row's sub-scaled dots so far
  std::fill(out, out + rows * TILE, 0.f);
  for (int h = 0; h < 2; ++h) {
    const uint8_t* wq = tile + 32 * h;
    const at::Half* sc = reinterpret_cast<const at::Half*>(tile + L.tile_quant_bytes) + 8 * h;
    const int8_t* sub = reinterpret_cast<const int8_t*>(tile + L.tile_quant_bytes + L.tile_scale_bytes) + 8 * h;
    for (int64_t b = 0, sb = 0, in_group = 0; b < nb; ++b) {
      const uint8_t* block = wq + b * BLOCK;
      if (h == 0) {  // the next tile's block b (and a share of its scales) while this one computes
        for (int64_t j = 0; j < BLOCK; j += 64) prefetch(block + L.tile_bytes + j);
        for (int64_t j = L.tile_quant_bytes + 64 * b; j < L.tile_bytes; j += 64 * nb) prefetch(tile + L.tile_bytes + j);
      }
      // Q8: |w| and w of the signed quants w = q xor 0x80 (more than the registers hold: L1);
      // else the low then high nibbles (high bits in) of vector p
      __m256i u[8], w[ENC == Q8 ? 8 : 1];
      if constexpr (ENC == Q8) {
        for (int k = 0; k < 8; ++k) {
          w[k] = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + k * 64)),
                                  _mm256_set1_epi8(char(0x80)));
          u[k] = _mm256_abs_epi8(w[k]);
        }
      } else {
        for (int p = 0; p < 4; ++p) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + p * 64));
          __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
          if constexpr (HIGH) high_bits.add(block, p, lo, hi);
          u[2 * p] = lo, u[2 * p + 1] = hi;
        }
      }
      const at::Half* s0 = sc + sb * TILE;
      const __m256 d0 = nsa > 0 ? half8(s0) : _mm256_set1_ps(1.f);
      const __m256 d1 = nsa > 1 ? half8(s0 + second) : _mm256_setzero_ps();
      __m256i mul = ones, mul2 = ones;  // what madd multiplies the int16 sums by: ones, or the rows' sub-scales
      const bool first = in_group == 0, last = in_group == sg - 1;
      __m256i pairs[8];
      int npairs = 0;
      if constexpr (GROUPED) {
        const int8_t* s = sub + b * TILE;
        mul = subscale_pairs(s, s);
        if constexpr (HALVES) mul2 = subscale_pairs(s + sub1, s + sub1);
        if (last) npairs = group_subscales(L, sub, b - in_group, pairs);
      }
      const int8_t* xb = P.q.data() + (b * P.rows + row0) * 32;
      const RowBlock* xt = P.terms.data() + b * P.rows + row0;
      for (int64_t m = 0; m < rows; ++m, xb += 32) {
        const RowBlock& x = xt[m];
        __m256i acc = offset && !GROUPED ? _mm256_set1_epi32(x.init) : _mm256_setzero_si256(), acc2 = acc;
        if constexpr (ENC == Q8) {
          for (int k = 0; k < 8; ++k) {
            const __m256i p = _mm256_maddubs_epi16(u[k], _mm256_sign_epi8(bcast4(xb + 4 * k), w[k]));
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, ones));
          }
        } else {
          for (int p0 = 0; p0 < 4; p0 += S::GROUP) {
            __m256i part = _mm256_setzero_si256(), part2 = part;  // HALVES: values 0-15 (low nibbles), 16-31
            for (int p = p0; p < p0 + S::GROUP; ++p) {
              const __m256i lo = _mm256_maddubs_epi16(u[2 * p], bcast4(xb + 4 * p));
              const __m256i hi = _mm256_maddubs_epi16(u[2 * p + 1], bcast4(xb + 16 + 4 * p));
              if constexpr (HALVES) {
                part = _mm256_add_epi16(part, lo);
                part2 = _mm256_add_epi16(part2, hi);
              } else {
                part = _mm256_add_epi16(part, _mm256_add_epi16(lo, hi));
              }
            }
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(part, mul));
            if constexpr (HALVES) acc2 = _mm256_add_epi32(acc2, _mm256_madd_epi16(part2, mul2));
          }
        }
        float* o = out + m * TILE + 8 * h;
        if constexpr (GROUPED) {
          __m256 g = _mm256_add_ps(first ? _mm256_setzero_ps() : _mm256_load_ps(dots + 8 * m), _mm256_cvtepi32_ps(acc));
          if constexpr (HALVES) g = _mm256_add_ps(g, _mm256_cvtepi32_ps(acc2));
          if (!last) {
            _mm256_store_ps(dots + 8 * m, g);
            continue;
          }
          const __m256i term = group_term(pairs, npairs, P.sums(sb, row0 + m));
          const __m256 sum = _mm256_loadu_ps(o);
          _mm256_storeu_ps(o, group_epilogue<SUB>(sum, g, term, d0, d1, x.d, int32_t(L.offset), has_min));
        } else {
          const __m256 dx = _mm256_set1_ps(x.d);
          __m256 accf = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_mul_ps(d0, dx), _mm256_loadu_ps(o));
          if (has_min) accf = _mm256_fmadd_ps(d1, _mm256_set1_ps(x.ds), accf);
          _mm256_storeu_ps(o, accf);
        }
      }
      if (++in_group == sg) in_group = 0, ++sb;
    }
  }
}

}  // namespace infera_quant
