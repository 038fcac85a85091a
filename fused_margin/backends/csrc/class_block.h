// The class-block kernels of the memory-lean loss (fused_margin/paths/lean.py, ClassBlock): the per-element
// and per-row math written once for the CPU (class_block_cpu.cpp) and CUDA (fused_margin_cuda.cu)
// implementations of
//
//   block_partials_  merge one chunk's partial statistics into running per-row buffers, in place;
//   block_grad       write dL/draw of one chunk.
//
// The contract is fused_margin/core/class_split.py's (docs/loss.md, the class-split contract) and the same
// as the Triton kernels of fused_margin/backends/triton/class_block.py:
//
//   z'_ij = raw_ij r_i col_scale_j + col_shift_j,   l_ij = s z'_ij + a_j + P_ij,
//
// partials: the first index and value of max_j z' (torch.argmax's order: the first NaN wins, ties to
// the lower index), the same off the label column (ELM's c*), z'_iy where the label is in the chunk,
// and an online logsumexp of the non-target logits with torch.logsumexp's shift rule (the max where
// finite, else 0), with the label-smoothing sums dev = sum_j w_j (shift - l_j) and sum_j w_j; chunks
// are merged in class order, a later chunk winning an argmax only when strictly better;
// gradient: G_ij = s (exp(l_ij - lse_i) coef_i - w_j smooth_i) off the target, target_value_i on it,
// and dL/draw_ij = G_ij r_i col_scale_j.
//
// The accumulation type A is float (raw in fp32, bf16, fp16) or double (raw in fp64). No contraction
// into FMAs (setup.py: -ffp-contract=off, nvcc --fmad=false), as every backend of the package.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FM_BLOCK_HD __host__ __device__ __forceinline__
#else
#define FM_BLOCK_HD inline
#endif

