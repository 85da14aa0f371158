// Attention over the paged KV cache, as llama_step.h calls it: decode attention (each request's query heads,
// one row a request, against its keys and values) and prompt attention (the rows of one request's prompt
// chunk, causal). Needs only the vector helpers of quant/common.h, so that a standalone program can time it.
#pragma once

#include "quant/common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace attention {

// Attention over a request's keys is split into chunks of kKeyChunk keys: a fixed number, so that a request's
// result does not depend on which other requests share the step or on the thread count. A work item is one
// chunk for a range of KV heads (ranges only split the heads, which are independent, to give every thread
// work when few requests attend). An item leaves, for every query head of its range, the running softmax
// state of its chunk: the largest score m, the sum l of exp(score - m), and o = the sum of exp(score - m) *
// value. A request's chunks are then merged in order (merge_chunks). Within an item, keys are read
// kKeyTile slots at a time, those slots' keys and values of the item's KV heads being few contiguous runs of
// the cache. Where a KV head serves several query heads and the cache holds 16-bit values, its tile is widened
// to float32 once for the whole group; otherwise the products read the cache as it is.
constexpr int64_t kKeyChunk = 64;
constexpr int64_t kKeyTile = 16;
// exp(score - m) below this is stored as 0: its share of the sum is below float32's resolution by 20 orders of
// magnitude, and the subnormal products it would make cost a microcode assist each on x86.
constexpr float kNegligible = 1e-30f;

// p[t] = exp(scores[t] - top) for t < kKeyTile (scores past the tile's keys hold -inf), the negligible ones 0;
// returns their sum.
inline float tile_weights(const float* scores, float top, float* p) {
  float sum = 0.f;
#ifdef TCQ_VECTOR
  static_assert(kKeyTile % tcq::kLanes == 0, "a tile is whole vectors");
  const tcq::Vec shift = tcq::vec_set1(top), floor = tcq::vec_set1(kNegligible);
  tcq::Vec total = tcq::vec_zero();
  for (int64_t t = 0; t < kKeyTile; t += tcq::kLanes) {
    const tcq::Vec w = tcq::vec_zero_below(tcq::vec_exp_nonpositive(tcq::vec_sub(tcq::vec_load(scores + t), shift)), floor);
    total = tcq::vec_add(total, w);
    tcq::vec_store(p + t, w);
  }
  return tcq::vec_sum(total);
#else
  for (int64_t t = 0; t < kKeyTile; ++t) {
    const float e = std::exp(scores[t] - top);
    p[t] = e < kNegligible ? 0.f : e;
    sum += p[t];
  }
  return sum;
#endif
}

// dst[t * dim + d] = float(src of slot t, offset `offset`), for `count` slots.
template <class T>
inline void widen_tile(const T* cache, const int64_t* slots, int64_t count, int64_t slot_stride, int64_t offset,
                       int64_t dim, float* dst) {
  for (int64_t t = 0; t < count; ++t) {
    const T* src = cache + slots[t] * slot_stride + offset;
    float* out = dst + t * dim;
    int64_t d = 0;
#ifdef TCQ_VECTOR
    for (; d + tcq::kLanes <= dim; d += tcq::kLanes) tcq::vec_store(out + d, tcq::vec_load(src + d));
#endif
    for (; d < dim; ++d) out[d] = static_cast<float>(src[d]);
  }
}

// Asks for the cache lines of `count` slots' keys and values (`run` elements from each offset), which are read
// a tile later: each step reads the whole of a request's cache, which is far larger than the CPU's caches.
template <class T>
inline void prefetch_tile(const T* cache, const int64_t* slots, int64_t count, int64_t slot_stride,
                          int64_t key_offset, int64_t value_offset, int64_t run) {
  const int64_t bytes = run * static_cast<int64_t>(sizeof(T));
  for (int64_t t = 0; t < count; ++t) {
    const char* key = reinterpret_cast<const char*>(cache + slots[t] * slot_stride + key_offset);
    const char* value = reinterpret_cast<const char*>(cache + slots[t] * slot_stride + value_offset);
    for (int64_t b = 0; b < bytes; b += 64) {
      __builtin_prefetch(key + b);
      __builtin_prefetch(value + b);
    }
  }
}

