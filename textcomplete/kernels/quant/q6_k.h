// Q6_K: super-blocks of 256 six-bit values in 16 groups of 16, each with an int8 scale;
// value = (d * scale_g) * (q - 32).
//
// Layout: ql (128 bytes, low four bits) | qh (64 bytes, high two bits) | 16 int8 scales | d (float16, last).
// Each half of 128 values uses 64 bytes of ql and 32 of qh: value 32t + l (t < 4, l < 32) takes the low
// nibble of ql[l] (t = 0) or ql[l + 32] (t = 1), the high nibble of the same bytes for t = 2, 3, and bits
// 2t, 2t + 1 of qh[l].
#pragma once

#include <cmath>

#include "common.h"

namespace tcq {

struct Q6_K {
  static constexpr int64_t kType = 14, kBlock = 256, kBytes = 210, kValueBytes = 0;
  static constexpr int64_t kGroup = 16;
  static constexpr int kCodeBits = 6;

  static void codes(const uint8_t* __restrict b, uint8_t* __restrict c, float* scale, float* offset) {
    const float d = half_at(b + 208);
    const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192);
    for (int g = 0; g < 16; ++g) {
      scale[g] = d * static_cast<float>(scales[g]);
      offset[g] = -32.f * scale[g];
    }
#ifdef TCQ_VECTOR
    __m256i v[8];
    code_vectors(b, v);
    for (int j = 0; j < 8; ++j) store_codes(c + 32 * j, v[j]);
#else
    for (int h = 0; h < 2; ++h, c += 128) {
      const uint8_t* ql = b + 64 * h;
      const uint8_t* qh = b + 128 + 32 * h;
      for (int l = 0; l < 32; ++l) {
        c[l] = (ql[l] & 15) | ((qh[l] & 3) << 4);
        c[l + 32] = (ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4);
        c[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
        c[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
      }
    }
#endif
  }
#ifdef TCQ_VECTOR
  // The unsigned six-bit codes in value order, 32 a vector: v[v'] holds values 32v'..32v' + 31.
  static void code_vectors(const uint8_t* b, __m256i* v) {
    const __m256i nibble = _mm256_set1_epi8(15), top_two = _mm256_set1_epi8(0x30);
    for (int h = 0; h < 2; ++h) {
      const __m256i l0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 64 * h));
      const __m256i l1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 64 * h + 32));
      const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + 32 * h));
      // Bits 2t, 2t + 1 of each byte of qh moved to bits 4, 5 by one shift of the 16-bit lanes and kept by the
      // mask, which drops whatever the shift carried across from the lane's other byte.
      const __m256i top0 = _mm256_and_si256(_mm256_slli_epi16(qh, 4), top_two);
      const __m256i top1 = _mm256_and_si256(_mm256_slli_epi16(qh, 2), top_two);
      const __m256i top2 = _mm256_and_si256(qh, top_two);
      const __m256i top3 = _mm256_and_si256(_mm256_srli_epi16(qh, 2), top_two);
      v[4 * h] = _mm256_or_si256(_mm256_and_si256(l0, nibble), top0);
      v[4 * h + 1] = _mm256_or_si256(_mm256_and_si256(l1, nibble), top1);
      v[4 * h + 2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), nibble), top2);
      v[4 * h + 3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), nibble), top3);
    }
  }
#endif

  static void decode(const uint8_t* b, float* y) {
    const float d = half_at(b + 208);
    const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192);
    for (int h = 0; h < 2; ++h, y += 128) {
      const uint8_t* ql = b + 64 * h;
      const uint8_t* qh = b + 128 + 32 * h;
      for (int t = 0; t < 4; ++t) {
        const float scale_lo = d * static_cast<float>(scales[8 * h + 2 * t]);
        const float scale_hi = d * static_cast<float>(scales[8 * h + 2 * t + 1]);
        for (int l = 0; l < 32; ++l) {
          const int nibble = t < 2 ? ql[l + 32 * t] & 15 : ql[l + 32 * (t - 2)] >> 4;
          const int code = nibble | (((qh[l] >> (2 * t)) & 3) << 4);
          y[32 * t + l] = (l < 16 ? scale_lo : scale_hi) * static_cast<float>(code - 32);
        }
      }
    }
  }