namespace fused_margin {
namespace block {

// ---------------------------------------------------------------------------------------------
// Arguments, as plain pointers (no torch types: the CUDA kernels take them by value).

// The tables of one chunk, already offset to the chunk's first column: col_scale / col_shift from col0
// (the block's local index), offset / class_weight / pair from c0 (the global class index). Null when
// absent.
template <typename A>
struct ChunkTables {
  const void* raw;         // rows x width, unit column stride, row stride raw_stride
  int64_t raw_stride;
  int64_t rows, width;
  int64_t c0;              // the global class of column 0
  const int64_t* target;   // rows; ignore_index on ignored rows
  int64_t ignore_index;
  const A* row_scale;      // rows
  const A* col_scale;      // width
  const A* col_shift;      // width
  const A* offset;         // width
  const A* pair;           // rows x width, strides pair_row / pair_col
  int64_t pair_row, pair_col;
  const A* class_weight;   // width
  A scale;
};

// The running per-row partials (the fields of class_split.Partials), merged in place.
template <typename A>
struct PartialBuffers {
  A* z_max;
  int64_t* z_arg;
  A* wrong_max;
  int64_t* wrong_arg;
  A* z_y;
  bool* has_y;
  A* l_max;
  A* l_sum;
  A* dev;
  A* weight;
};

template <typename A>
struct PartialsArgs {
  ChunkTables<A> t;
  PartialBuffers<A> out;
  bool first, track_wrong, smoothing;
};

template <typename A>
struct GradArgs {
  ChunkTables<A> t;
  const A* lse;           // rows
  const A* coef;          // rows: g ((1 - eps) w_y + eps W / C)
  const A* smooth;        // rows: g eps / C (null without label smoothing)
  const A* target_value;  // rows: dL/dt dt/dz'_y
  void* out;              // rows x width in raw's dtype, unit column stride, row stride out_stride
  int64_t out_stride;
};

// ---------------------------------------------------------------------------------------------
// Scalar math (float or double).

FM_BLOCK_HD float exp_of(float x) { return expf(x); }
FM_BLOCK_HD double exp_of(double x) { return exp(x); }

template <typename A>
FM_BLOCK_HD bool nan(A v) { return v != v; }

template <typename A>
FM_BLOCK_HD bool finite(A v) { return v - v == A(0); }

// +inf from <cmath>'s constants (std::numeric_limits<A>::infinity() is a host-only constexpr function
// for nvcc without --expt-relaxed-constexpr)
template <typename A>
FM_BLOCK_HD A infinity();
template <>
FM_BLOCK_HD float infinity<float>() { return HUGE_VALF; }
template <>
FM_BLOCK_HD double infinity<double>() { return HUGE_VAL; }

// max that propagates NaN, as torch.maximum
template <typename A>
FM_BLOCK_HD A nan_max(A a, A b) { return (nan(a) || a > b) ? a : b; }

// torch.logsumexp's shift: the max where finite, else 0
template <typename A>
FM_BLOCK_HD A lse_shift(A m) { return finite(m) ? m : A(0); }

// z' of column j (chunk-local) from its raw score: raw r col_scale_j + col_shift_j
template <typename A>
FM_BLOCK_HD A base_score(const ChunkTables<A>& t, A raw, A row_scale, int64_t j) {
  A z = raw * row_scale;
  if (t.col_scale) z = z * t.col_scale[j];
  if (t.col_shift) z = z + t.col_shift[j];
  return z;
}

// l = s z' + a_j + P_ij
template <typename A>
FM_BLOCK_HD A logit(const ChunkTables<A>& t, A z, int64_t i, int64_t j) {
  A l = t.scale * z;
  if (t.offset) l = l + t.offset[j];
  if (t.pair) l = l + t.pair[i * t.pair_row + j * t.pair_col];
  return l;
}

// torch.argmax's order: NaN above everything (the first NaN wins), then larger values, ties to the
// lower index. Whether (value, index) beats (best, best_index); index -1 is "none yet".
template <typename A>
FM_BLOCK_HD bool argmax_better(A value, int64_t index, A best, int64_t best_index) {
  if (best_index < 0) return true;
  const bool value_nan = nan(value), best_nan = nan(best);
  if (value_nan || best_nan) return value_nan && (!best_nan || index < best_index);
  return value > best || (value == best && index < best_index);
}

template <typename A>
struct Argmax {
  A value;
  int64_t index;  // -1 until a column was seen
};

template <typename A>
FM_BLOCK_HD Argmax<A> argmax_empty() { return {-infinity<A>(), -1}; }

template <typename A>
FM_BLOCK_HD void argmax_add(Argmax<A>& best, A value, int64_t index) {
  if (argmax_better(value, index, best.value, best.index)) best = {value, index};
}

// An online logsumexp with torch's shift rule plus the label-smoothing sums (class_split.Partials'
// l_max, l_sum, dev, weight).
template <typename A>
struct Lse {
  A max, sum, dev, weight;
};

template <typename A>
FM_BLOCK_HD Lse<A> lse_empty() { return {-infinity<A>(), A(0), A(0), A(0)}; }

// class_split.combine's rule for two partial states (either may be empty)
template <typename A>
FM_BLOCK_HD Lse<A> lse_merge(const Lse<A>& a, const Lse<A>& b) {
  const A m = nan_max(a.max, b.max);
  const A shift = lse_shift(m), shift_a = lse_shift(a.max), shift_b = lse_shift(b.max);
  Lse<A> out;
  out.max = m;
  out.sum = (a.sum == A(0) ? A(0) : a.sum * exp_of(shift_a - shift)) +
            (b.sum == A(0) ? A(0) : b.sum * exp_of(shift_b - shift));
  out.dev = a.dev + (a.weight == A(0) ? A(0) : a.weight * (shift - shift_a)) + b.dev +
            (b.weight == A(0) ? A(0) : b.weight * (shift - shift_b));
  out.weight = a.weight + b.weight;
  if (nan(m)) out.sum = m;
  return out;
}

// Adds one non-target logit l (class weight w) to an online state, moving its shift when l is a new
// max (the CUDA threads' one-pass form; the CPU rows take the max first and sum once).
template <typename A>
FM_BLOCK_HD void lse_add(Lse<A>& s, A l, A w, bool smoothing) {
  const A m = nan_max(s.max, l);
  if (!(m == s.max)) {
    const A old_shift = lse_shift(s.max), new_shift = lse_shift(m);
    if (s.sum != A(0)) s.sum = s.sum * exp_of(old_shift - new_shift);
    if (s.weight != A(0)) s.dev = s.dev + s.weight * (new_shift - old_shift);
    s.max = m;
  }
  const A shift = lse_shift(s.max);
  s.sum = s.sum + exp_of(l - shift);
  if (nan(s.max)) s.sum = s.max;
  if (smoothing) {
    if (!nan(l)) s.dev = s.dev + w * (shift - l);
    s.weight = s.weight + w;
  }
}

// What one row of a chunk (or one thread's share of it) gathers.
template <typename A>
struct RowPartial {
  Argmax<A> best, wrong;  // chunk-local indices
  A z_y;                  // z' at the label column where holds_y
  bool holds_y;
  Lse<A> lse;
};

template <typename A>
FM_BLOCK_HD RowPartial<A> row_partial_empty() {
  return {argmax_empty<A>(), argmax_empty<A>(), A(0), false, lse_empty<A>()};
}

template <typename A>
FM_BLOCK_HD void row_partial_merge(RowPartial<A>& a, const RowPartial<A>& b) {
  argmax_add(a.best, b.best.value, b.best.index);
  argmax_add(a.wrong, b.wrong.value, b.wrong.index);
  if (b.holds_y) {
    a.z_y = b.z_y;
    a.holds_y = true;
  }
  a.lse = lse_merge(a.lse, b.lse);
}

// Row i's label: (local label column, kept). Ignored rows use label 0, as the reference.
struct RowLabel {
  int64_t local_y;
  bool kept;
};

template <typename A>
FM_BLOCK_HD RowLabel row_label(const ChunkTables<A>& t, int64_t i) {
  const int64_t label = t.target[i];
  const bool kept = label != t.ignore_index;
  return {(kept ? label : 0) - t.c0, kept};
}

// The argmax part and z_y of one column of row i: z' = z (chunk-local column j).
// ELM's c* is the argmax with the label column set to -inf, as class_split.block_partials (so a row
// whose other scores are all -inf points at the lowest column, the label's included, as torch.argmax).
template <typename A>
FM_BLOCK_HD void partial_scores(RowPartial<A>& p, A z, int64_t j, const RowLabel& y, bool track_wrong) {
  argmax_add(p.best, z, j);
  if (j == y.local_y) {
    p.z_y = z;
    p.holds_y = true;
  }
  if (track_wrong) argmax_add(p.wrong, j == y.local_y ? -infinity<A>() : z, j);
}

// Whether column j's logit enters the non-target logsumexp of row i.
FM_BLOCK_HD bool non_target(int64_t j, const RowLabel& y) { return !(y.kept && j == y.local_y); }

// Row i's chunk partials merged into the running buffers (class_split.combine with the chunks in class
// order: the chunk's global argmax indices are above the buffers').
template <typename A>
FM_BLOCK_HD void merge_row(const PartialsArgs<A>& a, int64_t i, const RowLabel& y, RowPartial<A> p) {
  const ChunkTables<A>& t = a.t;
  const PartialBuffers<A>& b = a.out;
  const bool has_y = y.local_y >= 0 && y.local_y < t.width;
  // an empty argmax (a chunk whose only column is the label) points at column 0, as torch.argmax
  const Argmax<A> best{p.best.value, (p.best.index < 0 ? 0 : p.best.index) + t.c0};
  const Argmax<A> wrong{p.wrong.value, (p.wrong.index < 0 ? 0 : p.wrong.index) + t.c0};
  if (a.first) {
    b.z_max[i] = best.value;
    b.z_arg[i] = best.index;
    if (a.track_wrong) {
      b.wrong_max[i] = wrong.value;
      b.wrong_arg[i] = wrong.index;
    }
    b.z_y[i] = has_y ? p.z_y : A(0);
    b.has_y[i] = has_y;
    b.l_max[i] = p.lse.max;
    b.l_sum[i] = p.lse.sum;
    b.dev[i] = p.lse.dev;
    b.weight[i] = p.lse.weight;
    return;
  }
  Argmax<A> prev{b.z_max[i], b.z_arg[i]};
  argmax_add(prev, best.value, best.index);
  b.z_max[i] = prev.value;
  b.z_arg[i] = prev.index;
  if (a.track_wrong) {
    Argmax<A> prev_wrong{b.wrong_max[i], b.wrong_arg[i]};
    argmax_add(prev_wrong, wrong.value, wrong.index);
    b.wrong_max[i] = prev_wrong.value;
    b.wrong_arg[i] = prev_wrong.index;
  }
  if (has_y) {
    b.z_y[i] = p.z_y;
    b.has_y[i] = true;
  }
  const Lse<A> merged = lse_merge(Lse<A>{b.l_max[i], b.l_sum[i], b.dev[i], b.weight[i]}, p.lse);
  b.l_max[i] = merged.max;
  b.l_sum[i] = merged.sum;
  b.dev[i] = merged.dev;
  b.weight[i] = merged.weight;
}

// The row constants of the gradient.
template <typename A>
struct GradRow {
  RowLabel y;
  A row_scale, lse, coef, smooth, target_value;
};

template <typename A>
FM_BLOCK_HD GradRow<A> grad_row(const GradArgs<A>& a, int64_t i) {
  const ChunkTables<A>& t = a.t;
  return {row_label(t, i), t.row_scale ? t.row_scale[i] : A(1), a.lse[i], a.coef[i],
          a.smooth ? a.smooth[i] : A(0), a.target_value[i]};
}

// dL/dz' off the target from p = exp(l - lse): s (p coef - w_j smooth)
template <typename A>
FM_BLOCK_HD A grad_off_target(const GradArgs<A>& a, const GradRow<A>& row, int64_t j, A p) {
  A dl = p * row.coef;
  if (a.smooth) dl = dl - (a.t.class_weight ? a.t.class_weight[j] : A(1)) * row.smooth;
  return dl * a.t.scale;
}

// dL/draw = dL/dz' r col_scale_j
template <typename A>
FM_BLOCK_HD A grad_raw(const GradArgs<A>& a, const GradRow<A>& row, int64_t j, A grad) {
  grad = grad * row.row_scale;
  if (a.t.col_scale) grad = grad * a.t.col_scale[j];
  return grad;
}

// dL/draw of column j (chunk-local) of row i with raw score r: G = s (exp(l - lse) coef - w_j smooth)
// off the target, target_value on it, times r col_scale_j.
template <typename A>
FM_BLOCK_HD A grad_element(const GradArgs<A>& a, const GradRow<A>& row, int64_t i, int64_t j, A r) {
  const ChunkTables<A>& t = a.t;
  const A grad = (row.y.kept && j == row.y.local_y)
                     ? row.target_value
                     : grad_off_target(a, row, j, exp_of(logit(t, base_score(t, r, row.row_scale, j), i, j) - row.lse));
  return grad_raw(a, row, j, grad);
}

}  // namespace block
}  // namespace fused_margin

