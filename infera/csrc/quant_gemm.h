// What quant_gemm.cpp shares with its per-ISA tile kernels (quant_tile_*.h): the quantized
// activations. Every tile kernel has the signature
//   template <int ENC, int SUB, int NT, int MR>
//   void tile_kernel(const BlockLayout& L, const uint8_t* const* tiles, const Activations& A,
//                    int64_t m0, int64_t ahead, float (&out)[NT][MR][TILE]);
// and writes out[t][m][r] = row r of tile t (16 rows) . activation row m0 + m, over all blocks
// (the int8 products scaled, the min terms added), prefetching `ahead` bytes past each tile.
// The header also defines `constexpr bool tile_kernel_has(int64_t enc, int64_t sub)`: the
// (encoding, sub-scales) pairs of INFERA_BLOCK_KINDS it implements (the others run the scalar path).
// quant_tile_avx2.h adds a rows kernel for batches (rows_kernel_has, rows_kernel: one tile against
// up to 96 activation rows copied block-major into a RowPanel).
#pragma once

#include "ops.h"

#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

namespace infera_quant {

using namespace infera;

// Activation rows quantized to int8: quants in natural order, and per block of 32 the scale,
// -offset * sum (the integer accumulator's start), scale * sum (for the min term) and the sum.
// Layouts without sub-scales take a scale per block (as llama.cpp's q8_0). Those with int8
// sub-scales (GGUF's K-quants) take one per scale group of `sg` blocks (as its q8_K), so the
// kernels sum a group's integer dots times their sub-scales (products exact in float: below 2^24)
// and apply the float scales once per group; for them `bsum` holds the quant sum under each
// sub-scale (a block's; SUB_HALF: values 0-15, then 16-31), which the min's sub-scales (SUB_BLOCK)
// or the sub-scales times the offset (SUB_HALF) multiply, read in int16 pairs.
struct Activations {
  int64_t K = 0, nb = 0;
  std::vector<int8_t> q;
  std::vector<float> d, ds;  // per block (the blocks of a group repeat its scale)
  std::vector<int32_t> init, sum;
  std::vector<int16_t> bsum;                   // sub-scale layouts: [row][block][1 or 2 sums]
  std::vector<float> xf;                       // the rows in float (outliers and sparse terms)
  std::vector<std::vector<int32_t>> outliers;  // per row: inputs kept out of the int8 product

  void resize(int64_t M, const BlockLayout& L, bool need_float) {
    K = L.K;
    nb = K / 32;
    q.resize(M * K);
    d.resize(M * nb);
    ds.resize(M * nb);
    init.resize(M * nb);
    sum.resize(M * nb);
    bsum.resize(M * nb * L.nsub_sums());
    xf.resize(need_float ? M * K : 0);
    if (int64_t(outliers.size()) < M) outliers.resize(M);
    for (int64_t m = 0; m < M; ++m) outliers[m].clear();
  }
};

// The group-end term of sub-scale layouts: a scale group's sub-scales as pairs that multiply the
// int16 pairs of Activations::bsum (pair k at bsum + b0 * nsub_sums() + 2k): the min's sub-scales
// of blocks b0 + 2k and b0 + 2k + 1 (SUB_BLOCK with a min), or block b0 + k's two (SUB_HALF,
// times the offset). `sub`: the tile's sub-scales (plus the row of the first lane).
inline int group_pairs(const BlockLayout& L) { return L.sub == SUB_HALF ? L.sg : L.has_min ? L.sg / 2 : 0; }
inline std::pair<const int8_t*, const int8_t*> group_pair(const BlockLayout& L, const int8_t* sub, int64_t b0, int k) {
  if (L.sub == SUB_BLOCK) {
    const int8_t* a = sub + (L.nb + b0 + 2 * k) * TILE;
    return {a, a + TILE};
  }
  const int8_t* a = sub + (b0 + k) * TILE;
  return {a, a + L.nb * TILE};
}

// The int16 pair of a row's quant sums at `p` (bsum) as one int32.
inline int32_t sum_pair(const int16_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

}  // namespace infera_quant
