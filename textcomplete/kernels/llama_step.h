// The decoder layers of the Llama family for one step of the engine, on plain pointers: decode rows (one
// token per request) and prompt chunks (many rows of one request) in the same call.
//
// At batch 1 on a CPU the matmuls are a few dozen microseconds each and everything between them (norms,
// rotary embedding, cache writes, attention, SwiGLU, residual adds) is tiny, so issuing those as separate
// operators costs more than computing them. Here they are plain loops over float32; the matmuls are the
// block-format products of quant/matmul.h on weights as the file stores them (float32 weights are the F32
// format), so every caller computes the same thing. The torch extension (decode.cpp) runs decode steps through
// it; the library without torch (native.cpp) runs every step through it.
//
// Layout contract (checked in check_shape, check_layer and check_rows):
//   x            [n, hidden] float32 hidden states, updated in place; decode rows first, then prompt chunks
//   cos, sin     [n, rotary_dim] float32 (sin with its first half negated: rotate-half as a swap)
//   slot_mapping [n]: the cache slot each row's new key and value go to
//   decode rows  key_slots [decodes, width]: the cache slots of each request's keys in position order;
//                key_lens [decodes]: how many of them are real (the rest is padding)
//   prompt chunk rows [chunk_rows[c], chunk_rows[c + 1]) of one request, the queries of positions
//                num_keys[c] - rows .. num_keys[c] - 1; block_tables[c]: the cache blocks of positions
//                0 .. num_keys[c] - 1 in order
//   caches       per layer, [num_slots, 2, kv_heads, head_dim] (slot = block * block_size + offset; key and
//                value side by side) in float32, float16 or bfloat16 (rounded to it as they are written)
//   windows      per layer: 0, or the sliding window (a query sees only the last `window` keys, itself included)
#pragma once

#include "attention.h"
#include "quant/matmul.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

