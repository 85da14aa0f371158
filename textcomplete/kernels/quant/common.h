// Pieces every block format shares: unaligned little-endian loads, half-precision scales, vector constants.
//
// A format is a struct with kType (its GGML type id), kBlock (values per block as the kernels walk it),
// kBytes (bytes per block) and two decoders of one block: into floats (portable; also the tests' oracle)
// and, with AVX-512 or AVX2, into kBlock / kLanes vectors of this machine's width (Vec, below). Blocks sit at any byte offset: every load is unaligned.
// Formats with integer codes add kGroup, kCodeBits and codes() for the 8-bit-activation products (int8.h), and may add
// dot_int8, which multiplies one block by rows of 8-bit x straight from its bytes (narrow products).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

// The vector decoders come in two widths: AVX-512 F and BW (every AVX-512 server core has both), else AVX2
// with FMA and F16C (x86 desktops and laptops since 2013); anything else compiles the portable ones only.
// The build is -march=native, so the machine that compiles is the machine that runs.
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define TCQ_AVX512 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define TCQ_AVX2 1
#include <immintrin.h>
#endif
#if defined(TCQ_AVX512) || defined(TCQ_AVX2)
#define TCQ_VECTOR 1
#endif
// The 8-bit-activation products (int8.h and the formats' dot_int8): AVX-512 with VNNI (vpdpbusd), or AVX2
// (vpmaddubsw then vpmaddwd, three instructions for one vpdpbusd of half the width). An AVX-512 machine
// without VNNI keeps them out.
#if defined(TCQ_AVX512) && defined(__AVX512VNNI__)
#define TCQ_VNNI 1
#endif
#if defined(TCQ_VNNI) || defined(TCQ_AVX2)
#define TCQ_INT8 1
#endif