// scores[t] = scale * q . keys[t] for t < count (keys[t]: a row of dim elements, float32 or 16-bit).
template <class T>
inline void tile_scores(const float* q, const T* const* keys, int64_t count, int64_t dim, float scale, float* scores) {
  int64_t t = 0;
#ifdef TCQ_VECTOR
  if (dim % tcq::kLanes == 0) {
#if defined(TCQ_AVX2)
    for (; t + 8 <= count; t += 8) {   // eight keys at once, their sums reduced together
      const T* const* k = keys + t;
      __m256 a[8];
      for (auto& v : a) v = _mm256_setzero_ps();
      for (int64_t d = 0; d < dim; d += 8) {
        const __m256 qv = _mm256_loadu_ps(q + d);
        for (int i = 0; i < 8; ++i) a[i] = _mm256_fmadd_ps(qv, tcq::vec_load(k[i] + d), a[i]);
      }
      const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
      const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
      const __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20),
                                        _mm256_permute2f128_ps(s0123, s4567, 0x31));
      _mm256_storeu_ps(scores + t, _mm256_mul_ps(sums, _mm256_set1_ps(scale)));
    }
#endif
    for (; t + 4 <= count; t += 4) {   // four keys at once: four independent sums
      const T *k0 = keys[t], *k1 = keys[t + 1], *k2 = keys[t + 2], *k3 = keys[t + 3];
      tcq::Vec a0 = tcq::vec_zero(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t d = 0; d < dim; d += tcq::kLanes) {
        const tcq::Vec qv = tcq::vec_load(q + d);
        a0 = tcq::vec_fmadd(qv, tcq::vec_load(k0 + d), a0);
        a1 = tcq::vec_fmadd(qv, tcq::vec_load(k1 + d), a1);
        a2 = tcq::vec_fmadd(qv, tcq::vec_load(k2 + d), a2);
        a3 = tcq::vec_fmadd(qv, tcq::vec_load(k3 + d), a3);
      }
      scores[t] = tcq::vec_sum(a0) * scale;
      scores[t + 1] = tcq::vec_sum(a1) * scale;
      scores[t + 2] = tcq::vec_sum(a2) * scale;
      scores[t + 3] = tcq::vec_sum(a3) * scale;
    }
  }
#endif
  for (; t < count; ++t) {
    const T* k = keys[t];
    float dot = 0.f;
    for (int64_t d = 0; d < dim; ++d) dot += q[d] * static_cast<float>(k[d]);
    scores[t] = dot * scale;
  }
}

// o[0..dim) = o * rescale + sum over t of p[t] * values[t] (values[t]: a row of dim elements).
template <class T>
inline void tile_values(const float* p, const T* const* values, int64_t count, int64_t dim, float rescale, float* o) {
  int64_t d = 0;
#ifdef TCQ_VECTOR
  constexpr int64_t kBlock = 4 * tcq::kLanes;   // four vectors of o stay in registers over the tile
  const tcq::Vec r = tcq::vec_set1(rescale);
  for (; d + kBlock <= dim; d += kBlock) {
    tcq::Vec a0 = tcq::vec_mul(tcq::vec_load(o + d), r);
    tcq::Vec a1 = tcq::vec_mul(tcq::vec_load(o + d + tcq::kLanes), r);
    tcq::Vec a2 = tcq::vec_mul(tcq::vec_load(o + d + 2 * tcq::kLanes), r);
    tcq::Vec a3 = tcq::vec_mul(tcq::vec_load(o + d + 3 * tcq::kLanes), r);
    for (int64_t t = 0; t < count; ++t) {
      const tcq::Vec pt = tcq::vec_set1(p[t]);
      const T* v = values[t] + d;
      a0 = tcq::vec_fmadd(pt, tcq::vec_load(v), a0);
      a1 = tcq::vec_fmadd(pt, tcq::vec_load(v + tcq::kLanes), a1);
      a2 = tcq::vec_fmadd(pt, tcq::vec_load(v + 2 * tcq::kLanes), a2);
      a3 = tcq::vec_fmadd(pt, tcq::vec_load(v + 3 * tcq::kLanes), a3);
    }
    tcq::vec_store(o + d, a0);
    tcq::vec_store(o + d + tcq::kLanes, a1);
    tcq::vec_store(o + d + 2 * tcq::kLanes, a2);
    tcq::vec_store(o + d + 3 * tcq::kLanes, a3);
  }
  for (; d + tcq::kLanes <= dim; d += tcq::kLanes) {
    tcq::Vec a = tcq::vec_mul(tcq::vec_load(o + d), r);
    for (int64_t t = 0; t < count; ++t) a = tcq::vec_fmadd(tcq::vec_set1(p[t]), tcq::vec_load(values[t] + d), a);
    tcq::vec_store(o + d, a);
  }
#endif
  for (; d < dim; ++d) {
    float a = o[d] * rescale;
    for (int64_t t = 0; t < count; ++t) a += p[t] * static_cast<float>(values[t][d]);
    o[d] = a;
  }
}

