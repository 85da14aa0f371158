// F32: plain float32 values. The kernels walk 16 values as one block; a row's last k % 16 go one by one.
#pragma once

#include "common.h"

namespace tcq {

struct F32 {
  static constexpr int64_t kType = 0, kBlock = 16, kBytes = 64, kValueBytes = 4;

  static float value(const uint8_t* p) {
    float v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static void decode(const uint8_t* b, float* y) {
    for (int i = 0; i < kBlock; ++i) y[i] = value(b + 4 * i);
  }
#ifdef TCQ_AVX512
  static void decode(const uint8_t* b, __m512* v) { v[0] = _mm512_loadu_ps(b); }
#elif defined(TCQ_AVX2)
  static void decode(const uint8_t* b, __m256* v) {
    v[0] = _mm256_loadu_ps(reinterpret_cast<const float*>(b));
    v[1] = _mm256_loadu_ps(reinterpret_cast<const float*>(b + 32));
  }
#endif
};

}  // namespace tcq
