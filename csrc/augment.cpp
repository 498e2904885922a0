// Fused image op: decoded uint8 HWC crops -> normalised NCHW float32/bf16 in one pass per pixel.
// Teacher form: composite I = a*Fg + (1-a)*Bg (eq. 1) first. Student form: the plain (weak) view and
// the colour-jittered (strong) view from one read of each pixel. The math is csrc/augment_math.h;
// its PyTorch reference is wsshm/data/fused.py (tests compare the two).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <vector>

#ifdef WSSHM_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include "cuda/launchers.h"
#endif

#include "augment_math.h"
#include "describe.h"

namespace {

using wsshm_aug::Jitter;

void check_inputs(const at::Tensor& image, const c10::optional<at::Tensor>& alpha,
                  const c10::optional<at::Tensor>& background, const c10::optional<at::Tensor>& jitter,
                  bool plain) {
  using wsshm_msg::describe;
  TORCH_CHECK(image.scalar_type() == at::kByte && image.dim() == 4 && image.size(3) == 3,
              "fused_prepare: image must be uint8 [B, H, W, 3], got ", describe(image));
  const auto B = image.size(0), H = image.size(1), W = image.size(2);
  TORCH_CHECK(alpha.has_value() == background.has_value(),
              "fused_prepare: alpha and background go together (compositing needs both)");
  if (alpha) {
    TORCH_CHECK(alpha->scalar_type() == at::kByte && alpha->numel() == B * H * W &&
                    alpha->size(0) == B && alpha->size(1) == H && alpha->size(2) == W,
                "fused_prepare: alpha must be uint8 [B, H, W] (or [B, H, W, 1]) matching image ",
                describe(image), ", got ", describe(*alpha));
    TORCH_CHECK(background->scalar_type() == at::kByte && background->sizes() == image.sizes(),
                "fused_prepare: background must be uint8 with the image's shape ", describe(image),
                ", got ", describe(*background));
    TORCH_CHECK(alpha->device() == image.device() && background->device() == image.device(),
                "fused_prepare: all inputs must be on one device");
  }
  if (jitter) {
    TORCH_CHECK(jitter->scalar_type() == at::kFloat && jitter->dim() == 2 && jitter->size(0) == B &&
                    jitter->size(1) == 4,
                "fused_prepare: jitter must be float32 [B, 4] (brightness, contrast, saturation, hue), got ",
                describe(*jitter));
    TORCH_CHECK(jitter->device() == image.device(), "fused_prepare: jitter must be on the image's device");
  }
  TORCH_CHECK(plain || jitter.has_value(), "fused_prepare: nothing to compute (plain=False and no jitter)");
}

// One contiguous run [p0, p1) of the pixels of one image. Pixels go through a small planar float
// buffer so that the math loops have unit stride and no branches: GCC vectorises them (the flags are
// template parameters for the same reason).
template <typename T, bool COMPOSITE, bool PLAIN, bool STRONG>
inline __attribute__((always_inline)) void prepare_run_body(
    const uint8_t* __restrict__ img, const uint8_t* __restrict__ a, const uint8_t* __restrict__ g,
    T* __restrict__ pl, T* __restrict__ st, Jitter j, float grey_mean, int64_t pixels, int64_t p0, int64_t p1,
    const float* mean_in, const float* inv_std_in) {
  const float mean[3] = {mean_in[0], mean_in[1], mean_in[2]};
  const float inv_std[3] = {inv_std_in[0], inv_std_in[1], inv_std_in[2]};
  constexpr int64_t kChunk = 256;
  float r[kChunk], gr[kChunk], bl[kChunk];
  for (int64_t c0 = p0; c0 < p1; c0 += kChunk) {
    const int64_t n = std::min(kChunk, p1 - c0);
    for (int64_t i = 0; i < n; ++i) {
      float rgb[3];
      wsshm_aug::load_pixel(img, COMPOSITE ? a : nullptr, g, c0 + i, rgb);
      r[i] = rgb[0], gr[i] = rgb[1], bl[i] = rgb[2];
    }
    if (PLAIN) {
      T* __restrict__ o0 = pl + c0;
      T* __restrict__ o1 = pl + pixels + c0;
      T* __restrict__ o2 = pl + 2 * pixels + c0;
      for (int64_t i = 0; i < n; ++i) {
        o0[i] = T((r[i] - mean[0]) * inv_std[0]);
        o1[i] = T((gr[i] - mean[1]) * inv_std[1]);
        o2[i] = T((bl[i] - mean[2]) * inv_std[2]);
      }
    }
    if (STRONG) {
      T* __restrict__ o0 = st + c0;
      T* __restrict__ o1 = st + pixels + c0;
      T* __restrict__ o2 = st + 2 * pixels + c0;
      for (int64_t i = 0; i < n; ++i) {
        float rgb[3] = {r[i], gr[i], bl[i]};
        wsshm_aug::apply_brightness(rgb, j.brightness);
        wsshm_aug::apply_rest(rgb, j, grey_mean);
        o0[i] = T((rgb[0] - mean[0]) * inv_std[0]);
        o1[i] = T((rgb[1] - mean[1]) * inv_std[1]);
        o2[i] = T((rgb[2] - mean[2]) * inv_std[2]);
      }
    }
  }
}

// The same loop compiled for AVX2+FMA, picked at run time where the CPU has them (setup.py builds
// for the baseline x86-64 instruction set).
template <typename T, bool COMPOSITE, bool PLAIN, bool STRONG>
__attribute__((target("avx2,fma"))) void prepare_run_avx2(const uint8_t* img, const uint8_t* a, const uint8_t* g,
                                                          T* pl, T* st, Jitter j, float grey_mean, int64_t pixels,
                                                          int64_t p0, int64_t p1, const float* mean,
                                                          const float* inv_std) {
  prepare_run_body<T, COMPOSITE, PLAIN, STRONG>(img, a, g, pl, st, j, grey_mean, pixels, p0, p1, mean, inv_std);
}

template <typename T, bool COMPOSITE, bool PLAIN, bool STRONG>
void prepare_run(const uint8_t* img, const uint8_t* a, const uint8_t* g, T* pl, T* st, Jitter j, float grey_mean,
                 int64_t pixels, int64_t p0, int64_t p1, const float* mean, const float* inv_std) {
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2)
    prepare_run_avx2<T, COMPOSITE, PLAIN, STRONG>(img, a, g, pl, st, j, grey_mean, pixels, p0, p1, mean, inv_std);
  else
    prepare_run_body<T, COMPOSITE, PLAIN, STRONG>(img, a, g, pl, st, j, grey_mean, pixels, p0, p1, mean, inv_std);
}