namespace tcq {

inline uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// The float16 at p as a float32 (exact).
inline float half_at(const uint8_t* p) {
#ifdef __F16C__
  return _cvtsh_ss(load_u16(p));
#else
  return c10::detail::fp16_ieee_to_fp32_value(load_u16(p));
#endif
}

// How far ahead of the block being multiplied the direct products ask for weight bytes (prefetch_block).
// Measured on 1.7B-shaped decode steps, alternating builds: 1 KiB 91 (Q4_K_M) and 124 ms (Q8_0), 2 KiB 84 and
// 110 ms, 4 KiB 84 and 113 ms; with no requests at all 128 and 167 ms on that machine, while on the same
// machine at another time (its prefetchers then keeping up) the requests changed nothing either way.
constexpr int64_t kPrefetchBytes = 2048;

// Asks the cache for the `bytes` bytes that lie kPrefetchBytes past p (a block's bytes, read kPrefetchBytes
// later). A decode step's weights stream from memory once, and the hardware prefetchers stop at every 4 KiB
// page: a row of blocks spans pages, and without a request ahead each new page starts with misses. A request
// past the end of the weights is harmless (prefetches do not fault).
template <int64_t Bytes>
inline void prefetch_block(const uint8_t* p) {
  for (int64_t offset = 0; offset < Bytes; offset += 64) __builtin_prefetch(p + kPrefetchBytes + offset, 0, 3);
}

// Asks for `count` rows of `bytes` weight bytes from p on (row stride ldw), into L2: the tiled path's next
// K-chunk, requested before it decodes this one, so that the bytes arrive while this chunk's matmul runs.
// Each row's chunk is a few hundred bytes a row stride apart, which the hardware prefetchers do not follow:
// a profile of the 8B-shaped prefill without it had 60% of the decoder's samples on the first load of each
// block. Measured in-process on that prefill (128 tokens, two processes taking turns, 8 turns each): median
// ratios 0.93, 0.98 and 0.98 of the time without it, on a machine whose timings varied by 15% turn to turn.
inline void prefetch_rows(const uint8_t* p, int64_t count, int64_t bytes, int64_t ldw) {
  for (int64_t r = 0; r < count; ++r) {
    for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(p + r * ldw + offset, 0, 2);
  }
}

// fn(std::integral_constant<int, i>) for i < N: loop indices known at compile time, so that small arrays of
// vectors indexed by them stay in registers.
template <class Fn, int... I>
inline void unroll_each(Fn& fn, std::integer_sequence<int, I...>) {
  (fn(std::integral_constant<int, I>{}), ...);
}
template <int N, class Fn>
inline void unroll(Fn fn) {
  unroll_each(fn, std::make_integer_sequence<int, N>{});
}

// Vec: kLanes float32 lanes, the width the decoders fill and the products consume, and the few operations
// the width-independent kernels (matmul.h, the decode layers' attention) use on it.
#if defined(TCQ_AVX512)
using Vec = __m512;
constexpr int kLanes = 16;
inline Vec vec_zero() { return _mm512_setzero_ps(); }
inline Vec vec_set1(float v) { return _mm512_set1_ps(v); }
inline Vec vec_load(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vec_load(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline Vec vec_load(const c10::BFloat16* p) {   // bfloat16 is the top half of a float32
  return _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline void vec_store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec vec_add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline Vec vec_fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float vec_sum(Vec v) { return _mm512_reduce_add_ps(v); }
inline Vec vec_sub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
inline Vec vec_mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec vec_max(Vec a, Vec b) { return _mm512_max_ps(a, b); }
inline Vec vec_fnmadd(Vec a, Vec b, Vec c) { return _mm512_fnmadd_ps(a, b, c); }   // c - a * b
inline Vec vec_round(Vec v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// 2^n for lanes holding whole numbers n in [-126, 127].
inline Vec vec_pow2(Vec n) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
inline Vec vec_zero_below(Vec v, Vec floor) { return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, floor, _CMP_GE_OQ), v); }
inline Vec vec_div(Vec a, Vec b) { return _mm512_div_ps(a, b); }
inline Vec vec_neg_abs(Vec v) { return _mm512_or_ps(v, _mm512_set1_ps(-0.f)); }   // -|v|
// Lanes of b where v's sign bit is set, else of a.
inline Vec vec_where_negative(Vec v, Vec a, Vec b) {
  return _mm512_mask_blend_ps(_mm512_cmplt_epi32_mask(_mm512_castps_si512(v), _mm512_setzero_si512()), a, b);
}
#elif defined(TCQ_AVX2)
using Vec = __m256;
constexpr int kLanes = 8;
inline Vec vec_zero() { return _mm256_setzero_ps(); }
inline Vec vec_set1(float v) { return _mm256_set1_ps(v); }
inline Vec vec_load(const float* p) { return _mm256_loadu_ps(p); }
inline Vec vec_load(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline Vec vec_load(const c10::BFloat16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(
      _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
inline void vec_store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec vec_add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline Vec vec_fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec vec_sub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
inline Vec vec_mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline Vec vec_max(Vec a, Vec b) { return _mm256_max_ps(a, b); }
inline Vec vec_fnmadd(Vec a, Vec b, Vec c) { return _mm256_fnmadd_ps(a, b, c); }   // c - a * b
inline Vec vec_round(Vec v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// 2^n for lanes holding whole numbers n in [-126, 127].
inline Vec vec_pow2(Vec n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
inline Vec vec_zero_below(Vec v, Vec floor) { return _mm256_and_ps(v, _mm256_cmp_ps(v, floor, _CMP_GE_OQ)); }
inline Vec vec_div(Vec a, Vec b) { return _mm256_div_ps(a, b); }
inline Vec vec_neg_abs(Vec v) { return _mm256_or_ps(v, _mm256_set1_ps(-0.f)); }   // -|v|
// Lanes of b where v's sign bit is set, else of a.
inline Vec vec_where_negative(Vec v, Vec a, Vec b) { return _mm256_blendv_ps(a, b, v); }
inline float vec_sum(Vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// 8 bytes at p, zero-extended into the 8 lanes of a vector of int32.
inline __m256i widen8_u8(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

// 8 int8 at p as float32.
inline __m256 widen8_i8_ps(const void* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(static_cast<const __m128i*>(p))));
}

// Lanes 0-7 of a vector of int32 as float32 (the codes of a block format are small integers: exact).
inline __m256 to_float(__m256i v) { return _mm256_cvtepi32_ps(v); }

// The low four bits of each lane (the low nibble of a widened byte), and bits 4-7 (its high nibble).
inline __m256i low_nibble(__m256i v) { return _mm256_and_si256(v, _mm256_set1_epi32(15)); }
inline __m256i high_nibble(__m256i v) { return _mm256_srli_epi32(v, 4); }

// Lane i of the result: the sum of the four products of bytes 4i..4i+3 of `codes` (unsigned, at most 128)
// with the same bytes of `x` (signed, within +-127, so that vpmaddubsw's 16-bit pair sums cannot saturate),
// added to `acc`.
inline __m256i dot_u8_i8(__m256i acc, __m256i codes, __m256i x) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(codes, x), _mm256_set1_epi16(1)));
}

// The float32 products of the formats whose blocks are 32 four-bit codes in 16 bytes, values 0-15 in the low
// nibbles and 16-31 in the high ones (Q4_0, Q4_1), take two blocks at a time, on x in an order of their own
// (nibble_pair_prepare_x), so that the codes need no widening: the two blocks' 16 bytes are read as 8 int32
// lanes (4 of each block), and nibble position p of every lane (bits 4p..4p + 3) is masked in place and
// converted, 2^(4p) times the code, exact. The x lanes are the matching values, 16 (p % 2) + 4i + p / 2 of the
// block in lane i, times 2^(-4p), also exact: the product is the code's times x with the same rounding. The top
// nibble (p = 7) is shifted down instead, whose sign bit cvtdq2ps would read. vpmovzxbd, which widening
// takes, runs one an instruction a cycle on AMD's Zen 3: with this, a Q4_1 block took 6.0 cycles against 8.0
// (single thread, blocks in L1).
inline void nibble_pair_prepare_x(const float* x, float* out, int64_t k) {
  int64_t c0 = 0;
  for (; c0 + 64 <= k; c0 += 64) {
    for (int p = 0; p < 8; ++p) {
      const float scale = p < 7 ? std::ldexp(1.f, -4 * p) : 1.f;
      for (int half = 0; half < 2; ++half) {
        for (int i = 0; i < 4; ++i) {
          out[c0 + 8 * p + 4 * half + i] = x[c0 + 32 * half + 16 * (p % 2) + 4 * i + p / 2] * scale;
        }
      }
    }
  }
  for (; c0 < k; ++c0) out[c0] = x[c0];   // a lone last block keeps x's order (dot_float_rows decodes it)
}

// acc[r] += two blocks, their codes at qa and qb and their factors dm = (d_a, m_a, d_b, m_b) (value = d * q + m),
// times rows r < R of x made by nibble_pair_prepare_x (x + r * ldx), given x's sums over each block (xs + r * ldg).
template <int R>
inline void nibble_pair_dot(const uint8_t* qa, const uint8_t* qb, __m128 dm, const float* x, int64_t ldx,
                            const float* xs, int64_t ldg, __m256* acc) {
  const __m256i run = _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(qb), reinterpret_cast<const __m128i*>(qa));
  const __m256 d = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(dm), _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2));
  const __m256 m = _mm256_zextps128_ps256(_mm_shuffle_ps(dm, dm, _MM_SHUFFLE(3, 1, 3, 1)));   // m_a, m_b, 0...
  __m256 codes[8];
  unroll<8>([&](auto p_) {
    constexpr int p = decltype(p_)::value;
    codes[p] = _mm256_cvtepi32_ps(p < 7 ? _mm256_and_si256(run, _mm256_set1_epi32(15 << (4 * p))) : _mm256_srli_epi32(run, 28));
  });
  unroll<R>([&](auto r) {
    const float* xr = x + r * ldx;
    __m256 even = _mm256_mul_ps(codes[0], _mm256_loadu_ps(xr)), odd = _mm256_mul_ps(codes[1], _mm256_loadu_ps(xr + 8));
    unroll<3>([&](auto q_) {
      constexpr int q = decltype(q_)::value + 1;
      even = _mm256_fmadd_ps(codes[2 * q], _mm256_loadu_ps(xr + 16 * q), even);
      odd = _mm256_fmadd_ps(codes[2 * q + 1], _mm256_loadu_ps(xr + 16 * q + 8), odd);
    });
    const __m256 sums = _mm256_zextps128_ps256(_mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(xs + r * ldg))));
    acc[r] = _mm256_fmadd_ps(_mm256_add_ps(even, odd), d, _mm256_fmadd_ps(m, sums, acc[r]));
  });
}

