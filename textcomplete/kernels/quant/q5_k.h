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
  static constexpr int kCodeBits = 5;

  static void codes(const uint8_t* __restrict b, uint8_t* __restrict c, float* scale, float* offset) {
    float off[8];
    k_factors(b, scale, off);
    for (int j = 0; j < 8; ++j) offset[j] = -off[j];
#ifdef TCQ_VECTOR
    __m256i v[8];
    code_vectors(b, v);
    for (int j = 0; j < 8; ++j) store_codes(c + 32 * j, v[j]);
#else
    const uint8_t* qh = b + 16;
    const uint8_t* q = b + 48;
    for (int s = 0; s < 4; ++s, q += 32, c += 64) {
      for (int l = 0; l < 32; ++l) {
        c[l] = (q[l] & 15) | (((qh[l] >> (2 * s)) & 1) << 4);
        c[l + 32] = (q[l] >> 4) | (((qh[l] >> (2 * s + 1)) & 1) << 4);
      }
    }
#endif
  }
#ifdef TCQ_VECTOR
  // The codes of sub-block j in v[j]: Q4_K's nibbles, and as fifth bits bit j of each byte of qh.
  static void code_vectors(const uint8_t* b, __m256i* v) {
    const __m256i nibble = _mm256_set1_epi8(15), one = _mm256_set1_epi8(1);
    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16));
    for (int c = 0; c < 4; ++c) {
      const __m256i run = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 48 + 32 * c));
      const __m256i low = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * c)), one);
      const __m256i high = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * c + 1)), one);
      v[2 * c] = _mm256_or_si256(_mm256_and_si256(run, nibble), _mm256_slli_epi16(low, 4));
      v[2 * c + 1] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(run, 4), nibble), _mm256_slli_epi16(high, 4));
    }
  }
#endif

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

  // A block's factors (k_factors) for the decoder below, made a run of blocks at a time by the direct
  // products (dot_vector), as Q4_K's.
  static constexpr int kFactors = 16;
  static void factors(const uint8_t* b, float* f) { k_factors(b, f); }
  // The block at b, given its factors f.
  static void decode(const uint8_t* b, const float* f, __m512* v) {
    alignas(64) uint8_t codes[256];
    for (int c = 0; c < 4; ++c) _mm512_store_si512(codes + 64 * c, run_codes(b, c));   // lookup32 ignores bits 5-7
    opaque(codes);   // widened by loads from memory, not by shuffles out of registers
    for (int j = 0; j < 8; ++j) {
      const __m512 m = _mm512_set1_ps(f[j]), o = _mm512_set1_ps(f[8 + j]);
      const __m512 low = _mm512_sub_ps(_mm512_mul_ps(iota16(), m), o);                                 // codes 0-15
      const __m512 high = _mm512_sub_ps(_mm512_mul_ps(_mm512_add_ps(iota16(), _mm512_set1_ps(16)), m), o);  // 16-31
      v[2 * j] = lookup32(widen_u8(codes + 32 * j), low, high);
      v[2 * j + 1] = lookup32(widen_u8(codes + 32 * j + 16), low, high);
    }
  }
  static void decode(const uint8_t* b, __m512* v) { decode_with_own_factors<Q5_K>(b, v); }
#elif defined(TCQ_AVX2)
  // The codes of values 8h..8h + 7 of sub-blocks 2c and 2c + 1: Q4_K's nibbles, and bits 2c and 2c + 1 of
  // qh moved onto bit 4 (shifts by 4 - j, or j - 4 for j > 4).
  template <int c, int h>
  static void code_lanes(const uint8_t* b, __m256i* low, __m256i* high) {
    const __m256i bit4 = _mm256_set1_epi32(16);
    const __m256i qh = widen8_u8(b + 16 + 8 * h);   // one byte a lane: bit j is sub-block j's fifth bit
    const __m256i codes = widen8_u8(b + 48 + 32 * c + 8 * h);
    const __m256i even = c < 3 ? _mm256_slli_epi32(qh, 4 - 2 * c) : _mm256_srli_epi32(qh, 2);
    const __m256i odd = c < 2 ? _mm256_slli_epi32(qh, 3 - 2 * c) : _mm256_srli_epi32(qh, 2 * c - 3);
    *low = _mm256_or_si256(low_nibble(codes), _mm256_and_si256(even, bit4));
    *high = _mm256_or_si256(high_nibble(codes), _mm256_and_si256(odd, bit4));
  }
  template <class Sink>
  static void decode_each(const uint8_t* b, Sink&& sink) {
    k_decode_each<false>(b, [&](auto c, auto h, __m256i* low, __m256i* high) {
      code_lanes<decltype(c)::value, decltype(h)::value>(b, low, high);
    }, sink);
  }
  static void decode(const uint8_t* b, __m256* v) {
    decode_each(b, [&](auto i, __m256 x) { v[decltype(i)::value] = x; });
  }
  template <int R>
  static void dot_float(const uint8_t* b, const float* x, int64_t ldx, const float* xs, int64_t ldg, __m256* acc) {
    k_dot_float<R>(b, [&](auto c, auto h, __m256i* low, __m256i* high) {
      code_lanes<decltype(c)::value, decltype(h)::value>(b, low, high);
    }, x, ldx, xs, ldg, acc);
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
#elif defined(TCQ_INT8)
  template <int R>
  static void dot_int8(const uint8_t* b, const int8_t* q, int64_t ldq, const float* dx, const float* xs, int64_t ldg,
                       __m256* acc) {
    __m256i codes[8];
    code_vectors(b, codes);
    k_dot_int8<R>(b, codes, q, ldq, dx, xs, ldg, acc);
  }
#endif
};

}  // namespace tcq