// One query head's chunk state st (m, l, then o) brought up to date with `count` keys and values.
template <class T>
inline void attend_tile(const float* q, const T* const* keys, const T* const* values, int64_t count, int64_t dim,
                        float scale, float* p, float* st) {
  float scores[kKeyTile];
  tile_scores(q, keys, count, dim, scale, scores);
  std::fill(scores + count, scores + kKeyTile, -INFINITY);   // a short last tile's other places: weight 0
  float top = st[0];
  for (int64_t t = 0; t < count; ++t) top = std::max(top, scores[t]);
  const float rescale = st[0] == -INFINITY ? 0.f : std::exp(st[0] - top);
  const float sum = tile_weights(scores, top, p);
  st[0] = top;
  st[1] = st[1] * rescale + sum;
  tile_values(p, values, count, dim, rescale, st + 2);
}

// One work item: KV heads [kv0, kv1) of one request over the keys in slots[0..count). q is the request's query
// row (all heads, dim floats each, a KV head's group of query heads consecutive); state[h * (dim + 2) ..] is
// query head h's chunk state: m, l, then o. tile holds kKeyTile * (2 * dim + 1) floats.
template <class T>
void attend_chunk(const float* q, const T* cache, const int64_t* slots, int64_t count, int64_t kv0, int64_t kv1,
                  int64_t group, int64_t kv_heads, int64_t dim, float scale, float* tile, float* state) {
  const int64_t slot_stride = 2 * kv_heads * dim;
  const int64_t stride = dim + 2;
  for (int64_t h = kv0 * group; h < kv1 * group; ++h) {
    state[h * stride] = -INFINITY;
    state[h * stride + 1] = 0.f;
    std::fill(state + h * stride + 2, state + (h + 1) * stride, 0.f);
  }
  float* wide_keys = tile;
  float* wide_values = tile + kKeyTile * dim;
  float* p = wide_values + kKeyTile * dim;
  // Widening pays only when a group of query heads reads the float32 tile again.
  const bool widen = group > 1 && !std::is_same_v<T, float>;
  const float* wide_key_rows[kKeyTile];
  const float* wide_value_rows[kKeyTile];
  for (int64_t t = 0; t < kKeyTile; ++t) {
    wide_key_rows[t] = wide_keys + t * dim;
    wide_value_rows[t] = wide_values + t * dim;
  }
  const T* key_rows[kKeyTile];
  const T* value_rows[kKeyTile];
  const int64_t key_offset = kv0 * dim, value_offset = (kv_heads + kv0) * dim, run = (kv1 - kv0) * dim;
  prefetch_tile(cache, slots, std::min(kKeyTile, count), slot_stride, key_offset, value_offset, run);
  for (int64_t t0 = 0; t0 < count; t0 += kKeyTile) {
    const int64_t c = std::min(kKeyTile, count - t0);
    if (t0 + kKeyTile < count)
      prefetch_tile(cache, slots + t0 + kKeyTile, std::min(kKeyTile, count - t0 - kKeyTile), slot_stride, key_offset,
                    value_offset, run);
    for (int64_t kv = kv0; kv < kv1; ++kv) {
      if (widen) {
        widen_tile(cache, slots + t0, c, slot_stride, kv * dim, dim, wide_keys);
        widen_tile(cache, slots + t0, c, slot_stride, (kv_heads + kv) * dim, dim, wide_values);
        for (int64_t h = kv * group; h < (kv + 1) * group; ++h)
          attend_tile(q + h * dim, wide_key_rows, wide_value_rows, c, dim, scale, p, state + h * stride);
      } else {
        for (int64_t t = 0; t < c; ++t) {
          key_rows[t] = cache + slots[t0 + t] * slot_stride + kv * dim;
          value_rows[t] = cache + slots[t0 + t] * slot_stride + (kv_heads + kv) * dim;
        }
        for (int64_t h = kv * group; h < (kv + 1) * group; ++h)
          attend_tile(q + h * dim, key_rows, value_rows, c, dim, scale, p, state + h * stride);
      }
    }
  }
}