// ---------------------------------------------------------------------------------------------
// The op arguments checked and converted (host code, shared by the CPU and CUDA wrappers).

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <optional>
#include <vector>

namespace fused_margin {
namespace block {

using OptionalTensor = std::optional<at::Tensor>;

// The accumulation dtype of a raw dtype: double for fp64, float for fp32 / bf16 / fp16.
inline at::ScalarType acc_type_of(const at::Tensor& raw, const char* op) {
  switch (raw.scalar_type()) {
    case at::kFloat:
    case at::kBFloat16:
    case at::kHalf: return at::kFloat;
    case at::kDouble: return at::kDouble;
    default:
      TORCH_CHECK(false, "fused_margin ", op, ": raw must be float32, float64, bfloat16 or float16, got ",
                  raw.scalar_type());
  }
  return at::kFloat;
}

// The checked and converted tensors of one call (kept alive here while the pointers are in use).
struct ChunkInputs {
  at::Tensor raw, target;
  at::ScalarType acc;
  std::vector<at::Tensor> keep;
  const char* op;

  ChunkInputs(const at::Tensor& raw_in, const at::Tensor& target_in, const char* op_name) : op(op_name) {
    TORCH_CHECK(raw_in.dim() == 2, "fused_margin ", op, ": raw must be 2-D (B x chunk), got ", raw_in.dim(), "-D");
    acc = acc_type_of(raw_in, op);
    raw = raw_in.stride(1) == 1 || raw_in.size(1) <= 1 ? raw_in : raw_in.contiguous();
    TORCH_CHECK(target_in.dim() == 1 && target_in.size(0) == raw.size(0), "fused_margin ", op,
                ": target must be 1-D with B = ", raw.size(0), " labels, got shape ", target_in.sizes());
    TORCH_CHECK(target_in.scalar_type() == at::kLong, "fused_margin ", op, ": target must be int64, got ",
                target_in.scalar_type());
    TORCH_CHECK(target_in.device() == raw.device(), "fused_margin ", op, ": target is on ", target_in.device(),
                " but raw is on ", raw.device());
    target = target_in.contiguous();
  }

