// Matrix products with weights in their GGUF block formats and float32 activations.
//
// y[M, N] = x[M, K] @ W.T, where W's N rows are runs of blocks exactly as a GGUF file stores them (read in
// place, often from a read-only memory map, never written). Two paths, chosen by the caller's row count:
//  - direct (few rows of x: decode steps, bandwidth-bound): every weight byte is read once; a block is
//    decoded into vector registers and multiplied into up to four rows of x at a time, or, for the formats
//    with a dot_float (the K formats, Q4_0 and Q4_1 on AVX2), its codes are multiplied by x and each group's scale is
//    taken once per group sum, the offsets from x's group sums (most read x reordered by their prepare_x).
//  - tiled (many rows: prefill, compute-bound): a tile of weight rows is decoded once into the thread's
//    float32 scratch and multiplied by all of x, in a micro-kernel of our own (gemm.h) on AVX-512 and on AVX2
//    up to 256 rows of x at a time, elsewhere in a portable loop; each tile writes its own columns of y (any row
//    stride: the parts of a fused projection share one y). On a CPU with AMX, the formats with groups of 32
//    codes take the tile products instead (amx.h), as exact.
//  - with `int8`, x is quantized to 8 bits instead (int8.h): wide products of every format with integer
//    codes take tiles of them, narrow ones of the formats with an in-register kernel (F::dot_int8) read the
//    blocks directly, like the float32 direct path.
// All parallelize over weight rows with every thread of parallel.h. Each format is a struct in quant/<name>.h
// (see quant/common.h) with a portable scalar decoder and vector ones for AVX-512 and AVX2; `portable`
// forces the scalar one, which other machines always use. The 8-bit products need AVX-512 VNNI or AVX2.
//
// Nothing here depends on torch: the torch extensions wrap these functions for tensors (torch_ops.h), the
// library without torch for pointers from Python (native.cpp). Layout contract (checked here, in
// torch_ops.h and in textcomplete/quant/__init__.py):
//   x    [M, K] float32, contiguous
//   W    N rows of row_bytes contiguous bytes each (any row stride: StoredPart)
//   y    [M, N] float32, any row stride
//   K    a multiple of the format's block size (any K for F32, F16, BF16)

#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "check.h"

#include "bf16.h"
#include "f16.h"
#include "f32.h"
#include "q4_0.h"
#include "q4_1.h"
#include "q4_k.h"
#include "q5_0.h"
#include "q5_1.h"
#include "q5_k.h"
#include "q6_k.h"
#include "q8_0.h"
#include "int8.h"
#include "gemm.h"
#include "amx.h"
#include "parallel.h"

