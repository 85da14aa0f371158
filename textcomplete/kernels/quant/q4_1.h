// Q4_1: 32 values per block: float16 d and m, then 16 bytes of nibbles (as Q4_0); value = q * d + m.
#pragma once

#include "common.h"

namespace tcq {

struct Q4_1 {
  static constexpr int64_t kType = 3, kBlock = 32, kBytes = 20, kValueBytes = 0;
  static constexpr int64_t kGroup = 32;

  static void codes(const uint8_t* b, uint8_t* c, float* scale, float* offset) {
    for (int j = 0; j < 16; ++j) {
      c[j] = b[4 + j] & 15;
      c[j + 16] = b[4 + j] >> 4;
    }
    scale[0] = half_at(b);
    offset[0] = half_at(b + 2);
  }

  static void decode(const uint8_t* b, float* y) {
    const float d = half_at(b), m = half_at(b + 2);
    for (int j = 0; j < 16; ++j) {
      y[j] = static_cast<float>(b[4 + j] & 15) * d + m;
      y[j + 16] = static_cast<float>(b[4 + j] >> 4) * d + m;
    }
  }
#ifdef TCQ_AVX512
  static void decode(const uint8_t* b, __m512* v) {
    const __m512 table = _mm512_add_ps(_mm512_mul_ps(iota16(), _mm512_set1_ps(half_at(b))),
                                       _mm512_set1_ps(half_at(b + 2)));
    const __m512i q = widen_u8(b + 4);
    v[0] = lookup16(q, table);
    v[1] = lookup16(_mm512_srli_epi32(q, 4), table);
  }
#endif
};

}  // namespace tcq
