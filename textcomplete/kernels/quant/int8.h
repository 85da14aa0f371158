// Products with 8-bit activations: the faster, inexact mode. This file holds the quantization of x and the
// tiled path for steps of many rows (prefill, wide batches); narrow products of the formats that have one
// use their in-register kernel (F::dot_int8, driven by direct_int8 in matmul.h).
//
// Each row of x is quantized in blocks of 32 to int8 with a float32 scale per block (d = max|x| / 127). A
// weight block gives unsigned integer codes with a float scale and offset per group of kGroup values
// (value = scale * code + offset, see each format's codes()), so a group's contribution to y is
//     scale * d * sum(code * q) + offset * d * sum(q)
// and the integer sums run on AVX-512 VNNI (vpdpbusd: 64 unsigned x signed byte products an instruction) or on
// AVX2 (vpmaddubsw and vpmaddwd: 32 products in two instructions and an add; see dot_u8_i8 in common.h).
//
// Tiles of 16 weight rows ("panels") are decoded once per step into codes interleaved by 4 values
// ([K / 4][16 rows][4 codes]), so that one vpdpbusd multiplies 4 values of 16 weight rows by the same 4
// values of one row of x (broadcast), accumulating 16 outputs; AVX2 takes the panel in two halves of 8 rows.
// Every row of x reuses the decoded panel.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "check.h"
#include "common.h"
#include "parallel.h"

namespace tcq {

// Whether format F has integer codes (a kGroup and codes()).
template <class F, class = void>
struct HasCodes : std::false_type {};
template <class F>
struct HasCodes<F, std::void_t<decltype(F::kGroup)>> : std::true_type {};

// Whether format F multiplies its blocks by 8-bit x in registers (dot_int8: narrow products).
template <class F, class = void>
struct HasInt8Direct : std::false_type {};
template <class F>
struct HasInt8Direct<F, std::void_t<decltype(&F::template dot_int8<1>)>> : std::true_type {};

// AVX2's byte products (vpmaddubsw) sum pairs of code x value into 16 bits, saturating. With x within +-127,
// codes of at most 6 bits leave room to add `runs` pair sums in 16 bits (wrapping, exact while in range)
// before widening: 8 of 4-bit codes (|sum| <= 8 * 2 * 15 * 127 = 30480), 4 of 5-bit, 2 of 6-bit. 8-bit codes
// (Q8_0's q + 128) would saturate a single pair, so the kernels multiply the signed q = code - 128 instead.
template <class F>
struct CodeRange {
  static constexpr bool kWide = F::kCodeBits > 7;
  static constexpr int kRuns = kWide ? 1 : 1 << (7 - F::kCodeBits);
  static_assert(F::kCodeBits >= 4 && F::kCodeBits <= 8, "codes of 4 to 8 bits");
};

inline bool int8_available() {
#ifdef TCQ_INT8
  return true;
#else
  return false;
#endif
}

constexpr int64_t kActivationBlock = 32;
constexpr int64_t kPanel = 16;            // weight rows per panel: the lanes of one accumulator
constexpr int64_t kInt8TileRows = 64;     // weight rows a thread decodes at a time (4 panels)
constexpr int64_t kInt8ChunkValues = 2048;  // values of K per decoded tile (64 x 2048 codes: 128 KiB)
constexpr int kRowBlock = 4;              // rows of x per pass over a panel

// Row r of x [m, k] as int8 codes q, and per group of `group` values (16 or 32) the scale d of its
// 32-block and d * (sum of the group's codes).
inline void quantize_rows(const float* x, int64_t m, int64_t k, int64_t group, int8_t* q, float* dx, float* xs) {
  parallel_pieces(m, 1, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = x + r * k;
      int8_t* qr = q + r * k;
      for (int64_t b = 0; b < k; b += kActivationBlock) {
        float amax = 0.f;
        for (int64_t i = 0; i < kActivationBlock; ++i) amax = std::max(amax, std::fabs(xr[b + i]));
        const float d = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
        for (int64_t i = 0; i < kActivationBlock; ++i) qr[b + i] = static_cast<int8_t>(std::nearbyint(xr[b + i] * inv));
        for (int64_t g = b; g < b + kActivationBlock; g += group) {
          int sum = 0;
          for (int64_t i = 0; i < group; ++i) sum += qr[g + i];
          dx[(r * k + g) / group] = d;
          xs[(r * k + g) / group] = d * static_cast<float>(sum);
        }
      }
    }
  });
}

