// The exact tiled product on AMX (Intel's tile registers, bfloat16 tile products), for the formats with
// integer codes in groups of 32: as exact as the float32 micro-kernel (gemm.h), and faster.
//
// A tile product (tdpbf16ps) multiplies 16 rows by 16 columns over 32 bfloat16 values of K and adds the
// products into 16 x 16 float32 sums: 8192 multiply-adds an instruction, where a 512-bit fused multiply-add
// does 16. Two things make it exact here:
//  - Weights: a block format's values are scale * code + offset per group of values (F::codes, as in int8.h),
//    and its codes, integers of at most 8 bits, are exact in bfloat16 (8 significant bits). They go in as
//    code - 2^(bits - 1), which is then the value itself for the formats with a symmetric offset (Q4_0, Q5_0,
//    Q8_0): offset + 2^(bits - 1) * scale is zero.
//  - Activations: each float32 of x is the exact sum of three bfloat16, its top 8 significand bits, the next 8
//    and the last 8 (truncated, so each remainder is exact), and the three parts are multiplied in turn into
//    the same float32 sums. The products of a code and a part are exact; only the additions round, in float32.
// So one group of one 16 x 16 output tile is three tile products over the group's K, their float32 sums then
// scaled by the group's scale per weight row, plus its offset times x's sum over the group (as the float32
// direct products do): Y += scale * (C . x) + offset * sum(x).
//
// Layout: the weights are the A operand (16 weight rows x one group of K, bfloat16, in a panel the thread
// decodes a K-chunk of at a time); x is B, in the pair-interleaved layout tile products read (a row of B holds
// two consecutive values of K for each of 16 rows of x), made once per product for each of the three parts.
// An output tile is weight rows by rows of x, accumulated in the thread's scratch and turned around into y
// when the panel's last K-chunk is done.
//
// Measured against the float32 micro-kernel on this path's first machine (an Intel Xeon with AMX, two
// threads), x 128 x 4096 by 4096 x 4096 weights: Q4_K 10.8-11.5 against 15.0 ms, Q8_0 11.0 against 16.7, Q5_K
// 11.4 against 16.0, Q4_0 10.8 against 16.6; a 128-token prefill in-process, 1.7B-shaped Q4_K_M file 1.38-1.43
// against 1.81-1.84 s, 8B-shaped 5.57-5.61 against 7.07-7.35 s. The tile products themselves would take a
// fifth of that: what bounds it is the scaling of every group's sums by the vector unit (about 40% of the
// time) and tile loads, which the tile unit takes in order, each holding up the products behind it.
#pragma once

#include "common.h"

#if defined(TCQ_AVX512) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define TCQ_AMX 1
#endif

#ifdef TCQ_AMX
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "parallel.h"

namespace tcq {

// Linux hands out the tile registers' state to a process that asks for it (arch_prctl ARCH_REQ_XCOMP_PERM
// for XFEATURE_XTILEDATA); a kernel that refuses leaves the float32 micro-kernel in charge.
inline bool amx_enabled() {
  static const bool enabled = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return enabled;
}

// The formats whose tiled products run here: integer codes (HasCodes) in groups of kAmxGroup (Q4_0, Q4_1, Q5_0,
// Q5_1, Q8_0, Q4_K, Q5_K). Q6_K's groups of 16 take twice the steps, each scaled on its own, and ran slower than
// the float32 micro-kernel (128 x 4096 x 4096, two threads: 17.3 against 15.7 ms), so it keeps that.
constexpr int64_t kAmxGroup = 32;

constexpr int64_t kAmxRows = 16;        // rows of every tile: weight rows of A and C, pairs of K of B
// Weight rows a thread decodes at a time (16 output tiles) and values of K per decoded chunk: a panel of 128
// KiB, and x's chunk for 128 rows of x 192 KiB, both read from L2 while the chunk is multiplied. With 64 weight
// rows, each of x's tiles served 4 output tiles and x came from L3 again for every panel (128 x 4096 x 4096 on
// Q4_K, two threads: 15.1 ms, no faster than the float32 micro-kernel).
constexpr int64_t kAmxTileRows = 256;
constexpr int64_t kAmxChunk = 256;
constexpr int kParts = 3;               // bfloat16 parts of each value of x

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// The tiles (see amx_row_tile for their use), each 16 rows of 64 bytes: output tiles 0, 1 and 7 (16 x 16
// float32), weight tiles 2 and 6 (16 rows of a group of 32 bfloat16), x's parts 3-5 (16 pairs of K by 16 rows
// of x).
inline TileConfig tile_config() {
  TileConfig c;
  for (int t = 0; t < 8; ++t) c.colsb[t] = 64, c.rows[t] = kAmxRows;
  return c;
}

// x [m, k] as tile operands: for row tile t (16 rows of x, the last padded with zero rows) and part s, the
// k / 2 rows of 16 dwords (pair p of each row of x: values 2p and 2p + 1 as bfloat16), and x's sums over each
// group of kAmxGroup values, 16 rows of x a vector.
struct AmxX {
  int64_t k, tiles;
  std::vector<uint32_t> pairs;   // [tiles][kParts][k / 2][16]
  std::vector<float> sums;       // [tiles][k / kAmxGroup][16]

