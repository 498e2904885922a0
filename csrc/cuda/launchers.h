// Plain C++ declarations of the CUDA launchers: no torch headers, so the .cu files compile with
// nvcc alone and the torch glue in csrc/*.cpp stays on the host compiler.
#pragma once
#include <cstdint>

namespace wsshm_cuda {

// I = M*Fg + (1-M)*Bg on uint8 HWC images; alpha is HW. `stream` is a cudaStream_t.
void composite_u8(const uint8_t* fg, const uint8_t* alpha, const uint8_t* bg, uint8_t* out,
                  int64_t pixels, int64_t channels, void* stream);

}  // namespace wsshm_cuda