// out[0..dim) = the softmax-weighted values of one query head from its chunks' states (chunk c's m, l, o at
// state + c * stride), merged in chunk order.
inline void merge_chunks(const float* state, int64_t chunks, int64_t stride, int64_t dim, float* out) {
  float top = -INFINITY;
  for (int64_t c = 0; c < chunks; ++c) top = std::max(top, state[c * stride]);
  float total = 0.f;
  std::fill(out, out + dim, 0.f);
  for (int64_t c = 0; c < chunks; ++c) {
    const float w = std::exp(state[c * stride] - top);
    total += state[c * stride + 1] * w;
    const float* oc = state + c * stride + 2;
    for (int64_t d = 0; d < dim; ++d) out[d] += oc[d] * w;
  }
  const float inv = 1.f / total;
  for (int64_t d = 0; d < dim; ++d) out[d] *= inv;
}

// Prompt attention. A work item is one KV head and a block of kPromptRows query rows of the chunk, all its
// query heads with them: each tile of kKeyTile keys is widened to float32 once per item, its keys transposed
// (a vector holds one dimension of kLanes keys), and the item's query vectors take their scores four at a
// time as broadcast multiply-adds against it, with no horizontal sums. Each query vector keeps one running
// softmax state (m, l, o) over all its keys, so nothing is merged afterwards. Against gathering the request's
// blocks, widening them and calling torch's flash attention, float16 cache, two threads: 9.3 against 10.7 ms
// for 256 queries after 256 keys and 3.2 against 4.4 for 256 on 256 (32 heads of 64, SmolLM2-1.7B's); 2.2
// against 2.2 and 0.23 against 0.42 (128 on 130) with 9 query heads on 3 (SmolLM2-135M's).
constexpr int64_t kPromptRows = 64;

// s[i][t] = q_i . key t of the tile for the nq (<= 4) query vectors qs, from the transposed tile kt
// ([dim][kKeyTile]); unscaled.
inline void prompt_scores(const float* const* qs, int nq, const float* kt, int64_t dim, float (*s)[kKeyTile]) {
#ifdef TCQ_VECTOR
  constexpr int64_t kVecs = kKeyTile / tcq::kLanes;
  tcq::Vec acc[4][kVecs];
  for (auto& row : acc)
    for (auto& v : row) v = tcq::vec_zero();
  for (int64_t d = 0; d < dim; ++d) {
    for (int64_t j = 0; j < kVecs; ++j) {
      const tcq::Vec k = tcq::vec_load(kt + d * kKeyTile + j * tcq::kLanes);
      for (int i = 0; i < 4; ++i)
        if (i < nq) acc[i][j] = tcq::vec_fmadd(tcq::vec_set1(qs[i][d]), k, acc[i][j]);
    }
  }
  for (int i = 0; i < nq; ++i)
    for (int64_t j = 0; j < kVecs; ++j) tcq::vec_store(s[i] + j * tcq::kLanes, acc[i][j]);
#else
  for (int i = 0; i < nq; ++i) {
    for (int64_t t = 0; t < kKeyTile; ++t) s[i][t] = 0.f;
    for (int64_t d = 0; d < dim; ++d)
      for (int64_t t = 0; t < kKeyTile; ++t) s[i][t] += qs[i][d] * kt[d * kKeyTile + t];
  }
#endif
}

// kt[d * kKeyTile + j] = keys[j * dim + d]: the tile's keys, one dimension of all of them a row.
inline void transpose_tile(const float* keys, int64_t dim, float* kt) {
#if defined(TCQ_AVX512)
  static_assert(kKeyTile == 16, "a transposed row is one vector");
  const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(static_cast<int>(dim)));
  for (int64_t d = 0; d < dim; ++d) _mm512_storeu_ps(kt + d * kKeyTile, _mm512_i32gather_ps(rows, keys + d, 4));
#elif defined(TCQ_AVX2)
  static_assert(kKeyTile == 16, "a transposed row is two vectors");
  const __m256i rows = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(static_cast<int>(dim)));
  for (int64_t d = 0; d < dim; ++d) {
    _mm256_storeu_ps(kt + d * kKeyTile, _mm256_i32gather_ps(keys + d, rows, 4));
    _mm256_storeu_ps(kt + d * kKeyTile + 8, _mm256_i32gather_ps(keys + 8 * dim + d, rows, 4));
  }
#else
  for (int64_t j = 0; j < kKeyTile; ++j)
    for (int64_t d = 0; d < dim; ++d) kt[d * kKeyTile + j] = keys[j * dim + d];
#endif
}

