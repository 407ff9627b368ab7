// Fused element-wise kernels for the CPU decoder layer: each replaces several small torch ops
// (and their dispatch cost, which dominates a small model's decode step). Rounding follows
// HF transformers' op order, so bfloat16 results match its unfused ops to the last bit or so.
#include <ATen/Parallel.h>

#include "ops.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "vec.h"

namespace {

template <typename T>
inline T round_to(float x) {
  return static_cast<T>(x);
}

// y = w * (x / rms(x)), in float, with the normalized value rounded to the input dtype first.
template <typename scalar_t, typename weight_t>
inline void norm_row(const scalar_t* x, const weight_t* w, scalar_t* y, int64_t H, float eps) {
  float ss = 0.f;
_Pragma("omp simd reduction(+ : ss)")
  for (int64_t i = 0; i < H; ++i) {
    const float v = static_cast<float>(x[i]);
    ss += v * v;
  }
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(H) + eps);
_Pragma("omp simd")
  for (int64_t i = 0; i < H; ++i) {
    const float n = static_cast<float>(round_to<scalar_t>(static_cast<float>(x[i]) * inv));
    y[i] = round_to<scalar_t>(static_cast<float>(w[i]) * n);
  }
}

// o = silu(g) * u over I values, the activation rounded to the dtype first (as torch's unfused ops).
template <typename scalar_t>
void silu_mul_row(const scalar_t* g, const scalar_t* u, scalar_t* o, int64_t I) {
  int64_t i = 0;
#ifdef INFERA_LANES
  if constexpr (lanes::loads<scalar_t>) {
    for (; i + lanes::W <= I; i += lanes::W) {
      const lanes::vec gv = lanes::load(g + i);
      const lanes::vec act = lanes::round<scalar_t>(gv / (1.f + lanes::exp(-gv)));  // torch's silu
      lanes::store(o + i, lanes::round<scalar_t>(act * lanes::load(u + i)));
    }
  }
#endif
  for (; i < I; ++i) {
    const float gv = static_cast<float>(g[i]);
    const float act = static_cast<float>(round_to<scalar_t>(gv / (1.f + std::exp(-gv))));
    o[i] = round_to<scalar_t>(act * static_cast<float>(u[i]));
  }
}

void check_rows(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "expected [tokens, hidden] with contiguous rows");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(1) && w.is_contiguous(), "weight must be [hidden]");
}

}  // namespace

namespace infera {

// RMSNorm of each row of x: [T, H] -> new [T, H].
at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps) {
  check_rows(x, weight);
  auto out = at::empty({x.size(0), x.size(1)}, x.options());
  const int64_t T = x.size(0), H = x.size(1), xs = x.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND(at::ScalarType::BFloat16, x.scalar_type(), "rms_norm", [&] {
    using x_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND(at::ScalarType::BFloat16, weight.scalar_type(), "rms_norm_w", [&] {
      const x_t* xp = x.data_ptr<x_t>();
      const scalar_t* wp = weight.data_ptr<scalar_t>();
      x_t* op = out.data_ptr<x_t>();
      at::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {
        for (int64_t t = b; t < e; ++t) norm_row(xp + t * xs, wp, op + t * H, H, static_cast<float>(eps));
      });
    });
  });
  return out;
}

// residual += x (rounded to the dtype, as a torch add); x = rms_norm(residual). In place.
void fused_add_rms_norm(at::Tensor x, at::Tensor residual, at::Tensor weight, double eps) {
  check_rows(x, weight);
  TORCH_CHECK(x.is_contiguous() && residual.is_contiguous() && x.sizes() == residual.sizes() &&
              x.scalar_type() == residual.scalar_type(), "x and residual must match and be contiguous");
  const int64_t T = x.size(0), H = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND(at::ScalarType::BFloat16, x.scalar_type(), "fused_add_rms_norm", [&] {
    using x_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND(at::ScalarType::BFloat16, weight.scalar_type(), "fused_add_rms_norm_w", [&] {
      x_t* xp = x.data_ptr<x_t>();
      x_t* rp = residual.data_ptr<x_t>();
      const scalar_t* wp = weight.data_ptr<scalar_t>();
      at::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {
        for (int64_t t = b; t < e; ++t) {
          x_t* xr = xp + t * H;
          x_t* rr = rp + t * H;
_Pragma("omp simd")
          for (int64_t i = 0; i < H; ++i) rr[i] = round_to<x_t>(static_cast<float>(xr[i]) + static_cast<float>(rr[i]));
          norm_row(rr, wp, xr, H, static_cast<float>(eps));
        }
      });
    });
  });
}

