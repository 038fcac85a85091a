// The CPU row kernels of the fused margin loss, written once over at::vec::Vectorized<float> and
// compiled once per instruction set: row_kernel_cpu.cpp (DEFAULT), row_kernel_cpu_avx2.cpp and
// row_kernel_cpu_avx512.cpp define CPU_CAPABILITY and include this file (as ATen does for its own
// kernels); fused_margin.cpp picks one at run time from torch's own CPU capability.
//
// The contract is fused_margin/paths/fused.py's (executed eagerly in tests/helpers/row_torch.py):
//
// forward, one pass over each row of raw:
//   z'_j = raw_j * row_scale * col_scale_j + col_shift_j                    (fp32)
//   pred = argmax_j z'_j (first index, NaN first as torch.argmax), c = z'_y,
//   c* = argmax_{j != y} z'_j (ELM), l_j = s z'_j + a_j + P_j for j != y, and per chunk of the row
//   an online logsumexp of the non-target l_j (torch's shift rule) with the label-smoothing sum;
//   then M, the target logit t = s psi(c, M) + a_y and dt/dc (row_math.h), lse over {l_j, t},
//   nll = lse - t relative to the row maximum (row_math.h precise_nll) and
//   loss = (1 - eps) w_y nll + eps / C (sum_{j != y} w_j (lse - l_j) + w_y nll)    (docs/loss.md sections 2-4).
// backward, elementwise from the saved row statistics:
//   p_j = exp(l_j - lse), dl_j = g ((1 - eps) w_y p_j + eps / C (sum(w) p_j - w_j)) off the target,
//   dl_y = g ((1 - eps) w_y expm1(-nll) + eps / C ((sum(w) - w_y) + sum(w) expm1(-nll))) on it,
//   G_j = s dl_j off the target, G_y = (dt/dc) dl_y; times row_scale col_scale_j with scale_grad.
//
// Not a header to include anywhere else: each including translation unit defines the kernels of
// one instruction set in namespace fused_margin::cpu::CPU_CAPABILITY, and gets its own copy of
// row_math.h's inline functions (inline namespace fused_margin::row_math_<CPU_CAPABILITY>) and of
// at::vec's (inline namespace at::vec::CPU_CAPABILITY): no inline function or template of fused_margin
// or at::vec is one entity across the instruction sets, so the linker cannot hand one unit's AVX-512
// copy to another (one-definition rule; tests/backends/test_contract.py checks the built extension).

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY (DEFAULT, AVX2 or AVX512) before including row_kernel_cpu.h"
#endif

