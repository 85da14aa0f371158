// The torch extension's side of the native layers (llama_step.h) and prompt attention (attention.h): tensors in,
// pointers to the same kernels the library without torch calls.
//
// Layout contract of decode_layers (see textcomplete/models/llama.py, NativeDecode, which packs the arguments):
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

#include "quant/torch_ops.h"
#include "llama_step.h"

#include <vector>

namespace {

constexpr int kProjections = 4;   // qkv, o, gate_up, down
constexpr int64_t kF32 = 0;       // GGML's type id of float32: a float32 weight is a stored matrix of that format

const float* floats_or_null(const at::Tensor& t) { return t.numel() > 0 ? t.data_ptr<float>() : nullptr; }

llama::CacheType cache_type(const at::Tensor& cache) {
  switch (cache.scalar_type()) {
    case at::kFloat: return llama::CacheType::kFloat32;
    case at::kHalf: return llama::CacheType::kFloat16;
    case at::kBFloat16: return llama::CacheType::kBFloat16;
    default: TORCH_CHECK(false, "caches: float32, bfloat16 or float16, not ", cache.scalar_type());
  }
}

// One part of a projection (four tensors: float32 weight or stored bytes, row order, bias) as a matrix.
llama::Matrix matrix(const at::Tensor* t, int64_t type, int64_t l) {
  const at::Tensor &weight = t[0], &raw = t[1], &order = t[2], &bias = t[3];
  const bool stored = raw.numel() > 0;
  TORCH_CHECK(stored ? weight.numel() == 0 && type >= 0
                     : weight.scalar_type() == at::kFloat && weight.dim() == 2 && weight.is_contiguous() && type == -1,
              "layer ", l, ": a part is a contiguous float32 weight or stored bytes with their GGML type");
  TORCH_CHECK(order.numel() == 0 || (stored && order.scalar_type() == at::kLong && order.is_contiguous() &&
                                     order.numel() == raw.size(0)),
              "layer ", l, ": a row order is int64, one entry per stored row");
  TORCH_CHECK(bias.numel() == 0 || (bias.scalar_type() == at::kFloat && bias.is_contiguous()),
              "layer ", l, ": a bias is contiguous float32");
  llama::Matrix m;
  if (stored) {
    m.weight = tcq::stored_part(raw, type);
  } else {
    const int64_t row = weight.size(1) * static_cast<int64_t>(sizeof(float));
    const auto* bytes = reinterpret_cast<const uint8_t*>(weight.data_ptr<float>());
    m.weight = tcq::StoredPart{bytes, weight.size(0), row, row, kF32};
  }
  m.row_order = order.numel() > 0 ? order.data_ptr<int64_t>() : nullptr;
  m.bias = floats_or_null(bias);
  TORCH_CHECK(bias.numel() == 0 || bias.numel() == m.weight.rows, "layer ", l, ": a bias has one value per row");
  return m;
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
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.size(0) == x.size(0) && cos.size(1) == rotary_dim &&
                  sin.sizes() == cos.sizes(),
              "cos/sin: contiguous float32 [n, rotary_dim]");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() &&
                  slot_mapping.numel() == x.size(0),
              "slot_mapping: contiguous int64 [n]");
  TORCH_CHECK(key_slots.scalar_type() == at::kLong && key_slots.is_contiguous() && key_slots.dim() == 2 &&
                  key_slots.size(0) == x.size(0),
              "key_slots: contiguous int64 [n, width]");
  TORCH_CHECK(key_lens.scalar_type() == at::kLong && key_lens.is_contiguous() && key_lens.numel() == x.size(0),
              "key_lens: contiguous int64 [n]");
  TORCH_CHECK(layers.size() == caches.size() && layers.size() == windows.size() && layers.size() == layouts.size(),
              "one layout, cache and window per layer");
  TORCH_CHECK(heads > 0 && kv_heads > 0 && head_dim > 0, "head shapes");
  TORCH_CHECK(x.size(1) > 0, "x: [n, hidden] with hidden > 0");
  const int64_t slot_values = 2 * kv_heads * head_dim;
  const int64_t num_slots = caches.empty() ? 0 : caches[0].numel() / slot_values;
  const llama::Shape shape{x.size(1), heads, kv_heads, head_dim, rotary_dim, 1, num_slots, eps,
                           caches.empty() ? llama::CacheType::kFloat32 : cache_type(caches[0]), direct_rows, int8};
  llama::check_shape(shape);
  std::vector<llama::Layer> stack;
  for (size_t l = 0; l < layers.size(); ++l) {
    const std::vector<int64_t>& layout = layouts[l];
    const std::vector<at::Tensor>& w = layers[l];
    TORCH_CHECK(layout.size() >= kProjections, "layouts[", l, "]: part counts of the four projections first");
    int64_t parts = 0;
    for (int p = 0; p < kProjections; ++p) {
      TORCH_CHECK(layout[p] >= 1, "layouts[", l, "]: every projection has a part");
      parts += layout[p];
    }
    TORCH_CHECK(static_cast<int64_t>(layout.size()) == kProjections + parts &&
                static_cast<int64_t>(w.size()) == 4 + 4 * parts,
                "layer ", l, ": 4 norms and 4 tensors for each of its ", parts, " parts, and a type per part");
    TORCH_CHECK(caches[l].is_contiguous() && caches[l].scalar_type() == caches[0].scalar_type() &&
                caches[l].numel() == num_slots * slot_values,
                "caches: contiguous [num_slots, 2, kv_heads, head_dim], one dtype for all layers");
    TORCH_CHECK(w[0].scalar_type() == at::kFloat && w[1].scalar_type() == at::kFloat && w[0].is_contiguous() &&
                w[1].is_contiguous() && w[0].numel() == x.size(1) && w[1].numel() == x.size(1),
                "norm weights: contiguous float32 [hidden]");
    TORCH_CHECK(!qk_norm || (w[2].numel() == head_dim && w[3].numel() == head_dim && w[2].scalar_type() == at::kFloat &&
                             w[3].scalar_type() == at::kFloat),
                "q/k norm weights: float32 [head_dim]");
    llama::Layer layer{w[0].data_ptr<float>(), w[1].data_ptr<float>(), qk_norm ? w[2].data_ptr<float>() : nullptr,
                       qk_norm ? w[3].data_ptr<float>() : nullptr, {}, {}, {}, {}, caches[l].data_ptr(), windows[l]};
    llama::Projection* projections[kProjections] = {&layer.qkv, &layer.o, &layer.gate_up, &layer.down};
    size_t tensor = 4, type = kProjections;
    for (int p = 0; p < kProjections; ++p) {
      for (int64_t i = 0; i < layout[p]; ++i, tensor += 4, ++type) {
        projections[p]->push_back(matrix(&w[tensor], layout[type], l));
      }
    }
    llama::check_layer(layer, shape, l);
    stack.push_back(std::move(layer));
  }
  const llama::Rows rows{x.size(0), cos.data_ptr<float>(), sin.data_ptr<float>(), slot_mapping.data_ptr<int64_t>(),
                         x.size(0), key_slots.data_ptr<int64_t>(), key_slots.size(1), key_lens.data_ptr<int64_t>(),
                         0, nullptr, nullptr, nullptr};
  at::Tensor out = x.clone();
  llama::run_layers(out.data_ptr<float>(), stack, shape, rows);
  return out;
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
  llama::with_cache_type(cache_type(cache), [&](auto zero) {
    using T = decltype(zero);
    attention::prompt_attention<T>(q.data_ptr<float>(), heads * q.size(2), t, static_cast<const T*>(cache.data_ptr()),
                                   block_size, blocks,
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