// s[j] = s[j] * scale for lo <= j < hi, -inf elsewhere; returns the largest (lo < hi).
inline float scale_and_mask(float* s, float scale, int64_t lo, int64_t hi) {
#if defined(TCQ_AVX512)
  const __mmask16 seen = static_cast<__mmask16>(((1u << hi) - 1) & ~((1u << lo) - 1));
  const __m512 v = _mm512_mask_mul_ps(_mm512_set1_ps(-INFINITY), seen, _mm512_loadu_ps(s), _mm512_set1_ps(scale));
  _mm512_storeu_ps(s, v);
  return _mm512_reduce_max_ps(v);
#elif defined(TCQ_AVX2)
  const __m256 low = _mm256_set1_ps(static_cast<float>(lo) - 0.5f), high = _mm256_set1_ps(static_cast<float>(hi) - 0.5f);
  __m256 top = _mm256_set1_ps(-INFINITY);
  for (int half = 0; half < 2; ++half) {
    const __m256 j = _mm256_setr_ps(8 * half + 0.f, 8 * half + 1.f, 8 * half + 2.f, 8 * half + 3.f, 8 * half + 4.f,
                                    8 * half + 5.f, 8 * half + 6.f, 8 * half + 7.f);
    const __m256 seen = _mm256_and_ps(_mm256_cmp_ps(j, low, _CMP_GT_OQ), _mm256_cmp_ps(j, high, _CMP_LT_OQ));
    const __m256 v = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY),
                                      _mm256_mul_ps(_mm256_loadu_ps(s + 8 * half), _mm256_set1_ps(scale)), seen);
    _mm256_storeu_ps(s + 8 * half, v);
    top = _mm256_max_ps(top, v);
  }
  const __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
  const __m128 m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  return _mm_cvtss_f32(_mm_max_ss(m2, _mm_shuffle_ps(m2, m2, 1)));
#else
  float top = -INFINITY;
  for (int64_t j = 0; j < kKeyTile; ++j) {
    s[j] = j >= lo && j < hi ? s[j] * scale : -INFINITY;
    top = std::max(top, s[j]);
  }
  return top;
#endif
}

// o_i = o_i * rescale[i] + sum over t < count of p[i][t] * values[t], for the nq (<= 4) consecutive output rows
// at o (dim floats each): each value vector is loaded once for all of them.
inline void prompt_values(const float (*p)[kKeyTile], const float* rescale, int nq, const float* const* values,
                          int64_t count, int64_t dim, float* o) {
  int64_t d = 0;
#ifdef TCQ_VECTOR
  for (; d + tcq::kLanes <= dim; d += tcq::kLanes) {
    tcq::Vec acc[4];
    for (int i = 0; i < nq; ++i) acc[i] = tcq::vec_mul(tcq::vec_load(o + i * dim + d), tcq::vec_set1(rescale[i]));
    for (int64_t t = 0; t < count; ++t) {
      const tcq::Vec v = tcq::vec_load(values[t] + d);
      for (int i = 0; i < 4; ++i)
        if (i < nq) acc[i] = tcq::vec_fmadd(tcq::vec_set1(p[i][t]), v, acc[i]);
    }
    for (int i = 0; i < nq; ++i) tcq::vec_store(o + i * dim + d, acc[i]);
  }
#endif
  for (; d < dim; ++d) {
    for (int i = 0; i < nq; ++i) {
      float acc = o[i * dim + d] * rescale[i];
      for (int64_t t = 0; t < count; ++t) acc += p[i][t] * values[t][d];
      o[i * dim + d] = acc;
    }
  }
}

