// Q8_0: 32 values per block: float16 d, then 32 int8 quants; value = q * d.
#pragma once

#include "common.h"

namespace tcq {

struct Q8_0 {
  static constexpr int64_t kType = 8, kBlock = 32, kBytes = 34, kValueBytes = 0;
  static constexpr int64_t kGroup = 32;
  static constexpr int kCodeBits = 8;   // codes q + 128: 0-255

  // Integer codes for the 8-bit-activation products: value = scale * code + offset, code unsigned.
  static void codes(const uint8_t* __restrict b, uint8_t* __restrict c, float* scale, float* offset) {
    const float d = half_at(b);
#ifdef TCQ_VECTOR
    store_codes(c, _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 2)),
                                    _mm256_set1_epi8(-128)));   // q + 128
#else
    for (int i = 0; i < kBlock; ++i) c[i] = b[2 + i] ^ 0x80;   // q + 128
#endif
    scale[0] = d;
    offset[0] = -128.f * d;
  }

  static void decode(const uint8_t* b, float* y) {
    const float d = half_at(b);
    const int8_t* q = reinterpret_cast<const int8_t*>(b + 2);
    for (int i = 0; i < kBlock; ++i) y[i] = static_cast<float>(q[i]) * d;
  }
#ifdef TCQ_AVX512
  static void decode(const uint8_t* b, __m512* v) {
    const __m512 d = _mm512_set1_ps(half_at(b));
    v[0] = _mm512_mul_ps(widen_i8_ps(b + 2), d);
    v[1] = _mm512_mul_ps(widen_i8_ps(b + 18), d);
  }
#elif defined(TCQ_AVX2)
  static void decode(const uint8_t* b, __m256* v) {
    const __m256 d = _mm256_set1_ps(half_at(b));
    for (int i = 0; i < 4; ++i) v[i] = _mm256_mul_ps(widen8_i8_ps(b + 2 + 8 * i), d);
  }
#endif
#ifdef TCQ_AVX2
  // acc[r] += this block times rows r < R of 8-bit x (block32_dot_int8; AVX2 builds only: with AVX-512 the
  // float32 product is as fast).
  template <int R>
  static void dot_int8(const uint8_t* b, const int8_t* q, int64_t ldq, const float* dx, const float* xs, int64_t ldg,
                       __m256* acc) {
    block32_dot_int8<R, true>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 2)), half_at(b), 0.f, q, ldq, dx,
                              xs, ldg, acc);
  }
#endif
};

}  // namespace tcq