// Lane i: bit (first + i) of `bits` moved to bit 4, the rest zero (a five-bit code's top bit); `bits` has
// been shifted so that first + i >= 0 names the bit wanted.
inline __m256i fifth_bits(__m256i bits, int first) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_and_si256(_mm256_srlv_epi32(bits, _mm256_add_epi32(lanes, _mm256_set1_epi32(first))),
                          _mm256_set1_epi32(16));
}
#endif

// exp(x) for x <= 0, in lanes: x = n ln 2 + r with |r| <= ln 2 / 2, exp(r) by a degree-7 polynomial (the
// coefficients of Cephes' expf), times 2^n made in the exponent bits. x is clamped at -87, where exp (1.6e-38)
// is still a normal float. Within 2 ulp of std::exp.
#ifdef TCQ_VECTOR
inline Vec vec_exp_nonpositive(Vec x) {
  x = vec_max(x, vec_set1(-87.f));
  const Vec n = vec_round(vec_mul(x, vec_set1(1.44269504088896341f)));
  const Vec r = vec_fnmadd(n, vec_set1(-2.12194440e-4f), vec_fnmadd(n, vec_set1(0.693359375f), x));
  Vec y = vec_set1(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    y = vec_fmadd(y, r, vec_set1(c));
  y = vec_add(vec_fmadd(y, vec_mul(r, r), r), vec_set1(1.f));
  return vec_mul(y, vec_pow2(n));
}
#endif

#ifdef TCQ_VECTOR
// Helpers of the formats' codes() (int8.h), in AVX2 instructions, which AVX-512 machines have too.

// The 32 codes of 16 bytes of nibbles: the low nibbles, then the high ones.
inline __m256i nibble_codes(const uint8_t* q) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q)), nibble = _mm_set1_epi8(15);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), nibble), _mm_and_si128(v, nibble));
}