namespace tcq {

// The direct path: weight rows per thread (at least), weight rows per pass over a K-chunk, and the bytes of
// x per K-chunk (all rows of it: they stay in L1 while the pass's weight rows stream by)...
constexpr int64_t kDirectGrain = 16, kPassRows = 16, kDirectChunkBytes = 32 << 10;
// ...unless all rows of x together take at most kWholeRowBytes: then every pass takes whole weight rows (x
// read from L2), so that each row of weights streams in one piece. Measured on an 8B-shaped Q4_K_M file, whose
// FFN down-projection has rows of 14336 values: a decode step of one request went from 374 to 357 ms; timed
// alone, that step's down-projections went from 63 to 53 ms (Q6_K) and 44 to 36 ms (Q4_K), and with four
// rows of 8-bit x from 65 to 54 and 53 to 43 ms. A 1.7B-shaped Q4_K_M step's products (rows of 2048 and 8192
// values) with two rows of x: 86 to 78 ms.
constexpr int64_t kWholeRowBytes = 256 << 10;
constexpr int64_t kParallelValues = 1 << 16;
constexpr int64_t kRowGroup = 4;   // rows of x multiplied per decoded block
// A decoded tile: 256 weight rows x 512 values (512 KiB of float32, well inside L2). Measured at 2048 x 8192
// against 64-512 rows x 512-8192 values: larger tiles repack x less often, smaller ones stay in cache.
constexpr int64_t kTileRows = 256, kTileCols = 512;
constexpr int64_t kDecodeGrain = 1 << 18;   // values per thread, at least, when only decoding

// Every format with a native kernel. Adding a format adds its header above and its struct here.
template <class... Fs>
struct FormatList {};
using Formats = FormatList<F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K>;

// Calls fn(F{}) for the format struct of GGML type `type`.
template <class Fn, class... Fs>
void with_format(FormatList<Fs...>, int64_t type, Fn&& fn) {
  const bool found = ((type == Fs::kType ? (fn(Fs{}), true) : false) || ...);
  TCQ_CHECK(found, "quant_matmul: GGML type ", type, " has no native kernel");
}

template <class... Fs>
std::vector<int64_t> type_ids(FormatList<Fs...>) {
  return {Fs::kType...};
}

// Bytes of one row of k values; k must be whole blocks except for the one-value-per-block float formats.
template <class F>
int64_t row_bytes(int64_t k) {
  if (F::kValueBytes > 0) return k * F::kValueBytes;
  TCQ_CHECK(k % F::kBlock == 0, "quant_matmul: K = ", k, " is not a multiple of the block size ", F::kBlock);
  return k / F::kBlock * F::kBytes;
}

// The loops over a row's blocks (decode_row, dot_vector, dot_float_rows, dot_int8_rows) are flattened: every
// call in them is inlined, so a block's decoder or product never runs as a call of its own. Left to its
// heuristics, GCC kept Q6_K's dot_float and code_vectors out of line (a call a block, the codes stored to
// memory and read back); inlined, the float32 Q6_K product on 2048 x 8192 went from 9.6-9.7 to 10.6-10.7 GB/s
// on one AVX2 thread and from 18.6-19.1 to 20.2-20.6 on two (cached, alternating builds).

// One weight row decoded into k floats.
template <class F>
[[gnu::flatten]] void decode_row(const uint8_t* w, int64_t k, float* y, bool portable) {
  const int64_t blocks = k / F::kBlock;
  int64_t b = 0;
#ifdef TCQ_VECTOR
  if (!portable) {
    for (; b < blocks; ++b) {
      Vec v[F::kBlock / kLanes];
      F::decode(w + b * F::kBytes, v);
      for (int i = 0; i < F::kBlock / kLanes; ++i) vec_store(y + b * F::kBlock + kLanes * i, v[i]);
    }
  }
#endif
  for (; b < blocks; ++b) F::decode(w + b * F::kBytes, y + b * F::kBlock);
  if constexpr (F::kValueBytes > 0) {   // a float format's last k % 16 values
    for (int64_t i = blocks * F::kBlock; i < k; ++i) y[i] = F::value(w + i * F::kValueBytes);
  }
}

// acc[r] += the dot products of rows r < R of x (stride ldx) with the last k % 16 values of a float
// format's weight row (nothing for block formats).
template <class F, int R>
void dot_tail(const uint8_t* w, const float* x, int64_t ldx, int64_t k, float* acc) {
  if constexpr (F::kValueBytes > 0) {
    for (int64_t i = k / F::kBlock * F::kBlock; i < k; ++i) {
      const float v = F::value(w + i * F::kValueBytes);
      for (int r = 0; r < R; ++r) acc[r] += v * x[r * ldx + i];
    }
  }
}

// Portable direct product: adds the dot products of rows r < R of x with k values of a weight row to
// y[r * ldy].
template <class F, int R>
void dot_portable(const uint8_t* w, const float* x, int64_t ldx, int64_t k, float* y, int64_t ldy) {
  float acc[R] = {};
  float v[F::kBlock];
  for (int64_t b = 0; b < k / F::kBlock; ++b) {
    F::decode(w + b * F::kBytes, v);
    for (int r = 0; r < R; ++r) {
      const float* xb = x + r * ldx + b * F::kBlock;
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int i = 0; i < F::kBlock; ++i) sum += v[i] * xb[i];
      acc[r] += sum;
    }
  }
  dot_tail<F, R>(w, x, ldx, k, acc);
  for (int r = 0; r < R; ++r) y[r * ldy] += acc[r];
}

#ifdef TCQ_VECTOR
// Whether format F's vector decoder takes its block's factors (scales and offsets) made beforehand:
// F::factors(b, f) fills kFactors floats, F::decode(b, f, v) decodes.
template <class F, class = void>
struct HasFactors : std::false_type {};
template <class F>
struct HasFactors<F, std::void_t<decltype(F::kFactors)>> : std::true_type {};