namespace llama {

// One matrix of a projection: its product's columns, reordered by row_order (output i is the product's
// column row_order[i]: llama.cpp's q/k row order undone) where given, plus the bias where given.
struct Matrix {
  tcq::StoredPart weight;
  const int64_t* row_order = nullptr;
  const float* bias = nullptr;
};

// A projection's output is its matrices' outputs side by side (fused q/k/v, gate/up).
using Projection = std::vector<Matrix>;

enum class CacheType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct Layer {
  const float* attn_norm;
  const float* ffn_norm;
  const float* q_norm;   // [head_dim] each, or null without q/k norms
  const float* k_norm;
  Projection qkv, o, gate_up, down;
  void* cache;
  int64_t window;
};

struct Shape {
  int64_t hidden, heads, kv_heads, head_dim, rotary_dim, block_size, num_slots;
  double eps;
  CacheType cache;
  int64_t direct_rows;   // products of at most this many rows take the direct path (quant/matmul.h)
  bool int8;             // products quantize activations to 8 bits where the format allows (quant/int8.h)
};

struct Rows {
  int64_t n;
  const float* cos;
  const float* sin;
  const int64_t* slot_mapping;
  int64_t decodes;
  const int64_t* key_slots;
  int64_t width;
  const int64_t* key_lens;
  int64_t chunks;
  const int64_t* chunk_rows;
  const int64_t* const* block_tables;
  const int64_t* num_keys;
};

// Calls fn(T{}) with the element type of the caches.
template <class Fn>
void with_cache_type(CacheType type, Fn&& fn) {
  switch (type) {
    case CacheType::kFloat32: return fn(float{});
    case CacheType::kFloat16: return fn(c10::Half{});
    case CacheType::kBFloat16: return fn(c10::BFloat16{});
  }
  tcq::fail("caches: float32, float16 or bfloat16, not type ", static_cast<int>(type));
}

inline int64_t rows_of(const Projection& p) {
  int64_t rows = 0;
  for (const Matrix& m : p) rows += m.weight.rows;
  return rows;
}

inline void check_shape(const Shape& s) {
  TCQ_CHECK(s.heads > 0 && s.kv_heads > 0 && s.head_dim > 0 && s.heads % s.kv_heads == 0 && s.rotary_dim % 2 == 0 &&
                s.rotary_dim >= 0 && s.rotary_dim <= s.head_dim && s.hidden > 0 && s.block_size > 0 &&
                s.num_slots >= 0 && s.num_slots % s.block_size == 0,
            "llama: bad shape (heads ", s.heads, ", KV heads ", s.kv_heads, ", head_dim ", s.head_dim, ", rotary_dim ",
            s.rotary_dim, ")");
}

// A layer's weights against the shape, checked once when its caller assembles it.
inline void check_layer(const Layer& layer, const Shape& s, size_t l) {
  const int64_t qkv = (s.heads + 2 * s.kv_heads) * s.head_dim;
  TCQ_CHECK(layer.attn_norm && layer.ffn_norm && layer.cache, "layer ", l, ": norms and a cache");
  TCQ_CHECK((layer.q_norm == nullptr) == (layer.k_norm == nullptr), "layer ", l, ": both q/k norms or neither");
  TCQ_CHECK(layer.window >= 0, "layer ", l, ": window ", layer.window);
  TCQ_CHECK(!layer.qkv.empty() && !layer.o.empty() && !layer.gate_up.empty() && !layer.down.empty(),
            "layer ", l, ": every projection has a matrix");
  const int64_t gate_up = rows_of(layer.gate_up);
  TCQ_CHECK(rows_of(layer.qkv) == qkv && rows_of(layer.o) == s.hidden && gate_up % 2 == 0 &&
                rows_of(layer.down) == s.hidden,
            "layer ", l, ": projections of ", rows_of(layer.qkv), ", ", rows_of(layer.o), ", ", gate_up, " and ",
            rows_of(layer.down), " rows do not fit the shape");
  for (const Projection* p : {&layer.qkv, &layer.gate_up}) {
    for (const Matrix& m : *p) tcq::check_part(m.weight, s.hidden);
  }
  for (const Matrix& m : layer.o) tcq::check_part(m.weight, s.heads * s.head_dim);
  for (const Matrix& m : layer.down) tcq::check_part(m.weight, gate_up / 2);
  for (const Projection* p : {&layer.qkv, &layer.o, &layer.gate_up, &layer.down}) {
    for (const Matrix& m : *p) {
      for (int64_t i = 0; m.row_order != nullptr && i < m.weight.rows; ++i) {
        TCQ_CHECK(m.row_order[i] >= 0 && m.row_order[i] < m.weight.rows, "layer ", l, ": row order out of range");
      }
    }
  }
}

// Everything a step's loops index, checked once per step: slots and blocks inside the caches.
inline void check_rows(const Shape& s, const Rows& r) {
  TCQ_CHECK(r.n >= 0 && r.decodes >= 0 && r.chunks >= 0 && r.decodes <= r.n, "rows: ", r.decodes, " decode rows of ",
            r.n);
  for (int64_t i = 0; i < r.n; ++i) {
    TCQ_CHECK(r.slot_mapping[i] >= 0 && r.slot_mapping[i] < s.num_slots, "slot_mapping[", i, "] = ",
              r.slot_mapping[i], " is outside the ", s.num_slots, " cache slots");
  }
  TCQ_CHECK(r.width >= 1 || r.decodes == 0, "key_slots: [decodes, width] with width >= 1");
  for (int64_t i = 0; i < r.decodes; ++i) {
    TCQ_CHECK(r.key_lens[i] >= 1 && r.key_lens[i] <= r.width, "key_lens[", i, "] = ", r.key_lens[i], " with ",
              r.width, " key slots");
    for (int64_t j = 0; j < r.key_lens[i]; ++j) {
      const int64_t slot = r.key_slots[i * r.width + j];
      TCQ_CHECK(slot >= 0 && slot < s.num_slots, "key_slots[", i, ", ", j, "] = ", slot, " is outside the ",
                s.num_slots, " cache slots");
    }
  }
  TCQ_CHECK(r.chunks == 0 || (r.chunk_rows[0] == r.decodes && r.chunk_rows[r.chunks] == r.n),
            "prompt chunks: rows from the last decode row to the end");
  const int64_t blocks = s.num_slots / s.block_size;
  for (int64_t c = 0; c < r.chunks; ++c) {
    const int64_t t = r.chunk_rows[c + 1] - r.chunk_rows[c];
    TCQ_CHECK(t >= 1 && r.num_keys[c] >= t, "prompt chunk ", c, ": ", t, " rows, ", r.num_keys[c], " keys");
    for (int64_t b = 0; b < (r.num_keys[c] + s.block_size - 1) / s.block_size; ++b) {
      TCQ_CHECK(r.block_tables[c][b] >= 0 && r.block_tables[c][b] < blocks, "block_tables[", c, "][", b, "] = ",
                r.block_tables[c][b], " is outside the cache's ", blocks, " blocks");
    }
  }
}

// out[i] = x[i] * rsqrt(mean(x^2) + eps) * w, over rows of length dim.
inline void rms_norm(const float* x, const float* w, float* out, int64_t rows, int64_t dim, int64_t stride_in,
                     int64_t stride_out, double eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * stride_in;
    float* o = out + r * stride_out;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < dim; ++i) ss += xr[i] * xr[i];
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(dim) + static_cast<float>(eps));
#pragma omp simd
    for (int64_t i = 0; i < dim; ++i) o[i] = xr[i] * inv * w[i];
  }
}

