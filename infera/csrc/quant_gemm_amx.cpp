// Batched products with block-quantized weights by AMX (Intel's tile matrix unit), in bfloat16.
//
// quant_gemm.cpp's int8 path pays a float epilogue per block of 32 inputs (each block has its own
// weight and activation scales), about as many vector operations as its dot products: a tile unit
// cannot help it. Here the weights are dequantized instead, once per tile and batch chunk, into
// bf16 B tiles (16 rows of 2 inputs x 16 outputs), and TDPBF16PS sums whole rows in float: the
// dequantization is shared by every activation row of the chunk, and nothing runs per block but
// the tile multiplies. The same weights in bf16 through oneDNN read 4x the bytes.
//
// Activations are converted to bf16 and laid out tile by tile ([16 rows][block][16 x 32 inputs]),
// zero rows padding the batch to 32. Tile registers: 0-3 hold 2 x 2 (16 rows x 16 outputs) fp32
// sums, 4 and 5 a block of 16 activation rows each, 6 and 7 a block of two packed weight tiles.
#include "ops.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <vector>

#include "quant_tile_avx512.h"
#include "vec512.h"

namespace {

using namespace infera;

constexpr int64_t ROWS = 32;  // activation rows per 2 x 2 tile step

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

using infera_quant::half16;
using infera_quant::int8x16;

void configure_tiles() {
  TileConfig c;
  for (int t = 0; t < 8; ++t) c.rows[t] = 16, c.colsb[t] = 64;
  _tile_loadconfig(&c);
}

// Byte shuffles taking byte j of each 32-bit lane to the lane's low byte, zeroing the rest.
struct ByteOfLanes {
  __m512i pick[4];
  ByteOfLanes() {
    alignas(64) uint32_t c[16];
    for (int j = 0; j < 4; ++j) {
      for (int n = 0; n < 16; ++n) c[n] = 0x80808000u | uint32_t(4 * (n % 4) + j);  // (within 128-bit lanes)
      pick[j] = _mm512_load_si512(c);
    }
  }
  __m512i operator()(__m512i v, int j) const { return _mm512_shuffle_epi8(v, pick[j]); }
};

// Packed tile -> one bf16 B tile per block (row r: inputs 2r and 2r + 1 of the 16 weight rows).
// A weight is d0 * q + c for Q8/Q4/Q5/Q6 (c = min - d0 * offset; with sub-scales per 16, d0 and c
// of values 16-31 are d0_hi and c_hi), d0 * t1 + d1 * t2 + c for T2 (c = -d0 - d1); the 16 rows
// of the tile are the lanes.
template <int64_t ENC, int64_t SUB>
void dequantize_tile(const BlockLayout& L, const uint8_t* tile, uint16_t* out) {
  const __m512i pairs = [] {  // 16-bit element 2n <- n, 2n + 1 <- 16 + n
    alignas(64) int16_t idx[32];
    for (int n = 0; n < 16; ++n) idx[2 * n] = int16_t(n), idx[2 * n + 1] = int16_t(16 + n);
    return _mm512_load_si512(idx);
  }();
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const ByteOfLanes byte_of_lanes;
  const infera_quant::HighBits<ENC> high_bits;
  const at::Half* scales = reinterpret_cast<const at::Half*>(tile + L.tile_quant_bytes);
  const int8_t* subs = reinterpret_cast<const int8_t*>(tile + L.tile_quant_bytes + L.tile_scale_bytes);
  const int64_t second = L.nsb * TILE, sub1 = L.nb * TILE;
  for (int64_t b = 0; b < L.nb; ++b) {
    const at::Half* s0 = scales + (b / L.sg) * TILE;
    __m512 d0 = L.nsa > 0 ? half16(s0) : _mm512_set1_ps(1.f);
    __m512 d1 = L.nsa > 1 ? half16(s0 + second) : _mm512_setzero_ps();
    __m512 d0_hi = d0;
    if constexpr (SUB == SUB_HALF) d0_hi = _mm512_mul_ps(d0, int8x16(subs + b * TILE + sub1));
    if constexpr (SUB == SUB_BLOCK) {
      if (L.nsa > 1) d1 = _mm512_mul_ps(d1, int8x16(subs + b * TILE + sub1));
    }
    if constexpr (SUB != SUB_NONE) d0 = _mm512_mul_ps(d0, int8x16(subs + b * TILE));
    const __m512 min = L.has_min ? d1 : _mm512_setzero_ps(), offset = _mm512_set1_ps(float(L.offset));
    const __m512 c = ENC == T2 ? _mm512_sub_ps(_mm512_setzero_ps(), _mm512_add_ps(d0, d1))
                               : _mm512_fnmadd_ps(d0, offset, min);
    const __m512 c_hi = _mm512_fnmadd_ps(d0_hi, offset, min);
    const uint8_t* block = tile + b * TILE * L.bbytes;
    uint16_t* img = out + b * 512;
    // quants of input k, the 16 rows in the lanes (as int32)
    __m512i q[32];
    if constexpr (ENC == Q8) {
      for (int v = 0; v < 8; ++v) {
        const __m512i x = _mm512_loadu_si512(block + v * 64);
        for (int j = 0; j < 4; ++j) q[4 * v + j] = byte_of_lanes(x, j);
      }
    } else {
      __m512i high[infera_quant::HighBits<ENC>::PLANES];
      for (int j = 0; j < infera_quant::HighBits<ENC>::PLANES; ++j) high[j] = _mm512_loadu_si512(block + 256 + 64 * j);
      for (int v = 0; v < 4; ++v) {
        const __m512i x = _mm512_loadu_si512(block + v * 64);
        __m512i lo = _mm512_and_si512(x, low4), hi = _mm512_and_si512(_mm512_srli_epi16(x, 4), low4);
        if constexpr (ENC == Q5 || ENC == Q6) high_bits.add(high, v, lo, hi);
        for (int j = 0; j < 4; ++j) q[4 * v + j] = byte_of_lanes(lo, j), q[16 + 4 * v + j] = byte_of_lanes(hi, j);
      }
    }
    auto value = [&](int k) {
      if constexpr (ENC == T2) {
        const __m512 t1 = _mm512_cvtepi32_ps(_mm512_and_si512(q[k], _mm512_set1_epi32(3)));
        const __m512 t2 = _mm512_cvtepi32_ps(_mm512_srli_epi32(q[k], 2));
        return _mm512_fmadd_ps(t2, d1, _mm512_fmadd_ps(t1, d0, c));
      } else if (SUB == SUB_HALF && k >= 16) {
        return _mm512_fmadd_ps(_mm512_cvtepi32_ps(q[k]), d0_hi, c_hi);
      } else {
        return _mm512_fmadd_ps(_mm512_cvtepi32_ps(q[k]), d0, c);
      }
    };
#pragma GCC unroll 16
    for (int r = 0; r < 16; ++r) {
      const __m512i packed = _mm512_permutexvar_epi16(pairs, (__m512i)_mm512_cvtne2ps_pbh(value(2 * r + 1), value(2 * r)));
      _mm512_store_si512(img + r * 32, packed);
    }
  }
}

void dequantize_tile(const BlockLayout& L, const uint8_t* tile, uint16_t* out) {
#define INFERA_KIND(ENC, SUB) \
  if (L.enc == ENC && L.sub == SUB) return dequantize_tile<ENC, SUB>(L, tile, out);
  INFERA_BLOCK_KINDS(INFERA_KIND)
#undef INFERA_KIND
  TORCH_CHECK(false, "no AMX path for encoding ", L.enc, " with sub-scales ", L.sub);
}

// y rows [m0, m0 + 16) x outputs [n0, n0 + 16) from a C tile's sums (+ bias), clipped to M x N.
template <typename OutT>
void store(const float* sums, const float* bias, int64_t m0, int64_t n0, int64_t M, int64_t N, OutT* y) {
  const int64_t rows = std::min<int64_t>(16, M - m0), cols = std::min<int64_t>(16, N - n0);
  const __mmask16 mask = infera_vec::first_lanes(cols);
  const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + n0) : _mm512_setzero_ps();
  for (int64_t i = 0; i < rows; ++i) {
    const __m512 v = infera_vec::round16<OutT>(_mm512_add_ps(_mm512_load_ps(sums + 16 * i), b));
    OutT* dst = y + (m0 + i) * N + n0;
    if (cols == 16) {
      infera_vec::store16(dst, v);
    } else {
      alignas(64) float tmp[16];
      _mm512_store_ps(tmp, v);
      for (int64_t j = 0; j < cols; ++j) dst[j] = OutT(tmp[j]);
    }
  }
}

