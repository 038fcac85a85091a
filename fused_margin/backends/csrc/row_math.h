// Scalar math of the fused row loss shared by the CPU and CUDA kernels (host and device).
//
// The row-kernel contract is stated in fused_margin/paths/fused.py and executed eagerly in
// tests/helpers/row_torch.py; docs/loss.md sections 2-5 give the loss. Everything here is fp32 whatever
// the input dtype (docs/loss.md section 5: the angular math is always fp32).
//
// One-definition rule: the CPU kernels include this file from three translation units compiled for
// different instruction sets (row_kernel_cpu.cpp, _avx2.cpp, _avx512.cpp, each under its own
// `#pragma GCC target`), and the CUDA source includes it too. Were these inline functions one entity
// (one mangled name) in all of them, the linker would keep any one copy for every caller, possibly the
// AVX-512 one for the baseline kernels (SIGILL on a CPU without AVX-512). So everything here lives in
// an inline namespace named after the including unit's instruction set (CPU_CAPABILITY) or CUDA:
// callers still write fused_margin::nan_max, and each object holds its own, differently mangled, copy.
// tests/backends/test_contract.py checks the built extension's symbols.
#pragma once

#include <cmath>
#include <cstdint>

#include "row_kernel.h"

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FM_HOST_DEVICE inline
#endif

#define FUSED_MARGIN_CAT_(a, b) a##b
#define FUSED_MARGIN_CAT(a, b) FUSED_MARGIN_CAT_(a, b)
#if defined(__CUDACC__) || defined(__HIPCC__)
#define FUSED_MARGIN_ROW_MATH_NS row_math_cuda
#elif defined(CPU_CAPABILITY)
#define FUSED_MARGIN_ROW_MATH_NS FUSED_MARGIN_CAT(row_math_, CPU_CAPABILITY)
#else
#error "row_math.h: define CPU_CAPABILITY (DEFAULT, AVX2 or AVX512) before including it, or compile as CUDA"
#endif