#if !defined(CPU_CAPABILITY_DEFAULT) && !defined(FUSED_MARGIN_ISA_ENABLED)
// An instruction set this compiler cannot target through a pragma (not GCC on x86-64): report
// vector_width() 0 so that fused_margin.cpp never picks these kernels.
#include "row_kernel.h"
namespace fused_margin {
namespace cpu {
namespace CPU_CAPABILITY {
void row_forward(const RowForwardArgs& a, int64_t begin, int64_t end) { DEFAULT::row_forward(a, begin, end); }
void row_backward(const RowBackwardArgs& a, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
  DEFAULT::row_backward(a, r0, r1, c0, c1);
}
void row_forward_backward(const RowForwardArgs& fa, const RowBackwardArgs& ba, int64_t begin, int64_t end) {
  DEFAULT::row_forward_backward(fa, ba, begin, end);
}
void row_norms(const RowNormsArgs& a, int64_t begin, int64_t end) { DEFAULT::row_norms(a, begin, end); }
void project_rows(const ProjectArgs& a, int64_t begin, int64_t end) { DEFAULT::project_rows(a, begin, end); }
int vector_width() { return 0; }
}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fused_margin
#else

#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "row_kernel.h"
#include "row_math.h"

namespace fused_margin {
namespace cpu {
namespace CPU_CAPABILITY {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();
// Columns per chunk of the forward's online logsumexp: the chunk's logits stay in L1.
constexpr int64_t kChunk = 1024;
static_assert(kChunk % kVec == 0, "the chunk must hold whole vectors");
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

inline Vec load_float(const float* p) { return Vec::loadu(p); }
inline Vec load_float(const c10::BFloat16* p) {
  Vec v;
  at::vec::load_fp32_from_bf16(p, v);
  return v;
}
inline Vec load_float(const c10::Half* p) {
  Vec v;
  at::vec::load_fp32_from_fp16(p, v);
  return v;
}

// kVec floats rounded (to nearest even) to 16 bits and stored: one conversion of the vector itself
// where the ISA has one (ATen's convert_float_bfloat16(v, v) would round two vectors, then store half
// of them through a masked store: twice the work on the projection's and dL/draw's stores)
inline void store_float(float* p, const Vec& v) { v.store(p); }
inline void store_float(c10::BFloat16* p, const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), at::vec::cvtfp32_bf16(__m512(v)));
#elif defined(CPU_CAPABILITY_AVX2)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), at::vec::cvtfp32_bf16(__m256(v)));
#else
  at::vec::convert_float_bfloat16(v, v).store(p, kVec);
#endif
}
inline void store_float(c10::Half* p, const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), at::vec::cvtfp32_fp16(__m512(v)));
#elif defined(CPU_CAPABILITY_AVX2)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), at::vec::cvtfp32_fp16(__m256(v)));
#else
  at::vec::convert_float_half(v, v).store(p, kVec);
#endif
}

// exp of the kernels' arguments l - shift <= 0 (up to rounding) on rows with a finite max: ATen's
// exp_u20 where vectorised (a degree-5 polynomial, within ~20 ulp, 1.2e-6 relative, of exp; about
// twice as fast as Sleef's exp). Its clamps make exp(+inf) finite and exp(NaN) not NaN, so rows with
// a non-finite max or lse take the exact exp.
inline Vec exp_of(const Vec& x, bool exact) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  return exact ? x.exp() : x.exp_u20();
#else
  (void)exact;
  return x.exp();
#endif
}

inline float horizontal_sum(const Vec& v) {
  alignas(64) float lanes[kVec];
  v.store(lanes);
  float total = 0.f;
  for (int64_t k = 0; k < kVec; ++k) total += lanes[k];
  return total;
}

inline float horizontal_max(const Vec& v) {
  alignas(64) float lanes[kVec];
  v.store(lanes);
  float best = -kInf;
  for (int64_t k = 0; k < kVec; ++k) best = nan_max(best, lanes[k]);
  return best;
}

struct Argmax {
  float value;
  int64_t index;  // -1 until an element beats -inf; torch.argmax of an all -inf row is 0
};

// Per-lane argmax over a chunk: lane k holds its best value and the chunk offset (as a float, exact
// below 2^24) of its first occurrence. NaN never wins here (comparisons with NaN are false): rows
// with a NaN score are rescanned by forward_rescan_argmax.
struct LaneArgmax {
  Vec value{-kInf};
  Vec offset{-1.f};
  void update(const Vec& z, const Vec& z_offset) {
    const Vec take = z > value;
    value = Vec::blendv(value, z, take);
    offset = Vec::blendv(offset, z_offset, take);
  }
  void merge_into(Argmax& best, int64_t chunk_begin) const {
    alignas(64) float values[kVec], offsets[kVec];
    value.store(values);
    offset.store(offsets);
    for (int64_t k = 0; k < kVec; ++k) {
      if (offsets[k] < 0.f) continue;
      const int64_t j = chunk_begin + static_cast<int64_t>(offsets[k]);
      if (argmax_better(values[k], j, best.value, best.index)) best = {values[k], j};
    }
  }
};

inline void argmax_update(Argmax& best, float z, int64_t j) {
  if (argmax_better(z, j, best.value, best.index)) best = {z, j};
}

template <typename T>
struct RowView {
  const RowForwardArgs& a;
  const T* raw;
  bool has_row_scale;
  float row_scale;

