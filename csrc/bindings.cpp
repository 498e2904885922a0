// Python bindings of wsshm._C. Each op's implementation lives in its own csrc/*.cpp file.
#include <torch/extension.h>

at::Tensor composite_u8(const at::Tensor& fg, const at::Tensor& alpha, const at::Tensor& bg);
std::vector<at::Tensor> fused_prepare(const at::Tensor& image, const c10::optional<at::Tensor>& alpha,
                                      const c10::optional<at::Tensor>& background,
                                      const c10::optional<at::Tensor>& jitter, bool plain, bool bf16,
                                      std::vector<double> mean, std::vector<double> std);

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
  m.def("fused_prepare", &fused_prepare,
        "uint8 [B,H,W,3] crops -> [plain, strong] normalised NCHW views in one pass (optional "
        "compositing with alpha/background, optional per-sample jitter [B,4]); a view not asked for "
        "is None. Python wrapper and reference: wsshm.data.prepare.",
        py::arg("image"), py::arg("alpha"), py::arg("background"), py::arg("jitter"), py::arg("plain"),
        py::arg("bf16"), py::arg("mean"), py::arg("std"));
}