#ifdef TCQ_AVX512
  // The unsigned six-bit codes of half h (values 128h..128h+127) of the block at b, one per byte: lo holds
  // values 0-63 of the half (t = 0 in bytes 0-31, t = 1 in 32-63), hi values 64-127 (t = 2, 3). The high
  // bits move within 64-bit lanes; the bits that cross into a neighbouring byte are masked off.
  static void half_codes(const uint8_t* b, int h, __m512i* lo, __m512i* hi) {
    const __m512i nibble = _mm512_set1_epi8(15), top = _mm512_set1_epi8(0x30);
    const __m512i ql = _mm512_loadu_si512(b + 64 * h);
    const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + 32 * h)));
    const __m512i up01 = _mm512_and_si512(_mm512_sllv_epi64(qh, _mm512_setr_epi64(4, 4, 4, 4, 2, 2, 2, 2)), top);
    const __m512i up23 = _mm512_and_si512(_mm512_srlv_epi64(qh, _mm512_setr_epi64(0, 0, 0, 0, 2, 2, 2, 2)), top);
    *lo = _mm512_ternarylogic_epi32(ql, up01, nibble, 0xE4);   // nibble bits from ql, the rest from up
    *hi = _mm512_ternarylogic_epi32(_mm512_srli_epi16(ql, 4), up23, nibble, 0xE4);
  }

  static void decode(const uint8_t* b, __m512* v) {
    alignas(64) float scale[16];
    _mm512_store_ps(scale, _mm512_mul_ps(widen_i8_ps(b + 192), _mm512_set1_ps(half_at(b + 208))));
    opaque(scale);
    const __m512i bias = _mm512_set1_epi8(32);
    for (int h = 0; h < 2; ++h) {
      alignas(64) int8_t codes[128];
      __m512i lo, hi;
      half_codes(b, h, &lo, &hi);
      _mm512_store_si512(codes, _mm512_sub_epi8(lo, bias));
      _mm512_store_si512(codes + 64, _mm512_sub_epi8(hi, bias));
      opaque(codes);   // widened by loads from memory, not by shuffles out of registers
      for (int i = 0; i < 8; ++i) {
        v[8 * h + i] = _mm512_mul_ps(widen_i8_ps(codes + 16 * i), _mm512_set1_ps(scale[8 * h + i]));
      }
    }
  }
