// Fused image op: decoded uint8 HWC crops -> normalised NCHW float32/bf16 in one pass per pixel.
// Teacher form: composite I = a*Fg + (1-a)*Bg (eq. 1) first. Student form: the plain (weak) view and
// the colour-jittered (strong) view from one read of each pixel. The math is csrc/augment_math.h;
// its PyTorch reference is wsshm/data/prepare.py (tests compare the two). This file holds the CPU and
// CUDA kernels of torch.ops.wsshm.fused_prepare; its schema is in csrc/bindings.cpp and its fake
// (shape-only) implementation, for torch.compile, in wsshm/data/prepare.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#ifdef WSSHM_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include "cuda/launchers.h"
#endif

#include "augment_math.h"
#include "describe.h"

namespace {

using wsshm_aug::Constants;
using wsshm_aug::Jitter;

using OptionalTensor = std::optional<at::Tensor>;
using Views = std::tuple<at::Tensor, at::Tensor>;  // (plain, strong); empty [0] for a view not asked for

void check_inputs(const at::Tensor& image, const OptionalTensor& alpha, const OptionalTensor& background,
                  const OptionalTensor& jitter, bool plain) {
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
    const Constants& k) {
  const float mean[3] = {k.mean[0], k.mean[1], k.mean[2]};
  const float inv_std[3] = {k.inv_std[0], k.inv_std[1], k.inv_std[2]};
  const wsshm_aug::GreyWeights grey_weights = k.grey;
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
        wsshm_aug::apply_rest(rgb, j, grey_mean, grey_weights);
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
                                                          int64_t p0, int64_t p1, const Constants& k) {
  prepare_run_body<T, COMPOSITE, PLAIN, STRONG>(img, a, g, pl, st, j, grey_mean, pixels, p0, p1, k);
}

template <typename T, bool COMPOSITE, bool PLAIN, bool STRONG>
void prepare_run(const uint8_t* img, const uint8_t* a, const uint8_t* g, T* pl, T* st, Jitter j, float grey_mean,
                 int64_t pixels, int64_t p0, int64_t p1, const Constants& k) {
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2)
    prepare_run_avx2<T, COMPOSITE, PLAIN, STRONG>(img, a, g, pl, st, j, grey_mean, pixels, p0, p1, k);
  else
    prepare_run_body<T, COMPOSITE, PLAIN, STRONG>(img, a, g, pl, st, j, grey_mean, pixels, p0, p1, k);
}

template <typename T, bool COMPOSITE, bool PLAIN, bool STRONG>
void prepare_cpu(const uint8_t* image, const uint8_t* alpha, const uint8_t* bg, const float* jitter, T* plain,
                 T* strong, int64_t batch, int64_t pixels, const Constants& k) {
  std::vector<float> grey_mean(batch, 0.f);
  const wsshm_aug::GreyWeights grey_weights = k.grey;
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
            acc += wsshm_aug::grey(rgb[0], rgb[1], rgb[2], grey_weights);
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
          pixels, i - b * pixels, stop - b * pixels, k);
      i = stop;
    }
  });
}

