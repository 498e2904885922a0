// Plain C++ declarations of the CUDA launchers: no torch headers, so the .cu files compile with
// nvcc alone and the torch glue in csrc/*.cpp stays on the host compiler.
#pragma once
#include <cstdint>

namespace wsshm_cuda {

// I = M*Fg + (1-M)*Bg on uint8 HWC images; alpha is HW. `stream` is a cudaStream_t.
void composite_u8(const uint8_t* fg, const uint8_t* alpha, const uint8_t* bg, uint8_t* out,
                  int64_t pixels, int64_t channels, void* stream);

// Fused image op (csrc/augment.cpp documents the arguments). `alpha`/`bg` null: no compositing;
// `jitter` null: no strong view; `plain_out`/`strong_out` null: that view is not written.
// `jitter` is device memory [B, 4]; `grey_sum` is device scratch of B floats. `bf16` selects
// the output type (bfloat16 when true, float32 otherwise); outputs are NCHW.
void fused_prepare(const uint8_t* image, const uint8_t* alpha, const uint8_t* bg, const float* jitter,
                   float* grey_sum, void* plain_out, void* strong_out, bool bf16, int64_t batch,
                   int64_t pixels, const float mean[3], const float inv_std[3], void* stream);

}  // namespace wsshm_cuda
