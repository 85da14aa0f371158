// A deliberately faulty helper for tests/engine/test_sanitizers.py: reads `past` floats beyond the end of a
// tensor. Built the way textcomplete builds its native modules, so a sanitizer build must catch it.

#include <torch/extension.h>

float read_past_end(at::Tensor t, int64_t past) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous(), "contiguous float32");
  const float* p = t.data_ptr<float>();
  volatile float sum = 0.f;
  for (int64_t i = 0; i < t.numel() + past; ++i) sum = sum + p[i];
  return sum;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("read_past_end", &read_past_end, "Sum a tensor and `past` floats beyond its end (a bug on purpose)");
}