template <typename T>
void prepare_cpu_dispatch(const uint8_t* image, const uint8_t* alpha, const uint8_t* bg, const float* jitter,
                          T* plain, T* strong, int64_t batch, int64_t pixels, const Constants& k) {
  const int variant = (alpha ? 4 : 0) + (plain ? 2 : 0) + (strong ? 1 : 0);
#define WSSHM_CASE(C, P, S)                                                                                \
  case (C ? 4 : 0) + (P ? 2 : 0) + (S ? 1 : 0):                                                          \
    return prepare_cpu<T, C, P, S>(image, alpha, bg, jitter, plain, strong, batch, pixels, k);
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

// The checked, contiguous inputs, the outputs and the constants in float: what both kernels start from.
struct Call {
  at::Tensor image, alpha, background, jitter, plain, strong;
  bool want_plain, want_strong;
  int64_t batch, pixels;
  Constants constants;

  const uint8_t* alpha_ptr() const { return alpha.defined() ? alpha.data_ptr<uint8_t>() : nullptr; }
  const uint8_t* background_ptr() const { return background.defined() ? background.data_ptr<uint8_t>() : nullptr; }
  const float* jitter_ptr() const { return jitter.defined() ? jitter.data_ptr<float>() : nullptr; }
  void* plain_ptr() const { return want_plain ? plain.data_ptr() : nullptr; }
  void* strong_ptr() const { return want_strong ? strong.data_ptr() : nullptr; }
};

Call start_call(const at::Tensor& image, const OptionalTensor& alpha, const OptionalTensor& background,
                const OptionalTensor& jitter, bool plain, bool bf16, at::ArrayRef<double> mean,
                at::ArrayRef<double> std, at::ArrayRef<double> grey) {
  check_inputs(image, alpha, background, jitter, plain);
  TORCH_CHECK(mean.size() == 3 && std.size() == 3 && grey.size() == 3,
              "fused_prepare: mean, std and grey weights need 3 values each");
  Call call;
  call.image = image.contiguous();
  call.alpha = alpha ? alpha->contiguous() : at::Tensor();
  call.background = background ? background->contiguous() : at::Tensor();
  call.jitter = jitter ? jitter->contiguous() : at::Tensor();
  call.want_plain = plain;
  call.want_strong = jitter.has_value();
  const int64_t B = image.size(0), H = image.size(1), W = image.size(2);
  call.batch = B;
  call.pixels = H * W;
  const auto options = image.options().dtype(bf16 ? at::kBFloat16 : at::kFloat);
  call.plain = plain ? at::empty({B, 3, H, W}, options) : at::empty({0}, options);
  call.strong = call.want_strong ? at::empty({B, 3, H, W}, options) : at::empty({0}, options);
  for (int c = 0; c < 3; ++c) {
    call.constants.mean[c] = (float)mean[c];
    call.constants.inv_std[c] = (float)(1.0 / std[c]);
  }
  call.constants.grey = {(float)grey[0], (float)grey[1], (float)grey[2]};
  return call;
}

template <typename T>
void run_cpu(const Call& call) {
  prepare_cpu_dispatch<T>(call.image.data_ptr<uint8_t>(), call.alpha_ptr(), call.background_ptr(), call.jitter_ptr(),
                          static_cast<T*>(call.plain_ptr()), static_cast<T*>(call.strong_ptr()), call.batch,
                          call.pixels, call.constants);
}

Views fused_prepare_cpu(const at::Tensor& image, const OptionalTensor& alpha, const OptionalTensor& background,
                        const OptionalTensor& jitter, bool plain, bool bf16, at::ArrayRef<double> mean,
                        at::ArrayRef<double> std, at::ArrayRef<double> grey) {
  const Call call = start_call(image, alpha, background, jitter, plain, bf16, mean, std, grey);
  if (call.batch * call.pixels == 0) return {call.plain, call.strong};
  if (bf16)
    run_cpu<at::BFloat16>(call);
  else
    run_cpu<float>(call);
  return {call.plain, call.strong};
}

Views fused_prepare_cuda(const at::Tensor& image, const OptionalTensor& alpha, const OptionalTensor& background,
                         const OptionalTensor& jitter, bool plain, bool bf16, at::ArrayRef<double> mean,
                         at::ArrayRef<double> std, at::ArrayRef<double> grey) {
#ifdef WSSHM_WITH_CUDA
  const Call call = start_call(image, alpha, background, jitter, plain, bf16, mean, std, grey);
  if (call.batch * call.pixels == 0) return {call.plain, call.strong};
  const c10::cuda::CUDAGuard guard(call.image.device());
  const at::Tensor grey_sum = at::empty({call.batch}, call.image.options().dtype(at::kFloat));
  // the launcher checks each launch and returns the first error; C10_CUDA_CHECK raises it
  C10_CUDA_CHECK(wsshm_cuda::fused_prepare(call.image.data_ptr<uint8_t>(), call.alpha_ptr(), call.background_ptr(),
                                           call.jitter_ptr(), grey_sum.data_ptr<float>(), call.plain_ptr(),
                                           call.strong_ptr(), bf16, call.batch, call.pixels, call.constants,
                                           c10::cuda::getCurrentCUDAStream().stream()));
  return {call.plain, call.strong};
#else
  TORCH_CHECK(false, "fused_prepare: wsshm._C was built without CUDA (wsshm._C.build_info() is 'cpu')");
#endif
}

}  // namespace

TORCH_LIBRARY_IMPL(wsshm, CPU, m) { m.impl("fused_prepare", &fused_prepare_cpu); }
TORCH_LIBRARY_IMPL(wsshm, CUDA, m) { m.impl("fused_prepare", &fused_prepare_cuda); }
