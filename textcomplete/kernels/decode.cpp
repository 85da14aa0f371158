// The decoder layers of the Llama family for one decode step, fused into one native call.
//
// A decode step computes one token per request. At batch 1 on a CPU the matmuls are a few dozen
// microseconds each and everything between them (norms, rotary embedding, cache writes, attention over a
// few hundred keys, SwiGLU, residual adds) is tiny, so issuing those as separate PyTorch operators from
// Python costs more than computing them. Here they are plain loops over float32; the matmuls are the same
// kernels the PyTorch path calls (ATen's float32 matmul, or the block-format products of quant/matmul.h on
// weights as the file stores them), so both paths compute the same thing up to float rounding.
//
// Layout contract (see textcomplete/models/llama.py, NativeDecode, which packs the arguments):
//   x            [n, hidden] float32 hidden states, one row per request
//   cos, sin     [n, rotary_dim] float32 (sin with its first half negated: rotate-half as a swap)
//   slot_mapping [n] int64: the cache slot each request's new key/value goes to
//   key_slots    [n, width] int64: the cache slots of each request's keys, in position order
//   key_lens     [n] int64: how many of a row's key slots are real (the rest is padding)
//   windows      per layer: 0, or the sliding window (a query sees only the last `window` keys, itself included)
//   caches       one [num_slots, 2, kv_heads, head_dim] tensor per layer (key and value side by side): float32,
//                bfloat16 or float16 (keys and values are rounded to it as they are written)
//   layers       per layer: ln1, ln2, q_norm, k_norm (empty where absent), then the parts of the qkv, o,
//                gate_up and down projections, four tensors a part: float32 weight [out, in] or empty, stored
//                bytes uint8 [out, row_bytes] or empty, row order int64 [out] or empty, bias or empty.
//                A projection's output is its parts' outputs side by side.
//   layouts      per layer: the part counts of qkv, o, gate_up, down, then each part's GGML type (-1: float)

#include "attention.h"
#include "quant/matmul.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int kProjections = 4;   // qkv, o, gate_up, down

// One matrix of a projection: a float32 weight, or a stored one read by its format's kernel.
struct Part {
  at::Tensor weight, raw, row_order, bias;
  int64_t type;
};

using Projection = std::vector<Part>;

struct Shape {
  int64_t heads, kv_heads, head_dim, rotary_dim, direct_rows;
  double eps;
  bool qk_norm, int8;   // int8: products quantize activations to 8 bits where the format allows (quant/int8.h)
};

at::Tensor part_product(const at::Tensor& x, const Part& p, const Shape& s) {
  at::Tensor y;
  if (p.raw.numel() > 0) {
    y = tcq::matmul(x, p.raw, p.type, x.size(1), s.direct_rows, false, s.int8);
    if (p.row_order.numel() > 0) y = y.index_select(1, p.row_order);
  } else {
    y = at::linear(x, p.weight);
  }
  if (p.bias.numel() > 0) y.add_(p.bias);
  return y;
}

// y = x @ W.T (+ b), W the parts of the projection one above the other. A narrow product of stored parts
// runs as one (one parallel region, each part's outputs written in place).
at::Tensor linear(const at::Tensor& x, const Projection& parts, const Shape& s) {
  const bool stored = std::all_of(parts.begin(), parts.end(), [](const Part& p) { return p.raw.numel() > 0; });
  if (stored && x.size(0) <= s.direct_rows) {
    std::vector<tcq::StoredPart> matrices;
    for (const Part& p : parts) matrices.push_back(tcq::StoredPart{p.raw, p.type});
    at::Tensor y = tcq::direct_parts(x, matrices, false, s.int8);
    int64_t first = 0;
    for (const Part& p : parts) {
      const int64_t rows = p.raw.size(0);
      if (p.row_order.numel() > 0 || p.bias.numel() > 0) {
        at::Tensor out = y.narrow(1, first, rows);
        if (p.row_order.numel() > 0) out.copy_(out.index_select(1, p.row_order));
        if (p.bias.numel() > 0) out.add_(p.bias);
      }
      first += rows;
    }
    return y;
  }
  if (parts.size() == 1) return part_product(x, parts[0], s);
  std::vector<at::Tensor> outputs;
  outputs.reserve(parts.size());
  for (const Part& p : parts) outputs.push_back(part_product(x, p, s));
  return at::cat(outputs, 1);
}