// Vector direct product, added to y[r * ldy]. A step decodes U blocks (at least 8 vectors) and feeds each
// decoded vector to the R rows of x as it is made (each_vector); every row keeps C independent accumulators
// so the fused multiply-adds overlap. Formats with factors (HasFactors) have them made for a run of blocks
// first, in a pass of their own. Measured on Q4_K, alternating builds: a cached matrix on one thread went
// from 9.0 to 10.5 GB/s, a 1.7B-shaped Q4_K_M decode step from 84 to 82.5 ms, an 8B-shaped one from 343-359
// to 340-344 ms; factors made a block ahead inside the loop gained little (14.7 to 14.5 ns a block). Runs
// of 32 blocks made rows of 8192 values slower (their factor pass read past the prefetched bytes); 8 do not.
template <class F, int R>
[[gnu::flatten]] void dot_vector(const uint8_t* w, const float* x, int64_t ldx, int64_t k, float* y, int64_t ldy) {
  constexpr int V = F::kBlock / kLanes;
  constexpr int U = V >= 8 ? 1 : 8 / V;
  constexpr int C = R == 1 ? 4 : 2;
  Vec acc[R][C];
  unroll<R * C>([&](auto i) { acc[i / C][i % C] = vec_zero(); });
  // The decoded vector i of a step's unit u: consecutive vectors of every decoder's order (value order, or
  // pairs 4 apart, or fours 8 apart) take different accumulators.
  auto take = [&](const float* xb, auto u, auto index, Vec v) {
    constexpr int i = decltype(index)::value, c = ((decltype(u)::value * V + i) ^ (i >> 2)) % C;
    unroll<R>([&](auto r) { acc[r][c] = vec_fmadd(v, vec_load(xb + r * ldx + kLanes * i), acc[r][c]); });
  };
  const int64_t blocks = k / F::kBlock;
  if constexpr (HasFactors<F>::value) {
    constexpr int64_t kRun = 8;   // blocks whose factors one pass makes (8 Q4_K blocks: 1152 bytes)
    alignas(64) float f[kRun * F::kFactors];
    for (int64_t b0 = 0; b0 < blocks; b0 += kRun) {
      const int64_t run = std::min(kRun, blocks - b0);
      for (int64_t i = 0; i < run; ++i) F::factors(w + (b0 + i) * F::kBytes, f + i * F::kFactors);
      opaque(f);
      for (int64_t i = 0; i < run; ++i) {
        const int64_t b = b0 + i;
        prefetch_block<F::kBytes>(w + b * F::kBytes);
        Vec v[V];
        F::decode(w + b * F::kBytes, f + i * F::kFactors, v);
        unroll<V>([&](auto index) {
          take(x + b * F::kBlock, std::integral_constant<int, 0>{}, index, v[decltype(index)::value]);
        });
      }
    }
  } else {
    auto step = [&](int64_t b, auto units) {
      prefetch_block<decltype(units)::value * F::kBytes>(w + b * F::kBytes);
      unroll<decltype(units)::value>([&](auto u) {
        each_vector<F>(w + (b + decltype(u)::value) * F::kBytes, [&](auto index, Vec v) {
          take(x + (b + decltype(u)::value) * F::kBlock, u, index, v);
        });
      });
    };
    int64_t b = 0;
    for (; b + U <= blocks; b += U) step(b, std::integral_constant<int, U>{});
    for (; b < blocks; ++b) step(b, std::integral_constant<int, 1>{});
  }
  float sums[R];
  unroll<R>([&](auto r) {
    Vec total = acc[r][0];
    unroll<C - 1>([&](auto c) { total = vec_add(total, acc[r][c + 1]); });
    sums[r] = vec_sum(total);
  });
  dot_tail<F, R>(w, x, ldx, k, sums);
  for (int r = 0; r < R; ++r) y[r * ldy] += sums[r];
}
#endif

template <class F, int R>
void dot_rows(const uint8_t* w, const float* x, int64_t ldx, int64_t k, float* y, int64_t ldy, bool portable) {
#ifdef TCQ_VECTOR
  if (!portable) return dot_vector<F, R>(w, x, ldx, k, y, ldy);
#endif
  dot_portable<F, R>(w, x, ldx, k, y, ldy);
}

// Whether format F multiplies its blocks by float32 x with each group's scale taken once per group sum
// (dot_float: one multiply-add a value, where a decoded vector costs two), its offsets by x's group sums.
template <class F, class = void>
struct HasFloatDot : std::false_type {};
template <class F>
struct HasFloatDot<F, std::void_t<decltype(&F::template dot_float<1>)>> : std::true_type {};

// The sums of each row of x over groups of `group` values (dot_float's offsets).
struct GroupSums {
  int64_t ldg;
  std::vector<float> xs;

  GroupSums(const float* x, int64_t m, int64_t k, int64_t group) : ldg(k / group), xs(static_cast<size_t>(m * ldg)) {
    for (int64_t i = 0; i < static_cast<int64_t>(xs.size()); ++i) {
      const float* v = x + i / ldg * k + i % ldg * group;
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t l = 0; l < group; ++l) sum += v[l];
      xs[i] = sum;
    }
  }
  // Row r's sums from value k0 on (k0 a multiple of the group).
  const float* sums(int64_t r, int64_t k0, int64_t group) const { return xs.data() + r * ldg + k0 / group; }
};

// Whether format F's dot_float reads x in an order of its own, made once per product by
// F::prepare_x(x, out, k) for each row of k values.
template <class F, class = void>
struct HasPreparedX : std::false_type {};
template <class F>
struct HasPreparedX<F, std::void_t<decltype(&F::prepare_x)>> : std::true_type {};

// Blocks that one F::dot_float call multiplies (F::kDotBlocks, else 1).
template <class F>
constexpr int64_t dot_blocks() {
  if constexpr (requires { F::kDotBlocks; }) return F::kDotBlocks;
  else return 1;
}

