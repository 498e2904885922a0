// What wsshm._C exposes: the operator library torch.ops.wsshm (schemas here; each op's CPU and CUDA
// kernels in its own csrc/*.cpp file; its fake implementation, which torch.compile traces with, in
// Python) and, through pybind, build_info().
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(wsshm, m) {
  m.set_python_module("wsshm.data.prepare");  // where the fake implementations are registered
  // uint8 [B,H,W,3] crops -> (plain, strong) normalised [B,3,H,W] views in one pass, with optional
  // compositing over a background (alpha [B,H,W]) and optional per-sample jitter [B,4]; a view not
  // asked for comes back empty. csrc/augment.cpp; Python wrapper and reference: wsshm.data.prepare.
  m.def(
      "fused_prepare(Tensor image, Tensor? alpha, Tensor? background, Tensor? jitter, bool plain, bool bf16, "
      "float[] mean, float[] std, float[] grey) -> (Tensor, Tensor)");
}

static std::string build_info() {
#ifdef WSSHM_WITH_CUDA
  return "cpu+cuda";
#else
  return "cpu";
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("build_info", &build_info, "Which variant of the extension was built: 'cpu' or 'cpu+cuda'.");
}