// out[i] = x[i] * rsqrt(mean(x^2) + eps) * w, over rows of length dim.
void rms_norm(const float* x, const float* w, float* out, int64_t rows, int64_t dim, int64_t stride_in,
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
void silu_mul(const float* g, const float* u, float* out, int64_t count) {
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
void rotate(float* x, const float* cos, const float* sin, int64_t rot) {
  const int64_t half = rot / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * cos[i] + b * sin[i];
    x[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}

// Calls fn(T{}) with the element type of a cache tensor.
template <class Fn>
void with_cache_type(const at::Tensor& cache, Fn&& fn) {
  switch (cache.scalar_type()) {
    case at::kFloat: return fn(float{});
    case at::kBFloat16: return fn(c10::BFloat16{});
    case at::kHalf: return fn(c10::Half{});
    default: TORCH_CHECK(false, "caches: float32, bfloat16 or float16, not ", cache.scalar_type());
  }
}

// A layer's projections from its packed tensors and layout (checked in decode_layers).
std::vector<Projection> projections(const std::vector<at::Tensor>& w, const std::vector<int64_t>& layout) {
  std::vector<Projection> out(kProjections);
  size_t tensor = 4, type = kProjections;
  for (int p = 0; p < kProjections; ++p) {
    for (int64_t i = 0; i < layout[p]; ++i, tensor += 4, ++type)
      out[p].push_back(Part{w[tensor], w[tensor + 1], w[tensor + 2], w[tensor + 3], layout[type]});
  }
  return out;
}

at::Tensor layer(at::Tensor x, const std::vector<at::Tensor>& w, const std::vector<Projection>& proj,
                 at::Tensor& cache, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& slot_mapping,
                 const at::Tensor& key_slots, const at::Tensor& key_lens, int64_t window, const Shape& s) {
  const int64_t n = x.size(0), hidden = x.size(1);
  const int64_t H = s.heads, KV = s.kv_heads, D = s.head_dim, group = H / KV;
  const Projection &qkv_l = proj[0], &o_l = proj[1], &gate_up_l = proj[2], &down_l = proj[3];

  // Attention block.
  at::Tensor h = at::empty_like(x);
  rms_norm(x.data_ptr<float>(), w[0].data_ptr<float>(), h.data_ptr<float>(), n, hidden, hidden, hidden, s.eps);
  at::Tensor qkv = linear(h, qkv_l, s).contiguous();           // [n, (H + 2 KV) D]
  const int64_t row = (H + 2 * KV) * D;
  TORCH_CHECK(qkv.size(1) == row, "qkv projection: ", qkv.size(1), " columns, expected ", row);
  float* qkv_p = qkv.data_ptr<float>();
  const float* cos_p = cos.data_ptr<float>();
  const float* sin_p = sin.data_ptr<float>();
  const int64_t* slot_p = slot_mapping.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    float* r = qkv_p + i * row;
    if (s.qk_norm) {
      rms_norm(r, w[2].data_ptr<float>(), r, H, D, D, D, s.eps);
      rms_norm(r + H * D, w[3].data_ptr<float>(), r + H * D, KV, D, D, D, s.eps);
    }
    for (int64_t head = 0; head < H + KV; ++head)
      rotate(r + head * D, cos_p + i * s.rotary_dim, sin_p + i * s.rotary_dim, s.rotary_dim);
  }

  at::Tensor attn = at::empty({n, H * D}, x.options());
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  const int64_t width = key_slots.size(1);
  const int64_t* keys_p = key_slots.data_ptr<int64_t>();
  const int64_t* lens_p = key_lens.data_ptr<int64_t>();
  float* attn_p = attn.data_ptr<float>();
  // A request's first key (past a sliding window) and first chunk; the state of its chunk c for query head h
  // is at ((first_chunk[i] + c) * H + h) * (D + 2). Work items: each chunk for each of `ranges` KV head ranges.
  std::vector<int64_t> first_key(n), first_chunk(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    first_key[i] = window > 0 ? std::max<int64_t>(0, lens_p[i] - window) : 0;
    const int64_t keys = lens_p[i] - first_key[i];
    first_chunk[i + 1] = first_chunk[i] + (keys + attention::kKeyChunk - 1) / attention::kKeyChunk;
  }
  const int64_t chunks = first_chunk[n], want = 4 * at::get_num_threads();   // items: about four a thread
  const int64_t ranges = std::clamp<int64_t>((want + chunks - 1) / std::max<int64_t>(1, chunks), 1, KV);
  const int64_t range_heads = (KV + ranges - 1) / ranges;
  at::Tensor state = at::empty({chunks * H, D + 2}, x.options());
  float* state_p = state.data_ptr<float>();
  with_cache_type(cache, [&](auto zero) {
    using T = decltype(zero);
    T* cache_p = static_cast<T*>(cache.data_ptr());
    for (int64_t i = 0; i < n; ++i) {   // key, then value: the cache's layout (rounded to T)
      const float* kv = qkv_p + i * row + H * D;
      T* slot = cache_p + slot_p[i] * 2 * KV * D;
      for (int64_t d = 0; d < 2 * KV * D; ++d) slot[d] = static_cast<T>(kv[d]);
    }
    tcq::parallel_pieces(chunks * ranges, 1, 1, [&](int64_t begin, int64_t end) {
      static thread_local std::vector<float> tile;   // kept between calls: no allocation a step
      tile.resize(std::max<size_t>(tile.size(), static_cast<size_t>(attention::kKeyTile * (2 * D + 1))));
      for (int64_t item = begin; item < end; ++item) {
        const int64_t chunk = item / ranges, kv0 = item % ranges * range_heads;
        const int64_t kv1 = std::min(KV, kv0 + range_heads);
        if (kv0 >= kv1) continue;
        const int64_t i = std::upper_bound(first_chunk.begin(), first_chunk.end(), chunk) - first_chunk.begin() - 1;
        const int64_t k0 = first_key[i] + (chunk - first_chunk[i]) * attention::kKeyChunk;
        const int64_t k1 = std::min(lens_p[i], k0 + attention::kKeyChunk);
        attention::attend_chunk<T>(qkv_p + i * row, cache_p, keys_p + i * width + k0, k1 - k0, kv0, kv1, group, KV,
                                   D, scale, tile.data(), state_p + chunk * H * (D + 2));
      }
    });
  });
  // Each query head's chunks, merged in order (a few per head: spread over threads only for many heads).
  tcq::parallel_pieces(n * H, 16, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i = t / H, h = t % H;
      attention::merge_chunks(state_p + (first_chunk[i] * H + h) * (D + 2), first_chunk[i + 1] - first_chunk[i],
                              H * (D + 2), D, attn_p + t * D);
    }
  });
  x = x + linear(attn, o_l, s);

  // MLP block.
  rms_norm(x.data_ptr<float>(), w[1].data_ptr<float>(), h.data_ptr<float>(), n, hidden, hidden, hidden, s.eps);
  at::Tensor gate_up = linear(h, gate_up_l, s).contiguous();   // [n, 2 I]
  const int64_t inter = gate_up.size(1) / 2;
  at::Tensor act = at::empty({n, inter}, x.options());
  const float* gu = gate_up.data_ptr<float>();
  float* a = act.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) silu_mul(gu + i * 2 * inter, gu + i * 2 * inter + inter, a + i * inter, inter);
  return x + linear(act, down_l, s);
}

}  // namespace