#ifdef TCQ_VECTOR
// y[r * ldy] += R rows of float32 x times `width` values of a weight row, dot_blocks<F>() blocks a step
// (F::dot_float). A lone block left at the end of a row, which prepare_x keeps in x's order, is decoded.
template <class F, int R>
[[gnu::flatten]] void dot_float_rows(const uint8_t* w, const float* x, int64_t ldx, const float* xs, int64_t ldg,
                                     int64_t width, float* y, int64_t ldy) {
  constexpr int64_t D = dot_blocks<F>();
  Vec acc[R];
  for (int r = 0; r < R; ++r) acc[r] = vec_zero();
  const int64_t blocks = width / F::kBlock;
  int64_t b = 0;
  for (; b + D <= blocks; b += D) {
    prefetch_block<D * F::kBytes>(w + b * F::kBytes);
    F::template dot_float<R>(w + b * F::kBytes, x + b * F::kBlock, ldx, xs + b * F::kBlock / F::kGroup, ldg, acc);
  }
  if constexpr (D > 1) {
    for (; b < blocks; ++b) {
      Vec v[F::kBlock / kLanes];
      F::decode(w + b * F::kBytes, v);
      unroll<F::kBlock / kLanes>([&](auto i) {
        for (int r = 0; r < R; ++r) acc[r] = vec_fmadd(v[i], vec_load(x + r * ldx + b * F::kBlock + kLanes * i), acc[r]);
      });
    }
  }
  for (int r = 0; r < R; ++r) y[r * ldy] += vec_sum(acc[r]);
}
#endif

// The K-chunk of a direct path whose m rows of x take value_bytes a value: whole rows while x fits in
// kWholeRowBytes, else whole blocks filling kDirectChunkBytes (see both above).
template <class F>
int64_t direct_chunk(int64_t m, int64_t k, int64_t value_bytes) {
  if (m * k * value_bytes <= kWholeRowBytes) return k;
  constexpr int64_t step = dot_blocks<F>() * F::kBlock;   // whole dot_float steps, so that pairs stay aligned
  return std::max<int64_t>(1, kDirectChunkBytes / (value_bytes * m * step)) * step;
}

// The direct paths' loop over weight rows [n0, n1): each weight byte is read from memory once. The rows go
// a few at a time, and K in chunks of `chunk` values, small enough that the chunk of every row of x stays in
// L1 while those weight rows pass it; rows(j, k0, width, r, count) multiplies weight row j's values
// [k0, k0 + width) into rows r..r + count of x (count <= kRowGroup).
template <class Rows>
void direct_loop(int64_t m, int64_t n0, int64_t n1, int64_t k, int64_t chunk, const Rows& rows) {
  for (int64_t j0 = n0; j0 < n1; j0 += kPassRows) {
    const int64_t j1 = std::min(n1, j0 + kPassRows);
    for (int64_t k0 = 0; k0 < k; k0 += chunk) {
      const int64_t width = std::min(chunk, k - k0);
      for (int64_t j = j0; j < j1; ++j) {
        for (int64_t r = 0; r < m; r += kRowGroup) rows(j, k0, width, r, std::min(kRowGroup, m - r));
      }
    }
  }
}

// Weight rows [n0, n1) of one matrix times float32 x [m, k], added to y (row stride ldy): rows of x in groups
// of up to four per decoded block, or per dot_float step given x's group sums.
template <class F>
void direct_range(const float* xp, int64_t m, int64_t k, const uint8_t* w, int64_t ldw, int64_t n0, int64_t n1,
                  float* yp, int64_t ldy, bool portable, const GroupSums* sums) {
  const int64_t chunk = direct_chunk<F>(m, k, sizeof(float));
  direct_loop(m, n0, n1, k, chunk, [&](int64_t j, int64_t k0, int64_t width, int64_t r, int64_t count) {
    const uint8_t* piece = w + j * ldw + k0 / F::kBlock * F::kBytes;
    const float* xr = xp + r * k + k0;
    float* yr = yp + r * ldy + j;
#ifdef TCQ_VECTOR
    if constexpr (HasFloatDot<F>::value) {
      if (sums != nullptr) {
        const float* sr = sums->sums(r, k0, F::kGroup);
        switch (count) {
          case 1: return dot_float_rows<F, 1>(piece, xr, k, sr, sums->ldg, width, yr, ldy);
          case 2: return dot_float_rows<F, 2>(piece, xr, k, sr, sums->ldg, width, yr, ldy);
          case 3: return dot_float_rows<F, 3>(piece, xr, k, sr, sums->ldg, width, yr, ldy);
          default: return dot_float_rows<F, 4>(piece, xr, k, sr, sums->ldg, width, yr, ldy);
        }
      }
    }
#endif
    switch (count) {
      case 1: dot_rows<F, 1>(piece, xr, k, width, yr, ldy, portable); break;
      case 2: dot_rows<F, 2>(piece, xr, k, width, yr, ldy, portable); break;
      case 3: dot_rows<F, 3>(piece, xr, k, width, yr, ldy, portable); break;
      default: dot_rows<F, 4>(piece, xr, k, width, yr, ldy, portable); break;
    }
  });
}