  AmxX(const float* x, int64_t m, int64_t k_)
      : k(k_), tiles((m + kAmxRows - 1) / kAmxRows), pairs(static_cast<size_t>(tiles * kParts * (k_ / 2) * 16)),
        sums(static_cast<size_t>(tiles * (k_ / kAmxGroup) * 16)) {
    const int64_t spans = k / kAmxGroup;   // a group (16 pairs) at a time
    parallel_pieces(tiles * spans, 8, 64, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) split(x, m, i / spans, kAmxGroup * (i % spans));
    });
  }
  const uint32_t* part(int64_t t, int s, int64_t k0) const { return pairs.data() + ((t * kParts + s) * (k / 2) + k0 / 2) * 16; }
  const float* group_sums(int64_t t, int64_t k0) const { return sums.data() + (t * (k / kAmxGroup) + k0 / kAmxGroup) * 16; }

 private:
  // The group of values [k0, k0 + 32) of row tile t: each row's three parts packed as pairs, turned around so
  // that a vector holds one pair of all 16 rows; and the rows' sums over the group.
  void split(const float* x, int64_t m, int64_t t, int64_t k0) {
    __m512i rows[kParts][16];
    float* group_sum = sums.data() + (t * (k / kAmxGroup) + k0 / kAmxGroup) * 16;
    const __m512i top = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
    for (int r = 0; r < 16; ++r) {
      const int64_t row = t * kAmxRows + r;
      __m512 v[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
      if (row < m) v[0] = _mm512_loadu_ps(x + row * k + k0), v[1] = _mm512_loadu_ps(x + row * k + k0 + 16);
      __m512 part[kParts][2];
      for (int h = 0; h < 2; ++h) {
        const __m512 hi = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v[h]), top));
        const __m512 rest = _mm512_sub_ps(v[h], hi);   // exact: the low 16 significand bits
        const __m512 mid = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(rest), top));
        part[0][h] = hi, part[1][h] = mid, part[2][h] = _mm512_sub_ps(rest, mid);   // at most 8 bits: exact
      }
      for (int s = 0; s < kParts; ++s) rows[s][r] = (__m512i)_mm512_cvtne2ps_pbh(part[s][1], part[s][0]);
      group_sum[r] = _mm512_reduce_add_ps(_mm512_add_ps(v[0], v[1]));
    }
    for (int s = 0; s < kParts; ++s) {
      __m512i turned[16];
      transpose16(rows[s], turned);
      uint32_t* out = pairs.data() + ((t * kParts + s) * (k / 2) + k0 / 2) * 16;
      for (int p = 0; p < 16; ++p) _mm512_storeu_si512(out + 16 * p, turned[p]);
    }
  }
};

