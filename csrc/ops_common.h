// Argument checks and table conversions shared by the CPU (fused_margin.cpp) and CUDA
// (fused_margin_cuda.cu) implementations of the fused_margin row ops.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "row_kernel.h"

namespace fused_margin {

using OptTensor = std::optional<at::Tensor>;

inline RawType raw_type_of(const at::Tensor& raw) {
  switch (raw.scalar_type()) {
    case at::kFloat: return RawType::Float;
    case at::kBFloat16: return RawType::BFloat16;
    case at::kHalf: return RawType::Half;
    default:
      TORCH_CHECK(false, "fused_margin row kernels: raw must be float32, bfloat16 or float16, got ",
                  raw.scalar_type());
  }
  return RawType::Float;
}

inline void check_raw_and_target(const at::Tensor& raw, const at::Tensor& target) {
  TORCH_CHECK(raw.dim() == 2, "fused_margin row kernels: raw must be 2-D (B x C), got ", raw.dim(), "-D");
  raw_type_of(raw);
  TORCH_CHECK(target.dim() == 1 && target.size(0) == raw.size(0),
              "fused_margin row kernels: target must be 1-D with B = ", raw.size(0), " labels, got shape ",
              target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong, "fused_margin row kernels: target must be int64, got ",
              target.scalar_type());
  TORCH_CHECK(target.device() == raw.device(), "fused_margin row kernels: target is on ", target.device(),
              " but raw is on ", raw.device());
}

inline void check_codes(int64_t margin_type, int64_t fold) {
  TORCH_CHECK(margin_type == 0 || margin_type == 1,
              "fused_margin row_forward: margin_type must be 0 (additive_cosine) or 1 (additive_angular), got ",
              margin_type);
  TORCH_CHECK(fold >= 0 && fold <= 2, "fused_margin row_forward: fold must be 0 (none), 1 (threshold) or 2 (easy), got ",
              fold);
}

// The float32 contiguous form (the tensor itself when it already is) of an optional table; an
// undefined tensor when absent.
inline at::Tensor float_table(const OptTensor& table, const char* name, at::IntArrayRef shape,
                              const at::Tensor& raw) {
  if (!table.has_value() || !table->defined()) return at::Tensor();
  const at::Tensor& t = *table;
  TORCH_CHECK(t.sizes() == shape, "fused_margin row kernels: ", name, " must have shape ", shape, ", got ",
              t.sizes());
  TORCH_CHECK(t.device() == raw.device(), "fused_margin row kernels: ", name, " is on ", t.device(),
              " but raw is on ", raw.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "fused_margin row kernels: ", name,
              " must be floating point, got ", t.scalar_type());
  return t.to(at::kFloat).contiguous();
}

inline const float* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<float>() : nullptr;
}

}  // namespace fused_margin
