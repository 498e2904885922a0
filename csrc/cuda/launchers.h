// Plain C++ declarations of the CUDA launchers: no torch headers, so the .cu files compile with
// nvcc alone and the torch glue in csrc/*.cpp stays on the host compiler. Each launcher checks every
// launch and returns the first error (cudaSuccess if none); the glue raises it with C10_CUDA_CHECK.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "../augment_math.h"

namespace wsshm_cuda {

// Fused image op (csrc/augment.cpp documents the arguments). `alpha`/`bg` null: no compositing;
// `jitter` null: no strong view; `plain_out`/`strong_out` null: that view is not written.
// `jitter` is device memory [B, 4]; `grey_sum` is device scratch of B floats. `bf16` selects
// the output type (bfloat16 when true, float32 otherwise); outputs are NCHW. `stream` is a cudaStream_t.
cudaError_t fused_prepare(const uint8_t* image, const uint8_t* alpha, const uint8_t* bg, const float* jitter,
                          float* grey_sum, void* plain_out, void* strong_out, bool bf16, int64_t batch,
                          int64_t pixels, const wsshm_aug::Constants& constants, void* stream);

}  // namespace wsshm_cuda