  // A per-row vector (rows) in the accumulation dtype.
  template <typename A>
  const A* rows(const at::Tensor& v, const char* name) {
    TORCH_CHECK(v.dim() == 1 && v.size(0) == raw.size(0), "fused_margin ", op, ": ", name, " must have shape (",
                raw.size(0), ",), got ", v.sizes());
    return converted<A>(v, name);
  }

  template <typename A>
  const A* optional_rows(const OptionalTensor& v, const char* name) {
    return v.has_value() && v->defined() ? rows<A>(*v, name) : nullptr;
  }

  // A column table (1-D, at least first + width entries) from its entry `first`, or null when absent.
  template <typename A>
  const A* columns(const OptionalTensor& v, const char* name, int64_t first) {
    if (!v.has_value() || !v->defined()) return nullptr;
    TORCH_CHECK(first >= 0, "fused_margin ", op, ": negative first column ", first, " of ", name);
    TORCH_CHECK(v->dim() == 1 && v->size(0) >= first + raw.size(1), "fused_margin ", op, ": ", name,
                " must be 1-D with at least ", first + raw.size(1), " entries, got shape ", v->sizes());
    return converted<A>(*v, name) + first;
  }

  template <typename A>
  const A* converted(const at::Tensor& v, const char* name) {
    TORCH_CHECK(v.device() == raw.device(), "fused_margin ", op, ": ", name, " is on ", v.device(),
                " but raw is on ", raw.device());
    TORCH_CHECK(at::isFloatingType(v.scalar_type()), "fused_margin ", op, ": ", name,
                " must be floating point, got ", v.scalar_type());
    keep.push_back(v.to(acc).contiguous());
    return keep.back().template const_data_ptr<A>();
  }