// x [m, k] quantized for groups of `group` values: codes q [m][k], per group the scale dx and the scaled code
// sum xs ([m][k / group] each; see quantize_rows).
struct QuantizedRows {
  int64_t k, ldg;
  std::vector<int8_t> q;
  std::vector<float> dx, xs;

  QuantizedRows(const float* x, int64_t m, int64_t k_, int64_t group)
      : k(k_), ldg(k_ / group), q(static_cast<size_t>(m * k_)), dx(static_cast<size_t>(m * ldg)), xs(dx.size()) {
    TCQ_CHECK(k % kActivationBlock == 0, "int8 activations: K = ", k, " is not a multiple of 32");
    quantize_rows(x, m, k, group, q.data(), dx.data(), xs.data());
  }
  // Row r from value k0 on (k0 a multiple of the group).
  const int8_t* codes(int64_t r, int64_t k0) const { return q.data() + r * k + k0; }
  const float* scales(int64_t r, int64_t k0, int64_t group) const { return dx.data() + r * ldg + k0 / group; }
  const float* sums(int64_t r, int64_t k0, int64_t group) const { return xs.data() + r * ldg + k0 / group; }
};

// One decoded tile: up to kInt8TileRows weight rows x `width` values of K, as panels.
struct Int8Tile {
  std::vector<uint8_t> codes;   // [panels][width / 4][16][4]
  std::vector<float> scale;     // [panels][width / group][16]
  std::vector<float> offset;    // same
  std::vector<uint8_t> rows;    // scratch: [16][width] codes of one panel, row-major
};

// Decodes weight rows [first, first + count) x values [k0, k0 + width) of w into tile t (rows past count are
// zero: their outputs are never stored).
template <class F>
void decode_tile(const uint8_t* w, int64_t ldw, int64_t first, int64_t count, int64_t k0, int64_t width,
                 Int8Tile& t) {
  constexpr int64_t G = F::kGroup;
  const int64_t panels = (count + kPanel - 1) / kPanel, quads = width / 4, groups = width / G;
  t.codes.resize(static_cast<size_t>(panels * quads * 64));
  t.scale.resize(static_cast<size_t>(panels * groups * kPanel));
  t.offset.resize(t.scale.size());
  t.rows.resize(static_cast<size_t>(kPanel * width));
  float scale[F::kBlock / G], offset[F::kBlock / G];
  for (int64_t p = 0; p < panels; ++p) {
    float* ps = t.scale.data() + p * groups * kPanel;
    float* po = t.offset.data() + p * groups * kPanel;
    for (int64_t c = 0; c < kPanel; ++c) {
      uint8_t* row = t.rows.data() + c * width;
      const int64_t j = p * kPanel + c;
      if (j >= count) {
        std::fill(row, row + width, 0);
        for (int64_t g = 0; g < groups; ++g) ps[g * kPanel + c] = po[g * kPanel + c] = 0.f;
        continue;
      }
      const uint8_t* src = w + (first + j) * ldw + k0 / F::kBlock * F::kBytes;
      for (int64_t b = 0; b < width / F::kBlock; ++b) {
        F::codes(src + b * F::kBytes, row + b * F::kBlock, scale, offset);
        for (int64_t g = 0; g < F::kBlock / G; ++g) {
          ps[(b * F::kBlock / G + g) * kPanel + c] = scale[g];
          po[(b * F::kBlock / G + g) * kPanel + c] = offset[g];
        }
      }
    }
    uint8_t* out = t.codes.data() + p * quads * 64;
    int64_t q = 0;
#ifdef TCQ_VNNI
    for (; q + 16 <= quads; q += 16) {   // 64 values of all 16 rows at a time
      __m512i in[16], tr[16];
      for (int c = 0; c < 16; ++c) in[c] = _mm512_loadu_si512(t.rows.data() + c * width + 4 * q);
      transpose16(in, tr);
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(out + (q + i) * 64, tr[i]);
    }
#elif defined(TCQ_AVX2)
    for (; q + 8 <= quads; q += 8) {   // 32 values of 8 rows at a time, each half of the panel
      for (int h = 0; h < 2; ++h) {
        __m256i r[8];
        for (int c = 0; c < 8; ++c) {
          r[c] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.rows.data() + (8 * h + c) * width + 4 * q));
        }
        transpose8(r);
        for (int i = 0; i < 8; ++i) _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (q + i) * 64 + 32 * h), r[i]);
      }
    }
