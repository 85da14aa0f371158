// BF16: bfloat16 values, the high 16 bits of a float32. 16 values make one block as the kernels walk them.
#pragma once

#include "common.h"

namespace tcq {

struct BF16 {
  static constexpr int64_t kType = 30, kBlock = 16, kBytes = 32, kValueBytes = 2;

  static float value(const uint8_t* p) {
    const uint32_t bits = static_cast<uint32_t>(load_u16(p)) << 16;
    float v;
    std::memcpy(&v, &bits, sizeof v);
    return v;
  }
  static void decode(const uint8_t* b, float* y) {
    for (int i = 0; i < kBlock; ++i) y[i] = value(b + 2 * i);
  }
#ifdef TCQ_AVX512
  static void decode(const uint8_t* b, __m512* v) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
    v[0] = _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
#elif defined(TCQ_AVX2)
  static void decode(const uint8_t* b, __m256* v) {
    v[0] = vec_load(reinterpret_cast<const c10::BFloat16*>(b));
    v[1] = vec_load(reinterpret_cast<const c10::BFloat16*>(b + 16));
  }
#endif
};

}  // namespace tcq