  float base(int64_t j) const {
    float z = static_cast<float>(raw[j]);
    if (has_row_scale) z = z * row_scale;
    if (a.col_scale) z = z * a.col_scale[j];
    if (a.col_shift) z = z + a.col_shift[j];
    return z;
  }
};

// The exact torch.argmax (NaN first) of z' and of z' without column y, for rows holding a NaN.
template <typename T>
void forward_rescan_argmax(const RowView<T>& row, int64_t cols, int64_t y, bool track_wrong,
                           Argmax& best, Argmax& wrong) {
  best = {-kInf, -1};
  wrong = {-kInf, -1};
  for (int64_t j = 0; j < cols; ++j) {
    const float z = row.base(j);
    argmax_update(best, z, j);
    if (track_wrong && j != y) argmax_update(wrong, z, j);
  }
}

// Adds buf[k0, k1), non-target logits of a chunk, to chunk (row_math.h LseState) whose max is already
// set: exp(l - shift) to its sum and, with smoothing, w_j (shift - l) to its deviation sum.
// With store, each exp(l - shift) is also written to store[k] (the forward-with-gradient's row buffer).
inline void chunk_accumulate(LseState& chunk, const float* buf, int64_t k0, int64_t k1, float shift,
                             const float* weight, bool smoothing, bool exact, float* store = nullptr) {
  const Vec vshift(shift);
  Vec vsum(0.f), vdev(0.f), vweight(0.f);
  int64_t k = k0;
  for (; k + kVec <= k1; k += kVec) {
    const Vec l = Vec::loadu(buf + k);
    const Vec e = exp_of(l - vshift, exact);
    vsum = vsum + e;
    if (store) e.store(store + k);
    if (smoothing) {
      const Vec w = weight ? Vec::loadu(weight + k) : Vec(1.f);
      vdev = vdev + w * (vshift - l);
      vweight = vweight + w;
    }
  }
  float sum = horizontal_sum(vsum), dev = 0.f, total_weight = 0.f;
  if (smoothing) {
    dev = horizontal_sum(vdev);
    total_weight = horizontal_sum(vweight);
  }
  for (; k < k1; ++k) {
    const float e = std::exp(buf[k] - shift);
    sum += e;
    if (store) store[k] = e;
    if (smoothing) {
      const float w = weight ? weight[k] : 1.f;
      dev += w * (shift - buf[k]);
      total_weight += w;
    }
  }
  chunk.sum += sum;
  chunk.dev += dev;
  chunk.weight += total_weight;
}