#ifdef TCQ_INT8
// y[r * ldy] += R rows of 8-bit x times `width` values of a weight row, block by block (F::dot_int8).
template <class F, int R>
[[gnu::flatten]] void dot_int8_rows(const uint8_t* w, const int8_t* q, int64_t ldq, const float* dx, const float* xs,
                                    int64_t ldg, int64_t width, float* y, int64_t ldy) {
  constexpr int64_t G = F::kGroup;
  Vec acc[R];
  for (int r = 0; r < R; ++r) acc[r] = vec_zero();
  for (int64_t b = 0; b < width / F::kBlock; ++b) {
    prefetch_block<F::kBytes>(w + b * F::kBytes);
    F::template dot_int8<R>(w + b * F::kBytes, q + b * F::kBlock, ldq, dx + b * F::kBlock / G,
                            xs + b * F::kBlock / G, ldg, acc);
  }
  for (int r = 0; r < R; ++r) y[r * ldy] += vec_sum(acc[r]);
}

// direct_range with x quantized to 8 bits (int8.h), for formats with an in-register 8-bit kernel.
template <class F>
void direct_int8_range(const QuantizedRows& xq, int64_t m, int64_t k, const uint8_t* w, int64_t ldw, int64_t n0,
                       int64_t n1, float* yp, int64_t ldy) {
  constexpr int64_t G = F::kGroup;
  const int64_t chunk = direct_chunk<F>(m, k, sizeof(int8_t));
  direct_loop(m, n0, n1, k, chunk, [&](int64_t j, int64_t k0, int64_t width, int64_t r, int64_t count) {
    const uint8_t* piece = w + j * ldw + k0 / F::kBlock * F::kBytes;
    const int8_t* qr = xq.codes(r, k0);
    const float* dr = xq.scales(r, k0, G);
    const float* sr = xq.sums(r, k0, G);
    float* yr = yp + r * ldy + j;
    switch (count) {
      case 1: dot_int8_rows<F, 1>(piece, qr, k, dr, sr, xq.ldg, width, yr, ldy); break;
      case 2: dot_int8_rows<F, 2>(piece, qr, k, dr, sr, xq.ldg, width, yr, ldy); break;
      case 3: dot_int8_rows<F, 3>(piece, qr, k, dr, sr, xq.ldg, width, yr, ldy); break;
      default: dot_int8_rows<F, 4>(piece, qr, k, dr, sr, xq.ldg, width, yr, ldy); break;
    }
  });
}
#endif

// One stored matrix of a product whose output is its matrices' outputs side by side: `rows` rows of
// `row_bytes` contiguous bytes, `stride` bytes apart, in the block format of GGML type `type`.
struct StoredPart {
  const uint8_t* data;
  int64_t rows, row_bytes, stride, type;
};

// Checks that a part's rows hold k values of its format.
inline void check_part(const StoredPart& p, int64_t k) {
  with_format(Formats{}, p.type, [&](auto f) {
    const int64_t bytes = row_bytes<decltype(f)>(k);
    TCQ_CHECK(p.row_bytes == bytes, "quant_matmul: a row of ", k, " values takes ", bytes, " bytes, got ",
              p.row_bytes);
  });
  TCQ_CHECK(p.rows >= 0 && (p.rows <= 1 || p.stride >= p.row_bytes) && (p.rows == 0 || p.data != nullptr),
            "quant_matmul: weight rows must be contiguous bytes, got a row stride of ", p.stride, " for rows of ",
            p.row_bytes);
}

