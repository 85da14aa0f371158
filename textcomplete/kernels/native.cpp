// The kernels as a plain shared library with a C interface, for a process that does not load torch (loaded
// with ctypes by textcomplete/kernels/library.py). Same code as the torch extensions: the block-format
// products of quant/matmul.h and the Llama-family layers of llama_step.h, on the threads of its own pool
// (quant/parallel.h).
//
// Every function that can fail returns 0, or 1 with a message of at most error_size - 1 bytes in `error`.
// Arrays are contiguous and row-major unless a stride says otherwise; a stored matrix is given by its first
// byte, row count, bytes per row, row stride in bytes and GGML type (quant/matmul.h, StoredPart).

#include "llama_step.h"
#include "quant/matmul.h"

#include <cstring>
#include <exception>
#include <vector>

namespace {

template <class Fn>
int guarded(char* error, size_t error_size, Fn&& fn) {
  try {
    fn();
    return 0;
  } catch (const std::exception& e) {
    if (error != nullptr && error_size > 0) {
      std::strncpy(error, e.what(), error_size - 1);
      error[error_size - 1] = '\0';
    }
    return 1;
  }
}

std::vector<tcq::StoredPart> parts_of(int64_t count, const uint8_t* const* data, const int64_t* rows,
                                      const int64_t* row_bytes, const int64_t* strides, const int64_t* types) {
  TCQ_CHECK(count >= 1, "quant_matmul: no matrices");
  std::vector<tcq::StoredPart> parts;
  for (int64_t i = 0; i < count; ++i) {
    parts.push_back(tcq::StoredPart{data[i], rows[i], row_bytes[i], strides[i], types[i]});
  }
  return parts;
}

// A model's layers as registered by tc_llama_add_layer: the weights stay where the caller keeps them.
struct Model {
  llama::Shape shape;
  std::vector<llama::Layer> layers;
};

}  // namespace

