// Pieces every block format shares: unaligned little-endian loads, half-precision scales, vector constants.
//
// A format is a struct with kType (its GGML type id), kBlock (values per block as the kernels walk it),
// kBytes (bytes per block) and two decoders of one block: into floats (portable; also the tests' oracle)
// and, with AVX-512, into kBlock / 16 vectors. Blocks sit at any byte offset: every load is unaligned.
// Formats with integer codes add kGroup and codes() for the 8-bit-activation products (int8.h), and may add
// dot_int8, which multiplies one block by rows of 8-bit x straight from its bytes (narrow products).
#pragma once

#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

// The vector decoders need AVX-512 F and BW (every AVX-512 server core has both); anything else compiles
// the portable ones only.
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define TCQ_AVX512 1
#include <immintrin.h>
#endif
// The 8-bit-activation products (int8.h and the formats' dot_int8) need VNNI as well.
#if defined(TCQ_AVX512) && defined(__AVX512VNNI__)
#define TCQ_VNNI 1
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

#ifdef TCQ_AVX512
// Hides the contents of the memory at p from the optimizer. Per-block factors stored to a small array are
// then broadcast by loads (vbroadcastss from memory) rather than by shuffles out of the vector that was
// stored: shuffles share one port with the table lookups that bound the decoders.
inline void opaque(const void* p) {
  asm volatile("" : : "r"(p) : "memory");
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
#endif

}  // namespace tcq