// Direct path: y [m, sum of the parts' rows] (contiguous) = x @ [W_0; W_1; ...].T in one parallel region, each
// weight byte read once; with `int8`, the formats with an in-register 8-bit kernel quantize x (once per group
// size).
inline void direct_parts(const float* xp, int64_t m, int64_t k, const std::vector<StoredPart>& parts, float* yp,
                         bool portable, bool int8) {
  std::vector<int64_t> first{0};
  for (const StoredPart& p : parts) {
    check_part(p, k);
    first.push_back(first.back() + p.rows);
  }
  const int64_t n = first.back();
  std::fill(yp, yp + m * n, 0.f);
  if (m == 0 || n == 0) return;
  const bool quantize = int8 && !portable && int8_available();
  // x in 8 bits for each group size a part needs (16 or 32), made before the threads start.
  std::vector<std::pair<int64_t, QuantizedRows>> quantized;
  auto quantized_for = [&](int64_t group) -> const QuantizedRows& {
    for (const auto& q : quantized) if (q.first == group) return q.second;
    fail("quant_matmul: x was not quantized for groups of ", group);
  };
  if (quantize) {
    for (const StoredPart& p : parts) {
      with_format(Formats{}, p.type, [&](auto f) {
        using F = decltype(f);
        if constexpr (HasInt8Direct<F>::value) {
          const bool have = std::any_of(quantized.begin(), quantized.end(), [](const auto& q) { return q.first == F::kGroup; });
          if (!have) quantized.emplace_back(F::kGroup, QuantizedRows(xp, m, k, F::kGroup));
        }
      });
    }
  }
  // x's group sums for each group size a part's dot_float needs, likewise.
  std::vector<std::pair<int64_t, GroupSums>> summed;
  auto sums_for = [&](int64_t group) -> const GroupSums* {
    for (const auto& s : summed) if (s.first == group) return &s.second;
    return nullptr;
  };
  if (!portable) {
    for (const StoredPart& p : parts) {
      with_format(Formats{}, p.type, [&](auto f) {
        using F = decltype(f);
        if constexpr (HasFloatDot<F>::value) {
          if (!(quantize && HasInt8Direct<F>::value) && sums_for(F::kGroup) == nullptr) {
            summed.emplace_back(F::kGroup, GroupSums(xp, m, k, F::kGroup));
          }
        }
      });
    }
  }
  // x in the order of each format's dot_float that has one (HasPreparedX), made where its sums are.
  std::vector<std::pair<int64_t, std::vector<float>>> prepared;
  auto prepared_for = [&](int64_t type) -> const float* {
    for (const auto& p : prepared) if (p.first == type) return p.second.data();
    return nullptr;
  };
  if (!portable) {
    for (const StoredPart& p : parts) {
      with_format(Formats{}, p.type, [&](auto f) {
        using F = decltype(f);
        if constexpr (HasFloatDot<F>::value && HasPreparedX<F>::value) {
          if (sums_for(F::kGroup) != nullptr && prepared_for(F::kType) == nullptr) {
            std::vector<float> out(static_cast<size_t>(m * k));
            for (int64_t r = 0; r < m; ++r) F::prepare_x(xp + r * k, out.data() + r * k, k);
            prepared.emplace_back(F::kType, std::move(out));
          }
        }
      });
    }
  }
  // A tiny matrix is read faster than a thread pool wakes: split only products of at least kParallelValues
  // weights per thread. Measured on SmolLM2-135M's decode (matrices of 0.1-0.9M weights): 2^16 takes the
  // native layers from 13.2 to 8.1 ms a token against 2^20 (one thread for every matrix); 2^14 and 2^17 are
  // slower again.
  const int64_t grain = std::max<int64_t>(kDirectGrain, (kParallelValues + k - 1) / k);
  parallel_pieces(n, kPassRows, grain, [&](int64_t n0, int64_t n1) {
    for (size_t i = 0; i < parts.size(); ++i) {
      const int64_t lo = std::max(n0, first[i]) - first[i], hi = std::min(n1, first[i + 1]) - first[i];
      if (lo >= hi) continue;
      const uint8_t* w = parts[i].data;
      const int64_t ldw = parts[i].stride;
      with_format(Formats{}, parts[i].type, [&](auto f) {
        using F = decltype(f);
#ifdef TCQ_INT8
        if constexpr (HasInt8Direct<F>::value) {
          if (quantize) return direct_int8_range<F>(quantized_for(F::kGroup), m, k, w, ldw, lo, hi, yp + first[i], n);
        }
#endif
        const GroupSums* sums = nullptr;
        const float* xf = xp;
        if constexpr (HasFloatDot<F>::value) {
          sums = sums_for(F::kGroup);
          if constexpr (HasPreparedX<F>::value) {
            if (sums != nullptr) xf = prepared_for(F::kType);
          }
        }
        direct_range<F>(xf, m, k, w, ldw, lo, hi, yp + first[i], n, portable, sums);
      });
    }
  });
}

// The tiled paths hand out weight rows in pieces of whole multiples of this many (micro-kernel blocks of 6
// or 12 rows) as threads free up (parallel_pieces), each piece walked in tiles. Handed out a tile at a time,
// the last piece of a product was a whole tile, and the thread without one waited for it at the barrier: a
// 256-row tile of a 1.7B-shaped FFN down-projection times 130 rows of x takes about 6 ms. Measured on a
// 130-token prefill of the 1.7B Q4_K_M file on two threads: libgomp's spinning fell from 4.1-4.8% of the
// samples to 2.1-2.3%, and the prefill from 3.04-3.58 s to 2.83-3.34 s (two builds taking turns).
constexpr int64_t kTiledPieceRows = 24;