extern "C" {

// Threads of the parallel products from now on (0: one per CPU this process may run on).
[[gnu::visibility("default")]] void tc_set_num_threads(int threads) { tcq::set_num_threads(threads); }

[[gnu::visibility("default")]] int tc_num_threads() { return tcq::num_threads(); }

// float32 lanes of the vector code (16 AVX-512, 8 AVX2, 1 portable).
[[gnu::visibility("default")]] int tc_vector_lanes() { return tcq::vector_lanes(); }

[[gnu::visibility("default")]] int tc_amx() { return tcq::amx() ? 1 : 0; }

[[gnu::visibility("default")]] int tc_int8_available() { return tcq::int8_available() ? 1 : 0; }

// out [n, k] = rows ids[0..n) of the stored matrix, decoded to float32 (an embedding lookup).
[[gnu::visibility("default")]] int tc_embed(const uint8_t* data, int64_t rows, int64_t row_bytes, int64_t stride,
                                            int64_t type, int64_t k, const int64_t* ids, int64_t n, float* out,
                                            char* error, size_t error_size) {
  return guarded(error, error_size, [&] {
    for (int64_t i = 0; i < n; ++i) {
      TCQ_CHECK(ids[i] >= 0 && ids[i] < rows, "embedding: token id ", ids[i], " is outside the table's ", rows,
                " rows");
    }
    for (int64_t i = 0; i < n; ++i) {
      tcq::dequantize(tcq::StoredPart{data + ids[i] * stride, 1, row_bytes, stride, type}, k, out + i * k, false);
    }
  });
}

// Whether GGML type `type` has a native kernel.
[[gnu::visibility("default")]] int tc_has_type(int64_t type) {
  for (int64_t id : tcq::type_ids(tcq::Formats{})) {
    if (id == type) return 1;
  }
  return 0;
}

// y [m, sum of the parts' rows] = x [m, k] @ [W_0; W_1; ...].T (quant/matmul.h, matmul_parts).
[[gnu::visibility("default")]] int tc_matmul_parts(const float* x, int64_t m, int64_t k, int64_t count,
                                                   const uint8_t* const* data, const int64_t* rows,
                                                   const int64_t* row_bytes, const int64_t* strides,
                                                   const int64_t* types, float* y, int64_t direct_rows, int portable,
                                                   int int8, char* error, size_t error_size) {
  return guarded(error, error_size, [&] {
    TCQ_CHECK(m >= 0 && k >= 1, "quant_matmul: x must be [M, K] with K >= 1, got [", m, ", ", k, "]");
    tcq::matmul_parts(x, m, k, parts_of(count, data, rows, row_bytes, strides, types), y, direct_rows, portable != 0,
                      int8 != 0);
  });
}

// y [rows, k] = the stored matrix's rows decoded to float32.
[[gnu::visibility("default")]] int tc_dequantize(const uint8_t* data, int64_t rows, int64_t row_bytes, int64_t stride,
                                                 int64_t type, int64_t k, float* y, int portable, char* error,
                                                 size_t error_size) {
  return guarded(error, error_size, [&] {
    tcq::dequantize(tcq::StoredPart{data, rows, row_bytes, stride, type}, k, y, portable != 0);
  });
}

// A Llama-family layer stack of this shape (see llama_step.h); its layers are added in order. Returns null (and
// the reason in `error`) on a bad shape.
[[gnu::visibility("default")]] void* tc_llama_create(int64_t hidden, int64_t heads, int64_t kv_heads,
                                                     int64_t head_dim, int64_t rotary_dim, double eps,
                                                     int64_t block_size, int64_t num_slots, int cache_type,
                                                     int64_t direct_rows, int int8, char* error, size_t error_size) {
  Model* model = nullptr;
  guarded(error, error_size, [&] {
    TCQ_CHECK(cache_type >= 0 && cache_type <= 2, "llama: cache type ", cache_type);
    const llama::Shape shape{hidden, heads, kv_heads, head_dim, rotary_dim, block_size, num_slots, eps,
                             static_cast<llama::CacheType>(cache_type), direct_rows, int8 != 0};
    llama::check_shape(shape);
    model = new Model{shape, {}};
  });
  return model;
}

[[gnu::visibility("default")]] void tc_llama_free(void* model) { delete static_cast<Model*>(model); }

// Appends a layer: its norms (q/k norms null where absent), KV cache and window; its projections' matrices
// (qkv, o, gate_up, down: counts[p] matrices each, in that order) as parallel arrays, a row order and a bias
// per matrix (null where absent).
[[gnu::visibility("default")]] int tc_llama_add_layer(void* model, const float* attn_norm, const float* ffn_norm,
                                                      const float* q_norm, const float* k_norm, void* cache,
                                                      int64_t window, const int64_t* counts,
                                                      const uint8_t* const* data, const int64_t* rows,
                                                      const int64_t* row_bytes, const int64_t* strides,
                                                      const int64_t* types, const int64_t* const* row_orders,
                                                      const float* const* biases, char* error, size_t error_size) {
  return guarded(error, error_size, [&] {
    Model& m = *static_cast<Model*>(model);
    llama::Layer layer{attn_norm, ffn_norm, q_norm, k_norm, {}, {}, {}, {}, cache, window};
    llama::Projection* projections[] = {&layer.qkv, &layer.o, &layer.gate_up, &layer.down};
    int64_t i = 0;
    for (int p = 0; p < 4; ++p) {
      TCQ_CHECK(counts[p] >= 1, "llama: every projection has a matrix");
      for (int64_t c = 0; c < counts[p]; ++c, ++i) {
        const tcq::StoredPart weight{data[i], rows[i], row_bytes[i], strides[i], types[i]};
        projections[p]->push_back(llama::Matrix{weight, row_orders[i], biases[i]});
      }
    }
    llama::check_layer(layer, m.shape, m.layers.size());
    m.layers.push_back(std::move(layer));
  });
}

// Runs every layer over one step's rows (llama_step.h, Rows): x [n, hidden] in place.
[[gnu::visibility("default")]] int tc_llama_step(void* model, float* x, int64_t n, const float* cos, const float* sin,
                                                 const int64_t* slot_mapping, int64_t decodes,
                                                 const int64_t* key_slots, int64_t width, const int64_t* key_lens,
                                                 int64_t chunks, const int64_t* chunk_rows,
                                                 const int64_t* const* block_tables, const int64_t* num_keys,
                                                 char* error, size_t error_size) {
  return guarded(error, error_size, [&] {
    const Model& m = *static_cast<const Model*>(model);
    llama::run_layers(x, m.layers, m.shape,
                      llama::Rows{n, cos, sin, slot_mapping, decodes, key_slots, width, key_lens, chunks, chunk_rows,
                                  block_tables, num_keys});
  });
}

// out [rows, dim] = x [rows, dim] * rsqrt(mean(x^2) + eps) * w.
[[gnu::visibility("default")]] void tc_rms_norm(const float* x, const float* w, float* out, int64_t rows, int64_t dim,
                                                double eps) {
  llama::rms_norm(x, w, out, rows, dim, dim, dim, eps);
}

}  // extern "C"
