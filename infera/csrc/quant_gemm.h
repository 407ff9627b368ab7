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
#include <vector>

namespace infera_quant {

// Activation rows quantized per block of 32: quants in natural order, and per block the scale,
// -offset * sum (the integer accumulator's start), scale * sum (for the min term) and the sum;
// for layouts with sub-scales per 16 values (SUB_HALF), -offset * sum of each half block
// (values 0-15, 16-31).
struct Activations {
  int64_t K = 0, nb = 0;
  std::vector<int8_t> q;
  std::vector<float> d, ds;
  std::vector<int32_t> init, init_half, sum;
  std::vector<float> xf;                       // the rows in float (outliers and sparse terms)
  std::vector<std::vector<int32_t>> outliers;  // per row: inputs kept out of the int8 product

  void resize(int64_t M, int64_t K_, bool need_float, bool need_halves) {
    K = K_;
    nb = K / 32;
    q.resize(M * K);
    d.resize(M * nb);
    ds.resize(M * nb);
    init.resize(M * nb);
    sum.resize(M * nb);
    init_half.resize(need_halves ? 2 * M * nb : 0);
    xf.resize(need_float ? M * K : 0);
    if (int64_t(outliers.size()) < M) outliers.resize(M);
    for (int64_t m = 0; m < M; ++m) outliers[m].clear();
  }
};

}  // namespace infera_quant