// y [M, N] = x W^T (+ bias), x blocked and padded as gemm_amx lays it out.
template <typename OutT>
void run(const BlockLayout& L, const uint8_t* w, const at::BFloat16* x, const float* bias, int64_t M, int64_t N,
         OutT* y) {
  const int64_t K = L.K, nb = L.nb, ntiles = (N + TILE - 1) / TILE, units = (ntiles + 1) / 2;
  const int64_t padded = (M + ROWS - 1) / ROWS * ROWS;  // x has this many rows
  // activation rows in chunks of about 1 MiB: a chunk stays in L2 while the thread's tiles pass
  const int64_t m_chunk = std::max<int64_t>(ROWS, (1024 * 1024 / (2 * K)) / ROWS * ROWS);
  at::parallel_for(0, units, 1, [&](int64_t u0, int64_t u1) {
    configure_tiles();
    static thread_local std::vector<uint16_t> images;
    images.resize(2 * nb * 512 + 32);
    const uintptr_t misalign = reinterpret_cast<uintptr_t>(images.data()) % 64;
    uint16_t* img = images.data() + (misalign ? (64 - misalign) / 2 : 0);  // 64-byte aligned
    alignas(64) float sums[4][256];
    for (int64_t mc = 0; mc < padded; mc += m_chunk) {
      const int64_t m_end = std::min(padded, mc + m_chunk);
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t t = 2 * u, pair = t + 1 < ntiles;  // an odd last tile multiplies itself twice
        dequantize_tile(L, w + t * L.tile_bytes, img);
        const uint16_t* img1 = img;
        if (pair) dequantize_tile(L, w + (t + 1) * L.tile_bytes, img + nb * 512), img1 = img + nb * 512;
        for (int64_t m0 = mc; m0 < m_end; m0 += ROWS) {
          const at::BFloat16* a = x + m0 * K;  // 2 groups of 16 rows: [nb][16 rows x 32 inputs] each
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(2);
          _tile_zero(3);
          for (int64_t b = 0; b < nb; ++b) {
            _tile_loadd(4, a + b * 512, 64);
            _tile_loadd(5, a + 16 * K + b * 512, 64);
            _tile_loadd(6, img + b * 512, 64);
            _tile_loadd(7, img1 + b * 512, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
          }
          _tile_stored(0, sums[0], 64);
          _tile_stored(1, sums[1], 64);
          _tile_stored(2, sums[2], 64);
          _tile_stored(3, sums[3], 64);
          for (int i = 0; i < 2; ++i) {
            store(sums[2 * i], bias, m0 + 16 * i, t * TILE, M, N, y);
            if (pair) store(sums[2 * i + 1], bias, m0 + 16 * i, (t + 1) * TILE, M, N, y);
          }
        }
      }
    }
    _tile_release();
  });
}

}  // namespace