// The forward of row i. With exps (cols floats) and shifts (one a chunk of kChunk columns), it also keeps
// exp(l_j - shift_c) of every non-target column and each chunk's shift, and returns whether they give the
// row's p_j = exps_j exp(shift_c - lse) (a kept row whose chunks and lse are finite): the exps of the
// logsumexp, reused by backward_row_from_exps instead of recomputed.
template <typename T>
bool forward_row(const RowForwardArgs& a, int64_t i, float* exps = nullptr, float* shifts = nullptr) {
  const int64_t cols = a.cols;
  const RowView<T> row{a, static_cast<const T*>(a.raw) + i * a.raw_stride, a.row_scale != nullptr,
                       a.row_scale ? a.row_scale[i] : 1.f};
  const float* col_scale = a.col_scale;
  const float* col_shift = a.col_shift;
  const float* offset = a.logit_offset;
  const float* pair = a.pair_perturbation ? a.pair_perturbation + i * cols : nullptr;
  const int64_t label = a.target[i];
  const bool kept = label != a.ignore_index;
  const int64_t y = kept ? label : 0;
  const int64_t special = kept ? y : -1;  // the column whose logit is the margined target
  const bool track_wrong = kept && a.class_margins != nullptr && a.lambda_elm != 0.f;
  const bool smoothing = kept && a.label_smoothing != 0.f;

  const Vec vscale(a.scale), vrow_scale(row.row_scale), iota = Vec::arange(0.f, 1.f);
  alignas(64) float buf[kChunk];
  alignas(64) float lanes[kVec];
  Argmax best{-kInf, -1}, wrong{-kInf, -1};
  LseState state = lse_empty();
  float c = kNaN;
  bool exps_ok = exps != nullptr && kept;

  for (int64_t j0 = 0; j0 < cols; j0 += kChunk) {
    const int64_t n = std::min(kChunk, cols - j0);
    const int64_t n_vec = n - n % kVec;
    LaneArgmax lane_best, lane_wrong;
    Vec vmax(-kInf);
    for (int64_t k = 0; k < n_vec; k += kVec) {
      const int64_t j = j0 + k;
      Vec z = load_float(row.raw + j);
      if (row.has_row_scale) z = z * vrow_scale;
      if (col_scale) z = z * Vec::loadu(col_scale + j);
      if (col_shift) z = z + Vec::loadu(col_shift + j);
      const Vec z_offset = iota + Vec(static_cast<float>(k));
      lane_best.update(z, z_offset);
      Vec l = z * vscale;
      if (offset) l = l + Vec::loadu(offset + j);
      if (pair) l = l + Vec::loadu(pair + j);
      if (special >= j && special < j + kVec) {
        // the target column: read c, and leave it out of c* and of the non-target logits
        const int64_t lane = special - j;
        z.store(lanes);
        c = lanes[lane];
        if (track_wrong) {
          lanes[lane] = -kInf;
          lane_wrong.update(Vec::loadu(lanes), z_offset);
        }
        l.store(lanes);
        lanes[lane] = -kInf;
        l = Vec::loadu(lanes);
      } else if (track_wrong) {
        lane_wrong.update(z, z_offset);
      }
      l.store(buf + k);
      vmax = at::vec::maximum(vmax, l);
    }
    lane_best.merge_into(best, j0);
    if (track_wrong) lane_wrong.merge_into(wrong, j0);
    float chunk_max = horizontal_max(vmax);
    for (int64_t k = n_vec; k < n; ++k) {
      const int64_t j = j0 + k;
      const float z = row.base(j);
      argmax_update(best, z, j);
      float l = z * a.scale;
      if (offset) l = l + offset[j];
      if (pair) l = l + pair[j];
      if (j == special) {
        c = z;
        l = -kInf;
      } else if (track_wrong) {
        argmax_update(wrong, z, j);
      }
      buf[k] = l;
      chunk_max = nan_max(chunk_max, l);
    }

    LseState chunk{chunk_max, 0.f, 0.f, 0.f};
    if (is_nan(chunk_max)) {
      chunk.sum = kNaN;
      exps_ok = false;
    } else {
      const float shift = lse_shift(chunk_max);
      const float* weight = a.class_weight ? a.class_weight + j0 : nullptr;
      const bool exact = chunk_max == kInf;
      exps_ok = exps_ok && !exact;
      float* store = exps_ok ? exps + j0 : nullptr;
      if (store) shifts[j0 / kChunk] = shift;
      const int64_t skip = special - j0;  // the target column, outside the smoothing sum
      if (skip >= 0 && skip < n) {
        chunk_accumulate(chunk, buf, 0, skip, shift, weight, smoothing, exact, store);
        chunk_accumulate(chunk, buf, skip + 1, n, shift, weight, smoothing, exact, store);
      } else {
        chunk_accumulate(chunk, buf, 0, n, shift, weight, smoothing, exact, store);
      }
    }
    state = lse_merge(state, chunk);
  }

  if (is_nan(state.max) || (kept && is_nan(c))) {
    forward_rescan_argmax(row, cols, y, track_wrong, best, wrong);
  }
  finish_forward_row(a, i, kept, y, c, best.index, wrong.index, track_wrong, state, smoothing);
  return exps_ok && is_finite(a.lse[i]);
}

// The per-row coefficients of the backward (row i kept): off the target dl_j = g ((1 - eps) w_y p_j +
// eps / C (sum(w) p_j - w_j)) and G_j = s dl_j = p_coef p_j - w_coef w_j; on it dl_y from the precise nll
// and G_y = (dt/dz'_y) dl_y (g_y).
struct RowGradCoefs {
  float p_coef, w_coef, dl_y, g_y;
};

