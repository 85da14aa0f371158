// The exact tiled product's multiply on AVX-512 and AVX2: decoded float32 weight rows times float32 x, in a
// register micro-kernel of our own instead of a BLAS call per tile.
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
//
// On AVX2 (16 registers) the block is 6 weight rows by 16 rows of x, 12 accumulators. Measured on an AMD EPYC
// (Zen 3), two threads, 2048 x 8192 weights, GFLOP/s against the BLAS tiles: Q4_K at 16 rows of x 117 against
// 65, 32 rows 144 against 94, 64 rows 161 against 115, 128 rows 162 against 127-160; Q6_K at 16 rows 94 against
// 61. At 512 rows it was slower (Q4_K 150-157 against 167-171), so from 257 rows on AVX2 keeps the BLAS tiles.
#pragma once

#include "common.h"

#include <algorithm>
#include <cstdint>

#ifdef TCQ_VECTOR
namespace tcq {

// The block: kGemmRows weight rows by kGemmVecs vectors of x's rows, kGemmRows * kGemmVecs accumulators, with
// the kGemmVecs vectors of x and a broadcast weight beside them in the registers (32 on AVX-512, 16 on AVX2).
// kGemmMaxRows: up to how many rows of x the tiled product takes the micro-kernel (more take BLAS tiles).
#if defined(TCQ_AVX512)
constexpr int kGemmRows = 12;
constexpr int64_t kGemmMaxRows = INT64_MAX;
#else
constexpr int kGemmRows = 6;
constexpr int64_t kGemmMaxRows = 256;
#endif
constexpr int kGemmVecs = 2;
constexpr int64_t kGemmBlock = kLanes * kGemmVecs;   // rows of x per micro-kernel block

// x transposed in blocks of kGemmBlock of its rows (kGemmVecs vectors), each block's K values one after
// another: value kk of row r sits at xt_offset(r, kk): block r / kGemmBlock starts at (r / kGemmBlock) *
// kGemmBlock * k and holds, for each kk, its rows' values (kLanes in a last block of kLanes rows), so the
// micro-kernel reads one contiguous stream. mp, x's rows rounded up to a multiple of kLanes, the padding zero.
inline int64_t padded_rows(int64_t m) { return (m + kLanes - 1) / kLanes * kLanes; }
inline int64_t xt_width(int64_t block, int64_t mp) { return std::min<int64_t>(kGemmBlock, mp - kGemmBlock * block); }
inline int64_t xt_offset(int64_t r, int64_t kk, int64_t k, int64_t mp) {
  const int64_t block = r / kGemmBlock;
  return block * kGemmBlock * k + kk * xt_width(block, mp) + r % kGemmBlock;
}

// Columns [k0, k1) of x [m, k] (row stride k) into xt (above), the rows from m on zero.
inline void transpose_x(const float* x, int64_t m, int64_t k, int64_t mp, float* xt, int64_t k0, int64_t k1) {
  for (int64_t r0 = 0; r0 < mp; r0 += kLanes) {
    const int64_t width = xt_width(r0 / kGemmBlock, mp);
    float* block = xt + xt_offset(r0, 0, k, mp);
    int64_t kk = k0;
    for (; kk + kLanes <= k1; kk += kLanes) {
      Vec v[kLanes];
      for (int i = 0; i < kLanes; ++i) v[i] = r0 + i < m ? vec_load(x + (r0 + i) * k + kk) : vec_zero();
      transpose_lanes(v);
      for (int i = 0; i < kLanes; ++i) vec_store(block + (kk + i) * width, v[i]);
    }
    for (; kk < k1; ++kk) {
      for (int64_t i = 0; i < kLanes; ++i) block[kk * width + i] = r0 + i < m ? x[(r0 + i) * k + kk] : 0.f;
    }
  }
}

// c[j * ldc + kLanes h + l] (+)= sum over kk < kc of w[j * Ldw + kk] * xt[kk * ldx + kLanes h + l], for j < NR
// weight rows and h < H vectors of x: set on the first K-chunk (accumulate false), added to after.
// Blocks are kept out of line (noinline): inlined into the callers that dispatch on their sizes, GCC kept the
// accumulators in registers but also stored every one of them to the stack on each step over k, a store for each
// multiply-add: row_block<6, 2> took 3.9% of a 130-token prefill's samples for 2 of its 130 rows.
template <int NR, int H, int64_t Ldw>
[[gnu::noinline]] void gemm_block(const float* w, const float* xt, int64_t ldx, int64_t kc, float* c, int64_t ldc,
                                  bool accumulate) {
  Vec acc[NR][H];
  unroll<NR>([&](auto j) {
    unroll<H>([&](auto h) { acc[j][h] = accumulate ? vec_load(c + j * ldc + kLanes * h) : vec_zero(); });
  });
  for (int64_t kk = 0; kk < kc; ++kk) {
    Vec xv[H];
    unroll<H>([&](auto h) { xv[h] = vec_load(xt + kk * ldx + kLanes * h); });
    unroll<NR>([&](auto j) {
      const Vec b = vec_set1(w[j * Ldw + kk]);
      unroll<H>([&](auto h) { acc[j][h] = vec_fmadd(xv[h], b, acc[j][h]); });
    });
  }
  unroll<NR>([&](auto j) { unroll<H>([&](auto h) { vec_store(c + j * ldc + kLanes * h, acc[j][h]); }); });
}

// fn(std::integral_constant<int, a>, std::integral_constant<int, b>) for 1 <= a <= A and 1 <= b <= B: a block
// of sizes known only at run time, run by its instantiation for those sizes.
template <int A, int B, class Fn>
inline void with_sizes(int a, int b, Fn&& fn) {
  unroll<A>([&](auto i) {
    constexpr int first = decltype(i)::value + 1;
    if (first != a) return;
    unroll<B>([&](auto j) {
      constexpr int second = decltype(j)::value + 1;
      if (second == b) fn(std::integral_constant<int, first>{}, std::integral_constant<int, second>{});
    });
  });
}

// gemm_block for any nr <= kGemmRows and h <= kGemmVecs.
template <int64_t Ldw>
inline void gemm_block_any(int nr, int h, const float* w, const float* xt, int64_t ldx, int64_t kc, float* c,
                           int64_t ldc, bool accumulate) {
  with_sizes<kGemmRows, kGemmVecs>(nr, h, [&](auto rows, auto vecs) {
    gemm_block<decltype(rows)::value, decltype(vecs)::value, Ldw>(w, xt, ldx, kc, c, ldc, accumulate);
  });
}

// c[j * ldc + r] (+)= sum over kk < kc of w[j * Ldw + kk] * x[r * ldx + kk], for j < NR weight rows and r < T
// rows of x as they lie (row-major): dot products along k, a vector of kLanes values of k at a time, each summed
// across its lanes once at the end. The last, partial block of x's rows goes here rather than to gemm_block:
// there one vector of x holds those few rows and the padding, and each step over k makes NR multiply-adds for
// NR broadcasts, for all kLanes rows whether real or padding. Here a step over kLanes values of k makes NR * T
// multiply-adds for NR + T loads, for the T real rows only. A 130-row prefill (136 rows padded, the last
// vector 2 real rows and 6 of padding) spent 7.8% of its samples in that block, on AVX2. Measured on AVX2,
// two threads, Q4_K 2048 x 8192 weights: with 130 rows of x the last block took 2.3% of the samples instead
// of 5.3% (the main block about 46% in both); with 136 (8 real rows in the last vector) 8.9% against 6.3%, so
// only a last block of at most kRowBlockTail real rows goes here.
template <int NR, int T, int64_t Ldw>
[[gnu::noinline]] void row_block(const float* w, const float* x, int64_t ldx, int64_t kc, float* c, int64_t ldc,
                                 bool accumulate) {
  Vec acc[NR][T];
  unroll<NR * T>([&](auto i) { acc[i / T][i % T] = vec_zero(); });
  int64_t kk = 0;
  for (; kk + kLanes <= kc; kk += kLanes) {
    Vec xv[T];
    unroll<T>([&](auto r) { xv[r] = vec_load(x + r * ldx + kk); });
    unroll<NR>([&](auto j) {
      const Vec wv = vec_load(w + j * Ldw + kk);
      unroll<T>([&](auto r) { acc[j][r] = vec_fmadd(wv, xv[r], acc[j][r]); });
    });
  }
  unroll<NR>([&](auto j) {
    unroll<T>([&](auto r) {
      float sum = vec_sum(acc[j][r]);
      for (int64_t rest = kk; rest < kc; ++rest) sum += w[j * Ldw + rest] * x[r * ldx + rest];
      c[j * ldc + r] = accumulate ? c[j * ldc + r] + sum : sum;
    });
  });
}

// Rows of x a row_block takes at once (its NR * T accumulators stay in the registers, with T vectors of x), and
// the most real rows a partial last block of x may have to go to row_block.
constexpr int kRowBlockRows = 2;
constexpr int64_t kRowBlockTail = 4;

// row_block for any nr <= kGemmRows and t <= kRowBlockRows.
template <int64_t Ldw>
inline void row_block_any(int nr, int t, const float* w, const float* x, int64_t ldx, int64_t kc, float* c,
                          int64_t ldc, bool accumulate) {
  with_sizes<kGemmRows, kRowBlockRows>(nr, t, [&](auto rows, auto count) {
    row_block<decltype(rows)::value, decltype(count)::value, Ldw>(w, x, ldx, kc, c, ldc, accumulate);
  });
}

// c [count, mp] += (or =, on the first K-chunk) `count` weight rows times values [k0, k0 + kc) of x's m rows, a
// block of kGemmRows weight rows at a time: decode(j, nr, panel) writes rows j..j + nr (row stride Ldw) into the
// panel, which then stays in L1 while every block of x's rows passes it: transposed (xt) for gemm_block, and
// the rows of a partial last block with few real rows as they lie in x (row stride k) for row_block.
template <int64_t Ldw, class Decode>
inline void gemm_tile(int64_t count, const float* x, int64_t m, const float* xt, int64_t k, int64_t mp, int64_t k0,
                      int64_t kc, float* c, bool accumulate, float* panel, Decode&& decode) {
  for (int64_t j = 0; j < count; j += kGemmRows) {
    const int nr = static_cast<int>(std::min<int64_t>(kGemmRows, count - j));
    decode(j, nr, panel);
    for (int64_t r = 0; r < mp; r += kGemmBlock) {
      const int64_t width = xt_width(r / kGemmBlock, mp);
      if (width < kGemmBlock && m - r <= kRowBlockTail) {
        for (int64_t rr = r; rr < m; rr += kRowBlockRows) {
          row_block_any<Ldw>(nr, static_cast<int>(std::min<int64_t>(kRowBlockRows, m - rr)), panel,
                             x + rr * k + k0, k, kc, c + j * mp + rr, mp, accumulate);
        }
        continue;
      }
      gemm_block_any<Ldw>(nr, static_cast<int>(width / kLanes), panel, xt + xt_offset(r, k0, k, mp), width, kc,
                          c + j * mp + r, mp, accumulate);
    }
  }
}

// y[r * ldy + j] = c[j * mp + r] for r < m, j < count: a finished tile's output, transposed back, kLanes x
// kLanes at a time.
inline void store_transposed(const float* c, int64_t count, int64_t m, int64_t mp, float* y, int64_t ldy) {
  int64_t j0 = 0;
  for (; j0 + kLanes <= count; j0 += kLanes) {
    for (int64_t r0 = 0; r0 < m; r0 += kLanes) {
      Vec v[kLanes];
      for (int i = 0; i < kLanes; ++i) v[i] = vec_load(c + (j0 + i) * mp + r0);
      transpose_lanes(v);
      for (int64_t i = 0; i < std::min<int64_t>(kLanes, m - r0); ++i) vec_store(y + (r0 + i) * ldy + j0, v[i]);
    }
  }
  for (int64_t j = j0; j < count; ++j) {
    for (int64_t r = 0; r < m; ++r) y[r * ldy + j] = c[j * mp + r];
  }
}

}  // namespace tcq
#endif