  // ChunkTables of the call: c0 the global class of raw's column 0, col0 the first entry of
  // col_scale / col_shift; offset, class_weight and pair (B x C) are indexed from c0.
  template <typename A>
  ChunkTables<A> tables(int64_t c0, int64_t col0, double scale, int64_t ignore_index,
                        const OptionalTensor& row_scale, const OptionalTensor& col_scale,
                        const OptionalTensor& col_shift, const OptionalTensor& offset,
                        const OptionalTensor& pair, const OptionalTensor& class_weight) {
    ChunkTables<A> t{};
    t.raw = raw.const_data_ptr();
    t.raw_stride = raw.stride(0);
    t.rows = raw.size(0);
    t.width = raw.size(1);
    t.c0 = c0;
    t.target = target.const_data_ptr<int64_t>();
    t.ignore_index = ignore_index;
    t.row_scale = optional_rows<A>(row_scale, "row_scale");
    t.col_scale = columns<A>(col_scale, "col_scale", col0);
    t.col_shift = columns<A>(col_shift, "col_shift", col0);
    t.offset = columns<A>(offset, "offset", c0);
    t.class_weight = columns<A>(class_weight, "class_weight", c0);
    t.pair = nullptr;
    if (pair.has_value() && pair->defined()) {
      const at::Tensor& p = *pair;
      TORCH_CHECK(p.dim() == 2 && p.size(0) == raw.size(0) && p.size(1) >= c0 + raw.size(1) && c0 >= 0,
                  "fused_margin ", op, ": pair must be B x C with B = ", raw.size(0), " and C >= ",
                  c0 + raw.size(1), ", got shape ", p.sizes());
      TORCH_CHECK(p.device() == raw.device(), "fused_margin ", op, ": pair is on ", p.device(),
                  " but raw is on ", raw.device());
      TORCH_CHECK(at::isFloatingType(p.scalar_type()), "fused_margin ", op, ": pair must be floating point, got ",
                  p.scalar_type());
      // strides kept: a B x C table is converted only when its dtype differs (the callers pass it in
      // the accumulation dtype once per loss, not per chunk)
      keep.push_back(p.scalar_type() == acc ? p : p.to(acc));
      const at::Tensor& q = keep.back();
      t.pair_row = q.stride(0);
      t.pair_col = q.stride(1);
      t.pair = q.template const_data_ptr<A>() + c0 * t.pair_col;
    }
    t.scale = static_cast<A>(scale);
    return t;
  }
};

// Calls f(T(), A()) with raw's element type T and its accumulation type A (class_block_cpu.cpp and the
// CUDA wrappers).
template <typename F>
void dispatch_raw(const at::Tensor& raw, F&& f) {
  switch (raw.scalar_type()) {
    case at::kFloat: f(float(), float()); break;
    case at::kDouble: f(double(), double()); break;
    case at::kBFloat16: f(c10::BFloat16(), float()); break;
    case at::kHalf: f(c10::Half(), float()); break;
    default: TORCH_CHECK(false, "fused_margin class-block ops: unsupported raw dtype ", raw.scalar_type());
  }
}

// A running buffer of block_partials_: 1-D with B entries, contiguous, of the expected dtype.
inline void check_buffer(const ChunkInputs& in, const at::Tensor& b, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(b.dim() == 1 && b.size(0) == in.raw.size(0) && b.is_contiguous(), "fused_margin ", in.op, ": ", name,
              " must be a contiguous 1-D buffer of B = ", in.raw.size(0), " entries, got shape ", b.sizes());
  TORCH_CHECK(b.scalar_type() == dtype, "fused_margin ", in.op, ": ", name, " must be ", dtype, " (raw is ",
              in.raw.scalar_type(), "), got ", b.scalar_type());
  TORCH_CHECK(b.device() == in.raw.device(), "fused_margin ", in.op, ": ", name, " is on ", b.device(),
              " but raw is on ", in.raw.device());
}

// The arguments of one block_partials_ call, checked.
template <typename A>
PartialsArgs<A> partials_args(ChunkInputs& in, int64_t c0, const at::Tensor& z_max, const at::Tensor& z_arg,
                              const at::Tensor& wrong_max, const at::Tensor& wrong_arg, const at::Tensor& z_y,
                              const at::Tensor& has_y, const at::Tensor& l_max, const at::Tensor& l_sum,
                              const at::Tensor& dev, const at::Tensor& weight, bool first, double scale,
                              int64_t ignore_index, int64_t col0, const OptionalTensor& row_scale,
                              const OptionalTensor& col_scale, const OptionalTensor& col_shift,
                              const OptionalTensor& offset, const OptionalTensor& pair,
                              const OptionalTensor& class_weight, bool track_wrong, bool smoothing) {
  const at::Tensor* values[] = {&z_max, &wrong_max, &z_y, &l_max, &l_sum, &dev, &weight};
  const char* names[] = {"z_max", "wrong_max", "z_y", "l_max", "l_sum", "dev", "weight"};
  for (int k = 0; k < 7; ++k) check_buffer(in, *values[k], in.acc, names[k]);
  check_buffer(in, z_arg, at::kLong, "z_arg");
  check_buffer(in, wrong_arg, at::kLong, "wrong_arg");
  check_buffer(in, has_y, at::kBool, "has_y");
  PartialsArgs<A> a{};
  a.t = in.tables<A>(c0, col0, scale, ignore_index, row_scale, col_scale, col_shift, offset, pair, class_weight);
  a.out = {z_max.mutable_data_ptr<A>(), z_arg.mutable_data_ptr<int64_t>(), wrong_max.mutable_data_ptr<A>(),
           wrong_arg.mutable_data_ptr<int64_t>(), z_y.mutable_data_ptr<A>(), has_y.mutable_data_ptr<bool>(),
           l_max.mutable_data_ptr<A>(), l_sum.mutable_data_ptr<A>(), dev.mutable_data_ptr<A>(),
           weight.mutable_data_ptr<A>()};
  a.first = first;
  a.track_wrong = track_wrong;
  a.smoothing = smoothing;
  return a;
}

// The arguments of one block_grad call, checked (out: B x chunk in raw's dtype, unit column stride).
template <typename A>
GradArgs<A> grad_args(ChunkInputs& in, int64_t c0, const at::Tensor& lse, const at::Tensor& coef,
                      const OptionalTensor& smooth, const at::Tensor& target_value, const at::Tensor& out,
                      double scale, int64_t ignore_index, int64_t col0, const OptionalTensor& row_scale,
                      const OptionalTensor& col_scale, const OptionalTensor& col_shift,
                      const OptionalTensor& offset, const OptionalTensor& pair,
                      const OptionalTensor& class_weight) {
  TORCH_CHECK(out.dim() == 2 && out.sizes() == in.raw.sizes(), "fused_margin ", in.op, ": out must have raw's shape ",
              in.raw.sizes(), ", got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == in.raw.scalar_type(), "fused_margin ", in.op, ": out must have raw's dtype ",
              in.raw.scalar_type(), ", got ", out.scalar_type());
  TORCH_CHECK(out.device() == in.raw.device(), "fused_margin ", in.op, ": out is on ", out.device(),
              " but raw is on ", in.raw.device());
  TORCH_CHECK(out.size(1) <= 1 || out.stride(1) == 1, "fused_margin ", in.op,
              ": out must have a unit column stride, got strides ", out.strides());
  GradArgs<A> a{};
  a.t = in.tables<A>(c0, col0, scale, ignore_index, row_scale, col_scale, col_shift, offset, pair, class_weight);
  a.lse = in.rows<A>(lse, "lse");
  a.coef = in.rows<A>(coef, "coef");
  a.smooth = in.optional_rows<A>(smooth, "smooth");
  a.target_value = in.rows<A>(target_value, "target_value");
  a.out = out.mutable_data_ptr();
  a.out_stride = out.stride(0);
  return a;
}

}  // namespace block
}  // namespace fused_margin