// Values of K per decoded tile: kTileCols in whole blocks (or all of a shorter K).
template <class F>
int64_t tile_cols(int64_t k) {
  return std::min(k, std::max<int64_t>(F::kBlock, kTileCols / F::kBlock * F::kBlock));
}

#ifdef TCQ_VECTOR
// The decoded rows' stride in the micro-kernel's panel: a K-chunk and a cache line more, so that its
// kGemmRows rows do not fall in the same few L1 sets.
constexpr int64_t kGemmLdw = kTileCols + 16;
// A K-chunk of transposed x (cols x mp floats), which every panel of a tile reads again, stays within this
// many bytes: x with many rows gets shorter K-chunks. Measured at 512 x 2048 x 8192: 66.7-67.0 ms against
// 68.8-70.9 without the bound (512 KiB: 67.0-67.7).
constexpr int64_t kGemmXtBytes = 256 << 10;
// A tile's transposed output (rows x mp floats) stays within this many bytes: x with many rows gets tiles of
// fewer weight rows.
constexpr int64_t kGemmOutBytes = 512 << 10;

// The tiled path with the micro-kernel (gemm.h): x transposed once, then each thread decodes tiles of weight rows a
// K-chunk at a time and multiplies them by xt in the micro-kernel, its output transposed into y per tile.
template <class F>
void tiled_fma(const float* xp, int64_t m, int64_t k, const uint8_t* w, int64_t ldw, int64_t n, float* yp,
               int64_t ldy) {
  const int64_t mp = padded_rows(m);
  const std::unique_ptr<float[]> transposed(new float[k * mp]);   // not zeroed: every value is written
  float* xt = transposed.get();
  parallel_pieces(k, 16, 1024, [&](int64_t k0, int64_t k1) { transpose_x(xp, m, k, mp, xt, k0, k1); });
  // Tiles of whole pieces, so that only a product's last tile ends in a partial micro-kernel block.
  const int64_t rows =
      std::max(kTiledPieceRows, std::min(kTileRows, kGemmOutBytes / (mp * 4)) / kTiledPieceRows * kTiledPieceRows);
  const int64_t cols = std::min(tile_cols<F>(k), std::max<int64_t>(F::kBlock, kGemmXtBytes / (mp * 4) / F::kBlock * F::kBlock));
  parallel_pieces(n, kTiledPieceRows, 1, [&](int64_t n0, int64_t n1) {
    // Kept between calls, like the tiled path's scratch below.
    static thread_local std::vector<float> decoded, out;
    decoded.resize(static_cast<size_t>(kGemmRows * kGemmLdw));
    out.resize(std::max<size_t>(out.size(), static_cast<size_t>(rows * mp)));
    for (int64_t first = n0; first < n1; first += rows) {
      const int64_t count = std::min(rows, n1 - first);
      for (int64_t k0 = 0; k0 < k; k0 += cols) {
        const int64_t width = std::min(cols, k - k0);
        const uint8_t* chunk = w + first * ldw + k0 / F::kBlock * F::kBytes;
        if (k0 + width < k) {
          prefetch_rows(chunk + row_bytes<F>(width), count, row_bytes<F>(std::min(cols, k - k0 - width)), ldw);
        }
        gemm_tile<kGemmLdw>(count, xp, m, xt, k, mp, k0, width, out.data(), k0 > 0, decoded.data(),
                            [&](int64_t j, int nr, float* panel) {
                              for (int r = 0; r < nr; ++r) {
                                decode_row<F>(chunk + (j + r) * ldw, width, panel + r * kGemmLdw, false);
                              }
                            });
      }
      store_transposed(out.data(), count, m, mp, yp + first, ldy);
    }
  });
}
#endif

// Portable tiled path: each thread decodes tiles of weight rows (a K-chunk at a time) into its own float32
// scratch and multiplies every row of x by them, accumulating into the tile's columns of y.
template <class F>
void tiled_portable(const float* xp, int64_t m, int64_t k, const uint8_t* w, int64_t ldw, int64_t n, float* yp,
                    int64_t ldy, bool portable) {
  const int64_t rows = kTileRows, cols = tile_cols<F>(k);
  parallel_pieces(n, kTiledPieceRows, 1, [&](int64_t n0, int64_t n1) {
    // Kept between calls: a fresh buffer this size is a fresh mapping, and faulting its pages in costs
    // more than decoding into it.
    static thread_local std::vector<float> buffer;
    buffer.resize(std::max<size_t>(buffer.size(), static_cast<size_t>(rows * cols)));
    for (int64_t first = n0; first < n1; first += rows) {
      const int64_t count = std::min(rows, n1 - first);
      for (int64_t k0 = 0; k0 < k; k0 += cols) {
        const int64_t width = std::min(cols, k - k0);
        const uint8_t* chunk = w + first * ldw + k0 / F::kBlock * F::kBytes;
        for (int64_t r = 0; r < count; ++r) decode_row<F>(chunk + r * ldw, width, buffer.data() + r * width, portable);
        for (int64_t i = 0; i < m; ++i) {
          const float* xr = xp + i * k + k0;
          float* yr = yp + i * ldy + first;
          for (int64_t j = 0; j < count; ++j) {
            const float* wr = buffer.data() + j * width;
            float sum = 0.f;
#pragma omp simd reduction(+ : sum)
            for (int64_t c = 0; c < width; ++c) sum += xr[c] * wr[c];
            yr[j] = k0 == 0 ? sum : yr[j] + sum;
          }
        }
      }
    }
  });
}