inline RowGradCoefs row_grad_coefs(const RowBackwardArgs& a, int64_t i, int64_t y) {
  const float eps = a.label_smoothing;
  const float eps_per_class = eps / static_cast<float>(a.cols);
  const float g = row_upstream_grad(a, i);
  const float w_y = a.class_weight ? a.class_weight[y] : 1.f;
  const float dl_y = target_column_grad(a.nll[i], w_y, a.weight_sum, eps, eps_per_class) * g;
  return {g * ((1.f - eps) * w_y + eps_per_class * a.weight_sum) * a.scale, g * eps_per_class * a.scale, dl_y,
          dl_y * a.target_grad[i]};
}

// G (or dL/draw with scale_grad) for rows [r0, r1), columns [c0, c1): one task of row_backward_cpu's grid
// (the rows within one row block of a.row_block rows, the columns one column block of
// a.col_block_width), with kSums the task's share of the sums of RowBackwardArgs (row_dot, col_partials).
template <typename T, typename Out, bool kSums>
void backward_block(const RowBackwardArgs& a, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
  const int64_t cols = a.cols;
  const float* col_scale = a.col_scale;
  const float* col_shift = a.col_shift;
  const float* offset = a.logit_offset;
  const float* weight = a.class_weight;
  const int64_t col_block = kSums ? c0 / a.col_block_width : 0;
  float* col_g = nullptr;  // null unless a.col_sum_grad
  float* col_graw = nullptr;
  float* col_dl = nullptr;
  if (kSums && a.col_partials != nullptr) {
    float* partial = a.col_partials + (r0 / a.row_block) * kNumColumnStats * cols;
    col_graw = partial + kSumGRaw * cols;
    if (a.col_sum_grad) {
      col_g = partial + kSumG * cols;
      col_dl = partial + kSumLogitGrad * cols;
    }
  }
  alignas(64) float lanes[kVec];
  for (int64_t i = r0; i < r1; ++i) {
    const T* raw = static_cast<const T*>(a.raw) + i * a.raw_stride;
    Out* out = static_cast<Out*>(a.grad) + i * a.grad_stride;
    const int64_t label = a.target[i];
    if (label == a.ignore_index) {
      std::fill(out + c0, out + c1, static_cast<Out>(0.f));
      if (kSums && a.row_dot != nullptr) a.row_dot[i * a.col_blocks + col_block] = 0.f;
      continue;
    }
    const int64_t y = label;
    const float* pair = a.pair_perturbation ? a.pair_perturbation + i * cols : nullptr;
    const bool has_row_scale = a.row_scale != nullptr;
    const float row_scale = has_row_scale ? a.row_scale[i] : 1.f;
    const float lse = a.lse[i];
    // G from the row's coefficients; the output is G, or G row_scale col_scale_j with scale_grad
    const RowGradCoefs coefs = row_grad_coefs(a, i, y);
    const float p_coef = coefs.p_coef, w_coef = coefs.w_coef, dl_y = coefs.dl_y, g_y = coefs.g_y;
    const bool scale_row = a.scale_grad && has_row_scale;
    const bool scale_cols = a.scale_grad && col_scale != nullptr;
    const Vec vscale(a.scale), vrow_scale(row_scale), vlse(lse), vp(p_coef), vw(w_coef);
    const bool exact = !is_finite(lse);
    Vec vdot(0.f);
    float dot = 0.f;

    auto element = [&](int64_t j) {
      const float r = static_cast<float>(raw[j]);
      float z = r;
      if (has_row_scale) z = z * row_scale;
      if (col_scale) z = z * col_scale[j];
      if (col_shift) z = z + col_shift[j];
      float l = z * a.scale;
      if (offset) l = l + offset[j];
      if (pair) l = l + pair[j];
      float grad = p_coef * std::exp(l - lse);
      if (w_coef != 0.f) grad = grad - w_coef * (weight ? weight[j] : 1.f);
      if (j == y) grad = g_y;
      float o = grad;
      if (scale_row) o = o * row_scale;
      if (scale_cols) o = o * col_scale[j];
      out[j] = static_cast<Out>(o);
      if (kSums) {
        const float gc = col_scale ? grad * col_scale[j] : grad;
        dot = dot + gc * r;
        if (col_graw != nullptr) col_graw[j] = col_graw[j] + (has_row_scale ? grad * row_scale : grad) * r;
        if (col_g != nullptr) col_g[j] = col_g[j] + grad;
      }
    };

    int64_t j = c0;
    for (; j + kVec <= c1; j += kVec) {
      const Vec r = load_float(raw + j);
      Vec z = r;
      Vec cs;
      if (has_row_scale) z = z * vrow_scale;
      if (col_scale) {
        cs = Vec::loadu(col_scale + j);
        z = z * cs;
      }
      if (col_shift) z = z + Vec::loadu(col_shift + j);
      Vec l = z * vscale;
      if (offset) l = l + Vec::loadu(offset + j);
      if (pair) l = l + Vec::loadu(pair + j);
      Vec grad = vp * exp_of(l - vlse, exact);
      if (w_coef != 0.f) grad = grad - vw * (weight ? Vec::loadu(weight + j) : Vec(1.f));
      if (y >= j && y < j + kVec) {  // the target column
        grad.store(lanes);
        lanes[y - j] = g_y;
        grad = Vec::loadu(lanes);
      }
      Vec o = grad;
      if (scale_row) o = o * vrow_scale;
      if (scale_cols) o = o * cs;
      store_float(out + j, o);
      if (kSums) {
        vdot = vdot + (col_scale ? grad * cs : grad) * r;
        if (col_graw != nullptr) {
          (Vec::loadu(col_graw + j) + (has_row_scale ? grad * vrow_scale : grad) * r).store(col_graw + j);
        }
        if (col_g != nullptr) (Vec::loadu(col_g + j) + grad).store(col_g + j);
      }
    }
    for (; j < c1; ++j) element(j);

    if (kSums) {
      if (a.row_dot != nullptr) a.row_dot[i * a.col_blocks + col_block] = horizontal_sum(vdot) + dot;
      // the logit offset's gradient is sum_i G_ij / s plus, on the target, dl_iy - G_iy / s
      if (col_dl != nullptr && y >= c0 && y < c1) col_dl[y] = col_dl[y] + (dl_y - g_y / a.scale);
    }
  }
}

