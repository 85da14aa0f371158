// Q4_1: 32 values per block: float16 d and m, then 16 bytes of nibbles (as Q4_0); value = q * d + m.
#pragma once

#include "common.h"

namespace tcq {

struct Q4_1 {
  static constexpr int64_t kType = 3, kBlock = 32, kBytes = 20, kValueBytes = 0;
  static constexpr int64_t kGroup = 32;
  static constexpr int kCodeBits = 4;

  static void codes(const uint8_t* __restrict b, uint8_t* __restrict c, float* scale, float* offset) {
#ifdef TCQ_VECTOR
    store_codes(c, nibble_codes(b + 4));
#else
    for (int j = 0; j < 16; ++j) {
      c[j] = b[4 + j] & 15;
      c[j + 16] = b[4 + j] >> 4;
    }
#endif
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
#elif defined(TCQ_AVX2)
  static void decode(const uint8_t* b, __m256* v) {   // q * d + m, rounded twice like the portable decoder
    const __m256 d = _mm256_set1_ps(half_at(b)), m = _mm256_set1_ps(half_at(b + 2));
    for (int h = 0; h < 2; ++h) {
      const __m256i q = widen8_u8(b + 4 + 8 * h);
      v[h] = _mm256_add_ps(_mm256_mul_ps(to_float(low_nibble(q)), d), m);
      v[2 + h] = _mm256_add_ps(_mm256_mul_ps(to_float(high_nibble(q)), d), m);
    }
  }
  // The float32 product, two blocks at a time (nibble_pair_dot), on x made by prepare_x.
  static constexpr int64_t kDotBlocks = 2;
  static void prepare_x(const float* x, float* out, int64_t k) { nibble_pair_prepare_x(x, out, k); }
  template <int R>
  static void dot_float(const uint8_t* b, const float* x, int64_t ldx, const float* xs, int64_t ldg, __m256* acc) {
    const __m128 dm = _mm_cvtph_ps(_mm_unpacklo_epi32(_mm_cvtsi32_si128(static_cast<int>(load_u32(b))),
                                                      _mm_cvtsi32_si128(static_cast<int>(load_u32(b + kBytes)))));
    nibble_pair_dot<R>(b + 4, b + kBytes + 4, dm, x, ldx, xs, ldg, acc);
  }
#endif
#ifdef TCQ_AVX2
  // acc[r] += this block times rows r < R of 8-bit x (block32_dot_int8; AVX2 builds only: with AVX-512 the
  // float32 product is as fast).
  template <int R>
  static void dot_int8(const uint8_t* b, const int8_t* q, int64_t ldq, const float* dx, const float* xs, int64_t ldg,
                       __m256* acc) {
    block32_dot_int8<R, false>(nibble_codes(b + 4), half_at(b), half_at(b + 2), q, ldq, dx, xs, ldg, acc);
  }
#endif
};

}  // namespace tcq
