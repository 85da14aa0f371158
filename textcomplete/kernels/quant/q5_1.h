// Q5_1: 32 values per block: float16 d and m, 32 fifth bits (as Q5_0), 16 bytes of nibbles;
// value = q * d + m.
#pragma once

#include "common.h"

namespace tcq {

struct Q5_1 {
  static constexpr int64_t kType = 7, kBlock = 32, kBytes = 24, kValueBytes = 0;
  static constexpr int64_t kGroup = 32;

  static void codes(const uint8_t* b, uint8_t* c, float* scale, float* offset) {
    const uint32_t qh = load_u32(b + 4);
    for (int j = 0; j < 16; ++j) {
      c[j] = (b[8 + j] & 15) | (((qh >> j) & 1) << 4);
      c[j + 16] = (b[8 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
    }
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
#endif
};

}  // namespace tcq