template <typename T, bool COMPOSITE, bool PLAIN, bool STRONG>
void prepare_cpu(const uint8_t* image, const uint8_t* alpha, const uint8_t* bg, const float* jitter, T* plain,
                 T* strong, int64_t batch, int64_t pixels, const float mean[3], const float inv_std[3]) {
  std::vector<float> grey_mean(batch, 0.f);
  if (STRONG) {
    // contrast pivots on the image's grey mean after brightness: a reduction before the pixel pass
    constexpr int64_t kChunk = 4096;  // float partial sums per chunk, a double across chunks
    at::parallel_for(0, batch, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const uint8_t* img = image + b * pixels * 3;
        const uint8_t* a = COMPOSITE ? alpha + b * pixels : nullptr;
        const uint8_t* g = COMPOSITE ? bg + b * pixels * 3 : nullptr;
        double total = 0.0;
        for (int64_t c0 = 0; c0 < pixels; c0 += kChunk) {
          float acc = 0.f;
          for (int64_t p = c0, c1 = std::min(pixels, c0 + kChunk); p < c1; ++p) {
            float rgb[3];
            wsshm_aug::load_pixel(img, a, g, p, rgb);
            wsshm_aug::apply_brightness(rgb, jitter[4 * b]);
            acc += wsshm_aug::grey(rgb[0], rgb[1], rgb[2]);
          }
          total += acc;
        }
        grey_mean[b] = (float)(total / (double)pixels);
      }
    });
  }
  at::parallel_for(0, batch * pixels, 16384, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      const int64_t b = i / pixels;
      const int64_t stop = std::min(end, (b + 1) * pixels);
      const Jitter j = STRONG ? Jitter{jitter[4 * b], jitter[4 * b + 1], jitter[4 * b + 2], jitter[4 * b + 3]}
                              : Jitter{1.f, 1.f, 1.f, 0.f};
      prepare_run<T, COMPOSITE, PLAIN, STRONG>(
          image + b * pixels * 3, COMPOSITE ? alpha + b * pixels : nullptr, COMPOSITE ? bg + b * pixels * 3 : nullptr,
          PLAIN ? plain + b * 3 * pixels : nullptr, STRONG ? strong + b * 3 * pixels : nullptr, j, grey_mean[b],
          pixels, i - b * pixels, stop - b * pixels, mean, inv_std);
      i = stop;
    }
  });
}