// The rows of one request's prompt chunk against its keys: q [t, heads, dim] float32 (rows ldq floats apart)
// holds the queries of positions num_keys - t .. num_keys - 1, the cache [blocks, block_size, 2, kv_heads, dim]
// the keys and values of positions 0 .. num_keys - 1 (those of the chunk already written) in the blocks
// `blocks` lists in order.
// A query at position p sees keys p - window < k <= p (window 0: every k <= p). out [t, heads, dim].
// `parallel(items, fn)` runs fn(begin, end) over [0, items) on the caller's threads.
template <class T, class Parallel>
void prompt_attention(const float* q, int64_t ldq, int64_t t, const T* cache, int64_t block_size, const int64_t* blocks,
                      int64_t num_keys, int64_t heads, int64_t kv_heads, int64_t dim, int64_t window, float scale,
                      float* out, Parallel&& parallel) {
  const int64_t group = heads / kv_heads, slot_stride = 2 * kv_heads * dim, first_q = num_keys - t;
  // Blocks of fewer rows where whole ones would give the threads few items (a small model's few KV heads); the
  // blocks of the chunk's last rows, which see the most keys, are handed out first.
  int64_t rows = kPromptRows;
  while (rows > 16 && kv_heads * ((t + rows - 1) / rows) < 32) rows /= 2;
  const int64_t row_blocks = (t + rows - 1) / rows;
  parallel(kv_heads * row_blocks, [&](int64_t begin, int64_t end) {
    // Kept between calls: no allocation a step.
    static thread_local std::vector<float> scratch;
    const int64_t vectors = kPromptRows * group;
    scratch.resize(std::max<size_t>(scratch.size(), static_cast<size_t>(3 * kKeyTile * dim + vectors * (dim + 2))));
    float* wide_keys = scratch.data();
    float* wide_values = wide_keys + kKeyTile * dim;
    float* kt = wide_values + kKeyTile * dim;
    float* m = kt + kKeyTile * dim;
    float* l = m + vectors;
    float* o = l + vectors;
    const float* value_rows[kKeyTile];
    for (int64_t j = 0; j < kKeyTile; ++j) value_rows[j] = wide_values + j * dim;
    alignas(64) float s[4][kKeyTile];
    alignas(64) float p[4][kKeyTile];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t kv = item % kv_heads, r0 = (row_blocks - 1 - item / kv_heads) * rows, r1 = std::min(t, r0 + rows);
      const int64_t count = (r1 - r0) * group;   // query vectors: row-major over (row, head of the group)
      std::fill(m, m + count, -INFINITY);
      std::fill(l, l + count, 0.f);
      std::fill(o, o + count * dim, 0.f);
      const int64_t last_key = first_q + r1 - 1;
      const int64_t first_key = window > 0 ? std::max<int64_t>(0, first_q + r0 - window + 1) : 0;
      for (int64_t k0 = first_key; k0 <= last_key; k0 += kKeyTile) {
        const int64_t c = std::min(kKeyTile, last_key + 1 - k0);
        for (int64_t j = 0; j < kKeyTile; ++j) {
          float* key = wide_keys + j * dim;
          float* value = wide_values + j * dim;
          if (j >= c) {   // past the keys: zero, and masked below
            std::fill(key, key + dim, 0.f);
            std::fill(value, value + dim, 0.f);
            continue;
          }
          const int64_t pos = k0 + j, slot = blocks[pos / block_size] * block_size + pos % block_size;
          widen_tile(cache, &slot, 1, slot_stride, kv * dim, dim, key);
          widen_tile(cache, &slot, 1, slot_stride, (kv_heads + kv) * dim, dim, value);
        }
        transpose_tile(wide_keys, dim, kt);
        for (int64_t a = 0; a < count; a += 4) {
          const int nq = static_cast<int>(std::min<int64_t>(4, count - a));
          const float* qs[4];
          for (int i = 0; i < nq; ++i) {
            const int64_t v = a + i, row = r0 + v / group;
            qs[i] = q + row * ldq + (kv * group + v % group) * dim;
          }
          prompt_scores(qs, nq, kt, dim, s);
          float rescale[4];
          int64_t keys = 0;   // the most keys any of the nq sees: the values' loop bound
          for (int i = 0; i < nq; ++i) {
            const int64_t v = a + i, pos = first_q + r0 + v / group;
            // The tile's keys this query sees: [lo, hi); a query that sees none keeps its state (weights 0).
            const int64_t hi = std::min(c, pos - k0 + 1);
            const int64_t lo = window > 0 ? std::max<int64_t>(0, pos - window + 1 - k0) : 0;
            if (hi <= lo) {
              rescale[i] = 1.f;
              std::fill(p[i], p[i] + kKeyTile, 0.f);
              continue;
            }
            keys = std::max(keys, hi);
            const float top = std::max(m[v], scale_and_mask(s[i], scale, lo, hi));
            rescale[i] = m[v] == -INFINITY ? 0.f : std::exp(m[v] - top);
            l[v] = l[v] * rescale[i] + tile_weights(s[i], top, p[i]);
            m[v] = top;
          }
          if (keys > 0) prompt_values(p, rescale, nq, value_rows, keys, dim, o + a * dim);
        }
      }
      for (int64_t v = 0; v < count; ++v) {
        const int64_t row = r0 + v / group;
        float* dst = out + (row * heads + kv * group + v % group) * dim;
        const float inv = 1.f / l[v];
        for (int64_t d = 0; d < dim; ++d) dst[d] = o[v * dim + d] * inv;
      }
    }
  });
}

}  // namespace attention