// One thread's decoded K-chunk of up to kAmxTileRows weight rows: codes - 2^(bits - 1) as bfloat16, and per
// row and group the scale and the offset that go with them. The codes lie tile by tile in the order the
// products take them, [group][output tile][16 rows][group values]: each weight tile is 16 * group contiguous
// values, and consecutive steps read consecutive tiles (laid out as rows of the chunk, with a row stride, a
// profile had half of the samples on the weight tiles' loads).
constexpr int64_t kAmxTiles = kAmxTileRows / kAmxRows;
struct AmxPanel {
  std::vector<uint16_t> codes;   // [kAmxChunk / group][kAmxTiles][16][group]
  std::vector<float> scale;      // [kAmxTileRows][kAmxChunk / group]
  std::vector<float> offset;
  bool offsets = false;          // whether any offset is not zero (the formats with a symmetric offset have none)
};

template <class F>
void decode_amx_panel(const uint8_t* w, int64_t ldw, int64_t count, int64_t width, AmxPanel& p) {
  constexpr int64_t G = kAmxGroup, groups = F::kBlock / G, kChunkGroups = kAmxChunk / G;
  constexpr int bias = 1 << (F::kCodeBits - 1);
  alignas(64) uint8_t codes[F::kBlock];
  float scale[groups], offset[groups];
  p.offsets = false;
  auto tile_values = [&](int64_t r, int64_t kk) {   // where value kk of row r goes
    return p.codes.data() + ((kk / G * kAmxTiles + r / kAmxRows) * kAmxRows + r % kAmxRows) * G + kk % G;
  };
  for (int64_t r = 0; r < (count + kAmxRows - 1) / kAmxRows * kAmxRows; ++r) {
    float* rs = p.scale.data() + r * kChunkGroups;
    float* ro = p.offset.data() + r * kChunkGroups;
    if (r >= count) {   // rows past the matrix: zero weights, whose outputs are never stored
      for (int64_t kk = 0; kk < width; kk += G) std::fill(tile_values(r, kk), tile_values(r, kk) + G, uint16_t{0});
      std::fill(rs, rs + width / G, 0.f);
      std::fill(ro, ro + width / G, 0.f);
      continue;
    }
    for (int64_t b = 0; b < width / F::kBlock; ++b) {
      F::codes(w + r * ldw + b * F::kBytes, codes, scale, offset);
      for (int64_t i = 0; i < F::kBlock; i += 32) {
        const __m512i low = _mm512_cvtepu8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(codes + i)));
        const __m512i high = _mm512_cvtepu8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(codes + i + 16)));
        const __m512i centre = _mm512_set1_epi32(bias);
        const __m512i v = (__m512i)_mm512_cvtne2ps_pbh(_mm512_cvtepi32_ps(_mm512_sub_epi32(high, centre)),
                                                       _mm512_cvtepi32_ps(_mm512_sub_epi32(low, centre)));
        const int64_t kk = b * F::kBlock + i;
        _mm512_storeu_si512(tile_values(r, kk), v);   // a group: one row of a weight tile
      }
      for (int64_t g = 0; g < groups; ++g) {
        rs[b * groups + g] = scale[g];
        ro[b * groups + g] = offset[g] + static_cast<float>(bias) * scale[g];
        p.offsets = p.offsets || ro[b * groups + g] != 0.f;
      }
    }
  }
}

