// Decode attention: each request's query heads (one row a request) against its keys and values in the
// paged KV cache, as decode.cpp's layers call it. Needs only the vector helpers of quant/common.h, so that a
// standalone program can time it.
#pragma once

#include "quant/common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace attention {

// Attention over a request's keys is split into chunks of kKeyChunk keys: a fixed number, so that a request's
// result does not depend on which other requests share the step or on the thread count. A work item is one
// chunk for a range of KV heads (ranges only split the heads, which are independent, to give every thread
// work when few requests attend). An item leaves, for every query head of its range, the running softmax
// state of its chunk: the largest score m, the sum l of exp(score - m), and o = the sum of exp(score - m) *
// value. A request's chunks are then merged in order (merge_chunks). Within an item, keys are read
// kKeyTile slots at a time: those slots' keys and values of the item's KV heads are few contiguous runs of
// the cache, read in order, and each KV head's are widened to float32 once into a tile that all the query
// heads of its group then read.
constexpr int64_t kKeyChunk = 64;
constexpr int64_t kKeyTile = 16;
// exp(score - m) below this is stored as 0: its share of the sum is below float32's resolution by 20 orders of
// magnitude, and the subnormal products it would make cost a microcode assist each on x86.
constexpr float kNegligible = 1e-30f;

// exp(x) for x <= 0, in lanes: x = n ln 2 + r with |r| <= ln 2 / 2, exp(r) by a degree-7 polynomial (the
// coefficients of Cephes' expf), times 2^n made in the exponent bits. x is clamped at -87, where exp is still
// a normal float: the weights that small are dropped anyway (kNegligible). Within 2 ulp of std::exp.
#ifdef TCQ_VECTOR
inline tcq::Vec exp_nonpositive(tcq::Vec x) {
  using namespace tcq;
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

// p[t] = exp(scores[t] - top) for t < kKeyTile (scores past the tile's keys hold -inf), the negligible ones 0;
// returns their sum.
inline float tile_weights(const float* scores, float top, float* p) {
  float sum = 0.f;
#ifdef TCQ_VECTOR
  static_assert(kKeyTile % tcq::kLanes == 0, "a tile is whole vectors");
  const tcq::Vec shift = tcq::vec_set1(top), floor = tcq::vec_set1(kNegligible);
  tcq::Vec total = tcq::vec_zero();
  for (int64_t t = 0; t < kKeyTile; t += tcq::kLanes) {
    const tcq::Vec w = tcq::vec_zero_below(exp_nonpositive(tcq::vec_sub(tcq::vec_load(scores + t), shift)), floor);
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

// scores[t] = scale * q . keys[t] for t < count (keys: count rows of dim floats).
inline void tile_scores(const float* q, const float* keys, int64_t count, int64_t dim, float scale, float* scores) {
  int64_t t = 0;
#ifdef TCQ_VECTOR
  if (dim % tcq::kLanes == 0) {
#if defined(TCQ_AVX2)
    for (; t + 8 <= count; t += 8) {   // eight keys at once, their sums reduced together
      const float* k = keys + t * dim;
      __m256 a[8];
      for (auto& v : a) v = _mm256_setzero_ps();
      for (int64_t d = 0; d < dim; d += 8) {
        const __m256 qv = _mm256_loadu_ps(q + d);
        for (int i = 0; i < 8; ++i) a[i] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + i * dim + d), a[i]);
      }
      const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
      const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
      const __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20),
                                        _mm256_permute2f128_ps(s0123, s4567, 0x31));
      _mm256_storeu_ps(scores + t, _mm256_mul_ps(sums, _mm256_set1_ps(scale)));
    }
#endif
    for (; t + 4 <= count; t += 4) {   // four keys at once: four independent sums
      const float* k = keys + t * dim;
      tcq::Vec a0 = tcq::vec_zero(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t d = 0; d < dim; d += tcq::kLanes) {
        const tcq::Vec qv = tcq::vec_load(q + d);
        a0 = tcq::vec_fmadd(qv, tcq::vec_load(k + d), a0);
        a1 = tcq::vec_fmadd(qv, tcq::vec_load(k + dim + d), a1);
        a2 = tcq::vec_fmadd(qv, tcq::vec_load(k + 2 * dim + d), a2);
        a3 = tcq::vec_fmadd(qv, tcq::vec_load(k + 3 * dim + d), a3);
      }
      scores[t] = tcq::vec_sum(a0) * scale;
      scores[t + 1] = tcq::vec_sum(a1) * scale;
      scores[t + 2] = tcq::vec_sum(a2) * scale;
      scores[t + 3] = tcq::vec_sum(a3) * scale;
    }
  }
#endif
  for (; t < count; ++t) {
    const float* k = keys + t * dim;
    float dot = 0.f;
    for (int64_t d = 0; d < dim; ++d) dot += q[d] * k[d];
    scores[t] = dot * scale;
  }
}

// o[0..dim) = o * rescale + sum over t of p[t] * values[t].
inline void tile_values(const float* p, const float* values, int64_t count, int64_t dim, float rescale, float* o) {
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
      const float* v = values + t * dim + d;
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
    for (int64_t t = 0; t < count; ++t) a = tcq::vec_fmadd(tcq::vec_set1(p[t]), tcq::vec_load(values + t * dim + d), a);
    tcq::vec_store(o + d, a);
  }
#endif
  for (; d < dim; ++d) {
    float a = o[d] * rescale;
    for (int64_t t = 0; t < count; ++t) a += p[t] * values[t * dim + d];
    o[d] = a;
  }
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
  float* keys = tile;
  float* values = tile + kKeyTile * dim;
  float* p = values + kKeyTile * dim;
  float scores[kKeyTile];
  const int64_t key_offset = kv0 * dim, value_offset = (kv_heads + kv0) * dim, run = (kv1 - kv0) * dim;
  prefetch_tile(cache, slots, std::min(kKeyTile, count), slot_stride, key_offset, value_offset, run);
  for (int64_t t0 = 0; t0 < count; t0 += kKeyTile) {
    const int64_t c = std::min(kKeyTile, count - t0);
    if (t0 + kKeyTile < count)
      prefetch_tile(cache, slots + t0 + kKeyTile, std::min(kKeyTile, count - t0 - kKeyTile), slot_stride, key_offset,
                    value_offset, run);
    for (int64_t kv = kv0; kv < kv1; ++kv) {
      widen_tile(cache, slots + t0, c, slot_stride, kv * dim, dim, keys);
      widen_tile(cache, slots + t0, c, slot_stride, (kv_heads + kv) * dim, dim, values);
      for (int64_t h = kv * group; h < (kv + 1) * group; ++h) {
        float* st = state + h * stride;
        tile_scores(q + h * dim, keys, c, dim, scale, scores);
        std::fill(scores + c, scores + kKeyTile, -INFINITY);   // a short last tile's other places: weight 0
        float top = st[0];
        for (int64_t t = 0; t < c; ++t) top = std::max(top, scores[t]);
        const float rescale = st[0] == -INFINITY ? 0.f : std::exp(st[0] - top);
        const float sum = tile_weights(scores, top, p);
        st[0] = top;
        st[1] = st[1] * rescale + sum;
        tile_values(p, values, c, dim, rescale, st + 2);
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
