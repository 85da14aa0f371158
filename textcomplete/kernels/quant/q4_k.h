// Q4_K: super-blocks of 256 values in 8 sub-blocks of 32, each with a 6-bit scale and a 6-bit min.
//
// Layout: d, dmin (float16) | 12 bytes of packed scales and mins | 128 bytes of nibbles. Value l of
// sub-block j is (d * scale_j) * q - dmin * min_j; bytes 32c..32c+31 hold sub-block 2c in their low nibbles
// and sub-block 2c+1 in their high nibbles.
#pragma once

#include <cmath>

#include "common.h"

namespace tcq {

// Sub-block j's scale and min. Bytes 0-3 carry scales 0-3 in their low six bits, bytes 4-7 mins 0-3;
// sub-blocks 4-7 take their low four bits from bytes 8-11 (scale: low nibble, min: high nibble) and their
// top two bits from the spare top bits of bytes 0-3 (scales) and 4-7 (mins).
inline void k_scale_min(const uint8_t* s, int j, int* scale, int* min) {
  if (j < 4) {
    *scale = s[j] & 63;
    *min = s[j + 4] & 63;
  } else {
    *scale = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
    *min = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// The eight sub-blocks' multipliers d * scale_j and offsets dmin * min_j of the super-block at b.
inline void k_factors(const uint8_t* b, float* mul, float* off) {
  const float d = half_at(b), dmin = half_at(b + 2);
#ifdef TCQ_VECTOR
  // k_scale_min for all eight at once, a sub-block a lane, in AVX2 instructions (AVX-512 machines have them):
  // the byte with the low bits, shifted and masked, or'd with the two top bits of the byte lending them. The
  // 16 bytes sit in both halves of a vector, so that one in-lane byte shuffle puts a byte in each lane:
  // widening with vpmovzxbd instead runs one an instruction a cycle on AMD's Zen 3, and k_factors took 11 of
  // a block's 53 cycles in the AVX2 float32 product, 6.5 with this (single thread, blocks in L1).
  const __m256i packed = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 4)));
  constexpr char z = -128;   // a byte index of -128 gives a zero byte
  auto bytes = [&](char s0, char s1, char s2, char s3, char s4, char s5, char s6, char s7) {
    return _mm256_shuffle_epi8(packed, _mm256_setr_epi8(s0, z, z, z, s1, z, z, z, s2, z, z, z, s3, z, z, z,
                                                        s4, z, z, z, s5, z, z, z, s6, z, z, z, s7, z, z, z));
  };
  const __m256i low_bits = _mm256_setr_epi32(63, 63, 63, 63, 15, 15, 15, 15);
  auto top_bits = [](__m256i v) { return _mm256_srli_epi32(_mm256_and_si256(v, _mm256_set1_epi32(0xC0)), 2); };
  const __m256i scale = _mm256_or_si256(_mm256_and_si256(bytes(0, 1, 2, 3, 8, 9, 10, 11), low_bits),
                                        top_bits(bytes(z, z, z, z, 0, 1, 2, 3)));
  const __m256i min = _mm256_or_si256(
      _mm256_and_si256(_mm256_srlv_epi32(bytes(4, 5, 6, 7, 8, 9, 10, 11), _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)),
                       low_bits),
      top_bits(bytes(z, z, z, z, 4, 5, 6, 7)));
  const __m256 d_dmin = _mm256_cvtph_ps(_mm_set1_epi32(static_cast<int>(load_u32(b))));   // d, dmin, d, dmin, ...
  _mm256_storeu_ps(mul, _mm256_mul_ps(_mm256_cvtepi32_ps(scale), _mm256_moveldup_ps(d_dmin)));
  _mm256_storeu_ps(off, _mm256_mul_ps(_mm256_cvtepi32_ps(min), _mm256_movehdup_ps(d_dmin)));
#else
  for (int j = 0; j < 8; ++j) {
    int scale, min;
    k_scale_min(b + 4, j, &scale, &min);
    mul[j] = d * static_cast<float>(scale);
    off[j] = dmin * static_cast<float>(min);
  }
#endif
}