// out[nt] (16 weight rows by the 16 rows of x of row tile t, float32) += output tile nt of the panel times x over
// the chunk's groups [0, groups), from K offset k0 of x, for output tiles nt < ntiles.
//
// Tile registers are not renamed: a tile load waits for the products still reading the register it fills, and
// the tile unit takes its instructions in order, so a load's latency stalls every product behind it. Hence
// the order: steps (group g, output tile nt) in turn, each step's weight tile loaded during the step before
// (two A registers taking turns), three output registers in rotation, and each step's float32 sums scaled
// into out (scale and offset per weight row, see the top of this file) only after the next step's products
// are issued, so that the vector work overlaps the tile unit's.
// Measured in a loop of steps alone (one thread, operands in L1): 20 ns a step without the scaling, 15 ns for
// its three products alone, 26 ns with each weight tile loaded just before its products. Software prefetches
// of the next weight tiles and x's next parts into L1 changed nothing (10.9 against 10.8 ms on the product
// measured at the top of this file).
inline void amx_row_tile(const AmxPanel& p, int64_t ntiles, const AmxX& x, int64_t t, int64_t k0, int64_t groups,
                         float* out, int64_t out_stride) {
  constexpr int64_t G = kAmxGroup, kChunkGroups = kAmxChunk / G, kTileValues = kAmxRows * G;
  constexpr int64_t lda = G * sizeof(uint16_t);
  alignas(64) float c[3][16 * 16];
  // A step's float32 sums (in c), waiting to be scaled into its output tile.
  struct Pending {
    const float* sums;
    float* out;
    const float* scale;    // its weight rows' scales, kChunkGroups apart
    const float* offset;   // likewise
    const float* xs;       // x's sums over the group, one row of x a lane
  };
  auto scale_into = [&](const Pending& q) {
    const __m512 xs = _mm512_loadu_ps(q.xs);
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) {
      __m512 acc = _mm512_fmadd_ps(_mm512_load_ps(q.sums + 16 * i), _mm512_set1_ps(q.scale[i * kChunkGroups]),
                                   _mm512_loadu_ps(q.out + 16 * i));
      if (p.offsets) acc = _mm512_fmadd_ps(_mm512_set1_ps(q.offset[i * kChunkGroups]), xs, acc);
      _mm512_storeu_ps(q.out + 16 * i, acc);
    }
  };
  // The tile intrinsics take tile numbers as literals, hence the macro: A (2 or 6) holds this step's weights,
  // the other A register is filled with the next step's, C (0, 1 or 7) takes the sums; x's parts are 3-5.
#define TCQ_AMX_STEP(A, NEXT_A, C, BUFFER)                    \
  do {                                                        \
    if (next != nullptr) _tile_loadd(NEXT_A, next, lda);      \
    _tile_zero(C);                                            \
    _tile_dpbf16ps(C, A, 5);                                  \
    _tile_dpbf16ps(C, A, 4);                                  \
    _tile_dpbf16ps(C, A, 3);                                  \
    _tile_stored(C, c[BUFFER], 64);                           \
    sums = c[BUFFER];                                         \
  } while (0)
  const uint16_t* a = p.codes.data();   // the weight tile of group g, output tile nt: a + (g * kAmxTiles + nt) * kTileValues
  _tile_loadd(2, a, lda);
  Pending pending{};
  int phase = 0;   // A alternates every step, C cycles through three: six phases
  for (int64_t g = 0; g < groups; ++g) {
    // x's three parts for this group (the smallest is multiplied first)
    _tile_loadd(5, x.part(t, 2, k0 + G * g), 64);
    _tile_loadd(4, x.part(t, 1, k0 + G * g), 64);
    _tile_loadd(3, x.part(t, 0, k0 + G * g), 64);
    const float* xs = x.group_sums(t, k0 + G * g);
    for (int64_t nt = 0; nt < ntiles; ++nt) {
      const uint16_t* next = nt + 1 < ntiles ? a + (g * kAmxTiles + nt + 1) * kTileValues
                             : g + 1 < groups ? a + (g + 1) * kAmxTiles * kTileValues
                                              : nullptr;
      const float* sums = nullptr;
      switch (phase) {
        case 0: TCQ_AMX_STEP(2, 6, 0, 0); break;
        case 1: TCQ_AMX_STEP(6, 2, 1, 1); break;
        case 2: TCQ_AMX_STEP(2, 6, 7, 2); break;
        case 3: TCQ_AMX_STEP(6, 2, 0, 0); break;
        case 4: TCQ_AMX_STEP(2, 6, 1, 1); break;
        default: TCQ_AMX_STEP(6, 2, 7, 2); break;
      }
      phase = phase == 5 ? 0 : phase + 1;
      if (pending.sums != nullptr) scale_into(pending);
      const int64_t row = nt * kAmxRows * kChunkGroups + g;
      pending = Pending{sums, out + nt * out_stride, p.scale.data() + row, p.offset.data() + row, xs};
    }
  }
  if (pending.sums != nullptr) scale_into(pending);
