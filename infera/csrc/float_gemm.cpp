// y = x W^T (+ b) with bfloat16 weights for the few rows of a decode step.
//
// A decode step multiplies 1 to a few rows by each weight: the product is bound by reading the
// weights, once. PyTorch's bf16 GEMM (oneDNN) took 2-3x that time at one row on CPUs without AMX
// (measured 26 GB/s from L3 where float32 reached 36). Here each thread streams its share of
// the weight rows once, four rows at a time, and takes AVX512-BF16 dot products (fp32
// accumulation) with every input row while the weights are in L1. Each output is summed in the
// same order whatever the number of rows, so a sequence gets the same values alone or in a batch.
// More rows, other dtypes or CPUs without AVX512-BF16 take at::linear.
#include "ops.h"

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define INFERA_BF16_DOT 1
#endif

namespace infera {

#ifdef INFERA_BF16_DOT
namespace {

constexpr int64_t ROWS = 4;  // weight rows streamed together
constexpr int64_t MB = 4;    // input rows per pass over them (ROWS * MB accumulators)

inline __m512bh load32(const c10::BFloat16* p) {
  return reinterpret_cast<__m512bh>(_mm512_loadu_si512(reinterpret_cast<const void*>(p)));
}

// out[m, n0 + r] for r < nr, m < nm: dot products of x rows m and w rows n0 + r over K (K % 32 == 0)
template <int64_t NR, int64_t NM>
inline void dots(const c10::BFloat16* x, const c10::BFloat16* w, int64_t K, float* out, int64_t ld_out) {
  __m512 acc[NR][NM];
  for (int64_t r = 0; r < NR; ++r)
    for (int64_t m = 0; m < NM; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    __m512bh xv[NM];
    for (int64_t m = 0; m < NM; ++m) xv[m] = load32(x + m * K + k);
    for (int64_t r = 0; r < NR; ++r) {
      const __m512bh wv = load32(w + r * K + k);
      for (int64_t m = 0; m < NM; ++m) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv, xv[m]);
    }
  }
  for (int64_t r = 0; r < NR; ++r)
    for (int64_t m = 0; m < NM; ++m) out[m * ld_out + r] = _mm512_reduce_add_ps(acc[r][m]);
}

template <int64_t NR>
inline void dots_rows(const c10::BFloat16* x, int64_t M, const c10::BFloat16* w, int64_t K, float* out,
                      int64_t ld_out) {
  for (int64_t m0 = 0; m0 < M; m0 += MB) {
    const c10::BFloat16* xm = x + m0 * K;
    float* o = out + m0 * ld_out;
    switch (std::min(MB, M - m0)) {
      case 1: dots<NR, 1>(xm, w, K, o, ld_out); break;
      case 2: dots<NR, 2>(xm, w, K, o, ld_out); break;
      case 3: dots<NR, 3>(xm, w, K, o, ld_out); break;
      default: dots<NR, 4>(xm, w, K, o, ld_out); break;
    }
  }
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
