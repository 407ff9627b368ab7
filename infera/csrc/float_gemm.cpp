// y = x W^T (+ b) with bfloat16 weights for the few rows of a decode step.
//
// A decode step multiplies 1 to a few rows by each weight: the product is bound by reading the
// weights, once. PyTorch's bf16 GEMM (oneDNN) took 2-3x that time at one row on CPUs without AMX
// (measured 26 GB/s from L3 where float32 reached 36). Here each thread streams its share of
// the weight rows once, four rows at a time, and takes AVX512-BF16 dot products (fp32
// accumulation) with every input row while the weights are in L1. At the AVX2 level the bf16
// values are widened to fp32 (a shift) for FMAs: 1.4-2.5x at::linear at one row, 2-4x at 8
// (its bf16 path there lacks oneDNN's; measured with aten and oneDNN held to AVX2, one thread).
// Each output is summed in the same order whatever the number of rows, so a sequence gets the
// same values alone or in a batch. More rows, other dtypes or the scalar level take at::linear.
#include "ops.h"

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define INFERA_BF16_DOT 1
#elif defined(__AVX2__) && defined(__FMA__)
#include "vec256.h"
#define INFERA_BF16_DOT 1
#endif

namespace infera {

#ifdef INFERA_BF16_DOT
namespace {

constexpr int64_t ROWS = 4;  // weight rows streamed together

#if defined(__AVX512BF16__)
// 32 bf16 products per instruction, summed in pairs into 16 fp32 lanes
struct Dot {
  using acc_t = __m512;
  using in_t = __m512bh;
  static constexpr int64_t K = 32;
  static constexpr int64_t MB = 4;  // input rows per pass over the weight rows (ROWS * MB accumulators)
  static acc_t zero() { return _mm512_setzero_ps(); }
  static in_t load(const c10::BFloat16* p) {
    return reinterpret_cast<__m512bh>(_mm512_loadu_si512(reinterpret_cast<const void*>(p)));
  }
  static acc_t fma(acc_t acc, in_t w, in_t x) { return _mm512_dpbf16_ps(acc, w, x); }
  static float sum(acc_t acc) { return _mm512_reduce_add_ps(acc); }
};
#else
// AVX2: 8 bf16 widened to fp32 (a shift), one FMA into 8 fp32 lanes
struct Dot {
  using acc_t = __m256;
  using in_t = __m256;
  static constexpr int64_t K = 8;
  static constexpr int64_t MB = 2;  // 8 accumulators + inputs within the 16 ymm registers
  static acc_t zero() { return _mm256_setzero_ps(); }
  static in_t load(const c10::BFloat16* p) { return infera_vec::load8(p); }
  static acc_t fma(acc_t acc, in_t w, in_t x) { return _mm256_fmadd_ps(w, x, acc); }
  static float sum(acc_t acc) { return infera_vec::hsum8(acc); }
};
#endif
constexpr int64_t MB = Dot::MB;

// out[m, n0 + r] for r < nr, m < nm: dot products of x rows m and w rows n0 + r over K (K % 32 == 0)
template <int64_t NR, int64_t NM>
inline void dots(const c10::BFloat16* x, const c10::BFloat16* w, int64_t K, float* out, int64_t ld_out) {
  Dot::acc_t acc[NR][NM];
  for (int64_t r = 0; r < NR; ++r)
    for (int64_t m = 0; m < NM; ++m) acc[r][m] = Dot::zero();
  for (int64_t k = 0; k < K; k += Dot::K) {
    Dot::in_t xv[NM];
    for (int64_t m = 0; m < NM; ++m) xv[m] = Dot::load(x + m * K + k);
    for (int64_t r = 0; r < NR; ++r) {
      const Dot::in_t wv = Dot::load(w + r * K + k);
      for (int64_t m = 0; m < NM; ++m) acc[r][m] = Dot::fma(acc[r][m], wv, xv[m]);
    }
  }
  for (int64_t r = 0; r < NR; ++r)
    for (int64_t m = 0; m < NM; ++m) out[m * ld_out + r] = Dot::sum(acc[r][m]);
}

// dots<NR, NM> for NM = nm <= MB input rows
template <int64_t NR, int64_t NM = MB>
inline void dots_upto(int64_t nm, const c10::BFloat16* x, const c10::BFloat16* w, int64_t K, float* out,
                      int64_t ld_out) {
  if constexpr (NM > 1)
    if (nm < NM) return dots_upto<NR, NM - 1>(nm, x, w, K, out, ld_out);
  dots<NR, NM>(x, w, K, out, ld_out);
}

template <int64_t NR>
inline void dots_rows(const c10::BFloat16* x, int64_t M, const c10::BFloat16* w, int64_t K, float* out,
                      int64_t ld_out) {
  for (int64_t m0 = 0; m0 < M; m0 += MB) dots_upto<NR>(std::min(MB, M - m0), x + m0 * K, w, K, out + m0 * ld_out, ld_out);
}

}  // namespace
#endif

at::Tensor float_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
#ifdef INFERA_BF16_DOT
  if (x.dim() == 2 && x.size(0) <= BF16_GEMV_MAX_ROWS && x.scalar_type() == at::kBFloat16 &&
      w.scalar_type() == at::kBFloat16 && w.dim() == 2 && x.size(1) == w.size(1) && x.size(1) % 32 == 0 &&
      x.is_contiguous() && w.is_contiguous() && (!bias || bias->scalar_type() == at::kBFloat16)) {
    const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
    at::Tensor acc = at::empty({M, N}, x.options().dtype(at::kFloat));
    const auto* xp = x.data_ptr<c10::BFloat16>();
    const auto* wp = w.data_ptr<c10::BFloat16>();
    float* op = acc.data_ptr<float>();
    const int64_t groups = (N + ROWS - 1) / ROWS;
#pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t n0 = g * ROWS;
      switch (std::min(ROWS, N - n0)) {
        case 1: dots_rows<1>(xp, M, wp + n0 * K, K, op + n0, N); break;
        case 2: dots_rows<2>(xp, M, wp + n0 * K, K, op + n0, N); break;
        case 3: dots_rows<3>(xp, M, wp + n0 * K, K, op + n0, N); break;
        default: dots_rows<4>(xp, M, wp + n0 * K, K, op + n0, N); break;
      }
    }
    if (bias) acc.add_(bias->to(at::kFloat));
    return acc.to(at::kBFloat16);
  }
#endif
  return at::linear(x, w, bias);
}

}  // namespace infera
