// Q5_0: 32 values per block: float16 d, a 32-bit word whose bit i is value i's fifth bit, then 16 bytes of
// nibbles (as Q4_0); value = (q - 16) * d.
#pragma once

#include "common.h"

namespace tcq {

struct Q5_0 {
  static constexpr int64_t kType = 6, kBlock = 32, kBytes = 22, kValueBytes = 0;
  static constexpr int64_t kGroup = 32;
  static constexpr int kCodeBits = 5;

  static void codes(const uint8_t* __restrict b, uint8_t* __restrict c, float* scale, float* offset) {
#ifdef TCQ_VECTOR
    store_codes(c, _mm256_or_si256(nibble_codes(b + 6), fifth_bit_bytes(load_u32(b + 2))));
#else
    const uint32_t qh = load_u32(b + 2);
    for (int j = 0; j < 16; ++j) {
      c[j] = (b[6 + j] & 15) | (((qh >> j) & 1) << 4);
      c[j + 16] = (b[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
    }
#endif
    scale[0] = half_at(b);
    offset[0] = -16.f * scale[0];
  }

  static void decode(const uint8_t* b, float* y) {
    const float d = half_at(b);
    const uint32_t qh = load_u32(b + 2);
    for (int j = 0; j < 16; ++j) {
      const int lo = (b[6 + j] & 15) | (((qh >> j) & 1) << 4);
      const int hi = (b[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
      y[j] = static_cast<float>(lo - 16) * d;
      y[j + 16] = static_cast<float>(hi - 16) * d;
    }
  }
#ifdef TCQ_AVX512
  static void decode(const uint8_t* b, __m512* v) {
    const __m512 d = _mm512_set1_ps(half_at(b));
    const __m512 lo = _mm512_mul_ps(_mm512_sub_ps(iota16(), _mm512_set1_ps(16)), d);   // codes 0-15
    const __m512 hi = _mm512_mul_ps(iota16(), d);                                      // codes 16-31
    const __m512i qh = _mm512_set1_epi32(static_cast<int>(load_u32(b + 2)));   // bit i: value i's fifth bit
    const __m512i q = widen_u8(b + 6);
    v[0] = lookup32(five_bit_code(q, bit_to_fifth(qh, 0)), lo, hi);
    v[1] = lookup32(five_bit_code(_mm512_srli_epi32(q, 4), bit_to_fifth(qh, 16)), lo, hi);
  }
#elif defined(TCQ_AVX2)
  // (q - 16) * d as q * d - 16 * d, fused (one rounding, as Q4_0). Value i's fifth bit is bit i of qh: bit i
  // of qh << 4 for values 0-15, of qh >> 12 for 16-31, shifted right by i and i - 16 onto bit 4.
  static void decode(const uint8_t* b, __m256* v) {
    const float scale = half_at(b);
    const __m256 d = _mm256_set1_ps(scale), offset = _mm256_set1_ps(-16.f * scale);
    const uint32_t qh = load_u32(b + 2);
    const __m256i low_bits = _mm256_set1_epi32(static_cast<int>(qh << 4));
    const __m256i high_bits = _mm256_set1_epi32(static_cast<int>(qh >> 12));
    for (int h = 0; h < 2; ++h) {
      const __m256i q = widen8_u8(b + 6 + 8 * h);
      v[h] = _mm256_fmadd_ps(to_float(_mm256_or_si256(low_nibble(q), fifth_bits(low_bits, 8 * h))), d, offset);
      v[2 + h] = _mm256_fmadd_ps(to_float(_mm256_or_si256(high_nibble(q), fifth_bits(high_bits, 8 * h))), d, offset);
    }
  }
#endif
#ifdef TCQ_AVX2
  // acc[r] += this block times rows r < R of 8-bit x (block32_dot_int8; AVX2 builds only: with AVX-512 the
  // float32 product is as fast).
  template <int R>
  static void dot_int8(const uint8_t* b, const int8_t* q, int64_t ldq, const float* dx, const float* xs, int64_t ldg,
                       __m256* acc) {
    const __m256i codes = _mm256_or_si256(nibble_codes(b + 6), fifth_bit_bytes(load_u32(b + 2)));
    block32_dot_int8<R, true>(_mm256_sub_epi8(codes, _mm256_set1_epi8(16)), half_at(b), 0.f, q, ldq, dx, xs, ldg, acc);
  }
#endif
};

}  // namespace tcq