// Rotate-half RoPE applied in place to q [T, Hq, D] and k [T, Hkv, D] (rows may be strided, as
// views into a fused QKV output), with cos/sin [max_position, D/2] float32 looked up by positions.
void rotary(at::Tensor q, at::Tensor k, at::Tensor cos, at::Tensor sin, at::Tensor positions) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.stride(2) == 1 && k.stride(2) == 1, "bad q/k layout");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && cos.scalar_type() == at::kFloat &&
              sin.scalar_type() == at::kFloat && cos.is_contiguous() && sin.is_contiguous(), "bad dtypes");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous(), "positions must be int64");
  const int64_t T = q.size(0), D = q.size(2), half = D / 2;
  TORCH_CHECK(cos.size(1) == half && k.size(2) == D, "cos/sin must be [positions, head_dim / 2]");
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t max_pos = cos.size(0);
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(pos[t] >= 0 && pos[t] < max_pos, "position out of range");
  AT_DISPATCH_FLOATING_TYPES_AND(at::ScalarType::BFloat16, q.scalar_type(), "rotary", [&] {
    const float* cp = cos.data_ptr<float>();
    const float* sp = sin.data_ptr<float>();
    auto apply = [&](scalar_t* base, int64_t heads, int64_t row_stride, int64_t head_stride, int64_t t) {
      const float* c = cp + pos[t] * half;
      const float* s = sp + pos[t] * half;
      for (int64_t h = 0; h < heads; ++h) {
        scalar_t* x = base + t * row_stride + h * head_stride;
_Pragma("omp simd")
        for (int64_t i = 0; i < half; ++i) {
          const float ci = static_cast<float>(round_to<scalar_t>(c[i]));
          const float si = static_cast<float>(round_to<scalar_t>(s[i]));
          const float x1 = static_cast<float>(x[i]), x2 = static_cast<float>(x[i + half]);
          const float a = static_cast<float>(round_to<scalar_t>(x1 * ci)), b = static_cast<float>(round_to<scalar_t>(x2 * si));
          const float e = static_cast<float>(round_to<scalar_t>(x2 * ci)), f = static_cast<float>(round_to<scalar_t>(x1 * si));
          x[i] = round_to<scalar_t>(a - b);
          x[i + half] = round_to<scalar_t>(e + f);
        }
      }
    };
    scalar_t* qp = q.data_ptr<scalar_t>();
    scalar_t* kp = k.data_ptr<scalar_t>();
    at::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        apply(qp, q.size(1), q.stride(0), q.stride(1), t);
        apply(kp, k.size(1), k.stride(0), k.stride(1), t);
      }
    });
  });
}

// silu(gate) * up for x = [gate | up]: [T, 2I] -> [T, I].
at::Tensor silu_and_mul(at::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(1) % 2 == 0, "expected [tokens, 2 * intermediate]");
  const int64_t T = x.size(0), I = x.size(1) / 2, xs = x.stride(0);
  auto out = at::empty({T, I}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::ScalarType::BFloat16, x.scalar_type(), "silu_and_mul", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, 4, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const scalar_t* g = xp + t * xs;
        const scalar_t* u = g + I;
        scalar_t* o = op + t * I;
        silu_mul_row(g, u, o, I);
      }
    });
  });
  return out;
}

