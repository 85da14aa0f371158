// F16: IEEE float16 values, widened exactly. 16 values make one block as the kernels walk them.
#pragma once

#include "common.h"

namespace tcq {

struct F16 {
  static constexpr int64_t kType = 1, kBlock = 16, kBytes = 32, kValueBytes = 2;

  static float value(const uint8_t* p) { return half_at(p); }
  static void decode(const uint8_t* b, float* y) {
    for (int i = 0; i < kBlock; ++i) y[i] = value(b + 2 * i);
  }
#ifdef TCQ_AVX512
  static void decode(const uint8_t* b, __m512* v) {
    v[0] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
  }
#elif defined(TCQ_AVX2)
  static void decode(const uint8_t* b, __m256* v) {
    v[0] = vec_load(reinterpret_cast<const c10::Half*>(b));
    v[1] = vec_load(reinterpret_cast<const c10::Half*>(b + 16));
  }
#endif
};

}  // namespace tcq
