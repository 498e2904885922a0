// Tensor descriptions for error messages, built without iostream number formatting: on an H200
// machine (GCC 13, torch 2.11+cu130) this extension crashed inside std::ostream::operator<<(long)
// while formatting a failed TORCH_CHECK's tensor sizes, instead of raising. Strings stream safely.
#pragma once
#include <ATen/ATen.h>

#include <string>

namespace wsshm_msg {

inline std::string describe(const at::Tensor& t) {
  std::string text = std::string(c10::toString(t.scalar_type())) + " [";
  for (int64_t i = 0; i < t.dim(); ++i) text += (i ? ", " : "") + std::to_string(t.size(i));
  return text + "]";
}

}  // namespace wsshm_msg
