// The running ISA level's float vector under one set of names (`lanes`), for the kernels whose
// AVX-512 and AVX2 paths differ only in width. INFERA_LANES is defined where a vector level runs.
#pragma once

#include <type_traits>

#if defined(__AVX512F__)
#include "vec512.h"
#elif defined(__AVX2__)
#include "vec256.h"
#endif

#if defined(__AVX512F__) || defined(__AVX2__)
#define INFERA_LANES 1
// The level's float vector under one set of names, for the kernels whose AVX-512 and AVX2 paths
// differ only in width; arithmetic is the compilers' vector operators (+ - * /, with scalars).
namespace lanes {
using namespace infera_vec;
#if defined(__AVX512F__)
using vec = __m512;
constexpr int64_t W = 16;
template <typename T> inline vec load(const T* p) { return load16(p); }
template <typename T> inline void store(T* p, vec x) { store16(p, x); }
template <typename T> inline vec round(vec x) { return round16<T>(x); }
inline vec exp(vec x) { return exp512(x); }
inline vec zero() { return _mm512_setzero_ps(); }
inline float sum(vec x) { return _mm512_reduce_add_ps(x); }  // pairwise
#else
using vec = __m256;
constexpr int64_t W = 8;
template <typename T> inline vec load(const T* p) { return load8(p); }
template <typename T> inline void store(T* p, vec x) { store8(p, x); }
template <typename T> inline vec round(vec x) { return round8<T>(x); }
inline vec exp(vec x) { return exp256(x); }
inline vec zero() { return _mm256_setzero_ps(); }
inline float sum(vec x) { return hsum8(x); }
#endif
// the stored dtypes load() reads
template <typename T> constexpr bool loads = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>;
}  // namespace lanes
#endif