// dL/draw of row i (scale_grad, no sums) from the forward's exps: p_j = exps_j exp(shift_c - lse) for the
// chunk c of column j, one exp a chunk instead of one an element, and no read of raw. The per-row
// coefficients are backward_block's.
template <typename T>
void backward_row_from_exps(const RowBackwardArgs& a, int64_t i, const float* exps, const float* shifts) {
  const int64_t cols = a.cols;
  const float* col_scale = a.col_scale;
  const float* weight = a.class_weight;
  T* out = static_cast<T*>(a.grad) + i * a.grad_stride;
  const int64_t y = a.target[i];
  const bool has_row_scale = a.row_scale != nullptr;
  const float row_scale = has_row_scale ? a.row_scale[i] : 1.f;
  const float lse = a.lse[i];
  const RowGradCoefs coefs = row_grad_coefs(a, i, y);
  const float p_coef = coefs.p_coef, w_coef = coefs.w_coef, g_y = coefs.g_y;
  const Vec vrow_scale(row_scale), vw(w_coef);
  alignas(64) float lanes[kVec];
  for (int64_t j0 = 0; j0 < cols; j0 += kChunk) {
    const int64_t j1 = std::min(cols, j0 + kChunk);
    const float factor = p_coef * std::exp(shifts[j0 / kChunk] - lse);
    const Vec vf(factor);
    auto element = [&](int64_t j) {
      float grad = factor * exps[j];
      if (w_coef != 0.f) grad = grad - w_coef * (weight ? weight[j] : 1.f);
      if (j == y) grad = g_y;
      float o = grad;
      if (has_row_scale) o = o * row_scale;
      if (col_scale) o = o * col_scale[j];
      out[j] = static_cast<T>(o);
    };
    int64_t j = j0;
    for (; j + kVec <= j1; j += kVec) {
      Vec grad = vf * Vec::loadu(exps + j);
      if (w_coef != 0.f) grad = grad - vw * (weight ? Vec::loadu(weight + j) : Vec(1.f));
      if (y >= j && y < j + kVec) {
        grad.store(lanes);
        lanes[y - j] = g_y;
        grad = Vec::loadu(lanes);
      }
      if (has_row_scale) grad = grad * vrow_scale;
      if (col_scale) grad = grad * Vec::loadu(col_scale + j);
      store_float(out + j, grad);
    }
    for (; j < j1; ++j) element(j);
  }
}

