// The exact tiled product's multiply on AVX-512: decoded float32 weight rows times float32 x, in a register
// micro-kernel of our own instead of a BLAS call per tile.
//
// A BLAS sgemm packs both operands into its own panels on every call, and the tiled path made one call per
// tile and K-chunk, so x was repacked once per tile: a profile of an 8B-shaped 128-token prefill spent 11% of
// its time in MKL's packing, against 66% in its multiply kernels. Here x is transposed once per product
// (xt, in blocks of 32 of its rows; M rounded up to 16, the padding rows zero), and weight rows are decoded
// 12 at a time into a panel that stays in L1 while every block of x's rows passes it. The micro-kernel holds
// a block of the output transposed, 12 weight rows by 32 rows of x, in 24 accumulators: each step over k
// loads 32 values of x (two vectors of xt) and broadcasts each of the 12 weights, 24 fused multiply-adds for
// 14 loads. A tile's output builds up, transposed, in the thread's scratch and goes into y, transposed back,
// once the tile's last K-chunk is done.
//
// Measured against the BLAS tiles on Q4_K weights, two threads: 128 x 4096 x 4096 in 15.8-16.0 against
// 18.2 ms, 16 x 2048 x 2048 in 0.73 against 1.15 ms, 256 x 14336 x 4096 in 104-111 against 117 ms; an
// 8B-shaped Q4_K_M 128-token prefill in-process in 7.41 against 7.84 s (median of 6 turns each, every turn
// 4-7% faster). At 512 rows of x it is level to 6% slower (512 x 2048 x 8192: 66.7-69 against 64-65 ms).
// Blocks of 8 x 48 and 6 x 64 measured the same as 12 x 32.
#pragma once

#include "common.h"

#include <algorithm>
#include <cstdint>

