// CUDA kernels of the fused image op: uint8 HWC crops -> (composite) -> (jitter) -> normalised NCHW.
// No torch headers: nvcc compiles this file alone; the torch glue is csrc/augment.cpp.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "../augment_math.h"
#include "launchers.h"

namespace {

using wsshm_aug::Constants;
using wsshm_aug::Jitter;

__device__ __forceinline__ void store(float* out, int64_t i, float v) { out[i] = v; }
__device__ __forceinline__ void store(__nv_bfloat16* out, int64_t i, float v) {
  out[i] = __float2bfloat16_rn(v);
}

__device__ __forceinline__ Jitter load_jitter(const float* jitter, int64_t b) {
  return Jitter{jitter[4 * b], jitter[4 * b + 1], jitter[4 * b + 2], jitter[4 * b + 3]};
}

// Sum over each image of the grey value after brightness; one atomicAdd per block.
__global__ void grey_sum_kernel(const uint8_t* __restrict__ image, const uint8_t* __restrict__ alpha,
                                const uint8_t* __restrict__ bg, const float* __restrict__ jitter,
                                float* __restrict__ grey_sum, int64_t pixels, wsshm_aug::GreyWeights weights) {
  const int64_t b = blockIdx.y;
  const uint8_t* img = image + b * pixels * 3;
  const uint8_t* a = alpha ? alpha + b * pixels : nullptr;
  const uint8_t* g = bg ? bg + b * pixels * 3 : nullptr;
  const float brightness = jitter[4 * b];
  float acc = 0.f;
  for (int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; p < pixels;
       p += (int64_t)gridDim.x * blockDim.x) {
    float rgb[3];
    wsshm_aug::load_pixel(img, a, g, p, rgb);
    wsshm_aug::apply_brightness(rgb, brightness);
    acc += wsshm_aug::grey(rgb[0], rgb[1], rgb[2], weights);
  }
  for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, offset);
  __shared__ float warp_sums[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = acc;
  __syncthreads();
  if (warp == 0) {
    acc = lane < (blockDim.x + 31) / 32 ? warp_sums[lane] : 0.f;
    for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, offset);
    if (lane == 0) atomicAdd(grey_sum + b, acc);
  }
}

template <typename T>
__global__ void prepare_kernel(const uint8_t* __restrict__ image, const uint8_t* __restrict__ alpha,
                               const uint8_t* __restrict__ bg, const float* __restrict__ jitter,
                               const float* __restrict__ grey_sum, T* __restrict__ plain,
                               T* __restrict__ strong, int64_t pixels, Constants k) {
  const int64_t b = blockIdx.y;
  const uint8_t* img = image + b * pixels * 3;
  const uint8_t* a = alpha ? alpha + b * pixels : nullptr;
  const uint8_t* g = bg ? bg + b * pixels * 3 : nullptr;
  const int64_t base = b * 3 * pixels;
  for (int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; p < pixels;
       p += (int64_t)gridDim.x * blockDim.x) {
    float rgb[3];
    wsshm_aug::load_pixel(img, a, g, p, rgb);
    if (plain)
      for (int c = 0; c < 3; ++c) store(plain, base + c * pixels + p, (rgb[c] - k.mean[c]) * k.inv_std[c]);
    if (strong) {
      const Jitter j = load_jitter(jitter, b);
      wsshm_aug::apply_brightness(rgb, j.brightness);
      wsshm_aug::apply_rest(rgb, j, grey_sum[b] / (float)pixels, k.grey);
      for (int c = 0; c < 3; ++c) store(strong, base + c * pixels + p, (rgb[c] - k.mean[c]) * k.inv_std[c]);
    }
  }
}

}  // namespace

namespace wsshm_cuda {

cudaError_t fused_prepare(const uint8_t* image, const uint8_t* alpha, const uint8_t* bg, const float* jitter,
                          float* grey_sum, void* plain_out, void* strong_out, bool bf16, int64_t batch,
                          int64_t pixels, const Constants& constants, void* stream) {
  const cudaStream_t s = (cudaStream_t)stream;
  const int threads = 256;
  const int64_t blocks_needed = (pixels + threads - 1) / threads;
  const dim3 grid((unsigned)(blocks_needed < 1024 ? blocks_needed : 1024), (unsigned)batch);
  // Each launch is checked (cudaGetLastError, as C10_CUDA_KERNEL_LAUNCH_CHECK() does) and its error
  // returned at once: a bad configuration or no kernel image for this GPU must not pass silently.
  if (strong_out) {
    cudaError_t err = cudaMemsetAsync(grey_sum, 0, batch * sizeof(float), s);
    if (err != cudaSuccess) return err;
    grey_sum_kernel<<<grid, threads, 0, s>>>(image, alpha, bg, jitter, grey_sum, pixels, constants.grey);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  if (bf16) {
    prepare_kernel<__nv_bfloat16><<<grid, threads, 0, s>>>(
        image, alpha, bg, jitter, grey_sum, (__nv_bfloat16*)plain_out, (__nv_bfloat16*)strong_out,
        pixels, constants);
  } else {
    prepare_kernel<float><<<grid, threads, 0, s>>>(image, alpha, bg, jitter, grey_sum,
                                                   (float*)plain_out, (float*)strong_out, pixels, constants);
  }
  return cudaGetLastError();
}

}  // namespace wsshm_cuda