// out[j] = silu(g[j]) * u[j] for j < count. silu(g) = g * sigmoid(g), the sigmoid from e = exp(-|g|), which
// cannot overflow: 1 / (1 + e) where g >= 0, e / (1 + e) where g < 0.
inline void silu_mul(const float* g, const float* u, float* out, int64_t count) {
  int64_t j = 0;
#ifdef TCQ_VECTOR
  const tcq::Vec one = tcq::vec_set1(1.f);
  for (; j + tcq::kLanes <= count; j += tcq::kLanes) {
    const tcq::Vec gj = tcq::vec_load(g + j);
    const tcq::Vec e = tcq::vec_exp_nonpositive(tcq::vec_neg_abs(gj));
    const tcq::Vec sigmoid = tcq::vec_div(tcq::vec_where_negative(gj, one, e), tcq::vec_add(one, e));
    tcq::vec_store(out + j, tcq::vec_mul(tcq::vec_mul(gj, sigmoid), tcq::vec_load(u + j)));
  }
#endif
  for (; j < count; ++j) out[j] = g[j] / (1.f + std::exp(-g[j])) * u[j];
}

// Rotate the first rotary_dim dims of one head in place: x*cos + swap_halves(x)*signed_sin.
inline void rotate(float* x, const float* cos, const float* sin, int64_t rot) {
  const int64_t half = rot / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * cos[i] + b * sin[i];
    x[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}

// Uninitialized float32 scratch of one step.
inline std::unique_ptr<float[]> scratch(int64_t count) { return std::unique_ptr<float[]>(new float[count]); }

// y [m, rows of p] = x [m, k] @ p.T, each matrix's columns in its row order and given its bias.
inline void linear(const float* x, int64_t m, int64_t k, const Projection& p, float* y, const Shape& s) {
  std::vector<tcq::StoredPart> parts;
  for (const Matrix& matrix : p) parts.push_back(matrix.weight);
  tcq::matmul_parts(x, m, k, parts, y, s.direct_rows, false, s.int8);
  const int64_t width = rows_of(p);
  int64_t first = 0;
  std::vector<float> row;
  for (const Matrix& matrix : p) {
    const int64_t count = matrix.weight.rows;
    for (int64_t i = 0; i < m && (matrix.row_order != nullptr || matrix.bias != nullptr); ++i) {
      float* out = y + i * width + first;
      if (matrix.row_order != nullptr) {
        row.assign(out, out + count);
        for (int64_t j = 0; j < count; ++j) out[j] = row[matrix.row_order[j]];
      }
      if (matrix.bias != nullptr) {
        for (int64_t j = 0; j < count; ++j) out[j] += matrix.bias[j];
      }
    }
    first += count;
  }
}

// The attention of every row: q the first heads * head_dim values of each qkv row (already rotated, its key
// and value written to the cache), out [n, heads * head_dim].
template <class T>
void attend(const float* qkv, int64_t ldq, T* cache, int64_t window, const Shape& s, const Rows& r, float* out) {
  const int64_t H = s.heads, KV = s.kv_heads, D = s.head_dim, group = H / KV;
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  if (r.decodes > 0) {
    // A request's first key (past a sliding window) and first chunk; the state of its chunk c for query head h
    // is at ((first_chunk[i] + c) * H + h) * (D + 2). Work items: each chunk for each of `ranges` KV head ranges.
    const int64_t n = r.decodes;
    std::vector<int64_t> first_key(n), first_chunk(n + 1, 0);
    for (int64_t i = 0; i < n; ++i) {
      first_key[i] = window > 0 ? std::max<int64_t>(0, r.key_lens[i] - window) : 0;
      const int64_t keys = r.key_lens[i] - first_key[i];
      first_chunk[i + 1] = first_chunk[i] + (keys + attention::kKeyChunk - 1) / attention::kKeyChunk;
    }
    const int64_t chunks = first_chunk[n], want = 4 * tcq::num_threads();   // items: about four a thread
    const int64_t ranges = std::clamp<int64_t>((want + chunks - 1) / std::max<int64_t>(1, chunks), 1, KV);
    const int64_t range_heads = (KV + ranges - 1) / ranges;
    const std::unique_ptr<float[]> state = scratch(chunks * H * (D + 2));
    float* state_p = state.get();
    tcq::parallel_pieces(chunks * ranges, 1, 1, [&](int64_t begin, int64_t end) {
      static thread_local std::vector<float> tile;   // kept between calls: no allocation a step
      tile.resize(std::max<size_t>(tile.size(), static_cast<size_t>(attention::kKeyTile * (2 * D + 1))));
      for (int64_t item = begin; item < end; ++item) {
        const int64_t chunk = item / ranges, kv0 = item % ranges * range_heads;
        const int64_t kv1 = std::min(KV, kv0 + range_heads);
        if (kv0 >= kv1) continue;
        const int64_t i = std::upper_bound(first_chunk.begin(), first_chunk.end(), chunk) - first_chunk.begin() - 1;
        const int64_t k0 = first_key[i] + (chunk - first_chunk[i]) * attention::kKeyChunk;
        const int64_t k1 = std::min(r.key_lens[i], k0 + attention::kKeyChunk);
        attention::attend_chunk<T>(qkv + i * ldq, cache, r.key_slots + i * r.width + k0, k1 - k0, kv0, kv1, group, KV,
                                   D, scale, tile.data(), state_p + chunk * H * (D + 2));
      }
    });
    // Each query head's chunks, merged in order (a few per head: spread over threads only for many heads).
    tcq::parallel_pieces(n * H, 16, 64, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t i = t / H, h = t % H;
        attention::merge_chunks(state_p + (first_chunk[i] * H + h) * (D + 2), first_chunk[i + 1] - first_chunk[i],
                                H * (D + 2), D, out + t * D);
      }
    });
  }
  for (int64_t c = 0; c < r.chunks; ++c) {
    const int64_t r0 = r.chunk_rows[c], t = r.chunk_rows[c + 1] - r0;
    attention::prompt_attention<T>(qkv + r0 * ldq, ldq, t, cache, s.block_size, r.block_tables[c], r.num_keys[c], H, KV,
                                   D, window, scale, out + r0 * H * D, [](int64_t items, const auto& fn) {
                                     tcq::parallel_pieces(items, 1, 1, fn);
                                   });
  }
}

