// Per-pixel math of the fused image op, shared by the C++ CPU path (csrc/augment.cpp) and the CUDA
// kernels (csrc/cuda/augment.cu). Plain C++ with no torch headers so nvcc compiles it alone.
// The PyTorch reference of the same math is wsshm/data/prepare.py; keep the two in step.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define WSSHM_HD __host__ __device__ __forceinline__
#else
#define WSSHM_HD inline __attribute__((always_inline))
#endif

namespace wsshm_aug {

struct Jitter {
  float brightness, contrast, saturation, hue;  // factors, hue shift in turns
};

// Grey weights for contrast and saturation (wsshm.image.GREY_WEIGHTS).
struct GreyWeights {
  float r, g, b;
};

// Per-call constants, passed in from their one home, wsshm.image: the normalisation (x - mean) * inv_std
// of the output views and the grey weights.
struct Constants {
  float mean[3], inv_std[3];
  GreyWeights grey;
};

WSSHM_HD float clamp01(float v) { return v < 0.f ? 0.f : (v > 1.f ? 1.f : v); }

WSSHM_HD float grey(float r, float g, float b, GreyWeights w) { return w.r * r + w.g * g + w.b * b; }

// Pixel as RGB in [0, 1]: the composite I = a*Fg + (1-a)*Bg (eq. 1) when a background is given.
WSSHM_HD void load_pixel(const uint8_t* img, const uint8_t* alpha, const uint8_t* bg, int64_t p,
                         float rgb[3]) {
  const float inv = 1.0f / 255.0f;
  if (alpha != nullptr) {
    const float a = alpha[p] * inv;
    for (int c = 0; c < 3; ++c) rgb[c] = (a * img[3 * p + c] + (1.0f - a) * bg[3 * p + c]) * inv;
  } else {
    for (int c = 0; c < 3; ++c) rgb[c] = img[3 * p + c] * inv;
  }
}

// Brightness: the first jitter step; its clamped grey mean is the contrast pivot.
WSSHM_HD void apply_brightness(float rgb[3], float factor) {
  for (int c = 0; c < 3; ++c) rgb[c] = clamp01(rgb[c] * factor);
}

// floor for |x| < 2^31 with plain conversions, so the CPU loop vectorises without SSE4.1.
WSSHM_HD float floor_small(float x) {
  const float t = (float)(int)x;
  return t > x ? t - 1.0f : t;
}

// Contrast (around the per-image grey mean of the brightened image), saturation, hue rotation.
// Written without branches (selects only) so that the CPU loop vectorises and warps do not diverge;
// it equals torchvision's RGB -> HSV -> RGB hue shift (the reference in wsshm/data/prepare.py).
WSSHM_HD void apply_rest(float rgb[3], const Jitter& j, float grey_mean, GreyWeights w) {
  for (int c = 0; c < 3; ++c) rgb[c] = clamp01(j.contrast * rgb[c] + (1.0f - j.contrast) * grey_mean);
  const float gr = grey(rgb[0], rgb[1], rgb[2], w);
  for (int c = 0; c < 3; ++c) rgb[c] = clamp01(j.saturation * rgb[c] + (1.0f - j.saturation) * gr);
  const float r = rgb[0], g = rgb[1], b = rgb[2];
  const float maxc = r > g ? (r > b ? r : b) : (g > b ? g : b);
  const float minc = r < g ? (r < b ? r : b) : (g < b ? g : b);
  const float delta = maxc - minc;
  const float inv_delta = 1.0f / (delta > 0.f ? delta : 1.0f);
  const float h_r = (g - b) * inv_delta, h_g = (b - r) * inv_delta + 2.0f, h_b = (r - g) * inv_delta + 4.0f;
  float h = maxc == r ? h_r : (maxc == g ? h_g : h_b);
  h = h * (1.0f / 6.0f) + j.hue;
  h = h - floor_small(h);
  // grey pixels (delta 0) have s = 0, so every channel comes out as v: hue has no effect
  const float s = delta / (maxc > 0.f ? maxc : 1.0f);  // maxc 0 means delta 0
  const float v = maxc, h6 = h * 6.0f;
  // HSV -> RGB: channel n (R: 5, G: 3, B: 1) is v - v*s*clamp(min(k, 4-k), 0, 1), k = (n + 6h) mod 6
  const float offsets[3] = {5.0f, 3.0f, 1.0f};
  for (int c = 0; c < 3; ++c) {
    float k = offsets[c] + h6;
    k = k >= 6.0f ? k - 6.0f : k;
    const float ramp = k < 4.0f - k ? k : 4.0f - k;
    rgb[c] = v - v * s * (ramp < 0.f ? 0.f : (ramp > 1.f ? 1.f : ramp));
  }
}

}  // namespace wsshm_aug