// Byte j: bit j of `bits` moved to bit 4 (the top bit of a five-bit code), the rest zero.
inline __m256i fifth_bit_bytes(uint32_t bits) {
  const __m256i spread = _mm256_shuffle_epi8(   // byte j: byte j / 8 of `bits` (each 128-bit lane holds all four)
      _mm256_set1_epi32(static_cast<int>(bits)),
      _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
  const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL));   // byte j: bit j % 8
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), _mm256_set1_epi8(16));
}

inline void store_codes(uint8_t* c, __m256i codes) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(c), codes); }
#endif

#ifdef TCQ_AVX2
// The narrow 8-bit product of one block of 32 values (the dot_int8 of the 32-value formats on AVX2):
// acc[r] += scale * dx_r * sum(values * q_r) + offset * xs_r for rows r < R of 8-bit x (int8.h). `values` are
// unsigned codes with an offset, or, with Signed, the signed values themselves (offset 0), multiplied as
// |value| times x with the value's sign, so that 8-bit values cannot saturate the byte products.
template <int R, bool Signed>
inline void block32_dot_int8(__m256i values, float scale, float offset, const int8_t* q, int64_t ldq, const float* dx,
                             const float* xs, int64_t ldg, __m256* acc) {
  const __m256i magnitude = Signed ? _mm256_sign_epi8(values, values) : values;
  for (int r = 0; r < R; ++r) {
    __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + r * ldq));
    if constexpr (Signed) x = _mm256_sign_epi8(x, values);
    const __m256i sums = dot_u8_i8(_mm256_setzero_si256(), magnitude, x);
    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(scale * dx[r * ldg]), acc[r]);
    if constexpr (!Signed) acc[r] = _mm256_add_ps(acc[r], _mm256_setr_ps(offset * xs[r * ldg], 0, 0, 0, 0, 0, 0, 0));
  }
}
#endif

