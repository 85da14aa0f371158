// Decode attention: each request's query heads (one row a request) against its keys and values in the
// paged KV cache, as decode.cpp's layers call it. Needs only the vector helpers of quant/common.h, so that a
// standalone program can time it.
#pragma once

#include "quant/common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

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

}  // namespace attention
