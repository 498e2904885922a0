// Python bindings of wsshm._C. Each op's implementation lives in its own csrc/*.cpp file.
#include <torch/extension.h>

at::Tensor composite_u8(const at::Tensor& fg, const at::Tensor& alpha, const at::Tensor& bg);

static std::string build_info() {
#ifdef WSSHM_WITH_CUDA
  return "cpu+cuda";
#else
  return "cpu";
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("build_info", &build_info, "Which variant of the extension was built: 'cpu' or 'cpu+cuda'.");
  m.def("composite_u8", &composite_u8, "I = M*Fg + (1-M)*Bg on uint8 HWC images (paper eq. 1).",
        py::arg("fg"), py::arg("alpha"), py::arg("bg"));
}