#ifdef TCQ_AVX512
// Hides the contents of the memory at p from the optimizer. Per-block factors stored to a small array are
// then broadcast by loads (vbroadcastss from memory) rather than by shuffles out of the vector that was
// stored: shuffles share one port with the table lookups that bound the decoders.
inline void opaque(const void* p) {
  asm volatile("" : : "r"(p) : "memory");
}

// F::decode(b, v) of a format whose decoder takes its factors made beforehand (F::factors into kFactors
// floats, then F::decode(b, f, v)): the block's own factors, made here.
template <class F>
inline void decode_with_own_factors(const uint8_t* b, __m512* v) {
  alignas(64) float f[F::kFactors];
  F::factors(b, f);
  opaque(f);
  F::decode(b, f, v);
}

inline __m512 iota16() {
  return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}

// 16 bytes at p, zero-extended into the 16 lanes of a vector of int32.
inline __m512i widen_u8(const uint8_t* p) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// 16 int8 at p as float32.
inline __m512 widen_i8_ps(const void* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p))));
}

// table[index & 15] per lane: a 4-bit code decoded by a 16-entry table of its values (vpermps reads only
// the low four bits of each index, so the bits above need no masking).
inline __m512 lookup16(__m512i index, __m512 table) {
  return _mm512_permutexvar_ps(index, table);
}

// (lo ++ hi)[index & 31] per lane: a 5-bit code through a 32-entry table held in two vectors.
inline __m512 lookup32(__m512i index, __m512 lo, __m512 hi) {
  return _mm512_permutex2var_ps(lo, index, hi);
}

// 5-bit codes for lookup32, in every byte: bits 0-3 from `nibble`, bits 4-7 from `fifth` (only bit 4 of
// the low byte of a lane counts for the lookup).
inline __m512i five_bit_code(__m512i nibble, __m512i fifth) {
  return _mm512_ternarylogic_epi32(_mm512_set1_epi8(15), nibble, fifth, 0xCA);   // 15 ? nibble : fifth, bitwise
}

// Lane i gets `bits` rotated so that its bit (first + i) sits at bit 4, where five_bit_code takes it.
inline __m512i bit_to_fifth(__m512i bits, int first) {
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  return _mm512_rorv_epi32(bits, _mm512_and_si512(_mm512_add_epi32(lanes, _mm512_set1_epi32(first + 28)),
                                                  _mm512_set1_epi32(31)));
}

// Lanes 0-15 of `v` spread so that lane i of the result is lane first + i / width of v (width 4 or 8): the
// per-group factors of a block laid out under the 16 sums of one vpdpbusd.
inline __m512 spread_lanes(__m512 v, int first, int width) {
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i index = _mm512_add_epi32(_mm512_set1_epi32(first),
                                         _mm512_srli_epi32(lanes, width == 8 ? 3 : 2));
  return _mm512_permutexvar_ps(index, v);
}