// Runs every decoder layer for one decode step; returns the last layer's hidden states [n, hidden].
at::Tensor decode_layers(at::Tensor x, const std::vector<std::vector<at::Tensor>>& layers,
                         const std::vector<std::vector<int64_t>>& layouts, std::vector<at::Tensor> caches,
                         std::vector<int64_t> windows, at::Tensor cos, at::Tensor sin, at::Tensor slot_mapping,
                         at::Tensor key_slots, at::Tensor key_lens, int64_t heads, int64_t kv_heads,
                         int64_t head_dim, int64_t rotary_dim, double eps, bool qk_norm, int64_t direct_rows,
                         bool int8) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous float32 [n, hidden]");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.size(0) == x.size(0) && cos.size(1) == rotary_dim,
              "cos/sin: contiguous [n, rotary_dim]");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() && slot_mapping.numel() == x.size(0),
              "slot_mapping: contiguous int64 [n]");
  TORCH_CHECK(key_slots.scalar_type() == at::kLong && key_slots.is_contiguous() && key_slots.size(0) == x.size(0),
              "key_slots: contiguous int64 [n, width]");
  TORCH_CHECK(key_lens.scalar_type() == at::kLong && key_lens.is_contiguous() && key_lens.numel() == x.size(0),
              "key_lens: contiguous int64 [n]");
  TORCH_CHECK(layers.size() == caches.size() && layers.size() == windows.size() && layers.size() == layouts.size(),
              "one layout, cache and window per layer");
  TORCH_CHECK(heads > 0 && kv_heads > 0 && head_dim > 0 && heads % kv_heads == 0 && rotary_dim % 2 == 0 &&
              rotary_dim <= head_dim, "head shapes");
  const Shape s{heads, kv_heads, head_dim, rotary_dim, direct_rows, eps, qk_norm, int8};
  // Every cache slot the loops touch must lie inside every layer's cache: checked once per step, here.
  const int64_t n = x.size(0), width = key_slots.dim() == 2 ? key_slots.size(1) : -1;
  TORCH_CHECK(width >= 1 || n == 0, "key_slots: [n, width] with width >= 1");
  const int64_t slot_values = 2 * kv_heads * head_dim;
  const int64_t num_slots = caches.empty() ? 0 : caches[0].numel() / slot_values;
  const int64_t* slot_p = slot_mapping.data_ptr<int64_t>();
  const int64_t* keys_p = key_slots.data_ptr<int64_t>();
  const int64_t* lens_p = key_lens.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(slot_p[i] >= 0 && slot_p[i] < num_slots, "slot_mapping[", i, "] = ", slot_p[i], " is outside the ",
                num_slots, " cache slots");
    TORCH_CHECK(lens_p[i] >= 1 && lens_p[i] <= width, "key_lens[", i, "] = ", lens_p[i], " with ", width, " key slots");
    for (int64_t j = 0; j < lens_p[i]; ++j) {
      const int64_t slot = keys_p[i * width + j];
      TORCH_CHECK(slot >= 0 && slot < num_slots, "key_slots[", i, ", ", j, "] = ", slot, " is outside the ",
                  num_slots, " cache slots");
    }
  }
  at::NoGradGuard no_grad;
  std::vector<std::vector<Projection>> projs;
  for (size_t l = 0; l < layers.size(); ++l) {
    const std::vector<int64_t>& layout = layouts[l];
    TORCH_CHECK(layout.size() >= kProjections, "layouts[", l, "]: part counts of the four projections first");
    int64_t parts = 0;
    for (int p = 0; p < kProjections; ++p) {
      TORCH_CHECK(layout[p] >= 1, "layouts[", l, "]: every projection has a part");
      parts += layout[p];
    }
    TORCH_CHECK(static_cast<int64_t>(layout.size()) == kProjections + parts &&
                static_cast<int64_t>(layers[l].size()) == 4 + 4 * parts,
                "layer ", l, ": 4 norms and 4 tensors for each of its ", parts, " parts, and a type per part");
    projs.push_back(projections(layers[l], layout));
    for (const Projection& proj : projs.back()) {
      for (const Part& p : proj) {
        const bool stored = p.raw.numel() > 0;
        TORCH_CHECK(stored ? p.weight.numel() == 0 && p.type >= 0 : p.weight.scalar_type() == at::kFloat && p.type == -1,
                    "layer ", l, ": a part is a float32 weight or stored bytes with their GGML type");
        TORCH_CHECK(p.row_order.numel() == 0 || (stored && p.row_order.scalar_type() == at::kLong &&
                                                  p.row_order.numel() == p.raw.size(0)),
                    "layer ", l, ": a row order is int64, one entry per stored row");
      }
    }
  }
  for (size_t l = 0; l < layers.size(); ++l) {
    TORCH_CHECK(caches[l].is_contiguous() && caches[l].scalar_type() == caches[0].scalar_type() &&
                caches[l].numel() == num_slots * slot_values,
                "caches: contiguous [num_slots, 2, kv_heads, head_dim], one dtype for all layers");
    TORCH_CHECK(layers[l][0].numel() == x.size(1) && layers[l][1].numel() == x.size(1), "norm weights: [hidden]");
    TORCH_CHECK(windows[l] >= 0, "windows[", l, "] = ", windows[l]);
    x = layer(x, layers[l], projs[l], caches[l], cos, sin, slot_mapping, key_slots, key_lens, windows[l], s);
  }
  return x;
}