#ifdef TCQ_AVX512
// k_factors for all eight sub-blocks at once: f[j] = d * scale_j, f[8 + j] = dmin * min_j.
inline void k_factors(const uint8_t* b, float* f) {
  const __m512i packed = widen_u8(b + 4);   // lanes 0-11: the 12 packed bytes (12-15 unused)
  // Per lane: the byte with its low bits (scales 0-7, then mins 0-7) and the one lending its top two bits.
  const __m512i low =
      _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11), packed);
  const __m512i top =
      _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 0, 0, 0, 0, 1, 2, 3, 0, 0, 0, 0, 4, 5, 6, 7), packed);
  const __m512i bits = _mm512_and_si512(
      _mm512_srlv_epi32(low, _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4)),
      _mm512_setr_epi32(63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63, 15, 15, 15, 15));
  const __m512i codes = _mm512_or_si512(bits, _mm512_maskz_slli_epi32(0xF0F0, _mm512_srli_epi32(top, 6), 4));
  const __m512 d_dmin = _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(load_u32(b)))));
  const __m512 factor =
      _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1), d_dmin);
  _mm512_storeu_ps(f, _mm512_mul_ps(_mm512_cvtepi32_ps(codes), factor));
}
#endif

#ifdef TCQ_VNNI
// The 8-bit products of a Q4_K or Q5_K super-block at b, given its 256 unsigned codes in value order (64 a
// vector, sub-blocks 2c and 2c + 1 in codes[c]): acc[r] += the block times rows r < R of 8-bit x, codes
// q + r * ldq (256 int8), and per group of 32 the scale dx and the scaled code sum xs at + r * ldg (int8.h).
// One vpdpbusd per 64 codes; its 16 sums (8 per sub-block) take the sub-block's d * scale times x's scale,
// and the mins are dmin * min_j times x's sum over sub-block j.
template <int R>
inline void k_dot_int8(const uint8_t* b, const __m512i* codes, const int8_t* q, int64_t ldq, const float* dx,
                       const float* xs, int64_t ldg, __m512* acc) {
  alignas(64) float f[16];
  k_factors(b, f);
  const __m512 factors = _mm512_load_ps(f);   // d * scale_j in lanes 0-7, dmin * min_j in 8-15
  for (int r = 0; r < R; ++r) {
    const __m512 scales = _mm512_mul_ps(factors, _mm512_maskz_loadu_ps(0x00FF, dx + r * ldg));
    for (int c = 0; c < 4; ++c) {
      const __m512i sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes[c],
                                               _mm512_loadu_si512(q + r * ldq + 64 * c));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), spread_lanes(scales, 2 * c, 8), acc[r]);
    }
    const __m512 x_sums = _mm512_insertf32x8(_mm512_setzero_ps(), _mm256_loadu_ps(xs + r * ldg), 1);
    acc[r] = _mm512_fnmadd_ps(factors, x_sums, acc[r]);
  }
}
#elif defined(TCQ_INT8)
// The AVX2 k_dot_int8: codes[j] holds the 32 codes of sub-block j. Each sub-block's 8 sums take d * scale_j
// times x's scale; the mins, one sub-block a lane, dmin * min_j times x's sum over sub-block j.
template <int R>
inline void k_dot_int8(const uint8_t* b, const __m256i* codes, const int8_t* q, int64_t ldq, const float* dx,
                       const float* xs, int64_t ldg, __m256* acc) {
  alignas(32) float mul[8], off[8], factor[8];
  k_factors(b, mul, off);
  const __m256 muls = _mm256_load_ps(mul), mins = _mm256_load_ps(off);
  for (int r = 0; r < R; ++r) {
    const int8_t* qr = q + r * ldq;
    _mm256_store_ps(factor, _mm256_mul_ps(muls, _mm256_loadu_ps(dx + r * ldg)));   // d * scale_j * x's scale
    __m256 even = _mm256_fnmadd_ps(mins, _mm256_loadu_ps(xs + r * ldg), acc[r]), odd = _mm256_setzero_ps();
    for (int j = 0; j < 8; j += 2) {   // two chains of multiply-adds, so that they overlap
      const __m256i s0 = dot_u8_i8(_mm256_setzero_si256(), codes[j],
                                   _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qr + 32 * j)));
      const __m256i s1 = dot_u8_i8(_mm256_setzero_si256(), codes[j + 1],
                                   _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qr + 32 * j + 32)));
      even = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), _mm256_broadcast_ss(factor + j), even);
      odd = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), _mm256_broadcast_ss(factor + j + 1), odd);
    }
    acc[r] = _mm256_add_ps(even, odd);
  }
}
#endif