// 16 rows of 16 dwords each (rows `in[i]`) transposed: out[j] holds dword j of every row.
inline void transpose16(const __m512i* in, __m512i* out) {
  __m512i a[16], b[16];
  for (int i = 0; i < 16; i += 2) {
    a[i] = _mm512_unpacklo_epi32(in[i], in[i + 1]);
    a[i + 1] = _mm512_unpackhi_epi32(in[i], in[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    b[i] = _mm512_unpacklo_epi64(a[i], a[i + 2]);
    b[i + 1] = _mm512_unpackhi_epi64(a[i], a[i + 2]);
    b[i + 2] = _mm512_unpacklo_epi64(a[i + 1], a[i + 3]);
    b[i + 3] = _mm512_unpackhi_epi64(a[i + 1], a[i + 3]);
  }
  // b[4q + s] holds, in 128-bit lane l, dwords 4l + {s'} of rows 4q..4q+3 (s' the order above: 0, 1, 2, 3).
  for (int i = 0; i < 4; ++i) {
    for (int q = 0; q < 4; q += 2) {
      a[4 * q + i] = _mm512_shuffle_i32x4(b[4 * q + i], b[4 * q + 4 + i], 0x88);       // lanes 0, 2 | 0, 2
      a[4 * q + 4 + i] = _mm512_shuffle_i32x4(b[4 * q + i], b[4 * q + 4 + i], 0xDD);   // lanes 1, 3 | 1, 3
    }
  }
  for (int i = 0; i < 4; ++i) {
    const __m512i r01_even = a[i], r01_odd = a[4 + i], r23_even = a[8 + i], r23_odd = a[12 + i];
    out[i] = _mm512_shuffle_i32x4(r01_even, r23_even, 0x88);        // 128-bit lane 0 of each source
    out[8 + i] = _mm512_shuffle_i32x4(r01_even, r23_even, 0xDD);    // lane 2
    out[4 + i] = _mm512_shuffle_i32x4(r01_odd, r23_odd, 0x88);      // lane 1
    out[12 + i] = _mm512_shuffle_i32x4(r01_odd, r23_odd, 0xDD);     // lane 3
  }
}
#elif defined(TCQ_AVX2)
// 8 rows of 8 dwords each (rows `r[i]`) transposed in place: r[j] then holds dword j of every row.
inline void transpose8(__m256i* r) {
  __m256i t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);       // dwords 0, 1 | 4, 5 of rows i, i + 1, interleaved
    t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);   // dwords 2, 3 | 6, 7
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);       // dword 0 | 4 of rows i..i + 3
    u[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);   // dword 1 | 5
    u[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);   // dword 2 | 6
    u[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);   // dword 3 | 7
  }
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm256_permute2x128_si256(u[j], u[4 + j], 0x20);       // low 128-bit lanes: dword j
    r[4 + j] = _mm256_permute2x128_si256(u[j], u[4 + j], 0x31);   // high lanes: dword j + 4
  }
}
#endif

#if defined(TCQ_AVX512)
// kLanes rows of kLanes floats (rows `r[i]`) transposed in place: r[j] then holds lane j of every row.
inline void transpose_lanes(Vec* r) {
  __m512i in[16], out[16];
  for (int i = 0; i < 16; ++i) in[i] = _mm512_castps_si512(r[i]);
  transpose16(in, out);
  for (int i = 0; i < 16; ++i) r[i] = _mm512_castsi512_ps(out[i]);
}
#elif defined(TCQ_AVX2)
inline void transpose_lanes(Vec* r) {
  __m256i v[8];
  for (int i = 0; i < 8; ++i) v[i] = _mm256_castps_si256(r[i]);
  transpose8(v);
  for (int i = 0; i < 8; ++i) r[i] = _mm256_castsi256_ps(v[i]);
}
#endif

#ifdef TCQ_VECTOR
// Hands the kBlock / kLanes vectors of the block at b to sink(std::integral_constant<int, i>{}, vector i), in
// the order its decoder makes them: as F::decode_each makes them where the format has one (a decoder whose
// vectors would not all fit in registers: AVX2 has 16, and a 256-value block is 32 of its vectors), else
// out of F::decode's array.
template <class F, class Sink>
inline void each_vector(const uint8_t* b, Sink&& sink) {
  if constexpr (requires { F::decode_each(b, sink); }) {
    F::decode_each(b, sink);
  } else {
    Vec v[F::kBlock / kLanes];
    F::decode(b, v);
    unroll<F::kBlock / kLanes>([&](auto i) { sink(i, v[decltype(i)::value]); });
  }
}
#endif

}  // namespace tcq
