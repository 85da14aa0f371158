// Q5_K: Q4_K with a fifth bit per value: 256-value super-blocks of 8 sub-blocks with 6-bit scales and mins.
//
// Layout: d, dmin | 12 bytes of scales and mins (as Q4_K) | qh (32 bytes) | qs (128 bytes of nibbles, as
// Q4_K). Value l of sub-block j takes its fifth bit from bit j of qh[l].
#pragma once

#include "common.h"
#include "q4_k.h"

namespace tcq {

struct Q5_K {
  static constexpr int64_t kType = 13, kBlock = 256, kBytes = 176, kValueBytes = 0;
  static constexpr int64_t kGroup = 32;

  static void codes(const uint8_t* b, uint8_t* c, float* scale, float* offset) {
    float off[8];
    k_factors(b, scale, off);
    for (int j = 0; j < 8; ++j) offset[j] = -off[j];
    const uint8_t* qh = b + 16;
    const uint8_t* q = b + 48;
    for (int s = 0; s < 4; ++s, q += 32, c += 64) {
      for (int l = 0; l < 32; ++l) {
        c[l] = (q[l] & 15) | (((qh[l] >> (2 * s)) & 1) << 4);
        c[l + 32] = (q[l] >> 4) | (((qh[l] >> (2 * s + 1)) & 1) << 4);
      }
    }
  }

  static void decode(const uint8_t* b, float* y) {
    float mul[8], off[8];
    k_factors(b, mul, off);
    const uint8_t* qh = b + 16;
    const uint8_t* q = b + 48;
    for (int c = 0; c < 4; ++c, q += 32, y += 64) {
      for (int l = 0; l < 32; ++l) {
        const int lo = (q[l] & 15) | (((qh[l] >> (2 * c)) & 1) << 4);
        const int hi = (q[l] >> 4) | (((qh[l] >> (2 * c + 1)) & 1) << 4);
        y[l] = mul[2 * c] * static_cast<float>(lo) - off[2 * c];
        y[l + 32] = mul[2 * c + 1] * static_cast<float>(hi) - off[2 * c + 1];
      }
    }
  }
#ifdef TCQ_AVX512
  // The 64 five-bit codes of sub-blocks 2c and 2c + 1 of the block at b, one per byte: bytes 0-31 are
  // sub-block 2c (low nibbles of qs[32c..], fifth bit j = 2c of qh), bytes 32-63 sub-block 2c + 1 (high
  // nibbles, bit 2c + 1). A 64-bit rotate by 4 - j brings bit j of every byte to its bit 4; bits 5-7 keep
  // whatever lands there.
  static __m512i run_codes(const uint8_t* b, int c) {
    const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16)));
    const __m512i qs = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 48 + 32 * c)));
    const __m512i nibbles = _mm512_srlv_epi64(qs, _mm512_setr_epi64(0, 0, 0, 0, 4, 4, 4, 4));
    const int64_t lo = (4 - 2 * c) & 63, hi = (3 - 2 * c) & 63;
    const __m512i fifth = _mm512_rolv_epi64(qh, _mm512_setr_epi64(lo, lo, lo, lo, hi, hi, hi, hi));
    return five_bit_code(nibbles, fifth);
  }

  static void decode(const uint8_t* b, __m512* v) {
    alignas(64) float f[16];
    k_factors(b, f);
    alignas(64) uint8_t codes[256];
    for (int c = 0; c < 4; ++c) _mm512_store_si512(codes + 64 * c, run_codes(b, c));   // lookup32 ignores bits 5-7
    opaque(f);
    opaque(codes);   // widened by loads from memory, not by shuffles out of registers
    for (int j = 0; j < 8; ++j) {
      const __m512 m = _mm512_set1_ps(f[j]), o = _mm512_set1_ps(f[8 + j]);
      const __m512 low = _mm512_sub_ps(_mm512_mul_ps(iota16(), m), o);                                 // codes 0-15
      const __m512 high = _mm512_sub_ps(_mm512_mul_ps(_mm512_add_ps(iota16(), _mm512_set1_ps(16)), m), o);  // 16-31
      v[2 * j] = lookup32(widen_u8(codes + 32 * j), low, high);
      v[2 * j + 1] = lookup32(widen_u8(codes + 32 * j + 16), low, high);
    }
  }
#endif
#ifdef TCQ_VNNI
  // acc[r] += this block times rows r < R of 8-bit x (k_dot_int8): run_codes with their stray top bits
  // cleared.
  template <int R>
  static void dot_int8(const uint8_t* b, const int8_t* q, int64_t ldq, const float* dx, const float* xs, int64_t ldg,
                       __m512* acc) {
    __m512i codes[4];
    for (int c = 0; c < 4; ++c) codes[c] = _mm512_and_si512(run_codes(b, c), _mm512_set1_epi8(31));
    k_dot_int8<R>(b, codes, q, ldq, dx, xs, ldg, acc);
  }
#endif
};

}  // namespace tcq