#undef TCQ_AMX_STEP
}

// The tiled product on tiles (see the top of this file): y [m, n] (row stride ldy) = x @ W.T for x [m, k].
template <class F>
void tiled_amx(const float* x, int64_t m, int64_t k, const uint8_t* w, int64_t ldw, int64_t n, float* yp,
               int64_t ldy) {
  static_assert(F::kGroup == kAmxGroup, "AMX tiles take groups of 32 codes");
  constexpr int64_t G = kAmxGroup;
  const AmxX xa(x, m, k);
  const int64_t chunk = std::min<int64_t>(kAmxChunk, k) / F::kBlock * F::kBlock;
  parallel_pieces(n, kAmxRows, 1, [&](int64_t n0, int64_t n1) {
    const TileConfig config = tile_config();
    _tile_loadconfig(&config);
    // Kept between calls (a fresh buffer is a fresh mapping, its pages faulted in again); referred to by
    // reference below, so that the loops do not look the thread's copy up again and again.
    static thread_local AmxPanel panel;
    // Each output tile's 16 x 16 sums lie together, not in rows of all of x's rows (gemm.h's layout, which
    // store_transposed turns around): with the tile's rows a row of x apart, the product measured at the top of
    // this file took 13.8-15.0 ms against 10.4-11.5.
    static thread_local std::vector<float> out;   // [16 output tiles][row tiles][16 weight rows][16 rows of x]
    AmxPanel& p = panel;
    std::vector<float>& o = out;
    p.codes.resize(kAmxTileRows * kAmxChunk);
    p.scale.resize(kAmxTileRows * kAmxChunk / G);
    p.offset.resize(kAmxTileRows * kAmxChunk / G);
    o.resize(std::max<size_t>(o.size(), static_cast<size_t>(kAmxTileRows / kAmxRows * xa.tiles * 256)));
    for (int64_t first = n0; first < n1; first += kAmxTileRows) {
      const int64_t count = std::min(kAmxTileRows, n1 - first), ntiles = (count + kAmxRows - 1) / kAmxRows;
      for (int64_t k0 = 0; k0 < k; k0 += chunk) {
        const int64_t width = std::min(chunk, k - k0);
        const uint8_t* block = w + first * ldw + k0 / F::kBlock * F::kBytes;
        if (k0 + width < k) {   // the next chunk's bytes, asked for while this one is multiplied
          prefetch_rows(block + width / F::kBlock * F::kBytes, count,
                        std::min(chunk, k - k0 - width) / F::kBlock * F::kBytes, ldw);
        }
        decode_amx_panel<F>(block, ldw, count, width, p);
        if (k0 == 0) std::fill(o.begin(), o.begin() + ntiles * xa.tiles * 256, 0.f);
        for (int64_t t = 0; t < xa.tiles; ++t) {
          amx_row_tile(p, ntiles, xa, t, k0, width / G, o.data() + t * 256, xa.tiles * 256);
        }
      }
      // Output tiles turned around into y: row j of x, weight rows first + 16 nt + i.
      for (int64_t nt = 0; nt < ntiles; ++nt) {
        const int64_t cols = std::min<int64_t>(16, count - 16 * nt);
        const __mmask16 keep = static_cast<__mmask16>((1u << cols) - 1);
        for (int64_t t = 0; t < xa.tiles; ++t) {
          __m512i tile[16], turned[16];
          const float* tile_out = o.data() + (nt * xa.tiles + t) * 256;
          for (int i = 0; i < 16; ++i) tile[i] = _mm512_castps_si512(_mm512_loadu_ps(tile_out + 16 * i));
          transpose16(tile, turned);
          for (int64_t j = 0; j < std::min<int64_t>(16, m - 16 * t); ++j) {
            _mm512_mask_storeu_ps(yp + (16 * t + j) * ldy + first + 16 * nt, keep, _mm512_castsi512_ps(turned[j]));
          }
        }
      }
    }
    _tile_release();
  });
}

}  // namespace tcq
#endif