namespace infera {

bool amx_available() {
  static const bool ok = [] {  // Linux grants a process the tile state on request
    constexpr int ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return ok;
}

at::Tensor gemm_amx(const at::Tensor& x, const at::Tensor& w, const BlockLayout& L, int64_t N,
                    const c10::optional<at::Tensor>& bias) {
  const int64_t M = x.size(0), K = L.K, padded = (M + ROWS - 1) / ROWS * ROWS;
  at::Tensor xp = x.scalar_type() == at::kBFloat16 && M == padded ? x : at::zeros({padded, K}, at::kBFloat16);
  if (!xp.is_same(x)) xp.narrow(0, 0, M).copy_(x);
  // A tiles contiguous: [row group of 16][block][16 rows x 32 inputs]
  const at::Tensor xb = xp.view({padded / 16, 16, K / 32, 32}).permute({0, 2, 1, 3}).contiguous();
  const at::Tensor bf = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bp = bf.defined() ? bf.data_ptr<float>() : nullptr;
  at::Tensor y = at::empty({M, N}, x.options());
  const uint8_t* wp = w.data_ptr<uint8_t>();
  if (x.scalar_type() == at::kBFloat16) run(L, wp, xb.data_ptr<at::BFloat16>(), bp, M, N, y.data_ptr<at::BFloat16>());
  else run(L, wp, xb.data_ptr<at::BFloat16>(), bp, M, N, y.data_ptr<float>());
  return y;
}

}  // namespace infera

#else

namespace infera {

bool amx_available() { return false; }

at::Tensor gemm_amx(const at::Tensor&, const at::Tensor&, const BlockLayout&, int64_t,
                    const c10::optional<at::Tensor>&) {
  TORCH_CHECK(false, "this build of infera's kernels has no AMX path");
}

}  // namespace infera

#endif