#ifdef TCQ_AVX512
namespace tcq {

constexpr int kGemmRows = 12;   // weight rows per micro-kernel block
constexpr int kGemmHalves = 2;  // vectors of 16 rows of x per micro-kernel block
constexpr int64_t kGemmBlock = 16 * kGemmHalves;   // rows of x per micro-kernel block

// x transposed in blocks of 32 of its rows (kGemmHalves vectors), each block's K values one after another:
// value kk of row r sits at xt_offset(r, kk): block r / 32 starts at (r / 32) * 32 * k and holds, for each kk,
// its rows' 32 values (16 in a last block of 16 rows), so the micro-kernel reads one contiguous stream.
inline int64_t xt_width(int64_t block, int64_t mp) { return std::min<int64_t>(kGemmBlock, mp - kGemmBlock * block); }
inline int64_t xt_offset(int64_t r, int64_t kk, int64_t k, int64_t mp) {
  const int64_t block = r / kGemmBlock;
  return block * kGemmBlock * k + kk * xt_width(block, mp) + r % kGemmBlock;
}

// Columns [k0, k1) of x [m, k] (row stride k) into xt (above; mp, a multiple of 16, rows in all), the rows
// from m on zero.
inline void transpose_x(const float* x, int64_t m, int64_t k, int64_t mp, float* xt, int64_t k0, int64_t k1) {
  for (int64_t r0 = 0; r0 < mp; r0 += 16) {
    const int64_t width = xt_width(r0 / kGemmBlock, mp);
    float* block = xt + xt_offset(r0, 0, k, mp);
    int64_t kk = k0;
    for (; kk + 16 <= k1; kk += 16) {
      __m512i in[16], out[16];
      for (int i = 0; i < 16; ++i) {
        in[i] = r0 + i < m ? _mm512_castps_si512(_mm512_loadu_ps(x + (r0 + i) * k + kk)) : _mm512_setzero_si512();
      }
      transpose16(in, out);
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(block + (kk + i) * width, out[i]);
    }
    for (; kk < k1; ++kk) {
      for (int64_t i = 0; i < 16; ++i) block[kk * width + i] = r0 + i < m ? x[(r0 + i) * k + kk] : 0.f;
    }
  }
}

// c[j * ldc + 16h + l] (+)= sum over kk < kc of w[j * Ldw + kk] * xt[kk * ldx + 16h + l], for j < NR weight
// rows and h < H vectors of x: set on the first K-chunk (accumulate false), added to after.
template <int NR, int H, int64_t Ldw>
inline void gemm_block(const float* w, const float* xt, int64_t ldx, int64_t kc, float* c, int64_t ldc,
                       bool accumulate) {
  __m512 acc[NR][H];
  unroll<NR>([&](auto j) {
    unroll<H>([&](auto h) {
      acc[j][h] = accumulate ? _mm512_loadu_ps(c + j * ldc + 16 * h) : _mm512_setzero_ps();
    });
  });
  for (int64_t kk = 0; kk < kc; ++kk) {
    __m512 xv[H];
    unroll<H>([&](auto h) { xv[h] = _mm512_loadu_ps(xt + kk * ldx + 16 * h); });
    unroll<NR>([&](auto j) {
      const __m512 b = _mm512_set1_ps(w[j * Ldw + kk]);
      unroll<H>([&](auto h) { acc[j][h] = _mm512_fmadd_ps(xv[h], b, acc[j][h]); });
    });
  }
  unroll<NR>([&](auto j) { unroll<H>([&](auto h) { _mm512_storeu_ps(c + j * ldc + 16 * h, acc[j][h]); }); });
}

// gemm_block for any nr <= kGemmRows and h <= kGemmHalves.
template <int64_t Ldw>
inline void gemm_block_any(int nr, int h, const float* w, const float* xt, int64_t ldx, int64_t kc, float* c,
                           int64_t ldc, bool accumulate) {
  unroll<kGemmRows>([&](auto j) {
    constexpr int rows = decltype(j)::value + 1;
    if (rows != nr) return;
    unroll<kGemmHalves>([&](auto i) {
      constexpr int halves = decltype(i)::value + 1;
      if (halves == h) gemm_block<rows, halves, Ldw>(w, xt, ldx, kc, c, ldc, accumulate);
    });
  });
}

// c [count, mp] += (or =, on the first K-chunk) `count` weight rows times values [k0, k0 + kc) of xt, a block
// of kGemmRows weight rows at a time: decode(j, nr, panel) writes rows j..j + nr (row stride Ldw) into the
// panel, which then stays in L1 while every block of x's rows passes it.
template <int64_t Ldw, class Decode>
inline void gemm_tile(int64_t count, const float* xt, int64_t k, int64_t mp, int64_t k0, int64_t kc, float* c,
                      bool accumulate, float* panel, Decode&& decode) {
  for (int64_t j = 0; j < count; j += kGemmRows) {
    const int nr = static_cast<int>(std::min<int64_t>(kGemmRows, count - j));
    decode(j, nr, panel);
    for (int64_t r = 0; r < mp; r += kGemmBlock) {
      const int64_t width = xt_width(r / kGemmBlock, mp);
      gemm_block_any<Ldw>(nr, static_cast<int>(width / 16), panel, xt + xt_offset(r, k0, k, mp), width, kc,
                          c + j * mp + r, mp, accumulate);
    }
  }
}

// y[r * ldy + j] = c[j * mp + r] for r < m, j < count: a finished tile's output, transposed back, 16 x 16
// at a time.
inline void store_transposed(const float* c, int64_t count, int64_t m, int64_t mp, float* y, int64_t ldy) {
  int64_t j0 = 0;
  for (; j0 + 16 <= count; j0 += 16) {
    for (int64_t r0 = 0; r0 < m; r0 += 16) {
      __m512i in[16], out[16];
      for (int i = 0; i < 16; ++i) in[i] = _mm512_castps_si512(_mm512_loadu_ps(c + (j0 + i) * mp + r0));
      transpose16(in, out);
      for (int64_t i = 0; i < std::min<int64_t>(16, m - r0); ++i) {
        _mm512_storeu_ps(y + (r0 + i) * ldy + j0, _mm512_castsi512_ps(out[i]));
      }
    }
  }
  for (int64_t j = j0; j < count; ++j) {
    for (int64_t r = 0; r < m; ++r) y[r * ldy + j] = c[j * mp + r];
  }
}

}  // namespace tcq
#endif