#ifdef TCQ_AVX2
// The AVX2 float32 decoders Q4_K and Q5_K share (and Q5_K's dot_float). `codes(c, h, &low, &high)`, for c, h < 4 given as
// std::integral_constant, sets the codes of values 8h..8h + 7 of sub-blocks 2c (low) and 2c + 1 (high), one
// a lane of int32.

// sink(i, vector i) for the block's 32 decoded vectors, each as it is made (each_vector): pairs 4 apart, the
// same 8 values of sub-blocks 2c and 2c + 1. d * scale_j * code - dmin * min_j, fused (Fused) or rounded
// twice like the portable decoder.
template <bool Fused, class Codes, class Sink>
inline void k_decode_each(const uint8_t* b, Codes codes, Sink&& sink) {
  alignas(32) float mul[8], off[8];
  k_factors(b, mul, off);
  auto value = [](__m256i code, __m256 m, __m256 o) {
    return Fused ? _mm256_fmsub_ps(to_float(code), m, o) : _mm256_sub_ps(_mm256_mul_ps(to_float(code), m), o);
  };
  unroll<4>([&](auto c_) {
    constexpr int c = decltype(c_)::value;
    const __m256 m0 = _mm256_broadcast_ss(mul + 2 * c), o0 = _mm256_broadcast_ss(off + 2 * c);
    const __m256 m1 = _mm256_broadcast_ss(mul + 2 * c + 1), o1 = _mm256_broadcast_ss(off + 2 * c + 1);
    unroll<4>([&](auto h_) {
      constexpr int h = decltype(h_)::value;
      __m256i low, high;
      codes(c_, h_, &low, &high);
      sink(std::integral_constant<int, 8 * c + h>{}, value(low, m0, o0));
      sink(std::integral_constant<int, 8 * c + 4 + h>{}, value(high, m1, o1));
    });
  });
}

// acc[r] += the block times rows r < R of float32 x, the frame of the float32 dot_floats: sums(c, low, high),
// for c < 4 given as std::integral_constant, sets each row's sums of codes times x over sub-blocks 2c (low[r])
// and 2c + 1 (high[r]); each sum takes d * scale_j once, and the mins come from x's sums over the sub-blocks
// (xs + r * ldg, one a lane).
template <int R, class Sums>
inline void k_dot_sums(const uint8_t* b, Sums sums, const float* xs, int64_t ldg, __m256* acc) {
  alignas(32) float mul[8], off[8];
  k_factors(b, mul, off);
  const __m256 mins = _mm256_load_ps(off);
  __m256 even[R], odd[R];   // sub-blocks 2c and 2c + 1
  unroll<R>([&](auto r) {
    even[r] = _mm256_fnmadd_ps(mins, _mm256_loadu_ps(xs + r * ldg), acc[r]);
    odd[r] = _mm256_setzero_ps();
  });
  unroll<4>([&](auto c_) {
    constexpr int c = decltype(c_)::value;
    __m256 low[R], high[R];
    sums(c_, low, high);
    unroll<R>([&](auto r) {
      even[r] = _mm256_fmadd_ps(low[r], _mm256_broadcast_ss(mul + 2 * c), even[r]);
      odd[r] = _mm256_fmadd_ps(high[r], _mm256_broadcast_ss(mul + 2 * c + 1), odd[r]);
    });
  });
  unroll<R>([&](auto r) { acc[r] = _mm256_add_ps(even[r], odd[r]); });
}