namespace fused_margin {
inline namespace FUSED_MARGIN_ROW_MATH_NS {

// The clamp before acos, spec.ACOS_CLAMP = 1e-7, rounded to fp32 as torch.clamp rounds its bounds.
constexpr float kAcosLow = static_cast<float>(-1.0 + 1e-7);
constexpr float kAcosHigh = static_cast<float>(1.0 - 1e-7);
constexpr float kPi = static_cast<float>(3.14159265358979323846);

FM_HOST_DEVICE bool is_nan(float v) { return v != v; }

FM_HOST_DEVICE bool is_finite(float v) { return v - v == 0.f; }

// The upstream gradient of row i's loss (RowBackwardArgs::grad_rows, shared or per row), over the mean's
// denominator when there is one (NaN where it is 0: the loss is the NaN of 0 / 0 there, as F.cross_entropy).
FM_HOST_DEVICE float row_upstream_grad(const RowBackwardArgs& a, int64_t i) {
  float g = a.grad_rows[a.grad_rows_shared ? 0 : i];
  if (a.denom != nullptr) {
    const float d = *a.denom;
    g = d != 0.f ? g / d : NAN;
  }
  return g;
}

// dL/dt per unit upstream gradient at the target column, from the precise nll: p_y - 1 = expm1(-nll),
// (1 - eps) w_y (p_y - 1) + eps / C (W p_y - w_y) with W p_y - w_y = (W - w_y) + W (p_y - 1).
FM_HOST_DEVICE float target_column_grad(float nll, float w_y, float weight_sum, float eps, float eps_per_class) {
  const float pm1 = expm1f(-nll);
  float dl = (1.f - eps) * w_y * pm1;
  if (eps != 0.f) dl = dl + eps_per_class * ((weight_sum - w_y) + weight_sum * pm1);
  return dl;
}

// max that propagates NaN, as torch.maximum
FM_HOST_DEVICE float nan_max(float a, float b) { return (is_nan(a) || a > b) ? a : b; }

// torch.logsumexp's shift: the max where finite, else 0 (so +-inf and NaN rows come out as torch's)
FM_HOST_DEVICE float lse_shift(float running_max) { return is_finite(running_max) ? running_max : 0.f; }

// torch.argmax's order: NaN above everything (the first NaN wins), then larger values, ties to the
// lower index. Returns whether (value, index) beats (best, best_index).
FM_HOST_DEVICE bool argmax_better(float value, int64_t index, float best, int64_t best_index) {
  const bool value_nan = is_nan(value), best_nan = is_nan(best);
  if (value_nan || best_nan) return value_nan && (!best_nan || index < best_index);
  return value > best || (value == best && index < best_index);
}

struct TargetLogit {
  float value;  // s psi(c, M)
  float grad;   // s dpsi/dc (including the instance-margin path dM/dc)
};

// The margined target logit of docs/loss.md section 3, as row_torch.target_margin_and_grad:
//   additive_cosine (CosFace, LDAM, ELM): psi = c - M, dpsi/dc = 1 - dM/dc;
//   additive_angular (ArcFace, DBM): psi = cos(theta + M), theta = acos(clamp(c, -1 + 1e-7, 1 - 1e-7)),
//     dpsi/dc = sin(theta + M) / sin(theta) [c inside the clamp] - sin(theta + M) dM/dc;
//     fold "threshold" (ArcFace's th/mm guard, where c <= cos(pi - M)): psi = c - M sin M;
//     fold "easy" (where c <= 0): psi = c;
//   straight_through (insightface arcface_torch): dpsi/dc = 1.
FM_HOST_DEVICE TargetLogit target_logit(float c, float margin, float dmargin_dc, float scale,
                                        MarginType margin_type, AngularFold fold, bool straight_through) {
  float value, grad;
  if (margin_type == MarginType::AdditiveCosine) {
    value = c - margin;
    grad = 1.f - dmargin_dc;
  } else {
    const float clamped = c < kAcosLow ? kAcosLow : (c > kAcosHigh ? kAcosHigh : c);
    const float inside = (c >= kAcosLow && c <= kAcosHigh) ? 1.f : 0.f;
    const float theta = acosf(clamped);  // NaN stays NaN through the clamp
    const float sin_shift = sinf(theta + margin);
    value = cosf(theta + margin);
    grad = sin_shift / sinf(theta) * inside - sin_shift * dmargin_dc;
    if (fold == AngularFold::Threshold) {
      if (c <= cosf(kPi - margin)) {
        value = c - margin * sinf(margin);
        grad = 1.f - (sinf(margin) + margin * cosf(margin)) * dmargin_dc;
      }
    } else if (fold == AngularFold::Easy) {
      if (c <= 0.f) {
        value = c;
        grad = 1.f;
      }
    }
  }
  if (straight_through) grad = 1.f;
  return {scale * value, scale * grad};
}

// The margin of a kept row (docs/loss.md section 2): M = m_y (1 + lambda_inst h (1 - c) / 2)
// - lambda_elm m_{c*} (DBM instance margin, ELM), and dM/dc = -m_y lambda_inst h / 2.
struct RowMargin {
  float margin;
  float dmargin_dc;
};

FM_HOST_DEVICE RowMargin row_margin(float c, float margin_y, float margin_wrong, bool hard,
                                    float lambda_inst, float lambda_elm) {
  const float h = hard ? 1.f : 0.f;
  float margin = margin_y * (1.f + lambda_inst * h * (1.f - c) / 2.f);
  if (lambda_elm != 0.f) margin = margin - lambda_elm * margin_wrong;
  return {margin, -margin_y * lambda_inst * h / 2.f};
}

// An online logsumexp with torch's shift rule, plus the label-smoothing sum
// sum_j w_j (shift - l_j) kept relative to the same shift (every term >= 0, so no cancellation).
struct LseState {
  float max;     // running max (NaN-propagating)
  float sum;     // sum_j exp(l_j - lse_shift(max))
  float dev;     // sum_j w_j (lse_shift(max) - l_j)   (label smoothing only)
  float weight;  // sum_j w_j                           (label smoothing only)
};

FM_HOST_DEVICE LseState lse_empty() {
  return {-INFINITY, 0.f, 0.f, 0.f};
}

// Merge two partial states (either may be empty).
FM_HOST_DEVICE LseState lse_merge(const LseState& a, const LseState& b) {
  const float m = nan_max(a.max, b.max);
  const float shift = lse_shift(m);
  const float shift_a = lse_shift(a.max), shift_b = lse_shift(b.max);
  LseState out;
  out.max = m;
  out.sum = (a.sum == 0.f ? 0.f : a.sum * expf(shift_a - shift)) +
            (b.sum == 0.f ? 0.f : b.sum * expf(shift_b - shift));
  out.dev = a.dev + (a.weight == 0.f ? 0.f : a.weight * (shift - shift_a)) + b.dev +
            (b.weight == 0.f ? 0.f : b.weight * (shift - shift_b));
  out.weight = a.weight + b.weight;
  if (is_nan(m)) out.sum = m;
  return out;
}

FM_HOST_DEVICE float lse_value(const LseState& s) { return logf(s.sum) + lse_shift(s.max); }

// sum_j w_j (lse - l_j) of the logits held by s, for the final lse of the row (docs/loss.md section 4)
FM_HOST_DEVICE float smoothing_sum(const LseState& s, float lse) {
  return s.weight == 0.f ? s.dev : s.weight * (lse - lse_shift(s.max)) + s.dev;
}

// nll = lse - t for the target logit t and the non-target logits' state s (max M, sum S of
// exp(l_j - M)), formed relative to the larger of t and M so that confident rows keep full precision
// (docs/loss.md section 8): log1p(S e^{M - t}) where t >= M; (M - t) + log(S + e^{t - M}) where t < M (then
// nll >= log 2); lse - t where t or M is not finite (as F.cross_entropy: NaN for t = +inf).
FM_HOST_DEVICE float precise_nll(const LseState& s, float t, float lse) {
  if (!is_finite(t) || !is_finite(s.max)) return lse - t;
  const float gap = s.max - t;
  return gap <= 0.f ? log1pf(s.sum * expf(gap)) : gap + logf(s.sum + expf(-gap));
}

// The end of a forward row once its pass is done (CPU and CUDA kernels alike): pred and hard from the
// argmax, then the target margin (it needs hard and ELM's strongest wrong class), the target logit
// merged into the online logsumexp of the other logits, nll and the loss
// (1 - eps) w_y nll + eps / C (sum_{j != y} w_j (lse - l_j) + w_y nll); writes every output of row i.
// best_index / wrong_index: argmax of z' and of z' off the target (-1 when none was seen).
FM_HOST_DEVICE void finish_forward_row(const RowForwardArgs& a, int64_t i, bool kept, int64_t y, float c,
                                       int64_t best_index, int64_t wrong_index, bool track_wrong,
                                       const LseState& state, bool smoothing) {
  const int64_t pred = best_index < 0 ? 0 : best_index;
  const bool hard = kept && (a.hard_all || pred != y);
  a.pred[i] = pred;
  a.hard[i] = hard;
  if (!kept) {
    a.lse[i] = lse_value(state);
    a.loss[i] = 0.f;
    a.nll[i] = 0.f;
    a.target_grad[i] = 0.f;
    return;
  }
  RowMargin margin{0.f, 0.f};
  if (a.class_margins) {
    const float margin_wrong = track_wrong ? a.class_margins[wrong_index < 0 ? 0 : wrong_index] : 0.f;
    margin = row_margin(c, a.class_margins[y], margin_wrong, hard, a.lambda_inst, a.lambda_elm);
  }
  const TargetLogit t = target_logit(c, margin.margin, margin.dmargin_dc, a.scale, a.margin_type, a.fold,
                                     a.straight_through);
  const float tl = a.logit_offset ? t.value + a.logit_offset[y] : t.value;
  const LseState target_state{tl, expf(tl - lse_shift(tl)), 0.f, 0.f};
  const float lse = lse_value(lse_merge(state, target_state));
  const float nll = precise_nll(state, tl, lse);
  const float w_y = a.class_weight ? a.class_weight[y] : 1.f;
  float loss = (1.f - a.label_smoothing) * w_y * nll;
  if (smoothing) {
    const float smooth = smoothing_sum(state, lse) + w_y * nll;
    loss = loss + a.label_smoothing / static_cast<float>(a.cols) * smooth;
  }
  a.loss[i] = loss;
  a.lse[i] = lse;
  a.nll[i] = nll;
  a.target_grad[i] = t.grad;
}

}  // inline namespace FUSED_MARGIN_ROW_MATH_NS
}  // namespace fused_margin
