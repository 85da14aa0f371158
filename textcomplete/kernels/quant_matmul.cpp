// Python bindings of the block-format products in quant/matmul.h (used by textcomplete.quant).

#include "quant/matmul.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("matmul", &tcq::matmul, "y[M, N] = x[M, K] @ dequantize(raw[N, row_bytes]).T", py::arg("x"), py::arg("raw"),
        py::arg("type_id"), py::arg("k"), py::arg("direct_rows"), py::arg("portable"), py::arg("int8") = false);
  m.def("int8_available", &tcq::int8_available, "whether the 8-bit-activation products were compiled in (VNNI)");
  m.def("dequantize", &tcq::dequantize, "raw[N, row_bytes] -> float32 [N, K]", py::arg("raw"), py::arg("type_id"),
        py::arg("k"), py::arg("portable"));
  m.def("type_ids", [] { return tcq::type_ids(tcq::Formats{}); }, "the GGML type ids with a native kernel");
  m.def("vectorized", &tcq::vectorized, "whether the AVX-512 decoders were compiled in");
}
