// Q5_1: 32 values per block: float16 d and m, 32 fifth bits (as Q5_0), 16 bytes of nibbles;
// value = q * d + m.
#pragma once

#include "common.h"

namespace tcq {

struct Q5_1 {
  static constexpr int64_t kType = 7, kBlock = 32, kBytes = 24, kValueBytes = 0;
  static constexpr int64_t kGroup = 32;
  static constexpr int kCodeBits = 5;

  static void codes(const uint8_t* __restrict b, uint8_t* __restrict c, float* scale, float* offset) {
#ifdef TCQ_VECTOR
    store_codes(c, _mm256_or_si256(nibble_codes(b + 8), fifth_bit_bytes(load_u32(b + 4))));
#else
    const uint32_t qh = load_u32(b + 4);
    for (int j = 0; j < 16; ++j) {
      c[j] = (b[8 + j] & 15) | (((qh >> j) & 1) << 4);
      c[j + 16] = (b[8 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
    }
#endif
    scale[0] = half_at(b);
    offset[0] = half_at(b + 2);
  }

  static void decode(const uint8_t* b, float* y) {
    const float d = half_at(b), m = half_at(b + 2);
    const uint32_t qh = load_u32(b + 4);
    for (int j = 0; j < 16; ++j) {
      const int lo = (b[8 + j] & 15) | (((qh >> j) & 1) << 4);
      const int hi = (b[8 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
      y[j] = static_cast<float>(lo) * d + m;
      y[j + 16] = static_cast<float>(hi) * d + m;
    }
  }
#ifdef TCQ_AVX512
  static void decode(const uint8_t* b, __m512* v) {
    const __m512 d = _mm512_set1_ps(half_at(b)), m = _mm512_set1_ps(half_at(b + 2));
    const __m512 lo = _mm512_add_ps(_mm512_mul_ps(iota16(), d), m);
    const __m512 hi = _mm512_add_ps(_mm512_mul_ps(_mm512_add_ps(iota16(), _mm512_set1_ps(16)), d), m);
    const __m512i qh = _mm512_set1_epi32(static_cast<int>(load_u32(b + 4)));   // bit i: value i's fifth bit
    const __m512i q = widen_u8(b + 8);
    v[0] = lookup32(five_bit_code(q, bit_to_fifth(qh, 0)), lo, hi);
    v[1] = lookup32(five_bit_code(_mm512_srli_epi32(q, 4), bit_to_fifth(qh, 16)), lo, hi);
  }
#elif defined(TCQ_AVX2)
  static void decode(const uint8_t* b, __m256* v) {   // q * d + m; the fifth bits as in Q5_0
    const __m256 d = _mm256_set1_ps(half_at(b)), m = _mm256_set1_ps(half_at(b + 2));
    const uint32_t qh = load_u32(b + 4);
    const __m256i low_bits = _mm256_set1_epi32(static_cast<int>(qh << 4));
    const __m256i high_bits = _mm256_set1_epi32(static_cast<int>(qh >> 12));
    for (int h = 0; h < 2; ++h) {
      const __m256i q = widen8_u8(b + 8 + 8 * h);
      const __m256i lo = _mm256_or_si256(low_nibble(q), fifth_bits(low_bits, 8 * h));
      const __m256i hi = _mm256_or_si256(high_nibble(q), fifth_bits(high_bits, 8 * h));
      v[h] = _mm256_add_ps(_mm256_mul_ps(to_float(lo), d), m);
      v[2 + h] = _mm256_add_ps(_mm256_mul_ps(to_float(hi), d), m);
    }
  }
#endif
#ifdef TCQ_AVX2
  // acc[r] += this block times rows r < R of 8-bit x (block32_dot_int8; AVX2 builds only: with AVX-512 the
  // float32 product is as fast).
  template <int R>
  static void dot_int8(const uint8_t* b, const int8_t* q, int64_t ldq, const float* dx, const float* xs, int64_t ldg,
                       __m256* acc) {
    const __m256i codes = _mm256_or_si256(nibble_codes(b + 8), fifth_bit_bytes(load_u32(b + 4)));
    block32_dot_int8<R, false>(codes, half_at(b), half_at(b + 2), q, ldq, dx, xs, ldg, acc);
  }
#endif
};

}  // namespace tcq