template <typename T>
void prepare_cpu_dispatch(const uint8_t* image, const uint8_t* alpha, const uint8_t* bg, const float* jitter,
                          T* plain, T* strong, int64_t batch, int64_t pixels, const float mean[3],
                          const float inv_std[3]) {
  const int variant = (alpha ? 4 : 0) + (plain ? 2 : 0) + (strong ? 1 : 0);
#define WSSHM_CASE(C, P, S)                                                                                \
  case (C ? 4 : 0) + (P ? 2 : 0) + (S ? 1 : 0):                                                          \
    return prepare_cpu<T, C, P, S>(image, alpha, bg, jitter, plain, strong, batch, pixels, mean, inv_std);
  switch (variant) {
    WSSHM_CASE(false, true, false)
    WSSHM_CASE(false, false, true)
    WSSHM_CASE(false, true, true)
    WSSHM_CASE(true, true, false)
    WSSHM_CASE(true, false, true)
    WSSHM_CASE(true, true, true)
    default: TORCH_CHECK(false, "fused_prepare: nothing to compute");
  }
#undef WSSHM_CASE
}

}  // namespace

std::vector<at::Tensor> fused_prepare(const at::Tensor& image_in, const c10::optional<at::Tensor>& alpha_in,
                                      const c10::optional<at::Tensor>& background_in,
                                      const c10::optional<at::Tensor>& jitter_in, bool plain, bool bf16,
                                      std::vector<double> mean_in, std::vector<double> std_in) {
  check_inputs(image_in, alpha_in, background_in, jitter_in, plain);
  TORCH_CHECK(mean_in.size() == 3 && std_in.size() == 3, "fused_prepare: mean and std need 3 values");
  const auto image = image_in.contiguous();
  const auto alpha = alpha_in ? alpha_in->contiguous() : at::Tensor();
  const auto background = background_in ? background_in->contiguous() : at::Tensor();
  const auto jitter = jitter_in ? jitter_in->contiguous() : at::Tensor();
  const int64_t B = image.size(0), H = image.size(1), W = image.size(2), pixels = H * W;
  const auto options = image.options().dtype(bf16 ? at::kBFloat16 : at::kFloat);
  at::Tensor plain_out = plain ? at::empty({B, 3, H, W}, options) : at::Tensor();
  at::Tensor strong_out = jitter.defined() ? at::empty({B, 3, H, W}, options) : at::Tensor();
  float mean[3], inv_std[3];
  for (int c = 0; c < 3; ++c) mean[c] = (float)mean_in[c], inv_std[c] = (float)(1.0 / std_in[c]);
  const uint8_t* a = alpha.defined() ? alpha.data_ptr<uint8_t>() : nullptr;
  const uint8_t* g = background.defined() ? background.data_ptr<uint8_t>() : nullptr;
  const float* j = jitter.defined() ? jitter.data_ptr<float>() : nullptr;
  if (B * pixels == 0) return {plain_out, strong_out};
  if (image.is_cuda()) {
#ifdef WSSHM_WITH_CUDA
    const c10::cuda::CUDAGuard guard(image.device());
    at::Tensor scratch = at::empty({B}, image.options().dtype(at::kFloat));
    wsshm_cuda::fused_prepare(image.data_ptr<uint8_t>(), a, g, j, scratch.data_ptr<float>(),
                              plain ? plain_out.data_ptr() : nullptr,
                              strong_out.defined() ? strong_out.data_ptr() : nullptr, bf16, B, pixels,
                              mean, inv_std, c10::cuda::getCurrentCUDAStream().stream());
    return {plain_out, strong_out};
#else
    TORCH_CHECK(false, "fused_prepare: wsshm._C was built without CUDA");
#endif
  }
  if (bf16) {
    prepare_cpu_dispatch<at::BFloat16>(image.data_ptr<uint8_t>(), a, g, j,
                              plain ? plain_out.data_ptr<at::BFloat16>() : nullptr,
                              strong_out.defined() ? strong_out.data_ptr<at::BFloat16>() : nullptr, B,
                              pixels, mean, inv_std);
  } else {
    prepare_cpu_dispatch<float>(image.data_ptr<uint8_t>(), a, g, j, plain ? plain_out.data_ptr<float>() : nullptr,
                       strong_out.defined() ? strong_out.data_ptr<float>() : nullptr, B, pixels, mean,
                       inv_std);
  }
  return {plain_out, strong_out};
}