#elif defined(TCQ_AVX2)
  // sink(i, vector i) for the block's 32 vectors, each as it is made (each_vector): for each 8 bytes of qh,
  // the four runs that take their top bits from them. scale * (code - 32) as code * scale - 32 * scale,
  // fused: one rounding of the same exact value.
  template <class Sink>
  static void decode_each(const uint8_t* b, Sink&& sink) {
    const __m256 d = _mm256_set1_ps(half_at(b + 208));
    alignas(32) float scale[16], offset[16];   // per group of 16: d * scale_g and -32 times that
    for (int g = 0; g < 16; g += 8) {
      const __m256 s = _mm256_mul_ps(widen8_i8_ps(b + 192 + g), d);
      _mm256_store_ps(scale + g, s);
      _mm256_store_ps(offset + g, _mm256_mul_ps(s, _mm256_set1_ps(-32.f)));
    }
    const __m256i nibble = _mm256_set1_epi32(15), top = _mm256_set1_epi32(0x30);
    unroll<8>([&](auto hr) {
      constexpr int h = decltype(hr)::value / 4, r = decltype(hr)::value % 4;   // values 8r..8r + 7 of each run
      const uint8_t* ql = b + 64 * h;
      const __m256i high = widen8_u8(b + 128 + 32 * h + 8 * r);   // bits 2t, 2t + 1: the top bits of run t
      unroll<2>([&](auto p_) {   // runs p (low nibbles) and p + 2 (high nibbles)
        constexpr int p = decltype(p_)::value;
        const __m256i low = widen8_u8(ql + 32 * p + 8 * r);
        unroll<2>([&](auto t_) {
          constexpr int t = p + 2 * decltype(t_)::value, g = 8 * h + 2 * t + r / 2;
          const __m256i up = 2 * t <= 4 ? _mm256_slli_epi32(high, 4 - 2 * t) : _mm256_srli_epi32(high, 2 * t - 4);
          const __m256i codes = _mm256_or_si256(_mm256_and_si256(t < 2 ? low : _mm256_srli_epi32(low, 4), nibble),
                                                _mm256_and_si256(up, top));
          sink(std::integral_constant<int, 16 * h + 4 * t + r>{},
               _mm256_fmadd_ps(to_float(codes), _mm256_broadcast_ss(scale + g), _mm256_broadcast_ss(offset + g)));
        });
      });
    });
  }
  static void decode(const uint8_t* b, __m256* v) {
    decode_each(b, [&](auto i, __m256 x) { v[decltype(i)::value] = x; });
  }
  // The float32 product reads x in an order of its own (prepare_x), so that the codes need no widening: the
  // 32 byte codes of values 32t..32t + 31 of half h (code_vectors) are read as 8 int32 lanes, and byte j of
  // every lane is masked in place and converted, 2^(8j) times the code, exact. Its x lanes are the matching
  // values, value 4i + j of the 32 in lane i, times 2^(-8j), also exact: the product is the code's times x
  // with the same rounding. Lanes 0-3 then fall in group 2t of the half and lanes 4-7 in group 2t + 1.
  // vpmovzxbd, which widening takes, runs one an instruction a cycle on AMD's Zen 3.
  static void prepare_x(const float* x, float* out, int64_t k) {
    for (int64_t c0 = 0; c0 < k; c0 += 32) {
      for (int j = 0; j < 4; ++j) {
        const float scale = std::ldexp(1.f, -8 * j);
        for (int i = 0; i < 8; ++i) out[c0 + 8 * j + i] = x[c0 + 4 * i + j] * scale;
      }
    }
  }
  // acc[r] += this block times rows r < R of x made by prepare_x (x + r * ldx): each group's sum of codes
  // times x takes d * scale_g once, and the bias of 32 comes from x's group sums (xs + r * ldg).
  template <int R>
  static void dot_float(const uint8_t* b, const float* x, int64_t ldx, const float* xs, int64_t ldg, __m256* acc) {
    const __m256 d = _mm256_set1_ps(half_at(b + 208));
    __m256 first[R], second[R];
    __m256 paired[2];   // per half h: scales of groups 8h + 0, 2, 4, 6, then 8h + 1, 3, 5, 7
    for (int h = 0; h < 2; ++h) {
      const __m256 s = _mm256_mul_ps(widen8_i8_ps(b + 192 + 8 * h), d);   // d * scale_g, g = 8h..8h + 7
      const __m256 bias = _mm256_mul_ps(s, _mm256_set1_ps(-32.f));
      unroll<R>([&](auto r) {
        first[r] = _mm256_fmadd_ps(bias, _mm256_loadu_ps(xs + r * ldg + 8 * h), h == 0 ? acc[r] : first[r]);
      });
      paired[h] = _mm256_permutevar8x32_ps(s, _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7));
    }
    unroll<R>([&](auto r) { second[r] = _mm256_setzero_ps(); });
    __m256i codes[8];
    code_vectors(b, codes);
    unroll<8>([&](auto v_) {
      constexpr int v = decltype(v_)::value, h = v / 4, t = v % 4;   // values 32t..32t + 31 of half h
      __m256 part[R];
      unroll<4>([&](auto j_) {
        constexpr int j = decltype(j_)::value;
        const __m256 c = _mm256_cvtepi32_ps(_mm256_and_si256(codes[v], _mm256_set1_epi32(0x3F << (8 * j))));
        unroll<R>([&](auto r) {
          const __m256 xv = _mm256_loadu_ps(x + r * ldx + 32 * v + 8 * j);
          part[r] = j == 0 ? _mm256_mul_ps(c, xv) : _mm256_fmadd_ps(c, xv, part[r]);
        });
      });
      // Lanes 0-3: group 8h + 2t's scale; lanes 4-7: group 8h + 2t + 1's.
      const __m256 scale = _mm256_permute_ps(paired[h], t * 0x55);
      unroll<R>([&](auto r) {
        if constexpr (t % 2 == 0) first[r] = _mm256_fmadd_ps(part[r], scale, first[r]);
        else second[r] = _mm256_fmadd_ps(part[r], scale, second[r]);
      });
    });
    unroll<R>([&](auto r) { acc[r] = _mm256_add_ps(first[r], second[r]); });
  }
