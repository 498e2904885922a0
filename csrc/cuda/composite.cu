#include <cuda_runtime.h>

#include "launchers.h"

namespace {

__global__ void composite_u8_kernel(const uint8_t* __restrict__ fg, const uint8_t* __restrict__ alpha,
                                    const uint8_t* __restrict__ bg, uint8_t* __restrict__ out,
                                    int64_t pixels, int64_t channels) {
  for (int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; p < pixels;
       p += (int64_t)gridDim.x * blockDim.x) {
    const float m = alpha[p] * (1.0f / 255.0f);
    for (int64_t c = 0; c < channels; ++c) {
      const int64_t i = p * channels + c;
      const float v = m * fg[i] + (1.0f - m) * bg[i];
      out[i] = (uint8_t)fminf(fmaxf(v + 0.5f, 0.0f), 255.0f);
    }
  }
}

}  // namespace

namespace wsshm_cuda {

void composite_u8(const uint8_t* fg, const uint8_t* alpha, const uint8_t* bg, uint8_t* out,
                  int64_t pixels, int64_t channels, void* stream) {
  const int threads = 256;
  const int64_t blocks = (pixels + threads - 1) / threads;
  const int grid = (int)(blocks < 65535 ? blocks : 65535);
  composite_u8_kernel<<<grid, threads, 0, (cudaStream_t)stream>>>(fg, alpha, bg, out, pixels, channels);
}

}  // namespace wsshm_cuda