// The CPU implementations (class_block_cpu.cpp), registered in fused_margin.cpp.
namespace fused_margin {
namespace block {

// The instruction set of the CPU class-block loops in use: "AVX512", "AVX2" or "DEFAULT".
const char* class_block_isa();

void block_partials_cpu(const at::Tensor& raw, int64_t c0, const at::Tensor& target, const at::Tensor& z_max,
                        const at::Tensor& z_arg, const at::Tensor& wrong_max, const at::Tensor& wrong_arg,
                        const at::Tensor& z_y, const at::Tensor& has_y, const at::Tensor& l_max,
                        const at::Tensor& l_sum, const at::Tensor& dev, const at::Tensor& weight, bool first,
                        double scale, int64_t ignore_index, int64_t col0, const OptionalTensor& row_scale,
                        const OptionalTensor& col_scale, const OptionalTensor& col_shift,
                        const OptionalTensor& offset, const OptionalTensor& pair,
                        const OptionalTensor& class_weight, bool track_wrong, bool smoothing);

void block_grad_cpu(const at::Tensor& raw, int64_t c0, const at::Tensor& target, const at::Tensor& lse,
                    const at::Tensor& coef, const OptionalTensor& smooth, const at::Tensor& target_value,
                    const at::Tensor& out, double scale, int64_t ignore_index, int64_t col0,
                    const OptionalTensor& row_scale, const OptionalTensor& col_scale,
                    const OptionalTensor& col_shift, const OptionalTensor& offset, const OptionalTensor& pair,
                    const OptionalTensor& class_weight);

}  // namespace block
}  // namespace fused_margin