#endif
#ifdef TCQ_VNNI
  // acc[r] += this block times rows r < R of 8-bit x (see k_dot_int8; groups of 16 here). The unsigned
  // six-bit codes (half_codes), 64 per vector in value order, go to vpdpbusd; the bias of 32 is the offset
  // -32 * d * scale_g, taken with x's group sums.
  template <int R>
  static void dot_int8(const uint8_t* b, const int8_t* q, int64_t ldq, const float* dx, const float* xs, int64_t ldg,
                       __m512* acc) {
    const __m512 scale = _mm512_mul_ps(widen_i8_ps(b + 192), _mm512_set1_ps(half_at(b + 208)));   // d * scale_g
    __m512i codes[4];
    for (int h = 0; h < 2; ++h) half_codes(b, h, &codes[2 * h], &codes[2 * h + 1]);
    const __m512 bias = _mm512_mul_ps(scale, _mm512_set1_ps(-32.f));
    for (int r = 0; r < R; ++r) {
      const __m512 scales = _mm512_mul_ps(scale, _mm512_loadu_ps(dx + r * ldg));
      for (int c = 0; c < 4; ++c) {
        const __m512i sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes[c],
                                                 _mm512_loadu_si512(q + r * ldq + 64 * c));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), spread_lanes(scales, 4 * c, 4), acc[r]);
      }
      acc[r] = _mm512_fmadd_ps(bias, _mm512_loadu_ps(xs + r * ldg), acc[r]);
    }
  }
#elif defined(TCQ_INT8)
  // The AVX2 one: codes[v] holds values 32v..32v + 31, groups 2v and 2v + 1 (the low and high four sums).
  template <int R>
  static void dot_int8(const uint8_t* b, const int8_t* q, int64_t ldq, const float* dx, const float* xs, int64_t ldg,
                       __m256* acc) {
    const __m256 d = _mm256_set1_ps(half_at(b + 208));
    const __m256 scale_lo = _mm256_mul_ps(widen8_i8_ps(b + 192), d), scale_hi = _mm256_mul_ps(widen8_i8_ps(b + 200), d);
    const __m256 bias_lo = _mm256_mul_ps(scale_lo, _mm256_set1_ps(-32.f));
    const __m256 bias_hi = _mm256_mul_ps(scale_hi, _mm256_set1_ps(-32.f));
    __m256i codes[8];
    code_vectors(b, codes);
    alignas(32) float factor[16];   // d * scale_g * x's scale
    for (int r = 0; r < R; ++r) {
      const int8_t* qr = q + r * ldq;
      _mm256_store_ps(factor, _mm256_mul_ps(scale_lo, _mm256_loadu_ps(dx + r * ldg)));
      _mm256_store_ps(factor + 8, _mm256_mul_ps(scale_hi, _mm256_loadu_ps(dx + r * ldg + 8)));
      __m256 even = _mm256_fmadd_ps(bias_lo, _mm256_loadu_ps(xs + r * ldg), acc[r]);
      __m256 odd = _mm256_mul_ps(bias_hi, _mm256_loadu_ps(xs + r * ldg + 8));
      for (int v = 0; v < 8; ++v) {   // two chains of multiply-adds, so that they overlap
        const __m256i sums = dot_u8_i8(_mm256_setzero_si256(), codes[v],
                                       _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qr + 32 * v)));
        const __m256 f = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_broadcast_ss(factor + 2 * v)),
                                              _mm_broadcast_ss(factor + 2 * v + 1), 1);
        if (v % 2 == 0) {
          even = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), f, even);
        } else {
          odd = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), f, odd);
        }
      }
      acc[r] = _mm256_add_ps(even, odd);
    }
  }
#endif
};

}  // namespace tcq