// logits[r, t] = -inf for each row r in `rows` and token t < vocab whose bit (bit t % 32 of word
// t / 32) is clear in bitmask[r] (xgrammar's int32 bitsets); in place, float32 logits.
void apply_token_bitmask(at::Tensor logits, at::Tensor bitmask, const std::vector<int64_t>& rows,
                         int64_t vocab) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.stride(1) == 1,
              "logits must be float32 [R, V] with contiguous rows");
  TORCH_CHECK(bitmask.dim() == 2 && bitmask.scalar_type() == at::kInt && bitmask.is_contiguous() &&
              bitmask.size(1) * 32 >= vocab && vocab <= logits.size(1), "bitmask must be int32 [R, ceil(V / 32)]");
  for (int64_t r : rows)
    TORCH_CHECK(r >= 0 && r < logits.size(0) && r < bitmask.size(0), "row ", r, " is out of range");
  float* lp = logits.data_ptr<float>();
  const auto* bp = reinterpret_cast<const uint32_t*>(bitmask.data_ptr<int32_t>());
  const int64_t ls = logits.stride(0), W = bitmask.size(1);
  at::parallel_for(0, static_cast<int64_t>(rows.size()), 8, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      float* l = lp + rows[i] * ls;
      const uint32_t* w = bp + rows[i] * W;
      for (int64_t j = 0; j * 32 < vocab; ++j) {
        const uint32_t bits = w[j];
        if (bits == 0xFFFFFFFFu) continue;
        const int64_t base = j * 32, n = std::min<int64_t>(32, vocab - base);
#if defined(__AVX512F__)
        if (n == 32) {
          const __m512 ninf = _mm512_set1_ps(-INFINITY);
          _mm512_mask_storeu_ps(l + base, static_cast<__mmask16>(~bits & 0xFFFFu), ninf);
          _mm512_mask_storeu_ps(l + base + 16, static_cast<__mmask16>(~bits >> 16), ninf);
          continue;
        }
#elif defined(__AVX2__)
        if (n == 32) {  // 8 tokens at a time: lane k's bit to its sign, the blend's mask (the row is this thread's)
          const __m256 ninf = _mm256_set1_ps(-INFINITY);
          const __m256i to_sign = _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24);
          for (int64_t k = 0; k < 32; k += 8) {
            const __m256 clear = _mm256_castsi256_ps(_mm256_sllv_epi32(_mm256_set1_epi32(~bits >> k), to_sign));
            _mm256_storeu_ps(l + base + k, _mm256_blendv_ps(_mm256_loadu_ps(l + base + k), ninf, clear));
          }
          continue;
        }
#endif
        for (int64_t k = 0; k < n; ++k)
          if (!((bits >> k) & 1u)) l[base + k] = -INFINITY;
      }
    }
  });
}

}  // namespace infera