// Tiled path: AMX tiles for the formats they take (amx.h), else tiled_fma in blocks of the rows of x that
// gemm.h's micro-kernel takes, else (and with `portable`) the portable loop.
template <class F>
void tiled(const float* xp, int64_t m, int64_t k, const uint8_t* w, int64_t ldw, int64_t n, float* yp, int64_t ldy,
           bool portable) {
#ifdef TCQ_AMX
  if constexpr (HasCodes<F>::value) {
    if constexpr (F::kGroup == kAmxGroup) {
      if (!portable && amx_enabled()) return tiled_amx<F>(xp, m, k, w, ldw, n, yp, ldy);
    }
  }
#endif
#ifdef TCQ_VECTOR
  if (!portable) {
    for (int64_t r = 0; r < m; r += std::min(m, kGemmMaxRows)) {
      tiled_fma<F>(xp + r * k, std::min(m - r, kGemmMaxRows), k, w, ldw, n, yp + r * ldy, ldy);
    }
    return;
  }
#endif
  tiled_portable<F>(xp, m, k, w, ldw, n, yp, ldy, portable);
}

// y [M, sum of the parts' rows] (contiguous) = x @ [W_0; W_1; ...].T: the direct path for at most direct_rows rows
// of x (one parallel region), else each part's tiled product written straight into its columns of y, so that a
// fused projection (q/k/v, gate/up) needs no concatenation afterwards (on a 130-token prefill of the 1.7B shape,
// the concatenations took 85 ms of 3 s).
inline void matmul_parts(const float* x, int64_t m, int64_t k, const std::vector<StoredPart>& parts, float* y,
                         int64_t direct_rows, bool portable, bool int8 = false) {
  TCQ_CHECK(!parts.empty(), "quant_matmul: no matrices");
  if (m <= direct_rows) return direct_parts(x, m, k, parts, y, portable, int8);
  int64_t total = 0;
  for (const StoredPart& p : parts) {
    check_part(p, k);
    total += p.rows;
  }
  int64_t first = 0;
  for (const StoredPart& p : parts) {
    const int64_t n = p.rows;
    float* out = y + first;
    first += n;
    if (m == 0 || n == 0) continue;
    with_format(Formats{}, p.type, [&](auto f) {
      using F = decltype(f);
      if constexpr (HasCodes<F>::value) {
        if (int8 && !portable && int8_available()) return tiled_int8<F>(x, m, k, p.data, p.stride, n, out, total);
      }
      tiled<F>(x, m, k, p.data, p.stride, n, out, total, portable);
    });
  }
}

// y [N, K] (contiguous) = the stored part's rows decoded to float32.
inline void dequantize(const StoredPart& p, int64_t k, float* y, bool portable) {
  check_part(p, k);
  with_format(Formats{}, p.type, [&](auto f) {
    using F = decltype(f);
    parallel_pieces(p.rows, 1, std::max<int64_t>(1, kDecodeGrain / std::max<int64_t>(1, k)), [&](int64_t n0, int64_t n1) {
      for (int64_t j = n0; j < n1; ++j) decode_row<F>(p.data + j * p.stride, k, y + j * k, portable);
    });
  });
}

// The GGML type ids whose narrow products (at most direct_rows rows) multiply 8-bit x in registers.
template <class... Fs>
std::vector<int64_t> int8_narrow_type_ids(FormatList<Fs...>) {
  std::vector<int64_t> ids;
  if (int8_available()) ((HasInt8Direct<Fs>::value ? ids.push_back(Fs::kType) : void()), ...);
  return ids;
}

// Whether the exact tiled products of the formats with integer codes run on AMX tiles (amx.h).
inline bool amx() {
#ifdef TCQ_AMX
  return amx_enabled();
#else
  return false;
#endif
}

inline bool vectorized() {
#ifdef TCQ_VECTOR
  return true;
#else
  return false;
#endif
}

// float32 lanes of the vector decoders (16 with AVX-512, 8 with AVX2), 1 when only the portable ones exist.
inline int vector_lanes() {
#ifdef TCQ_VECTOR
  return kLanes;
#else
  return 1;
#endif
}

}  // namespace tcq