template <typename T>
void row_forward_typed(const RowForwardArgs& a, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) forward_row<T>(a, i);
}

template <typename T, typename Out>
void row_backward_out(const RowBackwardArgs& a, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
  if (a.row_dot != nullptr || a.col_partials != nullptr) {
    backward_block<T, Out, true>(a, r0, r1, c0, c1);
  } else {
    backward_block<T, Out, false>(a, r0, r1, c0, c1);
  }
}

template <typename T>
void row_forward_backward_typed(const RowForwardArgs& fa, const RowBackwardArgs& ba, int64_t begin, int64_t end) {
  const int64_t cols = fa.cols;
  // the exps are reused when no sums are asked for (the sums read raw, which the gradient overwrites)
  const bool reuse = ba.row_dot == nullptr && ba.col_partials == nullptr && ba.scale_grad;
  std::vector<float> exps(reuse ? cols : 0), shifts(reuse ? (cols + kChunk - 1) / kChunk : 0);
  for (int64_t i = begin; i < end; ++i) {
    if (forward_row<T>(fa, i, reuse ? exps.data() : nullptr, reuse ? shifts.data() : nullptr)) {
      backward_row_from_exps<T>(ba, i, exps.data(), shifts.data());
      continue;
    }
    for (int64_t c0 = 0; c0 < cols; c0 += ba.col_block_width) {
      row_backward_out<T, T>(ba, i, i + 1, c0, std::min(cols, c0 + ba.col_block_width));
    }
  }
}

template <typename T>
void row_backward_typed(const RowBackwardArgs& a, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
  if (a.scale_grad) {
    row_backward_out<T, T>(a, r0, r1, c0, c1);
  } else {
    row_backward_out<T, float>(a, r0, r1, c0, c1);
  }
}

void row_forward(const RowForwardArgs& a, int64_t begin, int64_t end) {
  switch (a.raw_type) {
    case RawType::Float: return row_forward_typed<float>(a, begin, end);
    case RawType::BFloat16: return row_forward_typed<c10::BFloat16>(a, begin, end);
    case RawType::Half: return row_forward_typed<c10::Half>(a, begin, end);
  }
}

void row_forward_backward(const RowForwardArgs& fa, const RowBackwardArgs& ba, int64_t begin, int64_t end) {
  switch (fa.raw_type) {
    case RawType::Float: return row_forward_backward_typed<float>(fa, ba, begin, end);
    case RawType::BFloat16: return row_forward_backward_typed<c10::BFloat16>(fa, ba, begin, end);
    case RawType::Half: return row_forward_backward_typed<c10::Half>(fa, ba, begin, end);
  }
}

void row_backward(const RowBackwardArgs& a, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
  switch (a.raw_type) {
    case RawType::Float: return row_backward_typed<float>(a, r0, r1, c0, c1);
    case RawType::BFloat16: return row_backward_typed<c10::BFloat16>(a, r0, r1, c0, c1);
    case RawType::Half: return row_backward_typed<c10::Half>(a, r0, r1, c0, c1);
  }
}