// The prompt attention of one request's chunk (attention.h, prompt_attention): q [t, heads, head_dim] float32,
// cache [blocks, block_size, 2, kv_heads, head_dim], block_table [>= the blocks of num_keys positions] int64.
at::Tensor prompt_attention(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& block_table,
                            int64_t num_keys, int64_t window, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.is_contiguous(),
              "q: contiguous float32 [t, heads, head_dim]");
  TORCH_CHECK(cache.dim() == 5 && cache.is_contiguous() && cache.size(2) == 2 && cache.size(4) == q.size(2),
              "cache: contiguous [blocks, block_size, 2, kv_heads, head_dim]");
  const int64_t t = q.size(0), heads = q.size(1), kv_heads = cache.size(3), block_size = cache.size(1);
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, heads, " query heads do not share ", kv_heads, " KV heads");
  TORCH_CHECK(t >= 1 && num_keys >= t && window >= 0, "need 1 <= t <= num_keys, got t = ", t, ", num_keys = ",
              num_keys);
  TORCH_CHECK(block_table.scalar_type() == at::kLong && block_table.is_contiguous() &&
                  block_table.numel() * block_size >= num_keys,
              "block_table: int64 blocks covering the ", num_keys, " keys");
  const int64_t* blocks = block_table.data_ptr<int64_t>();
  for (int64_t b = 0; b < (num_keys + block_size - 1) / block_size; ++b)
    TORCH_CHECK(blocks[b] >= 0 && blocks[b] < cache.size(0), "block_table[", b, "] = ", blocks[b],
                " is outside the cache's ", cache.size(0), " blocks");
  at::Tensor out = at::empty_like(q);
  with_cache_type(cache, [&](auto zero) {
    using T = decltype(zero);
    attention::prompt_attention<T>(q.data_ptr<float>(), t, static_cast<const T*>(cache.data_ptr()), block_size, blocks,
                                   num_keys, heads, kv_heads, q.size(2), window, static_cast<float>(scale),
                                   out.data_ptr<float>(), [](int64_t items, const auto& fn) {
                                     tcq::parallel_pieces(items, 1, 1, fn);
                                   });
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The GIL is released while the layers run (tens of milliseconds on a large model), so the server's event
  // loop streams the previous token meanwhile instead of waiting for the engine thread to reach Python.
  m.def("decode_layers", &decode_layers, "All decoder layers of one decode step (Llama family, float32 activations)",
        py::call_guard<py::gil_scoped_release>());
  m.def("prompt_attention", &prompt_attention, "Causal attention of one request's prompt chunk over the paged cache",
        py::call_guard<py::gil_scoped_release>());
  m.def("vector_lanes", &tcq::vector_lanes, "float32 lanes of the vector code (16 AVX-512, 8 AVX2, 1 portable)");
}
