// The block-format products of matmul.h for torch tensors: the torch extensions' side of the kernels
// (quant_matmul.cpp, decode.cpp). Included first: it makes parallel.h take torch's threads.
#pragma once

#define TCQ_ATEN 1

#include <torch/extension.h>

#include <vector>

#include "matmul.h"

namespace tcq {

// A uint8 [n, row_bytes] tensor's rows as a stored part of GGML type `type`.
inline StoredPart stored_part(const at::Tensor& raw, int64_t type) {
  TCQ_CHECK(raw.device().is_cpu() && raw.scalar_type() == at::kByte && raw.dim() == 2,
            "quant_matmul: weights must be a 2-D uint8 CPU tensor, got ", raw.scalar_type(), " ", raw.sizes());
  TCQ_CHECK(raw.stride(1) == 1 || raw.size(1) <= 1, "quant_matmul: weight rows must be contiguous bytes, got strides ",
            raw.strides());
  return StoredPart{raw.data_ptr<uint8_t>(), raw.size(0), raw.size(1), raw.stride(0), type};
}

inline void check_x(const at::Tensor& x, int64_t k) {
  TCQ_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == k,
            "quant_matmul: x must be float32 [M, ", k, "], got ", x.scalar_type(), " ", x.sizes());
  TCQ_CHECK(x.is_contiguous(), "quant_matmul: x must be contiguous, got strides ", x.strides());
}

inline int64_t total_rows(const std::vector<StoredPart>& parts) {
  int64_t total = 0;
  for (const StoredPart& p : parts) total += p.rows;
  return total;
}

// y [M, sum of the parts' rows] = x @ [W_0; W_1; ...].T (matmul.h's matmul_parts).
inline at::Tensor matmul_parts(const at::Tensor& x, const std::vector<StoredPart>& parts, int64_t k,
                               int64_t direct_rows, bool portable, bool int8 = false) {
  check_x(x, k);
  at::Tensor y = at::empty({x.size(0), total_rows(parts)}, x.options());
  matmul_parts(x.data_ptr<float>(), x.size(0), k, parts, y.data_ptr<float>(), direct_rows, portable, int8);
  return y;
}

inline at::Tensor matmul(const at::Tensor& x, const at::Tensor& raw, int64_t type, int64_t k, int64_t direct_rows,
                         bool portable, bool int8 = false) {
  return matmul_parts(x, {stored_part(raw, type)}, k, direct_rows, portable, int8);
}

// The direct path alone, whatever the row count (matmul.h's direct_parts).
inline at::Tensor direct_parts(const at::Tensor& x, const std::vector<StoredPart>& parts, bool portable, bool int8) {
  check_x(x, x.size(1));
  at::Tensor y = at::empty({x.size(0), total_rows(parts)}, x.options());
  direct_parts(x.data_ptr<float>(), x.size(0), x.size(1), parts, y.data_ptr<float>(), portable, int8);
  return y;
}

inline at::Tensor dequantize(const at::Tensor& raw, int64_t type, int64_t k, bool portable) {
  const StoredPart part = stored_part(raw, type);
  at::Tensor y = at::empty({part.rows, k}, at::kFloat);
  dequantize(part, k, y.data_ptr<float>(), portable);
  return y;
}

}  // namespace tcq