// ||x_i|| with the squares in fp32 (as torch.linalg.vector_norm: over- and underflow as torch's), summed in
// two vectors of fp32 lanes, the lanes and the tail then merged in double in a fixed order.
template <typename T>
void row_norms_typed(const RowNormsArgs& a, int64_t begin, int64_t end) {
  const int64_t cols = a.cols;
  for (int64_t i = begin; i < end; ++i) {
    const T* row = static_cast<const T*>(a.x) + i * cols;
    Vec v0(0.f), v1(0.f);
    int64_t j = 0;
    for (; j + 2 * kVec <= cols; j += 2 * kVec) {
      const Vec x0 = load_float(row + j), x1 = load_float(row + j + kVec);
      v0 = v0 + x0 * x0;
      v1 = v1 + x1 * x1;
    }
    alignas(64) float l0[kVec], l1[kVec];
    v0.store(l0);
    v1.store(l1);
    double sum = 0.0;
    for (int64_t k = 0; k < kVec; ++k) sum += static_cast<double>(l0[k]) + static_cast<double>(l1[k]);
    for (; j < cols; ++j) {
      const float v = static_cast<float>(row[j]);
      sum += static_cast<double>(v * v);
    }
    const float n = sum > static_cast<double>(std::numeric_limits<float>::max()) ? kInf
                                                                                 : static_cast<float>(std::sqrt(sum));
    const float r = 1.f / std::max(n, a.eps);  // NaN stays NaN (std::max keeps its first argument)
    a.norm[i] = n;
    a.inv[i] = r;
    a.proj[i] = n >= a.eps ? r * r : 0.f;
  }
}

void row_norms(const RowNormsArgs& a, int64_t begin, int64_t end) {
  switch (a.x_type) {
    case RawType::Float: return row_norms_typed<float>(a, begin, end);
    case RawType::BFloat16: return row_norms_typed<c10::BFloat16>(a, begin, end);
    case RawType::Half: return row_norms_typed<c10::Half>(a, begin, end);
  }
}

template <typename T>
void project_rows_typed(const ProjectArgs& a, int64_t begin, int64_t end) {
  const int64_t cols = a.cols;
  for (int64_t i = begin; i < end; ++i) {
    T* grad = static_cast<T*>(a.grad) + i * cols;
    const T* v = static_cast<const T*>(a.v) + i * cols;
    // c = -proj_i (grad_i . v_i): two fp32 lane sums, the lanes then merged in a fixed order
    Vec d0(0.f), d1(0.f);
    int64_t k = 0;
    for (; k + 2 * kVec <= cols; k += 2 * kVec) {
      d0 = d0 + load_float(grad + k) * load_float(v + k);
      d1 = d1 + load_float(grad + k + kVec) * load_float(v + k + kVec);
    }
    for (; k + kVec <= cols; k += kVec) d0 = d0 + load_float(grad + k) * load_float(v + k);
    float dot = horizontal_sum(d0 + d1);
    for (; k < cols; ++k) dot = dot + static_cast<float>(grad[k]) * static_cast<float>(v[k]);
    const float c = a.proj[i] == 0.f ? 0.f : -a.proj[i] * dot;
    const Vec vc(c), vs(a.scale);
    int64_t j = 0;
    for (; j + kVec <= cols; j += kVec) store_float(grad + j, (load_float(grad + j) + vc * load_float(v + j)) * vs);
    for (; j < cols; ++j) {
      grad[j] = static_cast<T>((static_cast<float>(grad[j]) + c * static_cast<float>(v[j])) * a.scale);
    }
  }
}

void project_rows(const ProjectArgs& a, int64_t begin, int64_t end) {
  switch (a.type) {
    case RawType::Float: return project_rows_typed<float>(a, begin, end);
    case RawType::BFloat16: return project_rows_typed<c10::BFloat16>(a, begin, end);
    case RawType::Half: return project_rows_typed<c10::Half>(a, begin, end);
  }
}

int vector_width() { return static_cast<int>(kVec); }

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fused_margin

#endif  // an instruction set this compiler can target