// Q5_K's float32 dot_float (k_dot_sums), on x in value order (x + r * ldx): codes widened a lane each.
template <int R, class Codes>
inline void k_dot_float(const uint8_t* b, Codes codes, const float* x, int64_t ldx, const float* xs, int64_t ldg,
                        __m256* acc) {
  k_dot_sums<R>(b, [&](auto c_, __m256* low, __m256* high) {
    constexpr int c = decltype(c_)::value;
    unroll<4>([&](auto h_) {
      constexpr int h = decltype(h_)::value;
      __m256i low_codes, high_codes;
      codes(c_, h_, &low_codes, &high_codes);
      const __m256 l = to_float(low_codes), u = to_float(high_codes);
      unroll<R>([&](auto r) {
        const float* xr = x + r * ldx + 64 * c + 8 * h;
        low[r] = h == 0 ? _mm256_mul_ps(l, _mm256_loadu_ps(xr)) : _mm256_fmadd_ps(l, _mm256_loadu_ps(xr), low[r]);
        high[r] = h == 0 ? _mm256_mul_ps(u, _mm256_loadu_ps(xr + 32))
                         : _mm256_fmadd_ps(u, _mm256_loadu_ps(xr + 32), high[r]);
      });
    });
  }, xs, ldg, acc);
}
#endif

struct Q4_K {
  static constexpr int64_t kType = 12, kBlock = 256, kBytes = 144, kValueBytes = 0;
  static constexpr int64_t kGroup = 32;
  static constexpr int kCodeBits = 4;

  static void codes(const uint8_t* __restrict b, uint8_t* __restrict c, float* scale, float* offset) {
    float off[8];
    k_factors(b, scale, off);
    for (int j = 0; j < 8; ++j) offset[j] = -off[j];
#ifdef TCQ_VECTOR
    __m256i v[8];
    code_vectors(b, v);
    for (int j = 0; j < 8; ++j) store_codes(c + 32 * j, v[j]);
#else
    const uint8_t* q = b + 16;
    for (int s = 0; s < 4; ++s, q += 32, c += 64) {
      for (int l = 0; l < 32; ++l) {
        c[l] = q[l] & 15;
        c[l + 32] = q[l] >> 4;
      }
    }
#endif
  }
#ifdef TCQ_VECTOR
  // The codes of sub-block j in v[j]: a 32-byte run of nibbles holds sub-blocks 2c (low) and 2c + 1 (high).
  static void code_vectors(const uint8_t* b, __m256i* v) {
    const __m256i nibble = _mm256_set1_epi8(15);
    for (int c = 0; c < 4; ++c) {
      const __m256i run = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16 + 32 * c));
      v[2 * c] = _mm256_and_si256(run, nibble);
      v[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(run, 4), nibble);
    }
  }
#endif

  static void decode(const uint8_t* b, float* y) {
    float mul[8], off[8];
    k_factors(b, mul, off);
    const uint8_t* q = b + 16;
    for (int c = 0; c < 4; ++c, q += 32, y += 64) {
      for (int l = 0; l < 32; ++l) {
        y[l] = mul[2 * c] * static_cast<float>(q[l] & 15) - off[2 * c];
        y[l + 32] = mul[2 * c + 1] * static_cast<float>(q[l] >> 4) - off[2 * c + 1];
      }
    }
  }
#ifdef TCQ_AVX512
  // A block's factors (k_factors) for the decoder below, which the direct products make for a run of
  // blocks in a pass of their own (dot_vector): made inside each block's decode, they cost more.
  static constexpr int kFactors = 16;
  static void factors(const uint8_t* b, float* f) { k_factors(b, f); }
  // The block at b, given its factors f.
  static void decode(const uint8_t* b, const float* f, __m512* v) {
    const uint8_t* q = b + 16;
    for (int c = 0; c < 4; ++c) {
      // Each sub-block's 16 possible values, looked up by nibble.
      const __m512 low = _mm512_fmsub_ps(iota16(), _mm512_set1_ps(f[2 * c]), _mm512_set1_ps(f[8 + 2 * c]));
      const __m512 high = _mm512_fmsub_ps(iota16(), _mm512_set1_ps(f[2 * c + 1]), _mm512_set1_ps(f[9 + 2 * c]));
      const __m512i q0 = widen_u8(q + 32 * c), q1 = widen_u8(q + 32 * c + 16);
      v[4 * c + 0] = lookup16(q0, low);
      v[4 * c + 1] = lookup16(q1, low);
      v[4 * c + 2] = lookup16(_mm512_srli_epi32(q0, 4), high);
      v[4 * c + 3] = lookup16(_mm512_srli_epi32(q1, 4), high);
    }
  }
  static void decode(const uint8_t* b, __m512* v) { decode_with_own_factors<Q4_K>(b, v); }