// One decoder layer over the step's rows: x [n, hidden] in place.
template <class T>
void layer(float* x, const Layer& w, const Shape& s, const Rows& r) {
  const int64_t n = r.n, hidden = s.hidden;
  const int64_t H = s.heads, KV = s.kv_heads, D = s.head_dim, row = (H + 2 * KV) * D;
  const int64_t inter = rows_of(w.gate_up) / 2;
  const std::unique_ptr<float[]> h = scratch(n * std::max(hidden, H * D)), qkv = scratch(n * row),
                                 out = scratch(n * hidden);

  // Attention block.
  rms_norm(x, w.attn_norm, h.get(), n, hidden, hidden, hidden, s.eps);
  linear(h.get(), n, hidden, w.qkv, qkv.get(), s);
  T* cache = static_cast<T*>(w.cache);
  for (int64_t i = 0; i < n; ++i) {
    float* q = qkv.get() + i * row;
    if (w.q_norm != nullptr) {
      rms_norm(q, w.q_norm, q, H, D, D, D, s.eps);
      rms_norm(q + H * D, w.k_norm, q + H * D, KV, D, D, D, s.eps);
    }
    for (int64_t head = 0; head < H + KV; ++head) {
      rotate(q + head * D, r.cos + i * s.rotary_dim, r.sin + i * s.rotary_dim, s.rotary_dim);
    }
    T* slot = cache + r.slot_mapping[i] * 2 * KV * D;   // key, then value: the cache's layout, rounded to T
    for (int64_t d = 0; d < 2 * KV * D; ++d) slot[d] = static_cast<T>(q[H * D + d]);
  }
  float* attn = h.get();   // the normed rows are no longer needed
  attend<T>(qkv.get(), row, cache, w.window, s, r, attn);
  linear(attn, n, H * D, w.o, out.get(), s);
  for (int64_t i = 0; i < n * hidden; ++i) x[i] += out[i];

  // MLP block.
  rms_norm(x, w.ffn_norm, h.get(), n, hidden, hidden, hidden, s.eps);
  const std::unique_ptr<float[]> gate_up = scratch(n * 2 * inter), act = scratch(n * inter);
  linear(h.get(), n, hidden, w.gate_up, gate_up.get(), s);
  for (int64_t i = 0; i < n; ++i) silu_mul(gate_up.get() + i * 2 * inter, gate_up.get() + i * 2 * inter + inter,
                                           act.get() + i * inter, inter);
  linear(act.get(), n, inter, w.down, out.get(), s);
  for (int64_t i = 0; i < n * hidden; ++i) x[i] += out[i];
}

// Every decoder layer for one step: x [n, hidden] becomes the last layer's hidden states.
// The layers must have passed check_layer.
inline void run_layers(float* x, const std::vector<Layer>& layers, const Shape& s, const Rows& r) {
  check_rows(s, r);
  if (r.n == 0) return;
  with_cache_type(s.cache, [&](auto zero) {
    using T = decltype(zero);
    for (const Layer& w : layers) layer<T>(x, w, s, r);
  });
}

}  // namespace llama
