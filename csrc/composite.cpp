// Compositing I = M*Fg + (1-M)*Bg (paper eq. 1) on uint8 HWC images, rounded to nearest.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>

#include "describe.h"

#ifdef WSSHM_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include "cuda/launchers.h"
#endif

namespace {

void check_inputs(const at::Tensor& fg, const at::Tensor& alpha, const at::Tensor& bg) {
  using wsshm_msg::describe;
  TORCH_CHECK(fg.scalar_type() == at::kByte && alpha.scalar_type() == at::kByte &&
                  bg.scalar_type() == at::kByte,
              "composite_u8: fg, alpha and bg must be uint8, got ", describe(fg), ", ", describe(alpha),
              ", ", describe(bg));
  TORCH_CHECK(fg.dim() == 3 && bg.sizes() == fg.sizes(),
              "composite_u8: fg and bg must both be HxWxC with the same shape, got ", describe(fg),
              " and ", describe(bg));
  TORCH_CHECK(alpha.dim() == 2 && alpha.size(0) == fg.size(0) && alpha.size(1) == fg.size(1),
              "composite_u8: alpha must be HxW matching fg, got ", describe(alpha), " for fg ", describe(fg));
  TORCH_CHECK(fg.device() == alpha.device() && fg.device() == bg.device(),
              "composite_u8: all inputs must be on one device");
}

}  // namespace

at::Tensor composite_u8(const at::Tensor& fg_in, const at::Tensor& alpha_in, const at::Tensor& bg_in) {
  check_inputs(fg_in, alpha_in, bg_in);
  const auto fg = fg_in.contiguous();
  const auto alpha = alpha_in.contiguous();
  const auto bg = bg_in.contiguous();
  auto out = at::empty_like(fg);
  const int64_t pixels = fg.size(0) * fg.size(1);
  const int64_t channels = fg.size(2);
  if (fg.is_cuda()) {
#ifdef WSSHM_WITH_CUDA
    wsshm_cuda::composite_u8(fg.data_ptr<uint8_t>(), alpha.data_ptr<uint8_t>(), bg.data_ptr<uint8_t>(),
                             out.data_ptr<uint8_t>(), pixels, channels,
                             c10::cuda::getCurrentCUDAStream().stream());
    return out;
#else
    TORCH_CHECK(false, "composite_u8: wsshm._C was built without CUDA");
#endif
  }
  const uint8_t* f = fg.data_ptr<uint8_t>();
  const uint8_t* a = alpha.data_ptr<uint8_t>();
  const uint8_t* b = bg.data_ptr<uint8_t>();
  uint8_t* o = out.data_ptr<uint8_t>();
  at::parallel_for(0, pixels, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const float m = a[p] * (1.0f / 255.0f);
      for (int64_t c = 0; c < channels; ++c) {
        const int64_t i = p * channels + c;
        const float v = m * f[i] + (1.0f - m) * b[i];
        o[i] = (uint8_t)std::min(std::max(v + 0.5f, 0.0f), 255.0f);
      }
    }
  });
  return out;
}