#endif
    for (; q < quads; ++q) {
      for (int c = 0; c < 16; ++c) std::memcpy(out + q * 64 + 4 * c, t.rows.data() + c * width + 4 * q, 4);
    }
  }
}

#ifdef TCQ_VNNI
// y[r, 0..cols) += the products of R rows of quantized x with one decoded panel over `width` values.
// `count` (at most 16) of the panel's rows are real; Wide and Runs are unused (vpdpbusd does not saturate).
template <int R, int64_t G, bool Wide, int Runs>
inline void panel_product(const uint8_t* codes, const float* scale, const float* offset, int64_t width,
                          const int8_t* q, int64_t ldq, const float* dx, const float* xs, int64_t ldg, float* y,
                          int64_t ldy, int64_t count) {
  const __mmask16 cols = static_cast<__mmask16>((1u << count) - 1);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < width / G; ++g) {
    __m512i sum[R];
    for (int r = 0; r < R; ++r) sum[r] = _mm512_setzero_si512();
    for (int64_t i = 0; i < G / 4; ++i) {
      const __m512i w = _mm512_loadu_si512(codes + (g * G / 4 + i) * 64);
      for (int r = 0; r < R; ++r) {
        const __m512i xq = _mm512_set1_epi32(static_cast<int>(load_u32(reinterpret_cast<const uint8_t*>(
            q + r * ldq + g * G + 4 * i))));
        sum[r] = _mm512_dpbusd_epi32(sum[r], w, xq);
      }
    }
    const __m512 s = _mm512_loadu_ps(scale + g * kPanel), o = _mm512_loadu_ps(offset + g * kPanel);
    for (int r = 0; r < R; ++r) {
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[r]), _mm512_mul_ps(s, _mm512_set1_ps(dx[r * ldg + g])), acc[r]);
      acc[r] = _mm512_fmadd_ps(o, _mm512_set1_ps(xs[r * ldg + g]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float* yr = y + r * ldy;
    _mm512_mask_storeu_ps(yr, cols, _mm512_add_ps(_mm512_maskz_loadu_ps(cols, yr), acc[r]));
  }
}
#elif defined(TCQ_AVX2)
// The same product in two passes, one per half of the panel (8 weight rows: one vector of sums per row of x);
// Runs quads of pair sums add in 16 bits before they widen (CodeRange). With Wide codes the byte products
// take |code - 128| and x with the sign of code - 128 (both within the range vpmaddubsw cannot saturate),
// and the group's offset gains the 128 * scale taken out of the codes.
template <int R, int64_t G, bool Wide, int Runs>
inline void panel_product(const uint8_t* codes, const float* scale, const float* offset, int64_t width,
                          const int8_t* q, int64_t ldq, const float* dx, const float* xs, int64_t ldg, float* y,
                          int64_t ldy, int64_t count) {
  for (int64_t h = 0; h < 2 && 8 * h < count; ++h) {
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < width / G; ++g) {
      __m256i sum[R];
      for (int r = 0; r < R; ++r) sum[r] = _mm256_setzero_si256();
      for (int64_t i0 = 0; i0 < G / 4; i0 += Runs) {
        __m256i pairs[R];   // 16-bit sums of pairs of products
        for (int r = 0; r < R; ++r) pairs[r] = _mm256_setzero_si256();
        for (int64_t i = i0; i < std::min<int64_t>(G / 4, i0 + Runs); ++i) {
          __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + (g * G / 4 + i) * 64 + 32 * h));
          __m256i sign = w;
          if constexpr (Wide) {
            sign = _mm256_xor_si256(w, _mm256_set1_epi8(-128));   // code - 128, signed
            w = _mm256_abs_epi8(sign);
          }
          for (int r = 0; r < R; ++r) {
            __m256i xq = _mm256_set1_epi32(static_cast<int>(load_u32(reinterpret_cast<const uint8_t*>(
                q + r * ldq + g * G + 4 * i))));
            if constexpr (Wide) xq = _mm256_sign_epi8(xq, sign);
            pairs[r] = _mm256_add_epi16(pairs[r], _mm256_maddubs_epi16(w, xq));
          }
        }
        for (int r = 0; r < R; ++r) sum[r] = _mm256_add_epi32(sum[r], _mm256_madd_epi16(pairs[r], _mm256_set1_epi16(1)));
      }
      const __m256 s = _mm256_loadu_ps(scale + g * kPanel + 8 * h);
      __m256 o = _mm256_loadu_ps(offset + g * kPanel + 8 * h);
      if constexpr (Wide) o = _mm256_fmadd_ps(s, _mm256_set1_ps(128.f), o);
      for (int r = 0; r < R; ++r) {
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[r]), _mm256_mul_ps(s, _mm256_set1_ps(dx[r * ldg + g])), acc[r]);
        acc[r] = _mm256_fmadd_ps(o, _mm256_set1_ps(xs[r * ldg + g]), acc[r]);
      }
    }
    const int64_t cols = std::min<int64_t>(8, count - 8 * h);
    for (int r = 0; r < R; ++r) {
      float* yr = y + r * ldy + 8 * h;
      if (cols == 8) {
        _mm256_storeu_ps(yr, _mm256_add_ps(_mm256_loadu_ps(yr), acc[r]));
      } else {
        alignas(32) float part[8];
        _mm256_store_ps(part, acc[r]);
        for (int64_t c = 0; c < cols; ++c) yr[c] += part[c];
      }
    }
  }
}
#endif