#elif defined(TCQ_AVX2)
  // The codes of values 8h..8h + 7 of sub-blocks 2c (low nibbles) and 2c + 1 (high), one a lane.
  template <int c, int h>
  static void code_lanes(const uint8_t* b, __m256i* low, __m256i* high) {
    const __m256i codes = widen8_u8(b + 16 + 32 * c + 8 * h);
    *low = low_nibble(codes);
    *high = high_nibble(codes);
  }
  template <class Sink>
  static void decode_each(const uint8_t* b, Sink&& sink) {
    k_decode_each<true>(b, [&](auto c, auto h, __m256i* low, __m256i* high) {
      code_lanes<decltype(c)::value, decltype(h)::value>(b, low, high);
    }, sink);
  }
  static void decode(const uint8_t* b, __m256* v) {
    decode_each(b, [&](auto i, __m256 x) { v[decltype(i)::value] = x; });
  }
  // The float32 product reads x in an order of its own (prepare_x), so that the codes need no widening: each
  // 32-byte run of nibbles is read as 8 int32 lanes, and nibble position p of every lane (bits 4p..4p + 3) is
  // masked in place and converted, 2^(4p) times the code, exact. Its x lanes are the matching values, value
  // 4i + p / 2 of sub-block 2c + p % 2 in lane i, times 2^(-4p), also exact: the product is the code's times x
  // with the same rounding. The top nibble (p = 7) is shifted down instead, whose sign bit cvtdq2ps would
  // read. vpmovzxbd, which widening takes, runs one an instruction a cycle on AMD's Zen 3: with this, a block
  // took 42 cycles against 53 (single thread, blocks in L1, factors included).
  static void prepare_x(const float* x, float* out, int64_t k) {
    for (int64_t c0 = 0; c0 < k; c0 += 64) {
      for (int p = 0; p < 8; ++p) {
        const float scale = p < 7 ? std::ldexp(1.f, -4 * p) : 1.f;
        for (int i = 0; i < 8; ++i) out[c0 + 8 * p + i] = x[c0 + 32 * (p % 2) + 4 * i + p / 2] * scale;
      }
    }
  }
  // acc[r] += the block times rows r < R of x made by prepare_x (x + r * ldx), in k_dot_sums's frame.
  template <int R>
  static void dot_float(const uint8_t* b, const float* x, int64_t ldx, const float* xs, int64_t ldg, __m256* acc) {
    k_dot_sums<R>(b, [&](auto c_, __m256* low, __m256* high) {
      constexpr int c = decltype(c_)::value;
      const __m256i run = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16 + 32 * c));
      unroll<8>([&](auto p_) {
        constexpr int p = decltype(p_)::value;
        const __m256 codes = _mm256_cvtepi32_ps(p < 7 ? _mm256_and_si256(run, _mm256_set1_epi32(15 << (4 * p)))
                                                      : _mm256_srli_epi32(run, 28));
        unroll<R>([&](auto r) {
          const __m256 xv = _mm256_loadu_ps(x + r * ldx + 64 * c + 8 * p);
          if constexpr (p % 2 == 0) low[r] = p == 0 ? _mm256_mul_ps(codes, xv) : _mm256_fmadd_ps(codes, xv, low[r]);
          else high[r] = p == 1 ? _mm256_mul_ps(codes, xv) : _mm256_fmadd_ps(codes, xv, high[r]);
        });
      });
    }, xs, ldg, acc);
  }
#endif
#ifdef TCQ_VNNI
  // acc[r] += this block times rows r < R of 8-bit x (see k_dot_int8). A 32-byte run of nibbles, its low and
  // high halves side by side, is 64 codes of sub-blocks 2c and 2c + 1 in value order.
  template <int R>
  static void dot_int8(const uint8_t* b, const int8_t* q, int64_t ldq, const float* dx, const float* xs, int64_t ldg,
                       __m512* acc) {
    const __m512i nibble = _mm512_set1_epi8(15);
    __m512i codes[4];
    for (int c = 0; c < 4; ++c) {
      const __m256i run = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16 + 32 * c));
      codes[c] = _mm512_and_si512(
          _mm512_inserti64x4(_mm512_castsi256_si512(run), _mm256_srli_epi16(run, 4), 1), nibble);
    }
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
