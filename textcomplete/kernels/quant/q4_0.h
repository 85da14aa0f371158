// Q4_0: 32 values per block: float16 d, then 16 bytes whose low nibbles are values 0-15 and high nibbles
// values 16-31; value = (q - 8) * d.
#pragma once

#include "common.h"

namespace tcq {

struct Q4_0 {
  static constexpr int64_t kType = 2, kBlock = 32, kBytes = 18, kValueBytes = 0;
  static constexpr int64_t kGroup = 32;
  static constexpr int kCodeBits = 4;

  static void codes(const uint8_t* __restrict b, uint8_t* __restrict c, float* scale, float* offset) {
#ifdef TCQ_VECTOR
    store_codes(c, nibble_codes(b + 2));
#else
    for (int j = 0; j < 16; ++j) {
      c[j] = b[2 + j] & 15;
      c[j + 16] = b[2 + j] >> 4;
    }
#endif
    scale[0] = half_at(b);
    offset[0] = -8.f * scale[0];
  }

  static void decode(const uint8_t* b, float* y) {
    const float d = half_at(b);
    for (int j = 0; j < 16; ++j) {
      y[j] = static_cast<float>((b[2 + j] & 15) - 8) * d;
      y[j + 16] = static_cast<float>((b[2 + j] >> 4) - 8) * d;
    }
  }
#ifdef TCQ_AVX512
  static void decode(const uint8_t* b, __m512* v) {
    const __m512 table = _mm512_mul_ps(_mm512_sub_ps(iota16(), _mm512_set1_ps(8)), _mm512_set1_ps(half_at(b)));
    const __m512i q = widen_u8(b + 2);
    v[0] = lookup16(q, table);
    v[1] = lookup16(_mm512_srli_epi32(q, 4), table);
  }
#elif defined(TCQ_AVX2)
  // (q - 8) * d as q * d - 8 * d, fused: 8 * d is exact, so it rounds once, as the portable decoder does.
  static void decode(const uint8_t* b, __m256* v) {
    const float scale = half_at(b);
    const __m256 d = _mm256_set1_ps(scale), offset = _mm256_set1_ps(-8.f * scale);
    for (int h = 0; h < 2; ++h) {
      const __m256i q = widen8_u8(b + 2 + 8 * h);
      v[h] = _mm256_fmadd_ps(to_float(low_nibble(q)), d, offset);
      v[2 + h] = _mm256_fmadd_ps(to_float(high_nibble(q)), d, offset);
    }
  }
  // The float32 product, two blocks at a time (nibble_pair_dot: value = d * q - 8 * d), on x made by prepare_x.
  static constexpr int64_t kDotBlocks = 2;
  static void prepare_x(const float* x, float* out, int64_t k) { nibble_pair_prepare_x(x, out, k); }
  template <int R>
  static void dot_float(const uint8_t* b, const float* x, int64_t ldx, const float* xs, int64_t ldg, __m256* acc) {
    const __m128 d = _mm_cvtph_ps(_mm_unpacklo_epi16(_mm_cvtsi32_si128(load_u16(b)), _mm_cvtsi32_si128(load_u16(b + kBytes))));
    nibble_pair_dot<R>(b + 2, b + kBytes + 2, _mm_unpacklo_ps(d, _mm_mul_ps(d, _mm_set1_ps(-8.f))), x, ldx, xs, ldg, acc);
  }
#endif
#ifdef TCQ_AVX2
  // acc[r] += this block times rows r < R of 8-bit x (block32_dot_int8; AVX2 builds only: with AVX-512 the
  // float32 product is as fast).
  template <int R>
  static void dot_int8(const uint8_t* b, const int8_t* q, int64_t ldq, const float* dx, const float* xs, int64_t ldg,
                       __m256* acc) {
    block32_dot_int8<R, true>(_mm256_sub_epi8(nibble_codes(b + 2), _mm256_set1_epi8(8)), half_at(b), 0.f, q, ldq, dx,
                              xs, ldg, acc);
  }
#endif
};

}  // namespace tcq