namespace {

// sum(e^(x[i] - best)) over i < n, accurate to a few ulp at any n: blocks of up to 256 values are
// summed in the vector's lanes (in 8 partial sums without a vector path), lanes and blocks then
// combined pairwise. (One running float sum was 4e-5 off over 49155 logits: the many small terms
// vanish against the large sum.)
template <typename scalar_t>
float sum_exp(const scalar_t* x, int64_t n, float best) {
  constexpr int64_t BLOCK = 256;
  if (n > BLOCK) {
    const int64_t half = (n / 2 + 15) / 16 * 16;  // whole vectors on the left
    return sum_exp(x, half, best) + sum_exp(x + half, n - half, best);
  }
  int64_t i = 0;
  float sum = 0.f;
#ifdef INFERA_LANES
  if constexpr (lanes::loads<scalar_t>) {
    lanes::vec acc = lanes::zero();
    for (; i + lanes::W <= n; i += lanes::W) acc += lanes::exp(lanes::load(x + i) - best);
    sum = lanes::sum(acc);
  }
#endif
  float part[8] = {};  // the tail, or the whole block without a vector path
  for (; i < n; ++i) part[i % 8] += std::exp(static_cast<float>(x[i]) - best);
  return sum + (((part[0] + part[4]) + (part[2] + part[6])) + ((part[1] + part[5]) + (part[3] + part[7])));
}

// The first index of the largest value of x[0..V) (NaN ignored; 0 if none is above -inf) and, with
// `with_prob`, its softmax probability 1 / sum(exp(x - max)).
template <typename scalar_t>
void top_token_row(const scalar_t* x, int64_t V, bool with_prob, int64_t& id, float& prob) {
  float best = -INFINITY;
  int64_t arg = 0, i = 0;
  // the vector paths: each lane keeps its first maximum, then the first index of the largest
#if defined(__AVX512F__)
  if constexpr (lanes::loads<scalar_t>) {
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    __m512i vidx = _mm512_setzero_si512(), cur = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i step = _mm512_set1_epi32(16);
    for (; i + 16 <= V; i += 16) {
      const __m512 v = infera_vec::load16(x + i);
      const __mmask16 gt = _mm512_cmp_ps_mask(v, vmax, _CMP_GT_OQ);
      vmax = _mm512_mask_mov_ps(vmax, gt, v);
      vidx = _mm512_mask_mov_epi32(vidx, gt, cur);
      cur = _mm512_add_epi32(cur, step);
    }
    best = _mm512_reduce_max_ps(vmax);
    arg = _mm512_mask_reduce_min_epi32(_mm512_cmp_ps_mask(vmax, _mm512_set1_ps(best), _CMP_EQ_OQ), vidx);
  }
#elif defined(__AVX2__)
  if constexpr (lanes::loads<scalar_t>) {
    __m256 vmax = _mm256_set1_ps(-INFINITY);
    __m256i vidx = _mm256_setzero_si256(), cur = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i step = _mm256_set1_epi32(8);
    for (; i + 8 <= V; i += 8) {
      const __m256 v = infera_vec::load8(x + i);
      const __m256 gt = _mm256_cmp_ps(v, vmax, _CMP_GT_OQ);
      vmax = _mm256_blendv_ps(vmax, v, gt);
      vidx = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(vidx), _mm256_castsi256_ps(cur), gt));
      cur = _mm256_add_epi32(cur, step);
    }
    alignas(32) float m[8];
    alignas(32) int32_t idx[8];
    _mm256_store_ps(m, vmax);
    _mm256_store_si256(reinterpret_cast<__m256i*>(idx), vidx);
    for (int l = 0; l < 8; ++l)
      if (m[l] > best || (m[l] == best && idx[l] < arg)) best = m[l], arg = idx[l];
  }
#endif
  for (; i < V; ++i) {
    const float v = static_cast<float>(x[i]);
    if (v > best) best = v, arg = i;
  }
  id = arg;
  if (with_prob) prob = best == -INFINITY ? 0.f : 1.f / sum_exp(x, V, best);
}

}  // namespace

namespace infera {

// Each row's most likely token of logits [R, V] (float32 or bfloat16, contiguous rows), as
// torch.argmax picks it, and with `with_probs` its probability under the softmax (else zeros):
// one read of the logits, nothing [R, V] allocated.
std::tuple<at::Tensor, at::Tensor> top_tokens(at::Tensor logits, bool with_probs) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, "logits must be [R, V] with contiguous rows");
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16,
              "logits must be float32 or bfloat16");
  const int64_t R = logits.size(0), V = logits.size(1), ls = logits.stride(0);
  auto ids = at::empty({R}, at::kLong);
  auto probs = at::zeros({R}, at::kFloat);
  int64_t* ip = ids.data_ptr<int64_t>();
  float* pp = probs.data_ptr<float>();
  auto run = [&](const auto* lp) {
    at::parallel_for(0, R, 1, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) top_token_row(lp + r * ls, V, with_probs, ip[r], pp[r]);
    });
  };
  if (logits.scalar_type() == at::kBFloat16)
    run(logits.data_ptr<c10::BFloat16>());
  else
    run(logits.data_ptr<float>());
  return {ids, probs};
}

}  // namespace infera
