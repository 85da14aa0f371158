// Python bindings of the block-format products in quant/matmul.h (used by textcomplete.quant). The products
// release the GIL while they run, as torch's own operators do.

#include "quant/torch_ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("matmul", &tcq::matmul, "y[M, N] = x[M, K] @ dequantize(raw[N, row_bytes]).T", py::arg("x"), py::arg("raw"),
        py::arg("type_id"), py::arg("k"), py::arg("direct_rows"), py::arg("portable"), py::arg("int8") = false,
        py::call_guard<py::gil_scoped_release>());
  m.def(
      "matmul_parts",
      [](const at::Tensor& x, const std::vector<at::Tensor>& raws, const std::vector<int64_t>& types, int64_t k,
         int64_t direct_rows, bool portable, bool int8) {
        TCQ_CHECK(raws.size() == types.size(), "matmul_parts: one type per matrix");
        std::vector<tcq::StoredPart> parts;
        for (size_t i = 0; i < raws.size(); ++i) parts.push_back(tcq::stored_part(raws[i], types[i]));
        return tcq::matmul_parts(x, parts, k, direct_rows, portable, int8);
      },
      "y[M, sum N_i] = x @ [W_0; W_1; ...].T: each matrix's product written into its own columns", py::arg("x"),
      py::arg("raws"), py::arg("types"), py::arg("k"), py::arg("direct_rows"), py::arg("portable"),
      py::arg("int8") = false, py::call_guard<py::gil_scoped_release>());
  m.def("int8_available", &tcq::int8_available, "whether the 8-bit-activation products were compiled in (AVX-512 VNNI or AVX2)");
  using Dequantize = at::Tensor (*)(const at::Tensor&, int64_t, int64_t, bool);   // the tensor overload
  m.def("dequantize", static_cast<Dequantize>(&tcq::dequantize), "raw[N, row_bytes] -> float32 [N, K]",
        py::arg("raw"), py::arg("type_id"),
        py::arg("k"), py::arg("portable"), py::call_guard<py::gil_scoped_release>());
  m.def("type_ids", [] { return tcq::type_ids(tcq::Formats{}); }, "the GGML type ids with a native kernel");
  m.def("int8_narrow_type_ids", [] { return tcq::int8_narrow_type_ids(tcq::Formats{}); },
        "the GGML type ids whose narrow products take 8-bit activations too");
  m.def("amx", &tcq::amx, "whether the exact tiled products of the integer-code formats run on AMX tiles");
  m.def("vectorized", &tcq::vectorized, "whether vector decoders (AVX-512 or AVX2) were compiled in");
  m.def("vector_lanes", &tcq::vector_lanes, "float32 lanes of the vector decoders (1: portable only)");
}