// y[M, N] (row stride ldy: a column range of a wider matrix) = x [M, K] @ W.T with x quantized to 8 bits; F
// must have codes and K be a multiple of 32.
template <class F>
void tiled_int8(const float* x, int64_t m, int64_t k, const uint8_t* w, int64_t ldw, int64_t n, float* yp,
                int64_t ldy) {
#ifdef TCQ_INT8
  constexpr int64_t G = F::kGroup;
  constexpr bool Wide = CodeRange<F>::kWide;
  constexpr int Runs = CodeRange<F>::kRuns;
  const QuantizedRows xq(x, m, k, G);
  const int64_t ldg = xq.ldg;
  for (int64_t r = 0; r < m; ++r) std::fill(yp + r * ldy, yp + r * ldy + n, 0.f);
  const int64_t chunk = std::min(k, std::max<int64_t>(F::kBlock, kInt8ChunkValues / F::kBlock * F::kBlock));
  parallel_pieces((n + kInt8TileRows - 1) / kInt8TileRows, 1, 1, [&](int64_t t0, int64_t t1) {
    static thread_local Int8Tile tile;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t first = t * kInt8TileRows, count = std::min(kInt8TileRows, n - first);
      for (int64_t k0 = 0; k0 < k; k0 += chunk) {
        const int64_t width = std::min(chunk, k - k0), quads = width / 4, groups = width / G;
        decode_tile<F>(w, ldw, first, count, k0, width, tile);
        for (int64_t p = 0; p * kPanel < count; ++p) {
          const int64_t cols = std::min(kPanel, count - p * kPanel);
          const uint8_t* codes = tile.codes.data() + p * quads * 64;
          const float* scale = tile.scale.data() + p * groups * kPanel;
          const float* offset = tile.offset.data() + p * groups * kPanel;
          for (int64_t r = 0; r < m; r += kRowBlock) {
            const int8_t* qr = xq.codes(r, k0);
            const float* dr = xq.scales(r, k0, G);
            const float* sr = xq.sums(r, k0, G);
            float* yr = yp + r * ldy + first + p * kPanel;
            switch (std::min<int64_t>(kRowBlock, m - r)) {
              case 1: panel_product<1, G, Wide, Runs>(codes, scale, offset, width, qr, k, dr, sr, ldg, yr, ldy, cols); break;
              case 2: panel_product<2, G, Wide, Runs>(codes, scale, offset, width, qr, k, dr, sr, ldg, yr, ldy, cols); break;
              case 3: panel_product<3, G, Wide, Runs>(codes, scale, offset, width, qr, k, dr, sr, ldg, yr, ldy, cols); break;
              default: panel_product<4, G, Wide, Runs>(codes, scale, offset, width, qr, k, dr, sr, ldg, yr, ldy, cols); break;
            }
          }
        }
      }
    }
  });
#else
  fail("int8 activations need AVX-512 VNNI or AVX2");
#endif
}

}  // namespace tcq
